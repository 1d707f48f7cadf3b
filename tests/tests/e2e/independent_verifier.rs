//! The independent verifier (`scripts/independent-verify/run`, Python written
//! from the byte layouts in README.md alone) agrees with `vault-audit verify`
//! on a real trail that crosses an audit signing key rotation (issue 20).
//!
//! A real service tokenizes and detokenizes test cards, its signing key is
//! rotated through the admin API, more cards follow, and a graceful stop
//! signs a last checkpoint under the new key. The export is then verified by
//! both tools with the first key only, and both must give the same exit
//! status on it and on tampered copies: intact (0), a range export starting
//! from an anchor (0), the last checkpoint
//! removed (3, an uncovered tail), one entry's field changed with its hashes
//! left alone (1), the announcement removed (1), the announcement's
//! `next_key` swapped for another key (1), and the intact export with a
//! wrong key only (1). The verifier's venv is made on the first run
//! (python3 with venv, and PyPI); if it cannot be made the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::{run_vault_audit, temp_data_dir, wait_with_timeout, workspace_root, Options, Service};

use crate::audit_trail::{wait_for_checkpoints, witness_checkpoints};
use crate::{admin, expect_status, report, token_for, REASON, TENANT, TEST_CARDS};

/// Checkpoint interval of the service under test.
const INTERVAL_MS: u64 = 200;
/// The first run makes the venv and installs from PyPI.
const VERIFIER_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `scripts/independent-verify/run ARGS`: exit code, stdout, stderr.
fn run_independent(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(workspace_root().join("scripts/independent-verify/run"));
    cmd.args(args).stdin(Stdio::null());
    let out = wait_with_timeout(cmd, VERIFIER_TIMEOUT, args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The export's lines, with `edit` applied; written to `dir/name`.
fn tampered(
    export: &str,
    dir: &Path,
    name: &str,
    edit: impl Fn(&str) -> Option<String>,
) -> PathBuf {
    let mut changed = 0;
    let mut out = String::new();
    for line in export.lines() {
        match edit(line) {
            Some(new) if new == line => out.push_str(line),
            Some(new) => {
                changed += 1;
                out.push_str(&new);
            }
            None => {
                changed += 1;
                continue; // line removed
            }
        }
        out.push('\n');
    }
    assert!(changed > 0, "{name}: the edit changed nothing");
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

fn tree_size(line: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    (v["type"] == "checkpoint").then(|| v["tree_size"].as_u64().unwrap())
}

#[test]
fn the_independent_verifier_agrees_with_vault_audit_across_a_key_rotation() {
    let work = temp_data_dir();
    // Fail early, and plainly, when the verifier's venv cannot be made.
    let (code, out, err) = run_independent(&["--help"]);
    assert_eq!(
        code,
        Some(0),
        "scripts/independent-verify/run cannot run (python3 with venv and PyPI needed)\n{out}{err}"
    );

    let mut svc = Service::start_with(Options {
        extra_args: vec![
            "--audit-checkpoint-interval-ms".into(),
            INTERVAL_MS.to_string(),
        ],
        ..Options::default()
    });
    let witness = svc.data_dir().join("audit-checkpoints.jsonl");
    let first = work.path().join("first.pub");
    std::fs::copy(svc.data_dir().join("audit-verify.pub"), &first).unwrap();
    let first_key = audit::VerifyingKey::parse(&std::fs::read_to_string(&first).unwrap()).unwrap();

    let client = admin(&svc);
    let mut tokens: Vec<String> = [0, 4]
        .iter()
        .map(|&i| token_for(&client, TENANT, TEST_CARDS[i].0))
        .collect();
    expect_status(&client.detokenize(&tokens[0], REASON), 200);
    wait_for_checkpoints(&witness, 1);

    let key_admin = svc.principal_client("key-admin", &["key_admin"], &["*"]);
    let rotated = key_admin.post_json(
        "/v1/admin/keys/audit_signing/rotate",
        &serde_json::json!({}),
    );
    expect_status(&rotated, 200);
    let new_key = audit::VerifyingKey::parse(rotated.json["public_key"].as_str().unwrap()).unwrap();
    let announced = witness_checkpoints(&witness);
    let announcement = announced.last().unwrap().clone();
    assert_eq!(announcement.key_id, first_key.key_id());
    assert_eq!(announcement.next_key.as_ref(), Some(&new_key));

    tokens.extend(
        [8, 10]
            .iter()
            .map(|&i| token_for(&client, TENANT, TEST_CARDS[i].0)),
    );
    for token in &tokens {
        expect_status(&client.detokenize(token, REASON), 200);
    }
    wait_for_checkpoints(&witness, announced.len() + 1);
    let status = svc.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let last = witness_checkpoints(&witness).last().unwrap().clone();
    assert_eq!(last.key_id, new_key.key_id(), "signed by the new key");
    assert!(last.tree_size > announcement.tree_size);

    let export = work.path().join("trail.jsonl");
    let out = run_vault_audit(&[
        "export",
        "--database-url",
        &svc.database_url(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(
        out.success(),
        "vault-audit export: {}{}",
        out.stdout,
        out.stderr
    );
    let text = std::fs::read_to_string(&export).unwrap();
    // A range export starts from an anchor (chain head and Merkle frontier).
    let range = work.path().join("range.jsonl");
    let out = run_vault_audit(&[
        "export",
        "--database-url",
        &svc.database_url(),
        "--from",
        "6",
        "--out",
        range.to_str().unwrap(),
    ]);
    assert!(
        out.success(),
        "vault-audit export --from 6: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(std::fs::read_to_string(&range)
        .unwrap()
        .starts_with(r#"{"type":"anchor","#));
    let wrong_key = audit::SigningKey::generate().unwrap().verifying_key();
    let wrong = work.path().join("wrong.pub");
    std::fs::write(&wrong, format!("{wrong_key}\n")).unwrap();

    let dir = work.path();
    let max_size = text.lines().filter_map(tree_size).max().unwrap();
    let uncovered = tampered(&text, dir, "uncovered.jsonl", |l| {
        (tree_size(l) != Some(max_size)).then(|| l.to_string())
    });
    // The first successful detokenize now reads as a failure.
    let target = text
        .lines()
        .find(|l| l.contains(r#""action":"detokenize""#) && l.contains(r#""outcome":"success""#))
        .unwrap();
    let changed = tampered(&text, dir, "changed.jsonl", |l| {
        Some(if l == target {
            l.replacen(r#""outcome":"success""#, r#""outcome":"failure""#, 1)
        } else {
            l.to_string()
        })
    });
    let is_announcement = |l: &str| l.contains(r#""next_key":"#);
    let removed = tampered(&text, dir, "no-announcement.jsonl", |l| {
        (!is_announcement(l)).then(|| l.to_string())
    });
    let swapped = tampered(&text, dir, "swapped-next-key.jsonl", |l| {
        Some(if is_announcement(l) {
            l.replace(&new_key.to_string(), &wrong_key.to_string())
        } else {
            l.to_string()
        })
    });

    let handed_over = format!(
        "signing key {} handed over to {}",
        first_key.key_id(),
        new_key.key_id()
    );
    let cases: [(&str, &Path, &Path, i32); 7] = [
        ("intact, first key only", &export, &first, 0),
        (
            "range from entry 6 (anchor), first key only",
            &range,
            &first,
            0,
        ),
        (
            "last checkpoint removed (uncovered tail)",
            &uncovered,
            &first,
            3,
        ),
        (
            "one entry's outcome changed, hashes left",
            &changed,
            &first,
            1,
        ),
        ("key announcement removed", &removed, &first, 1),
        ("announcement's next_key swapped", &swapped, &first, 1),
        ("intact, a wrong key only", &export, &wrong, 1),
    ];
    let mut summary = Vec::new();
    for (case, file, key, expected) in cases {
        let (file, key) = (file.to_str().unwrap(), key.to_str().unwrap());
        let ours = run_vault_audit(&["verify", "--key", key, "--export", file]);
        let (theirs, t_out, t_err) = run_independent(&["--key", key, "--export", file]);
        let both = format!(
            "{case}\n--- vault-audit ({:?}) ---\n{}{}--- independent ({theirs:?}) ---\n{t_out}{t_err}",
            ours.status.code(),
            ours.stdout,
            ours.stderr
        );
        assert_eq!(ours.status.code(), theirs, "the verifiers disagree: {both}");
        assert_eq!(theirs, Some(expected), "expected exit {expected}: {both}");
        if expected == 0 {
            assert!(ours.stdout.contains(&handed_over), "{both}");
            assert!(t_out.contains(&handed_over), "{both}");
        }
        if expected == 1 {
            assert!(t_out.contains("verification FAILED"), "{both}");
        }
        summary.push(format!(
            "  {case}: both exit {expected}; independent: {}",
            t_out.lines().last().unwrap_or_default()
        ));
    }
    report(&format!(
        "independent verifier agrees with vault-audit (announcement at {} entries, trail of {max_size}):\n{}",
        announcement.tree_size,
        summary.join("\n")
    ));
}
