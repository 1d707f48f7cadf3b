//! After real work at trace log level, no card number may be found anywhere
//! the service writes: data files (SQLite database, WAL, anything), the
//! content of every table (PostgreSQL, dumped as text), and its output. The
//! files of a PostgreSQL cluster (heap, indexes, WAL) are scanned in
//! `outage.rs`, which has a cluster of its own.

use std::fs;

use e2e::{assert_no_leaks, fresh_pan, generated_pan, scan_dir, Backend, Client, Service};
use serde_json::{json, Value};

use crate::{admin, card, exp_year, spaced, LUHN_INVALID, REASON, TENANT, TEST_CARDS};

/// Every way the workload sends a card number where it does not belong.
fn misplaced_pan_requests(client: &Client, pan: &str, token: &str, oversized: bool) {
    let year = exp_year();
    let post = |path: &str, body: Value| client.post_json(path, &body);
    let as_number: u64 = pan.parse().unwrap();
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": "4111111111111111", "exp_month": pan, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": "4111111111111111", "exp_month": 1, "exp_year": as_number}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": as_number, "exp_month": 1, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": "4111111111111111", "exp_month": 1, "exp_year": year, pan: 1}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": "4111111111111111", "exp_month": 1, "exp_year": year, "note": pan}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "card_number": pan, "exp_month": 1, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": spaced(pan), "pan": pan, "exp_month": 1, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": format!("shop {pan}"), "pan": "4111111111111111", "exp_month": 1, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": pan, "exp_month": 1, "exp_year": year - 6}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": pan, "exp_month": 13, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": format!("{pan}0"), "exp_month": 1, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": format!("{pan}x"), "exp_month": 1, "exp_year": year}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": pan, "exp_month": 1, "exp_year": year, "cardholder_name": format!("{pan}\n")}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": pan, "exp_month": 1, "exp_year": year, "cardholder_name": format!("{pan} {}", "N".repeat(70))}),
    );
    post(
        "/v1/tokens",
        json!({"tenant": TENANT, "pan": pan, "exp_month": 1}),
    );
    post("/v1/tokens", json!([pan]));
    post("/v1/tokens", json!(pan));
    post(
        "/v1/tokens/batch",
        json!({"tenant": TENANT, "cards": [{"pan": as_number, "exp_month": 1, "exp_year": year}]}),
    );
    post(
        "/v1/tokens/batch",
        json!({"tenant": TENANT, "cards": [{"pan": "4111111111111111", "exp_month": pan, "exp_year": year}]}),
    );
    post(
        "/v1/tokens/batch",
        json!({"tenant": TENANT, "cards": [card(pan, 1, year - 6), card(pan, 0, year), {"pan": pan, "exp_month": 1, "exp_year": year, "cvv": pan}]}),
    );
    post(
        "/v1/tokens/batch",
        json!({"tenant": spaced(pan), "cards": [card(pan, 1, year)]}),
    );
    post("/v1/tokens/batch", json!({"tenant": TENANT, "cards": pan}));
    post("/v1/detokenize", json!({"token": pan, "reason": REASON}));
    post(
        "/v1/detokenize",
        json!({"token": token, "reason": format!("card {pan}")}),
    );
    post(
        "/v1/detokenize",
        json!({"token": token, "reason": pan, "pan": pan}),
    );
    post(
        "/v1/detokenize",
        json!({"token": token, "reason": spaced(pan)}),
    );
    // Not JSON, or not declared as JSON.
    let raw = [
        format!(r#"{{"tenant": "{TENANT}", "pan": "{pan}", "exp_mo"#),
        format!(r#"{{"tenant": "{TENANT}", "pan": "{pan}""#),
        format!("pan={pan}&exp_month=1"),
        format!(r#"{{"tenant": "{TENANT}", "pan": "{pan}",, }}"#),
    ];
    for body in &raw {
        client.post_raw("/v1/tokens", body.as_bytes());
        client.post_raw("/v1/tokens/batch", body.as_bytes());
    }
    let ok = json!({"tenant": TENANT, "pan": pan, "exp_month": 1, "exp_year": year}).to_string();
    client.send_raw("POST", "/v1/tokens", Some("text/plain"), ok.as_bytes());
    client.send_raw("POST", "/v1/tokens", None, ok.as_bytes());
    client.send_raw("PUT", "/v1/tokens", Some("application/json"), ok.as_bytes());
    if !oversized {
        return;
    }
    // Too large.
    let mut big = json!({"tenant": TENANT, "pan": pan, "exp_month": 1, "exp_year": year, "cardholder_name": "N".repeat(17 * 1024)}).to_string();
    client.raw_exchange(
        "POST",
        "/v1/tokens",
        Some("application/json"),
        big.clone().into_bytes(),
    );
    big.push_str(&" ".repeat(1024 * 1024));
    client.raw_exchange(
        "POST",
        "/v1/tokens/batch",
        Some("application/json"),
        big.into_bytes(),
    );
}

#[test]
fn no_card_number_in_data_files_or_output() {
    let mut svc = Service::start();
    let client = admin(&svc);
    let limited = svc.principal_client("shop-a-only", &["tokenize", "detokenize"], &["shop-a"]);
    let auditor = svc.principal_client("auditor", &["auditor"], &["*"]);
    let anonymous = svc.anonymous();
    let year = exp_year();

    let mut pans: Vec<String> = TEST_CARDS.iter().map(|(p, _)| p.to_string()).collect();
    pans.extend((0..6).map(|_| fresh_pan()));
    pans.extend((12..=19).map(|len| generated_pan("424242", len)));
    let mut scan_list = pans.clone();
    scan_list.extend(LUHN_INVALID.iter().map(|p| p.to_string()));

    // Real work: every card tokenized, looked up, detokenized, some deleted.
    for (i, pan) in pans.iter().enumerate() {
        let typed = if i % 2 == 0 { spaced(pan) } else { pan.clone() };
        let resp = client.tokenize_named(
            TENANT,
            &typed,
            1 + (i % 12) as i64,
            year,
            &format!("Holder {i}"),
        );
        assert_eq!(resp.status, 201, "{resp}");
        let token = resp.str("token");
        assert_eq!(client.tokenize(TENANT, pan, 1, year).status, 200);
        assert_eq!(client.metadata(&token).status, 200);
        assert_eq!(client.detokenize(&token, REASON).json["pan"], pan.as_str());
        let other = client.tokenize("shop-b", pan, 2, year);
        assert_eq!(other.status, 201, "{other}");
        if i % 3 == 0 {
            assert_eq!(client.delete_token(&other.str("token")).status, 204);
        }
        // The same card through the other doors.
        anonymous.tokenize(TENANT, pan, 1, year);
        auditor.tokenize(TENANT, pan, 1, year);
        auditor.detokenize(&token, REASON);
        limited.tokenize(TENANT, pan, 1, year);
        limited.detokenize(&token, REASON);
        if i % 4 == 0 {
            misplaced_pan_requests(&client, pan, &token, i == 0);
        }
    }
    let batch: Vec<_> = pans
        .iter()
        .map(|p| card(p, 3, year))
        .chain(LUHN_INVALID.iter().map(|p| card(p, 3, year)))
        .collect();
    let resp = client.batch("shop-c", &batch);
    assert_eq!(resp.status, 200, "{resp}");
    for pan in LUHN_INVALID {
        let resp = client.tokenize(TENANT, pan, 1, year);
        assert_eq!(resp.status, 422, "{resp}");
        misplaced_pan_requests(&client, pan, "tok_AAAAAAAAAAAAAAAAAAAAAAAA", false);
    }

    // Scan while running, and again after a SIGKILL left everything as is.
    assert_no_leaks(&svc.scan_for_leaks(&scan_list));
    svc.kill();
    assert_no_leaks(&svc.scan_for_leaks(&scan_list));

    // Positive controls: the service did log, and the scan does look into
    // the data directory.
    let stderr = svc.stderr();
    assert!(
        stderr.lines().count() >= 3,
        "the service logged almost nothing at trace level:\n{stderr}"
    );
    match svc.backend() {
        Backend::Sqlite => assert!(
            svc.data_dir().join("cardvault.db").is_file(),
            "no cardvault.db in the data dir"
        ),
        Backend::Postgres => {
            // The scan read the tables holding the work above.
            let cards = svc.sql_i64("SELECT COUNT(*) FROM cards");
            assert!(
                cards >= pans.len() as i64,
                "only {cards} rows in `cards` after tokenizing {} cards",
                pans.len()
            );
        }
    }
    let canary = fresh_pan();
    let planted = svc.data_dir().join("e2e-canary").join("planted.txt");
    fs::create_dir_all(planted.parent().unwrap()).unwrap();
    fs::write(&planted, format!("canary {canary}")).unwrap();
    let found = scan_dir(svc.data_dir(), &[canary.as_str()]);
    assert_eq!(
        found.len(),
        1,
        "the scanner missed a planted number: {found:?}"
    );
    fs::remove_dir_all(planted.parent().unwrap()).unwrap();
    if svc.backend() == Backend::Postgres {
        // A number planted in a table of its own: the dump covers every
        // table, not a fixed list.
        let canary = fresh_pan();
        svc.sql(&format!(
            "CREATE TABLE e2e_canary (note TEXT); INSERT INTO e2e_canary VALUES ('x {canary} y')"
        ));
        let found = svc.scan_for_leaks(&[canary.as_str()]);
        assert!(
            found.len() == 1 && found[0].location == "table e2e_canary",
            "the table dump missed a planted number: {found:?}"
        );
        svc.sql("DROP TABLE e2e_canary");
    }

    // After a restart (SQLite: recovery from the WAL), still nothing.
    svc.restart();
    let client = client.reconnect(&svc);
    assert_eq!(client.tokenize(TENANT, &pans[0], 1, year).status, 200);
    svc.kill();
    assert_no_leaks(&svc.scan_for_leaks(&scan_list));
}

/// Card numbers in the URL (path, query) or in a header: access logs and
/// traces must not write them either.
#[test]
fn no_card_number_from_urls_or_headers_in_output() {
    let mut svc = Service::start();
    let client = admin(&svc);
    let pan = "4242424242424242";
    let other = fresh_pan();
    let token = crate::token_for(&client, TENANT, &other);

    let paths = [
        format!("/v1/tokens/{pan}"),
        format!("/v1/tokens/tok_{pan}AAAAAAAA"),
        format!("/v1/tokens/{token}?pan={pan}"),
        format!("/v1/cards/{pan}"),
        format!("/healthz?pan={pan}"),
    ];
    for path in &paths {
        for method in ["GET", "DELETE"] {
            let resp = client.send(method, path);
            assert!(!resp.text.contains(pan), "{method} {path}: {resp}");
        }
    }
    let bearer = svc.client(pan);
    assert_eq!(bearer.metadata(&token).status, 401);
    let spaced_bearer = svc.client_with_authorization(&format!("Bearer {}", spaced(pan)));
    assert_eq!(spaced_bearer.metadata(&token).status, 401);

    svc.kill();
    assert_no_leaks(&svc.scan_for_leaks(&[pan, other.as_str()]));
}
