//! Standby hosts of an exit node: the single-use keys that enrol them, the hosts, and
//! which host serves each node that has some. What the keys let in is decided by the
//! server (tagged, approved exit nodes only); the store keeps the rows consistent: a key
//! is redeemed once, by one machine, before it expires, and a machine is a node or a host
//! of one node, never both.

use chrono::{DateTime, Utc};

use crate::error::{db, unique_violation};
use crate::rules::{self, ct_eq, hash_auth_key, random_base62};
use crate::{Conn, KeyRejected, Store, StoreError, commit, from_ms, from_ms_opt, ms};

/// Standby keys start with this (the same prefix the control protocol's
/// `STANDBY_KEY_PREFIX` names).
pub const STANDBY_KEY_PREFIX: &str = "tskey-standby-";
const KEY_ID_LEN: usize = 12;
const KEY_SECRET_LEN: usize = 32;

/// A standby key as listed; the key itself is shown once, by
/// [`Store::create_standby_key`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StandbyKey {
    pub id: i64,
    /// `tskey-standby-<key id>`.
    pub key_prefix: String,
    pub node_id: i64,
    pub expires_at: DateTime<Utc>,
    /// The machine key of the host that redeemed it.
    pub used_by: Option<String>,
    pub used_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A host that holds a node's identity besides the node's own machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StandbyHost {
    pub id: i64,
    pub node_id: i64,
    /// `mkey:<hex>`
    pub machine_key: String,
    /// As the host reported it when it enrolled.
    pub hostname: String,
    pub created_at: DateTime<Utc>,
}

/// Which host serves a node with standby hosts, and the last switch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActiveHost {
    pub node_id: i64,
    pub machine_key: String,
    pub switched_at: DateTime<Utc>,
    pub reason: String,
    /// The host that served before (empty: none recorded).
    pub from_machine_key: String,
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: i64,
    key_id: String,
    key_hash: String,
    node_id: i64,
    expires_at: i64,
    used_by: Option<String>,
    used_at: Option<i64>,
    created_at: i64,
}

impl TryFrom<KeyRow> for StandbyKey {
    type Error = StoreError;
    fn try_from(r: KeyRow) -> Result<StandbyKey, StoreError> {
        Ok(StandbyKey {
            id: r.id,
            key_prefix: format!("{STANDBY_KEY_PREFIX}{}", r.key_id),
            node_id: r.node_id,
            expires_at: from_ms("standby key expires_at", r.expires_at)?,
            used_by: r.used_by,
            used_at: from_ms_opt("standby key used_at", r.used_at)?,
            created_at: from_ms("standby key created_at", r.created_at)?,
        })
    }
}

const KEY_COLS: &str = "id, key_id, key_hash, node_id, expires_at, used_by, used_at, created_at";

#[derive(sqlx::FromRow)]
struct HostRow {
    id: i64,
    node_id: i64,
    machine_key: String,
    hostname: String,
    created_at: i64,
}

impl TryFrom<HostRow> for StandbyHost {
    type Error = StoreError;
    fn try_from(r: HostRow) -> Result<StandbyHost, StoreError> {
        Ok(StandbyHost {
            id: r.id,
            node_id: r.node_id,
            machine_key: r.machine_key,
            hostname: r.hostname,
            created_at: from_ms("standby host created_at", r.created_at)?,
        })
    }
}

const HOST_COLS: &str = "id, node_id, machine_key, hostname, created_at";

#[derive(sqlx::FromRow)]
struct ActiveRow {
    node_id: i64,
    machine_key: String,
    switched_at: i64,
    reason: String,
    from_machine_key: String,
}

impl TryFrom<ActiveRow> for ActiveHost {
    type Error = StoreError;
    fn try_from(r: ActiveRow) -> Result<ActiveHost, StoreError> {
        Ok(ActiveHost {
            node_id: r.node_id,
            machine_key: r.machine_key,
            switched_at: from_ms("standby active switched_at", r.switched_at)?,
            reason: r.reason,
            from_machine_key: r.from_machine_key,
        })
    }
}

const ACTIVE_COLS: &str = "node_id, machine_key, switched_at, reason, from_machine_key";

/// The key id of a well-formed standby key.
fn parse_standby_key(full: &str) -> Option<&str> {
    let rest = full.strip_prefix(STANDBY_KEY_PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    let b62 = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (b62(id, KEY_ID_LEN) && b62(secret, KEY_SECRET_LEN)).then_some(id)
}

async fn host_by_machine_key(conn: &mut Conn, mk: &str) -> Result<Option<StandbyHost>, StoreError> {
    let row: Option<HostRow> = sqlx::query_as(&format!(
        "SELECT {HOST_COLS} FROM standby_hosts WHERE machine_key = $1"
    ))
    .bind(mk)
    .fetch_optional(conn)
    .await
    .map_err(db("looking up a standby host"))?;
    row.map(StandbyHost::try_from).transpose()
}

impl Store {
    /// A single-use key that enrols one host as standby of node `node_id`, valid until
    /// `expires_at`. Returns the key as listed and, once only, the full key string.
    pub async fn create_standby_key(
        &self,
        node_id: i64,
        expires_at: DateTime<Utc>,
    ) -> Result<(StandbyKey, String), StoreError> {
        let id = random_base62(KEY_ID_LEN);
        let full = format!("{STANDBY_KEY_PREFIX}{id}-{}", random_base62(KEY_SECRET_LEN));
        let row: KeyRow = sqlx::query_as(&format!(
            "INSERT INTO standby_keys (key_id, key_hash, node_id, expires_at, used_by, used_at, \
               created_at) \
             VALUES ($1, $2, $3, $4, NULL, NULL, $5) RETURNING {KEY_COLS}"
        ))
        .bind(&id)
        .bind(hash_auth_key(&full))
        .bind(node_id)
        .bind(ms(expires_at))
        .bind(ms(Utc::now()))
        .fetch_one(self.writer())
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => StoreError::conflict("standby key", "key id collision; try again"),
            None if e
                .as_database_error()
                .is_some_and(|d| d.is_foreign_key_violation()) =>
            {
                StoreError::not_found("node", node_id)
            }
            None => db("creating a standby key")(e),
        })?;
        Ok((row.try_into()?, full))
    }

    /// Redeems `full_key` for the machine `machine_key` (named `hostname`), in one
    /// transaction: the key must be unused and unexpired; the machine must be neither a
    /// node nor a host of another node. The same machine redeeming its own key again (a
    /// retry after a lost answer) gets its host back. Returns the host and the key.
    pub async fn redeem_standby_key(
        &self,
        full_key: &str,
        machine_key: &str,
        hostname: &str,
        now: DateTime<Utc>,
    ) -> Result<(StandbyHost, StandbyKey), StoreError> {
        let reject = |r| StoreError::KeyRejected(r);
        let key_id = parse_standby_key(full_key).ok_or(reject(KeyRejected::Unknown))?;
        let mut tx = self.begin_write().await?;
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLS} FROM standby_keys WHERE key_id = $1"
        ))
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("looking up a standby key"))?;
        let row = row.ok_or(reject(KeyRejected::Unknown))?;
        if !ct_eq(&row.key_hash, &hash_auth_key(full_key)) {
            return Err(reject(KeyRejected::Unknown));
        }
        let node_id = row.node_id;
        let key: StandbyKey = row.try_into()?;
        if key.expires_at <= now {
            return Err(reject(KeyRejected::Expired));
        }
        match key.used_by.as_deref() {
            Some(mk) if mk == machine_key => {
                // A retry: the host it made, if it was not removed since.
                return match host_by_machine_key(&mut tx, machine_key).await? {
                    Some(h) if h.node_id == node_id => Ok((h, key)),
                    _ => Err(reject(KeyRejected::Used)),
                };
            }
            Some(_) => return Err(reject(KeyRejected::Used)),
            None => {}
        }
        let is_node: Option<i64> =
            sqlx::query_scalar("SELECT id FROM nodes WHERE machine_key = $1")
                .bind(machine_key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("looking up a node"))?;
        if is_node.is_some() {
            return Err(StoreError::conflict(
                "standby host",
                "this machine is a node of the tailnet already; enrol a standby from a fresh \
                 state directory",
            ));
        }
        if let Some(h) = host_by_machine_key(&mut tx, machine_key).await? {
            return Err(StoreError::conflict(
                "standby host",
                format!(
                    "this machine is a standby host of node {} already",
                    h.node_id
                ),
            ));
        }
        let host: HostRow = sqlx::query_as(&format!(
            "INSERT INTO standby_hosts (node_id, machine_key, hostname, created_at) \
             VALUES ($1, $2, $3, $4) RETURNING {HOST_COLS}"
        ))
        .bind(node_id)
        .bind(machine_key)
        .bind(rules::sanitize_hostname(hostname))
        .bind(ms(now))
        .fetch_one(&mut *tx)
        .await
        .map_err(db("adding a standby host"))?;
        let used: KeyRow = sqlx::query_as(&format!(
            "UPDATE standby_keys SET used_by = $2, used_at = $3 WHERE id = $1 AND used_by IS NULL \
             RETURNING {KEY_COLS}"
        ))
        .bind(key.id)
        .bind(machine_key)
        .bind(ms(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("redeeming a standby key"))?
        .ok_or(reject(KeyRejected::Used))?;
        commit(tx).await?;
        Ok((host.try_into()?, used.try_into()?))
    }

    /// Standby keys, all or one node's, oldest first.
    pub async fn list_standby_keys(
        &self,
        node_id: Option<i64>,
    ) -> Result<Vec<StandbyKey>, StoreError> {
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLS} FROM standby_keys WHERE ($1 IS NULL OR node_id = $1) ORDER BY id"
        ))
        .bind(node_id)
        .fetch_all(self.reader())
        .await
        .map_err(db("listing standby keys"))?;
        rows.into_iter().map(StandbyKey::try_from).collect()
    }

    /// Standby hosts, all or one node's, oldest first.
    pub async fn list_standby_hosts(
        &self,
        node_id: Option<i64>,
    ) -> Result<Vec<StandbyHost>, StoreError> {
        let rows: Vec<HostRow> = sqlx::query_as(&format!(
            "SELECT {HOST_COLS} FROM standby_hosts WHERE ($1 IS NULL OR node_id = $1) ORDER BY id"
        ))
        .bind(node_id)
        .fetch_all(self.reader())
        .await
        .map_err(db("listing standby hosts"))?;
        rows.into_iter().map(StandbyHost::try_from).collect()
    }

    /// The standby host with this machine key, if there is one.
    pub async fn get_standby_host(
        &self,
        machine_key: &str,
    ) -> Result<Option<StandbyHost>, StoreError> {
        let mut conn = self
            .reader()
            .acquire()
            .await
            .map_err(db("looking up a standby host"))?;
        host_by_machine_key(&mut conn, machine_key).await
    }

    /// Removes a standby host (its machine can no longer act for the node).
    pub async fn delete_standby_host(&self, id: i64) -> Result<StandbyHost, StoreError> {
        let row: Option<HostRow> = sqlx::query_as(&format!(
            "DELETE FROM standby_hosts WHERE id = $1 RETURNING {HOST_COLS}"
        ))
        .bind(id)
        .fetch_optional(self.writer())
        .await
        .map_err(db("removing a standby host"))?;
        row.ok_or_else(|| StoreError::not_found("standby host", id))?
            .try_into()
    }

    /// Records that `machine_key` serves node `node_id` from `at` on, and why.
    pub async fn set_standby_active(
        &self,
        node_id: i64,
        machine_key: &str,
        from_machine_key: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<ActiveHost, StoreError> {
        let row: ActiveRow = sqlx::query_as(&format!(
            "INSERT INTO standby_active (node_id, machine_key, switched_at, reason, \
               from_machine_key) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (node_id) DO UPDATE SET machine_key = $2, switched_at = $3, \
               reason = $4, from_machine_key = $5 \
             RETURNING {ACTIVE_COLS}"
        ))
        .bind(node_id)
        .bind(machine_key)
        .bind(ms(at))
        .bind(reason)
        .bind(from_machine_key)
        .fetch_one(self.writer())
        .await
        .map_err(db("recording the active host"))?;
        row.try_into()
    }

    /// The active host of every node that has one recorded.
    pub async fn list_standby_active(&self) -> Result<Vec<ActiveHost>, StoreError> {
        let rows: Vec<ActiveRow> = sqlx::query_as(&format!(
            "SELECT {ACTIVE_COLS} FROM standby_active ORDER BY node_id"
        ))
        .fetch_all(self.reader())
        .await
        .map_err(db("listing active hosts"))?;
        rows.into_iter().map(ActiveHost::try_from).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_keys_parse_only_in_their_own_form() {
        let id = "a".repeat(KEY_ID_LEN);
        let secret = "B".repeat(KEY_SECRET_LEN);
        let good = format!("{STANDBY_KEY_PREFIX}{id}-{secret}");
        assert_eq!(parse_standby_key(&good), Some(id.as_str()));
        assert_eq!(
            parse_standby_key(&format!("tskey-auth-{id}-{secret}")),
            None
        );
        assert_eq!(
            parse_standby_key(&format!("{STANDBY_KEY_PREFIX}{id}-x")),
            None
        );
        assert_eq!(parse_standby_key(""), None);
    }
}
