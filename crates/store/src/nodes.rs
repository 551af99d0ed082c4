//! Nodes: registration (address and name allocation), lookups, updates, expiry, deletion.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use crate::error::{db, unique_violation};
use crate::preauth::{precheck, redeem_in};
use crate::rules;
use crate::users::user_exists;
use crate::{
    Conn, NewNode, Node, Owner, PreAuthKey, Store, StoreError, commit, from_json, from_ms,
    from_ms_opt, ms, to_json,
};

#[derive(sqlx::FromRow)]
struct NodeRow {
    id: i64,
    machine_key: String,
    node_key: String,
    disco_key: String,
    user_id: Option<i64>,
    tags: String,
    hostname: String,
    given_name: String,
    ipv4: String,
    ipv6: String,
    hostinfo: String,
    endpoints: String,
    advertised_routes: String,
    approved_routes: String,
    ephemeral: bool,
    auth_key_id: Option<i64>,
    expiry: Option<i64>,
    created_at: i64,
    last_seen: Option<i64>,
    authorized: bool,
    version: i64,
}

impl TryFrom<NodeRow> for Node {
    type Error = StoreError;
    fn try_from(r: NodeRow) -> Result<Node, StoreError> {
        Ok(Node {
            id: r.id,
            machine_key: r.machine_key,
            node_key: r.node_key,
            disco_key: r.disco_key,
            user_id: r.user_id,
            tags: from_json("node tags", &r.tags)?,
            hostname: r.hostname,
            given_name: r.given_name,
            ipv4: r
                .ipv4
                .parse::<Ipv4Addr>()
                .map_err(|e| StoreError::corrupt("node ipv4", e))?,
            ipv6: r
                .ipv6
                .parse::<Ipv6Addr>()
                .map_err(|e| StoreError::corrupt("node ipv6", e))?,
            hostinfo: from_json("node hostinfo", &r.hostinfo)?,
            endpoints: from_json("node endpoints", &r.endpoints)?,
            advertised_routes: from_json("node advertised_routes", &r.advertised_routes)?,
            approved_routes: from_json("node approved_routes", &r.approved_routes)?,
            ephemeral: r.ephemeral,
            auth_key_id: r.auth_key_id,
            expiry: from_ms_opt("node expiry", r.expiry)?,
            created_at: from_ms("node created_at", r.created_at)?,
            last_seen: from_ms_opt("node last_seen", r.last_seen)?,
            authorized: r.authorized,
            version: r.version,
        })
    }
}

const COLS: &str = "id, machine_key, node_key, disco_key, user_id, tags, hostname, given_name, \
                    ipv4, ipv6, hostinfo, endpoints, advertised_routes, approved_routes, \
                    ephemeral, auth_key_id, expiry, created_at, last_seen, authorized, version";

/// What a node asks for when it registers, before anyone decided who owns it (for
/// [`Store::register_with_preauth_key`] and pending registrations).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRequest {
    pub machine_key: String,
    pub node_key: String,
    pub hostname: String,
    pub hostinfo: serde_json::Value,
    pub expiry: Option<DateTime<Utc>>,
}

impl NodeRequest {
    pub fn with_owner(self, owner: Owner, ephemeral: bool, auth_key_id: Option<i64>) -> NewNode {
        NewNode {
            machine_key: self.machine_key,
            node_key: self.node_key,
            hostname: self.hostname,
            hostinfo: self.hostinfo,
            owner,
            ephemeral,
            auth_key_id,
            expiry: self.expiry,
        }
    }
}

/// What [`Store::update_node_with`] changes; `None` keeps the column as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeChange {
    pub advertised_routes: Option<Vec<IpNet>>,
    pub approved_routes: Option<Vec<IpNet>>,
    pub tags: Option<Vec<String>>,
}

fn check_key(what: &'static str, prefix: &str, key: &str) -> Result<(), StoreError> {
    match key.strip_prefix(prefix) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
        _ => Err(StoreError::invalid(
            what,
            format!("{key:?} is not of the form {prefix}<hex>"),
        )),
    }
}

/// Owner as columns: (user_id, tags JSON).
async fn owner_columns(
    conn: &mut Conn,
    owner: &Owner,
) -> Result<(Option<i64>, String), StoreError> {
    match owner {
        Owner::User(id) => {
            if !user_exists(conn, *id).await? {
                return Err(StoreError::not_found("user", id));
            }
            Ok((Some(*id), "[]".to_string()))
        }
        Owner::Tags(tags) => {
            let tags = rules::validate_tags(tags)?;
            if tags.is_empty() {
                return Err(StoreError::invalid(
                    "owner",
                    "a node needs a user or at least one tag",
                ));
            }
            Ok((None, to_json(&tags)))
        }
    }
}

/// Turns a failed node write into `Conflict` when it broke a unique rule.
fn node_write_err(context: &'static str, node_key: &str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match unique_violation(&e).as_deref() {
        Some(c) if c.contains("node_key") => StoreError::conflict(
            "node",
            format!("node key {node_key} is already used by another node"),
        ),
        Some(c) if c.contains("machine_key") => StoreError::conflict(
            "node",
            "machine key registered concurrently by another request; retry",
        ),
        Some(c) if c.contains("given_name") => {
            StoreError::conflict("node", "name taken by another node")
        }
        Some(c) => StoreError::conflict("node", format!("address or key already in use ({c})")),
        None => db(context)(e),
    }
}

/// The lowest free address index ≥ 1 that is not reserved. Inside a write transaction, so
/// no one else allocates meanwhile; the UNIQUE constraint on `addr_index` backs that up.
async fn allocate_index(conn: &mut Conn) -> Result<u32, StoreError> {
    let mut start = 1u32;
    loop {
        let s = rules::skip_reserved(start).ok_or(StoreError::AddressesExhausted)?;
        let taken: Option<i64> =
            sqlx::query_scalar("SELECT addr_index FROM nodes WHERE addr_index = $1")
                .bind(i64::from(s))
                .fetch_optional(&mut *conn)
                .await
                .map_err(db("allocating an address"))?;
        let candidate = if taken.is_none() {
            s
        } else {
            // s is taken: the first free index after the run of taken ones that holds s.
            let next: i64 = sqlx::query_scalar(
                "SELECT n.addr_index + 1 FROM nodes n \
                 WHERE n.addr_index >= $1 \
                   AND NOT EXISTS (SELECT 1 FROM nodes m WHERE m.addr_index = n.addr_index + 1) \
                 ORDER BY n.addr_index LIMIT 1",
            )
            .bind(i64::from(s))
            .fetch_one(&mut *conn)
            .await
            .map_err(db("allocating an address"))?;
            u32::try_from(next).map_err(|_| StoreError::AddressesExhausted)?
        };
        match rules::skip_reserved(candidate) {
            Some(c) if c == candidate => return Ok(c),
            Some(c) => start = c,
            None => return Err(StoreError::AddressesExhausted),
        }
    }
}

/// A free DNS name for `hostname`: its sanitized form, or that with `-1`, `-2`, …
async fn unique_name(
    conn: &mut Conn,
    hostname: &str,
    except_node: Option<i64>,
) -> Result<String, StoreError> {
    let base = rules::sanitize_hostname(hostname);
    // Every candidate starts with these characters (suffixes cut at most 7 from the end);
    // [a-z0-9-] holds no LIKE wildcard.
    let prefix: String = base.chars().take(rules::MAX_LABEL - 13).collect();
    let taken: HashSet<String> = sqlx::query_scalar(
        "SELECT given_name FROM nodes WHERE given_name LIKE $1 AND ($2 IS NULL OR id <> $2)",
    )
    .bind(format!("{prefix}%"))
    .bind(except_node)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("choosing a node name"))?
    .into_iter()
    .collect();
    Ok((0..)
        .map(|n| rules::with_suffix(&base, n))
        .find(|c| !taken.contains(c))
        .expect("some suffix is free"))
}

async fn node_by_machine_key(
    conn: &mut Conn,
    machine_key: &str,
) -> Result<Option<Node>, StoreError> {
    let row: Option<NodeRow> =
        sqlx::query_as(&format!("SELECT {COLS} FROM nodes WHERE machine_key = $1"))
            .bind(machine_key)
            .fetch_optional(conn)
            .await
            .map_err(db("looking up a node"))?;
    row.map(Node::try_from).transpose()
}

pub(crate) async fn node_by_id(conn: &mut Conn, id: i64) -> Result<Node, StoreError> {
    let row: Option<NodeRow> = sqlx::query_as(&format!("SELECT {COLS} FROM nodes WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(db("looking up a node"))?;
    row.ok_or_else(|| StoreError::not_found("node", id))?
        .try_into()
}

/// Registration inside the caller's write transaction (see [`Store::register_node`]).
pub(crate) async fn register_in(conn: &mut Conn, new: &NewNode) -> Result<Node, StoreError> {
    check_key("machine key", "mkey:", &new.machine_key)?;
    check_key("node key", "nodekey:", &new.node_key)?;
    let (user_id, tags) = owner_columns(conn, &new.owner).await?;
    let hostinfo = to_json(&new.hostinfo);
    // Tagged devices are exempt from key expiry (as with Tailscale), whatever was asked.
    let expiry = match new.owner {
        Owner::Tags(_) => None,
        Owner::User(_) => new.expiry,
    };

    if let Some(existing) = node_by_machine_key(conn, &new.machine_key).await? {
        // Re-registration (re-login, key rotation, new owner): same row, id, addresses and
        // name; new node key, owner, expiry and reported details.
        let row: NodeRow = sqlx::query_as(&format!(
            "UPDATE nodes SET node_key = $2, hostname = $3, hostinfo = $4, user_id = $5, \
               tags = $6, ephemeral = $7, auth_key_id = $8, expiry = $9, authorized = $10, \
               version = version + 1 \
             WHERE id = $1 RETURNING {COLS}"
        ))
        .bind(existing.id)
        .bind(&new.node_key)
        .bind(&new.hostname)
        .bind(&hostinfo)
        .bind(user_id)
        .bind(&tags)
        .bind(new.ephemeral)
        .bind(new.auth_key_id)
        .bind(expiry.map(ms))
        .bind(true)
        .fetch_one(&mut *conn)
        .await
        .map_err(node_write_err("re-registering a node", &new.node_key))?;
        tracing::info!(node = existing.id, name = %existing.given_name, "node re-registered");
        return row.try_into();
    }

    let index = allocate_index(conn).await?;
    let name = unique_name(conn, &new.hostname, None).await?;
    let row: NodeRow = sqlx::query_as(&format!(
        "INSERT INTO nodes (machine_key, node_key, disco_key, user_id, tags, hostname, \
           given_name, addr_index, ipv4, ipv6, hostinfo, endpoints, advertised_routes, \
           approved_routes, ephemeral, auth_key_id, expiry, created_at, last_seen, authorized) \
         VALUES ($1, $2, '', $3, $4, $5, $6, $7, $8, $9, $10, '[]', '[]', '[]', $11, $12, $13, \
           $14, NULL, $15) \
         RETURNING {COLS}"
    ))
    .bind(&new.machine_key)
    .bind(&new.node_key)
    .bind(user_id)
    .bind(&tags)
    .bind(&new.hostname)
    .bind(&name)
    .bind(i64::from(index))
    .bind(rules::ipv4_for(index).to_string())
    .bind(rules::ipv6_for(index).to_string())
    .bind(&hostinfo)
    .bind(new.ephemeral)
    .bind(new.auth_key_id)
    .bind(expiry.map(ms))
    .bind(ms(Utc::now()))
    .bind(true)
    .fetch_one(&mut *conn)
    .await
    .map_err(node_write_err("registering a node", &new.node_key))?;
    let node: Node = row.try_into()?;
    tracing::info!(node = node.id, name = %node.given_name, ipv4 = %node.ipv4, "node registered");
    Ok(node)
}

fn sorted_routes(routes: &[IpNet]) -> Vec<IpNet> {
    let mut r: Vec<IpNet> = routes.iter().map(IpNet::trunc).collect();
    r.sort();
    r.dedup();
    r
}

impl Store {
    /// Registers a node in one transaction. A machine key that is already registered
    /// keeps its row: same id, addresses and name, with the new node key, owner, expiry and
    /// details. Otherwise the node gets the lowest free address of 100.64.0.0/10 (see
    /// [`rules`]) and a unique DNS name derived from its hostname.
    /// `Conflict` if the node key belongs to another machine; nothing is written then.
    pub async fn register_node(&self, new: NewNode) -> Result<Node, StoreError> {
        let mut tx = self.begin_write().await?;
        let node = register_in(&mut tx, &new).await?;
        commit(tx).await?;
        Ok(node)
    }

    /// Redeems `full_key` and registers the node with it, in one transaction: the node is
    /// owned by the key's tags if it has any, else by its user, and is ephemeral if the key
    /// is. If the registration fails, the key is not used up. A machine already registered
    /// with this key may register again with it even if it is single-use (a retry).
    pub async fn register_with_preauth_key(
        &self,
        full_key: &str,
        request: NodeRequest,
        now: DateTime<Utc>,
    ) -> Result<(Node, PreAuthKey), StoreError> {
        {
            let mut conn = self
                .reader()
                .acquire()
                .await
                .map_err(db("looking up a pre-auth key"))?;
            precheck(&mut conn, full_key, now).await?;
        }
        let mut tx = self.begin_write().await?;
        let key = redeem_in(&mut tx, full_key, now, Some(&request.machine_key)).await?;
        let owner = if key.tags.is_empty() {
            Owner::User(key.user_id)
        } else {
            Owner::Tags(key.tags.clone())
        };
        let new = request.with_owner(owner, key.ephemeral, Some(key.id));
        let node = register_in(&mut tx, &new).await?;
        commit(tx).await?;
        Ok((node, key))
    }

    pub async fn get_node(&self, id: i64) -> Result<Node, StoreError> {
        let mut conn = self
            .reader()
            .acquire()
            .await
            .map_err(db("looking up a node"))?;
        node_by_id(&mut conn, id).await
    }

    pub async fn get_node_by_machine_key(&self, machine_key: &str) -> Result<Node, StoreError> {
        let mut conn = self
            .reader()
            .acquire()
            .await
            .map_err(db("looking up a node"))?;
        node_by_machine_key(&mut conn, machine_key)
            .await?
            .ok_or_else(|| StoreError::not_found("node with machine key", machine_key))
    }

    pub async fn get_node_by_node_key(&self, node_key: &str) -> Result<Node, StoreError> {
        let row: Option<NodeRow> =
            sqlx::query_as(&format!("SELECT {COLS} FROM nodes WHERE node_key = $1"))
                .bind(node_key)
                .fetch_optional(self.reader())
                .await
                .map_err(db("looking up a node"))?;
        row.ok_or_else(|| StoreError::not_found("node with node key", node_key))?
            .try_into()
    }

    /// All nodes, or one user's, by id.
    pub async fn list_nodes(&self, user_id: Option<i64>) -> Result<Vec<Node>, StoreError> {
        let rows: Vec<NodeRow> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM nodes WHERE ($1 IS NULL OR user_id = $1) ORDER BY id"
        ))
        .bind(user_id)
        .fetch_all(self.reader())
        .await
        .map_err(db("listing nodes"))?;
        rows.into_iter().map(Node::try_from).collect()
    }

    /// One `UPDATE … RETURNING` on the node; `NotFound` if there is no such node.
    async fn update_one(
        &self,
        context: &'static str,
        id: i64,
        set: &str,
        value: impl for<'q> sqlx::Encode<'q, crate::Db> + sqlx::Type<crate::Db> + Send,
    ) -> Result<Node, StoreError> {
        let row: Option<NodeRow> = sqlx::query_as(&format!(
            "UPDATE nodes SET {set} = $2, version = version + 1 WHERE id = $1 RETURNING {COLS}"
        ))
        .bind(id)
        .bind(value)
        .fetch_optional(self.writer())
        .await
        .map_err(db(context))?;
        row.ok_or_else(|| StoreError::not_found("node", id))?
            .try_into()
    }

    /// One cheap `UPDATE` (no row returned); `NotFound` if there is no such node.
    async fn touch_one(
        &self,
        context: &'static str,
        id: i64,
        set: &str,
        value: impl for<'q> sqlx::Encode<'q, crate::Db> + sqlx::Type<crate::Db> + Send,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(&format!(
            "UPDATE nodes SET {set} = $2, version = version + 1 WHERE id = $1"
        ))
        .bind(id)
        .bind(value)
        .execute(self.writer())
        .await
        .map_err(db(context))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found("node", id));
        }
        Ok(())
    }

    /// Node key rotation: the node keeps its id, addresses and name.
    pub async fn update_node_key(&self, id: i64, node_key: &str) -> Result<Node, StoreError> {
        check_key("node key", "nodekey:", node_key)?;
        let row: Option<NodeRow> = sqlx::query_as(&format!(
            "UPDATE nodes SET node_key = $2, version = version + 1 WHERE id = $1 RETURNING {COLS}"
        ))
        .bind(id)
        .bind(node_key)
        .fetch_optional(self.writer())
        .await
        .map_err(node_write_err("rotating a node key", node_key))?;
        row.ok_or_else(|| StoreError::not_found("node", id))?
            .try_into()
    }

    /// Endpoints as reported by the node (cheap; called on every map request).
    pub async fn update_endpoints(&self, id: i64, endpoints: &[String]) -> Result<(), StoreError> {
        self.touch_one("updating endpoints", id, "endpoints", to_json(endpoints))
            .await
    }

    pub async fn update_disco_key(&self, id: i64, disco_key: &str) -> Result<(), StoreError> {
        self.touch_one(
            "updating a disco key",
            id,
            "disco_key",
            disco_key.to_string(),
        )
        .await
    }

    /// Hostinfo as reported; its `Hostname`, if a string, becomes the node's `hostname`
    /// (the DNS name, `given_name`, does not follow: only `rename_node` changes it).
    pub async fn update_hostinfo(
        &self,
        id: i64,
        hostinfo: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE nodes SET hostinfo = $2, hostname = COALESCE($3, hostname), \
               version = version + 1 WHERE id = $1",
        )
        .bind(id)
        .bind(to_json(hostinfo))
        .bind(hostinfo.get("Hostname").and_then(|h| h.as_str()))
        .execute(self.writer())
        .await
        .map_err(db("updating hostinfo"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found("node", id));
        }
        Ok(())
    }

    pub async fn touch_last_seen(&self, id: i64, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.touch_one("recording last seen", id, "last_seen", ms(at))
            .await
    }

    /// Routes the node offers (normalized to their network address, sorted, deduplicated).
    pub async fn set_advertised_routes(
        &self,
        id: i64,
        routes: &[IpNet],
    ) -> Result<Node, StoreError> {
        let routes = sorted_routes(routes);
        self.update_one(
            "setting advertised routes",
            id,
            "advertised_routes",
            to_json(&routes),
        )
        .await
    }

    /// Routes an admin (or auto-approval) allowed; normalized like advertised ones.
    pub async fn set_approved_routes(&self, id: i64, routes: &[IpNet]) -> Result<Node, StoreError> {
        let routes = sorted_routes(routes);
        self.update_one(
            "setting approved routes",
            id,
            "approved_routes",
            to_json(&routes),
        )
        .await
    }

    /// Tags the node: with tags it is owned by them (`user_id` becomes `None`) and its key
    /// no longer expires. Clearing the tags of a tagged node is refused (`Conflict`): it
    /// would have no owner; register it again under a user instead. Clearing a user-owned
    /// node's tags is a no-op.
    pub async fn set_tags(&self, id: i64, tags: &[String]) -> Result<Node, StoreError> {
        let tags = tags.to_vec();
        self.update_node_with(id, move |_| {
            Ok(NodeChange {
                tags: Some(tags),
                ..NodeChange::default()
            })
        })
        .await
    }

    /// Read-compute-write of a node in one write transaction: `f` sees the row as it is
    /// now (no other write can come between the read and the write) and says what to
    /// change. Use it for anything computed from the node's current lists (routes, tags),
    /// so that two such changes never undo each other. An error from `f` writes nothing.
    ///
    /// Routes are normalized as by [`Store::set_approved_routes`]; tags as by
    /// [`Store::set_tags`] (a node that becomes tagged loses its owner and its key
    /// expiry). Nothing is written when nothing changes.
    pub async fn update_node_with<F>(&self, id: i64, f: F) -> Result<Node, StoreError>
    where
        F: FnOnce(&Node) -> Result<NodeChange, StoreError> + Send,
    {
        let mut tx = self.begin_write().await?;
        let node = node_by_id(&mut tx, id).await?;
        let change = f(&node)?;
        let advertised = change
            .advertised_routes
            .map(|r| sorted_routes(&r))
            .unwrap_or_else(|| node.advertised_routes.clone());
        let approved = change
            .approved_routes
            .map(|r| sorted_routes(&r))
            .unwrap_or_else(|| node.approved_routes.clone());
        let (tags, user_id, expiry) = match change.tags {
            None => (node.tags.clone(), node.user_id, node.expiry),
            Some(tags) => {
                let tags = rules::validate_tags(&tags)?;
                if tags.is_empty() && node.user_id.is_none() {
                    return Err(StoreError::conflict(
                        "node",
                        format!(
                            "node {} is owned by its tags; removing them all would leave it \
                             without an owner",
                            node.given_name
                        ),
                    ));
                }
                if tags.is_empty() {
                    (node.tags.clone(), node.user_id, node.expiry)
                } else if node.tags.is_empty() {
                    // Tagged devices are exempt from key expiry (as with Tailscale).
                    (tags, None, None)
                } else {
                    (tags, None, node.expiry)
                }
            }
        };
        let same = advertised == node.advertised_routes
            && approved == node.approved_routes
            && tags == node.tags
            && user_id == node.user_id
            && expiry == node.expiry;
        if same {
            return Ok(node);
        }
        let row: NodeRow = sqlx::query_as(&format!(
            "UPDATE nodes SET advertised_routes = $2, approved_routes = $3, tags = $4, \
               user_id = $5, expiry = $6, version = version + 1 \
             WHERE id = $1 RETURNING {COLS}"
        ))
        .bind(id)
        .bind(to_json(&advertised))
        .bind(to_json(&approved))
        .bind(to_json(&tags))
        .bind(user_id)
        .bind(expiry.map(ms))
        .fetch_one(&mut *tx)
        .await
        .map_err(db("updating a node"))?;
        commit(tx).await?;
        row.try_into()
    }

    /// Gives the node a new DNS name: lowercased, must be a DNS label, must be free.
    pub async fn rename_node(&self, id: i64, name: &str) -> Result<Node, StoreError> {
        let name = rules::validate_given_name(name)?;
        let row: Option<NodeRow> = sqlx::query_as(&format!(
            "UPDATE nodes SET given_name = $2, version = version + 1 WHERE id = $1 \
             RETURNING {COLS}"
        ))
        .bind(id)
        .bind(&name)
        .fetch_optional(self.writer())
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => {
                StoreError::conflict("node", format!("name {name:?} is taken by another node"))
            }
            None => db("renaming a node")(e),
        })?;
        row.ok_or_else(|| StoreError::not_found("node", id))?
            .try_into()
    }

    /// Sets the node's expiry (key expiry, as Tailscale's "expire" does) to `now`.
    pub async fn expire_node(&self, id: i64, now: DateTime<Utc>) -> Result<Node, StoreError> {
        self.update_one("expiring a node", id, "expiry", ms(now))
            .await
    }

    /// Sets or clears the node's key expiry.
    pub async fn set_node_expiry(
        &self,
        id: i64,
        expiry: Option<DateTime<Utc>>,
    ) -> Result<Node, StoreError> {
        self.update_one("setting node expiry", id, "expiry", expiry.map(ms))
            .await
    }

    /// Deletes the node; its addresses and name become free for the next registration.
    pub async fn delete_node(&self, id: i64) -> Result<Node, StoreError> {
        let row: Option<NodeRow> =
            sqlx::query_as(&format!("DELETE FROM nodes WHERE id = $1 RETURNING {COLS}"))
                .bind(id)
                .fetch_optional(self.writer())
                .await
                .map_err(db("deleting a node"))?;
        row.ok_or_else(|| StoreError::not_found("node", id))?
            .try_into()
    }

    /// Deletes ephemeral nodes not seen since `older_than` (never seen: registered before
    /// it). Returns them, so their peers can be told.
    pub async fn delete_ephemeral_offline(
        &self,
        older_than: DateTime<Utc>,
    ) -> Result<Vec<Node>, StoreError> {
        let rows: Vec<NodeRow> = sqlx::query_as(&format!(
            "DELETE FROM nodes WHERE ephemeral AND COALESCE(last_seen, created_at) < $1 \
             RETURNING {COLS}"
        ))
        .bind(ms(older_than))
        .fetch_all(self.writer())
        .await
        .map_err(db("deleting offline ephemeral nodes"))?;
        let mut nodes = rows
            .into_iter()
            .map(Node::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        nodes.sort_by_key(|n| n.id);
        Ok(nodes)
    }
}
