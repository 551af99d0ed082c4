//! Stock userspace WireGuard (wireguard-go, boringtun-cli) as a peer to compare against,
//! started and configured by hand in a seed lab (`shared/guide/lab.md`).
//!
//! ```text
//!  [client] wgcNNN 100.64.0.1 ── UDP through the cafe NAT ──► [exit] wgeNNN 100.64.0.2
//!           endpoint 198.51.100.2:PORT                             listen-port PORT
//! ```
//!
//! [`WgPair::start`] makes a key pair per end, starts one daemon per end, configures it with
//! `wg set` over the daemon's UAPI socket, gives each end its tailnet address (a /32 with a
//! /32 route to the other end) and brings the interface up at the given MTU. What else a
//! benchmark needs (a default route into the tunnel, NAT on the exit) it adds itself.
//!
//! The UAPI sockets live in the host-wide [`UAPI_DIR`], shared by every namespace, so the
//! interface names are unique per run of the program and per pair ([`unique_dev`]); the
//! socket files are removed when the [`WgEnd`] is dropped, in case the daemon left them.

use anyhow::{Context as _, Result, bail};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{EXIT_PUBLIC, Lab, Netns, ProcId, Seed, Signal};
use tsunagu_proto::NodePrivate;

/// Where wireguard-go and boringtun put their UAPI sockets (one directory for the host).
pub const UAPI_DIR: &str = "/var/run/wireguard";
/// The client end's tailnet address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The exit end's tailnet address.
pub const EXIT_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// How long a daemon may take to create its interface and socket.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a `wg` command may take.
const WG_TIMEOUT: Duration = Duration::from_secs(20);

/// Which userspace WireGuard, and where its program is.
#[derive(Clone, Debug)]
pub enum Daemon {
    /// `wireguard-go --foreground DEV`.
    WireguardGo { prog: PathBuf },
    /// `boringtun-cli --foreground ... DEV` (`threads`: its `--threads`, else its default).
    Boringtun { prog: PathBuf, threads: Option<u32> },
}

impl Daemon {
    /// "wireguard-go" or "boringtun".
    pub fn label(&self) -> &'static str {
        match self {
            Daemon::WireguardGo { .. } => "wireguard-go",
            Daemon::Boringtun { .. } => "boringtun",
        }
    }

    /// The program's path.
    pub fn prog(&self) -> &Path {
        match self {
            Daemon::WireguardGo { prog } | Daemon::Boringtun { prog, .. } => prog,
        }
    }

    /// Version and settings, for reports ("wireguard-go v0.0.20220316", ...).
    pub fn describe(&self) -> String {
        match self {
            Daemon::WireguardGo { prog } => version(prog),
            Daemon::Boringtun { prog, threads } => format!(
                "{} ({})",
                version(prog),
                match threads {
                    Some(t) => format!("{t} threads"),
                    None => "default threads: 4".into(),
                }
            ),
        }
    }

    fn argv(&self, dev: &str, log: &Path) -> Vec<String> {
        let mut argv = vec![self.prog().to_string_lossy().into_owned()];
        argv.push("--foreground".into());
        if let Daemon::Boringtun { threads, .. } = self {
            // Root without sudo: nothing to drop privileges to.
            argv.extend(["--disable-drop-privileges".into(), "--log".into()]);
            argv.push(log.to_string_lossy().into_owned());
            argv.extend(["--verbosity".into(), "error".into()]);
            if let Some(t) = threads {
                argv.extend(["--threads".into(), t.to_string()]);
            }
        }
        argv.push(dev.to_owned());
        argv
    }
}

/// First line of `prog --version`, or "version unknown".
pub fn version(prog: &Path) -> String {
    first_line_of(std::process::Command::new(prog).arg("--version"))
}

/// First line of what `cmd` prints on stdout, or "version unknown".
pub fn first_line_of(cmd: &mut std::process::Command) -> String {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(|l| l.trim().to_owned())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "version unknown".into())
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes `text` to a new file readable by root only (a private key for `wg set`).
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, format!("{text}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

/// An interface name unique on this host for this run: `prefix`, our PID and a counter in
/// hex (at most 15 bytes for a prefix of up to 4).
pub fn unique_dev(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}x{n:x}", std::process::id())
}

/// A UAPI socket path, removed (if still there) on drop.
#[derive(Debug)]
struct UapiSocket(PathBuf);

impl Drop for UapiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One running daemon.
#[derive(Debug)]
pub struct WgEnd {
    /// "client" or "exit".
    pub name: &'static str,
    pub ns: Netns,
    pub id: ProcId,
    pub pid: u32,
    /// Its interface.
    pub dev: String,
    /// Its output (and boringtun's `--log`).
    pub log: PathBuf,
    socket: UapiSocket,
}

impl WgEnd {
    /// Starts `daemon` on `dev` in `ns` and waits for its interface and UAPI socket.
    pub fn spawn(
        lab: &mut Lab,
        daemon: &Daemon,
        ns: &Netns,
        name: &'static str,
        dev: &str,
    ) -> Result<WgEnd> {
        let label = daemon.label();
        let path = Path::new(UAPI_DIR).join(format!("{dev}.sock"));
        if path.exists() {
            bail!(
                "{} already exists: another {dev} is running (or a crashed run left it)",
                path.display()
            );
        }
        let log = lab.log_path(&format!("{name}-{label}.log"));
        let argv = daemon.argv(dev, &log);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        eprintln!("[wg] starting {label} in {name}: {}", argv.join(" "));
        let id = lab
            .spawn(ns, &argv, Some(&log))
            .with_context(|| format!("starting {label} in {name}"))?;
        let end = WgEnd {
            name,
            ns: ns.clone(),
            id,
            pid: lab.pid(id),
            dev: dev.to_owned(),
            log,
            socket: UapiSocket(path),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let link_up = ns.ip(&["link", "show", "dev", dev]).is_ok();
            if link_up && end.socket.0.exists() {
                return Ok(end);
            }
            if let Some(status) = lab.try_wait(id)? {
                bail!(
                    "{label} in {name} exited with {status} before creating {dev}; log:\n{}",
                    tail(&end.log, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{label} in {name}: no interface {dev} and socket {} within {READY_TIMEOUT:?}; log:\n{}",
                    end.socket.0.display(),
                    tail(&end.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `wg ARGS...` in this end's namespace.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["wg"];
        argv.extend_from_slice(args);
        let out = self
            .ns
            .exec_timeout(&argv, WG_TIMEOUT)
            .with_context(|| format!("{} in {}", argv.join(" "), self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `wg show DEV` (empty if it fails), for error messages.
    pub fn show(&self) -> String {
        self.ns
            .exec_status_timeout(&["wg", "show", &self.dev], WG_TIMEOUT)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Gives the interface `addr`/32 and a /32 route to `peer`, and brings it up at `mtu`.
    fn address(&self, addr: Ipv4Addr, peer: Ipv4Addr, mtu: u16) -> Result<()> {
        let step = |what: &str, args: &[&str]| {
            self.ns
                .ip(args)
                .map(drop)
                .with_context(|| format!("{what} on the {} end", self.name))
        };
        let mtu = mtu.to_string();
        step(
            "address",
            &["addr", "add", &format!("{addr}/32"), "dev", &self.dev],
        )?;
        step(
            "link up",
            &["link", "set", "dev", &self.dev, "mtu", &mtu, "up"],
        )?;
        step(
            "route to the peer",
            &["route", "add", &format!("{peer}/32"), "dev", &self.dev],
        )
    }
}

/// How to set up a [`WgPair`].
#[derive(Clone, Debug)]
pub struct PairConfig {
    /// Interface MTU on both ends.
    pub mtu: u16,
    /// UDP port on both ends (the client's endpoint for the exit is `198.51.100.2:port`).
    pub port: u16,
    /// What the client sends into the tunnel (`allowed-ips` of its peer), e.g.
    /// `100.64.0.2/32`, or `0.0.0.0/0` for an exit node.
    pub client_allowed_ips: String,
    /// `persistent-keepalive` (seconds) from the client, to hold its NAT mapping open.
    pub keepalive: Option<u16>,
}

/// Two ends of a hand-made tunnel: the seed's client (behind the cafe NAT) and exit host.
#[derive(Debug)]
pub struct WgPair {
    pub client: WgEnd,
    pub exit: WgEnd,
}

impl WgPair {
    /// Starts the exit end, then the client end, and configures both (see the module docs).
    pub fn start(seed: &mut Seed, daemon: &Daemon, cfg: &PairConfig) -> Result<WgPair> {
        let (cdev, edev) = (unique_dev("wgc"), unique_dev("wge"));
        let (ckey, ekey) = (NodePrivate::generate(), NodePrivate::generate());
        let ckey_file = seed.lab.log_path("client-wg.key");
        let ekey_file = seed.lab.log_path("exit-wg.key");
        write_secret(&ckey_file, &ckey.to_base64())?;
        write_secret(&ekey_file, &ekey.to_base64())?;
        let (client_ns, exit_ns) = (seed.ns(role::CLIENT), seed.ns(role::EXIT));
        let exit = WgEnd::spawn(&mut seed.lab, daemon, &exit_ns, "exit", &edev)?;
        let client = WgEnd::spawn(&mut seed.lab, daemon, &client_ns, "client", &cdev)?;
        let port = cfg.port.to_string();

        eprintln!(
            "[wg] configuring the exit end (wg set, {EXIT_ADDR}, mtu {})",
            cfg.mtu
        );
        exit.wg(&[
            "set",
            &edev,
            "private-key",
            &ekey_file.to_string_lossy(),
            "listen-port",
            &port,
            "peer",
            &ckey.public().to_string(),
            "allowed-ips",
            &format!("{CLIENT_ADDR}/32"),
        ])?;
        exit.address(EXIT_ADDR, CLIENT_ADDR, cfg.mtu)?;

        let endpoint = SocketAddr::from((EXIT_PUBLIC, cfg.port)).to_string();
        eprintln!(
            "[wg] configuring the client end (wg set, {CLIENT_ADDR}, endpoint {endpoint}, mtu {})",
            cfg.mtu
        );
        let keepalive = cfg.keepalive.map(|k| k.to_string());
        let exit_pub = ekey.public().to_string();
        let ckey_s = ckey_file.to_string_lossy();
        let mut set = vec![
            "set",
            &cdev,
            "private-key",
            &ckey_s,
            "listen-port",
            &port,
            "peer",
            &exit_pub,
            "allowed-ips",
            &cfg.client_allowed_ips,
            "endpoint",
            &endpoint,
        ];
        if let Some(k) = &keepalive {
            set.extend(["persistent-keepalive", k.as_str()]);
        }
        client.wg(&set)?;
        client.address(CLIENT_ADDR, EXIT_ADDR, cfg.mtu)?;
        Ok(WgPair { client, exit })
    }

    /// The ends, client first.
    pub fn ends(&self) -> [&WgEnd; 2] {
        [&self.client, &self.exit]
    }

    /// The exit end's view of the client's endpoint (`wg show DEV endpoints`), e.g.
    /// `198.51.100.3:41641` once the client's packets came through the cafe NAT.
    pub fn client_endpoint_seen_by_exit(&self) -> Option<String> {
        let text = self.exit.wg(&["show", &self.exit.dev, "endpoints"]).ok()?;
        text.lines()
            .find_map(|l| l.split_whitespace().nth(1))
            .filter(|e| *e != "(none)")
            .map(str::to_owned)
    }

    /// `wg show` and the log tail of both ends, for error messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for end in self.ends() {
            let _ = writeln!(
                s,
                "--- wg show ({}):\n{}--- log of the {} end ({}):\n{}",
                end.name,
                end.show(),
                end.name,
                end.log.display(),
                tail(&end.log, 30)
            );
        }
        s
    }

    /// Stops both daemons (SIGTERM, by PID; the lab escalates to SIGKILL) and removes their
    /// sockets if they left them.
    pub fn stop(self, lab: &mut Lab) {
        for end in self.ends() {
            let _ = lab.kill(end.id, Signal::SIGTERM);
        }
    }
}
