//! control-scale: how `tsunagu-server` copes with thousands of nodes holding map streams,
//! beside Headscale (the other self-hosted server for Tailscale clients) in the same run.
//!
//! For each N of `--nodes` (default 1000,5000) a fresh server runs as a child process on
//! loopback with a temporary data directory: first `tsunagu-server`, then Headscale
//! v0.29.3 (`tsunagu_bench::headscale`: SQLite, its defaults otherwise). The benchmark
//! creates a user and a reusable pre-auth key with each server's own admin CLI, then runs
//! the same simulated nodes against each (they speak the same protocol):
//!
//! 1. **register-all**: N simulated nodes (our `tsunagu-client`, one Noise connection
//!    each, `--concurrency` of them joining at a time) register and open a streaming map
//!    request. A node is done when its first full map arrived; the phase ends when all N
//!    are done. Afterwards the benchmark waits until every stream has learned about every
//!    other node (convergence), so the next phase starts from a quiet server.
//! 2. **fan-out**: K (`--probes`, default 20) more nodes register one at a time. For each,
//!    the delay from its register call returning until each existing stream received a
//!    message listing it (`PeersChanged` or `Peers`); p50 and p99 over all
//!    (stream, new node) pairs. After that, the probe opens its own stream (which makes
//!    it "online", a second change fanned out to everyone, by node key in `PeersChanged`
//!    or by node ID in `PeersChangedPatch`/`OnlineChange`: reported separately) and
//!    becomes one of the existing streams for the following probes.
//!
//! Every stream is drained continuously by its own task, which looks each peer up by node
//! key in a shared index and records per (probe, stream) arrival times in atomics. A
//! stream the server ends is opened again as a real client would (a new map request, on
//! a new connection if need be): Headscale drops a session whose updates it cannot hand
//! over within 50 ms. Such re-opens are counted and printed; tsunagu-server ends none.
//!
//! Also measured: the server's peak RSS (`VmHWM`), the CPU time of server and benchmark
//! per phase (`/proc/PID/stat`). Progress goes to stderr; stdout gets a details line per
//! server and a summary line per N, the last line being
//! `control-scale: nodes N, register-all S s, rss M MiB, fanout p50 A ms, p99 B ms,
//! headscale register-all S2 s, rss M2 MiB, fanout p99 B2 ms`.
//!
//! Run through `bench/control-scale`, which builds the server and this program in release
//! and Headscale (`bench/build-headscale`) when its pinned build is missing.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tsunagu_bench::headscale;
use tsunagu_bench::procfs::{cpu_time, status_kib};
use tsunagu_client::{ControlClient, MapStream};
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, RegisterResponseAuth,
};
use tsunagu_proto::{MachinePrivate, MachinePublic, NodePrivate, NodePublic};

fn progress(msg: impl AsRef<str>) {
    eprintln!("[control-scale] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// Command line

struct Args {
    server: PathBuf,
    /// Headscale's binary, or None (`--headscale none`) to measure tsunagu-server alone.
    headscale: Option<PathBuf>,
    /// Bound of Headscale's register-all phase (and of each of its nodes' joins).
    headscale_budget: Duration,
    nodes: Vec<usize>,
    probes: usize,
    concurrency: usize,
    /// Bound of each phase (register-all, convergence, the whole fan-out phase).
    phase_timeout: Duration,
    /// Bound of one probe's fan-out (and of its online change).
    fanout_timeout: Duration,
    /// Bound of one node's connect + register + first map.
    join_timeout: Duration,
    keep: bool,
}

const USAGE: &str = "usage: control-scale [--nodes 1000,5000] [--probes 20] [--concurrency 64]
                     [--server PATH] [--headscale PATH|none] [--headscale-budget SECS (1800)]
                     [--phase-timeout SECS (3600)] [--fanout-timeout SECS (120)]
                     [--join-timeout SECS (300)] [--keep]
Starts a fresh tsunagu-server per N on loopback, registers N simulated nodes holding map
streams, then measures how long each of --probes new nodes takes to reach every stream;
then the same against a fresh Headscale (default: $TSUNAGU_HEADSCALE or
/var/cache/tsunagu/headscale-v0.29.3/headscale, built by bench/build-headscale), whose
register-all gets --headscale-budget seconds (then its line says \">BUDGET s\").
--keep leaves the servers' data directories (and their logs) in place.";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        server: std::env::current_exe()
            .context("locating this program")?
            .with_file_name("tsunagu-server"),
        headscale: Some(PathBuf::new()),
        headscale_budget: Duration::from_secs(1800),
        nodes: vec![1000, 5000],
        probes: 20,
        concurrency: 64,
        phase_timeout: Duration::from_secs(3600),
        fanout_timeout: Duration::from_secs(120),
        join_timeout: Duration::from_secs(300),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))
        };
        let secs = |v: String| -> Result<Duration> {
            Ok(Duration::from_secs(
                v.parse()
                    .with_context(|| format!("{a} {v}: not a number"))?,
            ))
        };
        match a.as_str() {
            "--server" => args.server = PathBuf::from(val()?),
            "--headscale" => {
                let v = val()?;
                args.headscale = (v != "none").then(|| PathBuf::from(v));
            }
            "--nodes" => {
                args.nodes = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--nodes takes a comma-separated list of counts")?;
            }
            "--probes" => args.probes = val()?.parse().context("--probes")?,
            "--concurrency" => args.concurrency = val()?.parse().context("--concurrency")?,
            "--phase-timeout" => args.phase_timeout = secs(val()?)?,
            "--headscale-budget" => args.headscale_budget = secs(val()?)?,
            "--fanout-timeout" => args.fanout_timeout = secs(val()?)?,
            "--join-timeout" => args.join_timeout = secs(val()?)?,
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.nodes.is_empty() || args.nodes.contains(&0) {
        bail!("--nodes needs positive counts");
    }
    if args.probes == 0 || args.concurrency == 0 {
        bail!("--probes and --concurrency must be positive");
    }
    // Not given: the pinned build (an error when it is missing, before anything runs).
    if args
        .headscale
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        args.headscale = Some(headscale::locate()?);
    }
    if let Some(p) = &args.headscale
        && !p.is_file()
    {
        bail!("{}: no such headscale binary", p.display());
    }
    if !args.server.is_file() {
        bail!(
            "{}: no such server binary (build it with cargo build --release -p tsunagu-server, or pass --server)",
            args.server.display()
        );
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------
// Processes: limits, /proc figures

/// Raise the soft RLIMIT_NOFILE so that this process and the server (which inherits it)
/// can each hold `need` descriptors.
fn raise_nofile(need: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        // Root may raise the hard limit too.
        let want = libc::rlimit {
            rlim_cur: need,
            rlim_max: need,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            bail!(
                "need {need} file descriptors but the hard limit is {} (raise it: ulimit -Hn {need})",
                lim.rlim_max
            );
        }
    } else {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------
// The server under test

/// Which coordination server is under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Tsunagu,
    Headscale,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Tsunagu => "tsunagu-server",
            Kind::Headscale => "headscale",
        }
    }
}

/// A free loopback port: bind, note, release (the server binds it right after).
fn free_loopback() -> Result<std::net::SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")
}

struct ServerProc {
    kind: Kind,
    child: Child,
    pid: String,
    url: String,
    data: PathBuf,
    /// Removes the data directory on drop (unless `--keep`).
    _tmp: Option<tempfile::TempDir>,
    log: PathBuf,
    bin: PathBuf,
    /// Headscale's config file (its CLI needs it too).
    config: Option<PathBuf>,
}

impl ServerProc {
    fn start(kind: Kind, bin: &Path, keep: bool) -> Result<ServerProc> {
        let tmp = tempfile::Builder::new()
            .prefix("control-scale.")
            .tempdir()
            .context("creating the data directory")?;
        let data = tmp.path().to_path_buf();
        let listen = free_loopback()?;
        let url = format!("http://{listen}");
        let log = data.join("server.log");
        let log_file = std::fs::File::create(&log).context("creating the server log")?;
        let mut cmd = Command::new(bin);
        let mut config = None;
        match kind {
            Kind::Tsunagu => {
                let listen = listen.to_string();
                // Every simulated node comes from 127.0.0.1: lift the per-address budgets of
                // connections and register requests (meant for the public internet).
                let limits = data.join("server.toml");
                std::fs::write(
                    &limits,
                    "[limits]\nmax_connections_per_ip = 1000000\n\
                     register_requests_per_ip_per_second = 1000000.0\n\
                     register_request_burst_per_ip = 1000000.0\n",
                )
                .context("writing the server's configuration")?;
                cmd.arg("--data-dir")
                    .arg(&data)
                    .arg("--config")
                    .arg(&limits)
                    // No relay: it would bind STUN on 127.0.0.1:3478 (taken by anything
                    // else on the host) and is not what this benchmark measures.
                    .args([
                        "serve",
                        "--listen",
                        &listen,
                        "--server-url",
                        &url,
                        "--no-relay",
                    ]);
                for v in [
                    "TSUNAGU_CONFIG",
                    "TSUNAGU_DATA_DIR",
                    "TSUNAGU_LISTEN",
                    "TSUNAGU_SERVER_URL",
                ] {
                    cmd.env_remove(v);
                }
            }
            Kind::Headscale => {
                let cfg = headscale::config(
                    &data,
                    &headscale::Listen {
                        http: listen,
                        metrics: free_loopback()?,
                        grpc: free_loopback()?,
                    },
                )?;
                cmd.arg("-c").arg(&cfg).arg("serve");
                config = Some(cfg);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().to_string();
        Ok(ServerProc {
            kind,
            child,
            pid,
            url,
            data,
            _tmp: if keep {
                let _ = tmp.keep();
                None
            } else {
                Some(tmp)
            },
            log,
            bin: bin.to_path_buf(),
            config,
        })
    }

    /// Err when the server process has exited.
    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(anyhow!(
                "the server exited ({status}); last lines of its log:\n{}",
                self.log_tail(30)
            )),
            Err(e) => Err(anyhow!("waiting for the server: {e}")),
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let Ok(f) = std::fs::File::open(&self.log) else {
            return "(no log)".into();
        };
        let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Run an admin subcommand against this server (its own CLI); its stdout.
    fn admin(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        match &self.config {
            Some(cfg) => cmd.arg("-c").arg(cfg),
            None => cmd
                .arg("--data-dir")
                .arg(&self.data)
                .env_remove("TSUNAGU_CONFIG")
                .env_remove("TSUNAGU_DATA_DIR"),
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {}", self.kind.label(), args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "{} {} failed ({}): {}",
                self.kind.label(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Wait until the server answers `/key` and its admin CLI takes commands; then
    /// create the user and a reusable key. Returns (server key, auth key).
    async fn setup(&mut self) -> Result<(MachinePublic, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let key = loop {
            self.check_alive()?;
            match tsunagu_client::fetch_server_key(&self.url).await {
                Ok(k) => break k,
                Err(e) if Instant::now() > deadline => {
                    bail!("the server did not answer /key within 30 s: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        loop {
            self.check_alive()?;
            match self.admin(&["users", "create", "bench"]) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let out = match self.kind {
            Kind::Tsunagu => {
                self.admin(&["preauthkeys", "create", "--user", "bench", "--reusable"])?
            }
            Kind::Headscale => {
                // Its keys belong to a user ID.
                let users: serde_json::Value =
                    serde_json::from_str(&self.admin(&["users", "list", "-o", "json"])?)
                        .context("headscale users list -o json")?;
                let id = users
                    .as_array()
                    .and_then(|a| a.iter().find(|u| u["name"] == "bench"))
                    .and_then(|u| match &u["id"] {
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        serde_json::Value::String(s) => Some(s.clone()),
                        _ => None,
                    })
                    .ok_or_else(|| anyhow!("headscale lists no user bench: {users}"))?;
                self.admin(&[
                    "preauthkeys",
                    "create",
                    "--user",
                    &id,
                    "--reusable",
                    "--expiration",
                    "24h",
                ])?
            }
        };
        let auth = out
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| anyhow!("preauthkeys create printed nothing"))?
            .to_string();
        Ok((key, auth))
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(&self.pid, "VmHWM")
    }

    fn rss_kib(&self) -> Option<u64> {
        status_kib(&self.pid, "VmRSS")
    }

    fn cpu(&self) -> Duration {
        cpu_time(&self.pid).unwrap_or_default()
    }

    /// SIGTERM by PID, SIGKILL after 10 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = self.pid.parse::<libc::pid_t>() {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Simulated nodes and what their streams see

struct Ident {
    machine: MachinePrivate,
    node: NodePrivate,
    hostname: String,
}

impl Ident {
    fn new(hostname: String) -> Ident {
        Ident {
            machine: MachinePrivate::generate(),
            node: NodePrivate::generate(),
            hostname,
        }
    }

    fn hostinfo(&self) -> Hostinfo {
        Hostinfo {
            hostname: self.hostname.clone(),
            os: "linux".into(),
            ..Hostinfo::default()
        }
    }

    fn register_request(&self, auth_key: &str) -> RegisterRequest {
        RegisterRequest {
            version: CURRENT_CAPABILITY_VERSION,
            node_key: self.node.public(),
            hostinfo: Some(self.hostinfo()),
            auth: Some(RegisterResponseAuth {
                auth_key: auth_key.into(),
                ..RegisterResponseAuth::default()
            }),
            ..RegisterRequest::default()
        }
    }

    fn map_request(&self) -> MapRequest {
        MapRequest {
            version: CURRENT_CAPABILITY_VERSION,
            compress: "zstd".into(),
            keep_alive: true,
            node_key: self.node.public(),
            stream: true,
            hostinfo: Some(self.hostinfo()),
            ..MapRequest::default()
        }
    }
}

/// Arrivals of one probe (a node registered after the N): per stream, when the stream
/// first listed it, and when it first listed it online.
struct Probe {
    /// Nanoseconds since `Shared::base`, plus one (0 = not yet).
    arrivals: Vec<AtomicU64>,
    online_arrivals: Vec<AtomicU64>,
    /// Streams that existed when the probe registered and have not listed it yet.
    remaining: AtomicUsize,
    online_remaining: AtomicUsize,
    /// Its node ID as the server's maps give it (0 = not seen yet), for online changes
    /// sent by ID (`PeersChangedPatch`, `OnlineChange`: Headscale's way).
    id: AtomicI64,
}

/// What the stream tasks share with the driver.
struct Shared {
    base: Instant,
    /// Base nodes (streams 0..n); probes are nodes (and streams) n..n+k.
    n: usize,
    k: usize,
    /// Node key -> node index (base nodes first, then probes); never changes.
    index: HashMap<NodePublic, u32>,
    first_maps: AtomicUsize,
    /// Base streams that have listed all n-1 other base nodes.
    converged: AtomicUsize,
    /// Streams that ended or failed (nothing should end during the run).
    stream_failures: AtomicUsize,
    first_failure: std::sync::Mutex<Option<String>>,
    probes: Vec<Probe>,
    stop: AtomicBool,
    /// Joins retried (as a real client retries), by reason.
    retries: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    /// Streams the server ended and that were opened again, by reason.
    reopens: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Shared {
    fn retried(&self, reason: String) {
        *self
            .retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_insert(0) += 1;
    }

    fn reopened(&self, reason: String) {
        *self
            .reopens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_insert(0) += 1;
    }

    fn reopen_count(&self) -> usize {
        self.reopens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    fn retry_count(&self) -> usize {
        self.retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn fail(&self, sid: usize, what: String) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        self.stream_failures.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(format!("stream {sid}: {what}"));
        }
    }

    fn check_streams(&self) -> Result<()> {
        let n = self.stream_failures.load(Ordering::Relaxed);
        if n > 0 {
            let first = self
                .first_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            bail!("{n} map stream(s) ended or failed; first: {first}");
        }
        Ok(())
    }
}

struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    /// Set bit `i`; whether it was already set.
    fn test_and_set(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let was = self.0[w] & b != 0;
        self.0[w] |= b;
        was
    }
}

/// What the benchmark reads of a map message: peers' keys, IDs and online state.
/// Parsing only that keeps the simulated nodes' CPU from crowding out the server's.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SlimMap {
    #[serde(default)]
    keep_alive: bool,
    /// The node itself: with it (or `Peers`) the message is a full map. A server may
    /// leave `Peers` out when there are none (Go's `omitempty`).
    node: Option<serde::de::IgnoredAny>,
    peers: Option<Vec<SlimPeer>>,
    peers_changed: Option<Vec<SlimPeer>>,
    peers_changed_patch: Option<Vec<SlimPatch>>,
    /// Node ID (a string key in JSON) -> online.
    online_change: Option<HashMap<String, bool>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SlimPeer {
    #[serde(rename = "ID", default)]
    id: i64,
    key: NodePublic,
    online: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SlimPatch {
    #[serde(rename = "NodeID")]
    node_id: i64,
    online: Option<bool>,
}

/// What a stream needs to open itself again: who it is and where its server is.
struct Redial {
    ident: Arc<Ident>,
    url: Arc<str>,
    server_key: MachinePublic,
}

/// How often a stream that the server ended is opened again before the benchmark gives up.
const REOPEN_ATTEMPTS: u32 = 6;

/// Opens the map stream again after the server ended it, as a real client does: a new
/// map request on the same connection, or on a new connection when that fails; retried
/// 1, 2, 4, 8, 16 s later.
async fn reopen(redial: &Redial, client: &mut ControlClient) -> Result<MapStream> {
    let req = redial.ident.map_request();
    let mut attempt = 1;
    loop {
        let r = match client.map(&req).await {
            Ok(s) => Ok(s),
            Err(_) => {
                match ControlClient::connect(&redial.url, &redial.server_key, &redial.ident.machine)
                    .await
                {
                    Ok(mut c) => {
                        let s = c.map(&req).await;
                        *client = c;
                        s
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) if attempt >= REOPEN_ATTEMPTS => {
                return Err(anyhow!("{e}").context(format!("{attempt} attempts")));
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                attempt += 1;
            }
        }
    }
}

/// Drain one map stream for as long as it lasts, recording what it learns; when the
/// server ends it (after its first map), open it again (counted, by reason).
async fn drain(
    shared: Arc<Shared>,
    sid: usize,
    mut stream: MapStream,
    mut client: ControlClient,
    first: oneshot::Sender<Result<(), String>>,
    redial: Redial,
) {
    let mut first = Some(first);
    let total = shared.n + shared.k;
    let mut seen = Bits::new(total);
    let mut seen_online = Bits::new(total);
    let mut known_base = 0usize;
    let mut converged = false;
    let need_base = if sid < shared.n {
        shared.n - 1
    } else {
        shared.n
    };
    loop {
        let ended = match stream.next_json().await {
            None => Err("the server ended the stream".to_string()),
            Some(Err(e)) => Err(format!("{e}")),
            Some(Ok(json)) => Ok(json),
        };
        let json = match ended {
            Ok(json) => json,
            Err(what) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(what));
                    return;
                }
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                match reopen(&redial, &mut client).await {
                    Ok(s) => {
                        shared.reopened(what);
                        stream = s;
                        continue;
                    }
                    Err(e) => {
                        shared.fail(sid, format!("{what}; opening it again failed: {e:#}"));
                        return;
                    }
                }
            }
        };
        let m = match serde_json::from_slice::<SlimMap>(&json) {
            Ok(m) => m,
            Err(e) => {
                let what = format!("invalid map message: {e}");
                match first.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(what));
                    }
                    None => shared.fail(sid, what),
                }
                return;
            }
        };
        if m.keep_alive {
            continue;
        }
        let now = shared.now_ns() + 1;
        for p in m
            .peers
            .iter()
            .flatten()
            .chain(m.peers_changed.iter().flatten())
        {
            let Some(&idx) = shared.index.get(&p.key) else {
                continue;
            };
            let idx = idx as usize;
            let probe = idx.checked_sub(shared.n).map(|j| (j, &shared.probes[j]));
            if let Some((_, pr)) = probe
                && p.id != 0
            {
                pr.id.store(p.id, Ordering::Relaxed);
            }
            if !seen.test_and_set(idx) {
                match probe {
                    None => known_base += 1,
                    // Only streams that existed when probe j registered count for it.
                    Some((j, pr)) if sid < shared.n + j => {
                        pr.arrivals[sid].store(now, Ordering::Relaxed);
                        pr.remaining.fetch_sub(1, Ordering::AcqRel);
                    }
                    Some(_) => {}
                }
            }
            if p.online == Some(true)
                && let Some((j, pr)) = probe
                && sid < shared.n + j
                && !seen_online.test_and_set(idx)
            {
                pr.online_arrivals[sid].store(now, Ordering::Relaxed);
                pr.online_remaining.fetch_sub(1, Ordering::AcqRel);
            }
        }
        // Online changes by node ID: only the probes' matter.
        let by_id = m
            .peers_changed_patch
            .iter()
            .flatten()
            .filter_map(|p| Some((p.node_id, p.online?)))
            .chain(
                m.online_change
                    .iter()
                    .flatten()
                    .filter_map(|(id, on)| Some((id.parse::<i64>().ok()?, *on))),
            );
        for (id, online) in by_id {
            if !online || id == 0 {
                continue;
            }
            let found = shared
                .probes
                .iter()
                .enumerate()
                .find(|(_, pr)| pr.id.load(Ordering::Relaxed) == id);
            if let Some((j, pr)) = found
                && sid < shared.n + j
                && !seen_online.test_and_set(shared.n + j)
            {
                pr.online_arrivals[sid].store(now, Ordering::Relaxed);
                pr.online_remaining.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if let Some(tx) = first.take() {
            let r = if m.peers.is_some() || m.node.is_some() {
                Ok(())
            } else {
                Err("the first message is not a full map".to_string())
            };
            let _ = tx.send(r);
            shared.first_maps.fetch_add(1, Ordering::Relaxed);
        }
        if sid < shared.n && !converged && known_base >= need_base {
            converged = true;
            shared.converged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How often a node tries to join before the benchmark gives up.
const JOIN_ATTEMPTS: u32 = 6;

/// [`join_once`], retried after a failure (1, 2, 4, 8, 16 s later) like a real client
/// retries; every retry is counted by reason. A refused registration is not retried.
async fn join(
    shared: Arc<Shared>,
    sid: usize,
    ident: Arc<Ident>,
    url: Arc<str>,
    server_key: MachinePublic,
    auth: Arc<str>,
) -> Result<JoinHandle<()>> {
    let mut attempt = 1;
    loop {
        let r = join_once(
            shared.clone(),
            sid,
            ident.clone(),
            url.clone(),
            server_key,
            auth.clone(),
        )
        .await;
        match r {
            Ok(task) => return Ok(task),
            Err(e) if attempt < JOIN_ATTEMPTS && !format!("{e}").contains("refused") => {
                let reason = format!("{e:#}");
                if shared.retry_count() == 0 {
                    progress(format!("node {sid}: retrying after: {reason}"));
                }
                shared.retried(reason);
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                attempt += 1;
            }
            Err(e) => return Err(e.context(format!("attempt {attempt}"))),
        }
    }
}

/// Connect, register, open the map stream, spawn its drain task; returns when the first
/// full map arrived.
async fn join_once(
    shared: Arc<Shared>,
    sid: usize,
    ident: Arc<Ident>,
    url: Arc<str>,
    server_key: MachinePublic,
    auth: Arc<str>,
) -> Result<JoinHandle<()>> {
    let mut client = ControlClient::connect(&url, &server_key, &ident.machine)
        .await
        .context("connect")?;
    let resp = client
        .register(&ident.register_request(&auth))
        .await
        .context("register")?;
    if !resp.machine_authorized || !resp.error.is_empty() {
        bail!(
            "registration refused: authorized {}, error {:?}",
            resp.machine_authorized,
            resp.error
        );
    }
    let stream = client.map(&ident.map_request()).await.context("map")?;
    // `client` moves into the stream task below (the connection lives with the stream).
    let (tx, rx) = oneshot::channel();
    let redial = Redial {
        ident,
        url,
        server_key,
    };
    let task = tokio::spawn(drain(shared, sid, stream, client, tx, redial));
    match rx.await {
        Ok(Ok(())) => Ok(task),
        Ok(Err(e)) => Err(anyhow!("waiting for the first map: {e}")),
        Err(_) => Err(anyhow!("the stream task ended before the first map")),
    }
}

/// Register a probe: connect (not timed), then register; returns when register returned.
async fn probe_register(
    ident: &Ident,
    url: &str,
    server_key: &MachinePublic,
    auth: &str,
) -> Result<(ControlClient, Instant, Instant)> {
    let mut client = ControlClient::connect(url, server_key, &ident.machine)
        .await
        .context("connect")?;
    let req = ident.register_request(auth);
    let started = Instant::now();
    let resp = client.register(&req).await.context("register")?;
    let done = Instant::now();
    if !resp.machine_authorized || !resp.error.is_empty() {
        bail!(
            "registration refused: authorized {}, error {:?}",
            resp.machine_authorized,
            resp.error
        );
    }
    Ok((client, started, done))
}

// ---------------------------------------------------------------------------------------
// Figures

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Poll `cond` every 10 ms until it holds; Err after `timeout`, when the server died or a
/// stream failed. `status` describes the situation for the error message.
async fn wait_for(
    what: &str,
    timeout: Duration,
    server: &mut ServerProc,
    shared: &Shared,
    cond: impl Fn() -> bool,
    status: impl Fn() -> String,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_check = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            server.check_alive()?;
            shared.check_streams()?;
            last_check = Instant::now();
        }
        if Instant::now() > deadline {
            bail!("{what}: not done after {timeout:?} ({})", status());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Register-all did not finish within its budget: how far it got.
#[derive(Debug)]
struct Unfinished {
    /// Nodes that got their first map.
    done: usize,
    n: usize,
    budget: Duration,
    /// The server's peak RSS until then.
    peak_rss_kib: u64,
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "register-all: only {}/{} nodes got their first map within {:?}",
            self.done, self.n, self.budget
        )
    }
}

impl std::error::Error for Unfinished {}

struct Outcome {
    /// The server and its version ("tsunagu-server 0.1.0", "headscale v0.29.3").
    server: String,
    /// "COUNTx REASON" per distinct reason a join was retried.
    retries: Vec<String>,
    /// "COUNTx REASON" per distinct reason the server ended a stream (opened again).
    reopens: Vec<String>,
    register_all: Duration,
    converge: Duration,
    peak_rss_kib: u64,
    rss_after_register_kib: u64,
    fanout: Vec<u64>,
    fanout_complete: Vec<u64>,
    online: Vec<u64>,
    register_call: Vec<u64>,
    /// (stream, probe) pairs listed before the probe's register call returned.
    early: usize,
    /// Fan-out delays measured from the start of the register call.
    from_start: Vec<u64>,
    server_cpu_register: Duration,
    server_cpu_probes: Duration,
    bench_cpu_register: Duration,
    probe_phase: Duration,
}

async fn run_one(args: &Args, n: usize, kind: Kind, bin: &Path) -> Result<Outcome> {
    let k = args.probes;
    let tag = format!("{} N={n}", kind.label());
    // Headscale's register-all grows with N² (minutes at 1,000 nodes, hours at 5,000 on
    // two cores): its own budget bounds it, and no node's join times out before it.
    let (register_budget, join_timeout) = match kind {
        Kind::Tsunagu => (args.phase_timeout, args.join_timeout),
        Kind::Headscale => {
            let b = args.headscale_budget.min(args.phase_timeout);
            (b, b + Duration::from_secs(60))
        }
    };
    progress(format!("{tag}: starting {}", bin.display()));
    let mut server = ServerProc::start(kind, bin, args.keep)?;
    let (server_key, auth) = server.setup().await?;
    progress(format!(
        "{tag}: server pid {} at {}, data {}, log {}",
        server.pid,
        server.url,
        server.data.display(),
        server.log.display()
    ));

    progress(format!("{tag}: generating {} node identities", n + k));
    let idents: Vec<Arc<Ident>> = (0..n + k)
        .map(|i| {
            Arc::new(Ident::new(if i < n {
                format!("node-{i}")
            } else {
                format!("probe-{}", i - n)
            }))
        })
        .collect();
    let index: HashMap<NodePublic, u32> = idents
        .iter()
        .enumerate()
        .map(|(i, id)| (id.node.public(), i as u32))
        .collect();
    let probes = (0..k)
        .map(|j| Probe {
            arrivals: (0..n + k).map(|_| AtomicU64::new(0)).collect(),
            online_arrivals: (0..n + k).map(|_| AtomicU64::new(0)).collect(),
            remaining: AtomicUsize::new(n + j),
            online_remaining: AtomicUsize::new(n + j),
            id: AtomicI64::new(0),
        })
        .collect();
    let shared = Arc::new(Shared {
        base: Instant::now(),
        n,
        k,
        index,
        first_maps: AtomicUsize::new(0),
        converged: AtomicUsize::new(0),
        stream_failures: AtomicUsize::new(0),
        first_failure: std::sync::Mutex::new(None),
        probes,
        stop: AtomicBool::new(false),
        retries: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        reopens: std::sync::Mutex::new(std::collections::BTreeMap::new()),
    });
    let url: Arc<str> = server.url.clone().into();
    let auth: Arc<str> = auth.into();
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(n + k);

    let result = async {
        // ---- Phase 1: register N nodes, each holding its stream.
        progress(format!(
            "{tag}: registering {n} nodes, {} at a time",
            args.concurrency
        ));
        let cpu0 = server.cpu();
        let self_cpu0 = cpu_time("self").unwrap_or_default();
        let t0 = Instant::now();
        let sem = Arc::new(Semaphore::new(args.concurrency));
        let mut joins = tokio::task::JoinSet::new();
        for (sid, ident) in idents.iter().take(n).enumerate() {
            let (shared, ident, url, auth, sem) = (
                shared.clone(),
                ident.clone(),
                url.clone(),
                auth.clone(),
                sem.clone(),
            );
            joins.spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| anyhow!("{e}"))?;
                tokio::time::timeout(
                    join_timeout,
                    join(shared, sid, ident, url, server_key, auth),
                )
                .await
                .map_err(|_| anyhow!("node {sid}: no first map within {join_timeout:?}"))?
                .with_context(|| format!("node {sid}"))
            });
        }
        let deadline = tokio::time::Instant::now() + register_budget;
        let mut last_report = Instant::now();
        let mut last_done = 0usize;
        let mut last_cpu = cpu0;
        let mut last_self_cpu = self_cpu0;
        while !joins.is_empty() {
            let next = tokio::time::timeout(Duration::from_secs(1), joins.join_next()).await;
            match next {
                Ok(Some(Ok(Ok(task)))) => tasks.push(task),
                Ok(Some(Ok(Err(e)))) => return Err(e),
                Ok(Some(Err(e))) => bail!("a registration task failed: {e}"),
                Ok(None) => break,
                Err(_) => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Unfinished {
                    done: tasks.len(),
                    n,
                    budget: register_budget,
                    peak_rss_kib: 0,
                }
                .into());
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                server.check_alive()?;
                let cpu = server.cpu();
                let self_cpu = cpu_time("self").unwrap_or_default();
                let dt = last_report.elapsed().as_secs_f64();
                progress(format!(
                    "{tag}: {}/{n} streaming ({:.0}/s), converged {}, retries {}, reopened {}, server rss {:.0} MiB, server cpu {:.0}%, bench cpu {:.0}%",
                    tasks.len(),
                    (tasks.len() - last_done) as f64 / dt,
                    shared.converged.load(Ordering::Relaxed),
                    shared.retry_count(),
                    shared.reopen_count(),
                    mib(server.rss_kib().unwrap_or(0)),
                    (cpu - last_cpu).as_secs_f64() / dt * 100.0,
                    (self_cpu - last_self_cpu).as_secs_f64() / dt * 100.0,
                ));
                last_report = Instant::now();
                last_done = tasks.len();
                last_cpu = cpu;
                last_self_cpu = self_cpu;
            }
        }
        let register_all = t0.elapsed();
        let server_cpu_register = server.cpu() - cpu0;
        let bench_cpu_register = cpu_time("self").unwrap_or_default() - self_cpu0;
        let rss_after_register_kib = server.rss_kib().unwrap_or(0);
        progress(format!(
            "{tag}: all {n} streaming after {:.1} s (server cpu {:.1} s, bench cpu {:.1} s, server rss {:.0} MiB)",
            register_all.as_secs_f64(),
            server_cpu_register.as_secs_f64(),
            bench_cpu_register.as_secs_f64(),
            mib(rss_after_register_kib),
        ));

        // ---- Convergence: every stream knows every other node.
        let tc = Instant::now();
        wait_for(
            "convergence",
            args.phase_timeout,
            &mut server,
            &shared,
            || shared.converged.load(Ordering::Relaxed) >= n,
            || {
                format!(
                    "{}/{n} streams know all {} other nodes",
                    shared.converged.load(Ordering::Relaxed),
                    n - 1
                )
            },
        )
        .await?;
        let converge = t0.elapsed();
        progress(format!(
            "{tag}: every stream knows every node {:.1} s after the last first map ({:.1} s after the start)",
            tc.elapsed().as_secs_f64(),
            converge.as_secs_f64()
        ));
        // Let anything still queued (e.g. online flags) settle.
        tokio::time::sleep(Duration::from_millis(500)).await;

        // ---- Phase 2: probes, one at a time.
        progress(format!("{tag}: fan-out of {k} new nodes, one at a time"));
        let cpu1 = server.cpu();
        let tp = Instant::now();
        let phase_deadline = Instant::now() + args.phase_timeout;
        let mut fanout = Vec::with_capacity(k * (n + k));
        let mut fanout_complete = Vec::with_capacity(k);
        let mut online = Vec::with_capacity(k * (n + k));
        let mut register_call = Vec::with_capacity(k);
        let mut early = 0usize;
        let mut from_start = Vec::with_capacity(k * (n + k));
        for j in 0..k {
            if Instant::now() > phase_deadline {
                bail!("fan-out phase: not done after {:?}", args.phase_timeout);
            }
            let sid = n + j;
            let ident = &idents[sid];
            let pr = &shared.probes[j];
            let (mut client, t_start, t_reg) =
                tokio::time::timeout(args.fanout_timeout, probe_register(ident, &url, &server_key, &auth))
                    .await
                    .map_err(|_| anyhow!("probe {j}: registration took over {:?}", args.fanout_timeout))?
                    .with_context(|| format!("probe {j}"))?;
            let t_reg_ns = (t_reg - shared.base).as_nanos() as u64;
            let t_start_ns = (t_start - shared.base).as_nanos() as u64;
            let reg_ns = t_reg_ns - t_start_ns;
            register_call.push(reg_ns);
            wait_for(
                &format!("fan-out of probe {j}"),
                args.fanout_timeout,
                &mut server,
                &shared,
                || pr.remaining.load(Ordering::Acquire) == 0,
                || format!("{}/{} streams have not listed it", pr.remaining.load(Ordering::Relaxed), n + j),
            )
            .await?;
            let arrived: Vec<u64> = pr.arrivals[..n + j]
                .iter()
                .map(|a| a.load(Ordering::Relaxed).saturating_sub(1))
                .collect();
            // Delays from the register call returning; a stream may list the node before
            // the response reached us (counted as 0, and counted in `early`).
            let mut delays: Vec<u64> = arrived.iter().map(|a| a.saturating_sub(t_reg_ns)).collect();
            early += arrived.iter().filter(|&&a| a < t_reg_ns).count();
            from_start.extend(arrived.iter().map(|a| a.saturating_sub(t_start_ns)));
            delays.sort_unstable();
            let max = delays.last().copied().unwrap_or(0);
            fanout_complete.push(max);
            // Now the probe streams too: it comes online (a second change for everyone).
            let t_online = shared.now_ns();
            let stream = client.map(&ident.map_request()).await.context("probe map")?;
            let (tx, rx) = oneshot::channel();
            let redial = Redial {
                ident: ident.clone(),
                url: url.clone(),
                server_key,
            };
            tasks.push(tokio::spawn(drain(shared.clone(), sid, stream, client, tx, redial)));
            tokio::time::timeout(args.fanout_timeout, rx)
                .await
                .map_err(|_| anyhow!("probe {j}: no first map within {:?}", args.fanout_timeout))?
                .map_err(|_| anyhow!("probe {j}: stream task ended"))?
                .map_err(|e| anyhow!("probe {j}: {e}"))?;
            wait_for(
                &format!("online change of probe {j}"),
                args.fanout_timeout,
                &mut server,
                &shared,
                || pr.online_remaining.load(Ordering::Acquire) == 0,
                || format!("{}/{} streams have not seen it online", pr.online_remaining.load(Ordering::Relaxed), n + j),
            )
            .await?;
            let mut od: Vec<u64> = pr.online_arrivals[..n + j]
                .iter()
                .map(|a| a.load(Ordering::Relaxed).saturating_sub(1).saturating_sub(t_online))
                .collect();
            od.sort_unstable();
            progress(format!(
                "{tag}: probe {j:2}: register call {:.1} ms; listed by all {} streams: p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms; online everywhere {:.1} ms after its map request",
                ms(reg_ns),
                n + j,
                ms(pct(&delays, 50.0)),
                ms(pct(&delays, 99.0)),
                ms(max),
                ms(od.last().copied().unwrap_or(0)),
            ));
            fanout.extend(delays);
            online.extend(od);
        }
        let probe_phase = tp.elapsed();
        let server_cpu_probes = server.cpu() - cpu1;
        fanout.sort_unstable();
        online.sort_unstable();
        fanout_complete.sort_unstable();
        register_call.sort_unstable();
        from_start.sort_unstable();
        let retries = shared
            .retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(reason, count)| format!("{count}x {reason}"))
            .collect::<Vec<_>>();
        let reopens = shared
            .reopens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(reason, count)| format!("{count}x {reason}"))
            .collect::<Vec<_>>();
        Ok(Outcome {
            reopens,
            server: format!("{} ({})", kind.label(), server_version(kind, bin)),
            retries,
            register_all,
            converge,
            peak_rss_kib: 0,
            rss_after_register_kib,
            fanout,
            fanout_complete,
            online,
            register_call,
            early,
            from_start,
            server_cpu_register,
            server_cpu_probes,
            bench_cpu_register,
            probe_phase,
        })
    }
    .await;

    let peak = server.peak_rss_kib();
    shared.stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    drop(tasks);
    server.stop();
    if result.is_err() {
        progress(format!(
            "last lines of the server log ({}):\n{}",
            server.log.display(),
            server.log_tail(20)
        ));
    }
    let mut out = match result {
        Ok(o) => o,
        Err(e) => {
            return Err(match e.downcast::<Unfinished>() {
                Ok(u) => Unfinished {
                    peak_rss_kib: peak.unwrap_or(0),
                    ..u
                }
                .into(),
                Err(e) => e,
            });
        }
    };
    out.peak_rss_kib = peak.ok_or_else(|| anyhow!("could not read VmHWM of the server"))?;
    // Give the sockets of this round time to go away before the next.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(out)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control-scale: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let max_n = args.nodes.iter().copied().max().unwrap_or(0);
    // Each process holds one socket per node plus the database, the listener and slack.
    raise_nofile((max_n + args.probes + 1024) as u64)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let load_before = tsunagu_bench::loadavg();
    let mut failed = false;
    for &n in &args.nodes {
        let o = rt.block_on(run_one(&args, n, Kind::Tsunagu, &args.server))?;
        print_details(&args, n, Kind::Tsunagu, &o);
        let h = match &args.headscale {
            Some(bin) => match rt.block_on(run_one(&args, n, Kind::Headscale, bin)) {
                Ok(h) => {
                    print_details(&args, n, Kind::Headscale, &h);
                    Some(Ok(h))
                }
                Err(e) => match e.downcast::<Unfinished>() {
                    Ok(u) => {
                        println!(
                            "control-scale: nodes {n} headscale: register-all unfinished after its budget of {:.0} s: {} of {n} nodes had their first map (peak rss {:.0} MiB); no fan-out measured",
                            u.budget.as_secs_f64(),
                            u.done,
                            mib(u.peak_rss_kib)
                        );
                        Some(Err(u))
                    }
                    Err(e) => {
                        failed = true;
                        progress(format!("N={n}: headscale FAILED: {e:#}"));
                        let text = format!("{e:#}");
                        println!(
                            "control-scale: nodes {n} headscale FAILED: {} (details on stderr)",
                            text.lines().next().unwrap_or_default()
                        );
                        None
                    }
                },
            },
            None => None,
        };
        println!(
            "control-scale: host {} cores, load average {load_before} before, {} now",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            tsunagu_bench::loadavg()
        );
        let hs = match &h {
            None => "headscale register-all n/a s, rss n/a MiB, fanout p99 n/a ms".to_owned(),
            Some(Ok(h)) => format!(
                "headscale register-all {:.1} s, rss {:.0} MiB, fanout p99 {:.1} ms",
                h.register_all.as_secs_f64(),
                mib(h.peak_rss_kib),
                ms(pct(&h.fanout, 99.0)),
            ),
            Some(Err(u)) => format!(
                "headscale register-all >{:.1} s, rss {:.0} MiB, fanout p99 n/a ms",
                u.budget.as_secs_f64(),
                mib(u.peak_rss_kib),
            ),
        };
        println!(
            "control-scale: nodes {n}, register-all {:.1} s, rss {:.0} MiB, fanout p50 {:.1} ms, p99 {:.1} ms, {hs}",
            o.register_all.as_secs_f64(),
            mib(o.peak_rss_kib),
            ms(pct(&o.fanout, 50.0)),
            ms(pct(&o.fanout, 99.0)),
        );
    }
    drop(rt);
    if failed {
        bail!("headscale failed (its figures are n/a)");
    }
    Ok(())
}

/// The server's version: `--version` (tsunagu-server); for headscale the `VERSION` file
/// `bench/build-headscale` writes beside it (a build from the module's directory calls
/// itself "dev"), else its `version`.
fn server_version(kind: Kind, bin: &Path) -> String {
    let arg = match kind {
        Kind::Tsunagu => "--version",
        Kind::Headscale => {
            if let Some(v) = bin
                .parent()
                .and_then(|d| std::fs::read_to_string(d.join("VERSION")).ok())
            {
                return format!("v{}", v.trim());
            }
            "version"
        }
    };
    tsunagu_bench::wg::first_line_of(Command::new(bin).arg(arg))
}

/// The details and retries lines of one server's run.
fn print_details(args: &Args, n: usize, kind: Kind, o: &Outcome) {
    println!(
        "control-scale: nodes {n} {} details: converged {:.1} s, server cpu {:.1} s (register-all) + {:.1} s ({} probes in {:.1} s), bench cpu {:.1} s (register-all), rss after register-all {:.0} MiB, fanout p50 {:.1} ms p99 {:.1} ms, fanout last-stream p50 {:.1} ms max {:.1} ms, fanout from register start p50 {:.1} ms p99 {:.1} ms, {} of {} pairs listed before register returned, online-change p50 {:.1} ms p99 {:.1} ms, probe register call p50 {:.1} ms max {:.1} ms",
        o.server,
        o.converge.as_secs_f64(),
        o.server_cpu_register.as_secs_f64(),
        o.server_cpu_probes.as_secs_f64(),
        args.probes,
        o.probe_phase.as_secs_f64(),
        o.bench_cpu_register.as_secs_f64(),
        mib(o.rss_after_register_kib),
        ms(pct(&o.fanout, 50.0)),
        ms(pct(&o.fanout, 99.0)),
        ms(pct(&o.fanout_complete, 50.0)),
        ms(o.fanout_complete.last().copied().unwrap_or(0)),
        ms(pct(&o.from_start, 50.0)),
        ms(pct(&o.from_start, 99.0)),
        o.early,
        o.fanout.len(),
        ms(pct(&o.online, 50.0)),
        ms(pct(&o.online, 99.0)),
        ms(pct(&o.register_call, 50.0)),
        ms(o.register_call.last().copied().unwrap_or(0)),
    );
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join("; ")
        }
    };
    println!(
        "control-scale: nodes {n} {} retried joins: {}; streams the server ended (opened again): {}",
        kind.label(),
        list(&o.retries),
        list(&o.reopens)
    );
}
