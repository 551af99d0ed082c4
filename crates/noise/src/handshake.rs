//! Noise IK handshake (`Noise_IK_25519_ChaChaPoly_BLAKE2s`) for both roles,
//! as Tailscale's `control/controlbase/handshake.go` runs it.
//!
//! Why our own symmetric state instead of snow: the transport that follows
//! uses big-endian nonces (see [`crate::conn`]), so we need the raw split keys
//! anyway; and Go refuses an all-zero X25519 result (a low-order peer key),
//! which snow accepts. The handshake itself is plain Noise IK — the tests
//! cross-check it against snow in both directions.
//!
//! ```text
//! prologue: "Tailscale Control Protocol v" + decimal capability version
//! <- s
//! -> e, es, s, ss    (empty payload)
//! <- e, ee, se       (empty payload)
//! split: client tx = k1, server tx = k2
//! ```

use blake2::{Blake2s256, Digest};
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use hkdf::SimpleHkdf;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::conn::Conn;
use crate::frame::{
    self, FrameError, INITIATION_LEN, INITIATION_PAYLOAD_LEN, RESPONSE_LEN, RESPONSE_PAYLOAD_LEN,
};

/// The Noise protocol name; hashed into the initial state.
pub const PROTOCOL_NAME: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Prologue prefix; the client's capability version follows in decimal.
pub const PROLOGUE_PREFIX: &str = "Tailscale Control Protocol v";

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The handshake message is malformed.
    #[error("malformed handshake message: {0}")]
    Frame(#[from] FrameError),
    /// A peer key gave an all-zero X25519 result (low-order point).
    #[error("computing {0}: low-order public key")]
    LowOrderKey(&'static str),
    /// Authentication failed: wrong server key, tampering, or garbage.
    #[error("decrypting {0}: authentication failed")]
    Decrypt(&'static str),
    /// The server answered with an (unauthenticated) error frame.
    #[error("server refused handshake: {0:?}")]
    ServerRefused(String),
}

impl HandshakeError {
    /// The error frame Go's `controlbase.Server` would send the client for
    /// this failure (it does so only for framing problems, never for
    /// cryptographic ones, so as not to help an attacker).
    pub fn error_frame(&self) -> Option<Vec<u8>> {
        let msg = match self {
            HandshakeError::Frame(FrameError::Truncated { .. } | FrameError::TrailingBytes(_)) => {
                "wrong handshake initiation size"
            }
            HandshakeError::Frame(
                FrameError::UnexpectedType { .. } | FrameError::UnknownType(_),
            ) => "unexpected handshake message type",
            HandshakeError::Frame(FrameError::WrongLength { .. }) => {
                "wrong handshake initiation length"
            }
            _ => return None,
        };
        Some(frame::encode_error(msg))
    }
}

/// The prologue bytes for a capability version.
pub fn prologue(version: u16) -> Vec<u8> {
    format!("{PROLOGUE_PREFIX}{version}").into_bytes()
}

/// Noise symmetric state: handshake hash and chaining key.
#[derive(Clone)]
struct Symmetric {
    h: [u8; 32],
    ck: [u8; 32],
}

impl Symmetric {
    fn new() -> Self {
        // The name is 33 bytes, longer than HASHLEN, so it is hashed.
        let h: [u8; 32] = Blake2s256::digest(PROTOCOL_NAME.as_bytes()).into();
        Symmetric { h, ck: h }
    }

    fn mix_hash(&mut self, data: &[u8]) {
        let mut d = Blake2s256::new();
        d.update(self.h);
        d.update(data);
        self.h = d.finalize().into();
    }

    /// MixKey(DH(private, public)); returns the single-use cipher key.
    fn mix_dh(
        &mut self,
        private: &StaticSecret,
        public: &[u8; 32],
        what: &'static str,
    ) -> Result<[u8; 32], HandshakeError> {
        let shared = private.diffie_hellman(&PublicKey::from(*public));
        if !shared.was_contributory() {
            return Err(HandshakeError::LowOrderKey(what));
        }
        let (ck, k) = hkdf2(&self.ck, shared.as_bytes());
        self.ck = ck;
        Ok(k)
    }

    /// EncryptAndHash with a fresh key, hence nonce 0.
    fn encrypt_and_hash(&mut self, key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
        let aead = ChaCha20Poly1305::new(key.into());
        let nonce = [0u8; 12];
        // Encryption with a valid key cannot fail; an empty result would be
        // caught by the peer's authentication anyway.
        let ct = aead
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: &self.h,
                },
            )
            .unwrap_or_default();
        self.mix_hash(&ct);
        ct
    }

    fn decrypt_and_hash(
        &mut self,
        key: &[u8; 32],
        ciphertext: &[u8],
        what: &'static str,
    ) -> Result<Vec<u8>, HandshakeError> {
        let aead = ChaCha20Poly1305::new(key.into());
        let nonce = [0u8; 12];
        let pt = aead
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: ciphertext,
                    aad: &self.h,
                },
            )
            .map_err(|_| HandshakeError::Decrypt(what))?;
        self.mix_hash(ciphertext);
        Ok(pt)
    }

    fn split(&self) -> ([u8; 32], [u8; 32]) {
        hkdf2(&self.ck, &[])
    }
}

/// Noise's HKDF with two outputs: RFC 5869 HKDF-BLAKE2s with the chaining
/// key as salt and empty info (what Go's `hkdf.New(blake2s, ikm, ck, nil)`
/// computes).
fn hkdf2(ck: &[u8; 32], ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
    let hk = SimpleHkdf::<Blake2s256>::new(Some(ck), ikm);
    let mut okm = [0u8; 64];
    // 64 bytes is far below HKDF's 255*32 limit: expand cannot fail.
    let _ = hk.expand(&[], &mut okm);
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..]);
    (a, b)
}

fn public_of(private: &StaticSecret) -> [u8; 32] {
    PublicKey::from(private).to_bytes()
}

/// Derives the X25519 public key of a private key (machine or server key).
pub fn public_key(private: [u8; 32]) -> [u8; 32] {
    public_of(&StaticSecret::from(private))
}

fn random_secret() -> StaticSecret {
    StaticSecret::from(rand::random::<[u8; 32]>())
}

/// A client handshake waiting for the server's response.
pub struct ClientHandshake {
    sym: Symmetric,
    machine: StaticSecret,
    ephemeral: StaticSecret,
    server_public: [u8; 32],
    version: u16,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandshake")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Starts a client handshake: returns the state to finish it and the
/// 101-byte initiation frame (to send raw, or base64 in
/// `X-Tailscale-Handshake`). Fails only for a low-order server key.
pub fn client_initiate(
    machine_private: [u8; 32],
    server_public: [u8; 32],
    capver: u16,
) -> Result<(ClientHandshake, [u8; INITIATION_LEN]), HandshakeError> {
    client_initiate_with_ephemeral(
        machine_private,
        server_public,
        capver,
        random_secret().to_bytes(),
    )
}

/// [`client_initiate`] with a caller-chosen ephemeral key. Only for
/// known-answer tests: reusing an ephemeral key breaks forward secrecy.
#[doc(hidden)]
pub fn client_initiate_with_ephemeral(
    machine_private: [u8; 32],
    server_public: [u8; 32],
    capver: u16,
    ephemeral_private: [u8; 32],
) -> Result<(ClientHandshake, [u8; INITIATION_LEN]), HandshakeError> {
    let machine = StaticSecret::from(machine_private);
    let ephemeral = StaticSecret::from(ephemeral_private);
    let mut sym = Symmetric::new();
    sym.mix_hash(&prologue(capver));
    // <- s
    sym.mix_hash(&server_public);
    // -> e, es, s, ss
    let e_pub = public_of(&ephemeral);
    sym.mix_hash(&e_pub);
    let k = sym.mix_dh(&ephemeral, &server_public, "es")?;
    let enc_s = sym.encrypt_and_hash(&k, &public_of(&machine));
    let k = sym.mix_dh(&machine, &server_public, "ss")?;
    let tag = sym.encrypt_and_hash(&k, &[]);

    let mut payload = [0u8; INITIATION_PAYLOAD_LEN];
    payload[..32].copy_from_slice(&e_pub);
    payload[32..80].copy_from_slice(&enc_s);
    payload[80..].copy_from_slice(&tag);
    let hs = ClientHandshake {
        sym,
        machine,
        ephemeral,
        server_public,
        version: capver,
    };
    Ok((hs, frame::encode_initiation(capver, &payload)))
}

impl ClientHandshake {
    /// The capability version this handshake announced.
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// Finishes the handshake with the server's answer: exactly one response
    /// frame ([`RESPONSE_LEN`] bytes) or an error frame.
    pub fn finish(self, response: &[u8]) -> Result<Conn, HandshakeError> {
        let msg = match frame::parse_response(response)? {
            Ok(msg) => msg,
            Err(text) => return Err(HandshakeError::ServerRefused(text)),
        };
        let mut sym = self.sym;
        // <- e, ee, se
        let mut re = [0u8; 32];
        re.copy_from_slice(&msg[..32]);
        sym.mix_hash(&re);
        sym.mix_dh(&self.ephemeral, &re, "ee")?;
        let k = sym.mix_dh(&self.machine, &re, "se")?;
        sym.decrypt_and_hash(&k, &msg[32..], "response tag")?;
        let (k1, k2) = sym.split();
        Ok(Conn::new(k1, k2, self.server_public, self.version, sym.h))
    }
}

/// What the server learns from a successful handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    /// The established transport.
    pub conn: Conn,
    /// The response frame to send to the client before any record.
    pub response: [u8; RESPONSE_LEN],
    /// The client's machine public key (authenticated by the handshake).
    pub machine_public: [u8; 32],
    /// The client's capability version (authenticated via the prologue).
    pub capver: u16,
}

/// Answers a client's initiation frame. Pure computation: the caller sends
/// `response` (on failure, [`HandshakeError::error_frame`] if any) itself.
pub fn server_accept(
    server_private: [u8; 32],
    initiation: &[u8],
) -> Result<ServerHandshake, HandshakeError> {
    server_accept_with_ephemeral(server_private, initiation, random_secret().to_bytes())
}

/// [`server_accept`] with a caller-chosen ephemeral key; known-answer tests
/// only.
#[doc(hidden)]
pub fn server_accept_with_ephemeral(
    server_private: [u8; 32],
    initiation: &[u8],
    ephemeral_private: [u8; 32],
) -> Result<ServerHandshake, HandshakeError> {
    let (version, msg) = frame::parse_initiation(initiation)?;
    let server = StaticSecret::from(server_private);
    let mut sym = Symmetric::new();
    sym.mix_hash(&prologue(version));
    // <- s
    sym.mix_hash(&public_of(&server));
    // -> e, es, s, ss
    let mut re = [0u8; 32];
    re.copy_from_slice(&msg[..32]);
    sym.mix_hash(&re);
    let k = sym.mix_dh(&server, &re, "es")?;
    let machine = sym.decrypt_and_hash(&k, &msg[32..80], "machine key")?;
    let machine_public: [u8; 32] = machine
        .as_slice()
        .try_into()
        .map_err(|_| HandshakeError::Decrypt("machine key"))?;
    let k = sym.mix_dh(&server, &machine_public, "ss")?;
    sym.decrypt_and_hash(&k, &msg[80..], "initiation tag")?;
    // <- e, ee, se
    let ephemeral = StaticSecret::from(ephemeral_private);
    let e_pub = public_of(&ephemeral);
    sym.mix_hash(&e_pub);
    sym.mix_dh(&ephemeral, &re, "ee")?;
    let k = sym.mix_dh(&ephemeral, &machine_public, "se")?;
    let tag = sym.encrypt_and_hash(&k, &[]);
    let mut payload = [0u8; RESPONSE_PAYLOAD_LEN];
    payload[..32].copy_from_slice(&e_pub);
    payload[32..].copy_from_slice(&tag);
    let (k1, k2) = sym.split();
    Ok(ServerHandshake {
        conn: Conn::new(k2, k1, machine_public, version, sym.h),
        response: frame::encode_response(&payload),
        machine_public,
        capver: version,
    })
}
