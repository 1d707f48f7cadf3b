//! The export of the trail in the database as JSON Lines
//! ([`export_database`]): the whole trail, or a range starting from its
//! anchor, with the checkpoints it needs to verify on its own.

use std::io::Write;

use futures_util::stream::StreamExt;

use crate::chain::Anchor;
use crate::db::{BadRow, DbError, RowError, TrailDb};
use crate::export::{self, ExportError};

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
