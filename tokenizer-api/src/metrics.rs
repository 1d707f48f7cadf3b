//! Prometheus metrics (`GET /metrics`, text format). Never a card number, a
//! token, a tenant or a principal name: only counts and states.
//!
//! Today: the seal state and the key lifecycle (PCI DSS 3.6/3.7 monitoring):
//! records still under an older key (re-encryption progress), records and
//! state per key version, keys in use past their crypto-period; and
//! detokenization monitoring (PCI DSS 10.4/10.7): requests refused by a rate
//! limit per scope, anomalies of the detokenize rule, sources blocked for
//! failed authentications (no principal, tenant or address label: counts
//! only; the audit trail says who). Values are read when scraped.
//!
//! Requests (PCI DSS 10.4, 10.7): every response counted by listener,
//! method, route pattern and status, its latency in a histogram, card
//! operations by outcome; failed authentications and TLS handshakes by
//! reason. Read when scraped as well: the audit trail's size and its last
//! signed checkpoint (size and time), each key version's age, and the
//! storage pool's connections.
//!
//! Labels are fixed vocabularies: every value a caller passes is checked
//! ([`route_label`], [`code_label`], [`method_label`]) and anything else is
//! counted under `other`, so a mistake upstream can neither put a card
//! number, a token or a name into a label nor grow the series without bound.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use vault::monitor::DetokenizeMonitor;

use crate::limits::SourceGuard;
use crate::seal::SealControl;
use crate::tls::CrlStatus;

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
    requests: IntCounterVec,
    request_duration: HistogramVec,
    card_operations: IntCounterVec,
    auth_failures: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    audit_entries: IntGauge,
    audit_checkpoint_size: IntGauge,
    audit_checkpoint_time: IntGauge,
    key_age: IntGaugeVec,
    pool_connections: IntGaugeVec,
    pool_max: IntGauge,
    cvc_held: IntGauge,
    purged: IntCounterVec,
    forward_calls: IntCounterVec,
    forward_duration: HistogramVec,
    storage_writable: IntGauge,
    crl_next_update: IntGauge,
    crl_age: IntGauge,
    crl_stale: IntGauge,
    backup_last_success: IntGauge,
    backup_failures: IntCounter,
    backup_last_records: IntGauge,
}

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What a route label may be besides a route pattern.
pub const UNMATCHED_ROUTE: &str = "<unmatched>";
/// The label of any value outside its vocabulary.
const OTHER: &str = "other";

/// The card operation a request was, from its method and route pattern.
fn card_operation(method: &str, route: &str) -> Option<&'static str> {
    match (method, route) {
        ("POST", "/v1/tokens") => Some("tokenize"),
        ("POST", "/v1/tokens/batch") => Some("tokenize_batch"),
        ("POST", "/v1/detokenize") => Some("detokenize"),
        ("GET", "/v1/tokens/{token}") => Some("metadata"),
        ("DELETE", "/v1/tokens/{token}") => Some("delete"),
        ("PATCH", "/v1/tokens/{token}") => Some("update"),
        _ => None,
    }
}

fn outcome(status: u16) -> Option<&'static str> {
    match status {
        200..=299 => Some("success"),
        400..=499 => Some("client_error"),
        500..=599 => Some("server_error"),
        _ => None,
    }
}

/// Whether `s` is made of lower-case letters, digits (never more than two
/// in a row: no number, let alone a card number, gets through) and the
/// bytes of `extra`.
fn vocabulary_word(s: &str, extra: &[u8]) -> bool {
    let mut digits = 0;
    s.bytes().all(|b| {
        digits = if b.is_ascii_digit() { digits + 1 } else { 0 };
        digits <= 2 && (b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
    })
}

/// A route pattern as given (`/v1/tokens/{token}`) or `<unmatched>`; a raw
/// path, or anything else that cannot be a pattern of ours, is `other`.
pub fn route_label(route: &str) -> &str {
    let pattern = route.len() <= 64 && route.starts_with('/') && vocabulary_word(route, b"/-_{}");
    if pattern || route == UNMATCHED_ROUTE {
        route
    } else {
        OTHER
    }
}

/// A fixed code (`api`, `unknown_key`, `no_certificate`): lower-case
/// letters, underscores and short digit runs, at most 40 bytes; `other`
/// otherwise.
pub fn code_label(code: &str) -> &str {
    if !code.is_empty() && code.len() <= 40 && vocabulary_word(code, b"_") {
        code
    } else {
        OTHER
    }
}

/// An HTTP method of the standard set; `other` otherwise.
pub fn method_label(method: &str) -> &str {
    match method {
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" | "CONNECT" | "TRACE" => {
            method
        }
        _ => OTHER,
    }
}

/// Sample values with long runs of digits (a latency sum such as
/// `0.30000000000000004`) rewritten with at most six decimals: no line of
/// the exposition holds twelve or more digits in a row, which a data-loss
/// scanner (or our own checks) would have to treat as a possible card
/// number. Integers (counts, sizes, times in seconds) are far shorter.
fn tame_digits(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let long_run = line
            .split(|c: char| !c.is_ascii_digit())
            .any(|run| run.len() >= 12);
        let rewritten = if long_run && !line.starts_with('#') {
            line.rsplit_once(' ').and_then(|(series, value)| {
                value.parse::<f64>().ok().map(|v| {
                    let v = format!("{v:.6}");
                    let v = v.trim_end_matches('0').trim_end_matches('.');
                    format!("{series} {v}")
                })
            })
        } else {
            None
        };
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn gauge_value<T: TryInto<i64>>(value: T) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
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
        let cvc_held = IntGauge::new(
            "cvc_held",
            "Card security codes held in memory now (each until its first release or its time to live)",
        )?;
        let purged = IntCounterVec::new(
            Opts::new(
                "purged_records_total",
                "Records deleted by the purge: past their expiry, or unused beyond their tenant's retention",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(cvc_held.clone()))?;
        registry.register(Box::new(purged.clone()))?;
        let storage_writable = IntGauge::new(
            "storage_writable",
            "1 when the store answers and commits (the readiness probe's write), 0 when it cannot commit or does not answer",
        )?;
        let crl_next_update = IntGauge::new(
            "tls_client_crl_next_update_timestamp_seconds",
            "Earliest nextUpdate of the configured client CRLs, unix seconds (0: no CRL, or one without nextUpdate)",
        )?;
        let crl_age = IntGauge::new(
            "tls_client_crl_age_seconds",
            "Age of the oldest configured client CRL (now minus its thisUpdate), seconds",
        )?;
        let crl_stale = IntGauge::new(
            "tls_client_crl_stale",
            "1 when a configured client CRL is past its nextUpdate (crl_stale = refuse: its certificates are refused)",
        )?;
        registry.register(Box::new(storage_writable.clone()))?;
        registry.register(Box::new(crl_next_update.clone()))?;
        registry.register(Box::new(crl_age.clone()))?;
        registry.register(Box::new(crl_stale.clone()))?;
        for reason in ["expired", "retention"] {
            purged.with_label_values(&[reason]);
        }
        for scope in ["principal", "tenant", "source"] {
            rate_limited.with_label_values(&[scope]);
        }
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "Responses by listener, method, route pattern (never the raw path) and status",
            ),
            &["listener", "method", "route", "status"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time from the request head to the response, by listener and route pattern",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["listener", "route"],
        )?;
        let card_operations = IntCounterVec::new(
            Opts::new(
                "card_operations_total",
                "Card operations (tokenize, tokenize_batch, detokenize, metadata, delete) by outcome (success, client_error, server_error)",
            ),
            &["operation", "outcome"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "auth_failures_total",
                "Failed authentications by listener and reason (the audit trail says who and from where)",
            ),
            &["listener", "reason"],
        )?;
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "tls_handshake_failures_total",
                "Failed TLS handshakes by listener and reason",
            ),
            &["listener", "reason"],
        )?;
        let audit_entries = IntGauge::new("audit_entries", "Entries in the audit chain")?;
        let audit_checkpoint_size = IntGauge::new(
            "audit_last_checkpoint_size",
            "Tree size of the newest signed audit checkpoint (0: none yet)",
        )?;
        let audit_checkpoint_time = IntGauge::new(
            "audit_last_checkpoint_timestamp_seconds",
            "When the newest audit checkpoint was signed, Unix seconds (0: none yet)",
        )?;
        let key_age = IntGaugeVec::new(
            Opts::new("key_age_seconds", "Age of each vault key version"),
            &["purpose", "version"],
        )?;
        let pool_connections = IntGaugeVec::new(
            Opts::new(
                "db_pool_connections",
                "Open storage connections: idle in the pool or in use",
            ),
            &["state"],
        )?;
        let pool_max = IntGauge::new(
            "db_pool_max_connections",
            "The most storage connections the pool opens",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(card_operations.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        registry.register(Box::new(audit_entries.clone()))?;
        registry.register(Box::new(audit_checkpoint_size.clone()))?;
        registry.register(Box::new(audit_checkpoint_time.clone()))?;
        registry.register(Box::new(key_age.clone()))?;
        registry.register(Box::new(pool_connections.clone()))?;
        registry.register(Box::new(pool_max.clone()))?;
        let forward_calls = IntCounterVec::new(
            Opts::new(
                "forward_calls_total",
                "Forwarded calls by upstream (the configured names; `other` for an unknown one) and outcome: the upstream's status class (2xx..5xx), the vault's upstream_* error, or `refused` (refused by the vault before anything was sent)",
            ),
            &["upstream", "outcome"],
        )?;
        let forward_duration = HistogramVec::new(
            HistogramOpts::new(
                "forward_upstream_duration_seconds",
                "Time of the call to the upstream (connection, request, answer), by upstream",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        registry.register(Box::new(forward_calls.clone()))?;
        registry.register(Box::new(forward_duration.clone()))?;
        let backup_last_success = IntGauge::new(
            "backup_last_success_timestamp_seconds",
            "When the newest scheduled backup was completed, Unix seconds (at start: the newest file in backup_dir; 0: none)",
        )?;
        let backup_failures = IntCounter::new(
            "backup_failures_total",
            "Scheduled backups that failed (audit action backup_exported, outcome failure)",
        )?;
        let backup_last_records = IntGauge::new(
            "backup_last_records",
            "Records in the newest scheduled backup written by this instance",
        )?;
        registry.register(Box::new(backup_last_success.clone()))?;
        registry.register(Box::new(backup_failures.clone()))?;
        registry.register(Box::new(backup_last_records.clone()))?;
        Ok(Self {
            backup_last_success,
            backup_failures,
            backup_last_records,
            forward_calls,
            forward_duration,
            storage_writable,
            crl_next_update,
            crl_age,
            crl_stale,
            requests,
            request_duration,
            card_operations,
            auth_failures,
            tls_handshake_failures,
            audit_entries,
            audit_checkpoint_size,
            audit_checkpoint_time,
            key_age,
            pool_connections,
            pool_max,
            rate_limited,
            anomalies,
            source_blocks,
            blocked_sources,
            cvc_held,
            purged,
            sync: Mutex::new(()),
            registry,
            sealed,
            remaining,
            past_period,
            key_records,
            key_state,
        })
    }

    /// One response: counted by listener, method, route pattern and status,
    /// its latency observed, and, for a card route, the operation counted by
    /// outcome. `route` is the matched pattern or [`UNMATCHED_ROUTE`].
    pub fn observe_request(
        &self,
        listener: &str,
        method: &str,
        route: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let listener = code_label(listener);
        let method = method_label(method);
        let route = route_label(route);
        let status_text = status.to_string();
        self.requests
            .with_label_values(&[listener, method, route, &status_text])
            .inc();
        self.request_duration
            .with_label_values(&[listener, route])
            .observe(elapsed.as_secs_f64());
        if let (Some(operation), Some(outcome)) = (card_operation(method, route), outcome(status)) {
            self.card_operations
                .with_label_values(&[operation, outcome])
                .inc();
        }
    }

    /// A failed authentication; `reason` is a fixed code
    /// (`missing_credentials`, `unknown_key`, ...).
    pub fn auth_failure(&self, listener: &str, reason: &str) {
        self.auth_failures
            .with_label_values(&[code_label(listener), code_label(reason)])
            .inc();
    }

    /// A failed TLS handshake; `reason` is a fixed code (`unknown_ca`,
    /// `expired`, `revoked`, `no_certificate`, `protocol`, ...).
    pub fn tls_handshake_failure(&self, listener: &str, reason: &str) {
        self.tls_handshake_failures
            .with_label_values(&[code_label(listener), code_label(reason)])
            .inc();
    }

    /// One forwarded call: `upstream` is a configured name or `other`,
    /// `outcome` a fixed word (see `forward_calls_total`), `upstream_time`
    /// the time of the call to the upstream when one was made.
    pub fn forward(&self, upstream: &str, outcome: &str, upstream_time: Option<Duration>) {
        // Configured names are `[a-z0-9-]`, at most 63 characters.
        let upstream =
            if !upstream.is_empty() && upstream.len() <= 63 && vocabulary_word(upstream, b"-") {
                upstream
            } else {
                OTHER
            };
        self.forward_calls
            .with_label_values(&[upstream, code_label(outcome)])
            .inc();
        if let Some(t) = upstream_time {
            self.forward_duration
                .with_label_values(&[upstream])
                .observe(t.as_secs_f64());
        }
    }

    /// A scheduled backup completed at `at` (Unix seconds) with `records`.
    pub fn backup_succeeded(&self, at: i64, records: u64) {
        self.backup_last_success.set(at);
        self.backup_last_records.set(gauge_value(records));
    }

    /// The newest backup found in the backup directory at start.
    pub fn backup_seen(&self, at: i64) {
        if at > self.backup_last_success.get() {
            self.backup_last_success.set(at);
        }
    }

    /// A scheduled backup failed.
    pub fn backup_failed(&self) {
        self.backup_failures.inc();
    }

    /// Records a purge deleted.
    pub fn purged(&self, counts: vault::store::PurgeCounts) {
        self.purged
            .with_label_values(&["expired"])
            .inc_by(counts.expired);
        self.purged
            .with_label_values(&["retention"])
            .inc_by(counts.retention);
    }

    /// Refresh from the vault, the monitors and the store, and render the
    /// text format.
    pub async fn render(
        &self,
        seal: &SealControl,
        periods: vault::CryptoPeriods,
        monitor: &DetokenizeMonitor,
        sources: &SourceGuard,
        crl: Option<CrlStatus>,
    ) -> String {
        let vault = seal.vault();
        // Whether the store commits: the readiness check (while sealed, the
        // store's probe write alone).
        let writable = match &vault {
            Some(vault) => vault.ready().await,
            None => vault::probe_commit(seal.store().as_ref()).await,
        };
        self.storage_writable.set(i64::from(writable.is_ok()));
        self.crl(crl);
        self.sealed.set(i64::from(vault.is_none()));
        self.cvc_held
            .set(vault.as_ref().map_or(0, |v| gauge_value(v.cvc_held())));
        self.key_records.reset();
        self.key_state.reset();
        self.key_age.reset();
        if let Some(vault) = vault {
            match vault.key_status(periods).await {
                Ok(status) => {
                    self.remaining
                        .set(i64::try_from(status.remaining).unwrap_or(i64::MAX));
                    let past = status.keys.iter().filter(|k| k.past_crypto_period).count()
                        + status
                            .signing_keys
                            .iter()
                            .filter(|k| k.past_crypto_period)
                            .count();
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
                        self.key_age
                            .with_label_values(&labels)
                            .set(gauge_value(k.age.as_secs()));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "metrics: key status unavailable"),
            }
        }
        self.monitoring(monitor, sources);
        let store = seal.store().as_ref();
        self.audit_trail(store).await;
        self.pool(store);
        self.encode()
    }

    fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics: cannot encode");
        }
        tame_digits(&String::from_utf8(out).unwrap_or_default())
    }

    /// The audit trail's size and its newest checkpoint, from the store
    /// (also while sealed): two one-row reads.
    async fn audit_trail(&self, store: &dyn vault::store::Store) {
        match store.audit_size().await {
            Ok(size) => self.audit_entries.set(gauge_value(size)),
            Err(e) => tracing::warn!(error = %e, "metrics: audit size unavailable"),
        }
        let last = match store.last_checkpoint().await {
            Ok(cp) => cp.map(|cp| (cp.tree_size, cp.time.unix_timestamp())),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: audit checkpoints unavailable");
                return;
            }
        };
        let (size, at) = last.unwrap_or((0, 0));
        self.audit_checkpoint_size.set(gauge_value(size));
        self.audit_checkpoint_time.set(at);
    }

    fn crl(&self, crl: Option<CrlStatus>) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (next, age, stale) = match crl {
            Some(c) => (
                c.next_update.unwrap_or(0),
                now.saturating_sub(c.this_update).max(0),
                c.stale_at(now),
            ),
            None => (0, 0, false),
        };
        self.crl_next_update.set(next);
        self.crl_age.set(age);
        self.crl_stale.set(i64::from(stale));
    }

    fn pool(&self, store: &dyn vault::store::Store) {
        let pool = store.pool_state();
        self.pool_connections
            .with_label_values(&["idle"])
            .set(i64::from(pool.idle));
        self.pool_connections
            .with_label_values(&["in_use"])
            .set(i64::from(pool.in_use()));
        self.pool_max.set(i64::from(pool.max));
    }

    /// Counters of the monitors (kept as atomics there) brought up to date.
    fn monitoring(&self, monitor: &DetokenizeMonitor, sources: &SourceGuard) {
        let _serial = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let catch_up = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        let counts = monitor.counts();
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
            sources.refused(),
        );
        catch_up(&self.anomalies, counts.anomalies);
        catch_up(&self.source_blocks, sources.blocks());
        self.blocked_sources
            .set(i64::try_from(sources.blocked_now()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The value of one sample line (`name{labels} value`) of the text.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn requests_card_operations_and_failures_are_counted() {
        let m = Metrics::new().unwrap();
        let ms = Duration::from_millis;
        m.observe_request("api", "POST", "/v1/tokens", 201, ms(3));
        m.observe_request("api", "POST", "/v1/tokens", 200, ms(2));
        m.observe_request("api", "POST", "/v1/tokens", 422, ms(1));
        m.observe_request("api", "POST", "/v1/tokens/batch", 200, ms(40));
        m.observe_request("reveal", "POST", "/v1/detokenize", 200, ms(5));
        m.observe_request("api", "GET", "/v1/tokens/{token}", 404, ms(1));
        m.observe_request("api", "DELETE", "/v1/tokens/{token}", 503, ms(7));
        m.observe_request("admin", "GET", "/metrics", 200, Duration::from_micros(300));
        m.observe_request("api", "GET", UNMATCHED_ROUTE, 404, ms(20_000));
        m.auth_failure("api", "unknown_key");
        m.auth_failure("api", "unknown_key");
        m.auth_failure("reveal", "missing_credentials");
        m.tls_handshake_failure("admin", "unknown_ca");
        let text = m.encode();

        let count = |series: &str| {
            sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
        };
        assert_eq!(
            count(
                r#"cardvault_http_requests_total{listener="api",method="POST",route="/v1/tokens",status="201"}"#
            ),
            1.0
        );
        assert_eq!(
            count(
                r#"cardvault_http_requests_total{listener="api",method="GET",route="<unmatched>",status="404"}"#
            ),
            1.0
        );
        assert_eq!(
            count(
                r#"cardvault_http_request_duration_seconds_count{listener="api",route="/v1/tokens"}"#
            ),
            3.0
        );
        assert_eq!(
            count(
                r#"cardvault_http_request_duration_seconds_bucket{listener="admin",route="/metrics",le="0.0005"}"#
            ),
            1.0
        );
        // 20 s is beyond the last bucket (10 s): only +Inf holds it.
        assert_eq!(
            count(
                r#"cardvault_http_request_duration_seconds_bucket{listener="api",route="<unmatched>",le="10"}"#
            ),
            0.0
        );
        assert_eq!(
            count(
                r#"cardvault_http_request_duration_seconds_bucket{listener="api",route="<unmatched>",le="+Inf"}"#
            ),
            1.0
        );
        for (operation, outcome, n) in [
            ("tokenize", "success", 2.0),
            ("tokenize", "client_error", 1.0),
            ("tokenize_batch", "success", 1.0),
            ("detokenize", "success", 1.0),
            ("metadata", "client_error", 1.0),
            ("delete", "server_error", 1.0),
        ] {
            assert_eq!(
                count(&format!(
                    r#"cardvault_card_operations_total{{operation="{operation}",outcome="{outcome}"}}"#
                )),
                n,
                "{operation} {outcome}"
            );
        }
        // /metrics and unmatched routes are no card operation.
        assert_eq!(
            text.matches("cardvault_card_operations_total{").count(),
            6,
            "{text}"
        );
        assert_eq!(
            count(r#"cardvault_auth_failures_total{listener="api",reason="unknown_key"}"#),
            2.0
        );
        assert_eq!(
            count(
                r#"cardvault_auth_failures_total{listener="reveal",reason="missing_credentials"}"#
            ),
            1.0
        );
        assert_eq!(
            count(
                r#"cardvault_tls_handshake_failures_total{listener="admin",reason="unknown_ca"}"#
            ),
            1.0
        );
    }

    #[test]
    fn labels_outside_their_vocabulary_are_other() {
        // Well-known test card numbers only (shared/test-cards.md).
        let pan = "4111111111111111";
        let m = Metrics::new().unwrap();
        m.observe_request(
            "api",
            "GET",
            &format!("/v1/tokens/{pan}"),
            404,
            Duration::ZERO,
        );
        m.observe_request("api", "GET", "/v1/tokens/tok_0123abcd", 404, Duration::ZERO);
        m.observe_request(pan, "BREW", "/v1/tokens", 404, Duration::ZERO);
        m.auth_failure("api", &format!("pan {pan}"));
        m.auth_failure("api", "Shop-42");
        m.tls_handshake_failure("admin", "CN=checkout.example");
        let text = m.encode();
        for secret in [pan, "tok_", "0123", "Shop-42", "checkout", "BREW", "411"] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        assert!(text.contains(r#"route="other""#), "{text}");
        assert!(text.contains(r#"cardvault_http_requests_total{listener="other",method="other",route="/v1/tokens",status="404"} 1"#), "{text}");
        assert!(
            text.contains(r#"cardvault_auth_failures_total{listener="api",reason="other"} 2"#),
            "{text}"
        );

        assert_eq!(
            route_label("/v1/admin/keys/{purpose}/{version}/retire"),
            "/v1/admin/keys/{purpose}/{version}/retire"
        );
        assert_eq!(
            route_label("/v1/admin/seal-status"),
            "/v1/admin/seal-status"
        );
        assert_eq!(
            route_label("/v1/admin/keys/dek/1/retire"),
            "/v1/admin/keys/dek/1/retire"
        );
        assert_eq!(route_label("/v1/admin/keys/dek/123/retire"), "other");
        assert_eq!(route_label("v1/tokens"), "other");
        assert_eq!(code_label("no_certificate"), "no_certificate");
        assert_eq!(code_label(""), "other");
        assert_eq!(method_label("DELETE"), "DELETE");
    }

    #[test]
    fn no_long_digit_runs_in_the_exposition() {
        let text = "# HELP x y\nx_sum{route=\"/v1/tokens\"} 0.30000000000000004\nx_count 12\ny 1796000000\n";
        let tamed = tame_digits(text);
        assert_eq!(
            tamed,
            "# HELP x y\nx_sum{route=\"/v1/tokens\"} 0.3\nx_count 12\ny 1796000000\n"
        );
        assert!(!vault::pan::contains_pan_like(&tamed));
    }

    /// Every metric the alert rules, their tests and the Grafana dashboard
    /// name (`cardvault_...`) is a family this registry exports (a
    /// histogram's `_bucket`, `_sum` and `_count` as its family), and the
    /// rules' annotations use no label but instance, job and scope (never
    /// one that could hold a name).
    #[test]
    fn alert_rules_and_dashboard_name_only_exported_metrics() {
        use prometheus::proto::MetricType;
        use std::collections::{BTreeMap, BTreeSet};

        // gather() leaves out a vector without children: one sample in each.
        let m = Metrics::new().unwrap();
        m.observe_request("api", "POST", "/v1/tokens", 200, Duration::ZERO);
        m.auth_failure("api", "unknown_key");
        m.tls_handshake_failure("api", "unknown_ca");
        m.forward("acquirer", "2xx", Some(Duration::ZERO));
        m.key_records.with_label_values(&["dek", "1"]).set(1);
        m.key_state
            .with_label_values(&["dek", "1", "active"])
            .set(1);
        m.key_age.with_label_values(&["dek", "1"]).set(1);
        m.pool_connections.with_label_values(&["idle"]).set(1);
        let families: BTreeMap<String, MetricType> = m
            .registry
            .gather()
            .iter()
            .map(|f| (f.get_name().to_owned(), f.get_field_type()))
            .collect();
        assert!(families.contains_key("cardvault_sealed"), "{families:?}");

        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for file in [
            "deploy/prometheus/cardvault.rules.yml",
            "deploy/prometheus/cardvault.rules.test.yml",
            "deploy/grafana/cardvault-dashboard.json",
        ] {
            let text =
                std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            let name_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
            let mut named = BTreeSet::new();
            for (at, _) in text.match_indices("cardvault_") {
                if at > 0 && name_byte(text.as_bytes()[at - 1]) {
                    continue;
                }
                let len = text[at..].bytes().take_while(|&b| name_byte(b)).count();
                let name = &text[at..at + len];
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix))
                    .find(|base| families.get(*base) == Some(&MetricType::HISTOGRAM))
                    .unwrap_or(name);
                named.insert(family.to_owned());
            }
            assert!(
                named.contains("cardvault_sealed"),
                "{file} names no cardvault_sealed: {named:?}"
            );
            let unknown: Vec<_> = named
                .iter()
                .filter(|n| !families.contains_key(n.as_str()))
                .collect();
            assert!(
                unknown.is_empty(),
                "{file} names metrics the service does not export: {unknown:?} (exported: {:?})",
                families.keys().collect::<Vec<_>>()
            );
            if file.ends_with(".rules.yml") {
                for (at, _) in text.match_indices("$labels.") {
                    let label: String = text[at + 8..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        ["instance", "job", "scope"].contains(&label.as_str()),
                        "{file}: an annotation uses label {label}"
                    );
                }
            }
        }
    }
}
