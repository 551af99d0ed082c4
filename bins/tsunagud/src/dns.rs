//! DNS on the node: the resolver at 100.100.100.100 (MagicDNS, forwarding), the
//! PeerAPI's DNS-over-HTTPS endpoint for the peers that use this node as exit node, and
//! the OS's resolver configuration. The decisions are `tsunagu_dns`'s (pure); this is
//! the I/O around them.
//!
//! ```text
//!  app ─► /etc/resolv.conf: nameserver 100.100.100.100 (on the tun, scope host)
//!         ─► [resolver] UDP/TCP :53 ─► MagicDNS name or extra record? answer
//!                                   └► plan: exit node's DoH (over the tunnel), the
//!                                      tailnet's resolvers, the OS's own, or SERVFAIL
//!  peer ─► http://<our tailnet IP>:<peerapi port>/dns-query (exit nodes only)
//!         ─► may it use us as exit node? (403 otherwise) ─► checked query ─► our own
//!            resolvers (the resolv.conf we found) ─► answer, or SERVFAIL after 5 s
//! ```
//!
//! The OS's `resolv.conf` is saved to `<state-dir>/resolv.conf.orig` before ours is
//! written, and written back byte for byte on `down`, logout and stop; a start after a
//! crash finds our file and the saved one and puts the original back first
//! ([`repair`]). With systemd-resolved (the file is its symlink), `resolvectl` gives the
//! tun our resolver and the `~.` routing domain instead, and `revert` undoes it.

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tsunagu_dns::magic::Zone;
use tsunagu_dns::message::{self, Query};
use tsunagu_dns::plan::{ExitUse, Plan, Route, Upstream};
use tsunagu_dns::resolvconf::{self, Nameserver};
use tsunagu_proto::tailcfg::DNSConfig;

/// The file the OS's resolver reads.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// The saved original, in the state directory.
const BACKUP: &str = "resolv.conf.orig";
/// One upstream attempt (UDP, TCP or DoH).
const UPSTREAM_TRY: Duration = Duration::from_secs(2);
/// A query's whole time upstream; then SERVFAIL (clients retry after 5 s by default).
const QUERY_DEADLINE: Duration = Duration::from_millis(4500);
/// The PeerAPI's answer deadline, as Go's exit nodes.
const PEERAPI_DEADLINE: Duration = Duration::from_secs(5);
/// Queries in flight at the resolver (UDP) and TCP connections to it.
const RESOLVER_INFLIGHT: usize = 256;
const RESOLVER_TCP_CONNS: usize = 64;
/// Queries in flight per peer at the PeerAPI; more get 429.
pub const PEERAPI_PER_PEER: usize = 32;
/// Connections one peer may hold open to the PeerAPI; more are closed at once.
pub const PEERAPI_CONNS_PER_PEER: usize = 32;
/// A connection that has not sent a whole request header within this time (a new one,
/// or a kept-alive one between requests) is closed. Go clients keep idle connections
/// longer (90 s) but retry a request that found its connection closed.
const PEERAPI_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// One request, body included, from its header on; then 408.
const PEERAPI_REQUEST_TIMEOUT: Duration = Duration::from_secs(7);
/// The PeerAPI's read buffer, which bounds a request header (hyper's smallest).
const PEERAPI_MAX_BUF: usize = 8192;
/// DoH requests in flight from our resolver (below [`PEERAPI_CONNS_PER_PEER`], so that
/// a burst of queries queues here instead of being refused by the exit node).
const DOH_INFLIGHT: usize = 16;
/// A DoH request that failed this fast (a reset pooled connection, not a dead exit
/// node) is sent once more.
const DOH_RETRY_WITHIN: Duration = Duration::from_millis(500);
/// How long an idle TCP connection to the resolver stays open.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What the DNS side takes from a map.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub cfg: DNSConfig,
    /// MagicDNS domain (the suffix of our own name), when MagicDNS is on.
    pub domain: Option<String>,
    /// Every node (us included): FQDN and addresses.
    pub nodes: Vec<(String, Vec<IpAddr>)>,
    pub exit: ExitUse,
    /// Our tailnet addresses (the PeerAPI listens there).
    pub addresses: Vec<IpAddr>,
    /// Peers' addresses that may use us as exit node (empty unless we serve as one).
    pub exit_clients: BTreeSet<IpAddr>,
    pub accept_dns: bool,
}

struct View {
    zone: Zone,
    plan: Plan,
}

/// Where the OS configuration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Installed {
    No,
    File,
    Resolved,
}

struct Inner {
    resolver: Vec<tokio::task::JoinHandle<()>>,
    peerapi: BTreeMap<IpAddr, tokio::task::JoinHandle<()>>,
    installed: Installed,
    tun: String,
}

/// The node's DNS: resolver, PeerAPI DoH, OS configuration.
pub struct Dns {
    rt: tokio::runtime::Handle,
    state_dir: PathBuf,
    view: Arc<RwLock<View>>,
    doh: Arc<DohClient>,
    peerapi: Arc<PeerApi>,
    /// The PeerAPI's port (stable: derived from the node key, see [`peerapi_port`]).
    port: std::sync::atomic::AtomicU16,
    inner: Mutex<Inner>,
}

/// The PeerAPI's port for a node key: in 32768-65535, the same at every start (the
/// node key persists), so peers' maps stay right across restarts.
pub fn peerapi_port(node_key: &[u8; 32]) -> u16 {
    // FNV-1a: any stable spread will do.
    let mut h: u32 = 0x811c_9dc5;
    for b in node_key {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    0x8000 | (h as u16 & 0x7fff)
}

impl Dns {
    pub fn new(rt: tokio::runtime::Handle, state_dir: &Path, tun: &str, port: u16) -> Dns {
        Dns {
            rt,
            state_dir: state_dir.to_path_buf(),
            view: Arc::new(RwLock::new(View {
                zone: Zone::default(),
                plan: Plan {
                    default: Route::NoUpstream,
                    routes: Vec::new(),
                },
            })),
            doh: Arc::new(DohClient::new()),
            peerapi: Arc::new(PeerApi::default()),
            port: std::sync::atomic::AtomicU16::new(port),
            inner: Mutex::new(Inner {
                resolver: Vec::new(),
                peerapi: BTreeMap::new(),
                installed: Installed::No,
                tun: tun.to_string(),
            }),
        }
    }

    fn backup_path(&self) -> PathBuf {
        self.state_dir.join(BACKUP)
    }

    /// The PeerAPI's port.
    pub fn port(&self) -> u16 {
        self.port.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A new node key (a standby host given the exit node's identity) means a new port:
    /// the one every host of that identity derives from it, so that peers' maps stay
    /// right whichever host serves. The listeners move at the next map.
    pub fn set_port(&self, port: u16) {
        let old = self.port.swap(port, std::sync::atomic::Ordering::Relaxed);
        if old != port {
            for (_, t) in std::mem::take(&mut self.inner.lock().peerapi) {
                t.abort();
            }
            tracing::info!(port, "peerapi: port of the new node key");
        }
    }

    /// The OS's own resolvers: from the saved original while ours is installed.
    fn os_resolvers(&self) -> Vec<Nameserver> {
        os_resolvers(&self.backup_path())
    }

    /// Follow a new map (called after the engine applied it, so our addresses are on
    /// the tun).
    pub fn update(&self, i: &Inputs) {
        let zone = Zone::new(
            i.domain.as_deref(),
            i.nodes.iter().map(|(n, a)| (n.as_str(), a.clone())),
            &i.cfg.extra_records,
        );
        let plan = tsunagu_dns::plan::plan(&i.cfg, &i.exit, &self.os_resolvers());
        *self.view.write() = View { zone, plan };
        *self.peerapi.allowed.write() = i.exit_clients.clone();
        let mut inner = self.inner.lock();
        if inner.resolver.is_empty() {
            match self.start_resolver() {
                Ok(tasks) => inner.resolver = tasks,
                Err(e) => tracing::warn!("DNS resolver on 100.100.100.100:53: {e}"),
            }
        }
        // PeerAPI listeners: one per tailnet address.
        let want: BTreeSet<IpAddr> = i.addresses.iter().copied().collect();
        inner.peerapi.retain(|ip, task| {
            let keep = want.contains(ip) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for ip in want {
            if inner.peerapi.contains_key(&ip) {
                continue;
            }
            match self.start_peerapi(ip) {
                Ok(task) => {
                    tracing::info!(url = %format!("http://{}", SocketAddr::new(ip, self.port())), "peerapi: serving");
                    inner.peerapi.insert(ip, task);
                }
                Err(e) => tracing::warn!(%ip, port = self.port(), "peerapi: {e}"),
            }
        }
        let search: Vec<String> = i.cfg.domains.clone();
        let installed = inner.installed;
        let tun = inner.tun.clone();
        inner.installed = match (i.accept_dns, installed) {
            (true, _) => match install(&self.backup_path(), &tun, &search) {
                Ok(how) => how,
                Err(e) => {
                    tracing::error!("installing DNS into the OS: {e}");
                    installed
                }
            },
            (false, Installed::No) => Installed::No,
            (false, _) => {
                restore(&self.backup_path(), &tun);
                Installed::No
            }
        };
        if installed == Installed::No && inner.installed != Installed::No {
            tracing::info!(search = ?search, "DNS: the OS resolves through 100.100.100.100");
        }
    }

    /// Stop serving and put the OS's configuration back (`down`, logout, stop).
    pub fn stop(&self) {
        let mut inner = self.inner.lock();
        for t in inner.resolver.drain(..) {
            t.abort();
        }
        for (_, t) in std::mem::take(&mut inner.peerapi) {
            t.abort();
        }
        if inner.installed != Installed::No {
            restore(&self.backup_path(), &inner.tun);
            inner.installed = Installed::No;
            tracing::info!("DNS: the OS configuration is restored");
        }
    }

    fn start_resolver(&self) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
        let addr = SocketAddr::new(IpAddr::V4(tsunagu_dns::SERVICE_IPV4), 53);
        let _guard = self.rt.enter();
        let udp = std::net::UdpSocket::bind(addr)?;
        udp.set_nonblocking(true)?;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp = std::net::TcpListener::bind(addr)?;
        tcp.set_nonblocking(true)?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let ctx = Arc::new(Ctx {
            view: self.view.clone(),
            doh: self.doh.clone(),
        });
        let a = self.rt.spawn(serve_udp(udp, ctx.clone()));
        let b = self.rt.spawn(serve_tcp(tcp, ctx));
        tracing::info!("DNS resolver listening on 100.100.100.100:53");
        Ok(vec![a, b])
    }

    fn start_peerapi(&self, ip: IpAddr) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let _guard = self.rt.enter();
        let l = std::net::TcpListener::bind(SocketAddr::new(ip, self.port()))?;
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        let state = PeerApiState {
            api: self.peerapi.clone(),
            backup: self.backup_path(),
            doh: Arc::new(DohClient::new()),
        };
        let app = axum::Router::new()
            .route("/dns-query", axum::routing::any(doh_handler))
            .fallback(|| async { (StatusCode::NOT_FOUND, "unsupported peerapi path\n") })
            .layer(axum::extract::DefaultBodyLimit::max(
                tsunagu_dns::doh::MAX_BODY,
            ))
            .layer(axum::middleware::from_fn(request_deadline))
            .with_state(state);
        Ok(self.rt.spawn(serve_peerapi(l, app, self.peerapi.clone())))
    }
}

/// The OS's resolvers: the saved original if we replaced the file, else the file.
fn os_resolvers(backup: &Path) -> Vec<Nameserver> {
    let text = std::fs::read_to_string(backup)
        .or_else(|_| std::fs::read_to_string(RESOLV_CONF))
        .unwrap_or_default();
    if resolvconf::is_ours(&text) {
        return Vec::new();
    }
    resolvconf::parse(&text).nameservers
}

fn resolved_in_charge() -> bool {
    std::fs::read_link(RESOLV_CONF).is_ok_and(|t| t.to_string_lossy().contains("systemd/resolve"))
        && Path::new("/run/systemd/resolve").is_dir()
}

fn resolvectl(args: &[&str]) -> std::io::Result<()> {
    let out = std::process::Command::new("resolvectl")
        .args(args)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "resolvectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Point the OS at 100.100.100.100 (saving the original first).
fn install(backup: &Path, tun: &str, search: &[String]) -> std::io::Result<Installed> {
    if resolved_in_charge() {
        resolvectl(&["dns", tun, "100.100.100.100"])?;
        let mut args = vec!["domain", tun, "~."];
        args.extend(search.iter().map(String::as_str));
        resolvectl(&args)?;
        return Ok(Installed::Resolved);
    }
    let current = std::fs::read(RESOLV_CONF).unwrap_or_default();
    let ours = resolvconf::render(IpAddr::V4(tsunagu_dns::SERVICE_IPV4), search);
    if !resolvconf::is_ours(&String::from_utf8_lossy(&current)) {
        // Save the original byte for byte (mode 0600) before touching the file.
        crate::api::write_private(backup, &current).map_err(std::io::Error::other)?;
    }
    if current != ours.as_bytes() {
        write_in_place(Path::new(RESOLV_CONF), ours.as_bytes())?;
    }
    Ok(Installed::File)
}

/// Written in place, not renamed: in a network namespace (and in containers) the file
/// is a bind mount, which cannot be replaced.
fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Put the saved original back, if the file is still ours; forget the copy.
fn restore(backup: &Path, tun: &str) {
    if resolved_in_charge() {
        if let Err(e) = resolvectl(&["revert", tun]) {
            tracing::debug!("{e}");
        }
        return;
    }
    let Ok(saved) = std::fs::read(backup) else {
        return;
    };
    let current = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    if resolvconf::is_ours(&current) {
        if let Err(e) = write_in_place(Path::new(RESOLV_CONF), &saved) {
            tracing::error!("restoring {RESOLV_CONF}: {e}");
            return;
        }
    } else {
        tracing::warn!("{RESOLV_CONF} was replaced by someone else; leaving it");
    }
    let _ = std::fs::remove_file(backup);
}

/// At start: a crashed run may have left our `resolv.conf`; put the original back.
pub fn repair(state_dir: &Path) {
    let backup = state_dir.join(BACKUP);
    if backup.exists() {
        tracing::info!("restoring {RESOLV_CONF} left by a previous run");
        restore(&backup, "");
    }
}

struct Ctx {
    view: Arc<RwLock<View>>,
    doh: Arc<DohClient>,
}

/// Answer one query: ours, forwarded, or SERVFAIL. `None` for bytes that are no query.
async fn resolve(ctx: &Ctx, bytes: &[u8]) -> Option<Vec<u8>> {
    let q = message::parse_query(bytes).ok()?;
    let route = {
        let view = ctx.view.read();
        if let Some(a) = view.zone.answer(&q) {
            return Some(a);
        }
        view.plan.route(&q.name).clone()
    };
    let list = match route {
        Route::Forward(list) => list,
        Route::FailClosed | Route::NoUpstream => return Some(message::servfail(&q)),
    };
    match tokio::time::timeout(QUERY_DEADLINE, forward(&q, &list, &ctx.doh)).await {
        Ok(Some(a)) => Some(a),
        _ => Some(message::servfail(&q)),
    }
}

/// Ask each upstream in turn; the first valid answer wins.
async fn forward(q: &Query, list: &[Upstream], doh: &DohClient) -> Option<Vec<u8>> {
    for u in list {
        let got = match u {
            Upstream::Dns { addr, zone } => dns_query(q, *addr, zone.as_deref()).await,
            Upstream::Doh(url) => doh.query(url, &q.bytes).await,
        };
        match got {
            Ok(a) if message::check_answer(q, &a).is_ok() => return Some(a),
            Ok(_) => tracing::debug!(upstream = ?u, "an answer that does not match the query"),
            Err(e) => tracing::debug!(upstream = ?u, "upstream: {e}"),
        }
    }
    None
}

/// Plain DNS to `addr`: UDP, and TCP when the answer is truncated.
async fn dns_query(q: &Query, addr: SocketAddr, zone: Option<&str>) -> std::io::Result<Vec<u8>> {
    let addr = match (addr, zone) {
        (SocketAddr::V6(mut v6), Some(z)) => {
            v6.set_scope_id(nix::net::if_::if_nametoindex(z).map_err(std::io::Error::from)?);
            SocketAddr::V6(v6)
        }
        (a, _) => a,
    };
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(addr).await?;
    sock.send(&q.bytes).await?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TRY;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let a = &buf[..n];
        if message::check_answer(q, a).is_err() {
            continue; // a stray datagram
        }
        if message::is_truncated(a) {
            return tcp_query(q, addr).await;
        }
        return Ok(a.to_vec());
    }
}

async fn tcp_query(q: &Query, addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let len = u16::try_from(q.bytes.len()).map_err(std::io::Error::other)?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&q.bytes);
        s.write_all(&out).await?;
        let n = usize::from(s.read_u16().await?);
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    };
    tokio::time::timeout(UPSTREAM_TRY, work)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn serve_udp(sock: tokio::net::UdpSocket, ctx: Arc<Ctx>) {
    let sock = Arc::new(sock);
    let limit = Arc::new(Semaphore::new(RESOLVER_INFLIGHT));
    let mut buf = vec![0u8; message::MAX_QUERY + 1];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("resolver recv: {e}");
                continue;
            }
        };
        // Full: drop, as a busy server would; the client retries.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let q = buf[..n].to_vec();
        let (sock, ctx) = (sock.clone(), ctx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(mut a) = resolve(&ctx, &q).await {
                if a.len() > 512 && !has_edns(&q) {
                    // Too big for a plain UDP answer: the client asks again over TCP.
                    a = truncated(&a);
                }
                let _ = sock.send_to(&a, from).await;
            }
        });
    }
}

/// Whether a query carries EDNS (an OPT record), i.e. takes answers over 512 bytes.
fn has_edns(q: &[u8]) -> bool {
    tsunagu_dns::hickory_proto::op::Message::from_vec(q).is_ok_and(|m| m.edns.is_some())
}

/// The header and question of `a`, with TC set.
fn truncated(a: &[u8]) -> Vec<u8> {
    use tsunagu_dns::hickory_proto::op::Message;
    match Message::from_vec(a) {
        Ok(mut m) => {
            m.answers.clear();
            m.authorities.clear();
            m.additionals.clear();
            m.metadata.truncation = true;
            m.to_vec().unwrap_or_default()
        }
        Err(_) => Vec::new(),
    }
}

async fn serve_tcp(l: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    let limit = Arc::new(Semaphore::new(RESOLVER_TCP_CONNS));
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue; // dropped: too many connections
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let Ok(Ok(n)) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
                    return;
                };
                let n = usize::from(n);
                if n > message::MAX_QUERY {
                    return;
                }
                let mut q = vec![0u8; n];
                if tokio::time::timeout(TCP_IDLE, s.read_exact(&mut q))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return;
                }
                let Some(a) = resolve(&ctx, &q).await else {
                    return;
                };
                let Ok(len) = u16::try_from(a.len()) else {
                    return;
                };
                let mut out = len.to_be_bytes().to_vec();
                out.extend_from_slice(&a);
                if s.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The PeerAPI's accept loop: at most [`PEERAPI_CONNS_PER_PEER`] connections per peer,
/// each an HTTP/1.1 connection that must send its request headers within
/// [`PEERAPI_HEADER_TIMEOUT`] (a peer that opens connections and sends nothing, or
/// trickles its header, holds nothing for long) and whose requests end within
/// [`PEERAPI_REQUEST_TIMEOUT`].
async fn serve_peerapi(l: tokio::net::TcpListener, app: axum::Router, api: Arc<PeerApi>) {
    loop {
        let (stream, from) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: pause instead of spinning.
                tracing::debug!("peerapi accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = unmapped(from.ip());
        let Some(slot) = api.conn_slot(ip) else {
            tracing::debug!(%ip, "peerapi: too many connections from this peer; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(from));
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req)
                },
            );
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(PEERAPI_HEADER_TIMEOUT)
                .max_buf_size(PEERAPI_MAX_BUF);
            if let Err(e) = http
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%ip, "peerapi connection: {e}");
            }
        });
    }
}

/// Ends a PeerAPI request that takes longer than [`PEERAPI_REQUEST_TIMEOUT`] (reading a
/// slow body included) with 408.
async fn request_deadline(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(PEERAPI_REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => plain(StatusCode::REQUEST_TIMEOUT, "request took too long"),
    }
}

/// An IPv4 peer seen on an IPv6 socket as `::ffff:a.b.c.d` is that IPv4 peer.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Open connections per peer, bounded (a peer at its bound gets no more).
#[derive(Debug, Default)]
pub struct ConnLimiter {
    open: Mutex<BTreeMap<IpAddr, usize>>,
}

/// One open connection; its slot is given back when dropped.
pub struct ConnSlot {
    api: Arc<PeerApi>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.api.conns.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl ConnLimiter {
    /// Count one more connection from `ip` if it has fewer than `max` open.
    fn acquire(&self, ip: IpAddr, max: usize) -> bool {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// Connections open from `ip`.
    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().get(&ip).copied().unwrap_or(0)
    }
}

/// A DoH client for the exit node's `/dns-query` (plain HTTP/1.1 over the tunnel,
/// connections kept open between queries).
pub struct DohClient {
    client: Mutex<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            http_body_util::Full<Bytes>,
        >,
    >,
    /// Requests in flight, bounded ([`DOH_INFLIGHT`]).
    inflight: Arc<Semaphore>,
}

fn new_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(UPSTREAM_TRY));
    http.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(8)
        .build(http)
}

impl DohClient {
    fn new() -> Self {
        DohClient {
            client: Mutex::new(new_client()),
            inflight: Arc::new(Semaphore::new(DOH_INFLIGHT)),
        }
    }

    /// POST `q` to `url`; the answer's bytes. A request that fails at once on a pooled
    /// connection (reset: the exit node restarted, or another host took its identity
    /// over) is sent once more on a fresh one, so that the switch costs no query.
    pub async fn query(&self, url: &str, q: &[u8]) -> std::io::Result<Vec<u8>> {
        // Waiting for a slot counts against the query's own deadline (the caller's).
        let _permit = self
            .inflight
            .acquire()
            .await
            .map_err(std::io::Error::other)?;
        let start = tokio::time::Instant::now();
        match self.query_once(url, q).await {
            Err(e) if start.elapsed() < DOH_RETRY_WITHIN => {
                tracing::debug!(%url, "DoH: {e}; again on a new connection");
                self.query_once(url, q).await
            }
            r => r,
        }
    }

    async fn query_once(&self, url: &str, q: &[u8]) -> std::io::Result<Vec<u8>> {
        let client = self.client.lock().clone();
        let req = hyper::Request::post(url)
            .header("content-type", tsunagu_dns::doh::CONTENT_TYPE)
            .header("accept", tsunagu_dns::doh::CONTENT_TYPE)
            .body(http_body_util::Full::new(Bytes::copy_from_slice(q)))
            .map_err(std::io::Error::other)?;
        let work = async {
            let resp = client.request(req).await.map_err(std::io::Error::other)?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(std::io::Error::other(format!("DoH: {}", resp.status())));
            }
            let body = http_body_util::Limited::new(resp.into_body(), message::MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(body.to_bytes().to_vec())
        };
        let r = match tokio::time::timeout(UPSTREAM_TRY, work).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        };
        if r.is_err() {
            // Pooled connections may all be dead (the exit node restarted): start afresh.
            *self.client.lock() = new_client();
        }
        r
    }
}

/// The PeerAPI's shared state: who may use our DoH, each peer's queries in flight and
/// open connections.
#[derive(Default)]
pub struct PeerApi {
    allowed: RwLock<BTreeSet<IpAddr>>,
    inflight: Mutex<BTreeMap<IpAddr, Arc<Semaphore>>>,
    conns: ConnLimiter,
}

impl PeerApi {
    /// A connection slot for `ip`, unless it holds [`PEERAPI_CONNS_PER_PEER`] already.
    fn conn_slot(self: &Arc<Self>, ip: IpAddr) -> Option<ConnSlot> {
        self.conns
            .acquire(ip, PEERAPI_CONNS_PER_PEER)
            .then(|| ConnSlot {
                api: self.clone(),
                ip,
            })
    }
}

#[derive(Clone)]
struct PeerApiState {
    api: Arc<PeerApi>,
    backup: PathBuf,
    /// The forwarder's client (its upstreams are plain DNS: unused, but `forward` takes
    /// one).
    doh: Arc<DohClient>,
}

fn plain(status: StatusCode, msg: &str) -> Response {
    (status, format!("{msg}\n")).into_response()
}

async fn doh_handler(
    State(st): State<PeerApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ip = unmapped(peer.ip());
    if !st.api.allowed.read().contains(&ip) {
        return plain(StatusCode::FORBIDDEN, "DNS access denied");
    }
    let req = tsunagu_dns::doh::Request {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query(),
        content_type: headers.get("content-type").and_then(|v| v.to_str().ok()),
        body: &body,
    };
    let q = match tsunagu_dns::doh::parse_request(&req) {
        Ok(q) => q,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return plain(status, &e.to_string());
        }
    };
    let sem = st
        .api
        .inflight
        .lock()
        .entry(ip)
        .or_insert_with(|| Arc::new(Semaphore::new(PEERAPI_PER_PEER)))
        .clone();
    let Ok(_permit) = sem.try_acquire_owned() else {
        return plain(
            StatusCode::TOO_MANY_REQUESTS,
            "too many DNS queries in flight",
        );
    };
    let upstreams: Vec<Upstream> = os_resolvers(&st.backup)
        .into_iter()
        .filter(|n| n.ip != IpAddr::V4(tsunagu_dns::SERVICE_IPV4))
        .map(|n| Upstream::Dns {
            addr: SocketAddr::new(n.ip, 53),
            zone: n.zone,
        })
        .collect();
    let answer =
        match tokio::time::timeout(PEERAPI_DEADLINE, forward(&q, &upstreams, &st.doh)).await {
            Ok(Some(a)) => a,
            _ => message::servfail(&q),
        };
    (
        StatusCode::OK,
        [("content-type", tsunagu_dns::doh::CONTENT_TYPE)],
        answer,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peerapi_ports_are_stable_and_high() {
        let a = peerapi_port(&[1; 32]);
        assert_eq!(a, peerapi_port(&[1; 32]));
        assert!(a >= 0x8000);
        assert_ne!(a, peerapi_port(&[2; 32]));
    }

    #[test]
    fn connection_slots_are_bounded_per_peer_and_given_back() {
        let api = Arc::new(PeerApi::default());
        let a: IpAddr = "100.64.0.2".parse().unwrap();
        let b: IpAddr = "100.64.0.3".parse().unwrap();
        let slots: Vec<ConnSlot> = (0..PEERAPI_CONNS_PER_PEER)
            .map(|_| api.conn_slot(a).unwrap())
            .collect();
        assert!(api.conn_slot(a).is_none(), "bound reached");
        assert!(api.conn_slot(b).is_some(), "another peer is not affected");
        assert_eq!(api.conns.open(b), 0, "its slot went back");
        drop(slots);
        assert_eq!(api.conns.open(a), 0);
        assert!(api.conn_slot(a).is_some());
        assert!(
            api.conns.open.lock().is_empty(),
            "no entry kept for idle peers"
        );
    }

    #[test]
    fn truncation_keeps_the_question() {
        use tsunagu_dns::hickory_proto::rr::RecordType;
        let q = message::build_query(3, "web.lab.test", RecordType::A).unwrap();
        let p = message::parse_query(&q).unwrap();
        let a = message::address_answer(&p, &["203.0.113.10".parse().unwrap()]);
        let t = truncated(&a);
        assert!(message::is_truncated(&t));
        message::check_answer(&p, &t).unwrap();
        assert!(!has_edns(&q));
    }
}
