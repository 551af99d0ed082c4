//! Subnet routes and endpoints as the server accepts and announces them: no route inside
//! the tailnet's ranges, one owner per prefix (the online router with the lowest ID, else
//! the lowest ID), and at most 32 endpoints per node.

mod common;

use common::{SimNode, admin, node_row, server, user_key};
use ipnet::IpNet;
use std::collections::BTreeMap;
use tsunagu_control::mapper::{MAX_ENDPOINTS, SessionView};
use tsunagu_control::state::State;
use tsunagu_proto::tailcfg::{DERPMap, Hostinfo, MapResponse, Node as WireNode};
use tsunagu_store::{Node, Store};

fn node(id: i64, routes: &[&str]) -> Node {
    let routes: Vec<IpNet> = routes.iter().map(|r| r.parse().unwrap()).collect();
    Node {
        id,
        machine_key: format!("mkey:{id:064x}"),
        node_key: format!("nodekey:{id:064x}"),
        disco_key: String::new(),
        user_id: Some(1),
        tags: Vec::new(),
        hostname: format!("n{id}"),
        given_name: format!("n{id}"),
        ipv4: std::net::Ipv4Addr::from(0x6440_0000 + id as u32),
        ipv6: std::net::Ipv6Addr::from(0xfd7a_115c_a1e0_0000_0000_0000_0000_0000 + id as u128),
        hostinfo: serde_json::json!({ "Hostname": format!("n{id}"), "OS": "linux" }),
        endpoints: Vec::new(),
        advertised_routes: routes.clone(),
        approved_routes: routes,
        ephemeral: false,
        auth_key_id: None,
        expiry: None,
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        last_seen: None,
        authorized: true,
    }
}

async fn state() -> std::sync::Arc<State> {
    let store = Store::open_memory().await.unwrap();
    store.create_user("alice").await.unwrap();
    State::load(store, DERPMap::default(), "tailnet.internal".into())
        .await
        .unwrap()
}

/// A client's picture of its peers, kept up to date message by message.
#[derive(Default)]
struct Peers(BTreeMap<i64, WireNode>);

impl Peers {
    fn apply(&mut self, m: &MapResponse) {
        if let Some(all) = &m.peers {
            self.0 = all.iter().map(|p| (p.id.0, p.clone())).collect();
        }
        for p in &m.peers_changed {
            self.0.insert(p.id.0, p.clone());
        }
        for id in &m.peers_removed {
            self.0.remove(&id.0);
        }
    }

    /// Each peer's subnet routes: its `AllowedIPs` beyond its own addresses and exit
    /// routes.
    fn routes(&self) -> BTreeMap<i64, Vec<String>> {
        self.0
            .values()
            .map(|p| {
                let routes = p
                    .allowed_ips
                    .iter()
                    .flatten()
                    .filter(|a| !p.addresses.contains(a) && a.prefix_len() > 0)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>();
                assert_eq!(
                    p.primary_routes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>(),
                    routes,
                    "PrimaryRoutes agree with AllowedIPs"
                );
                (p.id.0, routes)
            })
            .collect()
    }

    /// No prefix is announced by two peers.
    fn assert_each_prefix_once(&self) {
        let mut seen = BTreeMap::new();
        for (id, routes) in self.routes() {
            for r in routes {
                if let Some(other) = seen.insert(r.clone(), id) {
                    panic!("{r} announced by {other} and {id}");
                }
            }
        }
    }
}

/// The viewer's session after the latest rebuild: a delta (or the full map the first
/// time) applied to `peers`.
fn follow(state: &State, view: &mut SessionView, peers: &mut Peers) {
    state.rebuild();
    let snap = state.current();
    let msg = if view.version == 0 {
        view.full_map(&snap)
    } else {
        let changes = snap.changes_since(view.version);
        view.delta(&snap, changes.as_ref())
    };
    if let Some(m) = msg {
        peers.apply(&m.to_response().unwrap());
    }
    peers.assert_each_prefix_once();
}

fn owned(peers: &Peers, id: i64) -> Vec<String> {
    peers.routes().get(&id).cloned().unwrap_or_default()
}

#[tokio::test]
async fn each_prefix_has_one_owner_and_none_lies_in_the_tailnet() {
    let state = state().await;
    let shared = "198.18.7.0/24";
    state.upsert_node(node(
        1,
        &[
            shared,
            "100.64.5.0/24",
            "100.0.0.0/8",
            "fd7a:115c:a1e0:ab::/64",
            "0.0.0.0/0",
        ],
    ));
    state.upsert_node(node(2, &[shared, "198.18.8.0/24"]));
    state.upsert_node(node(3, &[shared]));
    let mut viewer = node(4, &[]);
    viewer.endpoints = (0..100).map(|i| format!("203.0.113.{i}:41641")).collect();
    state.upsert_node(viewer);
    let mut view = SessionView::new(4);
    let mut peers = Peers::default();

    // Nobody online: the oldest node (lowest ID) owns the shared prefix; routes inside
    // the tailnet's ranges are announced by no one.
    follow(&state, &mut view, &mut peers);
    assert_eq!(owned(&peers, 1), [shared]);
    assert_eq!(owned(&peers, 2), ["198.18.8.0/24"]);
    assert!(owned(&peers, 3).is_empty());

    // Node 2 comes online: it takes the prefix over, and the delta tells the viewer about
    // node 1 losing it too (node 1 itself did not change).
    state.session_started(2);
    follow(&state, &mut view, &mut peers);
    assert!(owned(&peers, 1).is_empty());
    assert_eq!(owned(&peers, 2), [shared, "198.18.8.0/24"]);
    // Node 3 online as well: the lower ID keeps it.
    state.session_started(3);
    follow(&state, &mut view, &mut peers);
    assert_eq!(owned(&peers, 2), [shared, "198.18.8.0/24"]);
    // Node 1 online: the oldest online router.
    state.session_started(1);
    follow(&state, &mut view, &mut peers);
    assert_eq!(owned(&peers, 1), [shared]);
    assert_eq!(owned(&peers, 2), ["198.18.8.0/24"]);
    // Node 1 withdraws it: the next one.
    state.upsert_node(node(1, &["100.64.5.0/24"]));
    follow(&state, &mut view, &mut peers);
    assert!(owned(&peers, 1).is_empty());
    assert_eq!(owned(&peers, 2), [shared, "198.18.8.0/24"]);
    // Node 2 deleted: node 3.
    state.remove_node(2);
    follow(&state, &mut view, &mut peers);
    assert_eq!(owned(&peers, 3), [shared]);

    // The viewer's own node lists at most 32 endpoints, as every peer sees it.
    let snap = state.current();
    let me = SessionView::new(4)
        .full_map(&snap)
        .unwrap()
        .to_response()
        .unwrap();
    assert_eq!(me.node.unwrap().endpoints.len(), MAX_ENDPOINTS);
    let other = SessionView::new(3)
        .full_map(&snap)
        .unwrap()
        .to_response()
        .unwrap();
    let seen = other.peers.unwrap();
    let four = seen.iter().find(|p| p.id.0 == 4).unwrap();
    assert_eq!(four.endpoints.len(), MAX_ENDPOINTS);
    assert_eq!(four.endpoints[0].to_string(), "203.0.113.0:41641");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_in_the_tailnet_are_not_approved_and_endpoints_are_capped() {
    let s = server().await;
    let policy = r#"{
      "tagOwners": {"tag:router": ["alice"]},
      "autoApprovers": {"routes": {
        "100.64.0.0/10": ["tag:router"],
        "198.18.0.0/15": ["tag:router"],
      }},
      "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["*:*"]}],
    }"#;
    let (status, v) = admin(
        &s,
        "PUT",
        "/v1/policy",
        Some(serde_json::json!({ "policy": policy })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let key = user_key(&s, "alice", &["tag:router"]).await;
    let mut router = SimNode::connect(&s, "router").await;
    let hostinfo = Hostinfo {
        routable_ips: ["100.64.9.0/24", "198.18.9.0/24"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect(),
        ..router.hostinfo()
    };
    let mut req = router.register_request(Some(&key));
    req.hostinfo = Some(hostinfo.clone());
    assert!(
        router
            .client
            .register(&req)
            .await
            .unwrap()
            .machine_authorized
    );
    let row = node_row(&s, &router).await;
    assert_eq!(
        row.advertised_routes.len(),
        2,
        "what it asked for is recorded"
    );
    assert_eq!(
        row.approved_routes,
        ["198.18.9.0/24".parse::<IpNet>().unwrap()],
        "the route in the tailnet's range is not approved"
    );

    // 100 endpoints (and duplicates): the first 32 distinct ones are kept.
    let mut eps: Vec<String> = (0..100).map(|i| format!("203.0.113.{i}:41641")).collect();
    eps.insert(1, eps[0].clone());
    let mut update = router.map_request(false);
    update.hostinfo = Some(hostinfo);
    update.omit_peers = true;
    update.endpoints = eps.clone();
    router.client.map(&update).await.unwrap();
    let row = node_row(&s, &router).await;
    assert_eq!(row.endpoints.len(), MAX_ENDPOINTS);
    assert_eq!(row.endpoints[..2], [eps[0].clone(), eps[2].clone()]);
}
