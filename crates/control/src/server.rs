//! The server process: HTTP front (key, ts2021 upgrade), Noise sessions carrying HTTP/2,
//! the admin socket, and housekeeping (ephemeral nodes).
//!
//! ```text
//!  client ──TCP──► axum: GET /key ─────────────► {"publicKey":"mkey:…"}
//!                        POST /ts2021 (Upgrade) ─► Noise IK responder (tsunagu-noise)
//!                           └─ HTTP/2 over Noise ─► /machine/register, /machine/map
//!                        GET /derp (Upgrade) ────► DERP relay (tsunagu-derp, see [`crate::relay`])
//!         ──UDP──► STUN ─────────────────────────► the relay's STUN server
//!                        anything else ─────────► 501 with a clear message
//!  admin CLI ─Unix socket (0600)─► admin API (JSON)
//! ```
//!
//! Every input is bounded ([`crate::limits::Limits`]): connections per source address
//! and the header-read timeout on the listener ([`crate::front`]); on a Noise session,
//! HTTP/2 streams at once, body sizes per endpoint, and an idle timeout for sessions
//! with nothing in flight.

use crate::admin;
use crate::front::{self, Activity, ConnCounter};
use crate::limits::{Limits, NOISE_HANDSHAKE_TIMEOUT};
use crate::machine::{self, App, MachineCtx};
use crate::relay::RelaySettings;
use crate::state::State;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State as AxState};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tsunagu_proto::tailcfg::{
    DERPMap, MIN_SUPPORTED_CAPABILITY_VERSION, MIN_SUPPORTED_TAILSCALE_RELEASE,
    OverTLSPublicKeyResponse,
};
use tsunagu_proto::{MachinePrivate, MachinePublic};
use tsunagu_store::Store;

/// The MagicDNS suffix of node names by default (see [`crate::dns`]).
pub const DOMAIN: &str = crate::dns::DEFAULT_BASE_DOMAIN;
/// File holding the server's Noise private key.
pub const KEY_FILE: &str = "noise.key";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub server_url: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub policy_file: Option<PathBuf>,
    pub admin_socket: PathBuf,
    pub ephemeral_timeout: Duration,
    /// The embedded DERP relay and STUN server; `None` runs none.
    pub relay: Option<RelaySettings>,
    /// Relay regions run elsewhere, announced in the DERP map after the embedded one
    /// (checked: no ID or code twice, the embedded region's included).
    pub derp_regions: Vec<crate::relay::RegionSpec>,
    /// The tailnet's DNS settings (checked), sent to every node.
    pub dns: crate::dns::DnsSettings,
    /// An exit node's active host gone (map stream and relay connection) this long: a
    /// ready standby host takes over.
    pub standby_failover_after: Duration,
    /// Bounds on connections, sessions, requests, registrations and key lifetimes.
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] tsunagu_store::StoreError),
    #[error("{0}")]
    Config(String),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

/// Load the server's Noise key, or create it (mode 0600) on first start.
pub fn load_or_create_key(data_dir: &FsPath) -> Result<MachinePrivate, ServerError> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .map_err(io_err(format!("creating {}", data_dir.display())))?;
            let key = MachinePrivate::generate();
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode_0600()
                    .open(&tmp)
                    .map_err(io_err(format!("creating {}", tmp.display())))?;
                writeln!(f, "{key}").map_err(io_err("writing the key"))?;
                f.sync_all().map_err(io_err("syncing the key"))?;
            }
            std::fs::rename(&tmp, &path)
                .map_err(io_err(format!("installing {}", path.display())))?;
            tracing::info!(path = %path.display(), "created the server's Noise key");
            Ok(key)
        }
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.mode(0o600)
    }
}

/// Everything a running server holds; built by [`Server::start`], used by tests too.
pub struct Server {
    pub app: Arc<App>,
    pub key: MachinePrivate,
    /// The embedded relay, when configured.
    pub relay: Option<Arc<tsunagu_derp::Relay>>,
    /// The bound STUN socket, until [`serve`] takes it.
    pub stun: Option<tokio::net::UdpSocket>,
    /// Open connections per source address on the client listener.
    pub connections: Arc<ConnCounter>,
}

impl Server {
    pub async fn start(cfg: &ServerConfig) -> Result<Server, ServerError> {
        cfg.limits
            .check()
            .map_err(|e| ServerError::Config(format!("limits: {e}")))?;
        let key = load_or_create_key(&cfg.data_dir)?;
        let store = Store::open(&cfg.data_dir).await?;
        if let Some(path) = &cfg.policy_file
            && store.get_policy().await?.is_none()
        {
            let text = std::fs::read_to_string(path)
                .map_err(io_err(format!("reading {}", path.display())))?;
            tsunagu_policy::Policy::parse(&text)
                .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
            store.set_policy(&text).await?;
        }
        let own = cfg
            .relay
            .as_ref()
            .map(|r| (r.region_id, r.region_code.as_str()));
        crate::relay::check_regions(own, &cfg.derp_regions)
            .map_err(|e| ServerError::Config(format!("DERP regions: {e}")))?;
        // The relay's client check asks the state, which needs the DERP map, which
        // needs the relay: the check finds the state through this cell, set below.
        let state_cell: Arc<std::sync::OnceLock<std::sync::Weak<State>>> = Arc::default();
        let (relay, stun, mut derp_map) = match &cfg.relay {
            Some(settings) => start_relay(cfg, settings, state_cell.clone()).await?,
            None => (None, None, DERPMap::default()),
        };
        for spec in &cfg.derp_regions {
            tracing::info!(
                region = spec.id,
                code = %spec.code,
                host = %spec.host,
                derp_port = spec.derp_port,
                stun_port = ?spec.stun_port,
                plain_http = spec.plain_http,
                "announcing a DERP region run elsewhere"
            );
            derp_map.regions.insert(i32::from(spec.id), spec.region());
        }
        let state = State::load_with(store, derp_map, &cfg.dns, cfg.limits.clone()).await?;
        let _ = state_cell.set(Arc::downgrade(&state));
        tracing::info!(
            magic_dns = cfg.dns.magic_dns,
            base_domain = %cfg.dns.base_domain,
            nameservers = cfg.dns.global.len(),
            split = cfg.dns.split.len(),
            "DNS settings"
        );
        state.standby.set_config(crate::standby::core::Config {
            unreachable_after: cfg.standby_failover_after,
            settle: cfg.standby_failover_after,
            relay: relay.is_some(),
        });
        if let Some(r) = &relay {
            state.standby.set_relay(r.clone());
        }
        let app = Arc::new(App::new(state, cfg.server_url.clone()));
        Ok(Server {
            app,
            key,
            relay,
            stun,
            connections: ConnCounter::new(cfg.limits.max_connections_per_ip),
        })
    }

    pub fn public_key(&self) -> MachinePublic {
        self.key.public()
    }

    /// The router for the client-facing port.
    pub fn router(&self) -> Router {
        let front = Front {
            app: self.app.clone(),
            key: self.key.to_bytes(),
        };
        let router = Router::new()
            .route("/key", get(get_key))
            .route("/ts2021", post(ts2021))
            .route("/register/{token}", get(register_page))
            .route("/standby/{name}", get(standby_page))
            .route("/health", get(|| async { "ok\n" }))
            .fallback(not_implemented)
            .with_state(Arc::new(front));
        match &self.relay {
            Some(relay) => router.merge(relay.router()),
            None => router,
        }
    }
}

type RelayParts = (
    Option<Arc<tsunagu_derp::Relay>>,
    Option<tokio::net::UdpSocket>,
    DERPMap,
);

/// The relay's key (created once in the data directory), its STUN socket, and the DERP
/// map announcing it. With `verify_clients`, the relay serves only node keys of the
/// tailnet that may be online (authorized, not expired), found through `state`.
async fn start_relay(
    cfg: &ServerConfig,
    s: &RelaySettings,
    state: Arc<std::sync::OnceLock<std::sync::Weak<State>>>,
) -> Result<RelayParts, ServerError> {
    let check = s.verify_clients.then(|| {
        tsunagu_derp::ClientCheck::new(move |key| {
            state
                .get()
                .and_then(std::sync::Weak::upgrade)
                .is_some_and(|st| st.is_active_node_key(&key.tailscale(), chrono::Utc::now()))
        })
    });
    let relay = crate::relay::new_relay(&cfg.data_dir, &s.mesh_key, &s.mesh_with, check)?;
    let stun = match &s.stun_listen {
        Some(addr) => Some(
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(io_err(format!("binding STUN on {addr}")))?,
        ),
        None => None,
    };
    let stun_port = match &stun {
        Some(sock) => Some(
            sock.local_addr()
                .map_err(io_err("STUN socket address"))?
                .port(),
        ),
        None => None,
    };
    let map = crate::relay::derp_map(&cfg.server_url, stun_port, s).map_err(ServerError::Config)?;
    let announce = cfg.server_url.starts_with("https://") || s.announce_plain_http;
    tracing::info!(
        region = s.region_id,
        key = %relay.public_key().tailscale(),
        stun = ?s.stun_listen,
        announced = announce,
        verify_clients = s.verify_clients,
        "DERP relay enabled"
    );
    if !announce {
        tracing::warn!(
            "the DERP region is not announced: Go clients reach relays over TLS only; give \
             --tls-cert/--tls-key (or --derp-announce-http for clients that speak plain HTTP)"
        );
        return Ok((Some(relay), stun, DERPMap::default()));
    }
    Ok((Some(relay), stun, map))
}

struct Front {
    app: Arc<App>,
    key: [u8; 32],
}

async fn get_key(AxState(f): AxState<Arc<Front>>) -> Response {
    let public = MachinePrivate::from_bytes(f.key).public();
    axum::Json(OverTLSPublicKeyResponse::new(public)).into_response()
}

async fn not_implemented(req: Request<Body>) -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{} {} is not implemented by tsunagu-server\n",
            req.method(),
            req.uri().path()
        ),
    )
        .into_response()
}

async fn register_page(Path(token): Path<String>) -> Response {
    let safe: String = token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (
        [("content-type", "text/plain; charset=utf-8")],
        format!(
            "This device is waiting for approval.\n\nAsk the tailnet's admin to run:\n\n    tsunagu-server nodes register --key {safe} --user <USER>\n"
        ),
    )
        .into_response()
}

async fn standby_page(Path(name): Path<String>) -> Response {
    let safe: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    (
        [("content-type", "text/plain; charset=utf-8")],
        format!(
            "This standby host of {safe} waits for the exit node's active host to hand its key over.\n\nThe active host must be online (tsunagud); this host keeps asking.\n"
        ),
    )
        .into_response()
}

async fn ts2021(AxState(f): AxState<Arc<Front>>, req: Request<Body>) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical());
    let (resp, pending) = match tsunagu_noise::upgrade::accept_upgrade(req, f.key, None) {
        Ok(ok) => ok,
        Err(e) => {
            tracing::debug!("ts2021 refused: {e}");
            return e.to_response().map(Body::new);
        }
    };
    if pending.capver() < MIN_SUPPORTED_CAPABILITY_VERSION.0 as u16 {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "client capability version {} is too old: this server supports {} and newer (Tailscale {MIN_SUPPORTED_TAILSCALE_RELEASE} or later); please upgrade\n",
                pending.capver(),
                MIN_SUPPORTED_CAPABILITY_VERSION.0
            ),
        )
            .into_response();
    }
    let app = f.app.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(NOISE_HANDSHAKE_TIMEOUT, pending.complete()).await {
            Ok(Ok(acc)) => {
                let ctx = MachineCtx {
                    machine_key: MachinePublic(acc.machine_public),
                    capver: acc.capver,
                    peer,
                };
                tracing::debug!(machine = %ctx.machine_key.short(), capver = ctx.capver, "noise session");
                noise_session(app, ctx, acc.stream).await;
            }
            Ok(Err(e)) => tracing::debug!("ts2021 handshake failed: {e}"),
            Err(_) => tracing::debug!("ts2021 handshake timed out"),
        }
    });
    resp.map(Body::new)
}

/// HTTP/2 over one Noise session, within the limits: streams at once, body sizes per
/// endpoint, and closed (GOAWAY) after [`Limits::session_idle_timeout`] with nothing in
/// flight. A map stream is in flight for as long as it lasts.
async fn noise_session<S>(app: Arc<App>, ctx: MachineCtx, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let limits = app.state.limits.clone();
    let activity = Activity::new();
    let machine = ctx.machine_key.short();
    let router = Router::new()
        .route(
            "/machine/register",
            post(machine::register).layer(DefaultBodyLimit::max(limits.max_register_body)),
        )
        .route(
            "/machine/map",
            post(machine::map).layer(DefaultBodyLimit::max(limits.max_map_body)),
        )
        .route(
            tsunagu_proto::tailcfg::HANDOVER_PATH,
            // A node key and a private key: a few hundred bytes.
            post(machine::handover).layer(DefaultBodyLimit::max(4096)),
        )
        .fallback(not_implemented)
        .layer(axum::middleware::from_fn_with_state(
            activity.clone(),
            front::track_activity,
        ))
        .layer(Extension(ctx))
        .with_state(app);
    let service = TowerToHyperService::new(router);
    // A client may send this much of a request body before the handler reads it; the
    // handlers take at most the body limits.
    let window = u32::try_from(limits.max_register_body.max(limits.max_map_body))
        .unwrap_or(u32::MAX)
        .max(65_535);
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.max_concurrent_streams(limits.max_streams_per_session)
        .initial_stream_window_size(window)
        .initial_connection_window_size(window.saturating_mul(4))
        .max_header_list_size(16 * 1024);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%machine, "noise session ended: {e}");
            }
        }
        _ = activity.idle(limits.session_idle_timeout) => {
            tracing::debug!(%machine, idle = ?limits.session_idle_timeout, "closing an idle noise session");
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Bind the admin socket (owner-only) and serve the admin API on it.
async fn serve_admin(
    state: Arc<State>,
    relay: Option<Arc<tsunagu_derp::Relay>>,
    path: PathBuf,
) -> Result<(), ServerError> {
    if path.exists() {
        std::fs::remove_file(&path)
            .map_err(io_err(format!("removing stale {}", path.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    let router = match relay {
        Some(relay) => admin::router(state).merge(crate::relay::admin_router(relay)),
        None => admin::router(state),
    };
    axum::serve(listener, router)
        .await
        .map_err(io_err("admin API"))
}

/// Remove ephemeral nodes that have been offline for longer than `timeout`.
/// [`serve`] runs it; public so that tests can run it with a short timeout.
pub async fn ephemeral_gc(state: Arc<State>, timeout: Duration) {
    // Offline time counts from this start at the earliest: a node that was online
    // when the server last stopped (its stored last_seen is stale, or unset) gets
    // the full timeout to reconnect instead of being removed at the first tick.
    let started = chrono::Utc::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10).min(timeout));
    loop {
        tick.tick().await;
        let cutoff = chrono::Utc::now() - chrono::TimeDelta::from_std(timeout).unwrap_or_default();
        let offline: Vec<i64> = state
            .nodes()
            .into_iter()
            .filter(|e| {
                e.node.ephemeral
                    && !e.online
                    && e.node.last_seen.unwrap_or(e.node.created_at).max(started) < cutoff
            })
            .map(|e| e.node.id)
            .collect();
        for id in offline {
            match state.store.delete_node(id).await {
                Ok(n) => {
                    tracing::info!(node = id, name = %n.given_name, "removed ephemeral node that went away");
                    state.remove_node(id);
                }
                Err(e) => tracing::warn!(node = id, "removing ephemeral node: {e}"),
            }
        }
    }
}

/// Delete interactive registrations that expired, every `every` (the insert of a new
/// one purges too). [`serve`] runs it.
pub async fn registration_gc(state: Arc<State>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match state
            .store
            .purge_expired_registrations(chrono::Utc::now())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired registrations removed"),
            Err(e) => tracing::warn!("purging expired registrations: {e}"),
        }
    }
}

/// A TLS acceptor from PEM files (certificate chain, private key).
pub fn load_tls(cert: &FsPath, key: &FsPath) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Config(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Config(format!(
            "{}: no certificate in the file",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServerError::Config(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| ServerError::Config(format!("TLS configuration: {e}")))?;
    // The control protocol upgrades an HTTP/1.1 connection (POST /ts2021).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serve `router` on `listener` (over TLS with `tls`) until SIGINT or SIGTERM, within
/// `limits` (see [`front::serve_listener`]).
pub(crate) async fn serve_front(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: &Limits,
    counter: Arc<ConnCounter>,
) -> Result<(), ServerError> {
    front::serve_listener(listener, tls, router, limits, counter, shutdown_signal()).await
}

/// Run the server until SIGINT or SIGTERM.
pub async fn serve(cfg: ServerConfig) -> Result<(), ServerError> {
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(load_tls(cert, key)?),
        None => None,
    };
    let mut server = Server::start(&cfg).await?;
    if let Some(relay) = &server.relay {
        relay.start_mesh();
    }
    if let (Some(relay), Some(sock)) = (server.relay.clone(), server.stun.take()) {
        relay.spawn_stun(sock);
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(io_err(format!("listening on {}", cfg.listen)))?;
    tracing::info!(
        listen = %cfg.listen,
        url = %cfg.server_url,
        key = %server.public_key(),
        data = %cfg.data_dir.display(),
        "tsunagu-server running"
    );
    let state = server.app.state.clone();
    tokio::spawn(ephemeral_gc(state.clone(), cfg.ephemeral_timeout));
    tokio::spawn(registration_gc(state.clone(), Duration::from_secs(60)));
    let admin = tokio::spawn(serve_admin(
        state,
        server.relay.clone(),
        cfg.admin_socket.clone(),
    ));
    let front = serve_front(
        listener,
        tls,
        server.router(),
        &cfg.limits,
        server.connections.clone(),
    );
    tokio::select! {
        r = front => r?,
        r = admin => match r {
            Ok(Err(e)) => return Err(e),
            _ => return Err(ServerError::Config("admin API stopped".into())),
        },
    }
    let _ = std::fs::remove_file(&cfg.admin_socket);
    tracing::info!("stopped");
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
