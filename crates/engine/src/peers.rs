//! The peer table: who our peers are, where to send to them, and what they may send us.
//!
//! A [`PeerTable`] is an immutable value built from a [`NetMap`]; the device swaps in a new
//! one when the map changes. The per-peer WireGuard state ([`PeerState`]) survives such
//! swaps when the peer's key is unchanged, so reconfiguring (say, selecting an exit node)
//! never drops a session.

use crate::allowed_ips::AllowedIps;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{TimerParams, Tunn};
use gotatun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tsunagu_proto::{NetMap, NodePublic};

/// Handshake initiations per second before the cookie mechanism kicks in (as WireGuard's).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Timers tighter than WireGuard's defaults, so that a peer that restarted (an exit node
/// after a scheduled reboot) is noticed within seconds instead of 15 s:
/// * a peer that received data answers with a keepalive after 1 s (instead of 10 s);
/// * data sent without any answer for 3 s triggers a new handshake (instead of 15 s);
/// * an unanswered handshake is retried after about 1 s (instead of 5 s).
///
/// Costs at most a keepalive a second per active peer and a 148-byte handshake a second
/// toward a peer that is down while we have traffic for it.
pub fn fast_timer_params() -> TimerParams {
    TimerParams {
        keepalive_timeout: Duration::from_secs(1)..=Duration::from_secs(1),
        new_handshake_timeout: Duration::from_millis(2500)..=Duration::from_millis(3000),
        rekey_timeout: Duration::from_millis(1000)..=Duration::from_millis(1300),
        ..TimerParams::default()
    }
}

/// Traffic counters of one peer, readable without locking.
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    /// Packets from this peer to destinations outside the tailnet: it uses us as its
    /// exit node.
    pub exit_rx_packets: AtomicU64,
}

/// WireGuard state of one peer.
pub struct PeerState {
    pub key: NodePublic,
    pub(crate) tunn: Mutex<Tunn>,
    /// Where we send to, and how we got there.
    path: Mutex<PathState>,
    pub counters: PeerCounters,
}

/// The address that stands for "through the relay, region N" in endpoint slots
/// (Tailscale's magic DERP address): it never reaches the network.
pub const RELAY_MAGIC_IP: Ipv4Addr = Ipv4Addr::new(127, 3, 3, 40);

/// The endpoint that means "through the relay, region `region`".
pub fn relay_addr(region: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(RELAY_MAGIC_IP), region)
}

/// The relay region an endpoint stands for, if it is a relay endpoint.
pub fn relay_region(addr: &SocketAddr) -> Option<u16> {
    (addr.ip() == IpAddr::V4(RELAY_MAGIC_IP)).then_some(addr.port())
}

/// A direct endpoint that stays silent this long while we send falls back to the relay.
pub const DIRECT_SILENCE: Duration = Duration::from_secs(2);
/// While on the relay, one packet is also sent to the direct endpoint this often: if it
/// gets through, the peer answers directly and both move to the direct path.
pub const DIRECT_PROBE_EVERY: Duration = Duration::from_secs(2);

/// How we reach one peer: the endpoint in use, the direct endpoints the map gave, the
/// relay, and the times that drive moving between them.
#[derive(Debug)]
struct PathState {
    endpoint: Option<SocketAddr>,
    /// The endpoints the map gave the last time, to tell a map change from roaming.
    configured: Vec<SocketAddr>,
    relay: Option<SocketAddr>,
    last_rx: Option<Instant>,
    last_tx: Option<Instant>,
    last_probe: Option<Instant>,
    /// Which configured endpoint the next probe goes to (they take turns: the public
    /// one STUN found, local addresses, ...).
    probe_next: usize,
    /// When `endpoint` was last chosen.
    since: Instant,
}

impl PathState {
    fn new(configured: &[SocketAddr], relay: Option<SocketAddr>, now: Instant) -> Self {
        PathState {
            // Start on the relay when there is one (it always works), else direct.
            endpoint: relay.or(configured.first().copied()),
            configured: configured.to_vec(),
            relay,
            last_rx: None,
            last_tx: None,
            last_probe: None,
            probe_next: 0,
            since: now,
        }
    }
}

/// What to do with one outgoing datagram for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendPlan {
    pub to: SocketAddr,
    /// Also send a copy here (a direct probe while on the relay).
    pub probe: Option<SocketAddr>,
}

impl PeerState {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.path.lock().endpoint
    }

    /// An authenticated packet came from `addr`: the peer is there (WireGuard roaming;
    /// a packet over the relay moves us to the relay, one from a direct address to it).
    ///
    /// Over a relay, the peer stays where the map says it can always be reached: its home
    /// region, whichever region this packet took (a peer homed elsewhere reaches us
    /// through *our* home region, on a connection it opened only to send and closes when
    /// idle). Without a region from the map, the region the packet took.
    pub(crate) fn set_endpoint(&self, addr: SocketAddr) {
        let mut p = self.path.lock();
        let addr = match p.relay {
            Some(home) if relay_region(&addr).is_some() => home,
            _ => addr,
        };
        let now = Instant::now();
        p.last_rx = Some(now);
        if p.endpoint != Some(addr) {
            tracing::debug!(peer = %self.key.short(), %addr, "endpoint");
            p.endpoint = Some(addr);
            p.since = now;
        }
    }

    /// Where the next datagram goes (and whether to probe the direct path too).
    pub(crate) fn plan_send(&self, now: Instant) -> Option<SendPlan> {
        let mut p = self.path.lock();
        let to = p.endpoint?;
        p.last_tx = Some(now);
        let mut probe = None;
        if relay_region(&to).is_some()
            && !p.configured.is_empty()
            && p.last_probe
                .is_none_or(|t| now.duration_since(t) >= DIRECT_PROBE_EVERY)
        {
            p.last_probe = Some(now);
            probe = Some(p.configured[p.probe_next % p.configured.len()]);
            p.probe_next = p.probe_next.wrapping_add(1);
        }
        Some(SendPlan { to, probe })
    }

    /// A direct endpoint that went silent while we kept sending: move to the relay.
    /// Returns the new endpoint when it changed.
    pub(crate) fn check_path(&self, now: Instant) -> Option<SocketAddr> {
        let mut p = self.path.lock();
        let relay = p.relay?;
        let ep = p.endpoint?;
        if relay_region(&ep).is_some() {
            return None;
        }
        let sending = p
            .last_tx
            .is_some_and(|t| now.duration_since(t) < DIRECT_SILENCE);
        let heard = p.last_rx.unwrap_or(p.since);
        let silent = now.duration_since(heard.max(p.since)) >= DIRECT_SILENCE;
        if sending && silent {
            tracing::info!(peer = %self.key.short(), from = %ep, "direct path silent; using the relay");
            p.endpoint = Some(relay);
            p.since = now;
            p.last_probe = Some(now);
            return Some(relay);
        }
        None
    }

    /// Time since the last completed handshake, if a session exists.
    pub fn last_handshake(&self) -> Option<Duration> {
        self.tunn.lock().time_since_last_handshake()
    }
}

/// Our identity as WireGuard sees it.
pub struct LocalKey {
    pub(crate) private: StaticSecret,
    pub(crate) public: PublicKey,
    pub(crate) rate_limiter: Arc<RateLimiter>,
}

impl LocalKey {
    pub fn new(private: &tsunagu_proto::NodePrivate) -> Self {
        let private = StaticSecret::from(private.to_bytes());
        let public = PublicKey::from(&private);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        LocalKey {
            private,
            public,
            rate_limiter,
        }
    }
}

/// One peer as the table sees it.
pub struct PeerEntry {
    pub name: String,
    pub state: Arc<PeerState>,
    /// Allowed IPs as routed, including 0.0.0.0/0 and ::/0 when this is our exit node.
    pub allowed_ips: Vec<IpNet>,
}

/// An immutable snapshot of the peers, with cryptokey routing.
pub struct PeerTable {
    pub(crate) local: Arc<LocalKey>,
    entries: Vec<PeerEntry>,
    by_key: BTreeMap<NodePublic, usize>,
    routes: AllowedIps,
    exit: Option<usize>,
}

impl PeerTable {
    /// A table without peers.
    pub fn empty(local: Arc<LocalKey>) -> Self {
        PeerTable {
            local,
            entries: Vec::new(),
            by_key: BTreeMap::new(),
            routes: AllowedIps::new(),
            exit: None,
        }
    }

    /// Build the table for `map`, reusing the WireGuard state of peers that `previous`
    /// already had (same key, same local key). The map must be valid
    /// ([`NetMap::validate`]).
    pub fn build(map: &NetMap, previous: &PeerTable, index_table: &IndexTable) -> PeerTable {
        let own = map.self_node.private_key.public();
        let same_identity = own.0 == previous.local.public.to_bytes();
        let local = if same_identity {
            previous.local.clone()
        } else {
            Arc::new(LocalKey::new(&map.self_node.private_key))
        };
        let mut entries = Vec::with_capacity(map.peers.len());
        let mut by_key = BTreeMap::new();
        let mut routes = AllowedIps::new();
        let mut exit = None;
        for peer in &map.peers {
            let reused = same_identity
                .then(|| previous.get(&peer.key))
                .flatten()
                .map(|e| e.state.clone());
            let state = match reused {
                Some(state) => {
                    state.tunn.lock().set_persistent_keepalive(peer.keepalive);
                    let relay = peer.relay.map(relay_addr);
                    let mut path = state.path.lock();
                    if path.configured != peer.endpoints || path.relay != relay {
                        // The map moved the peer: follow the map, not what we learned.
                        *path = PathState::new(&peer.endpoints, relay, Instant::now());
                    }
                    drop(path);
                    state
                }
                None => {
                    let mut tunn = Tunn::new(
                        local.private.clone(),
                        PublicKey::from(peer.key.0),
                        None,
                        peer.keepalive,
                        index_table.clone(),
                        local.rate_limiter.clone(),
                    );
                    tunn.dangerously_set_timer_params(fast_timer_params());
                    Arc::new(PeerState {
                        key: peer.key,
                        tunn: Mutex::new(tunn),
                        path: Mutex::new(PathState::new(
                            &peer.endpoints,
                            peer.relay.map(relay_addr),
                            Instant::now(),
                        )),
                        counters: PeerCounters::default(),
                    })
                }
            };
            let idx = entries.len();
            let mut allowed_ips = peer.allowed_ips.clone();
            if map.exit_node == Some(peer.key) && peer.offers_exit {
                allowed_ips.push("0.0.0.0/0".parse().expect("literal prefix"));
                allowed_ips.push("::/0".parse().expect("literal prefix"));
                exit = Some(idx);
            }
            for net in &allowed_ips {
                routes.insert(*net, idx);
            }
            by_key.insert(peer.key, idx);
            entries.push(PeerEntry {
                name: peer.name.clone(),
                state,
                allowed_ips,
            });
        }
        PeerTable {
            local,
            entries,
            by_key,
            routes,
            exit,
        }
    }

    pub fn get(&self, key: &NodePublic) -> Option<&PeerEntry> {
        self.by_key.get(key).map(|&i| &self.entries[i])
    }

    /// The peer that packets to `dst` go to.
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<PeerState>> {
        self.routes.lookup(dst).map(|i| &self.entries[i].state)
    }

    /// Whether `peer` may send us packets from `src`: only if we would route `src` to
    /// that same peer (WireGuard's rule; what stops a peer from spoofing another).
    pub fn allows_source(&self, peer: &PeerState, src: IpAddr) -> bool {
        self.routes
            .lookup(src)
            .is_some_and(|i| self.entries[i].state.key == peer.key)
    }

    pub fn entries(&self) -> &[PeerEntry] {
        &self.entries
    }

    pub fn exit(&self) -> Option<&PeerEntry> {
        self.exit.map(|i| &self.entries[i])
    }
}

/// The source and destination of an IP packet, if it is one.
pub fn ip_endpoints(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        6 if packet.len() >= 40 => {
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        _ => None,
    }
}

/// The length an IP packet declares (IPv4 total length, IPv6 payload length + 40).
/// WireGuard pads plaintext to a multiple of 16; this is how the padding is taken off.
pub fn ip_declared_len(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(usize::from(u16::from_be_bytes([packet[2], packet[3]]))),
        6 if packet.len() >= 40 => {
            Some(40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])))
        }
        _ => None,
    }
}

/// Count a packet on a counter.
pub(crate) fn bump(counter: &AtomicU64, by: usize) {
    counter.fetch_add(by as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagu_proto::{NodePrivate, Peer, SelfNode};

    fn map() -> NetMap {
        let peer = |name: &str, ip: &str| Peer {
            name: name.into(),
            key: NodePrivate::generate().public(),
            endpoints: vec!["198.51.100.2:41641".parse().unwrap()],
            allowed_ips: vec![ip.parse().unwrap()],
            offers_exit: true,
            exit_client: false,
            keepalive: None,
            relay: None,
        };
        NetMap {
            self_node: SelfNode {
                name: "me".into(),
                private_key: NodePrivate::generate(),
                addresses: vec!["100.64.0.1/32".parse().unwrap()],
                serve_exit: false,
            },
            peers: vec![peer("a", "100.64.0.2/32"), peer("b", "100.64.0.3/32")],
            exit_node: None,
            exit_node_allow_lan_access: false,
            exit_node_blocked: false,
            mtu: 1280,
        }
    }

    fn build(m: &NetMap, prev: Option<&PeerTable>) -> PeerTable {
        let empty = PeerTable::empty(Arc::new(LocalKey::new(&m.self_node.private_key)));
        PeerTable::build(m, prev.unwrap_or(&empty), &IndexTable::from_os_rng())
    }

    #[test]
    fn relay_first_then_direct_and_back_when_direct_goes_silent() {
        let mut m = map();
        let direct: SocketAddr = "198.51.100.2:41641".parse().unwrap();
        m.peers[0].endpoints = vec![direct];
        m.peers[0].relay = Some(900);
        let t = build(&m, None);
        let peer = &t.entries()[0].state;
        let relay = relay_addr(900);
        assert_eq!(relay_region(&relay), Some(900));
        assert_eq!(relay_region(&direct), None);
        // Starts on the relay, probing the direct endpoint with the first datagram only.
        let t0 = Instant::now();
        let plan = peer.plan_send(t0).unwrap();
        assert_eq!((plan.to, plan.probe), (relay, Some(direct)));
        let plan = peer.plan_send(t0 + Duration::from_millis(500)).unwrap();
        assert_eq!((plan.to, plan.probe), (relay, None));
        let plan = peer.plan_send(t0 + DIRECT_PROBE_EVERY).unwrap();
        assert_eq!(plan.probe, Some(direct), "probes again after the interval");
        // The peer answers directly: direct from now on, no more probes.
        peer.set_endpoint(direct);
        let now = Instant::now();
        let plan = peer.plan_send(now).unwrap();
        assert_eq!((plan.to, plan.probe), (direct, None));
        assert_eq!(peer.check_path(now), None, "not silent yet");
        // We keep sending, the peer goes silent: back to the relay.
        let later = now + DIRECT_SILENCE + Duration::from_millis(100);
        peer.plan_send(later).unwrap();
        assert_eq!(peer.check_path(later), Some(relay));
        assert_eq!(peer.endpoint(), Some(relay));
        // Idle (nothing sent) is not silence.
        peer.set_endpoint(direct);
        let idle = Instant::now() + Duration::from_secs(60);
        assert_eq!(peer.check_path(idle), None);
        // Without a relay, the direct endpoint stays whatever happens.
        let mut m2 = map();
        m2.peers[0].endpoints = vec![direct];
        let t2 = build(&m2, None);
        let p2 = &t2.entries()[0].state;
        assert_eq!(p2.endpoint(), Some(direct));
        p2.plan_send(Instant::now()).unwrap();
        assert_eq!(
            p2.check_path(Instant::now() + Duration::from_secs(10)),
            None
        );
    }

    #[test]
    fn over_a_relay_a_peer_stays_at_its_home_region() {
        let mut m = map();
        m.peers[0].relay = Some(901);
        let t = build(&m, None);
        let (homed_elsewhere, unknown) = (&t.entries()[0].state, &t.entries()[1].state);
        assert_eq!(homed_elsewhere.endpoint(), Some(relay_addr(901)));
        // It reached us through our region 900: we still send to its home region 901.
        homed_elsewhere.set_endpoint(relay_addr(900));
        assert_eq!(homed_elsewhere.endpoint(), Some(relay_addr(901)));
        // A direct packet still moves it to the direct path.
        let direct: SocketAddr = "198.51.100.5:41641".parse().unwrap();
        homed_elsewhere.set_endpoint(direct);
        assert_eq!(homed_elsewhere.endpoint(), Some(direct));
        homed_elsewhere.set_endpoint(relay_addr(900));
        assert_eq!(homed_elsewhere.endpoint(), Some(relay_addr(901)));
        // Without a region in the map, the answer goes back the way the packet came.
        unknown.set_endpoint(relay_addr(900));
        assert_eq!(unknown.endpoint(), Some(relay_addr(900)));
    }

    #[test]
    fn exit_node_takes_default_route_only_when_selected() {
        let mut m = map();
        let t = build(&m, None);
        let web: IpAddr = "203.0.113.10".parse().unwrap();
        assert!(t.route(web).is_none());
        assert_eq!(
            t.route("100.64.0.3".parse().unwrap()).unwrap().key,
            m.peers[1].key
        );

        m.exit_node = Some(m.peers[0].key);
        let t2 = build(&m, Some(&t));
        assert_eq!(t2.route(web).unwrap().key, m.peers[0].key);
        assert_eq!(
            t2.route("2001:db8:2::10".parse().unwrap()).unwrap().key,
            m.peers[0].key
        );
        // Tailnet addresses still go to their own peers.
        assert_eq!(
            t2.route("100.64.0.3".parse().unwrap()).unwrap().key,
            m.peers[1].key
        );
        // The exit node may now send us internet sources; the other peer may not.
        let a = &t2.entries()[0].state;
        let b = &t2.entries()[1].state;
        assert!(t2.allows_source(a, web));
        assert!(!t2.allows_source(b, web));
        assert!(!t2.allows_source(a, "100.64.0.3".parse().unwrap()));
        // The WireGuard state survived the rebuild.
        assert!(Arc::ptr_eq(a, &t.entries()[0].state));
    }

    #[test]
    fn map_endpoint_change_overrides_roaming() {
        let mut m = map();
        let t = build(&m, None);
        let roamed: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        t.entries()[0].state.set_endpoint(roamed);
        let t2 = build(&m, Some(&t));
        assert_eq!(
            t2.entries()[0].state.endpoint(),
            Some(roamed),
            "roaming kept"
        );
        m.peers[0].endpoints = vec!["198.51.100.6:41641".parse().unwrap()];
        let t3 = build(&m, Some(&t2));
        assert_eq!(
            t3.entries()[0].state.endpoint(),
            Some(m.peers[0].endpoints[0])
        );
    }

    #[test]
    fn ip_endpoints_parses_and_rejects() {
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[100, 64, 0, 1]);
        v4[16..20].copy_from_slice(&[203, 0, 113, 10]);
        let (s, d) = ip_endpoints(&v4).unwrap();
        assert_eq!(
            (s.to_string(), d.to_string()),
            ("100.64.0.1".into(), "203.0.113.10".into())
        );
        assert!(ip_endpoints(&v4[..19]).is_none());
        assert!(ip_endpoints(&[0x60; 39]).is_none());
        assert!(ip_endpoints(&[]).is_none());
        assert!(ip_endpoints(&[0x10; 60]).is_none());
        assert_eq!(ip_declared_len(&v4), Some(0));
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        assert_eq!(ip_declared_len(&v6), Some(48));
    }
}
