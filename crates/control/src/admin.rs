//! The admin API: JSON over HTTP/1.1 on a Unix socket that only the server's owner can
//! open (file mode 0600). The `tsunagu-server` subcommands are its client; scripts may
//! call it too (`curl --unix-socket`). Every change goes through the store first and
//! then reaches the affected map streams through [`State`].

use crate::mapper::{self, is_default_route};
use crate::state::{NodeEntry, State};
use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use tsunagu_policy::Policy;
use tsunagu_store::{NodeChange, Owner, StoreError};

/// An admin-facing error: HTTP status + message, rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = if e.is_not_found() {
            StatusCode::NOT_FOUND
        } else if e.is_conflict() {
            StatusCode::CONFLICT
        } else if e.is_limit() {
            StatusCode::TOO_MANY_REQUESTS
        } else if matches!(e, StoreError::Invalid { .. } | StoreError::KeyRejected(_)) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError(status, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/v1/users", get(list_users).post(create_user))
        .route("/v1/users/{name}", delete(delete_user))
        .route("/v1/preauthkeys", get(list_keys).post(create_key))
        .route("/v1/preauthkeys/{id}/expire", post(expire_key))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", delete(delete_node).get(get_node))
        .route("/v1/nodes/{node}/approve-exit", post(approve_exit))
        .route("/v1/nodes/{node}/revoke-exit", post(revoke_exit))
        .route("/v1/nodes/{node}/expire", post(expire_node))
        .route("/v1/nodes/{node}/rename", post(rename_node))
        .route("/v1/nodes/{node}/tags", post(tag_node))
        .route("/v1/nodes/{node}/standby", post(standby_add))
        .route("/v1/nodes/{node}/failover", post(failover))
        .route("/v1/standby", get(standby_list))
        .route("/v1/standby/{host}", delete(standby_remove))
        .route("/v1/register", post(register))
        .route("/v1/policy", get(get_policy).put(set_policy))
        .route("/v1/dns", axum::routing::put(set_dns))
        .with_state(state)
}

/// A node as the admin sees it (`nodes list --json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub id: i64,
    pub name: String,
    pub hostname: String,
    /// The owner's name, or `tagged-devices`.
    pub user: String,
    pub tags: Vec<String>,
    pub addresses: Vec<String>,
    pub os: String,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub advertised_routes: Vec<String>,
    pub approved_routes: Vec<String>,
    /// `no`, `awaiting approval` or `approved`.
    pub exit_node: String,
    pub ephemeral: bool,
    pub expired: bool,
    pub created_at: DateTime<Utc>,
    /// `nodekey:<hex>`, as the relay logs it.
    #[serde(default)]
    pub node_key: String,
    /// The UDP endpoints the node last reported (STUN-discovered and local).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The DERP region the node reported as its home; 0 = none.
    #[serde(default)]
    pub home_derp: i32,
    /// An exit node with standby hosts: its hosts, the active one, the last switches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<crate::standby::StandbyView>,
}

pub fn node_info(state: &State, e: &NodeEntry) -> NodeInfo {
    let n = &e.node;
    let users = state.users();
    let advertises_exit = n
        .advertised_routes
        .iter()
        .filter(|r| is_default_route(r))
        .count()
        == 2;
    let approved_exit = n
        .approved_routes
        .iter()
        .filter(|r| is_default_route(r))
        .count()
        == 2;
    let exit_node = match (advertises_exit, approved_exit) {
        (true, true) => "approved",
        (true, false) => "awaiting approval",
        (false, true) => "approved, not advertised",
        (false, false) => "no",
    };
    NodeInfo {
        id: n.id,
        name: n.given_name.clone(),
        hostname: n.hostname.clone(),
        user: n
            .user_id
            .and_then(|u| users.get(&u))
            .map(|u| u.name.clone())
            .unwrap_or_else(|| mapper::TAGGED_DEVICES_LOGIN.to_string()),
        tags: n.tags.clone(),
        addresses: vec![n.ipv4.to_string(), n.ipv6.to_string()],
        os: n
            .hostinfo
            .get("OS")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string(),
        online: e.online,
        last_seen: if e.online {
            Some(Utc::now())
        } else {
            n.last_seen
        },
        advertised_routes: n
            .advertised_routes
            .iter()
            .map(ToString::to_string)
            .collect(),
        approved_routes: n.approved_routes.iter().map(ToString::to_string).collect(),
        exit_node: exit_node.to_string(),
        ephemeral: n.ephemeral,
        expired: n.is_expired(Utc::now()),
        created_at: n.created_at,
        node_key: n.node_key.clone(),
        endpoints: n.endpoints.clone(),
        home_derp: e.home_derp,
        standby: state.standby.view(n.id),
    }
}

/// Find a node by ID, name, hostname or tailnet address.
fn find_node(state: &State, r: &str) -> Result<NodeEntry, ApiError> {
    let nodes = state.nodes();
    let id: Option<i64> = r.parse().ok();
    let hit: Vec<&NodeEntry> = nodes
        .iter()
        .filter(|e| {
            let n = &e.node;
            Some(n.id) == id
                || n.given_name == r
                || n.ipv4.to_string() == r
                || n.ipv6.to_string() == r
        })
        .collect();
    match hit.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let by_host: Vec<&NodeEntry> = nodes.iter().filter(|e| e.node.hostname == r).collect();
            match by_host.as_slice() {
                [one] => Ok((*one).clone()),
                [] => Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("no node {r:?} (give an ID, name or address)"),
                )),
                _ => Err(bad(format!(
                    "{r:?} is the hostname of several nodes; give the ID or name"
                ))),
            }
        }
        _ => Err(bad(format!("{r:?} matches several nodes; give the ID"))),
    }
}

async fn list_users(AxState(s): AxState<Arc<State>>) -> ApiResult<Vec<tsunagu_store::User>> {
    Ok(Json(s.store.list_users().await?))
}

#[derive(Deserialize)]
struct NameBody {
    name: String,
}

async fn create_user(
    AxState(s): AxState<Arc<State>>,
    Json(b): Json<NameBody>,
) -> ApiResult<tsunagu_store::User> {
    let u = s.store.create_user(&b.name).await?;
    s.upsert_user(u.clone());
    Ok(Json(u))
}

async fn delete_user(
    AxState(s): AxState<Arc<State>>,
    Path(name): Path<String>,
) -> ApiResult<tsunagu_store::User> {
    let u = s.store.delete_user(&name).await?;
    s.remove_user(u.id);
    Ok(Json(u))
}

/// "90s", "30m", "24h", "7d" (also plain seconds).
pub fn parse_duration(s: &str) -> Result<TimeDelta, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90m, 24h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    if secs <= 0 {
        return Err(format!("{s:?}: must be positive"));
    }
    TimeDelta::try_seconds(secs).ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Deserialize)]
struct KeyBody {
    user: String,
    #[serde(default)]
    reusable: bool,
    #[serde(default)]
    ephemeral: bool,
    expiration: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

async fn create_key(
    AxState(s): AxState<Arc<State>>,
    Json(b): Json<KeyBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = s.store.get_user_by_name(&b.user).await?;
    let lifetime = parse_duration(b.expiration.as_deref().unwrap_or("24h")).map_err(bad)?;
    let policy = s.policy();
    for t in &b.tags {
        if !policy.tag_allowed(&user.name, t) {
            return Err(bad(format!(
                "user {} may not use {t}: the policy's tagOwners must list the user (or a group of theirs) for it",
                user.name
            )));
        }
    }
    let (key, full) = s
        .store
        .create_preauth_key(
            user.id,
            b.reusable,
            b.ephemeral,
            Some(Utc::now() + lifetime),
            &b.tags,
        )
        .await?;
    let mut v = serde_json::to_value(&key)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    v["key"] = json!(full);
    v["user"] = json!(user.name);
    Ok(Json(v))
}

#[derive(Deserialize)]
struct KeyQuery {
    user: Option<String>,
}

async fn list_keys(
    AxState(s): AxState<Arc<State>>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let users = s.users();
    let uid = match q.user {
        Some(name) => Some(s.store.get_user_by_name(&name).await?.id),
        None => None,
    };
    let keys = s.store.list_preauth_keys(uid).await?;
    Ok(Json(
        keys.into_iter()
            .map(|k| {
                let mut v = serde_json::to_value(&k).unwrap_or_default();
                v["user"] = json!(
                    users
                        .get(&k.user_id)
                        .map(|u| u.name.clone())
                        .unwrap_or_default()
                );
                v
            })
            .collect(),
    ))
}

async fn expire_key(
    AxState(s): AxState<Arc<State>>,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let k = s.store.expire_preauth_key(id, Utc::now()).await?;
    Ok(Json(serde_json::to_value(k).unwrap_or_default()))
}

async fn list_nodes(AxState(s): AxState<Arc<State>>) -> ApiResult<Vec<NodeInfo>> {
    Ok(Json(s.nodes().iter().map(|e| node_info(&s, e)).collect()))
}

async fn get_node(AxState(s): AxState<Arc<State>>, Path(r): Path<String>) -> ApiResult<NodeInfo> {
    let e = find_node(&s, &r)?;
    Ok(Json(node_info(&s, &e)))
}

async fn changed(s: &Arc<State>, id: i64) -> ApiResult<NodeInfo> {
    let n = s.store.get_node(id).await?;
    s.upsert_node(n);
    // Admin actions take effect at once, without the coalescing delay.
    s.rebuild_now().await;
    let e = s
        .node(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "node vanished".into()))?;
    Ok(Json(node_info(s, &e)))
}

fn exit_routes() -> [IpNet; 2] {
    [
        "0.0.0.0/0".parse().expect("literal"),
        "::/0".parse().expect("literal"),
    ]
}

/// Approves the node's exit routes: computed from the row as it is inside the write
/// transaction, so that a route change at the same moment (the node's report, another
/// admin) is neither lost nor undone.
async fn approve_exit(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
) -> ApiResult<NodeInfo> {
    let e = find_node(&s, &r)?;
    let node = s
        .store
        .update_node_with(e.node.id, |n| {
            let advertised = n
                .advertised_routes
                .iter()
                .filter(|r| is_default_route(r))
                .count();
            if advertised != 2 {
                return Err(StoreError::invalid(
                    "exit node",
                    format!(
                        "node {} does not advertise an exit node (run `tsunagu up --advertise-exit-node` on it first)",
                        n.given_name
                    ),
                ));
            }
            let mut approved = n.approved_routes.clone();
            approved.extend(exit_routes());
            Ok(NodeChange {
                approved_routes: Some(approved),
                ..NodeChange::default()
            })
        })
        .await?;
    changed(&s, node.id).await
}

/// Revokes the node's exit routes, in one transaction as [`approve_exit`]. They stay
/// revoked until the node advertises them anew (when `autoApprovers` may approve them
/// again) or an admin approves them.
async fn revoke_exit(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
) -> ApiResult<NodeInfo> {
    let e = find_node(&s, &r)?;
    let node = s
        .store
        .update_node_with(e.node.id, |n| {
            Ok(NodeChange {
                approved_routes: Some(
                    n.approved_routes
                        .iter()
                        .filter(|r| !is_default_route(r))
                        .copied()
                        .collect(),
                ),
                ..NodeChange::default()
            })
        })
        .await?;
    changed(&s, node.id).await
}

async fn expire_node(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
) -> ApiResult<NodeInfo> {
    let e = find_node(&s, &r)?;
    s.store.expire_node(e.node.id, Utc::now()).await?;
    changed(&s, e.node.id).await
}

async fn delete_node(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
) -> ApiResult<NodeInfo> {
    let e = find_node(&s, &r)?;
    let info = node_info(&s, &e);
    s.store.delete_node(e.node.id).await?;
    s.standby.node_removed(e.node.id);
    s.remove_node(e.node.id);
    s.rebuild_now().await;
    Ok(Json(info))
}

async fn rename_node(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
    Json(b): Json<NameBody>,
) -> ApiResult<NodeInfo> {
    let e = find_node(&s, &r)?;
    s.store.rename_node(e.node.id, &b.name).await?;
    changed(&s, e.node.id).await
}

#[derive(Deserialize)]
struct TagsBody {
    tags: Vec<String>,
}

async fn tag_node(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
    Json(b): Json<TagsBody>,
) -> ApiResult<NodeInfo> {
    let e = find_node(&s, &r)?;
    s.store.set_tags(e.node.id, &b.tags).await?;
    changed(&s, e.node.id).await
}

#[derive(Deserialize)]
struct StandbyAddBody {
    /// Lifetime of the key (default 1h).
    expiration: Option<String>,
}

/// `nodes standby add NODE`: a single-use key that enrols one standby host of the node,
/// for tagged, approved exit nodes run by tsunagud only.
async fn standby_add(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
    Json(b): Json<StandbyAddBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let e = find_node(&s, &r)?;
    crate::standby::eligible(&e.node).map_err(bad)?;
    let lifetime = parse_duration(b.expiration.as_deref().unwrap_or("1h")).map_err(bad)?;
    let (key, full) = s
        .store
        .create_standby_key(e.node.id, Utc::now() + lifetime)
        .await?;
    tracing::info!(node = e.node.id, name = %e.node.given_name, key = %key.key_prefix, "standby key created");
    let mut v = serde_json::to_value(&key)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    v["key"] = json!(full);
    v["node"] = json!(e.node.given_name);
    Ok(Json(v))
}

#[derive(Deserialize)]
struct StandbyQuery {
    node: Option<String>,
}

/// `nodes standby list [NODE]`: nodes with standby hosts, their hosts and switches, and
/// the keys not used yet.
async fn standby_list(
    AxState(s): AxState<Arc<State>>,
    Query(q): Query<StandbyQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let node = match q.node {
        Some(r) => Some(find_node(&s, &r)?.node.id),
        None => None,
    };
    let views: Vec<_> = s
        .standby
        .views()
        .into_iter()
        .filter(|v| node.is_none_or(|n| n == v.node))
        .collect();
    let now = Utc::now();
    let keys: Vec<serde_json::Value> = s
        .store
        .list_standby_keys(node)
        .await?
        .into_iter()
        .filter(|k| k.used_by.is_none() && k.expires_at > now)
        .map(|k| {
            let name = s
                .node(k.node_id)
                .map(|e| e.node.given_name)
                .unwrap_or_default();
            let mut v = serde_json::to_value(&k).unwrap_or_default();
            v["node"] = json!(name);
            v
        })
        .collect();
    Ok(Json(json!({ "nodes": views, "unused_keys": keys })))
}

/// `nodes standby remove HOST`: the host (hostname, or machine key) loses the node at once:
/// its map streams end, its relay connection closes, the server refuses it; if it was
/// active, another host takes over.
async fn standby_remove(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let hosts = s.store.list_standby_hosts(None).await?;
    let hit: Vec<_> = hosts
        .iter()
        .filter(|h| h.hostname == r || h.machine_key == r || h.id.to_string() == r)
        .collect();
    let host = match hit.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no standby host {r:?} (give its hostname or machine key)"),
            ));
        }
        _ => {
            return Err(bad(format!(
                "{r:?} names several standby hosts; give the machine key"
            )));
        }
    };
    s.store.delete_standby_host(host.id).await?;
    s.standby
        .remove_host(&s, host.node_id, &host.machine_key)
        .await;
    Ok(Json(json!({
        "removed": host,
        "node": s.standby.view(host.node_id),
    })))
}

#[derive(Deserialize)]
struct FailoverBody {
    /// A host (hostname or machine key); none: the best ready standby host.
    to: Option<String>,
}

/// `nodes failover NODE [--to HOST]`: move members to another host of the node now.
async fn failover(
    AxState(s): AxState<Arc<State>>,
    Path(r): Path<String>,
    Json(b): Json<FailoverBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let e = find_node(&s, &r)?;
    let to = match &b.to {
        Some(t) => Some(s.standby.find_host(e.node.id, t).ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("{t:?} is not a host of {}", e.node.given_name),
            )
        })?),
        None => None,
    };
    let rec = s
        .standby
        .failover(&s, e.node.id, to.as_deref())
        .await
        .map_err(|err| {
            ApiError(
                StatusCode::CONFLICT,
                format!("{}: {err}", e.node.given_name),
            )
        })?;
    Ok(Json(json!({
        "switch": rec,
        "node": s.standby.view(e.node.id),
    })))
}

#[derive(Deserialize)]
struct RegisterBody {
    key: String,
    user: String,
}

async fn register(
    AxState(s): AxState<Arc<State>>,
    Json(b): Json<RegisterBody>,
) -> ApiResult<NodeInfo> {
    let user = s.store.get_user_by_name(&b.user).await?;
    let token = b.key.rsplit('/').next().unwrap_or_default();
    let now = Utc::now();
    let node = s
        .store
        .approve_pending_registration(
            token,
            Owner::User(user.id),
            s.limits.approval_expiry(now),
            now,
        )
        .await?;
    // The node's follow-up request waits on this token: wake it.
    s.registration_changed(token);
    // Routes the node advertised are auto-approved when its follow-up request
    // arrives (machine::register applies its hostinfo then).
    changed(&s, node.id).await
}

async fn get_policy(AxState(s): AxState<Arc<State>>) -> Json<serde_json::Value> {
    Json(json!({ "policy": s.policy_text() }))
}

#[derive(Deserialize)]
struct PolicyBody {
    policy: String,
}

async fn set_policy(
    AxState(s): AxState<Arc<State>>,
    Json(b): Json<PolicyBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let policy = Policy::parse(&b.policy).map_err(|e| {
        bad(format!(
            "policy refused, the previous one keeps serving: {e}"
        ))
    })?;
    s.store.set_policy(&b.policy).await?;
    s.set_policy(policy, Some(b.policy));
    s.rebuild_now().await;
    Ok(Json(json!({ "ok": true })))
}

/// New DNS settings (the server's file reloaded on SIGHUP): checked, then sent to every
/// node as a `DNSConfig` delta. Refused as a whole with the field at fault.
async fn set_dns(
    AxState(s): AxState<Arc<State>>,
    Json(f): Json<crate::dns::DnsFile>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let settings = f.validate().map_err(|e| {
        bad(format!(
            "DNS settings refused, the previous ones keep serving: {e}"
        ))
    })?;
    s.set_dns(&settings).map_err(bad)?;
    s.rebuild();
    Ok(Json(json!({ "ok": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90m").unwrap(), TimeDelta::minutes(90));
        assert_eq!(parse_duration("7d").unwrap(), TimeDelta::days(7));
        assert_eq!(parse_duration("45").unwrap(), TimeDelta::seconds(45));
        assert!(parse_duration("0h").is_err());
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
    }
}
