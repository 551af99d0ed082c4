//! [`NoiseStream`]: tokio `AsyncRead + AsyncWrite` over a [`Conn`], so that
//! HTTP/2 (hyper or h2) runs inside the Noise channel as Tailscale does.
//!
//! Memory is bounded per connection: the read buffer holds at most one
//! partial record plus what one read brought in (8 KiB), and the write
//! buffer at most [`WRITE_BUF_CAP`] sealed bytes; `poll_write` returns
//! `Pending` rather than buffering more (backpressure). An idle stream holds
//! neither buffer: a server with thousands of quiet map streams would
//! otherwise keep 24 KiB per connection for nothing.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::conn::{Conn, ConnError};
use crate::frame::{MAX_FRAME_SIZE, MAX_PLAINTEXT_SIZE};

/// Read buffer size: room for a whole maximal record plus the start of the
/// next one, so one socket read often yields several small records.
const READ_BUF_CAP: usize = 2 * MAX_FRAME_SIZE;
/// Sealed bytes a writer may have pending before `poll_write` waits: four
/// maximal records, enough for one 16 KiB HTTP/2 DATA frame per call.
pub const WRITE_BUF_CAP: usize = 4 * MAX_FRAME_SIZE;

/// The 5 bytes that open an early payload; chosen by Tailscale so that they
/// cannot start an HTTP/2 frame header (`control/ts2021/conn.go`).
pub const EARLY_PAYLOAD_MAGIC: &[u8; 5] = b"\xff\xff\xffTS";
/// Largest early payload a client accepts (Go: `10<<20`).
pub const MAX_EARLY_PAYLOAD_LEN: usize = 10 << 20;

fn conn_err(e: ConnError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A Noise-encrypted byte stream over `T`.
pub struct NoiseStream<T> {
    io: T,
    conn: Conn,
    rbuf: Box<[u8]>,
    /// Unprocessed wire bytes: `rbuf[rstart..rend]`.
    rstart: usize,
    rend: usize,
    /// Decrypted bytes not yet returned, inside `rbuf`.
    plain: Range<usize>,
    read_eof: bool,
    /// Plaintext returned to the stream after a peek (at most 9 bytes).
    unread: Vec<u8>,
    /// Sealed bytes not yet written: `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    write_failed: bool,
}

impl<T> std::fmt::Debug for NoiseStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseStream")
            .field("conn", &self.conn)
            .field("buffered_in", &(self.rend - self.rstart))
            .field("buffered_out", &(self.wbuf.len() - self.wpos))
            .finish_non_exhaustive()
    }
}

impl<T> NoiseStream<T> {
    /// Wraps an I/O object right after the handshake.
    pub fn new(io: T, conn: Conn) -> Self {
        Self::with_buffered(io, conn, &[])
    }

    /// Like [`NoiseStream::new`], with wire bytes already read past the
    /// handshake (e.g. by an HTTP response parser) to process first.
    pub fn with_buffered(io: T, conn: Conn, buffered: &[u8]) -> Self {
        let cap = READ_BUF_CAP.max(buffered.len() + MAX_FRAME_SIZE);
        let mut rbuf = vec![0u8; cap].into_boxed_slice();
        rbuf[..buffered.len()].copy_from_slice(buffered);
        NoiseStream {
            io,
            conn,
            rbuf,
            rstart: 0,
            rend: buffered.len(),
            plain: 0..0,
            read_eof: false,
            unread: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            write_failed: false,
        }
    }

    /// The session state (peer key, version, handshake hash, counters).
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The underlying I/O object.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The underlying I/O object, mutably. Reading or writing it directly
    /// desynchronizes the stream.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> NoiseStream<T> {
    /// Reads the server's optional early payload (`"\xff\xff\xffTS"`, u32 BE
    /// length, JSON `tailcfg.EarlyNoise`) that precedes HTTP/2, the way Go's
    /// `ts2021.Conn.readHeader` does: the first 9 plaintext bytes are either
    /// that header or the start of the server's HTTP/2 SETTINGS frame, which
    /// is then given back to later reads. Call once, before HTTP/2 starts.
    pub async fn read_early_payload(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut hdr = [0u8; 9];
        self.read_exact(&mut hdr).await?;
        if &hdr[..5] != EARLY_PAYLOAD_MAGIC {
            let mut unread = hdr.to_vec();
            unread.append(&mut self.unread);
            self.unread = unread;
            return Ok(None);
        }
        let len = u32::from_be_bytes([hdr[5], hdr[6], hdr[7], hdr[8]]) as usize;
        if len > MAX_EARLY_PAYLOAD_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid early payload length",
            ));
        }
        let mut json = vec![0u8; len];
        self.read_exact(&mut json).await?;
        Ok(Some(json))
    }
}

impl<T: AsyncWrite + Unpin> NoiseStream<T> {
    /// Writes out pending sealed bytes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..])) {
                Ok(0) => {
                    self.write_failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => self.wpos += n,
                Err(e) => {
                    // A partly written record cannot be resent: the stream
                    // is desynchronized for good, as in Go.
                    self.write_failed = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
        // Everything is out: release the buffer until the next write.
        self.wbuf = Vec::new();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.write_failed {
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "noise stream unusable after an earlier write error",
            ))
        } else {
            Ok(())
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for NoiseStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.rbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            // Decrypt the next whole record, if buffered. Zero-length
            // records are legal, hence the loop.
            match this
                .conn
                .open_in_place(&mut this.rbuf[this.rstart..this.rend])
            {
                Err(e) => return Poll::Ready(Err(conn_err(e))),
                Ok(Some((used, range))) => {
                    this.plain = this.rstart + range.start..this.rstart + range.end;
                    this.rstart += used;
                    continue;
                }
                Ok(None) => {}
            }
            if this.read_eof {
                return Poll::Ready(if this.rstart == this.rend {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a noise record",
                    ))
                });
            }
            if this.rstart > 0 {
                this.rbuf.copy_within(this.rstart..this.rend, 0);
                this.rend -= this.rstart;
                this.rstart = 0;
            }
            if this.rbuf.is_empty() {
                this.rbuf = vec![0u8; READ_BUF_CAP].into_boxed_slice();
            }
            // A partial record is below MAX_FRAME_SIZE bytes (its size was
            // validated), so there is always room here.
            let mut rb = ReadBuf::new(&mut this.rbuf[this.rend..]);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if this.rend == 0 {
                        // Nothing buffered (rstart is 0 here): hold no buffer while idle.
                        this.rbuf = Box::default();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(r) => r?,
            }
            let n = rb.filled().len();
            if n == 0 {
                this.read_eof = true;
            } else {
                this.rend += n;
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for NoiseStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_writable()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Backpressure: wait until a whole maximal record fits.
        if this.wbuf.len() - this.wpos + MAX_FRAME_SIZE > WRITE_BUF_CAP {
            ready!(this.poll_drain(cx))?;
        }
        if this.wpos > 0 {
            this.wbuf.drain(..this.wpos);
            this.wpos = 0;
        }
        if this.wbuf.capacity() == 0 {
            this.wbuf.reserve_exact(WRITE_BUF_CAP);
        }
        let records = (WRITE_BUF_CAP - this.wbuf.len()) / MAX_FRAME_SIZE;
        let n = buf.len().min(records * MAX_PLAINTEXT_SIZE);
        if let Err(e) = this.conn.seal_into(&buf[..n], &mut this.wbuf) {
            this.write_failed = true;
            return Poll::Ready(Err(conn_err(e)));
        }
        // Start sending now; what the socket does not take yet stays
        // buffered (bounded) for the next call or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_writable()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_writable()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Frames an early payload: magic, u32 BE length, JSON.
pub fn encode_early_payload(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + json.len());
    out.extend_from_slice(EARLY_PAYLOAD_MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
    out
}
