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
use crate::store::{now_millis, KeyPurpose, Store, StoreError, StoredKey};

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
}

/// Unwrapped keys in memory. No `Clone`; dropping it zeroizes every key.
#[derive(Debug)]
pub struct Keyring {
    active_dek: u32,
    deks: BTreeMap<u32, DataKey>,
    fingerprint: FingerprintKey,
    kek_id: String,
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
        Self::unwrap_all(&stored, kek)
    }

    fn unwrap_all(stored: &[StoredKey], kek: &dyn KeyEncryptionKey) -> Result<Keyring, KeysError> {
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

    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }
}
