//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the `fuzz_smoke` test,
//! so that stable-toolchain CI runs the same code over a corpus. None may panic.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tsunagu_proto::NodePrivate;

use crate::client::ClientConn;
use crate::conn::{ConnConfig, ServerConn};
use crate::frame::{ClientMessage, FrameDecoder, MAX_FRAME_LEN, RawFrame, ServerMessage};
use crate::info::ClientInfo;
use crate::stun;

/// Arbitrary bytes as a DERP stream, into both directions' decoders and state machines,
/// chunked as the first byte says; every parsed message must re-encode to what it came
/// from (for the types that carry their whole payload).
pub fn derp_frames(data: &[u8]) {
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);

    // The server side, as a relay would see a client's bytes.
    let cfg = Arc::new(ConnConfig::new(NodePrivate::from_bytes([5; 32])));
    let now = Instant::now();
    let mut server = ServerConn::new(cfg, now);
    for chunk in data.chunks(step) {
        if server.handle_input(chunk, now).is_err() {
            break;
        }
        while server.poll_event().is_some() {}
        let _ = server.poll_transmit();
    }
    let _ = server.handle_eof();

    // The client side, as tsunagud would see a relay's bytes.
    let mut client = ClientConn::new(NodePrivate::from_bytes([6; 32]), ClientInfo::default());
    for chunk in data.chunks(step) {
        if client.handle_input(chunk).is_err() {
            break;
        }
        while client.poll_event().is_some() {}
        let _ = client.poll_transmit();
    }

    // Plain decoding and the encode/parse round trip.
    let mut d = FrameDecoder::new(MAX_FRAME_LEN);
    d.push(data);
    while let Ok(Some(frame)) = d.next_frame() {
        if let Ok(msg) = ClientMessage::parse(frame.clone()) {
            let mut out = bytes::BytesMut::new();
            msg.encode(&mut out);
            round_trip_client(&msg, &out);
        }
        if let Ok(msg) = ServerMessage::parse(frame) {
            let mut out = bytes::BytesMut::new();
            msg.encode(&mut out);
            round_trip_server(&msg, &out);
        }
    }
}

fn reparse(out: &[u8]) -> Option<RawFrame> {
    let mut d = FrameDecoder::new(MAX_FRAME_LEN);
    d.push(out);
    d.next_frame().ok().flatten().map(|f| RawFrame {
        ty: f.ty,
        payload: Bytes::copy_from_slice(&f.payload),
    })
}

fn round_trip_client(msg: &ClientMessage, out: &[u8]) {
    if matches!(msg, ClientMessage::Unknown(_)) {
        return;
    }
    let again = reparse(out).and_then(|f| ClientMessage::parse(f).ok());
    assert_eq!(
        again.as_ref(),
        Some(msg),
        "client message does not round-trip"
    );
}

fn round_trip_server(msg: &ServerMessage, out: &[u8]) {
    // Health text is decoded lossily, so it may not reproduce the input bytes, but
    // its re-encoding must parse to the same message.
    if matches!(msg, ServerMessage::Unknown(_)) {
        return;
    }
    let again = reparse(out).and_then(|f| ServerMessage::parse(f).ok());
    assert_eq!(
        again.as_ref(),
        Some(msg),
        "server message does not round-trip"
    );
}

/// Arbitrary bytes as a STUN datagram: parsers must not panic, and whatever parses as a
/// request gets a response that parses back to the same transaction and address.
pub fn stun_packet(data: &[u8]) {
    let _ = stun::parse_binding_response(data);
    if let Ok(tx) = stun::parse_binding_request(data) {
        let addr: SocketAddr = ([198, 51, 100, 3], 41641).into();
        let resp = stun::binding_response(tx, addr);
        assert_eq!(stun::parse_binding_response(&resp), Ok((tx, addr)));
    }
    let mut server = stun::StunServer::new(1000.0, 1000.0, 4);
    let _ = server.handle(([198, 18, 1, 10], 1).into(), data, Instant::now());
}
