//! Command line, environment and configuration file.
//!
//! Precedence, highest first: command-line flag, `TOKENIZER_*` environment
//! variable, `--config FILE` (TOML), built-in default. Every setting has all
//! four; the table is in README.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "tokenizer",
    version,
    about = "cardvault: card vault and tokenizer"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Manage principals (API clients) and their keys.
    Principal {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Apply pending database migrations (run with the database owner role).
    Migrate {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Write a consistent, KEK-sealed backup of the vault to a new file.
    Backup {
        #[command(flatten)]
        common: CommonArgs,
        /// The backup file to create (mode 0600; never overwritten).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Restore a backup into an empty database (either backend).
    Restore {
        #[command(flatten)]
        common: CommonArgs,
        /// The backup file to read; it is fully checked before anything is written.
        #[arg(long)]
        from: std::path::PathBuf,
    },
    /// The audit trail's retention: archive old segments to files.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Key custody: create the split-knowledge keyring.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Give one custodian's passphrase to a sealed service (keyring backend),
    /// or ask it to log in to its HSM again (pkcs11 backend). The passphrase
    /// is read from standard input (one line), never from the command line;
    /// the admin API key (role key_admin) from TOKENIZER_API_KEY.
    Unseal {
        /// The service's admin interface.
        #[arg(
            long,
            env = "TOKENIZER_ADMIN_URL",
            default_value = "https://127.0.0.1:8445"
        )]
        url: String,
        /// The custodian's name as in the keyring.
        #[arg(long)]
        custodian: Option<String>,
    },
    /// Seal the service: every key leaves its memory at once. The admin API
    /// key (role key_admin) is read from TOKENIZER_API_KEY.
    Seal {
        #[arg(
            long,
            env = "TOKENIZER_ADMIN_URL",
            default_value = "https://127.0.0.1:8445"
        )]
        url: String,
    },
    /// Manage the software key-encryption key.
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Tenants: pan-shaped tokens, token lifetime, retention; deletion.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Delete every record past its expiry or its tenant's retention now
    /// (the service also does it every `purge_interval_secs`). Prints one
    /// JSON line with the counts.
    Purge {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Write a throwaway local PKI for trials and tests (NOT production): a
    /// CA, a server certificate and a client certificate per role
    /// (identity spiffe://cardvault.dev/<role>). Files are never overwritten.
    DevPki {
        /// Directory to create (mode 0700).
        #[arg(long)]
        out: PathBuf,
        /// DNS names or IP addresses of the server certificate (repeat;
        /// default localhost, 127.0.0.1, ::1).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PrincipalCommand {
    /// Create a principal; prints `{"id","name","api_key"}` as one JSON line.
    /// The key is shown only this once.
    Create {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long)]
        name: String,
        /// Comma-separated: tokenize, detokenize, auditor, key_admin.
        #[arg(long)]
        roles: String,
        /// `*` or a comma-separated list of tenant ids.
        #[arg(long)]
        tenants: String,
        /// Bind a client-certificate identity (a URI or DNS subject
        /// alternative name, e.g. spiffe://aggregator.example/checkout): a
        /// certificate from the configured client CA carrying it
        /// authenticates as this principal on mTLS listeners.
        #[arg(long)]
        cert_identity: Option<String>,
    },
    /// List principals as a JSON array (never keys or hashes).
    List {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Revoke the active principal with this name; its key stops working at once.
    Revoke {
        #[command(flatten)]
        common: CommonArgs,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Set a tenant's policy (created if new); prints the tenant as JSON.
    Set {
        #[command(flatten)]
        common: Box<CommonArgs>,
        name: String,
        /// May tokenize with `"token_format": "pan_shaped"`.
        #[arg(long)]
        pan_shaped: Option<bool>,
        /// Default lifetime of new tokens in days (0: none).
        #[arg(long)]
        token_ttl_days: Option<u32>,
        /// Purge records unused (not tokenized again nor detokenized) for
        /// this many days (0: keep).
        #[arg(long)]
        retention_days: Option<u32>,
    },
    /// Every tenant and its policy (JSON; never a salt).
    List {
        #[command(flatten)]
        common: Box<CommonArgs>,
    },
    /// Delete a tenant: its fingerprint key is erased (crypto-shred), then
    /// every record of it is deleted; tokenizing for it is refused from then
    /// on. Prints `{"tenant","records_deleted"}`.
    Delete {
        #[command(flatten)]
        common: Box<CommonArgs>,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Archive the audit entries older than the retention period to a file
    /// in the archive directory, then delete them from the database.
    ///
    /// The segment ends at the last checkpoint signed before the cutoff; the
    /// file is verified from disk with the public key before anything is
    /// recorded or deleted, and verifies on its own with
    /// `vault-audit verify --archive FILE` (joined to the database with
    /// `--database-url`). On PostgreSQL run it as the owner role (the
    /// runtime role may not delete audit rows). Prints one JSON line.
    Archive {
        #[command(flatten)]
        common: CommonArgs,
        /// Keep this many days online (default: `audit_retention_days`,
        /// 365). Below 90 (PCI DSS 10.5.1: three months immediately
        /// available) only with --below-pci-minimum.
        #[arg(long, value_name = "DAYS")]
        older_than_days: Option<u32>,
        /// Allow fewer than 90 days online (tests, trials; never production).
        #[arg(long)]
        below_pci_minimum: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the keyring of the `keyring` backend: a KEK under a master key
    /// split into N Shamir shares, any K of which unseal; each custodian's
    /// share encrypted under their passphrase (argon2id, m=64 MiB, t=3,
    /// p=1). Passphrases (at least 12 characters) are read from standard
    /// input, one line per custodian, in the order of --custodian.
    Init {
        #[command(flatten)]
        common: Box<CommonArgs>,
        /// Number of custodians (N); must match the --custodian names.
        #[arg(long)]
        shares: usize,
        /// Custodians needed to unseal (K).
        #[arg(long)]
        threshold: usize,
        /// Custodian names, one per share (repeat the option).
        #[arg(long = "custodian", required = true)]
        custodians: Vec<String>,
    },
    /// Rotate: a new DEK becomes the active one (with --fingerprint, a new
    /// fingerprint key too) and the service re-encrypts every record in the
    /// background; with --kek, a new KEK re-wraps every stored key instead.
    /// Calls the admin API (TOKENIZER_API_KEY, role key_admin).
    Rotate {
        #[arg(
            long,
            env = "TOKENIZER_ADMIN_URL",
            default_value = "https://127.0.0.1:8445"
        )]
        url: String,
        #[arg(long)]
        fingerprint: bool,
        #[arg(long, conflicts_with = "fingerprint")]
        kek: bool,
    },
    /// Every key's version, state, age, crypto-period and records, and the
    /// re-encryption progress (JSON); --watch shows a progress bar until the
    /// pass is done.
    Status {
        #[arg(
            long,
            env = "TOKENIZER_ADMIN_URL",
            default_value = "https://127.0.0.1:8445"
        )]
        url: String,
        #[arg(long)]
        watch: bool,
    },
    /// Retire a decrypt-only key no record uses any more.
    Retire {
        #[arg(
            long,
            env = "TOKENIZER_ADMIN_URL",
            default_value = "https://127.0.0.1:8445"
        )]
        url: String,
        /// `dek` or `fingerprint`.
        #[arg(long, default_value = "dek")]
        purpose: String,
        version: u32,
    },
    /// Destroy a retired key: its wrapped material is erased (crypto-shred).
    /// With --kek KEK_ID: destroy an old KEK instead.
    Destroy {
        #[arg(
            long,
            env = "TOKENIZER_ADMIN_URL",
            default_value = "https://127.0.0.1:8445"
        )]
        url: String,
        #[arg(long, default_value = "dek")]
        purpose: String,
        #[arg(required_unless_present = "kek")]
        version: Option<u32>,
        /// An old KEK (keyring version or HSM key) no stored key is wrapped
        /// under any more, by its id.
        #[arg(long, value_name = "KEK_ID", conflicts_with = "version")]
        kek: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KekCommand {
    /// Generate the KEK: a software KEK file (mode 0600; never overwritten),
    /// or with `--kek-backend pkcs11` an AES-256 key generated inside the
    /// token (sensitive, non-extractable; the PIN from its file or variable).
    Generate {
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// Settings shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, env = "TOKENIZER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the SQLite database (and, by default, the KEK file).
    #[arg(long, env = "TOKENIZER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database: `sqlite://PATH` or `postgres://...` (TLS with
    /// `sslmode=verify-full&sslrootcert=CA.pem`). Default: SQLite file
    /// `<data-dir>/cardvault.db`.
    #[arg(long, env = "TOKENIZER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Software KEK file; default `<data-dir>/kek.key`.
    #[arg(long, env = "TOKENIZER_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Where the KEK comes from: `file` (the KEK file; default), `keyring`
    /// (split knowledge: K of N custodians unseal), `pkcs11` (an HSM).
    #[arg(long, env = "TOKENIZER_KEK_BACKEND")]
    pub kek_backend: Option<String>,
    /// Keyring file of the `keyring` backend; default `<data-dir>/keyring.json`.
    #[arg(long, env = "TOKENIZER_KEYRING_FILE")]
    pub keyring_file: Option<PathBuf>,
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
    /// Log level or filter: error, warn, info, debug, trace.
    #[arg(long, env = "TOKENIZER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: `text` (default) or `json` (one JSON object per line:
    /// timestamp, level, message and the event's fields, target, and the
    /// current span and span list when there is one).
    #[arg(long, env = "TOKENIZER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// `--dev` only: the one loopback address serving every route (default
    /// 127.0.0.1:8080). Accepted everywhere so one set of flags can be
    /// reused across subcommands.
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
    /// Apply pending migrations when opening the database (default true;
    /// false where the service runs as a role that may not alter the schema).
    #[arg(long, env = "TOKENIZER_MIGRATE_ON_START")]
    pub migrate_on_start: Option<bool>,
    /// Bound on every database operation, in milliseconds (default 5000).
    #[arg(long, env = "TOKENIZER_DB_TIMEOUT_MS")]
    pub db_timeout_ms: Option<u64>,
    /// PostgreSQL pool size (default 16).
    #[arg(long, env = "TOKENIZER_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,
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
    /// Days of audit history kept in the database; older segments may be
    /// archived with `tokenizer audit archive` (default 365).
    #[arg(long, env = "TOKENIZER_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u32>,
    /// Directory of audit archive files; default `<data-dir>/audit-archive`.
    #[arg(long, env = "TOKENIZER_AUDIT_ARCHIVE_DIR")]
    pub audit_archive_dir: Option<PathBuf>,
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
    /// Detokenize requests per minute and principal, on this instance;
    /// beyond it 429 `rate_limited` (default 0: no limit; set it from the
    /// principal's volume).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_RATE_PER_PRINCIPAL")]
    pub detokenize_rate_per_principal: Option<u32>,
    /// Detokenize requests a principal may make at once (default 100).
    #[arg(long, env = "TOKENIZER_DETOKENIZE_BURST_PER_PRINCIPAL")]
    pub detokenize_burst_per_principal: Option<u32>,
    /// Detokenize requests per minute and tenant (of the token), on this
    /// instance (default 0: no limit).
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
    /// How often the service purges records past their expiry or their
    /// tenant's retention, in seconds (default 3600).
    #[arg(long, env = "TOKENIZER_PURGE_INTERVAL_SECS")]
    pub purge_interval_secs: Option<u64>,
    /// Concurrent requests share one transaction and one durable commit
    /// (default true; false commits every request on its own, for
    /// comparison).
    #[arg(long, env = "TOKENIZER_DB_GROUP_COMMIT")]
    pub db_group_commit: Option<bool>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// INSECURE development mode: generates a KEK, a dev API key and a dev
    /// PKI (local CA, server and client certificates) under the data dir;
    /// one loopback listener with every route. Never in production.
    #[arg(long, env = "TOKENIZER_DEV")]
    pub dev: bool,
    /// `--dev` only: serve plain HTTP (no TLS) on the loopback listener.
    #[arg(long, env = "TOKENIZER_INSECURE_PLAIN_HTTP", requires = "dev")]
    pub insecure_plain_http: bool,
}

/// The configuration file. Unknown keys are an error (a typo must not
/// silently fall back to a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    kek_file: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<String>,
    listen: Option<SocketAddr>,
    listen_api: Option<SocketAddr>,
    listen_reveal: Option<SocketAddr>,
    listen_admin: Option<SocketAddr>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
    tls_client_crl_file: Option<PathBuf>,
    api_auth: Option<String>,
    reveal_auth: Option<String>,
    admin_auth: Option<String>,
    max_header_bytes: Option<usize>,
    insecure_plain_http: Option<bool>,
    dev: Option<bool>,
    max_body_bytes: Option<usize>,
    max_batch_body_bytes: Option<usize>,
    migrate_on_start: Option<bool>,
    db_timeout_ms: Option<u64>,
    db_max_connections: Option<u32>,
    audit_checkpoint_interval_ms: Option<u64>,
    audit_checkpoint_every: Option<u64>,
    audit_witness_file: Option<PathBuf>,
    audit_retention_days: Option<u32>,
    audit_archive_dir: Option<PathBuf>,
    request_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    kek_backend: Option<String>,
    keyring_file: Option<PathBuf>,
    pkcs11_module: Option<PathBuf>,
    pkcs11_token: Option<String>,
    pkcs11_pin_file: Option<PathBuf>,
    pkcs11_pin_env: Option<String>,
    pkcs11_kek_label: Option<String>,
    key_crypto_period_days: Option<u32>,
    reencrypt_batch: Option<u32>,
    reencrypt_interval_ms: Option<u64>,
    detokenize_rate_per_principal: Option<u32>,
    detokenize_burst_per_principal: Option<u32>,
    detokenize_rate_per_tenant: Option<u32>,
    detokenize_burst_per_tenant: Option<u32>,
    detokenize_anomaly_window_secs: Option<u64>,
    detokenize_anomaly_factor: Option<u32>,
    detokenize_anomaly_min_distinct: Option<u32>,
    detokenize_anomaly_baseline_windows: Option<u32>,
    auth_failures_per_source: Option<u32>,
    auth_block_secs: Option<u64>,
    cvc_ttl_secs: Option<u64>,
    purge_interval_secs: Option<u64>,
    db_group_commit: Option<bool>,
}

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
    /// Detokenize rate limits and anomaly rule (per instance).
    pub detokenize_monitor: vault::monitor::MonitorConfig,
    /// Failed authentications per minute and source (0: no limit).
    pub auth_failures_per_source: u32,
    /// How long a source that used them up is refused.
    pub auth_block: std::time::Duration,
    /// How long a security code is held (at most an hour).
    pub cvc_ttl: std::time::Duration,
    /// How often the purge runs inside the service.
    pub purge_interval: std::time::Duration,
    /// Group commit of concurrent writes (see `vault::commit`).
    pub db_group_commit: bool,
}

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
}

impl Settings {
    pub fn resolve(common: &CommonArgs, dev_flag: bool) -> Result<Settings, ConfigError> {
        Settings::resolve_inner(common, dev_flag, None)
    }

    /// [`Settings::resolve`] for `serve`: the listeners and TLS too, with
    /// `--insecure-plain-http`.
    pub fn resolve_serve(
        common: &CommonArgs,
        dev_flag: bool,
        plain_http_flag: bool,
    ) -> Result<Settings, ConfigError> {
        Settings::resolve_inner(common, dev_flag, Some(plain_http_flag))
    }

    fn resolve_inner(
        common: &CommonArgs,
        dev_flag: bool,
        serving: Option<bool>,
    ) -> Result<Settings, ConfigError> {
        let mut file = match &common.config {
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
        let detokenize_monitor = monitor_config(common, &file);
        let log_format = match common.log_format.clone().or(file.log_format.take()) {
            Some(s) => LogFormat::parse(&s).ok_or(ConfigError::LogFormat)?,
            None => LogFormat::Text,
        };
        let dev = dev_flag || file.dev.unwrap_or(false);
        let data_dir = common
            .data_dir
            .clone()
            .or(file.data_dir.take())
            .unwrap_or_else(|| PathBuf::from(if dev { DEV_DATA_DIR } else { DEFAULT_DATA_DIR }));
        let kek_file = common
            .kek_file
            .clone()
            .or(file.kek_file.take())
            .unwrap_or_else(|| data_dir.join("kek.key"));
        // Only `serve` listens; other commands need no certificates.
        let (listeners, tls, dev_pki) = match serving {
            Some(plain_http_flag) => listeners(common, &mut file, dev, plain_http_flag, &data_dir)?,
            None => (Vec::new(), None, false),
        };
        let database_url = common
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| vault::store::sqlite_url(&data_dir.join("cardvault.db")));
        let audit_witness_file = common
            .audit_witness_file
            .clone()
            .or(file.audit_witness_file)
            .unwrap_or_else(|| data_dir.join("audit-checkpoints.jsonl"));
        let audit_checkpoint_interval = std::time::Duration::from_millis(
            common
                .audit_checkpoint_interval_ms
                .or(file.audit_checkpoint_interval_ms)
                .unwrap_or(10_000)
                .max(10),
        );
        let kek_source = kek_source(common, &kek_file_config, &data_dir, &kek_file, dev)?;
        let audit_archive_dir = common
            .audit_archive_dir
            .clone()
            .or(file.audit_archive_dir)
            .unwrap_or_else(|| data_dir.join("audit-archive"));
        Ok(Settings {
            db_group_commit: common
                .db_group_commit
                .or(file.db_group_commit)
                .unwrap_or(true),
            cvc_ttl: std::time::Duration::from_secs(
                common
                    .cvc_ttl_secs
                    .or(file.cvc_ttl_secs)
                    .unwrap_or(3600)
                    .clamp(1, 3600),
            ),
            purge_interval: std::time::Duration::from_secs(
                common
                    .purge_interval_secs
                    .or(file.purge_interval_secs)
                    .unwrap_or(3600)
                    .max(1),
            ),
            detokenize_monitor,
            auth_failures_per_source: common
                .auth_failures_per_source
                .or(file.auth_failures_per_source)
                .unwrap_or(300),
            auth_block: std::time::Duration::from_secs(
                common
                    .auth_block_secs
                    .or(file.auth_block_secs)
                    .unwrap_or(60)
                    .max(1),
            ),
            database_url,
            audit_witness_file,
            audit_archive_dir,
            audit_retention_days: common
                .audit_retention_days
                .or(file.audit_retention_days)
                .unwrap_or(vault::archive::DEFAULT_RETENTION_DAYS),
            audit_checkpoint_interval,
            audit_checkpoint_every: common
                .audit_checkpoint_every
                .or(file.audit_checkpoint_every)
                .unwrap_or(1000)
                .max(1),
            migrate_on_start: common
                .migrate_on_start
                .or(file.migrate_on_start)
                .unwrap_or(true),
            db_timeout: std::time::Duration::from_millis(
                common.db_timeout_ms.or(file.db_timeout_ms).unwrap_or(5000),
            ),
            db_max_connections: common
                .db_max_connections
                .or(file.db_max_connections)
                .unwrap_or(16),
            crypto_periods: {
                let days = common
                    .key_crypto_period_days
                    .or(file.key_crypto_period_days)
                    .unwrap_or(365)
                    .max(1);
                let period = std::time::Duration::from_secs(u64::from(days) * 86_400);
                vault::CryptoPeriods {
                    dek: period,
                    fingerprint: period,
                }
            },
            reencrypt_batch: common
                .reencrypt_batch
                .or(file.reencrypt_batch)
                .unwrap_or(500)
                .clamp(1, 10_000),
            reencrypt_interval: std::time::Duration::from_millis(
                common
                    .reencrypt_interval_ms
                    .or(file.reencrypt_interval_ms)
                    .unwrap_or(2000)
                    .max(10),
            ),
            data_dir,
            kek_file,
            kek_source,
            log_level: common
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format,
            listeners,
            tls,
            dev_pki,
            max_header_bytes: common
                .max_header_bytes
                .or(file.max_header_bytes)
                .unwrap_or(8 * 1024)
                .clamp(1024, 32 * 1024),
            dev,
            max_body_bytes: file.max_body_bytes.unwrap_or(16 * 1024),
            max_batch_body_bytes: file.max_batch_body_bytes.unwrap_or(1024 * 1024),
            request_timeout: std::time::Duration::from_millis(
                common
                    .request_timeout_ms
                    .or(file.request_timeout_ms)
                    .unwrap_or(10_000)
                    .max(100),
            ),
            idle_timeout: std::time::Duration::from_millis(
                common
                    .idle_timeout_ms
                    .or(file.idle_timeout_ms)
                    .unwrap_or(30_000)
                    .max(100),
            ),
            max_connections: common
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

/// The listeners, their authentication and the TLS files.
fn listeners(
    common: &CommonArgs,
    file: &mut FileConfig,
    dev: bool,
    plain_http_flag: bool,
    data_dir: &Path,
) -> Result<
    (
        Vec<crate::listeners::ListenerSpec>,
        Option<crate::tls::TlsFiles>,
        bool,
    ),
    ConfigError,
> {
    use crate::listeners::{AuthMode, ListenerKind, ListenerSpec};
    let literal =
        |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|_| unreachable!("valid literal")) };
    let plain = plain_http_flag || file.insecure_plain_http.unwrap_or(false);
    if plain && !dev {
        return Err(ConfigError::PlainHttpOutsideDev);
    }
    let cert = common.tls_cert_file.clone().or(file.tls_cert_file.take());
    let key = common.tls_key_file.clone().or(file.tls_key_file.take());
    let client_ca = common
        .tls_client_ca_file
        .clone()
        .or(file.tls_client_ca_file.take());
    let client_crl = common
        .tls_client_crl_file
        .clone()
        .or(file.tls_client_crl_file.take());
    let dev_dir = data_dir.join(DEV_TLS_DIR);
    let (tls, dev_pki) = match (plain, cert, key) {
        (true, _, _) => (None, false),
        (false, Some(cert), Some(key)) => (
            Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca,
                client_crl,
            }),
            false,
        ),
        (false, None, None) if dev => (
            Some(crate::tls::TlsFiles {
                cert: dev_dir.join("server.pem"),
                key: dev_dir.join("server.key"),
                client_ca: Some(dev_dir.join("ca.pem")),
                client_crl,
            }),
            true,
        ),
        _ => return Err(ConfigError::TlsRequired),
    };
    let verifies = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let mode = |name: &'static str, flag: &Option<String>, key: Option<String>| {
        let mode = match flag.clone().or(key) {
            Some(s) => AuthMode::parse(&s)
                .filter(|m| *m != AuthMode::MtlsOrApiKey || dev)
                .ok_or(ConfigError::AuthMode(name))?,
            None if dev && verifies => AuthMode::MtlsOrApiKey,
            None if verifies => AuthMode::Mtls,
            None => AuthMode::ApiKey,
        };
        if mode != AuthMode::ApiKey && !verifies {
            return Err(ConfigError::MtlsWithoutCa(name));
        }
        Ok(mode)
    };
    let api_auth = mode("api_auth", &common.api_auth, file.api_auth.take())?;
    let specs = if dev {
        vec![ListenerSpec {
            kind: ListenerKind::Dev,
            addr: common
                .listen
                .or(file.listen)
                .unwrap_or_else(|| literal(DEFAULT_LISTEN)),
            auth: api_auth,
        }]
    } else {
        vec![
            ListenerSpec {
                kind: ListenerKind::Api,
                addr: common
                    .listen_api
                    .or(file.listen_api)
                    .unwrap_or_else(|| literal(DEFAULT_LISTEN_API)),
                auth: api_auth,
            },
            ListenerSpec {
                kind: ListenerKind::Reveal,
                addr: common
                    .listen_reveal
                    .or(file.listen_reveal)
                    .unwrap_or_else(|| literal(DEFAULT_LISTEN_REVEAL)),
                auth: mode("reveal_auth", &common.reveal_auth, file.reveal_auth.take())?,
            },
            ListenerSpec {
                kind: ListenerKind::Admin,
                addr: common
                    .listen_admin
                    .or(file.listen_admin)
                    .unwrap_or_else(|| literal(DEFAULT_LISTEN_ADMIN)),
                auth: mode("admin_auth", &common.admin_auth, file.admin_auth.take())?,
            },
        ]
    };
    Ok((specs, tls, dev_pki))
}

/// Detokenize limits and the anomaly rule: flag, then variable, then file,
/// then default.
fn monitor_config(common: &CommonArgs, file: &FileConfig) -> vault::monitor::MonitorConfig {
    use vault::monitor::{AnomalyRule, MonitorConfig, Rate};
    let pick = |flag: Option<u32>, key: Option<u32>, default: u32| flag.or(key).unwrap_or(default);
    MonitorConfig {
        per_principal: Rate {
            per_minute: pick(
                common.detokenize_rate_per_principal,
                file.detokenize_rate_per_principal,
                0,
            ),
            burst: pick(
                common.detokenize_burst_per_principal,
                file.detokenize_burst_per_principal,
                100,
            )
            .max(1),
        },
        per_tenant: Rate {
            per_minute: pick(
                common.detokenize_rate_per_tenant,
                file.detokenize_rate_per_tenant,
                0,
            ),
            burst: pick(
                common.detokenize_burst_per_tenant,
                file.detokenize_burst_per_tenant,
                100,
            )
            .max(1),
        },
        anomaly: AnomalyRule {
            window: std::time::Duration::from_secs(
                common
                    .detokenize_anomaly_window_secs
                    .or(file.detokenize_anomaly_window_secs)
                    .unwrap_or(300)
                    .max(1),
            ),
            factor: pick(
                common.detokenize_anomaly_factor,
                file.detokenize_anomaly_factor,
                5,
            )
            .max(1),
            min_distinct: pick(
                common.detokenize_anomaly_min_distinct,
                file.detokenize_anomaly_min_distinct,
                200,
            ),
            baseline_windows: pick(
                common.detokenize_anomaly_baseline_windows,
                file.detokenize_anomaly_baseline_windows,
                12,
            )
            .clamp(1, 1000),
        },
    }
}

/// The KEK backend keys of the configuration file.
#[derive(Debug, Default)]
struct KekFileConfig {
    kek_backend: Option<String>,
    keyring_file: Option<PathBuf>,
    pkcs11_module: Option<PathBuf>,
    pkcs11_token: Option<String>,
    pkcs11_pin_file: Option<PathBuf>,
    pkcs11_pin_env: Option<String>,
    pkcs11_kek_label: Option<String>,
}

fn kek_source(
    common: &CommonArgs,
    file: &KekFileConfig,
    data_dir: &Path,
    kek_file: &Path,
    dev: bool,
) -> Result<crate::seal::KekSource, ConfigError> {
    use crate::seal::KekSource;
    let backend = common
        .kek_backend
        .clone()
        .or(file.kek_backend.clone())
        .unwrap_or_else(|| "file".to_owned());
    match backend.as_str() {
        "file" => Ok(KekSource::File {
            path: kek_file.to_path_buf(),
            dev,
        }),
        _ if dev => Err(ConfigError::DevBackend),
        "keyring" => Ok(KekSource::Keyring {
            path: common
                .keyring_file
                .clone()
                .or(file.keyring_file.clone())
                .unwrap_or_else(|| data_dir.join("keyring.json")),
        }),
        "pkcs11" => {
            let token = common
                .pkcs11_token
                .clone()
                .or(file.pkcs11_token.clone())
                .ok_or(ConfigError::Pkcs11Token)?;
            let pin = match common
                .pkcs11_pin_file
                .clone()
                .or(file.pkcs11_pin_file.clone())
            {
                Some(path) => hsm_shim::PinSource::File(path),
                None => hsm_shim::PinSource::Env(
                    common
                        .pkcs11_pin_env
                        .clone()
                        .or(file.pkcs11_pin_env.clone())
                        .unwrap_or_else(|| "TOKENIZER_PKCS11_PIN".to_owned()),
                ),
            };
            let label = common
                .pkcs11_kek_label
                .clone()
                .or(file.pkcs11_kek_label.clone())
                .unwrap_or_else(|| "cardvault-kek-1".to_owned());
            let mut config = hsm_shim::Pkcs11Config::new(token, pin, label);
            if let Some(module) = common.pkcs11_module.clone().or(file.pkcs11_module.clone()) {
                config.module = module;
            }
            Ok(KekSource::Pkcs11(config))
        }
        _ => Err(ConfigError::KekBackend),
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(shown.clone(), e))?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse(shown, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn common() -> CommonArgs {
        CommonArgs {
            config: None,
            data_dir: None,
            database_url: None,
            kek_file: None,
            log_level: None,
            log_format: None,
            listen: None,
            listen_api: None,
            listen_reveal: None,
            listen_admin: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_client_crl_file: None,
            api_auth: None,
            reveal_auth: None,
            admin_auth: None,
            max_header_bytes: None,
            migrate_on_start: None,
            db_timeout_ms: None,
            db_max_connections: None,
            audit_checkpoint_interval_ms: None,
            audit_checkpoint_every: None,
            audit_witness_file: None,
            audit_retention_days: None,
            audit_archive_dir: None,
            request_timeout_ms: None,
            idle_timeout_ms: None,
            max_connections: None,
            kek_backend: None,
            keyring_file: None,
            pkcs11_module: None,
            pkcs11_token: None,
            pkcs11_pin_file: None,
            pkcs11_pin_env: None,
            pkcs11_kek_label: None,
            key_crypto_period_days: None,
            reencrypt_batch: None,
            reencrypt_interval_ms: None,
            detokenize_rate_per_principal: None,
            detokenize_burst_per_principal: None,
            detokenize_rate_per_tenant: None,
            detokenize_burst_per_tenant: None,
            detokenize_anomaly_window_secs: None,
            detokenize_anomaly_factor: None,
            detokenize_anomaly_min_distinct: None,
            detokenize_anomaly_baseline_windows: None,
            auth_failures_per_source: None,
            auth_block_secs: None,
            cvc_ttl_secs: None,
            purge_interval_secs: None,
            db_group_commit: None,
        }
    }

    #[test]
    fn defaults_and_precedence() {
        let s = Settings::resolve(&common(), false).unwrap();
        assert_eq!(s.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(s.kek_file, PathBuf::from(DEFAULT_DATA_DIR).join("kek.key"));
        assert!(s.listeners.is_empty(), "only serve listens");
        assert!(matches!(
            Settings::resolve_serve(&common(), false, false),
            Err(ConfigError::TlsRequired)
        ));
        assert!(matches!(
            Settings::resolve_serve(&common(), false, true),
            Err(ConfigError::PlainHttpOutsideDev)
        ));
        let dev = Settings::resolve_serve(&common(), true, false).unwrap();
        assert_eq!(dev.listeners.len(), 1);
        assert_eq!(dev.listeners[0].addr.to_string(), DEFAULT_LISTEN);
        assert!(dev.dev_pki);
        let mut tls = common();
        tls.tls_cert_file = Some("/etc/cardvault/server.pem".into());
        tls.tls_key_file = Some("/etc/cardvault/server.key".into());
        let prod = Settings::resolve_serve(&tls, false, false).unwrap();
        let shown: Vec<String> = prod
            .listeners
            .iter()
            .map(|l| format!("{} {} {}", l.kind.name(), l.addr, l.auth.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                "api 127.0.0.1:8443 api_key",
                "reveal 127.0.0.1:8444 api_key",
                "admin 127.0.0.1:8445 api_key"
            ]
        );
        tls.reveal_auth = Some("mtls".into());
        assert!(matches!(
            Settings::resolve_serve(&tls, false, false),
            Err(ConfigError::MtlsWithoutCa("reveal_auth"))
        ));
        tls.tls_client_ca_file = Some("/etc/cardvault/clients-ca.pem".into());
        tls.reveal_auth = None;
        tls.admin_auth = Some("mtls_and_api_key".into());
        let prod = Settings::resolve_serve(&tls, false, false).unwrap();
        let modes: Vec<&str> = prod.listeners.iter().map(|l| l.auth.as_str()).collect();
        assert_eq!(modes, ["mtls", "mtls", "mtls_and_api_key"]);
        tls.api_auth = Some("mtls_or_api_key".into());
        assert!(matches!(
            Settings::resolve_serve(&tls, false, false),
            Err(ConfigError::AuthMode("api_auth"))
        ));
        assert_eq!(
            s.sqlite_path(),
            Some(PathBuf::from(DEFAULT_DATA_DIR).join("cardvault.db"))
        );
        let mut pg = common();
        pg.database_url = Some("postgres://vault@db/cardvault".into());
        assert_eq!(Settings::resolve(&pg, false).unwrap().sqlite_path(), None);
        assert_eq!(
            Settings::resolve(&common(), true).unwrap().data_dir,
            PathBuf::from(DEV_DATA_DIR)
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/vault\"\nlisten = \"127.0.0.1:9000\"\nmax_body_bytes = 100\n",
        )
        .unwrap();
        let mut c = common();
        c.config = Some(file.clone());
        let s = Settings::resolve(&c, false).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/srv/vault"));
        let listen =
            |c: &CommonArgs| Settings::resolve_serve(c, true, true).unwrap().listeners[0].addr;
        assert_eq!(listen(&c).port(), 9000);
        assert_eq!(s.max_body_bytes, 100);
        c.listen = Some("127.0.0.1:9001".parse().unwrap());
        assert_eq!(listen(&c).port(), 9001);

        // Monitoring: defaults, then the file, then a flag.
        let m = Settings::resolve(&common(), false).unwrap();
        assert!(m.detokenize_monitor.per_principal.is_off());
        assert!(m.detokenize_monitor.per_tenant.is_off());
        assert_eq!(m.detokenize_monitor.anomaly.min_distinct, 200);
        assert_eq!(m.auth_failures_per_source, 300);
        std::fs::write(
            &file,
            "detokenize_rate_per_principal = 5\ndetokenize_burst_per_tenant = 7\nauth_block_secs = 9\n",
        )
        .unwrap();
        let mut c = common();
        c.config = Some(file.clone());
        c.detokenize_anomaly_min_distinct = Some(3);
        let m = Settings::resolve(&c, false).unwrap();
        assert_eq!(m.detokenize_monitor.per_principal.per_minute, 5);
        assert_eq!(m.detokenize_monitor.per_tenant.burst, 7);
        assert_eq!(m.detokenize_monitor.anomaly.min_distinct, 3);
        assert_eq!(m.auth_block, std::time::Duration::from_secs(9));
        c.detokenize_rate_per_principal = Some(0);
        let m = Settings::resolve(&c, false).unwrap();
        assert!(m.detokenize_monitor.per_principal.is_off());

        // Log format: text by default, then the file, then a flag; an
        // unknown value is an error that does not repeat it.
        assert_eq!(m.log_format, LogFormat::Text);
        std::fs::write(&file, "log_format = \"json\"\n").unwrap();
        let mut c = common();
        c.config = Some(file.clone());
        assert_eq!(
            Settings::resolve(&c, false).unwrap().log_format,
            LogFormat::Json
        );
        c.log_format = Some("text".into());
        assert_eq!(
            Settings::resolve(&c, false).unwrap().log_format,
            LogFormat::Text
        );
        c.log_format = Some("yaml".into());
        let refused = Settings::resolve(&c, false).unwrap_err();
        assert!(matches!(refused, ConfigError::LogFormat));
        assert!(!refused.to_string().contains("yaml"), "{refused}");

        std::fs::write(&file, "data_dr = \"/typo\"\n").unwrap();
        assert!(matches!(
            Settings::resolve(&c, false),
            Err(ConfigError::Parse(..))
        ));
    }
}
