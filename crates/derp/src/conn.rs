//! One client connection as the server sees it, without I/O.
//!
//! ```text
//!  server ── ServerKey (magic, DERP public key) ──────────────► client
//!  server ◄─ ClientInfo (node key, box{version, meshKey, …}) ── client   within the login timeout
//!  server ── ServerInfo (box{version}) ───────────────────────► client   → LoggedIn event
//!  steady state:  SendPacket → Send event;  NotePreferred → Preferred;  Ping → Pong;
//!                 KeepAlive from the server every `keep_alive`;  mesh peers also
//!                 WatchConns / ClosePeer / ForwardPacket.
//! ```
//!
//! The shell feeds received bytes to [`ServerConn::handle_input`], writes what
//! [`ServerConn::poll_transmit`] returns, acts on [`ServerConn::poll_event`], wakes at
//! [`ServerConn::poll_timeout`], and hands packets from other clients to
//! [`ServerConn::queue`]. Any error closes this connection only.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tsunagu_proto::{NodePrivate, NodePublic};

use crate::frame::{
    ClientMessage, FrameDecoder, FrameError, FrameType, MAX_FRAME_LEN, PROTOCOL_VERSION,
    PeerGoneReason, ServerMessage,
};
use crate::info::{self, BoxError, ClientInfo, ServerInfo};

/// Go clients drop a connection that brings nothing for 120 s; send well inside that.
pub const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// How long a new connection has to log in.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection of one relay shares.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub key: NodePrivate,
    /// Pre-shared key that makes a client a trusted mesh peer.
    pub mesh_key: Option<String>,
    pub keep_alive: Duration,
    pub login_timeout: Duration,
}

impl ConnConfig {
    pub fn new(key: NodePrivate) -> Self {
        ConnConfig {
            key,
            mesh_key: None,
            keep_alive: KEEP_ALIVE,
            login_timeout: LOGIN_TIMEOUT,
        }
    }
}

/// What the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnEvent {
    /// The client proved its node key; register it under that key.
    LoggedIn {
        key: NodePublic,
        info: ClientInfo,
        mesh: bool,
    },
    Send {
        dst: NodePublic,
        packet: Bytes,
    },
    /// From a mesh peer: deliver to `dst` as if `src` had sent it.
    Forward {
        src: NodePublic,
        dst: NodePublic,
        packet: Bytes,
    },
    Preferred(bool),
    /// From a mesh peer: it wants PeerPresent / PeerGone for every client.
    WatchConns,
    /// From a mesh peer: close `key`'s connection.
    ClosePeer(NodePublic),
}

/// Why a connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("no ClientInfo within {0:?}")]
    LoginTimeout(Duration),
    #[error("frame type {0:#04x} before ClientInfo")]
    NotLoggedIn(u8),
    #[error("ClientInfo: {0}")]
    ClientInfo(BoxError),
    #[error("a second ClientInfo")]
    DoubleLogin,
    #[error("{0:?} needs the mesh key")]
    NotMesh(FrameType),
    #[error("connection closed in the middle of a frame ({0} bytes pending)")]
    Truncated(usize),
}

impl ConnError {
    /// Whether the peer sent something that breaks the protocol (as opposed to timing out).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ConnError::LoginTimeout(_))
    }
}

/// Something other connections want written to this one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outgoing {
    Packet {
        src: NodePublic,
        packet: Bytes,
    },
    PeerGone {
        key: NodePublic,
        reason: PeerGoneReason,
    },
    PeerPresent(NodePublic),
    /// Close this connection (a newer one took its key, or a mesh peer asked).
    Close,
    /// For a mesh link (this relay's client connection to another relay): hand `dst`, a
    /// client of that relay, a packet from `src`. Meaningless to a client connection.
    Forward {
        src: NodePublic,
        dst: NodePublic,
        packet: Bytes,
    },
}

#[derive(Debug)]
enum Phase {
    Login { deadline: Instant },
    Open { key: NodePublic, mesh: bool },
}

/// The server side of one DERP connection.
#[derive(Debug)]
pub struct ServerConn {
    cfg: Arc<ConnConfig>,
    phase: Phase,
    decoder: FrameDecoder,
    out: BytesMut,
    events: VecDeque<ConnEvent>,
    next_keep_alive: Instant,
    /// Frames of types a client does not send, skipped.
    pub ignored_frames: u64,
}

impl ServerConn {
    /// A new connection; the greeting (ServerKey) is ready to transmit.
    pub fn new(cfg: Arc<ConnConfig>, now: Instant) -> Self {
        let mut out = BytesMut::new();
        ServerMessage::ServerKey(cfg.key.public()).encode(&mut out);
        ServerConn {
            phase: Phase::Login {
                deadline: now + cfg.login_timeout,
            },
            next_keep_alive: now + cfg.keep_alive,
            cfg,
            decoder: FrameDecoder::new(MAX_FRAME_LEN),
            out,
            events: VecDeque::new(),
            ignored_frames: 0,
        }
    }

    /// The client's node key once logged in.
    pub fn client_key(&self) -> Option<NodePublic> {
        match self.phase {
            Phase::Open { key, .. } => Some(key),
            Phase::Login { .. } => None,
        }
    }

    pub fn handle_input(&mut self, data: &[u8], _now: Instant) -> Result<(), ConnError> {
        self.decoder.push(data);
        while let Some(frame) = self.decoder.next_frame()? {
            let ty = frame.ty;
            let msg = ClientMessage::parse(frame)?;
            self.handle_message(ty, msg)?;
        }
        Ok(())
    }

    /// The peer closed its side: fine between frames, an error inside one.
    pub fn handle_eof(&mut self) -> Result<(), ConnError> {
        match self.decoder.buffered() {
            0 => Ok(()),
            n => Err(ConnError::Truncated(n)),
        }
    }

    fn handle_message(&mut self, ty: u8, msg: ClientMessage) -> Result<(), ConnError> {
        let mesh = match self.phase {
            Phase::Login { .. } => {
                let ClientMessage::ClientInfo { key, sealed } = msg else {
                    return Err(ConnError::NotLoggedIn(ty));
                };
                return self.login(key, &sealed);
            }
            Phase::Open { mesh, .. } => mesh,
        };
        let mesh_only = |t: FrameType| {
            if mesh {
                Ok(())
            } else {
                Err(ConnError::NotMesh(t))
            }
        };
        match msg {
            ClientMessage::ClientInfo { .. } => return Err(ConnError::DoubleLogin),
            ClientMessage::SendPacket { dst, packet } => {
                self.events.push_back(ConnEvent::Send { dst, packet })
            }
            ClientMessage::ForwardPacket { src, dst, packet } => {
                mesh_only(FrameType::ForwardPacket)?;
                self.events
                    .push_back(ConnEvent::Forward { src, dst, packet })
            }
            ClientMessage::NotePreferred(p) => self.events.push_back(ConnEvent::Preferred(p)),
            ClientMessage::KeepAlive | ClientMessage::Pong(_) => {}
            ClientMessage::Ping(data) => ServerMessage::Pong(data).encode(&mut self.out),
            ClientMessage::WatchConns => {
                mesh_only(FrameType::WatchConns)?;
                self.events.push_back(ConnEvent::WatchConns)
            }
            ClientMessage::ClosePeer(k) => {
                mesh_only(FrameType::ClosePeer)?;
                self.events.push_back(ConnEvent::ClosePeer(k))
            }
            ClientMessage::Unknown(_) => self.ignored_frames += 1,
        }
        Ok(())
    }

    fn login(&mut self, key: NodePublic, sealed: &[u8]) -> Result<(), ConnError> {
        let info: ClientInfo =
            info::open_json(&self.cfg.key, &key, sealed).map_err(ConnError::ClientInfo)?;
        let mesh = match &self.cfg.mesh_key {
            Some(mk) => {
                !info.mesh_key.is_empty()
                    && constant_time_eq(mk.as_bytes(), info.mesh_key.as_bytes())
            }
            None => false,
        };
        let reply = ServerInfo {
            version: PROTOCOL_VERSION,
            ..ServerInfo::default()
        };
        let sealed = info::seal_json(&self.cfg.key, &key, &reply);
        ServerMessage::ServerInfo {
            sealed: Bytes::from(sealed),
        }
        .encode(&mut self.out);
        self.phase = Phase::Open { key, mesh };
        self.events
            .push_back(ConnEvent::LoggedIn { key, info, mesh });
        Ok(())
    }

    /// Writes a message from elsewhere (a relayed packet, a peer notice) to this client.
    /// `Outgoing::Close` is the shell's to act on and writes nothing, as does
    /// `Outgoing::Forward`, which only mesh links carry.
    pub fn queue(&mut self, msg: Outgoing) {
        match msg {
            Outgoing::Packet { src, packet } => {
                ServerMessage::RecvPacket { src, packet }.encode(&mut self.out)
            }
            Outgoing::PeerGone { key, reason } => {
                ServerMessage::PeerGone { key, reason }.encode(&mut self.out)
            }
            Outgoing::PeerPresent(k) => ServerMessage::PeerPresent(k).encode(&mut self.out),
            Outgoing::Close | Outgoing::Forward { .. } => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ConnError> {
        match self.phase {
            Phase::Login { deadline } if now >= deadline => {
                Err(ConnError::LoginTimeout(self.cfg.login_timeout))
            }
            Phase::Open { .. } if now >= self.next_keep_alive => {
                ServerMessage::KeepAlive.encode(&mut self.out);
                while self.next_keep_alive <= now {
                    self.next_keep_alive += self.cfg.keep_alive;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        Some(match self.phase {
            Phase::Login { deadline } => (deadline, "login deadline"),
            Phase::Open { .. } => (self.next_keep_alive, "keep-alive"),
        })
    }

    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        self.events.pop_front()
    }

    /// Everything ready to write, in order.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientConn, ClientEvent};

    fn pair(mesh: Option<&str>, client_mesh: &str) -> (ServerConn, ClientConn, Instant) {
        let now = Instant::now();
        let mut cfg = ConnConfig::new(NodePrivate::generate());
        cfg.mesh_key = mesh.map(str::to_string);
        let server = ServerConn::new(Arc::new(cfg), now);
        let info = ClientInfo {
            version: PROTOCOL_VERSION,
            mesh_key: client_mesh.to_string(),
            can_ack_pings: true,
            is_prober: false,
            host: String::new(),
        };
        let client = ClientConn::new(NodePrivate::generate(), info);
        (server, client, now)
    }

    /// Moves bytes both ways until neither side has anything to send.
    fn pump(s: &mut ServerConn, c: &mut ClientConn, now: Instant) -> Result<(), ConnError> {
        loop {
            let mut moved = false;
            while let Some(b) = s.poll_transmit() {
                c.handle_input(&b).expect("client accepts server bytes");
                moved = true;
            }
            while let Some(b) = c.poll_transmit() {
                s.handle_input(&b, now)?;
                moved = true;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    #[test]
    fn login_proves_the_node_key_and_both_sides_learn_it() {
        let (mut s, mut c, now) = pair(None, "");
        pump(&mut s, &mut c, now).unwrap();
        let ck = c.public_key();
        assert_eq!(
            s.poll_event(),
            Some(ConnEvent::LoggedIn {
                key: ck,
                info: ClientInfo {
                    version: 2,
                    mesh_key: String::new(),
                    can_ack_pings: true,
                    is_prober: false,
                    host: String::new(),
                },
                mesh: false
            })
        );
        assert_eq!(s.client_key(), Some(ck));
        match c.poll_event() {
            Some(ClientEvent::Connected { server_key, info }) => {
                assert_eq!(server_key, s.cfg.key.public());
                assert_eq!(info.version, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_client_info_sealed_with_another_key_is_refused() {
        let (mut s, _, now) = pair(None, "");
        let _greeting = s.poll_transmit();
        let liar = NodePrivate::generate();
        let claimed = NodePrivate::generate().public();
        let sealed = info::seal(&liar, &s.cfg.key.public(), b"{}");
        let mut out = BytesMut::new();
        ClientMessage::ClientInfo {
            key: claimed,
            sealed: Bytes::from(sealed),
        }
        .encode(&mut out);
        assert_eq!(
            s.handle_input(&out, now),
            Err(ConnError::ClientInfo(BoxError::Open))
        );
    }

    #[test]
    fn packets_become_events_and_pings_are_answered() {
        let (mut s, mut c, now) = pair(None, "");
        pump(&mut s, &mut c, now).unwrap();
        s.poll_event();
        c.poll_event();
        let dst = NodePublic([9; 32]);
        c.send_packet(dst, b"wireguard").unwrap();
        c.note_preferred(true);
        c.ping([4; 8]);
        pump(&mut s, &mut c, now).unwrap();
        assert_eq!(
            s.poll_event(),
            Some(ConnEvent::Send {
                dst,
                packet: Bytes::from_static(b"wireguard")
            })
        );
        assert_eq!(s.poll_event(), Some(ConnEvent::Preferred(true)));
        assert_eq!(c.poll_event(), Some(ClientEvent::Pong([4; 8])));
        s.queue(Outgoing::Packet {
            src: NodePublic([1; 32]),
            packet: Bytes::from_static(b"back"),
        });
        s.queue(Outgoing::PeerGone {
            key: dst,
            reason: PeerGoneReason::NotHere,
        });
        pump(&mut s, &mut c, now).unwrap();
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Packet {
                src: NodePublic([1; 32]),
                packet: Bytes::from_static(b"back")
            })
        );
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::PeerGone {
                key: dst,
                reason: PeerGoneReason::NotHere
            })
        );
    }

    #[test]
    fn frames_before_login_close_the_connection() {
        let (mut s, _, now) = pair(None, "");
        let mut out = BytesMut::new();
        ClientMessage::SendPacket {
            dst: NodePublic([1; 32]),
            packet: Bytes::new(),
        }
        .encode(&mut out);
        assert_eq!(s.handle_input(&out, now), Err(ConnError::NotLoggedIn(0x04)));
    }

    #[test]
    fn mesh_frames_need_the_mesh_key() {
        for (server_mesh, client_mesh, allowed) in [
            (None, "", false),
            (Some("secret"), "", false),
            (Some("secret"), "wrong!", false),
            (Some("secret"), "secret", true),
        ] {
            let (mut s, mut c, now) = pair(server_mesh, client_mesh);
            pump(&mut s, &mut c, now).unwrap();
            match s.poll_event() {
                Some(ConnEvent::LoggedIn { mesh, .. }) => assert_eq!(mesh, allowed),
                other => panic!("{other:?}"),
            }
            c.watch_conns();
            let r = pump(&mut s, &mut c, now);
            if allowed {
                r.unwrap();
                assert_eq!(s.poll_event(), Some(ConnEvent::WatchConns));
            } else {
                assert_eq!(r, Err(ConnError::NotMesh(FrameType::WatchConns)));
            }
        }
    }

    #[test]
    fn keep_alives_follow_the_virtual_clock_and_login_times_out() {
        let (mut s, mut c, now) = pair(None, "");
        assert_eq!(
            s.poll_timeout(),
            Some((now + LOGIN_TIMEOUT, "login deadline"))
        );
        // Not logged in at the deadline: closed.
        let (mut idle, _, t0) = pair(None, "");
        assert_eq!(
            idle.handle_timeout(t0 + LOGIN_TIMEOUT),
            Err(ConnError::LoginTimeout(LOGIN_TIMEOUT))
        );
        pump(&mut s, &mut c, now).unwrap();
        let (due, why) = s.poll_timeout().unwrap();
        assert_eq!((due, why), (now + KEEP_ALIVE, "keep-alive"));
        s.handle_timeout(due - Duration::from_millis(1)).unwrap();
        assert!(s.poll_transmit().is_none());
        s.handle_timeout(due).unwrap();
        pump(&mut s, &mut c, due).unwrap();
        assert!(std::iter::from_fn(|| c.poll_event()).any(|e| e == ClientEvent::KeepAlive));
        assert_eq!(s.poll_timeout().unwrap().0, now + 2 * KEEP_ALIVE);
    }

    #[test]
    fn a_frame_cut_by_eof_is_truncated() {
        let (mut s, _, now) = pair(None, "");
        s.handle_input(&[0x02, 0, 0, 0, 100, 1, 2], now).unwrap();
        assert_eq!(s.handle_eof(), Err(ConnError::Truncated(7)));
    }
}
