//! The DERP map: which relay servers exist and where.

use super::de::{is_false, is_zero_f64, is_zero_i32, null_default};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Go's `tailcfg.DERPMap`. Regions are keyed by region ID (a decimal string in JSON).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DERPMap {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home_params: Option<DERPHomeParams>,
    /// Always written, as in Go.
    #[serde(deserialize_with = "null_default")]
    pub regions: BTreeMap<i32, DERPRegion>,
    /// Clients should drop Tailscale's default regions (only meaningful when a client
    /// merges maps). Go's tag: `omitDefaultRegions`.
    #[serde(rename = "omitDefaultRegions", skip_serializing_if = "is_false")]
    pub omit_default_regions: bool,
}

impl DERPMap {
    /// A map of the given regions, keyed by their `region_id`.
    pub fn from_regions(regions: impl IntoIterator<Item = DERPRegion>) -> Self {
        DERPMap {
            regions: regions.into_iter().map(|r| (r.region_id, r)).collect(),
            ..Default::default()
        }
    }
}

/// Go's `tailcfg.DERPHomeParams`: server-side tuning of home-region choice.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DERPHomeParams {
    /// Multiplier on a region's measured latency (< 1 favours it).
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub region_score: BTreeMap<i32, f64>,
}

/// Go's `tailcfg.DERPRegion`: one relay region (nodes in it share traffic).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DERPRegion {
    /// Non-zero; 900-999 are conventionally for self-hosted regions.
    #[serde(rename = "RegionID")]
    pub region_id: i32,
    /// Short code, e.g. `"nyc"`.
    pub region_code: String,
    pub region_name: String,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub latitude: f64,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub longitude: f64,
    /// Deprecated by `NoMeasureNoHome`.
    #[serde(skip_serializing_if = "is_false")]
    pub avoid: bool,
    /// Do not measure or pick as home, still usable to reach peers homed there (115+).
    #[serde(skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    /// Always written (`[]` at least), as in Go.
    #[serde(deserialize_with = "null_default")]
    pub nodes: Vec<DERPNode>,
}

/// Go's `tailcfg.DERPNode`: one DERP (and STUN) server.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DERPNode {
    /// Unique within the map, e.g. `"1a"`.
    pub name: String,
    #[serde(rename = "RegionID")]
    pub region_id: i32,
    /// DNS name clients connect to (and the TLS name unless `CertName`).
    pub host_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    /// `""` = resolve `HostName`; `"none"` = no IPv4; else a literal address.
    #[serde(rename = "IPv4", skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(rename = "IPv6", skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// 0 = 3478; -1 = no STUN.
    #[serde(rename = "STUNPort", skip_serializing_if = "is_zero_i32")]
    pub stun_port: i32,
    #[serde(rename = "STUNOnly", skip_serializing_if = "is_false")]
    pub stun_only: bool,
    /// 0 = 443.
    #[serde(rename = "DERPPort", skip_serializing_if = "is_zero_i32")]
    pub derp_port: i32,
    /// Skip TLS verification (tests only).
    #[serde(skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    #[serde(rename = "STUNTestIP", skip_serializing_if = "String::is_empty")]
    pub stun_test_ip: String,
    #[serde(skip_serializing_if = "is_false")]
    pub can_port80: bool,
}
