//! The mapper: what each node is told about the tailnet. Pure functions over an
//! immutable [`Snapshot`], so they are tested without a network or a database.
//!
//! * [`full_map`]: the first message of a map stream (self, peers, filter, DERP map,
//!   user profiles).
//! * [`SessionView::delta`]: later messages. A session remembers a fingerprint of each
//!   peer and of the filter it last sent; given the node IDs that changed since, it sends
//!   only `PeersChanged` (new or different peers, complete), `PeersRemoved` (gone or no
//!   longer visible), a new `PacketFilter` and a new self `Node` when they differ.
//!   Work per change is proportional to the nodes that changed, not to the tailnet.
//!
//! Exit nodes: a peer's `0.0.0.0/0` and `::/0` appear in its `AllowedIPs` only when the
//! admin (or `autoApprovers.exitNode`) approved them **and** the viewer's policy lets it
//! use `autogroup:internet`; clients offer a peer as exit node only when both are there.

use crate::state::{NodeEntry, Snapshot};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
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
    let n = &entry.node;
    let addresses: Vec<IpNet> = vec![
        IpNet::from(std::net::IpAddr::V4(n.ipv4)),
        IpNet::from(std::net::IpAddr::V6(n.ipv6)),
    ];
    let mut allowed = addresses.clone();
    let mut primary = Vec::new();
    for route in &n.approved_routes {
        if !n.advertised_routes.contains(route) {
            continue; // approved but no longer advertised: not routed
        }
        if is_default_route(route) {
            if viewer_may_use_exit || is_self {
                allowed.push(*route);
            }
        } else {
            allowed.push(*route);
            primary.push(*route);
        }
    }
    let hostinfo = serde_json::from_value(n.hostinfo.clone()).unwrap_or_default();
    let mut node = Node {
        id: NodeID(n.id),
        stable_id: StableNodeID(format!("n{}", n.id)),
        name: format!("{}.{}.", n.given_name, snap.domain),
        user: UserID(node_user_id(entry)),
        key: n.node_key.parse().unwrap_or_default(),
        key_expiry: n.expiry.map(Time).unwrap_or(Time::ZERO),
        machine: n.machine_key.parse().unwrap_or_default(),
        disco_key: n.disco_key.parse().unwrap_or_default(),
        addresses,
        allowed_ips: Some(allowed),
        endpoints: n.endpoints.iter().filter_map(|e| e.parse().ok()).collect(),
        hostinfo,
        created: Time(n.created_at),
        tags: n.tags.clone(),
        primary_routes: primary,
        online: Some(entry.online),
        last_seen: if entry.online {
            None
        } else {
            n.last_seen.map(Time)
        },
        machine_authorized: n.authorized,
        expired: n.is_expired(snap.now),
        ..Node::default()
    };
    node.set_home_derp(entry.home_derp);
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

/// The view of peer `entry` for viewers with `may_use_exit`, built once per snapshot.
fn peer_view(snap: &Snapshot, entry: &NodeEntry, may_use_exit: bool) -> crate::state::PeerView {
    let key = (entry.node.id, may_use_exit);
    if let Some(v) = snap.peer_views.lock().get(&key) {
        return v.clone();
    }
    let node = node_view(snap, entry, may_use_exit, false);
    let fp = fingerprint(&node);
    let v = (std::sync::Arc::new(node), fp);
    snap.peer_views.lock().insert(key, v.clone());
    v
}

fn fingerprint<T: serde::Serialize>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(v).unwrap_or_default().hash(&mut h);
    h.finish()
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

/// What a session has told its client so far.
#[derive(Debug, Default)]
pub struct SessionView {
    pub viewer: i64,
    /// Snapshot version the view is at.
    pub version: u64,
    sent_peers: BTreeMap<i64, u64>,
    sent_filter: u64,
    sent_self: u64,
    sent_users: BTreeSet<i64>,
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
    pub fn full_map(&mut self, snap: &Snapshot) -> Option<MapResponse> {
        let me = snap.nodes.get(&self.viewer)?;
        self.may_use_exit = snap.compiled.may_use_exit_nodes(self.viewer);
        let self_node = node_view(snap, me, false, true);
        let mut peers = Vec::new();
        self.sent_peers.clear();
        for id in visible_peers(snap, self.viewer) {
            if let Some(e) = snap.nodes.get(&id) {
                let (p, fp) = peer_view(snap, e, self.may_use_exit);
                self.sent_peers.insert(id, fp);
                peers.push((*p).clone());
            }
        }
        let filter = packet_filter(snap, self.viewer);
        self.sent_filter = fingerprint(&filter);
        self.sent_self = fingerprint(&self_node);
        let users: BTreeSet<i64> = peers
            .iter()
            .map(|p| p.user.0)
            .chain([self_node.user.0])
            .collect();
        self.sent_users = users.clone();
        self.version = snap.version;
        Some(MapResponse {
            node: Some(self_node),
            derp_map: derp_map(snap),
            peers: Some(peers),
            packet_filter: Some(filter),
            user_profiles: user_profiles(snap, users),
            domain: snap.domain.clone(),
            collect_services: Some(false),
            control_time: Some(Time::now()),
            ..MapResponse::default()
        })
    }

    /// The changes since the view's version, given the IDs of nodes that changed
    /// (`None`: anything may have changed, e.g. the policy). `None` when there is nothing
    /// to send. After a `None` from `snap.nodes` for the viewer itself the session should end.
    pub fn delta(
        &mut self,
        snap: &Snapshot,
        changed: Option<&BTreeSet<i64>>,
    ) -> Option<MapResponse> {
        let me = snap.nodes.get(&self.viewer)?;
        let mut resp = MapResponse::default();
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
        let (candidates, visible): (BTreeSet<i64>, Option<BTreeSet<i64>>) = match partial {
            Some(ids) => (ids.clone(), None),
            None => {
                let visible = visible_peers(snap, self.viewer);
                let all = visible
                    .iter()
                    .chain(self.sent_peers.keys())
                    .copied()
                    .collect();
                (all, Some(visible))
            }
        };
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
            match (is_visible, snap.nodes.get(&id)) {
                (true, Some(e)) => {
                    let (p, fp) = peer_view(snap, e, may_use_exit);
                    if self.sent_peers.insert(id, fp) != Some(fp) {
                        resp.peers_changed.push((*p).clone());
                    }
                }
                _ => {
                    if self.sent_peers.remove(&id).is_some() {
                        resp.peers_removed.push(NodeID(id));
                    }
                }
            }
        }
        // The self node changes only when the viewer itself changed.
        if partial.is_none() {
            let self_node = node_view(snap, me, false, true);
            let fp = fingerprint(&self_node);
            if fp != self.sent_self {
                self.sent_self = fp;
                resp.node = Some(self_node);
            }
        }
        let filter = packet_filter(snap, self.viewer);
        let fp = fingerprint(&filter);
        if fp != self.sent_filter {
            self.sent_filter = fp;
            resp.packet_filter = Some(filter);
        }
        let new_users: Vec<i64> = resp
            .peers_changed
            .iter()
            .map(|p| p.user.0)
            .filter(|u| !self.sent_users.contains(u))
            .collect();
        self.sent_users.extend(new_users.iter().copied());
        resp.user_profiles = user_profiles(snap, new_users);
        self.version = snap.version;
        let nothing = resp.peers_changed.is_empty()
            && resp.peers_removed.is_empty()
            && resp.node.is_none()
            && resp.packet_filter.is_none();
        if nothing {
            return None;
        }
        resp.control_time = Some(Time::now());
        Some(resp)
    }
}
