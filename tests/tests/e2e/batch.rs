//! `POST /v1/tokens/batch`: per-card results in order, and the size limits.

use e2e::{current_year_month, fresh_pan, Service};
use serde_json::{json, Value};

use crate::{
    admin, card, check_token_object, exp_year, expect_error, expect_status, spaced, token_for,
    Expect, LUHN_INVALID, REASON, TENANT,
};

enum Want<'a> {
    Token {
        pan: &'a str,
        brand: &'a str,
        created: bool,
        name: Option<&'a str>,
    },
    Error(&'a str),
}

#[test]
fn mixed_batch_reports_each_card_in_order() {
    let svc = Service::start();
    let client = admin(&svc);
    let year = exp_year();
    let (now_year, _) = current_year_month();
    let a = fresh_pan();
    let expired = fresh_pan();
    let bad_month = fresh_pan();
    let long_name = fresh_pan();
    let known = fresh_pan();
    let grouped = fresh_pan();
    let known_token = token_for(&client, TENANT, &known);

    let mut named = card(&a, 2, year);
    named["cardholder_name"] = json!("Ann Example");
    let mut too_long = card(&long_name, 2, year);
    too_long["cardholder_name"] = json!("N".repeat(65));
    let cards = vec![
        named,
        card(LUHN_INVALID[0], 2, year),
        card(&expired, 2, now_year - 1),
        card("378282246310005", 3, year),
        card(&bad_month, 13, year),
        card(&a, 2, year),
        too_long,
        card("4111-abcd-1111-1111", 2, year),
        card(&known, 12, year),
        card(&spaced(&grouped), 4, year),
    ];
    let wants = [
        Want::Token {
            pan: &a,
            brand: "visa",
            created: true,
            name: Some("Ann Example"),
        },
        Want::Error("invalid_pan"),
        Want::Error("card_expired"),
        Want::Token {
            pan: "378282246310005",
            brand: "amex",
            created: true,
            name: None,
        },
        Want::Error("invalid_expiry"),
        // The same card again in one batch: the tenant has it by then.
        Want::Token {
            pan: &a,
            brand: "visa",
            created: false,
            name: Some("Ann Example"),
        },
        Want::Error("invalid_cardholder_name"),
        Want::Error("invalid_pan"),
        Want::Token {
            pan: &known,
            brand: "visa",
            created: false,
            name: None,
        },
        Want::Token {
            pan: &grouped,
            brand: "visa",
            created: true,
            name: None,
        },
    ];

    let resp = client.batch(TENANT, &cards);
    expect_status(&resp, 200);
    let results = resp.json["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results array: {resp}"));
    assert_eq!(results.len(), cards.len(), "one result per card: {resp}");
    for pan in [
        a.as_str(),
        LUHN_INVALID[0],
        &expired,
        "378282246310005",
        &bad_month,
        &long_name,
        &known,
        &grouped,
    ] {
        assert!(
            !resp.text.contains(pan),
            "the batch response contains a PAN: {resp}"
        );
    }

    let mut first_token_of_a = None;
    for (i, (result, want)) in results.iter().zip(&wants).enumerate() {
        match want {
            Want::Error(code) => {
                assert_eq!(result["error"]["code"], *code, "result {i}: {result}");
                assert!(
                    result["error"]["message"].is_string(),
                    "result {i}: {result}"
                );
                assert!(
                    result.get("token").is_none(),
                    "result {i} is an error and a token: {result}"
                );
            }
            Want::Token {
                pan,
                brand,
                created,
                name,
            } => {
                let month = cards[i]["exp_month"].as_i64().unwrap();
                let expect = Expect {
                    pan,
                    tenant: TENANT,
                    brand: Some(brand),
                    exp_month: month,
                    exp_year: year,
                };
                check_token_object(result, &expect, Some(*created));
                let token = result["token"].as_str().unwrap();
                if *pan == a {
                    let first = first_token_of_a.get_or_insert_with(|| token.to_string());
                    assert_eq!(first, token, "result {i}: one card, one token");
                }
                if *pan == known {
                    assert_eq!(token, known_token, "result {i}: the card tokenized before");
                }
                let clear = client.detokenize(token, REASON);
                expect_status(&clear, 200);
                assert_eq!(clear.json["pan"], *pan, "result {i}: {clear}");
                assert_eq!(
                    clear.json["cardholder_name"],
                    name.map_or(Value::Null, Value::from),
                    "result {i}: {clear}"
                );
            }
        }
    }

    // The refused cards were not stored.
    for pan in [&expired, &bad_month, &long_name] {
        expect_status(&client.tokenize(TENANT, pan, 2, year), 201);
    }
}

fn distinct_cards(n: usize) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    let mut cards = Vec::with_capacity(n);
    while cards.len() < n {
        let pan = fresh_pan();
        if seen.insert(pan.clone()) {
            cards.push(card(&pan, 1 + (cards.len() % 12) as i64, exp_year()));
        }
    }
    cards
}

#[test]
fn batch_size_limits() {
    let svc = Service::start();
    let client = admin(&svc);

    expect_error(&client.batch(TENANT, &[]), 400, "invalid_batch_size", &[]);

    let too_many = distinct_cards(1001);
    let resp = client.batch(TENANT, &too_many);
    assert_eq!(resp.status, 400, "1001 cards: {}", resp.status);
    expect_error(
        &resp,
        400,
        "invalid_batch_size",
        &[too_many[0]["pan"].as_str().unwrap()],
    );
    // Nothing of the refused batch was stored.
    let first = too_many[0]["pan"].as_str().unwrap();
    expect_status(&client.tokenize(TENANT, first, 1, exp_year()), 201);

    let one = distinct_cards(1);
    let resp = client.batch(TENANT, &one);
    expect_status(&resp, 200);
    assert_eq!(
        resp.json["results"].as_array().map(Vec::len),
        Some(1),
        "{resp}"
    );

    let full = distinct_cards(1000);
    let resp = client.batch(TENANT, &full);
    expect_status(&resp, 200);
    let results = resp.json["results"].as_array().expect("results");
    assert_eq!(results.len(), 1000);
    for (i, (result, sent)) in results.iter().zip(&full).enumerate() {
        let pan = sent["pan"].as_str().unwrap();
        assert_eq!(result["created"], true, "result {i}: {result}");
        assert_eq!(
            result["last4"],
            &pan[12..],
            "result {i} out of order: {result}"
        );
        assert_eq!(
            result["exp_month"], sent["exp_month"],
            "result {i}: {result}"
        );
    }
    for i in [0, 499, 999] {
        let clear = client.detokenize(results[i]["token"].as_str().unwrap(), REASON);
        assert_eq!(clear.json["pan"], full[i]["pan"], "{clear}");
    }
}

/// A one-card batch padded with whitespace to exactly `size` bytes.
fn padded_batch(pan: &str, size: usize) -> Vec<u8> {
    let head = json!({ "tenant": TENANT, "cards": [card(pan, 1, exp_year())] }).to_string();
    let mut body = head.into_bytes();
    body.pop(); // the closing brace
    body.resize(size - 1, b' ');
    body.push(b'}');
    body
}

#[test]
fn batch_body_limit_is_1_mib() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();
    let at_limit = client.post_raw("/v1/tokens/batch", &padded_batch(&pan, 1024 * 1024));
    expect_status(&at_limit, 200);
    assert_eq!(at_limit.json["results"][0]["created"], true, "{at_limit}");

    let pan = fresh_pan();
    for size in [1024 * 1024 + 1, 3 * 1024 * 1024] {
        let resp = client.raw_exchange(
            "POST",
            "/v1/tokens/batch",
            Some("application/json"),
            padded_batch(&pan, size),
        );
        assert_eq!(resp.status, 413, "{size}-byte batch: {resp}");
        expect_error(&resp, 413, "payload_too_large", &[&pan]);
    }
    expect_status(&client.tokenize(TENANT, &pan, 1, exp_year()), 201);
}
