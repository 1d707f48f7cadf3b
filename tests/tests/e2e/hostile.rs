//! Hostile input against the running service: malformed and truncated
//! JSON, wrong types, duplicate keys, deep nesting, unicode, control
//! characters and NUL in every string field, numbers out of range,
//! oversized bodies, headers and batches, path tricks in token ids,
//! SQL-looking strings, unexpected methods and media types, slow clients.
//!
//! Every case must get a typed error (status and stable code) or a closed
//! connection, never a 5xx; afterwards the process still runs, the stored
//! data (every table but the audit trail, which records the refusals) is
//! byte for byte what it was, and every token still detokenizes to its card.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::{raw_http, RawOutcome, Resp, Service};
use serde_json::{json, Value};

use crate::{exp_year, expect_status, REASON, TENANT, TEST_CARDS};

/// What a case may answer.
#[derive(Debug, Clone)]
enum Expect {
    /// Exactly this status and error code.
    Error(u16, &'static str),
    /// One of these (status, code) pairs.
    OneOf(Vec<(u16, &'static str)>),
    /// 200 with `{"results": [...]}` where every item is an error.
    BatchAllRefused,
    /// 200 with `{"events": []}` (an audit query matching nothing), or 400
    /// `invalid_filter` (a filter value of the wrong shape).
    NoEvents,
    /// 200 `{"sealed": false, ..}`: unsealing a service that is not sealed
    /// only reports its status, whatever custodian and passphrase it is sent.
    AlreadyUnsealed,
}

/// One hostile request, sent as raw bytes.
struct Case {
    what: String,
    /// The listener serving the case's path.
    addr: String,
    request: Vec<u8>,
    expect: Expect,
}

/// A case's request: `method path` with the key of the all-roles principal,
/// `Connection: close`, the given `Content-Type` and a `Content-Length`.
fn request(
    addr: &str,
    key: &str,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The cases of one service: bodies built around `token` (a stored token)
/// and `fresh` (a valid card number that is not stored: if anything
/// accepted it, the data would change).
struct Builder<'a> {
    endpoints: &'a e2e::Endpoints,
    key: &'a str,
    token: &'a str,
    fresh: &'a str,
    cases: Vec<Case>,
}

impl Builder<'_> {
    fn post(&mut self, what: impl Into<String>, path: &str, body: &[u8], expect: Expect) {
        let addr = self.endpoints.addr_for(path).to_string();
        let request = request(
            &addr,
            self.key,
            "POST",
            path,
            Some("application/json"),
            body,
        );
        self.cases.push(Case {
            what: what.into(),
            addr,
            request,
            expect,
        });
    }

    fn raw(
        &mut self,
        what: impl Into<String>,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
        expect: Expect,
    ) {
        let addr = self.endpoints.addr_for(path).to_string();
        let request = request(&addr, self.key, method, path, content_type, body);
        self.cases.push(Case {
            what: what.into(),
            addr,
            request,
            expect,
        });
    }

    fn tokenize_body(&self) -> Value {
        json!({
            "tenant": TENANT, "pan": self.fresh, "exp_month": 12, "exp_year": exp_year(),
            "cardholder_name": "Ada Lovelace",
        })
    }

    fn batch_body(&self) -> Value {
        json!({
            "tenant": TENANT,
            "cards": [{"pan": self.fresh, "exp_month": 12, "exp_year": exp_year()}],
        })
    }

    fn detokenize_body(&self) -> Value {
        json!({ "token": self.token, "reason": REASON })
    }
}

fn unseal_body() -> Value {
    json!({ "custodian": "alice", "passphrase": "correct horse battery staple" })
}

const MALFORMED: (u16, &str) = (400, "malformed_json");
const INVALID: (u16, &str) = (400, "invalid_request");

/// A token of the right shape that was never issued.
const UNKNOWN_TOKEN: &str = "tok_AAAAAAAAAAAAAAAAAAAAAA";

/// Hostile strings for text fields. `\u{..}` escapes are JSON text (the
/// lone surrogate and the raw invalid UTF-8 are not valid JSON strings).
const CONTROL: &[&str] = &[
    r"\u0000",
    r"a\u0000b",
    r"\u0007",
    r"\u001b[31m",
    r"\r\n",
    r"x\ty",
    r"\u007f",
];
const UNICODE: &[&str] = &[
    r"\u202e",
    r"x\u202ey",
    r"x\u200by",
    r"\ufeffx",
    r"\u2028",
    "😀",
    "é",
    "ﬁ",
    "４１１１",
    "ＳＨＯＰ",
];
const NOT_JSON_STRINGS: &[&[u8]] = &[br"\ud800", br"\udfff", b"\xff\xfe", b"\xc0\xaf"];
const SQL: &[&str] = &[
    "' OR '1'='1",
    "shop-42'; DROP TABLE cards; --",
    "\\\" OR 1=1 --",
    "1; DELETE FROM cards",
    "%' UNION SELECT * FROM principals --",
];

/// Replaces the value of `field` in a JSON object text by raw JSON text.
fn with_raw_field(body: &Value, field: &str, raw_value: &[u8]) -> Vec<u8> {
    let mut obj = body.clone();
    obj[field] = json!("__HOSTILE__");
    let text = obj.to_string();
    let (before, after) = text.split_once("\"__HOSTILE__\"").unwrap();
    let mut out = before.as_bytes().to_vec();
    out.extend_from_slice(raw_value);
    out.extend_from_slice(after.as_bytes());
    out
}

/// A JSON string literal holding `inner` verbatim (already JSON-escaped).
fn string_literal(inner: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    out.extend_from_slice(inner);
    out.push(b'"');
    out
}

fn build_cases(svc: &Service, key: &str, token: &str, fresh: &str) -> Vec<Case> {
    let endpoints = svc.endpoints().clone();
    let mut b = Builder {
        endpoints: &endpoints,
        key,
        token,
        fresh,
        cases: Vec::new(),
    };
    let year = exp_year();
    let endpoints: Vec<(&str, Value)> = vec![
        ("/v1/tokens", b.tokenize_body()),
        ("/v1/tokens/batch", b.batch_body()),
        ("/v1/detokenize", b.detokenize_body()),
        ("/v1/admin/unseal", unseal_body()),
    ];

    // Truncated JSON: every proper prefix of a valid body; trailing garbage.
    for (path, body) in &endpoints {
        let text = body.to_string();
        for len in 0..text.len() {
            b.post(
                format!("{path}: body cut at {len}"),
                path,
                &text.as_bytes()[..len],
                Expect::Error(MALFORMED.0, MALFORMED.1),
            );
        }
        for tail in ["x", "}", ",", "{}", "\u{0}"] {
            b.post(
                format!("{path}: trailing {tail:?}"),
                path,
                format!("{text}{tail}").as_bytes(),
                Expect::Error(MALFORMED.0, MALFORMED.1),
            );
        }
        for junk in ["'single'", "{'a':1}", "NaN", "\u{feff}{}", "{,}", "{:1}"] {
            b.post(
                format!("{path}: not JSON {junk:?}"),
                path,
                junk.as_bytes(),
                Expect::Error(MALFORMED.0, MALFORMED.1),
            );
        }
        // The parser streams: a key or an element it cannot use may be
        // reported before the syntax error after it.
        for junk in ["{\"a\" 1}", "[1,]", "{\"tenant\" \"x\"}", "{\"a\"}"] {
            b.post(
                format!("{path}: not JSON {junk:?}"),
                path,
                junk.as_bytes(),
                Expect::OneOf(vec![MALFORMED, INVALID]),
            );
        }
        // Not an object.
        for other in ["[]", "\"x\"", "42", "null", "true", "[{}]"] {
            b.post(
                format!("{path}: top level {other}"),
                path,
                other.as_bytes(),
                Expect::Error(INVALID.0, INVALID.1),
            );
        }
    }

    // Wrong types and duplicate keys in every field.
    let wrong_types: &[&str] = &["42", "4.2", "true", "[]", "{}", "[\"x\"]", "{\"a\":1}"];
    for (path, body) in &endpoints {
        for field in body.as_object().unwrap().keys() {
            for value in wrong_types {
                let expect = match (field.as_str(), *value) {
                    // The right type, out of range.
                    ("exp_month" | "exp_year", "42") => Expect::Error(422, "invalid_expiry"),
                    ("cards", "[]") => Expect::Error(400, "invalid_batch_size"),
                    _ => Expect::Error(INVALID.0, INVALID.1),
                };
                b.post(
                    format!("{path}: {field} = {value}"),
                    path,
                    &with_raw_field(body, field, value.as_bytes()),
                    expect,
                );
            }
            // null is "absent" for the optional fields of tokenize and
            // unseal; required everywhere else.
            let optional = matches!(
                field.as_str(),
                "cardholder_name" | "custodian" | "passphrase"
            );
            if !optional {
                b.post(
                    format!("{path}: {field} = null"),
                    path,
                    &with_raw_field(body, field, b"null"),
                    Expect::Error(INVALID.0, INVALID.1),
                );
            }
            let text = body.to_string();
            let dup = text.replacen('{', &format!("{{\"{field}\":{},", body[field]), 1);
            b.post(
                format!("{path}: duplicate {field}"),
                path,
                dup.as_bytes(),
                Expect::Error(INVALID.0, INVALID.1),
            );
        }
        let mut unknown = body.clone();
        unknown["cvv"] = json!("123");
        b.post(
            format!("{path}: unknown field"),
            path,
            unknown.to_string().as_bytes(),
            Expect::Error(INVALID.0, INVALID.1),
        );
    }
    for numeric in ["exp_month", "exp_year"] {
        for value in [
            "\"12\"",
            "12.0",
            "1e1",
            "18446744073709551616",
            "1e400",
            "-1e400",
        ] {
            b.post(
                format!("tokenize: {numeric} = {value}"),
                "/v1/tokens",
                &with_raw_field(&b.tokenize_body(), numeric, value.as_bytes()),
                Expect::OneOf(vec![INVALID, MALFORMED]),
            );
        }
    }
    for cards in [
        "{}",
        "\"x\"",
        "42",
        "[1]",
        "[null]",
        "[[]]",
        "[\"4111111111111111\"]",
    ] {
        b.post(
            format!("batch: cards = {cards}"),
            "/v1/tokens/batch",
            &with_raw_field(&b.batch_body(), "cards", cards.as_bytes()),
            Expect::Error(INVALID.0, INVALID.1),
        );
    }
    for field in ["pan", "exp_month", "exp_year", "cardholder_name"] {
        for value in wrong_types {
            if *value == "42" && field.starts_with("exp_") {
                continue;
            }
            let card = with_raw_field(
                &json!({"pan": fresh, "exp_month": 12, "exp_year": year, "cardholder_name": "A B"}),
                field,
                value.as_bytes(),
            );
            let mut body = b"{\"tenant\":\"shop-42\",\"cards\":[".to_vec();
            body.extend_from_slice(&card);
            body.extend_from_slice(b"]}");
            b.post(
                format!("batch card: {field} = {value}"),
                "/v1/tokens/batch",
                &body,
                Expect::Error(INVALID.0, INVALID.1),
            );
        }
    }

    // Deep nesting: within the size limits (serde_json's recursion limit
    // answers), and 100k deep (over the single-card limit: 413; within the
    // batch limit: parsed and refused).
    let nested = |depth: usize, open: &str, close: &str| -> Vec<u8> {
        let mut v = open.repeat(depth).into_bytes();
        v.extend_from_slice(close.repeat(depth).as_bytes());
        v
    };
    b.post(
        "tokenize: 8000 nested arrays",
        "/v1/tokens",
        &nested(8000, "[", "]"),
        Expect::OneOf(vec![MALFORMED, INVALID]),
    );
    b.post(
        "tokenize: tenant is 5000 nested arrays",
        "/v1/tokens",
        &with_raw_field(&b.tokenize_body(), "tenant", &nested(5000, "[", "]")),
        Expect::OneOf(vec![MALFORMED, INVALID]),
    );
    b.post(
        "tokenize: 2500 nested objects",
        "/v1/tokens",
        &nested(2500, "{\"a\":", "}"),
        Expect::OneOf(vec![MALFORMED, INVALID]),
    );
    b.post(
        "batch: 100k nested arrays",
        "/v1/tokens/batch",
        &nested(100_000, "[", "]"),
        Expect::OneOf(vec![MALFORMED, INVALID]),
    );
    b.post(
        "batch: cards is 100k nested arrays",
        "/v1/tokens/batch",
        &with_raw_field(&b.batch_body(), "cards", &nested(100_000, "[", "]")),
        Expect::OneOf(vec![MALFORMED, INVALID]),
    );
    b.post(
        "batch: 100k nested objects",
        "/v1/tokens/batch",
        &nested(100_000, "{\"a\":", "}"),
        Expect::OneOf(vec![MALFORMED, INVALID]),
    );
    b.post(
        "detokenize: 100k nested arrays (over the limit)",
        "/v1/detokenize",
        &nested(100_000, "[", "]"),
        Expect::Error(413, "payload_too_large"),
    );

    // Unicode, control characters and NUL in every string field.
    let text_values: Vec<Vec<u8>> = CONTROL
        .iter()
        .chain(UNICODE)
        .chain(SQL)
        .map(|s| s.as_bytes().to_vec())
        .collect();
    for value in &text_values {
        let shown = String::from_utf8_lossy(value).into_owned();
        let lit = string_literal(value);
        b.post(
            format!("tokenize: tenant {shown:?}"),
            "/v1/tokens",
            &with_raw_field(&b.tokenize_body(), "tenant", &lit),
            Expect::Error(400, "invalid_tenant"),
        );
        b.post(
            format!("batch: tenant {shown:?}"),
            "/v1/tokens/batch",
            &with_raw_field(&b.batch_body(), "tenant", &lit),
            Expect::Error(400, "invalid_tenant"),
        );
        // The card number with the hostile text after it, and alone.
        let mut pan_after = fresh.as_bytes().to_vec();
        pan_after.extend_from_slice(value);
        for pan in [lit.clone(), string_literal(&pan_after)] {
            b.post(
                format!("tokenize: pan {:?}", String::from_utf8_lossy(&pan)),
                "/v1/tokens",
                &with_raw_field(&b.tokenize_body(), "pan", &pan),
                Expect::Error(422, "invalid_pan"),
            );
        }
        b.post(
            format!("detokenize: token {shown:?}"),
            "/v1/detokenize",
            &with_raw_field(&b.detokenize_body(), "token", &lit),
            Expect::Error(404, "not_found"),
        );
        // Reasons: refused when they hold control characters; printable
        // ones are fine, and the never-issued token is then not found.
        let reason_body = json!({"token": UNKNOWN_TOKEN, "reason": REASON});
        b.post(
            format!("detokenize: reason {shown:?}"),
            "/v1/detokenize",
            &with_raw_field(&reason_body, "reason", &lit),
            Expect::OneOf(vec![(400, "invalid_reason"), (404, "not_found")]),
        );
        // Unseal on a service that is not sealed only reports its status.
        for field in ["custodian", "passphrase"] {
            b.post(
                format!("unseal: {field} {shown:?}"),
                "/v1/admin/unseal",
                &with_raw_field(&unseal_body(), field, &lit),
                Expect::AlreadyUnsealed,
            );
        }
    }
    // Cardholder names that must be refused (printable ones would be
    // stored, so only refused ones here).
    for name in CONTROL.iter().chain(&[
        r"x\u202ey",
        r"x\u200by",
        r"\ufeffx",
        r"\u2028",
        "",
        "   ",
        "4111 1111 1111 1111",
    ]) {
        b.post(
            format!("tokenize: cardholder_name {name:?}"),
            "/v1/tokens",
            &with_raw_field(
                &b.tokenize_body(),
                "cardholder_name",
                &string_literal(name.as_bytes()),
            ),
            Expect::Error(422, "invalid_cardholder_name"),
        );
    }
    let long_name = "a".repeat(65);
    b.post(
        "tokenize: cardholder_name of 65 characters",
        "/v1/tokens",
        &with_raw_field(
            &b.tokenize_body(),
            "cardholder_name",
            &string_literal(long_name.as_bytes()),
        ),
        Expect::Error(422, "invalid_cardholder_name"),
    );
    // Strings that are not valid JSON text (lone surrogates, invalid UTF-8).
    for value in NOT_JSON_STRINGS {
        for (path, body) in &endpoints {
            for field in body.as_object().unwrap().keys() {
                if body[field].is_string() {
                    b.post(
                        format!("{path}: {field} not a JSON string {value:?}"),
                        path,
                        &with_raw_field(body, field, &string_literal(value)),
                        Expect::Error(MALFORMED.0, MALFORMED.1),
                    );
                }
            }
        }
    }
    // Long strings in every field (under the body limit).
    for (path, body) in &endpoints {
        for field in body.as_object().unwrap().keys() {
            if body[field].is_string() {
                let long = "A".repeat(10_000);
                let expect = if *path == "/v1/admin/unseal" {
                    Expect::AlreadyUnsealed
                } else {
                    Expect::OneOf(vec![
                        (400, "invalid_tenant"),
                        (422, "invalid_pan"),
                        (422, "invalid_cardholder_name"),
                        (404, "not_found"),
                        (400, "invalid_reason"),
                    ])
                };
                b.post(
                    format!("{path}: {field} of 10000 characters"),
                    path,
                    &with_raw_field(body, field, &string_literal(long.as_bytes())),
                    expect,
                );
            }
        }
    }

    // Numbers out of range.
    // Spliced as text: the numbers must reach the service exactly as written.
    let expiry = |month: &str, year: &str| -> Vec<u8> {
        format!(r#"{{"tenant":"{TENANT}","pan":"{fresh}","exp_month":{month},"exp_year":{year}}}"#)
            .into_bytes()
    };
    let this_year = e2e::current_year_month().0;
    let y = year.to_string();
    for (month, yr, want) in [
        ("13", y.as_str(), Expect::Error(422, "invalid_expiry")),
        ("0", y.as_str(), Expect::Error(422, "invalid_expiry")),
        ("-1", y.as_str(), Expect::Error(422, "invalid_expiry")),
        // serde_json reads -0 as a float.
        (
            "-0",
            y.as_str(),
            Expect::OneOf(vec![INVALID, (422, "invalid_expiry")]),
        ),
        ("255", y.as_str(), Expect::Error(422, "invalid_expiry")),
        ("256", y.as_str(), Expect::Error(422, "invalid_expiry")),
        (
            "9223372036854775807",
            y.as_str(),
            Expect::Error(422, "invalid_expiry"),
        ),
        (
            "-9223372036854775808",
            y.as_str(),
            Expect::Error(422, "invalid_expiry"),
        ),
        (
            "9223372036854775808",
            y.as_str(),
            Expect::OneOf(vec![INVALID, MALFORMED]),
        ),
        (
            "123456789012345678901234567890",
            y.as_str(),
            Expect::OneOf(vec![INVALID, MALFORMED]),
        ),
        ("12", "1999", Expect::Error(422, "card_expired")),
        ("12", "0", Expect::Error(422, "invalid_expiry")),
        ("12", "-2030", Expect::Error(422, "invalid_expiry")),
        ("12", "99999", Expect::Error(422, "invalid_expiry")),
        ("12", "65535", Expect::Error(422, "invalid_expiry")),
        ("12", "65536", Expect::Error(422, "invalid_expiry")),
        (
            "12",
            "9223372036854775807",
            Expect::Error(422, "invalid_expiry"),
        ),
        (
            "12",
            "18446744073709551615",
            Expect::OneOf(vec![INVALID, MALFORMED]),
        ),
        ("12", "2030.5", Expect::Error(INVALID.0, INVALID.1)),
        ("12", "-0.0", Expect::Error(INVALID.0, INVALID.1)),
    ] {
        b.post(
            format!("tokenize: exp_month {month}, exp_year {yr}"),
            "/v1/tokens",
            &expiry(month, yr),
            want,
        );
    }
    let too_far = (this_year + 51).to_string();
    b.post(
        "tokenize: exp_year 51 years ahead",
        "/v1/tokens",
        &expiry("12", &too_far),
        Expect::Error(422, "invalid_expiry"),
    );
    // A batch of cards that are each refused: 200, one typed error per card.
    let refused_cards: Vec<Value> = vec![
        json!({"pan": fresh, "exp_month": 13, "exp_year": year}),
        json!({"pan": fresh, "exp_month": 12, "exp_year": 1999}),
        json!({"pan": "4111111111111112", "exp_month": 12, "exp_year": year}),
        json!({"pan": "\u{0}", "exp_month": 12, "exp_year": year}),
        json!({"pan": fresh, "exp_month": 12, "exp_year": year, "cardholder_name": "\u{7}"}),
        json!({"pan": fresh, "exp_month": -1, "exp_year": i64::MAX}),
    ];
    b.post(
        "batch: every card refused",
        "/v1/tokens/batch",
        json!({"tenant": TENANT, "cards": refused_cards})
            .to_string()
            .as_bytes(),
        Expect::BatchAllRefused,
    );

    // Batch sizes.
    let card = json!({"pan": "4111111111111112", "exp_month": 12, "exp_year": year});
    b.post(
        "batch: 1001 cards",
        "/v1/tokens/batch",
        json!({"tenant": TENANT, "cards": vec![card.clone(); 1001]})
            .to_string()
            .as_bytes(),
        Expect::Error(400, "invalid_batch_size"),
    );
    b.post(
        "batch: 100000 cards (under 1 MiB: empty objects)",
        "/v1/tokens/batch",
        json!({"tenant": TENANT, "cards": vec![json!({}); 100_000]})
            .to_string()
            .as_bytes(),
        Expect::OneOf(vec![INVALID, (400, "invalid_batch_size")]),
    );
    b.post(
        "batch: no cards",
        "/v1/tokens/batch",
        json!({"tenant": TENANT, "cards": []})
            .to_string()
            .as_bytes(),
        Expect::Error(400, "invalid_batch_size"),
    );

    // Path tricks in token ids (GET and DELETE, sent byte for byte).
    let long_id = format!("tok_{}", "A".repeat(10_000));
    let tricks: Vec<String> = vec![
        "..".into(),
        "../tokens".into(),
        "../../healthz".into(),
        "..%2f..%2fhealthz".into(),
        "%2e%2e".into(),
        "%2e%2e%2f%2e%2e%2fv1%2fadmin%2fseal".into(),
        "%00".into(),
        format!("{token}%00"),
        format!("{token}%2500"),
        format!("{token}/.."),
        format!("{token}/../{token}"),
        format!("{token}%2f..%2f{token}"),
        format!("..%2f{token}"),
        format!("{token};x"),
        format!("{token}%20"),
        format!("%20{token}"),
        format!("{token}/"),
        format!("{}", token.to_ascii_uppercase()),
        format!("{}", token.to_ascii_lowercase()),
        format!("{}A", token),
        token[..token.len() - 1].to_string(),
        "tok_%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9".into(),
        "%F0%9F%98%80".into(),
        "tok_%E2%80%AEAAAAAAAAAAAAAAAAAAAAA".into(),
        "%27%20OR%20%271%27%3D%271".into(),
        "tok_'OR'1'='1".into(),
        "*".into(),
        "tok_*".into(),
        "%25".into(),
        "%zz".into(),
        "%".into(),
        long_id,
    ];
    for trick in &tricks {
        for method in ["GET", "DELETE"] {
            let shown: String = trick.chars().take(60).collect();
            b.raw(
                format!("{method} /v1/tokens/{shown}"),
                method,
                &format!("/v1/tokens/{trick}"),
                None,
                b"",
                Expect::OneOf(vec![(404, "not_found"), (405, "method_not_allowed")]),
            );
        }
    }

    // SQL-looking audit filters: parameters, not SQL.
    for (param, value) in [
        ("tenant", "%27%20OR%201%3D1--"),
        ("principal", "x%27%3B%20DELETE%20FROM%20cards%3B--"),
        ("token", "tok_%27%20OR%20%27%27%3D%27"),
    ] {
        b.raw(
            format!("audit events: {param} SQL"),
            "GET",
            &format!("/v1/audit/events?{param}={value}"),
            None,
            b"",
            Expect::NoEvents,
        );
    }
    for query in [
        "action=tokenize%27--",
        "outcome=%00",
        "limit=-1",
        "limit=99999999999999",
        "after=-5",
        "after=1e3",
        "from=yesterday",
        "to=2026-13-45T99:99:99Z",
        "bogus=1",
        "limit=1&limit=2",
    ] {
        b.raw(
            format!("audit events: {query}"),
            "GET",
            &format!("/v1/audit/events?{query}"),
            None,
            b"",
            Expect::OneOf(vec![(400, "invalid_filter"), INVALID]),
        );
    }

    // Media types and methods.
    let body = b.tokenize_body().to_string();
    for ct in [
        None,
        Some("text/plain"),
        Some("application/jsonx"),
        Some("application/json-seq"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json\u{a0}"),
    ] {
        b.raw(
            format!("tokenize with Content-Type {ct:?}"),
            "POST",
            "/v1/tokens",
            ct,
            body.as_bytes(),
            Expect::Error(415, "unsupported_media_type"),
        );
    }
    let token_path = format!("/v1/tokens/{token}");
    for (method, path) in [
        ("PUT", "/v1/tokens"),
        ("PATCH", "/v1/tokens/batch"),
        ("GET", "/v1/detokenize"),
        ("DELETE", "/v1/tokens"),
        ("PUT", token_path.as_str()),
        ("FOO", "/v1/tokens"),
        ("OPTIONS", "/v1/detokenize"),
        ("DELETE", "/v1/admin/seal"),
    ] {
        b.raw(
            format!("{method} {path}"),
            method,
            path,
            Some("application/json"),
            body.as_bytes(),
            Expect::Error(405, "method_not_allowed"),
        );
    }
    b.cases
}

/// Sends one case; `Err` describes a wrong answer.
fn run_case(svc: &Service, case: &Case) -> Result<(), String> {
    let _ = svc;
    let outcome = raw_http(
        &case.addr,
        &case.request,
        case.request.len(),
        Duration::ZERO,
        Duration::from_secs(60),
    );
    let resp = match outcome {
        RawOutcome::Response(resp) => resp,
        RawOutcome::Closed { after, error } => {
            return Err(format!(
                "closed without an answer after {after:?} ({error:?}); a typed error was expected"
            ))
        }
    };
    check(&case.expect, &resp)
}

fn check(expect: &Expect, resp: &Resp) -> Result<(), String> {
    if resp.status >= 500 {
        return Err(format!("server error: {resp}"));
    }
    let ok = match expect {
        Expect::Error(status, code) => resp.status == *status && resp.error_code() == Some(code),
        Expect::OneOf(pairs) => pairs
            .iter()
            .any(|(s, c)| resp.status == *s && resp.error_code() == Some(c)),
        Expect::BatchAllRefused => {
            resp.status == 200
                && resp.json["results"].as_array().is_some_and(|items| {
                    !items.is_empty()
                        && items
                            .iter()
                            .all(|i| i["error"]["code"].as_str().is_some_and(|c| !c.is_empty()))
                })
        }
        Expect::NoEvents => {
            (resp.status == 200 && resp.json["events"].as_array().is_some_and(Vec::is_empty))
                || (resp.status == 400 && resp.error_code() == Some("invalid_filter"))
        }
        Expect::AlreadyUnsealed => resp.status == 200 && resp.json["sealed"] == false,
    };
    let typed = resp.status < 400
        || resp
            .error_message()
            .is_some_and(|m| !m.is_empty() && !m.contains("__HOSTILE__"));
    if ok && typed && resp.request_id.is_some() {
        Ok(())
    } else {
        Err(format!("expected {expect:?}, got {resp}"))
    }
}

/// Stored cards and their tokens, for the checks after the attack.
struct Stored {
    cards: Vec<(String, &'static str)>,
}

fn seed(svc: &Service) -> (e2e::Client, Stored) {
    let client = svc.principal_client(
        "hostile",
        &["tokenize", "detokenize", "auditor", "key_admin"],
        &["*"],
    );
    let mut cards = Vec::new();
    for (pan, _) in &TEST_CARDS[..4] {
        let resp = client.tokenize_named(TENANT, pan, 12, exp_year(), "Grace Hopper");
        expect_status(&resp, 201);
        cards.push((resp.str("token"), *pan));
    }
    (client, Stored { cards })
}

/// Every stored token still detokenizes to its card.
fn check_stored(client: &e2e::Client, stored: &Stored) {
    for (token, pan) in &stored.cards {
        let resp = client.detokenize(token, REASON);
        expect_status(&resp, 200);
        assert_eq!(resp.json["pan"], *pan, "card of {token} changed");
        assert_eq!(resp.json["cardholder_name"], "Grace Hopper");
    }
}

fn key_of(client: &e2e::Client) -> String {
    client.authorization().unwrap()["Bearer ".len()..].to_string()
}

fn diff(before: &BTreeMap<String, Vec<String>>, after: &BTreeMap<String, Vec<String>>) -> String {
    let mut out = String::new();
    for (table, rows) in after {
        let old = before.get(table).cloned().unwrap_or_default();
        if *rows != old {
            out.push_str(&format!(
                "table {table}: {} rows before, {} after\n",
                old.len(),
                rows.len()
            ));
        }
    }
    for table in before.keys().filter(|t| !after.contains_key(*t)) {
        out.push_str(&format!("table {table} disappeared\n"));
    }
    out
}

#[test]
fn hostile_bodies_paths_and_numbers_get_typed_errors_and_change_nothing() {
    let mut svc = Service::start();
    let (client, stored) = seed(&svc);
    let key = key_of(&client);
    let fresh = TEST_CARDS[6].0;
    let before = svc.dump_data();
    assert!(
        before
            .get("cards")
            .is_some_and(|rows| rows.len() == stored.cards.len()),
        "the dump sees the stored cards: {before:?}"
    );

    let cases = build_cases(&svc, &key, &stored.cards[0].0, fresh);
    let started = Instant::now();
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(e) = run_case(&svc, case) {
            failures.push(format!("{}: {e}", case.what));
        }
    }
    crate::report(&format!(
        "hostile: {} cases in {:?} on {}",
        cases.len(),
        started.elapsed(),
        svc.backend().name()
    ));
    assert!(svc.is_running(), "the service died under hostile input");
    expect_status(&svc.anonymous().get("/healthz"), 200);
    expect_status(&svc.anonymous().get("/readyz"), 200);
    let after = svc.dump_data();
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(
        before == after,
        "hostile input changed stored data:\n{}",
        diff(&before, &after)
    );
    check_stored(&client, &stored);
    // And nothing it was sent is in what it wrote.
    e2e::assert_no_leaks(&svc.scan_for_leaks(&[fresh]));
}

/// Bodies over the limits, oversized and numerous headers, long URLs,
/// lying and absurd `Content-Length`s, chunked bodies over the limit.
#[test]
fn oversized_requests_are_refused_and_change_nothing() {
    let mut svc = Service::start();
    let (client, stored) = seed(&svc);
    let key = key_of(&client);
    let addr = svc.addr().to_string();
    let before = svc.dump_data();
    let mut failures = Vec::new();
    let mut cases = 0;

    // Bodies over the limits, declared (413 before reading) or padded JSON.
    let pad = |limit: usize, body: &Value| -> Vec<u8> {
        let mut text = body.to_string().into_bytes();
        // Spaces before the closing brace: valid JSON, one byte too many.
        let last = text.pop().unwrap();
        text.resize(limit, b' ');
        text.push(last);
        text
    };
    let single = json!({"token": stored.cards[0].0, "reason": REASON});
    let batch = json!({"tenant": TENANT, "cards": [{"pan": "4111111111111112", "exp_month": 12, "exp_year": exp_year()}]});
    for (path, body) in [
        ("/v1/tokens", pad(16 * 1024, &single)),
        ("/v1/detokenize", pad(16 * 1024, &single)),
        ("/v1/admin/unseal", pad(16 * 1024, &unseal_body())),
        ("/v1/tokens/batch", pad(1024 * 1024, &batch)),
        ("/v1/tokens", vec![b'['; 100_000]),
        ("/v1/tokens/batch", vec![b' '; 8 * 1024 * 1024]),
    ] {
        cases += 1;
        let resp = client.raw_exchange("POST", path, Some("application/json"), body);
        if let Err(e) = check(&Expect::Error(413, "payload_too_large"), &resp) {
            failures.push(format!("{path} oversized: {e}"));
        }
    }

    // Chunked, no length, over the limit: refused while streaming.
    let mut chunked = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..40 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 0x400]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    cases += 1;
    match raw_http(
        &addr,
        &chunked,
        4096,
        Duration::ZERO,
        Duration::from_secs(60),
    ) {
        RawOutcome::Response(resp) => {
            if let Err(e) = check(&Expect::Error(413, "payload_too_large"), &resp) {
                failures.push(format!("chunked oversized: {e}"));
            }
        }
        RawOutcome::Closed { .. } => {}
    }

    // The HTTP layer's own limits: what answers, and whether it is typed.
    let mut http_layer = Vec::new();
    let huge_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{}\r\n",
        (0..500)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let long_url = format!(
        "GET /v1/tokens/tok_{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\r\n",
        "A".repeat(100 * 1024)
    );
    let huge_auth = format!(
        "GET /v1/tokens/{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
        stored.cards[0].0,
        "A".repeat(30 * 1024)
    );
    let absurd_length = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 99999999999999999999999\r\n\r\n{{}}"
    );
    let negative_length = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: -1\r\n\r\n{{}}"
    );
    let two_lengths = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{{}}"
    );
    let short_length = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{}",
        json!({"tenant": TENANT, "pan": TEST_CARDS[6].0, "exp_month": 12, "exp_year": exp_year()})
    );
    let control_in_content_type = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: \u{1}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let nul_in_header =
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nX-A: a\0b\r\n\r\n");
    // Found by the request_bodies fuzz target: "#" then NUL in the target.
    let nul_in_target =
        format!("GET /healt.#\0 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let not_http =
        "\u{16}\u{3}\u{1}\u{2}\u{0}\u{1}\u{0}\u{1}\u{fc}\u{3}\u{3}garbage\r\n\r\n".to_string();
    for (what, raw) in [
        ("a 64 KiB header", huge_header),
        ("500 headers", many_headers),
        ("a 100 KiB URL", long_url),
        ("a 30 KiB Authorization", huge_auth),
        ("Content-Length 10^22", absurd_length),
        ("Content-Length -1", negative_length),
        ("two Content-Lengths", two_lengths),
        ("Content-Length shorter than the body", short_length),
        ("NUL in a header", nul_in_header),
        ("NUL in the request target", nul_in_target),
        (
            "a control character in Content-Type",
            control_in_content_type,
        ),
        ("a TLS hello on the plain port", not_http),
    ] {
        cases += 1;
        let outcome = raw_http(
            &addr,
            raw.as_bytes(),
            8192,
            Duration::ZERO,
            Duration::from_secs(60),
        );
        let seen = match &outcome {
            RawOutcome::Response(resp) => {
                if resp.status >= 500 {
                    failures.push(format!("{what}: server error {resp}"));
                }
                format!(
                    "{} {}",
                    resp.status,
                    resp.error_code()
                        .map_or("(untyped)".to_string(), |c| c.to_string())
                )
            }
            RawOutcome::Closed { after, error } => format!("closed after {after:?} {error:?}"),
        };
        http_layer.push(format!("{what}: {seen}"));
    }
    crate::report(&format!(
        "hostile (oversized, {}): {cases} cases; HTTP-layer answers:\n  {}",
        svc.backend().name(),
        http_layer.join("\n  ")
    ));

    assert!(svc.is_running(), "the service died under oversized input");
    expect_status(&svc.anonymous().get("/healthz"), 200);
    let after = svc.dump_data();
    assert!(
        failures.is_empty(),
        "oversized requests answered wrongly:\n{}",
        failures.join("\n")
    );
    assert!(
        before == after,
        "oversized input changed stored data:\n{}",
        diff(&before, &after)
    );
    check_stored(&client, &stored);
}

/// Slow clients (one byte a second) against a 3 s `--request-timeout-ms`:
/// a request head trickling in is cut off (408 or a close), and so is a
/// complete head followed by a body trickling in (408 `request_timeout`,
/// then the connection closes); neither blocks other callers.
#[test]
fn slow_clients() {
    let mut svc = Service::start_with(e2e::Options {
        extra_args: vec!["--request-timeout-ms".into(), "3000".into()],
        ..e2e::Options::default()
    });
    let (client, stored) = seed(&svc);
    let key = key_of(&client);
    let addr = svc.endpoints().addr_for("/v1/detokenize").to_string();
    let before = svc.dump_data();

    // The head, one byte a second.
    let head = format!(
        "POST /v1/detokenize HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 60\r\n\r\n"
    );
    let slow_head = {
        let addr = addr.clone();
        let head = head.clone();
        std::thread::spawn(move || {
            raw_http(
                &addr,
                head.as_bytes(),
                1,
                Duration::from_secs(1),
                Duration::from_secs(20),
            )
        })
    };
    // A complete head, then the body one byte a second.
    let body = json!({"token": UNKNOWN_TOKEN, "reason": REASON}).to_string();
    let full = format!(
        "POST /v1/detokenize HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let slow_body = {
        let addr = addr.clone();
        let full = full.clone();
        let body = body.clone();
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let mut w = e2e::Wire::connect(&addr, e2e::tls_for_addr(&addr));
            w.write_all(full.as_bytes()).unwrap();
            let started = Instant::now();
            let mut sent = 0;
            let mut cut = None;
            for b in body.as_bytes().iter().take(15) {
                std::thread::sleep(Duration::from_secs(1));
                if w.write_all(&[*b]).is_err() {
                    cut = Some(started.elapsed());
                    break;
                }
                sent += 1;
            }
            // Is the connection still open? A read with a short timeout
            // that times out means the server is still waiting for us.
            w.tcp()
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 1024];
            let state = match w.read(&mut buf) {
                Ok(0) => "closed".to_string(),
                Ok(n) => format!(
                    "answered: {}",
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .next()
                        .unwrap_or_default()
                ),
                Err(_) => "still open, waiting for the body".to_string(),
            };
            (sent, cut, started.elapsed(), state)
        })
    };
    // Meanwhile, other callers are served promptly.
    std::thread::sleep(Duration::from_secs(2));
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        expect_status(&client.detokenize(&stored.cards[0].0, REASON), 200);
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }

    let head_outcome = slow_head.join().unwrap();
    let (sent, cut, elapsed, state) = slow_body.join().unwrap();
    let head_seen = match &head_outcome {
        RawOutcome::Response(r) => format!("answered {} after the head dribbled in: {r}", r.status),
        RawOutcome::Closed { after, error } => format!("closed after {after:?} ({error:?})"),
    };
    crate::report(&format!(
        "slow clients ({}): head at 1 byte/s -> {head_seen}; body at 1 byte/s -> {sent} bytes sent over {elapsed:?}, cut off: {cut:?}, then {state}; other callers' worst latency meanwhile {worst:?}",
        svc.backend().name()
    ));
    // The slow head is cut off (actix's 5 s head timeout: 408 or a close)
    // well before the whole head could arrive.
    match &head_outcome {
        RawOutcome::Response(r) => assert!(
            r.status == 408 || (400..500).contains(&r.status),
            "slow head: {r}"
        ),
        RawOutcome::Closed { after, error } => assert!(
            error.as_deref() != Some("client gave up") && *after < Duration::from_secs(20),
            "the slow head was not cut off: {error:?} after {after:?}"
        ),
    }
    // The slow body is cut off at the request timeout: its writes fail,
    // or it reads the 408 (or a close) once it stops.
    assert!(
        cut.is_some_and(|after| after < Duration::from_secs(10))
            || state.contains(" 408")
            || state == "closed",
        "the slow body was not cut off ({sent} bytes, {cut:?}, {state})"
    );
    assert!(
        sent < 15 || state != "still open, waiting for the body",
        "{state}"
    );
    assert!(
        worst < Duration::from_secs(5),
        "slow clients delayed others: {worst:?}"
    );
    assert!(svc.is_running());
    let after = svc.dump_data();
    assert!(
        before == after,
        "slow clients changed stored data:\n{}",
        diff(&before, &after)
    );
}

/// Regression (found with issue 8, fixed in 2001b56): request bodies are
/// JSON objects. serde's derived deserializers also take a struct written
/// as an array of its fields in declaration order
/// (`["shop-42","<pan>",12,2031]`); that used to tokenize.
#[test]
fn positional_array_bodies_are_refused() {
    let svc = Service::start();
    let client = svc.principal_client(
        "positional",
        &["tokenize", "detokenize", "key_admin"],
        &["*"],
    );
    let before = svc.dump_data();
    let cases = [
        (
            "/v1/tokens",
            json!([TENANT, TEST_CARDS[1].0, 12, exp_year()]),
        ),
        (
            "/v1/tokens/batch",
            json!([TENANT, [[TEST_CARDS[2].0, 12, exp_year(), null]]]),
        ),
        (
            "/v1/tokens/batch",
            json!({"tenant": TENANT, "cards": [[TEST_CARDS[2].0, 12, exp_year(), null]]}),
        ),
        ("/v1/detokenize", json!([UNKNOWN_TOKEN, REASON])),
        ("/v1/admin/unseal", json!([null, null])),
    ];
    for (path, body) in cases {
        let resp = client.post_raw(path, body.to_string().as_bytes());
        crate::expect_error(
            &resp,
            400,
            "invalid_request",
            &[TEST_CARDS[1].0, TEST_CARDS[2].0],
        );
    }
    assert!(
        svc.dump_data() == before,
        "a positional body stored something"
    );
}

/// Regression (found while writing the `audit_reader` fuzz target's
/// property with issue 8, fixed in 2001b56): an export line whose time is
/// respelled with another UTC offset for the same instant
/// (`...T00:01:30.0196Z` -> `...T01:01:30.0196+01:00`) used to read as
/// canonical (it wrote back to itself), and `vault-audit verify` accepted
/// the changed file. The hashes cover the instant only, so the reader must
/// insist on `Z`.
#[test]
fn audit_export_refuses_a_time_with_another_offset() {
    let mut svc = Service::start();
    let client = svc.principal_client("offset", &["tokenize"], &["*"]);
    crate::token_for(&client, TENANT, TEST_CARDS[3].0);
    // A graceful stop signs a last checkpoint covering every entry.
    svc.terminate(Duration::from_secs(30));
    let export = svc.data_dir().join("offset-trail.jsonl");
    let url = svc.database_url();
    let out = e2e::run_vault_audit(&[
        "export",
        "--database-url",
        &url,
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(out.success(), "export: {}{}", out.stdout, out.stderr);
    let key = svc.data_dir().join("audit-verify.pub");
    let verify = |path: &std::path::Path| {
        e2e::run_vault_audit(&[
            "verify",
            "--key",
            key.to_str().unwrap(),
            "--export",
            path.to_str().unwrap(),
        ])
    };
    let genuine = verify(&export);
    assert!(genuine.success(), "{}{}", genuine.stdout, genuine.stderr);

    // Respell the first entry's time with another offset.
    let text = std::fs::read_to_string(&export).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(r#"{"type":"entry","#))
        .expect("an entry line");
    let at = lines[i].find(r#""time":""#).unwrap() + r#""time":""#.len();
    let end = at + lines[i][at..].find('"').unwrap();
    let time = &lines[i][at..end];
    assert!(time.ends_with('Z'), "{time}");
    let hour: u32 = time[11..13].parse().unwrap();
    // The same instant one hour east (or west, at 23h: no date change).
    let (new_hour, offset) = if hour < 23 {
        (hour + 1, "+01:00")
    } else {
        (hour - 1, "-01:00")
    };
    let respelled = format!(
        "{}{:02}{}{offset}",
        &time[..11],
        new_hour,
        &time[13..time.len() - 1]
    );
    lines[i] = format!("{}{}{}", &lines[i][..at], respelled, &lines[i][end..]);
    let changed = svc.data_dir().join("offset-trail-changed.jsonl");
    std::fs::write(&changed, lines.join("\n") + "\n").unwrap();
    assert_ne!(std::fs::read(&changed).unwrap(), text.as_bytes());
    let out = verify(&changed);
    assert!(
        !out.success(),
        "a time respelled with another offset verified: {}{}",
        out.stdout,
        out.stderr
    );
}
