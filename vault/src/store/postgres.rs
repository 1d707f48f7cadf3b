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
//! Several hosts (a primary and its standbys, libpq style:
//! `postgres://u@db1:5432,db2:5432/cardvault`, see [`pg_hosts`]): every new
//! pooled connection is checked to accept writes (`pg_is_in_recovery()` and
//! `transaction_read_only`) and refused otherwise, and a task of the store
//! (the primary tracker) keeps a connection of its own to the primary,
//! checks it every [`PRIMARY_CHECK`], and when it fails or turns read-only
//! probes every host, points the pool's new connections at the first that
//! accepts writes (`Pool::set_connect_options`: the pool's own connect
//! loop picks it up while it retries) and the principal listener follows.
//! A host can only turn from primary into standby through a restart, which
//! closes its connections, so a pooled connection that was checked once
//! stays on a primary for its life. Acknowledged writes survive a failover
//! only with synchronous replication (see ARCHITECTURE.md); the tracker
//! warns when the primary has no `synchronous_standby_names`.
//!
//! Principal changes: [`Store::principal_changes`](super::Store) starts a
//! task holding a `PgListener` on [`PRINCIPAL_CHANNEL`] (notified by the
//! trigger of migration 0010) on a connection of its own, named
//! [`LISTENER_APPLICATION_NAME`]. Notifications sent while that connection
//! is down are lost (PostgreSQL keeps none for a session that is gone), so
//! the task reports every loss ([`PrincipalChange::Lost`]) and every
//! re-established LISTEN, and checks the connection with a heartbeat query
//! every [`HEARTBEAT`] (a connection that died silently, without a reset,
//! would otherwise look alive forever). Each new LISTEN goes to the host
//! the pool uses at that moment (after a failover, the new primary).

use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Postgres};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{watch, Notify};

use super::pg_hosts::{self, HostList};
use super::sql::sql_store;
use super::{PrincipalChange, PrincipalChanges, StoreError};

/// The channel migration 0010's trigger notifies with a principal's id.
pub const PRINCIPAL_CHANNEL: &str = "cardvault_principals";
/// `application_name` of the listening connection (in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "cardvault-principal-listener";
/// `application_name` of the primary tracker's connections.
pub const TRACKER_APPLICATION_NAME: &str = "cardvault-primary-tracker";
/// How often an idle listening connection is checked.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat slower than this counts as a lost connection.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest wait between attempts to listen again.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// With several hosts: how often the tracker checks that the primary it
/// found is still up and accepts writes.
pub const PRIMARY_CHECK: Duration = Duration::from_millis(250);
/// The longest wait between two searches for a primary.
const SEARCH_RETRY_MAX: Duration = Duration::from_millis(250);
/// How often a search that keeps failing is logged.
const SEARCH_WARN_EVERY: Duration = Duration::from_secs(10);
/// The longest a probe of one host (connect and check) may take.
const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// True on a host that accepts writes: not a standby (in recovery), and
/// not read-only by configuration (libpq's `target_session_attrs=read-write`
/// check).
const WRITABLE: &str =
    "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'";

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

/// The hosts of the database URL and which one connections go to.
struct Hosts {
    /// One per host, in the URL's order, with the session settings.
    options: Vec<PgConnectOptions>,
    /// `host[:port]` as written, for logs (never credentials).
    names: Vec<String>,
    /// Check every connection: a host list, or `target_session_attrs`.
    check_writable: bool,
    /// Index of the host new connections go to.
    current: RwLock<usize>,
    /// Poked when a new pooled connection found its host read-only.
    recheck: Notify,
    /// Bound of one probe.
    probe_timeout: Duration,
}

/// Names and the current host only: the options hold the password.
impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosts")
            .field("names", &self.names)
            .field("current", &self.current())
            .field("check_writable", &self.check_writable)
            .finish_non_exhaustive()
    }
}

impl Hosts {
    /// The hosts of a database URL (one or a list), each with the session
    /// settings; and the list, for its single-host URLs.
    fn parse(url: &str, op_timeout: Duration) -> Result<(HostList, Hosts), StoreError> {
        let list: HostList = pg_hosts::parse(url)
            .map_err(|e| StoreError::Unavailable(sqlx::Error::Configuration(Box::new(e))))?;
        let options = list
            .urls()
            .iter()
            .map(|url| PgConnectOptions::from_str(url).map(|o| session(o, op_timeout)))
            .collect::<Result<Vec<_>, _>>()?;
        let hosts = Hosts {
            options,
            names: list.names().to_vec(),
            check_writable: list.needs_writable(),
            current: RwLock::new(0),
            recheck: Notify::new(),
            probe_timeout: op_timeout.min(PROBE_TIMEOUT_MAX),
        };
        Ok((list, hosts))
    }

    /// [`Hosts::find_primary`] within an operation's bound (at least one
    /// probe's): for migrations and one-off lookups.
    async fn primary_within(
        &self,
        application_name: &str,
        op_timeout: Duration,
    ) -> Result<(usize, PgConnection), StoreError> {
        tokio::time::timeout(
            op_timeout.max(PROBE_TIMEOUT_MAX),
            self.find_primary(application_name),
        )
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(StoreError::from)
    }

    fn current(&self) -> usize {
        *self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_current(&self, index: usize) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = index;
    }

    /// The options new connections use now (the primary, as far as known).
    fn current_options(&self) -> PgConnectOptions {
        self.options[self.current()].clone()
    }

    /// A connection to the first host (in the URL's order) that accepts
    /// writes, and its index; all hosts are probed at once, each for at most
    /// `probe_timeout`. With one host and no check asked for, a plain
    /// connection. When none accepts writes, the error says what each host
    /// answered (`db1:5432: standby or read-only; db2:5432: no answer
    /// within 2s`), names only, never credentials.
    async fn find_primary(
        &self,
        application_name: &str,
    ) -> Result<(usize, PgConnection), sqlx::Error> {
        if !self.check_writable {
            let index = self.current();
            let conn = self.options[index]
                .clone()
                .application_name(application_name)
                .connect()
                .await?;
            return Ok((index, conn));
        }
        let probes = self.options.iter().map(|opts| {
            let opts = opts.clone().application_name(application_name);
            async move {
                let probe = async {
                    let mut conn = opts.connect().await?;
                    let writable = is_writable(&mut conn).await;
                    Ok::<_, sqlx::Error>((writable, conn))
                };
                match tokio::time::timeout(self.probe_timeout, probe).await {
                    Ok(result) => result,
                    Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {:?}", self.probe_timeout),
                    ))),
                }
            }
        });
        let mut found = None;
        let mut answers = Vec::with_capacity(self.names.len());
        for (index, result) in futures_util::future::join_all(probes)
            .await
            .into_iter()
            .enumerate()
        {
            let name = &self.names[index];
            match result {
                Ok((Ok(true), conn)) if found.is_none() => found = Some((index, conn)),
                Ok((writable, conn)) => {
                    match writable {
                        Ok(true) => {}
                        Ok(false) => answers.push(format!("{name}: standby or read-only")),
                        Err(e) => answers.push(format!("{name}: check failed: {e}")),
                    }
                    discard(conn, self.probe_timeout);
                }
                Err(e) => answers.push(format!("{name}: {e}")),
            }
        }
        found.ok_or_else(|| {
            sqlx::Error::Io(std::io::Error::other(format!(
                "no host of the database URL accepts writes ({})",
                answers.join("; ")
            )))
        })
    }
}

/// The single-host URL of the host of `url`'s list that accepts writes now
/// (`url` itself when it names one host), for what takes one host: the
/// audit export of `tokenizer audit archive` must read the primary it
/// then deletes from. Probes as the primary tracker does.
pub async fn writable_host_url(url: &str, op_timeout: Duration) -> Result<String, StoreError> {
    let (list, hosts) = Hosts::parse(url, op_timeout)?;
    if list.urls().len() == 1 {
        return Ok(url.to_owned());
    }
    let (index, conn) = hosts.primary_within("cardvault", op_timeout).await?;
    discard(conn, hosts.probe_timeout);
    Ok(list.urls()[index].clone())
}

/// Close a probe's connection that is not kept, in the background and
/// bounded: politely (PostgreSQL logs no "unexpected EOF"), never with
/// `close_hard`, which in sqlx 0.8.6 does not return over TLS (it waits for
/// an answer to its close_notify that the server never sends: the search
/// for a primary hung on its first standby with `sslmode=require`).
fn discard(conn: PgConnection, within: Duration) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(within, conn.close()).await;
    });
}

/// Whether the host of `conn` accepts writes (see [`WRITABLE`]).
async fn is_writable(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(WRITABLE)
        .fetch_one(conn)
        .await
}

/// Stops the primary tracker when the last clone of the store is gone.
#[derive(Debug)]
struct TrackerGuard {
    _stop: watch::Sender<()>,
}

/// The PostgreSQL store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    op_timeout: Duration,
    /// The database URL's hosts; migrations and the principal listener
    /// connect to the current one.
    hosts: Arc<Hosts>,
    /// With several hosts: keeps the primary tracker running.
    _tracker: Option<Arc<TrackerGuard>>,
}

impl PgStore {
    /// Connect lazily (the process starts even if the database is down; the
    /// first operation reports it) and apply nothing. `url` is a
    /// `postgres://` URL, with one host or several (see [`pg_hosts`]);
    /// `sslmode=require|verify-ca|verify-full` and `sslrootcert=` turn on
    /// TLS (rustls). Several hosts need a Tokio runtime (the primary
    /// tracker is a task); without one the pool stays on the first host.
    pub fn connect_lazy(url: &str, settings: PgSettings) -> Result<PgStore, StoreError> {
        let (_, hosts) = Hosts::parse(url, settings.op_timeout)?;
        let hosts = Arc::new(hosts);
        let mut pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.op_timeout)
            // Check a pooled connection before use: after a database restart
            // the dead ones are dropped instead of failing one request each.
            .test_before_acquire(true);
        if hosts.check_writable {
            let checked = Arc::clone(&hosts);
            // A connection to a standby (or a read-only primary) is refused:
            // the pool closes it and tries again, within its acquire
            // timeout, with the options the tracker set meanwhile.
            pool = pool.after_connect(move |conn, _| {
                let hosts = Arc::clone(&checked);
                Box::pin(async move {
                    if is_writable(conn).await? {
                        Ok(())
                    } else {
                        hosts.recheck.notify_one();
                        Err(sqlx::Error::Io(std::io::Error::other(
                            "this PostgreSQL host does not accept writes (a standby or read-only)",
                        )))
                    }
                })
            });
        }
        let pool = pool.connect_lazy_with(hosts.current_options());
        let tracker = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if hosts.options.len() > 1 => {
                let (stop, stopped) = watch::channel(());
                runtime.spawn(track_primary(Arc::clone(&hosts), pool.clone(), stopped));
                Some(Arc::new(TrackerGuard { _stop: stop }))
            }
            Ok(_) => None,
            Err(_) => {
                if hosts.options.len() > 1 {
                    tracing::warn!(
                        "several database hosts but no runtime: connections stay on the first host"
                    );
                }
                None
            }
        };
        Ok(PgStore {
            pool,
            op_timeout: settings.op_timeout,
            hosts,
            _tracker: tracker,
        })
    }

    /// Connect and apply pending migrations.
    pub async fn open(url: &str, settings: PgSettings) -> Result<PgStore, StoreError> {
        let store = Self::connect_lazy(url, settings)?;
        store.migrate().await?;
        Ok(store)
    }

    /// Apply pending migrations (needs the owner role, not the runtime role).
    /// They run on a connection of their own (to the primary, with several
    /// hosts), closed afterwards whatever happened: sqlx holds its advisory
    /// migration lock on that session, and a failed run must not leave the
    /// lock held on a pooled connection.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let (index, mut conn) = self
            .hosts
            .primary_within("cardvault", self.op_timeout)
            .await?;
        self.use_host(index);
        let result = MIGRATOR.run(&mut conn).await;
        let _ = conn.close().await;
        result?;
        Ok(())
    }

    /// Send the pool's new connections to host `index` (a primary just
    /// found), if they do not go there already.
    fn use_host(&self, index: usize) {
        if self.hosts.current() != index {
            self.hosts.set_current(index);
            self.pool
                .set_connect_options(self.hosts.options[index].clone());
        }
    }

    /// The index of the host new connections go to (in the URL's order).
    pub fn current_host(&self) -> usize {
        self.hosts.current()
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
        runtime.spawn(listen_principals(
            Arc::clone(&self.hosts),
            self.op_timeout,
            tx,
        ));
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

/// The session settings of every connection of the store.
fn session(opts: PgConnectOptions, op_timeout: Duration) -> PgConnectOptions {
    opts.application_name("cardvault")
        // A hung statement must not hold a request (or a row lock) forever.
        .options([
            (
                "statement_timeout",
                format!("{}", server_statement_timeout(op_timeout).as_millis()),
            ),
            // An acknowledged token is on disk (and, with a synchronous
            // standby, on the standby too), whatever the server's default:
            // no asynchronous commit for this session.
            ("synchronous_commit", "on".to_owned()),
        ])
}

/// The server-side `statement_timeout`: longer than the client's own bound
/// on an operation, so that the client always gives up first. A COMMIT
/// cancelled by `statement_timeout` while it waits for the synchronous
/// standby is not undone: PostgreSQL commits it locally, warns, and reports
/// success, which would acknowledge a token that the standby may not have.
/// The client's bound (a dropped request, 503) fires first and never
/// acknowledges it.
fn server_statement_timeout(op_timeout: Duration) -> Duration {
    op_timeout + op_timeout.max(Duration::from_secs(1))
}

/// With several hosts: find the primary, point the pool's new connections
/// at it, and watch it (every [`PRIMARY_CHECK`], or at once when a pooled
/// connection found its host read-only); when it fails or turns read-only,
/// search again (all hosts, at most [`SEARCH_RETRY_MAX`] apart). Stops when
/// the store is dropped or closed.
async fn track_primary(hosts: Arc<Hosts>, pool: PgPool, mut stop: watch::Receiver<()>) {
    let mut retry = Duration::ZERO;
    let mut searching_since: Option<Instant> = None;
    let mut last_warning: Option<Instant> = None;
    let mut announced = false;
    loop {
        if pool.is_closed() {
            return;
        }
        match hosts.find_primary(TRACKER_APPLICATION_NAME).await {
            Ok((index, mut conn)) => {
                retry = Duration::ZERO;
                last_warning = None;
                let previous = hosts.current();
                if previous != index || !announced {
                    hosts.set_current(index);
                    pool.set_connect_options(hosts.options[index].clone());
                }
                let searched_ms = searching_since
                    .take()
                    .map(|since| since.elapsed().as_millis());
                if previous != index {
                    tracing::warn!(
                        primary = %hosts.names[index],
                        previous = %hosts.names[previous],
                        searched_ms,
                        "PostgreSQL primary changed: new connections go to it"
                    );
                } else if !announced || searched_ms.is_some() {
                    tracing::info!(primary = %hosts.names[index], searched_ms, "PostgreSQL primary found");
                }
                if !announced {
                    warn_if_asynchronous(&mut conn, &hosts.names[index]).await;
                }
                announced = true;
                loop {
                    tokio::select! {
                        _ = stop.changed() => {
                            let _ = conn.close().await;
                            return;
                        }
                        () = hosts.recheck.notified() => {}
                        () = tokio::time::sleep(PRIMARY_CHECK) => {}
                    }
                    if pool.is_closed() {
                        let _ = conn.close().await;
                        return;
                    }
                    let check = tokio::time::timeout(hosts.probe_timeout, is_writable(&mut conn));
                    if !matches!(check.await, Ok(Ok(true))) {
                        break;
                    }
                }
                drop(conn);
                tracing::warn!(
                    host = %hosts.names[hosts.current()],
                    "PostgreSQL primary lost (unreachable or read-only): looking for a host that accepts writes"
                );
                searching_since = Some(Instant::now());
            }
            Err(e) => {
                let since = *searching_since.get_or_insert_with(Instant::now);
                if last_warning.is_none_or(|at| at.elapsed() >= SEARCH_WARN_EVERY) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(
                        error = %e,
                        searching_ms = since.elapsed().as_millis(),
                        "no PostgreSQL host accepts writes yet; trying again"
                    );
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).clamp(Duration::from_millis(25), SEARCH_RETRY_MAX);
    }
}

/// Without a synchronous standby, a commit is acknowledged before any
/// standby has it, and a failover can lose it: say so once.
async fn warn_if_asynchronous(conn: &mut PgConnection, host: &str) {
    let names =
        sqlx::query_scalar::<_, String>("SELECT current_setting('synchronous_standby_names')")
            .fetch_one(conn)
            .await;
    if matches!(&names, Ok(n) if n.trim().is_empty()) {
        tracing::warn!(
            primary = %host,
            "the PostgreSQL primary has no synchronous_standby_names: a failover to a standby can lose acknowledged tokens"
        );
    }
}

/// Listen on [`PRINCIPAL_CHANNEL`] and report to `tx` until it is closed:
/// `Confirmed` once LISTEN is in force and after each heartbeat, `Changed`
/// or `All` per notification, `Lost` when the connection fails; then listen
/// again on a new connection (at most [`RETRY_MAX`] apart while that fails).
async fn listen_principals(
    hosts: Arc<Hosts>,
    op_timeout: Duration,
    tx: UnboundedSender<PrincipalChange>,
) {
    let mut retry = Duration::ZERO;
    while !tx.is_closed() {
        // The host the pool uses now: after a failover, the new primary
        // (LISTEN is refused on a standby, so a stale choice just retries).
        let opts = hosts
            .current_options()
            .application_name(LISTENER_APPLICATION_NAME);
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

#[cfg(test)]
mod host_list_tests {
    #![allow(clippy::unwrap_used)]
    use sqlx::Connection as _;

    use super::*;
    use crate::store::tests::{pg_admin_url, PgTestDb};
    use crate::store::Store as _;

    const SETTINGS: PgSettings = PgSettings {
        max_connections: 2,
        op_timeout: Duration::from_secs(2),
    };

    /// `url` with another host before its own.
    fn with_host_before(url: &str, host: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        match rest.rsplit_once('@') {
            Some((user, hosts)) => format!("{scheme}://{user}@{host},{hosts}"),
            None => format!("{scheme}://{host},{rest}"),
        }
    }

    #[tokio::test]
    async fn a_host_that_is_down_is_passed_over() {
        let db = PgTestDb::create().await;
        // A port nobody listens on (bound, then released).
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = with_host_before(&db.url, &format!("127.0.0.1:{dead}"));
        let store = PgStore::open(&url, SETTINGS).await.unwrap();
        assert_eq!(store.current_host(), 1);
        store.ping().await.unwrap();
        store.load_keys().await.unwrap();
        store.close().await;
    }

    #[tokio::test]
    async fn the_store_never_shows_the_password() {
        let store = PgStore::connect_lazy(
            "postgres://u:s3cr3t-Pw@127.0.0.1:1,127.0.0.1:2/db",
            SETTINGS,
        )
        .unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("127.0.0.1:2"), "{shown}");
        let bad = PgStore::connect_lazy("postgres://u:s3cr3t-Pw@a,,b/db", SETTINGS).unwrap_err();
        let shown = format!("{bad} {bad:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("host 2 of the list is empty"), "{shown}");
        store.close().await;
    }

    #[tokio::test]
    async fn a_read_only_host_is_refused_when_writes_are_asked_for() {
        let db = PgTestDb::create().await;
        let plain = PgStore::open(&db.url, SETTINGS).await.unwrap();
        let mut admin = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        let set = |on: bool| {
            format!(
                "ALTER DATABASE {} SET default_transaction_read_only = {}",
                db.name,
                if on { "on" } else { "off" }
            )
        };
        sqlx::raw_sql(&set(true)).execute(&mut admin).await.unwrap();
        let separator = if db.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}target_session_attrs=read-write", db.url);
        let checked = PgStore::connect_lazy(&url, SETTINGS).unwrap();
        let refused = checked.ping().await.unwrap_err();
        assert!(
            matches!(
                refused,
                StoreError::Unavailable(sqlx::Error::PoolTimedOut) | StoreError::Timeout
            ),
            "{refused:?}"
        );
        // Without the parameter a single host is not checked (as before).
        let unchecked = PgStore::connect_lazy(&db.url, SETTINGS).unwrap();
        unchecked.ping().await.unwrap();
        sqlx::raw_sql(&set(false))
            .execute(&mut admin)
            .await
            .unwrap();
        checked.ping().await.unwrap();
        for store in [plain, checked, unchecked] {
            store.close().await;
        }
        let _ = admin.close().await;
    }
}
