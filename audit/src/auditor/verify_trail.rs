//! Verification of a trail: from the database ([`verify_database`], with
//! the archive files of its archived segments), from archive files alone
//! ([`verify_archives`]) or from an export ([`verify_export_file`]), each
//! against the witness file's checkpoints if given. Owns the merge of
//! database and witness checkpoints (`Checkpoints`) and the verdicts
//! ([`Verified`], [`TrailFailure`], [`VerifyError`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::Path;
use std::pin::Pin;

use futures_util::stream::{BoxStream, Peekable, StreamExt};

use crate::chain::Anchor;
use crate::checkpoint::{Checkpoint, TrustedKeys};
use crate::db::{ArchiveRow, BadRow, DbError, RowError, TrailDb};
use crate::export::{ExportReader, ReadError, Record};
use crate::verify::{verify_export, Failure, Report, Verifier};

use super::hex;
use super::witness::{Witness, WitnessError};

/// Where the checkpoints compared with the witness file come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Database,
    Export,
    Archives,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Database => "database",
            Source::Export => "export",
            Source::Archives => "archive files",
        })
    }
}

/// Why a trail does not verify: what, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrailFailure {
    /// The library's verdict on the entries and checkpoints.
    Trail(Failure),
    /// The `position`-th chained row (in chain order) cannot be read as an
    /// entry; `after_seq` is the last entry that verified before it.
    UnreadableEntry {
        position: u64,
        after_seq: u64,
        row: BadRow,
    },
    /// A checkpoint row cannot be read as a checkpoint.
    UnreadableCheckpoint { row: BadRow },
    /// The witness file has a checkpoint for `tree_size` entries that the
    /// database (or export) lacks: checkpoints were removed.
    MissingCheckpoint { tree_size: u64, source: Source },
    /// The database (or export) holds a different checkpoint for
    /// `tree_size` entries than the witness file: it was rewritten.
    DifferentCheckpoint { tree_size: u64, source: Source },
    /// A line of an archive file cannot be read.
    UnreadableArchive { file: String, error: ReadError },
}

impl fmt::Display for TrailFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrailFailure::Trail(failure) => failure.fmt(f),
            TrailFailure::UnreadableEntry {
                position,
                after_seq,
                row,
            } => {
                write!(f, "the audit row at position {position} of the chain")?;
                if let Some(seq) = row.key {
                    write!(f, " (chain_seq {seq})")?;
                }
                write!(
                    f,
                    " is not an entry the service writes ({row}): it was written or changed by hand (entries up to {after_seq} verified)"
                )
            }
            TrailFailure::UnreadableCheckpoint { row } => {
                f.write_str("a checkpoint row")?;
                if let Some(size) = row.key {
                    write!(f, " (tree_size {size})")?;
                }
                write!(
                    f,
                    " is not a checkpoint the service writes ({row}): it was written or changed by hand"
                )
            }
            TrailFailure::MissingCheckpoint { tree_size, source } => write!(
                f,
                "the checkpoint for {tree_size} entries is in the witness file but not in the {source}: checkpoints were removed from the {source}"
            ),
            TrailFailure::DifferentCheckpoint { tree_size, source } => write!(
                f,
                "the checkpoint for {tree_size} entries in the {source} differs from the one in the witness file: it was rewritten"
            ),
            TrailFailure::UnreadableArchive { file, error } => {
                write!(f, "archive file {file}, {error}")
            }
        }
    }
}

impl std::error::Error for TrailFailure {}

/// A verification that could not give a verdict, or the verdict "failed".
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Failed(TrailFailure),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Witness(#[from] WitnessError),
    #[error("cannot read the export: {0}")]
    Io(#[source] io::Error),
}

/// A trail that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub report: Report,
    /// Audit rows without a chain position (database only).
    pub legacy_rows: Option<u64>,
    /// Checkpoints read from the witness file, all found unchanged.
    pub witness_checkpoints: Option<u64>,
    pub source: Source,
    /// Archived segments recorded in the database.
    pub archived: Vec<ArchiveRow>,
    /// Archive files verified before the database's entries.
    pub archive_files: u64,
}

/// How far verified signed checkpoints reach over a trail whose chain
/// verified: what `vault-audit verify`'s exit status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every entry is covered by a signed checkpoint that verified (or
    /// there are no entries): exit 0.
    Complete,
    /// The chain verifies, but entries `first..=last` come after the last
    /// signed checkpoint: protected by the hash chain only until the next
    /// one. The normal state of a live database between checkpoints: exit 3.
    Uncovered { first: u64, last: u64 },
    /// Entries and not one signed checkpoint verified: only the chain's own
    /// consistency was checked, which anyone able to write the database can
    /// rebuild. A failure: exit 1.
    Unsigned { entries: u64 },
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Coverage::Complete => f.write_str("every entry is covered by a signed checkpoint"),
            Coverage::Uncovered { first, last } => write!(
                f,
                "{} entries ({first} to {last}) are not yet covered by a signed checkpoint: until the next one they are protected by the hash chain only",
                last - first + 1
            ),
            Coverage::Unsigned { entries } => write!(
                f,
                "{entries} entries and no signed checkpoint: only the chain's own consistency could be checked, which anyone able to write the database can rebuild"
            ),
        }
    }
}

impl Verified {
    /// Whether every entry is covered by a verified signed checkpoint. A
    /// pass that starts from an anchor counts as signed only if a
    /// checkpoint after the anchor confirmed it (or archive files did).
    pub fn coverage(&self) -> Coverage {
        let r = &self.report;
        if r.entries == 0 {
            Coverage::Complete
        } else if r.checkpoints == 0 {
            Coverage::Unsigned { entries: r.entries }
        } else if r.anchored < r.last_seq {
            Coverage::Uncovered {
                first: r.anchored + 1,
                last: r.last_seq,
            }
        } else {
            Coverage::Complete
        }
    }

    /// The tool's report: one summary line, then notes (the coverage
    /// verdict is [`Verified::coverage`]).
    pub fn lines(&self) -> Vec<String> {
        let r = &self.report;
        let mut lines = vec![format!(
            "verified {} entries and {} checkpoints (root {}, last seq {}, anchored at {})",
            r.entries,
            r.checkpoints,
            hex(&r.root),
            r.last_seq,
            r.anchored
        )];
        if let Some(last) = self.archived.last() {
            lines.push(format!(
                "archived: entries 1 to {} in {} segments (last: {}, sha256 {}, archived at {})",
                last.to_seq,
                self.archived.len(),
                last.file_name,
                last.file_sha256,
                last.archived_at
            ));
        }
        if self.archive_files > 0 {
            lines.push(format!(
                "archive files: {} verified, joined to each other and to the entries in the {}",
                self.archive_files, self.source
            ));
        } else if r.start > 0 && self.source == Source::Database {
            lines.push(format!(
                "note: verification started after entry {} (from the anchor of the last archived segment); entries 1 to {} are verified from their archive files (--archive)",
                r.start, r.start
            ));
        } else if r.start > 0 {
            lines.push(format!(
                "note: the {} starts after entry {} (from an anchor, confirmed by the first checkpoint after it)",
                self.source, r.start
            ));
        }
        for h in &r.handovers {
            lines.push(format!(
                "signing key {} handed over to {} at the checkpoint for {} entries (announced by the old key; later checkpoints verified with the new one)",
                h.from, h.to, h.tree_size
            ));
        }
        if let Some(n) = self.witness_checkpoints {
            lines.push(format!(
                "witness file: {n} checkpoints, each one present and identical in the {}",
                self.source
            ));
        }
        if let Some(n) = self.legacy_rows.filter(|&n| n > 0) {
            lines.push(format!(
                "note: {n} audit rows predate the chain (no chain position); they are not covered by this verification"
            ));
        }
        lines
    }
}

/// Checkpoints from the database merged with those of the witness file, fed
/// to the verifier in ascending tree size, comparing the two on the way.
struct Checkpoints<'a> {
    db: Peekable<BoxStream<'a, Result<Checkpoint, RowError>>>,
    witness: Option<&'a mut Witness>,
    /// The first problem found with a checkpoint (reported if the entries
    /// themselves verify).
    problem: Option<TrailFailure>,
    /// Whether witness checkpoints must also be in `db`.
    compare: bool,
}

enum Head {
    End,
    Size(u64),
    Bad,
}

impl Checkpoints<'_> {
    fn note(&mut self, problem: TrailFailure) {
        self.problem.get_or_insert(problem);
    }

    /// The tree size of the next readable database checkpoint (unreadable
    /// rows are noted and skipped).
    async fn db_head(&mut self) -> Result<Option<u64>, VerifyError> {
        loop {
            let head = match Pin::new(&mut self.db).peek().await {
                None => Head::End,
                Some(Ok(c)) => Head::Size(c.tree_size),
                Some(Err(_)) => Head::Bad,
            };
            match head {
                Head::End => return Ok(None),
                Head::Size(size) => return Ok(Some(size)),
                Head::Bad => match self.db.next().await {
                    Some(Err(RowError::Query(e))) => return Err(DbError::Query(e).into()),
                    Some(Err(RowError::Bad(row))) => {
                        self.note(TrailFailure::UnreadableCheckpoint { row })
                    }
                    _ => {}
                },
            }
        }
    }

    /// Give the verifier every checkpoint with a tree size up to `limit`.
    async fn feed(&mut self, verifier: &mut Verifier, limit: u64) -> Result<(), VerifyError> {
        loop {
            let db = self.db_head().await?;
            let witness = match self.witness.as_deref_mut() {
                Some(w) => w.peek_size()?,
                None => None,
            };
            let size = match (db, witness) {
                (None, None) => return Ok(()),
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
            };
            if size > limit {
                return Ok(());
            }
            let mut in_db = Vec::new();
            while self.db_head().await? == Some(size) {
                if let Some(Ok(c)) = self.db.next().await {
                    in_db.push(c);
                }
            }
            let mut in_witness = Vec::new();
            if let Some(w) = self.witness.as_deref_mut() {
                while w.peek_size()? == Some(size) {
                    in_witness.extend(w.next_checkpoint()?);
                }
            }
            let compare = self.compare;
            for c in in_witness.iter().filter(|_| compare) {
                if in_db.is_empty() {
                    self.note(TrailFailure::MissingCheckpoint {
                        tree_size: size,
                        source: Source::Database,
                    });
                } else if !in_db.contains(c) {
                    self.note(TrailFailure::DifferentCheckpoint {
                        tree_size: size,
                        source: Source::Database,
                    });
                }
            }
            for c in in_db.into_iter().chain(in_witness) {
                verifier.add_checkpoint(c);
            }
        }
    }
}

/// Verify the trail in the database at `url` with the checkpoint public
/// key, and, if given, against the witness file's checkpoints.
///
/// Entries archived out of the database (`audit_archives`) are verified
/// from `archives`, the archive files in order, which must join up with
/// each other and with the entries still in the database. Without them the
/// pass starts where the last archived segment ends, from its anchor.
pub async fn verify_database(
    url: &str,
    keys: impl Into<TrustedKeys>,
    mut witness: Option<Witness>,
    archives: &[&Path],
) -> Result<Verified, VerifyError> {
    let keys: TrustedKeys = keys.into();
    let key = &keys;
    // Two connections: one streams checkpoints, one entries. The checkpoint
    // query starts first (see the module doc).
    let mut cp_db = TrailDb::open(url).await?;
    let mut entry_db = TrailDb::open(url).await?;
    let legacy_rows = entry_db.legacy_rows().await?;
    let archived = entry_db.archives().await?;
    let db_start = archived
        .last()
        .map_or_else(Anchor::genesis, |a| a.anchor.clone());
    let witness_count = witness.as_ref().map(Witness::len);
    let verdict = async {
        let mut checkpoints = Checkpoints {
            db: cp_db.checkpoints().peekable(),
            witness: witness.as_mut(),
            problem: None,
            compare: true,
        };
        checkpoints.db_head().await?;
        let mut verifier = None;
        for path in archives {
            if let Err(failure) =
                verify_archive_file(path, key, &mut verifier, &mut checkpoints).await?
            {
                return Ok(Err(failure));
            }
        }
        let mut verifier = match verifier {
            Some(mut v) => {
                v.continue_at(&db_start);
                v
            }
            None => match Verifier::resume(key.clone(), &db_start) {
                Ok(v) => v,
                Err(failure) => return Ok(Err(TrailFailure::Trail(failure))),
            },
        };
        let mut entries = if db_start.tree_size == 0 {
            entry_db.entries()
        } else {
            entry_db.entries_in(Some((db_start.tree_size + 1, u64::MAX)))
        };
        let mut bad_entry = None;
        while let Some(item) = entries.next().await {
            if verifier.is_settled() {
                break;
            }
            match item {
                Ok(entry) => {
                    checkpoints.feed(&mut verifier, entry.seq).await?;
                    verifier.push(&entry);
                }
                Err(RowError::Query(e)) => return Err(DbError::Query(e).into()),
                // An earlier failure comes first; else the bad row is it.
                Err(RowError::Bad(_)) if verifier.has_failed() => break,
                Err(RowError::Bad(row)) => {
                    bad_entry = Some(TrailFailure::UnreadableEntry {
                        position: verifier.position() + 1,
                        after_seq: verifier.last_good_seq(),
                        row,
                    });
                    break;
                }
            }
        }
        drop(entries);
        if bad_entry.is_none() && !verifier.is_settled() {
            checkpoints.feed(&mut verifier, u64::MAX).await?;
        }
        let problem = checkpoints.problem.take();
        Ok::<_, VerifyError>(match (verifier.finish(), bad_entry, problem) {
            (Err(failure), _, _) => Err(TrailFailure::Trail(failure)),
            (Ok(_), Some(bad), _) => Err(bad),
            (Ok(_), None, Some(problem)) => Err(problem),
            (Ok(report), None, None) => Ok(report),
        })
    }
    .await;
    cp_db.close().await;
    entry_db.close().await;
    let report = verdict?.map_err(VerifyError::Failed)?;
    Ok(Verified {
        report,
        legacy_rows: Some(legacy_rows),
        witness_checkpoints: witness_count,
        source: Source::Database,
        archived,
        archive_files: archives.len() as u64,
    })
}

/// Verify archive files alone (no database), oldest first: each verifies
/// and continues exactly where the one before ends. Witness checkpoints
/// are checked against the entries they cover (they cannot be compared with
/// a database here).
pub async fn verify_archives(
    archives: &[&Path],
    keys: impl Into<TrustedKeys>,
    mut witness: Option<Witness>,
) -> Result<Verified, VerifyError> {
    let keys: TrustedKeys = keys.into();
    let key = &keys;
    let witness_count = witness.as_ref().map(Witness::len);
    let mut checkpoints = Checkpoints {
        db: futures_util::stream::empty().boxed().peekable(),
        witness: witness.as_mut(),
        problem: None,
        compare: false,
    };
    let mut verifier = None;
    for path in archives {
        if let Err(failure) =
            verify_archive_file(path, key, &mut verifier, &mut checkpoints).await?
        {
            return Err(VerifyError::Failed(failure));
        }
    }
    let mut verifier = verifier.unwrap_or_else(|| Verifier::new(key.clone()));
    let end = verifier.last_good_seq();
    checkpoints.feed(&mut verifier, end).await?;
    let report = verifier
        .finish()
        .map_err(|f| VerifyError::Failed(TrailFailure::Trail(f)))?;
    Ok(Verified {
        report,
        legacy_rows: None,
        witness_checkpoints: witness_count,
        source: Source::Archives,
        archived: Vec::new(),
        archive_files: archives.len() as u64,
    })
}

/// Feed one archive file to the verifier: an export that starts from an
/// anchor, or from the first entry. The first file creates the verifier;
/// each later one must continue where the one before ended. Checkpoints of
/// the database and the witness are merged in as the entries go; the file's
/// own checkpoints are added too.
async fn verify_archive_file(
    path: &Path,
    key: &TrustedKeys,
    verifier: &mut Option<Verifier>,
    checkpoints: &mut Checkpoints<'_>,
) -> Result<Result<(), TrailFailure>, VerifyError> {
    let file = File::open(path).map_err(VerifyError::Io)?;
    let mut reader = ExportReader::new(BufReader::new(file));
    let file_name = || path.display().to_string();
    let mut first = true;
    while let Some(record) = reader.next() {
        let start = std::mem::take(&mut first);
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                return Ok(Err(TrailFailure::UnreadableArchive {
                    file: file_name(),
                    error,
                }))
            }
        };
        if start {
            let anchor = match &record {
                Record::Anchor(anchor) => anchor.clone(),
                _ => Anchor::genesis(),
            };
            match verifier {
                Some(v) => v.continue_at(&anchor),
                None => match Verifier::resume(key.clone(), &anchor) {
                    Ok(v) => *verifier = Some(v),
                    Err(failure) => return Ok(Err(TrailFailure::Trail(failure))),
                },
            }
        }
        let Some(v) = verifier.as_mut() else {
            break;
        };
        match record {
            Record::Anchor(_) if start => {}
            Record::Anchor(_) => {
                return Ok(Err(TrailFailure::Trail(Failure::MisplacedAnchor {
                    line: reader.line(),
                })))
            }
            Record::Checkpoint(c) => {
                v.add_checkpoint(c);
            }
            Record::Entry(entry) => {
                checkpoints.feed(v, entry.seq).await?;
                v.push(&entry);
            }
        }
        if v.is_settled() {
            break;
        }
    }
    Ok(Ok(()))
}

/// Verify an export file (see [`crate::export`]) with the public key, and,
/// if given, against the witness file's checkpoints, which must all be in
/// the export, unchanged. The export must start at entry 1: the verifier
/// recomputes the chain and the Merkle tree from the first entry.
pub fn verify_export_file(
    path: &Path,
    keys: impl Into<TrustedKeys>,
    witness: Option<Witness>,
) -> Result<Verified, VerifyError> {
    let key: TrustedKeys = keys.into();
    let open = || {
        File::open(path)
            .map(BufReader::new)
            .map_err(VerifyError::Io)
    };
    let witness = witness.map(Witness::into_vec).transpose()?;
    let mut problem = None;
    if let Some(witness) = &witness {
        // The export's own checkpoints, by tree size (a readable prefix is
        // enough here: the verifier reports unreadable lines itself).
        let mut in_export: BTreeMap<u64, Vec<Checkpoint>> = BTreeMap::new();
        for record in ExportReader::new(open()?) {
            match record {
                Ok(Record::Checkpoint(c)) => in_export.entry(c.tree_size).or_default().push(c),
                Ok(Record::Entry(_) | Record::Anchor(_)) => {}
                Err(_) => break,
            }
        }
        for c in witness {
            let source = Source::Export;
            let tree_size = c.tree_size;
            match in_export.get(&tree_size) {
                None => {
                    problem.get_or_insert(TrailFailure::MissingCheckpoint { tree_size, source })
                }
                Some(found) if !found.contains(c) => {
                    problem.get_or_insert(TrailFailure::DifferentCheckpoint { tree_size, source })
                }
                Some(_) => continue,
            };
        }
    }
    let witness_count = witness.as_ref().map(|w| w.len() as u64);
    let report = verify_export(open()?, witness.unwrap_or_default(), key)
        .map_err(|f| VerifyError::Failed(TrailFailure::Trail(f)))?;
    if let Some(problem) = problem {
        return Err(VerifyError::Failed(problem));
    }
    Ok(Verified {
        report,
        legacy_rows: None,
        witness_checkpoints: witness_count,
        source: Source::Export,
        archived: Vec::new(),
        archive_files: 0,
    })
}
