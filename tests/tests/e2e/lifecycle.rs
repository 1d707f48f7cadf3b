//! Start-up, restarts and deletion: the vault keeps what it acknowledged,
//! refuses to run with an unsafe key, and `--dev` is self-contained.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{expect_refused_start, fresh_pan, run_cli, temp_data_dir, Captured, Options, Service};

use crate::{admin, card, exp_year, expect_error, expect_status, token_for, REASON, TENANT};

#[test]
fn delete_makes_a_token_unknown() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();
    let keep = token_for(&client, TENANT, &fresh_pan());
    let token = token_for(&client, TENANT, &pan);

    let resp = client.delete_token(&token);
    expect_status(&resp, 204);
    assert!(resp.text.is_empty(), "204 has no body: {resp}");

    expect_error(&client.metadata(&token), 404, "not_found", &[&pan]);
    expect_error(
        &client.detokenize(&token, REASON),
        404,
        "not_found",
        &[&pan],
    );
    expect_error(&client.delete_token(&token), 404, "not_found", &[&pan]);

    // The card is new again for the tenant, and the old token stays dead.
    let again = client.tokenize(TENANT, &pan, 12, exp_year());
    expect_status(&again, 201);
    assert_eq!(again.json["created"], true);
    let new_token = again.str("token");
    assert_eq!(
        client.detokenize(&new_token, REASON).json["pan"],
        pan.as_str()
    );
    if new_token != token {
        expect_error(
            &client.detokenize(&token, REASON),
            404,
            "not_found",
            &[&pan],
        );
    }
    // Other tokens are unaffected.
    expect_status(&client.detokenize(&keep, REASON), 200);
}

/// SIGKILL of the service right after acknowledged writes, then a restart:
/// everything acknowledged is there. On SQLite this is the database file's
/// own crash safety (WAL, `synchronous=FULL`); on PostgreSQL it is that an
/// acknowledgement follows the commit and nothing lives only in the process
/// (the database itself crashing is `outage.rs`).
#[test]
fn acknowledged_tokens_survive_sigkill() {
    let mut svc = Service::start();
    let key = svc.create_principal("ops", &["tokenize", "detokenize"], &["*"]);
    let client = svc.client(&key);
    let year = exp_year();

    let mut acknowledged: Vec<(String, String, &str)> = Vec::new();
    for (i, (pan, _)) in crate::TEST_CARDS.iter().enumerate() {
        let tenant = if i % 2 == 0 { "shop-a" } else { "shop-b" };
        let resp = client.tokenize(tenant, pan, 5, year);
        expect_status(&resp, 201);
        acknowledged.push((resp.str("token"), pan.to_string(), tenant));
    }
    let batch: Vec<_> = (0..50).map(|_| fresh_pan()).collect();
    let cards: Vec<_> = batch.iter().map(|p| card(p, 6, year)).collect();
    let resp = client.batch(TENANT, &cards);
    expect_status(&resp, 200);
    for (result, pan) in resp.json["results"].as_array().unwrap().iter().zip(&batch) {
        acknowledged.push((
            result["token"].as_str().unwrap().to_string(),
            pan.clone(),
            TENANT,
        ));
    }
    let deleted_pan = fresh_pan();
    let deleted = token_for(&client, TENANT, &deleted_pan);
    expect_status(&client.delete_token(&deleted), 204);
    // The very last acknowledged write before the kill.
    let last_pan = fresh_pan();
    let last = client.tokenize(TENANT, &last_pan, 7, year);
    expect_status(&last, 201);
    acknowledged.push((last.str("token"), last_pan, TENANT));

    svc.kill();
    svc.restart();
    let client = svc.client(&key);

    for (token, pan, tenant) in &acknowledged {
        let clear = client.detokenize(token, REASON);
        assert_eq!(
            clear.status,
            200,
            "token of a card ending {} lost: {clear}",
            &pan[pan.len() - 4..]
        );
        assert_eq!(clear.json["pan"], pan.as_str(), "{clear}");
        // Still the same token for the same card and tenant.
        let again = client.tokenize(tenant, pan, 5, year);
        expect_status(&again, 200);
        assert_eq!(again.json["token"], token.as_str(), "{again}");
    }
    expect_error(
        &client.detokenize(&deleted, REASON),
        404,
        "not_found",
        &[&deleted_pan],
    );

    // And a second crash right after a restart.
    let after_pan = fresh_pan();
    let after = token_for(&client, TENANT, &after_pan);
    svc.restart();
    let clear = svc.client(&key).detokenize(&after, REASON);
    assert_eq!(clear.json["pan"], after_pan.as_str(), "{clear}");
    expect_status(&svc.anonymous().get("/readyz"), 200);
}

fn kek_path(dir: &Path) -> std::path::PathBuf {
    dir.join("kek.key")
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn kek_generate_makes_a_private_key_and_never_overwrites() {
    let dir = temp_data_dir();
    let captured = Captured::default();
    let out = run_cli(dir.path(), &["kek", "generate"], &captured);
    assert!(out.success(), "{out:?}");
    let kek = kek_path(dir.path());
    assert!(kek.is_file(), "no {}", kek.display());
    assert_eq!(mode(&kek), 0o600, "kek.key must be 0600");
    let before = fs::read(&kek).unwrap();
    assert!(before.len() >= 16, "a key file of {} bytes", before.len());

    let again = run_cli(dir.path(), &["kek", "generate"], &captured);
    assert!(
        !again.success(),
        "a second `kek generate` must fail: {again:?}"
    );
    assert_eq!(fs::read(&kek).unwrap(), before, "the KEK was overwritten");
    assert_eq!(mode(&kek), 0o600);

    // Two data directories get two different keys.
    let other = temp_data_dir();
    assert!(run_cli(other.path(), &["kek", "generate"], &captured).success());
    assert_ne!(fs::read(kek_path(other.path())).unwrap(), before);
}

#[test]
fn serve_refuses_a_missing_or_readable_kek() {
    let dir = temp_data_dir();
    let captured = Captured::default();
    let opts = Options::default();

    let (status, stderr) = expect_refused_start(dir.path(), &opts);
    assert!(!status.success());
    assert!(
        !stderr.trim().is_empty(),
        "refusing to start needs a message on stderr"
    );

    assert!(run_cli(dir.path(), &["kek", "generate"], &captured).success());
    let kek = kek_path(dir.path());
    for bad in [0o644, 0o640, 0o604, 0o666] {
        fs::set_permissions(&kek, fs::Permissions::from_mode(bad)).unwrap();
        let (status, stderr) = expect_refused_start(dir.path(), &opts);
        assert!(!status.success(), "mode {bad:o}");
        assert!(
            !stderr.trim().is_empty(),
            "mode {bad:o}: no message on stderr"
        );
    }

    // Back to 0600 it starts: the refusals were about the key.
    fs::set_permissions(&kek, fs::Permissions::from_mode(0o600)).unwrap();
    let svc = Service::start_in_dir(dir.path(), Options::default());
    let client = admin(&svc);
    expect_status(&client.tokenize(TENANT, &fresh_pan(), 1, exp_year()), 201);
}

#[test]
fn restart_refused_when_the_kek_disappears() {
    let mut svc = Service::start();
    let client = admin(&svc);
    let token = token_for(&client, TENANT, &fresh_pan());
    svc.kill();
    let kek = kek_path(svc.data_dir());
    let saved = fs::read(&kek).unwrap();
    fs::remove_file(&kek).unwrap();
    // The same data (and, on postgres, the same database) as the service.
    let (status, _) = expect_refused_start(svc.data_dir(), svc.options());
    assert!(!status.success());
    fs::write(&kek, saved).unwrap();
    fs::set_permissions(&kek, fs::Permissions::from_mode(0o600)).unwrap();
    e2e::give_to_service_user(&kek);
    svc.restart();
    let client = client.reconnect(&svc);
    expect_status(&client.detokenize(&token, REASON), 200);
}

/// The first `Authorization: Bearer <key>` in a text.
fn bearer_key(text: &str) -> Option<String> {
    let idx = text.find("Bearer ")?;
    let key: String = text[idx + "Bearer ".len()..]
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, '\'' | '"' | '\\'))
        .collect();
    (!key.is_empty()).then_some(key)
}

#[test]
fn dev_mode_prints_a_working_curl_example() {
    let svc = Service::start_with(Options::dev());
    assert!(kek_path(svc.data_dir()).is_file(), "--dev makes a KEK");
    assert_eq!(mode(&kek_path(svc.data_dir())), 0o600);

    // The example may come just after the listening line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stdout = loop {
        let stdout = svc.stdout();
        if stdout.contains("curl") && bearer_key(&stdout).is_some() {
            break stdout;
        }
        assert!(
            Instant::now() < deadline,
            "no curl example with a Bearer key on stdout: {stdout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(stdout.contains("Authorization: Bearer "), "{stdout}");
    let key = bearer_key(&stdout).unwrap();
    let stderr = svc.stderr().to_lowercase();
    assert!(
        stderr.contains("production"),
        "--dev must warn that it is not a production setup:\n{stderr}"
    );

    let dev = svc.client(&key);
    for tenant in ["shop-42", "any-tenant"] {
        let pan = fresh_pan();
        let resp = dev.tokenize(tenant, &pan, 1, exp_year());
        expect_status(&resp, 201);
        let token = resp.str("token");
        expect_status(&dev.metadata(&token), 200);
        assert_eq!(dev.detokenize(&token, REASON).json["pan"], pan.as_str());
        expect_status(&dev.delete_token(&token), 204);
    }
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let dir = temp_data_dir();
    let opts = Options {
        listen: "0.0.0.0:0".to_string(),
        ..Options::dev()
    };
    let (status, stderr) = expect_refused_start(dir.path(), &opts);
    assert!(!status.success());
    assert!(
        !stderr.trim().is_empty(),
        "refusing to start needs a message on stderr"
    );
}
