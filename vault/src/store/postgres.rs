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
//!
//! Principal changes: [`Store::principal_changes`](super::Store) starts a
//! task holding a `PgListener` on [`PRINCIPAL_CHANNEL`] (notified by the
//! trigger of migration 0010) on a connection of its own, named
//! [`LISTENER_APPLICATION_NAME`]. Notifications sent while that connection
//! is down are lost (PostgreSQL keeps none for a session that is gone), so
//! the task reports every loss ([`PrincipalChange::Lost`]) and every
//! re-established LISTEN, and checks the connection with a heartbeat query
//! every [`HEARTBEAT`] (a connection that died silently, without a reset,
//! would otherwise look alive forever).

use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Postgres};
use tokio::sync::mpsc::UnboundedSender;

use super::sql::sql_store;
use super::{PrincipalChange, PrincipalChanges, StoreError};

/// The channel migration 0010's trigger notifies with a principal's id.
pub const PRINCIPAL_CHANNEL: &str = "cardvault_principals";
/// `application_name` of the listening connection (in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "cardvault-principal-listener";
/// How often an idle listening connection is checked.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat slower than this counts as a lost connection.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest wait between attempts to listen again.
const RETRY_MAX: Duration = Duration::from_secs(1);

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

    /// A task listening on [`PRINCIPAL_CHANNEL`] on a connection of its own.
    fn principal_feed(&self) -> Option<PrincipalChanges> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let opts = self
            .connect
            .clone()
            .application_name(LISTENER_APPLICATION_NAME);
        runtime.spawn(listen_principals(opts, self.op_timeout, tx));
        Some(rx)
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

/// Listen on [`PRINCIPAL_CHANNEL`] and report to `tx` until it is closed:
/// `Confirmed` once LISTEN is in force and after each heartbeat, `Changed`
/// or `All` per notification, `Lost` when the connection fails; then listen
/// again on a new connection (at most [`RETRY_MAX`] apart while that fails).
async fn listen_principals(
    opts: PgConnectOptions,
    op_timeout: Duration,
    tx: UnboundedSender<PrincipalChange>,
) {
    let mut retry = Duration::ZERO;
    while !tx.is_closed() {
        match tokio::time::timeout(op_timeout, subscribe(&opts, op_timeout)).await {
            Ok(Ok(mut listener)) => {
                retry = Duration::ZERO;
                let lost = follow(&mut listener, &tx).await;
                drop(listener);
                if !lost {
                    return;
                }
                tracing::warn!("principal change listener lost its connection; listening again");
                if tx.send(PrincipalChange::Lost).is_err() {
                    return;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot listen for principal changes"),
            Err(_) => tracing::warn!("cannot listen for principal changes: timed out"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).clamp(Duration::from_millis(50), RETRY_MAX);
    }
}

/// A listener on [`PRINCIPAL_CHANNEL`], on a one-connection pool of its own.
async fn subscribe(
    opts: &PgConnectOptions,
    op_timeout: Duration,
) -> Result<PgListener, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(op_timeout)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(opts.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    // A lost connection is reported to us (and we start over on a new
    // one), not silently replaced inside `try_recv`.
    listener.eager_reconnect(false);
    listener.listen(PRINCIPAL_CHANNEL).await?;
    Ok(listener)
}

/// Report what `listener` receives until its connection fails (true) or
/// `tx` is closed (false).
async fn follow(listener: &mut PgListener, tx: &UnboundedSender<PrincipalChange>) -> bool {
    // Everything committed after LISTEN took effect will be reported.
    let mut confirmed = Instant::now();
    if tx
        .send(PrincipalChange::Confirmed { at: confirmed })
        .is_err()
    {
        return false;
    }
    loop {
        let wait = HEARTBEAT.saturating_sub(confirmed.elapsed());
        // (`try_recv` is cancel-safe: a partly read message stays buffered.)
        match tokio::time::timeout(wait, listener.try_recv()).await {
            Ok(Ok(Some(notification))) => {
                if tx.send(change_of(notification.payload())).is_err() {
                    return false;
                }
            }
            // `Ok(None)`: the connection closed (and, without eager
            // reconnection, was dropped); an error: it failed.
            Ok(Ok(None) | Err(_)) => return true,
            Err(_) => {
                if tx.is_closed() {
                    return false;
                }
                let at = Instant::now();
                // The server sends every notification committed before this
                // query before its answer; those that arrive during it are
                // buffered by the listener, and are reported first.
                let beat = tokio::time::timeout(
                    HEARTBEAT_TIMEOUT,
                    sqlx::query("SELECT 1").execute(&mut *listener),
                )
                .await;
                if !matches!(beat, Ok(Ok(_))) {
                    return true;
                }
                while let Some(notification) = listener.next_buffered() {
                    if tx.send(change_of(notification.payload())).is_err() {
                        return false;
                    }
                }
                confirmed = at;
                if tx.send(PrincipalChange::Confirmed { at }).is_err() {
                    return false;
                }
            }
        }
    }
}

fn change_of(payload: &str) -> PrincipalChange {
    if payload == "*" {
        PrincipalChange::All
    } else {
        PrincipalChange::Changed(payload.to_owned())
    }
}

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
