//! tsunagu: the command-line client of tsunagud's local API (JSON over HTTP/1.1 on a Unix
//! socket), with Tailscale's verbs and flags: `up`, `down`, `logout`, `set`, `status`,
//! `exit-node list|suggest`, `ping`, `ip`, `version`.

mod icmp;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_SOCKET: &str = "/run/tsunagud/tsunagud.sock";

#[derive(Debug, Parser)]
#[command(name = "tsunagu", version, about = "control a tsunagu node (tsunagud)")]
struct Cli {
    /// tsunagud's local API socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET, env = "TSUNAGU_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Flags shared by `up` and `set`.
#[derive(Debug, clap::Args)]
struct PrefFlags {
    /// Exit node by tailnet IP, short name or DNS name; an empty value stops using one.
    #[arg(long, value_name = "IP|NAME", num_args = 1)]
    exit_node: Option<String>,
    /// With an exit node, keep the local LAN reachable directly.
    #[arg(
        long,
        value_name = "BOOL",
        require_equals = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    exit_node_allow_lan_access: Option<bool>,
    /// Offer this device as an exit node: other members' internet traffic would leave
    /// through it (asks for confirmation; the admin or the policy must approve).
    #[arg(
        long,
        value_name = "BOOL",
        require_equals = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    advertise_exit_node: Option<bool>,
    /// Route to the subnets other devices advertise (off by default: a peer's route
    /// then never captures this device's own LAN).
    #[arg(
        long,
        value_name = "BOOL",
        require_equals = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    accept_routes: Option<bool>,
    /// Use the tailnet's DNS: MagicDNS names and the exit node's resolver through
    /// 100.100.100.100, installed into /etc/resolv.conf (default true).
    #[arg(
        long,
        value_name = "BOOL",
        require_equals = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    accept_dns: Option<bool>,
    /// The name to register this device with.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Answer yes to confirmations (for scripts).
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect to the tailnet, logging in if needed.
    Up {
        /// The coordination server, e.g. https://ctl.example (`http://` only on loopback
        /// or with --insecure-http).
        #[arg(long, value_name = "URL")]
        login_server: Option<String>,
        /// Allow an `http://` login server that is not on loopback (a lab, a trusted
        /// network): the server's key then comes unauthenticated over the network.
        #[arg(long)]
        insecure_http: bool,
        /// Pre-auth key (or file:PATH to read it from); without one, an admin approves
        /// the device at the URL printed.
        #[arg(long, value_name = "KEY")]
        auth_key: Option<String>,
        /// Tags to request, e.g. tag:exit.
        #[arg(long, value_delimiter = ',', value_name = "TAGS")]
        advertise_tags: Option<Vec<String>>,
        /// Join an exit node as one of its standby hosts: a key from `tsunagu-server nodes
        /// standby add NODE` (or file:PATH); implies --advertise-exit-node.
        #[arg(long, value_name = "KEY")]
        standby_key: Option<String>,
        /// As a host of an exit node with standby hosts: take the role whenever this
        /// device is ready (by default a host that comes back stands by).
        #[arg(
            long,
            value_name = "BOOL",
            require_equals = true,
            num_args = 0..=1,
            default_missing_value = "true"
        )]
        prefer: Option<bool>,
        /// Settings not given return to their defaults.
        #[arg(long)]
        reset: bool,
        /// Give up waiting for approval after this long (e.g. 30s, 5m; default: wait).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        prefs: PrefFlags,
    },
    /// Disconnect from the tailnet (settings kept; `up` reconnects).
    Down,
    /// Log out: the server expires this device's key; `up` must authenticate again.
    Logout,
    /// Show this device and its peers.
    Status {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change preferences (applied at once and kept across restarts).
    Set {
        #[command(flatten)]
        prefs: PrefFlags,
    },
    /// Exit nodes this device may use.
    #[command(subcommand)]
    ExitNode(ExitNodeCmd),
    /// Ping a peer over the tailnet (ICMP through the tunnel) and show the path used.
    Ping {
        /// The peer: tailnet IP, short name or DNS name.
        target: String,
        /// How many pings.
        #[arg(short = 'c', long, default_value_t = 4)]
        count: u32,
        /// How long to wait for each reply (e.g. 2s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "2s")]
        timeout: Duration,
    },
    /// Report UDP reachability, the public endpoint, NAT behaviour and relay latency.
    Netcheck {
        #[arg(long)]
        json: bool,
    },
    /// Print this device's tailnet addresses.
    Ip {
        /// Only the IPv4 address.
        #[arg(short = '4', conflicts_with = "v6")]
        v4: bool,
        /// Only the IPv6 address.
        #[arg(short = '6')]
        v6: bool,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
enum ExitNodeCmd {
    /// List the exit nodes this device may use.
    List {
        /// Only nodes whose name, IP or location contains this text.
        #[arg(long, value_name = "TEXT")]
        filter: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Suggest the reachable exit node with the lowest measured latency.
    Suggest {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Deserialize)]
struct SelfStatus {
    name: String,
    addresses: Vec<String>,
    #[serde(default)]
    user: String,
    os: String,
    running: bool,
    #[serde(default)]
    offering_exit_node: Option<String>,
    #[serde(default)]
    exit_node_users: usize,
    #[serde(default)]
    draining_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ExitStatus {
    chosen: String,
    name: String,
    ip: String,
    state: String,
    #[serde(default)]
    blocked: bool,
    allow_lan_access: bool,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
struct Backend {
    state: String,
    #[serde(default)]
    auth_url: String,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Deserialize)]
struct PeerInfo {
    ip: String,
    name: String,
    #[serde(default)]
    dns_name: String,
    user: String,
    os: String,
    online: Option<bool>,
    offers_exit_node: bool,
    exit_node: bool,
    endpoint: Option<String>,
    /// `direct IP:PORT` or `relay "REGION"` (older daemons: none).
    #[serde(default)]
    path: Option<String>,
    last_handshake_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Status {
    #[serde(default)]
    backend: Backend,
    #[serde(default)]
    login_server: String,
    #[serde(rename = "self")]
    self_node: Option<SelfStatus>,
    exit_node: Option<ExitStatus>,
    peers: Vec<PeerInfo>,
    /// A host of an exit node with standby hosts.
    #[serde(default)]
    standby: Option<StandbyStatus>,
}

#[derive(Debug, Deserialize)]
struct StandbyStatus {
    identity: String,
    role: String,
    #[serde(default)]
    hosts: Vec<StandbyHost>,
    #[serde(default)]
    last_switch: Option<Switch>,
    #[serde(default)]
    dropped: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct StandbyHost {
    name: String,
    active: bool,
    online: bool,
    ready: bool,
    not_ready: String,
    prefer: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Switch {
    at: String,
    from: String,
    to: String,
    reason: String,
}

/// The `# Standby` lines of `status` for a host of an exit node with standby hosts.
fn render_standby(s: &StandbyStatus) -> String {
    let mut out = format!(
        "# Host of exit node {}: {}\n",
        s.identity,
        if s.role == "active" {
            "active (this host serves it)".to_string()
        } else {
            format!(
                "standing by (answers nothing; {} datagram{} dropped)",
                s.dropped,
                if s.dropped == 1 { "" } else { "s" }
            )
        }
    );
    let hosts: Vec<String> = s
        .hosts
        .iter()
        .map(|h| {
            let mut what = vec![if h.active { "active" } else { "standby" }];
            what.push(if !h.online {
                "offline"
            } else if h.ready {
                "ready"
            } else {
                h.not_ready.as_str()
            });
            if h.prefer {
                what.push("preferred");
            }
            format!("{} ({})", h.name, what.join(", "))
        })
        .collect();
    out.push_str(&format!("#   hosts: {}\n", hosts.join("; ")));
    if let Some(sw) = &s.last_switch {
        out.push_str(&format!(
            "#   last switch {}: {} -> {} ({})\n",
            sw.at, sw.from, sw.to, sw.reason
        ));
    }
    out
}

/// A handshake younger than this counts as "active" (WireGuard rekeys every 2 minutes
/// while traffic flows).
const ACTIVE_SECS: u64 = 180;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tsunagu: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let sock = cli.socket.as_path();
    match cli.cmd {
        Cmd::Version => {
            println!("{}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Cmd::Status { json } => {
            let body = request(sock, "GET", "/status", None)?;
            if json {
                let v: serde_json::Value =
                    serde_json::from_str(&body).context("tsunagud's answer")?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let st: Status = serde_json::from_str(&body).context("tsunagud's answer")?;
            match st.backend.state.as_str() {
                "NeedsLogin" => {
                    println!("Logged out.");
                    if st.login_server.is_empty() {
                        println!("Log in with: tsunagu up --login-server=URL [--auth-key=KEY]");
                    } else {
                        println!("Log in with: tsunagu up");
                    }
                    std::process::exit(1);
                }
                "Stopped" => {
                    println!("tsunagu is stopped (tsunagu up reconnects).");
                    std::process::exit(1);
                }
                "NeedsMachineAuth" => {
                    println!(
                        "Waiting for an admin to approve this device at:\n\n\t{}\n",
                        st.backend.auth_url
                    );
                    std::process::exit(1);
                }
                _ => {}
            }
            print!("{}", render_status(&st));
            Ok(())
        }
        Cmd::Set { prefs } => {
            let req = pref_request(sock, &prefs)?;
            if req.is_empty() {
                bail!(
                    "nothing to set (try --exit-node=NAME, --exit-node-allow-lan-access, \
                     --accept-routes, --advertise-exit-node or --hostname=NAME)"
                );
            }
            let body = serde_json::Value::Object(req).to_string();
            request(sock, "POST", "/prefs", Some(&body))?;
            Ok(())
        }
        Cmd::Up {
            login_server,
            insecure_http,
            auth_key,
            advertise_tags,
            standby_key,
            prefer,
            reset,
            timeout,
            json,
            prefs,
        } => {
            let mut req = pref_request(sock, &prefs)?;
            if let Some(url) = login_server {
                req.insert("login_server".into(), url.into());
            }
            if insecure_http {
                req.insert("insecure_http".into(), true.into());
            }
            if let Some(key) = auth_key {
                req.insert("auth_key".into(), read_auth_key(&key)?.into());
            }
            if let Some(key) = standby_key {
                req.insert("standby_key".into(), read_auth_key(&key)?.into());
            }
            if let Some(p) = prefer {
                req.insert("prefer".into(), p.into());
            }
            if let Some(tags) = advertise_tags {
                req.insert("advertise_tags".into(), tags.into());
            }
            req.insert("reset".into(), reset.into());
            let body = serde_json::Value::Object(req).to_string();
            let answer = request(sock, "POST", "/up", Some(&body))?;
            let v: serde_json::Value =
                serde_json::from_str(&answer).context("tsunagud's answer")?;
            let backend: Backend =
                serde_json::from_value(v["backend"].clone()).context("tsunagud's answer")?;
            let backend = wait_running(sock, backend, timeout, json)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&backend)?);
            }
            Ok(())
        }
        Cmd::Down => {
            request(sock, "POST", "/down", Some("{}"))?;
            Ok(())
        }
        Cmd::Logout => {
            let answer = request(sock, "POST", "/logout", Some("{}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&answer).context("tsunagud's answer")?;
            if let Some(w) = v["warning"].as_str().filter(|w| !w.is_empty()) {
                eprintln!("tsunagu: logged out locally; {w}");
            }
            Ok(())
        }
        Cmd::ExitNode(ExitNodeCmd::List { filter, json }) => {
            let st = fetch_status(sock)?;
            let nodes = exit_nodes(&st, filter.as_deref());
            if json {
                let v: Vec<serde_json::Value> = nodes
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "ip": p.ip, "name": p.name, "online": p.online != Some(false),
                            "selected": p.exit_node,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            print!("{}", render_exit_nodes(&nodes));
            Ok(())
        }
        Cmd::ExitNode(ExitNodeCmd::Suggest { json }) => {
            let st = fetch_status(sock)?;
            let candidates: Vec<&PeerInfo> = exit_nodes(&st, None)
                .into_iter()
                .filter(|p| p.online != Some(false))
                .collect();
            if candidates.is_empty() {
                bail!("no exit node is available to this device");
            }
            let mut best: Option<(&PeerInfo, Duration)> = None;
            for p in &candidates {
                let ip: std::net::Ipv4Addr = match p.ip.parse() {
                    Ok(ip) => ip,
                    Err(_) => continue,
                };
                let rtts = icmp::ping_many(ip, 3, Duration::from_secs(1))
                    .with_context(|| format!("pinging {}", p.name))?;
                if let Some(rtt) = icmp::median(&rtts) {
                    eprintln!("{}: {:.1} ms", p.name, rtt.as_secs_f64() * 1e3);
                    if best.is_none_or(|(_, b)| rtt < b) {
                        best = Some((p, rtt));
                    }
                } else {
                    eprintln!("{}: no reply", p.name);
                }
            }
            let Some((p, rtt)) = best else {
                bail!("no exit node answered");
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": p.name, "ip": p.ip, "rtt_ms": rtt.as_secs_f64() * 1e3})
                );
            } else {
                println!(
                    "Suggested exit node: {} ({}), {:.1} ms\nTo use it: tsunagu set --exit-node={}",
                    p.name,
                    p.ip,
                    rtt.as_secs_f64() * 1e3,
                    p.name
                );
            }
            Ok(())
        }
        Cmd::Ping {
            target,
            count,
            timeout,
        } => {
            let st = fetch_status(sock)?;
            let want = target.trim_end_matches('.');
            let peer = st
                .peers
                .iter()
                .find(|p| {
                    p.ip == want || p.name == want || p.dns_name.trim_end_matches('.') == want
                })
                .with_context(|| format!("no peer {target:?} in the tailnet"))?;
            let ip: std::net::Ipv4Addr = peer
                .ip
                .parse()
                .with_context(|| format!("{} has no IPv4 tailnet address", peer.name))?;
            let mut pinger = icmp::Pinger::new(ip)?;
            let mut answered = 0;
            for i in 0..count.max(1) {
                match pinger.ping(timeout)? {
                    Some(rtt) => {
                        answered += 1;
                        // The path is the peer's endpoint as the engine sees it now.
                        let path = fetch_status(sock)
                            .ok()
                            .and_then(|st| {
                                st.peers
                                    .into_iter()
                                    .find(|p| p.ip == peer.ip)
                                    .and_then(|p| {
                                        p.path.or(p.endpoint.map(|e| format!("direct {e}")))
                                    })
                            })
                            .map(|path| format!("via {}", path.trim_start_matches("direct ")))
                            .unwrap_or_else(|| "via an unknown path".into());
                        println!(
                            "pong from {} ({}) {path} in {:.1}ms",
                            peer.name,
                            peer.ip,
                            rtt.as_secs_f64() * 1e3
                        );
                    }
                    None => println!("timeout waiting for {} ({})", peer.name, peer.ip),
                }
                if i + 1 < count {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            if answered == 0 {
                bail!("no reply from {} ({})", peer.name, peer.ip);
            }
            Ok(())
        }
        Cmd::Netcheck { json } => {
            let body = request(sock, "GET", "/netcheck", None)?;
            let v: serde_json::Value = serde_json::from_str(&body).context("tsunagud's answer")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_netcheck(&v));
            }
            Ok(())
        }
        Cmd::Ip { v4, v6 } => {
            let st = fetch_status(sock)?;
            let me = st
                .self_node
                .context("tsunagud has no network map yet (not connected)")?;
            let mut any = false;
            for a in &me.addresses {
                let is_v6 = a.contains(':');
                if (v4 && is_v6) || (v6 && !is_v6) {
                    continue;
                }
                println!("{a}");
                any = true;
                if v4 || v6 {
                    break;
                }
            }
            if !any {
                bail!("no {} address", if v4 { "IPv4" } else { "IPv6" });
            }
            Ok(())
        }
    }
}

fn render_netcheck(v: &serde_json::Value) -> String {
    let mut out = String::from("\nReport:\n");
    out.push_str(&format!(
        "\t* UDP: {}\n",
        v["udp"].as_bool().unwrap_or(false)
    ));
    match v["ipv4"].as_str() {
        Some(a) => out.push_str(&format!("\t* IPv4: yes, {a}\n")),
        None => out.push_str("\t* IPv4: (no STUN answer)\n"),
    }
    out.push_str(&format!(
        "\t* MappingVariesByDestIP: {}\n",
        match v["mapping_varies_by_dest_ip"].as_bool() {
            Some(b) => b.to_string(),
            None => "unknown (fewer than two STUN servers answered)".into(),
        }
    ));
    out.push_str(&format!(
        "\t* Nearest DERP: {}\n",
        v["preferred_derp"].as_str().unwrap_or("none")
    ));
    out.push_str("\t* DERP latency:\n");
    if let Some(m) = v["derp_latency_ms"].as_object() {
        for (code, ms) in m {
            out.push_str(&format!(
                "\t\t- {code}: {:.1}ms\n",
                ms.as_f64().unwrap_or(0.0)
            ));
        }
    }
    out
}

fn fetch_status(sock: &Path) -> anyhow::Result<Status> {
    let body = request(sock, "GET", "/status", None)?;
    serde_json::from_str(&body).context("tsunagud's answer")
}

/// `--auth-key=file:PATH` reads the key from a file (keeps it out of `ps`).
fn read_auth_key(arg: &str) -> anyhow::Result<String> {
    match arg.strip_prefix("file:") {
        Some(path) => Ok(std::fs::read_to_string(path)
            .with_context(|| format!("reading the auth key from {path}"))?
            .trim()
            .to_string()),
        None => Ok(arg.to_string()),
    }
}

/// The JSON fields of `up`/`set` from the flags; asks before offering an exit node.
fn pref_request(
    sock: &Path,
    f: &PrefFlags,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut req = serde_json::Map::new();
    if let Some(x) = &f.exit_node {
        req.insert("exit_node".into(), x.clone().into());
    }
    if let Some(l) = f.exit_node_allow_lan_access {
        req.insert("exit_node_allow_lan_access".into(), l.into());
    }
    if let Some(a) = f.accept_routes {
        req.insert("accept_routes".into(), a.into());
    }
    if let Some(h) = &f.hostname {
        req.insert("hostname".into(), h.clone().into());
    }
    if let Some(d) = f.accept_dns {
        req.insert("accept_dns".into(), d.into());
    }
    if let Some(a) = f.advertise_exit_node {
        if a && !f.yes {
            let already = fetch_status(sock)
                .ok()
                .and_then(|st| st.self_node)
                .is_some_and(|me| me.offering_exit_node.is_some());
            if !already {
                confirm_exit_node()?;
            }
        }
        req.insert("advertise_exit_node".into(), a.into());
    }
    Ok(req)
}

const EXIT_WARNING: &str = "Offering this device as an exit node means other members of the \
tailnet may send ALL their internet traffic through it: websites will see this device's \
public address for them, and this device's network carries their traffic.";

fn confirm_exit_node() -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("{EXIT_WARNING}\nRefusing without confirmation: add --yes to offer it anyway");
    }
    eprint!("{EXIT_WARNING}\nOffer this device as an exit node? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        bail!("not offering this device as an exit node")
    }
}

/// After `up`: print the login URL if an admin must approve, and wait (with a spinner
/// on stderr) until the node runs, fails, or `timeout` passes.
fn wait_running(
    sock: &Path,
    mut b: Backend,
    timeout: Option<Duration>,
    quiet: bool,
) -> anyhow::Result<Backend> {
    use std::io::IsTerminal as _;
    let start = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let frames = ['|', '/', '-', '\\'];
    let mut shown_url = String::new();
    let mut i = 0usize;
    let mut last_dot = std::time::Instant::now();
    loop {
        if b.state == "Running" {
            if tty && i > 0 {
                eprint!("\r\x1b[K");
            }
            if i > 0 && !quiet {
                eprintln!("Success.");
            }
            return Ok(b);
        }
        if !b.error.is_empty() && b.state != "NeedsMachineAuth" && b.state != "Running" {
            bail!("{}", b.error);
        }
        if b.state == "NeedsMachineAuth" && b.auth_url != shown_url {
            println!("\nTo authenticate, visit:\n\n\t{}\n", b.auth_url);
            let _ = std::io::stdout().flush();
            shown_url.clone_from(&b.auth_url);
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            bail!(
                "timed out after {t:?} waiting for {}",
                if b.state == "NeedsMachineAuth" {
                    "an admin to approve this device"
                } else {
                    "the connection"
                }
            );
        }
        let what = if b.state == "NeedsMachineAuth" {
            "waiting for approval"
        } else {
            "connecting"
        };
        if tty {
            eprint!("\r{} {what}...", frames[i % frames.len()]);
        } else if last_dot.elapsed() >= Duration::from_secs(5) || i == 0 {
            eprintln!("{what}... ({}s)", start.elapsed().as_secs());
            last_dot = std::time::Instant::now();
        }
        let _ = std::io::stderr().flush();
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
        b = fetch_status(sock)?.backend;
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 30s, 5m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration {s:?} (e.g. 30s, 5m, 1h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The peers this device may use as exit node (the server shows the exit routes only to
/// devices the policy lets use `autogroup:internet`), optionally filtered.
fn exit_nodes<'a>(st: &'a Status, filter: Option<&str>) -> Vec<&'a PeerInfo> {
    let f = filter.map(str::to_ascii_lowercase);
    let mut v: Vec<&PeerInfo> = st
        .peers
        .iter()
        .filter(|p| p.offers_exit_node || p.exit_node)
        .filter(|p| {
            f.as_deref()
                .is_none_or(|f| p.name.to_ascii_lowercase().contains(f) || p.ip.contains(f))
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn render_exit_nodes(nodes: &[&PeerInfo]) -> String {
    let mut rows = vec![[
        "IP".to_string(),
        "HOSTNAME".into(),
        "COUNTRY".into(),
        "CITY".into(),
        "STATUS".into(),
    ]];
    for p in nodes {
        let status = if p.exit_node {
            "selected"
        } else if p.online == Some(false) {
            "offline"
        } else {
            "-"
        };
        rows.push([
            or_dash(&p.ip).into(),
            p.name.clone(),
            "-".into(),
            "-".into(),
            status.into(),
        ]);
    }
    if nodes.is_empty() {
        return "No exit nodes are available to this device.\n".into();
    }
    table(&rows)
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        for (k, (w, c)) in widths.iter().zip(r.iter()).enumerate() {
            if k + 1 == N {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push('\n');
    }
    out
}

fn peer_state(p: &PeerInfo) -> String {
    let active = p.online != Some(false) && p.last_handshake_secs.is_some_and(|s| s < ACTIVE_SECS);
    let exit = if p.exit_node {
        Some("exit node")
    } else if p.offers_exit_node {
        Some("offers exit node")
    } else {
        None
    };
    if active {
        let mut parts = vec!["active".to_string()];
        parts.extend(exit.map(String::from));
        if let Some(path) = &p.path {
            parts.push(path.clone());
        } else if let Some(ep) = &p.endpoint {
            parts.push(format!("direct {ep}"));
        }
        return parts.join("; ");
    }
    let first = if p.online == Some(false) {
        "offline"
    } else if exit.is_some() || p.last_handshake_secs.is_some() {
        "idle"
    } else {
        "-"
    };
    match exit {
        Some(e) => format!("{first}; {e}"),
        None => first.to_string(),
    }
}

fn self_state(me: &SelfStatus) -> String {
    let mut parts = Vec::new();
    if !me.running {
        parts.push("starting".to_string());
    }
    match me.offering_exit_node.as_deref() {
        Some("approved") => parts.push(format!(
            "offering exit node; {} peer{} using it",
            me.exit_node_users,
            if me.exit_node_users == 1 { "" } else { "s" }
        )),
        Some(other) => parts.push(format!("offering exit node: {other}")),
        None => {}
    }
    if let Some(secs) = me.draining_secs {
        parts.push(format!(
            "exit node offer withdrawn; still forwarding for {} peer{} for {secs} s (drain)",
            me.exit_node_users,
            if me.exit_node_users == 1 { "" } else { "s" }
        ));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn render_status(st: &Status) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    if let Some(me) = &st.self_node {
        let ip = me
            .addresses
            .iter()
            .find(|a| !a.contains(':'))
            .or(me.addresses.first())
            .cloned()
            .unwrap_or_default();
        rows.push([
            or_dash(&ip).into(),
            me.name.clone(),
            or_dash(&me.user).into(),
            or_dash(&me.os).into(),
            self_state(me),
        ]);
    }
    for p in &st.peers {
        rows.push([
            or_dash(&p.ip).into(),
            p.name.clone(),
            or_dash(&p.user).into(),
            or_dash(&p.os).into(),
            peer_state(p),
        ]);
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    if st.self_node.is_none() {
        out.push_str("# tsunagud is not connected to its coordination server yet\n");
    }
    for r in &rows {
        for (w, c) in widths.iter().zip(r.iter()) {
            out.push_str(&format!("{c:<w$}  "));
        }
        out.push_str(&r[4]);
        out.push('\n');
    }
    if let Some(x) = &st.exit_node {
        let who = if x.name.is_empty() {
            x.chosen.clone()
        } else {
            format!("{} ({})", x.name, x.ip)
        };
        out.push_str(&format!(
            "# Exit node: {who}: {}{}\n",
            x.state,
            if x.allow_lan_access {
                "; LAN access allowed"
            } else {
                ""
            }
        ));
        if x.blocked {
            out.push_str(
                "# Internet traffic is blocked until the exit node returns or you choose \
                 another (tsunagu set --exit-node=NAME) or none (tsunagu set --exit-node=)\n",
            );
        }
    }
    if let Some(s) = &st.standby {
        out.push_str(&render_standby(s));
    }
    if !st.backend.error.is_empty() {
        out.push_str(&format!(
            "# Coordination server: {} (the tailnet keeps running on the last map)\n",
            st.backend.error
        ));
    }
    out
}

/// One HTTP/1.1 request over the Unix socket; the body on 2xx, the daemon's error otherwise.
fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach tsunagud at {} (is it running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: tsunagud\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .with_context(|| format!("cannot reach tsunagud at {}", socket.display()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading tsunagud's answer from {}", socket.display()))?;
    let (code, body) = parse_response(&raw)?;
    if (200..300).contains(&code) {
        return Ok(body);
    }
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| body.trim().to_string());
    bail!("{msg}")
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("tsunagud sent an incomplete answer")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("tsunagud sent a malformed answer")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((code, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((code, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(online: Option<bool>, hs: Option<u64>, offers: bool, exit: bool) -> PeerInfo {
        PeerInfo {
            ip: "100.64.0.2".into(),
            name: "dev-m1sk9-s1".into(),
            dns_name: "dev-m1sk9-s1.tailnet.internal.".into(),
            user: "tagged-devices".into(),
            os: "linux".into(),
            online,
            offers_exit_node: offers,
            exit_node: exit,
            endpoint: Some("198.51.100.2:41641".into()),
            path: Some("direct 198.51.100.2:41641".into()),
            last_handshake_secs: hs,
        }
    }

    #[test]
    fn peer_lines_read_like_tailscale() {
        let st = Status {
            self_node: Some(SelfStatus {
                name: "laptop".into(),
                addresses: vec!["100.64.0.1".into(), "fd7a:115c:a1e0::1".into()],
                user: "admin".into(),
                os: "linux".into(),
                running: true,
                offering_exit_node: None,
                exit_node_users: 0,
                draining_secs: None,
            }),
            backend: Backend::default(),
            login_server: String::new(),
            exit_node: None,
            peers: vec![peer(Some(true), Some(3), true, true)],
            standby: None,
        };
        assert_eq!(
            render_status(&st),
            "100.64.0.1  laptop        admin           linux  -\n\
             100.64.0.2  dev-m1sk9-s1  tagged-devices  linux  active; exit node; direct 198.51.100.2:41641\n"
        );
        assert_eq!(
            peer_state(&peer(Some(true), None, true, false)),
            "idle; offers exit node"
        );
        assert_eq!(
            peer_state(&peer(Some(false), Some(3), true, false)),
            "offline; offers exit node"
        );
        assert_eq!(peer_state(&peer(Some(true), None, false, false)), "-");
        assert_eq!(peer_state(&peer(None, Some(900), false, false)), "idle");
    }

    #[test]
    fn responses_parse_plain_and_chunked() {
        let (c, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((c, b.as_str()), (200, "{}"));
        let (c, b) = parse_response(
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((c, b.as_str()), (400, "{\"a\"}"));
    }

    fn set_prefs(args: &[&str]) -> PrefFlags {
        let mut argv = vec!["tsunagu", "set"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().cmd {
            Cmd::Set { prefs } => prefs,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_parse() {
        assert_eq!(set_prefs(&["--exit-node="]).exit_node.as_deref(), Some(""));
        assert_eq!(
            set_prefs(&["--exit-node", "dev-m1sk9-s1"])
                .exit_node
                .as_deref(),
            Some("dev-m1sk9-s1")
        );
        assert_eq!(
            set_prefs(&["--exit-node-allow-lan-access"]).exit_node_allow_lan_access,
            Some(true)
        );
        assert_eq!(
            set_prefs(&["--exit-node-allow-lan-access=false"]).exit_node_allow_lan_access,
            Some(false)
        );
        let p = set_prefs(&["--advertise-exit-node", "--yes"]);
        assert_eq!((p.advertise_exit_node, p.yes), (Some(true), true));
        assert_eq!(set_prefs(&["--accept-routes"]).accept_routes, Some(true));
        assert_eq!(
            set_prefs(&["--accept-routes=false"]).accept_routes,
            Some(false)
        );
        assert_eq!(set_prefs(&["--hostname=x"]).accept_routes, None);
        assert!(Cli::try_parse_from(["tsunagu", "set", "--bogus"]).is_err());
        assert!(Cli::try_parse_from(["tsunagu", "ip", "-4", "-6"]).is_err());
        let c = Cli::try_parse_from([
            "tsunagu",
            "up",
            "--login-server=http://198.51.100.4:8080",
            "--insecure-http",
            "--auth-key=tskey-auth-1-x",
            "--advertise-tags=tag:exit,tag:b",
            "--reset",
            "--timeout=30s",
        ])
        .unwrap();
        match c.cmd {
            Cmd::Up {
                login_server,
                insecure_http,
                auth_key,
                advertise_tags,
                reset,
                timeout,
                ..
            } => {
                assert_eq!(login_server.as_deref(), Some("http://198.51.100.4:8080"));
                assert!(insecure_http);
                assert_eq!(auth_key.as_deref(), Some("tskey-auth-1-x"));
                assert_eq!(
                    advertise_tags,
                    Some(vec!["tag:exit".to_string(), "tag:b".to_string()])
                );
                assert!(reset);
                assert_eq!(timeout, Some(Duration::from_secs(30)));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["tsunagu", "up", "--timeout=soon"]).is_err());
        assert!(Cli::try_parse_from(["tsunagu", "exit-node", "list", "--filter=de"]).is_ok());
        assert!(Cli::try_parse_from(["tsunagu", "ping", "-c", "2", "dev-m1sk9-s1"]).is_ok());
    }

    #[test]
    fn netcheck_reads_like_tailscale() {
        let v = serde_json::json!({
            "udp": true, "ipv4": "198.51.100.3:41641", "mapping_varies_by_dest_ip": null,
            "preferred_derp": "tsunagu", "derp_latency_ms": {"tsunagu": 0.42},
        });
        assert_eq!(
            render_netcheck(&v),
            "\nReport:\n\t* UDP: true\n\t* IPv4: yes, 198.51.100.3:41641\n\
             \t* MappingVariesByDestIP: unknown (fewer than two STUN servers answered)\n\
             \t* Nearest DERP: tsunagu\n\t* DERP latency:\n\t\t- tsunagu: 0.4ms\n"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn self_line_tells_the_exit_offer() {
        let mut me = SelfStatus {
            name: "dev-m1sk9-s1".into(),
            addresses: vec!["100.64.0.2".into()],
            user: "tagged-devices".into(),
            os: "linux".into(),
            running: true,
            offering_exit_node: Some("awaiting approval".into()),
            exit_node_users: 0,
            draining_secs: None,
        };
        assert_eq!(self_state(&me), "offering exit node: awaiting approval");
        me.offering_exit_node = Some("approved".into());
        me.exit_node_users = 2;
        assert_eq!(self_state(&me), "offering exit node; 2 peers using it");
        me.offering_exit_node = None;
        me.exit_node_users = 0;
        assert_eq!(self_state(&me), "-");
        // Withdrawn, still forwarding: a drain.
        me.draining_secs = Some(25);
        me.exit_node_users = 1;
        assert_eq!(
            self_state(&me),
            "exit node offer withdrawn; still forwarding for 1 peer for 25 s (drain)"
        );
    }

    #[test]
    fn a_host_of_an_exit_node_with_standby_hosts_says_its_role_and_the_last_switch() {
        let json = r#"{"identity":"dev-m1sk9-s1","role":"standby","dropped":3,
            "hosts":[{"Name":"dev-m1sk9-s1","Active":false,"Online":true,"Ready":true,"NotReady":"","Prefer":true},
                     {"Name":"exit2","Active":true,"Online":true,"Ready":true,"NotReady":""}],
            "last_switch":{"At":"2026-05-01T10:00:00Z","From":"dev-m1sk9-s1","To":"exit2","Reason":"admin failover"}}"#;
        let s: StandbyStatus = serde_json::from_str(json).unwrap();
        assert_eq!(
            render_standby(&s),
            "# Host of exit node dev-m1sk9-s1: standing by (answers nothing; 3 datagrams dropped)\n\
             #   hosts: dev-m1sk9-s1 (standby, ready, preferred); exit2 (active, ready)\n\
             #   last switch 2026-05-01T10:00:00Z: dev-m1sk9-s1 -> exit2 (admin failover)\n"
        );
        let c = Cli::try_parse_from(["tsunagu", "up", "--standby-key=tskey-standby-x", "--prefer"])
            .unwrap();
        match c.cmd {
            Cmd::Up {
                standby_key,
                prefer,
                ..
            } => {
                assert_eq!(standby_key.as_deref(), Some("tskey-standby-x"));
                assert_eq!(prefer, Some(true));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exit_node_list_shows_only_usable_exit_nodes() {
        let st = Status {
            backend: Backend::default(),
            login_server: String::new(),
            self_node: None,
            exit_node: None,
            peers: vec![
                peer(Some(true), None, true, false),
                PeerInfo {
                    name: "phone".into(),
                    ip: "100.64.0.9".into(),
                    ..peer(Some(true), None, false, false)
                },
            ],
            standby: None,
        };
        let nodes = exit_nodes(&st, None);
        assert_eq!(
            render_exit_nodes(&nodes),
            "IP          HOSTNAME      COUNTRY  CITY  STATUS\n\
             100.64.0.2  dev-m1sk9-s1  -        -     -\n"
        );
        assert!(exit_nodes(&st, Some("nothing")).is_empty());
        assert_eq!(
            render_exit_nodes(&[]),
            "No exit nodes are available to this device.\n"
        );
    }

    #[test]
    fn unreachable_daemon_is_named() {
        let e = request(
            Path::new("/nonexistent/tsunagud.sock"),
            "GET",
            "/status",
            None,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot reach tsunagud at /nonexistent/tsunagud.sock"),
            "{e:#}"
        );
    }
}
