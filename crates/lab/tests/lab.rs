//! Lab integration tests. They need root (namespaces, veths, nftables), as in CI.
//!
//! Tests run on parallel threads; each uses its own test name, hence its own namespace
//! prefix.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tsunagu_lab::seed::{EXIT6_PUBLIC, role};
use tsunagu_lab::{
    CAFE_PUBLIC, CLIENT_LAN, CONTROL_PUBLIC, EXIT_PUBLIC, EXIT2_PUBLIC, Lab, LabError, Netns,
    PRINTER_LAN, RESOLVER, SeedOptions, Signal, WEB_ADDR, WEB6_ADDR, capture, http_get, ping,
    tcp_connect_ok, tcp_listener, tcp_read, udp_send, udp_sink, whoami_server,
};

const T: Duration = Duration::from_secs(5);

/// Names in `dir` starting with `prefix`.
fn entries_with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_gone(prefix: &str) {
    let ns_prefix = format!("{prefix}-");
    assert_eq!(
        entries_with_prefix("/run/netns", &ns_prefix),
        Vec::<String>::new()
    );
    assert_eq!(
        entries_with_prefix("/etc/netns", &ns_prefix),
        Vec::<String>::new()
    );
    assert_eq!(
        entries_with_prefix("/run/tsunagu-lab", prefix),
        Vec::<String>::new()
    );
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn seed_builds_and_tears_down() {
    let seed = Lab::seed(
        "seed_teardown",
        SeedOptions {
            lan_host: true,
            second_exit: true,
            ..SeedOptions::default()
        },
    )
    .expect("seed builds");
    let prefix = seed.lab.prefix().to_owned();
    let dir = seed.lab.dir().to_owned();
    assert!(dir.is_dir());
    let mut roles = seed.lab.roles();
    roles.sort_unstable();
    assert_eq!(
        roles,
        [
            "cafe", "client", "control", "exit", "exit2", "inet", "printer", "web"
        ]
    );
    for ns in seed.lab.namespaces() {
        assert!(ns.path().exists(), "{}", ns.name);
        assert!(ns.name.starts_with(&format!("{prefix}-")));
        let resolv = fs::read_to_string(ns.etc_dir().join("resolv.conf")).expect("resolv.conf");
        assert!(resolv.contains("nameserver 203.0.113.53"));
    }
    // `ip netns exec` shows the namespace's own resolv.conf to programs.
    let out = seed
        .ns(role::CLIENT)
        .exec(&["cat", "/etc/resolv.conf"])
        .expect("cat");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&RESOLVER.to_string()));
    // The internet router has no way off the island (route lookup only, no traffic).
    let out = seed
        .ns(role::INET)
        .exec_status(&["ip", "route", "get", "192.0.2.1"])
        .expect("ip route get");
    assert!(!out.status.success(), "inet must have no default route");
    // Interfaces have their deterministic names.
    let (cafe, port) = seed.cafe_lan_iface();
    cafe.ip(&["link", "show", "dev", port]).expect("p-client");
    seed.ns(role::CLIENT)
        .ip(&["link", "show", "dev", "eth0"])
        .expect("client eth0");
    assert!(ping(&seed.ns(role::CLIENT), WEB_ADDR.into(), 1, T));
    assert!(ping(&seed.ns(role::EXIT), WEB6_ADDR.into(), 1, T));
    drop(seed);
    assert_gone(&prefix);
    assert!(!dir.exists());
}

#[test]
fn whoami_sees_nat_exit_and_lan() {
    let seed = Lab::seed(
        "whoami",
        SeedOptions {
            lan_host: true,
            second_exit: true,
            ..SeedOptions::default()
        },
    )
    .expect("seed builds");
    let web = seed.ns(role::WEB);
    let _v4 = whoami_server(&web, sa(WEB_ADDR, 80)).expect("whoami v4");
    let _v6 = whoami_server(&web, sa(WEB6_ADDR, 80)).expect("whoami v6");

    let seen = |role: &str, ip: IpAddr| {
        http_get(&seed.ns(role), sa(ip, 80), T).unwrap_or_else(|e| panic!("GET from {role}: {e}"))
    };
    assert_eq!(
        seen(role::CLIENT, WEB_ADDR.into()),
        format!("{CAFE_PUBLIC}\n")
    );
    assert_eq!(
        seen(role::EXIT, WEB_ADDR.into()),
        format!("{EXIT_PUBLIC}\n")
    );
    assert_eq!(
        seen(role::EXIT2, WEB_ADDR.into()),
        format!("{EXIT2_PUBLIC}\n")
    );
    assert_eq!(
        seen(role::CONTROL, WEB_ADDR.into()),
        format!("{CONTROL_PUBLIC}\n")
    );
    assert_eq!(
        seen(role::EXIT, WEB6_ADDR.into()),
        format!("{EXIT6_PUBLIC}\n")
    );

    // No IPv6 way out of the cafe LAN.
    let client = seed.ns(role::CLIENT);
    let started = Instant::now();
    assert!(http_get(&client, sa(WEB6_ADDR, 80), T).is_err());
    assert!(!ping(&client, WEB6_ADDR.into(), 1, Duration::from_secs(1)));
    assert!(started.elapsed() < Duration::from_secs(4));

    // The printer is reachable on the LAN, but not from the internet.
    let printer = seed.ns(role::PRINTER);
    let hello = tcp_listener(&printer, sa(PRINTER_LAN, 9100)).expect("printer listener");
    assert_eq!(
        tcp_read(&client, sa(PRINTER_LAN, 9100), T).expect("read"),
        "hello\n"
    );
    assert_eq!(
        hello.peers().first().map(SocketAddr::ip),
        Some(CLIENT_LAN.into())
    );
    assert!(!tcp_connect_ok(
        &seed.ns(role::EXIT),
        sa(PRINTER_LAN, 9100),
        Duration::from_secs(1)
    ));
}

#[test]
fn lab_dropped_during_panic_removes_namespaces() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let mut lab = Lab::new("panic_drop").expect("lab");
        lab.add_ns("a").expect("ns a");
        lab.add_ns("b").expect("ns b");
        let a = lab.ns("a");
        lab.spawn(&a, &["sleep", "30"], None).expect("spawn");
        tx.send((lab.prefix().to_owned(), lab.dir().to_owned()))
            .expect("send");
        panic!("deliberate panic with a live lab");
    });
    assert!(result.is_err());
    let (prefix, dir) = rx.recv().expect("prefix");
    assert_gone(&prefix);
    // The scratch directory is kept for post-mortems of a failed test.
    assert!(dir.is_dir());
    fs::remove_dir_all(&dir).expect("remove kept scratch dir");
}

#[test]
fn stale_leftovers_are_removed_but_live_labs_kept() {
    const NAME: &str = "stale_cleanup";
    // A leftover of a "crashed" run: namespace, /etc/netns dir, and a process inside.
    let stale_prefix = format!("{}p0n0", Lab::tag(NAME));
    let stale = Netns::new(format!("{stale_prefix}-old"));
    let _ = Command::new("ip")
        .args(["netns", "delete", &stale.name])
        .stderr(Stdio::null())
        .status();
    let ok = Command::new("ip")
        .args(["netns", "add", &stale.name])
        .status()
        .expect("ip netns add");
    assert!(ok.success());
    fs::create_dir_all(stale.etc_dir()).expect("etc dir");
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &stale.name, "sleep", "30"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn orphan");
    // Let it enter the namespace before cleaning up.
    let deadline = Instant::now() + T;
    while stale.pids().map(|p| p.is_empty()).unwrap_or(true) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }

    let mut live = Lab::new(NAME).expect("lab");
    assert!(!stale.path().exists(), "stale namespace must be deleted");
    assert!(
        !stale.etc_dir().exists(),
        "stale /etc/netns dir must be deleted"
    );
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(status) = orphan.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "orphan process was not killed");
        thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success());

    // A second lab of the same test does not touch the first, which is alive.
    let a = live.add_ns("a").expect("ns");
    let second = Lab::new(NAME).expect("second lab");
    assert_ne!(second.prefix(), live.prefix());
    assert!(a.path().exists(), "live lab's namespace must survive");
    drop(second);
    let prefix = live.prefix().to_owned();
    drop(live);
    assert_gone(&prefix);
    assert_gone(&stale_prefix);
}

#[test]
fn cafe_blocking_udp_drops_udp_but_passes_tcp() {
    let seed = Lab::seed(
        "cafe_udp_block",
        SeedOptions {
            cafe_blocks_udp: true,
            ..SeedOptions::default()
        },
    )
    .expect("seed builds");
    let web = seed.ns(role::WEB);
    let dns = udp_sink(&web, sa(RESOLVER, 53)).expect("udp sink");
    let _whoami = whoami_server(&web, sa(WEB_ADDR, 80)).expect("whoami");

    udp_send(&seed.ns(role::CLIENT), &[sa(RESOLVER, 53)], b"query", 5).expect("send");
    // The same datagrams from the exit node arrive, so the sink itself works.
    udp_send(&seed.ns(role::EXIT), &[sa(RESOLVER, 53)], b"query", 3).expect("send");
    assert!(dns.wait_for_count(3, T));
    thread::sleep(Duration::from_millis(200));
    assert_eq!(dns.count(), 3, "client UDP must be dropped by the cafe");
    assert!(
        dns.peers()
            .iter()
            .all(|p| p.ip() == IpAddr::from(EXIT_PUBLIC))
    );

    let seen = http_get(&seed.ns(role::CLIENT), sa(WEB_ADDR, 80), T).expect("TCP passes");
    assert_eq!(seen.trim(), CAFE_PUBLIC.to_string());
}

/// The public (post-NAT) ports the internet sees for one client socket talking to three
/// destinations.
fn nat_ports(test_name: &str, symmetric_nat: bool) -> (u16, Vec<u16>) {
    let seed = Lab::seed(
        test_name,
        SeedOptions {
            symmetric_nat,
            ..SeedOptions::default()
        },
    )
    .expect("seed builds");
    let web = seed.ns(role::WEB);
    let targets = [
        sa(WEB_ADDR, 5000),
        sa(RESOLVER, 5000),
        sa(EXIT_PUBLIC, 5000),
    ];
    let sinks = [
        udp_sink(&web, targets[0]).expect("sink"),
        udp_sink(&web, targets[1]).expect("sink"),
        udp_sink(&seed.ns(role::EXIT), targets[2]).expect("sink"),
    ];
    let local = udp_send(&seed.ns(role::CLIENT), &targets, b"probe", 1).expect("send");
    let ports = sinks
        .iter()
        .map(|sink| {
            assert!(sink.wait_for_count(1, T), "datagram did not arrive");
            let peer = sink.peers()[0];
            assert_eq!(peer.ip(), IpAddr::from(CAFE_PUBLIC));
            peer.port()
        })
        .collect();
    (local.port(), ports)
}

#[test]
fn normal_nat_keeps_one_mapping_per_socket() {
    let (local, ports) = nat_ports("nat_normal", false);
    assert!(ports.iter().all(|&p| p == ports[0]), "{ports:?}");
    assert_eq!(
        ports[0], local,
        "plain masquerade preserves the source port"
    );
}

#[test]
fn symmetric_nat_maps_each_destination_differently() {
    let (_, ports) = nat_ports("nat_symmetric", true);
    assert!(ports.iter().any(|&p| p != ports[0]), "{ports:?}");
}

#[test]
fn processes_iperf_and_capture() {
    let mut seed = Lab::seed("procs", SeedOptions::default()).expect("seed builds");
    let client = seed.ns(role::CLIENT);
    let web = seed.ns(role::WEB);
    let exit = seed.ns(role::EXIT);

    // Spawn and kill by PID.
    let sleeper = seed
        .lab
        .spawn(&client, &["sleep", "30"], None)
        .expect("spawn sleep");
    let pid = seed.lab.pid(sleeper);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(seed.lab.try_wait(sleeper).expect("try_wait"), None);
    seed.lab.kill(sleeper, Signal::SIGTERM).expect("kill");
    assert!(seed.lab.try_wait(sleeper).expect("try_wait").is_some());
    seed.lab
        .kill(sleeper, Signal::SIGKILL)
        .expect("no-op on exited");
    assert!(matches!(
        seed.lab.kill(sleeper, Signal::SIGHUP),
        Err(LabError::ProcessExited { .. })
    ));

    // Sockets made in Netns::run belong to that namespace.
    assert!(
        web.run(|| std::net::UdpSocket::bind(sa(WEB_ADDR, 0)).is_ok())
            .expect("run")
    );
    assert!(std::net::UdpSocket::bind(sa(WEB_ADDR, 0)).is_err());

    // iperf3 server in web, short bounded client run from the exit node.
    let log = seed.lab.log_path("iperf3-server.log");
    seed.lab
        .spawn(
            &web,
            &["iperf3", "-s", "-B", "203.0.113.10", "--forceflush"],
            Some(&log),
        )
        .expect("iperf3 server");
    let deadline = Instant::now() + T;
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Server listening")
    {
        assert!(Instant::now() < deadline, "iperf3 server did not start");
        thread::sleep(Duration::from_millis(20));
    }
    let out = exit
        .exec_timeout(
            &["iperf3", "-c", "203.0.113.10", "-n", "1M"],
            Duration::from_secs(20),
        )
        .expect("iperf3 client");
    assert!(String::from_utf8_lossy(&out.stdout).contains("receiver"));

    // Capture on the cafe LAN sees the client's pre-NAT address.
    let _whoami = whoami_server(&web, sa(WEB_ADDR, 80)).expect("whoami");
    let (cafe, iface) = seed.cafe_lan_iface();
    let pcap = seed.lab.log_path("lan.pcap");
    let cap = capture(&mut seed.lab, &cafe, iface, &pcap).expect("capture");
    http_get(&client, sa(WEB_ADDR, 80), T).expect("GET");
    let lines = cap.finish(&mut seed.lab).expect("finish");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("198.18.1.10.") && l.contains("203.0.113.10.80")),
        "{lines:#?}"
    );
}

#[test]
fn errors_are_typed_and_explicit() {
    let mut lab = Lab::new("errors").expect("lab");
    let a = lab.add_ns("a").expect("ns");
    let b = lab.add_ns("b").expect("ns");
    assert!(matches!(lab.add_ns("a"), Err(LabError::DuplicateRole(_))));
    assert!(matches!(
        lab.add_ns("bad role"),
        Err(LabError::Invalid { .. })
    ));

    match a.exec(&["ip", "link", "show", "dev", "nonexistent0"]) {
        Err(LabError::Command { cmd, stderr, .. }) => {
            assert!(cmd.contains("ip netns exec"), "{cmd}");
            assert!(stderr.contains("nonexistent0"), "{stderr}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    let out = a.exec_status(&["sh", "-c", "exit 7"]).expect("runs");
    assert_eq!(out.status.code(), Some(7));
    assert!(matches!(
        a.exec(&["tsunagu-lab-no-such-tool"]),
        Err(LabError::MissingTool { .. })
    ));

    // Addresses outside the lab plan and over-long names are refused before any command.
    assert!(matches!(
        lab.link((&a, "x0", &["10.0.0.1/8"]), (&b, "x1", &[])),
        Err(LabError::Invalid { .. })
    ));
    assert!(matches!(
        lab.link((&a, "a_very_long_name0", &[]), (&b, "x1", &[])),
        Err(LabError::Invalid { .. })
    ));
    let foreign = Netns::new("not-ours");
    assert!(matches!(
        lab.spawn(&foreign, &["true"], None),
        Err(LabError::Invalid { .. })
    ));
    lab.link(
        (&a, "x0", &["198.18.9.1/24", "2001:db8:9::1/64"]),
        (&b, "x1", &["198.18.9.2/24", "2001:db8:9::2/64"]),
    )
    .expect("link");
    assert!(ping(&a, "198.18.9.2".parse().expect("ip"), 1, T));
    assert!(ping(&b, "2001:db8:9::1".parse().expect("ip"), 1, T));
    assert!(std::panic::catch_unwind(|| lab.ns("missing")).is_err());
}

#[test]
fn a_public_host_joins_the_bridge() {
    let mut seed = Lab::seed("seed_public_host", SeedOptions::default()).expect("seed builds");
    let relay2 = seed
        .add_public_host("relay2", tsunagu_lab::RELAY2_PUBLIC)
        .expect("a free public address");
    assert!(seed.lab.owns(&relay2));
    // Reachable from behind the cafe's NAT, and it reaches the web server.
    assert!(ping(
        &seed.ns(role::CLIENT),
        tsunagu_lab::RELAY2_PUBLIC.into(),
        1,
        T
    ));
    assert!(ping(&relay2, WEB_ADDR.into(), 1, T));
    // Addresses of the seed, or outside the public /24, are refused.
    for taken in [CONTROL_PUBLIC, std::net::Ipv4Addr::new(198, 18, 1, 7)] {
        let e = seed.add_public_host("relay3", taken).unwrap_err();
        assert!(matches!(e, LabError::Invalid { .. }), "{e}");
    }
}
