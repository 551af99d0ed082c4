//! The relay's tokio shell: the HTTP upgrade at `/derp`, one task per connection driving
//! a [`ServerConn`], the shared [`Registry`], the STUN socket, the key file, counters.
//!
//! ```text
//!  TCP/TLS ─ GET /derp, Upgrade: DERP ─► 101 ─► conn task: bytes ⇄ ServerConn
//!                                                  │ LoggedIn / Send / Preferred …
//!                                                  ▼
//!                                   Registry (one mutex, never held across .await)
//!                                                  │ offer (try_send, never waits)
//!                                                  ▼
//!                          other conn tasks' bounded queues ─► RecvPacket frames
//!  UDP ─ STUN ─► StunServer (validate, per-source bucket) ─► Binding Success
//! ```
//!
//! A connection task only ever waits on its own socket: a client that stops reading
//! fills its own queue (further packets to it are dropped and counted) and is closed
//! when a write has made no progress for [`WRITE_TIMEOUT`].

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::Serialize;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tsunagu_proto::{NodePrivate, NodePublic};

use crate::conn::{ConnConfig, ConnError, ConnEvent, Outgoing, ServerConn};
use crate::frame::{PROTOCOL_VERSION, PeerGoneReason};
use crate::limit::LogLimiter;
use crate::registry::{ClientSummary, ConnId, Offer, Outbox, Registry, SendOutcome};
use crate::stun::{StunOutcome, StunServer};

/// Messages a connection's queue holds before further ones are dropped (as Go's relay).
pub const QUEUE_DEPTH: usize = 32;
/// A write that makes no progress for this long closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The file in the data directory that holds the relay's private key.
pub const KEY_FILE: &str = "derp.key";

/// PeerPresent / PeerGone a mesh watcher may have pending (its initial flood lists
/// every client).
pub const WATCH_QUEUE_DEPTH: usize = 65_536;

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Pre-shared key of mesh peers (other relays of the region); `None`: no mesh.
    pub mesh_key: Option<String>,
    /// `http://HOST:PORT` of the other relays of the region, to watch and forward to
    /// (needs `mesh_key`).
    pub mesh_with: Vec<String>,
    pub queue_depth: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            mesh_key: None,
            mesh_with: Vec::new(),
            queue_depth: QUEUE_DEPTH,
        }
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub logins: AtomicU64,
    pub packets_forwarded: AtomicU64,
    pub bytes_forwarded: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_not_here: AtomicU64,
    pub dropped_gone: AtomicU64,
    pub closed_bad_input: AtomicU64,
    pub closed_write_timeout: AtomicU64,
    pub closed_login_timeout: AtomicU64,
    pub stun_requests: AtomicU64,
    pub stun_garbage: AtomicU64,
    pub stun_rate_limited: AtomicU64,
    pub mesh_links_up: AtomicU64,
}

impl Metrics {
    /// Count what became of a packet of `len` bytes handed to the registry.
    fn count_send(&self, outcome: SendOutcome, len: usize) {
        let c = match outcome {
            SendOutcome::Queued => {
                self.bytes_forwarded.fetch_add(len as u64, Relaxed);
                &self.packets_forwarded
            }
            SendOutcome::DroppedFull => &self.dropped_queue_full,
            SendOutcome::DroppedClosed => &self.dropped_gone,
            SendOutcome::NotHere => &self.dropped_not_here,
        };
        c.fetch_add(1, Relaxed);
    }
}

/// A copy of [`Metrics`] plus the number of connected clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    pub clients: u64,
    pub connections: u64,
    pub logins: u64,
    pub packets_forwarded: u64,
    pub bytes_forwarded: u64,
    pub dropped_queue_full: u64,
    pub dropped_not_here: u64,
    pub dropped_gone: u64,
    pub closed_bad_input: u64,
    pub closed_write_timeout: u64,
    pub closed_login_timeout: u64,
    pub stun_requests: u64,
    pub stun_garbage: u64,
    pub stun_rate_limited: u64,
    /// Mesh links currently up, and the other relays' clients known through them.
    pub mesh_links_up: u64,
    pub mesh_remote_clients: u64,
}

struct QueueOutbox(mpsc::Sender<Outgoing>);

impl Outbox for QueueOutbox {
    fn offer(&self, msg: Outgoing) -> Offer {
        match self.0.try_send(msg) {
            Ok(()) => Offer::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Offer::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Closed,
        }
    }
}

/// A DERP relay and STUN server.
pub struct Relay {
    cfg: Arc<ConnConfig>,
    queue_depth: usize,
    mesh_with: Vec<String>,
    registry: Mutex<Registry<QueueOutbox>>,
    stun: Mutex<StunServer>,
    metrics: Metrics,
    bad_input_log: Mutex<LogLimiter>,
    stun_log: Mutex<LogLimiter>,
}

/// How a connection ended.
enum End {
    ClientClosed,
    Replaced,
    Bad(ConnError),
    Io(io::Error),
    WriteTimeout,
}

impl Relay {
    pub fn new(key: NodePrivate, opts: RelayOptions) -> Arc<Relay> {
        let mut cfg = ConnConfig::new(key);
        cfg.mesh_key = opts.mesh_key.filter(|k| !k.is_empty());
        Arc::new(Relay {
            cfg: Arc::new(cfg),
            queue_depth: opts.queue_depth.max(1),
            mesh_with: opts.mesh_with,
            registry: Mutex::new(Registry::new()),
            stun: Mutex::new(StunServer::default()),
            metrics: Metrics::default(),
            bad_input_log: Mutex::new(LogLimiter::new(Duration::from_secs(10), 5)),
            stun_log: Mutex::new(LogLimiter::new(Duration::from_secs(10), 5)),
        })
    }

    pub fn public_key(&self) -> NodePublic {
        self.cfg.key.public()
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.metrics;
        // One lock for both counts (a second `lock()` in this expression would deadlock).
        let (clients, remotes) = {
            let r = self.registry.lock();
            (r.len() as u64, r.remote_count() as u64)
        };
        MetricsSnapshot {
            clients,
            connections: m.connections.load(Relaxed),
            logins: m.logins.load(Relaxed),
            packets_forwarded: m.packets_forwarded.load(Relaxed),
            bytes_forwarded: m.bytes_forwarded.load(Relaxed),
            dropped_queue_full: m.dropped_queue_full.load(Relaxed),
            dropped_not_here: m.dropped_not_here.load(Relaxed),
            dropped_gone: m.dropped_gone.load(Relaxed),
            closed_bad_input: m.closed_bad_input.load(Relaxed),
            closed_write_timeout: m.closed_write_timeout.load(Relaxed),
            closed_login_timeout: m.closed_login_timeout.load(Relaxed),
            stun_requests: m.stun_requests.load(Relaxed),
            stun_garbage: m.stun_garbage.load(Relaxed),
            stun_rate_limited: m.stun_rate_limited.load(Relaxed),
            mesh_links_up: m.mesh_links_up.load(Relaxed),
            mesh_remote_clients: remotes,
        }
    }

    /// Whether this relay can deliver to `key` (its client, or a meshed relay's).
    pub fn reachable(&self, key: &NodePublic) -> bool {
        self.registry.lock().reachable(key)
    }

    pub fn clients(&self) -> Vec<ClientSummary> {
        self.registry.lock().clients()
    }

    /// Which host of `key` gets its packets (hosts of an exit node with standby hosts;
    /// see [`crate::registry`]); `None` lets the newest connection have them.
    pub fn set_active_host(&self, key: NodePublic, host: Option<&str>) -> bool {
        self.registry
            .lock()
            .set_active_host(key, host.map(str::to_string))
    }

    /// Whether `host` has a connection with `key` here.
    pub fn host_connected(&self, key: &NodePublic, host: &str) -> bool {
        self.registry.lock().host_connected(key, host)
    }

    /// Closes the connections of `host` with `key` (a host that was revoked).
    pub fn close_host(&self, key: &NodePublic, host: &str) -> bool {
        self.registry.lock().close_host(key, host)
    }

    /// Runs one DERP connection (after the HTTP upgrade) until it ends.
    pub async fn serve_conn<S>(self: Arc<Self>, io: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        self.metrics.connections.fetch_add(1, Relaxed);
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut conn = ServerConn::new(self.cfg.clone(), Instant::now());
        let (tx, mut rx) = mpsc::channel::<Outgoing>(self.queue_depth);
        let id = self.registry.lock().new_conn_id();
        let mut me: Option<NodePublic> = None;
        let mut watch: Option<mpsc::Receiver<Outgoing>> = None;
        let mut buf = vec![0u8; 64 * 1024];
        let mut closing = false;
        let end = 'conn: loop {
            while let Some(ev) = conn.poll_event() {
                if ev == ConnEvent::WatchConns {
                    // Watchers get a deep queue of their own: the first batch lists
                    // every client at once.
                    let (wtx, wrx) = mpsc::channel(WATCH_QUEUE_DEPTH);
                    self.registry.lock().add_watcher(id, QueueOutbox(wtx));
                    watch = Some(wrx);
                    continue;
                }
                self.on_event(ev, id, &tx, &mut me, &mut conn);
            }
            while let Some(bytes) = conn.poll_transmit() {
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break 'conn End::Io(e),
                    Err(_) => break 'conn End::WriteTimeout,
                }
            }
            if closing {
                break End::Replaced;
            }
            let deadline = conn
                .poll_timeout()
                .map_or_else(|| Instant::now() + Duration::from_secs(3600), |(t, _)| t);
            tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) => break match conn.handle_eof() {
                        Ok(()) => End::ClientClosed,
                        Err(e) => End::Bad(e),
                    },
                    Ok(n) => {
                        if let Err(e) = conn.handle_input(&buf[..n], Instant::now()) {
                            break End::Bad(e);
                        }
                    }
                    Err(e) => break End::Io(e),
                },
                msg = rx.recv(), if me.is_some() => {
                    let mut next = msg;
                    for _ in 0..64 {
                        match next {
                            Some(Outgoing::Close) | None => {
                                closing = true;
                                break;
                            }
                            Some(m) => conn.queue(m),
                        }
                        next = match rx.try_recv() {
                            Ok(m) => Some(m),
                            Err(_) => break,
                        };
                    }
                }
                Some(m) = recv_opt(&mut watch), if watch.is_some() => {
                    conn.queue(m);
                    if let Some(w) = watch.as_mut() {
                        for _ in 0..256 {
                            match w.try_recv() {
                                Ok(m) => conn.queue(m),
                                Err(_) => break,
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if let Err(e) = conn.handle_timeout(Instant::now()) {
                        break End::Bad(e);
                    }
                }
            }
        };
        if let Some(key) = me {
            self.registry.lock().unregister(key, id);
            tracing::info!(key = %key.tailscale(), %peer, "derp client disconnected");
        }
        match end {
            End::ClientClosed | End::Replaced => {}
            End::Io(e) => tracing::debug!(%peer, "derp connection: {e}"),
            End::WriteTimeout => {
                self.metrics.closed_write_timeout.fetch_add(1, Relaxed);
                tracing::debug!(%peer, "derp connection closed: a write stalled for {WRITE_TIMEOUT:?}");
            }
            End::Bad(e) if !e.is_bad_input() => {
                self.metrics.closed_login_timeout.fetch_add(1, Relaxed);
                tracing::debug!(%peer, "derp connection closed: {e}");
            }
            End::Bad(e) => {
                self.metrics.closed_bad_input.fetch_add(1, Relaxed);
                if let Some(held) = self.bad_input_log.lock().allow(Instant::now()) {
                    tracing::warn!(%peer, key = ?me.map(|k| k.tailscale()), suppressed = held, "derp connection closed on bad input: {e}");
                }
            }
        }
    }

    fn on_event(
        &self,
        ev: ConnEvent,
        id: ConnId,
        tx: &mpsc::Sender<Outgoing>,
        me: &mut Option<NodePublic>,
        conn: &mut ServerConn,
    ) {
        let m = &self.metrics;
        match ev {
            ConnEvent::LoggedIn { key, info, mesh } => {
                let host = (!info.host.is_empty()).then(|| info.host.clone());
                self.registry
                    .lock()
                    .register_host(key, id, QueueOutbox(tx.clone()), host);
                *me = Some(key);
                m.logins.fetch_add(1, Relaxed);
                tracing::info!(key = %key.tailscale(), version = info.version, mesh, host = %info.host, "derp client connected");
            }
            ConnEvent::Send { dst, packet } => {
                let Some(src) = *me else { return };
                let len = packet.len();
                let (outcome, new_pair) =
                    self.registry.lock().send_noting_new_pair(src, dst, packet);
                if new_pair {
                    tracing::info!(src = %src.tailscale(), dst = %dst.tailscale(), "derp relaying between peers");
                }
                m.count_send(outcome, len);
                if outcome == SendOutcome::NotHere {
                    conn.queue(Outgoing::PeerGone {
                        key: dst,
                        reason: PeerGoneReason::NotHere,
                    });
                }
            }
            ConnEvent::Forward { src, dst, packet } => {
                let len = packet.len();
                let outcome = self.registry.lock().forward(src, dst, packet);
                m.count_send(outcome, len);
            }
            ConnEvent::Preferred(p) => {
                if let Some(key) = *me {
                    self.registry.lock().set_preferred(key, id, p);
                    tracing::debug!(key = %key.tailscale(), preferred = p, "derp home relay noted");
                }
            }
            // Handled by `serve_conn`, which owns the watcher's queue.
            ConnEvent::WatchConns => {}
            ConnEvent::ClosePeer(k) => {
                self.registry.lock().close_peer(k);
            }
        }
    }

    /// `/derp` (the upgrade), `/derp/probe` and `/derp/latency-check`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/derp", get(derp_upgrade))
            .route("/derp/probe", get(probe).head(probe))
            .route("/derp/latency-check", get(probe).head(probe))
            .with_state(self.clone())
    }

    /// [`Relay::serve_stun`] as a task of its own, logging why it stopped.
    pub fn spawn_stun(self: Arc<Self>, socket: UdpSocket) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if let Err(e) = self.serve_stun(socket).await {
                tracing::error!("STUN server stopped: {e}");
            }
        })
    }

    /// Answers STUN binding requests on `socket` until it fails.
    pub async fn serve_stun(self: Arc<Self>, socket: UdpSocket) -> io::Result<()> {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, src) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                // ICMP errors from earlier sends surface here on Linux; not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            let seen = SocketAddr::new(src.ip().to_canonical(), src.port());
            let outcome = self.stun.lock().handle(seen, &buf[..n], Instant::now());
            match outcome {
                StunOutcome::Reply(resp) => {
                    self.metrics.stun_requests.fetch_add(1, Relaxed);
                    if let Err(e) = socket.send_to(&resp, src).await {
                        tracing::debug!(%src, "STUN reply: {e}");
                    }
                }
                StunOutcome::Garbage(e) => {
                    self.metrics.stun_garbage.fetch_add(1, Relaxed);
                    if let Some(held) = self.stun_log.lock().allow(Instant::now()) {
                        tracing::debug!(%src, suppressed = held, "STUN datagram dropped: {e}");
                    }
                }
                StunOutcome::RateLimited => {
                    self.metrics.stun_rate_limited.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<Outgoing>>) -> Option<Outgoing> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `http://HOST:PORT[/…]` → (`HOST:PORT` for the Host header and to dial).
fn mesh_target(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("mesh peer {url:?}: only http:// URLs are supported"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("mesh peer {url:?} has no host"));
    }
    Ok(
        if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        },
    )
}

impl Relay {
    /// Starts one link per `mesh_with` peer: each logs in with the mesh key, watches
    /// that relay's clients and carries ForwardPackets to them; it reconnects by itself
    /// (backing off from 1 s to 30 s) when the peer restarts.
    pub fn start_mesh(self: &Arc<Self>) {
        if self.cfg.mesh_key.is_none() {
            if !self.mesh_with.is_empty() {
                tracing::warn!("mesh peers given without a mesh key: not meshing");
            }
            return;
        }
        for url in self.mesh_with.clone() {
            let relay = self.clone();
            tokio::spawn(async move {
                let mut backoff = Duration::from_secs(1);
                loop {
                    match relay.clone().mesh_link(&url).await {
                        Ok(()) => backoff = Duration::from_secs(1),
                        Err(e) => tracing::debug!(peer = %url, "mesh link: {e}"),
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            });
        }
    }

    /// One mesh link to `url` until it fails. `Ok` when it was up and then ended.
    async fn mesh_link(self: Arc<Self>, url: &str) -> Result<(), String> {
        use crate::client::{ClientConn, ClientEvent, parse_upgrade_response, upgrade_request};
        let target = mesh_target(url)?;
        let mut tcp = tokio::net::TcpStream::connect(&target)
            .await
            .map_err(|e| format!("connecting to {target}: {e}"))?;
        tcp.write_all(upgrade_request(&target).as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let info = crate::ClientInfo {
            version: PROTOCOL_VERSION,
            mesh_key: self.cfg.mesh_key.clone().unwrap_or_default(),
            can_ack_pings: true,
            is_prober: false,
            host: String::new(),
        };
        let mut conn = ClientConn::new(self.cfg.key.clone(), info);
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        // The upgrade and the login, bounded by the login timeout.
        let login = async {
            loop {
                let n = tcp.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed during the upgrade".to_string());
                }
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = parse_upgrade_response(&head)? {
                    conn.handle_input(&head[end..]).map_err(|e| e.to_string())?;
                    break;
                }
            }
            loop {
                while let Some(b) = conn.poll_transmit() {
                    tcp.write_all(&b).await.map_err(|e| e.to_string())?;
                }
                if conn.is_connected() {
                    return Ok(());
                }
                let n = tcp.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed during the login".to_string());
                }
                conn.handle_input(&buf[..n]).map_err(|e| e.to_string())?;
            }
        };
        tokio::time::timeout(self.cfg.login_timeout, login)
            .await
            .map_err(|_| "login timed out".to_string())??;
        conn.watch_conns();
        let (tx, mut rx) = mpsc::channel::<Outgoing>(self.queue_depth * 8);
        let link = self.registry.lock().add_link(QueueOutbox(tx));
        self.metrics.mesh_links_up.fetch_add(1, Relaxed);
        tracing::info!(peer = %url, "mesh link up");
        let result: Result<(), String> = async {
            loop {
                while let Some(ev) = conn.poll_event() {
                    match ev {
                        ClientEvent::PeerPresent(k) => self.registry.lock().set_remote(k, link),
                        ClientEvent::PeerGone { key, .. } => {
                            self.registry.lock().clear_remote(key, link)
                        }
                        _ => {}
                    }
                }
                while let Some(b) = conn.poll_transmit() {
                    tokio::time::timeout(WRITE_TIMEOUT, tcp.write_all(&b))
                        .await
                        .map_err(|_| "write stalled".to_string())?
                        .map_err(|e| e.to_string())?;
                }
                tokio::select! {
                    r = tcp.read(&mut buf) => {
                        let n = r.map_err(|e| e.to_string())?;
                        if n == 0 {
                            return Ok(());
                        }
                        conn.handle_input(&buf[..n]).map_err(|e| e.to_string())?;
                    }
                    Some(m) = rx.recv() => {
                        if let Outgoing::Forward { src, dst, packet } = m {
                            conn.forward_packet(src, dst, &packet).map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
        }
        .await;
        self.registry.lock().drop_link(link);
        self.metrics.mesh_links_up.fetch_sub(1, Relaxed);
        tracing::info!(peer = %url, "mesh link down");
        result
    }
}

async fn probe() -> Response {
    ([(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], "").into_response()
}

async fn derp_upgrade(State(relay): State<Arc<Relay>>, mut req: Request<Body>) -> Response {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    if upgrade.as_deref() != Some("derp") {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "DERP requires connection upgrade (Upgrade: DERP)\n",
        )
            .into_response();
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "this connection cannot be upgraded\n",
        )
            .into_response();
    };
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let public = relay.public_key();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => relay.serve_conn(TokioIo::new(upgraded), peer).await,
            Err(e) => tracing::debug!("derp upgrade failed: {e}"),
        }
    });
    let hex: String = public.0.iter().map(|b| format!("{b:02x}")).collect();
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, header::HeaderValue::from_static("DERP"));
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    h.insert("Derp-Version", PROTOCOL_VERSION.into());
    if let Ok(v) = header::HeaderValue::from_str(&hex) {
        h.insert("Derp-Public-Key", v);
    }
    resp
}

/// Loads the relay's private key from `path`, or creates it (mode 0600) on first start.
pub fn load_or_create_key(path: &Path) -> io::Result<NodePrivate> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let key = NodePrivate::generate();
            let tmp = path.with_extension("tmp");
            {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                writeln!(f, "{}", key.to_base64())?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, path)?;
            tracing::info!(path = %path.display(), public = %key.public().tailscale(), "created the relay's DERP key");
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_key_is_created_once_owner_only_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(KEY_FILE);
        let a = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_key(&path).unwrap();
        assert_eq!(a.public(), b.public());
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(load_or_create_key(&path).is_err());
    }
}
