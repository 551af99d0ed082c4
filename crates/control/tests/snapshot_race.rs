//! Snapshots are published in order, and a `rebuild()` returns only once a snapshot with
//! every change made before the call is published (a map session relies on this to find
//! its own node in the snapshot it starts from).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tsunagu_control::state::State;
use tsunagu_proto::tailcfg::DERPMap;
use tsunagu_store::{Node, Store};

fn node(id: i64) -> Node {
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
        advertised_routes: Vec::new(),
        approved_routes: Vec::new(),
        ephemeral: false,
        auth_key_id: None,
        expiry: None,
        created_at: chrono::Utc::now(),
        last_seen: None,
        authorized: true,
        version: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rebuilds_publish_in_order_and_include_prior_changes() {
    let store = Store::open_memory().await.unwrap();
    let state = State::load(store, DERPMap::default(), "tailnet.internal".into())
        .await
        .unwrap();
    // Enough nodes that a rebuild takes a while, so that rebuilds overlap.
    for id in 1..=3000 {
        state.upsert_node(node(id));
    }
    state.rebuild();

    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let mut rx = state.subscribe();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut last = rx.borrow_and_update().version;
            while !done.load(Ordering::Relaxed) {
                let v = rx.borrow_and_update().version;
                assert!(
                    v >= last,
                    "the published snapshot went back from {last} to {v}"
                );
                last = v;
                std::thread::yield_now();
            }
        })
    };
    let workers: Vec<_> = (0..4i64)
        .map(|t| {
            let s = state.clone();
            std::thread::spawn(move || {
                for k in 0..40 {
                    let id = 10_000 + t * 1000 + k;
                    s.upsert_node(node(id));
                    s.rebuild();
                    let snap = s.current();
                    assert!(
                        snap.nodes.contains_key(&id),
                        "node {id} changed before rebuild() is missing from snapshot {}",
                        snap.version
                    );
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for w in workers {
        if let Err(e) = w.join() {
            failures.push(e);
        }
    }
    done.store(true, Ordering::Relaxed);
    if let Err(e) = watcher.join() {
        failures.push(e);
    }
    if let Some(e) = failures.into_iter().next() {
        std::panic::resume_unwind(e);
    }
}
