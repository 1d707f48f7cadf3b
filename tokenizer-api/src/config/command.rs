//! The `tokenizer` command line: the subcommands and which option groups
//! (see `args`) each one has. `Cli::command()` is what `--help` shows.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::args::{
    AuditArchiveArgs, DatabaseArgs, KekBackendArgs, KekFileArg, KeyringArgs, ServeArgs, StoreArgs,
    UnusedDatabaseUrl, VaultArgs,
};
use super::edge::{EdgeArgs, EdgeCommand};

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
    Serve(Box<ServeArgs>),
    /// Manage principals (API clients) and their keys.
    Principal {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Apply pending database migrations (run with the database owner role).
    Migrate {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Write a consistent, KEK-sealed backup of the vault to a new file,
    /// signed with the audit signing key (`backup verify` checks it).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Backup {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        kek_file: KekFileArg,
        /// The backup file to create (mode 0600; never overwritten).
        #[arg(long, required = true)]
        out: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<BackupCommand>,
    },
    /// Restore a backup into an empty database (either backend).
    Restore {
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        kek_file: KekFileArg,
        /// The backup file to read; it is fully checked before anything is written.
        #[arg(long)]
        from: PathBuf,
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
        store: StoreArgs,
    },
    /// Run the hosted-collection edge: the internet-facing process that
    /// serves the card form and forwards what the buyer typed to the vault
    /// (role `collect`). It holds no key, no database and no card: its only
    /// credential is for the vault's api listener.
    #[command(args_conflicts_with_subcommands = true)]
    Edge {
        #[command(flatten)]
        args: Box<EdgeArgs>,
        #[command(subcommand)]
        command: Option<EdgeCommand>,
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
        store: StoreArgs,
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
        store: StoreArgs,
    },
    /// Revoke the active principal with this name; its key stops working at once.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Set a tenant's policy (created if new); prints the tenant as JSON.
    Set {
        #[command(flatten)]
        store: StoreArgs,
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
        store: StoreArgs,
    },
    /// Delete a tenant: its fingerprint key is erased (crypto-shred), then
    /// every record of it is deleted; tokenizing for it is refused from then
    /// on. Prints `{"tenant","records_deleted"}`.
    Delete {
        #[command(flatten)]
        store: StoreArgs,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Check a backup offline with the audit signing public key alone (no
    /// KEK, no database): its shape, record count, SHA-256 and signature.
    /// Prints one JSON line. Exit 0: verified; 1: it fails a check, is
    /// signed by another key, or is unsigned (a backup from before signing;
    /// 0 with --allow-unsigned when count and digest hold); 2: usage or a
    /// file that cannot be read.
    Verify {
        /// The backup file.
        file: PathBuf,
        /// The public key: a line `cardvault-audit-ed25519:<hex>`, or a
        /// file of such lines (`<data-dir>/audit-verify.pub`, vault-audit's
        /// key file: every generation after a rotation). Repeatable.
        #[arg(long, value_name = "KEY_OR_FILE", required = true)]
        public_key: Vec<String>,
        /// Accept a backup without a signature (older backups) when its
        /// count and digest hold.
        #[arg(long)]
        allow_unsigned: bool,
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
        store: StoreArgs,
        #[command(flatten)]
        retention: AuditArchiveArgs,
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
        vault: VaultArgs,
        #[command(flatten)]
        keyring: KeyringArgs,
        #[command(flatten)]
        database: UnusedDatabaseUrl,
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
    /// background; with --kek, a new KEK re-wraps every stored key instead;
    /// with --audit-signing, a new audit checkpoint signing key, announced
    /// in the trail by a checkpoint the old key signs (the old key is
    /// retired). Calls the admin API (TOKENIZER_API_KEY, role key_admin).
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
        #[arg(long, conflicts_with_all = ["fingerprint", "kek"])]
        audit_signing: bool,
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
    /// With --kek KEK_ID: destroy an old KEK instead. `--purpose
    /// audit_signing GENERATION` destroys a retired audit signing key (its
    /// public key is kept: it verifies the checkpoints it signed).
    Destroy {
        #[arg(
            long,
            env = "TOKENIZER_ADMIN_URL",
            default_value = "https://127.0.0.1:8445"
        )]
        url: String,
        /// `dek`, `fingerprint` or `audit_signing`.
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
        vault: VaultArgs,
        #[command(flatten)]
        database: UnusedDatabaseUrl,
        #[command(flatten)]
        kek_file: KekFileArg,
        #[command(flatten)]
        kek: KekBackendArgs,
    },
}
