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

use crate::admin;
use crate::machine::{self, App, MAX_REQUEST, MachineCtx};
use crate::relay::RelaySettings;
use crate::state::State;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State as AxState};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::io;
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
}

impl Server {
    pub async fn start(cfg: &ServerConfig) -> Result<Server, ServerError> {
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
        let (relay, stun, mut derp_map) = match &cfg.relay {
            Some(settings) => start_relay(cfg, settings).await?,
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
        let state = State::load_with_dns(store, derp_map, &cfg.dns).await?;
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
        let app = Arc::new(App {
            state,
            server_url: cfg.server_url.clone(),
        });
        Ok(Server {
            app,
            key,
            relay,
            stun,
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
/// map announcing it.
async fn start_relay(cfg: &ServerConfig, s: &RelaySettings) -> Result<RelayParts, ServerError> {
    let relay = crate::relay::new_relay(&cfg.data_dir, &s.mesh_key, &s.mesh_with)?;
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
        match pending.complete().await {
            Ok(acc) => {
                let ctx = MachineCtx {
                    machine_key: MachinePublic(acc.machine_public),
                    capver: acc.capver,
                };
                tracing::debug!(machine = %ctx.machine_key.short(), capver = ctx.capver, "noise session");
                let router = Router::new()
                    .route("/machine/register", post(machine::register))
                    .route("/machine/map", post(machine::map))
                    .route(
                        tsunagu_proto::tailcfg::HANDOVER_PATH,
                        post(machine::handover),
                    )
                    .fallback(not_implemented)
                    .layer(DefaultBodyLimit::max(MAX_REQUEST))
                    .layer(Extension(ctx))
                    .with_state(app);
                let service = TowerToHyperService::new(router);
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(acc.stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!("noise session ended: {e}");
                }
            }
            Err(e) => tracing::debug!("ts2021 handshake failed: {e}"),
        }
    });
    resp.map(Body::new)
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

/// Serve `router` over TLS until `shutdown` completes.
pub(crate) async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => a.map_err(io_err("accepting"))?,
            _ = &mut shutdown => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
            // Handlers that log the peer (the relay) find it as with plain HTTP.
            let router = router.layer(Extension(axum::extract::ConnectInfo(peer)));
            let service = TowerToHyperService::new(router);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

/// Serve `router` on `listener` (over TLS with `tls`) until SIGINT or SIGTERM. Accepted
/// connections send small frames (map deltas, relayed packets) at once: Nagle's delay
/// against delayed ACKs would cost relayed traffic tens of ms.
pub(crate) async fn serve_front(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
) -> Result<(), ServerError> {
    match tls {
        Some(acceptor) => serve_tls(listener, acceptor, router, shutdown_signal()).await,
        None => axum::serve(
            axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(io_err("serving")),
    }
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
    let admin = tokio::spawn(serve_admin(
        state,
        server.relay.clone(),
        cfg.admin_socket.clone(),
    ));
    let front = serve_front(listener, tls, server.router());
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
