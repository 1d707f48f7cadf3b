//! SQLite store: the embedded default. One file under the data dir, WAL
//! journal, `synchronous=FULL` (an acknowledged token survives power loss),
//! `secure_delete` (deleted ciphertext is overwritten, not left in free
//! pages), and a WAL checkpoint after each delete so no copy stays in the WAL.
//! The queries are shared with PostgreSQL (`sql.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Sqlite;

use super::sql::sql_store;
use super::StoreError;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    op_timeout: Duration,
    /// The database file, for the dedicated writer's connection.
    path: PathBuf,
    /// Point reads on the request path (`sqlite_reader.rs`).
    reader: Arc<super::sqlite_reader::SqliteReader>,
}

impl SqliteStore {
    /// Open (creating if missing) the database file and apply migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let store = Self::open_unmigrated(path, Duration::from_secs(30)).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Open without applying migrations. `op_timeout` bounds every operation.
    pub async fn open_unmigrated(
        path: &Path,
        op_timeout: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .acquire_timeout(op_timeout)
            // A connection must go back to the pool outside any transaction.
            // After some failures (a COMMIT refused with SQLITE_FULL or an
            // I/O error, an operation cut short by its timeout) SQLite can
            // keep the transaction open while sqlx considers it finished:
            // the next `begin()` on that connection would then only open a
            // savepoint inside it, and its "commit" would never reach the
            // disk (seen: tokens acknowledged after a full disk, gone after
            // a restart). `BEGIN` succeeds only in autocommit mode, so a
            // connection on which it fails is closed (SQLite rolls the
            // stray transaction back) instead of being reused. Both
            // statements go to the connection's worker thread at once: one
            // hand-off per release, not two.
            .after_release(|conn, _meta| {
                Box::pin(async move {
                    use sqlx::Executor as _;
                    if conn.execute("BEGIN; ROLLBACK").await.is_err() {
                        tracing::warn!("closing a SQLite connection left inside a transaction");
                        return Ok(false);
                    }
                    Ok(true)
                })
            })
            .connect_with(opts)
            .await?;
        Ok(SqliteStore {
            pool,
            op_timeout,
            path: path.to_path_buf(),
            // Inline reads hold their thread: a lock wait (rare in WAL
            // mode: recovery, a truncating checkpoint) is cut short.
            reader: Arc::new(super::sqlite_reader::SqliteReader::new(
                path,
                op_timeout.min(Duration::from_secs(1)),
            )),
        })
    }

    /// Apply pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The group commit's writer: a thread with a connection of its own
    /// (`sqlite_writer.rs`).
    fn own_writer(&self) -> Result<Option<Arc<dyn super::Writer>>, StoreError> {
        let writer = super::sqlite_writer::SqliteWriter::start(&self.path, self.op_timeout)?;
        Ok(Some(Arc::new(writer)))
    }

    /// No change feed: one process, and principal reads are inline and
    /// cheap, so the authenticator reads the row on every request.
    #[allow(clippy::unused_self)]
    fn principal_feed(&self) -> Option<super::PrincipalChanges> {
        None
    }

    /// Card and principal lookups on the request path, inline.
    fn point_reader(&self) -> Option<&dyn super::PointReader> {
        Some(&*self.reader)
    }

    /// The pool, for tests that must reach under the store (tampering,
    /// failure injection).
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A deferred read transaction already reads one snapshot in WAL mode.
    const SNAPSHOT_ISOLATION: Option<&'static str> = None;
    /// Key guards (see `guard_keys` in sql.rs): a no-op UPDATE, so the
    /// transaction takes SQLite's write lock at once (a read that later
    /// writes could fail with a busy snapshot) and reads the states.
    pub(crate) const KEY_GUARD: &'static str = "UPDATE vault_keys SET state = state
         WHERE (purpose = 'dek' AND version = $1) OR (purpose = 'fingerprint' AND version = $2)
         RETURNING state";
    const KEY_GUARD_SHARED: &'static str = Self::KEY_GUARD;
    /// One writer at a time: nothing to lock or skip.
    const PASS_LOCK: &'static str = "";
    /// The re-encryption pass's order: the rowid, append-ordered (a VACUUM
    /// may renumber it; the pass's cursor is only a hint and wraps around).
    const CARD_SEQ: &'static str = "rowid";
    /// AUTOINCREMENT follows explicitly inserted sequence numbers by itself.
    const AFTER_IMPORT: Option<&'static str> = None;

    /// Move the pages overwritten by a delete out of the WAL into the main
    /// file and truncate the WAL. Best effort: with concurrent readers the
    /// checkpoint may be partial and the next one finishes the job.
    async fn after_delete(&self) {
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint after delete failed");
        }
    }
}

sql_store!(SqliteStore, Sqlite);

#[cfg(test)]
mod pool_state_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::Store as _;

    #[tokio::test]
    async fn pool_state_counts_lent_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        // A connection released by the migrations may still be in its
        // `after_release` check for a moment.
        let mut before = store.pool_state();
        for _ in 0..100 {
            if before.in_use() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            before = store.pool_state();
        }
        assert_eq!(before.max, 8);
        assert_eq!(before.in_use(), 0, "{before:?}");
        let held = store.pool().acquire().await.unwrap();
        let during = store.pool_state();
        assert_eq!(during.in_use(), 1, "{during:?}");
        assert!(during.open >= 1 && during.open <= during.max, "{during:?}");
        drop(held);
        store.close().await;
    }
}
