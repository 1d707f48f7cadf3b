//! The `vault-audit` binary against SQLite trails built with the library in
//! the service's own schema (`vault/migrations/sqlite`): verify (database,
//! export, witness), export, prove, check-proof, exit statuses, and the
//! tampering a DBA could do, located.
//!
//! `generate_bench_trail` (ignored) builds a large trail for timing:
//! `VAULT_AUDIT_BENCH_DB=/tmp/trail.db cargo test --release -p cardvault-audit
//! --test vault_audit generate_bench_trail -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use audit::{Action, AuditEvent, ChainedEvent, Checkpoint, Outcome, SigningKey, Trail};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use time::{Duration, OffsetDateTime};

const SCHEMA: [&str; 3] = [
    include_str!("../../vault/migrations/sqlite/0001_foundation.sql"),
    include_str!("../../vault/migrations/sqlite/0002_audit_chain.sql"),
    include_str!("../../vault/migrations/sqlite/0003_audit_archive.sql"),
];

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn event(i: u64) -> AuditEvent {
    let actions = [
        Action::Tokenize,
        Action::Detokenize,
        Action::MetadataRead,
        Action::Delete,
        Action::AuthenticationFailed,
    ];
    let mut e = AuditEvent::new(actions[(i % 5) as usize], Outcome::Success)
        .principal(format!("svc-{}", i % 4))
        .source("10.0.0.7:51234")
        .tenant(format!("tenant-{}", i % 3))
        .token(format!("tok_{:022x}", i * 7919))
        .request_id(format!("req-{i}"));
    if i % 5 == 1 {
        e = e.reason("chargeback review");
    }
    if i % 7 == 3 {
        // Text that JSON must escape, and non-ASCII: read back exactly.
        e = e
            .reason("quote \" backslash \\ tab \t nl \n ctl \u{1} é ✓ 𝄞 '")
            .detail("");
    }
    e.time = OffsetDateTime::UNIX_EPOCH + Duration::days(20_000) + Duration::milliseconds(i as i64);
    e
}

async fn create_db(path: &Path) -> SqliteConnection {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .connect()
        .await
        .unwrap();
    for sql in SCHEMA {
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    }
    conn
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn insert_entries(conn: &mut SqliteConnection, entries: &[ChainedEvent]) {
    for chunk in entries.chunks(1000) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO audit_events (time, principal, source, action, tenant, token, outcome, \
             error_code, request_id, reason, detail, chain_seq, leaf_hash, chain_hash) ",
        );
        q.push_values(chunk, |mut b, c| {
            let e = &c.event;
            b.push_bind(rfc3339(e.time))
                .push_bind(e.principal.clone())
                .push_bind(e.source.clone())
                .push_bind(e.action.as_str())
                .push_bind(e.tenant.clone())
                .push_bind(e.token.clone())
                .push_bind(e.outcome.as_str())
                .push_bind(e.error_code.clone())
                .push_bind(e.request_id.clone())
                .push_bind(e.reason.clone())
                .push_bind(e.detail.clone())
                .push_bind(c.seq as i64)
                .push_bind(c.leaf_hash.to_vec())
                .push_bind(c.chain_hash.to_vec());
        });
        q.build().execute(&mut *conn).await.unwrap();
    }
}

async fn insert_checkpoint(conn: &mut SqliteConnection, cp: &Checkpoint) {
    sqlx::query(
        "INSERT INTO audit_checkpoints (tree_size, root, chain_head, time, key_id, signature) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(cp.tree_size as i64)
    .bind(cp.root.to_vec())
    .bind(cp.chain_head.to_vec())
    .bind(rfc3339(cp.time))
    .bind(&cp.key_id)
    .bind(cp.signature.to_vec())
    .execute(conn)
    .await
    .unwrap();
}

/// A trail in a fresh SQLite file: `n` entries, a checkpoint every `every`
/// entries (also in the witness file), the public key in a file.
struct Fixture {
    dir: PathBuf,
    db: PathBuf,
    key: PathBuf,
    witness: PathBuf,
    signing: SigningKey,
    entries: Vec<ChainedEvent>,
    checkpoints: Vec<Checkpoint>,
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "vault-audit-{name}-{}-{}",
        std::process::id(),
        OffsetDateTime::now_utc().unix_timestamp_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Fixture {
    fn build(name: &str, n: u64, every: u64) -> Self {
        let dir = fresh_dir(name);
        let db = dir.join("cardvault.db");
        let signing = SigningKey::generate().unwrap();
        let mut trail = Trail::new();
        let mut entries = Vec::new();
        let mut checkpoints = Vec::new();
        for i in 1..=n {
            entries.push(trail.append(event(i)));
            if i % every == 0 {
                checkpoints.push(trail.checkpoint(&signing, OffsetDateTime::now_utc()));
            }
        }
        block_on(async {
            let mut conn = create_db(&db).await;
            insert_entries(&mut conn, &entries).await;
            for cp in &checkpoints {
                insert_checkpoint(&mut conn, cp).await;
            }
            conn.close().await.unwrap();
        });
        let key = dir.join("audit-verify.pub");
        std::fs::write(&key, format!("{}\n", signing.verifying_key())).unwrap();
        let witness = dir.join("audit-checkpoints.jsonl");
        let lines: String = checkpoints
            .iter()
            .map(|c| audit::export::checkpoint_line(c).unwrap() + "\n")
            .collect();
        std::fs::write(&witness, lines).unwrap();
        Self {
            dir,
            db,
            key,
            witness,
            signing,
            entries,
            checkpoints,
        }
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.db.display())
    }

    /// SQL on the database as a DBA would run it: append-only triggers
    /// dropped first.
    fn tamper(&self, sql: &str) {
        block_on(async {
            let mut conn = SqliteConnectOptions::new()
                .filename(&self.db)
                .connect()
                .await
                .unwrap();
            sqlx::raw_sql(
                "DROP TRIGGER IF EXISTS audit_events_no_update;
                 DROP TRIGGER IF EXISTS audit_events_no_delete;
                 DROP TRIGGER IF EXISTS audit_checkpoints_no_update;
                 DROP TRIGGER IF EXISTS audit_checkpoints_no_delete;",
            )
            .execute(&mut conn)
            .await
            .unwrap();
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
            conn.close().await.unwrap();
        });
    }

    fn verify(&self, witness: bool) -> Run {
        let mut args = vec![
            "verify".to_string(),
            "--key".into(),
            self.key.display().to_string(),
            "--database-url".into(),
            self.url(),
        ];
        if witness {
            args.push("--witness".into());
            args.push(self.witness.display().to_string());
        } else {
            args.push("--no-witness".into());
        }
        run(&args)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_vault-audit"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[track_caller]
fn expect(run: &Run, code: i32, needle: &str) {
    assert_eq!(run.code, code, "{run:#?}");
    assert!(
        run.stdout.contains(needle) || run.stderr.contains(needle),
        "expected {needle:?} in {run:#?}"
    );
}

#[test]
fn untouched_trail_verifies_with_and_without_witness() {
    // Every entry covered by a checkpoint: exit 0, and only then.
    let f = Fixture::build("covered", 200, 100);
    let r = f.verify(true);
    expect(&r, 0, "verified 200 entries and 2 checkpoints");
    assert!(!r.stdout.contains("not covered"), "{r:#?}");
    let r = f.verify(false);
    expect(&r, 0, "verified without the witness file (--no-witness)");

    // A live database between checkpoints: the chain verifies, the tail is
    // not covered yet: exit 3, saying how many.
    let f = Fixture::build("untouched", 250, 100);
    let root = audit::auditor::hex(&{
        let mut t = Trail::new();
        f.entries.iter().for_each(|e| assert!(t.append_chained(e)));
        t.root()
    });
    let r = f.verify(false);
    expect(
        &r,
        3,
        &format!(
            "verified 250 entries and 2 checkpoints (root {root}, last seq 250, anchored at 200)"
        ),
    );
    expect(
        &r,
        3,
        "not covered: 50 entries (201 to 250) are not yet covered by a signed checkpoint",
    );
    let r = f.verify(true);
    expect(
        &r,
        3,
        "witness file: 2 checkpoints, each one present and identical in the database",
    );
    expect(&r, 3, "not covered: 50 entries (201 to 250)");
    // Without the witness file a database verification is refused unless
    // --no-witness says so knowingly.
    let r = run(&[
        "verify",
        "--key",
        f.key.to_str().unwrap(),
        "--database-url",
        &f.url(),
    ]);
    expect(&r, 2, "--database-url needs the witness file");
    assert!(!r.stdout.contains("verified"), "{r:#?}");
    // The database was not written (no new files, same bytes).
    let before = std::fs::read(&f.db).unwrap();
    f.verify(true);
    assert_eq!(std::fs::read(&f.db).unwrap(), before);
}

#[test]
fn tampering_is_located() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "one byte",
            "UPDATE audit_events SET principal = 'svc-9' WHERE chain_seq = 17",
            "entry 17 was changed",
        ),
        (
            "delete",
            "DELETE FROM audit_events WHERE chain_seq = 42",
            "entry 42 was removed",
        ),
        (
            "swap",
            "UPDATE audit_events SET chain_seq = -1 WHERE chain_seq = 30;
             UPDATE audit_events SET chain_seq = 30 WHERE chain_seq = 31;
             UPDATE audit_events SET chain_seq = 31 WHERE chain_seq = -1;",
            "entry 30 is not in its place but at position 31",
        ),
        (
            "truncate",
            "DELETE FROM audit_events WHERE chain_seq > 190",
            "ends at entry 190 but a signed checkpoint covers 200 entries",
        ),
        (
            "null hash",
            "UPDATE audit_events SET leaf_hash = NULL WHERE chain_seq = 5",
            "position 5 of the chain (chain_seq 5) is not an entry the service writes (leaf_hash is not 32 bytes)",
        ),
        (
            "bad time",
            "UPDATE audit_events SET time = 'yesterday' WHERE chain_seq = 6",
            "(time is not RFC 3339)",
        ),
        (
            "blob in a text column",
            "UPDATE audit_events SET principal = x'41' WHERE chain_seq = 7",
            "(chain_seq 7) is not an entry the service writes (principal is not text)",
        ),
        (
            "text in chain_seq",
            "UPDATE audit_events SET chain_seq = 'eight' WHERE chain_seq = 8",
            // Text sorts after every integer: entry 8 is missing from its place.
            "entry 8 was removed",
        ),
        (
            "hex text as a hash",
            "UPDATE audit_events SET chain_hash = lower(hex(chain_hash)) WHERE chain_seq = 9",
            "(chain_seq 9) is not an entry the service writes (chain_hash is not 32 bytes)",
        ),
        (
            "unknown action",
            "UPDATE audit_events SET action = 'tokenise' WHERE chain_seq = 10",
            "(chain_seq 10) is not an entry the service writes (unknown action)",
        ),
        (
            "bad checkpoint row",
            "UPDATE audit_checkpoints SET signature = x'00' WHERE tree_size = 100",
            "a checkpoint row (tree_size 100) is not a checkpoint the service writes",
        ),
    ];
    for (name, sql, needle) in cases {
        let f = Fixture::build("tamper", 250, 100);
        f.tamper(sql);
        let r = f.verify(false);
        assert!(
            r.stdout.starts_with("verification FAILED: "),
            "{name}: {r:#?}"
        );
        expect(&r, 1, needle);
    }
}

#[test]
fn removed_or_rewritten_checkpoints_are_caught_by_the_witness() {
    let f = Fixture::build("witness", 250, 100);
    // All checkpoints deleted and the tail cut: without the witness the
    // chain is intact, but with no signed checkpoint that proves nothing:
    // a failure, never a success with a warning.
    f.tamper("DELETE FROM audit_checkpoints; DELETE FROM audit_events WHERE chain_seq > 150;");
    expect(
        &f.verify(false),
        1,
        "verification FAILED: 150 entries and no signed checkpoint",
    );
    expect(
        &f.verify(true),
        1,
        "ends at entry 150 but a signed checkpoint covers 200 entries",
    );

    let f = Fixture::build("witness", 250, 100);
    f.tamper("DELETE FROM audit_checkpoints WHERE tree_size = 200");
    let r = f.verify(false);
    expect(&r, 3, "verified 250 entries and 1 checkpoints");
    expect(&r, 3, "not covered: 150 entries (101 to 250)");
    expect(&r, 3, "--no-witness");
    expect(
        &f.verify(true),
        1,
        "the checkpoint for 200 entries is in the witness file but not in the database",
    );

    // A genuine checkpoint's time rewritten: its signature no longer holds.
    let f = Fixture::build("witness", 250, 100);
    f.tamper("UPDATE audit_checkpoints SET time = '2000-01-01T00:00:00Z' WHERE tree_size = 100");
    expect(
        &f.verify(true),
        1,
        "the checkpoint for 100 entries is forged or damaged",
    );

    // Two witness files (two instances), one of them stale.
    let f = Fixture::build("witness", 250, 100);
    let stale = f.dir.join("stale.jsonl");
    std::fs::write(
        &stale,
        audit::export::checkpoint_line(&f.checkpoints[0]).unwrap() + "\n",
    )
    .unwrap();
    let args = |witnesses: &[&Path]| {
        let mut a = vec![
            "verify".to_string(),
            "--key".into(),
            f.key.display().to_string(),
        ];
        a.extend(["--database-url".into(), f.url()]);
        for w in witnesses {
            a.extend(["--witness".into(), w.display().to_string()]);
        }
        a
    };
    expect(
        &run(&args(&[&f.witness, &stale])),
        3,
        "witness file: 3 checkpoints",
    );
    f.tamper("DELETE FROM audit_checkpoints WHERE tree_size = 100");
    expect(
        &run(&args(&[&stale, &f.witness])),
        1,
        "the checkpoint for 100 entries is in the witness file but not in the database",
    );

    // A witness file out of order (two instances appending) still works.
    let f = Fixture::build("witness", 250, 50);
    let mut lines: Vec<String> = std::fs::read_to_string(&f.witness)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.reverse();
    std::fs::write(&f.witness, lines.join("\n") + "\n").unwrap();
    expect(&f.verify(true), 0, "witness file: 5 checkpoints");
    f.tamper("DELETE FROM audit_checkpoints WHERE tree_size = 150");
    expect(
        &f.verify(true),
        1,
        "the checkpoint for 150 entries is in the witness file",
    );
}

#[test]
fn rebuilt_chain_is_located_to_a_checkpoint_interval() {
    let f = Fixture::build("rebuild", 250, 100);
    let mut trail = Trail::new();
    let mut updates = String::new();
    for e in &f.entries {
        let mut event = e.event.clone();
        if e.seq == 123 {
            event.reason = Some("rewritten".into());
        }
        let again = trail.append(event);
        if again != *e {
            updates += &format!(
                "UPDATE audit_events SET reason = {}, leaf_hash = x'{}', chain_hash = x'{}' WHERE chain_seq = {};\n",
                again
                    .event
                    .reason
                    .as_deref()
                    .map_or("NULL".into(), |r| format!("'{}'", r.replace('\'', "''"))),
                audit::auditor::hex(&again.leaf_hash),
                audit::auditor::hex(&again.chain_hash),
                e.seq
            );
        }
    }
    f.tamper(&updates);
    expect(
        &f.verify(false),
        1,
        "entries within 101 to 200 were changed and rehashed without the signing key",
    );
}

#[test]
fn legacy_rows_are_counted_not_failed() {
    let f = Fixture::build("legacy", 20, 10);
    f.tamper(
        "INSERT INTO audit_events (time, action, outcome) VALUES ('2020-01-01T00:00:00Z', 'service_start', 'success');
         INSERT INTO audit_events (time, action, outcome) VALUES ('2020-01-01T00:00:01Z', 'service_stop', 'success');",
    );
    let r = f.verify(true);
    expect(&r, 0, "verified 20 entries and 2 checkpoints");
    expect(&r, 0, "note: 2 audit rows predate the chain");
}

#[test]
fn export_then_verify_export() {
    let f = Fixture::build("export", 250, 100);
    let out = f.dir.join("trail.jsonl");
    let r = run(&[
        "export",
        "--database-url",
        &f.url(),
        "--out",
        out.to_str().unwrap(),
    ]);
    expect(&r, 0, "exported 2 checkpoints and 250 entries");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 252);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Never overwritten.
    let again = run(&[
        "export",
        "--database-url",
        &f.url(),
        "--out",
        out.to_str().unwrap(),
    ]);
    expect(&again, 2, "cannot create");

    let key = f.key.to_str().unwrap();
    let witness = f.witness.to_str().unwrap();
    let r = run(&[
        "verify",
        "--key",
        key,
        "--export",
        out.to_str().unwrap(),
        "--witness",
        witness,
    ]);
    expect(&r, 3, "verified 250 entries and 2 checkpoints");
    expect(&r, 3, "identical in the export");
    expect(&r, 3, "not covered: 50 entries (201 to 250)");

    // Stdout export is the same bytes.
    let r = run(&["export", "--database-url", &f.url()]);
    assert_eq!(r.code, 0);
    assert_eq!(r.stdout, text);

    // One changed byte in the export file.
    let changed = f.dir.join("changed.jsonl");
    std::fs::write(&changed, text.replacen("\"svc-1\"", "\"svc-7\"", 1)).unwrap();
    let r = run(&[
        "verify",
        "--key",
        key,
        "--export",
        changed.to_str().unwrap(),
    ]);
    expect(&r, 1, "entry 1 was changed");

    // Checkpoints missing from an export: the witness notices.
    let stripped = f.dir.join("stripped.jsonl");
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("{\"type\":\"checkpoint\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&stripped, body).unwrap();
    let r = run(&[
        "verify",
        "--key",
        key,
        "--export",
        stripped.to_str().unwrap(),
    ]);
    expect(
        &r,
        1,
        "verification FAILED: 250 entries and no signed checkpoint",
    );
    let r = run(&[
        "verify",
        "--key",
        key,
        "--export",
        stripped.to_str().unwrap(),
        "--witness",
        witness,
    ]);
    expect(&r, 1, "is in the witness file but not in the export");

    // Range exports: an anchor line (the state before the range), the
    // checkpoints from the anchor to the range's end, the entries in range.
    // They verify on their own: the first checkpoint confirms the anchor.
    let r = run(&[
        "export",
        "--database-url",
        &f.url(),
        "--from",
        "101",
        "--to",
        "150",
    ]);
    assert_eq!(r.code, 0, "{r:#?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 52);
    assert!(lines[0].starts_with("{\"type\":\"anchor\",\"tree_size\":100,"));
    assert!(lines[1].starts_with("{\"type\":\"checkpoint\",\"tree_size\":100,"));
    assert!(lines[2].starts_with("{\"type\":\"entry\",\"seq\":101,"));
    assert!(lines[51].starts_with("{\"type\":\"entry\",\"seq\":150,"));
    let part = f.dir.join("part.jsonl");
    std::fs::write(&part, &r.stdout).unwrap();
    let r = run(&["verify", "--key", key, "--export", part.to_str().unwrap()]);
    expect(&r, 3, "verified 50 entries and 1 checkpoints");
    expect(&r, 3, "not covered: 50 entries (101 to 150)");
    // A range between checkpoints: its anchor is confirmed by the next one.
    let r = run(&[
        "export",
        "--database-url",
        &f.url(),
        "--from",
        "42",
        "--to",
        "200",
    ]);
    let mid = f.dir.join("mid.jsonl");
    std::fs::write(&mid, &r.stdout).unwrap();
    let r = run(&["verify", "--key", key, "--export", mid.to_str().unwrap()]);
    expect(&r, 0, "verified 159 entries and 2 checkpoints");
    expect(&r, 0, "anchored at 200");
    // A forged anchor is caught there.
    let forged = std::fs::read_to_string(&mid).unwrap();
    let first = forged.lines().next().unwrap();
    let i = first.find("\"frontier\":[\"").unwrap() + 13;
    let flipped = if &first[i..i + 1] == "0" { "1" } else { "0" };
    let forged = format!("{}{flipped}{}", &forged[..i], &forged[i + 1..]);
    std::fs::write(&mid, forged).unwrap();
    let r = run(&["verify", "--key", key, "--export", mid.to_str().unwrap()]);
    expect(&r, 1, "entries within 42 to 100 were changed");
}

#[test]
fn prove_and_check_proof() {
    let f = Fixture::build("prove", 250, 100);
    let key = f.key.to_str().unwrap();
    let r = run(&["prove", "77", "--database-url", &f.url()]);
    assert_eq!(r.code, 0, "{r:#?}");
    let proof: audit::EntryProof = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        proof.checkpoint.tree_size, 100,
        "smallest covering checkpoint"
    );
    assert_eq!(proof.entry, f.entries[76]);
    let file = f.dir.join("proof.json");
    std::fs::write(&file, &r.stdout).unwrap();
    let r = run(&[
        "check-proof",
        "--key",
        key,
        "--proof",
        file.to_str().unwrap(),
    ]);
    expect(&r, 0, "proven: entry 77:");
    expect(&r, 0, "is entry 77 of the trail of 100 entries that key");

    // Against a chosen checkpoint, from an export.
    let export = f.dir.join("trail.jsonl");
    run(&[
        "export",
        "--database-url",
        &f.url(),
        "--out",
        export.to_str().unwrap(),
    ]);
    let r = run(&[
        "prove",
        "77",
        "--export",
        export.to_str().unwrap(),
        "--checkpoint",
        "200",
    ]);
    assert_eq!(r.code, 0, "{r:#?}");
    let proof2: audit::EntryProof = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(proof2.checkpoint, f.checkpoints[1]);
    proof2.verify(&f.signing.verifying_key()).unwrap();

    // Not covered yet, no such checkpoint: usage errors.
    expect(
        &run(&["prove", "230", "--database-url", &f.url()]),
        2,
        "no checkpoint covers entry 230",
    );
    expect(
        &run(&[
            "prove",
            "7",
            "--database-url",
            &f.url(),
            "--checkpoint",
            "150",
        ]),
        2,
        "there is no checkpoint for 150 entries",
    );

    // A flipped byte anywhere that matters: rejected.
    let text = std::fs::read_to_string(&file).unwrap();
    let hash = audit::auditor::hex(&proof.path[0]);
    let flipped_hash = {
        let mut h = proof.path[0];
        h[0] ^= 1;
        audit::auditor::hex(&h)
    };
    let cases = [
        (
            text.replacen(&hash, &flipped_hash, 1),
            "the path does not lead",
        ),
        (
            text.replacen("\"svc-", "\"svc-x", 1),
            "content does not match its leaf hash",
        ),
        (
            text.replacen("\"tree_size\": 100", "\"tree_size\": 101", 1),
            "signature is invalid",
        ),
        (text.replacen('{', "[", 1), "not a proof"),
    ];
    for (bad, needle) in cases {
        assert_ne!(bad, text);
        std::fs::write(&file, bad).unwrap();
        let r = run(&[
            "check-proof",
            "--key",
            key,
            "--proof",
            file.to_str().unwrap(),
        ]);
        expect(&r, 1, needle);
    }
    // A proof checked with another key.
    std::fs::write(&file, &text).unwrap();
    let other = f.dir.join("other.pub");
    std::fs::write(
        &other,
        format!("{}\n", SigningKey::generate().unwrap().verifying_key()),
    )
    .unwrap();
    let r = run(&[
        "check-proof",
        "--key",
        other.to_str().unwrap(),
        "--proof",
        file.to_str().unwrap(),
    ]);
    expect(&r, 1, "which is not trusted");
}

#[test]
fn usage_and_io_errors_exit_2() {
    let f = Fixture::build("usage", 5, 5);
    let key = f.key.to_str().unwrap();
    // A database verification, knowingly without a witness file.
    let no_witness = |key: &str, url: &str| {
        run(&[
            "verify",
            "--key",
            key,
            "--database-url",
            url,
            "--no-witness",
        ])
    };
    let missing = f.dir.join("missing.db");
    let r = no_witness(key, &format!("sqlite://{}", missing.display()));
    expect(&r, 2, "cannot open the database");
    assert!(!missing.exists(), "never created");
    expect(&run(&["verify", "--key", key]), 2, "--database-url");
    expect(
        &run(&[
            "verify",
            "--key",
            key,
            "--database-url",
            &f.url(),
            "--export",
            "x",
        ]),
        2,
        "cannot be used with",
    );
    expect(
        &run(&[
            "verify",
            "--key",
            key,
            "--database-url",
            &f.url(),
            "--no-witness",
            "--witness",
            f.witness.to_str().unwrap(),
        ]),
        2,
        "cannot be used with",
    );
    expect(
        &no_witness("/nonexistent", &f.url()),
        2,
        "cannot read the key file",
    );
    let bad_key = f.dir.join("bad.pub");
    std::fs::write(&bad_key, "ssh-ed25519 AAAA\n").unwrap();
    expect(
        &no_witness(bad_key.to_str().unwrap(), &f.url()),
        2,
        "a public key line is",
    );
    expect(&no_witness(key, "mysql://x"), 2, "unsupported database URL");
    let bad_witness = f.dir.join("bad.jsonl");
    std::fs::write(&bad_witness, "not json\n").unwrap();
    expect(
        &run(&[
            "verify",
            "--key",
            key,
            "--database-url",
            &f.url(),
            "--witness",
            bad_witness.to_str().unwrap(),
        ]),
        2,
        "witness file, line 1",
    );
    // The wrong public key: checkpoints are refused (a verdict, exit 1).
    let other = f.dir.join("other.pub");
    std::fs::write(
        &other,
        format!("{}\n", SigningKey::generate().unwrap().verifying_key()),
    )
    .unwrap();
    expect(
        &no_witness(other.to_str().unwrap(), &f.url()),
        1,
        "which is not trusted",
    );
    let r = run(&["--help"]);
    expect(&r, 0, "check-proof");
    let r = run(&["export", "--help"]);
    expect(&r, 0, "verifies on its own");
}

/// Builds a large trail for timing `vault-audit verify` (see the module doc).
#[test]
#[ignore]
fn generate_bench_trail() {
    let Ok(db) = std::env::var("VAULT_AUDIT_BENCH_DB") else {
        eprintln!("set VAULT_AUDIT_BENCH_DB=/path/to/new.db");
        return;
    };
    let n: u64 = std::env::var("VAULT_AUDIT_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let every = 10_000;
    let db = PathBuf::from(db);
    assert!(!db.exists(), "{} exists", db.display());
    let started = Instant::now();
    let signing = SigningKey::generate().unwrap();
    let mut witness = String::new();
    block_on(async {
        let mut conn = create_db(&db).await;
        let mut trail = Trail::new();
        let mut batch = Vec::with_capacity(every as usize);
        for i in 1..=n {
            batch.push(trail.append(event(i)));
            if i % every == 0 || i == n {
                let mut tx = conn.begin().await.unwrap();
                insert_entries(&mut tx, &batch).await;
                batch.clear();
                let cp = trail.checkpoint(&signing, OffsetDateTime::now_utc());
                insert_checkpoint(&mut tx, &cp).await;
                tx.commit().await.unwrap();
                witness += &(audit::export::checkpoint_line(&cp).unwrap() + "\n");
            }
        }
        conn.close().await.unwrap();
    });
    let key = db.with_extension("pub");
    std::fs::write(&key, format!("{}\n", signing.verifying_key())).unwrap();
    let witness_file = db.with_extension("witness.jsonl");
    std::fs::write(&witness_file, witness).unwrap();
    eprintln!(
        "{n} entries in {} ({:.1?}); key {}, witness {}",
        db.display(),
        started.elapsed(),
        key.display(),
        witness_file.display()
    );
}

/// A trail whose signing key rotated: the old key signs checkpoints at 40
/// and 80 and announces the new key at 100; the new key signs 140 and 180.
/// In the database (with migration 0012's `next_key`), the witness file and
/// an export.
#[test]
fn a_trail_across_a_signing_key_rotation_verifies_from_the_first_key() {
    let dir = fresh_dir("rotation");
    let db = dir.join("cardvault.db");
    let old = SigningKey::generate().unwrap();
    let new = SigningKey::generate().unwrap();
    let stranger = SigningKey::generate().unwrap();
    let mut trail = Trail::new();
    let mut entries = Vec::new();
    let mut checkpoints = Vec::new();
    for i in 1..=180 {
        entries.push(trail.append(event(i)));
        let now = OffsetDateTime::now_utc();
        match i {
            40 | 80 => checkpoints.push(trail.checkpoint(&old, now)),
            100 => checkpoints.push(trail.announce(&old, now, &new.verifying_key())),
            140 | 180 => checkpoints.push(trail.checkpoint(&new, now)),
            _ => {}
        }
    }
    assert!(checkpoints[2].next_key.is_some());
    block_on(async {
        let mut conn = create_db(&db).await;
        sqlx::raw_sql(include_str!(
            "../../vault/migrations/sqlite/0012_audit_signing_rotation.sql"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        insert_entries(&mut conn, &entries).await;
        for cp in &checkpoints {
            insert_checkpoint(&mut conn, cp).await;
        }
        conn.close().await.unwrap();
    });
    // `insert_checkpoint` writes the v1 columns: set the announcement's
    // next key (append-only triggers dropped, as the service's own insert
    // writes it in the row).
    block_on(async {
        let mut conn = SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(
            "DROP TRIGGER IF EXISTS audit_checkpoints_no_update;
             DROP TRIGGER IF EXISTS audit_checkpoints_no_delete;",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query("UPDATE audit_checkpoints SET next_key = $1 WHERE tree_size = 100")
            .bind(new.verifying_key().to_string())
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    });
    let url = format!("sqlite://{}", db.display());
    let first = dir.join("first.pub");
    std::fs::write(&first, format!("{}\n", old.verifying_key())).unwrap();
    let second = dir.join("second.pub");
    std::fs::write(&second, format!("{}\n", new.verifying_key())).unwrap();
    let both = dir.join("both.pub");
    std::fs::write(
        &both,
        format!("{}\n{}\n", old.verifying_key(), new.verifying_key()),
    )
    .unwrap();
    let wrong = dir.join("wrong.pub");
    std::fs::write(&wrong, format!("{}\n", stranger.verifying_key())).unwrap();
    let witness = dir.join("audit-checkpoints.jsonl");
    let lines: String = checkpoints
        .iter()
        .map(|c| audit::export::checkpoint_line(c).unwrap() + "\n")
        .collect();
    assert!(lines.contains("\"next_key\":\"cardvault-audit-ed25519:"));
    std::fs::write(&witness, lines).unwrap();
    let w = witness.to_str().unwrap();
    let verify = |keys: &[&Path]| {
        let mut args = vec!["verify".to_string()];
        for k in keys {
            args.push("--key".into());
            args.push(k.display().to_string());
        }
        args.extend([
            "--database-url".into(),
            url.clone(),
            "--witness".into(),
            w.into(),
        ]);
        run(&args)
    };

    // The first key alone: the announcement carries the trust over.
    let out = verify(&[&first]);
    expect(&out, 0, "verified 180 entries and 5 checkpoints");
    expect(
        &out,
        0,
        &format!(
            "signing key {} handed over to {} at the checkpoint for 100 entries",
            old.key_id(),
            new.key_id()
        ),
    );
    // Both keys (one keys file, or --public-key twice): the same.
    expect(&verify(&[&both]), 0, "verified 180 entries");
    expect(
        &run(&[
            "verify",
            "--public-key",
            first.to_str().unwrap(),
            "--public-key",
            second.to_str().unwrap(),
            "--database-url",
            &url,
            "--witness",
            w,
        ]),
        0,
        "verified 180 entries",
    );
    // The new key alone cannot vouch for the old checkpoints; a wrong key
    // for none.
    expect(
        &verify(&[&second]),
        1,
        &format!(
            "checkpoint signed by key {}, which is not trusted",
            old.key_id()
        ),
    );
    expect(
        &verify(&[&wrong]),
        1,
        "the checkpoint for 40 entries is forged",
    );

    // The export carries the announcement and verifies the same way.
    let export = dir.join("trail.jsonl");
    let out = run(&[
        "export",
        "--database-url",
        &url,
        "--out",
        export.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{out:#?}");
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(text.contains(&format!(
        "\"key_id\":\"{}\",\"next_key\":\"{}\"",
        old.key_id(),
        new.verifying_key()
    )));
    let e = export.to_str().unwrap();
    expect(
        &run(&["verify", "--key", first.to_str().unwrap(), "--export", e]),
        0,
        "verified 180 entries and 5 checkpoints",
    );
    expect(
        &run(&["verify", "--key", wrong.to_str().unwrap(), "--export", e]),
        1,
        "verification FAILED",
    );
    // A proof against a checkpoint of the new key checks with the keys
    // file that holds it (a single proof shows no announcement).
    let proof = dir.join("proof.json");
    let out = run(&["prove", "150", "--export", e]);
    assert_eq!(out.code, 0, "{out:#?}");
    std::fs::write(&proof, &out.stdout).unwrap();
    let p = proof.to_str().unwrap();
    expect(
        &run(&["check-proof", "--key", both.to_str().unwrap(), "--proof", p]),
        0,
        "proven: entry 150",
    );
    expect(
        &run(&[
            "check-proof",
            "--key",
            first.to_str().unwrap(),
            "--proof",
            p,
        ]),
        1,
        "proof REJECTED",
    );

    // A checkpoint by a key nobody announced, after the rotation: refused.
    block_on(async {
        let mut conn = SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit_checkpoints WHERE tree_size = 180")
            .execute(&mut conn)
            .await
            .unwrap();
        let mut t = Trail::new();
        entries.iter().for_each(|e| assert!(t.append_chained(e)));
        insert_checkpoint(
            &mut conn,
            &t.checkpoint(&stranger, OffsetDateTime::now_utc()),
        )
        .await;
        conn.close().await.unwrap();
    });
    let out = run(&[
        "verify",
        "--key",
        first.to_str().unwrap(),
        "--database-url",
        &url,
        "--no-witness",
    ]);
    expect(
        &out,
        1,
        &format!(
            "the checkpoint for 180 entries is forged or damaged: checkpoint signed by key {}, which is not trusted",
            stranger.key_id()
        ),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
