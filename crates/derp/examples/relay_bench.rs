//! A relay benchmark (a program, not a test): an in-process relay on loopback, then
//!
//! 1. `IDLE` clients (default 1,000) connect, log in and stay idle: the process's RSS
//!    growth per client (relay side and the idle clients' own sockets together, so an
//!    upper bound for the relay);
//! 2. one sender pushes `PACKETS` packets of `SIZE` bytes (default 200,000 × 1,200 B) to
//!    one receiver through the relay, keeping at most `WINDOW` packets in flight (the
//!    relay drops, by design, what overflows a receiver's queue of 32): delivered
//!    packets per second.
//!
//! `cargo run --release -p tsunagu-derp --example relay_bench [IDLE [PACKETS [SIZE]]]`
//!
//! Loopback only; every loop is bounded by its count. The last line is
//! `relay: forward <N> packets/s (<G> Gbit/s), rss-per-idle-client <K> KiB`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tsunagu_derp::client::{ClientConn, ClientEvent, parse_upgrade_response, upgrade_request};
use tsunagu_derp::{ClientInfo, Relay, RelayOptions};
use tsunagu_proto::NodePrivate;

/// Packets in flight at most: below the relay's per-client queue of 32.
const WINDOW: usize = 24;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A logged-in client: the stream and its core, with bytes read past the login.
async fn login(addr: SocketAddr) -> (TcpStream, ClientConn) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).ok();
    tcp.write_all(upgrade_request("bench").as_bytes())
        .await
        .expect("upgrade");
    let mut conn = ClientConn::new(NodePrivate::generate(), ClientInfo::default());
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let mut upgraded = false;
    while !conn.is_connected() {
        while let Some(b) = conn.poll_transmit() {
            tcp.write_all(&b).await.expect("write");
        }
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(n > 0, "relay closed during login");
        if upgraded {
            conn.handle_input(&buf[..n]).expect("login");
        } else {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = parse_upgrade_response(&head).expect("101") {
                upgraded = true;
                conn.handle_input(&head[end..]).expect("login");
            }
        }
    }
    while conn.poll_event().is_some() {}
    (tcp, conn)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let idle = args.first().copied().unwrap_or(1000);
    let packets = args.get(1).copied().unwrap_or(200_000);
    let size = args.get(2).copied().unwrap_or(1200).min(64 << 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(idle, packets, size));
}

async fn run(idle: usize, packets: usize, size: usize) {
    let relay = Relay::new(NodePrivate::generate(), RelayOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = relay.router();
    // As tsunagu-server does: small frames leave at once.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });

    // 1. Idle clients.
    let before = rss_kib();
    let mut idle_conns = Vec::with_capacity(idle);
    for _ in 0..idle {
        idle_conns.push(login(addr).await);
    }
    while relay.metrics().clients < idle as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    let per_client = after.saturating_sub(before) as f64 / idle.max(1) as f64;
    println!(
        "idle clients: {idle}, RSS {before} KiB -> {after} KiB, {per_client:.1} KiB per client"
    );

    // 2. Forwarding: one sender, one receiver.
    let (mut rx_tcp, mut rx_conn) = login(addr).await;
    let (mut tx_tcp, mut tx_conn) = login(addr).await;
    let dst = rx_conn.public_key();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let receiver = tokio::spawn(async move {
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        let mut last = Instant::now();
        loop {
            let read = tokio::time::timeout(Duration::from_secs(2), rx_tcp.read(&mut buf)).await;
            let n = match read {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            rx_conn.handle_input(&buf[..n]).expect("relay frames");
            while let Some(ev) = rx_conn.poll_event() {
                if matches!(ev, ClientEvent::Packet { .. }) {
                    got += 1;
                    last = Instant::now();
                }
                counter.store(got, Ordering::Release);
            }
            if got >= packets {
                break;
            }
        }
        (got, last)
    });
    let payload = vec![0x42u8; size];
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < packets {
        let in_flight = sent - received.load(Ordering::Acquire).min(sent);
        if in_flight >= WINDOW {
            // Bounded: the receiver either catches up or stops after 2 s of silence.
            if receiver.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
            continue;
        }
        for _ in 0..(WINDOW - in_flight).min(packets - sent) {
            tx_conn.send_packet(dst, &payload).expect("size");
            sent += 1;
        }
        while let Some(b) = tx_conn.poll_transmit() {
            tx_tcp.write_all(&b).await.expect("send");
        }
    }
    while let Some(b) = tx_conn.poll_transmit() {
        tx_tcp.write_all(&b).await.expect("send");
    }
    let (got, last) = receiver.await.expect("receiver");
    let secs = last.duration_since(start).as_secs_f64().max(1e-9);
    let rate = got as f64 / secs;
    let gbits = rate * size as f64 * 8.0 / 1e9;
    let m = relay.metrics();
    println!(
        "forwarding: sent {sent} x {size} B (window {WINDOW}), delivered {got} in {secs:.2} s, dropped (queue full) {}",
        m.dropped_queue_full
    );
    drop(idle_conns);
    println!(
        "relay: forward {rate:.0} packets/s ({gbits:.2} Gbit/s), rss-per-idle-client {per_client:.1} KiB"
    );
}
