//! Tailscale-format (HuJSON) ACL policy: parsing with positioned errors, and
//! compilation against a node set into per-node packet filters, peer
//! visibility, exit-node permission and auto-approval decisions.
//!
//! # Supported policy
//! Top-level sections `groups`, `tagOwners`, `hosts`, `acls`, `autoApprovers`
//! (keys of schema objects are matched case-insensitively like Tailscale's
//! Go decoder, so `"ACLs"` works). `grants`, `ssh`, `tests`, `nodeAttrs`,
//! `postures`, `ipsets`, ... are rejected with a "not supported" error rather
//! than silently ignored; any other key is an "unknown top-level key".
//!
//! # Selectors (src / dst targets)
//! * `*` — every node; in filters it stays `"*"`.
//! * users: a token with no `group:`/`tag:`/`autogroup:` prefix that is not
//!   an IP/CIDR or a `hosts` name. `alice`, `alice@` and a node user `alice`
//!   are the same; `alice@example.com` matches only the user literally named
//!   so (exact, case-sensitive; see [`canonical_user`]). Only untagged nodes
//!   belong to a user.
//! * `group:x` (must be defined; groups hold users only, no nesting),
//!   `tag:x` (must have a `tagOwners` entry), `hosts` names, IPs and CIDRs
//!   (host bits must be zero).
//! * `autogroup:member` (untagged nodes with a user), `autogroup:tagged`,
//!   `autogroup:internet` (dst only: use of exit nodes), `autogroup:self`
//!   (dst only; the src of such a rule may only hold users, groups and
//!   autogroup:member). Other autogroups (admin, shared, ...) are errors.
//! * dst is `target:ports`, split at the last `:` (or `[v6]:ports`); ports
//!   are `*`, `22`, `80,443`, `8000-8099` or mixes. With a `proto` other
//!   than tcp/udp/sctp, ports must be `*`.
//!
//! See [`CompiledPolicy`] for the semantics of the compiled outputs.

mod compile;
mod error;
mod internet;
mod model;
mod parse;

use ipnet::IpNet;

pub use compile::{CompiledPolicy, FilterClass, FilterRule, NetPortRange, PolicyNode};
pub use error::{ErrorKind, PolicyError};
pub use internet::{V4_EXCLUDED as V4_NOT_INTERNET, V6_INTERNET};
pub use model::{PortRange, canonical_user};

use model::{Alias, Owner, PolicyData};

/// The policy used when no policy file is configured: members may reach
/// everything — each other, tagged nodes, approved subnet routes and the
/// internet through approved exit nodes — while tagged nodes may initiate
/// nothing (they still answer: Tailscale's filter is stateful). `*:*` rather
/// than an explicit list of autogroups so approved subnet routes work too.
pub const DEFAULT_POLICY: &str = r#"{
  // tsunagu's built-in policy, used when no policy file is configured.
  "acls": [
    { "action": "accept", "src": ["autogroup:member"], "dst": ["*:*"] },
  ],
}"#;

/// A parsed and validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    data: PolicyData,
}

impl Policy {
    /// Parse HuJSON policy text (JSON plus comments and trailing commas).
    /// Never panics; every error carries a 1-based line and column.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        parse::parse_policy(text).map(|data| Policy { data })
    }

    /// The built-in policy, [`DEFAULT_POLICY`].
    pub fn default_policy() -> Policy {
        match Policy::parse(DEFAULT_POLICY) {
            Ok(p) => p,
            Err(e) => unreachable!("built-in policy is invalid: {e}"),
        }
    }

    /// Index the policy against a node set; see [`CompiledPolicy`]. Nodes
    /// with a duplicate id are ignored after the first.
    pub fn compile(&self, nodes: &[PolicyNode]) -> CompiledPolicy {
        compile::compile(&self.data, nodes)
    }

    /// May a node owned by `owner_user` carry `tag` (on its auth key or in
    /// its advertised tags)? True when `tagOwners[tag]` lists the user, a
    /// group containing the user, or `autogroup:member`. Tag-owned tags are
    /// not followed here (see [`Policy::tag_allowed_for_tags`]).
    pub fn tag_allowed(&self, owner_user: &str, tag: &str) -> bool {
        let user = canonical_user(owner_user);
        if user.is_empty() {
            return false;
        }
        self.owners(tag).any(|o| match o {
            Owner::User(u) => u == user,
            Owner::Group(g) => self.in_group(user, g),
            Owner::Member => true,
            Owner::Tag(_) => false,
        })
    }

    /// May a node already carrying `owner_tags` apply `tag`? True when
    /// `tagOwners[tag]` lists one of those tags.
    pub fn tag_allowed_for_tags(&self, owner_tags: &[String], tag: &str) -> bool {
        self.owners(tag)
            .any(|o| matches!(o, Owner::Tag(t) if owner_tags.contains(t)))
    }

    /// Should `node`'s advertised exit routes (`0.0.0.0/0`, `::/0`) be
    /// approved automatically? True when `autoApprovers.exitNode` selects it.
    pub fn auto_approve_exit_node(&self, node: &PolicyNode) -> bool {
        self.data
            .auto_approvers
            .exit_node
            .iter()
            .any(|a| self.node_matches(a, node))
    }

    /// Should `node`'s advertised `prefix` be approved automatically? A `/0`
    /// is an exit route and is decided by [`Policy::auto_approve_exit_node`];
    /// any other prefix needs an `autoApprovers.routes` entry that contains
    /// it (equal or wider) and selects the node.
    pub fn auto_approve_route(&self, node: &PolicyNode, prefix: IpNet) -> bool {
        if prefix.prefix_len() == 0 {
            return self.auto_approve_exit_node(node);
        }
        let prefix = prefix.trunc();
        self.data
            .auto_approvers
            .routes
            .iter()
            .any(|(net, approvers)| {
                net.contains(&prefix) && approvers.iter().any(|a| self.node_matches(a, node))
            })
    }

    fn owners(&self, tag: &str) -> impl Iterator<Item = &Owner> {
        self.data.tag_owners.get(tag).into_iter().flatten()
    }

    fn in_group(&self, user: &str, group: &str) -> bool {
        self.data
            .groups
            .get(group)
            .is_some_and(|m| m.iter().any(|u| u == user))
    }

    /// Does an auto-approver selector match a node? (Node-local: users,
    /// groups, tags, autogroup:member/tagged.)
    fn node_matches(&self, alias: &Alias, node: &PolicyNode) -> bool {
        match alias {
            Alias::User(u) => node.member_user() == Some(u.as_str()),
            Alias::Group(g) => node.member_user().is_some_and(|u| self.in_group(u, g)),
            Alias::Tag(t) => node.tags.iter().any(|x| x == t),
            Alias::Member => node.member_user().is_some(),
            Alias::Tagged => node.is_tagged(),
            _ => false,
        }
    }
}

/// Fuzzing entry point (e.g. for cargo-fuzz): parse arbitrary bytes and, if
/// they form a valid policy, compile it against a small fixed node set and
/// query every output. Must never panic.
pub fn fuzz_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text) else {
        return;
    };
    let node = |id: i64, user: Option<&str>, tags: &[&str], ip: &str, routes: &[&str]| PolicyNode {
        id,
        user: user.map(str::to_string),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ips: ip.parse().into_iter().collect(),
        approved_routes: routes.iter().filter_map(|r| r.parse().ok()).collect(),
    };
    let nodes = [
        node(1, Some("alice"), &[], "100.64.0.1", &[]),
        node(
            2,
            Some("bob@example.com"),
            &[],
            "100.64.0.2",
            &["198.18.5.0/24"],
        ),
        node(3, None, &["tag:exit"], "100.64.0.3", &["0.0.0.0/0", "::/0"]),
        node(4, None, &[], "fd7a:115c:a1e0::4", &[]),
    ];
    let compiled = policy.compile(&nodes);
    for n in &nodes {
        let _ = compiled.filter(n.id);
        let _ = compiled.visible_peers(n.id);
        let _ = compiled.may_use_exit_nodes(n.id);
        let _ = policy.auto_approve_exit_node(n);
        if let Ok(p) = "198.18.5.0/25".parse() {
            let _ = policy.auto_approve_route(n, p);
        }
        for t in &["tag:exit", "tag:x"] {
            let _ = policy.tag_allowed("alice", t);
            let _ = policy.tag_allowed_for_tags(&n.tags, t);
        }
    }
}
