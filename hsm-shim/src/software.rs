//! Software KEK: a 256-bit AES key in a file that only the service user can read.
//!
//! File format (text, one line): `cardvault-kek-v1:` followed by the key in
//! lowercase hex. Wrapping is AES-256-GCM with a fresh 96-bit nonce; the
//! associated data is a domain-separation prefix plus the label, so a blob is
//! bound to the key it holds. Blob: `0x01 || nonce(12) || ciphertext+tag`.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{KekError, KeyEncryptionKey};

const FILE_PREFIX: &str = "cardvault-kek-v1:";
use crate::{wrap_aad as aad, BLOB_VERSION, NONCE_LEN, TAG_LEN};

/// A KEK held in software. No `Clone`; `Debug` shows only the KEK id; the
/// cipher state is zeroized on drop by `aes-gcm`'s `zeroize` feature.
pub struct SoftwareKek {
    cipher: Aes256Gcm,
    id: String,
}

impl fmt::Debug for SoftwareKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareKek")
            .field("kek_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SoftwareKek {
    /// Generate a new KEK from the OS CSPRNG and write it to `path`, created
    /// with mode 0600. Refuses to overwrite an existing file.
    pub fn generate(path: &Path) -> Result<Self, KekError> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(key.as_mut()).map_err(|_| KekError::Rng)?;
        let mut line = Zeroizing::new(String::with_capacity(FILE_PREFIX.len() + 65));
        line.push_str(FILE_PREFIX);
        for b in key.iter() {
            line.push(hex_digit(b >> 4));
            line.push(hex_digit(b & 0x0f));
        }
        line.push('\n');
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KekError::AlreadyExists {
                        path: path.display().to_string(),
                    }
                } else {
                    KekError::Write {
                        path: path.display().to_string(),
                        source,
                    }
                }
            })?;
        let write_err = |source| KekError::Write {
            path: path.display().to_string(),
            source,
        };
        file.write_all(line.as_bytes()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        Ok(Self::from_key(&key))
    }

    /// Load a KEK from `path`. Refuses a file that is not private
    /// ([`crate::is_private_file`]).
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let shown = || path.display().to_string();
        let meta = fs::metadata(path).map_err(|source| KekError::Read {
            path: shown(),
            source,
        })?;
        let mode = meta.mode() & 0o777;
        if !crate::fsutil::is_private_file(&meta) {
            return Err(KekError::InsecurePermissions {
                path: shown(),
                mode,
            });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KekError::Read {
            path: shown(),
            source,
        })?);
        let hex = text
            .trim()
            .strip_prefix(FILE_PREFIX)
            .ok_or(KekError::Malformed {
                path: shown(),
                reason: "missing the cardvault-kek-v1 header",
            })?;
        if hex.len() != 64 {
            return Err(KekError::Malformed {
                path: shown(),
                reason: "key must be 64 hex digits",
            });
        }
        let mut key = Zeroizing::new([0u8; 32]);
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let (Some(hi), Some(lo)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                return Err(KekError::Malformed {
                    path: shown(),
                    reason: "key must be hex",
                });
            };
            key[i] = (hi << 4) | lo;
        }
        Ok(Self::from_key(&key))
    }

    /// A KEK from raw key bytes held by another backend (the sealed keyring).
    /// The id is derived from the key, so the same key always has the same id.
    pub(crate) fn from_key(key: &[u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(b"cardvault/kek-id/v1\0");
        h.update(key);
        let digest = h.finalize();
        // The id is a one-way digest of the key under a domain-separation
        // prefix: safe to store and print.
        let id = format!("soft:{}", crate::to_hex(&digest[..8]));
        Self {
            cipher: Aes256Gcm::new(key.into()),
            id,
        }
    }
}

impl KeyEncryptionKey for SoftwareKek {
    fn kek_id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, label: &str, key: &[u8]) -> Result<Vec<u8>, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| KekError::Rng)?;
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key,
                    aad: &aad(label),
                },
            )
            .map_err(|_| KekError::UnwrapFailed)?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        blob.push(BLOB_VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        Ok(blob)
    }

    fn unwrap(&self, label: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KekError> {
        if wrapped.len() < 1 + NONCE_LEN + TAG_LEN || wrapped[0] != BLOB_VERSION {
            return Err(KekError::MalformedBlob);
        }
        let nonce = Nonce::from_slice(&wrapped[1..1 + NONCE_LEN]);
        self.cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &wrapped[1 + NONCE_LEN..],
                    aad: &aad(label),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| KekError::UnwrapFailed)
    }
}

fn hex_digit(v: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(v & 0x0f)])
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fresh() -> (tempfile::TempDir, SoftwareKek) {
        let dir = tempfile::tempdir().unwrap();
        let kek = SoftwareKek::generate(&dir.path().join("kek.key")).unwrap();
        (dir, kek)
    }

    #[test]
    fn generated_file_is_private_and_reloads_to_the_same_key() {
        let (dir, kek) = fresh();
        let path = dir.path().join("kek.key");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SoftwareKek::load(&path).unwrap();
        assert_eq!(kek.kek_id(), again.kek_id());
        let blob = kek.wrap("dek:1", &[7u8; 32]).unwrap();
        assert_eq!(again.unwrap("dek:1", &blob).unwrap().as_slice(), &[7u8; 32]);
    }

    #[test]
    fn refuses_to_overwrite() {
        let (dir, _kek) = fresh();
        let err = SoftwareKek::generate(&dir.path().join("kek.key")).unwrap_err();
        assert!(matches!(err, KekError::AlreadyExists { .. }));
    }

    #[test]
    fn refuses_group_or_world_readable_files() {
        let (dir, _kek) = fresh();
        let path = dir.path().join("kek.key");
        // 0640 is private only when root owns the file (fsutil's tests).
        for mode in [0o620, 0o604, 0o660, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = SoftwareKek::load(&path).unwrap_err();
            assert!(
                matches!(err, KekError::InsecurePermissions { .. }),
                "{mode:o}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(SoftwareKek::load(&path).is_ok());
    }

    #[test]
    fn rejects_malformed_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        for body in [
            "",
            "cardvault-kek-v1:abc",
            "nope",
            &format!("{FILE_PREFIX}{}", "zz".repeat(32)),
        ] {
            let _ = fs::remove_file(&path);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap()
                .write_all(body.as_bytes())
                .unwrap();
            assert!(matches!(
                SoftwareKek::load(&path).unwrap_err(),
                KekError::Malformed { .. }
            ));
        }
    }

    #[test]
    fn wrong_label_wrong_kek_or_tampering_fail() {
        let (_d1, kek) = fresh();
        let (_d2, other) = fresh();
        assert_ne!(kek.kek_id(), other.kek_id());
        let blob = kek.wrap("dek:1", &[1u8; 32]).unwrap();
        assert!(matches!(
            kek.unwrap("dek:2", &blob),
            Err(KekError::UnwrapFailed)
        ));
        assert!(matches!(
            other.unwrap("dek:1", &blob),
            Err(KekError::UnwrapFailed)
        ));
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x01;
            assert!(kek.unwrap("dek:1", &bad).is_err(), "byte {i}");
        }
        assert!(matches!(
            kek.unwrap("dek:1", &blob[..10]),
            Err(KekError::MalformedBlob)
        ));
    }

    #[test]
    fn debug_never_shows_key_material() {
        let (_d, kek) = fresh();
        let shown = format!("{kek:?}");
        assert!(shown.contains("soft:"));
        assert!(!shown.contains("cipher"));
    }
}
