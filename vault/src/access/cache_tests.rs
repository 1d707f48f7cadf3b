//! The principal row cache: its rules on their own (no database), then
//! against real PostgreSQL (`CARDVAULT_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; these tests fail without
//! it): several instances of one database, changes by the store, the CLI's
//! path and plain SQL, and the loss of the listening connection.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::{Connection as _, Executor as _};

use super::*;
use crate::store::postgres::{PgSettings, PgStore, LISTENER_APPLICATION_NAME};
use crate::store::sqlite::SqliteStore;
use crate::store::tests::{pg_admin_url, PgTestDb};

fn row(id: &str) -> PrincipalRow {
    PrincipalRow {
        id: id.to_owned(),
        name: format!("n{id}"),
        roles: "tokenize".to_owned(),
        tenants: "*".to_owned(),
        key_hash: "h".to_owned(),
        created_at: 0,
        revoked_at: None,
        cert_identity: None,
    }
}

fn listening() -> RowCache {
    let mut cache = RowCache::new();
    cache.apply(PrincipalChange::Confirmed { at: Instant::now() });
    cache
}

fn miss<T>(c: Cached<T>) -> u64 {
    match c {
        Cached::Miss(generation) => generation,
        Cached::Hit(_) => panic!("hit"),
        Cached::Bypass => panic!("bypass"),
    }
}

fn is_hit<T>(c: &Cached<T>) -> bool {
    matches!(c, Cached::Hit(_))
}

fn is_bypass<T>(c: &Cached<T>) -> bool {
    matches!(c, Cached::Bypass)
}

#[test]
fn unconfirmed_cache_is_bypassed() {
    let cache = RowCache::new();
    assert!(is_bypass(&cache.by_id("a")));
    assert!(is_bypass(&cache.by_cert("spiffe://x/a")));
}

#[test]
fn a_notified_id_is_dropped_and_others_stay() {
    let mut cache = listening();
    for id in ["a", "b"] {
        let generation = miss(cache.by_id(id));
        cache.fill_id(generation, &row(id));
    }
    assert!(is_hit(&cache.by_id("a")));
    cache.apply(PrincipalChange::Changed("a".to_owned()));
    assert!(!is_hit(&cache.by_id("a")));
    assert!(is_hit(&cache.by_id("b")));
    // A truncation drops everything.
    cache.apply(PrincipalChange::All);
    assert!(!is_hit(&cache.by_id("b")));
}

#[test]
fn a_fill_racing_with_a_change_is_not_cached() {
    let mut cache = listening();
    // Look-up, then (while the read is under way) a change of any row.
    let generation = miss(cache.by_id("a"));
    cache.apply(PrincipalChange::Changed("a".to_owned()));
    cache.fill_id(generation, &row("a"));
    assert!(!is_hit(&cache.by_id("a")));
    // The same across a loss and a re-listen.
    let generation = miss(cache.by_id("a"));
    cache.apply(PrincipalChange::Lost);
    cache.apply(PrincipalChange::Confirmed { at: Instant::now() });
    cache.fill_id(generation, &row("a"));
    assert!(!is_hit(&cache.by_id("a")));
    // And for certificate identities.
    let generation = miss(cache.by_cert("spiffe://x/a"));
    cache.apply(PrincipalChange::Changed("zzz".to_owned()));
    cache.fill_cert(generation, "spiffe://x/a", Some(&row("a")));
    assert!(!is_hit(&cache.by_cert("spiffe://x/a")));
    // Without a change in between, a fill is kept.
    let generation = miss(cache.by_id("a"));
    cache.fill_id(generation, &row("a"));
    assert!(is_hit(&cache.by_id("a")));
}

#[test]
fn a_lost_listener_clears_and_bypasses_until_listening_again_then_clears_again() {
    let mut cache = listening();
    let generation = miss(cache.by_id("a"));
    cache.fill_id(generation, &row("a"));
    cache.apply(PrincipalChange::Lost);
    assert!(is_bypass(&cache.by_id("a")));
    assert!(cache.by_id.is_empty());
    // A fill of a read made while bypassed (no generation) cannot happen;
    // one that started before the loss is refused.
    cache.fill_id(generation, &row("a"));
    assert!(cache.by_id.is_empty());
    cache.apply(PrincipalChange::Confirmed { at: Instant::now() });
    assert!(!is_bypass(&cache.by_id("a")));
    assert!(!is_hit(&cache.by_id("a")));
    // Heartbeats while listening keep what is cached.
    let generation = miss(cache.by_id("a"));
    cache.fill_id(generation, &row("a"));
    cache.apply(PrincipalChange::Confirmed { at: Instant::now() });
    assert!(is_hit(&cache.by_id("a")));
}

#[test]
fn no_confirmation_within_the_lease_bypasses_the_cache() {
    let mut cache = listening();
    let generation = miss(cache.by_id("a"));
    cache.fill_id(generation, &row("a"));
    let stale = Instant::now().checked_sub(LEASE + Duration::from_millis(1));
    cache.apply(PrincipalChange::Confirmed { at: stale.unwrap() });
    assert!(is_bypass(&cache.by_id("a")));
    cache.apply(PrincipalChange::Confirmed { at: Instant::now() });
    assert!(is_hit(&cache.by_id("a")));
}

#[test]
fn any_change_drops_every_certificate_identity() {
    let mut cache = listening();
    let generation = miss(cache.by_cert("spiffe://x/a"));
    cache.fill_cert(generation, "spiffe://x/a", Some(&row("a")));
    let generation = miss(cache.by_cert("spiffe://x/none"));
    cache.fill_cert(generation, "spiffe://x/none", None);
    assert!(matches!(
        cache.by_cert("spiffe://x/none"),
        Cached::Hit(None)
    ));
    // A new principal may be bound to an identity that had none.
    cache.apply(PrincipalChange::Changed("new".to_owned()));
    assert!(!is_hit(&cache.by_cert("spiffe://x/a")));
    assert!(!is_hit(&cache.by_cert("spiffe://x/none")));
}

#[test]
fn the_cache_is_bounded() {
    let mut cache = listening();
    for i in 0..=CACHE_LIMIT {
        let id = format!("{i}");
        let generation = miss(cache.by_id(&id));
        cache.fill_id(generation, &row(&id));
        let identity = format!("spiffe://x/{i}");
        let generation = miss(cache.by_cert(&identity));
        cache.fill_cert(generation, &identity, None);
    }
    assert!(cache.by_id.len() <= CACHE_LIMIT);
    assert!(cache.by_cert.len() <= CACHE_LIMIT);
}

// --- Against PostgreSQL ---------------------------------------------------

/// Poll `f` every millisecond until it is true, at most five seconds;
/// how long it took.
async fn within_5s<F, Fut>(what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not within 5 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

/// Principal reads by `auth` during `f`, from a run in which its row cache
/// stayed in use and saw no change. `f` runs once before that (so that
/// what it looks up is cached); on a loaded machine the listener's lease
/// may lapse or its connection be lost, and then every request reads the
/// database: that is the safe path, not what these tests measure, so such
/// a run is repeated (for up to 5 s).
async fn reads_while_cached<F, Fut>(auth: &Authenticator, mut f: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let start = Instant::now();
    loop {
        let (bypassed, generation) = (auth.bypassed_reads(), auth.generation());
        f().await;
        let reads = auth.principal_reads();
        f().await;
        if auth.bypassed_reads() == bypassed && auth.generation() == generation {
            return auth.principal_reads() - reads;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the row cache was not in use for 5 s"
        );
    }
}

/// One database and two vault instances on it (stores with pools and
/// listeners of their own), each with its authenticator, both listening.
struct TwoInstances {
    db: PgTestDb,
    a: Arc<dyn Store>,
    auth_a: Authenticator,
    auth_b: Authenticator,
}

impl TwoInstances {
    async fn start() -> TwoInstances {
        let db = PgTestDb::create().await;
        let a: Arc<dyn Store> =
            Arc::new(PgStore::open(&db.url, PgSettings::default()).await.unwrap());
        // Instance B's pool has one connection: while the database refuses
        // new connections (the listener test), its reads use that one
        // instead of opening another while it is being returned.
        let one = PgSettings {
            max_connections: 1,
            ..PgSettings::default()
        };
        let b: Arc<dyn Store> = Arc::new(PgStore::connect_lazy(&db.url, one).unwrap());
        let (auth_a, auth_b) = (Authenticator::new(a.clone()), Authenticator::new(b));
        within_5s("both instances listen", || async {
            auth_a.row_cache_in_use() && auth_b.row_cache_in_use()
        })
        .await;
        TwoInstances {
            db,
            a,
            auth_a,
            auth_b,
        }
    }

    async fn principal(&self, name: &str, cert: Option<&str>) -> (Principal, NewApiKey) {
        let roles = parse_roles("tokenize").unwrap();
        create_principal(&*self.a, name, &roles, &TenantScope::All, cert)
            .await
            .unwrap()
    }

    /// Wait until both instances have applied `n` notifications since
    /// they started listening (each creation of a principal is one).
    async fn seen(&self, n: u64) {
        within_5s("the notifications arrive", || async {
            self.auth_a.generation() > n && self.auth_b.generation() > n
        })
        .await;
    }

    /// A connection of its own: an operator's psql.
    async fn psql(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.db.url).await.unwrap()
    }
}

fn revoked(r: &Result<Principal, AuthError>) -> bool {
    matches!(r, Err(AuthError::Failed(AuthFailure::Revoked)))
}

#[tokio::test]
async fn the_cache_serves_repeated_authentications_without_reading_the_database() {
    let t = TwoInstances::start().await;
    let cert = "spiffe://aggregator.example/checkout";
    let (p, key) = t.principal("checkout", Some(cert)).await;
    t.seen(1).await;
    let ids = vec!["checkout.example".to_owned(), cert.to_owned()];
    assert_eq!(t.auth_b.authenticate(key.expose()).await.unwrap(), p);
    assert_eq!(t.auth_b.authenticate_cert(&ids).await.unwrap(), p);
    // One read by key id, two by identity (the first has no principal).
    let reads = t.auth_b.principal_reads();
    assert_eq!(reads, 3);
    let again = reads_while_cached(&t.auth_b, || async {
        for _ in 0..100 {
            assert_eq!(t.auth_b.authenticate(key.expose()).await.unwrap(), p);
            assert_eq!(t.auth_b.authenticate_cert(&ids).await.unwrap(), p);
        }
    })
    .await;
    assert_eq!(again, 0);
    assert_eq!(t.auth_b.argon2_checks(), 1);
    // An unknown key id is read every time (ids are the caller's to make up).
    let unknown = format!("cvk_AAAAAAAAAAAA_{}", "B".repeat(43));
    let reads = t.auth_b.principal_reads();
    for _ in 0..2 {
        assert!(matches!(
            t.auth_b.authenticate(&unknown).await,
            Err(AuthError::Failed(AuthFailure::UnknownKey))
        ));
    }
    assert_eq!(t.auth_b.principal_reads(), reads + 2);
}

#[tokio::test]
async fn sqlite_reads_the_row_on_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
    let roles = parse_roles("tokenize").unwrap();
    let (_, key) = create_principal(&*store, "checkout", &roles, &TenantScope::All, None)
        .await
        .unwrap();
    let auth = Authenticator::new(store);
    for _ in 0..3 {
        auth.authenticate(key.expose()).await.unwrap();
    }
    assert!(!auth.row_cache_in_use());
    assert_eq!(auth.principal_reads(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_instance_or_by_sql_is_refused_on_the_other_at_once() {
    let t = TwoInstances::start().await;
    let (_, key) = t.principal("checkout", None).await;
    let (_, key2) = t.principal("router", None).await;
    t.seen(2).await;
    for k in [&key, &key2] {
        for auth in [&t.auth_a, &t.auth_b] {
            auth.authenticate(k.expose()).await.unwrap();
            auth.authenticate(k.expose()).await.unwrap();
        }
    }
    let (reads, bypassed) = (t.auth_b.principal_reads(), t.auth_b.bypassed_reads());

    // Through instance A's store (the path of the API and of the CLI).
    revoke_principal(&*t.a, "checkout").await.unwrap();
    let via_store = within_5s("instance B refuses the revoked key", || async {
        revoked(&t.auth_b.authenticate(key.expose()).await)
    })
    .await;
    assert!(revoked(&t.auth_a.authenticate(key.expose()).await));
    // The revoked row that B read is cached: later requests read nothing.
    let again = reads_while_cached(&t.auth_b, || async {
        for _ in 0..10 {
            assert!(revoked(&t.auth_b.authenticate(key.expose()).await));
        }
    })
    .await;
    assert_eq!(again, 0, "the revoked row is served from the cache");

    // By an operator's plain SQL on a connection of its own.
    let mut psql = t.psql().await;
    psql.execute("UPDATE principals SET revoked_at = 1 WHERE name = 'router'")
        .await
        .unwrap();
    let via_sql = within_5s("instance B refuses the key revoked by SQL", || async {
        revoked(&t.auth_b.authenticate(key2.expose()).await)
    })
    .await;
    let again = reads_while_cached(&t.auth_b, || async {
        for _ in 0..10 {
            assert!(revoked(&t.auth_b.authenticate(key2.expose()).await));
        }
    })
    .await;
    assert_eq!(again, 0, "the row revoked by SQL is served from the cache");
    eprintln!(
        "revocation commit -> refusal on another instance: {:.3} ms (store), {:.3} ms (plain SQL); \
         instance B read {} rows meanwhile, {} of them while its cache was not in use",
        via_store.as_secs_f64() * 1e3,
        via_sql.as_secs_f64() * 1e3,
        t.auth_b.principal_reads() - reads,
        t.auth_b.bypassed_reads() - bypassed,
    );
}

#[tokio::test]
async fn role_tenant_key_and_certificate_changes_propagate_and_deletion_too() {
    let t = TwoInstances::start().await;
    let cert = "spiffe://aggregator.example/router";
    let moved = "spiffe://aggregator.example/router-2";
    let (p, key) = t.principal("router", Some(cert)).await;
    let (_, other_key) = t.principal("other", None).await;
    t.seen(2).await;
    let b = &t.auth_b;
    assert_eq!(b.authenticate(key.expose()).await.unwrap(), p);
    assert_eq!(b.authenticate_cert(&[cert.to_owned()]).await.unwrap(), p);
    assert!(b.authenticate_cert(&[moved.to_owned()]).await.is_err());
    let mut psql = t.psql().await;

    psql.execute("UPDATE principals SET roles = 'tokenize,detokenize', tenants = 'shop-a' WHERE name = 'router'")
        .await
        .unwrap();
    within_5s("the new roles and tenants", || async {
        b.authenticate(key.expose()).await.is_ok_and(|q| {
            q.has_role(Role::Detokenize) && q.tenants == TenantScope::parse("shop-a").unwrap()
        })
    })
    .await;
    within_5s("the new roles by certificate", || async {
        b.authenticate_cert(&[cert.to_owned()])
            .await
            .is_ok_and(|q| q.has_role(Role::Detokenize))
    })
    .await;

    psql.execute(
        format!("UPDATE principals SET cert_identity = '{moved}' WHERE name = 'router'").as_str(),
    )
    .await
    .unwrap();
    within_5s("the moved certificate identity", || async {
        b.authenticate_cert(&[moved.to_owned()]).await.is_ok()
            && matches!(
                b.authenticate_cert(&[cert.to_owned()]).await,
                Err(AuthError::Failed(AuthFailure::UnknownCertificate))
            )
    })
    .await;

    // Key rotation: another key hash; the old key (verified and cached
    // before) is refused.
    psql.execute(
        "UPDATE principals SET key_hash = (SELECT key_hash FROM principals WHERE name = 'other')
          WHERE name = 'router'",
    )
    .await
    .unwrap();
    within_5s("the old key after rotation", || async {
        matches!(
            b.authenticate(key.expose()).await,
            Err(AuthError::Failed(AuthFailure::WrongSecret))
        )
    })
    .await;
    // (The other principal's key has the other id: still its own.)
    assert!(b.authenticate(other_key.expose()).await.is_ok());

    psql.execute("DELETE FROM principals WHERE name = 'other'")
        .await
        .unwrap();
    within_5s("a deleted principal", || async {
        matches!(
            b.authenticate(other_key.expose()).await,
            Err(AuthError::Failed(AuthFailure::UnknownKey))
        )
    })
    .await;
}

#[tokio::test]
async fn while_the_listener_is_down_every_request_reads_the_database() {
    let t = TwoInstances::start().await;
    let (_, key) = t.principal("checkout", None).await;
    let (_, key2) = t.principal("router", None).await;
    t.seen(2).await;
    let b = &t.auth_b;
    for k in [&key, &key2] {
        b.authenticate(k.expose()).await.unwrap();
    }
    // Open before the database refuses connections.
    let mut psql = t.psql().await;
    let mut admin = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
    let name = &t.db.name;
    // Keep the listeners from coming back (for every role, superusers too),
    // then end them.
    admin
        .execute(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false").as_str())
        .await
        .unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = $1 AND application_name = $2",
    )
    .bind(name)
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(ended, vec![true, true], "one listener per instance");
    within_5s("instance B sees its listener lost", || async {
        !b.row_cache_in_use()
    })
    .await;

    // Revoked while nobody listens: the notification is lost, and yet the
    // very next request is refused (it read the row).
    let reads = b.principal_reads();
    psql.execute("UPDATE principals SET revoked_at = 1 WHERE name = 'checkout'")
        .await
        .unwrap();
    assert!(revoked(&b.authenticate(key.expose()).await));
    b.authenticate(key2.expose()).await.unwrap();
    b.authenticate(key2.expose()).await.unwrap();
    assert_eq!(b.principal_reads(), reads + 3, "bypassed: one read each");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.row_cache_in_use(), "still down: it cannot connect");

    // Connections allowed again: LISTEN is re-established, the cache
    // (emptied) is used again.
    admin
        .execute(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true").as_str())
        .await
        .unwrap();
    within_5s("instance B listens again", || async {
        b.row_cache_in_use()
    })
    .await;
    let again = reads_while_cached(b, || async {
        b.authenticate(key2.expose()).await.unwrap();
        assert!(revoked(&b.authenticate(key.expose()).await));
    })
    .await;
    assert_eq!(again, 0, "cached again after one read each");
    // And notifications work again.
    psql.execute("UPDATE principals SET revoked_at = 1 WHERE name = 'router'")
        .await
        .unwrap();
    within_5s("a revocation after re-listen", || async {
        revoked(&b.authenticate(key2.expose()).await)
    })
    .await;
}
