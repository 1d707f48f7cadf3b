//! What the running service calls on the vault outside requests: service
//! lifecycle events (start, stop), readiness, the periodic reload of the
//! vault keys (which picks up another instance's rotation; the rotations
//! themselves are in `rotation`), and the security codes' sweep and gauge.

use std::time::Instant;

use audit::{Action, AuditEvent, Outcome};

use super::{Vault, VaultError};
use crate::keys::KeysError;

impl Vault {
    /// Record a service lifecycle event (start, stop).
    pub async fn record_lifecycle(&self, action: Action, detail: &str) -> Result<(), VaultError> {
        let event = AuditEvent::new(action, Outcome::Success)
            .source("local")
            .detail(detail);
        self.write_event(event).await?;
        Ok(())
    }

    /// Ready when storage answers (keys are loaded by construction).
    pub async fn ready(&self) -> Result<(), VaultError> {
        self.store.ping().await?;
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
