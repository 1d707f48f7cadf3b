//! What the running service calls on the vault outside requests: service
//! lifecycle events (start, stop), readiness, the periodic reload of the
//! vault keys (which picks up another instance's rotation; the rotations
//! themselves are in `rotation`), and the security codes' sweep and gauge.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use audit::{Action, AuditEvent, Outcome};

use super::{Vault, VaultError};
use crate::keys::KeysError;
use crate::store::{now_millis, StoreError};

/// How long a card or audit write refused as read-only keeps the service
/// not ready, whatever commits in between: with a full disk, SQLite still
/// commits what fits where its WAL is overwritten (the probe's one row, some
/// small groups) and refuses the rest, and a store that commits only
/// sometimes is not ready.
pub(crate) const READ_ONLY_HOLD_MS: i64 = 10_000;

/// When a card or audit write was last refused as read-only
/// ([`StoreError::is_read_only`]), unix ms (0: never), and why.
#[derive(Debug, Default)]
pub(crate) struct WriteHealth {
    refused_at: AtomicI64,
    last_refusal: Mutex<Option<String>>,
}

impl WriteHealth {
    pub(crate) fn record<T>(&self, result: &Result<T, StoreError>) {
        if let Err(e) = result {
            if e.is_read_only() {
                self.refused_at.store(now_millis(), Ordering::Relaxed);
                *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
    }

    /// The refusal, if a write was refused as read-only within
    /// [`READ_ONLY_HOLD_MS`] of `now`.
    fn refused_recently(&self, now: i64) -> Option<String> {
        let refused = self.refused_at.load(Ordering::Relaxed);
        if refused == 0 || now - refused > READ_ONLY_HOLD_MS {
            return None;
        }
        Some(
            self.last_refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default(),
        )
    }
}

impl Vault {
    /// Record a service lifecycle event (start, stop).
    pub async fn record_lifecycle(&self, action: Action, detail: &str) -> Result<(), VaultError> {
        let event = AuditEvent::new(action, Outcome::Success)
            .source("local")
            .detail(detail);
        self.write_event(event).await?;
        Ok(())
    }

    /// Ready when storage answers and commits (keys are loaded by
    /// construction): a round trip, then the probe's one-row write
    /// ([`Store::probe_write`]), and no card or audit write refused as
    /// read-only in the last [`READ_ONLY_HOLD_MS`]. A store that answers
    /// but cannot commit is [`VaultError::StorageReadOnly`]; readiness
    /// comes back by itself once commits succeed again.
    ///
    /// [`Store::probe_write`]: crate::store::Store::probe_write
    pub async fn ready(&self) -> Result<(), VaultError> {
        self.store.ping().await?;
        probe_commit(self.store.as_ref()).await?;
        if let Some(refusal) = self.writes.refused_recently(now_millis()) {
            return Err(VaultError::StorageReadOnly(format!(
                "a card or audit write was refused: {refusal}"
            )));
        }
        Ok(())
    }

    /// Reload the vault keys from the store (see [`Keyring::refresh`]): the
    /// service calls this periodically so that every instance picks up a
    /// rotation, retirement or destruction made by another within seconds.
    /// Returns whether anything changed.
    ///
    /// [`Keyring::refresh`]: crate::keys::Keyring::refresh
    pub async fn refresh_keys(&self) -> Result<bool, VaultError> {
        self.keys.refresh(&self.store).await.map_err(|e| match e {
            KeysError::Store(s) => VaultError::Storage(s),
            other => VaultError::Keys(other),
        })
    }

    /// Security codes held now (a gauge; never the codes).
    pub fn cvc_held(&self) -> usize {
        self.cvc.held()
    }

    /// Drop the security codes past their time to live.
    pub fn sweep_cvc(&self) -> usize {
        self.cvc.sweep(Instant::now())
    }
}

/// Whether the store commits (its probe write), as readiness reports it:
/// [`VaultError::StorageReadOnly`] when the database answered but refused
/// the commit, [`VaultError::Storage`] when it did not answer. Used by
/// [`Vault::ready`], and while sealed (no vault) by the metrics.
pub async fn probe_commit(store: &dyn crate::store::Store) -> Result<(), VaultError> {
    match store.probe_write().await {
        Ok(()) => Ok(()),
        Err(e) if e.is_read_only() => Err(VaultError::StorageReadOnly(e.to_string())),
        Err(e) => Err(VaultError::Storage(e)),
    }
}
