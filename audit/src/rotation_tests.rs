//! Signing key rotation: a trail whose checkpoints are signed by one key,
//! then (after an announcement signed by that key naming the next one) by
//! another, verified from the first key alone; unannounced keys, forged
//! announcements and a retired key signing again are refused.
#![allow(clippy::unwrap_used)]

use time::macros::datetime;
use time::Duration;

use crate::chain::{ChainedEvent, Trail};
use crate::checkpoint::{
    Checkpoint, CheckpointError, Handover, SigningKey, Trust, TrustedKeys, VerifyingKey,
};
use crate::export::{checkpoint_line, write_export, Record};
use crate::verify::{verify_export, verify_trail, Failure};
use crate::{Action, AuditEvent, Outcome};

fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(Action::Tokenize, Outcome::Success)
        .principal("svc")
        .tenant("t1")
        .token(format!("tok_{i:020}"));
    e.time = datetime!(2025-05-01 08:00:00 UTC) + Duration::seconds(i as i64);
    e
}

struct Rotated {
    old: SigningKey,
    new: SigningKey,
    entries: Vec<ChainedEvent>,
    checkpoints: Vec<Checkpoint>,
}

/// 200 entries; `old` signs at 50 and 100, announces `new` at 120; `new`
/// signs at 170 and 200.
fn rotated() -> Rotated {
    let old = SigningKey::generate().unwrap();
    let new = SigningKey::generate().unwrap();
    let mut trail = Trail::new();
    let mut entries = Vec::new();
    let mut checkpoints = Vec::new();
    let time = datetime!(2025-05-01 09:00:00 UTC);
    for i in 1..=200 {
        entries.push(trail.append(event(i)));
        match i {
            50 | 100 => checkpoints.push(trail.checkpoint(&old, time)),
            120 => checkpoints.push(trail.announce(&old, time, &new.verifying_key())),
            170 | 200 => checkpoints.push(trail.checkpoint(&new, time)),
            _ => {}
        }
    }
    Rotated {
        old,
        new,
        entries,
        checkpoints,
    }
}

fn bad_signature(result: Result<crate::Report, Failure>) -> (u64, CheckpointError) {
    match result {
        Err(Failure::BadCheckpointSignature { tree_size, error }) => (tree_size, error),
        other => panic!("expected a refused checkpoint, got {other:?}"),
    }
}

#[test]
fn announcement_signed_bytes_layout_and_json() {
    let f = rotated();
    let a = &f.checkpoints[2];
    let next = f.new.verifying_key();
    assert_eq!(a.next_key.as_ref(), Some(&next));
    let mut expected = b"cardvault/audit-checkpoint/v2".to_vec();
    expected.extend_from_slice(&120u64.to_be_bytes());
    expected.extend_from_slice(&a.root);
    expected.extend_from_slice(&a.chain_head);
    expected.extend_from_slice(&a.time.unix_timestamp_nanos().to_be_bytes());
    expected.extend_from_slice(&16u32.to_be_bytes());
    expected.extend_from_slice(f.old.key_id().as_bytes());
    expected.extend_from_slice(&next.to_bytes());
    assert_eq!(a.signed_bytes(), expected);
    // A plain checkpoint keeps the v1 bytes.
    assert!(f.checkpoints[1]
        .signed_bytes()
        .starts_with(b"cardvault/audit-checkpoint/v1"));
    assert_eq!(a.verify(&f.old.verifying_key()), Ok(()));

    let line = checkpoint_line(a).unwrap();
    let expected_tail = format!(
        r#""key_id":"{}","next_key":"{next}","signature":""#,
        f.old.key_id()
    );
    assert!(line.contains(&expected_tail), "{line}");
    assert_eq!(Record::from_line(&line), Ok(Record::Checkpoint(a.clone())));
    // Plain checkpoints are written exactly as before (no next_key field).
    let plain = checkpoint_line(&f.checkpoints[0]).unwrap();
    assert!(!plain.contains("next_key"), "{plain}");
    // A next key in another spelling is refused.
    let upper = line.replacen(
        &next.to_string(),
        &next.to_string().to_uppercase().replacen(
            "CARDVAULT-AUDIT-ED25519",
            "cardvault-audit-ed25519",
            1,
        ),
        1,
    );
    assert!(Record::from_line(&upper).is_err());
}

#[test]
fn a_trail_across_a_rotation_verifies_from_the_first_key_alone() {
    let f = rotated();
    let old = f.old.verifying_key();
    let report = verify_trail(&f.entries, f.checkpoints.clone(), &old).unwrap();
    assert_eq!(report.checkpoints, 5);
    assert_eq!(report.anchored, 200);
    assert_eq!(
        report.handovers,
        vec![Handover {
            tree_size: 120,
            from: f.old.key_id().to_owned(),
            to: f.new.key_id().to_owned(),
        }]
    );
    assert!(report.to_string().contains("handed over"), "{report}");
    // The same through an export (checkpoints first, as the exporter writes).
    let mut out = Vec::new();
    write_export(
        &mut out,
        &crate::chain::Anchor::genesis(),
        &f.checkpoints,
        &f.entries,
    )
    .unwrap();
    let again = verify_export(&out[..], vec![], &old).unwrap();
    assert_eq!(again, report);
    // Both keys given: the same verdict.
    let both = TrustedKeys::new([old.clone(), f.new.verifying_key()]);
    assert_eq!(
        verify_trail(&f.entries, f.checkpoints.clone(), &both).unwrap(),
        report
    );
    // The verifier records how it came to trust the new key.
    let mut v = crate::Verifier::new(&old);
    for c in f.checkpoints.clone() {
        v.add_checkpoint(c);
    }
    f.entries.iter().for_each(|e| v.push(e));
    assert_eq!(
        v.keys().trust(f.new.key_id()),
        Some(&Trust::Announced {
            by: f.old.key_id().to_owned(),
            tree_size: 120,
        })
    );
    assert_eq!(v.keys().trust(f.old.key_id()), Some(&Trust::Given));
    v.finish().unwrap();
}

#[test]
fn only_the_new_key_does_not_verify_the_old_checkpoints() {
    let f = rotated();
    let (size, error) = bad_signature(verify_trail(
        &f.entries,
        f.checkpoints.clone(),
        &f.new.verifying_key(),
    ));
    assert_eq!(size, 50);
    assert_eq!(
        error,
        CheckpointError::UnknownKey {
            key_id: f.old.key_id().to_owned()
        }
    );
}

#[test]
fn a_checkpoint_by_an_unannounced_key_is_refused() {
    let f = rotated();
    let stranger = SigningKey::generate().unwrap();
    // Entries 1..=200 as before, but the last checkpoint by a key nobody
    // announced (the old one announced `new`, not `stranger`).
    let mut trail = Trail::new();
    f.entries
        .iter()
        .for_each(|e| assert!(trail.append_chained(e)));
    let mut cps = f.checkpoints[..4].to_vec();
    cps.push(trail.checkpoint(&stranger, datetime!(2025-05-02 00:00:00 UTC)));
    let (size, error) = bad_signature(verify_trail(&f.entries, cps, &f.old.verifying_key()));
    assert_eq!(size, 200);
    assert_eq!(
        error,
        CheckpointError::UnknownKey {
            key_id: stranger.key_id().to_owned()
        }
    );
    // Without the announcement the new key is a stranger too.
    let mut cps = f.checkpoints.clone();
    cps.remove(2);
    let (size, error) = bad_signature(verify_trail(&f.entries, cps, &f.old.verifying_key()));
    assert_eq!(size, 170);
    assert!(matches!(error, CheckpointError::UnknownKey { .. }));
}

#[test]
fn forged_announcements_are_refused() {
    let f = rotated();
    let old = f.old.verifying_key();
    let attacker = SigningKey::generate().unwrap();
    let attackers_next = SigningKey::generate().unwrap();
    let mut trail = Trail::new();
    let mut later = Vec::new();
    for e in &f.entries {
        assert!(trail.append_chained(e));
        if e.seq == 170 || e.seq == 200 {
            later.push(trail.checkpoint(&attackers_next, datetime!(2025-05-02 00:00:00 UTC)));
        }
    }
    let at_120 = {
        let mut t = Trail::new();
        f.entries[..120]
            .iter()
            .for_each(|e| assert!(t.append_chained(e)));
        t
    };

    // 1. An announcement signed by a key that is not trusted.
    let forged = at_120.announce(
        &attacker,
        datetime!(2025-05-02 00:00:00 UTC),
        &attackers_next.verifying_key(),
    );
    let mut cps = f.checkpoints[..2].to_vec();
    cps.push(forged);
    cps.extend(later.clone());
    let (size, error) = bad_signature(verify_trail(&f.entries, cps, &old));
    assert_eq!(size, 120);
    assert_eq!(
        error,
        CheckpointError::UnknownKey {
            key_id: attacker.key_id().to_owned()
        }
    );

    // 2. The old key's real announcement with its next key swapped.
    let mut swapped = f.checkpoints[2].clone();
    swapped.next_key = Some(attackers_next.verifying_key());
    let mut cps = f.checkpoints[..2].to_vec();
    cps.push(swapped);
    cps.extend(later.clone());
    let (size, error) = bad_signature(verify_trail(&f.entries, cps, &old));
    assert_eq!((size, error), (120, CheckpointError::BadSignature));

    // 3. The announcement stripped of its next key (or a plain checkpoint
    //    given one): the signature covers the tag and the key.
    let mut stripped = f.checkpoints[2].clone();
    stripped.next_key = None;
    let mut cps = f.checkpoints.clone();
    cps[2] = stripped;
    let (size, error) = bad_signature(verify_trail(&f.entries, cps, &old));
    assert_eq!((size, error), (120, CheckpointError::BadSignature));

    // 4. A genuine announcement does not vouch for entries it does not
    //    match: rewrite entry 110 and the chain after it; the announcement
    //    no longer matches, and the new key is not trusted on its strength.
    let mut rewritten = Trail::new();
    let mut entries = Vec::new();
    for (i, e) in f.entries.iter().enumerate() {
        let mut ev = e.event.clone();
        if i == 109 {
            ev.tenant = Some("t2".into());
        }
        entries.push(rewritten.append(ev));
    }
    match verify_trail(&entries, f.checkpoints.clone(), &old) {
        Err(Failure::CheckpointMismatch { after, upto, .. }) => {
            assert_eq!((after, upto), (100, 120))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_key_hands_over_once_even_at_the_same_tree_size() {
    let f = rotated();
    let third = SigningKey::generate().unwrap();
    // Whoever holds the old key announces a successor of their own at the
    // real announcement's size (its root and head are public).
    let mut trail = Trail::new();
    f.entries[..120]
        .iter()
        .for_each(|e| assert!(trail.append_chained(e)));
    let forged = trail.announce(
        &f.old,
        datetime!(2025-05-01 09:00:00 UTC),
        &third.verifying_key(),
    );
    let mut cps = f.checkpoints.clone();
    cps.insert(3, forged);
    let (size, error) = bad_signature(verify_trail(&f.entries, cps, &f.old.verifying_key()));
    assert_eq!(size, 120);
    assert_eq!(
        error,
        CheckpointError::RetiredKey {
            key_id: f.old.key_id().to_owned(),
            next_key_id: f.new.key_id().to_owned(),
            handed_over_at: 120,
        }
    );
}

#[test]
fn a_retired_key_signs_nothing_after_its_announcement() {
    let f = rotated();
    let mut trail = Trail::new();
    f.entries
        .iter()
        .for_each(|e| assert!(trail.append_chained(e)));
    let mut cps = f.checkpoints[..4].to_vec();
    // The old key (leaked after the rotation, say) signs the end.
    cps.push(trail.checkpoint(&f.old, datetime!(2025-05-02 00:00:00 UTC)));
    let (size, error) = bad_signature(verify_trail(&f.entries, cps, &f.old.verifying_key()));
    assert_eq!(size, 200);
    assert_eq!(
        error,
        CheckpointError::RetiredKey {
            key_id: f.old.key_id().to_owned(),
            next_key_id: f.new.key_id().to_owned(),
            handed_over_at: 120,
        }
    );
}

#[test]
fn keys_files_hold_several_keys() {
    let a = SigningKey::generate().unwrap().verifying_key();
    let b = SigningKey::generate().unwrap().verifying_key();
    let text = format!("# cardvault audit keys\n{a}\n\n{b}\n");
    assert_eq!(VerifyingKey::parse_many(&text).unwrap(), vec![a.clone(), b]);
    assert!(VerifyingKey::parse_many("\n# nothing\n").is_err());
    assert!(VerifyingKey::parse_many(&format!("{a}\nnot a key\n")).is_err());
}
