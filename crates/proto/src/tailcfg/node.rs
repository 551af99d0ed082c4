//! `Node` (a device as the netmap describes it) and `PeerChange` (a patch to one).

use super::de::{is_false, is_zero_i32, null_default};
use super::{
    Base64Bytes, CapabilityVersion, Hostinfo, NodeID, Resolver, StableNodeID, Time, UserID,
};
use crate::key::{DiscoPublic, MachinePublic, NodePublic, de_zero_if_empty};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// The fake IP of the legacy `Node.DERP` field: `"127.3.3.40:<region>"` means "home DERP
/// region `<region>`" (3.3.40 are the digits above D, E, R, P on a keyboard).
pub const DERP_MAGIC_IP: &str = "127.3.3.40";

/// Node attribute (self `CapMap` key, Go's `tailcfg.NodeAttrDisableCaptivePortalDetection`,
/// capability version 103+): the client must not run captive-portal detection, which
/// otherwise probes DERP servers (Tailscale's built-in ones when the map has none).
pub const NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION: &str = "disable-captive-portal-detection";

/// Go's `tailcfg.NodeCapMap`: capability name → JSON values (often none). Go writes a
/// capability without values as `null`, which reads as an empty list here; an empty list
/// is written as `[]`, which Go reads the same way (presence of the key is what counts).
pub type CapMap = BTreeMap<String, Vec<serde_json::Value>>;

fn de_cap_map<'de, D: Deserializer<'de>>(d: D) -> Result<CapMap, D::Error> {
    let raw: Option<BTreeMap<String, Option<Vec<serde_json::Value>>>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
}

fn de_opt_cap_map<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CapMap>, D::Error> {
    de_cap_map(d).map(Some)
}

/// Go's `tailcfg.Node`: one device, as the self node (`MapResponse.Node`) or as a peer.
///
/// Fields Go writes without `omitempty` are always written here too (tailscale-rs needs
/// e.g. `Addresses` and `Hostinfo`); the others are skipped when empty.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: NodeID,
    #[serde(rename = "StableID")]
    pub stable_id: StableNodeID,
    /// The node's MagicDNS FQDN *with* a trailing dot, e.g. `"laptop.tail1234.ts.net."`.
    pub name: String,
    /// The owner; for tagged nodes not the ACL identity.
    pub user: UserID,
    /// Who shared this node in, if not the owner; 0 otherwise.
    #[serde(skip_serializing_if = "UserID::is_zero")]
    pub sharer: UserID,
    /// The node key, which is also its WireGuard public key.
    pub key: NodePublic,
    /// When the node key expires; Go's zero time = never.
    pub key_expiry: Time,
    /// Tailnet-lock signature of `Key`.
    #[serde(skip_serializing_if = "Base64Bytes::is_empty")]
    pub key_signature: Base64Bytes,
    #[serde(deserialize_with = "de_zero_if_empty")]
    pub machine: MachinePublic,
    /// Zero = the node does not speak disco (e.g. WireGuard-only).
    #[serde(deserialize_with = "de_zero_if_empty")]
    pub disco_key: DiscoPublic,
    /// The node's own tailnet addresses as host prefixes (`100.x.y.z/32`, `fd7a:…/128`),
    /// IPv4 first. Always written (tailscale-rs expects exactly one v4 then one v6).
    #[serde(deserialize_with = "null_default")]
    pub addresses: Vec<IpNet>,
    /// What a peer routes to this node (WireGuard's AllowedIPs): its `Addresses` plus
    /// approved subnet routes, and for an approved exit node both `0.0.0.0/0` and `::/0`
    /// (clients offer a peer as exit node only when both are present). `None` = same as
    /// `Addresses` (clients of capver 112+).
    #[serde(rename = "AllowedIPs", skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<IpNet>>,
    /// Known UDP endpoints (STUN-discovered and LAN `ip:port`s).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub endpoints: Vec<SocketAddr>,
    /// Legacy home DERP, `"127.3.3.40:<region>"`; still sent for older readers
    /// (see [`Node::set_home_derp`]).
    #[serde(rename = "DERP", skip_serializing_if = "String::is_empty")]
    pub legacy_derp: String,
    /// Home DERP region ID (capver 111+); 0 = unknown.
    #[serde(rename = "HomeDERP", skip_serializing_if = "is_zero_i32")]
    pub home_derp: i32,
    /// The node's `Hostinfo` as it last reported it. Always written (as `{}` at least).
    #[serde(deserialize_with = "null_default")]
    pub hostinfo: Hostinfo,
    pub created: Time,
    /// The node's capability version, if known.
    #[serde(skip_serializing_if = "CapabilityVersion::is_zero")]
    pub cap: CapabilityVersion,
    /// ACL tags (`tag:server`); a tagged node is owned by its tags, not its `User`.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub tags: Vec<String>,
    /// The subnet routes of `AllowedIPs` this node is the primary router for.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub primary_routes: Vec<IpNet>,
    /// When last online (set while offline); `None` = unknown or not visible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Whether connected to the control server now; `None` = unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(skip_serializing_if = "is_false")]
    pub machine_authorized: bool,
    /// Legacy capability list (superseded by `CapMap` at capver 89).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub capabilities: Vec<String>,
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "de_cap_map"
    )]
    pub cap_map: CapMap,
    #[serde(rename = "UnsignedPeerAPIOnly", skip_serializing_if = "is_false")]
    pub unsigned_peer_api_only: bool,
    /// Client-computed display names; servers leave them empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub computed_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub computed_name_with_host: String,
    #[serde(
        rename = "DataPlaneAuditLogID",
        skip_serializing_if = "String::is_empty"
    )]
    pub data_plane_audit_log_id: String,
    /// The key has expired (the server may say so; clients also compute it).
    #[serde(skip_serializing_if = "is_false")]
    pub expired: bool,
    /// The address this peer knows the receiving node as, if it masquerades (v4).
    #[serde(
        rename = "SelfNodeV4MasqAddrForThisPeer",
        skip_serializing_if = "Option::is_none"
    )]
    pub self_node_v4_masq_addr_for_this_peer: Option<IpAddr>,
    #[serde(
        rename = "SelfNodeV6MasqAddrForThisPeer",
        skip_serializing_if = "Option::is_none"
    )]
    pub self_node_v6_masq_addr_for_this_peer: Option<IpAddr>,
    /// A plain WireGuard peer (no disco, no DERP): reachable only at `Endpoints`.
    #[serde(rename = "IsWireGuardOnly", skip_serializing_if = "is_false")]
    pub is_wireguard_only: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub is_jailed: bool,
    #[serde(
        rename = "ExitNodeDNSResolvers",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub exit_node_dns_resolvers: Vec<Resolver>,
}

impl Node {
    /// Sets the home DERP region in both encodings: `HomeDERP` and the legacy
    /// `DERP: "127.3.3.40:<region>"` (what Tailscale's own server still sends). 0 clears.
    pub fn set_home_derp(&mut self, region: i32) {
        self.home_derp = region;
        self.legacy_derp = if region > 0 {
            format!("{DERP_MAGIC_IP}:{region}")
        } else {
            String::new()
        };
    }

    /// The home DERP region: `HomeDERP`, else the legacy `DERP` string's port, else 0.
    pub fn derp_region(&self) -> i32 {
        if self.home_derp != 0 {
            return self.home_derp;
        }
        self.legacy_derp
            .strip_prefix(DERP_MAGIC_IP)
            .and_then(|rest| rest.strip_prefix(':'))
            .and_then(|port| port.parse().ok())
            .unwrap_or(0)
    }

    /// `AllowedIPs` as clients read it: `Addresses` when absent.
    pub fn effective_allowed_ips(&self) -> &[IpNet] {
        self.allowed_ips.as_deref().unwrap_or(&self.addresses)
    }

    /// Whether peers may use this node as exit node: `AllowedIPs` holds both `0.0.0.0/0`
    /// and `::/0`.
    pub fn is_exit_node(&self) -> bool {
        let has = |s: &str| {
            self.effective_allowed_ips()
                .iter()
                .any(|n| n.to_string() == s)
        };
        has("0.0.0.0/0") && has("::/0")
    }
}

/// Go's `tailcfg.PeerChange` (in `MapResponse.PeersChangedPatch`): a light update to a
/// known peer; each `Some` / non-empty field replaces that attribute.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PeerChange {
    /// The peer being changed; clients ignore IDs they do not know.
    #[serde(rename = "NodeID")]
    pub node_id: NodeID,
    /// New home DERP region; 0 = unchanged.
    #[serde(rename = "DERPRegion", skip_serializing_if = "is_zero_i32")]
    pub derp_region: i32,
    /// New capability version; 0 = unchanged.
    #[serde(skip_serializing_if = "CapabilityVersion::is_zero")]
    pub cap: CapabilityVersion,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_cap_map"
    )]
    pub cap_map: Option<CapMap>,
    /// New UDP endpoints; empty = unchanged.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub endpoints: Vec<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<NodePublic>,
    #[serde(skip_serializing_if = "Base64Bytes::is_empty")]
    pub key_signature: Base64Bytes,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disco_key: Option<DiscoPublic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<Time>,
}

impl PeerChange {
    /// An empty patch for `node_id`, to fill in.
    pub fn new(node_id: NodeID) -> Self {
        PeerChange {
            node_id,
            ..Default::default()
        }
    }
}
