//! The tamper matrix and the property tests of the verifier: a generated
//! trail, one kind of tampering at a time, detected and located.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::chain::{chain_hash, leaf_hash, Anchor, ChainState, ChainedEvent, Trail, GENESIS};
use crate::checkpoint::{Checkpoint, CheckpointError, SigningKey};
use crate::export::{checkpoint_line, entry_line, write_export, LineError};
use crate::proof::{EntryProof, ProofError};
use crate::verify::{verify_export, verify_trail, Evidence, Failure, Report, Verifier};
use crate::{Action, AuditEvent, Outcome};

const ACTIONS: [Action; 6] = [
    Action::Tokenize,
    Action::Detokenize,
    Action::MetadataRead,
    Action::Delete,
    Action::AuthenticationFailed,
    Action::AuthorizationDenied,
];
const OUTCOMES: [Outcome; 3] = [Outcome::Success, Outcome::Denied, Outcome::Failure];
const BASE: OffsetDateTime = datetime!(2025-05-01 08:00:00 UTC);

fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(ACTIONS[(i % 6) as usize], OUTCOMES[(i % 3) as usize])
        .principal(format!("svc-{}", i % 4))
        .source("10.0.0.7:51234")
        .tenant(format!("tenant-{}", i % 3))
        .token(format!("tok_{:032x}", i * 7919))
        .request_id(format!("req-{i}"));
    if i.is_multiple_of(5) {
        e = e.reason("chargeback review");
    }
    e.time = BASE + Duration::milliseconds(i as i64 * 1500);
    e
}

struct Fixture {
    key: SigningKey,
    entries: Vec<ChainedEvent>,
    checkpoints: Vec<Checkpoint>,
}

impl Fixture {
    /// Chain `events`, checkpoint every `every` entries and, if `at_end`,
    /// after the last one.
    fn build(events: Vec<AuditEvent>, every: u64, at_end: bool) -> Self {
        let key = SigningKey::generate().unwrap();
        let mut trail = Trail::new();
        let mut entries = Vec::new();
        let mut checkpoints = Vec::new();
        for e in events {
            entries.push(trail.append(e));
            if trail.size().is_multiple_of(every) {
                checkpoints.push(trail.checkpoint(&key, BASE + Duration::hours(1)));
            }
        }
        if at_end && !trail.size().is_multiple_of(every) {
            checkpoints.push(trail.checkpoint(&key, BASE + Duration::hours(2)));
        }
        Self {
            key,
            entries,
            checkpoints,
        }
    }

    /// 330 entries, checkpoints at 50, 100, ..., 300 and 330.
    fn standard() -> Self {
        Self::build((1..=330).map(event).collect(), 50, true)
    }

    fn verify(&self) -> Result<Report, Failure> {
        self.verify_entries(&self.entries)
    }

    fn verify_entries(&self, entries: &[ChainedEvent]) -> Result<Report, Failure> {
        verify_trail(
            entries,
            self.checkpoints.iter().cloned(),
            &self.key.verifying_key(),
        )
    }
}

/// Index in the entry list of entry `seq`.
fn at(seq: u64) -> usize {
    (seq - 1) as usize
}

/// A forged entry at `seq` that chains correctly from `prev` (anyone can
/// compute hashes; only checkpoints need the key).
fn forged(seq: u64, prev: &[u8; 32]) -> ChainedEvent {
    let mut chain = ChainState::resume(seq - 1, *prev);
    let mut e = AuditEvent::new(Action::Detokenize, Outcome::Success)
        .principal("intruder")
        .tenant("tenant-1")
        .token("tok_forged")
        .reason("nothing to see");
    e.time = BASE;
    chain.append(e)
}

/// Recompute seq, leaf and chain hashes of `entries[from..]` from the entry
/// before: what an attacker without the signing key can do.
fn rehash_from(entries: &mut [ChainedEvent], from: usize) {
    let prev = if from == 0 {
        GENESIS
    } else {
        entries[from - 1].chain_hash
    };
    let mut chain = ChainState::resume(from as u64, prev);
    for e in &mut entries[from..] {
        *e = chain.append(e.event.clone());
    }
}

fn expect(result: Result<Report, Failure>, failure: Failure) {
    match result {
        Ok(report) => panic!("not detected: {report}; expected {failure}"),
        Err(got) => assert_eq!(got, failure, "{got}"),
    }
}

#[test]
fn untouched_trail_verifies() {
    let f = Fixture::standard();
    let report = f.verify().unwrap();
    let mut trail = Trail::new();
    f.entries
        .iter()
        .for_each(|e| assert!(trail.append_chained(e)));
    assert_eq!(
        report,
        Report {
            start: 0,
            entries: 330,
            checkpoints: 7,
            last_seq: 330,
            root: trail.root(),
            chain_head: trail.chain().head,
            anchored: 330,
            end: trail.anchor(),
            handovers: vec![],
        }
    );
    assert!(report
        .to_string()
        .starts_with("OK: 330 entries and 7 checkpoints verified"));
    // Checkpoints in any order, duplicates counted once.
    let mut cps = f.checkpoints.clone();
    cps.reverse();
    cps.extend(f.checkpoints.iter().cloned());
    let again = verify_trail(&f.entries, cps, &f.key.verifying_key()).unwrap();
    assert_eq!(again, report);
    // Owned iterator input, e.g. straight from a database cursor.
    let owned = verify_trail(
        f.entries.clone(),
        f.checkpoints.clone(),
        f.key.verifying_key(),
    );
    assert_eq!(owned.unwrap(), report);
}

#[test]
fn empty_trail_and_trail_without_checkpoints() {
    let key = SigningKey::generate().unwrap().verifying_key();
    let report = verify_trail(Vec::<ChainedEvent>::new(), vec![], &key).unwrap();
    assert_eq!((report.entries, report.last_seq), (0, 0));
    assert_eq!(report.root, crate::merkle::empty_root());
    let f = Fixture::build((1..=10).map(event).collect(), 100, false);
    let report = f.verify().unwrap();
    assert_eq!(
        (report.entries, report.checkpoints, report.anchored),
        (10, 0, 0)
    );
    assert!(report.to_string().contains("WARNING: no signed checkpoint"));
}

#[test]
fn change_one_byte_of_one_entry() {
    let f = Fixture::standard();
    let changed = Failure::Changed {
        seq: 123,
        evidence: Evidence::LeafHash,
    };
    let mut cases: Vec<(Vec<ChainedEvent>, Failure)> = Vec::new();

    let mut entries = f.entries.clone();
    entries[at(123)].event.tenant = Some("tenant-9".into()); // one character
    cases.push((entries, changed.clone()));

    let mut entries = f.entries.clone();
    entries[at(123)].event.time += Duration::nanoseconds(1);
    cases.push((entries, changed.clone()));

    let mut entries = f.entries.clone();
    entries[at(123)].event.outcome = Outcome::Denied; // was Success
    assert_ne!(entries[at(123)], f.entries[at(123)]);
    cases.push((entries, changed.clone()));

    let mut entries = f.entries.clone();
    entries[at(123)].leaf_hash[7] ^= 0x01;
    cases.push((entries, changed.clone()));

    let mut entries = f.entries.clone();
    entries[at(123)].chain_hash[31] ^= 0x80;
    let chain_changed = Failure::Changed {
        seq: 123,
        evidence: Evidence::ChainHash,
    };
    cases.push((entries, chain_changed.clone()));

    // Event and its leaf rehashed, the chain hash left alone.
    let mut entries = f.entries.clone();
    entries[at(123)].event.reason = Some("other".into());
    entries[at(123)].leaf_hash = leaf_hash(123, &entries[at(123)].event);
    cases.push((entries, chain_changed));

    for (entries, failure) in cases {
        expect(f.verify_entries(&entries), failure);
    }
    assert_eq!(
        changed.to_string(),
        "entry 123 was changed: its content no longer matches its stored leaf hash"
    );
}

#[test]
fn delete_an_entry() {
    let f = Fixture::standard();
    let removed = Failure::Removed {
        first: 123,
        last: 123,
    };
    let mut entries = f.entries.clone();
    entries.remove(at(123));
    expect(f.verify_entries(&entries), removed.clone());

    // Several in a row.
    let mut entries = f.entries.clone();
    entries.drain(at(123)..at(126));
    expect(
        f.verify_entries(&entries),
        Failure::Removed {
            first: 123,
            last: 125,
        },
    );

    // Later entries renumbered to close the gap, hashes left as they were.
    let mut entries = f.entries.clone();
    entries.remove(at(123));
    entries[at(123)..].iter_mut().for_each(|e| e.seq -= 1);
    expect(f.verify_entries(&entries), removed.clone());

    // The very first entry.
    let mut entries = f.entries.clone();
    entries.remove(0);
    expect(
        f.verify_entries(&entries),
        Failure::Removed { first: 1, last: 1 },
    );
    assert_eq!(removed.to_string(), "entry 123 was removed");
}

#[test]
fn insert_a_forged_entry() {
    let f = Fixture::standard();
    let inserted = Failure::Inserted { seq: 124 };
    // A second entry 124, chained after 123: the real 124 then repeats a seq.
    let mut entries = f.entries.clone();
    entries.insert(at(124), forged(124, &f.entries[at(123)].chain_hash));
    expect(f.verify_entries(&entries), inserted.clone());

    // The forged entry renumbers the rest (their hashes untouched).
    let mut entries = f.entries.clone();
    entries.insert(at(124), forged(124, &f.entries[at(123)].chain_hash));
    entries[at(125)..].iter_mut().for_each(|e| e.seq += 1);
    expect(f.verify_entries(&entries), inserted.clone());

    // A forged copy of an old seq slipped in later.
    let mut entries = f.entries.clone();
    entries.insert(at(200), forged(150, &f.entries[at(149)].chain_hash));
    expect(f.verify_entries(&entries), Failure::Inserted { seq: 150 });
    assert_eq!(
        inserted.to_string(),
        "a forged entry was inserted as entry 124"
    );
}

#[test]
fn swap_two_entries() {
    let f = Fixture::standard();
    // Rows swapped whole (seq travels with the row), adjacent and far apart.
    let mut entries = f.entries.clone();
    entries.swap(at(100), at(101));
    expect(
        f.verify_entries(&entries),
        Failure::Reordered {
            seq: 100,
            position: 101,
        },
    );
    let mut entries = f.entries.clone();
    entries.swap(at(100), at(140));
    expect(
        f.verify_entries(&entries),
        Failure::Reordered {
            seq: 100,
            position: 140,
        },
    );
    // Contents (event and hashes) swapped, seq left in place: what swapping
    // the other columns of two database rows does.
    for other in [101, 140] {
        let mut entries = f.entries.clone();
        let (a, b) = (entries[at(100)].clone(), entries[at(other)].clone());
        entries[at(100)] = ChainedEvent { seq: 100, ..b };
        entries[at(other)] = ChainedEvent { seq: other, ..a };
        expect(
            f.verify_entries(&entries),
            Failure::Reordered {
                seq: 100,
                position: other,
            },
        );
    }
}

#[test]
fn truncate_the_tail() {
    let f = Fixture::standard();
    for keep in [329, 310, 300, 1, 0] {
        let entries = &f.entries[..keep];
        expect(
            f.verify_entries(entries),
            Failure::Truncated {
                last_seq: keep as u64,
                tree_size: 330,
            },
        );
    }
    let text = Failure::Truncated {
        last_seq: 310,
        tree_size: 330,
    }
    .to_string();
    assert!(text.contains("entries 311 to 330 were removed"), "{text}");
}

#[test]
fn truncation_after_the_last_checkpoint_is_the_known_limit() {
    let f = Fixture::build((1..=335).map(event).collect(), 50, false);
    let full = f.verify().unwrap();
    assert_eq!((full.anchored, full.last_seq), (300, 335));
    assert!(full
        .to_string()
        .contains("entries 301 to 335 are not yet covered by a signed checkpoint"));
    let cut = f.verify_entries(&f.entries[..320]).unwrap();
    assert_eq!((cut.anchored, cut.last_seq), (300, 320));
}

#[test]
fn rebuild_the_whole_chain_without_the_signing_key() {
    let f = Fixture::standard();
    let mut entries = f.entries.clone();
    entries[at(123)].event.reason = Some("rewritten".into());
    rehash_from(&mut entries, 0);
    let failure = Failure::CheckpointMismatch {
        after: 100,
        upto: 150,
        root: true,
        chain_head: true,
    };
    expect(f.verify_entries(&entries), failure.clone());
    let text = failure.to_string();
    assert!(
        text.starts_with("entries within 101 to 150 were changed"),
        "{text}"
    );

    // Rewritten before the first checkpoint: located in 1..=50.
    let mut entries = f.entries.clone();
    entries[at(7)].event.tenant = None;
    rehash_from(&mut entries, at(7));
    expect(
        f.verify_entries(&entries),
        Failure::CheckpointMismatch {
            after: 0,
            upto: 50,
            root: true,
            chain_head: true,
        },
    );

    // An entry removed, the rest renumbered and rehashed, and a forged one
    // appended to keep the count.
    let mut entries = f.entries.clone();
    entries.remove(at(305));
    entries.push(forged(330, &[0; 32]));
    rehash_from(&mut entries, at(305));
    expect(
        f.verify_entries(&entries),
        Failure::CheckpointMismatch {
            after: 300,
            upto: 330,
            root: true,
            chain_head: true,
        },
    );
}

#[test]
fn forged_checkpoints_are_refused() {
    let f = Fixture::standard();
    let mut entries = f.entries.clone();
    entries[at(123)].event.reason = Some("rewritten".into());
    rehash_from(&mut entries, 0);
    let attacker = SigningKey::generate().unwrap();
    let mut trail = Trail::new();
    let mut forged_cps = Vec::new();
    for e in &entries {
        assert!(trail.append_chained(e));
        if trail.size().is_multiple_of(50) || trail.size() == 330 {
            forged_cps.push(trail.checkpoint(&attacker, BASE));
        }
    }
    // Signed by another key.
    let result = verify_trail(&entries, forged_cps.clone(), &f.key.verifying_key());
    expect(
        result,
        Failure::BadCheckpointSignature {
            tree_size: 50,
            error: CheckpointError::UnknownKey {
                key_id: attacker.key_id().to_string(),
            },
        },
    );
    // Claiming the real key's id.
    let relabelled: Vec<_> = forged_cps
        .into_iter()
        .map(|mut c| {
            c.key_id = f.key.key_id().to_string();
            c
        })
        .collect();
    let result = verify_trail(&entries, relabelled, &f.key.verifying_key());
    expect(
        result,
        Failure::BadCheckpointSignature {
            tree_size: 50,
            error: CheckpointError::BadSignature,
        },
    );
    // A genuine checkpoint edited.
    let mut cps = f.checkpoints.clone();
    cps[3].root[0] ^= 1;
    let result = verify_trail(&f.entries, cps, &f.key.verifying_key());
    expect(
        result,
        Failure::BadCheckpointSignature {
            tree_size: 200,
            error: CheckpointError::BadSignature,
        },
    );
    // A forged checkpoint beyond the end is not evidence of truncation.
    let mut cps = f.checkpoints.clone();
    let mut far = cps[6].clone();
    far.tree_size = 1000;
    cps.push(far);
    let result = verify_trail(&f.entries, cps, &f.key.verifying_key());
    expect(
        result,
        Failure::BadCheckpointSignature {
            tree_size: 1000,
            error: CheckpointError::BadSignature,
        },
    );
}

#[test]
fn the_first_failure_is_reported() {
    let f = Fixture::standard();
    let mut entries = f.entries.clone();
    entries[at(200)].leaf_hash[0] ^= 1;
    entries.remove(at(80));
    expect(
        f.verify_entries(&entries),
        Failure::Removed {
            first: 80,
            last: 80,
        },
    );
}

fn export(f: &Fixture, entries: &[ChainedEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    write_export(&mut out, &Anchor::genesis(), &f.checkpoints, entries).unwrap();
    out
}

#[test]
fn export_verifies_and_locates_like_the_trail() {
    let f = Fixture::standard();
    let key = f.key.verifying_key();
    let text = export(&f, &f.entries);
    let report = verify_export(&text[..], vec![], &key).unwrap();
    assert_eq!(report, f.verify().unwrap());

    // Interleaved layout: each checkpoint right after the entry it reaches.
    let mut interleaved = String::new();
    let mut cps = f.checkpoints.iter().peekable();
    for e in &f.entries {
        interleaved += &(entry_line(e).unwrap() + "\n");
        while let Some(c) = cps.next_if(|c| c.tree_size == e.seq) {
            interleaved += &(checkpoint_line(c).unwrap() + "\n");
        }
    }
    assert_eq!(
        verify_export(interleaved.as_bytes(), vec![], &key).unwrap(),
        report
    );

    // Checkpoints only in the witness file, entries truncated in the export.
    let mut cut = Vec::new();
    write_export(&mut cut, &Anchor::genesis(), &[], &f.entries[..320]).unwrap();
    expect(
        verify_export(&cut[..], f.checkpoints.clone(), &key),
        Failure::Truncated {
            last_seq: 320,
            tree_size: 330,
        },
    );

    // A checkpoint after the entries past it.
    let mut late = Vec::new();
    write_export(&mut late, &Anchor::genesis(), &[], &f.entries[..60]).unwrap();
    late.extend_from_slice((checkpoint_line(&f.checkpoints[0]).unwrap() + "\n").as_bytes());
    expect(
        verify_export(&late[..], vec![], &key),
        Failure::MisplacedCheckpoint {
            line: 61,
            tree_size: 50,
        },
    );

    // An edited line that no longer parses: located by line.
    let lines: Vec<&str> = std::str::from_utf8(&text).unwrap().lines().collect();
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[7 + 99] = edited[7 + 99].replacen(r#""action":"#, r#""acti0n":"#, 1);
    let joined = edited.join("\n") + "\n";
    let result = verify_export(joined.as_bytes(), vec![], &key);
    match result {
        Err(Failure::Unreadable {
            line: 107,
            after_seq: 99,
            error: LineError::Invalid { .. },
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn inclusion_proofs_of_entries() {
    let f = Fixture::standard();
    let key = f.key.verifying_key();
    for cp in [&f.checkpoints[0], &f.checkpoints[3], &f.checkpoints[6]] {
        for seq in [1, 2, cp.tree_size / 2, cp.tree_size - 1, cp.tree_size] {
            let proof = EntryProof::build(&f.entries, seq, cp.clone()).unwrap();
            assert_eq!(proof.entry, f.entries[at(seq)]);
            assert_eq!(proof.verify(&key), Ok(()));
            let json = serde_json::to_string(&proof).unwrap();
            let back: EntryProof = serde_json::from_str(&json).unwrap();
            assert_eq!(back.verify(&key), Ok(()));
        }
    }
    let cp = f.checkpoints[1].clone(); // 100 entries
    let proof = EntryProof::build(&f.entries, 42, cp.clone()).unwrap();

    let mut p = proof.clone();
    p.entry.event.tenant = Some("tenant-x".into());
    assert_eq!(p.verify(&key), Err(ProofError::LeafMismatch));
    let mut p = proof.clone();
    p.entry.event.tenant = Some("tenant-x".into());
    p.entry.leaf_hash = leaf_hash(42, &p.entry.event);
    assert_eq!(p.verify(&key), Err(ProofError::PathMismatch));
    let mut p = proof.clone();
    p.entry = f.entries[at(43)].clone();
    assert_eq!(p.verify(&key), Err(ProofError::PathMismatch));
    let mut p = proof.clone();
    p.path[2][5] ^= 1;
    assert_eq!(p.verify(&key), Err(ProofError::PathMismatch));
    let mut p = proof.clone();
    p.checkpoint.root[0] ^= 1;
    assert_eq!(
        p.verify(&key),
        Err(ProofError::Checkpoint(CheckpointError::BadSignature))
    );
    let other = SigningKey::generate().unwrap().verifying_key();
    assert!(matches!(
        proof.verify(&other),
        Err(ProofError::Checkpoint(CheckpointError::UnknownKey { .. }))
    ));

    assert_eq!(
        EntryProof::build(&f.entries, 101, cp.clone()).unwrap_err(),
        ProofError::NotCovered {
            seq: 101,
            tree_size: 100
        }
    );
    assert!(EntryProof::build(&f.entries, 0, cp.clone()).is_err());
    assert_eq!(
        EntryProof::build(&f.entries[..90], 42, cp.clone()).unwrap_err(),
        ProofError::TooShort {
            have: 90,
            need: 100
        }
    );
    let mut rewritten = f.entries.clone();
    rewritten[at(60)].event.reason = Some("x".into());
    rehash_from(&mut rewritten, 0);
    assert_eq!(
        EntryProof::build(&rewritten, 42, cp).unwrap_err(),
        ProofError::TrailMismatch
    );
}

// ---------------------------------------------------------------------------
// Property tests.

fn arb_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[ -~]{0,12}")
}

fn arb_event() -> impl Strategy<Value = AuditEvent> {
    (
        0..ACTIONS.len(),
        0..OUTCOMES.len(),
        proptest::option::of("[a-z]{1,8}"),
        proptest::option::of("tok_[0-9a-f]{32}"),
        arb_text(),
        arb_text(),
        0i64..1_000_000_000_000,
    )
        .prop_map(|(a, o, tenant, token, reason, principal, nanos)| {
            let mut e = AuditEvent::new(ACTIONS[a], OUTCOMES[o]);
            e.tenant = tenant;
            e.token = token;
            e.reason = reason;
            e.principal = principal;
            e.time = BASE + Duration::nanoseconds(nanos);
            e
        })
}

/// One kind of tampering; positions are taken modulo the trail's length.
#[derive(Debug, Clone)]
enum Tamper {
    ChangeField(usize, u8),
    FlipLeaf(usize, usize, u8),
    FlipChain(usize, usize, u8),
    Delete(usize),
    DeleteRenumber(usize),
    InsertDuplicate(usize),
    InsertRenumber(usize),
    SwapRows(usize, usize),
    SwapContents(usize, usize),
    Truncate(usize),
    Rebuild(usize),
    EditCheckpoint(usize, u8),
}

fn arb_tamper() -> impl Strategy<Value = Tamper> {
    let i = any::<usize>();
    prop_oneof![
        (i, 0u8..5).prop_map(|(p, f)| Tamper::ChangeField(p, f)),
        (i, 0usize..32, 0u8..8).prop_map(|(p, b, bit)| Tamper::FlipLeaf(p, b, bit)),
        (i, 0usize..32, 0u8..8).prop_map(|(p, b, bit)| Tamper::FlipChain(p, b, bit)),
        i.prop_map(Tamper::Delete),
        i.prop_map(Tamper::DeleteRenumber),
        i.prop_map(Tamper::InsertDuplicate),
        i.prop_map(Tamper::InsertRenumber),
        (i, i).prop_map(|(a, b)| Tamper::SwapRows(a, b)),
        (i, i).prop_map(|(a, b)| Tamper::SwapContents(a, b)),
        i.prop_map(Tamper::Truncate),
        i.prop_map(Tamper::Rebuild),
        (i, 0u8..5).prop_map(|(c, f)| Tamper::EditCheckpoint(c, f)),
    ]
}

fn change_field(e: &mut AuditEvent, field: u8) {
    match field {
        0 => e.time += Duration::nanoseconds(1),
        1 => {
            let i = ACTIONS.iter().position(|a| *a == e.action).unwrap();
            e.action = ACTIONS[(i + 1) % ACTIONS.len()];
        }
        2 => {
            e.tenant = e
                .tenant
                .take()
                .map_or(Some(String::new()), |t| Some(t + "x"))
        }
        3 => {
            e.token = match e.token {
                Some(_) => None,
                None => Some("tok_x".into()),
            }
        }
        _ => e.reason = e.reason.take().map_or(Some("r".into()), |r| Some(r + "!")),
    }
}

/// Apply `tamper` and return what the verifier must say (`None`: nothing
/// was changed).
fn apply(f: &Fixture, tamper: &Tamper) -> (Vec<ChainedEvent>, Vec<Checkpoint>, Option<Failure>) {
    let mut entries = f.entries.clone();
    let mut cps = f.checkpoints.clone();
    let n = entries.len();
    let seq_of = |i: usize| i as u64 + 1;
    let expected = match *tamper {
        Tamper::ChangeField(p, field) => {
            let i = p % n;
            change_field(&mut entries[i].event, field);
            Some(Failure::Changed {
                seq: seq_of(i),
                evidence: Evidence::LeafHash,
            })
        }
        Tamper::FlipLeaf(p, byte, bit) => {
            let i = p % n;
            entries[i].leaf_hash[byte] ^= 1 << bit;
            Some(Failure::Changed {
                seq: seq_of(i),
                evidence: Evidence::LeafHash,
            })
        }
        Tamper::FlipChain(p, byte, bit) => {
            let i = p % n;
            entries[i].chain_hash[byte] ^= 1 << bit;
            Some(Failure::Changed {
                seq: seq_of(i),
                evidence: Evidence::ChainHash,
            })
        }
        Tamper::Delete(p) | Tamper::DeleteRenumber(p) => {
            let i = p % n;
            entries.remove(i);
            if matches!(tamper, Tamper::DeleteRenumber(_)) {
                entries[i..].iter_mut().for_each(|e| e.seq -= 1);
            }
            Some(if i == n - 1 {
                Failure::Truncated {
                    last_seq: seq_of(i) - 1,
                    tree_size: n as u64,
                }
            } else {
                Failure::Removed {
                    first: seq_of(i),
                    last: seq_of(i),
                }
            })
        }
        Tamper::InsertDuplicate(p) | Tamper::InsertRenumber(p) => {
            let i = p % n;
            let prev = if i == 0 {
                GENESIS
            } else {
                entries[i - 1].chain_hash
            };
            entries.insert(i, forged(seq_of(i), &prev));
            if matches!(tamper, Tamper::InsertRenumber(_)) {
                entries[i + 1..].iter_mut().for_each(|e| e.seq += 1);
            }
            Some(Failure::Inserted { seq: seq_of(i) })
        }
        Tamper::SwapRows(a, b) | Tamper::SwapContents(a, b) => {
            let (i, j) = (a % n, b % n);
            let (i, j) = (i.min(j), i.max(j));
            if i == j {
                return (entries, cps, None); // nothing swapped
            }
            if matches!(tamper, Tamper::SwapRows(..)) {
                entries.swap(i, j);
            } else {
                let (x, y) = (entries[i].clone(), entries[j].clone());
                entries[i] = ChainedEvent { seq: x.seq, ..y };
                entries[j] = ChainedEvent { seq: y.seq, ..x };
            }
            Some(Failure::Reordered {
                seq: seq_of(i),
                position: seq_of(j),
            })
        }
        Tamper::Truncate(p) => {
            let keep = p % n;
            entries.truncate(keep);
            Some(Failure::Truncated {
                last_seq: keep as u64,
                tree_size: n as u64,
            })
        }
        Tamper::Rebuild(p) => {
            let i = p % n;
            change_field(&mut entries[i].event, 4);
            rehash_from(&mut entries, i);
            let seq = seq_of(i);
            let after = cps.iter().map(|c| c.tree_size).filter(|s| *s < seq).max();
            let upto = cps.iter().map(|c| c.tree_size).filter(|s| *s >= seq).min();
            Some(Failure::CheckpointMismatch {
                after: after.unwrap_or(0),
                upto: upto.unwrap(),
                root: true,
                chain_head: true,
            })
        }
        Tamper::EditCheckpoint(c, field) => {
            let c = c % cps.len();
            let cp = &mut cps[c];
            match field {
                0 => cp.root[0] ^= 1,
                1 => cp.chain_head[31] ^= 1,
                2 => cp.time += Duration::seconds(1),
                3 => cp.signature[0] ^= 1,
                _ => cp.tree_size -= 1,
            }
            Some(Failure::BadCheckpointSignature {
                tree_size: cp.tree_size,
                error: CheckpointError::BadSignature,
            })
        }
    };
    (entries, cps, expected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random trails, one random tampering: always detected, with the right
    /// kind and place.
    #[test]
    fn any_single_tampering_is_detected_and_located(
        events in proptest::collection::vec(arb_event(), 1..120),
        every in 7u64..40,
        tamper in arb_tamper(),
    ) {
        let f = Fixture::build(events, every, true);
        prop_assert!(f.verify().is_ok());
        let (entries, cps, expected) = apply(&f, &tamper);
        let result = verify_trail(&entries, cps, &f.key.verifying_key());
        match expected {
            None => prop_assert!(result.is_ok()),
            Some(expected) => prop_assert_eq!(result, Err(expected)),
        }
    }

    /// Any single byte of an export changed to any other value: the export
    /// no longer verifies.
    #[test]
    fn any_changed_byte_of_an_export_is_detected(
        events in proptest::collection::vec(arb_event(), 1..25),
        every in 3u64..10,
        position in any::<usize>(),
        value in any::<u8>(),
    ) {
        let f = Fixture::build(events, every, true);
        let mut text = export(&f, &f.entries);
        let key = f.key.verifying_key();
        prop_assert!(verify_export(&text[..], vec![], &key).is_ok());
        let i = position % text.len();
        prop_assume!(text[i] != value);
        text[i] = value;
        prop_assert!(verify_export(&text[..], vec![], &key).is_err());
    }
}

#[test]
fn chain_hash_of_forged_entry_links() {
    // Sanity of the forging helper used above: an attacker's entry is
    // internally consistent, so only seq order or checkpoints expose it.
    let f = Fixture::standard();
    let e = forged(124, &f.entries[at(123)].chain_hash);
    assert_eq!(e.leaf_hash, leaf_hash(124, &e.event));
    assert_eq!(
        e.chain_hash,
        chain_hash(&f.entries[at(123)].chain_hash, &e.leaf_hash)
    );
}

// ---------------------------------------------------------------------------
// Segments: archives and range exports that start from an anchor
// ---------------------------------------------------------------------------

/// The anchor after the first `n` entries of `f`.
fn anchor_after(f: &Fixture, n: usize) -> Anchor {
    let mut trail = Trail::new();
    f.entries[..n]
        .iter()
        .for_each(|e| assert!(trail.append_chained(e)));
    trail.anchor()
}

/// An export of entries `from..=to` (1-based seqs) with the checkpoints in
/// `anchor..=to`, starting from its anchor.
fn segment(f: &Fixture, from: u64, to: u64) -> Vec<u8> {
    let anchor = anchor_after(f, at(from));
    let cps: Vec<Checkpoint> = f
        .checkpoints
        .iter()
        .filter(|c| c.tree_size >= anchor.tree_size && c.tree_size <= to)
        .cloned()
        .collect();
    let mut out = Vec::new();
    write_export(&mut out, &anchor, &cps, &f.entries[at(from)..at(to) + 1]).unwrap();
    out
}

#[test]
fn segments_verify_on_their_own_and_join_up() {
    let f = Fixture::standard();
    let key = f.key.verifying_key();
    let whole = f.verify().unwrap();

    // An archived segment ends at a checkpoint; the next starts there.
    let first = verify_export(&segment(&f, 1, 100)[..], vec![], &key).unwrap();
    assert_eq!((first.start, first.last_seq, first.anchored), (0, 100, 100));
    let second = verify_export(&segment(&f, 101, 250)[..], vec![], &key).unwrap();
    assert_eq!(
        (
            second.start,
            second.entries,
            second.checkpoints,
            second.anchored
        ),
        (100, 150, 4, 250),
        "checkpoints 100 (the anchor's), 150, 200, 250"
    );
    assert!(second.to_string().contains("started after entry 100"));
    assert_eq!(first.end, anchor_after(&f, 100));

    // A range that starts and ends between checkpoints: its anchor is
    // confirmed by the first checkpoint after it; the tail is uncovered.
    let range = verify_export(&segment(&f, 77, 163)[..], vec![], &key).unwrap();
    assert_eq!((range.start, range.entries, range.anchored), (76, 87, 150));

    // Segments fed one after the other end where the whole trail does.
    let mut v = Verifier::new(key.clone());
    for (from, to) in [(1, 100), (101, 250), (251, 330)] {
        let text = segment(&f, from, to);
        let mut lines = text.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        let anchor = anchor_after(&f, at(from));
        if from > 1 {
            let first = crate::export::Record::from_line(
                std::str::from_utf8(lines.next().unwrap()).unwrap(),
            );
            assert_eq!(
                first.unwrap(),
                crate::export::Record::Anchor(anchor.clone())
            );
        }
        v.continue_at(&anchor);
        for c in f
            .checkpoints
            .iter()
            .filter(|c| c.tree_size >= anchor.tree_size)
        {
            v.add_checkpoint(c.clone());
        }
        for e in &f.entries[at(from)..at(to) + 1] {
            v.push(e);
        }
    }
    let joined = v.finish().unwrap();
    assert_eq!(
        (joined.root, joined.chain_head, joined.checkpoints),
        (whole.root, whole.chain_head, 7)
    );
}

#[test]
fn a_missing_or_overlapping_segment_is_a_discontinuity() {
    let f = Fixture::standard();
    let key = f.key.verifying_key();
    let mut v = Verifier::new(key.clone());
    f.entries[..100].iter().for_each(|e| v.push(e));
    v.continue_at(&anchor_after(&f, 150));
    expect(
        v.finish(),
        Failure::Discontinuity {
            reached: 100,
            starts: 150,
        },
    );

    let mut v = Verifier::new(key.clone());
    f.entries[..100].iter().for_each(|e| v.push(e));
    v.continue_at(&anchor_after(&f, 50));
    let failure = v.finish().unwrap_err();
    assert_eq!(
        failure,
        Failure::Discontinuity {
            reached: 100,
            starts: 50
        }
    );
    assert!(failure.to_string().contains("overlap"), "{failure}");

    // Same size, another state (a rebuilt segment): not a continuation.
    let mut v = Verifier::new(key.clone());
    f.entries[..100].iter().for_each(|e| v.push(e));
    let mut other = anchor_after(&f, 100);
    other.chain_head[0] ^= 1;
    v.continue_at(&other);
    expect(
        v.finish(),
        Failure::Discontinuity {
            reached: 100,
            starts: 100,
        },
    );
    let message = Failure::Discontinuity {
        reached: 100,
        starts: 150,
    }
    .to_string();
    assert!(
        message.contains("entries 101 to 150 are missing"),
        "{message}"
    );
}

#[test]
fn a_forged_anchor_is_caught_by_the_first_checkpoint() {
    let f = Fixture::standard();
    let key = f.key.verifying_key();
    // One frontier node changed: the root at the next checkpoint differs.
    let mut anchor = anchor_after(&f, 120);
    anchor.frontier[1][5] ^= 0x40;
    let mut v = Verifier::resume(key.clone(), &anchor).unwrap();
    f.checkpoints.iter().for_each(|c| {
        v.add_checkpoint(c.clone());
    });
    f.entries[120..].iter().for_each(|e| v.push(e));
    expect(
        v.finish(),
        Failure::CheckpointMismatch {
            after: 120,
            upto: 150,
            root: true,
            chain_head: false,
        },
    );
    // A chain head made up for a rebuilt segment: the first entry's chain
    // hash does not follow from it.
    let mut anchor = anchor_after(&f, 120);
    anchor.chain_head = [7; 32];
    // Without an anchor, the same entries read as if 1 to 120 were removed.
    expect(
        verify_trail(&f.entries[120..], f.checkpoints.clone(), &key),
        Failure::Removed {
            first: 1,
            last: 120,
        },
    );
    let mut v = Verifier::resume(key.clone(), &anchor).unwrap();
    f.entries[120..].iter().for_each(|e| v.push(e));
    expect(
        v.finish(),
        Failure::Changed {
            seq: 121,
            evidence: Evidence::ChainHash,
        },
    );
    // A frontier that does not fit its size is refused outright.
    let mut anchor = anchor_after(&f, 120);
    anchor.frontier.pop();
    assert_eq!(
        Verifier::resume(key.clone(), &anchor).unwrap_err(),
        Failure::BadAnchor { tree_size: 120 }
    );
}

#[test]
fn tampering_inside_a_segment_is_located() {
    let f = Fixture::standard();
    let key = f.key.verifying_key();
    let text = String::from_utf8(segment(&f, 101, 250)).unwrap();
    // One byte of entry 180's principal.
    let changed = text.replacen(
        &entry_line(&f.entries[at(180)]).unwrap(),
        &entry_line(&f.entries[at(180)])
            .unwrap()
            .replacen("svc-", "svd-", 1),
        1,
    );
    assert_ne!(changed, text);
    expect(
        verify_export(changed.as_bytes(), vec![], &key),
        Failure::Changed {
            seq: 180,
            evidence: Evidence::LeafHash,
        },
    );
    // An anchor anywhere but the first line.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(0, 1);
    let moved = lines.join("\n") + "\n";
    expect(
        verify_export(moved.as_bytes(), vec![], &key),
        Failure::MisplacedAnchor { line: 2 },
    );
}
