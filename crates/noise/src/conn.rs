//! The transport phase: sealing and opening records after the handshake.
//!
//! Checked against tailscale `control/controlbase/conn.go`:
//! - the 12-byte ChaCha20-Poly1305 nonce is 4 zero bytes then the message
//!   counter as a **big-endian** u64 (`nonce.Increment`), not the Noise
//!   spec's little-endian encoding; no associated data;
//! - a key is usable while its counter is not `u64::MAX` (`nonce.Valid`), so
//!   at most 2^64-1 records per direction; there is no rekeying;
//! - a record carries at most 4077 plaintext bytes (4096-byte frame); the
//!   reader refuses larger frames before buffering them;
//! - zero-length records are legal (Go's reader skips them); writing zero
//!   bytes sends nothing;
//! - any decryption failure desynchronizes the stream, so the receive side
//!   stays failed afterwards (Go drops the cipher); likewise for sending.

use std::ops::Range;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Tag};
use thiserror::Error;

use crate::frame::{
    FrameError, HEADER_LEN, MAX_FRAME_SIZE, MAX_PLAINTEXT_SIZE, MSG_TYPE_INITIATION,
    MSG_TYPE_RECORD, TAG_LEN,
};

/// Why the transport refused to seal or open.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnError {
    /// The incoming bytes are not a valid record stream.
    #[error("invalid record: {0}")]
    Frame(#[from] FrameError),
    /// A record failed authentication (tampering, loss or reordering).
    #[error("record authentication failed")]
    Decrypt,
    /// 2^64-1 records were used on this key: the connection must be redone.
    #[error("cipher exhausted, no more nonces available for current key")]
    NonceExhausted,
    /// An earlier failure in this direction made the stream unusable.
    #[error("connection is unusable after an earlier error")]
    Failed,
}

struct CipherState {
    aead: ChaCha20Poly1305,
    /// Next nonce; `u64::MAX` is never used.
    n: u64,
    failed: bool,
}

impl CipherState {
    fn new(key: [u8; 32]) -> Self {
        CipherState {
            aead: ChaCha20Poly1305::new(&key.into()),
            n: 0,
            failed: false,
        }
    }

    fn nonce(&self) -> [u8; 12] {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.n.to_be_bytes());
        nonce
    }

    fn remaining(&self) -> u64 {
        u64::MAX - self.n
    }
}

/// An established control-protocol session, sans I/O: it turns plaintext
/// into wire bytes and wire bytes into plaintext.
pub struct Conn {
    tx: CipherState,
    rx: CipherState,
    peer: [u8; 32],
    version: u16,
    handshake_hash: [u8; 32],
    /// A partial incoming frame for [`Conn::open`]; never above
    /// [`MAX_FRAME_SIZE`] bytes.
    partial: Vec<u8>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("version", &self.version)
            .field("tx_nonce", &self.tx.n)
            .field("rx_nonce", &self.rx.n)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(crate) fn new(
        tx_key: [u8; 32],
        rx_key: [u8; 32],
        peer: [u8; 32],
        version: u16,
        handshake_hash: [u8; 32],
    ) -> Self {
        Conn {
            tx: CipherState::new(tx_key),
            rx: CipherState::new(rx_key),
            peer,
            version,
            handshake_hash,
            partial: Vec::new(),
        }
    }

    /// A pair of connected transports with the given keys and no handshake,
    /// for tests and fuzzing of the record layer.
    #[doc(hidden)]
    pub fn pair_for_testing(k1: [u8; 32], k2: [u8; 32]) -> (Conn, Conn) {
        (
            Conn::new(k1, k2, [0; 32], 0, [0; 32]),
            Conn::new(k2, k1, [0; 32], 0, [0; 32]),
        )
    }

    /// The peer's static public key: the server key on a client, the client's
    /// machine key on a server.
    pub fn peer(&self) -> [u8; 32] {
        self.peer
    }

    /// The capability version the client announced (and the prologue bound).
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// The Noise handshake hash, to bind other messages to this session.
    pub fn handshake_hash(&self) -> [u8; 32] {
        self.handshake_hash
    }

    /// Records sent so far (the next transmit nonce).
    pub fn tx_count(&self) -> u64 {
        self.tx.n
    }

    /// Records received so far (the next receive nonce).
    pub fn rx_count(&self) -> u64 {
        self.rx.n
    }

    #[cfg(test)]
    pub(crate) fn set_nonces_for_testing(&mut self, tx: u64, rx: u64) {
        self.tx.n = tx;
        self.rx.n = rx;
    }

    /// Encrypts `plaintext` into one or more records (each at most 4096
    /// bytes on the wire) and returns the wire bytes. Empty input gives no
    /// record, as in Go.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, ConnError> {
        let mut out = Vec::with_capacity(sealed_len(plaintext.len()));
        self.seal_into(plaintext, &mut out)?;
        Ok(out)
    }

    /// Like [`Conn::seal`], appending to `out`. All-or-nothing: if the key
    /// cannot cover every record, nothing is appended.
    pub fn seal_into(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ConnError> {
        if self.tx.failed {
            return Err(ConnError::Failed);
        }
        let records = plaintext.len().div_ceil(MAX_PLAINTEXT_SIZE) as u64;
        if records > self.tx.remaining() {
            self.tx.failed = true;
            return Err(ConnError::NonceExhausted);
        }
        out.reserve(sealed_len(plaintext.len()));
        for chunk in plaintext.chunks(MAX_PLAINTEXT_SIZE) {
            self.seal_record(chunk, out)?;
        }
        Ok(())
    }

    /// Seals one record; `chunk` must fit one record.
    fn seal_record(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), ConnError> {
        debug_assert!(chunk.len() <= MAX_PLAINTEXT_SIZE);
        if self.tx.remaining() == 0 {
            self.tx.failed = true;
            return Err(ConnError::NonceExhausted);
        }
        out.push(MSG_TYPE_RECORD);
        out.extend_from_slice(&((chunk.len() + TAG_LEN) as u16).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(chunk);
        let nonce = self.tx.nonce();
        match self
            .tx
            .aead
            .encrypt_in_place_detached((&nonce).into(), &[], &mut out[start..])
        {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => {
                out.truncate(start - HEADER_LEN);
                self.tx.failed = true;
                return Err(ConnError::Failed);
            }
        }
        self.tx.n += 1;
        Ok(())
    }

    /// Validates a record header at the start of `buf`; returns the whole
    /// frame size, or `None` while fewer than 3 bytes are there.
    fn record_size(buf: &[u8]) -> Result<Option<usize>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let ty = buf[0];
        if ty != MSG_TYPE_RECORD {
            return Err(if (MSG_TYPE_INITIATION..=MSG_TYPE_RECORD).contains(&ty) {
                FrameError::UnexpectedType {
                    got: ty,
                    want: MSG_TYPE_RECORD,
                }
            } else {
                FrameError::UnknownType(ty)
            });
        }
        let size = HEADER_LEN + usize::from(u16::from_be_bytes([buf[1], buf[2]]));
        if size > MAX_FRAME_SIZE {
            return Err(FrameError::Oversized {
                size,
                max: MAX_FRAME_SIZE,
            });
        }
        Ok(Some(size))
    }

    /// How many bytes the record at the start of `buf` spans, if its header
    /// is there: lets a reader size its next read without buffering more
    /// than one frame. Errors are fatal for the receive side.
    pub fn next_record_size(&mut self, buf: &[u8]) -> Result<Option<usize>, ConnError> {
        if self.rx.failed {
            return Err(ConnError::Failed);
        }
        Self::record_size(buf).map_err(|e| {
            self.rx.failed = true;
            ConnError::Frame(e)
        })
    }

    /// Decrypts the record at the start of `buf` in place, without copying.
    ///
    /// Returns `Ok(None)` if `buf` does not yet hold a whole record, else the
    /// bytes the record spans and where its plaintext now lies in `buf`.
    /// Any error leaves the receive side failed.
    pub fn open_in_place(
        &mut self,
        buf: &mut [u8],
    ) -> Result<Option<(usize, Range<usize>)>, ConnError> {
        let Some(size) = self.next_record_size(buf)? else {
            return Ok(None);
        };
        if buf.len() < size {
            return Ok(None);
        }
        self.decrypt_frame(&mut buf[..size])?;
        Ok(Some((size, HEADER_LEN..size - TAG_LEN)))
    }

    /// Decrypts one whole, header-validated record in place.
    fn decrypt_frame(&mut self, frame: &mut [u8]) -> Result<(), ConnError> {
        match frame.get_mut(HEADER_LEN..) {
            Some(body) => self.decrypt_detached(body).map(|_| ()),
            None => {
                self.rx.failed = true;
                Err(ConnError::Decrypt)
            }
        }
    }

    /// Push-style receive: feeds any chunk of wire bytes (partial records
    /// are kept, at most one frame's worth) and returns the plaintext of
    /// every record completed by it.
    pub fn open(&mut self, incoming: &[u8]) -> Result<Vec<u8>, ConnError> {
        let mut out = Vec::new();
        self.open_into(incoming, &mut out)?;
        Ok(out)
    }

    /// Like [`Conn::open`], appending plaintext to `out`. On error, `out`
    /// keeps the plaintext of the records before the bad one.
    pub fn open_into(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ConnError> {
        if self.rx.failed {
            return Err(ConnError::Failed);
        }
        loop {
            if self.partial.is_empty() {
                // Fast path: whole records straight from the input.
                match self.next_record_size(input)? {
                    Some(size) if input.len() >= size => {
                        let start = out.len();
                        out.extend_from_slice(&input[HEADER_LEN..size]);
                        // Decrypt the copied ciphertext in place behind a
                        // fake header so that one code path checks it all.
                        let res = {
                            let body = &mut out[start..];
                            self.decrypt_detached(body)
                        };
                        match res {
                            Ok(pt_len) => out.truncate(start + pt_len),
                            Err(e) => {
                                out.truncate(start);
                                return Err(e);
                            }
                        }
                        input = &input[size..];
                    }
                    _ => {
                        self.partial.extend_from_slice(input);
                        return Ok(());
                    }
                }
            } else {
                // Complete the header first, then the frame it announces.
                if self.partial.len() < HEADER_LEN {
                    let take = (HEADER_LEN - self.partial.len()).min(input.len());
                    self.partial.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.partial.len() < HEADER_LEN {
                        return Ok(());
                    }
                }
                let header = [self.partial[0], self.partial[1], self.partial[2]];
                let size = self.next_record_size(&header)?.unwrap_or(HEADER_LEN);
                let take = size.saturating_sub(self.partial.len()).min(input.len());
                self.partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.partial.len() < size {
                    return Ok(());
                }
                let mut frame = std::mem::take(&mut self.partial);
                let start = out.len();
                let res = self.decrypt_frame(&mut frame);
                match res {
                    Ok(()) => out.extend_from_slice(&frame[HEADER_LEN..frame.len() - TAG_LEN]),
                    Err(e) => {
                        out.truncate(start);
                        return Err(e);
                    }
                }
                frame.clear();
                self.partial = frame; // keep the allocation
            }
        }
    }

    /// Decrypts `ciphertext || tag` in place; returns the plaintext length.
    fn decrypt_detached(&mut self, body: &mut [u8]) -> Result<usize, ConnError> {
        if body.len() < TAG_LEN {
            self.rx.failed = true;
            return Err(ConnError::Decrypt);
        }
        if self.rx.remaining() == 0 {
            self.rx.failed = true;
            return Err(ConnError::NonceExhausted);
        }
        let pt_len = body.len() - TAG_LEN;
        let (pt, tag) = body.split_at_mut(pt_len);
        let tag = Tag::clone_from_slice(tag);
        let nonce = self.rx.nonce();
        if self
            .rx
            .aead
            .decrypt_in_place_detached((&nonce).into(), &[], pt, &tag)
            .is_err()
        {
            self.rx.failed = true;
            return Err(ConnError::Decrypt);
        }
        self.rx.n += 1;
        Ok(pt_len)
    }

    /// Bytes of a partial record held by [`Conn::open`].
    pub fn buffered_len(&self) -> usize {
        self.partial.len()
    }
}

/// Wire size of `n` plaintext bytes once sealed.
pub fn sealed_len(n: usize) -> usize {
    n + n.div_ceil(MAX_PLAINTEXT_SIZE) * (HEADER_LEN + TAG_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_exhaustion_like_go() {
        let (mut a, mut b) = Conn::pair_for_testing([5; 32], [6; 32]);
        // u64::MAX - 1 is the last usable nonce (Go: Valid() is n != MaxUint64).
        a.set_nonces_for_testing(u64::MAX - 1, 0);
        b.set_nonces_for_testing(0, u64::MAX - 1);
        let last = a.seal(b"last").expect("last nonce usable");
        assert_eq!(b.open(&last).expect("open"), b"last");
        assert_eq!(a.seal(b"more").unwrap_err(), ConnError::NonceExhausted);
        assert_eq!(a.seal(b"more").unwrap_err(), ConnError::Failed);
        // A fake record at the exhausted receive nonce is refused before
        // any decryption.
        let mut fake = vec![MSG_TYPE_RECORD, 0, 20];
        fake.extend_from_slice(&[0; 20]);
        assert_eq!(b.open(&fake).unwrap_err(), ConnError::NonceExhausted);
    }

    #[test]
    fn seal_is_all_or_nothing_near_exhaustion() {
        let (mut a, _) = Conn::pair_for_testing([5; 32], [6; 32]);
        a.set_nonces_for_testing(u64::MAX - 1, 0);
        let mut out = vec![9];
        let err = a
            .seal_into(&[0; MAX_PLAINTEXT_SIZE + 1], &mut out)
            .unwrap_err();
        assert_eq!(err, ConnError::NonceExhausted);
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn sealed_len_matches() {
        let (mut a, _) = Conn::pair_for_testing([5; 32], [6; 32]);
        for n in [0, 1, MAX_PLAINTEXT_SIZE, MAX_PLAINTEXT_SIZE + 1, 50_000] {
            assert_eq!(a.seal(&vec![0; n]).expect("seal").len(), sealed_len(n));
        }
    }
}
