//! `os::route` against a real kernel: each test builds a client namespace with a "LAN"
//! (veth `lan0`, 198.18.1.10/24 and 2001:db8:1::10/64, default routes via .1 / ::1) and a
//! tun `tsutest0`, applies routing states and checks what the kernel then does with
//! `ip route get` (root required).

use std::process::Output;

use tsunagu_engine::os::route::{
    self, Family, NetlinkBackend, Route, RouteBackend, RouteConfig, RouteError, RouteKind,
    RouteManager, RouteState,
};
use tsunagu_lab::{Lab, Netns};

const TUN: &str = "tsutest0";
const INTERNET4: &str = "203.0.113.10";
const INTERNET6: &str = "2001:db8:2::10";
const LAN_HOST4: &str = "198.18.1.20";
const LAN_HOST6: &str = "2001:db8:1::20";
const MARK: &str = "0x80000";

struct Client {
    _lab: Lab,
    ns: Netns,
}

fn client(test: &str) -> Client {
    let mut lab = Lab::new(test).unwrap();
    let ns = lab.add_ns("client").unwrap();
    lab.link(
        (&ns, "lan0", &["198.18.1.10/24", "2001:db8:1::10/64"]),
        (&ns, "lanpeer0", &[]),
    )
    .unwrap();
    ns.set_default_route("198.18.1.1".parse().unwrap()).unwrap();
    ns.set_default_route("2001:db8:1::1".parse().unwrap())
        .unwrap();
    add_tun(&ns);
    Client { _lab: lab, ns }
}

fn add_tun(ns: &Netns) {
    ns.ip(&["tuntap", "add", "dev", TUN, "mode", "tun"])
        .unwrap();
}

fn cfg() -> RouteConfig {
    RouteConfig {
        tun_ifname: TUN.into(),
        ..RouteConfig::default()
    }
}

fn state(exit_node: bool, allow_lan_access: bool) -> RouteState {
    RouteState {
        addresses: vec![
            "100.64.0.1/32".parse().unwrap(),
            "fd7a:115c:a1e0::1/128".parse().unwrap(),
        ],
        peer_routes: vec![
            "100.64.0.2/32".parse().unwrap(),
            "fd7a:115c:a1e0::2/128".parse().unwrap(),
            // The exit node's allowed IPs include the defaults; exit_node decides.
            "0.0.0.0/0".parse().unwrap(),
            "::/0".parse().unwrap(),
        ],
        exit_node,
        block_internet: false,
        allow_lan_access,
        mtu: 1280,
    }
}

/// The manager's netlink socket is created inside the namespace and stays there, so the
/// manager can then be used from the test thread.
fn manager(ns: &Netns) -> RouteManager {
    ns.run(|| RouteManager::new(cfg())).unwrap().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(ns: &Netns, args: &[&str]) -> String {
    text(&ns.ip(args).unwrap())
}

/// `ip route get DST [mark M]`: the first line, or the error.
fn route_get(ns: &Netns, dst: &str, mark: Option<&str>) -> Result<String, String> {
    let mut argv = vec!["ip", "route", "get", dst];
    if let Some(m) = mark {
        argv.extend(["mark", m]);
    }
    let out = ns.exec_status(&argv).unwrap();
    if out.status.success() {
        Ok(text(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Asserts that `dst` is routed through `dev` (and, for the tun, by table 52).
fn assert_via(ns: &Netns, dst: &str, mark: Option<&str>, dev: &str) {
    let got = route_get(ns, dst, mark).unwrap_or_else(|e| panic!("route get {dst}: {e}"));
    assert!(
        got.contains(&format!(" dev {dev} ")),
        "{dst} (mark {mark:?}) should leave via {dev}: {got}"
    );
    if dev == TUN {
        assert!(got.contains(" table 52 "), "{got}");
    }
}

/// Our rules (priorities 5200..5300) as `ip rule` prints them.
fn our_rules(ns: &Netns, family: &str) -> Vec<String> {
    ip(ns, &[family, "rule"])
        .lines()
        .filter(|l| {
            l.split(':')
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| (5200..5300).contains(&p))
        })
        .map(|l| l.replace('\t', " ").trim().to_owned())
        .collect()
}

/// Table 52, one route a line; "linkdown" dropped (a `tuntap add` tun has no carrier).
fn table52(ns: &Netns, family: &str) -> Vec<String> {
    let mut lines: Vec<String> = ip(ns, &[family, "route", "show", "table", "52"])
        .lines()
        .map(|l| l.replace(" linkdown", "").trim().to_owned())
        .collect();
    lines.sort();
    lines
}

const BASE_RULES_V4: [&str; 3] = [
    "5210: from all fwmark 0x80000/0xff0000 lookup main proto 52",
    "5250: from all fwmark 0x80000/0xff0000 unreachable proto 52",
    "5270: from all lookup 52 proto 52",
];

/// IPv6 with an exit node and no LAN access: link-local destinations are unreachable too.
const EXIT_RULES_V6: [&str; 4] = [
    "5210: from all fwmark 0x80000/0xff0000 lookup main proto 52",
    "5250: from all fwmark 0x80000/0xff0000 unreachable proto 52",
    "5255: from all to fe80::/10 unreachable proto 52",
    "5270: from all lookup 52 proto 52",
];

/// `ip -6 route get fe80::1 oif lan0` (a router-advertised link-local resolver).
fn link_local_route(ns: &Netns, mark: Option<&str>) -> Result<String, String> {
    let mut argv = vec!["ip", "-6", "route", "get", "fe80::1", "oif", "lan0"];
    if let Some(m) = mark {
        argv.extend(["mark", m]);
    }
    let out = ns.exec_status(&argv).unwrap();
    if out.status.success() {
        Ok(text(&out).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn with_lan(base: &[&str], lan: &str) -> Vec<String> {
    let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    v.insert(1, format!("5240: from all to {lan} lookup main proto 52"));
    v
}

#[test]
fn exit_node_routes_internet_into_tun_and_marked_packets_out() {
    let c = client("os_route_exit");
    let ns = &c.ns;
    let mut m = manager(ns);
    m.apply(&state(true, false)).unwrap();

    // The tun: addresses, MTU, up.
    let link = ip(ns, &["-o", "link", "show", "dev", TUN]);
    assert!(link.contains("mtu 1280"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let addrs = ip(ns, &["-o", "addr", "show", "dev", TUN]);
    assert!(addrs.contains("inet 100.64.0.1/32"), "{addrs}");
    assert!(addrs.contains("inet6 fd7a:115c:a1e0::1/128"), "{addrs}");

    // Internet and LAN through the tunnel; our own marked packets out of lan0.
    assert_via(ns, INTERNET4, None, TUN);
    assert_via(ns, INTERNET6, None, TUN);
    assert_via(ns, LAN_HOST4, None, TUN);
    assert_via(ns, LAN_HOST6, None, TUN);
    assert_via(ns, "100.64.0.2", None, TUN);
    for dst in [INTERNET4, INTERNET6, LAN_HOST4, LAN_HOST6] {
        assert_via(ns, dst, Some(MARK), "lan0");
    }
    let marked = route_get(ns, INTERNET4, Some(MARK)).unwrap();
    assert!(marked.contains("via 198.18.1.1 dev lan0"), "{marked}");
    // Other bits of the mark do not matter, the masked ones do.
    assert_via(ns, INTERNET4, Some("0x80001"), "lan0");
    assert_via(ns, INTERNET4, Some("0x40000"), TUN);

    assert_eq!(our_rules(ns, "-4"), BASE_RULES_V4);
    assert_eq!(our_rules(ns, "-6"), EXIT_RULES_V6);
    // A link-local resolver on the LAN: unreachable, except for our own marked packets.
    let err = link_local_route(ns, None).expect_err("fe80::1 behind an exit node");
    assert!(err.contains("unreachable"), "{err}");
    let marked = link_local_route(ns, Some(MARK)).unwrap();
    assert!(marked.contains("dev lan0"), "{marked}");
    assert_eq!(
        table52(ns, "-4"),
        [
            "100.64.0.2 dev tsutest0 proto 52 scope link",
            "default dev tsutest0 proto 52 scope link",
            "unreachable default proto 52 metric 2147483647",
        ]
    );
    assert_eq!(
        table52(ns, "-6"),
        [
            "default dev tsutest0 proto 52 metric 1024 pref medium",
            "fd7a:115c:a1e0::2 dev tsutest0 proto 52 metric 1024 pref medium",
            "unreachable default dev lo proto 52 metric 2147483647 pref medium",
        ]
    );
    m.cleanup().unwrap();
}

#[test]
fn allow_lan_access_toggles_direct_lan_reachability() {
    let c = client("os_route_lan");
    let ns = &c.ns;
    let mut m = manager(ns);
    for _ in 0..2 {
        m.apply(&state(true, true)).unwrap();
        assert_via(ns, LAN_HOST4, None, "lan0");
        assert_via(ns, LAN_HOST6, None, "lan0");
        let ll = link_local_route(ns, None).expect("fe80::1 with LAN access");
        assert!(ll.contains("dev lan0"), "{ll}");
        assert_via(ns, INTERNET4, None, TUN);
        assert_via(ns, INTERNET6, None, TUN);
        assert_eq!(
            our_rules(ns, "-4"),
            with_lan(&BASE_RULES_V4, "198.18.1.0/24")
        );
        // fe80::/64 on lan0 is link-local: no exemption for it.
        assert_eq!(
            our_rules(ns, "-6"),
            with_lan(&BASE_RULES_V4, "2001:db8:1::/64")
        );

        m.apply(&state(true, false)).unwrap();
        assert_via(ns, LAN_HOST4, None, TUN);
        assert_via(ns, LAN_HOST6, None, TUN);
        assert_via(ns, LAN_HOST4, Some(MARK), "lan0");
        assert_eq!(our_rules(ns, "-4"), BASE_RULES_V4);
        assert_eq!(our_rules(ns, "-6"), EXIT_RULES_V6);
    }
    m.cleanup().unwrap();
}

#[test]
fn without_exit_node_only_tailnet_goes_into_the_tun() {
    let c = client("os_route_noexit");
    let ns = &c.ns;
    let mut m = manager(ns);
    for _ in 0..2 {
        m.apply(&state(false, true)).unwrap();
        assert_via(ns, "100.64.0.2", None, TUN);
        assert_via(ns, "fd7a:115c:a1e0::2", None, TUN);
        assert_via(ns, INTERNET4, None, "lan0");
        assert_via(ns, INTERNET6, None, "lan0");
        assert_via(ns, LAN_HOST4, None, "lan0");
        // No LAN exemptions without an exit node (allow_lan_access is moot).
        assert_eq!(our_rules(ns, "-4"), BASE_RULES_V4);
        assert_eq!(
            table52(ns, "-4"),
            ["100.64.0.2 dev tsutest0 proto 52 scope link"]
        );
        assert_eq!(
            table52(ns, "-6"),
            ["fd7a:115c:a1e0::2 dev tsutest0 proto 52 metric 1024 pref medium"]
        );

        m.apply(&state(true, false)).unwrap();
        assert_via(ns, INTERNET4, None, TUN);
        assert_via(ns, INTERNET6, None, TUN);
    }
    m.cleanup().unwrap();
}

#[test]
fn tun_disappearing_fails_closed() {
    let c = client("os_route_failclosed");
    let ns = &c.ns;
    let mut m = manager(ns);
    m.apply(&state(true, false)).unwrap();

    // What a daemon crash does to a (non-persistent) tun.
    ns.ip(&["link", "del", TUN]).unwrap();
    for dst in [INTERNET4, INTERNET6, LAN_HOST4, "100.64.0.2"] {
        let err = route_get(ns, dst, None).expect_err(dst);
        assert!(err.contains("No route to host"), "{dst}: {err}");
    }
    assert_eq!(
        table52(ns, "-4"),
        ["unreachable default proto 52 metric 2147483647"]
    );
    assert_eq!(
        table52(ns, "-6"),
        ["unreachable default dev lo proto 52 metric 2147483647 pref medium"]
    );
    // The daemon's own traffic still gets out, to reconnect.
    assert_via(ns, INTERNET4, Some(MARK), "lan0");
    assert_via(ns, INTERNET6, Some(MARK), "lan0");

    // Tun back (daemon restarted): apply repairs the routes the kernel dropped.
    assert!(matches!(
        m.apply(&state(true, false)),
        Err(RouteError::LinkNotFound(ref n)) if n == TUN
    ));
    add_tun(ns);
    m.apply(&state(true, false)).unwrap();
    assert_via(ns, INTERNET4, None, TUN);
    assert_via(ns, INTERNET6, None, TUN);
    assert_eq!(table52(ns, "-4").len(), 3);
    m.cleanup().unwrap();
}

#[test]
fn cleanup_removes_exactly_our_rules_and_routes() {
    let c = client("os_route_cleanup");
    let ns = &c.ns;
    // Somebody else's rules at priorities we use (one of them looking exactly like
    // ours but for the owner protocol), and their table.
    for rule in [
        "pref 5240 to 198.51.100.0/24 lookup 100",
        "pref 5270 fwmark 0x1 lookup 52",
        "pref 5270 lookup 52",
    ] {
        let mut args = vec!["rule", "add"];
        args.extend(rule.split(' '));
        ns.ip(&args).unwrap();
    }
    ns.ip(&[
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "198.18.1.1",
        "table",
        "100",
    ])
    .unwrap();
    let foreign_rules = [
        "5240: from all to 198.51.100.0/24 lookup 100",
        "5270: from all fwmark 0x1 lookup 52",
        "5270: from all lookup 52",
    ];

    let mut m = manager(ns);
    m.apply(&state(true, true)).unwrap();
    m.apply(&state(true, true)).unwrap();
    let rules = our_rules(ns, "-4");
    assert_eq!(rules.len(), 7, "{rules:?}");
    for f in foreign_rules {
        assert!(rules.contains(&f.to_string()), "{rules:?}");
    }

    m.cleanup().unwrap();
    assert_eq!(our_rules(ns, "-4"), foreign_rules);
    assert_eq!(our_rules(ns, "-6"), Vec::<String>::new());
    assert_eq!(table52(ns, "-4"), Vec::<String>::new());
    assert_eq!(table52(ns, "-6"), Vec::<String>::new());
    assert_eq!(
        ip(ns, &["route", "show", "table", "100"]).trim(),
        "198.51.100.0/24 via 198.18.1.1 dev lan0"
    );
    // Back to plain main-table routing.
    let got = route_get(ns, INTERNET4, None).unwrap();
    assert!(got.contains("via 198.18.1.1 dev lan0"), "{got}");
}

#[test]
fn cleanup_stale_removes_what_a_crashed_daemon_left() {
    let c = client("os_route_stale");
    let ns = &c.ns;
    let mut m = manager(ns);
    m.apply(&state(true, true)).unwrap();
    drop(m); // a crash: nothing is undone
    ns.ip(&["link", "del", TUN]).unwrap();
    assert!(route_get(ns, INTERNET4, None).is_err(), "still fail closed");

    // Start-up of the next daemon, before its tun exists.
    ns.run(|| route::cleanup_stale(&cfg())).unwrap().unwrap();
    assert_eq!(our_rules(ns, "-4"), Vec::<String>::new());
    assert_eq!(our_rules(ns, "-6"), Vec::<String>::new());
    assert_eq!(table52(ns, "-4"), Vec::<String>::new());
    assert_eq!(table52(ns, "-6"), Vec::<String>::new());
    assert_via(ns, INTERNET4, None, "lan0");
    // Idempotent: nothing left to clean is fine.
    ns.run(|| route::cleanup_stale(&cfg())).unwrap().unwrap();
}

#[test]
fn apply_converges_addresses_and_peer_routes() {
    let c = client("os_route_converge");
    let ns = &c.ns;
    let mut m = manager(ns);
    m.apply(&state(false, false)).unwrap();
    let before = (our_rules(ns, "-4"), table52(ns, "-4"), table52(ns, "-6"));
    m.apply(&state(false, false)).unwrap();
    assert_eq!(
        (our_rules(ns, "-4"), table52(ns, "-4"), table52(ns, "-6")),
        before
    );

    let next = RouteState {
        addresses: vec!["100.64.0.5/32".parse().unwrap()],
        peer_routes: vec![
            "100.64.0.3/32".parse().unwrap(),
            "198.18.9.0/24".parse().unwrap(),
            "fd7a:115c:a1e0::3/128".parse().unwrap(),
        ],
        mtu: 1400,
        ..RouteState::default()
    };
    m.apply(&next).unwrap();
    let addrs: Vec<String> = ip(ns, &["-o", "addr", "show", "dev", TUN])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .filter(|a| !a.starts_with("fe80:"))
        .collect();
    assert_eq!(addrs, ["100.64.0.5/32"]);
    assert!(ip(ns, &["-o", "link", "show", "dev", TUN]).contains("mtu 1400"));
    assert_eq!(
        table52(ns, "-4"),
        [
            "100.64.0.3 dev tsutest0 proto 52 scope link",
            "198.18.9.0/24 dev tsutest0 proto 52 scope link",
        ]
    );
    assert_eq!(
        table52(ns, "-6"),
        ["fd7a:115c:a1e0::3 dev tsutest0 proto 52 metric 1024 pref medium"]
    );
    m.cleanup().unwrap();
}

#[test]
fn kernel_refusals_name_the_operation_and_errno() {
    let c = client("os_route_errors");
    let ns = &c.ns;
    let err = ns
        .run(|| -> Result<(), RouteError> {
            let mut nl = NetlinkBackend::open()?;
            assert_eq!(nl.link_by_name("nosuchdev0")?, None);
            let tun = nl.link_by_name(TUN)?.expect("tun exists");
            assert_eq!(tun.name, TUN);
            // A route through a link that is down: the kernel refuses.
            nl.add_route(&Route {
                dst: "100.64.0.9/32".parse().unwrap(),
                table: 52,
                kind: RouteKind::Unicast,
                oif: Some(tun.index),
                gateway: None,
                multipath: false,
                metric: 0,
                scope: 253,
                protocol: 4,
            })?;
            let _ = nl.rules(Family::V4)?;
            Ok(())
        })
        .unwrap()
        .expect_err("route through a down link must fail");
    let msg = err.to_string();
    assert_eq!(err.raw_os_error(), Some(libc::ENETDOWN), "{msg}");
    assert!(msg.starts_with("adding route 100.64.0.9/32 dev #"), "{msg}");
    assert!(msg.contains("Network is down"), "{msg}");
    // The kernel's own words (extended ack); their wording varies between versions.
    assert!(
        msg.contains("(kernel: ") && msg.contains("not up)"),
        "{msg}"
    );

    // Bad configuration is refused before touching the kernel.
    let bad = RouteConfig {
        table: 254,
        ..cfg()
    };
    assert!(matches!(
        ns.run(|| RouteManager::new(bad)).unwrap(),
        Err(RouteError::InvalidConfig(_))
    ));
}
