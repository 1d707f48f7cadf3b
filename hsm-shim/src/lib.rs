//! Key-encryption keys (KEKs) of cardvault behind one small trait: the one joint
//! where a software key or a hardware security module plugs in.
//!
//! This crate owns exactly one thing: wrapping and unwrapping other keys (data
//! keys, fingerprint keys, signing keys) under a KEK that never leaves its
//! backend. It knows nothing about cards: card data never reaches it, only key
//! material of the vault's own keys.
//!
//! # Public API
//!
//! - [`KeyEncryptionKey`]: the trait every backend implements (`kek_id`,
//!   `wrap(label, key)`, `unwrap(label, blob)`).
//! - [`KekError`]: what can go wrong; never carries key material, a PIN or a
//!   passphrase.
//!
//! Backends:
//!
//! - [`SoftwareKek`]: a KEK in a key file readable only by the service user
//!   (development and small installations).
//! - PKCS#11 ([`pkcs11`] module; SoftHSM2 in tests): [`Pkcs11Config`] (module,
//!   token label, PIN source, KEK label), [`Pin`] (`Pin::from_file`,
//!   `Pin::from_env`; zeroized, redacted), [`Pkcs11Token`] (`open` = sealed,
//!   `login` = unseal, `logout`, `generate_kek`, `kek`, `destroy_kek`,
//!   `kek_labels`), [`Pkcs11Kek`] (AES-256 key generated inside the token,
//!   non-extractable; wrap = CKM_AES_GCM inside the token; `Send + Sync`).
//! - Split knowledge ([`keyring`] module): [`SealedKeyring`] (`init` with K-of-N
//!   custodians, `open`, `unsealer`), [`Unsealer`] (`submit(name,
//!   passphrase)` -> [`UnsealProgress`], `finish`), [`UnsealedKeyring`]
//!   (`kek`, `current_kek`, `versions`, `add_kek_version`,
//!   `destroy_kek_version`, `seal`), [`KeyringKek`] (a live handle on one KEK
//!   version), [`KdfParams`] (argon2id parameters of the custodians' shares),
//!   [`KekVersionInfo`].
//!
//! Every backend writes the same blob: `0x01 || nonce(12) || AES-256-GCM
//! ciphertext || tag(16)`, associated data `"cardvault/kek-wrap/v1\0" ||
//! label`. A key moved from one backend into another (for example a software
//! KEK imported into an HSM) therefore unwraps the blobs it wrapped before.
//!
//! Invariants: no secret (key, PIN, passphrase, share) appears in a `Debug`
//! output, an error message, a log line or a panic; secrets in memory are
//! zeroized when dropped.
//!
//! Feature `insecure-test-kdf` (off by default, for other crates'
//! dev-dependencies only) adds [`KdfParams`]`::insecure_fast_for_tests`.
//!
//! Tests: one suite (`src/tests/mod.rs`) runs the same properties against
//! every backend: the software key file, the unsealed keyring and PKCS#11 on
//! SoftHSM2. SoftHSM2 (`/usr/lib/softhsm/libsofthsm2.so`, Debian package
//! `softhsm2`; another path through `CARDVAULT_TEST_PKCS11_MODULE`) is
//! required: without it the PKCS#11 tests fail with a message saying so,
//! they never skip. Each test makes its own token in a token directory of
//! its own test run (`SOFTHSM2_CONF` is set once per test binary, before the
//! module is initialised).
#![forbid(unsafe_code)]

mod fsutil;
pub mod keyring;
pub mod pkcs11;
mod software;

#[cfg(test)]
mod tests;

pub use fsutil::is_private_file;
pub use keyring::{
    KdfParams, KekVersionInfo, KeyringKek, SealedKeyring, UnsealProgress, UnsealedKeyring, Unsealer,
};
pub use pkcs11::{Pin, PinSource, Pkcs11Config, Pkcs11Kek, Pkcs11Token};
pub use software::SoftwareKek;

use zeroize::Zeroizing;

/// A key-encryption key. Implementations keep the key inside their backend and
/// expose only wrap and unwrap.
///
/// `label` names the wrapped key (for example `dek:1`, `fingerprint:1`) and is
/// authenticated with the wrapped blob: a blob wrapped under one label does not
/// unwrap under another, so a wrapped key cannot be swapped for another row's.
pub trait KeyEncryptionKey: Send + Sync + std::fmt::Debug {
    /// A stable, non-secret identifier of this KEK, stored next to wrapped keys
    /// so that a wrong KEK is reported as such rather than as corrupt data.
    fn kek_id(&self) -> &str;

    /// Wrap `key` (raw key bytes of a vault key) under this KEK.
    fn wrap(&self, label: &str, key: &[u8]) -> Result<Vec<u8>, KekError>;

    /// Unwrap a blob produced by [`KeyEncryptionKey::wrap`] with the same label.
    fn unwrap(&self, label: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KekError>;
}

/// Errors of KEK backends. Messages name paths, labels, custodians and causes,
/// never key bytes, PINs or passphrases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KekError {
    #[error("file {path} could not be read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file {path} could not be written: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file {path} already exists; refusing to overwrite a key")]
    AlreadyExists { path: String },
    #[error(
        "file {path} is accessible by group or others (mode {mode:o}); a file holding a key, share or PIN must be readable only by its owner (chmod 600; or 640 when owned by root)"
    )]
    InsecurePermissions { path: String, mode: u32 },
    #[error("file {path} is malformed: {reason}")]
    Malformed { path: String, reason: &'static str },
    #[error("wrapped key is malformed")]
    MalformedBlob,
    #[error("wrapped key failed authentication (wrong KEK, wrong label or tampered blob)")]
    UnwrapFailed,
    #[error("the operating system random number generator failed")]
    Rng,

    // PKCS#11.
    #[error("PKCS#11 module {module} could not be loaded: {reason}")]
    Pkcs11Module { module: String, reason: String },
    #[error("PKCS#11 {op} failed: {code}")]
    Pkcs11 { op: String, code: String },
    #[error("no PKCS#11 token labelled {token:?}")]
    TokenNotFound { token: String },
    #[error("{count} PKCS#11 tokens are labelled {token:?}; token labels must be unique")]
    TokenAmbiguous { token: String, count: usize },
    #[error("{what} is sealed: log in (PKCS#11) or unseal (keyring) first")]
    Sealed { what: String },
    #[error("the user PIN of token {token:?} was refused")]
    WrongPin { token: String },
    #[error("the user PIN of token {token:?} is locked; the security officer must reset it")]
    PinLocked { token: String },
    #[error("PIN from {from} is unusable: {reason}")]
    PinUnavailable { from: String, reason: &'static str },
    #[error("invalid {what}: {reason}")]
    InvalidLabel {
        what: &'static str,
        reason: &'static str,
    },
    #[error("no KEK labelled {label:?} in the token")]
    KekNotFound { label: String },
    #[error("a KEK labelled {label:?} already exists; refusing to create another")]
    KekExists { label: String },
    #[error("{count} KEKs are labelled {label:?}; KEK labels must be unique")]
    KekAmbiguous { label: String, count: usize },
    #[error("KEK {label:?} does not meet the key policy: {reason}")]
    KekPolicy { label: String, reason: &'static str },
    #[error("KEK {kek} no longer exists (destroyed)")]
    KekGone { kek: String },

    // Split-knowledge keyring.
    #[error("passphrases must be at least {min} characters long")]
    PassphraseTooShort { min: usize },
    #[error("the passphrase of custodian {custodian:?} was refused")]
    WrongPassphrase { custodian: String },
    #[error("no such custodian in this keyring")]
    UnknownCustodian,
    #[error("custodian #{index} is invalid: {reason}")]
    InvalidCustodian { index: usize, reason: &'static str },
    #[error(
        "threshold {threshold} is invalid for {custodians} custodians (need 1 <= K <= N <= 255)"
    )]
    InvalidThreshold { threshold: usize, custodians: usize },
    #[error("argon2 parameters refused: {reason}")]
    KdfParams { reason: &'static str },
    #[error("argon2 key derivation failed")]
    Kdf,
    #[error("{have} of {need} custodians have unsealed so far")]
    NotEnoughShares { have: usize, need: usize },
    #[error(
        "the shares do not reconstruct this keyring's master key (shares of another keyring, or a tampered keyring file)"
    )]
    ReconstructionFailed,
    #[error("secret sharing failed: {reason}")]
    SecretSharing { reason: String },
    #[error("no KEK version {version} in the keyring")]
    KekVersionNotFound { version: u32 },
    #[error("keyring file {path} changed on disk since it was read; unseal again and retry")]
    KeyringChanged { path: String },
}

/// Format version of a wrapped blob (all backends).
pub(crate) const BLOB_VERSION: u8 = 1;
/// AES-GCM nonce: 96 bits, fresh from a CSPRNG for every wrap.
pub(crate) const NONCE_LEN: usize = 12;
/// AES-GCM tag: 128 bits.
pub(crate) const TAG_LEN: usize = 16;
const WRAP_AAD_PREFIX: &[u8] = b"cardvault/kek-wrap/v1\0";

/// Associated data of a wrapped blob: a domain-separation prefix plus the label.
pub(crate) fn wrap_aad(label: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_PREFIX.len() + label.len());
    aad.extend_from_slice(WRAP_AAD_PREFIX);
    aad.extend_from_slice(label.as_bytes());
    aad
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| {
            [
                char::from(DIGITS[usize::from(b >> 4)]),
                char::from(DIGITS[usize::from(b & 0x0f)]),
            ]
        })
        .collect()
}
