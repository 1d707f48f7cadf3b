//! Readiness tells the truth (issue 20): `/readyz` is 503
//! `storage_read_only` while the database answers but cannot commit, and
//! 200 again by itself once it can. The probe is a real commit (one row of
//! `storage_probe`), so a read-only database, a standby or a full disk
//! (SQLite: `faults.rs`) are all seen, not only an unreachable one.
//!
//! Always on PostgreSQL (a throwaway cluster of the test's own, made
//! read-only for everyone with `ALTER SYSTEM SET
//! default_transaction_read_only`, as an operator or a failover tool
//! would), whatever `CARDVAULT_TEST_BACKEND` says.

use std::time::{Duration, Instant};

use e2e::{pg_execute, Options, PgCluster, Resp, Service};

use crate::{exp_year, expect_status, REASON, TENANT};

/// `/readyz` must change within this after the database does (the probe
/// runs at each call; a bound on behaviour, not a performance target).
const BOUND: Duration = Duration::from_secs(15);

fn wait_for_readyz(svc: &Service, want: impl Fn(&Resp) -> bool, what: &str) -> (Resp, Duration) {
    let start = Instant::now();
    loop {
        let r = svc.anonymous().get("/readyz");
        if want(&r) {
            return (r, start.elapsed());
        }
        assert!(
            start.elapsed() < BOUND,
            "{what} within {BOUND:?}; last: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn writable(svc: &Service) -> f64 {
    let text = svc.anonymous().get("/metrics").text;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("cardvault_storage_writable ")?
                .trim()
                .parse()
                .ok()
        })
        .expect("cardvault_storage_writable in /metrics")
}

#[test]
fn readyz_is_storage_read_only_while_postgres_refuses_commits_and_recovers_by_itself() {
    let cluster = PgCluster::start();
    let mut svc = Service::start_with(Options {
        database_url: Some(cluster.url()),
        ..Options::default()
    });
    let key = svc.create_principal("ready", &["tokenize", "detokenize"], &["*"]);
    let client = svc.client(&key);
    let year = exp_year();
    let before = client.tokenize(TENANT, "4111111111111111", 12, year);
    assert_eq!(before.status, 201, "{before}");
    let token = before.str("token");
    expect_status(&svc.anonymous().get("/readyz"), 200);
    assert_eq!(writable(&svc), 1.0);

    // Every session of the cluster turns read-only (a reload applies to
    // open sessions too): queries answer, commits are refused.
    pg_execute(
        &cluster.url(),
        "ALTER SYSTEM SET default_transaction_read_only = on",
    );
    pg_execute(&cluster.url(), "SELECT pg_reload_conf()");
    let (ready, after) = wait_for_readyz(
        &svc,
        |r| r.status == 503,
        "/readyz 503 after the database turned read-only",
    );
    assert_eq!(ready.json["status"], "unavailable", "{ready}");
    assert_eq!(ready.error_code(), Some("storage_read_only"), "{ready}");
    assert_eq!(writable(&svc), 0.0);
    expect_status(&svc.anonymous().get("/healthz"), 200);

    // Requests fail cleanly and change nothing.
    let cards = svc.sql_i64("SELECT COUNT(*) FROM cards");
    let refused = client.tokenize(TENANT, "5555555555554444", 12, year);
    assert_eq!(refused.status, 503, "{refused}");
    assert_eq!(
        refused.error_code(),
        Some("storage_unavailable"),
        "{refused}"
    );
    let read = client.detokenize(&token, REASON);
    assert_eq!(
        read.status, 503,
        "a read whose audit event cannot commit: {read}"
    );
    assert!(
        svc.is_running(),
        "the service exited with its database read-only"
    );

    // The database takes writes again: ready again without a restart.
    pg_execute(
        &cluster.url(),
        "ALTER SYSTEM RESET default_transaction_read_only",
    );
    pg_execute(&cluster.url(), "SELECT pg_reload_conf()");
    let (_, recovered) = wait_for_readyz(
        &svc,
        |r| r.status == 200,
        "/readyz 200 after the database took writes again",
    );
    assert_eq!(writable(&svc), 1.0);
    assert_eq!(
        svc.sql_i64("SELECT COUNT(*) FROM cards"),
        cards,
        "nothing was written while read-only"
    );
    let again = client.detokenize(&token, REASON);
    assert_eq!(again.status, 200, "{again}");
    let later = client.tokenize(TENANT, "5555555555554444", 12, year);
    assert_eq!(later.status, 201, "{later}");
    crate::report(&format!(
        "readiness (postgres read-only): readyz_503_after_ms={} readyz_200_after_reset_ms={}",
        after.as_millis(),
        recovered.as_millis()
    ));
    svc.kill();
}
