//! The embedded relay seen from a node: the DERP map in its first map response, DERP on
//! the server's own port, STUN on the announced port.

mod common;

use common::{SimNode, server_with, server_with_regions, user_key};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tsunagu_control::relay::{RegionConfig, RelaySettings};
use tsunagu_derp::client::{ClientConn, ClientEvent, parse_upgrade_response, upgrade_request};
use tsunagu_derp::{ClientInfo, stun};
use tsunagu_proto::NodePrivate;
use tsunagu_proto::tailcfg::NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION;

const T: Duration = Duration::from_secs(10);

/// A DERP client logged in through `addr`'s `/derp`.
async fn derp_client(addr: &str, key: NodePrivate) -> (tokio::net::TcpStream, ClientConn) {
    try_derp_login(addr, key)
        .await
        .expect("the relay serves the login")
}

/// A DERP login with `key` through `addr`: the connection once the relay sent its
/// ServerInfo, `None` when it closed the connection instead.
async fn try_derp_login(
    addr: &str,
    key: NodePrivate,
) -> Option<(tokio::net::TcpStream, ClientConn)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(upgrade_request("relay").as_bytes())
        .await
        .unwrap();
    let mut conn = ClientConn::new(key, ClientInfo::default());
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut upgraded = false;
    loop {
        while let Some(b) = conn.poll_transmit() {
            if tcp.write_all(&b).await.is_err() {
                return None;
            }
        }
        if let Some(ClientEvent::Connected { .. }) = conn.poll_event() {
            return Some((tcp, conn));
        }
        let n = match tokio::time::timeout(T, tcp.read(&mut buf))
            .await
            .expect("relay answers or closes")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => n,
        };
        if upgraded {
            conn.handle_input(&buf[..n]).unwrap();
        } else {
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = parse_upgrade_response(&got).unwrap() {
                upgraded = true;
                conn.handle_input(&got[end..]).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_the_region_and_can_use_it() {
    let s = server_with(Some(RelaySettings {
        stun_listen: Some("127.0.0.1:0".into()),
        region_name: "Test lab".into(),
        announce_plain_http: true,
        ..RelaySettings::default()
    }))
    .await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "laptop").await;
    assert!(a.register(&key).await.machine_authorized);
    let mut stream = a.stream().await;
    let first = stream.next_update(T).await.unwrap().unwrap();
    let json = serde_json::to_string(&first).unwrap();
    let parsed: Result<ts_control_serde::MapResponse, _> = serde_json::from_str(&json);
    assert!(parsed.is_ok(), "{:?}\n{json}", parsed.err());

    let map = first.derp_map.expect("a DERP map");
    let region = &map.regions[&900];
    assert_eq!(region.region_name, "Test lab");
    let node = &region.nodes[0];
    let addr = s.url.trim_start_matches("http://").to_string();
    assert_eq!(
        format!("{}:{}", node.host_name, node.derp_port),
        addr,
        "{node:?}"
    );
    assert_eq!(node.ipv4, "127.0.0.1");
    assert!(node.stun_port > 0, "{node:?}");
    // Captive-portal detection stays off with a region too.
    assert!(
        first
            .node
            .as_ref()
            .unwrap()
            .cap_map
            .contains_key(NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION)
    );

    // DERP on the server's own port: two clients exchange a packet.
    let (mut ta, mut ca) = derp_client(&addr, a.node.clone()).await;
    let (mut tb, mut cb) = derp_client(&addr, NodePrivate::generate()).await;
    ca.send_packet(cb.public_key(), b"over the relay").unwrap();
    while let Some(b) = ca.poll_transmit() {
        ta.write_all(&b).await.unwrap();
    }
    let mut buf = [0u8; 4096];
    let got = loop {
        if let Some(ev) = cb.poll_event() {
            break ev;
        }
        let n = tokio::time::timeout(T, tb.read(&mut buf))
            .await
            .expect("packet")
            .unwrap();
        assert!(n > 0);
        cb.handle_input(&buf[..n]).unwrap();
    };
    assert_eq!(
        got,
        ClientEvent::Packet {
            src: a.node.public(),
            packet: bytes::Bytes::from_static(b"over the relay")
        }
    );

    // STUN on the announced port.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx = stun::TxId::random();
    udp.send_to(
        &stun::binding_request(tx),
        ("127.0.0.1", node.stun_port as u16),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(T, udp.recv_from(&mut buf))
        .await
        .expect("STUN answer")
        .unwrap();
    assert_eq!(
        stun::parse_binding_response(&buf[..n]),
        Ok((tx, udp.local_addr().unwrap()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_server_announces_no_region_unless_told() {
    let s = server_with(Some(RelaySettings {
        stun_listen: Some("127.0.0.1:0".into()),
        ..RelaySettings::default()
    }))
    .await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "laptop").await;
    assert!(a.register(&key).await.machine_authorized);
    let mut stream = a.stream().await;
    let first = stream.next_update(T).await.unwrap().unwrap();
    assert!(first.derp_map.is_none(), "{:?}", first.derp_map);
    // The relay itself still serves on the port.
    let addr = s.url.trim_start_matches("http://").to_string();
    let (_tcp, conn) = derp_client(&addr, NodePrivate::generate()).await;
    assert!(conn.is_connected());
}

/// The first map a new node of `s` receives.
async fn first_map(s: &common::TestServer) -> tsunagu_proto::tailcfg::MapResponse {
    let key = user_key(s, "alice", &[]).await;
    let mut a = SimNode::connect(s, "laptop").await;
    assert!(a.register(&key).await.machine_authorized);
    let mut stream = a.stream().await;
    stream.next_update(T).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_run_elsewhere_are_announced_beside_the_servers_own() {
    let b: RegionConfig = "id=901,code=b,name=Region B,host=198.51.100.7,derp_port=8080,http"
        .parse()
        .unwrap();
    let s = server_with_regions(
        Some(RelaySettings {
            stun_listen: Some("127.0.0.1:0".into()),
            announce_plain_http: true,
            ..RelaySettings::default()
        }),
        vec![b.validate().unwrap()],
    )
    .await;
    let first = first_map(&s).await;
    let json = serde_json::to_string(&first).unwrap();
    let parsed: Result<ts_control_serde::MapResponse, _> = serde_json::from_str(&json);
    assert!(parsed.is_ok(), "{:?}\n{json}", parsed.err());
    let map = first.derp_map.expect("a DERP map");
    let ids: Vec<i32> = map.regions.keys().copied().collect();
    assert_eq!(ids, [900, 901]);
    let r = &map.regions[&901];
    assert_eq!(
        (r.region_code.as_str(), r.region_name.as_str()),
        ("b", "Region B")
    );
    let n = &r.nodes[0];
    assert_eq!(
        (
            n.host_name.as_str(),
            n.ipv4.as_str(),
            n.derp_port,
            n.stun_port
        ),
        ("198.51.100.7", "198.51.100.7", 8080, 0)
    );

    // Without a relay of its own, the server still announces the others.
    let s = server_with_regions(None, vec![b.validate().unwrap()]).await;
    let map = first_map(&s).await.derp_map.expect("a DERP map");
    let ids: Vec<i32> = map.regions.keys().copied().collect();
    assert_eq!(ids, [901]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_with_the_servers_own_id_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let clash: RegionConfig = "id=900,code=b,host=198.51.100.7".parse().unwrap();
    let cfg = tsunagu_control::server::ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".into(),
        server_url: "http://127.0.0.1:1".into(),
        tls: None,
        policy_file: None,
        admin_socket: dir.path().join("admin.sock"),
        ephemeral_timeout: Duration::from_secs(300),
        relay: Some(RelaySettings {
            stun_listen: None,
            ..RelaySettings::default()
        }),
        derp_regions: vec![clash.validate().unwrap()],
        dns: Default::default(),
        standby_failover_after: std::time::Duration::from_secs(3),
        limits: Default::default(),
    };
    let e = match tsunagu_control::server::Server::start(&cfg).await {
        Ok(_) => panic!("started with two regions 900"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        e,
        "DERP regions: region id 900 is given twice (the server's own region counts)"
    );
}

/// Whether a DERP login with `key` through `addr` is served (false: the relay closed the
/// connection without a ServerInfo).
async fn derp_login_served(addr: &str, key: NodePrivate) -> bool {
    try_derp_login(addr, key).await.is_some()
}

/// `--relay-verify-clients`: the embedded relay serves the node keys of the tailnet's
/// live nodes, and refuses strangers and nodes whose key an admin expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifying_relay_serves_only_live_nodes_of_the_tailnet() {
    let s = server_with(Some(RelaySettings {
        stun_listen: None,
        announce_plain_http: true,
        verify_clients: true,
        ..RelaySettings::default()
    }))
    .await;
    let addr = s.url.trim_start_matches("http://").to_string();
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "laptop").await;
    assert!(a.register(&key).await.machine_authorized);
    assert!(
        derp_login_served(&addr, a.node.clone()).await,
        "a node of the tailnet"
    );
    assert!(
        !derp_login_served(&addr, NodePrivate::generate()).await,
        "a stranger"
    );
    let id = common::node_row(&s, &a).await.id;
    let (status, _) = common::admin(&s, "POST", &format!("/v1/nodes/{id}/expire"), None).await;
    assert_eq!(status, 200);
    assert!(
        !derp_login_served(&addr, a.node.clone()).await,
        "an expired node"
    );
    let m = s.relay.as_ref().unwrap().metrics();
    assert_eq!((m.logins, m.refused_not_tailnet), (1, 2), "{m:?}");
}
