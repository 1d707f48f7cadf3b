//! Every error status and code of the contract, and that no error repeats the
//! card number it was sent.

use e2e::{current_year_month, fresh_pan, generated_pan, random_digits, with_luhn_digit, Service};
use serde_json::{json, Value};

use crate::{
    admin, exp_year, expect_error, expect_status, token_for, LUHN_INVALID, REASON, TENANT,
};

/// A tokenize body with one field replaced (or removed, with `Null` for
/// `remove`).
fn body_with(field: &str, value: Value, pan: &str) -> Value {
    let mut body = json!({
        "tenant": TENANT, "pan": pan, "exp_month": 12, "exp_year": exp_year(),
    });
    body[field] = value;
    body
}

fn without(field: &str, pan: &str) -> Value {
    let mut body = body_with("tenant", json!(TENANT), pan);
    body.as_object_mut().unwrap().remove(field);
    body
}

#[test]
fn malformed_json_and_invalid_requests() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();
    let year = exp_year();
    let token = token_for(&client, TENANT, &pan);
    let other = fresh_pan();

    let malformed: Vec<(&str, String)> = vec![
        (
            "/v1/tokens",
            format!(r#"{{"tenant": "{TENANT}", "pan": "{other}", "exp_mon"#),
        ),
        (
            "/v1/tokens",
            format!(r#"{{"tenant": "{TENANT}", "pan": "{other}",}}"#),
        ),
        ("/v1/tokens", "card please".to_string()),
        ("/v1/tokens", String::new()),
        (
            "/v1/tokens/batch",
            format!(r#"{{"tenant": "{TENANT}", "cards": [{{"pan": "{other}""#),
        ),
        (
            "/v1/detokenize",
            format!(r#"{{"token": "{token}", "reason": "x""#),
        ),
    ];
    for (path, body) in &malformed {
        let resp = client.post_raw(path, body.as_bytes());
        assert_eq!(resp.status, 400, "{path} {body:?}: {resp}");
        expect_error(&resp, 400, "malformed_json", &[&other]);
    }

    let raw_dup = format!(
        r#"{{"tenant": "{TENANT}", "pan": "{other}", "pan": "4242424242424242", "exp_month": 12, "exp_year": {year}}}"#
    );
    let dup_tenant = format!(
        r#"{{"tenant": "{TENANT}", "tenant": "shop-43", "pan": "{other}", "exp_month": 12, "exp_year": {year}}}"#
    );
    let invalid: Vec<(&str, &str, String)> = vec![
        (
            "pan as a number",
            "/v1/tokens",
            body_with("pan", json!(other.parse::<u64>().unwrap()), &other).to_string(),
        ),
        (
            "month as a string",
            "/v1/tokens",
            body_with("exp_month", json!("12"), &other).to_string(),
        ),
        (
            "year as a float",
            "/v1/tokens",
            body_with("exp_year", json!(2030.5), &other).to_string(),
        ),
        (
            "tenant as a number",
            "/v1/tokens",
            body_with("tenant", json!(42), &other).to_string(),
        ),
        (
            "tenant null",
            "/v1/tokens",
            body_with("tenant", Value::Null, &other).to_string(),
        ),
        (
            "name as a number",
            "/v1/tokens",
            body_with("cardholder_name", json!(7), &other).to_string(),
        ),
        (
            "missing pan",
            "/v1/tokens",
            without("pan", &other).to_string(),
        ),
        (
            "missing tenant",
            "/v1/tokens",
            without("tenant", &other).to_string(),
        ),
        (
            "missing month",
            "/v1/tokens",
            without("exp_month", &other).to_string(),
        ),
        (
            "missing year",
            "/v1/tokens",
            without("exp_year", &other).to_string(),
        ),
        (
            "unknown field",
            "/v1/tokens",
            body_with("cvv", json!("123"), &other).to_string(),
        ),
        ("duplicate pan", "/v1/tokens", raw_dup),
        ("duplicate tenant", "/v1/tokens", dup_tenant),
        ("array", "/v1/tokens", json!([TENANT, other]).to_string()),
        ("string", "/v1/tokens", json!(other).to_string()),
        ("null", "/v1/tokens", "null".to_string()),
        ("number", "/v1/tokens", "42".to_string()),
        (
            "cards not an array",
            "/v1/tokens/batch",
            json!({"tenant": TENANT, "cards": {"pan": other}}).to_string(),
        ),
        (
            "missing cards",
            "/v1/tokens/batch",
            json!({"tenant": TENANT}).to_string(),
        ),
        (
            "batch unknown field",
            "/v1/tokens/batch",
            json!({"tenant": TENANT, "cards": [crate::card(&other, 1, year)], "mode": "fast"})
                .to_string(),
        ),
        (
            "missing reason",
            "/v1/detokenize",
            json!({"token": token}).to_string(),
        ),
        (
            "missing token",
            "/v1/detokenize",
            json!({"reason": REASON}).to_string(),
        ),
        (
            "token as a number",
            "/v1/detokenize",
            json!({"token": 12, "reason": REASON}).to_string(),
        ),
        (
            "detokenize unknown field",
            "/v1/detokenize",
            json!({"token": token, "reason": REASON, "pan": other}).to_string(),
        ),
        (
            "duplicate reason",
            "/v1/detokenize",
            format!(r#"{{"token": "{token}", "reason": "a", "reason": "b"}}"#),
        ),
    ];
    for (what, path, body) in &invalid {
        let resp = client.post_raw(path, body.as_bytes());
        assert_eq!(resp.status, 400, "{what}: {resp}");
        expect_error(&resp, 400, "invalid_request", &[&other]);
    }

    // None of the refused bodies created a token for `other`.
    let check = client.tokenize(TENANT, &other, 12, year);
    expect_status(&check, 201);
}

#[test]
fn tenant_names() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();
    for tenant in [
        String::new(),
        "a".repeat(65),
        "shop 42".to_string(),
        "shop/42".to_string(),
        "shöp".to_string(),
        "shop:42".to_string(),
        "shop\n".to_string(),
        "*".to_string(),
    ] {
        let resp = client.tokenize(&tenant, &pan, 12, exp_year());
        assert_eq!(resp.status, 400, "tenant {tenant:?}: {resp}");
        expect_error(&resp, 400, "invalid_tenant", &[&pan]);
        let resp = client.batch(&tenant, &[crate::card(&pan, 12, exp_year())]);
        assert_eq!(resp.status, 400, "batch tenant {tenant:?}: {resp}");
        expect_error(&resp, 400, "invalid_tenant", &[&pan]);
    }
    for tenant in ["a".repeat(64), "A.b_c-9".to_string(), "x".to_string()] {
        let resp = client.tokenize(&tenant, &pan, 12, exp_year());
        assert_eq!(resp.status, 201, "tenant {tenant:?}: {resp}");
        assert_eq!(resp.json["tenant"], tenant.as_str());
    }
}

#[test]
fn detokenize_reasons() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();
    let token = token_for(&client, TENANT, &pan);
    let other = "4242424242424242";
    let bad = [
        String::new(),
        "r".repeat(257),
        format!("customer read {pan} on the phone"),
        other.to_string(),
        format!("refund card {other}"),
    ];
    for reason in &bad {
        let resp = client.detokenize(&token, reason);
        assert_eq!(resp.status, 400, "reason {reason:?}: {resp}");
        expect_error(&resp, 400, "invalid_reason", &[&pan, other]);
    }
    for reason in [
        "r".repeat(256),
        "x".to_string(),
        "ticket 4711, order 2024-0001".to_string(),
    ] {
        let resp = client.detokenize(&token, &reason);
        assert_eq!(resp.status, 200, "reason {reason:?}: {resp}");
        assert_eq!(resp.json["pan"], pan.as_str());
    }
}

#[test]
fn card_validation_errors() {
    let svc = Service::start();
    let client = admin(&svc);
    let year = exp_year();
    let (now_year, now_month) = current_year_month();

    let too_short = with_luhn_digit("4111111111"); // 11 digits
    let too_long = generated_pan("411111", 20);
    let bad_pans: Vec<String> = vec![
        LUHN_INVALID[0].to_string(),
        LUHN_INVALID[1].to_string(),
        "4111 1111 1111 1112".to_string(),
        "4111x11111111111".to_string(),
        "4111.1111.1111.1111".to_string(),
        "+4111111111111111".to_string(),
        "4111_1111_1111_1111".to_string(),
        too_short.clone(),
        too_long.clone(),
        String::new(),
        "            ".to_string(),
        "4111111111111111\u{0}".to_string(),
        // Digits of other scripts are not card digits.
        "\u{ff14}\u{ff11}\u{ff11}\u{ff11}111111111111".to_string(),
        "\u{664}\u{661}\u{661}\u{661}111111111111".to_string(),
        "9".repeat(1000),
    ];
    for pan in &bad_pans {
        let resp = client.tokenize(TENANT, pan, 12, year);
        assert_eq!(resp.status, 422, "pan {pan:?}: {resp}");
        expect_error(&resp, 422, "invalid_pan", &[pan]);
    }
    // The length limits are 12 and 19.
    for len in [12, 19] {
        let pan = generated_pan("424242", len);
        let resp = client.tokenize(TENANT, &pan, 12, year);
        assert_eq!(resp.status, 201, "{len} digits: {resp}");
    }

    let pan = fresh_pan();
    for (month, y) in [(0, year), (13, year), (99, year), (12, 10_000)] {
        let resp = client.tokenize(TENANT, &pan, month, y);
        assert_eq!(resp.status, 422, "expiry {month}/{y}: {resp}");
        expect_error(&resp, 422, "invalid_expiry", &[&pan]);
    }

    let (last_month_year, last_month) = if now_month == 1 {
        (now_year - 1, 12)
    } else {
        (now_year, now_month - 1)
    };
    for (month, y) in [
        (last_month, last_month_year),
        (12, now_year - 1),
        (now_month, now_year - 3),
    ] {
        let resp = client.tokenize(TENANT, &pan, month, y);
        assert_eq!(resp.status, 422, "expiry {month}/{y}: {resp}");
        expect_error(&resp, 422, "card_expired", &[&pan]);
    }

    for name in [
        "N".repeat(65),
        "Jane\nDoe".to_string(),
        "Jane\tDoe".to_string(),
        "Jane\u{7}".to_string(),
        "\u{0}".to_string(),
        "Jane\u{9b}Doe".to_string(),
    ] {
        let resp = client.tokenize_named(TENANT, &pan, 12, year, &name);
        assert_eq!(resp.status, 422, "name {name:?}: {resp}");
        expect_error(&resp, 422, "invalid_cardholder_name", &[&pan]);
    }

    // After all these refusals the card is still new; the current month is
    // still valid.
    let resp = client.tokenize(TENANT, &pan, now_month, now_year);
    assert_eq!(resp.status, 201, "{resp}");
}

#[test]
fn unknown_and_malformed_tokens_are_not_found() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = "4111111111111111";
    let real = token_for(&client, TENANT, pan);
    // A well-formed token that was never issued: the real one with its
    // random part replaced.
    let unknown = format!("tok_{}", "Q".repeat(real.len() - 4));
    let candidates = [
        unknown.clone(),
        format!("tok_{}", random_digits(24)),
        "tok_".to_string(),
        "tok_short".to_string(),
        "nonsense".to_string(),
        pan.to_string(),
        format!("{real}x"),
        real.to_uppercase().replacen("TOK_", "tok_", 1),
        real[..real.len() - 1].to_string(),
    ];
    for token in &candidates {
        if token == &real {
            continue;
        }
        expect_error(&client.metadata(token), 404, "not_found", &[pan]);
        expect_error(&client.detokenize(token, REASON), 404, "not_found", &[pan]);
        expect_error(&client.delete_token(token), 404, "not_found", &[pan]);
    }
    // Unknown routes under /v1.
    expect_error(&client.get("/v1/cards"), 404, "not_found", &[]);
    expect_error(
        &client.post_json("/v1/tokenize", &json!({})),
        404,
        "not_found",
        &[],
    );
    // The real one is untouched.
    expect_status(&client.metadata(&real), 200);
}

#[test]
fn wrong_methods() {
    let svc = Service::start();
    let client = admin(&svc);
    let token = token_for(&client, TENANT, &fresh_pan());
    for (method, path) in [
        ("PUT", "/v1/tokens".to_string()),
        ("GET", "/v1/detokenize".to_string()),
        ("DELETE", "/v1/detokenize".to_string()),
        ("PUT", format!("/v1/tokens/{token}")),
        ("PATCH", "/v1/tokens".to_string()),
        ("POST", format!("/v1/tokens/{token}")),
    ] {
        let resp = client.send(method, &path);
        assert_eq!(resp.status, 405, "{method} {path}: {resp}");
        expect_error(&resp, 405, "method_not_allowed", &[]);
    }
    expect_status(&client.metadata(&token), 200);
}

/// `{"tenant", "pan", "exp_month", "exp_year"}` padded with whitespace to
/// exactly `size` bytes: valid JSON whose only problem can be its size.
fn padded_card_body(pan: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"tenant": "{TENANT}", "pan": "{pan}", "exp_month": 12, "exp_year": {}"#,
        exp_year()
    );
    let mut body = head.into_bytes();
    assert!(body.len() < size);
    body.resize(size - 1, b' ');
    body.push(b'}');
    body
}

#[test]
fn single_card_body_limit_is_16_kib() {
    let svc = Service::start();
    let client = admin(&svc);

    let pan = fresh_pan();
    let at_limit = client.post_raw("/v1/tokens", &padded_card_body(&pan, 16 * 1024));
    assert_eq!(
        at_limit.status, 201,
        "a 16384-byte body is allowed: {at_limit}"
    );

    let pan = fresh_pan();
    for size in [16 * 1024 + 1, 64 * 1024, 512 * 1024] {
        let resp = client.raw_exchange(
            "POST",
            "/v1/tokens",
            Some("application/json"),
            padded_card_body(&pan, size),
        );
        assert_eq!(resp.status, 413, "{size}-byte body: {resp}");
        expect_error(&resp, 413, "payload_too_large", &[&pan]);
    }
    // A long name makes the body too large before it makes the name invalid.
    let big_name = json!({
        "tenant": TENANT, "pan": pan, "exp_month": 12, "exp_year": exp_year(),
        "cardholder_name": "N".repeat(20_000),
    });
    let resp = client.raw_exchange(
        "POST",
        "/v1/tokens",
        Some("application/json"),
        big_name.to_string().into_bytes(),
    );
    expect_error(&resp, 413, "payload_too_large", &[&pan]);
    // Nothing was stored.
    expect_status(&client.tokenize(TENANT, &pan, 12, exp_year()), 201);
}

#[test]
fn posts_need_a_json_content_type() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();
    let token = token_for(&client, TENANT, &fresh_pan());
    let tokenize =
        json!({"tenant": TENANT, "pan": pan, "exp_month": 12, "exp_year": exp_year()}).to_string();
    let batch = json!({"tenant": TENANT, "cards": [crate::card(&pan, 12, exp_year())]}).to_string();
    let detok = json!({"token": token, "reason": REASON}).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/xml"),
        Some("multipart/form-data; boundary=x"),
    ] {
        for (path, body) in [
            ("/v1/tokens", &tokenize),
            ("/v1/tokens/batch", &batch),
            ("/v1/detokenize", &detok),
        ] {
            let resp = client.send_raw("POST", path, content_type, body.as_bytes());
            assert_eq!(resp.status, 415, "{path} with {content_type:?}: {resp}");
            expect_error(&resp, 415, "unsupported_media_type", &[&pan]);
        }
    }
    // The card was never stored; a charset parameter is fine.
    let resp = client.send_raw(
        "POST",
        "/v1/tokens",
        Some("application/json; charset=utf-8"),
        tokenize.as_bytes(),
    );
    assert_eq!(resp.status, 201, "{resp}");
}
