//! Hosted collection sessions (the model is `crate::collect`): opened by
//! the checkout server (role `tokenize`), read back by it to learn the
//! token (it never trusts what the browser says), and completed once by the
//! edge (role `collect`) with the card the buyer typed.
//!
//! A session is single use. A retry of the completed submission (the same
//! secret and the same card, for instance after a lost connection) answers
//! the same token; any other submission to a completed session is refused
//! (`session_completed`) without storing anything, and so is a second
//! submission while one is being tokenized (`session_busy`). Each refused
//! submission is counted; at `collect_max_failures` the session is closed. Every
//! submission is an audit event (with the buyer's address as the edge
//! reports it); never the card, never the client secret.

use std::net::IpAddr;
use std::time::Instant;

use audit::{Action, AuditEvent, Outcome};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::tokenize::validate;
use super::{token_info, CardError, CardInput, RequestContext, TokenInfo, TokenizeOptions};
use super::{Vault, VaultError};
use crate::access::Role;
use crate::card::{Tenant, TokenFormat};
use crate::collect::{
    ClientSecret, CollectStyle, Origin, OriginError, SessionId, DEFAULT_TTL_SECS,
    KEEP_AFTER_EXPIRY_MS, MAX_TTL_SECS,
};
use crate::pan::contains_pan_like;
use crate::store::{now_millis, CollectSessionRow};

/// Sessions deleted per purge transaction.
const PURGE_BATCH: u32 = 500;
/// How long a submission holds its session while its card is tokenized
/// (released when it completes or is refused; a crashed one lets go then).
const CLAIM_MS: i64 = 30_000;

/// What the checkout server asks for.
#[derive(Debug, Clone)]
pub struct CollectSessionInput {
    pub tenant: String,
    pub allowed_origin: String,
    /// 1 to 900 (default 600).
    pub ttl_secs: Option<i64>,
    pub require_cvc: bool,
    pub token_format: TokenFormat,
    /// The checkout's own reference (an order id): 1 to 64 printable
    /// characters, never a card number.
    pub reference: Option<String>,
    pub style: Option<CollectStyle>,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    Open,
    Completed,
    Expired,
    /// Too many refused submissions.
    Closed,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Open => "open",
            SessionStatus::Completed => "completed",
            SessionStatus::Expired => "expired",
            SessionStatus::Closed => "closed",
        }
    }

    fn of(row: &CollectSessionRow, now: i64) -> SessionStatus {
        if row.completed_at.is_some() {
            SessionStatus::Completed
        } else if row.closed_at.is_some() {
            SessionStatus::Closed
        } else if row.expires_at <= now {
            SessionStatus::Expired
        } else {
            SessionStatus::Open
        }
    }
}

/// A session as its readers see it (never the secret).
#[derive(Debug, Clone)]
pub struct CollectSession {
    pub id: String,
    pub tenant: String,
    pub allowed_origin: String,
    pub require_cvc: bool,
    pub token_format: TokenFormat,
    pub reference: Option<String>,
    pub style: CollectStyle,
    pub created_at: i64,
    pub expires_at: i64,
    pub status: SessionStatus,
    /// The checkout server's read of a completed session: its token.
    pub token: Option<TokenInfo>,
}

/// A new session and its client secret (shown this once).
#[derive(Debug)]
pub struct NewCollectSession {
    pub session: CollectSession,
    pub client_secret: ClientSecret,
}

/// What the edge submits for a session.
pub struct Submission {
    pub client_secret: Zeroizing<String>,
    pub card: CardInput,
    /// The buyer's address, as the edge saw it.
    pub buyer: Option<IpAddr>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Submission([REDACTED])")
    }
}

fn session_of(row: &CollectSessionRow, now: i64) -> Result<CollectSession, VaultError> {
    let style = match &row.style {
        Some(json) => serde_json::from_str(json).map_err(|_| VaultError::Integrity)?,
        None => CollectStyle::default(),
    };
    Ok(CollectSession {
        id: row.id.clone(),
        tenant: row.tenant.clone(),
        allowed_origin: row.allowed_origin.clone(),
        require_cvc: row.require_cvc,
        token_format: TokenFormat::parse(&row.token_format).ok_or(VaultError::Integrity)?,
        reference: row.reference.clone(),
        style,
        created_at: row.created_at,
        expires_at: row.expires_at,
        status: SessionStatus::of(row, now),
        token: None,
    })
}

fn valid_reference(r: &str) -> bool {
    let n = r.chars().count();
    (1..=64).contains(&n)
        && !r.trim().is_empty()
        && !r.chars().any(char::is_control)
        && !contains_pan_like(r)
}

impl Vault {
    /// Open a collection session for one buyer (role `tokenize`, on a
    /// tenant the caller may use).
    pub async fn create_collect_session(
        &self,
        ctx: &RequestContext,
        input: CollectSessionInput,
    ) -> Result<NewCollectSession, VaultError> {
        self.require_role(ctx, Action::CollectSessionCreated, &[Role::Tokenize])
            .await?;
        let base = ctx.event(Action::CollectSessionCreated, Outcome::Success);
        let Ok(tenant) = Tenant::parse(&input.tenant) else {
            return Err(self.fail(base, VaultError::InvalidTenant).await);
        };
        let base = base.tenant(tenant.as_str());
        if !ctx.principal.tenants.allows(tenant.as_str()) {
            self.deny(
                ctx,
                Action::CollectSessionCreated,
                Some(tenant.as_str()),
                None,
                "tenant_not_permitted",
            )
            .await?;
        }
        // An origin is written into the audit trail: no card number in it.
        let origin = match Origin::parse(&input.allowed_origin, self.collect_http_loopback) {
            Ok(o) if !contains_pan_like(o.as_str()) => o,
            Ok(_) => return Err(self.fail(base, OriginError::Shape.into()).await),
            Err(e) => return Err(self.fail(base, e.into()).await),
        };
        let ttl = input.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
        if !(1..=MAX_TTL_SECS).contains(&ttl) {
            return Err(self.fail(base, VaultError::InvalidTtl).await);
        }
        if input
            .reference
            .as_deref()
            .is_some_and(|r| !valid_reference(r))
        {
            return Err(self.fail(base, VaultError::InvalidReference).await);
        }
        let style = input.style.unwrap_or_default();
        if let Err(field) = style.check() {
            return Err(self.fail(base, VaultError::InvalidStyle(field)).await);
        }
        let policy = self.tenants.for_use(tenant.as_str()).await?;
        if policy.deleted_at.is_some() {
            return Err(self.fail(base, VaultError::TenantDeleted).await);
        }
        if input.token_format == TokenFormat::PanShaped && !policy.pan_shaped {
            return Err(self
                .fail(
                    base.detail("pan_shaped"),
                    VaultError::TokenFormatNotPermitted,
                )
                .await);
        }
        let id = SessionId::generate().map_err(|_| VaultError::Rng)?;
        let secret = ClientSecret::generate().map_err(|_| VaultError::Rng)?;
        let now = now_millis();
        let row = CollectSessionRow {
            id: id.as_str().to_owned(),
            tenant: tenant.as_str().to_owned(),
            allowed_origin: origin.as_str().to_owned(),
            secret_hash: ClientSecret::hash(secret.expose()),
            require_cvc: input.require_cvc,
            token_format: input.token_format.as_str().to_owned(),
            reference: input.reference,
            style: (!style.is_empty())
                .then(|| serde_json::to_string(&style))
                .transpose()
                .map_err(|_| VaultError::Integrity)?,
            created_at: now,
            expires_at: now + ttl * 1000,
            failures: 0,
            closed_at: None,
            completed_at: None,
            token: None,
            claimed_until: None,
        };
        let event = base.detail(format!(
            "session {} origin {} ttl_s {ttl}{}",
            row.id,
            row.allowed_origin,
            if row.require_cvc { " cvc" } else { "" }
        ));
        self.store.insert_collect_session(&row, event).await?;
        Ok(NewCollectSession {
            session: session_of(&row, now)?,
            client_secret: secret,
        })
    }

    /// The checkout server's read of a session (role `tokenize`, tenant
    /// rules as for tokens): its status and, once completed, its token.
    /// Unknown, malformed and other tenants' sessions are `NotFound`.
    pub async fn collect_session(
        &self,
        ctx: &RequestContext,
        id: &str,
    ) -> Result<CollectSession, VaultError> {
        self.require_role(ctx, Action::MetadataRead, &[Role::Tokenize])
            .await?;
        let base = ctx.event(Action::MetadataRead, Outcome::Success);
        let row = match self.find_session(id).await? {
            Some(row) => row,
            None => {
                return Err(self
                    .fail(base.detail("collect_session unknown"), VaultError::NotFound)
                    .await)
            }
        };
        let base = base
            .tenant(row.tenant.clone())
            .detail(format!("collect_session {}", row.id));
        if !ctx.principal.tenants.allows(&row.tenant) {
            let mut ev = base.detail(format!("collect_session {}: tenant_not_permitted", row.id));
            ev.outcome = Outcome::Denied;
            ev.error_code = Some("not_found".to_owned());
            self.write_event(ev).await?;
            return Err(VaultError::NotFound);
        }
        let now = now_millis();
        let mut session = session_of(&row, now)?;
        let mut event = base;
        if let Some(token) = &row.token {
            // The card may have been deleted since: then no token object.
            if let Some(card) = self.store.find_card(token).await? {
                let secret = match self.open_row(&card).await {
                    Ok(s) => s,
                    Err(e) => return Err(self.fail(event.detail("integrity"), e).await),
                };
                let mut info = token_info(&card, secret.expiry, false);
                info.cvc_available = self.cvc.has(&card.token, Instant::now());
                session.token = Some(info);
            }
            event = event.token(token.clone());
        }
        self.write_event(event).await?;
        Ok(session)
    }

    /// A session's public settings, for the edge to serve its form (role
    /// `collect`): origin, style, whether a security code is required,
    /// status. No token, no secret, no card: not audited (a form load is
    /// not an access to card data; submissions are).
    pub async fn collect_session_public(
        &self,
        ctx: &RequestContext,
        id: &str,
    ) -> Result<CollectSession, VaultError> {
        self.require_role(ctx, Action::CollectSubmission, &[Role::Collect])
            .await?;
        let row = self.find_session(id).await?.ok_or(VaultError::NotFound)?;
        if !ctx.principal.tenants.allows(&row.tenant) {
            return Err(VaultError::NotFound);
        }
        session_of(&row, now_millis())
    }

    /// Complete a session with the card the buyer typed (role `collect`):
    /// the token, stored as `POST /v1/tokens` stores it (the security code
    /// held once, as there).
    pub async fn complete_collect_session(
        &self,
        ctx: &RequestContext,
        id: &str,
        submission: Submission,
    ) -> Result<TokenInfo, VaultError> {
        self.require_role(ctx, Action::CollectSubmission, &[Role::Collect])
            .await?;
        let buyer = submission
            .buyer
            .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        let base = ctx.event(Action::CollectSubmission, Outcome::Success);
        let Some(row) = self.find_session(id).await? else {
            return Err(self
                .fail(
                    base.detail(format!("collect_session unknown; buyer {buyer}")),
                    VaultError::NotFound,
                )
                .await);
        };
        let base = base
            .tenant(row.tenant.clone())
            .detail(format!("collect_session {}; buyer {buyer}", row.id));
        if !ctx.principal.tenants.allows(&row.tenant) {
            let mut ev = base;
            ev.outcome = Outcome::Denied;
            ev.error_code = Some("not_found".to_owned());
            self.write_event(ev).await?;
            return Err(VaultError::NotFound);
        }
        if !ClientSecret::matches(&submission.client_secret, &row.secret_hash) {
            return Err(self
                .refuse_submission(&row, base, VaultError::WrongSecret, false)
                .await);
        }
        let now = now_millis();
        match SessionStatus::of(&row, now) {
            SessionStatus::Completed => return self.retry(&row, base, &submission.card).await,
            SessionStatus::Closed => return Err(self.fail(base, VaultError::SessionClosed).await),
            SessionStatus::Expired => {
                return Err(self.fail(base, VaultError::SessionExpired).await)
            }
            SessionStatus::Open => {}
        }
        if row.require_cvc && submission.card.cvc.is_none() {
            return Err(self
                .refuse_submission(&row, base, VaultError::InvalidCard(CardError::Cvc), false)
                .await);
        }
        // One submission at a time: a concurrent one with another card is
        // refused before its card is stored.
        let now = now_millis();
        if !self
            .store
            .claim_collect_session(&row.id, now, now + CLAIM_MS)
            .await?
        {
            return match self.find_session(&row.id).await? {
                Some(r) if r.completed_at.is_some() => self.retry(&r, base, &submission.card).await,
                _ => Err(self.fail(base, VaultError::SessionBusy).await),
            };
        }
        let options = TokenizeOptions {
            format: TokenFormat::parse(&row.token_format).ok_or(VaultError::Integrity)?,
            expires_at: None,
        };
        let card = submission.card;
        let result = self
            .tokenize_authorized(ctx, &row.tenant, vec![card], false, options)
            .await;
        let info = match result.map(|mut r| r.pop()) {
            Ok(Some(Ok(info))) => info,
            Ok(Some(Err(card_error))) => {
                return Err(self
                    .refuse_submission(&row, base, card_error.into(), true)
                    .await)
            }
            Ok(None) => return Err(VaultError::Integrity),
            Err(e) => return Err(e),
        };
        self.write_event(base.clone().token(info.token.clone()))
            .await?;
        let completed = AuditEvent {
            action: Action::CollectSessionCompleted,
            ..base.clone().token(info.token.clone())
        };
        if self
            .store
            .complete_collect_session(&row.id, &info.token, now_millis(), completed)
            .await?
        {
            return Ok(info);
        }
        // Expired (or the hold ran out and another submission completed it)
        // while this card was tokenized: the card is stored, but this
        // submission did not complete the session.
        let now = now_millis();
        match self.find_session(&row.id).await? {
            Some(r) if r.token.as_deref() == Some(info.token.as_str()) => Ok(info),
            Some(r) => Err(match SessionStatus::of(&r, now) {
                SessionStatus::Closed => VaultError::SessionClosed,
                SessionStatus::Expired => VaultError::SessionExpired,
                _ => VaultError::SessionCompleted,
            }),
            None => Err(VaultError::SessionExpired),
        }
    }

    /// Delete sessions a day past their expiry, in batches; audited with
    /// the counts (`collect_sessions_expired`). Returns (completed, never
    /// completed).
    pub async fn purge_collect_sessions(&self, actor: &str) -> Result<(u64, u64), VaultError> {
        let before = now_millis() - KEEP_AFTER_EXPIRY_MS;
        let actor = actor.to_owned();
        let event = move |completed: u64, open: u64| {
            AuditEvent::new(Action::CollectSessionsExpired, Outcome::Success)
                .source(actor.clone())
                .detail(format!("completed={completed} not_completed={open}"))
        };
        let mut total = (0, 0);
        loop {
            let (c, o) = self
                .store
                .purge_collect_sessions(before, PURGE_BATCH, &event)
                .await?;
            total = (total.0 + c, total.1 + o);
            if c + o < u64::from(PURGE_BATCH) {
                return Ok(total);
            }
        }
    }

    async fn find_session(&self, id: &str) -> Result<Option<CollectSessionRow>, VaultError> {
        let Some(id) = SessionId::parse(id) else {
            return Ok(None);
        };
        Ok(self.store.find_collect_session(id.as_str()).await?)
    }

    /// A submission to a completed session: the same card answers the
    /// session's token again (a retry after a lost answer); another card is
    /// refused, and nothing is stored.
    async fn retry(
        &self,
        row: &CollectSessionRow,
        base: AuditEvent,
        card: &CardInput,
    ) -> Result<TokenInfo, VaultError> {
        let stored = match &row.token {
            Some(token) => self.store.find_card(token).await?,
            None => None,
        };
        let (Some(stored), Ok((submitted, _))) = (stored, validate(card)) else {
            return Err(self.fail(base, VaultError::SessionCompleted).await);
        };
        let secret = match self.open_row(&stored).await {
            Ok(s) => s,
            Err(e) => return Err(self.fail(base.detail("integrity"), e).await),
        };
        let same = bool::from(
            secret
                .pan
                .expose_digits()
                .as_bytes()
                .ct_eq(submitted.pan.expose_digits().as_bytes()),
        ) && secret.expiry == submitted.expiry;
        if !same {
            return Err(self.fail(base, VaultError::SessionCompleted).await);
        }
        self.write_event(base.token(stored.token.clone()).detail(format!(
            "collect_session {}: retry of the completed submission",
            row.id
        )))
        .await?;
        let mut info = token_info(&stored, secret.expiry, false);
        info.cvc_available = self.cvc.has(&stored.token, Instant::now());
        Ok(info)
    }

    /// A refused submission of an open session: counted (the session closes
    /// at the limit) and audited in one transaction. `held`: it had claimed
    /// the session, and lets go of it (a refusal before claiming leaves
    /// another submission's claim alone).
    async fn refuse_submission(
        &self,
        row: &CollectSessionRow,
        base: AuditEvent,
        err: VaultError,
        held: bool,
    ) -> VaultError {
        let mut event = base;
        event.outcome = if matches!(err, VaultError::WrongSecret) {
            Outcome::Denied
        } else {
            Outcome::Failure
        };
        event.error_code = Some(err.code().to_owned());
        match self
            .store
            .fail_collect_session(
                &row.id,
                self.collect_max_failures,
                now_millis(),
                held,
                event,
            )
            .await
        {
            Ok(Some(n)) if n >= i64::from(self.collect_max_failures) => {
                tracing::warn!(
                    failures = n,
                    "collection session closed after too many refused submissions"
                );
                err
            }
            Ok(_) => err,
            Err(e) => e.into(),
        }
    }
}
