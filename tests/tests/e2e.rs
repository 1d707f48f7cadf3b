//! End-to-end tests of the `tokenizer` binary: each test starts its own
//! server on a fresh data directory and talks to it over HTTP.
//!
//! Build the binary first: `cargo build -p tokenizer-api --bin tokenizer`.
//!
//! Every test runs on the backend chosen by `CARDVAULT_TEST_BACKEND`
//! (`sqlite`, the default, or `postgres`: a fresh database per service on the
//! server of `CARDVAULT_TEST_PG_URL`). `multi_instance`, `outage`,
//! `failover` and `readiness` test properties only PostgreSQL has and always
//! use it (the last three on throwaway clusters of their own).
#![allow(clippy::unwrap_used, clippy::print_stderr)]

// One test binary; its modules live in `e2e/`.

#[path = "e2e/audit_trail.rs"]
mod audit_trail;
#[path = "e2e/auth.rs"]
mod auth;
#[path = "e2e/authz.rs"]
mod authz;
#[path = "e2e/backups.rs"]
mod backups;
#[path = "e2e/batch.rs"]
mod batch;
#[path = "e2e/browser_smoke.rs"]
mod browser_smoke;
#[path = "e2e/card_lifecycle.rs"]
mod card_lifecycle;
#[path = "e2e/collect.rs"]
mod collect;
#[path = "e2e/collect_browser.rs"]
mod collect_browser;
#[path = "e2e/concurrency.rs"]
mod concurrency;
#[path = "e2e/contract.rs"]
mod contract;
#[path = "e2e/cvc.rs"]
mod cvc;
#[path = "e2e/edge.rs"]
mod edge;
#[path = "e2e/errors.rs"]
mod errors;
#[path = "e2e/failclosed.rs"]
mod failclosed;
#[path = "e2e/failover.rs"]
mod failover;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/forward.rs"]
mod forward;
#[path = "e2e/hardening.rs"]
mod hardening;
#[path = "e2e/hostile.rs"]
mod hostile;
#[path = "e2e/independent_verifier.rs"]
mod independent_verifier;
#[path = "e2e/leaks.rs"]
mod leaks;
#[path = "e2e/lifecycle.rs"]
mod lifecycle;
#[path = "e2e/metrics.rs"]
mod metrics;
#[path = "e2e/monitoring.rs"]
mod monitoring;
#[path = "e2e/multi_instance.rs"]
mod multi_instance;
#[path = "e2e/outage.rs"]
mod outage;
#[path = "e2e/pan_shaped.rs"]
mod pan_shaped;
#[path = "e2e/readiness.rs"]
mod readiness;
#[path = "e2e/roles.rs"]
mod roles;
#[path = "e2e/rotation.rs"]
mod rotation;
#[path = "e2e/roundtrip.rs"]
mod roundtrip;
#[path = "e2e/sealed.rs"]
mod sealed;
#[path = "e2e/segment.rs"]
mod segment;
#[path = "e2e/tenants.rs"]
mod tenants;
#[path = "e2e/tls.rs"]
mod tls;
// The write workload of `outage` and `failover` (no tests of its own).
#[path = "e2e/workload.rs"]
mod workload;

use e2e::{current_year_month, Client, Resp, Service};
use serde_json::{json, Value};

/// Writes one line to the process's stderr, bypassing the test harness's
/// output capture (which only catches `eprintln!`): for the figures a test
/// reports (outage, multi-instance), visible in a plain `cargo test` run.
pub fn report(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The tenant most tests use.
pub const TENANT: &str = "shop-42";
/// A reason for detokenize calls.
pub const REASON: &str = "e2e: settle order 1234";

/// Every published test card, with the brand the service must report.
pub const TEST_CARDS: &[(&str, &str)] = &[
    ("4111111111111111", "visa"),
    ("4242424242424242", "visa"),
    ("4012888888881881", "visa"),
    ("4000056655665556", "visa"),
    ("5555555555554444", "mastercard"),
    ("5105105105105100", "mastercard"),
    ("5200828282828210", "mastercard"),
    ("2223003122003222", "mastercard"),
    ("378282246310005", "amex"),
    ("371449635398431", "amex"),
    ("6011111111111117", "discover"),
    ("6011000990139424", "discover"),
    ("3530111333300000", "jcb"),
    ("3566002020360505", "jcb"),
    ("6200000000000005", "unionpay"),
    ("36227206271667", "diners_club"),
    ("30569309025904", "diners_club"),
    ("6759649826438453", "maestro"),
    ("2200000000000004", "mir"),
];

/// Published on purpose with a wrong check digit.
pub const LUHN_INVALID: &[&str] = &["4111111111111112", "5555555555554443"];

/// An expiry safely in the future, whatever today is.
pub fn exp_year() -> i64 {
    current_year_month().0 + 4
}

/// A principal with tokenize and detokenize on every tenant.
pub fn admin(svc: &Service) -> Client {
    svc.principal_client("e2e-admin", &["tokenize", "detokenize"], &["*"])
}

/// `{"pan", "exp_month", "exp_year"}` for a batch.
pub fn card(pan: &str, exp_month: i64, exp_year: i64) -> Value {
    json!({ "pan": pan, "exp_month": exp_month, "exp_year": exp_year })
}

/// Digits of a PAN grouped by 4 with spaces, as a customer would type it.
pub fn spaced(pan: &str) -> String {
    pan.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts the status, and that the response carries an `x-request-id`.
#[track_caller]
pub fn expect_status(resp: &Resp, status: u16) {
    assert_eq!(resp.status, status, "unexpected status: {resp}");
    assert!(
        resp.request_id.as_deref().is_some_and(|id| !id.is_empty()),
        "no x-request-id header: {resp}"
    );
}

/// Asserts an error response: status, `{"error": {"code", "message"}}`, an
/// `x-request-id`, and that none of `secrets` appears in the body.
#[track_caller]
pub fn expect_error(resp: &Resp, status: u16, code: &str, secrets: &[&str]) {
    expect_status(resp, status);
    assert_eq!(
        resp.error_code(),
        Some(code),
        "expected error code {code}: {resp}"
    );
    assert!(
        resp.error_message().is_some_and(|m| !m.is_empty()),
        "an error needs a message: {resp}"
    );
    for secret in secrets {
        // As sent (if long enough to mean something), and as bare digits
        // when it is card-like.
        let digits: String = secret.chars().filter(char::is_ascii_digit).collect();
        assert!(
            (secret.len() < 8 || !resp.text.contains(secret))
                && (digits.len() < 12 || !resp.text.contains(&digits)),
            "the error body repeats what was sent: {resp}"
        );
    }
}

/// Tokenizes (201 or 200) and returns the token.
#[track_caller]
pub fn token_for(client: &Client, tenant: &str, pan: &str) -> String {
    let resp = client.tokenize(tenant, pan, 12, exp_year());
    assert!(
        resp.status == 201 || resp.status == 200,
        "tokenize failed: {resp}"
    );
    resp.str("token")
}

/// `^tok_[A-Za-z0-9_-]{22,}$`
pub fn is_token(s: &str) -> bool {
    s.strip_prefix("tok_").is_some_and(|rest| {
        rest.len() >= 22
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)`
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !(digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10)
            && (b[10] == b'T')
            && digits(11..13)
            && b[13] == b':'
            && digits(14..16)
            && b[16] == b':'
            && digits(17..19))
    {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    rest == "Z" || rest == "+00:00"
}

/// `411111******1111`: first six, one `*` per hidden digit, last four.
pub fn masked(pan: &str) -> String {
    format!(
        "{}{}{}",
        &pan[..6],
        "*".repeat(pan.len() - 10),
        &pan[pan.len() - 4..]
    )
}

/// What a token object must say about a card.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub pan: &'a str,
    pub tenant: &'a str,
    pub brand: Option<&'a str>,
    pub exp_month: i64,
    pub exp_year: i64,
}

/// Checks a token object (from POST, batch or GET) field by field. `created`
/// is the expected value of the field, or `None` when it must be absent.
#[track_caller]
pub fn check_token_object(obj: &Value, expect: &Expect<'_>, created: Option<bool>) {
    let pan = expect.pan;
    let token = obj["token"].as_str().unwrap_or_default();
    assert!(is_token(token), "bad token {token:?} in {obj}");
    assert!(
        !token.contains(&pan[pan.len() - 8..]),
        "the token shows digits of the card: {obj}"
    );
    assert_eq!(obj["tenant"], expect.tenant, "tenant in {obj}");
    let fp = obj["fingerprint"].as_str().unwrap_or_default();
    assert!(
        fp.starts_with("fp_") && fp.len() > 3,
        "bad fingerprint in {obj}"
    );
    if let Some(brand) = expect.brand {
        assert_eq!(obj["brand"], brand, "brand in {obj}");
    } else {
        assert!(obj["brand"].is_string(), "brand in {obj}");
    }
    assert_eq!(obj["bin"], &pan[..6], "bin in {obj}");
    assert_eq!(obj["last4"], &pan[pan.len() - 4..], "last4 in {obj}");
    assert_eq!(obj["masked_pan"], masked(pan), "masked_pan in {obj}");
    assert_eq!(obj["exp_month"], expect.exp_month, "exp_month in {obj}");
    assert_eq!(obj["exp_year"], expect.exp_year, "exp_year in {obj}");
    let created_at = obj["created_at"].as_str().unwrap_or_default();
    assert!(
        is_rfc3339_utc(created_at),
        "created_at {created_at:?} is not RFC 3339 UTC in {obj}"
    );
    match created {
        Some(created) => assert_eq!(obj["created"], created, "created in {obj}"),
        None => assert!(
            obj.get("created").is_none(),
            "no `created` expected in {obj}"
        ),
    }
    assert!(
        obj.get("pan").is_none(),
        "a token object never has the PAN: {obj}"
    );
    assert!(
        !obj.to_string().contains(pan),
        "the token object contains the PAN: {obj}"
    );
}

#[test]
fn rfc3339_checker() {
    assert!(is_rfc3339_utc("2025-03-01T12:34:56Z"));
    assert!(is_rfc3339_utc("2025-03-01T12:34:56.123456Z"));
    assert!(is_rfc3339_utc("2025-03-01T12:34:56+00:00"));
    assert!(!is_rfc3339_utc("2025-03-01 12:34:56Z"));
    assert!(!is_rfc3339_utc("2025-03-01T12:34:56+01:00"));
    assert!(!is_rfc3339_utc("2025-03-01T12:34:56"));
    assert!(is_token("tok_abcdefghijklmnopqrstuv"));
    assert!(!is_token("tok_short"));
    assert!(!is_token("tok_abcdefghijklmnopqrstu!"));
    assert_eq!(masked("378282246310005"), "378282*****0005");
    assert_eq!(spaced("4111111111111111"), "4111 1111 1111 1111");
}
