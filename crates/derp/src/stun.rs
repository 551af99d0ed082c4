//! STUN (RFC 5389) binding requests and responses, and an I/O-free STUN server.
//!
//! Clients send a Binding Request to learn the address their packets come from after
//! NAT; the answer carries it in XOR-MAPPED-ADDRESS. [`StunServer`] validates each
//! datagram, answers good ones and limits each source IP to a token bucket, so a flood
//! from one address costs little and is counted, not answered.

use crate::limit::KeyedBuckets;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

pub const HEADER_LEN: usize = 20;
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Pre-RFC 5389 servers put XOR-MAPPED-ADDRESS here.
const ATTR_XOR_MAPPED_ADDRESS_OLD: u16 = 0x8020;

/// A 96-bit transaction ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxId(pub [u8; 12]);

impl TxId {
    pub fn random() -> Self {
        TxId(rand::random())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    #[error("shorter than a STUN header")]
    Short,
    #[error("not STUN (top bits or magic cookie)")]
    NotStun,
    #[error("message type {0:#06x} is not the one expected")]
    WrongType(u16),
    #[error("length field does not match the datagram")]
    BadLength,
    #[error("attribute runs past the message")]
    BadAttribute,
    #[error("no mapped address in the response")]
    NoAddress,
}

struct Header {
    ty: u16,
    tx: TxId,
}

fn header(b: &[u8]) -> Result<Header, StunError> {
    if b.len() < HEADER_LEN {
        return Err(StunError::Short);
    }
    if b[0] & 0xc0 != 0 || b[4..8] != MAGIC_COOKIE {
        return Err(StunError::NotStun);
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    if !len.is_multiple_of(4) || HEADER_LEN + len != b.len() {
        return Err(StunError::BadLength);
    }
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&b[8..20]);
    Ok(Header {
        ty: u16::from_be_bytes([b[0], b[1]]),
        tx: TxId(tx),
    })
}

/// The attributes of a message whose header checked out: (type, value).
fn attributes(b: &[u8]) -> Result<Vec<(u16, &[u8])>, StunError> {
    let mut out = Vec::new();
    let mut rest = &b[HEADER_LEN..];
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(StunError::BadAttribute);
        }
        let ty = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let padded = (len + 3) & !3;
        if rest.len() < 4 + padded {
            return Err(StunError::BadAttribute);
        }
        out.push((ty, &rest[4..4 + len]));
        rest = &rest[4 + padded..];
    }
    Ok(out)
}

/// Checks a Binding Request and returns its transaction ID.
pub fn parse_binding_request(b: &[u8]) -> Result<TxId, StunError> {
    let h = header(b)?;
    if h.ty != BINDING_REQUEST {
        return Err(StunError::WrongType(h.ty));
    }
    attributes(b)?;
    Ok(h.tx)
}

/// A Binding Request without attributes.
pub fn binding_request(tx: TxId) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&tx.0);
    b
}

/// A Binding Success Response telling the client it was seen from `addr`.
pub fn binding_response(tx: TxId, addr: SocketAddr) -> Vec<u8> {
    let mut value = vec![0u8];
    let port = addr.port() ^ u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
    let mut mask = MAGIC_COOKIE.to_vec();
    mask.extend_from_slice(&tx.0);
    match addr.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(&mask).map(|(a, m)| a ^ m));
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(&mask).map(|(a, m)| a ^ m));
        }
    }
    let mut b = Vec::with_capacity(HEADER_LEN + 4 + value.len());
    b.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    // Value lengths are 8 or 20: already multiples of 4.
    b.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&tx.0);
    b.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    b.extend_from_slice(&(value.len() as u16).to_be_bytes());
    b.extend_from_slice(&value);
    b
}

fn parse_address(v: &[u8], xor: Option<&[u8]>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let unmask = |i: usize, b: u8| xor.map_or(b, |m| b ^ m[i]);
    let port = u16::from_be_bytes([unmask(0, v[2]), unmask(1, v[3])]);
    let ip: IpAddr = match (v[1], v.len()) {
        (0x01, 8) => {
            let o: Vec<u8> = (0..4).map(|i| unmask(i, v[4 + i])).collect();
            IpAddr::from([o[0], o[1], o[2], o[3]])
        }
        (0x02, 20) => {
            let mut o = [0u8; 16];
            for (i, b) in o.iter_mut().enumerate() {
                *b = unmask(i, v[4 + i]);
            }
            IpAddr::from(o)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Reads a Binding Success Response: its transaction ID and the mapped address.
pub fn parse_binding_response(b: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    let h = header(b)?;
    if h.ty != BINDING_SUCCESS {
        return Err(StunError::WrongType(h.ty));
    }
    let mut mask = MAGIC_COOKIE.to_vec();
    mask.extend_from_slice(&h.tx.0);
    let mut plain = None;
    for (ty, v) in attributes(b)? {
        match ty {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_OLD => {
                if let Some(a) = parse_address(v, Some(&mask)) {
                    return Ok((h.tx, a));
                }
            }
            ATTR_MAPPED_ADDRESS => plain = plain.or_else(|| parse_address(v, None)),
            _ => {}
        }
    }
    plain.map(|a| (h.tx, a)).ok_or(StunError::NoAddress)
}

/// What to do with one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StunOutcome {
    Reply(Vec<u8>),
    /// Not a valid Binding Request: dropped.
    Garbage(StunError),
    /// The source sent more than its share: dropped.
    RateLimited,
}

/// The STUN service's logic: validation and per-source rate limiting.
#[derive(Debug)]
pub struct StunServer {
    buckets: KeyedBuckets<IpAddr>,
}

impl Default for StunServer {
    /// 20 requests a second per source IP, bursts of 40 (a Go client's netcheck sends a
    /// handful per region every 20 s or so), 65,536 sources tracked.
    fn default() -> Self {
        StunServer::new(20.0, 40.0, 65_536)
    }
}

impl StunServer {
    pub fn new(per_second: f64, burst: f64, max_sources: usize) -> Self {
        StunServer {
            buckets: KeyedBuckets::new(per_second, burst, max_sources),
        }
    }

    pub fn handle(&mut self, src: SocketAddr, packet: &[u8], now: Instant) -> StunOutcome {
        let tx = match parse_binding_request(packet) {
            Ok(tx) => tx,
            Err(e) => return StunOutcome::Garbage(e),
        };
        if !self.buckets.take(&src.ip(), now) {
            return StunOutcome::RateLimited;
        }
        StunOutcome::Reply(binding_response(tx, src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_get_their_address_back_v4_and_v6() {
        for addr in [
            "198.51.100.3:41641".parse::<SocketAddr>().unwrap(),
            "[2001:db8::7]:3478".parse().unwrap(),
        ] {
            let tx = TxId([7; 12]);
            let req = binding_request(tx);
            assert_eq!(parse_binding_request(&req), Ok(tx));
            let resp = binding_response(tx, addr);
            assert_eq!(parse_binding_response(&resp), Ok((tx, addr)));
        }
    }

    #[test]
    fn xor_mapped_address_matches_rfc5389_encoding() {
        // 198.51.100.3:41641 with the magic cookie: port 41641 ^ 0x2112, address bytes
        // xored with 21 12 a4 42.
        let resp = binding_response(TxId([0; 12]), "198.51.100.3:41641".parse().unwrap());
        assert_eq!(&resp[..2], &[0x01, 0x01]);
        assert_eq!(&resp[2..4], &[0, 12]);
        assert_eq!(&resp[20..24], &[0x00, 0x20, 0, 8]);
        let port = 41641u16 ^ 0x2112;
        assert_eq!(&resp[26..28], &port.to_be_bytes());
        assert_eq!(
            &resp[28..32],
            &[198 ^ 0x21, 51 ^ 0x12, 100 ^ 0xa4, 3 ^ 0x42]
        );
    }

    #[test]
    fn requests_with_attributes_parse_and_bad_ones_do_not() {
        // A request with SOFTWARE "tailnode" and a FINGERPRINT, like Tailscale's.
        let mut req = binding_request(TxId([1; 12]));
        req.extend_from_slice(&[0x80, 0x22, 0, 8]);
        req.extend_from_slice(b"tailnode");
        req.extend_from_slice(&[0x80, 0x28, 0, 4, 1, 2, 3, 4]);
        let len = (req.len() - HEADER_LEN) as u16;
        req[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse_binding_request(&req), Ok(TxId([1; 12])));

        assert_eq!(parse_binding_request(&req[..10]), Err(StunError::Short));
        assert_eq!(
            parse_binding_request(&req[..req.len() - 4]),
            Err(StunError::BadLength)
        );
        let mut bad = req.clone();
        bad[4] = 0;
        assert_eq!(parse_binding_request(&bad), Err(StunError::NotStun));
        let mut bad = req.clone();
        bad[22..24].copy_from_slice(&[0, 200]);
        assert_eq!(parse_binding_request(&bad), Err(StunError::BadAttribute));
        let resp = binding_response(TxId([1; 12]), "198.51.100.3:1".parse().unwrap());
        assert_eq!(
            parse_binding_request(&resp),
            Err(StunError::WrongType(0x0101))
        );
    }

    #[test]
    fn one_source_flooding_is_limited_and_others_are_not() {
        let mut s = StunServer::new(10.0, 5.0, 16);
        let now = Instant::now();
        let flood: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        let other: SocketAddr = "198.51.100.10:5000".parse().unwrap();
        let req = binding_request(TxId([2; 12]));
        let answered = (0..100)
            .filter(|_| matches!(s.handle(flood, &req, now), StunOutcome::Reply(_)))
            .count();
        assert_eq!(answered, 5, "the burst, then nothing");
        assert!(matches!(s.handle(other, &req, now), StunOutcome::Reply(_)));
        // A second later the flooder has ten more tokens (capped at the burst of five).
        let later = now + Duration::from_secs(1);
        let answered = (0..100)
            .filter(|_| matches!(s.handle(flood, &req, later), StunOutcome::Reply(_)))
            .count();
        assert_eq!(answered, 5);
        assert!(matches!(
            s.handle(other, b"garbage", later),
            StunOutcome::Garbage(StunError::Short)
        ));
    }

    #[test]
    fn the_source_table_stays_bounded() {
        let mut s = StunServer::new(1.0, 1.0, 8);
        let now = Instant::now();
        let req = binding_request(TxId([3; 12]));
        for i in 0..100u16 {
            let src = SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 1000));
            assert!(matches!(s.handle(src, &req, now), StunOutcome::Reply(_)));
            assert!(s.buckets.len() <= 8);
        }
    }
}
