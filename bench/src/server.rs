//! `tsunagu-server` in a seed lab's control namespace (198.51.100.4), as the benchmarks
//! that need a coordination server run it: over HTTPS with a [`LabCa`] certificate (the
//! shape of a real deployment: Go clients reach relays over TLS only), or over plain HTTP.
//!
//! [`LabServer::start`] waits for the admin socket, creates the user `admin` and sets a
//! policy; keys and node listings go through the server's own admin CLI.

use crate::tls::LabCa;
use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{CONTROL_PUBLIC, Netns, ProcId, Seed};

/// Everyone may reach everyone; `tag:exit` nodes are approved as exit nodes by the policy
/// (`autoApprovers`), so no admin step sits between a benchmark and its exit node.
pub const POLICY: &str = r#"{
  "tagOwners": { "tag:exit": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [ { "action": "accept", "src": ["*"], "dst": ["*:*"] } ],
}"#;

/// How long the server may take to open its admin socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `tsunagu-server serve` in the control namespace.
pub struct LabServer {
    pub proc: ProcId,
    /// Its data directory (the admin CLI's `--data-dir`).
    pub data: PathBuf,
    /// The URL clients log in to.
    pub url: String,
    /// What clients need in their environment (`SSL_CERT_FILE=...` over HTTPS).
    pub env: Vec<String>,
    pub log: PathBuf,
    bin: PathBuf,
    ns: Netns,
}

impl LabServer {
    /// Starts the server on 198.51.100.4: port 443 with a certificate from `ca` when
    /// given, else plain HTTP on port 8080 (announcing its relay over HTTP too). `extra`
    /// goes to `serve`.
    pub fn start(
        seed: &mut Seed,
        bin: &Path,
        ca: Option<&LabCa>,
        extra: &[&str],
    ) -> Result<LabServer> {
        let ns = seed.ns(role::CONTROL);
        let data = seed.lab.log_path("server-data");
        let log = seed.lab.log_path("server.log");
        let mut args: Vec<String> = Vec::new();
        let (url, env) = match ca {
            Some(ca) => {
                let cert = seed.lab.log_path("server-cert.pem");
                let key = seed.lab.log_path("server-key.pem");
                ca.issue(&CONTROL_PUBLIC.to_string(), &cert, &key)?;
                args.extend([
                    "--listen".into(),
                    format!("{CONTROL_PUBLIC}:443"),
                    "--tls-cert".into(),
                    cert.display().to_string(),
                    "--tls-key".into(),
                    key.display().to_string(),
                ]);
                (format!("https://{CONTROL_PUBLIC}"), vec![ca.env()])
            }
            None => {
                args.extend([
                    "--listen".into(),
                    format!("{CONTROL_PUBLIC}:8080"),
                    "--derp-announce-http".into(),
                ]);
                (format!("http://{CONTROL_PUBLIC}:8080"), Vec::new())
            }
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut argv: Vec<String> = vec![
            bin.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "serve".into(),
            "--server-url".into(),
            url.clone(),
        ];
        argv.extend(args);
        let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
        let proc = seed
            .lab
            .spawn(&ns, &argv_ref, Some(&log))
            .context("starting tsunagu-server")?;
        let server = LabServer {
            proc,
            data,
            url,
            env,
            log,
            bin: bin.to_path_buf(),
            ns,
        };
        let start = Instant::now();
        while !server.data.join("admin.sock").exists() {
            if let Some(status) = seed.lab.try_wait(proc)? {
                bail!(
                    "tsunagu-server exited ({status}):\n{}",
                    crate::wg::tail(&server.log, 20)
                );
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "tsunagu-server: no admin socket within {START_TIMEOUT:?}:\n{}",
                    crate::wg::tail(&server.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        server.admin(&["users", "create", "admin"])?;
        let policy = seed.lab.log_path("policy.hujson");
        std::fs::write(&policy, POLICY).context("writing the policy")?;
        server.admin(&["policy", "set", &policy.display().to_string()])?;
        Ok(server)
    }

    /// `tsunagu-server --data-dir DATA args...` in the control namespace: its stdout.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let bin = self.bin.display().to_string();
        let data = self.data.display().to_string();
        let mut argv = vec![bin.as_str(), "--data-dir", &data];
        argv.extend_from_slice(args);
        let out = self
            .ns
            .exec(&argv)
            .with_context(|| format!("tsunagu-server {}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new pre-auth key of user `admin` (`extra`: `--reusable`, `--tags tag:exit`, ...).
    pub fn preauth_key(&self, extra: &[&str]) -> Result<String> {
        let mut args = vec!["preauthkeys", "create", "--user", "admin"];
        args.extend_from_slice(extra);
        let out = self.admin(&args)?;
        out.lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_owned)
            .context("preauthkeys create printed no key")
    }

    /// `nodes list --json`.
    pub fn nodes(&self) -> Result<serde_json::Value> {
        let text = self.admin(&["--json", "nodes", "list"])?;
        serde_json::from_str(&text).context("parsing nodes list --json")
    }
}
