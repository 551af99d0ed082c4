//! The network map: everything the data plane needs to know, as one value.
//!
//! The engine reconfigures itself from a whole `NetMap` each time (it diffs against the
//! previous one), so whoever produces maps (a config file today, the control client later)
//! never has to describe changes.

use crate::key::{DiscoPublic, NodePrivate, NodePublic};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::SocketAddr;

/// The default tunnel MTU: Tailscale's, which fits inside every common path MTU.
pub const DEFAULT_MTU: u16 = 1280;

/// This node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfNode {
    pub name: String,
    pub private_key: NodePrivate,
    /// Tailnet addresses of this node (100.64.0.0/10 and fd7a:115c:a1e0::/48), host prefixes.
    pub addresses: Vec<IpNet>,
    /// Forward and masquerade traffic of the peers marked [`Peer::exit_client`].
    pub serve_exit: bool,
    /// The TCP port of this node's PeerAPI (DNS over HTTPS for the peers using it as
    /// exit node): connections to it pass the packet filter whatever the policy says,
    /// as in Tailscale, where the PeerAPI checks its callers itself.
    pub peerapi_port: Option<u16>,
}

/// Another node of the tailnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub key: NodePublic,
    /// Where the peer may be reached over UDP, best first. May be empty: the peer then
    /// has to contact us first (we learn its endpoint from its authenticated packets).
    pub endpoints: Vec<SocketAddr>,
    /// The peer's own tailnet addresses and the subnets it routes, *not* including the
    /// exit-node routes, which are given by [`Peer::offers_exit`].
    pub allowed_ips: Vec<IpNet>,
    /// The peer is an (approved) exit node: it may carry 0.0.0.0/0 and ::/0 for us.
    pub offers_exit: bool,
    /// The map allows this peer to use *this* node as its exit node.
    pub exit_client: bool,
    /// Seconds between keepalives; set when we sit behind a NAT that would forget us.
    pub keepalive: Option<u16>,
    /// The relay (DERP) region through which the peer can always be reached (its home
    /// region), when this node uses relays (the daemon connects to a region other than
    /// its own home on demand). The data plane starts on it and moves to a direct
    /// endpoint as soon as one answers.
    pub relay: Option<u16>,
    /// The peer's disco key, when it speaks disco (Tailscale clients and tsunagud in
    /// joined mode): paths to it are then found with disco pings, and a direct path is
    /// used only once a pong has come back over it.
    pub disco: Option<DiscoPublic>,
}

/// The complete configuration of a node's data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetMap {
    pub self_node: SelfNode,
    pub peers: Vec<Peer>,
    /// The peer chosen as exit node, by key. It must be a peer with `offers_exit`.
    pub exit_node: Option<NodePublic>,
    /// With an exit node in use, keep the local LAN subnets reachable directly.
    pub exit_node_allow_lan_access: bool,
    /// The user chose an exit node that cannot be used now (revoked, offline from the
    /// map, not allowed by the policy): internet traffic is blocked, not sent directly,
    /// until they choose again. Only meaningful with `exit_node: None`.
    pub exit_node_blocked: bool,
    /// Tunnel MTU.
    pub mtu: u16,
    /// What peers may open to this node (the policy compiled by the server, in
    /// Tailscale's form). `None` (a map from a file) filters nothing; an empty list lets
    /// nothing in but answers to what we opened.
    pub packet_filter: Option<Vec<crate::tailcfg::FilterRule>>,
}

/// Why a network map is unusable. Every variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetMapError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> NetMapError {
    NetMapError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn is_default_route(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

impl NetMap {
    /// Check the map's internal consistency. The engine refuses a map that fails this,
    /// and keeps running on the previous one.
    pub fn validate(&self) -> Result<(), NetMapError> {
        if self.self_node.addresses.is_empty() {
            return Err(invalid(
                "self.addresses",
                "at least one tailnet address is needed",
            ));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(invalid(
                "mtu",
                format!("{} is outside 576..=9000", self.mtu),
            ));
        }
        let own = self.self_node.private_key.public();
        let mut keys = BTreeSet::new();
        let mut names = BTreeSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let at = |f: &str| format!("peers[{i}].{f}");
            if peer.key == own {
                return Err(invalid(at("public_key"), "is this node's own key"));
            }
            if !keys.insert(peer.key) {
                return Err(invalid(at("public_key"), "appears twice"));
            }
            if peer.name.is_empty() {
                return Err(invalid(at("name"), "must not be empty"));
            }
            if !names.insert(peer.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!("{:?} appears twice", peer.name),
                ));
            }
            for (j, net) in peer.allowed_ips.iter().enumerate() {
                if is_default_route(net) {
                    return Err(invalid(
                        format!("peers[{i}].allowed_ips[{j}]"),
                        "a default route is not an allowed IP; set offers_exit instead",
                    ));
                }
            }
        }
        if self.exit_node.is_some() && self.exit_node_blocked {
            return Err(invalid(
                "exit_node_blocked",
                "an exit node in use cannot also be blocked",
            ));
        }
        if let Some(exit) = self.exit_node {
            match self.peers.iter().find(|p| p.key == exit) {
                None => return Err(invalid("exit_node", format!("no peer has key {exit}"))),
                Some(p) if !p.offers_exit => {
                    return Err(invalid(
                        "exit_node",
                        format!("peer {:?} does not offer to be an exit node", p.name),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The selected exit peer, if any.
    pub fn exit_peer(&self) -> Option<&Peer> {
        let key = self.exit_node?;
        self.peers.iter().find(|p| p.key == key)
    }

    /// Find a peer by name or by one of its tailnet addresses, as users name exit nodes.
    pub fn find_peer(&self, name_or_ip: &str) -> Option<&Peer> {
        let ip = name_or_ip.parse::<std::net::IpAddr>().ok();
        self.peers.iter().find(|p| {
            p.name == name_or_ip
                || ip.is_some_and(|ip| p.allowed_ips.iter().any(|n| n.addr() == ip))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            key: NodePrivate::generate().public(),
            endpoints: vec!["198.51.100.2:41641".parse().unwrap()],
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            offers_exit: true,
            exit_client: false,
            keepalive: None,
            relay: None,
            disco: None,
        }
    }

    fn map() -> NetMap {
        NetMap {
            self_node: SelfNode {
                name: "me".into(),
                private_key: NodePrivate::generate(),
                addresses: vec!["100.64.0.1/32".parse().unwrap()],
                serve_exit: false,
                peerapi_port: None,
            },
            peers: vec![peer("exit")],
            exit_node: None,
            exit_node_allow_lan_access: false,
            exit_node_blocked: false,
            mtu: DEFAULT_MTU,
            packet_filter: None,
        }
    }

    #[test]
    fn valid_map_passes_and_finds_peers() {
        let mut m = map();
        m.exit_node = Some(m.peers[0].key);
        m.validate().unwrap();
        assert_eq!(m.exit_peer().unwrap().name, "exit");
        assert_eq!(m.find_peer("100.64.0.2").unwrap().name, "exit");
        assert_eq!(m.find_peer("exit").unwrap().name, "exit");
        assert!(m.find_peer("nobody").is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let mut m = map();
        m.peers.push(m.peers[0].clone());
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "peers[1].public_key: appears twice"
        );

        let mut m = map();
        m.peers[0].offers_exit = false;
        m.exit_node = Some(m.peers[0].key);
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .starts_with("exit_node: ")
        );

        let mut m = map();
        m.exit_node = Some(NodePrivate::generate().public());
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("no peer has key")
        );

        let mut m = map();
        m.peers[0].allowed_ips.push("0.0.0.0/0".parse().unwrap());
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .starts_with("peers[0].allowed_ips[1]")
        );

        let mut m = map();
        m.peers[0].key = m.self_node.private_key.public();
        assert!(m.validate().unwrap_err().to_string().contains("own key"));

        let mut m = map();
        m.mtu = 100;
        assert!(m.validate().unwrap_err().to_string().starts_with("mtu: "));
    }
}
