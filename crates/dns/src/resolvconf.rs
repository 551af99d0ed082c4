//! `/etc/resolv.conf`: reading the OS's resolvers, writing ours.
//!
//! Ours names only 100.100.100.100 (the client's resolver, which forwards what it does
//! not answer) and the tailnet's search domains, under a header that marks the file as
//! ours, so that a later start knows the file it finds is one it wrote (a crash) and
//! puts the saved original back.

use std::net::IpAddr;

/// The first line of every file we write.
pub const HEADER: &str =
    "# resolv.conf(5) written by tsunagud; the original is restored when it stops.";

/// A `nameserver` line: an address, with the interface of an IPv6 link-local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nameserver {
    pub ip: IpAddr,
    /// `fe80::1%eth0` → `eth0`.
    pub zone: Option<String>,
}

impl Nameserver {
    /// IPv6 link-local (`fe80::/10`): reachable only on its link, never through a tunnel.
    pub fn is_link_local(&self) -> bool {
        match self.ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            IpAddr::V4(v4) => v4.is_link_local(),
        }
    }
}

/// The resolvers and search domains of a `resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<Nameserver>,
    pub search: Vec<String>,
}

/// Parse what matters of a `resolv.conf` (unknown lines are ignored, as libc does).
pub fn parse(text: &str) -> ResolvConf {
    let mut out = ResolvConf::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let Some(w) = words.next() else { continue };
                let (addr, zone) = match w.split_once('%') {
                    Some((a, z)) => (a, Some(z.to_string())),
                    None => (w, None),
                };
                if let Ok(ip) = addr.parse() {
                    out.nameservers.push(Nameserver { ip, zone });
                }
            }
            Some("search") | Some("domain") => {
                out.search = words.map(str::to_string).collect();
            }
            _ => {}
        }
    }
    out
}

/// Whether `text` is a file we wrote.
pub fn is_ours(text: &str) -> bool {
    text.lines().next() == Some(HEADER)
}

/// Our `resolv.conf`: `nameserver`, then the search domains (at most six, as glibc
/// reads them), and `ndots:1` so that bare node names go through the search list.
pub fn render(nameserver: IpAddr, search: &[String]) -> String {
    let mut out = format!("{HEADER}\nnameserver {nameserver}\n");
    let search: Vec<&str> = search.iter().map(String::as_str).take(6).collect();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    out.push_str("options edns0 trust-ad\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_libc_reads() {
        let r = parse(
            "# cafe DHCP\nnameserver 198.18.1.1\nnameserver fe80::1%eth0 # router\n\
             nameserver bogus\nsearch cafe.example lan\noptions ndots:2\n",
        );
        assert_eq!(r.nameservers.len(), 2);
        assert_eq!(r.nameservers[0].ip, "198.18.1.1".parse::<IpAddr>().unwrap());
        assert!(r.nameservers[1].is_link_local());
        assert_eq!(r.nameservers[1].zone.as_deref(), Some("eth0"));
        assert_eq!(r.search, ["cafe.example", "lan"]);
    }

    #[test]
    fn ours_is_recognised() {
        let t = render(
            "100.100.100.100".parse().unwrap(),
            &["tailnet.internal".into()],
        );
        assert!(is_ours(&t));
        assert!(!is_ours("nameserver 198.18.1.1\n"));
        let p = parse(&t);
        assert_eq!(p.nameservers[0].ip.to_string(), "100.100.100.100");
        assert_eq!(p.search, ["tailnet.internal"]);
    }
}
