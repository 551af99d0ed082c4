//! tsunagu's DNS logic, without I/O (sockets, files and HTTP live in `tsunagud`).
//!
//! * [`message`]: what a DNS query must look like to be handled (one question, a plain
//!   query, bounded size) and the answers and errors built for it (hickory-proto parses
//!   and writes the messages).
//! * [`doh`]: an exit node's DNS-over-HTTPS endpoint (`/dns-query`, RFC 8484, POST with
//!   `application/dns-message` or GET `?dns=` base64url): request in, query or the HTTP
//!   status to refuse it with out.
//! * [`magic`]: the client's own answers: MagicDNS names of the tailnet's nodes, the
//!   map's extra records, reverse names of tailnet addresses.
//! * [`plan`]: where every other query goes: the exit node's DoH while an exit node is
//!   in use, the tailnet's resolvers, split DNS routes, the OS's own resolvers, or
//!   nowhere (an exit node chosen but unusable: DNS fails closed).
//! * [`resolvconf`]: reading the OS's `resolv.conf` and writing ours.
//!
//! Every input here comes from the network or the control server and is bounded and
//! checked; nothing panics on it (the DoH request parser is fuzzed).

pub mod doh;
#[doc(hidden)]
pub mod fuzzing;
pub mod magic;
pub mod message;
pub mod plan;
pub mod resolvconf;

pub use hickory_proto;

/// The control protocol's record type, for callers that build zones.
pub mod tailcfg_record {
    pub use tsunagu_proto::tailcfg::DNSRecord;
}

/// Where MagicDNS lives: the address every Tailscale client resolves through.
pub const SERVICE_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(100, 100, 100, 100);
