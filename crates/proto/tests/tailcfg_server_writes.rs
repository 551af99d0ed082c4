//! What the coordination server writes must read with Tailscale's own Rust types
//! (`ts_control_serde`, the test oracle) and carry the right values.

use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tsunagu_proto::key::{ChallengePublic, DiscoPublic, MachinePrivate, NodePrivate, NodePublic};
use tsunagu_proto::tailcfg::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ts_node_key(k: &NodePublic) -> ts_keys::NodePublicKey {
    ts_keys::NodePublicKey::from_bytes(k.0)
}

fn sample_hostinfo() -> Hostinfo {
    Hostinfo {
        ipn_version: "1.90.9-tsunagu".into(),
        os: "linux".into(),
        hostname: "exit-1".into(),
        go_arch: "amd64".into(),
        routable_ips: vec![net("0.0.0.0/0"), net("::/0"), net("192.168.1.0/24")],
        request_tags: vec!["tag:exit".into()],
        net_info: Some(NetInfo {
            preferred_derp: 900,
            working_udp: Some(true),
            derp_latency: BTreeMap::from([("900-v4".to_string(), 0.012)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn sample_node(id: i64, exit: bool) -> Node {
    let key = NodePrivate::generate().public();
    let mut allowed = vec![
        net(&format!("100.64.0.{id}/32")),
        net(&format!("fd7a:115c:a1e0::{id}/128")),
    ];
    if exit {
        allowed.extend([net("0.0.0.0/0"), net("::/0")]);
    }
    let mut node = Node {
        id: NodeID(id),
        stable_id: StableNodeID(format!("n{id}CNTRL")),
        name: format!("node{id}.tail.example."),
        user: UserID(7),
        key,
        key_expiry: Time::ZERO,
        machine: MachinePrivate::generate().public(),
        disco_key: DiscoPublic([id as u8; 32]),
        addresses: allowed[..2].to_vec(),
        allowed_ips: Some(allowed),
        primary_routes: if exit {
            vec![net("0.0.0.0/0"), net("::/0")]
        } else {
            vec![]
        },
        endpoints: vec![
            "198.51.100.7:41641".parse().unwrap(),
            "[2001:db8::7]:41641".parse().unwrap(),
        ],
        hostinfo: sample_hostinfo(),
        created: "2026-01-02T03:04:05.5Z".parse().unwrap(),
        cap: CURRENT_CAPABILITY_VERSION,
        tags: vec!["tag:exit".into()],
        online: Some(true),
        last_seen: Some("2026-11-28T10:00:00Z".parse().unwrap()),
        machine_authorized: true,
        cap_map: BTreeMap::from([
            ("https://tailscale.com/cap/is-admin".to_string(), vec![]),
            (
                "tsunagu.example/cap/x".to_string(),
                vec![serde_json::json!({"a": 1})],
            ),
        ]),
        ..Default::default()
    };
    node.set_home_derp(900);
    node
}

fn sample_derp_map() -> DERPMap {
    DERPMap::from_regions([DERPRegion {
        region_id: 900,
        region_code: "tsu".into(),
        region_name: "tsunagu".into(),
        nodes: vec![DERPNode {
            name: "900a".into(),
            region_id: 900,
            host_name: "derp.example.net".into(),
            ipv4: "203.0.113.9".into(),
            stun_port: 3478,
            derp_port: 8443,
            ..Default::default()
        }],
        ..Default::default()
    }])
}

#[test]
fn over_tls_public_key_response_reads_as_machine_keys() {
    let server = MachinePrivate::generate();
    let resp = OverTLSPublicKeyResponse::new(server.public());
    let json = serde_json::to_string(&resp).unwrap();
    assert!(json.contains(r#""legacyPublicKey":"mkey:0000"#), "{json}");

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Oracle {
        legacy_public_key: ts_keys::MachinePublicKey,
        public_key: ts_keys::MachinePublicKey,
    }
    let o: Oracle = serde_json::from_str(&json).unwrap();
    assert_eq!(
        o.public_key,
        ts_keys::MachinePublicKey::from_bytes(server.public().0)
    );
    assert_eq!(
        o.legacy_public_key,
        ts_keys::MachinePublicKey::from_bytes([0; 32])
    );
    let back: OverTLSPublicKeyResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(back, resp);
}

#[test]
fn early_noise_reads_as_challenge_key() {
    let early = EarlyNoise {
        node_key_challenge: ChallengePublic([9; 32]),
    };
    let json = serde_json::to_string(&early).unwrap();
    #[derive(serde::Deserialize)]
    struct Oracle {
        #[serde(rename = "nodeKeyChallenge")]
        challenge: ts_keys::ChallengePublicKey,
    }
    let o: Oracle = serde_json::from_str(&json).unwrap();
    assert_eq!(
        o.challenge,
        ts_keys::ChallengePublicKey::from_bytes([9; 32])
    );
}

#[test]
fn register_response_reads_with_oracle() {
    let resp = RegisterResponse {
        user: User {
            id: UserID(7),
            display_name: "Alice".into(),
            created: "2026-01-01T00:00:00Z".parse().unwrap(),
            ..Default::default()
        },
        login: Login {
            id: LoginID(70),
            provider: "authkey".into(),
            login_name: "alice@example.com".into(),
            display_name: "Alice".into(),
            ..Default::default()
        },
        machine_authorized: true,
        ..Default::default()
    };
    let json = serde_json::to_string(&resp).unwrap();
    let o: ts_control_serde::RegisterResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(o.user.id, 7);
    assert_eq!(o.user.display_name, Some("Alice"));
    assert_eq!(o.user.profile_pic_url, None);
    assert_eq!(o.login.login_name, "alice@example.com");
    assert_eq!(o.login.provider, "authkey");
    assert!(o.machine_authorized);
    assert!(!o.node_key_expired);
    assert_eq!(o.auth_url, "");
    assert_eq!(o.error, "");
    assert_eq!(o.node_key_signature, None);

    // Pending interactive login, and a refusal.
    let pending = RegisterResponse {
        auth_url: "https://ctl.example/a/xyz".into(),
        ..Default::default()
    };
    let json = serde_json::to_string(&pending).unwrap();
    let o: ts_control_serde::RegisterResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(o.auth_url, "https://ctl.example/a/xyz");
    assert!(!o.machine_authorized);
    let json = serde_json::to_string(&RegisterResponse::error("invalid auth key")).unwrap();
    let o: ts_control_serde::RegisterResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(o.error, "invalid auth key");
}

#[test]
fn full_map_response_reads_with_oracle() {
    let self_node = sample_node(1, false);
    let exit = sample_node(2, true);
    let plain = sample_node(3, false);
    let narrow = FilterRule::allow(
        ["100.64.0.0/10", "cap:tsunagu.example/cap/x"],
        [NetPortRange {
            ip: "100.64.0.2".into(),
            bits: None,
            ports: PortRange::single(443),
        }],
    );
    let resp = MapResponse {
        map_session_handle: "sess-1".into(),
        seq: 1,
        node: Some(self_node.clone()),
        derp_map: Some(sample_derp_map()),
        peers: Some(vec![exit.clone(), plain.clone()]),
        dns_config: Some(DNSConfig {
            resolvers: vec![
                Resolver::new("1.1.1.1"),
                Resolver::new("https://dns.example/dns-query"),
            ],
            routes: BTreeMap::from([("tail.example".to_string(), vec![])]),
            domains: vec!["tail.example".into()],
            proxied: true,
            extra_records: vec![DNSRecord {
                name: "node2.tail.example.".into(),
                record_type: String::new(),
                value: "100.64.0.2".into(),
            }],
            ..Default::default()
        }),
        domain: "example.com".into(),
        collect_services: Some(false),
        packet_filter: Some(vec![FilterRule::allow_all(), narrow]),
        packet_filters: BTreeMap::from([(
            "extra".to_string(),
            Some(vec![FilterRule::allow_all()]),
        )]),
        user_profiles: vec![UserProfile {
            id: UserID(7),
            login_name: "alice@example.com".into(),
            display_name: "Alice".into(),
            profile_pic_url: String::new(),
        }],
        control_time: Some(Time::now()),
        tka_info: Some(TKAInfo::default()),
        client_version: Some(ClientVersion {
            running_latest: true,
            ..Default::default()
        }),
        control_dial_plan: Some(ControlDialPlan {
            candidates: vec![ControlIPCandidate {
                ip: Some("192.0.2.1".parse().unwrap()),
                dial_timeout_sec: 10.0,
                priority: 1,
                ..Default::default()
            }],
        }),
        ping_request: Some(PingRequest {
            url: "https://ctl.example/ping/abc".into(),
            url_is_noise: true,
            ..Default::default()
        }),
        default_auto_update: Some(false),
        ..Default::default()
    };
    let json = serde_json::to_string(&resp).unwrap();
    let o: ts_control_serde::MapResponse = serde_json::from_str(&json).unwrap();

    assert_eq!(o.map_session_handle, "sess-1");
    assert_eq!(o.seq, 1);
    assert_eq!(o.keep_alive, None);
    assert_eq!(o.domain, "example.com");
    assert_eq!(o.collect_services, Some(false));
    assert_eq!(o.default_auto_update, Some(false));

    // Self node.
    let n = o.node.as_ref().unwrap();
    assert_eq!(n.id, 1);
    assert_eq!(n.stable_id.0, "n1CNTRL");
    assert_eq!(n.name, "node1.tail.example.");
    assert_eq!(n.user, 7);
    assert_eq!(n.key, ts_node_key(&self_node.key));
    assert_eq!(
        n.machine,
        Some(ts_keys::MachinePublicKey::from_bytes(self_node.machine.0))
    );
    assert_eq!(
        n.disco_key,
        Some(ts_keys::DiscoPublicKey::from_bytes([1; 32]))
    );
    assert_eq!(n.addresses.0.to_string(), "100.64.0.1/32");
    assert_eq!(n.addresses.1.to_string(), "fd7a:115c:a1e0::1/128");
    assert_eq!(n.home_derp.map(u32::from), Some(900));
    assert_eq!(n.endpoints, self_node.endpoints);
    assert_eq!(n.cap, ts_capabilityversion::CapabilityVersion::V130);
    assert_eq!(n.online, Some(true));
    assert!(n.machine_authorized);
    assert_eq!(n.tags.as_deref(), Some(&["tag:exit"][..]));
    // Go's zero time: "never expires".
    assert_eq!(
        n.key_expiry.map(|t| t.to_rfc3339()),
        Some("0001-01-01T00:00:00+00:00".into())
    );
    assert_eq!(n.created.to_rfc3339(), "2026-01-02T03:04:05.500+00:00");
    assert_eq!(n.last_seen.map(|t| t.timestamp()), Some(1_795_860_000));
    assert!(n.cap_map.contains_key("https://tailscale.com/cap/is-admin"));
    assert_eq!(n.cap_map["tsunagu.example/cap/x"].0[0].get(), r#"{"a":1}"#);
    // ts_control_serde names Node's field "HostInfo" (Go: "Hostinfo"), so it never sees ours
    // inside a Node; read the Hostinfo on its own instead. Where its field names differ from
    // Go's tags ("IpnVersion", "Os", "RoutableIps", "PreferredDerp", …) the oracle is wrong,
    // not us: only the names it spells like Go are checked.
    let hi_json = serde_json::to_string(&self_node.hostinfo).unwrap();
    let hi: ts_control_serde::HostInfo = serde_json::from_str(&hi_json).unwrap();
    assert_eq!(hi.hostname, Some("exit-1"));
    assert_eq!(hi.go_arch, "amd64");
    assert_eq!(hi.request_tags.as_deref(), Some(&["tag:exit"][..]));
    assert_eq!(hi.net_info.as_ref().unwrap().hair_pinning, None);

    // Exit node peer: both default routes in AllowedIPs.
    let peers = o.peers.as_ref().unwrap();
    assert_eq!(peers.iter().map(|p| p.id).collect::<Vec<_>>(), [2, 3]);
    let allowed: Vec<String> = peers[0]
        .allowed_ips
        .as_ref()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        allowed,
        [
            "100.64.0.2/32",
            "fd7a:115c:a1e0::2/128",
            "0.0.0.0/0",
            "::/0"
        ]
    );
    assert_eq!(peers[0].primary_routes.len(), 2);
    assert_eq!(peers[1].allowed_ips.as_ref().unwrap().len(), 2);
    assert!(exit.is_exit_node() && !plain.is_exit_node());

    // DERP map.
    let dm = o.derp_map.as_ref().unwrap();
    let (rid, region) = dm.regions.iter().next().unwrap();
    assert_eq!(u32::from(*rid), 900);
    assert_eq!(region.code, "tsu");
    assert_eq!(region.nodes[0].hostname, "derp.example.net");
    assert_eq!(region.nodes[0].derp_port, 8443);
    assert_eq!(
        region.nodes[0].ipv4,
        ts_control_serde::DerpIpUsage::FixedAddr("203.0.113.9".parse().unwrap())
    );

    // Packet filter: allow-all first, then the narrow rule.
    let pf = o.packet_filter.as_ref().unwrap();
    assert_eq!(pf.len(), 2);
    let all = pf[0].as_network().unwrap();
    assert_eq!(all.src_ips.len(), 1);
    assert_eq!(all.src_ips[0].to_string(), "*");
    assert_eq!(
        all.dst_ports[0].ip,
        ts_packetfilter_serde::IpRange::Wildcard
    );
    assert_eq!(all.dst_ports[0].ports, 0..=65535);
    let narrow = pf[1].as_network().unwrap();
    assert_eq!(narrow.src_ips[1].to_string(), "cap:tsunagu.example/cap/x");
    assert_eq!(narrow.dst_ports[0].ports, 443..=443);
    assert!(o.packet_filters["extra"].as_ref().unwrap()[0].is_network());

    // User profiles, DNS, the rest.
    assert_eq!(o.user_profiles.len(), 1);
    assert_eq!(o.user_profiles[0].id, 7);
    assert_eq!(o.user_profiles[0].login_name, "alice@example.com");
    assert_eq!(o.user_profiles[0].display_name, Some("Alice"));
    let dns = o.dns_config.as_ref().unwrap();
    assert!(dns.magic_dns);
    assert_eq!(dns.resolvers.len(), 2);
    assert_eq!(dns.search_domains, ["tail.example"]);
    assert!(dns.routes["tail.example"].as_ref().unwrap().is_empty());
    assert_eq!(dns.extra_records.len(), 1);
    assert!(o.control_time.is_some());
    assert!(o.client_version.as_ref().unwrap().running_latest);
    assert_eq!(
        o.control_dial_plan.as_ref().unwrap().candidates[0].priority,
        1
    );
    let ping = o.ping_request.as_ref().unwrap();
    assert!(ping.url_is_noise);
    assert_eq!(ping.url.as_str(), "https://ctl.example/ping/abc");
    assert!(ping.types.is_empty() && ping.ip.is_none());

    // And our own reader gets back exactly what was written.
    let back: MapResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(back, resp);
}

#[test]
fn delta_map_response_reads_with_oracle() {
    let changed = sample_node(4, true);
    let mut patch = PeerChange::new(NodeID(2));
    patch.derp_region = 901;
    patch.endpoints = vec!["203.0.113.5:41641".parse::<SocketAddr>().unwrap()];
    patch.online = Some(false);
    patch.last_seen = Some("2026-11-28T12:00:00Z".parse().unwrap());
    patch.key = Some(NodePublic([5; 32]));
    patch.disco_key = Some(DiscoPublic([6; 32]));
    patch.key_expiry = Some("2027-05-01T00:00:00Z".parse().unwrap());
    patch.cap = CapabilityVersion(131);
    let resp = MapResponse {
        seq: 7,
        peers_changed: vec![changed.clone()],
        peers_removed: vec![NodeID(3), NodeID(9)],
        peers_changed_patch: vec![patch],
        peer_seen_change: BTreeMap::from([(NodeID(2), true), (NodeID(5), false)]),
        online_change: BTreeMap::from([(NodeID(2), false)]),
        packet_filter: Some(vec![]),
        health: Some(vec![]),
        ..Default::default()
    };
    let json = serde_json::to_string(&resp).unwrap();
    assert!(
        json.contains(r#""PacketFilter":[]"#),
        "deny-all must be sent: {json}"
    );
    assert!(
        json.contains(r#""PeerSeenChange":{"2":true,"5":false}"#),
        "{json}"
    );
    let o: ts_control_serde::MapResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(o.seq, 7);
    assert!(o.peers.is_none());
    let pc = o.peers_changed.as_ref().unwrap();
    assert_eq!(pc[0].id, 4);
    assert_eq!(pc[0].key, ts_node_key(&changed.key));
    assert_eq!(pc[0].allowed_ips.as_ref().unwrap().len(), 4);
    assert_eq!(o.peers_removed.as_deref(), Some(&[3, 9][..]));
    let p = &o.peers_changed_patch.as_ref().unwrap()[0];
    assert_eq!(p.node_id, 2);
    assert_eq!(p.derp_region.map(u32::from), Some(901));
    assert_eq!(
        p.endpoints.as_deref(),
        Some(&["203.0.113.5:41641".parse().unwrap()][..])
    );
    assert_eq!(p.online, Some(false));
    assert_eq!(p.key, Some(ts_keys::NodePublicKey::from_bytes([5; 32])));
    assert_eq!(
        p.disco_key,
        Some(ts_keys::DiscoPublicKey::from_bytes([6; 32]))
    );
    assert_eq!(
        p.last_seen.unwrap().to_rfc3339(),
        "2026-11-28T12:00:00+00:00"
    );
    assert_eq!(
        p.key_expiry.unwrap().to_rfc3339(),
        "2027-05-01T00:00:00+00:00"
    );
    assert_eq!(p.cap, Some(ts_capabilityversion::CapabilityVersion::V131));
    assert_eq!(o.peer_seen_change, BTreeMap::from([(2, true), (5, false)]));
    assert_eq!(o.online_change, BTreeMap::from([(2, false)]));
    assert_eq!(o.packet_filter.as_ref().map(Vec::len), Some(0));

    let back: MapResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(back, resp);
}

#[test]
fn keep_alive_is_exactly_gos() {
    let json = serde_json::to_string(&MapResponse::keep_alive()).unwrap();
    assert_eq!(json, r#"{"KeepAlive":true}"#);
    let o: ts_control_serde::MapResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(o.keep_alive, Some(true));
    assert!(o.node.is_none() && o.peers.is_none() && o.packet_filter.is_none());
    assert_eq!(
        serde_json::to_string(&MapResponse::default()).unwrap(),
        "{}"
    );
}

#[test]
fn derp_map_and_filter_alone_read_with_oracle() {
    let json = serde_json::to_string(&sample_derp_map()).unwrap();
    let o: ts_control_serde::DerpMap = serde_json::from_str(&json).unwrap();
    assert_eq!(o.regions.len(), 1);
    assert!(!o.omit_default_regions);
    let node = &o.regions.values().next().unwrap().nodes[0];
    assert_eq!(node.name, "900a");
    assert_eq!(u32::from(node.region_id), 900);
    assert_eq!(Option::<u16>::from(node.stun_port), Some(3478));

    let rules = vec![FilterRule::allow_all()];
    let json = serde_json::to_string(&rules).unwrap();
    assert_eq!(
        json,
        r#"[{"SrcIPs":["*"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]}]"#
    );
    let o: ts_packetfilter_serde::Ruleset = serde_json::from_str(&json).unwrap();
    let r = o[0].as_network().unwrap();
    assert!(ts_packetfilter_serde::IpProto::is_default_set(&r.ip_proto));
    assert_eq!(r.dst_ports[0].ports, 0..=65535);
}

#[test]
fn node_wire_shape_follows_go_tags() {
    let node = sample_node(2, true);
    let v = serde_json::to_value(&node).unwrap();
    assert_eq!(v["DERP"], "127.3.3.40:900");
    assert_eq!(v["HomeDERP"], 900);
    assert_eq!(v["KeyExpiry"], "0001-01-01T00:00:00Z");
    assert_eq!(v["Created"], "2026-01-02T03:04:05.5Z");
    assert_eq!(v["Key"], node.key.tailscale());
    assert!(v["Machine"].as_str().unwrap().starts_with("mkey:"));
    assert!(v["DiscoKey"].as_str().unwrap().starts_with("discokey:"));
    assert_eq!(v["Hostinfo"]["RoutableIPs"][1], "::/0");
    assert_eq!(v["Hostinfo"]["NetInfo"]["PreferredDERP"], 900);
    assert_eq!(
        v["CapMap"]["https://tailscale.com/cap/is-admin"],
        serde_json::json!([])
    );
    // omitempty fields stay out.
    for absent in [
        "Sharer",
        "KeySignature",
        "Expired",
        "IsWireGuardOnly",
        "ComputedName",
        "Capabilities",
    ] {
        assert!(v.get(absent).is_none(), "{absent}");
    }
    // Go-style empties still read: null slices, null hostinfo, legacy-only DERP.
    let minimal = r#"{"ID":5,"Key":"nodekey:0505050505050505050505050505050505050505050505050505050505050505",
        "Addresses":null,"AllowedIPs":null,"Hostinfo":null,"DERP":"127.3.3.40:2","KeyExpiry":"0001-01-01T00:00:00Z",
        "Machine":"mkey:0000000000000000000000000000000000000000000000000000000000000000","DiscoKey":"",
        "CapMap":{"a":null},"Created":"2020-01-01T00:00:00+02:00","SomethingNew":{"x":1}}"#;
    let n: Node = serde_json::from_str(minimal).unwrap();
    assert_eq!(n.id, NodeID(5));
    assert!(n.addresses.is_empty() && n.allowed_ips.is_none());
    assert_eq!(n.derp_region(), 2);
    assert!(n.key_expiry.is_zero() && n.disco_key.is_zero() && n.machine.is_zero());
    assert_eq!(n.cap_map["a"], Vec::<serde_json::Value>::new());
    assert_eq!(n.created.to_string(), "2019-12-31T22:00:00Z");
}
