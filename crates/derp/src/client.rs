//! The client side of a DERP connection, without I/O: login and the frame codec, for
//! tsunagud's relay paths (next) and for tests against the server.
//!
//! Feed it the bytes after the HTTP upgrade ([`upgrade_request`] /
//! [`parse_upgrade_response`]); it answers the greeting with a sealed ClientInfo and
//! reports [`ClientEvent::Connected`] once the server's ServerInfo opens with the key
//! the server announced.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use tsunagu_proto::{NodePrivate, NodePublic};

use crate::frame::{
    ClientMessage, FrameDecoder, FrameError, MAX_FRAME_LEN, MAX_PACKET_SIZE, PeerGoneReason,
    ServerMessage,
};
use crate::info::{self, BoxError, ClientInfo, ServerInfo};

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    Connected {
        server_key: NodePublic,
        info: ServerInfo,
    },
    Packet {
        src: NodePublic,
        packet: Bytes,
    },
    PeerGone {
        key: NodePublic,
        reason: PeerGoneReason,
    },
    PeerPresent(NodePublic),
    KeepAlive,
    Pong([u8; 8]),
    Health(String),
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the server's first frame is not its key")]
    NoGreeting,
    #[error("ServerInfo: {0}")]
    ServerInfo(BoxError),
    #[error("packet of {0} bytes is larger than 64 KiB")]
    TooBig(usize),
}

#[derive(Debug)]
enum Phase {
    Greeting,
    Login { server: NodePublic },
    Open,
}

/// The client side of one DERP connection.
#[derive(Debug)]
pub struct ClientConn {
    key: NodePrivate,
    info: ClientInfo,
    phase: Phase,
    decoder: FrameDecoder,
    out: BytesMut,
    events: VecDeque<ClientEvent>,
}

impl ClientConn {
    pub fn new(key: NodePrivate, info: ClientInfo) -> Self {
        ClientConn {
            key,
            info,
            phase: Phase::Greeting,
            decoder: FrameDecoder::new(MAX_FRAME_LEN),
            out: BytesMut::new(),
            events: VecDeque::new(),
        }
    }

    pub fn public_key(&self) -> NodePublic {
        self.key.public()
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.decoder.push(data);
        while let Some(frame) = self.decoder.next_frame()? {
            let msg = ServerMessage::parse(frame)?;
            self.handle_message(msg)?;
        }
        Ok(())
    }

    fn handle_message(&mut self, msg: ServerMessage) -> Result<(), ClientError> {
        match (&self.phase, msg) {
            (Phase::Greeting, ServerMessage::ServerKey(server)) => {
                let sealed = info::seal_json(&self.key, &server, &self.info);
                ClientMessage::ClientInfo {
                    key: self.key.public(),
                    sealed: Bytes::from(sealed),
                }
                .encode(&mut self.out);
                self.phase = Phase::Login { server };
            }
            (Phase::Greeting, _) => return Err(ClientError::NoGreeting),
            (Phase::Login { server }, ServerMessage::ServerInfo { sealed }) => {
                let server = *server;
                let info: ServerInfo = info::open_json(&self.key, &server, &sealed)
                    .map_err(ClientError::ServerInfo)?;
                self.phase = Phase::Open;
                self.events.push_back(ClientEvent::Connected {
                    server_key: server,
                    info,
                });
            }
            (_, ServerMessage::RecvPacket { src, packet }) => {
                self.events.push_back(ClientEvent::Packet { src, packet })
            }
            (_, ServerMessage::PeerGone { key, reason }) => {
                self.events.push_back(ClientEvent::PeerGone { key, reason })
            }
            (_, ServerMessage::PeerPresent(k)) => {
                self.events.push_back(ClientEvent::PeerPresent(k))
            }
            (_, ServerMessage::KeepAlive) => self.events.push_back(ClientEvent::KeepAlive),
            (_, ServerMessage::Ping(d)) => ClientMessage::Pong(d).encode(&mut self.out),
            (_, ServerMessage::Pong(d)) => self.events.push_back(ClientEvent::Pong(d)),
            (_, ServerMessage::Health(s)) => self.events.push_back(ClientEvent::Health(s)),
            (
                _,
                ServerMessage::Restarting {
                    reconnect_in_ms,
                    try_for_ms,
                },
            ) => self.events.push_back(ClientEvent::Restarting {
                reconnect_in_ms,
                try_for_ms,
            }),
            // A second greeting or info, or a type we do not know: ignored, as Go does.
            (_, _) => {}
        }
        Ok(())
    }

    pub fn send_packet(&mut self, dst: NodePublic, packet: &[u8]) -> Result<(), ClientError> {
        if packet.len() > MAX_PACKET_SIZE {
            return Err(ClientError::TooBig(packet.len()));
        }
        ClientMessage::SendPacket {
            dst,
            packet: Bytes::copy_from_slice(packet),
        }
        .encode(&mut self.out);
        Ok(())
    }

    /// Mesh peers: hand a packet from `src` to this relay's client `dst`.
    pub fn forward_packet(
        &mut self,
        src: NodePublic,
        dst: NodePublic,
        packet: &[u8],
    ) -> Result<(), ClientError> {
        if packet.len() > MAX_PACKET_SIZE {
            return Err(ClientError::TooBig(packet.len()));
        }
        ClientMessage::ForwardPacket {
            src,
            dst,
            packet: Bytes::copy_from_slice(packet),
        }
        .encode(&mut self.out);
        Ok(())
    }

    pub fn note_preferred(&mut self, preferred: bool) {
        ClientMessage::NotePreferred(preferred).encode(&mut self.out)
    }

    pub fn ping(&mut self, data: [u8; 8]) {
        ClientMessage::Ping(data).encode(&mut self.out)
    }

    /// Mesh peers: subscribe to the relay's connection changes.
    pub fn watch_conns(&mut self) {
        ClientMessage::WatchConns.encode(&mut self.out)
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }
}

/// The HTTP/1.1 request that upgrades a connection to DERP.
pub fn upgrade_request(host: &str) -> String {
    format!(
        "GET /derp HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nUser-Agent: tsunagu\r\n\r\n"
    )
}

/// Looks for the end of the server's answer to [`upgrade_request`] in `buf`: `Ok(None)`
/// while incomplete, `Ok(Some(n))` when the first `n` bytes are a 101 answer (the DERP
/// bytes follow), an error otherwise.
pub fn parse_upgrade_response(buf: &[u8]) -> Result<Option<usize>, String> {
    const MAX_HEAD: usize = 8192;
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err("no end of the HTTP header within 8 KiB".into())
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(format!("upgrade refused: {status}"));
    }
    Ok(Some(end + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_answers_are_found_and_checked() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n\x01\x00";
        assert_eq!(parse_upgrade_response(&ok[..20]), Ok(None));
        assert_eq!(parse_upgrade_response(ok), Ok(Some(ok.len() - 2)));
        assert!(parse_upgrade_response(b"HTTP/1.1 426 Upgrade Required\r\n\r\n").is_err());
        assert!(upgrade_request("relay.example").contains("Upgrade: DERP\r\n"));
    }

    #[test]
    fn a_server_that_does_not_greet_is_refused() {
        let mut c = ClientConn::new(NodePrivate::generate(), ClientInfo::default());
        let mut out = BytesMut::new();
        ServerMessage::KeepAlive.encode(&mut out);
        assert_eq!(c.handle_input(&out), Err(ClientError::NoGreeting));
    }

    #[test]
    fn oversized_sends_are_refused_locally() {
        let mut c = ClientConn::new(NodePrivate::generate(), ClientInfo::default());
        assert_eq!(
            c.send_packet(NodePublic([1; 32]), &vec![0; MAX_PACKET_SIZE + 1]),
            Err(ClientError::TooBig(MAX_PACKET_SIZE + 1))
        );
        assert!(c.poll_transmit().is_none());
    }
}
