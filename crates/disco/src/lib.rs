//! Path discovery ("disco"), as Tailscale clients speak it: the messages two nodes send
//! each other over the one UDP socket they share with WireGuard (and over the relay), to
//! find and keep a direct path. No I/O here: bytes in, messages out, and back.
//!
//! A disco datagram is
//!
//! ```text
//! magic "TS💬" (6) ‖ sender's disco public key (32) ‖ nonce (24) ‖ NaCl box (16-byte tag ‖ ciphertext)
//! ```
//!
//! and the box holds `type (1) ‖ version (1) ‖ payload`:
//!
//! * **Ping** (1): a 12-byte transaction id, then (clients since 1.16) the sender's
//!   WireGuard node key, which pins the disco key to one node.
//! * **Pong** (2): the ping's transaction id and the address the ping came from (16-byte
//!   IPv6 or v4-mapped address, 2-byte port): a STUN answer as a side effect.
//! * **CallMeMaybe** (3): sent over the relay only: "I just sent you pings from these
//!   endpoints; ping me back there" (18 bytes each). This is what makes both NATs open
//!   at about the same time: hole punching.
//!
//! Longer-than-expected payloads are accepted (the protocol reserves trailing bytes for
//! later versions); shorter ones, bad boxes, unknown types and keys are errors that the
//! caller counts and drops.

use crypto_box::aead::Aead as _;
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use tsunagu_proto::{DiscoPublic, NodePrivate, NodePublic};

/// "TS" and the speech-balloon emoji in UTF-8.
pub const MAGIC: &[u8; 6] = b"TS\xf0\x9f\x92\xac";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Magic, sender key and nonce: what precedes the box.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;
/// The smallest well-formed disco datagram: a header and an empty box with its type and
/// version bytes.
pub const MIN_LEN: usize = HEADER_LEN + TAG_LEN + 2;
/// Largest disco datagram opened. Pings may be padded (Tailscale probes path MTUs with
/// them), never past a jumbo frame.
pub const MAX_LEN: usize = 9216;
/// Endpoints taken from one CallMeMaybe; the rest are ignored.
pub const MAX_CALL_ME_MAYBE: usize = 32;

const TYPE_PING: u8 = 1;
const TYPE_PONG: u8 = 2;
const TYPE_CALL_ME_MAYBE: u8 = 3;
const V0: u8 = 0;
const ENDPOINT_LEN: usize = 18;

/// A ping's transaction id: random, echoed by the pong.
pub type TxId = [u8; 12];

/// One disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ping {
        tx: TxId,
        /// The sender's WireGuard key (absent from very old clients).
        node_key: Option<NodePublic>,
    },
    Pong {
        tx: TxId,
        /// Where the ping came from, as the answering node saw it.
        src: SocketAddr,
    },
    CallMeMaybe {
        endpoints: Vec<SocketAddr>,
    },
}

/// Why a datagram was not a usable disco message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("not a disco datagram (no magic, or shorter than a header and a tag)")]
    NotDisco,
    #[error("disco datagram of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("the box does not open with these keys")]
    BadBox,
    #[error("disco message shorter than its type needs")]
    Short,
    #[error("disco message type {0} is not handled")]
    UnknownType(u8),
}

/// A node's disco private key; one per run, as Tailscale clients make one per process.
#[derive(Clone)]
pub struct DiscoPrivate(NodePrivate);

impl std::fmt::Debug for DiscoPrivate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiscoPrivate({})", self.public())
    }
}

impl DiscoPrivate {
    pub fn generate() -> Self {
        DiscoPrivate(NodePrivate::generate())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DiscoPrivate(NodePrivate::from_bytes(bytes))
    }

    pub fn public(&self) -> DiscoPublic {
        DiscoPublic(self.0.public().0)
    }
}

/// The sender's disco key of a datagram that looks like disco, without opening it.
pub fn sender(datagram: &[u8]) -> Option<DiscoPublic> {
    if datagram.len() < MIN_LEN || !datagram.starts_with(MAGIC) {
        return None;
    }
    let key: [u8; KEY_LEN] = datagram[MAGIC.len()..MAGIC.len() + KEY_LEN]
        .try_into()
        .ok()?;
    Some(DiscoPublic(key))
}

/// The shared box between our disco key and one peer's (one X25519 agreement, kept for
/// the peer's lifetime).
pub struct PeerBox {
    own: DiscoPublic,
    peer: DiscoPublic,
    salsa: SalsaBox,
}

impl PeerBox {
    pub fn new(own: &DiscoPrivate, peer: &DiscoPublic) -> Self {
        PeerBox {
            own: own.public(),
            peer: *peer,
            salsa: SalsaBox::new(&PublicKey::from(peer.0), &SecretKey::from(own.0.to_bytes())),
        }
    }

    /// The peer's disco key.
    pub fn peer(&self) -> &DiscoPublic {
        &self.peer
    }

    /// Our disco key.
    pub fn own(&self) -> &DiscoPublic {
        &self.own
    }

    /// `msg` as a datagram from us to the peer, with a random nonce.
    pub fn seal(&self, msg: &Message) -> Vec<u8> {
        self.seal_with_nonce(msg, rand::random())
    }

    /// [`PeerBox::seal`] with a chosen nonce (tests).
    pub fn seal_with_nonce(&self, msg: &Message, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        // Encrypting into a Vec cannot fail.
        let boxed = self
            .salsa
            .encrypt(&Nonce::from(nonce), encode(msg).as_slice())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + boxed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.own.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&boxed);
        out
    }

    /// Open a datagram the peer sealed to us.
    pub fn open(&self, datagram: &[u8]) -> Result<Message, Error> {
        if datagram.len() > MAX_LEN {
            return Err(Error::TooLong(datagram.len()));
        }
        if sender(datagram) != Some(self.peer) {
            return Err(Error::NotDisco);
        }
        let nonce = Nonce::clone_from_slice(&datagram[MAGIC.len() + KEY_LEN..HEADER_LEN]);
        let plain = self
            .salsa
            .decrypt(&nonce, &datagram[HEADER_LEN..])
            .map_err(|_| Error::BadBox)?;
        decode(&plain)
    }
}

fn put_endpoint(out: &mut Vec<u8>, addr: &SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn get_endpoint(b: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let port = u16::from_be_bytes(b.get(16..18)?.try_into().ok()?);
    let ip = Ipv6Addr::from(ip);
    let ip = ip
        .to_ipv4_mapped()
        .map(IpAddr::V4)
        .unwrap_or(IpAddr::V6(ip));
    Some(SocketAddr::new(ip, port))
}

/// The plaintext of a message (type, version, payload).
pub fn encode(msg: &Message) -> Vec<u8> {
    match msg {
        Message::Ping { tx, node_key } => {
            let mut out = vec![TYPE_PING, V0];
            out.extend_from_slice(tx);
            if let Some(k) = node_key {
                out.extend_from_slice(&k.0);
            }
            out
        }
        Message::Pong { tx, src } => {
            let mut out = vec![TYPE_PONG, V0];
            out.extend_from_slice(tx);
            put_endpoint(&mut out, src);
            out
        }
        Message::CallMeMaybe { endpoints } => {
            let mut out = vec![TYPE_CALL_ME_MAYBE, V0];
            for e in endpoints.iter().take(MAX_CALL_ME_MAYBE) {
                put_endpoint(&mut out, e);
            }
            out
        }
    }
}

/// A message from its plaintext.
pub fn decode(plain: &[u8]) -> Result<Message, Error> {
    let [kind, version, payload @ ..] = plain else {
        return Err(Error::Short);
    };
    match *kind {
        TYPE_PING => {
            let tx: TxId = payload
                .get(..12)
                .ok_or(Error::Short)?
                .try_into()
                .map_err(|_| Error::Short)?;
            let node_key = payload
                .get(12..12 + KEY_LEN)
                .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
                .map(NodePublic);
            Ok(Message::Ping { tx, node_key })
        }
        TYPE_PONG => {
            let tx: TxId = payload
                .get(..12)
                .ok_or(Error::Short)?
                .try_into()
                .map_err(|_| Error::Short)?;
            let src = payload
                .get(12..)
                .and_then(get_endpoint)
                .ok_or(Error::Short)?;
            Ok(Message::Pong { tx, src })
        }
        TYPE_CALL_ME_MAYBE => {
            // As Tailscale: a payload that is not whole endpoints, or of another version,
            // is an empty call (still a hint to ping the endpoints we know).
            let endpoints = if *version == V0 && payload.len() % ENDPOINT_LEN == 0 {
                payload
                    .chunks_exact(ENDPOINT_LEN)
                    .take(MAX_CALL_ME_MAYBE)
                    .filter_map(get_endpoint)
                    .collect()
            } else {
                Vec::new()
            };
            Ok(Message::CallMeMaybe { endpoints })
        }
        other => Err(Error::UnknownType(other)),
    }
}

/// A fresh random transaction id.
pub fn new_tx() -> TxId {
    rand::random()
}

/// Arbitrary bytes into every parser; used by the fuzz target and the smoke test. Must
/// never panic, and whatever decodes must encode back to an equal message.
pub fn fuzz_one(data: &[u8]) {
    static BOX: std::sync::OnceLock<PeerBox> = std::sync::OnceLock::new();
    let _ = sender(data);
    let b = BOX.get_or_init(|| {
        PeerBox::new(
            &DiscoPrivate::from_bytes([1; 32]),
            &DiscoPrivate::from_bytes([2; 32]).public(),
        )
    });
    let _ = b.open(data);
    // With the sender key patched in, arbitrary bytes reach the box itself.
    if data.len() >= MIN_LEN && data.starts_with(MAGIC) {
        let mut d = data.to_vec();
        d[MAGIC.len()..MAGIC.len() + KEY_LEN].copy_from_slice(&b.peer.0);
        let _ = b.open(&d);
    }
    if let Ok(m) = decode(data) {
        assert_eq!(decode(&encode(&m)), Ok(m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (PeerBox, PeerBox, DiscoPrivate, DiscoPrivate) {
        let a = DiscoPrivate::generate();
        let b = DiscoPrivate::generate();
        (
            PeerBox::new(&a, &b.public()),
            PeerBox::new(&b, &a.public()),
            a,
            b,
        )
    }

    #[test]
    fn messages_round_trip_through_the_box() {
        let (ab, ba, a, _) = pair();
        let node = NodePrivate::generate().public();
        let msgs = [
            Message::Ping {
                tx: new_tx(),
                node_key: Some(node),
            },
            Message::Ping {
                tx: [7; 12],
                node_key: None,
            },
            Message::Pong {
                tx: [1; 12],
                src: "198.51.100.3:41641".parse().unwrap(),
            },
            Message::Pong {
                tx: [2; 12],
                src: "[2001:db8::3]:5".parse().unwrap(),
            },
            Message::CallMeMaybe {
                endpoints: vec![
                    "198.51.100.3:41641".parse().unwrap(),
                    "198.18.1.10:41641".parse().unwrap(),
                ],
            },
            Message::CallMeMaybe { endpoints: vec![] },
        ];
        for m in msgs {
            let d = ab.seal(&m);
            assert!(d.starts_with(MAGIC));
            assert_eq!(sender(&d), Some(a.public()));
            assert_eq!(ba.open(&d).unwrap(), m);
        }
    }

    /// Layouts as Tailscale's `disco` package writes them (byte for byte).
    #[test]
    fn wire_layout_matches_tailscale() {
        let key = NodePublic([0xab; 32]);
        let ping = encode(&Message::Ping {
            tx: [9; 12],
            node_key: Some(key),
        });
        assert_eq!(ping.len(), 2 + 12 + 32);
        assert_eq!(&ping[..2], &[1, 0]);
        assert_eq!(&ping[2..14], &[9; 12]);
        assert_eq!(&ping[14..], &[0xab; 32]);

        let pong = encode(&Message::Pong {
            tx: [3; 12],
            src: "198.51.100.3:41641".parse().unwrap(),
        });
        let mut want = vec![2, 0];
        want.extend_from_slice(&[3; 12]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 3]);
        want.extend_from_slice(&41641u16.to_be_bytes());
        assert_eq!(pong, want);

        let cmm = encode(&Message::CallMeMaybe {
            endpoints: vec!["[2001:db8::1]:7".parse().unwrap()],
        });
        assert_eq!(cmm.len(), 2 + 18);
        assert_eq!(cmm[..2], [3, 0]);
        assert_eq!(&cmm[2..4], &[0x20, 0x01]);
        assert_eq!(&cmm[18..], &[0, 7]);
    }

    #[test]
    fn lax_on_long_strict_on_short() {
        // Padding after a ping (MTU probes) and trailing bytes after a pong are fine.
        let mut ping = encode(&Message::Ping {
            tx: [1; 12],
            node_key: Some(NodePublic([2; 32])),
        });
        ping.extend_from_slice(&[0; 100]);
        assert!(matches!(
            decode(&ping),
            Ok(Message::Ping {
                node_key: Some(_),
                ..
            })
        ));
        assert_eq!(decode(&[1, 0, 1, 2, 3]), Err(Error::Short));
        assert_eq!(decode(&[2, 0]), Err(Error::Short));
        assert_eq!(decode(&[1]), Err(Error::Short));
        assert_eq!(decode(&[]), Err(Error::Short));
        assert_eq!(decode(&[9, 0, 1, 2]), Err(Error::UnknownType(9)));
        // A malformed call-me-maybe is an empty one.
        assert_eq!(
            decode(&[3, 0, 1, 2, 3]),
            Ok(Message::CallMeMaybe { endpoints: vec![] })
        );
        assert_eq!(
            decode(&[3, 1]),
            Ok(Message::CallMeMaybe { endpoints: vec![] })
        );
        // No more than MAX_CALL_ME_MAYBE endpoints are taken.
        let many: Vec<SocketAddr> = (0..100u16)
            .map(|p| SocketAddr::from(([198, 51, 100, 7], p)))
            .collect();
        let mut plain = vec![3, 0];
        for e in &many {
            put_endpoint(&mut plain, e);
        }
        match decode(&plain).unwrap() {
            Message::CallMeMaybe { endpoints } => assert_eq!(endpoints.len(), MAX_CALL_ME_MAYBE),
            _ => unreachable!(),
        }
    }

    #[test]
    fn bad_boxes_are_rejected() {
        let (ab, ba, _, _) = pair();
        let d = ab.seal(&Message::Ping {
            tx: [1; 12],
            node_key: None,
        });
        // Any flipped bit in the nonce or the box fails authentication.
        for i in [
            MAGIC.len() + KEY_LEN,
            HEADER_LEN,
            HEADER_LEN + TAG_LEN,
            d.len() - 1,
        ] {
            let mut bad = d.clone();
            bad[i] ^= 1;
            assert_eq!(ba.open(&bad), Err(Error::BadBox), "byte {i}");
        }
        // Sealed by a third party claiming to be the peer: the box does not open.
        let (mallory, _, _, _) = pair();
        let mut forged = mallory.seal(&Message::Ping {
            tx: [1; 12],
            node_key: None,
        });
        forged[MAGIC.len()..MAGIC.len() + KEY_LEN].copy_from_slice(&ab.own.0);
        assert_eq!(ba.open(&forged), Err(Error::BadBox));
        // From another sender, truncated, oversized, or no magic.
        assert_eq!(
            ab.open(&d),
            Err(Error::NotDisco),
            "our own message is not from the peer"
        );
        assert_eq!(ba.open(&d[..MIN_LEN - 1]), Err(Error::NotDisco));
        assert_eq!(
            ba.open(&vec![0; MAX_LEN + 1]),
            Err(Error::TooLong(MAX_LEN + 1))
        );
        let mut no_magic = d.clone();
        no_magic[0] = b'X';
        assert_eq!(ba.open(&no_magic), Err(Error::NotDisco));
        // A box of an unknown type opens but is refused.
        let mut odd = ab.seal(&Message::Ping {
            tx: [1; 12],
            node_key: None,
        });
        odd.truncate(HEADER_LEN);
        let boxed = ab
            .salsa
            .encrypt(
                &Nonce::from(<[u8; 24]>::try_from(&d[38..62]).unwrap()),
                &[42u8, 0][..],
            )
            .unwrap();
        odd[38..62].copy_from_slice(&d[38..62]);
        odd.extend_from_slice(&boxed);
        assert_eq!(ba.open(&odd), Err(Error::UnknownType(42)));
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        let (ab, _, _, _) = pair();
        let sealed = ab.seal(&Message::CallMeMaybe {
            endpoints: vec!["198.51.100.3:1".parse().unwrap()],
        });
        for input in [&[][..], &[1, 0], &[3, 0, 0], MAGIC, &sealed, &[0xff; 200]] {
            fuzz_one(input);
        }
        for len in 0..200 {
            let v: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            fuzz_one(&v);
        }
    }
}
