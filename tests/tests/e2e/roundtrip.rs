//! Tokenize, read the metadata, detokenize: for every brand and for generated
//! numbers.

use e2e::{with_luhn_digit, Service};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

use crate::{
    admin, check_token_object, exp_year, expect_status, spaced, Expect, REASON, TENANT, TEST_CARDS,
};

#[test]
fn every_test_brand_round_trips() {
    let svc = Service::start();
    let client = admin(&svc);
    let year = exp_year();

    for (i, (pan, brand)) in TEST_CARDS.iter().enumerate() {
        // Every other card has a cardholder name; months vary.
        let month = (i % 12) as i64 + 1;
        let name = (i % 2 == 0).then(|| format!("Card Holder {i}"));
        let resp = match &name {
            Some(name) => client.tokenize_named(TENANT, pan, month, year, name),
            None => client.tokenize(TENANT, pan, month, year),
        };
        expect_status(&resp, 201);
        let expect = Expect {
            pan,
            tenant: TENANT,
            brand: Some(brand),
            exp_month: month,
            exp_year: year,
        };
        check_token_object(&resp.json, &expect, Some(true));
        let token = resp.str("token");

        let meta = client.metadata(&token);
        expect_status(&meta, 200);
        check_token_object(&meta.json, &expect, None);
        assert_eq!(meta.json["token"], token.as_str());
        assert_eq!(meta.json["fingerprint"], resp.json["fingerprint"]);
        assert_eq!(meta.json["created_at"], resp.json["created_at"]);
        if let Some(name) = &name {
            // The token object has no cardholder name: it is card data.
            assert!(
                !resp.text.contains(name.as_str()),
                "POST echoes the name: {resp}"
            );
            assert!(
                !meta.text.contains(name.as_str()),
                "GET shows the name: {meta}"
            );
        }

        let clear = client.detokenize(&token, REASON);
        expect_status(&clear, 200);
        assert_eq!(clear.json["token"], token.as_str(), "{clear}");
        assert_eq!(clear.json["pan"], *pan, "{clear}");
        assert_eq!(clear.json["exp_month"], month, "{clear}");
        assert_eq!(clear.json["exp_year"], year, "{clear}");
        match &name {
            Some(name) => assert_eq!(clear.json["cardholder_name"], name.as_str(), "{clear}"),
            None => assert_eq!(clear.json["cardholder_name"], Value::Null, "{clear}"),
        }
    }
}

#[test]
fn tokens_and_fingerprints_differ_between_cards() {
    let svc = Service::start();
    let client = admin(&svc);
    let mut tokens = std::collections::HashSet::new();
    let mut fingerprints = std::collections::HashSet::new();
    for (pan, _) in TEST_CARDS {
        let resp = client.tokenize(TENANT, pan, 1, exp_year());
        expect_status(&resp, 201);
        assert!(tokens.insert(resp.str("token")), "token reused: {resp}");
        assert!(
            fingerprints.insert(resp.str("fingerprint")),
            "fingerprint reused: {resp}"
        );
    }
}

#[test]
fn names_and_expiry_boundaries_round_trip() {
    let svc = Service::start();
    let client = admin(&svc);
    let (year, month) = e2e::current_year_month();
    let cases = [
        // Non-ASCII letters, the longest allowed ASCII name, the current month.
        (e2e::fresh_pan(), "Zoë Ångström-Øre", month, year),
        (e2e::fresh_pan(), &*"N".repeat(64), 12, year + 1),
        (e2e::fresh_pan(), "O'Brien Jr.", month, year),
    ];
    for (pan, name, m, y) in &cases {
        let resp = client.tokenize_named(TENANT, pan, *m, *y, name);
        expect_status(&resp, 201);
        let clear = client.detokenize(&resp.str("token"), REASON);
        expect_status(&clear, 200);
        assert_eq!(clear.json["pan"], pan.as_str());
        assert_eq!(clear.json["cardholder_name"], *name);
        assert_eq!(clear.json["exp_month"], *m);
        assert_eq!(clear.json["exp_year"], *y);
    }
}

/// Luhn-valid numbers of 12 to 19 digits on the test BINs, typed with random
/// spaces and dashes, all come back as their digits.
#[test]
fn generated_cards_round_trip() {
    let svc = Service::start();
    let client = admin(&svc);
    let year = exp_year();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![Just("411111"), Just("424242")],
        12usize..=19,
        "[0-9]{12}",
        proptest::collection::vec(0u8..6, 19),
        1i64..=12,
    );
    runner
        .run(&strategy, |(bin, len, body, separators, month)| {
            let pan = with_luhn_digit(&format!("{bin}{}", &body[..len - 7]));
            prop_assert_eq!(pan.len(), len);
            // 0 => space, 1 => dash after that digit, else nothing.
            let mut typed = String::new();
            for (i, c) in pan.chars().enumerate() {
                typed.push(c);
                if i + 1 < pan.len() {
                    match separators[i] {
                        0 => typed.push(' '),
                        1 => typed.push('-'),
                        _ => {}
                    }
                }
            }
            let resp = client.tokenize(TENANT, &typed, month, year);
            // Shrinking may repeat a case: then the token already exists.
            prop_assert!(resp.status == 201 || resp.status == 200, "{}", resp);
            let expect = Expect {
                pan: &pan,
                tenant: TENANT,
                brand: (len == 16).then_some("visa"),
                exp_month: month,
                exp_year: year,
            };
            check_token_object(&resp.json, &expect, Some(resp.status == 201));
            let clear = client.detokenize(&resp.str("token"), REASON);
            prop_assert_eq!(clear.status, 200, "{}", clear);
            prop_assert_eq!(&clear.json["pan"], &Value::from(pan.as_str()));
            Ok(())
        })
        .unwrap();
}

#[test]
fn grouped_and_plain_pan_are_the_same_card() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = "4242424242424242";
    let first = client.tokenize(TENANT, &spaced(pan), 3, exp_year());
    expect_status(&first, 201);
    assert_eq!(first.json["last4"], "4242");
    let second = client.tokenize(TENANT, "4242-4242-4242-4242", 3, exp_year());
    expect_status(&second, 200);
    let third = client.tokenize(TENANT, pan, 3, exp_year());
    expect_status(&third, 200);
    assert_eq!(first.json["token"], second.json["token"]);
    assert_eq!(first.json["token"], third.json["token"]);
    let clear = client.detokenize(&first.str("token"), REASON);
    assert_eq!(clear.json["pan"], pan, "{clear}");
}
