//! Longest-prefix match from an IP address to a value (a peer), WireGuard's "cryptokey
//! routing" table.
//!
//! One hash map per prefix length in use, probed from the longest length down. A tailnet
//! uses few distinct lengths (/32, /128, the odd subnet route, /0 for the exit node), so a
//! lookup is a handful of hash probes whatever the number of peers, and building the table
//! from a network map is linear. Lookups never iterate a hash map, so results are
//! deterministic.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone)]
struct Family<K> {
    /// (prefix length, masked network -> value), longest prefix first.
    by_len: Vec<(u8, HashMap<K, usize>)>,
}

impl<K: std::hash::Hash + Eq + Copy> Family<K> {
    fn new() -> Self {
        Family { by_len: Vec::new() }
    }

    fn insert(&mut self, len: u8, masked: K, value: usize) -> Option<usize> {
        let pos = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(pos) => pos,
            Err(pos) => {
                self.by_len.insert(pos, (len, HashMap::new()));
                pos
            }
        };
        self.by_len[pos].1.insert(masked, value)
    }

    fn lookup(&self, mask: impl Fn(u8) -> K) -> Option<usize> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(*len)).copied())
    }
}

/// Maps prefixes to values (indexes into a peer list).
#[derive(Debug, Clone)]
pub struct AllowedIps {
    v4: Family<u32>,
    v6: Family<u128>,
}

impl Default for AllowedIps {
    fn default() -> Self {
        Self::new()
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

impl AllowedIps {
    pub fn new() -> Self {
        AllowedIps {
            v4: Family::new(),
            v6: Family::new(),
        }
    }

    /// Insert a prefix. Host bits are ignored. Returns the value the prefix had before:
    /// a later insert of the same prefix wins, as in WireGuard.
    pub fn insert(&mut self, net: IpNet, value: usize) -> Option<usize> {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                self.v4.insert(len, mask4(n.addr().to_bits(), len), value)
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                self.v6.insert(len, mask6(n.addr().to_bits(), len), value)
            }
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<usize> {
        match addr {
            IpAddr::V4(a) => {
                let bits = a.to_bits();
                self.v4.lookup(|len| mask4(bits, len))
            }
            IpAddr::V6(a) => {
                let bits = a.to_bits();
                self.v6.lookup(|len| mask6(bits, len))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.0.2/32"), 2);
        t.insert(net("::/0"), 0);
        t.insert(net("fd7a:115c:a1e0::2/128"), 2);
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("100.64.0.3".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("203.0.113.10".parse().unwrap()), Some(0));
        assert_eq!(t.lookup("fd7a:115c:a1e0::2".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("2001:db8:2::10".parse().unwrap()), Some(0));
    }

    #[test]
    fn no_match_without_default() {
        let mut t = AllowedIps::new();
        t.insert(net("100.64.0.2/32"), 7);
        assert_eq!(t.lookup("100.64.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("::1".parse().unwrap()), None);
    }

    #[test]
    fn host_bits_ignored_and_later_insert_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("198.18.2.77/24"), 1);
        assert_eq!(t.insert(net("198.18.2.0/24"), 2), Some(1));
        assert_eq!(t.lookup("198.18.2.200".parse().unwrap()), Some(2));
    }

    /// Compare with a naive scan over many pseudo-random prefixes and addresses.
    #[test]
    fn agrees_with_linear_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut t = AllowedIps::new();
        let mut nets = Vec::new();
        for i in 0..300 {
            // Addresses clustered in 100.64/16 so that prefixes overlap often.
            let addr = 0x6440_0000 | (next() as u32 & 0xffff);
            let len = (next() % 33) as u8;
            let n = IpNet::V4(ipnet::Ipv4Net::new(addr.into(), len).unwrap().trunc());
            t.insert(n, i);
            nets.retain(|(m, _)| *m != n);
            nets.push((n, i));
        }
        for _ in 0..2000 {
            let a: IpAddr = std::net::Ipv4Addr::from(0x6440_0000 | (next() as u32 & 0xffff)).into();
            let expect = nets
                .iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| *v);
            assert_eq!(t.lookup(a), expect, "{a}");
        }
    }
}
