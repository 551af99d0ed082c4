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
//! (never one by accident, whatever the host's forwarding settings). An exit node judges
//! forwarded packets by the same rules, on source, destination, protocol and port (the
//! server sends an exit node its users' rules with the internet's ranges as destinations:
//! `autogroup:internet:443` forwards port 443 only). Destinations on the exit host itself
//! or its networks are closed to broad grants ([`crate::scope`]): only a rule naming them
//! explicitly opens them, for every packet. Without rules (a map from a file) an exit node
//! forwards to the internet and to nothing closed. Its nftables table checks the same
//! again (defence in depth). Pure: bytes in, a verdict out; the UDP flow table is the only
//! state.

use crate::scope::{self, AddrSet, HostNets};
use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tsunagu_proto::tailcfg::FilterRule;

pub(crate) const TCP: u8 = 6;
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

impl Addrs {
    /// Whether the whole set lies in `set` (`*` never does).
    fn within(&self, set: &AddrSet) -> bool {
        match self {
            Addrs::Any => false,
            Addrs::Net(n) => set.contains_net(n),
            Addrs::Range(a, b) => set.contains_range(*a, *b),
        }
    }

    /// As prefixes (`*` is none: it is never an explicit grant).
    fn nets(&self) -> Vec<IpNet> {
        match self {
            Addrs::Any => Vec::new(),
            Addrs::Net(n) => vec![n.trunc()],
            Addrs::Range(a, b) => scope::range_to_nets(*a, *b),
        }
    }
}

#[derive(Debug, Clone)]
struct Dst {
    addrs: Addrs,
    first: u16,
    last: u16,
    /// Names a closed destination of an exit node explicitly (see [`crate::scope`]).
    explicit: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    srcs: Vec<Addrs>,
    dsts: Vec<Dst>,
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
    /// This node's own (tailnet) addresses.
    local: Vec<IpAddr>,
    /// We serve as exit node: packets to other addresses are forwarded when allowed,
    /// except to this closed space (the host and its networks) without an explicit rule.
    exit: Option<AddrSet>,
    /// Our PeerAPI's TCP port: connections to it on our addresses pass whatever the
    /// rules say (the PeerAPI checks who may use it, per request).
    peerapi_port: Option<u16>,
}

/// The parts of an IP packet the filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Headers {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) proto: u8,
    /// Source and destination ports (TCP, UDP, SCTP), when present.
    pub(crate) ports: Option<(u16, u16)>,
    /// A later fragment (no transport header).
    fragment: bool,
    /// TCP flags, ICMP type.
    pub(crate) tcp_flags: u8,
    icmp_type: u8,
    /// The transport header is cut short (no ports, no TCP flags, no ICMP type).
    truncated: bool,
}

pub(crate) fn parse(p: &[u8]) -> Option<Headers> {
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

/// Compile Tailscale's rules (marking the destinations that name part of `closed`).
fn compile(rules: &[FilterRule], closed: Option<&AddrSet>) -> Vec<Rule> {
    rules
        .iter()
        .map(|r| Rule {
            srcs: r.src_ips.iter().filter_map(|s| Addrs::parse(s)).collect(),
            dsts: r
                .dst_ports
                .iter()
                .filter_map(|d| {
                    let addrs = Addrs::parse(&d.ip)?;
                    let explicit = closed.is_some_and(|c| addrs.within(c));
                    Some(Dst {
                        addrs,
                        first: d.ports.first,
                        last: d.ports.last,
                        explicit,
                    })
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
    /// forwarding as exit node when `exit` gives the host's networks. Rule entries that
    /// do not parse (capability sources, names) match nothing, as in Tailscale.
    pub fn new(rules: Option<&[FilterRule]>, local: &[IpNet], exit: Option<&HostNets>) -> Filter {
        let closed = exit.map(scope::closed_set);
        Filter {
            rules: rules.map(|r| compile(r, closed.as_ref())),
            local: local.iter().map(IpNet::addr).collect(),
            exit: closed,
            peerapi_port: None,
        }
    }

    /// Let TCP connections to `port` on our addresses in whatever the rules say (the
    /// PeerAPI, as Tailscale's clients do).
    pub fn with_peerapi_port(mut self, port: Option<u16>) -> Filter {
        self.peerapi_port = port;
        self
    }

    /// Whether we serve as exit node.
    pub fn serves_exit(&self) -> bool {
        self.exit.is_some()
    }

    /// Whether outgoing packets must be noted (for UDP answers): only with rules.
    pub fn tracks_flows(&self) -> bool {
        self.rules.is_some()
    }

    /// The destinations the rules open explicitly on a closed space (an exit node's
    /// host and networks), as prefixes: what the nftables table lets through besides
    /// the internet.
    pub fn explicit_grants(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .rules
            .iter()
            .flatten()
            .flat_map(|r| r.dsts.iter())
            .filter(|d| d.explicit)
            .flat_map(|d| d.addrs.nets())
            .filter(|n| !scope::is_tailnet(n.addr()))
            .collect();
        out = IpNet::aggregate(&out);
        out
    }

    /// Judge a decrypted packet from a peer (its source already checked against the
    /// peer's allowed IPs).
    pub fn check_in(&self, packet: &[u8], flows: &Flows, now: Instant) -> Verdict {
        let Some(h) = parse(packet) else {
            return Verdict::Drop("unparsable");
        };
        if self.local.contains(&h.dst) {
            if h.proto == TCP
                && !h.truncated
                && !h.fragment
                && self.peerapi_port.is_some()
                && h.ports.map(|(_, d)| d) == self.peerapi_port
            {
                return Verdict::Accept("peerapi");
            }
            return match &self.rules {
                None => Verdict::Accept("no filter"),
                Some(rules) => judge(rules, &h, flows, now, false),
            };
        }
        let Some(closed) = &self.exit else {
            return Verdict::Drop("not for this node, which is no exit node");
        };
        if scope::is_tailnet(h.dst) {
            return Verdict::Drop("another node's tailnet address");
        }
        if closed.contains(h.dst) {
            // The exit host or its networks: an explicit grant, for every packet.
            return match &self.rules {
                Some(rules) if judge(rules, &h, flows, now, true) == Verdict::Accept("rule") => {
                    Verdict::Accept("explicit grant")
                }
                _ => Verdict::Drop("the exit host's own networks"),
            };
        }
        match &self.rules {
            None => Verdict::Accept("forwarded"),
            Some(rules) => judge(rules, &h, flows, now, false),
        }
    }
}

/// The rules' verdict on a packet. `explicit_only`: only destinations marked explicit
/// count, and every packet must match (no exceptions for answers; a later fragment only
/// when such a rule names its destination).
fn judge(rules: &[Rule], h: &Headers, flows: &Flows, now: Instant, explicit_only: bool) -> Verdict {
    if h.truncated {
        return Verdict::Drop("unparsable");
    }
    let names_dst = |d: &Dst| (!explicit_only || d.explicit) && d.addrs.contains(h.dst);
    if h.fragment {
        if explicit_only && !rules.iter().any(|r| r.dsts.iter().any(names_dst)) {
            return Verdict::Drop("no rule");
        }
        return Verdict::Accept("later fragment");
    }
    let with_ports = match h.proto {
        TCP => {
            let syn_only = h.tcp_flags & 0x02 != 0 && h.tcp_flags & 0x10 == 0;
            if !syn_only && !explicit_only {
                return Verdict::Accept("tcp non-syn");
            }
            true
        }
        UDP => {
            if !explicit_only && flows.answers(h, now) {
                return Verdict::Accept("udp answer");
            }
            true
        }
        SCTP => true,
        ICMP => {
            // Echo reply, unreachable, source quench, redirect, time exceeded,
            // parameter problem.
            if !explicit_only && matches!(h.icmp_type, 0 | 3 | 4 | 5 | 11 | 12) {
                return Verdict::Accept("icmp answer");
            }
            false
        }
        ICMPV6 => {
            // Errors (1-4) and echo reply (129).
            if !explicit_only && matches!(h.icmp_type, 1..=4 | 129) {
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
            && r.dsts.iter().any(|d| {
                names_dst(d)
                    && (!with_ports || port.is_some_and(|p| (d.first..=d.last).contains(&p)))
            })
    });
    if hit {
        Verdict::Accept("rule")
    } else {
        Verdict::Drop("no rule")
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

    /// The exit host's own networks: a public address on the uplink, a LAN, loopback.
    fn host() -> HostNets {
        HostNets::from_interface_addrs(
            [
                "198.51.100.2/24",
                "198.18.3.1/24",
                "2001:db8:1::2/64",
                "127.0.0.1/8",
            ]
            .iter()
            .map(|s| s.parse().unwrap()),
        )
    }

    /// An exit node's filter (it forwards what is not for it).
    fn filter(rules: Vec<FilterRule>) -> Filter {
        Filter::new(Some(&rules), &local(), Some(&host()))
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
        // Not for us: an exit node judges it by the rules (none opens the internet
        // here); a node that is no exit node drops it, with or without rules.
        let web = tcp(PEER, "203.0.113.10", 40000, 80, SYN);
        assert_eq!(f.check_in(&web, &fl, now), Verdict::Drop("no rule"));
        for rules in [None, Some(&[FilterRule::allow_all()][..])] {
            let g = Filter::new(rules, &local(), None);
            assert_eq!(
                g.check_in(&web, &fl, now),
                Verdict::Drop("not for this node, which is no exit node")
            );
        }
        // No rules (a map from a file): whatever is for us.
        let open = Filter::new(None, &local(), None);
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
    fn the_peerapi_port_opens_on_our_addresses_whatever_the_rules() {
        let f = ssh_only().with_peerapi_port(Some(40123));
        let fl = Flows::default();
        let now = Instant::now();
        // A peer no rule lets in reaches the PeerAPI (which checks its callers itself).
        assert_eq!(
            f.check_in(&tcp(OTHER, ME, 40000, 40123, SYN), &fl, now),
            Verdict::Accept("peerapi")
        );
        // Only that port, only TCP, only on our addresses.
        assert_eq!(
            f.check_in(&tcp(OTHER, ME, 40000, 40124, SYN), &fl, now),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f.check_in(&udp(OTHER, ME, 40000, 40123), &fl, now),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f.check_in(&tcp(OTHER, "203.0.113.10", 40000, 40123, SYN), &fl, now),
            Verdict::Drop("no rule")
        );
        // Without a PeerAPI port, the rules alone.
        assert_eq!(
            ssh_only().check_in(&tcp(OTHER, ME, 40000, 40123, SYN), &fl, now),
            Verdict::Drop("no rule")
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

    /// The exit node's filter as the server compiles `policy` for it: the exit node
    /// (100.64.0.1, approved for 0.0.0.0/0 and ::/0), PEER (user alice) and OTHER
    /// (tag:iot, not allowed to use exit nodes).
    fn compiled_exit_filter(policy: &str) -> Filter {
        use tsunagu_policy::{Policy, PolicyNode};
        let node = |id, user: Option<&str>, tags: &[&str], ip: &str, exit: bool| PolicyNode {
            id,
            user: user.map(str::to_string),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ips: vec![
                ip.parse().unwrap(),
                format!("fd7a:115c:a1e0::{}", id).parse().unwrap(),
            ],
            approved_routes: if exit {
                vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]
            } else {
                Vec::new()
            },
        };
        let nodes = [
            node(1, None, &["tag:exit"], ME, true),
            node(2, Some("alice"), &[], PEER, false),
            node(3, None, &["tag:iot"], OTHER, false),
        ];
        let compiled = Policy::parse(policy).unwrap().compile(&nodes);
        let rules: Vec<FilterRule> = compiled
            .filter(1)
            .into_iter()
            .map(|r| FilterRule {
                src_ips: r.src_ips,
                dst_ports: r
                    .dst_ports
                    .into_iter()
                    .map(|d| NetPortRange {
                        ip: d.ip,
                        bits: None,
                        ports: PortRange {
                            first: d.first,
                            last: d.last,
                        },
                    })
                    .collect(),
                ip_proto: r.ip_proto.into_iter().map(i32::from).collect(),
                ..FilterRule::default()
            })
            .collect();
        filter(rules)
    }

    const TAGS: &str = r#""tagOwners": { "tag:exit": ["alice"], "tag:iot": ["alice"] },"#;

    #[test]
    fn exit_node_forwards_only_what_a_rule_allows_and_never_into_its_own_host() {
        let policy = format!(
            r#"{{ {TAGS} "acls": [
                {{ "action": "accept", "src": ["alice"], "dst": ["autogroup:internet:443"] }},
                {{ "action": "accept", "src": ["tag:iot"], "dst": ["tag:exit:22"] }},
            ] }}"#
        );
        let f = compiled_exit_filter(&policy);
        let fl = Flows::default();
        let now = Instant::now();
        let syn = |src: &str, dst: &str, port: u16| tcp(src, dst, 40000, port, SYN);
        let table: &[(&str, Vec<u8>, Verdict)] = &[
            (
                "internet:443 under a 443 rule",
                syn(PEER, "203.0.113.10", 443),
                Verdict::Accept("rule"),
            ),
            (
                "internet:25 under a 443 rule",
                syn(PEER, "203.0.113.10", 25),
                Verdict::Drop("no rule"),
            ),
            (
                "the exit host's LAN:22",
                syn(PEER, "198.18.3.10", 22),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "the exit host's LAN:443 (inside the internet's ranges, but its LAN)",
                syn(PEER, "198.18.3.10", 443),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "the exit host's own public address:443",
                syn(PEER, "198.51.100.2", 443),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "a neighbour on the exit host's uplink subnet",
                syn(PEER, "198.51.100.4", 443),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "cloud metadata",
                syn(PEER, "169.254.169.254", 80),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "loopback space",
                syn(PEER, "127.0.0.2", 443),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "another node's tailnet address",
                syn(PEER, "100.64.0.9", 443),
                Verdict::Drop("another node's tailnet address"),
            ),
            (
                "a non-client (tag:iot) to the internet",
                syn(OTHER, "203.0.113.10", 443),
                Verdict::Drop("no rule"),
            ),
            (
                "a non-client to the exit host's public address",
                syn(OTHER, "198.51.100.2", 22),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "a non-client to what the policy gives it: the exit's tailnet address",
                syn(OTHER, ME, 22),
                Verdict::Accept("rule"),
            ),
            (
                "an established segment to the internet (answers to allowed openings)",
                tcp(PEER, "203.0.113.10", 40000, 25, ACK),
                Verdict::Accept("tcp non-syn"),
            ),
            (
                "an established segment to the exit host is no exception",
                tcp(PEER, "198.51.100.2", 40000, 22, ACK),
                Verdict::Drop("the exit host's own networks"),
            ),
            (
                "UDP to cloud metadata",
                udp(PEER, "169.254.169.254", 40000, 53),
                Verdict::Drop("the exit host's own networks"),
            ),
        ];
        for (what, packet, want) in table {
            assert_eq!(f.check_in(packet, &fl, now), *want, "{what}");
        }
        // IPv6: the internet's ranges, not the exit's uplink /64.
        let v6 = |dst: &str, port: u16| {
            let mut p = vec![0u8; 40 + 20];
            p[0] = 0x60;
            p[6] = TCP;
            p[8..24].copy_from_slice(
                &"fd7a:115c:a1e0::2"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            p[24..40].copy_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
            p[42..44].copy_from_slice(&port.to_be_bytes());
            p[53] = SYN;
            p
        };
        assert_eq!(
            f.check_in(&v6("2001:db8:2::10", 443), &fl, now),
            Verdict::Accept("rule")
        );
        assert_eq!(
            f.check_in(&v6("2001:db8:2::10", 25), &fl, now),
            Verdict::Drop("no rule")
        );
        assert_eq!(
            f.check_in(&v6("2001:db8:1::99", 443), &fl, now),
            Verdict::Drop("the exit host's own networks")
        );
        assert_eq!(
            f.check_in(&v6("fe80::1", 443), &fl, now),
            Verdict::Drop("the exit host's own networks")
        );
        // Nothing closed is explicitly granted: nftables gets no exception.
        assert!(f.explicit_grants().is_empty());
    }

    #[test]
    fn broad_grants_do_not_open_the_exit_host_but_explicit_ones_do() {
        // `*:*` (the default policy) opens the internet, never the exit host.
        let f = compiled_exit_filter(&format!(
            r#"{{ {TAGS} "acls": [ {{ "action": "accept", "src": ["alice"], "dst": ["*:*"] }} ] }}"#
        ));
        let fl = Flows::default();
        let now = Instant::now();
        let syn = |dst: &str, port: u16| tcp(PEER, dst, 40000, port, SYN);
        assert_eq!(
            f.check_in(&syn("203.0.113.10", 25), &fl, now),
            Verdict::Accept("rule")
        );
        assert_eq!(
            f.check_in(&syn("198.51.100.2", 22), &fl, now),
            Verdict::Drop("the exit host's own networks")
        );
        assert_eq!(
            f.check_in(&syn("169.254.169.254", 80), &fl, now),
            Verdict::Drop("the exit host's own networks")
        );
        // Naming the exit host's LAN and its public address's port 22 opens exactly that.
        let f = compiled_exit_filter(&format!(
            r#"{{ {TAGS} "acls": [
                {{ "action": "accept", "src": ["alice"], "dst": ["autogroup:internet:*"] }},
                {{ "action": "accept", "src": ["alice"], "dst": ["198.18.3.0/24:22", "198.51.100.2:22"] }},
            ] }}"#
        ));
        assert_eq!(
            f.check_in(&syn("198.18.3.10", 22), &fl, now),
            Verdict::Accept("explicit grant")
        );
        assert_eq!(
            f.check_in(&syn("198.51.100.2", 22), &fl, now),
            Verdict::Accept("explicit grant")
        );
        assert_eq!(
            f.check_in(&tcp(PEER, "198.51.100.2", 40000, 22, ACK), &fl, now),
            Verdict::Accept("explicit grant")
        );
        assert_eq!(
            f.check_in(&syn("198.18.3.10", 80), &fl, now),
            Verdict::Drop("the exit host's own networks")
        );
        assert_eq!(
            f.check_in(&syn("169.254.169.254", 80), &fl, now),
            Verdict::Drop("the exit host's own networks")
        );
        assert_eq!(
            f.check_in(&tcp(OTHER, "198.18.3.10", 40000, 22, SYN), &fl, now),
            Verdict::Drop("the exit host's own networks"),
            "granted to alice only"
        );
        let grants: Vec<String> = f
            .explicit_grants()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(grants, ["198.18.3.0/24", "198.51.100.2/32"]);
    }

    #[test]
    fn without_rules_an_exit_node_forwards_to_the_internet_only() {
        let f = Filter::new(None, &local(), Some(&host()));
        let fl = Flows::default();
        let now = Instant::now();
        assert_eq!(
            f.check_in(&tcp(PEER, "203.0.113.10", 1, 25, SYN), &fl, now),
            Verdict::Accept("forwarded")
        );
        for closed in [
            "198.51.100.2",
            "198.18.3.10",
            "169.254.169.254",
            "127.0.0.1",
        ] {
            assert_eq!(
                f.check_in(&tcp(PEER, closed, 1, 22, SYN), &fl, now),
                Verdict::Drop("the exit host's own networks"),
                "{closed}"
            );
        }
        assert_eq!(
            f.check_in(&tcp(PEER, ME, 1, 22, SYN), &fl, now),
            Verdict::Accept("no filter")
        );
    }
}
