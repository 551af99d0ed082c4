//! Map-stream framing: each message is a 4-byte little-endian length followed by the
//! JSON body, zstd-compressed (one independent zstd frame per message) when the client
//! asked for `Compress: "zstd"`. Keep-alives are ordinary messages `{"KeepAlive":true}`.

use std::io;

/// Largest message we accept or produce (the Go client's own limit is higher; ours is
/// a safety bound, far above any real map).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Compression level: fastest, as Tailscale's server uses; maps are small and frequent.
const ZSTD_LEVEL: i32 = 1;

/// Encode one message (length prefix + optionally compressed body).
pub fn encode(json: &[u8], compress: bool) -> io::Result<Vec<u8>> {
    let body = if compress {
        zstd::bulk::compress(json, ZSTD_LEVEL)?
    } else {
        json.to_vec()
    };
    if body.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "map message too large",
        ));
    }
    let len = u32::try_from(body.len()).map_err(|_| io::ErrorKind::InvalidData)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Incremental decoder for a stream of messages, for the client side and tests: feed
/// bytes as they arrive, take whole messages out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    compressed: bool,
}

impl Decoder {
    pub fn new(compressed: bool) -> Self {
        Decoder {
            buf: Vec::new(),
            compressed,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message's JSON, if one has arrived.
    pub fn next_message(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("map message of {len} bytes is too large"),
            ));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
        if self.compressed {
            zstd::stream::decode_all(&body[..]).map(Some)
        } else {
            Ok(Some(body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_arbitrary_chunking() {
        let msgs: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("{{\"KeepAlive\":true,\"n\":{}}}", "x".repeat(i * 97)).into_bytes())
            .collect();
        for compress in [false, true] {
            let wire: Vec<u8> = msgs
                .iter()
                .flat_map(|m| encode(m, compress).unwrap())
                .collect();
            let mut d = Decoder::new(compress);
            let mut got = Vec::new();
            for chunk in wire.chunks(7) {
                d.push(chunk);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs);
        }
    }

    #[test]
    fn length_is_little_endian() {
        let m = encode(b"{}", false).unwrap();
        assert_eq!(&m[..4], &[2, 0, 0, 0]);
    }

    #[test]
    fn oversized_and_corrupt_are_errors() {
        let mut d = Decoder::new(false);
        d.push(&u32::MAX.to_le_bytes());
        assert!(d.next_message().is_err());
        let mut d = Decoder::new(true);
        d.push(&[3, 0, 0, 0, 1, 2, 3]);
        assert!(d.next_message().is_err());
    }
}
