//! Which host of an exit node serves, and when that changes: a state machine without I/O
//! (time is passed in; the shell in [`super`] feeds it what it sees and carries out the
//! switches it decides).
//!
//! Per node with standby hosts (a *group*) it knows the hosts, the active one, and what
//! the shell last observed of each ([`Health`]). A host is *ready* to take the role when
//! it has a map stream, a connection to the relay (when the server runs one), offers the
//! exit node and has told its disco key. It is *gone* when it has neither a map stream
//! nor a relay connection.
//!
//! It switches (one [`Switch`] out of [`Switcher::poll_event`]) when:
//! * the active host has been gone for [`Config::unreachable_after`] and another host is
//!   ready (unplanned: a crash, a reboot without a drain);
//! * the active host is there (map stream or relay connection) but no longer offers the
//!   exit node (a drain) and another host is ready (planned maintenance);
//! * a host that prefers the role (`tsunagud --prefer`) has been ready for
//!   [`Config::settle`] and the active host is not such a host (its return);
//! * the admin asks ([`Switcher::failover`]);
//! * the active host is removed ([`Switcher::set_hosts`] without it).
//!
//! The host chosen is a ready one: preferring hosts first, then the one ready the
//! longest, then by key, so that the outcome does not depend on map order.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

/// A node's ID in the store.
pub type NodeId = i64;

/// A host of a node, by its machine key (`mkey:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub String);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the shell last saw of a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// Map streams open.
    pub sessions: usize,
    /// A connection to the server's relay with the node's key, as this host.
    pub relay: bool,
    /// Its last report offers the exit node (0.0.0.0/0 and ::/0).
    pub offers_exit: bool,
    /// It has told its disco key.
    pub disco: bool,
    /// It takes the role whenever it is ready.
    pub prefer: bool,
}

/// Settings of the switching rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long the active host must be gone before a ready standby takes over.
    pub unreachable_after: Duration,
    /// How long a preferring host must be ready before it takes the role back.
    pub settle: Duration,
    /// Whether the server runs a relay (then a ready host has a connection to it).
    pub relay: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            unreachable_after: Duration::from_secs(3),
            settle: Duration::from_secs(3),
            relay: true,
        }
    }
}

/// Why the active host changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// `tsunagu-server nodes failover`.
    Admin,
    /// The active host stopped offering the exit node (`tsunagu set
    /// --advertise-exit-node=false` before maintenance).
    Drain,
    /// The active host's map stream and relay connection were gone this long.
    Unreachable(Duration),
    /// A host that prefers the role is ready again.
    Preferred,
    /// The active host was removed by the admin.
    Removed,
}

impl Reason {
    /// A switch with the old host still there and serving (admin, drain, a preferred
    /// host's return): it can hand over at a quiet moment. Otherwise the old host is
    /// gone or removed.
    pub fn planned(&self) -> bool {
        matches!(self, Reason::Admin | Reason::Drain | Reason::Preferred)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Admin => f.write_str("admin failover"),
            Reason::Drain => f.write_str("drain: the active host withdrew its exit-node offer"),
            Reason::Unreachable(d) => write!(
                f,
                "the active host was unreachable for {:.1} s (map stream and relay connection gone)",
                d.as_secs_f64()
            ),
            Reason::Preferred => f.write_str("a preferred host is ready again"),
            Reason::Removed => f.write_str("the active host was removed"),
        }
    }
}

/// A change of active host, for the shell to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub node: NodeId,
    pub from: HostId,
    pub to: HostId,
    pub reason: Reason,
    pub at: Instant,
}

/// Why the admin's failover cannot happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FailoverError {
    #[error("the node has no standby hosts")]
    NoGroup,
    #[error("no such host of the node")]
    UnknownHost,
    #[error("that host is the active one already")]
    AlreadyActive,
    #[error("the host is not ready: {0}")]
    NotReady(&'static str),
    #[error("no standby host is ready")]
    NoneReady,
}

#[derive(Debug, Clone)]
struct HostState {
    health: Health,
    ready_since: Option<Instant>,
    gone_since: Option<Instant>,
}

impl HostState {
    fn new(now: Instant) -> Self {
        HostState {
            health: Health::default(),
            ready_since: None,
            gone_since: Some(now),
        }
    }
}

#[derive(Debug, Clone)]
struct Group {
    active: HostId,
    hosts: BTreeMap<HostId, HostState>,
}

/// Why `h` cannot take the role now, or `None` when it can.
pub fn not_ready(h: &Health, relay: bool) -> Option<&'static str> {
    if h.sessions == 0 {
        Some("offline")
    } else if relay && !h.relay {
        Some("no relay connection")
    } else if !h.offers_exit {
        Some("not offering the exit node")
    } else if !h.disco {
        Some("no disco key yet")
    } else {
        None
    }
}

fn is_gone(h: &Health) -> bool {
    h.sessions == 0 && !h.relay
}

/// The switching rules for every node with standby hosts.
#[derive(Debug)]
pub struct Switcher {
    cfg: Config,
    groups: BTreeMap<NodeId, Group>,
    out: VecDeque<Switch>,
}

impl Switcher {
    pub fn new(cfg: Config) -> Self {
        Switcher {
            cfg,
            groups: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }

    pub fn config(&self) -> Config {
        self.cfg
    }

    /// The hosts of `node` are `hosts`, `active` serving (when the group is new). Hosts
    /// new to the group start gone, with nothing observed. When the active host is not
    /// among `hosts` any more, another takes over at once (a ready one if any, else the
    /// first): a removed host never stays active.
    pub fn set_hosts(&mut self, node: NodeId, hosts: &[HostId], active: &HostId, now: Instant) {
        if hosts.is_empty() {
            self.groups.remove(&node);
            return;
        }
        let g = self.groups.entry(node).or_insert_with(|| Group {
            active: active.clone(),
            hosts: BTreeMap::new(),
        });
        g.hosts.retain(|h, _| hosts.contains(h));
        for h in hosts {
            g.hosts
                .entry(h.clone())
                .or_insert_with(|| HostState::new(now));
        }
        if !g.hosts.contains_key(&g.active) {
            let to = best_ready(self.cfg, g, None).unwrap_or_else(|| hosts[0].clone());
            let from = std::mem::replace(&mut g.active, to.clone());
            self.out.push_back(Switch {
                node,
                from,
                to,
                reason: Reason::Removed,
                at: now,
            });
        }
    }

    /// Forget `node` (it has no standby hosts any more, or it was deleted).
    pub fn remove_group(&mut self, node: NodeId) {
        self.groups.remove(&node);
    }

    pub fn has_group(&self, node: NodeId) -> bool {
        self.groups.contains_key(&node)
    }

    /// The active host of `node`.
    pub fn active(&self, node: NodeId) -> Option<&HostId> {
        self.groups.get(&node).map(|g| &g.active)
    }

    /// What was last observed of a host.
    pub fn health(&self, node: NodeId, host: &HostId) -> Option<Health> {
        self.groups.get(&node)?.hosts.get(host).map(|h| h.health)
    }

    /// The shell saw `health` for `host` of `node` at `now`; may decide a switch.
    pub fn observe(&mut self, node: NodeId, host: &HostId, health: Health, now: Instant) {
        let relay = self.cfg.relay;
        let Some(h) = self
            .groups
            .get_mut(&node)
            .and_then(|g| g.hosts.get_mut(host))
        else {
            return;
        };
        h.health = health;
        match (not_ready(&health, relay).is_none(), h.ready_since) {
            (true, None) => h.ready_since = Some(now),
            (false, Some(_)) => h.ready_since = None,
            _ => {}
        }
        match (is_gone(&health), h.gone_since) {
            (true, None) => h.gone_since = Some(now),
            (false, Some(_)) => h.gone_since = None,
            _ => {}
        }
        self.evaluate(node, now);
    }

    /// The admin asks for a switch: to `to`, or to the best ready standby.
    pub fn failover(
        &mut self,
        node: NodeId,
        to: Option<&HostId>,
        now: Instant,
    ) -> Result<Switch, FailoverError> {
        let cfg = self.cfg;
        let g = self.groups.get_mut(&node).ok_or(FailoverError::NoGroup)?;
        let to = match to {
            Some(t) => {
                let h = g.hosts.get(t).ok_or(FailoverError::UnknownHost)?;
                if *t == g.active {
                    return Err(FailoverError::AlreadyActive);
                }
                if let Some(why) = not_ready(&h.health, cfg.relay) {
                    return Err(FailoverError::NotReady(why));
                }
                t.clone()
            }
            None => {
                let active = g.active.clone();
                best_ready(cfg, g, Some(&active)).ok_or(FailoverError::NoneReady)?
            }
        };
        let from = std::mem::replace(&mut g.active, to.clone());
        Ok(Switch {
            node,
            from,
            to,
            reason: Reason::Admin,
            at: now,
        })
    }

    /// Time passed: apply the rules that wait (an unreachable active host, a preferring
    /// host settling).
    pub fn handle_timeout(&mut self, now: Instant) {
        let nodes: Vec<NodeId> = self.groups.keys().copied().collect();
        for n in nodes {
            self.evaluate(n, now);
        }
    }

    pub fn poll_event(&mut self) -> Option<Switch> {
        self.out.pop_front()
    }

    /// When [`Switcher::handle_timeout`] may have something to do, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let mut next: Option<(Instant, &'static str)> = None;
        let mut consider = |t: Instant, why: &'static str| {
            if next.is_none_or(|(n, _)| t < n) {
                next = Some((t, why));
            }
        };
        for g in self.groups.values() {
            let Some(active) = g.hosts.get(&g.active) else {
                continue;
            };
            if let Some(t) = active.gone_since {
                consider(t + self.cfg.unreachable_after, "active host unreachable");
            }
            for (id, h) in &g.hosts {
                if *id != g.active
                    && h.health.prefer
                    && let Some(t) = h.ready_since
                {
                    consider(t + self.cfg.settle, "preferred host settled");
                }
            }
        }
        next
    }

    fn evaluate(&mut self, node: NodeId, now: Instant) {
        let cfg = self.cfg;
        let Some(g) = self.groups.get_mut(&node) else {
            return;
        };
        let Some(active) = g.hosts.get(&g.active).cloned() else {
            return;
        };
        let current = g.active.clone();
        let reason = if let Some(t) = active.gone_since
            && now.duration_since(t) >= cfg.unreachable_after
        {
            Some((Reason::Unreachable(now.duration_since(t)), None))
        } else if !is_gone(&active.health) && !active.health.offers_exit {
            // Alive (a map stream, or its relay connection while its session restarts
            // with the new settings) and no longer offering the exit node.
            Some((Reason::Drain, None))
        } else {
            let active_holds =
                active.health.prefer && not_ready(&active.health, cfg.relay).is_none();
            let settled = |h: &HostState| {
                h.health.prefer
                    && h.ready_since
                        .is_some_and(|t| now.duration_since(t) >= cfg.settle)
            };
            let preferred = g
                .hosts
                .iter()
                .filter(|(id, h)| **id != current && settled(h))
                .map(|(id, _)| id.clone())
                .next();
            match preferred {
                Some(p) if !active_holds => Some((Reason::Preferred, Some(p))),
                _ => None,
            }
        };
        let Some((reason, to)) = reason else {
            return;
        };
        let Some(to) = to.or_else(|| best_ready(cfg, g, Some(&current))) else {
            return;
        };
        g.active = to.clone();
        self.out.push_back(Switch {
            node,
            from: current,
            to,
            reason,
            at: now,
        });
    }
}

/// The ready host (other than `except`) that should take the role.
fn best_ready(cfg: Config, g: &Group, except: Option<&HostId>) -> Option<HostId> {
    g.hosts
        .iter()
        .filter(|(id, h)| Some(*id) != except && not_ready(&h.health, cfg.relay).is_none())
        .min_by_key(|(id, h)| (!h.health.prefer, h.ready_since, (*id).clone()))
        .map(|(id, _)| id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> HostId {
        HostId(format!("mkey:{s}"))
    }

    const READY: Health = Health {
        sessions: 1,
        relay: true,
        offers_exit: true,
        disco: true,
        prefer: false,
    };
    const GONE: Health = Health {
        sessions: 0,
        relay: false,
        offers_exit: true,
        disco: true,
        prefer: false,
    };

    /// Node 7 held by a (active) and b, both ready at t0.
    fn group() -> (Switcher, Instant) {
        let mut s = Switcher::new(Config::default());
        let t0 = Instant::now();
        s.set_hosts(7, &[id("a"), id("b")], &id("a"), t0);
        s.observe(7, &id("a"), READY, t0);
        s.observe(7, &id("b"), READY, t0);
        assert_eq!(s.poll_event(), None);
        (s, t0)
    }

    fn ms(t: Instant, n: u64) -> Instant {
        t + Duration::from_millis(n)
    }

    #[test]
    fn an_active_host_gone_for_three_seconds_hands_over_to_a_ready_standby() {
        let (mut s, t0) = group();
        // Map stream gone, relay connection still there: not gone.
        s.observe(
            7,
            &id("a"),
            Health {
                sessions: 0,
                ..READY
            },
            ms(t0, 100),
        );
        s.handle_timeout(ms(t0, 10_000));
        assert_eq!(s.poll_event(), None, "a relay connection is a sign of life");
        // Both gone at 10.1 s: the deadline is 13.1 s.
        s.observe(7, &id("a"), GONE, ms(t0, 10_100));
        assert_eq!(
            s.poll_timeout(),
            Some((ms(t0, 13_100), "active host unreachable"))
        );
        s.handle_timeout(ms(t0, 13_099));
        assert_eq!(s.poll_event(), None, "not before 3 s");
        // Back in time (a restart within 3 s): nothing happens.
        s.observe(7, &id("a"), READY, ms(t0, 12_000));
        s.handle_timeout(ms(t0, 20_000));
        assert_eq!(s.poll_event(), None);
        s.observe(7, &id("a"), GONE, ms(t0, 20_000));
        s.handle_timeout(ms(t0, 23_000));
        let sw = s.poll_event().expect("a switch");
        assert_eq!((sw.from, sw.to.clone()), (id("a"), id("b")));
        assert_eq!(sw.reason, Reason::Unreachable(Duration::from_secs(3)));
        assert_eq!(s.active(7), Some(&id("b")));
        assert_eq!(s.poll_event(), None, "one switch");
        // The old host returns: it stays a standby.
        s.observe(7, &id("a"), READY, ms(t0, 30_000));
        s.handle_timeout(ms(t0, 60_000));
        assert_eq!(s.poll_event(), None);
        assert_eq!(s.active(7), Some(&id("b")));
    }

    #[test]
    fn no_switch_without_a_ready_standby() {
        let (mut s, t0) = group();
        for (what, b) in [
            ("offline", GONE),
            (
                "no relay",
                Health {
                    relay: false,
                    ..READY
                },
            ),
            (
                "no exit offer",
                Health {
                    offers_exit: false,
                    ..READY
                },
            ),
            (
                "no disco key",
                Health {
                    disco: false,
                    ..READY
                },
            ),
        ] {
            s.observe(7, &id("b"), b, t0);
            s.observe(7, &id("a"), GONE, t0);
            s.handle_timeout(ms(t0, 60_000));
            assert_eq!(s.poll_event(), None, "{what}");
            assert!(s.failover(7, None, t0).is_err(), "{what}");
        }
        // Once b is ready, it takes over at once (a has been gone for long).
        s.observe(7, &id("b"), READY, ms(t0, 60_000));
        let sw = s.poll_event().unwrap();
        assert_eq!(sw.to, id("b"));
        assert!(matches!(sw.reason, Reason::Unreachable(_)));
    }

    #[test]
    fn a_relay_is_not_asked_for_when_the_server_runs_none() {
        let mut s = Switcher::new(Config {
            relay: false,
            ..Config::default()
        });
        let t0 = Instant::now();
        s.set_hosts(7, &[id("a"), id("b")], &id("a"), t0);
        let no_relay = Health {
            relay: false,
            ..READY
        };
        s.observe(7, &id("a"), no_relay, t0);
        s.observe(7, &id("b"), no_relay, t0);
        s.observe(7, &id("a"), GONE, ms(t0, 1));
        s.handle_timeout(ms(t0, 3_001));
        assert_eq!(s.poll_event().map(|s| s.to), Some(id("b")));
    }

    #[test]
    fn a_drain_moves_the_role_at_once_when_a_standby_is_ready() {
        let (mut s, t0) = group();
        s.observe(
            7,
            &id("a"),
            Health {
                offers_exit: false,
                ..READY
            },
            ms(t0, 5),
        );
        let sw = s.poll_event().unwrap();
        assert_eq!(
            (sw.to, sw.reason, sw.at),
            (id("b"), Reason::Drain, ms(t0, 5))
        );
        // The withdrawal arrives while the host's map stream restarts (its relay
        // connection is still there): a drain all the same.
        let (mut s, t0) = group();
        s.observe(
            7,
            &id("a"),
            Health {
                sessions: 0,
                offers_exit: false,
                ..READY
            },
            ms(t0, 5),
        );
        assert_eq!(s.poll_event().map(|s| s.reason), Some(Reason::Drain));
        // Without a ready standby, a drain moves nothing (members then leave the exit
        // node as they do without standby hosts).
        let (mut s, t0) = group();
        s.observe(7, &id("b"), GONE, t0);
        s.observe(
            7,
            &id("a"),
            Health {
                offers_exit: false,
                ..READY
            },
            ms(t0, 5),
        );
        assert_eq!(s.poll_event(), None);
    }

    #[test]
    fn the_admin_picks_a_host_or_the_best_one_and_is_told_why_not() {
        let (mut s, t0) = group();
        s.set_hosts(7, &[id("a"), id("b"), id("c")], &id("a"), t0);
        assert_eq!(
            s.failover(7, Some(&id("a")), t0),
            Err(FailoverError::AlreadyActive)
        );
        assert_eq!(
            s.failover(7, Some(&id("c")), t0),
            Err(FailoverError::NotReady("offline"))
        );
        assert_eq!(
            s.failover(7, Some(&id("zz")), t0),
            Err(FailoverError::UnknownHost)
        );
        assert_eq!(s.failover(8, None, t0), Err(FailoverError::NoGroup));
        // c ready later than b: b is the best.
        s.observe(7, &id("c"), READY, ms(t0, 10));
        let sw = s.failover(7, None, ms(t0, 20)).unwrap();
        assert_eq!(
            (sw.from.clone(), sw.to.clone(), sw.reason),
            (id("a"), id("b"), Reason::Admin)
        );
        assert_eq!(s.poll_event(), None, "the caller carries it out");
        let sw = s.failover(7, Some(&id("c")), ms(t0, 30)).unwrap();
        assert_eq!((sw.from, sw.to), (id("b"), id("c")));
        assert_eq!(s.active(7), Some(&id("c")));
    }

    #[test]
    fn a_preferred_host_takes_the_role_back_once_it_has_settled() {
        let (mut s, t0) = group();
        s.observe(7, &id("a"), GONE, t0);
        s.handle_timeout(ms(t0, 3_000));
        assert_eq!(s.poll_event().map(|s| s.to), Some(id("b")));
        // a returns preferring the role: it waits to be ready for 3 s, then takes it.
        let pref = Health {
            prefer: true,
            ..READY
        };
        s.observe(7, &id("a"), pref, ms(t0, 5_000));
        assert_eq!(s.poll_event(), None);
        assert_eq!(
            s.poll_timeout(),
            Some((ms(t0, 8_000), "preferred host settled"))
        );
        s.handle_timeout(ms(t0, 7_999));
        assert_eq!(s.poll_event(), None);
        s.handle_timeout(ms(t0, 8_000));
        let sw = s.poll_event().unwrap();
        assert_eq!((sw.to, sw.reason), (id("a"), Reason::Preferred));
        // And keeps it while ready, even with another preferring host.
        s.observe(7, &id("b"), pref, ms(t0, 9_000));
        s.handle_timeout(ms(t0, 60_000));
        assert_eq!(s.poll_event(), None);
        // Unplanned failover still prefers the preferring host.
        s.observe(7, &id("a"), GONE, ms(t0, 60_000));
        s.handle_timeout(ms(t0, 63_000));
        assert_eq!(s.poll_event().map(|s| s.to), Some(id("b")));
    }

    #[test]
    fn removing_the_active_host_moves_the_role_even_to_a_host_that_is_not_ready() {
        let (mut s, t0) = group();
        s.set_hosts(7, &[id("b")], &id("a"), ms(t0, 1));
        let sw = s.poll_event().unwrap();
        assert_eq!(
            (sw.from, sw.to, sw.reason),
            (id("a"), id("b"), Reason::Removed)
        );
        // A group whose active host is removed and no other is ready still moves.
        let (mut s, t0) = group();
        s.set_hosts(7, &[id("a"), id("b"), id("c")], &id("a"), t0);
        s.observe(7, &id("b"), GONE, t0);
        s.set_hosts(7, &[id("b"), id("c")], &id("a"), t0);
        assert_eq!(s.poll_event().map(|s| s.to), Some(id("b")));
        s.set_hosts(7, &[], &id("a"), t0);
        assert!(!s.has_group(7));
    }

    #[test]
    fn switching_is_deterministic_and_ignores_unknown_hosts() {
        let (mut s, t0) = group();
        s.observe(7, &id("nobody"), READY, t0);
        s.observe(99, &id("a"), GONE, t0);
        assert_eq!(s.poll_event(), None);
        // Two standbys ready at the same time: the lower key wins, every time.
        let mut s = Switcher::new(Config::default());
        s.set_hosts(1, &[id("a"), id("c"), id("b")], &id("a"), t0);
        s.observe(1, &id("c"), READY, t0);
        s.observe(1, &id("b"), READY, t0);
        s.observe(1, &id("a"), GONE, t0);
        s.handle_timeout(ms(t0, 3_000));
        assert_eq!(s.poll_event().map(|s| s.to), Some(id("b")));
    }
}
