//! The TOML configuration file (`--config FILE`): every key, by the name
//! the README's table gives it. Reading it is all this module does; the
//! precedence over it (flag, variable) is in `settings`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// The configuration file. Unknown keys are an error (a typo must not
/// silently fall back to a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) data_dir: Option<PathBuf>,
    pub(super) database_url: Option<String>,
    pub(super) kek_file: Option<PathBuf>,
    pub(super) log_level: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) listen: Option<SocketAddr>,
    pub(super) listen_api: Option<SocketAddr>,
    pub(super) listen_reveal: Option<SocketAddr>,
    pub(super) listen_admin: Option<SocketAddr>,
    pub(super) tls_cert_file: Option<PathBuf>,
    pub(super) tls_key_file: Option<PathBuf>,
    pub(super) tls_client_ca_file: Option<PathBuf>,
    pub(super) tls_client_crl_file: Option<PathBuf>,
    #[serde(alias = "crl_stale")]
    pub(super) tls_client_crl_stale: Option<crate::tls::CrlStale>,
    pub(super) api_auth: Option<String>,
    pub(super) reveal_auth: Option<String>,
    pub(super) admin_auth: Option<String>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) insecure_plain_http: Option<bool>,
    pub(super) dev: Option<bool>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) max_batch_body_bytes: Option<usize>,
    pub(super) migrate_on_start: Option<bool>,
    pub(super) db_timeout_ms: Option<u64>,
    pub(super) db_max_connections: Option<u32>,
    pub(super) audit_checkpoint_interval_ms: Option<u64>,
    pub(super) audit_checkpoint_every: Option<u64>,
    pub(super) audit_witness_file: Option<PathBuf>,
    pub(super) audit_retention_days: Option<u32>,
    pub(super) audit_archive_dir: Option<PathBuf>,
    pub(super) request_timeout_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) kek_backend: Option<String>,
    pub(super) keyring_file: Option<PathBuf>,
    pub(super) pkcs11_module: Option<PathBuf>,
    pub(super) pkcs11_token: Option<String>,
    pub(super) pkcs11_pin_file: Option<PathBuf>,
    pub(super) pkcs11_pin_env: Option<String>,
    pub(super) pkcs11_kek_label: Option<String>,
    pub(super) key_crypto_period_days: Option<u32>,
    pub(super) reencrypt_batch: Option<u32>,
    pub(super) reencrypt_interval_ms: Option<u64>,
    pub(super) detokenize_rate_per_principal: Option<u32>,
    pub(super) detokenize_burst_per_principal: Option<u32>,
    pub(super) detokenize_rate_per_tenant: Option<u32>,
    pub(super) detokenize_burst_per_tenant: Option<u32>,
    pub(super) detokenize_anomaly_window_secs: Option<u64>,
    pub(super) detokenize_anomaly_factor: Option<u32>,
    pub(super) detokenize_anomaly_min_distinct: Option<u32>,
    pub(super) detokenize_anomaly_baseline_windows: Option<u32>,
    pub(super) auth_failures_per_source: Option<u32>,
    pub(super) auth_block_secs: Option<u64>,
    pub(super) cvc_ttl_secs: Option<u64>,
    pub(super) collect_public_url: Option<String>,
    pub(super) purge_interval_secs: Option<u64>,
    pub(super) backup_dir: Option<PathBuf>,
    pub(super) backup_interval_secs: Option<u64>,
    pub(super) backup_keep: Option<u32>,
    pub(super) db_group_commit: Option<bool>,
    /// `[[upstream]]` tables: the forwarding proxy's destinations.
    #[serde(default)]
    pub(super) upstream: Vec<super::upstreams::UpstreamFile>,
}

pub(super) fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(shown.clone(), e))?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse(shown, e))
}
