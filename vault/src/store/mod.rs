//! Storage behind one trait, two backends: SQLite (embedded, the default,
//! [`sqlite`]) and PostgreSQL (production, [`postgres`]). Both run the same
//! SQL (`sql.rs`) and the same tests (`tests.rs`). [`open`] picks one from a
//! database URL.
//!
//! Invariants every implementation keeps:
//! - a card row and the audit event that records its creation or deletion are
//!   written in one transaction: both or neither;
//! - `(tenant, fingerprint)` is unique, so a PAN tokenized twice (even
//!   concurrently) for a tenant yields one token;
//! - audit events are append-only (storage-level triggers) and contain no
//!   card number ([`check_event`] runs before every insert);
//! - rows hold ciphertext, never a clear PAN, expiry or name;
//! - cards are inserted only under the active DEK and fingerprint key: the
//!   insert transaction checks (and on PostgreSQL share-locks) their rows,
//!   so an instance whose keys were rotated elsewhere is refused
//!   ([`StoreError::StaleKeys`]) instead of writing under an old key, and
//!   a card stored under an older fingerprint key is found by it;
//! - key changes (rotation, retirement, destruction, re-wrapping, the end of
//!   a re-encryption pass) and their audit events share one transaction.

pub mod pg_hosts;
pub mod postgres;
#[cfg(test)]
mod roles_tests;
mod rows;
mod sql;
pub mod sqlite;
mod sqlite_reader;
mod sqlite_writer;
#[cfg(test)]
mod sqlite_writer_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use audit::{AuditEvent, StoredEvent};

use crate::pan::contains_pan_like;

/// Storage failures. The messages carry database error text, which never
/// contains card data (no PAN is ever bound to a query).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    /// From SQLite's dedicated writer (`sqlite_writer.rs`), which does not
    /// go through sqlx.
    #[error("storage unavailable: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("storage migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("storage operation timed out")]
    Timeout,
    #[error("unsupported database URL: use sqlite://PATH or postgres://...")]
    UnsupportedUrl,
    #[error("backup output failed: {0}")]
    Output(#[from] std::io::Error),
    #[error("a row with this unique key already exists")]
    Conflict,
    #[error("stored data is malformed: {0}")]
    Corrupt(&'static str),
    #[error("audit event refused: a text field looks like a card number")]
    AuditContent,
    /// The keys this instance holds are no longer the active ones (another
    /// instance rotated them): reload the keys and try again.
    #[error("the vault keys changed since they were loaded")]
    StaleKeys,
    /// A new token is already taken (a pan-shaped token drawn twice):
    /// nothing was written; draw new tokens and try again.
    #[error("a new token is already in use")]
    TokenTaken,
}

impl StoreError {
    /// Whether the database answered but refused to commit: a read-only
    /// database or transaction, a standby (PostgreSQL SQLSTATE 25006), a
    /// full disk (53100, SQLite's `SQLITE_FULL`), a read-only SQLite file
    /// (`SQLITE_READONLY`) or a failed write or sync (`SQLITE_IOERR`).
    /// Readiness reports it as `storage_read_only`, apart from a database
    /// that cannot be reached (`storage_unavailable`).
    pub fn is_read_only(&self) -> bool {
        match self {
            StoreError::Unavailable(sqlx::Error::Database(db)) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or("");
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    code.parse::<i32>()
                        .is_ok_and(|c| sqlite_cannot_write(c & 0xff))
                } else {
                    matches!(code, "25006" | "53100")
                }
            }
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                sqlite_cannot_write(e.extended_code & 0xff)
            }
            _ => false,
        }
    }
}

/// What [`Store::record_shared_reveal`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedReveal {
    /// The window's start (unix ms, the database's clock).
    pub window_start: i64,
    /// Distinct tokens the principal revealed in it so far.
    pub distinct: u64,
    /// Whether the token was new in the window.
    pub new: bool,
    /// Whether the rule already fired in the window.
    pub fired: bool,
    /// Milliseconds until the window ends (the database's clock).
    pub left_ms: i64,
}

/// Which backends share rate-limit state between instances
/// ([`Store::take_shared_rate`]).
impl postgres::PgStore {
    /// Every instance on the database shares the buckets (`rate_buckets`,
    /// migration 0013).
    pub(crate) const SHARED_LIMITS: bool = true;
}

impl sqlite::SqliteStore {
    /// One process: the buckets stay in memory (`monitor`).
    pub(crate) const SHARED_LIMITS: bool = false;
}

/// SQLite's primary result codes for a write the database refused:
/// `SQLITE_READONLY` (8), `SQLITE_IOERR` (10), `SQLITE_FULL` (13).
fn sqlite_cannot_write(primary: i32) -> bool {
    matches!(primary, 8 | 10 | 13)
}

/// A wrapped vault key as stored. A destroyed key has an empty `wrapped`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub purpose: KeyPurpose,
    pub version: u32,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
    pub created_at: i64,
    pub state: KeyState,
    /// Unix milliseconds; set when retired (also for destroyed keys).
    pub retired_at: Option<i64>,
    /// Unix milliseconds; set when the wrapped material was erased.
    pub destroyed_at: Option<i64>,
    /// Unix milliseconds; on a DEK: when the re-encryption pass to it
    /// finished (no record was left under an older DEK or fingerprint key).
    pub reencrypted_at: Option<i64>,
}

impl StoredKey {
    /// A new active key (what first start and rotation insert).
    pub fn new_active(
        purpose: KeyPurpose,
        version: u32,
        kek_id: String,
        wrapped: Vec<u8>,
        created_at: i64,
    ) -> StoredKey {
        StoredKey {
            purpose,
            version,
            kek_id,
            wrapped,
            created_at,
            state: KeyState::Active,
            retired_at: None,
            destroyed_at: None,
            reencrypted_at: None,
        }
    }
}

/// Where a key is in its life (PCI DSS 3.6/3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyState {
    /// The one key of its purpose that new records use.
    Active,
    /// An older version, kept to open (DEK) or find (fingerprint) records
    /// that the re-encryption pass has not moved yet. Never used to seal.
    DecryptOnly,
    /// No record uses it; never loaded again.
    Retired,
    /// Retired and its wrapped material erased: nothing sealed under it can
    /// ever be opened again.
    Destroyed,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt_only",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<KeyState> {
        [
            KeyState::Active,
            KeyState::DecryptOnly,
            KeyState::Retired,
            KeyState::Destroyed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Whether keys in this state are held in memory (active, decrypt-only).
    pub fn is_loaded(self) -> bool {
        matches!(self, KeyState::Active | KeyState::DecryptOnly)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyPurpose {
    /// Data-encryption key of card records.
    Dek,
    /// Fingerprint master key.
    Fingerprint,
}

impl KeyPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPurpose::Dek => "dek",
            KeyPurpose::Fingerprint => "fingerprint",
        }
    }

    pub fn parse(s: &str) -> Option<KeyPurpose> {
        match s {
            "dek" => Some(KeyPurpose::Dek),
            "fingerprint" => Some(KeyPurpose::Fingerprint),
            _ => None,
        }
    }
}

/// A card row: clear metadata plus the sealed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRow {
    pub token: String,
    pub tenant: String,
    pub fingerprint: String,
    pub brand: String,
    pub bin: String,
    pub last4: String,
    pub pan_len: u8,
    pub key_version: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    /// Unix milliseconds, UTC.
    pub created_at: i64,
    /// Version of the fingerprint key that computed `fingerprint`.
    pub fingerprint_version: u32,
    /// After this (Unix ms) the token is gone as if deleted.
    pub expires_at: Option<i64>,
    /// Last tokenize or detokenize of the card (Unix ms; retention).
    pub last_used_at: Option<i64>,
    /// Last expiry or name update (Unix ms).
    pub updated_at: Option<i64>,
}

/// A hosted collection session (see `crate::collect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectSessionRow {
    pub id: String,
    pub tenant: String,
    /// The one origin allowed to embed the form, in browser form.
    pub allowed_origin: String,
    /// `ClientSecret::hash` of the client secret (never the secret).
    pub secret_hash: Vec<u8>,
    pub require_cvc: bool,
    /// `random` or `pan_shaped`.
    pub token_format: String,
    pub reference: Option<String>,
    /// `CollectStyle` as JSON.
    pub style: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    /// Refused submissions so far.
    pub failures: i64,
    /// Set when too many submissions were refused.
    pub closed_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// The card's token once completed.
    pub token: Option<String>,
    /// A submission holds the session until then (see
    /// `Store::claim_collect_session`).
    pub claimed_until: Option<i64>,
}

/// Where a forwarded call's `Idempotency-Key` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardKeyState {
    /// Claimed: the call is under way (or its vault stopped during it).
    Pending,
    /// The answer is stored.
    Completed,
}

impl ForwardKeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardKeyState::Pending => "pending",
            ForwardKeyState::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<ForwardKeyState> {
        match s {
            "pending" => Some(ForwardKeyState::Pending),
            "completed" => Some(ForwardKeyState::Completed),
            _ => None,
        }
    }
}

/// A forwarded call's `Idempotency-Key` (table `forward_idempotency`, see
/// its migration): who claimed it for which upstream and request, and once
/// completed, the answer sealed under a DEK. Holds no raw key and no clear
/// answer body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardKeyRow {
    pub principal_id: String,
    pub upstream: String,
    /// Hex SHA-256 of the Idempotency-Key.
    pub key_hash: String,
    /// Hex SHA-256 of method, path, content type and body.
    pub request_hash: String,
    pub state: ForwardKeyState,
    pub created_at: i64,
    /// The rest is set by the completion (`None` while pending).
    pub completed_at: Option<i64>,
    pub answer: Option<StoredForwardAnswer>,
}

/// The sealed answer of a completed forwarded call, with its clear
/// metadata (all of it bound by `crypto::ForwardAnswerAad`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredForwardAnswer {
    /// The tenant of the call's tokens.
    pub tenant: String,
    pub status: u16,
    pub content_type: Option<String>,
    pub location: Option<String>,
    pub key_version: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// What [`Store::claim_forward_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardClaim {
    /// The new row was inserted: the caller holds the key.
    Claimed,
    /// A row for the same principal, upstream and key exists (pending or
    /// completed); nothing was written.
    Existing(Box<ForwardKeyRow>),
}

/// A tenant: its policy, and the salt of its fingerprint key.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantRow {
    pub name: String,
    /// 32 random bytes mixed into the tenant's fingerprint key; `None` for a
    /// tenant from before salts (key from the master and name alone) and
    /// for a deleted tenant (erased: crypto-shred).
    pub fingerprint_salt: Option<Vec<u8>>,
    /// May tokenize with `pan_shaped` tokens.
    pub pan_shaped: bool,
    /// Default lifetime of its tokens.
    pub token_ttl_days: Option<u32>,
    /// Records not used for this long are purged.
    pub retention_days: Option<u32>,
    pub created_at: i64,
    pub updated_at: i64,
    pub deleted_at: Option<i64>,
}

impl std::fmt::Debug for TenantRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRow")
            .field("name", &self.name)
            .field("salted", &self.fingerprint_salt.is_some())
            .field("pan_shaped", &self.pan_shaped)
            .field("token_ttl_days", &self.token_ttl_days)
            .field("retention_days", &self.retention_days)
            .field("deleted_at", &self.deleted_at)
            .finish_non_exhaustive()
    }
}

/// What a purge batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeCounts {
    /// Past their `expires_at`.
    pub expired: u64,
    /// Unused for longer than their tenant's retention.
    pub retention: u64,
}

/// One card to insert unless its tenant already has the same fingerprint,
/// with the audit event to record in the same transaction. The store sets the
/// event's token (the new or the existing one) and detail (`created` or
/// `existing`).
///
/// During a fingerprint key rotation the same card may still be stored under
/// a fingerprint of an older key: `previous_fingerprints` (the card's
/// fingerprints under every decrypt-only fingerprint key) are looked up in
/// the same transaction first, so a card tokenized before the rotation gets
/// its token back and never a second row.
#[derive(Debug)]
pub struct NewCard {
    pub row: CardRow,
    pub event: AuditEvent,
    pub previous_fingerprints: Vec<String>,
}

/// What happened to one [`NewCard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inserted {
    /// The row now stored for this tenant and fingerprint.
    pub row: CardRow,
    /// True when this call created it; false when it already existed.
    pub created: bool,
}

/// A principal as stored. `key_hash` is an argon2id PHC string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRow {
    pub id: String,
    pub name: String,
    pub roles: String,
    pub tenants: String,
    pub key_hash: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// The client-certificate identity (URI or DNS SAN) bound to it, if any.
    pub cert_identity: Option<String>,
}

/// What a store's principal change feed ([`Store::principal_changes`])
/// reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalChange {
    /// The feed's connection is listening, and every change committed
    /// before `at` has been reported. Sent when LISTEN is (re)established
    /// and then after each heartbeat on the listening connection.
    Confirmed { at: std::time::Instant },
    /// The row of this principal id changed (inserted, updated, deleted).
    Changed(String),
    /// Any row may have changed (a truncation).
    All,
    /// The listening connection is lost: changes may go unreported until
    /// the next `Confirmed`.
    Lost,
}

/// A principal change feed; ends when the store's listener task stops.
pub type PrincipalChanges = tokio::sync::mpsc::UnboundedReceiver<PrincipalChange>;

/// The connections of a store's pool at one moment (for metrics; the
/// numbers are read one after the other, so they may disagree by one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// Connections open now, idle or in use.
    pub open: u32,
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// The most the pool opens.
    pub max: u32,
}

impl PoolState {
    /// Open connections lent out now.
    pub fn in_use(&self) -> u32 {
        self.open.saturating_sub(self.idle)
    }
}

/// The writes of the group commit (`commit.rs`): what a group of
/// concurrent requests turns into. Each is one durable transaction with the
/// semantics of the [`Store`] method of the same name.
#[async_trait]
pub trait Writer: Send + Sync + std::fmt::Debug {
    async fn insert_cards(
        &self,
        cards: Vec<NewCard>,
        other_events: Vec<AuditEvent>,
    ) -> Result<Vec<Inserted>, StoreError>;
    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError>;
    async fn touch_cards(
        &self,
        tokens: &[String],
        now: i64,
        granularity_ms: i64,
    ) -> Result<(), StoreError>;
}

/// Point reads on the request path, answered without leaving the calling
/// thread: SQLite's read-only connections (`sqlite_reader.rs`). Same
/// semantics as the [`Store`] methods of the same names.
pub(crate) trait PointReader: Send + Sync + std::fmt::Debug {
    fn find_card(&self, token: &str) -> Result<Option<CardRow>, StoreError>;
    fn find_principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError>;
    fn find_principal_by_cert(&self, identity: &str) -> Result<Option<PrincipalRow>, StoreError>;
    fn find_tenant(&self, name: &str) -> Result<Option<TenantRow>, StoreError>;
}

/// The storage interface of the vault.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// A writer of its own for the group commit, if the backend has one
    /// that is faster than its pool: SQLite's dedicated writer thread
    /// (`sqlite_writer.rs`). None: the group commit writes through the
    /// store. Each call starts a new one.
    fn dedicated_writer(&self) -> Result<Option<Arc<dyn Writer>>, StoreError>;
    /// A feed of principal changes made by any process sharing the
    /// database, if the backend has one: PostgreSQL's LISTEN on
    /// `cardvault_principals` (fed by a trigger, migration 0010), on a
    /// connection and task of its own, started by this call (it needs a
    /// Tokio runtime; without one, None). None on SQLite, whose principal
    /// reads are inline and cheap. The task stops when the receiver is
    /// dropped.
    fn principal_changes(&self) -> Option<PrincipalChanges>;
    /// Cheap round trip to the database, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Write one row and commit (`storage_probe`, migration 0011): whether
    /// the store can commit, for readiness. A query answering proves the
    /// connection only; a full disk, a read-only database or a standby
    /// fail here ([`StoreError::is_read_only`]).
    async fn probe_write(&self) -> Result<(), StoreError>;
    /// Take one token from the rate-limit bucket `(scope, key)` that every
    /// instance sharing the database uses, refilled at `rate` by the
    /// database's clock: PostgreSQL (`rate_buckets`, migration 0013; one
    /// statement, committed without waiting for the WAL flush: the buckets
    /// are counters, not records). `Some(Err(wait))`: refused, `wait` until
    /// the next token. `None`: the backend keeps no shared state (SQLite,
    /// one process: the in-memory buckets of `monitor` apply).
    async fn take_shared_rate(
        &self,
        scope: &str,
        key: &str,
        rate: crate::monitor::Rate,
    ) -> Result<Option<Result<(), std::time::Duration>>, StoreError>;
    /// Return a token taken by [`Store::take_shared_rate`] for a request
    /// refused later (nothing on a backend without shared buckets).
    async fn give_back_shared_rate(
        &self,
        scope: &str,
        key: &str,
        rate: crate::monitor::Rate,
    ) -> Result<(), StoreError>;
    /// The anomaly rule's shared count (PostgreSQL, `anomaly_windows` and
    /// `anomaly_tokens`, migration 0013): record that `principal` revealed
    /// the token hashed to `token_hash` in the window of `window_ms` the
    /// database's clock is in (unless the rule already fired there). None:
    /// the backend shares no state (SQLite: the in-memory rule applies).
    async fn record_shared_reveal(
        &self,
        principal: &str,
        window_ms: i64,
        token_hash: i64,
    ) -> Result<Option<SharedReveal>, StoreError>;
    /// The principal's windows in `[from_ms, to_ms)` with their distinct
    /// counts (oldest first), after deleting its tokens of windows before
    /// `to_ms` and its windows before `from_ms` (what the rule no longer
    /// needs).
    async fn shared_anomaly_history(
        &self,
        principal: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, u64)>, StoreError>;
    /// Whether instances sharing the database share the monitoring state
    /// (rate limits, anomaly counts, source blocks): PostgreSQL.
    fn shared_monitoring(&self) -> bool;
    /// Block a source for `block` from now (the database's clock) in
    /// `source_blocks` (migration 0014), unless a block is in force: true
    /// for the one caller that started it. Nothing on SQLite (false).
    async fn block_source(
        &self,
        source: &str,
        block: std::time::Duration,
    ) -> Result<bool, StoreError>;
    /// The source blocks in force and the time each has left (and the
    /// ended ones deleted). Empty on SQLite.
    async fn source_blocks(&self) -> Result<Vec<(String, std::time::Duration)>, StoreError>;
    /// Mark the principal's window as fired; true for the one caller that
    /// did (the others see it fired already).
    async fn claim_shared_anomaly(
        &self,
        principal: &str,
        window_start: i64,
    ) -> Result<bool, StoreError>;
    /// Close the pool (SQLite: checkpoints the WAL into the main file).
    async fn close(&self);
    /// The pool's connections now (no database round trip).
    fn pool_state(&self) -> PoolState;

    async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError>;
    /// Insert a wrapped key unless one with the same purpose and version
    /// exists (several instances may start at once). Returns whether it was
    /// inserted; the event is written only then.
    async fn insert_key(&self, key: &StoredKey, event: AuditEvent) -> Result<bool, StoreError>;

    /// Insert cards in one transaction, each unless its tenant already has
    /// its fingerprint (or one of its `previous_fingerprints`), together with
    /// `other_events` (refused cards of the same request). Results are in
    /// input order. The DEK and fingerprint key versions of the rows must be
    /// the active ones ([`StoreError::StaleKeys`] otherwise): the transaction
    /// holds them (a share lock on PostgreSQL), so a rotation waits for it.
    async fn insert_cards(
        &self,
        cards: Vec<NewCard>,
        other_events: Vec<AuditEvent>,
    ) -> Result<Vec<Inserted>, StoreError>;
    async fn find_card(&self, token: &str) -> Result<Option<CardRow>, StoreError>;
    /// Which of these tokens are taken.
    async fn tokens_taken(&self, tokens: &[String]) -> Result<Vec<String>, StoreError>;
    /// Cards with this BIN, last four and length whose token is pan-shaped
    /// (not `tok_`): how much of their token space is used.
    async fn pan_shaped_in_use(
        &self,
        bin: &str,
        last4: &str,
        pan_len: u8,
    ) -> Result<u64, StoreError>;
    /// Replace the sealed record of `token` (expiry or name update) if it is
    /// still the one sealed in `expected_nonce`, with `event`, in one
    /// transaction; the row's keys must be the active ones
    /// ([`StoreError::StaleKeys`]). Returns false if the record changed
    /// meanwhile (or is gone).
    async fn update_card(
        &self,
        row: &CardRow,
        expected_nonce: &[u8],
        active_fingerprint: u32,
        event: AuditEvent,
    ) -> Result<bool, StoreError>;
    /// Record a use of these cards (retention), at most once per
    /// `granularity_ms` per card.
    async fn touch_cards(
        &self,
        tokens: &[String],
        now: i64,
        granularity_ms: i64,
    ) -> Result<(), StoreError>;
    /// Delete up to `limit` records past their expiry (at `now`) and, per
    /// `(tenant, cutoff)`, unused since before the cutoff; one audit event
    /// with the counts (`event`'s detail is set) in the same transaction,
    /// written only if something was deleted.
    async fn purge_due(
        &self,
        now: i64,
        retention: &[(String, i64)],
        limit: u32,
        event: AuditEvent,
    ) -> Result<PurgeCounts, StoreError>;

    async fn tenant(&self, name: &str) -> Result<Option<TenantRow>, StoreError>;
    async fn tenants(&self) -> Result<Vec<TenantRow>, StoreError>;
    /// Insert the tenant unless it exists; returns the stored row.
    async fn ensure_tenant(&self, row: &TenantRow) -> Result<TenantRow, StoreError>;
    /// Insert or update the tenant's policy (pan_shaped, token_ttl_days,
    /// retention_days; a new tenant gets `row`'s salt) with `event`.
    async fn set_tenant_policy(
        &self,
        row: &TenantRow,
        event: AuditEvent,
    ) -> Result<TenantRow, StoreError>;
    /// Mark the tenant deleted and erase its fingerprint salt, with `event`.
    /// Returns false if it was already deleted.
    async fn mark_tenant_deleted(
        &self,
        name: &str,
        at: i64,
        event: AuditEvent,
    ) -> Result<bool, StoreError>;
    /// Delete up to `limit` of the tenant's records; returns how many.
    async fn delete_tenant_cards(&self, tenant: &str, limit: u32) -> Result<u64, StoreError>;
    /// Store a new collection session and record `event` in the same
    /// transaction.
    async fn insert_collect_session(
        &self,
        row: &CollectSessionRow,
        event: AuditEvent,
    ) -> Result<(), StoreError>;
    async fn find_collect_session(&self, id: &str)
        -> Result<Option<CollectSessionRow>, StoreError>;
    /// Mark an open session (not completed, not closed, not expired at
    /// `at`) completed with `token`, and record `event`, in one
    /// transaction. False (nothing written) if it was no longer open.
    async fn complete_collect_session(
        &self,
        id: &str,
        token: &str,
        at: i64,
        event: AuditEvent,
    ) -> Result<bool, StoreError>;
    /// Let one submission at a time tokenize for an open session: true if
    /// it was open and not held by another submission at `now`; it is then
    /// held until `until` (completing or refusing releases it).
    async fn claim_collect_session(
        &self,
        id: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError>;
    /// Count a refused submission of an open session, closing it at
    /// `max_failures`, and record `event`, in one transaction; `release`:
    /// the refused submission held the session's claim, which it lets go
    /// (a refusal before claiming leaves another submission's claim). Returns the
    /// session's failures after it (`None`: no longer open, nothing
    /// counted, the event still recorded).
    async fn fail_collect_session(
        &self,
        id: &str,
        max_failures: u32,
        at: i64,
        release: bool,
        event: AuditEvent,
    ) -> Result<Option<i64>, StoreError>;
    /// Delete up to `limit` sessions that expired before `before`; the
    /// counts of those deleted, (completed, not completed). `event` (given
    /// the counts) is recorded in the same transaction when any is deleted.
    async fn purge_collect_sessions(
        &self,
        before: i64,
        limit: u32,
        event: &(dyn Fn(u64, u64) -> AuditEvent + Send + Sync),
    ) -> Result<(u64, u64), StoreError>;
    /// Claim a forwarded call's `Idempotency-Key`: insert `row` (pending)
    /// unless a row with its principal, upstream and key hash exists, in one
    /// atomic step (of concurrent claims exactly one is `Claimed`). A row
    /// created before `expired_before` is gone as if purged: it is deleted
    /// and the new one inserted in the same transaction.
    async fn claim_forward_key(
        &self,
        row: &ForwardKeyRow,
        expired_before: i64,
    ) -> Result<ForwardClaim, StoreError>;
    /// Complete the pending claim `(principal_id, upstream, key_hash)`
    /// made at `created_at` with its sealed answer. False (nothing written)
    /// if that claim is no longer pending (completed, released, purged), or
    /// the answer's DEK is neither active nor decrypt-only.
    async fn complete_forward_key(
        &self,
        principal_id: &str,
        upstream: &str,
        key_hash: &str,
        created_at: i64,
        completed_at: i64,
        answer: &StoredForwardAnswer,
    ) -> Result<bool, StoreError>;
    /// Delete the pending claim made at `created_at` (its call never reached
    /// the upstream); false if it is not there or not pending.
    async fn release_forward_key(
        &self,
        principal_id: &str,
        upstream: &str,
        key_hash: &str,
        created_at: i64,
    ) -> Result<bool, StoreError>;
    async fn find_forward_key(
        &self,
        principal_id: &str,
        upstream: &str,
        key_hash: &str,
    ) -> Result<Option<ForwardKeyRow>, StoreError>;
    /// Delete up to `limit` keys (pending or completed) claimed before
    /// `before`; returns how many. `event` (given the count) is recorded in
    /// the same transaction when any is deleted.
    async fn purge_forward_keys(
        &self,
        before: i64,
        limit: u32,
        event: &(dyn Fn(u64) -> AuditEvent + Send + Sync),
    ) -> Result<u64, StoreError>;
    /// Delete the card with this token and tenant and record `event` in the
    /// same transaction. Returns false (and writes nothing) if no such row.
    async fn delete_card(
        &self,
        token: &str,
        tenant: &str,
        event: AuditEvent,
    ) -> Result<bool, StoreError>;

    /// Append one audit event on its own; returns its place in the chain.
    async fn append_audit(&self, event: AuditEvent) -> Result<i64, StoreError>;
    /// Events with `seq > after`, oldest first, at most `limit`.
    async fn audit_events(&self, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError>;

    async fn insert_principal(
        &self,
        row: &PrincipalRow,
        event: AuditEvent,
    ) -> Result<(), StoreError>;
    async fn find_principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError>;
    /// The active principal bound to a client-certificate identity.
    async fn find_principal_by_cert(
        &self,
        identity: &str,
    ) -> Result<Option<PrincipalRow>, StoreError>;
    async fn list_principals(&self) -> Result<Vec<PrincipalRow>, StoreError>;
    /// Revoke the active principal with this name; false if there is none.
    async fn revoke_principal(
        &self,
        name: &str,
        at: i64,
        event: AuditEvent,
    ) -> Result<bool, StoreError>;

    /// Chained audit entries matching `filter` with `chain_seq > after`, in
    /// chain order, at most `limit`.
    async fn query_audit(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: u32,
    ) -> Result<Vec<audit::ChainedEvent>, StoreError>;
    /// Chained audit entries with `chain_seq > after`, in chain order.
    async fn chained_events(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<audit::ChainedEvent>, StoreError>;
    /// Number of entries in the audit chain.
    async fn audit_size(&self) -> Result<u64, StoreError>;
    /// Every signed checkpoint, smallest tree first.
    async fn checkpoints(&self) -> Result<Vec<audit::Checkpoint>, StoreError>;
    /// The newest signed checkpoint (one row, for the metrics).
    async fn last_checkpoint(&self) -> Result<Option<audit::Checkpoint>, StoreError>;
    /// Sign and store a checkpoint of the chain as it is now, unless the
    /// newest checkpoint already covers it. [`StoreError::StaleKeys`] if
    /// `key` is a stored signing key that was retired (another instance
    /// rotated it): reload the signing key.
    async fn write_checkpoint(
        &self,
        key: &audit::SigningKey,
    ) -> Result<Option<audit::Checkpoint>, StoreError>;
    async fn load_signing_keys(&self) -> Result<Vec<SigningKeyRow>, StoreError>;
    /// Insert a signing key unless its generation exists; the event only then.
    async fn insert_signing_key(
        &self,
        key: &SigningKeyRow,
        event: AuditEvent,
    ) -> Result<bool, StoreError>;
    /// Rotate the audit signing key, in one transaction: retire `old` (the
    /// stored generation `new.generation - 1`, still signing), insert
    /// `new`, record `event`, then sign with `old` and store the key
    /// announcement: the checkpoint of the trail including `event` that
    /// names `new`'s public key. Returns the announcement.
    /// [`StoreError::Conflict`] if `old` is not the signing generation
    /// (another rotation came first).
    async fn rotate_signing_key(
        &self,
        old: &audit::SigningKey,
        new: &SigningKeyRow,
        event: AuditEvent,
    ) -> Result<audit::Checkpoint, StoreError>;
    /// Destroy a retired signing key: its wrapped secret is erased, its
    /// public key kept (it verifies the checkpoints it signed); `event`
    /// recorded in the same transaction.
    async fn destroy_signing_key(
        &self,
        generation: u32,
        at: i64,
        event: AuditEvent,
    ) -> Result<KeyChangeOutcome, StoreError>;

    /// Make `keys` (each the next version of its purpose, state active) the
    /// active keys, demote the keys they replace to decrypt-only, and record
    /// `events`, in one transaction. [`StoreError::Conflict`] if another
    /// instance rotated first.
    async fn rotate_keys(
        &self,
        keys: &[StoredKey],
        events: Vec<AuditEvent>,
    ) -> Result<(), StoreError>;
    /// One batch of the re-encryption pass, in one transaction: the first
    /// `pass.limit` cards in insertion order (after `pass.after`) under a DEK
    /// older than `pass.dek_version` or a fingerprint key older than
    /// `pass.fingerprint_version`; `reseal` gives each one's new sealed record
    /// and fingerprint (None: skip it); each is updated only if still under
    /// the versions it was read with. When none remains, the active DEK row
    /// is marked re-encrypted and `pass.finished_event` recorded, once.
    /// [`StoreError::StaleKeys`] if the versions are not the active ones.
    async fn reencrypt_batch(
        &self,
        pass: &PassBatch,
        reseal: &(dyn for<'r> Fn(&'r CardRow) -> Option<Resealed> + Send + Sync),
    ) -> Result<BatchOutcome, StoreError>;
    /// Retire or destroy a key and record `event` in the same transaction.
    async fn change_key_state(
        &self,
        purpose: KeyPurpose,
        version: u32,
        change: KeyChange,
        at: i64,
        event: AuditEvent,
    ) -> Result<KeyChangeOutcome, StoreError>;
    /// Replace the wrapped material of every key not destroyed and of every
    /// audit signing key (all now wrapped by `keys[..].kek_id`, all wrapped by
    /// `old_kek_id` before) and record `event`, in one transaction.
    /// [`StoreError::Conflict`] if any key is not as expected.
    async fn rewrap_keys(
        &self,
        old_kek_id: &str,
        keys: &[StoredKey],
        signing: &[SigningKeyRow],
        event: AuditEvent,
    ) -> Result<(), StoreError>;
    /// Number of cards per DEK version and per fingerprint key version.
    async fn key_usage(&self) -> Result<KeyUsage, StoreError>;
    /// Number of cards under a DEK older than `dek_version` or a fingerprint
    /// key older than `fingerprint_version` (what the re-encryption pass
    /// still has to move).
    async fn count_outdated(
        &self,
        dek_version: u32,
        fingerprint_version: u32,
    ) -> Result<u64, StoreError>;

    /// Archived segments of the audit trail (`tokenizer audit archive`),
    /// oldest first.
    async fn audit_archives(&self) -> Result<Vec<audit::db::ArchiveRow>, StoreError>;
    /// The largest checkpoint tree size above `after` whose checkpoint was
    /// signed before `cutoff` (to the second, never after it): the end of
    /// the longest segment that may be archived.
    async fn checkpoint_before(
        &self,
        after: u64,
        cutoff: time::OffsetDateTime,
    ) -> Result<Option<u64>, StoreError>;
    /// Record an archived segment and its audit event in one transaction
    /// (which holds the audit head lock, so archivers are serialised). The
    /// database refuses a segment that does not start right after the last
    /// one or does not end at a checkpoint ([`StoreError::Conflict`]).
    async fn record_archive(
        &self,
        archive: &audit::db::ArchiveRow,
        event: AuditEvent,
    ) -> Result<(), StoreError>;
    /// Delete up to `limit` audit entries that lie inside archived segments;
    /// returns how many went. Needs DELETE on `audit_events` (the owner
    /// role on PostgreSQL); the database refuses any other entry.
    async fn delete_archived_audit(&self, limit: u32) -> Result<u64, StoreError>;

    /// Stream every row of every table to `sink` from one consistent
    /// snapshot (one read transaction; REPEATABLE READ on PostgreSQL). Not
    /// time-bounded: a backup takes as long as it takes.
    async fn export(
        &self,
        sink: &mut (dyn FnMut(BackupRecord) -> Result<(), StoreError> + Send),
    ) -> Result<(), StoreError>;
    /// True when no table holds a row (a restore target must be empty).
    async fn is_empty(&self) -> Result<bool, StoreError>;
    /// Insert the rows of a backup in one transaction: all or nothing.
    /// Audit events keep their sequence numbers.
    async fn import(&self, records: Vec<BackupRecord>) -> Result<(), StoreError>;
}

/// One batch of the re-encryption pass (see [`Store::reencrypt_batch`]).
#[derive(Debug, Clone)]
pub struct PassBatch {
    pub dek_version: u32,
    pub fingerprint_version: u32,
    /// Start after this insertion sequence number (SQLite's rowid,
    /// PostgreSQL's `seq`; a hint for speed; None: from the start).
    pub after: Option<i64>,
    pub limit: u32,
    /// Count the rows still to move even if this batch is full (a count
    /// scans them; it is always done when a batch comes back short).
    pub count: bool,
    pub finished_event: AuditEvent,
}

/// A card's new sealed record and fingerprint.
#[derive(Debug, Clone)]
pub struct Resealed {
    pub key_version: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub fingerprint: String,
    pub fingerprint_version: u32,
}

/// What one re-encryption batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows read.
    pub selected: u64,
    /// Rows moved to the active keys.
    pub moved: u64,
    /// Rows that could not be resealed (or changed meanwhile).
    pub skipped: u64,
    /// Rows still under an older key after this batch, if counted (see
    /// [`PassBatch::count`]).
    pub remaining: Option<u64>,
    /// The insertion sequence number of the last row read (where the next
    /// batch may start).
    pub last_seq: Option<i64>,
    /// This batch finished the pass (and recorded its event).
    pub finished: bool,
}

/// A key state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    /// decrypt-only and used by no card -> retired.
    Retire,
    /// retired -> destroyed (wrapped material erased).
    Destroy,
}

/// The result of [`Store::change_key_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChangeOutcome {
    Done,
    NotFound,
    /// The key is the active one.
    Active,
    /// Cards still use the key.
    InUse,
    /// The key is not in the state the change starts from.
    WrongState(KeyState),
}

/// Cards per key version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub by_dek: std::collections::BTreeMap<u32, u64>,
    pub by_fingerprint: std::collections::BTreeMap<u32, u64>,
}

/// Equality filters of an audit query (all optional, combined with AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub principal: Option<String>,
    pub token: Option<String>,
    pub action: Option<audit::Action>,
    pub tenant: Option<String>,
    pub outcome: Option<audit::Outcome>,
}

/// One row of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupRecord {
    Key(StoredKey),
    Card(CardRow),
    Principal(PrincipalRow),
    Tenant(TenantRow),
    Audit(AuditRow),
    Checkpoint(audit::Checkpoint),
    SigningKey(SigningKeyRow),
    Archive(audit::db::ArchiveRow),
}

/// An audit row as stored: row number, event, and its link in the chain
/// (absent only for events written before the chain existed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: i64,
    pub event: AuditEvent,
    pub chain: Option<ChainLink>,
}

/// Where an event sits in the tamper-evident chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLink {
    pub chain_seq: u64,
    pub leaf_hash: [u8; 32],
    pub chain_hash: [u8; 32],
}

/// The audit checkpoint signing key as stored: wrapped by the KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRow {
    pub generation: u32,
    pub key_id: String,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
    /// `cardvault-audit-ed25519:<hex>`: what auditors verify with.
    pub public_key: String,
    pub created_at: i64,
    /// When a rotation replaced it: it signs nothing after (None: the one
    /// that signs, the newest generation).
    pub retired_at: Option<i64>,
    /// When its wrapped secret was erased (`wrapped` is then empty); the
    /// public key stays.
    pub destroyed_at: Option<i64>,
}

impl SigningKeyRow {
    /// `active` (signs), `retired` or `destroyed`.
    pub fn state(&self) -> KeyState {
        match (self.retired_at, self.destroyed_at) {
            (_, Some(_)) => KeyState::Destroyed,
            (Some(_), None) => KeyState::Retired,
            (None, None) => KeyState::Active,
        }
    }
}

/// Refuse to store an audit event with card-number-like text in any field.
pub fn check_event(event: &AuditEvent) -> Result<(), StoreError> {
    if event.text_fields().any(contains_pan_like) {
        return Err(StoreError::AuditContent);
    }
    Ok(())
}

/// Current time as Unix milliseconds.
pub fn now_millis() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite://PATH` (or `sqlite:PATH`) or `postgres://...` / `postgresql://...`.
    pub url: String,
    /// Apply pending migrations when opening.
    pub migrate: bool,
    /// Bound on each operation (PostgreSQL also waits at most this long for a connection).
    pub op_timeout: Duration,
    /// PostgreSQL pool size.
    pub max_connections: u32,
}

/// Which backend a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }
}

/// The SQLite URL of a file path.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Open the store a URL names, applying migrations if asked.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match Backend::of_url(&config.url)? {
        Backend::Sqlite => {
            let path = config
                .url
                .strip_prefix("sqlite://")
                .or_else(|| config.url.strip_prefix("sqlite:"))
                .unwrap_or_default();
            let path = path.split('?').next().unwrap_or_default();
            let store =
                sqlite::SqliteStore::open_unmigrated(Path::new(path), config.op_timeout).await?;
            if config.migrate {
                store.migrate().await?;
            }
            Ok(Arc::new(store))
        }
        Backend::Postgres => {
            let store = postgres::PgStore::connect_lazy(
                &config.url,
                postgres::PgSettings {
                    max_connections: config.max_connections,
                    op_timeout: config.op_timeout,
                },
            )?;
            if config.migrate {
                store.migrate().await?;
            }
            Ok(Arc::new(store))
        }
    }
}
