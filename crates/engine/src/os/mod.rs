//! The Linux OS layer of the node engine: what the daemon changes in the kernel.
//!
//! - [`sysctl`]: IPv4/IPv6 forwarding on, remembering the previous values.
//! - [`host`]: the host's own addresses and subnets, closed to what an exit node
//!   forwards.
//! - [`nat`]: serving as an exit node, one nftables table `inet tsunagu` that forwards
//!   and masquerades traffic of the peers allowed to use us.
//! - [`route`]: using an exit node (or just the tailnet), policy routing the way
//!   Tailscale does it on Linux: routing table 52 and `ip rule`s at 5210+, failing
//!   closed when the tunnel disappears.
//!
//! Each part sits behind a small seam (a backend trait) so that the kernel mechanism
//! can be swapped or faked, returns typed errors that name the operation and the
//! kernel's (or nft's) reason, and acts on the network namespace of the calling thread
//! (which is what the lab tests rely on). Nothing here is undone on `Drop`: a daemon
//! that dies keeps the tunnel routing and NAT in place (fail closed), and the start-up
//! path removes leftovers with [`route::cleanup_stale`] and [`nat::ExitNat::remove_stale`].

pub mod host;
pub mod nat;
pub mod route;
pub mod sysctl;
