//! Serving as an exit node: forwarding and masquerading tailnet traffic with nftables.
//!
//! Everything lives in one table of our own, `inet <table>` (default `tsunagu`), so that
//! we never edit anybody else's rules and removal is "delete that table". The `inet`
//! family covers IPv4 and IPv6 with one rule set. For `tun_ifname = "tsunagu0"`,
//! `own_addresses = [100.64.0.1/32, fd7a:115c:a1e0::1/128]`,
//! `allowed_sources = [100.64.0.2/32, fd7a:115c:a1e0::2/128]`, `closed` the host's
//! networks and the non-internet ranges ([`crate::scope::closed_nets`]), `granted =
//! [198.18.3.0/24]` (a rule names the LAN explicitly) and `tun_mtu = 1280` the table is:
//!
//! ```text
//! table inet tsunagu {
//!   chain forward {
//!     type filter hook forward priority filter; policy accept;
//!     iifname "tsunagu0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu
//!     iifname "tsunagu0" meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size set 1240
//!     iifname "tsunagu0" meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size set 1220
//!     oifname "tsunagu0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu
//!     oifname "tsunagu0" ct state established,related accept
//!     iifname "tsunagu0" ip daddr { 0.0.0.0/8, ..., 127.0.0.0/8, ..., 198.18.3.0/24, 198.51.100.0/24, ... } ip daddr != { 198.18.3.0/24 } counter packets 0 bytes 0 drop
//!     iifname "tsunagu0" ip6 daddr { ::/3, 2001:db8:1::/64, 4000::/2, 8000::/1 } counter packets 0 bytes 0 drop
//!     iifname "tsunagu0" ip saddr 100.64.0.2 meta mark set meta mark & 0xff04ffff | 0x00040000 accept
//!     iifname "tsunagu0" ip6 saddr fd7a:115c:a1e0::2 meta mark set meta mark & 0xff04ffff | 0x00040000 accept
//!     iifname "tsunagu0" counter packets 0 bytes 0 drop
//!   }
//!   chain input {
//!     type filter hook input priority filter; policy accept;
//!     iifname "tsunagu0" icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept
//!     iifname "tsunagu0" ip daddr 100.64.0.1 accept
//!     iifname "tsunagu0" ip6 daddr fd7a:115c:a1e0::1 accept
//!     iifname "tsunagu0" ip daddr { 198.18.3.0/24 } accept
//!     iifname "tsunagu0" counter packets 0 bytes 0 drop
//!   }
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     oifname != "tsunagu0" meta mark & 0x00ff0000 == 0x00040000 masquerade
//!   }
//! }
//! ```
//!
//! (That is `nft list` output. The mark statement we send is `meta mark & 0xff00ffff |
//! 0x40000`; nft prints an equivalent mask. Several sources become one anonymous set,
//! `ip saddr { 100.64.0.2, 100.64.1.0/24 }`, with overlapping prefixes merged first,
//! since nft rejects overlapping intervals.)
//!
//! Why it looks like this:
//! - `policy accept` on the forward chain: we only judge packets entering from the tun;
//!   every other forwarding decision on the host (containers, other VPNs) is left to
//!   whatever else is configured. An `accept` in our chain does not override a `drop`
//!   in another table's forward chain; it only ends evaluation of ours.
//! - Peers may use us as an exit node only from the sources the network map allows;
//!   anything else arriving from the tun is dropped (and counted).
//! - Defence in depth behind the engine's packet filter, which judges every packet by
//!   the policy first ([`crate::filter`]): packets from the tun to the host's own
//!   networks (its LAN subnets, the subnet of its uplink, private, link-local and other
//!   non-internet ranges) are not forwarded, and packets from the tun to the host itself
//!   (the input hook) only reach its tailnet addresses; `granted` (destinations a rule
//!   names explicitly) is the exception for both. The engine still checks ports and
//!   sources of those.
//! - The mark (0x40000 under mask 0xff0000, the bit Tailscale uses for the same job) is
//!   how postrouting knows a packet came *from the tun*: the input interface cannot be
//!   matched there. The rest of the mark is preserved for other users of fwmark.
//! - Masquerade only when leaving through some other interface than the tun, so
//!   tailnet-to-tailnet traffic keeps its source addresses.
//! - MSS clamping on SYNs, before any accept (an accept ends the chain). `rt mtu` uses
//!   the MTU of the route the packet takes: towards the tun that is the tun MTU, so the
//!   far end learns to send segments that fit into the tunnel; towards the internet it
//!   covers a small uplink MTU (PPPoE). For SYNs *from* the tun we also clamp to the tun
//!   MTU itself (minus 40 bytes of IPv4+TCP headers, 60 for IPv6): the server's reply
//!   segments come back through the tunnel, and `rt mtu` of the uplink would not limit
//!   them. The kernel only ever lowers an MSS with this statement (raising it could
//!   stall connections), so a SYN that already asks for less is left alone.
//!
//! Every change is one `nft -j -f -` transaction: `add table; delete table; add table;
//! chains; rules`. The first `add` makes the `delete` valid when no table exists yet;
//! the `delete` throws away whatever stale content a crashed daemon left; the kernel
//! applies it all or nothing, so forwarding never runs with a half-built rule set.
//!
//! Installing also turns IPv4/IPv6 forwarding on (see [`crate::os::sysctl`]); removing
//! puts the values found at install back.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    BinaryOperation, CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
    RT, RTKey, SetItem, TcpOption,
};
use nftables::helper::NftablesError;
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Counter, Mangle, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use thiserror::Error;

use super::sysctl::{Forwarding, ProcSys, SysctlBackend, SysctlError};

/// Default name of our nftables table.
pub const DEFAULT_TABLE: &str = "tsunagu";
/// Mark put on packets forwarded from the tun, so postrouting can masquerade them.
pub const FORWARD_MARK: u32 = 0x0004_0000;
/// The mark bits we own; the others are left to whoever else uses fwmark.
pub const MARK_MASK: u32 = 0x00ff_0000;
/// Name of the filter chain hooked at forward.
pub const FORWARD_CHAIN: &str = "forward";
/// Name of the nat chain hooked at postrouting.
pub const POSTROUTING_CHAIN: &str = "postrouting";
/// Name of the filter chain hooked at input (what the tun may reach on the host).
pub const INPUT_CHAIN: &str = "input";

/// nftables priorities of the standard names `filter` and `srcnat`.
const PRIORITY_FILTER: i32 = 0;
const PRIORITY_SRCNAT: i32 = 100;
/// IPv4 + TCP header bytes (no options), and IPv6 + TCP.
const V4_TCP_OVERHEAD: u16 = 40;
const V6_TCP_OVERHEAD: u16 = 60;
/// IPv6 needs at least this MTU; the tailnet is dual-stack.
const MIN_TUN_MTU: u16 = 1280;

/// What the exit node forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitNatConfig {
    /// Name of our `inet` table; default [`DEFAULT_TABLE`].
    pub table: String,
    /// The tun interface peers' traffic arrives on.
    pub tun_ifname: String,
    /// Tailnet addresses of the peers the network map allows to use this exit node.
    pub allowed_sources: Vec<IpNet>,
    /// This node's tailnet addresses: what the tun may reach on the host itself.
    pub own_addresses: Vec<IpNet>,
    /// Destinations never forwarded from the tun: the host's networks and every
    /// non-internet range ([`crate::scope::closed_nets`]).
    pub closed: Vec<IpNet>,
    /// Closed destinations the policy names explicitly: forwarded (or, on the host
    /// itself, delivered) all the same.
    pub granted: Vec<IpNet>,
    /// MTU of the tun, for MSS clamping of SYNs that come from it.
    pub tun_mtu: u16,
}

impl Default for ExitNatConfig {
    fn default() -> Self {
        ExitNatConfig {
            table: DEFAULT_TABLE.to_owned(),
            tun_ifname: "tsunagu0".to_owned(),
            allowed_sources: Vec::new(),
            own_addresses: Vec::new(),
            closed: Vec::new(),
            granted: Vec::new(),
            tun_mtu: MIN_TUN_MTU,
        }
    }
}

/// Exit-node NAT failures, naming the operation and nft's (or the kernel's) reason.
#[derive(Debug, Error)]
pub enum NatError {
    #[error("invalid exit-node NAT config: {0}")]
    InvalidConfig(String),
    #[error("nft failed {op} table inet {table}: {reason}")]
    Nft {
        op: &'static str,
        table: String,
        /// nft's own message (its stderr), or why it could not be run.
        reason: String,
    },
    #[error("enabling IP forwarding for the exit node: {0}")]
    EnableForwarding(#[source] SysctlError),
    #[error("restoring IP forwarding after the exit node: {0}")]
    RestoreForwarding(#[source] SysctlError),
}

/// Applies nft documents: the seam that lets tests (or a netlink implementation)
/// replace the `nft` binary.
pub trait NftBackend: Send + Sync {
    /// Applies `doc` as one transaction. On failure returns nft's reason.
    fn apply(&self, doc: &Nftables<'_>) -> Result<(), String>;
}

/// Pipes JSON to `nft -j -f -` (found in `PATH`) via `nftables::helper`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NftCli;

impl NftBackend for NftCli {
    fn apply(&self, doc: &Nftables<'_>) -> Result<(), String> {
        nftables::helper::apply_ruleset(doc).map_err(|e| match e {
            // nft prints its reason ("Error: Could not process rule: ...") on stderr;
            // that, not the helper's generic summary, is what an operator needs.
            NftablesError::NftFailed { stderr, stdout, .. } => {
                let text = if stderr.trim().is_empty() {
                    stdout
                } else {
                    stderr
                };
                text.trim().to_owned()
            }
            other => other.to_string(),
        })
    }
}

/// Our installed exit-node table. Dropping it leaves the rules in place (like a crash
/// would); [`ExitNat::remove`] takes them out, [`ExitNat::remove_stale`] cleans up
/// after a crashed daemon.
pub struct ExitNat {
    cfg: ExitNatConfig,
    forwarding: Option<Forwarding>,
    nft: Box<dyn NftBackend>,
}

impl std::fmt::Debug for ExitNat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitNat")
            .field("cfg", &self.cfg)
            .field("forwarding", &self.forwarding)
            .finish_non_exhaustive()
    }
}

impl ExitNat {
    /// Installs (or atomically replaces a stale) table and turns forwarding on.
    pub fn install(cfg: &ExitNatConfig) -> Result<ExitNat, NatError> {
        Self::install_with(cfg, Box::new(NftCli), Box::new(ProcSys))
    }

    /// [`ExitNat::install`] with other backends.
    pub fn install_with(
        cfg: &ExitNatConfig,
        nft: Box<dyn NftBackend>,
        sysctl: Box<dyn SysctlBackend>,
    ) -> Result<ExitNat, NatError> {
        validate(cfg)?;
        // Rules first: by the time the kernel starts forwarding, the drop for
        // unauthorised tun traffic is already there.
        apply(
            nft.as_ref(),
            &replace_doc(None, cfg),
            "installing",
            &cfg.table,
        )?;
        let forwarding = match Forwarding::enable_with(sysctl) {
            Ok(f) => f,
            Err(e) => {
                // Do not leave a half-installed exit node behind.
                if let Err(undo) = apply(
                    nft.as_ref(),
                    &delete_doc(&cfg.table),
                    "removing",
                    &cfg.table,
                ) {
                    tracing::warn!(error = %undo, "rolling back exit-node table failed");
                }
                return Err(NatError::EnableForwarding(e));
            }
        };
        tracing::info!(table = %cfg.table, tun = %cfg.tun_ifname,
            sources = cfg.allowed_sources.len(), "exit-node NAT installed");
        Ok(ExitNat {
            cfg: cfg.clone(),
            forwarding: Some(forwarding),
            nft,
        })
    }

    /// Replaces the rule set with one for `cfg`, atomically (a renamed table is deleted
    /// in the same transaction).
    pub fn update(&mut self, cfg: &ExitNatConfig) -> Result<(), NatError> {
        validate(cfg)?;
        let old = (self.cfg.table != cfg.table).then_some(self.cfg.table.as_str());
        apply(
            self.nft.as_ref(),
            &replace_doc(old, cfg),
            "updating",
            &cfg.table,
        )?;
        self.cfg = cfg.clone();
        Ok(())
    }

    /// The configuration currently installed.
    pub fn config(&self) -> &ExitNatConfig {
        &self.cfg
    }

    /// Restores the forwarding sysctls and deletes our table (only it). Both are
    /// attempted; the first failure is returned.
    pub fn remove(mut self) -> Result<(), NatError> {
        // Forwarding off first, so nothing is forwarded unfiltered in between.
        let restored = self
            .forwarding
            .take()
            .map_or(Ok(()), Forwarding::restore)
            .map_err(NatError::RestoreForwarding);
        let deleted = apply(
            self.nft.as_ref(),
            &delete_doc(&self.cfg.table),
            "removing",
            &self.cfg.table,
        );
        match (restored, deleted) {
            (Err(e), other) => {
                if let Err(e2) = other {
                    tracing::warn!(error = %e2, "removing exit-node table failed too");
                }
                Err(e)
            }
            (Ok(()), other) => other,
        }
    }

    /// Deletes `inet <table>` if it exists (left over by a crashed daemon). Forwarding
    /// sysctls are left alone: their values from before the crash are unknown.
    pub fn remove_stale(table: &str) -> Result<(), NatError> {
        Self::remove_stale_with(table, &NftCli)
    }

    /// [`ExitNat::remove_stale`] with another backend.
    pub fn remove_stale_with(table: &str, nft: &dyn NftBackend) -> Result<(), NatError> {
        validate_table(table)?;
        apply(nft, &delete_doc(table), "removing stale", table)
    }

    /// The nft document [`ExitNat::install`] applies for `cfg` (for logs and tests).
    pub fn render(cfg: &ExitNatConfig) -> Result<Nftables<'static>, NatError> {
        validate(cfg)?;
        Ok(replace_doc(None, cfg))
    }
}

fn apply(
    nft: &dyn NftBackend,
    doc: &Nftables<'_>,
    op: &'static str,
    table: &str,
) -> Result<(), NatError> {
    nft.apply(doc).map_err(|reason| NatError::Nft {
        op,
        table: table.to_owned(),
        reason,
    })
}

fn validate(cfg: &ExitNatConfig) -> Result<(), NatError> {
    validate_table(&cfg.table)?;
    let name = &cfg.tun_ifname;
    // IFNAMSIZ is 16 including the NUL; the kernel refuses '/' and ':'. The name also
    // ends up quoted in an nft string, where '*' would be a wildcard.
    let name_ok = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b'"' | b'\\' | b'*'));
    if !name_ok {
        return Err(NatError::InvalidConfig(format!(
            "tun interface name {name:?} is not a valid Linux interface name"
        )));
    }
    if cfg.tun_mtu < MIN_TUN_MTU {
        return Err(NatError::InvalidConfig(format!(
            "tun MTU {} is below {MIN_TUN_MTU}, the minimum for IPv6",
            cfg.tun_mtu
        )));
    }
    Ok(())
}

fn validate_table(table: &str) -> Result<(), NatError> {
    // nft identifiers: a letter, then letters, digits, '_', '-', '.', '/'. Being strict
    // also keeps us from ever addressing a table we did not mean to.
    let mut bytes = table.bytes();
    let ok = table.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NatError::InvalidConfig(format!(
            "table name {table:?} must be a letter followed by letters, digits, '_' or '-' (max 64)"
        )))
    }
}

fn table_obj(name: &str) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: Cow::Owned(name.to_owned()),
        handle: None,
    })
}

/// `add table; delete table`: removes the table whether or not it exists, atomically.
fn delete_doc(table: &str) -> Nftables<'static> {
    let mut b = Batch::new();
    b.add(table_obj(table));
    b.delete(table_obj(table));
    b.to_nftables()
}

/// One transaction that (re)creates our table from scratch, deleting `old_table` too.
fn replace_doc(old_table: Option<&str>, cfg: &ExitNatConfig) -> Nftables<'static> {
    let mut b = Batch::new();
    if let Some(old) = old_table {
        b.add(table_obj(old));
        b.delete(table_obj(old));
    }
    b.add(table_obj(&cfg.table));
    b.delete(table_obj(&cfg.table));
    b.add(table_obj(&cfg.table));
    b.add(base_chain(
        &cfg.table,
        FORWARD_CHAIN,
        NfChainType::Filter,
        NfHook::Forward,
        PRIORITY_FILTER,
    ));
    b.add(base_chain(
        &cfg.table,
        POSTROUTING_CHAIN,
        NfChainType::NAT,
        NfHook::Postrouting,
        PRIORITY_SRCNAT,
    ));
    b.add(base_chain(
        &cfg.table,
        INPUT_CHAIN,
        NfChainType::Filter,
        NfHook::Input,
        PRIORITY_FILTER,
    ));
    for expr in forward_rules(cfg) {
        b.add(rule(&cfg.table, FORWARD_CHAIN, expr));
    }
    for expr in input_rules(cfg) {
        b.add(rule(&cfg.table, INPUT_CHAIN, expr));
    }
    b.add(rule(
        &cfg.table,
        POSTROUTING_CHAIN,
        vec![
            cmp(
                Operator::NEQ,
                meta(MetaKey::Oifname),
                string(&cfg.tun_ifname),
            ),
            cmp(
                Operator::EQ,
                and(meta(MetaKey::Mark), Expression::Number(MARK_MASK)),
                Expression::Number(FORWARD_MARK),
            ),
            Statement::Masquerade(None),
        ],
    ));
    b.to_nftables()
}

fn forward_rules(cfg: &ExitNatConfig) -> Vec<Vec<Statement<'static>>> {
    let tun = cfg.tun_ifname.as_str();
    let from_tun = || cmp(Operator::EQ, meta(MetaKey::Iifname), string(tun));
    let to_tun = || cmp(Operator::EQ, meta(MetaKey::Oifname), string(tun));
    let clamp_to_route = || {
        Statement::Mangle(Mangle {
            key: maxseg(),
            value: Expression::Named(NamedExpression::RT(RT {
                key: RTKey::MTU,
                family: None,
            })),
        })
    };
    let clamp_to = |mss: u16| {
        Statement::Mangle(Mangle {
            key: maxseg(),
            value: Expression::Number(u32::from(mss)),
        })
    };
    let nfproto = |p: &str| cmp(Operator::EQ, meta(MetaKey::Nfproto), string(p));
    let mark_and_accept = || {
        [
            Statement::Mangle(Mangle {
                key: meta(MetaKey::Mark),
                value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                    and(meta(MetaKey::Mark), Expression::Number(!MARK_MASK)),
                    Expression::Number(FORWARD_MARK),
                ]))),
            }),
            Statement::Accept(None),
        ]
    };

    let mut rules = vec![
        vec![from_tun(), tcp_syn(), clamp_to_route()],
        vec![
            from_tun(),
            nfproto("ipv4"),
            tcp_syn(),
            clamp_to(cfg.tun_mtu.saturating_sub(V4_TCP_OVERHEAD)),
        ],
        vec![
            from_tun(),
            nfproto("ipv6"),
            tcp_syn(),
            clamp_to(cfg.tun_mtu.saturating_sub(V6_TCP_OVERHEAD)),
        ],
        vec![to_tun(), tcp_syn(), clamp_to_route()],
        vec![
            to_tun(),
            cmp(
                Operator::IN,
                Expression::Named(NamedExpression::CT(CT {
                    key: "state".into(),
                    family: None,
                    dir: None,
                })),
                Expression::List(vec![string("established"), string("related")]),
            ),
            Statement::Accept(None),
        ],
    ];
    // The host's own networks are not forwarded to, except what a rule names.
    let (closed4, closed6) = allowed_by_family(&cfg.closed);
    let (granted4, granted6) = allowed_by_family(&cfg.granted);
    for (proto, closed, granted) in [("ip", closed4, granted4), ("ip6", closed6, granted6)] {
        if closed.is_empty() {
            continue;
        }
        let mut r = vec![from_tun(), in_set(proto, "daddr", Operator::EQ, &closed)];
        if !granted.is_empty() {
            r.push(in_set(proto, "daddr", Operator::NEQ, &granted));
        }
        r.push(Statement::Counter(Counter::Anonymous(None)));
        r.push(Statement::Drop(None));
        rules.push(r);
    }
    let (v4, v6) = allowed_by_family(&cfg.allowed_sources);
    // An empty anonymous set is a syntax error in nft; no sources simply means no
    // accept rule, and the drop below catches everything from the tun.
    for (proto, nets) in [("ip", v4), ("ip6", v6)] {
        if nets.is_empty() {
            continue;
        }
        let mut r = vec![from_tun(), in_set(proto, "saddr", Operator::EQ, &nets)];
        r.extend(mark_and_accept());
        rules.push(r);
    }
    rules.push(vec![
        from_tun(),
        Statement::Counter(Counter::Anonymous(None)),
        Statement::Drop(None),
    ]);
    rules
}

/// What the tun may reach on the host itself: our tailnet addresses and what a rule
/// grants explicitly; nothing else.
fn input_rules(cfg: &ExitNatConfig) -> Vec<Vec<Statement<'static>>> {
    let from_tun = || {
        cmp(
            Operator::EQ,
            meta(MetaKey::Iifname),
            string(&cfg.tun_ifname),
        )
    };
    let (own4, own6) = allowed_by_family(&cfg.own_addresses);
    let (granted4, granted6) = allowed_by_family(&cfg.granted);
    let field = |protocol: &str, name: &str| {
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: protocol.to_owned().into(),
                field: name.to_owned().into(),
            },
        )))
    };
    // IPv6 neighbour discovery: link housekeeping (hop limit 255: never routed), which a
    // tun does not need but a link standing in for one does.
    let mut rules = vec![vec![
        from_tun(),
        cmp(
            Operator::EQ,
            field("icmpv6", "type"),
            Expression::Named(NamedExpression::Set(
                [
                    "nd-router-solicit",
                    "nd-router-advert",
                    "nd-neighbor-solicit",
                    "nd-neighbor-advert",
                ]
                .iter()
                .map(|t| SetItem::Element(string(t)))
                .collect(),
            )),
        ),
        cmp(
            Operator::EQ,
            field("ip6", "hoplimit"),
            Expression::Number(255),
        ),
        Statement::Accept(None),
    ]];
    for (proto, nets) in [
        ("ip", own4),
        ("ip6", own6),
        ("ip", granted4),
        ("ip6", granted6),
    ] {
        if !nets.is_empty() {
            rules.push(vec![
                from_tun(),
                in_set(proto, "daddr", Operator::EQ, &nets),
                Statement::Accept(None),
            ]);
        }
    }
    rules.push(vec![
        from_tun(),
        Statement::Counter(Counter::Anonymous(None)),
        Statement::Drop(None),
    ]);
    rules
}

/// `<proto> <field> [!=] { nets }`.
fn in_set(proto: &str, field: &str, op: Operator, nets: &[IpNet]) -> Statement<'static> {
    cmp(
        op,
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: proto.to_owned().into(),
                field: field.to_owned().into(),
            },
        ))),
        Expression::Named(NamedExpression::Set(
            nets.iter().map(|n| SetItem::Element(net_expr(n))).collect(),
        )),
    )
}

/// Splits by family and merges overlapping/adjacent prefixes: an anonymous interval set
/// with overlapping elements is rejected by nft.
fn allowed_by_family(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = nets
        .iter()
        .map(IpNet::trunc)
        .partition(|n| matches!(n, IpNet::V4(_)));
    (IpNet::aggregate(&v4), IpNet::aggregate(&v6))
}

fn net_expr(net: &IpNet) -> Expression<'static> {
    let addr: IpAddr = net.network();
    if net.prefix_len() == net.max_prefix_len() {
        string(&addr.to_string())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(string(&addr.to_string())),
            len: u32::from(net.prefix_len()),
        }))
    }
}

fn base_chain(
    table: &str,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_owned()),
        name: Cow::Borrowed(name),
        newname: None,
        handle: None,
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    })
}

fn rule(table: &str, chain: &'static str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_owned()),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: None,
    })
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(s.to_owned()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn and(a: Expression<'static>, b: Expression<'static>) -> Expression<'static> {
    Expression::BinaryOperation(Box::new(BinaryOperation::AND(a, b)))
}

fn cmp(op: Operator, left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn maxseg() -> Expression<'static> {
    Expression::Named(NamedExpression::TcpOption(TcpOption {
        name: "maxseg".into(),
        field: Some("size".into()),
    }))
}

/// `tcp flags syn / syn,rst`: SYN set, RST clear (SYN and SYN-ACK).
fn tcp_syn() -> Statement<'static> {
    cmp(
        Operator::EQ,
        and(
            Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                PayloadField {
                    protocol: "tcp".into(),
                    field: "flags".into(),
                },
            ))),
            Expression::List(vec![string("syn"), string("rst")]),
        ),
        string("syn"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn cfg() -> ExitNatConfig {
        ExitNatConfig {
            tun_ifname: "tsutest0".into(),
            allowed_sources: vec![
                "100.64.0.2/32".parse().unwrap(),
                "100.64.0.3/32".parse().unwrap(),
                "100.64.0.0/31".parse().unwrap(),
                "fd7a:115c:a1e0::2/128".parse().unwrap(),
            ],
            ..ExitNatConfig::default()
        }
    }

    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<serde_json::Value>>>);
    impl NftBackend for Recorder {
        fn apply(&self, doc: &Nftables<'_>) -> Result<(), String> {
            let v = serde_json::to_value(doc).map_err(|e| e.to_string())?;
            self.0.lock().map_err(|e| e.to_string())?.push(v);
            Ok(())
        }
    }

    #[test]
    fn document_replaces_the_table_in_one_batch() {
        let doc = serde_json::to_value(ExitNat::render(&cfg()).unwrap()).unwrap();
        let cmds = doc["nftables"].as_array().unwrap();
        // add, delete, add table; then chains and rules.
        assert_eq!(cmds[0]["add"]["table"]["name"], "tsunagu");
        assert_eq!(cmds[1]["delete"]["table"]["name"], "tsunagu");
        assert_eq!(cmds[2]["add"]["table"]["family"], "inet");
        assert_eq!(cmds[3]["add"]["chain"]["hook"], "forward");
        assert_eq!(cmds[3]["add"]["chain"]["policy"], "accept");
        assert_eq!(cmds[4]["add"]["chain"]["type"], "nat");
        assert_eq!(cmds[4]["add"]["chain"]["prio"], 100);
        let text = doc.to_string();
        // Overlapping sources were merged: 100.64.0.0/31 + .2 + .3 = 100.64.0.0/30.
        assert!(text.contains(r#""addr":"100.64.0.0","len":30"#), "{text}");
        assert!(text.contains(r#""fd7a:115c:a1e0::2""#), "{text}");
        assert!(text.contains(r#"{"masquerade":null}"#), "{text}");
        assert!(text.contains(r#""value":1240"#), "{text}");
        assert!(text.contains(r#""value":1220"#), "{text}");
    }

    #[test]
    fn no_sources_means_no_accept_from_tun() {
        let c = ExitNatConfig {
            allowed_sources: vec![],
            ..cfg()
        };
        let text = serde_json::to_value(ExitNat::render(&c).unwrap())
            .unwrap()
            .to_string();
        assert!(!text.contains("saddr"), "{text}");
        assert!(text.contains(r#"{"drop":null}"#), "{text}");
    }

    /// The rules of `chain` in a rendered document, each as its JSON text.
    fn chain_rules(c: &ExitNatConfig, chain: &str) -> Vec<String> {
        let doc = serde_json::to_value(ExitNat::render(c).unwrap()).unwrap();
        doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == chain)
            .map(|c| c["add"]["rule"]["expr"].to_string())
            .collect()
    }

    #[test]
    fn the_hosts_networks_are_closed_to_the_tun_except_what_is_granted() {
        let c = ExitNatConfig {
            own_addresses: vec![
                "100.64.0.1/32".parse().unwrap(),
                "fd7a:115c:a1e0::1/128".parse().unwrap(),
            ],
            closed: vec![
                "127.0.0.0/8".parse().unwrap(),
                "198.18.3.0/24".parse().unwrap(),
                "198.51.100.0/24".parse().unwrap(),
                "fc00::/7".parse().unwrap(),
            ],
            granted: vec!["198.18.3.0/25".parse().unwrap()],
            ..cfg()
        };
        let fwd = chain_rules(&c, FORWARD_CHAIN);
        let closed = |fam: &str| {
            fwd.iter().position(|r| {
                r.contains(&format!(r#""field":"daddr","protocol":"{fam}""#)) && r.contains("drop")
            })
        };
        let sources = fwd.iter().position(|r| r.contains("saddr")).unwrap();
        let (c4, c6) = (closed("ip").unwrap(), closed("ip6").unwrap());
        assert!(
            c4 < sources && c6 < sources,
            "closed before the sources: {fwd:#?}"
        );
        assert!(
            fwd[c4].contains(r#""addr":"198.51.100.0","len":24"#),
            "{}",
            fwd[c4]
        );
        assert!(
            fwd[c4].contains(r#""op":"!=""#) && fwd[c4].contains(r#""addr":"198.18.3.0","len":25"#),
            "granted is the exception: {}",
            fwd[c4]
        );
        assert!(!fwd[c6].contains(r#""op":"!=""#), "nothing granted in IPv6");
        let input = chain_rules(&c, INPUT_CHAIN);
        assert_eq!(input.len(), 5, "{input:#?}");
        assert!(input[0].contains("nd-neighbor-solicit") && input[0].contains("hoplimit"));
        assert!(input[1].contains(r#""100.64.0.1""#) && input[1].contains("accept"));
        assert!(input[2].contains(r#""fd7a:115c:a1e0::1""#) && input[2].contains("accept"));
        assert!(
            input[3].contains(r#""addr":"198.18.3.0","len":25"#) && input[3].contains("accept")
        );
        assert!(input[4].contains("drop") && !input[4].contains("daddr"));
        // Nothing granted, nothing closed: the tun reaches our tailnet addresses only.
        let bare = ExitNatConfig {
            own_addresses: c.own_addresses.clone(),
            ..cfg()
        };
        assert_eq!(chain_rules(&bare, INPUT_CHAIN).len(), 4);
        assert!(
            !chain_rules(&bare, FORWARD_CHAIN)
                .iter()
                .any(|r| r.contains("daddr"))
        );
    }

    #[test]
    fn invalid_names_are_rejected_before_nft_runs() {
        for bad in ["", "1abc", "a b", "x;flush ruleset"] {
            let c = ExitNatConfig {
                table: bad.into(),
                ..cfg()
            };
            assert!(matches!(
                ExitNat::render(&c),
                Err(NatError::InvalidConfig(_))
            ));
        }
        for bad in ["a\"b", "tsu*", "", "sixteen-chars-xx"] {
            let c = ExitNatConfig {
                tun_ifname: bad.into(),
                ..cfg()
            };
            assert!(matches!(
                ExitNat::render(&c),
                Err(NatError::InvalidConfig(_))
            ));
        }
        let c = ExitNatConfig {
            tun_mtu: 1200,
            ..cfg()
        };
        assert!(matches!(
            ExitNat::render(&c),
            Err(NatError::InvalidConfig(_))
        ));
    }

    #[test]
    fn update_with_new_name_deletes_old_table_in_same_batch() {
        struct NoSysctl;
        impl SysctlBackend for NoSysctl {
            fn read(&self, _: &std::path::Path) -> std::io::Result<String> {
                Ok("1".into())
            }
            fn write(&self, _: &std::path::Path, _: &str) -> std::io::Result<()> {
                Ok(())
            }
        }
        let rec = Recorder::default();
        let mut nat =
            ExitNat::install_with(&cfg(), Box::new(rec.clone()), Box::new(NoSysctl)).unwrap();
        let renamed = ExitNatConfig {
            table: "other".into(),
            ..cfg()
        };
        nat.update(&renamed).unwrap();
        let docs = rec.0.lock().unwrap().clone();
        let cmds = docs[1]["nftables"].as_array().unwrap();
        assert_eq!(cmds[1]["delete"]["table"]["name"], "tsunagu");
        assert_eq!(cmds[3]["delete"]["table"]["name"], "other");
        nat.remove().unwrap();
        let docs = rec.0.lock().unwrap().clone();
        assert_eq!(docs[2]["nftables"][1]["delete"]["table"]["name"], "other");
    }
}
