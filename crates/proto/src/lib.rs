//! tsunagu's shared vocabulary, free of I/O.
//!
//! * [`key`]: node keys (WireGuard/X25519) and the other keys of Tailscale's control
//!   protocol (machine, disco, challenge), with their text and serde forms.
//! * [`netmap`]: the *network map*, the one value that configures a node's data plane: who
//!   this node is, which peers exist, what each may send, and which peer is the exit node.
//!   Today it is produced from a TOML file by `tsunagud`; later the control client produces
//!   it from the coordination server's map stream. The engine never cares which.
//! * [`tailcfg`]: the control protocol's JSON wire types (Go's `tailcfg`), spoken with the
//!   official Tailscale clients by the coordination server and the control client.

pub mod key;
pub mod netmap;
pub mod tailcfg;

pub use key::{
    ChallengePublic, DiscoPublic, KeyError, MachinePrivate, MachinePublic, NodePrivate, NodePublic,
};
pub use netmap::{NetMap, NetMapError, Peer, SelfNode};
