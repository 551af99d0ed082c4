//! The server end to end over loopback: Noise, HTTP/2, registration, map streams.

mod common;

use common::{SimNode, server, user_key};
use std::time::Duration;
use tsunagu_proto::tailcfg::{MapResponse, NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION};

const T: Duration = Duration::from_secs(10);

/// What we write must parse with Tailscale's own Rust types.
fn check_with_tailscale_types(m: &MapResponse) {
    let json = serde_json::to_string(m).unwrap();
    let parsed: Result<ts_control_serde::MapResponse, _> = serde_json::from_str(&json);
    assert!(
        parsed.is_ok(),
        "ts_control_serde rejects our map response: {:?}\n{json}",
        parsed.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_stream_and_see_a_new_peer() {
    let s = server().await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "laptop").await;
    let r = a.register(&key).await;
    assert!(r.machine_authorized, "{r:?}");
    assert!(r.error.is_empty());
    let mut stream = a.stream().await;
    let first = stream.next_update(T).await.unwrap().unwrap();
    check_with_tailscale_types(&first);
    let me = first.node.as_ref().unwrap();
    assert_eq!(me.name, "laptop.tailnet.internal.");
    assert_eq!(me.addresses[0].to_string(), "100.64.0.1/32");
    assert_eq!(first.peers.as_ref().unwrap().len(), 0);
    assert!(first.packet_filter.is_some());
    // No relay regions configured: no DERP map at all (given an empty one, Go clients
    // probe Tailscale's public relays for captive portals) and captive-portal detection
    // off for this node.
    assert!(first.derp_map.is_none(), "{:?}", first.derp_map);
    assert!(
        me.cap_map
            .contains_key(NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION),
        "{:?}",
        me.cap_map
    );

    let mut b = SimNode::connect(&s, "phone").await;
    assert!(b.register(&key).await.machine_authorized);
    let mut bstream = b.stream().await;
    let bfirst = bstream.next_update(T).await.unwrap().unwrap();
    check_with_tailscale_types(&bfirst);
    assert_eq!(bfirst.peers.as_ref().unwrap().len(), 1, "b sees a");
    assert!(
        bfirst.peers.as_ref().unwrap()[0].cap_map.is_empty(),
        "node attributes are for the node itself, not its peers"
    );

    // a's stream receives b (as an incremental PeersChanged, not a full map).
    let mut seen_b = false;
    for _ in 0..5 {
        let m = stream.next_update(T).await.unwrap().unwrap();
        check_with_tailscale_types(&m);
        assert!(m.peers.is_none(), "incremental update, not a full map");
        if m.peers_changed.iter().any(|p| p.key == b.node.public()) {
            seen_b = true;
            break;
        }
    }
    assert!(seen_b, "a's stream received b");
}
