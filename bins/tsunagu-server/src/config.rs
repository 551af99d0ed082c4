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
        Ok(Config {
            data_dir,
            listen,
            server_url,
            tls,
            policy_file: f.policy_file,
            ephemeral_timeout_secs: f.ephemeral_timeout_secs.unwrap_or(300),
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
