//! Audit append throughput under concurrent tokenize load, through the real
//! `Vault` and store (every tokenize commits its card and its chained audit
//! event in one durable transaction), then verification of the stored trail.
//!
//! ```sh
//! cargo run --release -p cardvault-vault --example audit_bench -- sqlite 16 5
//! cargo run --release -p cardvault-vault --example audit_bench -- postgres 16 5
//! ```
//! Arguments: backend (`sqlite` | `postgres`), concurrent clients, seconds.
//! PostgreSQL: a fresh database on `CARDVAULT_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped afterwards.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection as _, Executor as _};
use vault::access::{Role, TenantScope};
use vault::store::{self, Store, StoreConfig};
use vault::{CardInput, Principal, RequestContext, Vault};
use zeroize::Zeroizing;

/// A test-BIN (411111) card number with a correct Luhn digit.
fn test_pan(n: u64) -> String {
    vault::pan::with_check_digit(&format!("411111{:09}", n % 1_000_000_000)).unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args.get(1).map_or("sqlite", String::as_str).to_owned();
    let clients: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(16);
    let seconds: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5);

    let dir = tempfile::tempdir().unwrap();
    let admin = std::env::var("CARDVAULT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let db_name = format!("cv_bench_{}", std::process::id());
    let url = match backend.as_str() {
        "sqlite" => store::sqlite_url(&dir.path().join("bench.db")),
        "postgres" => {
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .expect("PostgreSQL");
            conn.execute(format!("CREATE DATABASE {db_name}").as_str())
                .await
                .unwrap();
            format!("{}/{db_name}", admin.rsplit_once('/').unwrap().0)
        }
        other => panic!("unknown backend {other}"),
    };
    let store: Arc<dyn Store> = store::open(&StoreConfig {
        url: url.clone(),
        migrate: true,
        op_timeout: Duration::from_secs(30),
        max_connections: 32,
    })
    .await
    .unwrap();
    let kek = hsm_shim::SoftwareKek::generate(&dir.path().join("kek.key")).unwrap();
    let vault = Arc::new(Vault::open(store.clone(), Arc::new(kek)).await.unwrap());
    let ctx = RequestContext {
        principal: Principal {
            id: "bench".into(),
            name: "bench".into(),
            roles: [Role::Tokenize].into_iter().collect::<BTreeSet<_>>(),
            tenants: TenantScope::All,
        },
        source: "bench".into(),
        request_id: "bench".into(),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (vault, ctx, stop, done) = (vault.clone(), ctx.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let card = CardInput {
                        pan: Zeroizing::new(test_pan(n)),
                        exp_month: 12,
                        exp_year: 2035,
                        cardholder_name: None,
                        cvc: None,
                    };
                    let t = Instant::now();
                    vault.tokenize(&ctx, "bench", card).await.unwrap();
                    latencies.push(t.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                    n += clients;
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let total = done.load(Ordering::Relaxed);
    println!(
        "{backend}: {clients} clients, {total} tokenize+audit commits in {elapsed:.1} s = {:.0}/s (p50 {:?}, p99 {:?})",
        total as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );

    // Sign a checkpoint, read the whole trail back and verify it.
    vault.checkpoint().await.unwrap();
    let t = Instant::now();
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = store.chained_events(after, 10_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        entries.extend(page);
    }
    let read = t.elapsed().as_secs_f64();
    let key = audit::VerifyingKey::parse(&vault.audit_public_key()).unwrap();
    let t = Instant::now();
    let report = audit::verify_trail(&entries, store.checkpoints().await.unwrap(), &key).unwrap();
    let verify = t.elapsed().as_secs_f64();
    println!(
        "{backend}: read {} chained entries in {read:.2} s, verified in {verify:.3} s = {:.0} entries/s ({} checkpoints)",
        report.entries,
        report.entries as f64 / verify,
        report.checkpoints
    );

    store.close().await;
    if backend == "postgres" {
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        conn.execute(format!("DROP DATABASE {db_name} WITH (FORCE)").as_str())
            .await
            .unwrap();
    }
}
