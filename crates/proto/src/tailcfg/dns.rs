//! DNS configuration pushed to clients.

use super::de::{is_false, null_default};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Go's `tailcfg.DNSConfig` (subset: every field Go sends except the internal
/// `TempCorpIssue13969`, which is ignored on input). All fields `omitempty`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DNSConfig {
    /// Upstream resolvers for names not otherwise routed (empty = keep the OS's).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub resolvers: Vec<Resolver>,
    /// DNS suffix → resolvers. An empty list means "answered by Tailscale's own resolver"
    /// (MagicDNS suffixes); Go writes it as `null`, read here as empty and written as `[]`.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "de_routes"
    )]
    pub routes: BTreeMap<String, Vec<Resolver>>,
    /// Used when the OS has no resolvers of its own.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub fallback_resolvers: Vec<Resolver>,
    /// Search domains.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub domains: Vec<String>,
    /// MagicDNS on: clients answer names of tailnet nodes through 100.100.100.100.
    #[serde(skip_serializing_if = "is_false")]
    pub proxied: bool,
    /// Legacy (capver 9-14) plain nameserver list.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub nameservers: Vec<IpAddr>,
    /// Domains the node can get TLS certificates for.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub cert_domains: Vec<String>,
    /// Extra records the client's resolver answers (MagicDNS names of peers etc.).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub extra_records: Vec<DNSRecord>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub exit_node_filtered_set: Vec<String>,
}

fn de_routes<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<Resolver>>, D::Error> {
    let raw: Option<BTreeMap<String, Option<Vec<Option<Resolver>>>>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default().into_iter().flatten().collect()))
        .collect())
}

/// Go's `dnstype.Resolver`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Resolver {
    /// `"1.1.1.1"`, `"1.1.1.1:5353"`, `"https://dns.example/dns-query"` (DoH),
    /// `"tls://…"` (DoT), `"http://…"` (DoH over WireGuard to an exit node).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub addr: String,
    /// Addresses to reach a DoH/DoT `Addr` by without resolving it.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub bootstrap_resolution: Vec<IpAddr>,
    /// Keep using this resolver while an exit node is in use (capver 125+).
    #[serde(skip_serializing_if = "is_false")]
    pub use_with_exit_node: bool,
}

impl Resolver {
    /// A plain resolver at `addr` (an IP, or `ip:port`, or a DoH/DoT URL).
    pub fn new(addr: impl Into<String>) -> Self {
        Resolver {
            addr: addr.into(),
            ..Default::default()
        }
    }
}

/// Go's `tailcfg.DNSRecord`: an extra record answered by the client's resolver.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DNSRecord {
    /// FQDN, trailing dot optional.
    pub name: String,
    /// `""` (= A or AAAA by the value's family), `"A"`, `"AAAA"`, `"TXT"`, …
    #[serde(rename = "Type", skip_serializing_if = "String::is_empty")]
    pub record_type: String,
    pub value: String,
}
