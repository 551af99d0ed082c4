//! The login exchange's two sealed messages.
//!
//! `ClientInfo` and `ServerInfo` are JSON objects sealed with NaCl's `crypto_box`
//! (curve25519-xsalsa20-poly1305) between the client's node key and the server's DERP
//! key, written as a fresh 24-byte nonce followed by the box (tag, then ciphertext), which
//! is the layout of Go's `key.NodePrivate.SealTo`. Opening a client's box proves that the
//! client holds the private half of the node key it claims.

use crypto_box::aead::Aead as _;
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use serde::{Deserialize, Serialize};
use tsunagu_proto::{NodePrivate, NodePublic};

use crate::frame::NONCE_LEN;

/// What a client says about itself (Go's `derp.clientInfo`; Go's JSON names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(rename = "version", default)]
    pub version: u32,
    /// Pre-shared key of trusted mesh peers; empty for ordinary clients.
    #[serde(rename = "meshKey", default, skip_serializing_if = "String::is_empty")]
    pub mesh_key: String,
    #[serde(rename = "CanAckPings", default)]
    pub can_ack_pings: bool,
    #[serde(rename = "IsProber", default, skip_serializing_if = "is_false")]
    pub is_prober: bool,
    /// tsunagu's own: which host of the node key this is (tsunagud sends its machine
    /// key). The hosts of an exit node with standby hosts share its node key; the relay
    /// keeps a connection of each and delivers to the active one (see
    /// [`crate::registry`]). Other relays ignore it.
    #[serde(
        rename = "tsunaguHost",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub host: String,
}

/// What the server tells a client after login (Go's `derp.serverInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    #[serde(rename = "version", default)]
    pub version: u32,
    /// Bytes per second the server accepts from this client; 0 = not said.
    #[serde(
        rename = "TokenBucketBytesPerSecond",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_per_second: u64,
    #[serde(
        rename = "TokenBucketBytesBurst",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_burst: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BoxError {
    #[error("sealed message shorter than a nonce and a tag")]
    Short,
    #[error("the box does not open with these keys")]
    Open,
    #[error("the opened message is not valid JSON for this type: {0}")]
    Json(String),
}

fn salsa_box(own: &NodePrivate, peer: &NodePublic) -> SalsaBox {
    SalsaBox::new(&PublicKey::from(peer.0), &SecretKey::from(own.to_bytes()))
}

/// Seals `msg` from `own` to `peer` with a random nonce: nonce ‖ box.
pub fn seal(own: &NodePrivate, peer: &NodePublic, msg: &[u8]) -> Vec<u8> {
    seal_with_nonce(own, peer, msg, rand::random())
}

/// [`seal`] with a chosen nonce (tests).
pub fn seal_with_nonce(
    own: &NodePrivate,
    peer: &NodePublic,
    msg: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Vec<u8> {
    let n = Nonce::from(nonce);
    // Encrypting into a Vec cannot fail for messages of any size we build.
    let boxed = salsa_box(own, peer).encrypt(&n, msg).unwrap_or_default();
    let mut out = Vec::with_capacity(NONCE_LEN + boxed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&boxed);
    out
}

/// Opens nonce ‖ box sealed by `peer` to `own`.
pub fn open(own: &NodePrivate, peer: &NodePublic, sealed: &[u8]) -> Result<Vec<u8>, BoxError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(BoxError::Short);
    }
    let (nonce, boxed) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::clone_from_slice(nonce);
    salsa_box(own, peer)
        .decrypt(&nonce, boxed)
        .map_err(|_| BoxError::Open)
}

/// Seals a JSON value.
pub fn seal_json<T: Serialize>(own: &NodePrivate, peer: &NodePublic, v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    seal(own, peer, &serde_json::to_vec(v).unwrap_or_default())
}

/// Opens and parses a JSON value.
pub fn open_json<T: serde::de::DeserializeOwned>(
    own: &NodePrivate,
    peer: &NodePublic,
    sealed: &[u8],
) -> Result<T, BoxError> {
    let plain = open(own, peer, sealed)?;
    serde_json::from_slice(&plain).map_err(|e| BoxError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_open_only_for_the_right_pair() {
        let a = NodePrivate::generate();
        let b = NodePrivate::generate();
        let c = NodePrivate::generate();
        let sealed = seal(&a, &b.public(), b"{\"version\":2}");
        assert_eq!(open(&b, &a.public(), &sealed).unwrap(), b"{\"version\":2}");
        assert_eq!(open(&c, &a.public(), &sealed), Err(BoxError::Open));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(open(&b, &a.public(), &bad), Err(BoxError::Open));
        assert_eq!(open(&b, &a.public(), &sealed[..30]), Err(BoxError::Short));
    }

    /// The sealed form is the nonce, then the box (16-byte tag + ciphertext): Go's
    /// `SealTo` layout. (Interoperability itself is shown by the Go client lab test.)
    #[test]
    fn layout_is_nonce_then_tag_then_ciphertext() {
        let a = NodePrivate::from_bytes([1; 32]);
        let b = NodePrivate::from_bytes([2; 32]);
        let sealed = seal_with_nonce(&a, &b.public(), &[0; 32], [0; 24]);
        assert_eq!(sealed.len(), 24 + 16 + 32);
        assert_eq!(&sealed[..24], &[0; 24]);
    }

    #[test]
    fn info_json_uses_go_names() {
        let ci = ClientInfo {
            version: 2,
            mesh_key: String::new(),
            can_ack_pings: true,
            is_prober: false,
            host: String::new(),
        };
        assert_eq!(
            serde_json::to_string(&ci).unwrap(),
            r#"{"version":2,"CanAckPings":true}"#
        );
        let go: ClientInfo =
            serde_json::from_str(r#"{"version":2,"meshKey":"abc","CanAckPings":false}"#).unwrap();
        assert_eq!(go.mesh_key, "abc");
        let si = ServerInfo {
            version: 2,
            ..ServerInfo::default()
        };
        assert_eq!(serde_json::to_string(&si).unwrap(), r#"{"version":2}"#);
    }
}
