//! The `tokenizer` binary's command line, run as an operator would. (Having
//! an integration test here also makes `cargo test --workspace` build the
//! binary that the end-to-end tests in `tests/` start.)
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn tokenizer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tokenizer"))
}

#[test]
fn help_names_every_subcommand() {
    let out = tokenizer().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for sub in ["serve", "principal", "kek"] {
        assert!(text.contains(sub), "{sub} missing from --help:\n{text}");
    }
}

#[test]
fn subcommand_help_lists_only_its_options() {
    let help = |args: &[&str]| {
        let out = tokenizer().args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for args in [
        &["tenant", "set"][..],
        &["tenant", "list"],
        &["principal", "create"],
        &["purge"],
        &["backup"],
        &["restore"],
        &["migrate"],
        &["kek", "generate"],
        &["keys", "init"],
        &["audit", "archive"],
    ] {
        let text = help(args);
        assert!(text.contains("--data-dir"), "{args:?}:\n{text}");
        for serve_only in [
            "--listen-api",
            "--listen",
            "--tls-cert-file",
            "--request-timeout-ms",
            "--cvc-ttl-secs",
        ] {
            assert!(
                !text.contains(&format!("{serve_only} ")),
                "`{args:?} --help` lists {serve_only}:\n{text}"
            );
        }
    }
    let serve = help(&["serve"]);
    for option in [
        "--listen-api",
        "--tls-cert-file",
        "--data-dir",
        "--log-format",
    ] {
        assert!(serve.contains(option), "serve --help lacks {option}");
    }
}

#[test]
fn the_edge_has_no_vault_options_and_needs_tls_or_loopback() {
    let out = tokenizer().args(["edge", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap().to_lowercase();
    for option in [
        "--vault-url",
        "--vault-ca-file",
        "--api-key-file",
        "--public-url",
        "check",
    ] {
        assert!(help.contains(option), "edge --help lacks {option}:\n{help}");
    }
    for word in ["kek", "keyring", "database", "data-dir", "pkcs11"] {
        for option in [format!("--{word}"), format!("tokenizer_edge_{word}")] {
            assert!(!help.contains(&option), "edge --help has {option}:\n{help}");
        }
    }
    // Vault options are not accepted either.
    let out = tokenizer()
        .args(["edge", "--data-dir", "/tmp", "--insecure-plain-http"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = tokenizer().args(["edge"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert-file"));
    let out = tokenizer()
        .args(["edge", "--insecure-plain-http", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokenizer()
        .args(["serve", "--dev", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
    assert!(
        !dir.path().join("kek.key").exists(),
        "nothing is created before the refusal"
    );
}

#[test]
fn principal_commands_print_json_and_never_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = tokenizer()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let created = run(&[
        "principal",
        "create",
        "--name",
        "router",
        "--roles",
        "detokenize",
        "--tenants",
        "shop-1,shop-2",
    ]);
    assert_eq!(
        created.lines().count(),
        1,
        "exactly one stdout line: {created}"
    );
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    let key = v["api_key"].as_str().unwrap();
    assert!(key.starts_with("cvk_"));
    let listed = run(&["principal", "list"]);
    assert!(
        listed.contains("router") && !listed.contains(key) && !listed.contains("argon2"),
        "{listed}"
    );
    run(&["principal", "revoke", "router"]);
    let out = tokenizer()
        .args(["principal", "revoke", "router", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "revoking twice fails");
}

#[test]
fn backup_and_restore_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str], db: &str| {
        tokenizer()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .args(["--database-url", db])
            .output()
            .unwrap()
    };
    let source = format!("sqlite://{}", dir.path().join("source.db").display());
    let target = format!("sqlite://{}", dir.path().join("target.db").display());
    let broken_target = format!("sqlite://{}", dir.path().join("broken.db").display());
    assert!(run(&["kek", "generate"], &source).status.success());
    assert!(run(
        &[
            "principal",
            "create",
            "--name",
            "checkout",
            "--roles",
            "tokenize",
            "--tenants",
            "*"
        ],
        &source
    )
    .status
    .success());
    let file = dir.path().join("vault.backup");
    let file_arg = file.to_str().unwrap();
    let out = run(&["backup", "--out", file_arg], &source);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["contents"]["principals"], 1);
    assert!(
        !run(&["backup", "--out", file_arg], &source)
            .status
            .success(),
        "never overwrites"
    );

    let out = run(&["restore", "--from", file_arg], &target);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(run(&["principal", "list"], &target).stdout).unwrap();
    assert!(listed.contains("checkout"), "{listed}");

    // A damaged file is refused with a clear error and restores nothing.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    let damaged = dir.path().join("damaged.backup");
    std::fs::write(&damaged, bytes).unwrap();
    let out = run(
        &["restore", "--from", damaged.to_str().unwrap()],
        &broken_target,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt") || err.contains("integrity"),
        "{err}"
    );
    let listed = String::from_utf8(run(&["principal", "list"], &broken_target).stdout).unwrap();
    assert_eq!(listed.trim(), "[]");
}

/// A checkpoint is signed as soon as `--audit-checkpoint-every` entries are
/// uncovered, long before a (here one-hour) interval: three operator
/// commands against the running service's database are enough.
#[test]
fn checkpoints_follow_the_entry_count_and_go_to_the_witness_file() {
    use std::io::{BufRead as _, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = tokenizer()
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .args([
            "--audit-checkpoint-interval-ms",
            "3600000",
            "--audit-checkpoint-every",
            "3",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it listens (the first checkpoint is signed at start).
    let stderr = server.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let started = Instant::now();
    while let Some(Ok(line)) = lines.next() {
        if line.contains("listening on ") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the service did not start"
        );
    }
    std::thread::spawn(move || for _ in lines {});
    let witness = data.join("audit-checkpoints.jsonl");
    let checkpoints = || {
        std::fs::read_to_string(&witness)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let wait_for = |n: usize| {
        let t = Instant::now();
        while checkpoints() < n {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no checkpoint {n} in the witness file"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(1);
    for name in ["a", "b", "c"] {
        let out = tokenizer()
            .args([
                "principal",
                "create",
                "--name",
                name,
                "--roles",
                "auditor",
                "--tenants",
                "*",
                "--data-dir",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for(2);
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&witness)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["type"], "checkpoint");
    let key = std::fs::read_to_string(data.join("audit-verify.pub")).unwrap();
    assert!(key.starts_with("cardvault-audit-ed25519:"));
    server.kill().unwrap();
    let _ = server.wait();
}

/// Without a terminal, the long commands write their progress as plain
/// lines on stderr (JSON events with `--log-format json`); stdout stays one
/// JSON answer.
#[test]
fn long_commands_report_progress_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = tokenizer()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{args:?}: {stderr}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "{args:?}: {stdout}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap();
        stderr
    };
    run(&["kek", "generate"]);
    let file = dir.path().join("vault.backup");
    let err = run(&["backup", "--out", file.to_str().unwrap()]);
    assert!(
        err.contains("backup: writing ") && err.contains("the store holds 0 cards"),
        "{err}"
    );
    assert!(
        err.contains("backup: 0 cards, ") && err.contains(" written, fsynced"),
        "{err}"
    );
    let err = run(&["purge"]);
    assert!(
        err.contains("purge: 0 expired and 0 past their retention deleted"),
        "{err}"
    );
    let err = run(&["purge", "--log-format", "json"]);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["operation"] == "purge"
                && e["message"].as_str().unwrap().contains("0 expired")),
        "{err}"
    );
    let restored = dir.path().join("restored");
    let out = tokenizer()
        .args(["restore", "--data-dir"])
        .arg(&restored)
        .arg("--kek-file")
        .arg(data.join("kek.key"))
        .arg("--from")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("restore: checking ") && err.contains("restore: 0 cards, "),
        "{err}"
    );
}
