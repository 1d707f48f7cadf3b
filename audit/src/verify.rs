//! The auditor's check of a whole trail: entries plus signed checkpoints,
//! against the checkpoint public key only.
//!
//! One streaming pass over the entries (millions are fine: memory is the
//! Merkle frontier, O(log n), plus the checkpoints):
//!
//! 1. seq runs 1, 2, 3, ... (a gap is a removal, or a reorder if the missing
//!    seq turns up later; a repeated or smaller seq is an insertion);
//! 2. the leaf hash recomputed from (seq, event) equals the stored one
//!    (else the entry changed; if the stored leaf belongs to seq - 1 or
//!    seq + 1, an entry was inserted or removed and the rest renumbered; if
//!    a later row holds this seq's original, the two were swapped);
//! 3. the chain hash recomputed from the previous one equals the stored one;
//! 4. when the entries reach a checkpoint's tree size: its signature, then
//!    its root and chain head against the recomputed ones. An attacker who
//!    rewrote entries *and* recomputed every hash (without the signing key)
//!    passes 1-3 but fails here: the change lies in the entries after the
//!    previous good checkpoint, up to this one (the exact entry needs the
//!    original). If the next entry shows that the last one covered was a
//!    forged insertion (its seq repeats), that is reported instead;
//! 5. at the end, a validly signed checkpoint beyond the last entry means
//!    the tail was cut.
//!
//! Keys: a checkpoint must be signed by a key of the verifier's
//! [`TrustedKeys`]: one the auditor gave, or one announced by an earlier
//! checkpoint (smaller tree size) of a trusted key that verified against the
//! entries (step 4). A key that announced its successor is refused for every
//! checkpoint after its announcement. So one first key is enough to verify a
//! trail across any number of key rotations, and a checkpoint signed by a
//! key nobody trusted, or a forged announcement, fails as a bad signature.
//!
//! The first failure (lowest position) is reported. After it the pass goes
//! on only as far as needed to tell its kind (e.g. whether a missing seq
//! turns up later).
//!
//! A pass may start after entry 1, from an [`Anchor`] (an archived
//! segment, a partial export, the database after archiving): the anchor's
//! chain head and Merkle frontier stand in for the entries before it, and
//! the first checkpoint at or after it checks them (a forged anchor cannot
//! lead to a signed root). Segments read one after the other must join up:
//! [`Verifier::continue_at`] checks that the next one starts exactly where
//! the trail so far ends.
//!
//! Limit: entries after the last checkpoint are protected by the chain only;
//! someone who can write the database can drop or rewrite them unnoticed
//! until the next checkpoint. [`Report::anchored`] says how far signed
//! checkpoints reach; checkpoint often and keep the external witness file.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;

use crate::chain::{chain_hash, leaf_hash, Anchor, ChainState, ChainedEvent};
use crate::checkpoint::{Checkpoint, CheckpointError, Handover, TrustedKeys};
use crate::export::{ExportReader, LineError, Record};
use crate::hex;
use crate::merkle::Frontier;

/// A trail that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Entries before the first one verified (0 from the start; else the
    /// tree size of the [`Anchor`] the pass started from).
    pub start: u64,
    /// Entries verified.
    pub entries: u64,
    /// Distinct checkpoints verified (signature, root and chain head).
    pub checkpoints: u64,
    /// Seq of the last entry (0 when there are none).
    pub last_seq: u64,
    /// Merkle root of all entries.
    pub root: [u8; 32],
    /// Chain hash of the last entry.
    pub chain_head: [u8; 32],
    /// Largest tree size covered by a verified checkpoint: entries after it
    /// are protected by the chain alone.
    pub anchored: u64,
    /// The trail's state after the last entry: where the next segment
    /// starts.
    pub end: Anchor,
    /// Signing key hand-overs (announcements) verified, in trail order.
    pub handovers: Vec<Handover>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "OK: {} entries and {} checkpoints verified; last seq {}; root {}",
            self.entries,
            self.checkpoints,
            self.last_seq,
            hex::encode(&self.root)
        )?;
        if self.start > 0 {
            write!(f, "; started after entry {} (from an anchor)", self.start)?;
        }
        for h in &self.handovers {
            write!(
                f,
                "; signing key {} handed over to {} at {} entries",
                h.from, h.to, h.tree_size
            )?;
        }
        if self.checkpoints == 0 && self.entries > 0 {
            write!(
                f,
                "; WARNING: no signed checkpoint, only the chain's own consistency was checked"
            )?;
        } else if self.anchored < self.last_seq {
            write!(
                f,
                "; entries {} to {} are not yet covered by a signed checkpoint",
                self.anchored + 1,
                self.last_seq
            )?;
        }
        Ok(())
    }
}

/// Which stored value gave a changed entry away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// (seq, event) no longer hashes to the stored leaf hash.
    LeafHash,
    /// The stored chain hash does not follow from the previous entry's.
    ChainHash,
}

/// The first thing wrong with a trail: what, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Entry `seq` (or its stored hashes) was modified.
    Changed { seq: u64, evidence: Evidence },
    /// Entries `first..=last` are missing.
    Removed { first: u64, last: u64 },
    /// A forged entry sits at `seq` (it repeats an existing seq, or the
    /// entries after it were renumbered to make room).
    Inserted { seq: u64 },
    /// Entry `seq` is out of place: it was found at `position` (1-based
    /// place in the trail's order).
    Reordered { seq: u64, position: u64 },
    /// A validly signed checkpoint covers `tree_size` entries, but the trail
    /// ends at `last_seq`.
    Truncated { last_seq: u64, tree_size: u64 },
    /// The checkpoint for `tree_size` entries is forged or damaged.
    BadCheckpointSignature {
        tree_size: u64,
        error: CheckpointError,
    },
    /// A validly signed checkpoint does not match the entries: some entry in
    /// `after + 1 ..= upto` was rewritten with all hashes recomputed.
    CheckpointMismatch {
        after: u64,
        upto: u64,
        root: bool,
        chain_head: bool,
    },
    /// Line `line` of an export cannot be read (`after_seq`: the last entry
    /// read before it).
    Unreadable {
        line: u64,
        after_seq: u64,
        error: LineError,
    },
    /// Line `line` of an export holds the checkpoint for `tree_size` entries
    /// after entries beyond it: not where the exporter puts it.
    MisplacedCheckpoint { line: u64, tree_size: u64 },
    /// An anchor whose frontier does not fit its tree size.
    BadAnchor { tree_size: u64 },
    /// Line `line` of an export holds an anchor that is not its first line.
    MisplacedAnchor { line: u64 },
    /// A segment starts after entry `starts`, but the trail verified so far
    /// ends after entry `reached` (or at the same size, in another state).
    Discontinuity { reached: u64, starts: u64 },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Changed {
                seq,
                evidence: Evidence::LeafHash,
            } => write!(
                f,
                "entry {seq} was changed: its content no longer matches its stored leaf hash"
            ),
            Failure::Changed {
                seq,
                evidence: Evidence::ChainHash,
            } => write!(
                f,
                "entry {seq} was changed: its stored chain hash does not follow from entry {}",
                seq - 1
            ),
            Failure::Removed { first, last } if first == last => {
                write!(f, "entry {first} was removed")
            }
            Failure::Removed { first, last } => {
                write!(f, "entries {first} to {last} were removed")
            }
            Failure::Inserted { seq } => {
                write!(f, "a forged entry was inserted as entry {seq}")
            }
            Failure::Reordered { seq, position } => write!(
                f,
                "entries were reordered: entry {seq} is not in its place but at position {position}"
            ),
            Failure::Truncated {
                last_seq,
                tree_size,
            } => write!(
                f,
                "the trail was truncated: it ends at entry {last_seq} but a signed checkpoint covers {tree_size} entries (entries {} to {tree_size} were removed)",
                last_seq + 1
            ),
            Failure::BadCheckpointSignature { tree_size, error } => write!(
                f,
                "the checkpoint for {tree_size} entries is forged or damaged: {error}"
            ),
            Failure::CheckpointMismatch {
                after,
                upto,
                root,
                chain_head,
            } => {
                let what = match (root, chain_head) {
                    (true, true) => "Merkle root and chain head",
                    (true, false) => "Merkle root",
                    _ => "chain head",
                };
                write!(
                    f,
                    "entries within {} to {upto} were changed and rehashed without the signing key: the signed checkpoint for {upto} entries does not match their {what}",
                    after + 1
                )
            }
            Failure::Unreadable {
                line,
                after_seq,
                error,
            } => write!(f, "line {line} (after entry {after_seq}) cannot be read: {error}"),
            Failure::MisplacedCheckpoint { line, tree_size } => write!(
                f,
                "line {line}: the checkpoint for {tree_size} entries comes after entry {}; exports list checkpoints before the entries they cover",
                tree_size + 1
            ),
            Failure::BadAnchor { tree_size } => write!(
                f,
                "the anchor for {tree_size} entries is damaged: its Merkle frontier does not fit its tree size"
            ),
            Failure::MisplacedAnchor { line } => write!(
                f,
                "line {line}: an anchor is only valid as the first line of an export"
            ),
            Failure::Discontinuity { reached, starts } if starts > reached => write!(
                f,
                "entries {} to {starts} are missing: the trail verified so far ends at entry {reached}, the next segment starts after entry {starts} (an archive file is missing, or entries were removed)",
                reached + 1
            ),
            Failure::Discontinuity { reached, starts } if starts < reached => write!(
                f,
                "segments overlap: the trail verified so far ends at entry {reached}, the next segment starts after entry {starts}"
            ),
            Failure::Discontinuity { reached, .. } => write!(
                f,
                "the next segment does not continue the trail: it starts after entry {reached} from another chain head or Merkle frontier than the entries verified so far"
            ),
        }
    }
}

impl std::error::Error for Failure {}

/// Where the pass stands.
#[derive(Debug, Clone)]
enum State {
    Good,
    /// seq `expected` was missing (`seen` came instead): a removal unless
    /// `expected` turns up later. `resumes`: the first seq in
    /// `expected + 1 .. seen` that turned up later, which ends the removed
    /// range.
    Gap {
        expected: u64,
        seen: u64,
        resumes: Option<u64>,
    },
    /// Entry `seq` does not hold what was hashed for it: `provisional`,
    /// unless a later row holds this seq's original (then a swap).
    Mismatch {
        seq: u64,
        provisional: Failure,
    },
    Failed(Failure),
}

/// The streaming verifier behind [`verify_trail`] and [`verify_export`], for
/// callers that feed entries and checkpoints themselves.
///
/// Add checkpoints before the entries past their tree size are pushed (all
/// of them first is simplest), push entries in trail order, then
/// [`Verifier::finish`].
#[derive(Debug)]
pub struct Verifier {
    keys: TrustedKeys,
    start: u64,
    chain: ChainState,
    tree: Frontier,
    pending: BTreeMap<u64, Vec<Checkpoint>>,
    position: u64,
    checked: u64,
    anchored: u64,
    state: State,
}

impl Verifier {
    /// A verifier that accepts checkpoints of `keys` (one
    /// [`crate::VerifyingKey`] or a [`TrustedKeys`]) and of the keys they
    /// announce.
    pub fn new(keys: impl Into<TrustedKeys>) -> Self {
        Self {
            keys: keys.into(),
            start: 0,
            chain: ChainState::new(),
            tree: Frontier::new(),
            pending: BTreeMap::new(),
            position: 0,
            checked: 0,
            anchored: 0,
            state: State::Good,
        }
    }

    /// A verifier that starts after `anchor.tree_size` entries, from their
    /// chain head and Merkle frontier (see the module doc).
    pub fn resume(keys: impl Into<TrustedKeys>, anchor: &Anchor) -> Result<Self, Failure> {
        let tree = Frontier::from_parts(anchor.tree_size, anchor.frontier.clone()).ok_or(
            Failure::BadAnchor {
                tree_size: anchor.tree_size,
            },
        )?;
        let mut verifier = Self::new(keys);
        verifier.start = anchor.tree_size;
        verifier.chain = ChainState::resume(anchor.tree_size, anchor.chain_head);
        verifier.tree = tree;
        verifier.anchored = anchor.tree_size;
        Ok(verifier)
    }

    /// The trail's state after the last entry that verified.
    pub fn anchor(&self) -> Anchor {
        Anchor {
            tree_size: self.chain.size,
            chain_head: self.chain.head,
            frontier: self.tree.nodes().to_vec(),
        }
    }

    /// The next segment starts at `anchor`: it must be exactly where the
    /// entries verified so far end (else a [`Failure::Discontinuity`]).
    pub fn continue_at(&mut self, anchor: &Anchor) {
        if matches!(self.state, State::Good) && *anchor != self.anchor() {
            self.fail(Failure::Discontinuity {
                reached: self.chain.size,
                starts: anchor.tree_size,
            });
        }
    }

    /// Queue a checkpoint to check when the entries reach its tree size
    /// (identical copies, e.g. from the export and the witness file, count
    /// once). `false` if entries past its tree size were already pushed:
    /// it can no longer be checked in this pass.
    pub fn add_checkpoint(&mut self, checkpoint: Checkpoint) -> bool {
        if !matches!(self.state, State::Good) {
            return true; // a failure is already being reported
        }
        if checkpoint.tree_size < self.chain.size {
            return false;
        }
        let queue = self.pending.entry(checkpoint.tree_size).or_default();
        if !queue.contains(&checkpoint) {
            queue.push(checkpoint);
        }
        true
    }

    /// The keys trusted so far (the given ones and those announced by the
    /// checkpoints verified so far).
    pub fn keys(&self) -> &TrustedKeys {
        &self.keys
    }

    /// Entries read so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Seq of the last entry that verified.
    pub fn last_good_seq(&self) -> u64 {
        self.chain.size
    }

    /// Whether the outcome is known: pushing more entries changes nothing.
    pub fn is_settled(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    /// Whether a failure was found (its kind may still be refined).
    pub fn has_failed(&self) -> bool {
        !matches!(self.state, State::Good)
    }

    /// Check the next entry.
    pub fn push(&mut self, entry: &ChainedEvent) {
        self.position += 1;
        match self.state {
            State::Failed(_) => {}
            State::Gap {
                expected,
                seen,
                ref mut resumes,
            } => {
                if entry.seq == expected {
                    self.fail(Failure::Reordered {
                        seq: expected,
                        position: self.position,
                    });
                } else if entry.seq > expected && entry.seq < seen {
                    *resumes = Some(resumes.map_or(entry.seq, |r| r.min(entry.seq)));
                }
            }
            State::Mismatch { seq, .. } => {
                if entry.seq != seq && leaf_hash(seq, &entry.event) == entry.leaf_hash {
                    self.fail(Failure::Reordered {
                        seq,
                        position: self.position,
                    });
                }
            }
            State::Good => {
                if let Err(failure) = self.check_entry(entry) {
                    self.state = failure;
                }
            }
        }
    }

    /// Whether `entry`, the one after the last good one, shows that the
    /// last good one was a forged insertion: it repeats its seq, or carries
    /// the leaf hash of the seq before its own (renumbered to make room).
    /// `leaf` is the entry's leaf hash recomputed for its own seq.
    fn inserted_before(&self, entry: &ChainedEvent, leaf: &[u8; 32]) -> Option<Failure> {
        let expected = self.chain.size + 1;
        let seq = entry.seq;
        if seq < expected {
            return Some(Failure::Inserted { seq });
        }
        let renumbered = seq == expected
            && seq > 1
            && *leaf != entry.leaf_hash
            && leaf_hash(seq - 1, &entry.event) == entry.leaf_hash;
        renumbered.then_some(Failure::Inserted { seq: seq - 1 })
    }

    fn fail(&mut self, failure: Failure) {
        self.state = State::Failed(failure);
    }

    fn check_entry(&mut self, entry: &ChainedEvent) -> Result<(), State> {
        let seq = entry.seq;
        let leaf = leaf_hash(seq, &entry.event);
        // Checkpoints at the current size must be checked before the tree
        // moves past it. One that does not match may be explained by this
        // entry (the last one it covers was a forged insertion): then the
        // insertion is the more precise report.
        let checkpoints = self.check_checkpoints_at_current_size();
        match (checkpoints, self.inserted_before(entry, &leaf)) {
            (Err(forged @ Failure::BadCheckpointSignature { .. }), _) => {
                return Err(State::Failed(forged))
            }
            (_, Some(inserted)) => return Err(State::Failed(inserted)),
            (Err(failure), None) => return Err(State::Failed(failure)),
            (Ok(()), None) => {}
        }
        let expected = self.chain.size + 1;
        if seq > expected {
            return Err(State::Gap {
                expected,
                seen: seq,
                resumes: None,
            });
        }
        if leaf != entry.leaf_hash {
            // (A row holding entry seq - 1 was handled above.) A row holding
            // entry seq + 1: entry seq was removed and the rest renumbered,
            // or the two were swapped (then entry seq turns up next).
            let provisional = if leaf_hash(seq + 1, &entry.event) == entry.leaf_hash {
                Failure::Removed {
                    first: seq,
                    last: seq,
                }
            } else {
                Failure::Changed {
                    seq,
                    evidence: Evidence::LeafHash,
                }
            };
            return Err(State::Mismatch { seq, provisional });
        }
        let chain = chain_hash(&self.chain.head, &leaf);
        if chain != entry.chain_hash {
            return Err(State::Failed(Failure::Changed {
                seq,
                evidence: Evidence::ChainHash,
            }));
        }
        self.chain = ChainState::resume(seq, chain);
        self.tree.push(leaf);
        Ok(())
    }

    fn check_checkpoints_at_current_size(&mut self) -> Result<(), Failure> {
        let size = self.chain.size;
        match self.pending.first_key_value() {
            Some((&first, _)) if first == size => {}
            _ => return Ok(()),
        }
        let Some(mut due) = self.pending.remove(&size) else {
            return Ok(());
        };
        let root = self.tree.root();
        while !due.is_empty() {
            // Checkpoints of keys already trusted first: one of them may
            // announce the key of another.
            let next = due
                .iter()
                .position(|c| self.keys.get(&c.key_id).is_some())
                .unwrap_or(0);
            let checkpoint = due.remove(next);
            self.keys
                .verify(&checkpoint)
                .map_err(|error| Failure::BadCheckpointSignature {
                    tree_size: size,
                    error,
                })?;
            let root_differs = checkpoint.root != root;
            let chain_differs = checkpoint.chain_head != self.chain.head;
            if root_differs || chain_differs {
                return Err(Failure::CheckpointMismatch {
                    after: self.anchored,
                    upto: size,
                    root: root_differs,
                    chain_head: chain_differs,
                });
            }
            self.keys.accept(&checkpoint);
            self.checked += 1;
        }
        self.anchored = size;
        Ok(())
    }

    /// The verdict, once every entry was pushed.
    pub fn finish(mut self) -> Result<Report, Failure> {
        match std::mem::replace(&mut self.state, State::Good) {
            State::Failed(failure) => return Err(failure),
            State::Gap {
                expected,
                seen,
                resumes,
            } => {
                return Err(Failure::Removed {
                    first: expected,
                    last: resumes.unwrap_or(seen) - 1,
                })
            }
            State::Mismatch { provisional, .. } => return Err(provisional),
            State::Good => {}
        }
        self.check_checkpoints_at_current_size()?;
        // Whatever is left claims more entries than there are.
        let last_seq = self.chain.size;
        let mut first_bad = None;
        let mut longest_valid = None;
        for checkpoint in self.pending.values().flatten() {
            match self.keys.verify(checkpoint) {
                Ok(()) => longest_valid = Some(checkpoint.tree_size),
                Err(error) => {
                    first_bad.get_or_insert(Failure::BadCheckpointSignature {
                        tree_size: checkpoint.tree_size,
                        error,
                    });
                }
            }
        }
        if let Some(tree_size) = longest_valid {
            return Err(Failure::Truncated {
                last_seq,
                tree_size,
            });
        }
        if let Some(failure) = first_bad {
            return Err(failure);
        }
        let end = self.anchor();
        Ok(Report {
            handovers: self.keys.handovers().to_vec(),
            start: self.start,
            end,
            entries: self.position,
            checkpoints: self.checked,
            last_seq,
            root: self.tree.root(),
            chain_head: self.chain.head,
            anchored: self.anchored,
        })
    }
}

/// Verify a trail: `entries` in trail order (an iterator of any length,
/// owned or borrowed), `checkpoints` in any order.
pub fn verify_trail<I, C>(
    entries: I,
    checkpoints: C,
    keys: impl Into<TrustedKeys>,
) -> Result<Report, Failure>
where
    I: IntoIterator,
    I::Item: Borrow<ChainedEvent>,
    C: IntoIterator<Item = Checkpoint>,
{
    let mut verifier = Verifier::new(keys);
    for checkpoint in checkpoints {
        verifier.add_checkpoint(checkpoint);
    }
    for entry in entries {
        verifier.push(entry.borrow());
        if verifier.is_settled() {
            break;
        }
    }
    verifier.finish()
}

/// Verify an export read as JSON Lines (see [`crate::export`]), plus any
/// `extra` checkpoints (e.g. from the external witness file), in one pass.
pub fn verify_export<R, C>(
    input: R,
    extra: C,
    keys: impl Into<TrustedKeys>,
) -> Result<Report, Failure>
where
    R: BufRead,
    C: IntoIterator<Item = Checkpoint>,
{
    let keys = keys.into();
    let mut reader = ExportReader::new(input);
    let mut first = reader.next();
    let mut verifier = match &first {
        Some(Ok(Record::Anchor(anchor))) => {
            let verifier = Verifier::resume(keys, anchor)?;
            first = None;
            verifier
        }
        _ => Verifier::new(keys),
    };
    for checkpoint in extra {
        verifier.add_checkpoint(checkpoint);
    }
    while let Some(record) = first.take().or_else(|| reader.next()) {
        match record {
            Ok(Record::Entry(entry)) => {
                verifier.push(&entry);
                if verifier.is_settled() {
                    break;
                }
            }
            Ok(Record::Checkpoint(checkpoint)) => {
                let tree_size = checkpoint.tree_size;
                if !verifier.add_checkpoint(checkpoint) {
                    return Err(Failure::MisplacedCheckpoint {
                        line: reader.line(),
                        tree_size,
                    });
                }
            }
            Ok(Record::Anchor(_)) => {
                return Err(Failure::MisplacedAnchor {
                    line: reader.line(),
                })
            }
            // An earlier failure comes first; else the bad line is it.
            Err(_) if verifier.has_failed() => break,
            Err(e) => {
                return Err(Failure::Unreadable {
                    line: e.line,
                    after_seq: verifier.last_good_seq(),
                    error: e.error,
                })
            }
        }
    }
    verifier.finish()
}
