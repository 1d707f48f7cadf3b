//! SQLite's point reads on the request path (a card by its token, a
//! principal by key id or certificate identity, a tenant's policy): read-only rusqlite
//! connections of their own, used inline on the calling thread.
//!
//! Why: through sqlx a read is three hand-offs to a connection's worker
//! thread and back (acquire, the statement, the release check), each a
//! wait for a CPU slice on a loaded machine; measured at about 45 µs of CPU
//! per read at 64 clients (issue 7). An indexed read of one row from
//! SQLite's page cache takes a few microseconds, less than one hand-off.
//!
//! What it costs: the calling task holds its thread for the read. In WAL
//! mode a reader never waits for the writer or for a checkpoint, so that is
//! the time of the B-tree lookup, plus a disk read for a page that is not
//! in the operating system's cache. Nothing else runs here: every other
//! read, and every write, stays on the pool or the writer.
//!
//! The connections are opened read-only (`SQLITE_OPEN_READ_ONLY`): they
//! cannot write or hold a write lock. One that is still inside a read
//! transaction after a read (it should never be) is dropped, not reused, so
//! no later read sees an old snapshot.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

use super::rows::{CARD_COLUMNS, PRINCIPAL_COLUMNS, TENANT_COLUMNS};
use super::{CardRow, PointReader, PrincipalRow, StoreError, TenantRow};

/// Idle connections kept for reuse; more are opened when more threads read
/// at once, and closed after.
const MAX_IDLE: usize = 8;
/// Statements kept prepared per connection.
const STATEMENT_CACHE: usize = 8;

/// A small set of read-only connections to one database file.
pub(crate) struct SqliteReader {
    path: PathBuf,
    busy: Duration,
    idle: Mutex<Vec<Connection>>,
    /// The statements, built once (the statement cache is keyed by their
    /// text).
    card_sql: String,
    principal_sql: String,
    cert_sql: String,
    tenant_sql: String,
}

impl std::fmt::Debug for SqliteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteReader {
    /// Connections are opened on first use (the database must exist by
    /// then: the pool creates and migrates it).
    pub(crate) fn new(path: &Path, busy: Duration) -> SqliteReader {
        SqliteReader {
            path: path.to_path_buf(),
            busy,
            idle: Mutex::new(Vec::new()),
            card_sql: format!("SELECT {CARD_COLUMNS} FROM cards WHERE token = ?1"),
            principal_sql: format!("SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE id = ?1"),
            cert_sql: format!(
                "SELECT {PRINCIPAL_COLUMNS} FROM principals
                 WHERE cert_identity = ?1 AND revoked_at IS NULL"
            ),
            tenant_sql: format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = ?1"),
        }
    }

    /// Run `read` on an idle connection, or on a new one.
    fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => self.open()?,
        };
        let out = read(&conn);
        if out.is_ok() && conn.is_autocommit() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        Ok(out?)
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }
}

impl PointReader for SqliteReader {
    fn find_card(&self, token: &str) -> Result<Option<CardRow>, StoreError> {
        self.read(|c| {
            c.prepare_cached(&self.card_sql)?
                .query_row([token], super::sqlite_writer::card_row)
                .optional()
        })
    }

    fn find_principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError> {
        self.read(|c| {
            c.prepare_cached(&self.principal_sql)?
                .query_row([id], principal_row)
                .optional()
        })
    }

    fn find_principal_by_cert(&self, identity: &str) -> Result<Option<PrincipalRow>, StoreError> {
        self.read(|c| {
            c.prepare_cached(&self.cert_sql)?
                .query_row([identity], principal_row)
                .optional()
        })
    }

    fn find_tenant(&self, name: &str) -> Result<Option<TenantRow>, StoreError> {
        self.read(|c| {
            c.prepare_cached(&self.tenant_sql)?
                .query_row([name], tenant_row)
                .optional()
        })
    }
}

/// A tenant row; the day counts as the pool's `tenant_from_row` checks them.
fn tenant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TenantRow> {
    let days = |i: usize| -> rusqlite::Result<Option<u32>> {
        r.get::<_, Option<i64>>(i)?
            .map(|d| {
                u32::try_from(d).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        i,
                        rusqlite::types::Type::Integer,
                        Box::new(e),
                    )
                })
            })
            .transpose()
    };
    Ok(TenantRow {
        name: r.get(0)?,
        fingerprint_salt: r.get(1)?,
        pan_shaped: r.get::<_, i64>(2)? != 0,
        token_ttl_days: days(3)?,
        retention_days: days(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        deleted_at: r.get(7)?,
    })
}

fn principal_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PrincipalRow> {
    Ok(PrincipalRow {
        id: r.get(0)?,
        name: r.get(1)?,
        roles: r.get(2)?,
        tenants: r.get(3)?,
        key_hash: r.get(4)?,
        created_at: r.get(5)?,
        revoked_at: r.get(6)?,
        cert_identity: r.get(7)?,
    })
}
