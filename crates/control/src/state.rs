//! The server's view of the tailnet, and how changes reach the map sessions.
//!
//! The store (database) is the truth; [`State`] keeps a cache of users and nodes beside
//! it, plus what only lives in memory (who is connected, home DERP). Every mutation goes
//! to the store first, then to the cache, then marks the node IDs it touched. A single
//! rebuild task turns pending changes into a new immutable [`Snapshot`] (compiling the
//! policy once per snapshot, not once per session), coalescing bursts: a registration
//! storm produces a few snapshots, not thousands; the more sessions there are to wake, the
//! further apart snapshots are spaced while changes keep coming ([`min_interval`]).
//! Sessions watch the latest snapshot and ask the snapshot's change log what happened
//! since the version they have seen. A snapshot also carries what sessions share: the
//! serialized peer views (rebuilt only for changed nodes), filters per class and encoded
//! deltas ([`mapper`]).

use crate::limits::Limits;
use crate::mapper::{self, FilterEntry, PeerEntry, ShareKey};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, oneshot, watch};
use tsunagu_policy::{CompiledPolicy, FilterClass, Policy, PolicyNode};
use tsunagu_proto::tailcfg::{CapabilityVersion, DERPMap, DNSConfig};
use tsunagu_store::{Node, Store, StoreError, User};

/// How long the rebuild task waits for more changes before building a snapshot.
const COALESCE: Duration = Duration::from_millis(25);
/// How many versions of change history a snapshot carries; a session further behind
/// recomputes everything.
const LOG_LEN: usize = 4096;
/// Deleted node IDs remembered, so that a copy of the row read before the deletion
/// cannot bring the node back into the cache (a stale write lands within moments).
const TOMBSTONES: usize = 65_536;

/// The least time between two snapshots while changes keep coming: every snapshot wakes
/// every session, so with many sessions, fewer and larger snapshots cost less in total
/// (25 ms plus 60 µs per live session: 325 ms at 5,000, so that waking them all takes
/// a fraction of the time between snapshots). A change after a quiet period is still
/// published after [`COALESCE`].
pub fn min_interval(sessions: usize) -> Duration {
    COALESCE + Duration::from_micros(60).saturating_mul(u32::try_from(sessions).unwrap_or(u32::MAX))
}

/// Full maps allowed in flight at once (built, and not yet written out by HTTP/2): a
/// full map of a big tailnet is megabytes, and a burst of joins would otherwise hold
/// one per joining node.
pub const FULL_MAPS_IN_FLIGHT: usize = 8;

/// A node with what only the server's memory knows.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub node: Node,
    pub online: bool,
    pub home_derp: i32,
    /// The capability version the node last reported (0 until it does): peers read it
    /// as `Node.Cap` (e.g. 26+ means it serves DNS over HTTPS as an exit node).
    pub capver: CapabilityVersion,
}

/// What changed in one version.
#[derive(Debug, Clone)]
pub enum Change {
    Nodes(Arc<BTreeSet<i64>>),
    /// Anything (policy, DERP map): sessions recompute their whole view.
    All,
}

/// An immutable picture of the tailnet.
pub struct Snapshot {
    pub version: u64,
    pub now: DateTime<Utc>,
    pub nodes: BTreeMap<i64, Arc<NodeEntry>>,
    pub users: BTreeMap<i64, User>,
    pub compiled: CompiledPolicy,
    pub derp_map: DERPMap,
    /// MagicDNS suffix of node names.
    pub domain: String,
    /// The tailnet's DNS settings as clients get them (`None`: none sent).
    pub dns: Option<Arc<DNSConfig>>,
    log: Arc<VecDeque<(u64, Change)>>,
    /// Every node as its peers see it, serialized (shared with the previous snapshot for
    /// unchanged nodes).
    pub peers: BTreeMap<i64, Arc<PeerEntry>>,
    /// Packet filters built so far in this snapshot, per class of viewers.
    pub(crate) filters: Mutex<HashMap<FilterClass, Arc<FilterEntry>>>,
    /// Deltas encoded so far in this snapshot (key, compressed) → framed bytes.
    pub(crate) encoded: Mutex<HashMap<(ShareKey, bool), Bytes>>,
}

impl Snapshot {
    /// The node IDs changed after `version`, or `None` when the session must recompute
    /// everything (a policy change, or it fell too far behind).
    pub fn changes_since(&self, version: u64) -> Option<BTreeSet<i64>> {
        if version >= self.version {
            return Some(BTreeSet::new());
        }
        let oldest = self.log.front().map(|(v, _)| *v)?;
        if version + 1 < oldest {
            return None;
        }
        // Versions in the log are consecutive.
        let skip = usize::try_from(version + 1 - oldest).ok()?;
        let mut out = BTreeSet::new();
        for (_, change) in self.log.iter().skip(skip) {
            match change {
                Change::All => return None,
                Change::Nodes(ids) => out.extend(ids.iter().copied()),
            }
        }
        Some(out)
    }
}

struct Inner {
    /// Behind `Arc` so that a snapshot shares unchanged nodes instead of copying them.
    nodes: BTreeMap<i64, Arc<NodeEntry>>,
    users: BTreeMap<i64, User>,
    policy: Arc<Policy>,
    policy_text: Option<String>,
    /// Live map streams per node, oldest first: each stream's ID, the machine it comes
    /// from (a node with standby hosts has several) and what closes it.
    sessions: BTreeMap<i64, VecDeque<(u64, String, oneshot::Sender<()>)>>,
    next_session: u64,
    /// Node keys (`nodekey:…`) of the nodes in the cache.
    by_node_key: HashMap<String, i64>,
    /// Machine keys (`mkey:…`) of the nodes in the cache.
    by_machine_key: HashMap<String, i64>,
    /// Recently deleted node IDs (see [`TOMBSTONES`]).
    removed: HashSet<i64>,
    removed_order: VecDeque<i64>,
    pending: BTreeSet<i64>,
    pending_all: bool,
    version: u64,
    log: VecDeque<(u64, Change)>,
    dns: Option<Arc<DNSConfig>>,
}

/// Shared server state.
pub struct State {
    pub store: Store,
    inner: Mutex<Inner>,
    /// Held for a whole [`State::rebuild`], so that snapshots are published in version
    /// order and a caller that finds nothing pending (because a rebuild in progress took
    /// it) returns only after that rebuild published.
    rebuilding: Mutex<()>,
    dirty: Notify,
    snapshot: watch::Sender<Arc<Snapshot>>,
    derp_map: DERPMap,
    domain: String,
    /// Permits for [`FULL_MAPS_IN_FLIGHT`].
    pub full_maps: Arc<tokio::sync::Semaphore>,
    /// Standby hosts of exit nodes, and which host serves.
    pub standby: crate::standby::Standby,
    /// The server's bounds.
    pub limits: Limits,
    /// Follow-up registration requests waiting on a token, woken when it changes.
    registrations: Mutex<HashMap<String, Arc<Notify>>>,
}

/// A map stream's place among its node's streams (see [`State::session_started`]).
pub struct SessionTicket {
    /// The snapshot version that shows the node online.
    pub ready: u64,
    /// The stream's ID, for [`State::session_ended`].
    pub sid: u64,
    /// Completes (with an error: the sender is dropped) when a newer stream of the same
    /// node closed this one, or when the node was removed.
    pub closed: oneshot::Receiver<()>,
}

/// A follow-up registration's interest in a token; see [`State::registration_waiter`].
pub struct RegistrationWaiter<'a> {
    state: &'a State,
    token: String,
    notify: Arc<Notify>,
}

impl RegistrationWaiter<'_> {
    /// Completes at the next [`State::registration_changed`] of the token after this
    /// call (create it, `enable` it, then read the registration, then await it).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for RegistrationWaiter<'_> {
    fn drop(&mut self) {
        let mut map = self.state.registrations.lock();
        // The map's reference and ours: no one else waits on the token.
        if Arc::strong_count(&self.notify) <= 2 {
            map.remove(&self.token);
        }
    }
}

fn policy_nodes(
    nodes: &BTreeMap<i64, Arc<NodeEntry>>,
    users: &BTreeMap<i64, User>,
) -> Vec<PolicyNode> {
    nodes
        .values()
        .map(|e| policy_node(&e.node, users))
        .collect()
}

/// How the policy sees a node.
pub fn policy_node(n: &Node, users: &BTreeMap<i64, User>) -> PolicyNode {
    PolicyNode {
        id: n.id,
        user: n
            .user_id
            .and_then(|u| users.get(&u))
            .map(|u| u.name.clone()),
        tags: n.tags.clone(),
        ips: vec![n.ipv4.into(), n.ipv6.into()],
        approved_routes: n
            .approved_routes
            .iter()
            .filter(|r| n.advertised_routes.contains(r) && mapper::refused_route(r).is_none())
            .copied()
            .collect(),
    }
}

impl State {
    /// Load everything from the store and build the first snapshot, with MagicDNS on
    /// `domain`, no other DNS settings and the default limits.
    pub async fn load(
        store: Store,
        derp_map: DERPMap,
        domain: String,
    ) -> Result<Arc<State>, StoreError> {
        let dns = crate::dns::DnsSettings {
            base_domain: domain,
            ..crate::dns::DnsSettings::default()
        };
        Self::load_with(store, derp_map, &dns, Limits::default()).await
    }

    /// Load everything from the store and build the first snapshot; node names end in
    /// `dns.base_domain`, every map carries `dns` as its `DNSConfig`, and the server's
    /// `limits` apply.
    pub async fn load_with(
        store: Store,
        derp_map: DERPMap,
        dns: &crate::dns::DnsSettings,
        limits: Limits,
    ) -> Result<Arc<State>, StoreError> {
        let domain = dns.base_domain.clone();
        let dns_config = Some(Arc::new(dns.to_dns_config()));
        let users: BTreeMap<i64, User> = store
            .list_users()
            .await?
            .into_iter()
            .map(|u| (u.id, u))
            .collect();
        let nodes: BTreeMap<i64, Arc<NodeEntry>> = store
            .list_nodes(None)
            .await?
            .into_iter()
            .map(|n| {
                (
                    n.id,
                    Arc::new(NodeEntry {
                        node: n,
                        online: false,
                        home_derp: 0,
                        capver: CapabilityVersion::default(),
                    }),
                )
            })
            .collect();
        let (policy, policy_text) = match store.get_policy().await? {
            Some((text, _)) => match Policy::parse(&text) {
                Ok(p) => (p, Some(text)),
                Err(e) => {
                    tracing::error!(
                        "stored policy does not parse ({e}); serving the default policy"
                    );
                    (Policy::default_policy(), None)
                }
            },
            None => (Policy::default_policy(), None),
        };
        let compiled = policy.compile(&policy_nodes(&nodes, &users));
        let (peers, _) = mapper::update_peers(&BTreeMap::new(), &nodes, None, &domain, 0);
        let first = Snapshot {
            version: 0,
            now: Utc::now(),
            nodes: nodes.clone(),
            users: users.clone(),
            compiled,
            derp_map: derp_map.clone(),
            domain: domain.clone(),
            dns: dns_config.clone(),
            log: Arc::new(VecDeque::new()),
            peers,
            filters: Mutex::default(),
            encoded: Mutex::default(),
        };
        let (tx, _) = watch::channel(Arc::new(first));
        let by_node_key = nodes
            .values()
            .map(|e| (e.node.node_key.clone(), e.node.id))
            .collect();
        let by_machine_key = nodes
            .values()
            .map(|e| (e.node.machine_key.clone(), e.node.id))
            .collect();
        let state = Arc::new(State {
            store,
            inner: Mutex::new(Inner {
                nodes,
                users,
                policy: Arc::new(policy),
                policy_text,
                sessions: BTreeMap::new(),
                next_session: 1,
                by_node_key,
                by_machine_key,
                removed: HashSet::new(),
                removed_order: VecDeque::new(),
                pending: BTreeSet::new(),
                pending_all: false,
                version: 0,
                log: VecDeque::new(),
                dns: dns_config,
            }),
            rebuilding: Mutex::new(()),
            dirty: Notify::new(),
            snapshot: tx,
            derp_map,
            domain,
            full_maps: Arc::new(tokio::sync::Semaphore::new(FULL_MAPS_IN_FLIGHT)),
            standby: crate::standby::Standby::default(),
            limits,
            registrations: Mutex::new(HashMap::new()),
        });
        state.standby.load(&state).await?;
        crate::standby::Standby::start(&state);
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move { rebuild_loop(weak).await });
        Ok(state)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.inner.lock().policy.clone()
    }

    pub fn policy_text(&self) -> Option<String> {
        self.inner.lock().policy_text.clone()
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn users(&self) -> BTreeMap<i64, User> {
        self.inner.lock().users.clone()
    }

    pub fn nodes(&self) -> Vec<NodeEntry> {
        self.inner
            .lock()
            .nodes
            .values()
            .map(|e| (**e).clone())
            .collect()
    }

    pub fn node(&self, id: i64) -> Option<NodeEntry> {
        self.inner.lock().nodes.get(&id).map(|e| (**e).clone())
    }

    fn mark(&self, inner: &mut Inner, id: i64) {
        inner.pending.insert(id);
        self.dirty.notify_one();
    }

    /// Put a node (new or updated, as the store returned it) into the cache, unless the
    /// cache holds a newer copy of the row (a higher version: another request read and
    /// put it after this one read its copy) or the node was deleted meanwhile.
    pub fn upsert_node(&self, node: Node) {
        let mut inner = self.inner.lock();
        let id = node.id;
        if inner.removed.contains(&id) {
            return;
        }
        if let Some(old) = inner.nodes.get(&id) {
            if old.node.version > node.version {
                return;
            }
            if old.node.node_key != node.node_key {
                let old_key = old.node.node_key.clone();
                inner.by_node_key.remove(&old_key);
            }
        }
        let online = inner.sessions.get(&id).is_some_and(|s| !s.is_empty());
        let (home_derp, capver) = inner
            .nodes
            .get(&id)
            .map(|e| (e.home_derp, e.capver))
            .unwrap_or_default();
        inner.by_node_key.insert(node.node_key.clone(), id);
        inner.by_machine_key.insert(node.machine_key.clone(), id);
        inner.nodes.insert(
            id,
            Arc::new(NodeEntry {
                node,
                online,
                home_derp,
                capver,
            }),
        );
        self.mark(&mut inner, id);
    }

    pub fn remove_node(&self, id: i64) {
        let mut inner = self.inner.lock();
        if let Some(e) = inner.nodes.remove(&id) {
            inner.by_node_key.remove(&e.node.node_key);
            inner.by_machine_key.remove(&e.node.machine_key);
        }
        if inner.removed.insert(id) {
            inner.removed_order.push_back(id);
            while inner.removed_order.len() > TOMBSTONES {
                if let Some(old) = inner.removed_order.pop_front() {
                    inner.removed.remove(&old);
                }
            }
        }
        // Its streams end with it.
        inner.sessions.remove(&id);
        self.mark(&mut inner, id);
    }

    /// The node holding `node_key` (`nodekey:…`), from the cache (which every write to
    /// the store goes through, so it knows every node).
    pub fn node_by_node_key(&self, node_key: &str) -> Option<NodeEntry> {
        let inner = self.inner.lock();
        let id = inner.by_node_key.get(node_key)?;
        inner.nodes.get(id).map(|e| (**e).clone())
    }

    /// Whether a node with `machine_key` (`mkey:…`) is in the cache.
    pub fn is_known_machine(&self, machine_key: &str) -> bool {
        self.inner.lock().by_machine_key.contains_key(machine_key)
    }

    /// Whether `node_key` (`nodekey:…`) belongs to a node of the tailnet that may be
    /// online: authorized and not expired (the relay's client check).
    pub fn is_active_node_key(&self, node_key: &str, now: DateTime<Utc>) -> bool {
        let inner = self.inner.lock();
        inner
            .by_node_key
            .get(node_key)
            .and_then(|id| inner.nodes.get(id))
            .is_some_and(|e| is_active(&e.node, now))
    }

    pub fn set_home_derp(&self, id: i64, region: i32) {
        let mut inner = self.inner.lock();
        let changed = match inner.nodes.get_mut(&id).map(Arc::make_mut) {
            Some(e) if e.home_derp != region => {
                e.home_derp = region;
                true
            }
            _ => false,
        };
        if changed {
            self.mark(&mut inner, id);
        }
    }

    /// The capability version a node reported (in a map request).
    pub fn set_capver(&self, id: i64, capver: CapabilityVersion) {
        let mut inner = self.inner.lock();
        let changed = match inner.nodes.get_mut(&id).map(Arc::make_mut) {
            Some(e) if e.capver != capver => {
                e.capver = capver;
                true
            }
            _ => false,
        };
        if changed {
            self.mark(&mut inner, id);
        }
    }

    /// New DNS settings (a reload): every session sends the new `DNSConfig`. The base
    /// domain is fixed for the server's life (node names are built from it).
    pub fn set_dns(&self, dns: &crate::dns::DnsSettings) -> Result<(), String> {
        if dns.base_domain != self.domain {
            return Err(format!(
                "dns.base_domain cannot change while the server runs ({:?} -> {:?}); restart it",
                self.domain, dns.base_domain
            ));
        }
        let mut inner = self.inner.lock();
        inner.dns = Some(Arc::new(dns.to_dns_config()));
        inner.pending_all = true;
        self.dirty.notify_one();
        Ok(())
    }

    pub fn upsert_user(&self, user: User) {
        let mut inner = self.inner.lock();
        inner.users.insert(user.id, user);
        inner.pending_all = true;
        self.dirty.notify_one();
    }

    pub fn remove_user(&self, id: i64) {
        let mut inner = self.inner.lock();
        inner.users.remove(&id);
        inner.pending_all = true;
        self.dirty.notify_one();
    }

    pub fn set_policy(&self, policy: Policy, text: Option<String>) {
        let mut inner = self.inner.lock();
        inner.policy = Arc::new(policy);
        inner.policy_text = text;
        inner.pending_all = true;
        self.dirty.notify_one();
    }

    /// A map stream of `id` started (from an unnamed machine; see
    /// [`State::session_started_from`]).
    pub fn session_started(&self, id: i64) -> SessionTicket {
        self.session_started_from(id, "")
    }

    /// A map stream of `id` from `machine_key` started. Beyond
    /// [`Limits::max_map_streams_per_node`] streams of that machine for that node, the
    /// oldest of them is closed (its ticket's `closed` completes): a client that
    /// reconnects keeps working, one that opens streams in a loop holds a few at most.
    /// Counted per machine because the hosts of an exit node with standby hosts each hold
    /// their own stream for it.
    pub fn session_started_from(&self, id: i64, machine_key: &str) -> SessionTicket {
        let mut inner = self.inner.lock();
        let sid = inner.next_session;
        inner.next_session += 1;
        let (tx, rx) = oneshot::channel();
        let max = self.limits.max_map_streams_per_node.max(1);
        let streams = inner.sessions.entry(id).or_default();
        streams.push_back((sid, machine_key.to_string(), tx));
        let first = streams.len() == 1;
        while streams
            .iter()
            .filter(|(_, mk, _)| mk == machine_key)
            .count()
            > max
        {
            // Dropping the sender closes the machine's oldest stream.
            if let Some(i) = streams.iter().position(|(_, mk, _)| mk == machine_key) {
                streams.remove(i);
            }
        }
        if first && let Some(e) = inner.nodes.get_mut(&id).map(Arc::make_mut) {
            e.online = true;
            self.mark(&mut inner, id);
        }
        let ready = if inner.pending.is_empty() && !inner.pending_all {
            inner.version
        } else {
            inner.version + 1
        };
        SessionTicket {
            ready,
            sid,
            closed: rx,
        }
    }

    /// Number of live map streams.
    pub fn session_count(&self) -> usize {
        self.inner.lock().sessions.values().map(VecDeque::len).sum()
    }

    /// Live map streams of one node.
    pub fn node_session_count(&self, id: i64) -> usize {
        self.inner.lock().sessions.get(&id).map_or(0, VecDeque::len)
    }

    /// The map stream `sid` of `id` ended (or was closed); returns whether the node went
    /// offline.
    pub fn session_ended(&self, id: i64, sid: u64, at: DateTime<Utc>) -> bool {
        let mut inner = self.inner.lock();
        let Some(streams) = inner.sessions.get_mut(&id) else {
            return false;
        };
        let before = streams.len();
        streams.retain(|(s, _, _)| *s != sid);
        if streams.len() == before || !streams.is_empty() {
            return false;
        }
        inner.sessions.remove(&id);
        if let Some(e) = inner.nodes.get_mut(&id).map(Arc::make_mut) {
            e.online = false;
            e.node.last_seen = Some(at);
            self.mark(&mut inner, id);
        }
        true
    }

    pub fn is_online(&self, id: i64) -> bool {
        self.inner
            .lock()
            .sessions
            .get(&id)
            .is_some_and(|s| !s.is_empty())
    }

    /// The snapshot version that will include every change made so far.
    pub fn pending_version(&self) -> u64 {
        let inner = self.inner.lock();
        if inner.pending.is_empty() && !inner.pending_all {
            inner.version
        } else {
            inner.version + 1
        }
    }

    /// The first snapshot at `version` or later, as the rebuild task publishes it; after
    /// `wait` without one, the current snapshot.
    pub async fn snapshot_at_least(&self, version: u64, wait: Duration) -> Arc<Snapshot> {
        let mut rx = self.subscribe();
        let found = tokio::time::timeout(wait, rx.wait_for(|s| s.version >= version)).await;
        match found {
            Ok(Ok(snap)) => snap.clone(),
            _ => self.current(),
        }
    }

    /// [`State::rebuild`] on the blocking pool: compiling the policy of a large tailnet
    /// takes long enough that it must not hold a runtime worker.
    pub async fn rebuild_now(self: &Arc<Self>) {
        let s = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || s.rebuild()).await {
            tracing::error!("rebuilding the snapshot: {e}");
        }
    }

    /// Interest in the registration `token`, to take before reading it: the follow-up
    /// request then sleeps until [`State::registration_changed`] (an admin approved or
    /// expired it) instead of polling the database.
    pub fn registration_waiter(&self, token: &str) -> RegistrationWaiter<'_> {
        let notify = self
            .registrations
            .lock()
            .entry(token.to_string())
            .or_default()
            .clone();
        RegistrationWaiter {
            state: self,
            token: token.to_string(),
            notify,
        }
    }

    /// Wakes the follow-ups waiting on `token` (after it was approved or expired).
    pub fn registration_changed(&self, token: &str) {
        if let Some(n) = self.registrations.lock().get(token) {
            n.notify_waiters();
        }
    }

    /// Follow-up requests waiting on registrations now.
    pub fn registration_waiters(&self) -> usize {
        self.registrations.lock().len()
    }

    /// Build and publish a snapshot of what is pending now (also used by tests to
    /// skip the coalescing delay). On return, the published snapshot includes every
    /// change made before the call.
    pub fn rebuild(&self) {
        let _serial = self.rebuilding.lock();
        let (nodes, users, policy, version, change, log, dns) = {
            let mut inner = self.inner.lock();
            if inner.pending.is_empty() && !inner.pending_all {
                return;
            }
            inner.version += 1;
            let change = if std::mem::take(&mut inner.pending_all) {
                inner.pending.clear();
                Change::All
            } else {
                Change::Nodes(Arc::new(std::mem::take(&mut inner.pending)))
            };
            let version = inner.version;
            inner.log.push_back((version, change.clone()));
            while inner.log.len() > LOG_LEN {
                inner.log.pop_front();
            }
            (
                inner.nodes.clone(),
                inner.users.clone(),
                inner.policy.clone(),
                version,
                change,
                Arc::new(inner.log.clone()),
                inner.dns.clone(),
            )
        };
        let compiled = policy.compile(&policy_nodes(&nodes, &users));
        let changed = match &change {
            Change::Nodes(ids) => Some(&**ids),
            Change::All => None,
        };
        let prev = self.snapshot.borrow().clone();
        let (peers, moved) =
            mapper::update_peers(&prev.peers, &nodes, changed, &self.domain, version);
        drop(prev);
        let log = if moved.is_empty() {
            log
        } else {
            // Routers whose routes moved changed too: sessions must resend them.
            let mut inner = self.inner.lock();
            if let Some((v, Change::Nodes(ids))) = inner.log.back_mut()
                && *v == version
            {
                let mut all = (**ids).clone();
                all.extend(moved);
                *ids = Arc::new(all);
            }
            Arc::new(inner.log.clone())
        };
        let snap = Snapshot {
            version,
            now: Utc::now(),
            nodes,
            users,
            compiled,
            derp_map: self.derp_map.clone(),
            domain: self.domain.clone(),
            dns,
            log,
            peers,
            filters: Mutex::default(),
            encoded: Mutex::default(),
        };
        self.snapshot.send_replace(Arc::new(snap));
    }
}

/// Rebuilds snapshots while the state is alive (it holds a weak reference between
/// rounds, so dropping the last `Arc<State>` ends it at the next change).
async fn rebuild_loop(state: std::sync::Weak<State>) {
    let mut last = tokio::time::Instant::now();
    loop {
        {
            let Some(s) = state.upgrade() else { return };
            s.dirty.notified().await;
        }
        let interval = match state.upgrade() {
            Some(s) => min_interval(s.session_count()),
            None => return,
        };
        let at = (tokio::time::Instant::now() + COALESCE).max(last + interval);
        tokio::time::sleep_until(at).await;
        let Some(s) = state.upgrade() else { return };
        s.rebuild_now().await;
        drop(s);
        last = tokio::time::Instant::now();
    }
}

/// Whether `node` may be shown to anyone: authorized and not expired.
pub fn is_active(n: &Node, now: DateTime<Utc>) -> bool {
    n.authorized && !n.is_expired(now)
}

pub use mapper::TAGGED_DEVICES_LOGIN;
