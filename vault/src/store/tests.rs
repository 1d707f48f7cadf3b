//! The store test suite, run against every backend: SQLite in a temp dir and
//! PostgreSQL in a fresh database on the server named by
//! `CARDVAULT_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! A missing PostgreSQL fails these tests; it never skips them.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use audit::{Action, AuditEvent, Outcome};
use sqlx::{Connection as _, Executor as _};

use super::postgres::{PgSettings, PgStore};
use super::sqlite::SqliteStore;
use super::*;

/// Admin URL of the PostgreSQL server the tests use.
pub fn pg_admin_url() -> String {
    std::env::var("CARDVAULT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh, empty PostgreSQL database, dropped when this is dropped.
pub struct PgTestDb {
    pub name: String,
    pub url: String,
}

impl PgTestDb {
    pub async fn create() -> PgTestDb {
        let admin = pg_admin_url();
        let mut raw = [0u8; 6];
        getrandom::getrandom(&mut raw).unwrap();
        let name = format!(
            "cv_test_{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL is required for the store tests ({admin}): {e}")
            });
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        conn.close().await.unwrap();
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("CARDVAULT_TEST_PG_URL must end with /DATABASE"),
        };
        PgTestDb { name, url }
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime we can block on: use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

/// One backend under test, with a way to run raw SQL under the store.
pub enum TestStore {
    Sqlite(tempfile::TempDir, SqliteStore),
    // The database is held for its `Drop`, which removes it.
    Postgres(#[allow(dead_code)] PgTestDb, Box<PgStore>),
}

impl TestStore {
    pub async fn all() -> Vec<TestStore> {
        vec![Self::sqlite().await, Self::postgres().await]
    }

    pub async fn sqlite() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        TestStore::Sqlite(dir, s)
    }

    pub async fn postgres() -> TestStore {
        let db = PgTestDb::create().await;
        let s = PgStore::open(&db.url, PgSettings::default()).await.unwrap();
        TestStore::Postgres(db, Box::new(s))
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            TestStore::Sqlite(_, s) => Arc::new(s.clone()),
            TestStore::Postgres(_, s) => Arc::new((**s).clone()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TestStore::Sqlite(..) => "sqlite",
            TestStore::Postgres(..) => "postgres",
        }
    }

    /// The URL of this database (what the service and `vault-audit` take).
    pub fn url(&self) -> String {
        match self {
            TestStore::Sqlite(dir, _) => super::sqlite_url(&dir.path().join("t.db")),
            TestStore::Postgres(db, _) => db.url.clone(),
        }
    }

    /// Run a statement directly on the database; `Err` is the database's refusal.
    pub async fn exec(&self, sql: &str) -> Result<u64, sqlx::Error> {
        match self {
            TestStore::Sqlite(_, s) => sqlx::query(sql)
                .execute(s.pool())
                .await
                .map(|r| r.rows_affected()),
            TestStore::Postgres(_, s) => sqlx::query(sql)
                .execute(s.pool())
                .await
                .map(|r| r.rows_affected()),
        }
    }

    /// Active key rows (DEK 1, fingerprint key 1) with dummy material and
    /// no audit event: what `insert_cards` checks the versions of its rows
    /// against.
    pub async fn seed_keys(&self) {
        let blob = match self {
            TestStore::Sqlite(..) => "x'07'",
            TestStore::Postgres(..) => "decode('07', 'hex')",
        };
        self.exec(&format!(
            "INSERT INTO vault_keys (purpose, version, kek_id, wrapped, state, created_at, reencrypted_at)
             VALUES ('dek', 1, 'soft:test', {blob}, 'active', 1, 1),
                    ('fingerprint', 1, 'soft:test', {blob}, 'active', 1, 1)"
        ))
        .await
        .unwrap();
    }

    /// A trigger that makes every audit insert fail, in this backend's dialect.
    pub async fn break_audit(&self) {
        let sql: &[&str] = match self {
            TestStore::Sqlite(..) => &[
                "CREATE TRIGGER audit_broken BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit down'); END",
            ],
            TestStore::Postgres(..) => &[
                "CREATE FUNCTION audit_broken() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'audit down'; END $$",
                "CREATE TRIGGER audit_broken BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_broken()",
            ],
        };
        for s in sql {
            self.exec(s).await.unwrap();
        }
    }

    pub async fn repair_audit(&self) {
        let sql = match self {
            TestStore::Sqlite(..) => "DROP TRIGGER audit_broken",
            TestStore::Postgres(..) => "DROP TRIGGER audit_broken ON audit_events",
        };
        self.exec(sql).await.unwrap();
    }
}

pub(crate) fn row(token: &str, tenant: &str, fp: &str) -> CardRow {
    CardRow {
        token: token.into(),
        tenant: tenant.into(),
        fingerprint: fp.into(),
        brand: "visa".into(),
        bin: "411111".into(),
        last4: "1111".into(),
        pan_len: 16,
        key_version: 1,
        nonce: vec![0; 12],
        ciphertext: vec![1, 2, 3],
        created_at: 1,
        fingerprint_version: 1,
        expires_at: None,
        last_used_at: None,
        updated_at: None,
    }
}

fn ev() -> AuditEvent {
    AuditEvent::new(Action::Tokenize, Outcome::Success)
}

#[tokio::test]
async fn same_fingerprint_in_a_tenant_is_one_row() {
    for b in TestStore::all().await {
        b.seed_keys().await;
        let s = b.store();
        let out = s
            .insert_cards(
                vec![
                    NewCard {
                        row: row("tok_a", "t1", "fp_1"),
                        event: ev(),
                        previous_fingerprints: vec![],
                    },
                    NewCard {
                        row: row("tok_b", "t1", "fp_1"),
                        event: ev(),
                        previous_fingerprints: vec![],
                    },
                    NewCard {
                        row: row("tok_c", "t2", "fp_1"),
                        event: ev(),
                        previous_fingerprints: vec![],
                    },
                ],
                vec![ev().detail("refused card")],
            )
            .await
            .unwrap();
        assert_eq!(
            out.iter()
                .map(|i| (i.row.token.as_str(), i.created))
                .collect::<Vec<_>>(),
            [("tok_a", true), ("tok_a", false), ("tok_c", true)],
            "{}",
            b.name()
        );
        let events = s.audit_events(0, 100).await.unwrap();
        assert_eq!(events.len(), 4, "{}", b.name());
        assert_eq!(events[2].event.token.as_deref(), Some("tok_a"));
        assert_eq!(events[2].event.detail.as_deref(), Some("existing"));
        assert_eq!(
            s.find_card("tok_a").await.unwrap().unwrap(),
            row("tok_a", "t1", "fp_1")
        );
    }
}

#[tokio::test]
async fn concurrent_inserts_of_one_card_make_one_row() {
    for b in TestStore::all().await {
        b.seed_keys().await;
        let s = b.store();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let r = row(&format!("tok_{i}"), "t1", "fp_same");
                    s.insert_cards(
                        vec![NewCard {
                            row: r,
                            event: ev(),
                            previous_fingerprints: vec![],
                        }],
                        vec![],
                    )
                    .await
                    .unwrap()
                    .remove(0)
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let created = results.iter().filter(|r| r.created).count();
        let tokens: std::collections::BTreeSet<_> =
            results.iter().map(|r| r.row.token.clone()).collect();
        assert_eq!((created, tokens.len()), (1, 1), "{}", b.name());
    }
}

#[tokio::test]
async fn audit_is_append_only_and_refuses_card_numbers() {
    for b in TestStore::all().await {
        b.seed_keys().await;
        let s = b.store();
        s.append_audit(ev().reason("ok")).await.unwrap();
        assert!(matches!(
            s.append_audit(ev().reason("card 4111 1111 1111 1111"))
                .await,
            Err(StoreError::AuditContent)
        ));
        assert!(
            b.exec("UPDATE audit_events SET reason = 'x'")
                .await
                .is_err(),
            "{}",
            b.name()
        );
        assert!(
            b.exec("DELETE FROM audit_events").await.is_err(),
            "{}",
            b.name()
        );
        if matches!(b, TestStore::Postgres(..)) {
            assert!(b.exec("TRUNCATE audit_events").await.is_err());
        }
        let events = s.audit_events(0, 10).await.unwrap();
        assert_eq!(events.len(), 1, "{}", b.name());
        assert_eq!(events[0].event.reason.as_deref(), Some("ok"));
    }
}

#[tokio::test]
async fn failed_audit_rolls_back_the_card() {
    for b in TestStore::all().await {
        b.seed_keys().await;
        let s = b.store();
        let bad = ev().reason("4111111111111111");
        let res = s
            .insert_cards(
                vec![NewCard {
                    row: row("tok_a", "t1", "fp_1"),
                    event: bad,
                    previous_fingerprints: vec![],
                }],
                vec![],
            )
            .await;
        assert!(matches!(res, Err(StoreError::AuditContent)), "{}", b.name());
        assert!(s.find_card("tok_a").await.unwrap().is_none());
        b.break_audit().await;
        let res = s
            .insert_cards(
                vec![NewCard {
                    row: row("tok_b", "t1", "fp_2"),
                    event: ev(),
                    previous_fingerprints: vec![],
                }],
                vec![],
            )
            .await;
        assert!(
            matches!(res, Err(StoreError::Unavailable(_))),
            "{}",
            b.name()
        );
        assert!(!s.delete_card("tok_b", "t1", ev()).await.unwrap());
        b.repair_audit().await;
        assert!(
            s.find_card("tok_b").await.unwrap().is_none(),
            "{}",
            b.name()
        );
    }
}

#[tokio::test]
async fn delete_is_scoped_to_tenant() {
    for b in TestStore::all().await {
        b.seed_keys().await;
        let s = b.store();
        s.insert_cards(
            vec![NewCard {
                row: row("tok_a", "t1", "fp_1"),
                event: ev(),
                previous_fingerprints: vec![],
            }],
            vec![],
        )
        .await
        .unwrap();
        assert!(!s.delete_card("tok_a", "t2", ev()).await.unwrap());
        assert!(s.delete_card("tok_a", "t1", ev()).await.unwrap());
        assert!(
            s.find_card("tok_a").await.unwrap().is_none(),
            "{}",
            b.name()
        );
        assert!(!s.delete_card("tok_a", "t1", ev()).await.unwrap());
    }
}

#[tokio::test]
async fn keys_insert_once() {
    for b in TestStore::all().await {
        let s = b.store();
        let k = StoredKey::new_active(KeyPurpose::Dek, 1, "soft:x".into(), vec![9; 60], 5);
        assert!(s.insert_key(&k, ev()).await.unwrap());
        assert!(!s
            .insert_key(
                &StoredKey {
                    wrapped: vec![1],
                    ..k.clone()
                },
                ev()
            )
            .await
            .unwrap());
        assert_eq!(s.load_keys().await.unwrap(), vec![k], "{}", b.name());
    }
}

fn files_contain(dir: &Path, needle: &[u8]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).ok()?;
            bytes
                .windows(needle.len())
                .any(|w| w == needle)
                .then(|| path.display().to_string())
        })
        .collect()
}

/// SQLite only: the bytes live in files we can read.
#[tokio::test]
async fn deleted_ciphertext_leaves_no_copy_in_database_or_wal() {
    let b = TestStore::sqlite().await;
    b.seed_keys().await;
    let TestStore::Sqlite(dir, _) = &b else {
        unreachable!()
    };
    let s = b.store();
    let mut marker = vec![0u8; 48];
    getrandom::getrandom(&mut marker).unwrap();
    let mut r = row("tok_a", "t1", "fp_1");
    r.ciphertext = marker.clone();
    s.insert_cards(
        vec![NewCard {
            row: r,
            event: ev(),
            previous_fingerprints: vec![],
        }],
        vec![],
    )
    .await
    .unwrap();
    assert!(
        !files_contain(dir.path(), &marker).is_empty(),
        "the marker must be on disk first"
    );
    assert!(s.delete_card("tok_a", "t1", ev()).await.unwrap());
    assert_eq!(files_contain(dir.path(), &marker), Vec::<String>::new());
}

#[tokio::test]
async fn principal_names_are_unique_among_active_ones() {
    for b in TestStore::all().await {
        let s = b.store();
        let p = |id: &str| PrincipalRow {
            id: id.into(),
            name: "checkout".into(),
            roles: "tokenize".into(),
            tenants: "*".into(),
            key_hash: "h".into(),
            created_at: 1,
            revoked_at: None,
            cert_identity: None,
        };
        s.insert_principal(&p("a"), ev()).await.unwrap();
        assert!(
            matches!(
                s.insert_principal(&p("b"), ev()).await,
                Err(StoreError::Conflict)
            ),
            "{}",
            b.name()
        );
        assert!(s.revoke_principal("checkout", 2, ev()).await.unwrap());
        assert!(!s.revoke_principal("checkout", 3, ev()).await.unwrap());
        s.insert_principal(&p("b"), ev()).await.unwrap();
        assert_eq!(
            s.find_principal("a").await.unwrap().unwrap().revoked_at,
            Some(2)
        );
        assert_eq!(s.list_principals().await.unwrap().len(), 2);
    }
}

#[tokio::test]
async fn certificate_identities_are_unique_among_active_principals() {
    for b in TestStore::all().await {
        let s = b.store();
        let p = |id: &str, name: &str| PrincipalRow {
            id: id.into(),
            name: name.into(),
            roles: "tokenize".into(),
            tenants: "*".into(),
            key_hash: "h".into(),
            created_at: 1,
            revoked_at: None,
            cert_identity: Some("spiffe://aggregator.example/checkout".into()),
        };
        s.insert_principal(&p("a", "checkout"), ev()).await.unwrap();
        let found = s
            .find_principal_by_cert("spiffe://aggregator.example/checkout")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, "a", "{}", b.name());
        assert!(s
            .find_principal_by_cert("spiffe://aggregator.example/router")
            .await
            .unwrap()
            .is_none());
        // A second active principal cannot take the same identity.
        assert!(
            matches!(
                s.insert_principal(&p("b", "checkout-2"), ev()).await,
                Err(StoreError::Conflict)
            ),
            "{}",
            b.name()
        );
        // Revoked: the identity no longer authenticates, and is free again.
        assert!(s.revoke_principal("checkout", 2, ev()).await.unwrap());
        assert!(s
            .find_principal_by_cert("spiffe://aggregator.example/checkout")
            .await
            .unwrap()
            .is_none());
        s.insert_principal(&p("b", "checkout-2"), ev())
            .await
            .unwrap();
        assert_eq!(
            s.find_principal_by_cert("spiffe://aggregator.example/checkout")
                .await
                .unwrap()
                .unwrap()
                .id,
            "b"
        );
    }
}

#[tokio::test]
async fn urls_pick_the_backend() {
    assert_eq!(
        Backend::of_url("sqlite:///tmp/x.db").unwrap(),
        Backend::Sqlite
    );
    assert_eq!(
        Backend::of_url("postgres://u@h/db").unwrap(),
        Backend::Postgres
    );
    assert_eq!(
        Backend::of_url("postgresql://u@h/db").unwrap(),
        Backend::Postgres
    );
    assert!(matches!(
        Backend::of_url("mysql://h/db"),
        Err(StoreError::UnsupportedUrl)
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        url: sqlite_url(&dir.path().join("u.db")),
        migrate: true,
        op_timeout: std::time::Duration::from_secs(5),
        max_connections: 4,
    };
    open(&config).await.unwrap().ping().await.unwrap();
    let db = PgTestDb::create().await;
    let config = StoreConfig {
        url: db.url.clone(),
        ..config
    };
    open(&config).await.unwrap().ping().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_postgres_fails_fast() {
    // Nothing listens on port 1: every operation fails within the bound.
    let s = PgStore::connect_lazy(
        "postgres://postgres@127.0.0.1:1/none",
        PgSettings {
            max_connections: 2,
            op_timeout: std::time::Duration::from_millis(500),
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    assert!(s.ping().await.is_err());
    assert!(s.find_card("tok_a").await.is_err());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// `sslmode=require` in the URL makes the connection TLS (rustls, ring).
/// Needs `ssl = on` on the test server (Debian's default, with its snakeoil
/// certificate; `verify-full` would need that certificate's CA).
#[tokio::test]
async fn postgres_urls_can_ask_for_tls() {
    let db = PgTestDb::create().await;
    let url = format!("{}?sslmode=require", db.url);
    let s = PgStore::open(&url, PgSettings::default()).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert!(ssl, "the connection must be encrypted");
    s.ping().await.unwrap();
}

/// The audit chain stays one gap-free, verifiable whole under concurrent
/// appends from many connections, checkpoints sign it, and a change made
/// under the store (triggers bypassed, as a database administrator could)
/// is found and located.
#[tokio::test]
async fn audit_chain_verifies_and_exposes_tampering() {
    for b in TestStore::all().await {
        b.seed_keys().await;
        let s = b.store();
        let key = audit::SigningKey::generate().unwrap();
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    if i % 3 == 0 {
                        let r = row(&format!("tok_{i}"), "t1", &format!("fp_{i}"));
                        s.insert_cards(
                            vec![NewCard {
                                row: r,
                                event: ev(),
                                previous_fingerprints: vec![],
                            }],
                            vec![ev().detail("refused")],
                        )
                        .await
                        .unwrap();
                    } else {
                        s.append_audit(ev().reason(format!("reason {i}")))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let first = s
            .write_checkpoint(&key)
            .await
            .unwrap()
            .expect("a first checkpoint");
        assert_eq!(first.tree_size, 32, "{}", b.name());
        assert!(
            s.write_checkpoint(&key).await.unwrap().is_none(),
            "nothing new, no checkpoint"
        );
        for i in 0..3 {
            s.append_audit(ev().reason(format!("later {i}")))
                .await
                .unwrap();
        }
        let cp = s
            .write_checkpoint(&key)
            .await
            .unwrap()
            .expect("new entries, new checkpoint");
        assert_eq!(cp.tree_size, 35);
        let entries = s.chained_events(0, 10_000).await.unwrap();
        assert_eq!(entries.len(), 35, "{}", b.name());
        let checkpoints = s.checkpoints().await.unwrap();
        assert_eq!(checkpoints.len(), 2);
        assert_eq!(
            s.last_checkpoint().await.unwrap().as_ref(),
            checkpoints.last(),
            "{}",
            b.name()
        );
        let report = audit::verify_trail(&entries, checkpoints.clone(), &key.verifying_key())
            .unwrap_or_else(|f| panic!("{}: {f}", b.name()));
        assert_eq!(report.entries, 35);

        // A database administrator edits one reason, bypassing the triggers.
        let bypass: &[&str] = match b {
            TestStore::Sqlite(..) => &[
                "DROP TRIGGER audit_events_no_update",
                "UPDATE audit_events SET reason = 'reason 99' WHERE chain_seq = 7",
            ],
            TestStore::Postgres(..) => &[
                "ALTER TABLE audit_events DISABLE TRIGGER USER",
                "UPDATE audit_events SET reason = 'reason 99' WHERE chain_seq = 7",
            ],
        };
        for sql in bypass {
            b.exec(sql).await.unwrap();
        }
        let tampered = s.chained_events(0, 10_000).await.unwrap();
        let failure =
            audit::verify_trail(&tampered, checkpoints, &key.verifying_key()).unwrap_err();
        assert!(failure.to_string().contains('7'), "{}: {failure}", b.name());
    }
}

/// Retention: a segment that ends at a checkpoint is archived to a file that
/// verifies on its own, recorded, and deleted from the database; the
/// database refuses to delete anything else, refuses segments that do not
/// join up, and the trail left in the database verifies from the anchor,
/// also joined to the archive file. Backups carry the segments.
#[tokio::test]
async fn archiving_moves_old_segments_to_files_that_verify() {
    use crate::archive::{archive_audit, ArchiveError};
    use audit::auditor::{verify_database, VerifyError};

    for b in TestStore::all().await {
        b.seed_keys().await;
        let s = b.store();
        let name = b.name();
        let key = audit::SigningKey::generate().unwrap();
        let vk = key.verifying_key();
        s.insert_signing_key(
            &SigningKeyRow {
                generation: 1,
                key_id: vk.key_id().to_owned(),
                kek_id: "test".into(),
                wrapped: vec![0; 8],
                public_key: vk.to_string(),
                created_at: now_millis(),
                retired_at: None,
                destroyed_at: None,
            },
            ev().detail("audit_signing:1"),
        )
        .await
        .unwrap();
        for i in 0..20 {
            s.append_audit(ev().reason(format!("old {i}")))
                .await
                .unwrap();
        }
        let cp = s.write_checkpoint(&key).await.unwrap().unwrap();
        assert_eq!(cp.tree_size, 21, "{name}");
        // Nothing may be deleted before it is archived.
        assert!(
            b.exec("DELETE FROM audit_events WHERE chain_seq = 1")
                .await
                .is_err(),
            "{name}"
        );
        // A segment must end at a checkpoint and start after the last one.
        let bogus = audit::db::ArchiveRow {
            from_seq: 1,
            to_seq: 10,
            anchor: audit::Anchor::genesis(),
            file_name: "x".into(),
            file_sha256: "y".into(),
            archived_at: "z".into(),
        };
        assert!(
            matches!(
                s.record_archive(&bogus, ev()).await,
                Err(StoreError::Conflict)
            ),
            "{name}"
        );
        for i in 0..5 {
            s.append_audit(ev().reason(format!("new {i}")))
                .await
                .unwrap();
        }

        // A cutoff before the checkpoint archives nothing.
        let dir = tempfile::tempdir().unwrap();
        let before = cp.time;
        let none = archive_audit(s.as_ref(), &b.url(), dir.path(), before, ev())
            .await
            .unwrap();
        assert_eq!((none.segment, none.deleted), (None, 0), "{name}");

        let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
        // PostgreSQL: through a host list whose first host is down (the
        // export reads the host that accepts writes).
        let url = match b.url() {
            u if u.starts_with("postgres") => with_dead_first_host(&u),
            u => u,
        };
        let done = archive_audit(s.as_ref(), &url, dir.path(), later, ev())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (row, path) = done.segment.unwrap();
        assert_eq!(
            (row.from_seq, row.to_seq, done.deleted),
            (1, 21, 21),
            "{name}"
        );
        assert_eq!(path, dir.path().join("audit-archive-1-21.jsonl"));
        let archive = audit::auditor::verify_export_file(&path, &vk, None).unwrap();
        assert_eq!((archive.report.entries, archive.report.anchored), (21, 21));
        assert_eq!(s.audit_archives().await.unwrap(), vec![row.clone()]);
        // Rows 1-21 are gone; 22-26 and the archive event (27) remain.
        let left = s.chained_events(0, 100).await.unwrap();
        assert_eq!(left.first().map(|e| e.seq), Some(22), "{name}");
        assert_eq!(
            left.last().map(|e| (e.seq, e.event.action)),
            Some((27, Action::AuditArchived))
        );
        assert!(
            b.exec("DELETE FROM audit_events WHERE chain_seq = 22")
                .await
                .is_err(),
            "{name}"
        );
        assert!(
            b.exec("DELETE FROM audit_archives").await.is_err(),
            "{name}"
        );
        assert!(
            b.exec("UPDATE audit_archives SET file_name = 'other'")
                .await
                .is_err(),
            "{name}"
        );

        // The database verifies from the anchor, and joined to the file.
        // (The next checkpoint is signed after the cutoff used above.)
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        s.write_checkpoint(&key).await.unwrap().unwrap();
        let online = verify_database(&b.url(), &vk, None, &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (
                online.report.start,
                online.report.entries,
                online.report.last_seq
            ),
            (21, 6, 27)
        );
        let whole = verify_database(&b.url(), &vk, None, &[path.as_path()])
            .await
            .unwrap();
        assert_eq!(
            (
                whole.report.start,
                whole.report.entries,
                whole.report.anchored
            ),
            (0, 27, 27)
        );
        assert!(
            whole
                .lines()
                .iter()
                .any(|l| l.contains("archive files: 1 verified")),
            "{:?}",
            whole.lines()
        );

        // A tampered archive file is caught when joined to the database.
        let text = std::fs::read_to_string(&path).unwrap();
        let forged = dir.path().join("forged.jsonl");
        std::fs::write(&forged, text.replacen("old 3", "old 4", 1)).unwrap();
        match verify_database(&b.url(), &vk, None, &[forged.as_path()]).await {
            Err(VerifyError::Failed(f)) => {
                assert!(f.to_string().contains("entry 5 was changed"), "{name}: {f}")
            }
            other => panic!("{name}: forged archive not detected: {other:?}"),
        }

        // A rerun with no new checkpoint before the cutoff does nothing.
        let again = archive_audit(s.as_ref(), &b.url(), dir.path(), later, ev())
            .await
            .unwrap();
        assert_eq!((again.segment, again.deleted), (None, 0));
        // An existing file that differs from the next segment is not overwritten.
        let cp2 = s.checkpoints().await.unwrap().last().unwrap().clone();
        std::fs::write(
            dir.path()
                .join(format!("audit-archive-22-{}.jsonl", cp2.tree_size)),
            "other",
        )
        .unwrap();
        assert!(
            matches!(
                archive_audit(
                    s.as_ref(),
                    &b.url(),
                    dir.path(),
                    time::OffsetDateTime::now_utc() + time::Duration::seconds(2),
                    ev()
                )
                .await,
                Err(ArchiveError::Exists { .. })
            ),
            "{name}"
        );
        assert_eq!(
            s.audit_archives().await.unwrap().len(),
            1,
            "nothing recorded"
        );

        // Export/import (backup) carries the segment; the chain continues
        // from its anchor.
        let mut records = Vec::new();
        s.export(&mut |r| {
            records.push(r);
            Ok(())
        })
        .await
        .unwrap();
        assert!(records
            .iter()
            .any(|r| matches!(r, BackupRecord::Archive(a) if a.to_seq == 21)));
        let to = TestStore::sqlite().await;
        to.store()
            .import(records)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(to.store().audit_archives().await.unwrap(), vec![row]);
        let restored = verify_database(&to.url(), &vk, None, &[path.as_path()])
            .await
            .unwrap();
        assert_eq!(restored.report.last_seq, 27, "{name}");
    }
}

/// Migration 0004 on a database that already holds keys and cards: older
/// DEK versions become decrypt-only, the newest of each purpose stays
/// active, cards are under fingerprint key 1, and the pass to the newest DEK
/// is only considered done where there was nothing older.
#[tokio::test]
async fn migration_0004_upgrades_existing_keys_and_cards() {
    for backend in ["sqlite", "postgres"] {
        // The first three migrations only, as shipped.
        let old = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(backend);
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.as_str() < "0004" {
                std::fs::copy(&path, old.path().join(&name)).unwrap();
            }
        }
        let first_three = sqlx::migrate::Migrator::new(old.path()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (db, store): (Option<PgTestDb>, Arc<dyn Store>) = match backend {
            "sqlite" => {
                let s = SqliteStore::open_unmigrated(
                    &dir.path().join("t.db"),
                    std::time::Duration::from_secs(30),
                )
                .await
                .unwrap();
                first_three.run(s.pool()).await.unwrap();
                for sql in [
                    "INSERT INTO vault_keys (purpose, version, kek_id, wrapped, created_at) VALUES
                       ('dek', 1, 'k', x'01', 10), ('dek', 2, 'k', x'02', 20), ('fingerprint', 1, 'k', x'03', 30)",
                    "INSERT INTO cards (token, tenant, fingerprint, brand, bin, last4, pan_len, key_version, nonce, ciphertext, created_at)
                     VALUES ('tok_a', 't1', 'fp_a', 'visa', '411111', '1111', 16, 1, x'00', x'00', 1)",
                ] {
                    sqlx::query(sql).execute(s.pool()).await.unwrap();
                }
                s.migrate().await.unwrap();
                (None, Arc::new(s))
            }
            _ => {
                let db = PgTestDb::create().await;
                let s = PgStore::connect_lazy(&db.url, PgSettings::default()).unwrap();
                first_three.run(s.pool()).await.unwrap();
                for sql in [
                    "INSERT INTO vault_keys (purpose, version, kek_id, wrapped, created_at) VALUES
                       ('dek', 1, 'k', '\\x01', 10), ('dek', 2, 'k', '\\x02', 20), ('fingerprint', 1, 'k', '\\x03', 30)",
                    "INSERT INTO cards (token, tenant, fingerprint, brand, bin, last4, pan_len, key_version, nonce, ciphertext, created_at)
                     VALUES ('tok_a', 't1', 'fp_a', 'visa', '411111', '1111', 16, 1, '\\x00', '\\x00', 1)",
                ] {
                    sqlx::query(sql).execute(s.pool()).await.unwrap();
                }
                s.migrate().await.unwrap();
                (Some(db), Arc::new(s))
            }
        };
        let keys: Vec<_> = store
            .load_keys()
            .await
            .unwrap()
            .into_iter()
            .map(|k| (k.purpose, k.version, k.state, k.reencrypted_at))
            .collect();
        assert_eq!(
            keys,
            [
                (KeyPurpose::Dek, 1, KeyState::DecryptOnly, None),
                (KeyPurpose::Dek, 2, KeyState::Active, None),
                (KeyPurpose::Fingerprint, 1, KeyState::Active, Some(30)),
            ],
            "{backend}"
        );
        let card = store.find_card("tok_a").await.unwrap().unwrap();
        assert_eq!((card.key_version, card.fingerprint_version), (1, 1));
        assert_eq!(store.count_outdated(2, 1).await.unwrap(), 1, "{backend}");
        store.close().await;
        drop(db);
    }
}

fn collect_row(id: &str, expires_at: i64) -> crate::store::CollectSessionRow {
    crate::store::CollectSessionRow {
        id: id.into(),
        tenant: "t1".into(),
        allowed_origin: "https://shop.example".into(),
        secret_hash: vec![7; 32],
        require_cvc: true,
        token_format: "random".into(),
        reference: Some("order-1".into()),
        style: Some(r##"{"color":"#112233"}"##.into()),
        created_at: 1,
        expires_at,
        failures: 0,
        closed_at: None,
        completed_at: None,
        token: None,
        claimed_until: None,
    }
}

/// Collection sessions on both backends: stored as given, completed once,
/// refusals counted up to the close, purged after expiry, each write with
/// its audit event in the same transaction.
#[tokio::test]
async fn collect_sessions_complete_once_count_refusals_and_purge() {
    for b in TestStore::all().await {
        let s = b.store();
        let name = b.name();
        let far = i64::MAX / 2;
        let open = collect_row("cs_open", far);
        s.insert_collect_session(&open, ev().detail("created"))
            .await
            .unwrap();
        assert_eq!(
            s.find_collect_session("cs_open").await.unwrap(),
            Some(open.clone()),
            "{name}"
        );
        assert!(s
            .complete_collect_session("cs_open", "tok_a", 10, ev())
            .await
            .unwrap());
        assert!(
            !s.complete_collect_session("cs_open", "tok_b", 11, ev())
                .await
                .unwrap(),
            "{name}"
        );
        let done = s.find_collect_session("cs_open").await.unwrap().unwrap();
        assert_eq!(
            (done.completed_at, done.token.as_deref()),
            (Some(10), Some("tok_a")),
            "{name}"
        );
        // A completed session counts no refusal.
        assert_eq!(
            s.fail_collect_session("cs_open", 3, 12, true, ev())
                .await
                .unwrap(),
            None,
            "{name}"
        );

        s.insert_collect_session(&collect_row("cs_fail", far), ev())
            .await
            .unwrap();
        for n in 1..=3 {
            assert_eq!(
                s.fail_collect_session("cs_fail", 3, 20, true, ev())
                    .await
                    .unwrap(),
                Some(n),
                "{name}"
            );
        }
        let closed = s.find_collect_session("cs_fail").await.unwrap().unwrap();
        assert_eq!(closed.closed_at, Some(20), "{name}");
        assert!(
            !s.complete_collect_session("cs_fail", "tok_c", 21, ev())
                .await
                .unwrap(),
            "{name}"
        );

        s.insert_collect_session(&collect_row("cs_old", 100), ev())
            .await
            .unwrap();
        assert!(
            !s.complete_collect_session("cs_old", "tok_d", 100, ev())
                .await
                .unwrap(),
            "{name}"
        );
        let before = s.audit_size().await.unwrap();
        let event = |c: u64, o: u64| ev().detail(format!("completed={c} not_completed={o}"));
        assert_eq!(
            s.purge_collect_sessions(101, 10, &event).await.unwrap(),
            (0, 1),
            "{name}"
        );
        assert_eq!(
            s.purge_collect_sessions(101, 10, &event).await.unwrap(),
            (0, 0),
            "{name}"
        );
        assert_eq!(s.audit_size().await.unwrap(), before + 1, "{name}");
        assert_eq!(
            s.find_collect_session("cs_old").await.unwrap(),
            None,
            "{name}"
        );
        assert!(
            s.find_collect_session("cs_open").await.unwrap().is_some(),
            "{name}"
        );
    }
}

fn forward_key(principal: &str, key_hash: &str, created_at: i64) -> ForwardKeyRow {
    ForwardKeyRow {
        principal_id: principal.into(),
        upstream: "acquirer".into(),
        key_hash: key_hash.into(),
        request_hash: "r1".into(),
        state: ForwardKeyState::Pending,
        created_at,
        completed_at: None,
        answer: None,
    }
}

fn forward_answer(key_version: u32) -> StoredForwardAnswer {
    StoredForwardAnswer {
        tenant: "t1".into(),
        status: 201,
        content_type: Some("application/json".into()),
        location: None,
        key_version,
        nonce: vec![0; 12],
        ciphertext: vec![1, 2, 3],
    }
}

#[tokio::test]
async fn forward_keys_are_claimed_once_completed_once_released_and_purged() {
    for b in TestStore::all().await {
        let s = b.store();
        let name = b.name();
        b.seed_keys().await;
        let k = forward_key("p1", "k1", 100);
        assert_eq!(
            s.claim_forward_key(&k, 0).await.unwrap(),
            ForwardClaim::Claimed,
            "{name}"
        );
        // Claimed again (another request too): the existing row, unchanged.
        let again = ForwardKeyRow {
            request_hash: "r2".into(),
            created_at: 150,
            ..k.clone()
        };
        assert_eq!(
            s.claim_forward_key(&again, 0).await.unwrap(),
            ForwardClaim::Existing(Box::new(k.clone())),
            "{name}"
        );
        // Another principal, another upstream: keys of their own.
        for other in [
            forward_key("p2", "k1", 100),
            ForwardKeyRow {
                upstream: "other".into(),
                ..k.clone()
            },
        ] {
            assert_eq!(
                s.claim_forward_key(&other, 0).await.unwrap(),
                ForwardClaim::Claimed,
                "{name}"
            );
        }

        // Completion: only of the pending claim made at its time, under a
        // DEK that is loaded (version 9 does not exist).
        assert!(!s
            .complete_forward_key("p1", "acquirer", "k1", 101, 200, &forward_answer(1))
            .await
            .unwrap());
        assert!(!s
            .complete_forward_key("p1", "acquirer", "k1", 100, 200, &forward_answer(9))
            .await
            .unwrap());
        assert!(s
            .complete_forward_key("p1", "acquirer", "k1", 100, 200, &forward_answer(1))
            .await
            .unwrap());
        assert!(
            !s.complete_forward_key("p1", "acquirer", "k1", 100, 201, &forward_answer(1))
                .await
                .unwrap(),
            "{name}: completed once"
        );
        let done = s
            .find_forward_key("p1", "acquirer", "k1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.state, ForwardKeyState::Completed, "{name}");
        assert_eq!(done.completed_at, Some(200), "{name}");
        assert_eq!(done.answer, Some(forward_answer(1)), "{name}");
        assert_eq!(
            s.claim_forward_key(&again, 0).await.unwrap(),
            ForwardClaim::Existing(Box::new(done.clone())),
            "{name}"
        );
        // A completed key is not released; a pending one is, once.
        assert!(!s
            .release_forward_key("p1", "acquirer", "k1", 100)
            .await
            .unwrap());
        assert!(!s
            .release_forward_key("p2", "acquirer", "k1", 99)
            .await
            .unwrap());
        assert!(s
            .release_forward_key("p2", "acquirer", "k1", 100)
            .await
            .unwrap());
        assert!(!s
            .release_forward_key("p2", "acquirer", "k1", 100)
            .await
            .unwrap());
        assert_eq!(
            s.claim_forward_key(&forward_key("p2", "k1", 300), 0)
                .await
                .unwrap(),
            ForwardClaim::Claimed,
            "{name}: released, the key is free"
        );

        // An expired row is gone for a new claim, whatever its state.
        let renewed = forward_key("p1", "k1", 500);
        assert_eq!(
            s.claim_forward_key(&renewed, 101).await.unwrap(),
            ForwardClaim::Claimed,
            "{name}"
        );
        assert_eq!(
            s.find_forward_key("p1", "acquirer", "k1").await.unwrap(),
            Some(renewed),
            "{name}"
        );

        // Purge: keys claimed before the cutoff (p1/other at 100), one
        // event with the count, in batches.
        let before = s.audit_size().await.unwrap();
        let event = |n: u64| ev().detail(format!("deleted={n}"));
        assert_eq!(
            s.purge_forward_keys(101, 10, &event).await.unwrap(),
            1,
            "{name}"
        );
        assert_eq!(s.purge_forward_keys(101, 10, &event).await.unwrap(), 0);
        assert_eq!(s.audit_size().await.unwrap(), before + 1, "{name}");
        assert_eq!(
            s.find_forward_key("p1", "other", "k1").await.unwrap(),
            None,
            "{name}"
        );
        for i in 0..5 {
            s.claim_forward_key(&forward_key("p3", &format!("b{i}"), 1000 + i), 0)
                .await
                .unwrap();
        }
        assert_eq!(s.purge_forward_keys(2000, 2, &event).await.unwrap(), 2);
        assert_eq!(s.purge_forward_keys(2000, 10, &event).await.unwrap(), 5);
        assert!(s
            .find_forward_key("p3", "acquirer", "b4")
            .await
            .unwrap()
            .is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_of_a_forward_key_have_one_winner() {
    for b in TestStore::all().await {
        let name = b.name();
        for round in 0..5 {
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let s = b.store();
                    tokio::spawn(async move {
                        let row = ForwardKeyRow {
                            request_hash: format!("r{i}"),
                            ..forward_key("p1", &format!("c{round}"), 10 + i)
                        };
                        s.claim_forward_key(&row, 0).await.unwrap()
                    })
                })
                .collect();
            let mut claimed = 0;
            let mut existing = std::collections::BTreeSet::new();
            for t in tasks {
                match t.await.unwrap() {
                    ForwardClaim::Claimed => claimed += 1,
                    ForwardClaim::Existing(row) => {
                        existing.insert(row.request_hash);
                    }
                }
            }
            assert_eq!(claimed, 1, "{name}");
            // Every loser saw the one winner's row.
            assert_eq!(existing.len(), 1, "{name}");
        }
    }
}

#[tokio::test]
async fn the_write_probe_commits_and_a_refused_commit_is_read_only() {
    for t in TestStore::all().await {
        let store = t.store();
        store.probe_write().await.unwrap();
        let n = t
            .exec("UPDATE storage_probe SET probed_at = probed_at WHERE probed_at > 0")
            .await
            .unwrap();
        assert_eq!(n, 1, "{}: the probe wrote its row", t.name());
        // A duplicate key is a refusal of the statement, not of commits.
        let dup = t
            .exec("INSERT INTO storage_probe (id, probed_at) VALUES (1, 0)")
            .await
            .unwrap_err();
        assert!(!StoreError::Unavailable(dup).is_read_only(), "{}", t.name());
        assert!(!StoreError::Timeout.is_read_only());
    }

    // SQLite: a read-only file, through sqlx and through rusqlite (the
    // dedicated writer's driver).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.close().await;
    let ro = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .read_only(true),
        )
        .await
        .unwrap();
    let refused = sqlx::query("UPDATE storage_probe SET probed_at = 1")
        .execute(&ro)
        .await
        .unwrap_err();
    assert!(
        StoreError::Unavailable(refused).is_read_only(),
        "sqlx: SQLITE_READONLY"
    );
    ro.close().await;
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let refused = conn
        .execute("UPDATE storage_probe SET probed_at = 1", [])
        .unwrap_err();
    assert!(
        StoreError::Sqlite(refused).is_read_only(),
        "rusqlite: SQLITE_READONLY"
    );

    // PostgreSQL: a read-only session (what a standby or
    // `default_transaction_read_only` gives): SQLSTATE 25006.
    let db = PgTestDb::create().await;
    PgStore::open(&db.url, PgSettings::default())
        .await
        .unwrap()
        .close()
        .await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    conn.execute("SET default_transaction_read_only = on")
        .await
        .unwrap();
    let refused = conn
        .execute("UPDATE storage_probe SET probed_at = 1")
        .await
        .unwrap_err();
    assert!(StoreError::Unavailable(refused).is_read_only(), "25006");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn shared_rate_buckets_hold_across_store_handles_on_postgres_only() {
    use crate::monitor::Rate;
    let rate = Rate {
        per_minute: 60,
        burst: 3,
    };
    let sqlite = TestStore::sqlite().await;
    assert_eq!(
        sqlite
            .store()
            .take_shared_rate("principal", "p1", rate)
            .await
            .unwrap(),
        None,
        "SQLite keeps its buckets in memory"
    );
    let t = TestStore::postgres().await;
    // Two handles with pools of their own: two instances.
    let a = t.store();
    let TestStore::Postgres(db, _) = &t else {
        unreachable!()
    };
    let b: Arc<dyn Store> = Arc::new(PgStore::open(&db.url, PgSettings::default()).await.unwrap());
    assert_eq!(
        a.take_shared_rate("principal", "p1", Rate::OFF)
            .await
            .unwrap(),
        None,
        "no limit: nothing asked"
    );
    for handle in [&a, &b, &a] {
        assert_eq!(
            handle
                .take_shared_rate("principal", "p1", rate)
                .await
                .unwrap(),
            Some(Ok(()))
        );
    }
    // The burst is spent, whichever instance asks; the wait is about the
    // time to one token (1 s at 60 a minute).
    let Some(Err(wait)) = b.take_shared_rate("principal", "p1", rate).await.unwrap() else {
        panic!("the fourth take must be refused");
    };
    assert!(
        wait <= std::time::Duration::from_secs(1) && !wait.is_zero(),
        "{wait:?}"
    );
    // Other keys and scopes have buckets of their own.
    assert_eq!(
        b.take_shared_rate("tenant", "p1", rate).await.unwrap(),
        Some(Ok(()))
    );
    // A token given back can be taken again, by the other instance.
    a.give_back_shared_rate("principal", "p1", rate)
        .await
        .unwrap();
    assert_eq!(
        b.take_shared_rate("principal", "p1", rate).await.unwrap(),
        Some(Ok(()))
    );
    // Concurrent takes never hand out more than the bucket holds.
    let burst = Rate {
        per_minute: 1,
        burst: 20,
    };
    let takes = (0..60).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            s.take_shared_rate("principal", "race", burst)
                .await
                .unwrap()
        }
    });
    let results = futures_util::future::join_all(takes).await;
    let granted = results.iter().filter(|r| matches!(r, Some(Ok(())))).count();
    assert_eq!(granted, 20, "{results:?}");

    // What a bucket holds is stored in whole millionths of a token: a
    // refill at 1/60000 per ms, taken and given back over a few
    // milliseconds, never leaves float noise with long runs of zeros (a
    // dump of the table would show `19.000000000000004`, which reads like
    // a fragment of a card number with zeros in the middle).
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for _ in 0..20 {
        a.give_back_shared_rate("principal", "race", burst)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        let _ = b
            .take_shared_rate("principal", "race", burst)
            .await
            .unwrap();
        let stored: String = sqlx::query_scalar(
            "SELECT tokens::text FROM rate_buckets WHERE scope = 'principal' AND key = 'race'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        // Shortest round-trip text: `19.000083`, or `1.7e-05` near zero.
        let micro = stored.parse::<f64>().unwrap() * 1e6;
        let decimals = stored
            .split_once('.')
            .map_or(0, |(_, d)| d.split('e').next().unwrap().len());
        assert!(
            (micro - micro.round()).abs() < 1e-3 && (stored.contains('e') || decimals <= 6),
            "stored bucket {stored:?}"
        );
    }
    conn.close().await.unwrap();
}

#[tokio::test]
async fn shared_anomaly_windows_count_distinct_tokens_and_fire_once() {
    let sqlite = TestStore::sqlite().await;
    assert_eq!(
        sqlite
            .store()
            .record_shared_reveal("p1", 60_000, 1)
            .await
            .unwrap(),
        None,
        "SQLite keeps the rule in memory"
    );
    let t = TestStore::postgres().await;
    let a = t.store();
    let TestStore::Postgres(db, _) = &t else {
        unreachable!()
    };
    let b: Arc<dyn Store> = Arc::new(PgStore::open(&db.url, PgSettings::default()).await.unwrap());
    // An hour-long window: the test does not cross its end (unless it
    // starts within seconds of it: then the counts restart, checked below).
    let window = 3_600_000;
    let first = a
        .record_shared_reveal("p1", window, 11)
        .await
        .unwrap()
        .unwrap();
    assert!(first.new && !first.fired);
    let again = b
        .record_shared_reveal("p1", window, 11)
        .await
        .unwrap()
        .unwrap();
    let second = b
        .record_shared_reveal("p1", window, 12)
        .await
        .unwrap()
        .unwrap();
    if second.window_start != first.window_start {
        return; // crossed a window boundary: nothing to compare
    }
    assert_eq!((first.distinct, again.distinct, again.new), (1, 1, false));
    assert_eq!((second.distinct, second.new), (2, true));
    assert_eq!(first.window_start % window, 0);
    // Other principals count apart.
    let other = a
        .record_shared_reveal("p2", window, 11)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.distinct, 1);
    // One claim wins; after it nothing more is recorded in the window.
    assert!(a
        .claim_shared_anomaly("p1", first.window_start)
        .await
        .unwrap());
    assert!(!b
        .claim_shared_anomaly("p1", first.window_start)
        .await
        .unwrap());
    let after = a
        .record_shared_reveal("p1", window, 13)
        .await
        .unwrap()
        .unwrap();
    assert!(
        after.fired && !after.new && after.distinct == 2,
        "{after:?}"
    );
    // The history of earlier windows, and pruning.
    t.exec(&format!(
        "INSERT INTO anomaly_windows VALUES ('p1', {}, 7, false), ('p1', {}, 3, false)",
        first.window_start - 2 * window,
        first.window_start - 9 * window
    ))
    .await
    .unwrap();
    let history = b
        .shared_anomaly_history("p1", first.window_start - 4 * window, first.window_start)
        .await
        .unwrap();
    assert_eq!(history, vec![(first.window_start - 2 * window, 7)]);
    let kept = t
        .exec(&format!(
            "DELETE FROM anomaly_windows WHERE principal = 'p1' AND window_start < {}",
            first.window_start - 4 * window
        ))
        .await
        .unwrap();
    assert_eq!(kept, 0, "windows before the baseline were pruned");
}

/// `url` (one host) as a host list whose first host refuses connections
/// (port 1, where nothing listens).
fn with_dead_first_host(url: &str) -> String {
    let (user, rest) = url
        .split_once('@')
        .expect("user@host in CARDVAULT_TEST_PG_URL");
    format!("{user}@127.0.0.1:1,{rest}")
}

/// A host list where no host accepts writes: the error says what each host
/// answered (one refuses connections, one is read-only), by name only, and
/// comes within the probe bound over TLS too (sqlx's `close_hard` of the
/// read-only host's connection never returned over TLS: the search hung).
#[tokio::test]
async fn no_writable_host_names_what_each_host_answered() {
    let db = PgTestDb::create().await;
    let (user, rest) = db
        .url
        .split_once('@')
        .expect("user@host in CARDVAULT_TEST_PG_URL");
    let host = rest.split_once('/').unwrap().0;
    // A password the error must not show (trust authentication ignores it;
    // the URL's own, if it has one, stays).
    const SECRET: &str = "never-shown-2c9f";
    let with_secret = if user.trim_start_matches("postgres://").contains(':') {
        db.url.clone()
    } else {
        format!("{user}:{SECRET}@{rest}")
    };
    let settings = PgSettings {
        op_timeout: std::time::Duration::from_secs(5),
        ..PgSettings::default()
    };
    for tls in ["disable", "require"] {
        // Port 1: nothing listens there. The real server in a read-only
        // session.
        let url = format!(
            "{}?sslmode={tls}&options=-c%20default_transaction_read_only%3Don",
            with_dead_first_host(&with_secret)
        );
        let err = PgStore::open(&url, settings)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no host of the database URL accepts writes"),
            "sslmode={tls}: {err}"
        );
        assert!(err.contains("127.0.0.1:1: "), "{err}");
        assert!(
            err.contains(&format!("{host}: standby or read-only")),
            "{err}"
        );
        assert!(!err.contains(SECRET), "{err}");
    }
}
