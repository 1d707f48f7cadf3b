//! Self-contained inclusion proofs of one entry against a signed checkpoint,
//! for `vault-audit prove` and `check-proof`.
//!
//! An [`EntryProof`] holds the entry, the checkpoint and the audit path
//! (RFC 9162 2.1.3). Checking it needs only the public key: the checkpoint's
//! signature, the entry's leaf hash recomputed from (seq, event), and the
//! path from that leaf to the checkpoint's root. JSON: `{"entry":{..},
//! "checkpoint":{..},"path":["<64 hex>",..]}`.

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};

use crate::chain::{leaf_hash, ChainedEvent};
use crate::checkpoint::{Checkpoint, CheckpointError, VerifyingKey};
use crate::merkle::{verify_inclusion, Frontier, ProofBuilder};

/// Proof that one entry is in the trail a checkpoint signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryProof {
    pub entry: ChainedEvent,
    pub checkpoint: Checkpoint,
    /// Audit path of leaf `entry.seq - 1` in the tree of
    /// `checkpoint.tree_size` leaves.
    #[serde(with = "crate::hex::array_vec")]
    pub path: Vec<[u8; 32]>,
}

/// Why a proof cannot be built or does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("entry {seq} is not covered by the checkpoint for {tree_size} entries")]
    NotCovered { seq: u64, tree_size: u64 },
    #[error("the trail has only {have} entries, the checkpoint covers {need}")]
    TooShort { have: u64, need: u64 },
    #[error("the trail is not in order: position {position} holds entry {seq} (run verify first)")]
    OutOfOrder { position: u64, seq: u64 },
    #[error("the trail does not match the checkpoint's root (run verify first)")]
    TrailMismatch,
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the entry's content does not match its leaf hash")]
    LeafMismatch,
    #[error("the path does not lead from the entry to the checkpoint's root")]
    PathMismatch,
}

impl EntryProof {
    /// Build the proof of entry `seq` against `checkpoint`, streaming the
    /// trail's entries in order (O(log n) memory). Leaf hashes are
    /// recomputed from the events, and the resulting root must be the
    /// checkpoint's.
    pub fn build<I>(entries: I, seq: u64, checkpoint: Checkpoint) -> Result<Self, ProofError>
    where
        I: IntoIterator,
        I::Item: Borrow<ChainedEvent>,
    {
        let tree_size = checkpoint.tree_size;
        let not_covered = ProofError::NotCovered { seq, tree_size };
        let index = seq.checked_sub(1).ok_or(not_covered.clone())?;
        let mut builder = ProofBuilder::inclusion(index, tree_size).ok_or(not_covered)?;
        let mut tree = Frontier::new();
        let mut found = None;
        for (position, entry) in (1..=tree_size).zip(entries) {
            let entry = entry.borrow();
            if entry.seq != position {
                return Err(ProofError::OutOfOrder {
                    position,
                    seq: entry.seq,
                });
            }
            let leaf = leaf_hash(entry.seq, &entry.event);
            builder.push(leaf);
            tree.push(leaf);
            if entry.seq == seq {
                found = Some(entry.clone());
            }
        }
        if tree.size() < tree_size {
            return Err(ProofError::TooShort {
                have: tree.size(),
                need: tree_size,
            });
        }
        if tree.root() != checkpoint.root {
            return Err(ProofError::TrailMismatch);
        }
        let path = builder.finish().ok_or(ProofError::TrailMismatch)?;
        let entry = found.ok_or(ProofError::TrailMismatch)?;
        Ok(Self {
            entry,
            checkpoint,
            path,
        })
    }

    /// Check the proof with the checkpoint public key alone.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), ProofError> {
        self.checkpoint.verify(key)?;
        let seq = self.entry.seq;
        let tree_size = self.checkpoint.tree_size;
        if seq == 0 || seq > tree_size {
            return Err(ProofError::NotCovered { seq, tree_size });
        }
        let leaf = leaf_hash(seq, &self.entry.event);
        if leaf != self.entry.leaf_hash {
            return Err(ProofError::LeafMismatch);
        }
        if !verify_inclusion(&leaf, seq - 1, tree_size, &self.path, &self.checkpoint.root) {
            return Err(ProofError::PathMismatch);
        }
        Ok(())
    }
}
