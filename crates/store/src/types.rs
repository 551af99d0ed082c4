//! Domain types, as the rest of the server and the admin API's `--json` see them.

use std::net::{Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// A pre-auth key as listed: the secret is never stored, only shown once by
/// [`Store::create_preauth_key`](crate::Store::create_preauth_key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreAuthKey {
    pub id: i64,
    pub user_id: i64,
    /// `tskey-auth-<key id>`: the public part, enough to tell keys apart.
    pub key_prefix: String,
    pub reusable: bool,
    pub ephemeral: bool,
    /// Times redeemed.
    pub used: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub created_at: DateTime<Utc>,
}

impl PreAuthKey {
    /// Whether redeeming it at `now` would be refused, and why.
    pub fn rejection(&self, now: DateTime<Utc>) -> Option<crate::KeyRejected> {
        if self.expires_at.is_some_and(|e| e <= now) {
            Some(crate::KeyRejected::Expired)
        } else if !self.reusable && self.used > 0 {
            Some(crate::KeyRejected::Used)
        } else {
            None
        }
    }
}

/// Who owns a node: a user, or (Tailscale's tagged devices) its tags alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    User(i64),
    Tags(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: i64,
    /// `mkey:<hex>`
    pub machine_key: String,
    /// `nodekey:<hex>`
    pub node_key: String,
    /// `discokey:<hex>`, empty until the node reports one.
    pub disco_key: String,
    /// `None` when the node is tagged (owned by its tags).
    pub user_id: Option<i64>,
    pub tags: Vec<String>,
    /// As reported by the node.
    pub hostname: String,
    /// Unique DNS label (MagicDNS name).
    pub given_name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub hostinfo: serde_json::Value,
    pub endpoints: Vec<String>,
    pub advertised_routes: Vec<IpNet>,
    pub approved_routes: Vec<IpNet>,
    pub ephemeral: bool,
    pub auth_key_id: Option<i64>,
    pub expiry: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub last_seen: Option<DateTime<Utc>>,
    pub authorized: bool,
    /// Bumped by every write to the row: of two copies, the higher version is the newer.
    pub version: i64,
}

impl Node {
    pub fn owner(&self) -> Owner {
        match self.user_id {
            Some(u) => Owner::User(u),
            None => Owner::Tags(self.tags.clone()),
        }
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expiry.is_some_and(|e| e <= now)
    }
}

/// What [`Store::register_node`](crate::Store::register_node) needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNode {
    pub machine_key: String,
    pub node_key: String,
    pub hostname: String,
    pub hostinfo: serde_json::Value,
    pub owner: Owner,
    pub ephemeral: bool,
    pub auth_key_id: Option<i64>,
    pub expiry: Option<DateTime<Utc>>,
}

/// An interactive registration waiting for an admin (`nodes register --key TOKEN`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PendingRegistration {
    /// The token shown to the user in the auth URL.
    pub token: String,
    pub machine_key: String,
    pub node_key: String,
    pub hostinfo: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Set when an admin approved it: the node that was registered.
    pub approved_node_id: Option<i64>,
}
