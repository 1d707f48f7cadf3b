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
//!
//! # Code
//!
//! This module holds the entry point [`SealedKeyring`] (creating a keyring,
//! opening its file sealed), the constants of the format and the input
//! rules (custodian names, passphrases). Then, in the order of a keyring's
//! life:
//! - `kdf`: [`KdfParams`], the argon2id parameters and the derivation of a
//!   custodian's share key;
//! - `file`: the file format, its AES-256-GCM boxes and associated data,
//!   loading and checking a file, atomic replacement;
//! - `shamir`: splitting the master key into shares and combining them
//!   (`vsss-rs`);
//! - `unseal`: [`Unsealer`] and [`UnsealProgress`], collecting custodians'
//!   shares up to the threshold;
//! - `unsealed`: [`UnsealedKeyring`] and its [`KeyringKek`] handles, adding
//!   and destroying KEK versions, sealing.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fsutil;
use crate::{KekError, NONCE_LEN};

mod file;
mod kdf;
mod shamir;
mod unseal;
mod unsealed;

pub use kdf::KdfParams;
pub use unseal::{UnsealProgress, Unsealer};
pub use unsealed::{KeyringKek, UnsealedKeyring};

use file::{Custodian, Keyring, Sealed};
use shamir::split;

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
