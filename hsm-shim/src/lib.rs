//! Key-encryption keys (KEKs) of cardvault behind one small trait: the one joint
//! where a software key or a hardware security module plugs in.
//!
//! This crate owns exactly one thing: wrapping and unwrapping other keys (data
//! keys, fingerprint keys, signing keys) under a KEK that never leaves its
//! backend. It knows nothing about cards: card data never reaches it, only key
//! material of the vault's own keys.
//!
//! Public API:
//! - [`KeyEncryptionKey`]: the trait every backend implements (`wrap`, `unwrap`, `kek_id`).
//! - [`SoftwareKek`]: a KEK held in a key file readable only by the service user.
//! - [`KekError`]: what can go wrong, never containing key material.
//!
//! A PKCS#11 backend (SoftHSM2 in tests) will implement the same trait.
#![forbid(unsafe_code)]

mod software;

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

/// Errors of KEK backends. Messages name paths and causes, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("KEK file {path} could not be read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KEK file {path} could not be written: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KEK file {path} already exists; refusing to overwrite a key")]
    AlreadyExists { path: String },
    #[error(
        "KEK file {path} is accessible by group or others (mode {mode:o}); it must be readable only by the service user (chmod 600)"
    )]
    InsecurePermissions { path: String, mode: u32 },
    #[error("KEK file {path} is malformed: {reason}")]
    Malformed { path: String, reason: &'static str },
    #[error("wrapped key is malformed")]
    MalformedBlob,
    #[error("wrapped key failed authentication (wrong KEK, wrong label or tampered blob)")]
    UnwrapFailed,
    #[error("the operating system random number generator failed")]
    Rng,
}
