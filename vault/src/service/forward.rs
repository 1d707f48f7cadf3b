//! Releasing cards to the forwarding proxy (issue 18): the card data a
//! forwarded call's placeholders name, for a principal with the role
//! `forward`, under the detokenize rate limits and anomaly rule (a token
//! revealed to an upstream counts as a detokenize), and the two events of
//! the call: `forward` before anything leaves (written or nothing is
//! released), `forward_completed` after the upstream answered or failed.
//!
//! Invariants: every token is checked (known, not expired, of the
//! principal's tenants, of a tenant the upstream serves, all of one tenant)
//! before any card is opened; security codes are taken last, after every
//! other check, and put back if the release fails; no card value is in an
//! event or an error.

use std::time::Instant;

use audit::{Action, Outcome};

use super::{RequestContext, Vault, VaultError};
use crate::access::Role;
use crate::crypto::CardSecret;
use crate::cvc::Cvc;
use crate::monitor::{DetokenizeMonitor, LimitScope};
use crate::store::now_millis;

/// At most this many distinct tokens in one forwarded call.
pub const MAX_FORWARD_TOKENS: usize = 20;

/// Where the call goes (for the events and the tenant rule).
#[derive(Debug, Clone, Copy)]
pub struct ForwardTarget<'a> {
    pub upstream: &'a str,
    /// The path pattern the call matched (never the raw path: it may carry
    /// an identifier of the caller's choosing).
    pub path_pattern: &'a str,
    /// The tenants the upstream serves; `None`: every tenant.
    pub tenants: Option<&'a [String]>,
}

/// One token of the call, and whether its security code is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub token: String,
    pub cvc: bool,
}

/// One released card.
#[derive(Debug)]
pub struct Released {
    /// The token as stored (the canonical form of the one asked for).
    pub token: String,
    pub asked: String,
    pub card: CardSecret,
    pub cvc: Option<Cvc>,
}

/// What a call may put into its request.
#[derive(Debug)]
pub struct ForwardRelease {
    /// The one tenant of every token: the tenant of the tokens replacing
    /// card numbers in the answer.
    pub tenant: String,
    pub cards: Vec<Released>,
}

/// How the call ended, for `forward_completed`.
#[derive(Debug, Clone, Default)]
pub struct ForwardOutcome {
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    /// The stable code of the failure (`upstream_timeout`, ...), if any.
    pub error_code: Option<&'static str>,
    pub elapsed_ms: u64,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    /// SHA-256 (hex) of the upstream's certificate.
    pub certificate_sha256: Option<String>,
    /// Card numbers in the answer replaced by tokens.
    pub retokenized: usize,
}

impl Vault {
    /// Check and open the cards of a forwarded call, record the `forward`
    /// event, and hand them over. Nothing is released if any token is
    /// refused or the event cannot be written.
    pub async fn forward_release(
        &self,
        ctx: &RequestContext,
        target: ForwardTarget<'_>,
        wanted: &[Wanted],
        monitor: &DetokenizeMonitor,
    ) -> Result<ForwardRelease, VaultError> {
        self.require_role(ctx, Action::Forward, &[Role::Forward])
            .await?;
        let base = ctx.event(Action::Forward, Outcome::Failure).detail(format!(
            "upstream {} path {}",
            target.upstream, target.path_pattern
        ));
        if wanted.is_empty() || wanted.len() > MAX_FORWARD_TOKENS {
            return Err(self.fail(base, VaultError::TooManyTokens).await);
        }
        let principal_id = ctx.principal.id.as_str();
        let mut rows = Vec::with_capacity(wanted.len());
        let mut tenant: Option<String> = None;
        for w in wanted {
            if let Err(wait) = self.admit_principal(monitor, principal_id).await? {
                let ev = ctx.event(Action::Forward, Outcome::Denied);
                return Err(self.rate_limited(ev, LimitScope::Principal, wait).await);
            }
            let row = self.lookup(ctx, Action::Forward, &w.token).await?;
            if target.tenants.is_some_and(|t| !t.contains(&row.tenant)) {
                let mut ev = base
                    .clone()
                    .tenant(row.tenant.clone())
                    .token(row.token.clone())
                    .error_code("tenant_not_allowed");
                ev.outcome = Outcome::Denied;
                return Err(self.fail(ev, VaultError::UpstreamTenant).await);
            }
            match &tenant {
                None => tenant = Some(row.tenant.clone()),
                Some(t) if *t != row.tenant => {
                    let ev = base.clone().tenant(t.clone()).error_code("mixed_tenants");
                    return Err(self.fail(ev, VaultError::MixedTenants).await);
                }
                Some(_) => {}
            }
            if let Err(wait) = self
                .admit_tenant(monitor, &row.tenant, principal_id)
                .await?
            {
                let ev = ctx
                    .event(Action::Forward, Outcome::Denied)
                    .tenant(row.tenant.clone())
                    .token(row.token.clone());
                return Err(self.rate_limited(ev, LimitScope::Tenant, wait).await);
            }
            if w.cvc && !self.cvc.has(&row.token, Instant::now()) {
                let ev = base
                    .clone()
                    .tenant(row.tenant.clone())
                    .token(row.token.clone())
                    .error_code("cvc_unavailable");
                return Err(self.fail(ev, VaultError::CvcUnavailable).await);
            }
            rows.push((w, row));
        }
        let Some(tenant) = tenant else {
            return Err(self.fail(base, VaultError::TooManyTokens).await);
        };
        let mut cards = Vec::with_capacity(rows.len());
        for (w, row) in &rows {
            let card = match self.open_row(row).await {
                Ok(card) => card,
                Err(e) => {
                    let ev = base.clone().tenant(tenant.clone()).token(row.token.clone());
                    return Err(self.fail(ev.detail("integrity"), e).await);
                }
            };
            cards.push(Released {
                token: row.token.clone(),
                asked: w.token.clone(),
                card,
                cvc: None,
            });
        }
        // Security codes last: taken only once every other check passed,
        // put back if one is gone meanwhile or the event cannot be written.
        let now = Instant::now();
        for ((w, row), released) in rows.iter().zip(cards.iter_mut()) {
            if w.cvc {
                match self.cvc.take(&row.token, now) {
                    Some(c) => released.cvc = Some(c),
                    None => {
                        self.put_back(&mut cards, now);
                        let ev = base
                            .clone()
                            .tenant(tenant.clone())
                            .error_code("cvc_unavailable");
                        return Err(self.fail(ev, VaultError::CvcUnavailable).await);
                    }
                }
            }
        }
        let tokens: Vec<&str> = cards.iter().map(|c| c.token.as_str()).collect();
        let released_cvcs = cards.iter().filter(|c| c.cvc.is_some()).count();
        let mut event = base.clone().tenant(tenant.clone()).detail(format!(
            "upstream {} path {} tokens {}{}",
            target.upstream,
            target.path_pattern,
            tokens.join(","),
            if released_cvcs > 0 {
                format!(" cvc_released {released_cvcs}")
            } else {
                String::new()
            }
        ));
        if let Some(first) = tokens.first() {
            event = event.token(*first);
        }
        event.outcome = Outcome::Success;
        let (written, ()) =
            tokio::join!(self.write_event(event), self.touch(&tokens, now_millis()));
        if let Err(e) = written {
            self.put_back(&mut cards, now);
            return Err(e.into());
        }
        for c in &cards {
            self.observe_reveal(ctx, monitor, &tenant, &c.token).await?;
        }
        Ok(ForwardRelease { tenant, cards })
    }

    /// A release whose request was never sent (its body could not be
    /// rendered): the security codes go back to the holder.
    pub fn forward_return_cvcs(&self, release: &mut ForwardRelease) {
        self.put_back(&mut release.cards, Instant::now());
    }

    /// The token for a card number found in a forwarded call's answer, in
    /// the call's tenant, through the tokenize path: a card the tenant
    /// holds gives its existing token (its stored expiry and name stay);
    /// another is stored with no expiry known (a later tokenize of the same
    /// card with an expiry fills it in). Audited as a `tokenize` of the
    /// forwarding principal, in the tenant its tokens were checked for.
    pub async fn forward_tokenize(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        pan: &crate::pan::Pan,
    ) -> Result<crate::card::Token, VaultError> {
        self.require_role(ctx, Action::Forward, &[Role::Forward])
            .await?;
        let secret = CardSecret {
            pan: crate::pan::Pan::parse(pan.expose_digits()).map_err(|_| VaultError::Integrity)?,
            expiry: None,
            name: None,
        };
        let out = self
            .tokenize_validated(
                ctx,
                tenant,
                vec![Ok((secret, None))],
                false,
                super::TokenizeOptions::default(),
            )
            .await?;
        let info = out
            .into_iter()
            .next()
            .ok_or(VaultError::Integrity)?
            .map_err(VaultError::InvalidCard)?;
        crate::card::Token::parse(&info.token).ok_or(VaultError::Integrity)
    }

    fn put_back(&self, cards: &mut [Released], now: Instant) {
        for c in cards.iter_mut() {
            if let Some(cvc) = c.cvc.take() {
                // Best effort: the holder refuses only when its random
                // source fails, and then the code is gone as if used.
                let _ = self.cvc.put(&c.token, cvc, now);
            }
        }
    }

    /// Record how a released call ended (`forward_completed`).
    pub async fn forward_completed(
        &self,
        ctx: &RequestContext,
        target: ForwardTarget<'_>,
        tenant: &str,
        outcome: &ForwardOutcome,
    ) -> Result<(), VaultError> {
        let ok = outcome.error_code.is_none();
        let mut event = ctx
            .event(
                Action::ForwardCompleted,
                if ok { Outcome::Success } else { Outcome::Failure },
            )
            .tenant(tenant)
            .detail(format!(
                "upstream {} path {} status {} ms {} sent {} received {} certificate_sha256 {} retokenized {}",
                target.upstream,
                target.path_pattern,
                outcome.status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
                outcome.elapsed_ms,
                outcome.bytes_sent,
                outcome.bytes_received,
                outcome.certificate_sha256.as_deref().unwrap_or("-"),
                outcome.retokenized,
            ));
        if let Some(code) = outcome.error_code {
            event = event.error_code(code);
        }
        self.write_event(event).await?;
        Ok(())
    }
}
