//! The client's own answers (MagicDNS): the tailnet's node names, the map's extra
//! records, and reverse names of tailnet addresses.
//!
//! A name under the MagicDNS domain is ours: known names are answered (A and AAAA from
//! the node's addresses; other types get an empty answer), unknown ones get NXDOMAIN,
//! so they never leave the device. Extra records may be anywhere. Everything else is
//! not ours ([`Zone::answer`] returns `None`) and goes upstream.

use crate::message::{Query, address_answer, nxdomain, ptr_answer};
use hickory_proto::rr::{Name, RecordType};
use std::collections::BTreeMap;
use std::net::IpAddr;
use tsunagu_proto::tailcfg::DNSRecord;

/// The names the client answers itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    /// The MagicDNS domain (with MagicDNS on), fully qualified, lower case.
    domain: Option<Name>,
    hosts: BTreeMap<Name, Vec<IpAddr>>,
    reverse: BTreeMap<IpAddr, Name>,
}

fn fqdn(s: &str) -> Option<Name> {
    let mut n = Name::from_ascii(s.trim()).ok()?.to_lowercase();
    n.set_fqdn(true);
    Some(n)
}

impl Zone {
    /// A zone for `domain` (`None`: MagicDNS off, only the extra records), with the
    /// tailnet's nodes as (FQDN, addresses) and the map's extra records.
    pub fn new<'a>(
        domain: Option<&str>,
        nodes: impl IntoIterator<Item = (&'a str, Vec<IpAddr>)>,
        extra: &[DNSRecord],
    ) -> Zone {
        let mut z = Zone {
            domain: domain.and_then(fqdn),
            ..Zone::default()
        };
        if z.domain.is_some() {
            for (name, addrs) in nodes {
                let Some(n) = fqdn(name) else { continue };
                for a in &addrs {
                    z.reverse.entry(*a).or_insert_with(|| n.clone());
                }
                z.hosts.entry(n).or_default().extend(addrs);
            }
        }
        for r in extra {
            let (Some(n), Ok(ip)) = (fqdn(&r.name), r.value.trim().parse::<IpAddr>()) else {
                continue;
            };
            let fits = match r.record_type.to_ascii_uppercase().as_str() {
                "" => true,
                "A" => ip.is_ipv4(),
                "AAAA" => ip.is_ipv6(),
                _ => false,
            };
            if fits {
                z.hosts.entry(n).or_default().push(ip);
            }
        }
        z
    }

    /// The MagicDNS domain, if MagicDNS is on.
    pub fn domain(&self) -> Option<&Name> {
        self.domain.as_ref()
    }

    /// The addresses of `name` (tests, status).
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        self.hosts.get(&fqdn(name)?).map(Vec::as_slice)
    }

    /// Our answer to `q`, or `None` when the name is not ours.
    pub fn answer(&self, q: &Query) -> Option<Vec<u8>> {
        if let Some(addrs) = self.hosts.get(&q.name) {
            return Some(address_answer(q, addrs));
        }
        if q.qtype == RecordType::PTR
            && let Some(ip) = reverse_ip(&q.name)
            && let Some(target) = self.reverse.get(&ip)
        {
            return Some(ptr_answer(q, target));
        }
        match &self.domain {
            Some(d) if d.zone_of(&q.name) => Some(nxdomain(q)),
            _ => None,
        }
    }
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa.`, nibbles under `ip6.arpa.`)
/// stands for.
pub fn reverse_ip(name: &Name) -> Option<IpAddr> {
    let text = name.to_ascii().to_ascii_lowercase();
    let text = text.trim_end_matches('.');
    if let Some(v4) = text.strip_suffix(".in-addr.arpa") {
        let mut parts: Vec<u8> = v4
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        if parts.len() != 4 {
            return None;
        }
        parts.reverse();
        return Some(IpAddr::from([parts[0], parts[1], parts[2], parts[3]]));
    }
    let v6 = text.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = v6
        .split('.')
        .map(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 1))
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        bytes[i] = (pair[1] << 4) | pair[0];
    }
    Some(IpAddr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{answer_addrs, build_query, parse_query};
    use hickory_proto::op::ResponseCode;

    fn zone() -> Zone {
        Zone::new(
            Some("tailnet.internal"),
            [
                (
                    "dev-m1sk9-s1.tailnet.internal.",
                    vec![
                        "100.64.0.2".parse().unwrap(),
                        "fd7a:115c:a1e0::2".parse().unwrap(),
                    ],
                ),
                (
                    "laptop.tailnet.internal.",
                    vec!["100.64.0.1".parse().unwrap()],
                ),
            ],
            &[DNSRecord {
                name: "grafana.lab.test".into(),
                record_type: String::new(),
                value: "100.64.0.9".into(),
            }],
        )
    }

    fn ask(z: &Zone, name: &str, t: RecordType) -> Option<(ResponseCode, Vec<IpAddr>)> {
        let q = parse_query(&build_query(1, name, t).unwrap()).unwrap();
        z.answer(&q).map(|a| answer_addrs(&a).unwrap())
    }

    #[test]
    fn node_names_extra_records_and_the_rest() {
        let z = zone();
        let (rc, a) = ask(&z, "DEV-M1SK9-S1.tailnet.internal", RecordType::A).unwrap();
        assert_eq!(
            (rc, a),
            (ResponseCode::NoError, vec!["100.64.0.2".parse().unwrap()])
        );
        let (_, a) = ask(&z, "dev-m1sk9-s1.tailnet.internal", RecordType::AAAA).unwrap();
        assert_eq!(a, ["fd7a:115c:a1e0::2".parse::<IpAddr>().unwrap()]);
        let (rc, a) = ask(&z, "laptop.tailnet.internal", RecordType::MX).unwrap();
        assert!(rc == ResponseCode::NoError && a.is_empty(), "NODATA");
        let (rc, _) = ask(&z, "ghost.tailnet.internal", RecordType::A).unwrap();
        assert_eq!(rc, ResponseCode::NXDomain, "never leaves the device");
        let (_, a) = ask(&z, "grafana.lab.test", RecordType::A).unwrap();
        assert_eq!(a, ["100.64.0.9".parse::<IpAddr>().unwrap()]);
        assert!(ask(&z, "web.lab.test", RecordType::A).is_none(), "upstream");
        // Reverse names of tailnet addresses.
        let q = parse_query(&build_query(1, "2.0.64.100.in-addr.arpa", RecordType::PTR).unwrap())
            .unwrap();
        let a = z.answer(&q).unwrap();
        assert!(
            hickory_proto::op::Message::from_vec(&a)
                .unwrap()
                .answers
                .len()
                == 1
        );
        // MagicDNS off: only the extra records.
        let off = Zone::new(None, [("x.tailnet.internal", vec![])], &[]);
        assert!(ask(&off, "x.tailnet.internal", RecordType::A).is_none());
    }

    #[test]
    fn reverse_names() {
        let n = Name::from_ascii("4.3.2.1.in-addr.arpa.").unwrap();
        assert_eq!(reverse_ip(&n), Some("1.2.3.4".parse().unwrap()));
        let v6: IpAddr = "fd7a:115c:a1e0::2".parse().unwrap();
        let IpAddr::V6(a) = v6 else { unreachable!() };
        let nib: Vec<String> = a
            .octets()
            .iter()
            .rev()
            .flat_map(|b| [format!("{:x}", b & 0xf), format!("{:x}", b >> 4)])
            .collect();
        let n = Name::from_ascii(format!("{}.ip6.arpa.", nib.join("."))).unwrap();
        assert_eq!(reverse_ip(&n), Some(v6));
        assert_eq!(
            reverse_ip(&Name::from_ascii("1.2.3.in-addr.arpa.").unwrap()),
            None
        );
    }
}
