//! Who is connected to this relay, and where each packet goes.
//!
//! Clients are found by node public key. Each has an [`Outbox`]: a bounded queue that
//! the registry only ever offers to, never waits on, so a client that stops reading
//! loses its own packets (counted by the caller) and delays no one else.
//!
//! The registry also remembers who sent to whom (bounded per sender), so that when a
//! client leaves, the peers that were talking to it get a PeerGone, and it feeds mesh
//! watchers a PeerPresent / PeerGone stream.
//!
//! Hosts of one key: the hosts of an exit node with standby hosts share its node key, and
//! each says which host it is at login (tsunagu's `ClientInfo.tsunaguHost`). Connections
//! of *different* hosts of a key coexist: one of them gets the key's packets (the
//! *active* host, which the coordination server sets with [`Registry::set_active_host`];
//! without one set, the newest connection), the others are parked and get nothing. A
//! connection of the same host (or one that names no host) replaces the older ones, as a
//! client that reconnects expects. With an active host set and not connected, nobody gets
//! the key's packets: a demoted or revoked host never does.

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use tsunagu_proto::NodePublic;

use crate::conn::Outgoing;
use crate::frame::PeerGoneReason;

/// How many distinct destinations per sender are remembered for PeerGone notices.
pub const MAX_REMEMBERED_PEERS: usize = 4096;

/// A connection's identity inside the registry (a key may reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// The result of offering a message to an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// The queue is full: the message is dropped.
    Full,
    /// The connection is going away.
    Closed,
}

/// A connection's bounded queue of messages to write.
pub trait Outbox {
    fn offer(&self, msg: Outgoing) -> Offer;
}

/// What became of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Queued,
    DroppedFull,
    DroppedClosed,
    /// No client with that key here.
    NotHere,
}

struct Client<O> {
    id: ConnId,
    outbox: O,
    preferred: bool,
    /// Destinations this client sent to (for cleanup of `senders`).
    sent_to: HashSet<NodePublic>,
    /// Which host of the key this connection is, when it said.
    host: Option<String>,
}

/// A connected client, as listed for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSummary {
    pub key: NodePublic,
    pub conn: ConnId,
    pub preferred: bool,
    /// The host it said it is (hosts of an exit node with standby hosts).
    pub host: Option<String>,
    /// Another host of the key gets its packets (a standby host).
    pub parked: bool,
}

/// Whether connection `a` of a key replaces connection `b`: the same host, or one that
/// does not say which host it is.
fn same_host(a: &Option<String>, b: &Option<String>) -> bool {
    a.is_none() || b.is_none() || a == b
}

pub struct Registry<O> {
    /// Per key, the connection that gets its packets.
    clients: HashMap<NodePublic, Client<O>>,
    /// Per key, connections of other hosts of it, which get nothing.
    parked: HashMap<NodePublic, Vec<Client<O>>>,
    /// Per key, the host whose connection gets its packets.
    active_host: HashMap<NodePublic, String>,
    /// dst → clients that sent to it while it was connected.
    senders: HashMap<NodePublic, HashSet<NodePublic>>,
    watchers: Vec<(ConnId, O)>,
    /// Mesh: clients of other relays of the region (learned from their PeerPresent),
    /// and the link to the relay that has each.
    remotes: HashMap<NodePublic, LinkId>,
    links: HashMap<LinkId, O>,
    next_id: u64,
}

/// A mesh link: this relay's connection to another relay of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

impl<O> Default for Registry<O> {
    fn default() -> Self {
        Registry {
            clients: HashMap::new(),
            parked: HashMap::new(),
            active_host: HashMap::new(),
            senders: HashMap::new(),
            watchers: Vec::new(),
            remotes: HashMap::new(),
            links: HashMap::new(),
            next_id: 1,
        }
    }
}

impl<O: Outbox> Registry<O> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn new_conn_id(&mut self) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Registers a logged-in client. A previous connection with the same key is told to
    /// close (the newest connection wins, as a client that reconnects expects).
    pub fn register(&mut self, key: NodePublic, id: ConnId, outbox: O) {
        self.register_host(key, id, outbox, None);
    }

    /// [`Registry::register`] for a connection that says which host of the key it is: it
    /// replaces the connections of the same host only (see the module's "Hosts of one
    /// key").
    pub fn register_host(&mut self, key: NodePublic, id: ConnId, outbox: O, host: Option<String>) {
        let mut conns = self.take_all(key);
        let mut kept = Vec::with_capacity(conns.len() + 1);
        for old in conns.drain(..) {
            if same_host(&old.host, &host) {
                old.outbox.offer(Outgoing::Close);
                self.forget_sender(key, &old.sent_to);
            } else {
                kept.push(old);
            }
        }
        kept.push(Client {
            id,
            outbox,
            preferred: false,
            sent_to: HashSet::new(),
            host,
        });
        if self.place(key, kept) {
            self.watchers
                .retain(|(_, w)| w.offer(Outgoing::PeerPresent(key)) != Offer::Closed);
        }
    }

    /// Every connection of `key`, out of both maps.
    fn take_all(&mut self, key: NodePublic) -> Vec<Client<O>> {
        let mut all: Vec<Client<O>> = self.clients.remove(&key).into_iter().collect();
        all.extend(self.parked.remove(&key).unwrap_or_default());
        all
    }

    /// Puts `conns` (all connections of `key`) back: the active host's, or without one set
    /// the newest, gets the packets; the others are parked. True when one gets them.
    fn place(&mut self, key: NodePublic, mut conns: Vec<Client<O>>) -> bool {
        let chosen = match self.active_host.get(&key) {
            Some(h) => conns.iter().position(|c| c.host.as_ref() == Some(h)),
            None => conns
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| c.id)
                .map(|(i, _)| i),
        };
        let delivering = chosen.map(|i| conns.swap_remove(i));
        if !conns.is_empty() {
            self.parked.insert(key, conns);
        }
        match delivering {
            Some(c) => {
                self.clients.insert(key, c);
                true
            }
            None => false,
        }
    }

    /// Removes connection `id` of `key`; true when it was one of its connections.
    pub fn unregister(&mut self, key: NodePublic, id: ConnId) -> bool {
        self.watchers.retain(|(wid, _)| *wid != id);
        if let Some(p) = self.parked.get_mut(&key)
            && let Some(i) = p.iter().position(|c| c.id == id)
        {
            p.swap_remove(i);
            if p.is_empty() {
                self.parked.remove(&key);
            }
            return true;
        }
        match self.clients.get(&key) {
            Some(c) if c.id == id => {}
            _ => return false,
        }
        let Some(gone) = self.clients.remove(&key) else {
            return false;
        };
        self.forget_sender(key, &gone.sent_to);
        if let Some(rest) = self.parked.remove(&key)
            && self.place(key, rest)
        {
            // Another host of the key takes its packets: it did not go away.
            return true;
        }
        for src in self.senders.remove(&key).unwrap_or_default() {
            if let Some(c) = self.clients.get(&src) {
                c.outbox.offer(Outgoing::PeerGone {
                    key,
                    reason: PeerGoneReason::Disconnected,
                });
            }
        }
        self.watchers.retain(|(_, w)| {
            w.offer(Outgoing::PeerGone {
                key,
                reason: PeerGoneReason::Disconnected,
            }) != Offer::Closed
        });
        true
    }

    fn forget_sender(&mut self, src: NodePublic, dsts: &HashSet<NodePublic>) {
        for dst in dsts {
            if let Some(s) = self.senders.get_mut(dst) {
                s.remove(&src);
                if s.is_empty() {
                    self.senders.remove(dst);
                }
            }
        }
    }

    /// Relays `packet` from client `src` to `dst`.
    pub fn send(&mut self, src: NodePublic, dst: NodePublic, packet: Bytes) -> SendOutcome {
        self.send_noting_new_pair(src, dst, packet).0
    }

    /// [`Registry::send`], also saying whether this is the first packet from `src` to
    /// this connection of `dst` (for logs: "A and B now talk through the relay").
    pub fn send_noting_new_pair(
        &mut self,
        src: NodePublic,
        dst: NodePublic,
        packet: Bytes,
    ) -> (SendOutcome, bool) {
        let outcome = self.deliver(src, dst, packet);
        let mut new_pair = false;
        if outcome != SendOutcome::NotHere
            && let Some(sender) = self.clients.get_mut(&src)
            && sender.sent_to.len() < MAX_REMEMBERED_PEERS
            && sender.sent_to.insert(dst)
        {
            self.senders.entry(dst).or_default().insert(src);
            new_pair = true;
        }
        (outcome, new_pair)
    }

    /// Delivers a packet that a mesh peer forwarded on behalf of `src`: to a client of
    /// this relay only, never onwards (so packets cannot loop between relays).
    pub fn forward(&mut self, src: NodePublic, dst: NodePublic, packet: Bytes) -> SendOutcome {
        match self.clients.get(&dst) {
            None => SendOutcome::NotHere,
            Some(c) => outcome(c.outbox.offer(Outgoing::Packet { src, packet })),
        }
    }

    /// To a client here; else, through its relay's link, to a client of the region.
    fn deliver(&self, src: NodePublic, dst: NodePublic, packet: Bytes) -> SendOutcome {
        if let Some(c) = self.clients.get(&dst) {
            return outcome(c.outbox.offer(Outgoing::Packet { src, packet }));
        }
        match self.remotes.get(&dst).and_then(|l| self.links.get(l)) {
            Some(link) => outcome(link.offer(Outgoing::Forward { src, dst, packet })),
            None => SendOutcome::NotHere,
        }
    }

    /// A mesh link is up: clients it reports are reachable through `outbox`.
    pub fn add_link(&mut self, outbox: O) -> LinkId {
        let id = LinkId(self.next_id);
        self.next_id += 1;
        self.links.insert(id, outbox);
        id
    }

    /// The link's relay has `key` connected.
    pub fn set_remote(&mut self, key: NodePublic, link: LinkId) {
        if self.links.contains_key(&link) {
            self.remotes.insert(key, link);
        }
    }

    /// The link's relay no longer has `key`: clients here that were sending to it hear
    /// PeerGone, as if it had been a client of this relay.
    pub fn clear_remote(&mut self, key: NodePublic, link: LinkId) {
        if self.remotes.get(&key) != Some(&link) {
            return;
        }
        self.remotes.remove(&key);
        if self.clients.contains_key(&key) {
            return; // it is (also) here: senders still reach it
        }
        for src in self.senders.remove(&key).unwrap_or_default() {
            if let Some(c) = self.clients.get_mut(&src) {
                c.sent_to.remove(&key);
                c.outbox.offer(Outgoing::PeerGone {
                    key,
                    reason: PeerGoneReason::Disconnected,
                });
            }
        }
    }

    /// The link is down: forget it and the clients learned through it.
    pub fn drop_link(&mut self, link: LinkId) {
        self.links.remove(&link);
        self.remotes.retain(|_, l| *l != link);
    }

    /// Whether a packet for `key` would go somewhere: a client here or of a meshed relay.
    pub fn reachable(&self, key: &NodePublic) -> bool {
        self.clients.contains_key(key) || self.remotes.contains_key(key)
    }

    /// How many clients of other relays are known.
    pub fn remote_count(&self) -> usize {
        self.remotes.len()
    }

    /// Which host of `key` gets its packets (`None`: the newest connection, as for any
    /// key). True when the connection that gets them changed.
    pub fn set_active_host(&mut self, key: NodePublic, host: Option<String>) -> bool {
        let before = self.clients.get(&key).map(|c| c.id);
        match host {
            Some(h) => self.active_host.insert(key, h),
            None => self.active_host.remove(&key),
        };
        let conns = self.take_all(key);
        let now = self.place(key, conns);
        let after = self.clients.get(&key).map(|c| c.id);
        if before.is_some() && !now {
            self.watchers.retain(|(_, w)| {
                w.offer(Outgoing::PeerGone {
                    key,
                    reason: PeerGoneReason::Disconnected,
                }) != Offer::Closed
            });
        } else if before.is_none() && now {
            self.watchers
                .retain(|(_, w)| w.offer(Outgoing::PeerPresent(key)) != Offer::Closed);
        }
        before != after
    }

    /// Whether `host` has a connection with `key` (getting its packets or parked).
    pub fn host_connected(&self, key: &NodePublic, host: &str) -> bool {
        let is = |c: &Client<O>| c.host.as_deref() == Some(host);
        self.clients.get(key).is_some_and(is)
            || self.parked.get(key).is_some_and(|p| p.iter().any(is))
    }

    /// Asks the connections of `host` with `key` to close; true if there was one.
    pub fn close_host(&self, key: &NodePublic, host: &str) -> bool {
        let is = |c: &&Client<O>| c.host.as_deref() == Some(host);
        let mut any = false;
        for c in self
            .clients
            .get(key)
            .into_iter()
            .chain(self.parked.get(key).into_iter().flatten())
            .filter(is)
        {
            c.outbox.offer(Outgoing::Close);
            any = true;
        }
        any
    }

    pub fn set_preferred(&mut self, key: NodePublic, id: ConnId, preferred: bool) {
        if let Some(c) = self.clients.get_mut(&key)
            && c.id == id
        {
            c.preferred = preferred;
        }
    }

    /// A mesh peer subscribes: it gets PeerPresent for everyone now, then changes.
    pub fn add_watcher(&mut self, id: ConnId, outbox: O) {
        for key in self.clients.keys() {
            outbox.offer(Outgoing::PeerPresent(*key));
        }
        self.watchers.push((id, outbox));
    }

    /// Asks `key`'s connection to close; false if it is not here.
    pub fn close_peer(&self, key: NodePublic) -> bool {
        self.clients
            .get(&key)
            .is_some_and(|c| c.outbox.offer(Outgoing::Close) != Offer::Closed)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn contains(&self, key: &NodePublic) -> bool {
        self.clients.contains_key(key)
    }

    /// Connected clients (parked ones too), sorted by key.
    pub fn clients(&self) -> Vec<ClientSummary> {
        let summary = |k: &NodePublic, c: &Client<O>, parked: bool| ClientSummary {
            key: *k,
            conn: c.id,
            preferred: c.preferred,
            host: c.host.clone(),
            parked,
        };
        let mut v: Vec<ClientSummary> = self
            .clients
            .iter()
            .map(|(k, c)| summary(k, c, false))
            .chain(
                self.parked
                    .iter()
                    .flat_map(|(k, p)| p.iter().map(move |c| summary(k, c, true))),
            )
            .collect();
        v.sort_by_key(|c| (c.key, c.parked, c.conn));
        v
    }
}

fn outcome(o: Offer) -> SendOutcome {
    match o {
        Offer::Queued => SendOutcome::Queued,
        Offer::Full => SendOutcome::DroppedFull,
        Offer::Closed => SendOutcome::DroppedClosed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A queue of fixed capacity that tests can inspect.
    #[derive(Clone)]
    struct Fake {
        cap: usize,
        q: Rc<RefCell<Vec<Outgoing>>>,
        closed: Rc<RefCell<bool>>,
    }

    impl Fake {
        fn new(cap: usize) -> Self {
            Fake {
                cap,
                q: Rc::default(),
                closed: Rc::default(),
            }
        }
        fn take(&self) -> Vec<Outgoing> {
            std::mem::take(&mut self.q.borrow_mut())
        }
    }

    impl Outbox for Fake {
        fn offer(&self, msg: Outgoing) -> Offer {
            if *self.closed.borrow() {
                return Offer::Closed;
            }
            let mut q = self.q.borrow_mut();
            if q.len() >= self.cap {
                return Offer::Full;
            }
            q.push(msg);
            Offer::Queued
        }
    }

    fn k(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    fn join(r: &mut Registry<Fake>, key: NodePublic, cap: usize) -> (ConnId, Fake) {
        let f = Fake::new(cap);
        let id = r.new_conn_id();
        r.register(key, id, f.clone());
        (id, f)
    }

    #[test]
    fn packets_reach_the_destination_with_the_source_key() {
        let mut r = Registry::new();
        let (_, _a) = join(&mut r, k(1), 8);
        let (_, b) = join(&mut r, k(2), 8);
        assert_eq!(
            r.send(k(1), k(2), Bytes::from_static(b"x")),
            SendOutcome::Queued
        );
        assert_eq!(
            b.take(),
            vec![Outgoing::Packet {
                src: k(1),
                packet: Bytes::from_static(b"x")
            }]
        );
        assert_eq!(r.send(k(1), k(3), Bytes::new()), SendOutcome::NotHere);
    }

    #[test]
    fn a_full_queue_drops_for_that_client_only() {
        let mut r = Registry::new();
        join(&mut r, k(1), 8);
        let (_, stuck) = join(&mut r, k(2), 2);
        let (_, fine) = join(&mut r, k(3), 100);
        let mut outcomes = Vec::new();
        for _ in 0..10 {
            outcomes.push(r.send(k(1), k(2), Bytes::from_static(b"p")));
            assert_eq!(
                r.send(k(1), k(3), Bytes::from_static(b"q")),
                SendOutcome::Queued
            );
        }
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == SendOutcome::Queued)
                .count(),
            2
        );
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == SendOutcome::DroppedFull)
                .count(),
            8
        );
        assert_eq!(stuck.take().len(), 2);
        assert_eq!(fine.take().len(), 10);
    }

    #[test]
    fn senders_hear_when_their_peer_leaves() {
        let mut r = Registry::new();
        let (_, a) = join(&mut r, k(1), 8);
        let (bid, _b) = join(&mut r, k(2), 8);
        let (_, c) = join(&mut r, k(3), 8);
        r.send(k(1), k(2), Bytes::new());
        assert!(r.unregister(k(2), bid));
        assert_eq!(
            a.take(),
            vec![Outgoing::PeerGone {
                key: k(2),
                reason: PeerGoneReason::Disconnected
            }]
        );
        assert!(c.take().is_empty(), "c never sent to b");
        assert!(!r.contains(&k(2)));
    }

    #[test]
    fn the_newest_connection_of_a_key_wins() {
        let mut r = Registry::new();
        let (old_id, old) = join(&mut r, k(1), 8);
        let (new_id, new) = join(&mut r, k(1), 8);
        assert_eq!(old.take(), vec![Outgoing::Close]);
        assert!(
            !r.unregister(k(1), old_id),
            "the old one leaving removes nothing"
        );
        assert!(r.contains(&k(1)));
        join(&mut r, k(2), 8);
        r.send(k(2), k(1), Bytes::from_static(b"n"));
        assert_eq!(new.take().len(), 1);
        assert!(r.unregister(k(1), new_id));
        assert!(r.is_empty() || r.len() == 1);
    }

    fn join_host(r: &mut Registry<Fake>, key: NodePublic, host: &str) -> (ConnId, Fake) {
        let f = Fake::new(8);
        let id = r.new_conn_id();
        r.register_host(key, id, f.clone(), Some(host.to_string()));
        (id, f)
    }

    fn got(f: &Fake) -> usize {
        f.take()
            .iter()
            .filter(|m| matches!(m, Outgoing::Packet { .. }))
            .count()
    }

    #[test]
    fn hosts_of_one_key_coexist_and_only_the_active_one_gets_its_packets() {
        let mut r = Registry::new();
        join(&mut r, k(2), 8);
        let (a_id, a) = join_host(&mut r, k(1), "mkey:a");
        let (_, b) = join_host(&mut r, k(1), "mkey:b");
        assert!(a.take().is_empty(), "another host does not close a");
        assert!(r.host_connected(&k(1), "mkey:a") && r.host_connected(&k(1), "mkey:b"));
        // No active host set: the newest connection.
        r.send(k(2), k(1), Bytes::from_static(b"1"));
        assert_eq!((got(&a), got(&b)), (0, 1));
        // The server makes a the active host: only a gets the packets.
        assert!(r.set_active_host(k(1), Some("mkey:a".into())));
        r.send(k(2), k(1), Bytes::from_static(b"2"));
        assert_eq!((got(&a), got(&b)), (1, 0));
        // b reconnects: its old connection closes, a keeps the packets.
        let (_, b2) = join_host(&mut r, k(1), "mkey:b");
        assert_eq!(b.take(), vec![Outgoing::Close]);
        r.send(k(2), k(1), Bytes::from_static(b"3"));
        assert_eq!((got(&a), got(&b2)), (1, 0));
        let listed = r.clients();
        assert_eq!(listed.iter().filter(|c| c.key == k(1)).count(), 2);
        assert!(
            listed
                .iter()
                .any(|c| c.key == k(1) && c.parked && c.host.as_deref() == Some("mkey:b"))
        );
        // a goes away while it is the active host: nobody gets the key's packets (a
        // standby never answers for it unless the server says so).
        assert!(r.unregister(k(1), a_id));
        assert_eq!(
            r.send(k(2), k(1), Bytes::from_static(b"4")),
            SendOutcome::NotHere
        );
        assert!(r.host_connected(&k(1), "mkey:b"));
        assert!(!r.host_connected(&k(1), "mkey:a"));
        // Promoted: b gets them at once, on the connection it already has.
        assert!(r.set_active_host(k(1), Some("mkey:b".into())));
        assert_eq!(
            r.send(k(2), k(1), Bytes::from_static(b"5")),
            SendOutcome::Queued
        );
        assert_eq!(got(&b2), 1);
        assert!(r.close_host(&k(1), "mkey:b"));
        assert_eq!(b2.take(), vec![Outgoing::Close]);
    }

    #[test]
    fn a_connection_naming_no_host_replaces_every_host() {
        let mut r = Registry::new();
        let (_, a) = join_host(&mut r, k(1), "mkey:a");
        let (_, b) = join_host(&mut r, k(1), "mkey:b");
        let (_, plain) = join(&mut r, k(1), 8);
        assert_eq!(a.take(), vec![Outgoing::Close]);
        assert_eq!(b.take(), vec![Outgoing::Close]);
        join(&mut r, k(2), 8);
        r.send(k(2), k(1), Bytes::from_static(b"x"));
        assert_eq!(got(&plain), 1);
        assert_eq!(r.clients().len(), 2);
    }

    #[test]
    fn the_active_host_leaving_with_no_other_is_gone_for_senders() {
        let mut r = Registry::new();
        let (_, sender) = join(&mut r, k(2), 8);
        let (a_id, _a) = join_host(&mut r, k(1), "mkey:a");
        let (b_id, _b) = join_host(&mut r, k(1), "mkey:b");
        r.send(k(2), k(1), Bytes::new());
        sender.take();
        // Without an active host, the other host takes over when the newest leaves:
        // no PeerGone.
        assert!(r.unregister(k(1), b_id));
        assert!(sender.take().is_empty());
        r.send(k(2), k(1), Bytes::new());
        assert!(r.unregister(k(1), a_id));
        assert_eq!(
            sender.take(),
            vec![Outgoing::PeerGone {
                key: k(1),
                reason: PeerGoneReason::Disconnected
            }]
        );
    }

    #[test]
    fn watchers_see_everyone_then_changes() {
        let mut r = Registry::new();
        join(&mut r, k(1), 8);
        let w = Fake::new(100);
        let wid = r.new_conn_id();
        r.add_watcher(wid, w.clone());
        assert_eq!(w.take(), vec![Outgoing::PeerPresent(k(1))]);
        let (id2, _) = join(&mut r, k(2), 8);
        r.unregister(k(2), id2);
        assert_eq!(
            w.take(),
            vec![
                Outgoing::PeerPresent(k(2)),
                Outgoing::PeerGone {
                    key: k(2),
                    reason: PeerGoneReason::Disconnected
                }
            ]
        );
    }

    #[test]
    fn remembered_peers_are_bounded_and_only_real_ones() {
        let mut r = Registry::new();
        join(&mut r, k(1), 8);
        for i in 0..=255u8 {
            let mut key = [i; 32];
            key[0] = 0xee;
            r.send(k(1), NodePublic(key), Bytes::new());
        }
        assert!(
            r.senders.is_empty(),
            "unknown destinations are not remembered"
        );
    }

    #[test]
    fn clients_of_meshed_relays_are_reached_through_their_link() {
        let mut r = Registry::new();
        join(&mut r, k(1), 8);
        let link = Fake::new(8);
        let l = r.add_link(link.clone());
        r.set_remote(k(7), l);
        assert_eq!(
            r.send(k(1), k(7), Bytes::from_static(b"m")),
            SendOutcome::Queued
        );
        assert_eq!(
            link.take(),
            vec![Outgoing::Forward {
                src: k(1),
                dst: k(7),
                packet: Bytes::from_static(b"m")
            }]
        );
        // Forwarded packets are delivered here or dropped, never sent on.
        assert_eq!(r.forward(k(9), k(7), Bytes::new()), SendOutcome::NotHere);
        assert!(link.take().is_empty());
        let sender = r.clients[&k(1)].outbox.clone();
        sender.take();
        r.clear_remote(k(7), l);
        assert_eq!(
            sender.take(),
            vec![Outgoing::PeerGone {
                key: k(7),
                reason: PeerGoneReason::Disconnected
            }],
            "the local sender hears that the remote peer left"
        );
        assert_eq!(r.send(k(1), k(7), Bytes::new()), SendOutcome::NotHere);
        r.set_remote(k(8), l);
        r.drop_link(l);
        assert_eq!(r.remote_count(), 0);
        assert_eq!(r.send(k(1), k(8), Bytes::new()), SendOutcome::NotHere);
    }
}
