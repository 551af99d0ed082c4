//! Who is connected to this relay, and where each packet goes.
//!
//! Clients are found by node public key. Each has an [`Outbox`]: a bounded queue that
//! the registry only ever offers to, never waits on, so a client that stops reading
//! loses its own packets (counted by the caller) and delays no one else.
//!
//! The registry also remembers who sent to whom (bounded per sender), so that when a
//! client leaves, the peers that were talking to it get a PeerGone, and it feeds mesh
//! watchers a PeerPresent / PeerGone stream.

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
}

/// A connected client, as listed for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSummary {
    pub key: NodePublic,
    pub conn: ConnId,
    pub preferred: bool,
}

pub struct Registry<O> {
    clients: HashMap<NodePublic, Client<O>>,
    /// dst → clients that sent to it while it was connected.
    senders: HashMap<NodePublic, HashSet<NodePublic>>,
    watchers: Vec<(ConnId, O)>,
    next_id: u64,
}

impl<O> Default for Registry<O> {
    fn default() -> Self {
        Registry {
            clients: HashMap::new(),
            senders: HashMap::new(),
            watchers: Vec::new(),
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
        let client = Client {
            id,
            outbox,
            preferred: false,
            sent_to: HashSet::new(),
        };
        if let Some(old) = self.clients.insert(key, client) {
            old.outbox.offer(Outgoing::Close);
            self.forget_sender(key, &old.sent_to);
        }
        self.watchers
            .retain(|(_, w)| w.offer(Outgoing::PeerPresent(key)) != Offer::Closed);
    }

    /// Removes `key` if `id` is still its connection; true when it was.
    pub fn unregister(&mut self, key: NodePublic, id: ConnId) -> bool {
        self.watchers.retain(|(wid, _)| *wid != id);
        match self.clients.get(&key) {
            Some(c) if c.id == id => {}
            _ => return false,
        }
        let Some(gone) = self.clients.remove(&key) else {
            return false;
        };
        self.forget_sender(key, &gone.sent_to);
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

    /// Delivers a packet that a mesh peer forwarded on behalf of `src`.
    pub fn forward(&mut self, src: NodePublic, dst: NodePublic, packet: Bytes) -> SendOutcome {
        self.deliver(src, dst, packet)
    }

    fn deliver(&self, src: NodePublic, dst: NodePublic, packet: Bytes) -> SendOutcome {
        match self.clients.get(&dst) {
            None => SendOutcome::NotHere,
            Some(c) => match c.outbox.offer(Outgoing::Packet { src, packet }) {
                Offer::Queued => SendOutcome::Queued,
                Offer::Full => SendOutcome::DroppedFull,
                Offer::Closed => SendOutcome::DroppedClosed,
            },
        }
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

    /// Connected clients, sorted by key.
    pub fn clients(&self) -> Vec<ClientSummary> {
        let mut v: Vec<ClientSummary> = self
            .clients
            .iter()
            .map(|(k, c)| ClientSummary {
                key: *k,
                conn: c.id,
                preferred: c.preferred,
            })
            .collect();
        v.sort_by_key(|c| c.key);
        v
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
}
