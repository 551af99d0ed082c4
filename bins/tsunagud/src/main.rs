//! tsunagud: the node daemon.
//!
//! Today it takes its network map from a TOML file ([`config`]); SIGHUP reloads the file
//! (a bad file is reported and the running map kept), SIGTERM/SIGINT shut down cleanly,
//! removing every route, rule and NAT table the daemon installed.

mod config;

use anyhow::Context as _;
use clap::Parser;
use config::Config;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use tsunagu_engine::engine::{Engine, EngineConfig};

#[derive(Debug, Parser)]
#[command(name = "tsunagud", version, about = "tsunagu node daemon")]
struct Args {
    /// Configuration file (TOML) describing this node and its peers.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// TUN interface name (overrides the file's `tun`).
    #[arg(long, value_name = "NAME")]
    tun: Option<String>,
    /// UDP port (overrides the file's `listen_port`; 0 picks a free one).
    #[arg(long, value_name = "UDP_PORT")]
    port: Option<u16>,
    /// Only check the configuration file and exit.
    #[arg(long)]
    check: bool,
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
    let mut cfg = Config::load(&args.config)?;
    if let Some(tun) = &args.tun {
        cfg.tun.clone_from(tun);
    }
    if let Some(port) = args.port {
        cfg.listen_port = port;
    }
    Ok(cfg)
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = load(&args)?;
    if args.check {
        println!(
            "{}: ok ({} peers{})",
            args.config.display(),
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
