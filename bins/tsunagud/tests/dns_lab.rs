//! DNS for members, in the seed lab: tsunagud on the cafe laptop uses tsunagud's exit
//! node and resolves through it a name that only the internet side's DNS server knows
//! (the cafe's DHCP-style resolver, in its resolv.conf, is never asked and no DNS shows
//! on the cafe LAN); MagicDNS names; the exit node's DoH refuses peers the policy does
//! not let use it; `tsunagu down` puts resolv.conf back byte for byte.
//!
//! Lab: `web` serves `web.lab.test -> 203.0.113.10` on 203.0.113.53 (the internet's
//! resolver); the cafe router serves a wrong answer on 198.18.1.1 and counts queries.

mod common;

use common::{setup, setup_with_policy, tsunagu, wait};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tsunagu_lab::seed::role;
use tsunagu_lab::{RESOLVER, WEB_ADDR, dns_query, dns_server, whoami_server};

const CAFE_RESOLVER: &str = "198.18.1.1:53";
const QUAD100: &str = "100.100.100.100:53";

/// Asks `ok` of each namespace in turn until it held for both or `within` has passed
/// since `from`: for each, how long after `from` it first held.
fn first_success_of_each(
    nss: [&tsunagu_lab::Netns; 2],
    from: Instant,
    within: Duration,
    ok: impl Fn(&tsunagu_lab::Netns) -> bool,
) -> [Option<Duration>; 2] {
    let mut took = [None, None];
    while from.elapsed() < within && took.iter().any(Option::is_none) {
        for (i, ns) in nss.into_iter().enumerate() {
            if took[i].is_none() && ok(ns) {
                took[i] = Some(from.elapsed());
            }
        }
    }
    took
}

/// The internet's resolver on `web` (203.0.113.53): it alone knows `web.lab.test`.
fn internet_resolver(web: &tsunagu_lab::Netns) -> tsunagu_lab::ServiceHandle {
    dns_server(
        web,
        SocketAddr::new(RESOLVER.into(), 53),
        &[("web.lab.test", IpAddr::V4(WEB_ADDR))],
    )
    .unwrap()
}

fn quad100() -> SocketAddr {
    QUAD100.parse().unwrap()
}

/// Resolve `name` through 100.100.100.100 in `ns`, polling until `ok` holds for the
/// answer or `within` passes; returns the last answer.
fn resolve_until(
    ns: &tsunagu_lab::Netns,
    name: &str,
    within: Duration,
    ok: impl Fn(&Option<(String, Vec<IpAddr>)>) -> bool,
) -> Option<(String, Vec<IpAddr>)> {
    let deadline = Instant::now() + within;
    loop {
        let a = dns_query(ns, quad100(), name, Duration::from_millis(1500)).unwrap_or(None);
        if ok(&a) || Instant::now() >= deadline {
            return a;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_addr(want: &str) -> impl Fn(&Option<(String, Vec<IpAddr>)>) -> bool + '_ {
    move |a| {
        a.as_ref()
            .is_some_and(|(rc, ips)| rc == "No Error" && ips.iter().any(|i| i.to_string() == want))
    }
}

#[test]
fn a_member_resolves_through_the_exit_node_and_nothing_leaks_on_the_cafe_lan() {
    let mut j = setup("dns_exit");
    let web = j.seed.ns(role::WEB);
    let cafe = j.seed.ns(role::CAFE);
    let client_ns = j.seed.ns(role::CLIENT);
    let _inet_dns = internet_resolver(&web);
    let cafe_dns = dns_server(
        &cafe,
        CAFE_RESOLVER.parse().unwrap(),
        &[("web.lab.test", "198.18.1.66".parse().unwrap())],
    )
    .unwrap();
    let _whoami = whoami_server(&web, (WEB_ADDR, 80).into()).unwrap();
    // The laptop got its resolver from the cafe's DHCP.
    let resolv = client_ns.etc_dir().join("resolv.conf");
    let before = b"# from the cafe's DHCP\nnameserver 198.18.1.1\nsearch cafe.example\n".to_vec();
    std::fs::write(&resolv, &before).unwrap();
    // Sanity: the cafe's resolver answers the laptop directly (wrongly).
    let direct = dns_query(
        &client_ns,
        CAFE_RESOLVER.parse().unwrap(),
        "web.lab.test",
        Duration::from_secs(2),
    )
    .unwrap()
    .expect("the cafe resolver answers");
    assert_eq!(direct.1, ["198.18.1.66".parse::<IpAddr>().unwrap()]);
    let asked_before = cafe_dns.count();

    let (cafe_lan, port) = j.seed.cafe_lan_iface();
    let cap = dns_capture(&mut j.seed.lab, &cafe_lan, "cafe-dns", port);

    let c = j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    // resolv.conf now names 100.100.100.100 with the tailnet's search domain.
    wait("resolv.conf installed", Duration::from_secs(20), || {
        std::fs::read_to_string(&resolv).is_ok_and(|t| t.contains("nameserver 100.100.100.100"))
    });
    let installed = std::fs::read_to_string(&resolv).unwrap();
    assert!(installed.contains("search tailnet.internal"), "{installed}");

    // The internet-side name, through the exit node's DoH.
    let a = resolve_until(
        &client_ns,
        "web.lab.test",
        Duration::from_secs(20),
        is_addr("203.0.113.10"),
    );
    assert!(
        is_addr("203.0.113.10")(&a),
        "web.lab.test through the exit node: {a:?}"
    );
    // Fetched by name with the system resolver (glibc reads resolv.conf): the web
    // server sees the exit node.
    let out = client_ns
        .exec(&["curl", "-s", "-m", "10", "http://web.lab.test/"])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "198.51.100.2",
        "fetched by name through the exit node"
    );

    // MagicDNS: the exit node's name, fully qualified and bare (search domain).
    let exit_ip = {
        let st = tsunagu(&client_ns, &c.sock, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        v["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "dev-m1sk9-s1")
            .unwrap()["ip"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = resolve_until(
        &client_ns,
        "dev-m1sk9-s1.tailnet.internal",
        Duration::from_secs(5),
        is_addr(&exit_ip),
    );
    assert!(is_addr(&exit_ip)(&a), "MagicDNS: {a:?}");
    let a = resolve_until(
        &client_ns,
        "ghost.tailnet.internal",
        Duration::from_secs(2),
        |a| {
            a.as_ref()
                .is_some_and(|(rc, _)| rc == "Non-Existent Domain")
        },
    );
    assert_eq!(a.unwrap().0, "Non-Existent Domain");
    let out = client_ns
        .exec(&["getent", "ahostsv4", "dev-m1sk9-s1"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&exit_ip),
        "bare name through the search domain: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ping = client_ns
        .exec_status(&["ping", "-c", "1", "-W", "3", "dev-m1sk9-s1"])
        .unwrap();
    assert!(ping.status.success(), "ping by name: {ping:?}");

    // Nothing asked the cafe's resolver, and no DNS crossed the cafe LAN in the clear.
    assert_eq!(
        cafe_dns.count(),
        asked_before,
        "the cafe resolver was asked"
    );
    let lines = cap.finish(&mut j.seed.lab).unwrap();
    assert!(lines.is_empty(), "DNS on the cafe LAN: {lines:#?}");

    // down: resolv.conf exactly as before.
    let out = tsunagu(&client_ns, &c.sock, &["down"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(&resolv).unwrap(),
        before,
        "resolv.conf restored byte for byte"
    );
}

/// The exit node's PeerAPI URL, from its log.
fn peerapi_url(log: &std::path::Path) -> String {
    let mut url = String::new();
    wait("the exit node's PeerAPI", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        url = text
            .lines()
            .filter(|l| l.contains("peerapi: serving"))
            .filter_map(|l| l.find("http://100.").map(|i| &l[i..]))
            .map(|u| {
                u.split(|c: char| c.is_whitespace() || c == '\x1b')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .next()
            .unwrap_or_default();
        !url.is_empty()
    });
    format!("{url}/dns-query")
}

/// `curl` in `ns`: the HTTP status (as text) of a request with `args`.
fn status_of(ns: &tsunagu_lab::Netns, args: &[&str]) -> String {
    let mut argv = vec![
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-m",
        "8",
    ];
    argv.extend_from_slice(args);
    let out = ns.exec_status(&argv).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_exit_nodes_doh_refuses_outsiders_and_bad_requests_and_keeps_serving() {
    // Members reach everything; guests reach the exit node itself, not the internet
    // through it.
    let mut j = setup_with_policy(
        "dns_doh",
        r#"{
  "tagOwners": { "tag:exit": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [
    { "action": "accept", "src": ["admin"], "dst": ["*:*"] },
    { "action": "accept", "src": ["guest"], "dst": ["tag:exit:*"] },
  ],
}"#,
    );
    let web = j.seed.ns(role::WEB);
    let _inet_dns = internet_resolver(&web);
    let url = peerapi_url(&j.exit_log);
    let client_ns = j.seed.ns(role::CLIENT);
    let _c = j.join_laptop(&[]);
    // A guest: sees the exit node, but the policy does not let it use it.
    let other_ns = j
        .seed
        .add_public_host("other", tsunagu_lab::RELAY2_PUBLIC)
        .unwrap();
    j.admin(&["users", "create", "guest"]);
    let key = j
        .admin(&["preauthkeys", "create", "--user", "guest"])
        .lines()
        .last()
        .unwrap()
        .to_string();
    let _o = j.join("other", "other", "guest-node", &key, &[]);
    let q = tsunagu_dns::message::build_query(
        7,
        "web.lab.test",
        tsunagu_dns::hickory_proto::rr::RecordType::A,
    )
    .unwrap();
    let qfile = j.seed.lab.log_path("q.bin");
    std::fs::write(&qfile, &q).unwrap();
    let body = format!("@{}", qfile.display());
    let post = |ns: &tsunagu_lab::Netns, ct: &str, data: &str| {
        status_of(
            ns,
            &[
                "-X",
                "POST",
                "-H",
                &format!("content-type: {ct}"),
                "--data-binary",
                data,
                &url,
            ],
        )
    };
    // The member gets answers (once the map has reached the exit node).
    let mut code = String::new();
    wait("DoH answers the member", Duration::from_secs(20), || {
        code = post(&client_ns, "application/dns-message", &body);
        code == "200"
    });
    // GET ?dns= too.
    let get = tsunagu_dns::doh::get_url(&url, &q);
    assert_eq!(status_of(&client_ns, &[&get]), "200");
    // Not allowed to use the exit node: 403, whatever it sends.
    let mut refused = String::new();
    wait(
        "the tagged node reaches the PeerAPI",
        Duration::from_secs(20),
        || {
            refused = post(&other_ns, "application/dns-message", &body);
            !refused.is_empty() && refused != "000"
        },
    );
    assert_eq!(refused, "403");
    // Bad requests from the member: 4xx, and the exit node keeps serving.
    let big = j.seed.lab.log_path("big.bin");
    std::fs::write(&big, vec![0u8; 5000]).unwrap();
    let big = format!("@{}", big.display());
    assert_eq!(
        post(&client_ns, "application/dns-message", "hello, not DNS"),
        "400"
    );
    assert_eq!(post(&client_ns, "text/plain", &body), "415");
    assert_eq!(post(&client_ns, "application/dns-message", &big), "413");
    assert_eq!(status_of(&client_ns, &[&url]), "400", "GET without ?dns=");
    assert_eq!(post(&client_ns, "application/dns-message", &body), "200");
}

#[test]
fn resolv_conf_is_restored_after_sigkill_and_logout() {
    let mut j = setup("dns_restore");
    let client_ns = j.seed.ns(role::CLIENT);
    let resolv = client_ns.etc_dir().join("resolv.conf");
    let before = std::fs::read(&resolv).unwrap();
    let c = j.join_laptop(&[]);
    let installed =
        || std::fs::read_to_string(&resolv).is_ok_and(|t| t.contains("nameserver 100.100.100.100"));
    wait("resolv.conf installed", Duration::from_secs(20), installed);
    // A crash: the file stays ours until the next start, which puts the original back
    // (and installs ours again, running).
    j.seed
        .lab
        .kill(c.proc, tsunagu_lab::Signal::SIGKILL)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(installed(), "a crash cannot restore anything");
    let c = j.start_client("client", &[]);
    wait(
        "resolv.conf installed again",
        Duration::from_secs(20),
        installed,
    );
    let out = tsunagu(&client_ns, &c.sock, &["down"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(&resolv).unwrap(),
        before,
        "after SIGKILL, restart, down"
    );
    // up again, then logout.
    let out = tsunagu(&client_ns, &c.sock, &["up"]);
    assert!(out.status.success(), "{out:?}");
    wait(
        "resolv.conf installed after up",
        Duration::from_secs(20),
        installed,
    );
    let out = tsunagu(&client_ns, &c.sock, &["logout"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&resolv).unwrap(), before, "after logout");
}

/// The IPv4 addresses `getent ahostsv4 NAME` gives in `ns`: the system resolver (glibc
/// reading the namespace's resolv.conf), as applications use it; empty when the name
/// does not resolve.
fn getent(ns: &tsunagu_lab::Netns, name: &str) -> Vec<IpAddr> {
    let out = ns
        .exec_status_timeout(&["getent", "ahostsv4", name], Duration::from_secs(15))
        .unwrap();
    let mut addrs: Vec<IpAddr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    addrs.dedup();
    addrs
}

/// Polls `getent` for `name` in `ns` until it gives `want` or `within` passes: how long
/// it took, if it did.
fn getent_until(
    ns: &tsunagu_lab::Netns,
    name: &str,
    want: IpAddr,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if getent(ns, name).contains(&want) {
            return Some(start.elapsed());
        }
        if start.elapsed() >= within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node's first tailnet IPv4 address, from the server's node list.
fn tailnet_ip(j: &common::Joined, name: &str) -> IpAddr {
    let nodes = j.nodes();
    let node = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("no node {name}: {nodes}"));
    node["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str()?.split('/').next()?.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
        .unwrap()
}

/// `fe80::1` on the cafe router's LAN bridge: the router-advertised resolver of an IPv6
/// cafe network.
const CAFE_LL: &str = "fe80::1";

/// The index of interface `name` inside `ns` (the scope of a link-local address).
fn ifindex(ns: &tsunagu_lab::Netns, name: &'static str) -> u32 {
    ns.run(move || nix::net::if_::if_nametoindex(name).unwrap())
        .unwrap()
}

/// An exit node in use, and the cafe's resolver on an IPv6 link-local address in
/// `resolv.conf` (`fe80::1%eth0`): nothing reaches it, from tsunagud's forwarder (which
/// sends through the exit node's DoH) or from an application asking it directly (the
/// route lookup for `fe80::/10` is unreachable while the exit node is in use, even with
/// `--accept-dns=false` leaving resolv.conf as the cafe gave it). A capture on the cafe
/// LAN shows no DNS. Without the exit node, the same resolver answers again (so the test
/// would fail if the blocking were gone).
#[test]
fn a_link_local_resolver_cannot_bypass_the_exit_node() {
    let mut j = setup("dns_ll");
    let web = j.seed.ns(role::WEB);
    let cafe = j.seed.ns(role::CAFE);
    let client_ns = j.seed.ns(role::CLIENT);
    let _inet_dns = internet_resolver(&web);
    cafe.add_addr("lan", &format!("{CAFE_LL}/64")).unwrap();
    let cafe_ll =
        std::net::SocketAddrV6::new(CAFE_LL.parse().unwrap(), 53, 0, ifindex(&cafe, "lan"));
    let cafe_dns = dns_server(
        &cafe,
        cafe_ll.into(),
        &[("web.lab.test", "198.18.1.66".parse().unwrap())],
    )
    .unwrap();
    let resolv = client_ns.etc_dir().join("resolv.conf");
    let before = b"# router advertisement (RDNSS)\nnameserver fe80::1%eth0\n".to_vec();
    std::fs::write(&resolv, &before).unwrap();
    let from_client = SocketAddr::V6(std::net::SocketAddrV6::new(
        CAFE_LL.parse().unwrap(),
        53,
        0,
        ifindex(&client_ns, "eth0"),
    ));
    // Sanity: without tsunagud the laptop reaches it (directly and through glibc).
    let direct = dns_query(
        &client_ns,
        from_client,
        "web.lab.test",
        Duration::from_secs(2),
    )
    .unwrap()
    .expect("the link-local resolver answers");
    assert_eq!(direct.1, ["198.18.1.66".parse::<IpAddr>().unwrap()]);
    assert_eq!(getent(&client_ns, "web.lab.test"), direct.1);
    let asked = cafe_dns.count();

    let c = j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    wait("resolv.conf installed", Duration::from_secs(20), || {
        std::fs::read_to_string(&resolv).is_ok_and(|t| t.contains("nameserver 100.100.100.100"))
    });
    let a = resolve_until(
        &client_ns,
        "web.lab.test",
        Duration::from_secs(20),
        is_addr("203.0.113.10"),
    );
    assert!(is_addr("203.0.113.10")(&a), "through the exit node: {a:?}");

    let (cafe_lan, port) = j.seed.cafe_lan_iface();
    let cap = dns_capture(&mut j.seed.lab, &cafe_lan, "cafe-dns", port);
    // The system resolver (ours), and an application asking fe80::1%eth0 itself.
    assert_eq!(getent(&client_ns, "web.lab.test"), [IpAddr::V4(WEB_ADDR)]);
    let asked_directly = dns_query(
        &client_ns,
        from_client,
        "web.lab.test",
        Duration::from_secs(2),
    );
    assert!(
        !matches!(asked_directly, Ok(Some(_))),
        "the link-local resolver answered past the tunnel: {asked_directly:?}"
    );
    // The cafe's resolv.conf back in place (--accept-dns=false): glibc asks fe80::1%eth0,
    // and nothing leaves.
    let out = tsunagu(&client_ns, &c.sock, &["set", "--accept-dns=false"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&resolv).unwrap(), before, "restored");
    assert_eq!(getent(&client_ns, "web.lab.test"), Vec::<IpAddr>::new());
    assert_eq!(cafe_dns.count(), asked, "the link-local resolver was asked");
    let lines = cap.finish(&mut j.seed.lab).unwrap();
    assert!(lines.is_empty(), "DNS on the cafe LAN: {lines:#?}");

    // No exit node: the cafe's resolver is the laptop's again.
    let out = tsunagu(&client_ns, &c.sock, &["set", "--exit-node="]);
    assert!(out.status.success(), "{out:?}");
    let mut got = Vec::new();
    wait(
        "the link-local resolver reachable again",
        Duration::from_secs(10),
        || {
            got = getent(&client_ns, "web.lab.test");
            !got.is_empty()
        },
    );
    assert_eq!(got, ["198.18.1.66".parse::<IpAddr>().unwrap()]);
    assert!(cafe_dns.count() > asked);
}

/// The seed over HTTPS (the official client reaches relays over TLS only) with the
/// cafe's printer namespace as a second device at the cafe, the internet's resolver and
/// web server, and the cafe's resolver (198.18.1.1, wrong answers, counted) named by both
/// devices' resolv.conf, as the cafe's DHCP would.
struct Cafe {
    j: common::Joined,
    inet_dns: tsunagu_lab::ServiceHandle,
    cafe_dns: tsunagu_lab::ServiceHandle,
    _web: tsunagu_lab::ServiceHandle,
}

/// Names the internet's resolver knows (and the cafe's, wrongly).
const INET_NAMES: [(&str, [u8; 4]); 3] = [
    ("web.lab.test", [203, 0, 113, 10]),
    ("down.lab.test", [203, 0, 113, 11]),
    ("after.lab.test", [203, 0, 113, 12]),
];

fn cafe(test: &str) -> Cafe {
    let j = common::setup_over(
        test,
        common::POLICY,
        tsunagu_lab::SeedOptions {
            lan_host: true,
            ..Default::default()
        },
        &[],
        common::Transport::Https,
    );
    let web = j.seed.ns(role::WEB);
    let names: Vec<(&str, IpAddr)> = INET_NAMES
        .iter()
        .map(|(n, a)| (*n, IpAddr::from(*a)))
        .collect();
    let inet_dns = dns_server(&web, SocketAddr::new(RESOLVER.into(), 53), &names).unwrap();
    let wrong: Vec<(&str, IpAddr)> = INET_NAMES
        .iter()
        .map(|(n, _)| (*n, "198.18.1.66".parse().unwrap()))
        .collect();
    let cafe_dns = dns_server(
        &j.seed.ns(role::CAFE),
        CAFE_RESOLVER.parse().unwrap(),
        &wrong,
    )
    .unwrap();
    let _web = whoami_server(&web, (WEB_ADDR, 80).into()).unwrap();
    for r in [role::CLIENT, role::PRINTER] {
        std::fs::write(
            j.seed.ns(r).etc_dir().join("resolv.conf"),
            "# from the cafe's DHCP\nnameserver 198.18.1.1\nsearch cafe.example\n",
        )
        .unwrap();
    }
    Cafe {
        j,
        inet_dns,
        cafe_dns,
        _web,
    }
}

/// The official client in the printer's namespace (a second device at the cafe), joined
/// as `hostname`; with `exit` it uses the tsunagud exit node.
fn official_at_the_cafe(c: &mut Cafe, hostname: &str, exit: bool) -> tsunagu_lab::Tailscaled {
    let ts = common::official(&mut c.j, role::PRINTER, hostname, &[]);
    let (url, key) = (c.j.url.clone(), c.j.new_key());
    common::official_up(&ts, &url, &key, hostname, &[]);
    if exit {
        ts.cli(&["set", "--exit-node=dev-m1sk9-s1"]).unwrap();
    }
    ts
}

/// DNS captures on both cafe devices' bridge ports (UDP/TCP 53 and 853).
fn dns_captures(c: &mut Cafe, tag: &str) -> Vec<tsunagu_lab::Capture> {
    let cafe_ns = c.j.seed.ns(role::CAFE);
    ["p-client", "p-printer"]
        .iter()
        .map(|port| dns_capture(&mut c.j.seed.lab, &cafe_ns, &format!("{tag}-{port}"), port))
        .collect()
}

/// DNS (UDP/TCP 53 and 853) on port `port` of `ns`, into `<name>.pcap`.
fn dns_capture(
    lab: &mut tsunagu_lab::Lab,
    ns: &tsunagu_lab::Netns,
    name: &str,
    port: &str,
) -> tsunagu_lab::Capture {
    let file = lab.log_path(&format!("{name}.pcap"));
    tsunagu_lab::capture_filtered(lab, ns, port, &file, &["port", "53", "or", "port", "853"])
        .unwrap()
}

fn finish(c: &mut Cafe, caps: Vec<tsunagu_lab::Capture>) -> Vec<String> {
    caps.into_iter()
        .flat_map(|cap| cap.finish(&mut c.j.seed.lab).unwrap())
        .collect()
}

/// The official client (Tailscale's tailscaled) using a tsunagud exit node: its DNS
/// goes to the exit node's DoH (`peerapi-dns-proxy`), so it resolves a name only the
/// internet's resolver knows, asked from the exit node's address, and fetches the page
/// by name; the cafe's resolver is never asked and a capture on the cafe LAN shows no
/// DNS. Its resolv.conf is rewritten by tailscaled (100.100.100.100), the backup kept in
/// its private /etc.
#[test]
fn the_official_client_resolves_through_a_tsunagud_exit_node_with_no_dns_on_the_cafe_lan() {
    let mut c = cafe("dns_off_exit");
    let printer = c.j.seed.ns(role::PRINTER);
    let ts = official_at_the_cafe(&mut c, "phone", true);
    let resolv = printer.etc_dir().join("resolv.conf");
    wait("tailscaled's resolv.conf", Duration::from_secs(20), || {
        std::fs::read_to_string(&resolv).is_ok_and(|t| t.contains("nameserver 100.100.100.100"))
    });
    let text = std::fs::read_to_string(&resolv).unwrap();
    assert!(text.contains("generated by tailscale"), "{text}");
    assert!(text.contains("search tailnet.internal"), "{text}");
    assert!(
        ts.state_dir()
            .join("etc-upper/resolv.pre-tailscale-backup.conf")
            .is_file(),
        "tailscaled's backup in its private /etc"
    );
    // Settle: DNS through the exit node's DoH once the official client has its map.
    let took = getent_until(
        &printer,
        "web.lab.test",
        IpAddr::V4(WEB_ADDR),
        Duration::from_secs(30),
    );
    assert!(
        took.is_some(),
        "web.lab.test: {:?}\n{}",
        getent(&printer, "web.lab.test"),
        ts.log_tail(60)
    );

    let asked_cafe = c.cafe_dns.count();
    let asked_inet = c.inet_dns.count();
    let caps = dns_captures(&mut c, "off");
    assert_eq!(
        getent(&printer, "down.lab.test"),
        [IpAddr::from([203, 0, 113, 11])]
    );
    let out = printer
        .exec(&["curl", "-s", "-m", "10", "http://web.lab.test/"])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "198.51.100.2",
        "fetched by name through the exit node"
    );
    let lines = finish(&mut c, caps);
    assert!(lines.is_empty(), "DNS on the cafe LAN: {lines:#?}");
    assert_eq!(
        c.cafe_dns.count(),
        asked_cafe,
        "the cafe's resolver was asked"
    );
    assert!(c.inet_dns.count() > asked_inet);
    let sources: Vec<IpAddr> = c.inet_dns.peers().iter().map(|s| s.ip()).collect();
    assert!(
        sources
            .iter()
            .all(|ip| *ip == IpAddr::V4(tsunagu_lab::EXIT_PUBLIC)),
        "the internet's resolver is asked by the exit node only: {sources:?}"
    );
}

/// MagicDNS from tsunagud and from the official client, both at the cafe: `curl
/// http://dev-m1sk9-s1/` and `ping dev-m1sk9-s1` (bare names through the search domain);
/// then the admin renames the node and both resolve the new name within 2 s (and the old
/// one no longer).
#[test]
fn magic_dns_names_work_from_tsunagud_and_the_official_client_and_follow_a_rename() {
    let mut c = cafe("dns_magic");
    let client_ns = c.j.seed.ns(role::CLIENT);
    let printer = c.j.seed.ns(role::PRINTER);
    // The exit node serves a page on its tailnet address (it answers with the source).
    let _page = whoami_server(
        &c.j.seed.ns(role::EXIT),
        (std::net::Ipv4Addr::UNSPECIFIED, 80).into(),
    )
    .unwrap();
    let laptop = c.j.join_laptop(&[]);
    let ts = official_at_the_cafe(&mut c, "phone", false);
    let exit_ip = tailnet_ip(&c.j, "dev-m1sk9-s1");
    let laptop_ip = tailnet_ip(&c.j, "laptop");
    let phone_ip = tailnet_ip(&c.j, "phone");

    for (who, ns, me) in [
        ("tsunagud", &client_ns, laptop_ip),
        ("official", &printer, phone_ip),
    ] {
        let took = getent_until(ns, "dev-m1sk9-s1", exit_ip, Duration::from_secs(30));
        assert!(
            took.is_some(),
            "{who}: dev-m1sk9-s1 -> {:?}",
            getent(ns, "dev-m1sk9-s1")
        );
        let out = ns
            .exec_status(&["curl", "-s", "-m", "10", "http://dev-m1sk9-s1/"])
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            me.to_string(),
            "{who}: curl http://dev-m1sk9-s1/ over the tailnet: {out:?}"
        );
        let ping = ns
            .exec_status(&["ping", "-c", "1", "-W", "3", "dev-m1sk9-s1"])
            .unwrap();
        assert!(ping.status.success(), "{who}: ping dev-m1sk9-s1: {ping:?}");
        let text = String::from_utf8_lossy(&ping.stdout);
        assert!(
            text.contains("dev-m1sk9-s1.tailnet.internal"),
            "{who}: {text}"
        );
    }

    // The rename, then both devices poll the new name.
    let out =
        c.j.admin(&["nodes", "rename", "dev-m1sk9-s1", "dev-m1sk9-s2"]);
    let renamed = Instant::now();
    assert!(!out.contains("rror"), "{out}");
    let took = first_success_of_each(
        [&client_ns, &printer],
        renamed,
        Duration::from_secs(2),
        |ns| getent(ns, "dev-m1sk9-s2").contains(&exit_ip),
    );
    assert!(
        took.iter().all(Option::is_some),
        "renamed node within 2 s (tsunagud, official): {took:?}\n{}",
        ts.log_tail(40)
    );
    eprintln!(
        "renamed node resolved after: tsunagud {:?}, official client {:?}",
        took[0], took[1]
    );
    for (who, ns) in [("tsunagud", &client_ns), ("official", &printer)] {
        assert_eq!(
            getent(ns, "dev-m1sk9-s2.tailnet.internal"),
            [exit_ip],
            "{who}"
        );
        assert!(
            getent(ns, "dev-m1sk9-s1.tailnet.internal").is_empty(),
            "{who}: old name"
        );
    }
    drop(laptop);
}

/// Both the tsunagud member and the official client use the tsunagud exit node. It is
/// killed: names fail on both (SERVFAIL or no answer, never the cafe resolver's answer;
/// the cafe's resolver is never asked and no DNS crosses the cafe LAN), and they resolve
/// again within 5 s of its return.
#[test]
fn exit_node_killed_names_fail_for_both_clients_and_come_back_within_5s() {
    let mut c = cafe("dns_killed");
    let client_ns = c.j.seed.ns(role::CLIENT);
    let printer = c.j.seed.ns(role::PRINTER);
    let _laptop = c.j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    let ts = official_at_the_cafe(&mut c, "phone", true);
    for ns in [&client_ns, &printer] {
        let took = getent_until(
            ns,
            "web.lab.test",
            IpAddr::V4(WEB_ADDR),
            Duration::from_secs(30),
        );
        assert!(took.is_some(), "{}", ts.log_tail(40));
    }
    let asked_cafe = c.cafe_dns.count();
    let caps = dns_captures(&mut c, "killed");

    c.j.seed
        .lab
        .kill(c.j.exit, tsunagu_lab::Signal::SIGKILL)
        .unwrap();
    let down = Instant::now();
    let mut asked = [0, 0];
    while down.elapsed() < Duration::from_secs(4) {
        for (i, ns) in [&client_ns, &printer].into_iter().enumerate() {
            let a = dns_query(ns, quad100(), "down.lab.test", Duration::from_millis(1500)).unwrap();
            asked[i] += 1;
            assert!(
                a.as_ref()
                    .is_none_or(|(rc, addrs)| addrs.is_empty() && rc != "No Error"),
                "an answer while the exit node is down ({}): {a:?}",
                ["tsunagud", "official"][i]
            );
        }
    }
    assert!(asked.iter().all(|n| *n >= 2), "{asked:?}");

    c.j.restart_exit();
    let back = Instant::now();
    let want = IpAddr::from([203, 0, 113, 12]);
    let took = first_success_of_each([&client_ns, &printer], back, Duration::from_secs(5), |ns| {
        dns_query(ns, quad100(), "after.lab.test", Duration::from_millis(500))
            .unwrap()
            .is_some_and(|(_, a)| a.contains(&want))
    });
    assert!(
        took.iter().all(Option::is_some),
        "names back within 5 s of the exit node's return (tsunagud, official): {took:?}\n{}",
        ts.log_tail(40)
    );
    eprintln!(
        "names back after the exit node's return: tsunagud {:?}, official client {:?}",
        took[0], took[1]
    );
    let lines = finish(&mut c, caps);
    assert!(lines.is_empty(), "DNS on the cafe LAN: {lines:#?}");
    assert_eq!(
        c.cafe_dns.count(),
        asked_cafe,
        "the cafe's resolver was asked"
    );
}

/// Whether the other end closed `s` within `within`: reading reaches its end (after
/// whatever it sent last) or fails, instead of timing out.
fn closed_within(s: &std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read as _;
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match (&*s).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// The exit node's PeerAPI bounds what one peer can hold: a member opening 40
/// connections keeps 32 (the rest are closed at once), connections that send no request
/// are closed after the 10 s header timeout, and meanwhile another member is served.
#[test]
fn the_peerapi_bounds_connections_per_peer_and_idle_headers() {
    let mut j = setup("dns_conns");
    let web = j.seed.ns(role::WEB);
    let _inet_dns = internet_resolver(&web);
    let url = peerapi_url(&j.exit_log);
    let target: SocketAddr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let client_ns = j.seed.ns(role::CLIENT);
    let _c = j.join_laptop(&[]);
    let other_ns = j
        .seed
        .add_public_host("other", tsunagu_lab::RELAY2_PUBLIC)
        .unwrap();
    let key = j.new_key();
    let _o = j.join("other", "other", "desktop", &key, &[]);
    let q = tsunagu_dns::message::build_query(
        9,
        "web.lab.test",
        tsunagu_dns::hickory_proto::rr::RecordType::A,
    )
    .unwrap();
    let get = tsunagu_dns::doh::get_url(&url, &q);
    for ns in [&client_ns, &other_ns] {
        wait("DoH answers", Duration::from_secs(20), || {
            status_of(ns, &[&get]) == "200"
        });
    }

    // 40 connections from the laptop; each is then read for 500 ms: the server closes
    // the ones beyond its bound at once (EOF), the others wait for a request.
    let opened = Instant::now();
    let conns: Vec<std::net::TcpStream> = client_ns
        .run(move || {
            (0..40)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)).ok()
                })
                .collect()
        })
        .unwrap();
    assert_eq!(conns.len(), 40, "connected");
    std::thread::sleep(Duration::from_millis(500));
    let open: Vec<&std::net::TcpStream> = conns
        .iter()
        .filter(|s| !closed_within(s, Duration::from_millis(100)))
        .collect();
    assert_eq!(open.len(), 32, "connections kept for one peer");
    // Another member is served meanwhile.
    assert_eq!(status_of(&other_ns, &[&get]), "200");
    // Silent connections are closed by the header timeout (10 s), not kept forever.
    let deadline = opened + Duration::from_secs(14);
    for s in &open {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_within(s, left.max(Duration::from_millis(10))),
            "a connection that sent nothing was still open after {:?}",
            opened.elapsed()
        );
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(9),
        "closed before the header timeout: {:?}",
        opened.elapsed()
    );
    drop(conns);
    // The laptop is served again.
    wait(
        "DoH answers the laptop again",
        Duration::from_secs(10),
        || status_of(&client_ns, &[&get]) == "200",
    );
}

/// An exit node with a standby host (`exit2` holds its identity): the member's DNS goes
/// through the active host's DoH, and after an admin failover through the new host's, at
/// the same PeerAPI port (the port follows the node key, which the standby host was
/// given at run time), within 5 s and without a failed query.
#[test]
fn dns_follows_the_exit_node_to_its_standby_host() {
    let mut j = common::setup_full(
        "dns_standby",
        common::POLICY,
        tsunagu_lab::SeedOptions {
            second_exit: true,
            ..Default::default()
        },
    );
    let web = j.seed.ns(role::WEB);
    let inet_dns = internet_resolver(&web);
    let c2 = j.start_standby_host();
    let ready = |j: &common::Joined| {
        j.nodes()
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == "dev-m1sk9-s1").cloned())
            .is_some_and(|e| {
                e["standby"]["hosts"].as_array().is_some_and(|h| {
                    h.len() == 2 && h.iter().all(|h| h["Online"] == true && h["Ready"] == true)
                })
            })
    };
    wait("both hosts ready", Duration::from_secs(40), || ready(&j));
    let client_ns = j.seed.ns(role::CLIENT);
    let _c = j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    let a = resolve_until(
        &client_ns,
        "web.lab.test",
        Duration::from_secs(20),
        is_addr("203.0.113.10"),
    );
    assert!(
        is_addr("203.0.113.10")(&a),
        "through the active host: {a:?}"
    );
    let from = |ip: std::net::Ipv4Addr| {
        inet_dns
            .peers()
            .iter()
            .filter(|s| s.ip() == IpAddr::V4(ip))
            .count()
    };
    assert!(from(tsunagu_lab::EXIT_PUBLIC) > 0);
    assert_eq!(
        from(tsunagu_lab::EXIT2_PUBLIC),
        0,
        "the standby host answers nothing"
    );
    // Both hosts serve the PeerAPI at the identity's port.
    let port_of = |log: &std::path::Path| {
        let u = peerapi_url(log);
        u.rsplit(':').next().unwrap().to_string()
    };
    assert_eq!(port_of(&j.exit_log), port_of(&c2.log));

    let out = j.admin(&["nodes", "failover", "dev-m1sk9-s1", "--to", "exit2"]);
    assert!(out.contains("exit2 is the active host now"), "{out}");
    let switched = Instant::now();
    // Queries every 100 ms: none fails, and within 5 s the new host answers them.
    let mut failed = Vec::new();
    while switched.elapsed() < Duration::from_secs(5) && from(tsunagu_lab::EXIT2_PUBLIC) == 0 {
        let a = dns_query(
            &client_ns,
            quad100(),
            "web.lab.test",
            Duration::from_secs(5),
        )
        .unwrap();
        if !is_addr("203.0.113.10")(&a) {
            failed.push(a);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = switched.elapsed();
    assert!(
        from(tsunagu_lab::EXIT2_PUBLIC) > 0,
        "the new active host's DoH answered within 5 s"
    );
    assert!(
        failed.is_empty(),
        "failed queries during the switch: {failed:?}"
    );
    eprintln!("DNS through the new active host {took:?} after the failover");
}
