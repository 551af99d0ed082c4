//! Joining a coordination server: tsunagud as a Tailscale-protocol client.
//!
//! Identity lives in the state directory (machine and node keys, mode 0600) so a
//! restarted daemon comes back as the same node without authenticating again. The loop:
//! fetch the server key, dial (Noise + HTTP/2), register (with the auth key the first
//! time), send an endpoint update, then follow the map stream, turning every message into
//! a `NetMap` for the engine. On any error it retries with backoff and jitter; the data
//! plane keeps running on the last map meanwhile.

use crate::api::Shared;
use anyhow::Context as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tsunagu_client::netmap::{MapState, Prefs};
use tsunagu_client::{ControlClient, fetch_server_key};
use tsunagu_engine::engine::{Engine, EngineConfig};
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, RegisterResponseAuth,
};
use tsunagu_proto::{MachinePrivate, NodePrivate};

/// What the daemon needs to join.
#[derive(Debug, Clone)]
pub struct JoinArgs {
    pub login_server: String,
    pub auth_key: Option<String>,
    pub state_dir: PathBuf,
    pub hostname: String,
    pub advertise_tags: Vec<String>,
    pub prefs: Prefs,
    pub engine: EngineConfig,
    pub mtu: u16,
    /// The local API's Unix socket.
    pub socket: PathBuf,
}

fn read_or_create<T: std::str::FromStr + std::fmt::Display>(
    path: &Path,
    make: impl FnOnce() -> T,
) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let v = make();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(f, "{v}")?;
            f.sync_all()?;
            Ok(v)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A node private key stored as `privkey:<hex>` via its base64 form's own wrapper.
struct StoredNodeKey(NodePrivate);

impl std::fmt::Display for StoredNodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.to_base64())
    }
}

impl std::str::FromStr for StoredNodeKey {
    type Err = tsunagu_proto::KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(StoredNodeKey)
    }
}

/// The node's local addresses with our port: what peers on the same networks, or on
/// public addresses, can reach directly (STUN-discovered endpoints come with the relay).
fn local_endpoints(port: u16, tun: &str) -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ifa in addrs {
        if ifa.interface_name == tun || ifa.interface_name == "lo" {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        let ip: Option<IpAddr> = if let Some(v4) = addr.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        };
        match ip {
            Some(IpAddr::V6(v6)) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {}
            Some(ip) if !ip.is_loopback() => {
                out.push(std::net::SocketAddr::new(ip, port).to_string())
            }
            _ => {}
        }
    }
    out
}

/// Run the control loop forever; the engine (started on the first usable map) is put
/// into `engine` so that the signal handler can shut it down.
pub async fn run(args: JoinArgs, engine: Arc<Mutex<Option<Engine>>>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let machine: MachinePrivate = read_or_create(
        &args.state_dir.join("machine.key"),
        MachinePrivate::generate,
    )?;
    let node = read_or_create(&args.state_dir.join("node.key"), || {
        StoredNodeKey(NodePrivate::generate())
    })?
    .0;
    let prefs_path = args.state_dir.join("prefs.json");
    let mut prefs = args.prefs.clone();
    match crate::api::load_prefs(&prefs_path) {
        Ok(Some(saved)) => {
            // A choice on the command line wins over the saved one.
            if prefs.exit_node.is_empty() {
                prefs.exit_node = saved.exit_node;
            }
            prefs.exit_node_allow_lan_access |= saved.exit_node_allow_lan_access;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("ignoring saved preferences: {e:#}"),
    }
    let shared = Arc::new(Shared {
        prefs: Mutex::new(prefs),
        map: Mutex::new(MapState::default()),
        engine,
        engine_cfg: args.engine.clone(),
        node: node.clone(),
        mtu: args.mtu,
        prefs_path,
    });
    let api = shared.clone();
    let socket = args.socket.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::api::serve(socket, api).await {
            tracing::error!("local API stopped: {e:#}");
        }
    });
    let mut backoff = Duration::from_millis(500);
    loop {
        match session(&args, &machine, &node, &shared).await {
            Ok(()) => tracing::info!("map stream ended; reconnecting"),
            Err(e) => tracing::warn!("control: {e:#}; retrying in {backoff:?}"),
        }
        let jitter = Duration::from_millis(rand_jitter(backoff.as_millis() as u64 / 2));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn rand_jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    if max == 0 { 0 } else { nanos % max }
}

fn hostinfo(args: &JoinArgs) -> Hostinfo {
    let mut hi = Hostinfo {
        hostname: args.hostname.clone(),
        os: "linux".into(),
        request_tags: args.advertise_tags.clone(),
        ..Hostinfo::default()
    };
    if args.prefs.advertise_exit_node {
        hi.routable_ips = vec![
            "0.0.0.0/0".parse().expect("literal"),
            "::/0".parse().expect("literal"),
        ];
    }
    hi
}

async fn session(
    args: &JoinArgs,
    machine: &MachinePrivate,
    node: &NodePrivate,
    shared: &Shared,
) -> anyhow::Result<()> {
    let server_key = fetch_server_key(&args.login_server).await?;
    let mut client = ControlClient::connect(&args.login_server, &server_key, machine).await?;
    let reg = RegisterRequest {
        version: CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        hostinfo: Some(hostinfo(args)),
        auth: args.auth_key.as_ref().map(|k| RegisterResponseAuth {
            auth_key: k.clone(),
            ..RegisterResponseAuth::default()
        }),
        ..RegisterRequest::default()
    };
    let r = client.register(&reg).await?;
    if !r.error.is_empty() {
        anyhow::bail!("the server refused the registration: {}", r.error);
    }
    if !r.auth_url.is_empty() {
        anyhow::bail!(
            "the server wants interactive login at {} (give --auth-key)",
            r.auth_url
        );
    }
    if !r.machine_authorized {
        anyhow::bail!("this node is not authorized yet");
    }
    let port = args.engine.listen_port;
    let update = MapRequest {
        version: CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        hostinfo: Some(hostinfo(args)),
        endpoints: local_endpoints(port, &args.engine.tun_name),
        omit_peers: true,
        ..MapRequest::default()
    };
    client.map(&update).await?;
    let req = MapRequest {
        version: CURRENT_CAPABILITY_VERSION,
        compress: "zstd".into(),
        keep_alive: true,
        node_key: node.public(),
        stream: true,
        ..MapRequest::default()
    };
    let mut stream = client.map(&req).await?;
    let mut state = MapState::default();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(150), stream.next())
        .await
        .context("no message (not even a keep-alive) for 150 s")?
    {
        let msg = msg?;
        if msg.keep_alive {
            continue;
        }
        // Prefs first, then the map, then the engine: the lock order `Shared` documents.
        let prefs = shared
            .prefs
            .lock()
            .map_err(|_| anyhow::anyhow!("prefs lock poisoned"))?;
        state.apply(&msg);
        *shared
            .map
            .lock()
            .map_err(|_| anyhow::anyhow!("map lock poisoned"))? = state.clone();
        if let Err(e) = shared.apply_locked(&prefs) {
            if e.downcast_ref::<tsunagu_client::netmap::PrefsError>()
                .is_some()
            {
                tracing::error!("cannot apply the preferences to this map: {e}");
                continue;
            }
            if shared.engine.lock().map(|g| g.is_none()).unwrap_or(false) {
                return Err(e);
            }
            tracing::error!("{e:#}");
        }
        drop(prefs);
        tracing::debug!(peers = state.peers.len(), "map applied");
    }
    Ok(())
}
