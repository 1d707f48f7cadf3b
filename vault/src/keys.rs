//! The vault's own keys, unwrapped once into memory.
//!
//! Hierarchy: the KEK (in `hsm-shim`) wraps each versioned DEK and the
//! fingerprint master key; the wrapped blobs live in the `vault_keys` table
//! with the id of the KEK that wrapped them, and their state (active,
//! decrypt-only, retired, destroyed). At start-up the active and
//! decrypt-only ones are unwrapped; [`Keyring::refresh`] unwraps keys added
//! later (a rotation) and drops retired ones; the hot path never calls the
//! KEK. The KEK is kept (as an `Arc`) only to wrap keys a rotation creates.
//! Missing keys are generated on first start (several instances racing
//! resolve to one row per purpose/version).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use audit::{Action, AuditEvent, Outcome};
use hsm_shim::{KekError, KeyEncryptionKey};

use crate::crypto::{random_key, CryptoError, DataKey, FingerprintKey};
use crate::store::{now_millis, KeyPurpose, KeyState, SigningKeyRow, Store, StoreError, StoredKey};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("key {label} was wrapped by KEK {stored}, but the configured KEK is {configured}")]
    WrongKek {
        label: String,
        stored: String,
        configured: String,
    },
    #[error("key {label} could not be unwrapped: {source}")]
    Unwrap {
        label: String,
        #[source]
        source: KekError,
    },
    #[error("key generation failed: {0}")]
    Generate(#[from] KekError),
    #[error("key material is invalid: {0}")]
    Material(#[from] CryptoError),
    #[error("no {0} key after initialisation")]
    Missing(&'static str),
    #[error("audit signing key: {0}")]
    Signing(String),
}

/// The vault keys in memory at one moment: every DEK that is active or
/// decrypt-only, the active fingerprint key and the decrypt-only ones (still
/// needed while a fingerprint rotation is in progress), and the state of
/// every stored key (retired and destroyed ones are never unwrapped). No
/// `Clone`; each key is zeroized when the last snapshot holding it is
/// dropped.
#[derive(Debug)]
pub struct KeySet {
    active_dek: u32,
    deks: BTreeMap<u32, Arc<DataKey>>,
    active_fingerprint: u32,
    fingerprints: BTreeMap<u32, Arc<FingerprintKey>>,
    states: BTreeMap<(KeyPurpose, u32), KeyState>,
    kek_id: String,
}

impl KeySet {
    /// The DEK new records are sealed with.
    pub fn active_dek(&self) -> &DataKey {
        // Invariant: `active_dek` is a key of `deks` (checked in `build`).
        &self.deks[&self.active_dek]
    }

    /// The DEK of a given version, for opening older records (None if it
    /// is retired, destroyed or unknown).
    pub fn dek(&self, version: u32) -> Option<&DataKey> {
        self.deks.get(&version).map(|k| &**k)
    }

    /// The fingerprint key new records are fingerprinted with.
    pub fn fingerprint_key(&self) -> &FingerprintKey {
        // Invariant: `active_fingerprint` is a key of `fingerprints`.
        &self.fingerprints[&self.active_fingerprint]
    }

    /// Decrypt-only fingerprint keys, newest first: records not yet moved by
    /// the re-encryption pass carry fingerprints under these.
    pub fn previous_fingerprint_keys(&self) -> impl Iterator<Item = &FingerprintKey> {
        self.fingerprints
            .iter()
            .rev()
            .filter(|(v, _)| **v != self.active_fingerprint)
            .map(|(_, k)| &**k)
    }

    /// The state of a stored key, as of the last load.
    pub fn state(&self, purpose: KeyPurpose, version: u32) -> Option<KeyState> {
        self.states.get(&(purpose, version)).copied()
    }

    /// The id of the KEK the keys were unwrapped with.
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }
}

/// The vault's keys: a [`KeySet`] that [`Keyring::refresh`] replaces when
/// the stored keys change (a rotation by this or another instance), the KEK
/// (kept to wrap keys created by a rotation; replaced by a KEK rotation) and
/// the audit signing key.
#[derive(Debug)]
pub struct Keyring {
    current: RwLock<Arc<KeySet>>,
    kek: RwLock<Arc<dyn KeyEncryptionKey>>,
    /// Signs audit checkpoints; unlike the KEK it stays in memory, because
    /// the service signs periodically. The database holds it only wrapped.
    /// Replaced when the signing key rotates (here or on another instance).
    audit_signing: RwLock<Arc<Signing>>,
}

/// The audit signing key in use and the public keys of every generation.
#[derive(Debug)]
pub struct Signing {
    /// The newest generation: the one that signs.
    pub generation: u32,
    pub key: Arc<audit::SigningKey>,
    /// `cardvault-audit-ed25519:<hex>` of `key`.
    pub public_key: String,
    /// Every generation's public key line, oldest first (destroyed ones
    /// too: they verify the checkpoints they signed).
    pub public_keys: Vec<String>,
}

pub(crate) fn signing_label(generation: u32) -> String {
    format!("audit_signing:{generation}")
}

/// Load the newest audit signing key, generating generation 1 on first start.
async fn load_or_init_signing(
    store: &Arc<dyn Store>,
    kek: &dyn KeyEncryptionKey,
) -> Result<Signing, KeysError> {
    let mut rows = store.load_signing_keys().await?;
    if rows.is_empty() {
        let key = audit::SigningKey::generate().map_err(|e| KeysError::Signing(e.to_string()))?;
        let row = SigningKeyRow {
            generation: 1,
            key_id: key.key_id().to_owned(),
            kek_id: kek.kek_id().to_owned(),
            wrapped: kek.wrap(&signing_label(1), key.expose_secret().as_ref())?,
            public_key: key.verifying_key().to_string(),
            created_at: now_millis(),
            retired_at: None,
            destroyed_at: None,
        };
        let event = AuditEvent::new(Action::KeyGenerated, Outcome::Success)
            .source("local")
            // Not the key id: 16 hex characters can form a Luhn-valid digit
            // run, which the audit store rightly refuses. Auditors derive
            // the id from the public key.
            .detail(signing_label(1));
        if store.insert_signing_key(&row, event).await? {
            tracing::info!(key_id = %row.key_id, "generated audit signing key");
        }
        rows = store.load_signing_keys().await?;
    }
    unwrap_signing(&rows, kek)
}

/// Unwrap the newest of the stored signing keys (the one that signs).
fn unwrap_signing(
    rows: &[SigningKeyRow],
    kek: &dyn KeyEncryptionKey,
) -> Result<Signing, KeysError> {
    let row = rows.last().ok_or(KeysError::Missing("audit signing"))?;
    if row.retired_at.is_some() {
        return Err(KeysError::Signing(format!(
            "the newest signing key ({}) is retired",
            signing_label(row.generation)
        )));
    }
    if row.kek_id != kek.kek_id() {
        return Err(KeysError::WrongKek {
            label: signing_label(row.generation),
            stored: row.kek_id.clone(),
            configured: kek.kek_id().to_owned(),
        });
    }
    let secret = kek
        .unwrap(&signing_label(row.generation), &row.wrapped)
        .map_err(|source| KeysError::Unwrap {
            label: signing_label(row.generation),
            source,
        })?;
    let key = audit::SigningKey::from_secret_slice(&secret)
        .map_err(|e| KeysError::Signing(e.to_string()))?;
    let public = key.verifying_key().to_string();
    if public != row.public_key {
        return Err(KeysError::Signing(
            "stored public key does not match the unwrapped key".into(),
        ));
    }
    Ok(Signing {
        generation: row.generation,
        key: Arc::new(key),
        public_key: public,
        public_keys: rows.iter().map(|r| r.public_key.clone()).collect(),
    })
}

/// The KEK wrap label of a vault key (associated data of its wrapped blob).
pub(crate) fn label(purpose: KeyPurpose, version: u32) -> String {
    format!("{}:{}", purpose.as_str(), version)
}

impl Keyring {
    /// Load every stored key, generating the first DEK and fingerprint key if
    /// the store has none.
    pub async fn load_or_init(
        store: &Arc<dyn Store>,
        kek: Arc<dyn KeyEncryptionKey>,
    ) -> Result<Keyring, KeysError> {
        let mut stored = store.load_keys().await?;
        for purpose in [KeyPurpose::Dek, KeyPurpose::Fingerprint] {
            if !stored.iter().any(|k| k.purpose == purpose) {
                let key = random_key()?;
                let now = now_millis();
                let mut row = StoredKey::new_active(
                    purpose,
                    1,
                    kek.kek_id().to_owned(),
                    kek.wrap(&label(purpose, 1), key.as_ref())?,
                    now,
                );
                // Nothing to re-encrypt to a first key.
                row.reencrypted_at = Some(now);
                let event = AuditEvent::new(Action::KeyGenerated, Outcome::Success)
                    .source("local")
                    .detail(label(purpose, 1));
                if store.insert_key(&row, event).await? {
                    tracing::info!(key = %label(purpose, 1), kek = kek.kek_id(), "generated vault key");
                }
                stored = store.load_keys().await?;
            }
        }
        let audit_signing = load_or_init_signing(store, &*kek).await?;
        let set = build(&stored, &*kek, None)?;
        Ok(Keyring {
            current: RwLock::new(Arc::new(set)),
            kek: RwLock::new(kek),
            audit_signing: RwLock::new(Arc::new(audit_signing)),
        })
    }

    /// The keys as of now. Cheap (an `Arc`); hold it for one operation so
    /// that all of it uses one consistent set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reload the stored keys: unwrap keys added since (through the KEK),
    /// keep the ones already unwrapped, drop retired and destroyed ones.
    /// Returns whether anything changed. Several instances on one database
    /// pick up a rotation by calling this periodically.
    pub async fn refresh(&self, store: &Arc<dyn Store>) -> Result<bool, KeysError> {
        let signing_changed = self.refresh_signing(store).await?;
        Ok(self.refresh_vault_keys(store).await? || signing_changed)
    }

    /// Reload the audit signing key if another generation signs now (a
    /// rotation by this or another instance), or a generation was added or
    /// destroyed. Returns whether anything changed.
    pub async fn refresh_signing(&self, store: &Arc<dyn Store>) -> Result<bool, KeysError> {
        let rows = store.load_signing_keys().await?;
        let old = self.signing();
        let newest = rows.last().map(|r| r.generation);
        if newest == Some(old.generation) && rows.len() == old.public_keys.len() {
            return Ok(false);
        }
        let kek = self.kek();
        let signing = if newest == Some(old.generation) {
            Signing {
                generation: old.generation,
                key: old.key.clone(),
                public_key: old.public_key.clone(),
                public_keys: rows.iter().map(|r| r.public_key.clone()).collect(),
            }
        } else {
            unwrap_signing(&rows, &*kek)?
        };
        if signing.generation != old.generation {
            tracing::info!(generation = signing.generation, key_id = %signing.key.key_id(), "audit signing key changed");
        }
        *self
            .audit_signing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(signing);
        Ok(true)
    }

    async fn refresh_vault_keys(&self, store: &Arc<dyn Store>) -> Result<bool, KeysError> {
        let stored = store.load_keys().await?;
        let old = self.keys();
        let kek = self.kek();
        let unchanged = old.kek_id == kek.kek_id()
            && stored.len() == old.states.len()
            && stored
                .iter()
                .all(|k| old.states.get(&(k.purpose, k.version)) == Some(&k.state));
        if unchanged {
            return Ok(false);
        }
        let set = build(&stored, &*kek, Some(&old))?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
        Ok(true)
    }

    /// The KEK (to wrap keys created at runtime).
    pub fn kek(&self) -> Arc<dyn KeyEncryptionKey> {
        self.kek
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Use another KEK from now on (after every key was re-wrapped under it).
    pub(crate) fn set_kek(&self, kek: Arc<dyn KeyEncryptionKey>) {
        *self
            .kek
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = kek;
    }

    /// The audit signing key in use and every generation's public key.
    pub fn signing(&self) -> Arc<Signing> {
        self.audit_signing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The key that signs audit checkpoints now.
    pub fn audit_signing_key(&self) -> Arc<audit::SigningKey> {
        self.signing().key.clone()
    }

    /// The auditors' verification key line of the signing key in use.
    pub fn audit_public_key(&self) -> String {
        self.signing().public_key.clone()
    }

    /// The id of the KEK in use.
    pub fn kek_id(&self) -> String {
        self.kek().kek_id().to_owned()
    }
}

/// Build a key set from the stored rows, reusing keys `previous` already
/// holds and unwrapping the others.
fn build(
    stored: &[StoredKey],
    kek: &dyn KeyEncryptionKey,
    previous: Option<&KeySet>,
) -> Result<KeySet, KeysError> {
    let mut deks = BTreeMap::new();
    let mut fingerprints = BTreeMap::new();
    let mut states = BTreeMap::new();
    let mut active = BTreeMap::new();
    for k in stored {
        states.insert((k.purpose, k.version), k.state);
        if !k.state.is_loaded() {
            continue;
        }
        if k.state == KeyState::Active {
            let v = active.entry(k.purpose).or_insert(k.version);
            *v = (*v).max(k.version);
        }
        match (k.purpose, previous) {
            (KeyPurpose::Dek, Some(p)) if p.deks.contains_key(&k.version) => {
                deks.insert(k.version, p.deks[&k.version].clone());
                continue;
            }
            (KeyPurpose::Fingerprint, Some(p)) if p.fingerprints.contains_key(&k.version) => {
                fingerprints.insert(k.version, p.fingerprints[&k.version].clone());
                continue;
            }
            _ => {}
        }
        let label = label(k.purpose, k.version);
        if k.kek_id != kek.kek_id() {
            return Err(KeysError::WrongKek {
                label,
                stored: k.kek_id.clone(),
                configured: kek.kek_id().to_owned(),
            });
        }
        let raw = kek
            .unwrap(&label, &k.wrapped)
            .map_err(|source| KeysError::Unwrap { label, source })?;
        match k.purpose {
            KeyPurpose::Dek => {
                deks.insert(k.version, Arc::new(DataKey::from_bytes(k.version, &raw)?));
            }
            KeyPurpose::Fingerprint => {
                fingerprints.insert(
                    k.version,
                    Arc::new(FingerprintKey::from_bytes(k.version, &raw)?),
                );
            }
        }
    }
    let active_dek = *active
        .get(&KeyPurpose::Dek)
        .ok_or(KeysError::Missing("active data"))?;
    let active_fingerprint = *active
        .get(&KeyPurpose::Fingerprint)
        .ok_or(KeysError::Missing("active fingerprint"))?;
    Ok(KeySet {
        active_dek,
        deks,
        active_fingerprint,
        fingerprints,
        states,
        kek_id: kek.kek_id().to_owned(),
    })
}
