//! The server key, the early Noise payload, and registration (`POST /machine/register`).

use super::de::{is_false, null_default};
use super::{Base64Bytes, CapabilityVersion, Hostinfo, LoginID, Time, UserID};
use crate::key::{ChallengePublic, MachinePublic, NodePublic, de_zero_if_empty};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Answer to `GET /key?v=<capver>` (Go's `tailcfg.OverTLSPublicKeyResponse`), served over
/// plain HTTP(S) before any Noise. Note the camelCase JSON names (Go's struct tags).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OverTLSPublicKeyResponse {
    /// The pre-Noise NaCl `crypto_box` server key; zero for every client we support
    /// (Go still writes it, as `mkey:000…`).
    #[serde(rename = "legacyPublicKey", deserialize_with = "de_zero_if_empty")]
    pub legacy_public_key: MachinePublic,
    /// The server's Noise static key: clients refuse a server without it.
    #[serde(rename = "publicKey")]
    pub public_key: MachinePublic,
}

impl OverTLSPublicKeyResponse {
    /// The answer of a Noise-only server.
    pub fn new(public_key: MachinePublic) -> Self {
        OverTLSPublicKeyResponse {
            legacy_public_key: MachinePublic::ZERO,
            public_key,
        }
    }
}

/// Go's `tailcfg.EarlyNoise`: JSON the server may push right after the Noise handshake,
/// before HTTP/2, framed as `"\xff\xff\xffTS"` + 4-byte big-endian length + JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EarlyNoise {
    /// A random per-connection key the client can prove node-key possession against.
    #[serde(rename = "nodeKeyChallenge")]
    pub node_key_challenge: ChallengePublic,
}

/// Go's `tailcfg.RegisterResponseAuth`, the `Auth` of a [`RegisterRequest`]. Its `Debug`
/// never shows the auth key.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RegisterResponseAuth {
    /// A pre-authentication key (`tailscale up --auth-key`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub auth_key: String,
    /// Legacy (clients before the Noise protocol); ignored.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// Legacy; ignored.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub login_name: String,
    // Oauth2Token (pre-1.66 Android only) is deliberately not modelled: ignored on input.
}

impl fmt::Debug for RegisterResponseAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterResponseAuth")
            .field(
                "auth_key",
                &if self.auth_key.is_empty() {
                    ""
                } else {
                    "[redacted]"
                },
            )
            .field("provider", &self.provider)
            .field("login_name", &self.login_name)
            .finish()
    }
}

/// Go's `tailcfg.RegisterRequest`, the body of `POST /machine/register`: a node asks to
/// (re-)register `NodeKey` for the machine key of the Noise connection it arrives on.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RegisterRequest {
    /// The client's capability version.
    pub version: CapabilityVersion,
    pub node_key: NodePublic,
    /// On key rotation, the key being replaced; zero (`nodekey:000…`, or `""` from
    /// careless clients) otherwise.
    #[serde(deserialize_with = "de_zero_if_empty")]
    pub old_node_key: NodePublic,
    /// Tailnet-lock public key (`nlpub:<hex>`), opaque to us; `""` = none. Go always writes
    /// it, as the zero key when unset: that reads as `""`, and `""` is written as the zero
    /// key because Go cannot parse `""`.
    #[serde(
        rename = "NLKey",
        serialize_with = "ser_nl_key",
        deserialize_with = "de_nl_key"
    )]
    pub nl_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<RegisterResponseAuth>,
    /// Requested key expiry; zero = no preference. If in the past and `NodeKey` is current,
    /// the client is logging out: expire the key now.
    pub expiry: Time,
    /// Non-empty on a follow-up request: the `AuthURL` the client is waiting on; answer once
    /// the user has completed it.
    #[serde(deserialize_with = "null_default")]
    pub followup: String,
    pub hostinfo: Option<Hostinfo>,
    /// Delete the node automatically once it goes inactive.
    #[serde(skip_serializing_if = "is_false")]
    pub ephemeral: bool,
    /// The node's own tailnet-lock signature re-signed for a new node key.
    pub node_key_signature: Base64Bytes,
    /// Legacy request signing (`"signature-v2"` etc. in Go's text form); unused today.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_type: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Time>,
    #[serde(skip_serializing_if = "Base64Bytes::is_empty")]
    pub device_cert: Base64Bytes,
    #[serde(skip_serializing_if = "Base64Bytes::is_empty")]
    pub signature: Base64Bytes,
    /// Recommended (or `"required:…"`) tailnet to log in to; empty = no preference.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tailnet: String,
}

fn ser_nl_key<S: serde::Serializer>(k: &str, s: S) -> Result<S::Ok, S::Error> {
    if k.is_empty() {
        s.serialize_str(concat!(
            "nlpub:",
            "0000000000000000000000000000000000000000000000000000000000000000"
        ))
    } else {
        s.serialize_str(k)
    }
}

/// Reads `NLKey`, normalising "no key" (`null`, `""`, the zero key) to `""`.
fn de_nl_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s: String = null_default(d)?;
    let zero = s
        .split_once(':')
        .is_some_and(|(_, hex)| !hex.is_empty() && hex.bytes().all(|b| b == b'0'));
    Ok(if zero { String::new() } else { s })
}

/// Go's `tailcfg.RegisterResponse`. Every field is always written (no `omitempty` in Go,
/// and tailscale-rs requires them all).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RegisterResponse {
    pub user: User,
    pub login: Login,
    /// The `NodeKey` has expired: the client must generate a new one and re-register.
    pub node_key_expired: bool,
    /// Registration succeeded and the node may join. False with an `AuthURL` = pending.
    pub machine_authorized: bool,
    /// Where the user must go to finish an interactive login; the client opens it and
    /// sends a follow-up request with `Followup` set to it.
    #[serde(rename = "AuthURL", deserialize_with = "null_default")]
    pub auth_url: String,
    /// The current tailnet-lock signature, to be re-signed for a new node key.
    pub node_key_signature: Base64Bytes,
    /// Registration failed (e.g. bad auth key); the client shows it and ignores the rest.
    #[serde(deserialize_with = "null_default")]
    pub error: String,
    /// tsunagu's own: the identity a standby host now holds (see
    /// [`super::StandbyGrant`]); only ever sent to the host that redeemed a standby key.
    #[serde(rename = "TsunaguStandby", skip_serializing_if = "Option::is_none")]
    pub tsunagu_standby: Option<super::StandbyGrant>,
}

impl RegisterResponse {
    /// A refusal carrying only an error message.
    pub fn error(message: impl Into<String>) -> Self {
        RegisterResponse {
            error: message.into(),
            ..Default::default()
        }
    }
}

/// Go's `tailcfg.User`. All fields always written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct User {
    #[serde(rename = "ID")]
    pub id: UserID,
    /// Overrides the login's display name when non-empty.
    pub display_name: String,
    /// Overrides the login's picture when non-empty.
    #[serde(rename = "ProfilePicURL")]
    pub profile_pic_url: String,
    pub created: Time,
}

/// Go's `tailcfg.Login`: a user's identity at one identity provider. All fields always
/// written (tailscale-rs requires `Provider` and `LoginName`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Login {
    #[serde(rename = "ID")]
    pub id: LoginID,
    /// `"google"`, `"github"`, `"oidc"`, …
    pub provider: String,
    /// An email or email-ish name (`alice@github`).
    pub login_name: String,
    pub display_name: String,
    #[serde(rename = "ProfilePicURL")]
    pub profile_pic_url: String,
}

/// Go's `tailcfg.UserProfile`: what clients display for a user (the node owners in
/// `MapResponse.UserProfiles`). Go removed the legacy `Roles` field; old input with it is
/// still accepted (ignored).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct UserProfile {
    #[serde(rename = "ID")]
    pub id: UserID,
    /// `"alice@example.com"`, for display only.
    pub login_name: String,
    /// `"Alice Smith"`.
    pub display_name: String,
    #[serde(rename = "ProfilePicURL", skip_serializing_if = "String::is_empty")]
    pub profile_pic_url: String,
}
