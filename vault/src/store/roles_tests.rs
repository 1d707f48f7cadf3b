//! The shipped PostgreSQL roles (`deploy/postgres-roles.sql`) against a real
//! server: the runtime role can do everything the service does and nothing
//! that changes the schema or the audit trail; the owner migrates, and even
//! it cannot change the audit trail (triggers).
//!
//! The file is run as an operator runs it: with `psql` (which must be
//! installed; a missing `psql` or PostgreSQL fails these tests, never skips
//! them), fed on stdin from `include_str!`, with the role and database names
//! passed as psql variables (`-v owner_role=... -v app_role=... -v
//! db_name=...`), so nothing in the file is rewritten. Roles are cluster-wide:
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

/// An owner and a runtime role name, unique to this run; both roles are
/// dropped (if they exist) when this is dropped. Declare it before the
/// database, so the database (which the owner owns) is dropped first.
struct TestRoles {
    owner: String,
    app: String,
}

impl TestRoles {
    fn new() -> TestRoles {
        let s = random_suffix();
        TestRoles {
            owner: format!("cv_owner_{s}"),
            app: format!("cv_app_{s}"),
        }
    }
}

impl Drop for TestRoles {
    fn drop(&mut self) {
        let sql = format!("DROP ROLE IF EXISTS {}, {}", self.app, self.owner);
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
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-w", "-v", "ON_ERROR_STOP=1"])
        .arg("-v")
        .arg(format!("owner_role={}", roles.owner))
        .arg("-v")
        .arg(format!("app_role={}", roles.app))
        .arg("-v")
        .arg(format!("db_name={db}"));
    if let Some(phase) = phase {
        cmd.arg("-v").arg(format!("phase={phase}"));
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
    }
}

fn key(version: u32) -> StoredKey {
    StoredKey {
        purpose: KeyPurpose::Dek,
        version,
        kek_id: "soft:test".into(),
        wrapped: vec![7; 60],
        created_at: 1,
    }
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

/// Everything `app` may do in the current database, as sorted lines; read
/// from the catalogs by the admin, so PUBLIC's privileges count too.
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
    "audit_checkpoints INSERT",
    "audit_checkpoints SELECT",
    "audit_events INSERT",
    "audit_events SELECT",
    "audit_head SELECT",
    "audit_head UPDATE",
    "audit_signing_keys INSERT",
    "audit_signing_keys SELECT",
    "cards DELETE",
    "cards INSERT",
    "cards SELECT",
    "cards UPDATE",
    "database CONNECT",
    "principals INSERT",
    "principals SELECT",
    "principals.revoked_at UPDATE",
    "schema public USAGE",
    "vault_keys INSERT",
    "vault_keys SELECT",
];

/// Every table the migrations create. A new table fails this test until it
/// has a deliberate line in phase grants of deploy/postgres-roles.sql (and
/// in `APP_PRIVILEGES`).
const TABLES: &[&str] = &[
    "_sqlx_migrations",
    "audit_checkpoints",
    "audit_events",
    "audit_head",
    "audit_signing_keys",
    "cards",
    "principals",
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
    // Everything in the schema belongs to the owner; the runtime role owns
    // nothing anywhere in this database.
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
    let owned_by_app: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_class WHERE relowner = $1::regrole)
              + (SELECT count(*) FROM pg_proc WHERE proowner = $1::regrole)
              + (SELECT count(*) FROM pg_namespace WHERE nspowner = $1::regrole)
              + (SELECT count(*) FROM pg_type WHERE typowner = $1::regrole)
              + (SELECT count(*) FROM pg_database WHERE datdba = $1::regrole)",
    )
    .bind(&roles.app)
    .fetch_one(&mut *admin)
    .await
    .unwrap();
    assert_eq!(owned_by_app, 0);
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
    let attributes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT rolname::text, rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls
           FROM pg_roles WHERE rolname IN ($1, $2) ORDER BY rolname",
    )
    .bind(&roles.app)
    .bind(&roles.owner)
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    assert_eq!(
        attributes,
        vec![(roles.app.clone(), false), (roles.owner.clone(), false)]
    );
    let app_is_owner: bool = sqlx::query_scalar("SELECT pg_has_role($1, $2, 'MEMBER')")
        .bind(&roles.app)
        .bind(&roles.owner)
        .fetch_one(&mut *admin)
        .await
        .unwrap();
    assert!(!app_is_owner);
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
    // 3. The runtime role's grants.
    phase_ok(&roles, &db.name, "grants");

    let mut admin = PgConnection::connect(&db.url).await.unwrap();
    assert_ownership(&mut admin, &roles, &db.name).await;
    assert_eq!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);

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
    assert_eq!(app.load_keys().await.unwrap(), vec![key(1)]);

    let first = app
        .insert_cards(
            vec![
                NewCard {
                    row: card("tok_a", "fp_a"),
                    event: ev(Action::Tokenize),
                },
                NewCard {
                    row: card("tok_b", "fp_b"),
                    event: ev(Action::Tokenize),
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
    assert_eq!(events.len(), 6, "key, 2 cards, existing card, delete, read");

    let principal = PrincipalRow {
        id: "p1".into(),
        name: "checkout".into(),
        roles: "tokenize".into(),
        tenants: "*".into(),
        key_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        created_at: 1,
        revoked_at: None,
    };
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
        1 + 1 + 1 + 8,
        "key, principal, card, events"
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
        "DROP TRIGGER audit_events_no_update_delete ON audit_events",
        // Principals: only revocation is an update; roles stay as created.
        "UPDATE principals SET roles = 'key_admin'",
        "UPDATE principals SET key_hash = 'x'",
        // Keys are never rewritten in place.
        "UPDATE vault_keys SET wrapped = '\\x00'",
        "DELETE FROM vault_keys",
        // No use for the sequence: the identity column needs no grant.
        "SELECT nextval(pg_get_serial_sequence('audit_events', 'seq'))",
        "SELECT setval(pg_get_serial_sequence('audit_events', 'seq'), 1)",
        // The migration bookkeeping is the owner's alone.
        "SELECT * FROM _sqlx_migrations",
        "DELETE FROM _sqlx_migrations",
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
    assert_eq!(applied, 2);
    owner.migrate().await.unwrap();

    // `tokenizer restore` is an owner operation: as the runtime role the
    // import inserts (INSERT is granted) but cannot move the audit sequence
    // past the restored numbers, so the whole restore rolls back.
    let restore = vec![
        BackupRecord::Key(key(9)),
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
    assert_eq!(app.load_keys().await.unwrap(), vec![key(1)], "rolled back");

    // 6. The owner cannot change the audit trail either: the triggers.
    let mut as_owner = PgConnection::connect(&owner_url).await.unwrap();
    for sql in [
        "UPDATE audit_events SET reason = 'x'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let message = assert_refused(&mut as_owner, sql, RAISED).await;
        assert_eq!(message, "audit_events is append-only", "{sql}");
    }
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(kept, 8);

    as_app.close().await.unwrap();
    as_owner.close().await.unwrap();
    admin.close().await.unwrap();
    app.close().await;
    owner.close().await;
    let (app_role, owner_role) = (roles.app.clone(), roles.owner.clone());
    drop(db);
    drop(roles);
    assert_roles_gone(&app_role, &owner_role).await;
}

async fn assert_roles_gone(app: &str, owner: &str) {
    let mut conn = PgConnection::connect(&pg_admin_url()).await.unwrap();
    let left: Vec<String> =
        sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname IN ($1, $2)")
            .bind(app)
            .bind(owner)
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
    assert_roles_gone(&roles.app, &roles.owner).await;

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
    assert_eq!(
        privileges_of(&mut admin, &roles.app).await,
        Vec::<String>::new()
    );

    let owner = PgStore::open(&url_as(&db.url, &roles.owner), PgSettings::default())
        .await
        .unwrap();
    phase_ok(&roles, &db.name, "grants");
    assert_ownership(&mut admin, &roles, &db.name).await;
    assert_eq!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);

    // A stray grant (say, by hand during an incident) is undone by a re-run;
    // so is PUBLIC's CREATE on the schema.
    for sql in [
        format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}", roles.app),
        format!(
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {}",
            roles.app
        ),
        format!("GRANT TEMPORARY ON DATABASE {} TO {}", db.name, roles.app),
        "GRANT CREATE ON SCHEMA public TO PUBLIC".to_owned(),
    ] {
        admin.execute(sql.as_str()).await.unwrap();
    }
    assert_ne!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);
    phase_ok(&roles, &db.name, "setup");
    phase_ok(&roles, &db.name, "grants");
    assert_eq!(privileges_of(&mut admin, &roles.app).await, APP_PRIVILEGES);
    assert_ownership(&mut admin, &roles, &db.name).await;

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
    let (app_role, owner_role) = (roles.app.clone(), roles.owner.clone());
    drop(db);
    drop(roles);
    assert_roles_gone(&app_role, &owner_role).await;
}
