//! Keys: node keys and the other X25519 keys of Tailscale's control protocol.
//!
//! A node key is an X25519 key pair: the WireGuard static key of the node. Two text forms
//! are accepted everywhere a node key is read, because users meet both: the WireGuard form
//! (standard base64 of the 32 bytes, what `wg genkey` prints) and Tailscale's
//! (`nodekey:` + 64 lowercase hex digits; private keys `privkey:`). Node keys are printed
//! (`Display`) in the WireGuard form; [`NodePublic::tailscale`] gives the other, and serde
//! uses the Tailscale form because that is what Go's `key.NodePublic.MarshalText` writes on
//! the wire.
//!
//! The control-protocol keys ([`MachinePublic`], [`MachinePrivate`], [`DiscoPublic`],
//! [`ChallengePublic`]) only exist in Tailscale's typed-hex form (`mkey:`, `privkey:`,
//! `discokey:`, `chalpub:`), in text and in serde alike.
//!
//! Zero keys: Go marshals an unset key as its prefix plus 64 zeros (`"nodekey:000…"`), never
//! as an empty string, and so do we. Go's parser rejects `""`; fields whose zero value means
//! "absent" (`RegisterRequest.OldNodeKey`, `MapRequest.DiscoKey`, …) read `""` as the zero
//! key through [`de_zero_if_empty`], for clients that are less careful than Go's.

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
    #[error("not a key: expected {prefix}<64 hex digits>, got {len} characters")]
    Prefixed { prefix: &'static str, len: usize },
}

/// Decodes exactly 64 hex digits (either case, as Go's `key.parseHex` accepts).
fn decode_hex64(hex: &str) -> Result<[u8; 32], KeyError> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return Err(KeyError::Length(digits.len() / 2));
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(KeyError::Hex),
    };
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (nibble(digits[2 * i])? << 4) | nibble(digits[2 * i + 1])?;
    }
    Ok(out)
}

/// Reads `<prefix><64 hex digits>`, the only text form of the control-protocol keys.
fn parse_prefixed(s: &str, prefix: &'static str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    match s.strip_prefix(prefix) {
        Some(hex) if hex.len() == 64 => decode_hex64(hex),
        _ => Err(KeyError::Prefixed {
            prefix,
            len: s.len(),
        }),
    }
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
        return decode_hex64(hex);
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
    // A table, not `format!` per byte: keys are written for every peer of every map.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
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

impl NodePublic {
    /// The zero key: what Go writes for an unset `key.NodePublic` (e.g. `OldNodeKey`).
    pub const ZERO: NodePublic = NodePublic([0; 32]);

    /// Whether this is the zero key, i.e. "no key" in Go's encoding.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
}

impl Default for NodePublic {
    /// The zero key, as Go's zero value of `key.NodePublic`.
    fn default() -> Self {
        NodePublic::ZERO
    }
}

impl serde::Serialize for NodePublic {
    /// `"nodekey:<hex>"`, as Go's `key.NodePublic.MarshalText` (zero keys included).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.tailscale())
    }
}

impl<'de> serde::Deserialize<'de> for NodePublic {
    /// Any form [`FromStr`] reads: `nodekey:<hex>` (Go's) or base64 (WireGuard's).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A 32-byte public key with a zero value, for the serde helpers below.
pub trait ZeroableKey: Sized + FromStr<Err = KeyError> {
    /// The all-zero key, Go's zero value for the type.
    fn zero() -> Self;
}

impl ZeroableKey for NodePublic {
    fn zero() -> Self {
        NodePublic::ZERO
    }
}

/// serde `deserialize_with` for key fields whose zero value means "absent": reads `""` and
/// `null` as the zero key and anything else as the key type's text form.
///
/// Go itself always writes the zero key as `prefix:000…` (accepted here too); the leniency
/// is for hand-written and non-Go clients.
pub fn de_zero_if_empty<'de, D, K>(d: D) -> Result<K, D::Error>
where
    D: serde::Deserializer<'de>,
    K: ZeroableKey,
{
    use serde::Deserialize as _;
    match <Option<std::borrow::Cow<'de, str>>>::deserialize(d)? {
        None => Ok(K::zero()),
        Some(s) if s.trim().is_empty() => Ok(K::zero()),
        Some(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// Defines a public key type that only has Tailscale's `prefix:<hex>` text form.
macro_rules! prefixed_public_key {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The text prefix Go's `MarshalText` writes for this key type.
            pub const PREFIX: &'static str = $prefix;
            /// The zero key, Go's zero value (written as the prefix plus 64 zeros).
            pub const ZERO: $name = $name([0; 32]);

            /// Whether this is the zero key, i.e. "no key" in Go's encoding.
            pub fn is_zero(&self) -> bool {
                self.0 == [0; 32]
            }

            /// The raw 32 bytes.
            pub fn to_bytes(&self) -> [u8; 32] {
                self.0
            }

            /// A short form for logs: the prefix and the first 8 hex digits.
            pub fn short(&self) -> String {
                let mut s = self.to_string();
                s.truncate(Self::PREFIX.len() + 8);
                s
            }
        }

        impl FromStr for $name {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                parse_prefixed(s, $prefix).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($prefix)?;
                f.write_str(&hex(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl ZeroableKey for $name {
            fn zero() -> Self {
                $name::ZERO
            }
        }
    };
}

prefixed_public_key!(
    /// A machine public key (`mkey:<hex>`, Go's `key.MachinePublic`): the static Noise key
    /// of a device's control connection (the client's), or of the coordination server (the
    /// one `GET /key` publishes).
    MachinePublic,
    "mkey:"
);

prefixed_public_key!(
    /// A disco public key (`discokey:<hex>`, Go's `key.DiscoPublic`): the key a node seals
    /// its path-discovery (disco) messages with. Zero means the node does not speak disco.
    DiscoPublic,
    "discokey:"
);

prefixed_public_key!(
    /// A node-key challenge public key (`chalpub:<hex>`, Go's `key.ChallengePublic`), sent
    /// per connection in [`EarlyNoise`](crate::tailcfg::EarlyNoise).
    ChallengePublic,
    "chalpub:"
);

/// A machine private key: the static Noise key of a coordination server (or of a client's
/// control connection). Its text form is Go's `privkey:<hex>` ([`Display`](fmt::Display),
/// [`FromStr`] and serde, for persisting it); its `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct MachinePrivate([u8; 32]);

impl MachinePrivate {
    /// The text prefix Go's `key.MachinePrivate.MarshalText` writes.
    pub const PREFIX: &'static str = "privkey:";

    /// A fresh random key (clamped as X25519 requires).
    pub fn generate() -> Self {
        MachinePrivate(NodePrivate::generate().to_bytes())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MachinePrivate(bytes)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The matching public key.
    pub fn public(&self) -> MachinePublic {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        MachinePublic(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl FromStr for MachinePrivate {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_prefixed(s, Self::PREFIX).map(MachinePrivate)
    }
}

impl fmt::Display for MachinePrivate {
    /// The secret itself, `privkey:<hex>`: only for writing it to its state file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::PREFIX)?;
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for MachinePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MachinePrivate(public {})", self.public().short())
    }
}

impl serde::Serialize for MachinePrivate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MachinePrivate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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

    #[test]
    fn node_public_serde_is_tailscale_hex_and_reads_both_forms() {
        let public = NodePrivate::generate().public();
        let json = serde_json::to_string(&public).unwrap();
        assert_eq!(json, format!("\"{}\"", public.tailscale()));
        let back: NodePublic = serde_json::from_str(&json).unwrap();
        assert_eq!(back, public);
        let from_b64: NodePublic = serde_json::from_str(&format!("\"{public}\"")).unwrap();
        assert_eq!(from_b64, public);
        // Display stays base64 (tsunagud's TOML relies on it).
        assert_eq!(public.to_string().len(), 44);
        let zero = serde_json::to_string(&NodePublic::ZERO).unwrap();
        assert_eq!(zero, format!("\"nodekey:{}\"", "0".repeat(64)));
        assert!(serde_json::from_str::<NodePublic>(&zero).unwrap().is_zero());
    }

    #[test]
    fn prefixed_keys_round_trip_in_all_forms() {
        for _ in 0..64 {
            let private = MachinePrivate::generate();
            let text = private.to_string();
            assert!(text.starts_with("privkey:") && text.len() == 8 + 64);
            let back: MachinePrivate = text.parse().unwrap();
            assert_eq!(back, private);
            let json = serde_json::to_string(&private).unwrap();
            assert_eq!(
                serde_json::from_str::<MachinePrivate>(&json).unwrap(),
                private
            );

            let mkey = private.public();
            let disco = DiscoPublic(rand::random());
            let chal = ChallengePublic(rand::random());
            for (text, prefix) in [
                (mkey.to_string(), "mkey:"),
                (disco.to_string(), "discokey:"),
                (chal.to_string(), "chalpub:"),
            ] {
                assert!(text.starts_with(prefix), "{text}");
                assert_eq!(text.len(), prefix.len() + 64);
                assert_eq!(text, text.to_lowercase());
            }
            assert_eq!(mkey.to_string().parse::<MachinePublic>().unwrap(), mkey);
            assert_eq!(disco.to_string().parse::<DiscoPublic>().unwrap(), disco);
            assert_eq!(chal.to_string().parse::<ChallengePublic>().unwrap(), chal);
            // Go's parser accepts upper-case hex digits; so do we.
            let upper = format!("mkey:{}", &mkey.to_string()[5..].to_uppercase());
            assert_eq!(upper.parse::<MachinePublic>().unwrap(), mkey);
            let json = serde_json::to_string(&disco).unwrap();
            assert_eq!(json, format!("\"{disco}\""));
            assert_eq!(serde_json::from_str::<DiscoPublic>(&json).unwrap(), disco);
        }
    }

    #[test]
    fn machine_key_matches_x25519_vector() {
        // RFC 7748 section 6.1 (Alice), in Tailscale's hex form.
        let private: MachinePrivate =
            "privkey:77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
                .parse()
                .unwrap();
        assert_eq!(
            private.public().to_string(),
            "mkey:8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn bad_prefixed_keys_are_rejected() {
        let hex64 = "ab".repeat(32);
        for bad in [
            String::new(),
            "mkey:".to_string(),
            format!("mkey:{}", &hex64[..62]),
            format!("mkey:{hex64}00"),
            format!("nodekey:{hex64}"),
            format!("discokey:{hex64}"),
            hex64.clone(),
            B64.encode([7u8; 32]),
        ] {
            assert!(
                matches!(
                    bad.parse::<MachinePublic>(),
                    Err(KeyError::Prefixed {
                        prefix: "mkey:",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        let bad_hex = format!("mkey:{}", "g".repeat(64));
        assert_eq!(bad_hex.parse::<MachinePublic>(), Err(KeyError::Hex));
        assert_eq!(
            format!("discokey:{}é", "0".repeat(62)).parse::<DiscoPublic>(),
            Err(KeyError::Hex)
        );
        assert!(
            format!("nodekey:{hex64}")
                .parse::<MachinePrivate>()
                .is_err()
        );
        assert!(serde_json::from_str::<DiscoPublic>("\"\"").is_err());
        assert!(serde_json::from_str::<DiscoPublic>("42").is_err());
        assert!(serde_json::from_str::<NodePublic>("\"nodekey:xyz\"").is_err());
    }

    #[test]
    fn zero_if_empty_accepts_empty_null_and_zero() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "de_zero_if_empty")]
            k: NodePublic,
            #[serde(default, deserialize_with = "de_zero_if_empty")]
            d: DiscoPublic,
        }
        for json in [
            r#"{"k":"","d":""}"#,
            r#"{"k":null,"d":null}"#,
            r#"{}"#,
            r#"{"k":"nodekey:0000000000000000000000000000000000000000000000000000000000000000",
                "d":"discokey:0000000000000000000000000000000000000000000000000000000000000000"}"#,
        ] {
            let t: T = serde_json::from_str(json).unwrap();
            assert!(t.k.is_zero() && t.d.is_zero(), "{json}");
        }
        assert!(serde_json::from_str::<T>(r#"{"k":"junk"}"#).is_err());
    }

    #[test]
    fn machine_private_debug_never_shows_the_secret() {
        let private = MachinePrivate::generate();
        let shown = format!("{private:?}");
        assert!(!shown.contains(&private.to_string()[8..]));
        assert!(!shown.contains(&private.to_string()[8..24]));
        assert!(shown.contains("mkey:"));
    }
}
