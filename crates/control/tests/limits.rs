//! The server's resources stay bounded whatever a client sends (issue 12, items 5-7 and
//! 9): interactive registrations, the public listener, Noise sessions, map streams,
//! report sizes and key lifetimes. In-process, on loopback, with a real temporary
//! SQLite database; every wait is bounded.

mod common;

use common::{
    RawChannel, SimNode, TestServer, addr, admin, node_row, server, server_limits, user_key,
    wait_end, wait_for,
};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tsunagu_client::{ClientError, ControlClient};
use tsunagu_control::limits::Limits;
use tsunagu_proto::MachinePrivate;
use tsunagu_proto::tailcfg::{CURRENT_CAPABILITY_VERSION, Hostinfo, RegisterResponse};

const T: Duration = Duration::from_secs(10);

/// Limits for tests that send many registrations from loopback (one address).
fn many_registrations() -> Limits {
    Limits {
        registrations_per_ip: (1000.0, 1000.0),
        registrations_total: (1000.0, 1000.0),
        register_requests_per_ip: (1000.0, 1000.0),
        ..Limits::default()
    }
}

/// An interactive registration of `n` (no auth key): the answer.
async fn interactive(n: &mut SimNode) -> RegisterResponse {
    n.client.register(&n.register_request(None)).await.unwrap()
}

fn token_of(s: &TestServer, r: &RegisterResponse) -> String {
    r.auth_url
        .strip_prefix(&format!("{}/register/", s.url))
        .unwrap_or_else(|| panic!("no auth URL: {r:?}"))
        .to_string()
}

async fn rows(s: &TestServer) -> u64 {
    s.state.store.pending_registration_count().await.unwrap()
}

/// `n` machines start interactive registrations and one more tries: that machine, and
/// the status and body of the refusal it must get.
async fn n_waiting_then_one_more(s: &TestServer, n: usize) -> (SimNode, u16, String) {
    for i in 0..n {
        let mut m = SimNode::connect(s, &format!("m{i}")).await;
        interactive(&mut m).await;
    }
    let mut extra = SimNode::connect(s, "extra").await;
    let (status, body) = status_of(
        extra
            .client
            .register(&extra.register_request(None))
            .await
            .unwrap_err(),
    );
    (extra, status, body)
}

fn status_of(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Status { status, body } => (status, body),
        e => panic!("expected an HTTP status, got {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Item 5: pending registrations

/// A machine that registers interactively again and again holds one row; one with a new
/// node key each time too. Before, every request added a row (with up to 1 MiB of
/// Hostinfo each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_registrations_are_one_row_per_machine_key() {
    let s = server_limits(many_registrations()).await;
    let mut n = SimNode::connect(&s, "desk").await;
    let first = token_of(&s, &interactive(&mut n).await);
    for _ in 0..20 {
        assert_eq!(
            token_of(&s, &interactive(&mut n).await),
            first,
            "same while it waits"
        );
    }
    for _ in 0..10 {
        n.node = tsunagu_proto::NodePrivate::generate();
        interactive(&mut n).await;
    }
    assert_eq!(rows(&s).await, 1);
    // Ten more machines: ten more rows, no more.
    for i in 0..10 {
        let mut m = SimNode::connect(&s, &format!("m{i}")).await;
        interactive(&mut m).await;
        interactive(&mut m).await;
    }
    assert_eq!(rows(&s).await, 11);
}

/// A Hostinfo over 16 KiB is refused with 413 and a message saying so, in a register and
/// in a map request; a body over the endpoint's limit too (before it is buffered whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_hostinfo_is_refused_with_413() {
    let s = server_limits(many_registrations()).await;
    let mut n = SimNode::connect(&s, "desk").await;
    let mut req = n.register_request(None);
    req.hostinfo = Some(Hostinfo {
        hostname: "desk".into(),
        os_version: "x".repeat(17 * 1024),
        ..Hostinfo::default()
    });
    let (status, body) = status_of(n.client.register(&req).await.unwrap_err());
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("Hostinfo of") && body.contains("at most 16384"),
        "{body}"
    );
    assert_eq!(rows(&s).await, 0, "nothing stored");

    // Registered with a key, its map request with a big Hostinfo is refused the same way.
    let key = user_key(&s, "alice", &[]).await;
    assert!(n.register(&key).await.machine_authorized);
    let mut m = n.map_request(false);
    m.hostinfo = req.hostinfo.clone();
    let (status, body) = status_of(n.client.map(&m).await.err().unwrap());
    assert_eq!(status, 413, "{body}");
    let row = node_row(&s, &n).await;
    assert!(row.hostinfo.to_string().len() < 1024, "not stored");

    // A megabyte of body: refused by size.
    let mut raw = RawChannel::connect(&s, &MachinePrivate::generate()).await;
    let (status, body) = raw.post("/machine/register", vec![b' '; 1 << 20]).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("register request over 32768 bytes refused"),
        "{body}"
    );
    let (status, body) = raw.post("/machine/map", vec![b' '; 1 << 20]).await;
    assert_eq!(status, 413, "{body}");
}

/// Expired registrations go: at the next insert, and by the periodic task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_registrations_are_purged() {
    let s = server_limits(Limits {
        registration_ttl: Duration::from_secs(1),
        ..many_registrations()
    })
    .await;
    for i in 0..5 {
        let mut m = SimNode::connect(&s, &format!("m{i}")).await;
        interactive(&mut m).await;
    }
    assert_eq!(rows(&s).await, 5);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut late = SimNode::connect(&s, "late").await;
    interactive(&mut late).await;
    assert_eq!(rows(&s).await, 1, "purged on insert");
    let gc = tokio::spawn(tsunagu_control::server::registration_gc(
        s.state.clone(),
        Duration::from_millis(100),
    ));
    let deadline = Instant::now() + T;
    while rows(&s).await > 0 {
        assert!(Instant::now() < deadline, "the periodic purge never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gc.abort();
}

/// At most `max_pending_registrations` rows, and new interactive registrations from one
/// address are rate limited: both answer 429 with the reason, and store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_bounded_in_number_and_rate() {
    let s = server_limits(Limits {
        max_pending_registrations: 3,
        ..many_registrations()
    })
    .await;
    let (_, status, body) = n_waiting_then_one_more(&s, 3).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too many registrations waiting"), "{body}");
    assert_eq!(rows(&s).await, 3);

    let s = server_limits(Limits {
        registrations_per_ip: (0.01, 3.0),
        ..Limits::default()
    })
    .await;
    let (mut fourth, status, body) = n_waiting_then_one_more(&s, 3).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(rows(&s).await, 3);
    // A node with a pre-auth key is not held up by that.
    let key = user_key(&s, "alice", &[]).await;
    assert!(fourth.register(&key).await.machine_authorized);
}

/// A follow-up waits without reading the database: a registration deleted behind the
/// server's back goes unnoticed until something wakes the waiters (a poll every 250 ms
/// would have noticed at once); the admin's approval wakes it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followups_are_woken_by_a_notification_not_by_polling() {
    let s = server_limits(many_registrations()).await;
    let (status, _) = admin(&s, "POST", "/v1/users", Some(json!({"name": "alice"}))).await;
    assert_eq!(status, 200);

    let mut n = SimNode::connect(&s, "desk").await;
    let r = interactive(&mut n).await;
    let token = token_of(&s, &r);
    let follow = |n: &SimNode| {
        let mut f = n.register_request(None);
        f.followup = r.auth_url.clone();
        f
    };
    let mut c = ControlClient::connect(&s.url, &s.key, &n.machine)
        .await
        .unwrap();
    let req = follow(&n);
    let waiting = tokio::spawn(async move { c.register(&req).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.state.registration_waiters(), 1);
    // Delete every registration directly in the store.
    let far = chrono::Utc::now() + chrono::TimeDelta::days(1);
    assert_eq!(
        s.state
            .store
            .purge_expired_registrations(far)
            .await
            .unwrap(),
        1
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "the follow-up read the database again"
    );
    let t0 = Instant::now();
    s.state.registration_changed(&token);
    let resp = tokio::time::timeout(T, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        resp.error,
        "unknown or expired registration; run `up` again"
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(s.state.registration_waiters(), 0, "no waiter left behind");

    // The usual way: the admin approves, the follow-up answers at once.
    let r = interactive(&mut n).await;
    let mut c = ControlClient::connect(&s.url, &s.key, &n.machine)
        .await
        .unwrap();
    let mut req = n.register_request(None);
    req.followup = r.auth_url.clone();
    let waiting = tokio::spawn(async move {
        let r = c.register(&req).await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (status, info) = admin(
        &s,
        "POST",
        "/v1/register",
        Some(json!({"key": r.auth_url, "user": "alice"})),
    )
    .await;
    assert_eq!(status, 200, "{info}");
    let (resp, at) = tokio::time::timeout(T, waiting).await.unwrap().unwrap();
    assert!(resp.unwrap().machine_authorized);
    println!("follow-up answered {:?} after the approval", at - t0);
    assert!(at - t0 < Duration::from_secs(1));
}

/// A waiting follow-up wakes when its registration expires (not when the client's
/// two-minute wait ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followup_ends_when_its_registration_expires() {
    let s = server_limits(Limits {
        registration_ttl: Duration::from_secs(1),
        ..many_registrations()
    })
    .await;
    let mut n = SimNode::connect(&s, "desk").await;
    let r = interactive(&mut n).await;
    let mut req = n.register_request(None);
    req.followup = r.auth_url.clone();
    let t0 = Instant::now();
    let resp = tokio::time::timeout(T, n.client.register(&req))
        .await
        .expect("answered once expired")
        .unwrap();
    assert!(resp.error.contains("expired"), "{resp:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

/// Register requests of any kind from one address beyond its budget are answered 429
/// before they are parsed (a flood of made-up pre-auth keys, say).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_requests_from_one_address_are_rate_limited() {
    let s = server_limits(Limits {
        register_requests_per_ip: (0.01, 5.0),
        ..Limits::default()
    })
    .await;
    let key = user_key(&s, "alice", &[]).await;
    let mut n = SimNode::connect(&s, "n").await;
    let fake = format!("tskey-auth-{}-{}", "a".repeat(12), "b".repeat(32));
    for _ in 0..4 {
        let r = n.register(&fake).await;
        assert!(r.error.contains("invalid auth key"), "{r:?}");
    }
    assert!(
        n.register(&key).await.machine_authorized,
        "the fifth, within the burst"
    );
    let (status, body) = status_of(
        n.client
            .register(&n.register_request(Some(&key)))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too many register requests"), "{body}");
}

/// A node asking for full maps in a loop (new streams, or non-streaming requests that
/// want the peers) is answered 429 beyond its budget, before a map is built; endpoint
/// reports (`OmitPeers`) are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_ask_for_full_maps_in_a_loop() {
    let s = server_limits(Limits {
        full_maps_per_node: (0.01, 3.0),
        ..Limits::default()
    })
    .await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "a").await;
    assert!(a.register(&key).await.machine_authorized);
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut st = a.stream().await;
        st.next_update(T).await.unwrap().expect("a first map");
        streams.push(st);
    }
    let mut full = a.map_request(false);
    full.omit_peers = false;
    a.client
        .map(&full)
        .await
        .unwrap()
        .next_update(T)
        .await
        .unwrap();
    for _ in 0..5 {
        let mut report = a.map_request(false);
        report.omit_peers = true;
        a.client.map(&report).await.unwrap();
    }
    let (status, body) = status_of(a.client.map(&a.map_request(true)).await.err().unwrap());
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too many map requests"), "{body}");
    let (status, _) = status_of(a.client.map(&full).await.err().unwrap());
    assert_eq!(status, 429);
    // Another node is not affected.
    let mut b = SimNode::connect(&s, "b").await;
    assert!(b.register(&key).await.machine_authorized);
    b.stream()
        .await
        .next_update(T)
        .await
        .unwrap()
        .expect("b's first map");
}

// ---------------------------------------------------------------------------------------
// Item 6: the public listener and Noise sessions

/// A client that sends its header slowly (slowloris) is closed after the header-read
/// timeout, however it trickles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_is_cut_off_after_the_header_timeout() {
    let s = server_limits(Limits {
        header_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(addr(&s)).await.unwrap();
    tcp.write_all(b"GET /key HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    let closed = loop {
        if t0.elapsed() > Duration::from_secs(5) {
            break false;
        }
        if tcp.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break true;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            _ => {}
        }
    };
    assert!(closed, "still open after {:?}", t0.elapsed());
    println!("slow header closed after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(3));
    // An idle keep-alive connection (no request at all) goes the same way.
    let (_, closed) = common::raw_tcp(&s, b"", Duration::from_secs(3)).await;
    assert!(closed);
}

/// Connections per source address are capped (upgraded Noise sessions count); one over
/// the cap is closed at once, and a place comes back when a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped() {
    let s = server_limits(Limits {
        max_connections_per_ip: 3,
        ..Limits::default()
    })
    .await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "a").await;
    assert!(a.register(&key).await.machine_authorized);
    let ip = addr(&s).ip();
    let idle1 = tokio::net::TcpStream::connect(addr(&s)).await.unwrap();
    let _idle2 = tokio::net::TcpStream::connect(addr(&s)).await.unwrap();
    let deadline = Instant::now() + T;
    while s.connections.open(ip) < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Over the cap: closed without an answer.
    let (got, closed) = common::raw_tcp(
        &s,
        b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        closed && got.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        ControlClient::connect(&s.url, &s.key, &MachinePrivate::generate())
            .await
            .is_err()
    );
    assert!(
        s.connections
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    // The Noise session still works.
    assert!(a.register(&key).await.machine_authorized);
    drop(idle1);
    let deadline = Instant::now() + T;
    while s.connections.open(ip) > 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = common::raw_http(&s, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

/// A Noise session allows 16 HTTP/2 streams at once (not 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noise_session_allows_sixteen_streams() {
    let s = server().await;
    let (stream, _) = tsunagu_noise::upgrade::dial_tcp(
        addr(&s),
        "test",
        s.key.to_bytes(),
        MachinePrivate::generate().to_bytes(),
        CURRENT_CAPABILITY_VERSION.0 as u16,
    )
    .await
    .unwrap();
    let (mut h2, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get("http://test/nothing").body(()).unwrap();
    h2 = h2.ready().await.unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(T, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 501);
    assert_eq!(h2.current_max_send_streams(), 16);
}

/// A Noise session with nothing in flight is closed after the idle timeout; one holding
/// a map stream is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_noise_sessions_are_closed_and_streaming_ones_kept() {
    let s = server_limits(Limits {
        session_idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let (stream, _) = tsunagu_noise::upgrade::dial_tcp(
        addr(&s),
        "test",
        s.key.to_bytes(),
        MachinePrivate::generate().to_bytes(),
        CURRENT_CAPABILITY_VERSION.0 as u16,
    )
    .await
    .unwrap();
    let (h2, conn) = h2::client::handshake(stream).await.unwrap();
    let t0 = Instant::now();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let mut h2 = h2.ready().await.unwrap();
    let (resp, _) = h2
        .send_request(http::Request::get("http://test/x").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 501);
    let at = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the idle session was closed")
        .unwrap();
    println!("idle session closed {:?} after it opened", at - t0);
    assert!(at - t0 >= Duration::from_secs(1));

    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "a").await;
    assert!(a.register(&key).await.machine_authorized);
    let mut stream = a.stream().await;
    stream.next_update(T).await.unwrap().unwrap();
    // Three idle timeouts later the stream is still there and gets the next change.
    assert!(matches!(
        stream.next_update(Duration::from_secs(3)).await,
        Err(ClientError::Timeout(_))
    ));
    let mut b = SimNode::connect(&s, "b").await;
    assert!(b.register(&key).await.machine_authorized);
    let bk = b.node.public();
    wait_for(&mut stream, T, "a sees b", |m| {
        m.peers_changed.iter().any(|p| p.key == bk)
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Item 7: one node cannot slow everyone

/// A node holds at most four map streams: a fifth closes the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_at_most_four_map_streams() {
    let s = server().await;
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "a").await;
    assert!(a.register(&key).await.machine_authorized);
    let id = node_row(&s, &a).await.id;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut st = a.stream().await;
        st.next_update(T).await.unwrap().expect("a first map");
        streams.push(st);
    }
    assert_eq!(s.state.node_session_count(id), 4);
    wait_end(&mut streams[0], T).await;
    wait_end(&mut streams[1], T).await;
    for st in &mut streams[2..] {
        assert!(matches!(
            st.next_update(Duration::from_millis(200)).await,
            Err(ClientError::Timeout(_))
        ));
    }
    assert!(s.state.is_online(id));
}

/// Non-streaming map requests do not rebuild the snapshot themselves: twenty of them at
/// once share the rebuild task's coalesced snapshots (each one's answer still shows its
/// own change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_maps_share_the_rebuild_tasks_snapshots() {
    let s = server().await;
    let key = user_key(&s, "alice", &[]).await;
    let mut nodes = Vec::new();
    for i in 0..20 {
        let mut n = SimNode::connect(&s, &format!("n{i}")).await;
        assert!(n.register(&key).await.machine_authorized);
        nodes.push(n);
    }
    // Let registrations settle into a snapshot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = s.state.current().version;
    let mut tasks = Vec::new();
    for (i, mut n) in nodes.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut req = n.map_request(false);
            req.endpoints = vec![format!("198.51.100.{}:41641", i + 1)];
            let mut st = n.client.map(&req).await.unwrap();
            let m = st.next_update(T).await.unwrap().unwrap();
            let me = m.node.expect("self");
            let want = format!("198.51.100.{}:41641", i + 1);
            assert_eq!(
                me.endpoints
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>(),
                [want]
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = s.state.current().version;
    println!(
        "20 non-streaming map requests: {} snapshots",
        after - before
    );
    assert!(
        after - before <= 10,
        "{} snapshots for 20 requests",
        after - before
    );
}

// ---------------------------------------------------------------------------------------
// Item 9: key expiry

/// A node's key expires after the server's default unless it asks for less; what it
/// asks is clamped to the maximum; tagged nodes do not expire; an interactive approval
/// gives the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_expiry_has_a_default_and_a_maximum_and_tagged_nodes_are_exempt() {
    let s = server_limits(Limits {
        key_expiry: Some(Duration::from_secs(30 * 86_400)),
        max_key_expiry: Duration::from_secs(90 * 86_400),
        ..many_registrations()
    })
    .await;
    let days = |n: &tsunagu_store::Node| {
        (n.expiry.expect("an expiry") - chrono::Utc::now()).num_hours() as f64 / 24.0
    };
    let key = user_key(&s, "alice", &[]).await;
    let mut a = SimNode::connect(&s, "a").await;
    assert!(a.register(&key).await.machine_authorized);
    let d = days(&node_row(&s, &a).await);
    assert!((29.9..=30.0).contains(&d), "default: {d}");

    let mut b = SimNode::connect(&s, "b").await;
    let mut req = b.register_request(Some(&key));
    req.expiry = tsunagu_proto::tailcfg::Time(chrono::Utc::now() + chrono::TimeDelta::days(3650));
    assert!(b.client.register(&req).await.unwrap().machine_authorized);
    let d = days(&node_row(&s, &b).await);
    assert!((89.9..=90.0).contains(&d), "clamped: {d}");

    let mut c = SimNode::connect(&s, "c").await;
    let mut req = c.register_request(Some(&key));
    req.expiry = tsunagu_proto::tailcfg::Time(chrono::Utc::now() + chrono::TimeDelta::days(7));
    assert!(c.client.register(&req).await.unwrap().machine_authorized);
    let d = days(&node_row(&s, &c).await);
    assert!((6.9..=7.0).contains(&d), "asked: {d}");

    // Tagged: no expiry, whatever it asks.
    let (status, _) = admin(
        &s,
        "PUT",
        "/v1/policy",
        Some(json!({"policy": r#"{"tagOwners": {"tag:server": ["alice"]}, "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#})),
    )
    .await;
    assert_eq!(status, 200);
    let tagged = user_key(&s, "alice", &["tag:server"]).await;
    let mut t = SimNode::connect(&s, "t").await;
    let mut req = t.register_request(Some(&tagged));
    req.expiry = tsunagu_proto::tailcfg::Time(chrono::Utc::now() + chrono::TimeDelta::days(7));
    assert!(t.client.register(&req).await.unwrap().machine_authorized);
    assert_eq!(node_row(&s, &t).await.expiry, None);

    // Interactive approval: the default.
    let mut i = SimNode::connect(&s, "i").await;
    let r = interactive(&mut i).await;
    let (status, info) = admin(
        &s,
        "POST",
        "/v1/register",
        Some(json!({"key": r.auth_url, "user": "alice"})),
    )
    .await;
    assert_eq!(status, 200, "{info}");
    let d = days(&node_row(&s, &i).await);
    assert!((29.9..=30.0).contains(&d), "approved: {d}");
    // And `nodes expire` still expires a node at once.
    let id = node_row(&s, &a).await.id;
    let (status, info) = admin(&s, "POST", &format!("/v1/nodes/{id}/expire"), None).await;
    assert_eq!((status, &info["expired"]), (200, &json!(true)));
}
