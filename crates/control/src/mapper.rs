//! The mapper: what each node is told about the tailnet. Pure functions over an
//! immutable [`Snapshot`], so they are tested without a network or a database.
//!
//! * [`full_map`]: the first message of a map stream (self, peers, filter, DERP map,
//!   user profiles).
//! * [`SessionView::delta`]: later messages. A session remembers which peers it has sent
//!   (a bit per node) and the version it is at, plus fingerprints of the filter and self
//!   node; given the node IDs that changed since, it sends only `PeersChanged` (new peers,
//!   or peers whose view changed after that version, complete), `PeersRemoved` (gone or
//!   no longer visible), a new `PacketFilter` and a new self `Node` when they differ.
//!   Work per change is proportional to the nodes that changed, not to the tailnet.
//!
//! What makes that cheap with thousands of sessions: peers are serialized once per
//! change of the node ([`PeerEntry`], kept across snapshots), filters once per class of
//! viewers with equal filters ([`FilterEntry`]), and a message is assembled by splicing
//! that JSON ([`MapMessage::to_json`]). Deltas that are identical for many sessions (a
//! new node, seen the same way by everyone) carry a [`ShareKey`]: the session shell
//! encodes and compresses such a message once per snapshot.
//!
//! Exit nodes: a peer's `0.0.0.0/0` and `::/0` appear in its `AllowedIPs` only when the
//! admin (or `autoApprovers.exitNode`) approved them **and** the viewer's policy lets it
//! use `autogroup:internet`; clients offer a peer as exit node only when both are there.

use crate::state::{NodeEntry, Snapshot};
use bytes::Bytes;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use tsunagu_policy::FilterClass;
use tsunagu_proto::tailcfg::{
    DERPMap, FilterRule, MapResponse, NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION, NetPortRange,
    Node, NodeID, PortRange, StableNodeID, Time, UserID, UserProfile,
};

/// The user ID Tailscale's clients show as `tagged-devices` for tagged nodes.
pub const TAGGED_DEVICES_USER_ID: i64 = 2_147_455_555;
pub const TAGGED_DEVICES_LOGIN: &str = "tagged-devices";

pub fn is_default_route(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// Endpoints per node, at most: what the server keeps of a map request and announces
/// to peers. Real nodes have a handful (STUN's, LAN addresses, IPv6); every peer that
/// talks to a node pings each of them, so a node listing thousands of third-party
/// addresses would turn the tailnet into a ping sprayer.
pub const MAX_ENDPOINTS: usize = 32;

/// Why a subnet route is never approved nor announced, if it is one of those: routes
/// overlapping the tailnet's own ranges would take peers' tailnet traffic (or the
/// tailnet addresses' place in the clients' routing). Exit routes (`/0`) are not subnet
/// routes and are decided apart.
pub fn refused_route(r: &IpNet) -> Option<&'static str> {
    if is_default_route(r) {
        return None;
    }
    let tailnet = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
        .iter()
        .filter_map(|t| t.parse::<IpNet>().ok())
        .any(|t| t.contains(r) || r.contains(&t));
    tailnet.then_some("overlaps the tailnet's addresses (100.64.0.0/10, fd7a:115c:a1e0::/48)")
}

/// The subnet routes a node offers (approved, still advertised, not refused).
fn offered_routes(n: &tsunagu_store::Node) -> impl Iterator<Item = IpNet> + '_ {
    n.approved_routes
        .iter()
        .filter(|r| !is_default_route(r) && refused_route(r).is_none())
        .filter(|r| n.advertised_routes.contains(r))
        .copied()
}

/// Which node routes each subnet prefix offered by several: the online one with the
/// lowest node ID (the oldest node), or the lowest ID when none is online. Peers are
/// told each prefix once, by its owner (a second router takes over when the first goes
/// offline or withdraws it), so no client ever sees the same prefix twice.
pub fn route_owners(nodes: &BTreeMap<i64, Arc<NodeEntry>>) -> BTreeMap<i64, Vec<IpNet>> {
    let mut owner: BTreeMap<IpNet, (i64, bool)> = BTreeMap::new();
    // In ID order: the first node keeps a prefix unless an online one comes later.
    for (id, e) in nodes {
        for r in offered_routes(&e.node) {
            let cur = owner.entry(r).or_insert((*id, e.online));
            if !cur.1 && e.online {
                *cur = (*id, true);
            }
        }
    }
    let mut by_node: BTreeMap<i64, Vec<IpNet>> = BTreeMap::new();
    for (r, (id, _)) in owner {
        by_node.entry(id).or_default().push(r);
    }
    by_node
}

/// The UserID a node is shown with.
pub fn node_user_id(entry: &NodeEntry) -> i64 {
    entry.node.user_id.unwrap_or(TAGGED_DEVICES_USER_ID)
}

/// A node as `viewer_may_use_exit` sees it (a peer), or as itself (`is_self`).
pub fn node_view(
    snap: &Snapshot,
    entry: &NodeEntry,
    viewer_may_use_exit: bool,
    is_self: bool,
) -> Node {
    let routes = snap
        .peers
        .get(&entry.node.id)
        .map(|p| p.routes.as_slice())
        .unwrap_or_default();
    let mut node = build_node(&snap.domain, entry, routes, viewer_may_use_exit, is_self);
    node.expired = entry.node.is_expired(snap.now);
    if is_self {
        // Captive-portal detection probes DERP servers over plain HTTP: Tailscale's public
        // ones (the client's built-in list) when we announce none, and port 80 of ours
        // otherwise, which the relay does not serve unless `CanPort80`. Turn it off.
        node.cap_map.insert(
            NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION.to_string(),
            Vec::new(),
        );
    }
    node
}

/// What [`node_view`] shows, except what depends on the time (`Expired`) or the DERP map.
/// `routes`: the subnet routes this node is the one to route ([`route_owners`]).
fn build_node(
    domain: &str,
    entry: &NodeEntry,
    routes: &[IpNet],
    viewer_may_use_exit: bool,
    is_self: bool,
) -> Node {
    let n = &entry.node;
    let addresses: Vec<IpNet> = vec![
        IpNet::from(std::net::IpAddr::V4(n.ipv4)),
        IpNet::from(std::net::IpAddr::V6(n.ipv6)),
    ];
    let mut allowed = addresses.clone();
    for route in &n.approved_routes {
        // Approved but no longer advertised: not routed.
        if is_default_route(route)
            && n.advertised_routes.contains(route)
            && (viewer_may_use_exit || is_self)
        {
            allowed.push(*route);
        }
    }
    allowed.extend_from_slice(routes);
    let primary = routes.to_vec();
    let hostinfo = serde_json::from_value(n.hostinfo.clone()).unwrap_or_default();
    let mut node = Node {
        id: NodeID(n.id),
        stable_id: StableNodeID(format!("n{}", n.id)),
        name: format!("{}.{}.", n.given_name, domain),
        user: UserID(node_user_id(entry)),
        key: n.node_key.parse().unwrap_or_default(),
        key_expiry: n.expiry.map(Time).unwrap_or(Time::ZERO),
        machine: n.machine_key.parse().unwrap_or_default(),
        disco_key: n.disco_key.parse().unwrap_or_default(),
        addresses,
        allowed_ips: Some(allowed),
        endpoints: n
            .endpoints
            .iter()
            .filter_map(|e| e.parse().ok())
            .take(MAX_ENDPOINTS)
            .collect(),
        hostinfo,
        created: Time(n.created_at),
        cap: entry.capver,
        tags: n.tags.clone(),
        primary_routes: primary,
        online: Some(entry.online),
        last_seen: if entry.online {
            None
        } else {
            n.last_seen.map(Time)
        },
        machine_authorized: n.authorized,
        ..Node::default()
    };
    node.set_home_derp(entry.home_derp);
    node
}

/// The DERP map to send: none while the server has no regions.
///
/// To a Go client a present but empty map does not mean "no relays": for captive-portal
/// probes its netcheck then falls back to the DERP list built into the client, i.e. HTTP
/// to Tailscale's public relays (`captivedetection.availableEndpoints`), at start and on
/// every full netcheck. With no map, magicsock keeps DERP off and skips netcheck
/// (`magicsock.Conn.updateNetInfo`). The price: it then reports no endpoints either
/// (`Conn.setEndpoints` drops STUN-less updates until a map arrives), so Go peers cannot
/// reach each other until the server announces a relay region.
fn derp_map(snap: &Snapshot) -> Option<DERPMap> {
    (!snap.derp_map.regions.is_empty()).then(|| snap.derp_map.clone())
}

/// The packet filter for `viewer`, in the wire form.
pub fn packet_filter(snap: &Snapshot, viewer: i64) -> Vec<FilterRule> {
    snap.compiled
        .filter(viewer)
        .into_iter()
        .map(|r| FilterRule {
            src_ips: r.src_ips,
            dst_ports: r
                .dst_ports
                .into_iter()
                .map(|d| NetPortRange {
                    ip: d.ip,
                    ports: PortRange {
                        first: d.first,
                        last: d.last,
                    },
                    ..NetPortRange::default()
                })
                .collect(),
            ip_proto: r.ip_proto.into_iter().map(i32::from).collect(),
            ..FilterRule::default()
        })
        .collect()
}

/// Peers `viewer` sees: visible by policy, authorized and not expired.
fn visible_peers(snap: &Snapshot, viewer: i64) -> BTreeSet<i64> {
    snap.compiled
        .visible_peers(viewer)
        .into_iter()
        .filter(|id| {
            snap.nodes
                .get(id)
                .is_some_and(|e| e.node.authorized && !e.node.is_expired(snap.now))
        })
        .collect()
}

fn user_profiles(snap: &Snapshot, ids: impl IntoIterator<Item = i64>) -> Vec<UserProfile> {
    let mut out = BTreeMap::new();
    for uid in ids {
        if uid == TAGGED_DEVICES_USER_ID {
            out.insert(
                uid,
                UserProfile {
                    id: UserID(uid),
                    login_name: TAGGED_DEVICES_LOGIN.into(),
                    display_name: "Tagged Devices".into(),
                    ..UserProfile::default()
                },
            );
        } else if let Some(u) = snap.users.get(&uid) {
            out.insert(
                uid,
                UserProfile {
                    id: UserID(uid),
                    login_name: u.name.clone(),
                    display_name: u.name.clone(),
                    ..UserProfile::default()
                },
            );
        }
    }
    out.into_values().collect()
}

/// A node as its peers see it, serialized once and shared by every session and every
/// snapshot until the node changes. Peer views do not depend on the time: an expired
/// node is shown to no one, so every view carries `Expired: false`.
#[derive(Debug)]
pub struct PeerEntry {
    pub id: i64,
    /// The UserID the node is shown with.
    pub user: i64,
    /// JSON of the node without its exit routes.
    json: Bytes,
    /// JSON with its approved exit routes, for viewers that may use exit nodes; `None`
    /// when it has none (`json` serves everyone).
    json_exit: Option<Bytes>,
    /// Snapshot version at which the JSON last changed: a session at a later version has
    /// sent this very JSON already (if the peer was visible to it).
    pub changed: u64,
    /// The cache entry it was built from: the same `Arc` means nothing to rebuild.
    source: Arc<NodeEntry>,
    /// The subnet routes it was built with (those it owns, see [`route_owners`]).
    pub routes: Vec<IpNet>,
}

impl PeerEntry {
    fn build(
        domain: &str,
        source: &Arc<NodeEntry>,
        routes: Vec<IpNet>,
        version: u64,
    ) -> serde_json::Result<Self> {
        let plain = build_node(domain, source, &routes, false, false);
        let json = Bytes::from(serde_json::to_vec(&plain)?);
        let has_exit = source
            .node
            .approved_routes
            .iter()
            .any(|r| is_default_route(r) && source.node.advertised_routes.contains(r));
        let json_exit = if has_exit {
            let with = build_node(domain, source, &routes, true, false);
            Some(Bytes::from(serde_json::to_vec(&with)?))
        } else {
            None
        };
        Ok(PeerEntry {
            id: source.node.id,
            user: node_user_id(source),
            json,
            json_exit,
            changed: version,
            source: source.clone(),
            routes,
        })
    }

    /// The JSON a viewer with `may_use_exit` gets.
    pub fn json(&self, may_use_exit: bool) -> &Bytes {
        match (&self.json_exit, may_use_exit) {
            (Some(j), true) => j,
            _ => &self.json,
        }
    }

    fn same_views(&self, other: &PeerEntry) -> bool {
        self.json == other.json && self.json_exit == other.json_exit && self.user == other.user
    }
}

/// The peer views of a new snapshot: `prev`'s, with the nodes in `changed` (or all of
/// them, for `None`) rebuilt when their cache entry is a new one, and the nodes whose
/// subnet routes moved to or from them ([`route_owners`]: another router of the same
/// prefix came, went or changed state). An entry whose JSON came out the same keeps its
/// old `changed` version. Also returns the nodes rebuilt for moved routes alone, which
/// the change log must list too.
pub fn update_peers(
    prev: &BTreeMap<i64, Arc<PeerEntry>>,
    nodes: &BTreeMap<i64, Arc<NodeEntry>>,
    changed: Option<&BTreeSet<i64>>,
    domain: &str,
    version: u64,
) -> (BTreeMap<i64, Arc<PeerEntry>>, BTreeSet<i64>) {
    let mut out = prev.clone();
    let mut owners = route_owners(nodes);
    let mut ids: BTreeSet<i64> = match changed {
        Some(ids) => ids.clone(),
        None => nodes.keys().chain(prev.keys()).copied().collect(),
    };
    // Routers whose routes are not what their entry was built with.
    let mut moved = BTreeSet::new();
    for (id, e) in prev.iter().filter(|(_, e)| !e.routes.is_empty()) {
        if owners.get(id) != Some(&e.routes) && ids.insert(*id) {
            moved.insert(*id);
        }
    }
    for (id, r) in &owners {
        if prev.get(id).is_some_and(|e| e.routes != *r) && ids.insert(*id) {
            moved.insert(*id);
        }
    }
    for id in ids {
        let Some(source) = nodes.get(&id) else {
            out.remove(&id);
            continue;
        };
        let routes = owners.remove(&id).unwrap_or_default();
        let old = out.get(&id);
        if old.is_some_and(|o| Arc::ptr_eq(&o.source, source) && o.routes == routes) {
            continue;
        }
        if moved.contains(&id) {
            tracing::info!(
                node = id,
                ?routes,
                "subnet routes moved: this node routes them now"
            );
        }
        let mut entry = match PeerEntry::build(domain, source, routes, version) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(node = id, "serializing a peer: {e}");
                out.remove(&id);
                continue;
            }
        };
        if let Some(o) = old
            && o.same_views(&entry)
        {
            entry.changed = o.changed;
        }
        out.insert(id, Arc::new(entry));
    }
    (out, moved)
}

/// A packet filter, in wire form and serialized, shared by a class of viewers
/// ([`tsunagu_policy::FilterClass`]) within a snapshot.
#[derive(Debug)]
pub struct FilterEntry {
    json: Bytes,
    fp: u64,
}

fn filter_entry(snap: &Snapshot, viewer: i64) -> (Arc<FilterEntry>, FilterClass) {
    let class = snap.compiled.filter_class(viewer);
    let shared = !matches!(class, FilterClass::Node(_));
    if shared && let Some(f) = snap.filters.lock().get(&class) {
        return (f.clone(), class);
    }
    let json = serde_json::to_vec(&packet_filter(snap, viewer)).unwrap_or_else(|_| b"[]".to_vec());
    let mut h = DefaultHasher::new();
    json.hash(&mut h);
    let entry = Arc::new(FilterEntry {
        fp: h.finish(),
        json: Bytes::from(json),
    });
    if shared {
        snap.filters.lock().insert(class.clone(), entry.clone());
    }
    (entry, class)
}

fn fingerprint<T: serde::Serialize>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(v).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// A set of node IDs in 64-ID blocks: a session's record of the peers it has sent costs
/// about a bit per node of the tailnet, not a tree node per peer.
#[derive(Debug, Default, Clone)]
struct IdSet(BTreeMap<i64, u64>);

impl IdSet {
    fn split(id: i64) -> (i64, u64) {
        (id.div_euclid(64), 1u64 << id.rem_euclid(64))
    }
    /// Whether it was absent.
    fn insert(&mut self, id: i64) -> bool {
        let (b, m) = Self::split(id);
        let w = self.0.entry(b).or_insert(0);
        let was = *w & m != 0;
        *w |= m;
        !was
    }
    /// Whether it was present.
    fn remove(&mut self, id: i64) -> bool {
        let (b, m) = Self::split(id);
        match self.0.get_mut(&b) {
            Some(w) if *w & m != 0 => {
                *w &= !m;
                if *w == 0 {
                    self.0.remove(&b);
                }
                true
            }
            _ => false,
        }
    }
    fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.iter().flat_map(|(&b, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = i64::from(w.trailing_zeros());
                w &= w - 1;
                Some(b * 64 + bit)
            })
        })
    }
}

/// What makes two sessions' deltas identical within one snapshot: then the message is
/// serialized and compressed once and the bytes shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareKey {
    changed: Vec<(i64, bool)>,
    removed: Vec<i64>,
    filter: Option<FilterClass>,
    users: Vec<i64>,
}

/// One map message: a [`MapResponse`] for everything but the peer lists and the packet
/// filter, which are spliced in as the shared JSON they already are.
#[derive(Debug)]
pub struct MapMessage {
    pub response: MapResponse,
    peers: Option<Vec<Bytes>>,
    peers_changed: Vec<Bytes>,
    filter: Option<Arc<FilterEntry>>,
    /// IDs of the peers in `Peers` or `PeersChanged` (for logs).
    pub peer_ids: Vec<i64>,
    /// Set when every session with the same key sends exactly this message.
    pub share: Option<ShareKey>,
}

impl MapMessage {
    /// The message as JSON (field order differs from a serialized [`MapResponse`]; JSON
    /// objects are unordered).
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut out = serde_json::to_vec(&self.response)?;
        // A serialized struct is an object: `{...}`.
        out.pop();
        let mut first = out.len() == 1;
        let mut field = |out: &mut Vec<u8>, name: &str| {
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
        };
        let list = |out: &mut Vec<u8>, items: &[Bytes]| {
            out.push(b'[');
            for (i, j) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(j);
            }
            out.push(b']');
        };
        if let Some(peers) = &self.peers {
            field(&mut out, "Peers");
            list(&mut out, peers);
        }
        if !self.peers_changed.is_empty() {
            field(&mut out, "PeersChanged");
            list(&mut out, &self.peers_changed);
        }
        if let Some(f) = &self.filter {
            field(&mut out, "PacketFilter");
            out.extend_from_slice(&f.json);
        }
        out.push(b'}');
        Ok(out)
    }

    /// The message as Tailscale's type (tests and tools; the server sends [`Self::to_json`]).
    pub fn to_response(&self) -> serde_json::Result<MapResponse> {
        serde_json::from_slice(&self.to_json()?)
    }
}

/// What a session has told its client so far.
#[derive(Debug, Default)]
pub struct SessionView {
    pub viewer: i64,
    /// Snapshot version the view is at.
    pub version: u64,
    /// Peers sent and not removed since.
    sent: IdSet,
    sent_filter: u64,
    sent_self: u64,
    sent_users: BTreeSet<i64>,
    sent_dns: u64,
    may_use_exit: bool,
}

impl SessionView {
    pub fn new(viewer: i64) -> Self {
        SessionView {
            viewer,
            ..SessionView::default()
        }
    }

    /// The complete map (first message of a stream, or a non-streaming answer).
    pub fn full_map(&mut self, snap: &Snapshot) -> Option<MapMessage> {
        let me = snap.nodes.get(&self.viewer)?;
        self.may_use_exit = snap.compiled.may_use_exit_nodes(self.viewer);
        let self_node = node_view(snap, me, false, true);
        let mut peers = Vec::new();
        let mut peer_ids = Vec::new();
        let mut users = BTreeSet::from([self_node.user.0]);
        self.sent = IdSet::default();
        for id in visible_peers(snap, self.viewer) {
            if let Some(p) = snap.peers.get(&id) {
                self.sent.insert(id);
                peers.push(p.json(self.may_use_exit).clone());
                peer_ids.push(id);
                users.insert(p.user);
            }
        }
        let (filter, _) = filter_entry(snap, self.viewer);
        self.sent_filter = filter.fp;
        self.sent_self = fingerprint(&self_node);
        self.sent_users = users.clone();
        self.sent_dns = fingerprint(&snap.dns);
        self.version = snap.version;
        Some(MapMessage {
            response: MapResponse {
                node: Some(self_node),
                derp_map: derp_map(snap),
                user_profiles: user_profiles(snap, users),
                domain: snap.domain.clone(),
                dns_config: snap.dns.as_deref().cloned(),
                collect_services: Some(false),
                control_time: Some(Time::now()),
                ..MapResponse::default()
            },
            peers: Some(peers),
            peers_changed: Vec::new(),
            filter: Some(filter),
            peer_ids,
            share: None,
        })
    }

    /// The changes since the view's version, given the IDs of nodes that changed
    /// (`None`: anything may have changed, e.g. the policy). `None` when there is nothing
    /// to send. After a `None` from `snap.nodes` for the viewer itself the session should end.
    pub fn delta(
        &mut self,
        snap: &Snapshot,
        changed: Option<&BTreeSet<i64>>,
    ) -> Option<MapMessage> {
        let me = snap.nodes.get(&self.viewer)?;
        let may_use_exit = snap.compiled.may_use_exit_nodes(self.viewer);
        let exit_permission_changed = may_use_exit != self.may_use_exit;
        self.may_use_exit = may_use_exit;
        // When only some peers changed (and neither the viewer nor its exit permission),
        // only their visibility can have changed: check them pairwise, in time
        // proportional to the change. Otherwise recompute the whole visible set.
        let partial = match changed {
            Some(ids) if !exit_permission_changed && !ids.contains(&self.viewer) => Some(ids),
            _ => None,
        };
        let (candidates, visible): (Vec<i64>, Option<BTreeSet<i64>>) = match partial {
            Some(ids) => (ids.iter().copied().collect(), None),
            None => {
                let visible = visible_peers(snap, self.viewer);
                let mut all: Vec<i64> = visible.iter().copied().chain(self.sent.iter()).collect();
                all.sort_unstable();
                all.dedup();
                (all, Some(visible))
            }
        };
        let mut peers_changed = Vec::new();
        let mut changed_ids = Vec::new();
        let mut removed = Vec::new();
        for id in candidates {
            let is_visible = match &visible {
                Some(v) => v.contains(&id),
                None => {
                    snap.compiled.can_see(self.viewer, id)
                        && snap
                            .nodes
                            .get(&id)
                            .is_some_and(|e| e.node.authorized && !e.node.is_expired(snap.now))
                }
            };
            match (is_visible, snap.peers.get(&id)) {
                (true, Some(p)) => {
                    let new = self.sent.insert(id);
                    let variant_changed = exit_permission_changed && p.json_exit.is_some();
                    if new || p.changed > self.version || variant_changed {
                        peers_changed.push(p.json(may_use_exit).clone());
                        changed_ids.push((id, may_use_exit && p.json_exit.is_some()));
                    }
                }
                _ => {
                    if self.sent.remove(id) {
                        removed.push(id);
                    }
                }
            }
        }
        // The self node and the DNS settings change only with a change of everything
        // (a reload) or of the viewer itself.
        let mut self_node = None;
        let mut dns = None;
        if partial.is_none() {
            let fp = fingerprint(&snap.dns);
            if fp != self.sent_dns {
                self.sent_dns = fp;
                dns = Some(snap.dns.as_deref().cloned().unwrap_or_default());
            }
            let node = node_view(snap, me, false, true);
            let fp = fingerprint(&node);
            if fp != self.sent_self {
                self.sent_self = fp;
                self_node = Some(node);
            }
        }
        let (filter, class) = filter_entry(snap, self.viewer);
        let filter = (filter.fp != self.sent_filter).then(|| {
            self.sent_filter = filter.fp;
            filter
        });
        let new_users: Vec<i64> = changed_ids
            .iter()
            .filter_map(|(id, _)| snap.peers.get(id).map(|p| p.user))
            .filter(|u| self.sent_users.insert(*u))
            .collect();
        self.version = snap.version;
        if peers_changed.is_empty()
            && removed.is_empty()
            && self_node.is_none()
            && filter.is_none()
            && dns.is_none()
        {
            return None;
        }
        let shareable = self_node.is_none()
            && dns.is_none()
            && (filter.is_none() || !matches!(class, FilterClass::Node(_)));
        let share = shareable.then(|| ShareKey {
            changed: changed_ids.clone(),
            removed: removed.clone(),
            filter: filter.as_ref().map(|_| class),
            users: new_users.clone(),
        });
        Some(MapMessage {
            response: MapResponse {
                node: self_node,
                dns_config: dns,
                peers_removed: removed.into_iter().map(NodeID).collect(),
                user_profiles: user_profiles(snap, new_users),
                // The snapshot's time, so that shared messages are equal.
                control_time: Some(Time(snap.now)),
                ..MapResponse::default()
            },
            peers: None,
            peers_changed,
            filter,
            peer_ids: changed_ids.into_iter().map(|(id, _)| id).collect(),
            share,
        })
    }
}
