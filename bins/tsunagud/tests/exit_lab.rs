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

/// Every packet in a cafe-LAN capture must belong to the tunnel (see
/// [`tsunagu_lab::tunnel_leaks`]); any other line is a leak.
fn leaks(lines: &[String]) -> Vec<String> {
    let exit_ep = format!("{EXIT_PUBLIC}.41641");
    tsunagu_lab::tunnel_leaks(lines, tsunagu_lab::CLIENT_LAN, &exit_ep, &[])
}

#[test]
fn capture_on_the_cafe_lan_shows_only_the_tunnel() {
    let r = running("dp_capture", SeedOptions::default(), &exit_opts());
    let mut seed = r.seed;
    let web_ns = seed.ns(role::WEB);
    let _web = whoami_server(&web_ns, web()).unwrap();
    let _web6 = whoami_server(&web_ns, (tsunagu_lab::WEB6_ADDR, 80).into()).unwrap();
    let dns = tsunagu_lab::udp_sink(&web_ns, (tsunagu_lab::RESOLVER, 53).into()).unwrap();
    let (cafe, port) = seed.cafe_lan_iface();
    let file = seed.lab.log_path("cafe-lan.pcap");
    let cap = tsunagu_lab::capture(&mut seed.lab, &cafe, port, &file).unwrap();

    let client_ns = seed.ns(role::CLIENT);
    assert_eq!(seen(&seed), EXIT_PUBLIC.to_string());
    // A DNS query (a real query's bytes: id 0x1234, RD, one question for example.com A).
    let query =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
    tsunagu_lab::udp_send(&client_ns, &[(tsunagu_lab::RESOLVER, 53).into()], query, 1).unwrap();
    assert!(
        dns.wait_for_count(1, T),
        "the DNS query reached the resolver, through the tunnel"
    );
    // IPv6 to the internet also leaves through the exit node (the cafe has no IPv6).
    let v6 = http_get(&client_ns, (tsunagu_lab::WEB6_ADDR, 80).into(), T).unwrap();
    assert_eq!(
        v6.trim(),
        "2001:db8:1::2",
        "IPv6 leaves from the exit node's address"
    );

    let lines = cap.finish(&mut seed.lab).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{EXIT_PUBLIC}.41641")) && l.contains("UDP")),
        "the capture saw the tunnel at all: {lines:#?}"
    );
    let leaked = leaks(&lines);
    assert!(
        leaked.is_empty(),
        "packets outside the tunnel on the cafe LAN: {leaked:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("example") || l.contains("HTTP")),
        "no plaintext"
    );
}

#[test]
fn leak_filter_flags_plaintext() {
    // The filter itself must catch what a leak looks like.
    let lines: Vec<String> = [
        "10:00:00.000000 IP 198.18.1.10.41641 > 198.51.100.2.41641: UDP, length 148",
        "10:00:00.000001 IP 198.51.100.2.41641 > 198.18.1.10.41641: UDP, length 92",
        "10:00:00.000002 ARP, Request who-has 198.18.1.1 tell 198.18.1.10, length 28",
        "10:00:00.000003 IP6 fe80::1 > ff02::2: ICMP6, router solicitation, length 16",
        "10:00:00.000004 IP 198.51.100.2 > 198.18.1.10: ICMP 198.51.100.2 udp port 41641 unreachable, length 132",
        "10:00:00.000005 IP 198.18.1.1 > 224.0.0.22: igmp v3 report, 1 group record(s)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(leaks(&lines).is_empty());
    for bad in [
        "10:00:01.0 IP 198.18.1.10.5353 > 203.0.113.53.53: 4660+ A? example.com. (29)",
        "10:00:01.0 IP 198.18.1.10.40000 > 203.0.113.10.80: Flags [S], seq 1, length 0",
        "10:00:01.0 IP6 2001:db8:9::1.40000 > 2001:db8:2::10.80: Flags [S], length 0",
        "10:00:01.0 IP 198.18.1.10.41641 > 198.51.100.6.41641: UDP, length 148",
        "10:00:01.0 IP 198.18.1.10 > 203.0.113.10: ICMP echo request, id 1, seq 1, length 64",
        "10:00:01.0 IP 198.18.1.10 > 224.0.0.251: igmp v3 report, 1 group record(s)",
    ] {
        assert_eq!(leaks(&[bad.to_string()]).len(), 1, "{bad}");
    }
}

#[test]
fn allow_lan_access_keeps_the_lan_reachable_only_when_on() {
    let opts = SeedOptions {
        lan_host: true,
        ..SeedOptions::default()
    };
    let mut r = running("dp_lan", opts, &exit_opts());
    let printer: SocketAddr = (tsunagu_lab::PRINTER_LAN, 9100).into();
    let _p = tsunagu_lab::tcp_echo(&r.seed.ns(role::PRINTER), printer).unwrap();
    let _web = whoami_server(&r.seed.ns(role::WEB), web()).unwrap();
    let client_ns = r.seed.ns(role::CLIENT);
    let short = Duration::from_secs(2);
    assert!(
        !tsunagu_lab::tcp_connect_ok(&client_ns, printer, short),
        "LAN access off: the printer is unreachable"
    );
    assert_eq!(seen(&r.seed), EXIT_PUBLIC.to_string());

    let lan_on = NodeOpts {
        allow_lan: true,
        ..exit_opts()
    };
    r.net
        .reload(&mut r.seed.lab, r.client, "client", &lan_on)
        .unwrap();
    assert!(
        tsunagu_lab::tcp_connect_ok(&client_ns, printer, T),
        "LAN access on: reachable"
    );
    assert_eq!(
        seen(&r.seed),
        EXIT_PUBLIC.to_string(),
        "internet still via the exit node"
    );

    r.net
        .reload(&mut r.seed.lab, r.client, "client", &exit_opts())
        .unwrap();
    assert!(
        !tsunagu_lab::tcp_connect_ok(&client_ns, printer, short),
        "off again"
    );
    let _ = r.exit;
}

#[test]
fn exit_node_killed_fails_closed_and_recovers_within_5s() {
    let r = running("dp_failover", SeedOptions::default(), &exit_opts());
    let (mut seed, net) = (r.seed, r.net);
    let _web = whoami_server(&seed.ns(role::WEB), web()).unwrap();
    assert_eq!(seen(&seed), EXIT_PUBLIC.to_string());

    let (cafe, port) = seed.cafe_lan_iface();
    let file = seed.lab.log_path("down.pcap");
    let cap = tsunagu_lab::capture(&mut seed.lab, &cafe, port, &file).unwrap();
    seed.lab.kill(r.exit, Signal::SIGKILL).unwrap();
    let client_ns = seed.ns(role::CLIENT);
    for _ in 0..3 {
        let r = http_get(&client_ns, web(), Duration::from_secs(1));
        assert!(r.is_err(), "exit node down: no internet (got {r:?})");
    }
    let lines = cap.finish(&mut seed.lab).unwrap();
    let leaked = leaks(&lines);
    assert!(
        leaked.is_empty(),
        "leaked while the exit node was down: {leaked:#?}"
    );

    net.start(&mut seed.lab, "exit", &NodeOpts::default())
        .unwrap();
    let took = eventually(Duration::from_secs(5), || {
        http_get(&client_ns, web(), Duration::from_millis(500))
            .is_ok_and(|b| b.trim() == EXIT_PUBLIC.to_string())
    });
    assert!(
        took.is_some(),
        "traffic did not flow again within 5 s of the exit node's restart\nclient log:\n{}",
        net.log(&seed.lab, "client")
    );
    eprintln!(
        "recovered {:?} after the exit node restarted",
        took.unwrap_or_default()
    );
}

/// Our kernel state in a namespace: nft tables, policy rules at our priorities, routes
/// in our table, the tun. Empty when nothing of ours is left.
fn our_state(ns: &tsunagu_lab::Netns) -> Vec<String> {
    let mut found = Vec::new();
    let out = |argv: &[&str]| {
        String::from_utf8_lossy(&ns.exec_status(argv).expect("run").stdout).into_owned()
    };
    if out(&["nft", "list", "tables"]).contains("tsunagu") {
        found.push("nft table tsunagu".to_string());
    }
    for fam in ["-4", "-6"] {
        for line in out(&["ip", fam, "rule", "show"]).lines() {
            let prio: u32 = line
                .split(':')
                .next()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            if (5210..=5270).contains(&prio) || line.contains("lookup 52") {
                found.push(format!("rule {fam} {line}"));
            }
        }
        for line in out(&["ip", fam, "route", "show", "table", "52"]).lines() {
            found.push(format!("route {fam} {line}"));
        }
    }
    if out(&["ip", "link", "show"]).contains("tsunagu0") {
        found.push("tun tsunagu0".to_string());
    }
    found
}

#[test]
fn stopping_leaves_nothing_behind_even_after_a_crash() {
    let r = running("dp_cleanup", SeedOptions::default(), &exit_opts());
    let (mut seed, net) = (r.seed, r.net);
    let client_ns = seed.ns(role::CLIENT);
    let exit_ns = seed.ns(role::EXIT);
    let _web = whoami_server(&seed.ns(role::WEB), web()).unwrap();
    assert!(
        !our_state(&client_ns).is_empty(),
        "the client installed its routing"
    );
    assert!(
        our_state(&exit_ns).iter().any(|s| s.contains("nft")),
        "the exit installed NAT"
    );
    let fwd = |ns: &tsunagu_lab::Netns| ns.sysctl_get("net.ipv4.ip_forward").unwrap();
    assert_eq!(fwd(&exit_ns), "1", "the exit node forwards");

    let stop_cleanly = |seed: &mut Seed, id: ProcId, ns: &tsunagu_lab::Netns| {
        seed.lab.kill(id, Signal::SIGTERM).unwrap();
        assert!(
            seed.lab
                .wait_timeout(id, T)
                .unwrap()
                .is_some_and(|s| s.success()),
            "clean exit"
        );
        let left = our_state(ns);
        assert!(left.is_empty(), "left behind in {}: {left:?}", ns.name);
    };
    stop_cleanly(&mut seed, r.client, &client_ns);
    stop_cleanly(&mut seed, r.exit, &exit_ns);
    assert_eq!(
        fwd(&exit_ns),
        "0",
        "forwarding restored to its previous value"
    );
    assert_eq!(
        seen(&seed),
        CAFE_PUBLIC.to_string(),
        "no daemon: the cafe again"
    );

    // Crash both: the state stays (the client fails closed) ...
    let exit = net
        .start(&mut seed.lab, "exit", &NodeOpts::default())
        .unwrap();
    let client = net.start(&mut seed.lab, "client", &exit_opts()).unwrap();
    seed.lab.kill(client, Signal::SIGKILL).unwrap();
    seed.lab.kill(exit, Signal::SIGKILL).unwrap();
    let client_left = our_state(&client_ns);
    assert!(
        client_left.iter().any(|s| s.contains("unreachable")),
        "fail-closed route stays: {client_left:?}"
    );
    assert!(
        http_get(&client_ns, web(), Duration::from_secs(1)).is_err(),
        "crashed client: no leak"
    );

    // ... a restart takes over the leftovers, and a clean stop removes everything.
    let exit = net
        .start(&mut seed.lab, "exit", &NodeOpts::default())
        .unwrap();
    let client = net.start(&mut seed.lab, "client", &exit_opts()).unwrap();
    assert!(
        eventually(T, || http_get(
            &client_ns,
            web(),
            Duration::from_millis(500)
        )
        .is_ok())
        .is_some(),
        "works again after the restart"
    );
    stop_cleanly(&mut seed, client, &client_ns);
    stop_cleanly(&mut seed, exit, &exit_ns);
    assert_eq!(seen(&seed), CAFE_PUBLIC.to_string());
}

#[test]
fn garbage_to_the_daemon_port_is_dropped_and_traffic_goes_on() {
    let r = running("dp_junk", SeedOptions::default(), &exit_opts());
    let mut seed = r.seed;
    let _web = whoami_server(&seed.ns(role::WEB), web()).unwrap();
    assert_eq!(seen(&seed), EXIT_PUBLIC.to_string());
    let target: SocketAddr = (EXIT_PUBLIC, 41641).into();
    let web_ns = seed.ns(role::WEB);
    // Bounded: a few hundred datagrams of each shape.
    let mut handshake_like = vec![0u8; 148];
    handshake_like[0] = 1;
    let mut data_like = vec![0x5a; 1200];
    data_like[..4].copy_from_slice(&[4, 0, 0, 0]);
    for payload in [
        &b""[..],
        b"\x01",
        &[0xff; 1400][..],
        &vec![0x42; 65_000][..],
        &handshake_like,
        &data_like,
    ] {
        tsunagu_lab::udp_send(&web_ns, &[target], payload, 200).unwrap();
    }
    assert!(
        seed.lab.try_wait(r.exit).unwrap().is_none(),
        "the exit node is still running"
    );
    assert_eq!(seen(&seed), EXIT_PUBLIC.to_string(), "and still forwarding");

    // A broken config file on reload is refused; the running map stays.
    std::fs::write(seed.lab.log_path("client.toml"), "exit_node = [").unwrap();
    seed.lab.kill(r.client, Signal::SIGHUP).unwrap();
    let refused = eventually(T, || {
        r.net.log(&seed.lab, "client").contains("reload refused")
    });
    assert!(refused.is_some(), "{}", r.net.log(&seed.lab, "client"));
    assert!(
        seed.lab.try_wait(r.client).unwrap().is_none(),
        "the client is still running"
    );
    assert_eq!(
        seen(&seed),
        EXIT_PUBLIC.to_string(),
        "still on the exit node"
    );
}

#[test]
fn an_exit_node_forwards_only_for_peers_the_map_allows() {
    let (mut seed, net) = setup("dp_refuse", SeedOptions::default());
    let refuse = NodeOpts {
        refuse_exit_to: vec!["client".into()],
        ..NodeOpts::default()
    };
    let exit = net.start(&mut seed.lab, "exit", &refuse).unwrap();
    let client = net.start(&mut seed.lab, "client", &exit_opts()).unwrap();
    let _web = whoami_server(&seed.ns(role::WEB), web()).unwrap();
    let client_ns = seed.ns(role::CLIENT);
    // The tunnel itself works (tailnet traffic is not forwarding) ...
    assert!(tsunagu_lab::ping(
        &client_ns,
        net.node("exit").ip4.into(),
        2,
        T
    ));
    // ... but the exit node does not forward the client's internet traffic.
    let r = http_get(&client_ns, web(), Duration::from_secs(2));
    assert!(
        r.is_err(),
        "forwarded for a peer the map does not allow: {r:?}"
    );
    // Allowed by a new map (reload): forwarded.
    net.reload(&mut seed.lab, exit, "exit", &NodeOpts::default())
        .unwrap();
    assert_eq!(seen(&seed), EXIT_PUBLIC.to_string());
    let _ = client;
}
