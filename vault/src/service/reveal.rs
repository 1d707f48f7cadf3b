//! Reading a stored card back: [`Vault::detokenize`] (the card itself, for
//! the reveal listener; with [`Vault::detokenize_monitored`] under the
//! per-instance rate limits and anomaly rule, and the security code released
//! once) and [`Vault::metadata`] (what may be shown in clear). Both look the
//! token up without an oracle, open the record (the expiry is inside the
//! ciphertext) and write their audit event before anything is returned.

use std::time::{Duration, Instant};

use audit::{Action, AuditEvent, Outcome};

use super::{token_info, RequestContext, TokenInfo, Vault, VaultError};
use crate::access::Role;
use crate::card::{Token, TokenFormat};
use crate::crypto::CardSecret;
use crate::cvc::Cvc;
use crate::monitor::{Anomaly, DetokenizeMonitor, LimitScope};
use crate::pan::contains_pan_like;
use crate::store::now_millis;
use sha2::{Digest, Sha256};

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
        let admitted = match monitor {
            Some(m) => self.admit_principal(m, principal_id).await?,
            None => Ok(()),
        };
        if let Err(wait) = admitted {
            let mut ev = ctx.event(Action::Detokenize, Outcome::Denied);
            // Not looked up yet: only a random token is recorded (see
            // `lookup`).
            if let Some(t) = Token::parse(token).filter(|t| t.format() == TokenFormat::Random) {
                ev = ev.token(t.as_str());
            }
            return Err(self.rate_limited(ev, LimitScope::Principal, wait).await);
        }
        let row = self.lookup(ctx, Action::Detokenize, token).await?;
        let admitted = match monitor {
            Some(m) => self.admit_tenant(m, &row.tenant, principal_id).await?,
            None => Ok(()),
        };
        if let Err(wait) = admitted {
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

    /// Take a detokenize token of the principal's rate limit: from the
    /// bucket every instance shares when the store keeps one (PostgreSQL),
    /// else from this instance's. `Err(wait)`: refused (counted).
    pub(super) async fn admit_principal(
        &self,
        monitor: &DetokenizeMonitor,
        principal_id: &str,
    ) -> Result<Result<(), Duration>, VaultError> {
        self.admit(monitor, LimitScope::Principal, principal_id)
            .await
            .map(|shared| {
                shared.unwrap_or_else(|| monitor.admit_principal(principal_id, Instant::now()))
            })
    }

    /// The tenant's rate limit, as [`Vault::admit_principal`]; a refusal
    /// gives the principal's token back (the request did not happen).
    pub(super) async fn admit_tenant(
        &self,
        monitor: &DetokenizeMonitor,
        tenant: &str,
        principal_id: &str,
    ) -> Result<Result<(), Duration>, VaultError> {
        match self.admit(monitor, LimitScope::Tenant, tenant).await? {
            Some(Ok(())) => Ok(Ok(())),
            Some(Err(wait)) => {
                let rate = monitor.rate(LimitScope::Principal);
                if !rate.is_off() {
                    self.store
                        .give_back_shared_rate(LimitScope::Principal.as_str(), principal_id, rate)
                        .await?;
                }
                Ok(Err(wait))
            }
            None => Ok(monitor.admit_tenant(tenant, principal_id, Instant::now())),
        }
    }

    /// The shared bucket's answer, None when the store keeps none (or the
    /// scope has no limit: then nothing is asked and the local check
    /// admits at once).
    async fn admit(
        &self,
        monitor: &DetokenizeMonitor,
        scope: LimitScope,
        key: &str,
    ) -> Result<Option<Result<(), Duration>>, VaultError> {
        let rate = monitor.rate(scope);
        if rate.is_off() {
            return Ok(None);
        }
        let decision = self
            .store
            .take_shared_rate(scope.as_str(), key, rate)
            .await?;
        if let Some(Err(_)) = decision {
            monitor.count_limited(scope);
        }
        Ok(decision)
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
        let principal_id = ctx.principal.id.as_str();
        let fired = match self.observe_shared(monitor, principal_id, token).await? {
            Some(shared) => shared,
            None => monitor.observe(principal_id, token, Instant::now()),
        };
        let Some(anomaly) = fired else {
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

    /// The anomaly rule over the counts every instance shares (PostgreSQL):
    /// `None` when the store shares none (the in-memory rule decides),
    /// `Some(None)` when the rule does not fire (or another instance fired
    /// it for this window), `Some(Some(anomaly))` for the one instance that
    /// claimed the window. Counted in the monitor's anomaly counter.
    async fn observe_shared(
        &self,
        monitor: &DetokenizeMonitor,
        principal_id: &str,
        token: &str,
    ) -> Result<Option<Option<Anomaly>>, VaultError> {
        let rule = monitor.anomaly_rule();
        if rule.is_off() {
            return Ok(Some(None));
        }
        if !self.store.shared_monitoring() {
            return Ok(None);
        }
        let digest = Sha256::digest(token.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let hash = i64::from_be_bytes(first);
        let thresholds = monitor.shared_thresholds();
        if thresholds.already_counted(principal_id, hash, Instant::now()) {
            return Ok(Some(None));
        }
        let Some(seen) = self
            .store
            .record_shared_reveal(principal_id, rule.window_ms(), hash)
            .await?
        else {
            return Ok(None);
        };
        thresholds.note(principal_id, hash, &seen, Instant::now());
        if !seen.new || seen.fired {
            return Ok(Some(None));
        }
        let (threshold, baseline, windows) = match thresholds.get(principal_id, seen.window_start) {
            Some(known) => known,
            None => {
                let keep = i64::from(rule.baseline_windows.max(1));
                let from = seen.window_start - keep * rule.window_ms();
                let history = self
                    .store
                    .shared_anomaly_history(principal_id, from, seen.window_start)
                    .await?;
                let computed = rule.threshold_from(&history, seen.window_start);
                thresholds.put(principal_id, seen.window_start, computed);
                computed
            }
        };
        if seen.distinct <= threshold
            || !self
                .store
                .claim_shared_anomaly(principal_id, seen.window_start)
                .await?
        {
            return Ok(Some(None));
        }
        thresholds.note_fired(principal_id, seen.window_start);
        monitor.count_anomaly();
        Ok(Some(Some(Anomaly {
            distinct: seen.distinct,
            baseline,
            threshold,
            window: rule.window,
            baseline_windows: windows,
        })))
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
