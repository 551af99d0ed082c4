//! Using the tailnet (and an exit node): addresses on the tun, routing table 52 and
//! policy rules, the way Tailscale sets up Linux.
//!
//! # The rule set
//!
//! With the defaults (`table = 52`, `fwmark = 0x80000`, base priority 5210) and the
//! tun called `tsunagu0`, [`RouteManager::apply`] converges on, for IPv4 and IPv6 alike:
//!
//! ```text
//! $ ip rule            # and the same for ip -6 rule, with the IPv6 LAN subnets
//! 5210: from all fwmark 0x80000/0xff0000 lookup main proto 52   # base+0, always
//! 5240: from all to 198.18.1.0/24 lookup main proto 52          # base+30, exit node with
//!                                                               #   allow_lan_access only, one
//!                                                               #   per directly connected LAN
//! 5250: from all fwmark 0x80000/0xff0000 unreachable proto 52   # base+40, always
//! 5255: from all to fe80::/10 unreachable proto 52              # base+45, ip -6 only: exit
//!                                                               #   node (in use or blocked)
//!                                                               #   without allow_lan_access
//! 5270: from all lookup 52 proto 52                             # base+60, always
//!
//! $ ip route show table 52
//! 100.64.0.2 dev tsunagu0 proto 52 scope link                  # one per peer route
//! default dev tsunagu0 proto 52 scope link                     # exit node only
//! unreachable default proto 52 metric 2147483647               # exit node only: fail closed
//! $ ip -6 route show table 52
//! fd7a:115c:a1e0::2 dev tsunagu0 proto 52 metric 1024 pref medium
//! default dev tsunagu0 proto 52 metric 1024 pref medium
//! unreachable default dev lo proto 52 metric 2147483647 pref medium
//! ```
//!
//! Everything we install carries protocol 52 ([`OWNER_PROTOCOL`]), which is how rules of
//! ours are told from someone else's at the same priority.
//!
//! and the tun has the node's addresses (`100.64.x.y/32`, `fd7a:115c:a1e0::…/128`), the
//! MTU of [`RouteState::mtu`] and is up.
//!
//! Why, rule by rule:
//! - **5210**: the daemon's own packets (the encrypted UDP to peers, DERP, control; its
//!   sockets set `SO_MARK` to the fwmark) use the main table, i.e. the physical network.
//!   Without it, with an exit node, the tunnel's own packets would be routed into the
//!   tunnel: a loop.
//! - **5250**: if main has no route for a marked packet it must fail, not fall through to
//!   table 52 (that loop again). Tailscale also tries table `default` at +20 before
//!   this; that table is empty on every system, so we leave it out.
//! - **5255**: a link-local destination names its interface (`fe80::1%eth0`), so its
//!   route lookup skips table 52's routes through the tun and would find the LAN in
//!   main: a router-advertised `fe80::` resolver would get DNS past the tunnel. Behind an
//!   exit node nothing may reach the LAN unless the user allows it, so `fe80::/10` is
//!   unreachable there ("Network is unreachable"); the daemon's own marked packets match
//!   5210 first.
//! - **5270**: everything else consults table 52 *before* main (32766). Tailnet routes
//!   therefore win over anything in main, even over a LAN or an ISP that uses the same
//!   CGNAT range 100.64.0.0/10. Without an exit node, table 52 holds only tailnet routes,
//!   so any other destination finds nothing there and continues to main, as if we were
//!   not installed. That is why there is **no** `lookup main suppress_prefixlength 0`
//!   rule (considered for base+20): it would only let main's more specific routes (a
//!   CGNAT-addressed uplink, a docker bridge in 100.64/10) steal tailnet destinations,
//!   and it adds nothing otherwise.
//! - **exit node**: table 52 gets `default dev tun`, so non-marked traffic goes through
//!   the tunnel, including to the local LAN (a printer on 198.18.1.0/24 is unreachable):
//!   only marked packets reach the physical network. The `unreachable default` with a
//!   worse metric sits under it: if the tun disappears (daemon crash), the kernel drops
//!   the routes through it and lookups hit `unreachable` ("No route to host") instead of
//!   falling through to main and leaking out of the physical interface. The rules stay
//!   until [`cleanup_stale`] at the next start.
//! - **5240, allow LAN access**: one `to <subnet> lookup main` per LAN subnet: directly
//!   connected routes of main (IPv4 `scope link`, IPv6 without gateway) on interfaces
//!   other than the tun and `lo`, except link-local ones (link-local traffic names its
//!   interface, and such lookups skip table 52's routes through the tun anyway) and
//!   except subnets that overlap a tailnet address or peer route (tailnet routes keep
//!   their precedence, as above). Internet traffic still goes through the tunnel.
//!   Subnets are recomputed on every [`RouteManager::apply`]; call it when links change.
//!
//! # Convergence
//!
//! [`RouteManager::apply`] compares the desired state with what the kernel has *now*
//! (our table, rules that are ours by priority and shape, the tun's addresses) and
//! only adds what is missing and deletes what is stale, so it is idempotent, repairs
//! routes the kernel dropped with a recreated tun, and switches exit node or LAN access
//! on and off any number of times. Order matters for leaks: rules are added before
//! routes, routes are added (with replace, so a changed route swaps atomically) before
//! stale ones are deleted, and stale rules go last.
//!
//! [`RouteManager::cleanup`] and [`cleanup_stale`] delete only our rules (recognised by
//! priority *and* table/action/selectors *and* owner protocol) and flush our table;
//! nothing else is touched.
//!
//! # Backend
//!
//! The kernel is reached through [`RouteBackend`]; [`NetlinkBackend`] is the real one. It
//! builds its messages with the `rtnetlink` crate's builders and packet types, and
//! talks over a plain blocking netlink socket: the crate's async handle returns its
//! dumps as `futures::Stream`s, which this crate cannot consume without a futures
//! dependency, and a blocking socket needs no runtime at all. The socket is opened in
//! the calling thread's network namespace.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{
    RuleAction as NlRuleAction, RuleAttribute, RuleFlags, RuleMessage,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};
use rtnetlink::{AddressMessageBuilder, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use thiserror::Error;

/// Default routing table (Tailscale's: "52" is above "TS" on a QWERTY keyboard).
pub const DEFAULT_TABLE: u32 = 52;
/// Default mark the daemon's own sockets carry (`SO_MARK`), Tailscale's bypass mark.
pub const DEFAULT_FWMARK: u32 = 0x0008_0000;
/// The mark bits the rules look at: the third byte, clear of the low bytes sysadmins
/// and Kubernetes use.
pub const FWMARK_MASK: u32 = 0x00ff_0000;
/// Default priority of our first rule.
pub const DEFAULT_RULE_PRIORITY_BASE: u32 = 5210;
/// Offsets from the base priority. Gaps let an admin insert rules in between.
pub const PRIORITY_FWMARK_MAIN: u32 = 0;
pub const PRIORITY_LAN: u32 = 30;
pub const PRIORITY_FWMARK_UNREACHABLE: u32 = 40;
/// `to fe80::/10 unreachable`, with an exit node (in use or blocked) and no LAN access:
/// link-local destinations name their interface, so the route lookup skips table 52's
/// routes through the tun and would find the LAN in main. A router-advertised
/// `fe80::` resolver would then get DNS queries past the tunnel.
pub const PRIORITY_LINK_LOCAL: u32 = 45;
pub const PRIORITY_TABLE: u32 = 60;
/// Metric of the `unreachable default` under the exit-node default: anything works as
/// long as it is worse than the tun route's, and this leaves room for both.
pub const FAIL_CLOSED_METRIC: u32 = 0x7fff_ffff;
/// Metric of our routes through the tun. IPv4 routes default to 0; IPv6 ones to 1024
/// (what the kernel picks for 0), stated explicitly so that dumps compare equal.
const TUN_METRIC_V4: u32 = 0;
const TUN_METRIC_V6: u32 = 1024;
const TABLE_MAIN: u32 = 254;
/// The kernel gives `lo` index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// IPv6 needs at least this MTU; the tailnet is dual-stack.
const MIN_MTU: u16 = 1280;
/// Protocol number (`RTPROT_*`, "proto 52" in `ip rule`/`ip route`) on every rule and
/// route we install. Unregistered in iproute2's rt_protos; 52 like the table. It is what
/// makes "ours" exact: the kernel's rule delete treats absent selectors as wildcards, so
/// deleting `pref 5270 lookup 52` could remove a foreign `pref 5270 fwmark 0x1 lookup 52`
/// listed before ours; with the protocol in the request it cannot.
pub const OWNER_PROTOCOL: u8 = 52;
/// `ip rule` priority of the main table's rule; ours must all come before it.
const MAIN_RULE_PRIORITY: u32 = 32766;

/// Where and how to route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Our routing table; default [`DEFAULT_TABLE`].
    pub table: u32,
    /// Mark of the daemon's own packets (mask [`FWMARK_MASK`]); default [`DEFAULT_FWMARK`].
    pub fwmark: u32,
    /// Priority of our first rule; default [`DEFAULT_RULE_PRIORITY_BASE`].
    pub rule_priority_base: u32,
    /// The tun interface.
    pub tun_ifname: String,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            table: DEFAULT_TABLE,
            fwmark: DEFAULT_FWMARK,
            rule_priority_base: DEFAULT_RULE_PRIORITY_BASE,
            tun_ifname: "tsunagu0".to_owned(),
        }
    }
}

/// What the routing should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteState {
    /// This node's tailnet addresses, assigned to the tun (100.64.x.y/32, fd7a:…/128).
    pub addresses: Vec<IpNet>,
    /// Peers' allowed IPs, routed into the tun. `/0` entries are ignored: default
    /// routes are governed by `exit_node` alone, so they always come with the
    /// fail-closed route and the LAN handling.
    pub peer_routes: Vec<IpNet>,
    /// Route 0.0.0.0/0 and ::/0 into the tunnel.
    pub exit_node: bool,
    /// No usable exit node although one is chosen: only the fail-closed `unreachable
    /// default` (and, with `allow_lan_access`, the LAN rules), so internet traffic fails
    /// instead of leaving directly. Ignored when `exit_node` is set.
    pub block_internet: bool,
    /// With an exit node, keep directly connected LAN subnets reachable directly.
    pub allow_lan_access: bool,
    /// MTU of the tun.
    pub mtu: u16,
}

impl Default for RouteState {
    fn default() -> Self {
        RouteState {
            addresses: Vec::new(),
            peer_routes: Vec::new(),
            exit_node: false,
            block_internet: false,
            allow_lan_access: false,
            mtu: MIN_MTU,
        }
    }
}

/// Routing failures, naming the operation and the kernel's reason.
#[derive(Debug, Error)]
pub enum RouteError {
    #[error("invalid route config: {0}")]
    InvalidConfig(String),
    #[error("invalid route state: {0}")]
    InvalidState(String),
    #[error("tun interface {0:?} not found")]
    LinkNotFound(String),
    /// The kernel refused `op`; `ext_ack` is its extended-ack message when it gave one.
    #[error("{op}: {source}{}", .ext_ack.as_deref().map(|m| format!(" (kernel: {m})")).unwrap_or_default())]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
        ext_ack: Option<String>,
    },
    #[error("{op}: unexpected netlink reply: {reason}")]
    Decode { op: String, reason: String },
}

impl RouteError {
    /// The errno behind a kernel refusal, if that is what this is.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            RouteError::Netlink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    fn default_route(self) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(Ipv4Net::default()),
            Family::V6 => IpNet::V6(Ipv6Net::default()),
        }
    }

    fn tun_metric(self) -> u32 {
        match self {
            Family::V4 => TUN_METRIC_V4,
            Family::V6 => TUN_METRIC_V6,
        }
    }

    fn netlink(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

/// A network interface, as far as routing cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
}

/// Route types we tell apart (`RTN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Unicast,
    Unreachable,
    Blackhole,
    Prohibit,
    Throw,
    Other(u8),
}

/// One route, in any table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub table: u32,
    pub kind: RouteKind,
    /// Output interface; the kernel reports `lo` for unreachable IPv6 routes.
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    /// Has several next hops (then `oif`/`gateway` are not meaningful).
    pub multipath: bool,
    pub metric: u32,
    /// `RT_SCOPE_*` (IPv4 only; IPv6 routes are all universe).
    pub scope: u8,
    /// `RTPROT_*`, who installed it.
    pub protocol: u8,
}

const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;

impl Route {
    /// What identifies a route of ours for diffing: the other fields are either
    /// determined by these or are the kernel's business (an unreachable IPv6 route
    /// reports `lo` as its device).
    fn key(&self) -> (IpNet, RouteKind, Option<u32>, u32) {
        let oif = if self.kind == RouteKind::Unicast {
            self.oif
        } else {
            None
        };
        (self.dst, self.kind, oif, self.metric)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Unicast => {}
            RouteKind::Unreachable => f.write_str("unreachable ")?,
            RouteKind::Blackhole => f.write_str("blackhole ")?,
            RouteKind::Prohibit => f.write_str("prohibit ")?,
            RouteKind::Throw => f.write_str("throw ")?,
            RouteKind::Other(t) => write!(f, "type {t} ")?,
        }
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let (RouteKind::Unicast, Some(oif)) = (self.kind, self.oif) {
            write!(f, " dev #{oif}")?;
        }
        write!(f, " table {} metric {}", self.table, self.metric)
    }
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleAction {
    Table(u32),
    Unreachable,
    Other(u8),
}

/// One policy routing rule (`ip rule`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub family: Family,
    pub priority: u32,
    pub action: RuleAction,
    /// (mark, mask)
    pub fwmark: Option<(u32, u32)>,
    pub dst: Option<IpNet>,
    pub src: Option<IpNet>,
    pub suppress_prefixlen: Option<u32>,
    /// `FRA_PROTOCOL`: who installed the rule; ours carry [`OWNER_PROTOCOL`].
    pub protocol: u8,
    /// Selectors we never use (iif/oif, tos, uid, ports, `not`, ...): a rule with any of
    /// them is never ours, whatever its priority.
    pub other_selectors: bool,
}

impl Rule {
    fn new(family: Family, priority: u32, action: RuleAction) -> Rule {
        Rule {
            family,
            priority,
            action,
            fwmark: None,
            dst: None,
            src: None,
            suppress_prefixlen: None,
            protocol: OWNER_PROTOCOL,
            other_selectors: false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fam = match self.family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        write!(f, "{fam} rule pref {}", self.priority)?;
        if let Some(dst) = self.dst {
            write!(f, " to {dst}")?;
        }
        if let Some((mark, mask)) = self.fwmark {
            write!(f, " fwmark {mark:#x}/{mask:#x}")?;
        }
        if let Some(p) = self.suppress_prefixlen {
            write!(f, " suppress_prefixlength {p}")?;
        }
        match self.action {
            RuleAction::Table(t) => write!(f, " lookup {t}")?,
            RuleAction::Unreachable => f.write_str(" unreachable")?,
            RuleAction::Other(a) => write!(f, " action {a}")?,
        }
        write!(f, " proto {}", self.protocol)
    }
}

/// The kernel operations routing needs: the seam between the policy in
/// [`RouteManager`] and the mechanism (netlink, or a fake in tests).
///
/// Adds are idempotent (an existing identical object is success; routes are added with
/// replace semantics), deletes of absent objects are success.
pub trait RouteBackend: Send {
    /// Whether the kernel has IPv6 at all.
    fn ipv6_available(&self) -> bool;
    fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, RouteError>;
    /// Sets the MTU and brings the link up.
    fn set_link_up(&mut self, index: u32, mtu: u32) -> Result<(), RouteError>;
    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, RouteError>;
    fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), RouteError>;
    fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), RouteError>;
    /// All routes of a family, all tables.
    fn routes(&mut self, family: Family) -> Result<Vec<Route>, RouteError>;
    fn add_route(&mut self, route: &Route) -> Result<(), RouteError>;
    fn del_route(&mut self, route: &Route) -> Result<(), RouteError>;
    fn rules(&mut self, family: Family) -> Result<Vec<Rule>, RouteError>;
    fn add_rule(&mut self, rule: &Rule) -> Result<(), RouteError>;
    fn del_rule(&mut self, rule: &Rule) -> Result<(), RouteError>;
}

/// Owns our routing table and rules. Dropping it leaves them in place (fail closed);
/// [`RouteManager::cleanup`] removes them.
pub struct RouteManager {
    cfg: RouteConfig,
    backend: Box<dyn RouteBackend>,
}

impl fmt::Debug for RouteManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteManager")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl RouteManager {
    /// Opens a netlink socket in the calling thread's network namespace. The tun need
    /// not exist yet; [`RouteManager::apply`] looks it up.
    pub fn new(cfg: RouteConfig) -> Result<Self, RouteError> {
        validate_config(&cfg)?;
        let backend = NetlinkBackend::open()?;
        Self::with_backend(cfg, Box::new(backend))
    }

    /// [`RouteManager::new`] with another backend.
    pub fn with_backend(
        cfg: RouteConfig,
        backend: Box<dyn RouteBackend>,
    ) -> Result<Self, RouteError> {
        validate_config(&cfg)?;
        Ok(RouteManager { cfg, backend })
    }

    pub fn config(&self) -> &RouteConfig {
        &self.cfg
    }

    /// Makes the kernel match `desired` (see the module documentation).
    pub fn apply(&mut self, desired: &RouteState) -> Result<(), RouteError> {
        validate_state(desired)?;
        let families = self.families();
        let tun = self
            .backend
            .link_by_name(&self.cfg.tun_ifname)?
            .ok_or_else(|| RouteError::LinkNotFound(self.cfg.tun_ifname.clone()))?;

        if !tun.up || tun.mtu != u32::from(desired.mtu) {
            self.backend
                .set_link_up(tun.index, u32::from(desired.mtu))?;
        }
        self.sync_addresses(&tun, desired, &families)?;
        self.converge(desired, tun.index, &families)
    }

    /// Fail closed before there is a tun (or a map): only the rules and the `unreachable
    /// default`s of a blocked exit node (with the LAN rules when `allow_lan_access`), so
    /// internet traffic fails instead of leaving directly. What a daemon with an exit
    /// node in its settings installs at start, before it reaches the server;
    /// [`RouteManager::apply`] later converges from it without a gap.
    pub fn block_without_tun(&mut self, allow_lan_access: bool) -> Result<(), RouteError> {
        let desired = RouteState {
            // Not assigned to anything here (there is no tun): only so that a LAN
            // overlapping the tailnet's ranges is not exempted, as with a map.
            addresses: ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            block_internet: true,
            allow_lan_access,
            ..RouteState::default()
        };
        let families = self.families();
        // No tun: index 0 names no interface, so no route is taken for the tun's.
        self.converge(&desired, 0, &families)
    }

    /// Rules and routes (not the tun itself) to `desired`, for a tun at `tun_index`.
    fn converge(
        &mut self,
        desired: &RouteState,
        tun_index: u32,
        families: &[Family],
    ) -> Result<(), RouteError> {
        let families = families.to_vec();
        let want_routes = desired_routes(&self.cfg, desired, tun_index, &families);
        let lan = if (desired.exit_node || desired.block_internet) && desired.allow_lan_access {
            self.lan_subnets(tun_index, desired, &families)?
        } else {
            Vec::new()
        };
        let block_link_local = (desired.exit_node || desired.block_internet)
            && !desired.allow_lan_access
            && families.contains(&Family::V6);
        let mut want_rules = desired_rules(&self.cfg, &families, &lan);
        if block_link_local {
            want_rules.push(Rule {
                dst: Some(link_local_v6()),
                ..Rule::new(
                    Family::V6,
                    self.cfg.rule_priority_base + PRIORITY_LINK_LOCAL,
                    RuleAction::Unreachable,
                )
            });
            want_rules.sort();
        }
        let have_rules = self.our_rules(&families)?;
        let have_routes = self.our_routes(&families)?;

        // Rules first (the fwmark bypass before anything can route into the tun),
        // lowest priority number first.
        for rule in want_rules.iter().filter(|r| !have_rules.contains(r)) {
            tracing::debug!(%rule, "adding rule");
            self.backend.add_rule(rule)?;
        }
        // Routes through the tun before the unreachable fallback, so switching the exit
        // node on never blackholes traffic in between.
        let mut missing: Vec<&Route> = want_routes
            .iter()
            .filter(|w| !have_routes.iter().any(|h| h.key() == w.key()))
            .collect();
        missing.sort_by_key(|r| r.kind != RouteKind::Unicast);
        for route in missing {
            tracing::debug!(%route, "adding route");
            self.backend.add_route(route)?;
        }
        for route in have_routes
            .iter()
            .filter(|h| !want_routes.iter().any(|w| w.key() == h.key()))
        {
            tracing::debug!(%route, "deleting stale route");
            self.backend.del_route(route)?;
        }
        for rule in have_rules.iter().rev().filter(|r| !want_rules.contains(r)) {
            tracing::debug!(%rule, "deleting stale rule");
            self.backend.del_rule(rule)?;
        }
        tracing::info!(
            tun = %self.cfg.tun_ifname,
            exit_node = desired.exit_node,
            allow_lan = desired.allow_lan_access,
            lan_subnets = lan.len(),
            peer_routes = desired.peer_routes.len(),
            "routing applied"
        );
        Ok(())
    }

    /// Deletes our rules and flushes our table. The tun's addresses are left: the tun is
    /// the daemon's and goes away with it.
    pub fn cleanup(mut self) -> Result<(), RouteError> {
        self.cleanup_inner()
    }

    fn cleanup_inner(&mut self) -> Result<(), RouteError> {
        let families = self.families();
        // Rules first, once they are gone nothing consults our table, so flushing it
        // cannot make traffic change path twice; and highest priority number first, so
        // the fwmark bypass is the last to go and our own packets never loop meanwhile.
        let mut first_err = None;
        for rule in self.our_rules(&families)?.into_iter().rev() {
            if let Err(e) = self.backend.del_rule(&rule) {
                tracing::warn!(error = %e, "cleanup");
                first_err.get_or_insert(e);
            }
        }
        for route in self.our_routes(&families)? {
            if let Err(e) = self.backend.del_route(&route) {
                tracing::warn!(error = %e, "cleanup");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn families(&self) -> Vec<Family> {
        if self.backend.ipv6_available() {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    fn sync_addresses(
        &mut self,
        tun: &Link,
        desired: &RouteState,
        families: &[Family],
    ) -> Result<(), RouteError> {
        let want: BTreeSet<IpNet> = desired
            .addresses
            .iter()
            .filter(|a| families.contains(&Family::of(a)))
            .copied()
            .collect();
        let have: BTreeSet<IpNet> = self.backend.addresses(tun.index)?.into_iter().collect();
        for addr in want.difference(&have) {
            self.backend.add_address(tun.index, *addr)?;
        }
        // The tun is ours, so any other address on it is a stale tailnet address, except
        // the IPv6 link-local one the kernel generates by itself.
        for addr in have.difference(&want).filter(|a| !is_link_local(a)) {
            self.backend.del_address(tun.index, *addr)?;
        }
        Ok(())
    }

    /// Directly connected LAN subnets from the main table (see the module docs).
    fn lan_subnets(
        &mut self,
        tun_index: u32,
        desired: &RouteState,
        families: &[Family],
    ) -> Result<Vec<IpNet>, RouteError> {
        let mut main = Vec::new();
        for fam in families {
            main.extend(self.backend.routes(*fam)?);
        }
        Ok(lan_subnets_from(&main, tun_index, desired))
    }

    fn our_rules(&mut self, families: &[Family]) -> Result<Vec<Rule>, RouteError> {
        let mut rules = Vec::new();
        for fam in families {
            rules.extend(
                self.backend
                    .rules(*fam)?
                    .into_iter()
                    .filter(|r| is_our_rule(&self.cfg, r)),
            );
        }
        rules.sort();
        Ok(rules)
    }

    fn our_routes(&mut self, families: &[Family]) -> Result<Vec<Route>, RouteError> {
        let mut routes = Vec::new();
        for fam in families {
            routes.extend(
                self.backend
                    .routes(*fam)?
                    .into_iter()
                    .filter(|r| r.table == self.cfg.table),
            );
        }
        Ok(routes)
    }
}

/// Removes what a crashed daemon with the same config left: our rules and our table's
/// routes. Nothing else is touched; the tun need not exist.
pub fn cleanup_stale(cfg: &RouteConfig) -> Result<(), RouteError> {
    RouteManager::new(cfg.clone())?.cleanup()
}

fn validate_config(cfg: &RouteConfig) -> Result<(), RouteError> {
    let bad = |m: String| Err(RouteError::InvalidConfig(m));
    let name = &cfg.tun_ifname;
    if name.is_empty()
        || name.len() >= 16
        || name
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'/' || b == b':')
    {
        return bad(format!("{name:?} is not a valid Linux interface name"));
    }
    // 0 is "unspecified", 252..=255 are compat/default/main/local.
    if cfg.table == 0 || (252..=255).contains(&cfg.table) {
        return bad(format!("routing table {} is reserved", cfg.table));
    }
    if cfg.fwmark == 0 || cfg.fwmark & !FWMARK_MASK != 0 {
        return bad(format!(
            "fwmark {:#x} must be non-zero and within mask {FWMARK_MASK:#x}",
            cfg.fwmark
        ));
    }
    let last = cfg.rule_priority_base.checked_add(PRIORITY_TABLE);
    if cfg.rule_priority_base == 0 || last.is_none_or(|p| p >= MAIN_RULE_PRIORITY) {
        return bad(format!(
            "rule priorities {}..+{PRIORITY_TABLE} must lie in 1..{MAIN_RULE_PRIORITY} (before the main table's rule)",
            cfg.rule_priority_base
        ));
    }
    Ok(())
}

fn validate_state(state: &RouteState) -> Result<(), RouteError> {
    if state.mtu < MIN_MTU {
        return Err(RouteError::InvalidState(format!(
            "MTU {} is below {MIN_MTU}, the minimum for IPv6",
            state.mtu
        )));
    }
    Ok(())
}

fn is_link_local(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.addr().is_link_local(),
        // fe80::/10
        IpNet::V6(n) => n.addr().segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn desired_routes(
    cfg: &RouteConfig,
    state: &RouteState,
    tun_index: u32,
    families: &[Family],
) -> Vec<Route> {
    let via_tun = |dst: IpNet| {
        let fam = Family::of(&dst);
        Route {
            dst,
            table: cfg.table,
            kind: RouteKind::Unicast,
            oif: Some(tun_index),
            gateway: None,
            multipath: false,
            metric: fam.tun_metric(),
            scope: if fam == Family::V4 {
                RT_SCOPE_LINK
            } else {
                RT_SCOPE_UNIVERSE
            },
            protocol: OWNER_PROTOCOL,
        }
    };
    let mut dsts: BTreeSet<IpNet> = BTreeSet::new();
    for net in &state.peer_routes {
        if net.prefix_len() == 0 {
            tracing::debug!(%net, "ignoring default route among peer routes; exit_node decides");
            continue;
        }
        if families.contains(&Family::of(net)) {
            dsts.insert(net.trunc());
        }
    }
    let mut routes: Vec<Route> = dsts.into_iter().map(via_tun).collect();
    if state.exit_node || state.block_internet {
        for fam in families {
            if state.exit_node {
                routes.push(via_tun(fam.default_route()));
            }
            routes.push(Route {
                dst: fam.default_route(),
                table: cfg.table,
                kind: RouteKind::Unreachable,
                oif: None,
                gateway: None,
                multipath: false,
                metric: FAIL_CLOSED_METRIC,
                scope: RT_SCOPE_UNIVERSE,
                protocol: OWNER_PROTOCOL,
            });
        }
    }
    routes
}

fn desired_rules(cfg: &RouteConfig, families: &[Family], lan: &[IpNet]) -> Vec<Rule> {
    let base = cfg.rule_priority_base;
    let mut rules = Vec::new();
    for fam in families {
        rules.push(Rule {
            fwmark: Some((cfg.fwmark, FWMARK_MASK)),
            ..Rule::new(
                *fam,
                base + PRIORITY_FWMARK_MAIN,
                RuleAction::Table(TABLE_MAIN),
            )
        });
        rules.push(Rule {
            fwmark: Some((cfg.fwmark, FWMARK_MASK)),
            ..Rule::new(
                *fam,
                base + PRIORITY_FWMARK_UNREACHABLE,
                RuleAction::Unreachable,
            )
        });
        rules.push(Rule::new(
            *fam,
            base + PRIORITY_TABLE,
            RuleAction::Table(cfg.table),
        ));
    }
    for net in lan {
        rules.push(Rule {
            dst: Some(*net),
            ..Rule::new(
                Family::of(net),
                base + PRIORITY_LAN,
                RuleAction::Table(TABLE_MAIN),
            )
        });
    }
    rules.sort();
    rules.dedup();
    rules
}

/// Whether a kernel rule is one of ours: right priority *and* the exact shape we
/// install there, so a foreign rule that happens to share a priority is left alone.
fn is_our_rule(cfg: &RouteConfig, r: &Rule) -> bool {
    if r.other_selectors
        || r.src.is_some()
        || r.suppress_prefixlen.is_some()
        || r.protocol != OWNER_PROTOCOL
    {
        return false;
    }
    let Some(offset) = r.priority.checked_sub(cfg.rule_priority_base) else {
        return false;
    };
    let our_mark = Some((cfg.fwmark, FWMARK_MASK));
    match offset {
        PRIORITY_FWMARK_MAIN => {
            r.action == RuleAction::Table(TABLE_MAIN) && r.fwmark == our_mark && r.dst.is_none()
        }
        PRIORITY_LAN => {
            r.action == RuleAction::Table(TABLE_MAIN) && r.fwmark.is_none() && r.dst.is_some()
        }
        PRIORITY_FWMARK_UNREACHABLE => {
            r.action == RuleAction::Unreachable && r.fwmark == our_mark && r.dst.is_none()
        }
        PRIORITY_TABLE => {
            r.action == RuleAction::Table(cfg.table) && r.fwmark.is_none() && r.dst.is_none()
        }
        PRIORITY_LINK_LOCAL => {
            r.action == RuleAction::Unreachable
                && r.fwmark.is_none()
                && r.dst == Some(link_local_v6())
        }
        _ => false,
    }
}

/// fe80::/10.
fn link_local_v6() -> IpNet {
    IpNet::V6(Ipv6Net::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10).expect("valid prefix"))
}

fn lan_subnets_from(routes: &[Route], tun_index: u32, state: &RouteState) -> Vec<IpNet> {
    let tailnet: Vec<&IpNet> = state
        .addresses
        .iter()
        .chain(state.peer_routes.iter())
        .filter(|n| n.prefix_len() > 0)
        .collect();
    let mut out = BTreeSet::new();
    for r in routes {
        let connected = r.table == TABLE_MAIN
            && r.kind == RouteKind::Unicast
            && r.gateway.is_none()
            && !r.multipath
            && r.oif.is_some_and(|i| i != tun_index && i != LOOPBACK_IFINDEX)
            // IPv4 marks on-link routes with scope link; IPv6 has no scopes.
            && (matches!(r.dst, IpNet::V6(_)) || r.scope == RT_SCOPE_LINK);
        if !connected || r.dst.prefix_len() == 0 || is_link_local(&r.dst) {
            continue;
        }
        if r.dst.network().is_multicast() {
            continue;
        }
        let dst = r.dst.trunc();
        if let Some(t) = tailnet.iter().find(|t| overlaps(t, &dst)) {
            tracing::info!(lan = %dst, tailnet = %t, "LAN subnet overlaps the tailnet; not exempting it");
            continue;
        }
        out.insert(dst);
    }
    out.into_iter().collect()
}

// ---------------------------------------------------------------------------------
// Netlink backend.

/// [`RouteBackend`] over an `NETLINK_ROUTE` socket of the calling thread's namespace.
pub struct NetlinkBackend {
    nl: Nl,
    ipv6: bool,
}

impl fmt::Debug for NetlinkBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetlinkBackend")
            .field("ipv6", &self.ipv6)
            .finish_non_exhaustive()
    }
}

impl NetlinkBackend {
    pub fn open() -> Result<Self, RouteError> {
        let nl = Nl::open().map_err(|source| RouteError::Netlink {
            op: "opening rtnetlink socket".into(),
            source,
            ext_ack: None,
        })?;
        // The whole tree disappears when the kernel runs without IPv6 (ipv6.disable=1);
        // then there is nothing IPv6 to route and rules for it would fail.
        let ipv6 = Path::new("/proc/sys/net/ipv6").exists();
        Ok(NetlinkBackend { nl, ipv6 })
    }

    fn ack(
        &mut self,
        op: impl FnOnce() -> String,
        msg: RouteNetlinkMessage,
        flags: u16,
        ok: &[i32],
    ) -> Result<(), RouteError> {
        match self.nl.ack(msg, flags) {
            Ok(()) => Ok(()),
            Err(NlError::Kernel { errno, .. }) if ok.contains(&errno) => Ok(()),
            Err(e) => Err(e.into_route_error(op())),
        }
    }

    fn dump(
        &mut self,
        op: impl Fn() -> String,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, RouteError> {
        self.nl.dump(msg).map_err(|e| e.into_route_error(op()))
    }
}

impl RouteBackend for NetlinkBackend {
    fn ipv6_available(&self) -> bool {
        self.ipv6
    }

    fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, RouteError> {
        // A GET by name rather than a dump: we need one link, and it spares decoding
        // every other (possibly exotic) link on the host.
        let msg = LinkUnspec::new_with_name(name).build();
        let op = || format!("looking up link {name:?}");
        let replies = match self.nl.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(r) => r,
            Err(NlError::Kernel { errno, .. }) if errno == libc::ENODEV => return Ok(None),
            Err(e) => return Err(e.into_route_error(op())),
        };
        for reply in replies {
            if let RouteNetlinkMessage::NewLink(m) = reply {
                return Ok(Some(parse_link(&m)));
            }
        }
        Ok(None)
    }

    fn set_link_up(&mut self, index: u32, mtu: u32) -> Result<(), RouteError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::default()
            .index(index)
            .mtu(mtu)
            .up()
            .build();
        self.ack(
            || format!("setting link #{index} up with mtu {mtu}"),
            RouteNetlinkMessage::SetLink(msg),
            0,
            &[],
        )
    }

    fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, RouteError> {
        let replies = self.dump(
            || format!("listing addresses of link #{index}"),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewAddress(m) if m.header.index == index => parse_address(m),
                _ => None,
            })
            .collect())
    }

    fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), RouteError> {
        let mut msg = address_msg(index, addr);
        if let IpNet::V6(_) = addr {
            // The control plane hands out unique addresses and a tun has no neighbours
            // to ask: duplicate address detection would only keep it tentative.
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.ack(
            || format!("adding address {addr} to link #{index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            &[],
        )
    }

    fn del_address(&mut self, index: u32, addr: IpNet) -> Result<(), RouteError> {
        self.ack(
            || format!("deleting address {addr} from link #{index}"),
            RouteNetlinkMessage::DelAddress(address_msg(index, addr)),
            0,
            &[libc::EADDRNOTAVAIL, libc::ENODEV],
        )
    }

    fn routes(&mut self, family: Family) -> Result<Vec<Route>, RouteError> {
        let mut req = RouteMessage::default();
        req.header.address_family = family.netlink();
        let replies = self.dump(
            || format!("listing {family:?} routes"),
            RouteNetlinkMessage::GetRoute(req),
        )?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(m) => parse_route(m),
                _ => None,
            })
            .collect())
    }

    fn add_route(&mut self, route: &Route) -> Result<(), RouteError> {
        // Replace: a route with the same destination and metric (say, through a tun
        // that was recreated) is swapped in one step, without a gap.
        self.ack(
            || format!("adding route {route}"),
            RouteNetlinkMessage::NewRoute(route_msg(route)),
            NLM_F_CREATE | NLM_F_REPLACE,
            &[],
        )
    }

    fn del_route(&mut self, route: &Route) -> Result<(), RouteError> {
        self.ack(
            || format!("deleting route {route}"),
            RouteNetlinkMessage::DelRoute(route_msg(route)),
            0,
            &[libc::ESRCH, libc::ENOENT],
        )
    }

    fn rules(&mut self, family: Family) -> Result<Vec<Rule>, RouteError> {
        let mut req = RuleMessage::default();
        req.header.family = family.netlink();
        let replies = self.dump(
            || format!("listing {family:?} rules"),
            RouteNetlinkMessage::GetRule(req),
        )?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRule(m) => parse_rule(m),
                _ => None,
            })
            .collect())
    }

    fn add_rule(&mut self, rule: &Rule) -> Result<(), RouteError> {
        self.ack(
            || format!("adding rule {rule}"),
            RouteNetlinkMessage::NewRule(rule_msg(rule)),
            NLM_F_CREATE | NLM_F_EXCL,
            &[libc::EEXIST],
        )
    }

    fn del_rule(&mut self, rule: &Rule) -> Result<(), RouteError> {
        self.ack(
            || format!("deleting rule {rule}"),
            RouteNetlinkMessage::DelRule(rule_msg(rule)),
            0,
            &[libc::ENOENT],
        )
    }
}

fn parse_link(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Mtu(v) => link.mtu = *v,
            _ => {}
        }
    }
    link
}

/// 100.100.100.100: the node's own resolver (MagicDNS), as on every Tailscale client.
pub const SERVICE_IPV4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

fn address_msg(index: u32, addr: IpNet) -> AddressMessage {
    match addr {
        // Scope host: reachable from this node only, and never picked as the source of
        // packets through the tun (source selection skips host-scoped addresses for
        // link-scoped routes), so the node's tailnet address stays the source.
        IpNet::V4(n) if n.addr() == SERVICE_IPV4 => {
            let mut m = AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build();
            m.header.scope = rtnetlink::packet_route::address::AddressScope::Host;
            m
        }
        IpNet::V4(n) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
        IpNet::V6(n) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
    }
}

fn parse_address(m: &AddressMessage) -> Option<IpNet> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
    // point-to-point link (such as a tun with a peer address), so LOCAL wins.
    let mut local = None;
    let mut address = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    IpNet::new(local.or(address)?, m.header.prefix_len).ok()
}

fn route_msg(r: &Route) -> RouteMessage {
    let mut msg = match r.dst {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .build(),
    };
    // The builder's table_id() keeps main (254) in the header for tables > 255; the
    // RTA_TABLE attribute wins in the kernel, but say "unspecified" like iproute2.
    msg.header.table = u8::try_from(r.table).unwrap_or(0);
    msg.attributes.push(RouteAttribute::Table(r.table));
    msg.header.kind = match r.kind {
        RouteKind::Unicast => RouteType::Unicast,
        RouteKind::Unreachable => RouteType::Unreachable,
        RouteKind::Blackhole => RouteType::BlackHole,
        RouteKind::Prohibit => RouteType::Prohibit,
        RouteKind::Throw => RouteType::Throw,
        RouteKind::Other(t) => RouteType::from(t),
    };
    msg.header.scope = RouteScope::from(r.scope);
    msg.header.protocol = RouteProtocol::from(r.protocol);
    if let Some(oif) = r.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(gw) = r.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    msg.attributes.push(RouteAttribute::Priority(r.metric));
    msg
}

fn parse_route(m: &RouteMessage) -> Option<Route> {
    let h = &m.header;
    let (v4, zero): (bool, IpAddr) = match h.address_family {
        AddressFamily::Inet => (true, Ipv4Addr::UNSPECIFIED.into()),
        AddressFamily::Inet6 => (false, Ipv6Addr::UNSPECIFIED.into()),
        _ => return None,
    };
    let mut dst = zero;
    let mut table = u32::from(h.table);
    let mut oif = None;
    let mut gateway = None;
    let mut multipath = false;
    let mut metric = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) if v4 => dst = (*ip).into(),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) if !v4 => dst = (*ip).into(),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some((*ip).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some((*ip).into()),
            RouteAttribute::Via(_) => gateway = Some(zero),
            RouteAttribute::MultiPath(_) => multipath = true,
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    let kind = match h.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Unreachable => RouteKind::Unreachable,
        RouteType::BlackHole => RouteKind::Blackhole,
        RouteType::Prohibit => RouteKind::Prohibit,
        RouteType::Throw => RouteKind::Throw,
        other => RouteKind::Other(u8::from(other)),
    };
    Some(Route {
        dst: IpNet::new(dst, h.destination_prefix_length).ok()?,
        table,
        kind,
        oif,
        gateway,
        multipath,
        metric,
        scope: u8::from(h.scope),
        protocol: u8::from(h.protocol),
    })
}

fn rule_msg(r: &Rule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = r.family.netlink();
    msg.attributes.push(RuleAttribute::Priority(r.priority));
    msg.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(r.protocol)));
    match r.action {
        RuleAction::Table(t) => {
            msg.header.action = NlRuleAction::ToTable;
            // Like iproute2: the header holds 8 bits, RTA_TABLE the real number.
            msg.header.table = u8::try_from(t).unwrap_or(0);
            msg.attributes.push(RuleAttribute::Table(t));
        }
        RuleAction::Unreachable => msg.header.action = NlRuleAction::Unreachable,
        RuleAction::Other(a) => msg.header.action = NlRuleAction::from(a),
    }
    if let Some((mark, mask)) = r.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(dst) = r.dst {
        msg.header.dst_len = dst.prefix_len();
        msg.attributes
            .push(RuleAttribute::Destination(dst.network()));
    }
    if let Some(src) = r.src {
        msg.header.src_len = src.prefix_len();
        msg.attributes.push(RuleAttribute::Source(src.network()));
    }
    if let Some(p) = r.suppress_prefixlen {
        msg.attributes.push(RuleAttribute::SuppressPrefixLen(p));
    }
    msg
}

fn parse_rule(m: &RuleMessage) -> Option<Rule> {
    let h = &m.header;
    let family = match h.family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    let mut table = u32::from(h.table);
    let mut rule = Rule::new(family, 0, RuleAction::Other(0));
    // Absent on kernels before 4.17, which then reported no owner at all.
    rule.protocol = 0;
    rule.other_selectors = h.tos != 0 || h.flags.contains(RuleFlags::Invert);
    let mut mark = None;
    let mut mask = u32::MAX;
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Protocol(p) => rule.protocol = u8::from(*p),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = *v,
            RuleAttribute::Destination(ip) => rule.dst = IpNet::new(*ip, h.dst_len).ok(),
            RuleAttribute::Source(ip) => rule.src = IpNet::new(*ip, h.src_len).ok(),
            // The kernel reports -1 (u32::MAX) for "not set".
            RuleAttribute::SuppressPrefixLen(p) if *p != u32::MAX => {
                rule.suppress_prefixlen = Some(*p)
            }
            RuleAttribute::SuppressIfGroup(g) if *g != u32::MAX => rule.other_selectors = true,
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::Goto(_)
            | RuleAttribute::Realm(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_) => rule.other_selectors = true,
            RuleAttribute::TunId(id) if *id != 0 => rule.other_selectors = true,
            RuleAttribute::L3MDev(true) => rule.other_selectors = true,
            _ => {}
        }
    }
    rule.fwmark = mark.map(|m| (m, mask));
    rule.action = match h.action {
        NlRuleAction::ToTable => RuleAction::Table(table),
        NlRuleAction::Unreachable => RuleAction::Unreachable,
        other => RuleAction::Other(u8::from(other)),
    };
    Some(rule)
}

/// A failed netlink exchange, before it is given its operation's name.
#[derive(Debug)]
enum NlError {
    Io(io::Error),
    Kernel { errno: i32, ext_ack: Option<String> },
    Decode(String),
}

impl NlError {
    fn into_route_error(self, op: String) -> RouteError {
        match self {
            NlError::Io(source) => RouteError::Netlink {
                op,
                source,
                ext_ack: None,
            },
            NlError::Kernel { errno, ext_ack } => RouteError::Netlink {
                op,
                source: io::Error::from_raw_os_error(errno),
                ext_ack,
            },
            NlError::Decode(reason) => RouteError::Decode { op, reason },
        }
    }
}

/// A blocking NETLINK_ROUTE request/response channel.
struct Nl {
    sock: Socket,
    seq: u32,
}

impl Nl {
    fn open() -> io::Result<Nl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Extended acks carry the kernel's own words ("Nexthop device is not up");
        // capped acks keep error replies small. Both are optional (old kernels).
        if let Err(e) = sock.set_ext_ack(true) {
            tracing::debug!(error = %e, "NETLINK_EXT_ACK unavailable");
        }
        if let Err(e) = sock.set_cap_ack(true) {
            tracing::debug!(error = %e, "NETLINK_CAP_ACK unavailable");
        }
        Ok(Nl { sock, seq: 0 })
    }

    fn send(&mut self, payload: RouteNetlinkMessage, flags: u16) -> Result<u32, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = NetlinkMessage::from(payload);
        msg.header.flags = NLM_F_REQUEST | flags;
        msg.header.sequence_number = self.seq;
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        loop {
            match self.sock.send(&buf, 0) {
                Ok(_) => return Ok(self.seq),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NlError::Io(e)),
            }
        }
    }

    /// A request acknowledged with NLMSG_ERROR(0).
    fn ack(&mut self, payload: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        self.request(payload, flags | NLM_F_ACK).map(drop)
    }

    /// A dump, retried when the kernel says it was interrupted by a concurrent change
    /// (NLM_F_DUMP_INTR): a torn listing could make us delete or miss things.
    fn dump(&mut self, payload: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let seq = self.send(payload.clone(), NLM_F_DUMP)?;
            let (msgs, interrupted) = self.collect(seq)?;
            if !interrupted {
                return Ok(msgs);
            }
        }
        Err(NlError::Decode(format!(
            "dump interrupted by concurrent changes {ATTEMPTS} times"
        )))
    }

    /// A request answered by messages and/or an ack.
    fn request(
        &mut self,
        payload: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let seq = self.send(payload, flags | NLM_F_ACK)?;
        self.collect(seq).map(|(msgs, _)| msgs)
    }

    /// Reads replies to `seq` until DONE or an ack/error.
    fn collect(&mut self, seq: u32) -> Result<(Vec<RouteNetlinkMessage>, bool), NlError> {
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let data = self.recv()?;
            let mut off = 0usize;
            while off < data.len() {
                let rest = data.get(off..).unwrap_or_default();
                let buf =
                    NetlinkBuffer::new_checked(rest).map_err(|e| NlError::Decode(e.to_string()))?;
                let len = buf.length() as usize;
                let (hdr_seq, hdr_flags) = (buf.sequence_number(), buf.flags());
                let one = rest.get(..len).unwrap_or(rest);
                off += len.div_ceil(4) * 4;
                if hdr_seq != seq {
                    // A late reply to an earlier request that failed half-way.
                    continue;
                }
                interrupted |= hdr_flags & NLM_F_DUMP_INTR != 0;
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(one);
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        // One odd object (a newer kernel's attribute) should not make
                        // the whole listing fail; skip it, loudly.
                        tracing::warn!(error = %e, "skipping undecodable netlink message");
                        continue;
                    }
                };
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Done(d) => {
                        if d.code < 0 {
                            return Err(NlError::Kernel {
                                errno: -d.code,
                                ext_ack: None,
                            });
                        }
                        return Ok((out, interrupted));
                    }
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok((out, interrupted)),
                            Some(code) => Err(NlError::Kernel {
                                errno: code.get().saturating_abs(),
                                ext_ack: ext_ack_message(hdr_flags, &e.header),
                            }),
                        };
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(NlError::Decode("netlink overrun".into()));
                    }
                    _ => {}
                }
            }
        }
    }

    /// One whole datagram, however big: peek at its size first.
    fn recv(&mut self) -> Result<Vec<u8>, NlError> {
        loop {
            let mut probe: Vec<u8> = Vec::with_capacity(64);
            let size = match self.sock.recv(&mut probe, libc::MSG_PEEK | libc::MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NlError::Io(e)),
            };
            let mut buf: Vec<u8> = Vec::with_capacity(size.max(64));
            match self.sock.recv(&mut buf, 0) {
                Ok(n) if n <= buf.len() => return Ok(buf),
                Ok(n) => {
                    return Err(NlError::Decode(format!(
                        "datagram of {n} bytes truncated to {}",
                        buf.len()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NlError::Io(e)),
            }
        }
    }
}

/// The kernel's NLMSGERR_ATTR_MSG from an error reply's payload (after the error code):
/// the request's header (and, unless capped, its body), then attributes.
fn ext_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    const NLMSG_HDRLEN: usize = 16;
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let mut off = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let len = u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?) as usize;
        len.div_ceil(4) * 4
    };
    while let Some(hdr) = payload.get(off..off + 4) {
        let len = usize::from(u16::from_ne_bytes([hdr[0], hdr[1]]));
        let kind = u16::from_ne_bytes([hdr[2], hdr[3]]) & 0x3fff;
        if len < 4 {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let value = payload.get(off + 4..off + len)?;
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        off += len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex, MutexGuard};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// An in-memory kernel with just enough semantics for the diff logic.
    #[derive(Default)]
    struct Kernel {
        link: Option<Link>,
        addrs: Vec<IpNet>,
        routes: Vec<Route>,
        rules: Vec<Rule>,
        log: Vec<String>,
    }

    /// The backend handed to the manager; the test keeps a clone to look inside.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Kernel>>);

    impl Fake {
        fn k(&self) -> MutexGuard<'_, Kernel> {
            self.0.lock().unwrap()
        }
    }

    impl RouteBackend for Fake {
        fn ipv6_available(&self) -> bool {
            true
        }
        fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, RouteError> {
            Ok(self.k().link.clone().filter(|l| l.name == name))
        }
        fn set_link_up(&mut self, _: u32, mtu: u32) -> Result<(), RouteError> {
            let mut k = self.k();
            if let Some(l) = &mut k.link {
                l.up = true;
                l.mtu = mtu;
            }
            k.log.push(format!("link mtu {mtu}"));
            Ok(())
        }
        fn addresses(&mut self, _: u32) -> Result<Vec<IpNet>, RouteError> {
            Ok(self.k().addrs.clone())
        }
        fn add_address(&mut self, _: u32, a: IpNet) -> Result<(), RouteError> {
            let mut k = self.k();
            k.addrs.push(a);
            k.log.push(format!("+addr {a}"));
            Ok(())
        }
        fn del_address(&mut self, _: u32, a: IpNet) -> Result<(), RouteError> {
            let mut k = self.k();
            k.addrs.retain(|x| *x != a);
            k.log.push(format!("-addr {a}"));
            Ok(())
        }
        fn routes(&mut self, f: Family) -> Result<Vec<Route>, RouteError> {
            Ok(self
                .k()
                .routes
                .iter()
                .filter(|r| Family::of(&r.dst) == f)
                .cloned()
                .collect())
        }
        fn add_route(&mut self, r: &Route) -> Result<(), RouteError> {
            let mut k = self.k();
            k.routes
                .retain(|x| !(x.table == r.table && x.dst == r.dst && x.metric == r.metric));
            k.routes.push(r.clone());
            k.log.push(format!("+route {r}"));
            Ok(())
        }
        fn del_route(&mut self, r: &Route) -> Result<(), RouteError> {
            let mut k = self.k();
            k.routes
                .retain(|x| x.key() != r.key() || x.table != r.table);
            k.log.push(format!("-route {r}"));
            Ok(())
        }
        fn rules(&mut self, f: Family) -> Result<Vec<Rule>, RouteError> {
            Ok(self
                .k()
                .rules
                .iter()
                .filter(|r| r.family == f)
                .cloned()
                .collect())
        }
        fn add_rule(&mut self, r: &Rule) -> Result<(), RouteError> {
            let mut k = self.k();
            if !k.rules.contains(r) {
                k.rules.push(r.clone());
            }
            k.log.push(format!("+{r}"));
            Ok(())
        }
        fn del_rule(&mut self, r: &Rule) -> Result<(), RouteError> {
            let mut k = self.k();
            k.rules.retain(|x| x != r);
            k.log.push(format!("-{r}"));
            Ok(())
        }
    }

    fn lan_route(dst: &str, oif: u32) -> Route {
        Route {
            dst: net(dst),
            table: TABLE_MAIN,
            kind: RouteKind::Unicast,
            oif: Some(oif),
            gateway: None,
            multipath: false,
            metric: 0,
            scope: if dst.contains(':') {
                RT_SCOPE_UNIVERSE
            } else {
                RT_SCOPE_LINK
            },
            protocol: 2,
        }
    }

    /// A host with a LAN on #2 (v4, v6, link-local), an uplink in CGNAT space on #3,
    /// a default route, and a foreign rule at one of our priorities.
    fn host() -> (RouteManager, Fake) {
        let foreign = Rule {
            dst: Some(net("198.51.100.0/24")),
            protocol: 3,
            ..Rule::new(Family::V4, 5240, RuleAction::Table(100))
        };
        // Same shape as our base+60 rule, but an admin's (proto boot), not ours.
        let lookalike = Rule {
            protocol: 3,
            ..Rule::new(Family::V4, 5270, RuleAction::Table(52))
        };
        let fake = Fake::default();
        {
            let mut k = fake.k();
            k.link = Some(Link {
                index: 7,
                name: "tsutest0".into(),
                mtu: 1500,
                up: false,
            });
            k.routes = vec![
                lan_route("198.18.1.0/24", 2),
                lan_route("2001:db8:1::/64", 2),
                lan_route("fe80::/64", 2),
                lan_route("169.254.0.0/16", 2),
                lan_route("100.64.0.0/10", 3),
                Route {
                    gateway: Some("198.18.1.1".parse().unwrap()),
                    scope: RT_SCOPE_UNIVERSE,
                    ..lan_route("0.0.0.0/0", 2)
                },
            ];
            k.rules = vec![foreign, lookalike];
        }
        let cfg = RouteConfig {
            tun_ifname: "tsutest0".into(),
            ..RouteConfig::default()
        };
        let m = RouteManager::with_backend(cfg, Box::new(fake.clone())).unwrap();
        (m, fake)
    }

    fn state(exit: bool, lan: bool) -> RouteState {
        RouteState {
            addresses: vec![net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128")],
            peer_routes: vec![net("100.64.0.2/32"), net("0.0.0.0/0")],
            exit_node: exit,
            block_internet: false,
            allow_lan_access: lan,
            mtu: 1280,
        }
    }

    fn table52(f: &Fake) -> Vec<String> {
        f.k()
            .routes
            .iter()
            .filter(|r| r.table == 52)
            .map(|r| r.to_string())
            .collect()
    }

    #[test]
    fn exit_node_with_lan_access_exempts_only_real_lan_subnets() {
        let (mut m, f) = host();
        m.apply(&state(true, true)).unwrap();
        let lan: Vec<String> = f
            .k()
            .rules
            .iter()
            .filter(|r| r.priority == 5240 && r.action == RuleAction::Table(TABLE_MAIN))
            .filter_map(|r| r.dst.map(|d| d.to_string()))
            .collect();
        // Not link-local, not the CGNAT-overlapping uplink, not the default route.
        assert_eq!(lan, ["198.18.1.0/24", "2001:db8:1::/64"]);
        let mut table = table52(&f);
        table.sort();
        assert_eq!(
            table,
            [
                "0.0.0.0/0 dev #7 table 52 metric 0",
                "100.64.0.2/32 dev #7 table 52 metric 0",
                "::/0 dev #7 table 52 metric 1024",
                "unreachable 0.0.0.0/0 table 52 metric 2147483647",
                "unreachable ::/0 table 52 metric 2147483647",
            ]
        );
        assert_eq!(
            f.k().link.as_ref().map(|l| (l.mtu, l.up)),
            Some((1280, true))
        );
    }

    #[test]
    fn apply_is_idempotent_and_toggles_cleanly() {
        let (mut m, f) = host();
        m.apply(&state(true, true)).unwrap();
        f.k().log.clear();
        m.apply(&state(true, true)).unwrap();
        assert!(f.k().log.is_empty(), "{:?}", f.k().log);

        m.apply(&state(true, false)).unwrap();
        let log = std::mem::take(&mut f.k().log);
        assert_eq!(
            log,
            [
                // Without LAN access, link-local destinations stay off the LAN too
                // (added before the LAN exemptions go).
                "+-6 rule pref 5255 to fe80::/10 unreachable proto 52",
                "--6 rule pref 5240 to 2001:db8:1::/64 lookup 254 proto 52",
                "--4 rule pref 5240 to 198.18.1.0/24 lookup 254 proto 52",
            ]
        );
        m.apply(&state(false, false)).unwrap();
        assert_eq!(table52(&f), ["100.64.0.2/32 dev #7 table 52 metric 0"]);
        m.apply(&state(true, true)).unwrap();
        assert_eq!(table52(&f).len(), 5);
        // Foreign rule at 5240 untouched throughout.
        assert!(
            f.k()
                .rules
                .iter()
                .any(|r| r.action == RuleAction::Table(100))
        );
    }

    #[test]
    fn link_local_is_unreachable_only_behind_an_exit_node_without_lan_access() {
        let (mut m, f) = host();
        let link_local = |f: &Fake| {
            f.k()
                .rules
                .iter()
                .filter(|r| r.priority == 5255)
                .map(|r| format!("{:?} {:?}", r.dst.map(|d| d.to_string()), r.action))
                .collect::<Vec<_>>()
        };
        let want = [format!(
            "{:?} {:?}",
            Some("fe80::/10"),
            RuleAction::Unreachable
        )];
        m.apply(&state(true, false)).unwrap();
        assert_eq!(link_local(&f), want, "exit node, no LAN access");
        m.apply(&RouteState {
            exit_node: false,
            block_internet: true,
            ..state(false, false)
        })
        .unwrap();
        assert_eq!(link_local(&f), want, "exit node chosen but blocked");
        m.apply(&state(true, true)).unwrap();
        assert!(link_local(&f).is_empty(), "LAN access keeps the link");
        m.apply(&state(false, false)).unwrap();
        assert!(link_local(&f).is_empty(), "no exit node");
    }

    #[test]
    fn blocked_exit_node_keeps_only_the_unreachable_default() {
        let (mut m, f) = host();
        m.apply(&state(true, true)).unwrap();
        let blocked = RouteState {
            exit_node: false,
            block_internet: true,
            ..state(false, true)
        };
        m.apply(&blocked).unwrap();
        let mut table = table52(&f);
        table.sort();
        // No route into the tunnel for the internet, and nothing falls through to main.
        assert_eq!(
            table,
            [
                "100.64.0.2/32 dev #7 table 52 metric 0",
                "unreachable 0.0.0.0/0 table 52 metric 2147483647",
                "unreachable ::/0 table 52 metric 2147483647",
            ]
        );
        // LAN access still applies while blocked.
        assert!(f.k().rules.iter().any(|r| r.priority == 5240
            && r.action == RuleAction::Table(TABLE_MAIN)
            && r.dst.map(|d| d.to_string()) == Some("198.18.1.0/24".into())));
        // Choosing "no exit node" lifts the block.
        m.apply(&state(false, false)).unwrap();
        assert_eq!(table52(&f), ["100.64.0.2/32 dev #7 table 52 metric 0"]);
    }

    #[test]
    fn a_block_without_tun_fails_closed_and_the_engine_converges_from_it() {
        let (mut m, f) = host();
        f.k().link = None; // at boot: no tun yet
        m.block_without_tun(true).unwrap();
        let mut table = table52(&f);
        table.sort();
        assert_eq!(
            table,
            [
                "unreachable 0.0.0.0/0 table 52 metric 2147483647",
                "unreachable ::/0 table 52 metric 2147483647",
            ]
        );
        let ours = |f: &Fake| -> Vec<String> {
            let mut r: Vec<String> = f
                .k()
                .rules
                .iter()
                .filter(|r| r.protocol == OWNER_PROTOCOL)
                .map(|r| r.to_string())
                .collect();
            r.sort();
            r
        };
        let rules = ours(&f);
        for want in [
            "-4 rule pref 5210 fwmark 0x80000/0xff0000 lookup 254 proto 52",
            "-4 rule pref 5250 fwmark 0x80000/0xff0000 unreachable proto 52",
            "-4 rule pref 5270 lookup 52 proto 52",
            "-6 rule pref 5270 lookup 52 proto 52",
            "-4 rule pref 5240 to 198.18.1.0/24 lookup 254 proto 52",
        ] {
            assert!(rules.iter().any(|r| r == want), "{want} in {rules:#?}");
        }
        // Idempotent.
        f.k().log.clear();
        m.block_without_tun(true).unwrap();
        assert!(f.k().log.is_empty(), "{:?}", f.k().log);
        // The tun comes with the first map: adds only, nothing of the block goes away
        // before the routes through the tun are there.
        f.k().link = Some(Link {
            index: 7,
            name: "tsutest0".into(),
            mtu: 1500,
            up: false,
        });
        f.k().log.clear();
        m.apply(&state(true, true)).unwrap();
        assert!(
            !f.k().log.iter().any(|l| l.starts_with('-')),
            "nothing deleted: {:?}",
            f.k().log
        );
        assert_eq!(table52(&f).len(), 5);
    }

    #[test]
    fn cleanup_removes_ours_and_keeps_foreign_rule() {
        let (mut m, f) = host();
        m.apply(&state(true, true)).unwrap();
        m.cleanup().unwrap();
        let k = f.k();
        let left: Vec<String> = k.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            left,
            [
                "-4 rule pref 5240 to 198.51.100.0/24 lookup 100 proto 3",
                "-4 rule pref 5270 lookup 52 proto 3",
            ]
        );
        assert!(k.routes.iter().all(|r| r.table != 52));
        // Addresses stay with the tun.
        assert_eq!(k.addrs.len(), 2);
    }

    #[test]
    fn stale_address_is_removed_but_link_local_kept() {
        let (mut m, f) = host();
        f.k().addrs = vec![net("100.64.0.9/32"), net("fe80::1234/64")];
        m.apply(&state(false, false)).unwrap();
        let mut addrs: Vec<String> = f.k().addrs.iter().map(|a| a.to_string()).collect();
        addrs.sort();
        assert_eq!(
            addrs,
            ["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "fe80::1234/64"]
        );
    }

    #[test]
    fn missing_tun_is_a_typed_error() {
        let (mut m, f) = host();
        f.k().link = None;
        let err = m.apply(&state(true, false)).unwrap_err();
        assert!(
            matches!(err, RouteError::LinkNotFound(ref n) if n == "tsutest0"),
            "{err}"
        );
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let ok = RouteConfig::default();
        for bad in [
            RouteConfig {
                table: 254,
                ..ok.clone()
            },
            RouteConfig {
                fwmark: 0x1,
                ..ok.clone()
            },
            RouteConfig {
                rule_priority_base: 32_760,
                ..ok.clone()
            },
            RouteConfig {
                tun_ifname: "a-very-long-interface".into(),
                ..ok.clone()
            },
        ] {
            assert!(matches!(
                validate_config(&bad),
                Err(RouteError::InvalidConfig(_))
            ));
        }
        assert!(validate_config(&ok).is_ok());
    }

    #[test]
    fn ext_ack_is_extracted_from_capped_error() {
        let mut payload = vec![0u8; 16];
        let text = b"Nexthop device is not up\0";
        let len = u16::try_from(4 + text.len()).unwrap();
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        let msg = ext_ack_message(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload);
        assert_eq!(msg.as_deref(), Some("Nexthop device is not up"));
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &payload), None);
    }
}
