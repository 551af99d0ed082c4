//! The local API: JSON over HTTP/1.1 on a Unix socket (mode 0600), for the `tsunagu` CLI.
//!
//! `GET /status` describes this node and its peers as the daemon knows them (map stream +
//! engine); `POST /prefs` changes the exit node choice, checked against the current map,
//! applied at once and persisted to `<state-dir>/prefs.json`.

use anyhow::Context as _;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tsunagu_client::netmap::{MapState, Prefs, short_name};
use tsunagu_engine::engine::{Engine, EngineConfig};
use tsunagu_proto::NodePrivate;

/// A handshake younger than this makes a peer "active" (WireGuard rekeys every 2 min
/// while traffic flows).
const ACTIVE_SECS: u64 = 180;

/// What the control loop and the API share.
pub struct Shared {
    /// The user's choices; locked first (then `map`, then `engine`) by whoever applies.
    pub prefs: Mutex<Prefs>,
    pub map: Mutex<MapState>,
    pub engine: Arc<Mutex<Option<Engine>>>,
    pub engine_cfg: EngineConfig,
    pub node: NodePrivate,
    pub mtu: u16,
    pub prefs_path: PathBuf,
}

impl Shared {
    /// Build the NetMap from the current map and `prefs` and give it to the engine
    /// (starting it on the first usable map). Callers hold the prefs lock.
    pub fn apply_locked(&self, prefs: &Prefs) -> anyhow::Result<()> {
        let map = {
            let state = self
                .map
                .lock()
                .map_err(|_| anyhow::anyhow!("map lock poisoned"))?;
            match state.netmap(&self.node, prefs, self.mtu)? {
                Some(m) => m,
                None => return Ok(()),
            }
        };
        let mut guard = self
            .engine
            .lock()
            .map_err(|_| anyhow::anyhow!("engine lock poisoned"))?;
        match guard.as_mut() {
            Some(e) => {
                if e.map() != &map {
                    e.apply(&map).context("the engine refused the map")?;
                }
            }
            None => {
                let e =
                    Engine::start(self.engine_cfg.clone(), &map).context("starting the engine")?;
                tracing::info!(
                    name = %map.self_node.name,
                    addresses = ?map.self_node.addresses,
                    exit_node = map.exit_peer().map(|p| p.name.as_str()).unwrap_or("none"),
                    "running"
                );
                *guard = Some(e);
            }
        }
        Ok(())
    }
}

/// Prefs saved in the state directory, if any.
pub fn load_prefs(path: &Path) -> anyhow::Result<Option<Prefs>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(
            serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write prefs atomically with mode 0600.
pub fn save_prefs(path: &Path, prefs: &Prefs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(serde_json::to_string_pretty(prefs)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub dns_name: String,
    pub addresses: Vec<String>,
    pub user: String,
    pub os: String,
    pub running: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExitStatus {
    /// As the user gave it.
    pub chosen: String,
    pub name: String,
    pub ip: String,
    /// `active`, `idle`, `offline`, `connecting`, or the error that keeps it unused.
    pub state: String,
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
    pub last_handshake_secs: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    #[serde(rename = "self")]
    pub self_node: Option<SelfStatus>,
    pub exit_node: Option<ExitStatus>,
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Deserialize)]
pub struct PrefsRequest {
    pub exit_node: Option<String>,
    pub exit_node_allow_lan_access: Option<bool>,
}

#[derive(Debug, Serialize)]
struct ApiError {
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

fn activity(online: Option<bool>, hs: Option<u64>) -> &'static str {
    match (online, hs) {
        (Some(false), _) => "offline",
        (_, Some(s)) if s < ACTIVE_SECS => "active",
        (_, Some(_)) => "idle",
        _ => "-",
    }
}

pub fn status(shared: &Shared) -> anyhow::Result<Status> {
    let prefs = shared
        .prefs
        .lock()
        .map_err(|_| anyhow::anyhow!("prefs lock poisoned"))?
        .clone();
    let state = shared
        .map
        .lock()
        .map_err(|_| anyhow::anyhow!("map lock poisoned"))?
        .clone();
    let (running, engine_peers, exit_key) = match shared.engine.lock() {
        Ok(g) => match g.as_ref() {
            Some(e) => (true, e.device().peers(), e.map().exit_node),
            None => (false, Vec::new(), None),
        },
        Err(_) => (false, Vec::new(), None),
    };
    let self_node = state.self_node.as_ref().map(|n| SelfStatus {
        name: short_name(n).to_string(),
        dns_name: n.name.clone(),
        addresses: n.addresses.iter().map(|a| a.addr().to_string()).collect(),
        user: state.user_name(n),
        os: n.hostinfo.os.clone(),
        running,
    });
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
            last_handshake_secs: es.and_then(|e| e.last_handshake_secs),
            tx_bytes: es.map_or(0, |e| e.tx_bytes),
            rx_bytes: es.map_or(0, |e| e.rx_bytes),
        });
    }
    let exit_node = if prefs.exit_node.is_empty() {
        None
    } else {
        Some(match state.resolve_exit(&prefs.exit_node) {
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
                    allow_lan_access: prefs.exit_node_allow_lan_access,
                }
            }
            Ok(None) => unreachable!("non-empty choice"),
            Err(e) => ExitStatus {
                chosen: prefs.exit_node.clone(),
                name: String::new(),
                ip: String::new(),
                state: format!("unusable: {e}"),
                allow_lan_access: prefs.exit_node_allow_lan_access,
            },
        })
    };
    Ok(Status {
        self_node,
        exit_node,
        peers,
    })
}

/// Validate and apply new prefs; on success they are persisted and in force.
pub fn set_prefs(shared: &Shared, req: &PrefsRequest) -> Result<Prefs, (StatusCode, String)> {
    let internal = |e: &dyn std::fmt::Display| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let mut prefs = shared
        .prefs
        .lock()
        .map_err(|_| internal(&"prefs lock poisoned"))?;
    let mut next = prefs.clone();
    if let Some(x) = &req.exit_node {
        next.exit_node = x.trim().to_string();
    }
    if let Some(l) = req.exit_node_allow_lan_access {
        next.exit_node_allow_lan_access = l;
    }
    {
        let state = shared
            .map
            .lock()
            .map_err(|_| internal(&"map lock poisoned"))?;
        if state.self_node.is_none() && !next.exit_node.is_empty() {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "no network map yet (not connected to the coordination server)".into(),
            ));
        }
        state
            .resolve_exit(&next.exit_node)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    }
    shared.apply_locked(&next).map_err(|e| internal(&e))?;
    save_prefs(&shared.prefs_path, &next).map_err(|e| internal(&format!("{e:#}")))?;
    tracing::info!(
        exit_node = if next.exit_node.is_empty() {
            "none"
        } else {
            next.exit_node.as_str()
        },
        allow_lan = next.exit_node_allow_lan_access,
        "preferences changed"
    );
    *prefs = next.clone();
    Ok(next)
}

async fn get_status(State(shared): State<Arc<Shared>>) -> ApiResult<Status> {
    tokio::task::spawn_blocking(move || status(&shared))
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map(Json)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
}

async fn post_prefs(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<PrefsRequest>,
) -> ApiResult<Prefs> {
    tokio::task::spawn_blocking(move || set_prefs(&shared, &req))
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map(Json)
        .map_err(|(c, e)| err(c, e))
}

/// Bind the socket (replacing a stale one, mode 0600) and serve until the process ends.
pub async fn serve(path: PathBuf, shared: Arc<Shared>) -> anyhow::Result<()> {
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
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    tracing::info!(path = %path.display(), "local API listening");
    let app = axum::Router::new()
        .route("/status", get(get_status))
        .route("/prefs", post(post_prefs))
        .with_state(shared);
    axum::serve(listener, app).await.context("local API")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefs_round_trip_with_owner_only_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.json");
        assert_eq!(load_prefs(&path).unwrap(), None);
        let p = Prefs {
            exit_node: "dev-m1sk9-s1".into(),
            exit_node_allow_lan_access: true,
            advertise_exit_node: false,
        };
        save_prefs(&path, &p).unwrap();
        save_prefs(&path, &p).unwrap();
        assert_eq!(load_prefs(&path).unwrap(), Some(p));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn activity_words() {
        assert_eq!(activity(Some(false), Some(1)), "offline");
        assert_eq!(activity(Some(true), Some(1)), "active");
        assert_eq!(activity(None, Some(500)), "idle");
        assert_eq!(activity(Some(true), None), "-");
    }
}
