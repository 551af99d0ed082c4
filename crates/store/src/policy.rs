//! The ACL policy document, stored verbatim (parsing is `tsunagu-policy`'s job).

use chrono::{DateTime, Utc};

use crate::error::db;
use crate::{Store, StoreError, from_ms, ms};

impl Store {
    /// The current policy and when it was set, if one was.
    pub async fn get_policy(&self) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT body, updated_at FROM policy WHERE id = 1")
                .fetch_optional(self.reader())
                .await
                .map_err(db("reading the policy"))?;
        row.map(|(body, at)| Ok((body, from_ms("policy updated_at", at)?)))
            .transpose()
    }

    /// Replaces the policy; returns its new `updated_at`.
    pub async fn set_policy(&self, body: &str) -> Result<DateTime<Utc>, StoreError> {
        let now = Utc::now();
        sqlx::query(
            "INSERT INTO policy (id, body, updated_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
        )
        .bind(body)
        .bind(ms(now))
        .execute(self.writer())
        .await
        .map_err(db("saving the policy"))?;
        // What was stored (millisecond precision), so callers can compare with get_policy.
        from_ms("policy updated_at", ms(now))
    }
}
