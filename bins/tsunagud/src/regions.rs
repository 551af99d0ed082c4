//! Which relay regions the node keeps connections to: the core, without I/O.
//!
//! A node homes on one region and stays connected to it (peers send to it there). To send
//! to a peer homed on another region it needs a connection to *that* region: Tailscale
//! opens one on demand and closes it when it has sent nothing there for 60 s; so does
//! this. [`RegionConns`] takes every datagram the engine hands the relay (with the
//! region and `now`) and answers where it goes ([`Route`]); the connections to open or
//! close come out of [`RegionConns::poll_action`], the next deadline out of
//! [`RegionConns::poll_timeout`]. The shell (`relay.rs`) owns the connections.
//!
//! What keeps a connection: data. The daemon gives peers a persistent keepalive (25 s,
//! for NAT mappings on direct paths), and WireGuard handshakes again when such a
//! keepalive finds the session expired (every ~3 min for an idle peer); counted as
//! sends, those would keep a region connection open for as long as the peer exists. So:
//!
//! * data (WireGuard transport messages with a payload, anything not WireGuard) opens a
//!   connection and keeps it `idle` after the last one;
//! * a handshake message opens one (it must get through) but keeps it only
//!   [`HANDSHAKE_GRACE`]: the data it was started for follows within that time if any;
//! * a keepalive is sent on a connection that is open and neither opens nor keeps one,
//!   unless it answers data the peer sent us within [`ANSWER_WINDOW`] (WireGuard's
//!   passive keepalive, by which the peer learns that its packets arrive: dropping those
//!   would make it handshake over and over during one-way traffic); then it counts as
//!   data;
//! * a disco message (path discovery: pings, pongs, CallMeMaybe) is sent on a connection
//!   that is open and neither opens nor keeps one: disco works for peers we send data
//!   to, over the connection that data opened, and must not keep it open once the data
//!   stops.
//!
//! At most `max` connections besides home: opening one more closes the least recently
//! used.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use tsunagu_proto::NodePublic;

/// How long a connection to a region other than home stays open without sends (as
/// Tailscale's `derpInactiveCleanupTime`).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Connections to regions other than home, at most.
pub const DEFAULT_MAX: usize = 8;
/// A keepalive sent this soon after the peer's last data answers that data (WireGuard
/// sends its passive keepalive 10 s after data at most; tsunagu's timers after 1 s).
pub const ANSWER_WINDOW: Duration = Duration::from_secs(10);
/// Peers whose last data we remember, at most (the relay could deliver from any key).
const MAX_HEARD: usize = 4096;

/// How long a handshake keeps a region connection (at most `idle`).
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(10);

/// What a datagram is, for keeping connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Data,
    /// WireGuard handshake initiation (148 bytes), response (92) or cookie reply (64).
    Handshake,
    /// A WireGuard transport message with no payload: 16 bytes of header, 16 of tag.
    Keepalive,
    /// A disco message (its magic first).
    Disco,
}

pub fn kind(datagram: &[u8]) -> Kind {
    if datagram.starts_with(tsunagu_disco::MAGIC) {
        return Kind::Disco;
    }
    match (datagram.first(), datagram.len()) {
        (Some(1), 148) | (Some(2), 92) | (Some(3), 64) => Kind::Handshake,
        (Some(4), 32) => Kind::Keepalive,
        _ => Kind::Data,
    }
}

/// Where one datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The home connection.
    Home,
    /// The connection to this region (open, or being opened: see [`Action::Open`]).
    Region(u16),
    /// Nowhere.
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The DERP map has no such region (or it is our home and we have none).
    UnknownRegion,
    /// A keepalive for an idle peer, and no connection to its region is open.
    IdleKeepalive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Nothing sent there for the idle time.
    Idle,
    /// The least recently used, to make room for another region.
    Evicted,
    /// The region left the DERP map, or became home.
    Gone,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Evicted => "evicted for another region",
            CloseReason::Gone => "no longer needed",
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Open(u16),
    Close(u16, CloseReason),
}

/// The regions this node is connected to besides home, and until when each stays.
#[derive(Debug)]
pub struct RegionConns {
    idle: Duration,
    max: usize,
    home: Option<u16>,
    /// The regions of the DERP map.
    known: BTreeSet<u16>,
    /// Open connections other than home → when they close unless kept.
    open: BTreeMap<u16, Instant>,
    /// Peers → when they last sent us something other than a keepalive.
    heard: BTreeMap<NodePublic, Instant>,
    actions: VecDeque<Action>,
}

impl RegionConns {
    /// `idle`: how long a region connection lives without sends; `max`: how many there
    /// may be besides home (at least one).
    pub fn new(idle: Duration, max: usize) -> Self {
        RegionConns {
            idle,
            max: max.max(1),
            home: None,
            known: BTreeSet::new(),
            open: BTreeMap::new(),
            heard: BTreeMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// The DERP map changed (or our home did): connections to regions that left the map,
    /// or to the new home, close.
    pub fn set_regions(&mut self, home: Option<u16>, known: impl IntoIterator<Item = u16>) {
        self.home = home;
        self.known = known.into_iter().collect();
        let gone: Vec<u16> = self
            .open
            .keys()
            .copied()
            .filter(|r| Some(*r) == home || !self.known.contains(r))
            .collect();
        for r in gone {
            self.open.remove(&r);
            self.actions.push_back(Action::Close(r, CloseReason::Gone));
        }
    }

    /// The engine sends `datagram` to `dst` through `region`.
    pub fn on_send(
        &mut self,
        region: u16,
        dst: &NodePublic,
        datagram: &[u8],
        now: Instant,
    ) -> Route {
        if Some(region) == self.home {
            return Route::Home;
        }
        if !self.known.contains(&region) {
            return Route::Drop(DropReason::UnknownRegion);
        }
        let answers = || {
            self.heard
                .get(dst)
                .is_some_and(|t| now.saturating_duration_since(*t) < ANSWER_WINDOW)
        };
        let keep = match kind(datagram) {
            Kind::Data => Some(self.idle),
            Kind::Handshake => Some(HANDSHAKE_GRACE.min(self.idle)),
            Kind::Keepalive if answers() => Some(self.idle),
            Kind::Keepalive | Kind::Disco => None,
        };
        if let Some(until) = self.open.get_mut(&region) {
            if let Some(keep) = keep {
                *until = (*until).max(now + keep);
            }
            return Route::Region(region);
        }
        let Some(keep) = keep else {
            return Route::Drop(DropReason::IdleKeepalive);
        };
        // (A disco message for a closed region is dropped the same way: see the module.)
        if self.open.len() >= self.max
            && let Some((&lru, _)) = self.open.iter().min_by_key(|(_, t)| **t)
        {
            self.open.remove(&lru);
            self.actions
                .push_back(Action::Close(lru, CloseReason::Evicted));
        }
        self.open.insert(region, now + keep);
        self.actions.push_back(Action::Open(region));
        Route::Region(region)
    }

    /// A datagram from `src` arrived over any relay connection.
    pub fn on_receive(&mut self, src: &NodePublic, datagram: &[u8], now: Instant) {
        if kind(datagram) != Kind::Data {
            return;
        }
        if self.heard.len() >= MAX_HEARD && !self.heard.contains_key(src) {
            self.forget_heard(now);
            if self.heard.len() >= MAX_HEARD {
                return;
            }
        }
        self.heard.insert(*src, now);
    }

    fn forget_heard(&mut self, now: Instant) {
        self.heard
            .retain(|_, t| now.saturating_duration_since(*t) < ANSWER_WINDOW);
    }

    /// Close the connections whose time is up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let idle: Vec<u16> = self
            .open
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(r, _)| *r)
            .collect();
        for r in idle {
            self.open.remove(&r);
            self.actions.push_back(Action::Close(r, CloseReason::Idle));
        }
        self.forget_heard(now);
    }

    /// When [`RegionConns::handle_timeout`] has something to do next.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.open
            .values()
            .min()
            .map(|until| (*until, "idle region connection"))
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Open connections besides home, with the time they close unless kept.
    pub fn open(&self) -> impl Iterator<Item = (u16, Instant)> + '_ {
        self.open.iter().map(|(r, t)| (*r, *t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagu_proto::NodePrivate;

    const DATA: &[u8] = &[4u8; 64];

    fn keepalive() -> Vec<u8> {
        let mut k = vec![0u8; 32];
        k[0] = 4;
        k
    }

    fn actions(c: &mut RegionConns) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn conns() -> RegionConns {
        let mut c = RegionConns::new(Duration::from_secs(60), 2);
        c.set_regions(Some(900), [900, 901, 902, 903]);
        c
    }

    #[test]
    fn home_stays_others_open_on_demand_and_close_when_idle() {
        let mut c = conns();
        let peer = NodePrivate::generate().public();
        let t0 = Instant::now();
        assert_eq!(c.on_send(900, &peer, DATA, t0), Route::Home);
        assert_eq!(c.poll_timeout(), None);
        assert_eq!(c.on_send(901, &peer, DATA, t0), Route::Region(901));
        assert_eq!(actions(&mut c), [Action::Open(901)]);
        // Sends keep it open; the deadline follows the last one.
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(c.on_send(901, &peer, DATA, t1), Route::Region(901));
        assert_eq!(actions(&mut c), []);
        assert_eq!(c.poll_timeout().map(|t| t.0), Some(t1 + DEFAULT_IDLE));
        c.handle_timeout(t0 + Duration::from_secs(61));
        assert_eq!(actions(&mut c), []);
        c.handle_timeout(t1 + DEFAULT_IDLE);
        assert_eq!(actions(&mut c), [Action::Close(901, CloseReason::Idle)]);
        assert_eq!(c.open().count(), 0);
        // A region missing from the map goes nowhere.
        assert_eq!(
            c.on_send(999, &peer, DATA, t1),
            Route::Drop(DropReason::UnknownRegion)
        );
    }

    #[test]
    fn keepalives_of_idle_peers_neither_open_nor_keep_a_region() {
        let mut c = conns();
        let peer = NodePrivate::generate().public();
        let ka = keepalive();
        assert_eq!((kind(&ka), kind(DATA)), (Kind::Keepalive, Kind::Data));
        let t0 = Instant::now();
        // A persistent keepalive to a region we are not connected to: dropped.
        assert_eq!(
            c.on_send(901, &peer, &ka, t0),
            Route::Drop(DropReason::IdleKeepalive)
        );
        assert_eq!(actions(&mut c), []);
        // Open for data; keepalives still go out on it but do not keep it.
        c.on_send(901, &peer, DATA, t0);
        actions(&mut c);
        let t1 = t0 + Duration::from_secs(25);
        assert_eq!(c.on_send(901, &peer, &ka, t1), Route::Region(901));
        c.handle_timeout(t0 + DEFAULT_IDLE);
        assert_eq!(actions(&mut c), [Action::Close(901, CloseReason::Idle)]);
        // A keepalive that answers the peer's data (one-way traffic to us) counts.
        let t2 = t0 + Duration::from_secs(100);
        c.on_receive(&peer, DATA, t2);
        let t3 = t2 + Duration::from_secs(1);
        assert_eq!(c.on_send(901, &peer, &ka, t3), Route::Region(901));
        assert_eq!(actions(&mut c), [Action::Open(901)]);
        // ... but the peer's own keepalives are not data.
        let other = NodePrivate::generate().public();
        c.on_receive(&other, &ka, t3);
        assert_eq!(
            c.on_send(902, &other, &ka, t3),
            Route::Drop(DropReason::IdleKeepalive)
        );
        // Long after the data, a keepalive is an idle peer's again.
        let t4 = t2 + ANSWER_WINDOW;
        c.handle_timeout(t4);
        assert_eq!(
            c.on_send(902, &peer, &ka, t4),
            Route::Drop(DropReason::IdleKeepalive)
        );
    }

    #[test]
    fn disco_messages_neither_open_nor_keep_a_region() {
        let mut c = conns();
        let peer = NodePrivate::generate().public();
        let mut disco = tsunagu_disco::MAGIC.to_vec();
        disco.extend_from_slice(&[0; 100]);
        assert_eq!(kind(&disco), Kind::Disco);
        let t0 = Instant::now();
        assert_eq!(
            c.on_send(901, &peer, &disco, t0),
            Route::Drop(DropReason::IdleKeepalive)
        );
        assert_eq!(actions(&mut c), []);
        // Over a connection data opened, they go out, and do not keep it.
        c.on_send(901, &peer, DATA, t0);
        actions(&mut c);
        let t1 = t0 + Duration::from_secs(50);
        assert_eq!(c.on_send(901, &peer, &disco, t1), Route::Region(901));
        c.handle_timeout(t0 + DEFAULT_IDLE);
        assert_eq!(actions(&mut c), [Action::Close(901, CloseReason::Idle)]);
        // A peer's disco messages are not data we answer with keepalives.
        c.on_receive(&peer, &disco, t1);
        assert_eq!(
            c.on_send(901, &peer, &keepalive(), t1 + Duration::from_secs(1)),
            Route::Drop(DropReason::IdleKeepalive)
        );
    }

    #[test]
    fn handshakes_get_through_but_keep_a_region_only_briefly() {
        let mut c = conns();
        let peer = NodePrivate::generate().public();
        let mut init = vec![0u8; 148];
        init[0] = 1;
        let mut resp = vec![0u8; 92];
        resp[0] = 2;
        assert_eq!(
            (kind(&init), kind(&resp)),
            (Kind::Handshake, Kind::Handshake)
        );
        assert_eq!(kind(&[1u8; 100]), Kind::Data, "not a handshake's length");
        let t0 = Instant::now();
        // A handshake for a persistent keepalive (the session expired): opened, closed
        // after the grace.
        assert_eq!(c.on_send(901, &peer, &init, t0), Route::Region(901));
        assert_eq!(actions(&mut c), [Action::Open(901)]);
        assert_eq!(c.poll_timeout().map(|t| t.0), Some(t0 + HANDSHAKE_GRACE));
        c.handle_timeout(t0 + HANDSHAKE_GRACE);
        assert_eq!(actions(&mut c), [Action::Close(901, CloseReason::Idle)]);
        // A handshake for data: the data keeps it.
        c.on_send(901, &peer, &init, t0);
        c.on_send(901, &peer, DATA, t0 + Duration::from_millis(20));
        c.handle_timeout(t0 + HANDSHAKE_GRACE);
        assert_eq!(actions(&mut c), [Action::Open(901)]);
        // A handshake never shortens what data gave.
        c.on_send(901, &peer, &resp, t0 + Duration::from_secs(1));
        assert_eq!(
            c.poll_timeout().map(|t| t.0),
            Some(t0 + Duration::from_millis(20) + DEFAULT_IDLE)
        );
        // With an idle time shorter than the grace, the idle time.
        let mut short = RegionConns::new(Duration::from_secs(3), 2);
        short.set_regions(Some(900), [900, 901]);
        short.on_send(901, &peer, &init, t0);
        assert_eq!(
            short.poll_timeout().map(|t| t.0),
            Some(t0 + Duration::from_secs(3))
        );
    }

    #[test]
    fn at_most_max_regions_the_least_recently_used_makes_room() {
        let mut c = conns();
        let peer = NodePrivate::generate().public();
        let t0 = Instant::now();
        c.on_send(901, &peer, DATA, t0);
        c.on_send(902, &peer, DATA, t0 + Duration::from_secs(1));
        c.on_send(901, &peer, DATA, t0 + Duration::from_secs(2));
        assert_eq!(actions(&mut c), [Action::Open(901), Action::Open(902)]);
        c.on_send(903, &peer, DATA, t0 + Duration::from_secs(3));
        assert_eq!(
            actions(&mut c),
            [Action::Close(902, CloseReason::Evicted), Action::Open(903)]
        );
        let open: Vec<u16> = c.open().map(|(r, _)| r).collect();
        assert_eq!(open, [901, 903]);
    }

    #[test]
    fn regions_that_leave_the_map_or_become_home_close() {
        let mut c = conns();
        let peer = NodePrivate::generate().public();
        let t0 = Instant::now();
        c.on_send(901, &peer, DATA, t0);
        c.on_send(902, &peer, DATA, t0);
        actions(&mut c);
        c.set_regions(Some(901), [900, 901]);
        assert_eq!(
            actions(&mut c),
            [
                Action::Close(901, CloseReason::Gone),
                Action::Close(902, CloseReason::Gone)
            ]
        );
        assert_eq!(c.on_send(901, &peer, DATA, t0), Route::Home);
        assert_eq!(c.on_send(900, &peer, DATA, t0), Route::Region(900));
    }

    #[test]
    fn the_memory_of_senders_is_bounded() {
        let mut c = conns();
        let t0 = Instant::now();
        for _ in 0..MAX_HEARD + 10 {
            c.on_receive(&NodePrivate::generate().public(), DATA, t0);
        }
        assert_eq!(c.heard.len(), MAX_HEARD);
        let later = t0 + ANSWER_WINDOW;
        let fresh = NodePrivate::generate().public();
        c.on_receive(&fresh, DATA, later);
        assert_eq!(c.heard.len(), 1, "the stale ones were forgotten");
    }
}
