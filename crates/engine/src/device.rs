//! The packet path: TUN ⇄ WireGuard ⇄ UDP, on three threads.
//!
//! ```text
//!  app ─► TUN ─► [outbound thread] route by destination (longest prefix; the exit node
//!                 holds 0.0.0.0/0 and ::/0) ─► peer's Tunn encrypts ─► UDP to endpoint
//!  UDP ─► [inbound thread] classify (WireGuard / STUN / disco / junk) ─► verify MACs,
//!                 rate-limit handshakes ─► find peer (handshake: by static key;
//!                 data: by our session index) ─► Tunn decrypts ─► source allowed for
//!                 that peer? ─► packet filter (for us, or forwarded by an exit node)
//!                 ─► TUN ─► app
//!                 disco: find the peer by disco key ─► open the box ─► pong / path
//!                 change / pings back
//!  [timer thread] every 250 ms: each peer's WireGuard timers (keepalives, rekeying,
//!                 handshake retries) and disco (pings, CallMeMaybe) ─► UDP or relay
//! ```
//!
//! Each direction runs on its own thread and keeps per-flow packet order (one TUN queue,
//! one reader). The peer table is an immutable [`PeerTable`] swapped whole on a map
//! change; per-peer WireGuard state sits behind a per-peer lock.

use crate::demux::{DatagramKind, classify};
use crate::filter::{Flows, Verdict};
use crate::handover::{Busy, ExitFlows};
use crate::peers::{
    DiscoSend, LocalKey, PeerState, PeerTable, bump, ip_declared_len, ip_endpoints, relay_addr,
    relay_region,
};
use crate::scope::HostNets;
use crate::tun::TunIo;
use crate::udp::UdpSock;
use gotatun::noise::TunnResult;
use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::noise::index_table::IndexTable;
use gotatun::packet::{Packet, PacketBufPool, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519::PublicKey;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tsunagu_disco::{DiscoPrivate, Message, PeerBox};
use tsunagu_proto::{NetMap, NodePublic};

const TIMER_TICK: Duration = Duration::from_millis(250);
const TUN_WAIT: Duration = Duration::from_millis(200);
/// Largest datagram or packet handled; bigger ones are truncated by the kernel and then
/// fail authentication, i.e. are dropped.
const BUF_SIZE: usize = 65536;

/// Device-wide counters, for status and for tests of bad input.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Datagrams that were neither WireGuard, STUN nor disco.
    pub udp_unknown: AtomicU64,
    pub udp_stun: AtomicU64,
    pub udp_disco: AtomicU64,
    /// WireGuard-looking datagrams that failed parsing, MACs or decryption.
    pub wg_rejected: AtomicU64,
    /// Handshakes or data from keys or session indexes we do not know.
    pub wg_unknown_peer: AtomicU64,
    /// Decrypted packets whose source the sending peer is not allowed to use.
    pub src_rejected: AtomicU64,
    /// Packets from the TUN with no peer for their destination.
    pub no_route: AtomicU64,
    /// Packets from the TUN that are not IP.
    pub tun_not_ip: AtomicU64,
    pub udp_send_errors: AtomicU64,
    /// Datagrams handed to the relay, received from it, and dropped for want of one (or
    /// because its queue was full).
    pub relay_tx: AtomicU64,
    pub relay_rx: AtomicU64,
    pub relay_drops: AtomicU64,
    /// Disco messages sent, and received ones refused (unknown sender key, a box that
    /// does not open, a malformed message, a relayed sender that is not the key's node).
    pub disco_tx: AtomicU64,
    pub disco_rejected: AtomicU64,
    /// Decrypted packets the packet filter refused (or not for this node).
    pub filter_dropped: AtomicU64,
    /// WireGuard and disco datagrams, and packets from the TUN, dropped because this host
    /// stands by for an exit node it does not serve now.
    pub standby_dropped: AtomicU64,
}

/// A snapshot of [`DeviceCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    pub udp_unknown: u64,
    pub udp_stun: u64,
    pub udp_disco: u64,
    pub wg_rejected: u64,
    pub wg_unknown_peer: u64,
    pub src_rejected: u64,
    pub no_route: u64,
    pub tun_not_ip: u64,
    pub udp_send_errors: u64,
    pub relay_tx: u64,
    pub relay_rx: u64,
    pub relay_drops: u64,
    pub disco_tx: u64,
    pub disco_rejected: u64,
    pub filter_dropped: u64,
    #[serde(default)]
    pub standby_dropped: u64,
}

impl DeviceCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            udp_unknown: g(&self.udp_unknown),
            udp_stun: g(&self.udp_stun),
            udp_disco: g(&self.udp_disco),
            wg_rejected: g(&self.wg_rejected),
            wg_unknown_peer: g(&self.wg_unknown_peer),
            src_rejected: g(&self.src_rejected),
            no_route: g(&self.no_route),
            tun_not_ip: g(&self.tun_not_ip),
            udp_send_errors: g(&self.udp_send_errors),
            relay_tx: g(&self.relay_tx),
            relay_rx: g(&self.relay_rx),
            relay_drops: g(&self.relay_drops),
            disco_tx: g(&self.disco_tx),
            disco_rejected: g(&self.disco_rejected),
            filter_dropped: g(&self.filter_dropped),
            standby_dropped: g(&self.standby_dropped),
        }
    }
}

/// What one peer looks like from outside, for status output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    pub is_exit_node: bool,
    pub last_handshake_secs: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Packets the peer sent through us to the internet (we are its exit node).
    pub exit_rx_packets: u64,
}

/// Where datagrams for the relay go: the DERP client, outside the engine. `send` must not
/// block (a full queue drops, as a full socket buffer would).
pub trait RelayTx: Send + Sync {
    /// Queue `datagram` for the peer `dst` through the relay region `region` (the peer's
    /// relay endpoint, [`relay_addr`]); false when it was dropped.
    fn send(&self, region: u16, dst: &NodePublic, datagram: &[u8]) -> bool;
}

/// Receives the STUN datagrams that arrive on the device's UDP socket (answers to the
/// daemon's own Binding Requests); must not block.
pub type StunSink = Arc<dyn Fn(&[u8], SocketAddr) + Send + Sync>;

struct Shared {
    table: RwLock<Arc<PeerTable>>,
    relay: RwLock<Option<Arc<dyn RelayTx>>>,
    stun: RwLock<Option<StunSink>>,
    /// Our disco key (none: we neither answer nor send disco).
    disco: RwLock<Option<Arc<DiscoPrivate>>>,
    /// Our endpoints, as CallMeMaybe tells peers.
    endpoints: RwLock<Vec<SocketAddr>>,
    /// Refused disco input is logged at most once a second.
    disco_log: RateLog,
    /// Outgoing UDP flows, whose answers the packet filter lets in.
    flows: Flows,
    /// What members exchange through and with us as an exit node: when a planned
    /// handover can happen without cutting a connection in half.
    exit_flows: Mutex<ExitFlows>,
    /// Packets the filter refused are logged at most once a second.
    filter_log: RateLog,
    /// Our session indexes → the peer they belong to. Filled from the handshakes we send;
    /// stale entries are pruned by the timer thread.
    by_index: Mutex<HashMap<u32, Arc<PeerState>>>,
    index_table: IndexTable,
    udp: UdpSock,
    tun: Arc<dyn TunIo>,
    mtu: u16,
    stop: AtomicBool,
    /// A standby host of an exit node: everything is ready (peers, routes, NAT), and it
    /// answers nothing, sends nothing and forwards nothing until the server makes it the
    /// active host ([`Device::set_standby`]).
    standby: AtomicBool,
    counters: DeviceCounters,
}

/// A running WireGuard device. Dropping it stops its threads.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Device {
    /// Start the device for `map` (which must be valid) on the given TUN and socket.
    /// `host`: the host's own networks, closed to what it forwards as exit node.
    pub fn start(
        map: &NetMap,
        host: &HostNets,
        tun: Arc<dyn TunIo>,
        udp: UdpSock,
    ) -> io::Result<Device> {
        Self::start_standby(map, host, tun, udp, false)
    }

    /// [`Device::start`], standing by from the first packet on when `standby`.
    pub fn start_standby(
        map: &NetMap,
        host: &HostNets,
        tun: Arc<dyn TunIo>,
        udp: UdpSock,
        standby: bool,
    ) -> io::Result<Device> {
        let index_table = IndexTable::from_os_rng();
        let empty = PeerTable::empty(Arc::new(LocalKey::new(&map.self_node.private_key)));
        let table = PeerTable::build(map, &empty, &index_table, host);
        let shared = Arc::new(Shared {
            table: RwLock::new(Arc::new(table)),
            relay: RwLock::new(None),
            stun: RwLock::new(None),
            disco: RwLock::new(None),
            endpoints: RwLock::new(Vec::new()),
            disco_log: RateLog::new(Duration::from_secs(1)),
            flows: Flows::default(),
            exit_flows: Mutex::new(ExitFlows::default()),
            filter_log: RateLog::new(Duration::from_secs(1)),
            by_index: Mutex::new(HashMap::new()),
            index_table,
            udp,
            tun,
            mtu: map.mtu,
            stop: AtomicBool::new(false),
            standby: AtomicBool::new(standby),
            counters: DeviceCounters::default(),
        });
        let mut threads = Vec::new();
        for (name, f) in [
            ("tsunagu-out", outbound as fn(&Shared)),
            ("tsunagu-in", inbound),
            ("tsunagu-timers", timers),
        ] {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || f(&s))?,
            );
        }
        Ok(Device { shared, threads })
    }

    /// Reconfigure for a new map (which must be valid). Sessions of unchanged peers survive.
    /// `host` as for [`Device::start`].
    pub fn apply(&self, map: &NetMap, host: &HostNets) {
        let mut table = self.shared.table.write();
        let next = PeerTable::build(map, &table, &self.shared.index_table, host);
        *table = Arc::new(next);
    }

    /// Stand by (or serve again): see `Shared::standby`. Every WireGuard session starts
    /// over either way: a host that stood by has none worth keeping, and one that stops
    /// serving must not answer with the ones it had. Once this returns, no datagram is
    /// answered any more (a reply being made meanwhile went out before).
    pub fn set_standby(&self, standby: bool) {
        let was = self.shared.standby.swap(standby, Ordering::SeqCst);
        if was == standby {
            return;
        }
        let table = self.shared.table.read().clone();
        for e in table.entries() {
            e.state.reset_session(Instant::now());
        }
        self.shared.by_index.lock().clear();
        *self.shared.exit_flows.lock() = ExitFlows::default();
        tracing::info!(standby, "data plane role changed");
    }

    /// Whether a planned handover may happen now without cutting a forwarded exchange
    /// in half: `None` when quiet, otherwise what keeps this exit node busy
    /// ([`crate::handover`]).
    pub fn handover_busy(&self) -> Option<Busy> {
        self.shared.exit_flows.lock().quiet(Instant::now())
    }

    /// Members' TCP connections through and to this exit node seen since it became
    /// active (for logs).
    pub fn exit_connections_seen(&self) -> u64 {
        self.shared.exit_flows.lock().seen()
    }

    /// Whether the device stands by.
    pub fn standby(&self) -> bool {
        self.shared.standby.load(Ordering::SeqCst)
    }

    /// Give the device a relay (or take it away): peers with a relay region are then
    /// reachable through it (the region is passed along with every datagram).
    pub fn set_relay(&self, relay: Option<Arc<dyn RelayTx>>) {
        *self.shared.relay.write() = relay;
    }

    /// Where STUN answers go (the daemon's endpoint discovery).
    pub fn set_stun_sink(&self, sink: Option<StunSink>) {
        *self.shared.stun.write() = sink;
    }

    /// Speak disco with this key: answer peers' pings, and find direct paths to peers
    /// that have a disco key with pings of our own.
    pub fn set_disco(&self, key: Option<DiscoPrivate>) {
        *self.shared.disco.write() = key.map(Arc::new);
    }

    /// Our endpoints (public ones first), for the CallMeMaybe messages we send.
    /// A change (a new public mapping, a new local address: the network changed) makes
    /// every active disco peer probed again at once.
    pub fn set_endpoints(&self, endpoints: Vec<SocketAddr>) {
        let mut cur = self.shared.endpoints.write();
        if *cur == endpoints {
            return;
        }
        let changed = !cur.is_empty();
        *cur = endpoints;
        drop(cur);
        if changed {
            let table = self.shared.table.read().clone();
            for e in table.entries() {
                e.state.disco_reprobe();
            }
        }
    }

    /// Send a datagram of our own (a STUN Binding Request) from the WireGuard socket, so
    /// the answer tells the mapping that peers will see.
    pub fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.shared.udp.send_to(datagram, to)
    }

    /// A datagram the relay delivered from `src` (its region `region`): handled like one
    /// from the UDP socket, with the relay as the return path.
    pub fn receive_relayed(&self, src: &NodePublic, region: u16, datagram: &[u8]) {
        let shared = &self.shared;
        bump(&shared.counters.relay_rx, 1);
        if datagram.len() > BUF_SIZE {
            bump(&shared.counters.wg_rejected, 1);
            return;
        }
        let buf = Packet::from_bytes(bytes::BytesMut::from(datagram));
        let mut mtu = MtuWatcher::new(shared.mtu);
        handle_datagram(shared, buf, relay_addr(region), Some(src), &mut mtu);
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.udp.local_addr()
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    /// Status of every peer, in map order.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let table = self.shared.table.read().clone();
        let exit = table.exit().map(|e| e.state.key);
        table
            .entries()
            .iter()
            .map(|e| PeerStatus {
                name: e.name.clone(),
                key: e.state.key.to_string(),
                endpoint: e.state.endpoint(),
                allowed_ips: e.allowed_ips.iter().map(ToString::to_string).collect(),
                is_exit_node: exit == Some(e.state.key),
                last_handshake_secs: e.state.last_handshake().map(|d| d.as_secs()),
                tx_bytes: e.state.counters.tx_bytes.load(Ordering::Relaxed),
                rx_bytes: e.state.counters.rx_bytes.load(Ordering::Relaxed),
                exit_rx_packets: e.state.counters.exit_rx_packets.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The key of a peer that completed a handshake, for tests and status.
    pub fn has_session(&self, key: &NodePublic) -> bool {
        let table = self.shared.table.read().clone();
        table
            .get(key)
            .is_some_and(|e| e.state.last_handshake().is_some())
    }

    /// Stop the threads and wait for them (also done on drop).
    pub fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// 100.64.0.0/10 or fd7a:115c:a1e0::/48: an address inside the tailnet.
fn is_tailnet_addr(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(a) => a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64,
        std::net::IpAddr::V6(a) => {
            let s = a.segments();
            s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
        }
    }
}

/// Send a datagram to `to`: over UDP, or through the relay to `key` when `to` is a relay
/// endpoint.
fn send(shared: &Shared, packet: WgKind, to: SocketAddr, key: Option<&NodePublic>) {
    let packet: Packet = packet.into();
    send_bytes(shared, &packet, to, key);
}

fn send_bytes(shared: &Shared, datagram: &[u8], to: SocketAddr, key: Option<&NodePublic>) {
    if let Some(region) = relay_region(&to) {
        let relay = shared.relay.read().clone();
        match (relay, key) {
            (Some(r), Some(k)) if r.send(region, k, datagram) => bump(&shared.counters.relay_tx, 1),
            _ => bump(&shared.counters.relay_drops, 1),
        }
        return;
    }
    if let Err(e) = shared.udp.send_to(datagram, to) {
        bump(&shared.counters.udp_send_errors, 1);
        tracing::trace!(%to, error = %e, "udp send");
    }
}

/// Send a datagram to a peer on its current path; while that is the relay, now and then
/// also straight to its direct endpoint (a probe that moves both sides to the direct
/// path when it gets through).
/// `data`: the datagram carries an application's packet (not a keepalive or handshake).
fn send_to_peer(shared: &Shared, peer: &PeerState, packet: WgKind, data: bool) -> bool {
    let plan = peer.plan_send(Instant::now(), data);
    if matches!(packet, WgKind::HandshakeInit(_))
        && let Some(at) = *peer.reset_at.lock()
    {
        tracing::info!(
            peer = %peer.key.short(),
            after_reset_ms = at.elapsed().as_millis() as u64,
            to = ?plan.as_ref().map(|p| p.to),
            "handshake initiation for a new disco key"
        );
    }
    let Some(plan) = plan else {
        return false;
    };
    let packet: Packet = packet.into();
    if let Some(direct) = plan.probe {
        send_bytes(shared, &packet, direct, Some(&peer.key));
    }
    send_bytes(shared, &packet, plan.to, Some(&peer.key));
    true
}

/// Remember which peer a handshake we are about to send belongs to, so that the answer
/// (addressed to our index) finds it.
fn register_index(shared: &Shared, packet: &WgKind, peer: &Arc<PeerState>) {
    let idx = match packet {
        WgKind::HandshakeInit(p) => p.sender_idx.get(),
        WgKind::HandshakeResp(p) => p.sender_idx.get(),
        _ => return,
    };
    shared.by_index.lock().insert(idx, peer.clone());
}

/// TUN → WireGuard → UDP.
fn outbound(shared: &Shared) {
    let pool = PacketBufPool::<BUF_SIZE>::new(64);
    let mut mtu = MtuWatcher::new(shared.mtu);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut packet = pool.get();
        let n = match shared.tun.recv(&mut packet, TUN_WAIT) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "tun read failed; stopping outbound path");
                return;
            }
        };
        packet.truncate(n);
        if shared.standby.load(Ordering::Relaxed) {
            bump(&shared.counters.standby_dropped, 1);
            continue;
        }
        let Some((_, dst)) = ip_endpoints(&packet) else {
            bump(&shared.counters.tun_not_ip, 1);
            continue;
        };
        let table = shared.table.read().clone();
        let Some(peer) = table.route(dst) else {
            bump(&shared.counters.no_route, 1);
            continue;
        };
        if table.tracks_flows() {
            shared.flows.note_out(&packet, Instant::now());
        }
        if table.serves_exit() {
            // To a member: forwarded from the internet, or from this host itself.
            shared
                .exit_flows
                .lock()
                .note(&packet, false, Instant::now());
        }
        bump(&peer.counters.tx_packets, 1);
        bump(&peer.counters.tx_bytes, n);
        let out = peer
            .tunn
            .lock()
            .handle_outgoing_packet(packet, Some(&mut mtu));
        match out {
            Some(out) => {
                register_index(shared, &out, peer);
                if !send_to_peer(shared, peer, out, true) {
                    // No endpoint yet: the packet waits in the Tunn queue for the peer
                    // to call.
                    bump(&shared.counters.no_route, 1);
                }
            }
            // Queued until a handshake completes: still data the peer should get.
            None => peer.note_data(Instant::now()),
        }
    }
}

/// UDP → WireGuard → TUN.
fn inbound(shared: &Shared) {
    let pool = PacketBufPool::<BUF_SIZE>::new(64);
    let mut mtu = MtuWatcher::new(shared.mtu);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut buf = pool.get();
        let (n, from) = match shared.udp.recv(&mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                // ICMP errors (port unreachable from a peer that is down) surface here on
                // Linux; they are no reason to stop.
                tracing::trace!(error = %e, "udp recv");
                continue;
            }
        };
        buf.truncate(n);
        handle_datagram(shared, buf, from, None, &mut mtu);
    }
}

/// One datagram from the UDP socket (`relayed: None`) or from the relay (`relayed:
/// Some(sender)`, `from` then being the relay endpoint): WireGuard in, plaintext to the
/// TUN; STUN, disco and junk counted.
fn handle_datagram(
    shared: &Shared,
    buf: Packet,
    from: SocketAddr,
    relayed: Option<&NodePublic>,
    mtu: &mut MtuWatcher,
) {
    let kind = classify(&buf);
    if shared.standby.load(Ordering::Relaxed)
        && matches!(kind, DatagramKind::WireGuard | DatagramKind::Disco)
    {
        bump(&shared.counters.standby_dropped, 1);
        return;
    }
    match kind {
        DatagramKind::WireGuard => {}
        DatagramKind::Stun => {
            bump(&shared.counters.udp_stun, 1);
            if relayed.is_none()
                && let Some(sink) = shared.stun.read().clone()
            {
                sink(&buf, from);
            }
            return;
        }
        DatagramKind::Disco => {
            bump(&shared.counters.udp_disco, 1);
            handle_disco(shared, &buf, from, relayed);
            return;
        }
        _ => {
            bump(&shared.counters.udp_unknown, 1);
            return;
        }
    }
    let table = shared.table.read().clone();
    let kind = match table.local.rate_limiter.verify_packet(from, buf) {
        Ok(kind) => kind,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            send(shared, cookie, from, relayed);
            return;
        }
        Err(_) => {
            bump(&shared.counters.wg_rejected, 1);
            return;
        }
    };
    let peer = match &kind {
        WgKind::HandshakeInit(p) => {
            parse_handshake_anon(&table.local.private, &table.local.public, p)
                .ok()
                .and_then(|half| {
                    let key = NodePublic(PublicKey::from(half.peer_static_public).to_bytes());
                    table.get(&key).map(|e| e.state.clone())
                })
        }
        WgKind::HandshakeResp(p) => shared.by_index.lock().get(&p.receiver_idx.get()).cloned(),
        WgKind::CookieReply(p) => shared.by_index.lock().get(&p.receiver_idx.get()).cloned(),
        WgKind::Data(p) => shared
            .by_index
            .lock()
            .get(&p.header.receiver_idx.get())
            .cloned(),
    };
    let Some(peer) = peer else {
        bump(&shared.counters.wg_unknown_peer, 1);
        return;
    };
    let mut tunn = peer.tunn.lock();
    // Checked again under the peer's lock, which `Device::set_standby` takes after
    // setting the flag: nothing is answered once it returned.
    if shared.standby.load(Ordering::SeqCst) {
        bump(&shared.counters.standby_dropped, 1);
        return;
    }
    match tunn.handle_incoming_packet(kind) {
        TunnResult::Done => {}
        TunnResult::Err(e) => {
            bump(&shared.counters.wg_rejected, 1);
            tracing::trace!(peer = %peer.key.short(), error = ?e, "wireguard");
        }
        TunnResult::WriteToNetwork(reply) => {
            // A handshake completed or answered: the sender is authenticated.
            if let Some(at) = peer.reset_at.lock().take() {
                tracing::info!(
                    peer = %peer.key.short(),
                    after_reset_ms = at.elapsed().as_millis() as u64,
                    from = %from,
                    "WireGuard session with the host now behind the peer's identity"
                );
            }
            peer.set_endpoint(from);
            register_index(shared, &reply, &peer);
            send(shared, reply, from, Some(&peer.key));
            let queued: Vec<WgKind> = tunn.get_queued_packets(mtu).collect();
            drop(tunn);
            for p in queued {
                send(shared, p, from, Some(&peer.key));
            }
        }
        TunnResult::WriteToTunnel(plain) => {
            drop(tunn);
            peer.set_endpoint(from);
            if plain.is_empty() {
                return; // keepalive
            }
            // Deliver only what the peer may send (cryptokey routing), cut to the
            // length the IP header declares (WireGuard pads to 16 bytes).
            let mut plain = plain;
            let ends = ip_endpoints(&plain);
            let allowed = ends.is_some_and(|(src, _)| table.allows_source(&peer, src));
            match ip_declared_len(&plain) {
                Some(len) if allowed && (20..=plain.len()).contains(&len) => plain.truncate(len),
                _ => {
                    bump(&shared.counters.src_rejected, 1);
                    return;
                }
            }
            if let Verdict::Drop(why) = table.check_in(&plain, &shared.flows, Instant::now()) {
                bump(&shared.counters.filter_dropped, 1);
                if let Some(suppressed) = shared.filter_log.allow() {
                    tracing::debug!(peer = %peer.key.short(), ends = ?ends, suppressed, "packet filtered: {why}");
                }
                return;
            }
            bump(&peer.counters.rx_packets, 1);
            bump(&peer.counters.rx_bytes, plain.len());
            if ends.is_some_and(|(_, dst)| !is_tailnet_addr(dst)) {
                bump(&peer.counters.exit_rx_packets, 1);
            }
            if table.serves_exit() {
                // From a member: to be forwarded, or to this host (its DNS, PeerAPI).
                shared.exit_flows.lock().note(&plain, true, Instant::now());
            }
            if let Err(e) = shared.tun.send(&plain) {
                tracing::trace!(error = %e, "tun write");
            }
        }
    }
}

/// WireGuard's timers for every peer.
fn timers(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        shared
            .by_index
            .lock()
            .retain(|idx, _| shared.index_table.in_use(*idx));
        if shared.standby.load(Ordering::Relaxed) {
            // No keepalives, handshakes or disco pings: a standby host is silent.
            continue;
        }
        let table = shared.table.read().clone();
        let disco = shared.disco.read().clone();
        let endpoints = shared.endpoints.read().clone();
        let own = NodePublic(table.local.public.to_bytes());
        for entry in table.entries() {
            let peer = &entry.state;
            let out = peer.tunn.lock().update_timers();
            match out {
                Ok(Some(packet)) => {
                    register_index(shared, &packet, peer);
                    send_to_peer(shared, peer, packet, false);
                }
                Ok(None) => {}
                Err(e) => tracing::trace!(peer = %peer.key.short(), error = ?e, "timers"),
            }
            peer.check_path(Instant::now());
            if disco.is_some() {
                let due = peer.disco_poll(Instant::now(), own, &endpoints);
                send_disco(shared, peer, due);
            }
        }
    }
}

/// The box shared with `peer`'s disco key (made once per key pair).
fn peer_box(shared: &Shared, peer: &PeerState) -> Option<Arc<PeerBox>> {
    let own = shared.disco.read().clone()?;
    let key = peer.disco_key()?;
    let mut slot = peer.disco_box.lock();
    if let Some(b) = slot.as_ref()
        && b.peer() == &key
        && b.own() == &own.public()
    {
        return Some(b.clone());
    }
    let b = Arc::new(PeerBox::new(&own, &key));
    *slot = Some(b.clone());
    Some(b)
}

/// Seal and send disco messages to a peer.
fn send_disco(shared: &Shared, peer: &PeerState, msgs: Vec<DiscoSend>) {
    if msgs.is_empty() {
        return;
    }
    if let Some(b) = peer_box(shared, peer) {
        send_sealed(shared, peer, &b, msgs);
    }
}

/// Seal `msgs` with the peer's box `b` and send them.
fn send_sealed(shared: &Shared, peer: &PeerState, b: &PeerBox, msgs: Vec<DiscoSend>) {
    for m in msgs {
        tracing::trace!(peer = %peer.key.short(), to = %m.to, msg = ?m.msg, "disco send");
        send_bytes(shared, &b.seal(&m.msg), m.to, Some(&peer.key));
        bump(&shared.counters.disco_tx, 1);
    }
}

/// A disco datagram from `from` (over the relay from `relayed`): find the peer by its
/// disco key, open the box, act on the message. Anything else is counted and dropped.
fn handle_disco(shared: &Shared, datagram: &[u8], from: SocketAddr, relayed: Option<&NodePublic>) {
    let reject = |why: &dyn std::fmt::Display| {
        bump(&shared.counters.disco_rejected, 1);
        if let Some(suppressed) = shared.disco_log.allow() {
            tracing::debug!(%from, suppressed, "disco message refused: {why}");
        }
    };
    let Some(sender) = tsunagu_disco::sender(datagram) else {
        return reject(&"malformed header");
    };
    let table = shared.table.read().clone();
    let Some(entry) = table.by_disco(&sender) else {
        return reject(&"unknown disco key");
    };
    let peer = entry.state.clone();
    if relayed.is_some_and(|src| *src != peer.key) {
        return reject(&"relayed by another node than the key's");
    }
    let Some(b) = peer_box(shared, &peer) else {
        return reject(&"we do not speak disco");
    };
    let msg = match b.open(datagram) {
        Ok(m) => m,
        Err(e) => return reject(&e),
    };
    let now = Instant::now();
    let own = NodePublic(table.local.public.to_bytes());
    tracing::trace!(peer = %peer.key.short(), %from, ?msg, "disco recv");
    let out = match msg {
        Message::Ping { tx, node_key } => {
            if node_key.is_some_and(|k| k != peer.key) {
                return reject(&"ping names another node key");
            }
            peer.disco_on_ping(tx, from, now, own)
        }
        Message::Pong { tx, .. } => {
            peer.disco_on_pong(tx, from, now);
            Vec::new()
        }
        Message::CallMeMaybe { endpoints } => {
            if relayed.is_none() {
                return reject(&"CallMeMaybe not over the relay");
            }
            peer.disco_on_call_me_maybe(&endpoints, now, own)
        }
    };
    send_sealed(shared, &peer, &b, out);
}

/// Lets a log line through at most once per interval, and says how many were held back.
struct RateLog {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLog {
    fn new(every: Duration) -> Self {
        RateLog {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last one)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock();
        let now = Instant::now();
        if s.0.is_none_or(|t| now.duration_since(t) >= self.every) {
            let held = s.1;
            *s = (Some(now), 0);
            Some(held)
        } else {
            s.1 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_log_lets_one_line_per_interval_through_and_counts_the_rest() {
        let log = RateLog::new(Duration::from_millis(200));
        assert_eq!(log.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(log.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(220));
        assert_eq!(
            log.allow(),
            Some(1000),
            "the next line says how many were held back"
        );
        assert_eq!(log.allow(), None);
    }
}
