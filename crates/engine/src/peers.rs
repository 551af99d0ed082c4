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
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
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
    /// Where we send to. Configured from the map, then follows the peer when it roams
    /// (updated from every authenticated packet, as WireGuard does).
    endpoint: Mutex<Option<SocketAddr>>,
    /// The endpoints the map gave the last time, to tell a map change from roaming.
    configured: Mutex<Vec<SocketAddr>>,
    pub counters: PeerCounters,
}

impl PeerState {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.lock()
    }

    pub(crate) fn set_endpoint(&self, addr: SocketAddr) {
        let mut ep = self.endpoint.lock();
        if *ep != Some(addr) {
            tracing::debug!(peer = %self.key.short(), %addr, "endpoint");
            *ep = Some(addr);
        }
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
                    let mut configured = state.configured.lock();
                    if *configured != peer.endpoints {
                        // The map moved the peer: follow the map, not what we learned.
                        *state.endpoint.lock() = peer.endpoints.first().copied();
                        configured.clone_from(&peer.endpoints);
                    }
                    drop(configured);
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
                        endpoint: Mutex::new(peer.endpoints.first().copied()),
                        configured: Mutex::new(peer.endpoints.clone()),
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
