//! The map poll (`POST /machine/map`): `MapRequest` in, a stream of `MapResponse`s out.

use super::de::{de_addr_or_empty, is_false, is_zero_i64, null_default, ser_addr_or_empty};
use super::{
    Base64Bytes, CapabilityVersion, DERPMap, DNSConfig, FilterRule, Hostinfo, Node, NodeID,
    PeerChange, Time, UserProfile,
};
use crate::key::{DiscoPublic, NodePublic, de_zero_if_empty};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Go's `tailcfg.EndpointType`: where a `MapRequest` endpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointType(pub i32);

impl EndpointType {
    pub const UNKNOWN: EndpointType = EndpointType(0);
    pub const LOCAL: EndpointType = EndpointType(1);
    pub const STUN: EndpointType = EndpointType(2);
    pub const PORTMAPPED: EndpointType = EndpointType(3);
    /// Hard NAT: STUN-discovered IPv4 with the local port.
    pub const STUN4_LOCAL_PORT: EndpointType = EndpointType(4);
    pub const EXPLICIT_CONF: EndpointType = EndpointType(5);
}

/// Go's `tailcfg.MapRequest`: a node reports its state (endpoints, hostinfo) and/or asks
/// for the netmap, once or as a long-poll stream (`Stream`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MapRequest {
    /// The client's capability version.
    pub version: CapabilityVersion,
    /// `"zstd"`: compress each streamed `MapResponse`; `""`: don't.
    #[serde(deserialize_with = "null_default")]
    pub compress: String,
    /// The client wants `{"KeepAlive":true}` messages on an idle stream.
    pub keep_alive: bool,
    pub node_key: NodePublic,
    #[serde(deserialize_with = "de_zero_if_empty")]
    pub disco_key: DiscoPublic,
    /// Hardware attestation public key (capver 130+), opaque.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_attestation_key: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Base64Bytes::is_empty")]
    pub hardware_attestation_key_signature: Base64Bytes,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_attestation_key_signature_timestamp: Option<Time>,
    /// Long-poll: keep the response open and stream updates. With capver >= 68 a streaming
    /// request is read-only (its `Hostinfo` and `Endpoints` may be ignored).
    pub stream: bool,
    pub hostinfo: Option<Hostinfo>,
    /// Resume this earlier map session (from `MapResponse.MapSessionHandle`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub map_session_handle: String,
    /// The last `Seq` processed in that session.
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub map_session_seq: i64,
    /// The client's UDP endpoints, `"ip:port"` (Go's `netip.AddrPort` text, which may carry
    /// an IPv6 zone); see [`MapRequest::endpoint_addrs`].
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub endpoints: Vec<String>,
    /// The type of each endpoint, parallel to `Endpoints`.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub endpoint_types: Vec<EndpointType>,
    /// Hash of the client's latest tailnet-lock AUM.
    #[serde(rename = "TKAHead", skip_serializing_if = "String::is_empty")]
    pub tka_head: String,
    /// Deprecated (always false since capver 68).
    #[serde(skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// The client does not need `Peers`; with `Stream` false it is only an endpoint/
    /// hostinfo update and the server may answer with an empty body.
    #[serde(skip_serializing_if = "is_false")]
    pub omit_peers: bool,
    /// Free-form debug flags, e.g. `"warn-ip-forwarding-off"`.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub debug_flags: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub connection_handle_for_test: String,
    /// tsunagu's own: what a host of an exit node with standby hosts reports (see
    /// [`super::HostReport`]).
    #[serde(rename = "TsunaguHost", skip_serializing_if = "Option::is_none")]
    pub tsunagu_host: Option<super::HostReport>,
}

impl MapRequest {
    /// The endpoints that parse as socket addresses, with their types (`UNKNOWN` when the
    /// types list is short). Zoned IPv6 endpoints, which peers could not use, are dropped.
    pub fn endpoint_addrs(&self) -> Vec<(SocketAddr, EndpointType)> {
        self.endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let addr = e.parse().ok()?;
                Some((
                    addr,
                    self.endpoint_types.get(i).copied().unwrap_or_default(),
                ))
            })
            .collect()
    }
}

/// Go's `tailcfg.MapResponse`: one message of the map stream. The first message of a
/// stream is complete; later ones are deltas in which an absent field means "unchanged".
/// Every field is `omitempty` in Go.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MapResponse {
    /// Opaque handle naming this stream, for resumption; first message only.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub map_session_handle: String,
    /// Sequence number within the session (omit on keep-alives).
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub seq: i64,
    /// A keep-alive: everything but `PingRequest`, `ControlTime`, `PopBrowserURL` is
    /// ignored. Send one well within two minutes of silence.
    #[serde(skip_serializing_if = "is_false")]
    pub keep_alive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_request: Option<PingRequest>,
    #[serde(rename = "PopBrowserURL", skip_serializing_if = "String::is_empty")]
    pub pop_browser_url: String,
    /// The self node; `None` = unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
    #[serde(rename = "DERPMap", skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<DERPMap>,
    /// The complete peer list, sorted by ID; takes precedence over the delta fields.
    /// `Some(vec![])` is sent as `[]` ("there are no peers").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<Node>>,
    /// New or changed peers (complete `Node`s), sorted by ID.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub peers_changed: Vec<Node>,
    /// IDs of peers that went away.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub peers_removed: Vec<NodeID>,
    /// Light patches to known peers (applied after the fields above).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub peers_changed_patch: Vec<PeerChange>,
    /// Peer → true: seen now (update `LastSeen`); false: gone.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub peer_seen_change: BTreeMap<NodeID, bool>,
    /// Peer → new `Online` state.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub online_change: BTreeMap<NodeID, bool>,
    #[serde(rename = "DNSConfig", skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<DNSConfig>,
    /// The tailnet's name (`"example.com"`, `"alice@gmail.com"`); empty = unchanged.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// Whether clients should report `Hostinfo.Services`; `None` = unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collect_services: Option<bool>,
    /// The packet filter. `None` = unchanged; `Some(vec![])` (sent as `[]`) = block
    /// everything, which Go's own type cannot express.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_filter: Option<Vec<FilterRule>>,
    /// Named incremental filters: key → rules, or `None` (null) to delete the key; the key
    /// `"*"` with `None` clears all. `PacketFilter` counts as the key `"base"`.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub packet_filters: BTreeMap<String, Option<Vec<FilterRule>>>,
    /// Profiles of users owning nodes in this map (new or changed ones only, after the
    /// first message).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub user_profiles: Vec<UserProfile>,
    /// Health problems seen by the server: `None` = unchanged, `Some(vec![])` = healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Vec<String>>,
    /// Structured health messages (capver 117+), as a patch: `None` values delete;
    /// the key `"*"` with `None` clears all.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub display_messages: BTreeMap<String, Option<DisplayMessage>>,
    /// Tailscale SSH policy, opaque.
    #[serde(rename = "SSHPolicy", skip_serializing_if = "Option::is_none")]
    pub ssh_policy: Option<serde_json::Value>,
    /// The server's clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_time: Option<Time>,
    #[serde(rename = "TKAInfo", skip_serializing_if = "Option::is_none")]
    pub tka_info: Option<TKAInfo>,
    #[serde(
        rename = "DomainDataPlaneAuditLogID",
        skip_serializing_if = "String::is_empty"
    )]
    pub domain_data_plane_audit_log_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug: Option<Debug>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_dial_plan: Option<ControlDialPlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_version: Option<ClientVersion>,
    /// Tailnet default for auto-updates, used on the first netmap only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_auto_update: Option<bool>,
    /// tsunagu's own: the role of a host of an exit node with standby hosts (sent to those
    /// hosts only; see [`super::StandbyInfo`]).
    #[serde(rename = "TsunaguStandby", skip_serializing_if = "Option::is_none")]
    pub tsunagu_standby: Option<super::StandbyInfo>,
}

impl MapResponse {
    /// `{"KeepAlive":true}`: keeps an idle stream (and its NATs) open.
    pub fn keep_alive() -> Self {
        MapResponse {
            keep_alive: true,
            ..Default::default()
        }
    }

    /// Whether the message carries nothing (Go's clients treat it like a keep-alive).
    pub fn is_empty(&self) -> bool {
        *self == MapResponse::default()
    }
}

/// Go's `tailcfg.PingRequest`: asks the client to prove liveness (or ping a peer) by an
/// HTTP request to `URL`.
///
/// `URLIsNoise` and `Types` are always written although Go has `omitempty` on them:
/// tailscale-rs requires both, and Go reads them either way.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PingRequest {
    #[serde(rename = "URL")]
    pub url: String,
    /// Send the request over the Noise channel rather than plain HTTPS.
    #[serde(rename = "URLIsNoise")]
    pub url_is_noise: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub log: bool,
    /// Comma-separated ping types (`"disco"`, `"TSMP"`, `"ICMP"`, `"peerapi"`, `"c2n"`);
    /// empty = just answer.
    #[serde(deserialize_with = "null_default")]
    pub types: String,
    /// Peer to ping; Go's zero address (`""`) = none.
    #[serde(
        rename = "IP",
        serialize_with = "ser_addr_or_empty",
        deserialize_with = "de_addr_or_empty"
    )]
    pub ip: Option<IpAddr>,
    /// For `c2n`: an HTTP request to execute.
    #[serde(skip_serializing_if = "Base64Bytes::is_empty")]
    pub payload: Base64Bytes,
}

/// Go's `tailcfg.DisplayMessage`: a health message to show the user (capver 117+).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DisplayMessage {
    pub title: String,
    pub text: String,
    /// `"high"`, `"medium"`, `"low"`.
    pub severity: String,
    #[serde(skip_serializing_if = "is_false")]
    pub impacts_connectivity: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_action: Option<DisplayMessageAction>,
}

/// Go's `tailcfg.DisplayMessageAction`: a button under a [`DisplayMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DisplayMessageAction {
    #[serde(rename = "URL")]
    pub url: String,
    pub label: String,
}

/// Go's `tailcfg.TKAInfo`: the server's view of tailnet lock.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TKAInfo {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub head: String,
    #[serde(skip_serializing_if = "is_false")]
    pub disabled: bool,
}

/// Go's `tailcfg.Debug` (deprecated in favour of node attributes; subset).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Debug {
    #[serde(skip_serializing_if = "super::de::is_zero_f64")]
    pub sleep_seconds: f64,
    #[serde(skip_serializing_if = "is_false")]
    pub disable_log_tail: bool,
    /// Ask the client process to exit with this code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
}

/// Go's `tailcfg.ControlDialPlan`: how to reach the control server without DNS.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ControlDialPlan {
    #[serde(deserialize_with = "null_default")]
    pub candidates: Vec<ControlIPCandidate>,
}

/// Go's `tailcfg.ControlIPCandidate`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ControlIPCandidate {
    #[serde(rename = "IP", skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(rename = "ACEHost", skip_serializing_if = "String::is_empty")]
    pub ace_host: String,
    #[serde(skip_serializing_if = "super::de::is_zero_f64")]
    pub dial_start_delay_sec: f64,
    #[serde(skip_serializing_if = "super::de::is_zero_f64")]
    pub dial_timeout_sec: f64,
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub priority: i64,
}

/// Go's `tailcfg.ClientVersion`: the latest client release for this platform.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ClientVersion {
    #[serde(skip_serializing_if = "is_false")]
    pub running_latest: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub latest_version: String,
    #[serde(skip_serializing_if = "is_false")]
    pub urgent_security_update: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub notify: bool,
    #[serde(rename = "NotifyURL", skip_serializing_if = "String::is_empty")]
    pub notify_url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub notify_text: String,
}
