//! Data-plane conformance: tsunagud and a stock `wireguard-go` peer configured with `wg`
//! exchange traffic both ways, with either side starting the handshake (root).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tsunagu_lab::seed::role;
use tsunagu_lab::tailnet::{NODE_PORT, NodeOpts, Tailnet};
use tsunagu_lab::{
    EXIT_PUBLIC, EXIT2_PUBLIC, Lab, Netns, Seed, SeedOptions, http_get, ping, whoami_server,
};

const T: Duration = Duration::from_secs(5);
/// wireguard-go's interface (its UAPI socket lives in the host's /var/run/wireguard, so
/// the name must be unique across concurrently running tests).
fn wg_if(test: &str) -> String {
    format!("wg{}", &Lab::tag(test)[3..9])
}

/// Run wireguard-go for node `name` of `net` in its namespace, with every other node as
/// a peer.
fn start_wireguard_go(seed: &mut Seed, net: &Tailnet, name: &str, ifname: &str) {
    let me = net.node(name).clone();
    let ns = seed.ns(&me.role);
    let key_file = seed.lab.log_path(&format!("{name}.key"));
    std::fs::write(&key_file, me.key.to_base64()).unwrap();
    let log = seed.lab.log_path("wireguard-go.log");
    seed.lab
        .spawn(&ns, &["wireguard-go", "-f", ifname], Some(&log))
        .expect("wireguard-go starts");
    // The UAPI socket appears once the interface is up.
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    let deadline = std::time::Instant::now() + T;
    while !std::path::Path::new(&sock).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "wireguard-go did not create {sock}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = key_file.to_string_lossy().into_owned();
    let port = NODE_PORT.to_string();
    ns.exec(&[
        "wg",
        "set",
        ifname,
        "private-key",
        &key,
        "listen-port",
        &port,
    ])
    .unwrap();
    ns.exec(&["ip", "link", "set", ifname, "mtu", "1280", "up"])
        .unwrap();
    for peer in net.nodes.iter().filter(|n| n.name != name) {
        let allowed = format!("{}/32,{}/128", peer.ip4, peer.ip6);
        let pubkey = peer.key.public().to_string();
        let mut argv = vec![
            "wg",
            "set",
            ifname,
            "peer",
            &pubkey,
            "allowed-ips",
            &allowed,
        ];
        let ep;
        if let Some(ip) = peer.public {
            ep = SocketAddr::new(ip, NODE_PORT).to_string();
            argv.extend(["endpoint", &ep]);
        }
        ns.exec(&argv).unwrap();
        ns.exec(&[
            "ip",
            "route",
            "add",
            &format!("{}/32", peer.ip4),
            "dev",
            ifname,
        ])
        .unwrap();
        ns.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{}/128", peer.ip6),
            "dev",
            ifname,
        ])
        .unwrap();
    }
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{}/32", me.ip4),
        "dev",
        ifname,
    ])
    .unwrap();
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{}/128", me.ip6),
        "dev",
        ifname,
    ])
    .unwrap();
}

fn tcp_both_ways(a: &Netns, a_ip: IpAddr, b: &Netns, b_ip: IpAddr) {
    let _sa = whoami_server(a, (a_ip, 8080).into()).unwrap();
    let _sb = whoami_server(b, (b_ip, 8080).into()).unwrap();
    assert_eq!(
        http_get(b, (a_ip, 8080).into(), T).unwrap().trim(),
        b_ip.to_string()
    );
    assert_eq!(
        http_get(a, (b_ip, 8080).into(), T).unwrap().trim(),
        a_ip.to_string()
    );
}

#[test]
fn tsunagud_behind_nat_initiates_to_wireguard_go() {
    let test = "wggo_nat";
    let mut seed = Lab::seed(test, SeedOptions::default()).unwrap();
    let mut net = Tailnet::new(env!("CARGO_BIN_EXE_tsunagud"));
    net.add("client", role::CLIENT, None, false);
    net.add("wggo", role::EXIT, Some(IpAddr::V4(EXIT_PUBLIC)), false);
    start_wireguard_go(&mut seed, &net, "wggo", &wg_if(test));
    net.start(&mut seed.lab, "client", &NodeOpts::default())
        .unwrap();
    let (c, w) = (net.node("client").clone(), net.node("wggo").clone());
    let (cns, wns) = (seed.ns(role::CLIENT), seed.ns(role::EXIT));
    assert!(ping(&cns, w.ip4.into(), 3, T), "tsunagud -> wireguard-go");
    assert!(ping(&wns, c.ip4.into(), 3, T), "wireguard-go -> tsunagud");
    assert!(ping(&cns, w.ip6.into(), 3, T), "IPv6 inside the tunnel");
    tcp_both_ways(&cns, c.ip4.into(), &wns, w.ip4.into());
}

#[test]
fn wireguard_go_initiates_to_tsunagud() {
    let test = "wggo_init";
    let opts = SeedOptions {
        second_exit: true,
        ..SeedOptions::default()
    };
    let mut seed = Lab::seed(test, opts).unwrap();
    let mut net = Tailnet::new(env!("CARGO_BIN_EXE_tsunagud"));
    net.add("tsu", role::EXIT2, Some(IpAddr::V4(EXIT2_PUBLIC)), false);
    net.add("wggo", role::EXIT, Some(IpAddr::V4(EXIT_PUBLIC)), false);
    net.start(&mut seed.lab, "tsu", &NodeOpts::default())
        .unwrap();
    start_wireguard_go(&mut seed, &net, "wggo", &wg_if(test));
    let (t, w) = (net.node("tsu").clone(), net.node("wggo").clone());
    let (tns, wns) = (seed.ns(role::EXIT2), seed.ns(role::EXIT));
    // wireguard-go speaks first: it starts the handshake and tsunagud answers.
    assert!(ping(&wns, t.ip4.into(), 3, T), "wireguard-go -> tsunagud");
    assert!(ping(&tns, w.ip4.into(), 3, T), "tsunagud -> wireguard-go");
    tcp_both_ways(&wns, w.ip4.into(), &tns, t.ip4.into());
    let shown = wns
        .exec(&["wg", "show", &wg_if(test), "latest-handshakes"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(&t.key.public().to_string()),
        "wg show lists the tsunagud peer with a handshake"
    );
}
