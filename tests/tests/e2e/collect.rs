//! Hosted collection sessions through the api listener, as the checkout
//! server and the edge use them (the browser side is the edge's): opened,
//! refused when malformed, completed once by the edge's principal, retried,
//! read back with the token, detokenized, and no card number or client
//! secret left anywhere.

use e2e::{Options, Service, HARNESS_EDGE_URL};
use serde_json::json;

use crate::{exp_year, REASON, TENANT};

#[test]
fn a_session_opened_by_the_checkout_is_completed_once_by_the_edge() {
    let svc = Service::start();
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let edge = svc.principal_client("edge", &["collect"], &["*"]);
    let router = svc.principal_client("router", &["detokenize"], &["*"]);

    let made = checkout.post_json(
        "/v1/collect/sessions",
        &json!({"tenant": TENANT, "allowed_origin": "https://Shop.Example:443",
                "ttl_secs": 300, "reference": "order-77",
                "style": {"font_family": "serif", "color": "#112233"}}),
    );
    assert_eq!(made.status, 201, "{made}");
    let id = made.json["session"].as_str().unwrap().to_owned();
    let secret = made.json["client_secret"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cs_") && secret.len() >= 22, "{made}");
    assert_eq!(
        made.json["frame_url"],
        format!("{HARNESS_EDGE_URL}/v1/collect/frame/{id}#{secret}")
    );

    // What the edge needs for the form: the origin in browser form.
    let public = edge.get(&format!("/v1/collect/sessions/{id}/public"));
    assert_eq!(public.status, 200, "{public}");
    assert_eq!(public.json["allowed_origin"], "https://shop.example");
    assert_eq!(public.json["status"], "open");
    assert_eq!(public.json["style"]["font_family"], "serif");
    assert!(public.json.get("client_secret").is_none() && public.json.get("token").is_none());

    let complete = |secret: &str, pan: &str| {
        edge.post_json(
            &format!("/v1/collect/sessions/{id}/complete"),
            &json!({"client_secret": secret, "pan": pan, "exp_month": 12, "exp_year": exp_year(),
                    "buyer_address": "198.51.100.7"}),
        )
    };
    let wrong = complete("not-the-secret", "4242424242424242");
    assert_eq!(
        (wrong.status, wrong.error_code()),
        (403, Some("wrong_secret")),
        "{wrong}"
    );
    let done = complete(&secret, "4242 4242 4242 4242");
    assert_eq!(done.status, 200, "{done}");
    let token = done.json["token"].as_str().unwrap().to_owned();
    assert_eq!(done.json["last4"], "4242");
    assert_eq!(done.json["brand"], "visa");
    let again = complete(&secret, "4242424242424242");
    assert_eq!(again.json["token"], token.as_str(), "{again}");
    let other = complete(&secret, "5555555555554444");
    assert_eq!(
        (other.status, other.error_code()),
        (409, Some("session_completed")),
        "{other}"
    );

    // The checkout server learns the token from the vault, not the browser.
    let read = checkout.get(&format!("/v1/collect/sessions/{id}"));
    assert_eq!(read.status, 200, "{read}");
    assert_eq!(read.json["status"], "completed");
    assert_eq!(read.json["reference"], "order-77");
    assert_eq!(read.json["token"]["token"], token.as_str());
    let shown = router.detokenize(&token, REASON);
    assert_eq!(shown.json["pan"], "4242424242424242", "{shown}");

    // Roles: the edge cannot read tokens or open sessions; the checkout
    // cannot complete them.
    assert_eq!(edge.get(&format!("/v1/collect/sessions/{id}")).status, 403);
    assert_eq!(
        edge.post_json(
            "/v1/collect/sessions",
            &json!({"tenant": TENANT, "allowed_origin": "https://shop.example"})
        )
        .status,
        403
    );
    let by_checkout = checkout.post_json(
        &format!("/v1/collect/sessions/{id}/complete"),
        &json!({"client_secret": secret, "pan": "4242424242424242", "exp_month": 12, "exp_year": exp_year()}),
    );
    assert_eq!(by_checkout.status, 403, "{by_checkout}");

    let findings = svc.scan_for_leaks(&["4242424242424242", "5555555555554444"]);
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn malformed_sessions_are_refused_with_their_codes() {
    let svc = Service::start();
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    for (body, code) in [
        (
            json!({"tenant": TENANT, "allowed_origin": "http://shop.example"}),
            "invalid_origin",
        ),
        (
            json!({"tenant": TENANT, "allowed_origin": "https://shop.example/checkout"}),
            "invalid_origin",
        ),
        (
            json!({"tenant": TENANT, "allowed_origin": "https://a.example https://b.example"}),
            "invalid_origin",
        ),
        (
            json!({"tenant": TENANT, "allowed_origin": "https://shop.example", "ttl_secs": 901}),
            "invalid_ttl",
        ),
        (
            json!({"tenant": TENANT, "allowed_origin": "https://shop.example", "reference": "card 4111111111111111"}),
            "invalid_reference",
        ),
        (
            json!({"tenant": TENANT, "allowed_origin": "https://shop.example", "style": {"color": "red"}}),
            "invalid_style",
        ),
        (
            json!({"tenant": TENANT, "allowed_origin": "https://shop.example", "style": {"css": "body{}"}}),
            "invalid_request",
        ),
        (
            json!({"tenant": TENANT, "allowed_origin": "https://shop.example", "token_format": "pan_shaped"}),
            "token_format_not_permitted",
        ),
    ] {
        let resp = checkout.post_json("/v1/collect/sessions", &body);
        assert_eq!(resp.error_code(), Some(code), "{body}: {resp}");
        assert!((400..500).contains(&resp.status), "{resp}");
    }
    let missing = checkout.get("/v1/collect/sessions/cs_AAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(
        (missing.status, missing.error_code()),
        (404, Some("not_found"))
    );

    // Without the edge's address no session can be opened.
    let bare = Service::start_with(Options {
        collect_public_url: None,
        ..Options::default()
    });
    let checkout = bare.principal_client("checkout", &["tokenize"], &["*"]);
    let resp = checkout.post_json(
        "/v1/collect/sessions",
        &json!({"tenant": TENANT, "allowed_origin": "https://shop.example"}),
    );
    assert_eq!(
        (resp.status, resp.error_code()),
        (409, Some("collect_not_configured")),
        "{resp}"
    );
}
