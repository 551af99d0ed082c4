//! Node keys.
//!
//! A node key is an X25519 key pair: the WireGuard static key of the node. Two text forms
//! are accepted everywhere a key is read, because users meet both: the WireGuard form
//! (standard base64 of the 32 bytes, what `wg genkey` prints) and Tailscale's
//! (`nodekey:` + 64 lowercase hex digits; private keys `privkey:`). Keys are printed in
//! the WireGuard form; [`NodePublic::tailscale`] gives the other.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::fmt;
use std::str::FromStr;

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error(
        "not a key: expected 44 characters of base64 or {prefix}<64 hex digits>, got {len} characters"
    )]
    Format { prefix: &'static str, len: usize },
    #[error("key decodes to {0} bytes, expected 32")]
    Length(usize),
    #[error("invalid hex digit in key")]
    Hex,
}

fn parse32(s: &str, prefix: &'static str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix(prefix) {
        if hex.len() != 64 {
            return Err(KeyError::Format {
                prefix,
                len: s.len(),
            });
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or(KeyError::Hex)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| KeyError::Hex)?;
        }
        return Ok(out);
    }
    if s.len() != 44 {
        return Err(KeyError::Format {
            prefix,
            len: s.len(),
        });
    }
    let bytes = B64.decode(s).map_err(|_| KeyError::Format {
        prefix,
        len: s.len(),
    })?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Length(bytes.len()))
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A node's public key: its identity on the tailnet and its WireGuard static public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePublic(pub [u8; 32]);

impl NodePublic {
    /// The Tailscale text form, `nodekey:<hex>`.
    pub fn tailscale(&self) -> String {
        format!("nodekey:{}", hex(&self.0))
    }

    /// A short form for logs: the first 8 base64 characters, as `wg show` users expect.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl FromStr for NodePublic {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse32(s, "nodekey:").map(NodePublic)
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublic({})", self.short())
    }
}

/// A node's private key. Its `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct NodePrivate([u8; 32]);

impl NodePrivate {
    /// A fresh random key (clamped as X25519 requires).
    pub fn generate() -> Self {
        let mut bytes: [u8; 32] = rand::random();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        NodePrivate(bytes)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        NodePrivate(bytes)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The matching public key.
    pub fn public(&self) -> NodePublic {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        NodePublic(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// The WireGuard text form (base64), for writing key files.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }
}

impl FromStr for NodePrivate {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse32(s, "privkey:").map(NodePrivate)
    }
}

impl fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePrivate(public {})", self.public().short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_text_forms_round_trip() {
        let private = NodePrivate::generate();
        let public = private.public();
        let b64: NodePublic = public.to_string().parse().unwrap();
        let ts: NodePublic = public.tailscale().parse().unwrap();
        assert_eq!(b64, public);
        assert_eq!(ts, public);
        let back: NodePrivate = private.to_base64().parse().unwrap();
        assert_eq!(back.public(), public);
    }

    #[test]
    fn known_vector_matches_wireguard() {
        // `wg pubkey` of this private key (RFC 7748 section 6.1, Alice).
        let private: NodePrivate = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo="
            .parse()
            .unwrap();
        assert_eq!(
            private.public().to_string(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn bad_keys_are_rejected_with_reason() {
        assert!(matches!(
            "abc".parse::<NodePublic>(),
            Err(KeyError::Format { .. })
        ));
        let bad_hex = format!("nodekey:{}", "zz".repeat(32));
        assert_eq!(bad_hex.parse::<NodePublic>(), Err(KeyError::Hex));
        // 44 chars of base64 that decode to 33 bytes cannot occur; 44 non-base64 chars can.
        assert!("!".repeat(44).parse::<NodePublic>().is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let private = NodePrivate::generate();
        let shown = format!("{private:?}");
        assert!(!shown.contains(&private.to_base64()));
    }
}
