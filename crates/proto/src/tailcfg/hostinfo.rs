//! `Hostinfo` and its parts: what a client says about its host. The server stores it and
//! forwards it to peers inside [`Node::hostinfo`](super::Node::hostinfo), so unknown fields
//! are kept ([`Hostinfo::extra`]) and written back out unchanged.

use super::StableNodeID;
use super::de::{is_false, is_zero_f64, is_zero_i32, null_default};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Go's `tailcfg.Hostinfo`. Every Go field is `omitempty`, so every field here is skipped
/// when empty. `opt.Bool` fields are `Option<bool>`.
#[serde_with::apply(
    String => #[serde(skip_serializing_if = "String::is_empty")],
    Option => #[serde(skip_serializing_if = "Option::is_none")],
    bool => #[serde(skip_serializing_if = "is_false")],
    Vec => #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_default")],
)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Hostinfo {
    /// Client version in `version.Long` form, e.g. `"1.90.9-t…-g…"`.
    #[serde(rename = "IPNVersion")]
    pub ipn_version: String,
    #[serde(rename = "FrontendLogID")]
    pub frontend_log_id: String,
    #[serde(rename = "BackendLogID")]
    pub backend_log_id: String,
    /// `version.OS()`: `"linux"`, `"windows"`, `"macOS"`, `"iOS"`, `"android"`, …
    #[serde(rename = "OS")]
    pub os: String,
    #[serde(rename = "OSVersion")]
    pub os_version: String,
    pub container: Option<bool>,
    /// `hostinfo.EnvType` short code (`"k8s"`, `"kn"`, `"fly"`, …).
    pub env: String,
    pub distro: String,
    pub distro_version: String,
    pub distro_code_name: String,
    /// Set by tsnet applications (`"k8s-operator"`, …).
    pub app: String,
    pub desktop: Option<bool>,
    pub package: String,
    pub device_model: String,
    pub push_device_token: String,
    /// The OS hostname; the server derives the node's MagicDNS name from it.
    pub hostname: String,
    pub shields_up: bool,
    pub sharee_node: bool,
    pub no_logs_no_support: bool,
    pub wire_ingress: bool,
    pub ingress_enabled: bool,
    pub allows_update: bool,
    /// `uname -m`.
    pub machine: String,
    pub go_arch: String,
    pub go_arch_var: String,
    pub go_version: String,
    /// Routes the node offers to route (`--advertise-routes`); an exit node offers both
    /// `0.0.0.0/0` and `::/0`. Only the server's approval puts them into `AllowedIPs`.
    #[serde(rename = "RoutableIPs")]
    pub routable_ips: Vec<ipnet::IpNet>,
    /// ACL tags the node asks for (`--advertise-tags`).
    pub request_tags: Vec<String>,
    #[serde(rename = "WoLMACs")]
    pub wol_macs: Vec<String>,
    pub services: Vec<Service>,
    pub net_info: Option<NetInfo>,
    /// SSH host keys; non-empty means Tailscale SSH is enabled. Go's tag: `sshHostKeys`.
    #[serde(rename = "sshHostKeys")]
    pub ssh_host_keys: Vec<String>,
    pub cloud: String,
    pub userspace: Option<bool>,
    pub userspace_router: Option<bool>,
    pub app_connector: Option<bool>,
    pub services_hash: String,
    /// The exit node the client has selected (capver 122+), empty if none.
    #[serde(rename = "ExitNodeID", skip_serializing_if = "StableNodeID::is_empty")]
    pub exit_node_id: StableNodeID,
    pub location: Option<Location>,
    /// TPM metadata, kept opaque.
    #[serde(rename = "TPM")]
    pub tpm: Option<serde_json::Value>,
    pub state_encrypted: Option<bool>,
    /// Fields this crate does not model, kept so that they round-trip to peers.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Hostinfo {
    /// Whether the node offers itself as an exit node: Go clients require both default
    /// routes (`0.0.0.0/0` and `::/0`) in `RoutableIPs`.
    pub fn advertises_exit_node(&self) -> bool {
        let has = |s: &str| self.routable_ips.iter().any(|n| n.to_string() == s);
        has("0.0.0.0/0") && has("::/0")
    }
}

/// Go's `tailcfg.NetInfo`: the client's view of its network (NAT, UDP, DERP home and
/// latencies). Its `opt.Bool` fields have no `omitempty` in Go (sent as `null` when
/// unknown); here they are skipped when unknown, which Go reads the same way.
#[serde_with::apply(
    String => #[serde(skip_serializing_if = "String::is_empty")],
    Option => #[serde(skip_serializing_if = "Option::is_none")],
)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetInfo {
    #[serde(rename = "MappingVariesByDestIP")]
    pub mapping_varies_by_dest_ip: Option<bool>,
    pub hair_pinning: Option<bool>,
    #[serde(rename = "WorkingIPv6")]
    pub working_ipv6: Option<bool>,
    #[serde(rename = "OSHasIPv6")]
    pub os_has_ipv6: Option<bool>,
    #[serde(rename = "WorkingUDP")]
    pub working_udp: Option<bool>,
    #[serde(rename = "WorkingICMPv4")]
    pub working_icmpv4: Option<bool>,
    #[serde(skip_serializing_if = "is_false")]
    pub have_port_map: bool,
    #[serde(rename = "UPnP")]
    pub upnp: Option<bool>,
    #[serde(rename = "PMP")]
    pub pmp: Option<bool>,
    #[serde(rename = "PCP")]
    pub pcp: Option<bool>,
    /// The client's home DERP region; 0 = none yet. Always written, as Go does.
    #[serde(rename = "PreferredDERP")]
    pub preferred_derp: i32,
    /// `"wired"`, `"wifi"`, `"mobile"`, …
    pub link_type: String,
    /// Latency in seconds by `"<regionID>-v4"` / `"-v6"`.
    #[serde(
        rename = "DERPLatency",
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub derp_latency: BTreeMap<String, f64>,
    pub firewall_mode: String,
    /// Fields this crate does not model, kept so that they round-trip.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Go's `tailcfg.Location`: where an (exit) node says it is. All fields `omitempty`.
#[serde_with::apply(
    String => #[serde(skip_serializing_if = "String::is_empty")],
    f64 => #[serde(skip_serializing_if = "is_zero_f64")],
)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Location {
    pub country: String,
    pub country_code: String,
    pub city: String,
    pub city_code: String,
    pub latitude: f64,
    pub longitude: f64,
    /// Exit-node preference among nodes of the same location; 0 = none.
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub priority: i32,
}

/// Go's `tailcfg.Service`: a listening service the node reports (with `CollectServices`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Service {
    /// `"tcp"`, `"udp"`, `"peerapi4"`, `"peerapi6"`, `"peerapi-dns-proxy"`.
    pub proto: String,
    pub port: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}
