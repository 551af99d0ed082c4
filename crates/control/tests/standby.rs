//! Standby hosts of an exit node, in-process: provisioning (single-use, expiring keys,
//! only for tagged and approved exit nodes, removal revokes at once), the key handover,
//! and switches (admin failover, drain, the active host gone) as members see them: one
//! peer whose endpoints and disco key move to the new host, only after it confirmed.

mod common;

use common::{TestServer, admin, server, user_key, wait_end, wait_for};
use std::time::Duration;
use tokio::sync::mpsc;
use tsunagu_client::{ControlClient, MapStream};
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, HANDOVER_PATH, HandoverRequest, HostReport, HostRole, Hostinfo,
    MapRequest, MapResponse, NodeID, RegisterRequest, RegisterResponse, RegisterResponseAuth,
    StandbyInfo, WireNodePrivate,
};
use tsunagu_proto::{DiscoPublic, MachinePrivate, NodePrivate};

fn hostinfo(name: &str, offers_exit: bool) -> Hostinfo {
    Hostinfo {
        hostname: name.into(),
        os: "linux".into(),
        app: "tsunagud".into(),
        routable_ips: if offers_exit {
            vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]
        } else {
            vec![]
        },
        ..Hostinfo::default()
    }
}

/// A machine: its keys and control connection.
struct Machine {
    machine: MachinePrivate,
    key: NodePrivate,
    client: ControlClient,
    name: String,
    disco: DiscoPublic,
    endpoint: String,
    /// Reports say it takes the role whenever ready (`tsunagud --prefer`).
    prefer: bool,
}

impl Machine {
    async fn new(s: &TestServer, name: &str, endpoint: &str) -> Machine {
        let machine = MachinePrivate::generate();
        let client = ControlClient::connect(&s.url, &s.key, &machine)
            .await
            .unwrap();
        Machine {
            machine,
            key: NodePrivate::generate(),
            client,
            name: name.into(),
            disco: DiscoPublic(NodePrivate::generate().public().0),
            endpoint: endpoint.into(),
            prefer: false,
        }
    }

    async fn register(&mut self, auth: &str, offers_exit: bool) -> RegisterResponse {
        let req = RegisterRequest {
            version: CURRENT_CAPABILITY_VERSION,
            node_key: self.key.public(),
            hostinfo: Some(hostinfo(&self.name, offers_exit)),
            auth: (!auth.is_empty()).then(|| RegisterResponseAuth {
                auth_key: auth.into(),
                ..RegisterResponseAuth::default()
            }),
            ..RegisterRequest::default()
        };
        self.client.register(&req).await.unwrap()
    }

    fn report(&self, offers_exit: bool, role: Option<HostRole>) -> MapRequest {
        MapRequest {
            version: CURRENT_CAPABILITY_VERSION,
            node_key: self.key.public(),
            disco_key: self.disco,
            hostinfo: Some(hostinfo(&self.name, offers_exit)),
            endpoints: vec![self.endpoint.clone()],
            omit_peers: true,
            tsunagu_host: (role.is_some() || self.prefer).then_some(HostReport {
                role,
                prefer: self.prefer,
            }),
            ..MapRequest::default()
        }
    }

    async fn send_report(&mut self, offers_exit: bool, role: Option<HostRole>) {
        let r = self.report(offers_exit, role);
        self.client.map(&r).await.unwrap();
    }

    async fn stream(&mut self) -> MapStream {
        let req = MapRequest {
            version: CURRENT_CAPABILITY_VERSION,
            compress: "zstd".into(),
            keep_alive: true,
            node_key: self.key.public(),
            stream: true,
            ..MapRequest::default()
        };
        self.client.map(&req).await.unwrap()
    }
}

/// Role messages a host got, each with the time it arrived.
type Roles = mpsc::UnboundedReceiver<(tokio::time::Instant, StandbyInfo)>;

/// Plays tsunagud on a host: follows the map stream, hands the key over when asked,
/// confirms every role it is given with a report (after `ack_delay`). Every role message
/// it got goes to the returned channel, with the time it arrived.
fn run_host(
    mut m: Machine,
    mut stream: MapStream,
    ack_delay: Duration,
) -> (tokio::task::JoinHandle<()>, Roles) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let msg = match stream.next().await {
                Some(Ok(m)) => m,
                other => {
                    eprintln!("host {} stream ended: {other:?}", m.name);
                    return;
                }
            };
            let Some(info) = msg.tsunagu_standby else {
                continue;
            };
            let arrived = tokio::time::Instant::now();
            if info.handover {
                let body = HandoverRequest {
                    node_key: m.key.public(),
                    private: WireNodePrivate(m.key.clone()),
                };
                let _ = m.client.post_json(HANDOVER_PATH, &body).await;
            }
            tokio::time::sleep(ack_delay).await;
            m.send_report(true, Some(info.role)).await;
            if tx.send((arrived, info)).is_err() {
                return;
            }
        }
    });
    (task, rx)
}

async fn next_role(rx: &mut Roles, want: HostRole) -> StandbyInfo {
    next_role_at(rx, want).await.1
}

/// The next message with role `want`, and when it arrived.
async fn next_role_at(rx: &mut Roles, want: HostRole) -> (tokio::time::Instant, StandbyInfo) {
    loop {
        let (at, info) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a role message within 10 s")
            .expect("the host is running");
        if info.role == want {
            return (at, info);
        }
    }
}

/// The tagged exit node `dev-m1sk9-s1`, approved, online, its stream returned.
async fn exit_node(s: &TestServer) -> (Machine, MapStream, i64) {
    let key = user_key(s, "admin", &["tag:exit"]).await;
    let mut a = Machine::new(s, "dev-m1sk9-s1", "198.51.100.2:41641").await;
    let r = a.register(&key, true).await;
    assert!(r.machine_authorized, "{r:?}");
    a.send_report(true, None).await;
    let id = s
        .state
        .store
        .get_node_by_node_key(&a.key.public().tailscale())
        .await
        .unwrap()
        .id;
    let (status, v) = admin(s, "POST", &format!("/v1/nodes/{id}/approve-exit"), None).await;
    assert_eq!(status, 200, "{v}");
    let stream = a.stream().await;
    (a, stream, id)
}

async fn standby_key(s: &TestServer, node: &str, expiration: &str) -> (u16, serde_json::Value) {
    admin(
        s,
        "POST",
        &format!("/v1/nodes/{node}/standby"),
        Some(serde_json::json!({ "expiration": expiration })),
    )
    .await
}

/// A standby host enrols with `key` while the exit node's host hands the key over.
async fn enrol(
    s: &TestServer,
    name: &str,
    endpoint: &str,
    key: &str,
) -> (Machine, RegisterResponse) {
    let mut b = Machine::new(s, name, endpoint).await;
    let r = b.register(key, true).await;
    (b, r)
}

#[tokio::test]
async fn standby_keys_are_single_use_expire_and_only_serve_tagged_approved_exit_nodes() {
    let s = server().await;
    // An untagged exit node (a user's) and a tagged one not approved: refused.
    let member_key = user_key(&s, "alice", &[]).await;
    let mut laptop = Machine::new(&s, "laptop", "198.18.1.10:41641").await;
    assert!(laptop.register(&member_key, true).await.machine_authorized);
    laptop.send_report(true, None).await;
    let lid = node_id(&s, &laptop).await;
    admin(&s, "POST", &format!("/v1/nodes/{lid}/approve-exit"), None).await;
    let (status, v) = standby_key(&s, "laptop", "1h").await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not tagged"), "{v}");

    let tag_key = user_key(&s, "admin", &["tag:exit"]).await;
    let mut other = Machine::new(&s, "other-exit", "198.51.100.9:41641").await;
    assert!(other.register(&tag_key, true).await.machine_authorized);
    other.send_report(true, None).await;
    let (status, v) = standby_key(&s, "other-exit", "1h").await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not an approved exit node"),
        "{v}"
    );

    // The approved, tagged exit node: a key, once.
    let (a, a_stream, id) = exit_node(&s).await;
    let a_key = a.key.clone();
    let (_a_task, mut a_roles) = run_host(a, a_stream, Duration::ZERO);
    let (status, v) = standby_key(&s, "dev-m1sk9-s1", "1h").await;
    assert_eq!(status, 200, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("tskey-standby-"), "{v}");

    let (mut b, r) = enrol(&s, "exit2", "198.51.100.6:41641", &key).await;
    let grant = r.tsunagu_standby.clone().expect("the identity's key");
    assert_eq!(grant.identity, "dev-m1sk9-s1");
    assert_eq!(grant.node_key.0, a_key, "the exit node's own key");
    assert!(r.machine_authorized && r.error.is_empty(), "{r:?}");
    // The exit node's host now hears about its standby host.
    let info = next_role(&mut a_roles, HostRole::Active).await;
    assert!(info.hosts.iter().any(|h| h.name == "exit2"), "{info:?}");
    // Neither the key nor any secret shows in the server's answer's Debug.
    let hex: String = a_key
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!format!("{r:?}").contains(&hex));

    // Single use: another machine with the same key is refused.
    let (_c, r) = enrol(&s, "exit3", "198.51.100.7:41641", &key).await;
    assert!(r.error.contains("already used"), "{r:?}");
    assert!(r.tsunagu_standby.is_none());

    // Expired keys are refused.
    let (_, v) = standby_key(&s, "dev-m1sk9-s1", "1s").await;
    let late = v["key"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_d, r) = enrol(&s, "exit4", "198.51.100.8:41641", &late).await;
    assert!(r.error.contains("expired"), "{r:?}");

    // The enrolled host registers and streams as the exit node.
    b.key = grant.node_key.0.clone();
    let r = b.register("", true).await;
    assert!(r.machine_authorized && r.tsunagu_standby.is_none(), "{r:?}");
    b.send_report(true, None).await;
    let mut b_stream = b.stream().await;
    let (first, _) = wait_for(
        &mut b_stream,
        Duration::from_secs(5),
        "b's first map",
        |m| m.node.is_some(),
    )
    .await;
    let role = first.tsunagu_standby.expect("the role on the first map");
    assert_eq!(role.role, HostRole::Standby);
    assert_eq!(
        first.node.unwrap().id,
        NodeID(id),
        "b runs as the exit node"
    );
    let (_, v) = admin(&s, "GET", "/v1/standby", None).await;
    assert_eq!(v["nodes"][0]["name"], "dev-m1sk9-s1", "{v}");
    assert_eq!(v["nodes"][0]["active"], "dev-m1sk9-s1", "{v}");
    assert_eq!(v["nodes"][0]["hosts"].as_array().unwrap().len(), 2, "{v}");

    // Removing it revokes it at once: its stream ends, the server refuses it.
    let (status, v) = admin(&s, "DELETE", "/v1/standby/exit2", None).await;
    assert_eq!(status, 200, "{v}");
    let took = wait_end(&mut b_stream, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(2));
    let refused = b.client.map(&b.report(true, None)).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("403")),
        "a removed host may not act for the node"
    );
    let (_, v) = admin(&s, "GET", "/v1/standby", None).await;
    assert!(v["nodes"].as_array().unwrap().is_empty(), "{v}");
    let row = s.state.store.get_node(id).await.unwrap();
    assert_eq!(
        row.node_key,
        a_key.public().tailscale(),
        "the node itself is untouched"
    );
}

async fn node_id(s: &TestServer, m: &Machine) -> i64 {
    s.state
        .store
        .get_node_by_node_key(&m.key.public().tailscale())
        .await
        .unwrap()
        .id
}

/// The exit node with its own host (a) active and a standby host (b), both running as
/// tsunagud would, and a member following its map.
struct Group {
    s: TestServer,
    id: i64,
    a_roles: Roles,
    b_roles: Roles,
    a_task: tokio::task::JoinHandle<()>,
    member: MapStream,
    a_disco: DiscoPublic,
    b_disco: DiscoPublic,
    /// A second connection of the exit node's own host, to report as it would.
    a_ctl: Machine,
}

async fn group(ack_delay: Duration) -> Group {
    let s = server().await;
    let (a, a_stream, id) = exit_node(&s).await;
    let a_key = a.key.clone();
    let a_disco = a.disco;
    let a_machine = a.machine.clone();
    let (a_task, mut a_roles) = run_host(a, a_stream, ack_delay);
    let (_, v) = standby_key(&s, "dev-m1sk9-s1", "1h").await;
    let (mut b, r) = enrol(
        &s,
        "exit2",
        "198.51.100.6:41641",
        v["key"].as_str().unwrap(),
    )
    .await;
    b.key = r.tsunagu_standby.unwrap().node_key.0;
    assert_eq!(b.key, a_key);
    assert!(b.register("", true).await.machine_authorized);
    b.send_report(true, None).await;
    let b_stream = b.stream().await;
    let b_disco = b.disco;
    let (_b_task, mut b_roles) = run_host(b, b_stream, ack_delay);
    next_role(&mut a_roles, HostRole::Active).await;
    next_role(&mut b_roles, HostRole::Standby).await;
    // A second control connection with the same machine key (as a daemon reconnecting
    // would have), to send reports from the test.
    let a_ctl = Machine {
        client: ControlClient::connect(&s.url, &s.key, &a_machine)
            .await
            .unwrap(),
        machine: a_machine,
        key: a_key.clone(),
        name: "dev-m1sk9-s1".into(),
        disco: a_disco,
        endpoint: "198.51.100.2:41641".into(),
        prefer: false,
    };
    let member_key = user_key(&s, "alice", &[]).await;
    let mut m = Machine::new(&s, "laptop", "198.18.1.10:41641").await;
    assert!(m.register(&member_key, false).await.machine_authorized);
    let mut member = m.stream().await;
    let (first, _) = wait_for(
        &mut member,
        Duration::from_secs(5),
        "the member's map",
        |r| r.peers.is_some(),
    )
    .await;
    let exit = first
        .peers
        .unwrap()
        .into_iter()
        .find(|p| p.id == NodeID(id))
        .expect("the exit node in the member's map");
    assert_eq!(exit.disco_key, a_disco);
    assert_eq!(exit.endpoints, vec!["198.51.100.2:41641".parse().unwrap()]);
    assert!(
        first.tsunagu_standby.is_none(),
        "members never hear about hosts"
    );
    Group {
        s,
        id,
        a_roles,
        b_roles,
        a_task,
        member,
        a_disco,
        b_disco,
        a_ctl,
    }
}

/// Waits for the member to see the exit node with `disco`; returns that message.
async fn member_sees(
    g: &mut Group,
    disco: DiscoPublic,
    within: Duration,
) -> (MapResponse, Duration) {
    let id = g.id;
    wait_for(&mut g.member, within, "the exit node moved", move |m| {
        m.peers_changed
            .iter()
            .any(|p| p.id == NodeID(id) && p.disco_key == disco)
    })
    .await
}

#[tokio::test]
async fn an_admin_failover_moves_members_only_after_the_new_host_confirmed() {
    // Hosts confirm their role 300 ms after hearing it.
    let mut g = group(Duration::from_millis(300)).await;
    let key_before = g.s.state.store.get_node(g.id).await.unwrap().node_key;
    let t = tokio::time::Instant::now();
    let (status, v) = admin(
        &g.s,
        "POST",
        "/v1/nodes/dev-m1sk9-s1/failover",
        Some(serde_json::json!({ "to": "exit2" })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "waited for the confirmation"
    );
    assert_eq!(v["switch"]["Reason"], "admin failover", "{v}");
    assert_eq!(v["node"]["active"], "exit2", "{v}");
    // The old host heard first that it stands by, with a wind-down (a planned switch);
    // the new one that it is active only once the old one had confirmed (300 ms later):
    // never two at once.
    let (old_told, old_info) = next_role_at(&mut g.a_roles, HostRole::Standby).await;
    assert_eq!(
        Duration::from_millis(old_info.wind_down_ms.into()),
        tsunagu_control::standby::WIND_DOWN
    );
    let (new_told, info) = next_role_at(&mut g.b_roles, HostRole::Active).await;
    assert_eq!(info.wind_down_ms, 0);
    assert!(
        new_told >= old_told + Duration::from_millis(300),
        "the new host was told {:?} after the old one",
        new_told.duration_since(old_told)
    );
    assert!(info.hosts.iter().any(|h| h.name == "exit2" && h.active));
    let b_disco = g.b_disco;
    let (m, _) = member_sees(&mut g, b_disco, Duration::from_secs(5)).await;
    let p = m
        .peers_changed
        .iter()
        .find(|p| p.id == NodeID(g.id))
        .unwrap();
    assert_eq!(p.endpoints, vec!["198.51.100.6:41641".parse().unwrap()]);
    assert_eq!(p.key.tailscale(), key_before, "the same node key");
    assert_eq!(p.name, "dev-m1sk9-s1.tailnet.internal.", "the same name");
    assert_eq!(p.hostinfo.hostname, "dev-m1sk9-s1", "the same hostname");
    // A report of the host that stands by changes nothing members see.
    g.a_ctl.endpoint = "198.51.100.2:5555".into();
    g.a_ctl.send_report(true, Some(HostRole::Standby)).await;
    let row = g.s.state.store.get_node(g.id).await.unwrap();
    assert_eq!(row.endpoints, vec!["198.51.100.6:41641".to_string()]);
    assert_eq!(row.disco_key, b_disco.to_string());
    // nodes list shows who serves, and why.
    let (_, nodes) = admin(&g.s, "GET", "/v1/nodes", None).await;
    let exit = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == g.id)
        .unwrap();
    assert_eq!(exit["standby"]["active"], "exit2", "{exit}");
    assert_eq!(
        exit["standby"]["last_switch"]["From"], "dev-m1sk9-s1",
        "{exit}"
    );
    // Failover back; a refusal says why.
    let (status, v) = admin(
        &g.s,
        "POST",
        "/v1/nodes/dev-m1sk9-s1/failover",
        Some(serde_json::json!({ "to": "exit2" })),
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("active one already"),
        "{v}"
    );
    let (status, _) = admin(
        &g.s,
        "POST",
        "/v1/nodes/dev-m1sk9-s1/failover",
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 200, "{:?}", g.s.state.standby.view(g.id));
    let a_disco = g.a_disco;
    member_sees(&mut g, a_disco, Duration::from_secs(5)).await;
    let active = g.s.state.store.list_standby_active().await.unwrap();
    assert_eq!(active[0].machine_key, g.a_ctl.machine.public().to_string());
}

#[tokio::test]
async fn a_drain_on_the_active_host_moves_members_to_the_standby_instead_of_away() {
    let mut g = group(Duration::ZERO).await;
    // The active host withdraws its exit-node offer (tsunagu set --advertise-exit-node=false).
    g.a_ctl.send_report(false, Some(HostRole::Active)).await;
    let b_disco = g.b_disco;
    let (m, took) = member_sees(&mut g, b_disco, Duration::from_secs(5)).await;
    eprintln!("drain: members moved after {took:?}");
    // Planned: the draining host may wind down first.
    let info = next_role(&mut g.a_roles, HostRole::Standby).await;
    assert!(info.wind_down_ms > 0, "{info:?}");
    let p = m
        .peers_changed
        .iter()
        .find(|p| p.id == NodeID(g.id))
        .unwrap();
    assert_eq!(
        p.allowed_ips
            .as_ref()
            .unwrap()
            .iter()
            .filter(|r| r.prefix_len() == 0)
            .count(),
        2,
        "still an exit node: the withdrawal was not published"
    );
    let view = g.s.state.standby.view(g.id).unwrap();
    assert!(
        view.last_switch
            .as_ref()
            .unwrap()
            .reason
            .starts_with("drain"),
        "{view:?}"
    );
}

#[tokio::test]
async fn the_active_host_gone_for_three_seconds_hands_over_to_the_standby() {
    let mut g = group(Duration::ZERO).await;
    // The active host dies: its stream and connections end (no relay in this server).
    g.a_task.abort();
    drop(g.a_ctl.client);
    g.a_ctl.client = ControlClient::connect(&g.s.url, &g.s.key, &MachinePrivate::generate())
        .await
        .unwrap();
    let b_disco = g.b_disco;
    let (_, took) = member_sees(&mut g, b_disco, Duration::from_secs(8)).await;
    eprintln!("crash: members moved after {took:?}");
    // Unplanned: nothing to wait for, the new host is told at once.
    let info = next_role(&mut g.b_roles, HostRole::Active).await;
    assert_eq!(info.wind_down_ms, 0);
    assert!(
        took >= Duration::from_millis(2900),
        "not before 3 s ({took:?})"
    );
    assert!(took < Duration::from_secs(5), "within 5 s ({took:?})");
    let view = g.s.state.standby.view(g.id).unwrap();
    assert_eq!(view.active, "exit2");
    assert!(
        view.last_switch
            .as_ref()
            .unwrap()
            .reason
            .contains("unreachable"),
        "{view:?}"
    );
    // b keeps serving; a switch back needs a ready host.
    let (status, v) = admin(
        &g.s,
        "POST",
        "/v1/nodes/dev-m1sk9-s1/failover",
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no standby host is ready"),
        "{v}"
    );
}

#[tokio::test]
async fn a_preferring_host_that_returns_takes_the_role_back_once_it_has_settled() {
    let mut g = group(Duration::ZERO).await;
    // The active host dies: the standby takes over after 3 s.
    g.a_task.abort();
    g.a_ctl.client = ControlClient::connect(&g.s.url, &g.s.key, &MachinePrivate::generate())
        .await
        .unwrap();
    let b_disco = g.b_disco;
    member_sees(&mut g, b_disco, Duration::from_secs(8)).await;
    // It comes back preferring the role (`tsunagud --prefer`), with a new disco key.
    let machine = g.a_ctl.machine.clone();
    let mut a = Machine {
        client: ControlClient::connect(&g.s.url, &g.s.key, &machine)
            .await
            .unwrap(),
        machine,
        key: g.a_ctl.key.clone(),
        name: "dev-m1sk9-s1".into(),
        disco: DiscoPublic(NodePrivate::generate().public().0),
        endpoint: "198.51.100.2:41641".into(),
        prefer: true,
    };
    let new_disco = a.disco;
    a.send_report(true, None).await;
    let stream = a.stream().await;
    let back = tokio::time::Instant::now();
    let (_task, mut roles) = run_host(a, stream, Duration::ZERO);
    next_role(&mut roles, HostRole::Standby).await;
    // Ready and preferring: after 3 s settled, the role comes back, members follow.
    let (_, took) = member_sees(&mut g, new_disco, Duration::from_secs(8)).await;
    let took = took.max(back.elapsed());
    assert!(
        took >= Duration::from_millis(2900),
        "settled first ({took:?})"
    );
    let view = g.s.state.standby.view(g.id).unwrap();
    assert_eq!(view.active, "dev-m1sk9-s1");
    assert_eq!(
        view.last_switch.as_ref().unwrap().reason,
        "a preferred host is ready again"
    );
    assert!(
        view.hosts
            .iter()
            .any(|h| h.name == "dev-m1sk9-s1" && h.prefer)
    );
}
