//! An exit node that survives its own restarts (root, seed lab with the second exit
//! host): `dev-m1sk9-s1` runs on `exit` (198.51.100.2) and `exit2` (198.51.100.6) holds its
//! identity as a standby host; a member laptop behind the cafe NAT is pinned to it with
//! `tsunagu set --exit-node=dev-m1sk9-s1` and fetches a page every 100 ms.
//!
//! * planned: an admin failover, the old host restarting and coming back as standby, then
//!   a drain of the active host: no request fails, the web server sees the host that
//!   serves; the demoted host drops a member's handshake (its counter says so) while the
//!   active one answers the same handshake;
//! * unplanned: the active host SIGKILLed: traffic back through the standby within 5 s,
//!   nothing on the cafe LAN outside the tunnel meanwhile; the old host returns as
//!   standby without another interruption, and `nodes list` says who serves.

mod common;

use common::{Joined, setup_full, status_text, tsunagu, wait, web_sees};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, CLIENT_LAN, CONTROL_PUBLIC, EXIT_PUBLIC, EXIT2_PUBLIC, Netns, ProcId, SeedOptions,
    Signal, WEB_ADDR, http_get, whoami_server,
};

fn web() -> SocketAddr {
    (WEB_ADDR, 80).into()
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lab with the exit node, its standby host on `exit2` (ready), and the laptop
/// pinned to the exit node, the web server seeing the exit node's own host.
struct Standby {
    j: Joined,
    _web: tsunagu_lab::ServiceHandle,
    exit2: ProcId,
    exit2_sock: PathBuf,
    exit2_log: PathBuf,
    laptop_sock: PathBuf,
    laptop_state: PathBuf,
    logs: Vec<PathBuf>,
}

fn exit_sock(j: &Joined) -> PathBuf {
    j.seed.lab.log_path("exit-state").join("tsunagud.sock")
}

/// `nodes list --json`'s entry for the exit node.
fn exit_entry(j: &Joined) -> serde_json::Value {
    j.nodes()
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "dev-m1sk9-s1").cloned())
        .unwrap_or_default()
}

/// The hostname of the exit node's active host, and whether every host is online and
/// ready.
fn active_host(j: &Joined) -> (String, bool) {
    let e = exit_entry(j);
    let all_ready = e["standby"]["hosts"].as_array().is_some_and(|h| {
        h.len() == 2 && h.iter().all(|h| h["Online"] == true && h["Ready"] == true)
    });
    (
        e["standby"]["active"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        all_ready,
    )
}

fn setup(test: &str) -> Standby {
    let mut j = setup_full(
        test,
        common::POLICY,
        SeedOptions {
            second_exit: true,
            ..SeedOptions::default()
        },
    );
    let web_server = whoami_server(&j.seed.ns(role::WEB), web()).unwrap();
    let out = j.admin(&["nodes", "standby", "add", "dev-m1sk9-s1"]);
    let key = out.lines().last().unwrap_or_default().to_string();
    assert!(key.starts_with("tskey-standby-"), "{out}");
    let url = j.url.clone();
    let c2 = j.start_node(
        role::EXIT2,
        "exit2",
        &[
            "--login-server",
            &url,
            "--standby-key",
            &key,
            "--hostname",
            "exit2",
        ],
    );
    let exit2_sock = c2.sock.clone();
    let exit2_log = c2.log.clone();
    let laptop = j.join_laptop(&[]);
    let logs = vec![
        laptop.log.clone(),
        j.exit_log.clone(),
        exit2_log.clone(),
        j.server_log.clone(),
    ];
    wait(
        "both hosts of dev-m1sk9-s1 online and ready",
        Duration::from_secs(40),
        || active_host(&j) == ("dev-m1sk9-s1".to_string(), true),
    );
    let ns = j.seed.ns(role::CLIENT);
    ok(&tsunagu(
        &ns,
        &laptop.sock,
        &["set", "--exit-node=dev-m1sk9-s1"],
    ));
    web_sees(&ns, EXIT_PUBLIC, &logs);
    Standby {
        _web: web_server,
        exit2: c2.proc,
        exit2_sock,
        exit2_log,
        laptop_sock: laptop.sock,
        laptop_state: laptop.state,
        j,
        logs,
    }
}

/// One request every 100 ms from the laptop until stopped (at most `max`): when each
/// started and ended, and what the web server saw.
struct Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Request>>,
}

struct Request {
    start: Instant,
    end: Instant,
    result: Result<String, String>,
}

impl Load {
    fn start(ns: Netns, max: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut out = Vec::new();
            let mut next = start;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < max && out.len() < 2000 {
                let t = Instant::now();
                let result = http_get(&ns, web(), Duration::from_secs(5))
                    .map(|b| b.trim().to_string())
                    .map_err(|e| e.to_string());
                out.push(Request {
                    start: t,
                    end: Instant::now(),
                    result,
                });
                next += Duration::from_millis(100);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                } else {
                    next = Instant::now();
                }
            }
            out
        });
        Load { stop, thread }
    }

    fn finish(self) -> Results {
        self.stop.store(true, Ordering::Relaxed);
        Results(self.thread.join().unwrap())
    }
}

struct Results(Vec<Request>);

impl Results {
    fn failed(&self) -> Vec<&Request> {
        self.0.iter().filter(|r| r.result.is_err()).collect()
    }

    /// Failed requests, unless they are the one that was in flight when the host
    /// changed (`switch`: from the moment the switch was asked for until members were
    /// told): its TCP connection is bound to the old host's public address, and no host
    /// can carry it on. Any other failure (an outage) is returned.
    fn failed_outside(&self, switch: Option<(Instant, Instant)>) -> Vec<String> {
        let mut inflight = 0;
        self.failed()
            .into_iter()
            .filter(|r| {
                let at_switch = switch.is_some_and(|(from, to)| r.start <= to && r.end >= from);
                if at_switch && inflight == 0 {
                    inflight += 1;
                    false
                } else {
                    true
                }
            })
            .map(|r| format!("{:?}", r.result))
            .collect()
    }

    /// The longest time between two answers in a row (100 ms when nothing happens).
    fn longest_gap(&self) -> Duration {
        let ok: Vec<Instant> = self
            .0
            .iter()
            .filter(|r| r.result.is_ok())
            .map(|r| r.end)
            .collect();
        ok.windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default()
    }

    /// The slowest answered request.
    fn slowest(&self) -> Duration {
        self.0
            .iter()
            .filter(|r| r.result.is_ok())
            .map(|r| r.end.duration_since(r.start))
            .max()
            .unwrap_or_default()
    }

    /// The addresses the web server saw, in order, without repeats.
    fn seen(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.0 {
            if let Ok(b) = &r.result
                && v.last() != Some(b)
            {
                v.push(b.clone());
            }
        }
        v
    }

    fn report(&self, what: &str) {
        eprintln!(
            "{what}: {} requests, {} failed, longest gap {:?}, slowest request {:?}, seen {:?}",
            self.0.len(),
            self.failed().len(),
            self.longest_gap(),
            self.slowest(),
            self.seen()
        );
    }
}

/// Waits (bounded) until the web server sees `want` in a fresh request.
fn until_seen(ns: &Netns, want: Ipv4Addr, within: Duration, logs: &[PathBuf]) -> Duration {
    let t = Instant::now();
    web_sees_within(ns, want, within, logs);
    t.elapsed()
}

fn web_sees_within(ns: &Netns, want: Ipv4Addr, within: Duration, logs: &[PathBuf]) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < within {
        match http_get(ns, web(), Duration::from_millis(500)) {
            Ok(b) if b.trim() == want.to_string() => return,
            Ok(b) => {
                last = b.trim().to_string();
                assert_ne!(last, CAFE_PUBLIC.to_string(), "left the cafe directly");
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs: Vec<String> = logs
        .iter()
        .map(|l| {
            format!(
                "{}:\n{}",
                l.display(),
                std::fs::read_to_string(l).unwrap_or_default()
            )
        })
        .collect();
    panic!(
        "the web server did not see {want} within {within:?} (last: {last})\n{}",
        logs.join("\n")
    );
}

/// A host's `status --json`.
fn status_json(ns: &Netns, sock: &Path) -> serde_json::Value {
    let out = tsunagu(ns, sock, &["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn role_of(ns: &Netns, sock: &Path) -> String {
    status_json(ns, sock)["standby"]["role"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A WireGuard handshake initiation from the laptop's key to the exit node's key, sent
/// to `to` from the cafe router (the laptop's own traffic takes the tunnel): whether an
/// answer came back within 2 s.
fn handshake_answered(s: &Standby, to: SocketAddr) -> bool {
    use gotatun::noise::Tunn;
    use gotatun::noise::index_table::IndexTable;
    use gotatun::noise::rate_limiter::RateLimiter;
    use gotatun::x25519::{PublicKey, StaticSecret};
    let text = std::fs::read_to_string(s.laptop_state.join("node.key")).unwrap();
    let laptop: tsunagu_proto::NodePrivate = text.trim().parse().unwrap();
    let exit_key: tsunagu_proto::NodePublic = exit_entry(&s.j)["node_key"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let secret = StaticSecret::from(laptop.to_bytes());
    let public = PublicKey::from(&secret);
    let mut tunn = Tunn::new(
        secret,
        PublicKey::from(exit_key.0),
        None,
        None,
        IndexTable::from_os_rng(),
        Arc::new(RateLimiter::new(&public, 100)),
    );
    let init: gotatun::packet::Packet = tunn.format_handshake_initiation(false).unwrap().into();
    let bytes = init.to_vec();
    s.j.seed
        .ns(role::CAFE)
        .run(move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sock.send_to(&bytes, to).unwrap();
            let mut buf = [0u8; 2048];
            sock.recv_from(&mut buf).is_ok()
        })
        .unwrap()
}

fn standby_dropped(ns: &Netns, sock: &Path) -> u64 {
    status_json(ns, sock)["counters"]["standby_dropped"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn planned_switches_restart_and_drain_lose_no_request() {
    let mut s = setup("standby_planned");
    let ns = s.j.seed.ns(role::CLIENT);
    let (exit_ns, exit2_ns) = (s.j.seed.ns(role::EXIT), s.j.seed.ns(role::EXIT2));
    let exit_sock = exit_sock(&s.j);
    assert_eq!(role_of(&exit_ns, &exit_sock), "active");
    assert_eq!(role_of(&exit2_ns, &s.exit2_sock), "standby");

    // 1. Admin failover to the standby host, under load.
    let load = Load::start(ns.clone(), Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let asked = Instant::now();
    let out =
        s.j.admin(&["nodes", "failover", "dev-m1sk9-s1", "--to", "exit2"]);
    let told = Instant::now();
    assert!(out.contains("exit2 is the active host now"), "{out}");
    until_seen(&ns, EXIT2_PUBLIC, Duration::from_secs(5), &s.logs);
    std::thread::sleep(Duration::from_secs(1));
    let r = load.finish();
    r.report("planned (admin failover)");
    let bad = r.failed_outside(Some((asked, told)));
    assert!(bad.is_empty(), "failed requests: {bad:?}");
    assert!(
        r.longest_gap() < Duration::from_secs(2),
        "{:?}",
        r.longest_gap()
    );
    assert_eq!(
        r.seen(),
        vec![EXIT_PUBLIC.to_string(), EXIT2_PUBLIC.to_string()],
        "the exit node's host, then the standby's, never directly"
    );
    // Both hosts say so, and nodes list says why.
    assert_eq!(role_of(&exit_ns, &exit_sock), "standby");
    assert_eq!(role_of(&exit2_ns, &s.exit2_sock), "active");
    let st = status_text(&exit_ns, &exit_sock);
    assert!(
        st.contains("# Host of exit node dev-m1sk9-s1: standing by")
            && st.contains("dev-m1sk9-s1 -> exit2 (admin failover)"),
        "{st}"
    );
    let e = exit_entry(&s.j);
    assert_eq!(e["standby"]["active"], "exit2", "{e}");
    assert_eq!(
        e["standby"]["last_switch"]["Reason"], "admin failover",
        "{e}"
    );
    let list = s.j.admin(&["nodes", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with(&format!("{} ", e["id"])) && l.trim_end().ends_with("exit2")),
        "{list}"
    );

    // 2. The demoted host drops a member's handshake; the active host answers the same.
    let before = standby_dropped(&exit_ns, &exit_sock);
    assert!(
        !handshake_answered(&s, (EXIT_PUBLIC, 41641).into()),
        "the demoted host answered a handshake"
    );
    let after = standby_dropped(&exit_ns, &exit_sock);
    assert!(after > before, "counted as dropped ({before} -> {after})");
    assert!(
        handshake_answered(&s, (EXIT2_PUBLIC, 41641).into()),
        "the active host answers the same handshake"
    );
    // At the relay, the demoted host's connection is parked (it gets nothing).
    let relay: serde_json::Value =
        serde_json::from_str(&s.j.admin(&["--json", "relay-status"])).unwrap();
    let key = exit_entry(&s.j)["node_key"].clone();
    let conns: Vec<&serde_json::Value> = relay["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["node_key"] == key)
        .collect();
    assert_eq!(conns.len(), 2, "{relay}");
    assert_eq!(
        conns.iter().filter(|c| c["standby"] == true).count(),
        1,
        "one host of the key is parked: {relay}"
    );
    web_sees(&ns, EXIT2_PUBLIC, &s.logs);

    // 3. The old host restarts (planned maintenance), under load: it comes back as a
    // standby host and nothing moves.
    let load = Load::start(ns.clone(), Duration::from_secs(40));
    std::thread::sleep(Duration::from_millis(500));
    s.j.seed.lab.kill(s.j.exit, Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    s.j.restart_exit();
    wait(
        "the old host back, standing by",
        Duration::from_secs(30),
        || {
            active_host(&s.j) == ("exit2".to_string(), true)
                && role_of(&exit_ns, &exit_sock) == "standby"
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let r = load.finish();
    r.report("planned (old host restarting)");
    let bad = r.failed_outside(None);
    assert!(bad.is_empty(), "failed: {bad:?}");
    assert_eq!(
        r.seen(),
        vec![EXIT2_PUBLIC.to_string()],
        "no switch, no interruption"
    );

    // 4. A drain of the active host (its offer withdrawn before maintenance) moves the
    // members back to the other host instead of away from the exit node.
    let load = Load::start(ns.clone(), Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let asked = Instant::now();
    ok(&tsunagu(
        &exit2_ns,
        &s.exit2_sock,
        &["set", "--advertise-exit-node=false"],
    ));
    until_seen(&ns, EXIT_PUBLIC, Duration::from_secs(5), &s.logs);
    let told = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let r = load.finish();
    r.report("planned (drain of the active host)");
    let bad = r.failed_outside(Some((asked, told)));
    assert!(bad.is_empty(), "failed: {bad:?}");
    assert!(
        r.longest_gap() < Duration::from_secs(2),
        "{:?}",
        r.longest_gap()
    );
    assert_eq!(
        r.seen(),
        vec![EXIT2_PUBLIC.to_string(), EXIT_PUBLIC.to_string()]
    );
    let e = exit_entry(&s.j);
    assert_eq!(e["standby"]["active"], "dev-m1sk9-s1", "{e}");
    assert!(
        e["standby"]["last_switch"]["Reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("drain")),
        "{e}"
    );
    assert_eq!(
        e["exit_node"], "approved",
        "still an approved exit node: {e}"
    );
    let _ = (s.exit2, &s.exit2_log, &s.laptop_sock);
}

#[test]
fn the_active_host_killed_hands_over_within_5_s_without_leaking_and_its_return_moves_nothing() {
    let mut s = setup("standby_crash");
    let ns = s.j.seed.ns(role::CLIENT);
    let exit_ns = s.j.seed.ns(role::EXIT);
    let exit_sock = exit_sock(&s.j);
    let (cafe, port) = s.j.seed.cafe_lan_iface();
    let file = s.j.seed.lab.log_path("crash.pcap");
    let cap = tsunagu_lab::capture(&mut s.j.seed.lab, &cafe, port, &file).unwrap();

    let load = Load::start(ns.clone(), Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    s.j.seed.lab.kill(s.j.exit, Signal::SIGKILL).unwrap();
    web_sees_within(&ns, EXIT2_PUBLIC, Duration::from_secs(5), &s.logs);
    let back = killed.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let r = load.finish();
    eprintln!("crash: traffic back through the standby {back:?} after the kill");
    r.report("crash");
    assert!(back < Duration::from_secs(5), "{back:?}");
    assert!(
        !r.seen().contains(&CAFE_PUBLIC.to_string()),
        "nothing left the cafe directly: {:?}",
        r.seen()
    );
    let lines = cap.finish(&mut s.j.seed.lab).unwrap();
    let leaked = tsunagu_lab::tunnel_leaks(
        &lines,
        CLIENT_LAN,
        &format!("{EXIT_PUBLIC}.41641"),
        &[
            &format!("{EXIT2_PUBLIC}.41641"),
            &format!("{CONTROL_PUBLIC}.8080"),
            &format!("{CONTROL_PUBLIC}.3478"),
        ],
    );
    assert!(leaked.is_empty(), "leaked on the cafe LAN: {leaked:#?}");
    let e = exit_entry(&s.j);
    assert_eq!(e["standby"]["active"], "exit2", "{e}");
    assert!(
        e["standby"]["last_switch"]["Reason"]
            .as_str()
            .is_some_and(|r| r.contains("unreachable")),
        "{e}"
    );
    let server_log = std::fs::read_to_string(&s.j.server_log).unwrap();
    assert!(
        server_log.contains("exit node switched to another host"),
        "the switch is logged with its reason"
    );

    // The old host returns: a standby host now; members are not moved again.
    let load = Load::start(ns.clone(), Duration::from_secs(40));
    std::thread::sleep(Duration::from_millis(500));
    s.j.restart_exit();
    wait(
        "the old host back, standing by",
        Duration::from_secs(30),
        || {
            active_host(&s.j) == ("exit2".to_string(), true)
                && role_of(&exit_ns, &exit_sock) == "standby"
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let r = load.finish();
    r.report("return of the old host");
    let bad = r.failed_outside(None);
    assert!(bad.is_empty(), "failed: {bad:?}");
    assert_eq!(
        r.seen(),
        vec![EXIT2_PUBLIC.to_string()],
        "no second interruption"
    );
    let st = status_text(&s.j.seed.ns(role::EXIT2), &s.exit2_sock);
    assert!(
        st.contains("# Host of exit node dev-m1sk9-s1: active")
            && st.contains("dev-m1sk9-s1 (standby, ready)"),
        "{st}"
    );
    let _ = (s.exit2, &s.exit2_log, &s.laptop_sock);
}
