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

use crate::server::{ServerError, io_err, load_tls, serve_front};
use std::net::IpAddr;
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

/// The relay's part of the admin API: `GET /v1/relay` → its public key, counters and
/// connected clients (node key, whether the relay is the client's home).
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

/// Runs a relay (DERP on `listen`, STUN on `stun_listen`) until SIGINT or SIGTERM.
pub async fn serve_relay(cfg: RelayOnlyConfig) -> Result<(), ServerError> {
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(load_tls(cert, key)?),
        None => None,
    };
    let key_path = cfg.data_dir.join(tsunagu_derp::relay::KEY_FILE);
    let key = tsunagu_derp::load_or_create_key(&key_path)
        .map_err(io_err(format!("DERP key {}", key_path.display())))?;
    let relay = tsunagu_derp::Relay::new(
        key,
        tsunagu_derp::RelayOptions {
            mesh_key: cfg.mesh_key.clone(),
            mesh_with: cfg.mesh_with.clone(),
            ..Default::default()
        },
    );
    relay.start_mesh();
    if let Some(addr) = &cfg.stun_listen {
        let sock = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(io_err(format!("binding STUN on {addr}")))?;
        let r = relay.clone();
        tokio::spawn(async move {
            if let Err(e) = r.serve_stun(sock).await {
                tracing::error!("STUN server stopped: {e}");
            }
        });
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
}
