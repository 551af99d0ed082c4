//! Headscale (the Go module `github.com/juanfont/headscale`), the other self-hosted server
//! for Tailscale clients, as a peer for `control-scale`: same protocol, same simulated
//! nodes, same machine, one run.
//!
//! It is a benchmark dependency only, pinned at [`HEADSCALE_VERSION`] (the newest release
//! the Go module proxy serves here that builds with the machine's Go) and built by
//! `bench/build-headscale` into [`DEFAULT_BIN`] (or `$TSUNAGU_HEADSCALE`). [`config`]
//! writes what it runs with: SQLite in a temporary directory, its own Noise key, loopback
//! listeners, a DERP map naming only a loopback address (no map fetched from the
//! internet, no embedded relay), no OIDC, no log upload, no update check; everything
//! else (batching delays, database tuning) at its defaults.

use anyhow::{Context as _, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The pinned release.
pub const HEADSCALE_VERSION: &str = "0.29.3";

/// Where `bench/build-headscale` puts the binary unless `$TSUNAGU_HEADSCALE` names one.
pub const DEFAULT_BIN: &str = "/var/cache/tsunagu/headscale-v0.29.3/headscale";

/// The headscale binary: `$TSUNAGU_HEADSCALE` or [`DEFAULT_BIN`]; an error saying how to
/// build it when it is missing.
pub fn locate() -> Result<PathBuf> {
    let p = std::env::var_os("TSUNAGU_HEADSCALE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN));
    if !p.is_file() {
        bail!(
            "{}: no headscale binary (build v{HEADSCALE_VERSION} with bench/build-headscale, or pass --headscale)",
            p.display()
        );
    }
    Ok(p)
}

/// Listeners of one headscale instance, all on loopback.
pub struct Listen {
    /// Clients (`/key`, `/ts2021`).
    pub http: SocketAddr,
    /// Prometheus metrics.
    pub metrics: SocketAddr,
    /// Remote gRPC (unused: the CLI talks over the Unix socket).
    pub grpc: SocketAddr,
}

/// Writes `dir/config.yaml` (and `dir/derp.yaml`) for a headscale at `listen`, keeping its
/// state in `dir`; returns the config's path.
pub fn config(dir: &Path, listen: &Listen) -> Result<PathBuf> {
    let derp = dir.join("derp.yaml");
    // A region nobody connects to: the simulated nodes speak only the control protocol,
    // and headscale refuses to start with an empty DERP map.
    std::fs::write(
        &derp,
        "regions:\n\
         \x20 900:\n\
         \x20   regionid: 900\n\
         \x20   regioncode: lab\n\
         \x20   regionname: lab\n\
         \x20   nodes:\n\
         \x20     - name: 900a\n\
         \x20       regionid: 900\n\
         \x20       hostname: 127.0.0.1\n\
         \x20       ipv4: 127.0.0.1\n\
         \x20       ipv6: none\n\
         \x20       stunport: -1\n\
         \x20       derpport: 443\n",
    )
    .with_context(|| format!("writing {}", derp.display()))?;
    let d = dir.display();
    let text = format!(
        "server_url: http://{http}\n\
         listen_addr: {http}\n\
         metrics_listen_addr: {metrics}\n\
         grpc_listen_addr: {grpc}\n\
         grpc_allow_insecure: false\n\
         noise:\n\
         \x20 private_key_path: {d}/noise_private.key\n\
         prefixes:\n\
         \x20 v4: 100.64.0.0/10\n\
         \x20 v6: fd7a:115c:a1e0::/48\n\
         \x20 allocation: sequential\n\
         derp:\n\
         \x20 server:\n\
         \x20   enabled: false\n\
         \x20 urls: []\n\
         \x20 paths:\n\
         \x20   - {derp}\n\
         \x20 auto_update_enabled: false\n\
         disable_check_updates: true\n\
         database:\n\
         \x20 type: sqlite\n\
         \x20 sqlite:\n\
         \x20   path: {d}/db.sqlite\n\
         \x20   write_ahead_log: true\n\
         log:\n\
         \x20 level: info\n\
         \x20 format: text\n\
         policy:\n\
         \x20 mode: file\n\
         \x20 path: \"\"\n\
         dns:\n\
         \x20 magic_dns: false\n\
         \x20 override_local_dns: false\n\
         \x20 base_domain: bench.test\n\
         \x20 nameservers:\n\
         \x20   global: []\n\
         unix_socket: {d}/headscale.sock\n\
         unix_socket_permission: \"0770\"\n\
         logtail:\n\
         \x20 enabled: false\n\
         taildrop:\n\
         \x20 enabled: false\n",
        http = listen.http,
        metrics = listen.metrics,
        grpc = listen.grpc,
        derp = derp.display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
