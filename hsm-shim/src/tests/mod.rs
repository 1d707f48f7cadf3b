//! Tests shared by every backend (the same properties, run once per backend),
//! plus the backend-specific tests in the submodules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod keyring;
mod pkcs11;
pub(crate) mod softhsm;

use std::path::PathBuf;
use std::sync::Arc;

use crate::keyring::{KdfParams, SealedKeyring, UnsealedKeyring};
use crate::pkcs11::{Pkcs11Config, Pkcs11Token};
use crate::{KekError, KeyEncryptionKey, SoftwareKek};

/// A backend under test: makes KEKs, opens them again from their durable
/// form, and destroys them.
pub(crate) trait Backend {
    type Handle;

    /// A new KEK, and what it takes to open it again.
    fn create(&mut self) -> (Self::Handle, Box<dyn KeyEncryptionKey>);
    /// Open the KEK again, as a restarted service would.
    fn reopen(&mut self, handle: &Self::Handle) -> Result<Box<dyn KeyEncryptionKey>, KekError>;
    /// Destroy the KEK (crypto-shred).
    fn destroy(&mut self, handle: &Self::Handle);
    /// Whether KEK objects already handed out stop working when their key is
    /// destroyed (true for the token and the keyring; a `SoftwareKek` in
    /// memory keeps its key until dropped).
    fn handles_are_live(&self) -> bool;
}

/// Software: one key file per KEK; destroying removes the file.
pub(crate) struct SoftwareBackend {
    dir: tempfile::TempDir,
    n: u32,
}

impl SoftwareBackend {
    pub(crate) fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            n: 0,
        }
    }
}

impl Backend for SoftwareBackend {
    type Handle = PathBuf;

    fn create(&mut self) -> (PathBuf, Box<dyn KeyEncryptionKey>) {
        self.n += 1;
        let path = self.dir.path().join(format!("kek-{}.key", self.n));
        let kek = SoftwareKek::generate(&path).unwrap();
        (path, Box::new(kek))
    }

    fn reopen(&mut self, path: &PathBuf) -> Result<Box<dyn KeyEncryptionKey>, KekError> {
        Ok(Box::new(SoftwareKek::load(path)?))
    }

    fn destroy(&mut self, path: &PathBuf) {
        std::fs::remove_file(path).unwrap();
    }

    fn handles_are_live(&self) -> bool {
        false
    }
}

pub(crate) const ALICE: (&str, &str) = ("alice", "correct horse battery");
pub(crate) const BOB: (&str, &str) = ("bob", "staple-of-the-keyring");
pub(crate) const CAROL: (&str, &str) = ("carol", "twelve chars at least");

/// Unseal the keyring at `path` with `who`.
pub(crate) fn unseal(path: &std::path::Path, who: &[(&str, &str)]) -> UnsealedKeyring {
    let mut unsealer = SealedKeyring::open(path).unwrap().unsealer();
    for (name, pass) in who {
        unsealer.submit(name, pass).unwrap();
    }
    unsealer.finish().unwrap()
}

/// Sealed keyring, 2 of 3: KEK versions; destroying removes a version.
pub(crate) struct KeyringBackend {
    _dir: tempfile::TempDir,
    path: PathBuf,
    keyring: UnsealedKeyring,
    used_first: bool,
    /// Keyrings unsealed again by `reopen`, kept alive for their handles.
    reopened: Vec<UnsealedKeyring>,
}

impl KeyringBackend {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        SealedKeyring::init(
            &path,
            2,
            &[ALICE, BOB, CAROL],
            KdfParams::insecure_fast_for_tests(),
        )
        .unwrap();
        let keyring = unseal(&path, &[ALICE, CAROL]);
        Self {
            _dir: dir,
            path,
            keyring,
            used_first: false,
            reopened: Vec::new(),
        }
    }
}

impl Backend for KeyringBackend {
    type Handle = u32;

    fn create(&mut self) -> (u32, Box<dyn KeyEncryptionKey>) {
        let kek = if self.used_first {
            self.keyring.add_kek_version().unwrap()
        } else {
            self.used_first = true;
            self.keyring.current_kek().unwrap()
        };
        (kek.version(), Box::new(kek))
    }

    fn reopen(&mut self, version: &u32) -> Result<Box<dyn KeyEncryptionKey>, KekError> {
        let keyring = unseal(&self.path, &[BOB, ALICE]);
        let kek = keyring.kek(*version)?;
        self.reopened.push(keyring);
        Ok(Box::new(kek))
    }

    fn destroy(&mut self, version: &u32) {
        self.keyring.destroy_kek_version(*version).unwrap();
    }

    fn handles_are_live(&self) -> bool {
        true
    }
}

/// PKCS#11 on SoftHSM2: one token per backend instance, one key object per KEK.
pub(crate) struct Pkcs11Backend {
    config: Pkcs11Config,
    token: Pkcs11Token,
    n: u32,
}

impl Pkcs11Backend {
    pub(crate) fn new(tag: &str) -> Self {
        let config = softhsm::new_token(tag);
        let token = Pkcs11Token::open(&config).unwrap();
        token.login(&config.pin.load().unwrap()).unwrap();
        Self {
            config,
            token,
            n: 0,
        }
    }
}

impl Backend for Pkcs11Backend {
    type Handle = String;

    fn create(&mut self) -> (String, Box<dyn KeyEncryptionKey>) {
        self.n += 1;
        let label = format!("kek-{}", self.n);
        let kek = self.token.generate_kek(&label).unwrap();
        (label, Box::new(kek))
    }

    fn reopen(&mut self, label: &String) -> Result<Box<dyn KeyEncryptionKey>, KekError> {
        let mut config = self.config.clone();
        config.kek_label = label.clone();
        Ok(Box::new(config.unseal()?))
    }

    fn destroy(&mut self, label: &String) {
        self.token.destroy_kek(label).unwrap();
    }

    fn handles_are_live(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------
// The shared properties.

pub(crate) fn round_trip(b: &mut impl Backend) {
    let (_h, kek) = b.create();
    for len in [1usize, 16, 32, 64] {
        let key: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
        let blob = kek.wrap("dek:1", &key).unwrap();
        assert_eq!(blob.len(), 1 + 12 + len + 16);
        assert_eq!(blob[0], 1, "blob version byte");
        assert_eq!(kek.unwrap("dek:1", &blob).unwrap().as_slice(), &key[..]);
        let again = kek.wrap("dek:1", &key).unwrap();
        assert_ne!(blob, again, "every wrap uses a fresh nonce");
        assert_eq!(kek.unwrap("dek:1", &again).unwrap().as_slice(), &key[..]);
    }
}

pub(crate) fn wrong_label_refused(b: &mut impl Backend) {
    let (_h, kek) = b.create();
    let blob = kek.wrap("dek:1", &[9u8; 32]).unwrap();
    for other in ["dek:2", "", "fingerprint:1", "dek:1 "] {
        assert!(
            matches!(kek.unwrap(other, &blob), Err(KekError::UnwrapFailed)),
            "{other:?}"
        );
    }
}

pub(crate) fn tampered_blob_refused(b: &mut impl Backend) {
    let (_h, kek) = b.create();
    let blob = kek.wrap("dek:1", &[3u8; 32]).unwrap();
    for i in 0..blob.len() {
        let mut bad = blob.clone();
        bad[i] ^= 0x01;
        assert!(kek.unwrap("dek:1", &bad).is_err(), "flipped byte {i}");
    }
    let mut bad = blob.clone();
    bad[0] = 2;
    assert!(matches!(
        kek.unwrap("dek:1", &bad),
        Err(KekError::MalformedBlob)
    ));
    for cut in [0, 1, 12, 13, 28, blob.len() - 1] {
        assert!(kek.unwrap("dek:1", &blob[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(kek.unwrap("dek:1", &longer).is_err());
    // The original still opens: failures leave the backend usable.
    assert_eq!(kek.unwrap("dek:1", &blob).unwrap().as_slice(), &[3u8; 32]);
}

pub(crate) fn other_kek_refused(b: &mut impl Backend) {
    let (_h1, one) = b.create();
    let (_h2, two) = b.create();
    assert_ne!(one.kek_id(), two.kek_id());
    let blob = one.wrap("dek:1", &[1u8; 32]).unwrap();
    assert!(matches!(
        two.unwrap("dek:1", &blob),
        Err(KekError::UnwrapFailed)
    ));
    let blob = two.wrap("dek:1", &[2u8; 32]).unwrap();
    assert!(matches!(
        one.unwrap("dek:1", &blob),
        Err(KekError::UnwrapFailed)
    ));
}

pub(crate) fn destroyed_key_cannot_unwrap(b: &mut impl Backend) {
    let (h, kek) = b.create();
    let (keep_h, keep) = b.create();
    let blob = kek.wrap("dek:1", &[4u8; 32]).unwrap();
    let kept_blob = keep.wrap("dek:1", &[5u8; 32]).unwrap();
    b.destroy(&h);
    assert!(b.reopen(&h).is_err(), "a destroyed KEK cannot be opened");
    if b.handles_are_live() {
        let err = kek.unwrap("dek:1", &blob).unwrap_err();
        assert!(matches!(err, KekError::KekGone { .. }), "{err:?}");
        assert!(kek.wrap("dek:1", &[4u8; 32]).is_err());
    }
    // Only that KEK is gone.
    let reopened = b.reopen(&keep_h).unwrap();
    assert_eq!(
        reopened.unwrap("dek:1", &kept_blob).unwrap().as_slice(),
        &[5u8; 32]
    );
}

pub(crate) fn kek_id_stable_across_reopen(b: &mut impl Backend) {
    let (h, kek) = b.create();
    let again = b.reopen(&h).unwrap();
    assert_eq!(kek.kek_id(), again.kek_id());
    let blob = kek.wrap("fingerprint:1", &[6u8; 32]).unwrap();
    assert_eq!(
        again.unwrap("fingerprint:1", &blob).unwrap().as_slice(),
        &[6u8; 32]
    );
    let blob = again.wrap("fingerprint:1", &[7u8; 32]).unwrap();
    assert_eq!(
        kek.unwrap("fingerprint:1", &blob).unwrap().as_slice(),
        &[7u8; 32]
    );
    // The id never looks like a card number to the vault's PAN guard.
    let id = kek.kek_id();
    let longest_digits = id
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest_digits < 12 || id.starts_with("soft:"), "{id}");
    assert!(!format!("{kek:?}").is_empty());
}

pub(crate) fn concurrent_use(b: &mut impl Backend) {
    let (_h, kek) = b.create();
    let kek: Arc<dyn KeyEncryptionKey> = Arc::from(kek);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let kek = kek.clone();
            std::thread::spawn(move || {
                for i in 0..25u8 {
                    let label = format!("dek:{t}:{i}");
                    let key = [t ^ i; 32];
                    let blob = kek.wrap(&label, &key).unwrap();
                    assert_eq!(kek.unwrap(&label, &blob).unwrap().as_slice(), &key);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

macro_rules! backend_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn round_trip() {
                super::round_trip(&mut $make);
            }

            #[test]
            fn wrong_label_refused() {
                super::wrong_label_refused(&mut $make);
            }

            #[test]
            fn tampered_blob_refused() {
                super::tampered_blob_refused(&mut $make);
            }

            #[test]
            fn blob_of_another_kek_refused() {
                super::other_kek_refused(&mut $make);
            }

            #[test]
            fn destroyed_key_cannot_unwrap() {
                super::destroyed_key_cannot_unwrap(&mut $make);
            }

            #[test]
            fn kek_id_stable_across_reopen() {
                super::kek_id_stable_across_reopen(&mut $make);
            }

            #[test]
            fn concurrent_use() {
                super::concurrent_use(&mut $make);
            }
        }
    };
}

backend_suite!(software_file, SoftwareBackend::new());
backend_suite!(sealed_keyring, KeyringBackend::new());
backend_suite!(pkcs11_softhsm, Pkcs11Backend::new("suite"));

#[test]
fn kek_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<crate::Pkcs11Kek>();
    check::<crate::Pkcs11Token>();
    check::<crate::KeyringKek>();
    check::<crate::SoftwareKek>();
}
