//! The endpoints a node calls over the Noise channel: `/machine/register` and
//! `/machine/map`. The Noise handshake authenticated the node's machine key; it arrives
//! here as [`MachineCtx`].

use crate::framing;
use crate::limits::MAX_ENDPOINTS;
use crate::mapper::{self, MapMessage, SessionView};
use crate::state::{NodeEntry, Snapshot, State, policy_node};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use ipnet::IpNet;
use parking_lot::Mutex;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tsunagu_derp::limit::KeyedBuckets;
use tsunagu_proto::MachinePublic;
use tsunagu_proto::tailcfg::{
    CapabilityVersion, Hostinfo, Login, LoginID, MIN_SUPPORTED_CAPABILITY_VERSION,
    MIN_SUPPORTED_TAILSCALE_RELEASE, MapRequest, MapResponse, RegisterRequest, RegisterResponse,
    Time, User as WireUser, UserID,
};
use tsunagu_store::{NodeChange, NodeRequest, StoreError};

/// How long a follow-up registration waits for the admin before the client retries.
const FOLLOWUP_WAIT: Duration = Duration::from_secs(120);
/// Keep-alive interval on map streams (clients expect one well within two minutes).
const KEEPALIVE: Duration = Duration::from_secs(50);
/// How long a non-streaming map request waits for the rebuild task to publish a snapshot
/// with its changes before answering from the current one.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// Source addresses tracked by the registration rate limits.
const REGISTRATION_SOURCES: usize = 65_536;
/// Nodes tracked by the full-map rate limit.
const FULL_MAP_NODES: usize = 65_536;

/// The authenticated peer of a Noise session.
#[derive(Debug, Clone)]
pub struct MachineCtx {
    pub machine_key: MachinePublic,
    pub capver: u16,
    /// The address the session came from (when the listener knows it).
    pub peer: Option<IpAddr>,
}

/// Shared application state of the HTTP handlers.
pub struct App {
    pub state: Arc<State>,
    pub server_url: String,
    /// New interactive registrations per source address, and from everyone.
    registrations: Mutex<(KeyedBuckets<IpAddr>, KeyedBuckets<()>)>,
    /// Register requests per source address.
    register_requests: Mutex<KeyedBuckets<IpAddr>>,
    /// Full maps per node.
    full_maps: Mutex<KeyedBuckets<i64>>,
}

impl App {
    pub fn new(state: Arc<State>, server_url: String) -> App {
        let l = &state.limits;
        let per_ip = KeyedBuckets::new(
            l.registrations_per_ip.0,
            l.registrations_per_ip.1,
            REGISTRATION_SOURCES,
        );
        let total = KeyedBuckets::new(l.registrations_total.0, l.registrations_total.1, 1);
        let requests = KeyedBuckets::new(
            l.register_requests_per_ip.0,
            l.register_requests_per_ip.1,
            REGISTRATION_SOURCES,
        );
        let full_maps = KeyedBuckets::new(
            l.full_maps_per_node.0,
            l.full_maps_per_node.1,
            FULL_MAP_NODES,
        );
        App {
            state,
            server_url,
            registrations: Mutex::new((per_ip, total)),
            register_requests: Mutex::new(requests),
            full_maps: Mutex::new(full_maps),
        }
    }

    /// Whether a register request from `peer` is within its address's budget.
    fn may_send_register(&self, peer: Option<IpAddr>) -> bool {
        peer.is_none_or(|ip| self.register_requests.lock().take(&ip, Instant::now()))
    }

    /// Whether node `id` may be sent another full map now.
    fn may_get_full_map(&self, id: i64) -> bool {
        self.full_maps.lock().take(&id, Instant::now())
    }

    /// Whether a new interactive registration from `peer` is within the rate limits.
    fn may_register(&self, peer: Option<IpAddr>) -> bool {
        let now = Instant::now();
        let mut b = self.registrations.lock();
        let ip_ok = match peer {
            Some(ip) => b.0.take(&ip, now),
            None => true,
        };
        ip_ok && b.1.take(&(), now)
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    tracing::debug!(%status, %msg, "request refused");
    (status, msg).into_response()
}

fn too_old(v: CapabilityVersion) -> Option<Response> {
    (v < MIN_SUPPORTED_CAPABILITY_VERSION).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!(
                "client capability version {} is too old: this server supports {} and newer (Tailscale {MIN_SUPPORTED_TAILSCALE_RELEASE} or later); please upgrade",
                v.0, MIN_SUPPORTED_CAPABILITY_VERSION.0
            ),
        )
    })
}

fn json_response<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => ([("content-type", "application/json")], b).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn store_error(e: StoreError) -> Response {
    let status = if e.is_not_found() {
        StatusCode::NOT_FOUND
    } else if e.is_limit() {
        StatusCode::TOO_MANY_REQUESTS
    } else if e.is_conflict() {
        StatusCode::CONFLICT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    error(status, e.to_string())
}

/// The body, or a clear refusal when it is over the route's limit (or unreadable).
fn body_or_refusal(
    body: Result<Bytes, BytesRejection>,
    what: &str,
    limit: usize,
) -> Result<Bytes, Response> {
    body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{what} request over {limit} bytes refused (a Hostinfo may hold at most {} bytes)",
                    crate::limits::MAX_HOSTINFO
                ),
            )
        } else {
            error(rej.status(), rej.body_text())
        }
    })
}

/// A refusal when `hostinfo` is over the limit (measured as stored: its known fields,
/// serialized); it would be stored and sent to every peer.
fn hostinfo_refusal(app: &App, hostinfo: Option<&Hostinfo>) -> Option<Response> {
    let max = app.state.limits.max_hostinfo;
    let len = serde_json::to_vec(hostinfo?).map_or(usize::MAX, |v| v.len());
    (len > max).then(|| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Hostinfo of {len} bytes refused: the server accepts at most {max}"),
        )
    })
}

fn authorized_response(app: &App, entry_user: Option<i64>) -> RegisterResponse {
    let users = app.state.users();
    let (id, name) = match entry_user.and_then(|u| users.get(&u)) {
        Some(u) => (u.id, u.name.clone()),
        None => (
            mapper::TAGGED_DEVICES_USER_ID,
            mapper::TAGGED_DEVICES_LOGIN.to_string(),
        ),
    };
    RegisterResponse {
        user: WireUser {
            id: UserID(id),
            display_name: name.clone(),
            created: Time::ZERO,
            ..WireUser::default()
        },
        login: Login {
            id: LoginID(id),
            provider: "tsunagu".into(),
            login_name: name.clone(),
            display_name: name,
            ..Login::default()
        },
        machine_authorized: true,
        ..RegisterResponse::default()
    }
}

/// Routes as the store keeps them: network addresses, sorted, without duplicates.
fn normalized(routes: &[IpNet]) -> Vec<IpNet> {
    let mut r: Vec<IpNet> = routes.iter().map(IpNet::trunc).collect();
    r.sort();
    r.dedup();
    r
}

/// What a node's report changes on `node`: advertised routes (newly advertised ones
/// auto-approved when the policy says so) and requested tags (when its owner may use
/// them). Only routes the node did not advertise before are auto-approved, so that a
/// revoked route stays revoked until the node advertises it anew (or an admin approves
/// it). Empty when nothing changes.
fn hostinfo_change(
    node: &tsunagu_store::Node,
    advertised: &[IpNet],
    request_tags: &[String],
    policy: &tsunagu_policy::Policy,
    users: &std::collections::BTreeMap<i64, tsunagu_store::User>,
) -> NodeChange {
    let mut change = NodeChange::default();
    let mut projected = node.clone();
    if advertised != node.advertised_routes {
        change.advertised_routes = Some(advertised.to_vec());
        projected.advertised_routes = advertised.to_vec();
    }
    // Requested tags: a user-owned node may become tagged with tags its owner owns (or
    // tags its current tags own).
    if !request_tags.is_empty() && node.tags != request_tags {
        let owner = node
            .user_id
            .and_then(|u| users.get(&u))
            .map(|u| u.name.clone());
        let allowed = owner
            .as_deref()
            .is_some_and(|o| request_tags.iter().all(|t| policy.tag_allowed(o, t)))
            || request_tags
                .iter()
                .all(|t| policy.tag_allowed_for_tags(&node.tags, t));
        if allowed {
            change.tags = Some(request_tags.to_vec());
            projected.tags = request_tags.to_vec();
            projected.user_id = None;
        } else {
            tracing::info!(node = node.id, tags = ?request_tags, "requested tags not allowed by tagOwners");
        }
    }
    // Auto-approval of routes that are newly advertised, judged for the node as it will
    // be (with its new tags).
    let pn = policy_node(&projected, users);
    let new: Vec<IpNet> = advertised
        .iter()
        .filter(|r| !node.advertised_routes.contains(r))
        .copied()
        .collect();
    let mut approved = node.approved_routes.clone();
    let exit: Vec<IpNet> = advertised
        .iter()
        .filter(|r| mapper::is_default_route(r))
        .copied()
        .collect();
    if exit.len() == 2
        && exit.iter().any(|r| new.contains(r))
        && !exit.iter().all(|r| approved.contains(r))
        && policy.auto_approve_exit_node(&pn)
    {
        for r in exit {
            if !approved.contains(&r) {
                approved.push(r);
            }
        }
    }
    for r in new.iter().filter(|r| !mapper::is_default_route(r)) {
        if !approved.contains(r) && policy.auto_approve_route(&pn, *r) {
            approved.push(*r);
        }
    }
    if normalized(&approved) != node.approved_routes {
        change.approved_routes = Some(approved);
    }
    change
}

/// Apply what a node reports about itself ([`hostinfo_change`]), in one
/// read-compute-write transaction on the node, so that an admin's approval or
/// revocation of routes at the same moment is never undone by it. A report that changes
/// nothing on the cached node (the usual one) does not touch the database.
async fn apply_hostinfo(app: &App, id: i64, hostinfo: &Hostinfo) -> Result<(), StoreError> {
    let policy = app.state.policy();
    let users = app.state.users();
    let advertised = normalized(&hostinfo.routable_ips);
    let request_tags = hostinfo.request_tags.clone();
    if let Some(cached) = app.state.node(id)
        && hostinfo_change(&cached.node, &advertised, &request_tags, &policy, &users)
            == NodeChange::default()
    {
        return Ok(());
    }
    let node = app
        .state
        .store
        .update_node_with(id, move |node| {
            Ok(hostinfo_change(
                node,
                &advertised,
                &request_tags,
                &policy,
                &users,
            ))
        })
        .await?;
    app.state.upsert_node(node);
    Ok(())
}

fn node_request(app: &App, mk: &MachinePublic, req: &RegisterRequest) -> NodeRequest {
    let hostinfo = req.hostinfo.clone().unwrap_or_default();
    NodeRequest {
        machine_key: mk.to_string(),
        node_key: req.node_key.tailscale(),
        hostname: if hostinfo.hostname.is_empty() {
            "node".into()
        } else {
            hostinfo.hostname.clone()
        },
        hostinfo: serde_json::to_value(&hostinfo).unwrap_or_default(),
        // The server's default when the node asks for none, its request clamped to the
        // maximum otherwise (a request in the past is a logout, handled before).
        expiry: app
            .state
            .limits
            .node_expiry(Utc::now(), req.expiry.to_option()),
    }
}

pub async fn register(
    AxState(app): AxState<Arc<App>>,
    Extension(ctx): Extension<MachineCtx>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !app.may_send_register(ctx.peer) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many register requests from this address; try again later",
        );
    }
    let body = match body_or_refusal(body, "register", app.state.limits.max_register_body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: RegisterRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid register request: {e}"),
            );
        }
    };
    if let Some(r) = too_old(req.version) {
        return r;
    }
    if req.node_key.0 == [0; 32] {
        return error(
            StatusCode::BAD_REQUEST,
            "register request without a node key",
        );
    }
    if let Some(r) = hostinfo_refusal(&app, req.hostinfo.as_ref()) {
        return r;
    }
    match register_inner(&app, &ctx, &req).await {
        Ok(resp) => json_response(&resp),
        Err(e) => store_error(e),
    }
}

async fn register_inner(
    app: &App,
    ctx: &MachineCtx,
    req: &RegisterRequest,
) -> Result<RegisterResponse, StoreError> {
    let store = &app.state.store;
    let now = Utc::now();
    let mk = ctx.machine_key.to_string();
    let nk = req.node_key.tailscale();
    let hostinfo = req.hostinfo.clone().unwrap_or_default();
    let interactive =
        req.auth.as_ref().is_none_or(|a| a.auth_key.is_empty()) && req.followup.is_empty();
    // A new interactive registration from a machine the server does not know is checked
    // against the rate limits before anything is read from the database: that is what a
    // flood of garbage registrations looks like.
    if interactive && !app.state.is_known_machine(&mk) && !app.may_register(ctx.peer) {
        return Err(StoreError::Limit {
            what: "new registrations at the moment",
            limit: app.state.limits.max_pending_registrations,
        });
    }
    let existing = match store.get_node_by_machine_key(&mk).await {
        Ok(n) => Some(n),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e),
    };
    if let Some(node) = existing.as_ref() {
        let old = req.old_node_key.tailscale();
        let known_key =
            node.node_key == nk || (req.old_node_key.0 != [0; 32] && node.node_key == old);
        if known_key {
            // Logout: the client asks for an expiry in the past.
            if req.expiry.to_option().is_some_and(|e| e <= now) {
                let n = store.expire_node(node.id, now).await?;
                app.state.upsert_node(n);
                return Ok(RegisterResponse {
                    node_key_expired: true,
                    ..authorized_response(app, node.user_id)
                });
            }
            if !node.is_expired(now) && node.authorized {
                let mut n = node.clone();
                if node.node_key != nk {
                    n = store.update_node_key(node.id, &nk).await?;
                }
                app.state.upsert_node(n.clone());
                apply_hostinfo(app, n.id, &hostinfo).await?;
                return Ok(authorized_response(app, n.user_id));
            }
            // Expired: it must authenticate again (below).
        }
    }
    let auth_key = req.auth.as_ref().map(|a| a.auth_key.as_str()).unwrap_or("");
    if !auth_key.is_empty() {
        return match store
            .register_with_preauth_key(auth_key, node_request(app, &ctx.machine_key, req), now)
            .await
        {
            Ok((node, _key)) => {
                tracing::info!(node = node.id, name = %node.given_name, "registered with a pre-auth key");
                app.state.upsert_node(node.clone());
                apply_hostinfo(app, node.id, &hostinfo).await?;
                Ok(authorized_response(app, node.user_id))
            }
            Err(StoreError::KeyRejected(why)) => {
                Ok(RegisterResponse::error(format!("invalid auth key: {why}")))
            }
            Err(e) => Err(e),
        };
    }
    if !req.followup.is_empty() {
        let token = req
            .followup
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        return followup(app, &mk, &token, req, &hostinfo).await;
    }
    // A known machine re-registering interactively (its key expired) is rate limited
    // here, unknown ones were above.
    if existing.is_some() && !app.may_register(ctx.peer) {
        return Err(StoreError::Limit {
            what: "new registrations at the moment",
            limit: app.state.limits.max_pending_registrations,
        });
    }
    let hostinfo_json = serde_json::to_value(&hostinfo).unwrap_or_default();
    let limits = &app.state.limits;
    let pending = store
        .create_pending_registration(
            &mk,
            &nk,
            &hostinfo_json,
            now,
            limits.registration_ttl(),
            limits.max_pending_registrations,
        )
        .await?;
    let url = format!("{}/register/{}", app.server_url, pending.token);
    tracing::info!(%url, host = %hostinfo.hostname, "interactive registration waiting for an admin");
    Ok(RegisterResponse {
        auth_url: url,
        ..RegisterResponse::default()
    })
}

/// A follow-up request: waits until an admin approves (or expires) the registration, or
/// it expires, or [`FOLLOWUP_WAIT`] passed. It reads the registration once, and again
/// only when woken ([`State::registration_changed`], or the registration's expiry): the
/// database is not polled while it waits.
async fn followup(
    app: &App,
    mk: &str,
    token: &str,
    req: &RegisterRequest,
    hostinfo: &Hostinfo,
) -> Result<RegisterResponse, StoreError> {
    let store = &app.state.store;
    let waiter = app.state.registration_waiter(token);
    let deadline = tokio::time::Instant::now() + FOLLOWUP_WAIT;
    loop {
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let pending = match store.get_pending_registration(token).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => {
                return Ok(RegisterResponse::error(
                    "unknown or expired registration; run `up` again",
                ));
            }
            Err(e) => return Err(e),
        };
        if pending.machine_key != mk {
            return Ok(RegisterResponse::error(
                "this registration belongs to another machine",
            ));
        }
        if let Some(id) = pending.approved_node_id {
            let node = store.get_node(id).await?;
            app.state.upsert_node(node.clone());
            apply_hostinfo(app, id, hostinfo).await?;
            return Ok(authorized_response(app, node.user_id));
        }
        let now = Utc::now();
        if pending.expires_at <= now {
            return Ok(RegisterResponse::error(
                "registration expired before an admin approved it; run `up` again",
            ));
        }
        let until_expiry = (pending.expires_at - now).to_std().unwrap_or_default();
        let wake = deadline.min(tokio::time::Instant::now() + until_expiry);
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= deadline {
                    // The client repeats the follow-up; answering keeps proxies from timing out.
                    return Ok(RegisterResponse {
                        auth_url: req.followup.clone(),
                        ..RegisterResponse::default()
                    });
                }
            }
        }
    }
}

pub async fn map(
    AxState(app): AxState<Arc<App>>,
    Extension(ctx): Extension<MachineCtx>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_refusal(body, "map", app.state.limits.max_map_body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: MapRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid map request: {e}")),
    };
    if let Some(r) = too_old(req.version) {
        return r;
    }
    if let Some(r) = hostinfo_refusal(&app, req.hostinfo.as_ref()) {
        return r;
    }
    // From the cache: a map request (an attacker's too) costs no database read.
    let Some(NodeEntry { node, .. }) = app.state.node_by_node_key(&req.node_key.tailscale()) else {
        return error(StatusCode::UNAUTHORIZED, "unknown node key; register first");
    };
    if node.machine_key != ctx.machine_key.to_string() {
        return error(
            StatusCode::FORBIDDEN,
            "node key does not belong to this machine",
        );
    }
    if !node.authorized {
        return error(StatusCode::FORBIDDEN, "node is not authorized");
    }
    if node.is_expired(Utc::now()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "node key expired; authenticate again",
        );
    }
    let id = node.id;
    // Every new stream and every non-streaming request that wants the peers costs a full
    // map: a node that asks for them in a loop is refused before one is built.
    let wants_full_map = req.stream || !req.omit_peers;
    if wants_full_map && !app.may_get_full_map(id) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many map requests from this node; try again later",
        );
    }
    // Since capability version 68 a streaming request is read-only: updates come in
    // separate non-streaming requests.
    let carries_update = !(req.stream && req.version.0 >= 68);
    if carries_update && let Err(e) = apply_map_update(&app, id, &req).await {
        return store_error(e);
    }
    let compress = req.compress == "zstd";
    if !req.stream {
        if req.omit_peers {
            return StatusCode::OK.into_response();
        }
        // The rebuild task publishes a snapshot with this request's changes within its
        // coalescing interval; waiting for it keeps the policy compilation off this
        // request (and off the runtime's workers).
        let ready = app.state.pending_version();
        let snap = app.state.snapshot_at_least(ready, SNAPSHOT_WAIT).await;
        let mut view = SessionView::new(id);
        return match view.full_map(&snap).map(|m| encode_message(&m, compress)) {
            Some(Ok(b)) => b.into_response(),
            Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            None => error(StatusCode::NOT_FOUND, "node not found"),
        };
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let state = app.state.clone();
    tokio::spawn(async move { session(state, id, compress, tx).await });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn apply_map_update(app: &App, id: i64, req: &MapRequest) -> Result<(), StoreError> {
    let store = &app.state.store;
    let Some(entry) = app.state.node(id) else {
        return Ok(());
    };
    let NodeEntry { node, .. } = entry;
    let endpoints: Vec<String> = req
        .endpoint_addrs()
        .into_iter()
        .take(MAX_ENDPOINTS)
        .map(|(a, _)| a.to_string())
        .collect();
    if endpoints != node.endpoints {
        store.update_endpoints(id, &endpoints).await?;
    }
    let disco = req.disco_key.to_string();
    if req.disco_key.0 != [0; 32] && disco != node.disco_key {
        store.update_disco_key(id, &disco).await?;
    }
    if let Some(hi) = &req.hostinfo {
        let json = serde_json::to_value(hi).unwrap_or_default();
        if json != node.hostinfo {
            store.update_hostinfo(id, &json).await?;
        }
        if let Some(ni) = &hi.net_info {
            app.state.set_home_derp(id, ni.preferred_derp);
        }
    }
    let node = store.get_node(id).await?;
    app.state.upsert_node(node);
    if let Some(hi) = &req.hostinfo {
        apply_hostinfo(app, id, hi).await?;
    }
    Ok(())
}

fn encode(m: &MapResponse, compress: bool) -> std::io::Result<Bytes> {
    let json = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    framing::encode(&json, compress).map(Bytes::from)
}

fn encode_message(m: &MapMessage, compress: bool) -> std::io::Result<Bytes> {
    let json = m.to_json().map_err(std::io::Error::other)?;
    framing::encode(&json, compress).map(Bytes::from)
}

/// A delta as framed bytes: encoded (and compressed) once per snapshot when other
/// sessions send the same message.
fn encode_shared(snap: &Snapshot, m: &MapMessage, compress: bool) -> std::io::Result<Bytes> {
    let Some(key) = &m.share else {
        return encode_message(m, compress);
    };
    let key = (key.clone(), compress);
    if let Some(b) = snap.encoded.lock().get(&key) {
        return Ok(b.clone());
    }
    // Two sessions may both encode it; the second insert is harmless.
    let b = encode_message(m, compress)?;
    snap.encoded.lock().insert(key, b.clone());
    Ok(b)
}

/// How long a new stream waits for a full-map permit before sending without one.
const FULL_MAP_PERMIT_WAIT: Duration = Duration::from_secs(2);

/// `bytes` holding `permit` until they are dropped.
fn with_permit(bytes: Bytes, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Bytes {
    struct Owner {
        bytes: Bytes,
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }
    match permit {
        Some(p) => Bytes::from_owner(Owner { bytes, _permit: p }),
        None => bytes,
    }
}

/// One map stream: the full map, then deltas and keep-alives until the client goes.
async fn session(
    state: Arc<State>,
    id: i64,
    compress: bool,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut rx = state.subscribe();
    // The first map comes from the first snapshot that shows the node online (the next
    // coalesced rebuild), so that a burst of joins shares rebuilds.
    let ticket = state.session_started(id);
    let (ready, sid, mut closed) = (ticket.ready, ticket.sid, ticket.closed);
    let mut view = SessionView::new(id);
    let first = loop {
        let snap = rx.borrow_and_update().clone();
        if snap.version >= ready {
            break view.full_map(&snap);
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break None },
            _ = tx.closed() => break None,
            _ = &mut closed => break None,
        }
    };
    let ok = match first {
        Some(m) => {
            tracing::debug!(node = id, version = view.version, peers = ?m.peer_ids, "full map sent");
            // A permit travels with the encoded bytes and returns when HTTP/2 has written
            // them out and dropped them. A client that does not read keeps its permit, so
            // waiting for one is bounded.
            let permit = tokio::time::timeout(
                FULL_MAP_PERMIT_WAIT,
                state.full_maps.clone().acquire_owned(),
            )
            .await
            .ok()
            .and_then(Result::ok);
            match encode_message(&m, compress) {
                Ok(b) => tx.send(Ok(with_permit(b, permit))).await.is_ok(),
                Err(e) => {
                    tracing::error!("encoding a map response: {e}");
                    false
                }
            }
        }
        None => false,
    };
    let jitter = Duration::from_millis(rand::random::<u64>() % 8000);
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + KEEPALIVE + jitter,
        KEEPALIVE + jitter,
    );
    if ok {
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() { break; }
                    let snap = rx.borrow_and_update().clone();
                    let changes = snap.changes_since(view.version);
                    let Some(me) = snap.nodes.get(&id) else { break };
                    let expired = me.node.is_expired(snap.now);
                    if let Some(m) = view.delta(&snap, changes.as_ref()) {
                        tracing::debug!(
                            node = id,
                            version = view.version,
                            peers_changed = ?m.peer_ids,
                            peers_removed = ?m.response.peers_removed.iter().map(|p| p.0).collect::<Vec<_>>(),
                            self_changed = m.response.node.is_some(),
                            "map delta sent"
                        );
                        let sent = match encode_shared(&snap, &m, compress) {
                            Ok(b) => tx.send(Ok(b)).await.is_ok(),
                            Err(e) => {
                                tracing::error!("encoding a map response: {e}");
                                false
                            }
                        };
                        if !sent {
                            break;
                        }
                    }
                    if expired { break; }
                }
                _ = keepalive.tick() => {
                    if !send(&tx, &MapResponse::keep_alive(), compress).await { break; }
                }
                _ = tx.closed() => break,
                _ = &mut closed => {
                    tracing::debug!(node = id, "map stream closed: a newer stream of the node replaced it");
                    break;
                }
            }
        }
    }
    let now = Utc::now();
    state.session_ended(id, sid, now);
    if let Err(e) = state.store.touch_last_seen(id, now).await {
        tracing::warn!(node = id, "recording last seen: {e}");
    }
}

async fn send(
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    m: &MapResponse,
    compress: bool,
) -> bool {
    match encode(m, compress) {
        Ok(b) => tx.send(Ok(b)).await.is_ok(),
        Err(e) => {
            tracing::error!("encoding a map response: {e}");
            false
        }
    }
}
