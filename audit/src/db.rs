//! Reading the audit trail out of the service's database, for `vault-audit`.
//!
//! The tables are the vault's (`vault/migrations/*/0002_audit_chain.sql`, the
//! same column names on both backends): `audit_events` rows with a
//! `chain_seq` are the trail's entries ([`ChainedEvent`]), rows without one
//! were written before the chain existed (legacy, counted, not verified);
//! `audit_checkpoints` rows are [`Checkpoint`]s.
//!
//! Opening never writes: SQLite is opened read-only (and never created),
//! PostgreSQL sessions are `default_transaction_read_only`. Rows are
//! streamed (one query, read as it is consumed), never collected, so a
//! trail of millions of entries is read in constant memory. On SQLite each
//! entry row comes packed in one JSON array (see `sqlite_packed_entry!`),
//! three times faster through sqlx than fifteen separate values, and
//! decoded with the same checks.
//!
//! A row that cannot be turned back into an entry or a checkpoint (a time
//! that is not RFC 3339, an unknown action, a hash of the wrong length, a
//! NULL hash on a chained row, ...) is not a database error: someone wrote
//! it by hand. It comes back as a [`BadRow`], which the verifier reports as
//! tampering at that place.

use std::fmt;
use std::str::FromStr;

use futures_util::stream::{BoxStream, StreamExt};
use sqlx::{ColumnIndex, ConnectOptions, Connection, Decode, Row, Type};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::chain::{Anchor, ChainedEvent};
use crate::checkpoint::Checkpoint;
use crate::{Action, AuditEvent, Outcome};

/// The typed columns of an entry row, as the store writes them
/// (`vault/src/store/sql.rs`).
macro_rules! entry_columns {
    () => {
        "seq, time, principal, source, action, tenant, token, outcome, error_code, request_id, \
         reason, detail, chain_seq, leaf_hash, chain_hash"
    };
}

/// The same columns packed into one JSON array per row, for SQLite: sqlx
/// copies every SQLite value on its worker thread and frees it on ours, and
/// with 15 values per row that costs three times the rest of verification.
/// Types are kept visible: a value of the wrong type becomes a marker of
/// another JSON type (0 or "x") that reads as a bad row, never as a value.
/// Hashes come as lowercase hex.
macro_rules! sqlite_packed_entry {
    () => {
        "json_array(seq, \
         iif(typeof(time) IN ('text', 'null'), time, 0), \
         iif(typeof(principal) IN ('text', 'null'), principal, 0), \
         iif(typeof(source) IN ('text', 'null'), source, 0), \
         iif(typeof(action) IN ('text', 'null'), action, 0), \
         iif(typeof(tenant) IN ('text', 'null'), tenant, 0), \
         iif(typeof(token) IN ('text', 'null'), token, 0), \
         iif(typeof(outcome) IN ('text', 'null'), outcome, 0), \
         iif(typeof(error_code) IN ('text', 'null'), error_code, 0), \
         iif(typeof(request_id) IN ('text', 'null'), request_id, 0), \
         iif(typeof(reason) IN ('text', 'null'), reason, 0), \
         iif(typeof(detail) IN ('text', 'null'), detail, 0), \
         iif(typeof(chain_seq) = 'integer', chain_seq, 'x'), \
         iif(typeof(leaf_hash) = 'blob', lower(hex(leaf_hash)), 0), \
         iif(typeof(chain_hash) = 'blob', lower(hex(chain_hash)), 0))"
    };
}

/// Every chained row, in chain order. `seq` (the insertion identity) breaks
/// ties, which only exist if someone dropped the unique index on
/// `chain_seq`: then the row inserted later reads as the forged one.
macro_rules! all_entries {
    () => {
        " FROM audit_events WHERE chain_seq IS NOT NULL ORDER BY chain_seq, seq"
    };
}

/// The same, for `$1 <= chain_seq <= $2`.
macro_rules! entries_in_range {
    () => {
        " FROM audit_events WHERE chain_seq IS NOT NULL AND chain_seq >= $1 AND chain_seq <= $2 \
         ORDER BY chain_seq, seq"
    };
}

const ENTRIES_SQL: &str = concat!("SELECT ", entry_columns!(), all_entries!());
const ENTRIES_RANGE_SQL: &str = concat!("SELECT ", entry_columns!(), entries_in_range!());
const SQLITE_ENTRIES_SQL: &str = concat!("SELECT ", sqlite_packed_entry!(), all_entries!());
const SQLITE_ENTRIES_RANGE_SQL: &str =
    concat!("SELECT ", sqlite_packed_entry!(), entries_in_range!());

// `*`: `next_key` (key announcements, migration 0012) is read when the
// column exists, so databases from before it verify as well.
const CHECKPOINTS_SQL: &str = "SELECT * FROM audit_checkpoints ORDER BY tree_size";

/// SQLite's extended result code SQLITE_READONLY_DIRECTORY.
const SQLITE_READONLY_DIRECTORY: &str = "1544";

const ARCHIVES_SQL: &str =
    "SELECT from_seq, to_seq, chain_head, frontier, file_name, file_sha256, \
     archived_at FROM audit_archives ORDER BY to_seq";

const LEGACY_SQL: &str = "SELECT COUNT(*) FROM audit_events WHERE chain_seq IS NULL";

/// The database could not be opened or read (not a verdict on the trail).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL: expected sqlite://PATH or postgres://...")]
    UnsupportedUrl,
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    #[error(
        "the database URL names several hosts: vault-audit reads one; give the primary's \
         (or a standby's: it only reads, but a standby that lags shows a longer uncovered tail)"
    )]
    SeveralHosts,
    #[error("cannot open the database: {0}")]
    Open(#[source] sqlx::Error),
    #[error(
        "cannot open the database: SQLite must create the `-shm` file of a WAL-mode database \
         next to it, and its directory is not writable for this user (run as a user who may \
         write there, e.g. the service's, or verify a copy of the database file)"
    )]
    SqliteReadOnlyDirectory,
    #[error("cannot read the audit tables: {0}")]
    Query(#[source] sqlx::Error),
    #[error("an audit_archives row is not what the service writes ({0}): it was written or changed by hand")]
    BadArchive(BadRow),
}

/// One archived segment as the database records it (`audit_archives`):
/// entries `from_seq..=to_seq` were written to `file_name` and may have been
/// deleted from the database since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRow {
    pub from_seq: u64,
    pub to_seq: u64,
    /// The trail's state after `to_seq`: where the entries still in the
    /// database continue.
    pub anchor: Anchor,
    pub file_name: String,
    /// SHA-256 of the archive file, lowercase hex.
    pub file_sha256: String,
    /// RFC 3339 time the segment was archived.
    pub archived_at: String,
}

/// A row that does not read back as what the service writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// `chain_seq` of an entry row, or `tree_size` of a checkpoint row, when
    /// that much could be read.
    pub key: Option<i64>,
    /// What is wrong (column and kind), never the value.
    pub what: &'static str,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }
}

/// One item of a row stream: a query error ends the stream; a bad row is
/// reported and the stream goes on.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("cannot read the audit tables: {0}")]
    Query(#[source] sqlx::Error),
    #[error("unreadable row: {0}")]
    Bad(BadRow),
}

#[derive(Debug)]
enum Conn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

/// Whether a `postgres://` URL's authority is a libpq host list
/// (`db1:5432,db2:5432`), as the service accepts: sqlx takes one host.
fn names_several_hosts(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hosts.contains(',')
}

/// One read-only connection to the service's database.
#[derive(Debug)]
pub struct TrailDb {
    conn: Conn,
}

impl TrailDb {
    /// Open `sqlite://PATH` (read-only; a missing file is an error, never
    /// created) or `postgres://...` / `postgresql://...` (read-only session).
    pub async fn open(url: &str) -> Result<Self, DbError> {
        let conn = if url.starts_with("sqlite:") {
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .map_err(DbError::InvalidUrl)?
                .read_only(true)
                .create_if_missing(false)
                .disable_statement_logging();
            let mut conn = opts.connect().await.map_err(DbError::Open)?;
            // The first read opens the WAL, which may need to create the
            // `-shm` file next to the database: say so if it cannot.
            sqlx::query("SELECT COUNT(*) FROM sqlite_master")
                .execute(&mut conn)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(d)
                        if d.code().as_deref() == Some(SQLITE_READONLY_DIRECTORY) =>
                    {
                        DbError::SqliteReadOnlyDirectory
                    }
                    _ => DbError::Open(e),
                })?;
            Conn::Sqlite(conn)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            if names_several_hosts(url) {
                return Err(DbError::SeveralHosts);
            }
            let opts = sqlx::postgres::PgConnectOptions::from_str(url)
                .map_err(DbError::InvalidUrl)?
                .application_name("vault-audit")
                .options([("default_transaction_read_only", "on")])
                .disable_statement_logging();
            Conn::Postgres(opts.connect().await.map_err(DbError::Open)?)
        } else {
            return Err(DbError::UnsupportedUrl);
        };
        Ok(Self { conn })
    }

    /// Number of `audit_events` rows without a chain position (written
    /// before the chain existed, or with `chain_seq` set to NULL by hand).
    pub async fn legacy_rows(&mut self) -> Result<u64, DbError> {
        let n: i64 = match &mut self.conn {
            Conn::Sqlite(c) => sqlx::query_scalar(LEGACY_SQL).fetch_one(c).await,
            Conn::Postgres(c) => sqlx::query_scalar(LEGACY_SQL).fetch_one(c).await,
        }
        .map_err(DbError::Query)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The archived segments, by their last entry.
    pub async fn archives(&mut self) -> Result<Vec<ArchiveRow>, DbError> {
        let rows = match &mut self.conn {
            Conn::Sqlite(c) => {
                let rows = sqlx::query(ARCHIVES_SQL)
                    .fetch_all(c)
                    .await
                    .map_err(DbError::Query)?;
                rows.iter()
                    .map(archive_from_row)
                    .collect::<Result<Vec<_>, _>>()
            }
            Conn::Postgres(c) => {
                let rows = sqlx::query(ARCHIVES_SQL)
                    .fetch_all(c)
                    .await
                    .map_err(DbError::Query)?;
                rows.iter()
                    .map(archive_from_row)
                    .collect::<Result<Vec<_>, _>>()
            }
        };
        rows.map_err(DbError::BadArchive)
    }

    /// Every chained entry, in chain order (ties by insertion order).
    pub fn entries(&mut self) -> BoxStream<'_, Result<ChainedEvent, RowError>> {
        self.entries_in(None)
    }

    /// The entries with `from <= chain_seq <= to`, in chain order; `None`:
    /// every chained row (also those with a `chain_seq` below 1, which only
    /// a forger writes).
    pub fn entries_in(
        &mut self,
        range: Option<(u64, u64)>,
    ) -> BoxStream<'_, Result<ChainedEvent, RowError>> {
        let (from, to) = range.map_or((0, 0), |(from, to)| {
            (
                i64::try_from(from).unwrap_or(i64::MAX),
                i64::try_from(to).unwrap_or(i64::MAX),
            )
        });
        macro_rules! run {
            ($c:expr, $all:expr, $in_range:expr, $decode:expr) => {{
                let query = if range.is_some() {
                    sqlx::query($in_range).bind(from).bind(to)
                } else {
                    sqlx::query($all)
                };
                query
                    .fetch($c)
                    .map(|row| match row {
                        Ok(row) => $decode(&row).map_err(RowError::Bad),
                        Err(e) => Err(RowError::Query(e)),
                    })
                    .boxed()
            }};
        }
        match &mut self.conn {
            Conn::Sqlite(c) => run!(
                c,
                SQLITE_ENTRIES_SQL,
                SQLITE_ENTRIES_RANGE_SQL,
                packed_entry_from_row
            ),
            Conn::Postgres(c) => run!(c, ENTRIES_SQL, ENTRIES_RANGE_SQL, entry_from_row),
        }
    }

    /// Every checkpoint row, by tree size.
    pub fn checkpoints(&mut self) -> BoxStream<'_, Result<Checkpoint, RowError>> {
        macro_rules! run {
            ($c:expr) => {
                sqlx::query(CHECKPOINTS_SQL)
                    .fetch($c)
                    .map(|row| match row {
                        Ok(row) => checkpoint_from_row(&row).map_err(RowError::Bad),
                        Err(e) => Err(RowError::Query(e)),
                    })
                    .boxed()
            };
        }
        match &mut self.conn {
            Conn::Sqlite(c) => run!(c),
            Conn::Postgres(c) => run!(c),
        }
    }

    /// Close the connection politely (PostgreSQL: the session ends now, so
    /// the database can be dropped or used as a template right away).
    pub async fn close(self) {
        let _ = match self.conn {
            Conn::Sqlite(c) => c.close().await,
            Conn::Postgres(c) => c.close().await,
        };
    }
}

/// A column that did not decode, as a [`BadRow`] reason.
fn get<'r, R, T>(row: &'r R, column: &'static str, what: &'static str) -> Result<T, &'static str>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    row.try_get(column).map_err(|_| what)
}

fn entry_from_row<'r, R>(r: &'r R) -> Result<ChainedEvent, BadRow>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    Option<Vec<u8>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let chain_seq: Option<i64> = get(r, "chain_seq", "chain_seq is not an integer")
        .map_err(|what| BadRow { key: None, what })?;
    let bad = |what| BadRow {
        key: chain_seq,
        what,
    };
    let seq = chain_seq
        .and_then(|n| u64::try_from(n).ok())
        .ok_or(bad("chain_seq is negative"))?;
    let hash = |column, what| -> Result<[u8; 32], BadRow> {
        let bytes: Option<Vec<u8>> = get(r, column, what).map_err(bad)?;
        bytes.and_then(|b| b.try_into().ok()).ok_or(bad(what))
    };
    let leaf_hash = hash("leaf_hash", "leaf_hash is not 32 bytes")?;
    let chain_hash = hash("chain_hash", "chain_hash is not 32 bytes")?;
    let text =
        |column, what| -> Result<Option<String>, BadRow> { get(r, column, what).map_err(bad) };
    let time: String = get(r, "time", "time is not text").map_err(bad)?;
    let action: String = get(r, "action", "action is not text").map_err(bad)?;
    let outcome: String = get(r, "outcome", "outcome is not text").map_err(bad)?;
    let event = AuditEvent {
        time: OffsetDateTime::parse(&time, &Rfc3339).map_err(|_| bad("time is not RFC 3339"))?,
        principal: text("principal", "principal is not text")?,
        source: text("source", "source is not text")?,
        action: Action::parse(&action).ok_or(bad("unknown action"))?,
        tenant: text("tenant", "tenant is not text")?,
        token: text("token", "token is not text")?,
        outcome: Outcome::parse(&outcome).ok_or(bad("unknown outcome"))?,
        error_code: text("error_code", "error_code is not text")?,
        request_id: text("request_id", "request_id is not text")?,
        reason: text("reason", "reason is not text")?,
        detail: text("detail", "detail is not text")?,
    };
    Ok(ChainedEvent {
        seq,
        event,
        leaf_hash,
        chain_hash,
    })
}

/// An entry row of [`SQLITE_ENTRIES_SQL`] (one JSON array), with the same
/// checks and the same reasons as [`entry_from_row`].
fn packed_entry_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ChainedEvent, BadRow> {
    use serde_json::Value;
    let unreadable = |what| BadRow { key: None, what };
    let json: String = r
        .try_get(0)
        .map_err(|_| unreadable("a text column is not valid UTF-8"))?;
    let mut v: [Value; 15] =
        serde_json::from_str(&json).map_err(|_| unreadable("the row cannot be read"))?;
    let chain_seq = v[12]
        .as_i64()
        .ok_or(unreadable("chain_seq is not an integer"))?;
    let bad = |what| BadRow {
        key: Some(chain_seq),
        what,
    };
    let seq = u64::try_from(chain_seq).map_err(|_| bad("chain_seq is negative"))?;
    let hash = |v: &Value, what| match v {
        Value::String(hex) => crate::hex::decode_array::<32>(hex).ok_or(bad(what)),
        _ => Err(bad(what)),
    };
    let leaf_hash = hash(&v[13], "leaf_hash is not 32 bytes")?;
    let chain_hash = hash(&v[14], "chain_hash is not 32 bytes")?;
    let text = |v: &mut Value, what| match v.take() {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(bad(what)),
    };
    let time = text(&mut v[1], "time is not text")?.ok_or(bad("time is not text"))?;
    let action = text(&mut v[4], "action is not text")?.ok_or(bad("action is not text"))?;
    let outcome = text(&mut v[7], "outcome is not text")?.ok_or(bad("outcome is not text"))?;
    let event = AuditEvent {
        time: OffsetDateTime::parse(&time, &Rfc3339).map_err(|_| bad("time is not RFC 3339"))?,
        principal: text(&mut v[2], "principal is not text")?,
        source: text(&mut v[3], "source is not text")?,
        action: Action::parse(&action).ok_or(bad("unknown action"))?,
        tenant: text(&mut v[5], "tenant is not text")?,
        token: text(&mut v[6], "token is not text")?,
        outcome: Outcome::parse(&outcome).ok_or(bad("unknown outcome"))?,
        error_code: text(&mut v[8], "error_code is not text")?,
        request_id: text(&mut v[9], "request_id is not text")?,
        reason: text(&mut v[10], "reason is not text")?,
        detail: text(&mut v[11], "detail is not text")?,
    };
    Ok(ChainedEvent {
        seq,
        event,
        leaf_hash,
        chain_hash,
    })
}

fn checkpoint_from_row<'r, R>(r: &'r R) -> Result<Checkpoint, BadRow>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let size: i64 = get(r, "tree_size", "tree_size is not an integer")
        .map_err(|what| BadRow { key: None, what })?;
    let bad = |what| BadRow {
        key: Some(size),
        what,
    };
    let bytes = |column, what| -> Result<Vec<u8>, BadRow> { get(r, column, what).map_err(bad) };
    let root = bytes("root", "root is not 32 bytes")?;
    let head = bytes("chain_head", "chain_head is not 32 bytes")?;
    let signature = bytes("signature", "signature is not 64 bytes")?;
    let time: String = get(r, "time", "time is not text").map_err(bad)?;
    let next_key = match r.try_get::<Option<String>, _>("next_key") {
        Ok(Some(line)) => Some(
            crate::checkpoint::VerifyingKey::parse(&line)
                .map_err(|_| bad("next_key is not a public key line"))?,
        ),
        Ok(None) | Err(sqlx::Error::ColumnNotFound(_)) => None,
        Err(_) => return Err(bad("next_key is not text")),
    };
    Ok(Checkpoint {
        tree_size: u64::try_from(size).map_err(|_| bad("tree_size is negative"))?,
        root: root.try_into().map_err(|_| bad("root is not 32 bytes"))?,
        chain_head: head
            .try_into()
            .map_err(|_| bad("chain_head is not 32 bytes"))?,
        time: OffsetDateTime::parse(&time, &Rfc3339).map_err(|_| bad("time is not RFC 3339"))?,
        key_id: get(r, "key_id", "key_id is not text").map_err(bad)?,
        next_key,
        signature: signature
            .try_into()
            .map_err(|_| bad("signature is not 64 bytes"))?,
    })
}

fn archive_from_row<'r, R>(r: &'r R) -> Result<ArchiveRow, BadRow>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let to: i64 =
        get(r, "to_seq", "to_seq is not an integer").map_err(|what| BadRow { key: None, what })?;
    let bad = |what| BadRow {
        key: Some(to),
        what,
    };
    let seq = |column, what| -> Result<u64, BadRow> {
        let n: i64 = get(r, column, what).map_err(bad)?;
        u64::try_from(n).map_err(|_| bad(what))
    };
    let to_seq = seq("to_seq", "to_seq is negative")?;
    let from_seq = seq("from_seq", "from_seq is not a positive integer")?;
    let head: Vec<u8> = get(r, "chain_head", "chain_head is not 32 bytes").map_err(bad)?;
    let frontier: Vec<u8> = get(r, "frontier", "frontier is not bytes").map_err(bad)?;
    if !frontier.len().is_multiple_of(32) {
        return Err(bad("frontier is not a list of 32-byte hashes"));
    }
    let frontier: Vec<[u8; 32]> = frontier
        .chunks_exact(32)
        .filter_map(|c| c.try_into().ok())
        .collect();
    Ok(ArchiveRow {
        from_seq,
        to_seq,
        anchor: Anchor {
            tree_size: to_seq,
            chain_head: head
                .try_into()
                .map_err(|_| bad("chain_head is not 32 bytes"))?,
            frontier,
        },
        file_name: get(r, "file_name", "file_name is not text").map_err(bad)?,
        file_sha256: get(r, "file_sha256", "file_sha256 is not text").map_err(bad)?,
        archived_at: get(r, "archived_at", "archived_at is not text").map_err(bad)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_host_list_is_refused_with_a_clear_error() {
        for url in [
            "postgres://u:p@db1:5432,db2:5432/cardvault",
            "postgresql://db1,db2/cardvault?sslmode=require",
        ] {
            assert!(names_several_hosts(url), "{url}");
        }
        for url in [
            "postgres://u:p,q@db1:5432/cardvault",
            "postgres://db1/cardvault?options=a,b",
            "postgres://db1:5432/card,vault",
        ] {
            assert!(!names_several_hosts(url), "{url}");
        }
        let err = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(TrailDb::open(
                "postgres://u:secret@db1:5432,db2:5432/cardvault",
            ))
            .unwrap_err();
        assert!(matches!(err, DbError::SeveralHosts), "{err}");
        assert!(!err.to_string().contains("secret"));
    }
}
