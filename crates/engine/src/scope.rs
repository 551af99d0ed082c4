//! Where an exit node forwards to: the internet, not its own host.
//!
//! A node serving as exit node forwards its users' packets out of the host's uplink. An
//! "internet" grant (`autogroup:internet`, `*`, a `/0`) must not turn it into a door to
//! the host itself or to the networks it sits on, so destinations fall in two kinds:
//!
//! * **closed**: the host's own non-tailnet addresses (its public and LAN addresses),
//!   the subnets of its interfaces (the LAN, the VPC, a docker bridge), and every range
//!   that is not public unicast: private (RFC 1918), CGNAT and the tailnet, loopback,
//!   link-local (169.254.0.0/16, where clouds serve their metadata at 169.254.169.254),
//!   multicast and reserved, and for IPv6 everything outside 2000::/3 (ULA, link-local,
//!   multicast, loopback, v4-mapped). The IPv4 list is the policy's, whose complement
//!   `autogroup:internet` compiles to (`crates/policy/src/internet.rs`); the engine's
//!   tests check the two agree;
//! * **open**: the rest, the internet.
//!
//! An open destination is forwarded when a rule of the packet filter matches it (source,
//! destination, protocol, port), with the stateful exceptions of the filter (answers).
//! A closed destination only when a rule grants it **explicitly**: a destination entry
//! that lies wholly inside the closed space (`198.51.100.2/32`, the LAN's `/24`,
//! `169.254.169.254`), never `*` or a wide range that merely contains it; and then every
//! packet must match that rule, answers included. Tailnet addresses of other nodes are
//! never forwarded. This is Tailscale's "exit node as guest Wi-Fi" (a LAN is reached
//! only when offered explicitly), made stricter for the host's own addresses.
//!
//! Pure: the host's addresses come in as [`HostNets`] (see [`crate::os::host`]).

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::IpAddr;

/// IPv4 ranges that are not "the internet": the policy's own list, whose complement
/// `autogroup:internet` compiles to (one list for both).
pub use tsunagu_policy::V4_NOT_INTERNET as V4_CLOSED;

/// IPv6 public unicast; everything else (ULA with the tailnet's fd7a:115c:a1e0::/48,
/// link-local, multicast, loopback, v4-mapped) is closed.
pub use tsunagu_policy::V6_INTERNET;

/// The tailnet's ranges: never forwarded by an exit node, whatever a rule says.
pub const TAILNET_V4: &str = "100.64.0.0/10";
pub const TAILNET_V6: &str = "fd7a:115c:a1e0::/48";

/// The exit host's own networks, as its interfaces show them (the tun excluded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNets {
    /// The host's own addresses (public, LAN, loopback).
    pub addrs: Vec<IpAddr>,
    /// The subnets of its interfaces (address and netmask, truncated).
    pub subnets: Vec<IpNet>,
}

impl HostNets {
    /// From interface addresses with their prefix length (`198.51.100.2/24`): the
    /// addresses and their truncated subnets. Tailnet addresses are left out (they are
    /// ours on the tun, judged as the node's own).
    pub fn from_interface_addrs(addrs: impl IntoIterator<Item = IpNet>) -> HostNets {
        let mut h = HostNets::default();
        for a in addrs {
            if is_tailnet(a.addr()) {
                continue;
            }
            if !h.addrs.contains(&a.addr()) {
                h.addrs.push(a.addr());
            }
            let net = a.trunc();
            if !h.subnets.contains(&net) {
                h.subnets.push(net);
            }
        }
        h.addrs.sort();
        h.subnets.sort();
        h
    }
}

/// Whether `ip` is a tailnet address (ours or another node's).
pub fn is_tailnet(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [a, b, ..] = a.octets();
            a == 100 && (b & 0xc0) == 64
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
        }
    }
}

/// The closed space of an exit host with `host`'s networks, as the fewest prefixes (what
/// nftables is given).
pub fn closed_nets(host: &HostNets) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = V4_CLOSED.iter().filter_map(|s| s.parse().ok()).collect();
    let internet6: Ipv6Net = V6_INTERNET.parse().unwrap_or_default();
    all.extend(
        Ipv6Net::default()
            .subnets(3)
            .into_iter()
            .flatten()
            .filter(|n| *n != internet6)
            .map(IpNet::V6),
    );
    all.extend(host.subnets.iter().copied());
    all.extend(host.addrs.iter().map(|a| IpNet::from(*a)));
    IpNet::aggregate(&all)
}

/// A set of addresses as sorted, disjoint, merged ranges per family: membership and
/// "is this range wholly inside" in O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

fn merge<T: Ord + Copy>(mut r: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Vec<(T, T)> {
    r.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(r.len());
    for (lo, hi) in r {
        match out.last_mut() {
            Some(last) if next(last.1).is_none_or(|n| lo <= n) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn within<T: Ord + Copy>(set: &[(T, T)], lo: T, hi: T) -> bool {
    // The last range starting at or before `lo` must reach `hi` (ranges are disjoint and
    // merged, so no other range can cover the rest).
    let i = set.partition_point(|r| r.0 <= lo);
    i > 0 && set[i - 1].1 >= hi
}

fn v4_range(n: &Ipv4Net) -> (u32, u32) {
    (u32::from(n.network()), u32::from(n.broadcast()))
}

fn v6_range(n: &Ipv6Net) -> (u128, u128) {
    (u128::from(n.network()), u128::from(n.broadcast()))
}

impl AddrSet {
    pub fn from_nets(nets: &[IpNet]) -> AddrSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for n in nets {
            match n {
                IpNet::V4(n) => v4.push(v4_range(n)),
                IpNet::V6(n) => v6.push(v6_range(n)),
            }
        }
        AddrSet {
            v4: merge(v4, |x: u32| x.checked_add(1)),
            v6: merge(v6, |x: u128| x.checked_add(1)),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.contains_range(ip, ip)
    }

    /// Whether every address from `lo` to `hi` (same family, `lo <= hi`) is in the set.
    pub fn contains_range(&self, lo: IpAddr, hi: IpAddr) -> bool {
        match (lo, hi) {
            (IpAddr::V4(lo), IpAddr::V4(hi)) => within(&self.v4, u32::from(lo), u32::from(hi)),
            (IpAddr::V6(lo), IpAddr::V6(hi)) => within(&self.v6, u128::from(lo), u128::from(hi)),
            _ => false,
        }
    }

    pub fn contains_net(&self, n: &IpNet) -> bool {
        self.contains_range(n.network(), n.broadcast())
    }
}

/// The prefixes covering `lo..=hi` exactly (same family; empty otherwise).
pub fn range_to_nets(lo: IpAddr, hi: IpAddr) -> Vec<IpNet> {
    match (lo, hi) {
        (IpAddr::V4(lo), IpAddr::V4(hi)) => {
            ipnet::Ipv4Subnets::new(lo, hi, 0).map(IpNet::V4).collect()
        }
        (IpAddr::V6(lo), IpAddr::V6(hi)) => {
            ipnet::Ipv6Subnets::new(lo, hi, 0).map(IpNet::V6).collect()
        }
        _ => Vec::new(),
    }
}

/// The closed space as an [`AddrSet`].
pub fn closed_set(host: &HostNets) -> AddrSet {
    AddrSet::from_nets(&closed_nets(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostNets {
        HostNets::from_interface_addrs(
            [
                "198.51.100.2/24",
                "198.18.3.1/24",
                "2001:db8:1::2/64",
                "127.0.0.1/8",
                "100.64.0.1/32",
            ]
            .iter()
            .map(|s| s.parse().unwrap()),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn closed_space_is_the_host_its_lans_and_what_is_not_internet() {
        let h = host();
        assert!(!h.addrs.contains(&ip("100.64.0.1")), "tailnet left out");
        let c = closed_set(&h);
        for closed in [
            "198.51.100.2",
            "198.51.100.4",
            "198.18.3.1",
            "198.18.3.10",
            "169.254.169.254",
            "100.64.0.7",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "2001:db8:1::99",
            "fd7a:115c:a1e0::5",
            "fe80::1",
            "ff02::1",
            "::1",
            "::ffff:203.0.113.10",
        ] {
            assert!(c.contains(ip(closed)), "{closed} must be closed");
        }
        for open in [
            "203.0.113.10",
            "198.18.4.1",
            "2001:db8:2::10",
            "100.128.0.1",
        ] {
            assert!(!c.contains(ip(open)), "{open} is the internet");
        }
        // Ranges: wholly inside, or not.
        for inside in [
            "198.51.100.2/32",
            "198.18.3.0/24",
            "169.254.0.0/16",
            "127.0.0.0/8",
        ] {
            assert!(c.contains_net(&inside.parse().unwrap()), "{inside}");
        }
        for outside in [
            "198.0.0.0/7",
            "0.0.0.0/0",
            "198.18.0.0/15",
            "::/0",
            "2000::/3",
        ] {
            assert!(!c.contains_net(&outside.parse().unwrap()), "{outside}");
        }
        // The nft form is aggregated: no prefix contains another.
        let nets = closed_nets(&h);
        for (i, a) in nets.iter().enumerate() {
            for b in &nets[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} {b}");
            }
        }
    }

    #[test]
    fn ranges_and_tailnet_addresses() {
        assert!(is_tailnet(ip("100.64.0.1")) && is_tailnet(ip("100.127.255.255")));
        assert!(!is_tailnet(ip("100.128.0.1")) && !is_tailnet(ip("100.63.255.255")));
        assert!(is_tailnet(ip("fd7a:115c:a1e0::1")) && !is_tailnet(ip("fd7a:115c:a1e1::1")));
        assert_eq!(
            range_to_nets(ip("198.18.3.0"), ip("198.18.3.255")),
            vec!["198.18.3.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            range_to_nets(ip("198.18.3.0"), ip("::1")),
            Vec::<IpNet>::new()
        );
        let s = AddrSet::from_nets(&[
            "198.51.100.0/25".parse().unwrap(),
            "198.51.100.128/25".parse().unwrap(),
        ]);
        // Adjacent halves merge: the whole /24 is inside.
        assert!(s.contains_net(&"198.51.100.0/24".parse().unwrap()));
        assert!(!s.contains(ip("198.51.101.0")));
    }

    #[test]
    fn closed_space_is_the_complement_of_what_the_policy_calls_the_internet() {
        use tsunagu_policy::{Policy, PolicyNode};
        let exit = PolicyNode {
            id: 1,
            user: None,
            tags: vec!["tag:exit".into()],
            ips: vec![ip("100.64.0.1")],
            approved_routes: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        };
        let policy = r#"{ "tagOwners": { "tag:exit": ["a"] },
            "acls": [ { "action": "accept", "src": ["*"], "dst": ["autogroup:internet:*"] } ] }"#;
        let internet: Vec<IpNet> = Policy::parse(policy)
            .unwrap()
            .compile(&[exit])
            .filter(1)
            .iter()
            .flat_map(|r| r.dst_ports.iter().map(|d| d.ip.parse().unwrap()))
            .collect();
        let internet = AddrSet::from_nets(&internet);
        let closed = closed_set(&HostNets::default());
        let mut samples: Vec<IpAddr> = Vec::new();
        for n in V4_CLOSED.iter().map(|s| s.parse::<Ipv4Net>().unwrap()) {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            for a in [lo.checked_sub(1), Some(lo), Some(hi), hi.checked_add(1)] {
                samples.extend(a.map(|a| IpAddr::from(std::net::Ipv4Addr::from(a))));
            }
        }
        for a in [
            "::",
            "::1",
            "1fff:ffff::1",
            "2000::",
            "2001:db8::1",
            "3fff:ffff::1",
            "4000::",
        ] {
            samples.push(ip(a));
        }
        samples.extend(["fc00::1", "fd7a:115c:a1e0::1", "fe80::1", "ff02::1"].map(ip));
        for a in samples {
            assert_ne!(internet.contains(a), closed.contains(a), "{a}");
        }
    }
}
