//! From the map stream to the engine's network map.
//!
//! [`MapState`] applies each `MapResponse` of a stream (the full first one, then deltas:
//! `PeersChanged`, `PeersRemoved`, `PeersChangedPatch`, online changes, a new filter or
//! self node) and [`MapState::netmap`] turns the current state and the user's
//! preferences into a [`NetMap`] for `Engine::apply`. Pure: no I/O, tested alone.

use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use tsunagu_proto::tailcfg::{
    DERPMap, DNSConfig, FilterRule, MapResponse, Node, NodeID, UserID, UserProfile,
};
use tsunagu_proto::{NetMap, NodePrivate, NodePublic, Peer, SelfNode};

/// What the user chose (persisted by the daemon).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Prefs {
    /// Exit node by tailnet IP, short name or full DNS name; empty for none.
    pub exit_node: String,
    pub exit_node_allow_lan_access: bool,
    pub advertise_exit_node: bool,
    /// Route to the subnets peers advertise (their approved routes beyond their own
    /// addresses). Off by default, as Tailscale on Linux: a peer's route must not capture
    /// this device's own LAN unless the user asks for it.
    pub accept_routes: bool,
}

/// Why the preferences cannot be applied to the current map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefsError {
    #[error("no node {0:?} in the tailnet")]
    UnknownNode(String),
    #[error("{0} is this device")]
    SelfNode(String),
    #[error("{0} is not an approved exit node (or the policy does not let this device use it)")]
    NotExitNode(String),
    #[error("no exit node is online and available to this device")]
    NoExitNodeAvailable,
}

/// The exit-node choice "any available one": the one in use while it stays online and
/// approved, otherwise another (failover), by name for determinism.
pub const AUTO_ANY: &str = "auto:any";

/// The client's view of the tailnet, updated message by message.
#[derive(Debug, Default, Clone)]
pub struct MapState {
    pub self_node: Option<Node>,
    pub peers: BTreeMap<NodeID, Node>,
    pub filter: Vec<FilterRule>,
    pub domain: String,
    /// Users the map told us about (`UserProfiles` accumulate across the stream).
    pub users: BTreeMap<UserID, UserProfile>,
    /// The relay regions the server announced (the latest map that had one).
    pub derp_map: Option<DERPMap>,
    /// This node's home relay region, when it has one (set by the daemon). Then every
    /// peer homed on a region of the DERP map gets a relay path through that region,
    /// ours or not (the daemon connects to another region while it sends there).
    pub relay_region: Option<u16>,
    /// The tailnet's DNS settings (the latest map that had them).
    pub dns_config: Option<DNSConfig>,
}

/// A node's short name: the first label of its DNS name.
pub fn short_name(n: &Node) -> &str {
    n.name.split('.').next().unwrap_or_default()
}

fn covers_internet(ip: &str) -> bool {
    if ip == "*" {
        return true;
    }
    // Any public prefix means "the internet" (autogroup:internet compiles to public
    // ranges; a /0 also counts).
    ip.parse::<IpNet>().is_ok_and(|n| match n.addr() {
        IpAddr::V4(a) => !(a.is_private() || a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64),
        IpAddr::V6(a) => (a.segments()[0] & 0xe000) == 0x2000 || n.prefix_len() == 0,
    })
}

fn src_matches(src: &str, ip: IpAddr) -> bool {
    src == "*"
        || src.parse::<IpNet>().is_ok_and(|n| n.contains(&ip))
        || src.parse::<IpAddr>().is_ok_and(|a| a == ip)
}

impl MapState {
    /// Apply one message of the stream.
    pub fn apply(&mut self, m: &MapResponse) {
        if m.keep_alive {
            return;
        }
        if let Some(n) = &m.node {
            self.self_node = Some(n.clone());
        }
        if !m.domain.is_empty() {
            self.domain.clone_from(&m.domain);
        }
        if let Some(peers) = &m.peers {
            self.peers = peers.iter().map(|p| (p.id, p.clone())).collect();
        }
        for p in &m.peers_changed {
            self.peers.insert(p.id, p.clone());
        }
        for id in &m.peers_removed {
            self.peers.remove(id);
        }
        for patch in &m.peers_changed_patch {
            if let Some(p) = self.peers.get_mut(&patch.node_id) {
                if !patch.endpoints.is_empty() {
                    p.endpoints.clone_from(&patch.endpoints);
                }
                if let Some(k) = patch.key {
                    p.key = k;
                }
                if let Some(d) = patch.disco_key {
                    p.disco_key = d;
                }
                if let Some(o) = patch.online {
                    p.online = Some(o);
                }
                if patch.derp_region != 0 {
                    p.set_home_derp(patch.derp_region);
                }
            }
        }
        for (id, online) in &m.online_change {
            if let Some(p) = self.peers.get_mut(id) {
                p.online = Some(*online);
            }
        }
        if let Some(f) = &m.packet_filter {
            self.filter.clone_from(f);
        }
        for u in &m.user_profiles {
            self.users.insert(u.id, u.clone());
        }
        if let Some(d) = &m.derp_map {
            self.derp_map = Some(d.clone());
        }
        if let Some(d) = &m.dns_config {
            self.dns_config = Some(d.clone());
        }
    }

    /// The owner of a node as clients show it: the user's login name, or
    /// `tagged-devices` for tagged nodes (empty when the map did not say).
    pub fn user_name(&self, n: &Node) -> String {
        if !n.tags.is_empty() {
            return "tagged-devices".into();
        }
        self.users
            .get(&n.user)
            .map(|u| u.login_name.clone())
            .unwrap_or_default()
    }

    /// Find a peer as users name exit nodes: tailnet IP, short name or full DNS name.
    pub fn find(&self, what: &str) -> Option<&Node> {
        let what = what.trim_end_matches('.');
        let ip: Option<IpAddr> = what.parse().ok();
        self.peers.values().find(|p| {
            p.name.trim_end_matches('.') == what
                || short_name(p) == what
                || ip.is_some_and(|ip| p.addresses.iter().any(|a| a.addr() == ip))
        })
    }

    /// Resolve the chosen exit node to a peer, with the reason when it cannot be used.
    pub fn resolve_exit(&self, what: &str) -> Result<Option<&Node>, PrefsError> {
        self.resolve_exit_sticky(what, None)
    }

    /// [`MapState::resolve_exit`], where `auto:any` keeps `current` (the exit node in
    /// use) while it is usable.
    pub fn resolve_exit_sticky(
        &self,
        what: &str,
        current: Option<&NodePublic>,
    ) -> Result<Option<&Node>, PrefsError> {
        if what.is_empty() {
            return Ok(None);
        }
        if what == AUTO_ANY {
            let usable = |p: &&Node| p.is_exit_node() && p.online != Some(false);
            if let Some(cur) = current
                && let Some(p) = self.peers.values().filter(usable).find(|p| p.key == *cur)
            {
                return Ok(Some(p));
            }
            return self
                .peers
                .values()
                .filter(usable)
                .min_by(|a, b| a.name.cmp(&b.name))
                .map(Some)
                .ok_or(PrefsError::NoExitNodeAvailable);
        }
        let me = self.self_node.as_ref();
        let is_me = me.is_some_and(|m| {
            m.name.trim_end_matches('.') == what.trim_end_matches('.')
                || short_name(m) == what
                || what
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| m.addresses.iter().any(|a| a.addr() == ip))
        });
        if is_me {
            return Err(PrefsError::SelfNode(what.into()));
        }
        let p = self
            .find(what)
            .ok_or_else(|| PrefsError::UnknownNode(what.into()))?;
        if !p.is_exit_node() {
            return Err(PrefsError::NotExitNode(what.into()));
        }
        Ok(Some(p))
    }

    /// Whether our packet filter lets `ip` send to the internet through us (we are its
    /// exit node): some rule with that source and an internet destination.
    pub fn may_use_us_as_exit(&self, ip: IpAddr) -> bool {
        self.filter.iter().any(|r| {
            r.src_ips.iter().any(|s| src_matches(s, ip))
                && r.dst_ports.iter().any(|d| covers_internet(&d.ip))
        })
    }

    /// The engine's network map, or why the preferences do not fit the tailnet.
    pub fn netmap(
        &self,
        key: &NodePrivate,
        prefs: &Prefs,
        mtu: u16,
    ) -> Result<Option<NetMap>, PrefsError> {
        let exit = self.resolve_exit(&prefs.exit_node)?;
        Ok(self.build(key, prefs, mtu, exit, false))
    }

    /// The engine's network map, failing closed: when the chosen exit node cannot be
    /// used (revoked, removed, not allowed), internet traffic is blocked rather than
    /// sent directly, until the user chooses again or the node comes back. `None`
    /// until the map has our own node.
    /// With `auto:any`, `current` (the exit node in use) is kept while usable.
    pub fn netmap_fail_closed(
        &self,
        key: &NodePrivate,
        prefs: &Prefs,
        mtu: u16,
        current: Option<&NodePublic>,
    ) -> Option<NetMap> {
        match self.resolve_exit_sticky(&prefs.exit_node, current) {
            Ok(exit) => self.build(key, prefs, mtu, exit, false),
            Err(_) => self.build(key, prefs, mtu, None, true),
        }
    }

    /// Where `peer` can always be reached through a relay: its home region, when we use
    /// relays and the DERP map has that region.
    fn relay_for(&self, peer: &Node) -> Option<u16> {
        self.relay_region?;
        let region = u16::try_from(peer.derp_region()).ok().filter(|r| *r > 0)?;
        let known = self
            .derp_map
            .as_ref()?
            .regions
            .contains_key(&peer.derp_region());
        known.then_some(region)
    }

    fn build(
        &self,
        key: &NodePrivate,
        prefs: &Prefs,
        mtu: u16,
        exit: Option<&Node>,
        blocked: bool,
    ) -> Option<NetMap> {
        let me = self.self_node.as_ref()?;
        let mut peers = Vec::with_capacity(self.peers.len());
        for p in self.peers.values() {
            // Subnet routes only with --accept-routes; exit routes go by `offers_exit`.
            let allowed: Vec<IpNet> = p
                .effective_allowed_ips()
                .iter()
                .filter(|n| n.prefix_len() != 0)
                .filter(|n| prefs.accept_routes || p.addresses.contains(n))
                .copied()
                .collect();
            peers.push(Peer {
                name: short_name(p).to_string(),
                key: p.key,
                endpoints: p.endpoints.clone(),
                allowed_ips: allowed,
                offers_exit: p.is_exit_node(),
                exit_client: prefs.advertise_exit_node
                    && p.addresses
                        .iter()
                        .any(|a| self.may_use_us_as_exit(a.addr())),
                keepalive: Some(25),
                relay: self.relay_for(p),
                disco: (!p.disco_key.is_zero()).then_some(p.disco_key),
            });
        }
        // Node names are unique per tailnet, but two peers may share a short name across
        // domains; make them unique for the engine.
        let mut seen = std::collections::BTreeSet::new();
        for p in &mut peers {
            if !seen.insert(p.name.clone()) {
                p.name = format!("{}-{}", p.name, p.key.short());
                seen.insert(p.name.clone());
            }
        }
        Some(NetMap {
            self_node: SelfNode {
                name: short_name(me).to_string(),
                private_key: key.clone(),
                addresses: me.addresses.clone(),
                serve_exit: prefs.advertise_exit_node && me.is_exit_node(),
                peerapi_port: None,
            },
            peers,
            exit_node: exit.map(|p| p.key),
            exit_node_allow_lan_access: prefs.exit_node_allow_lan_access,
            exit_node_blocked: blocked,
            mtu,
            packet_filter: Some(self.filter.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagu_proto::tailcfg::{NetPortRange, PortRange};

    fn node(id: i64, name: &str, ip: &str, exit: bool) -> Node {
        let addr: IpNet = format!("{ip}/32").parse().unwrap();
        let mut allowed = vec![addr];
        if exit {
            allowed.push("0.0.0.0/0".parse().unwrap());
            allowed.push("::/0".parse().unwrap());
        }
        Node {
            id: NodeID(id),
            name: format!("{name}.tailnet.internal."),
            key: NodePrivate::generate().public(),
            addresses: vec![addr],
            allowed_ips: Some(allowed),
            endpoints: vec!["198.51.100.2:41641".parse().unwrap()],
            ..Node::default()
        }
    }

    fn state() -> MapState {
        let mut s = MapState::default();
        s.apply(&MapResponse {
            node: Some(node(1, "laptop", "100.64.0.1", false)),
            peers: Some(vec![
                node(2, "dev-m1sk9-s1", "100.64.0.2", true),
                node(3, "phone", "100.64.0.3", false),
            ]),
            packet_filter: Some(vec![FilterRule::allow_all()]),
            ..MapResponse::default()
        });
        s
    }

    #[test]
    fn peers_subnet_routes_only_with_accept_routes() {
        let mut s = state();
        let mut router = node(4, "router", "100.64.0.4", false);
        // An approved subnet route that is this member's own LAN (the cafe's).
        router
            .allowed_ips
            .as_mut()
            .unwrap()
            .push("198.18.1.0/24".parse().unwrap());
        router.primary_routes = vec!["198.18.1.0/24".parse().unwrap()];
        s.apply(&MapResponse {
            peers_changed: vec![router],
            ..MapResponse::default()
        });
        let key = NodePrivate::generate();
        let routes = |accept_routes: bool| -> Vec<String> {
            let prefs = Prefs {
                exit_node: "dev-m1sk9-s1".into(),
                accept_routes,
                ..Prefs::default()
            };
            let m = s.netmap(&key, &prefs, 1280).unwrap().unwrap();
            m.validate().unwrap();
            m.peers
                .iter()
                .flat_map(|p| p.allowed_ips.iter().map(ToString::to_string))
                .collect()
        };
        // Off (the default): each peer's own address only; the exit node still offers
        // the internet (its /0s are not subnet routes).
        assert_eq!(
            routes(false),
            ["100.64.0.2/32", "100.64.0.3/32", "100.64.0.4/32"]
        );
        assert!(!Prefs::default().accept_routes);
        assert_eq!(
            routes(true),
            [
                "100.64.0.2/32",
                "100.64.0.3/32",
                "100.64.0.4/32",
                "198.18.1.0/24"
            ]
        );
        // Saved settings from before the option parse, with it off.
        let old: Prefs = serde_json::from_str(r#"{"exit_node":"x"}"#).unwrap();
        assert!(!old.accept_routes && old.exit_node == "x");
    }

    #[test]
    fn exit_node_by_name_ip_or_fqdn() {
        let s = state();
        let key = NodePrivate::generate();
        for what in [
            "dev-m1sk9-s1",
            "100.64.0.2",
            "dev-m1sk9-s1.tailnet.internal",
        ] {
            let prefs = Prefs {
                exit_node: what.into(),
                ..Prefs::default()
            };
            let m = s.netmap(&key, &prefs, 1280).unwrap().unwrap();
            assert_eq!(m.exit_peer().unwrap().name, "dev-m1sk9-s1", "{what}");
            m.validate().unwrap();
        }
    }

    #[test]
    fn peers_get_a_relay_path_through_their_home_region() {
        use tsunagu_proto::tailcfg::{DERPMap, DERPRegion};
        let mut s = state();
        let region = |id: i32| DERPRegion {
            region_id: id,
            region_code: format!("r{id}"),
            ..DERPRegion::default()
        };
        s.derp_map = Some(DERPMap::from_regions([region(900), region(901)]));
        let homes = [(2, 901), (3, 902)];
        for (id, home) in homes {
            s.peers.get_mut(&NodeID(id)).unwrap().set_home_derp(home);
        }
        let mut extra = node(4, "printer", "100.64.0.4", false);
        extra.set_home_derp(900);
        s.peers.insert(NodeID(4), extra);
        s.peers
            .insert(NodeID(5), node(5, "nohome", "100.64.0.5", false));
        let relays = |s: &MapState| -> Vec<(String, Option<u16>)> {
            let m = s
                .netmap(&NodePrivate::generate(), &Prefs::default(), 1280)
                .unwrap()
                .unwrap();
            m.peers.iter().map(|p| (p.name.clone(), p.relay)).collect()
        };
        // Without a home relay of our own: no relay paths.
        assert!(relays(&s).iter().all(|(_, r)| r.is_none()));
        // Homed on 900: a peer on 901 is reached through 901; a region missing from the
        // map (902) or no home: no relay path.
        s.relay_region = Some(900);
        assert_eq!(
            relays(&s),
            [
                ("dev-m1sk9-s1".to_string(), Some(901)),
                ("phone".to_string(), None),
                ("printer".to_string(), Some(900)),
                ("nohome".to_string(), None),
            ]
        );
    }

    #[test]
    fn bad_exit_choices_are_explained() {
        let s = state();
        let key = NodePrivate::generate();
        let err = |what: &str| {
            s.netmap(
                &key,
                &Prefs {
                    exit_node: what.into(),
                    ..Prefs::default()
                },
                1280,
            )
            .unwrap_err()
        };
        assert_eq!(err("ghost"), PrefsError::UnknownNode("ghost".into()));
        assert_eq!(err("phone"), PrefsError::NotExitNode("phone".into()));
        assert_eq!(err("laptop"), PrefsError::SelfNode("laptop".into()));
        assert_eq!(err("100.64.0.1"), PrefsError::SelfNode("100.64.0.1".into()));
    }

    #[test]
    fn deltas_apply_in_order() {
        let mut s = state();
        s.apply(&MapResponse {
            peers_removed: vec![NodeID(3)],
            ..MapResponse::default()
        });
        assert!(s.find("phone").is_none());
        let mut revoked = node(2, "dev-m1sk9-s1", "100.64.0.2", false);
        revoked.endpoints.clear();
        s.apply(&MapResponse {
            peers_changed: vec![revoked],
            ..MapResponse::default()
        });
        assert!(!s.find("dev-m1sk9-s1").unwrap().is_exit_node(), "revoked");
        let e = s.netmap(
            &NodePrivate::generate(),
            &Prefs {
                exit_node: "dev-m1sk9-s1".into(),
                ..Prefs::default()
            },
            1280,
        );
        assert_eq!(
            e.unwrap_err(),
            PrefsError::NotExitNode("dev-m1sk9-s1".into())
        );
        // The daemon's map fails closed: no exit peer, internet blocked, peers kept.
        let prefs = Prefs {
            exit_node: "dev-m1sk9-s1".into(),
            ..Prefs::default()
        };
        let m = s
            .netmap_fail_closed(&NodePrivate::generate(), &prefs, 1280, None)
            .unwrap();
        assert!(m.exit_node.is_none() && m.exit_node_blocked);
        assert_eq!(m.peers.len(), 1);
        m.validate().unwrap();
        // With no exit node chosen nothing is blocked.
        let m = s
            .netmap_fail_closed(&NodePrivate::generate(), &Prefs::default(), 1280, None)
            .unwrap();
        assert!(!m.exit_node_blocked);
        s.apply(&MapResponse::keep_alive());
        assert_eq!(s.peers.len(), 1);
    }

    #[test]
    fn auto_any_sticks_to_the_exit_node_in_use_and_fails_over() {
        let mut s = state();
        let other = node(4, "backup-exit", "100.64.0.4", true);
        let other_key = other.key;
        s.apply(&MapResponse {
            peers_changed: vec![other],
            ..MapResponse::default()
        });
        let first = s.resolve_exit(AUTO_ANY).unwrap().unwrap();
        assert_eq!(
            short_name(first),
            "backup-exit",
            "by name without a current one"
        );
        let primary = s.find("dev-m1sk9-s1").unwrap().key;
        let kept = s
            .resolve_exit_sticky(AUTO_ANY, Some(&primary))
            .unwrap()
            .unwrap();
        assert_eq!(kept.key, primary, "the one in use is kept");
        // The one in use goes offline: fail over to the other.
        s.apply(&MapResponse {
            online_change: [(NodeID(2), false)].into_iter().collect(),
            ..MapResponse::default()
        });
        let next = s
            .resolve_exit_sticky(AUTO_ANY, Some(&primary))
            .unwrap()
            .unwrap();
        assert_eq!(next.key, other_key);
        // None left: fail closed with a reason.
        s.apply(&MapResponse {
            online_change: [(NodeID(4), false)].into_iter().collect(),
            ..MapResponse::default()
        });
        assert_eq!(
            s.resolve_exit_sticky(AUTO_ANY, Some(&primary)).unwrap_err(),
            PrefsError::NoExitNodeAvailable
        );
        let prefs = Prefs {
            exit_node: AUTO_ANY.into(),
            ..Prefs::default()
        };
        let m = s
            .netmap_fail_closed(&NodePrivate::generate(), &prefs, 1280, Some(&primary))
            .unwrap();
        assert!(m.exit_node_blocked);
    }

    #[test]
    fn user_names_come_from_profiles_or_tags() {
        let mut s = state();
        let mut owned = node(4, "desk", "100.64.0.4", false);
        owned.user = UserID(7);
        let mut tagged = node(5, "srv", "100.64.0.5", false);
        tagged.tags = vec!["tag:exit".into()];
        s.apply(&MapResponse {
            peers_changed: vec![owned, tagged],
            user_profiles: vec![UserProfile {
                id: UserID(7),
                login_name: "admin".into(),
                ..UserProfile::default()
            }],
            ..MapResponse::default()
        });
        assert_eq!(s.user_name(s.find("desk").unwrap()), "admin");
        assert_eq!(s.user_name(s.find("srv").unwrap()), "tagged-devices");
    }

    #[test]
    fn exit_clients_come_from_our_filter() {
        let mut s = state();
        let prefs = Prefs {
            advertise_exit_node: true,
            ..Prefs::default()
        };
        // Only 100.64.0.3 may reach the internet through us.
        s.apply(&MapResponse {
            packet_filter: Some(vec![FilterRule {
                src_ips: vec!["100.64.0.3/32".into()],
                dst_ports: vec![NetPortRange {
                    ip: "0.0.0.0/0".into(),
                    ports: PortRange::ANY,
                    ..NetPortRange::default()
                }],
                ..FilterRule::default()
            }]),
            ..MapResponse::default()
        });
        let m = s
            .netmap(&NodePrivate::generate(), &prefs, 1280)
            .unwrap()
            .unwrap();
        let by = |n: &str| m.peers.iter().find(|p| p.name == n).unwrap().exit_client;
        assert!(by("phone"));
        assert!(!by("dev-m1sk9-s1"));
    }
}
