//! The resolved [`Settings`] of a command: for every setting the flag (or
//! its `TOKENIZER_*` variable), then the configuration file, then the
//! default; the errors of a configuration that cannot run; the constants
//! of the defaults.

use std::path::PathBuf;

use super::file::{load_file, FileConfig};
use super::flags::{FlagGroup, Flags};
use super::sections::{kek_source, listeners, monitor_config, KekFileConfig};

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; may hold a password: never logged.
    pub database_url: String,
    /// Apply pending migrations at start-up (off where the runtime role may
    /// not alter the schema; then run `tokenizer migrate` as the owner).
    pub migrate_on_start: bool,
    /// Bound on each database operation; requests fail with 503 after it.
    pub db_timeout: std::time::Duration,
    pub db_max_connections: u32,
    pub audit_checkpoint_interval: std::time::Duration,
    /// Entries after which a checkpoint is due even before the interval.
    pub audit_checkpoint_every: u64,
    pub audit_witness_file: PathBuf,
    /// Days of audit history kept online (archiving keeps at least these).
    pub audit_retention_days: u32,
    pub audit_archive_dir: PathBuf,
    /// Whole-request deadline (head and body); 408 after it.
    pub request_timeout: std::time::Duration,
    /// Idle keep-alive connections are closed after it.
    pub idle_timeout: std::time::Duration,
    /// Most open connections per worker.
    pub max_connections: usize,
    pub kek_file: PathBuf,
    /// Where the KEK comes from (see `seal`).
    pub kek_source: crate::seal::KekSource,
    pub crypto_periods: vault::CryptoPeriods,
    pub reencrypt_batch: u32,
    pub reencrypt_interval: std::time::Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    /// The listeners: one (`dev`) in `--dev`, else api, reveal and admin.
    pub listeners: Vec<crate::listeners::ListenerSpec>,
    /// TLS material; `None` only in `--dev` with `--insecure-plain-http`.
    pub tls: Option<crate::tls::TlsFiles>,
    /// `--dev` over TLS without configured files: generate the dev PKI in
    /// `<data-dir>/dev-tls` at start.
    pub dev_pki: bool,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
    pub dev: bool,
    /// Largest accepted body of single-card requests.
    pub max_body_bytes: usize,
    /// Largest accepted body of batch requests.
    pub max_batch_body_bytes: usize,
    /// Detokenize rate limits and anomaly rule (shared by the instances on
    /// PostgreSQL, in memory on SQLite).
    pub detokenize_monitor: vault::monitor::MonitorConfig,
    /// Failed authentications per minute and source (0: no limit).
    pub auth_failures_per_source: u32,
    /// How long a source that used them up is refused.
    pub auth_block: std::time::Duration,
    /// How long a security code is held (at most an hour).
    pub cvc_ttl: std::time::Duration,
    /// How often the purge runs inside the service.
    pub purge_interval: std::time::Duration,
    /// The hosted-collection edge's public base URL (no trailing slash).
    pub collect_public_url: Option<String>,
    /// The forwarding proxy's upstreams (`[[upstream]]`, file only).
    pub upstreams: Vec<super::upstreams::UpstreamSpec>,
    /// The configuration file, read again on SIGHUP for the upstreams.
    pub config_file: Option<std::path::PathBuf>,
    /// Group commit of concurrent writes (see `vault::commit`).
    pub db_group_commit: bool,
    /// Scheduled backups inside the service (None: off).
    pub backup: Option<BackupSchedule>,
}

/// `backup_dir`, `backup_interval_secs`, `backup_keep`: the service writes
/// a backup every `interval` into `dir` and keeps the newest `keep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSchedule {
    /// Outside the data directory (checked at start).
    pub dir: std::path::PathBuf,
    pub interval: std::time::Duration,
    /// At least 1.
    pub keep: u32,
}

/// Backups kept by default (`backup_keep`).
pub const DEFAULT_BACKUP_KEEP: u32 = 7;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cardvault";
pub const DEV_DATA_DIR: &str = ".cardvault-dev";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_LISTEN_API: &str = "127.0.0.1:8443";
pub const DEFAULT_LISTEN_REVEAL: &str = "127.0.0.1:8444";
pub const DEFAULT_LISTEN_ADMIN: &str = "127.0.0.1:8445";
/// Where `--dev` keeps its generated PKI, under the data dir.
pub const DEV_TLS_DIR: &str = "dev-tls";

/// How log lines are written (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, the event's fields
    /// (`message`, `request_id`, ...) at the top level, `target`, and
    /// `span`/`spans` inside a span.
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("log_format must be text or json")]
    LogFormat,
    #[error("cannot read configuration file {0}: {1}")]
    Read(String, #[source] std::io::Error),
    #[error("configuration file {0} is invalid: {1}")]
    Parse(String, #[source] toml::de::Error),
    #[error("kek_backend must be file, keyring or pkcs11")]
    KekBackend,
    #[error("the pkcs11 backend needs pkcs11_token")]
    Pkcs11Token,
    #[error("--dev uses the file KEK backend")]
    DevBackend,
    #[error(
        "plain HTTP is for --dev only (--insecure-plain-http); production listeners serve TLS"
    )]
    PlainHttpOutsideDev,
    #[error("every listener serves TLS: set tls_cert_file and tls_key_file (see `tokenizer dev-pki` for a trial PKI)")]
    TlsRequired,
    #[error("{0} must be mtls, api_key or mtls_and_api_key")]
    AuthMode(&'static str),
    #[error("{0} requires client certificates: set tls_client_ca_file")]
    MtlsWithoutCa(&'static str),
    #[error("collect_public_url must be an https URL (http on loopback in --dev) without query or fragment")]
    CollectUrl,
    #[error(transparent)]
    Upstream(#[from] super::upstreams::UpstreamConfigError),
    #[error("backup_interval_secs needs backup_dir (a directory outside the data directory)")]
    BackupDirMissing,
    #[error("backup_keep must be at least 1")]
    BackupKeep,
}

/// Scheduled backups: on when `backup_interval_secs` is above 0, which
/// needs `backup_dir`.
fn backup_schedule(
    flags: &super::Flags,
    file: &super::file::FileConfig,
) -> Result<Option<BackupSchedule>, ConfigError> {
    let interval = flags
        .backup_interval_secs
        .or(file.backup_interval_secs)
        .unwrap_or(0);
    let keep = flags
        .backup_keep
        .or(file.backup_keep)
        .unwrap_or(DEFAULT_BACKUP_KEEP);
    if keep == 0 {
        return Err(ConfigError::BackupKeep);
    }
    if interval == 0 {
        return Ok(None);
    }
    let dir = flags
        .backup_dir
        .clone()
        .or_else(|| file.backup_dir.clone())
        .ok_or(ConfigError::BackupDirMissing)?;
    Ok(Some(BackupSchedule {
        dir,
        interval: std::time::Duration::from_secs(interval),
        keep,
    }))
}

/// The edge's public base URL: its origin as a browser writes it (checked
/// like a session's origin), an optional path, no query or fragment, no
/// trailing slash.
fn collect_url(url: &str, dev: bool) -> Result<String, ConfigError> {
    let url = url.trim_end_matches('/');
    if url.contains(['?', '#', ' ', '\\']) || url.chars().any(char::is_control) {
        return Err(ConfigError::CollectUrl);
    }
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let (origin, path) = match url[after_scheme..].find('/') {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, ""),
    };
    let origin = vault::collect::Origin::parse(origin, dev).map_err(|_| ConfigError::CollectUrl)?;
    Ok(format!("{}{path}", origin.as_str()))
}

/// The `[[upstream]]` tables of a configuration file, checked (SIGHUP).
pub fn read_upstreams(
    path: &std::path::Path,
) -> Result<Vec<super::upstreams::UpstreamSpec>, ConfigError> {
    let file = load_file(path)?;
    Ok(super::upstreams::check(file.upstream)?)
}

impl Settings {
    /// The settings of a command that does not listen, from its option
    /// groups (e.g. `&(&store, &kek_file)`), the variables clap read for
    /// them, the configuration file and the defaults.
    pub fn resolve(flags: &impl FlagGroup, dev_flag: bool) -> Result<Settings, ConfigError> {
        Settings::resolve_inner(&flags.flags(), dev_flag, None)
    }

    /// [`Settings::resolve`] for `serve`: the listeners and TLS too, with
    /// `--insecure-plain-http`.
    pub fn resolve_serve(
        flags: &impl FlagGroup,
        dev_flag: bool,
        plain_http_flag: bool,
    ) -> Result<Settings, ConfigError> {
        Settings::resolve_inner(&flags.flags(), dev_flag, Some(plain_http_flag))
    }

    fn resolve_inner(
        flags: &Flags,
        dev_flag: bool,
        serving: Option<bool>,
    ) -> Result<Settings, ConfigError> {
        let mut file = match &flags.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let kek_file_config = KekFileConfig {
            kek_backend: file.kek_backend.take(),
            keyring_file: file.keyring_file.take(),
            pkcs11_module: file.pkcs11_module.take(),
            pkcs11_token: file.pkcs11_token.take(),
            pkcs11_pin_file: file.pkcs11_pin_file.take(),
            pkcs11_pin_env: file.pkcs11_pin_env.take(),
            pkcs11_kek_label: file.pkcs11_kek_label.take(),
        };
        let detokenize_monitor = monitor_config(flags, &file);
        let backup = backup_schedule(flags, &file)?;
        let log_format = match flags.log_format.clone().or(file.log_format.take()) {
            Some(s) => LogFormat::parse(&s).ok_or(ConfigError::LogFormat)?,
            None => LogFormat::Text,
        };
        let dev = dev_flag || file.dev.unwrap_or(false);
        let data_dir = flags
            .data_dir
            .clone()
            .or(file.data_dir.take())
            .unwrap_or_else(|| PathBuf::from(if dev { DEV_DATA_DIR } else { DEFAULT_DATA_DIR }));
        let kek_file = flags
            .kek_file
            .clone()
            .or(file.kek_file.take())
            .unwrap_or_else(|| data_dir.join("kek.key"));
        // Only `serve` listens; other commands need no certificates.
        let (listeners, tls, dev_pki) = match serving {
            Some(plain_http_flag) => listeners(flags, &mut file, dev, plain_http_flag, &data_dir)?,
            None => (Vec::new(), None, false),
        };
        let database_url = flags
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| vault::store::sqlite_url(&data_dir.join("cardvault.db")));
        let audit_witness_file = flags
            .audit_witness_file
            .clone()
            .or(file.audit_witness_file)
            .unwrap_or_else(|| data_dir.join("audit-checkpoints.jsonl"));
        let audit_checkpoint_interval = std::time::Duration::from_millis(
            flags
                .audit_checkpoint_interval_ms
                .or(file.audit_checkpoint_interval_ms)
                .unwrap_or(10_000)
                .max(10),
        );
        let kek_source = kek_source(flags, &kek_file_config, &data_dir, &kek_file, dev)?;
        let audit_archive_dir = flags
            .audit_archive_dir
            .clone()
            .or(file.audit_archive_dir)
            .unwrap_or_else(|| data_dir.join("audit-archive"));
        let collect_public_url = flags
            .collect_public_url
            .clone()
            .or(file.collect_public_url.take())
            .map(|u| collect_url(&u, dev))
            .transpose()?;
        let upstreams = super::upstreams::check(std::mem::take(&mut file.upstream))?;
        Ok(Settings {
            upstreams,
            config_file: flags.config.clone(),
            collect_public_url,
            db_group_commit: flags
                .db_group_commit
                .or(file.db_group_commit)
                .unwrap_or(true),
            cvc_ttl: std::time::Duration::from_secs(
                flags
                    .cvc_ttl_secs
                    .or(file.cvc_ttl_secs)
                    .unwrap_or(3600)
                    .clamp(1, 3600),
            ),
            backup,
            purge_interval: std::time::Duration::from_secs(
                flags
                    .purge_interval_secs
                    .or(file.purge_interval_secs)
                    .unwrap_or(3600)
                    .max(1),
            ),
            detokenize_monitor,
            auth_failures_per_source: flags
                .auth_failures_per_source
                .or(file.auth_failures_per_source)
                .unwrap_or(300),
            auth_block: std::time::Duration::from_secs(
                flags
                    .auth_block_secs
                    .or(file.auth_block_secs)
                    .unwrap_or(60)
                    .max(1),
            ),
            database_url,
            audit_witness_file,
            audit_archive_dir,
            audit_retention_days: flags
                .audit_retention_days
                .or(file.audit_retention_days)
                .unwrap_or(vault::archive::DEFAULT_RETENTION_DAYS),
            audit_checkpoint_interval,
            audit_checkpoint_every: flags
                .audit_checkpoint_every
                .or(file.audit_checkpoint_every)
                .unwrap_or(1000)
                .max(1),
            migrate_on_start: flags
                .migrate_on_start
                .or(file.migrate_on_start)
                .unwrap_or(true),
            db_timeout: std::time::Duration::from_millis(
                flags.db_timeout_ms.or(file.db_timeout_ms).unwrap_or(5000),
            ),
            db_max_connections: flags
                .db_max_connections
                .or(file.db_max_connections)
                .unwrap_or(16),
            crypto_periods: {
                let days = flags
                    .key_crypto_period_days
                    .or(file.key_crypto_period_days)
                    .unwrap_or(365)
                    .max(1);
                let period = std::time::Duration::from_secs(u64::from(days) * 86_400);
                vault::CryptoPeriods {
                    dek: period,
                    fingerprint: period,
                    audit_signing: period,
                }
            },
            reencrypt_batch: flags
                .reencrypt_batch
                .or(file.reencrypt_batch)
                .unwrap_or(500)
                .clamp(1, 10_000),
            reencrypt_interval: std::time::Duration::from_millis(
                flags
                    .reencrypt_interval_ms
                    .or(file.reencrypt_interval_ms)
                    .unwrap_or(2000)
                    .max(10),
            ),
            data_dir,
            kek_file,
            kek_source,
            log_level: flags
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format,
            listeners,
            tls,
            dev_pki,
            max_header_bytes: flags
                .max_header_bytes
                .or(file.max_header_bytes)
                .unwrap_or(8 * 1024)
                .clamp(1024, 32 * 1024),
            dev,
            max_body_bytes: file.max_body_bytes.unwrap_or(16 * 1024),
            max_batch_body_bytes: file.max_batch_body_bytes.unwrap_or(1024 * 1024),
            request_timeout: std::time::Duration::from_millis(
                flags
                    .request_timeout_ms
                    .or(file.request_timeout_ms)
                    .unwrap_or(10_000)
                    .max(100),
            ),
            idle_timeout: std::time::Duration::from_millis(
                flags
                    .idle_timeout_ms
                    .or(file.idle_timeout_ms)
                    .unwrap_or(30_000)
                    .max(100),
            ),
            max_connections: flags
                .max_connections
                .or(file.max_connections)
                .unwrap_or(1024)
                .max(1),
        })
    }

    /// How to open the store.
    pub fn store_config(&self, migrate: bool) -> vault::store::StoreConfig {
        vault::store::StoreConfig {
            url: self.database_url.clone(),
            migrate,
            op_timeout: self.db_timeout,
            max_connections: self.db_max_connections,
        }
    }

    /// The SQLite database file, when the store is SQLite.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self
            .database_url
            .strip_prefix("sqlite://")
            .or_else(|| self.database_url.strip_prefix("sqlite:"))?;
        Some(PathBuf::from(rest.split('?').next().unwrap_or_default()))
    }
}
