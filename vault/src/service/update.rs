//! Changing and deleting a stored card: [`Vault::update`] (PATCH of the
//! expiry or cardholder name), the update of a card tokenized again with a
//! newer expiry or another name (`update_if_newer`, called by tokenize),
//! both resealing the record under the active DEK with the same token, and
//! [`Vault::delete`]. Owns [`CardUpdate`].

use std::time::Instant;

use audit::{Action, Outcome};
use zeroize::Zeroizing;

use super::{token_info, KeyLifecycleError, RequestContext, TokenInfo, Vault, VaultError};
use crate::access::Role;
use crate::card::{CardholderName, Expiry};
use crate::crypto::{CardSecret, RecordAad};
use crate::store::{now_millis, CardRow, StoreError};

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

impl Vault {
    /// A card tokenized again: if it is newer (a later expiry, or the same
    /// expiry and another cardholder name), the stored record is resealed
    /// with it (the token stays; audited `card_updated`). An older expiry
    /// never replaces a later one. Returns the row, the expiry now stored
    /// and whether it changed.
    pub(super) async fn update_if_newer(
        &self,
        ctx: &RequestContext,
        row: CardRow,
        offered: &CardSecret,
    ) -> Result<(CardRow, Option<Expiry>, bool), VaultError> {
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
            // A card with no known expiry takes a whole one (month and year).
            (month, year) => match Expiry::new(
                month
                    .or(stored.expiry.map(|e| i64::from(e.month())))
                    .unwrap_or(0),
                year.or(stored.expiry.map(|e| i64::from(e.year())))
                    .unwrap_or(0),
            ) {
                Ok(e) => Some(e),
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
}
