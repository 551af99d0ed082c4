//! Policy + node set -> per-node indexes.
//!
//! Complexity, with `n` nodes, `R` ACL rules and `E` selectors in them:
//! * compile: `O(E·n + R·n)` — selectors by user/group/tag use hash maps
//!   (cost = nodes matched), IP/CIDR selectors scan the nodes once each, and
//!   every rule keeps two `n`-bit sets (sources, reachable destinations) from
//!   which per-node rule lists are built. Memory `O(R·n/8)` bytes plus the
//!   per-node rule lists.
//! * `visible_peers(v)`: `O(R_v · n/64 + out)` where `R_v` is the number of
//!   rules that mention `v` (bitset unions), independent of other viewers.
//! * `filter(v)`: `O(Σ size of the emitted rules)`; source IPs are
//!   precomputed and aggregated into CIDRs once per rule at compile time.
//! * `may_use_exit_nodes(v)`: `O(1)`.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::internet::{internet_v4, internet_v6};
use crate::model::{Alias, PolicyData, PortRange, canonical_user};

/// A node as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyNode {
    pub id: i64,
    /// Owning user; `None` for tagged nodes. Ignored when `tags` is non-empty
    /// (a tagged node has no user identity, as in Tailscale).
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Approved routes; `0.0.0.0/0` / `::/0` make it an approved exit node.
    pub approved_routes: Vec<IpNet>,
}

impl PolicyNode {
    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }

    /// The canonical user of an untagged node.
    pub(crate) fn member_user(&self) -> Option<&str> {
        if self.is_tagged() {
            None
        } else {
            self.user.as_deref().map(canonical_user)
        }
    }
}

/// One packet-filter rule, in the shape of Tailscale's `tailcfg.FilterRule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// Source IPs/CIDRs (a single address is written without `/32`), or `"*"`.
    pub src_ips: Vec<String>,
    pub dst_ports: Vec<NetPortRange>,
    /// IANA protocol numbers; empty means Tailscale's default of TCP, UDP,
    /// ICMPv4 and ICMPv6.
    pub ip_proto: Vec<u8>,
}

/// A destination IP/CIDR (or `"*"`) and an inclusive port range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetPortRange {
    pub ip: String,
    pub first: u16,
    pub last: u16,
}

/// Which packet filter a node gets, as far as [`CompiledPolicy::filter_class`] can tell
/// without building it: equal classes mean equal filters (within one compiled policy).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FilterClass {
    /// Not in the compiled node set: the empty filter.
    Unknown,
    /// The filter is the listed rules (by index), all with `*` destinations.
    Rules(Vec<u32>),
    /// The filter names this node's own addresses: shared with no one.
    Node(i64),
}

#[derive(Clone, Debug)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> Self {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn full(n: usize) -> Self {
        let mut b = Self::new(n);
        for i in 0..n {
            b.insert(i);
        }
        b
    }
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn union_with(&mut self, o: &BitSet) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a |= b;
        }
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }
}

enum Target {
    Any,
    Nodes(BitSet),
    Prefix(IpNet),
    Internet,
}

struct RuleDst {
    target: Target,
    ports: Vec<PortRange>,
}

struct Rule {
    src: BitSet,
    src_ips: Vec<String>,
    dst: Vec<RuleDst>,
    /// Nodes reachable through the (non-self) destinations.
    dst_nodes: BitSet,
    /// Ports of an `autogroup:self` destination, if any.
    self_ports: Vec<PortRange>,
    proto: Vec<u8>,
}

struct NodeInfo {
    id: i64,
    ips: Vec<IpAddr>,
    subnet_routes: Vec<IpNet>,
    exit_v4: bool,
    exit_v6: bool,
    user: Option<String>,
}

impl NodeInfo {
    /// Is `p` one of this node's addresses or (overlapping) subnet routes?
    fn covered_by(&self, p: &IpNet) -> bool {
        self.ips.iter().any(|ip| p.contains(ip))
            || self
                .subnet_routes
                .iter()
                .any(|r| r.contains(p) || p.contains(r))
    }

    fn is_exit(&self) -> bool {
        self.exit_v4 || self.exit_v6
    }

    /// Does this node, as an approved exit node, forward to `p` (a prefix of its
    /// family's internet side, not the tailnet)?
    fn forwards_to(&self, p: &IpNet) -> bool {
        let family = match p {
            IpNet::V4(_) => self.exit_v4,
            IpNet::V6(_) => self.exit_v6,
        };
        family && forwardable_prefix(p)
    }
}

/// A destination prefix an exit node may forward to: not a `/0` (that is the internet
/// as a whole, compiled as such) and not inside the tailnet's own ranges.
fn forwardable_prefix(p: &IpNet) -> bool {
    let tailnet = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
        .iter()
        .filter_map(|t| t.parse::<IpNet>().ok())
        .any(|t| t.contains(p));
    p.prefix_len() > 0 && !tailnet
}

/// A policy compiled against a node set. Rebuild it whenever the policy or
/// the node set (ids, users, tags, IPs, approved routes) changes.
///
/// Semantics:
/// * Node `a` *reaches* node `b` when a rule has `a` in src and `b` in dst:
///   by identity (user, group, tag, autogroup), by address (an IP/CIDR/host
///   containing one of `b`'s IPs or overlapping one of its approved subnet
///   routes), by `*`, or — for `autogroup:internet` — when `b` is an approved
///   exit node. Exit routes (`/0`) never count as "overlapping" a CIDR.
/// * A src IP/CIDR/host selects, for visibility, the nodes whose IPs are in
///   it or whose approved subnet routes overlap it (a subnet router relays
///   that traffic); in filters it stays the literal prefix.
/// * [`CompiledPolicy::visible_peers`] is symmetric: `b` is shown to `a` when
///   either reaches the other. An exit node is therefore visible to a node
///   that may reach it for some reason even without internet permission;
///   use [`CompiledPolicy::may_use_exit_nodes`] to decide whether to hand
///   that node the peers' `0.0.0.0/0`/`::/0` routes.
/// * Source addresses in filters are aggregated into the fewest CIDRs.
pub struct CompiledPolicy {
    nodes: Vec<NodeInfo>,
    index: HashMap<i64, usize>,
    rules: Vec<Rule>,
    /// Per node: rules having it in `src`.
    src_rules: Vec<Vec<u32>>,
    /// Per node: rules having it among the reachable destinations.
    dst_rules: Vec<Vec<u32>>,
    /// Per canonical user: its untagged nodes.
    user_nodes: HashMap<String, BitSet>,
    exit_users: BitSet,
    /// Rules with an IP/CIDR destination outside the tailnet: approved exit nodes
    /// forward there, so their filters carry these rules too (Tailscale's server sends
    /// exit nodes the rules of the addresses they forward to).
    prefix_rules: Vec<u32>,
}

fn fmt_net(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn push_unique(v: &mut Vec<NetPortRange>, x: NetPortRange) {
    if !v.contains(&x) {
        v.push(x);
    }
}

pub(crate) fn compile(policy: &PolicyData, input: &[PolicyNode]) -> CompiledPolicy {
    let mut index = HashMap::with_capacity(input.len());
    let mut nodes = Vec::with_capacity(input.len());
    let mut kept = Vec::with_capacity(input.len());
    for node in input {
        if index.contains_key(&node.id) {
            continue; // first occurrence of an id wins
        }
        index.insert(node.id, nodes.len());
        kept.push(node);
        let mut subnet_routes = Vec::new();
        let (mut exit_v4, mut exit_v6) = (false, false);
        for r in &node.approved_routes {
            match r {
                IpNet::V4(n) if n.prefix_len() == 0 => exit_v4 = true,
                IpNet::V6(n) if n.prefix_len() == 0 => exit_v6 = true,
                _ => subnet_routes.push(r.trunc()),
            }
        }
        nodes.push(NodeInfo {
            id: node.id,
            ips: node.ips.clone(),
            subnet_routes,
            exit_v4,
            exit_v6,
            user: node.member_user().map(str::to_string),
        });
    }
    let n = nodes.len();

    let mut user_nodes: HashMap<String, BitSet> = HashMap::new();
    let mut tag_nodes: HashMap<&str, BitSet> = HashMap::new();
    let mut members = BitSet::new(n);
    let mut tagged = BitSet::new(n);
    let mut exit_nodes = BitSet::new(n);
    for (i, node) in kept.iter().enumerate() {
        let info = &nodes[i];
        if info.exit_v4 || info.exit_v6 {
            exit_nodes.insert(i);
        }
        if node.is_tagged() {
            tagged.insert(i);
            for t in &node.tags {
                tag_nodes
                    .entry(t)
                    .or_insert_with(|| BitSet::new(n))
                    .insert(i);
            }
        } else if let Some(u) = &info.user {
            members.insert(i);
            user_nodes
                .entry(u.clone())
                .or_insert_with(|| BitSet::new(n))
                .insert(i);
        }
    }
    let resolve = |alias: &Alias| -> BitSet {
        let mut set = BitSet::new(n);
        match alias {
            Alias::Any => set = BitSet::full(n),
            Alias::User(u) => {
                if let Some(s) = user_nodes.get(u) {
                    set.union_with(s);
                }
            }
            Alias::Group(g) => {
                for u in policy.groups.get(g).into_iter().flatten() {
                    if let Some(s) = user_nodes.get(u) {
                        set.union_with(s);
                    }
                }
            }
            Alias::Tag(t) => {
                if let Some(s) = tag_nodes.get(t.as_str()) {
                    set.union_with(s);
                }
            }
            Alias::Member => set.union_with(&members),
            Alias::Tagged => set.union_with(&tagged),
            Alias::Prefix(p) => {
                for (i, node) in nodes.iter().enumerate() {
                    if node.covered_by(p) {
                        set.insert(i);
                    }
                }
            }
            Alias::Internet => set.union_with(&exit_nodes),
            Alias::SelfDevices => {}
        }
        set
    };

    let mut rules = Vec::with_capacity(policy.acls.len());
    let mut exit_users = BitSet::new(n);
    for acl in &policy.acls {
        let mut src = BitSet::new(n);
        let mut src_nets = Vec::new();
        let mut src_any = false;
        for a in &acl.src {
            let set = resolve(a);
            match a {
                Alias::Any => src_any = true,
                // Filters carry the prefix itself; the set (nodes inside it or
                // routing into it) only drives peer visibility.
                Alias::Prefix(p) => src_nets.push(*p),
                // Nodes selected by identity contribute their own addresses
                // (not their subnet routes).
                _ => {
                    for i in set.iter() {
                        src_nets.extend(nodes[i].ips.iter().map(|ip| IpNet::from(*ip)));
                    }
                }
            }
            src.union_with(&set);
        }
        let src_ips = if src_any {
            vec!["*".to_string()]
        } else {
            IpNet::aggregate(&src_nets).iter().map(fmt_net).collect()
        };

        let mut dst = Vec::new();
        let mut dst_nodes = BitSet::new(n);
        let mut self_ports = Vec::new();
        let mut grants_internet = false;
        for d in &acl.dst {
            let target = match &d.alias {
                Alias::SelfDevices => {
                    self_ports.extend_from_slice(&d.ports);
                    continue;
                }
                Alias::Any => {
                    grants_internet = true;
                    Target::Any
                }
                Alias::Internet => {
                    grants_internet = true;
                    Target::Internet
                }
                Alias::Prefix(p) => {
                    grants_internet |= p.prefix_len() == 0;
                    Target::Prefix(*p)
                }
                other => Target::Nodes(resolve(other)),
            };
            match &target {
                Target::Nodes(s) => dst_nodes.union_with(s),
                _ => dst_nodes.union_with(&resolve(&d.alias)),
            }
            dst.push(RuleDst {
                target,
                ports: d.ports.clone(),
            });
        }
        if grants_internet {
            exit_users.union_with(&src);
        }
        rules.push(Rule {
            src,
            src_ips,
            dst,
            dst_nodes,
            self_ports,
            proto: acl.proto.clone(),
        });
    }

    let mut src_rules = vec![Vec::new(); n];
    let mut dst_rules = vec![Vec::new(); n];
    let mut prefix_rules = Vec::new();
    for (ri, rule) in rules.iter().enumerate() {
        let ri = ri as u32;
        if rule
            .dst
            .iter()
            .any(|d| matches!(&d.target, Target::Prefix(p) if forwardable_prefix(p)))
        {
            prefix_rules.push(ri);
        }
        for i in rule.src.iter() {
            src_rules[i].push(ri);
        }
        for i in rule.dst_nodes.iter() {
            dst_rules[i].push(ri);
        }
    }

    CompiledPolicy {
        nodes,
        index,
        rules,
        src_rules,
        dst_rules,
        user_nodes,
        exit_users,
        prefix_rules,
    }
}

impl CompiledPolicy {
    /// Number of distinct nodes compiled.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn idx(&self, id: i64) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// Untagged nodes of `v`'s user, if `v` is an untagged user node.
    fn own_devices(&self, v: usize) -> Option<&BitSet> {
        self.nodes[v]
            .user
            .as_ref()
            .and_then(|u| self.user_nodes.get(u))
    }

    /// The rules `v`'s filter is made of: those with `v` among their destinations, and
    /// for an approved exit node also those naming addresses it forwards to (sorted,
    /// without duplicates).
    fn filter_rules(&self, v: usize) -> Vec<u32> {
        let mut ids = self.dst_rules[v].clone();
        if self.nodes[v].is_exit() && !self.prefix_rules.is_empty() {
            ids.extend_from_slice(&self.prefix_rules);
            ids.sort_unstable();
            ids.dedup();
        }
        ids
    }

    /// The packet filter to send to node `viewer`: the rules that admit
    /// traffic *to* it (its addresses, its approved subnet routes, and, for
    /// an approved exit node, the internet and the IPs/CIDRs outside the tailnet
    /// that rules name). Unknown ids get an empty filter, i.e. deny all inbound.
    pub fn filter(&self, viewer: i64) -> Vec<FilterRule> {
        let Some(v) = self.idx(viewer) else {
            return Vec::new();
        };
        let me = &self.nodes[v];
        let mut out = Vec::new();
        for ri in self.filter_rules(v) {
            let rule = &self.rules[ri as usize];
            let mut dst_ports = Vec::new();
            for d in &rule.dst {
                let mut add = |ip: String| {
                    for p in &d.ports {
                        push_unique(
                            &mut dst_ports,
                            NetPortRange {
                                ip: ip.clone(),
                                first: p.first,
                                last: p.last,
                            },
                        );
                    }
                };
                match &d.target {
                    Target::Any => add("*".into()),
                    Target::Nodes(s) if s.contains(v) => {
                        me.ips.iter().for_each(|ip| add(ip.to_string()));
                    }
                    Target::Nodes(_) => {}
                    Target::Prefix(p) if me.covered_by(p) || me.forwards_to(p) => add(fmt_net(p)),
                    Target::Prefix(_) => {}
                    Target::Internet => {
                        if me.exit_v4 {
                            internet_v4().iter().for_each(|p| add(p.to_string()));
                        }
                        if me.exit_v6 {
                            internet_v6().iter().for_each(|p| add(p.to_string()));
                        }
                    }
                }
            }
            if !dst_ports.is_empty() {
                out.push(FilterRule {
                    src_ips: rule.src_ips.clone(),
                    dst_ports,
                    ip_proto: rule.proto.clone(),
                });
            }
        }
        // autogroup:self: the viewer's own user's devices may reach it.
        if let Some(own) = self.own_devices(v) {
            for &ri in &self.src_rules[v] {
                let rule = &self.rules[ri as usize];
                if rule.self_ports.is_empty() {
                    continue;
                }
                let srcs: Vec<IpNet> = own
                    .iter()
                    .filter(|&i| rule.src.contains(i))
                    .flat_map(|i| self.nodes[i].ips.iter().map(|ip| IpNet::from(*ip)))
                    .collect();
                let mut dst_ports = Vec::new();
                for ip in &me.ips {
                    for p in &rule.self_ports {
                        push_unique(
                            &mut dst_ports,
                            NetPortRange {
                                ip: ip.to_string(),
                                first: p.first,
                                last: p.last,
                            },
                        );
                    }
                }
                if !dst_ports.is_empty() && !srcs.is_empty() {
                    out.push(FilterRule {
                        src_ips: IpNet::aggregate(&srcs).iter().map(fmt_net).collect(),
                        dst_ports,
                        ip_proto: rule.proto.clone(),
                    });
                }
            }
        }
        out
    }

    /// A key such that two viewers with equal keys get equal [`Self::filter`]s, so that a
    /// server computes (and serializes) one filter per class instead of one per node.
    /// Viewers whose filter names their own addresses (node, prefix, internet or
    /// `autogroup:self` destinations) are a class of their own.
    pub fn filter_class(&self, viewer: i64) -> FilterClass {
        let Some(v) = self.idx(viewer) else {
            return FilterClass::Unknown;
        };
        let own = self.dst_rules[v].iter().any(|&ri| {
            self.rules[ri as usize]
                .dst
                .iter()
                .any(|d| !matches!(d.target, Target::Any))
        }) || (self.nodes[v].is_exit() && !self.prefix_rules.is_empty())
            || (self.own_devices(v).is_some()
                && self.src_rules[v]
                    .iter()
                    .any(|&ri| !self.rules[ri as usize].self_ports.is_empty()));
        if own {
            FilterClass::Node(viewer)
        } else {
            FilterClass::Rules(self.dst_rules[v].clone())
        }
    }

    /// Peers `viewer` should be told about: every node it may reach or that
    /// may reach it (by address, approved subnet route, approved exit node
    /// for internet access, or autogroup:self). Sorted ids, without the
    /// viewer itself.
    pub fn visible_peers(&self, viewer: i64) -> Vec<i64> {
        let Some(v) = self.idx(viewer) else {
            return Vec::new();
        };
        let mut acc = BitSet::new(self.nodes.len());
        for &ri in &self.src_rules[v] {
            let rule = &self.rules[ri as usize];
            acc.union_with(&rule.dst_nodes);
            if !rule.self_ports.is_empty()
                && let Some(own) = self.own_devices(v)
            {
                acc.union_with(own);
            }
        }
        for &ri in &self.dst_rules[v] {
            acc.union_with(&self.rules[ri as usize].src);
        }
        acc.remove(v);
        let mut ids: Vec<i64> = acc.iter().map(|i| self.nodes[i].id).collect();
        ids.sort_unstable();
        ids
    }

    /// Whether `viewer` sees `peer` (the pairwise form of [`Self::visible_peers`]), in
    /// time proportional to the rules that mention the viewer: what a map session needs
    /// when only a few nodes changed.
    pub fn can_see(&self, viewer: i64, peer: i64) -> bool {
        let (Some(v), Some(p)) = (self.idx(viewer), self.idx(peer)) else {
            return false;
        };
        if v == p {
            return false;
        }
        self.src_rules[v].iter().any(|&ri| {
            let rule = &self.rules[ri as usize];
            rule.dst_nodes.contains(p)
                || (!rule.self_ports.is_empty()
                    && self.own_devices(v).is_some_and(|own| own.contains(p)))
        }) || self.dst_rules[v]
            .iter()
            .any(|&ri| self.rules[ri as usize].src.contains(p))
    }

    /// May `viewer` route internet traffic through an exit node? True when
    /// some rule has it in `src` and `autogroup:internet`, `*` or a `/0`
    /// CIDR in `dst`. The control server should only hand this node the
    /// `0.0.0.0/0`/`::/0` routes of exit-node peers when this is true.
    pub fn may_use_exit_nodes(&self, viewer: i64) -> bool {
        self.idx(viewer)
            .is_some_and(|v| self.exit_users.contains(v))
    }
}
