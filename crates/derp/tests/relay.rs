//! The relay in-process, over loopback TCP and UDP: real sockets, the HTTP upgrade, the
//! client core from this crate. Every wait is bounded by [`GUARD`], a failure guard only
//! (no assertion is about time).

use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tsunagu_derp::client::{ClientConn, ClientEvent, parse_upgrade_response, upgrade_request};
use tsunagu_derp::frame::{ClientMessage, PeerGoneReason};
use tsunagu_derp::stun;
use tsunagu_derp::{ClientInfo, Relay, RelayOptions};
use tsunagu_proto::{NodePrivate, NodePublic};

const GUARD: Duration = Duration::from_secs(30);

async fn guard<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {GUARD:?}"))
}

async fn start_relay() -> (Arc<Relay>, SocketAddr) {
    let relay = Relay::new(NodePrivate::generate(), RelayOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = relay.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (relay, addr)
}

/// A test client: a TCP stream after the upgrade, driven by [`ClientConn`].
struct Client {
    stream: TcpStream,
    conn: ClientConn,
    key: NodePublic,
    buf: Vec<u8>,
}

/// Upgrades `stream` and returns the bytes that came after the 101 answer.
async fn upgrade(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .write_all(upgrade_request("relay.test").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = guard("upgrade answer", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed during the upgrade");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = parse_upgrade_response(&got).expect("101") {
            return got.split_off(end);
        }
    }
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Self::connect_with(TcpStream::connect(addr).await.unwrap()).await
    }

    async fn connect_with(mut stream: TcpStream) -> Client {
        let rest = upgrade(&mut stream).await;
        let key = NodePrivate::generate();
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..ClientInfo::default()
        };
        let conn = ClientConn::new(key.clone(), info);
        let mut c = Client {
            stream,
            conn,
            key: key.public(),
            buf: vec![0; 70 * 1024],
        };
        c.conn.handle_input(&rest).unwrap();
        match c.next_event().await {
            ClientEvent::Connected { info, .. } => assert_eq!(info.version, 2),
            other => panic!("expected Connected, got {other:?}"),
        }
        c
    }

    async fn flush(&mut self) {
        while let Some(b) = self.conn.poll_transmit() {
            self.stream.write_all(&b).await.unwrap();
        }
    }

    async fn next_event(&mut self) -> ClientEvent {
        loop {
            self.flush().await;
            if let Some(e) = self.conn.poll_event() {
                return e;
            }
            let n = guard("a DERP event", self.stream.read(&mut self.buf))
                .await
                .unwrap();
            assert!(n > 0, "relay closed the connection");
            self.conn.handle_input(&self.buf[..n]).unwrap();
        }
    }

    /// The next event that is not a keep-alive.
    async fn next(&mut self) -> ClientEvent {
        loop {
            match self.next_event().await {
                ClientEvent::KeepAlive => continue,
                e => return e,
            }
        }
    }

    async fn send(&mut self, dst: NodePublic, packet: &[u8]) {
        self.conn.send_packet(dst, packet).unwrap();
        self.flush().await;
    }

    /// Reads until the relay closes the connection.
    async fn wait_closed(mut self) {
        guard("the relay closing the connection", async {
            loop {
                match self.stream.read(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
    }
}

async fn wait_clients(relay: &Relay, n: u64) {
    guard("client count", async {
        while relay.metrics().clients != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

#[tokio::test]
async fn two_clients_exchange_packets_through_the_relay() {
    let (relay, addr) = start_relay().await;
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    wait_clients(&relay, 2).await;
    let listed: Vec<NodePublic> = relay.clients().iter().map(|c| c.key).collect();
    assert!(listed.contains(&a.key) && listed.contains(&b.key));

    a.send(b.key, b"ping from a").await;
    assert_eq!(
        b.next().await,
        ClientEvent::Packet {
            src: a.key,
            packet: bytes::Bytes::from_static(b"ping from a")
        }
    );
    b.send(a.key, b"pong from b").await;
    assert_eq!(
        a.next().await,
        ClientEvent::Packet {
            src: b.key,
            packet: bytes::Bytes::from_static(b"pong from b")
        }
    );
    // A maximal packet crosses intact.
    let big: Vec<u8> = (0..tsunagu_derp::frame::MAX_PACKET_SIZE)
        .map(|i| i as u8)
        .collect();
    a.send(b.key, &big).await;
    match b.next().await {
        ClientEvent::Packet { src, packet } => {
            assert_eq!(src, a.key);
            assert_eq!(&packet[..], &big[..]);
        }
        other => panic!("{other:?}"),
    }
    // Pings are answered by the relay itself.
    a.conn.ping(*b"12345678");
    assert_eq!(a.next().await, ClientEvent::Pong(*b"12345678"));
    let m = relay.metrics();
    assert_eq!((m.packets_forwarded, m.logins), (3, 2));
}

#[tokio::test]
async fn peer_gone_for_absent_and_departed_peers() {
    let (relay, addr) = start_relay().await;
    let mut a = Client::connect(addr).await;
    let nobody = NodePrivate::generate().public();
    a.send(nobody, b"anyone?").await;
    assert_eq!(
        a.next().await,
        ClientEvent::PeerGone {
            key: nobody,
            reason: PeerGoneReason::NotHere
        }
    );
    let mut b = Client::connect(addr).await;
    wait_clients(&relay, 2).await;
    a.send(b.key, b"hello").await;
    assert!(matches!(b.next().await, ClientEvent::Packet { .. }));
    let b_key = b.key;
    drop(b);
    assert_eq!(
        a.next().await,
        ClientEvent::PeerGone {
            key: b_key,
            reason: PeerGoneReason::Disconnected
        }
    );
    assert_eq!(relay.metrics().dropped_not_here, 1);
}

#[tokio::test]
async fn a_stuck_client_loses_its_own_packets_and_stalls_no_one() {
    let (relay, addr) = start_relay().await;
    let mut a = Client::connect(addr).await;
    let b = Client::connect(addr).await;
    // The stuck client logs in, then never reads again; a small receive buffer makes the
    // relay's writes to it stall sooner.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stuck = Client::connect_with(sock.connect(addr).await.unwrap()).await;
    wait_clients(&relay, 3).await;
    let (b_key, stuck_key) = (b.key, stuck.key);

    // B reads on its own task and reports every packet.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut b = b;
    let reader = tokio::spawn(async move {
        loop {
            if let ClientEvent::Packet { packet, .. } = b.next().await {
                let done = &packet[..] == b"last";
                tx.send(packet).unwrap();
                if done {
                    return b;
                }
            }
        }
    });

    // 2,000 packets of 32 KiB (64 MB) at the stuck client, with one for B every 100.
    let filler = vec![0x5a; 32 * 1024];
    for i in 0..2000u32 {
        a.send(stuck_key, &filler).await;
        if i % 100 == 0 {
            a.send(b_key, format!("to b {i}").as_bytes()).await;
        }
    }
    a.send(b_key, b"last").await;
    let mut got = Vec::new();
    while let Some(p) = guard("B's packets", rx.recv()).await {
        let last = &p[..] == b"last";
        got.push(p);
        if last {
            break;
        }
    }
    assert_eq!(
        got.len(),
        21,
        "B got all 20 packets and the last one: {got:?}"
    );
    let m = relay.metrics();
    assert!(
        m.dropped_queue_full > 0,
        "the stuck client's queue overflowed: {m:?}"
    );
    assert_eq!(
        m.packets_forwarded + m.dropped_queue_full,
        2000 + 21,
        "every packet was either queued or counted as dropped: {m:?}"
    );
    let _b = guard("B's reader", reader).await.unwrap();
    drop(stuck);
}

#[tokio::test]
async fn garbage_oversized_and_truncated_input_close_only_that_connection() {
    let (relay, addr) = start_relay().await;
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;

    // Garbage right after the upgrade: "GARBAGE…" reads as a frame far over the limit.
    let mut g = TcpStream::connect(addr).await.unwrap();
    let _greeting = upgrade(&mut g).await;
    g.write_all(b"GARBAGE GARBAGE GARBAGE").await.unwrap();
    Client {
        stream: g,
        conn: ClientConn::new(NodePrivate::generate(), ClientInfo::default()),
        key: NodePublic([0; 32]),
        buf: vec![0; 4096],
    }
    .wait_closed()
    .await;

    // A logged-in client announcing a 16 MiB SendPacket.
    let mut big = Client::connect(addr).await;
    let mut hdr = vec![0x04];
    hdr.extend_from_slice(&(16u32 << 20).to_be_bytes());
    big.stream.write_all(&hdr).await.unwrap();
    big.wait_closed().await;

    // A SendPacket whose payload is shorter than a key.
    let mut short = Client::connect(addr).await;
    short
        .stream
        .write_all(&[0x04, 0, 0, 0, 3, 1, 2, 3])
        .await
        .unwrap();
    short.wait_closed().await;

    // A frame cut short by the client closing its side.
    let mut cut = Client::connect(addr).await;
    let mut frame = BytesMut::new();
    ClientMessage::SendPacket {
        dst: a.key,
        packet: bytes::Bytes::from_static(b"0123456789"),
    }
    .encode(&mut frame);
    cut.stream
        .write_all(&frame[..frame.len() - 4])
        .await
        .unwrap();
    cut.stream.shutdown().await.unwrap();
    cut.wait_closed().await;

    assert_eq!(relay.metrics().closed_bad_input, 4, "{:?}", relay.metrics());
    // The well-behaved clients never noticed.
    a.send(b.key, b"still here").await;
    assert_eq!(
        b.next().await,
        ClientEvent::Packet {
            src: a.key,
            packet: bytes::Bytes::from_static(b"still here")
        }
    );
    wait_clients(&relay, 2).await;
}

#[tokio::test]
async fn http_answers_probe_and_refuses_plain_gets() {
    let (_relay, addr) = start_relay().await;
    for (path, want) in [
        ("/derp/probe", "200"),
        ("/derp/latency-check", "200"),
        ("/derp", "426"),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        guard("HTTP answer", s.read_to_end(&mut out)).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.split_whitespace().nth(1), Some(want), "{path}: {text}");
    }
}

#[tokio::test]
async fn stun_answers_with_the_mapped_address_and_counts_garbage() {
    let (relay, _) = start_relay().await;
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    tokio::spawn(relay.clone().serve_stun(server));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(b"\x00\x01garbage", server_addr)
        .await
        .unwrap();
    let tx = stun::TxId::random();
    client
        .send_to(&stun::binding_request(tx), server_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = guard("STUN answer", client.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!(from, server_addr);
    assert_eq!(
        stun::parse_binding_response(&buf[..n]),
        Ok((tx, client.local_addr().unwrap()))
    );
    let m = relay.metrics();
    assert_eq!((m.stun_requests, m.stun_garbage), (1, 1));
}

/// Two relays of one region, each meshed with the other: a client of one reaches a
/// client of the other (ForwardPacket over the link, learned from WatchConns), and a
/// relay that goes away takes its clients out of the other's view.
#[tokio::test]
async fn meshed_relays_carry_packets_between_their_clients() {
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let opts = |peer: SocketAddr| RelayOptions {
        mesh_key: Some("a shared secret".into()),
        mesh_with: vec![format!("http://{peer}")],
        ..RelayOptions::default()
    };
    let ra = Relay::new(NodePrivate::generate(), opts(ab));
    let rb = Relay::new(NodePrivate::generate(), opts(aa));
    let app_a = ra.router();
    tokio::spawn(async move { axum::serve(la, app_a).await });
    let app_b = rb.router();
    let serve_b = tokio::spawn(async move { axum::serve(lb, app_b).await });
    ra.start_mesh();
    rb.start_mesh();

    let mut c1 = Client::connect(aa).await;
    let mut c2 = Client::connect(ab).await;
    guard("each relay learning the other's client", async {
        while !(ra.reachable(&c2.key) && rb.reachable(&c1.key)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    c1.send(c2.key, b"across the mesh").await;
    assert_eq!(
        c2.next().await,
        ClientEvent::Packet {
            src: c1.key,
            packet: bytes::Bytes::from_static(b"across the mesh")
        }
    );
    c2.send(c1.key, b"and back").await;
    assert_eq!(
        c1.next().await,
        ClientEvent::Packet {
            src: c2.key,
            packet: bytes::Bytes::from_static(b"and back")
        }
    );
    assert_eq!(ra.metrics().mesh_links_up, 1);

    // A client without the mesh key cannot watch or forward.
    let mut intruder = Client::connect(aa).await;
    intruder.conn.watch_conns();
    intruder.flush().await;
    intruder.wait_closed().await;

    // c2 leaves relay B: relay A forgets it once B says so, and c1, which was talking
    // to it across the mesh, hears PeerGone.
    let k2 = c2.key;
    drop(c2);
    assert_eq!(
        c1.next().await,
        ClientEvent::PeerGone {
            key: k2,
            reason: PeerGoneReason::Disconnected
        }
    );
    assert!(!ra.reachable(&k2));
    c1.send(k2, b"gone?").await;
    assert_eq!(
        c1.next().await,
        ClientEvent::PeerGone {
            key: k2,
            reason: PeerGoneReason::NotHere
        }
    );
    serve_b.abort();
}

async fn start_relay_with(opts: RelayOptions) -> (Arc<Relay>, SocketAddr) {
    let relay = Relay::new(NodePrivate::generate(), opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = relay.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (relay, addr)
}

/// With a client check (`--relay-verify-clients`), only the keys it allows log in; the
/// others are closed before ServerInfo and counted.
#[tokio::test]
async fn a_verifying_relay_serves_only_the_keys_it_allows() {
    let allowed = Arc::new(parking_lot::Mutex::new(Vec::<NodePublic>::new()));
    let check = {
        let allowed = allowed.clone();
        tsunagu_derp::ClientCheck::new(move |k| allowed.lock().contains(k))
    };
    let (relay, addr) = start_relay_with(RelayOptions {
        verify_clients: Some(check),
        ..RelayOptions::default()
    })
    .await;
    // A stranger: proves its key, and is closed without a ServerInfo.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let rest = upgrade(&mut stream).await;
    let mut conn = ClientConn::new(NodePrivate::generate(), ClientInfo::default());
    conn.handle_input(&rest).unwrap();
    guard("the stranger closed", async {
        let mut buf = vec![0u8; 4096];
        loop {
            while let Some(b) = conn.poll_transmit() {
                let _ = stream.write_all(&b).await;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => conn.handle_input(&buf[..n]).unwrap(),
            }
        }
    })
    .await;
    assert!(!conn.is_connected());
    assert_eq!(relay.metrics().refused_not_tailnet, 1);
    assert_eq!(relay.metrics().clients, 0);

    // A node of the tailnet logs in and is served.
    let key = NodePrivate::generate();
    allowed.lock().push(key.public());
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let rest = upgrade(&mut stream).await;
    let mut c = Client {
        stream,
        conn: ClientConn::new(key.clone(), ClientInfo::default()),
        key: key.public(),
        buf: vec![0; 70 * 1024],
    };
    c.conn.handle_input(&rest).unwrap();
    assert!(matches!(
        c.next_event().await,
        ClientEvent::Connected { .. }
    ));
    wait_clients(&relay, 1).await;
    assert_eq!(relay.metrics().refused_not_tailnet, 1);
}

fn handshake_initiation(i: u32) -> Vec<u8> {
    let mut p = vec![0u8; 148];
    p[0] = 1;
    p[4..8].copy_from_slice(&i.to_le_bytes());
    p
}

/// One sender flooding a receiver with WireGuard handshake initiations through the relay
/// gets its burst through and no more, while another sender's initiations to the same
/// receiver all arrive, as do the flooder's other packets.
#[tokio::test]
async fn a_flooding_peer_loses_its_own_handshakes_only() {
    let (relay, addr) = start_relay_with(RelayOptions::default()).await;
    let mut victim = Client::connect(addr).await;
    let mut flooder = Client::connect(addr).await;
    let mut honest = Client::connect(addr).await;
    wait_clients(&relay, 3).await;
    for i in 0..200 {
        flooder
            .conn
            .send_packet(victim.key, &handshake_initiation(i))
            .unwrap();
    }
    flooder.flush().await;
    for i in 0..3 {
        honest
            .send(victim.key, &handshake_initiation(1000 + i))
            .await;
    }
    // A data packet of the flooder is not a handshake: it passes.
    flooder.send(victim.key, b"data").await;
    let (mut from_flooder, mut from_honest, mut data) = (0, 0, false);
    guard("the honest handshakes and the data", async {
        while from_honest < 3 || !data {
            if let ClientEvent::Packet { src, packet } = victim.next().await {
                if src == honest.key {
                    from_honest += 1;
                } else if &packet[..] == b"data" {
                    data = true;
                } else {
                    from_flooder += 1;
                }
            }
        }
    })
    .await;
    let m = relay.metrics();
    println!(
        "flooder: {from_flooder} of 200 relayed, {} dropped",
        m.dropped_handshake_rate
    );
    assert!(
        (10..=12).contains(&from_flooder),
        "about the burst of 10 relayed, got {from_flooder}"
    );
    assert!(m.dropped_handshake_rate >= 188, "{m:?}");
}
