//! The official Tailscale client as a lab peer: Tailscale's own `tailscaled` and
//! `tailscale` CLI, the engine inside every official app, run in a lab namespace as a real
//! system daemon.
//!
//! It is a test dependency only (the product stays Rust), pinned at [`TAILSCALE_VERSION`]
//! and built by `scripts/setup-host` with `go install` into [`DEFAULT_BIN_DIR`] (or
//! `$TSUNAGU_TAILSCALE_DIR`). A daemon here runs the way it runs on a member's Linux
//! laptop, with nothing switched into a lab mode:
//!
//! - its own `--statedir` and `--socket` under the lab's scratch directory, so several
//!   daemons share a machine and nothing touches `/var/lib/tailscale`;
//! - a real TUN (`--tun=NAME`, never userspace networking), its own policy routing
//!   (table 52, rules 52xx) and netfilter: with no `iptables` on the machine it uses
//!   nftables, in the namespace's own ruleset;
//! - `TS_NO_LOGS_NO_SUPPORT=true`, so it never tries to upload logs to Tailscale's
//!   servers, and no `TS_DEBUG_*` switches: it reaches the server and the relays over TLS,
//!   trusting a private CA through `SSL_CERT_FILE` as a community with its own CA would;
//! - DNS: `ip netns exec` bind-mounts the namespace's own `/etc/netns/NAME/resolv.conf`
//!   over `/etc/resolv.conf`, and with the tailnet's DNS settings the daemon rewrites it
//!   ("direct" mode: 100.100.100.100 and the search domains). It also writes *beside* it,
//!   in `/etc` itself: its backup `/etc/resolv.pre-tailscale-backup.conf` and temporary
//!   files. So the daemon runs with a private `/etc`: an overlay whose writes land in its
//!   state directory ([`private_etc_argv`]), with the namespace's `resolv.conf` bound on
//!   top again. Nothing it writes reaches the host's `/etc`, and daemons of several
//!   namespaces (or tests) never share a backup file.
//!
//! The lab ends it by PID like every other process (SIGTERM: it removes its routes, rules
//! and netfilter tables on the way out); [`Tailscaled::leftovers`] tells what it left.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::error::LabError;
use crate::lab::{Lab, ProcId};
use crate::netns::Netns;

/// The pinned release of the official client.
pub const TAILSCALE_VERSION: &str = "1.102.5";

/// Its capability version (`tailcfg.CurrentCapabilityVersion` of that release).
pub const TAILSCALE_CAPVER: u32 = 142;

/// Where `scripts/setup-host` puts the binaries unless `$TSUNAGU_TAILSCALE_DIR` says
/// otherwise.
pub const DEFAULT_BIN_DIR: &str = "/var/cache/tsunagu/tailscale-v1.102.5";

/// How long a `tailscale` CLI call may take before it is killed.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment every official binary runs with: no log upload, no support channel.
const NO_LOGS: &str = "TS_NO_LOGS_NO_SUPPORT=true";

/// The official binaries: `tailscaled`, `tailscale`, `derper`.
#[derive(Clone, Debug)]
pub struct OfficialBins {
    /// The node daemon.
    pub tailscaled: PathBuf,
    /// Its CLI.
    pub tailscale: PathBuf,
    /// The reference DERP relay.
    pub derper: PathBuf,
}

impl OfficialBins {
    /// Finds the pinned binaries in `$TSUNAGU_TAILSCALE_DIR` or [`DEFAULT_BIN_DIR`]. A
    /// missing one is an error that says how to build them: the tests that need them fail,
    /// they are never skipped.
    pub fn locate() -> Result<OfficialBins, LabError> {
        let dir = std::env::var_os("TSUNAGU_TAILSCALE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR));
        let bins = OfficialBins {
            tailscaled: dir.join("tailscaled"),
            tailscale: dir.join("tailscale"),
            derper: dir.join("derper"),
        };
        for p in [&bins.tailscaled, &bins.tailscale, &bins.derper] {
            if !p.is_file() {
                return Err(LabError::MissingTool {
                    tool: p.display().to_string(),
                    package: format!(
                        "tailscale.com v{TAILSCALE_VERSION}: run ./scripts/setup-host (go install)"
                    ),
                });
            }
        }
        Ok(bins)
    }
}

/// Spawns the daemon (`argv`) in `ns`, after removing a stale socket of a killed run
/// (which would make the readiness check pass at once).
fn launch(
    lab: &mut Lab,
    ns: &Netns,
    argv: &[String],
    socket: &Path,
    log: &Path,
) -> Result<ProcId, LabError> {
    let _ = std::fs::remove_file(socket);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.spawn(ns, &argv, Some(log))
}

/// Mounts a private `/etc` (see the module doc), then runs the rest of its arguments.
/// `ip netns exec` has given the process its own mount namespace, whose mounts do not
/// propagate back to the host; `exec` keeps the daemon's PID that of the spawned process.
/// Arguments: the state directory, the namespace's `resolv.conf`, then the command.
const PRIVATE_ETC_SH: &str = r#"set -eu
dir=$1; resolv=$2; shift 2
mkdir -p "$dir/etc-upper" "$dir/etc-work"
: > "$dir/etc-resolv.conf"
mount --bind "$resolv" "$dir/etc-resolv.conf"
mount -t overlay tsunagu-lab-etc -o "lowerdir=/etc,upperdir=$dir/etc-upper,workdir=$dir/etc-work" /etc
mount --bind "$dir/etc-resolv.conf" /etc/resolv.conf
exec "$@"
"#;

/// `sh -c PRIVATE_ETC_SH ...` in front of `argv`: the daemon sees `/etc` as an overlay
/// whose upper layer is `state_dir/etc-upper`, and `/etc/resolv.conf` as the namespace's
/// own file (`/etc/netns/NAME/resolv.conf`, which tests read and write).
pub fn private_etc_argv(ns: &Netns, state_dir: &Path, argv: Vec<String>) -> Vec<String> {
    let mut out = vec![
        "sh".to_string(),
        "-c".into(),
        PRIVATE_ETC_SH.into(),
        "tailscaled-private-etc".into(),
        state_dir.display().to_string(),
        ns.etc_dir().join("resolv.conf").display().to_string(),
    ];
    out.extend(argv);
    out
}

/// How to start a [`Tailscaled`].
#[derive(Clone, Debug)]
pub struct TailscaledOpts {
    /// The TUN's name (`--tun`).
    pub tun: String,
    /// The WireGuard/disco UDP port (`--port`); 41641 as on a real machine.
    pub port: u16,
    /// Extra environment (`NAME=value`), e.g. `SSL_CERT_FILE=...` for a lab CA.
    pub env: Vec<String>,
    /// Extra daemon arguments.
    pub args: Vec<String>,
}

impl Default for TailscaledOpts {
    fn default() -> Self {
        TailscaledOpts {
            tun: "tailscale0".into(),
            port: 41641,
            env: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// A running (or stopped) official `tailscaled` in a lab namespace.
#[derive(Debug)]
pub struct Tailscaled {
    /// The namespace it runs in.
    pub ns: Netns,
    /// The lab's handle on the process.
    pub proc: ProcId,
    /// `--statedir`.
    pub state_dir: PathBuf,
    /// `--socket`, for the CLI.
    pub socket: PathBuf,
    /// stdout and stderr of every run, appended.
    pub log: PathBuf,
    bins: OfficialBins,
    argv: Vec<String>,
    env: Vec<String>,
}

impl Tailscaled {
    /// Starts `tailscaled` in `ns` with its state under the lab's directory `name`, and
    /// waits (bounded) until its local API answers.
    pub fn start(
        lab: &mut Lab,
        ns: &Netns,
        name: &str,
        opts: TailscaledOpts,
    ) -> Result<Tailscaled, LabError> {
        let bins = OfficialBins::locate()?;
        let state_dir = lab.log_path(&format!("{name}-tsstate"));
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| LabError::io(format!("creating {}", state_dir.display()), e))?;
        let socket = state_dir.join("tailscaled.sock");
        let log = lab.log_path(&format!("{name}-tailscaled.log"));
        let mut env = vec![NO_LOGS.to_string()];
        env.extend(opts.env);
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(env.iter().cloned());
        argv.extend([
            bins.tailscaled.display().to_string(),
            format!("--statedir={}", state_dir.display()),
            format!("--socket={}", socket.display()),
            format!("--tun={}", opts.tun),
            format!("--port={}", opts.port),
        ]);
        argv.extend(opts.args);
        let argv = private_etc_argv(ns, &state_dir, argv);
        let proc = launch(lab, ns, &argv, &socket, &log)?;
        let me = Tailscaled {
            ns: ns.clone(),
            proc,
            state_dir,
            socket,
            log,
            bins,
            argv,
            env,
        };
        me.wait_api(lab)?;
        Ok(me)
    }

    /// Waits (bounded) until the local API answers, failing early if the daemon exits.
    fn wait_api(&self, lab: &mut Lab) -> Result<(), LabError> {
        let timeout = Duration::from_secs(20);
        let start = Instant::now();
        loop {
            if self.socket.exists() && self.cli(&["status", "--json"]).is_ok() {
                return Ok(());
            }
            if let Some(status) = lab.try_wait(self.proc)? {
                return Err(LabError::NotReady {
                    what: "tailscaled".into(),
                    timeout,
                    detail: format!("exited ({status}):\n{}", self.log_text()),
                });
            }
            if start.elapsed() > timeout {
                return Err(LabError::NotReady {
                    what: "tailscaled's local API".into(),
                    timeout,
                    detail: self.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts it again after [`Tailscaled::stop`] or a kill, with the same state (the
    /// node keys and preferences survive, as across a reboot).
    pub fn restart(&mut self, lab: &mut Lab) -> Result<(), LabError> {
        lab.kill(self.proc, nix::sys::signal::Signal::SIGTERM)?;
        self.proc = launch(lab, &self.ns, &self.argv, &self.socket, &self.log)?;
        self.wait_api(lab)
    }

    /// Stops it with SIGTERM (it cleans up its routes and netfilter rules), or with
    /// SIGKILL when `hard` (it cleans up nothing: a crash).
    pub fn stop(&self, lab: &mut Lab, hard: bool) -> Result<(), LabError> {
        let sig = if hard {
            nix::sys::signal::Signal::SIGKILL
        } else {
            nix::sys::signal::Signal::SIGTERM
        };
        lab.kill(self.proc, sig)
    }

    /// The command line of `tailscale --socket=... args...` with the daemon's
    /// environment, for a CLI call that runs in the background ([`Lab::spawn`]), such as
    /// an interactive `up` waiting for its login.
    pub fn cli_argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(self.env.iter().cloned());
        argv.push(self.bins.tailscale.display().to_string());
        argv.push(format!("--socket={}", self.socket.display()));
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// `tailscale --socket=... args...` in its namespace, whatever the exit status.
    pub fn cli_output(&self, args: &[&str]) -> Result<Output, LabError> {
        let argv = self.cli_argv(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.ns.exec_status_timeout(&argv, CLI_TIMEOUT)
    }

    /// `tailscale args...`: its stdout, or an error with what it printed.
    pub fn cli(&self, args: &[&str]) -> Result<String, LabError> {
        let out = self.cli_output(args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(LabError::Command {
                cmd: format!("tailscale {}", args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            })
        }
    }

    /// `tailscale status --json`, parsed.
    pub fn status_json(&self) -> Result<serde_json::Value, LabError> {
        let text = self.cli(&["status", "--json"])?;
        serde_json::from_str(&text).map_err(|e| LabError::NotReady {
            what: "tailscale status --json".into(),
            timeout: Duration::ZERO,
            detail: format!("unparsable ({e}): {text}"),
        })
    }

    /// The daemon's state (`BackendState`: `NeedsLogin`, `Running`, ...).
    pub fn backend_state(&self) -> Option<String> {
        self.status_json()
            .ok()
            .and_then(|v| v["BackendState"].as_str().map(String::from))
    }

    /// Waits (bounded) until the daemon is `Running`.
    pub fn wait_running(&self, timeout: Duration) -> Result<(), LabError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.backend_state().as_deref() == Some("Running") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(LabError::NotReady {
            what: "tailscaled Running".into(),
            timeout,
            detail: format!("state {:?}\n{}", self.backend_state(), self.log_tail(60)),
        })
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// What an official daemon leaves behind in `ns` once stopped: its nftables tables,
    /// its policy-routing rules and table 52 routes, its TUN. Empty after a clean stop.
    pub fn leftovers(ns: &Netns) -> Result<Vec<String>, LabError> {
        let mut left = Vec::new();
        let nft = ns.exec(&["nft", "list", "tables"])?;
        for line in String::from_utf8_lossy(&nft.stdout).lines() {
            if line.to_ascii_lowercase().contains("ts-") || line.contains("tailscale") {
                left.push(format!("nft: {line}"));
            }
        }
        for family in ["-4", "-6"] {
            let rules = ns.exec(&["ip", family, "rule", "show"])?;
            for line in String::from_utf8_lossy(&rules.stdout).lines() {
                if line.contains("lookup 52") {
                    left.push(format!("ip {family} rule: {line}"));
                }
            }
            let routes = ns.exec_status(&["ip", family, "route", "show", "table", "52"])?;
            for line in String::from_utf8_lossy(&routes.stdout).lines() {
                if !line.trim().is_empty() {
                    left.push(format!("ip {family} route table 52: {line}"));
                }
            }
        }
        let links = ns.exec(&["ip", "-o", "link", "show"])?;
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            if line.contains("tailscale") {
                left.push(format!("link: {line}"));
            }
        }
        Ok(left)
    }

    /// Where its state lives, for tests that look at it.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}
