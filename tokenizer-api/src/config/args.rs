//! The option groups the subcommands flatten (clap), each listing only
//! what its commands use: [`VaultArgs`] and [`DatabaseArgs`] for every
//! command that opens the vault, the KEK groups for the commands that need
//! a KEK, [`AuditArchiveArgs`] for `audit archive`, and [`ServeOptions`]:
//! every option of `serve`. Each group copies its values into [`Flags`],
//! which [`Settings`](super::Settings) resolves; flag names, variables and
//! file keys are the same in every command that has them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::flags::{FlagGroup, Flags};

/// Copies the named fields of a group into [`Flags`].
macro_rules! flag_group {
    ($group:ty: $($field:ident),* $(,)?) => {
        impl FlagGroup for $group {
            fn apply(&self, flags: &mut Flags) {
                $(flags.$field.clone_from(&self.$field);)*
            }
        }
    };
}

/// Where the vault is and how to log: every command that opens it.
#[derive(Debug, Clone, Args)]
pub struct VaultArgs {
    /// TOML configuration file.
    #[arg(long, env = "TOKENIZER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the SQLite database (and, by default, the KEK file).
    #[arg(long, env = "TOKENIZER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log level or filter: error, warn, info, debug, trace.
    #[arg(long, env = "TOKENIZER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: `text` (default) or `json` (one JSON object per line:
    /// timestamp, level, message and the event's fields, target, and the
    /// current span and span list when there is one).
    #[arg(long, env = "TOKENIZER_LOG_FORMAT")]
    pub log_format: Option<String>,
}

flag_group!(VaultArgs: config, data_dir, log_level, log_format);

/// The database and how it is opened.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Database: `sqlite://PATH` or `postgres://...` (TLS with
    /// `sslmode=verify-full&sslrootcert=CA.pem`). Default: SQLite file
    /// `<data-dir>/cardvault.db`.
    #[arg(long, env = "TOKENIZER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Bound on every database operation, in milliseconds (default 5000).
    #[arg(long, env = "TOKENIZER_DB_TIMEOUT_MS")]
    pub db_timeout_ms: Option<u64>,
    /// PostgreSQL pool size (default 16).
    #[arg(long, env = "TOKENIZER_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,
}

flag_group!(DatabaseArgs: database_url, db_timeout_ms, db_max_connections);

/// Whether opening the database applies pending migrations (the commands
/// that open it for their work; `migrate` and `restore` always migrate).
#[derive(Debug, Clone, Args)]
pub struct MigrateOnStartArg {
    /// Apply pending migrations when opening the database (default true;
    /// false where the service runs as a role that may not alter the schema).
    #[arg(long, env = "TOKENIZER_MIGRATE_ON_START")]
    pub migrate_on_start: Option<bool>,
}

flag_group!(MigrateOnStartArg: migrate_on_start);

/// The software KEK file (`file` backend; `backup` and `restore` seal and
/// open with it).
#[derive(Debug, Clone, Args)]
pub struct KekFileArg {
    /// Software KEK file; default `<data-dir>/kek.key`.
    #[arg(long, env = "TOKENIZER_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
}

flag_group!(KekFileArg: kek_file);

/// The KEK backend, and the keyring file of the `keyring` backend.
#[derive(Debug, Clone, Args)]
pub struct KeyringArgs {
    /// Where the KEK comes from: `file` (the KEK file; default), `keyring`
    /// (split knowledge: K of N custodians unseal), `pkcs11` (an HSM).
    #[arg(long, env = "TOKENIZER_KEK_BACKEND")]
    pub kek_backend: Option<String>,
    /// Keyring file of the `keyring` backend; default `<data-dir>/keyring.json`.
    #[arg(long, env = "TOKENIZER_KEYRING_FILE")]
    pub keyring_file: Option<PathBuf>,
}

flag_group!(KeyringArgs: kek_backend, keyring_file);

/// The `pkcs11` backend: module, token, PIN source and KEK label.
#[derive(Debug, Clone, Args)]
pub struct Pkcs11Args {
    /// PKCS#11 module (shared library) of the `pkcs11` backend; default
    /// /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "TOKENIZER_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// Label of the PKCS#11 token.
    #[arg(long, env = "TOKENIZER_PKCS11_TOKEN")]
    pub pkcs11_token: Option<String>,
    /// File holding the token's user PIN (mode 0600/0400). The PIN is never
    /// taken from the command line.
    #[arg(long, env = "TOKENIZER_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// Name of the environment variable holding the PIN (instead of a file);
    /// default `TOKENIZER_PKCS11_PIN`.
    #[arg(long, env = "TOKENIZER_PKCS11_PIN_ENV")]
    pub pkcs11_pin_env: Option<String>,
    /// Label of the KEK key object in the token; default `cardvault-kek-1`.
    #[arg(long, env = "TOKENIZER_PKCS11_KEK_LABEL")]
    pub pkcs11_kek_label: Option<String>,
}

flag_group!(Pkcs11Args: pkcs11_module, pkcs11_token, pkcs11_pin_file, pkcs11_pin_env, pkcs11_kek_label);

/// The audit trail's retention (`audit archive`).
#[derive(Debug, Clone, Args)]
pub struct AuditArchiveArgs {
    /// Days of audit history kept in the database; older segments may be
    /// archived with `tokenizer audit archive` (default 365).
    #[arg(long, env = "TOKENIZER_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u32>,
    /// Directory of audit archive files; default `<data-dir>/audit-archive`.
    #[arg(long, env = "TOKENIZER_AUDIT_ARCHIVE_DIR")]
    pub audit_archive_dir: Option<PathBuf>,
}

flag_group!(AuditArchiveArgs: audit_retention_days, audit_archive_dir);

/// `kek generate` and `keys init` accept `--database-url` so that one set
/// of flags (`--data-dir`, `--database-url`) names a vault for every
/// storage command, as before; neither uses it (the KEK is not in the
/// database), so it is hidden from their help and not read from the
/// environment.
#[derive(Debug, Clone, Args)]
pub struct UnusedDatabaseUrl {
    /// Ignored.
    #[arg(long = "database-url", hide = true, value_name = "URL")]
    pub database_url: Option<String>,
}

impl FlagGroup for UnusedDatabaseUrl {
    fn apply(&self, _flags: &mut Flags) {}
}

/// Every KEK backend option (`serve`, `kek generate`).
#[derive(Debug, Clone, Args)]
pub struct KekBackendArgs {
    #[command(flatten)]
    pub keyring: KeyringArgs,
    #[command(flatten)]
    pub pkcs11: Pkcs11Args,
}

impl FlagGroup for KekBackendArgs {
    fn apply(&self, flags: &mut Flags) {
        self.keyring.apply(flags);
        self.pkcs11.apply(flags);
    }
}

/// What the storage commands (principal, tenant, purge, backup, audit
/// archive) need to open the store.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub vault: VaultArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub migrate: MigrateOnStartArg,
}

impl FlagGroup for StoreArgs {
    fn apply(&self, flags: &mut Flags) {
        self.vault.apply(flags);
        self.database.apply(flags);
        self.migrate.apply(flags);
    }
}

/// Every option of `serve` (but `--dev` and `--insecure-plain-http`, in
/// [`ServeArgs`]).
#[derive(Debug, Clone, Args)]
pub struct ServeOptions {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub kek_file: KekFileArg,
    #[command(flatten)]
    pub kek: KekBackendArgs,
    /// Crypto-period of the DEK and the fingerprint key, in days (default
    /// 365): keys in use past it are flagged in key status and /readyz.
    #[arg(long, env = "TOKENIZER_KEY_CRYPTO_PERIOD_DAYS")]
    pub key_crypto_period_days: Option<u32>,
    /// Records moved per re-encryption transaction (default 500).
    #[arg(long, env = "TOKENIZER_REENCRYPT_BATCH")]
    pub reencrypt_batch: Option<u32>,
    /// How often the service looks for records under older keys (and for
    /// keys rotated by other instances), in milliseconds (default 2000).
    #[arg(long, env = "TOKENIZER_REENCRYPT_INTERVAL_MS")]
    pub reencrypt_interval_ms: Option<u64>,
    /// `--dev` only: the one loopback address serving every route (default
    /// 127.0.0.1:8080).
    #[arg(long, env = "TOKENIZER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The `api` listener: tokenize, metadata, delete (default 127.0.0.1:8443).
    #[arg(long, env = "TOKENIZER_LISTEN_API")]
    pub listen_api: Option<SocketAddr>,
    /// The `reveal` listener: detokenize (default 127.0.0.1:8444).
    #[arg(long, env = "TOKENIZER_LISTEN_REVEAL")]
    pub listen_reveal: Option<SocketAddr>,
    /// The `admin` listener: metrics, readiness, keys, unseal, audit
    /// (default 127.0.0.1:8445).
    #[arg(long, env = "TOKENIZER_LISTEN_ADMIN")]
    pub listen_admin: Option<SocketAddr>,
    /// Server certificate chain (PEM, leaf first); reloaded on SIGHUP.
    #[arg(long, env = "TOKENIZER_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM, mode 0600); reloaded on SIGHUP.
    #[arg(long, env = "TOKENIZER_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) client certificates must chain to; reloaded on SIGHUP.
    #[arg(long, env = "TOKENIZER_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Certificate revocation lists (PEM) of those CAs; reloaded on SIGHUP.
    #[arg(long, env = "TOKENIZER_TLS_CLIENT_CRL_FILE")]
    pub tls_client_crl_file: Option<PathBuf>,
    /// A client CRL past its nextUpdate: refuse the certificates it covers
    /// (default) or warn and accept them.
    #[arg(long, env = "TOKENIZER_TLS_CLIENT_CRL_STALE", value_enum)]
    pub tls_client_crl_stale: Option<crate::tls::CrlStale>,
    /// How callers of the api listener authenticate: mtls, api_key or
    /// mtls_and_api_key (default mtls when a client CA is configured, else
    /// api_key).
    #[arg(long, env = "TOKENIZER_API_AUTH")]
    pub api_auth: Option<String>,
    /// The same for the reveal listener.
    #[arg(long, env = "TOKENIZER_REVEAL_AUTH")]
    pub reveal_auth: Option<String>,
    /// The same for the admin listener.
    #[arg(long, env = "TOKENIZER_ADMIN_AUTH")]
    pub admin_auth: Option<String>,
    /// Largest request head (header names and values) in bytes; more is
    /// 431 (default 8192).
    #[arg(long, env = "TOKENIZER_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// How often the service signs an audit checkpoint when the trail grew,
    /// in milliseconds (default 10000; one more at shutdown).
    #[arg(long, env = "TOKENIZER_AUDIT_CHECKPOINT_INTERVAL_MS")]
    pub audit_checkpoint_interval_ms: Option<u64>,
    /// Also sign a checkpoint as soon as this many entries are not yet
    /// covered by one (default 1000).
    #[arg(long, env = "TOKENIZER_AUDIT_CHECKPOINT_EVERY")]
    pub audit_checkpoint_every: Option<u64>,
    /// File outside the database to which every checkpoint is appended (the
    /// external witness); default `<data-dir>/audit-checkpoints.jsonl`.
    #[arg(long, env = "TOKENIZER_AUDIT_WITNESS_FILE")]
    pub audit_witness_file: Option<PathBuf>,
    /// Time a client has to send a whole request (head, and body as the
    /// handler reads it), in milliseconds; then 408 and the connection is
    /// closed (default 10000).
    #[arg(long, env = "TOKENIZER_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Idle keep-alive connections are closed after this many milliseconds
    /// (default 30000).
    #[arg(long, env = "TOKENIZER_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Most open connections per worker (default 1024); more wait in the
    /// listen backlog.
    #[arg(long, env = "TOKENIZER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Detokenize requests per minute and principal (on PostgreSQL for all
    /// instances together, on SQLite this process); beyond it 429
    /// `rate_limited` (default 0: no limit; set it from the principal's
    /// volume).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_RATE_PER_PRINCIPAL")]
    pub detokenize_rate_per_principal: Option<u32>,
    /// Detokenize requests a principal may make at once (default 100).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_BURST_PER_PRINCIPAL")]
    pub detokenize_burst_per_principal: Option<u32>,
    /// Detokenize requests per minute and tenant (of the token), for all
    /// instances together on PostgreSQL (default 0: no limit).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_RATE_PER_TENANT")]
    pub detokenize_rate_per_tenant: Option<u32>,
    /// Detokenize requests of one tenant at once (default 100).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_BURST_PER_TENANT")]
    pub detokenize_burst_per_tenant: Option<u32>,
    /// Window of the detokenize anomaly rule, in seconds (default 300).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_ANOMALY_WINDOW_SECS")]
    pub detokenize_anomaly_window_secs: Option<u64>,
    /// The rule fires when a principal's distinct tokens in a window exceed
    /// this many times its baseline (default 5) ...
    #[arg(long, env = "TOKENIZER_DETOKENIZE_ANOMALY_FACTOR")]
    pub detokenize_anomaly_factor: Option<u32>,
    /// ... and this many (default 200; 0 turns the rule off).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_ANOMALY_MIN_DISTINCT")]
    pub detokenize_anomaly_min_distinct: Option<u32>,
    /// Windows the baseline is the mean of (default 12).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_ANOMALY_BASELINE_WINDOWS")]
    pub detokenize_anomaly_baseline_windows: Option<u32>,
    /// Failed authentications per minute from one source address (IPv6:
    /// one /64) before it is refused with 429 (0: no limit; default 300).
    #[arg(long, env = "TOKENIZER_AUTH_FAILURES_PER_SOURCE")]
    pub auth_failures_per_source: Option<u32>,
    /// How long a source stays refused, in seconds (default 60).
    #[arg(long, env = "TOKENIZER_AUTH_BLOCK_SECS")]
    pub auth_block_secs: Option<u64>,
    /// How long a card security code is held in memory at most, in seconds
    /// (default and maximum 3600).
    #[arg(long, env = "TOKENIZER_CVC_TTL_SECS")]
    pub cvc_ttl_secs: Option<u64>,
    /// The public base URL of the hosted-collection edge (`tokenizer
    /// edge`), e.g. https://pay.example: collection sessions answer their
    /// `frame_url` under it (without it, sessions cannot be created).
    #[arg(long, env = "TOKENIZER_COLLECT_PUBLIC_URL")]
    pub collect_public_url: Option<String>,
    /// How often the service purges records past their expiry or their
    /// tenant's retention, in seconds (default 3600).
    #[arg(long, env = "TOKENIZER_PURGE_INTERVAL_SECS")]
    pub purge_interval_secs: Option<u64>,
    /// Where the scheduled backups go: a directory outside the data
    /// directory (refused at start otherwise), created 0700.
    #[arg(long, env = "TOKENIZER_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Write a backup every this many seconds (0 or absent: no scheduled
    /// backups; needs backup_dir). On several instances, set it on one.
    #[arg(long, env = "TOKENIZER_BACKUP_INTERVAL_SECS")]
    pub backup_interval_secs: Option<u64>,
    /// Scheduled backups kept: the newest N (default 7); older ones are
    /// deleted once a new one is complete.
    #[arg(long, env = "TOKENIZER_BACKUP_KEEP")]
    pub backup_keep: Option<u32>,
    /// Concurrent requests share one transaction and one durable commit
    /// (default true; false commits every request on its own, for
    /// comparison).
    #[arg(long, env = "TOKENIZER_DB_GROUP_COMMIT")]
    pub db_group_commit: Option<bool>,
}

impl FlagGroup for ServeOptions {
    fn apply(&self, flags: &mut Flags) {
        self.store.apply(flags);
        self.kek_file.apply(flags);
        self.kek.apply(flags);
        flags
            .key_crypto_period_days
            .clone_from(&self.key_crypto_period_days);
        flags.reencrypt_batch.clone_from(&self.reencrypt_batch);
        flags
            .reencrypt_interval_ms
            .clone_from(&self.reencrypt_interval_ms);
        flags.listen.clone_from(&self.listen);
        flags.listen_api.clone_from(&self.listen_api);
        flags.listen_reveal.clone_from(&self.listen_reveal);
        flags.listen_admin.clone_from(&self.listen_admin);
        flags.tls_cert_file.clone_from(&self.tls_cert_file);
        flags.tls_key_file.clone_from(&self.tls_key_file);
        flags
            .tls_client_ca_file
            .clone_from(&self.tls_client_ca_file);
        flags
            .tls_client_crl_file
            .clone_from(&self.tls_client_crl_file);
        flags.tls_client_crl_stale = self.tls_client_crl_stale;
        flags.api_auth.clone_from(&self.api_auth);
        flags.reveal_auth.clone_from(&self.reveal_auth);
        flags.admin_auth.clone_from(&self.admin_auth);
        flags.max_header_bytes.clone_from(&self.max_header_bytes);
        flags
            .audit_checkpoint_interval_ms
            .clone_from(&self.audit_checkpoint_interval_ms);
        flags
            .audit_checkpoint_every
            .clone_from(&self.audit_checkpoint_every);
        flags
            .audit_witness_file
            .clone_from(&self.audit_witness_file);
        flags
            .request_timeout_ms
            .clone_from(&self.request_timeout_ms);
        flags.idle_timeout_ms.clone_from(&self.idle_timeout_ms);
        flags.max_connections.clone_from(&self.max_connections);
        flags
            .detokenize_rate_per_principal
            .clone_from(&self.detokenize_rate_per_principal);
        flags
            .detokenize_burst_per_principal
            .clone_from(&self.detokenize_burst_per_principal);
        flags
            .detokenize_rate_per_tenant
            .clone_from(&self.detokenize_rate_per_tenant);
        flags
            .detokenize_burst_per_tenant
            .clone_from(&self.detokenize_burst_per_tenant);
        flags
            .detokenize_anomaly_window_secs
            .clone_from(&self.detokenize_anomaly_window_secs);
        flags
            .detokenize_anomaly_factor
            .clone_from(&self.detokenize_anomaly_factor);
        flags
            .detokenize_anomaly_min_distinct
            .clone_from(&self.detokenize_anomaly_min_distinct);
        flags
            .detokenize_anomaly_baseline_windows
            .clone_from(&self.detokenize_anomaly_baseline_windows);
        flags
            .auth_failures_per_source
            .clone_from(&self.auth_failures_per_source);
        flags.auth_block_secs.clone_from(&self.auth_block_secs);
        flags.cvc_ttl_secs.clone_from(&self.cvc_ttl_secs);
        flags
            .collect_public_url
            .clone_from(&self.collect_public_url);
        flags
            .purge_interval_secs
            .clone_from(&self.purge_interval_secs);
        flags.backup_dir.clone_from(&self.backup_dir);
        flags
            .backup_interval_secs
            .clone_from(&self.backup_interval_secs);
        flags.backup_keep.clone_from(&self.backup_keep);
        flags.db_group_commit.clone_from(&self.db_group_commit);
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: ServeOptions,
    /// INSECURE development mode: generates a KEK, a dev API key and a dev
    /// PKI (local CA, server and client certificates) under the data dir;
    /// one loopback listener with every route. Never in production.
    #[arg(long, env = "TOKENIZER_DEV")]
    pub dev: bool,
    /// `--dev` only: serve plain HTTP (no TLS) on the loopback listener.
    #[arg(long, env = "TOKENIZER_INSECURE_PLAIN_HTTP", requires = "dev")]
    pub insecure_plain_http: bool,
    /// `--dev` only: the loopback address of the trial edge (the hosted
    /// card form) started beside the vault (default 127.0.0.1:8446; port 0
    /// picks a free one).
    #[arg(long, env = "TOKENIZER_DEV_EDGE_LISTEN")]
    pub dev_edge_listen: Option<SocketAddr>,
}

/// The long names of the options only `serve` has (for the help tests).
pub const SERVE_ONLY_OPTIONS: &[&str] = &[
    "key-crypto-period-days",
    "reencrypt-batch",
    "reencrypt-interval-ms",
    "listen",
    "listen-api",
    "listen-reveal",
    "listen-admin",
    "tls-cert-file",
    "tls-key-file",
    "tls-client-ca-file",
    "tls-client-crl-file",
    "tls-client-crl-stale",
    "api-auth",
    "reveal-auth",
    "admin-auth",
    "max-header-bytes",
    "audit-checkpoint-interval-ms",
    "audit-checkpoint-every",
    "audit-witness-file",
    "request-timeout-ms",
    "idle-timeout-ms",
    "max-connections",
    "detokenize-rate-per-principal",
    "detokenize-burst-per-principal",
    "detokenize-rate-per-tenant",
    "detokenize-burst-per-tenant",
    "detokenize-anomaly-window-secs",
    "detokenize-anomaly-factor",
    "detokenize-anomaly-min-distinct",
    "detokenize-anomaly-baseline-windows",
    "auth-failures-per-source",
    "collect-public-url",
    "auth-block-secs",
    "cvc-ttl-secs",
    "purge-interval-secs",
    "db-group-commit",
    "backup-dir",
    "backup-interval-secs",
    "backup-keep",
];
