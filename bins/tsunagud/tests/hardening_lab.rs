//! What a node must refuse, in the seed lab with tsunagu-server (root): an exit node
//! forwards only what the policy allows and never into its own host or LAN (for its
//! users and for a peer that may not use it), a node with an exit node in its settings
//! blocks the internet from the start even when the server cannot be reached, and a
//! peer's subnet route does not capture a member's LAN unless routes are accepted.

mod common;

use common::{Joined, peer_line, setup_full, status_text, tsunagu, wait, web_sees};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tsunagu_lab::seed::role;
use tsunagu_lab::{
    CAFE_PUBLIC, CONTROL_PUBLIC, EXIT_PUBLIC, Netns, SeedOptions, Signal, WEB_ADDR, http_get,
    whoami_server,
};

const SHORT: Duration = Duration::from_secs(2);

fn web() -> SocketAddr {
    (WEB_ADDR, 80).into()
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tailnet_v4(ns: &Netns, sock: &Path) -> Ipv4Addr {
    ok(&tsunagu(ns, sock, &["ip", "-4"]))
        .trim()
        .parse()
        .expect("an IPv4 tailnet address")
}

fn filter_dropped(ns: &Netns, sock: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&tsunagu(ns, sock, &["status", "--json"]))).unwrap();
    v["counters"]["filter_dropped"].as_u64().unwrap_or(0)
}

/// A fresh pre-auth key of user `admin` with `tags`.
fn tagged_key(j: &Joined, tag: &str) -> String {
    j.admin(&["preauthkeys", "create", "--user", "admin", "--tags", tag])
        .lines()
        .last()
        .unwrap()
        .to_string()
}

/// Members may use the internet (nothing else); `tag:iot` may reach the exit node's
/// port 22 (so the two see each other) but not use it as exit node.
const INTERNET_ONLY: &str = r#"{
  "tagOwners": { "tag:exit": ["admin"], "tag:iot": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"] },
  "acls": [
    { "action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:internet:*"] },
    { "action": "accept", "src": ["tag:iot"], "dst": ["tag:exit:22"] },
  ],
}"#;

/// The exit host's LAN (198.18.3.0/24: its own 198.18.3.1, a host at 198.18.3.10).
const EXIT_LAN_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const EXIT_LAN_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 10);

#[test]
fn an_exit_node_forwards_only_what_the_policy_allows_and_never_into_its_own_host() {
    let mut j = setup_full("hard_exit", INTERNET_ONLY, SeedOptions::default());
    let exit_ns = j.seed.ns(role::EXIT);
    let exit_sock = j.seed.lab.log_path("exit-state").join("tsunagud.sock");
    // The exit host gets a LAN before anyone uses it.
    let lan = j.seed.lab.add_ns("exitlan").unwrap();
    j.seed
        .lab
        .link(
            (&exit_ns, "lan0", &["198.18.3.1/24"]),
            (&lan, "eth0", &["198.18.3.10/24"]),
        )
        .unwrap();
    lan.set_default_route(EXIT_LAN_GW.into()).unwrap();
    let _web = whoami_server(&j.seed.ns(role::WEB), web()).unwrap();
    // Services of the exit host (on its public and its LAN address) and of its LAN.
    let on_public: SocketAddr = (EXIT_PUBLIC, 8080).into();
    let on_lan_gw: SocketAddr = (EXIT_LAN_GW, 8080).into();
    let lan_host: SocketAddr = (EXIT_LAN_HOST, 80).into();
    let _s1 = whoami_server(&exit_ns, on_public).unwrap();
    let _s2 = whoami_server(&exit_ns, on_lan_gw).unwrap();
    let _s3 = whoami_server(&lan, lan_host).unwrap();
    // They are up: the internet reaches the public one, the exit host its LAN.
    assert!(http_get(&j.seed.ns(role::WEB), on_public, SHORT).is_ok());
    assert!(http_get(&exit_ns, lan_host, SHORT).is_ok());

    // The member, with the exit node: the web, yes; the exit host and its LAN, no.
    let c = j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    let client = j.seed.ns(role::CLIENT);
    web_sees(&client, EXIT_PUBLIC, &[c.log.clone(), j.exit_log.clone()]);
    let before = filter_dropped(&exit_ns, &exit_sock);
    for closed in [on_public, on_lan_gw, lan_host] {
        let r = http_get(&client, closed, SHORT);
        assert!(r.is_err(), "the exit node's user reached {closed}: {r:?}");
    }
    assert!(
        filter_dropped(&exit_ns, &exit_sock) > before,
        "refused by the exit node's filter"
    );
    assert_eq!(
        http_get(&client, web(), SHORT).unwrap().trim(),
        EXIT_PUBLIC.to_string()
    );

    // A visible peer that may not use the exit node (tag:iot), whose client ignores the
    // map and sends its traffic to the exit node anyway: its own key, a file-configured
    // tsunagud that treats the exit node as its exit node.
    let iot_ns = j
        .seed
        .add_public_host("iot", Ipv4Addr::new(198, 51, 100, 8))
        .unwrap();
    let key = tagged_key(&j, "tag:iot");
    let iot = j.join("iot", "iot", "iot", &key, &[]);
    wait("the exit node sees iot", Duration::from_secs(30), || {
        peer_line(&status_text(&exit_ns, &exit_sock), "iot").is_some()
    });
    let iot_ip = tailnet_v4(&iot_ns, &iot.sock);
    let exit_ip = tailnet_v4(&exit_ns, &exit_sock);
    j.seed.lab.kill(iot.proc, Signal::SIGTERM).unwrap();
    assert!(
        j.seed
            .lab
            .wait_timeout(iot.proc, Duration::from_secs(5))
            .unwrap()
            .is_some()
    );
    let exit_key: tsunagu_proto::NodePrivate =
        std::fs::read_to_string(j.seed.lab.log_path("exit-state").join("node.key"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let config = j.seed.lab.log_path("iot.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"iot\"\n\
             private_key_file = {:?}\n\
             addresses = [\"{iot_ip}/32\"]\n\
             exit_node = \"exit\"\n\
             [[peer]]\n\
             name = \"exit\"\n\
             public_key = \"{}\"\n\
             endpoint = \"{EXIT_PUBLIC}:41641\"\n\
             allowed_ips = [\"{exit_ip}/32\"]\n\
             offers_exit_node = true\n",
            iot.state.join("node.key").to_str().unwrap(),
            exit_key.public(),
        ),
    )
    .unwrap();
    let _forged = j
        .seed
        .lab
        .spawn(
            &iot_ns,
            &[common::TSUNAGUD, "--config", config.to_str().unwrap()],
            Some(&j.seed.lab.log_path("iot-forged.log")),
        )
        .unwrap();
    // The tunnel works, and what the policy gives iot (port 22 of the exit node) too.
    let _ssh = whoami_server(&exit_ns, (exit_ip, 22).into()).unwrap();
    wait(
        "iot reaches the exit node's port 22",
        Duration::from_secs(20),
        || {
            http_get(&iot_ns, (exit_ip, 22).into(), SHORT)
                .is_ok_and(|b| b.trim() == iot_ip.to_string())
        },
    );
    let before = filter_dropped(&exit_ns, &exit_sock);
    for refused in [on_public, on_lan_gw, lan_host, web()] {
        let r = http_get(&iot_ns, refused, SHORT);
        assert!(r.is_err(), "a non-client reached {refused}: {r:?}");
    }
    assert!(filter_dropped(&exit_ns, &exit_sock) > before);
}

/// Our kernel state in `ns` gone, as after a reboot: rules at our priorities, table 52,
/// the tun.
fn reboot_kernel_state(ns: &Netns) {
    for fam in ["-4", "-6"] {
        for pref in ["5210", "5240", "5250", "5270"] {
            // Bounded: a LAN rule per subnet at most.
            for _ in 0..16 {
                if !ns
                    .exec_status(&["ip", fam, "rule", "del", "pref", pref])
                    .unwrap()
                    .status
                    .success()
                {
                    break;
                }
            }
        }
        let _ = ns.exec_status(&["ip", fam, "route", "flush", "table", "52"]);
    }
    let _ = ns.exec_status(&["ip", "link", "del", "tsunagu0"]);
}

fn blocks_internet(ns: &Netns) -> bool {
    let out =
        |argv: &[&str]| String::from_utf8_lossy(&ns.exec_status(argv).unwrap().stdout).into_owned();
    out(&["ip", "rule", "show"]).contains("lookup 52")
        && out(&["ip", "route", "show", "table", "52"]).contains("unreachable default")
}

/// The cafe drops everything to the control server (a network that blocks it).
fn block_server(cafe: &Netns, on: bool) {
    if on {
        cafe.nft(&format!(
            "table inet hard_block {{\n chain f {{\n  type filter hook forward priority -10;\n  ip daddr {CONTROL_PUBLIC} drop\n }}\n}}"
        ))
        .unwrap();
    } else {
        cafe.exec(&["nft", "delete", "table", "inet", "hard_block"])
            .unwrap();
    }
}

#[test]
fn with_an_exit_node_saved_the_internet_is_blocked_from_start_without_the_server() {
    let mut j = common::setup("hard_boot");
    let _web = whoami_server(&j.seed.ns(role::WEB), web()).unwrap();
    let client = j.seed.ns(role::CLIENT);
    let cafe = j.seed.ns(role::CAFE);
    let mut c = j.join_laptop(&["--exit-node", "dev-m1sk9-s1"]);
    let logs = [c.log.clone(), j.exit_log.clone()];
    web_sees(&client, EXIT_PUBLIC, &logs);

    for round in ["then the server comes back", "then the user stops it"] {
        // A crash and a reboot: nothing of ours is left in the kernel, so the internet
        // is reached directly until the daemon is back (what the fix must close).
        j.seed.lab.kill(c.proc, Signal::SIGKILL).unwrap();
        reboot_kernel_state(&client);
        // /run is empty after a reboot too (and a stale socket would look like the
        // restarted daemon's API to `start_client`).
        std::fs::remove_file(&c.sock).unwrap();
        web_sees(&client, CAFE_PUBLIC, &logs);
        // The daemon starts on a network that blocks the server.
        block_server(&cafe, true);
        c = j.start_client("client", &[]);
        for _ in 0..3 {
            let r = http_get(&client, web(), Duration::from_secs(1));
            assert!(r.is_err(), "{round}: the internet reached directly: {r:?}");
        }
        assert!(blocks_internet(&client), "{round}: blocked before any map");
        if round.contains("server comes back") {
            block_server(&cafe, false);
            web_sees(&client, EXIT_PUBLIC, &[c.log.clone()]);
        } else {
            // `down` before any map: the block goes, the internet is direct again.
            ok(&tsunagu(&client, &c.sock, &["down"]));
            web_sees(&client, CAFE_PUBLIC, &[c.log.clone()]);
            assert!(!blocks_internet(&client));
            block_server(&cafe, false);
        }
    }
}

/// Members reach everything; `tag:router` nodes get their routes in the cafe's own LAN
/// range approved.
const ROUTER_POLICY: &str = r#"{
  "tagOwners": { "tag:exit": ["admin"], "tag:router": ["admin"] },
  "autoApprovers": { "exitNode": ["tag:exit"], "routes": { "198.18.0.0/15": ["tag:router"] } },
  "acls": [ { "action": "accept", "src": ["autogroup:member"], "dst": ["*:*"] } ],
}"#;

fn table52(ns: &Netns) -> String {
    String::from_utf8_lossy(
        &ns.exec_status(&["ip", "route", "show", "table", "52"])
            .unwrap()
            .stdout,
    )
    .into_owned()
}

#[test]
fn a_peers_subnet_route_does_not_capture_the_members_lan_unless_routes_are_accepted() {
    let opts = SeedOptions {
        lan_host: true,
        ..SeedOptions::default()
    };
    let mut j = setup_full("hard_routes", ROUTER_POLICY, opts);
    // A subnet router elsewhere whose approved route is the cafe's LAN (a node the test
    // registers itself, from the server's machine; it never comes online).
    let key = tagged_key(&j, "tag:router");
    let url = j.url.clone();
    j.seed
        .ns(role::CONTROL)
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let server = tsunagu_client::fetch_server_key(&url).await.unwrap();
                let machine = tsunagu_proto::MachinePrivate::generate();
                let mut client = tsunagu_client::ControlClient::connect(&url, &server, &machine)
                    .await
                    .unwrap();
                let req = tsunagu_proto::tailcfg::RegisterRequest {
                    version: tsunagu_proto::tailcfg::CURRENT_CAPABILITY_VERSION,
                    node_key: tsunagu_proto::NodePrivate::generate().public(),
                    hostinfo: Some(tsunagu_proto::tailcfg::Hostinfo {
                        hostname: "router".into(),
                        os: "linux".into(),
                        routable_ips: vec![tsunagu_lab::seed::CAFE_LAN_NET.parse().unwrap()],
                        ..Default::default()
                    }),
                    auth: Some(tsunagu_proto::tailcfg::RegisterResponseAuth {
                        auth_key: key,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let r = client.register(&req).await.unwrap();
                assert!(r.machine_authorized, "{r:?}");
            });
        })
        .unwrap();
    let nodes = j.nodes();
    let router = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "router")
        .cloned()
        .unwrap();
    assert_eq!(
        router["approved_routes"][0],
        tsunagu_lab::seed::CAFE_LAN_NET,
        "{router}"
    );

    let printer: SocketAddr = (tsunagu_lab::PRINTER_LAN, 9100).into();
    let _p = tsunagu_lab::tcp_echo(&j.seed.ns(role::PRINTER), printer).unwrap();
    let c = j.join_laptop(&[]);
    let client = j.seed.ns(role::CLIENT);
    wait(
        "the router in the laptop's map",
        Duration::from_secs(30),
        || peer_line(&status_text(&client, &c.sock), "router").is_some(),
    );
    // Default: not routed; the printer next to the laptop stays reachable.
    assert!(
        !table52(&client).contains(tsunagu_lab::seed::CAFE_LAN_NET),
        "{}",
        table52(&client)
    );
    assert!(
        tsunagu_lab::tcp_connect_ok(&client, printer, SHORT),
        "the LAN, directly"
    );

    // Accepted: the route takes the LAN into the tunnel (what the default protects from).
    ok(&tsunagu(&client, &c.sock, &["set", "--accept-routes"]));
    wait("the route in table 52", Duration::from_secs(10), || {
        table52(&client).contains(tsunagu_lab::seed::CAFE_LAN_NET)
    });
    assert!(
        !tsunagu_lab::tcp_connect_ok(&client, printer, SHORT),
        "captured"
    );
    ok(&tsunagu(
        &client,
        &c.sock,
        &["set", "--accept-routes=false"],
    ));
    wait("the route gone", Duration::from_secs(10), || {
        !table52(&client).contains(tsunagu_lab::seed::CAFE_LAN_NET)
    });
    assert!(tsunagu_lab::tcp_connect_ok(&client, printer, SHORT));
}
