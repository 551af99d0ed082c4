//! The official Tailscale client (`tailscaled` + `tailscale`, v1.102.5: the engine inside
//! every official app) with tsunagu-server over HTTPS and a tsunagud exit node, in the
//! seed lab (root). The official client is the judge of what members get: these tests
//! run the seed's steps with its own CLI and read its own output.

mod common;

use common::official_up as up;
use common::{
    POLICY, Transport, official, official_exit, peer_line, setup_over, status_text, tsunagu, wait,
};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, EXIT_PUBLIC, EXIT2_PUBLIC, PRINTER_LAN, SeedOptions, Tailscaled, WEB_ADDR,
    http_get, whoami_server,
};

/// The line of `tailscale status` naming `host`.
fn status_line(ts: &Tailscaled, host: &str) -> Option<String> {
    let text = ts.cli(&["status"]).ok()?;
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(host))
        .map(String::from)
}

/// What the web server answers `ns` within one second, if anything.
fn web_answer(ns: &tsunagu_lab::Netns) -> Option<String> {
    http_get(ns, (WEB_ADDR, 80).into(), Duration::from_secs(1))
        .ok()
        .map(|b| b.trim().to_string())
}

/// Polls (bounded: 30 s) until the web server reports `want` as our source.
fn web_sees(ns: &tsunagu_lab::Netns, want: std::net::Ipv4Addr, ts: &Tailscaled) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(30) {
        last = web_answer(ns);
        if last.as_deref() == Some(want.to_string().as_str()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the web server saw {last:?}, not {want}\n{}",
        ts.log_tail(80)
    );
}

/// The seed, verbatim, with the official CLI: `tailscale up` against tsunagu-server on
/// HTTPS, `tailscale status` shows the tagged tsunagud exit node, selecting it by name and
/// by IP moves the member's internet traffic there, LAN access is kept only when asked
/// for, `exit-node list` lists it, clearing it restores the cafe's address.
#[test]
fn official_client_uses_a_tsunagud_exit_node() {
    let mut j = setup_over(
        "official_seed",
        POLICY,
        SeedOptions {
            lan_host: true,
            ..SeedOptions::default()
        },
        &[],
        Transport::Https,
    );
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let _printer = whoami_server(&j.seed.ns(role::PRINTER), (PRINTER_LAN, 80).into()).unwrap();
    let client = j.seed.ns(role::CLIENT);
    let ts = official(&mut j, role::CLIENT, "laptop", &[]);
    let key = j.client_key.clone();
    let url = j.url.clone();
    up(&ts, &url, &key, "laptop", &[]);
    assert_eq!(web_answer(&client).as_deref(), Some("198.51.100.3"));

    let list = ts.cli(&["exit-node", "list"]).unwrap();
    assert!(
        list.lines().any(|l| l.contains("dev-m1sk9-s1")),
        "exit-node list:\n{list}"
    );
    let exit_ip = list
        .lines()
        .find(|l| l.contains("dev-m1sk9-s1"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(exit_ip.starts_with("100."), "{list}");

    ts.cli(&["set", "--exit-node=dev-m1sk9-s1"]).unwrap();
    web_sees(&client, EXIT_PUBLIC, &ts);
    let line = status_line(&ts, "dev-m1sk9-s1").unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[0], exit_ip, "{line}");
    assert_eq!(&words[2..4], ["tagged-devices", "linux"], "{line}");
    let rest = words[4..].join(" ");
    assert!(
        rest.starts_with("active; exit node; direct 198.51.100.2:"),
        "{line}"
    );
    // Without LAN access the cafe's printer is out of reach (its traffic goes to the
    // exit node); with it, the printer answers while the internet still leaves there.
    assert_eq!(
        http_get(&client, (PRINTER_LAN, 80).into(), Duration::from_secs(2)).ok(),
        None
    );
    ts.cli(&["set", "--exit-node-allow-lan-access=true"])
        .unwrap();
    wait("the printer reachable", Duration::from_secs(10), || {
        http_get(&client, (PRINTER_LAN, 80).into(), Duration::from_secs(1)).is_ok()
    });
    web_sees(&client, EXIT_PUBLIC, &ts);

    ts.cli(&["set", "--exit-node="]).unwrap();
    web_sees(&client, CAFE_PUBLIC, &ts);
    ts.cli(&["set", &format!("--exit-node={exit_ip}")]).unwrap();
    web_sees(&client, EXIT_PUBLIC, &ts);
    ts.cli(&["set", "--exit-node="]).unwrap();
    web_sees(&client, CAFE_PUBLIC, &ts);

    // A clean stop leaves nothing of the official daemon in the namespace.
    ts.stop(&mut j.seed.lab, false).unwrap();
    let left = Tailscaled::leftovers(&client).unwrap();
    assert!(left.is_empty(), "{left:#?}");
}

/// The other way round: an official `tailscaled --advertise-exit-node`, approved with
/// `tsunagu-server nodes approve-exit`, is used by tsunagud through `tsunagu set
/// --exit-node=`, and `tsunagu status` shows it as the seed does.
#[test]
fn tsunagud_uses_an_official_exit_node() {
    let mut j = setup_over(
        "official_rev",
        POLICY,
        SeedOptions {
            second_exit: true,
            ..SeedOptions::default()
        },
        &[],
        Transport::Https,
    );
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let off = official_exit(&mut j, role::EXIT2, "official-exit");
    let c = j.join_laptop(&[]);
    let ns = j.seed.ns(role::CLIENT);
    wait(
        "the official exit node offered",
        Duration::from_secs(30),
        || {
            peer_line(&status_text(&ns, &c.sock), "official-exit")
                .is_some_and(|l| l.contains("offers exit node"))
        },
    );
    let out = tsunagu(&ns, &c.sock, &["set", "--exit-node=official-exit"]);
    assert!(out.status.success(), "{out:?}");
    common::web_sees(&ns, EXIT2_PUBLIC, &[c.log.clone(), off.log.clone()]);
    // Traffic may start over the relay; the path goes direct within seconds (bounded).
    let mut line = String::new();
    let direct = "active; exit node; direct 198.51.100.6:41641";
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        line = peer_line(&status_text(&ns, &c.sock), "official-exit").unwrap_or_default();
        if line.contains(direct) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words[0].starts_with("100."), "{line}");
    assert_eq!(&words[2..4], ["admin", "linux"], "{line}");
    assert!(
        words[4..]
            .join(" ")
            .starts_with("active; exit node; direct 198.51.100.6:41641"),
        "{line}"
    );
    let out = tsunagu(&ns, &c.sock, &["set", "--exit-node="]);
    assert!(out.status.success(), "{out:?}");
    common::web_sees(&ns, CAFE_PUBLIC, std::slice::from_ref(&c.log));
}

/// The cafe-LAN lines that are not the official client's tunnel to the exit node, its
/// control connection (HTTPS), its relay (TLS on the same port) or STUN.
fn official_leaks(lines: &[String], exit_ep: &str) -> Vec<String> {
    tsunagu_lab::tunnel_leaks(
        lines,
        tsunagu_lab::CLIENT_LAN,
        exit_ep,
        &["198.51.100.4.443", "198.51.100.4.3478"],
    )
}

/// The seed's danger box with the official client pinned to a tsunagud exit node: while
/// the exit node restarts, the member's internet traffic fails closed (nothing leaves the
/// cafe LAN outside the tunnel, before, during or after), and it flows again within 5 s
/// of the exit node's return. The same restart of an official exit node, in the same lab,
/// is measured beside it.
#[test]
fn official_client_fails_closed_while_its_exit_node_restarts() {
    let mut j = setup_over(
        "official_restart",
        POLICY,
        SeedOptions {
            second_exit: true,
            ..SeedOptions::default()
        },
        &[],
        Transport::Https,
    );
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    let client = j.seed.ns(role::CLIENT);
    let ts = official(&mut j, role::CLIENT, "laptop", &[]);
    let (key, url) = (j.client_key.clone(), j.url.clone());
    up(&ts, &url, &key, "laptop", &[]);
    ts.cli(&["set", "--exit-node=dev-m1sk9-s1"]).unwrap();
    web_sees(&client, EXIT_PUBLIC, &ts);

    let (cafe, port) = j.seed.cafe_lan_iface();
    let pcap = j.seed.lab.log_path("cafe.pcap");
    let cap = tsunagu_lab::capture(&mut j.seed.lab, &cafe, port, &pcap).unwrap();
    for _ in 0..5 {
        assert_eq!(web_answer(&client).as_deref(), Some("198.51.100.2"));
    }
    // The scheduled restart: the exit node stops, stays down for 3 s, comes back.
    j.seed
        .lab
        .kill(j.exit, tsunagu_lab::Signal::SIGTERM)
        .unwrap();
    let down = Instant::now();
    let mut attempts = 0;
    while down.elapsed() < Duration::from_secs(3) {
        attempts += 1;
        let got = web_answer(&client);
        assert_eq!(got, None, "traffic left while the exit node was down");
    }
    assert!(attempts >= 2);
    j.restart_exit();
    let back = Instant::now();
    while web_answer(&client).as_deref() != Some("198.51.100.2") {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "no traffic within 5 s of the exit node's return\n{}",
            ts.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tsunagud_back = back.elapsed();
    let lines = cap.finish(&mut j.seed.lab).unwrap();
    let leaked = official_leaks(&lines, "198.51.100.2.41641");
    assert!(leaked.is_empty(), "outside the tunnel: {leaked:#?}");
    assert!(lines.len() > 10, "the capture saw the tunnel: {lines:#?}");

    // The same with an official exit node: it restarts (SIGTERM, 3 s down, start).
    let off = official_exit(&mut j, role::EXIT2, "official-exit");
    ts.cli(&["set", "--exit-node=official-exit"]).unwrap();
    web_sees(&client, EXIT2_PUBLIC, &ts);
    off.stop(&mut j.seed.lab, false).unwrap();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        assert_eq!(web_answer(&client), None, "the official client failed open");
    }
    let mut off = off;
    // Timed from the start of the process, as for tsunagud above.
    let back = Instant::now();
    off.restart(&mut j.seed.lab).unwrap();
    wait(
        "traffic through the restarted official exit node",
        Duration::from_secs(60),
        || web_answer(&client).as_deref() == Some("198.51.100.6"),
    );
    let official_back = back.elapsed();
    eprintln!(
        "official client pinned to the exit node; traffic again after its restart: \
         tsunagud exit node {:.2} s, official exit node {:.2} s",
        tsunagud_back.as_secs_f64(),
        official_back.as_secs_f64()
    );
}

/// The lab CA that `j`'s nodes trust (its `SSL_CERT_FILE`).
fn lab_ca(j: &common::Joined) -> String {
    j.env
        .iter()
        .find_map(|e| e.strip_prefix("SSL_CERT_FILE="))
        .expect("the server runs on HTTPS")
        .to_string()
}

/// Interactive login with the official CLI: `tailscale up` without a key prints the
/// login URL, the page at that URL tells the member what to ask the admin, and once the
/// admin runs `tsunagu-server nodes register` the client is Running.
#[test]
fn official_client_logs_in_once_the_admin_registers_it() {
    let mut j = setup_over(
        "official_login",
        POLICY,
        SeedOptions::default(),
        &[],
        Transport::Https,
    );
    let client = j.seed.ns(role::CLIENT);
    let ts = official(&mut j, role::CLIENT, "laptop", &[]);
    let url = j.url.clone();
    let up_log = j.seed.lab.log_path("up.log");
    let login = format!("--login-server={url}");
    let argv = ts.cli_argv(&["up", &login, "--hostname=laptop", "--timeout=120s"]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let up = j.seed.lab.spawn(&client, &argv, Some(&up_log)).unwrap();
    let mut auth_url = String::new();
    wait("the login URL", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&up_log).unwrap_or_default();
        auth_url = text
            .split_whitespace()
            .find(|w| w.starts_with(&format!("{url}/register/")))
            .unwrap_or_default()
            .to_string();
        !auth_url.is_empty()
    });
    let text = std::fs::read_to_string(&up_log).unwrap();
    assert!(text.contains("To authenticate, visit:"), "{text}");
    assert_eq!(ts.backend_state().as_deref(), Some("NeedsLogin"));
    let token = auth_url.rsplit('/').next().unwrap().to_string();

    // The page, fetched over HTTPS as the member's browser would.
    let ca = lab_ca(&j);
    let page = client
        .exec(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &ca,
            &auth_url,
        ])
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout).into_owned();
    assert!(page.contains("waiting for approval"), "{page}");
    assert!(
        page.contains(&format!("tsunagu-server nodes register --key {token}")),
        "{page}"
    );

    let out = j.admin(&["nodes", "register", "--key", &token, "--user", "admin"]);
    assert!(out.contains("approved"), "{out}");
    let status = j
        .seed
        .lab
        .wait_timeout(up, Duration::from_secs(30))
        .unwrap()
        .expect("`tailscale up` returns once the node is registered");
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&up_log).unwrap()
    );
    ts.wait_running(Duration::from_secs(10)).unwrap();
    let me = ts.status_json().unwrap();
    assert!(
        me["Self"]["TailscaleIPs"][0]
            .as_str()
            .is_some_and(|ip| ip.starts_with("100.")),
        "{me:#}"
    );
    assert!(
        j.nodes().as_array().is_some_and(|a| a
            .iter()
            .any(|n| n["name"] == "laptop" && n["user"] == "admin")),
        "{}",
        j.nodes()
    );
}

/// `tailscale ping` from `ts` to `peer` until it reports a direct path (it stops there by
/// itself) or 30 pings went unanswered directly: (its output, how long it took).
fn official_ping(ts: &Tailscaled, peer: &str) -> (String, Duration) {
    let start = Instant::now();
    let out = ts
        .cli_output(&["ping", "--c=30", "--timeout=1s", peer])
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, start.elapsed())
}

/// `tsunagu ping` from `sock` to `peer`, once a 500 ms, until it reports a path that is
/// not the relay (bounded: 30 tries): (every line, how long it took).
fn tsunagu_ping_until_direct(
    ns: &tsunagu_lab::Netns,
    sock: &std::path::Path,
    peer: &str,
) -> (String, Duration) {
    let start = Instant::now();
    let mut all = String::new();
    for _ in 0..30 {
        let out = tsunagu(ns, sock, &["ping", "-c", "1", "--timeout=500ms", peer]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        all.push_str(&text);
        if text.contains("pong") && !text.contains("via relay") {
            break;
        }
    }
    (all, start.elapsed())
}

/// A tsunagud member `desktop` on the public bridge (exit2's namespace, 198.51.100.6).
fn tsunagud_desktop(j: &mut common::Joined) -> common::Client {
    let key = j.new_key();
    j.join(role::EXIT2, "desktop", "desktop", &key, &[])
}

/// Paths with the official client in both roles. The official client at the cafe and
/// tsunagud on a public address go direct within 10 s (each side's ping says so), and
/// the other way round; two official clients in the same positions are measured beside
/// them as the reference.
#[test]
fn official_client_and_tsunagud_go_direct_both_ways() {
    let opts = SeedOptions {
        second_exit: true,
        ..SeedOptions::default()
    };
    let mut j = setup_over("official_direct", POLICY, opts, &[], Transport::Https);
    let cafe_ns = j.seed.ns(role::CLIENT);
    let public_ns = j.seed.ns(role::EXIT2);
    let (url, key) = (j.url.clone(), j.client_key.clone());

    // 1. The official client at the cafe, tsunagud on a public address.
    let laptop = official(&mut j, role::CLIENT, "laptop", &[]);
    up(&laptop, &url, &key, "laptop", &[]);
    let desktop = tsunagud_desktop(&mut j);
    wait(
        "the two peers in each other's map",
        Duration::from_secs(30),
        || {
            status_line(&laptop, "desktop").is_some()
                && peer_line(&status_text(&public_ns, &desktop.sock), "laptop").is_some()
        },
    );
    let (pong, official_to_tsunagud) = official_ping(&laptop, "desktop");
    assert!(
        pong.lines()
            .last()
            .is_some_and(|l| l.contains("via 198.51.100.6:41641")),
        "{pong}\n{}",
        laptop.log_tail(60)
    );
    assert!(official_to_tsunagud < Duration::from_secs(10), "{pong}");
    let (pong, _) = tsunagu_ping_until_direct(&public_ns, &desktop.sock, "laptop");
    assert!(pong.contains("via 198.51.100.3:"), "{pong}");

    // The reference: an official client in tsunagud's place.
    j.seed
        .lab
        .kill(desktop.proc, tsunagu_lab::Signal::SIGTERM)
        .unwrap();
    let reference = official(&mut j, role::EXIT2, "desktop2", &[]);
    let key2 = j.new_key();
    up(&reference, &url, &key2, "desktop2", &[]);
    wait("desktop2 in the map", Duration::from_secs(30), || {
        status_line(&laptop, "desktop2").is_some()
    });
    let (pong, official_to_official) = official_ping(&laptop, "desktop2");
    assert!(pong.contains("via 198.51.100.6:41641"), "{pong}");
    reference.stop(&mut j.seed.lab, false).unwrap();
    laptop.stop(&mut j.seed.lab, false).unwrap();

    // 2. The other way round: tsunagud at the cafe, the official client public.
    let official_desktop = official(&mut j, role::EXIT2, "desktop3", &[]);
    let key3 = j.new_key();
    up(&official_desktop, &url, &key3, "desktop3", &[]);
    let key4 = j.new_key();
    let c = j.join(role::CLIENT, "laptop2", "laptop2", &key4, &[]);
    wait(
        "desktop3 in tsunagud's map",
        Duration::from_secs(30),
        || peer_line(&status_text(&cafe_ns, &c.sock), "desktop3").is_some(),
    );
    let (pong, tsunagud_to_official) = tsunagu_ping_until_direct(&cafe_ns, &c.sock, "desktop3");
    assert!(
        pong.contains("via 198.51.100.6:41641"),
        "{pong}\n{}",
        std::fs::read_to_string(&c.log).unwrap_or_default()
    );
    assert!(tsunagud_to_official < Duration::from_secs(10), "{pong}");
    let (pong, _) = official_ping(&official_desktop, "laptop2");
    assert!(
        pong.lines()
            .last()
            .is_some_and(|l| l.contains("via 198.51.100.3:")),
        "{pong}"
    );
    eprintln!(
        "time to direct (first ping to a direct pong): official at the cafe -> tsunagud \
         public {:.2} s; official -> official (reference) {:.2} s; tsunagud at the cafe -> \
         official public {:.2} s",
        official_to_tsunagud.as_secs_f64(),
        official_to_official.as_secs_f64(),
        tsunagud_to_official.as_secs_f64()
    );
}

/// With the cafe dropping UDP, the official client and tsunagud (in either role) stay on
/// the relay, over TLS on 443, and traffic flows; both pings report the relay.
#[test]
fn official_client_and_tsunagud_relay_over_tls_when_the_cafe_drops_udp() {
    let opts = SeedOptions {
        second_exit: true,
        ..SeedOptions::default()
    };
    let mut j = setup_over("official_relay", POLICY, opts, &[], Transport::Https);
    let _web = whoami_server(&j.seed.ns(role::WEB), (WEB_ADDR, 80).into()).unwrap();
    common::block_udp(&j.seed.ns(role::CAFE));
    let cafe_ns = j.seed.ns(role::CLIENT);
    let public_ns = j.seed.ns(role::EXIT2);
    let (url, key) = (j.url.clone(), j.client_key.clone());

    // The official client at the cafe, tsunagud public: relay both ways, and the
    // member's internet traffic through the tsunagud exit node crosses it.
    let laptop = official(&mut j, role::CLIENT, "laptop", &[]);
    up(&laptop, &url, &key, "laptop", &[]);
    let desktop = tsunagud_desktop(&mut j);
    wait("desktop in the map", Duration::from_secs(30), || {
        status_line(&laptop, "desktop").is_some()
    });
    let out = laptop
        .cli_output(&["ping", "--c=3", "--timeout=2s", "desktop"])
        .unwrap();
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(pong.contains("via DERP(tsunagu)"), "{pong}");
    assert!(!pong.contains("via 198."), "{pong}");
    let out = tsunagu(&public_ns, &desktop.sock, &["ping", "-c", "2", "laptop"]);
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{pong}");
    assert!(pong.contains("via relay \"tsunagu\""), "{pong}");
    laptop.cli(&["set", "--exit-node=dev-m1sk9-s1"]).unwrap();
    web_sees(&cafe_ns, EXIT_PUBLIC, &laptop);
    let line = status_line(&laptop, "dev-m1sk9-s1").unwrap();
    assert!(line.contains("relay \"tsunagu\""), "{line}");
    // On the cafe LAN: the relay's TLS, and nothing else that carries data.
    let (cafe, port) = j.seed.cafe_lan_iface();
    let pcap = j.seed.lab.log_path("cafe.pcap");
    let cap = tsunagu_lab::capture(&mut j.seed.lab, &cafe, port, &pcap).unwrap();
    for _ in 0..5 {
        assert_eq!(web_answer(&cafe_ns).as_deref(), Some("198.51.100.2"));
    }
    let lines = cap.finish(&mut j.seed.lab).unwrap();
    let leaked = official_leaks(&lines, "198.51.100.2.41641");
    assert!(leaked.is_empty(), "outside the tunnel: {leaked:#?}");
    assert!(
        lines.iter().any(|l| l.contains("198.51.100.4.443")),
        "the relay's TLS: {lines:#?}"
    );
    laptop.stop(&mut j.seed.lab, false).unwrap();
    j.seed
        .lab
        .kill(desktop.proc, tsunagu_lab::Signal::SIGTERM)
        .unwrap();

    // tsunagud at the cafe, the official client public.
    let official_desktop = official(&mut j, role::EXIT2, "desktop2", &[]);
    let key2 = j.new_key();
    up(&official_desktop, &url, &key2, "desktop2", &[]);
    let key3 = j.new_key();
    let c = j.join(role::CLIENT, "laptop2", "laptop2", &key3, &[]);
    wait(
        "desktop2 in tsunagud's map",
        Duration::from_secs(30),
        || peer_line(&status_text(&cafe_ns, &c.sock), "desktop2").is_some(),
    );
    let out = tsunagu(&cafe_ns, &c.sock, &["ping", "-c", "3", "desktop2"]);
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{pong}");
    assert!(pong.contains("via relay \"tsunagu\""), "{pong}");
    assert!(!pong.contains("via 198."), "{pong}");
    let out = official_desktop
        .cli_output(&["ping", "--c=3", "--timeout=2s", "laptop2"])
        .unwrap();
    let pong = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(pong.contains("via DERP(tsunagu)"), "{pong}");
    // The relay connections are TLS on 443 (the only way out of the cafe).
    let v: serde_json::Value =
        serde_json::from_slice(&tsunagu(&cafe_ns, &c.sock, &["status", "--json"]).stdout).unwrap();
    assert!(
        v["relays"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["home"] == true
                && r["connected"] == true
                && r["addr"].as_str().is_some_and(|a| a.ends_with(":443")))),
        "{v:#}"
    );
}
