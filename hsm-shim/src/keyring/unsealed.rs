//! An unsealed keyring: [`UnsealedKeyring`] (master key and KEK versions
//! in memory, zeroized at once when sealed or dropped; adding and
//! destroying KEK versions) and [`KeyringKek`], the `KeyEncryptionKey`
//! handle on one version.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zeroize::{Zeroize, Zeroizing};

use crate::fsutil;
use crate::software::SoftwareKek;
use crate::{KekError, KeyEncryptionKey};

use super::file::Keyring;
use super::{KekVersionInfo, KEY_LEN};

pub(super) struct KekState {
    pub(super) sealed: bool,
    pub(super) keks: BTreeMap<u32, SoftwareKek>,
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
    pub(super) ring: Keyring,
    pub(super) master: Zeroizing<[u8; KEY_LEN]>,
    pub(super) state: SharedState,
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
