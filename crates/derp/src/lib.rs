//! DERP, Tailscale's relay protocol, and STUN: what lets two nodes talk when no direct
//! path exists, and lets them learn their public address.
//!
//! Cores without I/O (bytes and `now` in; frames, events and deadlines out):
//! * [`frame`]: the framing (1-byte type, 4-byte big-endian length) and the messages of
//!   each direction, with size limits checked from the header;
//! * [`info`]: the login's ClientInfo / ServerInfo, sealed with NaCl `crypto_box`;
//! * [`conn::ServerConn`]: one connection as the relay sees it (greeting, login within
//!   a deadline, packets, pings, keep-alives, mesh-only frames);
//! * [`client::ClientConn`]: the same connection from the client's side;
//! * [`registry::Registry`]: connected clients by node key, bounded outboxes, PeerGone;
//! * [`stun`]: Binding Request / Success (RFC 5389) and a per-source rate limit.
//!
//! The shell, [`relay::Relay`], runs them on tokio: an axum router with `/derp`,
//! `/derp/probe` and `/derp/latency-check`, a task per connection, the STUN socket, and
//! mesh links to the other relays of a region (a [`client::ClientConn`] holding the mesh
//! key, watching that relay's clients and carrying ForwardPackets to them).
//! `tsunagu-server` mounts it on its own listener (`serve`) or alone (`relay`).

pub mod client;
pub mod conn;
pub mod frame;
pub mod fuzzing;
pub mod info;
pub mod limit;
pub mod registry;
pub mod relay;
pub mod stun;

pub use client::{ClientConn, ClientError, ClientEvent};
pub use conn::{ClientCheck, ConnConfig, ConnError, ConnEvent, Outgoing, ServerConn};
pub use frame::{ClientMessage, FrameDecoder, FrameError, PeerGoneReason, ServerMessage};
pub use info::{ClientInfo, ServerInfo};
pub use relay::{MetricsSnapshot, Relay, RelayOptions, load_or_create_key};
