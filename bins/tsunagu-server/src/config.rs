//! Server configuration: defaults, overridden by the TOML file, overridden by the
//! environment and flags (clap reads both), so that `tsunagu-server serve` alone works.

use anyhow::Context as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/tsunagu-server";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    server_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    /// Policy file loaded at start when the database has none yet.
    policy_file: Option<PathBuf>,
    /// Seconds after which an offline ephemeral node is removed.
    ephemeral_timeout_secs: Option<u64>,
    /// Run the embedded DERP relay and STUN server (default true).
    relay: Option<bool>,
    /// UDP address of the STUN server (default: the listen address's host, port 3478).
    stun_listen: Option<String>,
    derp_region_id: Option<i32>,
    derp_region_code: Option<String>,
    derp_region_name: Option<String>,
    /// Tell clients to skip verifying the relay's certificate (labs only).
    derp_insecure_for_tests: Option<bool>,
    /// Announce the region even without TLS (clients that speak DERP over plain HTTP).
    derp_announce_http: Option<bool>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: String,
    pub server_url: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub policy_file: Option<PathBuf>,
    pub ephemeral_timeout_secs: u64,
    /// The embedded relay; `None` when turned off.
    pub relay: Option<tsunagu_control::relay::RelaySettings>,
}

/// The STUN address that goes with `listen`: same host, port 3478.
pub fn default_stun_listen(listen: &str) -> String {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    format!("{host}:{}", tsunagu_control::relay::DEFAULT_STUN_PORT)
}

impl Config {
    /// Resolve from the config file (if any) and the overrides given on the command line
    /// or in the environment.
    pub fn resolve(
        file: Option<&Path>,
        data_dir: Option<PathBuf>,
        listen: Option<String>,
        server_url: Option<String>,
    ) -> anyhow::Result<Config> {
        let f: File = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read", p.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            }
            None => File::default(),
        };
        let data_dir = data_dir
            .or(f.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let listen = listen
            .or(f.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let tls = match (f.tls_cert, f.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => anyhow::bail!("tls_cert and tls_key must be given together"),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server_url = server_url
            .or(f.server_url)
            .unwrap_or_else(|| format!("{scheme}://{listen}"));
        let server_url = server_url.trim_end_matches('/').to_string();
        if !(server_url.starts_with("http://") || server_url.starts_with("https://")) {
            anyhow::bail!("server_url {server_url:?} must start with http:// or https://");
        }
        let relay = f.relay.unwrap_or(true).then(|| {
            let d = tsunagu_control::relay::RelaySettings::default();
            tsunagu_control::relay::RelaySettings {
                stun_listen: Some(
                    f.stun_listen
                        .clone()
                        .unwrap_or_else(|| default_stun_listen(&listen)),
                ),
                region_id: f.derp_region_id.unwrap_or(d.region_id),
                region_code: f.derp_region_code.clone().unwrap_or(d.region_code),
                region_name: f.derp_region_name.clone().unwrap_or(d.region_name),
                insecure_for_tests: f.derp_insecure_for_tests.unwrap_or(false),
                mesh_key: None,
                announce_plain_http: f.derp_announce_http.unwrap_or(false),
            }
        });
        Ok(Config {
            data_dir,
            listen,
            server_url,
            tls,
            policy_file: f.policy_file,
            ephemeral_timeout_secs: f.ephemeral_timeout_secs.unwrap_or(300),
            relay,
        })
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_alone() {
        let c = Config::resolve(None, None, None, None).unwrap();
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.server_url, "http://0.0.0.0:8080");
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "listen = \"198.51.100.4:80\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        let c = Config::resolve(Some(&p), None, None, None).unwrap();
        assert_eq!(c.listen, "198.51.100.4:80");
        assert_eq!(c.server_url, "http://198.51.100.4:80");
        let c = Config::resolve(
            Some(&p),
            Some("/tmp/y".into()),
            Some("127.0.0.1:1".into()),
            None,
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/y"));
        assert_eq!(c.listen, "127.0.0.1:1");
    }

    #[test]
    fn the_relay_is_on_by_default_with_stun_beside_the_listener() {
        let c = Config::resolve(None, None, Some("198.51.100.4:443".into()), None).unwrap();
        let r = c.relay.expect("relay on by default");
        assert_eq!(r.stun_listen.as_deref(), Some("198.51.100.4:3478"));
        assert_eq!(r.region_id, 900);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "relay = false\n").unwrap();
        assert!(
            Config::resolve(Some(&p), None, None, None)
                .unwrap()
                .relay
                .is_none()
        );
        std::fs::write(
            &p,
            "stun_listen = \"[::]:3479\"\nderp_region_name = \"Lab\"\n",
        )
        .unwrap();
        let r = Config::resolve(Some(&p), None, None, None)
            .unwrap()
            .relay
            .unwrap();
        assert_eq!(
            (r.stun_listen.as_deref(), r.region_name.as_str()),
            (Some("[::]:3479"), "Lab")
        );
    }

    #[test]
    fn bad_files_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "lissten = 1\n").unwrap();
        let e = Config::resolve(Some(&p), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `lissten`"), "{e}");
        std::fs::write(&p, "tls_cert = \"/a\"\n").unwrap();
        assert!(Config::resolve(Some(&p), None, None, None).is_err());
    }
}
