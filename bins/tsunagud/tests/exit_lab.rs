//! The data plane in the seed scenario (root): client behind the cafe NAT, exit node on a
//! public address, web server on the "internet". Each test builds its own lab.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::tailnet::{NodeOpts, Tailnet};
use tsunagu_lab::{
    CAFE_PUBLIC, EXIT_PUBLIC, Lab, ProcId, Seed, SeedOptions, Signal, WEB_ADDR, http_get,
    whoami_server,
};

const T: Duration = Duration::from_secs(5);

fn web() -> SocketAddr {
    (WEB_ADDR, 80).into()
}

/// The seed with a client (behind the NAT) and an exit node, daemons not yet started.
fn setup(test: &str, opts: SeedOptions) -> (Seed, Tailnet) {
    let seed = Lab::seed(test, opts).expect("seed lab");
    let mut net = Tailnet::new(env!("CARGO_BIN_EXE_tsunagud"));
    net.add("client", role::CLIENT, None, false);
    net.add("exit", role::EXIT, Some(IpAddr::V4(EXIT_PUBLIC)), true);
    (seed, net)
}

fn exit_opts() -> NodeOpts {
    NodeOpts {
        exit_node: Some("exit".into()),
        ..NodeOpts::default()
    }
}

/// What the web server sees as the client's address.
fn seen(seed: &Seed) -> String {
    http_get(&seed.ns(role::CLIENT), web(), T)
        .expect("fetch from the web server")
        .trim()
        .to_string()
}

/// Poll `f` until it is true or `within` passes; returns the time it took.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

struct Running {
    seed: Seed,
    net: Tailnet,
    client: ProcId,
    exit: ProcId,
}

fn running(test: &str, opts: SeedOptions, client: &NodeOpts) -> Running {
    let (mut seed, net) = setup(test, opts);
    let exit = net
        .start(&mut seed.lab, "exit", &NodeOpts::default())
        .expect("exit starts");
    let client = net
        .start(&mut seed.lab, "client", client)
        .expect("client starts");
    Running {
        seed,
        net,
        client,
        exit,
    }
}

#[test]
fn two_nodes_reach_each_other_over_tailnet_addresses() {
    let r = running("dp_reach", SeedOptions::default(), &NodeOpts::default());
    let client_ns = r.seed.ns(role::CLIENT);
    let exit_ns = r.seed.ns(role::EXIT);
    let exit_ip = r.net.node("exit").ip4;
    let client_ip = r.net.node("client").ip4;
    assert!(
        tsunagu_lab::ping(&client_ns, exit_ip.into(), 3, T),
        "ICMP client -> exit"
    );
    assert!(
        tsunagu_lab::ping(&exit_ns, client_ip.into(), 3, T),
        "ICMP exit -> client"
    );
    // TCP both ways, IPv4 and IPv6 tailnet addresses.
    let _srv = whoami_server(&exit_ns, (exit_ip, 8080).into()).unwrap();
    let body = http_get(&client_ns, (exit_ip, 8080).into(), T).unwrap();
    assert_eq!(
        body.trim(),
        client_ip.to_string(),
        "the exit node sees the client's tailnet address"
    );
    let exit6 = r.net.node("exit").ip6;
    let _srv6 = whoami_server(&exit_ns, (exit6, 8080).into()).unwrap();
    let body6 = http_get(&client_ns, (exit6, 8080).into(), T).unwrap();
    assert_eq!(body6.trim(), r.net.node("client").ip6.to_string());
    let _csrv = whoami_server(&client_ns, (client_ip, 8081).into()).unwrap();
    let back = http_get(&exit_ns, (client_ip, 8081).into(), T).unwrap();
    assert_eq!(back.trim(), exit_ip.to_string());
}

#[test]
fn exit_node_changes_the_address_the_internet_sees() {
    let mut r = running("dp_exit", SeedOptions::default(), &NodeOpts::default());
    let _web = whoami_server(&r.seed.ns(role::WEB), web()).unwrap();
    assert_eq!(
        seen(&r.seed),
        CAFE_PUBLIC.to_string(),
        "without exit node: the cafe"
    );
    r.net
        .reload(&mut r.seed.lab, r.client, "client", &exit_opts())
        .unwrap();
    assert_eq!(
        seen(&r.seed),
        EXIT_PUBLIC.to_string(),
        "with exit node: the exit node"
    );
    // Selecting by tailnet IP works the same.
    let by_ip = NodeOpts {
        exit_node: Some(r.net.node("exit").ip4.to_string()),
        ..NodeOpts::default()
    };
    r.net
        .reload(&mut r.seed.lab, r.client, "client", &NodeOpts::default())
        .unwrap();
    assert_eq!(
        seen(&r.seed),
        CAFE_PUBLIC.to_string(),
        "deselected: the cafe again"
    );
    r.net
        .reload(&mut r.seed.lab, r.client, "client", &by_ip)
        .unwrap();
    assert_eq!(seen(&r.seed), EXIT_PUBLIC.to_string(), "selected by IP");
    let _ = r.exit;
}
