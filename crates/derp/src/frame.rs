//! DERP framing: a 1-byte type and a 4-byte big-endian length, then the payload.
//!
//! [`FrameDecoder`] turns a byte stream (in any chunking) into [`RawFrame`]s and refuses
//! a frame whose announced length exceeds its limit before buffering it, so a peer can
//! never make us hold more than one maximal frame. [`ClientMessage`] and
//! [`ServerMessage`] give the frames meaning for each direction, with `parse` and
//! `encode` that round-trip.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tsunagu_proto::NodePublic;

/// Sent by the server in its first frame: `"DERP🔑"`.
pub const MAGIC: [u8; 8] = *b"DERP\xf0\x9f\x94\x91";
/// Type byte + 4-byte length.
pub const HEADER_LEN: usize = 5;
pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
/// Largest packet a client may relay (the data visible to WireGuard, not the framing).
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame either side accepts: a forwarded packet (two keys + a maximal packet).
/// Client and server info boxes are far smaller.
pub const MAX_FRAME_LEN: usize = 2 * KEY_LEN + MAX_PACKET_SIZE;
/// Version 2: `RecvPacket` starts with the sender's key.
pub const PROTOCOL_VERSION: u32 = 2;

/// The frame types of DERP protocol version 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameType {
    ServerKey = 0x01,
    ClientInfo = 0x02,
    ServerInfo = 0x03,
    SendPacket = 0x04,
    RecvPacket = 0x05,
    KeepAlive = 0x06,
    NotePreferred = 0x07,
    PeerGone = 0x08,
    PeerPresent = 0x09,
    ForwardPacket = 0x0a,
    WatchConns = 0x10,
    ClosePeer = 0x11,
    Ping = 0x12,
    Pong = 0x13,
    Health = 0x14,
    Restarting = 0x15,
}

/// Why a `PeerGone` was sent (optional byte after the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerGoneReason {
    /// The peer was connected (and sent to you) and has disconnected.
    Disconnected,
    /// You sent to a peer that is not connected to this relay.
    NotHere,
    /// A reason byte this implementation does not know.
    Other(u8),
}

impl PeerGoneReason {
    pub fn to_u8(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0x00,
            PeerGoneReason::NotHere => 0x01,
            PeerGoneReason::Other(b) => b,
        }
    }

    pub fn from_u8(b: u8) -> Self {
        match b {
            0x00 => PeerGoneReason::Disconnected,
            0x01 => PeerGoneReason::NotHere,
            b => PeerGoneReason::Other(b),
        }
    }
}

/// Input that breaks the protocol. Each closes the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of type {ty:#04x} announces {len} bytes, more than the limit of {max}")]
    Oversized { ty: u8, len: usize, max: usize },
    #[error("malformed {ty:?} frame: {reason}")]
    Malformed { ty: FrameType, reason: &'static str },
    #[error("bad server greeting: {0}")]
    BadGreeting(&'static str),
}

/// A frame as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub ty: u8,
    pub payload: Bytes,
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_len` payload bytes.
    pub fn new(max_len: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::with_capacity(4096),
            max_len,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet part of a complete frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let ty = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_len {
            return Err(FrameError::Oversized {
                ty,
                len,
                max: self.max_len,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(RawFrame { ty, payload }))
    }
}

/// Appends one frame made of `parts` to `out`.
pub fn write_frame(out: &mut BytesMut, ty: FrameType, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(HEADER_LEN + len);
    out.put_u8(ty as u8);
    // Callers build frames of at most MAX_FRAME_LEN bytes (checked by the message
    // constructors), far below u32::MAX.
    out.put_u32(len as u32);
    for p in parts {
        out.put_slice(p);
    }
}

fn key_at(b: &[u8], at: usize) -> NodePublic {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&b[at..at + KEY_LEN]);
    NodePublic(k)
}

fn eight(ty: FrameType, b: &[u8]) -> Result<[u8; 8], FrameError> {
    b.get(..8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .ok_or(FrameError::Malformed {
            ty,
            reason: "shorter than 8 bytes",
        })
}

fn need(ty: FrameType, b: &[u8], n: usize, reason: &'static str) -> Result<(), FrameError> {
    if b.len() < n {
        Err(FrameError::Malformed { ty, reason })
    } else {
        Ok(())
    }
}

/// What a client sends to a server (or a mesh peer to another relay).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientMessage {
    /// The client's key and its sealed [`crate::ClientInfo`] (nonce + box).
    ClientInfo {
        key: NodePublic,
        sealed: Bytes,
    },
    SendPacket {
        dst: NodePublic,
        packet: Bytes,
    },
    /// Mesh only: a packet from `src` (on another relay) for `dst` (here).
    ForwardPacket {
        src: NodePublic,
        dst: NodePublic,
        packet: Bytes,
    },
    NotePreferred(bool),
    KeepAlive,
    Ping([u8; 8]),
    Pong([u8; 8]),
    /// Mesh only: subscribe to PeerPresent / PeerGone for every client.
    WatchConns,
    /// Mesh only: close that client's connection.
    ClosePeer(NodePublic),
    /// A frame type a client does not send; ignored.
    Unknown(u8),
}

impl ClientMessage {
    pub fn parse(frame: RawFrame) -> Result<Self, FrameError> {
        let p = frame.payload;
        Ok(match frame.ty {
            0x02 => {
                let ty = FrameType::ClientInfo;
                need(
                    ty,
                    &p,
                    KEY_LEN + NONCE_LEN + 16,
                    "too short for key, nonce and box",
                )?;
                ClientMessage::ClientInfo {
                    key: key_at(&p, 0),
                    sealed: p.slice(KEY_LEN..),
                }
            }
            0x04 => {
                let ty = FrameType::SendPacket;
                need(ty, &p, KEY_LEN, "shorter than a key")?;
                if p.len() - KEY_LEN > MAX_PACKET_SIZE {
                    return Err(FrameError::Malformed {
                        ty,
                        reason: "packet larger than 64 KiB",
                    });
                }
                ClientMessage::SendPacket {
                    dst: key_at(&p, 0),
                    packet: p.slice(KEY_LEN..),
                }
            }
            0x0a => {
                let ty = FrameType::ForwardPacket;
                need(ty, &p, 2 * KEY_LEN, "shorter than two keys")?;
                ClientMessage::ForwardPacket {
                    src: key_at(&p, 0),
                    dst: key_at(&p, KEY_LEN),
                    packet: p.slice(2 * KEY_LEN..),
                }
            }
            0x07 => {
                let ty = FrameType::NotePreferred;
                need(ty, &p, 1, "empty")?;
                ClientMessage::NotePreferred(p[0] != 0)
            }
            0x06 => ClientMessage::KeepAlive,
            0x12 => ClientMessage::Ping(eight(FrameType::Ping, &p)?),
            0x13 => ClientMessage::Pong(eight(FrameType::Pong, &p)?),
            0x10 => ClientMessage::WatchConns,
            0x11 => {
                let ty = FrameType::ClosePeer;
                need(ty, &p, KEY_LEN, "shorter than a key")?;
                ClientMessage::ClosePeer(key_at(&p, 0))
            }
            t => ClientMessage::Unknown(t),
        })
    }

    /// Appends the frame to `out`. Unknown messages write nothing.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ClientMessage::ClientInfo { key, sealed } => {
                write_frame(out, FrameType::ClientInfo, &[&key.0, sealed])
            }
            ClientMessage::SendPacket { dst, packet } => {
                write_frame(out, FrameType::SendPacket, &[&dst.0, packet])
            }
            ClientMessage::ForwardPacket { src, dst, packet } => {
                write_frame(out, FrameType::ForwardPacket, &[&src.0, &dst.0, packet])
            }
            ClientMessage::NotePreferred(b) => {
                write_frame(out, FrameType::NotePreferred, &[&[u8::from(*b)]])
            }
            ClientMessage::KeepAlive => write_frame(out, FrameType::KeepAlive, &[]),
            ClientMessage::Ping(d) => write_frame(out, FrameType::Ping, &[d]),
            ClientMessage::Pong(d) => write_frame(out, FrameType::Pong, &[d]),
            ClientMessage::WatchConns => write_frame(out, FrameType::WatchConns, &[]),
            ClientMessage::ClosePeer(k) => write_frame(out, FrameType::ClosePeer, &[&k.0]),
            ClientMessage::Unknown(_) => {}
        }
    }
}

/// What a server sends to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerMessage {
    /// The greeting: magic and the server's DERP public key.
    ServerKey(NodePublic),
    /// The sealed [`crate::ServerInfo`] (nonce + box).
    ServerInfo {
        sealed: Bytes,
    },
    RecvPacket {
        src: NodePublic,
        packet: Bytes,
    },
    KeepAlive,
    PeerGone {
        key: NodePublic,
        reason: PeerGoneReason,
    },
    PeerPresent(NodePublic),
    Ping([u8; 8]),
    Pong([u8; 8]),
    /// A problem with the connection; empty clears it.
    Health(String),
    /// The server is restarting: reconnect after, and keep trying for, these durations.
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    Unknown(u8),
}

impl ServerMessage {
    pub fn parse(frame: RawFrame) -> Result<Self, FrameError> {
        let p = frame.payload;
        Ok(match frame.ty {
            0x01 => {
                if p.len() < MAGIC.len() + KEY_LEN {
                    return Err(FrameError::BadGreeting("too short"));
                }
                if p[..MAGIC.len()] != MAGIC {
                    return Err(FrameError::BadGreeting("wrong magic"));
                }
                ServerMessage::ServerKey(key_at(&p, MAGIC.len()))
            }
            0x03 => {
                need(
                    FrameType::ServerInfo,
                    &p,
                    NONCE_LEN + 16,
                    "too short for a box",
                )?;
                ServerMessage::ServerInfo { sealed: p }
            }
            0x05 => {
                need(FrameType::RecvPacket, &p, KEY_LEN, "shorter than a key")?;
                ServerMessage::RecvPacket {
                    src: key_at(&p, 0),
                    packet: p.slice(KEY_LEN..),
                }
            }
            0x06 => ServerMessage::KeepAlive,
            0x08 => {
                need(FrameType::PeerGone, &p, KEY_LEN, "shorter than a key")?;
                ServerMessage::PeerGone {
                    key: key_at(&p, 0),
                    reason: PeerGoneReason::from_u8(p.get(KEY_LEN).copied().unwrap_or(0)),
                }
            }
            0x09 => {
                need(FrameType::PeerPresent, &p, KEY_LEN, "shorter than a key")?;
                ServerMessage::PeerPresent(key_at(&p, 0))
            }
            0x12 => ServerMessage::Ping(eight(FrameType::Ping, &p)?),
            0x13 => ServerMessage::Pong(eight(FrameType::Pong, &p)?),
            0x14 => ServerMessage::Health(String::from_utf8_lossy(&p).into_owned()),
            0x15 => {
                need(FrameType::Restarting, &p, 8, "shorter than two durations")?;
                ServerMessage::Restarting {
                    reconnect_in_ms: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                    try_for_ms: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                }
            }
            t => ServerMessage::Unknown(t),
        })
    }

    /// Appends the frame to `out`. Unknown messages write nothing.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ServerMessage::ServerKey(k) => write_frame(out, FrameType::ServerKey, &[&MAGIC, &k.0]),
            ServerMessage::ServerInfo { sealed } => {
                write_frame(out, FrameType::ServerInfo, &[sealed])
            }
            ServerMessage::RecvPacket { src, packet } => {
                write_frame(out, FrameType::RecvPacket, &[&src.0, packet])
            }
            ServerMessage::KeepAlive => write_frame(out, FrameType::KeepAlive, &[]),
            ServerMessage::PeerGone { key, reason } => {
                write_frame(out, FrameType::PeerGone, &[&key.0, &[reason.to_u8()]])
            }
            ServerMessage::PeerPresent(k) => write_frame(out, FrameType::PeerPresent, &[&k.0]),
            ServerMessage::Ping(d) => write_frame(out, FrameType::Ping, &[d]),
            ServerMessage::Pong(d) => write_frame(out, FrameType::Pong, &[d]),
            ServerMessage::Health(s) => write_frame(out, FrameType::Health, &[s.as_bytes()]),
            ServerMessage::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => write_frame(
                out,
                FrameType::Restarting,
                &[&reconnect_in_ms.to_be_bytes(), &try_for_ms.to_be_bytes()],
            ),
            ServerMessage::Unknown(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    fn decode_all(bytes: &[u8], chunk: usize) -> Vec<RawFrame> {
        let mut d = FrameDecoder::new(MAX_FRAME_LEN);
        let mut out = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            d.push(c);
            while let Some(f) = d.next_frame().expect("valid") {
                out.push(f);
            }
        }
        assert_eq!(d.buffered(), 0);
        out
    }

    #[test]
    fn magic_is_derp_and_key_emoji() {
        assert_eq!(&MAGIC[..], "DERP🔑".as_bytes());
    }

    #[test]
    fn client_messages_round_trip_in_any_chunking() {
        let msgs = vec![
            ClientMessage::ClientInfo {
                key: k(1),
                sealed: Bytes::from(vec![7; NONCE_LEN + 40]),
            },
            ClientMessage::SendPacket {
                dst: k(2),
                packet: Bytes::from_static(b"hello"),
            },
            ClientMessage::SendPacket {
                dst: k(2),
                packet: Bytes::from(vec![9; MAX_PACKET_SIZE]),
            },
            ClientMessage::ForwardPacket {
                src: k(3),
                dst: k(4),
                packet: Bytes::from_static(b"x"),
            },
            ClientMessage::NotePreferred(true),
            ClientMessage::NotePreferred(false),
            ClientMessage::KeepAlive,
            ClientMessage::Ping(*b"12345678"),
            ClientMessage::Pong(*b"87654321"),
            ClientMessage::WatchConns,
            ClientMessage::ClosePeer(k(5)),
        ];
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        for chunk in [1, 3, 5, 4096, wire.len()] {
            let got: Vec<ClientMessage> = decode_all(&wire, chunk)
                .into_iter()
                .map(|f| ClientMessage::parse(f).expect("parses"))
                .collect();
            assert_eq!(got, msgs, "chunk {chunk}");
        }
    }

    #[test]
    fn server_messages_round_trip() {
        let msgs = vec![
            ServerMessage::ServerKey(k(1)),
            ServerMessage::ServerInfo {
                sealed: Bytes::from(vec![1; NONCE_LEN + 30]),
            },
            ServerMessage::RecvPacket {
                src: k(2),
                packet: Bytes::from_static(b"data"),
            },
            ServerMessage::KeepAlive,
            ServerMessage::PeerGone {
                key: k(3),
                reason: PeerGoneReason::NotHere,
            },
            ServerMessage::PeerGone {
                key: k(3),
                reason: PeerGoneReason::Disconnected,
            },
            ServerMessage::PeerPresent(k(4)),
            ServerMessage::Ping([1; 8]),
            ServerMessage::Pong([2; 8]),
            ServerMessage::Health("duplicate".into()),
            ServerMessage::Restarting {
                reconnect_in_ms: 500,
                try_for_ms: 5000,
            },
        ];
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        let got: Vec<ServerMessage> = decode_all(&wire, 7)
            .into_iter()
            .map(|f| ServerMessage::parse(f).expect("parses"))
            .collect();
        assert_eq!(got, msgs);
    }

    #[test]
    fn the_header_is_type_then_big_endian_length() {
        let mut wire = BytesMut::new();
        ClientMessage::SendPacket {
            dst: k(0xaa),
            packet: Bytes::from_static(b"hi"),
        }
        .encode(&mut wire);
        assert_eq!(&wire[..5], &[0x04, 0, 0, 0, 34]);
        assert_eq!(wire.len(), 5 + 34);
        let mut wire = BytesMut::new();
        ServerMessage::ServerKey(k(0x11)).encode(&mut wire);
        assert_eq!(&wire[..5], &[0x01, 0, 0, 0, 40]);
        assert_eq!(&wire[5..13], &MAGIC);
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        let mut d = FrameDecoder::new(MAX_FRAME_LEN);
        let len = (MAX_FRAME_LEN + 1) as u32;
        d.push(&[0x04]);
        d.push(&len.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::Oversized {
                ty: 4,
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        // A packet over 64 KiB inside an allowed frame length is refused too.
        let payload = vec![0u8; KEY_LEN + MAX_PACKET_SIZE + 1];
        let f = RawFrame {
            ty: 0x04,
            payload: Bytes::from(payload),
        };
        assert!(matches!(
            ClientMessage::parse(f),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn truncated_frames_wait_and_short_payloads_are_malformed() {
        let mut d = FrameDecoder::new(MAX_FRAME_LEN);
        d.push(&[0x04, 0, 0, 0, 40, 1, 2, 3]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 8);
        for (ty, len) in [
            (0x04u8, 31usize),
            (0x0a, 63),
            (0x12, 7),
            (0x11, 0),
            (0x02, 60),
        ] {
            let f = RawFrame {
                ty,
                payload: Bytes::from(vec![0; len]),
            };
            assert!(
                matches!(ClientMessage::parse(f), Err(FrameError::Malformed { .. })),
                "type {ty:#x} len {len}"
            );
        }
        let bad_magic = RawFrame {
            ty: 0x01,
            payload: Bytes::from(vec![0; 40]),
        };
        assert_eq!(
            ServerMessage::parse(bad_magic),
            Err(FrameError::BadGreeting("wrong magic"))
        );
    }

    #[test]
    fn unknown_types_are_kept_apart() {
        let f = RawFrame {
            ty: 0x77,
            payload: Bytes::from_static(b"future"),
        };
        assert_eq!(
            ClientMessage::parse(f.clone()),
            Ok(ClientMessage::Unknown(0x77))
        );
        assert_eq!(ServerMessage::parse(f), Ok(ServerMessage::Unknown(0x77)));
    }
}
