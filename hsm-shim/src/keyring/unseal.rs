//! Unsealing: [`Unsealer`] collects custodians' passphrases one at a time,
//! opens their shares, and once the threshold is reached reconstructs the
//! master key and checks it (check value, every KEK version) before
//! [`Unsealer::finish`] hands out the [`UnsealedKeyring`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

use crate::fsutil;
use crate::software::SoftwareKek;
use crate::{KekError, KeyEncryptionKey};

use super::file::Keyring;
use super::shamir::combine;
use super::unsealed::{KekState, UnsealedKeyring};
use super::{check_passphrase, KEY_LEN, SHARE_LEN};

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

pub(super) struct Unlocked {
    pub(super) master: Zeroizing<[u8; KEY_LEN]>,
    pub(super) keks: BTreeMap<u32, SoftwareKek>,
}

/// Collects custodians' shares one at a time. Holds decrypted shares (and,
/// once complete, the master key) in zeroizing memory.
pub struct Unsealer {
    pub(super) ring: Keyring,
    /// (custodian index, decrypted share `x || y`).
    pub(super) shares: Vec<(usize, Zeroizing<Vec<u8>>)>,
    pub(super) unlocked: Option<Unlocked>,
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
