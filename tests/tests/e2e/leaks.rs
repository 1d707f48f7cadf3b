//! After real work at trace log level, no card number may be found anywhere
//! the service writes: data files (SQLite database, WAL, anything), the
//! content of every table (PostgreSQL, dumped as text), and its output. The
//! files of a PostgreSQL cluster (heap, indexes, WAL) are scanned in
//! `outage.rs`, which has a cluster of its own.
//!
//! Each scenario runs twice: with the default text logs, and with
//! `--log-format json` (the CLI calls too), where every line written must
//! also be a JSON object with the log keys ([`e2e::check_json_log`]).

use std::fs;
use std::time::{Duration, Instant};

use e2e::{
    assert_no_leaks, check_json_log, fresh_pan, generated_pan, run_vault_audit, scan_dir, Backend,
    Client, Options, Resp, Scan, Service,
};
use serde_json::{json, Value};

use crate::{
    admin, card, exp_year, expect_status, spaced, LUHN_INVALID, REASON, TENANT, TEST_CARDS,
};

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

/// The `--log-format` of a run: `None` is the default (text).
type LogFormat = Option<&'static str>;

/// Options of a scenario's service in `format`.
fn options(format: LogFormat) -> Options {
    Options {
        log_format: format.map(str::to_string),
        ..Options::default()
    }
}

/// With JSON logs: every line on the captured stderr (the service's and
/// its CLI calls') is a JSON object with the log keys, access-log lines
/// carry their request id, and lines logged inside a span name it; every
/// line on stdout (the CLI's answers) is a JSON object. Returns a summary
/// for the report (empty for text).
fn check_log_lines(svc: &Service, format: LogFormat) -> String {
    if format != Some("json") {
        return String::new();
    }
    let stderr = check_json_log(&svc.stderr(), true)
        .unwrap_or_else(|e| panic!("--log-format json, stderr: {e}"));
    let stdout = check_json_log(&svc.stdout(), false)
        .unwrap_or_else(|e| panic!("--log-format json, stdout: {e}"));
    assert!(
        stderr.lines >= 3 && stderr.levels.contains_key("TRACE"),
        "the service logged almost nothing at trace level: {stderr:?}"
    );
    assert!(
        stderr.requests > 0,
        "no access-log line (with its request_id): {stderr:?}"
    );
    format!(
        " | json log: {} stderr lines ({} requests with request_id, {} in spans, {:?}), {} stdout lines",
        stderr.lines, stderr.requests, stderr.in_spans, stderr.levels, stdout.lines
    )
}

#[test]
fn no_card_number_in_data_files_or_output() {
    data_files_and_output(None);
}

#[test]
fn no_card_number_in_data_files_or_output_json_logs() {
    data_files_and_output(Some("json"));
}

fn data_files_and_output(format: LogFormat) {
    let mut svc = Service::start_with(options(format));
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
    check_log_lines(&svc, format);
}

/// Card numbers in the URL (path, query) or in a header: access logs and
/// traces must not write them either.
#[test]
fn no_card_number_from_urls_or_headers_in_output() {
    urls_and_headers(None);
}

#[test]
fn no_card_number_from_urls_or_headers_in_output_json_logs() {
    urls_and_headers(Some("json"));
}

fn urls_and_headers(format: LogFormat) {
    let mut svc = Service::start_with(options(format));
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
    check_log_lines(&svc, format);
}

/// Every HTTP response body a test received, except the successful
/// detokenize answers (the one place a PAN belongs), for the leak scan.
#[derive(Default)]
struct Responses {
    bodies: Vec<u8>,
    count: usize,
}

impl Responses {
    /// Keeps the body and passes the response on.
    fn keep(&mut self, resp: Resp) -> Resp {
        self.bodies.extend_from_slice(resp.text.as_bytes());
        self.bodies.push(b'\n');
        self.count += 1;
        resp
    }
}

/// The whole life of a vault with known cards, then a scan of everything it
/// wrote: tokenize (typed plain and grouped), batch, metadata, detokenize,
/// delete, refused requests carrying card numbers, a DEK and fingerprint
/// key rotation with re-encryption to the end, a backup, an audit export
/// (`vault-audit export`), an audit archive after a graceful stop,
/// `/metrics`, and a panic of the binary. Scanned: every file in the data
/// directory (database, WAL, witness, archive, backup, export, keys), every
/// table (PostgreSQL), the service's and CLI's stdout and stderr at trace
/// level (panic output included), the `/metrics` body, and every response
/// body but the successful detokenize ones. Zero findings; the scanner
/// itself is tested on planted leaks in `tests/src/lib.rs`.
#[test]
fn no_card_number_anywhere_after_rotation_backup_export_and_archive() {
    whole_life(None);
}

#[test]
fn no_card_number_anywhere_after_rotation_backup_export_and_archive_json_logs() {
    whole_life(Some("json"));
}

fn whole_life(format: LogFormat) {
    let mut svc = Service::start_with(Options {
        log_format: format.map(str::to_string),
        extra_args: vec![
            "--reencrypt-batch".into(),
            "7".into(),
            "--reencrypt-interval-ms".into(),
            "100".into(),
            "--audit-checkpoint-interval-ms".into(),
            "500".into(),
        ],
        ..Options::default()
    });
    let client = admin(&svc);
    let key_admin = svc.principal_client("e2e-key-admin", &["key_admin"], &["*"]);
    let anonymous = svc.anonymous();
    let year = exp_year();
    let mut seen = Responses::default();

    let mut pans: Vec<String> = TEST_CARDS.iter().map(|(p, _)| p.to_string()).collect();
    pans.extend((0..4).map(|_| fresh_pan()));
    let mut scan_list = pans.clone();
    scan_list.extend(LUHN_INVALID.iter().map(|p| p.to_string()));

    // Tokenize, look up, detokenize; some deleted; a batch in another
    // tenant; refused requests that carry the number.
    let mut tokens = Vec::new();
    for (i, pan) in pans.iter().enumerate() {
        let typed = if i % 2 == 0 { spaced(pan) } else { pan.clone() };
        let resp = seen.keep(client.tokenize_named(TENANT, &typed, 5, year, "A Holder"));
        expect_status(&resp, 201);
        let token = resp.str("token");
        expect_status(&seen.keep(client.tokenize(TENANT, pan, 5, year)), 200);
        expect_status(&seen.keep(client.metadata(&token)), 200);
        // A successful detokenize is the one body not kept.
        let clear = client.detokenize(&token, REASON);
        assert_eq!(clear.json["pan"], pan.as_str(), "{}", clear.status);
        seen.keep(client.tokenize(TENANT, pan, 13, year));
        seen.keep(client.tokenize(TENANT, &format!("{pan}1"), 5, year));
        seen.keep(client.post_json("/v1/detokenize", &json!({"token": pan, "reason": REASON})));
        if i % 5 == 0 {
            let other = seen.keep(client.tokenize("shop-del", pan, 5, year));
            expect_status(&seen.keep(client.delete_token(&other.str("token"))), 204);
        }
        tokens.push(token);
    }
    for pan in LUHN_INVALID {
        expect_status(&seen.keep(client.tokenize(TENANT, pan, 5, year)), 422);
    }
    let batch: Vec<Value> = pans
        .iter()
        .map(|p| card(p, 6, year))
        .chain(LUHN_INVALID.iter().map(|p| card(p, 6, year)))
        .collect();
    expect_status(&seen.keep(client.batch("shop-batch", &batch)), 200);

    // Rotation of the DEK and the fingerprint key, re-encrypted to the end.
    let rotated =
        seen.keep(key_admin.post_json("/v1/admin/keys/rotate", &json!({"fingerprint": true})));
    expect_status(&rotated, 200);
    let started = Instant::now();
    loop {
        let status = seen.keep(key_admin.get("/v1/admin/keys"));
        expect_status(&status, 200);
        if status.json["remaining"] == 0 && !status.json["reencrypted_at"].is_null() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "re-encryption did not finish: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (token, pan) in tokens.iter().zip(&pans) {
        assert_eq!(
            client.detokenize(token, REASON).json["pan"],
            pan.as_str(),
            "after re-encryption"
        );
    }
    let metrics = seen.keep(anonymous.get("/metrics"));
    expect_status(&metrics, 200);
    assert!(metrics.text.contains("cardvault_"), "{metrics}");

    // A backup and an audit export, in the data directory so that the
    // scan reads them.
    let backup = svc.data_dir().join("e2e-backup.jsonl");
    let out = svc.cli(&["backup", "--out", backup.to_str().unwrap()]);
    assert!(out.success(), "{out:?}");
    let export = svc.data_dir().join("e2e-export.jsonl");
    let out = run_vault_audit(&[
        "export",
        "--database-url",
        &svc.database_url(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(out.success(), "{out:?}");

    // Scan while running (SQLite: the WAL is still there), and the tables
    // before the archive deletes audit entries.
    let mut total = svc.scan(&scan_list);
    assert_no_leaks(&total.findings);

    // A graceful stop, then an audit archive of everything.
    assert!(svc
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    std::thread::sleep(Duration::from_millis(2100));
    let out = svc.cli(&[
        "audit",
        "archive",
        "--older-than-days",
        "0",
        "--below-pci-minimum",
    ]);
    assert!(out.success(), "{out:?}");
    let archive_dir = svc.data_dir().join("audit-archive");
    let archives = fs::read_dir(&archive_dir).map_or(0, |d| d.count());
    assert!(archives > 0, "no archive file in {}", archive_dir.display());

    // Panic output. No request can make the service panic (none was
    // found by the hostile-input suite and the fuzzers); a closed stdout
    // makes the CLI's first println! panic, which shows the hook: the
    // location only, never the message.
    let panicked = svc.cli_with_stdout_closed(&["principal", "list"]);
    assert_eq!(panicked.status.code(), Some(101), "{panicked:?}");
    assert!(
        panicked.stderr.contains("panic at ") && panicked.stderr.contains("message withheld"),
        "the panic hook printed no location: {panicked:?}"
    );
    assert!(
        !panicked.stderr.contains("failed printing") && !panicked.stderr.contains("Broken pipe"),
        "the panic hook printed the panic message: {panicked:?}"
    );

    // Everything, after the stop.
    let after = svc.scan(&scan_list);
    assert_no_leaks(&after.findings);
    total.merge(after);
    let mut extra = Scan::default();
    extra.bytes("GET /metrics", metrics.text.as_bytes(), &scan_list);
    extra.bytes("http responses", &seen.bodies, &scan_list);
    extra.bytes("panic output", panicked.stderr.as_bytes(), &scan_list);
    assert_no_leaks(&extra.findings);
    total.merge(extra);

    // Positive controls: the places that matter were read, and hold data.
    let places: std::collections::BTreeSet<&str> =
        total.places.iter().map(String::as_str).collect();
    for must in [
        &backup,
        &export,
        &svc.data_dir().join("audit-checkpoints.jsonl"),
    ] {
        let name = must.display().to_string();
        assert!(places.contains(name.as_str()), "{name} was not scanned");
        assert!(fs::metadata(must).unwrap().len() > 0, "{name} is empty");
    }
    assert!(
        places.iter().any(|p| p.contains("audit-archive")),
        "the archive was not scanned: {places:?}"
    );
    match svc.backend() {
        Backend::Sqlite => assert!(places.iter().any(|p| p.ends_with("cardvault.db"))),
        Backend::Postgres => {
            assert!(places.contains("table cards") && places.contains("table audit_events"))
        }
    }
    let stderr = svc.stderr();
    if format.is_none() {
        assert!(
            stderr.contains(" TRACE "),
            "the service did not log at trace level"
        );
    }
    let json_log = check_log_lines(&svc, format);
    crate::report(&format!(
        "leaks ({}, {} logs): findings=0 | bytes_scanned={} places_scanned={} (distinct {}) \
         | numbers={} (each whole, UTF-16LE/BE, u64 LE/BE, and every 11-digit fragment) \
         | responses_kept={} metrics_bytes={} stderr_bytes={} archives={archives} \
         | panic: location-only hook checked (closed stdout), no API path panics{json_log}",
        svc.backend().name(),
        format.unwrap_or("text"),
        total.bytes,
        total.places.len(),
        places.len(),
        scan_list.len(),
        seen.count,
        metrics.text.len(),
        stderr.len(),
    ));
}
