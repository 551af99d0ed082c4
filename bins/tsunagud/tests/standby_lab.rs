//! An exit node that survives its own restarts (root, seed lab with the second exit
//! host): `dev-m1sk9-s1` runs on `exit` (198.51.100.2) and `exit2` (198.51.100.6) holds its
//! identity as a standby host; a member laptop behind the cafe NAT is pinned to it with
//! `tsunagu set --exit-node=dev-m1sk9-s1` and fetches a page every 100 ms.
//!
//! * planned: an admin failover, the old host restarting and coming back as standby, then
//!   a drain of the active host: no request fails, the web server sees the host that
//!   serves; the demoted host drops a member's handshake (its counter says so) while the
//!   active one answers the same handshake; a connection paused in the middle of its
//!   exchange across the failover completes through the old host, which hands over
//!   after it;
//! * unplanned: the active host SIGKILLed: traffic back through the standby within 5 s,
//!   nothing on the cafe LAN outside the tunnel meanwhile; the old host returns as
//!   standby without another interruption, and `nodes list` says who serves.

mod common;

use common::{Joined, Transport, setup_over, status_text, tsunagu, wait, web_sees};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, CLIENT_LAN, CONTROL_PUBLIC, EXIT_PUBLIC, EXIT2_PUBLIC, Netns, SeedOptions, Signal,
    Tailscaled, WEB_ADDR, http_get, whoami_server,
};

fn web() -> SocketAddr {
    (WEB_ADDR, 80).into()
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lab with the exit node and its standby host on `exit2` (both ready), and a
/// member on the laptop pinned to the exit node, the web server seeing the exit node's
/// own host.
struct Standby {
    j: Joined,
    _web: tsunagu_lab::ServiceHandle,
    exit2_sock: PathBuf,
    /// The member: tsunagud, or the official client.
    laptop: Option<common::Client>,
    official: Option<Tailscaled>,
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

/// The member that fetches pages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Member {
    Tsunagud,
    Official,
}

fn setup(test: &str, member: Member) -> Standby {
    // The official client reaches the server and the relay over TLS only.
    let transport = match member {
        Member::Tsunagud => Transport::Http,
        Member::Official => Transport::Https,
    };
    let mut j = setup_over(
        test,
        common::POLICY,
        SeedOptions {
            second_exit: true,
            ..SeedOptions::default()
        },
        &[],
        transport,
    );
    let web_server = whoami_server(&j.seed.ns(role::WEB), web()).unwrap();
    let c2 = j.start_standby_host();
    let url = j.url.clone();
    let mut logs = vec![j.exit_log.clone(), c2.log.clone(), j.server_log.clone()];
    wait(
        "both hosts of dev-m1sk9-s1 online and ready",
        Duration::from_secs(40),
        || active_host(&j) == ("dev-m1sk9-s1".to_string(), true),
    );
    let ns = j.seed.ns(role::CLIENT);
    let (laptop, official) = match member {
        Member::Tsunagud => {
            let laptop = j.join_laptop(&[]);
            logs.push(laptop.log.clone());
            ok(&tsunagu(
                &ns,
                &laptop.sock,
                &["set", "--exit-node=dev-m1sk9-s1"],
            ));
            (Some(laptop), None)
        }
        Member::Official => {
            let ts = common::official(&mut j, role::CLIENT, "laptop", &[]);
            let key = j.client_key.clone();
            common::official_up(&ts, &url, &key, "laptop", &[]);
            logs.push(ts.log.clone());
            ts.cli(&["set", "--exit-node=dev-m1sk9-s1"]).unwrap();
            (None, Some(ts))
        }
    };
    web_sees(&ns, EXIT_PUBLIC, &logs);
    Standby {
        _web: web_server,
        exit2_sock: c2.sock,
        laptop,
        official,
        j,
        logs,
    }
}

/// A request started every 100 ms from the laptop until stopped (at most `max`), each
/// on its own thread as a device's apps would (one hung connection does not hold up the
/// next; at most 64 in flight): when each started and ended, and what the web server saw.
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
            let (tx, rx) = std::sync::mpsc::channel();
            let mut workers = Vec::new();
            let mut next = start;
            let mut started = 0;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < max && started < 2000 {
                workers.retain(|w: &std::thread::JoinHandle<()>| !w.is_finished());
                if workers.len() < 64 {
                    started += 1;
                    let (ns, tx) = (ns.clone(), tx.clone());
                    workers.push(std::thread::spawn(move || {
                        let t = Instant::now();
                        let result = http_get(&ns, web(), Duration::from_secs(5))
                            .map(|b| b.trim().to_string())
                            .map_err(|e| e.to_string());
                        let _ = tx.send(Request {
                            start: t,
                            end: Instant::now(),
                            result,
                        });
                    }));
                }
                next += Duration::from_millis(100);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                } else {
                    next = Instant::now();
                }
            }
            drop(tx);
            for w in workers {
                let _ = w.join();
            }
            let mut out: Vec<Request> = rx.into_iter().collect();
            out.sort_by_key(|r| r.start);
            out
        });
        Load { stop, thread }
    }

    fn finish(self) -> Results {
        self.stop.store(true, Ordering::Relaxed);
        Results(self.thread.join().unwrap())
    }
}

/// The requests, in the order they started.
struct Results(Vec<Request>);

impl Results {
    fn failed(&self) -> Vec<&Request> {
        self.0.iter().filter(|r| r.result.is_err()).collect()
    }

    /// The failed requests, for an assertion message.
    fn failures(&self) -> Vec<String> {
        self.failed()
            .into_iter()
            .map(|r| format!("{:?}", r.result))
            .collect()
    }

    /// The longest time without an answer: between two answers in a row (100 ms when
    /// nothing happens), or from the last answer to the end of the last request when the
    /// load ended on failures.
    fn longest_gap(&self) -> Duration {
        let mut ends: Vec<Instant> = self
            .0
            .iter()
            .filter(|r| r.result.is_ok())
            .map(|r| r.end)
            .collect();
        ends.sort();
        if let Some(last) = self.0.last()
            && last.result.is_err()
        {
            ends.push(last.end.max(ends.last().copied().unwrap_or(last.end)));
        }
        ends.windows(2)
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
        // The slow and failed ones, with when they started (wall clock, to match logs).
        let wall = std::time::SystemTime::now();
        let now = Instant::now();
        for r in &self.0 {
            let took = r.end.duration_since(r.start);
            if took > Duration::from_millis(300) || r.result.is_err() {
                let at = wall - now.duration_since(r.start);
                let at = chrono::DateTime::<chrono::Utc>::from(at);
                eprintln!(
                    "  started {} took {took:?}: {:?}",
                    at.format("%H:%M:%S%.3f"),
                    r.result
                );
            }
        }
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

/// The old host (restarted) is back as a standby host, and `exit2` is still active.
fn wait_old_host_standing_by(j: &Joined, exit_ns: &Netns, exit_sock: &Path) {
    wait(
        "the old host back, standing by",
        Duration::from_secs(30),
        || {
            active_host(j) == ("exit2".to_string(), true)
                && role_of(exit_ns, exit_sock) == "standby"
        },
    );
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
    let state = &s.laptop.as_ref().expect("a tsunagud member").state;
    let text = std::fs::read_to_string(state.join("node.key")).unwrap();
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

/// Where the member's control connection and relay go: the server, on 8080 (HTTP) or 443
/// (HTTPS).
fn control_ep(s: &Standby) -> String {
    let port = if s.j.url.starts_with("https://") {
        443
    } else {
        8080
    };
    format!("{CONTROL_PUBLIC}.{port}")
}

/// Planned maintenance, under load (a request every 100 ms): an admin failover to the
/// standby host, the old host restarting (it comes back standing by), a drain of the
/// active host (members move back). No request fails, not even one in flight at a switch
/// instant; the web server sees the host that serves, never the cafe.
fn planned(s: &mut Standby, who: &str, between: impl FnOnce(&mut Standby)) {
    let ns = s.j.seed.ns(role::CLIENT);
    let (exit_ns, exit2_ns) = (s.j.seed.ns(role::EXIT), s.j.seed.ns(role::EXIT2));
    let exit_sock = exit_sock(&s.j);
    assert_eq!(role_of(&exit_ns, &exit_sock), "active");
    assert_eq!(role_of(&exit2_ns, &s.exit2_sock), "standby");

    // 1. Admin failover to the standby host.
    planned_switch(
        s,
        &format!("{who}, planned (admin failover)"),
        (EXIT_PUBLIC, EXIT2_PUBLIC),
        &s.j.exit_log,
        Duration::from_secs(5),
        |s| {
            let out =
                s.j.admin(&["nodes", "failover", "dev-m1sk9-s1", "--to", "exit2"]);
            assert!(out.contains("exit2 is the active host now"), "{out}");
        },
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
    between(s);

    // 2. The old host restarts (planned maintenance): it comes back as a standby host
    // and nothing moves.
    let load = Load::start(ns.clone(), Duration::from_secs(40));
    std::thread::sleep(Duration::from_millis(500));
    s.j.seed.lab.kill(s.j.exit, Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    s.j.restart_exit();
    wait_old_host_standing_by(&s.j, &exit_ns, &exit_sock);
    std::thread::sleep(Duration::from_secs(2));
    let r = load.finish();
    r.report(&format!("{who}, planned (old host restarting)"));
    let bad = r.failures();
    assert!(bad.is_empty(), "failed: {bad:?}");
    assert_eq!(
        r.seen(),
        vec![EXIT2_PUBLIC.to_string()],
        "no switch, no interruption"
    );

    // 3. A drain of the active host (its offer withdrawn before maintenance) moves the
    // members back to the other host instead of away from the exit node.
    planned_switch(
        s,
        &format!("{who}, planned (drain of the active host)"),
        (EXIT2_PUBLIC, EXIT_PUBLIC),
        &s.logs[1],
        Duration::from_secs(5),
        |s| {
            ok(&tsunagu(
                &exit2_ns,
                &s.exit2_sock,
                &["set", "--advertise-exit-node=false"],
            ));
        },
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
}

/// A planned switch under load, started by `act`, from the host the web server sees
/// as `from` to the one it sees as `to` (members follow within `within`). Nothing
/// fails, not even a request in flight at the switch: the old host (logging to
/// `old_log`) handed over at a quiet moment, since its NAT state cannot move to the
/// new host. The longest gap stays under 2 s, and the web server sees `from`, then
/// `to`, never the cafe.
fn planned_switch(
    s: &Standby,
    what: &str,
    (from, to): (Ipv4Addr, Ipv4Addr),
    old_log: &Path,
    within: Duration,
    act: impl FnOnce(&Standby),
) {
    let ns = s.j.seed.ns(role::CLIENT);
    let load = Load::start(ns.clone(), Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    act(s);
    until_seen(&ns, to, within, &s.logs);
    std::thread::sleep(Duration::from_secs(1));
    let r = load.finish();
    r.report(what);
    let bad = r.failures();
    assert!(bad.is_empty(), "failed requests: {bad:?}");
    eprintln!("{what}: {}", quiet_handover(old_log));
    assert!(
        r.longest_gap() < Duration::from_secs(2),
        "{:?}",
        r.longest_gap()
    );
    assert_eq!(
        r.seen(),
        vec![from.to_string(), to.to_string()],
        "the old host, then the new one, never directly"
    );
}

/// The last log line of a host that handed the exit node over at a quiet moment (its
/// wind-down in a planned switch), without the log's colours.
fn quiet_handover(log: &Path) -> String {
    let text = tsunagu_lab::strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("handing the exit node over"))
        .unwrap_or_else(|| panic!("no handover in {}", log.display()));
    assert!(
        line.contains("at a quiet moment"),
        "the old host handed over at a quiet moment: {line}"
    );
    line.trim().to_string()
}

/// The active host SIGKILLed under load: traffic back through the standby host within
/// 5 s, nothing on the cafe LAN outside the tunnel meanwhile; the old host returns as a
/// standby host without another interruption, and both say who serves; then, told to
/// prefer the role (`tsunagu up --prefer`), it takes it back in a planned switch that
/// loses nothing.
fn crash(s: &mut Standby, who: &str) {
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
    eprintln!("{who}, crash: traffic back through the standby {back:?} after the kill");
    r.report(&format!("{who}, crash"));
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
            &control_ep(s),
            &format!("{CONTROL_PUBLIC}.3478"),
        ],
    );
    assert!(leaked.is_empty(), "leaked on the cafe LAN: {leaked:#?}");
    assert!(lines.len() > 10, "the capture saw the tunnel: {lines:#?}");
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
    wait_old_host_standing_by(&s.j, &exit_ns, &exit_sock);
    std::thread::sleep(Duration::from_secs(3));
    let r = load.finish();
    r.report(&format!("{who}, return of the old host"));
    let bad = r.failures();
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

    // The returned host now prefers the role (`tsunagu up --prefer`): once it has been
    // ready for a while it takes the role back, a planned switch like the others.
    planned_switch(
        s,
        &format!("{who}, a preferring host takes the role back"),
        (EXIT2_PUBLIC, EXIT_PUBLIC),
        &s.logs[1],
        Duration::from_secs(10),
        |_| {
            ok(&tsunagu(&exit_ns, &exit_sock, &["up", "--prefer"]));
        },
    );
    let e = exit_entry(&s.j);
    assert_eq!(e["standby"]["active"], "dev-m1sk9-s1", "{e}");
    assert_eq!(
        e["standby"]["last_switch"]["Reason"], "a preferred host is ready again",
        "{e}"
    );
}

#[test]
fn planned_switches_restart_and_drain_lose_no_request() {
    let mut s = setup("standby_planned", Member::Tsunagud);
    planned(&mut s, "tsunagud member", |s| {
        // The demoted host drops a member's handshake; the active host answers the same.
        let (exit_ns, exit_sock) = (s.j.seed.ns(role::EXIT), exit_sock(&s.j));
        let before = standby_dropped(&exit_ns, &exit_sock);
        assert!(
            !handshake_answered(s, (EXIT_PUBLIC, 41641).into()),
            "the demoted host answered a handshake"
        );
        let after = standby_dropped(&exit_ns, &exit_sock);
        assert!(after > before, "counted as dropped ({before} -> {after})");
        assert!(
            handshake_answered(s, (EXIT2_PUBLIC, 41641).into()),
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
        web_sees(&s.j.seed.ns(role::CLIENT), EXIT2_PUBLIC, &s.logs);
    });
}

/// A planned switch waits for an exchange in flight: the member holds a TCP connection
/// through the exit node open across the admin's failover, pausing 400 ms in the middle
/// of its exchange; the old host hands over only once that connection has ended, so the
/// exchange completes through it. A host that stood by at once would cut it (the far end
/// knows the connection by the old host's address).
#[test]
fn a_planned_switch_waits_for_a_connection_in_the_middle_of_its_exchange() {
    use std::io::{Read, Write};
    let s = setup("standby_inflight", Member::Tsunagud);
    let echo_at: SocketAddr = (WEB_ADDR, 7007).into();
    let echo = tsunagu_lab::tcp_echo(&s.j.seed.ns(role::WEB), echo_at).unwrap();
    let ns = s.j.seed.ns(role::CLIENT);
    let mut conn = ns
        .run(|| std::net::TcpStream::connect_timeout(&echo_at, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut echoed = |msg: &[u8]| -> std::io::Result<Vec<u8>> {
        conn.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        conn.read_exact(&mut buf)?;
        Ok(buf)
    };
    assert_eq!(echoed(b"one").unwrap(), b"one");

    let failover = {
        let (ns, data) = (s.j.seed.ns(role::CONTROL), s.j.data.clone());
        std::thread::spawn(move || {
            common::cli(
                &ns,
                &data,
                &["nodes", "failover", "dev-m1sk9-s1", "--to", "exit2"],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        echoed(b"two").unwrap(),
        b"two",
        "the exchange went on through the old host"
    );
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let ended = chrono::Utc::now();
    let out = failover.join().unwrap();
    assert!(out.contains("exit2 is the active host now"), "{out}");

    let line = quiet_handover(&s.j.exit_log);
    eprintln!("a connection in the middle of its exchange: {line}");
    let handed_over = line
        .split_whitespace()
        .next()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("{line}"));
    // The member saw the end of the connection at `ended`; the old host's 20 ms of
    // quiet after the last packet come on top (a millisecond of slack for the order
    // in which the two clocks were read).
    assert!(
        handed_over >= ended - chrono::Duration::milliseconds(1),
        "handed over before the exchange ended ({ended}): {line}"
    );
    assert_eq!(
        echo.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(),
        vec![std::net::IpAddr::from(EXIT_PUBLIC)],
        "one connection, through the old host"
    );
    web_sees(&ns, EXIT2_PUBLIC, &s.logs);
}

#[test]
fn the_active_host_killed_hands_over_within_5_s_without_leaking_and_its_return_moves_nothing() {
    let mut s = setup("standby_crash", Member::Tsunagud);
    crash(&mut s, "tsunagud member");
}

/// The same planned maintenance with the official client pinned to the exit node
/// (`tailscale set --exit-node=dev-m1sk9-s1`).
#[test]
fn official_client_pinned_to_the_exit_node_loses_no_request_in_planned_switches() {
    let mut s = setup("standby_off_planned", Member::Official);
    planned(&mut s, "official member", |s| {
        let ts = s.official.as_ref().unwrap();
        // What made it handshake afresh with the new host: the peer's disco key changed
        // (its log line when it resets the WireGuard peer, `ResetDevicePeer`).
        let log = ts.log_text();
        assert!(
            log.contains("disco key changed from"),
            "{}",
            ts.log_tail(60)
        );
        wait(
            "the official client on a direct path to the new host",
            Duration::from_secs(10),
            || {
                ts.cli(&["status"]).is_ok_and(|st| {
                    st.lines().any(|l| {
                        l.contains("dev-m1sk9-s1")
                            && l.contains("active; exit node; direct 198.51.100.6:")
                    })
                })
            },
        );
    });
}

/// The active host SIGKILLed with the official client pinned to the exit node.
#[test]
fn official_client_pinned_to_the_exit_node_is_back_within_5_s_of_a_crash() {
    let mut s = setup("standby_off_crash", Member::Official);
    crash(&mut s, "official member");
}

/// The seed's situation today, for comparison in the same lab: the official client
/// pinned to an official exit node (`tailscaled --advertise-exit-node`, no standby host)
/// that restarts (SIGTERM, started again at once), under the same load.
#[test]
fn official_exit_node_restarting_without_a_standby_host_for_comparison() {
    let mut j = setup_over(
        "standby_off_ref",
        common::POLICY,
        SeedOptions {
            second_exit: true,
            ..SeedOptions::default()
        },
        &[],
        Transport::Https,
    );
    let _web = whoami_server(&j.seed.ns(role::WEB), web()).unwrap();
    let mut off = common::official_exit(&mut j, role::EXIT2, "official-exit");
    let ts = common::official(&mut j, role::CLIENT, "laptop", &[]);
    let (key, url) = (j.client_key.clone(), j.url.clone());
    common::official_up(&ts, &url, &key, "laptop", &[]);
    ts.cli(&["set", "--exit-node=official-exit"]).unwrap();
    let ns = j.seed.ns(role::CLIENT);
    let logs = vec![ts.log.clone(), off.log.clone()];
    web_sees(&ns, EXIT2_PUBLIC, &logs);
    let load = Load::start(ns.clone(), Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Instant::now();
    off.restart(&mut j.seed.lab).unwrap();
    web_sees_within(&ns, EXIT2_PUBLIC, Duration::from_secs(60), &logs);
    let back = restarted.elapsed();
    // Long enough for a request stuck in the outage (5 s timeout) and answers after it.
    std::thread::sleep(Duration::from_secs(6));
    let r = load.finish();
    eprintln!("official exit node, no standby: traffic back {back:?} after the restart began");
    r.report("official member, official exit node restarting at once (no standby)");
    assert!(
        !r.seen().contains(&CAFE_PUBLIC.to_string()),
        "the official client failed closed: {:?}",
        r.seen()
    );
    // A restart with the machine down for a while (3 s here; a reboot takes longer).
    let load = Load::start(ns.clone(), Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Instant::now();
    off.stop(&mut j.seed.lab, false).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    off.restart(&mut j.seed.lab).unwrap();
    web_sees_within(&ns, EXIT2_PUBLIC, Duration::from_secs(60), &logs);
    let back = stopped.elapsed();
    // Long enough for a request stuck in the outage (5 s timeout) and answers after it.
    std::thread::sleep(Duration::from_secs(6));
    let r = load.finish();
    eprintln!("official exit node, no standby, down 3 s: traffic back {back:?} after it stopped");
    r.report("official member, official exit node down 3 s (no standby)");
    assert!(
        !r.seen().contains(&CAFE_PUBLIC.to_string()),
        "the official client failed closed: {:?}",
        r.seen()
    );
    assert!(r.longest_gap() >= Duration::from_secs(3), "it was down 3 s");
}
