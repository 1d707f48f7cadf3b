//! Command line, environment and configuration file.
//!
//! Precedence, highest first: command-line flag, `TOKENIZER_*` environment
//! variable, `--config FILE` (TOML), built-in default. Every setting has all
//! four; the table is in README.md. Each subcommand has only the options it
//! uses; a flag, its variable and its file key mean the same in every
//! subcommand that has them, and the file may hold every key whatever the
//! command (one file serves `serve` and the operator commands).
//!
//! - `command`: the subcommands ([`Cli`], [`Command`], ...) and which option
//!   groups each one has;
//! - `args`: those option groups (clap), e.g. [`StoreArgs`] for the storage
//!   commands and [`ServeOptions`] for `serve`;
//! - `flags`: every option's command-line value in one flat struct
//!   ([`Flags`]), the input of resolution;
//! - `edge`: the options of `tokenizer edge` (flags and variables only);
//! - `file`: the configuration file;
//! - `settings`: the resolved [`Settings`], [`ConfigError`], the defaults;
//! - `sections`: what combines several keys (listeners and TLS, the KEK
//!   source, detokenize monitoring);
//! - `upstreams`: the forwarding proxy's `[[upstream]]` tables (file only).

mod args;
mod command;
mod edge;
mod file;
mod flags;
mod sections;
mod settings;
#[cfg(test)]
mod tests;
pub mod upstreams;

pub use args::{
    AuditArchiveArgs, DatabaseArgs, KekBackendArgs, KekFileArg, KeyringArgs, MigrateOnStartArg,
    Pkcs11Args, ServeArgs, ServeOptions, StoreArgs, UnusedDatabaseUrl, VaultArgs,
    SERVE_ONLY_OPTIONS,
};
pub use command::{
    AuditCommand, BackupCommand, Cli, Command, KekCommand, KeysCommand, PrincipalCommand,
    TenantCommand,
};
pub use edge::{
    EdgeArgs, EdgeCheckArgs, EdgeCommand, DEFAULT_EDGE_LISTEN, DEFAULT_EDGE_MAX_BODY_BYTES,
    DEFAULT_EDGE_RATE_PER_SESSION, DEFAULT_EDGE_RATE_PER_SOURCE, DEFAULT_EDGE_REQUEST_TIMEOUT_MS,
};
pub use flags::{FlagGroup, Flags};
pub use settings::{
    read_upstreams, BackupSchedule, ConfigError, LogFormat, Settings, DEFAULT_BACKUP_KEEP,
    DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_LISTEN_ADMIN, DEFAULT_LISTEN_API,
    DEFAULT_LISTEN_REVEAL, DEV_DATA_DIR, DEV_TLS_DIR,
};
