//! Failing over to a synchronous standby under a write workload: the
//! service is started with a libpq-style URL naming a primary and its
//! standby (`postgres://postgres@127.0.0.1:P1,127.0.0.1:P2/postgres`), the
//! primary crashes (`pg_ctl stop -m immediate`), the standby is promoted
//! (`pg_ctl promote`), and the same service process must find the new
//! primary by itself, resume writing, and give back every token it
//! acknowledged: with `synchronous_commit = on` and a synchronous standby,
//! an acknowledged commit is on the standby too.
//!
//! Always on PostgreSQL (two throwaway clusters: initdb, then
//! `pg_basebackup -R`), whatever `CARDVAULT_TEST_BACKEND` says.

use std::thread;
use std::time::{Duration, Instant};

use e2e::{Options, PgReplicaPair, Service};

use crate::workload::{self, ms, Outcome, Sample, Workload};
use crate::{exp_year, expect_status, REASON, TENANT};

/// `db_timeout_ms` of the service under test.
const DB_TIMEOUT_MS: u64 = 1000;
/// Every request must come back within this while there is no primary.
const FAIL_FAST_BOUND: Duration = Duration::from_secs(10);
/// How long there is no primary before the standby is promoted.
const NO_PRIMARY: Duration = Duration::from_secs(2);
/// Writes must succeed again within this of the promotion.
const RESUME_BOUND: Duration = Duration::from_secs(30);
/// The standby must be streaming synchronously within this.
const REPLICATION_BOUND: Duration = Duration::from_secs(60);
const WRITERS: usize = 4;

/// Polls `count` until it is positive; panics after `bound`.
fn eventually(what: &str, bound: Duration, count: impl Fn() -> i64) {
    let start = Instant::now();
    while count() <= 0 {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn failover_to_a_synchronous_standby_loses_no_acknowledged_token() {
    let pair = PgReplicaPair::start(REPLICATION_BOUND);
    let (_config, config_args) = e2e::config_file(&format!("db_timeout_ms = {DB_TIMEOUT_MS}\n"));
    let mut svc = Service::start_with(Options {
        database_url: Some(pair.url()),
        extra_args: config_args,
        log_level: "debug".into(),
        ..Options::default()
    });
    // (The CLI goes through the same host list: migrations and the
    // principal land on the primary.)
    let key = svc.create_principal("writer", &["tokenize", "detokenize"], &["*"]);
    let client = svc.client(&key);
    let probe = svc.anonymous();
    expect_status(&probe.get("/readyz"), 200);
    let on_primary = |cluster: &e2e::PgCluster, name: &str| {
        cluster.sql_i64(&format!(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = '{name}'"
        ))
    };
    eventually("the service's pool on the primary", FAIL_FAST_BOUND, || {
        on_primary(&pair.primary, "cardvault")
    });
    assert_eq!(
        on_primary(&pair.standby, "cardvault"),
        0,
        "the service connected to the standby"
    );
    // Over TLS, as in production (`sslmode=require` in the URL): the
    // tracker's probe of the standby once hung closing its TLS connection.
    assert_eq!(
        pair.primary.sql_i64(
            "SELECT COUNT(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name IN ('cardvault', 'cardvault-primary-tracker') AND NOT s.ssl"
        ),
        0,
        "a connection of the service without TLS"
    );
    eventually("the primary tracker's connection", FAIL_FAST_BOUND, || {
        on_primary(&pair.primary, "cardvault-primary-tracker")
    });

    let load = Workload::start(&client, WRITERS);
    load.wait_for_acknowledged(50, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(500));

    // The primary crashes; for a while there is no primary at all.
    let kill_at = Instant::now();
    pair.primary.stop_immediate();
    let killed = Instant::now();
    thread::sleep(NO_PRIMARY);
    assert!(svc.is_running(), "the service died with its primary");
    let promote_at = Instant::now();
    pair.standby.promote();
    let promoted = Instant::now();

    // The same process finds the new primary and writes again.
    let first_after = load.first_acknowledged(|s| s.finished >= promote_at, RESUME_BOUND);
    thread::sleep(Duration::from_millis(2000));
    let samples = load.stop();
    assert!(svc.is_running(), "the service exited");
    expect_status(&probe.get("/readyz"), 200);
    // The pool and the principal listener moved to the new primary.
    eventually(
        "the service's pool on the new primary",
        FAIL_FAST_BOUND,
        || on_primary(&pair.standby, "cardvault"),
    );
    eventually(
        "the principal listener on the new primary",
        FAIL_FAST_BOUND,
        || on_primary(&pair.standby, "cardvault-principal-listener"),
    );

    let acked = workload::acknowledged(&samples);
    let last_before = acked
        .iter()
        .filter(|(s, _)| s.finished <= kill_at)
        .map(|(s, _)| s.finished)
        .max()
        .expect("writes before the failover");
    let before_kill = acked.iter().filter(|(s, _)| s.finished <= kill_at).count();
    let in_flight = acked
        .iter()
        .filter(|(s, _)| s.finished > kill_at && s.finished < promote_at)
        .count();
    let after = acked
        .iter()
        .filter(|(s, _)| s.finished >= promote_at)
        .count();
    let failed_503 = workload::unavailable(&samples);
    let others = workload::others(&samples);
    let slowest = samples
        .iter()
        .map(Sample::elapsed)
        .max()
        .unwrap_or_default();
    // Requests made while there was certainly no primary.
    let without_primary: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.started >= killed && s.finished <= promote_at)
        .collect();

    // On the new primary, in its tables: every acknowledged card...
    let tokens: Vec<String> = acked.iter().map(|(_, t)| format!("'{t}'")).collect();
    let stored = pair.standby.sql_i64(&format!(
        "SELECT COUNT(*) FROM cards WHERE token IN ({})",
        tokens.join(",")
    ));
    // ... and, through the service, its number.
    let mut verified = 0usize;
    let mut lost = Vec::new();
    for (i, (sample, token)) in acked.iter().enumerate() {
        let clear = client.detokenize(token, REASON);
        if clear.status == 200 && clear.json["pan"] == *sample.pan {
            verified += 1;
            if i % 10 == 0 {
                // A retry of an acknowledged tokenize gives the same token.
                let again = client.tokenize(TENANT, &sample.pan, 8, exp_year());
                expect_status(&again, 200);
                assert_eq!(again.json["token"], **token, "{again}");
            }
        } else {
            lost.push(format!("{token}: {}", clear.status));
        }
    }
    // A retry of a request that failed during the failover is answered
    // (one token per card, whether or not the failed attempt committed).
    let mut retried_existing = 0;
    for s in samples
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Unavailable))
        .take(20)
    {
        let again = client.tokenize(TENANT, &s.pan, 8, exp_year());
        assert!(
            again.status == 200 || again.status == 201,
            "retry of a failed tokenize: {again}"
        );
        let token = again.str("token");
        let second = client.tokenize(TENANT, &s.pan, 8, exp_year());
        expect_status(&second, 200);
        assert_eq!(second.str("token"), token, "{second}");
        if again.status == 200 {
            retried_existing += 1;
        }
    }

    let outage = first_after.duration_since(last_before);
    crate::report(&format!(
        "failover: acknowledged={} verified={verified} lost={} outage_ms={} \
         | acknowledged before_kill={before_kill} in_flight_at_kill={in_flight} \
         after_promotion={after} failed_503={failed_503} other={} \
         retried_503={} of_which_already_stored={retried_existing} \
         | no_primary_ms={} pg_ctl_promote_ms={} first_write_after_promote_ms={} \
         slowest_request_ms={} | db_timeout_ms={DB_TIMEOUT_MS} writers={WRITERS}",
        acked.len(),
        lost.len(),
        ms(outage),
        others.len(),
        failed_503.min(20),
        ms(promote_at - kill_at),
        ms(promoted - promote_at),
        ms(first_after.saturating_duration_since(promoted)),
        ms(slowest),
    ));

    assert!(
        lost.is_empty(),
        "{} acknowledged token(s) lost:\n{}",
        lost.len(),
        lost.join("\n")
    );
    assert_eq!(verified, acked.len());
    assert_eq!(
        stored,
        acked.len() as i64,
        "acknowledged cards missing on the new primary"
    );
    assert!(
        before_kill > 0 && after > 0,
        "writes before the kill and after the promotion"
    );
    // The outage is seen as 503s: requests made entirely while there was
    // no primary, or (when every writer was inside a request spanning the
    // kill or the promotion, as on a loaded machine) some that failed.
    assert!(
        !without_primary.is_empty() || failed_503 > 0,
        "no request failed while there was no primary"
    );
    for s in &without_primary {
        assert!(
            matches!(s.outcome, Outcome::Unavailable),
            "without a primary, a request got {:?}",
            s.outcome
        );
    }
    assert!(
        others.is_empty(),
        "{} responses were neither 2xx nor 503 storage_unavailable:\n{}",
        others.len(),
        others.join("\n")
    );
    assert!(
        slowest < FAIL_FAST_BOUND,
        "a request took {slowest:?} (bound {FAIL_FAST_BOUND:?})"
    );
    svc.kill();
}
