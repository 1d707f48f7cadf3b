//! Scheduled backups inside the service (`backup_dir`,
//! `backup_interval_secs`, `backup_keep`).
//!
//! Every interval the service writes a backup exactly as `tokenizer backup`
//! does (`vault::backup`: one consistent snapshot, mode 0600, a `.partial`
//! name until it is complete, fsynced, renamed, directory fsynced, signed
//! with the audit signing key) to `cardvault-backup-<UTC time>.jsonl` in
//! the backup directory, then deletes all but the newest `backup_keep`
//! complete backups (never before the new one is complete). Each run is in
//! the audit trail: `backup_exported` success (counts and file name, by
//! `vault::backup`) or failure (an error code and the file name); and in
//! the metrics (`cardvault_backup_last_success_timestamp_seconds`,
//! `cardvault_backup_failures_total`, `cardvault_backup_last_records`).
//!
//! Several instances on one database: the backup is of the whole database,
//! so one writer is enough; set `backup_interval_secs` on one instance (or
//! run the systemd timer on one host). There is no lock between instances:
//! see ARCHITECTURE "Backups" for why.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_web::web;
use audit::{Action, AuditEvent, Outcome};
use vault::backup::{BackupError, BackupWritten};

use crate::config::BackupSchedule;
use crate::seal::SealControl;
use crate::state::AppState;

/// Scheduled backup files are `cardvault-backup-<time>.jsonl`.
pub const FILE_PREFIX: &str = "cardvault-backup-";
pub const FILE_SUFFIX: &str = ".jsonl";

#[derive(Debug, thiserror::Error)]
pub enum BackupDirError {
    #[error("backup_dir {0}: {1}")]
    Io(String, #[source] io::Error),
    #[error("backup_dir {dir} is inside the data directory {data_dir}: a backup must survive the loss of the data directory; put it on another file system")]
    InsideDataDir { dir: String, data_dir: String },
    #[error("backup_dir {dir} is writable by other users (mode {mode:o}): one of them could delete backups or plant a newer-looking file that postpones the next one; chmod go-w it")]
    WritableByOthers { dir: String, mode: u32 },
    #[error("backup_dir {dir} belongs to user {owner}, not to the service's user {user} (nor root): chown it")]
    ForeignOwner { dir: String, owner: u32, user: u32 },
}

/// Create the backup directory (0700) if missing and refuse one that is the
/// data directory or inside it (compared after resolving symbolic links),
/// one that a group or other users may write to, and one owned by another
/// user than the service's (root's is accepted). Returns the resolved
/// directory.
pub fn prepare_dir(dir: &Path, data_dir: &Path) -> Result<PathBuf, BackupDirError> {
    let shown = || dir.display().to_string();
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| BackupDirError::Io(shown(), e))?;
    }
    let resolved = dir
        .canonicalize()
        .map_err(|e| BackupDirError::Io(shown(), e))?;
    let data = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    if resolved.starts_with(&data) {
        return Err(BackupDirError::InsideDataDir {
            dir: resolved.display().to_string(),
            data_dir: data.display().to_string(),
        });
    }
    let meta = fs::metadata(&resolved).map_err(|e| BackupDirError::Io(shown(), e))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(BackupDirError::WritableByOthers {
            dir: resolved.display().to_string(),
            mode,
        });
    }
    let user = rustix::process::geteuid().as_raw();
    if meta.uid() != user && meta.uid() != 0 {
        return Err(BackupDirError::ForeignOwner {
            dir: resolved.display().to_string(),
            owner: meta.uid(),
            user,
        });
    }
    Ok(resolved)
}

/// The file name of a backup started at `at`: sorts by time, and no digit
/// run is long enough to look like a card number in the audit trail.
pub fn file_name(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{FILE_PREFIX}{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z{FILE_SUFFIX}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

fn is_backup_name(name: &str) -> bool {
    name.starts_with(FILE_PREFIX) && name.ends_with(FILE_SUFFIX)
}

/// The complete scheduled backups in `dir`, oldest first (by name, which
/// is by time).
pub fn complete_backups(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if is_backup_name(&name.to_string_lossy()) && entry.file_type()?.is_file() {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// What [`prune`] did.
#[derive(Debug, Default)]
pub struct Pruned {
    pub deleted: Vec<PathBuf>,
    /// Old backups that could not be deleted (the others still were).
    pub failed: Vec<(PathBuf, io::Error)>,
}

/// Delete all but the newest `keep` complete backups. A backup that cannot
/// be deleted does not stop the others from being deleted; it is tried
/// again at the next run.
pub fn prune(dir: &Path, keep: u32) -> io::Result<Pruned> {
    let all = complete_backups(dir)?;
    let keep = usize::try_from(keep).unwrap_or(usize::MAX).max(1);
    let old = all.len().saturating_sub(keep);
    let mut pruned = Pruned::default();
    for path in all.into_iter().take(old) {
        match fs::remove_file(&path) {
            Ok(()) => pruned.deleted.push(path),
            // Gone meanwhile (another instance pruning the same directory).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => pruned.failed.push((path, e)),
        }
    }
    Ok(pruned)
}

/// Remove `.partial` files a crash left behind (only ours).
fn remove_partials(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(FILE_PREFIX) && name.ends_with(".partial") {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::warn!(file = %name, "removed an incomplete backup left by an earlier run")
                }
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot remove an incomplete backup")
                }
            }
        }
    }
}

/// When the newest complete backup in `dir` was written (its mtime).
fn newest_backup_time(dir: &Path) -> Option<SystemTime> {
    let newest = complete_backups(dir).ok()?.pop()?;
    fs::metadata(newest).ok()?.modified().ok()
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A stable code for the audit trail (never the message: it may name paths
/// or database details).
fn error_code(e: &BackupError) -> &'static str {
    match e {
        BackupError::Io { .. } | BackupError::Exists(_) => "backup_io",
        BackupError::Store(_) => "backup_storage",
        BackupError::Kek(_) | BackupError::SigningKey(_) => "backup_keys",
        _ => "backup_failed",
    }
}

/// One scheduled run: write the backup, then prune. The outcome goes to
/// the audit trail (the success event is written by `vault::backup`) and
/// the metrics.
pub async fn run_once(
    seal: &SealControl,
    state: &AppState,
    dir: &Path,
    keep: u32,
) -> Result<BackupWritten, BackupError> {
    let name = file_name(time::OffsetDateTime::now_utc());
    let path = dir.join(&name);
    let result = match seal.vault() {
        Some(vault) => vault.write_backup(&path).await,
        None => Err(BackupError::Integrity(
            "sealed: no KEK to seal a backup with",
        )),
    };
    match &result {
        Ok(written) => {
            state
                .metrics
                .backup_succeeded(unix_seconds(SystemTime::now()), written.summary.records());
            tracing::info!(file = %name, cards = written.summary.cards, audit_events = written.summary.audit_events, "scheduled backup written");
            // File system work off the runtime thread (a slow or hung
            // backup volume must not hold up checkpoints and key refresh).
            let owned = dir.to_path_buf();
            match tokio::task::spawn_blocking(move || prune(&owned, keep)).await {
                Ok(Ok(pruned)) => {
                    for d in pruned.deleted {
                        tracing::info!(file = %d.display(), "old backup deleted (backup_keep)");
                    }
                    for (d, e) in pruned.failed {
                        tracing::warn!(file = %d.display(), error = %e, "cannot delete an old backup (backup_keep); tried again at the next run");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot list the backups to delete old ones")
                }
                Err(e) => tracing::warn!(error = %e, "deleting old backups failed"),
            }
        }
        Err(e) => {
            state.metrics.backup_failed();
            tracing::error!(file = %name, error = %e, "scheduled backup failed; retrying at the next interval");
            let event = AuditEvent::new(Action::BackupExported, Outcome::Failure)
                .source("local")
                .error_code(error_code(e))
                .detail(format!("scheduled file={name}"));
            if let Err(e) = seal.store().append_audit(event).await {
                tracing::error!(error = %e, "cannot record the failed backup in the audit trail");
            }
        }
    }
    result
}

/// The scheduler: the first run when the newest backup in the directory is
/// one interval old (at once if there is none), then every interval.
/// Sealed: skipped (no KEK), counted as a failure.
pub async fn scheduler(
    seal: Arc<SealControl>,
    state: web::Data<AppState>,
    schedule: BackupSchedule,
) {
    remove_partials(&schedule.dir);
    let newest = newest_backup_time(&schedule.dir);
    if let Some(t) = newest {
        state.metrics.backup_seen(unix_seconds(t));
    }
    let age = newest.map_or(schedule.interval, |t| t.elapsed().unwrap_or_default());
    let first = tokio::time::Instant::now() + schedule.interval.saturating_sub(age);
    let mut tick = tokio::time::interval_at(first, schedule.interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = run_once(&seal, &state, &schedule.dir, schedule.keep).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_sort_by_time_and_pruning_keeps_the_newest() {
        let t = time::macros::datetime!(2026-03-04 05:06:07.089 UTC);
        assert_eq!(file_name(t), "cardvault-backup-20260304T050607.089Z.jsonl");
        let dir = tempfile::tempdir().unwrap();
        let mut names = Vec::new();
        for i in 0..5 {
            let name = file_name(t + time::Duration::seconds(i));
            fs::write(dir.path().join(&name), "x").unwrap();
            names.push(name);
        }
        // Not ours, or incomplete: never counted nor deleted.
        fs::write(dir.path().join("notes.txt"), "x").unwrap();
        fs::write(dir.path().join("cardvault-backup-1.partial"), "x").unwrap();
        let pruned = prune(dir.path(), 2).unwrap();
        assert_eq!(pruned.deleted.len(), 3);
        assert!(pruned.failed.is_empty());
        let left: Vec<String> = complete_backups(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, names[3..]);
        assert!(dir.path().join("notes.txt").exists());
        remove_partials(dir.path());
        assert!(!dir.path().join("cardvault-backup-1.partial").exists());
    }

    #[test]
    fn a_backup_dir_inside_the_data_dir_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        fs::create_dir(&data).unwrap();
        for inside in [data.clone(), data.join("backups"), data.join("a/../b")] {
            assert!(
                matches!(
                    prepare_dir(&inside, &data),
                    Err(BackupDirError::InsideDataDir { .. })
                ),
                "{}",
                inside.display()
            );
        }
        // Through a symbolic link too.
        std::os::unix::fs::symlink(&data, root.path().join("link")).unwrap();
        assert!(prepare_dir(&root.path().join("link/x"), &data).is_err());
        let outside = prepare_dir(&root.path().join("backups"), &data).unwrap();
        assert!(outside.is_dir());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&outside).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_backup_dir_others_may_write_to_or_own_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        fs::create_dir(&data).unwrap();
        let dir = root.path().join("backups");
        fs::create_dir(&dir).unwrap();
        for mode in [0o777, 0o1777, 0o770, 0o702] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
            let err = prepare_dir(&dir, &data).unwrap_err();
            assert!(
                matches!(err, BackupDirError::WritableByOthers { .. }),
                "{mode:o}: {err}"
            );
        }
        // Readable by others is the operator's choice (backups are 0600).
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&dir, &data).unwrap();
        // Another user's directory (the suite runs as root in CI; as
        // another user, chown to a third user is refused by the kernel).
        let other = 54_321;
        match std::os::unix::fs::chown(&dir, Some(other), None) {
            Ok(()) => {
                let err = prepare_dir(&dir, &data).unwrap_err();
                assert!(
                    matches!(err, BackupDirError::ForeignOwner { owner, .. } if owner == other),
                    "{err}"
                );
            }
            Err(e) => {
                assert!(!rustix::process::geteuid().is_root(), "chown as root: {e}");
            }
        }
    }
}
