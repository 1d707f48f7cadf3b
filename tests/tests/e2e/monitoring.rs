//! Detokenization monitoring (issue 8): detokenize rate limits per
//! principal and per tenant (429 `rate_limited`, `Retry-After`, a denied
//! `detokenize` audit event), the anomaly rule (a `detokenize_anomaly`
//! event and a metric, the request itself still served), and the guard
//! against unauthenticated floods per source address, with a good client
//! working through the flood.
//!
//! Small limits come from `serve` flags. "Another source" is real: the
//! flooding client binds its socket to 127.0.0.2 (Linux routes all of
//! 127.0.0.0/8 on `lo`), so the service sees a different peer address than
//! the good client's 127.0.0.1.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{Client, Options, Service};
use serde_json::{json, Value};

use crate::{expect_error, expect_status, report, token_for, REASON, TENANT, TEST_CARDS};

/// One response of [`exchange`], headers included (the harness's `Resp`
/// has no `Retry-After`).
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    text: String,
    json: Value,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn code(&self) -> Option<&str> {
        self.json["error"]["code"].as_str()
    }

    /// `Retry-After` in seconds (panics when absent or not a number).
    fn retry_after(&self) -> u64 {
        self.header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric Retry-After: {self:?}"))
    }
}

/// Connect to `addr`, from `from` when given (bind before connect).
fn connect(addr: &str, from: Option<IpAddr>) -> TcpStream {
    let target: SocketAddr = addr.parse().unwrap();
    let stream = match from {
        None => TcpStream::connect(target).unwrap(),
        Some(ip) => e2e::block_on(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(target).await?.into_std()
        })
        .unwrap_or_else(|e| panic!("connect {addr} from {ip}: {e}")),
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
}

/// One HTTP/1.1 request on a new connection (`Connection: close`).
fn exchange(
    addr: &str,
    from: Option<IpAddr>,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Raw {
    let tcp = connect(addr, from);
    let mut stream = e2e::Wire::over(tcp, addr, e2e::tls_for_addr(addr))
        .unwrap_or_else(|e| panic!("TLS to {addr}: {e}"));
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(key) = key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, text) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Raw {
        status,
        headers,
        text: text.to_owned(),
        json: serde_json::from_str(text).unwrap_or(Value::Null),
    }
}

fn detokenize_raw(svc: &Service, from: Option<IpAddr>, key: &str, token: &str) -> Raw {
    exchange(
        svc.endpoints().addr_for("/v1/detokenize"),
        from,
        "POST",
        "/v1/detokenize",
        Some(key),
        Some(&json!({"token": token, "reason": REASON})),
    )
}

fn start(args: &[&str]) -> Service {
    Service::start_with(Options {
        extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..Options::default()
    })
}

/// Every audit event with this query (one page is enough here).
fn audit(auditor: &Client, query: &str) -> Vec<Value> {
    let resp = auditor.get(&format!("/v1/audit/events?limit=1000&{query}"));
    expect_status(&resp, 200);
    resp.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].clone())
        .collect()
}

/// The value of one sample of `/metrics` (`name{labels}` exactly as printed).
fn metric(svc: &Service, sample: &str) -> f64 {
    let text = svc.anonymous().get("/metrics").text;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics:\n{text}"))
}

#[test]
fn detokenize_limits_answer_429_with_retry_after_and_are_audited() {
    // Principal: 3 at once, then one every 10 s; tenant: 5 at once.
    let svc = start(&[
        "--detokenize-rate-per-principal",
        "6",
        "--detokenize-burst-per-principal",
        "3",
        "--detokenize-rate-per-tenant",
        "6",
        "--detokenize-burst-per-tenant",
        "5",
        "--detokenize-anomaly-min-distinct",
        "0",
    ]);
    let maker = svc.principal_client("maker", &["tokenize"], &["*"]);
    let pans: Vec<&str> = TEST_CARDS[..3].iter().map(|(p, _)| *p).collect();
    let tokens: Vec<String> = pans.iter().map(|p| token_for(&maker, TENANT, p)).collect();
    let other_tenant = token_for(&maker, "shop-43", pans[0]);
    let a = svc.create_principal("settlement-a", &["detokenize"], &["*"]);
    let b = svc.create_principal("settlement-b", &["detokenize"], &["*"]);

    for token in &tokens {
        let r = detokenize_raw(&svc, None, &a, token);
        assert_eq!(r.status, 200, "{r:?}");
    }
    // The principal's burst is used up.
    let refused = detokenize_raw(&svc, None, &a, &tokens[0]);
    assert_eq!(
        (refused.status, refused.code()),
        (429, Some("rate_limited")),
        "{refused:?}"
    );
    let wait = refused.retry_after();
    assert!((1..=10).contains(&wait), "Retry-After {wait}");
    assert!(refused.json.get("pan").is_none() && !refused.text.contains(pans[0]));

    // Another principal on the same tenant: 2 left of the tenant's 5.
    for token in &tokens[..2] {
        assert_eq!(detokenize_raw(&svc, None, &b, token).status, 200);
    }
    let refused = detokenize_raw(&svc, None, &b, &tokens[2]);
    assert_eq!(
        (refused.status, refused.code()),
        (429, Some("rate_limited")),
        "{refused:?}"
    );
    assert!((1..=10).contains(&refused.retry_after()));
    // Another tenant is not limited by shop-42's budget (and b got its
    // token back for the refused request).
    let r = detokenize_raw(&svc, None, &b, &other_tenant);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["pan"], pans[0]);

    // The refusals are denied detokenize events; nothing was opened for them.
    let auditor = svc.principal_client("auditor", &["auditor"], &["*"]);
    let denied = audit(&auditor, "action=detokenize&outcome=denied");
    let limited: Vec<(&str, &str, Option<&str>)> = denied
        .iter()
        .filter(|e| e["error_code"] == "rate_limited")
        .map(|e| {
            (
                e["principal"].as_str().unwrap(),
                e["detail"].as_str().unwrap(),
                e["tenant"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        limited,
        vec![
            ("settlement-a", "principal_rate_limit", None),
            ("settlement-b", "tenant_rate_limit", Some(TENANT)),
        ],
        "{denied:?}"
    );
    assert_eq!(denied[0]["token"], tokens[0].as_str());
    let ok = audit(&auditor, "action=detokenize&outcome=success");
    assert_eq!(ok.len(), 6, "3 by a, 2 + 1 by b: {ok:?}");
    let trail = auditor.get("/v1/audit/events?limit=1000").text;
    for pan in &pans {
        assert!(!trail.contains(pan), "a PAN in the audit trail");
    }

    assert_eq!(
        metric(&svc, "cardvault_rate_limited_total{scope=\"principal\"}"),
        1.0
    );
    assert_eq!(
        metric(&svc, "cardvault_rate_limited_total{scope=\"tenant\"}"),
        1.0
    );
}

#[test]
fn anomaly_rule_raises_an_audit_event_and_a_metric() {
    // Without history the rule fires above 4 distinct tokens in the window.
    let svc = start(&[
        "--detokenize-anomaly-min-distinct",
        "4",
        "--detokenize-anomaly-window-secs",
        "3600",
    ]);
    let maker = svc.principal_client("maker", &["tokenize"], &["*"]);
    let pans: Vec<&str> = TEST_CARDS[..6].iter().map(|(p, _)| *p).collect();
    let tokens: Vec<String> = pans.iter().map(|p| token_for(&maker, TENANT, p)).collect();
    let usual = svc.principal_client("usual", &["detokenize"], &["*"]);
    let bulk = svc.principal_client("bulk-reader", &["detokenize"], &["*"]);
    let auditor = svc.principal_client("auditor", &["auditor"], &["*"]);

    // The same card again and again is not "many cards".
    for _ in 0..5 {
        expect_status(&usual.detokenize(&tokens[0], REASON), 200);
    }
    for token in &tokens[..4] {
        expect_status(&bulk.detokenize(token, REASON), 200);
        expect_status(&bulk.detokenize(token, REASON), 200);
    }
    assert!(audit(&auditor, "action=detokenize_anomaly").is_empty());
    assert_eq!(metric(&svc, "cardvault_detokenize_anomalies_total"), 0.0);

    // The fifth distinct card: served, and flagged.
    let fifth = bulk.detokenize(&tokens[4], REASON);
    expect_status(&fifth, 200);
    assert_eq!(fifth.json["pan"], pans[4]);
    let events = audit(&auditor, "action=detokenize_anomaly");
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    assert_eq!(ev["principal"], "bulk-reader");
    assert_eq!(ev["tenant"], TENANT);
    assert_eq!(ev["token"], tokens[4].as_str());
    assert_eq!(ev["request_id"], fifth.request_id.as_deref().unwrap());
    let detail = ev["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("distinct_tokens=5 threshold=4 baseline=0.0 window_s=3600"),
        "{detail}"
    );
    assert_eq!(metric(&svc, "cardvault_detokenize_anomalies_total"), 1.0);
    assert!(
        svc.stderr().contains("detokenize anomaly"),
        "no log line for the anomaly"
    );
    // Once per window: the sixth card does not raise another.
    expect_status(&bulk.detokenize(&tokens[5], REASON), 200);
    assert_eq!(audit(&auditor, "action=detokenize_anomaly").len(), 1);
    assert_eq!(metric(&svc, "cardvault_detokenize_anomalies_total"), 1.0);
    let trail = auditor.get("/v1/audit/events?limit=1000").text;
    for pan in &pans {
        assert!(!trail.contains(pan), "a PAN in the audit trail");
    }
}

/// The flooding source: 10 failed authentications a minute, then 30 s of
/// 429. The flood uses a real key id with a wrong secret, the expensive
/// case (one argon2 check each until the block).
#[test]
fn unauthenticated_flood_is_limited_per_source_while_good_callers_carry_on() {
    const LIMIT: usize = 10;
    let svc = start(&[
        "--auth-failures-per-source",
        "10",
        "--auth-block-secs",
        "30",
    ]);
    let flood_ip: IpAddr = "127.0.0.2".parse().unwrap();
    let good_key = svc.create_principal("checkout", &["tokenize", "detokenize"], &["*"]);
    let good = svc.client(&good_key);
    let pan = TEST_CARDS[1].0;
    let token = token_for(&good, TENANT, pan);
    // Verified once from the flooding address too, before the flood.
    assert_eq!(
        detokenize_raw(&svc, Some(flood_ip), &good_key, &token).status,
        200
    );
    let mut bad_key = good_key.clone();
    let last = bad_key.pop().unwrap();
    bad_key.push(if last == 'A' { 'B' } else { 'A' });

    let quiet: Vec<Duration> = (0..10)
        .map(|_| {
            let t = Instant::now();
            expect_status(&good.detokenize(&token, REASON), 200);
            t.elapsed()
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let (addr, key, stop) = (
                svc.endpoints().addr_for("/v1/detokenize").to_owned(),
                bad_key.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = exchange(
                        &addr,
                        Some(flood_ip),
                        "POST",
                        "/v1/detokenize",
                        Some(&key),
                        Some(&json!({"token": "tok_x", "reason": REASON})),
                    );
                    let retry = r.header("retry-after").map(str::to_owned);
                    seen.push((r.status, r.code().map(str::to_owned), retry));
                }
                seen
            })
        })
        .collect();
    let flood_started = Instant::now();
    let mut during = Vec::new();
    while flood_started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let r = good.detokenize(&token, REASON);
        during.push(t.elapsed());
        expect_status(&r, 200);
        assert_eq!(r.json["pan"], pan);
    }
    // Other sources keep their own budget: a wrong key from 127.0.0.1 is
    // an ordinary 401.
    expect_error(
        &svc.client(&bad_key).detokenize(&token, REASON),
        401,
        "unauthenticated",
        &[pan],
    );
    // From the blocked source: a key this process verified passes, a bad
    // one or a valid key never seen here is refused before authentication.
    assert_eq!(
        detokenize_raw(&svc, Some(flood_ip), &good_key, &token).status,
        200
    );
    let fresh_key = svc.create_principal("new-client", &["detokenize"], &["*"]);
    let r = detokenize_raw(&svc, Some(flood_ip), &fresh_key, &token);
    assert_eq!((r.status, r.code()), (429, Some("rate_limited")), "{r:?}");
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<_> = flooders
        .into_iter()
        .flat_map(|f| f.join().unwrap())
        .collect();

    let unauthenticated = seen.iter().filter(|s| s.0 == 401).count();
    let limited: Vec<_> = seen.iter().filter(|s| s.0 == 429).collect();
    assert_eq!(
        unauthenticated + limited.len(),
        seen.len(),
        "only 401 and 429: {seen:?}"
    );
    // The block starts with the failure after the 10th; requests already
    // past the guard at that moment (one per flooding thread) still fail
    // as 401.
    assert!(
        (LIMIT + 1..=LIMIT + 3).contains(&unauthenticated),
        "{unauthenticated} requests reached authentication"
    );
    assert!(limited.len() > 10, "the flood was not refused: {seen:?}");
    for (_, code, retry) in &limited {
        assert_eq!(code.as_deref(), Some("rate_limited"));
        let secs: u64 = retry.as_deref().unwrap().parse().unwrap();
        assert!((1..=30).contains(&secs), "Retry-After {secs}");
    }

    // The good client's latency through the flood.
    let p = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * q) as usize]
    };
    let mut quiet = quiet;
    let (quiet_p50, during_p50, during_max) =
        (p(&mut quiet, 0.5), p(&mut during, 0.5), p(&mut during, 1.0));
    report(&format!(
        "monitoring flood ({}): {} flood requests from 127.0.0.2, {} reached authentication, {} refused with 429; \
         good client: {} detokenize calls, all 200, p50 {:?} (quiet {:?}), p95 {:?}, max {:?}",
        svc.backend().name(),
        seen.len(),
        unauthenticated,
        limited.len(),
        during.len(),
        during_p50,
        quiet_p50,
        p(&mut during, 0.95),
        during_max,
    ));
    assert!(
        during_max < Duration::from_secs(2),
        "the good client waited {during_max:?}"
    );

    // One audit event for the block; every 401 before it is audited too.
    let auditor = svc.principal_client("auditor", &["auditor"], &["*"]);
    let blocks = audit(&auditor, "action=source_blocked");
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0]["source"], "127.0.0.2");
    assert_eq!(blocks[0]["outcome"], "denied");
    assert_eq!(blocks[0]["error_code"], "rate_limited");
    let failed = audit(&auditor, "action=authentication_failed");
    let from_flood = failed
        .iter()
        .filter(|e| e["source"].as_str().unwrap().starts_with("127.0.0.2:"))
        .count();
    assert_eq!(from_flood, unauthenticated);
    // Refused requests are counted (the flood's, and the fresh key's).
    assert_eq!(
        metric(&svc, "cardvault_rate_limited_total{scope=\"source\"}"),
        (limited.len() + 1) as f64
    );
    assert_eq!(metric(&svc, "cardvault_blocked_sources"), 1.0);
    assert_eq!(metric(&svc, "cardvault_source_blocks_total"), 1.0);
}
