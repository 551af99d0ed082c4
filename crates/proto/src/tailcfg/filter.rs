//! Packet filter rules (Go's `tailcfg.FilterRule` and parts).

use super::de::null_default;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// Go's `tailcfg.FilterRule`: traffic from `SrcIPs` to `DstPorts` is allowed (network
/// rule), or `CapGrant` grants peer capabilities (application rule). Clients drop all
/// inbound traffic no rule allows; a netmap without any rule blocks everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct FilterRule {
    /// Sources: `"*"`, an IP, a CIDR, a range `"a-b"`, or `"cap:<node capability>"`.
    /// Always written (as in Go).
    #[serde(rename = "SrcIPs", deserialize_with = "null_default")]
    pub src_ips: Vec<String>,
    /// Legacy (2020) prefix lengths for `SrcIPs`; read and ignored, never written.
    #[serde(
        rename = "SrcBits",
        skip_serializing,
        deserialize_with = "null_default"
    )]
    pub src_bits: Vec<i32>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub dst_ports: Vec<NetPortRange>,
    /// IP protocol numbers; empty = TCP, UDP, ICMPv4 and ICMPv6.
    #[serde(
        rename = "IPProto",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub ip_proto: Vec<i32>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub cap_grant: Vec<CapGrant>,
}

impl FilterRule {
    /// Go's `tailcfg.FilterAllowAll` rule: any source to any destination, ports 0-65535,
    /// default protocols.
    pub fn allow_all() -> Self {
        FilterRule::allow(["*"], [NetPortRange::any("*")])
    }

    /// A network rule from the given sources to the given destinations.
    pub fn allow<S: Into<String>>(
        src_ips: impl IntoIterator<Item = S>,
        dst_ports: impl IntoIterator<Item = NetPortRange>,
    ) -> Self {
        FilterRule {
            src_ips: src_ips.into_iter().map(Into::into).collect(),
            dst_ports: dst_ports.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// Go's `tailcfg.NetPortRange`: destination addresses and a port range.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetPortRange {
    /// Same forms as [`FilterRule::src_ips`] (no `cap:`).
    #[serde(rename = "IP")]
    pub ip: String,
    /// Legacy prefix length for `IP`; only written when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<i32>,
    pub ports: PortRange,
}

impl NetPortRange {
    /// `ip` on all ports.
    pub fn any(ip: impl Into<String>) -> Self {
        NetPortRange {
            ip: ip.into(),
            bits: None,
            ports: PortRange::ANY,
        }
    }
}

/// Go's `tailcfg.PortRange`, inclusive on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Go's `PortRangeAny`: 0-65535.
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: 65535,
    };

    /// A single port.
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }
}

/// Go's `tailcfg.CapGrant`: capabilities granted to the rule's sources on `Dsts`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CapGrant {
    #[serde(deserialize_with = "null_default")]
    pub dsts: Vec<ipnet::IpNet>,
    /// Legacy value-less capabilities (use `CapMap`).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub caps: Vec<String>,
    /// Peer capability → JSON values (Go's `PeerCapMap`); `null` values read as empty.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "de_peer_cap_map"
    )]
    pub cap_map: BTreeMap<String, Vec<serde_json::Value>>,
}

fn de_peer_cap_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Vec<serde_json::Value>>, D::Error> {
    let raw: Option<BTreeMap<String, Option<Vec<serde_json::Value>>>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
}
