//! Several `tokenizer serve` processes on one PostgreSQL database, as in a
//! deployment behind a load balancer: they agree on keys, tokens, deletions
//! and revocations from the very next request.
//!
//! This property exists only on PostgreSQL, so these tests always run on a
//! PostgreSQL database of their own (on the server of `CARDVAULT_TEST_PG_URL`),
//! whatever `CARDVAULT_TEST_BACKEND` says.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use e2e::{
    fresh_pan, run_cli_on, temp_data_dir, Captured, Client, Options, PgDatabase, Resp, Service,
};

use crate::{exp_year, expect_error, expect_status, token_for, REASON, TENANT, TEST_CARDS};

const INSTANCES: usize = 3;

/// Three instances on one database, sharing one data dir (for the KEK file).
struct Fleet {
    // Drop order: processes, then the directory, then the database.
    services: Vec<Service>,
    _dir: tempfile::TempDir,
    db: PgDatabase,
}

impl Fleet {
    /// One database, one KEK, and three instances started at the same time
    /// (so their first start races on migrations and key generation).
    fn start() -> Fleet {
        Fleet::start_with(INSTANCES, &[])
    }

    /// `instances` instances with these extra `serve` arguments.
    fn start_with(instances: usize, extra_args: &[&str]) -> Fleet {
        let db = PgDatabase::create();
        let dir = temp_data_dir();
        generate_kek(dir.path(), &db);
        let barrier = Arc::new(Barrier::new(instances));
        let starts: Vec<_> = (0..instances)
            .map(|_| {
                let path = dir.path().to_path_buf();
                let opts = Options {
                    database_url: Some(db.url().to_string()),
                    extra_args: extra_args.iter().map(|s| (*s).into()).collect(),
                    ..Options::default()
                };
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    Service::start_in_dir(&path, opts)
                })
            })
            .collect();
        let services: Vec<Service> = starts
            .into_iter()
            .map(|h| h.join().expect("an instance failed to start"))
            .collect();
        Fleet {
            services,
            _dir: dir,
            db,
        }
    }

    /// `principal create` (CLI on the shared database); one client per
    /// instance with that key.
    fn principal(&self, name: &str, roles: &[&str]) -> Vec<Client> {
        let key = self.services[0].create_principal(name, roles, &["*"]);
        self.services.iter().map(|svc| svc.client(&key)).collect()
    }

    fn count(&self, query: &str) -> i64 {
        self.services[0].sql_i64(query)
    }
}

/// `tokenizer kek generate` into `dir`, for the database `db`.
fn generate_kek(dir: &std::path::Path, db: &PgDatabase) {
    let kek = run_cli_on(
        dir,
        Some(db.url()),
        &["kek", "generate"],
        &Captured::default(),
    );
    assert!(kek.success(), "`kek generate` failed: {kek:?}");
}

#[test]
fn instances_share_one_set_of_keys() {
    let fleet = Fleet::start();
    assert_eq!(
        fleet.count("SELECT COUNT(*) FROM vault_keys WHERE purpose = 'dek'"),
        1,
        "three instances starting together made more than one data key"
    );
    assert_eq!(
        fleet.count("SELECT COUNT(*) FROM vault_keys WHERE purpose = 'fingerprint'"),
        1,
        "three instances starting together made more than one fingerprint key"
    );
    assert!(fleet.db.name().starts_with("cv_e2e_"));
}

/// 12 threads round-robin over the instances send the same new card at the
/// same moment: one token, one 201.
#[test]
fn racing_instances_give_exactly_one_token() {
    const THREADS: usize = 12;
    let fleet = Fleet::start();
    let clients = fleet.principal("racer", &["tokenize", "detokenize"]);
    let year = exp_year();

    let mut slowest = std::time::Duration::ZERO;
    for round in 0..4 {
        let pan = fresh_pan();
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let client = clients[i % INSTANCES].clone();
                let barrier = Arc::clone(&barrier);
                let pan = pan.clone();
                thread::spawn(move || {
                    barrier.wait();
                    let started = std::time::Instant::now();
                    let resp = client.tokenize(TENANT, &pan, 9, year);
                    (i % INSTANCES, resp, started.elapsed())
                })
            })
            .collect();
        let results: Vec<(usize, Resp, std::time::Duration)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        slowest = results
            .iter()
            .map(|r| r.2)
            .max()
            .unwrap_or_default()
            .max(slowest);
        let responses: Vec<(usize, Resp)> = results.into_iter().map(|(i, r, _)| (i, r)).collect();
        let summary: Vec<String> = responses
            .iter()
            .map(|(i, r)| format!("instance {i}: {r}"))
            .collect();
        let created = responses.iter().filter(|(_, r)| r.status == 201).count();
        let existing = responses.iter().filter(|(_, r)| r.status == 200).count();
        assert_eq!(
            (created, existing),
            (1, THREADS - 1),
            "round {round}: want one 201 and {} 200s:\n{}",
            THREADS - 1,
            summary.join("\n")
        );
        let token = responses[0].1.str("token");
        assert!(
            responses
                .iter()
                .all(|(_, r)| r.json["token"] == token.as_str()),
            "round {round}: different tokens for one card:\n{}",
            summary.join("\n")
        );
        let rows = fleet.count(&format!(
            "SELECT COUNT(*) FROM cards WHERE token = '{token}'"
        ));
        assert_eq!(rows, 1, "round {round}: the token's row");
        for client in &clients {
            let clear = client.detokenize(&token, REASON);
            expect_status(&clear, 200);
            assert_eq!(clear.json["pan"], pan.as_str());
        }
    }
    // One row per card: 4 rounds, 4 cards.
    assert_eq!(fleet.count("SELECT COUNT(*) FROM cards"), 4);
    crate::report(&format!(
        "multi_instance: {INSTANCES} instances, 4 rounds of {THREADS} racing requests for one new card: \
         1 created (201) + {} existing (200) per round, 1 token and 1 row per card, \
         slowest racing request {} ms",
        THREADS - 1,
        slowest.as_millis()
    ));
}

/// What one instance stores, every other one reads, and the same card is
/// the same token whichever instance is asked.
#[test]
fn a_token_from_one_instance_works_on_the_others() {
    let fleet = Fleet::start();
    let clients = fleet.principal("ops", &["tokenize", "detokenize"]);
    let year = exp_year();

    for (i, (pan, brand)) in TEST_CARDS.iter().enumerate().take(9) {
        let origin = i % INSTANCES;
        let created = clients[origin].tokenize(TENANT, pan, 3, year);
        expect_status(&created, 201);
        let token = created.str("token");
        for (j, client) in clients.iter().enumerate() {
            let clear = client.detokenize(&token, REASON);
            expect_status(&clear, 200);
            assert_eq!(
                clear.json["pan"], *pan,
                "created on instance {origin}, detokenized on {j}"
            );
            let meta = client.metadata(&token);
            expect_status(&meta, 200);
            assert_eq!(meta.json["brand"], *brand);
            assert_eq!(meta.json["fingerprint"], created.json["fingerprint"]);
            let again = client.tokenize(TENANT, pan, 3, year);
            expect_status(&again, 200);
            assert_eq!(again.json["token"], token.as_str(), "instance {j}");
        }
    }
}

/// A delete through one instance is a 404 on every other one at the next
/// request.
#[test]
fn a_delete_is_seen_by_every_instance_at_once() {
    let fleet = Fleet::start();
    let clients = fleet.principal("ops", &["tokenize", "detokenize"]);

    for deleter in 0..INSTANCES {
        let pan = fresh_pan();
        let token = token_for(&clients[(deleter + 1) % INSTANCES], TENANT, &pan);
        // Every instance knows it (and has read it) before the delete.
        for client in &clients {
            expect_status(&client.metadata(&token), 200);
        }
        expect_status(&clients[deleter].delete_token(&token), 204);
        for (j, client) in clients.iter().enumerate() {
            let resp = client.metadata(&token);
            assert_eq!(
                resp.status, 404,
                "deleted on instance {deleter}, still there on {j}: {resp}"
            );
            expect_error(&resp, 404, "not_found", &[&pan]);
            expect_error(
                &client.detokenize(&token, REASON),
                404,
                "not_found",
                &[&pan],
            );
        }
        // Deleted once, gone for everyone: a second delete anywhere is 404.
        expect_error(
            &clients[(deleter + 2) % INSTANCES].delete_token(&token),
            404,
            "not_found",
            &[&pan],
        );
    }
}

/// `tokenizer principal revoke` (the CLI on the shared database): every
/// instance refuses the key at the very next request, although each one had
/// just accepted it (and cached its hash check).
#[test]
fn a_revocation_is_refused_by_every_instance_at_once() {
    let fleet = Fleet::start();
    let revoked = fleet.principal("soon-revoked", &["tokenize", "detokenize"]);
    let kept = fleet.principal("kept", &["tokenize", "detokenize"]);
    let token = token_for(&kept[0], TENANT, &fresh_pan());

    for (j, client) in revoked.iter().enumerate() {
        for _ in 0..2 {
            let resp = client.metadata(&token);
            assert_eq!(resp.status, 200, "instance {j} before revoking: {resp}");
        }
    }
    fleet.services[1].revoke("soon-revoked");
    for (j, client) in revoked.iter().enumerate() {
        let resp = client.metadata(&token);
        assert_eq!(
            resp.status, 401,
            "instance {j} accepted a revoked key on the next request: {resp}"
        );
        expect_error(&resp, 401, "unauthenticated", &[]);
        expect_error(
            &client.tokenize(TENANT, &fresh_pan(), 1, exp_year()),
            401,
            "unauthenticated",
            &[],
        );
    }
    // Only that principal.
    for client in &kept {
        expect_status(&client.metadata(&token), 200);
    }
}

/// Detokenize `token` from `threads` threads per client until `for_`
/// passes; (answers 200, answers 429, seconds from the first request to the
/// last answer).
fn hammer(clients: &[Client], token: &str, threads: usize, for_: Duration) -> (usize, usize, f64) {
    let start = Instant::now();
    let handles: Vec<_> = clients
        .iter()
        .flat_map(|c| (0..threads).map(move |_| c.clone()))
        .map(|client| {
            let token = token.to_owned();
            thread::spawn(move || {
                let (mut ok, mut limited) = (0, 0);
                while start.elapsed() < for_ {
                    let r = client.detokenize(&token, REASON);
                    match r.status {
                        200 => ok += 1,
                        429 => {
                            assert_eq!(r.error_code(), Some("rate_limited"), "{r}");
                            limited += 1;
                        }
                        _ => panic!("detokenize under a shared limit: {r}"),
                    }
                }
                (ok, limited)
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for h in handles {
        let (o, l) = h.join().unwrap();
        ok += o;
        limited += l;
    }
    (ok, limited, start.elapsed().as_secs_f64())
}

#[test]
fn instances_share_the_detokenize_rate_limit_of_a_principal() {
    // 600 a minute (10/s), a burst of 20, for the principal; on two
    // instances: in memory each would allow that much on its own.
    const PER_MINUTE: f64 = 600.0;
    const BURST: f64 = 20.0;
    let fleet = Fleet::start_with(
        2,
        &[
            "--detokenize-rate-per-principal",
            "600",
            "--detokenize-burst-per-principal",
            "20",
            // The anomaly rule would fire on nothing here (one token).
        ],
    );
    let clients = fleet.principal("reader", &["tokenize", "detokenize"]);
    let token = token_for(&clients[0], TENANT, TEST_CARDS[0].0);
    let (ok, limited, secs) = hammer(&clients, &token, 2, Duration::from_secs(8));
    let allowed = BURST + PER_MINUTE / 60.0 * secs;
    crate::report(&format!(
        "shared rate limit (2 instances, 600/min burst 20, {secs:.1} s): answered 200={ok} \
         429={limited} allowed_by_the_limit={allowed:.0} ratio={:.3} \
         (two separate in-memory limits would allow {:.0})",
        ok as f64 / allowed,
        2.0 * allowed
    ));
    assert!(limited > 0, "the clients must have hit the limit");
    assert!(
        (ok as f64) <= allowed * 1.1,
        "{ok} detokenizes in {secs:.1} s on two instances: the limit allows {allowed:.0}"
    );
    // Below: the clients may stall for a while on a loaded machine (the
    // bound that matters is the one above).
    assert!(
        (ok as f64) >= allowed * 0.8,
        "{ok} detokenizes in {secs:.1} s: the shared limit must still allow {allowed:.0}"
    );
    // Refusals are in the audit trail, with the scope.
    assert!(
        fleet.count(
            "SELECT COUNT(*) FROM audit_events WHERE action = 'detokenize' AND outcome = 'denied'"
        ) >= i64::try_from(limited).unwrap()
    );
}

#[test]
fn a_restart_does_not_reset_a_shared_rate_limit() {
    // 1 a minute, a burst of 3: after the burst, one token per 60 s (two
    // restarts on a loaded machine stay well inside that).
    let mut fleet = Fleet::start_with(
        2,
        &[
            "--detokenize-rate-per-principal",
            "1",
            "--detokenize-burst-per-principal",
            "3",
        ],
    );
    let key = fleet.services[0].create_principal("reader", &["tokenize", "detokenize"], &["*"]);
    let client = |fleet: &Fleet, i: usize| fleet.services[i].client(&key);
    let token = token_for(&client(&fleet, 0), TENANT, TEST_CARDS[0].0);
    for _ in 0..3 {
        expect_status(&client(&fleet, 0).detokenize(&token, REASON), 200);
    }
    // The other instance sees the bucket empty.
    expect_error(
        &client(&fleet, 1).detokenize(&token, REASON),
        429,
        "rate_limited",
        &[],
    );
    // A restart of either forgets nothing (in memory, each would allow
    // its burst of 3 again).
    fleet.services[1].restart();
    expect_error(
        &client(&fleet, 1).detokenize(&token, REASON),
        429,
        "rate_limited",
        &[],
    );
    fleet.services[0].restart();
    expect_error(
        &client(&fleet, 0).detokenize(&token, REASON),
        429,
        "rate_limited",
        &[],
    );
}

#[test]
fn the_anomaly_rule_counts_the_distinct_tokens_of_all_instances_and_fires_once() {
    // Fires above 5 distinct tokens in a 300 s window (no baseline yet):
    // 3 on each of two instances is 6 in all, which neither instance would
    // see alone.
    let fleet = Fleet::start_with(2, &["--detokenize-anomaly-min-distinct", "5"]);
    let clients = fleet.principal("reader", &["tokenize", "detokenize"]);
    let tokens: Vec<String> = (0..6)
        .map(|_| token_for(&clients[0], TENANT, &fresh_pan()))
        .collect();
    for (i, token) in tokens.iter().enumerate() {
        let r = clients[i % 2].detokenize(token, REASON);
        expect_status(&r, 200);
    }
    // Again, on both: no new distinct token, no second event.
    for token in &tokens {
        expect_status(&clients[1].detokenize(token, REASON), 200);
    }
    let events =
        fleet.count("SELECT COUNT(*) FROM audit_events WHERE action = 'detokenize_anomaly'");
    assert_eq!(events, 1, "one anomaly for the fleet");
    let detail = fleet.services[0]
        .sql_strings("SELECT detail FROM audit_events WHERE action = 'detokenize_anomaly'");
    assert!(
        detail[0].starts_with("distinct_tokens=6 threshold=5 "),
        "{detail:?}"
    );
}

#[test]
fn instances_share_the_failed_authentications_and_the_blocks_of_a_source() {
    // 6 failed authentications a minute per source, then blocked for 60 s:
    // 3 on each of two instances empties the fleet's budget (each alone
    // would still have 3 left).
    let mut fleet = Fleet::start_with(
        2,
        &["--auth-failures-per-source", "6", "--auth-block-secs", "60"],
    );
    let key = fleet.services[0].create_principal("checkout", &["tokenize"], &["*"]);
    let mut bad = key.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    let year = exp_year();
    let attempt = |fleet: &Fleet, i: usize| {
        fleet.services[i]
            .client(&bad)
            .tokenize(TENANT, TEST_CARDS[0].0, 12, year)
    };
    for i in 0..6 {
        expect_status(&attempt(&fleet, i % 2), 401);
    }
    // The seventh failure, on the first instance, starts the block.
    expect_status(&attempt(&fleet, 0), 401);
    expect_error(&attempt(&fleet, 0), 429, "rate_limited", &[]);
    // The other instance refuses the source too, within about a second
    // (it reads the fleet's blocks every second).
    let blocked_within = |fleet: &Fleet, i: usize| {
        let start = Instant::now();
        loop {
            let r = attempt(fleet, i);
            if r.status == 429 {
                assert_eq!(r.error_code(), Some("rate_limited"), "{r}");
                return start.elapsed();
            }
            expect_status(&r, 401);
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "instance {i} does not refuse the blocked source"
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    let other = blocked_within(&fleet, 1);
    assert_eq!(
        fleet.count("SELECT COUNT(*) FROM audit_events WHERE action = 'source_blocked'"),
        1,
        "one block for the fleet"
    );
    // A restart keeps the block.
    fleet.services[1].restart();
    let after_restart = blocked_within(&fleet, 1);
    crate::report(&format!(
        "shared source block (2 instances, 6 failures/min): other instance refused after {} ms, \
         after a restart after {} ms",
        other.as_millis(),
        after_restart.as_millis()
    ));
}

/// Two instances with data directories of their own (one KEK): after one
/// rotates the audit signing key, the other's `audit-verify.pub` lists
/// both generations too, written by its periodic key refresh, so an
/// auditor may take the key file of any host.
#[test]
fn every_instance_rewrites_its_verification_key_file_after_a_signing_key_rotation() {
    let db = PgDatabase::create();
    let (a_dir, b_dir) = (temp_data_dir(), temp_data_dir());
    generate_kek(a_dir.path(), &db);
    std::fs::copy(a_dir.path().join("kek.key"), b_dir.path().join("kek.key")).unwrap();
    let opts = || Options {
        database_url: Some(db.url().to_string()),
        extra_args: vec!["--reencrypt-interval-ms".into(), "200".into()],
        ..Options::default()
    };
    let a = Service::start_in_dir(a_dir.path(), opts());
    let b = Service::start_in_dir(b_dir.path(), opts());
    let read =
        |svc: &Service| std::fs::read_to_string(svc.data_dir().join("audit-verify.pub")).unwrap();
    let before = read(&b);
    assert_eq!(read(&a), before);
    assert_eq!(before.lines().count(), 1, "{before}");

    let key_admin = a.principal_client("key-admin", &["key_admin"], &["*"]);
    let rotated = key_admin.post_json(
        "/v1/admin/keys/audit_signing/rotate",
        &serde_json::json!({}),
    );
    expect_status(&rotated, 200);
    let both = format!(
        "{}{}\n",
        before,
        rotated.json["public_key"].as_str().unwrap()
    );
    assert_eq!(read(&a), both, "the rotating instance");
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(&b) != both {
        assert!(
            Instant::now() < deadline,
            "the other instance's key file after 10 s: {}",
            read(&b)
        );
        thread::sleep(Duration::from_millis(50));
    }
}
