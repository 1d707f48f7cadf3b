//! Principals, roles, tenants and API keys.
//!
//! An API key is `cvk_<id>_<secret>`: `id` (12 URL-safe characters) finds the
//! principal's row; `secret` (256 random bits) is checked against the stored
//! argon2id hash. A successful check is cached in memory as SHA-256 of the
//! presented key together with the stored hash it matched, so the hot path
//! pays argon2 once per key and process, and a rotated key hash is never
//! accepted from that cache.
//!
//! The principal's row (by key id, or by client-certificate identity) is
//! checked on every request: roles, tenants, revocation. Where it comes
//! from depends on the store:
//! - SQLite (one process; the read is an inline rusqlite read of
//!   microseconds): read on every request.
//! - PostgreSQL (several instances and the CLI share the database; a read
//!   is a network round trip): cached here, kept current by the store's
//!   change feed ([`Store::principal_changes`]): a trigger on `principals`
//!   (migration 0010) notifies `cardvault_principals` with the id of every
//!   inserted, updated or deleted row, whoever changed it, at commit; a
//!   task of the store LISTENs on a connection of its own. A notified id's
//!   row is dropped (and every certificate-identity entry, principals
//!   change rarely). A row read from the database is cached only if no
//!   notification, loss or re-listen came in since before the read (the
//!   generation counter), so a revocation racing with the read is never
//!   cached stale. The cache is used only while the feed is known to be
//!   listening: when its connection is lost, the cache is emptied and every
//!   request reads the database until LISTEN is back (notifications of the
//!   gap are lost), then it is emptied again; and only within `LEASE` (3 s)
//!   of the last heartbeat the feed confirmed, so a connection that dies
//!   silently stops the cache within that bound. A revocation by any
//!   instance or the CLI is refused everywhere once its notification
//!   arrives (measured on a local database: 0.7 to 4.6 ms after the
//!   commit, typically about 1 ms; see ARCHITECTURE.md).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use audit::{Action, AuditEvent, Outcome};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::card::Tenant;
use crate::pan::contains_pan_like;
use crate::store::{now_millis, PrincipalChange, PrincipalRow, Store, StoreError};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Tokenize,
    Detokenize,
    Auditor,
    KeyAdmin,
    /// The hosted-collection edge: reads a session's public settings and
    /// completes sessions; nothing else (no token, no card, no tenant of
    /// its own).
    Collect,
    /// The payment router's forwarding calls: card data of its tenants'
    /// tokens put into a request to a configured upstream, never returned
    /// to the caller (`detokenize` is neither needed nor enough).
    Forward,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tokenize => "tokenize",
            Role::Detokenize => "detokenize",
            Role::Auditor => "auditor",
            Role::KeyAdmin => "key_admin",
            Role::Collect => "collect",
            Role::Forward => "forward",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [
            Role::Tokenize,
            Role::Detokenize,
            Role::Auditor,
            Role::KeyAdmin,
            Role::Collect,
            Role::Forward,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// The tenants a principal may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    All,
    Only(BTreeSet<String>),
}

impl TenantScope {
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            TenantScope::All => true,
            TenantScope::Only(set) => set.contains(tenant),
        }
    }

    /// Stored and CLI form: `*` or a comma-separated list of tenants.
    pub fn parse(s: &str) -> Result<TenantScope, AccessError> {
        if s.trim() == "*" {
            return Ok(TenantScope::All);
        }
        let mut set = BTreeSet::new();
        for t in s.split(',').map(str::trim) {
            set.insert(
                Tenant::parse(t)
                    .map_err(|_| AccessError::InvalidTenants)?
                    .as_str()
                    .to_owned(),
            );
        }
        Ok(TenantScope::Only(set))
    }

    pub fn to_stored(&self) -> String {
        match self {
            TenantScope::All => "*".to_owned(),
            TenantScope::Only(set) => set.iter().map(String::as_str).collect::<Vec<_>>().join(","),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub name: String,
    pub roles: BTreeSet<Role>,
    pub tenants: TenantScope,
}

impl Principal {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    fn from_row(row: &PrincipalRow) -> Result<Principal, StoreError> {
        Ok(Principal {
            id: row.id.clone(),
            name: row.name.clone(),
            roles: parse_roles(&row.roles).map_err(|_| StoreError::Corrupt("principal roles"))?,
            tenants: TenantScope::parse(&row.tenants)
                .map_err(|_| StoreError::Corrupt("principal tenants"))?,
        })
    }
}

/// Comma-separated roles, at least one.
pub fn parse_roles(s: &str) -> Result<BTreeSet<Role>, AccessError> {
    let roles = s
        .split(',')
        .map(|r| Role::parse(r.trim()).ok_or(AccessError::InvalidRoles))
        .collect::<Result<BTreeSet<_>, _>>()?;
    if roles.is_empty() {
        return Err(AccessError::InvalidRoles);
    }
    Ok(roles)
}

fn roles_to_stored(roles: &BTreeSet<Role>) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("roles must be a comma-separated list of tokenize, detokenize, auditor, key_admin")]
    InvalidRoles,
    #[error("tenants must be `*` or a comma-separated list of tenant ids")]
    InvalidTenants,
    #[error("principal name must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    InvalidName,
    #[error("an active principal with this name or certificate identity already exists")]
    NameTaken,
    #[error("a certificate identity is a URI (e.g. spiffe://aggregator.example/checkout) or a DNS name, 1 to 255 printable ASCII characters")]
    InvalidCertIdentity,
    #[error("no active principal with this name")]
    UnknownName,
    #[error("the operating system random number generator failed")]
    Rng,
    #[error("password hashing failed")]
    Hash,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A freshly created API key: shown once, then only its hash exists.
pub struct NewApiKey(Zeroizing<String>);

impl NewApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewApiKey([REDACTED])")
    }
}

const KEY_PREFIX: &str = "cvk_";
const ID_BYTES: usize = 9;
const SECRET_BYTES: usize = 32;

fn random_b64(n: usize) -> Result<String, AccessError> {
    let mut buf = Zeroizing::new(vec![0u8; n]);
    getrandom::getrandom(&mut buf).map_err(|_| AccessError::Rng)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&*buf))
}

/// Split `cvk_<id>_<secret>` into its id; `None` if not of that shape.
fn key_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    // The id is 12 base64url characters (which may include `_`), then `_`.
    let (id, secret) = (rest.get(..12)?, rest.get(12..)?);
    let secret = secret.strip_prefix('_')?;
    let ok = |s: &str| {
        s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    (ok(id) && ok(secret) && secret.len() == 43).then_some(id)
}

/// Whether `identity` is a certificate identity we can bind: a URI SAN
/// (`scheme:rest`, e.g. `spiffe://aggregator.example/checkout`) or a DNS SAN,
/// printable ASCII without spaces, at most 255 characters, nothing card-like.
pub fn valid_cert_identity(identity: &str) -> bool {
    let printable = identity.bytes().all(|b| b.is_ascii_graphic());
    let dns = identity.split('.').all(|l| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
    });
    let uri = identity.split_once(':').is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            && !rest.is_empty()
    });
    (1..=255).contains(&identity.len()) && printable && (uri || dns) && !contains_pan_like(identity)
}

/// Create a principal and its API key. The key's argon2id hash is stored;
/// the key itself is returned once. With `cert_identity`, a client
/// certificate carrying that URI or DNS subject alternative name (verified
/// by the listener's client CA) also authenticates as this principal.
pub async fn create_principal(
    store: &dyn Store,
    name: &str,
    roles: &BTreeSet<Role>,
    tenants: &TenantScope,
    cert_identity: Option<&str>,
) -> Result<(Principal, NewApiKey), AccessError> {
    if Tenant::parse(name).is_err() || contains_pan_like(name) {
        return Err(AccessError::InvalidName);
    }
    if cert_identity.is_some_and(|i| !valid_cert_identity(i)) {
        return Err(AccessError::InvalidCertIdentity);
    }
    if roles.is_empty() {
        return Err(AccessError::InvalidRoles);
    }
    let id = random_b64(ID_BYTES)?;
    let secret = Zeroizing::new(random_b64(SECRET_BYTES)?);
    let key = NewApiKey(Zeroizing::new(format!(
        "{KEY_PREFIX}{id}_{}",
        secret.as_str()
    )));
    let mut salt_bytes = [0u8; 16];
    getrandom::getrandom(&mut salt_bytes).map_err(|_| AccessError::Rng)?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|_| AccessError::Hash)?;
    let hash = Argon2::default()
        .hash_password(key.expose().as_bytes(), &salt)
        .map_err(|_| AccessError::Hash)?
        .to_string();
    let row = PrincipalRow {
        id: id.clone(),
        name: name.to_owned(),
        roles: roles_to_stored(roles),
        tenants: tenants.to_stored(),
        key_hash: hash,
        created_at: now_millis(),
        revoked_at: None,
        cert_identity: cert_identity.map(str::to_owned),
    };
    let event = AuditEvent::new(Action::PrincipalCreated, Outcome::Success)
        .source("local")
        .detail(format!(
            "{name} roles={} tenants={}{}",
            row.roles,
            row.tenants,
            cert_identity.map_or_else(String::new, |i| format!(" cert_identity={i}"))
        ));
    match store.insert_principal(&row, event).await {
        Ok(()) => {}
        Err(StoreError::Conflict) => return Err(AccessError::NameTaken),
        Err(e) => return Err(e.into()),
    }
    let principal = Principal::from_row(&row)?;
    Ok((principal, key))
}

/// Revoke the active principal called `name`.
pub async fn revoke_principal(store: &dyn Store, name: &str) -> Result<(), AccessError> {
    let event = AuditEvent::new(Action::PrincipalRevoked, Outcome::Success)
        .source("local")
        .detail(name.to_owned());
    if store.revoke_principal(name, now_millis(), event).await? {
        Ok(())
    } else {
        Err(AccessError::UnknownName)
    }
}

/// Why a presented key was refused. Deliberately not distinguished towards
/// the caller (all are 401); kept apart for the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    UnknownKey,
    WrongSecret,
    Revoked,
    /// A verified client certificate whose identity no active principal has.
    UnknownCertificate,
    /// A client certificate and an API key of two different principals.
    CredentialMismatch,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_credentials",
            AuthFailure::Malformed => "malformed_credentials",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::WrongSecret => "wrong_secret",
            AuthFailure::Revoked => "revoked_key",
            AuthFailure::UnknownCertificate => "unknown_certificate_identity",
            AuthFailure::CredentialMismatch => "certificate_and_key_mismatch",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication failed")]
    Failed(AuthFailure),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Upper bound on cached verified keys, and on cached principal rows (by
/// id, and by certificate identity); a cache is cleared when full.
const CACHE_LIMIT: usize = 10_000;

/// How long after the listener's last confirmation (see
/// [`PrincipalChange::Confirmed`]) cached rows may be used: the bound on a
/// missed revocation if the listening connection dies silently (no reset,
/// so neither the heartbeat's failure nor a `Lost` has been seen yet).
const LEASE: Duration = Duration::from_secs(3);

/// Principal rows as last read, for stores with a change feed
/// ([`Store::principal_changes`]). Used only while the feed is known to
/// be listening (`listening` and within the lease); otherwise every
/// request reads the database.
struct RowCache {
    /// The feed has confirmed LISTEN and reported no loss since.
    listening: bool,
    /// Rows may be served until then (last confirmation + [`LEASE`]).
    valid_until: Option<Instant>,
    /// Bumped on every change, loss and re-listen: a row read from the
    /// database is cached only if no bump happened since before the read
    /// (a change committed during the read may not be in what it read).
    generation: u64,
    by_id: HashMap<String, PrincipalRow>,
    /// Certificate identity -> the active principal bound to it, or none
    /// (identities come from certificates our client CA signed).
    by_cert: HashMap<String, Option<PrincipalRow>>,
}

impl fmt::Debug for RowCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowCache")
            .field("listening", &self.listening)
            .field("generation", &self.generation)
            .field("by_id", &self.by_id.len())
            .field("by_cert", &self.by_cert.len())
            .finish()
    }
}

/// A look-up in the [`RowCache`].
enum Cached<T> {
    Hit(T),
    /// Not cached: read, then fill with this generation.
    Miss(u64),
    /// The cache is not in use: read, do not fill.
    Bypass,
}

impl RowCache {
    fn new() -> RowCache {
        RowCache {
            listening: false,
            valid_until: None,
            generation: 0,
            by_id: HashMap::new(),
            by_cert: HashMap::new(),
        }
    }

    fn usable(&self) -> bool {
        self.listening && self.valid_until.is_some_and(|t| Instant::now() < t)
    }

    fn forget_all(&mut self) {
        self.generation += 1;
        self.by_id.clear();
        self.by_cert.clear();
    }

    fn apply(&mut self, change: PrincipalChange) {
        match change {
            PrincipalChange::Confirmed { at } => {
                if !self.listening {
                    // Changes before this LISTEN were not reported.
                    self.forget_all();
                    self.listening = true;
                }
                self.valid_until = Some(at + LEASE);
            }
            PrincipalChange::Changed(id) => {
                self.generation += 1;
                self.by_id.remove(&id);
                // Which identities were bound to it is not worth tracking:
                // principals change rarely.
                self.by_cert.clear();
            }
            PrincipalChange::All => self.forget_all(),
            PrincipalChange::Lost => {
                self.listening = false;
                self.valid_until = None;
                self.forget_all();
            }
        }
    }

    fn by_id(&self, id: &str) -> Cached<PrincipalRow> {
        if !self.usable() {
            return Cached::Bypass;
        }
        match self.by_id.get(id) {
            Some(row) => Cached::Hit(row.clone()),
            None => Cached::Miss(self.generation),
        }
    }

    fn by_cert(&self, identity: &str) -> Cached<Option<PrincipalRow>> {
        if !self.usable() {
            return Cached::Bypass;
        }
        match self.by_cert.get(identity) {
            Some(row) => Cached::Hit(row.clone()),
            None => Cached::Miss(self.generation),
        }
    }

    /// Whether a row read after the look-up that returned `generation` may
    /// be cached now.
    fn may_fill(&self, generation: u64) -> bool {
        self.usable() && self.generation == generation
    }

    fn fill_id(&mut self, generation: u64, row: &PrincipalRow) {
        if self.may_fill(generation) {
            if self.by_id.len() >= CACHE_LIMIT {
                self.by_id.clear();
            }
            self.by_id.insert(row.id.clone(), row.clone());
        }
    }

    fn fill_cert(&mut self, generation: u64, identity: &str, row: Option<&PrincipalRow>) {
        if self.may_fill(generation) {
            if self.by_cert.len() >= CACHE_LIMIT {
                self.by_cert.clear();
            }
            self.by_cert.insert(identity.to_owned(), row.cloned());
        }
    }
}

/// Verifies API keys and client-certificate identities against the store,
/// caching successful argon2 checks and, on stores with a change feed,
/// principal rows.
#[derive(Debug)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    /// principal id -> (SHA-256 of the verified key, the stored hash it matched).
    cache: Mutex<HashMap<String, ([u8; 32], String)>>,
    /// Principal rows, kept current by the store's change feed.
    rows: Arc<Mutex<RowCache>>,
    /// The task applying the change feed to `rows` (aborted on drop, which
    /// closes the feed and stops the store's listener).
    feed: Option<tokio::task::AbortHandle>,
    /// argon2 checks running at once: at most one per core. Each costs
    /// about 50 ms of CPU and 19 MiB of memory, so a burst of new
    /// connections presenting the same key (a client pool starting up)
    /// must not run one per request: waiters look at the cache again when
    /// their turn comes, and the first check of a key serves them all.
    verifying: tokio::sync::Semaphore,
    /// argon2 checks run so far (successful or not).
    checks: AtomicU64,
    /// Principal rows read from the store so far.
    reads: AtomicU64,
    /// Of those, the reads made while the row cache was not in use.
    bypassed: AtomicU64,
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        if let Some(feed) = &self.feed {
            feed.abort();
        }
    }
}

impl Authenticator {
    /// An authenticator over `store`. With a store that has a change feed
    /// (PostgreSQL) and a Tokio runtime, it caches principal rows while the
    /// feed is listening; otherwise it reads the row on every request.
    pub fn new(store: Arc<dyn Store>) -> Authenticator {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let rows = Arc::new(Mutex::new(RowCache::new()));
        let feed = store.principal_changes().and_then(|mut changes| {
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            let rows = rows.clone();
            let task = runtime.spawn(async move {
                while let Some(change) = changes.recv().await {
                    lock(&rows).apply(change);
                }
                // The feed ended: no more invalidations, so no more cache.
                lock(&rows).apply(PrincipalChange::Lost);
            });
            Some(task.abort_handle())
        });
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
            rows,
            feed,
            verifying: tokio::sync::Semaphore::new(cores),
            checks: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            bypassed: AtomicU64::new(0),
        }
    }

    /// argon2 checks run by this authenticator so far.
    pub fn argon2_checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Principal rows this authenticator has read from the store so far
    /// (by key id or certificate identity).
    pub fn principal_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Whether principal rows are served from the cache now: the store has
    /// a change feed and it is known to be listening.
    pub fn row_cache_in_use(&self) -> bool {
        lock(&self.rows).usable()
    }

    /// The row cache's generation (tests wait for notifications with it).
    #[cfg(test)]
    fn generation(&self) -> u64 {
        lock(&self.rows).generation
    }

    /// Principal reads made while the row cache was not in use (a lapsed
    /// lease or a lost listener: tests tell those from cache misses).
    #[cfg(test)]
    fn bypassed_reads(&self) -> u64 {
        self.bypassed.load(Ordering::Relaxed)
    }

    /// The principal row of key id `id`: cached, or read (and cached if no
    /// change was reported during the read).
    async fn principal_row(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError> {
        let generation = match lock(&self.rows).by_id(id) {
            Cached::Hit(row) => return Ok(Some(row)),
            Cached::Miss(generation) => Some(generation),
            Cached::Bypass => {
                self.bypassed.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        self.reads.fetch_add(1, Ordering::Relaxed);
        let row = self.store.find_principal(id).await?;
        // Unknown ids are not cached: anyone can make them up.
        if let (Some(generation), Some(row)) = (generation, &row) {
            lock(&self.rows).fill_id(generation, row);
        }
        Ok(row)
    }

    /// The active principal bound to `identity`, cached like
    /// [`Authenticator::principal_row`] (its absence too).
    async fn cert_row(&self, identity: &str) -> Result<Option<PrincipalRow>, StoreError> {
        let generation = match lock(&self.rows).by_cert(identity) {
            Cached::Hit(row) => return Ok(row),
            Cached::Miss(generation) => Some(generation),
            Cached::Bypass => {
                self.bypassed.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        self.reads.fetch_add(1, Ordering::Relaxed);
        let row = self.store.find_principal_by_cert(identity).await?;
        if let Some(generation) = generation {
            lock(&self.rows).fill_cert(generation, identity, row.as_ref());
        }
        Ok(row)
    }

    /// Whether `digest` (of a presented key) passed argon2 against `hash`.
    fn cached(&self, id: &str, digest: &[u8; 32], hash: &str) -> bool {
        let cache = lock(&self.cache);
        cache
            .get(id)
            .is_some_and(|(d, h)| bool::from(d.ct_eq(digest)) && h == hash)
    }

    /// Check a presented API key against the principal's current row (see
    /// the module documentation for when that is a cached copy); runs
    /// argon2 only on a miss of the verified-key cache.
    pub async fn authenticate(&self, presented: &str) -> Result<Principal, AuthError> {
        let id = key_id(presented).ok_or(AuthError::Failed(AuthFailure::Malformed))?;
        let row = self
            .principal_row(id)
            .await?
            .ok_or(AuthError::Failed(AuthFailure::UnknownKey))?;
        if row.revoked_at.is_some() {
            self.forget(id);
            return Err(AuthError::Failed(AuthFailure::Revoked));
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if !self.cached(id, &digest, &row.key_hash) {
            // (Never closed: an error would only mean no turn to wait for.)
            let _turn = self.verifying.acquire().await.ok();
            // Verified by another request while this one waited.
            if self.cached(id, &digest, &row.key_hash) {
                return Ok(Principal::from_row(&row)?);
            }
            self.checks.fetch_add(1, Ordering::Relaxed);
            let key = Zeroizing::new(presented.to_owned());
            let hash = row.key_hash.clone();
            let ok = tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash)
                    .map(|parsed| {
                        Argon2::default()
                            .verify_password(key.as_bytes(), &parsed)
                            .is_ok()
                    })
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if !ok {
                return Err(AuthError::Failed(AuthFailure::WrongSecret));
            }
            let mut cache = lock(&self.cache);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(id.to_owned(), (digest, row.key_hash.clone()));
        }
        Ok(Principal::from_row(&row)?)
    }

    /// The principal bound to a client-certificate identity (the listener's
    /// TLS layer has verified the certificate against the client CA and the
    /// CRL), from its current row, cached like the key path's.
    pub async fn authenticate_cert(&self, identities: &[String]) -> Result<Principal, AuthError> {
        for identity in identities {
            if let Some(row) = self.cert_row(identity).await? {
                return Ok(Principal::from_row(&row)?);
            }
        }
        Err(AuthError::Failed(AuthFailure::UnknownCertificate))
    }

    /// Whether this exact key passed an argon2 check in this process (its
    /// SHA-256 is in the cache). No database read, no argon2: what a guard
    /// in front of authentication may ask to let known-good callers through.
    /// The caller must still [`Authenticator::authenticate`] (revocation is
    /// checked there).
    pub fn is_verified(&self, presented: &str) -> bool {
        let Some(id) = key_id(presented) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let cache = lock(&self.cache);
        cache
            .get(id)
            .is_some_and(|(d, _)| bool::from(d.ct_eq(&digest)))
    }

    fn forget(&self, id: &str) {
        lock(&self.cache).remove(id);
    }
}

/// A lock whose holder panicked still guards consistent data here (every
/// change under it is a single map or counter update).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A principal for listing: never the key or its hash.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrincipalInfo {
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub tenants: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_identity: Option<String>,
}

pub async fn list_principals(store: &dyn Store) -> Result<Vec<PrincipalInfo>, AccessError> {
    Ok(store
        .list_principals()
        .await?
        .into_iter()
        .map(|r| PrincipalInfo {
            id: r.id,
            name: r.name,
            roles: r.roles.split(',').map(str::to_owned).collect(),
            tenants: r.tenants,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
            cert_identity: r.cert_identity,
        })
        .collect())
}

#[cfg(test)]
mod cache_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn key_shape() {
        let id = "AAAAAAAAAAAA";
        let secret = "B".repeat(43);
        assert_eq!(key_id(&format!("cvk_{id}_{secret}")), Some(id));
        assert_eq!(key_id(&format!("cvk_{id}{secret}")), None);
        assert_eq!(key_id(&format!("cvk_{id}_{secret}x")), None);
        assert_eq!(key_id("Bearer"), None);
        assert_eq!(key_id(""), None);
        assert_eq!(key_id("cvk_é"), None);
    }

    #[test]
    fn scopes_and_roles() {
        assert_eq!(TenantScope::parse("*").unwrap(), TenantScope::All);
        let s = TenantScope::parse("b, a").unwrap();
        assert!(s.allows("a") && !s.allows("c"));
        assert_eq!(s.to_stored(), "a,b");
        assert!(TenantScope::parse("a,,b").is_err());
        assert!(parse_roles("tokenize,detokenize")
            .unwrap()
            .contains(&Role::Detokenize));
        assert!(parse_roles("root").is_err());
        assert!(parse_roles("").is_err());
    }

    /// A store with one principal, `checkout` (role tokenize), and its key.
    async fn checkout_principal() -> (tempfile::TempDir, Arc<dyn Store>, Principal, NewApiKey) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
        let roles = parse_roles("tokenize").unwrap();
        let (p, key) = create_principal(&*store, "checkout", &roles, &TenantScope::All, None)
            .await
            .unwrap();
        (dir, store, p, key)
    }

    /// `key` with its last character changed: the right id, a wrong secret.
    fn wrong_secret(key: &NewApiKey) -> String {
        let mut wrong = key.expose().to_owned();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        wrong
    }

    #[tokio::test]
    async fn create_authenticate_revoke() {
        let (_dir, store, p, key) = checkout_principal().await;
        let roles = parse_roles("tokenize").unwrap();
        assert_eq!(format!("{key:?}"), "NewApiKey([REDACTED])");
        let auth = Authenticator::new(store.clone());
        assert_eq!(auth.authenticate(key.expose()).await.unwrap(), p);
        // Cached path: no second argon2 check.
        assert_eq!(auth.authenticate(key.expose()).await.unwrap(), p);
        assert_eq!(auth.argon2_checks(), 1);
        // A wrong secret with the right id is refused even with a warm cache.
        let wrong = wrong_secret(&key);
        assert!(matches!(
            auth.authenticate(&wrong).await,
            Err(AuthError::Failed(AuthFailure::WrongSecret))
        ));
        revoke_principal(&*store, "checkout").await.unwrap();
        assert!(matches!(
            auth.authenticate(key.expose()).await,
            Err(AuthError::Failed(AuthFailure::Revoked))
        ));
        assert!(matches!(
            create_principal(&*store, "4111111111111111", &roles, &TenantScope::All, None).await,
            Err(AccessError::InvalidName)
        ));
    }

    /// A burst of requests with the same key and a cold cache (a client
    /// pool opening its connections) runs argon2 at most once per core,
    /// not once per request; a wrong secret in the burst is still refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_of_one_key_runs_argon2_once_per_core_at_most() {
        let (_dir, store, p, key) = checkout_principal().await;
        let wrong = wrong_secret(&key);
        let auth = Arc::new(Authenticator::new(store.clone()));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (auth, key) = (auth.clone(), key.expose().to_owned());
                tokio::spawn(async move { auth.authenticate(&key).await.map(|p| (i, p)) })
            })
            .collect();
        let bad = {
            let auth = auth.clone();
            tokio::spawn(async move { auth.authenticate(&wrong).await })
        };
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().1, p);
        }
        assert!(matches!(
            bad.await.unwrap(),
            Err(AuthError::Failed(AuthFailure::WrongSecret))
        ));
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let checks = auth.argon2_checks();
        // The right key at most once per core (all may have started before
        // the first finished), plus the wrong one.
        assert!(checks <= cores as u64 + 1, "{checks} argon2 checks");
    }

    #[test]
    fn certificate_identity_shapes() {
        for ok in [
            "spiffe://aggregator.example/checkout",
            "urn:cardvault:router",
            "router.pci.aggregator.example",
        ] {
            assert!(valid_cert_identity(ok), "{ok}");
        }
        for bad in [
            "",
            "has space.example",
            "spiffe://x/4111111111111111",
            ":nothing",
            "a..b",
            &"a".repeat(256),
        ] {
            assert!(!valid_cert_identity(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn certificate_identities_authenticate_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
        let roles = parse_roles("detokenize").unwrap();
        let id = "spiffe://aggregator.example/router";
        let (p, _) = create_principal(&*store, "router", &roles, &TenantScope::All, Some(id))
            .await
            .unwrap();
        let auth = Authenticator::new(store.clone());
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // Any of the certificate's identities may be the bound one.
        assert_eq!(
            auth.authenticate_cert(&ids(&["router.example", id]))
                .await
                .unwrap(),
            p
        );
        assert!(matches!(
            auth.authenticate_cert(&ids(&["spiffe://aggregator.example/other"]))
                .await,
            Err(AuthError::Failed(AuthFailure::UnknownCertificate))
        ));
        assert!(matches!(
            create_principal(&*store, "router-2", &roles, &TenantScope::All, Some(id)).await,
            Err(AccessError::NameTaken)
        ));
        assert!(matches!(
            create_principal(&*store, "x", &roles, &TenantScope::All, Some("no spaces")).await,
            Err(AccessError::InvalidCertIdentity)
        ));
        revoke_principal(&*store, "router").await.unwrap();
        assert!(matches!(
            auth.authenticate_cert(&ids(&[id])).await,
            Err(AuthError::Failed(AuthFailure::UnknownCertificate))
        ));
    }
}
