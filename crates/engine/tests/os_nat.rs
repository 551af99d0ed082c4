//! `os::nat` against a real kernel (root required): the table it installs, replacing a
//! stale one, removal, and actual forwarding + masquerading + MSS clamping between
//! namespaces, with a veth named like the tun standing in for it (the rules match the
//! interface by name; WireGuard is not the point here).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use tsunagu_engine::os::host::host_nets;
use tsunagu_engine::os::nat::{ExitNat, ExitNatConfig, NatError};
use tsunagu_engine::scope::closed_nets;
use tsunagu_lab::{Lab, Netns, capture_filtered, http_get, whoami_server};

const TUN: &str = "tsutest0";
const V4_FWD: &str = "net.ipv4.ip_forward";
const V6_FWD: &str = "net.ipv6.conf.all.forwarding";

/// The exit node's own tailnet addresses (on its "tun" in [`net`]).
const OWN: [&str; 2] = ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"];

fn cfg(sources: &[&str]) -> ExitNatConfig {
    ExitNatConfig {
        tun_ifname: TUN.into(),
        allowed_sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
        own_addresses: OWN.iter().map(|s| s.parse().unwrap()).collect(),
        tun_mtu: 1280,
        ..ExitNatConfig::default()
    }
}

fn nft(ns: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["nft"];
    argv.extend_from_slice(args);
    String::from_utf8_lossy(&ns.exec(&argv).unwrap().stdout).into_owned()
}

fn tables(ns: &Netns) -> Vec<String> {
    nft(ns, &["list", "tables"])
        .lines()
        .map(|l| l.trim().to_owned())
        .collect()
}

/// (name, type, hook, prio, policy) of a chain.
type ChainInfo = (String, String, String, i64, String);

/// Every chain of `inet tsunagu`, and its rules as nft prints them.
fn chains_and_rules(ns: &Netns) -> (Vec<ChainInfo>, Vec<String>) {
    let json: Value = serde_json::from_str(&nft(ns, &["-j", "list", "table", "inet", "tsunagu"]))
        .expect("nft -j output is JSON");
    let mut chains = Vec::new();
    for obj in json["nftables"].as_array().expect("nftables array") {
        if let Some(c) = obj.get("chain") {
            chains.push((
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["type"].as_str().unwrap_or_default().to_owned(),
                c["hook"].as_str().unwrap_or_default().to_owned(),
                c["prio"].as_i64().unwrap_or(-1),
                c["policy"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    let rules = nft(ns, &["list", "table", "inet", "tsunagu"])
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("iifname") || l.starts_with("oifname"))
        .map(str::to_owned)
        .collect();
    (chains, rules)
}

fn expected_chains() -> Vec<ChainInfo> {
    vec![
        (
            "forward".into(),
            "filter".into(),
            "forward".into(),
            0,
            "accept".into(),
        ),
        (
            "postrouting".into(),
            "nat".into(),
            "postrouting".into(),
            100,
            "accept".into(),
        ),
        (
            "input".into(),
            "filter".into(),
            "input".into(),
            0,
            "accept".into(),
        ),
    ]
}

fn forwarding(ns: &Netns) -> (String, String) {
    (
        ns.sysctl_get(V4_FWD).unwrap(),
        ns.sysctl_get(V6_FWD).unwrap(),
    )
}

fn node(test: &str) -> (Lab, Netns) {
    let mut lab = Lab::new(test).unwrap();
    let ns = lab.add_ns("exit").unwrap();
    ns.sysctl(V4_FWD, "0").unwrap();
    ns.sysctl(V6_FWD, "0").unwrap();
    (lab, ns)
}

#[test]
fn install_creates_our_table_and_remove_deletes_only_it() {
    let (_lab, ns) = node("os_nat_install");
    ns.nft("table inet other {\n chain c { type filter hook input priority 0; }\n}")
        .unwrap();

    let nat = ns
        .run(|| ExitNat::install(&cfg(&["100.64.0.2/32", "fd7a:115c:a1e0::2/128"])))
        .unwrap()
        .unwrap();
    let (chains, rules) = chains_and_rules(&ns);
    assert_eq!(chains, expected_chains());
    assert_eq!(
        rules,
        [
            r#"iifname "tsutest0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu"#,
            r#"iifname "tsutest0" meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size set 1240"#,
            r#"iifname "tsutest0" meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size set 1220"#,
            r#"oifname "tsutest0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu"#,
            r#"oifname "tsutest0" ct state established,related accept"#,
            // nft folds `& 0xff00ffff | 0x40000` into an equivalent mask when printing.
            r#"iifname "tsutest0" ip saddr 100.64.0.2 meta mark set meta mark & 0xff04ffff | 0x00040000 accept"#,
            r#"iifname "tsutest0" ip6 saddr fd7a:115c:a1e0::2 meta mark set meta mark & 0xff04ffff | 0x00040000 accept"#,
            r#"iifname "tsutest0" counter packets 0 bytes 0 drop"#,
            r#"oifname != "tsutest0" meta mark & 0x00ff0000 == 0x00040000 masquerade"#,
            r#"iifname "tsutest0" icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept"#,
            r#"iifname "tsutest0" ip daddr 100.64.0.1 accept"#,
            r#"iifname "tsutest0" ip6 daddr fd7a:115c:a1e0::1 accept"#,
            r#"iifname "tsutest0" counter packets 0 bytes 0 drop"#,
        ]
    );
    assert_eq!(forwarding(&ns), ("1".into(), "1".into()));

    ns.run(|| nat.remove()).unwrap().unwrap();
    assert_eq!(tables(&ns), ["table inet other"]);
    assert_eq!(forwarding(&ns), ("0".into(), "0".into()));
}

#[test]
fn install_replaces_a_stale_table_and_installing_twice_works() {
    let (_lab, ns) = node("os_nat_stale");
    // What a crashed older daemon might have left: extra chain, other rules.
    ns.nft(
        "table inet tsunagu {\n\
         chain junk { type filter hook input priority 0; policy drop; }\n\
         chain forward { type filter hook forward priority 0; ip saddr 198.18.0.0/15 drop; }\n\
         }",
    )
    .unwrap();

    let first = ns
        .run(|| ExitNat::install(&cfg(&["100.64.0.2/32"])))
        .unwrap()
        .unwrap();
    let (chains, rules) = chains_and_rules(&ns);
    assert_eq!(chains, expected_chains());
    assert!(!rules.iter().any(|r| r.contains("198.18.0.0")), "{rules:?}");

    // A second install (say, a restarted daemon that did not clean up) replaces it.
    let second = ns
        .run(|| ExitNat::install(&cfg(&["100.64.0.3/32"])))
        .unwrap()
        .unwrap();
    let (chains, rules) = chains_and_rules(&ns);
    assert_eq!(chains, expected_chains());
    assert_eq!(rules.len(), 12, "{rules:?}");
    assert!(
        rules.iter().any(|r| r.contains("ip saddr 100.64.0.3 ")),
        "{rules:?}"
    );
    assert!(!rules.iter().any(|r| r.contains("100.64.0.2")), "{rules:?}");
    assert_eq!(tables(&ns), ["table inet tsunagu"]);

    drop(first); // dropping does not remove anything
    assert_eq!(tables(&ns), ["table inet tsunagu"]);
    drop(second);

    ns.run(|| ExitNat::remove_stale("tsunagu"))
        .unwrap()
        .unwrap();
    assert_eq!(tables(&ns), Vec::<String>::new());
    // Nothing to remove is fine too.
    ns.run(|| ExitNat::remove_stale("tsunagu"))
        .unwrap()
        .unwrap();
    assert!(matches!(
        ns.run(|| ExitNat::remove_stale("bad name")).unwrap(),
        Err(NatError::InvalidConfig(_))
    ));
}

#[test]
fn update_swaps_allowed_sources_and_table_name() {
    let (_lab, ns) = node("os_nat_update");
    let mut nat = ns
        .run(|| ExitNat::install(&cfg(&["100.64.0.2/32"])))
        .unwrap()
        .unwrap();
    ns.run(|| {
        nat.update(&cfg(&[
            "100.64.0.0/30",
            "100.64.0.3/32",
            "fd7a:115c:a1e0::/64",
        ]))
    })
    .unwrap()
    .unwrap();
    let (_, rules) = chains_and_rules(&ns);
    assert!(
        rules.iter().any(|r| r.contains("ip saddr 100.64.0.0/30 ")),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.contains("ip6 saddr fd7a:115c:a1e0::/64 ")),
        "{rules:?}"
    );
    assert!(!rules.iter().any(|r| r.contains("100.64.0.2")), "{rules:?}");

    let renamed = ExitNatConfig {
        table: "tsunagu2".into(),
        ..cfg(&[])
    };
    ns.run(|| nat.update(&renamed)).unwrap().unwrap();
    assert_eq!(tables(&ns), ["table inet tsunagu2"]);
    ns.run(|| nat.remove()).unwrap().unwrap();
    assert_eq!(tables(&ns), Vec::<String>::new());
}

/// peer (100.64.0.2, fd7a:115c:a1e0::2) --"tsutest0"-- exit --uplink0-- web (203.0.113.10,
/// 2001:db8:2::10), and a plain LAN host (198.18.2.10) routed through the exit without NAT.
/// The web server has no route back to the tailnet: only masqueraded traffic gets answers.
struct Net {
    lab: Lab,
    peer: Netns,
    exit: Netns,
    web: Netns,
    lan: Netns,
}

fn net(test: &str) -> Net {
    let mut lab = Lab::new(test).unwrap();
    let peer = lab.add_ns("peer").unwrap();
    let exit = lab.add_ns("exit").unwrap();
    let web = lab.add_ns("web").unwrap();
    let lan = lab.add_ns("lan").unwrap();
    lab.link(
        (&peer, "eth0", &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]),
        (&exit, TUN, &["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]),
    )
    .unwrap();
    lab.link(
        (&exit, "uplink0", &["198.51.100.2/24", "2001:db8:1::2/64"]),
        (&web, "eth0", &["198.51.100.1/24", "2001:db8:1::1/64"]),
    )
    .unwrap();
    lab.link(
        (&exit, "lan0", &["198.18.2.1/24"]),
        (&lan, "eth0", &["198.18.2.10/24"]),
    )
    .unwrap();
    web.add_addr("eth0", "203.0.113.10/32").unwrap();
    web.add_addr("eth0", "2001:db8:2::10/128").unwrap();
    web.add_route("198.18.2.0/24", "198.51.100.2".parse().unwrap())
        .unwrap();
    lan.set_default_route("198.18.2.1".parse().unwrap())
        .unwrap();
    for (ns, args) in [
        (
            &peer,
            &[
                "route",
                "add",
                "default",
                "via",
                "100.64.0.1",
                "dev",
                "eth0",
                "onlink",
            ][..],
        ),
        (
            &peer,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd7a:115c:a1e0::1",
                "dev",
                "eth0",
                "onlink",
            ][..],
        ),
        (&exit, &["route", "add", "100.64.0.2/32", "dev", TUN][..]),
        (
            &exit,
            &["-6", "route", "add", "fd7a:115c:a1e0::2/128", "dev", TUN][..],
        ),
        (
            &exit,
            &["route", "add", "203.0.113.0/24", "via", "198.51.100.1"][..],
        ),
        (
            &exit,
            &[
                "-6",
                "route",
                "add",
                "2001:db8:2::/64",
                "via",
                "2001:db8:1::1",
            ][..],
        ),
        // The tailnet MTU on the exit's "tun"; the peer keeps 1500 and so offers MSS 1460.
        (&exit, &["link", "set", "dev", TUN, "mtu", "1280"][..]),
    ] {
        ns.ip(args).unwrap();
    }
    exit.sysctl(V4_FWD, "0").unwrap();
    exit.sysctl(V6_FWD, "0").unwrap();
    Net {
        lab,
        peer,
        exit,
        web,
        lan,
    }
}

fn web4() -> SocketAddr {
    SocketAddr::new("203.0.113.10".parse::<IpAddr>().unwrap(), 80)
}

fn web6() -> SocketAddr {
    SocketAddr::new("2001:db8:2::10".parse::<IpAddr>().unwrap(), 80)
}

/// The address the web server saw, or None when the request did not get through.
fn seen(ns: &Netns, addr: SocketAddr) -> Option<String> {
    http_get(ns, addr, Duration::from_millis(1500))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn drop_counter(exit: &Netns) -> u64 {
    nft(exit, &["list", "chain", "inet", "tsunagu", "forward"])
        .lines()
        .find(|l| l.contains("counter packets") && l.contains("drop"))
        .and_then(|l| {
            let mut it = l.split_whitespace().skip_while(|w| *w != "packets");
            it.nth(1).and_then(|n| n.parse().ok())
        })
        .expect("drop rule with counter")
}

#[test]
fn exit_node_forwards_and_masquerades_only_allowed_sources() {
    let n = net("os_nat_forward");
    let _w4 = whoami_server(&n.web, web4()).unwrap();
    let _w6 = whoami_server(&n.web, web6()).unwrap();

    // Not an exit node yet: forwarding is off.
    assert_eq!(seen(&n.peer, web4()), None);

    // Installed, but this peer is not allowed to use us: dropped (and counted).
    let mut nat = n
        .exit
        .run(|| ExitNat::install(&cfg(&["100.64.0.9/32", "fd7a:115c:a1e0::9/128"])))
        .unwrap()
        .unwrap();
    assert_eq!(seen(&n.peer, web4()), None);
    assert_eq!(seen(&n.peer, web6()), None);
    assert!(drop_counter(&n.exit) > 0);

    // Allowed: forwarded, and the web server sees the exit node's address.
    n.exit
        .run(|| nat.update(&cfg(&["100.64.0.2/32", "fd7a:115c:a1e0::2/128"])))
        .unwrap()
        .unwrap();
    assert_eq!(seen(&n.peer, web4()).as_deref(), Some("198.51.100.2"));
    assert_eq!(seen(&n.peer, web6()).as_deref(), Some("2001:db8:1::2"));
    // Other forwarding through the host is untouched: not dropped, not masqueraded.
    assert_eq!(seen(&n.lan, web4()).as_deref(), Some("198.18.2.10"));

    n.exit.run(|| nat.remove()).unwrap().unwrap();
    assert_eq!(tables(&n.exit), Vec::<String>::new());
    assert_eq!(forwarding(&n.exit), ("0".into(), "0".into()));
    assert_eq!(seen(&n.peer, web4()), None);
}

#[test]
fn syn_mss_is_clamped_to_the_tunnel_mtu_both_ways() {
    let mut n = net("os_nat_mss");
    let _w4 = whoami_server(&n.web, web4()).unwrap();
    let _w6 = whoami_server(&n.web, web6()).unwrap();
    let nat = n
        .exit
        .run(|| ExitNat::install(&cfg(&["100.64.0.2/32", "fd7a:115c:a1e0::2/128"])))
        .unwrap()
        .unwrap();

    let dir = n.lab.dir().to_owned();
    let syn = ["tcp[tcpflags] & tcp-syn != 0 or (ip6 and ip6[53] & 2 != 0)"];
    let at_web = capture_filtered(&mut n.lab, &n.web, "eth0", &dir.join("web.pcap"), &syn).unwrap();
    let at_peer =
        capture_filtered(&mut n.lab, &n.peer, "eth0", &dir.join("peer.pcap"), &syn).unwrap();
    assert_eq!(seen(&n.peer, web4()).as_deref(), Some("198.51.100.2"));
    assert_eq!(seen(&n.peer, web6()).as_deref(), Some("2001:db8:1::2"));
    let web_lines = at_web.finish(&mut n.lab).unwrap();
    let peer_lines = at_peer.finish(&mut n.lab).unwrap();

    // MSS options of SYNs ("[S]") or SYN-ACKs ("[S.]") sent by `from`.
    let mss = |lines: &[String], from: &str, flags: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| {
                l.contains(&format!(" {from}.")) && l.contains(&format!("Flags [{flags}],"))
            })
            .filter(|l| l.split(" > ").next().is_some_and(|src| src.contains(from)))
            .filter_map(|l| l.split("mss ").nth(1))
            .filter_map(|rest| rest.split(',').next().map(str::to_owned))
            .collect()
    };
    // The peer offered 1460/1440 (MTU 1500); the server sees what fits the tunnel.
    assert_eq!(
        mss(&web_lines, "198.51.100.2", "S"),
        ["1240"],
        "{web_lines:#?}"
    );
    assert_eq!(
        mss(&web_lines, "2001:db8:1::2", "S"),
        ["1220"],
        "{web_lines:#?}"
    );
    // The server offered 1460/1440 (see it leave); towards the tun `rt mtu` clamps it to
    // the tun's MTU.
    assert_eq!(
        mss(&web_lines, "203.0.113.10", "S."),
        ["1460"],
        "{web_lines:#?}"
    );
    assert_eq!(
        mss(&peer_lines, "203.0.113.10", "S."),
        ["1240"],
        "{peer_lines:#?}"
    );
    assert_eq!(
        mss(&web_lines, "2001:db8:2::10", "S."),
        ["1440"],
        "{web_lines:#?}"
    );
    assert_eq!(
        mss(&peer_lines, "2001:db8:2::10", "S."),
        ["1220"],
        "{peer_lines:#?}"
    );
    // And what the peer sent before the exit node clamped it.
    assert_eq!(
        mss(&peer_lines, "100.64.0.2", "S"),
        ["1460"],
        "{peer_lines:#?}"
    );
    assert_eq!(
        mss(&peer_lines, "fd7a:115c:a1e0::2", "S"),
        ["1440"],
        "{peer_lines:#?}"
    );

    // The clamp only ever lowers an MSS: a peer that asks for less keeps it. (An MTU
    // below 1280 turns IPv6 off on the peer's link, so this part is IPv4 only.)
    n.peer
        .ip(&["link", "set", "dev", "eth0", "mtu", "1200"])
        .unwrap();
    let at_web =
        capture_filtered(&mut n.lab, &n.web, "eth0", &dir.join("web2.pcap"), &syn).unwrap();
    assert_eq!(seen(&n.peer, web4()).as_deref(), Some("198.51.100.2"));
    let web_lines = at_web.finish(&mut n.lab).unwrap();
    assert_eq!(
        mss(&web_lines, "198.51.100.2", "S"),
        ["1160"],
        "{web_lines:#?}"
    );

    n.exit.run(|| nat.remove()).unwrap().unwrap();
}

/// The number of packets the last rule of `chain` (its catch-all drop) counted.
fn last_drop(exit: &Netns, chain: &str) -> u64 {
    nft(exit, &["list", "chain", "inet", "tsunagu", chain])
        .lines()
        .rfind(|l| l.contains("counter packets") && l.contains("drop"))
        .and_then(|l| {
            let mut it = l.split_whitespace().skip_while(|w| *w != "packets");
            it.nth(1).and_then(|n| n.parse().ok())
        })
        .expect("drop rule with counter")
}

#[test]
fn the_exit_hosts_own_addresses_and_lan_stay_closed_to_the_tun() {
    let n = net("os_nat_closed");
    let _w4 = whoami_server(&n.web, web4()).unwrap();
    let lan_host: SocketAddr = "198.18.2.10:80".parse().unwrap();
    let _lan = whoami_server(&n.lan, lan_host).unwrap();
    // Services on the exit host: its public address, its LAN address, its tailnet one.
    let on_exit = |a: &str| -> SocketAddr { format!("{a}:8080").parse().unwrap() };
    let _pub = whoami_server(&n.exit, on_exit("198.51.100.2")).unwrap();
    let _lanif = whoami_server(&n.exit, on_exit("198.18.2.1")).unwrap();
    let _ts = whoami_server(&n.exit, on_exit("100.64.0.1")).unwrap();

    let host = n.exit.run(|| host_nets(TUN)).unwrap();
    assert!(
        host.addrs.contains(&"198.51.100.2".parse().unwrap()),
        "{host:?}"
    );
    assert!(
        !host.addrs.contains(&"100.64.0.1".parse().unwrap()),
        "{host:?}"
    );
    let closed = ExitNatConfig {
        closed: closed_nets(&host),
        ..cfg(&["100.64.0.2/32", "fd7a:115c:a1e0::2/128"])
    };
    let mut nat = n.exit.run(|| ExitNat::install(&closed)).unwrap().unwrap();

    // The internet and the exit node's tailnet address: yes.
    assert_eq!(seen(&n.peer, web4()).as_deref(), Some("198.51.100.2"));
    assert_eq!(
        seen(&n.peer, on_exit("100.64.0.1")).as_deref(),
        Some("100.64.0.2")
    );
    // The exit host's public and LAN addresses (input) and its LAN (forward): no.
    let input_before = last_drop(&n.exit, "input");
    for closed_addr in [on_exit("198.51.100.2"), on_exit("198.18.2.1"), lan_host] {
        assert_eq!(seen(&n.peer, closed_addr), None, "{closed_addr}");
    }
    assert!(last_drop(&n.exit, "input") > input_before);
    // The host's own forwarding (the LAN to the internet) is none of our business.
    assert_eq!(seen(&n.lan, web4()).as_deref(), Some("198.18.2.10"));

    // A rule names the LAN: the LAN host and the exit's LAN address open, nothing else.
    let granted = ExitNatConfig {
        granted: vec!["198.18.2.0/24".parse().unwrap()],
        ..closed.clone()
    };
    n.exit.run(|| nat.update(&granted)).unwrap().unwrap();
    assert_eq!(seen(&n.peer, lan_host).as_deref(), Some("198.18.2.1"));
    assert_eq!(
        seen(&n.peer, on_exit("198.18.2.1")).as_deref(),
        Some("100.64.0.2")
    );
    assert_eq!(seen(&n.peer, on_exit("198.51.100.2")), None);

    n.exit.run(|| nat.remove()).unwrap().unwrap();
}
