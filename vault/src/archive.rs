//! Retention of the audit trail: segments past the online retention period
//! go to archive files that verify on their own, and only then leave the
//! database.
//!
//! PCI DSS 10.5.1 asks for at least twelve months of audit history, the last
//! three immediately available. cardvault keeps `audit_retention_days`
//! (default 365) online; [`archive_audit`] moves what is older into a file:
//!
//! 1. the segment runs from the entry after the last archived one to the
//!    largest checkpoint signed before the cutoff (so it ends at a signed
//!    checkpoint, and the file carries it);
//! 2. the file is an export (`audit::export`) that starts from an anchor
//!    (chain head and Merkle frontier before its first entry), written to a
//!    `.partial` file, fsynced, then verified from disk with the public key
//!    exactly as an auditor would (`vault-audit verify --archive`); only a
//!    segment that verifies is renamed into place;
//! 3. the segment (range, anchor after it, file name, SHA-256) is recorded
//!    in `audit_archives` in one transaction with an `audit_archived` event;
//! 4. its entries are deleted from `audit_events` in batches. The database
//!    itself refuses to delete any entry outside a recorded segment.
//!
//! Every step can be interrupted: a rerun removes a stale `.partial`,
//! accepts an existing file only if it is byte-identical to the segment,
//! and finishes deleting rows an earlier run recorded but did not delete.
//! The files are the only copy of the archived entries once deleted: keep
//! them on write-once storage away from the database.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use audit::db::ArchiveRow;
use audit::{Action, AuditEvent, Outcome, VerifyingKey};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::store::{Store, StoreError};

/// Days of audit history kept in the database by default (PCI DSS 10.5.1:
/// twelve months).
pub const DEFAULT_RETENTION_DAYS: u32 = 365;
/// PCI DSS 10.5.1: at least the last three months immediately available.
pub const PCI_MINIMUM_RETENTION_DAYS: u32 = 90;
/// Archived entries deleted per statement.
const DELETE_BATCH: u32 = 10_000;

/// Why archiving stopped. Nothing is recorded or deleted unless the file
/// verified first.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the audit trail: {0}")]
    Export(#[from] audit::auditor::ExportDbError),
    #[error("archive file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the archive file {path} does not verify ({reason}); nothing was recorded or deleted: run `vault-audit verify`")]
    Verify { path: String, reason: String },
    #[error("no audit signing key in the database, so nothing was ever checkpointed")]
    NoSigningKey,
    #[error("the audit signing key in the database cannot be read: {0}")]
    BadKey(#[from] audit::KeyError),
    #[error("{path} exists and differs from the segment it should hold: move it away and run again (nothing was recorded or deleted)")]
    Exists { path: String },
    #[error("another archive run recorded a segment meanwhile: run again")]
    Conflict,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// The segment archived by this run and its file, if there was one to
    /// archive.
    pub segment: Option<(ArchiveRow, PathBuf)>,
    /// Entries deleted from the database (this segment's, and any an
    /// earlier run left behind).
    pub deleted: u64,
}

/// Bound on finding the primary of a host list for the export.
const EXPORT_HOST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Archive the audit entries covered by the last checkpoint signed at or
/// before `cutoff` (and not archived yet) to a file in `out_dir`, then delete
/// them from the database. `database_url` is the store's (read separately
/// and read-only for the export); `event` is the `audit_archived` event's
/// who and where (its detail and action are set here).
pub async fn archive_audit(
    store: &dyn Store,
    database_url: &str,
    out_dir: &Path,
    cutoff: OffsetDateTime,
    event: AuditEvent,
) -> Result<Archived, ArchiveError> {
    // Finish what an interrupted run recorded but did not delete.
    let mut deleted = delete_archived(store).await?;
    let last_end = store.audit_archives().await?.last().map_or(0, |a| a.to_seq);
    let Some(to) = store.checkpoint_before(last_end, cutoff).await? else {
        return Ok(Archived {
            segment: None,
            deleted,
        });
    };
    let from = last_end + 1;
    let key = verifying_key(store).await?;
    // A host list (failover): the export reads the primary, one host.
    let source = if database_url.starts_with("postgres") {
        crate::store::postgres::writable_host_url(database_url, EXPORT_HOST_TIMEOUT).await?
    } else {
        database_url.to_owned()
    };

    let name = format!("audit-archive-{from}-{to}.jsonl");
    let path = out_dir.join(&name);
    let partial = out_dir.join(format!("{name}.partial"));
    let shown = |p: &Path| p.display().to_string();
    let io = |p: &Path| {
        let path = shown(p);
        move |source| ArchiveError::Io { path, source }
    };
    match fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&partial)(e)),
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io(&partial))?;
    let mut out = BufWriter::new(file);
    audit::auditor::export_database(&source, Some((from, to)), &mut out).await?;
    let file = out.into_inner().map_err(|e| io(&partial)(e.into_error()))?;
    file.sync_all().map_err(io(&partial))?;
    drop(file);

    // Check the file from disk the way an auditor will.
    let verified = audit::auditor::verify_export_file(&partial, &key, None);
    let report = match verified {
        Ok(v) => v.report,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(ArchiveError::Verify {
                path: shown(&partial),
                reason: e.to_string(),
            });
        }
    };
    if report.start != last_end || report.last_seq != to || report.anchored != to {
        let _ = fs::remove_file(&partial);
        return Err(ArchiveError::Verify {
            path: shown(&partial),
            reason: format!(
                "expected entries {from} to {to} covered by the checkpoint for {to}, found entries after {} up to {} anchored at {}",
                report.start, report.last_seq, report.anchored
            ),
        });
    }
    let sha256 = file_sha256(&partial)?;
    if path.exists() {
        // An earlier run wrote the file but did not record it.
        if file_sha256(&path)? != sha256 {
            let _ = fs::remove_file(&partial);
            return Err(ArchiveError::Exists { path: shown(&path) });
        }
        fs::remove_file(&partial).map_err(io(&partial))?;
    } else {
        fs::rename(&partial, &path).map_err(io(&path))?;
    }
    crate::backup::sync_dir(out_dir).map_err(io(out_dir))?;

    let row = ArchiveRow {
        from_seq: from,
        to_seq: to,
        anchor: report.end,
        file_name: name,
        file_sha256: sha256,
        archived_at: OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    let mut event = event.detail(format!("entries {from} to {to}"));
    event.action = Action::AuditArchived;
    event.outcome = Outcome::Success;
    match store.record_archive(&row, event).await {
        Ok(()) => {}
        Err(StoreError::Conflict) => return Err(ArchiveError::Conflict),
        Err(e) => return Err(e.into()),
    }
    deleted += delete_archived(store).await?;
    Ok(Archived {
        segment: Some((row, path)),
        deleted,
    })
}

/// Every checkpoint public key, from the database (they are public; a
/// segment may hold checkpoints of several signing key generations).
async fn verifying_key(store: &dyn Store) -> Result<audit::TrustedKeys, ArchiveError> {
    let rows = store.load_signing_keys().await?;
    if rows.is_empty() {
        return Err(ArchiveError::NoSigningKey);
    }
    let keys = rows
        .iter()
        .map(|k| VerifyingKey::parse(&k.public_key))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(audit::TrustedKeys::new(keys))
}

async fn delete_archived(store: &dyn Store) -> Result<u64, ArchiveError> {
    let mut total = 0;
    loop {
        let n = store.delete_archived_audit(DELETE_BATCH).await?;
        total += n;
        if n < u64::from(DELETE_BATCH) {
            return Ok(total);
        }
    }
}

fn file_sha256(path: &Path) -> Result<String, ArchiveError> {
    let err = |source| ArchiveError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
