//! Losing the database: a PostgreSQL cluster of the test's own is stopped
//! hard (`pg_ctl stop -m immediate`, a crash as far as clients can tell)
//! under a write workload, then started again. The service must fail fast
//! with 503 `storage_unavailable`, stay alive, report not ready, recover by
//! itself, and have lost nothing it acknowledged.
//!
//! Always on PostgreSQL (a throwaway cluster: initdb in a temporary
//! directory), whatever `CARDVAULT_TEST_BACKEND` says.

use std::thread;
use std::time::{Duration, Instant};

use e2e::{assert_no_leaks, fresh_pan, scan_bytes, scan_dir, Client, Options, PgCluster, Service};

use crate::workload::{self, ms, Outcome, Sample, Workload};
use crate::{exp_year, expect_error, expect_status, REASON, TENANT};

/// `db_timeout_ms` of the service under test.
const DB_TIMEOUT_MS: u64 = 1000;
/// Every request must come back within this while the database is down (a
/// bound on behaviour, not a performance target).
const FAIL_FAST_BOUND: Duration = Duration::from_secs(10);
/// How long the database stays down.
const OUTAGE: Duration = Duration::from_secs(4);
/// `/readyz` must turn 503 within this once the database is gone, and 200
/// within [`RECOVERY_BOUND`] once it is back.
const READY_DOWN_BOUND: Duration = Duration::from_secs(10);
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
const WORKERS: usize = 4;

/// Polls `path` until it answers `status`; returns how long that took.
fn wait_for_status(client: &Client, path: &str, status: u16, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let resp = client.try_send("GET", path);
        if matches!(&resp, Ok(r) if r.status == status) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "GET {path} did not answer {status} within {bound:?}; last answer: {resp:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn database_crash_fails_fast_recovers_and_loses_nothing() {
    let cluster = PgCluster::start();
    let (_config, config_args) = e2e::config_file(&format!("db_timeout_ms = {DB_TIMEOUT_MS}\n"));
    let mut svc = Service::start_with(Options {
        database_url: Some(cluster.url()),
        extra_args: config_args,
        log_level: "debug".into(),
        ..Options::default()
    });
    let key = svc.create_principal("writer", &["tokenize", "detokenize"], &["*"]);
    let client = svc.client(&key);
    let probe = svc.anonymous();
    expect_status(&probe.get("/readyz"), 200);

    // The workload: 4 threads tokenizing fresh cards until told to stop.
    let load = Workload::start(&client, WORKERS);
    load.wait_for_acknowledged(20, Duration::from_secs(30));
    thread::sleep(Duration::from_millis(500));

    // The database crashes.
    let down_at = Instant::now();
    cluster.stop_immediate();
    let down_done = Instant::now();
    let ready_down = wait_for_status(&probe, "/readyz", 503, READY_DOWN_BOUND);
    expect_status(&probe.get("/healthz"), 200);
    assert!(svc.is_running(), "the service died with its database");
    // Reads fail fast as well, and closed.
    let (known_pan, known_token) = load
        .samples()
        .iter()
        .find_map(|s| s.token().map(|t| (s.pan.clone(), t.to_owned())))
        .unwrap();
    let read_started = Instant::now();
    let read = client.detokenize(&known_token, REASON);
    let read_took = read_started.elapsed();
    expect_error(&read, 503, "storage_unavailable", &[&known_pan]);
    assert!(
        read_took < FAIL_FAST_BOUND,
        "detokenize took {read_took:?} with the database down"
    );
    thread::sleep(OUTAGE.saturating_sub(down_done.elapsed()));
    let ready = probe.get("/readyz");
    assert_eq!(
        ready.status, 503,
        "/readyz while the database is down: {ready}"
    );
    expect_status(&probe.get("/healthz"), 200);
    assert!(svc.is_running(), "the service died with its database");

    // The database comes back (crash recovery, same port).
    let up_begin = Instant::now();
    cluster.start_again();
    let up_at = Instant::now();
    // recovery: from the database accepting connections again to /readyz 200.
    let recovery = wait_for_status(&probe, "/readyz", 200, RECOVERY_BOUND);
    let first_write = load.first_acknowledged(|s| s.started >= up_at, RECOVERY_BOUND) - up_at;
    thread::sleep(Duration::from_millis(1500));
    let samples = load.stop();
    assert!(svc.is_running(), "the service exited");

    // What the workload saw.
    let acked: Vec<(&str, &str, Instant)> = workload::acknowledged(&samples)
        .into_iter()
        .map(|(s, token)| (s.pan.as_str(), token, s.started))
        .collect();
    let failed_503 = workload::unavailable(&samples);
    let others = workload::others(&samples);
    let slowest_failure = samples
        .iter()
        .filter(|s| s.token().is_none())
        .map(Sample::elapsed)
        .max()
        .unwrap_or_default();
    // Requests sent while the database was certainly down.
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.started >= down_done && s.finished <= up_begin)
        .collect();
    // Acknowledged writes by when they were sent: before the crash, in
    // flight when it happened, while `pg_ctl start` was bringing the
    // database back (it accepts connections before pg_ctl says so), after.
    let before = acked.iter().filter(|a| a.2 < down_at).count();
    let at_crash = acked
        .iter()
        .filter(|a| a.2 >= down_at && a.2 < up_begin)
        .count();
    let at_restart = acked
        .iter()
        .filter(|a| a.2 >= up_begin && a.2 < up_at)
        .count();
    let after = acked.iter().filter(|a| a.2 >= up_at).count();

    // Every acknowledged card is stored with its audit event (same
    // transaction): checked in the database before any detokenize adds
    // events of its own.
    let tokens: Vec<String> = acked.iter().map(|a| format!("'{}'", a.1)).collect();
    let audited = svc.sql_i64(&format!(
        "SELECT COUNT(DISTINCT token) FROM audit_events \
         WHERE action = 'tokenize' AND token IN ({})",
        tokens.join(",")
    ));
    let stored = svc.sql_i64(&format!(
        "SELECT COUNT(*) FROM cards WHERE token IN ({})",
        tokens.join(",")
    ));

    // And every acknowledged token gives its card back.
    let mut lost = Vec::new();
    for (i, (pan, token, _)) in acked.iter().enumerate() {
        let clear = client.detokenize(token, REASON);
        if clear.status != 200 || clear.json["pan"] != *pan {
            lost.push(format!("{token}: {}", clear.status));
        } else if i % 5 == 0 {
            // Idempotency survived the crash too.
            let again = client.tokenize(TENANT, pan, 8, exp_year());
            expect_status(&again, 200);
            assert_eq!(again.json["token"], *token, "{again}");
        }
    }

    crate::report(&format!(
        "outage: acknowledged={} failed_503={failed_503} other={} lost={} recovery_ms={} \
         | acknowledged before_crash={before} in_flight_at_crash={at_crash} \
         during_pg_start={at_restart} after_restart={after} \
         | slowest_failure_ms={} readyz_503_after_ms={} db_down_ms={} pg_ctl_start_ms={} \
         first_write_after_restart_ms={} | db_timeout_ms={DB_TIMEOUT_MS} writers={WORKERS}",
        acked.len(),
        others.len(),
        lost.len(),
        ms(recovery),
        ms(slowest_failure),
        ms(ready_down),
        ms(up_at - down_at),
        ms(up_at - up_begin),
        ms(first_write),
    ));

    assert!(
        before > 0 && after > 0,
        "writes before and after the outage"
    );
    assert!(
        !during.is_empty() && failed_503 > 0,
        "no request was made while the database was down"
    );
    for s in &during {
        assert!(
            matches!(s.outcome, Outcome::Unavailable),
            "while the database was down, a request got {:?} after {:?}",
            s.outcome,
            s.elapsed()
        );
    }
    assert!(
        slowest_failure < FAIL_FAST_BOUND,
        "a failing request took {slowest_failure:?} (bound {FAIL_FAST_BOUND:?})"
    );
    assert!(
        samples.iter().all(|s| s.elapsed() < FAIL_FAST_BOUND),
        "a request took longer than {FAIL_FAST_BOUND:?}"
    );
    assert!(
        others.is_empty(),
        "{} responses were neither 2xx nor 503 storage_unavailable:\n{}",
        others.len(),
        others.join("\n")
    );
    assert_eq!(stored, acked.len() as i64, "acknowledged cards not stored");
    assert_eq!(
        audited,
        acked.len() as i64,
        "acknowledged cards not audited"
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged token(s) lost:\n{}",
        lost.len(),
        lost.join("\n")
    );

    // No card number in the cluster's files (heap, indexes, WAL, server
    // log) after a clean shutdown, nor in what the service printed.
    // The database's own directory: the template databases are never
    // written to.
    let db_oid =
        svc.sql_i64("SELECT oid::bigint FROM pg_database WHERE datname = current_database()");
    // Positive control: a number planted in clear in a table must be found
    // in the WAL and in the table's heap file.
    let canary = fresh_pan();
    svc.sql(&format!(
        "CREATE TABLE e2e_canary (note TEXT); INSERT INTO e2e_canary VALUES ('canary {canary}')"
    ));
    svc.kill();
    cluster.stop_fast();
    let mut pans: Vec<&str> = samples.iter().map(|s| s.pan.as_str()).collect();
    pans.push(&canary);
    let scan_started = Instant::now();
    let mut findings = scan_dir(&cluster.data_dir().join("pg_wal"), &pans);
    findings.extend(scan_dir(
        &cluster.data_dir().join("base").join(db_oid.to_string()),
        &pans,
    ));
    findings.extend(scan_dir(&cluster.data_dir().join("global"), &pans));
    findings.extend(scan_bytes("server log", cluster.log().as_bytes(), &pans));
    findings.extend(scan_dir(svc.data_dir(), &pans));
    let captured = svc.captured();
    findings.extend(scan_bytes(
        "captured stdout",
        &captured.stdout_bytes(),
        &pans,
    ));
    findings.extend(scan_bytes(
        "captured stderr",
        &captured.stderr_bytes(),
        &pans,
    ));
    let (planted, leaks): (Vec<_>, Vec<_>) = findings.into_iter().partition(|f| f.pan == canary);
    assert!(
        planted.iter().any(|f| f.location.contains("pg_wal"))
            && planted.iter().any(|f| f.location.contains("/base/")),
        "the scan of the cluster's files missed a planted number: {planted:?}"
    );
    assert_no_leaks(&leaks);
    crate::report(&format!(
        "outage: no card number in the cluster's files (WAL, heap, indexes, log) \
         nor the service's output: {} numbers, scanned in {} ms",
        pans.len() - 1,
        ms(scan_started.elapsed())
    ));
}
