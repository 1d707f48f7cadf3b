//! Prometheus metrics (`GET /metrics`, text format). Never a card number, a
//! token, a tenant or a principal name: only counts and states.
//!
//! Today: the seal state and the key lifecycle (PCI DSS 3.6/3.7 monitoring):
//! records still under an older key (re-encryption progress), records and
//! state per key version, keys in use past their crypto-period; and
//! detokenization monitoring (PCI DSS 10.4/10.7): requests refused by a rate
//! limit per scope, anomalies of the detokenize rule, sources blocked for
//! failed authentications (no principal, tenant or address label: counts
//! only; the audit trail says who). Values are read when scraped. Request
//! metrics come with the listener work.

use std::sync::Mutex;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::routes::AppState;

/// The registry and its gauges.
pub struct Metrics {
    registry: Registry,
    sealed: IntGauge,
    remaining: IntGauge,
    past_period: IntGauge,
    key_records: IntGaugeVec,
    key_state: IntGaugeVec,
    rate_limited: IntCounterVec,
    anomalies: IntCounter,
    source_blocks: IntCounter,
    blocked_sources: IntGauge,
    /// Serialises bringing the counters up to the monitors' totals.
    sync: Mutex<()>,
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
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests refused with 429 by a rate limit: scope principal or tenant (detokenize), source (failed authentications)",
            ),
            &["scope"],
        )?;
        let anomalies = IntCounter::new(
            "detokenize_anomalies_total",
            "Times the detokenize anomaly rule fired (audit action detokenize_anomaly names the principal)",
        )?;
        let source_blocks = IntCounter::new(
            "source_blocks_total",
            "Source addresses blocked after too many failed authentications (audit action source_blocked)",
        )?;
        let blocked_sources = IntGauge::new(
            "blocked_sources",
            "Source addresses refused now for failed authentications",
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(anomalies.clone()))?;
        registry.register(Box::new(source_blocks.clone()))?;
        registry.register(Box::new(blocked_sources.clone()))?;
        for scope in ["principal", "tenant", "source"] {
            rate_limited.with_label_values(&[scope]);
        }
        Ok(Self {
            rate_limited,
            anomalies,
            source_blocks,
            blocked_sources,
            sync: Mutex::new(()),
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
        self.monitoring(state);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics: cannot encode");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counters of the monitors (kept as atomics there) brought up to date.
    fn monitoring(&self, state: &AppState) {
        let _serial = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let catch_up = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        let counts = state.monitor.counts();
        catch_up(
            &self.rate_limited.with_label_values(&["principal"]),
            counts.limited_principal,
        );
        catch_up(
            &self.rate_limited.with_label_values(&["tenant"]),
            counts.limited_tenant,
        );
        catch_up(
            &self.rate_limited.with_label_values(&["source"]),
            state.sources.refused(),
        );
        catch_up(&self.anomalies, counts.anomalies);
        catch_up(&self.source_blocks, state.sources.blocks());
        self.blocked_sources
            .set(i64::try_from(state.sources.blocked_now()).unwrap_or(i64::MAX));
    }
}
