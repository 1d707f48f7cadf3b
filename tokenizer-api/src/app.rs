//! Building and running the service: data dir, KEK, store, vault, the
//! listeners' server (`server`), and the background jobs (audit
//! checkpoints, re-encryption, purge, TLS reload on SIGHUP).

use std::fs;
use std::io;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::web;
use audit::{Action, AuditEvent, Outcome};
use hsm_shim::KekError;
use vault::keys::KeysError;
use vault::store::{Store, StoreError};
use vault::Vault;

use crate::config::Settings;
use crate::listeners::ListenerKind;
use crate::seal::{SealControl, UnsealError};
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--dev listens on loopback only; {0} is not a loopback address")]
    DevNotLoopback(SocketAddr),
    #[error("data dir {0}: {1}")]
    DataDir(String, #[source] io::Error),
    #[error("{0}; create one with `tokenizer kek generate` (or use --dev for a throwaway setup)")]
    KekMissing(#[source] KekError),
    #[error(transparent)]
    Unseal(crate::seal::UnsealError),
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot load the vault keys: {0}")]
    Keys(#[from] KeysError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] io::Error),
    #[error("TLS: {0}")]
    Tls(#[source] crate::tls::TlsError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    #[error("cannot record service start in the audit trail: {0}")]
    Audit(#[source] vault::VaultError),
    #[error("{0}")]
    Upstream(#[source] crate::upstream::UpstreamError),
    #[error(transparent)]
    BackupDir(#[from] crate::backups::BackupDirError),
}

/// Create the data dir (mode 0700) if missing; warn if others can read it.
pub fn prepare_data_dir(dir: &Path) -> Result<(), StartError> {
    let shown = || dir.display().to_string();
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StartError::DataDir(shown(), e))?;
    }
    let mode = fs::metadata(dir)
        .map_err(|e| StartError::DataDir(shown(), e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(data_dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "data dir is accessible by group or others; chmod 700 it");
    }
    Ok(())
}

/// Open the configured store. For SQLite the data dir is prepared and the
/// database file made 0600.
pub async fn open_store(settings: &Settings, migrate: bool) -> Result<Arc<dyn Store>, StartError> {
    let sqlite = settings.sqlite_path();
    if sqlite.is_some() {
        prepare_data_dir(&settings.data_dir)?;
    }
    let store = vault::store::open(&settings.store_config(migrate)).await?;
    if let Some(path) = sqlite {
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(|e| StartError::DataDir(path.display().to_string(), e))?;
    }
    Ok(store)
}

/// A built, bound, not yet running service.
pub struct Application {
    server: Server,
    /// Bound addresses, in the configured order.
    listeners: Vec<(ListenerKind, SocketAddr)>,
    tls: Option<Arc<crate::tls::ReloadableTls>>,
    seal: Arc<SealControl>,
    store: Arc<dyn Store>,
    witness: PathBuf,
    checkpoint_interval: Duration,
    checkpoint_every: u64,
    reencrypt_batch: u32,
    reencrypt_interval: Duration,
    purge_interval: Duration,
    /// Scheduled backups (directory resolved and checked at build).
    backup: Option<crate::config::BackupSchedule>,
    state: web::Data<AppState>,
    /// SIGHUP, watched from `build` on: a reload signal that arrives as
    /// soon as the listeners are up must not hit the default action (exit).
    hangup: Option<tokio::signal::unix::Signal>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Open everything and bind the listener (port 0 picks a free port).
    pub async fn build(settings: &Settings) -> Result<Application, StartError> {
        if settings.dev {
            if let Some(l) = settings
                .listeners
                .iter()
                .find(|l| !l.addr.ip().is_loopback())
            {
                return Err(StartError::DevNotLoopback(l.addr));
            }
        }
        prepare_data_dir(&settings.data_dir)?;
        // Backups inside the data directory would be lost with it.
        let backup = match &settings.backup {
            Some(b) => Some(crate::config::BackupSchedule {
                dir: crate::backups::prepare_dir(&b.dir, &settings.data_dir)?,
                ..b.clone()
            }),
            None => None,
        };
        // A missing or unsafe KEK (or keyring) file stops the start before
        // anything is written.
        let kek_error = |e| match e {
            UnsealError::Kek(k @ KekError::Read { .. }) => StartError::KekMissing(k),
            other => StartError::Unseal(other),
        };
        settings.kek_source.precheck().map_err(kek_error)?;
        // So is an upstream of the forwarding proxy whose files are unusable.
        let upstreams =
            crate::upstream::Upstreams::load(&settings.upstreams).map_err(StartError::Upstream)?;
        for name in upstreams.names() {
            tracing::info!(upstream = name, "forwarding upstream configured");
        }
        let upstreams = Arc::new(crate::upstream::ReloadableUpstreams::new(
            settings.config_file.as_deref(),
            upstreams,
        ));
        let store = open_store(settings, settings.migrate_on_start).await?;
        // Auditors verify checkpoints with the public keys, written to
        // `audit-verify.pub` when the vault opens (and after a signing key
        // rotation, whose announcement goes to the witness file).
        let seal = Arc::new(
            SealControl::new(
                store.clone(),
                settings.kek_source.clone(),
                settings.data_dir.join("audit-verify.pub"),
                vault::VaultOptions {
                    cvc_ttl: settings.cvc_ttl,
                    group_commit: settings.db_group_commit,
                    collect_http_loopback: settings.dev,
                    ..vault::VaultOptions::default()
                },
            )
            .with_witness_file(settings.audit_witness_file.clone()),
        );
        seal.start().await.map_err(kek_error)?;
        let start = AuditEvent::new(Action::ServiceStart, Outcome::Success)
            .source("local")
            .detail(if settings.dev { "dev" } else { "production" });
        store
            .append_audit(start)
            .await
            .map_err(|e| StartError::Audit(e.into()))?;

        let tls = match &settings.tls {
            Some(files) => Some(Arc::new(
                crate::tls::ReloadableTls::load(files.clone()).map_err(StartError::Tls)?,
            )),
            None => None,
        };
        let state = web::Data::new(AppState {
            seal: seal.clone(),
            crypto_periods: settings.crypto_periods,
            metrics: crate::metrics::Metrics::new().map_err(StartError::Metrics)?,
            max_body_bytes: settings.max_body_bytes,
            request_timeout: settings.request_timeout,
            max_batch_body_bytes: settings.max_batch_body_bytes,
            max_header_bytes: settings.max_header_bytes,
            monitor: vault::monitor::DetokenizeMonitor::new(settings.detokenize_monitor),
            sources: crate::limits::SourceGuard::new(
                settings.auth_failures_per_source,
                settings.auth_block,
            ),
            collect_public_url: settings.collect_public_url.clone(),
            upstreams,
            tls: tls.clone(),
        });
        let m = &settings.detokenize_monitor;
        tracing::info!(
            detokenize_rate_per_principal = m.per_principal.per_minute,
            detokenize_burst_per_principal = m.per_principal.burst,
            detokenize_rate_per_tenant = m.per_tenant.per_minute,
            detokenize_burst_per_tenant = m.per_tenant.burst,
            anomaly_window_s = m.anomaly.window.as_secs(),
            anomaly_factor = m.anomaly.factor,
            anomaly_min_distinct = m.anomaly.min_distinct,
            auth_failures_per_source = settings.auth_failures_per_source,
            auth_block_s = settings.auth_block.as_secs(),
            kept = if store.shared_monitoring() {
                "database, for every instance on it"
            } else {
                "memory, this process"
            },
            "monitoring: limits, anomaly rule and source guard"
        );
        let limits = crate::server::Limits {
            request_timeout: settings.request_timeout,
            idle_timeout: settings.idle_timeout,
            handshake_timeout: settings.request_timeout.min(Duration::from_secs(10)),
            max_connections: settings.max_connections,
        };
        // Slow clients are cut off: the TLS handshake and the head within
        // the request timeout (actix answers 408), the body as the handler
        // reads it (same deadline, see `routes::read_json`); idle keep-alive
        // connections after the idle timeout; at most `max_connections` open
        // per listener.
        let (server, listeners) =
            crate::server::build_server(&settings.listeners, tls.clone(), state.clone(), limits)
                .map_err(|(addr, e)| StartError::Bind(addr, e))?;
        Ok(Application {
            server,
            listeners,
            tls,
            seal,
            store,
            witness: settings.audit_witness_file.clone(),
            checkpoint_interval: settings.audit_checkpoint_interval,
            checkpoint_every: settings.audit_checkpoint_every,
            reencrypt_batch: settings.reencrypt_batch,
            reencrypt_interval: settings.reencrypt_interval,
            purge_interval: settings.purge_interval,
            backup,
            state,
            hangup: match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGHUP: TLS and upstream reload need a restart");
                    None
                }
            },
        })
    }

    /// The first listener's address (the only one in `--dev`).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listeners.first().map(|(_, a)| *a)
    }

    /// Every bound listener.
    pub fn listeners(&self) -> &[(ListenerKind, SocketAddr)] {
        &self.listeners
    }

    /// Whether the listeners serve TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The vault, when unsealed.
    pub fn vault(&self) -> Option<Arc<Vault>> {
        self.seal.vault()
    }

    /// The store (available sealed or not).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Serve until SIGINT/SIGTERM, signing audit checkpoints on the way;
    /// then record the stop, sign a last checkpoint and close the store.
    pub async fn run(self) -> io::Result<()> {
        let checkpointer = {
            let seal = self.seal.clone();
            let witness = self.witness.clone();
            let (every, count) = (self.checkpoint_interval, self.checkpoint_every);
            tokio::spawn(async move {
                // A checkpoint is due when the interval has passed or `count`
                // entries are uncovered, whichever comes first; the size is
                // polled at most once a second.
                let mut tick = tokio::time::interval(every.min(Duration::from_secs(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last_at = None::<tokio::time::Instant>;
                let mut covered = 0u64;
                loop {
                    tick.tick().await;
                    // Sealed: no signing key, nothing to sign with.
                    let Some(vault) = seal.vault() else { continue };
                    let interval_due = last_at.is_none_or(|t| t.elapsed() >= every);
                    let count_due = match vault.audit_size().await {
                        Ok(size) => size.saturating_sub(covered) >= count,
                        Err(_) => false,
                    };
                    if interval_due || count_due {
                        if let Some(size) = checkpoint_once(&vault, &witness).await {
                            covered = size;
                        }
                        last_at = Some(tokio::time::Instant::now());
                    }
                }
            })
        };
        let lifecycle = tokio::spawn(lifecycle_jobs(
            self.seal.clone(),
            self.state.clone(),
            self.purge_interval,
        ));
        let backups = self.backup.clone().map(|schedule| {
            tokio::spawn(crate::backups::scheduler(
                self.seal.clone(),
                self.state.clone(),
                schedule,
            ))
        });
        let reencryption = tokio::spawn(reencryption_pass(
            self.seal.clone(),
            self.reencrypt_batch,
            self.reencrypt_interval,
        ));
        // SIGHUP: read the certificate, key, client CA and CRL again (new
        // handshakes use them), and the forwarding upstreams; a bad file
        // leaves the old material, or the old upstreams, in use.
        let reloader = {
            let tls = self.tls.clone();
            let upstreams = self.state.upstreams.clone();
            self.hangup.map(|mut hup| tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if let Some(tls) = &tls {
                        match tls.reload() {
                            Ok(()) => tracing::info!("TLS material reloaded"),
                            Err(e) => {
                                tracing::error!(error = %e, "TLS reload failed; the previous material stays in use")
                            }
                        }
                    }
                    match upstreams.reload() {
                        Ok(names) => {
                            tracing::info!(upstreams = ?names, "forwarding upstreams reloaded")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "upstream reload failed; the previous upstreams stay in use")
                        }
                    }
                }
            }))
        };
        // The fleet's source blocks (PostgreSQL), into this instance's guard.
        let source_watch = self
            .store
            .shared_monitoring()
            .then(|| tokio::spawn(watch_source_blocks(self.state.clone())));
        // A client CRL that goes past its nextUpdate while in use is said
        // in the log once (the metrics show its age at every scrape).
        let crl_watch = self.tls.clone().map(|tls| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    tls.check_crl();
                }
            })
        });
        let result = self.server.await;
        if let Some(watch) = crl_watch {
            watch.abort();
        }
        if let Some(watch) = source_watch {
            watch.abort();
        }
        checkpointer.abort();
        if let Some(backups) = backups {
            backups.abort();
        }
        reencryption.abort();
        lifecycle.abort();
        if let Some(reloader) = reloader {
            reloader.abort();
        }
        let stop = AuditEvent::new(Action::ServiceStop, Outcome::Success)
            .source("local")
            .detail("shutdown");
        if let Err(e) = self.store.append_audit(stop).await {
            tracing::error!(error = %e, "cannot record service stop in the audit trail");
        }
        if let Some(vault) = self.seal.vault() {
            let _ = checkpoint_once(&vault, &self.witness).await;
        }
        self.store.close().await;
        result
    }

    /// Path of the witness file (for tests and tools).
    pub fn witness_file(&self) -> &Path {
        &self.witness
    }
}

/// Card lifecycle in the background: every `purge_interval` the records
/// past their expiry or their tenant's retention are deleted (batches, each
/// audited `purged` with its counts; see `vault::tenants::purge`), and every
/// few seconds the security codes past their time to live are dropped.
/// Every second, the source blocks in force for the fleet (started by any
/// instance, `source_blocks`) into this instance's flood guard, so that its
/// check stays in memory; at start, the blocks a restart would forget.
async fn watch_source_blocks(state: web::Data<AppState>) {
    if state.sources.rate().is_off() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match state.seal.store().source_blocks().await {
            Ok(blocks) => {
                let now = std::time::Instant::now();
                for (source, left) in blocks {
                    if let Ok(ip) = source.parse::<std::net::IpAddr>() {
                        state.sources.block(ip, left, now, false);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "source blocks unavailable"),
        }
    }
}

async fn lifecycle_jobs(seal: Arc<SealControl>, state: web::Data<AppState>, every: Duration) {
    let mut purge = tokio::time::interval(every);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = purge.tick() => {
                // Sealed: nothing to do (no card is readable anyway).
                if seal.vault().is_none() {
                    continue;
                }
                match vault::tenants::purge(seal.store().as_ref(), "service").await {
                    Ok(counts) => {
                        state.metrics.purged(counts);
                        if counts.expired + counts.retention > 0 {
                            tracing::info!(expired = counts.expired, retention = counts.retention, "purge: records deleted");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "purge failed; retrying at the next interval"),
                }
                if let Some(vault) = seal.vault() {
                    match vault.purge_collect_sessions("service").await {
                        Ok((c, o)) if c + o > 0 => tracing::info!(completed = c, not_completed = o, "purge: expired collection sessions deleted"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "collection session purge failed; retrying at the next interval"),
                    }
                    match vault.purge_forward_keys("service").await {
                        Ok(n) if n > 0 => tracing::info!(deleted = n, "purge: forwarded answers older than a day deleted"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "forwarded answer purge failed; retrying at the next interval"),
                    }
                }
            }
            _ = sweep.tick() => {
                if let Some(vault) = seal.vault() {
                    vault.sweep_cvc();
                }
            }
        }
    }
}

/// The background side of key rotation, on every instance: pick up keys
/// rotated elsewhere (`refresh_keys`; a new audit signing generation is
/// also written to `audit-verify.pub`), then move records under older keys to
/// the active ones, one batch (one transaction) at a time, until none is
/// left. Killed at any point, it loses nothing: a batch commits whole or not
/// at all, and the next run finds what is left.
async fn reencryption_pass(seal: Arc<SealControl>, batch: u32, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(vault) = seal.vault() else { continue };
        if let Err(e) = vault.refresh_keys().await {
            tracing::warn!(error = %e, "cannot refresh the vault keys");
            continue;
        }
        seal.sync_public_keys(&vault);
        loop {
            match vault.reencrypt_batch(batch).await {
                Ok(p) if p.finished => {
                    tracing::info!("re-encryption finished: every record is under the active keys");
                    break;
                }
                // Nothing moved (nothing left, or only records this instance
                // cannot move): wait for the next tick.
                Ok(p) if p.moved == 0 => break,
                Ok(p) => {
                    tracing::info!(
                        moved = p.moved,
                        remaining = p.remaining,
                        "re-encryption batch"
                    );
                    if p.remaining == 0 {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-encryption batch failed; retrying later");
                    break;
                }
            }
            // Sealed in the meantime: stop holding the vault.
            if seal.vault().is_none() {
                break;
            }
        }
    }
}

/// Sign a checkpoint if the trail grew, and append it to the witness file
/// (outside the database, fsynced). Failures are logged loudly: the trail
/// itself is intact, only its anchoring is late.
/// Returns the size the new checkpoint covers, if one was signed.
pub async fn checkpoint_once(vault: &Vault, witness: &Path) -> Option<u64> {
    let cp = match vault.checkpoint().await {
        Ok(Some(cp)) => cp,
        Ok(None) => return None,
        Err(e) => {
            tracing::error!(error = %e, "cannot sign an audit checkpoint");
            return None;
        }
    };
    let line = match audit::export::checkpoint_line(&cp) {
        Ok(line) => line,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an audit checkpoint");
            return Some(cp.tree_size);
        }
    };
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(witness)
        .and_then(|mut f| {
            f.write_all(format!("{line}\n").as_bytes())?;
            f.sync_data()
        });
    match written {
        Ok(()) => tracing::info!(tree_size = cp.tree_size, "audit checkpoint signed"),
        Err(e) => tracing::error!(
            error = %e,
            witness = %witness.display(),
            "cannot append the checkpoint to the witness file"
        ),
    }
    Some(cp.tree_size)
}
