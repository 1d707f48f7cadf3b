//! The keyring file: its JSON format, the AES-256-GCM boxes in it
//! (`Sealed`) and their associated data, loading and checking a file into a
//! `Keyring`, serialising it, and replacing the file atomically after
//! checking that it is still the one this process read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fsutil;
use crate::software::SoftwareKek;
use crate::{KekError, KeyEncryptionKey, NONCE_LEN, TAG_LEN};

use super::kdf::KdfParams;
use super::{
    check_name, check_unique, KekVersionInfo, ALLOW_WEAK_KDF, ARGON2_VERSION, CHECK_AAD, FORMAT,
    FORMAT_VERSION, KEK_AAD, KEYRING_ID_LEN, KEY_LEN, MAX_CUSTODIANS, SALT_LEN, SHARE_AAD,
    SHARE_LEN,
};

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    format: String,
    version: u32,
    keyring_id: String,
    threshold: usize,
    next_kek_version: u32,
    check: SealedJson,
    custodians: Vec<CustodianJson>,
    keks: Vec<KekJson>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct SealedJson {
    nonce: String,
    ciphertext: String,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct CustodianJson {
    name: String,
    kdf: KdfJson,
    share: SealedJson,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct KdfJson {
    algorithm: String,
    version: u32,
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
    salt: String,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct KekJson {
    version: u32,
    kek_id: String,
    key: SealedJson,
}

/// AES-256-GCM output: nonce and ciphertext with tag.
#[derive(Clone)]
pub(super) struct Sealed {
    pub(super) nonce: [u8; NONCE_LEN],
    pub(super) ciphertext: Vec<u8>,
}

impl Sealed {
    pub(super) fn seal(
        key: &[u8; KEY_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Self, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| KekError::Rng)?;
        let ciphertext = Aes256Gcm::new(key.into())
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| KekError::UnwrapFailed)?;
        Ok(Self { nonce, ciphertext })
    }

    pub(super) fn open(&self, key: &[u8; KEY_LEN], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        Aes256Gcm::new(key.into())
            .decrypt(
                Nonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.ciphertext,
                    aad,
                },
            )
            .ok()
            .map(Zeroizing::new)
    }

    fn to_json(&self) -> SealedJson {
        SealedJson {
            nonce: B64.encode(self.nonce),
            ciphertext: B64.encode(&self.ciphertext),
        }
    }

    fn from_json(
        j: &SealedJson,
        plaintext_len: usize,
        bad: impl Fn(&'static str) -> KekError,
    ) -> Result<Self, KekError> {
        let nonce = B64
            .decode(&j.nonce)
            .ok()
            .and_then(|n| <[u8; NONCE_LEN]>::try_from(n.as_slice()).ok())
            .ok_or_else(|| bad("a nonce is not 12 bytes of base64"))?;
        let ciphertext = B64
            .decode(&j.ciphertext)
            .map_err(|_| bad("a ciphertext is not base64"))?;
        if ciphertext.len() != plaintext_len + TAG_LEN {
            return Err(bad("a ciphertext has the wrong length"));
        }
        Ok(Self { nonce, ciphertext })
    }
}

pub(super) struct Custodian {
    pub(super) name: String,
    pub(super) kdf: KdfParams,
    pub(super) salt: [u8; SALT_LEN],
    pub(super) share: Sealed,
}

pub(super) struct KekEntry {
    pub(super) version: u32,
    pub(super) kek_id: String,
    pub(super) key: Sealed,
}

/// The parsed, validated public content of a keyring file.
pub(super) struct Keyring {
    pub(super) path: PathBuf,
    pub(super) keyring_id: [u8; KEYRING_ID_LEN],
    pub(super) threshold: usize,
    pub(super) next_kek_version: u32,
    pub(super) check: Sealed,
    pub(super) custodians: Vec<Custodian>,
    pub(super) keks: Vec<KekEntry>,
    /// SHA-256 of the file as last read or written by this process.
    pub(super) digest: [u8; 32],
}

impl Keyring {
    pub(super) fn load(path: &Path) -> Result<Self, KekError> {
        let bytes = fsutil::read_private(path)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let bad = |reason| KekError::Malformed {
            path: fsutil::shown(path),
            reason,
        };
        let file: FileV1 =
            serde_json::from_slice(&bytes).map_err(|_| bad("not a keyring file (JSON)"))?;
        if file.format != FORMAT {
            return Err(bad("not a cardvault sealed keyring"));
        }
        if file.version != FORMAT_VERSION {
            return Err(bad("unsupported keyring format version"));
        }
        let keyring_id = B64
            .decode(&file.keyring_id)
            .ok()
            .and_then(|v| <[u8; KEYRING_ID_LEN]>::try_from(v.as_slice()).ok())
            .ok_or_else(|| bad("keyring_id is not 16 bytes of base64"))?;
        let n = file.custodians.len();
        if n == 0 || n > MAX_CUSTODIANS || file.threshold == 0 || file.threshold > n {
            return Err(bad("threshold or number of custodians out of range"));
        }
        let mut custodians = Vec::with_capacity(n);
        for (index, c) in file.custodians.iter().enumerate() {
            check_name(index, &c.name).map_err(|_| bad("a custodian name is invalid"))?;
            if c.kdf.algorithm != "argon2id" || c.kdf.version != ARGON2_VERSION {
                return Err(bad("custodian KDF is not argon2id version 19"));
            }
            let kdf = KdfParams {
                m_cost_kib: c.kdf.m_cost_kib,
                t_cost: c.kdf.t_cost,
                p_cost: c.kdf.p_cost,
            };
            kdf.check(ALLOW_WEAK_KDF)
                .map_err(|_| bad("custodian argon2 parameters are out of bounds"))?;
            let salt = B64
                .decode(&c.kdf.salt)
                .ok()
                .and_then(|v| <[u8; SALT_LEN]>::try_from(v.as_slice()).ok())
                .ok_or_else(|| bad("a salt is not 16 bytes of base64"))?;
            custodians.push(Custodian {
                name: c.name.clone(),
                kdf,
                salt,
                share: Sealed::from_json(&c.share, SHARE_LEN, bad)?,
            });
        }
        check_unique(custodians.iter().map(|c| c.name.as_str()))
            .map_err(|_| bad("custodian names are not unique"))?;
        let mut versions = BTreeSet::new();
        let mut keks = Vec::with_capacity(file.keks.len());
        for k in &file.keks {
            if k.version == 0 || k.version >= file.next_kek_version || !versions.insert(k.version) {
                return Err(bad(
                    "KEK versions are not unique and below next_kek_version",
                ));
            }
            if k.kek_id.is_empty() || k.kek_id.len() > 128 {
                return Err(bad("a KEK id is empty or too long"));
            }
            keks.push(KekEntry {
                version: k.version,
                kek_id: k.kek_id.clone(),
                key: Sealed::from_json(&k.key, KEY_LEN, bad)?,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            keyring_id,
            threshold: file.threshold,
            next_kek_version: file.next_kek_version,
            check: Sealed::from_json(&file.check, 0, bad)?,
            custodians,
            keks,
            digest,
        })
    }

    pub(super) fn to_bytes(&self) -> Result<Vec<u8>, KekError> {
        let file = FileV1 {
            format: FORMAT.to_owned(),
            version: FORMAT_VERSION,
            keyring_id: B64.encode(self.keyring_id),
            threshold: self.threshold,
            next_kek_version: self.next_kek_version,
            check: self.check.to_json(),
            custodians: self
                .custodians
                .iter()
                .map(|c| CustodianJson {
                    name: c.name.clone(),
                    kdf: KdfJson {
                        algorithm: "argon2id".to_owned(),
                        version: ARGON2_VERSION,
                        m_cost_kib: c.kdf.m_cost_kib,
                        t_cost: c.kdf.t_cost,
                        p_cost: c.kdf.p_cost,
                        salt: B64.encode(c.salt),
                    },
                    share: c.share.to_json(),
                })
                .collect(),
            keks: self
                .keks
                .iter()
                .map(|k| KekJson {
                    version: k.version,
                    kek_id: k.kek_id.clone(),
                    key: k.key.to_json(),
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| KekError::Write {
            path: fsutil::shown(&self.path),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    pub(super) fn share_aad(&self, name: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(SHARE_AAD.len() + KEYRING_ID_LEN + name.len());
        aad.extend_from_slice(SHARE_AAD);
        aad.extend_from_slice(&self.keyring_id);
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    pub(super) fn check_aad(&self) -> Vec<u8> {
        let mut aad = Vec::new();
        aad.extend_from_slice(CHECK_AAD);
        aad.extend_from_slice(&self.keyring_id);
        // Threshold and count are at most 255 (checked on every path in).
        aad.push(u8::try_from(self.threshold).unwrap_or(u8::MAX));
        aad.push(u8::try_from(self.custodians.len()).unwrap_or(u8::MAX));
        for c in &self.custodians {
            let len = u16::try_from(c.name.len()).unwrap_or(u16::MAX);
            aad.extend_from_slice(&len.to_be_bytes());
            aad.extend_from_slice(c.name.as_bytes());
        }
        aad
    }

    pub(super) fn kek_aad(&self, version: u32, kek_id: &str) -> Vec<u8> {
        let mut aad = Vec::new();
        aad.extend_from_slice(KEK_AAD);
        aad.extend_from_slice(&self.keyring_id);
        aad.extend_from_slice(&version.to_be_bytes());
        aad.extend_from_slice(kek_id.as_bytes());
        aad
    }

    pub(super) fn versions(&self) -> Vec<KekVersionInfo> {
        self.keks
            .iter()
            .map(|k| KekVersionInfo {
                version: k.version,
                kek_id: k.kek_id.clone(),
            })
            .collect()
    }

    /// A fresh KEK: its record (encrypted under `master`) and its key.
    pub(super) fn new_kek(
        &self,
        master: &[u8; KEY_LEN],
        version: u32,
    ) -> Result<(KekEntry, SoftwareKek), KekError> {
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::getrandom(raw.as_mut()).map_err(|_| KekError::Rng)?;
        let kek = SoftwareKek::from_key(&raw);
        let kek_id = kek.kek_id().to_owned();
        let key = Sealed::seal(master, raw.as_ref(), &self.kek_aad(version, &kek_id))?;
        Ok((
            KekEntry {
                version,
                kek_id,
                key,
            },
            kek,
        ))
    }

    /// Refuse to write if the file changed since this process read or wrote it.
    pub(super) fn ensure_unchanged(&self) -> Result<(), KekError> {
        let bytes = fsutil::read_private(&self.path)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest != self.digest {
            return Err(KekError::KeyringChanged {
                path: fsutil::shown(&self.path),
            });
        }
        Ok(())
    }

    pub(super) fn replace_file(&mut self) -> Result<(), KekError> {
        let bytes = self.to_bytes()?;
        fsutil::replace_private(&self.path, &bytes)?;
        self.digest = Sha256::digest(&bytes).into();
        Ok(())
    }
}
