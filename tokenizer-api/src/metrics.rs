//! Prometheus metrics (`GET /metrics`, text format). Never a card number, a
//! token, a tenant or a principal name: only counts and states.
//!
//! Today: the seal state and the key lifecycle (PCI DSS 3.6/3.7 monitoring):
//! records still under an older key (re-encryption progress), records and
//! state per key version, keys in use past their crypto-period. Values are
//! read when scraped. Request metrics come with the listener work.

use prometheus::{Encoder, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::routes::AppState;

/// The registry and its gauges.
pub struct Metrics {
    registry: Registry,
    sealed: IntGauge,
    remaining: IntGauge,
    past_period: IntGauge,
    key_records: IntGaugeVec,
    key_state: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("cardvault".into()), None)?;
        let sealed = IntGauge::new("sealed", "1 while the service is sealed (no key in memory)")?;
        let remaining = IntGauge::new(
            "reencryption_remaining_records",
            "Records still under an older DEK or fingerprint key",
        )?;
        let past_period = IntGauge::new(
            "keys_past_crypto_period",
            "Keys in use (active or decrypt-only) older than their crypto-period",
        )?;
        let key_records = IntGaugeVec::new(
            Opts::new("key_records", "Records under each key version"),
            &["purpose", "version"],
        )?;
        let key_state = IntGaugeVec::new(
            Opts::new("key_state", "1 for the state each key version is in"),
            &["purpose", "version", "state"],
        )?;
        registry.register(Box::new(sealed.clone()))?;
        registry.register(Box::new(remaining.clone()))?;
        registry.register(Box::new(past_period.clone()))?;
        registry.register(Box::new(key_records.clone()))?;
        registry.register(Box::new(key_state.clone()))?;
        Ok(Self {
            registry,
            sealed,
            remaining,
            past_period,
            key_records,
            key_state,
        })
    }

    /// Refresh from the vault and render the text format.
    pub async fn render(&self, state: &AppState) -> String {
        let vault = state.seal.vault();
        self.sealed.set(i64::from(vault.is_none()));
        self.key_records.reset();
        self.key_state.reset();
        if let Some(vault) = vault {
            match vault.key_status(state.crypto_periods).await {
                Ok(status) => {
                    self.remaining
                        .set(i64::try_from(status.remaining).unwrap_or(i64::MAX));
                    let past = status.keys.iter().filter(|k| k.past_crypto_period).count();
                    self.past_period
                        .set(i64::try_from(past).unwrap_or(i64::MAX));
                    for k in &status.keys {
                        let version = k.version.to_string();
                        let labels = [k.purpose.as_str(), version.as_str()];
                        self.key_records
                            .with_label_values(&labels)
                            .set(i64::try_from(k.records).unwrap_or(i64::MAX));
                        self.key_state
                            .with_label_values(&[k.purpose.as_str(), &version, k.state.as_str()])
                            .set(1);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "metrics: key status unavailable"),
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics: cannot encode");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
