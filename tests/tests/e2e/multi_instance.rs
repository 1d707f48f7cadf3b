//! Several `tokenizer serve` processes on one PostgreSQL database, as in a
//! deployment behind a load balancer: they agree on keys, tokens, deletions
//! and revocations from the very next request.
//!
//! This property exists only on PostgreSQL, so these tests always run on a
//! PostgreSQL database of their own (on the server of `CARDVAULT_TEST_PG_URL`),
//! whatever `CARDVAULT_TEST_BACKEND` says.

use std::sync::{Arc, Barrier};
use std::thread;

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
        let db = PgDatabase::create();
        let dir = temp_data_dir();
        let kek = run_cli_on(
            dir.path(),
            Some(db.url()),
            &["kek", "generate"],
            &Captured::default(),
        );
        assert!(kek.success(), "`kek generate` failed: {kek:?}");
        let barrier = Arc::new(Barrier::new(INSTANCES));
        let starts: Vec<_> = (0..INSTANCES)
            .map(|_| {
                let path = dir.path().to_path_buf();
                let opts = Options {
                    database_url: Some(db.url().to_string()),
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
