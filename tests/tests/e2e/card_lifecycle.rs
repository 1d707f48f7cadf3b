//! Issue 9, the card lifecycle: expiry and name updates (by tokenizing the
//! card again, and `PATCH /v1/tokens/{token}`), token expiry
//! (`"expires_at"`, a tenant's `--token-ttl-days`), retention
//! (`--retention-days`), the purge (`tokenizer purge` and the scheduled one)
//! and tenant deletion (`tokenizer tenant delete`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::{civil_from_days, current_year_month, fresh_pan, Client, Resp, Service};
use serde_json::{json, Value};

use crate::{admin, exp_year, expect_error, expect_status, token_for, REASON, TENANT};

/// `time` as RFC 3339 UTC (`2030-01-02T03:04:05Z`).
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn start(extra: &[&str]) -> Service {
    Service::start_with(e2e::Options {
        extra_args: extra.iter().map(|a| (*a).to_string()).collect(),
        ..e2e::Options::default()
    })
}

/// `PATCH /v1/tokens/{token}` with a JSON body.
fn patch(client: &Client, token: &str, body: &Value) -> Resp {
    client.send_raw(
        "PATCH",
        &format!("/v1/tokens/{token}"),
        Some("application/json"),
        body.to_string().as_bytes(),
    )
}

/// `POST /v1/tokens` with any body.
fn tokenize_body(client: &Client, body: Value) -> Resp {
    client.post_json("/v1/tokens", &body)
}

/// Every audit event (the `event` objects) matching `query`.
fn audit(auditor: &Client, query: &str) -> Vec<Value> {
    let resp = auditor.get(&format!("/v1/audit/events?limit=1000&{query}"));
    expect_status(&resp, 200);
    resp.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].clone())
        .collect()
}

/// `tokenizer tenant set NAME ARGS...`.
fn tenant_set(svc: &Service, tenant: &str, args: &[&str]) {
    let mut all = vec!["tenant", "set", tenant];
    all.extend_from_slice(args);
    let out = svc.cli(&all);
    assert!(
        out.success(),
        "`tokenizer {}` failed: {out:?}",
        all.join(" ")
    );
}

/// The integer after `key` in an audit detail or a JSON line (`key=3`,
/// `key: 3`, `"key":3`).
fn count_in(text: &str, key: &str) -> Option<i64> {
    let at = text.find(key)?;
    let rest = &text[at + key.len()..];
    let rest = rest.trim_start_matches(['"', '=', ':', ' ']);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Polls `check` every 100 ms until it returns true; fails after `limit`.
#[track_caller]
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check() {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cards_of(svc: &Service, tenant: &str) -> i64 {
    svc.sql_i64(&format!(
        "SELECT COUNT(*) FROM cards WHERE tenant = '{tenant}'"
    ))
}

// ---------------------------------------------------------------------------
// Expiry and name updates
// ---------------------------------------------------------------------------

/// Tokenizing a known card with a newer expiry updates it (`"updated":
/// true`, same token, new expiry shown and returned by detokenize); an
/// older expiry never overwrites a newer one (`"updated": false`, the
/// stored one shown); the same expiry with a new name updates the name.
/// Each update is one `card_updated` audit event.
#[test]
fn a_newer_expiry_updates_the_card_and_an_older_one_never_does() {
    let svc = start(&[]);
    let client = admin(&svc);
    let auditor = svc.principal_client("lifecycle-auditor", &["auditor"], &["*"]);
    let pan = fresh_pan();
    let year = exp_year();
    let first = client.tokenize_named(TENANT, &pan, 5, year, "Ann Old");
    expect_status(&first, 201);
    let token = first.str("token");

    let newer = client.tokenize(TENANT, &pan, 6, year);
    expect_status(&newer, 200);
    assert_eq!(newer.json["token"], token.as_str(), "{newer}");
    assert_eq!(newer.json["created"], false, "{newer}");
    assert_eq!(newer.json["updated"], true, "{newer}");
    assert_eq!(newer.json["exp_month"], 6, "{newer}");
    assert_eq!(newer.json["exp_year"], year, "{newer}");
    let clear = client.detokenize(&token, REASON);
    assert_eq!(
        (&clear.json["exp_month"], &clear.json["exp_year"]),
        (&json!(6), &json!(year)),
        "{clear}"
    );
    assert_eq!(
        clear.json["cardholder_name"], "Ann Old",
        "an update without a name keeps the name: {clear}"
    );

    // Older: the month before, and a year before.
    for (m, y) in [(5, year), (12, year - 1)] {
        let older = client.tokenize_named(TENANT, &pan, m, y, "Ann Older");
        expect_status(&older, 200);
        assert_eq!(older.json["token"], token.as_str(), "{older}");
        assert_eq!(older.json["updated"], false, "{older}");
        assert_eq!(
            older.json["exp_month"], 6,
            "shows the stored expiry: {older}"
        );
        assert_eq!(older.json["exp_year"], year, "{older}");
    }
    let clear = client.detokenize(&token, REASON);
    assert_eq!(
        clear.json["exp_month"], 6,
        "an older expiry overwrote: {clear}"
    );
    assert_eq!(clear.json["cardholder_name"], "Ann Old", "{clear}");

    // The same expiry again: nothing to update.
    let same = client.tokenize(TENANT, &pan, 6, year);
    expect_status(&same, 200);
    assert_eq!(same.json["updated"], false, "{same}");
    // The same expiry with a new name.
    let renamed = client.tokenize_named(TENANT, &pan, 6, year, "Ann New");
    expect_status(&renamed, 200);
    assert_eq!(renamed.json["updated"], true, "{renamed}");
    assert_eq!(renamed.json["token"], token.as_str());
    assert!(
        !renamed.text.contains("Ann New"),
        "the name is card data: {renamed}"
    );
    let clear = client.detokenize(&token, REASON);
    assert_eq!(clear.json["cardholder_name"], "Ann New", "{clear}");
    assert_eq!(clear.json["pan"], pan.as_str());
    // Metadata shows the new expiry.
    let meta = client.metadata(&token);
    assert_eq!(
        (&meta.json["exp_month"], &meta.json["exp_year"]),
        (&json!(6), &json!(year)),
        "{meta}"
    );

    let updates = audit(&auditor, &format!("action=card_updated&token={token}"));
    assert_eq!(updates.len(), 2, "one card_updated per update: {updates:?}");
    for event in &updates {
        assert_eq!(event["tenant"], TENANT, "{event}");
        assert!(
            !event.to_string().contains("Ann"),
            "a name in the trail: {event}"
        );
    }

    // In a batch too.
    let batch = client.batch(TENANT, &[crate::card(&pan, 7, year)]);
    expect_status(&batch, 200);
    let result = &batch.json["results"][0];
    assert_eq!(result["token"], token.as_str(), "{batch}");
    assert_eq!(result["updated"], true, "{batch}");
    assert_eq!(result["exp_month"], 7, "{batch}");
}

/// `PATCH /v1/tokens/{token}`: a newer expiry or a name updates (200, token
/// object with `"updated": true`); an older expiry 409 `older_expiry`;
/// invalid values 422; unknown token 404; bad JSON 400; another tenant's
/// token 404. Nothing changes on an error.
#[test]
fn patch_updates_expiry_and_name_and_refuses_the_rest() {
    let svc = start(&[]);
    let client = admin(&svc);
    let pan = fresh_pan();
    let year = exp_year();
    let token = client
        .tokenize_named(TENANT, &pan, 5, year, "Bo Before")
        .str("token");
    let (now_year, now_month) = current_year_month();

    let resp = patch(&client, &token, &json!({"exp_month": 8, "exp_year": year}));
    expect_status(&resp, 200);
    assert_eq!(resp.json["token"], token.as_str(), "{resp}");
    assert_eq!(resp.json["updated"], true, "{resp}");
    assert_eq!(resp.json["exp_month"], 8, "{resp}");
    assert_eq!(resp.json["exp_year"], year, "{resp}");
    assert!(
        resp.json.get("pan").is_none() && !resp.text.contains(&pan),
        "{resp}"
    );
    let resp = patch(&client, &token, &json!({"cardholder_name": "Bo After"}));
    expect_status(&resp, 200);
    assert_eq!(resp.json["updated"], true, "{resp}");
    assert!(
        !resp.text.contains("Bo After"),
        "the name is card data: {resp}"
    );
    let resp = patch(
        &client,
        &token,
        &json!({"exp_month": 9, "exp_year": year, "cardholder_name": "Bo Both"}),
    );
    expect_status(&resp, 200);
    let clear = client.detokenize(&token, REASON);
    assert_eq!(clear.json["exp_month"], 9, "{clear}");
    assert_eq!(clear.json["cardholder_name"], "Bo Both", "{clear}");
    assert_eq!(clear.json["pan"], pan.as_str());

    let other = svc.principal_client("patch-other", &["tokenize"], &["shop-other"]);
    let stored = svc.dump_data();
    let last_year_month = if now_month == 1 {
        (12, now_year - 1)
    } else {
        (now_month - 1, now_year)
    };
    let refusals: Vec<(Value, u16, &str)> = vec![
        (
            json!({"exp_month": 8, "exp_year": year}),
            409,
            "older_expiry",
        ),
        (
            json!({"exp_month": 12, "exp_year": year - 1}),
            409,
            "older_expiry",
        ),
        (
            json!({"exp_month": 13, "exp_year": year}),
            422,
            "invalid_expiry",
        ),
        (
            json!({"exp_month": 0, "exp_year": year}),
            422,
            "invalid_expiry",
        ),
        (
            json!({"exp_month": last_year_month.0, "exp_year": last_year_month.1}),
            422,
            "card_expired",
        ),
        (
            json!({"cardholder_name": "N".repeat(65)}),
            422,
            "invalid_cardholder_name",
        ),
        (
            json!({"cardholder_name": ""}),
            422,
            "invalid_cardholder_name",
        ),
        (
            json!({"cardholder_name": "Bo\nNewline"}),
            422,
            "invalid_cardholder_name",
        ),
        (
            json!({"cardholder_name": pan}),
            422,
            "invalid_cardholder_name",
        ),
        // A valid name does not carry an invalid expiry in with it.
        (
            json!({"exp_month": 13, "exp_year": year, "cardholder_name": "Bo Valid"}),
            422,
            "invalid_expiry",
        ),
        (
            json!({"exp_month": 10, "exp_year": year, "cardholder_name": "N".repeat(65)}),
            422,
            "invalid_cardholder_name",
        ),
        (
            json!({"exp_month": "x", "exp_year": year}),
            400,
            "invalid_request",
        ),
        (
            json!({"exp_month": 10, "exp_year": year, "pan": pan}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in &refusals {
        let resp = patch(&client, &token, body);
        assert_eq!(
            (resp.status, resp.error_code()),
            (*status, Some(*code)),
            "PATCH with a refused body: {resp}"
        );
        expect_error(&resp, *status, code, &[&pan]);
    }
    let bad_json = client.send_raw(
        "PATCH",
        &format!("/v1/tokens/{token}"),
        Some("application/json"),
        b"{\"exp_month\": 10,",
    );
    expect_error(&bad_json, 400, "malformed_json", &[]);
    expect_error(
        &patch(
            &client,
            "tok_AAAAAAAAAAAAAAAAAAAAAA",
            &json!({"cardholder_name": "Bo"}),
        ),
        404,
        "not_found",
        &[],
    );
    // Another tenant's token: 404 to a principal of another tenant.
    expect_error(
        &patch(&other, &token, &json!({"cardholder_name": "Mallory"})),
        404,
        "not_found",
        &[],
    );
    assert_eq!(
        svc.dump_data(),
        stored,
        "a refused PATCH changed stored data"
    );
    let clear = client.detokenize(&token, REASON);
    assert_eq!(clear.json["exp_month"], 9, "{clear}");
    assert_eq!(clear.json["cardholder_name"], "Bo Both", "{clear}");

    // A deleted token is unknown to PATCH too.
    expect_status(&client.delete_token(&token), 204);
    expect_error(
        &patch(&client, &token, &json!({"cardholder_name": "Bo"})),
        404,
        "not_found",
        &[],
    );
}

// ---------------------------------------------------------------------------
// Token expiry, purge, retention
// ---------------------------------------------------------------------------

/// A token with `"expires_at"` a few seconds ahead works until then and is
/// gone afterwards as if deleted (metadata, detokenize, PATCH, DELETE:
/// 404), even before any purge; the card is new again for the tenant. An
/// `expires_at` in the past or not RFC 3339 is refused.
#[test]
fn a_token_is_gone_after_its_expires_at() {
    // No scheduled purge during the test: expiry must hold on its own.
    let svc = start(&["--purge-interval-secs", "3600"]);
    let client = admin(&svc);
    let pan = fresh_pan();
    let keep = token_for(&client, TENANT, &fresh_pan());
    // On a whole second: the RFC 3339 form below has no fraction.
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = UNIX_EPOCH + Duration::from_secs(now_secs + 4);
    let resp = tokenize_body(
        &client,
        json!({"tenant": TENANT, "pan": pan, "exp_month": 12, "exp_year": exp_year(),
               "expires_at": rfc3339(expires)}),
    );
    expect_status(&resp, 201);
    let token = resp.str("token");
    expect_status(&client.metadata(&token), 200);
    expect_status(&client.detokenize(&token, REASON), 200);

    let waited = wait_until(Duration::from_secs(20), "the token did not expire", || {
        client.metadata(&token).status == 404
    });
    assert!(
        SystemTime::now() + Duration::from_millis(500) >= expires,
        "gone {waited:?} in, before its expires_at"
    );
    expect_error(&client.metadata(&token), 404, "not_found", &[&pan]);
    expect_error(
        &client.detokenize(&token, REASON),
        404,
        "not_found",
        &[&pan],
    );
    expect_error(
        &patch(&client, &token, &json!({"cardholder_name": "Late"})),
        404,
        "not_found",
        &[&pan],
    );
    expect_error(&client.delete_token(&token), 404, "not_found", &[&pan]);
    expect_status(&client.detokenize(&keep, REASON), 200);
    // Tokenized again: a new card, a new token.
    let again = client.tokenize(TENANT, &pan, 12, exp_year());
    expect_status(&again, 201);
    assert_ne!(again.str("token"), token);

    for bad in [
        json!(rfc3339(SystemTime::now() - Duration::from_secs(60))),
        json!("tomorrow"),
        json!("2030-13-01T00:00:00Z"),
        json!(1_900_000_000),
    ] {
        let resp = tokenize_body(
            &client,
            json!({"tenant": TENANT, "pan": fresh_pan(), "exp_month": 12, "exp_year": exp_year(),
                   "expires_at": bad}),
        );
        assert!(
            resp.status == 400 || resp.status == 422,
            "expires_at {bad}: {resp}"
        );
    }
}

/// `tokenizer purge` deletes expired records (one JSON line with the
/// counts; the rows are gone; one `purged` audit event with the counts);
/// a second run finds nothing. Records not yet due stay.
#[test]
fn purge_deletes_expired_records_with_counts_in_the_audit_trail() {
    let svc = start(&["--purge-interval-secs", "3600"]);
    let client = admin(&svc);
    let auditor = svc.principal_client("purge-auditor", &["auditor"], &["*"]);
    let soon = rfc3339(SystemTime::now() + Duration::from_secs(2));
    let later = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let mut expiring = Vec::new();
    for _ in 0..3 {
        let resp = tokenize_body(
            &client,
            json!({"tenant": TENANT, "pan": fresh_pan(), "exp_month": 12, "exp_year": exp_year(),
                   "expires_at": soon}),
        );
        expect_status(&resp, 201);
        expiring.push(resp.str("token"));
    }
    let not_due = tokenize_body(
        &client,
        json!({"tenant": TENANT, "pan": fresh_pan(), "exp_month": 12, "exp_year": exp_year(),
               "expires_at": later}),
    )
    .str("token");
    let plain = token_for(&client, TENANT, &fresh_pan());
    assert_eq!(cards_of(&svc, TENANT), 5);
    wait_until(Duration::from_secs(20), "the tokens did not expire", || {
        expiring.iter().all(|t| client.metadata(t).status == 404)
    });

    let out = svc.cli(&["purge"]);
    assert!(out.success(), "{out:?}");
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "`purge` prints one JSON line: {out:?}");
    let counts: Value = serde_json::from_str(lines[0]).expect("`purge` prints JSON");
    assert_eq!(counts["expired"], 3, "{counts}");
    assert_eq!(counts["retention"], 0, "{counts}");
    assert_eq!(
        cards_of(&svc, TENANT),
        2,
        "the expired rows are still there"
    );
    for token in [&not_due, &plain] {
        expect_status(&client.metadata(token), 200);
    }
    let events = audit(&auditor, "action=purged");
    assert_eq!(events.len(), 1, "{events:?}");
    let detail = events[0]["detail"].as_str().unwrap_or_default();
    assert_eq!(
        count_in(detail, "expired"),
        Some(3),
        "purged detail: {detail}"
    );
    for token in &expiring {
        assert!(!detail.contains(token.as_str()), "tokens in the detail");
    }

    let out = svc.cli(&["purge"]);
    assert!(out.success(), "{out:?}");
    let counts: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(counts["expired"], 0, "{counts}");
    assert_eq!(counts["retention"], 0, "{counts}");
    assert_eq!(cards_of(&svc, TENANT), 2);
}

/// The service purges by itself every `--purge-interval-secs`: expired
/// rows disappear without any call, with a `purged` audit event and
/// `cardvault_purged_records_total` counting them.
#[test]
fn the_scheduled_purge_deletes_expired_records() {
    let svc = start(&["--purge-interval-secs", "1"]);
    let client = admin(&svc);
    let auditor = svc.principal_client("purge-auditor", &["auditor"], &["*"]);
    let soon = rfc3339(SystemTime::now() + Duration::from_secs(2));
    for _ in 0..4 {
        let resp = tokenize_body(
            &client,
            json!({"tenant": TENANT, "pan": fresh_pan(), "exp_month": 12, "exp_year": exp_year(),
                   "expires_at": soon}),
        );
        expect_status(&resp, 201);
    }
    let keep = token_for(&client, TENANT, &fresh_pan());
    let waited = wait_until(
        Duration::from_secs(30),
        "the scheduled purge did not delete the expired rows",
        || cards_of(&svc, TENANT) == 1,
    );
    expect_status(&client.detokenize(&keep, REASON), 200);
    let purged: i64 = audit(&auditor, "action=purged")
        .iter()
        .filter_map(|e| count_in(e["detail"].as_str().unwrap_or_default(), "expired"))
        .sum();
    assert_eq!(purged, 4, "expired counts in the purged events");
    let metrics = svc.anonymous().get("/metrics").text;
    let total: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("cardvault_purged_records_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 4.0, "cardvault_purged_records_total:\n{metrics}");
    crate::report(&format!(
        "scheduled purge: 4 expired rows gone {waited:?} after tokenize ({})",
        svc.backend().name()
    ));
}

/// A tenant's `--token-ttl-days` gives its new tokens an expiry (that day
/// count ahead); other tenants' tokens have none. Moved into the past
/// under the service, such a token is gone.
#[test]
fn a_tenant_default_token_ttl_applies_to_its_new_tokens() {
    let svc = start(&["--purge-interval-secs", "3600"]);
    let client = admin(&svc);
    tenant_set(&svc, "shop-ttl", &["--token-ttl-days", "2"]);
    let token = token_for(&client, "shop-ttl", &fresh_pan());
    let other = token_for(&client, TENANT, &fresh_pan());
    let q = |t: &str| {
        format!("SELECT COUNT(*) FROM cards WHERE token = '{t}' AND expires_at IS NOT NULL AND expires_at > created_at")
    };
    assert_eq!(
        svc.sql_i64(&q(&token)),
        1,
        "no expiry from the tenant's ttl"
    );
    assert_eq!(
        svc.sql_i64(&q(&other)),
        0,
        "an expiry for a tenant without ttl"
    );
    // About two days ahead, whatever the unit: (expires - created) / 2 days.
    let ratio = svc.sql_strings(&format!(
        "SELECT CAST(CAST(expires_at - created_at AS REAL) / 2.0 AS TEXT) FROM cards WHERE token = '{token}'"
    ));
    let ratio: f64 = ratio[0].parse().unwrap();
    assert!(
        (ratio - 86_400.0).abs() < 10.0 || (ratio - 86_400_000.0).abs() < 10_000.0,
        "expires_at - created_at is not 2 days (half of it: {ratio})"
    );
    expect_status(&client.metadata(&token), 200);
    svc.sql(&format!(
        "UPDATE cards SET expires_at = created_at - 1 WHERE token = '{token}'"
    ));
    expect_error(&client.metadata(&token), 404, "not_found", &[]);
    expect_status(&client.metadata(&other), 200);
}

/// Retention: with `--retention-days 1`, records not used (tokenized again
/// or detokenized) for longer are purged; use moves the mark. Days cannot
/// be waited for: `last_used_at` (and `created_at`) are moved three days
/// back under the service.
#[test]
fn retention_purges_records_unused_for_longer_than_the_tenant_allows() {
    let svc = start(&["--purge-interval-secs", "3600"]);
    let client = admin(&svc);
    tenant_set(&svc, "shop-ret", &["--retention-days", "1"]);
    let pans: Vec<String> = (0..4).map(|_| fresh_pan()).collect();
    let tokens: Vec<String> = pans
        .iter()
        .map(|p| token_for(&client, "shop-ret", p))
        .collect();
    let elsewhere = token_for(&client, TENANT, &fresh_pan());
    // Everything three days old (milliseconds or seconds: either is > 1 day).
    svc.sql(
        "UPDATE cards SET last_used_at = last_used_at - 259200000, created_at = created_at - 259200000",
    );
    // Used since: one detokenized, one tokenized again.
    expect_status(&client.detokenize(&tokens[0], REASON), 200);
    expect_status(&client.tokenize("shop-ret", &pans[1], 12, exp_year()), 200);

    let out = svc.cli(&["purge"]);
    assert!(out.success(), "{out:?}");
    let counts: Value = serde_json::from_str(out.stdout.trim()).expect("`purge` prints JSON");
    assert_eq!(counts["retention"], 2, "{counts}");
    assert_eq!(counts["expired"], 0, "{counts}");
    for token in &tokens[..2] {
        expect_status(&client.metadata(token), 200);
    }
    for token in &tokens[2..] {
        expect_error(&client.metadata(token), 404, "not_found", &[]);
    }
    // A tenant without retention keeps its old records.
    expect_status(&client.metadata(&elsewhere), 200);
    assert_eq!(cards_of(&svc, "shop-ret"), 2);
}

// ---------------------------------------------------------------------------
// Tenant deletion
// ---------------------------------------------------------------------------

/// `tokenizer tenant delete NAME`: every record of the tenant and its
/// fingerprint salt are gone (crypto-shred), one `tenant_deleted` audit
/// event with the count; its tokens are 404, tokenizing for it is 409
/// `tenant_deleted`; another tenant is untouched.
#[test]
fn deleting_a_tenant_removes_its_records_and_refuses_it_afterwards() {
    let svc = start(&[]);
    let client = admin(&svc);
    let auditor = svc.principal_client("tenant-auditor", &["auditor"], &["*"]);
    let gone = "shop-closing";
    let pans: Vec<String> = (0..5).map(|_| fresh_pan()).collect();
    let tokens: Vec<String> = pans.iter().map(|p| token_for(&client, gone, p)).collect();
    // The same cards at another tenant.
    let kept: Vec<String> = pans.iter().map(|p| token_for(&client, TENANT, p)).collect();
    let salted = svc.sql_i64(&format!(
        "SELECT COUNT(*) FROM tenants WHERE name = '{gone}' AND fingerprint_salt IS NOT NULL"
    ));
    assert_eq!(salted, 1, "a new tenant has its own fingerprint salt");

    let out = svc.cli(&["tenant", "delete", gone]);
    assert!(out.success(), "{out:?}");
    assert_eq!(
        cards_of(&svc, gone),
        0,
        "records of the deleted tenant remain"
    );
    assert_eq!(
        svc.sql_i64(&format!(
            "SELECT COUNT(*) FROM tenants WHERE name = '{gone}' AND fingerprint_salt IS NULL"
        )),
        1,
        "the fingerprint salt survived the deletion"
    );
    for (token, pan) in tokens.iter().zip(&pans) {
        expect_error(&client.metadata(token), 404, "not_found", &[pan]);
        expect_error(&client.detokenize(token, REASON), 404, "not_found", &[pan]);
    }
    for (token, pan) in kept.iter().zip(&pans) {
        let clear = client.detokenize(token, REASON);
        expect_status(&clear, 200);
        assert_eq!(clear.json["pan"], pan.as_str());
    }
    assert_eq!(cards_of(&svc, TENANT), 5);
    let before = svc.sql_i64("SELECT COUNT(*) FROM cards");
    expect_error(
        &client.tokenize(gone, &pans[0], 12, exp_year()),
        409,
        "tenant_deleted",
        &[&pans[0]],
    );
    let batch = client.batch(gone, &[crate::card(&fresh_pan(), 12, exp_year())]);
    assert!(
        batch.error_code() == Some("tenant_deleted")
            || batch.json["results"][0]["error"]["code"] == "tenant_deleted",
        "batch for a deleted tenant: {batch}"
    );
    assert_eq!(svc.sql_i64("SELECT COUNT(*) FROM cards"), before);

    // One event or two (started, finished), all naming the tenant; one
    // with the count.
    let events = audit(&auditor, "action=tenant_deleted");
    assert!(!events.is_empty(), "no tenant_deleted event");
    for event in &events {
        assert_eq!(event["tenant"], gone, "{event}");
    }
    assert!(
        events.iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or_default()
            .split(|c: char| !c.is_ascii_digit())
            .any(|n| n == "5")),
        "no count of the 5 deleted records in {events:?}"
    );
    // A tenant that never was cannot be deleted.
    assert!(!svc.cli(&["tenant", "delete", "shop-never"]).success());
}
