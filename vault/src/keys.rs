//! The vault's own keys, unwrapped once into memory.
//!
//! Hierarchy: the KEK (in `hsm-shim`) wraps each versioned DEK and the
//! fingerprint master key; the wrapped blobs live in the `vault_keys` table
//! with the id of the KEK that wrapped them. At start-up they are unwrapped
//! once; the hot path never calls the KEK. Missing keys are generated on first
//! start (several instances racing resolve to one row per purpose/version).

use std::collections::BTreeMap;
use std::sync::Arc;

use audit::{Action, AuditEvent, Outcome};
use hsm_shim::{KekError, KeyEncryptionKey};

use crate::crypto::{random_key, CryptoError, DataKey, FingerprintKey};
use crate::store::{now_millis, KeyPurpose, SigningKeyRow, Store, StoreError, StoredKey};

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

/// Unwrapped keys in memory. No `Clone`; dropping it zeroizes every key.
#[derive(Debug)]
pub struct Keyring {
    active_dek: u32,
    deks: BTreeMap<u32, DataKey>,
    fingerprint: FingerprintKey,
    /// Signs audit checkpoints; unlike the KEK it stays in memory, because
    /// the service signs periodically. The database holds it only wrapped.
    audit_signing: audit::SigningKey,
    /// `cardvault-audit-ed25519:<hex>`: what auditors verify with.
    audit_public_key: String,
    kek_id: String,
}

fn signing_label(generation: u32) -> String {
    format!("audit_signing:{generation}")
}

/// Load the newest audit signing key, generating generation 1 on first start.
async fn load_or_init_signing(
    store: &Arc<dyn Store>,
    kek: &dyn KeyEncryptionKey,
) -> Result<(audit::SigningKey, String), KeysError> {
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
    let row = rows.last().ok_or(KeysError::Missing("audit signing"))?;
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
    Ok((key, public))
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
        kek: &dyn KeyEncryptionKey,
    ) -> Result<Keyring, KeysError> {
        let mut stored = store.load_keys().await?;
        for purpose in [KeyPurpose::Dek, KeyPurpose::Fingerprint] {
            if !stored.iter().any(|k| k.purpose == purpose) {
                let key = random_key()?;
                let row = StoredKey {
                    purpose,
                    version: 1,
                    kek_id: kek.kek_id().to_owned(),
                    wrapped: kek.wrap(&label(purpose, 1), key.as_ref())?,
                    created_at: now_millis(),
                };
                let event = AuditEvent::new(Action::KeyGenerated, Outcome::Success)
                    .source("local")
                    .detail(label(purpose, 1));
                if store.insert_key(&row, event).await? {
                    tracing::info!(key = %label(purpose, 1), kek = kek.kek_id(), "generated vault key");
                }
                stored = store.load_keys().await?;
            }
        }
        let (audit_signing, audit_public_key) = load_or_init_signing(store, kek).await?;
        Self::unwrap_all(&stored, kek, audit_signing, audit_public_key)
    }

    fn unwrap_all(
        stored: &[StoredKey],
        kek: &dyn KeyEncryptionKey,
        audit_signing: audit::SigningKey,
        audit_public_key: String,
    ) -> Result<Keyring, KeysError> {
        let mut deks = BTreeMap::new();
        let mut fingerprint = None;
        for k in stored {
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
                    deks.insert(k.version, DataKey::from_bytes(k.version, &raw)?);
                }
                KeyPurpose::Fingerprint => {
                    // The newest fingerprint key is the one in use; rotating it
                    // is a re-fingerprinting job of its own (key management issue).
                    if fingerprint
                        .as_ref()
                        .is_none_or(|f: &FingerprintKey| f.version() < k.version)
                    {
                        fingerprint = Some(FingerprintKey::from_bytes(k.version, &raw)?);
                    }
                }
            }
        }
        let active_dek = *deks.keys().next_back().ok_or(KeysError::Missing("data"))?;
        Ok(Keyring {
            active_dek,
            deks,
            fingerprint: fingerprint.ok_or(KeysError::Missing("fingerprint"))?,
            audit_signing,
            audit_public_key,
            kek_id: kek.kek_id().to_owned(),
        })
    }

    /// The DEK new records are sealed with.
    pub fn active_dek(&self) -> &DataKey {
        // Invariant: `active_dek` is a key of `deks` (set from it in `unwrap_all`).
        &self.deks[&self.active_dek]
    }

    /// The DEK of a given version, for opening older records.
    pub fn dek(&self, version: u32) -> Option<&DataKey> {
        self.deks.get(&version)
    }

    pub fn fingerprint_key(&self) -> &FingerprintKey {
        &self.fingerprint
    }

    pub fn audit_signing_key(&self) -> &audit::SigningKey {
        &self.audit_signing
    }

    /// The auditors' verification key line.
    pub fn audit_public_key(&self) -> &str {
        &self.audit_public_key
    }

    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }
}
