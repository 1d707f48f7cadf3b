//! Idempotency: one card, one token per tenant, even under a race.

use std::sync::{Arc, Barrier};
use std::thread;

use e2e::{fresh_pan, Client, Service};

use crate::{admin, check_token_object, exp_year, expect_status, spaced, Expect, REASON, TENANT};

#[test]
fn same_pan_twice_gives_the_same_token() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();
    let year = exp_year();

    let first = client.tokenize(TENANT, &pan, 6, year);
    expect_status(&first, 201);
    let expect = Expect {
        pan: &pan,
        tenant: TENANT,
        brand: Some("visa"),
        exp_month: 6,
        exp_year: year,
    };
    check_token_object(&first.json, &expect, Some(true));

    let again = client.tokenize(TENANT, &pan, 6, year);
    expect_status(&again, 200);
    check_token_object(&again.json, &expect, Some(false));
    assert_eq!(again.json["token"], first.json["token"]);
    assert_eq!(again.json["fingerprint"], first.json["fingerprint"]);
    assert_eq!(again.json["created_at"], first.json["created_at"]);

    // Typed differently: still the same card.
    let dashed: String = spaced(&pan).replace(' ', "-");
    for typed in [
        spaced(&pan),
        dashed,
        format!("{} {}-{}", &pan[..4], &pan[4..10], &pan[10..]),
        format!(" {pan} "),
    ] {
        let resp = client.tokenize(TENANT, &typed, 6, year);
        expect_status(&resp, 200);
        assert_eq!(resp.json["created"], false, "{resp}");
        assert_eq!(resp.json["token"], first.json["token"], "{resp}");
    }

    // Another expiry for a card the tenant already has: still that token.
    let renewed = client.tokenize(TENANT, &pan, 7, year + 1);
    expect_status(&renewed, 200);
    assert_eq!(renewed.json["token"], first.json["token"], "{renewed}");
    assert_eq!(renewed.json["created"], false, "{renewed}");

    // Other principals of the same tenant see the same token.
    let other = svc.principal_client("tokenizer-2", &["tokenize"], &[TENANT]);
    let resp = other.tokenize(TENANT, &pan, 6, year);
    expect_status(&resp, 200);
    assert_eq!(resp.json["token"], first.json["token"]);
}

/// 16 clients send the same new card at the same moment: one token, one 201.
#[test]
fn racing_clients_get_exactly_one_token() {
    const THREADS: usize = 16;
    let svc = Service::start();
    let key = svc.create_principal("racer", &["tokenize", "detokenize"], &["*"]);
    let year = exp_year();

    for round in 0..3 {
        let pan = fresh_pan();
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                // One client (and connection) per thread.
                let client = svc.client(&key);
                let barrier = Arc::clone(&barrier);
                let pan = pan.clone();
                thread::spawn(move || {
                    barrier.wait();
                    client.tokenize(TENANT, &pan, 9, year)
                })
            })
            .collect();
        let responses: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();

        let created = responses.iter().filter(|r| r.status == 201).count();
        let existing = responses.iter().filter(|r| r.status == 200).count();
        let summary: Vec<String> = responses.iter().map(ToString::to_string).collect();
        assert_eq!(
            (created, existing),
            (1, THREADS - 1),
            "round {round}: want one 201 and {} 200s:\n{}",
            THREADS - 1,
            summary.join("\n")
        );
        let first = &responses[0].json["token"];
        assert!(
            responses.iter().all(|r| &r.json["token"] == first),
            "round {round}: different tokens for one card:\n{}",
            summary.join("\n")
        );
        assert_eq!(
            responses
                .iter()
                .filter(|r| r.json["created"] == true)
                .count(),
            1,
            "round {round}: `created: true` must be said once"
        );
        let client: Client = svc.client(&key);
        let clear = client.detokenize(first.as_str().unwrap(), REASON);
        expect_status(&clear, 200);
        assert_eq!(clear.json["pan"], pan.as_str());
    }
}
