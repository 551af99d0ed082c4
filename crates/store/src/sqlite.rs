//! SQLite specifics: file layout and permissions, connection settings, `BEGIN IMMEDIATE`.

use std::fs::{self, DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::db;
use crate::{DB_FILE, StoreError, Tx};

/// How long a statement waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reader connections (WAL lets them run beside the writer).
const READERS: u32 = 4;

#[derive(Clone)]
pub(crate) struct Pools {
    pub(crate) path: PathBuf,
    /// Exactly one connection: writes queue here, in order.
    pub(crate) writer: SqlitePool,
    pub(crate) reader: SqlitePool,
}

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        context,
        path,
        source,
    }
}

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
}

pub(crate) async fn open_file(data_dir: &Path) -> Result<Pools, StoreError> {
    if !data_dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(io("creating the data directory", data_dir))?;
    } else {
        let mode = fs::metadata(data_dir)
            .map_err(io("reading the data directory", data_dir))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %data_dir.display(),
                mode = format!("{:o}", mode & 0o777),
                "data directory is accessible to other users; 0700 is recommended"
            );
        }
    }
    let path = data_dir.join(DB_FILE);
    // Create the file ourselves so it is born 0600 (SQLite gives its -wal and -shm files
    // the database file's permissions); tighten an existing one.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("creating the database file", &path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(io("setting permissions on", &path))?;

    let opts = options(&path);
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(opts.clone())
        .await
        .map_err(db("opening the database"))?;
    let reader = SqlitePoolOptions::new()
        .max_connections(READERS)
        .connect_with(opts)
        .await
        .map_err(db("opening the database"))?;
    tracing::debug!(path = %path.display(), "store opened");
    Ok(Pools {
        path,
        writer,
        reader,
    })
}

pub(crate) async fn open_memory() -> Result<Pools, StoreError> {
    let opts = SqliteConnectOptions::from_str("sqlite::memory:")
        .map_err(db("opening an in-memory database"))?
        .foreign_keys(true);
    // One connection that never closes: the database lives as long as it does.
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(opts)
        .await
        .map_err(db("opening an in-memory database"))?;
    Ok(Pools {
        path: PathBuf::from(":memory:"),
        writer: pool.clone(),
        reader: pool,
    })
}

/// `BEGIN IMMEDIATE` takes the write lock up front: a deferred transaction that reads and
/// then writes can fail with SQLITE_BUSY on the upgrade, without waiting.
pub(crate) async fn begin_immediate(writer: &SqlitePool) -> Result<Tx, StoreError> {
    writer
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(db("starting a write transaction"))
}
