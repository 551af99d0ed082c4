//! The node's relay (DERP) connections: a thin tokio shell around
//! `tsunagu_derp::ClientConn`, one task per connection, and [`RelayPool`], which decides
//! with [`crate::regions::RegionConns`] which connections exist.
//!
//! ```text
//!  engine ─ RelayTx::send(region, peer, datagram) ─► RelayPool: home region? ─► home connection
//!                                                      other region ─► its connection,
//!                                                      opened on demand, closed when idle
//!  any connection ─ RecvPacket(src) ─► Device::receive_relayed(src, region, datagram)
//! ```
//!
//! The home connection lives as long as the pool (reconnecting with backoff); peers reach
//! us there. A connection to another region opens when the engine first sends to a peer
//! homed there and closes after `idle` without sends. Each connection has a bounded
//! queue (a full queue drops, like a full socket buffer); its TCP socket carries the
//! engine's bypass mark, so the relay is reached over the physical network whatever the
//! default route is.

use crate::regions::{Action, RegionConns, Route};
use anyhow::Context as _;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tsunagu_derp::{ClientConn, ClientEvent, ClientInfo};
use tsunagu_engine::device::RelayTx;
use tsunagu_engine::engine::Engine;
use tsunagu_proto::tailcfg::{DERPMap, DERPRegion};
use tsunagu_proto::{NodePrivate, NodePublic};

/// Datagrams waiting for a relay connection, at most.
const QUEUE: usize = 1024;

/// Where the relay of a region is, as the DERP map says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    pub region: u16,
    pub code: String,
    /// `host:port` to connect to.
    pub addr: String,
    /// The Host header.
    pub host: String,
    /// DERP over TLS (the login server is `https://`); the certificate must name
    /// `server_name` (the node's host name).
    pub tls: bool,
    pub server_name: String,
}

impl RelayTarget {
    /// The first node of `r` that relays. Plain HTTP when the login server is plain
    /// HTTP (the default port then is 80).
    fn of_region(r: &DERPRegion, https: bool) -> Option<RelayTarget> {
        let n = r.nodes.iter().find(|n| !n.stun_only)?;
        let region = u16::try_from(r.region_id).ok().filter(|r| *r > 0)?;
        let port = match n.derp_port {
            0 if https => 443,
            0 => 80,
            p => u16::try_from(p).ok()?,
        };
        let ip = [&n.ipv4, &n.ipv6]
            .into_iter()
            .find(|a| !a.is_empty() && a.as_str() != "none")
            .cloned();
        let host = n.host_name.clone();
        let connect_host = ip.unwrap_or_else(|| host.clone());
        let addr = if connect_host.contains(':') {
            format!("[{connect_host}]:{port}")
        } else {
            format!("{connect_host}:{port}")
        };
        let server_name = if host.is_empty() {
            connect_host
        } else {
            host.clone()
        };
        Some(RelayTarget {
            region,
            code: r.region_code.clone(),
            addr,
            host: format!("{host}:{port}"),
            tls: https,
            server_name,
        })
    }

    /// Every region of the map with a node that relays, by region ID.
    pub fn all(map: &DERPMap, login_server: &str) -> BTreeMap<u16, RelayTarget> {
        let https = login_server.starts_with("https://");
        map.regions
            .values()
            .filter_map(|r| RelayTarget::of_region(r, https))
            .map(|t| (t.region, t))
            .collect()
    }

    /// The home region among `targets`: the one `preferred` names (region ID or code)
    /// when there is one, else the lowest-numbered (the server lists its own first).
    pub fn home<'a>(
        targets: &'a BTreeMap<u16, RelayTarget>,
        preferred: Option<&str>,
    ) -> Option<&'a RelayTarget> {
        let chosen = preferred.and_then(|p| {
            targets.values().find(|t| {
                p.parse::<u16>().is_ok_and(|id| id == t.region) || t.code.eq_ignore_ascii_case(p)
            })
        });
        chosen.or_else(|| targets.values().next())
    }
}

/// The engine's side of one connection: a bounded queue to its task.
pub struct RelayLink {
    tx: mpsc::Sender<(NodePublic, Bytes)>,
    pub connected: AtomicBool,
}

impl RelayLink {
    fn send(&self, dst: &NodePublic, datagram: &[u8]) -> bool {
        self.tx
            .try_send((*dst, Bytes::copy_from_slice(datagram)))
            .is_ok()
    }
}

/// A running relay connection (ended when dropped).
pub struct Relay {
    pub target: RelayTarget,
    pub link: Arc<RelayLink>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every connection task needs (no strong reference to the pool: the pool owns
/// the tasks).
#[derive(Clone)]
struct Ctx {
    key: NodePrivate,
    /// See [`PoolConfig::host`].
    host: String,
    /// The engine's bypass mark for the TCP sockets (`None` in tests without root).
    fwmark: Option<u32>,
    engine: Arc<Mutex<Option<Engine>>>,
    pool: Weak<RelayPool>,
}

impl Relay {
    fn start(rt: &tokio::runtime::Handle, target: RelayTarget, home: bool, ctx: Ctx) -> Relay {
        let (tx, rx) = mpsc::channel(QUEUE);
        let link = Arc::new(RelayLink {
            tx,
            connected: AtomicBool::new(false),
        });
        let task = rt.spawn(run(target.clone(), home, ctx, rx, link.clone()));
        Relay { target, link, task }
    }
}

/// How the pool behaves (flags of the daemon).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// `--home-relay`: the home region by ID or code (default: the lowest-numbered).
    pub home: Option<String>,
    /// `--relay-idle-timeout`: how long a connection to a region other than home lives
    /// without sends.
    pub idle: Duration,
    /// Connections to regions other than home, at most.
    pub max: usize,
    /// Which host of our node key we are (our machine key), told to relays at login:
    /// the hosts of an exit node with standby hosts share its node key, and the relay
    /// delivers to the active one.
    pub host: String,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            home: None,
            idle: crate::regions::DEFAULT_IDLE,
            max: crate::regions::DEFAULT_MAX,
            host: String::new(),
        }
    }
}

/// One relay connection, for status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayConnStatus {
    pub region: u16,
    pub code: String,
    pub addr: String,
    pub home: bool,
    /// Logged in (the relay answered ServerInfo).
    pub connected: bool,
    /// Regions other than home: milliseconds until the connection closes unless data is
    /// sent there.
    pub closes_in_ms: Option<u64>,
}

struct PoolState {
    core: RegionConns,
    targets: BTreeMap<u16, RelayTarget>,
    home: Option<Relay>,
    others: BTreeMap<u16, Relay>,
}

/// All relay connections of the node: home, and others on demand. The engine holds it
/// as its [`RelayTx`].
pub struct RelayPool {
    state: parking_lot::Mutex<PoolState>,
    ctx: Ctx,
    rt: tokio::runtime::Handle,
    /// Wakes the janitor when a connection opens (it may be sleeping without deadline).
    wake: Arc<tokio::sync::Notify>,
    /// Closes idle connections; started once the pool exists (it holds a weak
    /// reference, which would not upgrade during construction).
    janitor: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
}

impl Drop for RelayPool {
    fn drop(&mut self) {
        if let Some(j) = self.janitor.get() {
            j.abort();
        }
    }
}

impl RelayPool {
    /// A pool without connections yet (see [`RelayPool::update`]); must be called
    /// within the tokio runtime.
    pub fn new(
        key: NodePrivate,
        fwmark: Option<u32>,
        engine: Arc<Mutex<Option<Engine>>>,
        cfg: &PoolConfig,
    ) -> Arc<RelayPool> {
        let rt = tokio::runtime::Handle::current();
        let wake = Arc::new(tokio::sync::Notify::new());
        let pool = Arc::new_cyclic(|me: &Weak<RelayPool>| RelayPool {
            state: parking_lot::Mutex::new(PoolState {
                core: RegionConns::new(cfg.idle, cfg.max),
                targets: BTreeMap::new(),
                home: None,
                others: BTreeMap::new(),
            }),
            ctx: Ctx {
                key,
                host: cfg.host.clone(),
                fwmark,
                engine,
                pool: me.clone(),
            },
            janitor: std::sync::OnceLock::new(),
            rt,
            wake,
        });
        let j = pool
            .rt
            .spawn(janitor(Arc::downgrade(&pool), pool.wake.clone()));
        let _ = pool.janitor.set(j);
        pool
    }

    /// The DERP map's regions and our home among them: (re)connect home when it
    /// changed, close what left the map. True when the home changed.
    pub fn update(&self, targets: BTreeMap<u16, RelayTarget>, home: Option<&RelayTarget>) -> bool {
        let mut st = self.state.lock();
        let changed = st.home.as_ref().map(|h| &h.target) != home;
        st.core
            .set_regions(home.map(|h| h.region), targets.keys().copied());
        st.targets = targets;
        // Regions that left the map, or became home, close.
        self.apply(&mut st);
        // A region whose relay moved: connect to the new place at once.
        let moved: Vec<RelayTarget> = st
            .others
            .iter()
            .filter_map(|(r, c)| st.targets.get(r).filter(|t| **t != c.target).cloned())
            .collect();
        for t in moved {
            tracing::info!(region = t.region, code = %t.code, relay = %t.addr, "the region's relay moved");
            let conn = Relay::start(&self.rt, t.clone(), false, self.ctx.clone());
            st.others.insert(t.region, conn);
        }
        if changed {
            st.home = home.map(|t| {
                tracing::info!(region = t.region, code = %t.code, relay = %t.addr, "home relay");
                Relay::start(&self.rt, t.clone(), true, self.ctx.clone())
            });
        }
        changed
    }

    /// Do what the core asks for.
    fn apply(&self, st: &mut PoolState) {
        while let Some(a) = st.core.poll_action() {
            match a {
                Action::Open(r) => {
                    let Some(t) = st.targets.get(&r) else {
                        continue;
                    };
                    tracing::info!(region = r, code = %t.code, relay = %t.addr, "opening a relay connection for peers homed there");
                    st.others.insert(
                        r,
                        Relay::start(&self.rt, t.clone(), false, self.ctx.clone()),
                    );
                    self.wake.notify_one();
                }
                Action::Close(r, why) => {
                    if let Some(c) = st.others.remove(&r) {
                        tracing::info!(region = r, code = %c.target.code, reason = why.as_str(), "relay connection closed");
                    }
                }
            }
        }
    }

    /// Close idle connections; the next deadline.
    fn tick(&self, now: Instant) -> Option<Instant> {
        let mut st = self.state.lock();
        st.core.handle_timeout(now);
        self.apply(&mut st);
        st.core.poll_timeout().map(|(t, _)| t)
    }

    fn heard(&self, src: &NodePublic, datagram: &[u8]) {
        self.state
            .lock()
            .core
            .on_receive(src, datagram, Instant::now());
    }

    /// The home region's target, if any.
    pub fn home(&self) -> Option<RelayTarget> {
        self.state.lock().home.as_ref().map(|h| h.target.clone())
    }

    /// Every connection: home first, then the others by region.
    pub fn connections(&self) -> Vec<RelayConnStatus> {
        let st = self.state.lock();
        let now = Instant::now();
        let status = |c: &Relay, closes_in_ms: Option<u64>| RelayConnStatus {
            region: c.target.region,
            code: c.target.code.clone(),
            addr: c.target.addr.clone(),
            home: closes_in_ms.is_none(),
            connected: c.link.connected.load(Ordering::Relaxed),
            closes_in_ms,
        };
        let mut out: Vec<RelayConnStatus> = st.home.iter().map(|h| status(h, None)).collect();
        for (r, until) in st.core.open() {
            if let Some(c) = st.others.get(&r) {
                let left = until.saturating_duration_since(now).as_millis();
                out.push(status(c, Some(u64::try_from(left).unwrap_or(u64::MAX))));
            }
        }
        out
    }

    /// Close every connection now (the engine may hold the pool a little longer).
    pub fn shutdown(&self) {
        let mut st = self.state.lock();
        st.home = None;
        st.others.clear();
        st.core.set_regions(None, []);
        while st.core.poll_action().is_some() {}
        st.targets.clear();
    }
}

impl RelayTx for RelayPool {
    fn send(&self, region: u16, dst: &NodePublic, datagram: &[u8]) -> bool {
        let mut st = self.state.lock();
        let route = st.core.on_send(region, dst, datagram, Instant::now());
        self.apply(&mut st);
        let conn = match route {
            Route::Home => st.home.as_ref(),
            Route::Region(r) => st.others.get(&r),
            Route::Drop(why) => {
                tracing::trace!(region, ?why, "relay send dropped");
                None
            }
        };
        conn.is_some_and(|c| c.link.send(dst, datagram))
    }
}

/// Closes idle connections when their time comes.
async fn janitor(pool: Weak<RelayPool>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let next = match pool.upgrade() {
            Some(p) => p.tick(Instant::now()),
            None => return,
        };
        match next {
            Some(at) => {
                let at = tokio::time::Instant::from_std(at);
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

async fn run(
    target: RelayTarget,
    home: bool,
    ctx: Ctx,
    mut rx: mpsc::Receiver<(NodePublic, Bytes)>,
    link: Arc<RelayLink>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let r = session(&target, home, &ctx, &mut rx, &link).await;
        link.connected.store(false, Ordering::Relaxed);
        match r {
            Ok(()) => tracing::info!(
                region = target.region,
                "relay connection closed by the relay"
            ),
            Err(e) => tracing::warn!(
                region = target.region,
                "relay: {e:#}; retrying in {backoff:?}"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        // What queued while we were away is stale: WireGuard retries by itself.
        while rx.try_recv().is_ok() {}
    }
}

async fn session(
    target: &RelayTarget,
    home: bool,
    ctx: &Ctx,
    rx: &mut mpsc::Receiver<(NodePublic, Bytes)>,
    link: &RelayLink,
) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(&target.addr)
        .await
        .with_context(|| format!("resolving {}", target.addr))?
        .next()
        .with_context(|| format!("no address for {}", target.addr))?;
    let ep = tsunagu_client::transport::Endpoint {
        tls: target.tls,
        host: target.host.clone(),
        server_name: target.server_name.clone(),
        addr,
    };
    let mut tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tsunagu_client::transport::connect(&ep, ctx.fwmark),
    )
    .await
    .with_context(|| format!("connecting to {addr}: timed out"))??;
    tcp.write_all(tsunagu_derp::client::upgrade_request(&target.host).as_bytes())
        .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let start = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .context("waiting for the upgrade: timed out")??;
        if n == 0 {
            anyhow::bail!("the relay closed the connection during the upgrade");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) =
            tsunagu_derp::client::parse_upgrade_response(&head).map_err(anyhow::Error::msg)?
        {
            break end;
        }
    };
    let info = ClientInfo {
        host: ctx.host.clone(),
        ..ClientInfo::default()
    };
    let mut conn = ClientConn::new(ctx.key.clone(), info);
    conn.handle_input(&head[start..])?;
    // Pings keep NAT state and idle proxies alive; the first one after 30 s, never
    // before the login (a frame before ClientInfo closes the connection).
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(30),
        Duration::from_secs(30),
    );
    loop {
        while let Some(ev) = conn.poll_event() {
            match ev {
                ClientEvent::Connected { .. } => {
                    link.connected.store(true, Ordering::Relaxed);
                    tracing::info!(region = target.region, code = %target.code, relay = %target.addr, home, "relay connected");
                    // As Tailscale clients do: the relay counts us as homed there.
                    if home {
                        conn.note_preferred(true);
                    }
                }
                ClientEvent::Packet { src, packet } => {
                    if let Some(pool) = ctx.pool.upgrade() {
                        pool.heard(&src, &packet);
                    }
                    if let Ok(g) = ctx.engine.lock()
                        && let Some(e) = g.as_ref()
                    {
                        e.device().receive_relayed(&src, target.region, &packet);
                    }
                }
                ClientEvent::Health(h) => {
                    tracing::warn!(region = target.region, "relay health: {h}")
                }
                ClientEvent::Restarting { .. } => anyhow::bail!("the relay is restarting"),
                _ => {}
            }
        }
        while let Some(out) = conn.poll_transmit() {
            tcp.write_all(&out).await?;
        }
        tokio::select! {
            n = tcp.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                conn.handle_input(&buf[..n])?;
            }
            // Datagrams wait in the queue until the login is done (a connection opened
            // for a send would otherwise lose that first datagram).
            Some((dst, d)) = rx.recv(), if conn.is_connected() => {
                if let Err(e) = conn.send_packet(dst, &d) {
                    tracing::debug!("relay send: {e}");
                }
            }
            _ = keepalive.tick() => {
                if conn.is_connected() {
                    conn.ping(*b"tsunagu!");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagu_proto::tailcfg::{DERPNode, DERPRegion};

    fn region(id: i32, code: &str, ip: &str, port: i32) -> DERPRegion {
        DERPRegion {
            region_id: id,
            region_code: code.into(),
            nodes: vec![DERPNode {
                region_id: id,
                host_name: ip.into(),
                ipv4: ip.into(),
                ipv6: "none".into(),
                derp_port: port,
                ..DERPNode::default()
            }],
            ..DERPRegion::default()
        }
    }

    #[test]
    fn regions_and_home_from_the_map() {
        let map = DERPMap::from_regions([
            region(901, "b", "198.51.100.7", 0),
            region(900, "tsunagu", "198.51.100.4", 8080),
        ]);
        let all = RelayTarget::all(&map, "http://198.51.100.4:8080");
        let t = &all[&900];
        assert_eq!((t.region, t.code.as_str()), (900, "tsunagu"));
        assert_eq!(t.addr, "198.51.100.4:8080");
        assert_eq!(
            all[&901].addr, "198.51.100.7:80",
            "plain HTTP: port 80 by default"
        );
        // Home: the lowest-numbered, unless one is preferred by ID or code.
        let home = |p: Option<&str>| RelayTarget::home(&all, p).map(|t| t.region);
        assert_eq!(home(None), Some(900));
        assert_eq!(home(Some("901")), Some(901));
        assert_eq!(home(Some("B")), Some(901));
        assert_eq!(home(Some("nowhere")), Some(900), "unknown: the default");
        assert!(RelayTarget::all(&DERPMap::default(), "http://x").is_empty());
        assert_eq!(RelayTarget::home(&BTreeMap::new(), None), None);
    }

    /// An in-process relay on loopback: its address, and the relay (to see its clients).
    async fn relay() -> (String, Arc<tsunagu_derp::Relay>) {
        let r = tsunagu_derp::Relay::new(NodePrivate::generate(), Default::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let router = r.router();
        tokio::spawn(async move { axum::serve(l, router).await });
        (addr, r)
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_region_connection_opens_on_send_and_closes_when_idle() {
        let (a, ra) = relay().await;
        let (b, rb) = relay().await;
        let target = |region, code: &str, addr: &str| RelayTarget {
            region,
            code: code.into(),
            addr: addr.into(),
            host: addr.into(),
            tls: false,
            server_name: String::new(),
        };
        let targets = BTreeMap::from([(900, target(900, "a", &a)), (901, target(901, "b", &b))]);
        let me = NodePrivate::generate();
        let cfg = PoolConfig {
            idle: Duration::from_millis(300),
            ..PoolConfig::default()
        };
        let pool = RelayPool::new(me.clone(), None, Arc::new(Mutex::new(None)), &cfg);
        assert!(pool.update(targets.clone(), targets.get(&900)));
        let has = |r: &tsunagu_derp::Relay| r.clients().iter().any(|c| c.key == me.public());
        wait_for("home connected", || has(&ra)).await;
        assert!(!has(&rb));
        // Data for a peer homed on 901: a connection there, queued until logged in.
        let peer = NodePrivate::generate().public();
        assert!(pool.send(901, &peer, &[0u8; 64]));
        wait_for("region b connected", || has(&rb)).await;
        let c = pool.connections();
        assert_eq!(c.len(), 2);
        assert_eq!((c[1].region, c[1].home), (901, false));
        // Idle: closed (the relay sees the client leave), home kept.
        wait_for("region b closed", || {
            !has(&rb) && pool.connections().len() == 1
        })
        .await;
        assert!(has(&ra));
        // A keepalive of an idle peer does not reopen it; unknown regions go nowhere.
        let mut keepalive = vec![0u8; 32];
        keepalive[0] = 4;
        assert!(!pool.send(901, &peer, &keepalive));
        assert!(!pool.send(999, &peer, &[0u8; 64]));
        assert_eq!(pool.connections().len(), 1);
        // Region 901's relay moves while a connection is open: it follows at once.
        let (c2, rc) = relay().await;
        assert!(pool.send(901, &peer, &[0u8; 64]));
        wait_for("region b connected again", || has(&rb)).await;
        let mut moved = targets.clone();
        moved.insert(901, target(901, "b", &c2));
        assert!(!pool.update(moved.clone(), moved.get(&900)));
        assert!(pool.send(901, &peer, &[0u8; 64]));
        wait_for("region b at its new place", || has(&rc) && !has(&rb)).await;
        // The home region moves to 901: the old home closes, 901 is home now.
        assert!(pool.update(targets.clone(), targets.get(&901)));
        wait_for("home moved", || has(&rb) && !has(&ra)).await;
        pool.shutdown();
        wait_for("all closed", || !has(&rb)).await;
        assert!(pool.connections().is_empty());
    }
}
