//! The shipped PostgreSQL roles (`deploy/postgres-roles.sql`) against a real
//! server: the runtime role can do everything the service does and nothing
//! that changes the schema or the audit trail; the owner migrates and
//! archives, and even it cannot change the audit trail (triggers) beyond
//! deleting archived entries; the auditor role verifies the trail
//! (`vault-audit verify`) and reads nothing else.
//!
//! The file is run as an operator runs it: with `psql` (which must be
//! installed; a missing `psql` or PostgreSQL fails these tests, never skips
//! them), fed on stdin from `include_str!`, with the role and database names
//! passed as psql variables (`-v owner_role=... -v app_role=... -v
//! auditor_role=... -v db_name=...`), so nothing in the file is rewritten. Roles are cluster-wide:
//! every test uses fresh random role names and drops them when done, also on
//! panic (`TestRoles`). Other roles connect through the server's trust
//! authentication, as the admin URL does (`CARDVAULT_TEST_PG_URL`).
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use audit::{Action, AuditEvent, Outcome};
use sqlx::{Connection as _, Executor as _, PgConnection};

use super::postgres::{PgSettings, PgStore};
use super::tests::{pg_admin_url, PgTestDb};
use super::*;

/// The file under test, byte for byte as shipped.
const ROLES_SQL: &str = include_str!("../../../deploy/postgres-roles.sql");

/// SQLSTATE insufficient_privilege: "permission denied ..." and "must be owner of ...".
const DENIED: &str = "42501";
/// SQLSTATE raise_exception: the append-only triggers.
const RAISED: &str = "P0001";

fn random_suffix() -> String {
    let mut raw = [0u8; 6];
    getrandom::getrandom(&mut raw).unwrap();
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// An owner, a runtime and an auditor role name, unique to this run; the
/// roles are dropped (if they exist) when this is dropped. Declare it before
/// the database, so the database (which the owner owns, and where the others
/// hold privileges) is dropped first.
struct TestRoles {
    owner: String,
    app: String,
    auditor: String,
}

impl TestRoles {
    fn new() -> TestRoles {
        let s = random_suffix();
        TestRoles {
            owner: format!("cv_owner_{s}"),
            app: format!("cv_app_{s}"),
            auditor: format!("cv_auditor_{s}"),
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.app, &self.auditor, &self.owner]
    }
}

impl Drop for TestRoles {
    fn drop(&mut self) {
        let sql = format!(
            "DROP ROLE IF EXISTS {}, {}, {}",
            self.app, self.auditor, self.owner
        );
        // Drop runs outside any runtime we can block on: use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&pg_admin_url()).await {
                    let _ = conn.execute(sql.as_str()).await;
                }
            });
        })
        .join();
    }
}

/// Run the shipped file with psql on the admin URL, as in deploy/README.md.
fn run_roles_sql(roles: &TestRoles, db: &str, phase: Option<&str>) -> Output {
    run_roles_sql_with(roles, db, phase, &[])
}

/// The same, with psql variables that override the ones from `roles` (psql
/// keeps the last `-v` of a name).
fn run_roles_sql_with(
    roles: &TestRoles,
    db: &str,
    phase: Option<&str>,
    overrides: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-w", "-v", "ON_ERROR_STOP=1"])
        .arg("-v")
        .arg(format!("owner_role={}", roles.owner))
        .arg("-v")
        .arg(format!("app_role={}", roles.app))
        .arg("-v")
        .arg(format!("auditor_role={}", roles.auditor))
        .arg("-v")
        .arg(format!("db_name={db}"));
    if let Some(phase) = phase {
        cmd.arg("-v").arg(format!("phase={phase}"));
    }
    for (name, value) in overrides {
        cmd.arg("-v").arg(format!("{name}={value}"));
    }
    let mut child = cmd
        .args(["-d", &pg_admin_url(), "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("psql is required for the roles tests (install the PostgreSQL client): {e}")
        });
    // Written in full, then closed: psql reads the script to its end.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ROLES_SQL.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn phase_ok(roles: &TestRoles, db: &str, phase: &str) {
    let out = run_roles_sql(roles, db, Some(phase));
    assert!(
        out.status.success(),
        "phase {phase} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `url` with its user replaced by `user` (and no password: trust auth).
fn url_as(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{scheme}://{user}@{host}")
}

fn ev(action: Action) -> AuditEvent {
    AuditEvent::new(action, Outcome::Success).source("roles-test")
}

fn card(token: &str, fingerprint: &str) -> CardRow {
    CardRow {
        token: token.into(),
        tenant: "t1".into(),
        fingerprint: fingerprint.into(),
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

fn key(version: u32) -> StoredKey {
    StoredKey::new_active(KeyPurpose::Dek, version, "soft:test".into(), vec![7; 60], 1)
}

fn fp_key(version: u32) -> StoredKey {
    StoredKey::new_active(
        KeyPurpose::Fingerprint,
        version,
        "soft:test".into(),
        vec![8; 60],
        1,
    )
}

/// Assert that the database refused `sql` with SQLSTATE `code`.
async fn assert_refused(conn: &mut PgConnection, sql: &str, code: &str) -> String {
    match conn.execute(sql).await {
        Err(sqlx::Error::Database(e)) => {
            assert_eq!(e.code().as_deref(), Some(code), "{sql}: {e}");
            e.message().to_owned()
        }
        other => panic!("{sql}: expected a refusal with SQLSTATE {code}, got {other:?}"),
    }
}

async fn strings(conn: &mut PgConnection, sql: &str, role: &str) -> Vec<String> {
    sqlx::query_scalar(sql)
        .bind(role)
        .fetch_all(conn)
        .await
        .unwrap()
}

/// Everything the role `app` may do in the current database, as sorted
/// lines; read from the catalogs by the admin, so PUBLIC's privileges (and
/// those of roles it is a member of) count too.
async fn privileges_of(admin: &mut PgConnection, app: &str) -> Vec<String> {
    let mut out = strings(
        admin,
        "SELECT c.relname || ' ' || p.priv
           FROM pg_class c
          CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p(priv)
          WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            AND has_table_privilege($1, c.oid, p.priv)",
        app,
    )
    .await;
    // Column grants without the table-wide privilege.
    out.extend(
        strings(
            admin,
            "SELECT c.relname || '.' || a.attname || ' ' || p.priv
               FROM pg_class c
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) AS p(priv)
              WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                AND has_column_privilege($1, c.oid, a.attnum, p.priv)
                AND NOT has_table_privilege($1, c.oid, p.priv)",
            app,
        )
        .await,
    );
    out.extend(
        strings(
            admin,
            "SELECT 'sequence ' || c.relname || ' ' || p.priv
               FROM pg_class c
              CROSS JOIN unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) AS p(priv)
              WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'
                AND has_sequence_privilege($1, c.oid, p.priv)",
            app,
        )
        .await,
    );
    out.extend(
        strings(
            admin,
            "SELECT 'routine ' || p.proname
               FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace
                AND has_function_privilege($1, p.oid, 'EXECUTE')",
            app,
        )
        .await,
    );
    out.extend(
        strings(
            admin,
            "SELECT 'schema public ' || p.priv
               FROM unnest(ARRAY['USAGE', 'CREATE']) AS p(priv)
              WHERE has_schema_privilege($1, 'public', p.priv)",
            app,
        )
        .await,
    );
    out.extend(
        strings(
            admin,
            "SELECT 'database ' || p.priv
               FROM unnest(ARRAY['CONNECT', 'CREATE', 'TEMPORARY']) AS p(priv)
              WHERE has_database_privilege($1, current_database(), p.priv)",
            app,
        )
        .await,
    );
    out.sort();
    out
}

/// What the runtime role may do: exactly the list in deploy/postgres-roles.sql.
const APP_PRIVILEGES: &[&str] = &[
    "anomaly_tokens DELETE",
    "anomaly_tokens INSERT",
    "anomaly_tokens SELECT",
    "anomaly_windows DELETE",
    "anomaly_windows INSERT",
    "anomaly_windows SELECT",
    "anomaly_windows UPDATE",
    "audit_archives SELECT",
    "audit_checkpoints INSERT",
    "audit_checkpoints SELECT",
    "audit_events INSERT",
    "audit_events SELECT",
    "audit_head SELECT",
    "audit_head UPDATE",
    "audit_signing_keys INSERT",
    "audit_signing_keys SELECT",
    "audit_signing_keys.destroyed_at UPDATE",
    "audit_signing_keys.kek_id UPDATE",
    "audit_signing_keys.retired_at UPDATE",
    "audit_signing_keys.wrapped UPDATE",
    "cards DELETE",
    "cards INSERT",
    "cards SELECT",
    "cards UPDATE",
    "collect_sessions DELETE",
    "collect_sessions INSERT",
    "collect_sessions SELECT",
    "collect_sessions.claimed_until UPDATE",
    "collect_sessions.closed_at UPDATE",
    "collect_sessions.completed_at UPDATE",
    "collect_sessions.failures UPDATE",
    "collect_sessions.token UPDATE",
    "database CONNECT",
    "forward_idempotency DELETE",
    "forward_idempotency INSERT",
    "forward_idempotency SELECT",
    "forward_idempotency.ciphertext UPDATE",
    "forward_idempotency.completed_at UPDATE",
    "forward_idempotency.content_type UPDATE",
    "forward_idempotency.key_version UPDATE",
    "forward_idempotency.location UPDATE",
    "forward_idempotency.nonce UPDATE",
    "forward_idempotency.state UPDATE",
    "forward_idempotency.status UPDATE",
    "forward_idempotency.tenant UPDATE",
    "principals INSERT",
    "principals SELECT",
    "principals.revoked_at UPDATE",
    "rate_buckets INSERT",
    "rate_buckets SELECT",
    "rate_buckets UPDATE",
    "schema public USAGE",
    "source_blocks DELETE",
    "source_blocks INSERT",
    "source_blocks SELECT",
    "source_blocks UPDATE",
    "storage_probe SELECT",
    "storage_probe.probed_at UPDATE",
    "tenants INSERT",
    "tenants SELECT",
    "tenants UPDATE",
    "vault_keys INSERT",
    "vault_keys SELECT",
    "vault_keys.destroyed_at UPDATE",
    "vault_keys.kek_id UPDATE",
    "vault_keys.reencrypted_at UPDATE",
    "vault_keys.retired_at UPDATE",
    "vault_keys.state UPDATE",
    "vault_keys.wrapped UPDATE",
];

/// What the auditor role may do: read the audit trail (what `vault-audit
/// verify` reads, `audit/src/db.rs`) and nothing else.
const AUDITOR_PRIVILEGES: &[&str] = &[
    "audit_archives SELECT",
    "audit_checkpoints SELECT",
    "audit_events SELECT",
    "database CONNECT",
    "schema public USAGE",
];

/// Every table the migrations create. A new table fails this test until it
/// has a deliberate line (or a deliberate absence) for each role in phase
/// grants of deploy/postgres-roles.sql (and in `APP_PRIVILEGES` and
/// `AUDITOR_PRIVILEGES`).
const TABLES: &[&str] = &[
    "_sqlx_migrations",
    "anomaly_tokens",
    "anomaly_windows",
    "audit_archives",
    "audit_checkpoints",
    "audit_events",
    "audit_head",
    "audit_signing_keys",
    "cards",
    "collect_sessions",
    "forward_idempotency",
    "principals",
    "rate_buckets",
    "source_blocks",
    "storage_probe",
    "tenants",
    "vault_keys",
];

/// Who owns what, and that the roles carry no dangerous attribute.
async fn assert_ownership(admin: &mut PgConnection, roles: &TestRoles, db: &str) {
    let owner_of_db: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
    )
    .bind(db)
    .fetch_one(&mut *admin)
    .await
    .unwrap();
    assert_eq!(owner_of_db, roles.owner);
    let owner_of_schema: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'public'",
    )
    .fetch_one(&mut *admin)
    .await
    .unwrap();
    assert_eq!(owner_of_schema, roles.owner);
    // Everything in the schema belongs to the owner; the runtime and auditor
    // roles own nothing anywhere in this database.
    let not_owners: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT pg_get_userbyid(relowner)::text FROM pg_class
          WHERE relnamespace = 'public'::regnamespace
         UNION
         SELECT DISTINCT pg_get_userbyid(proowner)::text FROM pg_proc
          WHERE pronamespace = 'public'::regnamespace",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    assert_eq!(not_owners, vec![roles.owner.clone()]);
    for role in [&roles.app, &roles.auditor] {
        let owned: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM pg_class WHERE relowner = $1::regrole)
                  + (SELECT count(*) FROM pg_proc WHERE proowner = $1::regrole)
                  + (SELECT count(*) FROM pg_namespace WHERE nspowner = $1::regrole)
                  + (SELECT count(*) FROM pg_type WHERE typowner = $1::regrole)
                  + (SELECT count(*) FROM pg_database WHERE datdba = $1::regrole)",
        )
        .bind(role)
        .fetch_one(&mut *admin)
        .await
        .unwrap();
        assert_eq!(owned, 0, "{role} owns something");
    }
    // PUBLIC has nothing on the database or the schema.
    let public_grants: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_database, aclexplode(datacl) a
                  WHERE datname = $1 AND a.grantee = 0)
              + (SELECT count(*) FROM pg_namespace, aclexplode(nspacl) a
                  WHERE nspname = 'public' AND a.grantee = 0)",
    )
    .bind(db)
    .fetch_one(&mut *admin)
    .await
    .unwrap();
    assert_eq!(public_grants, 0);
    let attributes: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT rolname::text, rolcanlogin,
                rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls
           FROM pg_roles WHERE rolname IN ($1, $2, $3) ORDER BY rolname",
    )
    .bind(&roles.app)
    .bind(&roles.auditor)
    .bind(&roles.owner)
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    assert_eq!(
        attributes,
        vec![
            (roles.app.clone(), true, false),
            (roles.auditor.clone(), true, false),
            (roles.owner.clone(), true, false)
        ]
    );
    for (member, of) in [
        (&roles.app, &roles.owner),
        (&roles.auditor, &roles.owner),
        (&roles.auditor, &roles.app),
    ] {
        let is_member: bool = sqlx::query_scalar("SELECT pg_has_role($1, $2, 'MEMBER')")
            .bind(member)
            .bind(of)
            .fetch_one(&mut *admin)
            .await
            .unwrap();
        assert!(!is_member, "{member} is a member of {of}");
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class
          WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p') ORDER BY 1",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    assert_eq!(tables, TABLES);
}

#[tokio::test]
async fn the_runtime_role_runs_the_service_and_cannot_change_the_schema_or_the_audit_trail() {
    // Roles first: dropped after the database the owner owns.
    let roles = TestRoles::new();
    let db = PgTestDb::create().await;
    let owner_url = url_as(&db.url, &roles.owner);
    let app_url = url_as(&db.url, &roles.app);

    // 1. Roles and database (the database exists already here, as when it
    //    was created from a cloud console: the file takes it over).
    phase_ok(&roles, &db.name, "setup");
    // 2. Migrations as the owner.
    let owner = PgStore::open(&owner_url, PgSettings::default())
        .await
        .unwrap();
    // 3. The runtime and auditor roles' grants.
    phase_ok(&roles, &db.name, "grants");

    let mut admin = PgConnection::connect(&db.url).await.unwrap();
    assert_ownership(&mut admin, &roles, &db.name).await;
    assert_eq!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);
    assert_eq!(
        privileges_of(&mut admin, &roles.auditor).await,
        AUDITOR_PRIVILEGES
    );

    // 4. The service, as the runtime role, through the Store trait.
    let app_store = PgStore::connect_lazy(&app_url, PgSettings::default()).unwrap();
    let app: Arc<dyn Store> = Arc::new(app_store.clone());
    app.ping().await.unwrap();
    assert!(app.is_empty().await.unwrap());

    assert!(app
        .insert_key(&key(1), ev(Action::KeyGenerated))
        .await
        .unwrap());
    assert!(!app
        .insert_key(&key(1), ev(Action::KeyGenerated))
        .await
        .unwrap());
    assert!(app
        .insert_key(&fp_key(1), ev(Action::KeyGenerated))
        .await
        .unwrap());
    assert_eq!(app.load_keys().await.unwrap(), vec![key(1), fp_key(1)]);

    let first = app
        .insert_cards(
            vec![
                NewCard {
                    row: card("tok_a", "fp_a"),
                    event: ev(Action::Tokenize),
                    previous_fingerprints: vec![],
                },
                NewCard {
                    row: card("tok_b", "fp_b"),
                    event: ev(Action::Tokenize),
                    previous_fingerprints: vec![],
                },
            ],
            vec![],
        )
        .await
        .unwrap();
    assert!(first.iter().all(|i| i.created));
    // The same card again: the existing row (the SELECT after ON CONFLICT).
    let again = app
        .insert_cards(
            vec![NewCard {
                row: card("tok_other", "fp_a"),
                event: ev(Action::Tokenize),
                previous_fingerprints: vec![],
            }],
            vec![],
        )
        .await
        .unwrap();
    assert!(!again[0].created);
    assert_eq!(again[0].row.token, "tok_a");
    assert_eq!(
        app.find_card("tok_a").await.unwrap(),
        Some(card("tok_a", "fp_a"))
    );
    assert!(app
        .delete_card("tok_a", "t1", ev(Action::Delete))
        .await
        .unwrap());
    assert_eq!(app.find_card("tok_a").await.unwrap(), None);

    let seq = app.append_audit(ev(Action::Detokenize)).await.unwrap();
    let events = app.audit_events(0, 100).await.unwrap();
    assert_eq!(events.last().map(|e| e.seq), Some(seq));
    assert_eq!(
        events.len(),
        7,
        "2 keys, 2 cards, existing card, delete, read"
    );

    let principal = PrincipalRow {
        id: "p1".into(),
        name: "checkout".into(),
        roles: "tokenize".into(),
        tenants: "*".into(),
        key_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        created_at: 1,
        revoked_at: None,
        cert_identity: None,
    };
    // The principal change feed works as the runtime role: it may LISTEN,
    // and the trigger of migration 0010 fires for its changes (a trigger
    // function needs no EXECUTE grant to fire).
    let mut changes = app.principal_changes().unwrap();
    async fn next(changes: &mut crate::store::PrincipalChanges) -> crate::store::PrincipalChange {
        tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv())
            .await
            .unwrap()
            .unwrap()
    }
    assert!(matches!(
        next(&mut changes).await,
        crate::store::PrincipalChange::Confirmed { .. }
    ));
    app.insert_principal(&principal, ev(Action::PrincipalCreated))
        .await
        .unwrap();
    assert_eq!(
        app.list_principals().await.unwrap(),
        vec![principal.clone()]
    );
    assert!(app
        .revoke_principal("checkout", 2, ev(Action::PrincipalRevoked))
        .await
        .unwrap());
    for _ in 0..2 {
        // (Heartbeats may come in between.)
        loop {
            match next(&mut changes).await {
                crate::store::PrincipalChange::Confirmed { .. } => {}
                other => {
                    assert_eq!(other, crate::store::PrincipalChange::Changed("p1".into()));
                    break;
                }
            }
        }
    }
    drop(changes);
    assert_eq!(
        app.find_principal("p1").await.unwrap().unwrap().revoked_at,
        Some(2)
    );

    // `tokenizer backup` works as the runtime role (one read-only snapshot).
    let mut exported = Vec::new();
    app.export(&mut |r| {
        exported.push(r);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        exported.len(),
        2 + 1 + 1 + 9,
        "keys, principal, card, events"
    );

    // 5. The runtime role cannot change the schema, the privileges or the
    //    audit trail.
    let mut as_app = PgConnection::connect(&app_url).await.unwrap();
    for sql in [
        "ALTER TABLE cards ADD COLUMN x int",
        "CREATE TABLE t (x int)",
        "CREATE TEMPORARY TABLE t (x int)",
        "CREATE SCHEMA s",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE INDEX cards_x ON cards (brand)",
        "DROP TABLE cards",
        "UPDATE audit_events SET reason = 'x'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "TRUNCATE cards",
        "ALTER TABLE audit_events DISABLE TRIGGER ALL",
        "DROP TRIGGER audit_events_no_update ON audit_events",
        "DROP TRIGGER audit_events_delete_archived_only ON audit_events",
        // Archiving is the owner's (`tokenizer audit archive`): the runtime
        // role only reads the archived segments (for backups).
        "INSERT INTO audit_archives (to_seq, from_seq, chain_head, frontier, file_name, file_sha256, archived_at)
         VALUES (1, 1, '\\x00', '', 'f', 'x', 'now')",
        "DELETE FROM audit_archives",
        "UPDATE audit_archives SET file_name = 'x'",
        // Principals: only revocation is an update; roles stay as created.
        "UPDATE principals SET roles = 'key_admin'",
        "UPDATE principals SET key_hash = 'x'",
        // A key's identity and age never change; keys are never deleted
        // (a destroyed key keeps its row, without material).
        "UPDATE vault_keys SET purpose = 'fingerprint'",
        "UPDATE vault_keys SET version = 9",
        "UPDATE vault_keys SET created_at = 0",
        "DELETE FROM vault_keys",
        "UPDATE audit_signing_keys SET public_key = 'x'",
        "DELETE FROM audit_signing_keys",
        // No use for the sequence: the identity column needs no grant.
        "SELECT nextval(pg_get_serial_sequence('audit_events', 'seq'))",
        "SELECT setval(pg_get_serial_sequence('audit_events', 'seq'), 1)",
        // The migration bookkeeping is the owner's alone.
        "SELECT * FROM _sqlx_migrations",
        "DELETE FROM _sqlx_migrations",
        // An idempotency key's owner, upstream, key and request never
        // change: only its completion is an update.
        "UPDATE forward_idempotency SET principal_id = 'x'",
        "UPDATE forward_idempotency SET request_hash = 'x'",
        "UPDATE forward_idempotency SET created_at = 0",
    ] {
        assert_refused(&mut as_app, sql, DENIED).await;
    }
    assert_eq!(
        privileges_of(&mut admin, &roles.app).await,
        APP_PRIVILEGES,
        "unchanged by the attempts"
    );

    // `PgStore::migrate` as the runtime role: sqlx's first statement,
    // `CREATE TABLE IF NOT EXISTS _sqlx_migrations`, needs CREATE on the
    // schema even though the table exists, so it is refused before any
    // migration is looked at. (`tokenizer serve` with the default
    // `migrate_on_start = true` therefore fails to start as this role.)
    let migrating = PgStore::connect_lazy(&app_url, PgSettings::default()).unwrap();
    match migrating.migrate().await {
        Err(StoreError::Migration(sqlx::migrate::MigrateError::Execute(
            sqlx::Error::Database(e),
        ))) => {
            assert_eq!(e.code().as_deref(), Some(DENIED), "{e}");
            assert!(
                e.message().contains("permission denied for schema public"),
                "{e}"
            );
        }
        other => panic!("the runtime role must not migrate: {other:?}"),
    }
    // Migrations run on a session of their own, closed even after a failure,
    // so no advisory lock is left behind for the owner's migrate to wait on.
    migrating.close().await;
    // Nothing changed: the owner sees the same applied migrations and
    // migrates again without error.
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(applied, 14);
    owner.migrate().await.unwrap();

    // `tokenizer restore` is an owner operation: as the runtime role the
    // import inserts (INSERT is granted) but cannot move the audit sequence
    // past the restored numbers, so the whole restore rolls back.
    let restore = vec![
        BackupRecord::Key(StoredKey {
            state: KeyState::DecryptOnly,
            ..key(9)
        }),
        BackupRecord::Audit(AuditRow {
            seq: 1000,
            event: ev(Action::KeyGenerated),
            chain: None,
        }),
    ];
    match app.import(restore.clone()).await {
        Err(StoreError::Unavailable(sqlx::Error::Database(e))) => {
            assert_eq!(e.code().as_deref(), Some(DENIED), "{e}");
            assert!(e.message().contains("sequence"), "{e}");
        }
        other => panic!("the runtime role must not move the audit sequence: {other:?}"),
    }
    assert_eq!(
        app.load_keys().await.unwrap(),
        vec![key(1), fp_key(1)],
        "rolled back"
    );

    // 6. The owner cannot change the audit trail either: the triggers.
    //    (Nothing is archived here, so no entry may be deleted.)
    let mut as_owner = PgConnection::connect(&owner_url).await.unwrap();
    for (sql, expected) in [
        (
            "UPDATE audit_events SET reason = 'x'",
            "audit_events is append-only",
        ),
        (
            "DELETE FROM audit_events",
            "audit_events is append-only (only archived entries may be deleted)",
        ),
        ("TRUNCATE audit_events", "audit_events is append-only"),
    ] {
        let message = assert_refused(&mut as_owner, sql, RAISED).await;
        assert_eq!(message, expected, "{sql}");
    }
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(kept, 9);

    // 7. Key lifecycle as the runtime role: rotation, a re-encryption pass,
    //    retirement, destruction, re-wrapping under another KEK.
    app.rotate_keys(
        &[key(2), fp_key(2)],
        vec![ev(Action::KeyRotated), ev(Action::ReencryptionStarted)],
    )
    .await
    .unwrap();
    let pass = PassBatch {
        dek_version: 2,
        fingerprint_version: 2,
        after: None,
        limit: 10,
        count: false,
        finished_event: ev(Action::ReencryptionFinished),
    };
    let resealer = |row: &CardRow| {
        Some(Resealed {
            key_version: 2,
            nonce: vec![1; 12],
            ciphertext: vec![4, 5, 6],
            fingerprint: format!("{}-2", row.fingerprint),
            fingerprint_version: 2,
        })
    };
    let done = app.reencrypt_batch(&pass, &resealer).await.unwrap();
    assert_eq!(
        (done.moved, done.remaining, done.finished),
        (1, Some(0), true)
    );
    assert_eq!(
        app.change_key_state(
            KeyPurpose::Dek,
            1,
            KeyChange::Retire,
            5,
            ev(Action::KeyRetired)
        )
        .await
        .unwrap(),
        KeyChangeOutcome::Done
    );
    assert_eq!(
        app.change_key_state(
            KeyPurpose::Dek,
            1,
            KeyChange::Destroy,
            6,
            ev(Action::KeyDestroyed)
        )
        .await
        .unwrap(),
        KeyChangeOutcome::Done
    );
    let rewrapped: Vec<StoredKey> = app
        .load_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.state != KeyState::Destroyed)
        .map(|k| StoredKey {
            kek_id: "soft:new".into(),
            ..k
        })
        .collect();
    app.rewrap_keys("soft:test", &rewrapped, &[], ev(Action::KekRotated))
        .await
        .unwrap();
    let keys = app.load_keys().await.unwrap();
    assert_eq!(keys[0].state, KeyState::Destroyed);
    assert!(keys[0].wrapped.is_empty());
    assert!(keys[1..].iter().all(|k| k.kek_id == "soft:new"));
    assert_eq!(
        app.key_usage()
            .await
            .unwrap()
            .by_dek
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(2, 1)]
    );

    as_app.close().await.unwrap();
    as_owner.close().await.unwrap();
    admin.close().await.unwrap();
    app.close().await;
    owner.close().await;
    let names = roles.all().map(str::to_owned);
    drop(db);
    drop(roles);
    assert_roles_gone(&names).await;
}

async fn assert_roles_gone(names: &[String]) {
    let mut conn = PgConnection::connect(&pg_admin_url()).await.unwrap();
    let left: Vec<String> =
        sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)")
            .bind(names)
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(left.is_empty(), "roles left behind: {left:?}");
}

#[tokio::test]
async fn the_roles_file_creates_the_database_refuses_misuse_and_can_be_rerun() {
    let roles = TestRoles::new();
    let name = format!("cv_test_{}", random_suffix());
    // The file creates this database; the guard drops it.
    let db = PgTestDb {
        url: match pg_admin_url().rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("CARDVAULT_TEST_PG_URL must end with /DATABASE"),
        },
        name,
    };

    // Without a phase: an error, and nothing created.
    let out = run_roles_sql(&roles, &db.name, None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-v phase=setup"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_roles_gone(&roles.all().map(str::to_owned)).await;

    // Three roles, not fewer: refused by either phase before it changes
    // anything.
    for phase in ["setup", "grants"] {
        for (name, value) in [
            ("auditor_role", &roles.app),
            ("auditor_role", &roles.owner),
            ("app_role", &roles.owner),
        ] {
            let out = run_roles_sql_with(&roles, &db.name, Some(phase), &[(name, value)]);
            assert!(!out.status.success());
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("must be three roles"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_roles_gone(&roles.all().map(str::to_owned)).await;

    phase_ok(&roles, &db.name, "setup");
    phase_ok(&roles, &db.name, "setup");

    // Grants before the migrations: refused as a whole (one transaction).
    let out = run_roles_sql(&roles, &db.name, Some("grants"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("relation \"cards\" does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut admin = PgConnection::connect(&db.url).await.unwrap();
    for role in [&roles.app, &roles.auditor] {
        assert_eq!(privileges_of(&mut admin, role).await, Vec::<String>::new());
    }

    let owner = PgStore::open(&url_as(&db.url, &roles.owner), PgSettings::default())
        .await
        .unwrap();
    phase_ok(&roles, &db.name, "grants");
    assert_ownership(&mut admin, &roles, &db.name).await;
    assert_eq!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);
    assert_eq!(
        privileges_of(&mut admin, &roles.auditor).await,
        AUDITOR_PRIVILEGES
    );

    // A stray grant (say, by hand during an incident) is undone by a re-run;
    // so is PUBLIC's CREATE on the schema.
    for role in [&roles.app, &roles.auditor] {
        for sql in [
            format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"),
            format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"),
            format!("GRANT ALL ON ALL ROUTINES IN SCHEMA public TO {role}"),
            format!("GRANT TEMPORARY ON DATABASE {} TO {role}", db.name),
        ] {
            admin.execute(sql.as_str()).await.unwrap();
        }
    }
    admin
        .execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        .await
        .unwrap();
    assert_ne!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);
    assert_ne!(
        privileges_of(&mut admin, &roles.auditor).await,
        AUDITOR_PRIVILEGES
    );
    phase_ok(&roles, &db.name, "setup");
    phase_ok(&roles, &db.name, "grants");
    assert_eq!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);
    assert_eq!(
        privileges_of(&mut admin, &roles.auditor).await,
        AUDITOR_PRIVILEGES
    );
    assert_ownership(&mut admin, &roles, &db.name).await;

    // An auditor role that acts as the owner or the runtime role (and so
    // could write) is refused by phase setup.
    for of in [&roles.owner, &roles.app] {
        admin
            .execute(format!("GRANT {of} TO {}", roles.auditor).as_str())
            .await
            .unwrap();
        let out = run_roles_sql(&roles, &db.name, Some("setup"));
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains(&format!("role {} is a member of {of}", roles.auditor)),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        admin
            .execute(format!("REVOKE {of} FROM {}", roles.auditor).as_str())
            .await
            .unwrap();
    }
    phase_ok(&roles, &db.name, "setup");

    // A role that is a superuser is refused by phase setup.
    admin
        .execute(format!("ALTER ROLE {} SUPERUSER", roles.app).as_str())
        .await
        .unwrap();
    let out = run_roles_sql(&roles, &db.name, Some("setup"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has SUPERUSER"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    admin.close().await.unwrap();
    owner.close().await;
    let names = roles.all().map(str::to_owned);
    drop(db);
    drop(roles);
    assert_roles_gone(&names).await;
}

/// The auditor role is what `vault-audit verify --database-url
/// postgres://cardvault_auditor@...` runs as: it verifies the trail the
/// runtime role wrote (also after the owner archived a segment and deleted
/// its entries) and reads or writes nothing else.
#[tokio::test]
async fn the_auditor_role_verifies_the_trail_and_reads_nothing_else() {
    use futures_util::StreamExt as _;

    let roles = TestRoles::new();
    let db = PgTestDb::create().await;
    let owner_url = url_as(&db.url, &roles.owner);
    let app_url = url_as(&db.url, &roles.app);
    let auditor_url = url_as(&db.url, &roles.auditor);
    phase_ok(&roles, &db.name, "setup");
    let owner = PgStore::open(&owner_url, PgSettings::default())
        .await
        .unwrap();
    phase_ok(&roles, &db.name, "grants");
    let mut admin = PgConnection::connect(&db.url).await.unwrap();
    assert_eq!(
        privileges_of(&mut admin, &roles.auditor).await,
        AUDITOR_PRIVILEGES
    );

    // The service, as the runtime role, writes a trail and signs a
    // checkpoint of it; two entries follow the checkpoint.
    let app = PgStore::connect_lazy(&app_url, PgSettings::default()).unwrap();
    let signing = audit::SigningKey::generate().unwrap();
    let verifying = signing.verifying_key();
    app.insert_key(&key(1), ev(Action::KeyGenerated))
        .await
        .unwrap();
    // The fingerprint key the cards below name, without an entry of its own.
    sqlx::query(
        "INSERT INTO vault_keys (purpose, version, kek_id, wrapped, state, created_at)
         VALUES ('fingerprint', 1, 'soft:test', '\\x08', 'active', 1)",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    app.insert_cards(
        vec![
            NewCard {
                row: card("tok_a", "fp_a"),
                event: ev(Action::Tokenize),
                previous_fingerprints: vec![],
            },
            NewCard {
                row: card("tok_b", "fp_b"),
                event: ev(Action::Tokenize),
                previous_fingerprints: vec![],
            },
        ],
        vec![],
    )
    .await
    .unwrap();
    for _ in 0..3 {
        app.append_audit(ev(Action::Detokenize)).await.unwrap();
    }
    let first = app.write_checkpoint(&signing).await.unwrap().unwrap();
    assert_eq!(first.tree_size, 6);
    for _ in 0..2 {
        app.append_audit(ev(Action::Detokenize)).await.unwrap();
    }

    // `vault-audit verify` as the auditor.
    let verified = audit::auditor::verify_database(&auditor_url, &verifying, None, &[])
        .await
        .unwrap_or_else(|e| panic!("verify as the auditor role: {e}"));
    assert_eq!(verified.report.start, 0);
    assert_eq!(verified.report.entries, 8);
    assert_eq!(verified.report.checkpoints, 1);
    assert_eq!(verified.report.anchored, 6);
    assert_eq!(verified.legacy_rows, Some(0));
    assert!(verified.archived.is_empty());

    // Every query of `audit::db` works as the auditor and reads what the
    // service wrote.
    let entries = app.chained_events(0, 100).await.unwrap();
    assert_eq!(entries.len(), 8);
    let mut trail = audit::db::TrailDb::open(&auditor_url).await.unwrap();
    assert_eq!(trail.legacy_rows().await.unwrap(), 0);
    assert_eq!(trail.archives().await.unwrap(), vec![]);
    let read: Vec<_> = trail.entries().map(Result::unwrap).collect().await;
    assert_eq!(read, entries);
    let read: Vec<_> = trail
        .entries_in(Some((7, 8)))
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(read, entries[6..]);
    let read: Vec<_> = trail.checkpoints().map(Result::unwrap).collect().await;
    assert_eq!(read, vec![first.clone()]);
    trail.close().await;

    // Nothing else: no card data, principals, keys, chain head or signing
    // keys, no write anywhere, nothing created.
    let mut as_auditor = PgConnection::connect(&auditor_url).await.unwrap();
    for sql in [
        "SELECT * FROM cards",
        "SELECT token FROM cards",
        "SELECT * FROM principals",
        "SELECT * FROM vault_keys",
        "SELECT * FROM audit_head",
        "SELECT * FROM audit_signing_keys",
        "SELECT * FROM _sqlx_migrations",
        "INSERT INTO audit_events (time, action, outcome) VALUES ('2026-01-01T00:00:00Z', 'tokenize', 'success')",
        "INSERT INTO audit_checkpoints (tree_size, root, chain_head, time, key_id, signature)
         VALUES (99, '\\x00', '\\x00', 'now', 'k', '\\x00')",
        "INSERT INTO audit_archives (to_seq, from_seq, chain_head, frontier, file_name, file_sha256, archived_at)
         VALUES (6, 1, '\\x00', '', 'f', 'x', 'now')",
        "INSERT INTO cards (token) VALUES ('x')",
        "UPDATE audit_events SET reason = 'x'",
        "DELETE FROM audit_events",
        "DELETE FROM audit_events WHERE chain_seq <= 6",
        "TRUNCATE audit_events",
        "UPDATE audit_head SET size = 0",
        "DELETE FROM audit_archives",
        "SELECT nextval(pg_get_serial_sequence('audit_events', 'seq'))",
        "CREATE TABLE t (x int)",
        "CREATE TEMPORARY TABLE t (x int)",
        "CREATE SCHEMA s",
    ] {
        assert_refused(&mut as_auditor, sql, DENIED).await;
    }

    // Archiving the first segment (1..=6, up to the checkpoint), as
    // `tokenizer audit archive` does in the database: only the owner may
    // record the segment and delete its entries.
    let anchor = audit::verify_trail(&entries[..6], vec![first.clone()], &verifying)
        .unwrap()
        .end;
    assert_eq!(anchor.tree_size, 6);
    let mut as_app = PgConnection::connect(&app_url).await.unwrap();
    for sql in [
        "INSERT INTO audit_archives (to_seq, from_seq, chain_head, frontier, file_name, file_sha256, archived_at)
         VALUES (6, 1, '\\x00', '', 'f', 'x', 'now')",
        "DELETE FROM audit_events WHERE chain_seq <= 6",
    ] {
        assert_refused(&mut as_app, sql, DENIED).await;
    }
    let mut as_owner = PgConnection::connect(&owner_url).await.unwrap();
    sqlx::query(
        "INSERT INTO audit_archives (from_seq, to_seq, chain_head, frontier, file_name, file_sha256, archived_at)
         VALUES (1, $1, $2, $3, 'audit-000001-000006.jsonl', $4, '2026-01-01T00:00:00Z')",
    )
    .bind(6_i64)
    .bind(anchor.chain_head.to_vec())
    .bind(anchor.frontier.concat())
    .bind("0".repeat(64))
    .execute(&mut as_owner)
    .await
    .unwrap();
    // An entry after the segment stays, even for the owner.
    let message = assert_refused(
        &mut as_owner,
        "DELETE FROM audit_events WHERE chain_seq = 7",
        RAISED,
    )
    .await;
    assert_eq!(
        message,
        "audit_events is append-only (only archived entries may be deleted)"
    );
    let deleted = sqlx::query("DELETE FROM audit_events WHERE chain_seq <= 6")
        .execute(&mut as_owner)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 6);

    // The service goes on; the auditor verifies the entries left in the
    // database from the archived segment's anchor.
    app.append_audit(ev(Action::Detokenize)).await.unwrap();
    let second = app.write_checkpoint(&signing).await.unwrap().unwrap();
    assert_eq!(second.tree_size, 9);
    let verified = audit::auditor::verify_database(&auditor_url, &verifying, None, &[])
        .await
        .unwrap_or_else(|e| panic!("verify as the auditor role after archiving: {e}"));
    assert_eq!(verified.report.start, 6);
    assert_eq!(verified.report.entries, 3);
    assert_eq!(verified.report.last_seq, 9);
    assert_eq!(verified.report.anchored, 9);
    assert_eq!(verified.archived.len(), 1);
    assert_eq!(verified.archived[0].anchor, anchor);
    let mut trail = audit::db::TrailDb::open(&auditor_url).await.unwrap();
    assert_eq!(trail.archives().await.unwrap(), verified.archived);
    trail.close().await;
    assert_eq!(
        privileges_of(&mut admin, &roles.auditor).await,
        AUDITOR_PRIVILEGES,
        "unchanged by the attempts"
    );

    as_auditor.close().await.unwrap();
    as_app.close().await.unwrap();
    as_owner.close().await.unwrap();
    admin.close().await.unwrap();
    app.close().await;
    owner.close().await;
    let names = roles.all().map(str::to_owned);
    drop(db);
    drop(roles);
    assert_roles_gone(&names).await;
}
