//! Standby hosts of an exit node: one identity (node key, tailnet addresses, name) held
//! by several tsunagud hosts, each with its own machine key and control session; members
//! see one peer, with the endpoints, home relay and disco key of the *active* host.
//!
//! ```text
//!  admin: nodes standby add NODE ──► single-use key (store, hashed)
//!  host B: register with the key ──► redeemed (store), B joins the group; the server asks
//!        the active host (its map stream: TsunaguStandby.Handover) to post the identity's
//!        key (POST /machine/tsunagu/handover, Noise); B's registration answer carries it
//!        (RegisterResponse.TsunaguStandby), B stores it and registers as the identity
//!  every host: map stream as the identity, plus its role (TsunaguStandby.Role); reports
//!        (endpoints, disco key, hostinfo) of hosts other than the published one are kept
//!        here, in memory, not in the node's row
//!  monitor (every 250 ms, and on every change): what each host looks like (map streams,
//!        relay connection, report) ──► core::Switcher ──► Switch
//!  a switch: (a) roles out to the hosts (the old one stops answering at once); (b) wait,
//!        bounded, until the new one says it is active and the old one that it stands by
//!        (or is gone); (c) the relay delivers the identity's packets to the new host, the
//!        node's row takes the new host's endpoints, disco key and home relay, the store
//!        records the active host, and the snapshot goes out to the members at once
//! ```
//!
//! Members' clients see the identity's disco key change with its endpoints; official
//! clients then drop their WireGuard session with it (Tailscale's `ResetDevicePeer`) and
//! handshake afresh with the new host on their next packet, and so does tsunagud.

pub mod core;

use crate::state::State;
use core::{Config, FailoverError, Health, HostId, Switch, Switcher};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tsunagu_proto::tailcfg::{
    HostReport, HostRole, Hostinfo, StandbyHostView, StandbyInfo, SwitchRecord, Time,
};
use tsunagu_proto::{NodePrivate, NodePublic};
use tsunagu_store::{Node, StandbyHost, StoreError};

/// How often the monitor looks at every host (relay connections are polled).
const TICK: Duration = Duration::from_millis(250);
/// How long a switch waits for the new host to say it is active.
const ACK_NEW: Duration = Duration::from_secs(2);
/// How long a switch waits for the old host to say it stands by (when it is online).
const ACK_OLD: Duration = Duration::from_secs(1);
/// In a planned switch, how long the old host may wait for a moment when no member's
/// connection through or to it is mid-exchange before it stands by
/// (`StandbyInfo.wind_down_ms`).
pub const WIND_DOWN: Duration = Duration::from_secs(2);
/// A handed-over key is kept this long for the standby host that waits for it.
const HANDOVER_TTL: Duration = Duration::from_secs(60);
/// Switches remembered per node (for `nodes standby list`).
const SWITCHES_KEPT: usize = 10;
/// After the server starts, hosts reconnect at their own pace (tsunagud backs off up to
/// 30 s while the server was away): the active host counts as gone only from this long
/// after the start, so that a standby that happens to reconnect first does not take
/// over from a host that is serving members all along.
const STARTUP_GRACE: Duration = Duration::from_secs(30);

/// What a host reported about itself (the parts that members see when it is active).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub endpoints: Option<Vec<String>>,
    /// `discokey:<hex>`
    pub disco: Option<String>,
    pub hostinfo: Option<Hostinfo>,
    pub host: Option<HostReport>,
}

/// Whether a report goes into the node's row (the host is the one members see) or stays
/// here (another host of the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Publish,
    Hold,
}

/// A node with standby hosts, as the admin sees it (`nodes standby list`, `nodes list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyView {
    pub node: i64,
    /// The node's name.
    pub name: String,
    /// The active host's hostname.
    pub active: String,
    pub hosts: Vec<StandbyHostView>,
    pub last_switch: Option<SwitchRecord>,
    /// Recent switches, oldest first.
    #[serde(default)]
    pub switches: Vec<SwitchRecord>,
}

#[derive(Debug, Default)]
struct Host {
    name: String,
    sessions: usize,
    report: Report,
    /// The role the host said it put in force.
    acked: Option<HostRole>,
}

#[derive(Debug)]
struct Group {
    name: String,
    key: NodePublic,
    hosts: BTreeMap<String, Host>,
    /// The host whose report is in the node's row (and whose connection gets the
    /// identity's packets at the relay).
    published: String,
    switches: VecDeque<SwitchRecord>,
    handover_wanted: bool,
    /// A planned switch in its first step: this old host winds down and stands by
    /// before the new one (the core's active host already) is told it is active.
    winding: Option<String>,
}

struct Inner {
    core: Switcher,
    groups: BTreeMap<i64, Group>,
    /// Machine key of a standby host → its node.
    by_machine: HashMap<String, i64>,
    watch: HashMap<i64, watch::Sender<u64>>,
    handover: HashMap<i64, (NodePrivate, Instant)>,
    /// Fingerprints of what hosts were last told, per node.
    told: HashMap<i64, String>,
    /// Map streams per (node, machine), of every node: a node's own machine has streams
    /// before its first standby host enrols.
    sessions: HashMap<(i64, String), usize>,
}

/// The standby hosts of every node, and their switching (part of [`State`]).
pub struct Standby {
    inner: Mutex<Inner>,
    relay: OnceLock<Arc<tsunagu_derp::Relay>>,
    /// Something changed that the monitor should look at now.
    changed: Notify,
    /// A host said which role it put in force, or handed a key over.
    acks: Notify,
    /// One switch at a time (the monitor's and the admin's).
    switching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby").finish_non_exhaustive()
    }
}

fn exit_routes(hi: &Hostinfo) -> bool {
    hi.routable_ips
        .iter()
        .filter(|r| r.prefix_len() == 0)
        .count()
        == 2
}

/// Why `node` cannot have standby hosts: only tagged, approved exit nodes, run by
/// tsunagud (which hands its key over and stands by on demand).
pub fn eligible(node: &Node) -> Result<(), String> {
    let name = &node.given_name;
    if node.tags.is_empty() {
        return Err(format!(
            "{name} is not tagged: only tagged exit nodes can have standby hosts (tsunagu-server nodes tag {name} tag:exit)"
        ));
    }
    let approved = |r: &ipnet::IpNet| r.prefix_len() == 0 && node.advertised_routes.contains(r);
    if node.approved_routes.iter().filter(|r| approved(r)).count() != 2 {
        return Err(format!(
            "{name} is not an approved exit node: only approved exit nodes can have standby hosts"
        ));
    }
    if node.hostinfo.get("App").and_then(|a| a.as_str()) != Some(crate::standby::TSUNAGUD_APP) {
        return Err(format!(
            "{name} does not run tsunagud: standby hosts need tsunagud on the exit node (it hands its key over and stands by)"
        ));
    }
    if node.user_id.is_some() {
        return Err(format!(
            "{name} is owned by a user: only tagged exit nodes can have standby hosts"
        ));
    }
    Ok(())
}

/// `Hostinfo.App` of tsunagud.
pub const TSUNAGUD_APP: &str = "tsunagud";

impl Default for Standby {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl Standby {
    pub fn new(cfg: Config) -> Self {
        Standby {
            inner: Mutex::new(Inner {
                core: Switcher::new(cfg),
                groups: BTreeMap::new(),
                by_machine: HashMap::new(),
                watch: HashMap::new(),
                handover: HashMap::new(),
                told: HashMap::new(),
                sessions: HashMap::new(),
            }),
            relay: OnceLock::new(),
            changed: Notify::new(),
            acks: Notify::new(),
            switching: tokio::sync::Mutex::new(()),
        }
    }

    /// The server's relay: hosts need a connection to it to be ready, and it delivers
    /// the identity's packets to the active host only.
    pub fn set_relay(&self, relay: Arc<tsunagu_derp::Relay>) {
        let _ = self.relay.set(relay.clone());
        let inner = self.inner.lock();
        for g in inner.groups.values() {
            relay.set_active_host(g.key, Some(&g.published));
        }
    }

    /// Without a relay a host is ready without a relay connection.
    pub fn set_config(&self, cfg: Config) {
        let mut inner = self.inner.lock();
        let groups: Vec<(i64, Vec<HostId>, HostId)> = inner
            .groups
            .iter()
            .map(|(n, g)| {
                (
                    *n,
                    g.hosts.keys().map(|k| HostId(k.clone())).collect(),
                    HostId(g.published.clone()),
                )
            })
            .collect();
        inner.core = Switcher::new(cfg);
        let now = Instant::now() + STARTUP_GRACE;
        for (n, hosts, active) in groups {
            inner.core.set_hosts(n, &hosts, &active, now);
        }
    }

    /// Build the groups from the store: nodes with standby hosts, their active hosts.
    pub async fn load(&self, state: &State) -> Result<(), StoreError> {
        let hosts = state.store.list_standby_hosts(None).await?;
        let active: HashMap<i64, String> = state
            .store
            .list_standby_active()
            .await?
            .into_iter()
            .map(|a| (a.node_id, a.machine_key))
            .collect();
        let mut by_node: BTreeMap<i64, Vec<StandbyHost>> = BTreeMap::new();
        for h in hosts {
            by_node.entry(h.node_id).or_default().push(h);
        }
        let now = Instant::now() + STARTUP_GRACE;
        let mut inner = self.inner.lock();
        for (node_id, hosts) in by_node {
            let Some(entry) = state.node(node_id) else {
                continue;
            };
            let n = entry.node;
            let published = active
                .get(&node_id)
                .filter(|mk| **mk == n.machine_key || hosts.iter().any(|h| h.machine_key == **mk))
                .cloned()
                .unwrap_or_else(|| n.machine_key.clone());
            let mut g = Group {
                name: n.given_name.clone(),
                key: n.node_key.parse().unwrap_or_default(),
                hosts: BTreeMap::new(),
                published: published.clone(),
                switches: VecDeque::new(),
                handover_wanted: false,
                winding: None,
            };
            g.hosts.insert(
                n.machine_key.clone(),
                Host {
                    name: n.hostname.clone(),
                    ..Host::default()
                },
            );
            for h in hosts {
                inner.by_machine.insert(h.machine_key.clone(), node_id);
                g.hosts.insert(
                    h.machine_key.clone(),
                    Host {
                        name: h.hostname.clone(),
                        ..Host::default()
                    },
                );
            }
            // The row holds the published host's last report.
            if let Some(h) = g.hosts.get_mut(&published) {
                h.report = row_report(&n);
            }
            let ids: Vec<HostId> = g.hosts.keys().map(|k| HostId(k.clone())).collect();
            inner.core.set_hosts(node_id, &ids, &HostId(published), now);
            inner.groups.insert(node_id, g);
        }
        Ok(())
    }

    /// Run the monitor while `state` lives.
    pub fn start(state: &Arc<State>) {
        let weak = Arc::downgrade(state);
        tokio::spawn(async move { monitor(weak).await });
    }

    /// The node whose standby host `machine_key` is.
    pub fn host_node(&self, machine_key: &str) -> Option<i64> {
        self.inner.lock().by_machine.get(machine_key).copied()
    }

    /// Whether `machine_key` is a standby host of `node`.
    pub fn is_host(&self, node: i64, machine_key: &str) -> bool {
        self.host_node(machine_key) == Some(node)
    }

    /// Whether `node` has standby hosts.
    pub fn in_group(&self, node: i64) -> bool {
        self.inner.lock().groups.contains_key(&node)
    }

    /// Changes for the map streams of `node`'s hosts (role, hosts, membership).
    pub fn subscribe(&self, node: i64) -> watch::Receiver<u64> {
        self.inner
            .lock()
            .watch
            .entry(node)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn bump(inner: &mut Inner, node: i64) {
        if let Some(w) = inner.watch.get(&node) {
            w.send_modify(|v| *v += 1);
        }
    }

    pub fn session_started(&self, node: i64, machine_key: &str) {
        let mut inner = self.inner.lock();
        *inner
            .sessions
            .entry((node, machine_key.to_string()))
            .or_insert(0) += 1;
        if let Some(h) = inner
            .groups
            .get_mut(&node)
            .and_then(|g| g.hosts.get_mut(machine_key))
        {
            h.sessions += 1;
            self.changed.notify_one();
        }
    }

    pub fn session_ended(&self, node: i64, machine_key: &str) {
        let mut inner = self.inner.lock();
        let k = (node, machine_key.to_string());
        if let Some(n) = inner.sessions.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.sessions.remove(&k);
            }
        }
        if let Some(h) = inner
            .groups
            .get_mut(&node)
            .and_then(|g| g.hosts.get_mut(machine_key))
        {
            h.sessions = h.sessions.saturating_sub(1);
            if h.sessions == 0 {
                h.acked = None;
            }
            self.changed.notify_one();
            self.acks.notify_waiters();
        }
    }

    /// A host of `node` reported (a map update, or the hostinfo of a registration).
    /// `Publish`: it is the host members see, and the report goes into the node's row as
    /// for any node; `Hold`: kept here until the host becomes active.
    pub fn on_report(&self, node: i64, machine_key: &str, r: Report) -> Outcome {
        let relay = self.relay.get().cloned();
        let mut inner = self.inner.lock();
        let Inner { core, groups, .. } = &mut *inner;
        let Some(g) = groups.get_mut(&node) else {
            return Outcome::Publish;
        };
        let key = g.key;
        let Some(h) = g.hosts.get_mut(machine_key) else {
            return Outcome::Hold;
        };
        if r.endpoints.is_some() {
            h.report.endpoints = r.endpoints;
        }
        if r.disco.is_some() {
            h.report.disco = r.disco;
        }
        if r.hostinfo.is_some() {
            h.report.hostinfo = r.hostinfo;
        }
        if let Some(hr) = r.host {
            if hr.role.is_some() && hr.role != h.acked {
                h.acked = hr.role;
                self.acks.notify_waiters();
            }
            h.report.host = Some(hr);
        }
        let health = health_of(h, relay.as_deref(), &key, machine_key);
        let id = HostId(machine_key.to_string());
        core.observe(node, &id, health, Instant::now());
        self.changed.notify_one();
        let active = core.active(node).is_some_and(|a| a.0 == machine_key);
        if active && g.published == machine_key {
            Outcome::Publish
        } else {
            Outcome::Hold
        }
    }

    /// What the map stream of host `machine_key` of `node` should carry, if the node has
    /// standby hosts.
    pub fn info_for(&self, node: i64, machine_key: &str) -> Option<StandbyInfo> {
        let inner = self.inner.lock();
        let g = inner.groups.get(&node)?;
        let active = inner.core.active(node)?;
        // Never two at once: while the old host winds down, every host stands by (the
        // new one hears it is active only once the old one said it stands by).
        let (role, wind_down) = match &g.winding {
            Some(from) if from == machine_key => (HostRole::Standby, WIND_DOWN),
            None if active.0 == machine_key => (HostRole::Active, Duration::ZERO),
            _ => (HostRole::Standby, Duration::ZERO),
        };
        Some(StandbyInfo {
            identity: g.name.clone(),
            role,
            hosts: host_views(&inner, node, g),
            last_switch: g.switches.back().cloned(),
            // Every host holds the key; the first to post it wins.
            handover: g.handover_wanted,
            wind_down_ms: u32::try_from(wind_down.as_millis()).unwrap_or(u32::MAX),
        })
    }

    /// A host wants the identity's key: ask the hosts that hold it, and wait (at most
    /// `within`) for one to hand it over.
    pub async fn wait_handover(&self, node: i64, within: Duration) -> Option<NodePrivate> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let acked = self.acks.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            {
                let mut inner = self.inner.lock();
                if let Some((k, at)) = inner.handover.get(&node)
                    && at.elapsed() < HANDOVER_TTL
                {
                    return Some(k.clone());
                }
                let g = inner.groups.get_mut(&node)?;
                if !g.handover_wanted {
                    g.handover_wanted = true;
                    Self::bump(&mut inner, node);
                }
            }
            if tokio::time::timeout_at(deadline, acked).await.is_err() {
                return None;
            }
        }
    }

    /// A host of `node` (`machine_key`: its own machine or a standby host) posts the
    /// identity's private key.
    pub fn offer_handover(
        &self,
        node: i64,
        machine_key: &str,
        key: NodePrivate,
    ) -> Result<(), &'static str> {
        let mut inner = self.inner.lock();
        let g = inner
            .groups
            .get_mut(&node)
            .ok_or("the node has no standby hosts")?;
        if !g.hosts.contains_key(machine_key) {
            return Err("this machine is not a host of the node");
        }
        if key.public() != g.key {
            return Err("the key is not the node's");
        }
        if !g.handover_wanted {
            return Err("no standby host waits for the key");
        }
        g.handover_wanted = false;
        inner.handover.insert(node, (key, Instant::now()));
        Self::bump(&mut inner, node);
        tracing::info!(node, "identity key handed over for a standby host");
        self.acks.notify_waiters();
        Ok(())
    }

    /// The standby host that now holds the key registered as the node: forget the key.
    pub fn handover_done(&self, node: i64) {
        self.inner.lock().handover.remove(&node);
    }

    /// A host enrolled (its row is in the store): the node gets or grows its group.
    pub fn add_host(&self, node: &Node, host: &StandbyHost) {
        let relay = self.relay.get().cloned();
        let mut inner = self.inner.lock();
        inner.by_machine.insert(host.machine_key.clone(), node.id);
        let streams = |inner: &Inner, mk: &str| {
            inner
                .sessions
                .get(&(node.id, mk.to_string()))
                .copied()
                .unwrap_or(0)
        };
        let own_sessions = streams(&inner, &node.machine_key);
        let host_sessions = streams(&inner, &host.machine_key);
        let g = inner.groups.entry(node.id).or_insert_with(|| Group {
            name: node.given_name.clone(),
            key: node.node_key.parse().unwrap_or_default(),
            hosts: BTreeMap::from([(
                node.machine_key.clone(),
                Host {
                    name: node.hostname.clone(),
                    sessions: own_sessions,
                    report: row_report(node),
                    acked: None,
                },
            )]),
            published: node.machine_key.clone(),
            switches: VecDeque::new(),
            handover_wanted: false,
            winding: None,
        });
        g.hosts
            .entry(host.machine_key.clone())
            .or_insert_with(|| Host {
                name: host.hostname.clone(),
                sessions: host_sessions,
                ..Host::default()
            });
        let ids: Vec<HostId> = g.hosts.keys().map(|k| HostId(k.clone())).collect();
        let (key, published) = (g.key, g.published.clone());
        inner
            .core
            .set_hosts(node.id, &ids, &HostId(published.clone()), Instant::now());
        if let Some(r) = relay {
            r.set_active_host(key, Some(&published));
        }
        tracing::info!(node = node.id, name = %node.given_name, host = %host.hostname, "standby host added");
        Self::bump(&mut inner, node.id);
        self.changed.notify_one();
    }

    /// The node is gone (deleted).
    pub fn node_removed(&self, node: i64) {
        let relay = self.relay.get().cloned();
        let mut inner = self.inner.lock();
        if let Some(g) = inner.groups.remove(&node)
            && let Some(r) = relay
        {
            r.set_active_host(g.key, None);
        }
        inner.by_machine.retain(|_, n| *n != node);
        inner.core.remove_group(node);
        Self::bump(&mut inner, node);
    }

    /// The node's group, as the admin sees it.
    pub fn view(&self, node: i64) -> Option<StandbyView> {
        let inner = self.inner.lock();
        let g = inner.groups.get(&node)?;
        let active = inner.core.active(node)?;
        Some(StandbyView {
            node,
            name: g.name.clone(),
            active: g
                .hosts
                .get(&active.0)
                .map(|h| h.name.clone())
                .unwrap_or_default(),
            hosts: host_views(&inner, node, g),
            last_switch: g.switches.back().cloned(),
            switches: g.switches.iter().cloned().collect(),
        })
    }

    /// Every node with standby hosts.
    pub fn views(&self) -> Vec<StandbyView> {
        let nodes: Vec<i64> = self.inner.lock().groups.keys().copied().collect();
        nodes.into_iter().filter_map(|n| self.view(n)).collect()
    }

    /// The host of `node` named `name` (hostname or machine key).
    pub fn find_host(&self, node: i64, name: &str) -> Option<String> {
        let inner = self.inner.lock();
        let g = inner.groups.get(&node)?;
        g.hosts
            .iter()
            .find(|(mk, h)| mk.as_str() == name || h.name == name)
            .map(|(mk, _)| mk.clone())
    }

    /// The admin asks for a switch of `node` (to `to`, a machine key, or the best ready
    /// standby). Returns once members are told.
    pub async fn failover(
        &self,
        state: &Arc<State>,
        node: i64,
        to: Option<&str>,
    ) -> Result<SwitchRecord, FailoverError> {
        let _one = self.switching.lock().await;
        let sw = {
            let mut inner = self.inner.lock();
            let to = to.map(|t| HostId(t.to_string()));
            let sw = inner.core.failover(node, to.as_ref(), Instant::now())?;
            Self::begin(&mut inner, &sw);
            sw
        };
        Ok(self.perform(state, sw).await)
    }

    /// A standby host was removed from the store: its sessions end, its relay connection
    /// closes, and if it was active another host takes the role at once.
    pub async fn remove_host(&self, state: &Arc<State>, node: i64, machine_key: &str) {
        let relay = self.relay.get().cloned();
        let _one = self.switching.lock().await;
        let (events, key) = {
            let mut inner = self.inner.lock();
            inner.by_machine.remove(machine_key);
            let Some(g) = inner.groups.get_mut(&node) else {
                return;
            };
            g.hosts.remove(machine_key);
            let key = g.key;
            let ids: Vec<HostId> = g.hosts.keys().map(|k| HostId(k.clone())).collect();
            let published = HostId(g.published.clone());
            let last = ids.len() <= 1;
            inner.core.set_hosts(node, &ids, &published, Instant::now());
            let events = Self::take_switches(&mut inner);
            if last && events.is_empty() {
                // The node's own machine is left: no group any more.
                inner.groups.remove(&node);
                inner.core.remove_group(node);
                if let Some(r) = &relay {
                    r.set_active_host(key, None);
                }
            }
            Self::bump(&mut inner, node);
            (events, key)
        };
        if let Some(r) = &relay {
            r.close_host(&key, machine_key);
        }
        tracing::info!(node, host = %machine_key, "standby host removed");
        for sw in events {
            self.perform(state, sw).await;
        }
        // A switch away from the removed host leaves a group of one.
        let mut inner = self.inner.lock();
        if inner.groups.get(&node).is_some_and(|g| g.hosts.len() <= 1) {
            inner.groups.remove(&node);
            inner.core.remove_group(node);
            if let Some(r) = &relay {
                r.set_active_host(key, None);
            }
            Self::bump(&mut inner, node);
        }
    }

    /// The switches the core decided, each begun ([`Self::begin`]).
    fn take_switches(inner: &mut Inner) -> Vec<Switch> {
        let mut out = Vec::new();
        while let Some(sw) = inner.core.poll_event() {
            Self::begin(inner, &sw);
            out.push(sw);
        }
        out
    }

    /// A switch the core just decided, under the same lock: a planned one starts with
    /// the old host winding down, so that no role message sent before [`Self::perform`]
    /// runs (the core has switched already) tells the new host it is active.
    fn begin(inner: &mut Inner, sw: &Switch) {
        if sw.reason.planned()
            && let Some(g) = inner.groups.get_mut(&sw.node)
        {
            g.winding = Some(sw.from.0.clone());
        }
    }

    /// Carry out a switch the core decided (see the module's diagram); returns the
    /// record of it.
    async fn perform(&self, state: &Arc<State>, sw: Switch) -> SwitchRecord {
        let started = Instant::now();
        let node = sw.node;
        // (a) roles out: `info_for` follows the core, which has switched already.
        // (b) the new host active, the old one standing by (or gone), bounded. A planned
        // switch goes one host after the other: the old host first stands by, at a
        // quiet moment of what it forwards (at most `WIND_DOWN` away), and only then is
        // the new one told. Otherwise (the old host is gone, or removed) both at once.
        // (A planned switch's winding began with it, in [`Self::begin`].)
        {
            let mut inner = self.inner.lock();
            Self::bump(&mut inner, node);
        }
        let (new_ok, old_ok) = if sw.reason.planned() {
            let old_ok = self
                .wait_ack(node, &sw.from.0, HostRole::Standby, WIND_DOWN + ACK_OLD)
                .await;
            self.end_winding(node);
            let new_ok = self
                .wait_ack(node, &sw.to.0, HostRole::Active, ACK_NEW)
                .await;
            (new_ok, old_ok)
        } else {
            let new_ok = self
                .wait_ack(node, &sw.to.0, HostRole::Active, ACK_NEW)
                .await;
            let old_ok = self
                .wait_ack(node, &sw.from.0, HostRole::Standby, ACK_OLD)
                .await;
            (new_ok, old_ok)
        };
        if !new_ok {
            tracing::warn!(node, host = %sw.to, "the new active host did not confirm its role in time; switching anyway");
        }
        if !old_ok {
            tracing::warn!(node, host = %sw.from, "the old host did not confirm it stands by in time");
        }
        // (c) members: relay, node row, store, snapshot.
        let (key, report, from_name, to_name, name) = {
            let inner = self.inner.lock();
            let Some(g) = inner.groups.get(&node) else {
                return record(&sw, "", "");
            };
            let host = |mk: &str| {
                g.hosts
                    .get(mk)
                    .map(|h| h.name.clone())
                    .unwrap_or_else(|| mk.to_string())
            };
            (
                g.key,
                g.hosts
                    .get(&sw.to.0)
                    .map(|h| h.report.clone())
                    .unwrap_or_default(),
                host(&sw.from.0),
                host(&sw.to.0),
                g.name.clone(),
            )
        };
        if let Some(r) = self.relay.get() {
            r.set_active_host(key, Some(&sw.to.0));
        }
        let rec = record(&sw, &from_name, &to_name);
        if let Err(e) = publish(state, node, &report).await {
            tracing::error!(node, "publishing the new active host: {e}");
        }
        if let Err(e) = state
            .store
            .set_standby_active(node, &sw.to.0, &sw.from.0, &rec.reason, rec.at.0)
            .await
        {
            tracing::error!(node, "recording the active host: {e}");
        }
        {
            let mut inner = self.inner.lock();
            if let Some(g) = inner.groups.get_mut(&node) {
                g.published = sw.to.0.clone();
                g.switches.push_back(rec.clone());
                while g.switches.len() > SWITCHES_KEPT {
                    g.switches.pop_front();
                }
            }
            Self::bump(&mut inner, node);
        }
        state.rebuild();
        tracing::info!(
            node,
            name = %name,
            from = %from_name,
            to = %to_name,
            reason = %rec.reason,
            took_ms = started.elapsed().as_millis() as u64,
            "exit node switched to another host"
        );
        rec
    }

    /// Ends the first step of a planned switch of `node`, and tells the hosts.
    fn end_winding(&self, node: i64) {
        let mut inner = self.inner.lock();
        if let Some(g) = inner.groups.get_mut(&node) {
            g.winding = None;
        }
        Self::bump(&mut inner, node);
    }

    /// Wait (at most `within`) until host `mk` of `node` says it put `role` in force, or
    /// (for the standby role) until it is gone.
    async fn wait_ack(&self, node: i64, mk: &str, role: HostRole, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let relay = self.relay.get().cloned();
        loop {
            let acked = self.acks.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            {
                let inner = self.inner.lock();
                let Some(g) = inner.groups.get(&node) else {
                    return role == HostRole::Standby;
                };
                let Some(h) = g.hosts.get(mk) else {
                    return role == HostRole::Standby;
                };
                // Gone: no map stream and no relay connection. A host that is only
                // between two map streams (it opens a new one when its offer changes, as
                // in a drain) is still there and serving: wait for its word.
                let gone = h.sessions == 0
                    && !relay
                        .as_deref()
                        .is_some_and(|r| r.host_connected(&g.key, mk));
                if h.acked == Some(role) || (role == HostRole::Standby && gone) {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, acked).await.is_err() {
                return false;
            }
        }
    }

    /// One look at every host: feed the core, tell hosts what changed. Returns the
    /// switches to carry out.
    fn observe_all(&self, now: Instant) -> Vec<Switch> {
        let relay = self.relay.get().cloned();
        let mut inner = self.inner.lock();
        let Inner {
            core,
            groups,
            handover,
            ..
        } = &mut *inner;
        handover.retain(|_, (_, at)| at.elapsed() < HANDOVER_TTL);
        for (node, g) in groups.iter() {
            for (mk, h) in &g.hosts {
                let health = health_of(h, relay.as_deref(), &g.key, mk);
                if core.health(*node, &HostId(mk.clone())) != Some(health) {
                    core.observe(*node, &HostId(mk.clone()), health, now);
                }
            }
        }
        core.handle_timeout(now);
        let out = Self::take_switches(&mut inner);
        // Hosts hear when the others come and go (their `status` shows it).
        let nodes: Vec<i64> = inner.groups.keys().copied().collect();
        for node in nodes {
            let fp = inner
                .groups
                .get(&node)
                .map(|g| format!("{:?}", host_views(&inner, node, g)))
                .unwrap_or_default();
            if inner.told.get(&node) != Some(&fp) {
                inner.told.insert(node, fp);
                Self::bump(&mut inner, node);
            }
        }
        out
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let t = self
            .inner
            .lock()
            .core
            .poll_timeout()
            .map_or(now + TICK, |(t, _)| t);
        t.clamp(now, now + TICK)
    }
}

/// What the node's row says: the report of the host that is published.
fn row_report(n: &Node) -> Report {
    Report {
        endpoints: Some(n.endpoints.clone()),
        disco: (!n.disco_key.is_empty()).then(|| n.disco_key.clone()),
        hostinfo: serde_json::from_value(n.hostinfo.clone()).ok(),
        host: None,
    }
}

fn record(sw: &Switch, from: &str, to: &str) -> SwitchRecord {
    SwitchRecord {
        at: Time(chrono::Utc::now()),
        from: from.to_string(),
        to: to.to_string(),
        reason: sw.reason.to_string(),
    }
}

fn health_of(h: &Host, relay: Option<&tsunagu_derp::Relay>, key: &NodePublic, mk: &str) -> Health {
    Health {
        sessions: h.sessions,
        relay: relay.is_some_and(|r| r.host_connected(key, mk)),
        offers_exit: h.report.hostinfo.as_ref().is_some_and(exit_routes),
        disco: h.report.disco.as_ref().is_some_and(|d| !d.is_empty()),
        prefer: h.report.host.is_some_and(|r| r.prefer),
    }
}

fn host_views(inner: &Inner, node: i64, g: &Group) -> Vec<StandbyHostView> {
    let relay = inner.core.config().relay;
    let active = inner.core.active(node);
    g.hosts
        .iter()
        .map(|(mk, h)| {
            let health = inner
                .core
                .health(node, &HostId(mk.clone()))
                .unwrap_or_default();
            StandbyHostView {
                name: h.name.clone(),
                machine_key: mk.clone(),
                active: active.is_some_and(|a| a.0 == *mk),
                online: h.sessions > 0,
                ready: core::not_ready(&health, relay).is_none(),
                not_ready: core::not_ready(&health, relay)
                    .unwrap_or_default()
                    .to_string(),
                prefer: health.prefer,
            }
        })
        .collect()
}

/// The new active host's report into the node's row, as a report of the node itself:
/// endpoints, disco key, hostinfo (with the node's hostname, so that members see the same
/// peer), home relay.
async fn publish(state: &State, node: i64, r: &Report) -> Result<(), StoreError> {
    let Some(entry) = state.node(node) else {
        return Ok(());
    };
    let hostinfo = r.hostinfo.clone().map(|mut hi| {
        hi.hostname.clone_from(&entry.node.hostname);
        hi
    });
    crate::machine::write_report(
        state,
        node,
        r.endpoints.as_deref(),
        r.disco.as_deref(),
        hostinfo.as_ref(),
    )
    .await
}

/// Looks at every host every [`TICK`] (relay connections have no events) and at once
/// when something changed; carries out the switches the core decides.
async fn monitor(state: Weak<State>) {
    loop {
        let wake = {
            // Held for at most one tick: a dropped state ends the loop at the next.
            let Some(s) = state.upgrade() else { return };
            let t = s.standby.next_wake(Instant::now());
            let changed = s.standby.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            tokio::select! {
                _ = tokio::time::sleep_until(t.into()) => {}
                _ = changed => {}
            }
            Instant::now()
        };
        let Some(s) = state.upgrade() else { return };
        let _one = s.standby.switching.lock().await;
        for sw in s.standby.observe_all(wake) {
            tracing::info!(node = sw.node, from = %sw.from, to = %sw.to, reason = %sw.reason, "switching the exit node's active host");
            s.standby.perform(&s, sw).await;
        }
    }
}
