//! Inclusion proofs: built from the database ([`prove_from_database`]) or
//! an export ([`prove_from_export`]) against a signed checkpoint, checked
//! from a proof file with the public key alone ([`check_proof_file`]), and
//! described for the tool's output ([`describe_proof`]).

use std::fs::File;
use std::io::{self, BufReader};
use std::path::Path;

use futures_util::stream::StreamExt;

use crate::chain::ChainedEvent;
use crate::checkpoint::{Checkpoint, CheckpointError, TrustedKeys};
use crate::db::{BadRow, DbError, RowError, TrailDb};
use crate::export::{ExportReader, ReadError, Record};
use crate::proof::{EntryProof, ProofError};

use super::hex;

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
/// with the public key alone: the one of `keys` its checkpoint names (a
/// single proof shows no announcement, so the key must be given).
pub fn check_proof_file(
    path: &Path,
    keys: impl Into<TrustedKeys>,
) -> Result<EntryProof, CheckProofError> {
    let keys: TrustedKeys = keys.into();
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
    let key = keys.get(&proof.checkpoint.key_id).ok_or_else(|| {
        ProofError::Checkpoint(CheckpointError::UnknownKey {
            key_id: proof.checkpoint.key_id.clone(),
        })
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
