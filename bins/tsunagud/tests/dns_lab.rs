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
    let _inet_dns = dns_server(
        &web,
        SocketAddr::new(RESOLVER.into(), 53),
        &[("web.lab.test", IpAddr::V4(WEB_ADDR))],
    )
    .unwrap();
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

    let (cafe_ns, port) = j.seed.cafe_lan_iface();
    let file = j.seed.lab.log_path("cafe-dns.pcap");
    let cap = tsunagu_lab::capture_filtered(
        &mut j.seed.lab,
        &cafe_ns,
        port,
        &file,
        &["port", "53", "or", "port", "853"],
    )
    .unwrap();

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
    let _inet_dns = dns_server(
        &web,
        SocketAddr::new(RESOLVER.into(), 53),
        &[("web.lab.test", IpAddr::V4(WEB_ADDR))],
    )
    .unwrap();
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
