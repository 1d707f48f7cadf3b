//! The hash chain: each entry's leaf hash, and a running chain hash that
//! links every entry to all entries before it.
//!
//! Entries are numbered `seq` = 1, 2, 3, ... without gaps, in chain order.
//!
//! - Leaf hash (RFC 6962 leaf, also the Merkle tree's leaf):
//!   `SHA-256(0x00 || "cardvault/audit-leaf/v1" || seq as u64 big-endian || event.canonical_bytes())`.
//! - Chain hash: `SHA-256("cardvault/audit-chain/v1" || previous chain hash || leaf hash)`,
//!   starting from 32 zero bytes before entry 1.
//!
//! [`ChainState`] is the chain alone (what the store needs per row);
//! [`Trail`] is the chain plus the Merkle [`Frontier`], which is what a
//! checkpoint signs; [`Anchor`] is a trail's state written down, where an
//! archive segment or a partial export starts.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::checkpoint::{Checkpoint, SigningKey};
use crate::merkle::Frontier;
use crate::{Action, AuditEvent, Outcome};

/// Domain tag inside every leaf's data.
pub const LEAF_TAG: &[u8] = b"cardvault/audit-leaf/v1";
/// Domain tag of every chain hash.
pub const CHAIN_TAG: &[u8] = b"cardvault/audit-chain/v1";
/// The chain hash "before" entry 1.
pub const GENESIS: [u8; 32] = [0; 32];

/// RFC 6962 leaf hash of entry `seq`: `SHA-256(0x00 || leaf data)`, leaf data
/// = [`LEAF_TAG`] || `seq` (u64 big-endian) || [`AuditEvent::canonical_bytes`].
pub fn leaf_hash(seq: u64, event: &AuditEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(LEAF_TAG);
    h.update(seq.to_be_bytes());
    h.update(event.canonical_bytes());
    h.finalize().into()
}

/// The chain hash after an entry: `SHA-256(CHAIN_TAG || prev || leaf)`.
pub fn chain_hash(prev: &[u8; 32], leaf: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_TAG);
    h.update(prev);
    h.update(leaf);
    h.finalize().into()
}

/// An entry as the store keeps it: the event, its place in the chain, and
/// the two hashes computed when it was appended.
///
/// JSON (one line in exports, inside a tagged record): `{"seq":N,"event":{..},
/// "leaf_hash":"<64 hex>","chain_hash":"<64 hex>"}`, the event in its own
/// serde form. Reading is strict: unknown or missing fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainedEvent {
    pub seq: u64,
    #[serde(deserialize_with = "strict_event")]
    pub event: AuditEvent,
    #[serde(with = "crate::hex::array")]
    pub leaf_hash: [u8; 32],
    #[serde(with = "crate::hex::array")]
    pub chain_hash: [u8; 32],
}

/// The chain's state after some number of entries: what the next entry
/// links to. `Copy`, so a store can compute the next row on a copy and keep
/// it only once the row is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState {
    /// Number of entries so far (= seq of the last one).
    pub size: u64,
    /// Chain hash of the last entry ([`GENESIS`] when empty).
    pub head: [u8; 32],
}

impl Default for ChainState {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainState {
    /// The empty chain.
    pub const fn new() -> Self {
        Self {
            size: 0,
            head: GENESIS,
        }
    }

    /// Resume after the last stored entry (its seq and chain hash).
    pub const fn resume(size: u64, head: [u8; 32]) -> Self {
        Self { size, head }
    }

    /// Append an event: number it, hash it, link it.
    pub fn append(&mut self, event: AuditEvent) -> ChainedEvent {
        let seq = self.size + 1;
        let leaf = leaf_hash(seq, &event);
        let chain = chain_hash(&self.head, &leaf);
        self.size = seq;
        self.head = chain;
        ChainedEvent {
            seq,
            event,
            leaf_hash: leaf,
            chain_hash: chain,
        }
    }
}

/// The state of the trail after `tree_size` entries, written down: the
/// chain head and the Merkle frontier. It is all a verifier needs to go on
/// from entry `tree_size + 1` without the entries before it, which is how
/// an archived segment (or a partial export) verifies on its own.
///
/// An anchor proves nothing by itself: it is checked by the first signed
/// checkpoint at or after `tree_size`, whose root and chain head it must
/// lead to (a forged anchor cannot, without a hash collision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub tree_size: u64,
    #[serde(with = "crate::hex::array")]
    pub chain_head: [u8; 32],
    /// [`Frontier::nodes`]: one node per set bit of `tree_size`.
    #[serde(with = "crate::hex::array_vec")]
    pub frontier: Vec<[u8; 32]>,
}

impl Anchor {
    /// The state before entry 1.
    pub fn genesis() -> Self {
        Self {
            tree_size: 0,
            chain_head: GENESIS,
            frontier: Vec::new(),
        }
    }

    /// The trail this anchor describes (`None` if the frontier does not
    /// have one node per set bit of `tree_size`).
    pub fn trail(&self) -> Option<Trail> {
        let tree = Frontier::from_parts(self.tree_size, self.frontier.clone())?;
        Trail::resume(ChainState::resume(self.tree_size, self.chain_head), tree)
    }

    /// The Merkle root at `tree_size` (`None` as for [`Anchor::trail`]).
    pub fn root(&self) -> Option<[u8; 32]> {
        Frontier::from_parts(self.tree_size, self.frontier.clone()).map(|t| t.root())
    }
}

/// The writer's side of the whole trail: chain plus Merkle tree, enough to
/// append entries and sign checkpoints, in O(log n) memory.
#[derive(Debug, Clone, Default)]
pub struct Trail {
    chain: ChainState,
    tree: Frontier,
}

impl Trail {
    /// The empty trail.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resume from a saved chain state and Merkle frontier of the same size
    /// (`None` if the sizes differ).
    pub fn resume(chain: ChainState, tree: Frontier) -> Option<Self> {
        (chain.size == tree.size()).then_some(Self { chain, tree })
    }

    /// Append an event; the returned entry is what the store keeps.
    pub fn append(&mut self, event: AuditEvent) -> ChainedEvent {
        let entry = self.chain.append(event);
        self.tree.push(entry.leaf_hash);
        entry
    }

    /// Append an entry that was chained elsewhere (e.g. read back from the
    /// store on start-up) after checking that it follows: `false`, and
    /// nothing changes, if its seq, leaf hash or chain hash do not.
    pub fn append_chained(&mut self, entry: &ChainedEvent) -> bool {
        let follows = entry.seq == self.chain.size + 1
            && entry.leaf_hash == leaf_hash(entry.seq, &entry.event)
            && entry.chain_hash == chain_hash(&self.chain.head, &entry.leaf_hash);
        if follows {
            self.chain = ChainState::resume(entry.seq, entry.chain_hash);
            self.tree.push(entry.leaf_hash);
        }
        follows
    }

    /// Number of entries.
    pub fn size(&self) -> u64 {
        self.chain.size
    }

    /// The chain state (size and head).
    pub fn chain(&self) -> ChainState {
        self.chain
    }

    /// The Merkle frontier (to save next to a checkpoint).
    pub fn tree(&self) -> &Frontier {
        &self.tree
    }

    /// Merkle root of all entries.
    pub fn root(&self) -> [u8; 32] {
        self.tree.root()
    }

    /// The trail's state as an [`Anchor`].
    pub fn anchor(&self) -> Anchor {
        Anchor {
            tree_size: self.chain.size,
            chain_head: self.chain.head,
            frontier: self.tree.nodes().to_vec(),
        }
    }

    /// A signed checkpoint of the trail as it is now.
    pub fn checkpoint(&self, key: &SigningKey, time: OffsetDateTime) -> Checkpoint {
        key.sign_checkpoint(self.chain.size, self.tree.root(), self.chain.head, time)
    }

    /// A key announcement of the trail as it is now: a checkpoint signed by
    /// `key` that names `next`, the key signing every later checkpoint.
    pub fn announce(
        &self,
        key: &SigningKey,
        time: OffsetDateTime,
        next: &crate::checkpoint::VerifyingKey,
    ) -> Checkpoint {
        key.sign_announcement(
            self.chain.size,
            self.tree.root(),
            self.chain.head,
            time,
            next,
        )
    }
}

/// Deserialize an [`AuditEvent`] strictly: every field present (absent ones
/// as `null`), no unknown ones. The event's own `Deserialize` is lenient
/// (a missing optional field reads as `None`), which would let a renamed
/// key in an export go unnoticed when the value was `null` anyway.
fn strict_event<'de, D: serde::Deserializer<'de>>(d: D) -> Result<AuditEvent, D::Error> {
    let e = StrictEvent::deserialize(d)?;
    Ok(AuditEvent {
        time: e.time,
        principal: e.principal,
        source: e.source,
        action: e.action,
        tenant: e.tenant,
        token: e.token,
        outcome: e.outcome,
        error_code: e.error_code,
        request_id: e.request_id,
        reason: e.reason,
        detail: e.detail,
    })
}

/// Mirror of [`AuditEvent`] for [`strict_event`]. A field with
/// `deserialize_with` is required even when it is an `Option`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictEvent {
    #[serde(with = "time::serde::rfc3339")]
    time: OffsetDateTime,
    #[serde(deserialize_with = "Option::deserialize")]
    principal: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    source: Option<String>,
    action: Action,
    #[serde(deserialize_with = "Option::deserialize")]
    tenant: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    token: Option<String>,
    outcome: Outcome,
    #[serde(deserialize_with = "Option::deserialize")]
    error_code: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    request_id: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    reason: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    detail: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use time::macros::datetime;

    fn event(n: u32) -> AuditEvent {
        let mut e = AuditEvent::new(Action::Detokenize, Outcome::Success)
            .tenant("acme")
            .token(format!("tok_{n}"))
            .reason("chargeback");
        e.time = datetime!(2025-03-01 12:00:00 UTC);
        e
    }

    #[test]
    fn leaf_hash_is_the_rfc6962_leaf_of_the_documented_bytes() {
        let e = event(1);
        let mut data = vec![0x00];
        data.extend_from_slice(b"cardvault/audit-leaf/v1");
        data.extend_from_slice(&7u64.to_be_bytes());
        data.extend_from_slice(&e.canonical_bytes());
        let expected: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(leaf_hash(7, &e), expected);
        assert_ne!(leaf_hash(8, &e), expected, "seq is bound");
        let mut chain_input = b"cardvault/audit-chain/v1".to_vec();
        chain_input.extend_from_slice(&[0; 32]);
        chain_input.extend_from_slice(&expected);
        let chained: [u8; 32] = Sha256::digest(&chain_input).into();
        assert_eq!(chain_hash(&GENESIS, &expected), chained);
    }

    #[test]
    fn chain_appends_and_resumes() {
        let mut chain = ChainState::new();
        let first = chain.append(event(1));
        assert_eq!(first.seq, 1);
        assert_eq!(first.chain_hash, chain_hash(&GENESIS, &first.leaf_hash));
        let mut resumed = ChainState::resume(chain.size, chain.head);
        let second = chain.append(event(2));
        assert_eq!(resumed.append(event(2)), second);
        assert_eq!(second.seq, 2);
        assert_eq!(
            second.chain_hash,
            chain_hash(&first.chain_hash, &second.leaf_hash)
        );
    }

    #[test]
    fn trail_replays_stored_entries() {
        let mut trail = Trail::new();
        let entries: Vec<_> = (0..5).map(|n| trail.append(event(n))).collect();
        let mut replay = Trail::new();
        assert!(entries.iter().all(|e| replay.append_chained(e)));
        assert_eq!(replay.root(), trail.root());
        assert_eq!(replay.chain(), trail.chain());
        assert!(
            !replay.append_chained(&entries[4]),
            "a repeat does not follow"
        );
        let resumed = Trail::resume(trail.chain(), trail.tree().clone()).unwrap();
        assert_eq!(resumed.root(), trail.root());
        assert!(Trail::resume(ChainState::new(), trail.tree().clone()).is_none());
    }

    #[test]
    fn strict_json() {
        let entry = ChainState::new().append(event(1));
        let json = serde_json::to_string(&entry).unwrap();
        assert_eq!(serde_json::from_str::<ChainedEvent>(&json).unwrap(), entry);
        let missing = json
            .replace(r#""detail":null,"#, "")
            .replace(r#","detail":null"#, "");
        assert_ne!(missing, json);
        assert!(serde_json::from_str::<ChainedEvent>(&missing).is_err());
        let renamed = json.replace(r#""detail":null"#, r#""detaim":null"#);
        assert!(serde_json::from_str::<ChainedEvent>(&renamed).is_err());
    }
}
