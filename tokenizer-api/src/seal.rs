//! Sealed start and dual control: the service runs, answers health checks
//! and accepts admin requests, but holds no key and serves no card operation
//! (503 `sealed`) until its KEK is available.
//!
//! Where the KEK comes from (`kek_backend`):
//! - `keyring`: split knowledge. The KEK is encrypted under a master key
//!   that exists only as K-of-N Shamir shares, each under one custodian's
//!   passphrase (`hsm_shim::SealedKeyring`). The service starts sealed and
//!   unseals when K custodians have each given their passphrase through
//!   `POST /v1/admin/unseal` (`tokenizer unseal`), one at a time.
//! - `pkcs11`: an HSM. The service logs in to the token at start with the
//!   PIN from a file or an environment variable; if that fails it stays
//!   sealed, and `POST /v1/admin/unseal` retries the login.
//! - `file`: a software KEK file (`--dev`, small installations): unsealed at
//!   start when the file is readable.
//!
//! `POST /v1/admin/seal` drops the vault (every unwrapped key, zeroized as
//! the last in-flight request lets go of it) and the keyring's master key
//! at once. Every attempt, accepted or not, is an `unseal_attempt` audit
//! event naming the custodian (never the passphrase); sealing is `sealed`.
//! Admin requests need the role `key_admin`; they are authenticated from
//! the store alone, which works while sealed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use audit::{Action, AuditEvent, Outcome};
use hsm_shim::{
    KekError, KeyEncryptionKey, Pkcs11Config, SealedKeyring, SoftwareKek, UnsealedKeyring, Unsealer,
};
use serde::Serialize;
use vault::access::Authenticator;
use vault::keys::KeysError;
use vault::store::Store;
use vault::{RequestContext, Vault, VaultError};
use zeroize::Zeroizing;

/// Where the KEK comes from.
#[derive(Debug, Clone)]
pub enum KekSource {
    /// A software KEK file; with `dev`, generated if missing.
    File { path: PathBuf, dev: bool },
    /// A split-knowledge keyring file (K of N custodians).
    Keyring { path: PathBuf },
    /// A PKCS#11 token.
    Pkcs11(Pkcs11Config),
}

impl KekSource {
    /// Check, before anything is opened or written, that the KEK file (or
    /// the keyring file) is there and safe; the file backend in `--dev`
    /// creates it later.
    pub fn precheck(&self) -> Result<(), UnsealError> {
        match self {
            KekSource::File { dev: true, path } if !path.exists() => Ok(()),
            KekSource::File { path, .. } => {
                SoftwareKek::load(path).map(drop).map_err(UnsealError::Kek)
            }
            KekSource::Keyring { path } => SealedKeyring::open(path)
                .map(drop)
                .map_err(UnsealError::Kek),
            KekSource::Pkcs11(_) => Ok(()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            KekSource::File { .. } => "file",
            KekSource::Keyring { .. } => "keyring",
            KekSource::Pkcs11(_) => "pkcs11",
        }
    }
}

/// What `GET /v1/admin/seal-status`, `/readyz` and the unseal and seal
/// calls report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SealStatus {
    pub sealed: bool,
    #[schema(value_type = String)]
    pub backend: &'static str,
    /// Keyring: custodians accepted so far, and how many are needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custodians_accepted: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custodians_needed: Option<usize>,
}

/// Why a seal, unseal or KEK operation was refused (mapped to HTTP in
/// `crate::error`).
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the vault is sealed: card operations resume when it is unsealed")]
    Sealed,
    #[error(
        "the file backend's KEK cannot be rotated in place: move to the keyring or pkcs11 backend"
    )]
    KekRotationUnsupported,
    #[error("stored keys are still wrapped under this KEK: rotate the KEK first")]
    KekInUse,
    #[error("no such resource")]
    KekNotFound,
    #[error(transparent)]
    Unseal(#[from] UnsealError),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl SealError {
    pub fn code(&self) -> &'static str {
        match self {
            SealError::Sealed => "sealed",
            SealError::KekRotationUnsupported => "kek_rotation_unsupported",
            SealError::KekInUse => "kek_in_use",
            SealError::KekNotFound => "not_found",
            SealError::Unseal(e) => e.code(),
            SealError::Vault(e) => e.code(),
        }
    }
}

/// Why an unseal attempt did not unseal (beyond "not enough custodians
/// yet", which is a success with progress).
#[derive(Debug, thiserror::Error)]
pub enum UnsealError {
    #[error("wrong passphrase for custodian {0}; nothing was unsealed")]
    WrongPassphrase(String),
    #[error("no such custodian in the keyring")]
    UnknownCustodian,
    #[error("this backend unseals with a custodian name and passphrase")]
    CustodianRequired,
    #[error("the KEK is unavailable: {0}")]
    Kek(#[source] KekError),
    #[error("the vault keys cannot be loaded: {0}")]
    Keys(#[source] KeysError),
}

impl UnsealError {
    pub fn code(&self) -> &'static str {
        match self {
            UnsealError::WrongPassphrase(_) => "wrong_passphrase",
            UnsealError::UnknownCustodian => "unknown_custodian",
            UnsealError::CustodianRequired => "custodian_required",
            UnsealError::Kek(_) => "kek_unavailable",
            UnsealError::Keys(_) => "keys_unavailable",
        }
    }
}

/// Partial state of the keyring backend.
#[derive(Default)]
struct Ceremony {
    /// Custodians accepted so far (shares held in zeroizing memory).
    unsealer: Option<Unsealer>,
    /// The unsealed keyring while the service is unsealed.
    keyring: Option<UnsealedKeyring>,
}

/// The seal: holds the vault once unsealed.
pub struct SealControl {
    /// How the vault is opened on unseal.
    options: vault::VaultOptions,
    store: Arc<dyn Store>,
    auth: Authenticator,
    source: KekSource,
    /// `<data-dir>/audit-verify.pub`, written when the vault opens, after a
    /// signing key rotation, and when the periodic key refresh finds a
    /// generation another instance made: every generation's public key, one
    /// line each, oldest first (a keys file for `vault-audit`).
    public_key_file: PathBuf,
    /// What `public_key_file` was last written with (empty: not yet).
    public_keys_written: Mutex<Vec<String>>,
    /// The audit witness file: a signing key rotation appends its key
    /// announcement to it (the periodic checkpoints are appended by the
    /// checkpointer).
    witness_file: Option<PathBuf>,
    vault: RwLock<Option<Arc<Vault>>>,
    /// Serialises unseal and seal (an unseal runs argon2, ~0.3 s).
    ceremony: tokio::sync::Mutex<Ceremony>,
    /// Progress of the keyring ceremony, readable without waiting.
    progress: Mutex<Option<(usize, usize)>>,
}

impl std::fmt::Debug for SealControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealControl")
            .field("backend", &self.source.name())
            .field("sealed", &self.vault().is_none())
            .finish_non_exhaustive()
    }
}

impl SealControl {
    /// A sealed control for vaults opened with `options`;
    /// [`SealControl::start`] unseals what can unseal by itself.
    pub fn new(
        store: Arc<dyn Store>,
        source: KekSource,
        public_key_file: PathBuf,
        options: vault::VaultOptions,
    ) -> Self {
        Self {
            options,
            auth: Authenticator::new(store.clone()),
            store,
            source,
            public_key_file,
            public_keys_written: Mutex::new(Vec::new()),
            witness_file: None,
            vault: RwLock::new(None),
            ceremony: tokio::sync::Mutex::new(Ceremony::default()),
            progress: Mutex::new(None),
        }
    }

    /// Where key announcements are appended (the audit witness file).
    #[must_use]
    pub fn with_witness_file(mut self, path: PathBuf) -> Self {
        self.witness_file = Some(path);
        self
    }

    /// Rotate the audit signing key (`Vault::rotate_audit_signing`), then
    /// append the key announcement to the witness file and rewrite
    /// `audit-verify.pub` with every generation's public key. The rotation
    /// itself is committed first: a failure to write either file is logged
    /// (the announcement is in the database and in exports).
    pub async fn rotate_audit_signing(
        &self,
        vault: &Vault,
        ctx: &RequestContext,
    ) -> Result<vault::SigningRotation, VaultError> {
        let rotation = vault
            .rotate_audit_signing(vault::Actor::Request(ctx))
            .await?;
        if let Some(path) = &self.witness_file {
            if let Err(e) = append_witness(path, &rotation.announcement) {
                tracing::error!(error = %e, witness = %path.display(), "cannot append the key announcement to the witness file");
            }
        }
        self.write_public_keys(vault);
        Ok(rotation)
    }

    /// `audit-verify.pub`: every signing key generation's public key line,
    /// written to a temporary name and renamed (a reader never sees half a
    /// file).
    fn write_public_keys(&self, vault: &Vault) {
        let keys = vault.audit_public_keys();
        let mut text = keys.join("\n");
        text.push('\n');
        // Per process: instances sharing a data directory do not race on it.
        let tmp = self
            .public_key_file
            .with_extension(format!("pub.tmp-{}", std::process::id()));
        match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.public_key_file))
        {
            Ok(()) => {
                *self
                    .public_keys_written
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = keys;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::error!(error = %e, file = %self.public_key_file.display(), "cannot write the audit verification key");
            }
        }
    }

    /// After a key refresh: rewrite `audit-verify.pub` when the signing key
    /// generations changed since it was written (another instance rotated
    /// the signing key), or when the last write failed.
    pub fn sync_public_keys(&self, vault: &Vault) {
        let current = vault.audit_public_keys();
        let stale = *self
            .public_keys_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            != current;
        if stale {
            tracing::info!(
                generations = current.len(),
                file = %self.public_key_file.display(),
                "audit signing key generations changed: rewriting the verification key file"
            );
            self.write_public_keys(vault);
        }
    }

    /// At start-up: the file backend unseals now (an error stops the start);
    /// PKCS#11 tries its login (and stays sealed if it fails); the keyring
    /// waits for its custodians.
    pub async fn start(&self) -> Result<(), UnsealError> {
        match &self.source {
            KekSource::File { path, dev } => {
                let kek = if *dev && !path.exists() {
                    tracing::warn!(kek_file = %path.display(), "dev mode: generating an INSECURE software KEK next to the data");
                    SoftwareKek::generate(path)
                } else {
                    SoftwareKek::load(path)
                }
                .map_err(UnsealError::Kek)?;
                self.open_vault(Arc::new(kek)).await
            }
            KekSource::Pkcs11(config) => match self.hsm_login(config).await? {
                Ok(kek) => {
                    self.open_vault(Arc::new(kek)).await?;
                    self.audit(Outcome::Success, "hsm login at start: unsealed")
                        .await;
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "HSM login failed: the service stays SEALED until POST /v1/admin/unseal succeeds");
                    self.audit(Outcome::Failure, "hsm login at start failed")
                        .await;
                    Ok(())
                }
            },
            KekSource::Keyring { path } => {
                let keyring = SealedKeyring::open(path).map_err(UnsealError::Kek)?;
                let need = keyring.threshold();
                *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Some((0, need));
                tracing::warn!(
                    custodians = need,
                    "SEALED: waiting for {need} custodians to unseal (tokenizer unseal)"
                );
                Ok(())
            }
        }
    }

    /// The store (sealed or not).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The vault, when unsealed.
    pub fn vault(&self) -> Option<Arc<Vault>> {
        self.vault.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn status(&self) -> SealStatus {
        let progress = *self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let sealed = self.vault().is_none();
        let keyring = matches!(self.source, KekSource::Keyring { .. });
        SealStatus {
            sealed,
            backend: self.source.name(),
            custodians_accepted: progress
                .filter(|_| keyring)
                .map(|(have, need)| if sealed { have } else { need }),
            custodians_needed: progress.filter(|_| keyring).map(|(_, need)| need),
        }
    }

    /// Verifies API keys and client-certificate identities (no vault key
    /// needed: available sealed or not).
    pub fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    /// One unseal attempt (see the module doc). Already unsealed: the status,
    /// nothing else happens.
    pub async fn unseal(
        &self,
        ctx: &RequestContext,
        custodian: Option<&str>,
        passphrase: Option<&str>,
    ) -> Result<SealStatus, SealError> {
        let mut ceremony = self.ceremony.lock().await;
        if self.vault().is_some() {
            return Ok(self.status());
        }
        match &self.source {
            KekSource::Keyring { path } => {
                let (Some(name), Some(passphrase)) = (custodian, passphrase) else {
                    return Err(UnsealError::CustodianRequired.into());
                };
                let unsealer = match ceremony.unsealer.take() {
                    Some(u) => u,
                    None => SealedKeyring::open(path)
                        .map_err(UnsealError::Kek)?
                        .unsealer(),
                };
                let (name, secret) = (name.to_owned(), Zeroizing::new(passphrase.to_owned()));
                let (unsealer, result) = tokio::task::spawn_blocking(move || {
                    let mut unsealer = unsealer;
                    let result = unsealer.submit(&name, &secret);
                    (unsealer, result.map(|p| (p, name)))
                })
                .await
                .map_err(|_| UnsealError::Kek(KekError::Rng))?;
                let shown = custodian.unwrap_or_default();
                match result {
                    Ok((progress, _)) => {
                        let detail = format!(
                            "custodian {shown}: accepted ({} of {})",
                            progress.have, progress.need
                        );
                        // Fail closed: an attempt that cannot be audited does
                        // not count (the ceremony starts over).
                        self.append(ctx, Outcome::Success, None, &detail).await?;
                        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((progress.have, progress.need));
                        if !progress.is_complete() {
                            ceremony.unsealer = Some(unsealer);
                            return Ok(self.status());
                        }
                        let keyring = unsealer.finish().map_err(UnsealError::Kek)?;
                        // The version the stored keys are wrapped under (a
                        // KEK rotation interrupted after adding a version
                        // leaves the newest one unused).
                        let stored = self.stored_kek_id().await;
                        let kek = keyring
                            .versions()
                            .iter()
                            .find(|v| Some(&v.kek_id) == stored.as_ref())
                            .and_then(|v| keyring.kek(v.version).ok())
                            .or_else(|| keyring.current_kek())
                            .ok_or(UnsealError::Kek(KekError::MalformedBlob))?;
                        self.open_vault(Arc::new(kek)).await?;
                        ceremony.keyring = Some(keyring);
                        self.append(ctx, Outcome::Success, None, "unsealed").await?;
                        tracing::info!("UNSEALED by {} custodians", progress.need);
                        Ok(self.status())
                    }
                    Err(e) => {
                        ceremony.unsealer = Some(unsealer);
                        let (err, detail) = match e {
                            KekError::WrongPassphrase { .. } => (
                                UnsealError::WrongPassphrase(shown.to_owned()),
                                format!("custodian {shown}: wrong passphrase"),
                            ),
                            KekError::UnknownCustodian => (
                                UnsealError::UnknownCustodian,
                                "unknown custodian".to_owned(),
                            ),
                            other => {
                                // A bad reconstruction drops every share.
                                ceremony.unsealer = None;
                                *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = None;
                                (UnsealError::Kek(other), "unseal failed".to_owned())
                            }
                        };
                        self.append(ctx, Outcome::Failure, Some(err.code()), &detail)
                            .await?;
                        Err(err.into())
                    }
                }
            }
            KekSource::Pkcs11(config) => match self.hsm_login(config).await? {
                Ok(kek) => {
                    self.open_vault(Arc::new(kek)).await?;
                    self.append(ctx, Outcome::Success, None, "hsm login: unsealed")
                        .await?;
                    Ok(self.status())
                }
                Err(e) => {
                    let err = UnsealError::Kek(e);
                    self.append(ctx, Outcome::Failure, Some(err.code()), "hsm login failed")
                        .await?;
                    Err(err.into())
                }
            },
            KekSource::File { path, .. } => {
                let kek = SoftwareKek::load(path).map_err(UnsealError::Kek)?;
                self.open_vault(Arc::new(kek)).await?;
                self.append(ctx, Outcome::Success, None, "kek file: unsealed")
                    .await?;
                Ok(self.status())
            }
        }
    }

    /// Drop every key from memory at once (audited first: an unaudited seal
    /// still seals, and says so in the log).
    pub async fn seal(&self, ctx: &RequestContext) -> Result<SealStatus, SealError> {
        let mut ceremony = self.ceremony.lock().await;
        let was = self.vault.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(keyring) = ceremony.keyring.take() {
            keyring.seal();
        }
        ceremony.unsealer = None;
        {
            let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, need)) = *progress {
                *progress = Some((0, need));
            }
        }
        drop(was);
        tracing::warn!("SEALED: every key dropped from memory");
        let event = ctx.clone_event(Action::Sealed, Outcome::Success);
        if let Err(e) = self.store.append_audit(event).await {
            tracing::error!(error = %e, "the seal could not be audited (the service IS sealed)");
            return Err(VaultError::from(e).into());
        }
        Ok(self.status())
    }

    /// The KEK id the stored vault keys are wrapped under (None on a fresh
    /// database, or if it cannot be read: then the configured KEK is used
    /// and opening the vault reports any mismatch).
    async fn stored_kek_id(&self) -> Option<String> {
        let keys = self.store.load_keys().await.ok()?;
        keys.into_iter().map(|k| k.kek_id).next()
    }

    /// Open the token, log in and find the KEK the stored keys name, on a
    /// blocking thread. The outer error: the thread failed; the inner: the
    /// token refused (wrong or missing PIN, no such key, ...).
    async fn hsm_login(
        &self,
        config: &Pkcs11Config,
    ) -> Result<Result<hsm_shim::Pkcs11Kek, KekError>, UnsealError> {
        let config = self.pkcs11_config(config).await;
        tokio::task::spawn_blocking(move || config.unseal())
            .await
            .map_err(|_| UnsealError::Kek(KekError::Rng))
    }

    /// The PKCS#11 configuration with the KEK label the stored keys name
    /// (`p11:<label>:<id>`): after a KEK rotation that is the new key, not
    /// the configured first one.
    async fn pkcs11_config(&self, config: &Pkcs11Config) -> Pkcs11Config {
        let mut config = config.clone();
        if let Some(id) = self.stored_kek_id().await {
            if let Some((label, _)) = id.strip_prefix("p11:").and_then(|r| r.rsplit_once(':')) {
                config.kek_label = label.to_owned();
            }
        }
        config
    }

    /// A new KEK (a new keyring version, or a new key generated in the
    /// HSM) and every stored key re-wrapped under it (`Vault::rotate_kek`).
    /// Returns the new KEK id.
    pub async fn rotate_kek(&self, ctx: &RequestContext) -> Result<String, SealError> {
        let mut ceremony = self.ceremony.lock().await;
        let vault = self.vault().ok_or(SealError::Sealed)?;
        let new: Arc<dyn KeyEncryptionKey> = match &self.source {
            KekSource::Keyring { .. } => {
                let keyring = ceremony.keyring.as_mut().ok_or(SealError::Sealed)?;
                Arc::new(keyring.add_kek_version().map_err(UnsealError::Kek)?)
            }
            KekSource::Pkcs11(config) => {
                let config = config.clone();
                let label = format!(
                    "cardvault-kek-{}",
                    time::OffsetDateTime::now_utc().unix_timestamp()
                );
                let generated = tokio::task::spawn_blocking(move || {
                    let token = hsm_shim::Pkcs11Token::open(&config)?;
                    token.login(&config.pin.load()?)?;
                    token.generate_kek(&label)
                })
                .await
                .map_err(|_| UnsealError::Kek(KekError::Rng))?;
                Arc::new(generated.map_err(UnsealError::Kek)?)
            }
            KekSource::File { .. } => return Err(SealError::KekRotationUnsupported),
        };
        let id = new.kek_id().to_owned();
        vault
            .rotate_kek(vault::rotation::Actor::Request(ctx), new)
            .await?;
        Ok(id)
    }

    /// Destroy an old KEK (a keyring version, or a key in the HSM) that no
    /// stored key is wrapped under any more: the crypto-shred of everything
    /// it ever wrapped (backups made before its rotation included).
    pub async fn destroy_kek(&self, ctx: &RequestContext, kek_id: &str) -> Result<(), SealError> {
        let mut ceremony = self.ceremony.lock().await;
        let vault = self.vault().ok_or(SealError::Sealed)?;
        let store = vault.store();
        let keys = store.load_keys().await.map_err(VaultError::from)?;
        let signing = store.load_signing_keys().await.map_err(VaultError::from)?;
        let in_use = keys
            .iter()
            .map(|k| k.kek_id.as_str())
            .chain(signing.iter().map(|k| k.kek_id.as_str()))
            .any(|id| id == kek_id);
        // KEK ids are shown unless they look like a card number (the audit
        // store would refuse the event).
        let shown = if vault::pan::contains_pan_like(kek_id) {
            "kek (id withheld)".to_owned()
        } else {
            format!("kek {kek_id}")
        };
        let refuse = |code: &'static str| {
            let mut event = ctx
                .clone_event(Action::KeyDestroyed, Outcome::Failure)
                .detail(shown.clone());
            event.error_code = Some(code.to_owned());
            event
        };
        if in_use {
            self.store
                .append_audit(refuse("kek_in_use"))
                .await
                .map_err(VaultError::from)?;
            return Err(SealError::KekInUse);
        }
        let destroyed = match &self.source {
            KekSource::Keyring { .. } => {
                let keyring = ceremony.keyring.as_mut().ok_or(SealError::Sealed)?;
                match keyring.versions().iter().find(|v| v.kek_id == kek_id) {
                    Some(v) => keyring
                        .destroy_kek_version(v.version)
                        .map_err(UnsealError::Kek),
                    None => Err(UnsealError::Kek(KekError::KekNotFound {
                        label: "(no such KEK version)".to_owned(),
                    })),
                }
            }
            KekSource::Pkcs11(config) => {
                let Some((label, _)) = kek_id.strip_prefix("p11:").and_then(|r| r.rsplit_once(':'))
                else {
                    return Err(SealError::KekNotFound);
                };
                let (config, label) = (config.clone(), label.to_owned());
                tokio::task::spawn_blocking(move || {
                    let token = hsm_shim::Pkcs11Token::open(&config)?;
                    token.login(&config.pin.load()?)?;
                    token.destroy_kek(&label)
                })
                .await
                .map_err(|_| UnsealError::Kek(KekError::Rng))?
                .map_err(UnsealError::Kek)
            }
            KekSource::File { .. } => return Err(SealError::KekRotationUnsupported),
        };
        match destroyed {
            Ok(()) => {
                let event = ctx
                    .clone_event(Action::KeyDestroyed, Outcome::Success)
                    .detail(shown);
                self.store
                    .append_audit(event)
                    .await
                    .map_err(VaultError::from)?;
                tracing::warn!("destroyed an old KEK: everything it wrapped is unrecoverable");
                Ok(())
            }
            Err(e) => {
                self.store
                    .append_audit(refuse(e.code()))
                    .await
                    .map_err(VaultError::from)?;
                Err(e.into())
            }
        }
    }

    async fn open_vault(&self, kek: Arc<dyn KeyEncryptionKey>) -> Result<(), UnsealError> {
        let vault = Vault::open_with(self.store.clone(), kek, self.options)
            .await
            .map_err(UnsealError::Keys)?;
        self.write_public_keys(&vault);
        *self.vault.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(vault));
        Ok(())
    }

    async fn append(
        &self,
        ctx: &RequestContext,
        outcome: Outcome,
        code: Option<&str>,
        detail: &str,
    ) -> Result<(), SealError> {
        let mut event = ctx
            .clone_event(Action::UnsealAttempt, outcome)
            .detail(detail);
        event.error_code = code.map(str::to_owned);
        self.store
            .append_audit(event)
            .await
            .map_err(VaultError::from)?;
        Ok(())
    }

    /// An attempt without a caller (the HSM login at start); failures to
    /// audit it are logged.
    async fn audit(&self, outcome: Outcome, detail: &str) {
        let event = AuditEvent::new(Action::UnsealAttempt, outcome)
            .source("local")
            .detail(detail);
        if let Err(e) = self.store.append_audit(event).await {
            tracing::error!(error = %e, "cannot audit the unseal attempt");
        }
    }
}

/// The audit event of an admin request.
trait ContextEvent {
    fn clone_event(&self, action: Action, outcome: Outcome) -> AuditEvent;
}

impl ContextEvent for RequestContext {
    fn clone_event(&self, action: Action, outcome: Outcome) -> AuditEvent {
        AuditEvent::new(action, outcome)
            .principal(self.principal.name.clone())
            .source(self.source.clone())
            .request_id(self.request_id.clone())
    }
}

/// Append one checkpoint line to the witness file (created 0600), fsynced.
fn append_witness(path: &std::path::Path, checkpoint: &audit::Checkpoint) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let line = audit::export::checkpoint_line(checkpoint).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()
}
