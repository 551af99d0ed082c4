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
    /// Records a registration waiting for an admin, valid for `ttl` from `now`.
    pub async fn create_pending_registration(
        &self,
        machine_key: &str,
        node_key: &str,
        hostinfo: &serde_json::Value,
        now: DateTime<Utc>,
        ttl: TimeDelta,
    ) -> Result<PendingRegistration, StoreError> {
        let row: PendingRow = sqlx::query_as(&format!(
            "INSERT INTO pending_registrations \
               (token, machine_key, node_key, hostinfo, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLS}"
        ))
        .bind(rules::random_base62(TOKEN_LEN))
        .bind(machine_key)
        .bind(node_key)
        .bind(to_json(hostinfo))
        .bind(ms(now))
        .bind(ms(now + ttl))
        .fetch_one(self.writer())
        .await
        .map_err(db("recording a pending registration"))?;
        row.try_into()
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
