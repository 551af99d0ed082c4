//! The endpoints a node calls over the Noise channel: `/machine/register` and
//! `/machine/map`. The Noise handshake authenticated the node's machine key; it arrives
//! here as [`MachineCtx`].

use crate::framing;
use crate::mapper::{self, MapMessage, SessionView};
use crate::standby;
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
    CapabilityVersion, HandoverRequest, HostRole, Hostinfo, Login, LoginID,
    MIN_SUPPORTED_CAPABILITY_VERSION, MIN_SUPPORTED_TAILSCALE_RELEASE, MapRequest, MapResponse,
    RegisterRequest, RegisterResponse, STANDBY_KEY_PREFIX, StandbyGrant, StandbyInfo, Time,
    User as WireUser, UserID, WireNodePrivate,
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
    /// Full maps per node and machine (an exit node's standby hosts have their own).
    full_maps: Mutex<KeyedBuckets<(i64, String)>>,
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

    /// Whether node `id` may be sent another full map now, on `machine_key`'s request.
    fn may_get_full_map(&self, id: i64, machine_key: &str) -> bool {
        self.full_maps
            .lock()
            .take(&(id, machine_key.to_string()), Instant::now())
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

/// The refusal of a body that is over the route's limit (or unreadable), saying so.
fn body_refusal(rej: BytesRejection, what: &str, limit: usize) -> Response {
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
        for r in advertised {
            if let Some(why) = mapper::refused_route(r) {
                tracing::warn!(node = node.id, route = %r, "advertised route refused: {why}");
            }
        }
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
    for r in new
        .iter()
        .filter(|r| !mapper::is_default_route(r) && mapper::refused_route(r).is_none())
    {
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
async fn apply_hostinfo(state: &State, id: i64, hostinfo: &Hostinfo) -> Result<(), StoreError> {
    let policy = state.policy();
    let users = state.users();
    let advertised = normalized(&hostinfo.routable_ips);
    let request_tags = hostinfo.request_tags.clone();
    if let Some(cached) = state.node(id)
        && hostinfo_change(&cached.node, &advertised, &request_tags, &policy, &users)
            == NodeChange::default()
    {
        return Ok(());
    }
    let node = state
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
    state.upsert_node(node);
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
    let body = match body {
        Ok(b) => b,
        Err(rej) => return body_refusal(rej, "register", app.state.limits.max_register_body),
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
    // Standby hosts of an exit node: enrolled ones, and machines with a standby key.
    if let Some(node_id) = app.state.standby.host_node(&mk) {
        return standby_register(app, &mk, node_id, req).await;
    }
    if let Some(key) = req.auth.as_ref().map(|a| a.auth_key.as_str())
        && key.starts_with(STANDBY_KEY_PREFIX)
    {
        return standby_enrol(app, &mk, key, req).await;
    }
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
            .register_with_preauth_key(auth_key, node_request(app, &ctx.machine_key, req), now)
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
            apply_hostinfo(&app.state, id, hostinfo).await?;
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
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rej) => return body_refusal(rej, "map", app.state.limits.max_map_body),
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
    // Every new stream and every non-streaming request that wants the peers costs a full
    // map: a node that asks for them in a loop is refused before one is built.
    let wants_full_map = req.stream || !req.omit_peers;
    if wants_full_map && !app.may_get_full_map(id, &machine_key) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many map requests from this node; try again later",
        );
    }
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
    let ticket = state.session_started_from(id, &host.machine_key);
    let (ready, sid, mut closed) = (ticket.ready, ticket.sid, ticket.closed);
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
            _ = &mut closed => break None,
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
                            wind_down_ms: 0,
                        }));
                        told = now;
                        let m = MapResponse { tsunagu_standby: info, ..MapResponse::default() };
                        if !send(&tx, &m, compress).await { break; }
                    }
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
    state.standby.session_ended(id, &host.machine_key);
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
