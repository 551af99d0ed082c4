//! Two relay regions (root, seed lab with the home NAT): the server's embedded relay on
//! 198.51.100.4 is region 900 "tsunagu", a standalone `tsunagu-server relay` on
//! 198.51.100.7 (its own namespace) is region 901 "b", listed in the server's DERP map.
//! The laptop (cafe) homes on 900, the desktop (home LAN, `--home-relay b`) on 901, and
//! both routers drop UDP: the nodes reach each other only through relays, each sending
//! to the other's home region over a connection it opens for that and closes when idle.

mod common;

use common::{block_udp, peer_line, status_text, tsunagu, wait};
use std::path::Path;
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{Netns, RELAY2_PUBLIC, SeedOptions, http_get, whoami_server};

/// The idle time of region connections in this test (the default is 60 s).
const IDLE_SECS: u64 = 3;

fn status_json(ns: &Netns, sock: &Path) -> serde_json::Value {
    let out = tsunagu(ns, sock, &["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The node's relay connections as (region, home, connected).
fn relays(ns: &Netns, sock: &Path) -> Vec<(u64, bool, bool)> {
    let v = status_json(ns, sock);
    v["relays"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["region"].as_u64().unwrap_or(0),
                        r["home"] == true,
                        r["connected"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Established TCP connections from `ns` to `ip` (the kernel's view, not the daemon's).
fn tcp_to(ns: &Netns, ip: &str) -> usize {
    let out = ns
        .exec(&["ss", "-Htn", "state", "established", "dst", ip])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// The node keys the embedded relay (region 900) has as clients, with their home flag.
fn relay_a_clients(j: &common::Joined) -> Vec<(String, bool)> {
    let v: serde_json::Value =
        serde_json::from_str(&j.admin(&["--json", "relay-status"])).unwrap_or_default();
    v["clients"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["node_key"].as_str().unwrap_or_default().to_string(),
                        c["home"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn logs(paths: &[&Path]) -> String {
    paths
        .iter()
        .map(|p| {
            format!(
                "--- {}:\n{}",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The seed lab with the server (region 900) and region 901 "b": a standalone relay (with
/// STUN) on 198.51.100.7 in its own namespace, listed in the server's DERP map. Returns the
/// tailnet and the relay's log.
fn with_region_b(test: &str, opts: SeedOptions) -> (common::Joined, std::path::PathBuf) {
    let b = format!("id=901,code=b,name=Region B,host={RELAY2_PUBLIC},derp_port=8080,http");
    let mut j = common::setup_with_server_args(test, common::POLICY, opts, &["--derp-region", &b]);
    let relay_ns = j.seed.add_public_host("relay2", RELAY2_PUBLIC).unwrap();
    let relay_data = j.seed.lab.log_path("relay2-data");
    let relay_log = j.seed.lab.log_path("relay2.log");
    let listen = format!("{RELAY2_PUBLIC}:8080");
    let server = common::server_bin();
    j.seed
        .lab
        .spawn(
            &relay_ns,
            &[
                server.to_str().unwrap(),
                "--data-dir",
                relay_data.to_str().unwrap(),
                "relay",
                "--listen",
                &listen,
            ],
            Some(&relay_log),
        )
        .unwrap();
    (j, relay_log)
}

/// With STUN servers at two addresses (the two regions), netcheck tells the NAT's
/// mapping behaviour: the cafe's ordinary NAT keeps one mapping for every destination,
/// a symmetric one (`masquerade random`) does not.
#[test]
fn netcheck_tells_the_nat_mapping_with_two_regions() {
    for (symmetric, want) in [(false, "false"), (true, "true")] {
        let opts = SeedOptions {
            symmetric_nat: symmetric,
            ..SeedOptions::default()
        };
        let name = if symmetric {
            "regions_nc_sym"
        } else {
            "regions_nc"
        };
        let (mut j, _relay_log) = with_region_b(name, opts);
        let c = j.join_laptop(&[]);
        let ns = j.seed.ns(role::CLIENT);
        let mut nc = String::new();
        wait(
            "netcheck hears both STUN servers",
            Duration::from_secs(30),
            || {
                let out = tsunagu(&ns, &c.sock, &["netcheck"]);
                nc = String::from_utf8_lossy(&out.stdout).into_owned();
                !nc.contains("MappingVariesByDestIP: unknown")
                    && nc.contains("- b: ")
                    && nc.contains("- tsunagu: ")
            },
        );
        assert!(nc.contains("* UDP: true"), "{nc}");
        assert!(
            nc.contains(&format!("* MappingVariesByDestIP: {want}")),
            "symmetric NAT {symmetric}:\n{nc}"
        );
        eprintln!("symmetric NAT {symmetric}:\n{nc}");
    }
}

#[test]
fn nodes_homed_on_two_regions_reach_each_other_and_idle_region_connections_close() {
    let opts = SeedOptions {
        home_nat: true,
        cafe_blocks_udp: true,
        ..SeedOptions::default()
    };
    let (mut j, relay_log) = with_region_b("regions_two", opts);
    block_udp(&j.seed.ns(role::HOME));

    let idle = IDLE_SECS.to_string();
    let (k1, k2) = (j.client_key.clone(), j.new_key());
    let a = j.join(
        role::CLIENT,
        "laptop",
        "laptop",
        &k1,
        &["--relay-idle-timeout", &idle],
    );
    let d = j.join(
        role::CLIENT2,
        "desktop",
        "desktop",
        &k2,
        &["--home-relay", "b", "--relay-idle-timeout", &idle],
    );
    let (ns_a, ns_d) = (j.seed.ns(role::CLIENT), j.seed.ns(role::CLIENT2));
    let all_logs = || {
        logs(&[
            a.log.as_path(),
            d.log.as_path(),
            relay_log.as_path(),
            j.server_log.as_path(),
        ])
    };

    // Each homes where it should, and the server (so each peer) knows it.
    wait(
        "both homes known to the server",
        Duration::from_secs(30),
        || {
            j.nodes().as_array().is_some_and(|n| {
                let home = |name: &str| {
                    n.iter()
                        .find(|x| x["name"] == name)
                        .map(|x| x["home_derp"].clone())
                };
                home("laptop") == Some(900.into()) && home("desktop") == Some(901.into())
            })
        },
    );
    wait(
        "the peers in each other's map",
        Duration::from_secs(30),
        || {
            peer_line(&status_text(&ns_a, &a.sock), "desktop").is_some()
                && peer_line(&status_text(&ns_d, &d.sock), "laptop").is_some()
        },
    );
    // WireGuard's first handshake (for the persistent keepalive) opens the other's
    // region briefly; without traffic only the home connections remain.
    wait(
        "only the home connections",
        Duration::from_secs(IDLE_SECS + 12),
        || {
            relays(&ns_a, &a.sock) == [(900, true, true)]
                && relays(&ns_d, &d.sock) == [(901, true, true)]
        },
    );
    let desktop_ip = status_json(&ns_a, &a.sock)["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["name"] == "desktop"))
        .map(|x| x["ip"].as_str().unwrap().to_string())
        .unwrap();
    let laptop_ip = status_json(&ns_a, &a.sock)["self"]["addresses"][0]
        .as_str()
        .map(String::from)
        .unwrap();
    let desktop_key = j
        .nodes()
        .as_array()
        .and_then(|n| n.iter().find(|x| x["name"] == "desktop"))
        .map(|x| x["node_key"].as_str().unwrap().to_string())
        .unwrap();

    // ICMP through the tailnet, over the desktop's region b.
    let t = Instant::now();
    let out = tsunagu(
        &ns_a,
        &a.sock,
        &["ping", "-c", "3", "--timeout=5s", "desktop"],
    );
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{pong}\n{}", all_logs());
    assert!(pong.contains("via relay \"b\""), "{pong}");
    eprintln!(
        "first pongs across regions after {:?}:\n{pong}",
        t.elapsed()
    );
    // TCP through the tailnet: the desktop's web server sees the laptop's tailnet address.
    let _web = whoami_server(
        &ns_d,
        (desktop_ip.parse::<std::net::IpAddr>().unwrap(), 80).into(),
    )
    .unwrap();
    let seen = http_get(
        &ns_a,
        (desktop_ip.parse::<std::net::IpAddr>().unwrap(), 80).into(),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("HTTP to the desktop over the tailnet: {e}\n{}", all_logs()));
    assert_eq!(seen.trim(), laptop_ip);

    // Each sends through the other's home region, and says so.
    let line = peer_line(&status_text(&ns_a, &a.sock), "desktop").unwrap();
    assert!(line.contains("relay \"b\""), "{line}");
    let line = peer_line(&status_text(&ns_d, &d.sock), "laptop").unwrap();
    assert!(line.contains("relay \"tsunagu\""), "{line}");
    let out = tsunagu(
        &ns_d,
        &d.sock,
        &["ping", "-c", "2", "--timeout=5s", "laptop"],
    );
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && pong.contains("via relay \"tsunagu\""),
        "{pong}"
    );
    // ... over a second connection, besides home: in the daemons' view, the kernel's,
    // and the relays' (the embedded relay has the desktop as a client not homed there).
    assert_eq!(
        relays(&ns_a, &a.sock),
        [(900, true, true), (901, false, true)]
    );
    assert_eq!(
        relays(&ns_d, &d.sock),
        [(901, true, true), (900, false, true)]
    );
    assert_eq!(tcp_to(&ns_a, &RELAY2_PUBLIC.to_string()), 1);
    assert!(
        relay_a_clients(&j).contains(&(desktop_key.clone(), false)),
        "{:?}",
        relay_a_clients(&j)
    );

    // Quiet: both region connections close after the idle time (WireGuard's persistent
    // keepalives do not keep them), and only those.
    let t = Instant::now();
    wait(
        "the region connections closed when idle",
        Duration::from_secs(IDLE_SECS + 12),
        || relays(&ns_a, &a.sock).len() == 1 && relays(&ns_d, &d.sock).len() == 1,
    );
    eprintln!(
        "idle region connections closed {:?} after the last ping",
        t.elapsed()
    );
    assert_eq!(relays(&ns_a, &a.sock), [(900, true, true)]);
    assert_eq!(relays(&ns_d, &d.sock), [(901, true, true)]);
    wait("the sockets gone", Duration::from_secs(3), || {
        tcp_to(&ns_a, &RELAY2_PUBLIC.to_string()) == 0
    });
    wait(
        "the desktop gone from region 900",
        Duration::from_secs(3),
        || !relay_a_clients(&j).iter().any(|(k, _)| *k == desktop_key),
    );
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("relay connection closed") && l.contains("\"idle\"")),
        "{log}"
    );
    // They stay closed while nothing is sent: WireGuard's persistent keepalive (25 s
    // after the last packet) is dropped instead of reopening them.
    let drops = |ns: &Netns, sock: &Path| {
        status_json(ns, sock)["counters"]["relay_drops"]
            .as_u64()
            .unwrap_or(0)
    };
    let (drops_a, drops_d) = (drops(&ns_a, &a.sock), drops(&ns_d, &d.sock));
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(27) {
        assert_eq!(relays(&ns_a, &a.sock), [(900, true, true)]);
        assert_eq!(relays(&ns_d, &d.sock), [(901, true, true)]);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        drops(&ns_a, &a.sock) > drops_a && drops(&ns_d, &d.sock) > drops_d,
        "a persistent keepalive was due on both sides"
    );

    // Traffic again: the connection opens again on demand.
    let out = tsunagu(
        &ns_a,
        &a.sock,
        &["ping", "-c", "2", "--timeout=5s", "desktop"],
    );
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{pong}\n{}", all_logs());
    assert!(pong.contains("via relay \"b\""), "{pong}");
    assert!(relays(&ns_a, &a.sock).contains(&(901, false, true)));
}
