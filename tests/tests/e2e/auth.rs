//! API keys: who is let in, and the principal CLI.

use e2e::{fresh_pan, Service};
use serde_json::json;

use crate::{card, exp_year, expect_error, expect_status, token_for, REASON, TENANT};

#[test]
fn requests_without_a_valid_key_are_unauthenticated() {
    let svc = Service::start();
    let key = svc.create_principal("ops", &["tokenize", "detokenize"], &["*"]);
    let good = svc.client(&key);
    let pan = fresh_pan();
    let token = token_for(&good, TENANT, &pan);

    let mut wrong_key = key.clone();
    // Same length, last character changed.
    let last = wrong_key.pop().unwrap();
    wrong_key.push(if last == 'A' { 'B' } else { 'A' });
    let clients = [
        ("no header", svc.anonymous()),
        ("wrong key", svc.client(&wrong_key)),
        ("unknown key", svc.client("cv_not_a_real_key_0123456789")),
        ("empty bearer", svc.client_with_authorization("Bearer ")),
        ("no scheme", svc.client_with_authorization(&key)),
        (
            "basic scheme",
            svc.client_with_authorization(&format!("Basic {key}")),
        ),
        (
            "two keys",
            svc.client_with_authorization(&format!("Bearer {key} {key}")),
        ),
    ];
    for (what, client) in &clients {
        let checks = [
            ("tokenize", client.tokenize(TENANT, &pan, 1, exp_year())),
            ("batch", client.batch(TENANT, &[card(&pan, 1, exp_year())])),
            ("metadata", client.metadata(&token)),
            ("detokenize", client.detokenize(&token, REASON)),
            ("delete", client.delete_token(&token)),
        ];
        for (op, resp) in &checks {
            assert_eq!(resp.status, 401, "{what} / {op}: {resp}");
            expect_error(resp, 401, "unauthenticated", &[&pan, &key]);
        }
    }
    // Nothing of the above changed the token.
    expect_status(&good.metadata(&token), 200);
}

/// Authentication comes before anything in the body is looked at.
#[test]
fn authentication_is_checked_before_the_body() {
    let svc = Service::start();
    let anon = svc.anonymous();
    let pan = "4111111111111112";
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("truncated json", br#"{"tenant": "shop-42", "pan": "41111"#.to_vec()),
        ("not json", b"hello".to_vec()),
        ("wrong types", json!({"tenant": 42, "pan": 4_111_111_111_111_111_u64}).to_string().into_bytes()),
        ("unknown field", json!({"tenant": TENANT, "pan": "4111111111111111", "exp_month": 1, "exp_year": exp_year(), "cvv": "123"}).to_string().into_bytes()),
        ("luhn failure", json!({"tenant": TENANT, "pan": pan, "exp_month": 1, "exp_year": exp_year()}).to_string().into_bytes()),
        ("bad tenant", json!({"tenant": "no spaces", "pan": "4111111111111111", "exp_month": 1, "exp_year": exp_year()}).to_string().into_bytes()),
        ("expired", json!({"tenant": TENANT, "pan": "4111111111111111", "exp_month": 1, "exp_year": 2001}).to_string().into_bytes()),
    ];
    for (what, body) in &bodies {
        for path in ["/v1/tokens", "/v1/tokens/batch", "/v1/detokenize"] {
            let resp = anon.post_raw(path, body);
            assert_eq!(resp.status, 401, "{what} to {path}: {resp}");
            expect_error(&resp, 401, "unauthenticated", &[pan]);
        }
    }
    // Wrong and unknown methods on /v1 routes without a key.
    for (method, path) in [
        ("GET", "/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAAAA"),
        ("DELETE", "/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAAAA"),
    ] {
        expect_error(&anon.send(method, path), 401, "unauthenticated", &[]);
    }
}

#[test]
fn revoked_key_is_refused_at_once_by_the_running_server() {
    let svc = Service::start();
    let admin = crate::admin(&svc);
    let key = svc.create_principal("leaver", &["tokenize", "detokenize"], &["*"]);
    let leaver = svc.client(&key);
    let pan = fresh_pan();
    let token = token_for(&leaver, TENANT, &pan);
    expect_status(&leaver.detokenize(&token, REASON), 200);

    svc.revoke("leaver");

    expect_error(
        &leaver.detokenize(&token, REASON),
        401,
        "unauthenticated",
        &[&pan],
    );
    expect_error(&leaver.metadata(&token), 401, "unauthenticated", &[&pan]);
    expect_error(
        &leaver.tokenize(TENANT, &pan, 12, exp_year()),
        401,
        "unauthenticated",
        &[&pan],
    );
    // Others are unaffected.
    expect_status(&admin.detokenize(&token, REASON), 200);
    // Creating another principal does not revive the old key.
    let new_key = svc.create_principal("leaver-2", &["detokenize"], &["*"]);
    assert_ne!(new_key, key);
    expect_error(
        &leaver.detokenize(&token, REASON),
        401,
        "unauthenticated",
        &[&pan],
    );
    expect_status(&svc.client(&new_key).detokenize(&token, REASON), 200);
}

#[test]
fn principal_cli_prints_one_json_line_and_never_lists_keys() {
    let svc = Service::start();
    let out = svc.cli(&[
        "principal",
        "create",
        "--name",
        "payments",
        "--roles",
        "tokenize,detokenize",
        "--tenants",
        "shop-a,shop-b",
    ]);
    assert!(out.success(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one stdout line: {:?}", out.stdout);
    let created: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert!(
        created["id"].as_str().is_some_and(|s| !s.is_empty()),
        "{created}"
    );
    assert_eq!(created["name"], "payments");
    let key = created["api_key"].as_str().unwrap().to_string();
    assert!(key.len() >= 16, "an API key should be long: {created}");
    // The key works, for the tenants given.
    let client = svc.client(&key);
    expect_status(&client.tokenize("shop-b", &fresh_pan(), 1, exp_year()), 201);

    let second = svc.create_principal_json("auditor", &["auditor"], &["*"]);
    assert_ne!(second["api_key"], created["api_key"]);
    assert_ne!(second["id"], created["id"]);

    let list = svc.cli(&["principal", "list"]);
    assert!(list.success(), "{list:?}");
    let listed: serde_json::Value = serde_json::from_str(list.stdout.trim())
        .unwrap_or_else(|e| panic!("`principal list` is not JSON ({e}): {}", list.stdout));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap_or_else(|| panic!("`principal list` is not an array: {listed}"))
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        names.contains(&"payments") && names.contains(&"auditor"),
        "{listed}"
    );
    for secret in [&key, second["api_key"].as_str().unwrap()] {
        assert!(
            !list.stdout.contains(secret) && !list.stderr.contains(secret),
            "`principal list` shows an API key"
        );
    }
    assert!(
        !listed.to_string().contains("api_key"),
        "no api_key field in the list: {listed}"
    );

    // A duplicate name (revoke goes by name) or an unknown role is refused.
    let dup = svc.cli(&[
        "principal",
        "create",
        "--name",
        "payments",
        "--roles",
        "tokenize",
        "--tenants",
        "*",
    ]);
    assert!(
        !dup.success(),
        "a second principal named `payments` was created: {dup:?}"
    );
    let bad = svc.cli(&[
        "principal",
        "create",
        "--name",
        "x",
        "--roles",
        "superuser",
        "--tenants",
        "*",
    ]);
    assert!(!bad.success(), "unknown role accepted: {bad:?}");
}

#[test]
fn health_endpoints_need_no_key() {
    let svc = Service::start();
    let anon = svc.anonymous();
    expect_status(&anon.get("/healthz"), 200);
    expect_status(&anon.get("/readyz"), 200);
    // Distinct request ids.
    let a = anon.get("/healthz").request_id;
    let b = anon.get("/healthz").request_id;
    assert_ne!(a, b, "request ids must differ between requests");
}
