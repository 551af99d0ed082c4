//! `autogroup:internet` as prefixes: public unicast space, i.e. everything an
//! exit node forwards except private, CGNAT/tailnet, loopback, link-local,
//! multicast and reserved ranges.

use std::sync::OnceLock;

use ipnet::IpNet;

/// IPv4 ranges outside `autogroup:internet` (an exit node's engine closes them too).
pub const V4_EXCLUDED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10", // CGNAT, where tailnet addresses live
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3", // multicast, reserved, broadcast
];

/// IPv6 global unicast; ULA (fc00::/7, incl. the tailnet's fd7a:115c:a1e0::/48),
/// link-local and multicast are all outside it.
pub const V6_INTERNET: &str = "2000::/3";

/// Prefixes of `base` not covered by any of `excluded`, as a minimal list of
/// CIDRs (in address order).
pub(crate) fn subtract(base: IpNet, excluded: &[IpNet]) -> Vec<IpNet> {
    let overlapping: Vec<IpNet> = excluded
        .iter()
        .copied()
        .filter(|e| e.contains(&base) || base.contains(e))
        .collect();
    if overlapping.is_empty() {
        return vec![base];
    }
    if overlapping.iter().any(|e| e.contains(&base)) {
        return Vec::new();
    }
    // Some excluded prefix is strictly inside base, so base is not a host
    // prefix and has two halves.
    let Ok(halves) = base.subnets(base.prefix_len() + 1) else {
        return Vec::new();
    };
    halves.flat_map(|h| subtract(h, &overlapping)).collect()
}

pub(crate) fn internet_v4() -> &'static [IpNet] {
    static V4: OnceLock<Vec<IpNet>> = OnceLock::new();
    V4.get_or_init(|| {
        let excluded: Vec<IpNet> = V4_EXCLUDED.iter().filter_map(|s| s.parse().ok()).collect();
        let all: IpNet = "0.0.0.0/0".parse().unwrap_or_else(|_| unreachable!());
        subtract(all, &excluded)
    })
}

pub(crate) fn internet_v6() -> &'static [IpNet] {
    static V6: OnceLock<Vec<IpNet>> = OnceLock::new();
    V6.get_or_init(|| V6_INTERNET.parse().into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_internet_excludes_private() {
        let v4 = internet_v4();
        let inside = |ip: &str| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            v4.iter().any(|n| n.contains(&ip))
        };
        assert!(inside("203.0.113.10"));
        assert!(inside("198.51.100.2"));
        assert!(inside("223.255.255.255"));
        assert!(inside("100.128.0.1"));
        for private in [
            "10.1.2.3",
            "192.168.1.1",
            "172.20.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(!inside(private), "{private}");
        }
        // Disjoint and sorted.
        for w in v4.windows(2) {
            assert!(w[0] < w[1] && !w[0].contains(&w[1]));
        }
        assert!(v4.len() < 64, "{}", v4.len());
    }
}
