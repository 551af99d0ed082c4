//! tsunagu's data plane.
//!
//! The engine turns a [`tsunagu_proto::NetMap`] into a working node: a TUN interface,
//! userspace WireGuard (gotatun's `Tunn` per peer), one UDP socket, cryptokey routing by
//! longest prefix, and on Linux the routes, policy rules and NAT that make a node use or
//! serve an exit node.
//!
//! Layers, bottom up:
//! * [`allowed_ips`], [`demux`], [`filter`], [`scope`], [`peers`], [`handover`]: pure
//!   logic, no I/O.
//! * [`tun`], [`udp`]: the two kinds of I/O, each behind a seam.
//! * [`device`]: the packet path (threads moving packets between the two).
//! * [`os`]: Linux routing, policy rules, forwarding and NAT.
//! * [`engine`]: ties a device and the OS state to a network map, with clean shutdown.

pub mod allowed_ips;
pub mod demux;
pub mod device;
pub mod engine;
pub mod filter;
pub mod handover;
pub mod os;
pub mod peers;
pub mod scope;
pub mod tun;
pub mod udp;

pub use device::{CounterSnapshot, Device, PeerStatus};
