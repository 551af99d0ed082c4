//! Crash durability of the real binary (loopback only): a burst of concurrent
//! registrations, SIGKILL in the middle of it, restart on the same data directory.
//! Every node the server answered as registered before the kill must still be
//! there with the address it was given, no two nodes may share an address, and
//! nodes registered after the restart must get addresses not in use.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tsunagu_client::ControlClient;
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, RegisterResponseAuth,
};
use tsunagu_proto::{MachinePrivate, MachinePublic, NodePrivate};

const BIN: &str = env!("CARGO_BIN_EXE_tsunagu-server");
/// Registrations in the burst, and how many run at once.
const TOTAL: usize = 300;
const IN_FLIGHT: usize = 32;
/// The server is killed once this many registrations were answered.
const KILL_AFTER: usize = 120;
/// Registrations after the restart.
const AFTER: usize = 20;
const OP: Duration = Duration::from_secs(15);

/// Our own server process; killed (by PID, SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

fn start(dir: &Path, port: u16) -> Proc {
    start_with(dir, port, &[])
}

fn start_with(dir: &Path, port: u16, global_args: &[&str]) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(global_args)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--stun-listen", "127.0.0.1:0"])
        .env("TSUNAGU_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// Waits until the server answers on its port and on its admin socket (after a
/// SIGKILL a stale socket file is left behind, so its existence proves nothing).
async fn ready(dir: &Path, url: &str) -> MachinePublic {
    let deadline = Instant::now() + Duration::from_secs(30);
    let key = loop {
        match tsunagu_client::fetch_server_key(url).await {
            Ok(k) => break k,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "server not up: {e}\n{}",
                    log(dir)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    while !cli(dir, &["users", "list"]).status.success() {
        assert!(Instant::now() < deadline, "admin API not up\n{}", log(dir));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    key
}

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nodes list --json`: name → [ipv4, ipv6].
fn list_nodes(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(dir, &["--json", "nodes", "list"])).unwrap();
    let mut out = BTreeMap::new();
    for n in v.as_array().unwrap() {
        let addrs: Vec<String> = n["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        assert_eq!(addrs.len(), 2, "{n}");
        let name = n["name"].as_str().unwrap().to_string();
        assert!(
            out.insert(name.clone(), addrs).is_none(),
            "duplicate name {name}"
        );
    }
    out
}

/// No address is held by two nodes.
fn assert_unique_addresses(nodes: &BTreeMap<String, Vec<String>>) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, addrs) in nodes {
        for a in addrs {
            if let Some(other) = seen.insert(a, name) {
                panic!("{a} is held by both {other} and {name}");
            }
        }
    }
}

struct Sim {
    host: String,
    machine: MachinePrivate,
    node: NodePrivate,
}

impl Sim {
    fn new(host: String) -> Sim {
        Sim {
            host,
            machine: MachinePrivate::generate(),
            node: NodePrivate::generate(),
        }
    }

    fn hostinfo(&self) -> Hostinfo {
        Hostinfo {
            hostname: self.host.clone(),
            os: "linux".into(),
            ..Hostinfo::default()
        }
    }

    async fn connect(&self, url: &str, server: &MachinePublic) -> Result<ControlClient, String> {
        tokio::time::timeout(OP, ControlClient::connect(url, server, &self.machine))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())
    }

    async fn register(&self, c: &mut ControlClient, key: &str) -> Result<bool, String> {
        let req = RegisterRequest {
            version: CURRENT_CAPABILITY_VERSION,
            node_key: self.node.public(),
            hostinfo: Some(self.hostinfo()),
            auth: Some(RegisterResponseAuth {
                auth_key: key.into(),
                ..RegisterResponseAuth::default()
            }),
            ..RegisterRequest::default()
        };
        let r = tokio::time::timeout(OP, c.register(&req))
            .await
            .map_err(|_| "register timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if !r.error.is_empty() {
            return Err(r.error);
        }
        Ok(r.machine_authorized)
    }

    /// A non-streaming map request: the node's own name and addresses.
    async fn whoami(&self, c: &mut ControlClient) -> Result<(String, Vec<String>), String> {
        let req = MapRequest {
            version: CURRENT_CAPABILITY_VERSION,
            compress: "zstd".into(),
            node_key: self.node.public(),
            stream: false,
            hostinfo: Some(self.hostinfo()),
            ..MapRequest::default()
        };
        let m = tokio::time::timeout(OP, async {
            let mut s = c.map(&req).await.map_err(|e| e.to_string())?;
            match s.next().await {
                Some(Ok(m)) => Ok(m),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("empty map response".to_string()),
            }
        })
        .await
        .map_err(|_| "map timed out".to_string())??;
        let me = m.node.ok_or("no self node")?;
        let addrs = me.addresses.iter().map(|a| a.addr().to_string()).collect();
        Ok((me.name, addrs))
    }
}

/// What the burst learned before the kill.
#[derive(Default)]
struct Answers {
    /// Hosts answered `machine_authorized`.
    registered: BTreeSet<usize>,
    /// Hosts whose map request answered: their addresses.
    addresses: BTreeMap<usize, Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_answered_before_a_sigkill_survive_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = start(&dir, port);
    let server_key = ready(&dir, &url).await;

    ok(&dir, &["users", "create", "burst"]);
    let out = ok(
        &dir,
        &[
            "preauthkeys",
            "create",
            "--user",
            "burst",
            "--reusable",
            "--expiration",
            "1h",
        ],
    );
    let key = out.lines().last().unwrap().to_string();

    // The burst: TOTAL registrations, IN_FLIGHT at a time; each registered node
    // asks for its map right away to learn its address.
    let sims: Arc<Vec<Sim>> = Arc::new((0..TOTAL).map(|i| Sim::new(format!("n{i}"))).collect());
    let answers = Arc::new(std::sync::Mutex::new(Answers::default()));
    let authorized = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..TOTAL {
        let (sims, answers, authorized, permits) = (
            sims.clone(),
            answers.clone(),
            authorized.clone(),
            permits.clone(),
        );
        let (url, key) = (url.clone(), key.clone());
        tasks.spawn(async move {
            let _p = permits.acquire_owned().await.unwrap();
            let sim = &sims[i];
            let mut c = sim.connect(&url, &server_key).await?;
            if !sim.register(&mut c, &key).await? {
                return Err(format!("n{i}: not authorized"));
            }
            answers.lock().unwrap().registered.insert(i);
            authorized.fetch_add(1, Ordering::SeqCst);
            let (name, addrs) = sim.whoami(&mut c).await?;
            assert_eq!(name, format!("n{i}.tailnet.internal."));
            answers.lock().unwrap().addresses.insert(i, addrs);
            Ok::<(), String>(())
        });
    }
    // SIGKILL (Child::kill) by PID in the middle of the burst.
    let deadline = Instant::now() + Duration::from_secs(120);
    while authorized.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(Instant::now() < deadline, "burst too slow\n{}", log(&dir));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let killed_after = started.elapsed();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        if r.unwrap().is_err() {
            errors += 1;
        }
    }
    let (registered, addresses) = {
        let a = answers.lock().unwrap();
        (a.registered.clone(), a.addresses.clone())
    };
    println!(
        "burst: killed after {killed_after:?}; {} answered registered ({} with their address), {errors} cut off",
        registered.len(),
        addresses.len()
    );
    assert!(registered.len() >= KILL_AFTER);
    assert!(
        registered.len() < TOTAL,
        "the kill must interrupt the burst"
    );
    assert!(errors > 0);
    assert!(
        addresses.len() >= KILL_AFTER / 2,
        "most registered nodes learned their address"
    );

    // Restart on the same data directory.
    let _server = start(&dir, port);
    let key_after = ready(&dir, &url).await;
    assert_eq!(key_after, server_key, "the server's Noise key survives");
    let nodes = list_nodes(&dir);
    println!("after the restart: {} nodes in the database", nodes.len());
    assert_unique_addresses(&nodes);
    assert!(
        nodes.len() >= registered.len(),
        "{} < {}",
        nodes.len(),
        registered.len()
    );
    for name in nodes.keys() {
        let i: usize = name
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .unwrap_or(TOTAL);
        assert!(i < TOTAL, "unexpected node {name}");
    }

    // Every node answered as registered is there, under its node key, with the
    // address it was given: it asks the restarted server itself.
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for &i in &registered {
        let (sims, permits, url) = (sims.clone(), permits.clone(), url.clone());
        tasks.spawn(async move {
            let _p = permits.acquire_owned().await.unwrap();
            let sim = &sims[i];
            let mut c = sim.connect(&url, &server_key).await.unwrap();
            let got = sim
                .whoami(&mut c)
                .await
                .unwrap_or_else(|e| panic!("n{i} answered as registered, now: {e}"));
            (i, got)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (i, (name, addrs)) = r.unwrap();
        assert_eq!(name, format!("n{i}.tailnet.internal."));
        if let Some(before) = addresses.get(&i) {
            assert_eq!(&addrs, before, "n{i} keeps the address it was given");
        }
        assert_eq!(
            nodes.get(&format!("n{i}")),
            Some(&addrs),
            "n{i} in nodes list"
        );
    }

    // New registrations get addresses that no node holds.
    let in_use: BTreeSet<String> = nodes.values().flatten().cloned().collect();
    let mut fresh = BTreeSet::new();
    for j in 0..AFTER {
        let sim = Sim::new(format!("after{j}"));
        let mut c = sim.connect(&url, &server_key).await.unwrap();
        assert!(sim.register(&mut c, &key).await.unwrap());
        let (_, addrs) = sim.whoami(&mut c).await.unwrap();
        for a in addrs {
            assert!(!in_use.contains(&a), "after{j} got {a}, which is in use");
            assert!(fresh.insert(a.clone()), "after{j} got {a} twice");
        }
    }
    let all = list_nodes(&dir);
    assert_eq!(all.len(), nodes.len() + AFTER);
    assert_unique_addresses(&all);
}

/// `nodes list --json`: the entry of node `name`, if any.
fn node_entry(dir: &Path, name: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(dir, &["--json", "nodes", "list"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
}

/// A server restart must not count the downtime against ephemeral nodes: a node
/// that was online until the crash gets the full timeout to reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_remove_ephemeral_nodes_that_were_online() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!("ephemeral_timeout_secs = {}\n", TIMEOUT.as_secs()),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = start_with(&dir, port, &["--config", &config]);
    let server_key = ready(&dir, &url).await;
    ok(&dir, &["users", "create", "ci"]);
    let out = ok(
        &dir,
        &[
            "preauthkeys",
            "create",
            "--user",
            "ci",
            "--reusable",
            "--ephemeral",
        ],
    );
    let key = out.lines().last().unwrap().to_string();

    let sim = Sim::new("runner".into());
    let mut c = sim.connect(&url, &server_key).await.unwrap();
    assert!(sim.register(&mut c, &key).await.unwrap());
    let mut req = MapRequest {
        version: CURRENT_CAPABILITY_VERSION,
        compress: "zstd".into(),
        node_key: sim.node.public(),
        stream: true,
        hostinfo: Some(sim.hostinfo()),
        ..MapRequest::default()
    };
    let stream = c.map(&req).await.unwrap();
    // Online for longer than the timeout, then the server dies.
    tokio::time::sleep(TIMEOUT + Duration::from_secs(1)).await;
    let n = node_entry(&dir, "runner").expect("online ephemeral node kept");
    assert_eq!(
        (n["ephemeral"].as_bool(), n["online"].as_bool()),
        (Some(true), Some(true))
    );
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(stream);

    let _server = start_with(&dir, port, &["--config", &config]);
    ready(&dir, &url).await;
    let back = Instant::now();
    let mut c = sim.connect(&url, &server_key).await.unwrap();
    let (name, _) = sim
        .whoami(&mut c)
        .await
        .unwrap_or_else(|e| panic!("the ephemeral node was removed at the restart: {e}"));
    assert_eq!(name, "runner.tailnet.internal.");
    req.stream = true;
    let stream = c.map(&req).await.unwrap();
    println!("reconnected {:?} after the restart", back.elapsed());
    tokio::time::sleep(TIMEOUT + Duration::from_secs(1)).await;
    assert!(node_entry(&dir, "runner").is_some(), "online again: kept");

    // Gone for good: removed after the timeout.
    drop(stream);
    let gone = Instant::now();
    while node_entry(&dir, "runner").is_some() {
        assert!(gone.elapsed() < TIMEOUT * 4, "not removed after going away");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("removed {:?} after going away", gone.elapsed());
    assert!(gone.elapsed() >= TIMEOUT - Duration::from_millis(100));
}
