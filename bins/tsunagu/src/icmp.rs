//! ICMP echo over the tailnet: a raw IPv4 ICMP socket (root), one echo request at a
//! time, replies matched by source, identifier and sequence number. The kernel routes
//! the requests to a peer's tailnet address through the tunnel like any other packet.

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// RFC 1071 checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request with `id`, `seq` and a small payload.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![ECHO_REQUEST, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"tsunagu ping....");
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// From a raw socket's datagram (IPv4 header + ICMP): `(source, id, seq)` of an echo
/// reply, `None` for anything else.
pub fn parse_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let icmp = packet.get(ihl..)?;
    if icmp.len() < 8 || icmp[0] != ECHO_REPLY || checksum(icmp) != 0 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    Some((
        src,
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

pub struct Pinger {
    sock: Socket,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
}

impl Pinger {
    pub fn new(dst: Ipv4Addr) -> anyhow::Result<Pinger> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .context("opening an ICMP socket (ping needs root)")?;
        Ok(Pinger {
            sock,
            dst,
            id: (std::process::id() & 0xffff) as u16,
            seq: 0,
        })
    }

    /// One echo; the round-trip time, or `None` after `timeout`.
    pub fn ping(&mut self, timeout: Duration) -> anyhow::Result<Option<Duration>> {
        self.seq = self.seq.wrapping_add(1);
        let req = echo_request(self.id, self.seq);
        let to = SocketAddr::V4(SocketAddrV4::new(self.dst, 0));
        let sent = Instant::now();
        self.sock
            .send_to(&req, &to.into())
            .with_context(|| format!("sending to {}", self.dst))?;
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        loop {
            let left = timeout.saturating_sub(sent.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left))?;
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e).context("receiving ICMP"),
            };
            // SAFETY: `recv` initialised the first `n` bytes.
            let data: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            if parse_reply(data) == Some((self.dst, self.id, self.seq)) {
                return Ok(Some(sent.elapsed()));
            }
        }
    }
}

/// `count` pings, the round-trip times of those answered.
pub fn ping_many(dst: Ipv4Addr, count: u32, timeout: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut p = Pinger::new(dst)?;
    let mut out = Vec::new();
    for _ in 0..count {
        if let Some(rtt) = p.ping(timeout)? {
            out.push(rtt);
        }
    }
    Ok(out)
}

pub fn median(v: &[Duration]) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_checksum_and_replies_parse() {
        let req = echo_request(0x1234, 7);
        assert_eq!(checksum(&req), 0, "a valid ICMP message sums to zero");
        // Turn it into a reply inside an IPv4 header from 100.64.0.2.
        let mut icmp = req.clone();
        icmp[0] = ECHO_REPLY;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 100, 64, 0, 2, 100, 64, 0, 1,
        ];
        ip.extend_from_slice(&icmp);
        assert_eq!(
            parse_reply(&ip),
            Some((Ipv4Addr::new(100, 64, 0, 2), 0x1234, 7))
        );
        // Our own request (type 8), a corrupted reply and a short packet are not replies.
        let mut own = ip.clone();
        own[20] = ECHO_REQUEST;
        assert_eq!(parse_reply(&own), None);
        let mut bad = ip.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(parse_reply(&bad), None);
        assert_eq!(parse_reply(&ip[..24]), None);
    }

    #[test]
    fn median_of_rtts() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(3), ms(1), ms(2)]), Some(ms(2)));
        assert_eq!(median(&[]), None);
    }
}
