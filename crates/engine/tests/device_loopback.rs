//! Two devices in one process, over loopback UDP, with channels for TUNs: the whole packet
//! path without root or namespaces.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tsunagu_engine::Device;
use tsunagu_engine::scope::HostNets;
use tsunagu_engine::tun::{ChannelApp, ChannelTun};
use tsunagu_engine::udp::UdpSock;
use tsunagu_proto::{NetMap, NodePrivate, Peer, SelfNode};

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let len = 20 + payload.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(payload);
    p
}

struct Node {
    device: Device,
    app: ChannelApp,
    key: NodePrivate,
}

fn map(
    me: &NodePrivate,
    addr: &str,
    peer: &NodePrivate,
    peer_addr: &str,
    ep: Option<SocketAddr>,
) -> NetMap {
    NetMap {
        self_node: SelfNode {
            name: "n".into(),
            private_key: me.clone(),
            addresses: vec![addr.parse().unwrap()],
            serve_exit: false,
            peerapi_port: None,
        },
        peers: vec![Peer {
            name: "peer".into(),
            key: peer.public(),
            endpoints: ep.into_iter().collect(),
            allowed_ips: vec![peer_addr.parse().unwrap()],
            offers_exit: true,
            exit_client: true,
            keepalive: None,
            relay: None,
            disco: None,
        }],
        exit_node: None,
        exit_node_allow_lan_access: false,
        exit_node_blocked: false,
        mtu: 1280,
        packet_filter: None,
    }
}

/// Node a knows b's endpoint; b does not know a's (a sits behind a NAT, say).
fn pair() -> (Node, Node) {
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let ua = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let ub = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let eb = ub.local_addr().unwrap();
    let (ta, app_a) = ChannelTun::pair();
    let (tb, app_b) = ChannelTun::pair();
    let ma = map(&ka, "100.64.0.1/32", &kb, "100.64.0.2/32", Some(eb));
    let mb = map(&kb, "100.64.0.2/32", &ka, "100.64.0.1/32", None);
    let a = Device::start(&ma, &HostNets::default(), Arc::new(ta), ua).unwrap();
    let b = Device::start(&mb, &HostNets::default(), Arc::new(tb), ub).unwrap();
    (
        Node {
            device: a,
            app: app_a,
            key: ka,
        },
        Node {
            device: b,
            app: app_b,
            key: kb,
        },
    )
}

fn recv(app: &ChannelApp) -> Vec<u8> {
    app.from_tun
        .recv_timeout(Duration::from_secs(5))
        .expect("packet through the tunnel")
}

#[test]
fn packets_cross_both_ways() {
    let (a, b) = pair();
    let p = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], b"hello b");
    a.app.to_tun.send(p.clone()).unwrap();
    assert_eq!(recv(&b.app), p);
    // b learned a's endpoint from the handshake and can answer.
    let q = ipv4_packet([100, 64, 0, 2], [100, 64, 0, 1], b"hello a");
    b.app.to_tun.send(q.clone()).unwrap();
    assert_eq!(recv(&a.app), q);
    assert!(a.device.has_session(&b.key.public()));
    let st = a.device.peers();
    assert_eq!(st[0].tx_bytes, p.len() as u64);
    assert_eq!(st[0].rx_bytes, q.len() as u64);
}

#[test]
fn spoofed_source_and_unrouted_destination_are_dropped() {
    let (a, b) = pair();
    let ok = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], b"ok");
    a.app.to_tun.send(ok.clone()).unwrap();
    assert_eq!(recv(&b.app), ok);
    // a claims another source: b must drop it (a is only allowed 100.64.0.1).
    a.app
        .to_tun
        .send(ipv4_packet([100, 64, 0, 9], [100, 64, 0, 2], b"spoof"))
        .unwrap();
    // Internet destination without an exit node: no route on a.
    a.app
        .to_tun
        .send(ipv4_packet([100, 64, 0, 1], [203, 0, 113, 10], b"web"))
        .unwrap();
    a.app.to_tun.send(b"not ip".to_vec()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.device.counters().src_rejected == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.device.counters().src_rejected, 1);
    assert_eq!(a.device.counters().no_route, 1);
    assert_eq!(a.device.counters().tun_not_ip, 1);
    assert!(
        b.app.from_tun.try_recv().is_err(),
        "nothing else was delivered"
    );
}

#[test]
fn garbage_datagrams_are_counted_and_the_device_keeps_working() {
    let (a, b) = pair();
    let target = b.device.local_addr().unwrap();
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent_wg_like = 0;
    // A bounded burst of junk: empty, random, oversized, WireGuard-shaped with bad MACs,
    // data packets for unknown sessions, STUN- and disco-shaped bytes.
    let mut seed = 1u32;
    for i in 0..400u32 {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let len = (seed % 1500) as usize;
        let mut d: Vec<u8> = (0..len).map(|j| (seed >> (j % 24)) as u8).collect();
        match i % 5 {
            0 => d.clear(),
            1 if len >= 4 => {
                d[0] = 1 + (seed % 4) as u8;
                d[1..4].fill(0);
                sent_wg_like += 1;
            }
            2 => d = vec![0xab; 65_000],
            _ => {}
        }
        junk.send_to(&d, target).unwrap();
    }
    let mut stun = vec![0u8; 20];
    stun[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    junk.send_to(&stun, target).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let total = |c: tsunagu_engine::CounterSnapshot| {
        c.udp_unknown + c.udp_stun + c.wg_rejected + c.wg_unknown_peer
    };
    while total(b.device.counters()) < 401 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = b.device.counters();
    assert_eq!(total(c), 401, "{c:?}");
    assert_eq!(c.udp_stun, 1);
    assert!(c.wg_rejected + c.wg_unknown_peer >= sent_wg_like, "{c:?}");
    // Still working.
    let p = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], b"after junk");
    a.app.to_tun.send(p.clone()).unwrap();
    assert_eq!(recv(&b.app), p);
}

#[test]
fn unknown_peer_key_cannot_handshake() {
    let (_a, b) = pair();
    // A third node that b does not know tries to talk to b.
    let kc = NodePrivate::generate();
    let uc = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let (tc, app_c) = ChannelTun::pair();
    let mc = map(
        &kc,
        "100.64.0.3/32",
        &b.key,
        "100.64.0.2/32",
        Some(b.device.local_addr().unwrap()),
    );
    let c = Device::start(&mc, &HostNets::default(), Arc::new(tc), uc).unwrap();
    app_c
        .to_tun
        .send(ipv4_packet([100, 64, 0, 3], [100, 64, 0, 2], b"let me in"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.device.counters().wg_unknown_peer == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.device.counters().wg_unknown_peer >= 1);
    assert!(
        b.app
            .from_tun
            .recv_timeout(Duration::from_millis(300))
            .is_err()
    );
    assert!(!c.device_has_session(&b.key));
}

trait HasSession {
    fn device_has_session(&self, k: &NodePrivate) -> bool;
}
impl HasSession for Device {
    fn device_has_session(&self, k: &NodePrivate) -> bool {
        self.has_session(&k.public())
    }
}

#[test]
fn exit_node_selection_routes_internet_and_survives_reconfiguration() {
    let (a, b) = pair();
    let warm = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], b"warm");
    a.app.to_tun.send(warm.clone()).unwrap();
    assert_eq!(recv(&b.app), warm);
    let mut ma = map(
        &a.key,
        "100.64.0.1/32",
        &b.key,
        "100.64.0.2/32",
        Some(b.device.local_addr().unwrap()),
    );
    ma.exit_node = Some(b.key.public());
    a.device.apply(&ma, &HostNets::default());
    let web = ipv4_packet([100, 64, 0, 1], [203, 0, 113, 10], b"GET /");
    // b does not offer itself as an exit node: it drops what is not addressed to it
    // (never an exit node by accident, whatever the host's forwarding settings).
    a.app.to_tun.send(web.clone()).unwrap();
    assert!(
        b.app
            .from_tun
            .recv_timeout(Duration::from_millis(500))
            .is_err()
    );
    assert_eq!(b.device.counters().filter_dropped, 1);
    let mut mb = map(&b.key, "100.64.0.2/32", &a.key, "100.64.0.1/32", None);
    mb.self_node.serve_exit = true;
    b.device.apply(&mb, &HostNets::default());
    a.app.to_tun.send(web.clone()).unwrap();
    assert_eq!(recv(&b.app), web, "internet traffic goes to the exit node");
    // The answer from the internet is accepted only because b is a's exit node.
    let answer = ipv4_packet([203, 0, 113, 10], [100, 64, 0, 1], b"200 OK");
    b.app.to_tun.send(answer.clone()).unwrap();
    assert_eq!(recv(&a.app), answer);
    assert!(a.device.peers()[0].is_exit_node);
    // Deselect: the same answer is now a spoofed source.
    ma.exit_node = None;
    a.device.apply(&ma, &HostNets::default());
    b.app.to_tun.send(answer).unwrap();
    assert!(
        a.app
            .from_tun
            .recv_timeout(Duration::from_millis(500))
            .is_err()
    );
    assert_eq!(a.device.counters().src_rejected, 1);
}

/// A relay in a test: queues each datagram and hands it to the destination device from
/// its own thread, as a DERP client of the region would, unless cut. It serves the
/// regions `regions` and records the region of every datagram sent.
struct FakeRelay {
    dst: tsunagu_proto::NodePublic,
    regions: Vec<u16>,
    queue: std::sync::Mutex<std::sync::mpsc::Sender<(u16, Vec<u8>)>>,
    cut: std::sync::atomic::AtomicBool,
    sent: std::sync::Mutex<Vec<u16>>,
}

impl FakeRelay {
    fn new(
        me: tsunagu_proto::NodePublic,
        dst: tsunagu_proto::NodePublic,
        to: &Arc<Device>,
    ) -> Arc<Self> {
        Self::with_regions(me, dst, to, &[900])
    }

    fn with_regions(
        me: tsunagu_proto::NodePublic,
        dst: tsunagu_proto::NodePublic,
        to: &Arc<Device>,
        regions: &[u16],
    ) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(u16, Vec<u8>)>();
        let to = Arc::downgrade(to);
        std::thread::spawn(move || {
            while let Ok((region, d)) = rx.recv() {
                match to.upgrade() {
                    // The destination is connected to that region too: it receives there.
                    Some(dev) => dev.receive_relayed(&me, region, &d),
                    None => return,
                }
            }
        });
        Arc::new(FakeRelay {
            dst,
            regions: regions.to_vec(),
            queue: std::sync::Mutex::new(tx),
            cut: false.into(),
            sent: Default::default(),
        })
    }
}

impl tsunagu_engine::device::RelayTx for FakeRelay {
    fn send(&self, region: u16, dst: &tsunagu_proto::NodePublic, datagram: &[u8]) -> bool {
        if self.cut.load(std::sync::atomic::Ordering::Relaxed)
            || *dst != self.dst
            || !self.regions.contains(&region)
        {
            return false;
        }
        self.sent.lock().unwrap().push(region);
        self.queue
            .lock()
            .unwrap()
            .send((region, datagram.to_vec()))
            .is_ok()
    }
}

#[test]
fn each_side_sends_through_the_other_sides_home_region() {
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let ua = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let ub = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let (ta, app_a) = ChannelTun::pair();
    let (tb, app_b) = ChannelTun::pair();
    // a is homed on 900, b on 901; no direct endpoints.
    let mut ma = map(&ka, "100.64.0.1/32", &kb, "100.64.0.2/32", None);
    ma.peers[0].relay = Some(901);
    let mut mb = map(&kb, "100.64.0.2/32", &ka, "100.64.0.1/32", None);
    mb.peers[0].relay = Some(900);
    let a = Arc::new(Device::start(&ma, &HostNets::default(), Arc::new(ta), ua).unwrap());
    let b = Arc::new(Device::start(&mb, &HostNets::default(), Arc::new(tb), ub).unwrap());
    let ra = FakeRelay::with_regions(ka.public(), kb.public(), &b, &[900, 901]);
    let rb = FakeRelay::with_regions(kb.public(), ka.public(), &a, &[900, 901]);
    a.set_relay(Some(ra.clone()));
    b.set_relay(Some(rb.clone()));
    for i in 0..3u8 {
        let p = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], &[i; 8]);
        app_a.to_tun.send(p.clone()).unwrap();
        assert_eq!(recv(&app_b), p);
        let q = ipv4_packet([100, 64, 0, 2], [100, 64, 0, 1], &[i; 9]);
        app_b.to_tun.send(q.clone()).unwrap();
        assert_eq!(recv(&app_a), q);
    }
    // a's handshake came to b over 901 and b answered the same way (the handshake
    // response goes back where the initiation came from); everything else each side
    // sends goes to the other's home, although it receives over its own.
    let sent_a = ra.sent.lock().unwrap().clone();
    let sent_b = rb.sent.lock().unwrap().clone();
    assert!(sent_a.iter().all(|r| *r == 901), "{sent_a:?}");
    assert_eq!(sent_b.first(), Some(&901), "{sent_b:?}");
    assert!(sent_b[1..].iter().all(|r| *r == 900), "{sent_b:?}");
    assert!(sent_b.len() > 3, "{sent_b:?}");
    assert_eq!(
        a.peers()[0].endpoint,
        Some(tsunagu_engine::peers::relay_addr(901))
    );
    assert_eq!(
        b.peers()[0].endpoint,
        Some(tsunagu_engine::peers::relay_addr(900))
    );
}

#[test]
fn relay_carries_traffic_when_no_direct_path_answers_and_direct_takes_over() {
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let ua = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let ub = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let eb = ub.local_addr().unwrap();
    // A black hole for a's "direct" endpoint of b: bound, never read.
    let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (ta, app_a) = ChannelTun::pair();
    let (tb, app_b) = ChannelTun::pair();
    let mut ma = map(
        &ka,
        "100.64.0.1/32",
        &kb,
        "100.64.0.2/32",
        Some(hole.local_addr().unwrap()),
    );
    ma.peers[0].relay = Some(900);
    let mut mb = map(&kb, "100.64.0.2/32", &ka, "100.64.0.1/32", None);
    mb.peers[0].relay = Some(900);
    let a = Arc::new(Device::start(&ma, &HostNets::default(), Arc::new(ta), ua).unwrap());
    let b = Arc::new(Device::start(&mb, &HostNets::default(), Arc::new(tb), ub).unwrap());
    let ra = FakeRelay::new(ka.public(), kb.public(), &b);
    let rb = FakeRelay::new(kb.public(), ka.public(), &a);
    a.set_relay(Some(ra.clone()));
    b.set_relay(Some(rb.clone()));
    let p = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], b"via relay");
    app_a.to_tun.send(p.clone()).unwrap();
    assert_eq!(recv(&app_b), p);
    let q = ipv4_packet([100, 64, 0, 2], [100, 64, 0, 1], b"back");
    app_b.to_tun.send(q.clone()).unwrap();
    assert_eq!(recv(&app_a), q);
    assert_eq!(
        a.peers()[0].endpoint,
        Some(tsunagu_engine::peers::relay_addr(900))
    );
    assert!(a.counters().relay_tx > 0 && b.counters().relay_rx > 0);

    // The map now gives a the real direct endpoint: a probe gets through, b answers
    // directly, and both move to the direct path.
    let mut ma2 = ma.clone();
    ma2.peers[0].endpoints = vec![eb];
    a.apply(&ma2, &HostNets::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.peers()[0].endpoint != Some(eb) && Instant::now() < deadline {
        app_a.to_tun.send(p.clone()).unwrap();
        let _ = app_b.from_tun.recv_timeout(Duration::from_millis(200));
        app_b.to_tun.send(q.clone()).unwrap();
        let _ = app_a.from_tun.recv_timeout(Duration::from_millis(200));
    }
    assert_eq!(
        a.peers()[0].endpoint,
        Some(eb),
        "a moved to the direct path"
    );
    // Cut the relay: traffic keeps flowing directly.
    ra.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    rb.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    while app_b.from_tun.try_recv().is_ok() {}
    app_a.to_tun.send(p.clone()).unwrap();
    assert_eq!(recv(&app_b), p);
    drop(hole);
}

/// Both nodes speak disco: they start on the relay, a's pings reach b directly, b learns
/// a's address from them and pings back, and both move to the direct path, without
/// either having been told the other's real endpoint up front except a's view of b.
/// Disco datagrams that fail (bad box, unknown key, truncated, a relayed CallMeMaybe's
/// sender that is not the key's node) are counted and change nothing.
#[test]
fn disco_finds_the_direct_path_and_refuses_bad_boxes() {
    use tsunagu_disco::{DiscoPrivate, Message, PeerBox};
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let (da, db) = (DiscoPrivate::generate(), DiscoPrivate::generate());
    let ua = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let ub = UdpSock::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let (ea, eb) = (ua.local_addr().unwrap(), ub.local_addr().unwrap());
    let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (ta, app_a) = ChannelTun::pair();
    let (tb, app_b) = ChannelTun::pair();
    let mut ma = map(&ka, "100.64.0.1/32", &kb, "100.64.0.2/32", None);
    ma.peers[0].endpoints = vec![hole.local_addr().unwrap(), eb];
    ma.peers[0].relay = Some(900);
    ma.peers[0].disco = Some(db.public());
    let mut mb = map(&kb, "100.64.0.2/32", &ka, "100.64.0.1/32", None);
    mb.peers[0].relay = Some(900);
    mb.peers[0].disco = Some(da.public());
    let a = Arc::new(Device::start(&ma, &HostNets::default(), Arc::new(ta), ua).unwrap());
    let b = Arc::new(Device::start(&mb, &HostNets::default(), Arc::new(tb), ub).unwrap());
    a.set_disco(Some(da.clone()));
    b.set_disco(Some(db.clone()));
    a.set_endpoints(vec![ea]);
    b.set_endpoints(vec![eb]);
    a.set_relay(Some(FakeRelay::new(ka.public(), kb.public(), &b)));
    b.set_relay(Some(FakeRelay::new(kb.public(), ka.public(), &a)));

    let p = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], b"hello");
    let q = ipv4_packet([100, 64, 0, 2], [100, 64, 0, 1], b"back");
    app_a.to_tun.send(p.clone()).unwrap();
    assert_eq!(recv(&app_b), p, "first packet over the relay");
    let deadline = Instant::now() + Duration::from_secs(10);
    while (a.peers()[0].endpoint != Some(eb) || b.peers()[0].endpoint != Some(ea))
        && Instant::now() < deadline
    {
        app_a.to_tun.send(p.clone()).unwrap();
        let _ = app_b.from_tun.recv_timeout(Duration::from_millis(100));
        app_b.to_tun.send(q.clone()).unwrap();
        let _ = app_a.from_tun.recv_timeout(Duration::from_millis(100));
    }
    assert_eq!(a.peers()[0].endpoint, Some(eb), "a went direct");
    assert_eq!(b.peers()[0].endpoint, Some(ea), "b went direct");
    assert!(a.counters().disco_tx > 0 && b.counters().disco_tx > 0);
    assert_eq!(a.counters().disco_rejected, 0);
    assert_eq!(b.counters().disco_rejected, 0);

    // Bad input at b's socket.
    let evil = UdpSocket::bind("127.0.0.1:0").unwrap();
    let good = PeerBox::new(&da, &db.public()).seal(&Message::Pong {
        tx: [0; 12],
        src: eb,
    });
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x80;
    let stranger = PeerBox::new(&DiscoPrivate::generate(), &db.public()).seal(&Message::Ping {
        tx: [1; 12],
        node_key: None,
    });
    let mut forged = stranger.clone();
    forged[6..38].copy_from_slice(&da.public().0); // claims to be a, sealed by a stranger
    let wrong_node = PeerBox::new(&da, &db.public()).seal(&Message::Ping {
        tx: [2; 12],
        node_key: Some(NodePrivate::generate().public()),
    });
    let cmm_over_udp = PeerBox::new(&da, &db.public()).seal(&Message::CallMeMaybe {
        endpoints: vec![hole.local_addr().unwrap()],
    });
    let bad: Vec<&[u8]> = vec![&flipped, &stranger, &forged, &wrong_node, &cmm_over_udp];
    for d in &bad {
        evil.send_to(d, eb).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.counters().disco_rejected < bad.len() as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.counters().disco_rejected, bad.len() as u64);
    assert!(
        evil.set_read_timeout(Some(Duration::from_millis(300)))
            .is_ok()
    );
    let mut buf = [0u8; 2048];
    assert!(
        evil.recv_from(&mut buf).is_err(),
        "no answer to refused input"
    );
    // Still direct, still working.
    app_a.to_tun.send(p.clone()).unwrap();
    assert_eq!(recv(&app_b), p);
    assert_eq!(b.peers()[0].endpoint, Some(ea));
    drop(hole);
}

/// A standby host (of an exit node whose identity another host serves) answers nothing:
/// handshakes and data are dropped and counted, nothing reaches its TUN, it sends nothing.
/// Made active, it handshakes and forwards; made standby again, its session is gone and
/// data is dropped at once.
#[test]
fn a_standby_host_drops_handshakes_and_data_until_it_is_active() {
    let (a, b) = pair();
    b.device.set_standby(true);
    assert!(b.device.standby());
    let p = ipv4_packet([100, 64, 0, 1], [100, 64, 0, 2], b"to the exit node");
    a.app.to_tun.send(p.clone()).unwrap();
    // a's handshake (and its ~1 s retry) reach b and are dropped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.device.counters().standby_dropped < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        b.device.counters().standby_dropped >= 2,
        "{:?}",
        b.device.counters()
    );
    assert!(b.app.from_tun.try_recv().is_err(), "nothing delivered");
    assert!(
        !a.device.has_session(&b.key.public()),
        "no handshake answered"
    );
    // b's own traffic to a goes nowhere while it stands by.
    let before = b.device.counters().standby_dropped;
    b.app
        .to_tun
        .send(ipv4_packet([100, 64, 0, 2], [100, 64, 0, 1], b"from b"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while b.device.counters().standby_dropped == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.device.counters().standby_dropped > before);
    assert!(a.app.from_tun.try_recv().is_err());

    // Active: a's next retry gets through, the queued packet with it.
    b.device.set_standby(false);
    assert_eq!(recv(&b.app), p);
    assert!(a.device.has_session(&b.key.public()));

    // Standby again: the session is gone on b's side and a's data is dropped.
    b.device.set_standby(true);
    assert!(!b.device.has_session(&a.key.public()));
    let before = b.device.counters().standby_dropped;
    a.app.to_tun.send(p.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while b.device.counters().standby_dropped == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        b.device.counters().standby_dropped > before,
        "data dropped at once"
    );
    assert!(
        b.app
            .from_tun
            .recv_timeout(Duration::from_millis(300))
            .is_err(),
        "nothing delivered"
    );
}
