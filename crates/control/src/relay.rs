//! The embedded relay: which DERP region the server announces, and how it is wired.
//!
//! `tsunagu-server serve` runs a DERP relay (crate `tsunagu-derp`) on its own client
//! listener (`/derp`) and a STUN server on UDP, and announces one region with one node
//! built from the server URL: the URL's host is the node's `HostName` (and `IPv4`/`IPv6`
//! when it is an address literal, so clients need no DNS), its port the `DERPPort`.
//!
//! Go clients reach DERP nodes over TLS only (`derphttp`: HTTPS unless the client runs
//! with `TS_DEBUG_USE_DERP_HTTP`), verifying the certificate against `HostName` (or
//! `CertName`) unless the node says `InsecureForTests`. So with `--tls-cert/--tls-key`
//! everything works as is. A plain-HTTP server runs the relay and STUN but announces no
//! region unless told to ([`RelaySettings::announce_plain_http`]): a Go client given a
//! region it cannot reach retries forever and its reports churn.
//!
//! The map may also list regions run elsewhere ([`RegionSpec`]: a standalone
//! `tsunagu-server relay` on another machine, say), given in the configuration file or on
//! the command line and checked here ([`RegionConfig::validate`], [`check_regions`]), so
//! that nodes homed on different regions still reach each other over a relay: a node
//! sends to a peer through the peer's home region.

use crate::server::{ServerError, io_err, load_tls, serve_front};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use tsunagu_proto::tailcfg::{DERPMap, DERPNode, DERPRegion};

/// Region IDs 900-999 are conventionally self-hosted.
pub const DEFAULT_REGION_ID: i32 = 900;
pub const DEFAULT_REGION_CODE: &str = "tsunagu";
pub const DEFAULT_STUN_PORT: u16 = 3478;

/// How the embedded relay is announced and run.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// UDP address of the STUN server; `None` runs no STUN (the node says `STUNPort: -1`).
    pub stun_listen: Option<String>,
    pub region_id: i32,
    pub region_code: String,
    pub region_name: String,
    /// Tell clients to skip certificate verification (lab setups with self-signed certs).
    pub insecure_for_tests: bool,
    /// Pre-shared key of other relays that mesh with this one.
    pub mesh_key: Option<String>,
    /// `http://HOST:PORT` of the other relays of the region (needs `mesh_key`).
    pub mesh_with: Vec<String>,
    /// URLs of the other relays of the region to announce after this one (clients try
    /// the nodes of a region in order); their STUN is assumed on port 3478.
    pub extra_nodes: Vec<String>,
    /// Announce the region even when the server URL is plain `http://`. Off by default:
    /// Go clients would try TLS to it, fail, and retry forever, their network report
    /// (and so their map requests) churning meanwhile. For clients that speak DERP over
    /// plain HTTP (Go clients run with `TS_DEBUG_USE_DERP_HTTP=1`; tsunagud later).
    pub announce_plain_http: bool,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            stun_listen: Some(format!("0.0.0.0:{DEFAULT_STUN_PORT}")),
            region_id: DEFAULT_REGION_ID,
            region_code: DEFAULT_REGION_CODE.to_string(),
            region_name: "tsunagu".to_string(),
            insecure_for_tests: false,
            mesh_key: None,
            mesh_with: Vec::new(),
            extra_nodes: Vec::new(),
            announce_plain_http: false,
        }
    }
}

/// The host and port of an `http://` or `https://` URL (default ports 80 / 443).
fn host_port(url: &str) -> Result<(String, u16), String> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else if let Some(r) = url.strip_prefix("http://") {
        (r, 80)
    } else {
        return Err(format!("server URL {url:?} is not http:// or https://"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("server URL {url:?} has no host"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("server URL {url:?}: unclosed IPv6 literal"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("server URL {url:?}: bad port {p:?}"))?,
        None => default_port,
    };
    Ok((host, port))
}

/// The DERP map announcing this server's relay. `stun_port`: the bound STUN port, or
/// `None` when STUN is off.
pub fn derp_map(
    server_url: &str,
    stun_port: Option<u16>,
    s: &RelaySettings,
) -> Result<DERPMap, String> {
    let node = |name: String, url: &str, stun_port: Option<u16>| -> Result<DERPNode, String> {
        let (host, port) = host_port(url)?;
        let (ipv4, ipv6) = match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => (ip.to_string(), "none".to_string()),
            Ok(IpAddr::V6(ip)) => ("none".to_string(), ip.to_string()),
            Err(_) => (String::new(), String::new()),
        };
        Ok(DERPNode {
            name,
            region_id: s.region_id,
            host_name: host,
            ipv4,
            ipv6,
            stun_port: match stun_port {
                None => -1,
                Some(DEFAULT_STUN_PORT) => 0,
                Some(p) => i32::from(p),
            },
            derp_port: if port == 443 { 0 } else { i32::from(port) },
            insecure_for_tests: s.insecure_for_tests,
            ..DERPNode::default()
        })
    };
    let mut nodes = vec![node(format!("{}a", s.region_id), server_url, stun_port)?];
    for (i, url) in s.extra_nodes.iter().enumerate() {
        // Names "900b", "900c", …, then "900n27" and on.
        let suffix = match u8::try_from(i + 1) {
            Ok(n) if n < 26 => char::from(b'a' + n).to_string(),
            _ => format!("n{}", i + 1),
        };
        nodes.push(node(
            format!("{}{suffix}", s.region_id),
            url,
            Some(DEFAULT_STUN_PORT),
        )?);
    }
    Ok(DERPMap::from_regions([DERPRegion {
        region_id: s.region_id,
        region_code: s.region_code.clone(),
        region_name: s.region_name.clone(),
        nodes,
        ..DERPRegion::default()
    }]))
}

/// Region IDs that can be announced: positive, and at most 65535 because tsunagud (like
/// Tailscale's magicsock) encodes the region as the port of its relay endpoint.
pub const REGION_IDS: std::ops::RangeInclusive<i64> = 1..=65535;

/// Why a region given in the configuration cannot be announced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("id {0} is not a region ID (1-65535)")]
    BadId(i64),
    #[error("{field} {value} is not a port ({expected})")]
    BadPort {
        field: &'static str,
        value: i64,
        expected: &'static str,
    },
    #[error("code {0:?}: use letters, digits, '-', '_' or '.' (1-32 characters)")]
    BadCode(String),
    #[error("{field} {value:?} is not an {family} address")]
    BadAddress {
        field: &'static str,
        value: String,
        family: &'static str,
    },
    #[error("host {0:?} is not a host name or address")]
    BadHost(String),
    #[error("unknown key {0:?} (keys: {keys})", keys = REGION_KEYS.join(", "))]
    UnknownKey(String),
    #[error("{key}: {value:?} is not {what}")]
    BadValue {
        key: String,
        value: String,
        what: &'static str,
    },
    #[error("region id {0} is given twice (the server's own region counts)")]
    DuplicateId(i64),
    #[error("region code {0:?} is given twice (the server's own region counts)")]
    DuplicateCode(String),
}

/// The keys of a region, in the configuration file (`[[derp_region]]`) and on the command
/// line (`--derp-region id=901,code=b,...`).
pub const REGION_KEYS: &[&str] = &[
    "id",
    "code",
    "name",
    "host",
    "ipv4",
    "ipv6",
    "derp_port",
    "stun_port",
    "http",
    "insecure_for_tests",
];

/// A region as written in the configuration file or on the command line, not checked
/// yet: integers are wide so that a bad port gets our message, not a parser's.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub id: Option<i64>,
    pub code: Option<String>,
    /// As clients show it (default: the code).
    pub name: Option<String>,
    /// The relay's DNS name or address (what clients connect to, and its TLS name).
    pub host: Option<String>,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    /// Default 443, or 80 with `http`.
    pub derp_port: Option<i64>,
    /// Default 3478; -1 for a relay without STUN.
    pub stun_port: Option<i64>,
    /// The relay speaks plain HTTP (no TLS). Announced only with `derp_announce_http`,
    /// like the embedded relay of a plain-HTTP server.
    pub http: Option<bool>,
    /// Tell clients to skip verifying its certificate (labs only).
    pub insecure_for_tests: Option<bool>,
}

impl std::str::FromStr for RegionConfig {
    type Err = RegionError;

    /// `id=901,code=b,host=198.51.100.7,derp_port=8080,http`: comma-separated
    /// `key=value`; a boolean key alone means true.
    fn from_str(spec: &str) -> Result<Self, RegionError> {
        let mut c = RegionConfig::default();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            let bad = |what| RegionError::BadValue {
                key: key.to_string(),
                value: value.unwrap_or_default().to_string(),
                what,
            };
            let int = || -> Result<i64, RegionError> {
                value
                    .ok_or(bad("an integer"))?
                    .parse()
                    .map_err(|_| bad("an integer"))
            };
            let text = || -> Result<String, RegionError> {
                value
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or(bad("a value"))
            };
            let flag = || -> Result<bool, RegionError> {
                match value {
                    None | Some("true") => Ok(true),
                    Some("false") => Ok(false),
                    Some(_) => Err(bad("true or false")),
                }
            };
            match key {
                "id" => c.id = Some(int()?),
                "code" => c.code = Some(text()?),
                "name" => c.name = Some(text()?),
                "host" => c.host = Some(text()?),
                "ipv4" => c.ipv4 = Some(text()?),
                "ipv6" => c.ipv6 = Some(text()?),
                "derp_port" => c.derp_port = Some(int()?),
                "stun_port" => c.stun_port = Some(int()?),
                "http" => c.http = Some(flag()?),
                "insecure_for_tests" => c.insecure_for_tests = Some(flag()?),
                _ => return Err(RegionError::UnknownKey(key.to_string())),
            }
        }
        Ok(c)
    }
}

fn port(field: &'static str, value: i64, expected: &'static str) -> Result<u16, RegionError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(RegionError::BadPort {
            field,
            value,
            expected,
        })
}

fn valid_code(code: &str) -> bool {
    (1..=32).contains(&code.len())
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_host(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
        || (host.len() <= 253
            && host.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }))
}

impl RegionConfig {
    /// Check every field and fill in the defaults.
    pub fn validate(&self) -> Result<RegionSpec, RegionError> {
        let id = self.id.ok_or(RegionError::Missing("id"))?;
        let id = u16::try_from(id)
            .ok()
            .filter(|_| REGION_IDS.contains(&id))
            .ok_or(RegionError::BadId(id))?;
        let code = self.code.clone().ok_or(RegionError::Missing("code"))?;
        if !valid_code(&code) {
            return Err(RegionError::BadCode(code));
        }
        let host = self.host.clone().ok_or(RegionError::Missing("host"))?;
        if !valid_host(&host) {
            return Err(RegionError::BadHost(host));
        }
        let literal = host.parse::<IpAddr>().ok();
        let ipv4 = match &self.ipv4 {
            Some(a) => Some(a.parse().map_err(|_| RegionError::BadAddress {
                field: "ipv4",
                value: a.clone(),
                family: "IPv4",
            })?),
            None => match literal {
                Some(IpAddr::V4(a)) => Some(a),
                _ => None,
            },
        };
        let ipv6 = match &self.ipv6 {
            Some(a) => Some(a.parse().map_err(|_| RegionError::BadAddress {
                field: "ipv6",
                value: a.clone(),
                family: "IPv6",
            })?),
            None => match literal {
                Some(IpAddr::V6(a)) => Some(a),
                _ => None,
            },
        };
        let plain_http = self.http.unwrap_or(false);
        let derp_port = match self.derp_port {
            Some(p) => port("derp_port", p, "1-65535")?,
            None if plain_http => 80,
            None => 443,
        };
        let stun_port = match self.stun_port {
            None => Some(DEFAULT_STUN_PORT),
            Some(-1) => None,
            Some(p) => Some(port("stun_port", p, "1-65535, or -1 for no STUN")?),
        };
        Ok(RegionSpec {
            id,
            name: self.name.clone().unwrap_or_else(|| code.clone()),
            code,
            // Without an address of the other family, say "none" when the host is a
            // literal (clients then need no DNS), else let them resolve the name.
            resolve: literal.is_none(),
            host,
            ipv4,
            ipv6,
            derp_port,
            stun_port,
            plain_http,
            insecure_for_tests: self.insecure_for_tests.unwrap_or(false),
        })
    }
}

/// A relay region run elsewhere, announced in the DERP map (one node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSpec {
    pub id: u16,
    pub code: String,
    pub name: String,
    pub host: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Whether clients resolve `host` for an address family not given.
    pub resolve: bool,
    pub derp_port: u16,
    /// `None`: the relay runs no STUN server.
    pub stun_port: Option<u16>,
    /// The relay speaks plain HTTP (announced only with `derp_announce_http`).
    pub plain_http: bool,
    pub insecure_for_tests: bool,
}

impl RegionSpec {
    /// The region as the DERP map carries it.
    pub fn region(&self) -> DERPRegion {
        let id = i32::from(self.id);
        let addr = |a: Option<String>| match a {
            Some(a) => a,
            None if self.resolve => String::new(),
            None => "none".to_string(),
        };
        DERPRegion {
            region_id: id,
            region_code: self.code.clone(),
            region_name: self.name.clone(),
            nodes: vec![DERPNode {
                name: format!("{id}a"),
                region_id: id,
                host_name: self.host.clone(),
                ipv4: addr(self.ipv4.map(|a| a.to_string())),
                ipv6: addr(self.ipv6.map(|a| a.to_string())),
                stun_port: match self.stun_port {
                    None => -1,
                    Some(DEFAULT_STUN_PORT) => 0,
                    Some(p) => i32::from(p),
                },
                // 0 means 443 in the map; a plain-HTTP relay always says its port.
                derp_port: if self.derp_port == 443 && !self.plain_http {
                    0
                } else {
                    i32::from(self.derp_port)
                },
                insecure_for_tests: self.insecure_for_tests,
                ..DERPNode::default()
            }],
            ..DERPRegion::default()
        }
    }
}

/// Regions must not share an ID or a code, among themselves or with the server's own
/// region (`own`: its ID and code, when it runs one).
pub fn check_regions(own: Option<(i32, &str)>, regions: &[RegionSpec]) -> Result<(), RegionError> {
    let mut ids = BTreeSet::new();
    let mut codes = BTreeSet::new();
    let own = own.map(|(id, code)| (i64::from(id), code.to_string()));
    let all = own
        .into_iter()
        .chain(regions.iter().map(|r| (i64::from(r.id), r.code.clone())));
    for (id, code) in all {
        if !ids.insert(id) {
            return Err(RegionError::DuplicateId(id));
        }
        if !codes.insert(code.to_ascii_lowercase()) {
            return Err(RegionError::DuplicateCode(code));
        }
    }
    Ok(())
}

/// The relay's part of the admin API: `GET /v1/relay` → its public key, counters and
/// connected clients (node key, whether the relay is the client's home, which host of the
/// key it is and whether it is a parked standby host).
pub fn admin_router(relay: std::sync::Arc<tsunagu_derp::Relay>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new().route(
        "/v1/relay",
        get(move || {
            let relay = relay.clone();
            async move {
                let clients: Vec<serde_json::Value> = relay
                    .clients()
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "node_key": c.key.tailscale(),
                            "home": c.preferred,
                            "host": c.host,
                            "standby": c.parked,
                        })
                    })
                    .collect();
                axum::Json(serde_json::json!({
                    "public_key": relay.public_key().tailscale(),
                    "metrics": relay.metrics(),
                    "clients": clients,
                }))
            }
        }),
    )
}

/// `tsunagu-server relay`: a relay on its own, without the coordination server.
#[derive(Debug, Clone)]
pub struct RelayOnlyConfig {
    /// Holds the relay's key (`derp.key`).
    pub data_dir: PathBuf,
    pub listen: String,
    pub stun_listen: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub mesh_key: Option<String>,
    pub mesh_with: Vec<String>,
}

/// A relay with its key from `data_dir` (created there once) and the mesh settings.
pub(crate) fn new_relay(
    data_dir: &std::path::Path,
    mesh_key: &Option<String>,
    mesh_with: &[String],
) -> Result<std::sync::Arc<tsunagu_derp::Relay>, ServerError> {
    let key_path = data_dir.join(tsunagu_derp::relay::KEY_FILE);
    let key = tsunagu_derp::load_or_create_key(&key_path)
        .map_err(io_err(format!("DERP key {}", key_path.display())))?;
    Ok(tsunagu_derp::Relay::new(
        key,
        tsunagu_derp::RelayOptions {
            mesh_key: mesh_key.clone(),
            mesh_with: mesh_with.to_vec(),
            ..Default::default()
        },
    ))
}

/// Runs a relay (DERP on `listen`, STUN on `stun_listen`) until SIGINT or SIGTERM.
pub async fn serve_relay(cfg: RelayOnlyConfig) -> Result<(), ServerError> {
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(load_tls(cert, key)?),
        None => None,
    };
    let relay = new_relay(&cfg.data_dir, &cfg.mesh_key, &cfg.mesh_with)?;
    relay.start_mesh();
    if let Some(addr) = &cfg.stun_listen {
        let sock = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(io_err(format!("binding STUN on {addr}")))?;
        relay.clone().spawn_stun(sock);
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(io_err(format!("listening on {}", cfg.listen)))?;
    tracing::info!(
        listen = %cfg.listen,
        stun = ?cfg.stun_listen,
        key = %relay.public_key().tailscale(),
        tls = tls.is_some(),
        "tsunagu relay running"
    );
    let router = relay
        .router()
        .route("/health", axum::routing::get(|| async { "ok\n" }));
    serve_front(listener, tls, router).await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_comes_from_the_server_url() {
        let m = derp_map(
            "https://198.51.100.4:8443",
            Some(3478),
            &RelaySettings::default(),
        )
        .unwrap();
        let r = &m.regions[&900];
        assert_eq!((r.region_code.as_str(), r.nodes.len()), ("tsunagu", 1));
        let n = &r.nodes[0];
        assert_eq!(n.host_name, "198.51.100.4");
        assert_eq!((n.ipv4.as_str(), n.ipv6.as_str()), ("198.51.100.4", "none"));
        assert_eq!((n.derp_port, n.stun_port), (8443, 0));
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["Regions"]["900"]["Nodes"][0]["DERPPort"], 8443);
        assert_eq!(json["Regions"]["900"]["Nodes"][0]["IPv4"], "198.51.100.4");
    }

    #[test]
    fn names_ports_and_no_stun() {
        let s = RelaySettings {
            region_name: "Lab".into(),
            ..RelaySettings::default()
        };
        let m = derp_map("https://relay.tailnet.example/", None, &s).unwrap();
        let n = &m.regions[&900].nodes[0];
        assert_eq!(n.host_name, "relay.tailnet.example");
        assert_eq!((n.ipv4.as_str(), n.derp_port, n.stun_port), ("", 0, -1));
        assert_eq!(m.regions[&900].region_name, "Lab");
        let m = derp_map("http://[2001:db8::4]:8080", Some(3479), &s).unwrap();
        let n = &m.regions[&900].nodes[0];
        assert_eq!(
            (n.host_name.as_str(), n.ipv6.as_str()),
            ("2001:db8::4", "2001:db8::4")
        );
        assert_eq!((n.derp_port, n.stun_port), (8080, 3479));
        let two = RelaySettings {
            extra_nodes: vec!["https://198.51.100.5".into()],
            ..s.clone()
        };
        let m = derp_map("https://198.51.100.4", Some(3478), &two).unwrap();
        let names: Vec<&str> = m.regions[&900]
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(names, ["900a", "900b"]);
        assert_eq!(m.regions[&900].nodes[1].ipv4, "198.51.100.5");
        assert!(derp_map("ftp://x", None, &s).is_err());
        assert!(derp_map("https://x:notaport", None, &s).is_err());
    }

    fn spec(text: &str) -> Result<RegionSpec, RegionError> {
        text.parse::<RegionConfig>()?.validate()
    }

    #[test]
    fn a_region_elsewhere_from_the_command_line() {
        let r =
            spec("id=901, code=b, name=Region B, host=198.51.100.7, derp_port=8080, http").unwrap();
        assert_eq!(
            (r.id, r.code.as_str(), r.name.as_str()),
            (901, "b", "Region B")
        );
        assert_eq!(
            (r.derp_port, r.stun_port, r.plain_http),
            (8080, Some(3478), true)
        );
        let region = r.region();
        let n = &region.nodes[0];
        assert_eq!((n.name.as_str(), n.region_id), ("901a", 901));
        assert_eq!((n.ipv4.as_str(), n.ipv6.as_str()), ("198.51.100.7", "none"));
        assert_eq!((n.derp_port, n.stun_port), (8080, 0));
        // Defaults: the name is the code, TLS on 443 (0 in the map), STUN on 3478.
        let r = spec("id=902,code=c,host=relay-c.tailnet.example").unwrap();
        assert_eq!(
            (r.name.as_str(), r.derp_port, r.plain_http),
            ("c", 443, false)
        );
        let n = &r.region().nodes[0];
        assert_eq!(
            (n.ipv4.as_str(), n.ipv6.as_str()),
            ("", ""),
            "resolved by clients"
        );
        assert_eq!((n.derp_port, n.stun_port), (0, 0));
        // A plain-HTTP relay says its port even when it is 443; -1: no STUN.
        let n = &spec("id=903,code=d,host=2001:db8::7,derp_port=443,stun_port=-1,http=true")
            .unwrap()
            .region()
            .nodes[0];
        assert_eq!((n.derp_port, n.stun_port), (443, -1));
        assert_eq!((n.ipv4.as_str(), n.ipv6.as_str()), ("none", "2001:db8::7"));
        let n =
            &spec("id=904,code=e,host=relay-e.tailnet.example,ipv4=198.51.100.8,stun_port=3479")
                .unwrap()
                .region()
                .nodes[0];
        assert_eq!(
            (n.ipv4.as_str(), n.ipv6.as_str(), n.stun_port),
            ("198.51.100.8", "", 3479)
        );
    }

    #[test]
    fn bad_regions_are_refused_with_the_reason() {
        let err = |t: &str| spec(t).unwrap_err().to_string();
        assert_eq!(err("code=b,host=x"), "id is required");
        assert_eq!(err("id=901,host=x"), "code is required");
        assert_eq!(err("id=901,code=b"), "host is required");
        assert_eq!(
            err("id=0,code=b,host=x"),
            "id 0 is not a region ID (1-65535)"
        );
        assert_eq!(
            err("id=70000,code=b,host=x"),
            "id 70000 is not a region ID (1-65535)"
        );
        assert_eq!(
            err("id=901,code=b,host=x,derp_port=70000"),
            "derp_port 70000 is not a port (1-65535)"
        );
        assert_eq!(
            err("id=901,code=b,host=x,derp_port=0"),
            "derp_port 0 is not a port (1-65535)"
        );
        assert_eq!(
            err("id=901,code=b,host=x,stun_port=0"),
            "stun_port 0 is not a port (1-65535, or -1 for no STUN)"
        );
        assert_eq!(
            err("id=901,code=b,host=x,derp_port=eighty"),
            "derp_port: \"eighty\" is not an integer"
        );
        assert!(err("id=901,code=b,host=x,port=1").starts_with("unknown key \"port\""));
        assert!(err("id=901,code=b c,host=x").starts_with("code \"b c\""));
        assert_eq!(
            err("id=901,code=b,host=x,ipv4=2001:db8::1"),
            "ipv4 \"2001:db8::1\" is not an IPv4 address"
        );
        assert_eq!(
            err("id=901,code=b,host=a b"),
            "host \"a b\" is not a host name or address"
        );
        assert_eq!(
            err("id=901,code=b,host=x,http=yes"),
            "http: \"yes\" is not true or false"
        );
    }

    #[test]
    fn region_ids_and_codes_are_unique_including_the_servers_own() {
        let b = spec("id=901,code=b,host=198.51.100.7").unwrap();
        let c = spec("id=902,code=c,host=198.51.100.8").unwrap();
        assert_eq!(
            check_regions(Some((900, "tsunagu")), &[b.clone(), c.clone()]),
            Ok(())
        );
        assert_eq!(check_regions(None, std::slice::from_ref(&b)), Ok(()));
        assert_eq!(
            check_regions(Some((901, "tsunagu")), std::slice::from_ref(&b)),
            Err(RegionError::DuplicateId(901))
        );
        let b2 = spec("id=903,code=B,host=198.51.100.9").unwrap();
        assert_eq!(
            check_regions(Some((900, "tsunagu")), &[b.clone(), b2]),
            Err(RegionError::DuplicateCode("B".into()))
        );
        assert_eq!(
            check_regions(None, &[c.clone(), c]),
            Err(RegionError::DuplicateId(902))
        );
    }
}
