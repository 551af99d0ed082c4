//! The node's inbound packet filter: what the tailnet policy lets peers open to us.
//!
//! The server compiles the policy into the map's packet filter (Tailscale's
//! `FilterRule`s: sources, destinations with port ranges, protocols). The engine applies
//! it to every decrypted packet addressed to one of this node's own addresses, with the
//! same semantics as Tailscale clients, so that official clients and tsunagud nodes
//! protect themselves alike:
//!
//! * rules are checked only for what *opens* something: a TCP SYN (without ACK), a UDP
//!   datagram that does not answer a flow we started, an ICMP echo request, any packet of
//!   another protocol. TCP segments of an established connection, ICMP replies and errors
//!   and later IPv4 fragments pass (none can be sent without the opening packet having
//!   passed first, or they answer something we sent);
//! * a rule without protocols means TCP, UDP, ICMP and ICMPv6; ports count for TCP, UDP
//!   (and SCTP), not for ICMP;
//! * no filter in the map (a map loaded from a file) filters nothing; an empty filter
//!   lets nothing in.
//!
//! A packet not addressed to this node is dropped unless the node serves as an exit node
//! (never one by accident, whatever the host's forwarding settings); an exit node's
//! forwarded traffic is not judged here, its nftables table admits only the peers allowed
//! to use it. Pure: bytes in, a verdict out; the UDP flow table is the only state.

use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tsunagu_proto::tailcfg::FilterRule;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const SCTP: u8 = 132;
const DEFAULT_PROTOS: [u8; 4] = [TCP, UDP, ICMP, ICMPV6];

/// Outgoing UDP flows remembered, so that their answers get in; and for how long.
const FLOWS: usize = 4096;
const FLOW_IDLE: Duration = Duration::from_secs(120);

/// An address set as the filter writes them: `*`, an address, a prefix, or a range.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Addrs {
    Any,
    Net(IpNet),
    Range(IpAddr, IpAddr),
}

impl Addrs {
    fn parse(s: &str) -> Option<Addrs> {
        let s = s.trim();
        if s == "*" {
            return Some(Addrs::Any);
        }
        if let Ok(n) = s.parse::<IpNet>() {
            return Some(Addrs::Net(n));
        }
        if let Ok(a) = s.parse::<IpAddr>() {
            return Some(Addrs::Net(IpNet::from(a)));
        }
        let (a, b) = s.split_once('-')?;
        let (a, b) = (
            a.trim().parse::<IpAddr>().ok()?,
            b.trim().parse::<IpAddr>().ok()?,
        );
        (a.is_ipv4() == b.is_ipv4() && a <= b).then_some(Addrs::Range(a, b))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match self {
            Addrs::Any => true,
            Addrs::Net(n) => n.contains(&ip),
            Addrs::Range(a, b) => ip.is_ipv4() == a.is_ipv4() && *a <= ip && ip <= *b,
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    srcs: Vec<Addrs>,
    dsts: Vec<(Addrs, u16, u16)>,
    protos: Vec<u8>,
}

/// What the filter decided, and why (for counters and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept(&'static str),
    Drop(&'static str),
}

/// A compiled packet filter (immutable; rebuilt with the peer table).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None`: no policy (a map from a file), nothing is judged by rules.
    rules: Option<Vec<Rule>>,
    /// This node's own addresses: only packets to these are judged by the rules.
    local: Vec<IpAddr>,
    /// Packets to other addresses are forwarded (we serve as exit node), not dropped.
    forwards: bool,
    /// Our PeerAPI's TCP port: connections to it pass whatever the rules say (the
    /// PeerAPI checks who may use it, per request).
    peerapi_port: Option<u16>,
}

/// The parts of an IP packet the filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Headers {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Source and destination ports (TCP, UDP, SCTP), when present.
    ports: Option<(u16, u16)>,
    /// A later fragment (no transport header).
    fragment: bool,
    /// TCP flags, ICMP type.
    tcp_flags: u8,
    icmp_type: u8,
    /// The transport header is cut short (no ports, no TCP flags, no ICMP type).
    truncated: bool,
}

fn parse(p: &[u8]) -> Option<Headers> {
    let (src, dst, proto, l4, fragment) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let frag_off = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let src: [u8; 4] = p[12..16].try_into().ok()?;
            let dst: [u8; 4] = p[16..20].try_into().ok()?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                p[9],
                &p[ihl..],
                frag_off != 0,
            )
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let src: [u8; 16] = p[8..24].try_into().ok()?;
            let dst: [u8; 16] = p[24..40].try_into().ok()?;
            // Extension headers are not walked: their packets are judged as protocol
            // "next header" without ports, which no port rule matches.
            (IpAddr::from(src), IpAddr::from(dst), p[6], &p[40..], false)
        }
        _ => return None,
    };
    let mut h = Headers {
        src,
        dst,
        proto,
        ports: None,
        fragment,
        tcp_flags: 0,
        icmp_type: 0,
        truncated: false,
    };
    if fragment {
        return Some(h);
    }
    match proto {
        TCP if l4.len() >= 14 => {
            h.ports = Some((
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            ));
            h.tcp_flags = l4[13];
        }
        UDP | SCTP if l4.len() >= 4 => {
            h.ports = Some((
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            ));
        }
        ICMP | ICMPV6 if !l4.is_empty() => h.icmp_type = l4[0],
        TCP | UDP | SCTP | ICMP | ICMPV6 => h.truncated = true,
        _ => {}
    }
    Some(h)
}

/// A UDP flow as seen from our side: (our address, our port, their address, their port).
type FlowKey = (IpAddr, u16, IpAddr, u16);

/// Outgoing UDP flows, so that answers get in without a rule (bounded; idle flows age
/// out).
#[derive(Debug, Default)]
pub struct Flows {
    map: Mutex<HashMap<FlowKey, Instant>>,
}

impl Flows {
    /// Note an outgoing packet (only UDP is tracked).
    pub fn note_out(&self, packet: &[u8], now: Instant) {
        let Some(h) = parse(packet) else { return };
        let (UDP, Some((sport, dport))) = (h.proto, h.ports) else {
            return;
        };
        let mut map = self.map.lock();
        if map.len() >= FLOWS && !map.contains_key(&(h.src, sport, h.dst, dport)) {
            map.retain(|_, t| now.duration_since(*t) < FLOW_IDLE);
            if map.len() >= FLOWS {
                // All fresh: forget the oldest half rather than grow.
                let mut times: Vec<Instant> = map.values().copied().collect();
                times.sort_unstable();
                let cut = times[times.len() / 2];
                map.retain(|_, t| *t > cut);
            }
        }
        map.insert((h.src, sport, h.dst, dport), now);
    }

    fn answers(&self, h: &Headers, now: Instant) -> bool {
        let Some((sport, dport)) = h.ports else {
            return false;
        };
        self.map
            .lock()
            .get(&(h.dst, dport, h.src, sport))
            .is_some_and(|t| now.duration_since(*t) < FLOW_IDLE)
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compile Tailscale's rules.
fn compile(rules: &[FilterRule]) -> Vec<Rule> {
    rules
        .iter()
        .map(|r| Rule {
            srcs: r.src_ips.iter().filter_map(|s| Addrs::parse(s)).collect(),
            dsts: r
                .dst_ports
                .iter()
                .filter_map(|d| {
                    let a = Addrs::parse(&d.ip)?;
                    Some((a, d.ports.first, d.ports.last))
                })
                .collect(),
            protos: if r.ip_proto.is_empty() {
                DEFAULT_PROTOS.to_vec()
            } else {
                r.ip_proto
                    .iter()
                    .filter_map(|p| u8::try_from(*p).ok())
                    .collect()
            },
        })
        .filter(|r| !r.srcs.is_empty() && !r.dsts.is_empty())
        .collect()
}

impl Filter {
    /// The filter of a map: its rules (if any) for a node with addresses `local`,
    /// forwarding when `forwards` (an exit node). Rule entries that do not parse
    /// (capability sources, names) match nothing, as in Tailscale.
    pub fn new(rules: Option<&[FilterRule]>, local: &[IpNet], forwards: bool) -> Filter {
        Filter {
            rules: rules.map(compile),
            local: local.iter().map(IpNet::addr).collect(),
            forwards,
            peerapi_port: None,
        }
    }

    /// Let TCP connections to `port` on our addresses in whatever the rules say (the
    /// PeerAPI, as Tailscale's clients do).
    pub fn with_peerapi_port(mut self, port: Option<u16>) -> Filter {
        self.peerapi_port = port;
        self
    }

    /// Whether outgoing packets must be noted (for UDP answers): only with rules.
    pub fn tracks_flows(&self) -> bool {
        self.rules.is_some()
    }

    /// Judge a decrypted packet from a peer (its source already checked against the
    /// peer's allowed IPs).
    pub fn check_in(&self, packet: &[u8], flows: &Flows, now: Instant) -> Verdict {
        let Some(h) = parse(packet) else {
            return Verdict::Drop("unparsable");
        };
        if !self.local.contains(&h.dst) {
            return if self.forwards {
                Verdict::Accept("forwarded")
            } else {
                Verdict::Drop("not for this node, which is no exit node")
            };
        }
        let Some(rules) = &self.rules else {
            return Verdict::Accept("no filter");
        };
        if h.truncated {
            return Verdict::Drop("unparsable");
        }
        if h.fragment {
            return Verdict::Accept("later fragment");
        }
        let with_ports = match h.proto {
            TCP => {
                let syn_only = h.tcp_flags & 0x02 != 0 && h.tcp_flags & 0x10 == 0;
                if !syn_only {
                    return Verdict::Accept("tcp non-syn");
                }
                if self.peerapi_port.is_some() && h.ports.map(|(_, d)| d) == self.peerapi_port {
                    return Verdict::Accept("peerapi");
                }
                true
            }
            UDP => {
                if flows.answers(&h, now) {
                    return Verdict::Accept("udp answer");
                }
                true
            }
            SCTP => true,
            ICMP => {
                // Echo reply, unreachable, source quench, redirect, time exceeded,
                // parameter problem.
                if matches!(h.icmp_type, 0 | 3 | 4 | 5 | 11 | 12) {
                    return Verdict::Accept("icmp answer");
                }
                false
            }
            ICMPV6 => {
                // Errors (1-4) and echo reply (129).
                if matches!(h.icmp_type, 1..=4 | 129) {
                    return Verdict::Accept("icmp answer");
                }
                false
            }
            _ => false,
        };
        let port = h.ports.map(|(_, d)| d);
        let hit = rules.iter().any(|r| {
            r.protos.contains(&h.proto)
                && r.srcs.iter().any(|s| s.contains(h.src))
                && r.dsts.iter().any(|(d, first, last)| {
                    d.contains(h.dst)
                        && (!with_ports || port.is_some_and(|p| (*first..=*last).contains(&p)))
                })
        });
        if hit {
            Verdict::Accept("rule")
        } else {
            Verdict::Drop("no rule")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagu_proto::tailcfg::{NetPortRange, PortRange};

    const ME: &str = "100.64.0.1";
    const ME6: &str = "fd7a:115c:a1e0::1";
    const PEER: &str = "100.64.0.2";
    const OTHER: &str = "100.64.0.3";

    fn v4(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.parse::<std::net::Ipv4Addr>().unwrap().octets());
        p[16..20].copy_from_slice(&dst.parse::<std::net::Ipv4Addr>().unwrap().octets());
        p.extend_from_slice(l4);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p
    }

    fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[12] = 0x50;
        l4[13] = flags;
        v4(src, dst, TCP, &l4)
    }

    fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        v4(src, dst, UDP, &l4)
    }

    fn icmp(src: &str, dst: &str, kind: u8) -> Vec<u8> {
        v4(src, dst, ICMP, &[kind, 0, 0, 0, 0, 0, 0, 0])
    }

    fn local() -> [IpNet; 2] {
        [
            format!("{ME}/32").parse().unwrap(),
            format!("{ME6}/128").parse().unwrap(),
        ]
    }

    /// An exit node's filter (it forwards what is not for it).
    fn filter(rules: Vec<FilterRule>) -> Filter {
        Filter::new(Some(&rules), &local(), true)
    }

    /// PEER may reach our port 22 (TCP/UDP/ICMP); nobody else anything.
    fn ssh_only() -> Filter {
        filter(vec![FilterRule::allow(
            [PEER],
            [NetPortRange {
                ip: format!("{ME}/32"),
                bits: None,
                ports: PortRange::single(22),
            }],
        )])
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    #[test]
    fn tcp_opens_only_where_a_rule_allows_and_established_segments_pass() {
        let f = ssh_only();
        let fl = Flows::default();
        let now = Instant::now();
        assert_eq!(
            f.check_in(&tcp(PEER, ME, 40000, 22, SYN), &fl, now),
            Verdict::Accept("rule")
        );
        assert_eq!(
            f.check_in(&tcp(PEER, ME, 40000, 80, SYN), &fl, now),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f.check_in(&tcp(OTHER, ME, 40000, 22, SYN), &fl, now),
            Verdict::Drop("no rule")
        );
        // A SYN-ACK (answer to our connect) and data segments are not openings.
        assert_eq!(
            f.check_in(&tcp(OTHER, ME, 80, 40000, SYN | ACK), &fl, now),
            Verdict::Accept("tcp non-syn")
        );
        assert_eq!(
            f.check_in(&tcp(OTHER, ME, 80, 40000, ACK), &fl, now),
            Verdict::Accept("tcp non-syn")
        );
        // Not for us: the exit node's nftables judge forwarded traffic; a node that is
        // no exit node drops it, with or without rules.
        let web = tcp(PEER, "203.0.113.10", 40000, 80, SYN);
        assert_eq!(f.check_in(&web, &fl, now), Verdict::Accept("forwarded"));
        for rules in [None, Some(&[FilterRule::allow_all()][..])] {
            let g = Filter::new(rules, &local(), false);
            assert_eq!(
                g.check_in(&web, &fl, now),
                Verdict::Drop("not for this node, which is no exit node")
            );
        }
        // No rules (a map from a file): whatever is for us.
        let open = Filter::new(None, &local(), false);
        assert_eq!(
            open.check_in(&tcp(OTHER, ME, 1, 9, SYN), &fl, now),
            Verdict::Accept("no filter")
        );
        assert!(!open.tracks_flows() && f.tracks_flows());
        // Truncated TCP: dropped.
        let mut short = tcp(PEER, ME, 40000, 22, SYN);
        short.truncate(22);
        assert_eq!(f.check_in(&short, &fl, now), Verdict::Drop("unparsable"));
        assert_eq!(
            f.check_in(&[0x45, 0, 0], &fl, now),
            Verdict::Drop("unparsable")
        );
    }

    #[test]
    fn udp_answers_to_our_flows_get_in_and_others_need_a_rule() {
        let f = ssh_only();
        let fl = Flows::default();
        let now = Instant::now();
        let dns = udp(OTHER, ME, 53, 5353);
        assert_eq!(f.check_in(&dns, &fl, now), Verdict::Drop("no rule"));
        fl.note_out(&udp(ME, OTHER, 5353, 53), now);
        assert_eq!(f.check_in(&dns, &fl, now), Verdict::Accept("udp answer"));
        // Another port of the same peer is not an answer; and the flow ages out.
        assert_eq!(
            f.check_in(&udp(OTHER, ME, 54, 5353), &fl, now),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f.check_in(&dns, &fl, now + FLOW_IDLE),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f.check_in(&udp(PEER, ME, 999, 22), &fl, now),
            Verdict::Accept("rule")
        );
        // TCP is not tracked (its answers pass as non-SYN).
        fl.note_out(&tcp(ME, OTHER, 1, 2, SYN), now);
        assert_eq!(fl.len(), 1);
    }

    #[test]
    fn flow_table_stays_bounded() {
        let fl = Flows::default();
        let now = Instant::now();
        for i in 0..(FLOWS as u16 + 500) {
            fl.note_out(
                &udp(ME, OTHER, i, 53),
                now + Duration::from_micros(u64::from(i)),
            );
        }
        assert!(fl.len() <= FLOWS, "{}", fl.len());
        assert!(!fl.is_empty());
    }

    #[test]
    fn icmp_echo_needs_a_rule_but_answers_pass() {
        let f = ssh_only();
        let fl = Flows::default();
        let now = Instant::now();
        // A port rule still lets its sources ping (ports do not apply to ICMP).
        assert_eq!(
            f.check_in(&icmp(PEER, ME, 8), &fl, now),
            Verdict::Accept("rule")
        );
        assert_eq!(
            f.check_in(&icmp(OTHER, ME, 8), &fl, now),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f.check_in(&icmp(OTHER, ME, 0), &fl, now),
            Verdict::Accept("icmp answer")
        );
        assert_eq!(
            f.check_in(&icmp(OTHER, ME, 3), &fl, now),
            Verdict::Accept("icmp answer")
        );
        // A rule for TCP only does not let ICMP in.
        let mut tcp_only = FilterRule::allow([PEER], [NetPortRange::any("*")]);
        tcp_only.ip_proto = vec![i32::from(TCP)];
        let f2 = filter(vec![tcp_only]);
        assert_eq!(
            f2.check_in(&icmp(PEER, ME, 8), &fl, now),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f2.check_in(&tcp(PEER, ME, 1, 443, SYN), &fl, now),
            Verdict::Accept("rule")
        );
        // Other protocols only when listed.
        let gre = v4(PEER, ME, 47, &[0; 8]);
        assert_eq!(f2.check_in(&gre, &fl, now), Verdict::Drop("no rule"));
        let mut with_gre = FilterRule::allow([PEER], [NetPortRange::any("*")]);
        with_gre.ip_proto = vec![47];
        assert_eq!(
            filter(vec![with_gre]).check_in(&gre, &fl, now),
            Verdict::Accept("rule")
        );
    }

    #[test]
    fn address_forms_and_empty_filters() {
        let fl = Flows::default();
        let now = Instant::now();
        let syn = tcp(PEER, ME, 1, 80, SYN);
        for src in ["*", PEER, "100.64.0.0/10", "100.64.0.1-100.64.0.9"] {
            let f = filter(vec![FilterRule::allow([src], [NetPortRange::any("*")])]);
            assert_eq!(f.check_in(&syn, &fl, now), Verdict::Accept("rule"), "{src}");
        }
        for src in [
            "100.64.0.3-100.64.0.9",
            "cap:ssh",
            "100.64.1.0/24",
            "garbage",
            "203.0.113.20-203.0.113.10",
        ] {
            let f = filter(vec![FilterRule::allow([src], [NetPortRange::any("*")])]);
            assert_eq!(
                f.check_in(&syn, &fl, now),
                Verdict::Drop("no rule"),
                "{src}"
            );
        }
        // No rules: nothing opens; answers still pass.
        let none = filter(vec![]);
        assert_eq!(none.check_in(&syn, &fl, now), Verdict::Drop("no rule"));
        assert_eq!(
            none.check_in(&icmp(PEER, ME, 0), &fl, now),
            Verdict::Accept("icmp answer")
        );
        // Allow-all.
        let all = filter(vec![FilterRule::allow_all()]);
        assert_eq!(all.check_in(&syn, &fl, now), Verdict::Accept("rule"));
    }

    #[test]
    fn ipv6_and_fragments() {
        let fl = Flows::default();
        let now = Instant::now();
        let f = filter(vec![FilterRule::allow(
            ["fd7a:115c:a1e0::2"],
            [NetPortRange {
                ip: ME6.into(),
                bits: None,
                ports: PortRange::single(22),
            }],
        )]);
        let mut p = vec![0u8; 40 + 20];
        p[0] = 0x60;
        p[6] = TCP;
        p[8..24].copy_from_slice(
            &"fd7a:115c:a1e0::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p[24..40].copy_from_slice(&ME6.parse::<std::net::Ipv6Addr>().unwrap().octets());
        p[42..44].copy_from_slice(&22u16.to_be_bytes());
        p[53] = SYN;
        assert_eq!(f.check_in(&p, &fl, now), Verdict::Accept("rule"));
        p[43] = 23;
        assert_eq!(f.check_in(&p, &fl, now), Verdict::Drop("no rule"));
        // An ICMPv6 echo request without a rule for it; its reply passes.
        let mut e = p.clone();
        e[6] = ICMPV6;
        e[40] = 128;
        assert_eq!(
            f.check_in(&e, &fl, now),
            Verdict::Accept("rule"),
            "ports do not apply to ICMPv6"
        );
        e[8..24].copy_from_slice(
            &"fd7a:115c:a1e0::3"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(f.check_in(&e, &fl, now), Verdict::Drop("no rule"));
        e[40] = 129;
        assert_eq!(f.check_in(&e, &fl, now), Verdict::Accept("icmp answer"));
        // A later IPv4 fragment carries no ports: it passes (its first fragment was judged).
        let mut frag = tcp(OTHER, ME, 1, 80, SYN);
        frag[6] = 0x00;
        frag[7] = 0x10;
        assert_eq!(
            ssh_only().check_in(&frag, &fl, now),
            Verdict::Accept("later fragment")
        );
    }
}
