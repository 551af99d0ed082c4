//! `StoreError`: what went wrong, phrased for an admin.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// Why a pre-auth key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRejected {
    /// Malformed, or no such key (or it was deleted with its user).
    Unknown,
    /// Past its expiration, or expired by an admin.
    Expired,
    /// A single-use key that was already redeemed.
    Used,
}

impl fmt::Display for KeyRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyRejected::Unknown => "unknown key",
            KeyRejected::Expired => "key has expired",
            KeyRejected::Used => "single-use key was already used",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No row for that key, e.g. `user "alice" not found`.
    #[error("{what} {key} not found")]
    NotFound { what: &'static str, key: String },

    /// A uniqueness or ownership rule would be broken; nothing was written.
    #[error("{what}: {detail}")]
    Conflict { what: &'static str, detail: String },

    /// The caller's input breaks a rule (a name that is not DNS-safe, a tag without `tag:`).
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },

    #[error("pre-auth key rejected: {0}")]
    KeyRejected(KeyRejected),

    /// A bound on stored rows was reached (e.g. registrations waiting for an admin);
    /// nothing was written. Retry later.
    #[error("too many {what} (at most {limit}); try again later")]
    Limit { what: &'static str, limit: u64 },

    /// Every address of 100.64.0.0/10 that may be handed out is held by a node.
    #[error("no free address left in 100.64.0.0/10 (delete unused nodes)")]
    AddressesExhausted,

    /// A stored value could not be read back (hand-edited database, or a bug).
    #[error("corrupt {what} in the database: {detail}")]
    Corrupt { what: &'static str, detail: String },

    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("applying database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The database itself failed (I/O, locked past the busy timeout, …).
    #[error("database error while {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    pub(crate) fn not_found(what: &'static str, key: impl fmt::Display) -> Self {
        StoreError::NotFound {
            what,
            key: key.to_string(),
        }
    }

    pub(crate) fn conflict(what: &'static str, detail: impl Into<String>) -> Self {
        StoreError::Conflict {
            what,
            detail: detail.into(),
        }
    }

    /// `Invalid`: the caller's input (or the operation asked of a row) breaks a rule.
    pub fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        StoreError::Invalid {
            what,
            detail: detail.into(),
        }
    }

    pub(crate) fn corrupt(what: &'static str, detail: impl fmt::Display) -> Self {
        StoreError::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }

    /// True for `NotFound`.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// True for `Limit`.
    pub fn is_limit(&self) -> bool {
        matches!(self, StoreError::Limit { .. })
    }

    /// True for `Conflict`.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// `.map_err(db("listing nodes"))`
pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Db { context, source }
}

/// The unique constraint a failed statement broke, as `table.column`, if that is what
/// happened. Dialect-specific (the SQLite message names the columns; PostgreSQL would
/// give the constraint name), so kept here in one place.
pub(crate) fn unique_violation(err: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(e) = err else {
        return None;
    };
    if !e.is_unique_violation() {
        return None;
    }
    if let Some(c) = e.constraint() {
        return Some(c.to_string());
    }
    // SQLite: "UNIQUE constraint failed: nodes.node_key"
    let msg = e.message();
    Some(
        msg.rsplit_once(": ")
            .map(|(_, cols)| cols.to_string())
            .unwrap_or_else(|| msg.to_string()),
    )
}
