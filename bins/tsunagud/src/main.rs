//! tsunagud: the node daemon.
//!
//! Joined to a coordination server (the default): identity and settings in the state
//! directory, the `tsunagu` CLI on the local API socket ([`api`], [`control`]). SIGTERM or
//! SIGINT stop it; while an exit node is in use the fail-closed rules stay until the next
//! start, so nothing leaks across a restart (`tsunagu down` removes everything).
//!
//! Without a server, `--config FILE` takes the network map from a TOML file ([`config`]);
//! SIGHUP reloads it (a bad file is reported and the running map kept), SIGTERM/SIGINT
//! remove every route, rule and NAT table the daemon installed.

mod api;
mod config;
mod control;
mod dns;
mod netcheck;
mod regions;
mod relay;
mod standby;

use anyhow::Context as _;
use clap::Parser;
use config::Config;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use tsunagu_engine::engine::{Engine, EngineConfig};

#[derive(Debug, Parser)]
#[command(name = "tsunagud", version, about = "tsunagu node daemon")]
struct Args {
    /// Configuration file (TOML) describing this node and its peers (without a server).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        conflicts_with = "login_server"
    )]
    config: Option<PathBuf>,
    /// Join this coordination server (e.g. https://ctl.example); without it the saved
    /// one, or none until `tsunagu up --login-server=URL`. `http://` only on loopback or
    /// with --insecure-http.
    #[arg(long, value_name = "URL")]
    login_server: Option<String>,
    /// Pre-auth key for the first registration.
    #[arg(long, value_name = "KEY", env = "TSUNAGU_AUTH_KEY")]
    auth_key: Option<String>,
    /// Join an exit node as one of its standby hosts (a key from `tsunagu-server nodes
    /// standby add NODE`; implies --advertise-exit-node). Env: TSUNAGU_STANDBY_KEY.
    #[arg(long, value_name = "KEY", env = "TSUNAGU_STANDBY_KEY")]
    standby_key: Option<String>,
    /// As a host of an exit node with standby hosts: take the role whenever this host is
    /// ready (by default a host that comes back stands by).
    #[arg(long)]
    prefer: bool,
    /// State directory (keys, mode 0600).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/tsunagud")]
    state_dir: PathBuf,
    /// Hostname to register with (default: the system's).
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Offer this node as an exit node (the admin or the policy must approve it).
    #[arg(long)]
    advertise_exit_node: bool,
    /// Tags to request, e.g. tag:exit (the policy's tagOwners must allow them).
    #[arg(long, value_delimiter = ',', value_name = "TAGS")]
    advertise_tags: Vec<String>,
    /// Use this exit node: tailnet IP, short name or DNS name.
    #[arg(long, value_name = "IP|NAME", default_value = "")]
    exit_node: String,
    /// With an exit node, keep the local LAN reachable directly.
    #[arg(long)]
    exit_node_allow_lan_access: bool,
    /// Route to the subnets other nodes advertise (off by default, as Tailscale on
    /// Linux: a peer's route never captures this device's LAN unless asked for).
    #[arg(long)]
    accept_routes: bool,
    /// Allow an `http://` login server that is not on loopback (a lab, a trusted
    /// network): its key then comes unauthenticated over the network.
    #[arg(long)]
    insecure_http: bool,
    /// TUN interface name (overrides the file's `tun`).
    #[arg(long, value_name = "NAME")]
    tun: Option<String>,
    /// UDP port (overrides the file's `listen_port`; 0 picks a free one).
    #[arg(long, value_name = "UDP_PORT")]
    port: Option<u16>,
    /// The local API's Unix socket (mode 0600), used by the `tsunagu` CLI.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/tsunagud/tsunagud.sock"
    )]
    socket: PathBuf,
    /// Group allowed to use the local API besides root (socket mode 0660).
    #[arg(long, value_name = "GROUP")]
    operator_group: Option<String>,
    /// Home on this relay region (its ID or code in the server's DERP map) instead of the
    /// lowest-numbered one. Env: TSUNAGU_HOME_RELAY.
    #[arg(long, value_name = "ID|CODE", env = "TSUNAGU_HOME_RELAY")]
    home_relay: Option<String>,
    /// Close a connection to a relay region other than home after this many seconds
    /// without sends to it. Env: TSUNAGU_RELAY_IDLE_TIMEOUT.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..),
        env = "TSUNAGU_RELAY_IDLE_TIMEOUT"
    )]
    relay_idle_timeout: u64,
    /// After this node stops offering itself as exit node, keep forwarding for the peers
    /// that used it for this many seconds (planned maintenance: they move to another
    /// exit node meanwhile, without losing a packet). Env: TSUNAGU_EXIT_DRAIN.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30,
        env = "TSUNAGU_EXIT_DRAIN"
    )]
    exit_drain: u64,
    /// Only check the configuration file and exit.
    #[arg(long)]
    check: bool,
}

/// `Hostinfo.App` of tsunagud.
pub(crate) fn standby_app() -> &'static str {
    "tsunagud"
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TSUNAGU_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tsunagud: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load(args: &Args) -> anyhow::Result<Config> {
    let path = args.config.as_deref().context("no --config given")?;
    let mut cfg = Config::load(path)?;
    if let Some(tun) = &args.tun {
        cfg.tun.clone_from(tun);
    }
    if let Some(port) = args.port {
        cfg.listen_port = port;
    }
    Ok(cfg)
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.config.is_none() {
        return run_joined(args);
    }
    let cfg = load(&args)?;
    if args.check {
        println!(
            "{}: ok ({} peers{})",
            args.config
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display(),
            cfg.map.peers.len(),
            cfg.map
                .exit_peer()
                .map(|p| format!(", exit node {}", p.name))
                .unwrap_or_default()
        );
        return Ok(());
    }
    // Block the signals we handle before any thread starts, so that every thread inherits
    // the mask and only `wait` below receives them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;

    let engine_cfg = EngineConfig {
        tun_name: cfg.tun.clone(),
        listen_port: cfg.listen_port,
        ..EngineConfig::default()
    };
    let mut engine = Engine::start(engine_cfg, &cfg.map).context("starting the engine")?;
    tracing::info!(
        name = %cfg.map.self_node.name,
        key = %cfg.map.self_node.private_key.public(),
        port = engine.local_port(),
        tun = %cfg.tun,
        exit_node = cfg.map.exit_peer().map(|p| p.name.as_str()).unwrap_or("none"),
        serving_exit = cfg.map.self_node.serve_exit,
        "running"
    );
    loop {
        let sig = signals.wait().context("waiting for signals")?;
        match sig {
            Signal::SIGHUP => match load(&args) {
                Ok(next) => match engine.apply(&next.map) {
                    Ok(()) => tracing::info!(
                        exit_node = next
                            .map
                            .exit_peer()
                            .map(|p| p.name.as_str())
                            .unwrap_or("none"),
                        "configuration reloaded"
                    ),
                    Err(e) => tracing::error!("reload refused, keeping the running map: {e:#}"),
                },
                Err(e) => tracing::error!("reload refused, keeping the running map: {e:#}"),
            },
            _ => {
                tracing::info!(signal = %sig, "shutting down");
                engine.shutdown();
                return Ok(());
            }
        }
    }
}

fn block_signals() -> anyhow::Result<SigSet> {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    Ok(signals)
}

/// Joined to a coordination server: the control loop runs on its own runtime thread; this
/// thread waits for signals and shuts the engine down cleanly.
fn run_joined(args: Args) -> anyhow::Result<()> {
    if args.check {
        anyhow::bail!("--check needs --config FILE");
    }
    let operator_group = match &args.operator_group {
        None => None,
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .with_context(|| format!("looking up group {name:?}"))?
                .with_context(|| format!("no group {name:?}"))?
                .gid,
        ),
    };
    let signals = block_signals()?;
    let default_hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "linux".into());
    let join = control::JoinArgs {
        login_server: args.login_server.clone(),
        auth_key: args.auth_key.clone(),
        standby_key: args.standby_key.clone(),
        prefer: args.prefer,
        state_dir: args.state_dir.clone(),
        default_hostname,
        hostname: args.hostname.clone(),
        advertise_tags: args.advertise_tags.clone(),
        prefs: tsunagu_client::netmap::Prefs {
            exit_node: args.exit_node.clone(),
            exit_node_allow_lan_access: args.exit_node_allow_lan_access,
            advertise_exit_node: args.advertise_exit_node,
            accept_routes: args.accept_routes,
        },
        insecure_http: args.insecure_http,
        engine: EngineConfig {
            tun_name: args
                .tun
                .clone()
                .unwrap_or_else(|| config::DEFAULT_TUN.into()),
            listen_port: args.port.unwrap_or(config::DEFAULT_PORT),
            ..EngineConfig::default()
        },
        mtu: tsunagu_proto::netmap::DEFAULT_MTU,
        socket: args.socket.clone(),
        operator_group,
        exit_drain: std::time::Duration::from_secs(args.exit_drain),
        relay: relay::PoolConfig {
            home: args.home_relay.clone(),
            idle: std::time::Duration::from_secs(args.relay_idle_timeout),
            ..relay::PoolConfig::default()
        },
    };
    let engine = std::sync::Arc::new(std::sync::Mutex::new(None::<Engine>));
    let shared = engine.clone();
    std::thread::Builder::new()
        .name("tsunagu-control".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build();
            match rt {
                Ok(rt) => {
                    if let Err(e) = rt.block_on(control::run(join, shared)) {
                        tracing::error!("control loop stopped: {e:#}");
                    }
                }
                Err(e) => tracing::error!("cannot start the runtime: {e}"),
            }
        })
        .context("starting the control thread")?;
    loop {
        let sig = signals.wait().context("waiting for signals")?;
        if sig == Signal::SIGHUP {
            tracing::info!("SIGHUP ignored while joined to a server");
            continue;
        }
        tracing::info!(signal = %sig, "shutting down");
        if let Ok(mut guard) = engine.lock()
            && let Some(mut e) = guard.take()
        {
            // With an exit node in use, keep blocking until the next start.
            e.stop_keeping_block();
        }
        // The OS's resolv.conf goes back (the fail-closed rules, if any, keep blocking).
        dns::repair(&args.state_dir);
        let _ = std::fs::remove_file(&args.socket);
        return Ok(());
    }
}
