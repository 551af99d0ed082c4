//! What arrives on the node's one UDP socket.
//!
//! A node has a single UDP port, as Tailscale nodes do: WireGuard, STUN answers (public
//! endpoint discovery) and disco messages (path discovery) all share it, so that the NAT
//! mapping that STUN and disco learn is the very one WireGuard uses. The first bytes tell
//! them apart without ambiguity:
//!
//! * WireGuard: a message type 1..=4 followed by three zero bytes.
//! * STUN (RFC 5389): the two top bits zero and the magic cookie `0x2112A442` at offset 4.
//! * disco: the magic `"TS💬"` (6 bytes) followed by the sender's disco key.
//!
//! The device hands STUN answers to the daemon and disco messages to the path logic;
//! relay (DERP) traffic does not arrive here but on its own TCP connection, and joins the
//! same receive path at [`crate::device`] once it is decapsulated.

/// The disco magic: "TS" and the speech-balloon emoji in UTF-8.
pub const DISCO_MAGIC: &[u8; 6] = b"TS\xf0\x9f\x92\xac";
const STUN_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// The class of a datagram, by its first bytes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatagramKind {
    WireGuard,
    Stun,
    Disco,
    Unknown,
}

/// Classify a datagram. Never fails: what is not recognised is [`DatagramKind::Unknown`].
pub fn classify(d: &[u8]) -> DatagramKind {
    if d.len() >= 4 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0] {
        DatagramKind::WireGuard
    } else if d.len() >= 20 && d[0] & 0xc0 == 0 && d[4..8] == STUN_COOKIE {
        DatagramKind::Stun
    } else if d.len() >= DISCO_MAGIC.len() + 32 && d.starts_with(DISCO_MAGIC) {
        DatagramKind::Disco
    } else {
        DatagramKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let mut init = vec![0u8; 148];
        init[0] = 1;
        assert_eq!(classify(&init), DatagramKind::WireGuard);
        let mut data = vec![0u8; 32];
        data[0] = 4;
        assert_eq!(classify(&data), DatagramKind::WireGuard);

        let mut stun = vec![0u8; 20];
        stun[1] = 0x01; // binding request
        stun[4..8].copy_from_slice(&STUN_COOKIE);
        assert_eq!(classify(&stun), DatagramKind::Stun);

        let mut disco = DISCO_MAGIC.to_vec();
        disco.extend_from_slice(&[7u8; 32 + 24 + 16]);
        assert_eq!(classify(&disco), DatagramKind::Disco);
    }

    #[test]
    fn garbage_is_unknown() {
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[4, 0, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[4, 0, 1, 0]), DatagramKind::Unknown);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), DatagramKind::Unknown);
        assert_eq!(classify(DISCO_MAGIC), DatagramKind::Unknown);
    }
}
