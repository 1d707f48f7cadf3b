//! Tokenize: one card ([`Vault::tokenize`]) or a batch of up to
//! [`MAX_BATCH`] for one tenant in one transaction
//! ([`Vault::tokenize_many`]), and `_with` a token format and expiry. Owns
//! the input type ([`CardInput`]) and its validation, sealing new records
//! under the active keys, and drawing free pan-shaped tokens. A card that
//! is already stored keeps its token (see `update` for what happens when
//! the offered card is newer).

use std::time::Instant;

use audit::{Action, AuditEvent, Outcome};
use zeroize::Zeroizing;

use super::{token_info, CardError, RequestContext, TokenInfo, Vault, VaultError};
use crate::access::Role;
use crate::card::{pan_shaped_space, CardholderName, Expiry, Tenant, Token, TokenFormat};
use crate::crypto::{CardSecret, RecordAad};
use crate::cvc::Cvc;
use crate::pan::{Pan, PanError};
use crate::store::{now_millis, CardRow, NewCard, StoreError, TenantRow};

/// Most cards in one batch call.
pub const MAX_BATCH: usize = 1000;

/// Taken pan-shaped draws in a row before the space is counted.
const PAN_SHAPED_PATIENCE: u32 = 8;
/// The share of a pan-shaped space that counts as used up.
const PAN_SHAPED_FULL: f64 = 0.9;

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

impl std::fmt::Debug for CardInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardInput([REDACTED])")
    }
}

impl Vault {
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
        self.tokenize_authorized(ctx, tenant, cards, batch, options)
            .await
    }

    /// Tokenize for a caller whose role was checked: by `tokenize_batch`,
    /// or by a collection session the edge completes (role `collect`). The
    /// caller's tenants are checked here.
    pub(crate) async fn tokenize_authorized(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        cards: Vec<CardInput>,
        batch: bool,
        options: TokenizeOptions,
    ) -> Result<Vec<Result<TokenInfo, CardError>>, VaultError> {
        let validated = cards.iter().map(validate).collect();
        self.tokenize_validated(ctx, tenant, validated, batch, options)
            .await
    }

    /// [`Vault::tokenize_authorized`] of cards already validated (a card
    /// number found in a forwarded call's answer has no expiry to
    /// validate).
    pub(crate) async fn tokenize_validated(
        &self,
        ctx: &RequestContext,
        tenant: &str,
        cards: Vec<Result<(CardSecret, Option<Cvc>), CardError>>,
        batch: bool,
        options: TokenizeOptions,
    ) -> Result<Vec<Result<TokenInfo, CardError>>, VaultError> {
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
        for validated in cards {
            match validated {
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
}

pub(super) fn validate(input: &CardInput) -> Result<(CardSecret, Option<Cvc>), CardError> {
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
    Ok((
        CardSecret {
            pan,
            expiry: Some(expiry),
            name,
        },
        cvc,
    ))
}
