//! exit-throughput: TCP throughput through an exit node, tsunagud beside wireguard-go,
//! boringtun-cli and the official Tailscale client, in the seed scenario of
//! `shared/guide/lab.md`.
//!
//! ```text
//!  [client] iperf3 -c ─► tunnel ─► cafe NAT ─► inet ─► [exit] decrypt + masquerade ─► inet
//!                                                            ─► [web] iperf3 -s 203.0.113.10
//! ```
//!
//! Each path gets a fresh seed lab (nothing else runs meanwhile): first the no-tunnel
//! baseline (cafe NAT only), then tsunagud, wireguard-go, boringtun-cli and `tailscaled`,
//! all with the same tunnel MTU on both ends (`--mtu`, default 1280: what tsunagud and
//! `tailscaled` create their TUN with). For each: an idle RTT through the path
//! (`ping -c 20 -i 0.05`), then `--reps` iperf3 TCP runs of `--seconds` each (median
//! reported), the CPU time of the tunnel processes on both ends during the runs
//! (`/proc/PID/stat`), and, on stderr, what limits the data path: busiest threads, UDP
//! receive-buffer overflows, TUN drops and TCP retransmissions.
//!
//! The official client runs as members run it: two `tailscaled` v1.102.5 (real TUN,
//! their own netfilter rules) registered with pre-auth keys at `tsunagu-server` in the
//! control namespace over HTTPS (a lab CA through `SSL_CERT_FILE`); the exit node's key is
//! tagged `tag:exit`, which the policy auto-approves as exit node, and the client selects
//! it with `tailscale set --exit-node=`. Its path must be direct (`CurAddr`
//! 198.51.100.2:41641 in `tailscale status --json`, not the relay) before the runs; it is
//! checked again after them and both are printed. Its TUN gets the MTU with `ip link` when
//! `--mtu` is not its default (an OS setting `tailscaled` honours; no debug switch).
//!
//! Run as root through `bench/exit-throughput`, which builds tsunagud and the server in
//! release first. Progress goes to stderr; stdout gets one line per path and, last, the
//! summary line `exit-throughput: tsunagud X.XX Gbit/s, wireguard-go Y.YY Gbit/s, boringtun
//! Z.ZZ Gbit/s, tailscaled T.TT Gbit/s, ratio vs wireguard-go R.RR, ratio vs tailscaled
//! Q.QQ`.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tsunagu_bench::server::LabServer;
use tsunagu_bench::tls::LabCa;
use tsunagu_bench::wg::{self, Daemon, PairConfig, WgPair, tail, version};
use tsunagu_lab::seed::role;
use tsunagu_lab::tailnet::{NodeOpts, Tailnet};
use tsunagu_lab::{
    CAFE_PUBLIC, EXIT_PUBLIC, Lab, Netns, OfficialBins, ProcId, Seed, SeedOptions, Signal,
    Tailscaled, TailscaledOpts, WEB_ADDR, http_get, try_ping, whoami_server,
};

/// Tunnel MTU on both ends unless `--mtu` says otherwise: the MTU tsunagud and
/// `tailscaled` create their TUN with (Tailscale's "safe" MTU), so that the official
/// client runs as members run it.
const DEFAULT_MTU: u16 = 1280;
/// The official client's TUN, in both namespaces.
const TS_TUN: &str = "tailscale0";
/// The official exit node's host name.
const TS_EXIT_NAME: &str = "ts-exit";
/// How long the official client may take to log in, see the exit node and go direct.
const TS_TIMEOUT: Duration = Duration::from_secs(45);
/// The WireGuard port on both ends.
const WG_PORT: u16 = 41641;
const IPERF_PORT: &str = "5201";
/// The cafe router: the client's gateway, used for the /32 route to the exit's endpoint.
const CAFE_GW: &str = "198.18.1.1";
/// The lab's test name (namespace prefix); every path gets its own lab of this name.
const LAB_NAME: &str = "bench_exit_tput";
/// How long a daemon may take to come up, and the tunnel to pass its first ping.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long setup commands (ping, http, `ip -s link`) may take.
const SHORT: Duration = Duration::from_secs(20);

fn progress(msg: &str) {
    eprintln!("[exit-throughput] {msg}");
}

// ---------------------------------------------------------------------------------------
// Command line

struct Args {
    tsunagud: PathBuf,
    /// tsunagu-server, the official clients' coordination server.
    server: Option<PathBuf>,
    wireguard_go: PathBuf,
    boringtun: PathBuf,
    boringtun_threads: Option<u32>,
    /// The official binaries (found in preflight when `tailscaled` is measured).
    official: Option<OfficialBins>,
    seconds: u32,
    reps: u32,
    mtu: u16,
    /// The paths to measure, in this order.
    kinds: Vec<Kind>,
}

const USAGE: &str =
    "usage: exit-throughput --tsunagud PATH --server PATH [--seconds N (10)] [--reps N (3)]
                       [--mtu N (1280)] [--only baseline,tsunagud,wireguard-go,boringtun,tailscaled]
                       [--wireguard-go PATH] [--boringtun PATH] [--boringtun-threads N]
Runs as root. Builds the seed lab once per path and measures iperf3 TCP client -> exit node
-> internet for: no tunnel, tsunagud, wireguard-go, boringtun-cli and the official client
(tailscaled v1.102.5 through a tailscaled exit node, both registered at tsunagu-server over
HTTPS; binaries from $TSUNAGU_TAILSCALE_DIR or /var/cache/tsunagu/tailscale-v1.102.5), all
with the same tunnel MTU.";

fn parse_args() -> Result<Args> {
    let mut tsunagud = None;
    let mut server = None;
    let mut wireguard_go = PathBuf::from("wireguard-go");
    let mut boringtun = PathBuf::from("boringtun-cli");
    let mut boringtun_threads = None;
    let mut seconds = 10;
    let mut reps = 3;
    let mut mtu = DEFAULT_MTU;
    let mut kinds = Kind::ALL.to_vec();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"))
        };
        let number = |name: &str, v: String, max: u32| -> Result<u32> {
            match v.parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => bail!("{name}: {v:?} is not a number in 1..={max}"),
            }
        };
        match arg.as_str() {
            "--tsunagud" => tsunagud = Some(PathBuf::from(value("--tsunagud")?)),
            "--server" => server = Some(PathBuf::from(value("--server")?)),
            "--mtu" => {
                let v = value("--mtu")?;
                mtu = match v.parse::<u16>() {
                    Ok(n) if (1280..=1420).contains(&n) => n,
                    _ => bail!("--mtu: {v:?} is not in 1280..=1420 (the lab's links are 1500)"),
                };
            }
            "--only" => {
                kinds = value("--only")?
                    .split(',')
                    .map(|k| {
                        Kind::ALL
                            .into_iter()
                            .find(|x| x.name() == k.trim())
                            .ok_or_else(|| anyhow!("--only: unknown path {k:?}\n{USAGE}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "--wireguard-go" => wireguard_go = PathBuf::from(value("--wireguard-go")?),
            "--boringtun" => boringtun = PathBuf::from(value("--boringtun")?),
            "--boringtun-threads" => {
                let v = value("--boringtun-threads")?;
                boringtun_threads = Some(number("--boringtun-threads", v, 64)?);
            }
            "--seconds" => seconds = number("--seconds", value("--seconds")?, 300)?,
            "--reps" => reps = number("--reps", value("--reps")?, 20)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let tsunagud = tsunagud.ok_or_else(|| anyhow!("--tsunagud PATH is required\n{USAGE}"))?;
    Ok(Args {
        tsunagud,
        server,
        wireguard_go,
        boringtun,
        boringtun_threads,
        official: None,
        seconds,
        reps,
        mtu,
        kinds,
    })
}

/// Resolves a program name or path to an executable file, or explains what is missing.
fn find_program(prog: &Path, hint: &str) -> Result<PathBuf> {
    tsunagu_lab::which(&prog.to_string_lossy())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| anyhow!("{} not found or not executable: {hint}", prog.display()))
}

/// Fails early, before any lab is built, when a tool is missing.
fn preflight(args: &mut Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (it creates network namespaces); use bench/exit-throughput");
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
        ("wg", "wireguard-tools"),
    ] {
        if tsunagu_lab::which(tool).is_none() {
            bail!("{tool} is missing: apt-get install -y {package}");
        }
    }
    args.tsunagud = find_program(
        &args.tsunagud,
        "build it with `cargo build --release -p tsunagud`",
    )?;
    if args.kinds.contains(&Kind::WireguardGo) {
        args.wireguard_go = find_program(&args.wireguard_go, "apt-get install -y wireguard-go")?;
    }
    if args.kinds.contains(&Kind::Boringtun) {
        args.boringtun = find_program(
            &args.boringtun,
            "cargo install boringtun-cli --version 0.7.1 --locked",
        )?;
    }
    if args.kinds.contains(&Kind::Tailscaled) {
        let server = args
            .server
            .as_ref()
            .ok_or_else(|| anyhow!("--server PATH (tsunagu-server) is required for tailscaled"))?;
        args.server = Some(find_program(
            server,
            "build it with `cargo build --release -p tsunagu-server`",
        )?);
        args.official = Some(OfficialBins::locate().context("the official client")?);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// /proc readings

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (comm, utime + stime in ticks) from a `/proc/.../stat` file.
fn read_stat(path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // After ")": state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU ticks of a process and of each of its threads (by TID).
#[derive(Clone, Default)]
struct ProcCpu {
    total: u64,
    threads: HashMap<u32, (String, u64)>,
}

fn proc_cpu(pid: u32) -> Result<ProcCpu> {
    let (_, total) = read_stat(Path::new(&format!("/proc/{pid}/stat")))
        .ok_or_else(|| anyhow!("pid {pid} is gone (cannot read /proc/{pid}/stat)"))?;
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(stat) = read_stat(&entry.path().join("stat")) {
                threads.insert(tid, stat);
            }
        }
    }
    Ok(ProcCpu { total, threads })
}

/// Busy and total jiffies of the whole machine (`/proc/stat` "cpu" line).
fn host_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest* are inside user/nice)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Counters from `/proc/net/snmp` (`Udp.RcvbufErrors`, ...) and `/proc/net/snmp6` inside
/// `ns`.
fn snmp(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let out = ns
        .exec_timeout(&["cat", "/proc/net/snmp", "/proc/net/snmp6"], SHORT)
        .with_context(|| format!("reading /proc/net/snmp in {}", ns.name))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut map = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        // snmp: a "Proto: names..." line followed by a "Proto: values..." line.
        if let Some((proto, names)) = line.split_once(':')
            && let Some(next) = lines.get(i + 1)
            && let Some((proto2, values)) = next.split_once(':')
            && proto == proto2
        {
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if let Ok(v) = v.parse::<i64>() {
                    map.insert(format!("{proto}.{n}"), v.max(0) as u64);
                }
            }
            i += 2;
            continue;
        }
        // snmp6: "Name value".
        let mut parts = line.split_whitespace();
        if let (Some(n), Some(v), None) = (parts.next(), parts.next(), parts.next())
            && let Ok(v) = v.parse::<u64>()
        {
            map.insert(n.to_owned(), v);
        }
        i += 1;
    }
    Ok(map)
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, key: &str) -> u64 {
    after
        .get(key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(before.get(key).copied().unwrap_or(0))
}

/// (rx_dropped, tx_dropped, rx_packets, tx_packets) of an interface.
fn link_stats(ns: &Netns, dev: &str) -> Option<[u64; 4]> {
    let out = ns
        .exec_timeout(&["ip", "-s", "-j", "link", "show", "dev", dev], SHORT)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let s = v.get(0)?.get("stats64")?;
    let g = |dir: &str, k: &str| s.get(dir)?.get(k)?.as_u64();
    Some([
        g("rx", "dropped")?,
        g("tx", "dropped")?,
        g("rx", "packets")?,
        g("tx", "packets")?,
    ])
}

// ---------------------------------------------------------------------------------------
// The paths under test

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Baseline,
    Tsunagud,
    WireguardGo,
    Boringtun,
    Tailscaled,
}

impl Kind {
    /// Every path, in the order they are measured.
    const ALL: [Kind; 5] = [
        Kind::Baseline,
        Kind::Tsunagud,
        Kind::WireguardGo,
        Kind::Boringtun,
        Kind::Tailscaled,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Baseline => "no tunnel",
            Kind::Tsunagud => "tsunagud",
            Kind::WireguardGo => "wireguard-go",
            Kind::Boringtun => "boringtun",
            Kind::Tailscaled => "tailscaled",
        }
    }

    /// Its name for `--only`.
    fn name(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            other => other.label(),
        }
    }

    /// The address the web server must see.
    fn seen_as(self) -> IpAddr {
        match self {
            Kind::Baseline => IpAddr::V4(CAFE_PUBLIC),
            _ => IpAddr::V4(EXIT_PUBLIC),
        }
    }
}

/// One end of a running tunnel.
struct End {
    /// "client" or "exit".
    name: &'static str,
    ns: Netns,
    id: ProcId,
    pid: u32,
    /// Its TUN interface.
    dev: String,
    log: PathBuf,
}

/// A running tunnel (none for the baseline).
struct Tunnel {
    ends: Vec<End>,
    /// The hand-made tunnel of wireguard-go or boringtun (none for tsunagud).
    wg: Option<WgPair>,
    /// The official client's two daemons (only for `tailscaled`).
    official: Option<Official>,
    /// Description for the report ("wireguard-go v0.0.20220316", ...).
    desc: String,
}

/// The official client through an official exit node, and the server they joined.
struct Official {
    client: Tailscaled,
    exit: Tailscaled,
    /// The exit node's tailnet IPv4 address.
    exit_ip: String,
    server: LabServer,
}

impl Official {
    /// How the client reaches the exit node, from `tailscale status --json`: `direct
    /// IP:PORT` (`CurAddr`) or `relay REGION` (`Relay`).
    fn path(&self) -> Result<String> {
        let status = self.client.status_json()?;
        let peer = status["Peer"]
            .as_object()
            .and_then(|peers| {
                peers.values().find(|p| {
                    p["TailscaleIPs"]
                        .as_array()
                        .is_some_and(|ips| ips.iter().any(|ip| ip == self.exit_ip.as_str()))
                })
            })
            .ok_or_else(|| anyhow!("the client's status lists no peer {}", self.exit_ip))?;
        let cur = peer["CurAddr"].as_str().unwrap_or_default();
        Ok(if cur.is_empty() {
            format!("relay {}", peer["Relay"].as_str().unwrap_or("?"))
        } else {
            format!("direct {cur}")
        })
    }

    /// Logs of both daemons and the server, for error messages.
    fn diagnostics(&self) -> String {
        format!(
            "--- tailscaled on the client ({}):\n{}\n--- tailscaled on the exit ({}):\n{}\n--- tsunagu-server ({}):\n{}\n",
            self.client.log.display(),
            self.client.log_tail(30),
            self.exit.log.display(),
            self.exit.log_tail(30),
            self.server.log.display(),
            tail(&self.server.log, 20)
        )
    }
}

fn start_tsunagud(seed: &mut Seed, tsunagud: &Path, mtu: u16) -> Result<Tunnel> {
    let mut net = Tailnet::new(tsunagud);
    net.add("client", role::CLIENT, None, false);
    net.add("exit", role::EXIT, Some(IpAddr::V4(EXIT_PUBLIC)), true);
    progress("starting tsunagud on the exit node");
    let exit = net
        .start(
            &mut seed.lab,
            "exit",
            &NodeOpts {
                mtu: Some(mtu),
                ..NodeOpts::default()
            },
        )
        .context("starting tsunagud on the exit node")?;
    progress("starting tsunagud on the client (exit node: exit)");
    let client = net
        .start(
            &mut seed.lab,
            "client",
            &NodeOpts {
                exit_node: Some("exit".into()),
                mtu: Some(mtu),
                ..NodeOpts::default()
            },
        )
        .context("starting tsunagud on the client")?;
    let end = |name: &'static str, id: ProcId, ns: Netns| End {
        name,
        ns,
        id,
        pid: seed.lab.pid(id),
        dev: tsunagu_lab::tailnet::TUN.into(),
        log: seed.lab.log_path(&format!("{name}.log")),
    };
    Ok(Tunnel {
        ends: vec![
            end("client", client, seed.ns(role::CLIENT)),
            end("exit", exit, seed.ns(role::EXIT)),
        ],
        wg: None,
        official: None,
        desc: version(tsunagud),
    })
}

/// `tailscale up` against the lab's server, bounded, with what the daemon logged on failure.
fn ts_up(ts: &Tailscaled, url: &str, key: &str, hostname: &str, extra: &[&str]) -> Result<()> {
    let login = format!("--login-server={url}");
    let auth = format!("--auth-key={key}");
    let host = format!("--hostname={hostname}");
    // No DNS settings from the server: they would rewrite the namespace's resolv.conf
    // and have nothing to do with the data path measured here.
    let mut args = vec![
        "up",
        &login,
        &auth,
        &host,
        "--accept-dns=false",
        "--timeout=60s",
    ];
    args.extend_from_slice(extra);
    ts.cli(&args)
        .with_context(|| format!("tailscale up ({hostname})\n{}", ts.log_tail(40)))?;
    ts.wait_running(TS_TIMEOUT)
        .with_context(|| format!("{hostname} Running"))?;
    Ok(())
}

/// Polls `f` every 200 ms until it yields a value, for at most `within`.
fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The official client through an official exit node: tsunagu-server over HTTPS in the
/// control namespace, `tailscaled --advertise-exit-node` on the exit host (a tagged key,
/// approved by the policy), `tailscaled` on the cafe client with `--exit-node=`, a direct
/// path between them.
fn start_official(seed: &mut Seed, args: &Args) -> Result<Tunnel> {
    let bins = args
        .official
        .clone()
        .ok_or_else(|| anyhow!("the official binaries were not located"))?;
    let server_bin = args
        .server
        .clone()
        .ok_or_else(|| anyhow!("--server PATH is required for tailscaled"))?;
    let ca = LabCa::new(&seed.lab.log_path("tls"))?;
    progress("starting tsunagu-server (HTTPS, lab CA) in the control namespace");
    let server = LabServer::start(seed, &server_bin, Some(&ca), &[])?;
    let exit_key = server.preauth_key(&["--tags", "tag:exit"])?;
    let client_key = server.preauth_key(&[])?;

    // An exit node forwards: tailscaled adds its own masquerade, the kernel must route.
    let exit_ns = seed.ns(role::EXIT);
    exit_ns.sysctl("net.ipv4.ip_forward", "1")?;
    exit_ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let opts = TailscaledOpts {
        tun: TS_TUN.into(),
        port: WG_PORT,
        env: server.env.clone(),
        args: Vec::new(),
    };
    progress("starting tailscaled on the exit node (--advertise-exit-node, tag:exit)");
    let exit = Tailscaled::start(&mut seed.lab, &exit_ns, "ts-exit", opts.clone())
        .context("starting tailscaled on the exit node")?;
    ts_up(
        &exit,
        &server.url,
        &exit_key,
        TS_EXIT_NAME,
        &["--advertise-exit-node"],
    )?;
    poll(
        "the server approving the official exit node",
        TS_TIMEOUT,
        || {
            server.nodes().ok()?.as_array()?.iter().find_map(|n| {
                (n["name"] == TS_EXIT_NAME && n["online"] == true && n["exit_node"] == "approved")
                    .then_some(())
            })
        },
    )
    .with_context(|| {
        format!(
            "nodes list: {}\n{}",
            server.nodes().map(|v| v.to_string()).unwrap_or_default(),
            exit.log_tail(30)
        )
    })?;

    let client_ns = seed.ns(role::CLIENT);
    progress("starting tailscaled on the client");
    let client = Tailscaled::start(&mut seed.lab, &client_ns, "ts-client", opts)
        .context("starting tailscaled on the client")?;
    ts_up(&client, &server.url, &client_key, "ts-client", &[])?;
    let exit_ip = poll(
        "the client offering ts-exit as exit node",
        TS_TIMEOUT,
        || {
            let list = client.cli(&["exit-node", "list"]).ok()?;
            list.lines()
                .find(|l| l.contains(TS_EXIT_NAME))
                .and_then(|l| l.split_whitespace().next())
                .filter(|ip| ip.starts_with("100."))
                .map(str::to_owned)
        },
    )
    .with_context(|| client.log_tail(30))?;
    progress(&format!("tailscale set --exit-node={exit_ip}"));
    client
        .cli(&["set", &format!("--exit-node={exit_ip}")])
        .context("tailscale set --exit-node")?;

    let end = |name: &'static str, ts: &Tailscaled, lab: &Lab| End {
        name,
        ns: ts.ns.clone(),
        id: ts.proc,
        pid: lab.pid(ts.proc),
        dev: TS_TUN.into(),
        log: ts.log.clone(),
    };
    let ends = vec![
        end("client", &client, &seed.lab),
        end("exit", &exit, &seed.lab),
    ];
    let official = Official {
        client,
        exit,
        exit_ip,
        server,
    };
    // Direct, not relayed: `tailscale ping` goes on until a pong arrives over a direct
    // path (or its count runs out); the status then names the endpoint.
    let path = poll("a direct path to the exit node", TS_TIMEOUT, || {
        let _ = official
            .client
            .cli(&["ping", "-c", "5", "--timeout=2s", &official.exit_ip]);
        official.path().ok().filter(|p| p.starts_with("direct "))
    })
    .with_context(|| {
        format!(
            "path now: {}\n{}",
            official.path().unwrap_or_else(|e| e.to_string()),
            official.diagnostics()
        )
    })?;
    progress(&format!("tailscaled: client -> exit node path: {path}"));
    Ok(Tunnel {
        ends,
        wg: None,
        desc: format!(
            "{} through a tailscaled exit node, path {path} before the runs",
            version(&bins.tailscaled)
        ),
        official: Some(official),
    })
}

/// Makes every tunnel end's interface MTU `mtu` (the official client's by `ip link`, an
/// OS setting it honours; the others were started with it) and checks it on both ends.
fn check_mtu(tunnel: &Tunnel, kind: Kind, mtu: u16) -> Result<String> {
    let mut seen = Vec::new();
    for end in &tunnel.ends {
        let mut m = link_mtu(&end.ns, &end.dev);
        if kind == Kind::Tailscaled && m != Some(mtu) {
            end.ns
                .ip(&["link", "set", "dev", &end.dev, "mtu", &mtu.to_string()])
                .with_context(|| {
                    format!("setting the MTU of {} on the {} end", end.dev, end.name)
                })?;
            m = link_mtu(&end.ns, &end.dev);
        }
        if m != Some(mtu) {
            bail!(
                "{}: {} on the {} end has MTU {m:?}, not {mtu}",
                kind.label(),
                end.dev,
                end.name
            );
        }
        seen.push(format!("{} {mtu}", end.name));
    }
    Ok(format!("mtu {}", seen.join(", ")))
}

/// The MTU of `dev` in `ns`.
fn link_mtu(ns: &Netns, dev: &str) -> Option<u16> {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?.get("mtu")?.as_u64()?.try_into().ok()
}

/// wireguard-go or boringtun-cli set up by hand (see `tsunagu_bench::wg`), plus what an exit
/// node needs: the client's default route into the tunnel and NAT on the exit.
fn start_manual(seed: &mut Seed, daemon: &Daemon, mtu: u16) -> Result<Tunnel> {
    let label = daemon.label();
    let pair = WgPair::start(
        seed,
        daemon,
        &PairConfig {
            mtu,
            port: WG_PORT,
            client_allowed_ips: "0.0.0.0/0".into(),
            keepalive: None,
        },
    )
    .with_context(|| format!("{label}: setting up the tunnel"))?;
    let (client_ns, exit_ns) = (&pair.client.ns, &pair.exit.ns);
    let step = |what: &str, r: Result<std::process::Output, tsunagu_lab::LabError>| {
        r.map(drop).with_context(|| format!("{label}: {what}"))
    };

    progress("exit end: forwarding and NAT");
    exit_ns
        .sysctl("net.ipv4.ip_forward", "1")
        .context("ip_forward on the exit")?;
    exit_ns
        .nft(
            "table ip tput_exit_nat {\n\
             \x20 chain postrouting {\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   oifname \"eth0\" ip saddr 100.64.0.0/10 masquerade\n\
             \x20 }\n\
             }\n",
        )
        .context("nftables masquerade on the exit")?;

    progress("client end: default route into the tunnel");
    step(
        "client route to the exit's endpoint",
        client_ns.ip(&["route", "add", &format!("{EXIT_PUBLIC}/32"), "via", CAFE_GW]),
    )?;
    let src = wg::CLIENT_ADDR.to_string();
    step(
        "client default route into the tunnel",
        client_ns.ip(&[
            "route",
            "replace",
            "default",
            "dev",
            &pair.client.dev,
            "src",
            &src,
        ]),
    )?;

    let end = |e: &wg::WgEnd| End {
        name: e.name,
        ns: e.ns.clone(),
        id: e.id,
        pid: e.pid,
        dev: e.dev.clone(),
        log: e.log.clone(),
    };
    Ok(Tunnel {
        ends: vec![end(&pair.client), end(&pair.exit)],
        desc: daemon.describe(),
        wg: Some(pair),
        official: None,
    })
}

/// What went wrong with the tunnel, for error messages.
fn tunnel_diagnostics(tunnel: &Tunnel) -> String {
    if let Some(pair) = &tunnel.wg {
        return pair.diagnostics();
    }
    if let Some(official) = &tunnel.official {
        return official.diagnostics();
    }
    tunnel
        .ends
        .iter()
        .map(|end| {
            format!(
                "--- log of the {} end ({}):\n{}\n",
                end.name,
                end.log.display(),
                tail(&end.log, 30)
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Measurements

struct Rep {
    gbps: f64,
    /// Bytes the server received.
    bytes: u64,
    retransmits: u64,
    wall: f64,
    /// CPU seconds per tunnel end, in `Tunnel::ends` order.
    cpu: Vec<f64>,
}

struct Measured {
    kind: Kind,
    desc: String,
    rtt_ms: f64,
    rtt_loss: String,
    reps: Vec<Rep>,
    host_busy_pct: f64,
    ends: Vec<&'static str>,
}

/// `ping -c 20 -i 0.05` from the client to the web server: (avg ms, "received/sent").
fn idle_rtt(client: &Netns) -> Result<(f64, String)> {
    let target = WEB_ADDR.to_string();
    let out = client
        .exec_status_timeout(
            &[
                "ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "2", "-w", "10", &target,
            ],
            SHORT,
        )
        .context("ping for the idle RTT")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let loss = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| {
            let mut w = l.split(',');
            let sent = w.next()?.split_whitespace().next()?.to_owned();
            let recv = w.next()?.split_whitespace().next()?.to_owned();
            Some(format!("{recv}/{sent}"))
        })
        .unwrap_or_else(|| "?".into());
    let avg = text
        .lines()
        .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            anyhow!(
                "ping {target} from the client got no replies:\n{}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok((avg, loss))
}

/// Waits until the iperf3 server's log says "Server listening" more than `seen` times.
fn wait_iperf_ready(log: &Path, seen: usize, lab: &mut Lab, id: ProcId) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches("Server listening").count() > seen {
            return Ok(());
        }
        if let Some(status) = lab.try_wait(id)? {
            bail!(
                "iperf3 server exited with {status}; log:\n{}",
                tail(log, 20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "iperf3 server not listening within {READY_TIMEOUT:?}; log:\n{}",
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One iperf3 TCP run from the client: (Gbit/s, bytes received, retransmits).
fn iperf_run(client: &Netns, seconds: u32) -> Result<(f64, u64, u64)> {
    let target = WEB_ADDR.to_string();
    let secs = seconds.to_string();
    let argv = [
        "iperf3",
        "-c",
        &target,
        "-p",
        IPERF_PORT,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    let out = client
        .exec_status_timeout(&argv, Duration::from_secs(u64::from(seconds) + 30))
        .context("running the iperf3 client")?;
    let json: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let json_error = json
        .as_ref()
        .and_then(|j| j.get("error"))
        .and_then(|e| e.as_str())
        .map(str::to_owned);
    if !out.status.success() || json_error.is_some() {
        bail!(
            "`ip netns exec {} {}` failed ({}): {}{}",
            client.name,
            argv.join(" "),
            out.status,
            json_error.unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json = json.ok_or_else(|| anyhow!("iperf3 printed no JSON"))?;
    let recv = &json["end"]["sum_received"];
    let bps = recv["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON lacks end.sum_received.bits_per_second"))?;
    let bytes = recv["bytes"].as_u64().unwrap_or(0);
    let retr = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, bytes, retr))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn measure(kind: Kind, args: &Args) -> Result<Measured> {
    progress(&format!("=== {}: building the seed lab", kind.label()));
    let mut seed = Lab::seed(LAB_NAME, SeedOptions::default()).context("building the seed lab")?;
    let web = seed.ns(role::WEB);

    let iperf_log = seed.lab.log_path("iperf3-server.log");
    let target = WEB_ADDR.to_string();
    let server = seed
        .lab
        .spawn(
            &web,
            &[
                "iperf3",
                "-s",
                "-B",
                &target,
                "-p",
                IPERF_PORT,
                "--forceflush",
            ],
            Some(&iperf_log),
        )
        .context("starting the iperf3 server")?;
    wait_iperf_ready(&iperf_log, 0, &mut seed.lab, server)?;
    let whoami = whoami_server(&web, SocketAddr::new(IpAddr::V4(WEB_ADDR), 80))
        .context("starting the whoami web server")?;

    let mut tunnel = match kind {
        Kind::Baseline => None,
        Kind::Tsunagud => Some(start_tsunagud(&mut seed, &args.tsunagud, args.mtu)?),
        Kind::WireguardGo => Some(start_manual(
            &mut seed,
            &Daemon::WireguardGo {
                prog: args.wireguard_go.clone(),
            },
            args.mtu,
        )?),
        Kind::Boringtun => Some(start_manual(
            &mut seed,
            &Daemon::Boringtun {
                prog: args.boringtun.clone(),
                threads: args.boringtun_threads,
            },
            args.mtu,
        )?),
        Kind::Tailscaled => Some(start_official(&mut seed, args)?),
    };
    if let Some(t) = tunnel.as_mut() {
        let mtu = check_mtu(t, kind, args.mtu)?;
        progress(&format!("{}: {mtu}", kind.label()));
        t.desc = format!("{}, {mtu}", t.desc);
    }
    let mut result = measure_running(kind, args, &mut seed, server, &iperf_log, tunnel.as_ref());
    // The official client's path may have changed under load: say where it ended.
    if let (Ok(m), Some(official)) = (
        result.as_mut(),
        tunnel.as_ref().and_then(|t| t.official.as_ref()),
    ) {
        let after = official
            .path()
            .unwrap_or_else(|e| format!("unknown ({e:#})"));
        progress(&format!("tailscaled: path after the runs: {after}"));
        m.desc = format!("{}, {after} after", m.desc);
        if !after.starts_with("direct ") {
            result = Err(anyhow!(
                "tailscaled: the path left the direct endpoint during the runs: {after}"
            ));
        }
    }
    whoami.stop();
    if let Some(t) = tunnel {
        for end in &t.ends {
            let _ = seed.lab.kill(end.id, Signal::SIGTERM);
        }
        // Dropping a hand-made tunnel removes the UAPI sockets its daemons left behind.
    }
    drop(seed);
    result
}

fn measure_running(
    kind: Kind,
    args: &Args,
    seed: &mut Seed,
    server: ProcId,
    iperf_log: &Path,
    tunnel: Option<&Tunnel>,
) -> Result<Measured> {
    let client = seed.ns(role::CLIENT);
    let diag = || tunnel.map(tunnel_diagnostics).unwrap_or_default();

    // The path works: pings pass and the web server sees the expected address.
    progress("checking the path: ping 203.0.113.10 from the client");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if try_ping(&client, IpAddr::V4(WEB_ADDR), 2, Duration::from_secs(2))? {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{}: no ping reply from {WEB_ADDR} through the path within {READY_TIMEOUT:?}\n{}",
                kind.label(),
                diag()
            );
        }
    }
    let seen = http_get(&client, SocketAddr::new(IpAddr::V4(WEB_ADDR), 80), SHORT)
        .with_context(|| format!("{}: HTTP to the web server\n{}", kind.label(), diag()))?;
    let seen = seen.trim();
    if seen != kind.seen_as().to_string() {
        bail!(
            "{}: the web server sees the client as {seen}, expected {} (traffic is not taking the exit node)\n{}",
            kind.label(),
            kind.seen_as(),
            diag()
        );
    }
    progress(&format!("the web server sees the client as {seen}: ok"));

    let (rtt_ms, rtt_loss) =
        idle_rtt(&client).with_context(|| format!("{}: idle RTT\n{}", kind.label(), diag()))?;
    progress(&format!("idle RTT {rtt_ms:.3} ms ({rtt_loss} replies)"));

    let ends: Vec<&End> = tunnel.map(|t| t.ends.iter().collect()).unwrap_or_default();
    let snmp_before: Vec<_> = ends.iter().map(|e| snmp(&e.ns)).collect::<Result<_>>()?;
    let links_before: Vec<_> = ends.iter().map(|e| link_stats(&e.ns, &e.dev)).collect();
    let mut thread_totals: Vec<HashMap<u32, (String, u64)>> = vec![HashMap::new(); ends.len()];
    let ticks = clock_ticks();
    let (busy0, total0) = host_cpu();
    let mut reps = Vec::new();
    let mut wall_total = 0.0;
    for rep in 0..args.reps {
        wait_iperf_ready(iperf_log, rep as usize, &mut seed.lab, server)?;
        let before: Vec<ProcCpu> = ends
            .iter()
            .map(|e| proc_cpu(e.pid))
            .collect::<Result<_>>()
            .with_context(|| format!("{}: a tunnel process died\n{}", kind.label(), diag()))?;
        let started = Instant::now();
        let (gbps, bytes, retransmits) = iperf_run(&client, args.seconds).with_context(|| {
            format!(
                "{}: iperf3 run {} of {}\n{}",
                kind.label(),
                rep + 1,
                args.reps,
                diag()
            )
        })?;
        let wall = started.elapsed().as_secs_f64();
        wall_total += wall;
        let after: Vec<ProcCpu> = ends
            .iter()
            .map(|e| proc_cpu(e.pid))
            .collect::<Result<_>>()
            .with_context(|| format!("{}: a tunnel process died\n{}", kind.label(), diag()))?;
        let mut cpu = Vec::new();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            cpu.push(a.total.saturating_sub(b.total) as f64 / ticks);
            for (tid, (comm, t)) in &a.threads {
                let prev = b.threads.get(tid).map_or(0, |x| x.1);
                let entry = thread_totals[i]
                    .entry(*tid)
                    .or_insert_with(|| (comm.clone(), 0));
                entry.1 += t.saturating_sub(prev);
            }
        }
        let cpu_text = ends
            .iter()
            .zip(&cpu)
            .map(|(e, c)| format!("{} {:.0}%", e.name, c / wall * 100.0))
            .collect::<Vec<_>>()
            .join(", ");
        progress(&format!(
            "{} run {}/{}: {gbps:.3} Gbit/s, {retransmits} retransmits{}",
            kind.label(),
            rep + 1,
            args.reps,
            if cpu_text.is_empty() {
                String::new()
            } else {
                format!(", CPU {cpu_text} of a core")
            }
        ));
        reps.push(Rep {
            gbps,
            bytes,
            retransmits,
            wall,
            cpu,
        });
        // Let the server log its summary and listen again.
        std::thread::sleep(Duration::from_millis(300));
    }
    let (busy1, total1) = host_cpu();
    let host_busy_pct = if total1 > total0 {
        (busy1 - busy0) as f64 / (total1 - total0) as f64 * 100.0
    } else {
        f64::NAN
    };

    // Who the iperf3 server saw.
    let server_log = std::fs::read_to_string(iperf_log).unwrap_or_default();
    let peers: Vec<&str> = server_log
        .lines()
        .filter_map(|l| l.strip_prefix("Accepted connection from "))
        .filter_map(|l| l.split(',').next())
        .collect();
    let want = kind.seen_as().to_string();
    if peers.len() < args.reps as usize || peers.iter().any(|p| *p != want) {
        bail!(
            "{}: the iperf3 server saw connections from {peers:?}, expected {} from {want}",
            kind.label(),
            args.reps
        );
    }

    // Data-path diagnostics (stderr).
    for (i, end) in ends.iter().enumerate() {
        let after = snmp(&end.ns)?;
        let b = &snmp_before[i];
        let d = |k: &str| delta(&after, b, k);
        progress(&format!(
            "{} {} end: UDP in {} dgrams, RcvbufErrors {} (+v6 {}), InErrors {} (+v6 {}), SndbufErrors {} (+v6 {})",
            kind.label(),
            end.name,
            d("Udp.InDatagrams") + d("Udp6InDatagrams"),
            d("Udp.RcvbufErrors"),
            d("Udp6RcvbufErrors"),
            d("Udp.InErrors"),
            d("Udp6InErrors"),
            d("Udp.SndbufErrors"),
            d("Udp6SndbufErrors"),
        ));
        if let (Some(lb), Some(la)) = (links_before[i], link_stats(&end.ns, &end.dev)) {
            progress(&format!(
                "{} {} end: {} rx {} pkts (dropped {}), tx {} pkts (dropped {})",
                kind.label(),
                end.name,
                end.dev,
                la[2] - lb[2],
                la[0] - lb[0],
                la[3] - lb[3],
                la[1] - lb[1],
            ));
        }
        let mut threads: Vec<_> = thread_totals[i].values().cloned().collect();
        threads.sort_by_key(|t| std::cmp::Reverse(t.1));
        let busy: Vec<String> = threads
            .iter()
            .take(6)
            .filter(|(_, t)| *t as f64 / ticks / wall_total > 0.02)
            .map(|(comm, t)| format!("{comm} {:.0}%", *t as f64 / ticks / wall_total * 100.0))
            .collect();
        progress(&format!(
            "{} {} end: busiest threads (% of a core): {}",
            kind.label(),
            end.name,
            busy.join(", ")
        ));
    }

    Ok(Measured {
        kind,
        desc: tunnel.map(|t| t.desc.clone()).unwrap_or_default(),
        rtt_ms,
        rtt_loss,
        reps,
        host_busy_pct,
        ends: ends.iter().map(|e| e.name).collect(),
    })
}

fn report_line(m: &Measured, baseline_rtt: Option<f64>) -> String {
    let gbps: Vec<f64> = m.reps.iter().map(|r| r.gbps).collect();
    let each = gbps
        .iter()
        .map(|g| format!("{g:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let name = match m.kind {
        Kind::Baseline => "no tunnel (cafe NAT only)".to_owned(),
        _ => format!("{} [{}]", m.kind.label(), m.desc),
    };
    let wall: f64 = m.reps.iter().map(|r| r.wall).sum();
    let gbit: f64 = m.reps.iter().map(|r| r.bytes as f64 * 8.0 / 1e9).sum();
    let retr: u64 = m.reps.iter().map(|r| r.retransmits).sum();
    let cpu = if m.ends.is_empty() {
        "CPU: no tunnel processes".to_owned()
    } else {
        let per_end: Vec<f64> = (0..m.ends.len())
            .map(|i| m.reps.iter().map(|r| r.cpu[i]).sum())
            .collect();
        let total: f64 = per_end.iter().sum();
        let parts = m
            .ends
            .iter()
            .zip(&per_end)
            .map(|(n, c)| format!("{n} {:.0}%", c / wall * 100.0))
            .collect::<Vec<_>>()
            .join(" + ");
        format!(
            "CPU {parts} of a core, {:.2} core-s/Gbit both ends",
            total / gbit
        )
    };
    let rtt = match baseline_rtt {
        Some(b) if m.kind != Kind::Baseline => {
            format!("idle RTT {:.3} ms (no tunnel {b:.3} ms)", m.rtt_ms)
        }
        _ => format!("idle RTT {:.3} ms", m.rtt_ms),
    };
    format!(
        "{name}: {:.2} Gbit/s median ({each}); {cpu}; {rtt}, {} ping replies; {retr} TCP retransmits; host CPU busy {:.0}% of {} cores",
        median(&gbps),
        m.rtt_loss,
        m.host_busy_pct,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    )
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("exit-throughput: error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Ok(false) when some path failed (the others are still reported).
fn run() -> Result<bool> {
    let mut args = parse_args()?;
    preflight(&mut args)?;
    progress(&format!(
        "paths {:?}; tsunagud {}, wireguard-go {}, boringtun-cli {}, tailscaled {}; {} run(s) of {} s each, MTU {}",
        args.kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
        args.tsunagud.display(),
        args.wireguard_go.display(),
        args.boringtun.display(),
        args.official
            .as_ref()
            .map_or_else(|| "-".to_owned(), |b| b.tailscaled.display().to_string()),
        args.reps,
        args.seconds,
        args.mtu
    ));
    let load_before = tsunagu_bench::loadavg();
    let mut results: Vec<(Kind, Result<Measured>)> = Vec::new();
    for kind in args.kinds.clone() {
        let r = measure(kind, &args);
        if let Err(e) = &r {
            progress(&format!("{} FAILED: {e:#}", kind.label()));
        }
        results.push((kind, r));
    }

    let baseline_rtt = results
        .iter()
        .find(|(k, _)| *k == Kind::Baseline)
        .and_then(|(_, r)| r.as_ref().ok())
        .map(|m| m.rtt_ms);
    let mut ok = true;
    for (kind, r) in &results {
        match r {
            Ok(m) => println!("{}", report_line(m, baseline_rtt)),
            Err(e) => {
                ok = false;
                let first = format!("{e:#}");
                let first = first.lines().next().unwrap_or_default().to_owned();
                println!("{}: FAILED: {first} (details on stderr)", kind.label());
            }
        }
    }
    let median_of = |kind: Kind| {
        results
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|m| median(&m.reps.iter().map(|r| r.gbps).collect::<Vec<_>>()))
    };
    let fmt = |v: Option<f64>| v.map_or("n/a".to_owned(), |g| format!("{g:.2}"));
    let (t, w, b, ts) = (
        median_of(Kind::Tsunagud),
        median_of(Kind::WireguardGo),
        median_of(Kind::Boringtun),
        median_of(Kind::Tailscaled),
    );
    let ratio = |peer: Option<f64>| match (t, peer) {
        (Some(t), Some(p)) if p > 0.0 => Some(t / p),
        _ => None,
    };
    println!(
        "host: {} cores, load average {load_before} before, {} after",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        tsunagu_bench::loadavg()
    );
    println!(
        "exit-throughput: tsunagud {} Gbit/s, wireguard-go {} Gbit/s, boringtun {} Gbit/s, tailscaled {} Gbit/s, ratio vs wireguard-go {}, ratio vs tailscaled {}",
        fmt(t),
        fmt(w),
        fmt(b),
        fmt(ts),
        fmt(ratio(w)),
        fmt(ratio(ts))
    );
    Ok(ok)
}
