//! The audit trail for auditors: [`Vault::audit_query`] (filters, time
//! range, cursor; the query itself is audited) and
//! [`Vault::audit_checkpoints`], and for the service the signing of
//! checkpoints ([`Vault::checkpoint`]), the chain's size and the auditors'
//! verification key. Owns [`AuditQuery`] and [`AuditPage`].

use audit::{Action, Outcome};

use super::{RequestContext, Vault, VaultError};
use crate::access::{Role, TenantScope};
use crate::card::{Tenant, Token, TokenFormat};
use crate::store::AuditFilter;

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

impl Vault {
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

    /// Sign a checkpoint of the audit trail if it grew since the last one,
    /// with the signing key in use. If another instance rotated it (the
    /// store refuses a retired key), the new key is loaded and signs.
    pub async fn checkpoint(&self) -> Result<Option<audit::Checkpoint>, VaultError> {
        match self
            .store
            .write_checkpoint(&self.keys.audit_signing_key())
            .await
        {
            Err(crate::store::StoreError::StaleKeys) => {
                self.refresh_keys().await?;
                Ok(self
                    .store
                    .write_checkpoint(&self.keys.audit_signing_key())
                    .await?)
            }
            other => Ok(other?),
        }
    }

    /// Number of entries in the audit chain.
    pub async fn audit_size(&self) -> Result<u64, VaultError> {
        Ok(self.store.audit_size().await?)
    }

    /// The auditors' verification key (`cardvault-audit-ed25519:<hex>`) of
    /// the signing key in use.
    pub fn audit_public_key(&self) -> String {
        self.keys.audit_public_key()
    }

    /// Every signing key generation's public key line, oldest first (what
    /// `<data-dir>/audit-verify.pub` holds: a keys file for `vault-audit`).
    pub fn audit_public_keys(&self) -> Vec<String> {
        self.keys.signing().public_keys.clone()
    }
}
