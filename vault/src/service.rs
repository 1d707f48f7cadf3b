//! The vault's operations: tokenize, detokenize, metadata, delete. Each one
//! checks the caller's roles and tenants, validates input, and writes its
//! audit event (in the same transaction as the change for tokenize and
//! delete; before anything is returned for reads). An operation whose audit
//! event cannot be written fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit::{Action, AuditEvent, Outcome};
use hsm_shim::KeyEncryptionKey;
use zeroize::Zeroizing;

use crate::access::{Principal, Role, TenantScope};
use crate::brand::Brand;
use crate::card::{
    pan_shaped_space, CardDataError, CardholderName, Expiry, Tenant, Token, TokenFormat,
};
use crate::crypto::{CardSecret, CryptoError, RecordAad, Sealed, NONCE_LEN};
use crate::cvc::{Cvc, CvcHolder};
use crate::keys::{KeySet, Keyring, KeysError};
use crate::monitor::{DetokenizeMonitor, LimitScope};
use crate::pan::{contains_pan_like, masked_form, Pan, PanError};
use crate::store::{
    now_millis, AuditFilter, CardRow, KeyPurpose, KeyState, NewCard, Store, StoreError, TenantRow,
};
use crate::tenants::Tenants;

/// Most cards in one batch call.
pub const MAX_BATCH: usize = 1000;

/// Taken pan-shaped draws in a row before the space is counted.
const PAN_SHAPED_PATIENCE: u32 = 8;
/// The share of a pan-shaped space that counts as used up.
const PAN_SHAPED_FULL: f64 = 0.9;

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

/// One card as received, not yet validated. Strings are zeroized on drop.
pub struct CardInput {
    pub pan: Zeroizing<String>,
    pub exp_month: i64,
    pub exp_year: i64,
    pub cardholder_name: Option<Zeroizing<String>>,
    /// The security code, held in memory only (see `cvc`).
    pub cvc: Option<Zeroizing<String>>,
}

/// How new tokens of a tokenize call are made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizeOptions {
    pub format: TokenFormat,
    /// When the new tokens expire (Unix ms; must be in the future). The
    /// tenant's default lifetime applies when absent.
    pub expires_at: Option<i64>,
}

/// A change of a stored card's expiry or name (PATCH). `Debug` is
/// redacted: the name is cardholder data.
#[derive(Default)]
pub struct CardUpdate {
    pub exp_month: Option<i64>,
    pub exp_year: Option<i64>,
    pub cardholder_name: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for CardUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardUpdate([REDACTED])")
    }
}

/// How the vault is set up.
#[derive(Debug, Clone, Copy)]
pub struct VaultOptions {
    /// How long a security code is held (at most an hour).
    pub cvc_ttl: Duration,
    /// Concurrent requests share transactions and fsyncs (see `commit`).
    pub group_commit: bool,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            cvc_ttl: crate::cvc::MAX_TTL,
            group_commit: true,
        }
    }
}

impl std::fmt::Debug for CardInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardInput([REDACTED])")
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
    pub exp_month: u8,
    pub exp_year: u16,
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

/// An audit query: equality filters, a time range, and a cursor.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub filter: AuditFilter,
    pub from: Option<time::OffsetDateTime>,
    pub to: Option<time::OffsetDateTime>,
    /// Return events after this chain number (0: from the start).
    pub after: u64,
    /// At most this many events are scanned (1 to 1000).
    pub limit: u32,
}

/// One page of audit events, and where the next page starts.
#[derive(Debug, Clone)]
pub struct AuditPage {
    pub events: Vec<audit::ChainedEvent>,
    pub next_after: u64,
}

/// A detokenized card: the secret, for the caller that is allowed to see it.
#[derive(Debug)]
pub struct Detokenized {
    pub token: String,
    pub card: CardSecret,
    /// The security code, released by this call (then gone).
    pub cvc: Option<Cvc>,
    /// Whether a security code is still held for the token.
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
        })
    }

    /// Insert cards with their events, through the group commit if on.
    async fn write_cards(
        &self,
        cards: Vec<NewCard>,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<crate::store::Inserted>, StoreError> {
        match &self.commits {
            Some(c) => c.insert_cards(cards, events).await,
            None => self.store.insert_cards(cards, events).await,
        }
    }

    /// Append an audit event, through the group commit if on.
    async fn write_event(&self, event: AuditEvent) -> Result<(), StoreError> {
        match &self.commits {
            Some(c) => c.append_audit(event).await,
            None => self.store.append_audit(event).await.map(|_| ()),
        }
    }

    /// Security codes held now (a gauge; never the codes).
    pub fn cvc_held(&self) -> usize {
        self.cvc.held()
    }

    /// Drop the security codes past their time to live.
    pub fn sweep_cvc(&self) -> usize {
        self.cvc.sweep(Instant::now())
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

    /// Ready when storage answers (keys are loaded by construction).
    pub async fn ready(&self) -> Result<(), VaultError> {
        self.store.ping().await?;
        Ok(())
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

    /// Tokenize one card.
    pub async fn tokenize(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        card: CardInput,
    ) -> Result<TokenInfo, VaultError> {
        self.tokenize_with(ctx, tenant, card, TokenizeOptions::default())
            .await
    }

    /// [`Vault::tokenize`] with a token format and expiry.
    pub async fn tokenize_with(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        card: CardInput,
        options: TokenizeOptions,
    ) -> Result<TokenInfo, VaultError> {
        let mut results = self
            .tokenize_batch(ctx, tenant, vec![card], false, options)
            .await?;
        match results.pop() {
            Some(Ok(info)) => Ok(info),
            Some(Err(e)) => Err(e.into()),
            None => Err(VaultError::Integrity),
        }
    }

    /// Tokenize up to [`MAX_BATCH`] cards for one tenant in one transaction.
    /// Results are in input order; a bad card fails alone.
    pub async fn tokenize_many(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        cards: Vec<CardInput>,
    ) -> Result<Vec<Result<TokenInfo, CardError>>, VaultError> {
        self.tokenize_batch(ctx, tenant, cards, true, TokenizeOptions::default())
            .await
    }

    /// [`Vault::tokenize_many`] with a token format and expiry.
    pub async fn tokenize_many_with(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        cards: Vec<CardInput>,
        options: TokenizeOptions,
    ) -> Result<Vec<Result<TokenInfo, CardError>>, VaultError> {
        self.tokenize_batch(ctx, tenant, cards, true, options).await
    }

    async fn tokenize_batch(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        cards: Vec<CardInput>,
        batch: bool,
        options: TokenizeOptions,
    ) -> Result<Vec<Result<TokenInfo, CardError>>, VaultError> {
        self.require_role(ctx, Action::Tokenize, &[Role::Tokenize])
            .await?;
        let base = ctx.event(Action::Tokenize, Outcome::Success);
        let tenant = match Tenant::parse(tenant) {
            Ok(t) => t,
            Err(_) => return Err(self.fail(base, VaultError::InvalidTenant).await),
        };
        let base = base.tenant(tenant.as_str());
        if !ctx.principal.tenants.allows(tenant.as_str()) {
            self.deny(
                ctx,
                Action::Tokenize,
                Some(tenant.as_str()),
                None,
                "tenant_not_permitted",
            )
            .await?;
        }
        if batch && (cards.is_empty() || cards.len() > MAX_BATCH) {
            return Err(self
                .fail(base.detail("batch"), VaultError::InvalidBatchSize)
                .await);
        }
        let now = now_millis();
        if options.expires_at.is_some_and(|at| at <= now) {
            return Err(self.fail(base, VaultError::InvalidExpiresAt).await);
        }
        let policy = self.tenants.for_use(tenant.as_str()).await?;
        if policy.deleted_at.is_some() {
            return Err(self.fail(base, VaultError::TenantDeleted).await);
        }
        if options.format == TokenFormat::PanShaped && !policy.pan_shaped {
            return Err(self
                .fail(
                    base.detail("pan_shaped"),
                    VaultError::TokenFormatNotPermitted,
                )
                .await);
        }
        let expires_at = crate::tenants::expiry_for(&policy, options.expires_at, now);

        let mut slots: Vec<Result<usize, CardError>> = Vec::with_capacity(cards.len());
        let mut secrets = Vec::new();
        let mut cvcs = Vec::new();
        let mut failures = Vec::new();
        for input in cards {
            match validate(&input) {
                Ok((s, cvc)) => {
                    slots.push(Ok(secrets.len()));
                    secrets.push(s);
                    cvcs.push(cvc);
                }
                Err(e) => {
                    let mut ev = base.clone();
                    ev.outcome = Outcome::Failure;
                    ev.error_code = Some(e.code().to_owned());
                    failures.push(ev);
                    slots.push(Err(e));
                }
            }
        }

        // Sealed under the keys held now; if another instance rotated them
        // meanwhile, the store refuses (stale keys): reload and seal again.
        // A pan-shaped token drawn twice (taken in the meantime): draw again.
        let mut stale = 0;
        let mut taken = 0;
        let inserted = loop {
            let rows = match self
                .seal_cards(&policy, &secrets, &base, now, options.format, expires_at)
                .await
            {
                Ok(rows) => rows,
                Err(e @ VaultError::TokenSpaceExhausted { .. }) => {
                    return Err(self.fail(base.clone().detail("pan_shaped"), e).await)
                }
                Err(e) => return Err(e),
            };
            match self.write_cards(rows, failures.clone()).await {
                Err(StoreError::StaleKeys) if stale == 0 => {
                    stale += 1;
                    self.refresh_keys().await?;
                }
                Err(StoreError::TokenTaken) if taken < 8 => taken += 1,
                // Drawn tokens kept being taken by concurrent requests: the
                // space is (nearly) used up.
                Err(StoreError::TokenTaken) => {
                    let (used, space) = match secrets.first() {
                        Some(s) => {
                            let len =
                                u8::try_from(s.pan.len()).map_err(|_| VaultError::Integrity)?;
                            let used = self
                                .store
                                .pan_shaped_in_use(&s.pan.bin(), &s.pan.last4(), len)
                                .await?;
                            (used, pan_shaped_space(s.pan.len()))
                        }
                        None => (0, 0),
                    };
                    let e = VaultError::TokenSpaceExhausted { used, space };
                    return Err(self.fail(base.clone().detail("pan_shaped"), e).await);
                }
                other => break other?,
            }
        };
        let mut infos = Vec::with_capacity(inserted.len());
        let mut used = Vec::new();
        for ((ins, secret), cvc) in inserted.into_iter().zip(&secrets).zip(cvcs) {
            let (row, expiry, updated) = if ins.created {
                (ins.row, secret.expiry, false)
            } else {
                used.push(ins.row.token.clone());
                // The stored card wins, unless this one is newer.
                self.update_if_newer(ctx, ins.row, secret).await?
            };
            let cvc_available = match cvc {
                Some(cvc) => {
                    self.cvc
                        .put(&row.token, cvc, Instant::now())
                        .map_err(|_| VaultError::Rng)?;
                    true
                }
                None => self.cvc.has(&row.token, Instant::now()),
            };
            let mut info = token_info(&row, expiry, ins.created);
            info.updated = updated;
            info.cvc_available = cvc_available;
            infos.push(Some(info));
        }
        let used: Vec<&str> = used.iter().map(String::as_str).collect();
        self.touch(&used, now).await;
        Ok(slots
            .into_iter()
            .map(|slot| {
                slot.and_then(|i| {
                    // Invariant: each Ok slot indexes one inserted row, taken once.
                    infos
                        .get_mut(i)
                        .and_then(Option::take)
                        .ok_or(CardError::Pan(PanError::Empty))
                })
            })
            .collect())
    }

    /// A card tokenized again: if it is newer (a later expiry, or the same
    /// expiry and another cardholder name), the stored record is resealed
    /// with it (the token stays; audited `card_updated`). An older expiry
    /// never replaces a later one. Returns the row, the expiry now stored
    /// and whether it changed.
    async fn update_if_newer(
        &self,
        ctx: &RequestContext,
        row: CardRow,
        offered: &CardSecret,
    ) -> Result<(CardRow, Expiry, bool), VaultError> {
        let stored = self.open_row(&row).await?;
        let later = offered.expiry > stored.expiry;
        let name_changed = offered.name.is_some()
            && offered.name.as_ref().map(|n| n.expose())
                != stored.name.as_ref().map(|n| n.expose());
        let renamed = offered.expiry == stored.expiry && name_changed;
        if !later && !renamed {
            return Ok((row, stored.expiry, false));
        }
        let name = match &offered.name {
            Some(n) => Some(n.clone()),
            None => stored.name.clone(),
        };
        let new = CardSecret {
            pan: stored.pan,
            expiry: offered.expiry,
            name,
        };
        let what = match (later, name_changed) {
            (true, true) => "expiry,name",
            (true, false) => "expiry",
            _ => "name",
        };
        match self.reseal_update(ctx, &row, &new, what).await? {
            Some(updated) => Ok((updated, new.expiry, true)),
            // Changed meanwhile by another request: report what is stored.
            None => {
                let current = self
                    .store
                    .find_card(&row.token)
                    .await?
                    .ok_or(VaultError::NotFound)?;
                let expiry = self.open_row(&current).await?.expiry;
                Ok((current, expiry, false))
            }
        }
    }

    /// Reseal `row`'s record as `secret` under the active DEK (same token)
    /// and store it if the row did not change meanwhile, with a
    /// `card_updated` event naming `what`. `None` if it changed.
    async fn reseal_update(
        &self,
        ctx: &RequestContext,
        row: &CardRow,
        secret: &CardSecret,
        what: &str,
    ) -> Result<Option<CardRow>, VaultError> {
        let event = ctx
            .event(Action::CardUpdated, Outcome::Success)
            .tenant(row.tenant.clone())
            .token(row.token.clone())
            .detail(what.to_owned());
        for attempt in 0..2 {
            let keys = self.keys.keys();
            let dek = keys.active_dek();
            let aad = RecordAad {
                tenant: &row.tenant,
                token: &row.token,
                key_version: dek.version(),
            };
            let sealed = dek
                .seal(&aad, &secret.encode())
                .map_err(|_| VaultError::Rng)?;
            let now = now_millis();
            let mut new = row.clone();
            new.key_version = dek.version();
            new.nonce = sealed.nonce.to_vec();
            new.ciphertext = sealed.ciphertext;
            new.updated_at = Some(now);
            new.last_used_at = Some(now);
            match self
                .store
                .update_card(
                    &new,
                    &row.nonce,
                    keys.fingerprint_key().version(),
                    event.clone(),
                )
                .await
            {
                Ok(true) => return Ok(Some(new)),
                Ok(false) => return Ok(None),
                Err(StoreError::StaleKeys) if attempt == 0 => {
                    self.refresh_keys().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Change a stored card's expiry or cardholder name (`PATCH`; role
    /// `tokenize`). An expiry before the stored one is refused (409
    /// `older_expiry`); nothing changes on any error.
    pub async fn update(
        &self,
        ctx: &RequestContext,
        token: &str,
        change: CardUpdate,
    ) -> Result<TokenInfo, VaultError> {
        self.require_role(ctx, Action::CardUpdated, &[Role::Tokenize])
            .await?;
        let row = self.lookup(ctx, Action::CardUpdated, token).await?;
        let base = ctx
            .event(Action::CardUpdated, Outcome::Failure)
            .tenant(row.tenant.clone())
            .token(row.token.clone());
        let stored = match self.open_row(&row).await {
            Ok(card) => card,
            Err(e) => return Err(self.fail(base.detail("integrity"), e).await),
        };
        let expiry = match (change.exp_month, change.exp_year) {
            (None, None) => stored.expiry,
            (month, year) => match Expiry::new(
                month.unwrap_or(i64::from(stored.expiry.month())),
                year.unwrap_or(i64::from(stored.expiry.year())),
            ) {
                Ok(e) => e,
                Err(e) => {
                    let e = VaultError::InvalidCard(e.into());
                    return Err(self.fail(base, e).await);
                }
            },
        };
        if expiry < stored.expiry {
            return Err(self.fail(base, VaultError::OlderExpiry).await);
        }
        let name = match &change.cardholder_name {
            Some(n) => match CardholderName::parse(n) {
                Ok(n) => Some(n),
                Err(e) => {
                    let e = VaultError::InvalidCard(e.into());
                    return Err(self.fail(base, e).await);
                }
            },
            None => stored.name.clone(),
        };
        let expiry_changed = expiry != stored.expiry;
        let name_changed =
            name.as_ref().map(|n| n.expose()) != stored.name.as_ref().map(|n| n.expose());
        let what = match (expiry_changed, name_changed) {
            (false, false) => {
                let mut info = token_info(&row, stored.expiry, false);
                info.cvc_available = self.cvc.has(&row.token, Instant::now());
                return Ok(info);
            }
            (true, true) => "expiry,name",
            (true, false) => "expiry",
            (false, true) => "name",
        };
        let secret = CardSecret {
            pan: stored.pan,
            expiry,
            name,
        };
        let Some(new) = self.reseal_update(ctx, &row, &secret, what).await? else {
            return Err(self
                .fail(
                    base.detail("changed_meanwhile"),
                    VaultError::KeyLifecycle(KeyLifecycleError::Conflict),
                )
                .await);
        };
        let mut info = token_info(&new, expiry, false);
        info.updated = true;
        info.cvc_available = self.cvc.has(&row.token, Instant::now());
        Ok(info)
    }

    /// Seal validated cards under the active keys (fresh tokens of
    /// `format`).
    async fn seal_cards(
        &self,
        tenant: &TenantRow,
        secrets: &[CardSecret],
        base: &AuditEvent,
        now: i64,
        format: TokenFormat,
        expires_at: Option<i64>,
    ) -> Result<Vec<NewCard>, VaultError> {
        let tokens = match format {
            TokenFormat::Random => secrets
                .iter()
                .map(|_| Token::generate().map_err(|_| VaultError::Rng))
                .collect::<Result<Vec<_>, _>>()?,
            TokenFormat::PanShaped => self.pan_shaped_tokens(secrets).await?,
        };
        let keys = self.keys.keys();
        let fp_key = keys.fingerprint_key();
        let dek = keys.active_dek();
        let salt = tenant.fingerprint_salt.as_deref();
        let name = tenant.name.as_str();
        let mut out = Vec::with_capacity(secrets.len());
        for (secret, token) in secrets.iter().zip(tokens) {
            let fingerprint = fp_key.fingerprint(name, salt, &secret.pan);
            let previous_fingerprints = keys
                .previous_fingerprint_keys()
                .map(|k| k.fingerprint(name, salt, &secret.pan))
                .collect();
            let aad = RecordAad {
                tenant: name,
                token: token.as_str(),
                key_version: dek.version(),
            };
            let sealed = dek
                .seal(&aad, &secret.encode())
                .map_err(|_| VaultError::Rng)?;
            // A Pan has 12 to 19 digits.
            let pan_len = u8::try_from(secret.pan.len()).map_err(|_| VaultError::Integrity)?;
            let row = CardRow {
                token: token.as_str().to_owned(),
                tenant: name.to_owned(),
                fingerprint,
                brand: secret.pan.brand().as_str().to_owned(),
                bin: secret.pan.bin(),
                last4: secret.pan.last4(),
                pan_len,
                key_version: dek.version(),
                nonce: sealed.nonce.to_vec(),
                ciphertext: sealed.ciphertext,
                created_at: now,
                fingerprint_version: fp_key.version(),
                expires_at,
                last_used_at: Some(now),
                updated_at: None,
            };
            out.push(NewCard {
                row,
                event: base.clone(),
                previous_fingerprints,
            });
        }
        Ok(out)
    }

    /// One free pan-shaped token per card: drawn at random and checked
    /// against the store; a taken one is drawn again. After
    /// [`PAN_SHAPED_PATIENCE`] taken draws in a row the space is counted:
    /// nearly used up ([`PAN_SHAPED_FULL`] of it) is a clear error rather
    /// than an endless search; so is running out of draws.
    async fn pan_shaped_tokens(&self, secrets: &[CardSecret]) -> Result<Vec<Token>, VaultError> {
        let mut out: Vec<Option<Token>> = vec![None; secrets.len()];
        let mut misses = vec![0u32; secrets.len()];
        loop {
            let mut wanted = Vec::new();
            for (i, secret) in secrets.iter().enumerate() {
                if out[i].is_none() {
                    let t = Token::pan_shaped(&secret.pan).map_err(|_| VaultError::Rng)?;
                    wanted.push((i, t));
                }
            }
            if wanted.is_empty() {
                return Ok(out.into_iter().flatten().collect());
            }
            let candidates: Vec<String> =
                wanted.iter().map(|(_, t)| t.as_str().to_owned()).collect();
            let taken = self.store.tokens_taken(&candidates).await?;
            for (i, token) in wanted {
                let twice = out.iter().flatten().any(|t| t == &token);
                if taken.iter().any(|t| t == token.as_str()) || twice {
                    misses[i] += 1;
                    if misses[i].is_multiple_of(PAN_SHAPED_PATIENCE) {
                        let pan = &secrets[i].pan;
                        let space = pan_shaped_space(pan.len());
                        let pan_len = u8::try_from(pan.len()).map_err(|_| VaultError::Integrity)?;
                        let used = self
                            .store
                            .pan_shaped_in_use(&pan.bin(), &pan.last4(), pan_len)
                            .await?;
                        if used as f64 >= space as f64 * PAN_SHAPED_FULL
                            || misses[i] >= 8 * PAN_SHAPED_PATIENCE
                        {
                            return Err(VaultError::TokenSpaceExhausted { used, space });
                        }
                    }
                } else {
                    out[i] = Some(token);
                }
            }
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
}

/// Open a stored record with the DEK of its version from `keys`.
pub(crate) fn open_with(keys: &KeySet, row: &CardRow) -> Result<CardSecret, VaultError> {
    let dek = match keys.dek(row.key_version) {
        Some(dek) => dek,
        None => {
            return Err(match keys.state(KeyPurpose::Dek, row.key_version) {
                Some(KeyState::Destroyed) => KeyLifecycleError::Destroyed.into(),
                Some(KeyState::Retired) => KeyLifecycleError::Retired.into(),
                _ => VaultError::Integrity,
            })
        }
    };
    let nonce: [u8; NONCE_LEN] = row
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| VaultError::Integrity)?;
    let sealed = Sealed {
        nonce,
        ciphertext: row.ciphertext.clone(),
    };
    let plain = dek
        .open(&card_aad(row), &sealed)
        .map_err(|_: CryptoError| VaultError::Integrity)?;
    CardSecret::decode(&plain).map_err(|_| VaultError::Integrity)
}

impl Vault {
    /// Reload the vault keys from the store (see [`Keyring::refresh`]): the
    /// service calls this periodically so that every instance picks up a
    /// rotation, retirement or destruction made by another within seconds.
    /// Returns whether anything changed.
    pub async fn refresh_keys(&self) -> Result<bool, VaultError> {
        self.keys.refresh(&self.store).await.map_err(|e| match e {
            KeysError::Store(s) => VaultError::Storage(s),
            other => VaultError::Keys(other),
        })
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

    /// Swap a token back for the card. `reason` is recorded in the audit.
    /// No rate limit, no anomaly rule: see [`Vault::detokenize_monitored`].
    pub async fn detokenize(
        &self,
        ctx: &RequestContext,
        token: &str,
        reason: &str,
    ) -> Result<Detokenized, VaultError> {
        self.detokenize_inner(ctx, token, reason, None, false).await
    }

    /// [`Vault::detokenize`] under `monitor`: the principal's rate limit is
    /// checked before the token is looked up, the tenant's after (the tenant
    /// is the token's); a refusal is a `detokenize` event with outcome
    /// `denied` and error code `rate_limited`, and the card is not opened.
    /// A detokenize that makes the anomaly rule fire still succeeds; it is
    /// followed by a `detokenize_anomaly` event (counts only) and a warning
    /// in the log. If that event cannot be written, the card is not
    /// returned.
    pub async fn detokenize_monitored(
        &self,
        ctx: &RequestContext,
        token: &str,
        reason: &str,
        monitor: &DetokenizeMonitor,
        include_cvc: bool,
    ) -> Result<Detokenized, VaultError> {
        self.detokenize_inner(ctx, token, reason, Some(monitor), include_cvc)
            .await
    }

    async fn detokenize_inner(
        &self,
        ctx: &RequestContext,
        token: &str,
        reason: &str,
        monitor: Option<&DetokenizeMonitor>,
        include_cvc: bool,
    ) -> Result<Detokenized, VaultError> {
        self.require_role(ctx, Action::Detokenize, &[Role::Detokenize])
            .await?;
        if !valid_reason(reason) {
            let ev = ctx.event(Action::Detokenize, Outcome::Failure);
            return Err(self.fail(ev, VaultError::InvalidReason).await);
        }
        let principal_id = ctx.principal.id.as_str();
        if let Some(Err(wait)) = monitor.map(|m| m.admit_principal(principal_id, Instant::now())) {
            let mut ev = ctx.event(Action::Detokenize, Outcome::Denied);
            // Not looked up yet: only a random token is recorded (see
            // `lookup`).
            if let Some(t) = Token::parse(token).filter(|t| t.format() == TokenFormat::Random) {
                ev = ev.token(t.as_str());
            }
            return Err(self.rate_limited(ev, LimitScope::Principal, wait).await);
        }
        let row = self.lookup(ctx, Action::Detokenize, token).await?;
        if let Some(Err(wait)) =
            monitor.map(|m| m.admit_tenant(&row.tenant, principal_id, Instant::now()))
        {
            let ev = ctx
                .event(Action::Detokenize, Outcome::Denied)
                .tenant(row.tenant.clone())
                .token(row.token.clone());
            return Err(self.rate_limited(ev, LimitScope::Tenant, wait).await);
        }
        let event = ctx
            .event(Action::Detokenize, Outcome::Success)
            .tenant(row.tenant.clone())
            .token(row.token.clone())
            .reason(reason);
        let card = match self.open_row(&row).await {
            Ok(card) => card,
            Err(e) => return Err(self.fail(event.detail("integrity"), e).await),
        };
        // The security code leaves with this answer and is gone; the audit
        // trail says so (never the code). If the event cannot be written,
        // the code is dropped rather than kept for a retry.
        let cvc = if include_cvc {
            self.cvc.take(&row.token, Instant::now())
        } else {
            None
        };
        let event = if cvc.is_some() {
            event.detail("cvc_released")
        } else {
            event
        };
        // The event and the card's use go to the writer together (one
        // group, usually).
        let used = [row.token.as_str()];
        let (written, ()) = tokio::join!(self.write_event(event), self.touch(&used, now_millis()));
        written?;
        if let Some(anomaly) =
            monitor.and_then(|m| m.observe(principal_id, &row.token, Instant::now()))
        {
            tracing::warn!(
                principal = %ctx.principal.name,
                tenant = %row.tenant,
                request_id = %ctx.request_id,
                distinct_tokens = anomaly.distinct,
                threshold = anomaly.threshold,
                baseline = anomaly.baseline,
                window_s = anomaly.window.as_secs(),
                "detokenize anomaly: a principal detokenized many more distinct tokens than its baseline"
            );
            let ev = ctx
                .event(Action::DetokenizeAnomaly, Outcome::Success)
                .tenant(row.tenant.clone())
                .token(row.token.clone())
                .detail(anomaly.detail());
            self.write_event(ev).await?;
        }
        let cvc_available = self.cvc.has(&row.token, Instant::now());
        Ok(Detokenized {
            token: row.token,
            card,
            cvc,
            cvc_available,
        })
    }

    /// Record a detokenize refused by a rate limit and return its error.
    async fn rate_limited(
        &self,
        event: AuditEvent,
        scope: LimitScope,
        retry_after: std::time::Duration,
    ) -> VaultError {
        let event = event
            .error_code("rate_limited")
            .detail(format!("{}_rate_limit", scope.as_str()));
        match self.write_event(event).await {
            Ok(_) => VaultError::RateLimited { scope, retry_after },
            Err(e) => e.into(),
        }
    }

    /// Non-secret details of a token.
    pub async fn metadata(
        &self,
        ctx: &RequestContext,
        token: &str,
    ) -> Result<TokenInfo, VaultError> {
        self.require_role(ctx, Action::MetadataRead, &[Role::Tokenize])
            .await?;
        let row = self.lookup(ctx, Action::MetadataRead, token).await?;
        let event = ctx
            .event(Action::MetadataRead, Outcome::Success)
            .tenant(row.tenant.clone())
            .token(row.token.clone());
        let card = match self.open_row(&row).await {
            Ok(card) => card,
            Err(e) => return Err(self.fail(event.detail("integrity"), e).await),
        };
        self.write_event(event).await?;
        let mut info = token_info(&row, card.expiry, false);
        info.cvc_available = self.cvc.has(&row.token, Instant::now());
        Ok(info)
    }

    /// Delete a token and its ciphertext.
    pub async fn delete(&self, ctx: &RequestContext, token: &str) -> Result<(), VaultError> {
        self.require_role(ctx, Action::Delete, &[Role::Tokenize, Role::Detokenize])
            .await?;
        let row = self.lookup(ctx, Action::Delete, token).await?;
        let event = ctx
            .event(Action::Delete, Outcome::Success)
            .tenant(row.tenant.clone())
            .token(row.token.clone());
        self.cvc.forget(&row.token);
        if self
            .store
            .delete_card(&row.token, &row.tenant, event.clone())
            .await?
        {
            Ok(())
        } else {
            // Deleted concurrently between lookup and delete.
            Err(self.fail(event, VaultError::NotFound).await)
        }
    }

    /// Query the audit trail (role `auditor`). The query itself is audited.
    /// Equality filters run in the database; the time range is applied to
    /// each page, so a page may hold fewer than `limit` events: continue
    /// from `next_after` until it stops moving.
    pub async fn audit_query(
        &self,
        ctx: &RequestContext,
        q: AuditQuery,
    ) -> Result<AuditPage, VaultError> {
        self.require_role(ctx, Action::AuditRead, &[Role::Auditor])
            .await?;
        let f = &q.filter;
        let base = ctx.event(Action::AuditRead, Outcome::Failure);
        let names_ok = [f.principal.as_deref(), f.tenant.as_deref()]
            .into_iter()
            .flatten()
            .all(|v| Tenant::parse(v).is_ok());
        if !names_ok {
            return Err(self
                .fail(
                    base,
                    VaultError::InvalidFilter("principal and tenant are 1-64 of A-Z a-z 0-9 _ . -"),
                )
                .await);
        }
        if f.token
            .as_deref()
            .is_some_and(|t| Token::parse(t).is_none())
        {
            return Err(self
                .fail(base, VaultError::InvalidFilter("token is not a token id"))
                .await);
        }
        if let TenantScope::Only(allowed) = &ctx.principal.tenants {
            if !f.tenant.as_ref().is_some_and(|t| allowed.contains(t)) {
                self.deny(
                    ctx,
                    Action::AuditRead,
                    f.tenant.as_deref(),
                    None,
                    "tenant_filter_required",
                )
                .await?;
            }
        }
        let limit = q.limit.clamp(1, 1000);
        let rows = self.store.query_audit(f, q.after, limit).await?;
        let next_after = rows.last().map_or(q.after, |e| e.seq);
        let events: Vec<audit::ChainedEvent> = rows
            .into_iter()
            .filter(|e| {
                q.from.is_none_or(|from| e.event.time >= from)
                    && q.to.is_none_or(|to| e.event.time < to)
            })
            .collect();
        let mut detail = format!("after={} limit={limit} returned={}", q.after, events.len());
        // A pan-shaped filter may be a mistyped card number (see `lookup`):
        // recorded masked, as a card number would be.
        let token = f.token.as_deref().map(|t| match TokenFormat::of(t) {
            TokenFormat::Random => t.to_owned(),
            TokenFormat::PanShaped => crate::pan::masked_form(
                t.get(..6).unwrap_or_default(),
                t.get(t.len().saturating_sub(4)..).unwrap_or_default(),
                t.len(),
            ),
        });
        for (name, value) in [
            ("principal", f.principal.as_deref()),
            ("token", token.as_deref()),
            ("action", f.action.map(|a| a.as_str())),
            ("tenant", f.tenant.as_deref()),
            ("outcome", f.outcome.map(|o| o.as_str())),
        ] {
            if let Some(v) = value {
                detail.push_str(&format!(" {name}={v}"));
            }
        }
        let mut event = ctx
            .event(Action::AuditRead, Outcome::Success)
            .detail(detail);
        event.tenant = f.tenant.clone();
        self.write_event(event).await?;
        Ok(AuditPage { events, next_after })
    }

    /// Every signed checkpoint (role `auditor`); audited.
    pub async fn audit_checkpoints(
        &self,
        ctx: &RequestContext,
    ) -> Result<Vec<audit::Checkpoint>, VaultError> {
        self.require_role(ctx, Action::AuditRead, &[Role::Auditor])
            .await?;
        let checkpoints = self.store.checkpoints().await?;
        let event = ctx
            .event(Action::AuditRead, Outcome::Success)
            .detail(format!("checkpoints returned={}", checkpoints.len()));
        self.write_event(event).await?;
        Ok(checkpoints)
    }

    /// Sign a checkpoint of the audit trail if it grew since the last one.
    pub async fn checkpoint(&self) -> Result<Option<audit::Checkpoint>, VaultError> {
        Ok(self
            .store
            .write_checkpoint(self.keys.audit_signing_key())
            .await?)
    }

    /// Number of entries in the audit chain.
    pub async fn audit_size(&self) -> Result<u64, VaultError> {
        Ok(self.store.audit_size().await?)
    }

    /// The auditors' verification key (`cardvault-audit-ed25519:<hex>`).
    pub fn audit_public_key(&self) -> &str {
        self.keys.audit_public_key()
    }

    /// Record a service lifecycle event (start, stop).
    pub async fn record_lifecycle(&self, action: Action, detail: &str) -> Result<(), VaultError> {
        let event = AuditEvent::new(action, Outcome::Success)
            .source("local")
            .detail(detail);
        self.write_event(event).await?;
        Ok(())
    }
}

fn validate(input: &CardInput) -> Result<(CardSecret, Option<Cvc>), CardError> {
    let pan = Pan::parse(&input.pan)?;
    let expiry = Expiry::new(input.exp_month, input.exp_year)?;
    let name = input
        .cardholder_name
        .as_ref()
        .map(|n| CardholderName::parse(n))
        .transpose()?;
    let cvc = input
        .cvc
        .as_ref()
        .map(|c| Cvc::parse(c, pan.brand()).map_err(|_| CardError::Cvc))
        .transpose()?;
    Ok((CardSecret { pan, expiry, name }, cvc))
}

fn valid_reason(reason: &str) -> bool {
    let n = reason.chars().count();
    (1..=256).contains(&n)
        && !reason.trim().is_empty()
        && reason.chars().all(|c| !c.is_control())
        && !contains_pan_like(reason)
}

fn token_info(row: &CardRow, expiry: Expiry, created: bool) -> TokenInfo {
    TokenInfo {
        token: row.token.clone(),
        tenant: row.tenant.clone(),
        fingerprint: row.fingerprint.clone(),
        brand: Brand::parse(&row.brand).unwrap_or(Brand::Unknown),
        bin: row.bin.clone(),
        last4: row.last4.clone(),
        masked_pan: masked_form(&row.bin, &row.last4, usize::from(row.pan_len)),
        exp_month: expiry.month(),
        exp_year: expiry.year(),
        created_at: row.created_at,
        created,
        token_format: TokenFormat::of(&row.token),
        expires_at: row.expires_at,
        updated: false,
        cvc_available: false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::access::TenantScope;
    use crate::store::sqlite::SqliteStore;
    use std::collections::BTreeSet;

    #[test]
    fn card_inputs_print_no_cardholder_data() {
        let input = CardInput {
            pan: Zeroizing::new("4111111111111111".into()),
            exp_month: 12,
            exp_year: 2030,
            cardholder_name: Some(Zeroizing::new("Jane Cardholder".into())),
            cvc: Some(Zeroizing::new("123".into())),
        };
        let update = CardUpdate {
            exp_month: Some(1),
            exp_year: Some(2031),
            cardholder_name: Some(Zeroizing::new("Jane Cardholder".into())),
        };
        let printed = format!("{input:?} {update:?}");
        assert_eq!(printed, "CardInput([REDACTED]) CardUpdate([REDACTED])");
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        sqlite: SqliteStore,
        vault: Vault,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let kek = hsm_shim::SoftwareKek::generate(&dir.path().join("kek.key")).unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("v.db")).await.unwrap();
        let vault = Vault::open(Arc::new(sqlite.clone()), Arc::new(kek))
            .await
            .unwrap();
        Fixture {
            _dir: dir,
            sqlite,
            vault,
        }
    }

    fn ctx(roles: &[Role], tenants: TenantScope) -> RequestContext {
        RequestContext {
            principal: Principal {
                id: "id".into(),
                name: "tester".into(),
                roles: roles.iter().copied().collect::<BTreeSet<_>>(),
                tenants,
            },
            source: "127.0.0.1:1".into(),
            request_id: "req".into(),
        }
    }

    fn all() -> RequestContext {
        ctx(&[Role::Tokenize, Role::Detokenize], TenantScope::All)
    }

    fn card(pan: &str) -> CardInput {
        CardInput {
            pan: Zeroizing::new(pan.to_owned()),
            exp_month: 12,
            exp_year: i64::from(time::OffsetDateTime::now_utc().year()) + 3,
            cardholder_name: Some(Zeroizing::new("Jane Doe".to_owned())),
            cvc: None,
        }
    }

    #[tokio::test]
    async fn round_trip_idempotency_and_tenants() {
        let f = fixture().await;
        let a = f
            .vault
            .tokenize(&all(), "shop-1", card("4111 1111 1111 1111"))
            .await
            .unwrap();
        assert!(a.created);
        assert_eq!(a.masked_pan, "411111******1111");
        let again = f
            .vault
            .tokenize(&all(), "shop-1", card("4111-1111-1111-1111"))
            .await
            .unwrap();
        assert_eq!(
            (again.token.as_str(), again.created),
            (a.token.as_str(), false)
        );
        let other = f
            .vault
            .tokenize(&all(), "shop-2", card("4111111111111111"))
            .await
            .unwrap();
        assert_ne!(other.token, a.token);
        assert_ne!(other.fingerprint, a.fingerprint);
        let d = f
            .vault
            .detokenize(&all(), &a.token, "capture")
            .await
            .unwrap();
        assert_eq!(d.card.pan.expose_digits(), "4111111111111111");
        assert_eq!(d.card.name.as_ref().unwrap().expose(), "Jane Doe");
        let only_2 = ctx(&[Role::Detokenize], TenantScope::parse("shop-2").unwrap());
        assert!(matches!(
            f.vault.detokenize(&only_2, &a.token, "x").await,
            Err(VaultError::NotFound)
        ));
    }

    #[tokio::test]
    async fn a_ciphertext_moved_to_another_row_does_not_open() {
        let f = fixture().await;
        let a = f
            .vault
            .tokenize(&all(), "shop-1", card("4111111111111111"))
            .await
            .unwrap();
        let b = f
            .vault
            .tokenize(&all(), "shop-1", card("5555555555554444"))
            .await
            .unwrap();
        sqlx::query(
            "UPDATE cards SET nonce = (SELECT nonce FROM cards WHERE token = ?1),
                              ciphertext = (SELECT ciphertext FROM cards WHERE token = ?1)
             WHERE token = ?2",
        )
        .bind(&a.token)
        .bind(&b.token)
        .execute(f.sqlite.pool())
        .await
        .unwrap();
        assert!(matches!(
            f.vault.detokenize(&all(), &b.token, "x").await,
            Err(VaultError::Integrity)
        ));
        assert!(matches!(
            f.vault.metadata(&all(), &b.token).await,
            Err(VaultError::Integrity)
        ));
        // Moving a row to another tenant fails the same way.
        sqlx::query("UPDATE cards SET tenant = 'shop-9' WHERE token = ?")
            .bind(&a.token)
            .execute(f.sqlite.pool())
            .await
            .unwrap();
        assert!(matches!(
            f.vault.detokenize(&all(), &a.token, "x").await,
            Err(VaultError::Integrity)
        ));
    }

    #[tokio::test]
    async fn no_audit_no_operation() {
        let f = fixture().await;
        let a = f
            .vault
            .tokenize(&all(), "shop-1", card("4111111111111111"))
            .await
            .unwrap();
        sqlx::query(
            "CREATE TRIGGER audit_broken BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit down'); END",
        )
        .execute(f.sqlite.pool())
        .await
        .unwrap();
        let err = f
            .vault
            .tokenize(&all(), "shop-1", card("5555555555554444"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "storage_unavailable");
        let err = f
            .vault
            .detokenize(&all(), &a.token, "capture")
            .await
            .unwrap_err();
        assert_eq!(err.code(), "storage_unavailable");
        let err = f.vault.delete(&all(), &a.token).await.unwrap_err();
        assert_eq!(err.code(), "storage_unavailable");
        sqlx::query("DROP TRIGGER audit_broken")
            .execute(f.sqlite.pool())
            .await
            .unwrap();
        // Nothing happened while the audit trail was down.
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cards")
            .fetch_one(f.sqlite.pool())
            .await
            .unwrap();
        assert_eq!(count, 1);
        assert!(f
            .vault
            .detokenize(&all(), &a.token, "capture")
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn roles_and_audit_of_refusals() {
        let f = fixture().await;
        let a = f
            .vault
            .tokenize(&all(), "shop-1", card("4111111111111111"))
            .await
            .unwrap();
        let tok_only = ctx(&[Role::Tokenize], TenantScope::All);
        assert!(matches!(
            f.vault.detokenize(&tok_only, &a.token, "x").await,
            Err(VaultError::Forbidden)
        ));
        let det_only = ctx(&[Role::Detokenize], TenantScope::All);
        assert!(matches!(
            f.vault.metadata(&det_only, &a.token).await,
            Err(VaultError::Forbidden)
        ));
        assert!(matches!(
            f.vault
                .tokenize(&det_only, "shop-1", card("4111111111111111"))
                .await,
            Err(VaultError::Forbidden)
        ));
        let auditor = ctx(&[Role::Auditor, Role::KeyAdmin], TenantScope::All);
        assert!(matches!(
            f.vault.delete(&auditor, &a.token).await,
            Err(VaultError::Forbidden)
        ));
        let shop2 = ctx(&[Role::Tokenize], TenantScope::parse("shop-2").unwrap());
        assert!(matches!(
            f.vault
                .tokenize(&shop2, "shop-1", card("4111111111111111"))
                .await,
            Err(VaultError::Forbidden)
        ));
        assert!(matches!(
            f.vault.delete(&shop2, &a.token).await,
            Err(VaultError::NotFound)
        ));
        assert!(matches!(
            f.vault
                .detokenize(&all(), &a.token, "card 4111111111111111")
                .await,
            Err(VaultError::InvalidReason)
        ));
        let events = f.vault.store().audit_events(0, 1000).await.unwrap();
        let denied = events
            .iter()
            .filter(|e| e.event.outcome == Outcome::Denied)
            .count();
        assert_eq!(denied, 6);
        for e in &events {
            for field in e.event.text_fields() {
                assert!(!field.contains("4111111111111111"), "{field}");
            }
        }
    }

    #[tokio::test]
    async fn audit_queries_filter_paginate_and_are_audited() {
        let f = fixture().await;
        let a = f
            .vault
            .tokenize(&all(), "shop-1", card("4111111111111111"))
            .await
            .unwrap();
        f.vault
            .tokenize(&all(), "shop-2", card("5555555555554444"))
            .await
            .unwrap();
        f.vault
            .detokenize(&all(), &a.token, "settle")
            .await
            .unwrap();
        let auditor = ctx(&[Role::Auditor], TenantScope::All);
        let q = |filter: AuditFilter, after: u64, limit: u32| AuditQuery {
            filter,
            after,
            limit,
            ..AuditQuery::default()
        };
        // Only auditors.
        assert!(matches!(
            f.vault
                .audit_query(&all(), q(AuditFilter::default(), 0, 10))
                .await,
            Err(VaultError::Forbidden)
        ));
        let by_token = AuditFilter {
            token: Some(a.token.clone()),
            ..AuditFilter::default()
        };
        let page = f
            .vault
            .audit_query(&auditor, q(by_token, 0, 100))
            .await
            .unwrap();
        let actions: Vec<_> = page.events.iter().map(|e| e.event.action).collect();
        assert_eq!(actions, [Action::Tokenize, Action::Detokenize]);
        assert_eq!(page.events[1].event.reason.as_deref(), Some("settle"));
        // Pagination by chain number, one at a time: each match once, in order.
        let tokenizes = || AuditFilter {
            action: Some(Action::Tokenize),
            ..AuditFilter::default()
        };
        let mut seen = Vec::new();
        let mut after = 0;
        for _ in 0..10 {
            let page = f
                .vault
                .audit_query(&auditor, q(tokenizes(), after, 1))
                .await
                .unwrap();
            if page.next_after == after {
                break;
            }
            seen.extend(page.events.iter().map(|e| e.seq));
            after = page.next_after;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0] < seen[1]);
        // Every query was itself recorded.
        let reads = AuditFilter {
            action: Some(Action::AuditRead),
            ..AuditFilter::default()
        };
        let page = f
            .vault
            .audit_query(&auditor, q(reads, 0, 1000))
            .await
            .unwrap();
        assert!(page.events.len() >= 3, "{}", page.events.len());
        // Bad filters are refused; an auditor limited to a tenant must filter by it.
        let bad = AuditFilter {
            token: Some("4111111111111111".into()),
            ..AuditFilter::default()
        };
        assert!(matches!(
            f.vault.audit_query(&auditor, q(bad, 0, 10)).await,
            Err(VaultError::InvalidFilter(_))
        ));
        // A digit string we did not issue may be a mistyped card number:
        // the query is recorded with it masked, never in full.
        let mistyped = AuditFilter {
            token: Some("4111111111111112".into()),
            ..AuditFilter::default()
        };
        let page = f
            .vault
            .audit_query(&auditor, q(mistyped, 0, 100))
            .await
            .unwrap();
        assert!(page.events.is_empty());
        let reads = AuditFilter {
            action: Some(Action::AuditRead),
            ..AuditFilter::default()
        };
        let page = f
            .vault
            .audit_query(&auditor, q(reads, 0, 1000))
            .await
            .unwrap();
        let details: Vec<String> = page
            .events
            .iter()
            .filter_map(|e| e.event.detail.clone())
            .collect();
        assert!(
            details.iter().any(|d| d.contains("token=411111******1112")),
            "{details:?}"
        );
        assert!(!details.iter().any(|d| d.contains("4111111111111112")));
        let shop1_auditor = ctx(&[Role::Auditor], TenantScope::parse("shop-1").unwrap());
        assert!(matches!(
            f.vault
                .audit_query(&shop1_auditor, q(AuditFilter::default(), 0, 10))
                .await,
            Err(VaultError::Forbidden)
        ));
        let shop1 = AuditFilter {
            tenant: Some("shop-1".into()),
            ..AuditFilter::default()
        };
        let page = f
            .vault
            .audit_query(&shop1_auditor, q(shop1, 0, 100))
            .await
            .unwrap();
        assert!(page
            .events
            .iter()
            .all(|e| e.event.tenant.as_deref() == Some("shop-1")));
        assert!(!page.events.is_empty());
    }

    #[tokio::test]
    async fn batch_keeps_order_and_isolates_bad_cards() {
        let f = fixture().await;
        let cards = vec![
            card("4111111111111111"),
            card("4111111111111112"),
            CardInput {
                exp_month: 13,
                ..card("5555555555554444")
            },
            card("4111111111111111"),
            card("378282246310005"),
        ];
        let out = f
            .vault
            .tokenize_many(&all(), "shop-1", cards)
            .await
            .unwrap();
        assert!(out[0].as_ref().unwrap().created);
        assert_eq!(out[1].as_ref().unwrap_err().code(), "invalid_pan");
        assert_eq!(out[2].as_ref().unwrap_err().code(), "invalid_expiry");
        assert_eq!(
            out[3].as_ref().unwrap().token,
            out[0].as_ref().unwrap().token
        );
        assert!(!out[3].as_ref().unwrap().created);
        assert_eq!(out[4].as_ref().unwrap().brand, Brand::Amex);
        assert!(matches!(
            f.vault.tokenize_many(&all(), "shop-1", vec![]).await,
            Err(VaultError::InvalidBatchSize)
        ));
    }

    #[tokio::test]
    async fn monitored_detokenize_limits_and_flags_anomalies() {
        use crate::monitor::{AnomalyRule, DetokenizeMonitor, MonitorConfig, Rate};
        let f = fixture().await;
        let monitor = DetokenizeMonitor::new(MonitorConfig {
            per_principal: Rate {
                per_minute: 1,
                burst: 3,
            },
            per_tenant: Rate::OFF,
            anomaly: AnomalyRule {
                window: std::time::Duration::from_secs(3600),
                factor: 5,
                min_distinct: 2,
                baseline_windows: 12,
            },
        });
        let mut tokens = Vec::new();
        for pan in ["4111111111111111", "5555555555554444", "378282246310005"] {
            let t = f.vault.tokenize(&all(), "shop-1", card(pan)).await.unwrap();
            tokens.push(t.token);
        }
        for t in &tokens {
            f.vault
                .detokenize_monitored(&all(), t, "settle", &monitor, false)
                .await
                .unwrap();
        }
        let refused = f
            .vault
            .detokenize_monitored(&all(), &tokens[0], "settle", &monitor, false)
            .await;
        assert!(
            matches!(
                refused,
                Err(VaultError::RateLimited {
                    scope: LimitScope::Principal,
                    retry_after,
                }) if retry_after > std::time::Duration::from_secs(50)
            ),
            "{refused:?}"
        );
        let events = f.vault.store().audit_events(0, 1000).await.unwrap();
        let of = |a: Action, o: Outcome| {
            events
                .iter()
                .filter(|e| e.event.action == a && e.event.outcome == o)
                .map(|e| e.event.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(of(Action::Detokenize, Outcome::Success).len(), 3);
        let denied = of(Action::Detokenize, Outcome::Denied);
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].error_code.as_deref(), Some("rate_limited"));
        assert_eq!(denied[0].detail.as_deref(), Some("principal_rate_limit"));
        assert_eq!(denied[0].token.as_deref(), Some(tokens[0].as_str()));
        // The third distinct token crossed the minimum of 2: one event.
        let anomalies = of(Action::DetokenizeAnomaly, Outcome::Success);
        assert_eq!(anomalies.len(), 1);
        assert_eq!(anomalies[0].principal.as_deref(), Some("tester"));
        assert_eq!(anomalies[0].token.as_deref(), Some(tokens[2].as_str()));
        assert!(anomalies[0]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("distinct_tokens=3 threshold=2 "));
        assert_eq!(monitor.counts().anomalies, 1);
        assert_eq!(monitor.counts().limited_principal, 1);
        // The unmonitored call is not limited.
        f.vault
            .detokenize(&all(), &tokens[0], "settle")
            .await
            .unwrap();
    }

    /// A 12-digit card number of BIN 411111 and last four 1111 with these
    /// two middle digits (Luhn digit fixed up to be valid): generated from a
    /// test BIN, as the test-card rules allow.
    fn twelve_digit(middle: u8) -> Option<String> {
        let s = format!("411111{middle:02}1111");
        crate::pan::luhn_valid(s.as_bytes()).then_some(s)
    }

    #[tokio::test]
    async fn pan_shaped_space_runs_out_with_a_clear_error() {
        let f = fixture().await;
        let pans: Vec<String> = (0..100).filter_map(twelve_digit).collect();
        assert_eq!(pans.len(), 10, "ten Luhn-valid middles");
        let opts = TokenizeOptions {
            format: TokenFormat::PanShaped,
            expires_at: None,
        };
        // Not allowed until the tenant's policy says so.
        assert!(matches!(
            f.vault
                .tokenize_with(&all(), "legacy-0", card(&pans[0]), opts)
                .await,
            Err(VaultError::TokenFormatNotPermitted)
        ));
        let mut tokens = std::collections::HashSet::new();
        let mut refused = None;
        'fill: for t in 0..10 {
            let tenant = format!("legacy-{t}");
            crate::tenants::set_policy(
                f.vault.store().as_ref(),
                &tenant,
                crate::tenants::PolicyChange {
                    pan_shaped: Some(true),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            // Other processes see a policy change within `tenants::FRESH`.
            f.vault.tenants.invalidate(&tenant);
            for pan in &pans {
                match f
                    .vault
                    .tokenize_with(&all(), &tenant, card(pan), opts)
                    .await
                {
                    Ok(info) => {
                        assert!(!crate::pan::luhn_valid(info.token.as_bytes()));
                        assert!(info.token.starts_with("411111") && info.token.ends_with("1111"));
                        assert!(tokens.insert(info.token), "a token issued twice");
                    }
                    Err(VaultError::TokenSpaceExhausted { used, space }) => {
                        refused = Some((used, space));
                        break 'fill;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let (used, space) = refused.expect("the space ran out");
        assert_eq!(space, 90);
        assert!(used as f64 >= 81.0 && used <= 90, "{used}");
        assert_eq!(tokens.len() as u64, used);
    }

    #[tokio::test]
    async fn security_codes_are_released_once() {
        let f = fixture().await;
        let mut c = card("378282246310005");
        c.cvc = Some(Zeroizing::new("123".to_owned()));
        assert!(matches!(
            f.vault.tokenize(&all(), "shop-1", c).await,
            Err(VaultError::InvalidCard(CardError::Cvc))
        ));
        let mut c = card("378282246310005");
        c.cvc = Some(Zeroizing::new("9183".to_owned()));
        let info = f.vault.tokenize(&all(), "shop-1", c).await.unwrap();
        assert!(info.cvc_available);
        assert_eq!(f.vault.cvc_held(), 1);
        let monitor = DetokenizeMonitor::new(crate::monitor::MonitorConfig {
            per_principal: crate::monitor::Rate::OFF,
            per_tenant: crate::monitor::Rate::OFF,
            anomaly: crate::monitor::AnomalyRule {
                window: std::time::Duration::from_secs(3600),
                factor: 5,
                min_distinct: 0,
                baseline_windows: 12,
            },
        });
        let plain = f
            .vault
            .detokenize_monitored(&all(), &info.token, "settle", &monitor, false)
            .await
            .unwrap();
        assert!(plain.cvc.is_none() && plain.cvc_available);
        let once = f
            .vault
            .detokenize_monitored(&all(), &info.token, "settle", &monitor, true)
            .await
            .unwrap();
        assert_eq!(once.cvc.as_ref().map(Cvc::expose), Some("9183"));
        assert!(!once.cvc_available);
        let twice = f
            .vault
            .detokenize_monitored(&all(), &info.token, "settle", &monitor, true)
            .await
            .unwrap();
        assert!(twice.cvc.is_none());
        // Nothing of it in any file (database, WAL, KEK).
        for entry in std::fs::read_dir(f._dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            // As a whole number: times in the audit trail hold digit runs
            // that may contain these four digits by chance.
            let whole = bytes
                .windows(6)
                .any(|w| &w[1..5] == b"9183" && !w[0].is_ascii_digit() && !w[5].is_ascii_digit());
            assert!(!whole, "the code reached a file");
        }
    }

    #[tokio::test]
    async fn newer_expiry_updates_older_never_does() {
        let f = fixture().await;
        let year = i64::from(time::OffsetDateTime::now_utc().year());
        let with = |y: i64, name: Option<&str>| CardInput {
            pan: Zeroizing::new("5555555555554444".to_owned()),
            exp_month: 6,
            exp_year: y,
            cardholder_name: name.map(|n| Zeroizing::new(n.to_owned())),
            cvc: None,
        };
        let a = f
            .vault
            .tokenize(&all(), "shop-1", with(year + 2, None))
            .await
            .unwrap();
        let newer = f
            .vault
            .tokenize(&all(), "shop-1", with(year + 4, Some("A B")))
            .await
            .unwrap();
        assert_eq!(
            (newer.token.as_str(), newer.updated, newer.exp_year),
            (a.token.as_str(), true, u16::try_from(year + 4).unwrap())
        );
        let older = f
            .vault
            .tokenize(&all(), "shop-1", with(year + 3, None))
            .await
            .unwrap();
        assert_eq!(
            (older.updated, older.exp_year),
            (false, u16::try_from(year + 4).unwrap())
        );
        let d = f.vault.detokenize(&all(), &a.token, "check").await.unwrap();
        assert_eq!(d.card.name.as_ref().map(|n| n.expose()), Some("A B"));
        assert!(matches!(
            f.vault
                .update(
                    &all(),
                    &a.token,
                    CardUpdate {
                        exp_month: Some(1),
                        exp_year: Some(year + 3),
                        cardholder_name: None
                    }
                )
                .await,
            Err(VaultError::OlderExpiry)
        ));
        let patched = f
            .vault
            .update(
                &all(),
                &a.token,
                CardUpdate {
                    exp_month: None,
                    exp_year: None,
                    cardholder_name: Some(Zeroizing::new("C D".to_owned())),
                },
            )
            .await
            .unwrap();
        assert!(patched.updated);
        let d = f.vault.detokenize(&all(), &a.token, "check").await.unwrap();
        assert_eq!(d.card.name.as_ref().map(|n| n.expose()), Some("C D"));
        assert_eq!(d.card.expiry.year(), u16::try_from(year + 4).unwrap());
    }

    #[tokio::test]
    async fn expired_tokens_are_gone_and_purged_and_a_deleted_tenant_is_shredded() {
        let f = fixture().await;
        let store = f.vault.store().clone();
        let soon = now_millis() + 300;
        let opts = TokenizeOptions {
            format: TokenFormat::Random,
            expires_at: Some(soon),
        };
        let short = f
            .vault
            .tokenize_with(&all(), "shop-1", card("4242424242424242"), opts)
            .await
            .unwrap();
        assert_eq!(short.expires_at, Some(soon));
        let keep = f
            .vault
            .tokenize(&all(), "shop-2", card("4242424242424242"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(matches!(
            f.vault.detokenize(&all(), &short.token, "x").await,
            Err(VaultError::NotFound)
        ));
        let counts = crate::tenants::purge(store.as_ref(), "test").await.unwrap();
        assert_eq!((counts.expired, counts.retention), (1, 0));
        assert!(store.find_card(&short.token).await.unwrap().is_none());
        // Tokenized again after expiry: a new token.
        let again = f
            .vault
            .tokenize(&all(), "shop-1", card("4242424242424242"))
            .await
            .unwrap();
        assert_ne!(again.token, short.token);

        // Deleting shop-1: its salt goes first, then its records.
        let salted = store.tenant("shop-1").await.unwrap().unwrap();
        assert!(salted.fingerprint_salt.is_some());
        let n = crate::tenants::delete_tenant(store.as_ref(), "shop-1")
            .await
            .unwrap();
        assert_eq!(n, 1);
        let gone = store.tenant("shop-1").await.unwrap().unwrap();
        assert!(gone.fingerprint_salt.is_none() && gone.deleted_at.is_some());
        f.vault.tenants.invalidate("shop-1");
        assert!(matches!(
            f.vault
                .tokenize(&all(), "shop-1", card("4242424242424242"))
                .await,
            Err(VaultError::TenantDeleted)
        ));
        assert!(
            f.vault.detokenize(&all(), &keep.token, "x").await.is_ok(),
            "another tenant is untouched"
        );
    }

    #[tokio::test]
    async fn an_unknown_digit_token_is_never_written_down() {
        let f = fixture().await;
        // One digit off a test card: fails Luhn, so it has the shape of a
        // pan-shaped token; it may be a mistyped card number.
        let typo = "4111111111111112";
        for r in [
            f.vault.detokenize(&all(), typo, "settle").await.map(|_| ()),
            f.vault.metadata(&all(), typo).await.map(|_| ()),
            f.vault.delete(&all(), typo).await,
        ] {
            assert!(matches!(r, Err(VaultError::NotFound)));
        }
        let events = f.vault.store().audit_events(0, 1000).await.unwrap();
        assert!(events.len() >= 3);
        for e in events {
            let text = format!("{:?}", e.event);
            assert!(!text.contains(typo), "written down: {text}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_share_commits_and_keep_every_answer() {
        let f = fixture().await;
        let vault = Arc::new(f.vault);
        // 96 tokenizes of 8 cards for 3 tenants at once: one token per card
        // and tenant, whatever group each request landed in.
        let cards = [
            "4111111111111111",
            "4242424242424242",
            "5555555555554444",
            "378282246310005",
            "6011111111111117",
            "3530111333300000",
            "6200000000000005",
            "2223003122003222",
        ];
        let mut tasks = Vec::new();
        for i in 0..96 {
            let vault = vault.clone();
            let pan = cards[i % cards.len()];
            let tenant = format!("shop-{}", i % 3);
            tasks.push(tokio::spawn(async move {
                let info = vault.tokenize(&all(), &tenant, card(pan)).await.unwrap();
                (tenant, pan, info.token)
            }));
        }
        let mut seen: HashMap<(String, &str), String> = HashMap::new();
        for t in tasks {
            let (tenant, pan, token) = t.await.unwrap();
            let first = seen.entry((tenant, pan)).or_insert_with(|| token.clone());
            assert_eq!(*first, token, "one token per card and tenant");
        }
        assert_eq!(seen.len(), 24);
        // And as many detokenizes at once, each audited before it answers.
        let before = vault.store().audit_events(0, 100_000).await.unwrap().len();
        let mut reads = Vec::new();
        for ((_, pan), token) in seen.iter().map(|(k, v)| (k.clone(), v.clone())) {
            for _ in 0..4 {
                let (vault, token, pan) = (vault.clone(), token.clone(), pan);
                reads.push(tokio::spawn(async move {
                    let d = vault.detokenize(&all(), &token, "settle").await.unwrap();
                    assert_eq!(d.card.pan.expose_digits(), pan);
                }));
            }
        }
        for r in reads {
            r.await.unwrap();
        }
        let after = vault.store().audit_events(0, 100_000).await.unwrap().len();
        assert_eq!(after - before, 96, "every read audited once");
        let chained = vault.store().chained_events(0, 100_000).await.unwrap();
        assert_eq!(chained.len(), after, "one chain, no gaps");
    }
}
