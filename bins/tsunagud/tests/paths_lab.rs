//! Paths between tsunagud nodes (root, seed lab, tsunagu-server with its embedded relay
//! on 198.51.100.4): the relay when the cafe drops UDP, the direct path when it does not,
//! and the move between them when the direct path is cut and restored.

mod common;

use common::{peer_line, setup, status_text, tsunagu, wait, web_sees};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{EXIT_PUBLIC, Netns, WEB_ADDR, http_get, whoami_server};

const SERVER: &str = "http://198.51.100.4:8080";

/// Drop all forwarded UDP in the cafe's router (its NAT keeps working for TCP).
fn block_udp(cafe: &Netns) {
    for cmd in [
        "nft add table inet tsunagu_test_block",
        "nft add chain inet tsunagu_test_block blockudp { type filter hook forward priority -10 ; }",
        "nft add rule inet tsunagu_test_block blockudp meta l4proto udp drop",
    ] {
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        cafe.exec(&argv).unwrap();
    }
}

fn unblock_udp(cafe: &Netns) {
    cafe.exec(&["nft", "delete", "table", "inet", "tsunagu_test_block"])
        .unwrap();
}

fn exit_path(ns: &Netns, sock: &std::path::Path) -> String {
    peer_line(&status_text(ns, sock), "dev-m1sk9-s1").unwrap_or_default()
}

#[test]
fn udp_blocked_cafe_goes_through_the_relay_and_moves_with_the_direct_path() {
    let mut j = setup("paths_relay");
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let cafe = j.seed.ns(role::CAFE);
    block_udp(&cafe);
    let key = j.client_key.clone();
    let c = j.start_client(
        "client",
        &[
            "--login-server",
            SERVER,
            "--auth-key",
            &key,
            "--hostname",
            "laptop",
            "--exit-node",
            "dev-m1sk9-s1",
        ],
    );
    let ns = j.seed.ns(role::CLIENT);
    let logs = [c.log.clone(), j.exit_log.clone()];
    let logs: Vec<&std::path::Path> = logs.iter().map(|p| p.as_path()).collect();
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
}
