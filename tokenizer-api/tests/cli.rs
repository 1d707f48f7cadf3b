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
