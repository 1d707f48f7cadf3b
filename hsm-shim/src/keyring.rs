//! Software KEKs under split knowledge: the KEK versions are encrypted under a
//! 256-bit master key that exists only as K-of-N Shamir shares, one per
//! custodian, each share encrypted under a key derived from that custodian's
//! passphrase. No single person (below the threshold) can unseal.
//!
//! # Ceremony
//!
//! ```text
//! SealedKeyring::init(path, 2, &[("alice", pa), ("bob", pb), ("carol", pc)], KdfParams::default())?;
//!
//! let mut unsealer = SealedKeyring::open(path)?.unsealer();   // at start-up: sealed
//! unsealer.submit("alice", pa)?;                              // UnsealProgress { have: 1, need: 2 }
//! unsealer.submit("carol", pc)?;                              // { have: 2, need: 2 }: reconstructed and verified
//! let keyring = unsealer.finish()?;                           // UnsealedKeyring
//! let kek = keyring.current_kek().unwrap();                   // KeyringKek: impl KeyEncryptionKey
//! keyring.add_kek_version()?;  keyring.destroy_kek_version(1)?;
//! keyring.seal();                                             // or drop: master key and KEKs zeroized
//! ```
//!
//! # Secret sharing: `vsss-rs`
//!
//! The master key is split byte-wise over GF(2^8) with `vsss-rs` 6 (`Gf256`).
//! Why: it is maintained (6.x is current, on the current RustCrypto and
//! `rand_core` 0.10 stack), it has had third-party security audits (funded
//! by LIT Protocol and Turnkey; the fixes, such as uniformly drawn
//! coefficients and refused duplicate or zero share identifiers, carry
//! regression tests in the crate), and its GF(256) arithmetic is constant-time,
//! without lookup tables. Evaluated and rejected: `sharks` 0.5 (draws the
//! coefficients from 1..=255 instead of uniformly, which biases the shares;
//! the fix lives only in its fork), `blahaj` 0.7 (that fork: fixes the bias,
//! but keeps log/exp lookup tables, a cache-timing channel on secret bytes,
//! and has no audit), `shamir-vault` 1.3 (lookup tables, one author, no
//! audit).
//!
//! Custodian i (in file order, from 1) gets the share at x = i. `vsss-rs`
//! needs K >= 2; for K = 1 the polynomial is the constant, so every share is
//! `x || master key` (any single custodian unseals, as K = 1 means). The
//! polynomial coefficients are bytes read from the OS CSPRNG beforehand
//! (zeroized afterwards), so an OS RNG failure is an error, not a panic.
//!
//! # Passphrases: argon2id
//!
//! Each share is AES-256-GCM encrypted under argon2id(passphrase, 16-byte
//! random salt), stored with the share: algorithm, argon2 version (0x13),
//! m, t, p and salt. Default ([`KdfParams::default`]): **m = 64 MiB, t = 3,
//! p = 1** (unsealing is rare, so the cost is affordable: a fraction of a
//! second per custodian). [`KdfParams::new`] refuses less than m = 19 MiB,
//! t = 2 (the OWASP minimum for argon2id) and more than m = 4 GiB, t = 64,
//! p = 16; a keyring file whose parameters are out of those bounds is refused
//! too. Only unit tests, or other crates' tests through the
//! `insecure-test-kdf` feature, can use the tiny `insecure_fast_for_tests`
//! parameters. Passphrases have at least 12 characters (at most 1024 bytes).
//!
//! # File
//!
//! JSON, mode 0600 (a group/other-accessible file is refused), created without
//! ever overwriting an existing file, written with fsync of file and
//! directory, and updated by atomic replace (temporary file + rename). An
//! update first checks that the file on disk is still the one this process
//! unsealed (SHA-256); if not, it fails with [`KekError::KeyringChanged`]
//! (one operator at a time; there is no cross-process lock).
//!
//! ```text
//! { "format": "cardvault-sealed-keyring", "version": 1, "keyring_id": b64(16),
//!   "threshold": K, "next_kek_version": n,
//!   "check": { "nonce", "ciphertext" },                  AES-GCM(master, "", AAD check)
//!   "custodians": [ { "name", "kdf": { "algorithm": "argon2id", "version": 19,
//!                     "m_cost_kib", "t_cost", "p_cost", "salt" },
//!                     "share": { "nonce", "ciphertext" } } ],   AES-GCM(argon2id(pass), x || y, AAD share)
//!   "keks": [ { "version", "kek_id", "key": { "nonce", "ciphertext" } } ] }   AES-GCM(master, kek, AAD kek)
//! ```
//!
//! Associated data (each after a `cardvault/keyring-…/v1\0` domain prefix
//! and the keyring id): share = custodian name; check = threshold and the
//! custodian names; KEK = version and KEK id. So a share cannot be moved to
//! another custodian or keyring, the threshold and custodian list cannot be
//! edited without the reconstruction check failing, and a KEK cannot be
//! relabelled as another version. After reconstruction the check value must
//! open ([`KekError::ReconstructionFailed`] otherwise) and so must every KEK
//! version (else the file is reported malformed).
//!
//! KEK ids are those of [`crate::SoftwareKek`] (`soft:` + a digest of the
//! key), so a KEK keeps its id across restarts and backends.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand_core::{TryCryptoRng, TryRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vsss_rs::{Gf256, IdentifierGf256};
use zeroize::{Zeroize, Zeroizing};

use crate::fsutil;
use crate::software::SoftwareKek;
use crate::{KekError, KeyEncryptionKey, NONCE_LEN, TAG_LEN};

const FORMAT: &str = "cardvault-sealed-keyring";
const FORMAT_VERSION: u32 = 1;
/// Minimum passphrase length, in characters.
pub const MIN_PASSPHRASE_CHARS: usize = 12;
const MAX_PASSPHRASE_BYTES: usize = 1024;
const MAX_CUSTODIANS: usize = 255;
const MAX_NAME_CHARS: usize = 64;
const SALT_LEN: usize = 16;
const KEYRING_ID_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// x coordinate byte + one y byte per key byte.
const SHARE_LEN: usize = 1 + KEY_LEN;
const ARGON2_VERSION: u32 = 0x13;

const SHARE_AAD: &[u8] = b"cardvault/keyring-share/v1\0";
const CHECK_AAD: &[u8] = b"cardvault/keyring-check/v1\0";
const KEK_AAD: &[u8] = b"cardvault/keyring-kek/v1\0";

/// Whether keyring files with sub-minimum argon2 parameters are accepted.
const ALLOW_WEAK_KDF: bool = cfg!(any(test, feature = "insecure-test-kdf"));

// ---------------------------------------------------------------------------
// argon2id parameters

/// argon2id cost parameters of a custodian's share key. Stored with each
/// share; the default is m = 64 MiB, t = 3, p = 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Smallest memory cost accepted outside tests (KiB): 19 MiB.
    pub const MIN_M_COST_KIB: u32 = 19 * 1024;
    /// Smallest time cost accepted outside tests.
    pub const MIN_T_COST: u32 = 2;

    /// Parameters with memory `m_cost_kib` KiB, `t_cost` passes and
    /// `p_cost` lanes. Refuses anything below m = 19 MiB, t = 2, or above
    /// m = 4 GiB, t = 64, p = 16.
    pub fn new(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<Self, KekError> {
        let params = Self {
            m_cost_kib,
            t_cost,
            p_cost,
        };
        params.check(false)?;
        Ok(params)
    }

    /// Tiny parameters (m = 256 KiB, t = 1) so that tests run fast. Only in
    /// this crate's tests or with the `insecure-test-kdf` feature; a keyring
    /// made with them is cheap to brute-force.
    #[cfg(any(test, feature = "insecure-test-kdf"))]
    pub fn insecure_fast_for_tests() -> Self {
        Self {
            m_cost_kib: 256,
            t_cost: 1,
            p_cost: 1,
        }
    }

    /// Memory cost in KiB.
    pub fn m_cost_kib(&self) -> u32 {
        self.m_cost_kib
    }

    /// Time cost (passes).
    pub fn t_cost(&self) -> u32 {
        self.t_cost
    }

    /// Parallelism (lanes).
    pub fn p_cost(&self) -> u32 {
        self.p_cost
    }

    fn check(&self, allow_weak: bool) -> Result<(), KekError> {
        let reason = if self.p_cost == 0 || self.p_cost > 16 {
            Some("p must be 1 to 16")
        } else if self.t_cost == 0 || self.t_cost > 64 {
            Some("t must be 1 to 64")
        } else if self.m_cost_kib > 4 * 1024 * 1024 {
            Some("m must be at most 4 GiB")
        } else if self.m_cost_kib < 8 * self.p_cost {
            Some("m must be at least 8 KiB per lane")
        } else if !allow_weak
            && (self.m_cost_kib < Self::MIN_M_COST_KIB || self.t_cost < Self::MIN_T_COST)
        {
            Some("below the minimum m = 19 MiB, t = 2")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(KekError::KdfParams { reason }),
            None => Ok(()),
        }
    }

    fn derive(&self, passphrase: &str, salt: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(KEY_LEN))
            .map_err(|_| KekError::KdfParams {
                reason: "refused by argon2",
            })?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
            .map_err(|_| KekError::Kdf)?;
        Ok(key)
    }
}

// ---------------------------------------------------------------------------
// File format

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
struct Sealed {
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
}

impl Sealed {
    fn seal(key: &[u8; KEY_LEN], plaintext: &[u8], aad: &[u8]) -> Result<Self, KekError> {
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

    fn open(&self, key: &[u8; KEY_LEN], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
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

struct Custodian {
    name: String,
    kdf: KdfParams,
    salt: [u8; SALT_LEN],
    share: Sealed,
}

struct KekEntry {
    version: u32,
    kek_id: String,
    key: Sealed,
}

/// The parsed, validated public content of a keyring file.
struct Keyring {
    path: PathBuf,
    keyring_id: [u8; KEYRING_ID_LEN],
    threshold: usize,
    next_kek_version: u32,
    check: Sealed,
    custodians: Vec<Custodian>,
    keks: Vec<KekEntry>,
    /// SHA-256 of the file as last read or written by this process.
    digest: [u8; 32],
}

impl Keyring {
    fn load(path: &Path) -> Result<Self, KekError> {
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

    fn to_bytes(&self) -> Result<Vec<u8>, KekError> {
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

    fn share_aad(&self, name: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(SHARE_AAD.len() + KEYRING_ID_LEN + name.len());
        aad.extend_from_slice(SHARE_AAD);
        aad.extend_from_slice(&self.keyring_id);
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    fn check_aad(&self) -> Vec<u8> {
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

    fn kek_aad(&self, version: u32, kek_id: &str) -> Vec<u8> {
        let mut aad = Vec::new();
        aad.extend_from_slice(KEK_AAD);
        aad.extend_from_slice(&self.keyring_id);
        aad.extend_from_slice(&version.to_be_bytes());
        aad.extend_from_slice(kek_id.as_bytes());
        aad
    }

    fn versions(&self) -> Vec<KekVersionInfo> {
        self.keks
            .iter()
            .map(|k| KekVersionInfo {
                version: k.version,
                kek_id: k.kek_id.clone(),
            })
            .collect()
    }

    /// A fresh KEK: its record (encrypted under `master`) and its key.
    fn new_kek(
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
    fn ensure_unchanged(&self) -> Result<(), KekError> {
        let bytes = fsutil::read_private(&self.path)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest != self.digest {
            return Err(KekError::KeyringChanged {
                path: fsutil::shown(&self.path),
            });
        }
        Ok(())
    }

    fn replace_file(&mut self) -> Result<(), KekError> {
        let bytes = self.to_bytes()?;
        fsutil::replace_private(&self.path, &bytes)?;
        self.digest = Sha256::digest(&bytes).into();
        Ok(())
    }
}

fn check_name(index: usize, name: &str) -> Result<(), KekError> {
    let chars = name.chars().count();
    let reason = if chars == 0 || chars > MAX_NAME_CHARS {
        Some("a name must be 1 to 64 characters")
    } else if name.chars().any(char::is_control) {
        Some("a name must be printable (no control characters)")
    } else if name.trim() != name {
        Some("a name must not start or end with whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KekError::InvalidCustodian { index, reason }),
        None => Ok(()),
    }
}

/// Names must differ, also ignoring case (`Alice` and `alice` would confuse
/// an operator).
fn check_unique<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), KekError> {
    let mut seen = BTreeSet::new();
    for (index, name) in names.enumerate() {
        if !seen.insert(name.to_lowercase()) {
            return Err(KekError::InvalidCustodian {
                index,
                reason: "custodian names must be unique",
            });
        }
    }
    Ok(())
}

fn check_passphrase(index: usize, passphrase: &str) -> Result<(), KekError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(KekError::PassphraseTooShort {
            min: MIN_PASSPHRASE_CHARS,
        });
    }
    if passphrase.len() > MAX_PASSPHRASE_BYTES {
        return Err(KekError::InvalidCustodian {
            index,
            reason: "a passphrase must be at most 1024 bytes",
        });
    }
    Ok(())
}

fn random<const N: usize>() -> Result<[u8; N], KekError> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|_| KekError::Rng)?;
    Ok(out)
}

/// Split `master` into `n` shares `x || y` (x = 1..=n), any `k` of which
/// reconstruct it.
fn split(master: &[u8; KEY_LEN], k: usize, n: usize) -> Result<Zeroizing<Vec<Vec<u8>>>, KekError> {
    // n <= 255 is checked by every caller.
    let ids = (1..=n).map(|x| u8::try_from(x).unwrap_or(u8::MAX));
    if k == 1 {
        return Ok(Zeroizing::new(
            ids.map(|x| {
                let mut share = Vec::with_capacity(SHARE_LEN);
                share.push(x);
                share.extend_from_slice(master);
                share
            })
            .collect(),
        ));
    }
    // vsss-rs draws one u32 per coefficient: 32 bytes x (k - 1) coefficients;
    // twice that is prefetched, and running short is an error, never a weak share.
    let mut rng = PrefetchedRng::new(KEY_LEN * (k - 1) * 8)?;
    let shares = Gf256::split_bytes_with_participant_ids_iter(
        k,
        n,
        master,
        &mut rng,
        ids.map(|x| IdentifierGf256(Gf256(x))),
    )
    .map_err(|e| KekError::SecretSharing {
        reason: e.to_string(),
    })?;
    let shares = Zeroizing::new(shares);
    if rng.exhausted {
        return Err(KekError::SecretSharing {
            reason: "ran out of prefetched randomness".to_owned(),
        });
    }
    Ok(shares)
}

/// Randomness for the polynomial coefficients: bytes read from the OS CSPRNG
/// up front (so a failing OS RNG is an error, not a panic inside the
/// splitter), handed out in order, zeroized on drop. Running out sets
/// `exhausted` (and yields zeros), which the caller turns into an error.
struct PrefetchedRng {
    bytes: Zeroizing<Vec<u8>>,
    pos: usize,
    exhausted: bool,
}

impl PrefetchedRng {
    fn new(len: usize) -> Result<Self, KekError> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        getrandom::getrandom(&mut bytes).map_err(|_| KekError::Rng)?;
        Ok(Self {
            bytes,
            pos: 0,
            exhausted: false,
        })
    }

    fn take(&mut self, dst: &mut [u8]) {
        match self.bytes.get(self.pos..self.pos + dst.len()) {
            Some(src) => {
                dst.copy_from_slice(src);
                self.pos += dst.len();
            }
            None => {
                self.exhausted = true;
                dst.fill(0);
            }
        }
    }
}

impl TryRng for PrefetchedRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.take(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.take(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.take(dst);
        Ok(())
    }
}

impl TryCryptoRng for PrefetchedRng {}

/// Reconstruct the master key from `k` shares `x || y`.
fn combine(shares: &[Zeroizing<Vec<u8>>]) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
    let mut master = Zeroizing::new([0u8; KEY_LEN]);
    if let [single] = shares {
        master.copy_from_slice(&single[1..]);
        return Ok(master);
    }
    let owned: Zeroizing<Vec<Vec<u8>>> =
        Zeroizing::new(shares.iter().map(|s| s.to_vec()).collect());
    let secret = Zeroizing::new(Gf256::combine_bytes(owned.as_slice()).map_err(|e| {
        KekError::SecretSharing {
            reason: e.to_string(),
        }
    })?);
    if secret.len() != KEY_LEN {
        return Err(KekError::ReconstructionFailed);
    }
    master.copy_from_slice(&secret);
    Ok(master)
}

// ---------------------------------------------------------------------------
// Sealed keyring

/// One KEK version of a keyring: its number and its (non-secret) id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekVersionInfo {
    pub version: u32,
    pub kek_id: String,
}

/// A keyring file, read and checked but sealed: no secret is available.
pub struct SealedKeyring {
    ring: Keyring,
}

impl fmt::Debug for SealedKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedKeyring")
            .field("path", &self.ring.path)
            .field("threshold", &self.ring.threshold)
            .field("custodians", &self.custodians())
            .field("versions", &self.ring.versions())
            .finish()
    }
}

impl SealedKeyring {
    /// Create a keyring at `path` (mode 0600; refuses an existing file): a
    /// fresh master key split among `custodians` (name, passphrase) so that
    /// any `threshold` of them reconstruct it, and KEK version 1 encrypted
    /// under it. N = `custodians.len()`; needs 1 <= K <= N <= 255, unique
    /// printable names, passphrases of at least 12 characters. The master key,
    /// shares and KEK are zeroized before this returns.
    pub fn init(
        path: &Path,
        threshold: usize,
        custodians: &[(&str, &str)],
        params: KdfParams,
    ) -> Result<Self, KekError> {
        let n = custodians.len();
        if n == 0 || n > MAX_CUSTODIANS || threshold == 0 || threshold > n {
            return Err(KekError::InvalidThreshold {
                threshold,
                custodians: n,
            });
        }
        for (index, (name, passphrase)) in custodians.iter().enumerate() {
            check_name(index, name)?;
            check_passphrase(index, passphrase)?;
        }
        check_unique(custodians.iter().map(|(name, _)| *name))?;
        params.check(ALLOW_WEAK_KDF)?;
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(KekError::AlreadyExists {
                path: fsutil::shown(path),
            });
        }

        let master = Zeroizing::new(random::<KEY_LEN>()?);
        let shares = split(&master, threshold, n)?;
        let mut ring = Keyring {
            path: path.to_owned(),
            keyring_id: random::<KEYRING_ID_LEN>()?,
            threshold,
            next_kek_version: 2,
            check: Sealed {
                nonce: [0; NONCE_LEN],
                ciphertext: Vec::new(),
            },
            custodians: Vec::with_capacity(n),
            keks: Vec::new(),
            digest: [0; 32],
        };
        for ((name, passphrase), share) in custodians.iter().zip(shares.iter()) {
            let salt = random::<SALT_LEN>()?;
            let key = params.derive(passphrase, &salt)?;
            let share = Sealed::seal(&key, share, &ring.share_aad(name))?;
            ring.custodians.push(Custodian {
                name: (*name).to_owned(),
                kdf: params,
                salt,
                share,
            });
        }
        ring.check = Sealed::seal(&master, b"", &ring.check_aad())?;
        let (first, _kek) = ring.new_kek(&master, 1)?;
        ring.keks.push(first);
        let bytes = ring.to_bytes()?;
        fsutil::create_private(path, &bytes)?;
        ring.digest = Sha256::digest(&bytes).into();
        Ok(Self { ring })
    }

    /// Read a keyring file (refused if group/other-accessible or malformed).
    pub fn open(path: &Path) -> Result<Self, KekError> {
        Ok(Self {
            ring: Keyring::load(path)?,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.ring.path
    }

    /// K: how many custodians unseal.
    pub fn threshold(&self) -> usize {
        self.ring.threshold
    }

    /// The custodians' names, in file order.
    pub fn custodians(&self) -> Vec<&str> {
        self.ring
            .custodians
            .iter()
            .map(|c| c.name.as_str())
            .collect()
    }

    /// The KEK versions in the file.
    pub fn versions(&self) -> Vec<KekVersionInfo> {
        self.ring.versions()
    }

    /// Start unsealing: custodians then submit their passphrases one by one.
    pub fn unsealer(self) -> Unsealer {
        Unsealer {
            ring: self.ring,
            shares: Vec::new(),
            unlocked: None,
        }
    }
}

// ---------------------------------------------------------------------------
// Unsealing

/// How far unsealing has come: `have` of the `need` custodians.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsealProgress {
    pub have: usize,
    pub need: usize,
}

impl UnsealProgress {
    /// Whether enough custodians have unsealed (the master key is
    /// reconstructed and verified).
    pub fn is_complete(&self) -> bool {
        self.have >= self.need
    }
}

struct Unlocked {
    master: Zeroizing<[u8; KEY_LEN]>,
    keks: BTreeMap<u32, SoftwareKek>,
}

/// Collects custodians' shares one at a time. Holds decrypted shares (and,
/// once complete, the master key) in zeroizing memory.
pub struct Unsealer {
    ring: Keyring,
    /// (custodian index, decrypted share `x || y`).
    shares: Vec<(usize, Zeroizing<Vec<u8>>)>,
    unlocked: Option<Unlocked>,
}

impl fmt::Debug for Unsealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let submitted: Vec<&str> = self
            .shares
            .iter()
            .filter_map(|(i, _)| self.ring.custodians.get(*i).map(|c| c.name.as_str()))
            .collect();
        f.debug_struct("Unsealer")
            .field("path", &self.ring.path)
            .field("progress", &self.progress())
            .field("submitted", &submitted)
            .finish_non_exhaustive()
    }
}

impl Unsealer {
    /// Progress so far.
    pub fn progress(&self) -> UnsealProgress {
        UnsealProgress {
            have: if self.unlocked.is_some() {
                self.ring.threshold
            } else {
                self.shares.len()
            },
            need: self.ring.threshold,
        }
    }

    /// Custodian `name` unseals with `passphrase`. A wrong passphrase is
    /// [`KekError::WrongPassphrase`] naming the custodian; an unknown name is
    /// [`KekError::UnknownCustodian`] (the input is not echoed: it might be a
    /// passphrase typed into the wrong field); a custodian who already
    /// submitted does not count twice (the progress is returned unchanged).
    /// The submission that reaches K reconstructs the master key and verifies
    /// it against the file; if that fails, every share is dropped and
    /// unsealing starts over.
    pub fn submit(&mut self, name: &str, passphrase: &str) -> Result<UnsealProgress, KekError> {
        let index = self
            .ring
            .custodians
            .iter()
            .position(|c| c.name == name)
            .ok_or(KekError::UnknownCustodian)?;
        if self.unlocked.is_some() || self.shares.iter().any(|(i, _)| *i == index) {
            return Ok(self.progress());
        }
        check_passphrase(index, passphrase)?;
        let custodian = &self.ring.custodians[index];
        let key = custodian.kdf.derive(passphrase, &custodian.salt)?;
        let share = custodian
            .share
            .open(&key, &self.ring.share_aad(&custodian.name))
            .ok_or_else(|| KekError::WrongPassphrase {
                custodian: custodian.name.clone(),
            })?;
        // Custodian i holds the share at x = i + 1 (file order).
        if share.len() != SHARE_LEN || usize::from(share[0]) != index + 1 {
            return Err(KekError::Malformed {
                path: fsutil::shown(&self.ring.path),
                reason: "a share does not belong to its custodian",
            });
        }
        self.shares.push((index, share));
        if self.shares.len() >= self.ring.threshold {
            let result = self.reconstruct();
            // The shares are not needed any more, whatever the outcome.
            self.shares.clear();
            self.unlocked = Some(result?);
        }
        Ok(self.progress())
    }

    fn reconstruct(&self) -> Result<Unlocked, KekError> {
        let shares: Vec<Zeroizing<Vec<u8>>> = self.shares.iter().map(|(_, s)| s.clone()).collect();
        let master = combine(&shares)?;
        if self
            .ring
            .check
            .open(&master, &self.ring.check_aad())
            .is_none()
        {
            return Err(KekError::ReconstructionFailed);
        }
        let mut keks = BTreeMap::new();
        for k in &self.ring.keks {
            let raw = k
                .key
                .open(&master, &self.ring.kek_aad(k.version, &k.kek_id))
                .ok_or_else(|| KekError::Malformed {
                    path: fsutil::shown(&self.ring.path),
                    reason: "a KEK version fails authentication under the master key",
                })?;
            let mut key = Zeroizing::new([0u8; KEY_LEN]);
            key.copy_from_slice(&raw);
            let kek = SoftwareKek::from_key(&key);
            if kek.kek_id() != k.kek_id {
                return Err(KekError::Malformed {
                    path: fsutil::shown(&self.ring.path),
                    reason: "a KEK does not match its recorded id",
                });
            }
            keks.insert(k.version, kek);
        }
        Ok(Unlocked { master, keks })
    }

    /// The unsealed keyring, once K custodians have submitted; otherwise
    /// [`KekError::NotEnoughShares`].
    pub fn finish(self) -> Result<UnsealedKeyring, KekError> {
        let progress = self.progress();
        let Some(Unlocked { master, keks }) = self.unlocked else {
            return Err(KekError::NotEnoughShares {
                have: progress.have,
                need: progress.need,
            });
        };
        Ok(UnsealedKeyring {
            ring: self.ring,
            master,
            state: Arc::new(RwLock::new(KekState {
                sealed: false,
                keks,
            })),
        })
    }
}

// ---------------------------------------------------------------------------
// Unsealed keyring

struct KekState {
    sealed: bool,
    keks: BTreeMap<u32, SoftwareKek>,
}

type SharedState = Arc<RwLock<KekState>>;

fn read(state: &SharedState) -> RwLockReadGuard<'_, KekState> {
    // The state is replaced entry by entry; a panic cannot leave a half-made
    // entry behind.
    state.read().unwrap_or_else(|p| p.into_inner())
}

fn write(state: &SharedState) -> RwLockWriteGuard<'_, KekState> {
    state.write().unwrap_or_else(|p| p.into_inner())
}

/// An unsealed keyring: the master key and the KEK versions in memory.
/// Sealing it ([`UnsealedKeyring::seal`] or drop) zeroizes them all at once;
/// [`KeyringKek`] handles then fail with [`KekError::Sealed`].
pub struct UnsealedKeyring {
    ring: Keyring,
    master: Zeroizing<[u8; KEY_LEN]>,
    state: SharedState,
}

impl fmt::Debug for UnsealedKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsealedKeyring")
            .field("path", &self.ring.path)
            .field("versions", &self.ring.versions())
            .finish_non_exhaustive()
    }
}

impl Drop for UnsealedKeyring {
    fn drop(&mut self) {
        let mut state = write(&self.state);
        state.sealed = true;
        // Dropping the SoftwareKeks zeroizes their key schedules.
        state.keks.clear();
        self.master.zeroize();
    }
}

impl UnsealedKeyring {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.ring.path
    }

    /// The KEK versions, oldest first.
    pub fn versions(&self) -> Vec<KekVersionInfo> {
        self.ring.versions()
    }

    /// A handle on KEK `version`.
    pub fn kek(&self, version: u32) -> Result<KeyringKek, KekError> {
        let entry = self
            .ring
            .keks
            .iter()
            .find(|k| k.version == version)
            .ok_or(KekError::KekVersionNotFound { version })?;
        Ok(KeyringKek {
            state: self.state.clone(),
            version,
            id: entry.kek_id.clone(),
        })
    }

    /// A handle on the newest KEK version, if any is left.
    pub fn current_kek(&self) -> Option<KeyringKek> {
        let newest = self.ring.keks.iter().map(|k| k.version).max()?;
        self.kek(newest).ok()
    }

    /// Create a new KEK version, encrypted under the master key, and write it
    /// to the file (atomic replace). Returns a handle on it.
    pub fn add_kek_version(&mut self) -> Result<KeyringKek, KekError> {
        self.ring.ensure_unchanged()?;
        let version = self.ring.next_kek_version;
        let next = version.checked_add(1).ok_or(KekError::Malformed {
            path: fsutil::shown(&self.ring.path),
            reason: "KEK versions exhausted",
        })?;
        let (entry, kek) = self.ring.new_kek(&self.master, version)?;
        self.ring.keks.push(entry);
        self.ring.next_kek_version = next;
        if let Err(e) = self.ring.replace_file() {
            self.ring.keks.pop();
            self.ring.next_kek_version = version;
            return Err(e);
        }
        write(&self.state).keks.insert(version, kek);
        self.kek(version)
    }

    /// Remove KEK `version` from the file (atomic replace) and from memory: a
    /// crypto-shred of that version once no old copy of the file survives
    /// (backups of the keyring file keep it). Handles on it then fail with
    /// [`KekError::KekGone`].
    pub fn destroy_kek_version(&mut self, version: u32) -> Result<(), KekError> {
        let pos = self
            .ring
            .keks
            .iter()
            .position(|k| k.version == version)
            .ok_or(KekError::KekVersionNotFound { version })?;
        self.ring.ensure_unchanged()?;
        let entry = self.ring.keks.remove(pos);
        if let Err(e) = self.ring.replace_file() {
            self.ring.keks.insert(pos, entry);
            return Err(e);
        }
        write(&self.state).keks.remove(&version);
        Ok(())
    }

    /// Seal: zeroize the master key and every KEK now.
    pub fn seal(self) {
        drop(self);
    }
}

/// A handle on one KEK version of an unsealed keyring. `Send + Sync`; fails
/// with [`KekError::Sealed`] once the keyring is sealed and with
/// [`KekError::KekGone`] once its version is destroyed.
#[derive(Clone)]
pub struct KeyringKek {
    state: SharedState,
    version: u32,
    id: String,
}

impl fmt::Debug for KeyringKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyringKek")
            .field("version", &self.version)
            .field("kek_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl KeyringKek {
    /// The KEK version number.
    pub fn version(&self) -> u32 {
        self.version
    }

    fn with<T>(&self, f: impl FnOnce(&SoftwareKek) -> Result<T, KekError>) -> Result<T, KekError> {
        let state = read(&self.state);
        if state.sealed {
            return Err(KekError::Sealed {
                what: "the keyring".to_owned(),
            });
        }
        match state.keks.get(&self.version) {
            Some(kek) => f(kek),
            None => Err(KekError::KekGone {
                kek: self.id.clone(),
            }),
        }
    }
}

impl KeyEncryptionKey for KeyringKek {
    fn kek_id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, label: &str, key: &[u8]) -> Result<Vec<u8>, KekError> {
        self.with(|k| k.wrap(label, key))
    }

    fn unwrap(&self, label: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KekError> {
        self.with(|k| k.unwrap(label, wrapped))
    }
}
