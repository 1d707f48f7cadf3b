//! The tamper-evident audit trail end to end, on the backend of the run.
//!
//! A real service writes the trail (a signed checkpoint every
//! `INTERVAL_MS` when it grew and one at shutdown, each also appended to the
//! witness file `<data-dir>/audit-checkpoints.jsonl`; the public key in
//! `<data-dir>/audit-verify.pub`), and `vault-audit verify` accepts it.
//! Then, each on its own copy of the database, made as a DBA would (the
//! append-only triggers bypassed), every kind of tampering is detected and
//! located: one changed byte, a deleted entry, forged entries (in the
//! middle, at the end), two entries swapped, the tail cut (also with the
//! checkpoints beyond it deleted, which only the witness file reveals), the
//! whole chain rebuilt with recomputed hashes (located to its checkpoint
//! interval), a deleted checkpoint, a row no service writes. Also `export`
//! then `verify --export`, and `prove` then `check-proof` (and a proof with
//! a flipped byte is refused).
//!
//! Needs `target/debug/vault-audit` (`cargo build -p cardvault-audit --bin
//! vault-audit`; `cargo test --workspace` builds it).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use audit::{Action, ChainState, ChainedEvent, Checkpoint};
use e2e::{
    pg_execute, run_vault_audit, sqlite_execute, temp_data_dir, Backend, CliOutput, Options,
    PgDatabase, Service,
};

use crate::{admin, expect_status, report, token_for, REASON, TENANT, TEST_CARDS};

/// Checkpoint interval of the service under test.
const INTERVAL_MS: u64 = 200;

/// How a DBA gets past the append-only triggers.
const SQLITE_BYPASS: &str = "DROP TRIGGER IF EXISTS audit_events_no_update;
DROP TRIGGER IF EXISTS audit_events_no_delete;
DROP TRIGGER IF EXISTS audit_checkpoints_no_update;
DROP TRIGGER IF EXISTS audit_checkpoints_no_delete;
";
const PG_BYPASS: &str = "ALTER TABLE audit_events DISABLE TRIGGER USER;
ALTER TABLE audit_checkpoints DISABLE TRIGGER USER;
";

/// The checkpoints of the witness file.
pub(crate) fn witness_checkpoints(path: &Path) -> Vec<Checkpoint> {
    match File::open(path) {
        Ok(file) => audit::export::read_checkpoints(BufReader::new(file))
            .unwrap_or_else(|e| panic!("witness file {}: {e}", path.display())),
        Err(_) => Vec::new(),
    }
}

/// Waits until the witness file holds at least `n` checkpoints.
pub(crate) fn wait_for_checkpoints(path: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while witness_checkpoints(path).len() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} checkpoints in {} after 10 s (interval {INTERVAL_MS} ms)",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One copy of the stopped service's database, to tamper with.
struct DbCopy {
    url: String,
    sqlite: Option<PathBuf>,
    _pg: Option<PgDatabase>,
}

impl DbCopy {
    fn make(svc: &Service, dir: &Path, name: &str) -> DbCopy {
        let url = svc.database_url();
        match svc.backend() {
            Backend::Sqlite => {
                let original = PathBuf::from(url.trim_start_matches("sqlite://"));
                let path = dir.join(format!("{name}.db"));
                sqlite_execute(&original, &format!("VACUUM INTO '{}'", path.display()));
                DbCopy {
                    url: format!("sqlite://{}", path.display()),
                    sqlite: Some(path),
                    _pg: None,
                }
            }
            Backend::Postgres => {
                let db = PgDatabase::copy_of(&url);
                DbCopy {
                    url: db.url().to_string(),
                    sqlite: None,
                    _pg: Some(db),
                }
            }
        }
    }

    /// Runs `sql` with the append-only triggers out of the way.
    fn tamper(&self, sql: &str) {
        match &self.sqlite {
            Some(path) => sqlite_execute(path, &format!("{SQLITE_BYPASS}{sql}")),
            None => pg_execute(&self.url, &format!("{PG_BYPASS}{sql}")),
        }
    }

    /// A binary literal in this backend's SQL.
    fn blob(&self, bytes: &[u8]) -> String {
        let hex = audit::auditor::hex(bytes);
        match &self.sqlite {
            Some(_) => format!("x'{hex}'"),
            None => format!("'\\x{hex}'::bytea"),
        }
    }
}

/// A text literal (or NULL).
fn text(value: Option<&str>) -> String {
    value.map_or("NULL".to_string(), |v| {
        format!("'{}'", v.replace('\'', "''"))
    })
}

/// An INSERT of a whole entry row.
fn insert_row(db: &DbCopy, e: &ChainedEvent) -> String {
    let ev = &e.event;
    // The time exactly as the service stores it (RFC 3339, as serialized).
    let time = serde_json::to_value(ev).unwrap()["time"]
        .as_str()
        .unwrap()
        .to_string();
    format!(
        "INSERT INTO audit_events (time, principal, source, action, tenant, token, outcome, \
         error_code, request_id, reason, detail, chain_seq, leaf_hash, chain_hash) VALUES \
         ({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {});\n",
        text(Some(&time)),
        text(ev.principal.as_deref()),
        text(ev.source.as_deref()),
        text(Some(ev.action.as_str())),
        text(ev.tenant.as_deref()),
        text(ev.token.as_deref()),
        text(Some(ev.outcome.as_str())),
        text(ev.error_code.as_deref()),
        text(ev.request_id.as_deref()),
        text(ev.reason.as_deref()),
        text(ev.detail.as_deref()),
        e.seq,
        db.blob(&e.leaf_hash),
        db.blob(&e.chain_hash),
    )
}

fn describe(out: &CliOutput) -> String {
    format!(
        "exit status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status, out.stdout, out.stderr
    )
}

/// Runs `vault-audit verify` and checks its exit code and that the output
/// contains `needle`; returns the output.
#[track_caller]
fn verify(url: &str, key: &Path, witness: Option<&Path>, code: i32, needle: &str) -> CliOutput {
    let key = key.to_str().unwrap();
    let mut args = vec!["verify", "--key", key, "--database-url", url];
    match witness {
        Some(w) => args.extend(["--witness", w.to_str().unwrap()]),
        None => args.push("--no-witness"),
    }
    let out = run_vault_audit(&args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "vault-audit verify: expected exit {code}\n{}",
        describe(&out)
    );
    assert!(
        out.stdout.contains(needle),
        "vault-audit verify: expected {needle:?}\n{}",
        describe(&out)
    );
    out
}

/// Notes what `vault-audit` said about a case, for the summary.
fn record(located: &mut Vec<String>, case: &str, out: &CliOutput) {
    let line = out.stdout.lines().next().unwrap_or_default();
    located.push(format!("  {case}: {line}"));
}

/// The seq of the first entry with this action.
fn seq_of(entries: &[ChainedEvent], action: Action) -> u64 {
    entries
        .iter()
        .find(|e| e.event.action == action)
        .unwrap_or_else(|| panic!("no {action:?} entry in the trail"))
        .seq
}

#[test]
fn audit_trail_verifies_and_every_tampering_is_located() {
    let started = Instant::now();
    let mut svc = Service::start_with(Options {
        extra_args: vec![
            "--audit-checkpoint-interval-ms".into(),
            INTERVAL_MS.to_string(),
        ],
        ..Options::default()
    });
    let backend = svc.backend();
    let key = svc.data_dir().join("audit-verify.pub");
    let witness = svc.data_dir().join("audit-checkpoints.jsonl");
    let key_line = std::fs::read_to_string(&key).unwrap_or_default();
    assert!(
        key_line.starts_with("cardvault-audit-ed25519:"),
        "{}: {key_line:?}",
        key.display()
    );

    // The workload, in two rounds, each followed by a checkpoint.
    let client = admin(&svc);
    let kept = token_for(&client, TENANT, TEST_CARDS[0].0);
    let deleted = token_for(&client, TENANT, TEST_CARDS[1].0);
    expect_status(&client.detokenize(&kept, REASON), 200);
    wait_for_checkpoints(&witness, 1);
    expect_status(&client.metadata(&kept), 200);
    let intruder = svc.client_with_authorization("Bearer cvk_not-a-key");
    assert_eq!(intruder.metadata(&kept).status, 401);
    expect_status(&client.delete_token(&deleted), 204);
    wait_for_checkpoints(&witness, 2);
    let status = svc.terminate(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop failed: {status:?}"
    );

    // The copies first: on PostgreSQL, a template must have no sessions.
    let work = temp_data_dir();
    let cases = [
        "one-byte",
        "delete",
        "insert-middle",
        "insert-end",
        "append-chained",
        "swap",
        "truncate",
        "truncate-and-checkpoints",
        "rebuild",
        "delete-checkpoint",
        "unreadable",
    ];
    let copies: Vec<DbCopy> = cases
        .iter()
        .map(|name| DbCopy::make(&svc, work.path(), name))
        .collect();
    let copy = |name: &str| &copies[cases.iter().position(|c| *c == name).unwrap()];

    // The untouched trail.
    let url = svc.database_url();
    let checkpoints = witness_checkpoints(&witness);
    let sizes: Vec<u64> = checkpoints.iter().map(|c| c.tree_size).collect();
    let verify_started = Instant::now();
    let out = verify(&url, &key, Some(&witness), 0, "verified ");
    let verify_ms = verify_started.elapsed().as_millis();
    let export_file = work.path().join("trail.jsonl");
    let exported = run_vault_audit(&[
        "export",
        "--database-url",
        &url,
        "--out",
        export_file.to_str().unwrap(),
    ]);
    assert!(exported.success(), "{}", describe(&exported));
    let entries: Vec<ChainedEvent> =
        audit::ExportReader::new(BufReader::new(File::open(&export_file).unwrap()))
            .filter_map(|r| match r.unwrap() {
                audit::Record::Entry(e) => Some(e),
                _ => None,
            })
            .collect();
    let n = entries.len() as u64;
    let last = *sizes.last().unwrap();
    assert_eq!(last, n, "the shutdown checkpoint covers every entry");
    assert!(
        sizes.len() >= 3,
        "two checkpoints while running, one at stop: {sizes:?}"
    );
    let summary = format!(
        "verified {n} entries and {} checkpoints (root {}, last seq {n}, anchored at {n})",
        sizes.len(),
        audit::auditor::hex(&checkpoints.last().unwrap().root)
    );
    assert!(out.stdout.contains(&summary), "{}", describe(&out));
    assert!(!out.stdout.contains("warning"), "{}", describe(&out));
    verify(&url, &key, None, 0, &summary);

    // Export, then verify the export (with the witness).
    let r = run_vault_audit(&[
        "verify",
        "--key",
        key.to_str().unwrap(),
        "--export",
        export_file.to_str().unwrap(),
        "--witness",
        witness.to_str().unwrap(),
    ]);
    assert!(
        r.success() && r.stdout.contains(&summary),
        "{}",
        describe(&r)
    );

    // Prove one entry (the detokenize), check the proof, flip a byte.
    let detok = seq_of(&entries, Action::Detokenize);
    let covering = *sizes.iter().find(|&&s| s >= detok).unwrap();
    for source in [
        ["--database-url", url.as_str()],
        ["--export", export_file.to_str().unwrap()],
    ] {
        let r = run_vault_audit(&["prove", &detok.to_string(), source[0], source[1]]);
        assert!(r.success(), "{}", describe(&r));
        let proof: audit::EntryProof = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(proof.checkpoint.tree_size, covering);
        let file = work.path().join("proof.json");
        std::fs::write(&file, &r.stdout).unwrap();
        let args = [
            "check-proof",
            "--key",
            key.to_str().unwrap(),
            "--proof",
            file.to_str().unwrap(),
        ];
        let r = run_vault_audit(&args);
        assert!(
            r.success() && r.stdout.contains(&format!("proven: entry {detok}: ")),
            "{}",
            describe(&r)
        );
        let leaf = audit::auditor::hex(&proof.entry.leaf_hash);
        let mut flipped = proof.entry.leaf_hash;
        flipped[9] ^= 0x01;
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            &file,
            text.replacen(&leaf, &audit::auditor::hex(&flipped), 1),
        )
        .unwrap();
        let r = run_vault_audit(&args);
        assert_eq!(r.status.code(), Some(1), "{}", describe(&r));
        assert!(r.stdout.contains("proof REJECTED"), "{}", describe(&r));
    }

    let mut located = Vec::new();

    // One changed byte (a character of the detokenize reason).
    let db = copy("one-byte");
    let reason = entries[(detok - 1) as usize].event.reason.clone().unwrap();
    let changed = reason.replacen('s', "z", 1);
    assert_ne!(changed, reason);
    db.tamper(&format!(
        "UPDATE audit_events SET reason = {} WHERE chain_seq = {detok};",
        text(Some(&changed))
    ));
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!("entry {detok} was changed"),
    );
    record(&mut located, "one byte changed", &out);

    // An entry deleted (the failed authentication).
    let db = copy("delete");
    let auth = seq_of(&entries, Action::AuthenticationFailed);
    db.tamper(&format!(
        "DELETE FROM audit_events WHERE chain_seq = {auth};"
    ));
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!("entry {auth} was removed"),
    );
    record(&mut located, "entry deleted", &out);

    // A forged entry in the middle: later rows renumbered to make room, the
    // forged row chained correctly after its predecessor.
    let db = copy("insert-middle");
    let at = seq_of(&entries, Action::MetadataRead);
    let mut forged = entries[(detok - 1) as usize].event.clone();
    forged.principal = Some("intruder".into());
    forged.reason = Some("nothing to see".into());
    let prev = entries[(at - 2) as usize].chain_hash;
    let row = ChainState::resume(at - 1, prev).append(forged.clone());
    db.tamper(&format!(
        "UPDATE audit_events SET chain_seq = chain_seq + 1000000 WHERE chain_seq >= {at};
         UPDATE audit_events SET chain_seq = chain_seq - 999999 WHERE chain_seq >= 1000000;
         {}",
        insert_row(db, &row)
    ));
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!("a forged entry was inserted as entry {at}"),
    );
    record(&mut located, "forged entry inserted in the middle", &out);

    // A forged entry at the end, with made-up hashes.
    let db = copy("insert-end");
    let mut row =
        ChainState::resume(n, entries[(n - 1) as usize].chain_hash).append(forged.clone());
    row.leaf_hash = [0xab; 32];
    row.chain_hash = [0xcd; 32];
    db.tamper(&insert_row(db, &row));
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!("entry {} was changed", n + 1),
    );
    record(&mut located, "forged entry appended, made-up hashes", &out);

    // The known limit: a forged entry appended with correct hashes after the
    // last checkpoint is protected by the chain only. The chain verifies,
    // but the entry is not covered by a signed checkpoint: exit 3, never 0
    // (after a clean shutdown, which signs a last checkpoint, an uncovered
    // entry is itself a red flag).
    let db = copy("append-chained");
    let row = ChainState::resume(n, entries[(n - 1) as usize].chain_hash).append(forged);
    db.tamper(&insert_row(db, &row));
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        3,
        &format!(
            "not covered: 1 entries ({} to {}) are not yet covered by a signed checkpoint",
            n + 1,
            n + 1
        ),
    );
    located.push(format!(
        "  forged entry appended, correct hashes (known limit, exit 3): {}",
        out.stdout.lines().last().unwrap_or_default()
    ));

    // Two entries swapped (their contents; chain positions stay).
    let db = copy("swap");
    let a = seq_of(&entries, Action::Tokenize);
    let b = at;
    db.tamper(&format!(
        "UPDATE audit_events SET chain_seq = -1 WHERE chain_seq = {a};
         UPDATE audit_events SET chain_seq = {a} WHERE chain_seq = {b};
         UPDATE audit_events SET chain_seq = {b} WHERE chain_seq = -1;"
    ));
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!("entries were reordered: entry {a} is not in its place but at position {b}"),
    );
    record(&mut located, "two entries swapped", &out);

    // The tail cut after the first checkpoint: the later checkpoints say so.
    let first = sizes[0];
    let truncated =
        format!("the trail was truncated: it ends at entry {first} but a signed checkpoint covers {n} entries");
    let db = copy("truncate");
    db.tamper(&format!(
        "DELETE FROM audit_events WHERE chain_seq > {first};"
    ));
    let out = verify(&db.url, &key, None, 1, &truncated);
    record(&mut located, "tail cut", &out);

    // ... and the checkpoints beyond it deleted too: the database alone looks
    // fine, the witness file tells.
    let db = copy("truncate-and-checkpoints");
    db.tamper(&format!(
        "DELETE FROM audit_events WHERE chain_seq > {first};
         DELETE FROM audit_checkpoints WHERE tree_size > {first};"
    ));
    verify(&db.url, &key, None, 0, &format!("verified {first} entries"));
    let out = verify(&db.url, &key, Some(&witness), 1, &truncated);
    record(&mut located, "tail and its checkpoints cut (witness)", &out);

    // The whole chain rebuilt after changing an event, every hash recomputed
    // with the library (all an attacker without the signing key can do):
    // located to the checkpoint interval holding the change.
    let db = copy("rebuild");
    let mut chain = ChainState::resume(detok - 1, entries[(detok - 2) as usize].chain_hash);
    let mut sql = String::new();
    for e in &entries[(detok - 1) as usize..] {
        let mut event = e.event.clone();
        if e.seq == detok {
            event.reason = Some(changed.clone());
        }
        let again = chain.append(event);
        sql += &format!(
            "UPDATE audit_events SET reason = {}, leaf_hash = {}, chain_hash = {} WHERE chain_seq = {};\n",
            text(again.event.reason.as_deref()),
            db.blob(&again.leaf_hash),
            db.blob(&again.chain_hash),
            e.seq
        );
    }
    db.tamper(&sql);
    let before = sizes
        .iter()
        .copied()
        .filter(|&s| s < detok)
        .max()
        .unwrap_or(0);
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!(
            "entries within {} to {covering} were changed and rehashed without the signing key",
            before + 1
        ),
    );
    record(&mut located, "chain rebuilt consistently", &out);

    // A checkpoint deleted from the database: only the witness file tells.
    let db = copy("delete-checkpoint");
    db.tamper(&format!(
        "DELETE FROM audit_checkpoints WHERE tree_size = {first};"
    ));
    verify(
        &db.url,
        &key,
        None,
        0,
        &format!("verified {n} entries and {} checkpoints", sizes.len() - 1),
    );
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!(
            "the checkpoint for {first} entries is in the witness file but not in the database"
        ),
    );
    record(&mut located, "checkpoint deleted (witness)", &out);

    // A row no service writes (a hash set to NULL): named, not misread.
    let db = copy("unreadable");
    db.tamper(&format!(
        "UPDATE audit_events SET leaf_hash = NULL WHERE chain_seq = {auth};"
    ));
    let out = verify(
        &db.url,
        &key,
        Some(&witness),
        1,
        &format!(
            "(chain_seq {auth}) is not an entry the service writes (leaf_hash is not 32 bytes)"
        ),
    );
    record(&mut located, "hash set to NULL", &out);

    drop(copies);
    report(&format!(
        "audit trail ({}): {n} entries, checkpoints at {sizes:?}; untouched trail verified in {verify_ms} ms; \
         {} tamper cases detected and located; {:.1} s in all\n{}",
        backend.name(),
        cases.len() - 1,
        started.elapsed().as_secs_f64(),
        located.join("\n")
    ));
}

/// Retention end to end: after a workload, `tokenizer audit archive` moves
/// the trail up to the last checkpoint into a file, deletes those entries
/// from the database, and `vault-audit` verifies the database alone (from the
/// archived segment's anchor), the file alone, and both joined; a changed
/// archive file, or a missing one in the sequence, is caught and located.
/// The service then goes on appending to the same chain.
#[test]
fn archived_segments_verify_alone_and_joined_to_the_database() {
    let mut svc = Service::start_with(Options {
        extra_args: vec![
            "--audit-checkpoint-interval-ms".into(),
            INTERVAL_MS.to_string(),
        ],
        ..Options::default()
    });
    let key = svc.data_dir().join("audit-verify.pub");
    let witness = svc.data_dir().join("audit-checkpoints.jsonl");
    let client = admin(&svc);
    let token = token_for(&client, TENANT, TEST_CARDS[0].0);
    expect_status(&client.detokenize(&token, REASON), 200);
    assert!(svc
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let url = svc.database_url();
    let size_before = witness_checkpoints(&witness).last().unwrap().tree_size;

    // Below the PCI DSS minimum only when asked for.
    let refused = svc.cli(&["audit", "archive", "--older-than-days", "0"]);
    assert!(
        !refused.success() && refused.stderr.contains("PCI DSS 10.5.1"),
        "{refused:?}"
    );
    // The cutoff is compared to the second: let the last checkpoint age.
    std::thread::sleep(Duration::from_millis(2100));
    let out = svc.cli(&[
        "audit",
        "archive",
        "--older-than-days",
        "0",
        "--below-pci-minimum",
    ]);
    assert!(out.success(), "{out:?}");
    let printed: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(printed["archived"]["from_seq"], 1, "{printed}");
    assert_eq!(printed["archived"]["to_seq"], size_before, "{printed}");
    assert_eq!(printed["deleted_from_database"], size_before, "{printed}");
    let file = PathBuf::from(printed["archived"]["file"].as_str().unwrap());
    assert_eq!(
        file.parent(),
        Some(svc.data_dir().join("audit-archive").as_path())
    );
    let (k, f) = (key.to_str().unwrap(), file.to_str().unwrap());

    // The service goes on; its new entries chain after the archived ones.
    svc.restart();
    let reader = svc.principal_client("e2e-reader", &["tokenize"], &["*"]);
    expect_status(&reader.metadata(&token), 200);
    assert!(svc
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    let size_after = witness_checkpoints(&witness).last().unwrap().tree_size;
    assert!(size_after > size_before + 1);

    // The database alone: from the anchor; the file alone; both joined.
    let online = verify(
        &url,
        &key,
        Some(&witness),
        0,
        &format!("last seq {size_after}"),
    );
    assert!(
        online
            .stdout
            .contains(&format!("started after entry {size_before}")),
        "{}",
        describe(&online)
    );
    let alone = run_vault_audit(&["verify", "--key", k, "--archive", f]);
    assert!(
        alone.success()
            && alone
                .stdout
                .contains(&format!("verified {size_before} entries")),
        "{}",
        describe(&alone)
    );
    let joined = run_vault_audit(&[
        "verify",
        "--key",
        k,
        "--archive",
        f,
        "--database-url",
        &url,
        "--witness",
        witness.to_str().unwrap(),
    ]);
    assert!(joined.success(), "{}", describe(&joined));
    assert!(
        joined
            .stdout
            .contains(&format!("verified {size_after} entries")),
        "{}",
        describe(&joined)
    );

    // One changed byte in the archive file is located.
    let work = temp_data_dir();
    let text = std::fs::read_to_string(&file).unwrap();
    let forged = work.path().join("forged.jsonl");
    std::fs::write(
        &forged,
        text.replacen(REASON, &REASON.replacen('e', "f", 1), 1),
    )
    .unwrap();
    let entries: Vec<ChainedEvent> = audit::ExportReader::new(text.as_bytes())
        .filter_map(|r| match r.unwrap() {
            audit::Record::Entry(e) => Some(e),
            _ => None,
        })
        .collect();
    let detok = seq_of(&entries, Action::Detokenize);
    let bad = run_vault_audit(&[
        "verify",
        "--key",
        k,
        "--archive",
        forged.to_str().unwrap(),
        "--database-url",
        &url,
        "--no-witness",
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", describe(&bad));
    assert!(
        bad.stdout.contains(&format!("entry {detok} was changed")),
        "{}",
        describe(&bad)
    );

    // The database cannot be verified as if nothing had been archived: a
    // segment file that starts later (here: none before the database's
    // entries) does not join up.
    let tail = work.path().join("tail.jsonl");
    let exported = run_vault_audit(&[
        "export",
        "--database-url",
        &url,
        "--out",
        tail.to_str().unwrap(),
    ]);
    assert!(exported.success(), "{}", describe(&exported));
    let gap = run_vault_audit(&[
        "verify",
        "--key",
        k,
        "--archive",
        tail.to_str().unwrap(),
        "--database-url",
        &url,
        "--no-witness",
    ]);
    assert_eq!(gap.status.code(), Some(1), "{}", describe(&gap));
    assert!(gap.stdout.contains("overlap"), "{}", describe(&gap));
    // A range export of the database verifies on its own too.
    let again = run_vault_audit(&["verify", "--key", k, "--export", tail.to_str().unwrap()]);
    assert!(again.success(), "{}", describe(&again));

    // Only archived rows can be deleted, even by the owner.
    let delete = format!(
        "DELETE FROM audit_events WHERE chain_seq = {}",
        size_before + 1
    );
    let refused = match svc.backend() {
        Backend::Sqlite => std::panic::catch_unwind(|| {
            sqlite_execute(Path::new(url.trim_start_matches("sqlite://")), &delete)
        }),
        Backend::Postgres => std::panic::catch_unwind(|| pg_execute(&url, &delete)),
    };
    assert!(refused.is_err(), "an unarchived entry was deleted");
    verify(
        &url,
        &key,
        Some(&witness),
        0,
        &format!("last seq {size_after}"),
    );
}

/// The audit signing key rotated through the admin API on the real
/// service, with cards tokenized before and after: the old key announces the
/// new one (in the database and the witness file), later checkpoints are
/// signed by the new key, `audit-verify.pub` lists both, and `vault-audit
/// verify` accepts the export and the database with the first key only
/// (exit 0) and refuses them with a wrong key (exit 1).
#[test]
fn a_signing_key_rotation_verifies_from_the_first_key_only() {
    let mut svc = Service::start_with(Options {
        extra_args: vec![
            "--audit-checkpoint-interval-ms".into(),
            INTERVAL_MS.to_string(),
        ],
        ..Options::default()
    });
    let work = temp_data_dir();
    let key = svc.data_dir().join("audit-verify.pub");
    let witness = svc.data_dir().join("audit-checkpoints.jsonl");
    let first = work.path().join("first.pub");
    std::fs::copy(&key, &first).unwrap();
    let first_key = audit::VerifyingKey::parse(&std::fs::read_to_string(&first).unwrap()).unwrap();

    let client = admin(&svc);
    let before = token_for(&client, TENANT, TEST_CARDS[0].0);
    wait_for_checkpoints(&witness, 1);
    let key_admin = svc.principal_client("key-admin", &["key_admin"], &["*"]);
    let rotated = key_admin.post_json(
        "/v1/admin/keys/audit_signing/rotate",
        &serde_json::json!({}),
    );
    expect_status(&rotated, 200);
    assert_eq!(rotated.json["generation"].as_u64(), Some(2), "{rotated}");
    assert_eq!(
        rotated.json["previous_key_id"].as_str(),
        Some(first_key.key_id())
    );
    let new_key = audit::VerifyingKey::parse(rotated.json["public_key"].as_str().unwrap()).unwrap();
    let announced = witness_checkpoints(&witness);
    let announcement = announced.last().unwrap();
    assert_eq!(announcement.key_id, first_key.key_id());
    assert_eq!(announcement.next_key.as_ref(), Some(&new_key));
    assert_eq!(
        rotated.json["announced_at_tree_size"].as_u64(),
        Some(announcement.tree_size)
    );
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        format!("{first_key}\n{new_key}\n")
    );
    // Key status lists both generations.
    let status = key_admin.get("/v1/admin/keys");
    expect_status(&status, 200);
    let states: Vec<&str> = status.json["audit_signing_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["retired", "active"], "{status}");
    // A signing key is retired by its rotation only: retiring one is
    // refused, and the refusal is in the trail.
    for (generation, status, code) in [
        (2, 409, "key_active"),
        (1, 409, "key_state"),
        (9, 404, "key_not_found"),
    ] {
        let resp = key_admin.post_json(
            &format!("/v1/admin/keys/audit_signing/{generation}/retire"),
            &serde_json::json!({}),
        );
        expect_status(&resp, status);
        assert_eq!(resp.error_code(), Some(code), "{resp}");
    }
    let auditor = svc.principal_client("retire-auditor", &["auditor"], &["*"]);
    let refused = auditor.get("/v1/audit/events?limit=1000&action=key_retired&outcome=failure");
    expect_status(&refused, 200);
    let details: Vec<(&str, &str)> = refused.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"]["detail"].as_str().unwrap_or(""),
                e["event"]["error_code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        details,
        [
            ("audit_signing:2", "key_active"),
            ("audit_signing:1", "key_state"),
            ("audit_signing:9", "key_not_found"),
        ],
        "{refused}"
    );

    let after = token_for(&client, TENANT, TEST_CARDS[1].0);
    expect_status(&client.detokenize(&before, REASON), 200);
    expect_status(&client.detokenize(&after, REASON), 200);
    wait_for_checkpoints(&witness, announced.len() + 1);
    let status = svc.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let checkpoints = witness_checkpoints(&witness);
    let last = checkpoints.last().unwrap();
    assert_eq!(last.key_id, new_key.key_id(), "signed by the new key");
    assert!(checkpoints
        .iter()
        .filter(|c| c.tree_size > announcement.tree_size)
        .all(|c| c.key_id == new_key.key_id()));

    let url = svc.database_url();
    let export = work.path().join("trail.jsonl");
    let out = run_vault_audit(&[
        "export",
        "--database-url",
        &url,
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(out.success(), "{}", describe(&out));
    let wrong = work.path().join("wrong.pub");
    std::fs::write(
        &wrong,
        format!(
            "{}\n",
            audit::SigningKey::generate().unwrap().verifying_key()
        ),
    )
    .unwrap();
    let handed_over = format!(
        "signing key {} handed over to {}",
        first_key.key_id(),
        new_key.key_id()
    );
    let e = export.to_str().unwrap();
    let w = witness.to_str().unwrap();
    for (k, code) in [(&first, 0), (&wrong, 1)] {
        let k = k.to_str().unwrap();
        let out = run_vault_audit(&["verify", "--key", k, "--export", e, "--witness", w]);
        assert_eq!(out.status.code(), Some(code), "{}", describe(&out));
        let out = run_vault_audit(&["verify", "--key", k, "--database-url", &url, "--witness", w]);
        assert_eq!(out.status.code(), Some(code), "{}", describe(&out));
        if code == 0 {
            assert!(out.stdout.contains(&handed_over), "{}", describe(&out));
        } else {
            assert!(
                out.stdout.contains("verification FAILED"),
                "{}",
                describe(&out)
            );
        }
    }
}
