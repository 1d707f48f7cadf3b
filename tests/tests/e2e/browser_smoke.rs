//! The browser layer itself (`e2e::browser`), before any cardvault edge:
//! a merchant page on one loopback origin embeds a card frame from a second
//! origin whose CSP allows only the merchant as its ancestor; the test types
//! a public test card number into the frame's `autocomplete="cc-number"`
//! input, the frame posts a summary (never the number) to the merchant's
//! exact origin, and the merchant page shows it. Keyboard-only entry (Tab,
//! Enter) does the same. The same frame embedded by a third origin is
//! refused by the browser. Screenshots of both land in
//! `<target>/browser-artifacts/`. And a harness HTTPS listener loads in a
//! browser that trusts its leaf key, and only in that one.

use std::time::Duration;

use e2e::browser::{artifacts_dir, keys, Browser, BrowserOptions, LogEntry, StaticSite};
use e2e::{harness_pki_dir, Client, Service};

/// Visa's public test number.
const TEST_CARD: &str = "4111111111111111";
const WAIT: Duration = Duration::from_secs(15);

fn merchant_page(frame_origin: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>merchant</title>
<link rel="icon" href="data:,"></head>
<body>
<h1>Checkout</h1>
<iframe id="card" title="Card number" src="{frame_origin}/frame.html" width="500" height="140"></iframe>
<div id="result" aria-live="polite"></div>
<script src="/merchant.js"></script>
</body></html>
"#
    )
}

fn merchant_script(frame_origin: &str) -> String {
    format!(
        r#""use strict";
window.addEventListener("message", function (event) {{
  if (event.origin !== "{frame_origin}") return;
  var data = event.data;
  if (!data || typeof data.type !== "string" || typeof data.value !== "string") return;
  var line = document.createElement("div");
  line.className = "message";
  line.textContent = data.type + ": " + data.value;
  document.getElementById("result").appendChild(line);
}});
"#
    )
}

const FRAME_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>card frame</title></head>
<body>
<label for="number">Card number</label>
<input id="number" name="number" autocomplete="cc-number" inputmode="numeric">
<button id="send" type="button">Send</button>
<script src="/frame.js"></script>
</body></html>
"#;

fn frame_script(merchant_origin: &str) -> String {
    format!(
        r#""use strict";
(function () {{
  var parentOrigin = "{merchant_origin}";
  function post(type, value) {{
    window.parent.postMessage({{ type: type, value: value }}, parentOrigin);
  }}
  document.addEventListener("securitypolicyviolation", function (event) {{
    post("csp", event.violatedDirective);
  }});
  document.getElementById("send").addEventListener("click", function () {{
    var digits = document.getElementById("number").value.replace(/\D/g, "");
    post("smoke", digits.length + " digits ending " + digits.slice(-4));
  }});
}})();
"#
    )
}

fn messages(browser: &Browser) -> Vec<String> {
    browser
        .find_all("#result .message")
        .unwrap()
        .iter()
        .map(|m| m.text().unwrap())
        .collect()
}

fn csp_entries(log: &[LogEntry]) -> Vec<String> {
    log.iter()
        .filter(|e| e.message.contains("Content Security Policy") || e.message.contains("CSP"))
        .map(LogEntry::to_string)
        .collect()
}

#[test]
fn a_cross_origin_card_frame_talks_to_its_allowed_parent_only() {
    let merchant = StaticSite::start();
    let frames = StaticSite::start();
    let stranger = StaticSite::start();
    assert_ne!(merchant.origin(), frames.origin());

    let csp = format!(
        "default-src 'none'; script-src 'self'; frame-ancestors {}",
        merchant.origin()
    );
    frames.put(
        "/frame.html",
        "text/html; charset=utf-8",
        FRAME_PAGE,
        &[("Content-Security-Policy", &csp)],
    );
    frames.put(
        "/frame.js",
        "text/javascript; charset=utf-8",
        &frame_script(merchant.origin()),
        &[("Content-Security-Policy", &csp)],
    );
    for site in [&merchant, &stranger] {
        site.put(
            "/index.html",
            "text/html; charset=utf-8",
            &merchant_page(frames.origin()),
            &[],
        );
        site.put(
            "/merchant.js",
            "text/javascript; charset=utf-8",
            &merchant_script(frames.origin()),
            &[],
        );
    }

    let browser = Browser::start();
    let artifacts = artifacts_dir();

    // The allowed parent: type into the frame, click, read the parent.
    browser.goto(&merchant.url("/index.html")).unwrap();
    let frame = browser.find_css("iframe#card").unwrap();
    browser.switch_to_frame(&frame).unwrap();
    let input = browser
        .wait_for("the card input in the frame", WAIT, |b| {
            b.find_css(r#"input[autocomplete="cc-number"]"#).ok()
        })
        .unwrap();
    assert_eq!(
        input.attribute("inputmode").unwrap().as_deref(),
        Some("numeric")
    );
    input.send_keys(TEST_CARD).unwrap();
    browser.find_css("#send").unwrap().click().unwrap();
    browser.switch_to_parent().unwrap();
    let shown = browser
        .wait_for("the frame's message in #result", WAIT, |b| {
            Some(messages(b)).filter(|m| !m.is_empty())
        })
        .unwrap();
    assert_eq!(shown, ["smoke: 16 digits ending 1111"]);

    // Keyboard only: focus the input, clear it, type, Tab to the button,
    // Enter.
    browser.switch_to_frame(&frame).unwrap();
    let input = browser
        .find_css(r#"input[autocomplete="cc-number"]"#)
        .unwrap();
    input.clear().unwrap();
    input.click().unwrap();
    browser
        .send_keys_to_active(&format!("{}{}{}", &TEST_CARD[..12], keys::TAB, keys::ENTER))
        .unwrap();
    assert_eq!(
        browser
            .active_element()
            .unwrap()
            .attribute("id")
            .unwrap()
            .as_deref(),
        Some("send"),
        "Tab moves the focus from the input to the button"
    );
    browser.switch_to_top().unwrap();
    let shown = browser
        .wait_for("the keyboard entry's message", WAIT, |b| {
            Some(messages(b)).filter(|m| m.len() >= 2)
        })
        .unwrap();
    assert_eq!(
        shown,
        [
            "smoke: 16 digits ending 1111",
            "smoke: 12 digits ending 1111"
        ]
    );
    browser
        .screenshot(&artifacts.join("browser_smoke-allowed.png"))
        .unwrap();

    let log = browser.browser_log().unwrap();
    let severe: Vec<String> = log
        .iter()
        .filter(|e| e.is_severe())
        .map(LogEntry::to_string)
        .collect();
    assert!(severe.is_empty(), "severe browser-log entries: {severe:#?}");
    assert!(
        csp_entries(&log).is_empty(),
        "CSP violations: {:#?}",
        csp_entries(&log)
    );
    assert_eq!(frames.requests("/frame.js"), 1);

    // A parent that is not in frame-ancestors: the frame is not rendered.
    browser.goto(&stranger.url("/index.html")).unwrap();
    let refusal = browser
        .wait_for("Chromium's frame-ancestors refusal in the log", WAIT, |b| {
            b.browser_log()
                .ok()?
                .into_iter()
                .skip(log.len())
                .find(|e| e.message.contains("frame-ancestors"))
        })
        .unwrap();
    // Chromium 156: "Framing '<frame origin>/' violates the following
    // Content Security Policy directive: "frame-ancestors <merchant>". The
    // request has been blocked." (older versions: "Refused to frame ...").
    assert!(
        refusal.is_severe()
            && refusal.message.contains(frames.origin())
            && refusal.message.contains(merchant.origin())
            && (refusal.message.contains("blocked") || refusal.message.contains("Refused")),
        "{refusal}"
    );
    let frame = browser.find_css("iframe#card").unwrap();
    browser.switch_to_frame(&frame).unwrap();
    assert!(
        browser
            .find_all(r#"input[autocomplete="cc-number"]"#)
            .unwrap()
            .is_empty(),
        "the refused frame has no card input"
    );
    browser.switch_to_top().unwrap();
    assert_eq!(
        frames.requests("/frame.js"),
        1,
        "the refused frame never ran its script"
    );
    assert!(messages(&browser).is_empty());
    let shot = artifacts.join("browser_smoke-refused.png");
    browser.screenshot(&shot).unwrap();
    eprintln!("browser artifacts: {}", artifacts.display());
}

#[test]
fn a_harness_tls_listener_loads_only_where_its_leaf_key_is_trusted() {
    let svc = Service::start();
    let url = format!("https://{}/healthz", svc.endpoints().addr_for("/healthz"));
    let server_cert = harness_pki_dir(svc.data_dir()).join("server.pem");

    let trusting =
        Browser::start_with(BrowserOptions::default().trust_leaf_certificate(&server_cert));
    trusting.goto(&url).unwrap();
    assert_eq!(trusting.current_url().unwrap(), url);
    let body = trusting.find_css("body").unwrap().text().unwrap();
    let expected = Client::for_endpoints(svc.endpoints(), None).get("/healthz");
    assert_eq!(expected.status, 200, "{expected}");
    assert_eq!(
        body.trim(),
        expected.text.trim(),
        "the page is /healthz's answer"
    );
    drop(trusting);

    // An unknown CA and no trusted key: Chromium's certificate interstitial
    // (chromedriver reports the navigation as done), not the page.
    let stranger = Browser::start();
    stranger.goto(&url).unwrap();
    let page = stranger
        .execute("return document.body.innerText;", vec![])
        .unwrap();
    let page = page.as_str().unwrap_or_default();
    assert!(
        page.contains("ERR_CERT_AUTHORITY_INVALID") && !page.contains(expected.text.trim()),
        "expected the certificate interstitial, got a page of {} characters",
        page.len()
    );
}
