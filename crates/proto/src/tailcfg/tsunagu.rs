//! tsunagu's own extensions of the control protocol, spoken only between tsunagu-server and
//! tsunagud: standby hosts of an exit node.
//!
//! An exit node (one identity: node key, tailnet addresses, name) may be held by several
//! tsunagud hosts, each with its own machine key and control session. Members see one peer;
//! the server shows them the endpoints, home relay and disco key of the *active* host
//! only, and moves them to another host by changing that one peer entry. The fields here
//! carry what only the hosts need:
//!
//! * [`StandbyGrant`] in `RegisterResponse.TsunaguStandby`: the identity's private node
//!   key, sent to a host that registered with a standby key (over the Noise channel, and
//!   only to that authenticated machine);
//! * [`StandbyInfo`] in `MapResponse.TsunaguStandby`: a host's role (active or standby),
//!   the other hosts, the last switch, and whether the server wants the key handed over
//!   to a new standby host;
//! * [`HostReport`] in `MapRequest.TsunaguHost`: the role a host has put in force (the
//!   server waits for it before moving members) and whether it wants the role back when it
//!   is healthy;
//! * [`HandoverRequest`], posted to [`HANDOVER_PATH`] by a host that holds the key, when
//!   the server asks for it.
//!
//! Go clients ignore fields they do not know, so these never disturb an official client.

use super::Time;
use crate::key::{NodePrivate, NodePublic};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Where a host that holds an identity's key posts it ([`HandoverRequest`]).
pub const HANDOVER_PATH: &str = "/machine/tsunagu/handover";

/// Standby keys (`tsunagu-server nodes standby add`) start with this, which tells them
/// from pre-auth keys in `RegisterRequest.Auth.AuthKey`.
pub const STANDBY_KEY_PREFIX: &str = "tskey-standby-";

/// A node private key on the wire (`"privkey:<hex>"`). Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct WireNodePrivate(pub NodePrivate);

impl fmt::Debug for WireNodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireNodePrivate(public {})", self.0.public().short())
    }
}

impl Serialize for WireNodePrivate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex: String = self
            .0
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        s.serialize_str(&format!("privkey:{hex}"))
    }
}

impl<'de> Deserialize<'de> for WireNodePrivate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<NodePrivate>()
            .map(WireNodePrivate)
            .map_err(serde::de::Error::custom)
    }
}

/// What a host that redeemed a standby key gets: the identity it now holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StandbyGrant {
    /// The identity's name (`dev-m1sk9-s1`).
    pub identity: String,
    /// The identity's private node key: the host registers and runs with it from now on.
    pub node_key: WireNodePrivate,
}

/// What a host of an identity does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostRole {
    /// Serves the identity: answers handshakes and disco, forwards.
    Active,
    /// Keeps everything ready (routes, NAT, peers) and answers nothing.
    Standby,
}

impl fmt::Display for HostRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostRole::Active => "active",
            HostRole::Standby => "standby",
        })
    }
}

/// One host of an identity, as the hosts (and the admin) see it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct StandbyHostView {
    /// The host's own hostname.
    pub name: String,
    /// `mkey:<hex>`: what tells hosts apart.
    pub machine_key: String,
    pub active: bool,
    /// A map stream is open.
    pub online: bool,
    /// It could take the role now (online, relay connection up, offering the exit node,
    /// disco key known).
    pub ready: bool,
    /// Why it is not ready, empty when it is.
    pub not_ready: String,
    /// It takes the role back whenever it is ready.
    pub prefer: bool,
}

/// One switch of the active host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SwitchRecord {
    pub at: Time,
    /// Hostnames.
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// `MapResponse.TsunaguStandby`: sent to the hosts of an identity with standby hosts, in
/// the first message of every stream and whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StandbyInfo {
    pub identity: String,
    /// What this host must do.
    pub role: HostRole,
    #[serde(default)]
    pub hosts: Vec<StandbyHostView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switch: Option<SwitchRecord>,
    /// A new standby host waits for the identity's key: post it ([`HandoverRequest`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
    /// A planned switch away from this (active) host: stand by at the first moment
    /// when no member's connection through or to it is in the middle of an exchange,
    /// waiting at most this many milliseconds. 0: at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wind_down_ms: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `MapRequest.TsunaguHost`: what a host of an identity tells the server about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostReport {
    /// The role in force on this host now (after the last [`StandbyInfo`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<HostRole>,
    /// Take the role whenever ready (`tsunagud --prefer`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub prefer: bool,
}

/// The body of `POST` [`HANDOVER_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandoverRequest {
    pub node_key: NodePublic,
    pub private: WireNodePrivate,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_key_round_trips_and_never_shows_in_debug() {
        let k = NodePrivate::generate();
        let grant = StandbyGrant {
            identity: "dev-m1sk9-s1".into(),
            node_key: WireNodePrivate(k.clone()),
        };
        let json = serde_json::to_string(&grant).unwrap();
        assert!(json.contains("\"NodeKey\":\"privkey:"), "{json}");
        let back: StandbyGrant = serde_json::from_str(&json).unwrap();
        assert_eq!(back.node_key.0, k);
        let hex: String = k.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let dbg = format!("{grant:?}");
        assert!(!dbg.contains(&hex), "{dbg}");
        assert!(!dbg.contains("privkey"), "{dbg}");
    }

    #[test]
    fn roles_and_reports_read_as_written() {
        let info = StandbyInfo {
            identity: "x".into(),
            role: HostRole::Standby,
            hosts: vec![],
            last_switch: None,
            handover: false,
            wind_down_ms: 0,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(json, r#"{"Identity":"x","Role":"standby","Hosts":[]}"#);
        let planned = StandbyInfo {
            wind_down_ms: 2000,
            ..info
        };
        let json = serde_json::to_string(&planned).unwrap();
        assert_eq!(
            json,
            r#"{"Identity":"x","Role":"standby","Hosts":[],"WindDownMs":2000}"#
        );
        assert_eq!(serde_json::from_str::<StandbyInfo>(&json).unwrap(), planned);
        let r: HostReport = serde_json::from_str(r#"{"Role":"active"}"#).unwrap();
        assert_eq!(r.role, Some(HostRole::Active));
        assert!(!r.prefer);
        assert_eq!(serde_json::to_string(&HostReport::default()).unwrap(), "{}");
    }
}
