//! Tiny in-process servers and clients that live inside lab namespaces.
//!
//! Each server binds its socket inside a namespace through [`Netns::run`] (the socket then
//! belongs to that namespace for good) and serves it from a background thread of the test
//! process. No external program is needed, start-up is immediate (the socket is bound
//! before the function returns, so there is no readiness race), and the server stops when
//! its [`ServiceHandle`] is dropped.
//!
//! TCP servers handle each connection on a thread of its own, as servers on the internet
//! do (at most [`MAX_CONNECTIONS`] at once): a client that stops half-way through its
//! exchange (say, because the exit node that carried it went away) must not hold up the
//! clients behind it. Every read and write is bounded by [`IO_TIMEOUT`], so a stuck client
//! cannot keep a thread alive for long after the handle's drop.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::addr::ensure_lab_addr;
use crate::error::LabError;
use crate::netns::Netns;

/// Read/write timeout of every server-side connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an idle server looks at its stop flag.
const POLL: Duration = Duration::from_millis(10);

/// Most connections a TCP server handles at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// Largest request a server reads, and largest TCP response a client accepts.
const MAX_REQUEST: usize = 8 * 1024;
const MAX_RESPONSE: usize = 1024 * 1024;

/// How many peer addresses a service remembers (memory stays bounded under load).
const MAX_PEERS: usize = 1024;

/// Most datagrams [`udp_send`] sends per destination (lab rule: traffic loops are bounded).
pub const MAX_UDP_COUNT: u32 = 10_000;

/// State shared between a service thread and its handle.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    count: AtomicU64,
    peers: Mutex<Vec<SocketAddr>>,
}

impl Shared {
    fn record(&self, peer: SocketAddr) {
        // A poisoned mutex only means a reader panicked; the Vec is still consistent.
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() < MAX_PEERS {
            peers.push(peer);
        }
        drop(peers);
        self.count.fetch_add(1, Ordering::SeqCst);
    }
}

/// A running in-process service. Dropping it stops the service within [`POLL`] and closes
/// its listening socket; connections in progress end within [`IO_TIMEOUT`] of their last
/// byte.
pub struct ServiceHandle {
    name: &'static str,
    local: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("name", &self.name)
            .field("local", &self.local)
            .field("count", &self.count())
            .finish()
    }
}

impl ServiceHandle {
    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Connections accepted (TCP services) or datagrams received (UDP sink) so far.
    pub fn count(&self) -> u64 {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Peer addresses in arrival order, one per connection or datagram (at most 1024 kept).
    /// Tells which source address and port a NAT produced.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (bounded) until [`ServiceHandle::count`] reaches `n`; true if it did.
    pub fn wait_for_count(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the service and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!(service = self.name, "service thread panicked");
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates a socket of `ty` bound to `addr`. `SO_REUSEADDR` lets a test rebind a port right
/// after a previous server closed; IPv6 sockets are `IPV6_V6ONLY` so that `0.0.0.0:80` and
/// `[::]:80` can be served separately in one namespace.
fn bound_socket(addr: SocketAddr, ty: SockType) -> Result<OwnedFd, LabError> {
    let ctx = |what: &str| format!("{what} for {addr}");
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| LabError::sys(ctx("socket"), e))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)
        .map_err(|e| LabError::sys(ctx("SO_REUSEADDR"), e))?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)
            .map_err(|e| LabError::sys(ctx("IPV6_V6ONLY"), e))?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| LabError::sys(ctx("bind"), e))?;
    if ty == SockType::Stream {
        let backlog = Backlog::new(128).map_err(|e| LabError::sys(ctx("backlog"), e))?;
        listen(&fd, backlog).map_err(|e| LabError::sys(ctx("listen"), e))?;
    }
    Ok(fd)
}

/// Binds a TCP listener inside `ns`.
fn tcp_bind(ns: &Netns, addr: SocketAddr) -> Result<TcpListener, LabError> {
    ensure_lab_addr(addr.ip(), "listen address")?;
    let fd = ns.run(|| bound_socket(addr, SockType::Stream))??;
    let listener = TcpListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|e| LabError::io(format!("making listener {addr} non-blocking"), e))?;
    Ok(listener)
}

/// A per-connection handler; errors are logged at debug level (clients going away are
/// normal in tests).
type Handler = fn(&mut TcpStream, SocketAddr) -> io::Result<()>;

/// Serves `listener` on a background thread with `handler`.
fn serve_tcp(
    listener: TcpListener,
    name: &'static str,
    handler: Handler,
) -> Result<ServiceHandle, LabError> {
    let local = listener
        .local_addr()
        .map_err(|e| LabError::io(format!("{name}: local address"), e))?;
    let shared = Arc::new(Shared::default());
    let state = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name(format!("lab-{name}"))
        .spawn(move || {
            let busy = Arc::new(AtomicUsize::new(0));
            while !state.stop.load(Ordering::SeqCst) {
                if busy.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    thread::sleep(POLL);
                    continue;
                }
                match listener.accept() {
                    Ok((stream, peer)) => {
                        state.record(peer);
                        busy.fetch_add(1, Ordering::SeqCst);
                        let done = Arc::clone(&busy);
                        let spawned = thread::Builder::new()
                            .name(format!("lab-{name}-conn"))
                            .spawn(move || {
                                serve_connection(stream, peer, name, handler);
                                done.fetch_sub(1, Ordering::SeqCst);
                            });
                        if let Err(e) = spawned {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            tracing::debug!(service = name, %peer, error = %e, "no thread for a connection");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(e) => {
                        tracing::debug!(service = name, error = %e, "accept failed");
                        thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|e| LabError::io(format!("spawning {name} thread"), e))?;
    Ok(ServiceHandle {
        name,
        local,
        shared,
        thread: Some(thread),
    })
}

/// One accepted connection, blocking and bounded by [`IO_TIMEOUT`] per read and write.
fn serve_connection(mut stream: TcpStream, peer: SocketAddr, name: &str, handler: Handler) {
    let result = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| handler(&mut stream, peer));
    if let Err(e) = result {
        tracing::debug!(service = name, %peer, error = %e, "connection failed");
    }
}

/// Reads an HTTP request head (up to a blank line, [`MAX_REQUEST`] bytes, EOF or the
/// stream's timeout). The content does not matter to the servers here.
fn read_request_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(head)
}

/// Reads and discards whatever the peer still sends until it closes (bounded by the
/// stream's timeout and [`MAX_REQUEST`]), so closing our side does not turn into a RST that
/// could destroy data we already sent.
fn drain_until_close(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let mut total = 0;
    while total < MAX_REQUEST {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

fn whoami_handler(stream: &mut TcpStream, peer: SocketAddr) -> io::Result<()> {
    // Any request, even malformed, gets the answer: the point is the peer's address.
    read_request_head(stream)?;
    let body = format!("{}\n", peer.ip().to_canonical());
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    drain_until_close(stream);
    Ok(())
}

fn hello_handler(stream: &mut TcpStream, _peer: SocketAddr) -> io::Result<()> {
    stream.write_all(b"hello\n")?;
    stream.shutdown(Shutdown::Write)?;
    drain_until_close(stream);
    Ok(())
}

fn echo_handler(stream: &mut TcpStream, _peer: SocketAddr) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    // Bounded: at most 1 MiB per connection, and each read waits at most IO_TIMEOUT.
    while total < MAX_RESPONSE {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
        total += n;
    }
    stream.shutdown(Shutdown::Write)
}

/// A minimal HTTP/1.0 server inside `ns` on `addr` that answers every request with the
/// peer's IP address and a newline (IPv4-mapped peers are shown as plain IPv4). It tells a
/// test which source address the server sees: the cafe's NAT, the exit node, ...
///
/// An IPv6 `addr` serves IPv6 only, so call it once for `203.0.113.10:80` and once for
/// `[2001:db8:2::10]:80` (or `[::]:80`) to serve both families.
pub fn whoami_server(ns: &Netns, addr: SocketAddr) -> Result<ServiceHandle, LabError> {
    serve_tcp(tcp_bind(ns, addr)?, "whoami", whoami_handler)
}

/// A TCP listener inside `ns` that greets every connection with `hello\n` and closes it:
/// the "printer" of LAN-access tests. Read it with [`tcp_read`].
pub fn tcp_listener(ns: &Netns, addr: SocketAddr) -> Result<ServiceHandle, LabError> {
    serve_tcp(tcp_bind(ns, addr)?, "hello", hello_handler)
}

/// A TCP echo server inside `ns` (echoes up to 1 MiB per connection, then closes).
pub fn tcp_echo(ns: &Netns, addr: SocketAddr) -> Result<ServiceHandle, LabError> {
    serve_tcp(tcp_bind(ns, addr)?, "echo", echo_handler)
}

/// A UDP socket inside `ns` that counts the datagrams it receives and remembers their
/// sources (e.g. a fake resolver on `203.0.113.53:53` to catch DNS leaks, or a target
/// that shows which port a NAT mapped to).
pub fn udp_sink(ns: &Netns, addr: SocketAddr) -> Result<ServiceHandle, LabError> {
    serve_udp(ns, addr, "udp-sink", |_, _, _| {})
}

/// A small authoritative DNS server (UDP) inside `ns`: answers A/AAAA for `records`
/// (case-insensitive names), NXDOMAIN for other names, and counts every query it gets
/// ([`ServiceHandle::count`], with the sources in [`ServiceHandle::peers`]), so a test
/// can also prove that a resolver was *not* asked.
pub fn dns_server(
    ns: &Netns,
    addr: SocketAddr,
    records: &[(&str, IpAddr)],
) -> Result<ServiceHandle, LabError> {
    use tsunagu_dns::magic::Zone;
    use tsunagu_dns::message;
    let extra: Vec<tsunagu_dns::tailcfg_record::DNSRecord> = records
        .iter()
        .map(|(n, ip)| tsunagu_dns::tailcfg_record::DNSRecord {
            name: n.to_string(),
            record_type: String::new(),
            value: ip.to_string(),
        })
        .collect();
    let zone = Zone::new(None, std::iter::empty(), &extra);
    serve_udp(ns, addr, "dns", move |socket, datagram, peer| {
        let Ok(q) = message::parse_query(datagram) else {
            return;
        };
        let a = zone.answer(&q).unwrap_or_else(|| message::nxdomain(&q));
        let _ = socket.send_to(&a, peer);
    })
}

/// A UDP service inside `ns` on `addr`: a thread that records every datagram's source
/// and hands the datagram to `handle` (which may answer on the socket), until the
/// handle is dropped.
fn serve_udp(
    ns: &Netns,
    addr: SocketAddr,
    name: &'static str,
    mut handle: impl FnMut(&UdpSocket, &[u8], SocketAddr) + Send + 'static,
) -> Result<ServiceHandle, LabError> {
    ensure_lab_addr(addr.ip(), "listen address")?;
    let socket = UdpSocket::from(ns.run(|| bound_socket(addr, SockType::Datagram))??);
    // The receive timeout doubles as the stop-flag poll interval.
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| LabError::io(format!("{name} {addr}: read timeout"), e))?;
    let local = socket
        .local_addr()
        .map_err(|e| LabError::io(format!("{name} {addr}: local address"), e))?;
    let shared = Arc::new(Shared::default());
    let state = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name(format!("lab-{name}"))
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !state.stop.load(Ordering::SeqCst) {
                match socket.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        state.record(peer);
                        handle(&socket, &buf[..n], peer);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        // E.g. ECONNREFUSED from an ICMP error; keep serving.
                        tracing::debug!(%local, error = %e, "{name}: receive failed");
                        thread::sleep(POLL);
                    }
                }
            }
        })
        .map_err(|e| LabError::io(format!("spawning the {name} thread"), e))?;
    Ok(ServiceHandle {
        name,
        local,
        shared,
        thread: Some(thread),
    })
}

/// Asks `server` (UDP, from inside `ns`) for the A records of `name`: `Ok(Some((rcode,
/// addresses)))`, `Ok(None)` when no answer came within `timeout`.
pub fn dns_query(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Option<(String, Vec<IpAddr>)>, LabError> {
    use tsunagu_dns::hickory_proto::rr::RecordType;
    use tsunagu_dns::message;
    // A fresh ID per query (the clock's nanoseconds, then counted on), so that a late
    // answer to an earlier query is not taken for this one's.
    static NEXT_ID: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() as u16);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed).wrapping_add(seed) | 1;
    let q = message::build_query(id, name, RecordType::A)
        .ok_or_else(|| LabError::invalid("name", name.to_string()))?;
    ns.run(|| -> Result<Option<(String, Vec<IpAddr>)>, LabError> {
        let local: SocketAddr = if server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(local).map_err(|e| LabError::io("dns query socket", e))?;
        s.send_to(&q, server)
            .map_err(|e| LabError::io(format!("dns query to {server}"), e))?;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            s.set_read_timeout(Some(left(deadline)))
                .map_err(|e| LabError::io("dns query timeout", e))?;
            match s.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if n < 2 || buf[..2] != id.to_be_bytes() {
                        continue; // an answer to another query
                    }
                    if let Some((rc, addrs)) = message::answer_addrs(&buf[..n]) {
                        return Ok(Some((rc.to_string(), addrs)));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(LabError::io(format!("dns answer from {server}"), e)),
            }
        }
        Ok(None)
    })?
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means "forever").
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Connects from the current namespace (call inside [`Netns::run`]) with `timeout`.
fn connect_here(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, LabError> {
    let stream = TcpStream::connect_timeout(&addr, left(deadline))
        .map_err(|e| LabError::io(format!("connecting to {addr}"), e))?;
    stream
        .set_write_timeout(Some(left(deadline)))
        .map_err(|e| LabError::io(format!("{addr}: write timeout"), e))?;
    Ok(stream)
}

/// Reads until EOF, `max` bytes or `deadline`.
fn read_all_until(
    stream: &mut TcpStream,
    addr: SocketAddr,
    deadline: Instant,
    max: usize,
) -> Result<Vec<u8>, LabError> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            return Err(LabError::Http {
                peer: addr,
                detail: format!(
                    "no end of response before the deadline ({} bytes read)",
                    data.len()
                ),
            });
        }
        stream
            .set_read_timeout(Some(left(deadline)))
            .map_err(|e| LabError::io(format!("{addr}: read timeout"), e))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(data),
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if data.len() > max {
                    return Err(LabError::Http {
                        peer: addr,
                        detail: format!("response larger than {max} bytes"),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(LabError::io(format!("reading from {addr}"), e)),
        }
    }
}

/// Splits an HTTP/1.x response into status and body; non-2xx is an error.
fn parse_http_response(raw: &[u8]) -> Result<String, String> {
    let (head_len, sep_len) = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (i, 4),
        None => match raw.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (i, 2),
            None => return Err("no end of headers in response".into()),
        },
    };
    let head = String::from_utf8_lossy(&raw[..head_len]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    if !(200..300).contains(&code) {
        return Err(format!("status {status_line:?}"));
    }
    String::from_utf8(raw[head_len + sep_len..].to_vec()).map_err(|_| "body is not UTF-8".into())
}

/// `GET /` over plain HTTP/1.0 from inside `ns` (in-process, no curl), returning the body.
/// The whole exchange is bounded by `timeout`; a non-2xx status is an error.
pub fn http_get(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<String, LabError> {
    ensure_lab_addr(addr.ip(), "server address")?;
    ns.run(|| {
        let deadline = Instant::now() + timeout;
        let mut stream = connect_here(addr, deadline)?;
        let request = format!(
            "GET / HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: tsunagu-lab\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| LabError::io(format!("sending request to {addr}"), e))?;
        let raw = read_all_until(&mut stream, addr, deadline, MAX_RESPONSE)?;
        parse_http_response(&raw).map_err(|detail| LabError::Http { peer: addr, detail })
    })?
}

/// Connects to `addr` from inside `ns` and returns everything the server sends until it
/// closes (e.g. `hello\n` from [`tcp_listener`]), bounded by `timeout` and 64 KiB.
pub fn tcp_read(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<String, LabError> {
    ensure_lab_addr(addr.ip(), "server address")?;
    ns.run(|| {
        let deadline = Instant::now() + timeout;
        let mut stream = connect_here(addr, deadline)?;
        let raw = read_all_until(&mut stream, addr, deadline, 64 * 1024)?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    })?
}

/// Whether a TCP connection from `ns` to `addr` succeeds within `timeout`; errors only when
/// the test could not be made (bad address, namespace gone).
pub fn try_tcp_connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<bool, LabError> {
    ensure_lab_addr(addr.ip(), "server address")?;
    ns.run(|| TcpStream::connect_timeout(&addr, timeout).is_ok())
}

/// Whether a TCP connection from `ns` to `addr` succeeds within `timeout`.
///
/// # Panics
/// If the check itself cannot be made (see [`try_tcp_connect`]): returning `false` then
/// would let a "must not connect" assertion pass for the wrong reason.
pub fn tcp_connect_ok(ns: &Netns, addr: SocketAddr, timeout: Duration) -> bool {
    match try_tcp_connect(ns, addr, timeout) {
        Ok(ok) => ok,
        Err(e) => panic!("tcp_connect_ok({}, {addr}): {e}", ns.name),
    }
}

/// Sends `count` datagrams with `payload` to each of `dests` from one UDP socket inside
/// `ns`, and returns that socket's local address. One socket for all destinations is what
/// shows a NAT's mapping behaviour (same public port for every destination, or not).
/// `count` is at most [`MAX_UDP_COUNT`].
pub fn udp_send(
    ns: &Netns,
    dests: &[SocketAddr],
    payload: &[u8],
    count: u32,
) -> Result<SocketAddr, LabError> {
    let Some(first) = dests.first() else {
        return Err(LabError::invalid("destinations", "empty list"));
    };
    if count > MAX_UDP_COUNT {
        return Err(LabError::invalid(
            "count",
            format!("{count} datagrams; at most {MAX_UDP_COUNT} per destination"),
        ));
    }
    for dest in dests {
        ensure_lab_addr(dest.ip(), "destination")?;
        if dest.is_ipv4() != first.is_ipv4() {
            return Err(LabError::invalid("destinations", "mixed address families"));
        }
    }
    let bind_addr: SocketAddr = if first.is_ipv4() {
        (IpAddr::from([0u8; 4]), 0).into()
    } else {
        (IpAddr::from([0u16; 8]), 0).into()
    };
    ns.run(|| {
        let socket = UdpSocket::bind(bind_addr)
            .map_err(|e| LabError::io(format!("binding UDP {bind_addr}"), e))?;
        for _ in 0..count {
            for dest in dests {
                socket
                    .send_to(payload, dest)
                    .map_err(|e| LabError::io(format!("sending UDP to {dest}"), e))?;
            }
        }
        socket
            .local_addr()
            .map_err(|e| LabError::io("UDP local address", e))
    })?
}

/// Pings `addr` from inside `ns` (`ping -c count`, 0.2 s apart, giving up after
/// `timeout`, rounded up to whole seconds); true if replies came back.
/// Errors when `ping` is missing (Debian package `iputils-ping`) or cannot run.
pub fn try_ping(ns: &Netns, addr: IpAddr, count: u32, timeout: Duration) -> Result<bool, LabError> {
    ensure_lab_addr(addr, "ping target")?;
    if !(1..=100).contains(&count) {
        return Err(LabError::invalid(
            "ping count",
            format!("{count}: use 1-100"),
        ));
    }
    let secs = (timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)).max(1);
    let secs = secs.to_string();
    let count = count.to_string();
    let target = addr.to_string();
    let argv = [
        "ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", &secs, "-w", &secs, &target,
    ];
    let out = ns.exec_status_timeout(&argv, timeout + Duration::from_secs(5))?;
    Ok(out.status.success())
}

/// Whether `addr` answers pings from `ns` (see [`try_ping`]).
///
/// # Panics
/// If ping cannot run at all (e.g. `iputils-ping` not installed): a silent `false` would
/// make "must not be reachable" assertions pass for the wrong reason.
pub fn ping(ns: &Netns, addr: IpAddr, count: u32, timeout: Duration) -> bool {
    match try_ping(ns, addr, count, timeout) {
        Ok(ok) => ok,
        Err(e) => panic!("ping from {} to {addr}: {e}", ns.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Length: 13\r\n\r\n198.51.100.3\n";
        assert_eq!(parse_http_response(ok).as_deref(), Ok("198.51.100.3\n"));
        let bare = b"HTTP/1.1 204 No Content\n\n";
        assert_eq!(parse_http_response(bare).as_deref(), Ok(""));
        assert!(parse_http_response(b"HTTP/1.0 404 Not Found\r\n\r\nx").is_err());
        assert!(parse_http_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\n").is_err());
    }

    /// A whoami server on loopback of the test's own namespace (no root needed).
    fn loopback_whoami() -> (ServiceHandle, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let server = serve_tcp(listener, "whoami", whoami_handler).expect("serve");
        let addr = server.local_addr();
        (server, addr)
    }

    /// One GET to the loopback whoami server: the address it saw.
    fn get_whoami(addr: SocketAddr) -> (TcpStream, Result<String, String>) {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
        let raw = read_all_until(
            &mut stream,
            addr,
            Instant::now() + IO_TIMEOUT * 3,
            MAX_RESPONSE,
        )
        .expect("read");
        (stream, parse_http_response(&raw))
    }

    #[test]
    fn loopback_services_work_without_a_lab() {
        // Exercises the server loop.
        let (server, addr) = loopback_whoami();
        let (stream, answer) = get_whoami(addr);
        assert_eq!(answer.as_deref(), Ok("127.0.0.1\n"));
        drop(stream);
        assert!(server.wait_for_count(1, Duration::from_secs(1)));
        assert_eq!(server.peers().len(), 1);
        server.stop();
    }

    /// A client that stops in the middle of its exchange (its exit node went away with
    /// the connection's NAT state) holds up nobody: the next client is answered while
    /// the first connection is still open. A server that handled one connection at a
    /// time answered it only after the first one's read timeout (the "stall" after an
    /// exit node switch was this).
    #[test]
    fn a_stalled_client_does_not_hold_up_the_next_one() {
        let (server, addr) = loopback_whoami();
        // Half a request, then silence.
        let mut stalled = TcpStream::connect(addr).expect("connect");
        stalled.write_all(b"GET / HT").expect("write");
        assert!(server.wait_for_count(1, Duration::from_secs(5)));
        let (_next, answer) = get_whoami(addr);
        assert_eq!(answer.as_deref(), Ok("127.0.0.1\n"));
        // The stalled connection has not been answered or closed meanwhile: the second
        // client did not wait for its timeout.
        stalled.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        let pending = stalled.read(&mut buf);
        assert!(
            matches!(&pending, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{pending:?}"
        );
        server.stop();
    }
}
