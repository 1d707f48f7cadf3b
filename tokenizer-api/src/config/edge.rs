//! The options of `tokenizer edge` (the hosted-collection edge) and of
//! `tokenizer edge check`. Flags and `TOKENIZER_EDGE_*` variables only: the
//! edge reads no configuration file of the vault, and has no option for a
//! KEK, a keyring, a database or a data directory, because it has none.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Where `tokenizer edge` listens by default (the `collect` listener).
pub const DEFAULT_EDGE_LISTEN: &str = "127.0.0.1:8446";
/// The edge's default limits (also those of the `serve --dev` edge).
pub const DEFAULT_EDGE_MAX_BODY_BYTES: usize = 4096;
pub const DEFAULT_EDGE_RATE_PER_SOURCE: u32 = 30;
pub const DEFAULT_EDGE_RATE_PER_SESSION: u32 = 10;
pub const DEFAULT_EDGE_REQUEST_TIMEOUT_MS: u64 = 10_000;

/// `tokenizer edge`: serve the card form and forward submissions.
#[derive(Debug, Clone, Args)]
pub struct EdgeArgs {
    /// The `collect` listener (the only one the internet reaches).
    #[arg(long, env = "TOKENIZER_EDGE_LISTEN", default_value = DEFAULT_EDGE_LISTEN)]
    pub listen: SocketAddr,
    /// The edge's own server certificate chain (PEM).
    #[arg(long, env = "TOKENIZER_EDGE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM, mode 0600).
    #[arg(long, env = "TOKENIZER_EDGE_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Serve plain HTTP instead of TLS: trials and tests only, and only on
    /// a loopback address.
    #[arg(long, env = "TOKENIZER_EDGE_INSECURE_PLAIN_HTTP")]
    pub insecure_plain_http: bool,
    /// The vault's api listener, `https://host:port`.
    #[arg(long, env = "TOKENIZER_EDGE_VAULT_URL")]
    pub vault_url: Option<String>,
    /// The CA bundle that signed the vault's server certificate: the only
    /// roots trusted for the vault.
    #[arg(long, env = "TOKENIZER_EDGE_VAULT_CA_FILE")]
    pub vault_ca_file: Option<PathBuf>,
    /// The edge's client certificate for the vault (mutual TLS; bound to
    /// a principal with the role `collect`).
    #[arg(long, env = "TOKENIZER_EDGE_CLIENT_CERT_FILE")]
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (PEM, mode 0600).
    #[arg(long, env = "TOKENIZER_EDGE_CLIENT_KEY_FILE")]
    pub client_key_file: Option<PathBuf>,
    /// A file (mode 0600) holding the API key (`cvk_...`) of a principal
    /// with the role `collect`.
    #[arg(long, env = "TOKENIZER_EDGE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The edge's public origin (`https://pay.example`): submissions must
    /// come from it; the manifest names it. Default with
    /// --insecure-plain-http: `http://<listen>`.
    #[arg(long, env = "TOKENIZER_EDGE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Largest accepted submission body, in bytes.
    #[arg(long, env = "TOKENIZER_EDGE_MAX_BODY_BYTES", default_value_t = DEFAULT_EDGE_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Submissions per minute from one source address.
    #[arg(long, env = "TOKENIZER_EDGE_RATE_PER_SOURCE", default_value_t = DEFAULT_EDGE_RATE_PER_SOURCE)]
    pub rate_per_source: u32,
    /// Submissions per minute for one session.
    #[arg(long, env = "TOKENIZER_EDGE_RATE_PER_SESSION", default_value_t = DEFAULT_EDGE_RATE_PER_SESSION)]
    pub rate_per_session: u32,
    /// Reading a request, and each call to the vault, within this many
    /// milliseconds.
    #[arg(
        long,
        env = "TOKENIZER_EDGE_REQUEST_TIMEOUT_MS",
        default_value_t = DEFAULT_EDGE_REQUEST_TIMEOUT_MS
    )]
    pub request_timeout_ms: u64,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a filter expression.
    #[arg(long, env = "TOKENIZER_EDGE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `text` or `json`.
    #[arg(long, env = "TOKENIZER_EDGE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum EdgeCommand {
    /// Compare a running edge with this binary: its manifest, every file it
    /// serves (SHA-384 and size), and the security headers of its routes.
    /// Prints one JSON line; exits non-zero on any difference (for a cron
    /// job: change and tamper detection of the payment page, PCI DSS
    /// 11.6.1).
    Check(EdgeCheckArgs),
}

/// `tokenizer edge check`.
#[derive(Debug, Clone, Args)]
pub struct EdgeCheckArgs {
    /// The edge's public URL (`https://pay.example`).
    #[arg(long)]
    pub url: String,
    /// CA bundle for the edge's certificate (default: the public web roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Also check the frame of this session (`cs_...`).
    #[arg(long)]
    pub session: Option<String>,
}
