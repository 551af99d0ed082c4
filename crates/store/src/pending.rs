//! Interactive registrations: the node waits while an admin runs
//! `nodes register --key TOKEN`.

use chrono::{DateTime, TimeDelta, Utc};

use crate::error::db;
use crate::nodes::{NodeRequest, node_by_id, register_in};
use crate::rules;
use crate::{
    Node, Owner, PendingRegistration, Store, StoreError, commit, from_json, from_ms, ms, to_json,
};

#[derive(sqlx::FromRow)]
struct PendingRow {
    token: String,
    machine_key: String,
    node_key: String,
    hostinfo: String,
    created_at: i64,
    expires_at: i64,
    approved_node_id: Option<i64>,
}

impl TryFrom<PendingRow> for PendingRegistration {
    type Error = StoreError;
    fn try_from(r: PendingRow) -> Result<PendingRegistration, StoreError> {
        Ok(PendingRegistration {
            token: r.token,
            machine_key: r.machine_key,
            node_key: r.node_key,
            hostinfo: from_json("registration hostinfo", &r.hostinfo)?,
            created_at: from_ms("registration created_at", r.created_at)?,
            expires_at: from_ms("registration expires_at", r.expires_at)?,
            approved_node_id: r.approved_node_id,
        })
    }
}

const COLS: &str =
    "token, machine_key, node_key, hostinfo, created_at, expires_at, approved_node_id";
/// Token length: 24 base62 characters (~143 bits).
const TOKEN_LEN: usize = 24;

impl Store {
    /// Records the registration of `machine_key` waiting for an admin, valid for `ttl`
    /// from `now`: one row per machine key. A machine that asks again while its
    /// registration waits for the same node key gets that registration back (same token,
    /// nothing written); otherwise (a new node key, or an expired or approved row) its
    /// row is replaced by a new one with a new token.
    ///
    /// Expired rows are purged in the same transaction. At most `max_rows` rows exist:
    /// a machine without a row beyond that gets `Limit` (nothing written).
    pub async fn create_pending_registration(
        &self,
        machine_key: &str,
        node_key: &str,
        hostinfo: &serde_json::Value,
        now: DateTime<Utc>,
        ttl: TimeDelta,
        max_rows: u64,
    ) -> Result<PendingRegistration, StoreError> {
        let reusable = |p: &PendingRegistration| {
            p.approved_node_id.is_none() && p.expires_at > now && p.node_key == node_key
        };
        // The common repeat costs a read, not a write (and its fsync).
        let row: Option<PendingRow> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM pending_registrations WHERE machine_key = $1"
        ))
        .bind(machine_key)
        .fetch_optional(self.reader())
        .await
        .map_err(db("looking up a pending registration"))?;
        if let Some(p) = row.map(PendingRegistration::try_from).transpose()?
            && reusable(&p)
        {
            return Ok(p);
        }
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM pending_registrations WHERE expires_at <= $1")
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .map_err(db("purging expired registrations"))?;
        let row: Option<PendingRow> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM pending_registrations WHERE machine_key = $1"
        ))
        .bind(machine_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("looking up a pending registration"))?;
        let existing = row.map(PendingRegistration::try_from).transpose()?;
        if let Some(p) = existing.as_ref().filter(|p| reusable(p)) {
            let p = p.clone();
            commit(tx).await?;
            return Ok(p);
        }
        if existing.is_none() {
            let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pending_registrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(db("counting pending registrations"))?;
            if u64::try_from(rows).unwrap_or(u64::MAX) >= max_rows {
                commit(tx).await?;
                return Err(StoreError::Limit {
                    what: "registrations waiting for an admin",
                    limit: max_rows,
                });
            }
        }
        let row: PendingRow = sqlx::query_as(&format!(
            "INSERT INTO pending_registrations \
               (token, machine_key, node_key, hostinfo, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (machine_key) DO UPDATE SET token = excluded.token, \
               node_key = excluded.node_key, hostinfo = excluded.hostinfo, \
               created_at = excluded.created_at, expires_at = excluded.expires_at, \
               approved_node_id = NULL \
             RETURNING {COLS}"
        ))
        .bind(rules::random_base62(TOKEN_LEN))
        .bind(machine_key)
        .bind(node_key)
        .bind(to_json(hostinfo))
        .bind(ms(now))
        .bind(ms(now + ttl))
        .fetch_one(&mut *tx)
        .await
        .map_err(db("recording a pending registration"))?;
        commit(tx).await?;
        row.try_into()
    }

    /// How many registrations are stored (waiting, approved or expired but not purged).
    pub async fn pending_registration_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pending_registrations")
            .fetch_one(self.reader())
            .await
            .map_err(db("counting pending registrations"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub async fn get_pending_registration(
        &self,
        token: &str,
    ) -> Result<PendingRegistration, StoreError> {
        let row: Option<PendingRow> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM pending_registrations WHERE token = $1"
        ))
        .bind(token)
        .fetch_optional(self.reader())
        .await
        .map_err(db("looking up a pending registration"))?;
        row.ok_or_else(|| StoreError::not_found("registration", format!("{token:?}")))?
            .try_into()
    }

    /// Approves a waiting registration: registers the node for `owner` and marks the
    /// registration approved, in one transaction. Approving twice returns the same node.
    /// `Conflict` once the registration has expired.
    pub async fn approve_pending_registration(
        &self,
        token: &str,
        owner: Owner,
        expiry: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Node, StoreError> {
        let mut tx = self.begin_write().await?;
        let row: Option<PendingRow> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM pending_registrations WHERE token = $1"
        ))
        .bind(token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("looking up a pending registration"))?;
        let pending: PendingRegistration = row
            .ok_or_else(|| StoreError::not_found("registration", format!("{token:?}")))?
            .try_into()?;
        if let Some(id) = pending.approved_node_id {
            return node_by_id(&mut tx, id).await;
        }
        if pending.expires_at <= now {
            return Err(StoreError::conflict(
                "registration",
                format!(
                    "registration {token:?} expired at {}; the node must start again",
                    pending.expires_at
                ),
            ));
        }
        let hostname = pending
            .hostinfo
            .get("Hostname")
            .and_then(|h| h.as_str())
            .unwrap_or("")
            .to_string();
        let request = NodeRequest {
            machine_key: pending.machine_key,
            node_key: pending.node_key,
            hostname,
            hostinfo: pending.hostinfo,
            expiry,
        };
        let node = register_in(&mut tx, &request.with_owner(owner, false, None)).await?;
        sqlx::query("UPDATE pending_registrations SET approved_node_id = $2 WHERE token = $1")
            .bind(token)
            .bind(node.id)
            .execute(&mut *tx)
            .await
            .map_err(db("approving a registration"))?;
        commit(tx).await?;
        Ok(node)
    }

    /// Ends a waiting registration now (it can no longer be approved).
    pub async fn expire_pending_registration(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE pending_registrations SET expires_at = $2 \
             WHERE token = $1 AND expires_at > $2",
        )
        .bind(token)
        .bind(ms(now))
        .execute(self.writer())
        .await
        .map_err(db("expiring a registration"))?;
        if done.rows_affected() == 0 {
            // Already expired is fine; unknown is not.
            self.get_pending_registration(token).await?;
        }
        Ok(())
    }

    /// Deletes registrations that expired at or before `now`; returns how many.
    pub async fn purge_expired_registrations(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM pending_registrations WHERE expires_at <= $1")
            .bind(ms(now))
            .execute(self.writer())
            .await
            .map_err(db("purging expired registrations"))?;
        Ok(done.rows_affected())
    }
}
