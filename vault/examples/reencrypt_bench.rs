//! Re-encryption throughput: seed N cards through the vault's batch path
//! (`tokenize_many`: 1000 cards sealed, then inserted by the store in
//! multi-row statements with their audit events, one transaction per
//! batch), rotate the DEK and the fingerprint key, run the re-encryption pass
//! to completion and report records per second; then check a sample of
//! tokens still detokenizes to its card.
//!
//! ```sh
//! cargo run --release -p cardvault-vault --example reencrypt_bench -- sqlite 100000
//! cargo run --release -p cardvault-vault --example reencrypt_bench -- postgres 1000000 2000
//! ```
//! Arguments: backend (`sqlite` | `postgres`), number of cards, batch size
//! of the pass (default 1000). PostgreSQL: a fresh database on
//! `CARDVAULT_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped afterwards.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection as _, Executor as _};
use vault::access::{Role, TenantScope};
use vault::store::{self, Store, StoreConfig};
use vault::{Actor, CardInput, CryptoPeriods, Principal, RequestContext, Vault, MAX_BATCH};
use zeroize::Zeroizing;

/// A test-BIN (411111) card number with a correct Luhn digit.
fn test_pan(n: u64) -> String {
    vault::pan::with_check_digit(&format!("411111{:09}", n % 1_000_000_000)).unwrap_or_default()
}

fn card(n: u64) -> CardInput {
    CardInput {
        pan: Zeroizing::new(test_pan(n)),
        exp_month: 12,
        exp_year: 2035,
        cardholder_name: None,
        cvc: None,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args.get(1).map_or("sqlite", String::as_str).to_owned();
    let n: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let batch: u32 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1000);

    let dir = tempfile::tempdir().unwrap();
    let admin = std::env::var("CARDVAULT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let db_name = format!("cv_reencrypt_bench_{}", std::process::id());
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
        op_timeout: Duration::from_secs(120),
        max_connections: 8,
    })
    .await
    .unwrap();
    let kek = hsm_shim::SoftwareKek::generate(&dir.path().join("kek.key")).unwrap();
    let vault = Arc::new(Vault::open(store.clone(), Arc::new(kek)).await.unwrap());
    let ctx = RequestContext {
        principal: Principal {
            id: "bench".into(),
            name: "bench".into(),
            roles: [Role::Tokenize, Role::Detokenize]
                .into_iter()
                .collect::<BTreeSet<_>>(),
            tenants: TenantScope::All,
        },
        source: "bench".into(),
        request_id: "bench".into(),
    };

    // Seed: batches of MAX_BATCH cards, two in flight (the audit head lock
    // serialises their commits anyway).
    let started = Instant::now();
    let per = MAX_BATCH as u64;
    let mut sample = Vec::new();
    let mut next = 0u64;
    while next < n {
        let mut tasks = Vec::new();
        for _ in 0..2 {
            if next >= n {
                break;
            }
            let (from, to) = (next, (next + per).min(n));
            next = to;
            let (vault, ctx) = (vault.clone(), ctx.clone());
            tasks.push(tokio::spawn(async move {
                let infos = vault
                    .tokenize_many(&ctx, "bench", (from..to).map(card).collect())
                    .await
                    .unwrap();
                (from, infos[0].as_ref().unwrap().token.clone())
            }));
        }
        for t in tasks {
            sample.push(t.await.unwrap());
        }
    }
    let seed = started.elapsed().as_secs_f64();
    println!(
        "{backend}: seeded {n} cards in {seed:.1} s ({:.0} cards/s)",
        n as f64 / seed
    );

    vault.rotate_dek(Actor::Local, true).await.unwrap();
    let status = vault.key_status(CryptoPeriods::default()).await.unwrap();
    assert_eq!(status.remaining, n);

    let started = Instant::now();
    let (mut moved, mut batches, mut slowest) = (0u64, 0u64, Duration::ZERO);
    loop {
        let t = Instant::now();
        let p = vault.reencrypt_batch(batch).await.unwrap();
        slowest = slowest.max(t.elapsed());
        moved += p.moved;
        batches += 1;
        if p.remaining == 0 {
            assert!(p.finished);
            break;
        }
        assert!(p.moved > 0, "the pass is stuck: {p:?}");
    }
    let pass = started.elapsed().as_secs_f64();
    println!(
        "{backend}: re-encrypted {moved} records (new DEK and fingerprint key) in {pass:.1} s: \
         {:.0} records/s, {batches} batches of {batch}, slowest batch {:.0} ms",
        moved as f64 / pass,
        slowest.as_secs_f64() * 1000.0
    );
    assert_eq!(moved, n);

    // Every sampled token still opens to its card.
    for (i, token) in &sample {
        let d = vault.detokenize(&ctx, token, "bench check").await.unwrap();
        assert_eq!(d.card.pan.expose_digits(), test_pan(*i));
    }
    println!("{backend}: {} sampled tokens detokenize", sample.len());

    store.close().await;
    if backend == "postgres" {
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        conn.execute(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)").as_str())
            .await
            .unwrap();
    }
}
