//! The vault's operations, all on the one entry point [`Vault`]. Each one
//! checks the caller's roles and tenants, validates input, and writes its
//! audit event (in the same transaction as the change for tokenize and
//! delete; before anything is returned for reads). An operation whose audit
//! event cannot be written fails.
//!
//! This module owns `Vault` and its construction, the request context, the
//! errors, [`TokenInfo`], and what several capabilities share: the write
//! path through the group commit (`write_cards`, `write_event`, `touch`),
//! audited refusals and failures (`require_role`, `deny`, `fail`), the token
//! lookup that is no oracle (`lookup`) and opening a stored record
//! (`open_row`, `open_with`). The operations, one `impl Vault` per file:
//! - `tokenize`: tokenize, tokenize_many (and `_with`), sealing new records,
//!   pan-shaped tokens;
//! - `reveal`: reading a stored card back: detokenize (monitored or not) and
//!   metadata;
//! - `update`: changing a stored card (PATCH, a newer card tokenized again)
//!   and deleting it;
//! - `audit_query`: the audit trail for auditors, checkpoints;
//! - `lifecycle`: what the running service calls: lifecycle events,
//!   readiness, key refresh, the security-code sweep;
//! - `collect`: hosted collection sessions: opened by the checkout server,
//!   read back by it, completed once by the edge;
//! - `forward`: releasing cards to the forwarding proxy, its events;
//! - `forward_idempotency`: a forwarded call's `Idempotency-Key`: claimed
//!   before the upstream is called, its answer stored sealed and replayed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use audit::{Action, AuditEvent, Outcome};
use hsm_shim::KeyEncryptionKey;

use crate::access::{Principal, Role};
use crate::brand::Brand;
use crate::card::{CardDataError, Expiry, Token, TokenFormat};
use crate::crypto::{CardSecret, CryptoError, RecordAad, Sealed, NONCE_LEN};
use crate::cvc::CvcHolder;
use crate::keys::{KeySet, Keyring, KeysError};
use crate::pan::{masked_form, PanError};
use crate::store::{now_millis, CardRow, KeyPurpose, KeyState, NewCard, Store, StoreError};
use crate::tenants::Tenants;

mod audit_query;
mod collect;
mod forward;
mod forward_idempotency;
mod lifecycle;
pub use lifecycle::probe_commit;
mod reveal;
mod tokenize;
mod update;

#[cfg(test)]
mod collect_tests;
#[cfg(test)]
mod forward_idempotency_tests;
#[cfg(test)]
mod tests;

pub use audit_query::{AuditPage, AuditQuery};
pub use collect::{
    CollectSession, CollectSessionInput, NewCollectSession, SessionStatus, Submission,
};
pub use forward::{
    ForwardOutcome, ForwardRelease, ForwardTarget, Released, Wanted, MAX_FORWARD_TOKENS,
};
pub use forward_idempotency::{
    forward_request_hash, ClaimHandle, ForwardAnswer, IdempotentClaim, StoredAnswer,
    FORWARD_ANSWER_TTL, MAX_IDEMPOTENCY_KEY_LEN,
};
pub use reveal::Detokenized;
pub use tokenize::{CardInput, TokenizeOptions, MAX_BATCH};
pub use update::CardUpdate;

/// Who is asking, from where, under which request id.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Principal,
    pub source: String,
    pub request_id: String,
}

impl RequestContext {
    pub fn event(&self, action: Action, outcome: Outcome) -> AuditEvent {
        AuditEvent::new(action, outcome)
            .principal(self.principal.name.clone())
            .source(self.source.clone())
            .request_id(self.request_id.clone())
    }
}

/// How the vault is set up.
#[derive(Debug, Clone, Copy)]
pub struct VaultOptions {
    /// How long a security code is held (at most an hour).
    pub cvc_ttl: Duration,
    /// Concurrent requests share transactions and fsyncs (see `commit`).
    pub group_commit: bool,
    /// Hosted collection may name `http://` loopback origins (`--dev` only).
    pub collect_http_loopback: bool,
    /// Refused submissions before a collection session is closed.
    pub collect_max_failures: u32,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            cvc_ttl: crate::cvc::MAX_TTL,
            group_commit: true,
            collect_http_loopback: false,
            collect_max_failures: crate::collect::DEFAULT_MAX_FAILURES,
        }
    }
}

/// Why one card was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error(transparent)]
    Pan(#[from] PanError),
    #[error(transparent)]
    Data(#[from] CardDataError),
    #[error("the security code must be 3 digits (4 for American Express)")]
    Cvc,
}

impl CardError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            CardError::Pan(_) => "invalid_pan",
            CardError::Data(CardDataError::Expired) => "card_expired",
            CardError::Data(CardDataError::ExpiryMonth | CardDataError::ExpiryYear) => {
                "invalid_expiry"
            }
            CardError::Data(
                CardDataError::CardholderName | CardDataError::CardholderNameHasPan,
            ) => "invalid_cardholder_name",
            CardError::Cvc => "invalid_cvc",
        }
    }
}

/// Errors of vault operations. `code()` is the stable error code; the API
/// crate maps each variant to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    InvalidCard(#[from] CardError),
    #[error("tenant must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    InvalidTenant,
    #[error("reason must be 1 to 256 printable characters and must not contain a card number")]
    InvalidReason,
    #[error("a batch holds 1 to {MAX_BATCH} cards")]
    InvalidBatchSize,
    #[error("authentication required")]
    Unauthenticated,
    #[error("the caller's roles or tenants do not allow this operation")]
    Forbidden,
    #[error("no such token")]
    NotFound,
    #[error("storage unavailable")]
    Storage(#[source] StoreError),
    /// The store answers but cannot commit (full disk, read-only database,
    /// standby): readiness only; requests keep `storage_unavailable`.
    #[error("storage cannot commit (read-only, full or a standby): {0}")]
    StorageReadOnly(String),
    #[error("keys unavailable")]
    Keys(#[source] KeysError),
    #[error("a stored record failed its integrity check")]
    Integrity,
    #[error("the random number generator failed")]
    Rng,
    #[error("audit query filter is invalid: {0}")]
    InvalidFilter(&'static str),
    #[error(transparent)]
    KeyLifecycle(#[from] KeyLifecycleError),
    /// The tenant may not use this token format (configuration:
    /// `tokenizer tenant set NAME --pan-shaped true`).
    #[error("this tenant may not use pan-shaped tokens")]
    TokenFormatNotPermitted,
    /// Pan-shaped tokens for this BIN, last four and length are (nearly)
    /// used up.
    #[error("pan-shaped tokens for this BIN and last four are nearly used up ({used} of {space}); use a random token")]
    TokenSpaceExhausted { used: u64, space: u64 },
    #[error("the tenant was deleted")]
    TenantDeleted,
    #[error("expires_at must be a future RFC 3339 time")]
    InvalidExpiresAt,
    #[error("the stored card has a later expiry date; an older one never replaces it")]
    OlderExpiry,
    /// A detokenize rate limit (per principal or per tenant) refused the
    /// request; the card was not opened.
    #[error("too many detokenize requests for this {}: retry later", .scope.as_str())]
    RateLimited {
        scope: crate::monitor::LimitScope,
        retry_after: std::time::Duration,
    },
    #[error(transparent)]
    InvalidOrigin(#[from] crate::collect::OriginError),
    #[error("ttl_secs must be 1 to {}", crate::collect::MAX_TTL_SECS)]
    InvalidTtl,
    #[error("reference must be 1 to 64 printable characters and must not contain a card number")]
    InvalidReference,
    #[error("style.{0} is not allowed or out of range")]
    InvalidStyle(&'static str),
    #[error("the collection session expired")]
    SessionExpired,
    #[error("the collection session was completed with another card")]
    SessionCompleted,
    #[error("the collection session was closed after too many refused submissions")]
    SessionClosed,
    #[error("the client secret does not match the session")]
    WrongSecret,
    #[error("another submission for this session is in progress: retry shortly")]
    SessionBusy,
    #[error(
        "a forwarded call names 1 to {} distinct tokens",
        forward::MAX_FORWARD_TOKENS
    )]
    TooManyTokens,
    #[error("this upstream does not serve the tenant of a token")]
    UpstreamTenant,
    #[error("every token of a forwarded call belongs to one tenant")]
    MixedTenants,
    #[error("no security code is held for a token whose cvc the call names")]
    CvcUnavailable,
    #[error("the Idempotency-Key must be 1 to 255 visible ASCII characters and must not contain a card number")]
    InvalidIdempotencyKey,
    /// The key was used before with another request (method, path, content
    /// type or body).
    #[error("this Idempotency-Key was used with another request")]
    IdempotencyKeyReused,
    /// A call with this key is under way: retry shortly.
    #[error("a call with this Idempotency-Key is in progress: retry shortly")]
    IdempotencyKeyInUse,
    /// A call with this key was sent and its answer never stored (the vault
    /// stopped during it): the upstream may have acted on it. The vault
    /// never calls the upstream again for this key.
    #[error("the outcome of the call with this Idempotency-Key is unknown: check with the upstream before retrying with a new key")]
    UpstreamOutcomeUnknown,
}

/// Why a key lifecycle operation was refused, or a record cannot be opened
/// because of its key's state. `code()` is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyLifecycleError {
    #[error("no such key")]
    NotFound,
    #[error("the key is the active one: rotate first")]
    Active,
    #[error("records still use the key: finish the re-encryption pass first")]
    InUse,
    #[error("the key is {}, which this operation does not start from", .0.as_str())]
    WrongState(KeyState),
    #[error("another instance changed the keys at the same time; retry")]
    Conflict,
    #[error("the new KEK is the one in use")]
    SameKek,
    #[error("the record's key was destroyed: it can never be opened again")]
    Destroyed,
    #[error("the record's key was retired")]
    Retired,
}

impl KeyLifecycleError {
    pub fn code(&self) -> &'static str {
        match self {
            KeyLifecycleError::NotFound => "key_not_found",
            KeyLifecycleError::Active => "key_active",
            KeyLifecycleError::InUse => "key_in_use",
            KeyLifecycleError::WrongState(_) => "key_state",
            KeyLifecycleError::Conflict => "key_conflict",
            KeyLifecycleError::SameKek => "kek_unchanged",
            KeyLifecycleError::Destroyed => "key_destroyed",
            KeyLifecycleError::Retired => "key_retired",
        }
    }
}

impl VaultError {
    pub fn code(&self) -> &'static str {
        match self {
            VaultError::InvalidCard(e) => e.code(),
            VaultError::InvalidTenant => "invalid_tenant",
            VaultError::InvalidReason => "invalid_reason",
            VaultError::InvalidBatchSize => "invalid_batch_size",
            VaultError::Unauthenticated => "unauthenticated",
            VaultError::Forbidden => "forbidden",
            VaultError::NotFound => "not_found",
            VaultError::Storage(_) => "storage_unavailable",
            VaultError::StorageReadOnly(_) => "storage_read_only",
            VaultError::Keys(_) => "keys_unavailable",
            VaultError::Integrity => "integrity_error",
            VaultError::Rng => "internal_error",
            VaultError::InvalidFilter(_) => "invalid_filter",
            VaultError::KeyLifecycle(e) => e.code(),
            VaultError::RateLimited { .. } => "rate_limited",
            VaultError::TokenFormatNotPermitted => "token_format_not_permitted",
            VaultError::TokenSpaceExhausted { .. } => "token_space_exhausted",
            VaultError::TenantDeleted => "tenant_deleted",
            VaultError::InvalidExpiresAt => "invalid_expires_at",
            VaultError::OlderExpiry => "older_expiry",
            VaultError::InvalidOrigin(_) => "invalid_origin",
            VaultError::InvalidTtl => "invalid_ttl",
            VaultError::InvalidReference => "invalid_reference",
            VaultError::InvalidStyle(_) => "invalid_style",
            VaultError::SessionExpired => "session_expired",
            VaultError::SessionCompleted => "session_completed",
            VaultError::SessionClosed => "session_closed",
            VaultError::WrongSecret => "wrong_secret",
            VaultError::SessionBusy => "session_busy",
            VaultError::TooManyTokens => "too_many_tokens",
            VaultError::UpstreamTenant => "tenant_not_allowed",
            VaultError::MixedTenants => "mixed_tenants",
            VaultError::CvcUnavailable => "cvc_unavailable",
            VaultError::InvalidIdempotencyKey => "invalid_idempotency_key",
            VaultError::IdempotencyKeyReused => "idempotency_key_reused",
            VaultError::IdempotencyKeyInUse => "idempotency_key_in_use",
            VaultError::UpstreamOutcomeUnknown => "upstream_outcome_unknown",
        }
    }
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        VaultError::Storage(e)
    }
}

/// What may leave the vault about a token: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub token: String,
    pub tenant: String,
    pub fingerprint: String,
    pub brand: Brand,
    pub bin: String,
    pub last4: String,
    pub masked_pan: String,
    /// `None`: a card number found in a forwarded call's answer, whose
    /// expiry the vault does not know (yet).
    pub exp_month: Option<u8>,
    pub exp_year: Option<u16>,
    /// Unix milliseconds, UTC.
    pub created_at: i64,
    /// Whether this call created the token (tokenize only).
    pub created: bool,
    pub token_format: TokenFormat,
    /// When the token expires (Unix ms), if it does.
    pub expires_at: Option<i64>,
    /// Whether this call changed the stored expiry or name.
    pub updated: bool,
    /// Whether a security code is held for the token (in this process).
    pub cvc_available: bool,
}

/// The vault: storage, unwrapped keys and the authenticator.
#[derive(Debug)]
pub struct Vault {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) keys: Keyring,
    /// Where this instance's re-encryption pass stands (hints for speed
    /// only: a pass is correct from any starting point, see `rotation.rs`).
    pub(crate) pass: std::sync::Mutex<crate::rotation::PassHint>,
    pub(crate) tenants: Tenants,
    cvc: CvcHolder,
    /// Tokens whose use this process recorded, and when (the retention
    /// clock is kept to the day: one write per card and day at most).
    touched: Mutex<HashMap<String, i64>>,
    /// The group-commit writer (None: every request commits on its own).
    commits: Option<crate::commit::GroupCommit>,
    /// The outcome of the latest card and audit writes, for readiness.
    writes: lifecycle::WriteHealth,
    /// Hosted collection: `http://` loopback origins allowed (`--dev`), and
    /// refused submissions before a session closes.
    collect_http_loopback: bool,
    collect_max_failures: u32,
}

fn card_aad(row: &CardRow) -> RecordAad<'_> {
    RecordAad {
        tenant: &row.tenant,
        token: &row.token,
        key_version: row.key_version,
    }
}

impl Vault {
    /// Load (or, on first start, generate) the vault keys through the KEK.
    /// The vault keeps the KEK to wrap the keys a rotation creates.
    pub async fn open(
        store: Arc<dyn Store>,
        kek: Arc<dyn KeyEncryptionKey>,
    ) -> Result<Vault, KeysError> {
        Vault::open_with(store, kek, VaultOptions::default()).await
    }

    /// [`Vault::open`] with options.
    pub async fn open_with(
        store: Arc<dyn Store>,
        kek: Arc<dyn KeyEncryptionKey>,
        options: VaultOptions,
    ) -> Result<Vault, KeysError> {
        let keys = Keyring::load_or_init(&store, kek).await?;
        let store_for_commits = store.clone();
        let cvc =
            CvcHolder::new(options.cvc_ttl).map_err(|_| KeysError::Missing("security-code key"))?;
        Ok(Vault {
            tenants: Tenants::new(store.clone()),
            store,
            keys,
            pass: std::sync::Mutex::default(),
            cvc,
            touched: Mutex::new(HashMap::new()),
            commits: options
                .group_commit
                .then(|| crate::commit::GroupCommit::start(store_for_commits)),
            writes: lifecycle::WriteHealth::default(),
            collect_http_loopback: options.collect_http_loopback,
            collect_max_failures: options.collect_max_failures.max(1),
        })
    }

    /// Insert cards with their events, through the group commit if on.
    async fn write_cards(
        &self,
        cards: Vec<NewCard>,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<crate::store::Inserted>, StoreError> {
        let result = match &self.commits {
            Some(c) => c.insert_cards(cards, events).await,
            None => self.store.insert_cards(cards, events).await,
        };
        self.writes.record(&result);
        result
    }

    /// Append an audit event, through the group commit if on.
    async fn write_event(&self, event: AuditEvent) -> Result<(), StoreError> {
        let result = match &self.commits {
            Some(c) => c.append_audit(event).await,
            None => self.store.append_audit(event).await.map(|_| ()),
        };
        self.writes.record(&result);
        result
    }

    /// Record that these cards were used (retention), at most once per card
    /// and day and process.
    async fn touch(&self, tokens: &[&str], now: i64) {
        use crate::tenants::DAY_MS;
        let due: Vec<String> = {
            let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            if touched.len() > 200_000 {
                touched.clear();
            }
            let mut due = Vec::new();
            for t in tokens {
                if touched.get(*t).is_none_or(|at| now - at >= DAY_MS) {
                    touched.insert((*t).to_owned(), now);
                    due.push((*t).to_owned());
                }
            }
            due
        };
        if due.is_empty() {
            return;
        }
        // Through the group commit: many cards per transaction, committed
        // before this request answers. Retention is kept to the day; a
        // failed write is retried on a use a day later at the latest, and
        // never fails the request.
        let result = match &self.commits {
            Some(c) => c.touch_cards(due.clone(), now).await,
            None => self.store.touch_cards(&due, now, DAY_MS).await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot record card use for retention");
            let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            for t in &due {
                touched.remove(t);
            }
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Require one of `roles` for `action`; a refusal is audited.
    pub async fn require_role(
        &self,
        ctx: &RequestContext,
        action: Action,
        roles: &[Role],
    ) -> Result<(), VaultError> {
        if roles.iter().any(|r| ctx.principal.has_role(*r)) {
            return Ok(());
        }
        self.deny(ctx, action, None, None, "role_not_permitted")
            .await
    }

    async fn deny(
        &self,
        ctx: &RequestContext,
        action: Action,
        tenant: Option<&str>,
        token: Option<&str>,
        detail: &str,
    ) -> Result<(), VaultError> {
        let mut event = ctx
            .event(Action::AuthorizationDenied, Outcome::Denied)
            .error_code("forbidden")
            .detail(format!("{}: {detail}", action.as_str()));
        event.tenant = tenant.map(str::to_owned);
        event.token = token.map(str::to_owned);
        self.write_event(event).await?;
        Err(VaultError::Forbidden)
    }

    /// Record a failed operation (bad input, unknown token) and return its error.
    async fn fail(&self, mut event: AuditEvent, err: VaultError) -> VaultError {
        event.outcome = Outcome::Failure;
        event.error_code = Some(err.code().to_owned());
        match self.write_event(event).await {
            Ok(_) => err,
            Err(e) => e.into(),
        }
    }

    /// Open a stored record with the DEK of its version. A version this
    /// instance does not hold may be newer (another instance rotated): the
    /// keys are reloaded once. A retired or destroyed DEK is reported as such.
    pub(crate) async fn open_row(&self, row: &CardRow) -> Result<CardSecret, VaultError> {
        let mut keys = self.keys.keys();
        if keys.dek(row.key_version).is_none()
            && keys.state(KeyPurpose::Dek, row.key_version).is_none()
        {
            self.refresh_keys().await?;
            keys = self.keys.keys();
        }
        open_with(&keys, row)
    }

    /// Find a token the caller may see. Unknown, malformed and other-tenant
    /// tokens are all `NotFound` (no oracle); each is audited.
    async fn lookup(
        &self,
        ctx: &RequestContext,
        action: Action,
        token: &str,
    ) -> Result<CardRow, VaultError> {
        let base = ctx.event(action, Outcome::Failure);
        let Some(token) = Token::parse(token) else {
            return Err(self
                .fail(base.detail("malformed_token"), VaultError::NotFound)
                .await);
        };
        // A digit string we did not issue is never written down: it may be
        // a mistyped card number (one digit off fails the Luhn check just
        // like a pan-shaped token). Random tokens cannot hold card data.
        let Some(row) = self.store.find_card(token.as_str()).await? else {
            let base = match token.format() {
                TokenFormat::Random => base.token(token.as_str()),
                TokenFormat::PanShaped => base.detail("unknown_pan_shaped_token"),
            };
            return Err(self.fail(base, VaultError::NotFound).await);
        };
        let base = base.token(token.as_str());
        // Past its expiry the token is gone as if deleted (the purge
        // removes the row).
        if row.expires_at.is_some_and(|at| at <= now_millis()) {
            self.cvc.forget(&row.token);
            return Err(self
                .fail(base.detail("expired"), VaultError::NotFound)
                .await);
        }
        if !ctx.principal.tenants.allows(&row.tenant) {
            let mut ev = base
                .tenant(row.tenant.clone())
                .detail("tenant_not_permitted");
            ev.outcome = Outcome::Denied;
            ev.error_code = Some("not_found".to_owned());
            self.write_event(ev).await?;
            return Err(VaultError::NotFound);
        }
        Ok(row)
    }
}

/// The DEK of `version` from `keys`, or why there is none: destroyed or
/// retired (gone for good), else an integrity error.
pub(crate) fn dek_of(keys: &KeySet, version: u32) -> Result<&crate::crypto::DataKey, VaultError> {
    keys.dek(version)
        .ok_or_else(|| match keys.state(KeyPurpose::Dek, version) {
            Some(KeyState::Destroyed) => KeyLifecycleError::Destroyed.into(),
            Some(KeyState::Retired) => KeyLifecycleError::Retired.into(),
            _ => VaultError::Integrity,
        })
}

/// A stored nonce and ciphertext, as the DEK opens them.
pub(crate) fn sealed_of(nonce: &[u8], ciphertext: &[u8]) -> Result<Sealed, VaultError> {
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| VaultError::Integrity)?;
    Ok(Sealed {
        nonce,
        ciphertext: ciphertext.to_vec(),
    })
}

/// Open a stored record with the DEK of its version from `keys`.
pub(crate) fn open_with(keys: &KeySet, row: &CardRow) -> Result<CardSecret, VaultError> {
    let dek = dek_of(keys, row.key_version)?;
    let sealed = sealed_of(&row.nonce, &row.ciphertext)?;
    let plain = dek
        .open(&card_aad(row), &sealed)
        .map_err(|_: CryptoError| VaultError::Integrity)?;
    CardSecret::decode(&plain).map_err(|_| VaultError::Integrity)
}

fn token_info(row: &CardRow, expiry: Option<Expiry>, created: bool) -> TokenInfo {
    TokenInfo {
        token: row.token.clone(),
        tenant: row.tenant.clone(),
        fingerprint: row.fingerprint.clone(),
        brand: Brand::parse(&row.brand).unwrap_or(Brand::Unknown),
        bin: row.bin.clone(),
        last4: row.last4.clone(),
        masked_pan: masked_form(&row.bin, &row.last4, usize::from(row.pan_len)),
        exp_month: expiry.map(Expiry::month),
        exp_year: expiry.map(Expiry::year),
        created_at: row.created_at,
        created,
        token_format: TokenFormat::of(&row.token),
        expires_at: row.expires_at,
        updated: false,
        cvc_available: false,
    }
}
