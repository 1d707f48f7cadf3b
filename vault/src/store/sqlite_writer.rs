//! SQLite's writer for the group commit: one OS thread with a connection of
//! its own (rusqlite, the same SQLite library sqlx links) that runs each
//! group as one synchronous transaction.
//!
//! Why: through sqlx every statement is a hand-off to the connection's
//! worker thread and back to an async task, and a group transaction is
//! about a dozen statements. On a loaded two-core machine each hand-off
//! waits for a CPU slice: a group of 30 tokenizations took 7.5 ms, of which
//! the fsync was under 1 ms (measured in issue 7). Here a group costs one
//! hand-off in and one answer out; its statements are prepared once and
//! run back to back.
//!
//! Same guarantees as the pool's writes (`sql.rs`): `BEGIN IMMEDIATE`, the
//! key guard, the unique `(tenant, fingerprint)` constraint for
//! idempotency, the audit head updated in the same transaction, WAL with
//! `synchronous = FULL`, `secure_delete`. The pure parts (audit head and
//! event rows, the outcome of an insert) are shared (`rows.rs`). A
//! connection left inside a transaction after a failure (a refused COMMIT
//! on a full disk) is rolled back or closed, never reused as is; the next
//! operation opens a new one.
//!
//! Checkpoints (copying the WAL into the database file, with its own fsync)
//! run on a second thread, PASSIVE, every [`CHECKPOINT_EVERY`]: SQLite
//! would otherwise run them inside the commit that crosses 1000 WAL pages,
//! and every request of that group would wait for it. A long WAL is made
//! to start over by the writer itself, between two groups
//! ([`RESTART_AFTER_FRAMES`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use async_trait::async_trait;
use audit::AuditEvent;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _, TransactionBehavior};
use tokio::sync::oneshot;

use super::rows::{self, Found, CARD_COLUMNS, EVENT_INSERT};
use super::{CardRow, Inserted, NewCard, StoreError, Writer};

/// Statements kept prepared on the writer's connection.
const STATEMENT_CACHE: usize = 32;
/// How often the checkpointer copies committed WAL frames into the
/// database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// The writer's page cache, in KiB (SQLite's default is 2 MiB). Every new
/// card adds entries at random places in its indexes (token, fingerprint,
/// key versions); with millions of cards most of those leaf pages are not
/// in a 2 MiB cache and each is read again from the file.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
/// WAL frames (4 KiB pages) after which the WAL is made to start over.
/// Under a steady stream of commits a PASSIVE checkpoint never catches up
/// with the last frame, so SQLite never starts the WAL over and it grows
/// without end (seen: 580 MB after two minutes of seeding, and every commit
/// then ran the writer's auto-checkpoint). Run by the checkpointer, a
/// RESTART checkpoint starved behind the writer (its lock is free only
/// between two commits) and stopped all checkpointing while it waited
/// (seen: 2 GB). So the checkpointer only flags it, and the writer thread
/// runs it between two groups, where no commit of ours competes.
const RESTART_AFTER_FRAMES: i64 = 8192;
/// How long the writer's RESTART checkpoint may wait for readers on an
/// old snapshot (an export, an audit query) before it gives up until the
/// next flag.
const RESTART_WAIT: Duration = Duration::from_millis(100);
/// The size the WAL file is cut back to when it starts over.
const WAL_SIZE_LIMIT: i64 = 64 << 20;
/// WAL pages after which the writer checkpoints by itself: only if the
/// checkpointer falls behind (SQLite's default is 1000).
const WRITER_AUTOCHECKPOINT: u32 = 32_768;

/// One operation for the writer thread: it runs on the thread's connection
/// (or gets the error of opening one), answers its caller, and says whether
/// it failed.
type Task = Box<dyn FnOnce(Result<&mut Connection, StoreError>) -> bool + Send>;

/// A handle on the writer thread; the thread ends when the last handle is
/// dropped.
#[derive(Debug)]
pub(crate) struct SqliteWriter {
    tasks: mpsc::Sender<Task>,
    op_timeout: Duration,
    /// Dropping it ends the checkpointer.
    _checkpoints: mpsc::Sender<()>,
}

impl SqliteWriter {
    /// Start the thread. The connection is opened by the first operation
    /// (and again after one was dropped), so a failure to open is that
    /// operation's error.
    pub(crate) fn start(path: &Path, op_timeout: Duration) -> Result<SqliteWriter, StoreError> {
        let (tasks, rx) = mpsc::channel();
        let restart_due = Arc::new(AtomicBool::new(false));
        let file = path.to_path_buf();
        let due = restart_due.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(&file, op_timeout, &rx, &due))
            .map_err(|_| StoreError::Unavailable(sqlx::Error::WorkerCrashed))?;
        let (checkpoints, stop) = mpsc::channel();
        let file = path.to_path_buf();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpointer(&file, op_timeout, &stop, &restart_due))
            .map_err(|_| StoreError::Unavailable(sqlx::Error::WorkerCrashed))?;
        Ok(SqliteWriter {
            tasks,
            op_timeout,
            _checkpoints: checkpoints,
        })
    }

    /// Run `op` in the writer thread and wait for its answer.
    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let task: Task = Box::new(move |conn| {
            let result = conn.and_then(op);
            let failed = result.is_err();
            let _ = reply.send(result);
            failed
        });
        self.tasks
            .send(task)
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        // The operation may still commit after this gives up: the caller
        // was not answered, and a retry finds what was written.
        match tokio::time::timeout(self.op_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Unavailable(sqlx::Error::PoolClosed)),
            Err(_) => Err(StoreError::Timeout),
        }
    }
}

#[async_trait]
impl Writer for SqliteWriter {
    async fn insert_cards(
        &self,
        cards: Vec<NewCard>,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<Inserted>, StoreError> {
        self.call(move |c| insert_cards(c, cards, events)).await
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.call(move |c| {
            write(c, |tx| insert_events(tx, std::slice::from_ref(&event))).map(|_| ())
        })
        .await
    }

    async fn touch_cards(
        &self,
        tokens: &[String],
        now: i64,
        granularity_ms: i64,
    ) -> Result<(), StoreError> {
        let tokens = tokens.to_vec();
        self.call(move |c| write(c, |tx| touch(tx, &tokens, now, granularity_ms)))
            .await
    }
}

fn run(path: &Path, busy: Duration, tasks: &mpsc::Receiver<Task>, restart_due: &AtomicBool) {
    let mut conn: Option<Connection> = None;
    while let Ok(task) = tasks.recv() {
        let c = match conn.take().map_or_else(|| open(path, busy), Ok) {
            Ok(c) => conn.insert(c),
            Err(e) => {
                tracing::warn!(error = %e, "the SQLite writer cannot open its connection");
                task(Err(e));
                continue;
            }
        };
        if task(Ok(&mut *c)) && !c.is_autocommit() {
            // Still inside a transaction: roll it back, or close the
            // connection (SQLite rolls back) and open a new one next time.
            if c.execute_batch("ROLLBACK").is_err() || !c.is_autocommit() {
                tracing::warn!("closing the SQLite writer's connection left inside a transaction");
                conn = None;
                continue;
            }
        }
        if restart_due.swap(false, Ordering::Relaxed) {
            restart_wal(c, busy);
        }
    }
}

/// A RESTART checkpoint on the writer's connection, waiting at most
/// [`RESTART_WAIT`] for readers. Not done now is done at the next flag.
fn restart_wal(c: &Connection, busy: Duration) {
    let done = c
        .busy_timeout(RESTART_WAIT)
        .and_then(|()| c.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())))
        .and_then(|()| c.busy_timeout(busy));
    if let Err(e) = done {
        tracing::warn!(error = %e, "SQLite WAL restart failed");
        let _ = c.busy_timeout(busy);
    }
}

/// PASSIVE checkpoints until the writer handle is dropped; when the WAL is
/// longer than [`RESTART_AFTER_FRAMES`] the writer is asked to restart it.
/// A failure is logged and tried again next time (the writer's own
/// auto-checkpoint is the backstop).
fn checkpointer(path: &Path, busy: Duration, stop: &mpsc::Receiver<()>, restart_due: &AtomicBool) {
    let mut conn: Option<Connection> = None;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let c = match conn.take().map_or_else(|| open(path, busy), Ok) {
            Ok(c) => conn.insert(c),
            Err(e) => {
                tracing::warn!(error = %e, "the SQLite checkpointer cannot open its connection");
                continue;
            }
        };
        let frames = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
        match frames {
            Ok(n) if n >= RESTART_AFTER_FRAMES => restart_due.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "SQLite WAL checkpoint failed");
                conn = None;
            }
        }
    }
}

fn open(path: &Path, busy: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(
            "the SQLite database is not in WAL mode",
        ));
    }
    // FULL: every commit syncs the WAL; an acknowledged write survives a
    // power loss (the pool's connections use the same settings).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// One immediate transaction around `f`, committed if it succeeds.
fn write<T>(
    conn: &mut Connection,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}

fn insert_cards(
    conn: &mut Connection,
    cards: Vec<NewCard>,
    other_events: Vec<AuditEvent>,
) -> Result<Vec<Inserted>, StoreError> {
    write(conn, |tx| {
        if let Some((dek, fingerprint)) = rows::one_key_set(&cards)? {
            guard_keys(tx, dek, fingerprint)?;
        }
        let mut found = Found::default();
        let mut by_fingerprint = tx.prepare_cached(&format!(
            "SELECT {CARD_COLUMNS} FROM cards WHERE tenant = ?1 AND fingerprint = ?2"
        ))?;
        // During a fingerprint rotation, cards stored under an older
        // fingerprint key are found by their old fingerprints.
        for c in &cards {
            for f in &c.previous_fingerprints {
                if let Some(row) = by_fingerprint
                    .query_row(params![c.row.tenant, f], card_row)
                    .optional()?
                {
                    found
                        .previous
                        .insert((row.tenant.clone(), row.fingerprint.clone()), row);
                }
            }
        }
        let to_insert: Vec<&NewCard> = cards.iter().filter(|c| found.before(c).is_none()).collect();
        // A stored card past its expiry is gone as if deleted: the same card
        // tokenized again gets a new token.
        let mut expired = tx.prepare_cached(
            "DELETE FROM cards WHERE expires_at IS NOT NULL AND expires_at <= ?1
             AND tenant = ?2 AND fingerprint = ?3",
        )?;
        for c in &to_insert {
            let n = expired.execute(params![c.row.created_at, c.row.tenant, c.row.fingerprint])?;
            found.expired_replaced += u64::try_from(n).unwrap_or(0);
        }
        // The unique (tenant, fingerprint) constraint carries idempotency:
        // a card whose tenant already has its fingerprint (stored before, or
        // earlier in this very call) is not inserted and is read back below.
        let mut insert = tx.prepare_cached(&format!(
            "INSERT INTO cards ({CARD_COLUMNS}) VALUES
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT (tenant, fingerprint) DO NOTHING RETURNING token"
        ))?;
        for c in &to_insert {
            let r = &c.row;
            let token = insert
                .query_row(
                    params![
                        r.token,
                        r.tenant,
                        r.fingerprint,
                        r.brand,
                        r.bin,
                        r.last4,
                        r.pan_len,
                        r.key_version,
                        r.nonce,
                        r.ciphertext,
                        r.created_at,
                        r.fingerprint_version,
                        r.expires_at,
                        r.last_used_at,
                        r.updated_at,
                    ],
                    |row| row.get::<_, String>(0),
                )
                .optional();
            match token {
                Ok(Some(token)) => {
                    found.created.insert(token);
                }
                Ok(None) => {}
                // A new token that is already taken (a pan-shaped token
                // drawn twice): the caller draws again.
                Err(e) if is_unique_violation(&e) => return Err(StoreError::TokenTaken),
                Err(e) => return Err(e.into()),
            }
        }
        for c in to_insert
            .iter()
            .filter(|c| !found.created.contains(&c.row.token))
        {
            let row = by_fingerprint
                .query_row(params![c.row.tenant, c.row.fingerprint], card_row)
                .optional()?
                .ok_or(StoreError::Corrupt("card neither inserted nor found"))?;
            found
                .existing
                .insert((row.tenant.clone(), row.fingerprint.clone()), row);
        }
        let (out, events) = rows::settle(cards, other_events, &found)?;
        insert_events(tx, &events)?;
        Ok(out)
    })
}

/// The key guard of `sql.rs` (`guard_keys`): both versions must be active.
fn guard_keys(
    tx: &rusqlite::Transaction<'_>,
    dek: u32,
    fingerprint: u32,
) -> Result<(), StoreError> {
    let mut guard = tx.prepare_cached(super::sqlite::SqliteStore::KEY_GUARD)?;
    let states = guard
        .query_map(params![dek, fingerprint], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    if states.iter().filter(|s| *s == "active").count() == 2 {
        Ok(())
    } else {
        Err(StoreError::StaleKeys)
    }
}

/// Chain and insert events under the audit head's lock (this transaction
/// holds SQLite's write lock); returns the last chain number.
fn insert_events(tx: &rusqlite::Transaction<'_>, events: &[AuditEvent]) -> Result<i64, StoreError> {
    rows::check_events(events)?;
    let (size, head, frontier) = tx
        .prepare_cached("SELECT size, head, frontier FROM audit_head WHERE id = 1")?
        .query_row([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
    let mut trail = rows::trail_from_head(size, head, frontier)?;
    let mut insert = tx.prepare_cached(&format!(
        "{EVENT_INSERT} VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))?;
    for event in events {
        let c = trail.append(event.clone());
        let (time, seq) = rows::event_row(&c)?;
        let e = &c.event;
        insert.execute(params![
            time,
            e.principal,
            e.source,
            e.action.as_str(),
            e.tenant,
            e.token,
            e.outcome.as_str(),
            e.error_code,
            e.request_id,
            e.reason,
            e.detail,
            seq,
            c.leaf_hash.as_slice(),
            c.chain_hash.as_slice(),
        ])?;
    }
    let (size, head, frontier) = rows::head_row(&trail)?;
    tx.prepare_cached("UPDATE audit_head SET size = ?1, head = ?2, frontier = ?3 WHERE id = 1")?
        .execute(params![size, head, frontier])?;
    rows::last_seq(&trail)
}

fn touch(
    tx: &rusqlite::Transaction<'_>,
    tokens: &[String],
    now: i64,
    granularity_ms: i64,
) -> Result<(), StoreError> {
    let mut update = tx.prepare_cached(
        "UPDATE cards SET last_used_at = ?1
         WHERE (last_used_at IS NULL OR last_used_at < ?2) AND token = ?3",
    )?;
    for token in tokens {
        update.execute(params![now, now - granularity_ms, token])?;
    }
    Ok(())
}

pub(super) fn card_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CardRow> {
    Ok(CardRow {
        token: r.get(0)?,
        tenant: r.get(1)?,
        fingerprint: r.get(2)?,
        brand: r.get(3)?,
        bin: r.get(4)?,
        last4: r.get(5)?,
        pan_len: r.get(6)?,
        key_version: r.get(7)?,
        nonce: r.get(8)?,
        ciphertext: r.get(9)?,
        created_at: r.get(10)?,
        fingerprint_version: r.get(11)?,
        expires_at: r.get(12)?,
        last_used_at: r.get(13)?,
        updated_at: r.get(14)?,
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error().map(|e| e.extended_code),
        Some(rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
    )
}
