//! Issue 9, token formats: `"token_format": "random"` (the default, a
//! `tok_...` token) and `"pan_shaped"` (a token of the PAN's length that keeps
//! its first six and last four digits, has random digits in between, always
//! fails Luhn, never equals the PAN and is unique across the vault). A tenant
//! may ask for pan-shaped tokens only once `tokenizer tenant set NAME
//! --pan-shaped true` allows it (else 403 `token_format_not_permitted`); a
//! card already tokenized for the tenant keeps its token whatever format is
//! asked; a nearly full token space is refused with 409
//! `token_space_exhausted`, never a loop.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use e2e::{generated_pan, luhn_valid, with_luhn_digit, Client, Resp, Service};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use crate::{admin, card, exp_year, expect_error, expect_status, is_token, REASON, TENANT};

/// How long a tenant policy change may take to reach a running service.
const POLICY_DELAY: Duration = Duration::from_secs(15);

/// A tenant that may use pan-shaped tokens (set up by [`allow_pan_shaped`]).
const SHAPED: &str = "shop-shaped";

/// `tokenizer tenant set NAME --pan-shaped true|false`.
pub fn set_pan_shaped(svc: &Service, tenant: &str, allowed: bool) {
    let value = if allowed { "true" } else { "false" };
    let out = svc.cli(&["tenant", "set", tenant, "--pan-shaped", value]);
    assert!(
        out.success(),
        "`tokenizer tenant set {tenant} --pan-shaped {value}` failed: {out:?}"
    );
}

/// Allows pan-shaped tokens for `tenant`.
pub fn allow_pan_shaped(svc: &Service, tenant: &str) {
    set_pan_shaped(svc, tenant, true);
}

/// `POST /v1/tokens` with `"token_format"`.
pub fn tokenize_as(client: &Client, tenant: &str, pan: &str, format: &str) -> Resp {
    client.post_json(
        "/v1/tokens",
        &json!({
            "tenant": tenant, "pan": pan, "exp_month": 12, "exp_year": exp_year(),
            "token_format": format,
        }),
    )
}

/// Why `token` is not a valid pan-shaped token for `pan`, if it is not.
pub fn pan_shaped_problem(token: &str, pan: &str) -> Option<String> {
    let n = pan.len();
    if token.len() != n {
        return Some(format!("length {} instead of {n}", token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_digit()) {
        return Some("not all digits".into());
    }
    if token[..6] != pan[..6] {
        return Some("another BIN".into());
    }
    if token[n - 4..] != pan[n - 4..] {
        return Some("other last four".into());
    }
    if token == pan {
        return Some("the PAN itself".into());
    }
    if luhn_valid(token) {
        return Some("passes Luhn".into());
    }
    None
}

/// Asserts a token object of a pan-shaped token for `pan`; returns the token.
#[track_caller]
pub fn check_pan_shaped(obj: &Value, pan: &str) -> String {
    let token = obj["token"].as_str().unwrap_or_default().to_string();
    let last4 = &pan[pan.len() - 4..];
    if let Some(problem) = pan_shaped_problem(&token, pan) {
        // Never print the PAN: the token may be it.
        panic!("bad pan-shaped token for the card ending {last4} ({problem})");
    }
    assert_eq!(obj["bin"], &pan[..6], "bin of the card ending {last4}");
    assert_eq!(obj["last4"], last4, "last4");
    assert!(obj.get("pan").is_none(), "a token object never has the PAN");
    token
}

/// Property: whatever the card (test BIN, 12 to 19 digits), its pan-shaped
/// token fails Luhn, keeps BIN and last four and the length, is not the PAN;
/// metadata and detokenize take it; and a random-format token of the same
/// card (another tenant) is the usual `tok_...`.
#[test]
fn pan_shaped_tokens_keep_bin_last_four_and_length_and_fail_luhn() {
    let svc = Service::start();
    allow_pan_shaped(&svc, SHAPED);
    let client = admin(&svc);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![Just("411111"), Just("424242")],
        12usize..=19,
        "[0-9]{12}",
    );
    let seen = std::cell::RefCell::new(HashSet::new());
    runner
        .run(&strategy, |(bin, len, body)| {
            let pan = with_luhn_digit(&format!("{bin}{}", &body[..len - 7]));
            let resp = tokenize_as(&client, SHAPED, &pan, "pan_shaped");
            // Shrinking may repeat a case: then the token exists (200).
            prop_assert!(resp.status == 201 || resp.status == 200, "{}", resp);
            let token = check_pan_shaped(&resp.json, &pan);
            prop_assert!(
                resp.status == 200 || seen.borrow_mut().insert(token.clone()),
                "a new card got a pan-shaped token already issued"
            );

            let meta = client.metadata(&token);
            prop_assert_eq!(meta.status, 200, "{}", meta);
            prop_assert_eq!(&meta.json["token"], &Value::from(token.as_str()));
            prop_assert_eq!(&meta.json["fingerprint"], &resp.json["fingerprint"]);
            let clear = client.detokenize(&token, REASON);
            prop_assert_eq!(clear.status, 200, "{}", clear);
            prop_assert!(clear.json["pan"] == pan.as_str(), "detokenize: wrong card");

            // Random tokens are unchanged: the default, and when asked.
            let default = client.tokenize(TENANT, &pan, 12, exp_year());
            prop_assert!(default.status == 201 || default.status == 200);
            prop_assert!(is_token(&default.str("token")), "{}", default);
            let random = tokenize_as(&client, "shop-random", &pan, "random");
            prop_assert!(random.status == 201 || random.status == 200);
            prop_assert!(is_token(&random.str("token")), "{}", random);
            Ok(())
        })
        .unwrap();
}

/// The same properties over many cards at once: batches with a top-level
/// `"token_format": "pan_shaped"`, every length from 12 to 19; every token
/// distinct. A batch without the field gets `tok_...` tokens.
#[test]
fn pan_shaped_batches_hold_for_many_cards() {
    let svc = Service::start();
    allow_pan_shaped(&svc, SHAPED);
    let client = admin(&svc);
    let year = exp_year();
    // Distinct cards (a 12-digit card from a test BIN has only five random
    // digits: two draws may give the same card, which keeps its token).
    let mut seen = HashSet::new();
    let pans: Vec<String> = (0..)
        .map(|i| generated_pan(["411111", "424242"][i % 2], 12 + i % 8))
        .filter(|p| seen.insert(p.clone()))
        .take(800)
        .collect();
    let mut tokens = HashSet::new();
    for chunk in pans.chunks(400) {
        let cards: Vec<Value> = chunk.iter().map(|p| card(p, 12, year)).collect();
        let resp = client.post_json(
            "/v1/tokens/batch",
            &json!({"tenant": SHAPED, "cards": cards, "token_format": "pan_shaped"}),
        );
        expect_status(&resp, 200);
        let results = resp.json["results"].as_array().unwrap();
        assert_eq!(results.len(), chunk.len());
        for (result, pan) in results.iter().zip(chunk) {
            assert!(result.get("error").is_none(), "{result}");
            let token = check_pan_shaped(result, pan);
            assert!(tokens.insert(token), "a pan-shaped token issued twice");
        }
    }
    // Asked again, the same token; detokenize and metadata take it (a
    // sample of every length).
    for pan in pans.iter().take(16) {
        let again = tokenize_as(&client, SHAPED, pan, "pan_shaped");
        expect_status(&again, 200);
        let token = check_pan_shaped(&again.json, pan);
        expect_status(&client.metadata(&token), 200);
        let clear = client.detokenize(&token, REASON);
        expect_status(&clear, 200);
        assert!(clear.json["pan"] == pan.as_str(), "detokenize: wrong card");
    }
    let cards: Vec<Value> = pans[..50].iter().map(|p| card(p, 12, year)).collect();
    let resp = client.batch("shop-random", &cards);
    expect_status(&resp, 200);
    for result in resp.json["results"].as_array().unwrap() {
        assert!(
            is_token(result["token"].as_str().unwrap_or_default()),
            "{result}"
        );
    }
}

/// Pan-shaped tokens are the tenant's configuration: refused (403
/// `token_format_not_permitted`, nothing stored) until `tenant set
/// --pan-shaped true`, refused again after `--pan-shaped false`. A card
/// the tenant already has keeps its token, whatever format is asked.
#[test]
fn pan_shaped_is_allowed_per_tenant_and_a_known_card_keeps_its_token() {
    let svc = Service::start();
    let client = admin(&svc);
    let pan = generated_pan("424242", 16);
    let before = svc.sql_i64("SELECT COUNT(*) FROM cards");
    expect_error(
        &tokenize_as(&client, SHAPED, &pan, "pan_shaped"),
        403,
        "token_format_not_permitted",
        &[&pan],
    );
    // Batch: the same refusal, for the whole request or for each card.
    let batch = client.post_json(
        "/v1/tokens/batch",
        &json!({"tenant": SHAPED, "cards": [card(&pan, 12, exp_year())], "token_format": "pan_shaped"}),
    );
    let refused = batch.status == 403
        || batch.json["results"][0]["error"]["code"] == "token_format_not_permitted";
    assert!(
        refused
            && batch
                .error_code()
                .is_none_or(|c| c == "token_format_not_permitted"),
        "batch of a tenant without pan-shaped tokens: {batch}"
    );
    assert_eq!(
        svc.sql_i64("SELECT COUNT(*) FROM cards"),
        before,
        "a refused request stored a card"
    );
    // An unknown format is a client error, and stores nothing.
    let unknown = tokenize_as(&client, SHAPED, &pan, "luhn_valid");
    assert!(
        unknown.status == 400 || unknown.status == 422,
        "unknown token_format: {unknown}"
    );
    assert_eq!(svc.sql_i64("SELECT COUNT(*) FROM cards"), before);

    // A running service may trust its copy of the tenant's policy for a
    // few seconds (5 s in the implementation): the change shows within 15.
    allow_pan_shaped(&svc, SHAPED);
    let mut first = tokenize_as(&client, SHAPED, &pan, "pan_shaped");
    let deadline = Instant::now() + POLICY_DELAY;
    while first.status == 403 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        first = tokenize_as(&client, SHAPED, &pan, "pan_shaped");
    }
    expect_status(&first, 201);
    let shaped = check_pan_shaped(&first.json, &pan);
    // The same card again, in either format: the same token.
    for format in ["random", "pan_shaped"] {
        let again = tokenize_as(&client, SHAPED, &pan, format);
        expect_status(&again, 200);
        assert_eq!(again.json["token"], shaped.as_str(), "{format}");
        assert_eq!(again.json["created"], false);
    }
    expect_status(&client.tokenize(SHAPED, &pan, 12, exp_year()), 200);
    // And a card first tokenized random stays random.
    let other = generated_pan("411111", 16);
    let random = tokenize_as(&client, SHAPED, &other, "random");
    expect_status(&random, 201);
    let again = tokenize_as(&client, SHAPED, &other, "pan_shaped");
    expect_status(&again, 200);
    assert_eq!(again.json["token"], random.json["token"]);
    assert!(is_token(&again.str("token")));

    // Another tenant is not allowed by this one's setting.
    expect_error(
        &tokenize_as(&client, "shop-plain", &pan, "pan_shaped"),
        403,
        "token_format_not_permitted",
        &[&pan],
    );
    // Withdrawn: new cards are refused again (each attempt a new card: one
    // served from a stale policy keeps its token); the issued token works.
    set_pan_shaped(&svc, SHAPED, false);
    let deadline = Instant::now() + POLICY_DELAY;
    loop {
        let late = generated_pan("411111", 16);
        let resp = tokenize_as(&client, SHAPED, &late, "pan_shaped");
        if resp.status == 403 {
            expect_error(&resp, 403, "token_format_not_permitted", &[&late]);
            break;
        }
        expect_status(&resp, 201);
        assert!(
            Instant::now() < deadline,
            "pan-shaped tokens still issued {POLICY_DELAY:?} after --pan-shaped false"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let clear = client.detokenize(&shaped, REASON);
    expect_status(&clear, 200);
    assert!(clear.json["pan"] == pan.as_str());
}

/// The ten Luhn-valid 12-digit numbers `411111 m m 2 3 4 c` with one last
/// four: for each first middle digit exactly one second middle digit makes
/// the check digit come out the same. Their token space: the 90 Luhn-invalid
/// middles.
fn one_space_pans() -> Vec<String> {
    let check = with_luhn_digit("41111100234");
    let last4 = &check[8..];
    let pans: Vec<String> = (0..100)
        .map(|m| with_luhn_digit(&format!("411111{m:02}234")))
        .filter(|p| &p[8..] == last4)
        .collect();
    assert_eq!(
        pans.len(),
        10,
        "ten Luhn-valid middles per BIN and last four"
    );
    pans
}

/// A tiny token space (12 digits: 90 Luhn-invalid middles for one BIN and
/// last four) filled across twelve tenants (120 requests for 90 tokens): the
/// service must answer 409 `token_space_exhausted` (within seconds, not a
/// hang), every token it issued is distinct and in the space, and a refused
/// request stored nothing (the card is new afterwards).
#[test]
fn a_nearly_exhausted_token_space_is_refused_not_looped() {
    let svc = Service::start();
    let client = admin(&svc);
    let pans = one_space_pans();
    let tenants: Vec<String> = (0..12).map(|i| format!("shop-space-{i:02}")).collect();
    for tenant in &tenants {
        allow_pan_shaped(&svc, tenant);
    }
    let started = Instant::now();
    let mut issued: HashSet<String> = HashSet::new();
    let mut refused: Vec<(String, String)> = Vec::new();
    let mut slowest = Duration::ZERO;
    for tenant in &tenants {
        for pan in &pans {
            let cards_before = svc.sql_i64("SELECT COUNT(*) FROM cards");
            let t0 = Instant::now();
            let resp = tokenize_as(&client, tenant, pan, "pan_shaped");
            slowest = slowest.max(t0.elapsed());
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "one tokenize took {:?}: looping on a full space?",
                t0.elapsed()
            );
            match resp.status {
                201 => {
                    let token = check_pan_shaped(&resp.json, pan);
                    assert!(
                        issued.insert(token),
                        "token issued twice after {} tokens",
                        issued.len()
                    );
                }
                409 => {
                    expect_error(&resp, 409, "token_space_exhausted", &[pan]);
                    assert_eq!(
                        svc.sql_i64("SELECT COUNT(*) FROM cards"),
                        cards_before,
                        "a refused request stored a card"
                    );
                    refused.push((tenant.clone(), pan.clone()));
                }
                _ => panic!("unexpected answer while filling the space: {resp}"),
            }
        }
    }
    crate::report(&format!(
        "pan_shaped space: {} tokens issued of 90, {} refused, slowest request {slowest:?}, \
         {:?} in all ({})",
        issued.len(),
        refused.len(),
        started.elapsed(),
        svc.backend().name()
    ));
    assert!(issued.len() <= 90, "more tokens than the space holds");
    assert!(
        !refused.is_empty(),
        "120 requests for a space of 90 and no token_space_exhausted"
    );
    assert!(
        started.elapsed() < Duration::from_secs(180),
        "filling the space took {:?}",
        started.elapsed()
    );
    // Nothing was stored for a refused request: the card is new for that
    // tenant (201, created) in the random format, and nothing of it was kept.
    let (tenant, pan) = &refused[0];
    let random = tokenize_as(&client, tenant, pan, "random");
    expect_status(&random, 201);
    assert_eq!(random.json["created"], true, "{random}");
    assert!(is_token(&random.str("token")));
    // Another last four is another space: still served.
    let elsewhere = with_luhn_digit("41111100235");
    let resp = tokenize_as(&client, &tenants[0], &elsewhere, "pan_shaped");
    expect_status(&resp, 201);
    check_pan_shaped(&resp.json, &elsewhere);
}

/// The same tiny space filled by four clients at once (three tenants each):
/// a token drawn by two requests at the same time is drawn again, never
/// given twice nor answered with an error other than 409
/// `token_space_exhausted`.
#[test]
fn concurrent_requests_in_a_tiny_space_never_share_a_token() {
    let svc = Service::start();
    let client = admin(&svc);
    let pans = one_space_pans();
    let tenants: Vec<String> = (0..12).map(|i| format!("shop-race-{i:02}")).collect();
    for tenant in &tenants {
        allow_pan_shaped(&svc, tenant);
    }
    let results: Vec<(u16, Option<String>, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = tenants
            .chunks(3)
            .map(|mine| {
                let client = client.clone();
                let pans = &pans;
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for tenant in mine {
                        for pan in pans {
                            let resp = tokenize_as(&client, tenant, pan, "pan_shaped");
                            let token =
                                (resp.status == 201).then(|| check_pan_shaped(&resp.json, pan));
                            out.push((resp.status, token, resp.text));
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut issued = HashSet::new();
    let mut refused = 0;
    for (status, token, text) in &results {
        match (status, token) {
            (201, Some(token)) => assert!(issued.insert(token.clone()), "a token issued twice"),
            (409, _) => {
                assert!(text.contains("token_space_exhausted"), "{text}");
                refused += 1;
            }
            _ => panic!("unexpected answer while racing for the space: {status} {text}"),
        }
    }
    crate::report(&format!(
        "pan_shaped race: {} issued of 90, {refused} refused ({})",
        issued.len(),
        svc.backend().name()
    ));
    assert!(
        issued.len() <= 90 && refused > 0,
        "{} issued, {refused} refused",
        issued.len()
    );
    assert_eq!(
        svc.sql_i64("SELECT COUNT(*) FROM cards"),
        issued.len() as i64,
        "stored cards and issued tokens differ"
    );
}
