//! Paths between tsunagud nodes (root, seed lab, tsunagu-server with its embedded relay
//! on 198.51.100.4): the relay when the cafe drops UDP, the direct path when it does not,
//! and the move between them when the direct path is cut and restored.

mod common;

use common::{block_udp, peer_line, setup, status_text, tsunagu, unblock_udp, wait, web_sees};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{EXIT_PUBLIC, Netns, WEB_ADDR, http_get, whoami_server};

fn exit_path(ns: &Netns, sock: &std::path::Path) -> String {
    peer_line(&status_text(ns, sock), "dev-m1sk9-s1").unwrap_or_default()
}

#[test]
fn udp_blocked_cafe_goes_through_the_relay_and_moves_with_the_direct_path() {
    let mut j = setup("paths_relay");
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let cafe = j.seed.ns(role::CAFE);
    block_udp(&cafe);
    let c = j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    let ns = j.seed.ns(role::CLIENT);
    let logs = [c.log.clone(), j.exit_log.clone()];
    // Exit-node traffic to the internet, over TCP to the relay only.
    web_sees(&ns, EXIT_PUBLIC, &logs);
    let line = exit_path(&ns, &c.sock);
    assert!(line.contains("relay \"tsunagu\""), "{line}");
    assert!(line.contains("; exit node"), "{line}");
    let pong = String::from_utf8_lossy(
        &tsunagu(&ns, &c.sock, &["ping", "-c", "2", "dev-m1sk9-s1"]).stdout,
    )
    .into_owned();
    assert!(pong.contains("via relay \"tsunagu\""), "{pong}");
    // netcheck: no UDP, the relay still measured (over TCP).
    let nc = String::from_utf8_lossy(&tsunagu(&ns, &c.sock, &["netcheck"]).stdout).into_owned();
    eprintln!("{nc}");
    assert!(nc.contains("* UDP: false"), "{nc}");
    assert!(nc.contains("* Nearest DERP: tsunagu"), "{nc}");
    assert!(nc.contains("- tsunagu: "), "{nc}");

    // UDP allowed again: the direct path is found and used.
    unblock_udp(&cafe);
    let t = Instant::now();
    wait("the direct path", Duration::from_secs(10), || {
        let _ = http_get(&ns, (WEB_ADDR, 80).into(), Duration::from_millis(500));
        exit_path(&ns, &c.sock).contains("direct 198.51.100.2:41641")
    });
    eprintln!("relay -> direct after {:?}", t.elapsed());
    web_sees(&ns, EXIT_PUBLIC, &logs);

    // The direct path cut mid-transfer: the relay carries on within 3 s.
    block_udp(&cafe);
    let t = Instant::now();
    wait("back on the relay", Duration::from_secs(3), || {
        let _ = http_get(&ns, (WEB_ADDR, 80).into(), Duration::from_millis(300));
        exit_path(&ns, &c.sock).contains("relay \"tsunagu\"")
    });
    eprintln!("direct -> relay after {:?}", t.elapsed());
    web_sees(&ns, EXIT_PUBLIC, &logs);

    // The relay (embedded in the server) restarts: both nodes reconnect by themselves
    // and traffic flows through it again.
    j.seed
        .lab
        .kill(j.server, tsunagu_lab::Signal::SIGKILL)
        .unwrap();
    j.restart_server();
    let t = Instant::now();
    web_sees(&ns, EXIT_PUBLIC, &logs);
    eprintln!("through the restarted relay after {:?}", t.elapsed());
    assert!(exit_path(&ns, &c.sock).contains("relay \"tsunagu\""));
}

#[test]
fn behind_the_cafe_nat_the_path_to_a_public_exit_node_is_direct_and_netcheck_sees_the_nat() {
    let mut j = setup("paths_direct");
    let start = Instant::now();
    let c = j.join_laptop(&[]);
    let ns = j.seed.ns(role::CLIENT);
    wait("the exit node in the map", Duration::from_secs(30), || {
        peer_line(&status_text(&ns, &c.sock), "dev-m1sk9-s1").is_some()
    });
    let joined = start.elapsed();
    wait("a direct path", Duration::from_secs(5), || {
        let _ = tsunagu(
            &ns,
            &c.sock,
            &["ping", "-c", "1", "--timeout=500ms", "dev-m1sk9-s1"],
        );
        exit_path(&ns, &c.sock).contains("direct 198.51.100.2:41641")
    });
    eprintln!(
        "joined after {joined:?}, direct after {:?}",
        start.elapsed()
    );
    // STUN through the WireGuard socket sees the cafe's public address.
    let out = tsunagu(&ns, &c.sock, &["netcheck", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["udp"], true, "{v}");
    assert!(
        v["ipv4"]
            .as_str()
            .is_some_and(|a| a.starts_with("198.51.100.3:")),
        "the cafe's public address: {v}"
    );
    // ... and the server has it as one of the laptop's endpoints, for peers to try.
    wait(
        "the public endpoint reported",
        Duration::from_secs(30),
        || {
            j.nodes().as_array().is_some_and(|a| {
                a.iter()
                    .any(|n| n["name"] == "laptop" && n.to_string().contains("198.51.100.3:"))
            })
        },
    );
}

#[test]
fn symmetric_nat_stays_on_a_working_path() {
    let opts = tsunagu_lab::SeedOptions {
        symmetric_nat: true,
        ..tsunagu_lab::SeedOptions::default()
    };
    let mut j = common::setup_full("paths_symmetric", common::POLICY, opts);
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let c = j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    let ns = j.seed.ns(role::CLIENT);
    let logs = [c.log.clone(), j.exit_log.clone()];
    web_sees(&ns, EXIT_PUBLIC, &logs);
    // It keeps working for a while, whatever path it settled on.
    for _ in 0..10 {
        let body = http_get(&ns, (WEB_ADDR, 80).into(), Duration::from_secs(2)).unwrap();
        assert_eq!(body.trim(), EXIT_PUBLIC.to_string());
        std::thread::sleep(Duration::from_millis(300));
    }
    let line = exit_path(&ns, &c.sock);
    assert!(
        line.contains("relay \"tsunagu\"") || line.contains("direct "),
        "{line}"
    );
}

/// Two laptops, one in the cafe and one at home, each behind its own NAT.
fn two_nats(test: &str, symmetric: bool) -> (common::Joined, common::Client, common::Client) {
    let opts = tsunagu_lab::SeedOptions {
        home_nat: true,
        symmetric_nat: symmetric,
        ..tsunagu_lab::SeedOptions::default()
    };
    let mut j = common::setup_full(test, common::POLICY, opts);
    let (k1, k2) = (j.client_key.clone(), j.new_key());
    let a = j.join(role::CLIENT, "laptop", "laptop", &k1, &[]);
    let b = j.join(role::CLIENT2, "desktop", "desktop", &k2, &[]);
    let ns = j.seed.ns(role::CLIENT);
    wait(
        "the two laptops see each other",
        Duration::from_secs(30),
        || peer_line(&status_text(&ns, &a.sock), "desktop").is_some(),
    );
    (j, a, b)
}

fn desktop_path(ns: &Netns, sock: &std::path::Path) -> String {
    peer_line(&status_text(ns, sock), "desktop").unwrap_or_default()
}

#[test]
fn two_clients_behind_their_own_nats_punch_a_direct_path() {
    let (j, a, _b) = two_nats("paths_punch", false);
    let ns = j.seed.ns(role::CLIENT);
    let t = Instant::now();
    let pong = String::from_utf8_lossy(
        &tsunagu(
            &ns,
            &a.sock,
            &["ping", "-c", "1", "--timeout=3s", "desktop"],
        )
        .stdout,
    )
    .into_owned();
    assert!(pong.contains("pong from desktop"), "{pong}");
    // Both report their public endpoint (STUN); probes from both sides open the NATs.
    wait(
        "a direct path through both NATs",
        Duration::from_secs(20),
        || {
            let _ = tsunagu(
                &ns,
                &a.sock,
                &["ping", "-c", "1", "--timeout=500ms", "desktop"],
            );
            desktop_path(&ns, &a.sock).contains("direct 198.51.100.5:")
        },
    );
    eprintln!("hole punched after {:?}", t.elapsed());
    let out = tsunagu(&ns, &a.sock, &["ping", "-c", "2", "desktop"]);
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{pong}");
    assert!(pong.contains("via 198.51.100.5:"), "{pong}");
}

#[test]
fn symmetric_nats_on_both_sides_stay_on_the_relay_and_keep_working() {
    let (j, a, _b) = two_nats("paths_symmetric2", true);
    let ns = j.seed.ns(role::CLIENT);
    for _ in 0..8 {
        let out = tsunagu(
            &ns,
            &a.sock,
            &["ping", "-c", "1", "--timeout=2s", "desktop"],
        );
        let pong = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{pong}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let line = desktop_path(&ns, &a.sock);
    assert!(line.contains("relay \"tsunagu\""), "{line}");
}
