//! Pre-auth keys. Only a SHA-256 of each key is stored; the key string is returned once,
//! by `create_preauth_key`.

use chrono::{DateTime, Utc};

use crate::error::{db, unique_violation};
use crate::rules::{self, KEY_PREFIX};
use crate::users::user_exists;
use crate::{
    Conn, KeyRejected, PreAuthKey, Store, StoreError, commit, from_json, from_ms, from_ms_opt, ms,
    to_json,
};

#[derive(sqlx::FromRow)]
pub(crate) struct KeyRow {
    id: i64,
    key_id: String,
    key_hash: String,
    user_id: i64,
    reusable: bool,
    ephemeral: bool,
    used_count: i64,
    expires_at: Option<i64>,
    tags: String,
    created_at: i64,
}

impl TryFrom<KeyRow> for PreAuthKey {
    type Error = StoreError;
    fn try_from(r: KeyRow) -> Result<PreAuthKey, StoreError> {
        Ok(PreAuthKey {
            id: r.id,
            user_id: r.user_id,
            key_prefix: format!("{KEY_PREFIX}{}", r.key_id),
            reusable: r.reusable,
            ephemeral: r.ephemeral,
            used: r.used_count,
            expires_at: from_ms_opt("pre-auth key expires_at", r.expires_at)?,
            tags: from_json("pre-auth key tags", &r.tags)?,
            created_at: from_ms("pre-auth key created_at", r.created_at)?,
        })
    }
}

const COLS: &str =
    "id, key_id, key_hash, user_id, reusable, ephemeral, used_count, expires_at, tags, created_at";

/// Checks `full_key` and counts one use, atomically: the conditional `UPDATE` only matches
/// while the key is usable, so of two concurrent redemptions of a single-use key exactly one
/// updates a row (and SQLite's single writer serializes them anyway).
///
/// `reuse_by_machine`: a machine key whose existing node was registered with this very key
/// may re-register with it although it is single-use and used (a client retrying after a
/// lost answer); that costs no use. Expiry still applies.
pub(crate) async fn redeem_in(
    conn: &mut Conn,
    full_key: &str,
    now: DateTime<Utc>,
    reuse_by_machine: Option<&str>,
) -> Result<PreAuthKey, StoreError> {
    let reject = |r| StoreError::KeyRejected(r);
    let row = matching_row(conn, full_key).await?;
    let id = row.id;
    let key: PreAuthKey = row.try_into()?;
    if let Some(machine_key) = reuse_by_machine {
        // A retry only while the node is live: a node the admin expired must
        // authenticate with a fresh key, not replay the one it used.
        let holder: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT auth_key_id FROM nodes WHERE machine_key = $1 \
               AND (expiry IS NULL OR expiry > $2)",
        )
        .bind(machine_key)
        .bind(ms(now))
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("looking up a node"))?;
        if holder.flatten() == Some(id) {
            return match key.rejection(now) {
                Some(KeyRejected::Expired) => Err(reject(KeyRejected::Expired)),
                _ => Ok(key),
            };
        }
    }
    let updated: Option<KeyRow> = sqlx::query_as(&format!(
        "UPDATE pre_auth_keys SET used_count = used_count + 1 \
         WHERE id = $1 AND (reusable OR used_count = 0) \
           AND (expires_at IS NULL OR expires_at > $2) \
         RETURNING {COLS}"
    ))
    .bind(id)
    .bind(ms(now))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("redeeming a pre-auth key"))?;
    match updated {
        Some(row) => row.try_into(),
        None => Err(reject(key.rejection(now).unwrap_or(KeyRejected::Used))),
    }
}

/// The row of `full_key`, if it exists and its secret matches the stored hash (in
/// constant time); else the key is refused as unknown.
async fn matching_row(conn: &mut Conn, full_key: &str) -> Result<KeyRow, StoreError> {
    let unknown = || StoreError::KeyRejected(KeyRejected::Unknown);
    let key_id = rules::parse_auth_key(full_key).ok_or_else(unknown)?;
    let row: Option<KeyRow> = sqlx::query_as(&format!(
        "SELECT {COLS} FROM pre_auth_keys WHERE key_id = $1"
    ))
    .bind(key_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("looking up a pre-auth key"))?;
    let row = row.ok_or_else(unknown)?;
    if !rules::ct_eq(&row.key_hash, &rules::hash_auth_key(full_key)) {
        return Err(unknown());
    }
    Ok(row)
}

/// The first checks of [`redeem_in`] on a reader connection: a key that does not exist,
/// does not match its hash or has expired is refused without taking the writer (a flood
/// of made-up keys must not queue up behind, or in front of, real registrations).
pub(crate) async fn precheck(
    conn: &mut Conn,
    full_key: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let reject = |r| StoreError::KeyRejected(r);
    let row = matching_row(conn, full_key).await?;
    let key: PreAuthKey = row.try_into()?;
    match key.rejection(now) {
        Some(KeyRejected::Expired) => Err(reject(KeyRejected::Expired)),
        _ => Ok(()),
    }
}

impl Store {
    /// Creates a key for `user_id`. Returns the key as listed and, once only, the full
    /// key string (`tskey-auth-<12 base62>-<32 base62>`) to hand to the admin.
    /// With `tags`, nodes registered with it are owned by the tags, not the user.
    pub async fn create_preauth_key(
        &self,
        user_id: i64,
        reusable: bool,
        ephemeral: bool,
        expires_at: Option<DateTime<Utc>>,
        tags: &[String],
    ) -> Result<(PreAuthKey, String), StoreError> {
        let tags = rules::validate_tags(tags)?;
        let (key_id, full) = rules::new_auth_key();
        let mut tx = self.begin_write().await?;
        if !user_exists(&mut tx, user_id).await? {
            return Err(StoreError::not_found("user", user_id));
        }
        let row: KeyRow = sqlx::query_as(&format!(
            "INSERT INTO pre_auth_keys \
               (key_id, key_hash, user_id, reusable, ephemeral, used_count, expires_at, tags, \
                created_at) \
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8) RETURNING {COLS}"
        ))
        .bind(&key_id)
        .bind(rules::hash_auth_key(&full))
        .bind(user_id)
        .bind(reusable)
        .bind(ephemeral)
        .bind(expires_at.map(ms))
        .bind(to_json(&tags))
        .bind(ms(Utc::now()))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => StoreError::conflict("pre-auth key", "key id collision; try again"),
            None => db("creating a pre-auth key")(e),
        })?;
        commit(tx).await?;
        Ok((row.try_into()?, full))
    }

    /// Keys, all or one user's, oldest first.
    pub async fn list_preauth_keys(
        &self,
        user_id: Option<i64>,
    ) -> Result<Vec<PreAuthKey>, StoreError> {
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM pre_auth_keys WHERE ($1 IS NULL OR user_id = $1) ORDER BY id"
        ))
        .bind(user_id)
        .fetch_all(self.reader())
        .await
        .map_err(db("listing pre-auth keys"))?;
        rows.into_iter().map(PreAuthKey::try_from).collect()
    }

    pub async fn get_preauth_key(&self, id: i64) -> Result<PreAuthKey, StoreError> {
        let row: Option<KeyRow> =
            sqlx::query_as(&format!("SELECT {COLS} FROM pre_auth_keys WHERE id = $1"))
                .bind(id)
                .fetch_optional(self.reader())
                .await
                .map_err(db("looking up a pre-auth key"))?;
        row.ok_or_else(|| StoreError::not_found("pre-auth key", id))?
            .try_into()
    }

    /// Makes the key expire at `now` (if it would expire later or never).
    pub async fn expire_preauth_key(
        &self,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<PreAuthKey, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "UPDATE pre_auth_keys SET expires_at = $2 \
             WHERE id = $1 AND (expires_at IS NULL OR expires_at > $2) RETURNING {COLS}"
        ))
        .bind(id)
        .bind(ms(now))
        .fetch_optional(self.writer())
        .await
        .map_err(db("expiring a pre-auth key"))?;
        match row {
            Some(r) => r.try_into(),
            // Already expired, or no such key.
            None => self.get_preauth_key(id).await,
        }
    }

    /// Deletes a key; nodes registered with it keep running (their `auth_key_id` clears).
    pub async fn delete_preauth_key(&self, id: i64) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM pre_auth_keys WHERE id = $1")
            .bind(id)
            .execute(self.writer())
            .await
            .map_err(db("deleting a pre-auth key"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found("pre-auth key", id));
        }
        Ok(())
    }

    /// Checks the key and counts one use, atomically. A single-use key is redeemed at most
    /// once, however many callers race. Prefer [`Store::register_with_preauth_key`], which
    /// also registers the node in the same transaction (a failed registration then does
    /// not burn the key).
    pub async fn redeem_preauth_key(
        &self,
        full_key: &str,
        now: DateTime<Utc>,
    ) -> Result<PreAuthKey, StoreError> {
        let mut tx = self.begin_write().await?;
        let key = redeem_in(&mut tx, full_key, now, None).await?;
        commit(tx).await?;
        Ok(key)
    }
}
