//! PostgreSQL store: production. Same queries as SQLite (`sql.rs`), its own
//! migrations. Isolation: READ COMMITTED (the default) is enough, because
//! every invariant is carried by a constraint (primary keys, UNIQUE(tenant,
//! fingerprint), the partial unique index on active principal names) and
//! each write is one transaction; nothing relies on a read-then-write
//! without a constraint behind it.
//!
//! Losing the database: connections are acquired with a bounded wait and
//! every operation has a time bound, so requests fail fast with
//! `storage_unavailable`; the pool reconnects by itself when the database
//! returns.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Postgres};

use super::sql::sql_store;
use super::StoreError;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Tuning of the PostgreSQL pool.
#[derive(Debug, Clone, Copy)]
pub struct PgSettings {
    pub max_connections: u32,
    /// Bound on each store operation, including waiting for a connection.
    pub op_timeout: Duration,
}

impl Default for PgSettings {
    fn default() -> Self {
        PgSettings {
            max_connections: 16,
            op_timeout: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    op_timeout: Duration,
    /// For migrations, which run on a connection of their own.
    connect: PgConnectOptions,
}

impl PgStore {
    /// Connect lazily (the process starts even if the database is down; the
    /// first operation reports it) and apply nothing. `url` is a
    /// `postgres://` URL; `sslmode=require|verify-ca|verify-full` and
    /// `sslrootcert=` turn on TLS (rustls).
    pub fn connect_lazy(url: &str, settings: PgSettings) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(url)?
            .application_name("cardvault")
            // A hung statement must not hold a request (or a row lock) forever.
            .options([
                (
                    "statement_timeout",
                    format!("{}", settings.op_timeout.as_millis()),
                ),
                // An acknowledged token is on disk, whatever the server's
                // default: no asynchronous commit for this session.
                ("synchronous_commit", "on".to_owned()),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.op_timeout)
            // Check a pooled connection before use: after a database restart
            // the dead ones are dropped instead of failing one request each.
            .test_before_acquire(true)
            .connect_lazy_with(opts.clone());
        Ok(PgStore {
            pool,
            op_timeout: settings.op_timeout,
            connect: opts,
        })
    }

    /// Connect and apply pending migrations.
    pub async fn open(url: &str, settings: PgSettings) -> Result<PgStore, StoreError> {
        let store = Self::connect_lazy(url, settings)?;
        store.migrate().await?;
        Ok(store)
    }

    /// Apply pending migrations (needs the owner role, not the runtime role).
    /// They run on a connection of their own, closed afterwards whatever
    /// happened: sqlx holds its advisory migration lock on that session, and
    /// a failed run must not leave the lock held on a pooled connection.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn: PgConnection = self.connect.connect().await?;
        let result = MIGRATOR.run(&mut conn).await;
        let _ = conn.close().await;
        result?;
        Ok(())
    }

    /// No writer of its own: group commits go through the pool (each
    /// statement is one network round trip either way).
    #[allow(clippy::unnecessary_wraps)]
    fn own_writer(&self) -> Result<Option<std::sync::Arc<dyn super::Writer>>, StoreError> {
        Ok(None)
    }

    /// Every read is a network round trip: through the pool.
    #[allow(clippy::unused_self)]
    fn point_reader(&self) -> Option<&dyn super::PointReader> {
        None
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One snapshot for the whole export.
    const SNAPSHOT_ISOLATION: Option<&'static str> =
        Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY");
    /// Key guards (see `guard_keys` in sql.rs). Tokenization holds the
    /// active key rows with a share lock until commit: a rotation (which
    /// updates them) waits for it, so a card sealed under the old keys is
    /// committed before any instance can use the new ones. Rows are locked
    /// in purpose order (the locking node sits above the sort), the order in
    /// which rotations and re-wrapping update them.
    const KEY_GUARD: &'static str = "SELECT state FROM vault_keys
         WHERE (purpose = 'dek' AND version = $1) OR (purpose = 'fingerprint' AND version = $2)";
    const KEY_GUARD_SHARED: &'static str = "SELECT state FROM vault_keys
         WHERE (purpose = 'dek' AND version = $1) OR (purpose = 'fingerprint' AND version = $2)
         ORDER BY purpose FOR SHARE";
    /// Re-encryption batches lock the rows they read and skip rows another
    /// instance's batch holds: concurrent passes share the work instead of
    /// waiting for (or deadlocking on) each other.
    const PASS_LOCK: &'static str = " FOR UPDATE SKIP LOCKED";
    /// The re-encryption pass's order: an identity column (migration 0009).
    const CARD_SEQ: &'static str = "seq";
    /// Restored audit events keep their numbers; new ones continue after them.
    const AFTER_IMPORT: Option<&'static str> = Some(
        "SELECT setval(pg_get_serial_sequence('audit_events', 'seq'), COALESCE((SELECT MAX(seq) FROM audit_events), 0) + 1, false)",
    );

    /// Nothing to do: PostgreSQL reclaims deleted tuples with VACUUM
    /// (autovacuum); see ARCHITECTURE.md on deletion and backups.
    async fn after_delete(&self) {}
}

sql_store!(PgStore, Postgres);

#[cfg(test)]
mod pool_state_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::tests::PgTestDb;
    use crate::store::Store as _;

    #[tokio::test]
    async fn pool_state_counts_lent_connections() {
        let db = PgTestDb::create().await;
        let store = PgStore::connect_lazy(
            &db.url,
            PgSettings {
                max_connections: 3,
                ..PgSettings::default()
            },
        )
        .unwrap();
        let lazy = store.pool_state();
        assert_eq!((lazy.open, lazy.in_use(), lazy.max), (0, 0, 3));
        let held = store.pool().acquire().await.unwrap();
        let during = store.pool_state();
        assert_eq!((during.open, during.in_use()), (1, 1), "{during:?}");
        drop(held);
        store.close().await;
        drop(db);
    }
}
