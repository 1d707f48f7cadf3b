//! Key rotation under load, through the real binary: a vault with a few
//! thousand cards rotates its DEK and fingerprint key while clients keep
//! tokenizing and detokenizing; the service is killed with SIGKILL in the
//! middle of the background re-encryption, restarts on the same port, and
//! finishes the pass. Then every token still detokenizes to its card, every
//! record is under the new keys, a known card keeps its token, the old DEK
//! retires and is destroyed, and no request failed outside the restart
//! window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{free_port, Client, Options, Service};
use serde_json::{json, Value};

use crate::{card, expect_status, report, REASON, TEST_CARDS};

const TENANTS: usize = 120;

/// `GET /v1/admin/keys`.
fn status(admin: &Client) -> Value {
    let s = admin.get("/v1/admin/keys");
    expect_status(&s, 200);
    s.json
}

/// Records under each DEK version, from the status.
fn dek_records(status: &Value) -> Vec<(u64, String, u64)> {
    status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["purpose"] == "dek")
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                k["state"].as_str().unwrap().to_owned(),
                k["records"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn rotation_survives_sigkill_mid_pass_and_loses_nothing() {
    let port = free_port();
    let mut svc = Service::start_with(Options {
        listen: format!("127.0.0.1:{port}"),
        log_level: "info".into(),
        extra_args: vec![
            "--reencrypt-batch".into(),
            "10".into(),
            "--reencrypt-interval-ms".into(),
            "100".into(),
        ],
        ..Options::default()
    });
    let admin = svc.principal_client("key-admin", &["key_admin"], &["*"]);
    let client = svc.principal_client("checkout", &["tokenize", "detokenize"], &["*"]);

    // A few thousand records: every test card in each of TENANTS tenants.
    let cards: Vec<Value> = TEST_CARDS
        .iter()
        .map(|(pan, _)| card(pan, 12, 2031))
        .collect();
    let mut tokens: Vec<(String, String, &str)> = Vec::new();
    for t in 0..TENANTS {
        let tenant = format!("shop-{t}");
        let r = client.batch(&tenant, &cards);
        expect_status(&r, 200);
        for (result, (pan, _)) in r.json["results"].as_array().unwrap().iter().zip(TEST_CARDS) {
            tokens.push((
                tenant.clone(),
                result["token"].as_str().unwrap().to_owned(),
                pan,
            ));
        }
    }
    let total = tokens.len() as u64;
    let before = status(&admin);
    assert_eq!(before["remaining"], 0, "{before}");

    // Load: tokenize known cards (the idempotent path) and detokenize, from
    // two threads, recording every failure with its time.
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let client = client.clone();
            let tokens = tokens.clone();
            let (stop, failures, requests) = (stop.clone(), failures.clone(), requests.clone());
            std::thread::spawn(move || {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let (tenant, token, pan) = &tokens[(i * 7919) % tokens.len()];
                    let r = if i % 2 == 0 {
                        let body = json!({"token": token, "reason": REASON}).to_string();
                        client.try_send_raw(
                            "POST",
                            "/v1/detokenize",
                            Some("application/json"),
                            body.as_bytes(),
                        )
                    } else {
                        client.try_tokenize(tenant, pan, 12, 2031)
                    };
                    requests.fetch_add(1, Ordering::Relaxed);
                    let failed = match &r {
                        Ok(resp) if resp.status == 200 => {
                            let same = if i % 2 == 0 {
                                resp.json["pan"] == *pan
                            } else {
                                resp.json["token"] == *token
                            };
                            (!same).then(|| format!("wrong answer: {}", resp.text))
                        }
                        Ok(resp) => Some(format!("status {}: {}", resp.status, resp.text)),
                        Err(e) => Some(e.clone()),
                    };
                    if let Some(f) = failed {
                        failures.lock().unwrap().push((Instant::now(), f));
                        // The server is away (restart): do not spin.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    i += 2;
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));

    // Rotate both keys; kill the service while the pass is under way.
    let rotated = admin.post_json("/v1/admin/keys/rotate", &json!({"fingerprint": true}));
    expect_status(&rotated, 200);
    assert_eq!(
        (
            rotated.json["dek_version"].as_u64(),
            rotated.json["fingerprint_version"].as_u64()
        ),
        (Some(2), Some(2))
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let s = status(&admin);
        let remaining = s["remaining"].as_u64().unwrap();
        assert!(
            remaining > 0,
            "the pass finished before it could be interrupted; use more records"
        );
        if remaining < total {
            break remaining;
        }
        assert!(Instant::now() < deadline, "the pass did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    let metrics = svc.anonymous().get("/metrics");
    expect_status(&metrics, 200);
    let gauge = metric(&metrics.text, "cardvault_reencryption_remaining_records");
    assert!(gauge > 0 && gauge <= total, "{}", metrics.text);
    let killed_at = Instant::now();
    svc.kill(); // SIGKILL
    svc.restart();
    let restarted_at = Instant::now();
    let mid = status(&admin);
    report(&format!(
        "rotation: {total} records; killed with {seen} left; {} left after the restart",
        mid["remaining"]
    ));

    // The restarted service finishes the pass by itself.
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let s = status(&admin);
        if s["remaining"] == 0 && !s["reencrypted_at"].is_null() {
            break s;
        }
        assert!(Instant::now() < deadline, "the pass did not finish: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Load goes on for a while after the pass, then stops.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }

    // No failure outside the restart window (from the kill until the
    // restarted service answered).
    let outside: Vec<String> = failures
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at < killed_at || *at > restarted_at)
        .map(|(_, f)| f.clone())
        .collect();
    assert!(
        outside.is_empty(),
        "requests failed outside the restart window: {outside:?}"
    );
    let (sent, failed) = (
        requests.load(Ordering::Relaxed),
        failures.lock().unwrap().len() as u64,
    );
    report(&format!(
        "rotation: {sent} requests under load, {failed} failed, all in the restart window ({:?})",
        restarted_at - killed_at
    ));
    assert!(
        sent - failed > 100,
        "too little load to mean anything: {sent} sent, {failed} failed"
    );

    let metrics = svc.anonymous().get("/metrics").text;
    assert_eq!(
        metric(&metrics, "cardvault_reencryption_remaining_records"),
        0,
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "cardvault_key_records{{purpose=\"dek\",version=\"2\"}} {total}"
        )),
        "{metrics}"
    );

    // Every record is under the new DEK; every token opens to its card.
    let by_version = dek_records(&done);
    assert!(
        by_version.contains(&(1, "decrypt_only".into(), 0)),
        "{by_version:?}"
    );
    assert!(
        by_version.contains(&(2, "active".into(), total)),
        "{by_version:?}"
    );
    for (tenant, token, pan) in &tokens {
        let r = client.detokenize(token, REASON);
        expect_status(&r, 200);
        assert_eq!(r.str("pan"), *pan, "{tenant} {token}");
    }
    // Idempotent tokenization still finds cards under the new fingerprint key.
    let (tenant, token, pan) = &tokens[3];
    let again = client.tokenize(tenant, pan, 12, 2031);
    expect_status(&again, 200);
    assert_eq!(again.str("token"), *token);

    // The old keys retire (not while in use: checked before the pass in
    // vault's own tests) and the old DEK is destroyed.
    let active = admin.post_json("/v1/admin/keys/dek/2/retire", &json!({}));
    assert_eq!(
        (active.status, active.error_code()),
        (409, Some("key_active")),
        "{active:?}"
    );
    expect_status(
        &admin.post_json("/v1/admin/keys/dek/1/retire", &json!({})),
        200,
    );
    expect_status(
        &admin.post_json("/v1/admin/keys/fingerprint/1/retire", &json!({})),
        200,
    );
    expect_status(
        &admin.post_json("/v1/admin/keys/dek/1/destroy", &json!({})),
        200,
    );
    let after = dek_records(&status(&admin));
    assert!(after.contains(&(1, "destroyed".into(), 0)), "{after:?}");
    // Still every card, after a restart too (the destroyed key is not needed).
    svc.restart();
    let r = client.detokenize(&tokens[0].1, REASON);
    expect_status(&r, 200);
    assert_eq!(r.str("pan"), tokens[0].2);
    svc.kill();
}

/// The value of an unlabelled gauge in a Prometheus text page.
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {page}"))
}
