//! Reading a stored card back: [`Vault::detokenize`] (the card itself, for
//! the reveal listener; with [`Vault::detokenize_monitored`] under the
//! per-instance rate limits and anomaly rule, and the security code released
//! once) and [`Vault::metadata`] (what may be shown in clear). Both look the
//! token up without an oracle, open the record (the expiry is inside the
//! ciphertext) and write their audit event before anything is returned.

use std::time::Instant;

use audit::{Action, AuditEvent, Outcome};

use super::{token_info, RequestContext, TokenInfo, Vault, VaultError};
use crate::access::Role;
use crate::card::{Token, TokenFormat};
use crate::crypto::CardSecret;
use crate::cvc::Cvc;
use crate::monitor::{DetokenizeMonitor, LimitScope};
use crate::pan::contains_pan_like;
use crate::store::now_millis;

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

impl Vault {
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
        if let Some(monitor) = monitor {
            self.observe_reveal(ctx, monitor, &row.tenant, &row.token)
                .await?;
        }
        let cvc_available = self.cvc.has(&row.token, Instant::now());
        Ok(Detokenized {
            token: row.token,
            card,
            cvc,
            cvc_available,
        })
    }

    /// Count a revealed token (a detokenize, or a card put into a
    /// forwarded call) for the anomaly rule; when it fires, a warning and a
    /// `detokenize_anomaly` event (counts only).
    pub(super) async fn observe_reveal(
        &self,
        ctx: &RequestContext,
        monitor: &DetokenizeMonitor,
        tenant: &str,
        token: &str,
    ) -> Result<(), VaultError> {
        let Some(anomaly) = monitor.observe(ctx.principal.id.as_str(), token, Instant::now())
        else {
            return Ok(());
        };
        tracing::warn!(
            principal = %ctx.principal.name,
            tenant = %tenant,
            request_id = %ctx.request_id,
            distinct_tokens = anomaly.distinct,
            threshold = anomaly.threshold,
            baseline = anomaly.baseline,
            window_s = anomaly.window.as_secs(),
            "detokenize anomaly: a principal revealed many more distinct tokens than its baseline"
        );
        let ev = ctx
            .event(Action::DetokenizeAnomaly, Outcome::Success)
            .tenant(tenant)
            .token(token)
            .detail(anomaly.detail());
        self.write_event(ev).await?;
        Ok(())
    }

    /// Record a reveal (detokenize or forward) refused by a rate limit and
    /// return its error.
    pub(super) async fn rate_limited(
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
}

fn valid_reason(reason: &str) -> bool {
    let n = reason.chars().count();
    (1..=256).contains(&n)
        && !reason.trim().is_empty()
        && reason.chars().all(|c| !c.is_control())
        && !contains_pan_like(reason)
}
