//! paths: the two ways packets travel between tsunagud nodes, measured in the seed lab,
//! and what the relay costs, each beside a peer that does the same job.
//!
//! ```text
//!  direct: [client] iperf3 -c ─► tunnel (UDP through the cafe NAT) ─► [exit] iperf3 -s
//!  peer:   the same with wireguard-go on both ends, configured by hand (`tsunagu_bench::wg`)
//!  relay:  the same, with the cafe dropping UDP: tunnel over DERP (TLS) via 198.51.100.7,
//!          once through our relay (`tsunagu-server relay`), once through Tailscale's derper
//!  idle:   N DERP clients (this program) logged in to each relay on loopback
//! ```
//!
//! Every lab has `tsunagu-server` on 198.51.100.4 over HTTPS with a lab CA (the shape of a
//! deployment; tsunagud trusts the CA through `SSL_CERT_FILE`). For each path: iperf3 TCP
//! throughput (median of `--reps` runs of `--seconds`), ping RTT between the two nodes'
//! tailnet addresses, and for the relay the packets it forwarded per second during the
//! runs (the client's relay counters).
//!
//! The relay runs are alike but for the relay program: the server runs no relay of its own
//! (`--no-relay`) and announces one region, `--derp-region id=901,...,host=198.51.100.7`
//! (DERP over TLS on port 443, STUN on 3478), so both tsunagud nodes home there. On
//! 198.51.100.7 runs either our standalone relay (`tsunagu-server relay --tls-cert ...`,
//! the same relay code the server embeds) or `derper` v1.102.5 (`--certmode=manual` with a
//! certificate from the lab CA for its IP address, STUN on, no HTTP port, nothing that
//! reaches outside the lab: no mesh, no bootstrap DNS, no client verification).
//!
//! Then each relay's resident memory per idle client: the relay alone on loopback over
//! plain TCP (derper serves plain HTTP on a port other than 443 without `--certmode`), 10
//! warm-up clients, then `--idle-clients` more logged in and holding their connection;
//! (RSS after - RSS before) / clients.
//!
//! The peer for the direct path is wireguard-go (Debian's, with `wg` from wireguard-tools),
//! in a fresh seed lab of its own: the client behind the cafe NAT, the exit host on
//! 198.51.100.2, one wireguard-go interface on each end with its own keys, 100.64.0.1 and
//! 100.64.0.2, a listen port, and on the client the exit's endpoint with a persistent
//! keepalive through the NAT; the MTU is the one tsunagud's interface had. The same iperf3
//! and ping run between the two tunnel addresses, and the exit must see the client at the
//! cafe's public address (the path crossed the NAT).
//!
//! Stdout: a `direct:` line (tsunagud beside wireguard-go), a `relay:` line (our relay
//! beside derper), the host's load, and last
//! `paths: direct A Gbit/s, relay B Gbit/s (derper C Gbit/s), relay-rss-per-client D KiB
//! (derper E KiB)`. If a peer fails, its failure is printed on its line, its figure is
//! `n/a` and the exit status is 1.

use anyhow::{Context as _, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tsunagu_bench::server::LabServer;
use tsunagu_bench::tls::LabCa;
use tsunagu_bench::wg::{self, Daemon, PairConfig, WgPair};
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, Lab, Netns, OfficialBins, ProcId, RELAY2_PUBLIC, Seed, SeedOptions,
};

const IPERF_PORT: &str = "5201";
/// wireguard-go's UDP port on both ends (tsunagud's default port; the labs are separate).
const WG_PORT: u16 = 41641;
/// The client's persistent keepalive to the exit, to hold the cafe NAT's mapping.
const WG_KEEPALIVE: u16 = 25;
/// The MTU for wireguard-go if tsunagud's could not be read (tsunagud's default).
const FALLBACK_MTU: u16 = 1280;
/// The relay host's role in the lab (on 198.51.100.7).
const RELAY_ROLE: &str = "relay";
/// The region both relays are announced as.
const RELAY_REGION: &str = "id=901,code=lab,name=lab relay,host=198.51.100.7";

struct Args {
    bin_dir: PathBuf,
    wireguard_go: PathBuf,
    derper: PathBuf,
    seconds: u32,
    reps: usize,
    idle_clients: usize,
}

fn progress(msg: &str) {
    eprintln!("paths: {msg}");
}

fn parse_args() -> Result<Args> {
    let mut derper = None;
    let mut a = Args {
        bin_dir: PathBuf::from("target/release"),
        wireguard_go: PathBuf::from("wireguard-go"),
        derper: PathBuf::new(),
        seconds: 10,
        reps: 3,
        idle_clients: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--bin-dir" => a.bin_dir = PathBuf::from(val()?),
            "--wireguard-go" => a.wireguard_go = PathBuf::from(val()?),
            "--derper" => derper = Some(PathBuf::from(val()?)),
            "--seconds" => a.seconds = val()?.parse().context("--seconds")?,
            "--reps" => a.reps = val()?.parse().context("--reps")?,
            "--idle-clients" => a.idle_clients = val()?.parse().context("--idle-clients")?,
            "-h" | "--help" => {
                println!(
                    "usage: paths [--bin-dir DIR (target/release)] [--seconds N (10)] \
                     [--reps N (3)] [--idle-clients N (1000)] \
                     [--wireguard-go PATH (from PATH)] \
                     [--derper PATH ($TSUNAGU_TAILSCALE_DIR or /var/cache/tsunagu/tailscale-v1.102.5)]   (root)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if a.reps == 0 || a.seconds == 0 || a.idle_clients == 0 {
        bail!("--reps, --seconds and --idle-clients must be at least 1");
    }
    // The peers' tools, before any lab is built.
    a.wireguard_go = tsunagu_lab::which(&a.wireguard_go.to_string_lossy()).ok_or_else(|| {
        anyhow!(
            "{} not found: apt-get install -y wireguard-go",
            a.wireguard_go.display()
        )
    })?;
    if tsunagu_lab::which("wg").is_none() {
        bail!("wg not found: apt-get install -y wireguard-tools");
    }
    a.derper = match derper {
        Some(p) => p,
        None => OfficialBins::locate().context("derper")?.derper,
    };
    if !a.derper.is_file() {
        bail!(
            "{}: no derper there (scripts/setup-host builds it)",
            a.derper.display()
        );
    }
    Ok(a)
}

fn bin(args: &Args, name: &str) -> Result<String> {
    let p = args.bin_dir.join(name);
    if !p.exists() {
        bail!("{} missing: cargo build --release", p.display());
    }
    Ok(std::fs::canonicalize(p)?.to_string_lossy().into_owned())
}

fn wait(what: &str, within: Duration, f: impl FnMut() -> bool) -> anyhow::Result<()> {
    Ok(tsunagu_lab::wait_until(what, within, f)?)
}

/// Which relay carries the relay path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Relay {
    /// `tsunagu-server relay` on 198.51.100.7.
    Ours,
    /// Tailscale's `derper` on 198.51.100.7.
    Derper,
}

impl Relay {
    fn label(self) -> &'static str {
        match self {
            Relay::Ours => "relay",
            Relay::Derper => "relay/derper",
        }
    }
}

/// A tailnet of two in the seed lab: the server, "exit" (public) and "client" (cafe).
struct Net {
    seed: Seed,
    cli: String,
    client_sock: String,
    exit_ip: String,
    /// The relay process on 198.51.100.7, when the path is relayed.
    relay: Option<ProcId>,
    relay_log: Option<PathBuf>,
}

fn status(ns: &Netns, cli: &str, sock: &str) -> Option<serde_json::Value> {
    let out = ns
        .exec_status(&[cli, "--socket", sock, "status", "--json"])
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Starts `relay` on 198.51.100.7:443 (TLS, a lab-CA certificate for the address) with
/// STUN on 3478, and waits until it accepts connections.
fn start_relay(
    args: &Args,
    seed: &mut Seed,
    ca: &LabCa,
    relay: Relay,
) -> Result<(ProcId, PathBuf)> {
    let ns = seed
        .add_public_host(RELAY_ROLE, RELAY2_PUBLIC)
        .context("adding the relay host")?;
    let dir = seed.lab.log_path("relay");
    std::fs::create_dir_all(&dir)?;
    let host = RELAY2_PUBLIC.to_string();
    let listen = format!("{host}:443");
    let log = seed.lab.log_path("relay.log");
    let id = match relay {
        Relay::Ours => {
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            ca.issue(&host, &cert, &key)?;
            let server = bin(args, "tsunagu-server")?;
            seed.lab.spawn(
                &ns,
                &[
                    &server,
                    "--data-dir",
                    &dir.join("data").to_string_lossy(),
                    "relay",
                    "--listen",
                    &listen,
                    "--stun-listen",
                    &format!("{host}:3478"),
                    "--tls-cert",
                    &cert.to_string_lossy(),
                    "--tls-key",
                    &key.to_string_lossy(),
                ],
                Some(&log),
            )?
        }
        Relay::Derper => {
            // --certmode=manual reads <certdir>/<hostname>.crt and .key.
            ca.issue(
                &host,
                &dir.join(format!("{host}.crt")),
                &dir.join(format!("{host}.key")),
            )?;
            let derper = args.derper.to_string_lossy();
            seed.lab.spawn(
                &ns,
                &[
                    "env",
                    "TS_NO_LOGS_NO_SUPPORT=true",
                    &derper,
                    "-a",
                    &listen,
                    "--http-port=-1",
                    "--stun-port=3478",
                    "--certmode=manual",
                    &format!("--certdir={}", dir.display()),
                    &format!("--hostname={host}"),
                    "-c",
                    &dir.join("derper.json").to_string_lossy(),
                    "--home=blank",
                ],
                Some(&log),
            )?
        }
    };
    let probe = ns.clone();
    wait(
        &format!("{} listening on {listen}", relay.label()),
        Duration::from_secs(20),
        || tsunagu_lab::tcp_connect_ok(&probe, (RELAY2_PUBLIC, 443).into(), Duration::from_secs(1)),
    )
    .with_context(|| wg::tail(&log, 20))?;
    Ok((id, log))
}

fn build_net(args: &Args, name: &str, relay: Option<Relay>) -> Result<Net> {
    let (server, daemon, cli) = (
        bin(args, "tsunagu-server")?,
        bin(args, "tsunagud")?,
        bin(args, "tsunagu")?,
    );
    let opts = SeedOptions {
        cafe_blocks_udp: relay.is_some(),
        ..SeedOptions::default()
    };
    let mut seed = Lab::seed(name, opts).context("building the lab (root?)")?;
    let ca = LabCa::new(&seed.lab.log_path("tls"))?;
    let (relay_proc, relay_log, extra) = match relay {
        Some(r) => {
            let (id, log) = start_relay(args, &mut seed, &ca, r)?;
            (
                Some(id),
                Some(log),
                vec!["--no-relay", "--derp-region", RELAY_REGION],
            )
        }
        None => (None, None, Vec::new()),
    };
    let srv = LabServer::start(&mut seed, Path::new(&server), Some(&ca), &extra)?;
    let key = srv.preauth_key(&["--reusable"])?;
    let mut socks = Vec::new();
    for (r, host) in [(role::EXIT, "exit"), (role::CLIENT, "client")] {
        let state = seed.lab.log_path(&format!("{host}-state"));
        let sock = state.join("tsunagud.sock").to_string_lossy().into_owned();
        let l = seed.lab.log_path(&format!("{host}.log"));
        let mut argv: Vec<&str> = vec!["env"];
        argv.extend(srv.env.iter().map(String::as_str));
        let state_s = state.to_string_lossy();
        argv.extend([
            daemon.as_str(),
            "--login-server",
            &srv.url,
            "--auth-key",
            &key,
            "--hostname",
            host,
            "--state-dir",
            &state_s,
            "--socket",
            &sock,
        ]);
        seed.lab.spawn(&seed.ns(r), &argv, Some(&l))?;
        socks.push(sock);
    }
    let client_ns = seed.ns(role::CLIENT);
    let client_sock = socks[1].clone();
    let mut exit_ip = String::new();
    wait(
        "the client sees the exit host",
        Duration::from_secs(30),
        || {
            if let Some(v) = status(&client_ns, &cli, &client_sock)
                && let Some(p) = v["peers"]
                    .as_array()
                    .and_then(|a| a.iter().find(|p| p["name"] == "exit"))
            {
                exit_ip = p["ip"].as_str().unwrap_or_default().to_string();
            }
            !exit_ip.is_empty()
        },
    )
    .with_context(|| {
        format!(
            "client log:\n{}\nserver log:\n{}",
            wg::tail(&seed.lab.log_path("client.log"), 20),
            wg::tail(&srv.log, 20)
        )
    })?;
    Ok(Net {
        seed,
        cli,
        client_sock,
        exit_ip,
        relay: relay_proc,
        relay_log,
    })
}

/// The path the client uses to the exit host (`direct …` or `relay …`), after pinging.
fn path(net: &Net) -> String {
    let ns = net.seed.ns(role::CLIENT);
    let _ = ns.exec_status(&[
        "ping",
        "-n",
        "-q",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        &net.exit_ip,
    ]);
    status(&ns, &net.cli, &net.client_sock)
        .and_then(|v| {
            v["peers"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["name"] == "exit"))
                .and_then(|p| p["path"].as_str().map(String::from))
        })
        .unwrap_or_default()
}

fn rtt_ms(ns: &Netns, target: &str) -> Result<f64> {
    let out = ns.exec_status(&[
        "ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "2", target,
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("ping {target}: no replies\n{text}"))
}

fn iperf(ns: &Netns, target: &str, seconds: u32) -> Result<f64> {
    let secs = seconds.to_string();
    let out = ns.exec_status_timeout(
        &[
            "iperf3",
            "-c",
            target,
            "-p",
            IPERF_PORT,
            "-t",
            &secs,
            "-J",
            "--connect-timeout",
            "5000",
        ],
        Duration::from_secs(u64::from(seconds) + 30),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow!("iperf3 gave no throughput"))
}

fn relay_packets(net: &Net) -> u64 {
    let ns = net.seed.ns(role::CLIENT);
    status(&ns, &net.cli, &net.client_sock)
        .map(|v| {
            v["counters"]["relay_tx"].as_u64().unwrap_or(0)
                + v["counters"]["relay_rx"].as_u64().unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Starts `iperf3 -s` bound to `bind` in `ns` and waits until it listens.
fn iperf_server(lab: &mut Lab, ns: &Netns, bind: &str) -> Result<ProcId> {
    let log = lab.log_path("iperf3.log");
    let srv = lab.spawn(
        ns,
        &["iperf3", "-s", "-B", bind, "-p", IPERF_PORT, "--forceflush"],
        Some(&log),
    )?;
    wait("iperf3 server", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Server listening"))
    })?;
    Ok(srv)
}

/// `--reps` iperf3 runs of `--seconds` from `ns` to `target`: the median Gbit/s.
fn iperf_median(args: &Args, ns: &Netns, target: &str, label: &str) -> Result<f64> {
    let mut runs = Vec::new();
    for i in 0..args.reps {
        let g = iperf(ns, target, args.seconds)?;
        progress(&format!("{label}: run {}: {g:.2} Gbit/s", i + 1));
        runs.push(g);
        std::thread::sleep(Duration::from_millis(300));
    }
    runs.sort_by(|a, b| a.total_cmp(b));
    Ok(runs[runs.len() / 2])
}

/// The MTU of `dev` in `ns`.
fn link_mtu(ns: &Netns, dev: &str) -> Option<u16> {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?.get("mtu")?.as_u64()?.try_into().ok()
}

struct PathFigures {
    gbps: f64,
    rtt_ms: f64,
    relay_pps: f64,
    path: String,
    /// The client's tsunagud interface MTU.
    mtu: Option<u16>,
}

/// The direct path (`relay` None) or the relay path through `relay`.
fn measure_path(args: &Args, relay: Option<Relay>) -> Result<PathFigures> {
    let label = relay.map_or("direct", Relay::label);
    progress(&format!("=== {label}: building the lab"));
    let lab_name = match relay {
        None => "bench_paths_direct",
        Some(Relay::Ours) => "bench_paths_relay",
        Some(Relay::Derper) => "bench_paths_derper",
    };
    let mut net = build_net(args, lab_name, relay)?;
    let want = if relay.is_some() { "relay" } else { "direct" };
    let mut p = String::new();
    wait(&format!("the {want} path"), Duration::from_secs(30), || {
        p = path(&net);
        p.starts_with(want)
    })
    .with_context(|| {
        format!(
            "path now {p:?}; client log:\n{}\nrelay log:\n{}",
            wg::tail(&net.seed.lab.log_path("client.log"), 20),
            net.relay_log
                .as_deref()
                .map(|l| wg::tail(l, 20))
                .unwrap_or_default()
        )
    })?;
    progress(&format!("{label}: client -> exit host via {p}"));
    let exit_ns = net.seed.ns(role::EXIT);
    let srv = iperf_server(&mut net.seed.lab, &exit_ns, &net.exit_ip)?;
    let client_ns = net.seed.ns(role::CLIENT);
    let mtu = link_mtu(&client_ns, tsunagu_lab::tailnet::TUN);
    let rtt = rtt_ms(&client_ns, &net.exit_ip)?;
    let before = relay_packets(&net);
    let t0 = Instant::now();
    let gbps = iperf_median(args, &client_ns, &net.exit_ip, label)?;
    let pps = (relay_packets(&net) - before) as f64 / t0.elapsed().as_secs_f64();
    let after = path(&net);
    net.seed.lab.kill(srv, tsunagu_lab::Signal::SIGTERM)?;
    if let Some(r) = net.relay
        && let Some(status) = net.seed.lab.try_wait(r)?
    {
        bail!("{label}: the relay exited ({status}) during the runs");
    }
    progress(&format!(
        "{label}: median {gbps:.2} Gbit/s, rtt {rtt:.3} ms, relay {pps:.0} packets/s, path after: {after}"
    ));
    Ok(PathFigures {
        gbps,
        rtt_ms: rtt,
        relay_pps: pps,
        path: p,
        mtu,
    })
}

struct PeerFigures {
    gbps: f64,
    rtt_ms: f64,
    /// "wireguard-go v0.0.20220316".
    desc: String,
    mtu: u16,
    /// The client's endpoint as the exit saw it (the cafe's public address and a port).
    client_seen_as: String,
}

/// wireguard-go on the direct path: a fresh seed lab, a hand-made tunnel client -> exit
/// host through the cafe NAT, the same ping and iperf3 runs between the tunnel addresses.
fn measure_peer_direct(args: &Args, mtu: u16) -> Result<PeerFigures> {
    let daemon = Daemon::WireguardGo {
        prog: args.wireguard_go.clone(),
    };
    let label = "direct/wireguard-go";
    progress(&format!("=== {label}: building the lab"));
    let mut seed = Lab::seed("bench_paths_wggo", SeedOptions::default())
        .context("building the lab (root?)")?;
    let pair = WgPair::start(
        &mut seed,
        &daemon,
        &PairConfig {
            mtu,
            port: WG_PORT,
            client_allowed_ips: format!("{}/32", wg::EXIT_ADDR),
            keepalive: Some(WG_KEEPALIVE),
        },
    )?;
    let result = (|| -> Result<PeerFigures> {
        let client_ns = seed.ns(role::CLIENT);
        let exit_ns = seed.ns(role::EXIT);
        let target = wg::EXIT_ADDR.to_string();
        // The handshake: the client's keepalive and pings go out through the cafe NAT.
        wait(
            "a ping through the wireguard-go tunnel",
            Duration::from_secs(15),
            || {
                client_ns
                    .exec_status(&["ping", "-n", "-q", "-c", "1", "-W", "1", &target])
                    .is_ok_and(|o| o.status.success())
            },
        )
        .with_context(|| pair.diagnostics())?;
        let seen = pair.client_endpoint_seen_by_exit().unwrap_or_default();
        if !seen.starts_with(&format!("{CAFE_PUBLIC}:")) {
            bail!(
                "the exit sees the client at {seen:?}, not behind the cafe NAT ({CAFE_PUBLIC})\n{}",
                pair.diagnostics()
            );
        }
        progress(&format!(
            "{label}: the exit sees the client at {seen} (through the cafe NAT)"
        ));
        let srv = iperf_server(&mut seed.lab, &exit_ns, &target)?;
        let rtt = rtt_ms(&client_ns, &target)?;
        let gbps =
            iperf_median(args, &client_ns, &target, label).with_context(|| pair.diagnostics())?;
        seed.lab.kill(srv, tsunagu_lab::Signal::SIGTERM)?;
        progress(&format!(
            "{label}: median {gbps:.2} Gbit/s, rtt {rtt:.3} ms"
        ));
        Ok(PeerFigures {
            gbps,
            rtt_ms: rtt,
            desc: daemon.describe(),
            mtu,
            client_seen_as: seen,
        })
    })();
    pair.stop(&mut seed.lab);
    result
}

fn rss_kib(pid: u32) -> Result<u64> {
    tsunagu_bench::procfs::status_kib(&pid.to_string(), "VmRSS")
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// One idle DERP client: connect, upgrade, log in, then hold the connection.
async fn idle_client(addr: std::net::SocketAddr) -> Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(tsunagu_derp::client::upgrade_request(&addr.to_string()).as_bytes())
        .await?;
    let mut conn = tsunagu_derp::ClientConn::new(
        tsunagu_proto::NodePrivate::generate(),
        tsunagu_derp::ClientInfo::default(),
    );
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut upgraded = false;
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            bail!("the relay closed the connection");
        }
        if upgraded {
            conn.handle_input(&buf[..n])?;
        } else {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) =
                tsunagu_derp::client::parse_upgrade_response(&head).map_err(anyhow::Error::msg)?
            {
                upgraded = true;
                conn.handle_input(&head[end..])?;
            }
        }
        while let Some(out) = conn.poll_transmit() {
            tcp.write_all(&out).await?;
        }
        if conn.is_connected() {
            return Ok(tcp);
        }
    }
}

/// The memory per idle client of `relay`, run alone on loopback over plain TCP.
fn measure_idle(args: &Args, relay: Relay) -> Result<f64> {
    progress(&format!(
        "=== idle/{}: {} DERP clients on loopback",
        relay.label(),
        args.idle_clients
    ));
    tsunagu_bench::raise_nofile(args.idle_clients as u64 * 2 + 1024);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let dir = tempfile::tempdir()?;
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = match relay {
        Relay::Ours => {
            // Every client comes from 127.0.0.1: lift the per-address connection budget.
            let config = dir.path().join("relay.toml");
            std::fs::write(
                &config,
                format!(
                    "[limits]\nmax_connections_per_ip = {}\n",
                    args.idle_clients + 100
                ),
            )?;
            let mut c = std::process::Command::new(bin(args, "tsunagu-server")?);
            c.args(["--data-dir"])
                .arg(dir.path())
                .arg("--config")
                .arg(&config)
                .args(["relay", "--listen", &listen, "--no-stun"]);
            c
        }
        Relay::Derper => {
            // Not port 443 and no --certmode=manual: derper serves plain HTTP.
            let mut c = std::process::Command::new(&args.derper);
            c.env("TS_NO_LOGS_NO_SUPPORT", "true")
                .args([
                    "-a",
                    &listen,
                    "--http-port=-1",
                    "--stun=false",
                    "--home=blank",
                    "-c",
                ])
                .arg(dir.path().join("derper.json"));
            c
        }
    };
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", relay.label()))?;
    let addr: std::net::SocketAddr = listen.parse()?;
    let result = (|| -> Result<f64> {
        wait("the relay", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).is_ok()
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        // Warm up with a few clients so the baseline includes the relay's fixed costs.
        let warm: Vec<_> = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..10 {
                v.push(idle_client(addr).await?);
            }
            Ok::<_, anyhow::Error>(v)
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let before = rss_kib(child.id())?;
        let t0 = Instant::now();
        let conns = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            let mut held = Vec::new();
            for i in 0..args.idle_clients {
                set.spawn(idle_client(addr));
                if i % 100 == 99 {
                    while let Some(r) = set.join_next().await {
                        held.push(r??);
                    }
                }
            }
            while let Some(r) = set.join_next().await {
                held.push(r??);
            }
            Ok::<_, anyhow::Error>(held)
        })?;
        std::thread::sleep(Duration::from_secs(1));
        let after = rss_kib(child.id())?;
        let per = (after.saturating_sub(before)) as f64 / conns.len() as f64;
        progress(&format!(
            "idle/{}: {} clients logged in within {:.1} s; relay RSS {before} KiB -> {after} KiB: {per:.1} KiB per client",
            relay.label(),
            conns.len(),
            t0.elapsed().as_secs_f64()
        ));
        drop(conns);
        drop(warm);
        Ok(per)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("paths: {e:#}");
            std::process::exit(2);
        }
    };
    let run = || -> Result<bool> {
        let load_before = tsunagu_bench::loadavg();
        let direct = measure_path(&args, None)?;
        let peer = measure_peer_direct(&args, direct.mtu.unwrap_or(FALLBACK_MTU));
        if let Err(e) = &peer {
            progress(&format!("direct/wireguard-go FAILED: {e:#}"));
        }
        let relay = measure_path(&args, Some(Relay::Ours))?;
        let derper = measure_path(&args, Some(Relay::Derper));
        if let Err(e) = &derper {
            progress(&format!("relay/derper FAILED: {e:#}"));
        }
        let per_client = measure_idle(&args, Relay::Ours)?;
        let derper_per_client = measure_idle(&args, Relay::Derper);
        if let Err(e) = &derper_per_client {
            progress(&format!("idle/derper FAILED: {e:#}"));
        }
        let first_line = |e: &anyhow::Error| {
            let text = format!("{e:#}");
            text.lines().next().unwrap_or_default().to_owned()
        };
        let mtu = direct
            .mtu
            .map_or_else(|| "mtu ?".to_owned(), |m| format!("mtu {m}"));
        let peer_text = match &peer {
            Ok(p) => format!(
                "wireguard-go {:.2} Gbit/s rtt {:.3} ms ({}, mtu {}, client seen at {}); \
                 tsunagud/wireguard-go {}",
                p.gbps,
                p.rtt_ms,
                p.desc,
                p.mtu,
                p.client_seen_as,
                if p.gbps > 0.0 {
                    format!("{:.2}", direct.gbps / p.gbps)
                } else {
                    "n/a".to_owned()
                }
            ),
            Err(e) => format!("wireguard-go FAILED: {} (details on stderr)", first_line(e)),
        };
        let derper_text = match &derper {
            Ok(d) => format!(
                "derper {} {:.2} Gbit/s rtt {:.3} ms ({}), {:.0} packets/s through the relay; \
                 tsunagu/derper {}",
                wg::version(&args.derper),
                d.gbps,
                d.rtt_ms,
                d.path,
                d.relay_pps,
                if d.gbps > 0.0 {
                    format!("{:.2}", relay.gbps / d.gbps)
                } else {
                    "n/a".to_owned()
                }
            ),
            Err(e) => format!("derper FAILED: {} (details on stderr)", first_line(e)),
        };
        println!(
            "direct: tsunagud {:.2} Gbit/s rtt {:.3} ms ({}, {mtu}); {peer_text}",
            direct.gbps, direct.rtt_ms, direct.path
        );
        println!(
            "relay:  tsunagu-server relay {:.2} Gbit/s rtt {:.3} ms ({}), {:.0} packets/s through the relay; {derper_text} \
             (both over TLS on 198.51.100.7:443, the cafe dropping UDP)",
            relay.gbps, relay.rtt_ms, relay.path, relay.relay_pps
        );
        println!(
            "host: {} cores, load average {load_before} before, {} after",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            tsunagu_bench::loadavg()
        );
        let fig = |r: &Result<f64>, digits: usize| {
            r.as_ref()
                .map_or_else(|_| "n/a".to_owned(), |v| format!("{v:.digits$}"))
        };
        println!(
            "paths: direct {:.2} Gbit/s, relay {:.2} Gbit/s (derper {} Gbit/s), relay-rss-per-client {:.0} KiB (derper {} KiB)",
            direct.gbps,
            relay.gbps,
            fig(
                &derper.as_ref().map(|d| d.gbps).map_err(|e| anyhow!("{e}")),
                2
            ),
            per_client,
            fig(&derper_per_client, 0)
        );
        Ok(peer.is_ok() && derper.is_ok() && derper_per_client.is_ok())
    };
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("paths: {e:#}");
            std::process::exit(1);
        }
    }
}
