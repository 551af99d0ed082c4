//! tsunagu-server's storage: users, nodes, pre-auth keys, interactive registrations and the
//! ACL policy, in SQLite (embedded; PostgreSQL is meant to fill the same seam later).
//!
//! # Shape
//!
//! [`Store`] is a cheap-to-clone handle. Every operation is one method; anything that touches
//! more than one row runs in one write transaction, so a failure leaves nothing behind.
//!
//! # Backend seam
//!
//! The connection pools sit behind the private `Backend` enum, with one variant today. What
//! is dialect-specific is kept in few places: the migrations (`migrations/`, SQLite DDL),
//! connection setup and `BEGIN IMMEDIATE` (`sqlite` module), and reading a unique-violation
//! error (`error::unique_violation`). Query text is portable: `$n` placeholders,
//! timestamps as BIGINT milliseconds (no dialect date functions, exact comparisons), JSON
//! as TEXT, `ON CONFLICT … DO`, `RETURNING`. Adding PostgreSQL means a `Backend::Postgres`
//! variant, a `migrations-postgres/` set mirroring `migrations/`, and instantiating the
//! query functions (written against the `Db` alias) for `sqlx::Postgres` too, with an
//! advisory lock in place of `BEGIN IMMEDIATE` for the address allocator.
//!
//! # Concurrency and durability (SQLite)
//!
//! One writer connection (writes queue in the pool, in order) that opens every write
//! transaction with `BEGIN IMMEDIATE` (so a second process, e.g. an admin tool on the same
//! file, waits on the busy timeout instead of failing on a lock upgrade); a few reader
//! connections, which WAL lets run beside the writer. `synchronous=FULL`: a commit is
//! fsynced before it returns, so a node that was answered as registered survives a crash.

mod error;
mod nodes;
mod pending;
mod policy;
mod preauth;
pub mod rules;
mod sqlite;
mod standby;
mod types;
mod users;

use std::path::Path;

use chrono::{DateTime, Utc};
use sqlx::Pool;

pub use error::{KeyRejected, StoreError};
pub use nodes::NodeRequest;
pub use standby::{ActiveHost, STANDBY_KEY_PREFIX, StandbyHost, StandbyKey};
pub use types::{NewNode, Node, Owner, PendingRegistration, PreAuthKey, User};

/// The dialect the query functions are written for (see "Backend seam").
type Db = sqlx::Sqlite;
type Conn = sqlx::SqliteConnection;
type Tx = sqlx::Transaction<'static, Db>;

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "tsunagu.db";

#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::Pools),
}

/// Handle on the server's database. Clone it freely (it shares the pools).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Sqlite(p) => f.debug_struct("Store").field("sqlite", &p.path).finish(),
        }
    }
}

impl Store {
    /// Opens (creating if needed) `data_dir/tsunagu.db`: the directory is created 0700,
    /// the file 0600; WAL, foreign keys, busy timeout, `synchronous=FULL`; then pending
    /// migrations are applied (already-applied ones are skipped, by version).
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let pools = sqlite::open_file(data_dir).await?;
        Self::migrate(&pools.writer).await?;
        Ok(Store {
            backend: Backend::Sqlite(pools),
        })
    }

    /// A private in-memory database (one connection), migrated; for tests and demos.
    pub async fn open_memory() -> Result<Store, StoreError> {
        let pools = sqlite::open_memory().await?;
        Self::migrate(&pools.writer).await?;
        Ok(Store {
            backend: Backend::Sqlite(pools),
        })
    }

    async fn migrate(pool: &Pool<Db>) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(pool).await?;
        Ok(())
    }

    /// Closes the pools, waiting for connections in use to come back.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(p) => {
                p.writer.close().await;
                p.reader.close().await;
            }
        }
    }

    /// Versions of the migrations applied to this database, in order.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(self.reader())
            .await
            .map_err(error::db("reading the migration history"))
    }

    fn reader(&self) -> &Pool<Db> {
        match &self.backend {
            Backend::Sqlite(p) => &p.reader,
        }
    }

    fn writer(&self) -> &Pool<Db> {
        match &self.backend {
            Backend::Sqlite(p) => &p.writer,
        }
    }

    /// A write transaction; dropping it without `commit` rolls back.
    async fn begin_write(&self) -> Result<Tx, StoreError> {
        match &self.backend {
            Backend::Sqlite(p) => sqlite::begin_immediate(&p.writer).await,
        }
    }
}

async fn commit(tx: Tx) -> Result<(), StoreError> {
    tx.commit()
        .await
        .map_err(error::db("committing a transaction"))
}

// Timestamps are stored as milliseconds since the Unix epoch.
fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(what: &'static str, v: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(v)
        .ok_or_else(|| StoreError::corrupt(what, format!("timestamp {v} out of range")))
}

fn from_ms_opt(what: &'static str, v: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    v.map(|v| from_ms(what, v)).transpose()
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    // Serializing our own plain types (strings, lists, `Value`) cannot fail.
    serde_json::to_string(v).expect("serializing to JSON")
}

fn from_json<T: serde::de::DeserializeOwned>(what: &'static str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::corrupt(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn handles_and_errors_cross_threads() {
        assert_send_sync::<Store>();
        assert_send_sync::<StoreError>();
    }

    /// Every connection, reader or writer, runs with the promised settings.
    #[tokio::test]
    async fn connection_settings() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        for pool in [store.writer(), store.reader()] {
            let mut conn = pool.acquire().await.unwrap();
            let mut get = async |p: &str| -> String {
                let v: sqlx::sqlite::SqliteRow = sqlx::query(&format!("PRAGMA {p}"))
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                use sqlx::{Row, ValueRef};
                let raw = v.try_get_raw(0).unwrap();
                if raw.type_info().to_string() == "TEXT" {
                    v.get::<String, _>(0)
                } else {
                    v.get::<i64, _>(0).to_string()
                }
            };
            assert_eq!(get("journal_mode").await, "wal");
            assert_eq!(get("foreign_keys").await, "1");
            assert_eq!(get("synchronous").await, "2", "FULL");
            assert_eq!(get("busy_timeout").await, "10000");
        }
    }

    #[test]
    fn error_messages_read_well() {
        assert_eq!(
            StoreError::not_found("user", "\"carol\"").to_string(),
            "user \"carol\" not found"
        );
        assert_eq!(
            StoreError::KeyRejected(KeyRejected::Expired).to_string(),
            "pre-auth key rejected: key has expired"
        );
        let e = StoreError::Db {
            context: "listing nodes",
            source: sqlx::Error::PoolTimedOut,
        };
        assert!(
            e.to_string()
                .starts_with("database error while listing nodes: ")
        );
    }
}
