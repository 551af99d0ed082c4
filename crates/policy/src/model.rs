//! The validated, position-free representation of a policy.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An inclusive port range, `0..=65535` for `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };
}

/// A source or destination selector, resolved as far as is possible without
/// knowing the node set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Alias {
    /// `*`: every node (src/dst), any IP in filters.
    Any,
    /// A user, canonical form (see [`canonical_user`]).
    User(String),
    /// `group:x` (validated to exist).
    Group(String),
    /// `tag:x` (validated to have a tagOwners entry).
    Tag(String),
    /// An IP, a CIDR or a `hosts` alias.
    Prefix(IpNet),
    /// `autogroup:member`: untagged nodes that belong to a user.
    Member,
    /// `autogroup:tagged`: nodes with at least one tag.
    Tagged,
    /// `autogroup:internet` (dst only).
    Internet,
    /// `autogroup:self` (dst only).
    SelfDevices,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dst {
    pub alias: Alias,
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Acl {
    pub src: Vec<Alias>,
    pub dst: Vec<Dst>,
    /// Empty = Tailscale's default (TCP, UDP, ICMPv4, ICMPv6).
    pub proto: Vec<u8>,
}

/// Who may apply a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    User(String),
    Group(String),
    Tag(String),
    /// `autogroup:member`: any user.
    Member,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AutoApprovers {
    pub exit_node: Vec<Alias>,
    pub routes: Vec<(IpNet, Vec<Alias>)>,
}

/// Canonical form of a user name, used on both sides of every comparison:
/// one trailing `@` is dropped (`alice@` == `alice`), nothing else changes
/// (comparison is exact and case-sensitive, so `alice@example.com` matches
/// only a user literally named `alice@example.com`).
pub fn canonical_user(name: &str) -> &str {
    name.strip_suffix('@').unwrap_or(name)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PolicyData {
    pub groups: BTreeMap<String, Vec<String>>,
    pub tag_owners: BTreeMap<String, Vec<Owner>>,
    pub hosts: BTreeMap<String, IpNet>,
    pub acls: Vec<Acl>,
    pub auto_approvers: AutoApprovers,
}
