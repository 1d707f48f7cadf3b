//! `GET /metrics` after a known set of calls: the request, card-operation,
//! authentication and TLS-handshake counters count exactly what the test
//! did, latency histograms, audit trail size and last checkpoint, key ages
//! and storage pool state are there with plausible values, and nothing in
//! the scrape names a card number, token, fingerprint, tenant, principal or
//! API key.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::{Options, Service};

use crate::{card, exp_year, expect_status, LUHN_INVALID, REASON, TEST_CARDS};

/// Distinctive names, so that the leak check below can fail.
const TENANT: &str = "metricstenantzq";
const WRITER: &str = "metrics-writer-qx";
const READER: &str = "metrics-reader-qx";

/// One sample of the text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("not a value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            let mut rest = labels;
            while let Some((key, after)) = rest.split_once("=\"") {
                let end = after
                    .find('"')
                    .unwrap_or_else(|| panic!("unterminated label: {line}"));
                map.insert(
                    key.trim_start_matches(',').to_string(),
                    after[..end].to_string(),
                );
                rest = &after[end + 1..];
            }
            Sample {
                name: name.to_string(),
                labels: map,
                value,
            }
        })
        .collect()
}

/// Sum of every sample of `name` whose labels include all of `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    matching(samples, name, with).map(|s| s.value).sum()
}

fn matching<'a>(
    samples: &'a [Sample],
    name: &'a str,
    with: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| {
        s.name == name
            && with
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

fn one(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = matching(samples, name, with).collect();
    assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}");
    found[0].value
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn metrics_count_what_happened_and_name_no_one() {
    let started = unix_now();
    let svc = Service::start_with(Options {
        extra_args: vec!["--audit-checkpoint-interval-ms".into(), "200".into()],
        log_level: "info".into(),
        ..Options::default()
    });
    let writer_key = svc.create_principal(WRITER, &["tokenize", "detokenize"], &[TENANT]);
    let reader_key = svc.create_principal(READER, &["detokenize"], &[TENANT]);
    let writer = svc.client(&writer_key);
    let reader = svc.client(&reader_key);
    let year = exp_year();
    let pans: Vec<&str> = TEST_CARDS[..5].iter().map(|(pan, _)| *pan).collect();
    let mut tokens = Vec::new();
    let mut fingerprints = Vec::new();

    // tokenize: 3 new (201), 1 again (200), 1 bad number, 1 bad key.
    for pan in &pans[..3] {
        let resp = writer.tokenize(TENANT, pan, 12, year);
        expect_status(&resp, 201);
        tokens.push(resp.str("token"));
        fingerprints.push(resp.str("fingerprint"));
    }
    expect_status(&writer.tokenize(TENANT, pans[0], 12, year), 200);
    let bad_pan = writer.tokenize(TENANT, LUHN_INVALID[0], 12, year);
    assert!(
        bad_pan.status == 400 || bad_pan.status == 422,
        "a Luhn-invalid number is refused: {bad_pan}"
    );
    let wrong_key = "cvk_thisisnotakeyofthisservice0000000000";
    let stranger = svc.client(wrong_key);
    expect_status(&stranger.tokenize(TENANT, pans[1], 12, year), 401);

    // tokenize_batch: one batch of two cards.
    let batch = writer.batch(TENANT, &[card(pans[3], 12, year), card(pans[4], 12, year)]);
    expect_status(&batch, 200);
    for result in batch.json["results"].as_array().unwrap() {
        tokens.push(result["token"].as_str().unwrap().to_string());
        fingerprints.push(result["fingerprint"].as_str().unwrap().to_string());
    }

    // detokenize: 2 successes, 1 unknown token (404), 1 bad key (401).
    expect_status(&reader.detokenize(&tokens[0], REASON), 200);
    expect_status(&writer.detokenize(&tokens[3], REASON), 200);
    expect_status(
        &reader.detokenize("tok_AAAAAAAAAAAAAAAAAAAAAA", REASON),
        404,
    );
    expect_status(&stranger.detokenize(&tokens[0], REASON), 401);

    // metadata: 1 success; delete: 1 success; metadata of the deleted: 404.
    expect_status(&writer.metadata(&tokens[1]), 200);
    expect_status(&writer.delete_token(&tokens[2]), 204);
    expect_status(&writer.metadata(&tokens[2]), 404);

    // A TLS handshake that fails: plain HTTP to the TLS card listener.
    let api = svc
        .listener("api")
        .or_else(|| svc.listener("dev"))
        .unwrap_or(svc.addr())
        .to_string();
    let mut raw = TcpStream::connect(&api).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = raw.write_all(b"GET /v1/tokens HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);

    // Headers over the limit (8 KiB by default): 431, logged and counted
    // like any other answer.
    let huge = "x".repeat(9000);
    let too_large = svc
        .anonymous()
        .send_raw("GET", "/healthz", Some(&huge), b"");
    expect_status(&too_large, 431);
    assert_eq!(
        too_large.error_code(),
        Some("headers_too_large"),
        "{too_large}"
    );

    // Scrape until a checkpoint covers the calls above (one is signed
    // every 200 ms while the trail grows).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after_calls = None;
    let (text, samples) = loop {
        let scrape = svc.anonymous().get("/metrics");
        expect_status(&scrape, 200);
        let samples = parse(&scrape.text);
        let entries = one(&samples, "cardvault_audit_entries", &[]);
        let after_calls = *after_calls.get_or_insert(entries);
        let covered = one(&samples, "cardvault_audit_last_checkpoint_size", &[]);
        if covered >= after_calls {
            break (scrape.text, samples);
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint covers the trail ({covered} of {entries})"
        );
        thread::sleep(Duration::from_millis(200));
    };

    // Card operations, by outcome.
    for (operation, outcome, count) in [
        ("tokenize", "success", 4.0),
        ("tokenize", "client_error", 2.0),
        ("tokenize_batch", "success", 1.0),
        ("detokenize", "success", 2.0),
        ("detokenize", "client_error", 2.0),
        ("metadata", "success", 1.0),
        ("metadata", "client_error", 1.0),
        ("delete", "success", 1.0),
    ] {
        assert_eq!(
            sum(
                &samples,
                "cardvault_card_operations_total",
                &[("operation", operation), ("outcome", outcome)]
            ),
            count,
            "{operation} {outcome}:\n{text}"
        );
    }
    assert_eq!(
        sum(
            &samples,
            "cardvault_card_operations_total",
            &[("outcome", "server_error")]
        ),
        0.0
    );

    // Requests by route pattern and status (the listener label is there;
    // its value depends on the listener layout).
    let requests = |route: &str, status: &str| {
        sum(
            &samples,
            "cardvault_http_requests_total",
            &[("method", "POST"), ("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("/v1/tokens", "201"), 3.0, "{text}");
    assert_eq!(requests("/v1/tokens", "200"), 1.0, "{text}");
    assert_eq!(requests("/v1/tokens", "401"), 1.0, "{text}");
    assert_eq!(requests("/v1/tokens/batch", "200"), 1.0, "{text}");
    assert_eq!(requests("/v1/detokenize", "404"), 1.0, "{text}");
    assert_eq!(
        sum(
            &samples,
            "cardvault_http_requests_total",
            &[("route", "/healthz"), ("status", "431")],
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum(
            &samples,
            "cardvault_http_requests_total",
            &[
                ("method", "DELETE"),
                ("route", "/v1/tokens/{token}"),
                ("status", "204")
            ],
        ),
        1.0
    );
    for sample in matching(&samples, "cardvault_http_requests_total", &[]) {
        let listener = sample.labels.get("listener").map(String::as_str);
        assert!(
            listener.is_some_and(|l| !l.is_empty()),
            "no listener: {sample:?}"
        );
        let route = &sample.labels["route"];
        assert!(
            route == "<unmatched>" || !route.contains("tok_"),
            "a raw path as a route: {sample:?}"
        );
    }
    // Latency: every tokenize request observed, in seconds.
    assert_eq!(
        sum(
            &samples,
            "cardvault_http_request_duration_seconds_count",
            &[("route", "/v1/tokens")]
        ),
        6.0
    );
    let slowest_bucket = sum(
        &samples,
        "cardvault_http_request_duration_seconds_bucket",
        &[("route", "/v1/tokens"), ("le", "10")],
    );
    assert_eq!(slowest_bucket, 6.0, "every tokenize took under 10 s");
    let seconds = sum(
        &samples,
        "cardvault_http_request_duration_seconds_sum",
        &[("route", "/v1/tokens")],
    );
    assert!(seconds > 0.0 && seconds < 60.0, "{seconds}");

    // Failures by reason: the two calls with a wrong key, the handshake.
    assert_eq!(
        sum(&samples, "cardvault_auth_failures_total", &[]),
        2.0,
        "{text}"
    );
    assert!(
        sum(&samples, "cardvault_tls_handshake_failures_total", &[]) >= 1.0,
        "{text}"
    );
    for sample in matching(&samples, "cardvault_auth_failures_total", &[]).chain(matching(
        &samples,
        "cardvault_tls_handshake_failures_total",
        &[],
    )) {
        let reason = &sample.labels["reason"];
        assert!(
            !reason.is_empty() && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{sample:?}"
        );
    }

    // Read at scrape time: audit trail, checkpoint, keys, pool.
    let entries = one(&samples, "cardvault_audit_entries", &[]);
    assert!(entries >= 15.0, "every call above is audited: {entries}");
    let checkpoint_at = one(
        &samples,
        "cardvault_audit_last_checkpoint_timestamp_seconds",
        &[],
    );
    assert!(
        checkpoint_at >= started - 5.0 && checkpoint_at <= unix_now() + 5.0,
        "checkpoint time {checkpoint_at} not between the start {started} and now"
    );
    for purpose in ["dek", "fingerprint"] {
        let age = one(
            &samples,
            "cardvault_key_age_seconds",
            &[("purpose", purpose), ("version", "1")],
        );
        assert!(
            (0.0..=unix_now() - started + 5.0).contains(&age),
            "{purpose} key age {age}"
        );
    }
    let idle = one(
        &samples,
        "cardvault_db_pool_connections",
        &[("state", "idle")],
    );
    let in_use = one(
        &samples,
        "cardvault_db_pool_connections",
        &[("state", "in_use")],
    );
    let max = one(&samples, "cardvault_db_pool_max_connections", &[]);
    assert!(
        max >= 1.0 && idle + in_use <= max,
        "pool {idle} + {in_use} of {max}"
    );
    assert!(idle + in_use >= 1.0, "the service has a connection open");

    // Nothing in the scrape names anyone or anything.
    let mut secrets: Vec<String> = vec![
        TENANT.into(),
        WRITER.into(),
        READER.into(),
        writer_key.clone(),
        reader_key.clone(),
        wrong_key.into(),
        "tok_".into(),
        "fp_".into(),
        LUHN_INVALID[0].into(),
    ];
    for pan in &pans {
        secrets.push(pan.to_string());
        secrets.push(pan[pan.len() - 10..].to_string());
    }
    secrets.extend(tokens.iter().cloned());
    secrets.extend(fingerprints.iter().cloned());
    // The key ids (the part before the secret) are principals' names too.
    for key in [&writer_key, &reader_key] {
        secrets.extend(
            key.split(['_', '.'])
                .filter(|p| p.len() >= 8)
                .map(String::from),
        );
    }
    for secret in &secrets {
        assert!(
            !text.contains(secret.as_str()),
            "the scrape contains {secret:?}:\n{text}"
        );
    }
}
