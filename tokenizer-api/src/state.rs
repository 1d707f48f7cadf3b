//! The state every worker of every listener shares ([`AppState`]), and the
//! request id the middleware gives each request ([`RequestId`]).

use std::sync::Arc;

use vault::Vault;

use crate::error::ApiError;
use crate::seal::SealControl;

/// Shared state of every worker.
#[derive(Debug)]
pub struct AppState {
    /// Holds the vault once unsealed (see `seal`).
    pub seal: Arc<SealControl>,
    /// Crypto-periods shown by key status and `/readyz`.
    pub crypto_periods: vault::CryptoPeriods,
    pub metrics: crate::metrics::Metrics,
    pub max_body_bytes: usize,
    /// Deadline for the whole body to arrive (slow clients get 408).
    pub request_timeout: std::time::Duration,
    pub max_batch_body_bytes: usize,
    /// Largest accepted request head (header names and values), in bytes.
    pub max_header_bytes: usize,
    /// Detokenize rate limits and anomaly rule: the in-memory state on
    /// SQLite, the refusal counters everywhere (on PostgreSQL the limits
    /// and counts are the database's; survives sealing).
    pub monitor: vault::monitor::DetokenizeMonitor,
    /// Failed authentications per source address.
    pub sources: crate::limits::SourceGuard,
    /// The hosted-collection edge's public base URL (`frame_url`s).
    pub collect_public_url: Option<String>,
    /// The forwarding proxy's upstreams (reloaded on SIGHUP).
    pub upstreams: Arc<crate::upstream::ReloadableUpstreams>,
    /// The listeners' TLS material (None: plain HTTP, `--dev` only); the
    /// metrics read the client CRLs' validity from it.
    pub tls: Option<Arc<crate::tls::ReloadableTls>>,
}

impl AppState {
    /// The unsealed vault, or 503 `sealed`.
    pub fn vault(&self) -> Result<Arc<Vault>, ApiError> {
        self.seal.vault().ok_or(ApiError::Sealed)
    }
}

/// Request id assigned by the middleware in `http.rs`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);
