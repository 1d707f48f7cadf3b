//! Every option's command-line value (flag or `TOKENIZER_*` variable, as
//! clap read it) in one flat struct: the input of
//! [`Settings`](super::Settings) resolution. A subcommand fills in the
//! groups it has ([`FlagGroup`]); the rest stays `None`, so the file or the
//! default applies.

use std::net::SocketAddr;
use std::path::PathBuf;

/// One option group (or a tuple of them) of a subcommand.
pub trait FlagGroup {
    /// Copies this group's values into `flags`.
    fn apply(&self, flags: &mut Flags);

    /// The values of this group alone.
    fn flags(&self) -> Flags {
        let mut flags = Flags::default();
        self.apply(&mut flags);
        flags
    }
}

impl<T: FlagGroup + ?Sized> FlagGroup for &T {
    fn apply(&self, flags: &mut Flags) {
        (**self).apply(flags);
    }
}

impl<A: FlagGroup, B: FlagGroup> FlagGroup for (A, B) {
    fn apply(&self, flags: &mut Flags) {
        self.0.apply(flags);
        self.1.apply(flags);
    }
}

impl<A: FlagGroup, B: FlagGroup, C: FlagGroup> FlagGroup for (A, B, C) {
    fn apply(&self, flags: &mut Flags) {
        self.0.apply(flags);
        self.1.apply(flags);
        self.2.apply(flags);
    }
}

impl FlagGroup for Flags {
    fn apply(&self, flags: &mut Flags) {
        flags.clone_from(self);
    }
}

/// The command-line values of every option; `None`: not given (or not an
/// option of the subcommand).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub kek_file: Option<PathBuf>,
    pub kek_backend: Option<String>,
    pub keyring_file: Option<PathBuf>,
    pub pkcs11_module: Option<PathBuf>,
    pub pkcs11_token: Option<String>,
    pub pkcs11_pin_file: Option<PathBuf>,
    pub pkcs11_pin_env: Option<String>,
    pub pkcs11_kek_label: Option<String>,
    pub key_crypto_period_days: Option<u32>,
    pub reencrypt_batch: Option<u32>,
    pub reencrypt_interval_ms: Option<u64>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub listen: Option<SocketAddr>,
    pub listen_api: Option<SocketAddr>,
    pub listen_reveal: Option<SocketAddr>,
    pub listen_admin: Option<SocketAddr>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_client_ca_file: Option<PathBuf>,
    pub tls_client_crl_file: Option<PathBuf>,
    pub tls_client_crl_stale: Option<crate::tls::CrlStale>,
    pub api_auth: Option<String>,
    pub reveal_auth: Option<String>,
    pub admin_auth: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub migrate_on_start: Option<bool>,
    pub db_timeout_ms: Option<u64>,
    pub db_max_connections: Option<u32>,
    pub audit_checkpoint_interval_ms: Option<u64>,
    pub audit_checkpoint_every: Option<u64>,
    pub audit_witness_file: Option<PathBuf>,
    pub audit_retention_days: Option<u32>,
    pub audit_archive_dir: Option<PathBuf>,
    pub request_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub detokenize_rate_per_principal: Option<u32>,
    pub detokenize_burst_per_principal: Option<u32>,
    pub detokenize_rate_per_tenant: Option<u32>,
    pub detokenize_burst_per_tenant: Option<u32>,
    pub detokenize_anomaly_window_secs: Option<u64>,
    pub detokenize_anomaly_factor: Option<u32>,
    pub detokenize_anomaly_min_distinct: Option<u32>,
    pub detokenize_anomaly_baseline_windows: Option<u32>,
    pub auth_failures_per_source: Option<u32>,
    pub auth_block_secs: Option<u64>,
    pub cvc_ttl_secs: Option<u64>,
    pub collect_public_url: Option<String>,
    pub purge_interval_secs: Option<u64>,
    pub backup_dir: Option<PathBuf>,
    pub backup_interval_secs: Option<u64>,
    pub backup_keep: Option<u32>,
    pub db_group_commit: Option<bool>,
}
