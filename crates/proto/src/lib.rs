//! tsunagu's shared vocabulary, free of I/O.
//!
//! * [`key`]: node keys (WireGuard/X25519) and their text forms.
//! * [`netmap`]: the *network map*, the one value that configures a node's data plane: who
//!   this node is, which peers exist, what each may send, and which peer is the exit node.
//!   Today it is produced from a TOML file by `tsunagud`; later the control client produces
//!   it from the coordination server's map stream. The engine never cares which.

pub mod key;
pub mod netmap;

pub use key::{KeyError, NodePrivate, NodePublic};
pub use netmap::{NetMap, NetMapError, Peer, SelfNode};
