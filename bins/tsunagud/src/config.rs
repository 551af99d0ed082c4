//! The daemon's configuration file (TOML), which produces the engine's network map.
//!
//! Until the control client exists, this file is how a node learns its peers. Every
//! error names the field and the reason (and, for syntax errors, the line and column);
//! unknown fields are errors too, so that a typo never silently changes behaviour.

use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tsunagu_proto::netmap::DEFAULT_MTU;
use tsunagu_proto::{NetMap, NodePrivate, NodePublic, Peer, SelfNode};

/// Tailscale's port, so that firewall rules written for it apply.
pub const DEFAULT_PORT: u16 = 41641;
pub const DEFAULT_TUN: &str = "tsunagu0";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    addresses: Vec<String>,
    listen_port: Option<u16>,
    tun: Option<String>,
    mtu: Option<u16>,
    #[serde(default)]
    advertise_exit_node: bool,
    #[serde(default)]
    exit_node: String,
    #[serde(default)]
    exit_node_allow_lan_access: bool,
    #[serde(default, rename = "peer")]
    peers: Vec<PeerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerFile {
    name: String,
    public_key: String,
    endpoint: Option<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    #[serde(default)]
    offers_exit_node: bool,
    #[serde(default)]
    may_use_exit_node: bool,
    persistent_keepalive: Option<u16>,
}

/// A loaded configuration: the network map plus the daemon's local settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub map: NetMap,
    pub listen_port: u16,
    pub tun: String,
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {field}: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse `text`; `path` is used in messages and to resolve `private_key_file`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let field = |field: &str, reason: String| ConfigError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let private_key = match (&file.private_key, &file.private_key_file) {
            (Some(k), None) => k
                .parse::<NodePrivate>()
                .map_err(|e| field("private_key", e.to_string()))?,
            (None, Some(f)) => {
                let f = path.parent().unwrap_or(Path::new(".")).join(f);
                let text = std::fs::read_to_string(&f)
                    .map_err(|e| field("private_key_file", format!("{}: {e}", f.display())))?;
                text.parse::<NodePrivate>()
                    .map_err(|e| field("private_key_file", format!("{}: {e}", f.display())))?
            }
            (Some(_), Some(_)) => {
                return Err(field(
                    "private_key",
                    "give private_key or private_key_file, not both".into(),
                ));
            }
            (None, None) => {
                return Err(field(
                    "private_key",
                    "missing (or give private_key_file)".into(),
                ));
            }
        };
        let nets = |name: &str, list: &[String]| -> Result<Vec<IpNet>, ConfigError> {
            list.iter()
                .enumerate()
                .map(|(i, s)| parse_net(s).map_err(|reason| field(&format!("{name}[{i}]"), reason)))
                .collect()
        };
        let addresses = nets("addresses", &file.addresses)?;
        let mut peers = Vec::with_capacity(file.peers.len());
        for (i, p) in file.peers.iter().enumerate() {
            let at = |f: &str| format!("peer[{i}].{f}");
            let key: NodePublic = p
                .public_key
                .parse()
                .map_err(|e: tsunagu_proto::KeyError| field(&at("public_key"), e.to_string()))?;
            let mut endpoints = Vec::new();
            for (j, e) in p.endpoint.iter().chain(p.endpoints.iter()).enumerate() {
                let name = if p.endpoint.is_some() && j == 0 {
                    at("endpoint")
                } else {
                    at("endpoints")
                };
                endpoints.push(e.parse::<SocketAddr>().map_err(|_| {
                    field(
                        &name,
                        format!("{e:?} is not an IP:port (e.g. 198.51.100.2:41641)"),
                    )
                })?);
            }
            peers.push(Peer {
                name: p.name.clone(),
                key,
                endpoints,
                allowed_ips: nets(&at("allowed_ips"), &p.allowed_ips)?,
                offers_exit: p.offers_exit_node,
                exit_client: p.may_use_exit_node,
                keepalive: p.persistent_keepalive.filter(|&k| k > 0),
                relay: None,
                disco: None,
            });
        }
        let mut map = NetMap {
            self_node: SelfNode {
                name: file.name.clone(),
                private_key,
                addresses,
                serve_exit: file.advertise_exit_node,
                peerapi_port: None,
            },
            peers,
            exit_node: None,
            exit_node_allow_lan_access: file.exit_node_allow_lan_access,
            exit_node_blocked: false,
            mtu: file.mtu.unwrap_or(DEFAULT_MTU),
            // A file lists trusted peers by key; there is no policy to apply.
            packet_filter: None,
        };
        if !file.exit_node.is_empty() {
            let peer = map.find_peer(&file.exit_node).ok_or_else(|| {
                field(
                    "exit_node",
                    format!("no peer named {:?} or with that address", file.exit_node),
                )
            })?;
            map.exit_node = Some(peer.key);
        }
        map.validate().map_err(|e| match e {
            tsunagu_proto::NetMapError::Invalid { field: f, reason } => {
                // The map says peers[i]; the file says peer[i].
                field(
                    &f.replacen("peers[", "peer[", 1).replacen("self.", "", 1),
                    reason,
                )
            }
            other => field("map", other.to_string()),
        })?;
        let tun = file.tun.unwrap_or_else(|| DEFAULT_TUN.to_string());
        if tun.is_empty() || tun.len() > 15 || tun.contains(['/', ' ']) {
            return Err(field(
                "tun",
                format!("{tun:?} is not a valid interface name (1-15 characters, no '/' or space)"),
            ));
        }
        Ok(Config {
            map,
            listen_port: file.listen_port.unwrap_or(DEFAULT_PORT),
            tun,
        })
    }
}

/// A prefix, or a bare address taken as a host prefix.
fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP prefix (e.g. 100.64.0.1/32)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (String, String) {
        let k = NodePrivate::generate();
        (k.to_base64(), k.public().to_string())
    }

    fn sample() -> String {
        let (me, _) = key();
        let (_, exit) = key();
        format!(
            r#"
name = "client"
private_key = "{me}"
addresses = ["100.64.0.1/32", "fd7a:115c:a1e0::1"]
exit_node = "100.64.0.2"

[[peer]]
name = "exit"
public_key = "{exit}"
endpoint = "198.51.100.2:41641"
allowed_ips = ["100.64.0.2/32"]
offers_exit_node = true
"#
        )
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"))
    }

    #[test]
    fn sample_parses_with_defaults() {
        let c = parse(&sample()).unwrap();
        assert_eq!(c.listen_port, DEFAULT_PORT);
        assert_eq!(c.tun, DEFAULT_TUN);
        assert_eq!(c.map.mtu, 1280);
        assert_eq!(c.map.exit_peer().unwrap().name, "exit");
        assert_eq!(
            c.map.self_node.addresses[1].to_string(),
            "fd7a:115c:a1e0::1/128"
        );
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_field_and_reason() {
        let s = sample();
        let e = err(&s.replace("198.51.100.2:41641", "198.51.100.2"));
        assert!(e.starts_with("t.toml: peer[0].endpoint: "), "{e}");
        let e = err(&s.replace("100.64.0.2/32\"]", "100.64.0.2/33\"]"));
        assert!(e.starts_with("t.toml: peer[0].allowed_ips[0]: "), "{e}");
        let e = err(&s.replace("exit_node = \"100.64.0.2\"", "exit_node = \"nobody\""));
        assert!(e.contains("exit_node: no peer named \"nobody\""), "{e}");
        let e = err(&s.replace("offers_exit_node = true", "offers_exit_node = false"));
        assert!(e.contains("exit_node: peer \"exit\" does not offer"), "{e}");
        let e = err(&s.replace("public_key = \"", "public_key = \"x"));
        assert!(e.contains("peer[0].public_key: not a key"), "{e}");
        let e = err(&s.replace("name = \"client\"", "name = \"client\"\nexit_nod = \"x\""));
        assert!(e.contains("unknown field `exit_nod`"), "{e}");
        assert!(e.contains("line"), "syntax errors carry a line: {e}");
        let e = err(&s.replace("addresses = [", "addresses = [[["));
        assert!(e.starts_with("t.toml: "), "{e}");
        let e = err(&s.replace("name = \"client\"", "name = \"client\"\ntun = \"a/b\""));
        assert!(e.contains("tun: "), "{e}");
        let e = err(&s.replace(
            "addresses = [\"100.64.0.1/32\", \"fd7a:115c:a1e0::1\"]",
            "addresses = []",
        ));
        assert!(e.contains("addresses: at least one"), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "\0\0\0",
            "[[peer]]",
            "name = 5",
            "=\n=",
            "[peer]\nname=1",
        ] {
            assert!(parse(text).is_err());
        }
    }
}
