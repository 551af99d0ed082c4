//! The endpoints a node calls over the Noise channel: `/machine/register` and
//! `/machine/map`. The Noise handshake authenticated the node's machine key; it arrives
//! here as [`MachineCtx`].

use crate::framing;
use crate::mapper::{self, MapMessage, SessionView};
use crate::standby;
use crate::state::{NodeEntry, Snapshot, State, policy_node};
use axum::body::{Body, Bytes};
use axum::extract::{Extension, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{TimeDelta, Utc};
use ipnet::IpNet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tsunagu_proto::MachinePublic;
use tsunagu_proto::tailcfg::{
    CapabilityVersion, HandoverRequest, HostRole, Hostinfo, Login, LoginID,
    MIN_SUPPORTED_CAPABILITY_VERSION, MIN_SUPPORTED_TAILSCALE_RELEASE, MapRequest, MapResponse,
    RegisterRequest, RegisterResponse, STANDBY_KEY_PREFIX, StandbyGrant, StandbyInfo, Time,
    User as WireUser, UserID, WireNodePrivate,
};
use tsunagu_store::{NodeRequest, StoreError};

/// Largest request body accepted (a register or map request is a few KiB).
pub const MAX_REQUEST: usize = 1 << 20;
/// How long a follow-up registration waits for the admin before the client retries.
const FOLLOWUP_WAIT: Duration = Duration::from_secs(120);
/// How long an interactive registration stays valid.
const PENDING_TTL: TimeDelta = TimeDelta::minutes(30);
/// Keep-alive interval on map streams (clients expect one well within two minutes).
const KEEPALIVE: Duration = Duration::from_secs(50);

/// The authenticated peer of a Noise session.
#[derive(Debug, Clone)]
pub struct MachineCtx {
    pub machine_key: MachinePublic,
    pub capver: u16,
}

/// Shared application state of the HTTP handlers.
pub struct App {
    pub state: Arc<State>,
    pub server_url: String,
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
    } else if e.is_conflict() {
        StatusCode::CONFLICT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    error(status, e.to_string())
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

/// Apply what a node reports about itself: advertised routes (with auto-approval by
/// the policy) and requested tags (when its owner may use them).
async fn apply_hostinfo(state: &State, id: i64, hostinfo: &Hostinfo) -> Result<(), StoreError> {
    let store = &state.store;
    let Some(entry) = state.node(id) else {
        return Ok(());
    };
    let mut node = entry.node;
    let advertised: Vec<IpNet> = hostinfo.routable_ips.clone();
    if advertised != node.advertised_routes {
        for r in &advertised {
            if let Some(why) = mapper::refused_route(r) {
                tracing::warn!(node = id, route = %r, "advertised route refused: {why}");
            }
        }
        node = store.set_advertised_routes(id, &advertised).await?;
    }
    let policy = state.policy();
    let users = state.users();
    // Requested tags: a user-owned node may become tagged with tags its owner owns.
    if !hostinfo.request_tags.is_empty() && node.tags != hostinfo.request_tags {
        let owner = node
            .user_id
            .and_then(|u| users.get(&u))
            .map(|u| u.name.clone());
        let allowed = owner.as_deref().is_some_and(|o| {
            hostinfo
                .request_tags
                .iter()
                .all(|t| policy.tag_allowed(o, t))
        }) || hostinfo
            .request_tags
            .iter()
            .all(|t| policy.tag_allowed_for_tags(&node.tags, t));
        if allowed {
            node = store.set_tags(id, &hostinfo.request_tags).await?;
        } else {
            tracing::info!(node = id, tags = ?hostinfo.request_tags, "requested tags not allowed by tagOwners");
        }
    }
    // Auto-approval of newly advertised routes.
    let pn = policy_node(&node, &users);
    let mut approved = node.approved_routes.clone();
    let exit: Vec<IpNet> = advertised
        .iter()
        .filter(|r| mapper::is_default_route(r))
        .copied()
        .collect();
    if exit.len() == 2
        && !exit.iter().all(|r| approved.contains(r))
        && policy.auto_approve_exit_node(&pn)
    {
        approved.extend(
            exit.iter()
                .filter(|r| !approved.contains(r))
                .copied()
                .collect::<Vec<_>>(),
        );
    }
    for r in advertised
        .iter()
        .filter(|r| !mapper::is_default_route(r) && mapper::refused_route(r).is_none())
    {
        if !approved.contains(r) && policy.auto_approve_route(&pn, *r) {
            approved.push(*r);
        }
    }
    if approved != node.approved_routes {
        node = store.set_approved_routes(id, &approved).await?;
    }
    state.upsert_node(node);
    Ok(())
}

fn node_request(mk: &MachinePublic, req: &RegisterRequest) -> NodeRequest {
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
        expiry: req.expiry.to_option(),
    }
}

pub async fn register(
    AxState(app): AxState<Arc<App>>,
    Extension(ctx): Extension<MachineCtx>,
    body: Bytes,
) -> Response {
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
    // Standby hosts of an exit node: enrolled ones, and machines with a standby key.
    if let Some(node_id) = app.state.standby.host_node(&mk) {
        return standby_register(app, &mk, node_id, req).await;
    }
    if let Some(key) = req.auth.as_ref().map(|a| a.auth_key.as_str())
        && key.starts_with(STANDBY_KEY_PREFIX)
    {
        return standby_enrol(app, &mk, key, req).await;
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
                // With standby hosts, only the host members see speaks for the node.
                let report = standby::Report {
                    hostinfo: Some(hostinfo.clone()),
                    ..standby::Report::default()
                };
                if !app.state.standby.in_group(n.id)
                    || app.state.standby.on_report(n.id, &mk, report) == standby::Outcome::Publish
                {
                    apply_hostinfo(&app.state, n.id, &hostinfo).await?;
                }
                return Ok(authorized_response(app, n.user_id));
            }
            // Expired: it must authenticate again (below).
        }
    }
    let auth_key = req.auth.as_ref().map(|a| a.auth_key.as_str()).unwrap_or("");
    if !auth_key.is_empty() {
        return match store
            .register_with_preauth_key(auth_key, node_request(&ctx.machine_key, req), now)
            .await
        {
            Ok((node, _key)) => {
                tracing::info!(node = node.id, name = %node.given_name, "registered with a pre-auth key");
                app.state.upsert_node(node.clone());
                apply_hostinfo(&app.state, node.id, &hostinfo).await?;
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
        let deadline = tokio::time::Instant::now() + FOLLOWUP_WAIT;
        loop {
            let pending = match store.get_pending_registration(&token).await {
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
                apply_hostinfo(&app.state, id, &hostinfo).await?;
                return Ok(authorized_response(app, node.user_id));
            }
            if pending.expires_at <= Utc::now() {
                return Ok(RegisterResponse::error(
                    "registration expired before an admin approved it; run `up` again",
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                // The client repeats the follow-up; answering keeps proxies from timing out.
                return Ok(RegisterResponse {
                    auth_url: req.followup.clone(),
                    ..RegisterResponse::default()
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let hostinfo_json = serde_json::to_value(&hostinfo).unwrap_or_default();
    let pending = store
        .create_pending_registration(&mk, &nk, &hostinfo_json, now, PENDING_TTL)
        .await?;
    let url = format!("{}/register/{}", app.server_url, pending.token);
    tracing::info!(%url, host = %hostinfo.hostname, "interactive registration waiting for an admin");
    Ok(RegisterResponse {
        auth_url: url,
        ..RegisterResponse::default()
    })
}

/// How long a standby host's registration waits for the identity's key to be handed
/// over (under the client's 10 s for a registration); a follow-up waits longer.
const HANDOVER_WAIT: Duration = Duration::from_secs(7);
const HANDOVER_FOLLOWUP_WAIT: Duration = Duration::from_secs(50);

/// A machine registers with a standby key: redeem it (single use, unexpired), check that
/// the node may have standby hosts (policy on the node), add the host, hand the key over.
async fn standby_enrol(
    app: &App,
    mk: &str,
    key: &str,
    req: &RegisterRequest,
) -> Result<RegisterResponse, StoreError> {
    let store = &app.state.store;
    let hostinfo = req.hostinfo.clone().unwrap_or_default();
    let hostname = if hostinfo.hostname.is_empty() {
        "standby"
    } else {
        hostinfo.hostname.as_str()
    };
    let host = match store
        .redeem_standby_key(key, mk, hostname, Utc::now())
        .await
    {
        Ok((host, _)) => host,
        Err(StoreError::KeyRejected(why)) => {
            return Ok(RegisterResponse::error(format!(
                "invalid standby key: {why}"
            )));
        }
        Err(e) if e.is_conflict() => return Ok(RegisterResponse::error(e.to_string())),
        Err(e) => return Err(e),
    };
    let node = store.get_node(host.node_id).await?;
    if let Err(why) = standby::eligible(&node) {
        store.delete_standby_host(host.id).await?;
        tracing::info!(node = node.id, host = %host.hostname, "standby host refused: {why}");
        return Ok(RegisterResponse::error(format!("standby refused: {why}")));
    }
    app.state.standby.add_host(&node, &host);
    standby_grant(app, &node, req).await
}

/// A standby host registers: as the node once it holds its key, otherwise it waits for
/// the key.
async fn standby_register(
    app: &App,
    mk: &str,
    node_id: i64,
    req: &RegisterRequest,
) -> Result<RegisterResponse, StoreError> {
    let node = app.state.store.get_node(node_id).await?;
    if !node.authorized || node.is_expired(Utc::now()) {
        return Ok(RegisterResponse::error(format!(
            "the exit node {} is expired or not authorized",
            node.given_name
        )));
    }
    if req.node_key.tailscale() != node.node_key {
        return standby_grant(app, &node, req).await;
    }
    if req.expiry.to_option().is_some_and(|e| e <= Utc::now()) {
        return Ok(RegisterResponse::error(
            "a standby host does not log the exit node out; the admin removes it (tsunagu-server nodes standby remove)",
        ));
    }
    if let Some(hi) = &req.hostinfo {
        let report = standby::Report {
            hostinfo: Some(hi.clone()),
            ..standby::Report::default()
        };
        if app.state.standby.on_report(node_id, mk, report) == standby::Outcome::Publish {
            write_report(&app.state, node_id, None, None, Some(hi)).await?;
        }
    }
    Ok(authorized_response(app, node.user_id))
}

/// The identity's key for a standby host, once a host that holds it hands it over; until
/// then the answer says to wait (the client follows up, as for an admin's approval).
async fn standby_grant(
    app: &App,
    node: &tsunagu_store::Node,
    req: &RegisterRequest,
) -> Result<RegisterResponse, StoreError> {
    let within = if req.followup.is_empty() {
        HANDOVER_WAIT
    } else {
        HANDOVER_FOLLOWUP_WAIT
    };
    match app.state.standby.wait_handover(node.id, within).await {
        Some(key) => {
            tracing::info!(node = node.id, name = %node.given_name, "identity key granted to a standby host");
            Ok(RegisterResponse {
                tsunagu_standby: Some(StandbyGrant {
                    identity: node.given_name.clone(),
                    node_key: WireNodePrivate(key),
                }),
                ..authorized_response(app, node.user_id)
            })
        }
        None => Ok(RegisterResponse {
            auth_url: format!("{}/standby/{}", app.server_url, node.given_name),
            ..RegisterResponse::default()
        }),
    }
}

/// `POST /machine/tsunagu/handover`: a host of a node hands the node's key over for a
/// standby host that waits for it. Only a host of that node, only the node's key, only
/// while someone waits.
pub async fn handover(
    AxState(app): AxState<Arc<App>>,
    Extension(ctx): Extension<MachineCtx>,
    body: Bytes,
) -> Response {
    let req: HandoverRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid handover: {e}")),
    };
    let node = match app
        .state
        .store
        .get_node_by_node_key(&req.node_key.tailscale())
        .await
    {
        Ok(n) => n,
        Err(e) if e.is_not_found() => return error(StatusCode::NOT_FOUND, "unknown node key"),
        Err(e) => return store_error(e),
    };
    let mk = ctx.machine_key.to_string();
    if node.machine_key != mk && !app.state.standby.is_host(node.id, &mk) {
        return error(
            StatusCode::FORBIDDEN,
            "this machine is not a host of the node",
        );
    }
    match app
        .state
        .standby
        .offer_handover(node.id, &mk, req.private.0)
    {
        Ok(()) => json_response(&serde_json::json!({})),
        Err(why) => error(StatusCode::CONFLICT, why),
    }
}

pub async fn map(
    AxState(app): AxState<Arc<App>>,
    Extension(ctx): Extension<MachineCtx>,
    body: Bytes,
) -> Response {
    let req: MapRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid map request: {e}")),
    };
    if let Some(r) = too_old(req.version) {
        return r;
    }
    let store = &app.state.store;
    let node = match store.get_node_by_node_key(&req.node_key.tailscale()).await {
        Ok(n) => n,
        Err(e) if e.is_not_found() => {
            return error(StatusCode::UNAUTHORIZED, "unknown node key; register first");
        }
        Err(e) => return store_error(e),
    };
    let machine_key = ctx.machine_key.to_string();
    // The node's own machine, or one of its standby hosts (which hold its key).
    let standby_host = node.machine_key != machine_key;
    if standby_host && !app.state.standby.is_host(node.id, &machine_key) {
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
    // Peers see it as `Node.Cap` (what the node can do, e.g. DNS over HTTPS as exit node).
    app.state.set_capver(id, req.version);
    // Since capability version 68 a streaming request is read-only: updates come in
    // separate non-streaming requests.
    let carries_update = !(req.stream && req.version.0 >= 68);
    if carries_update && let Err(e) = apply_map_update(&app, id, &machine_key, &req).await {
        return store_error(e);
    }
    let compress = req.compress == "zstd";
    if !req.stream {
        if req.omit_peers {
            return StatusCode::OK.into_response();
        }
        app.state.rebuild();
        let snap = app.state.current();
        let mut view = SessionView::new(id);
        return match view.full_map(&snap).map(|m| encode_message(&m, compress)) {
            Some(Ok(b)) => b.into_response(),
            Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            None => error(StatusCode::NOT_FOUND, "node not found"),
        };
    }
    if standby_host {
        // The standby host holds the key now: the server forgets its copy.
        app.state.standby.handover_done(id);
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let state = app.state.clone();
    let host = Host {
        machine_key,
        standby: standby_host,
    };
    tokio::spawn(async move { session(state, id, host, compress, tx).await });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn apply_map_update(
    app: &App,
    id: i64,
    machine_key: &str,
    req: &MapRequest,
) -> Result<(), StoreError> {
    // The first MAX_ENDPOINTS distinct ones (the client lists its best first).
    let offered = req.endpoint_addrs();
    let mut seen = std::collections::HashSet::new();
    let endpoints: Vec<String> = offered
        .iter()
        .filter(|(a, _)| seen.insert(*a))
        .take(mapper::MAX_ENDPOINTS)
        .map(|(a, _)| a.to_string())
        .collect();
    let offered = offered.len();
    let disco = (req.disco_key.0 != [0; 32]).then(|| req.disco_key.to_string());
    if app.state.standby.in_group(id) {
        // A node with standby hosts: only the host members see writes its row.
        let report = standby::Report {
            endpoints: Some(endpoints.clone()),
            disco: disco.clone(),
            hostinfo: req.hostinfo.clone(),
            host: req.tsunagu_host,
        };
        if app.state.standby.on_report(id, machine_key, report) == standby::Outcome::Hold {
            return Ok(());
        }
    }
    if offered > endpoints.len()
        && app
            .state
            .node(id)
            .is_some_and(|e| e.node.endpoints != endpoints)
    {
        // Logged when the kept list changes, not on every report of the same list.
        tracing::warn!(
            node = id,
            offered,
            kept = endpoints.len(),
            "too many endpoints: the first ones kept"
        );
    }
    write_report(
        &app.state,
        id,
        Some(&endpoints),
        disco.as_deref(),
        req.hostinfo.as_ref(),
    )
    .await
}

/// What a node reports about itself into its row: endpoints, disco key, hostinfo (with
/// its home relay, advertised routes and requested tags). Also what a standby host's
/// report becomes when it takes over ([`standby`]).
pub(crate) async fn write_report(
    state: &State,
    id: i64,
    endpoints: Option<&[String]>,
    disco: Option<&str>,
    hostinfo: Option<&Hostinfo>,
) -> Result<(), StoreError> {
    let store = &state.store;
    let Some(entry) = state.node(id) else {
        return Ok(());
    };
    let NodeEntry { node, .. } = entry;
    if let Some(endpoints) = endpoints
        && endpoints != node.endpoints.as_slice()
    {
        store.update_endpoints(id, endpoints).await?;
    }
    if let Some(disco) = disco
        && disco != node.disco_key
    {
        store.update_disco_key(id, disco).await?;
    }
    if let Some(hi) = hostinfo {
        let json = serde_json::to_value(hi).unwrap_or_default();
        if json != node.hostinfo {
            store.update_hostinfo(id, &json).await?;
        }
        if let Some(ni) = &hi.net_info {
            state.set_home_derp(id, ni.preferred_derp);
        }
    }
    let node = store.get_node(id).await?;
    state.upsert_node(node);
    if let Some(hi) = hostinfo {
        apply_hostinfo(state, id, hi).await?;
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

/// Which machine a map stream is from.
struct Host {
    machine_key: String,
    /// A standby host of the node (not the node's own machine).
    standby: bool,
}

/// One map stream: the full map, then deltas and keep-alives until the client goes.
/// The hosts of a node with standby hosts also hear their role ([`standby`]).
async fn session(
    state: Arc<State>,
    id: i64,
    host: Host,
    compress: bool,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut rx = state.subscribe();
    let mut roles = state.standby.subscribe(id);
    // The first map comes from the first snapshot that shows the node online (the next
    // coalesced rebuild), so that a burst of joins shares rebuilds.
    let ready = state.session_started(id);
    state.standby.session_started(id, &host.machine_key);
    let mut told = state.standby.info_for(id, &host.machine_key);
    roles.borrow_and_update();
    let mut view = SessionView::new(id);
    let first = loop {
        let snap = rx.borrow_and_update().clone();
        if snap.version >= ready {
            break view.full_map(&snap);
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break None },
            _ = tx.closed() => break None,
        }
    };
    let ok = match first {
        Some(mut m) => {
            // The role rides on the first map, so that a host never starts its data
            // plane in the wrong one.
            m.response.tsunagu_standby = told.clone();
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
                changed = roles.changed() => {
                    if changed.is_err() { break; }
                    roles.borrow_and_update();
                    if host.standby && !state.standby.is_host(id, &host.machine_key) {
                        tracing::info!(node = id, host = %host.machine_key, "standby host removed: ending its map stream");
                        break;
                    }
                    let now = state.standby.info_for(id, &host.machine_key);
                    if now != told {
                        // Without standby hosts any more: the node's own machine serves.
                        let info = now.clone().or_else(|| told.as_ref().map(|t| StandbyInfo {
                            identity: t.identity.clone(),
                            role: HostRole::Active,
                            hosts: Vec::new(),
                            last_switch: t.last_switch.clone(),
                            handover: false,
                        }));
                        told = now;
                        let m = MapResponse { tsunagu_standby: info, ..MapResponse::default() };
                        if !send(&tx, &m, compress).await { break; }
                    }
                }
                _ = tx.closed() => break,
            }
        }
    }
    let now = Utc::now();
    state.standby.session_ended(id, &host.machine_key);
    state.session_ended(id, now);
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
