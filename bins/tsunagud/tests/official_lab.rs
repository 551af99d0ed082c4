//! The official Tailscale client (`tailscaled` + `tailscale`, v1.102.5: the engine inside
//! every official app) with tsunagu-server over HTTPS and a tsunagud exit node, in the
//! seed lab (root). The official client is the judge of what members get: these tests
//! run the seed's steps with its own CLI and read its own output.

mod common;

use common::{POLICY, Transport, setup_over, wait};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, EXIT_PUBLIC, PRINTER_LAN, SeedOptions, Tailscaled, TailscaledOpts, WEB_ADDR,
    http_get, whoami_server,
};

/// The official daemon in `role`'s namespace, trusting the lab CA of `j`.
fn official(j: &mut common::Joined, role: &str, name: &str, args: &[&str]) -> Tailscaled {
    let ns = j.seed.ns(role);
    let opts = TailscaledOpts {
        env: j.env.clone(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..TailscaledOpts::default()
    };
    Tailscaled::start(&mut j.seed.lab, &ns, name, opts).unwrap()
}

/// `tailscale up --login-server=URL --auth-key=KEY --hostname=NAME extra...`, Running.
fn up(ts: &Tailscaled, url: &str, key: &str, hostname: &str, extra: &[&str]) {
    let login = format!("--login-server={url}");
    let auth = format!("--auth-key={key}");
    let host = format!("--hostname={hostname}");
    let mut args = vec!["up", &login, &auth, &host, "--timeout=60s"];
    args.extend_from_slice(extra);
    if let Err(e) = ts.cli(&args) {
        panic!("tailscale up: {e}\n{}", ts.log_tail(80));
    }
    ts.wait_running(Duration::from_secs(30)).unwrap();
}

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
