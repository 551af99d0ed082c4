//! This host as one of the hosts of an exit node with standby hosts.
//!
//! Several tsunagud hosts may hold one exit node's identity (node key, addresses, name);
//! members see one peer, and the server shows them the active host only. A host learns
//! its role on its map stream (`TsunaguStandby`, in the first message and whenever it
//! changes) and puts it in force at once: standing by, the data plane answers nothing
//! and sends nothing (routes, NAT and peers stay ready); active, it serves. It confirms
//! the role it put in force in a report (`TsunaguHost`), which the server waits for
//! before it moves members. In a planned switch the active host is told to stand by
//! first, with a wind-down: it keeps serving until no member's connection is in the
//! middle of an exchange (bounded, [`wind_down`]), so no request in flight is cut in
//! half; only then is the new host told it is active. Going from active to standby, it
//! takes a new disco key, so that the next time it serves, members see a key they never
//! saw and start their WireGuard session with it afresh.
//!
//! A standby host joins with a standby key (`tsunagu up --standby-key`): the server
//! answers its registration with the identity's private key ([`install_grant`]), which it
//! keeps in the state directory (mode 0600) in place of its own node key and never logs.

use crate::api::{DaemonPrefs, Shared, write_private};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tsunagu_proto::tailcfg::{
    HostReport, HostRole, StandbyGrant, StandbyHostView, StandbyInfo, SwitchRecord,
};

/// What `tsunagu status` shows of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandbyStatus {
    /// The exit node this host holds.
    pub identity: String,
    pub role: HostRole,
    pub hosts: Vec<StandbyHostView>,
    pub last_switch: Option<SwitchRecord>,
    /// Datagrams and packets dropped while standing by (since the daemon started).
    pub dropped: u64,
}

/// Whether the data plane must stand by: the server said this host is a standby host.
pub fn standing_by(shared: &Shared) -> bool {
    shared
        .standby
        .lock()
        .ok()
        .is_some_and(|s| s.as_ref().is_some_and(|i| i.role == HostRole::Standby))
}

/// The report's `TsunaguHost`: the role in force and the preference, for a host of an
/// exit node with standby hosts (or one that prefers the role).
pub fn host_report(shared: &Shared, prefs: &DaemonPrefs) -> Option<HostReport> {
    let role = shared
        .standby
        .lock()
        .ok()
        .and_then(|s| s.as_ref().map(|i| i.role));
    (role.is_some() || prefs.prefer).then_some(HostReport {
        role,
        prefer: prefs.prefer,
    })
}

/// Longest wind-down a host accepts from the server (`StandbyInfo.wind_down_ms`).
const MAX_WIND_DOWN: Duration = Duration::from_secs(10);
/// How often a winding-down host looks at what it forwards.
const WIND_DOWN_POLL: Duration = Duration::from_millis(5);

/// A planned switch away from this active host (`wind_down_ms` set): wait until no
/// member's connection through or to it is mid-exchange (see `tsunagu_engine::handover`), at most as
/// long as the server allows, so that members' requests in flight are not cut in half
/// by the switch. The host keeps serving meanwhile; the caller then stands by.
pub async fn wind_down(shared: &Shared, info: &StandbyInfo) {
    if info.role != HostRole::Standby || info.wind_down_ms == 0 || standing_by(shared) {
        return;
    }
    let within = Duration::from_millis(u64::from(info.wind_down_ms)).min(MAX_WIND_DOWN);
    let started = Instant::now();
    let busy = loop {
        let busy = with_device(shared, |d| d.handover_busy()).flatten();
        if busy.is_none() || started.elapsed() >= within {
            break busy;
        }
        tokio::time::sleep(WIND_DOWN_POLL).await;
    };
    let waited_ms = started.elapsed().as_millis() as u64;
    let seen = with_device(shared, |d| d.exit_connections_seen()).unwrap_or(0);
    match busy {
        None => tracing::info!(
            waited_ms,
            connections_seen = seen,
            "handing the exit node over at a quiet moment"
        ),
        Some(b) => tracing::info!(
            waited_ms,
            in_progress = b.in_progress,
            connections_seen = seen,
            "handing the exit node over with connections in progress (wind-down over)"
        ),
    }
}

/// `f` of the running engine's device, if there is one.
fn with_device<T>(shared: &Shared, f: impl FnOnce(&tsunagu_engine::Device) -> T) -> Option<T> {
    let g = shared.engine.lock().ok()?;
    g.as_ref().map(|e| f(e.device()))
}

/// A role message from the server: put it in force now. True when the role changed
/// (the server waits for the report that confirms it).
pub fn on_info(shared: &Shared, info: StandbyInfo) -> bool {
    let role = info.role;
    let before = {
        let Ok(mut cur) = shared.standby.lock() else {
            return false;
        };
        let before = cur.as_ref().map(|i| i.role);
        // Without standby hosts any more: a node like any other.
        *cur = (!info.hosts.is_empty()).then_some(info.clone());
        before
    };
    let changed = before != Some(role);
    if changed && role == HostRole::Standby {
        shared.rotate_disco();
    }
    // After the role is recorded (an engine starting now reads it), never under its lock.
    with_device(shared, |d| d.set_standby(role == HostRole::Standby));
    if changed {
        let last = info.last_switch.as_ref();
        tracing::info!(
            identity = %info.identity,
            %role,
            last_switch = last.map(|s| format!("{} -> {}: {}", s.from, s.to, s.reason)).unwrap_or_default(),
            "host role"
        );
    }
    changed
}

/// The server granted this standby host the identity's key: keep it (mode 0600) as our
/// node key, offer the exit node as the identity does, and forget the standby key.
pub fn install_grant(shared: &Shared, grant: &StandbyGrant) -> anyhow::Result<DaemonPrefs> {
    let key = grant.node_key.0.clone();
    write_private(
        &shared.state_dir.join("node.key"),
        format!("{}\n", key.to_base64()).as_bytes(),
    )
    .context("storing the exit node's key")?;
    // The PeerAPI port follows the node key (every host of the identity has the same).
    shared
        .dns
        .set_port(crate::dns::peerapi_port(&key.public().0));
    *shared
        .node
        .lock()
        .map_err(|_| anyhow::anyhow!("a lock was poisoned"))? = key;
    if let Ok(mut k) = shared.standby_key.lock() {
        *k = None;
    }
    let mut prefs = shared
        .prefs
        .lock()
        .map_err(|_| anyhow::anyhow!("a lock was poisoned"))?;
    if !prefs.prefs.advertise_exit_node {
        prefs.prefs.advertise_exit_node = true;
        crate::api::save_prefs(&shared.prefs_path(), &prefs)?;
    }
    tracing::info!(identity = %grant.identity, "this host now holds the exit node's identity, as a standby host");
    Ok(prefs.clone())
}

/// `tsunagu status`'s view.
pub fn status(shared: &Shared, dropped: u64) -> Option<StandbyStatus> {
    let cur = shared.standby.lock().ok()?;
    let info = cur.as_ref()?;
    Some(StandbyStatus {
        identity: info.identity.clone(),
        role: info.role,
        hosts: info.hosts.clone(),
        last_switch: info.last_switch.clone(),
        dropped,
    })
}
