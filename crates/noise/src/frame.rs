//! The controlbase wire format: the handful of frame types that carry the
//! Noise handshake and the transport records.
//!
//! Layout (checked against tailscale `control/controlbase/messages.go` and
//! `conn.go`):
//!
//! ```text
//! initiation: u16 BE protocol version | 0x01 | u16 BE len (=96) | e (32) | enc(s) (48) | tag (16)   = 101 bytes
//! response:                             0x02 | u16 BE len (=48) | e (32) | tag (16)                 =  51 bytes
//! error:                                0x03 | u16 BE len       | UTF-8 text (unauthenticated)
//! record:                               0x04 | u16 BE len       | ciphertext (plaintext + 16-byte tag)
//! ```
//!
//! A transport record is at most [`MAX_FRAME_SIZE`] bytes including its
//! 3-byte header. Everything here is pure parsing: no I/O, no allocation, and
//! no panics on any input.

use thiserror::Error;

/// Type byte of a handshake initiation (client to server).
pub const MSG_TYPE_INITIATION: u8 = 0x01;
/// Type byte of a handshake response (server to client).
pub const MSG_TYPE_RESPONSE: u8 = 0x02;
/// Type byte of an unauthenticated, human-readable error (server to client,
/// during the handshake only).
pub const MSG_TYPE_ERROR: u8 = 0x03;
/// Type byte of a transport record.
pub const MSG_TYPE_RECORD: u8 = 0x04;

/// Header length of every frame but the initiation: type byte + u16 length.
pub const HEADER_LEN: usize = 3;
/// Header length of the initiation: u16 version + type byte + u16 length.
pub const INITIATION_HEADER_LEN: usize = 5;
/// Payload of the initiation: ephemeral key, encrypted static key, tag.
pub const INITIATION_PAYLOAD_LEN: usize = 32 + 48 + 16;
/// Whole initiation frame.
pub const INITIATION_LEN: usize = INITIATION_HEADER_LEN + INITIATION_PAYLOAD_LEN;
/// Payload of the response: ephemeral key and tag.
pub const RESPONSE_PAYLOAD_LEN: usize = 32 + 16;
/// Whole response frame.
pub const RESPONSE_LEN: usize = HEADER_LEN + RESPONSE_PAYLOAD_LEN;

/// Largest transport frame on the wire, header included (Go's
/// `maxMessageSize`). Kept well under Noise's 65535-byte message limit.
pub const MAX_FRAME_SIZE: usize = 4096;
/// ChaCha20-Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Largest ciphertext one record carries.
pub const MAX_CIPHERTEXT_SIZE: usize = MAX_FRAME_SIZE - HEADER_LEN;
/// Largest plaintext one record carries (4077 bytes).
pub const MAX_PLAINTEXT_SIZE: usize = MAX_CIPHERTEXT_SIZE - TAG_LEN;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Fewer bytes than the frame needs. Streaming callers treat this as
    /// "read more"; callers holding a whole message treat it as fatal.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs in total (as far as is known yet).
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A length field announces a frame larger than the protocol allows.
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    Oversized {
        /// Announced frame size, header included.
        size: usize,
        /// Allowed maximum, header included.
        max: usize,
    },
    /// A type byte that is not one of the four frame types.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A valid frame type where another one was required.
    #[error("unexpected frame type {got:#04x}, want {want:#04x}")]
    UnexpectedType {
        /// Type received.
        got: u8,
        /// Type required here.
        want: u8,
    },
    /// A handshake frame whose length field is not the fixed size.
    #[error("wrong handshake frame length {got}, want {want}")]
    WrongLength {
        /// Length field received.
        got: usize,
        /// Required length.
        want: usize,
    },
    /// Bytes left over after a handshake message that must stand alone.
    #[error("{0} trailing bytes after handshake message")]
    TrailingBytes(usize),
}

/// One frame borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Handshake initiation: protocol (capability) version and the 96-byte
    /// Noise message.
    Initiation {
        /// Client capability version, also mixed into the prologue.
        version: u16,
        /// Noise message: e, enc(s), tag.
        payload: &'a [u8],
    },
    /// Handshake response (48-byte Noise message).
    Response(&'a [u8]),
    /// Server's plaintext refusal.
    Error(&'a [u8]),
    /// Transport record ciphertext (plaintext + tag).
    Record(&'a [u8]),
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

/// Parses the record or handshake-response stream that a client or server
/// reads after the initiation: frames with a 3-byte header.
///
/// Returns the frame and the number of bytes it spans. A partial frame gives
/// [`FrameError::Truncated`] (with `need` = header or whole frame size) so a
/// streaming reader knows how much to wait for; an announced size beyond the
/// limit is rejected as soon as the header is seen, so a reader never buffers
/// more than [`MAX_FRAME_SIZE`] bytes for one record. Error frames may be up
/// to 3+65535 bytes long (Go reads them whole, without a limit).
pub fn parse_frame(buf: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    let ty = buf[0];
    let len = be16(&buf[1..3]);
    let total = HEADER_LEN + len;
    match ty {
        MSG_TYPE_RECORD | MSG_TYPE_RESPONSE if total > MAX_FRAME_SIZE => {
            return Err(FrameError::Oversized {
                size: total,
                max: MAX_FRAME_SIZE,
            });
        }
        MSG_TYPE_RECORD | MSG_TYPE_RESPONSE | MSG_TYPE_ERROR => {}
        // An initiation has a different header; seeing its type byte here
        // means the peer is confused.
        MSG_TYPE_INITIATION => {
            return Err(FrameError::UnexpectedType {
                got: ty,
                want: MSG_TYPE_RECORD,
            });
        }
        other => return Err(FrameError::UnknownType(other)),
    }
    if buf.len() < total {
        return Err(FrameError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    let body = &buf[HEADER_LEN..total];
    let frame = match ty {
        MSG_TYPE_RECORD => Frame::Record(body),
        MSG_TYPE_RESPONSE => Frame::Response(body),
        _ => Frame::Error(body),
    };
    Ok((frame, total))
}

/// Parses a whole initiation (exactly [`INITIATION_LEN`] bytes, as carried
/// base64-encoded in `X-Tailscale-Handshake`).
///
/// Mirrors the checks of Go's `controlbase.Server`: size, type byte, then
/// length field. The version is not judged here: like Go, the handshake
/// proceeds with any version and the caller decides afterwards.
pub fn parse_initiation(buf: &[u8]) -> Result<(u16, &[u8; INITIATION_PAYLOAD_LEN]), FrameError> {
    if buf.len() < INITIATION_LEN {
        return Err(FrameError::Truncated {
            need: INITIATION_LEN,
            have: buf.len(),
        });
    }
    if buf.len() > INITIATION_LEN {
        return Err(FrameError::TrailingBytes(buf.len() - INITIATION_LEN));
    }
    let version = u16::from_be_bytes([buf[0], buf[1]]);
    if buf[2] != MSG_TYPE_INITIATION {
        return Err(if (1..=4).contains(&buf[2]) {
            FrameError::UnexpectedType {
                got: buf[2],
                want: MSG_TYPE_INITIATION,
            }
        } else {
            FrameError::UnknownType(buf[2])
        });
    }
    let len = be16(&buf[3..5]);
    if len != INITIATION_PAYLOAD_LEN {
        return Err(FrameError::WrongLength {
            got: len,
            want: INITIATION_PAYLOAD_LEN,
        });
    }
    let payload = buf[INITIATION_HEADER_LEN..]
        .try_into()
        .map_err(|_| FrameError::WrongLength {
            got: len,
            want: INITIATION_PAYLOAD_LEN,
        })?;
    Ok((version, payload))
}

/// Builds the initiation frame around a 96-byte Noise message.
pub fn encode_initiation(
    version: u16,
    payload: &[u8; INITIATION_PAYLOAD_LEN],
) -> [u8; INITIATION_LEN] {
    let mut out = [0u8; INITIATION_LEN];
    out[..2].copy_from_slice(&version.to_be_bytes());
    out[2] = MSG_TYPE_INITIATION;
    out[3..5].copy_from_slice(&(INITIATION_PAYLOAD_LEN as u16).to_be_bytes());
    out[INITIATION_HEADER_LEN..].copy_from_slice(payload);
    out
}

/// Builds the response frame around a 48-byte Noise message.
pub fn encode_response(payload: &[u8; RESPONSE_PAYLOAD_LEN]) -> [u8; RESPONSE_LEN] {
    let mut out = [0u8; RESPONSE_LEN];
    out[0] = MSG_TYPE_RESPONSE;
    out[1..3].copy_from_slice(&(RESPONSE_PAYLOAD_LEN as u16).to_be_bytes());
    out[HEADER_LEN..].copy_from_slice(payload);
    out
}

/// Builds an error frame, truncating the message to what the u16 length
/// field can express. Like Go's `sendErr`, callers should pass fixed text,
/// never echo attacker input.
pub fn encode_error(msg: &str) -> Vec<u8> {
    let body = &msg.as_bytes()[..msg.len().min(usize::from(u16::MAX))];
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MSG_TYPE_ERROR);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Parses the server's answer to an initiation: either a response frame of
/// exactly [`RESPONSE_LEN`] bytes or an error frame. Returns the 48-byte Noise
/// message, or `Ok(Err(text))` for a server refusal.
pub fn parse_response(
    buf: &[u8],
) -> Result<Result<&[u8; RESPONSE_PAYLOAD_LEN], String>, FrameError> {
    let (frame, used) = parse_frame(buf)?;
    match frame {
        Frame::Error(text) => Ok(Err(String::from_utf8_lossy(text).into_owned())),
        Frame::Response(body) => {
            if body.len() != RESPONSE_PAYLOAD_LEN {
                return Err(FrameError::WrongLength {
                    got: body.len(),
                    want: RESPONSE_PAYLOAD_LEN,
                });
            }
            if used != buf.len() {
                return Err(FrameError::TrailingBytes(buf.len() - used));
            }
            let arr = body.try_into().map_err(|_| FrameError::WrongLength {
                got: body.len(),
                want: RESPONSE_PAYLOAD_LEN,
            })?;
            Ok(Ok(arr))
        }
        Frame::Record(_) | Frame::Initiation { .. } => Err(FrameError::UnexpectedType {
            got: buf[0],
            want: MSG_TYPE_RESPONSE,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_go() {
        assert_eq!(INITIATION_LEN, 101);
        assert_eq!(RESPONSE_LEN, 51);
        assert_eq!(MAX_PLAINTEXT_SIZE, 4077);
    }

    #[test]
    fn record_limits() {
        let mut f = vec![MSG_TYPE_RECORD, 0x0f, 0xfd];
        f.resize(4096, 0);
        assert!(matches!(parse_frame(&f), Ok((Frame::Record(b), 4096)) if b.len() == 4093));
        let big = [MSG_TYPE_RECORD, 0x0f, 0xfe];
        assert_eq!(
            parse_frame(&big),
            Err(FrameError::Oversized {
                size: 4097,
                max: 4096
            })
        );
        assert_eq!(parse_frame(&[9, 0, 0]), Err(FrameError::UnknownType(9)));
        assert_eq!(
            parse_frame(&[4, 0]),
            Err(FrameError::Truncated { need: 3, have: 2 })
        );
        assert_eq!(
            parse_frame(&[4, 0, 5, 1]),
            Err(FrameError::Truncated { need: 8, have: 4 })
        );
    }

    #[test]
    fn initiation_roundtrip_and_errors() {
        let p = [7u8; INITIATION_PAYLOAD_LEN];
        let f = encode_initiation(131, &p);
        assert_eq!(&f[..5], &[0, 131, 1, 0, 96]);
        let (v, got) = parse_initiation(&f).expect("valid");
        assert_eq!((v, got), (131, &p));
        let mut bad = f;
        bad[2] = 2;
        assert!(matches!(
            parse_initiation(&bad),
            Err(FrameError::UnexpectedType { .. })
        ));
        let mut bad = f;
        bad[4] = 95;
        assert!(matches!(
            parse_initiation(&bad),
            Err(FrameError::WrongLength { .. })
        ));
        assert!(matches!(
            parse_initiation(&f[..100]),
            Err(FrameError::Truncated { .. })
        ));
        let mut long = f.to_vec();
        long.push(0);
        assert_eq!(parse_initiation(&long), Err(FrameError::TrailingBytes(1)));
    }

    #[test]
    fn response_and_error() {
        let r = encode_response(&[1; 48]);
        assert_eq!(&r[..3], &[2, 0, 48]);
        assert!(matches!(parse_response(&r), Ok(Ok(_))));
        let e = encode_error("nope");
        assert_eq!(parse_response(&e), Ok(Err("nope".into())));
        let mut short = r.to_vec();
        short[2] = 47;
        short.pop();
        assert!(matches!(
            parse_response(&short),
            Err(FrameError::WrongLength { .. })
        ));
    }
}
