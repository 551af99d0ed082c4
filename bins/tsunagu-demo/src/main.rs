//! The demo: a tailnet in network namespaces, on the seed scenario of the lab.
//!
//! A client sits behind a cafe's NAT; an exit node has a public address; a web server on
//! the "internet" reports the address each request comes from. The demo shows that
//! address without an exit node (the cafe's), with one (the exit node's), what a capture
//! on the cafe Wi-Fi sees meanwhile, and that the exit node's failure does not leak
//! traffic. Everything is torn down at the end (or on Ctrl-C: the lab cleans up stale
//! namespaces on the next run).

use anyhow::{Context as _, bail};
use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::tailnet::{NodeOpts, Tailnet};
use tsunagu_lab::{
    CAFE_PUBLIC, EXIT_PUBLIC, Lab, SeedOptions, Signal, WEB_ADDR, http_get, whoami_server,
};

#[derive(Parser)]
#[command(about = "A demo tailnet with an exit node, in network namespaces (root)")]
struct Args {
    /// The tsunagud binary to run on the nodes.
    #[arg(long, default_value = "target/release/tsunagud")]
    tsunagud: PathBuf,
    /// Keep the lab up this many seconds at the end, to look around with `ip netns exec`.
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.tsunagud.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p tsunagud`",
            args.tsunagud.display()
        );
    }
    step("building the lab: client behind a cafe NAT, exit node, web server on the internet");
    let mut seed =
        Lab::seed("demo", SeedOptions::default()).context("building the lab (are you root?)")?;
    for r in [role::CLIENT, role::CAFE, role::EXIT, role::INET, role::WEB] {
        println!("   namespace {:<7} {}", r, seed.ns(r).name);
    }
    let web: SocketAddr = (WEB_ADDR, 80).into();
    let _web = whoami_server(&seed.ns(role::WEB), web)?;
    let mut net = Tailnet::new(&args.tsunagud);
    net.add("client", role::CLIENT, None, false);
    net.add(
        "dev-m1sk9-s1",
        role::EXIT,
        Some(IpAddr::V4(EXIT_PUBLIC)),
        true,
    );
    let exit_name = "dev-m1sk9-s1";

    step(&format!(
        "starting tsunagud on the exit node {exit_name} (198.51.100.2) and on the client"
    ));
    let exit = net.start(&mut seed.lab, exit_name, &NodeOpts::default())?;
    let client = net.start(&mut seed.lab, "client", &NodeOpts::default())?;
    let client_ns = seed.ns(role::CLIENT);
    let ask = |what: &str| -> anyhow::Result<String> {
        let seen = http_get(&client_ns, web, Duration::from_secs(5))?
            .trim()
            .to_string();
        let who = if seen == CAFE_PUBLIC.to_string() {
            "the cafe's NAT"
        } else if seen == EXIT_PUBLIC.to_string() {
            "the exit node"
        } else {
            "?"
        };
        println!("   {what}: the web server at {WEB_ADDR} sees {seen} ({who})");
        Ok(seen)
    };
    let ping_exit = tsunagu_lab::ping(
        &client_ns,
        net.node(exit_name).ip4.into(),
        3,
        Duration::from_secs(5),
    );
    println!(
        "   client {} -> {exit_name} {} over the tailnet: {}",
        net.node("client").ip4,
        net.node(exit_name).ip4,
        if ping_exit { "ping ok" } else { "ping FAILED" }
    );

    step("without an exit node");
    ask("direct")?;

    step(&format!(
        "tsunagu set --exit-node={exit_name} (config reload)"
    ));
    let with_exit = NodeOpts {
        exit_node: Some(exit_name.into()),
        ..NodeOpts::default()
    };
    net.reload(&mut seed.lab, client, "client", &with_exit)?;
    let (cafe, port) = seed.cafe_lan_iface();
    let file = seed.lab.log_path("cafe.pcap");
    let cap = tsunagu_lab::capture(&mut seed.lab, &cafe, port, &file)?;
    ask("through the exit node")?;
    let lines = cap.finish(&mut seed.lab)?;
    println!(
        "   a capture on the cafe Wi-Fi meanwhile ({} packets):",
        lines.len()
    );
    for l in lines.iter().take(6) {
        println!("     {l}");
    }

    step("the exit node crashes (SIGKILL): the client fails closed");
    seed.lab.kill(exit, Signal::SIGKILL)?;
    match http_get(&client_ns, web, Duration::from_secs(2)) {
        Ok(body) => println!(
            "   UNEXPECTED: the request went out and was seen as {}",
            body.trim()
        ),
        Err(_) => println!("   the request fails: nothing leaves outside the tunnel"),
    }
    step("the exit node comes back");
    net.start(&mut seed.lab, exit_name, &NodeOpts::default())?;
    let restarted = Instant::now();
    while restarted.elapsed() < Duration::from_secs(10) {
        if http_get(&client_ns, web, Duration::from_millis(500)).is_ok() {
            break;
        }
    }
    println!(
        "   traffic flows again {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    ask("through the exit node")?;

    step("tsunagu set --exit-node= (config reload)");
    net.reload(&mut seed.lab, client, "client", &NodeOpts::default())?;
    ask("direct again")?;

    if args.hold > 0 {
        step(&format!(
            "holding the lab for {} s (Ctrl-C ends it)",
            args.hold
        ));
        std::thread::sleep(Duration::from_secs(args.hold));
    }
    step("tearing down");
    drop(seed);
    println!("   done: no namespace, rule or table of the demo is left");
    Ok(())
}
