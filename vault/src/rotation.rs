//! Key lifecycle (PCI DSS 3.6/3.7): rotation of the DEK and the fingerprint
//! key, the re-encryption pass, retirement, destruction, KEK rotation and a
//! status report with crypto-periods.
//!
//! - [`Vault::rotate_dek`] adds the next DEK version (wrapped under the KEK)
//!   and, if asked, the next fingerprint key; the keys they replace become
//!   decrypt-only. New records use the new keys from then on (every instance,
//!   after its next [`Vault::refresh_keys`]: until then the store refuses
//!   its inserts as stale and it reloads at once).
//! - [`Vault::reencrypt_batch`] moves records under older keys to the active
//!   ones, one transaction per batch, each row updated only if it is still
//!   under the versions it was read with. There is no cursor to lose: a batch
//!   selects whatever is still under an older key, so a pass killed at any
//!   point leaves every record readable (under its old or its new version)
//!   and the next call simply continues. One `reencryption_started` event is
//!   recorded with the rotation, one `reencryption_finished` when nothing is
//!   left (once, whatever the number of instances: the batch that sets the
//!   active DEK's `reencrypted_at` records it).
//! - While a fingerprint rotation is in progress, tokenization also looks up
//!   the card's fingerprints under the decrypt-only fingerprint keys, in the
//!   same transaction as its insert, so a card tokenized before keeps its
//!   token and never gets a second row (see `Store::insert_cards`).
//! - [`Vault::retire`]: a decrypt-only key no record uses; it is never used
//!   again and is dropped from memory. [`Vault::destroy`]: a retired key's
//!   wrapped material is erased from the database (crypto-shredding): nothing
//!   sealed under it can be opened afterwards, by anyone, with any KEK. On
//!   PostgreSQL the old bytes stay in dead tuples until VACUUM, and backups
//!   taken before hold them (wrapped under the KEK).
//! - [`Vault::rotate_kek`]: every vault key not destroyed and every audit
//!   signing key not destroyed re-wrapped under a new KEK in one
//!   transaction; other instances must be restarted with the new KEK (their
//!   next refresh reports the keys as wrapped by another KEK).
//! - [`Vault::rotate_audit_signing`]: a new Ed25519 checkpoint signing key
//!   (wrapped by the KEK); in one transaction the old generation is retired,
//!   the new one stored, `key_rotated` recorded and the *key announcement*
//!   signed by the old key (a checkpoint of the trail up to that event that
//!   names the new public key; see `audit::checkpoint`). Every later
//!   checkpoint is signed by the new key: a retired key signs nothing (the
//!   store refuses it, so another instance still holding it reloads).
//!   [`Vault::destroy_audit_signing`] erases a retired generation's wrapped
//!   secret; its public key stays, to verify what it signed.

use std::sync::Arc;
use std::time::Duration;

use audit::{Action, AuditEvent, Outcome};
use hsm_shim::KeyEncryptionKey;

use crate::access::Role;
use crate::crypto::{random_key, CardSecret, RecordAad, NONCE_LEN};
use crate::keys::{label, signing_label, KeySet, KeysError};
use crate::pan::contains_pan_like;
use crate::service::{open_with, KeyLifecycleError, RequestContext, Vault, VaultError};
use crate::store::{
    now_millis, CardRow, KeyChange, KeyChangeOutcome, KeyPurpose, KeyState, PassBatch, Resealed,
    StoreError, StoredKey,
};

/// Who runs a key operation: the operator on the host (CLI, the service's
/// own background pass), or an API caller, who needs the `key_admin` role.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    Local,
    Request(&'a RequestContext),
}

/// What a rotation created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub dek_version: u32,
    pub fingerprint_version: u32,
    pub fingerprint_rotated: bool,
}

/// What one re-encryption batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Records moved to the active keys by this batch.
    pub moved: u64,
    /// Records read but not moved (their key is not held, they failed to
    /// open, or another instance moved them first).
    pub skipped: u64,
    /// Records still under an older key: counted at the first batch of an
    /// instance and whenever the end is near (so 0 is always exact); in
    /// between, the last count minus what this instance moved since (at
    /// least 1). See `counted`.
    pub remaining: u64,
    /// `remaining` is an exact count made by this batch (not an estimate).
    pub counted: bool,
    /// This batch finished the pass (and recorded `reencryption_finished`).
    pub finished: bool,
}

/// Where this instance's pass stands: speed hints only (a batch is correct
/// from any starting point and with any estimate).
#[derive(Debug, Default)]
pub(crate) struct PassHint {
    after: Option<i64>,
    remaining: Option<u64>,
}

/// Crypto-periods (PCI DSS 3.6.4): how long a key may be the active one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoPeriods {
    pub dek: Duration,
    pub fingerprint: Duration,
    /// How long an audit signing key may sign.
    pub audit_signing: Duration,
}

impl Default for CryptoPeriods {
    fn default() -> Self {
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        CryptoPeriods {
            dek: YEAR,
            fingerprint: YEAR,
            audit_signing: YEAR,
        }
    }
}

/// One key in [`KeyStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub purpose: KeyPurpose,
    pub version: u32,
    pub state: KeyState,
    /// Unix milliseconds.
    pub created_at: i64,
    pub age: Duration,
    pub crypto_period: Duration,
    /// Older than its crypto-period and still in use (active or
    /// decrypt-only): rotate (or finish the pass and retire it).
    pub past_crypto_period: bool,
    pub retired_at: Option<i64>,
    pub destroyed_at: Option<i64>,
    /// Records under this key (DEK: sealed with it; fingerprint key:
    /// fingerprinted with it).
    pub records: u64,
}

/// One audit signing key generation in [`KeyStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyInfo {
    pub generation: u32,
    /// First 8 bytes of SHA-256 of the public key, hex (in every checkpoint
    /// it signed).
    pub key_id: String,
    /// `cardvault-audit-ed25519:<hex>`.
    pub public_key: String,
    /// `active` (signs), `retired` or `destroyed`.
    pub state: KeyState,
    pub created_at: i64,
    pub age: Duration,
    pub crypto_period: Duration,
    /// The active key is older than its crypto-period: rotate it.
    pub past_crypto_period: bool,
    pub retired_at: Option<i64>,
    pub destroyed_at: Option<i64>,
}

/// What an audit signing key rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningRotation {
    pub generation: u32,
    pub key_id: String,
    pub public_key: String,
    pub previous_key_id: String,
    /// The key announcement: signed by the previous key, naming the new
    /// one. Append it to the witness file.
    pub announcement: audit::Checkpoint,
}

/// Every key and the re-encryption progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub keys: Vec<KeyInfo>,
    /// Audit signing key generations, oldest first.
    pub signing_keys: Vec<SigningKeyInfo>,
    pub active_dek: u32,
    pub active_fingerprint: u32,
    /// Records still under an older DEK or fingerprint key.
    pub remaining: u64,
    /// When the pass to the active DEK finished (None: in progress).
    pub reencrypted_at: Option<i64>,
}

fn conflict(e: StoreError) -> VaultError {
    match e {
        StoreError::Conflict | StoreError::StaleKeys => KeyLifecycleError::Conflict.into(),
        other => VaultError::Storage(other),
    }
}

/// Reseal one record under the active keys: a fresh nonce and the new
/// version in its associated data; the fingerprint recomputed if it is under
/// an older fingerprint key. None if it cannot be opened, or its tenant is
/// deleted or unknown (kept as it is: a deleted tenant's records are being
/// swept, and a missing salt must not yield an unsalted fingerprint).
fn reseal(
    keys: &KeySet,
    salts: &std::collections::HashMap<String, Option<Vec<u8>>>,
    row: &CardRow,
) -> Option<Resealed> {
    let dek = keys.active_dek();
    let fp = keys.fingerprint_key();
    let secret: CardSecret = open_with(keys, row).ok()?;
    let (fingerprint, fingerprint_version) = if row.fingerprint_version < fp.version() {
        let salt = salts.get(&row.tenant)?.as_deref();
        (fp.fingerprint(&row.tenant, salt, &secret.pan), fp.version())
    } else {
        (row.fingerprint.clone(), row.fingerprint_version)
    };
    let (key_version, nonce, ciphertext) = if row.key_version < dek.version() {
        let aad = RecordAad {
            tenant: &row.tenant,
            token: &row.token,
            key_version: dek.version(),
        };
        let sealed = dek.seal(&aad, &secret.encode()).ok()?;
        (dek.version(), sealed.nonce.to_vec(), sealed.ciphertext)
    } else {
        if row.nonce.len() != NONCE_LEN {
            return None;
        }
        (row.key_version, row.nonce.clone(), row.ciphertext.clone())
    };
    Some(Resealed {
        key_version,
        nonce,
        ciphertext,
        fingerprint,
        fingerprint_version,
    })
}

impl Vault {
    /// The audit event of a key operation by `actor`, after checking its role.
    async fn key_event(&self, actor: Actor<'_>, action: Action) -> Result<AuditEvent, VaultError> {
        match actor {
            Actor::Local => Ok(AuditEvent::new(action, Outcome::Success).source("local")),
            Actor::Request(ctx) => {
                self.require_role(ctx, action, &[Role::KeyAdmin]).await?;
                Ok(AuditEvent::new(action, Outcome::Success)
                    .principal(ctx.principal.name.clone())
                    .source(ctx.source.clone())
                    .request_id(ctx.request_id.clone()))
            }
        }
    }

    /// Record a refused key operation and return its error.
    async fn refuse(&self, mut event: AuditEvent, err: KeyLifecycleError) -> VaultError {
        event.outcome = Outcome::Failure;
        event.error_code = Some(err.code().to_owned());
        match self.store.append_audit(event).await {
            Ok(_) => err.into(),
            Err(e) => e.into(),
        }
    }

    /// Make a new DEK version the active one (and, if `rotate_fingerprint`,
    /// a new fingerprint key); the replaced keys become decrypt-only and a
    /// re-encryption pass starts (run it with [`Vault::reencrypt_batch`]).
    /// Audited: `key_rotated` per key and `reencryption_started`, in the same
    /// transaction as the change.
    pub async fn rotate_dek(
        &self,
        actor: Actor<'_>,
        rotate_fingerprint: bool,
    ) -> Result<Rotation, VaultError> {
        let base = self.key_event(actor, Action::KeyRotated).await?;
        self.refresh_keys().await?;
        let keys = self.keys.keys();
        let kek = self.keys.kek();
        let now = now_millis();
        let mut purposes = vec![(KeyPurpose::Dek, keys.active_dek().version())];
        if rotate_fingerprint {
            purposes.push((KeyPurpose::Fingerprint, keys.fingerprint_key().version()));
        }
        let mut rows = Vec::new();
        let mut events = Vec::new();
        for (purpose, active) in purposes {
            let version = active.checked_add(1).ok_or(VaultError::Integrity)?;
            let material = random_key().map_err(|_| VaultError::Rng)?;
            let wrapped = kek
                .wrap(&label(purpose, version), material.as_ref())
                .map_err(|e| VaultError::Keys(KeysError::Generate(e)))?;
            rows.push(StoredKey::new_active(
                purpose,
                version,
                kek.kek_id().to_owned(),
                wrapped,
                now,
            ));
            events.push(base.clone().detail(format!(
                "{} active, {} decrypt_only",
                label(purpose, version),
                label(purpose, active)
            )));
        }
        let rotation = Rotation {
            dek_version: rows[0].version,
            fingerprint_version: rows
                .get(1)
                .map_or(keys.fingerprint_key().version(), |k| k.version),
            fingerprint_rotated: rotate_fingerprint,
        };
        let mut started = base.clone().detail(format!(
            "to {} {}",
            label(KeyPurpose::Dek, rotation.dek_version),
            label(KeyPurpose::Fingerprint, rotation.fingerprint_version)
        ));
        started.action = Action::ReencryptionStarted;
        events.push(started);
        if let Err(e) = self.store.rotate_keys(&rows, events).await {
            let err = conflict(e);
            return Err(match err {
                VaultError::KeyLifecycle(k) => self.refuse(base, k).await,
                other => other,
            });
        }
        self.refresh_keys().await?;
        *self
            .pass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = PassHint::default();
        tracing::info!(
            dek = rotation.dek_version,
            fingerprint = rotation.fingerprint_version,
            "rotated vault keys"
        );
        Ok(rotation)
    }

    /// Move up to `limit` records under older keys to the active ones, in one
    /// transaction. Call until `remaining` is 0 (or nothing moves). Safe to
    /// run on several instances at once and to interrupt at any point.
    pub async fn reencrypt_batch(&self, limit: u32) -> Result<Progress, VaultError> {
        let limit = limit.clamp(1, 100_000);
        let mut attempt = 0;
        let outcome = loop {
            let keys = self.keys.keys();
            let (after, mut estimate) = {
                let hint = self
                    .pass
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                (hint.after, hint.remaining)
            };
            if estimate.is_none() {
                // A first count, outside the batch: on a very large table it
                // may hit the time bound, and the pass must go on without it.
                match self
                    .store
                    .count_outdated(
                        keys.active_dek().version(),
                        keys.fingerprint_key().version(),
                    )
                    .await
                {
                    Ok(n) => estimate = Some(n),
                    Err(e) => {
                        tracing::warn!(error = %e, "counting the records to re-encrypt failed; going on without a count")
                    }
                }
            }
            let batch = PassBatch {
                dek_version: keys.active_dek().version(),
                fingerprint_version: keys.fingerprint_key().version(),
                after,
                limit,
                count: estimate.is_some_and(|r| r <= u64::from(limit)),
                finished_event: AuditEvent::new(Action::ReencryptionFinished, Outcome::Success)
                    .source("local")
                    .detail(format!(
                        "to {} {}",
                        label(KeyPurpose::Dek, keys.active_dek().version()),
                        label(KeyPurpose::Fingerprint, keys.fingerprint_key().version())
                    )),
            };
            let salts = self.tenants.salts().await?;
            let resealer = |row: &CardRow| reseal(&keys, &salts, row);
            match self.store.reencrypt_batch(&batch, &resealer).await {
                Err(StoreError::StaleKeys) if attempt == 0 => {
                    attempt += 1;
                    self.refresh_keys().await?;
                }
                other => break (other?, estimate),
            }
        };
        let (outcome, estimate) = outcome;
        // Not counted: the batch was full and the last count is far from
        // zero; never report 0 without a count.
        let remaining = outcome
            .remaining
            .unwrap_or_else(|| estimate.unwrap_or(1).saturating_sub(outcome.moved).max(1));
        // The hint moves on while batches are full, and wraps around to the
        // start after a short one (rows skipped or added meanwhile are found
        // again).
        *self
            .pass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = PassHint {
            after: if outcome.selected < u64::from(limit) {
                None
            } else {
                outcome.last_seq
            },
            remaining: Some(remaining),
        };
        if outcome.finished {
            tracing::info!("re-encryption pass finished");
        }
        Ok(Progress {
            moved: outcome.moved,
            skipped: outcome.skipped,
            remaining,
            counted: outcome.remaining.is_some(),
            finished: outcome.finished,
        })
    }

    async fn change_state(
        &self,
        actor: Actor<'_>,
        action: Action,
        purpose: KeyPurpose,
        version: u32,
        change: KeyChange,
    ) -> Result<(), VaultError> {
        let event = self
            .key_event(actor, action)
            .await?
            .detail(label(purpose, version));
        let outcome = self
            .store
            .change_key_state(purpose, version, change, now_millis(), event.clone())
            .await?;
        self.finish_key_change(event, outcome).await
    }

    /// After a retirement or destruction: on success the keys in memory
    /// follow the store; a refusal is audited and returned as its error.
    async fn finish_key_change(
        &self,
        event: AuditEvent,
        outcome: KeyChangeOutcome,
    ) -> Result<(), VaultError> {
        let err = match outcome {
            KeyChangeOutcome::Done => {
                self.refresh_keys().await?;
                return Ok(());
            }
            KeyChangeOutcome::NotFound => KeyLifecycleError::NotFound,
            KeyChangeOutcome::Active => KeyLifecycleError::Active,
            KeyChangeOutcome::InUse => KeyLifecycleError::InUse,
            KeyChangeOutcome::WrongState(s) => KeyLifecycleError::WrongState(s),
        };
        Err(self.refuse(event, err).await)
    }

    /// Retire a decrypt-only key that no record uses (`key_active` for the
    /// active key, `key_in_use` while records use it). A retired key is
    /// never used again and is dropped from memory. Audited (`key_retired`).
    pub async fn retire(
        &self,
        actor: Actor<'_>,
        purpose: KeyPurpose,
        version: u32,
    ) -> Result<(), VaultError> {
        self.change_state(
            actor,
            Action::KeyRetired,
            purpose,
            version,
            KeyChange::Retire,
        )
        .await
    }

    /// Destroy a retired key: its wrapped material is erased from the
    /// database (crypto-shredding; nothing sealed under it can be opened
    /// afterwards). Only a retired key (`key_state` otherwise). Audited
    /// (`key_destroyed`).
    pub async fn destroy(
        &self,
        actor: Actor<'_>,
        purpose: KeyPurpose,
        version: u32,
    ) -> Result<(), VaultError> {
        self.change_state(
            actor,
            Action::KeyDestroyed,
            purpose,
            version,
            KeyChange::Destroy,
        )
        .await
    }

    /// Re-wrap every vault key (not destroyed) and every audit signing key
    /// under `new_kek`, in one transaction (`kek_rotated` audited in it);
    /// afterwards this vault uses `new_kek`. The old KEK no longer opens any
    /// stored key.
    pub async fn rotate_kek(
        &self,
        actor: Actor<'_>,
        new_kek: Arc<dyn KeyEncryptionKey>,
    ) -> Result<(), VaultError> {
        let base = self.key_event(actor, Action::KekRotated).await?;
        let old = self.keys.kek();
        if old.kek_id() == new_kek.kek_id() {
            return Err(self.refuse(base, KeyLifecycleError::SameKek).await);
        }
        let unwrap = |label: String, wrapped: &[u8]| {
            old.unwrap(&label, wrapped)
                .map_err(|source| VaultError::Keys(KeysError::Unwrap { label, source }))
        };
        let mut keys = Vec::new();
        for k in self.store.load_keys().await? {
            if k.state == KeyState::Destroyed {
                continue;
            }
            let l = label(k.purpose, k.version);
            let raw = unwrap(l.clone(), &k.wrapped)?;
            let wrapped = new_kek
                .wrap(&l, &raw)
                .map_err(|e| VaultError::Keys(KeysError::Generate(e)))?;
            keys.push(StoredKey {
                wrapped,
                kek_id: new_kek.kek_id().to_owned(),
                ..k
            });
        }
        let mut signing = Vec::new();
        for k in self.store.load_signing_keys().await? {
            // Destroyed: no secret left, only its public key.
            if k.destroyed_at.is_some() {
                continue;
            }
            let l = signing_label(k.generation);
            let raw = unwrap(l.clone(), &k.wrapped)?;
            let wrapped = new_kek
                .wrap(&l, &raw)
                .map_err(|e| VaultError::Keys(KeysError::Generate(e)))?;
            signing.push(crate::store::SigningKeyRow {
                wrapped,
                kek_id: new_kek.kek_id().to_owned(),
                ..k
            });
        }
        let mut detail = format!("vault_keys={} signing_keys={}", keys.len(), signing.len());
        // KEK ids are shown unless they happen to look like a card number
        // (the audit store would refuse the event).
        let ids = format!(" from={} to={}", old.kek_id(), new_kek.kek_id());
        if !contains_pan_like(&ids) {
            detail.push_str(&ids);
        }
        let event = base.clone().detail(detail);
        if let Err(e) = self
            .store
            .rewrap_keys(old.kek_id(), &keys, &signing, event)
            .await
        {
            return Err(match conflict(e) {
                VaultError::KeyLifecycle(k) => self.refuse(base, k).await,
                other => other,
            });
        }
        self.keys.set_kek(new_kek);
        self.refresh_keys().await?;
        tracing::info!("re-wrapped the vault keys under a new KEK");
        Ok(())
    }

    /// Rotate the audit signing key (see the module doc). Audited
    /// (`key_rotated`, detail `audit_signing:N active, audit_signing:N-1
    /// retired`) in the transaction that also stores the announcement.
    pub async fn rotate_audit_signing(
        &self,
        actor: Actor<'_>,
    ) -> Result<SigningRotation, VaultError> {
        let base = self.key_event(actor, Action::KeyRotated).await?;
        self.refresh_keys().await?;
        let current = self.keys.signing();
        let generation = current
            .generation
            .checked_add(1)
            .ok_or(VaultError::Integrity)?;
        let kek = self.keys.kek();
        let key = audit::SigningKey::generate().map_err(|_| VaultError::Rng)?;
        let wrapped = kek
            .wrap(&signing_label(generation), key.expose_secret().as_ref())
            .map_err(|e| VaultError::Keys(KeysError::Generate(e)))?;
        let row = crate::store::SigningKeyRow {
            generation,
            key_id: key.key_id().to_owned(),
            kek_id: kek.kek_id().to_owned(),
            wrapped,
            public_key: key.verifying_key().to_string(),
            created_at: now_millis(),
            retired_at: None,
            destroyed_at: None,
        };
        // Labels, not key ids: 16 hex digits can form a Luhn-valid run,
        // which the audit store refuses. The ids are in the announcement.
        let event = base.clone().detail(format!(
            "{} active, {} retired",
            signing_label(generation),
            signing_label(current.generation)
        ));
        let announcement = match self
            .store
            .rotate_signing_key(&current.key, &row, event)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                return Err(match conflict(e) {
                    VaultError::KeyLifecycle(k) => self.refuse(base, k).await,
                    other => other,
                })
            }
        };
        // Committed: a failed reload is retried by the periodic refresh and
        // must not turn the rotation into an error (the caller would then
        // not pin the announcement in the witness file).
        if let Err(e) = self.refresh_keys().await {
            tracing::warn!(error = %e, "audit signing key rotated; reloading the keys failed (retried by the periodic refresh)");
        }
        tracing::info!(
            generation,
            key_id = %row.key_id,
            previous = %current.key.key_id(),
            tree_size = announcement.tree_size,
            "rotated the audit signing key"
        );
        Ok(SigningRotation {
            generation,
            key_id: row.key_id,
            public_key: row.public_key,
            previous_key_id: current.key.key_id().to_owned(),
            announcement,
        })
    }

    /// Retire an audit signing key generation: always refused, and the
    /// refusal audited (`key_retired`, outcome failure). A signing key is
    /// retired by its rotation, in the transaction that stores the
    /// announcement of its successor; retiring one by itself would leave
    /// the trail without a key that signs (`key_active`) or change nothing
    /// (`key_state`; `not_found` for a generation that never was).
    pub async fn retire_audit_signing(
        &self,
        actor: Actor<'_>,
        generation: u32,
    ) -> Result<std::convert::Infallible, VaultError> {
        let event = self
            .key_event(actor, Action::KeyRetired)
            .await?
            .detail(signing_label(generation));
        let rows = self.store.load_signing_keys().await?;
        let state = rows
            .iter()
            .find(|k| k.generation == generation)
            .map(crate::store::SigningKeyRow::state);
        let err = match state {
            None => KeyLifecycleError::NotFound,
            Some(KeyState::Active) => KeyLifecycleError::Active,
            Some(other) => KeyLifecycleError::WrongState(other),
        };
        Err(self.refuse(event, err).await)
    }

    /// Destroy a retired audit signing key generation: its wrapped secret
    /// is erased, its public key kept (`key_active` for the one that signs,
    /// `key_state` if already destroyed). Audited (`key_destroyed`).
    pub async fn destroy_audit_signing(
        &self,
        actor: Actor<'_>,
        generation: u32,
    ) -> Result<(), VaultError> {
        let event = self
            .key_event(actor, Action::KeyDestroyed)
            .await?
            .detail(signing_label(generation));
        let outcome = self
            .store
            .destroy_signing_key(generation, now_millis(), event.clone())
            .await?;
        self.finish_key_change(event, outcome).await
    }

    /// Every key with its state, age, crypto-period and record count, and
    /// the re-encryption progress.
    pub async fn key_status(&self, periods: CryptoPeriods) -> Result<KeyStatus, VaultError> {
        let stored = self.store.load_keys().await?;
        let usage = self.store.key_usage().await?;
        let keys = self.keys.keys();
        let (active_dek, active_fp) = (
            keys.active_dek().version(),
            keys.fingerprint_key().version(),
        );
        let now = now_millis();
        let mut out = Vec::with_capacity(stored.len());
        let mut reencrypted_at = None;
        for k in &stored {
            let (period, records) = match k.purpose {
                KeyPurpose::Dek => (periods.dek, usage.by_dek.get(&k.version)),
                KeyPurpose::Fingerprint => {
                    (periods.fingerprint, usage.by_fingerprint.get(&k.version))
                }
            };
            if k.purpose == KeyPurpose::Dek && k.version == active_dek {
                reencrypted_at = k.reencrypted_at;
            }
            let age = Duration::from_millis(u64::try_from(now - k.created_at).unwrap_or(0));
            out.push(KeyInfo {
                purpose: k.purpose,
                version: k.version,
                state: k.state,
                created_at: k.created_at,
                age,
                crypto_period: period,
                past_crypto_period: k.state.is_loaded() && age > period,
                retired_at: k.retired_at,
                destroyed_at: k.destroyed_at,
                records: records.copied().unwrap_or(0),
            });
        }
        let remaining = self.store.count_outdated(active_dek, active_fp).await?;
        let signing_keys = self
            .store
            .load_signing_keys()
            .await?
            .into_iter()
            .map(|k| {
                let age = Duration::from_millis(u64::try_from(now - k.created_at).unwrap_or(0));
                let state = k.state();
                SigningKeyInfo {
                    generation: k.generation,
                    key_id: k.key_id,
                    public_key: k.public_key,
                    state,
                    created_at: k.created_at,
                    age,
                    crypto_period: periods.audit_signing,
                    past_crypto_period: state == KeyState::Active && age > periods.audit_signing,
                    retired_at: k.retired_at,
                    destroyed_at: k.destroyed_at,
                }
            })
            .collect();
        Ok(KeyStatus {
            keys: out,
            signing_keys,
            active_dek,
            active_fingerprint: active_fp,
            remaining,
            reencrypted_at,
        })
    }
}

#[cfg(test)]
#[path = "rotation_tests.rs"]
mod tests;
