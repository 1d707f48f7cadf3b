//! The audit trail reader: `Record::from_line`, `ExportReader` and
//! `verify_export` over arbitrary bytes (never a panic; a line that reads
//! writes back to itself), and over a genuine signed export with one line
//! replaced or some bytes overwritten (never accepted unless unchanged).
//!
//! The first input byte picks the mode:
//! - 0..=127: the rest is an export of its own;
//! - 128..=191: the next byte picks a line of the genuine export, the rest
//!   (up to a newline) replaces it;
//! - 192..=255: the rest is (offset u16 LE, byte) triples written over the
//!   genuine export.
#![no_main]

use std::sync::OnceLock;

use audit::chain::{Anchor, Trail};
use audit::checkpoint::{SigningKey, VerifyingKey};
use audit::export::{write_export, ExportReader, Record};
use audit::verify::verify_export;
use audit::{Action, AuditEvent, Outcome};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

struct Genuine {
    key: VerifyingKey,
    export: Vec<u8>,
    lines: Vec<Vec<u8>>,
}

/// A small trail signed with a fixed key: 5 entries, checkpoints at 3 and 5.
fn genuine() -> &'static Genuine {
    static GENUINE: OnceLock<Genuine> = OnceLock::new();
    GENUINE.get_or_init(|| {
        let signing = SigningKey::from_secret_slice(&[7u8; 32]).expect("32 bytes");
        let at = |s: i64| OffsetDateTime::from_unix_timestamp(1_790_000_000 + s).expect("a time");
        let mut trail = Trail::new();
        let mut entries = Vec::new();
        let mut checkpoints = Vec::new();
        let events = [
            AuditEvent::new(Action::ServiceStart, Outcome::Success)
                .source("local")
                .detail("dev"),
            AuditEvent::new(Action::Tokenize, Outcome::Success)
                .principal("checkout")
                .source("127.0.0.1:5000")
                .tenant("shop-42")
                .token("tok_AAAAAAAAAAAAAAAAAAAAAA")
                .request_id("req-1")
                .detail("created"),
            AuditEvent::new(Action::Detokenize, Outcome::Success)
                .principal("settle")
                .source("127.0.0.1:5001")
                .tenant("shop-42")
                .token("tok_AAAAAAAAAAAAAAAAAAAAAA")
                .request_id("req-2")
                .reason("settle order \"1234\" \\ é"),
            AuditEvent::new(Action::Detokenize, Outcome::Failure)
                .principal("settle")
                .source("[::1]:5002")
                .tenant("shop-43")
                .token("tok_BBBBBBBBBBBBBBBBBBBBBB")
                .error_code("not_found")
                .request_id("req-3")
                .reason("refund"),
            AuditEvent::new(Action::ServiceStop, Outcome::Success)
                .source("local")
                .detail("shutdown"),
        ];
        for (i, mut event) in events.into_iter().enumerate() {
            event.time = at(i as i64);
            entries.push(trail.append(event));
            if i == 2 || i == 4 {
                checkpoints.push(trail.checkpoint(&signing, at(100 + i as i64)));
            }
        }
        let mut export = Vec::new();
        write_export(&mut export, &Anchor::genesis(), &checkpoints, &entries)
            .expect("the genuine export is written");
        let key = signing.verifying_key();
        verify_export(&export[..], [], &key).expect("the genuine export verifies");
        let lines = export
            .split_inclusive(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        Genuine { key, export, lines }
    })
}

/// Reading arbitrary bytes: no panic, and whatever reads writes back to
/// exactly the line it came from.
fn read_anything(g: &Genuine, data: &[u8]) {
    for record in ExportReader::new(data) {
        let Ok(record) = record else { break };
        let line = record
            .to_line()
            .expect("a record that was read can be written");
        assert!(
            Record::from_line(&line).as_ref() == Ok(&record),
            "a written record reads back"
        );
    }
    for raw in data.split(|b| *b == b'\n') {
        if let Ok(text) = std::str::from_utf8(raw) {
            if let Ok(record) = Record::from_line(text) {
                assert_eq!(
                    record.to_line().ok().as_deref(),
                    Some(text),
                    "a line that reads is canonical"
                );
            }
        }
    }
    let _ = verify_export(data, [], &g.key);
}

/// A changed export must not verify, unless the change was no change.
/// (This property is how a time respelled with another UTC offset for the
/// same instant was found to be accepted; fixed in 2001b56.)
fn tampered(g: &Genuine, changed: &[u8]) {
    if changed == g.export.as_slice() {
        return;
    }
    if let Ok(report) = verify_export(changed, [], &g.key) {
        panic!(
            "a changed export verified ({} entries, {} checkpoints):\n{}",
            report.entries,
            report.checkpoints,
            String::from_utf8_lossy(changed)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let g = genuine();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0..=127 => read_anything(g, rest),
        128..=191 => {
            let Some((&which, line)) = rest.split_first() else {
                return;
            };
            let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
            let index = usize::from(which) % g.lines.len();
            let mut changed = Vec::with_capacity(g.export.len() + line.len());
            for (i, l) in g.lines.iter().enumerate() {
                if i == index {
                    changed.extend_from_slice(line);
                    changed.push(b'\n');
                } else {
                    changed.extend_from_slice(l);
                }
            }
            tampered(g, &changed);
        }
        _ => {
            let mut changed = g.export.clone();
            for edit in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % changed.len();
                changed[at] = edit[2];
            }
            tampered(g, &changed);
        }
    }
});
