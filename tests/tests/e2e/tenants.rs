//! Tenants are separate vaults: same card, other token; no cross-tenant
//! access, and no way to tell another tenant's token from a missing one.

use e2e::{fresh_pan, Service};

use crate::{admin, exp_year, expect_error, expect_status, token_for, REASON};

#[test]
fn same_pan_in_two_tenants_gets_two_tokens() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = fresh_pan();

    let a = client.tokenize("shop-a", &pan, 5, exp_year());
    expect_status(&a, 201);
    let b = client.tokenize("shop-b", &pan, 5, exp_year());
    expect_status(&b, 201);
    assert_eq!(b.json["created"], true, "{b}");
    assert_ne!(a.json["token"], b.json["token"]);
    assert_ne!(a.json["fingerprint"], b.json["fingerprint"]);
    assert_eq!(a.json["tenant"], "shop-a");
    assert_eq!(b.json["tenant"], "shop-b");

    for (resp, tenant) in [(&a, "shop-a"), (&b, "shop-b")] {
        let token = resp.str("token");
        let meta = client.metadata(&token);
        expect_status(&meta, 200);
        assert_eq!(meta.json["tenant"], tenant);
        let clear = client.detokenize(&token, REASON);
        expect_status(&clear, 200);
        assert_eq!(clear.json["pan"], pan.as_str());
    }
}

#[test]
fn a_principal_sees_only_its_tenants() {
    let svc = Service::start();
    let admin = admin(&svc);
    let pan = fresh_pan();
    let theirs = token_for(&admin, "shop-b", &pan);
    let other_pan = fresh_pan();

    let limited = svc.principal_client("shop-a-ops", &["tokenize", "detokenize"], &["shop-a"]);

    // Its own tenant works, including the same card.
    let own = limited.tokenize("shop-a", &pan, 5, exp_year());
    expect_status(&own, 201);
    let own_token = own.str("token");
    expect_status(&limited.metadata(&own_token), 200);
    expect_status(&limited.detokenize(&own_token, REASON), 200);

    // Another tenant's token is "not found", never "forbidden".
    expect_error(&limited.metadata(&theirs), 404, "not_found", &[&pan]);
    expect_error(
        &limited.detokenize(&theirs, REASON),
        404,
        "not_found",
        &[&pan],
    );
    expect_error(&limited.delete_token(&theirs), 404, "not_found", &[&pan]);
    // ... and looks like a token that does not exist.
    let unknown = format!("tok_{}", "A".repeat(24));
    let missing = limited.metadata(&unknown);
    expect_error(&missing, 404, "not_found", &[]);

    // Tokenizing for another tenant is forbidden, whether or not the card is
    // known there.
    expect_error(
        &limited.tokenize("shop-b", &pan, 5, exp_year()),
        403,
        "forbidden",
        &[&pan],
    );
    expect_error(
        &limited.tokenize("shop-b", &other_pan, 5, exp_year()),
        403,
        "forbidden",
        &[&other_pan],
    );
    expect_error(
        &limited.batch("shop-b", &[crate::card(&other_pan, 5, exp_year())]),
        403,
        "forbidden",
        &[&other_pan],
    );

    // Nothing happened to shop-b's token, and nothing was created there.
    expect_status(&admin.metadata(&theirs), 200);
    let check = admin.tokenize("shop-b", &other_pan, 5, exp_year());
    expect_status(&check, 201);
}

#[test]
fn a_principal_with_several_tenants() {
    let svc = Service::start();
    let admin = admin(&svc);
    let two = svc.principal_client(
        "two-shops",
        &["tokenize", "detokenize"],
        &["shop-a", "shop-c"],
    );
    let pan = fresh_pan();
    let a = token_for(&two, "shop-a", &pan);
    let c = token_for(&two, "shop-c", &pan);
    assert_ne!(a, c);
    expect_status(&two.detokenize(&a, REASON), 200);
    expect_status(&two.detokenize(&c, REASON), 200);
    let b = token_for(&admin, "shop-b", &pan);
    expect_error(&two.detokenize(&b, REASON), 404, "not_found", &[&pan]);
    expect_error(
        &two.tokenize("shop-b", &pan, 5, exp_year()),
        403,
        "forbidden",
        &[&pan],
    );
    // Tenant names are exact: no prefix matching.
    expect_error(
        &two.tokenize("shop-a2", &pan, 5, exp_year()),
        403,
        "forbidden",
        &[&pan],
    );
}
