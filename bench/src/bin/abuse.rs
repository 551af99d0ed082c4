//! abuse: what attacks on `tsunagu-server`'s public port cost its legitimate nodes.
//!
//! ```text
//!  [client] 198.18.1.10 ─ cafe NAT 198.51.100.3 ─┐   legitimate nodes (this program)
//!  [attacker] 198.51.100.66 ─────────────────────┼── [control] 198.51.100.4:8080 tsunagu-server
//!                                                └   (the seed lab's internet bridge)
//! ```
//!
//! The server runs in the seed lab's control namespace; this program drives simulated
//! nodes (`tsunagu-client`, as `control-scale` does) from two namespaces: the legitimate
//! ones from the cafe's client (behind its NAT), the attacker from a public host of its
//! own. Sockets belong to the namespace of the runtime thread that creates them, so each
//! side has a tokio runtime whose threads enter its namespace.
//!
//! Setup: a user, a reusable pre-auth key, `--observers` nodes holding map streams and a
//! prober node. Then, with no attack and under each attack in turn:
//!
//! * **register**: `--registrations` new nodes join one after the other (Noise dial,
//!   register with the key, first map on a stream): time per join;
//! * **fan-out**: `--probes` times, the prober reports a new endpoint (a non-streaming
//!   map request); time until each observer's stream shows it.
//!
//! The attacks, each running for the whole measurement (started `--warmup` before it,
//! stopped after it; every loop bounded by `--attack-timeout` too), aimed at the
//! server's lab address only:
//!
//! * `garbage-registrations`: 100 machine keys, each on its own Noise session, sending
//!   registrations back to back with a new node key and ~8 KiB of Hostinfo each time,
//!   half of them interactive, half with a made-up pre-auth key;
//! * `slowloris`: 500 connections sending a request header a line a second, reconnecting
//!   when closed;
//! * `map-streams`: one node (a member gone rogue) holding 50 map streams, reopening each
//!   one the server closes;
//! * `big-hostinfo`: that node sending map requests with 1 MiB of Hostinfo, 8 at a time.
//!
//! Per phase: p50 and p99 of both, and what the attack achieved (requests, refusals).
//! Slowdown of an attack: the larger of its p99 over the quiet phase's p99, for joins
//! and for fan-out. Also the server's peak RSS (`VmHWM`) and, after it stopped, the rows
//! the attacks left in its database (registrations waiting, nodes the benchmark did not
//! register on purpose). Last line:
//! `abuse: worst p99 slowdown X.Xx (attack NAME), rss peak M MiB, rows left N`.
//!
//! Run through `bench/abuse` (root: it builds the lab), which builds in release.

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::runtime::Runtime;
use tokio::sync::Mutex;
use tsunagu_bench::procfs::{cpu_time, status_kib};
use tsunagu_client::{ClientError, ControlClient, MapStream};
use tsunagu_lab::seed::role;
use tsunagu_lab::{Lab, Netns, ProcId, Seed, SeedOptions, Signal};
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, RegisterResponseAuth,
};
use tsunagu_proto::{MachinePrivate, MachinePublic, NodePrivate, NodePublic};

const SERVER_ADDR: &str = "198.51.100.4:8080";
const SERVER_URL: &str = "http://198.51.100.4:8080";
const ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);

#[derive(Debug, Parser)]
#[command(about = "attacks on tsunagu-server's public port, and what they cost its nodes")]
struct Args {
    /// Directory holding the release binaries (tsunagu-server).
    #[arg(long)]
    bin_dir: PathBuf,
    /// Nodes holding map streams, whose fan-out delays are measured.
    #[arg(long, default_value_t = 50)]
    observers: usize,
    /// Joins measured per phase.
    #[arg(long, default_value_t = 60)]
    registrations: usize,
    /// Endpoint changes fanned out per phase.
    #[arg(long, default_value_t = 30)]
    probes: usize,
    /// Seconds an attack runs before the measurement starts.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Bound (seconds) of any one wait: a join, a fan-out, an attack.
    #[arg(long, default_value_t = 120)]
    attack_timeout: u64,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[abuse] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// Processes and namespaces

/// A runtime whose threads (workers and blocking pool) live in `ns`: every socket a task
/// creates belongs to that namespace. With `nice`, its threads run at that niceness.
fn ns_runtime(ns: &Netns, name: &str, workers: usize, nice: i32) -> Result<Runtime> {
    let path = ns.path();
    let file = Arc::new(
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?,
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setns on a namespace file we hold open; it changes only this
            // thread's network namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            if nice != 0 {
                // SAFETY: gettid has no preconditions; setpriority on our own thread.
                unsafe {
                    let tid = libc::gettid();
                    libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
                }
            }
        })
        .build()
        .context("building a runtime")
}

/// Runs `fut` as a task of `rt` (so on its namespace's threads) and waits for it.
fn run_in<T: Send + 'static>(
    rt: &Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T> {
    rt.block_on(rt.spawn(fut)).map_err(|e| anyhow!("task: {e}"))
}

struct Server {
    id: ProcId,
    pid: u32,
    data: PathBuf,
}

fn start_server(seed: &mut Seed, args: &Args) -> Result<(Server, String)> {
    let bin = args.bin_dir.join("tsunagu-server");
    anyhow::ensure!(bin.is_file(), "{}: no such binary", bin.display());
    let bin = bin.to_string_lossy().into_owned();
    let control = seed.ns(role::CONTROL);
    let data = seed.lab.log_path("server-data");
    let data_s = data.to_string_lossy().into_owned();
    let log = seed.lab.log_path("server.log");
    let id = seed.lab.spawn(
        &control,
        &[
            &bin,
            "--data-dir",
            &data_s,
            "serve",
            "--listen",
            SERVER_ADDR,
            "--server-url",
            SERVER_URL,
        ],
        Some(&log),
    )?;
    let pid = seed.lab.pid(id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.join("admin.sock").exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server did not start; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin = |a: &[&str]| -> Result<String> {
        let mut argv = vec![bin.as_str(), "--data-dir", &data_s];
        argv.extend_from_slice(a);
        let out = control.exec(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match admin(&["users", "create", "bench"]) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let out = admin(&["preauthkeys", "create", "--user", "bench", "--reusable"])?;
    let key = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("preauthkeys create printed nothing"))?
        .to_string();
    Ok((Server { id, pid, data }, key))
}

// ---------------------------------------------------------------------------------------
// Simulated nodes

#[derive(Clone)]
struct Ctx {
    server_key: MachinePublic,
    auth: Arc<str>,
    timeout: Duration,
}

fn hostinfo(name: &str) -> Hostinfo {
    Hostinfo {
        hostname: name.to_string(),
        os: "linux".into(),
        ..Hostinfo::default()
    }
}

fn register_request(node: &NodePrivate, name: &str, auth: Option<&str>) -> RegisterRequest {
    RegisterRequest {
        version: CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        hostinfo: Some(hostinfo(name)),
        auth: auth.map(|k| RegisterResponseAuth {
            auth_key: k.into(),
            ..RegisterResponseAuth::default()
        }),
        ..RegisterRequest::default()
    }
}

fn map_request(node: &NodePrivate, name: &str, stream: bool) -> MapRequest {
    MapRequest {
        version: CURRENT_CAPABILITY_VERSION,
        compress: "zstd".into(),
        keep_alive: true,
        node_key: node.public(),
        stream,
        hostinfo: Some(hostinfo(name)),
        ..MapRequest::default()
    }
}

/// A node joins: Noise dial, register with the key, first map on a stream. Returns the
/// connection and the stream (the node is online while they live).
async fn join(ctx: &Ctx, name: &str) -> Result<(ControlClient, MapStream, NodePrivate)> {
    let machine = MachinePrivate::generate();
    let node = NodePrivate::generate();
    let mut client = ControlClient::connect(SERVER_URL, &ctx.server_key, &machine).await?;
    let r = client
        .register(&register_request(&node, name, Some(&ctx.auth)))
        .await?;
    if !r.machine_authorized {
        bail!("registration refused: {}", r.error);
    }
    let mut stream = client.map(&map_request(&node, name, true)).await?;
    match stream.next_update(ctx.timeout).await? {
        Some(_) => Ok((client, stream, node)),
        None => bail!("the stream ended before the first map"),
    }
}

/// What an observer reads of a map message: peers' keys and endpoints.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SlimMap {
    #[serde(default)]
    peers: Vec<SlimPeer>,
    #[serde(default)]
    peers_changed: Vec<SlimPeer>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SlimPeer {
    key: NodePublic,
    #[serde(default)]
    endpoints: Vec<String>,
}

/// What the observers' tasks share with the measurement.
struct Observed {
    base: Instant,
    prober: NodePublic,
    /// Per observer: the prober's endpoint port last seen, and when (ns since `base`).
    port: Vec<AtomicU64>,
    at: Vec<AtomicU64>,
    failures: AtomicU64,
}

async fn observe(obs: Arc<Observed>, i: usize, mut stream: MapStream, client: ControlClient) {
    let _client = client;
    loop {
        let json = match stream.next_json().await {
            Some(Ok(j)) => j,
            _ => {
                obs.failures.fetch_add(1, Relaxed);
                return;
            }
        };
        let Ok(m) = serde_json::from_slice::<SlimMap>(&json) else {
            continue;
        };
        let now = obs.base.elapsed().as_nanos() as u64;
        for p in m.peers.iter().chain(&m.peers_changed) {
            if p.key != obs.prober {
                continue;
            }
            if let Some(port) = p
                .endpoints
                .first()
                .and_then(|e| e.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u64>().ok())
            {
                obs.at[i].store(now, Relaxed);
                obs.port[i].store(port, Relaxed);
            }
        }
    }
}

struct Legit {
    ctx: Ctx,
    obs: Arc<Observed>,
    prober: Mutex<(ControlClient, NodePrivate)>,
    next_port: AtomicU64,
    joined: AtomicU64,
}

async fn setup_legit(ctx: Ctx, observers: usize) -> Result<Arc<Legit>> {
    let (pclient, mut pstream, pnode) = join(&ctx, "prober").await?;
    // The prober's stream is read (and thrown away): unread, it would fill the Noise
    // session's HTTP/2 window and stall the prober's own reports on that session.
    tokio::spawn(async move { while let Some(Ok(_)) = pstream.next_json().await {} });
    let obs = Arc::new(Observed {
        base: Instant::now(),
        prober: pnode.public(),
        port: (0..observers).map(|_| AtomicU64::new(0)).collect(),
        at: (0..observers).map(|_| AtomicU64::new(0)).collect(),
        failures: AtomicU64::new(0),
    });
    for i in 0..observers {
        let (client, stream, _) = join(&ctx, &format!("observer-{i}")).await?;
        tokio::spawn(observe(obs.clone(), i, stream, client));
    }
    Ok(Arc::new(Legit {
        ctx,
        obs,
        prober: Mutex::new((pclient, pnode)),
        next_port: AtomicU64::new(10_000),
        joined: AtomicU64::new(1 + observers as u64),
    }))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Debug, Clone, Default)]
struct Figures {
    joins: Vec<Duration>,
    fanout: Vec<Duration>,
    join_failures: usize,
    fanout_missing: usize,
}

impl Figures {
    fn p(&self, which: &str, p: f64) -> Duration {
        let mut v = if which == "join" {
            self.joins.clone()
        } else {
            self.fanout.clone()
        };
        v.sort();
        percentile(&v, p)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn measure(legit: Arc<Legit>, registrations: usize, probes: usize, phase: &str) -> Figures {
    let mut f = Figures::default();
    for i in 0..registrations {
        let t0 = Instant::now();
        let name = format!("{phase}-join-{i}");
        match tokio::time::timeout(legit.ctx.timeout, join(&legit.ctx, &name)).await {
            Ok(Ok(conn)) => {
                f.joins.push(t0.elapsed());
                legit.joined.fetch_add(1, Relaxed);
                drop(conn);
            }
            Ok(Err(e)) => {
                f.join_failures += 1;
                progress(format!("{phase}: a join failed: {e:#}"));
            }
            Err(_) => f.join_failures += 1,
        }
    }
    // The joiners went offline: let that reach everyone before the fan-out probes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let obs = &legit.obs;
    for _ in 0..probes {
        let port = legit.next_port.fetch_add(1, Relaxed);
        let sent = obs.base.elapsed().as_nanos() as u64;
        {
            let mut p = legit.prober.lock().await;
            let (client, node) = &mut *p;
            let mut req = map_request(node, "prober", false);
            req.omit_peers = true;
            req.endpoints = vec![format!("198.51.100.3:{port}")];
            if let Err(e) = client.map(&req).await {
                progress(format!("{phase}: the prober's report failed: {e}"));
                continue;
            }
        }
        let deadline = Instant::now() + legit.ctx.timeout;
        loop {
            let done = obs.port.iter().filter(|p| p.load(Relaxed) >= port).count();
            if done == obs.port.len() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for (p, at) in obs.port.iter().zip(&obs.at) {
            if p.load(Relaxed) >= port {
                let at = at.load(Relaxed);
                f.fanout.push(Duration::from_nanos(at.saturating_sub(sent)));
            } else {
                f.fanout_missing += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f
}

// ---------------------------------------------------------------------------------------
// Attacks

#[derive(Default)]
struct AttackStats {
    requests: AtomicU64,
    refused_429: AtomicU64,
    refused_413: AtomicU64,
    other_status: AtomicU64,
    connections: AtomicU64,
    closed_by_server: AtomicU64,
    errors: AtomicU64,
}

impl AttackStats {
    fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Relaxed);
        format!(
            "requests {}, 429 {}, 413 {}, other status {}, connections {}, closed by the server {}, errors {}",
            g(&self.requests),
            g(&self.refused_429),
            g(&self.refused_413),
            g(&self.other_status),
            g(&self.connections),
            g(&self.closed_by_server),
            g(&self.errors)
        )
    }

    fn count_error(&self, e: &ClientError) {
        match e {
            ClientError::Status { status: 429, .. } => &self.refused_429,
            ClientError::Status { status: 413, .. } => &self.refused_413,
            ClientError::Status { .. } => &self.other_status,
            _ => &self.errors,
        }
        .fetch_add(1, Relaxed);
    }
}

struct Attack {
    stop: Arc<AtomicBool>,
    stats: Arc<AttackStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const ATTACKS: [&str; 4] = [
    "garbage-registrations",
    "slowloris",
    "map-streams",
    "big-hostinfo",
];

/// Starts attack `name` on the attacker's runtime; every loop also ends at `until`.
async fn start_attack(name: &'static str, ctx: Ctx, until: Instant) -> Result<Attack> {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(AttackStats::default());
    let live = {
        let stop = stop.clone();
        move || !stop.load(Relaxed) && Instant::now() < until
    };
    let mut tasks = Vec::new();
    match name {
        "garbage-registrations" => {
            // ~8 KiB of Hostinfo: under the 16 KiB cap, so the server has to look at it.
            let junk = "x".repeat(8 * 1024);
            for k in 0..100 {
                let (ctx, stats, live, junk) =
                    (ctx.clone(), stats.clone(), live.clone(), junk.clone());
                tasks.push(tokio::spawn(async move {
                    let machine = MachinePrivate::generate();
                    while live() {
                        let mut client =
                            match ControlClient::connect(SERVER_URL, &ctx.server_key, &machine)
                                .await
                            {
                                Ok(c) => c,
                                Err(_) => {
                                    stats.errors.fetch_add(1, Relaxed);
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            };
                        stats.connections.fetch_add(1, Relaxed);
                        let mut n = 0u64;
                        while live() {
                            n += 1;
                            let node = NodePrivate::generate();
                            // Every other one with a made-up pre-auth key.
                            let fake = format!("tskey-auth-{:012}-{:032}", k, n);
                            let auth = n.is_multiple_of(2).then_some(fake.as_str());
                            let mut req = register_request(&node, &format!("garbage-{k}"), auth);
                            if let Some(h) = req.hostinfo.as_mut() {
                                h.os_version = junk.clone();
                            }
                            stats.requests.fetch_add(1, Relaxed);
                            match client.register(&req).await {
                                Ok(_) => {}
                                Err(e @ ClientError::Status { .. }) => stats.count_error(&e),
                                Err(e) => {
                                    stats.count_error(&e);
                                    break;
                                }
                            }
                        }
                    }
                }));
            }
        }
        "slowloris" => {
            for _ in 0..500 {
                let (stats, live) = (stats.clone(), live.clone());
                tasks.push(tokio::spawn(async move {
                    while live() {
                        let Ok(mut tcp) = tokio::net::TcpStream::connect(SERVER_ADDR).await else {
                            stats.errors.fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        };
                        stats.connections.fetch_add(1, Relaxed);
                        let head = format!("POST /ts2021 HTTP/1.1\r\nHost: {SERVER_ADDR}\r\n");
                        if tcp.write_all(head.as_bytes()).await.is_ok() {
                            let mut buf = [0u8; 256];
                            while live() {
                                tokio::select! {
                                    r = tcp.read(&mut buf) => {
                                        if matches!(r, Ok(0) | Err(_)) {
                                            stats.closed_by_server.fetch_add(1, Relaxed);
                                            break;
                                        }
                                    }
                                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                                        stats.requests.fetch_add(1, Relaxed);
                                        if tcp.write_all(b"X-Slow: 1\r\n").await.is_err() {
                                            stats.closed_by_server.fetch_add(1, Relaxed);
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }));
            }
        }
        "map-streams" => {
            // A member gone rogue: registered with the tailnet's key, 50 streams over four
            // Noise sessions, each reopened when the server closes it.
            let node = NodePrivate::generate();
            let machine = MachinePrivate::generate();
            let mut clients = Vec::new();
            for _ in 0..4 {
                clients.push(Arc::new(Mutex::new(
                    ControlClient::connect(SERVER_URL, &ctx.server_key, &machine).await?,
                )));
            }
            let r = clients[0]
                .lock()
                .await
                .register(&register_request(&node, "rogue-streams", Some(&ctx.auth)))
                .await?;
            anyhow::ensure!(
                r.machine_authorized,
                "the rogue node was refused: {}",
                r.error
            );
            for s in 0..50 {
                let client = clients[s % clients.len()].clone();
                let (stats, live, node) = (stats.clone(), live.clone(), node.clone());
                tasks.push(tokio::spawn(async move {
                    while live() {
                        stats.requests.fetch_add(1, Relaxed);
                        let opened = {
                            let mut c = client.lock().await;
                            c.map(&map_request(&node, "rogue-streams", true)).await
                        };
                        match opened {
                            Ok(mut stream) => {
                                stats.connections.fetch_add(1, Relaxed);
                                while live() {
                                    match tokio::time::timeout(
                                        Duration::from_millis(500),
                                        stream.next(),
                                    )
                                    .await
                                    {
                                        Ok(Some(Ok(_))) | Err(_) => {}
                                        Ok(_) => {
                                            stats.closed_by_server.fetch_add(1, Relaxed);
                                            break;
                                        }
                                    }
                                }
                            }
                            Err(e) => stats.count_error(&e),
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }));
            }
        }
        "big-hostinfo" => {
            let node = NodePrivate::generate();
            let machine = MachinePrivate::generate();
            let mut client = ControlClient::connect(SERVER_URL, &ctx.server_key, &machine).await?;
            let r = client
                .register(&register_request(&node, "rogue-hostinfo", Some(&ctx.auth)))
                .await?;
            anyhow::ensure!(
                r.machine_authorized,
                "the rogue node was refused: {}",
                r.error
            );
            let client = Arc::new(Mutex::new(client));
            let big = "x".repeat(1 << 20);
            for _ in 0..8 {
                let (client, stats, live, node, big) = (
                    client.clone(),
                    stats.clone(),
                    live.clone(),
                    node.clone(),
                    big.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while live() {
                        let mut req = map_request(&node, "rogue-hostinfo", false);
                        req.omit_peers = true;
                        if let Some(h) = req.hostinfo.as_mut() {
                            h.os_version = big.clone();
                        }
                        stats.requests.fetch_add(1, Relaxed);
                        let r = { client.lock().await.map(&req).await };
                        match r {
                            Ok(_) => {}
                            Err(e) => {
                                stats.count_error(&e);
                                if !matches!(e, ClientError::Status { .. }) {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                    }
                }));
            }
        }
        other => bail!("unknown attack {other}"),
    }
    Ok(Attack { stop, stats, tasks })
}

// ---------------------------------------------------------------------------------------

fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "run as root (the benchmark builds network namespaces)"
    );
    tsunagu_bench::raise_nofile(65_536);
    let mut seed = Lab::seed("bench_abuse", SeedOptions::default()).context("building the lab")?;
    let attacker_ns = seed.add_public_host("attacker", ATTACKER)?;
    let client_ns = seed.ns(role::CLIENT);
    progress("starting tsunagu-server in the lab (198.51.100.4:8080)");
    let (server, auth) = start_server(&mut seed, args)?;
    let legit_rt = ns_runtime(&client_ns, "legit", 1, 0)?;
    // The attacker would be on another machine: here it shares the CPUs, so it runs at
    // the lowest priority (it still sends as fast as the idle CPU lets it), and what is
    // measured is what its traffic costs the server, not what generating it costs.
    let attack_rt = ns_runtime(&attacker_ns, "attacker", 1, 19)?;
    let timeout = Duration::from_secs(args.attack_timeout);
    let server_key = run_in(&legit_rt, async {
        tsunagu_client::fetch_server_key(SERVER_URL).await
    })?
    .context("fetching the server key from the lab")?;
    let ctx = Ctx {
        server_key,
        auth: auth.into(),
        timeout,
    };
    progress(format!("{} observers and a prober join", args.observers));
    let legit = run_in(&legit_rt, setup_legit(ctx.clone(), args.observers))??;
    // Wait until every observer knows the prober (its full map lists it).
    std::thread::sleep(Duration::from_secs(1));

    let mut results: BTreeMap<usize, (String, Figures, String)> = BTreeMap::new();
    let phases: Vec<&'static str> = std::iter::once("none").chain(ATTACKS).collect();
    for (i, phase) in phases.iter().enumerate() {
        let attack = if *phase == "none" {
            None
        } else {
            progress(format!("attack {phase}: starting"));
            let until = Instant::now() + timeout;
            let a = run_in(&attack_rt, start_attack(phase, ctx.clone(), until))??;
            std::thread::sleep(Duration::from_secs(args.warmup));
            Some(a)
        };
        progress(format!("{phase}: measuring"));
        let (cpu0, t0) = (
            cpu_time(&server.pid.to_string()).unwrap_or_default(),
            Instant::now(),
        );
        let figures = run_in(
            &legit_rt,
            measure(legit.clone(), args.registrations, args.probes, phase),
        )?;
        let cpu = cpu_time(&server.pid.to_string())
            .unwrap_or_default()
            .saturating_sub(cpu0)
            .as_secs_f64()
            / t0.elapsed().as_secs_f64().max(1e-3);
        let stats = match attack {
            Some(a) => {
                a.stop.store(true, Relaxed);
                let tasks = a.tasks;
                run_in(&attack_rt, async move {
                    for t in tasks {
                        t.abort();
                        let _ = t.await;
                    }
                })?;
                a.stats.summary()
            }
            None => "no attack".to_string(),
        };
        let line = format!(
            "{phase}: join p50 {:.1} ms p99 {:.1} ms ({} ok, {} failed), fan-out p50 {:.1} ms p99 {:.1} ms ({} missing), server CPU {:.0}%; {stats}",
            ms(figures.p("join", 0.5)),
            ms(figures.p("join", 0.99)),
            figures.joins.len(),
            figures.join_failures,
            ms(figures.p("fanout", 0.5)),
            ms(figures.p("fanout", 0.99)),
            figures.fanout_missing,
            cpu * 100.0,
        );
        progress(&line);
        results.insert(i, (phase.to_string(), figures, line));
        // Let the server settle (closed connections, queued work) before the next phase.
        std::thread::sleep(Duration::from_secs(2));
    }
    let rss_peak = status_kib(&server.pid.to_string(), "VmHWM").unwrap_or(0);
    let observer_failures = legit.obs.failures.load(Relaxed);
    let legit_nodes = legit.joined.load(Relaxed);
    drop(legit);
    drop(legit_rt);
    drop(attack_rt);
    seed.lab.kill(server.id, Signal::SIGTERM)?;
    let (pending, nodes) = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let store = tsunagu_store::Store::open(&server.data).await?;
            let pending = store.pending_registration_count().await?;
            let nodes = store.list_nodes(None).await?.len() as u64;
            store.close().await;
            Ok::<_, tsunagu_store::StoreError>((pending, nodes))
        })?
    };
    let rows_left = pending + nodes.saturating_sub(legit_nodes);

    let (_, base, _) = &results[&0];
    let base_join = base.p("join", 0.99);
    let base_fan = base.p("fanout", 0.99);
    let mut worst = (0.0f64, String::new());
    for (phase, f, line) in results.values() {
        println!("{line}");
        if phase == "none" {
            continue;
        }
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-6);
        let mut slow =
            ratio(f.p("join", 0.99), base_join).max(ratio(f.p("fanout", 0.99), base_fan));
        if f.join_failures > 0 || f.fanout_missing > 0 {
            slow = f64::INFINITY;
        }
        println!("{phase}: p99 slowdown {slow:.1}x");
        if slow > worst.0 || worst.1.is_empty() {
            worst = (slow, phase.clone());
        }
    }
    println!(
        "server: rss peak {:.0} MiB; database after the run: {pending} registrations waiting, {nodes} nodes ({legit_nodes} registered by the benchmark's legitimate nodes); observer streams lost: {observer_failures}",
        rss_peak as f64 / 1024.0
    );
    println!(
        "abuse: worst p99 slowdown {:.1}x (attack {}), rss peak {:.0} MiB, rows left {rows_left}",
        worst.0,
        worst.1,
        rss_peak as f64 / 1024.0
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("abuse: {e:#}");
        std::process::exit(1);
    }
}
