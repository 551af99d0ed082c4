//! Tailscale's control-protocol transport ("ts2021"), for the coordination
//! server and our own control client.
//!
//! Layers, bottom up:
//! - [`frame`]: the controlbase wire format (pure parsing, never panics);
//! - [`handshake`]: Noise IK `Noise_IK_25519_ChaChaPoly_BLAKE2s` with the
//!   `"Tailscale Control Protocol v<capver>"` prologue, both roles, sans I/O;
//! - [`conn`]: the transport records (big-endian nonces, 4096-byte frames),
//!   sans I/O;
//! - [`stream`]: [`NoiseStream`], tokio `AsyncRead + AsyncWrite` over a
//!   [`Conn`], for HTTP/2 inside the channel;
//! - [`upgrade`]: the `POST /ts2021` HTTP upgrade, server ([`accept_upgrade`])
//!   and client ([`dial`]).
//!
//! Each module says which Go source (tailscale/tailscale) it was checked
//! against. The WebSocket variant of the upgrade (used by the browser
//! client) is not implemented.

pub mod conn;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod stream;
pub mod upgrade;

pub use conn::{Conn, ConnError};
pub use frame::{Frame, FrameError, parse_frame};
pub use handshake::{
    ClientHandshake, HandshakeError, ServerHandshake, client_initiate, public_key, server_accept,
};
pub use stream::{EARLY_PAYLOAD_MAGIC, NoiseStream, encode_early_payload};
pub use upgrade::{
    Accepted, DialError, PendingUpgrade, UpgradeBody, UpgradeError, accept_upgrade, dial, dial_tcp,
    finish_server, upgrade_client, validate_upgrade_request,
};
