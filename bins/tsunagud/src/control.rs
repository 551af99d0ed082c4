//! Joining a coordination server: tsunagud as a Tailscale-protocol client.
//!
//! Identity lives in the state directory (machine and node keys, mode 0600) so a
//! restarted daemon comes back as the same node without authenticating again. The loop:
//! fetch the server key, dial (Noise + HTTP/2), register (with the auth key the first
//! time), send an endpoint update, then follow the map stream, turning every message into
//! a `NetMap` for the engine. On any error it retries with backoff and jitter; the data
//! plane keeps running on the last map meanwhile.

use crate::api::{BackendState, DaemonPrefs, Shared};
use anyhow::Context as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tsunagu_client::netmap::{MapState, Prefs};
use tsunagu_client::transport::{ServerSecurity, check_server_url};
use tsunagu_client::{ControlClient, fetch_server_key_marked};
use tsunagu_engine::engine::{Engine, EngineConfig};
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, RegisterResponseAuth,
};
use tsunagu_proto::{MachinePrivate, NodePrivate};

/// What the daemon starts with: settings from the command line override the saved ones.
#[derive(Debug, Clone)]
pub struct JoinArgs {
    /// From `--login-server` (then the daemon also wants to run).
    pub login_server: Option<String>,
    pub auth_key: Option<String>,
    /// From `--standby-key`: join an exit node as a standby host.
    pub standby_key: Option<String>,
    /// From `--prefer`.
    pub prefer: bool,
    pub state_dir: PathBuf,
    /// The system's hostname (used when none is configured).
    pub default_hostname: String,
    pub hostname: Option<String>,
    pub advertise_tags: Vec<String>,
    pub prefs: Prefs,
    /// `--insecure-http`: plain HTTP to a login server off loopback.
    pub insecure_http: bool,
    pub engine: EngineConfig,
    pub mtu: u16,
    /// The local API's Unix socket.
    pub socket: PathBuf,
    pub operator_group: Option<nix::unistd::Gid>,
    /// The relay connections: home region, idle time of the others.
    pub relay: crate::relay::PoolConfig,
    /// How long forwarding goes on after the exit-node offer is withdrawn.
    pub exit_drain: Duration,
}

/// How long connecting to the server, or one registration, may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

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
fn local_endpoints(port: u16, tun: &str) -> Vec<std::net::SocketAddr> {
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
            Some(ip) if !ip.is_loopback() => out.push(std::net::SocketAddr::new(ip, port)),
            _ => {}
        }
    }
    out
}

/// Our endpoints as peers should try them: the public one STUN found first, then the
/// local addresses.
fn endpoints(shared: &Shared, port: u16, tun: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = shared.stun.latest() {
        out.push(r.mapped);
    }
    for e in local_endpoints(port, tun) {
        if !out.contains(&e) {
            out.push(e);
        }
    }
    // The engine tells peers the same in its CallMeMaybe messages.
    if let Ok(mut eps) = shared.endpoints.lock() {
        eps.clone_from(&out);
    }
    if let Ok(g) = shared.engine.lock()
        && let Some(e) = g.as_ref()
    {
        e.device().set_endpoints(out.clone());
    }
    out.iter().map(ToString::to_string).collect()
}

/// Load the identity and settings, start the local API, and run the control loop
/// forever. The engine (started on the first usable map) lives in `engine`, so that the
/// signal handler can stop it.
pub async fn run(args: JoinArgs, engine: Arc<Mutex<Option<Engine>>>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let machine: MachinePrivate = read_or_create(
        &args.state_dir.join("machine.key"),
        MachinePrivate::generate,
    )?;
    let machine_public = machine.public().to_string();
    let node = read_or_create(&args.state_dir.join("node.key"), || {
        StoredNodeKey(NodePrivate::generate())
    })?
    .0;
    // A crash may have left our resolv.conf in place: the original goes back first.
    crate::dns::repair(&args.state_dir);
    let prefs_path = args.state_dir.join("prefs.json");
    let on_disk = match crate::api::load_prefs(&prefs_path) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("ignoring saved settings: {e:#}");
            None
        }
    };
    let mut saved = on_disk.clone().unwrap_or_default();
    // What the command line says wins over what was saved.
    if let Some(url) = &args.login_server {
        if saved.login_server != *url {
            saved.logged_out = false;
        }
        saved.login_server.clone_from(url);
        saved.want_running = true;
    }
    if args.auth_key.is_some() || args.standby_key.is_some() {
        saved.logged_out = false;
    }
    if args.standby_key.is_some() {
        saved.prefs.advertise_exit_node = true;
    }
    saved.prefer |= args.prefer;
    if let Some(h) = &args.hostname {
        saved.hostname.clone_from(h);
    }
    if !args.advertise_tags.is_empty() {
        saved.advertise_tags.clone_from(&args.advertise_tags);
    }
    if !args.prefs.exit_node.is_empty() {
        saved.prefs.exit_node.clone_from(&args.prefs.exit_node);
    }
    saved.prefs.exit_node_allow_lan_access |= args.prefs.exit_node_allow_lan_access;
    saved.prefs.advertise_exit_node |= args.prefs.advertise_exit_node;
    saved.prefs.accept_routes |= args.prefs.accept_routes;
    saved.insecure_http |= args.insecure_http;
    if on_disk.as_ref() != Some(&saved) {
        // A restart without those flags comes back the same.
        crate::api::save_prefs(&prefs_path, &saved)?;
    }
    let peerapi_port = crate::dns::peerapi_port(&node.public().0);
    // Fail closed from boot: with an exit node chosen, block the internet now, before
    // the server is reached (it may never be, on a network that blocks it); the engine
    // converges from this block when the first map comes.
    let mut start_block = false;
    if saved.want_running
        && !saved.logged_out
        && !saved.login_server.is_empty()
        && !saved.prefs.exit_node.is_empty()
    {
        match tsunagu_engine::engine::block_internet(
            &args.engine,
            saved.prefs.exit_node_allow_lan_access,
        ) {
            Ok(()) => {
                start_block = true;
                tracing::info!(
                    exit_node = %saved.prefs.exit_node,
                    "internet blocked until the exit node is reached (fail closed from start)"
                );
            }
            Err(e) => tracing::error!("cannot block the internet before the first map: {e:#}"),
        }
    }
    let (backend, _) = tokio::sync::watch::channel(crate::api::Backend::default());
    let (generation, _) = tokio::sync::watch::channel(0u64);
    let shared = Arc::new(Shared {
        prefs: Mutex::new(saved),
        map: Mutex::new(MapState::default()),
        engine,
        engine_cfg: args.engine.clone(),
        machine,
        node: Mutex::new(node),
        mtu: args.mtu,
        state_dir: args.state_dir.clone(),
        default_hostname: args.default_hostname.clone(),
        auth_key: Mutex::new(args.auth_key.clone()),
        standby_key: Mutex::new(args.standby_key.clone()),
        standby: Mutex::new(None),
        backend,
        generation,
        relay: Mutex::new(None),
        relay_cfg: crate::relay::PoolConfig {
            host: machine_public.clone(),
            ..args.relay.clone()
        },
        stun: Arc::new(crate::netcheck::Stun::default()),
        // A disco key for this run, as Tailscale clients make one per process: peers
        // find direct paths to us with disco pings sealed to it.
        disco: Mutex::new(tsunagu_disco::DiscoPrivate::generate()),
        endpoints: Mutex::new(Vec::new()),
        exit_drain: args.exit_drain,
        drain_until: Mutex::new(None),
        dns: crate::dns::Dns::new(
            tokio::runtime::Handle::current(),
            &args.state_dir,
            &args.engine.tun_name,
            peerapi_port,
        ),
        start_block: std::sync::atomic::AtomicBool::new(start_block),
    });
    let api = shared.clone();
    let socket = args.socket.clone();
    let group = args.operator_group;
    tokio::spawn(async move {
        if let Err(e) = crate::api::serve(socket, group, api).await {
            tracing::error!("local API stopped: {e:#}");
        }
    });
    control_loop(&shared, args.engine.listen_port, &args.engine.tun_name).await;
    Ok(())
}

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Follow the settings: idle while logged out or down, otherwise one session after the
/// other with backoff and jitter; a change of settings starts a new session at once.
async fn control_loop(shared: &Shared, port: u16, tun: &str) {
    let mut wake = shared.generation.subscribe();
    let mut backoff = MIN_BACKOFF;
    loop {
        let generation = *wake.borrow_and_update();
        let p = match shared.prefs.lock() {
            Ok(p) => p.clone(),
            Err(_) => return,
        };
        let idle = if p.login_server.is_empty() || p.logged_out {
            Some(BackendState::NeedsLogin)
        } else if !p.want_running {
            Some(BackendState::Stopped)
        } else {
            None
        };
        if let Some(state) = idle {
            shared.stop_engine();
            shared.set_backend(generation, state, "", "");
            let _ = wake.changed().await;
            backoff = MIN_BACKOFF;
            continue;
        }
        if shared.backend.borrow().state != BackendState::Running {
            shared.set_backend(generation, BackendState::Starting, "", "");
        }
        let result = tokio::select! {
            r = session(shared, &p, generation, port, tun) => Some(r),
            _ = wake.changed() => None,
        };
        match result {
            None => {
                backoff = MIN_BACKOFF;
                continue;
            }
            Some(Ok(())) => {
                backoff = MIN_BACKOFF;
                tracing::info!("map stream ended; reconnecting");
            }
            Some(Err(e)) => {
                tracing::warn!("control: {e:#}; retrying in {backoff:?}");
                let b = shared.backend.borrow().clone();
                let state = if b.state == BackendState::Running {
                    // The data plane keeps running on the last map.
                    BackendState::Running
                } else {
                    b.state
                };
                shared.set_backend(generation, state, &b.auth_url, &format!("{e:#}"));
            }
        }
        let jitter = Duration::from_millis(rand_jitter(backoff.as_millis() as u64 / 2));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = wake.changed() => { backoff = MIN_BACKOFF; continue; }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn rand_jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    if max == 0 { 0 } else { nanos % max }
}

fn hostinfo(shared: &Shared, p: &DaemonPrefs) -> Hostinfo {
    let mut hi = Hostinfo {
        hostname: shared.hostname(p),
        os: "linux".into(),
        request_tags: p.advertise_tags.clone(),
        ..Hostinfo::default()
    };
    // The PeerAPI (DNS over HTTPS for the peers that use us as exit node), as Go
    // clients announce theirs.
    for proto in ["peerapi4", "peerapi6"] {
        hi.services.push(tsunagu_proto::tailcfg::Service {
            proto: proto.into(),
            port: shared.dns.port(),
            ..Default::default()
        });
    }
    hi.services.push(tsunagu_proto::tailcfg::Service {
        proto: "peerapi-dns-proxy".into(),
        port: 1,
        ..Default::default()
    });
    // Tells the server this node can hand its key over and stand by (standby hosts).
    hi.app = crate::standby_app().into();
    if p.prefs.advertise_exit_node {
        hi.routable_ips = vec![
            "0.0.0.0/0".parse().expect("literal"),
            "::/0".parse().expect("literal"),
        ];
    }
    // Our home relay, in every report: a restarted server only knows it from us.
    if let Some(region) = shared.home_relay().map(|h| h.region) {
        hi.net_info = Some(tsunagu_proto::tailcfg::NetInfo {
            preferred_derp: i32::from(region),
            ..Default::default()
        });
    }
    hi
}

/// A map request without a stream that tells the server what it should know of us:
/// hostinfo (with the home relay) and endpoints (the public one from STUN first).
fn report(
    shared: &Shared,
    p: &DaemonPrefs,
    node: &NodePrivate,
    port: u16,
    tun: &str,
) -> MapRequest {
    MapRequest {
        version: CURRENT_CAPABILITY_VERSION,
        disco_key: shared.disco_key().public(),
        node_key: node.public(),
        hostinfo: Some(hostinfo(shared, p)),
        endpoints: endpoints(shared, port, tun),
        omit_peers: true,
        tsunagu_host: crate::standby::host_report(shared, p),
        ..MapRequest::default()
    }
}

async fn bounded<T, E: Into<anyhow::Error>>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CONTROL_TIMEOUT, f).await {
        Ok(r) => r.map_err(Into::into).with_context(|| what.to_string()),
        Err(_) => anyhow::bail!("{what}: timed out after {CONTROL_TIMEOUT:?}"),
    }
}

/// Dial the server on a socket with the engine's bypass mark, so the control
/// connection takes the physical network whatever the tunnel does with the default
/// route (exit node, or its fail-closed block). Plain HTTP only to loopback, or with
/// `insecure_http` (see `tsunagu_client::transport::check_server_url`).
async fn connect(
    server: &str,
    insecure_http: bool,
    machine: &MachinePrivate,
    fwmark: u32,
) -> anyhow::Result<ControlClient> {
    check_server_url(server, insecure_http)?;
    let what = format!("cannot reach the coordination server {server}");
    let mark = Some(fwmark);
    let server_key = bounded(&what, fetch_server_key_marked(server, mark)).await?;
    bounded(
        &what,
        ControlClient::connect_marked(server, &server_key, machine, mark),
    )
    .await
}

/// Tell the server this node logs out (its key expires now).
pub async fn logout(
    server: &str,
    insecure_http: bool,
    machine: &MachinePrivate,
    node: &NodePrivate,
    fwmark: u32,
) -> anyhow::Result<()> {
    let mut client = connect(server, insecure_http, machine, fwmark).await?;
    let reg = RegisterRequest {
        version: CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        expiry: tsunagu_proto::tailcfg::Time(chrono::Utc::now() - chrono::Duration::seconds(1)),
        ..RegisterRequest::default()
    };
    let r = bounded("logging out", client.register(&reg)).await?;
    if !r.error.is_empty() {
        anyhow::bail!("the server refused the logout: {}", r.error);
    }
    Ok(())
}

async fn session(
    shared: &Shared,
    p: &DaemonPrefs,
    generation: u64,
    port: u16,
    tun: &str,
) -> anyhow::Result<()> {
    let mut p = p.clone();
    let p = &mut p;
    let server = p.login_server.clone();
    let server = server.as_str();
    if check_server_url(server, p.insecure_http)? == ServerSecurity::Insecure {
        tracing::warn!(
            %server,
            "plain HTTP to the coordination server (--insecure-http): its key is not authenticated; use https:// outside a lab"
        );
    }
    let mut node = shared.node_key();
    let mut client = connect(
        server,
        p.insecure_http,
        &shared.machine,
        shared.engine_cfg.fwmark,
    )
    .await?;
    let auth_key = shared.auth_key.lock().ok().and_then(|k| k.clone());
    // A standby key until the server granted the identity (then this host registers
    // with the identity's key).
    let standby_key = shared.standby_key.lock().ok().and_then(|k| k.clone());
    let mut reg = RegisterRequest {
        version: CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        hostinfo: Some(hostinfo(shared, p)),
        auth: standby_key
            .as_ref()
            .or(auth_key.as_ref())
            .map(|k| RegisterResponseAuth {
                auth_key: k.clone(),
                ..RegisterResponseAuth::default()
            }),
        ..RegisterRequest::default()
    };
    let mut r = bounded("registering", client.register(&reg)).await?;
    if !r.error.is_empty() {
        anyhow::bail!("the server refused the registration: {}", r.error);
    }
    if !r.auth_url.is_empty() && !r.machine_authorized {
        // Interactive: an admin approves the node; the follow-up waits for that.
        let url = r.auth_url.clone();
        if standby_key.is_some() {
            tracing::info!(%url, "waiting for the exit node's active host to hand its key over");
        } else {
            tracing::info!(%url, "waiting for an admin to approve this node");
        }
        shared.set_backend(generation, BackendState::NeedsMachineAuth, &url, "");
        reg.auth = None;
        reg.followup = url.clone();
        loop {
            r = client.register(&reg).await?;
            if !r.error.is_empty() {
                anyhow::bail!("the server refused the registration: {}", r.error);
            }
            if r.machine_authorized {
                break;
            }
        }
        shared.set_backend(generation, BackendState::Starting, "", "");
    }
    if let Some(grant) = r.tsunagu_standby.take() {
        // A standby host: from now on it registers and runs as the exit node.
        *p = crate::standby::install_grant(shared, &grant)?;
        node = shared.node_key();
        reg = RegisterRequest {
            version: CURRENT_CAPABILITY_VERSION,
            node_key: node.public(),
            hostinfo: Some(hostinfo(shared, p)),
            ..RegisterRequest::default()
        };
        r = bounded("registering as the exit node", client.register(&reg)).await?;
        if !r.error.is_empty() {
            anyhow::bail!("the server refused the registration: {}", r.error);
        }
    }
    if !r.machine_authorized {
        anyhow::bail!("this node is not authorized yet");
    }
    if let Ok(mut k) = shared.auth_key.lock() {
        *k = None; // used
    }
    bounded(
        "sending endpoints",
        client.map(&report(shared, p, &node, port, tun)),
    )
    .await?;
    let req = MapRequest {
        version: CURRENT_CAPABILITY_VERSION,
        disco_key: shared.disco_key().public(),
        compress: "zstd".into(),
        keep_alive: true,
        node_key: node.public(),
        stream: true,
        ..MapRequest::default()
    };
    let mut stream = bounded("starting the map stream", client.map(&req)).await?;
    let mut state = MapState::default();
    // STUN every 20 s (and right after the relay is known): when the public endpoint
    // changes, the server hears it, and so do our peers.
    let mut stun_tick = tokio::time::interval(Duration::from_secs(20));
    stun_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = shared.stun.latest().map(|r| r.mapped);
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(Duration::from_secs(150), stream.next()) => {
                match m.context("no message (not even a keep-alive) for 150 s")? {
                    Some(m) => m?,
                    None => break,
                }
            }
            _ = stun_tick.tick() => {
                shared.probe_stun(&state);
                // An exit node closes its host's new addresses to what it forwards.
                shared.refresh_host();
                continue;
            }
            _ = shared.stun.answered.notified() => {
                let mapped = shared.stun.latest().map(|r| r.mapped);
                if mapped.is_some() && mapped != reported {
                    tracing::info!(endpoint = ?mapped, "public endpoint (STUN)");
                    reported = mapped;
                    let update = report(shared, p, &node, port, tun);
                    bounded("reporting endpoints", client.map(&update)).await?;
                }
                continue;
            }
        };
        if msg.keep_alive {
            continue;
        }
        if let Some(info) = msg.tsunagu_standby.clone() {
            // The role first: the first map must not start the data plane in the wrong
            // one, and a host that loses the role stops answering now.
            let handover = info.handover;
            crate::standby::wind_down(shared, &info).await;
            if crate::standby::on_info(shared, info) {
                let confirm = report(shared, p, &node, port, tun);
                bounded("confirming the host role", client.map(&confirm)).await?;
            }
            if handover {
                let body = tsunagu_proto::tailcfg::HandoverRequest {
                    node_key: node.public(),
                    private: tsunagu_proto::tailcfg::WireNodePrivate(node.clone()),
                };
                // Another host may have been first: the server then says no one waits.
                match bounded(
                    "handing the key over",
                    client.post_json(tsunagu_proto::tailcfg::HANDOVER_PATH, &body),
                )
                .await
                {
                    Ok(_) => {
                        tracing::info!("handed the exit node's key over to a new standby host")
                    }
                    Err(e) => tracing::debug!("key handover: {e:#}"),
                }
            }
            let rest = tsunagu_proto::tailcfg::MapResponse {
                tsunagu_standby: None,
                ..msg.clone()
            };
            if rest.is_empty() {
                continue;
            }
        }
        // Prefs first, then the map, then the engine: the lock order `Shared` documents.
        let (relay_changed, applied) = {
            let prefs = shared
                .prefs
                .lock()
                .map_err(|_| anyhow::anyhow!("prefs lock poisoned"))?;
            state.apply(&msg);
            let relay_changed = shared.ensure_relay(&mut state, server);
            *shared
                .map
                .lock()
                .map_err(|_| anyhow::anyhow!("map lock poisoned"))? = state.clone();
            (relay_changed, shared.apply_locked(&prefs))
        };
        if relay_changed {
            // Tell the server (and so our peers) where we can be reached through a relay.
            let update = report(shared, p, &node, port, tun);
            bounded("reporting the home relay", client.map(&update)).await?;
            shared.probe_stun(&state);
        }
        if let Err(e) = applied {
            if shared.engine.lock().map(|g| g.is_none()).unwrap_or(false) {
                return Err(e);
            }
            tracing::error!("{e:#}");
        }
        if shared.backend.borrow().state != BackendState::Running
            || shared.backend.borrow().generation != generation
            || !shared.backend.borrow().error.is_empty()
        {
            shared.set_backend(generation, BackendState::Running, "", "");
        }
        tracing::debug!(peers = state.peers.len(), "map applied");
    }
    Ok(())
}
