//! DNS as map streams see it: the `[dns]` settings as `DNSConfig` in the first map and
//! as a delta after a reload, node names under the base domain (a rename reaches peers
//! at once), `Node.Cap` from the capability version each node reports, and a node's
//! `Hostinfo.Services` (its PeerAPI and DNS-over-HTTPS offer) passed to its peers.

mod common;

use common::{SimNode, admin, node_row, server_with_dns, user_key, wait_for};
use serde_json::json;
use std::time::Duration;
use tsunagu_control::dns::{DnsFile, DnsSettings};
use tsunagu_proto::tailcfg::{CapabilityVersion, MapResponse, Node, Service};

const T: Duration = Duration::from_secs(10);

fn settings() -> DnsSettings {
    let f: DnsFile = serde_json::from_value(json!({
        "base_domain": "ts.lab.test",
        "override_local_dns": true,
        "nameservers": {
            "global": ["203.0.113.53"],
            "split": { "corp.lab.test": ["203.0.113.54"] },
        },
        "search_domains": ["lab.test"],
        "extra_records": [{ "name": "grafana.ts.lab.test", "value": "100.64.0.9" }],
    }))
    .unwrap();
    f.validate().unwrap()
}

fn peer<'a>(m: &'a MapResponse, key: &tsunagu_proto::NodePublic) -> Option<&'a Node> {
    m.peers
        .iter()
        .flatten()
        .chain(&m.peers_changed)
        .find(|p| p.key == *key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_settings_names_cap_and_services_reach_the_peers() {
    let s = server_with_dns(settings()).await;
    let key = user_key(&s, "alice", &[]).await;

    let mut a = SimNode::connect(&s, "laptop").await;
    assert!(a.register(&key).await.machine_authorized);
    let mut b = SimNode::connect(&s, "dev-m1sk9-s1").await;
    assert!(b.register(&key).await.machine_authorized);
    // b reports its PeerAPI (as tsunagud and Go clients do, in a non-streaming update).
    let services = vec![
        Service {
            proto: "peerapi4".into(),
            port: 40123,
            ..Service::default()
        },
        Service {
            proto: "peerapi-dns-proxy".into(),
            port: 1,
            ..Service::default()
        },
    ];
    let mut update = b.map_request(false);
    update.omit_peers = true;
    update.hostinfo.as_mut().unwrap().services = services.clone();
    b.client.map(&update).await.unwrap();

    let mut sa = a.stream().await;
    let first = sa.next_update(T).await.unwrap().unwrap();
    let dns = first
        .dns_config
        .as_ref()
        .expect("DNSConfig in the first map");
    assert!(dns.proxied, "MagicDNS on");
    assert_eq!(dns.domains, ["ts.lab.test", "lab.test"]);
    assert_eq!(dns.resolvers[0].addr, "203.0.113.53");
    assert_eq!(dns.routes["corp.lab.test"][0].addr, "203.0.113.54");
    assert_eq!(dns.extra_records[0].value, "100.64.0.9");
    assert_eq!(
        first.node.as_ref().unwrap().name,
        "laptop.ts.lab.test.",
        "names end in the base domain"
    );
    let pb = peer(&first, &b.node.public()).expect("b is a peer");
    assert_eq!(pb.name, "dev-m1sk9-s1.ts.lab.test.");
    assert_eq!(pb.hostinfo.services, services, "Services passed to peers");
    // b has sent a map request with its capability version: peers see it as Cap.
    assert_eq!(pb.cap, CapabilityVersion(130));
    assert_eq!(
        first.node.as_ref().unwrap().cap,
        CapabilityVersion(130),
        "a's own stream request counts too"
    );

    // A rename reaches a's stream as PeersChanged with the new name, within 2 s.
    let b_id = node_row(&s, &b).await.id;
    let (status, v) = admin(
        &s,
        "POST",
        &format!("/v1/nodes/{b_id}/rename"),
        Some(json!({ "name": "renamed" })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let bk = b.node.public();
    let (m, took) = wait_for(&mut sa, Duration::from_secs(2), "renamed peer", |m| {
        peer(m, &bk).is_some_and(|p| p.name == "renamed.ts.lab.test.")
    })
    .await;
    assert!(m.dns_config.is_none(), "DNS settings unchanged: not resent");
    println!("rename reached the peer after {took:?}");

    // A reload of the DNS settings reaches the stream as a delta.
    let mut next = settings();
    next.global = vec!["203.0.113.55".into()];
    s.state.set_dns(&next).unwrap();
    let (m, _) = wait_for(&mut sa, Duration::from_secs(2), "new DNSConfig", |m| {
        m.dns_config.is_some()
    })
    .await;
    assert_eq!(m.dns_config.unwrap().resolvers[0].addr, "203.0.113.55");
    // The base domain is fixed while the server runs.
    next.base_domain = "other.lab.test".into();
    let e = s.state.set_dns(&next).unwrap_err();
    assert!(e.contains("restart"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magic_dns_off_sends_no_proxied_flag_but_still_the_resolvers() {
    let mut d = settings();
    d.magic_dns = false;
    let s = server_with_dns(d).await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "laptop").await;
    assert!(a.register(&key).await.machine_authorized);
    let mut sa = a.stream().await;
    let first = sa.next_update(T).await.unwrap().unwrap();
    let dns = first.dns_config.unwrap();
    assert!(!dns.proxied);
    assert_eq!(dns.domains, ["lab.test"], "no base domain to search");
    assert_eq!(dns.resolvers[0].addr, "203.0.113.53");
}
