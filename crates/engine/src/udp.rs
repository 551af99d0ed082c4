//! The node's one UDP socket.
//!
//! Dual-stack (one `[::]` socket serves IPv4 peers through v4-mapped addresses), with
//! large kernel buffers (the default 208 KiB overflows under a single TCP stream and shows
//! up as loss), and the daemon's firewall mark so that policy routing lets our own
//! encrypted packets out of the physical interface while everything else goes into the
//! tunnel.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Socket buffer size asked for (forced past `rmem_max` when we have CAP_NET_ADMIN).
const SOCKET_BUFFER: usize = 8 << 20;

/// How long a receive waits before giving its loop a chance to notice shutdown.
pub const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// The engine's UDP socket.
pub struct UdpSock {
    sock: UdpSocket,
    dual_stack: bool,
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up UDP socket on {addr}: {what}: {source}")]
pub struct UdpError {
    pub addr: SocketAddr,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

fn setsockopt_int(sock: &Socket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live i32 and its size, as setsockopt requires.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl UdpSock {
    /// Bind `[::]:port` dual-stack, falling back to `0.0.0.0:port` where IPv6 is off.
    pub fn bind_port(port: u16, fwmark: Option<u32>) -> Result<Self, UdpError> {
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match Self::bind(v6, fwmark) {
            Ok(s) => Ok(s),
            Err(e) if e.what == "socket" || e.what == "bind" && port == 0 => {
                Self::bind(SocketAddr::from(([0, 0, 0, 0], port)), fwmark)
            }
            Err(e) => Err(e),
        }
    }

    /// Bind exactly `addr` (tests use 127.0.0.1:0).
    pub fn bind(addr: SocketAddr, fwmark: Option<u32>) -> Result<Self, UdpError> {
        let err = |what| move |source| UdpError { addr, what, source };
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err("socket"))?;
        let dual_stack = addr.is_ipv6() && addr.ip().is_unspecified();
        if dual_stack {
            sock.set_only_v6(false).map_err(err("IPV6_V6ONLY"))?;
        }
        if let Some(mark) = fwmark {
            sock.set_mark(mark).map_err(err("SO_MARK"))?;
        }
        let size = i32::try_from(SOCKET_BUFFER).unwrap_or(i32::MAX);
        // Forcing needs CAP_NET_ADMIN; without it take what rmem_max allows.
        if setsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
            let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        }
        if setsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size).is_err() {
            let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        }
        sock.bind(&addr.into()).map_err(err("bind"))?;
        let sock: UdpSocket = sock.into();
        sock.set_read_timeout(Some(RECV_TIMEOUT))
            .map_err(err("SO_RCVTIMEO"))?;
        Ok(UdpSock { sock, dual_stack })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Receive one datagram, waiting at most `timeout`; `Ok(None)` when nothing came.
    /// IPv4 senders are reported as IPv4 addresses, not v4-mapped ones.
    /// Waits at most [`RECV_TIMEOUT`], so that receive loops notice shutdown.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        match self.sock.recv_from(buf) {
            Ok((n, from)) => Ok(Some((n, unmap(from)))),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = match to {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        };
        self.sock.send_to(buf, to).map(drop)
    }
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}
