//! Sealed start and dual control with the split-knowledge keyring
//! (`kek_backend = "keyring"`), through the real binary: `tokenizer keys
//! init` (3 custodians, any 2 unseal), a service that starts sealed (`/readyz`
//! and card routes 503 `sealed`), `tokenizer unseal` one custodian at a time
//! (K-1 does not unseal, a wrong passphrase is refused and audited by name,
//! the same custodian twice counts once), `tokenizer seal`, a restart that is
//! sealed again, and no passphrase anywhere in what the service wrote.

use std::io::Write as _;
use std::process::{Command, Stdio};

use e2e::{give_to_service_user, temp_data_dir, tokenizer_command, Options, Service};

use crate::{expect_status, token_for, REASON, TENANT, TEST_CARDS};

const CUSTODIANS: [(&str, &str); 3] = [
    ("alice", "correct horse battery staple"),
    ("bob", "purple monkey dishwasher 42"),
    ("carol", "the quick brown fox jumps"),
];
const WRONG: &str = "not bob's passphrase at all";

/// Run a `tokenizer` command with `stdin` as its standard input.
fn run_with_stdin(mut cmd: Command, stdin: &str) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tokenizer runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("tokenizer ends");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tokenizer unseal --custodian NAME` with its passphrase on stdin.
fn unseal(svc: &Service, admin_key: &str, name: &str, passphrase: &str) -> (bool, String, String) {
    let mut cmd = tokenizer_command();
    cmd.args(["unseal", "--url", &svc.base_url(), "--custodian", name])
        .envs(svc.admin_env())
        .env("TOKENIZER_API_KEY", admin_key);
    run_with_stdin(cmd, &format!("{passphrase}\n"))
}

#[test]
fn keyring_backend_starts_sealed_and_needs_k_custodians() {
    let dir = temp_data_dir();
    let mut init = tokenizer_command();
    init.args(["keys", "init", "--kek-backend", "keyring", "--shares", "3"])
        .args(["--threshold", "2", "--data-dir"])
        .arg(dir.path());
    for (name, _) in CUSTODIANS {
        init.args(["--custodian", name]);
    }
    let stdin: String = CUSTODIANS.iter().map(|(_, p)| format!("{p}\n")).collect();
    let (ok, out, err) = run_with_stdin(init, &stdin);
    assert!(ok, "keys init failed: {out}{err}");
    assert!(out.contains("\"threshold\":2"), "{out}");

    let mut svc = Service::start_in_dir(
        dir.path(),
        Options {
            generate_kek: false,
            extra_args: vec!["--kek-backend".into(), "keyring".into()],
            ..Options::default()
        },
    );
    let admin_key = svc.create_principal("custody-admin", &["key_admin"], &["*"]);
    let tokenizer = svc.principal_client("checkout", &["tokenize", "detokenize"], &["*"]);

    // Sealed: health yes, readiness and card operations no.
    expect_status(&svc.anonymous().get("/healthz"), 200);
    let ready = svc.anonymous().get("/readyz");
    assert_eq!(
        (ready.status, ready.json["status"].as_str()),
        (503, Some("sealed")),
        "{ready:?}"
    );
    let refused = tokenizer.tokenize(TENANT, TEST_CARDS[0].0, 12, 2031);
    assert_eq!(
        (refused.status, refused.error_code()),
        (503, Some("sealed")),
        "{refused:?}"
    );

    // Only key_admin may unseal.
    let (ok, _, err) = unseal(
        &svc,
        &tokenizer.authorization().unwrap()[7..],
        "alice",
        CUSTODIANS[0].1,
    );
    assert!(!ok && err.contains("forbidden"), "{err}");

    // K-1 custodians, a wrong passphrase, the same custodian twice: sealed.
    let (ok, out, err) = unseal(&svc, &admin_key, "alice", CUSTODIANS[0].1);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("\"sealed\":true") && out.contains("\"custodians_accepted\":1"),
        "{out}"
    );
    let (ok, _, err) = unseal(&svc, &admin_key, "bob", WRONG);
    assert!(
        !ok && err.contains("wrong_passphrase") && err.contains("bob"),
        "{err}"
    );
    let (ok, out, _) = unseal(&svc, &admin_key, "alice", CUSTODIANS[0].1);
    assert!(ok && out.contains("\"custodians_accepted\":1"), "{out}");
    let (ok, _, err) = unseal(&svc, &admin_key, "mallory", "twelve chars or more");
    assert!(!ok && err.contains("unknown_custodian"), "{err}");
    assert_eq!(svc.anonymous().get("/readyz").status, 503);

    // The second custodian unseals.
    let (ok, out, err) = unseal(&svc, &admin_key, "bob", CUSTODIANS[1].1);
    assert!(ok && out.contains("\"sealed\":false"), "{out}{err}");
    expect_status(&svc.anonymous().get("/readyz"), 200);
    let token = token_for(&tokenizer, TENANT, TEST_CARDS[0].0);

    // Seal: every card operation stops at once.
    let mut seal = tokenizer_command();
    seal.args(["seal", "--url", &svc.base_url()])
        .envs(svc.admin_env())
        .env("TOKENIZER_API_KEY", &admin_key);
    let (ok, out, err) = run_with_stdin(seal, "");
    assert!(ok && out.contains("\"sealed\":true"), "{out}{err}");
    let sealed = tokenizer.detokenize(&token, REASON);
    assert_eq!((sealed.status, sealed.error_code()), (503, Some("sealed")));

    // Any other two custodians unseal again; the card is still there.
    assert!(unseal(&svc, &admin_key, "carol", CUSTODIANS[2].1).0);
    assert!(unseal(&svc, &admin_key, "alice", CUSTODIANS[0].1).0);
    let back = tokenizer.detokenize(&token, REASON);
    expect_status(&back, 200);
    assert_eq!(back.str("pan"), TEST_CARDS[0].0);

    // A restart starts sealed again.
    svc.restart();
    let tokenizer = tokenizer.reconnect(&svc);
    assert_eq!(svc.anonymous().get("/readyz").status, 503);
    assert!(unseal(&svc, &admin_key, "bob", CUSTODIANS[1].1).0);
    assert!(unseal(&svc, &admin_key, "carol", CUSTODIANS[2].1).0);
    expect_status(&tokenizer.detokenize(&token, REASON), 200);

    // KEK rotation: a new keyring version re-wraps every stored key; after a
    // restart the same custodians unseal and the new version opens them.
    let mut rotate = tokenizer_command();
    rotate
        .args(["keys", "rotate", "--kek", "--url", &svc.base_url()])
        .envs(svc.admin_env())
        .env("TOKENIZER_API_KEY", &admin_key);
    let (ok, out, err) = run_with_stdin(rotate, "");
    assert!(ok && out.contains("\"kek_id\""), "{out}{err}");
    let new_id = serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["kek_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let read_ids = || {
        let text = std::fs::read_to_string(dir.path().join("keyring.json")).unwrap();
        keyring_kek_ids(&serde_json::from_str(&text).unwrap())
    };
    let ids = read_ids();
    assert_eq!(ids.len(), 2, "a second KEK version in the keyring: {ids:?}");
    let old_id = ids.iter().find(|id| **id != new_id).unwrap().clone();
    // The KEK in use cannot be destroyed; the old one can (crypto-shred).
    let destroy = |id: &str| {
        let mut cmd = tokenizer_command();
        cmd.args(["keys", "destroy", "--kek", id, "--url", &svc.base_url()])
            .envs(svc.admin_env())
            .env("TOKENIZER_API_KEY", &admin_key);
        run_with_stdin(cmd, "")
    };
    let (ok, _, err) = destroy(&new_id);
    assert!(!ok && err.contains("kek_in_use"), "{err}");
    let (ok, out, err) = destroy(&old_id);
    assert!(ok, "{out}{err}");
    assert_eq!(read_ids(), vec![new_id.clone()]);
    svc.restart();
    let tokenizer = tokenizer.reconnect(&svc);
    assert!(unseal(&svc, &admin_key, "alice", CUSTODIANS[0].1).0);
    assert!(unseal(&svc, &admin_key, "carol", CUSTODIANS[2].1).0);
    let back = tokenizer.detokenize(&token, REASON);
    expect_status(&back, 200);
    assert_eq!(back.str("pan"), TEST_CARDS[0].0);

    // Every attempt is in the audit trail by custodian name; no passphrase
    // is anywhere in what the service wrote (database, logs, keyring file
    // holds only encrypted shares).
    let auditor = svc.principal_client("auditor", &["auditor"], &["*"]);
    let events = auditor.get("/v1/audit/events?action=unseal_attempt&limit=100");
    expect_status(&events, 200);
    let details: Vec<String> = events.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["detail"].as_str().unwrap_or_default().to_owned())
        .collect();
    for expected in [
        "custodian alice: accepted (1 of 2)",
        "custodian bob: wrong passphrase",
        "unknown custodian",
        "unsealed",
    ] {
        assert!(
            details.iter().any(|d| d == expected),
            "{expected:?} not in {details:?}"
        );
    }
    let sealed_events = auditor.get("/v1/audit/events?action=sealed");
    assert_eq!(
        sealed_events.json["events"].as_array().map(Vec::len),
        Some(1)
    );
    let mut secrets: Vec<&str> = CUSTODIANS.iter().map(|(_, p)| *p).collect();
    secrets.push(WRONG);
    svc.kill();
    let mut written: Vec<(String, Vec<u8>)> = vec![
        ("stdout".into(), svc.stdout().into_bytes()),
        ("stderr".into(), svc.stderr().into_bytes()),
    ];
    for entry in walk(svc.data_dir()) {
        written.push((
            entry.display().to_string(),
            std::fs::read(&entry).unwrap_or_default(),
        ));
    }
    if svc.backend() == e2e::Backend::Postgres {
        written.extend(e2e::pg_dump_tables(&svc.database_url()));
    }
    for (place, bytes) in &written {
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a passphrase is in {place}"
            );
        }
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The PKCS#11 backend on SoftHSM2: `tokenizer kek generate` makes the KEK
/// inside a token (the test's own, in a temp dir), the service logs in at
/// start with the PIN from a file and serves; started when the PIN file is
/// not there yet it stays sealed, and `tokenizer unseal` (a new login) opens
/// it once the file is in place. Fails, never skips, without SoftHSM2.
#[test]
fn pkcs11_backend_unseals_by_logging_in_to_the_token() {
    let module = std::path::Path::new("/usr/lib/softhsm/libsofthsm2.so");
    assert!(
        module.exists(),
        "SoftHSM2 is required (apt-get install -y softhsm2): {} is missing",
        module.display()
    );
    let dir = temp_data_dir();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap().to_owned();
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "cardvault-e2e"])
        .args(["--so-pin", "87654321", "--pin", "12345678"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util runs");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    // The token directory softhsm2-util made (as root) is the service's.
    give_to_service_user(dir.path());
    let data = dir.path().join("data");
    let pin_file = dir.path().join("pin");
    let backend = [
        "--kek-backend",
        "pkcs11",
        "--pkcs11-token",
        "cardvault-e2e",
        "--pkcs11-pin-file",
        pin_file.to_str().unwrap(),
    ];
    let write_pin = || {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin_file)
            .unwrap();
        f.write_all(b"12345678\n").unwrap();
        give_to_service_user(&pin_file);
    };
    write_pin();

    let mut generate = tokenizer_command();
    generate
        .args(["kek", "generate", "--data-dir", data.to_str().unwrap()])
        .args(backend)
        .env("SOFTHSM2_CONF", &conf);
    let (ok, out, err) = run_with_stdin(generate, "");
    assert!(ok, "kek generate on SoftHSM2 failed: {out}{err}");
    assert!(out.contains("\"kek_id\":\"p11:cardvault-kek-1:"), "{out}");

    let opts = Options {
        generate_kek: false,
        extra_args: backend.iter().map(|s| s.to_string()).collect(),
        env: vec![("SOFTHSM2_CONF".into(), conf.clone())],
        ..Options::default()
    };
    let mut svc = Service::start_in_dir(&data, opts);
    expect_status(&svc.anonymous().get("/readyz"), 200);
    let client = svc.principal_client("checkout", &["tokenize", "detokenize"], &["*"]);
    let token = token_for(&client, TENANT, TEST_CARDS[4].0);
    let admin_key = svc.create_principal("hsm-admin", &["key_admin"], &["*"]);

    // Without the PIN the service starts sealed; a login after the PIN is
    // back unseals it, and the card is still there.
    std::fs::remove_file(&pin_file).unwrap();
    svc.restart();
    let client = client.reconnect(&svc);
    let ready = svc.anonymous().get("/readyz");
    assert_eq!(
        (ready.status, ready.json["status"].as_str()),
        (503, Some("sealed"))
    );
    let mut unseal = tokenizer_command();
    unseal
        .args(["unseal", "--url", &svc.base_url()])
        .envs(svc.admin_env())
        .env("TOKENIZER_API_KEY", &admin_key);
    let (ok, _, err) = run_with_stdin(unseal, "");
    assert!(!ok && err.contains("kek_unavailable"), "{err}");
    write_pin();
    let mut unseal = tokenizer_command();
    unseal
        .args(["unseal", "--url", &svc.base_url()])
        .envs(svc.admin_env())
        .env("TOKENIZER_API_KEY", &admin_key);
    let (ok, out, err) = run_with_stdin(unseal, "");
    assert!(ok && out.contains("\"sealed\":false"), "{out}{err}");
    let back = client.detokenize(&token, REASON);
    expect_status(&back, 200);
    assert_eq!(back.str("pan"), TEST_CARDS[4].0);

    // KEK rotation in the HSM: a new key generated in the token re-wraps
    // every stored key; a restart finds it by the label the keys name.
    let mut rotate = tokenizer_command();
    rotate
        .args(["keys", "rotate", "--kek", "--url", &svc.base_url()])
        .envs(svc.admin_env())
        .env("TOKENIZER_API_KEY", &admin_key);
    let (ok, out, err) = run_with_stdin(rotate, "");
    assert!(ok && out.contains("p11:cardvault-kek-"), "{out}{err}");
    assert!(
        !out.contains("cardvault-kek-1:"),
        "a new KEK, not the first: {out}"
    );
    svc.restart();
    let client = client.reconnect(&svc);
    expect_status(&svc.anonymous().get("/readyz"), 200);
    let back = client.detokenize(&token, REASON);
    expect_status(&back, 200);
    assert_eq!(back.str("pan"), TEST_CARDS[4].0);
    svc.kill();
}

/// Every `kek_id` string anywhere in the keyring file's JSON.
fn keyring_kek_ids(value: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("kek_id", serde_json::Value::String(id)) => out.push(id.clone()),
                    _ => out.extend(keyring_kek_ids(v)),
                }
            }
        }
        serde_json::Value::Array(items) => {
            items.iter().for_each(|v| out.extend(keyring_kek_ids(v)))
        }
        _ => {}
    }
    out
}
