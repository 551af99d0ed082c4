//! The TUN side of the engine, behind a small seam ([`TunIo`]) so that tests can run the
//! whole device in-process with a channel in place of a kernel interface.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

/// Where plaintext IP packets come from and go to.
pub trait TunIo: Send + Sync + 'static {
    /// Read one IP packet, waiting at most `timeout`; `Ok(None)` when nothing came.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>>;
    /// Write one IP packet.
    fn send(&self, packet: &[u8]) -> io::Result<()>;
}

/// Why a TUN device could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot create TUN device {name:?}: {source}")]
pub struct TunError {
    pub name: String,
    #[source]
    pub source: io::Error,
}

/// A kernel TUN interface (Linux), through `tun-rs`.
pub struct TunDevice {
    dev: tun_rs::SyncDevice,
    name: String,
}

impl TunDevice {
    /// Create (or attach to) the interface `name`. Addresses, MTU and link state are set
    /// by the route manager, with the rest of the routing state.
    pub fn create(name: &str, mtu: u16) -> Result<Self, TunError> {
        let err = |source| TunError {
            name: name.to_string(),
            source,
        };
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .build_sync()
            .map_err(err)?;
        dev.set_nonblocking(true).map_err(err)?;
        Ok(TunDevice {
            dev,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Wait until `fd` is readable, at most `timeout`. `false` on timeout or interruption.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

impl TunIo for TunDevice {
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        // Non-blocking read first: under load a packet is almost always waiting, and the
        // poll would be a wasted system call.
        match self.dev.recv(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if !wait_readable(self.dev.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        match self.dev.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.dev.send(packet).map(drop)
    }
}

/// A TUN stand-in made of two channels, for in-process tests: what the "application"
/// sends with [`ChannelApp::send`] the device reads, and what the device writes the
/// application receives.
pub struct ChannelTun {
    from_app: Mutex<Receiver<Vec<u8>>>,
    to_app: Sender<Vec<u8>>,
}

/// The application end of a [`ChannelTun`].
pub struct ChannelApp {
    pub to_tun: Sender<Vec<u8>>,
    pub from_tun: Receiver<Vec<u8>>,
}

impl ChannelTun {
    pub fn pair() -> (ChannelTun, ChannelApp) {
        let (to_tun, from_app) = channel();
        let (to_app, from_tun) = channel();
        (
            ChannelTun {
                from_app: Mutex::new(from_app),
                to_app,
            },
            ChannelApp { to_tun, from_tun },
        )
    }
}

impl TunIo for ChannelTun {
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let rx = self
            .from_app
            .lock()
            .map_err(|_| io::Error::other("channel tun poisoned"))?;
        match rx.recv_timeout(timeout) {
            Ok(p) => {
                let n = p.len().min(buf.len());
                buf[..n].copy_from_slice(&p[..n]);
                Ok(Some(n))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        // The application may have gone away; a TUN drops packets then too.
        let _ = self.to_app.send(packet.to_vec());
        Ok(())
    }
}
