//! The local API: JSON over HTTP/1.1 on a Unix socket, for the `tsunagu` CLI.
//!
//! * `GET /status`: this node, the control connection's state, the exit node and peers,
//!   as the daemon knows them (map stream + engine).
//! * `POST /prefs`: exit node, LAN access, exit-node offer, hostname; the exit node is
//!   checked against the current map; applied at once and persisted.
//! * `POST /up`: log in (login server, auth key, hostname, tags, ...) and run. Answers
//!   when the node runs, when an admin must approve it (with the URL), or with the
//!   reason it failed, in which case the previous settings are restored.
//! * `POST /down`: disconnect (routes removed, the choices kept); `POST /logout`: tell
//!   the server, forget the node key; the next `up` must authenticate again.
//!
//! Settings live in `<state-dir>/prefs.json` (mode 0600), written atomically.

use anyhow::Context as _;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tsunagu_client::netmap::{MapState, Prefs, short_name};
use tsunagu_engine::engine::{Engine, EngineConfig};
use tsunagu_proto::{MachinePrivate, NodePrivate};

/// A handshake younger than this makes a peer "active" (WireGuard rekeys every 2 min
/// while traffic flows).
const ACTIVE_SECS: u64 = 180;
/// How long `up` waits for the outcome of a login before answering "still starting".
const UP_WAIT: Duration = Duration::from_secs(25);

/// Everything the daemon keeps across restarts besides its keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonPrefs {
    /// The coordination server; empty until the first `up`.
    pub login_server: String,
    /// The name to register with; empty for the system's hostname.
    pub hostname: String,
    pub advertise_tags: Vec<String>,
    /// `up` sets it, `down` clears it.
    pub want_running: bool,
    /// As a host of an exit node with standby hosts: take the role whenever this host is
    /// ready (`--prefer`), instead of standing by when it comes back.
    pub prefer: bool,
    /// After `logout`: the node key is new and `up` must authenticate again.
    pub logged_out: bool,
    /// Install the tailnet's DNS (100.100.100.100) into the OS (`--accept-dns`).
    pub accept_dns: bool,
    /// `--insecure-http`: an `http://` login server off loopback is allowed.
    pub insecure_http: bool,
    #[serde(flatten)]
    pub prefs: Prefs,
}

impl Default for DaemonPrefs {
    fn default() -> Self {
        DaemonPrefs {
            login_server: String::new(),
            hostname: String::new(),
            advertise_tags: Vec::new(),
            want_running: false,
            prefer: false,
            logged_out: false,
            insecure_http: false,
            accept_dns: true,
            prefs: Prefs::default(),
        }
    }
}

/// Where the control connection stands, as `status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendState {
    /// No login server or logged out: `tsunagu up` is needed.
    #[default]
    NeedsLogin,
    /// Registered interactively: an admin must approve the node at `auth_url`.
    NeedsMachineAuth,
    /// Connecting to the server or waiting for the first map.
    Starting,
    /// Following the map stream; the data plane runs.
    Running,
    /// `tsunagu down`.
    Stopped,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub state: BackendState,
    /// With `NeedsMachineAuth`: where the admin approves this node.
    pub auth_url: String,
    /// The last control error of this generation, empty when none.
    pub error: String,
    /// The settings generation this describes (bumped by every change of settings).
    pub generation: u64,
}

/// What the control loop and the API share.
pub struct Shared {
    /// The settings; locked first (then `map`, then `engine`) by whoever applies.
    pub prefs: Mutex<DaemonPrefs>,
    pub map: Mutex<MapState>,
    pub engine: Arc<Mutex<Option<Engine>>>,
    pub engine_cfg: EngineConfig,
    pub machine: MachinePrivate,
    pub node: Mutex<NodePrivate>,
    pub mtu: u16,
    pub state_dir: PathBuf,
    /// The system's hostname, used when the settings name none.
    pub default_hostname: String,
    /// A pre-auth key for the next registration only; never written to disk.
    pub auth_key: Mutex<Option<String>>,
    /// A standby key (`--standby-key`) until the server granted the exit node's
    /// identity; never written to disk.
    pub standby_key: Mutex<Option<String>>,
    /// As a host of an exit node with standby hosts: what the server last said (role,
    /// hosts, last switch); see [`crate::standby`].
    pub standby: Mutex<Option<tsunagu_proto::tailcfg::StandbyInfo>>,
    /// The control loop's state, published.
    pub backend: tokio::sync::watch::Sender<Backend>,
    /// Bumped on every change of settings: the control loop restarts its session.
    pub generation: tokio::sync::watch::Sender<u64>,
    /// The relay connections (home, and regions of peers homed elsewhere), when the
    /// server announces relays.
    pub relay: Mutex<Option<Arc<crate::relay::RelayPool>>>,
    /// How the relay connections behave (home region, idle time).
    pub relay_cfg: crate::relay::PoolConfig,
    /// STUN through the WireGuard socket: our public endpoint.
    pub stun: Arc<crate::netcheck::Stun>,
    /// The disco key (its public half is announced to the server): one per run, and a
    /// new one each time this host stops serving as an exit node's active host.
    pub disco: Mutex<tsunagu_disco::DiscoPrivate>,
    /// Our endpoints as last reported to the server (public first), which the engine
    /// also puts in its CallMeMaybe messages.
    pub endpoints: Mutex<Vec<std::net::SocketAddr>>,
    /// Forwarding for exit-node users goes on this long after the offer is withdrawn,
    /// and until when it does now (planned maintenance: a drain).
    pub exit_drain: Duration,
    pub drain_until: Mutex<Option<std::time::Instant>>,
    /// The resolver at 100.100.100.100, the PeerAPI's DoH, the OS's DNS settings.
    pub dns: crate::dns::Dns,
    /// The internet was blocked at start (an exit node in the settings) and no engine
    /// has taken the block over yet.
    pub start_block: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> anyhow::Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| anyhow::anyhow!("a lock was poisoned"))
}

impl Shared {
    pub fn prefs_path(&self) -> PathBuf {
        self.state_dir.join("prefs.json")
    }

    pub fn node_key(&self) -> NodePrivate {
        self.node
            .lock()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Our disco key now.
    pub fn disco_key(&self) -> tsunagu_disco::DiscoPrivate {
        self.disco
            .lock()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// A new disco key, in force at once (see [`crate::standby`]).
    pub fn rotate_disco(&self) {
        let fresh = tsunagu_disco::DiscoPrivate::generate();
        if let Ok(mut k) = self.disco.lock() {
            *k = fresh.clone();
        }
        if let Ok(g) = self.engine.lock()
            && let Some(e) = g.as_ref()
        {
            e.device().set_disco(Some(fresh));
        }
    }

    pub fn hostname(&self, p: &DaemonPrefs) -> String {
        if p.hostname.is_empty() {
            self.default_hostname.clone()
        } else {
            p.hostname.clone()
        }
    }

    /// Build the NetMap from the current map and `prefs` and give it to the engine
    /// (starting it on the first usable map). An exit node that cannot be used blocks
    /// internet traffic (fail closed). Callers hold the prefs lock.
    pub fn apply_locked(&self, dprefs: &DaemonPrefs) -> anyhow::Result<()> {
        let prefs = &dprefs.prefs;
        let key = self.node_key();
        let state = lock(&self.map)?;
        let relay = self.relay_link();
        let mut guard = lock(&self.engine)?;
        let current = guard.as_ref().and_then(|e| e.map().exit_node);
        let Some(mut map) = state.netmap_fail_closed(&key, prefs, self.mtu, current.as_ref())
        else {
            return Ok(());
        };
        map.self_node.peerapi_port = Some(self.dns.port());
        if let Some(e) = guard.as_ref()
            && self.draining().is_some()
        {
            keep_serving_exit(&mut map, e.map());
        }
        let dns = dns_inputs(&state, &map, dprefs.accept_dns);
        drop(state);
        match guard.as_mut() {
            Some(e) => {
                if e.map() != &map {
                    if map.exit_node_blocked && !e.map().exit_node_blocked {
                        tracing::warn!(
                            exit_node = %prefs.exit_node,
                            "the chosen exit node cannot be used: internet traffic blocked until it returns or another is chosen"
                        );
                    }
                    e.apply(&map).context("the engine refused the map")?;
                }
            }
            None => {
                let mut cfg = self.engine_cfg.clone();
                // A standby host starts silent: the role came with the first map.
                cfg.standby = crate::standby::standing_by(self);
                let e = Engine::start(cfg, &map).context("starting the engine")?;
                // The engine owns the rules now (it converged from any block).
                self.start_block
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                tracing::info!(
                    name = %map.self_node.name,
                    addresses = ?map.self_node.addresses,
                    exit_node = map.exit_peer().map(|p| p.name.as_str()).unwrap_or("none"),
                    blocked = map.exit_node_blocked,
                    "running"
                );
                e.device().set_stun_sink(Some(self.stun.sink()));
                e.device().set_disco(Some(self.disco_key()));
                if let Ok(eps) = self.endpoints.lock() {
                    e.device().set_endpoints(eps.clone());
                }
                *guard = Some(e);
            }
        }
        if let Some(e) = guard.as_ref() {
            e.device().set_relay(relay);
        }
        drop(guard);
        self.dns.update(&dns);
        Ok(())
    }

    /// Follow `map`'s DERP map: connect to the home region (or keep the connection when
    /// it is the same), let the pool know every region (it connects to the others on
    /// demand), and record the home in `map` so that peers get relay paths. True when
    /// the home changed (the server should hear our new home).
    pub fn ensure_relay(&self, map: &mut MapState, login_server: &str) -> bool {
        use crate::relay::{RelayPool, RelayTarget};
        let targets = map
            .derp_map
            .as_ref()
            .map(|d| RelayTarget::all(d, login_server))
            .unwrap_or_default();
        let Ok(mut relay) = self.relay.lock() else {
            return false;
        };
        if targets.is_empty() {
            map.relay_region = None;
            return match relay.take() {
                Some(pool) => {
                    pool.shutdown();
                    true
                }
                None => false,
            };
        }
        let home = RelayTarget::home(&targets, self.relay_cfg.home.as_deref()).cloned();
        map.relay_region = home.as_ref().map(|t| t.region);
        let pool = relay.get_or_insert_with(|| {
            RelayPool::new(
                self.node_key(),
                Some(self.engine_cfg.fwmark),
                self.engine.clone(),
                &self.relay_cfg,
            )
        });
        let changed = pool.update(targets, home.as_ref());
        if changed
            && let (Some(want), Some(h)) = (&self.relay_cfg.home, &home)
            && *want != h.region.to_string()
            && !want.eq_ignore_ascii_case(&h.code)
        {
            tracing::warn!(wanted = %want, home = %h.code, "no relay region {want:?} in the DERP map; homing on the lowest-numbered");
        }
        changed
    }

    /// Send a STUN Binding Request to every STUN server of the map, from the WireGuard
    /// socket (answers arrive through the device's STUN sink).
    pub fn probe_stun(&self, map: &MapState) {
        let Some(d) = map.derp_map.as_ref() else {
            return;
        };
        let Ok(g) = self.engine.lock() else { return };
        let Some(e) = g.as_ref() else { return };
        for (_, server) in crate::netcheck::stun_servers(d) {
            let req = self.stun.request(server);
            if let Err(err) = e.device().send_datagram(server, &req) {
                tracing::debug!(%server, "STUN request: {err}");
            }
        }
    }

    /// Time left of a drain in progress.
    pub fn draining(&self) -> Option<Duration> {
        let until = (*self.drain_until.lock().ok()?)?;
        until.checked_duration_since(std::time::Instant::now())
    }

    /// The offer to serve as exit node was just withdrawn while we served: keep
    /// forwarding for the peers that used us for `exit_drain`, then stop. Peers move to
    /// another exit node as soon as the map tells them, with nothing lost meanwhile.
    fn start_drain(self: &Arc<Self>) {
        let serving = self
            .engine
            .lock()
            .ok()
            .is_some_and(|g| g.as_ref().is_some_and(|e| e.map().self_node.serve_exit));
        if !serving || self.exit_drain.is_zero() {
            return;
        }
        let until = std::time::Instant::now() + self.exit_drain;
        if let Ok(mut d) = self.drain_until.lock() {
            *d = Some(until);
        }
        tracing::info!(
            secs = self.exit_drain.as_secs(),
            "exit node offer withdrawn: draining (still forwarding for its users)"
        );
        let me = self.clone();
        let grace = self.exit_drain;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let still = me
                .drain_until
                .lock()
                .ok()
                .is_some_and(|d| *d == Some(until));
            if !still {
                return; // offered again, or another drain started
            }
            let prefs = match me.prefs.lock() {
                Ok(p) => p,
                Err(_) => return,
            };
            if let Ok(mut d) = me.drain_until.lock() {
                *d = None;
            }
            if let Err(e) = me.apply_locked(&prefs) {
                tracing::warn!("ending the drain: {e:#}");
            }
            tracing::info!("drain over: no longer forwarding as exit node");
        });
    }

    /// Where the home relay is (region, code, address), if there is one.
    pub fn home_relay(&self) -> Option<crate::relay::RelayTarget> {
        let r = self.relay.lock().ok()?;
        r.as_ref()?.home()
    }

    /// Every relay connection, home first.
    pub fn relay_connections(&self) -> Vec<crate::relay::RelayConnStatus> {
        let pool = self.relay.lock().ok().and_then(|r| r.clone());
        pool.map(|p| p.connections()).unwrap_or_default()
    }

    fn relay_link(&self) -> Option<Arc<dyn tsunagu_engine::device::RelayTx>> {
        let r = self.relay.lock().ok()?;
        r.as_ref()
            .map(|p| p.clone() as Arc<dyn tsunagu_engine::device::RelayTx>)
    }

    /// Let the engine look at the host's networks again (see `Engine::refresh_host`).
    pub fn refresh_host(&self) {
        if let Ok(mut g) = self.engine.lock()
            && let Some(e) = g.as_mut()
            && let Err(e) = e.refresh_host()
        {
            tracing::error!("updating the exit node's closed networks: {e:#}");
        }
    }

    /// Stop the data plane and remove everything it installed (`down`, `logout`).
    pub fn stop_engine(&self) {
        self.dns.stop();
        if let Ok(mut r) = self.relay.lock()
            && let Some(pool) = r.take()
        {
            pool.shutdown();
        }
        if let Ok(mut g) = self.engine.lock() {
            match g.take() {
                Some(mut e) => {
                    e.shutdown();
                    tracing::info!("data plane stopped");
                }
                // No engine, but the block from start: the user stopped or logged out
                // before the first map, so nothing stays blocked.
                None => {
                    if self
                        .start_block
                        .swap(false, std::sync::atomic::Ordering::SeqCst)
                    {
                        match tsunagu_engine::engine::unblock(&self.engine_cfg) {
                            Ok(()) => tracing::info!("block removed"),
                            Err(e) => tracing::error!("removing the block: {e:#}"),
                        }
                    }
                }
            }
        }
    }

    /// Publish the control loop's state for generation `generation`.
    pub fn set_backend(&self, generation: u64, state: BackendState, auth_url: &str, error: &str) {
        self.backend.send_replace(Backend {
            state,
            auth_url: auth_url.into(),
            error: error.into(),
            generation,
        });
    }

    /// Persist `next` and restart the control session with it.
    fn commit(&self, prefs: &mut DaemonPrefs, next: DaemonPrefs) -> anyhow::Result<u64> {
        save_prefs(&self.prefs_path(), &next)?;
        *prefs = next;
        let mut generation = 0;
        self.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        Ok(generation)
    }
}

/// Settings saved in the state directory, if any.
pub fn load_prefs(path: &Path) -> anyhow::Result<Option<DaemonPrefs>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(
            serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write a file atomically with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn save_prefs(path: &Path, prefs: &DaemonPrefs) -> anyhow::Result<()> {
    write_private(path, serde_json::to_string_pretty(prefs)?.as_bytes())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub dns_name: String,
    pub addresses: Vec<String>,
    pub user: String,
    pub os: String,
    pub running: bool,
    /// `None` when not offering; `awaiting approval` or `approved`.
    pub offering_exit_node: Option<String>,
    /// Peers that sent internet traffic through us recently (we are their exit node).
    pub exit_node_users: usize,
    /// The offer was withdrawn and we still forward for this many seconds (a drain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExitStatus {
    /// As the user gave it.
    pub chosen: String,
    pub name: String,
    pub ip: String,
    /// `active`, `idle`, `offline`, `connecting`, or the error that keeps it unused.
    pub state: String,
    /// The chosen exit node cannot be used and internet traffic is blocked.
    pub blocked: bool,
    pub allow_lan_access: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    pub ip: String,
    pub name: String,
    pub dns_name: String,
    pub user: String,
    pub os: String,
    pub online: Option<bool>,
    pub offers_exit_node: bool,
    pub exit_node: bool,
    pub endpoint: Option<String>,
    /// How packets reach the peer: `direct IP:PORT` or `relay "REGION"`.
    pub path: Option<String>,
    pub last_handshake_secs: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub backend: Backend,
    pub login_server: String,
    #[serde(rename = "self")]
    pub self_node: Option<SelfStatus>,
    pub exit_node: Option<ExitStatus>,
    pub peers: Vec<PeerInfo>,
    /// The data plane's counters (drops by cause, relay traffic), for scripts.
    #[serde(default)]
    pub counters: Option<tsunagu_engine::CounterSnapshot>,
    /// The relay connections: home, and regions of peers homed elsewhere while we send
    /// to them.
    #[serde(default)]
    pub relays: Vec<crate::relay::RelayConnStatus>,
    /// A host of an exit node with standby hosts: its role, the hosts, the last switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<crate::standby::StandbyStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PrefsRequest {
    pub exit_node: Option<String>,
    pub exit_node_allow_lan_access: Option<bool>,
    pub advertise_exit_node: Option<bool>,
    pub accept_routes: Option<bool>,
    pub hostname: Option<String>,
    pub accept_dns: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct UpRequest {
    pub login_server: Option<String>,
    pub auth_key: Option<String>,
    /// Join an exit node as one of its standby hosts (`tsunagu-server nodes standby add`).
    pub standby_key: Option<String>,
    /// As a host of an exit node with standby hosts: take the role whenever ready.
    pub prefer: Option<bool>,
    pub advertise_tags: Option<Vec<String>>,
    /// Allow an `http://` login server off loopback.
    pub insecure_http: Option<bool>,
    /// Settings not given return to their defaults (instead of staying as they are).
    pub reset: bool,
    #[serde(flatten)]
    pub prefs: PrefsRequest,
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    error: String,
}

type ApiResult<T> = Result<Json<T>, (StatusCode, Json<ApiError>)>;

fn err(code: StatusCode, e: impl std::fmt::Display) -> (StatusCode, Json<ApiError>) {
    (
        code,
        Json(ApiError {
            error: e.to_string(),
        }),
    )
}

fn internal(e: impl std::fmt::Display) -> (StatusCode, Json<ApiError>) {
    err(StatusCode::INTERNAL_SERVER_ERROR, e)
}

fn activity(online: Option<bool>, hs: Option<u64>) -> &'static str {
    match (online, hs) {
        (Some(false), _) => "offline",
        (_, Some(s)) if s < ACTIVE_SECS => "active",
        (_, Some(_)) => "idle",
        _ => "-",
    }
}

pub fn status(shared: &Shared) -> anyhow::Result<Status> {
    let dprefs = lock(&shared.prefs)?.clone();
    let prefs = &dprefs.prefs;
    let state = lock(&shared.map)?.clone();
    let (running, engine_peers, exit_key, blocked, counters) = match shared.engine.lock() {
        Ok(g) => match g.as_ref() {
            Some(e) => (
                true,
                e.device().peers(),
                e.map().exit_node,
                e.map().exit_node_blocked,
                Some(e.device().counters()),
            ),
            None => (false, Vec::new(), None, false, None),
        },
        Err(_) => (false, Vec::new(), None, false, None),
    };
    let users = engine_peers
        .iter()
        .filter(|p| p.exit_rx_packets > 0 && p.last_handshake_secs.is_some_and(|s| s < ACTIVE_SECS))
        .count();
    let self_node = state.self_node.as_ref().map(|n| SelfStatus {
        name: short_name(n).to_string(),
        dns_name: n.name.clone(),
        addresses: n.addresses.iter().map(|a| a.addr().to_string()).collect(),
        user: state.user_name(n),
        os: n.hostinfo.os.clone(),
        running,
        offering_exit_node: prefs.advertise_exit_node.then(|| {
            if n.is_exit_node() {
                "approved".to_string()
            } else {
                "awaiting approval".to_string()
            }
        }),
        exit_node_users: users,
        draining_secs: shared.draining().map(|d| d.as_secs().max(1)),
    });
    let region_code = |region: u16| {
        state
            .derp_map
            .as_ref()
            .and_then(|d| d.regions.get(&i32::from(region)))
            .map_or_else(|| region.to_string(), |r| r.region_code.clone())
    };
    let mut peers = Vec::new();
    for p in state.peers.values() {
        let key = p.key.to_string();
        let es = engine_peers.iter().find(|e| e.key == key);
        peers.push(PeerInfo {
            ip: p
                .addresses
                .iter()
                .find(|a| a.addr().is_ipv4())
                .or(p.addresses.first())
                .map(|a| a.addr().to_string())
                .unwrap_or_default(),
            name: short_name(p).to_string(),
            dns_name: p.name.clone(),
            user: state.user_name(p),
            os: p.hostinfo.os.clone(),
            online: p.online,
            offers_exit_node: p.is_exit_node(),
            exit_node: exit_key == Some(p.key),
            endpoint: es.and_then(|e| e.endpoint).map(|e| e.to_string()),
            path: es.and_then(|e| e.endpoint).map(|e| {
                match tsunagu_engine::peers::relay_region(&e) {
                    Some(region) => format!("relay \"{}\"", region_code(region)),
                    None => format!("direct {e}"),
                }
            }),
            last_handshake_secs: es.and_then(|e| e.last_handshake_secs),
            tx_bytes: es.map_or(0, |e| e.tx_bytes),
            rx_bytes: es.map_or(0, |e| e.rx_bytes),
        });
    }
    let exit_node = if prefs.exit_node.is_empty() {
        None
    } else {
        Some(
            match state.resolve_exit_sticky(&prefs.exit_node, exit_key.as_ref()) {
                Ok(Some(n)) => {
                    let info = peers.iter().find(|p| p.dns_name == n.name);
                    let state = match info {
                        Some(i) if !i.exit_node => "connecting".to_string(),
                        Some(i) => match activity(i.online, i.last_handshake_secs) {
                            "-" => "connecting".to_string(),
                            a => a.to_string(),
                        },
                        None => "connecting".to_string(),
                    };
                    ExitStatus {
                        chosen: prefs.exit_node.clone(),
                        name: short_name(n).to_string(),
                        ip: info.map(|i| i.ip.clone()).unwrap_or_default(),
                        state,
                        blocked: false,
                        allow_lan_access: prefs.exit_node_allow_lan_access,
                    }
                }
                Ok(None) => unreachable!("non-empty choice"),
                Err(e) => ExitStatus {
                    chosen: prefs.exit_node.clone(),
                    name: String::new(),
                    ip: String::new(),
                    state: format!("unusable: {e}"),
                    blocked,
                    allow_lan_access: prefs.exit_node_allow_lan_access,
                },
            },
        )
    };
    Ok(Status {
        backend: shared.backend.borrow().clone(),
        login_server: dprefs.login_server.clone(),
        self_node,
        exit_node,
        peers,
        standby: crate::standby::status(shared, counters.map_or(0, |c| c.standby_dropped)),
        counters,
        relays: shared.relay_connections(),
    })
}

/// Apply the data-plane part of a request to `next`; `Err` (400) when the exit node does
/// not fit the current map.
fn merge_prefs(
    shared: &Shared,
    next: &mut DaemonPrefs,
    req: &PrefsRequest,
) -> Result<(), (StatusCode, Json<ApiError>)> {
    if let Some(x) = &req.exit_node {
        next.prefs.exit_node = x.trim().to_string();
    }
    if let Some(l) = req.exit_node_allow_lan_access {
        next.prefs.exit_node_allow_lan_access = l;
    }
    if let Some(a) = req.advertise_exit_node {
        next.prefs.advertise_exit_node = a;
    }
    if let Some(d) = req.accept_dns {
        next.accept_dns = d;
    }
    if let Some(a) = req.accept_routes {
        next.prefs.accept_routes = a;
    }
    if let Some(h) = &req.hostname {
        let h = h.trim();
        if !h.is_empty() && !valid_hostname(h) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid hostname {h:?}: use letters, digits and '-', at most 63 characters"
                ),
            ));
        }
        next.hostname = h.to_string();
    }
    let state = lock(&shared.map).map_err(internal)?;
    if let Some(x) = &req.exit_node
        && !x.trim().is_empty()
    {
        if state.self_node.is_none() {
            return Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "no network map yet (not connected to the coordination server)",
            ));
        }
        state
            .resolve_exit(x.trim())
            .map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    }
    Ok(())
}

fn valid_hostname(h: &str) -> bool {
    h.len() <= 63
        && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

/// Whether a settings change needs a new session (what we tell the server changed).
fn needs_new_session(old: &DaemonPrefs, next: &DaemonPrefs) -> bool {
    old.login_server != next.login_server
        || old.hostname != next.hostname
        || old.advertise_tags != next.advertise_tags
        || old.prefs.advertise_exit_node != next.prefs.advertise_exit_node
        || old.want_running != next.want_running
        || old.logged_out != next.logged_out
        || old.prefer != next.prefer
        || old.insecure_http != next.insecure_http
}

fn log_prefs(p: &DaemonPrefs, what: &str) {
    tracing::info!(
        exit_node = if p.prefs.exit_node.is_empty() {
            "none"
        } else {
            p.prefs.exit_node.as_str()
        },
        allow_lan = p.prefs.exit_node_allow_lan_access,
        advertise_exit_node = p.prefs.advertise_exit_node,
        accept_routes = p.prefs.accept_routes,
        "{what}"
    );
}

/// Validate and apply new prefs; on success they are persisted and in force.
pub fn set_prefs(
    shared: &Arc<Shared>,
    req: &PrefsRequest,
) -> Result<DaemonPrefs, (StatusCode, Json<ApiError>)> {
    let mut prefs = lock(&shared.prefs).map_err(internal)?;
    let mut next = prefs.clone();
    merge_prefs(shared, &mut next, req)?;
    if prefs.prefs.advertise_exit_node && !next.prefs.advertise_exit_node {
        shared.start_drain();
    } else if next.prefs.advertise_exit_node {
        *lock(&shared.drain_until).map_err(internal)? = None;
    }
    shared
        .apply_locked(&next)
        .map_err(|e| internal(format!("{e:#}")))?;
    let restart = needs_new_session(&prefs, &next);
    if restart {
        shared
            .commit(&mut prefs, next.clone())
            .map_err(|e| internal(format!("{e:#}")))?;
    } else {
        save_prefs(&shared.prefs_path(), &next).map_err(|e| internal(format!("{e:#}")))?;
        *prefs = next.clone();
    }
    log_prefs(&next, "preferences changed");
    Ok(next)
}

/// What `up` answers.
#[derive(Debug, Serialize)]
pub struct UpResponse {
    pub backend: Backend,
}

/// Wait (at most `within`) until the control loop reports on `generation` a state that
/// `done` accepts; `None` on timeout.
async fn wait_backend(
    shared: &Shared,
    generation: u64,
    within: Duration,
    done: impl Fn(&Backend) -> bool,
) -> Option<Backend> {
    let mut rx = shared.backend.subscribe();
    let wait = rx.wait_for(|b| b.generation == generation && done(b));
    match tokio::time::timeout(within, wait).await {
        Ok(Ok(b)) => Some(b.clone()),
        _ => None,
    }
}

/// Wait until the control loop reports on `generation`: running, waiting for an admin,
/// or failed. `None` when it is still connecting after `UP_WAIT`.
async fn outcome(shared: &Shared, generation: u64) -> Option<Backend> {
    wait_backend(shared, generation, UP_WAIT, |b| {
        matches!(
            b.state,
            BackendState::Running | BackendState::NeedsMachineAuth
        ) || !b.error.is_empty()
    })
    .await
}

async fn up(shared: Arc<Shared>, req: UpRequest) -> ApiResult<UpResponse> {
    let s = shared.clone();
    let planned =
        tokio::task::spawn_blocking(move || -> Result<_, (StatusCode, Json<ApiError>)> {
            let mut prefs = lock(&s.prefs).map_err(internal)?;
            let old = prefs.clone();
            let mut next = if req.reset {
                DaemonPrefs {
                    login_server: old.login_server.clone(),
                    ..DaemonPrefs::default()
                }
            } else {
                old.clone()
            };
            if let Some(i) = req.insecure_http {
                next.insecure_http = i;
            }
            if let Some(url) = &req.login_server {
                let url = url.trim().trim_end_matches('/');
                if !url.starts_with("http://") && !url.starts_with("https://") {
                    return Err(err(
                        StatusCode::BAD_REQUEST,
                        format!("invalid login server {url:?}: give https://HOST[:PORT]"),
                    ));
                }
                next.login_server = url.to_string();
            }
            if next.login_server.is_empty() {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "no coordination server known yet: give --login-server=URL",
                ));
            }
            tsunagu_client::transport::check_server_url(&next.login_server, next.insecure_http)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
            if let Some(tags) = &req.advertise_tags {
                if let Some(bad) = tags.iter().find(|t| !t.starts_with("tag:") || t.len() < 5) {
                    return Err(err(
                        StatusCode::BAD_REQUEST,
                        format!("invalid tag {bad:?}: tags look like tag:NAME"),
                    ));
                }
                next.advertise_tags = tags.clone();
            }
            merge_prefs(&s, &mut next, &req.prefs)?;
            if let Some(p) = req.prefer {
                next.prefer = p;
            }
            let auth_key = req.auth_key.clone().filter(|k| !k.trim().is_empty());
            let standby_key = req.standby_key.clone().filter(|k| !k.trim().is_empty());
            if let Some(k) = &standby_key {
                if !k
                    .trim()
                    .starts_with(tsunagu_proto::tailcfg::STANDBY_KEY_PREFIX)
                {
                    return Err(err(
                        StatusCode::BAD_REQUEST,
                        "not a standby key (tsunagu-server nodes standby add NODE makes one)",
                    ));
                }
                // A standby host offers the exit node it stands by for.
                next.prefs.advertise_exit_node = true;
            }
            if auth_key.is_some() || standby_key.is_some() || old.login_server != next.login_server
            {
                next.logged_out = false;
            }
            next.want_running = true;
            let running = s.backend.borrow().state == BackendState::Running;
            let new_key = auth_key.is_some() || standby_key.is_some();
            if next == old && !new_key && running {
                return Ok(None);
            }
            if !needs_new_session(&old, &next) && !new_key && running {
                // Only data-plane choices changed: apply them like `set`.
                s.apply_locked(&next)
                    .map_err(|e| internal(format!("{e:#}")))?;
                save_prefs(&s.prefs_path(), &next).map_err(|e| internal(format!("{e:#}")))?;
                *prefs = next;
                return Ok(None);
            }
            *lock(&s.auth_key).map_err(internal)? = auth_key.map(|k| k.trim().to_string());
            *lock(&s.standby_key).map_err(internal)? = standby_key.map(|k| k.trim().to_string());
            let generation = s
                .commit(&mut prefs, next.clone())
                .map_err(|e| internal(format!("{e:#}")))?;
            log_prefs(&next, "up");
            Ok(Some((old, generation)))
        })
        .await
        .map_err(internal)??;
    let Some((old, generation)) = planned else {
        return Ok(Json(UpResponse {
            backend: shared.backend.borrow().clone(),
        }));
    };
    match outcome(&shared, generation).await {
        Some(b) if b.error.is_empty() => Ok(Json(UpResponse { backend: b })),
        Some(b) => {
            // Failed: put the previous settings back, so nothing changed.
            let s = shared.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let mut prefs = lock(&s.prefs)?;
                *lock(&s.auth_key)? = None;
                *lock(&s.standby_key)? = None;
                s.commit(&mut prefs, old)?;
                Ok(())
            })
            .await
            .map_err(internal)?
            .map_err(|e| internal(format!("{e:#}")))?;
            tracing::warn!(error = %b.error, "up failed; previous settings restored");
            Err(err(StatusCode::BAD_GATEWAY, b.error))
        }
        None => Ok(Json(UpResponse {
            backend: shared.backend.borrow().clone(),
        })),
    }
}

async fn down(shared: Arc<Shared>) -> ApiResult<UpResponse> {
    let s = shared.clone();
    let generation = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut prefs = lock(&s.prefs)?;
        let next = DaemonPrefs {
            want_running: false,
            ..prefs.clone()
        };
        s.commit(&mut prefs, next)
    })
    .await
    .map_err(internal)?
    .map_err(|e| internal(format!("{e:#}")))?;
    wait_backend(&shared, generation, Duration::from_secs(10), |b| {
        b.state != BackendState::Running
    })
    .await;
    tracing::info!("down");
    Ok(Json(UpResponse {
        backend: shared.backend.borrow().clone(),
    }))
}

#[derive(Debug, Serialize)]
pub struct LogoutResponse {
    /// Empty when the server was told; otherwise why it could not be.
    pub warning: String,
}

async fn logout(shared: Arc<Shared>) -> ApiResult<LogoutResponse> {
    let (server, insecure_http, node) = {
        let p = lock(&shared.prefs).map_err(internal)?;
        (p.login_server.clone(), p.insecure_http, shared.node_key())
    };
    let mut warning = String::new();
    if !server.is_empty() {
        let told = tokio::time::timeout(
            Duration::from_secs(10),
            crate::control::logout(
                &server,
                insecure_http,
                &shared.machine,
                &node,
                shared.engine_cfg.fwmark,
            ),
        )
        .await;
        match told {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warning = format!("the server was not told: {e:#}"),
            Err(_) => warning = "the server was not told: timed out".into(),
        }
    }
    let s = shared.clone();
    let generation = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut prefs = lock(&s.prefs)?;
        // A new node key: the old one is expired on the server.
        let fresh = NodePrivate::generate();
        write_private(
            &s.state_dir.join("node.key"),
            format!("{}\n", fresh.to_base64()).as_bytes(),
        )?;
        *lock(&s.node)? = fresh;
        *lock(&s.map)? = MapState::default();
        let next = DaemonPrefs {
            want_running: false,
            logged_out: true,
            ..prefs.clone()
        };
        s.commit(&mut prefs, next)
    })
    .await
    .map_err(internal)?
    .map_err(|e| internal(format!("{e:#}")))?;
    wait_backend(&shared, generation, Duration::from_secs(10), |b| {
        b.state == BackendState::NeedsLogin
    })
    .await;
    tracing::info!(%warning, "logged out");
    Ok(Json(LogoutResponse { warning }))
}

async fn get_netcheck(State(shared): State<Arc<Shared>>) -> ApiResult<crate::netcheck::Report> {
    let map = lock(&shared.map)
        .map_err(internal)?
        .derp_map
        .clone()
        .ok_or_else(|| {
            err(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server announced no relay or STUN server (or no map yet)",
            )
        })?;
    if lock(&shared.engine).map_err(internal)?.is_none() {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the data plane is not running",
        ));
    }
    let engine = shared.engine.clone();
    let send = move |to: std::net::SocketAddr, d: &[u8]| -> std::io::Result<()> {
        match engine.lock().ok().as_ref().and_then(|g| g.as_ref()) {
            Some(e) => e.device().send_datagram(to, d),
            None => Err(std::io::Error::other("the data plane stopped")),
        }
    };
    let home = shared.home_relay().map(|h| h.code);
    let report = crate::netcheck::run(
        &shared.stun,
        send,
        &map,
        home.as_deref(),
        shared.engine_cfg.fwmark,
    )
    .await;
    Ok(Json(report))
}

async fn get_status(State(shared): State<Arc<Shared>>) -> ApiResult<Status> {
    tokio::task::spawn_blocking(move || status(&shared))
        .await
        .map_err(internal)?
        .map(Json)
        .map_err(|e| internal(format!("{e:#}")))
}

async fn post_prefs(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<PrefsRequest>,
) -> ApiResult<DaemonPrefs> {
    tokio::task::spawn_blocking(move || set_prefs(&shared, &req))
        .await
        .map_err(internal)?
        .map(Json)
}

async fn post_up(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<UpRequest>,
) -> ApiResult<UpResponse> {
    up(shared, req).await
}

async fn post_down(State(shared): State<Arc<Shared>>) -> ApiResult<UpResponse> {
    down(shared).await
}

async fn post_logout(State(shared): State<Arc<Shared>>) -> ApiResult<LogoutResponse> {
    logout(shared).await
}

/// Bind the socket (replacing a stale one) and serve until the process ends. The socket
/// is owner-only (0600), or group read-write (0660) for `operator_group`.
pub async fn serve(
    path: PathBuf,
    operator_group: Option<nix::unistd::Gid>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        anyhow::bail!(
            "another tsunagud is listening on {} (give --socket)",
            path.display()
        );
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    let mode = if let Some(gid) = operator_group {
        nix::unistd::chown(&path, None, Some(gid))
            .with_context(|| format!("chgrp {}", path.display()))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    tracing::info!(path = %path.display(), "local API listening");
    let app = axum::Router::new()
        .route("/status", get(get_status))
        .route("/netcheck", get(get_netcheck))
        .route("/prefs", post(post_prefs))
        .route("/up", post(post_up))
        .route("/down", post(post_down))
        .route("/logout", post(post_logout))
        .with_state(shared);
    axum::serve(listener, app).await.context("local API")?;
    Ok(())
}

/// What DNS takes from the map state and the engine's map: the tailnet's settings,
/// every node's name, the exit node in use (and its DoH URL), who may use ours.
fn dns_inputs(
    state: &MapState,
    map: &tsunagu_proto::NetMap,
    accept_dns: bool,
) -> crate::dns::Inputs {
    use tsunagu_dns::plan::ExitUse;
    let cfg = state.dns_config.clone().unwrap_or_default();
    let me = state.self_node.as_ref();
    let domain = cfg
        .proxied
        .then(|| me.and_then(|m| m.name.trim_end_matches('.').split_once('.')))
        .flatten()
        .map(|(_, d)| d.to_string());
    let addrs = |n: &tsunagu_proto::tailcfg::Node| -> Vec<std::net::IpAddr> {
        n.addresses.iter().map(|a| a.addr()).collect()
    };
    let nodes = me
        .into_iter()
        .chain(state.peers.values())
        .map(|n| (n.name.clone(), addrs(n)))
        .collect();
    let exit = match map.exit_node {
        Some(k) => ExitUse::InUse {
            doh: state
                .peers
                .values()
                .find(|p| p.key == k)
                .and_then(tsunagu_dns::plan::exit_doh_url),
        },
        None if map.exit_node_blocked => ExitUse::Blocked,
        None => ExitUse::None,
    };
    let exit_clients = if map.self_node.serve_exit {
        map.peers
            .iter()
            .filter(|p| p.exit_client)
            .flat_map(|p| p.allowed_ips.iter())
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| n.addr())
            .collect()
    } else {
        Default::default()
    };
    crate::dns::Inputs {
        cfg,
        domain,
        nodes,
        exit,
        addresses: map.self_node.addresses.iter().map(|a| a.addr()).collect(),
        exit_clients,
        accept_dns,
    }
}

/// During a drain: go on forwarding as `current` does (serving as exit node, for the
/// peers that may use us, by the rules that let them), whatever the new map says. The
/// server no longer sends an exit node that withdrew its offer the rules of the
/// internet: `current`'s rules are kept beside the new ones, without the destinations
/// that name our own addresses (what peers may open on this node is the new map's).
fn keep_serving_exit(map: &mut tsunagu_proto::NetMap, current: &tsunagu_proto::NetMap) {
    if !current.self_node.serve_exit {
        return;
    }
    map.self_node.serve_exit = true;
    for p in &mut map.peers {
        if current
            .peers
            .iter()
            .any(|o| o.key == p.key && o.exit_client)
        {
            p.exit_client = true;
        }
    }
    let own: Vec<String> = current
        .self_node
        .addresses
        .iter()
        .flat_map(|a| [a.addr().to_string(), a.to_string()])
        .collect();
    if let (Some(new), Some(old)) = (map.packet_filter.as_mut(), &current.packet_filter) {
        for rule in old {
            let mut fwd = rule.clone();
            fwd.dst_ports.retain(|d| !own.contains(&d.ip));
            if !fwd.dst_ports.is_empty() && !new.contains(&fwd) {
                new.push(fwd);
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_drain_keeps_forwarding_for_the_peers_that_used_us() {
        use tsunagu_proto::{NetMap, NodePrivate, Peer, SelfNode};
        let peer = |name: &str, exit_client: bool| Peer {
            name: name.into(),
            key: NodePrivate::from_bytes([name.len() as u8; 32]).public(),
            endpoints: vec![],
            allowed_ips: vec![],
            offers_exit: false,
            exit_client,
            keepalive: None,
            relay: None,
            disco: None,
        };
        let map = |serve_exit: bool, clients: bool| NetMap {
            self_node: SelfNode {
                name: "exit".into(),
                private_key: NodePrivate::from_bytes([9; 32]),
                addresses: vec!["100.64.0.1/32".parse().unwrap()],
                serve_exit,
                peerapi_port: None,
            },
            peers: vec![peer("a", clients), peer("bb", false)],
            exit_node: None,
            exit_node_allow_lan_access: false,
            exit_node_blocked: false,
            mtu: 1280,
            packet_filter: None,
        };
        // Serving, then the offer is withdrawn: the new map serves nobody; the drain
        // keeps what the current one does.
        let mut next = map(false, false);
        keep_serving_exit(&mut next, &map(true, true));
        assert!(next.self_node.serve_exit);
        assert!(next.peers[0].exit_client);
        assert!(
            !next.peers[1].exit_client,
            "only the peers that could use us"
        );
        // Not serving before: nothing to keep.
        let mut next = map(false, false);
        keep_serving_exit(&mut next, &map(false, false));
        assert!(!next.self_node.serve_exit);
        // The rules that let peers use us go on forwarding; what named our own address
        // is the new map's business.
        use tsunagu_proto::tailcfg::{FilterRule, NetPortRange};
        let internet = FilterRule::allow(["100.64.0.2"], [NetPortRange::any("8.0.0.0/7")]);
        let mine = FilterRule::allow(["100.64.0.2"], [NetPortRange::any("100.64.0.1")]);
        let mut serving = map(true, true);
        serving.packet_filter = Some(vec![internet.clone(), mine]);
        let mut next = map(false, false);
        next.packet_filter = Some(vec![]);
        keep_serving_exit(&mut next, &serving);
        assert_eq!(next.packet_filter, Some(vec![internet]));
    }
    use super::*;

    #[test]
    fn prefs_round_trip_with_owner_only_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.json");
        assert_eq!(load_prefs(&path).unwrap(), None);
        let p = DaemonPrefs {
            login_server: "http://198.51.100.4:8080".into(),
            want_running: true,
            prefs: Prefs {
                exit_node: "dev-m1sk9-s1".into(),
                exit_node_allow_lan_access: true,
                advertise_exit_node: false,
                accept_routes: true,
            },
            insecure_http: true,
            ..DaemonPrefs::default()
        };
        save_prefs(&path, &p).unwrap();
        save_prefs(&path, &p).unwrap();
        assert_eq!(load_prefs(&path).unwrap(), Some(p));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn older_prefs_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.json");
        std::fs::write(
            &path,
            r#"{"exit_node":"x","exit_node_allow_lan_access":true,"advertise_exit_node":false}"#,
        )
        .unwrap();
        let p = load_prefs(&path).unwrap().unwrap();
        assert_eq!(p.prefs.exit_node, "x");
        assert!(p.prefs.exit_node_allow_lan_access);
        assert!(p.login_server.is_empty() && !p.want_running);
        assert!(
            !p.prefs.accept_routes && !p.insecure_http,
            "off unless asked for"
        );
    }

    #[test]
    fn activity_words() {
        assert_eq!(activity(Some(false), Some(1)), "offline");
        assert_eq!(activity(Some(true), Some(1)), "active");
        assert_eq!(activity(None, Some(500)), "idle");
        assert_eq!(activity(Some(true), None), "-");
    }

    #[test]
    fn session_restarts_only_for_what_the_server_sees() {
        let a = DaemonPrefs {
            login_server: "http://198.51.100.4:8080".into(),
            want_running: true,
            ..DaemonPrefs::default()
        };
        let mut b = a.clone();
        b.prefs.exit_node = "dev-m1sk9-s1".into();
        b.prefs.exit_node_allow_lan_access = true;
        b.prefs.accept_routes = true;
        assert!(!needs_new_session(&a, &b));
        let mut c = a.clone();
        c.insecure_http = true;
        assert!(needs_new_session(&a, &c), "how the server is reached");
        b.prefs.advertise_exit_node = true;
        assert!(needs_new_session(&a, &b));
        let mut c = a.clone();
        c.hostname = "laptop".into();
        assert!(needs_new_session(&a, &c));
    }

    #[test]
    fn hostnames_are_dns_labels() {
        assert!(valid_hostname("dev-m1sk9-s1"));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname(&"a".repeat(64)));
    }
}
