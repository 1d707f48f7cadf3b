//! Hosted collection in a real browser (Debian's Chromium through
//! chromedriver): a merchant page on its own loopback origin mounts the
//! form from the real edge with `cardvault.js`, the buyer types a test card
//! into the fields found by their `autocomplete` attributes, the page gets
//! the token message, and the checkout confirms it with the vault; the
//! token detokenizes to the typed card. The same frame under another
//! origin is refused by the browser, a keyboard-only entry works, and no
//! console error or CSP violation is logged. Screenshots are kept in
//! `target/browser-artifacts/`.
//!
//! The vault runs in `--dev` here: the merchant page is served over plain
//! HTTP on loopback, which only `--dev` accepts as a session's origin (the
//! production headers and refusals are `edge.rs`'s).

use std::time::Duration;

use e2e::browser::{artifacts_dir, keys, Browser, StaticSite};
use e2e::{Options, Service};
use serde_json::{json, Value};

use crate::edge::Edge;
use crate::{exp_year, REASON, TENANT};

const WAIT: Duration = Duration::from_secs(20);
const CARD: &str = "4242424242424242";

fn merchant_page(edge: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shop checkout</title>
<link rel="icon" href="data:,"></head>
<body>
<h1>Pay for order 77</h1>
<div id="card"></div>
<pre id="result"></pre>
<pre id="errors"></pre>
<script src="{edge}/v1/collect/cardvault.js"></script>
<script src="/merchant.js"></script>
</body></html>"#
    )
}

/// Mounts the form; the token message (or `{"rejected": CODE}` when the
/// promise is rejected) goes to `#result`, every `onError` code to
/// `#errors`.
fn merchant_script(frame_url: &str) -> String {
    format!(
        r#"var seen = [];
CardVault.mount(document.getElementById("card"), {{frameUrl: {frame_url:?},
    onError: function (c) {{ seen.push(c); document.getElementById("errors").textContent = seen.join(","); }}}})
  .then(function (m) {{ document.getElementById("result").textContent = JSON.stringify(m); }},
        function (e) {{ document.getElementById("result").textContent = JSON.stringify({{rejected: e.code}}); }});"#
    )
}

/// A session for `origin`, its id and frame URL.
fn open_session(checkout: &e2e::Client, origin: &str, require_cvc: bool) -> (String, String) {
    let made = checkout.post_json(
        "/v1/collect/sessions",
        &json!({"tenant": TENANT, "allowed_origin": origin, "require_cvc": require_cvc,
                "reference": "order-77"}),
    );
    assert_eq!(made.status, 201, "{made}");
    (made.str("session"), made.str("frame_url"))
}

/// The merchant's page shows the token message: parsed.
fn token_message(browser: &Browser) -> Value {
    let text = browser
        .wait_for("the token message on the merchant page", WAIT, |b| {
            b.find_css("#result")
                .ok()
                .and_then(|r| r.text().ok())
                .filter(|t| !t.is_empty())
        })
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expiry_typed() -> String {
    format!("12{:02}", exp_year() % 100)
}

#[test]
fn a_buyer_types_a_card_into_the_hosted_form_and_the_checkout_confirms_the_token() {
    let svc = Service::start_with(Options {
        dev: true,
        ..Options::default()
    });
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let router = svc.principal_client("router", &["detokenize"], &["*"]);
    let edge_key = svc.create_principal("edge", &["collect"], &["*"]);
    let edge = Edge::start(&svc, &edge_key, &[]);
    let merchant = StaticSite::start();
    let stranger = StaticSite::start();
    let browser = Browser::start();
    let artifacts = artifacts_dir();

    // 1. Pointer and typing, with the security code.
    let (session, frame_url) = open_session(&checkout, merchant.origin(), true);
    load_form(&browser, &merchant, &edge, &frame_url);
    let number = browser
        .wait_for("the card number field", WAIT, |b| {
            b.find_css(r#"input[autocomplete="cc-number"]"#).ok()
        })
        .unwrap();
    number.send_keys(CARD).unwrap();
    browser
        .find_css(r#"input[autocomplete="cc-exp"]"#)
        .unwrap()
        .send_keys(&expiry_typed())
        .unwrap();
    browser
        .find_css(r#"input[autocomplete="cc-csc"]"#)
        .unwrap()
        .send_keys("123")
        .unwrap();
    browser
        .find_css(r#"input[autocomplete="cc-name"]"#)
        .unwrap()
        .send_keys("Jane Doe")
        .unwrap();
    browser
        .screenshot(&artifacts.join("collect-form.png"))
        .unwrap();
    browser
        .find_css("button[type=submit]")
        .unwrap()
        .click()
        .unwrap();
    browser.switch_to_parent().unwrap();
    let message = token_message(&browser);
    assert_eq!(message["type"], "cardvault:token", "{message}");
    assert_eq!(message["session"], session.as_str());
    assert_eq!(message["last4"], "4242");
    assert!(message.get("pan").is_none(), "{message}");
    let token = message["token"].as_str().unwrap().to_owned();
    browser
        .screenshot(&artifacts.join("collect-done.png"))
        .unwrap();

    // The checkout learns the token from the vault; it opens to the card.
    let read = checkout.get(&format!("/v1/collect/sessions/{session}"));
    assert_eq!(read.json["status"], "completed", "{read}");
    assert_eq!(read.json["token"]["token"], token.as_str());
    assert_eq!(read.json["token"]["cvc_available"], true);
    let shown = router.detokenize(&token, REASON);
    assert_eq!(shown.json["pan"], CARD, "{shown}");

    // 2. Keyboard only: focus the number field, then Tab between fields.
    let (_, frame_url) = open_session(&checkout, merchant.origin(), false);
    load_form(&browser, &merchant, &edge, &frame_url);
    let number = browser
        .wait_for("the card number field", WAIT, |b| {
            b.find_css(r#"input[autocomplete="cc-number"]"#).ok()
        })
        .unwrap();
    browser
        .execute("arguments[0].focus();", vec![number.to_json()])
        .unwrap();
    browser
        .send_keys_to_active(&format!(
            "5555555555554444{tab}{exp}{tab}Jane Doe{tab}{enter}",
            tab = keys::TAB,
            exp = expiry_typed(),
            enter = keys::ENTER
        ))
        .unwrap();
    browser.switch_to_parent().unwrap();
    let message = token_message(&browser);
    assert_eq!(message["last4"], "4444", "{message}");

    // 3. The same frame under another origin: the browser refuses it.
    let (_, frame_url) = open_session(&checkout, merchant.origin(), false);
    let frame_url = frame_url.replace("https://pay.cardvault.test", &edge.url);
    stranger.put(
        "/index.html",
        "text/html; charset=utf-8",
        &merchant_page(&edge.url),
        &[],
    );
    stranger.put(
        "/merchant.js",
        "text/javascript; charset=utf-8",
        &merchant_script(&frame_url),
        &[],
    );
    browser.goto(&stranger.url("/index.html")).unwrap();
    let refused = browser
        .wait_for("the refusal of the frame", WAIT, |b| {
            b.browser_log()
                .ok()?
                .into_iter()
                .find(|e| e.message.contains("frame-ancestors"))
        })
        .unwrap();
    assert!(refused.is_severe(), "{refused}");
    browser
        .screenshot(&artifacts.join("collect-refused.png"))
        .unwrap();
    let frame = browser.find_css("#card iframe").unwrap();
    browser.switch_to_frame(&frame).unwrap();
    assert!(
        browser
            .find_css(r#"input[autocomplete="cc-number"]"#)
            .is_err(),
        "the form rendered under a foreign origin"
    );
    browser.switch_to_parent().unwrap();

    // No console error and no CSP violation besides that refusal.
    let log = browser.browser_log().unwrap();
    let bad: Vec<String> = log
        .iter()
        .filter(|e| e.is_severe() || e.message.contains("Content Security Policy"))
        .filter(|e| !e.message.contains("frame-ancestors"))
        .map(ToString::to_string)
        .collect();
    assert!(bad.is_empty(), "browser errors: {bad:?}");
    eprintln!("collect_browser: screenshots in {}", artifacts.display());

    // No card number in the vault's files, tables or output, nor the edge's log.
    let findings = svc.scan_for_leaks(&[CARD, "5555555555554444"]);
    assert!(findings.is_empty(), "{findings:?}");
    let edge_log = edge.log_text();
    for pan in [CARD, "5555555555554444"] {
        assert!(!edge_log.contains(pan), "the edge logged a card number");
    }
}

/// The merchant page and its frame for `frame_url` (the edge's address put
/// in), loaded; the browser is left inside the frame.
fn load_form(browser: &Browser, merchant: &StaticSite, edge: &Edge, frame_url: &str) {
    let frame_url = frame_url.replace("https://pay.cardvault.test", &edge.url);
    merchant.put(
        "/index.html",
        "text/html; charset=utf-8",
        &merchant_page(&edge.url),
        &[],
    );
    merchant.put(
        "/merchant.js",
        "text/javascript; charset=utf-8",
        &merchant_script(&frame_url),
        &[],
    );
    browser.goto(&merchant.url("/index.html")).unwrap();
    let frame = browser
        .wait_for("the card frame", WAIT, |b| b.find_css("#card iframe").ok())
        .unwrap();
    browser.switch_to_frame(&frame).unwrap();
}

/// Types a card without a security code and submits it.
fn type_card(browser: &Browser, pan: &str) {
    let number = browser
        .wait_for("the card number field", WAIT, |b| {
            b.find_css(r#"input[autocomplete="cc-number"]"#).ok()
        })
        .unwrap();
    number.send_keys(pan).unwrap();
    browser
        .find_css(r#"input[autocomplete="cc-exp"]"#)
        .unwrap()
        .send_keys(&expiry_typed())
        .unwrap();
    browser
        .find_css("button[type=submit]")
        .unwrap()
        .click()
        .unwrap();
}

/// The form's message (`#cv-msg`) once shown, and what the live region
/// announced.
fn form_message(browser: &Browser) -> (String, String) {
    let shown = browser
        .wait_for("the form's message", WAIT, |b| {
            let m = b.find_css("#cv-msg").ok()?;
            m.text().ok().filter(|t| !t.is_empty())
        })
        .unwrap();
    let announced = browser
        .wait_for("the live region's announcement", WAIT, |b| {
            let live = b.find_css("#cv-live").ok()?;
            live.property("textContent")
                .ok()?
                .as_str()
                .map(str::to_owned)
                .filter(|t| !t.is_empty())
        })
        .unwrap();
    (shown, announced)
}

/// The merchant page's `{"rejected": CODE}` and `onError` codes.
fn rejection(browser: &Browser) -> (Value, String) {
    browser.switch_to_parent().unwrap();
    let result = token_message(browser);
    let errors = browser.find_css("#errors").unwrap().text().unwrap();
    (result, errors)
}

#[test]
fn wrong_secret_completed_and_expired_forms_say_why_and_settle_the_merchant_promise() {
    let svc = Service::start_with(Options {
        dev: true,
        ..Options::default()
    });
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let edge_key = svc.create_principal("edge", &["collect"], &["*"]);
    let edge = Edge::start(&svc, &edge_key, &[]);
    let merchant = StaticSite::start();
    let browser = Browser::start();
    let artifacts = artifacts_dir();

    // 1. A frame URL whose secret is not the session's: the vault refuses
    //    the card, the form says so and locks, the merchant's promise
    //    rejects with wrong_secret; the session stays open.
    let (session, frame_url) = open_session(&checkout, merchant.origin(), false);
    let (base, secret) = frame_url.split_once('#').unwrap();
    let last = secret.chars().last().unwrap();
    let wrong = format!(
        "{base}#{}{}",
        &secret[..secret.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    load_form(&browser, &merchant, &edge, &wrong);
    type_card(&browser, "4000056655665556");
    let (shown, announced) = form_message(&browser);
    assert!(shown.contains("could not be verified"), "{shown}");
    assert_eq!(announced, shown);
    let number = browser
        .find_css(r#"input[autocomplete="cc-number"]"#)
        .unwrap();
    assert_eq!(number.property("disabled").unwrap(), true);
    browser
        .screenshot(&artifacts.join("collect-wrong-secret.png"))
        .unwrap();
    let (result, errors) = rejection(&browser);
    assert_eq!(result, json!({"rejected": "wrong_secret"}));
    assert_eq!(errors, "wrong_secret");
    let read = checkout.get(&format!("/v1/collect/sessions/{session}"));
    assert_eq!(read.json["status"], "open", "{read}");

    // 2. The right frame URL completes it; loaded again, the form is over:
    //    it says why and the promise rejects with session_completed.
    load_form(&browser, &merchant, &edge, &frame_url);
    type_card(&browser, "4000056655665556");
    browser.switch_to_parent().unwrap();
    let message = token_message(&browser);
    assert_eq!(message["last4"], "5556", "{message}");
    load_form(&browser, &merchant, &edge, &frame_url);
    let (shown, _) = form_message(&browser);
    assert!(shown.contains("already been saved"), "{shown}");
    assert!(
        browser
            .find_css(r#"input[autocomplete="cc-number"]"#)
            .is_err(),
        "a completed session's form still has its fields"
    );
    browser
        .screenshot(&artifacts.join("collect-completed.png"))
        .unwrap();
    let (result, errors) = rejection(&browser);
    assert_eq!(result, json!({"rejected": "session_completed"}));
    assert_eq!(errors, "session_completed");

    // 3. A session that expires while the buyer types: the card is
    //    refused with session_expired; loaded again, the form is over.
    let made = checkout.post_json(
        "/v1/collect/sessions",
        &json!({"tenant": TENANT, "allowed_origin": merchant.origin(), "ttl_secs": 3}),
    );
    assert_eq!(made.status, 201, "{made}");
    let (session, frame_url) = (made.str("session"), made.str("frame_url"));
    load_form(&browser, &merchant, &edge, &frame_url);
    browser
        .wait_for("the card number field", WAIT, |b| {
            b.find_css(r#"input[autocomplete="cc-number"]"#).ok()
        })
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    type_card(&browser, "4000056655665556");
    let (shown, _) = form_message(&browser);
    assert!(shown.contains("has expired"), "{shown}");
    let (result, errors) = rejection(&browser);
    assert_eq!(result, json!({"rejected": "session_expired"}));
    assert_eq!(errors, "session_expired");
    let read = checkout.get(&format!("/v1/collect/sessions/{session}"));
    assert_eq!(read.json["status"], "expired", "{read}");
    assert!(read.json.get("token").is_none(), "{read}");
    load_form(&browser, &merchant, &edge, &frame_url);
    let (shown, _) = form_message(&browser);
    assert!(shown.contains("has expired"), "{shown}");
    browser
        .screenshot(&artifacts.join("collect-expired.png"))
        .unwrap();
    let (result, _) = rejection(&browser);
    assert_eq!(result, json!({"rejected": "session_expired"}));

    // Only the refusals this test provoked reached the console: the
    // submissions answered 403 and 410; no script error, no CSP report.
    let log = browser.browser_log().unwrap();
    let bad: Vec<String> = log
        .iter()
        .filter(|e| e.is_severe() || e.message.contains("Content Security Policy"))
        .filter(|e| {
            !(e.message.contains("Failed to load resource")
                && (e.message.contains("status of 403") || e.message.contains("status of 410")))
        })
        .map(ToString::to_string)
        .collect();
    assert!(bad.is_empty(), "browser errors: {bad:?}");
    let findings = svc.scan_for_leaks(&["4000056655665556"]);
    assert!(findings.is_empty(), "{findings:?}");
    assert!(!edge.log_text().contains("4000056655665556"));
}
