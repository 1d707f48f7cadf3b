//! Signed checkpoints of the audit trail, and the Ed25519 keys that sign
//! and verify them.
//!
//! A [`Checkpoint`] states "the first `tree_size` entries have Merkle root
//! `root` and chain hash `chain_head`, as of `time`", signed by the
//! checkpoint key. The database never holds that key in clear (the service
//! keeps it wrapped by the KEK), so whoever can rewrite the database can
//! rebuild the chain and the tree but cannot sign a matching checkpoint.
//!
//! Signed bytes ([`Checkpoint::signed_bytes`]), all integers big-endian:
//!
//! ```text
//! "cardvault/audit-checkpoint/v1"      29 bytes, domain tag
//! tree_size                            u64
//! root                                 32 bytes
//! chain_head                           32 bytes
//! time                                 i128, nanoseconds since the Unix epoch
//! len(key_id) || key_id                u32 || UTF-8
//! ```
//!
//! A *key announcement* (the hand-over to a new signing key, see
//! [`SigningKey::sign_announcement`]) is a checkpoint that also names the
//! next key: it is signed by the old key over
//!
//! ```text
//! "cardvault/audit-checkpoint/v2"      29 bytes, domain tag
//! tree_size, root, chain_head, time,   exactly as in v1
//! len(key_id) || key_id
//! next_key                             32 bytes, the new Ed25519 public key
//! ```
//!
//! A checkpoint without `next_key` is signed over the v1 bytes, so trails
//! from before key rotation verify as they always did.
//!
//! JSON (one object per line): `{"tree_size":N,"root":"<hex>","chain_head":
//! "<hex>","time":"<RFC 3339, UTC>","key_id":"<16 hex>","signature":
//! "<128 hex>"}`; an announcement has `"next_key":"cardvault-audit-ed25519:
//! <64 hex>"` between `key_id` and `signature`. Unknown or missing fields
//! are refused.
//!
//! Key id: the first 8 bytes of SHA-256 of the 32-byte public key, in hex.
//! Public key file for auditors: one line `cardvault-audit-ed25519:<64 hex>`
//! ([`VerifyingKey`]'s `Display` and [`VerifyingKey::parse`]); a keys file
//! holds several such lines ([`VerifyingKey::parse_many`]).
//!
//! Which keys a verifier accepts is a [`TrustedKeys`]: the keys the auditor
//! gives, plus every key announced by a checkpoint of a trusted key that
//! verified against the entries; a key that announced its successor is not
//! accepted for any later checkpoint (it no longer signs).

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, UtcOffset};
use zeroize::Zeroizing;

use crate::hex;

/// Domain tag at the start of every checkpoint's signed bytes.
pub const CHECKPOINT_TAG: &[u8] = b"cardvault/audit-checkpoint/v1";
/// Domain tag of a key announcement's signed bytes (a checkpoint naming the
/// next signing key).
pub const ANNOUNCEMENT_TAG: &[u8] = b"cardvault/audit-checkpoint/v2";
/// Prefix of the public key line.
pub const PUBLIC_KEY_PREFIX: &str = "cardvault-audit-ed25519:";

/// A signed statement of the trail's size, Merkle root and chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Number of entries covered (entries with seq 1..=tree_size).
    pub tree_size: u64,
    /// Merkle Tree Hash of the leaf hashes of those entries.
    #[serde(with = "hex::array")]
    pub root: [u8; 32],
    /// Chain hash of entry `tree_size` (32 zero bytes when it is 0).
    #[serde(with = "hex::array")]
    pub chain_head: [u8; 32],
    /// When the checkpoint was signed (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Id of the key that signed it (see [`VerifyingKey::key_id`]).
    pub key_id: String,
    /// A key announcement: the key that signs the checkpoints after this
    /// one (signed by the key `key_id`, the one it replaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<VerifyingKey>,
    #[serde(with = "hex::array")]
    pub signature: [u8; 64],
}

impl Checkpoint {
    /// The exact bytes the signature covers (layout in the module doc).
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes(
            self.tree_size,
            &self.root,
            &self.chain_head,
            self.time,
            &self.key_id,
            self.next_key.as_ref(),
        )
    }

    /// Check the signature with `key` (which must be the key named by
    /// `key_id`). Signatures are checked strictly: no small-order keys, no
    /// malleable signatures.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), CheckpointError> {
        if self.key_id != key.key_id {
            return Err(CheckpointError::UnknownKey {
                key_id: self.key_id.clone(),
            });
        }
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.key
            .verify_strict(&self.signed_bytes(), &signature)
            .map_err(|_| CheckpointError::BadSignature)
    }
}

fn signed_bytes(
    tree_size: u64,
    root: &[u8; 32],
    chain_head: &[u8; 32],
    time: OffsetDateTime,
    key_id: &str,
    next_key: Option<&VerifyingKey>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHECKPOINT_TAG.len() + 8 + 64 + 16 + 4 + key_id.len() + 32);
    out.extend_from_slice(match next_key {
        None => CHECKPOINT_TAG,
        Some(_) => ANNOUNCEMENT_TAG,
    });
    out.extend_from_slice(&tree_size.to_be_bytes());
    out.extend_from_slice(root);
    out.extend_from_slice(chain_head);
    out.extend_from_slice(&time.unix_timestamp_nanos().to_be_bytes());
    // A key id is 16 characters; anything longer than 4 GiB cannot verify.
    let len = u32::try_from(key_id.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(key_id.as_bytes());
    if let Some(next) = next_key {
        out.extend_from_slice(next.key.as_bytes());
    }
    out
}

/// Why a checkpoint does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint signed by key {key_id}, which is not trusted (neither given nor announced by a trusted key)")]
    UnknownKey { key_id: String },
    #[error("checkpoint signed by key {key_id}, which handed over to key {next_key_id} at the checkpoint for {handed_over_at} entries and signs nothing after it")]
    RetiredKey {
        key_id: String,
        next_key_id: String,
        handed_over_at: u64,
    },
    #[error("checkpoint signature is invalid")]
    BadSignature,
}

/// Problems with key material. Never carries the key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the operating system's random generator failed")]
    Random,
    #[error("a checkpoint secret key is 32 bytes, got {0}")]
    SecretLength(usize),
    #[error("a public key line is `{PUBLIC_KEY_PREFIX}` followed by 64 lowercase hex digits")]
    PublicKeyFormat,
    #[error("not a valid Ed25519 public key")]
    InvalidPublicKey,
    #[error("refused: a small-order (weak) Ed25519 public key")]
    WeakPublicKey,
}

/// The checkpoint signing key (Ed25519). Held in memory only, zeroized on
/// drop; no `Clone`, and `Debug` shows only the key id. Stored wrapped by
/// the KEK: [`SigningKey::expose_secret`] gives the 32 bytes to wrap.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    public: VerifyingKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key from the operating system's random generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(&mut secret[..]).map_err(|_| KeyError::Random)?;
        Ok(Self::from_secret(&secret))
    }

    /// The key whose 32-byte Ed25519 secret is `secret`.
    pub fn from_secret(secret: &Zeroizing<[u8; 32]>) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(secret);
        let public = VerifyingKey::from_dalek(key.verifying_key());
        Self { key, public }
    }

    /// The same from a slice (e.g. what the KEK unwrapped); it must be 32 bytes.
    pub fn from_secret_slice(secret: &[u8]) -> Result<Self, KeyError> {
        let bytes: &[u8; 32] = secret
            .try_into()
            .map_err(|_| KeyError::SecretLength(secret.len()))?;
        Ok(Self::from_secret(&Zeroizing::new(*bytes)))
    }

    /// The 32 secret bytes, to be wrapped by the KEK and nothing else.
    pub fn expose_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// Sign `message`, which must begin with a domain tag of its own (the
    /// backup's `cardvault/backup/v1`, say) so that it can never be taken
    /// for a checkpoint's signed bytes. The secret stays in this key.
    pub fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        ed25519_dalek::Signer::sign(&self.key, message).to_bytes()
    }

    /// The public half, for auditors.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.public.clone()
    }

    /// Short id of the public key (stamped into every checkpoint).
    pub fn key_id(&self) -> &str {
        &self.public.key_id
    }

    /// Sign a checkpoint for the first `tree_size` entries (time is stored
    /// in UTC).
    pub fn sign_checkpoint(
        &self,
        tree_size: u64,
        root: [u8; 32],
        chain_head: [u8; 32],
        time: OffsetDateTime,
    ) -> Checkpoint {
        self.sign(tree_size, root, chain_head, time, None)
    }

    /// Sign a key announcement: a checkpoint for the first `tree_size`
    /// entries that also names `next`, the key that signs every checkpoint
    /// after it (v2 signed bytes, see the module doc).
    pub fn sign_announcement(
        &self,
        tree_size: u64,
        root: [u8; 32],
        chain_head: [u8; 32],
        time: OffsetDateTime,
        next: &VerifyingKey,
    ) -> Checkpoint {
        self.sign(tree_size, root, chain_head, time, Some(next.clone()))
    }

    fn sign(
        &self,
        tree_size: u64,
        root: [u8; 32],
        chain_head: [u8; 32],
        time: OffsetDateTime,
        next_key: Option<VerifyingKey>,
    ) -> Checkpoint {
        let time = time.to_offset(UtcOffset::UTC);
        let key_id = self.public.key_id.clone();
        let bytes = signed_bytes(
            tree_size,
            &root,
            &chain_head,
            time,
            &key_id,
            next_key.as_ref(),
        );
        let signature = self.key.sign(&bytes).to_bytes();
        Checkpoint {
            tree_size,
            root,
            chain_head,
            time,
            key_id,
            next_key,
            signature,
        }
    }
}

/// The checkpoint verification key: all an auditor needs.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    key: ed25519_dalek::VerifyingKey,
    key_id: String,
}

impl VerifyingKey {
    fn from_dalek(key: ed25519_dalek::VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let key_id = hex::encode(&digest[..8]);
        Self { key, key_id }
    }

    /// From the 32-byte public key. Refuses encodings that are not a curve
    /// point and small-order (weak) keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map_err(|_| KeyError::InvalidPublicKey)?;
        if key.is_weak() {
            return Err(KeyError::WeakPublicKey);
        }
        Ok(Self::from_dalek(key))
    }

    /// Parse the public key line `cardvault-audit-ed25519:<64 hex>`
    /// (surrounding whitespace, such as the file's newline, is ignored).
    pub fn parse(line: &str) -> Result<Self, KeyError> {
        let bytes = line
            .trim()
            .strip_prefix(PUBLIC_KEY_PREFIX)
            .and_then(hex::decode_array::<32>)
            .ok_or(KeyError::PublicKeyFormat)?;
        Self::from_bytes(&bytes)
    }

    /// Parse a keys file: one public key line per key (blank lines and
    /// lines starting with `#` are skipped). At least one key.
    pub fn parse_many(text: &str) -> Result<Vec<Self>, KeyError> {
        let keys = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(Self::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KeyError::PublicKeyFormat);
        }
        Ok(keys)
    }

    /// The 32-byte public key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// First 8 bytes of SHA-256 of the public key, as 16 hex digits.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

/// The public key line, without a newline.
impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", hex::encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({self})")
    }
}

impl FromStr for VerifyingKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

/// As its public key line (`cardvault-audit-ed25519:<64 hex>`).
impl Serialize for VerifyingKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VerifyingKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let line = String::deserialize(d)?;
        // Exactly the line, no surrounding whitespace (canonical form).
        if line.trim() != line {
            return Err(serde::de::Error::custom(KeyError::PublicKeyFormat));
        }
        Self::parse(&line).map_err(serde::de::Error::custom)
    }
}

/// How a verifier came to trust a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Given by the auditor (a key file).
    Given,
    /// Announced by the checkpoint for `tree_size` entries, signed by the
    /// trusted key `by`, which verified against the entries.
    Announced { by: String, tree_size: u64 },
}

/// A key that handed over to its successor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The announcement's tree size: the old key signs nothing after it.
    pub tree_size: u64,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TrustedKey {
    key: VerifyingKey,
    trust: Trust,
}

/// The keys a verifier accepts checkpoints from: the auditor's keys, plus
/// the keys announced along the trail (see the module doc). Build it from
/// one key (`From<VerifyingKey>`) or several ([`TrustedKeys::new`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: std::collections::BTreeMap<String, TrustedKey>,
    handovers: Vec<Handover>,
}

impl TrustedKeys {
    /// The keys the auditor trusts from the start.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        let mut out = Self::default();
        for key in keys {
            out.keys.insert(
                key.key_id.clone(),
                TrustedKey {
                    key,
                    trust: Trust::Given,
                },
            );
        }
        out
    }

    /// The trusted key with this id, if any (given or announced so far).
    pub fn get(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys.get(key_id).map(|k| &k.key)
    }

    /// How the key with this id came to be trusted.
    pub fn trust(&self, key_id: &str) -> Option<&Trust> {
        self.keys.get(key_id).map(|k| &k.trust)
    }

    /// Hand-overs accepted so far, in trail order.
    pub fn handovers(&self) -> &[Handover] {
        &self.handovers
    }

    /// Check a checkpoint's signature: its key must be trusted, must not
    /// have handed over to a successor at a smaller tree size, and an
    /// announcement must not name a second successor.
    pub fn verify(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let key = self
            .get(&checkpoint.key_id)
            .ok_or_else(|| CheckpointError::UnknownKey {
                key_id: checkpoint.key_id.clone(),
            })?;
        if let Some(h) = self
            .handovers
            .iter()
            .find(|h| h.from == checkpoint.key_id && checkpoint.tree_size > h.tree_size)
        {
            return Err(CheckpointError::RetiredKey {
                key_id: h.from.clone(),
                next_key_id: h.to.clone(),
                handed_over_at: h.tree_size,
            });
        }
        // A key hands over once: a second announcement by it, naming
        // another key (even at the same tree size, whose root and head are
        // public), would let whoever holds the retired key mint a successor.
        if let Some(next) = &checkpoint.next_key {
            if let Some(h) = self
                .handovers
                .iter()
                .find(|h| h.from == checkpoint.key_id && h.to != next.key_id)
            {
                return Err(CheckpointError::RetiredKey {
                    key_id: h.from.clone(),
                    next_key_id: h.to.clone(),
                    handed_over_at: h.tree_size,
                });
            }
        }
        checkpoint.verify(key)
    }

    /// Record what a checkpoint that fully verified (its signature with
    /// [`TrustedKeys::verify`], and its root and chain head against the
    /// entries) announces: its next key becomes trusted, and its signer
    /// signs nothing after it. Call only after both checks.
    pub fn accept(&mut self, checkpoint: &Checkpoint) {
        let Some(next) = &checkpoint.next_key else {
            return;
        };
        let handover = Handover {
            tree_size: checkpoint.tree_size,
            from: checkpoint.key_id.clone(),
            to: next.key_id.clone(),
        };
        if next.key_id == checkpoint.key_id || self.handovers.contains(&handover) {
            return;
        }
        self.keys
            .entry(next.key_id.clone())
            .or_insert_with(|| TrustedKey {
                key: next.clone(),
                trust: Trust::Announced {
                    by: checkpoint.key_id.clone(),
                    tree_size: checkpoint.tree_size,
                },
            });
        self.handovers.push(handover);
    }
}

impl From<VerifyingKey> for TrustedKeys {
    fn from(key: VerifyingKey) -> Self {
        Self::new([key])
    }
}

impl From<&VerifyingKey> for TrustedKeys {
    fn from(key: &VerifyingKey) -> Self {
        Self::new([key.clone()])
    }
}

impl From<&TrustedKeys> for TrustedKeys {
    fn from(keys: &TrustedKeys) -> Self {
        keys.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use time::macros::datetime;

    fn rfc8032_key() -> SigningKey {
        // RFC 8032 section 7.1, TEST 1.
        let secret =
            hex::decode_array("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap();
        SigningKey::from_secret(&Zeroizing::new(secret))
    }

    #[test]
    fn public_key_line_known_answer_and_round_trip() {
        let key = rfc8032_key();
        let public = key.verifying_key();
        let line = public.to_string();
        assert_eq!(
            line,
            "cardvault-audit-ed25519:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let digest = Sha256::digest(public.to_bytes());
        assert_eq!(public.key_id(), hex::encode(&digest[..8]));
        assert_eq!(key.key_id(), public.key_id());
        assert_eq!(VerifyingKey::parse(&format!("{line}\n")).unwrap(), public);
        assert_eq!(line.parse::<VerifyingKey>().unwrap(), public);
        for bad in [
            "",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "cardvault-audit-ed25519:D75A980182B10AB7D54BFED3C964073A0EE172F3DAA62325AF021A68F707511A",
            "cardvault-audit-ed25519:d75a98",
        ] {
            assert_eq!(VerifyingKey::parse(bad), Err(KeyError::PublicKeyFormat), "{bad}");
        }
        // The identity point: small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            VerifyingKey::from_bytes(&identity),
            Err(KeyError::WeakPublicKey)
        );
    }

    #[test]
    fn secret_round_trip_and_no_secret_in_debug() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_secret_slice(&key.expose_secret()[..]).unwrap();
        assert_eq!(again.verifying_key(), key.verifying_key());
        assert_ne!(SigningKey::generate().unwrap().key_id(), key.key_id());
        assert_eq!(
            SigningKey::from_secret_slice(&[0; 31]).err(),
            Some(KeyError::SecretLength(31))
        );
        let debug = format!("{:?}", rfc8032_key());
        assert!(!debug.contains("9d61"), "{debug}");
        assert!(!debug.to_lowercase().contains("secret"), "{debug}");
    }

    #[test]
    fn signed_bytes_layout() {
        let key = rfc8032_key();
        let cp = key.sign_checkpoint(5, [1; 32], [2; 32], datetime!(2025-01-01 00:00:00 UTC));
        let mut expected = b"cardvault/audit-checkpoint/v1".to_vec();
        expected.extend_from_slice(&5u64.to_be_bytes());
        expected.extend_from_slice(&[1; 32]);
        expected.extend_from_slice(&[2; 32]);
        expected.extend_from_slice(&(1_735_689_600i128 * 1_000_000_000).to_be_bytes());
        expected.extend_from_slice(&16u32.to_be_bytes());
        expected.extend_from_slice(key.key_id().as_bytes());
        assert_eq!(cp.signed_bytes(), expected);
    }

    #[test]
    fn sign_verify_and_every_field_is_covered() {
        let key = rfc8032_key();
        let public = key.verifying_key();
        let time = datetime!(2025-01-01 10:00:00.123456789 +02:00);
        let cp = key.sign_checkpoint(42, [3; 32], [4; 32], time);
        assert_eq!(cp.time.offset(), UtcOffset::UTC);
        assert_eq!(cp.time, time);
        assert_eq!(cp.verify(&public), Ok(()));

        let mut changed = Vec::new();
        let mut c = cp.clone();
        c.tree_size += 1;
        changed.push(c);
        let mut c = cp.clone();
        c.root[31] ^= 1;
        changed.push(c);
        let mut c = cp.clone();
        c.chain_head[0] ^= 1;
        changed.push(c);
        let mut c = cp.clone();
        c.time += time::Duration::nanoseconds(1);
        changed.push(c);
        let mut c = cp.clone();
        c.signature[10] ^= 1;
        changed.push(c);
        for c in changed {
            assert_eq!(c.verify(&public), Err(CheckpointError::BadSignature));
        }
        let mut c = cp.clone();
        c.key_id = "ffffffffffffffff".into();
        assert!(matches!(
            c.verify(&public),
            Err(CheckpointError::UnknownKey { .. })
        ));
        let other = SigningKey::generate().unwrap().verifying_key();
        assert!(matches!(
            cp.verify(&other),
            Err(CheckpointError::UnknownKey { .. })
        ));
    }

    #[test]
    fn json_round_trip() {
        let key = rfc8032_key();
        let cp = key.sign_checkpoint(7, [5; 32], [6; 32], datetime!(2025-06-30 23:59:59.5 UTC));
        let json = serde_json::to_string(&cp).unwrap();
        assert!(json.starts_with(r#"{"tree_size":7,"root":"0505"#), "{json}");
        assert!(
            json.contains(r#""time":"2025-06-30T23:59:59.5Z""#),
            "{json}"
        );
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cp);
        assert_eq!(back.verify(&key.verifying_key()), Ok(()));
        let extra = json.replacen('{', r#"{"x":1,"#, 1);
        assert!(serde_json::from_str::<Checkpoint>(&extra).is_err());
    }
}
