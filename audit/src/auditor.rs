//! What `vault-audit` does, as functions over the library: verify a trail
//! read from the service's database (or an export) together with the
//! external witness file, export it, build and check inclusion proofs.
//!
//! Nothing here re-implements the cryptography: entries and checkpoints go
//! through [`Verifier`], exports through [`crate::export`], proofs through
//! [`EntryProof`]. What this module adds is the plumbing, and one check the
//! library cannot make on its own: every checkpoint of the witness file must
//! also be in the database, unchanged (else checkpoints were removed or
//! rewritten there).
//!
//! Reading the database while the service writes is safe: checkpoints are
//! queried before entries (a checkpoint is committed after the entries it
//! covers, so every checkpoint seen has its entries visible), and the
//! witness file is read only up to its length when verification starts.
//!
//! Memory: from the database, entries and checkpoints are streamed and
//! merged in one pass, and a witness file whose checkpoints come in
//! ascending tree size (what the service writes) is streamed too, so memory
//! does not grow with the trail. Exports hold their checkpoints in memory
//! (the library's export verifier reads them all first).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::pin::Pin;

use futures_util::stream::{BoxStream, Peekable, StreamExt};

use crate::chain::{Anchor, ChainedEvent};
use crate::checkpoint::{Checkpoint, VerifyingKey};
use crate::db::{ArchiveRow, BadRow, DbError, RowError, TrailDb};
use crate::export::{self, ExportError, ExportReader, LineError, ReadError, Record};
use crate::proof::{EntryProof, ProofError};
use crate::verify::{verify_export, Failure, Report, Verifier};

/// Lowercase hex (roots, hashes) for the tool's output.
pub fn hex(bytes: &[u8]) -> String {
    crate::hex::encode(bytes)
}

// ---------------------------------------------------------------------------
// The witness file
// ---------------------------------------------------------------------------

/// The witness file could not be read (not a verdict on the trail).
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot read the witness file: {0}")]
    Io(#[source] io::Error),
    #[error("witness file, {0}")]
    Line(ReadError),
}

type CheckpointIter = Box<dyn Iterator<Item = Result<Checkpoint, WitnessError>> + Send>;

/// The checkpoints of the external witness file (JSON Lines of checkpoint
/// records, as the service appends them), in ascending tree size.
pub struct Witness {
    source: CheckpointIter,
    peeked: Option<Checkpoint>,
    count: u64,
}

impl fmt::Debug for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Witness")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Witness {
    /// Open a witness file. Only the bytes present now are read (the
    /// service may be appending). A first pass checks every line and the
    /// order; a file in ascending order is then streamed, any other is
    /// read into memory and sorted.
    pub fn open(path: &Path) -> Result<Self, WitnessError> {
        let file = File::open(path).map_err(WitnessError::Io)?;
        let len = file.metadata().map_err(WitnessError::Io)?.len();
        let mut count = 0u64;
        let mut sorted = true;
        let mut last = 0u64;
        for record in ExportReader::new(BufReader::new(file.take(len))) {
            match record.map_err(WitnessError::Line)? {
                Record::Checkpoint(c) => {
                    sorted &= c.tree_size >= last;
                    last = last.max(c.tree_size);
                    count += 1;
                }
                Record::Entry(_) | Record::Anchor(_) => {
                    return Err(WitnessError::Line(ReadError {
                        line: count + 1,
                        error: LineError::UnexpectedEntry,
                    }))
                }
            }
        }
        let file = File::open(path).map_err(WitnessError::Io)?;
        let input = BufReader::new(file.take(len));
        if sorted {
            let lines = ExportReader::new(input).map(|record| match record {
                Ok(Record::Checkpoint(c)) => Ok(c),
                Ok(Record::Entry(_) | Record::Anchor(_)) => Err(WitnessError::Line(ReadError {
                    line: 0,
                    error: LineError::UnexpectedEntry,
                })),
                Err(e) => Err(WitnessError::Line(e)),
            });
            Ok(Self {
                source: Box::new(lines),
                peeked: None,
                count,
            })
        } else {
            let checkpoints = export::read_checkpoints(input).map_err(WitnessError::Line)?;
            Ok(Self::from_checkpoints(checkpoints))
        }
    }

    /// A witness from checkpoints already read (any order).
    pub fn from_checkpoints(mut checkpoints: Vec<Checkpoint>) -> Self {
        checkpoints.sort_by_key(|c| c.tree_size);
        let count = checkpoints.len() as u64;
        Self {
            source: Box::new(checkpoints.into_iter().map(Ok)),
            peeked: None,
            count,
        }
    }

    /// Number of checkpoint lines.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn peek_size(&mut self) -> Result<Option<u64>, WitnessError> {
        if self.peeked.is_none() {
            self.peeked = self.source.next().transpose()?;
        }
        Ok(self.peeked.as_ref().map(|c| c.tree_size))
    }

    fn next_checkpoint(&mut self) -> Result<Option<Checkpoint>, WitnessError> {
        match self.peeked.take() {
            Some(c) => Ok(Some(c)),
            None => self.source.next().transpose(),
        }
    }

    /// Every checkpoint, in ascending tree size.
    pub fn into_vec(mut self) -> Result<Vec<Checkpoint>, WitnessError> {
        let mut out = Vec::new();
        while let Some(c) = self.next_checkpoint()? {
            out.push(c);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

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

impl Verified {
    /// The tool's report: one summary line, then notes and warnings.
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
        if r.checkpoints == 0 && r.entries > 0 {
            lines.push(
                "warning: no signed checkpoint: only the chain's own consistency was checked, which anyone able to write the database can rebuild"
                    .to_string(),
            );
        } else if r.anchored < r.last_seq {
            lines.push(format!(
                "warning: entries {} to {} are not yet covered by a signed checkpoint: until the next one they are protected by the hash chain only",
                r.anchored + 1,
                r.last_seq
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
    key: &VerifyingKey,
    mut witness: Option<Witness>,
    archives: &[&Path],
) -> Result<Verified, VerifyError> {
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
    key: &VerifyingKey,
    mut witness: Option<Witness>,
) -> Result<Verified, VerifyError> {
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
    key: &VerifyingKey,
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
    key: &VerifyingKey,
    witness: Option<Witness>,
) -> Result<Verified, VerifyError> {
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

// ---------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportDbError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Write(#[from] ExportError),
    #[error("a row cannot be exported ({row}{}): it was written or changed by hand; run `vault-audit verify`", .row.key.map(|k| format!(", key {k}")).unwrap_or_default())]
    BadRow { row: BadRow },
    #[error("entries before {first} are archived (no longer in the database): they are in their archive files")]
    Archived { first: u64 },
    #[error("entry {seq} is missing from the database, so the range cannot be anchored; run `vault-audit verify`")]
    Gap { seq: u64 },
}

/// What an export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    pub checkpoints: u64,
    pub entries: u64,
}

/// Write the trail in the database at `url` as JSON Lines: for a range
/// that does not start at entry 1 an anchor line (the trail's state before
/// `from`), then every checkpoint from the anchor's tree size on (up to
/// `to`, for a range), then the entries in chain order. Every such export
/// verifies on its own with `verify --export`.
///
/// Entries archived out of the database cannot be exported from it (they
/// are in their archive files); a range starting before the first entry
/// still in the database is refused.
pub async fn export_database<W: Write>(
    url: &str,
    range: Option<(u64, u64)>,
    out: &mut W,
) -> Result<Exported, ExportDbError> {
    let mut db = TrailDb::open(url).await?;
    let result = export_with(&mut db, range, out).await;
    db.close().await;
    result
}

async fn export_with<W: Write>(
    db: &mut TrailDb,
    range: Option<(u64, u64)>,
    out: &mut W,
) -> Result<Exported, ExportDbError> {
    let archived = db
        .archives()
        .await?
        .last()
        .map(|a| a.anchor.clone())
        .unwrap_or_else(Anchor::genesis);
    let (from, to) = match range {
        Some((from, to)) => (from.max(1), to),
        None => (archived.tree_size + 1, u64::MAX),
    };
    if from <= archived.tree_size {
        return Err(ExportDbError::Archived {
            first: archived.tree_size + 1,
        });
    }
    // The anchor before `from`: the archived one, moved along the stored
    // leaf and chain hashes of the entries in between. An export copies
    // what is stored (it does not judge it): if those rows were tampered
    // with, the export's first checkpoint will not verify.
    let anchor = if from == archived.tree_size + 1 {
        archived
    } else {
        let mut tree = crate::merkle::Frontier::from_parts(archived.tree_size, archived.frontier)
            .ok_or(ExportDbError::BadRow {
            row: BadRow {
                key: None,
                what: "the frontier of the last archived segment does not fit its size",
            },
        })?;
        let mut head = archived.chain_head;
        let mut rows = db.entries_in(Some((archived.tree_size + 1, from - 1)));
        while let Some(item) = rows.next().await {
            let entry = row(item)?;
            if entry.seq != tree.size() + 1 {
                return Err(ExportDbError::Gap {
                    seq: tree.size() + 1,
                });
            }
            tree.push(entry.leaf_hash);
            head = entry.chain_hash;
        }
        if tree.size() != from - 1 {
            return Err(ExportDbError::Gap {
                seq: tree.size() + 1,
            });
        }
        Anchor {
            tree_size: tree.size(),
            chain_head: head,
            frontier: tree.nodes().to_vec(),
        }
    };
    let mut counts = Exported {
        checkpoints: 0,
        entries: 0,
    };
    if anchor.tree_size > 0 {
        export::write_anchor(out, &anchor)?;
    }
    // Checkpoints first: their entries are committed before them.
    let mut checkpoints = db.checkpoints();
    while let Some(item) = checkpoints.next().await {
        let checkpoint = row(item)?;
        if checkpoint.tree_size >= anchor.tree_size && checkpoint.tree_size <= to {
            export::write_checkpoint(out, &checkpoint)?;
            counts.checkpoints += 1;
        }
    }
    drop(checkpoints);
    let mut entries = if range.is_none() && anchor.tree_size == 0 {
        db.entries()
    } else {
        db.entries_in(Some((from, to)))
    };
    while let Some(item) = entries.next().await {
        export::write_entry(out, &row(item)?)?;
        counts.entries += 1;
    }
    Ok(counts)
}

fn row<T>(item: Result<T, RowError>) -> Result<T, ExportDbError> {
    match item {
        Ok(v) => Ok(v),
        Err(RowError::Query(e)) => Err(DbError::Query(e).into()),
        Err(RowError::Bad(row)) => Err(ExportDbError::BadRow { row }),
    }
}

// ---------------------------------------------------------------------------
// Proofs
// ---------------------------------------------------------------------------

/// Why a proof could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error("no checkpoint covers entry {seq} yet (the service signs one every interval and at shutdown)")]
    NotYetCovered { seq: u64 },
    #[error("there is no checkpoint for {tree_size} entries")]
    NoSuchCheckpoint { tree_size: u64 },
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "a row cannot be read ({row}): it was written or changed by hand; run `vault-audit verify`"
    )]
    BadRow { row: BadRow },
    #[error("cannot read the export: {0}")]
    Io(#[source] io::Error),
    #[error("the export cannot be read: {0}; run `vault-audit verify --export`")]
    Unreadable(ReadError),
    #[error("entries 1 to {start} are not here (archived, or a range export): an inclusion proof is built from every entry from 1 on, so this tool cannot build one here; verify the segments with `vault-audit verify --archive`")]
    Archived { start: u64 },
}

impl ProveError {
    /// Whether the trail itself is at fault (a verification failure) rather
    /// than the request or the input/output.
    pub fn is_verification_failure(&self) -> bool {
        match self {
            ProveError::Proof(ProofError::NotCovered { .. }) => false,
            ProveError::Proof(_) | ProveError::BadRow { .. } | ProveError::Unreadable(_) => true,
            _ => false,
        }
    }
}

/// The checkpoint to prove against: the one for `wanted` entries, else the
/// smallest one that covers `seq`.
fn choose(
    checkpoints: impl Iterator<Item = Checkpoint>,
    seq: u64,
    wanted: Option<u64>,
) -> Result<Checkpoint, ProveError> {
    let mut checkpoints = checkpoints;
    match wanted {
        Some(tree_size) => checkpoints
            .find(|c| c.tree_size == tree_size)
            .ok_or(ProveError::NoSuchCheckpoint { tree_size }),
        None => checkpoints
            .filter(|c| c.tree_size >= seq)
            .min_by_key(|c| c.tree_size)
            .ok_or(ProveError::NotYetCovered { seq }),
    }
}

/// Inclusion proof of entry `seq` from the database at `url`, against the
/// checkpoint for `checkpoint` entries (default: the smallest covering it).
pub async fn prove_from_database(
    url: &str,
    seq: u64,
    checkpoint: Option<u64>,
) -> Result<EntryProof, ProveError> {
    let mut db = TrailDb::open(url).await?;
    let result = prove_with(&mut db, seq, checkpoint).await;
    db.close().await;
    result
}

async fn prove_with(
    db: &mut TrailDb,
    seq: u64,
    wanted: Option<u64>,
) -> Result<EntryProof, ProveError> {
    if let Some(last) = db.archives().await?.last() {
        return Err(ProveError::Archived { start: last.to_seq });
    }
    // Rows come by ascending tree size: the first match is the one.
    let mut found = None;
    {
        let mut checkpoints = db.checkpoints();
        while let Some(item) = checkpoints.next().await {
            match item {
                Ok(c) if found.is_none() => {
                    let fits = match wanted {
                        Some(size) => c.tree_size == size,
                        None => c.tree_size >= seq,
                    };
                    if fits {
                        found = Some(c);
                    }
                }
                Ok(_) | Err(RowError::Bad(_)) => {}
                Err(RowError::Query(e)) => return Err(DbError::Query(e).into()),
            }
        }
    }
    let checkpoint = choose(found.into_iter(), seq, wanted)?;
    if seq == 0 || seq > checkpoint.tree_size {
        return Err(ProofError::NotCovered {
            seq,
            tree_size: checkpoint.tree_size,
        }
        .into());
    }
    // The library builds the proof from a plain iterator: feed it from the
    // row stream through a bounded channel, on a blocking thread.
    let tree_size = checkpoint.tree_size;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ChainedEvent>(1024);
    let builder = tokio::task::spawn_blocking(move || {
        EntryProof::build(std::iter::from_fn(|| rx.blocking_recv()), seq, checkpoint)
    });
    let mut failed = None;
    {
        let mut entries = db.entries_in(Some((1, tree_size)));
        while let Some(item) = entries.next().await {
            match item {
                Ok(entry) => {
                    if tx.send(entry).await.is_err() {
                        break; // the builder has all it needs
                    }
                }
                Err(RowError::Query(e)) => {
                    failed = Some(ProveError::Db(DbError::Query(e)));
                    break;
                }
                Err(RowError::Bad(row)) => {
                    failed = Some(ProveError::BadRow { row });
                    break;
                }
            }
        }
    }
    drop(tx);
    let built = builder
        .await
        .map_err(|e| ProveError::Io(io::Error::other(e.to_string())))?;
    match failed {
        Some(e) => Err(e),
        None => Ok(built?),
    }
}

/// Inclusion proof of entry `seq` from an export file.
pub fn prove_from_export(
    path: &Path,
    seq: u64,
    checkpoint: Option<u64>,
) -> Result<EntryProof, ProveError> {
    let open = || File::open(path).map(BufReader::new).map_err(ProveError::Io);
    let mut unreadable = None;
    let mut anchored = None;
    let checkpoints = ExportReader::new(open()?).map_while(|record| match record {
        Ok(Record::Checkpoint(c)) => Some(Some(c)),
        Ok(Record::Entry(_)) => Some(None),
        Ok(Record::Anchor(a)) => {
            anchored = Some(a.tree_size);
            None
        }
        Err(e) => {
            unreadable = Some(e);
            None
        }
    });
    let chosen = choose(checkpoints.flatten(), seq, checkpoint);
    if let Some(e) = unreadable {
        return Err(ProveError::Unreadable(e));
    }
    if let Some(start) = anchored {
        return Err(ProveError::Archived { start });
    }
    let checkpoint = chosen?;
    let mut unreadable = None;
    let entries = ExportReader::new(open()?).map_while(|record| match record {
        Ok(Record::Entry(e)) => Some(Some(e)),
        Ok(Record::Checkpoint(_) | Record::Anchor(_)) => Some(None),
        Err(e) => {
            unreadable = Some(e);
            None
        }
    });
    let built = EntryProof::build(entries.flatten(), seq, checkpoint);
    match unreadable {
        Some(e) => Err(ProveError::Unreadable(e)),
        None => Ok(built?),
    }
}

/// Why a proof file does not prove anything.
#[derive(Debug, thiserror::Error)]
pub enum CheckProofError {
    #[error("cannot read the proof file: {0}")]
    Io(#[source] io::Error),
    #[error("not a proof: {what} (line {line}, column {column})")]
    Malformed {
        what: &'static str,
        line: usize,
        column: usize,
    },
    #[error("the proof does not hold: {0}")]
    Invalid(#[from] ProofError),
}

/// Read a proof file (the JSON `vault-audit prove` prints) and check it
/// with the public key alone.
pub fn check_proof_file(path: &Path, key: &VerifyingKey) -> Result<EntryProof, CheckProofError> {
    let text = std::fs::read(path).map_err(CheckProofError::Io)?;
    // serde_json's messages may quote the input: only the kind and place.
    let proof: EntryProof = serde_json::from_slice(&text).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => {
                "a field is missing, unknown or has a value of the wrong form"
            }
            serde_json::error::Category::Eof => "the JSON ends early",
            _ => "not valid JSON",
        };
        CheckProofError::Malformed {
            what,
            line: e.line(),
            column: e.column(),
        }
    })?;
    proof.verify(key)?;
    Ok(proof)
}

/// What a checked proof establishes, for the tool's output.
pub fn describe_proof(proof: &EntryProof) -> Vec<String> {
    let e = &proof.entry;
    let c = &proof.checkpoint;
    let time = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    let mut what = format!(
        "entry {}: {} {} {}",
        e.seq,
        time(e.event.time),
        e.event.action.as_str(),
        e.event.outcome.as_str()
    );
    for (name, value) in [
        ("principal", &e.event.principal),
        ("tenant", &e.event.tenant),
        ("token", &e.event.token),
        ("request", &e.event.request_id),
    ] {
        if let Some(v) = value {
            what.push_str(&format!(", {name} {v}"));
        }
    }
    vec![
        format!("proven: {what}"),
        format!(
            "is entry {} of the trail of {} entries that key {} signed at {} (root {}, chain head {})",
            e.seq,
            c.tree_size,
            c.key_id,
            time(c.time),
            hex(&c.root),
            hex(&c.chain_head)
        ),
    ]
}
