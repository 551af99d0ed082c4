//! The peer table: who our peers are, where to send to them, and what they may send us.
//!
//! A [`PeerTable`] is an immutable value built from a [`NetMap`]; the device swaps in a new
//! one when the map changes. The per-peer WireGuard state ([`PeerState`]) survives such
//! swaps when the peer's key is unchanged, so reconfiguring (say, selecting an exit node)
//! never drops a session.

use crate::allowed_ips::AllowedIps;
use crate::filter::{Filter, Flows, Verdict};
use crate::scope::HostNets;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{TimerParams, Tunn};
use gotatun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tsunagu_disco::{Message, TxId};
use tsunagu_proto::{DiscoPublic, NetMap, NodePublic};

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
    /// The NaCl box shared with the peer's disco key (made on first use).
    pub(crate) disco_box: Mutex<Option<Arc<tsunagu_disco::PeerBox>>>,
    /// When the session was reset for a new disco key (another host behind the peer's
    /// identity), until the new session is up: its handshakes are logged.
    pub(crate) reset_at: Mutex<Option<Instant>>,
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
/// While on the relay, the direct paths are tried this often: with one WireGuard packet
/// (peers without disco) or a round of disco pings (peers with it).
pub const DIRECT_PROBE_EVERY: Duration = Duration::from_secs(2);
/// A peer we sent to this recently is active: only active peers are probed and kept
/// alive with heartbeats (an idle peer costs nothing).
pub const ACTIVE: Duration = Duration::from_secs(10);
/// On a direct path, a disco ping this often keeps the NAT mappings open and shows the
/// path still works.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// On a direct path, all endpoints are pinged again this often, to find a better one.
pub const UPGRADE_EVERY: Duration = Duration::from_secs(30);
/// A disco ping unanswered this long is forgotten.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// CallMeMaybe over the relay at most this often.
pub const CALL_ME_MAYBE_EVERY: Duration = Duration::from_secs(5);
/// A peer's CallMeMaybe makes us ping at most this often (more are only learned from):
/// a member cannot turn us into a stream of pings at addresses it names.
pub const CALL_ME_MAYBE_ANSWER_EVERY: Duration = Duration::from_secs(1);
/// Pings in flight per peer, and endpoints learned per peer (from its pings and its
/// CallMeMaybe), at most.
const MAX_PINGS: usize = 32;
const MAX_LEARNED: usize = 16;
/// Endpoints of a peer taken from the map, and candidates pinged per round, at most
/// (the server keeps 32 per node too): a peer that lists thousands of third-party
/// addresses must not make us ping all of them every few seconds.
pub const MAX_CONFIGURED: usize = 32;
pub const MAX_CANDIDATES: usize = 32;

/// The endpoints of a peer worth keeping from the map: distinct, not an unspecified,
/// multicast or broadcast address, not port 0, the first [`MAX_CONFIGURED`] (best
/// first, as the map lists them).
pub(crate) fn usable_endpoints(eps: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for e in eps {
        let junk = e.port() == 0
            || e.ip().is_unspecified()
            || e.ip().is_multicast()
            || e.ip() == IpAddr::V4(Ipv4Addr::BROADCAST);
        if !junk && !out.contains(e) {
            out.push(*e);
            if out.len() == MAX_CONFIGURED {
                break;
            }
        }
    }
    out
}

/// How we reach one peer: the endpoint in use, the direct endpoints the map gave, the
/// relay, and the times that drive moving between them.
#[derive(Debug)]
struct PathState {
    endpoint: Option<SocketAddr>,
    /// The endpoints the map gave the last time, to tell a map change from roaming.
    configured: Vec<SocketAddr>,
    relay: Option<SocketAddr>,
    /// Last authenticated packet (or disco pong) over the endpoint in use.
    last_rx: Option<Instant>,
    last_tx: Option<Instant>,
    /// Last packet from the TUN for this peer: data, not WireGuard's own keepalives and
    /// handshakes. Disco works for active peers only.
    last_data: Option<Instant>,
    last_probe: Option<Instant>,
    /// Which configured endpoint the next probe goes to (they take turns: the public
    /// one STUN found, local addresses, ...).
    probe_next: usize,
    /// When `endpoint` was last chosen.
    since: Instant,
    /// Disco state, for peers that speak it.
    disco: Option<DiscoPath>,
}

/// The disco side of a path: pings in flight, endpoints learned, latency of the path in
/// use.
#[derive(Debug)]
struct DiscoPath {
    key: DiscoPublic,
    pings: VecDeque<SentPing>,
    learned: Vec<SocketAddr>,
    last_round: Option<Instant>,
    last_call: Option<Instant>,
    last_heartbeat: Option<Instant>,
    /// When a CallMeMaybe of the peer last made us ping.
    last_call_answered: Option<Instant>,
    /// Round-trip time of the direct endpoint in use.
    latency: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct SentPing {
    tx: TxId,
    to: SocketAddr,
    at: Instant,
}

impl DiscoPath {
    fn new(key: DiscoPublic) -> Self {
        DiscoPath {
            key,
            pings: VecDeque::new(),
            learned: Vec::new(),
            last_round: None,
            last_call: None,
            last_heartbeat: None,
            last_call_answered: None,
            latency: None,
        }
    }

    fn learn(&mut self, addr: SocketAddr) {
        if !self.learned.contains(&addr) {
            if self.learned.len() >= MAX_LEARNED {
                self.learned.remove(0);
            }
            self.learned.push(addr);
        }
    }

    /// The endpoints worth a ping, at most [`MAX_CANDIDATES`]: the map's first half
    /// (best first), the learned ones (where the peer's pings came from, what it named in
    /// its CallMeMaybe), then the rest of the map's.
    fn candidates(&self, configured: &[SocketAddr]) -> Vec<SocketAddr> {
        let half = configured.len().min(MAX_CANDIDATES / 2);
        let (first, rest) = configured.split_at(half);
        let mut all: Vec<SocketAddr> = first.to_vec();
        for a in self.learned.iter().chain(rest) {
            if all.len() == MAX_CANDIDATES {
                break;
            }
            if !all.contains(a) {
                all.push(*a);
            }
        }
        all
    }

    fn ping(&mut self, to: SocketAddr, now: Instant, node_key: NodePublic) -> DiscoSend {
        self.pings
            .retain(|p| now.duration_since(p.at) < PING_TIMEOUT);
        if self.pings.len() >= MAX_PINGS {
            self.pings.pop_front();
        }
        let tx = tsunagu_disco::new_tx();
        self.pings.push_back(SentPing { tx, to, at: now });
        DiscoSend {
            to,
            msg: Message::Ping {
                tx,
                node_key: Some(node_key),
            },
        }
    }
}

/// A disco message to send to a peer: over UDP, or over the relay when `to` is a relay
/// endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiscoSend {
    pub to: SocketAddr,
    pub msg: Message,
}

impl PathState {
    fn new(
        configured: &[SocketAddr],
        relay: Option<SocketAddr>,
        disco: Option<DiscoPublic>,
        now: Instant,
    ) -> Self {
        // Start on the relay when there is one (it always works). Without one, go
        // straight to the first endpoint, unless disco will find the way (a disco peer
        // is reached directly only at an endpoint that answered).
        let endpoint = match (relay, disco) {
            (Some(r), _) => Some(r),
            (None, Some(_)) => None,
            (None, None) => configured.first().copied(),
        };
        PathState {
            endpoint,
            configured: configured.to_vec(),
            relay,
            last_rx: None,
            last_tx: None,
            last_data: None,
            last_probe: None,
            probe_next: 0,
            since: now,
            disco: disco.map(DiscoPath::new),
        }
    }

    fn on_relay(&self) -> bool {
        self.endpoint.is_none_or(|e| relay_region(&e).is_some())
    }

    fn active(&self, now: Instant) -> bool {
        self.last_data
            .is_some_and(|t| now.duration_since(t) < ACTIVE)
    }

    fn move_to(&mut self, to: SocketAddr, now: Instant, why: &str, key: &NodePublic) {
        if self.endpoint != Some(to) {
            tracing::info!(peer = %key.short(), %to, why, "path");
            self.endpoint = Some(to);
            self.since = now;
            self.last_rx = Some(now);
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

    /// The peer's disco key, if it speaks disco.
    pub fn disco_key(&self) -> Option<DiscoPublic> {
        self.path.lock().disco.as_ref().map(|d| d.key)
    }

    /// An authenticated WireGuard packet came from `addr`. Over the endpoint in use, it
    /// shows the path works. From elsewhere: a peer without disco has roamed there
    /// (WireGuard's rule: follow the latest authenticated source); a disco peer moves
    /// to another *direct* address the same way, but a packet over the relay does not
    /// pull it off a direct path (its sender may simply not have found that path yet).
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
        if p.endpoint == Some(addr) {
            p.last_rx = Some(now);
            return;
        }
        let from_relay = relay_region(&addr).is_some();
        if p.disco.is_some() && from_relay && !p.on_relay() {
            return;
        }
        p.move_to(addr, now, "authenticated packet", &self.key);
    }

    /// An application sent data to this peer (path or not: disco then looks for one).
    /// WireGuard's keepalives and handshakes do not count: an idle peer costs nothing,
    /// not even probes through a relay connection that would otherwise close.
    pub(crate) fn note_data(&self, now: Instant) {
        self.path.lock().last_data = Some(now);
    }

    /// Where the next datagram goes (and whether to probe the direct path too). `data`:
    /// it carries an application's packet ([`PeerState::note_data`] in the same lock).
    pub(crate) fn plan_send(&self, now: Instant, data: bool) -> Option<SendPlan> {
        let mut p = self.path.lock();
        p.last_tx = Some(now);
        if data {
            p.last_data = Some(now);
        }
        let to = p.endpoint?;
        let mut probe = None;
        if p.disco.is_none()
            && relay_region(&to).is_some()
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
            if let Some(d) = p.disco.as_mut() {
                d.latency = None;
                d.last_round = Some(now);
            }
            return Some(relay);
        }
        None
    }

    /// The disco messages due now (`own` is our WireGuard key, which pings carry;
    /// `our_endpoints` what a CallMeMaybe tells the peer):
    /// * on the relay while active: a ping to every candidate endpoint every
    ///   [`DIRECT_PROBE_EVERY`], and a CallMeMaybe over the relay so that the peer pings
    ///   us back at the same time (hole punching);
    /// * on a direct path while active: a heartbeat ping every [`HEARTBEAT`], and a full
    ///   round every [`UPGRADE_EVERY`] in case a better endpoint appeared.
    pub(crate) fn disco_poll(
        &self,
        now: Instant,
        own: NodePublic,
        our_endpoints: &[SocketAddr],
    ) -> Vec<DiscoSend> {
        let mut guard = self.path.lock();
        let p = &mut *guard;
        if !p.active(now) {
            return Vec::new();
        }
        let on_relay = p.on_relay();
        let Some(d) = p.disco.as_mut() else {
            return Vec::new();
        };
        let candidates = d.candidates(&p.configured);
        let due = |last: Option<Instant>, every: Duration| {
            last.is_none_or(|t| now.duration_since(t) >= every)
        };
        let mut out = Vec::new();
        let round_every = if on_relay {
            DIRECT_PROBE_EVERY
        } else {
            UPGRADE_EVERY
        };
        if due(d.last_round, round_every) && !candidates.is_empty() {
            d.last_round = Some(now);
            d.last_heartbeat = Some(now);
            for c in candidates {
                out.push(d.ping(c, now, own));
            }
            if on_relay
                && let Some(r) = p.relay
                && !our_endpoints.is_empty()
                && due(d.last_call, CALL_ME_MAYBE_EVERY)
            {
                d.last_call = Some(now);
                out.push(DiscoSend {
                    to: r,
                    msg: Message::CallMeMaybe {
                        endpoints: our_endpoints.to_vec(),
                    },
                });
            }
        } else if !on_relay
            && let Some(ep) = p.endpoint
            && due(d.last_heartbeat, HEARTBEAT)
        {
            d.last_heartbeat = Some(now);
            out.push(d.ping(ep, now, own));
        }
        out
    }

    /// A disco ping from the peer arrived from `from` (a relay endpoint when it came
    /// over the relay). Answer with a pong to where it came from; a ping over UDP also
    /// shows an address where the peer can be reached: learn it, and while we are on the
    /// relay, ping it back at once.
    pub(crate) fn disco_on_ping(
        &self,
        tx: TxId,
        from: SocketAddr,
        now: Instant,
        own: NodePublic,
    ) -> Vec<DiscoSend> {
        let mut out = vec![DiscoSend {
            to: from,
            msg: Message::Pong { tx, src: from },
        }];
        if relay_region(&from).is_some() {
            return out;
        }
        let mut p = self.path.lock();
        let on_relay = p.on_relay();
        if let Some(d) = p.disco.as_mut() {
            d.learn(from);
            if on_relay
                && !d
                    .pings
                    .iter()
                    .any(|s| s.to == from && now.duration_since(s.at) < Duration::from_millis(500))
            {
                out.push(d.ping(from, now, own));
            }
        }
        out
    }

    /// A disco pong arrived from `from`. It counts only if it answers a ping we sent to
    /// that very address; then that address works both ways: use it when we are on the
    /// relay, or when it is clearly faster than the direct path in use. True when the
    /// path changed.
    pub(crate) fn disco_on_pong(&self, tx: TxId, from: SocketAddr, now: Instant) -> bool {
        let mut p = self.path.lock();
        let on_relay = p.on_relay();
        let endpoint = p.endpoint;
        let Some(d) = p.disco.as_mut() else {
            return false;
        };
        let Some(i) = d.pings.iter().position(|s| s.tx == tx && s.to == from) else {
            return false;
        };
        let sent = d.pings.remove(i).expect("index from position");
        let rtt = now.saturating_duration_since(sent.at);
        if relay_region(&from).is_some() {
            return false; // a ping over the relay measures the relay, it is not a path
        }
        if endpoint == Some(from) {
            d.latency = Some(rtt);
            p.last_rx = Some(now);
            return false;
        }
        let better = on_relay || d.latency.is_none_or(|cur| rtt * 10 < cur * 8);
        if better {
            d.latency = Some(rtt);
            p.move_to(from, now, "disco pong", &self.key);
            return true;
        }
        false
    }

    /// A CallMeMaybe over the relay: the peer just pinged us from `endpoints`; ping them
    /// (and every other candidate) now, so that both NATs open together.
    pub(crate) fn disco_on_call_me_maybe(
        &self,
        endpoints: &[SocketAddr],
        now: Instant,
        own: NodePublic,
    ) -> Vec<DiscoSend> {
        let mut guard = self.path.lock();
        let p = &mut *guard;
        let Some(d) = p.disco.as_mut() else {
            return Vec::new();
        };
        for e in endpoints {
            d.learn(*e);
        }
        if d.last_call_answered
            .is_some_and(|t| now.duration_since(t) < CALL_ME_MAYBE_ANSWER_EVERY)
        {
            return Vec::new();
        }
        d.last_call_answered = Some(now);
        d.last_round = Some(now);
        d.candidates(&p.configured)
            .into_iter()
            .map(|c| d.ping(c, now, own))
            .collect()
    }

    /// Our network changed (new endpoints): probe again at the next tick instead of
    /// waiting out the intervals, and tell the peer where we are now.
    pub(crate) fn disco_reprobe(&self) {
        if let Some(d) = self.path.lock().disco.as_mut() {
            d.last_round = None;
            d.last_call = None;
            d.last_heartbeat = None;
        }
    }

    /// Forget the WireGuard session and what the path learned: the next packet for the
    /// peer starts a new handshake, on the path the map gives.
    pub(crate) fn reset_session(&self, now: Instant) {
        self.tunn.lock().reset();
        let mut p = self.path.lock();
        let disco = p.disco.as_ref().map(|d| d.key);
        let fresh = PathState::new(&p.configured, p.relay, disco, now);
        *p = fresh;
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
    by_disco: HashMap<DiscoPublic, usize>,
    routes: AllowedIps,
    exit: Option<usize>,
    /// What peers may send us: the map's packet filter, our addresses, whether we
    /// forward as exit node.
    filter: Filter,
}

impl PeerTable {
    /// A table without peers.
    pub fn empty(local: Arc<LocalKey>) -> Self {
        PeerTable {
            local,
            entries: Vec::new(),
            by_key: BTreeMap::new(),
            by_disco: HashMap::new(),
            routes: AllowedIps::new(),
            exit: None,
            filter: Filter::default(),
        }
    }

    /// Build the table for `map`, reusing the WireGuard state of peers that `previous`
    /// already had (same key, same local key). The map must be valid
    /// ([`NetMap::validate`]).
    pub fn build(
        map: &NetMap,
        previous: &PeerTable,
        index_table: &IndexTable,
        host: &HostNets,
    ) -> PeerTable {
        let own = map.self_node.private_key.public();
        let same_identity = own.0 == previous.local.public.to_bytes();
        let local = if same_identity {
            previous.local.clone()
        } else {
            Arc::new(LocalKey::new(&map.self_node.private_key))
        };
        let mut entries = Vec::with_capacity(map.peers.len());
        let mut by_key = BTreeMap::new();
        let mut by_disco = HashMap::new();
        let mut routes = AllowedIps::new();
        let mut exit = None;
        for peer in &map.peers {
            let endpoints = usable_endpoints(&peer.endpoints);
            let reused = same_identity
                .then(|| previous.get(&peer.key))
                .flatten()
                .map(|e| e.state.clone());
            let state = match reused {
                Some(state) => {
                    state.tunn.lock().set_persistent_keepalive(peer.keepalive);
                    let relay = peer.relay.map(relay_addr);
                    let mut path = state.path.lock();
                    let disco = path.disco.as_ref().map(|d| d.key);
                    if path.configured != endpoints || path.relay != relay || disco != peer.disco {
                        // The map moved the peer (or it restarted with a new disco
                        // key): follow the map, not what we learned.
                        *path = PathState::new(&endpoints, relay, peer.disco, Instant::now());
                    }
                    drop(path);
                    if disco.is_some() && peer.disco.is_some() && disco != peer.disco {
                        // A new disco key for the same node key: the peer restarted, or
                        // another host now holds its identity (an exit node's standby
                        // host). Its side of our session is gone: start over at once, on
                        // the next packet, instead of after seconds of silence (Tailscale's
                        // clients do the same: `ResetDevicePeer`).
                        state.tunn.lock().reset();
                        *state.reset_at.lock() = Some(Instant::now());
                        tracing::info!(peer = %peer.key.short(), "new disco key: new WireGuard session");
                    }
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
                            &endpoints,
                            peer.relay.map(relay_addr),
                            peer.disco,
                            Instant::now(),
                        )),
                        disco_box: Mutex::new(None),
                        reset_at: Mutex::new(None),
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
            if let Some(d) = peer.disco {
                by_disco.insert(d, idx);
            }
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
            by_disco,
            routes,
            exit,
            filter: Filter::new(
                map.packet_filter.as_deref(),
                &map.self_node.addresses,
                map.self_node.serve_exit.then_some(host),
            )
            .with_peerapi_port(map.self_node.peerapi_port),
        }
    }

    pub fn get(&self, key: &NodePublic) -> Option<&PeerEntry> {
        self.by_key.get(key).map(|&i| &self.entries[i])
    }

    /// The peer with this disco key.
    pub fn by_disco(&self, key: &DiscoPublic) -> Option<&PeerEntry> {
        self.by_disco.get(key).map(|&i| &self.entries[i])
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

    /// Whether a decrypted packet from a peer may go to the TUN ([`Filter::check_in`]).
    pub fn check_in(&self, packet: &[u8], flows: &Flows, now: Instant) -> Verdict {
        self.filter.check_in(packet, flows, now)
    }

    /// Whether we serve as an exit node (what members' connections through and to us
    /// then matter to a handover, [`crate::handover`]).
    pub fn serves_exit(&self) -> bool {
        self.filter.serves_exit()
    }

    /// Whether outgoing packets must be noted for the filter (UDP answers).
    pub fn tracks_flows(&self) -> bool {
        self.filter.tracks_flows()
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
    use gotatun::noise::TunnResult;
    use gotatun::packet::Packet;
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
            disco: None,
        };
        NetMap {
            self_node: SelfNode {
                name: "me".into(),
                private_key: NodePrivate::generate(),
                addresses: vec!["100.64.0.1/32".parse().unwrap()],
                serve_exit: false,
                peerapi_port: None,
            },
            peers: vec![peer("a", "100.64.0.2/32"), peer("b", "100.64.0.3/32")],
            exit_node: None,
            exit_node_allow_lan_access: false,
            exit_node_blocked: false,
            mtu: 1280,
            packet_filter: None,
        }
    }

    fn build(m: &NetMap, prev: Option<&PeerTable>) -> PeerTable {
        let empty = PeerTable::empty(Arc::new(LocalKey::new(&m.self_node.private_key)));
        PeerTable::build(
            m,
            prev.unwrap_or(&empty),
            &IndexTable::from_os_rng(),
            &HostNets::default(),
        )
    }

    /// A WireGuard handshake between our peer entry for `remote` and `remote` itself, so
    /// that the entry has a session.
    fn handshake(t: &PeerTable, remote: &NodePrivate, me: &NodePublic) {
        let state = &t.get(&remote.public()).unwrap().state;
        let them = LocalKey::new(remote);
        let mut responder = Tunn::new(
            them.private.clone(),
            PublicKey::from(me.0),
            None,
            None,
            IndexTable::from_os_rng(),
            them.rate_limiter.clone(),
        );
        let from: SocketAddr = "198.51.100.3:1".parse().unwrap();
        let init: Packet = state
            .tunn
            .lock()
            .format_handshake_initiation(false)
            .unwrap()
            .into();
        let init = them.rate_limiter.verify_packet(from, init).ok().unwrap();
        let resp = match responder.handle_incoming_packet(init) {
            TunnResult::WriteToNetwork(resp) => resp,
            TunnResult::Err(e) => panic!("no handshake response: {e:?}"),
            _ => panic!("no handshake response"),
        };
        let resp: Packet = resp.into();
        let resp = t.local.rate_limiter.verify_packet(from, resp).ok().unwrap();
        let _ = state.tunn.lock().handle_incoming_packet(resp);
        assert!(state.last_handshake().is_some(), "a session");
    }

    #[test]
    fn a_new_disco_key_for_the_same_node_key_starts_a_new_session_at_once() {
        let mut m = map();
        let exit = NodePrivate::generate();
        m.peers[0].key = exit.public();
        m.peers[0].disco = Some(DiscoPublic([1; 32]));
        let me = m.self_node.private_key.public();
        let t1 = build(&m, None);
        handshake(&t1, &exit, &me);
        // Same disco key (a map change elsewhere): the session stays.
        let t2 = build(&m, Some(&t1));
        assert!(t2.entries()[0].state.last_handshake().is_some());
        // Another host took over the identity (or it restarted): a new session.
        m.peers[0].disco = Some(DiscoPublic([2; 32]));
        m.peers[0].endpoints = vec!["198.51.100.6:41641".parse().unwrap()];
        let t3 = build(&m, Some(&t2));
        assert!(
            Arc::ptr_eq(&t3.entries()[0].state, &t2.entries()[0].state),
            "the same peer entry (counters kept)"
        );
        assert!(
            t3.entries()[0].state.last_handshake().is_none(),
            "no session left"
        );
        assert_eq!(
            t3.entries()[0].state.endpoint(),
            None,
            "the path follows the map (disco finds the new host)"
        );
        // A peer that gains a disco key (first map with one) keeps its session.
        let mut m = map();
        m.peers[0].key = exit.public();
        let me = m.self_node.private_key.public();
        let t1 = build(&m, None);
        handshake(&t1, &exit, &me);
        m.peers[0].disco = Some(DiscoPublic([3; 32]));
        let t2 = build(&m, Some(&t1));
        assert!(t2.entries()[0].state.last_handshake().is_some());
    }

    fn disco_peer() -> (PeerTable, SocketAddr, SocketAddr) {
        let mut m = map();
        let direct: SocketAddr = "198.51.100.2:41641".parse().unwrap();
        let lan: SocketAddr = "198.18.2.10:41641".parse().unwrap();
        m.peers[0].endpoints = vec![direct, lan];
        m.peers[0].relay = Some(900);
        m.peers[0].disco = Some(DiscoPublic([4; 32]));
        (build(&m, None), direct, lan)
    }

    fn pings(out: &[DiscoSend]) -> Vec<(SocketAddr, TxId)> {
        out.iter()
            .filter_map(|s| match s.msg {
                Message::Ping { tx, .. } => Some((s.to, tx)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn disco_pings_on_the_relay_and_moves_on_a_matching_pong_only() {
        let (t, direct, lan) = disco_peer();
        let peer = &t.entries()[0].state;
        let own = NodePublic([1; 32]);
        let ours: Vec<SocketAddr> = vec!["198.51.100.3:5000".parse().unwrap()];
        let relay = relay_addr(900);
        let t0 = Instant::now();
        // Idle: nothing to do. Once we send (over the relay; no WireGuard probe copies
        // for a disco peer), a round of pings and a CallMeMaybe over the relay.
        assert!(peer.disco_poll(t0, own, &ours).is_empty());
        peer.plan_send(t0, false).unwrap();
        assert!(
            peer.disco_poll(t0, own, &ours).is_empty(),
            "WireGuard's own packets (keepalives) do not make a peer active"
        );
        peer.note_data(t0);
        let plan = peer.plan_send(t0, false).unwrap();
        assert_eq!((plan.to, plan.probe), (relay, None));
        let out = peer.disco_poll(t0, own, &ours);
        let sent = pings(&out);
        assert_eq!(
            sent.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![direct, lan]
        );
        assert!(out.iter().any(|s| s.to == relay
            && s.msg
                == Message::CallMeMaybe {
                    endpoints: ours.clone()
                }));
        assert!(out.iter().all(|s| match s.msg {
            Message::Ping { node_key, .. } => node_key == Some(own),
            _ => true,
        }));
        assert!(
            peer.disco_poll(t0 + Duration::from_millis(500), own, &ours)
                .is_empty()
        );
        // A pong with an unknown id, or from another address than pinged, is ignored.
        let t1 = t0 + Duration::from_millis(30);
        assert!(!peer.disco_on_pong([0; 12], direct, t1));
        assert!(!peer.disco_on_pong(sent[0].1, lan, t1));
        assert_eq!(peer.endpoint(), Some(relay));
        // The matching pong: direct.
        assert!(peer.disco_on_pong(sent[0].1, direct, t1));
        assert_eq!(peer.endpoint(), Some(direct));
        assert!(
            !peer.disco_on_pong(sent[0].1, direct, t1),
            "a pong counts once"
        );
        // The LAN pong comes later and is not clearly faster: stays.
        assert!(!peer.disco_on_pong(sent[1].1, lan, t0 + Duration::from_millis(40)));
        assert_eq!(peer.endpoint(), Some(direct));
        // A WireGuard packet over the relay does not pull a disco peer off the direct path.
        peer.set_endpoint(relay);
        assert_eq!(peer.endpoint(), Some(direct));
        // Heartbeats on the direct path while active, a full round after UPGRADE_EVERY.
        let hb = t1 + HEARTBEAT;
        peer.note_data(hb);
        peer.plan_send(hb, false);
        let out = peer.disco_poll(hb, own, &ours);
        assert_eq!(
            pings(&out).iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![direct]
        );
        assert!(
            peer.disco_poll(hb + Duration::from_secs(1), own, &ours)
                .is_empty()
        );
        // Our network changed: a heartbeat is due at once, not after HEARTBEAT.
        peer.disco_reprobe();
        let out = peer.disco_poll(hb + Duration::from_secs(1), own, &ours);
        assert_eq!(pings(&out).len(), 2, "a full round right after the change");
        let up = hb + Duration::from_secs(1) + UPGRADE_EVERY;
        peer.note_data(up);
        peer.plan_send(up, false);
        let out = peer.disco_poll(up, own, &ours);
        assert_eq!(
            pings(&out).len(),
            2,
            "all candidates, no CallMeMaybe on a direct path"
        );
        assert_eq!(out.len(), 2);
        // A faster LAN path takes over.
        let lan_tx = pings(&out)[1].1;
        assert!(peer.disco_on_pong(lan_tx, lan, up + Duration::from_micros(100)));
        assert_eq!(peer.endpoint(), Some(lan));
    }

    #[test]
    fn a_peer_listing_thousands_of_endpoints_gets_at_most_32_pings_a_round() {
        let mut m = map();
        // 2,000 third-party addresses, junk among them.
        let mut spray: Vec<SocketAddr> = (0..2000u32)
            .map(|i| {
                let [_, _, a, b] = i.to_be_bytes();
                SocketAddr::from(([203, 0, a, b], 41641))
            })
            .collect();
        spray.insert(0, "0.0.0.0:41641".parse().unwrap());
        spray.insert(1, "224.0.0.1:41641".parse().unwrap());
        spray.insert(2, "198.51.100.2:0".parse().unwrap());
        spray.insert(3, "203.0.0.0:41641".parse().unwrap()); // a duplicate
        m.peers[0].endpoints = spray.clone();
        m.peers[0].relay = Some(900);
        m.peers[0].disco = Some(DiscoPublic([4; 32]));
        let t = build(&m, None);
        let peer = &t.entries()[0].state;
        let own = NodePublic([1; 32]);
        let ours: Vec<SocketAddr> = vec!["198.51.100.3:5000".parse().unwrap()];
        let t0 = Instant::now();
        peer.note_data(t0);
        let sent = pings(&peer.disco_poll(t0, own, &ours));
        assert_eq!(sent.len(), MAX_CANDIDATES);
        assert_eq!(
            sent[0].0,
            "203.0.0.0:41641".parse().unwrap(),
            "junk dropped"
        );
        // The same map again keeps the path state (the kept list compares equal).
        let t2 = build(&m, Some(&t));
        assert!(Arc::ptr_eq(peer, &t2.entries()[0].state));
        assert!(t2.entries()[0].state.disco_poll(t0, own, &ours).is_empty());
        // A CallMeMaybe naming 2,000 more: still at most 32, the learned ones among them.
        let named: Vec<SocketAddr> = (0..2000u32)
            .map(|i| {
                let [_, _, a, b] = i.to_be_bytes();
                SocketAddr::from(([198, 18, a, b], 7))
            })
            .collect();
        let later = t0 + CALL_ME_MAYBE_ANSWER_EVERY;
        let sent = pings(&peer.disco_on_call_me_maybe(&named, later, own));
        assert_eq!(sent.len(), MAX_CANDIDATES);
        assert!(sent.iter().any(|(to, _)| named.contains(to)));
        assert!(sent.iter().any(|(to, _)| spray.contains(to)));
        let next = later + DIRECT_PROBE_EVERY;
        peer.note_data(next);
        assert_eq!(
            pings(&peer.disco_poll(next, own, &ours)).len(),
            MAX_CANDIDATES
        );
        assert_eq!(usable_endpoints(&spray).len(), MAX_CONFIGURED);
    }

    #[test]
    fn disco_answers_pings_learns_their_source_and_follows_call_me_maybe() {
        let (t, direct, _) = disco_peer();
        let peer = &t.entries()[0].state;
        let own = NodePublic([1; 32]);
        let now = Instant::now();
        // A ping over the relay: a pong over the relay, nothing learned.
        let out = peer.disco_on_ping([5; 12], relay_addr(900), now, own);
        assert_eq!(
            out,
            vec![DiscoSend {
                to: relay_addr(900),
                msg: Message::Pong {
                    tx: [5; 12],
                    src: relay_addr(900)
                }
            }]
        );
        // A ping from an address the map does not list (a symmetric NAT's port): pong
        // there, and ping it back at once while on the relay.
        let odd: SocketAddr = "198.51.100.3:61000".parse().unwrap();
        let out = peer.disco_on_ping([6; 12], odd, now, own);
        assert_eq!(
            out[0],
            DiscoSend {
                to: odd,
                msg: Message::Pong {
                    tx: [6; 12],
                    src: odd
                }
            }
        );
        let back = pings(&out);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0, odd);
        assert!(peer.disco_on_pong(back[0].1, odd, now + Duration::from_millis(1)));
        assert_eq!(peer.endpoint(), Some(odd));
        // CallMeMaybe: ping the endpoints it names and the known ones, now.
        let (t2, _, _) = disco_peer();
        let p2 = &t2.entries()[0].state;
        let named: SocketAddr = "198.51.100.9:7".parse().unwrap();
        let out = p2.disco_on_call_me_maybe(&[named], now, own);
        let to: Vec<SocketAddr> = pings(&out).iter().map(|p| p.0).collect();
        assert!(to.contains(&named) && to.contains(&direct), "{to:?}");
        // Another one right after: learned, not answered with pings.
        let other: SocketAddr = "198.51.100.9:8".parse().unwrap();
        let soon = now + Duration::from_millis(100);
        assert!(p2.disco_on_call_me_maybe(&[other], soon, own).is_empty());
        let later = now + CALL_ME_MAYBE_ANSWER_EVERY;
        let to: Vec<SocketAddr> = pings(&p2.disco_on_call_me_maybe(&[], later, own))
            .iter()
            .map(|p| p.0)
            .collect();
        assert!(
            to.contains(&other),
            "learned from the unanswered one: {to:?}"
        );
    }

    #[test]
    fn disco_direct_path_silent_goes_back_to_the_relay_and_map_change_resets() {
        let (t, direct, _) = disco_peer();
        let peer = &t.entries()[0].state;
        let own = NodePublic([1; 32]);
        let now = Instant::now();
        peer.note_data(now);
        peer.plan_send(now, false);
        let tx = pings(&peer.disco_poll(now, own, &[]))[0].1;
        assert!(peer.disco_on_pong(tx, direct, now));
        let later = now + DIRECT_SILENCE + Duration::from_millis(10);
        peer.note_data(later);
        peer.plan_send(later, false);
        assert_eq!(peer.check_path(later), Some(relay_addr(900)));
        // No relay and disco: no path until a pong (never a blind send).
        let mut m = map();
        m.peers[0].disco = Some(DiscoPublic([4; 32]));
        let t2 = build(&m, None);
        assert_eq!(t2.entries()[0].state.endpoint(), None);
        // The peer restarts with a new disco key: the path starts over.
        let mut m3 = map();
        m3.peers[0].disco = Some(DiscoPublic([4; 32]));
        m3.peers[0].relay = Some(900);
        let a = build(&m3, None);
        let tx = {
            let p = &a.entries()[0].state;
            p.note_data(now);
            p.plan_send(now, false);
            pings(&p.disco_poll(now, own, &[]))[0].1
        };
        assert!(
            a.entries()[0]
                .state
                .disco_on_pong(tx, m3.peers[0].endpoints[0], now)
        );
        m3.peers[0].disco = Some(DiscoPublic([5; 32]));
        let b = build(&m3, Some(&a));
        assert_eq!(b.entries()[0].state.endpoint(), Some(relay_addr(900)));
        assert_eq!(b.entries()[0].state.disco_key(), Some(DiscoPublic([5; 32])));
        assert!(b.by_disco(&DiscoPublic([5; 32])).is_some());
        assert!(b.by_disco(&DiscoPublic([4; 32])).is_none());
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
        let plan = peer.plan_send(t0, false).unwrap();
        assert_eq!((plan.to, plan.probe), (relay, Some(direct)));
        let plan = peer
            .plan_send(t0 + Duration::from_millis(500), false)
            .unwrap();
        assert_eq!((plan.to, plan.probe), (relay, None));
        let plan = peer.plan_send(t0 + DIRECT_PROBE_EVERY, false).unwrap();
        assert_eq!(plan.probe, Some(direct), "probes again after the interval");
        // The peer answers directly: direct from now on, no more probes.
        peer.set_endpoint(direct);
        let now = Instant::now();
        let plan = peer.plan_send(now, false).unwrap();
        assert_eq!((plan.to, plan.probe), (direct, None));
        assert_eq!(peer.check_path(now), None, "not silent yet");
        // We keep sending, the peer goes silent: back to the relay.
        let later = now + DIRECT_SILENCE + Duration::from_millis(100);
        peer.plan_send(later, false).unwrap();
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
        p2.plan_send(Instant::now(), false).unwrap();
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
