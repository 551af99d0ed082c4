//! dns: DNS through an exit node's DoH (`http://<exit IP>:<peerapi port>/dns-query`, the
//! way official clients send all their DNS while they use an exit node), for tsunagud's
//! exit node and for an official one (Tailscale's `tailscaled` v1.102.5 with
//! `--advertise-exit-node`, approved) side by side in one lab.
//!
//! ```text
//!  [client] tsunagud member, this program's DoH load ─► tunnel ─► cafe NAT ─► inet
//!      ├─► [exit]  tsunagud exit node   198.51.100.2 ─┐  PeerAPI /dns-query
//!      └─► [exit2] tailscaled exit node 198.51.100.6 ─┴─► [web] resolver 203.0.113.53
//! ```
//!
//! The server runs on HTTPS with a lab CA (the official client reaches relays over TLS
//! only). Both exit nodes forward to the same lab resolver; the client reaches both over
//! direct WireGuard paths through the same tsunagud member, so the difference is the exit
//! node's DoH server and its end of the tunnel.
//!
//! Load: `--concurrency` workers (default 8) each send one POST at a time
//! (`application/dns-message`, an A query for `web.lab.test`) and check the answer
//! (HTTP 200, the query's ID, rcode NOERROR, 203.0.113.10); a run lasts `--seconds` or
//! `--max-queries`, whichever ends first. After a warm-up, `--reps` runs alternate
//! between the two exit nodes; the medians are reported: answered queries per second, and
//! the p50/p99 latency of the run.
//!
//! Stdout: the machine's load before and after (the figures move with it: 2 cores shared
//! with other work), a line per exit node, and last
//! `dns: tsunagud Q q/s p99 A ms, tailscaled R q/s p99 B ms`.

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tsunagu_dns::hickory_proto::rr::RecordType;
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CONTROL_PUBLIC, Lab, Netns, RESOLVER, Seed, SeedOptions, ServiceHandle, Tailscaled,
    TailscaledOpts, WEB_ADDR, dns_server,
};

const SERVER_URL: &str = "https://198.51.100.4";
const NAME: &str = "web.lab.test";
const POLICY: &str = r#"{
  "tagOwners": { "tag:exit": ["bench"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [ { "action": "accept", "src": ["autogroup:member"], "dst": ["*:*"] } ],
}"#;
/// One query's bound; an answer later than this counts as an error.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The warm-up before the measured runs, per exit node.
const WARMUP: Duration = Duration::from_secs(1);

/// DoH queries per second and latency through a tsunagud exit node and an official
/// (tailscaled) exit node, in one lab (root).
#[derive(Parser, Debug)]
struct Args {
    /// Where tsunagud, tsunagu-server and tsunagu are (a release build).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Length of one measured run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Measured runs per exit node (alternating).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Queries in flight (one per worker).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Most queries in one run.
    #[arg(long, default_value_t = 200_000)]
    max_queries: u64,
}

fn progress(msg: &str) {
    eprintln!("dns: {msg}");
}

fn wait(what: &str, within: Duration, f: impl FnMut() -> bool) -> anyhow::Result<()> {
    Ok(tsunagu_lab::wait_until(what, within, f)?)
}

fn bin(args: &Args, name: &str) -> Result<String> {
    let p = args.bin_dir.join(name);
    let p = std::fs::canonicalize(&p)
        .with_context(|| format!("{} missing: cargo build --release", p.display()))?;
    Ok(p.to_string_lossy().into_owned())
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().take(3).collect();
            format!("load average {}", f.join(", "))
        })
        .unwrap_or_else(|_| "load average unknown".into())
}

/// The lab: server, both exit nodes, the member, the resolver.
struct Net {
    seed: Seed,
    _resolver: ServiceHandle,
    _official: Tailscaled,
    /// DoH URLs: tsunagud's exit node, the official one.
    urls: [String; 2],
}

fn build(args: &Args) -> Result<Net> {
    let (server, daemon, cli) = (
        bin(args, "tsunagu-server")?,
        bin(args, "tsunagud")?,
        bin(args, "tsunagu")?,
    );
    let mut seed = Lab::seed(
        "bench_dns",
        SeedOptions {
            second_exit: true,
            ..SeedOptions::default()
        },
    )
    .context("building the lab (root?)")?;
    let tls = tsunagu_lab::lab_tls(&seed.lab.log_path("tls"), CONTROL_PUBLIC.into())?;
    let ca_env = format!("SSL_CERT_FILE={}", tls.ca.display());
    let control = seed.ns(role::CONTROL);
    let data = seed.lab.log_path("server-data");
    let data_s = data.to_string_lossy().into_owned();
    let (cert, key) = (
        tls.cert.to_string_lossy().into_owned(),
        tls.key.to_string_lossy().into_owned(),
    );
    let log = seed.lab.log_path("server.log");
    seed.lab.spawn(
        &control,
        &[
            &server,
            "--data-dir",
            &data_s,
            "serve",
            "--listen",
            "198.51.100.4:443",
            "--server-url",
            SERVER_URL,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        Some(&log),
    )?;
    wait("the server", Duration::from_secs(20), || {
        data.join("admin.sock").exists()
    })?;
    let admin = |a: &[&str]| -> Result<String> {
        let mut argv = vec![server.as_str(), "--data-dir", &data_s];
        argv.extend_from_slice(a);
        let out = control.exec(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    admin(&["users", "create", "bench"])?;
    let policy = seed.lab.log_path("policy.hujson");
    std::fs::write(&policy, POLICY)?;
    admin(&["policy", "set", &policy.to_string_lossy()])?;
    let last = |s: String| s.lines().last().unwrap_or_default().to_string();
    let exit_key = last(admin(&[
        "preauthkeys",
        "create",
        "--user",
        "bench",
        "--tags",
        "tag:exit",
    ])?);
    let member_key = last(admin(&[
        "preauthkeys",
        "create",
        "--user",
        "bench",
        "--reusable",
    ])?);

    // tsunagud: the exit node and the member.
    let mut socks = Vec::new();
    for (r, host, key, extra) in [
        (
            role::EXIT,
            "tsunagud-exit",
            &exit_key,
            Some("--advertise-exit-node"),
        ),
        (role::CLIENT, "client", &member_key, None),
    ] {
        let state = seed.lab.log_path(&format!("{host}-state"));
        let sock = state.join("tsunagud.sock").to_string_lossy().into_owned();
        let state_s = state.to_string_lossy().into_owned();
        let mut argv = vec![
            "env",
            &ca_env,
            &daemon,
            "--login-server",
            SERVER_URL,
            "--auth-key",
            key,
            "--hostname",
            host,
            "--state-dir",
            &state_s,
            "--socket",
            &sock,
        ];
        argv.extend(extra);
        let l = seed.lab.log_path(&format!("{host}.log"));
        seed.lab.spawn(&seed.ns(r), &argv, Some(&l))?;
        socks.push(sock);
    }

    // The official exit node: forwarding on (as Tailscale's docs tell the admin), up,
    // approved by the admin.
    let exit2 = seed.ns(role::EXIT2);
    exit2.sysctl("net.ipv4.ip_forward", "1")?;
    exit2.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let official = Tailscaled::start(
        &mut seed.lab,
        &exit2,
        "official-exit",
        TailscaledOpts {
            env: vec![ca_env.clone()],
            ..TailscaledOpts::default()
        },
    )?;
    official
        .cli(&[
            "up",
            &format!("--login-server={SERVER_URL}"),
            &format!("--auth-key={member_key}"),
            "--hostname=official-exit",
            "--advertise-exit-node",
            "--timeout=60s",
        ])
        .map_err(|e| anyhow!("tailscale up: {e}\n{}", official.log_tail(40)))?;
    official.wait_running(Duration::from_secs(30))?;
    wait(
        "the official offer at the server",
        Duration::from_secs(20),
        || admin(&["nodes", "list"]).is_ok_and(|t| t.contains("awaiting approval")),
    )?;
    let out = admin(&["nodes", "approve-exit", "official-exit"])?;
    if !out.contains("approved") {
        bail!("approve-exit: {out}");
    }

    let resolver = dns_server(
        &seed.ns(role::WEB),
        SocketAddr::new(RESOLVER.into(), 53),
        &[(NAME, IpAddr::V4(WEB_ADDR))],
    )?;

    // The DoH URLs: tsunagud logs its PeerAPI; tailscaled reports its own.
    let exit_log = seed.lab.log_path("tsunagud-exit.log");
    let mut tsunagud_url = String::new();
    wait("tsunagud's PeerAPI", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&exit_log).unwrap_or_default();
        tsunagud_url = text
            .lines()
            .filter(|l| l.contains("peerapi: serving"))
            .filter_map(|l| l.find("http://100.").map(|i| &l[i..]))
            .filter_map(|u| u.split(|c: char| c.is_whitespace() || c == '\x1b').next())
            .map(|u| format!("{u}/dns-query"))
            .next()
            .unwrap_or_default();
        !tsunagud_url.is_empty()
    })?;
    let st = official.status_json()?;
    let official_url = st["Self"]["PeerAPIURL"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str())
        .find(|u| u.starts_with("http://100."))
        .map(|u| format!("{u}/dns-query"))
        .ok_or_else(|| anyhow!("tailscaled reports no IPv4 PeerAPI URL: {}", st["Self"]))?;

    // Both answer the member over direct paths before anything is measured.
    let client = seed.ns(role::CLIENT);
    for url in [&tsunagud_url, &official_url] {
        let u = url.clone();
        wait(&format!("DoH at {url}"), Duration::from_secs(60), || {
            run_load(&client, &u, 1, Duration::from_millis(300), 3).is_ok_and(|r| r.ok > 0)
        })?;
    }
    for peer in ["tsunagud-exit", "official-exit"] {
        let mut path = String::new();
        let ok = wait(
            &format!("a direct path to {peer}"),
            Duration::from_secs(30),
            || {
                path = peer_path(&client, &cli, &socks[1], peer);
                path.starts_with("direct")
            },
        );
        progress(&format!("path to {peer}: {path}"));
        ok?;
    }
    Ok(Net {
        seed,
        _resolver: resolver,
        _official: official,
        urls: [tsunagud_url, official_url],
    })
}

/// `tsunagu status --json`'s path to `peer` from the member.
fn peer_path(ns: &Netns, cli: &str, sock: &str, peer: &str) -> String {
    let Ok(out) = ns.exec_status(&[cli, "--socket", sock, "status", "--json"]) else {
        return String::new();
    };
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            v["peers"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == peer)
                .and_then(|p| p["path"].as_str().map(String::from))
        })
        .unwrap_or_default()
}

/// One run's outcome.
#[derive(Debug, Clone, Default)]
struct Run {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    /// Latencies of the answered queries, sorted.
    lat: Vec<Duration>,
}

impl Run {
    fn qps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn pct(&self, p: f64) -> Duration {
        if self.lat.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.lat.len() as f64 - 1.0) * p).round() as usize;
        self.lat[i.min(self.lat.len() - 1)]
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

/// One DoH query: its latency, or why it failed.
async fn one(client: &Client, url: &str, id: u16) -> Result<Duration> {
    let q = tsunagu_dns::message::build_query(id, NAME, RecordType::A)
        .ok_or_else(|| anyhow!("building the query"))?;
    let req = hyper::Request::post(url)
        .header("content-type", tsunagu_dns::doh::CONTENT_TYPE)
        .header("accept", tsunagu_dns::doh::CONTENT_TYPE)
        .body(http_body_util::Full::new(Bytes::from(q)))?;
    let start = Instant::now();
    let work = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 65535)
            .collect()
            .await
            .map_err(|e| anyhow!("body: {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(QUERY_TIMEOUT, work)
        .await
        .map_err(|_| anyhow!("no answer within {QUERY_TIMEOUT:?}"))??;
    let took = start.elapsed();
    if status != hyper::StatusCode::OK {
        bail!("HTTP {status}");
    }
    if body.len() < 2 || body[..2] != id.to_be_bytes() {
        bail!("an answer to another query");
    }
    let (rc, addrs) =
        tsunagu_dns::message::answer_addrs(&body).ok_or_else(|| anyhow!("not DNS"))?;
    if rc != tsunagu_dns::hickory_proto::op::ResponseCode::NoError
        || addrs != [IpAddr::V4(WEB_ADDR)]
    {
        bail!("answer {rc} {addrs:?}");
    }
    Ok(took)
}

/// `workers` loops of one query at a time against `url`, from inside `ns`, for `dur`
/// or `max` queries in all.
fn run_load(ns: &Netns, url: &str, workers: usize, dur: Duration, max: u64) -> Result<Run> {
    let url = url.to_string();
    ns.run(move || -> Result<Run> {
        // A runtime on this thread: the sockets it opens are in the namespace.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.set_nodelay(true);
            http.set_connect_timeout(Some(QUERY_TIMEOUT));
            let client: Client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_max_idle_per_host(workers)
                    .build(http);
            let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let start = Instant::now();
            let deadline = start + dur;
            let mut tasks = Vec::new();
            for w in 0..workers {
                let (client, url, sent) = (client.clone(), url.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut r = Run::default();
                    let mut id = (w as u16).wrapping_mul(7919) | 1;
                    while Instant::now() < deadline
                        && sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < max
                    {
                        id = id.wrapping_add(1).max(1);
                        match one(&client, &url, id).await {
                            Ok(t) => {
                                r.ok += 1;
                                r.lat.push(t);
                            }
                            Err(e) => {
                                if r.errors == 0 {
                                    progress(&format!("{url}: {e:#}"));
                                }
                                r.errors += 1;
                            }
                        }
                    }
                    r
                }));
            }
            let mut all = Run::default();
            for t in tasks {
                let r = t.await?;
                all.ok += r.ok;
                all.errors += r.errors;
                all.lat.extend(r.lat);
            }
            all.elapsed = start.elapsed();
            all.lat.sort();
            Ok(all)
        })
    })?
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The medians of a target's runs: (q/s, p50 ms, p99 ms, errors).
fn summary(runs: &[Run]) -> (f64, f64, f64, u64) {
    (
        median(runs.iter().map(Run::qps).collect()),
        median(runs.iter().map(|r| ms(r.pct(0.50))).collect()),
        median(runs.iter().map(|r| ms(r.pct(0.99))).collect()),
        runs.iter().map(|r| r.errors).sum(),
    )
}

fn main() {
    let args = Args::parse();
    if args.reps == 0 || args.seconds == 0 || args.concurrency == 0 || args.max_queries == 0 {
        eprintln!("dns: --reps, --seconds, --concurrency and --max-queries must be at least 1");
        std::process::exit(2);
    }
    if let Err(e) = tsunagu_lab::OfficialBins::locate() {
        eprintln!("dns: {e}");
        std::process::exit(2);
    }
    let result = (|| -> Result<()> {
        let load_before = uptime();
        progress("building the lab");
        let net = build(&args)?;
        let client = net.seed.ns(role::CLIENT);
        let names = ["tsunagud", "tailscaled"];
        for (i, url) in net.urls.iter().enumerate() {
            progress(&format!("{}: {url}; warm-up", names[i]));
            run_load(&client, url, args.concurrency, WARMUP, args.max_queries)?;
        }
        let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..args.reps {
            for (i, url) in net.urls.iter().enumerate() {
                let r = run_load(
                    &client,
                    url,
                    args.concurrency,
                    Duration::from_secs(args.seconds),
                    args.max_queries,
                )?;
                progress(&format!(
                    "rep {} {}: {:.0} q/s, p50 {:.2} ms, p99 {:.2} ms, {} errors ({} answered in {:.1} s)",
                    rep + 1,
                    names[i],
                    r.qps(),
                    ms(r.pct(0.50)),
                    ms(r.pct(0.99)),
                    r.errors,
                    r.ok,
                    r.elapsed.as_secs_f64()
                ));
                runs[i].push(r);
            }
        }
        let load_after = uptime();
        println!(
            "dns: machine {load_before} before, {load_after} after (2 cores shared with other work)"
        );
        println!(
            "dns: {} workers, {} runs of {} s (at most {} queries) per exit node, medians",
            args.concurrency, args.reps, args.seconds, args.max_queries
        );
        let s: Vec<(f64, f64, f64, u64)> = runs.iter().map(|r| summary(r)).collect();
        for (i, label) in [
            "tsunagud exit node",
            "tailscaled v1.102.5 exit node (official)",
        ]
        .iter()
        .enumerate()
        {
            println!(
                "dns: {label} ({}): {:.0} q/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                net.urls[i], s[i].0, s[i].1, s[i].2, s[i].3
            );
        }
        println!(
            "dns: tsunagud {:.0} q/s p99 {:.2} ms, tailscaled {:.0} q/s p99 {:.2} ms",
            s[0].0, s[0].2, s[1].0, s[1].2
        );
        if s.iter().any(|x| x.3 > 0) {
            bail!("some queries failed (see above)");
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("dns: {e:#}");
        std::process::exit(1);
    }
}
