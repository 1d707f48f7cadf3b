//! Envelope encryption of card records and keyed fingerprints.
//!
//! - [`DataKey`]: AES-256-GCM under a versioned data key (DEK); a fresh
//!   96-bit nonce from the OS CSPRNG per seal; associated data binding the
//!   ciphertext to its tenant, token and key version ([`RecordAad`]); a
//!   stored forwarded answer is bound to its row by [`ForwardAnswerAad`]
//!   (another label: neither opens as the other).
//! - [`FingerprintKey`]: HMAC-SHA-256 of the whole PAN under a per-tenant key
//!   derived from the fingerprint master key, shown as `fp_...`.
//! - [`CardSecret`]: what is sealed (PAN, expiry, cardholder name) and its
//!   binary encoding, built in zeroizing buffers.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::card::{CardholderName, Expiry};
use crate::pan::Pan;

pub const NONCE_LEN: usize = 12;
pub const KEY_LEN: usize = 32;

/// Crypto failures. Deliberately coarse: an attacker learns nothing from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("key has the wrong length")]
    KeyLength,
    #[error("the operating system random number generator failed")]
    Rng,
    #[error("ciphertext failed authentication")]
    Open,
    #[error("sealed record is malformed")]
    Malformed,
}

/// Fresh random key bytes from the OS CSPRNG.
pub fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::getrandom(k.as_mut()).map_err(|_| CryptoError::Rng)?;
    Ok(k)
}

/// What binds a sealed record to its row. Changing any field makes the
/// ciphertext fail to open.
#[derive(Debug, Clone, Copy)]
pub struct RecordAad<'a> {
    pub tenant: &'a str,
    pub token: &'a str,
    pub key_version: u32,
}

impl RecordAad<'_> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"cardvault/card-record/v1\0");
        for field in [self.tenant, self.token] {
            // Both fields are at most 64 bytes (validated types).
            let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out
    }
}

/// What binds a stored forwarded answer (issue 18, `Idempotency-Key`) to its
/// row: the principal, upstream and key it was stored for, the request it
/// answers, and the answer's clear metadata (tenant, status, content type,
/// location), so none of them can be changed or the ciphertext moved to
/// another row. Its own domain-separation label: never confused with a
/// card record's associated data.
#[derive(Debug, Clone, Copy)]
pub struct ForwardAnswerAad<'a> {
    pub principal_id: &'a str,
    pub upstream: &'a str,
    /// Hex SHA-256 of the Idempotency-Key.
    pub key_hash: &'a str,
    /// Hex SHA-256 of the request.
    pub request_hash: &'a str,
    pub tenant: &'a str,
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub location: Option<&'a str>,
    pub key_version: u32,
}

impl ForwardAnswerAad<'_> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"cardvault/forward-answer/v1\0");
        let mut field = |f: Option<&str>| match f {
            None => out.push(0),
            Some(f) => {
                out.push(1);
                // Headers and names are far below 4 GiB.
                let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(f.as_bytes());
            }
        };
        field(Some(self.principal_id));
        field(Some(self.upstream));
        field(Some(self.key_hash));
        field(Some(self.request_hash));
        field(Some(self.tenant));
        field(self.content_type);
        field(self.location);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out
    }
}

/// Associated data a [`DataKey`] seals under: [`RecordAad`] (card records)
/// or [`ForwardAnswerAad`] (stored forwarded answers). Each encodes with a
/// label of its own; no other type can implement it.
pub trait AssociatedData: private::Encode {
    /// The version of the key the data is sealed under.
    fn key_version(&self) -> u32;
}

mod private {
    pub trait Encode {
        fn encode_aad(&self) -> Vec<u8>;
    }
    impl Encode for super::RecordAad<'_> {
        fn encode_aad(&self) -> Vec<u8> {
            self.encode()
        }
    }
    impl Encode for super::ForwardAnswerAad<'_> {
        fn encode_aad(&self) -> Vec<u8> {
            self.encode()
        }
    }
}

impl AssociatedData for RecordAad<'_> {
    fn key_version(&self) -> u32 {
        self.key_version
    }
}

impl AssociatedData for ForwardAnswerAad<'_> {
    fn key_version(&self) -> u32 {
        self.key_version
    }
}

/// A sealed record: nonce and ciphertext (with the GCM tag appended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

/// A data-encryption key (DEK) of one version. No `Clone`; `Debug` shows the
/// version only; the AES key schedule is zeroized on drop.
pub struct DataKey {
    version: u32,
    cipher: Aes256Gcm,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl DataKey {
    pub fn from_bytes(version: u32, key: &[u8]) -> Result<DataKey, CryptoError> {
        let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| CryptoError::KeyLength)?;
        Ok(DataKey { version, cipher })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Seal `plaintext` with a fresh random nonce. `aad`'s key version must
    /// be this key's version.
    pub fn seal<A: AssociatedData>(
        &self,
        aad: &A,
        plaintext: &[u8],
    ) -> Result<Sealed, CryptoError> {
        debug_assert_eq!(aad.key_version(), self.version);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| CryptoError::Rng)?;
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad.encode_aad(),
                },
            )
            .map_err(|_| CryptoError::Malformed)?;
        Ok(Sealed { nonce, ciphertext })
    }

    /// Open a sealed record; any change to nonce, ciphertext, tag or
    /// associated data fails.
    pub fn open<A: AssociatedData>(
        &self,
        aad: &A,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if aad.key_version() != self.version {
            return Err(CryptoError::Open);
        }
        self.cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad.encode_aad(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Open)
    }
}

/// The fingerprint master key. Per-tenant keys are derived from it, so the
/// same PAN has unrelated fingerprints in two tenants.
pub struct FingerprintKey {
    version: u32,
    master: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl FingerprintKey {
    pub fn from_bytes(version: u32, key: &[u8]) -> Result<FingerprintKey, CryptoError> {
        let master: [u8; KEY_LEN] = key.try_into().map_err(|_| CryptoError::KeyLength)?;
        Ok(FingerprintKey {
            version,
            master: Zeroizing::new(master),
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The tenant's key: HMAC(master, tenant), and with the tenant's salt
    /// (tenants created since migration 0006) HMAC(master, tenant, salt):
    /// erasing the salt makes the key underivable (tenant deletion).
    fn tenant_key(&self, tenant: &str, salt: Option<&[u8]>) -> Zeroizing<[u8; 32]> {
        // HMAC accepts keys of any length: `new_from_slice` cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.master.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"cardvault/fingerprint-tenant/v1\0");
        mac.update(tenant.as_bytes());
        if let Some(salt) = salt {
            // Tenant names are printable ASCII: the NUL cannot be part of one.
            mac.update(b"\0salt\0");
            mac.update(salt);
        }
        Zeroizing::new(mac.finalize().into_bytes().into())
    }

    /// `fp_` + URL-safe base64 of HMAC-SHA-256(tenant key, PAN digits).
    /// One-way and keyed: without the key it cannot be tested against
    /// guessed card numbers. Safe to show to the tenant it belongs to.
    pub fn fingerprint(&self, tenant: &str, salt: Option<&[u8]>, pan: &Pan) -> String {
        let key = self.tenant_key(tenant, salt);
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(pan.expose_digits().as_bytes());
        let tag = mac.finalize().into_bytes();
        format!(
            "fp_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
        )
    }
}

/// The secret part of a card: what gets sealed.
#[derive(Debug)]
pub struct CardSecret {
    pub pan: Pan,
    /// `None` only for a card number the vault found in a forwarded call's
    /// answer (issue 18) and did not hold: its expiry is unknown until a
    /// tokenize of the same card gives one (a known expiry always wins).
    pub expiry: Option<Expiry>,
    pub name: Option<CardholderName>,
}

const SECRET_FORMAT: u8 = 1;

impl CardSecret {
    /// Binary encoding: `1 | len | digits | month | year(be16) | has_name |
    /// name_len(be16) | name` (month and year 0: no expiry known), written into a buffer allocated once with its
    /// final size so no unzeroized copy is left behind by reallocation.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let digits = self.pan.expose_digits().as_bytes();
        let name = self.name.as_ref().map(|n| n.expose().as_bytes());
        let size = 1 + 1 + digits.len() + 1 + 2 + 1 + 2 + name.map_or(0, <[u8]>::len);
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        out.push(SECRET_FORMAT);
        // A Pan has 12 to 19 digits.
        out.push(u8::try_from(digits.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(digits);
        let (month, year) = self.expiry.map_or((0, 0), |e| (e.month(), e.year()));
        out.push(month);
        out.extend_from_slice(&year.to_be_bytes());
        match name {
            None => out.extend_from_slice(&[0, 0, 0]),
            Some(n) => {
                out.push(1);
                // A name is at most 64 characters (256 bytes).
                out.extend_from_slice(&u16::try_from(n.len()).unwrap_or(u16::MAX).to_be_bytes());
                out.extend_from_slice(n);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<CardSecret, CryptoError> {
        let mut r = Reader(bytes);
        if r.take(1)? != [SECRET_FORMAT] {
            return Err(CryptoError::Malformed);
        }
        let len = usize::from(r.take(1)?[0]);
        let digits = std::str::from_utf8(r.take(len)?).map_err(|_| CryptoError::Malformed)?;
        let pan = Pan::parse(digits).map_err(|_| CryptoError::Malformed)?;
        let month = r.take(1)?[0];
        let y = r.take(2)?;
        let year = u16::from_be_bytes([y[0], y[1]]);
        let expiry = match (month, year) {
            (0, 0) => None,
            _ => Some(Expiry::from_stored(month, year).ok_or(CryptoError::Malformed)?),
        };
        let has_name = r.take(1)?[0];
        let n = r.take(2)?;
        let name_len = usize::from(u16::from_be_bytes([n[0], n[1]]));
        let name = match has_name {
            0 => None,
            1 => {
                let s =
                    std::str::from_utf8(r.take(name_len)?).map_err(|_| CryptoError::Malformed)?;
                Some(CardholderName::parse(s).map_err(|_| CryptoError::Malformed)?)
            }
            _ => return Err(CryptoError::Malformed),
        };
        if !r.0.is_empty() {
            return Err(CryptoError::Malformed);
        }
        Ok(CardSecret { pan, expiry, name })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CryptoError> {
        if self.0.len() < n {
            return Err(CryptoError::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn key(version: u32) -> DataKey {
        DataKey::from_bytes(version, random_key().unwrap().as_ref()).unwrap()
    }

    const TENANT: &str = "shop-42";
    const TOKEN: &str = "tok_AAAAAAAAAAAAAAAAAAAAAA";

    fn aad(version: u32) -> RecordAad<'static> {
        RecordAad {
            tenant: TENANT,
            token: TOKEN,
            key_version: version,
        }
    }

    /// NIST SP 800-38D / McGrew-Viega GCM test case 16 (AES-256, 96-bit IV,
    /// with AAD): our use of the `aes-gcm` crate matches the standard.
    #[test]
    fn aes_256_gcm_known_answer() {
        fn hex(s: &str) -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        }
        let k = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let iv = hex("cafebabefacedbaddecaf888");
        let pt = hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let want_ct = hex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662");
        let want_tag = hex("76fc6ece0f4e1768cddf8853bb2d551b");
        let cipher = Aes256Gcm::new_from_slice(&k).unwrap();
        let out = cipher
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &pt,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(&out[..pt.len()], &want_ct[..]);
        assert_eq!(&out[pt.len()..], &want_tag[..]);
    }

    #[test]
    fn nonces_are_fresh() {
        let k = key(1);
        let a = k.seal(&aad(1), b"same").unwrap();
        let b = k.seal(&aad(1), b"same").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn fingerprints_are_per_tenant_and_stable() {
        let fk = FingerprintKey::from_bytes(1, random_key().unwrap().as_ref()).unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let a = fk.fingerprint("shop-1", None, &pan);
        assert_eq!(a, fk.fingerprint("shop-1", None, &pan));
        assert_ne!(a, fk.fingerprint("shop-2", None, &pan));
        assert_ne!(
            a,
            fk.fingerprint("shop-1", None, &Pan::parse("4242424242424242").unwrap())
        );
        assert!(a.starts_with("fp_") && a.len() == 46);
        // A salt gives the tenant another key; another salt, another again.
        let salted = fk.fingerprint("shop-1", Some(&[7u8; 32]), &pan);
        assert_ne!(a, salted);
        assert_eq!(salted, fk.fingerprint("shop-1", Some(&[7u8; 32]), &pan));
        assert_ne!(salted, fk.fingerprint("shop-1", Some(&[8u8; 32]), &pan));
        let other = FingerprintKey::from_bytes(1, random_key().unwrap().as_ref()).unwrap();
        assert_ne!(a, other.fingerprint("shop-1", None, &pan));
    }

    #[test]
    fn secret_encoding_round_trips() {
        for (name, expiry) in [
            (None, Some(Expiry::from_stored(7, 2031).unwrap())),
            (
                Some("Jane Doe"),
                Some(Expiry::from_stored(7, 2031).unwrap()),
            ),
            (
                Some("Łukasz Żółć"),
                Some(Expiry::from_stored(7, 2031).unwrap()),
            ),
            // A card number found in a forwarded answer: no expiry known.
            (None, None),
        ] {
            let s = CardSecret {
                pan: Pan::parse("378282246310005").unwrap(),
                expiry,
                name: name.map(|n| CardholderName::parse(n).unwrap()),
            };
            let bytes = s.encode();
            assert_eq!(bytes.len(), bytes.capacity());
            let back = CardSecret::decode(&bytes).unwrap();
            assert_eq!(back.pan.expose_digits(), "378282246310005");
            assert_eq!(back.expiry, s.expiry);
            assert_eq!(back.name.as_ref().map(|n| n.expose()), name);
            // Truncation and trailing bytes are rejected.
            assert!(CardSecret::decode(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert!(CardSecret::decode(&longer).is_err());
        }
    }

    #[test]
    fn a_forwarded_answer_and_a_card_record_never_open_as_each_other() {
        let k = key(1);
        let answer = ForwardAnswerAad {
            principal_id: "p1",
            upstream: "acquirer",
            key_hash: "ab",
            request_hash: "cd",
            tenant: TENANT,
            status: 200,
            content_type: Some("application/json"),
            location: None,
            key_version: 1,
        };
        let sealed = k.seal(&answer, b"{}").unwrap();
        assert_eq!(k.open(&answer, &sealed).unwrap().as_slice(), b"{}");
        assert!(k.open(&aad(1), &sealed).is_err());
        let card = k.seal(&aad(1), b"{}").unwrap();
        assert!(k.open(&answer, &card).is_err());
        // Every field is bound, an absent header differs from an empty one.
        for other in [
            ForwardAnswerAad {
                principal_id: "p2",
                ..answer
            },
            ForwardAnswerAad {
                upstream: "other",
                ..answer
            },
            ForwardAnswerAad {
                key_hash: "ac",
                ..answer
            },
            ForwardAnswerAad {
                request_hash: "ce",
                ..answer
            },
            ForwardAnswerAad {
                tenant: "shop-43",
                ..answer
            },
            ForwardAnswerAad {
                status: 201,
                ..answer
            },
            ForwardAnswerAad {
                content_type: None,
                ..answer
            },
            ForwardAnswerAad {
                location: Some(""),
                ..answer
            },
            ForwardAnswerAad {
                key_version: 2,
                ..answer
            },
        ] {
            assert!(k.open(&other, &sealed).is_err(), "{other:?}");
        }
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(msg in proptest::collection::vec(any::<u8>(), 0..300), version in 1u32..5) {
            let k = key(version);
            let sealed = k.seal(&aad(version), &msg).unwrap();
            let opened = k.open(&aad(version), &sealed).unwrap();
            prop_assert_eq!(opened.as_slice(), &msg[..]);
        }

        #[test]
        fn any_changed_ciphertext_or_nonce_byte_fails(
            msg in proptest::collection::vec(any::<u8>(), 1..64),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            in_nonce in any::<bool>(),
        ) {
            let k = key(1);
            let mut sealed = k.seal(&aad(1), &msg).unwrap();
            if in_nonce {
                sealed.nonce[pos.index(NONCE_LEN)] ^= flip;
            } else {
                let i = pos.index(sealed.ciphertext.len());
                sealed.ciphertext[i] ^= flip;
            }
            prop_assert_eq!(k.open(&aad(1), &sealed), Err(CryptoError::Open));
        }

        #[test]
        fn any_changed_associated_data_fails(
            msg in proptest::collection::vec(any::<u8>(), 1..64),
            other_tenant in "[a-z0-9-]{1,20}",
            other_token in "tok_[A-Za-z0-9_-]{22}",
        ) {
            let k = key(3);
            let sealed = k.seal(&aad(3), &msg).unwrap();
            if other_tenant != TENANT {
                let a = RecordAad { tenant: &other_tenant, ..aad(3) };
                prop_assert!(k.open(&a, &sealed).is_err());
            }
            if other_token != TOKEN {
                let a = RecordAad { token: &other_token, ..aad(3) };
                prop_assert!(k.open(&a, &sealed).is_err());
            }
            let other_version = RecordAad { key_version: 4, ..aad(3) };
            prop_assert!(k.open(&other_version, &sealed).is_err());
            // The same key bytes under another version number do not open it either.
            prop_assert!(k.open(&aad(2), &sealed).is_err());
        }
    }
}
