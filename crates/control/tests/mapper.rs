//! The mapper against a real (in-memory) store and state: full maps and deltas as the
//! wire sees them, shared peer views and shared deltas.

use tsunagu_control::mapper::SessionView;
use tsunagu_control::state::State;
use tsunagu_proto::tailcfg::{DERPMap, MapResponse};
use tsunagu_store::{Node, Store};

fn node(id: i64, user: i64) -> Node {
    Node {
        id,
        machine_key: format!("mkey:{id:064x}"),
        node_key: format!("nodekey:{id:064x}"),
        disco_key: String::new(),
        user_id: Some(user),
        tags: Vec::new(),
        hostname: format!("n{id}"),
        given_name: format!("n{id}"),
        ipv4: std::net::Ipv4Addr::from(0x6440_0000 + id as u32),
        ipv6: std::net::Ipv6Addr::from(0xfd7a_115c_a1e0_0000_0000_0000_0000_0000 + id as u128),
        hostinfo: serde_json::json!({ "Hostname": format!("n{id}"), "OS": "linux" }),
        endpoints: Vec::new(),
        advertised_routes: Vec::new(),
        approved_routes: Vec::new(),
        ephemeral: false,
        auth_key_id: None,
        expiry: None,
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        last_seen: None,
        authorized: true,
        version: 1,
    }
}

fn ids(peers: &[tsunagu_proto::tailcfg::Node]) -> Vec<i64> {
    peers.iter().map(|p| p.id.0).collect()
}

/// Every message must read back with Tailscale's own types too.
fn check(json: &[u8]) -> MapResponse {
    serde_json::from_slice::<ts_control_serde::MapResponse>(json)
        .unwrap_or_else(|e| panic!("ts_control_serde: {e}: {}", String::from_utf8_lossy(json)));
    serde_json::from_slice(json).unwrap()
}

async fn state() -> std::sync::Arc<State> {
    let store = Store::open_memory().await.unwrap();
    let alice = store.create_user("alice").await.unwrap();
    let bob = store.create_user("bob").await.unwrap();
    assert_eq!((alice.id, bob.id), (1, 2));
    State::load(store, DERPMap::default(), "tailnet.internal".into())
        .await
        .unwrap()
}

#[tokio::test]
async fn full_maps_and_deltas_as_the_wire_sees_them() {
    let state = state().await;
    for id in 1..=5 {
        state.upsert_node(node(id, 1));
    }
    state.rebuild();
    let snap = state.current();
    let mut a = SessionView::new(1);
    let mut b = SessionView::new(2);
    let full = a.full_map(&snap).unwrap();
    let m = check(&full.to_json().unwrap());
    assert_eq!(ids(m.peers.as_ref().unwrap()), vec![2, 3, 4, 5]);
    assert_eq!(m.node.as_ref().unwrap().id.0, 1);
    assert!(m.packet_filter.is_some());
    assert_eq!(m.user_profiles.len(), 1);
    assert_eq!(
        full.to_response().unwrap().peers.unwrap().len(),
        4,
        "to_response agrees"
    );
    b.full_map(&snap).unwrap();

    // Nothing changed: nothing to send.
    assert!(a.delta(&snap, Some(&Default::default())).is_none());

    // A new node of another user: both sessions send the same message, with the new
    // peer, the new user's profile and the new filter (it lists the new address).
    state.upsert_node(node(6, 2));
    state.rebuild();
    let snap = state.current();
    let changes = snap.changes_since(a.version).unwrap();
    assert_eq!(changes, [6].into());
    let da = a.delta(&snap, Some(&changes)).unwrap();
    let db = b.delta(&snap, Some(&changes)).unwrap();
    assert!(da.share.is_some());
    assert_eq!(da.share, db.share, "the same delta for both");
    let m = check(&da.to_json().unwrap());
    assert_eq!(ids(&m.peers_changed), vec![6]);
    assert!(
        m.packet_filter.is_some(),
        "the new node's address joins the filter"
    );
    assert_eq!(m.user_profiles.len(), 1);
    assert!(m.node.is_none() && m.peers.is_none() && m.peers_removed.is_empty());

    // The same node stored again unchanged: the peer's view is the same, nothing to send.
    state.upsert_node(node(6, 2));
    state.rebuild();
    let snap = state.current();
    let changes = snap.changes_since(a.version).unwrap();
    assert!(a.delta(&snap, Some(&changes)).is_none());

    // A change of its view: sent again, this time without the profile or the filter.
    let mut n6 = node(6, 2);
    n6.endpoints = vec!["198.51.100.7:41641".into()];
    state.upsert_node(n6);
    state.rebuild();
    let snap = state.current();
    let changes = snap.changes_since(a.version).unwrap();
    let m = check(&a.delta(&snap, Some(&changes)).unwrap().to_json().unwrap());
    assert_eq!(ids(&m.peers_changed), vec![6]);
    assert_eq!(m.peers_changed[0].endpoints.len(), 1);
    assert!(m.user_profiles.is_empty() && m.packet_filter.is_none());

    // A session that fell behind (or a policy change) recomputes and still sends only
    // what differs from what it sent.
    let mut behind = SessionView::new(3);
    behind.full_map(&snap).unwrap();
    state.remove_node(4);
    state.upsert_node(node(7, 1));
    state.rebuild();
    let snap = state.current();
    let m = check(&behind.delta(&snap, None).unwrap().to_json().unwrap());
    assert_eq!(ids(&m.peers_changed), vec![7]);
    assert_eq!(
        m.peers_removed.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![4]
    );

    // The viewer itself changed: its self node is sent, not shared.
    state.session_started(1);
    state.rebuild();
    let snap = state.current();
    let changes = snap.changes_since(a.version).unwrap();
    let d = a.delta(&snap, Some(&changes)).unwrap();
    assert!(d.share.is_none());
    let m = check(&d.to_json().unwrap());
    assert_eq!(m.node.unwrap().online, Some(true));
    assert_eq!(ids(&m.peers_changed), vec![7]);
    assert_eq!(
        m.peers_removed.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![4]
    );
}

#[tokio::test]
async fn a_node_without_peers_gets_an_empty_list() {
    let state = state().await;
    state.upsert_node(node(1, 1));
    state.rebuild();
    let m = check(
        &SessionView::new(1)
            .full_map(&state.current())
            .unwrap()
            .to_json()
            .unwrap(),
    );
    assert_eq!(m.peers, Some(Vec::new()));
}
