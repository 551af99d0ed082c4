//! A node's life through the admin API, as map streams see it: interactive
//! registration, key expiry, deletion, ephemeral nodes, exit-node approval and its
//! visibility by policy, auto-approval, and policy updates (valid and refused).

mod common;

use common::{
    SimNode, TestServer, admin, assert_still_serving, node_row, raw_tcp, server, user_key,
    wait_end, wait_for,
};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tsunagu_client::{ClientError, ControlClient, MapStream};
use tsunagu_proto::NodePublic;
use tsunagu_proto::tailcfg::{Hostinfo, MapResponse, NodeID, RegisterResponse};

const T: Duration = Duration::from_secs(10);
/// How fast an admin action must reach the streams.
const PROMPT: Duration = Duration::from_secs(1);
const EXIT: [&str; 2] = ["0.0.0.0/0", "::/0"];

/// The `AllowedIPs` of peer `key` in a map message (full or delta), as strings.
fn allowed_ips(m: &MapResponse, key: NodePublic) -> Option<Vec<String>> {
    m.peers
        .iter()
        .flatten()
        .chain(&m.peers_changed)
        .find(|p| p.key == key)
        .map(|p| {
            p.allowed_ips
                .iter()
                .flatten()
                .map(ToString::to_string)
                .collect()
        })
}

/// A node's own addresses as host prefixes: its `AllowedIPs` without routes.
async fn own_ips(s: &TestServer, n: &SimNode) -> Vec<String> {
    let row = node_row(s, n).await;
    assert_eq!(row.ipv4.to_string(), "100.64.0.1", "the first node");
    vec![format!("{}/32", row.ipv4), format!("{}/128", row.ipv6)]
}

fn has_exit_routes(ips: &[String]) -> bool {
    EXIT.iter().all(|r| ips.iter().any(|i| i == r))
}

fn has_no_exit_route(ips: &[String]) -> bool {
    !ips.iter().any(|i| i.ends_with("/0"))
}

fn exit_hostinfo(n: &SimNode) -> Hostinfo {
    Hostinfo {
        routable_ips: EXIT.iter().map(|r| r.parse().unwrap()).collect(),
        ..n.hostinfo()
    }
}

/// Registers `n` advertising itself as an exit node.
async fn register_exit(n: &mut SimNode, key: &str) -> RegisterResponse {
    let mut req = n.register_request(Some(key));
    req.hostinfo = Some(exit_hostinfo(n));
    n.client.register(&req).await.unwrap()
}

async fn stream_exit(n: &mut SimNode) -> MapStream {
    let mut req = n.map_request(true);
    req.hostinfo = Some(exit_hostinfo(n));
    n.client.map(&req).await.unwrap()
}

/// Registers a plain node of `key` and opens its stream; returns it, the stream and
/// the first map.
async fn joined(s: &TestServer, host: &str, key: &str) -> (SimNode, MapStream, MapResponse) {
    let mut n = SimNode::connect(s, host).await;
    let r = n.register(key).await;
    assert!(r.machine_authorized, "{host}: {r:?}");
    let mut stream = n.stream().await;
    let first = stream.next_update(T).await.unwrap().unwrap();
    (n, stream, first)
}

async fn node_info(s: &TestServer, id: i64) -> Value {
    let (status, v) = admin(s, "GET", &format!("/v1/nodes/{id}"), None).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn create_user(s: &TestServer, name: &str) {
    let (status, v) = admin(s, "POST", "/v1/users", Some(json!({ "name": name }))).await;
    assert_eq!(status, 200, "{v}");
}

async fn set_policy(s: &TestServer, text: &str) -> (u16, Value) {
    admin(s, "PUT", "/v1/policy", Some(json!({ "policy": text }))).await
}

fn removed(m: &MapResponse, id: i64) -> bool {
    m.peers_removed.contains(&NodeID(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_registration_waits_for_the_admin() {
    let s = server().await;
    create_user(&s, "alice").await;
    let mut n = SimNode::connect(&s, "desk").await;

    // No auth key: the answer is an AuthURL to show the user.
    let r = n.client.register(&n.register_request(None)).await.unwrap();
    assert!(!r.machine_authorized && r.error.is_empty(), "{r:?}");
    let prefix = format!("{}/register/", s.url);
    let token = r
        .auth_url
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{:?}", r.auth_url))
        .to_string();
    assert_eq!(token.len(), 24);
    assert!(token.chars().all(|c| c.is_ascii_alphanumeric()), "{token}");
    assert!(s.state.store.list_nodes(None).await.unwrap().is_empty());
    // The URL's page tells what to run.
    let (page, _) = raw_tcp(
        &s,
        format!("GET /register/{token} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        T,
    )
    .await;
    let page = String::from_utf8_lossy(&page);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains(&format!("nodes register --key {token} --user")),
        "{page}"
    );

    // A map request before approval is refused: the node does not exist.
    let e = n.client.map(&n.map_request(false)).await.err().unwrap();
    assert!(matches!(e, ClientError::Status { status: 401, .. }), "{e}");

    // Another machine cannot wait on (or steal) this registration.
    let mut other = SimNode::connect(&s, "other").await;
    let mut steal = other.register_request(None);
    steal.followup = r.auth_url.clone();
    let got = other.client.register(&steal).await.unwrap();
    assert_eq!(got.error, "this registration belongs to another machine");

    // The follow-up blocks until an admin approves.
    let mut follow = n.register_request(None);
    follow.followup = r.auth_url.clone();
    let mut c2 = ControlClient::connect(&s.url, &s.key, &n.machine)
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        let r = c2.register(&follow).await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "the follow-up waits for the admin");

    // Approving for an unknown user or an unknown token fails and changes nothing.
    let (status, v) = admin(
        &s,
        "POST",
        "/v1/register",
        Some(json!({"key": token, "user": "mallory"})),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = admin(
        &s,
        "POST",
        "/v1/register",
        Some(json!({"key": "nope", "user": "alice"})),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert!(!waiting.is_finished());

    let t0 = Instant::now();
    let (status, info) = admin(
        &s,
        "POST",
        "/v1/register",
        Some(json!({ "key": r.auth_url, "user": "alice" })),
    )
    .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["user"], "alice");
    assert_eq!(info["hostname"], "desk");
    assert_eq!(info["addresses"][0], "100.64.0.1");
    let (resp, at) = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("the follow-up answers once approved")
        .unwrap();
    let resp = resp.unwrap();
    println!("follow-up answered {:?} after the approval", at - t0);
    assert!(resp.machine_authorized && resp.error.is_empty(), "{resp:?}");
    assert_eq!(resp.login.login_name, "alice");
    assert_eq!(s.state.store.list_nodes(None).await.unwrap().len(), 1);

    // And the node is on the tailnet.
    let mut stream = n.stream().await;
    let first = stream.next_update(T).await.unwrap().unwrap();
    let me = first.node.unwrap();
    assert_eq!(me.name, "desk.tailnet.internal.");
    assert_eq!(me.addresses[0].to_string(), "100.64.0.1/32");
    // Approving again is harmless: same node.
    let (status, again) = admin(
        &s,
        "POST",
        "/v1/register",
        Some(json!({"key": token, "user": "alice"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], info["id"]);
    assert_eq!(s.state.store.list_nodes(None).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_a_key_ends_its_stream_and_removes_it_from_peers() {
    let s = server().await;
    let key = user_key(&s, "alice", &[]).await;
    let (mut a, mut astream, _) = joined(&s, "a", &key).await;
    let (_b, mut bstream, bfirst) = joined(&s, "b", &key).await;
    let a_id = node_row(&s, &a).await.id;
    assert!(allowed_ips(&bfirst, a.node.public()).is_some(), "b sees a");

    let t0 = Instant::now();
    let (status, info) = admin(&s, "POST", &format!("/v1/nodes/{a_id}/expire"), None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["expired"], true);
    let call = t0.elapsed();
    let (m, d) = wait_for(&mut bstream, 2 * PROMPT, "b: a removed", |m| {
        removed(m, a_id)
    })
    .await;
    assert!(allowed_ips(&m, a.node.public()).is_none());
    let ended = wait_end(&mut astream, 2 * PROMPT).await;
    println!(
        "expire: admin call {call:?}, b's PeersRemoved after {d:?}, a's stream ended {ended:?} later"
    );
    assert!(t0.elapsed() < 2 * PROMPT + Duration::from_millis(100));

    // Its next map request is refused as expired.
    for stream in [false, true] {
        match a.client.map(&a.map_request(stream)).await.err().unwrap() {
            ClientError::Status { status, body } => {
                assert_eq!(status, 401);
                assert!(body.contains("expired"), "{body}");
            }
            e => panic!("{e}"),
        }
    }
    // Re-authenticating with a key brings it back, same node and address.
    let before = node_row(&s, &a).await;
    assert!(a.register(&key).await.machine_authorized);
    let after = node_row(&s, &a).await;
    assert_eq!((after.id, after.ipv4), (before.id, before.ipv4));
    // A fresh key lifetime: the server's default (180 days).
    let left = after.expiry.expect("an expiry") - chrono::Utc::now();
    assert!(left > chrono::TimeDelta::days(179), "{left}");
    let mut astream = a.stream().await;
    assert!(astream.next_update(T).await.unwrap().is_some());
    wait_for(&mut bstream, 2 * PROMPT, "b: a back", |m| {
        allowed_ips(m, a.node.public()).is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_node_removes_it_from_peers() {
    let s = server().await;
    let key = user_key(&s, "alice", &[]).await;
    let (mut c, mut cstream, _) = joined(&s, "c", &key).await;
    let (_d, mut dstream, _) = joined(&s, "d", &key).await;
    let (_e, mut estream, _) = joined(&s, "e", &key).await;
    let c_id = node_row(&s, &c).await.id;

    let t0 = Instant::now();
    let (status, info) = admin(&s, "DELETE", &format!("/v1/nodes/{c_id}"), None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["name"], "c");
    let (rd, re) = tokio::join!(
        wait_for(&mut dstream, 2 * PROMPT, "d: c removed", |m| removed(
            m, c_id
        )),
        wait_for(&mut estream, 2 * PROMPT, "e: c removed", |m| removed(
            m, c_id
        )),
    );
    println!(
        "delete: PeersRemoved after {:?} / {:?} (all within {:?} of the admin call)",
        rd.1,
        re.1,
        t0.elapsed()
    );
    assert!(t0.elapsed() < 2 * PROMPT);
    wait_end(&mut cstream, 2 * PROMPT).await;
    let e = s.state.store.get_node(c_id).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    match c.client.map(&c.map_request(false)).await.err().unwrap() {
        ClientError::Status { status, body } => {
            assert_eq!(status, 401);
            assert_eq!(body, "unknown node key; register first");
        }
        e => panic!("{e}"),
    }
    let (status, _) = admin(&s, "GET", &format!("/v1/nodes/{c_id}"), None).await;
    assert_eq!(status, 404);
    assert_eq!(s.state.store.list_nodes(None).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_nodes_are_removed_after_going_away() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let s = server().await;
    // `serve` runs this with ServerConfig::ephemeral_timeout; here with a short one.
    tokio::spawn(tsunagu_control::server::ephemeral_gc(
        s.state.clone(),
        TIMEOUT,
    ));
    create_user(&s, "alice").await;
    let (status, k) = admin(
        &s,
        "POST",
        "/v1/preauthkeys",
        Some(json!({"user": "alice", "reusable": true, "ephemeral": true})),
    )
    .await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["ephemeral"], true);
    let eph_key = k["key"].as_str().unwrap().to_string();
    let key = user_key(&s, "alice", &[]).await;

    let (_w, mut wstream, _) = joined(&s, "watcher", &key).await;
    // A normal node that goes offline stays.
    let (normal, nstream, _) = joined(&s, "normal", &key).await;
    drop(nstream);
    let (eph, estream, _) = joined(&s, "eph", &eph_key).await;
    let eph_id = node_row(&s, &eph).await.id;
    let normal_id = node_row(&s, &normal).await.id;
    assert!(node_row(&s, &eph).await.ephemeral);
    assert_eq!(node_info(&s, eph_id).await["ephemeral"], true);

    // Online for longer than the timeout: kept.
    tokio::time::sleep(TIMEOUT * 2).await;
    assert!(
        s.state.store.get_node(eph_id).await.is_ok(),
        "online ephemeral node kept"
    );
    assert!(s.state.is_online(eph_id));

    // Its stream ends: removed once the timeout has passed, and peers are told.
    let t0 = Instant::now();
    drop(estream);
    let (_, d) = wait_for(&mut wstream, TIMEOUT * 4, "watcher: eph removed", |m| {
        removed(m, eph_id)
    })
    .await;
    println!("ephemeral node removed {d:?} after its stream ended (timeout {TIMEOUT:?})");
    assert!(
        t0.elapsed() >= TIMEOUT - Duration::from_millis(50),
        "not before the timeout: {:?}",
        t0.elapsed()
    );
    assert!(
        s.state
            .store
            .get_node(eph_id)
            .await
            .unwrap_err()
            .is_not_found()
    );
    let (status, _) = admin(&s, "GET", &format!("/v1/nodes/{eph_id}"), None).await;
    assert_eq!(status, 404);
    // The normal node, offline for as long, is still there.
    assert!(s.state.store.get_node(normal_id).await.is_ok());
    assert!(!s.state.is_online(normal_id));
    assert_eq!(s.state.store.list_nodes(None).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_node_approval_and_revocation_reach_every_stream_within_a_second() {
    let s = server().await;
    let key = user_key(&s, "alice", &[]).await;
    let mut x = SimNode::connect(&s, "exit").await;
    assert!(register_exit(&mut x, &key).await.machine_authorized);
    let mut xstream = stream_exit(&mut x).await;
    xstream.next_update(T).await.unwrap().unwrap();
    let x_id = node_row(&s, &x).await.id;
    let xk = x.node.public();

    let (_p1, mut s1, f1) = joined(&s, "p1", &key).await;
    let (_p2, mut s2, f2) = joined(&s, "p2", &key).await;
    let (_p3, mut s3, f3) = joined(&s, "p3", &key).await;

    // Awaiting approval: the admin sees it, peers get only x's own addresses.
    let info = node_info(&s, x_id).await;
    assert_eq!(info["exit_node"], "awaiting approval");
    assert_eq!(info["advertised_routes"], json!(EXIT));
    assert_eq!(info["approved_routes"], json!([]));
    let own = own_ips(&s, &x).await;
    for f in [&f1, &f2, &f3] {
        assert_eq!(allowed_ips(f, xk).as_ref(), Some(&own));
    }

    let t0 = Instant::now();
    let (status, info) = admin(&s, "POST", &format!("/v1/nodes/{x_id}/approve-exit"), None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["exit_node"], "approved");
    let call = t0.elapsed();
    let pred = |m: &MapResponse| allowed_ips(m, xk).is_some_and(|ips| has_exit_routes(&ips));
    let (r1, r2, r3) = tokio::join!(
        wait_for(&mut s1, PROMPT, "p1: exit routes", pred),
        wait_for(&mut s2, PROMPT, "p2: exit routes", pred),
        wait_for(&mut s3, PROMPT, "p3: exit routes", pred),
    );
    println!(
        "approve-exit: admin call {call:?}, then PeersChanged after {:?} / {:?} / {:?}",
        r1.1, r2.1, r3.1
    );
    for (m, _) in [&r1, &r2, &r3] {
        assert!(
            m.peers.is_none(),
            "an incremental PeersChanged, not a full map"
        );
        let ips = allowed_ips(m, xk).unwrap();
        assert_eq!(ips.len(), 4, "{ips:?}");
    }
    assert!(t0.elapsed() < PROMPT, "{:?}", t0.elapsed());

    let t0 = Instant::now();
    let (status, info) = admin(&s, "POST", &format!("/v1/nodes/{x_id}/revoke-exit"), None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["exit_node"], "awaiting approval");
    let call = t0.elapsed();
    let pred = |m: &MapResponse| allowed_ips(m, xk).is_some_and(|ips| has_no_exit_route(&ips));
    let (r1, r2, r3) = tokio::join!(
        wait_for(&mut s1, PROMPT, "p1: no exit routes", pred),
        wait_for(&mut s2, PROMPT, "p2: no exit routes", pred),
        wait_for(&mut s3, PROMPT, "p3: no exit routes", pred),
    );
    println!(
        "revoke-exit: admin call {call:?}, then PeersChanged after {:?} / {:?} / {:?}",
        r1.1, r2.1, r3.1
    );
    for (m, _) in [&r1, &r2, &r3] {
        assert_eq!(allowed_ips(m, xk).as_ref(), Some(&own));
    }
    assert!(t0.elapsed() < PROMPT, "{:?}", t0.elapsed());

    // A node that does not advertise the routes cannot be approved.
    let p1_id = node_row(&s, &_p1).await.id;
    let (status, v) = admin(&s, "POST", &format!("/v1/nodes/{p1_id}/approve-exit"), None).await;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("does not advertise an exit node"),
        "{v}"
    );
}

const FAMILY_GUESTS: &str = r#"{
  "groups": {
    "group:family": ["alice"],
    "group:guests": ["guest"],
  },
  "acls": [
    // family: everything, the internet through exit nodes included
    {"action": "accept", "src": ["group:family"], "dst": ["*:*"]},
    // guests: alice's devices only, no internet
    {"action": "accept", "src": ["group:guests"], "dst": ["alice:*"]},
  ],
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_routes_are_shown_only_to_nodes_the_policy_lets_use_them() {
    let s = server().await;
    let (status, v) = set_policy(&s, FAMILY_GUESTS).await;
    assert_eq!(status, 200, "{v}");
    let alice = user_key(&s, "alice", &[]).await;
    let guest = user_key(&s, "guest", &[]).await;

    let mut x = SimNode::connect(&s, "exit").await;
    assert!(register_exit(&mut x, &alice).await.machine_authorized);
    let x_id = node_row(&s, &x).await.id;
    let (status, _) = admin(&s, "POST", &format!("/v1/nodes/{x_id}/approve-exit"), None).await;
    assert_eq!(status, 200);
    let xk = x.node.public();

    let (_f, mut fstream, ffirst) = joined(&s, "family", &alice).await;
    let (_g, mut gstream, gfirst) = joined(&s, "guest", &guest).await;
    let fx = allowed_ips(&ffirst, xk).expect("family sees the exit node");
    assert!(has_exit_routes(&fx), "{fx:?}");
    let gx = allowed_ips(&gfirst, xk).expect("guest sees the exit node (alice:*)");
    assert_eq!(gx, own_ips(&s, &x).await, "no 0/0 for guests");

    // Let guests use exit nodes: the guest's stream gets the routes, family's is unchanged.
    let open = FAMILY_GUESTS.replace(r#"["alice:*"]"#, r#"["alice:*", "autogroup:internet:*"]"#);
    let t0 = Instant::now();
    let (status, v) = set_policy(&s, &open).await;
    assert_eq!(status, 200, "{v}");
    let (m, d) = wait_for(&mut gstream, PROMPT, "guest: exit routes", |m| {
        allowed_ips(m, xk).is_some_and(|ips| has_exit_routes(&ips))
    })
    .await;
    println!(
        "policy change reached the guest in {d:?} (total {:?})",
        t0.elapsed()
    );
    assert!(m.peers.is_none());
    // And back.
    let (status, _) = set_policy(&s, FAMILY_GUESTS).await;
    assert_eq!(status, 200);
    wait_for(&mut gstream, PROMPT, "guest: exit routes gone", |m| {
        allowed_ips(m, xk).is_some_and(|ips| has_no_exit_route(&ips))
    })
    .await;
    // The family node never lost them: nothing about x in its stream since.
    if let Ok(Some(m)) = fstream.next_update(Duration::from_millis(300)).await
        && let Some(ips) = allowed_ips(&m, xk)
    {
        assert!(has_exit_routes(&ips), "{ips:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_approvers_approve_exit_nodes_of_tagged_keys() {
    let s = server().await;
    create_user(&s, "alice").await;
    create_user(&s, "bob").await;
    let policy = r#"{
      "tagOwners": {"tag:exit": ["alice"]},
      "autoApprovers": {"exitNode": ["tag:exit"]},
      "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["*:*"]}],
    }"#;
    let (status, v) = set_policy(&s, policy).await;
    assert_eq!(status, 200, "{v}");

    // bob does not own tag:exit: no tagged key for him.
    let (status, v) = admin(
        &s,
        "POST",
        "/v1/preauthkeys",
        Some(json!({"user": "bob", "tags": ["tag:exit"]})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("tagOwners"), "{v}");
    let (status, k) = admin(
        &s,
        "POST",
        "/v1/preauthkeys",
        Some(json!({"user": "alice", "tags": ["tag:exit"]})),
    )
    .await;
    assert_eq!(status, 200, "{k}");
    assert_eq!(k["tags"], json!(["tag:exit"]));
    let tagged = k["key"].as_str().unwrap().to_string();
    let plain = user_key(&s, "alice", &[]).await;

    let (_p, mut pstream, _) = joined(&s, "viewer", &plain).await;
    let mut x = SimNode::connect(&s, "tagged-exit").await;
    assert!(register_exit(&mut x, &tagged).await.machine_authorized);
    let x_id = node_row(&s, &x).await.id;
    let info = node_info(&s, x_id).await;
    assert_eq!(info["tags"], json!(["tag:exit"]));
    assert_eq!(info["user"], "tagged-devices");
    assert_eq!(info["exit_node"], "approved", "{info}");
    assert_eq!(info["approved_routes"], json!(EXIT));
    let xk = x.node.public();
    wait_for(
        &mut pstream,
        2 * PROMPT,
        "viewer: tagged exit with 0/0",
        |m| allowed_ips(m, xk).is_some_and(|ips| has_exit_routes(&ips)),
    )
    .await;

    // The same routes from an untagged node wait for an admin.
    let mut y = SimNode::connect(&s, "untagged-exit").await;
    assert!(register_exit(&mut y, &plain).await.machine_authorized);
    let y_id = node_row(&s, &y).await.id;
    assert_eq!(node_info(&s, y_id).await["exit_node"], "awaiting approval");
    let yk = y.node.public();
    let (m, _) = wait_for(&mut pstream, 2 * PROMPT, "viewer: untagged exit", |m| {
        allowed_ips(m, yk).is_some()
    })
    .await;
    assert!(has_no_exit_route(&allowed_ips(&m, yk).unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_refused_and_the_previous_one_keeps_serving() {
    let s = server().await;
    let (status, v) = admin(&s, "GET", "/v1/policy", None).await;
    assert_eq!(
        (status, &v),
        (200, &json!({ "policy": null })),
        "default policy"
    );
    let (status, v) = set_policy(&s, FAMILY_GUESTS).await;
    assert_eq!(status, 200, "{v}");

    // A semantic error: an undefined group, on line 3.
    let bad = "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:nope\"], \"dst\": [\"*:*\"]}\n  ]\n}\n";
    let (status, v) = set_policy(&s, bad).await;
    assert_eq!(status, 400, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with(
            "policy refused, the previous one keeps serving: policy error at line 3, column 34:"
        ),
        "{e}"
    );
    assert!(e.contains("group:nope"), "{e}");
    // A syntax error.
    let (status, v) = set_policy(&s, "{\n  \"acls\": [\n    {\"action\": }\n").await;
    assert_eq!(status, 400, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("policy error at line 3, column"), "{e}");
    // Not even a JSON body.
    let (status, _) = admin(&s, "PUT", "/v1/policy", Some(json!({"nope": 1}))).await;
    assert!((400..500).contains(&status), "{status}");

    let (status, v) = admin(&s, "GET", "/v1/policy", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        v["policy"], FAMILY_GUESTS,
        "the previous policy is still in force"
    );
    assert_eq!(
        s.state.store.get_policy().await.unwrap().unwrap().0,
        FAMILY_GUESTS
    );
    // And it is the one applied: a node of a user in no group may be reached by the
    // family (alice) only; under the default policy every member could reach it.
    let key = user_key(&s, "alice", &[]).await;
    let (_a, _as, _) = joined(&s, "a", &key).await;
    let first = assert_still_serving(&s).await;
    let srcs: Vec<&String> = first
        .packet_filter
        .iter()
        .flatten()
        .flat_map(|r| &r.src_ips)
        .collect();
    assert!(srcs.iter().any(|s| s.starts_with("100.64.0.1")), "{srcs:?}");
    assert!(
        !srcs.iter().any(|s| s.starts_with("100.64.0.2")),
        "{srcs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_node_cannot_replay_its_single_use_key() {
    let s = server().await;
    let u = s.state.store.create_user("alice").await.unwrap();
    s.state.upsert_user(u.clone());
    let (_, once) = s
        .state
        .store
        .create_preauth_key(u.id, false, false, None, &[])
        .await
        .unwrap();
    let mut a = SimNode::connect(&s, "a").await;
    assert!(a.register(&once).await.machine_authorized);
    // A lost answer may be retried with the same key while the node is live ...
    assert!(
        a.register(&once).await.machine_authorized,
        "retry of a live node"
    );
    let id = s.state.store.list_nodes(None).await.unwrap()[0].id;
    let (status, _) = admin(&s, "POST", &format!("/v1/nodes/{id}/expire"), None).await;
    assert_eq!(status, 200);
    // ... but once the admin expired it, the spent key does not bring it back.
    let r = a.register(&once).await;
    assert!(!r.machine_authorized, "{r:?}");
    assert!(r.error.contains("used"), "{r:?}");
    let (_, fresh) = s
        .state
        .store
        .create_preauth_key(u.id, false, false, None, &[])
        .await
        .unwrap();
    assert!(
        a.register(&fresh).await.machine_authorized,
        "a fresh key re-authenticates it"
    );
    assert_eq!(
        s.state.store.list_nodes(None).await.unwrap().len(),
        1,
        "the same node"
    );
}
