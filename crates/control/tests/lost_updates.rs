//! No lost updates (issue 12, item 8): a node's report and an admin's approval or
//! revocation of its routes each read-compute-write the node in one transaction, so
//! neither undoes the other; a revocation is not undone by the node's next report; and
//! the cache never replaces a newer copy of a row with an older one.

mod common;

use common::{SimNode, admin, node_row, server, user_key};
use serde_json::{Value, json};
use std::time::Duration;
use tsunagu_proto::tailcfg::Hostinfo;

const EXIT: [&str; 2] = ["0.0.0.0/0", "::/0"];

fn hostinfo(n: &SimNode, routes: &[&str]) -> Hostinfo {
    Hostinfo {
        routable_ips: routes.iter().map(|r| r.parse().unwrap()).collect(),
        ..n.hostinfo()
    }
}

/// The node reports `routes` in a non-streaming map request (what clients send when
/// their Hostinfo changes).
async fn report(n: &mut SimNode, routes: &[&str]) {
    let mut req = n.map_request(false);
    req.omit_peers = true;
    req.hostinfo = Some(hostinfo(n, routes));
    n.client.map(&req).await.unwrap();
}

async fn approved(s: &common::TestServer, n: &SimNode) -> Vec<String> {
    node_row(s, n)
        .await
        .approved_routes
        .iter()
        .map(ToString::to_string)
        .collect()
}

async fn set_policy(s: &common::TestServer, text: &str) {
    let (status, v) = admin(s, "PUT", "/v1/policy", Some(json!({ "policy": text }))).await;
    assert_eq!(status, 200, "{v}");
}

/// An exit node approved by `autoApprovers` and then revoked by the admin stays revoked
/// while it keeps reporting the same routes; advertising them anew is what approves them
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_auto_approved_exit_node_stays_revoked() {
    let s = server().await;
    set_policy(
        &s,
        r#"{"tagOwners": {"tag:exit": ["alice"]},
            "autoApprovers": {"exitNode": ["tag:exit"]},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
    )
    .await;
    let key = user_key(&s, "alice", &["tag:exit"]).await;
    let mut x = SimNode::connect(&s, "exit").await;
    let mut req = x.register_request(Some(&key));
    req.hostinfo = Some(hostinfo(&x, &EXIT));
    assert!(x.client.register(&req).await.unwrap().machine_authorized);
    assert_eq!(approved(&s, &x).await, ["0.0.0.0/0", "::/0"]);
    let id = node_row(&s, &x).await.id;

    let (status, info) = admin(&s, "POST", &format!("/v1/nodes/{id}/revoke-exit"), None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["exit_node"], "awaiting approval");
    for _ in 0..3 {
        report(&mut x, &EXIT).await;
    }
    assert!(
        approved(&s, &x).await.is_empty(),
        "the revocation was undone"
    );
    let info: Value = admin(&s, "GET", &format!("/v1/nodes/{id}"), None).await.1;
    assert_eq!(info["exit_node"], "awaiting approval");

    // Withdrawn, then offered again: auto-approved again.
    report(&mut x, &[]).await;
    report(&mut x, &EXIT).await;
    assert_eq!(approved(&s, &x).await, ["0.0.0.0/0", "::/0"]);
}

/// The admin revokes the exit node while the node reports a new subnet route that the
/// policy approves: whatever the interleaving, the exit routes end up revoked and the
/// subnet route approved. (Before, the report wrote back the whole approved list it had
/// read before the revocation, exit routes included.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_racing_a_report_is_never_undone() {
    let s = server().await;
    set_policy(
        &s,
        r#"{"autoApprovers": {"routes": {"198.18.0.0/16": ["alice"]}},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
    )
    .await;
    let key = user_key(&s, "alice", &[]).await;
    let mut x = SimNode::connect(&s, "exit").await;
    let mut req = x.register_request(Some(&key));
    req.hostinfo = Some(hostinfo(&x, &EXIT));
    assert!(x.client.register(&req).await.unwrap().machine_authorized);
    let id = node_row(&s, &x).await.id;
    let (mut undone, mut lost) = (0, 0);
    let rounds = 100;
    for i in 0..rounds {
        let (status, v) = admin(&s, "POST", &format!("/v1/nodes/{id}/approve-exit"), None).await;
        assert_eq!(status, 200, "{v}");
        // A new subnet route each round (the previous one withdrawn).
        let subnet = format!("198.18.{}.0/24", i % 250);
        let routes = [EXIT[0], EXIT[1], subnet.as_str()];
        let revoke = async {
            // Spread the revocation over the report's lifetime across rounds.
            tokio::time::sleep(Duration::from_micros(200 * (i % 10) as u64)).await;
            let (status, v) = admin(&s, "POST", &format!("/v1/nodes/{id}/revoke-exit"), None).await;
            assert_eq!(status, 200, "{v}");
        };
        tokio::join!(report(&mut x, &routes), revoke);
        let now = approved(&s, &x).await;
        if now.iter().any(|r| r.ends_with("/0")) {
            undone += 1;
        }
        if !now.contains(&subnet) {
            lost += 1;
        }
        // Back to exit routes only, for the next round.
        report(&mut x, &EXIT).await;
    }
    assert_eq!(
        (undone, lost),
        (0, 0),
        "of {rounds} rounds, the revocation was undone in {undone} and the new route lost in {lost}"
    );
    // The cache agrees with the database.
    let cached = s.state.node(id).unwrap().node;
    assert_eq!(cached, node_row(&s, &x).await);
}

/// The cache keeps the newest copy of a node's row: an older copy read by a slower
/// request does not replace it, and a deleted node does not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_never_goes_back_to_an_older_row() {
    let s = server().await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "a").await;
    assert!(a.register(&key).await.machine_authorized);
    let id = node_row(&s, &a).await.id;
    let old = node_row(&s, &a).await;
    s.state
        .store
        .update_endpoints(id, &["198.51.100.3:41641".into()])
        .await
        .unwrap();
    let new = node_row(&s, &a).await;
    assert!(new.version > old.version);
    s.state.upsert_node(new.clone());
    s.state.upsert_node(old);
    assert_eq!(s.state.node(id).unwrap().node, new);

    let (status, _) = admin(&s, "DELETE", &format!("/v1/nodes/{id}"), None).await;
    assert_eq!(status, 200);
    s.state.upsert_node(new);
    assert!(s.state.node(id).is_none(), "a deleted node came back");
}
