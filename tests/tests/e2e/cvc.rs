//! Issue 9, the security code: an optional `"cvc"` on tokenize (3 digits, 4
//! for American Express; anything else 422 `invalid_cvc` with nothing
//! stored) is held only in the process's memory, bound to its token, released
//! once by `POST /v1/detokenize` with `"include_cvc": true`, then gone; gone
//! too after `cvc_ttl_secs`, after a restart and after sealing. Responses say
//! `"cvc_available"`; `/metrics` has the gauge `cardvault_cvc_held`. It is
//! never written anywhere: database, files, logs, backups.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{
    expect_refused_start, fresh_pan, temp_data_dir, Backend, Client, Options, Resp, Service,
};
use serde_json::{json, Value};

use crate::{admin, exp_year, expect_error, expect_status, REASON, TENANT};

/// `POST /v1/tokens` with a `"cvc"`.
fn tokenize_with_cvc(client: &Client, tenant: &str, pan: &str, cvc: &str) -> Resp {
    client.post_json(
        "/v1/tokens",
        &json!({
            "tenant": tenant, "pan": pan, "exp_month": 12, "exp_year": exp_year(), "cvc": cvc,
        }),
    )
}

/// `POST /v1/detokenize` with `"include_cvc"`.
fn detokenize_cvc(client: &Client, token: &str, include: bool) -> Resp {
    client.post_json(
        "/v1/detokenize",
        &json!({"token": token, "reason": REASON, "include_cvc": include}),
    )
}

/// The `cvc` of a detokenize answer, if it has one (absent or null: none).
fn released(resp: &Resp) -> Option<String> {
    resp.json
        .get("cvc")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

#[track_caller]
fn assert_available(resp: &Resp, want: bool) {
    assert_eq!(
        resp.json["cvc_available"], want,
        "cvc_available should be {want}: {resp}"
    );
}

/// The value of `cardvault_cvc_held` on `/metrics`.
fn cvc_held(svc: &Service) -> f64 {
    let text = svc.anonymous().get("/metrics").text;
    text.lines()
        .find_map(|l| l.strip_prefix("cardvault_cvc_held ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cardvault_cvc_held gauge on /metrics:\n{text}"))
}

fn start(extra: &[&str]) -> Service {
    Service::start_with(Options {
        extra_args: extra.iter().map(|a| (*a).to_string()).collect(),
        ..Options::default()
    })
}

/// Released once: detokenize without `include_cvc` leaves it, the first with
/// it gets it, the second gets none (`cvc_available: false`), and metadata
/// and the gauge follow. A card without a code says `false` from the start.
#[test]
fn a_cvc_is_released_once_and_only_when_asked() {
    let svc = start(&[]);
    let client = admin(&svc);
    let pan = fresh_pan();
    let resp = tokenize_with_cvc(&client, TENANT, &pan, "737");
    expect_status(&resp, 201);
    assert_available(&resp, true);
    assert!(
        !resp.text.contains("737"),
        "tokenize echoes the cvc: {resp}"
    );
    let token = resp.str("token");
    assert_eq!(cvc_held(&svc), 1.0);

    let meta = client.metadata(&token);
    expect_status(&meta, 200);
    assert_available(&meta, true);
    assert!(
        whole_token_hits(&meta.text, "737").is_empty(),
        "metadata shows the cvc: {meta}"
    );

    // Without include_cvc (absent, or false): no code, and it stays.
    for resp in [
        client.detokenize(&token, REASON),
        detokenize_cvc(&client, &token, false),
    ] {
        expect_status(&resp, 200);
        assert_eq!(released(&resp), None, "cvc released unasked: {resp}");
        assert_available(&resp, true);
    }
    assert_available(&client.metadata(&token), true);

    let first = detokenize_cvc(&client, &token, true);
    expect_status(&first, 200);
    assert_eq!(released(&first).as_deref(), Some("737"), "{first}");
    assert_eq!(first.json["pan"], pan.as_str());
    let second = detokenize_cvc(&client, &token, true);
    expect_status(&second, 200);
    assert_eq!(released(&second), None, "cvc released twice: {second}");
    assert_available(&second, false);
    assert_eq!(second.json["pan"], pan.as_str(), "the card itself stays");
    assert_available(&client.metadata(&token), false);
    assert_eq!(cvc_held(&svc), 0.0);

    // A card tokenized without a code.
    let plain = client.tokenize(TENANT, &fresh_pan(), 12, exp_year());
    expect_status(&plain, 201);
    assert_available(&plain, false);
    let resp = detokenize_cvc(&client, &plain.str("token"), true);
    expect_status(&resp, 200);
    assert_eq!(released(&resp), None);
    assert_available(&resp, false);

    // A principal without detokenize cannot take it.
    let pan = fresh_pan();
    let token = tokenize_with_cvc(&client, TENANT, &pan, "418").str("token");
    let tokenizer = svc.principal_client("only-tokenize", &["tokenize"], &["*"]);
    expect_error(
        &detokenize_cvc(&tokenizer, &token, true),
        403,
        "forbidden",
        &[],
    );
    assert_available(&client.metadata(&token), true);
}

/// Three digits, four for American Express; anything else 422
/// `invalid_cvc` and nothing stored (the card is new afterwards).
#[test]
fn an_invalid_cvc_is_refused_and_nothing_is_stored() {
    let svc = start(&[]);
    let client = admin(&svc);
    let visa = fresh_pan();
    let amex = "378282246310005";
    let before = svc.sql_i64("SELECT COUNT(*) FROM cards");
    for (pan, cvc) in [
        (visa.as_str(), "12"),
        (visa.as_str(), "1234"),
        (visa.as_str(), "12a"),
        (visa.as_str(), ""),
        (visa.as_str(), " 123"),
        (visa.as_str(), "１２３"),
        (amex, "123"),
        (amex, "12345"),
    ] {
        let resp = tokenize_with_cvc(&client, TENANT, pan, cvc);
        expect_error(&resp, 422, "invalid_cvc", &[pan]);
        if cvc.len() >= 3 {
            assert!(
                !resp.text.contains(cvc),
                "the error repeats the cvc: {resp}"
            );
        }
    }
    // A number instead of a string is a malformed request, also refused.
    let resp = client.post_json(
        "/v1/tokens",
        &json!({"tenant": TENANT, "pan": visa, "exp_month": 12, "exp_year": exp_year(), "cvc": 123}),
    );
    assert!(resp.status == 400 || resp.status == 422, "{resp}");
    assert_eq!(
        svc.sql_i64("SELECT COUNT(*) FROM cards"),
        before,
        "a refused cvc stored a card"
    );
    assert_eq!(cvc_held(&svc), 0.0);
    // Nothing was kept: both cards are new, and take a valid code.
    let resp = tokenize_with_cvc(&client, TENANT, &visa, "123");
    expect_status(&resp, 201);
    assert_available(&resp, true);
    let resp = tokenize_with_cvc(&client, TENANT, amex, "1234");
    expect_status(&resp, 201);
    assert_available(&resp, true);
    let clear = detokenize_cvc(&client, &resp.str("token"), true);
    assert_eq!(released(&clear).as_deref(), Some("1234"), "{clear}");
}

/// Gone after `--cvc-ttl-secs`, never released late; the setting may not
/// exceed 3600.
#[test]
fn a_cvc_times_out() {
    let svc = start(&["--cvc-ttl-secs", "2"]);
    let client = admin(&svc);
    let resp = tokenize_with_cvc(&client, TENANT, &fresh_pan(), "552");
    let started = Instant::now();
    expect_status(&resp, 201);
    assert_available(&resp, true);
    let token = resp.str("token");
    let kept = resp.clone();
    // Waiting on metadata (which does not consume it).
    let deadline = started + Duration::from_secs(15);
    loop {
        let meta = client.metadata(&token);
        expect_status(&meta, 200);
        if meta.json["cvc_available"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cvc still available {:?} after tokenize with a ttl of 2 s: {meta}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the cvc went after {:?}, before its ttl of 2 s ({kept})",
        started.elapsed()
    );
    let late = detokenize_cvc(&client, &token, true);
    expect_status(&late, 200);
    assert_eq!(released(&late), None, "released after its ttl: {late}");
    assert_available(&late, false);
    assert_eq!(cvc_held(&svc), 0.0);

    let dir = temp_data_dir();
    let opts = Options {
        extra_args: vec!["--cvc-ttl-secs".into(), "3601".into()],
        ..Options::default()
    };
    let (status, stderr) = expect_refused_start(dir.path(), &opts);
    assert!(!status.success() && !stderr.trim().is_empty(), "{stderr}");
}

/// Held in memory only: none after a restart, none after sealing (and
/// unsealing again).
#[test]
fn no_cvc_survives_a_restart_or_a_seal() {
    let mut svc = start(&[]);
    let key = svc.create_principal("cvc-admin", &["tokenize", "detokenize"], &["*"]);
    let key_admin = svc.create_principal("cvc-keys", &["key_admin"], &["*"]);
    let client = svc.client(&key);
    let before_restart = tokenize_with_cvc(&client, TENANT, &fresh_pan(), "315").str("token");
    assert_available(&client.metadata(&before_restart), true);

    svc.restart();
    let client = svc.client(&key);
    let meta = client.metadata(&before_restart);
    expect_status(&meta, 200);
    assert_available(&meta, false);
    let resp = detokenize_cvc(&client, &before_restart, true);
    expect_status(&resp, 200);
    assert_eq!(released(&resp), None, "a cvc survived the restart: {resp}");
    assert_eq!(cvc_held(&svc), 0.0);

    let before_seal = tokenize_with_cvc(&client, TENANT, &fresh_pan(), "826").str("token");
    assert_available(&client.metadata(&before_seal), true);
    let keys = svc.client(&key_admin);
    expect_status(&keys.send_raw("POST", "/v1/admin/seal", None, b""), 200);
    expect_error(&client.metadata(&before_seal), 503, "sealed", &[]);
    let unsealed = keys.post_json("/v1/admin/unseal", &json!({}));
    expect_status(&unsealed, 200);
    assert_eq!(unsealed.json["sealed"], false, "{unsealed}");
    let meta = client.metadata(&before_seal);
    expect_status(&meta, 200);
    assert_available(&meta, false);
    let resp = detokenize_cvc(&client, &before_seal, true);
    expect_status(&resp, 200);
    assert_eq!(released(&resp), None, "a cvc survived sealing: {resp}");
    assert_eq!(cvc_held(&svc), 0.0);
}

// ---------------------------------------------------------------------------
// Never written anywhere
// ---------------------------------------------------------------------------

/// The places `needle` occurs in `text` as a whole token: a maximal run of
/// letters and digits (any script; a `.` between two digits joins them, as in
/// `13.047`) equal to it. Digits inside hex or base64 (`X'A0471F'`,
/// `aB0471z`), fractions and longer numbers are not it; `"cvc":"0471"`,
/// `cvc=0471`, `Cvc(0471)` and `0471 ` are.
fn whole_token_hits(text: &str, needle: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let joins = |i: usize| -> bool {
        let c = chars[i];
        c.is_alphanumeric()
            || (c == '.'
                && i > 0
                && i + 1 < chars.len()
                && chars[i - 1].is_ascii_digit()
                && chars[i + 1].is_ascii_digit())
    };
    let mut hits = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !joins(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && joins(i) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if word == needle {
            let from = start.saturating_sub(60);
            let to = (i + 60).min(chars.len());
            hits.push(
                chars[from..to]
                    .iter()
                    .collect::<String>()
                    .replace('\n', "⏎"),
            );
        }
    }
    hits
}

#[test]
fn whole_token_matcher() {
    for text in [
        r#"{"cvc":"0471"}"#,
        "cvc=0471 x",
        "Cvc(0471)",
        "0471",
        "a 0471\n",
    ] {
        assert_eq!(whole_token_hits(text, "0471").len(), 1, "{text}");
    }
    for text in [
        "X'A0471F'",
        "aB0471z",
        "13.0471",
        "0471.5",
        "10471",
        "04712",
        "0471Z",
        "µ0471",
    ] {
        assert!(whole_token_hits(text, "0471").is_empty(), "{text}");
    }
}

/// Every row of every table (audit trail included) as text: SQLite with
/// each column `quote()`d (a BLOB as `X'hex'`), PostgreSQL each row as
/// `t::text` (a bytea as `\x` hex).
fn all_rows(svc: &Service) -> Vec<(String, String)> {
    match svc.backend() {
        Backend::Postgres => e2e::pg_dump_tables(&svc.database_url())
            .into_iter()
            .map(|(table, text)| (table, String::from_utf8_lossy(&text).into_owned()))
            .collect(),
        Backend::Sqlite => {
            let tables =
                svc.sql_strings("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1");
            tables
                .into_iter()
                .map(|table| {
                    let columns = svc.sql_strings(&format!(
                        "SELECT name FROM pragma_table_info('{}') ORDER BY cid",
                        table.replace('\'', "''")
                    ));
                    let row = columns
                        .iter()
                        .map(|c| format!("quote(\"{}\")", c.replace('"', "\"\"")))
                        .collect::<Vec<_>>()
                        .join(" || '|' || ");
                    let rows = svc.sql_strings(&format!(
                        "SELECT {row} FROM \"{}\"",
                        table.replace('"', "\"\"")
                    ));
                    (table, rows.join("\n"))
                })
                .collect()
        }
    }
}

/// Every column name of every table.
fn column_names(svc: &Service) -> Vec<String> {
    match svc.backend() {
        Backend::Postgres => svc.sql_strings(
            "SELECT table_name || '.' || column_name FROM information_schema.columns \
             WHERE table_schema = current_schema()",
        ),
        Backend::Sqlite => svc.sql_strings(
            "SELECT m.name || '.' || p.name FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table'",
        ),
    }
}

/// The length of a card's sealed record.
fn ciphertext_len(svc: &Service, token: &str) -> i64 {
    let f = match svc.backend() {
        // PostgreSQL's octet_length is an INT4; the harness reads INT8.
        Backend::Postgres => "CAST(octet_length(ciphertext) AS BIGINT)",
        Backend::Sqlite => "length(ciphertext)",
    };
    svc.sql_i64(&format!(
        "SELECT {f} FROM cards WHERE token = '{}'",
        token.replace('\'', "''")
    ))
}

/// Every regular file under `root` that is UTF-8 text, with its content.
fn text_files(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = fs::read(&path) {
                if let Ok(text) = String::from_utf8(bytes) {
                    out.push((path.display().to_string(), text));
                }
            }
        }
    }
    out
}

/// After a workload with distinctive codes (tokenized, looked up,
/// detokenized without and with `include_cvc`, refused as invalid, a
/// backup, a graceful stop) no code is anywhere the service writes.
///
/// How the search avoids false positives and can still fail: a 3 or 4
/// digit value occurs by chance in any binary file (ciphertext, SQLite
/// pages), so binary files are not searched byte by byte. Instead:
/// - text is searched for each code as a whole token ([`whole_token_hits`]:
///   not inside a longer number, a fraction, hex or base64): everything
///   the binary printed (logs at trace level, CLI output), every UTF-8
///   file of the data directory (backup, witness file, ...), and every row
///   of every table, audit trail included, as text (BLOBs become hex, which
///   the whole-token rule skips). The codes start with a zero (`047`,
///   `0093`, ...): programs print numbers without leading zeros, so no
///   count, size, port or duration can be mistaken for one, and the dates
///   and times of the logs have 2-digit fields or 6-digit fractions.
///   Positive control: the same search finds the code in the detokenize
///   answer that released it.
/// - a code encrypted into the database would not show as text, so: no
///   column of any table is named for it, and the sealed record of a card
///   tokenized with a code is exactly as long as that of the same card
///   (same expiry, no name) tokenized without one for another tenant.
#[test]
fn a_cvc_is_never_written_to_the_database_files_logs_or_backups() {
    let mut svc = start(&[]);
    let client = admin(&svc);
    let cards: [(&str, &str); 4] = [
        ("4111111111111111", "047"),
        ("5555555555554444", "093"),
        ("378282246310005", "0471"),
        ("371449635398431", "0086"),
    ];
    // Sent, refused: as secret as the valid ones.
    let invalid: [(&str, &str); 2] = [("4242424242424242", "0093"), ("4242424242424242", "00471")];
    let mut tokens = Vec::new();
    for (pan, cvc) in cards {
        let resp = tokenize_with_cvc(&client, TENANT, pan, cvc);
        expect_status(&resp, 201);
        assert_available(&resp, true);
        tokens.push(resp.str("token"));
    }
    for (pan, cvc) in invalid {
        expect_error(
            &tokenize_with_cvc(&client, TENANT, pan, cvc),
            422,
            "invalid_cvc",
            &[pan],
        );
    }
    let mut released_bodies = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        expect_status(&client.metadata(token), 200);
        expect_status(&client.detokenize(token, REASON), 200);
        if i % 2 == 0 {
            let resp = detokenize_cvc(&client, token, true);
            assert_eq!(released(&resp).as_deref(), Some(cards[i].1), "{resp}");
            released_bodies.push((cards[i].1, resp.text));
        }
    }
    // Positive control: the search finds a code where it is.
    for (cvc, body) in &released_bodies {
        assert_eq!(whole_token_hits(body, cvc).len(), 1, "{body}");
    }
    // The same card with and without a code: records of the same size.
    let with = &tokens[0];
    let without = client.tokenize("shop-no-cvc", cards[0].0, 12, exp_year());
    expect_status(&without, 201);
    assert_eq!(
        ciphertext_len(&svc, with),
        ciphertext_len(&svc, &without.str("token")),
        "the sealed record of a card tokenized with a cvc is longer: the cvc is in it"
    );
    let named: Vec<String> = column_names(&svc)
        .into_iter()
        .filter(|c| {
            let c = c.to_ascii_lowercase();
            ["cvc", "cvv", "cid", "security_code", "csc"]
                .iter()
                .any(|w| c.split(['.', '_']).any(|part| part == *w) || c.contains("cvc"))
        })
        .collect();
    assert!(named.is_empty(), "columns for the security code: {named:?}");

    let backup = svc.data_dir().join("e2e-cvc.backup");
    let out = svc.cli(&["backup", "--out", backup.to_str().unwrap()]);
    assert!(out.success(), "{out:?}");
    assert!(svc
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));

    let mut sources: Vec<(String, String)> = vec![
        ("captured stdout".into(), svc.stdout()),
        ("captured stderr".into(), svc.stderr()),
    ];
    sources.extend(text_files(svc.data_dir()));
    sources.extend(
        all_rows(&svc)
            .into_iter()
            .map(|(table, rows)| (format!("table {table}"), rows)),
    );
    let places: Vec<&str> = sources.iter().map(|(p, _)| p.as_str()).collect();
    let backup_name = backup.display().to_string();
    assert!(
        places.contains(&backup_name.as_str()),
        "the backup is not UTF-8 text, or missing: {places:?}"
    );
    for must in ["table cards", "table audit_events"] {
        assert!(places.contains(&must), "{must} not read: {places:?}");
    }
    assert!(
        svc.stderr().contains(" TRACE "),
        "the service did not log at trace level"
    );
    let mut findings = Vec::new();
    let codes: Vec<&str> = cards
        .iter()
        .chain(invalid.iter())
        .map(|(_, cvc)| *cvc)
        .collect();
    for (place, text) in &sources {
        for cvc in &codes {
            for hit in whole_token_hits(text, cvc) {
                findings.push(format!("{cvc} in {place}: …{hit}…"));
            }
        }
    }
    let bytes: usize = sources.iter().map(|(_, t)| t.len()).sum();
    crate::report(&format!(
        "cvc: {} codes searched as whole tokens in {} places ({bytes} bytes of text), {} found ({})",
        codes.len(),
        sources.len(),
        findings.len(),
        svc.backend().name()
    ));
    assert!(
        findings.is_empty(),
        "security codes written where they must never be:\n{}",
        findings.join("\n")
    );
}
