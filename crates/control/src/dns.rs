//! The tailnet's DNS settings (`[dns]` in the server's file, Headscale's names where they
//! fit) and what clients are told: Tailscale's `DNSConfig` in every map.
//!
//! | setting | `DNSConfig` |
//! |---|---|
//! | `magic_dns` | `Proxied` (clients answer node names through 100.100.100.100) and the base domain first among `Domains` (search) |
//! | `base_domain` | the suffix of every node's name (`laptop.<base_domain>.`); clients take the MagicDNS domain from their own name |
//! | `nameservers.global` | `Resolvers` with `override_local_dns`, else `FallbackResolvers` (used only where the OS has none, or behind an exit node that offers no DNS) |
//! | `nameservers.split` | `Routes`: domain → resolvers |
//! | `search_domains` | `Domains`, after the base domain |
//! | `extra_records` | `ExtraRecords` (A and AAAA) |
//!
//! Every value is checked when the server starts; a bad one is refused with the field and
//! the reason, before anything is served.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use tsunagu_proto::tailcfg::{DNSConfig, DNSRecord, Resolver};

/// The base domain when none is configured. `.internal` is reserved for private use
/// (ICANN, 2024), so it never collides with a public name.
pub const DEFAULT_BASE_DOMAIN: &str = "tailnet.internal";

/// `[dns]` as written in the file (every key optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    pub magic_dns: Option<bool>,
    pub base_domain: Option<String>,
    pub override_local_dns: Option<bool>,
    #[serde(default)]
    pub nameservers: NameserversFile,
    #[serde(default)]
    pub search_domains: Vec<String>,
    #[serde(default)]
    pub extra_records: Vec<ExtraRecordFile>,
}

/// `[dns.nameservers]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameserversFile {
    #[serde(default)]
    pub global: Vec<String>,
    /// Domain → nameservers.
    #[serde(default)]
    pub split: BTreeMap<String, Vec<String>>,
}

/// One `[[dns.extra_records]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraRecordFile {
    pub name: String,
    #[serde(default, rename = "type")]
    pub record_type: String,
    pub value: String,
}

/// The checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub magic_dns: bool,
    /// Without dots at either end.
    pub base_domain: String,
    pub override_local_dns: bool,
    pub global: Vec<String>,
    pub split: BTreeMap<String, Vec<String>>,
    pub search_domains: Vec<String>,
    pub extra_records: Vec<DNSRecord>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            magic_dns: true,
            base_domain: DEFAULT_BASE_DOMAIN.into(),
            override_local_dns: false,
            global: Vec::new(),
            split: BTreeMap::new(),
            search_domains: Vec::new(),
            extra_records: Vec::new(),
        }
    }
}

/// A refused setting: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dns.{field}: {reason}")]
pub struct DnsConfigError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> DnsConfigError {
    DnsConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A DNS name as a list of labels (RFC 1035 lengths; letters, digits, `-` and `_`, no
/// label starting or ending with `-`). A trailing dot is allowed and dropped.
pub fn check_domain(name: &str) -> Result<String, String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if n.is_empty() {
        return Err("is empty".into());
    }
    if n.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    for label in n.split('.') {
        if label.is_empty() {
            return Err(format!("{name:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("{name:?} has a label longer than 63 characters"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "{name:?} may hold only letters, digits, '-' and '_' in its labels"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{name:?} has a label starting or ending with '-'"));
        }
    }
    Ok(n)
}

/// A nameserver as clients take it: an IP, `IP:port` (`[v6]:port`), or a DoH URL.
pub fn check_nameserver(s: &str) -> Result<String, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("https://") {
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        if host.is_empty() {
            return Err(format!("{s:?} names no host"));
        }
        return Ok(s.to_string());
    }
    if s.parse::<IpAddr>().is_ok() {
        return Ok(s.to_string());
    }
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(s.to_string()),
        Ok(_) => Err(format!("{s:?}: port 0")),
        Err(_) => Err(format!(
            "{s:?} is not an IP address, IP:port or https:// URL"
        )),
    }
}

impl DnsFile {
    /// Check every value; the first bad one is the error.
    pub fn validate(&self) -> Result<DnsSettings, DnsConfigError> {
        let d = DnsSettings::default();
        let magic_dns = self.magic_dns.unwrap_or(d.magic_dns);
        let base_domain = match &self.base_domain {
            Some(b) => check_domain(b).map_err(|r| bad("base_domain", r))?,
            None => d.base_domain,
        };
        if base_domain.split('.').count() < 2 {
            return Err(bad(
                "base_domain",
                format!(
                    "{base_domain:?} needs at least two labels (e.g. tailnet.internal): a single label would be a top-level domain"
                ),
            ));
        }
        let mut global = Vec::new();
        for (i, ns) in self.nameservers.global.iter().enumerate() {
            global.push(
                check_nameserver(ns).map_err(|r| bad(format!("nameservers.global[{i}]"), r))?,
            );
        }
        let mut split = BTreeMap::new();
        for (domain, servers) in &self.nameservers.split {
            let field = format!("nameservers.split.{domain:?}");
            let dom = check_domain(domain).map_err(|r| bad(&field, r))?;
            if servers.is_empty() {
                return Err(bad(&field, "lists no nameserver"));
            }
            let mut list = Vec::new();
            for (i, ns) in servers.iter().enumerate() {
                list.push(check_nameserver(ns).map_err(|r| bad(format!("{field}[{i}]"), r))?);
            }
            if split.insert(dom.clone(), list).is_some() {
                return Err(bad(&field, format!("{dom:?} is given twice")));
            }
        }
        let mut search_domains = Vec::new();
        for (i, s) in self.search_domains.iter().enumerate() {
            search_domains
                .push(check_domain(s).map_err(|r| bad(format!("search_domains[{i}]"), r))?);
        }
        let mut extra_records = Vec::new();
        for (i, r) in self.extra_records.iter().enumerate() {
            let at = |f: &str| format!("extra_records[{i}].{f}");
            let name = check_domain(&r.name).map_err(|e| bad(at("name"), e))?;
            let ip: IpAddr = r
                .value
                .trim()
                .parse()
                .map_err(|_| bad(at("value"), format!("{:?} is not an IP address", r.value)))?;
            let t = r.record_type.trim().to_ascii_uppercase();
            match (t.as_str(), ip) {
                ("" | "A", IpAddr::V4(_)) | ("" | "AAAA", IpAddr::V6(_)) => {}
                ("A" | "AAAA", _) => {
                    return Err(bad(
                        at("value"),
                        format!("{ip} does not fit a record of type {t}"),
                    ));
                }
                _ => {
                    return Err(bad(
                        at("type"),
                        format!("{:?}: only A and AAAA records are served", r.record_type),
                    ));
                }
            }
            extra_records.push(DNSRecord {
                name,
                record_type: t,
                value: ip.to_string(),
            });
        }
        Ok(DnsSettings {
            magic_dns,
            base_domain,
            override_local_dns: self.override_local_dns.unwrap_or(d.override_local_dns),
            global,
            split,
            search_domains,
            extra_records,
        })
    }
}

impl DnsSettings {
    /// What every node is told (the same for all: nothing in it depends on the viewer).
    pub fn to_dns_config(&self) -> DNSConfig {
        let resolvers: Vec<Resolver> = self.global.iter().map(Resolver::new).collect();
        let mut domains = Vec::new();
        if self.magic_dns {
            domains.push(self.base_domain.clone());
        }
        for s in &self.search_domains {
            if !domains.contains(s) {
                domains.push(s.clone());
            }
        }
        let (resolvers, fallback_resolvers) = if self.override_local_dns {
            (resolvers, Vec::new())
        } else {
            (Vec::new(), resolvers)
        };
        DNSConfig {
            resolvers,
            fallback_resolvers,
            routes: self
                .split
                .iter()
                .map(|(d, rs)| (d.clone(), rs.iter().map(Resolver::new).collect()))
                .collect(),
            domains,
            proxied: self.magic_dns,
            extra_records: self.extra_records.clone(),
            ..DNSConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml_text: &str) -> DnsFile {
        #[derive(Deserialize)]
        struct W {
            dns: DnsFile,
        }
        toml::from_str::<W>(toml_text).unwrap().dns
    }

    #[test]
    fn defaults_are_magic_dns_on_the_internal_domain() {
        let s = DnsFile::default().validate().unwrap();
        let c = s.to_dns_config();
        assert!(c.proxied);
        assert_eq!(c.domains, ["tailnet.internal"]);
        assert!(c.resolvers.is_empty() && c.fallback_resolvers.is_empty());
    }

    #[test]
    fn a_full_section_maps_like_headscale() {
        let s = file(
            r#"
            [dns]
            base_domain = "ts.example.test."
            override_local_dns = true
            search_domains = ["corp.example.test"]
            nameservers.global = ["203.0.113.53", "[2001:db8::53]:5353", "https://doh.example.test/dns-query"]
            nameservers.split = { "lab.test" = ["203.0.113.54"] }
            [[dns.extra_records]]
            name = "grafana.ts.example.test"
            value = "100.64.0.9"
            [[dns.extra_records]]
            name = "v6.ts.example.test"
            type = "aaaa"
            value = "fd7a:115c:a1e0::9"
            "#,
        )
        .validate()
        .unwrap();
        let c = s.to_dns_config();
        assert_eq!(c.domains, ["ts.example.test", "corp.example.test"]);
        assert_eq!(c.resolvers.len(), 3);
        assert!(c.fallback_resolvers.is_empty());
        assert_eq!(c.routes["lab.test"][0].addr, "203.0.113.54");
        assert_eq!(c.extra_records[1].record_type, "AAAA");
        // Without override_local_dns the global nameservers are only a fallback.
        let s = file("[dns]\nnameservers.global = [\"203.0.113.53\"]\n")
            .validate()
            .unwrap();
        let c = s.to_dns_config();
        assert!(c.resolvers.is_empty());
        assert_eq!(c.fallback_resolvers[0].addr, "203.0.113.53");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = |t: &str| file(t).validate().unwrap_err().to_string();
        assert_eq!(
            err("[dns]\nbase_domain = \"a..b\"\n"),
            "dns.base_domain: \"a..b\" has an empty label"
        );
        assert!(err("[dns]\nbase_domain = \"internal\"\n").contains("at least two labels"));
        assert_eq!(
            err("[dns]\nnameservers.global = [\"203.0.113.53\", \"dns.example\"]\n"),
            "dns.nameservers.global[1]: \"dns.example\" is not an IP address, IP:port or https:// URL"
        );
        assert!(
            err("[dns]\nnameservers.split = { \"lab.test\" = [] }\n")
                .starts_with("dns.nameservers.split.\"lab.test\": lists no nameserver")
        );
        assert!(
            err("[dns]\n[[dns.extra_records]]\nname = \"x.test\"\ntype = \"A\"\nvalue = \"fd7a::1\"\n")
                .starts_with("dns.extra_records[0].value: ")
        );
        assert!(
            err("[dns]\n[[dns.extra_records]]\nname = \"x.test\"\ntype = \"TXT\"\nvalue = \"1.2.3.4\"\n")
                .starts_with("dns.extra_records[0].type: ")
        );
        assert!(
            err("[dns]\nsearch_domains = [\"-x.test\"]\n").starts_with("dns.search_domains[0]: ")
        );
    }
}
