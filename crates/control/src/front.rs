//! The public listener's shell: accepting connections within a per-address budget,
//! HTTP/1.1 (over TLS when configured) with a header-read timeout, and the bookkeeping
//! of Noise sessions that closes the ones left idle.
//!
//! ```text
//!  accept ─► ConnCounter (≤ N open per source address, else closed at once)
//!         ─► [TLS handshake ≤ header timeout] ─► HTTP/1.1, headers ≤ header timeout
//!            (slowloris; idle keep-alive too)  ─► router (GET /key, POST /ts2021, /derp …)
//!  upgraded connections (Noise sessions, DERP) keep their place in the budget until
//!  they close: the budget travels inside the I/O object ([`Counted`]).
//! ```

use crate::limits::Limits;
use crate::server::{ServerError, io_err};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tsunagu_derp::limit::LogLimiter;

/// Open connections per source address, within a budget.
#[derive(Debug)]
pub struct ConnCounter {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
    /// Connections closed at once because their address had used its budget.
    pub refused: AtomicU64,
    log: Mutex<LogLimiter>,
}

impl ConnCounter {
    pub fn new(max_per_ip: usize) -> Arc<ConnCounter> {
        Arc::new(ConnCounter {
            open: Mutex::new(HashMap::new()),
            max: max_per_ip.max(1),
            refused: AtomicU64::new(0),
            log: Mutex::new(LogLimiter::new(Duration::from_secs(10), 5)),
        })
    }

    /// A place for a connection from `ip`, or `None` when it has used its budget.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnPermit> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            drop(open);
            self.refused.fetch_add(1, Relaxed);
            if let Some(held) = self.log.lock().allow(Instant::now()) {
                tracing::warn!(%ip, max = self.max, suppressed = held, "connection refused: too many open from this address");
            }
            return None;
        }
        *n += 1;
        Some(ConnPermit {
            counter: self.clone(),
            ip,
        })
    }

    /// Connections open now from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open
            .lock()
            .get(&ip.to_canonical())
            .copied()
            .unwrap_or(0)
    }
}

/// One connection's place in its address's budget, given back on drop.
#[derive(Debug)]
pub struct ConnPermit {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.counter.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An I/O object that holds its connection's [`ConnPermit`]: hyper hands the very object
/// to an upgraded protocol, so a Noise session or a DERP connection keeps counting.
pub struct Counted<T> {
    inner: T,
    _permit: ConnPermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serve `router` on `listener` (over TLS with `tls`) until `shutdown` completes, within
/// `limits` (connections per address, header-read timeout). Accepted connections send
/// small frames (map deltas, relayed packets) at once: Nagle's delay against delayed
/// ACKs would cost relayed traffic tens of ms. Returns the per-address counter's handle
/// through `counter` for tests and metrics.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: &Limits,
    counter: Arc<ConnCounter>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    tokio::pin!(shutdown);
    let header_timeout = limits.header_read_timeout;
    let mut accept_log = LogLimiter::new(Duration::from_secs(10), 5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => return Ok(()),
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            // Out of descriptors (or memory) for a moment: the listener itself is fine.
            Err(e) if is_transient(&e) => {
                if let Some(held) = accept_log.allow(Instant::now()) {
                    tracing::warn!(suppressed = held, "accepting: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(io_err("accepting")(e)),
        };
        let Some(permit) = counter.try_acquire(peer.ip()) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let io = Counted {
            inner: tcp,
            _permit: permit,
        };
        let tls = tls.clone();
        let router = router.clone();
        tokio::spawn(serve_conn(io, peer, tls, router, header_timeout));
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

async fn serve_conn(
    io: Counted<tokio::net::TcpStream>,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    header_timeout: Duration,
) {
    // Handlers that log or limit by the peer (the relay, registrations) find it here.
    let router = router.layer(axum::Extension(ConnectInfo(peer)));
    let service = TowerToHyperService::new(router);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let result = match tls {
        None => {
            http.serve_connection(TokioIo::new(io), service)
                .with_upgrades()
                .await
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(header_timeout, acceptor.accept(io)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            http.serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// Requests in flight on one Noise session, and how many have started, so that a session
/// with nothing in flight for a while can be closed ([`Activity::idle`]). A request
/// counts until its response body is done: a map stream counts for as long as it lasts.
#[derive(Debug)]
pub struct Activity {
    /// (requests in flight, requests started)
    state: watch::Sender<(usize, u64)>,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: watch::Sender::new((0, 0)),
        })
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.state.send_modify(|(n, started)| {
            *n += 1;
            *started += 1;
        });
        InFlight(self.clone())
    }

    /// Completes once no request has been in flight for `idle` (a request that starts
    /// meanwhile, however short, starts the wait over).
    pub async fn idle(&self, idle: Duration) {
        let mut rx = self.state.subscribe();
        loop {
            // The guard must not live across the next await (it is not Send).
            let started = rx.wait_for(|(n, _)| *n == 0).await.map(|v| v.1);
            let Ok(started) = started else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = tokio::time::sleep(idle) => return,
                r = async { rx.wait_for(|(_, s)| *s != started).await.is_ok() } => {
                    if !r {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }
}

/// One request in flight (see [`Activity`]).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state.send_modify(|(n, _)| *n = n.saturating_sub(1));
    }
}

/// A response body holding its request's [`InFlight`] until it is done or dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Middleware counting a Noise session's requests in its [`Activity`].
pub async fn track_activity(
    State(activity): State<Arc<Activity>>,
    req: Request,
    next: Next,
) -> Response {
    let in_flight = activity.start();
    next.run(req).await.map(|body| {
        Body::new(Tracked {
            body,
            _in_flight: in_flight,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_budget_back_when_connections_close() {
        let c = ConnCounter::new(2);
        let a: IpAddr = "198.51.100.3".parse().unwrap();
        let b: IpAddr = "198.51.100.9".parse().unwrap();
        let p1 = c.try_acquire(a).unwrap();
        let _p2 = c.try_acquire(a).unwrap();
        assert!(c.try_acquire(a).is_none());
        assert!(c.try_acquire(b).is_some());
        assert_eq!(c.refused.load(Relaxed), 1);
        drop(p1);
        assert_eq!(c.open(a), 1);
        // An IPv4-mapped IPv6 address is the same source.
        let mapped: IpAddr = "::ffff:198.51.100.3".parse().unwrap();
        let _p3 = c.try_acquire(mapped).expect("a second place");
        assert!(c.try_acquire(a).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_is_idle_only_after_a_quiet_period_with_nothing_in_flight() {
        let a = Activity::new();
        let idle = Duration::from_secs(60);
        let stream = a.start();
        // A request in flight (a map stream): never idle.
        let r = tokio::time::timeout(Duration::from_secs(600), a.idle(idle)).await;
        assert!(r.is_err());
        drop(stream);
        let t0 = tokio::time::Instant::now();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.idle(idle).await });
        // A short request 30 s in starts the wait over.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(a.start());
        waiter.await.unwrap();
        assert!(
            t0.elapsed() >= Duration::from_secs(90),
            "{:?}",
            t0.elapsed()
        );
    }
}
