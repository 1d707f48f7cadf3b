//! Backups: one file holding a consistent snapshot of the vault (wrapped
//! keys, principals, card records, audit events), restorable into an empty
//! database of either backend.
//!
//! Format: JSON Lines. A `header` line, one line per row, and an `end` line
//! with the number of records, the SHA-256 of every byte before it, and a
//! seal: that digest wrapped by the KEK (AES-GCM through `hsm-shim`), which
//! only the KEK can produce or open. The file holds ciphertext and wrapped
//! keys only: without the KEK it reveals no card data, and a restore refuses
//! it without the KEK that sealed it.
//!
//! Signature: the `end` line also carries an Ed25519 signature by the audit
//! signing key (the newest generation in the snapshot) and that key's id, so
//! that [`verify_backup`] checks a backup with the public key alone (the
//! auditors' `audit-verify.pub`), no KEK. Signed bytes, integers big-endian:
//!
//! ```text
//! "cardvault/backup/v1"                19 bytes, domain tag
//! records                              u64
//! sha256                               32 bytes (of every line before `end`)
//! len(seal) || seal                    u32 || the seal's bytes
//! len(key_id) || key_id                u32 || UTF-8
//! ```
//!
//! Backups from before signing have neither field: they restore as before
//! and verify as `unsigned`.
//!
//! Restore reads and checks the whole file first (shape, count, digest,
//! seal, every wrapped key unwraps under this KEK), then inserts everything in
//! one transaction into an empty database: a bad file restores nothing.

use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use audit::{Action, AuditEvent, Outcome};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hsm_shim::KeyEncryptionKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::label;
use crate::store::{
    AuditRow, BackupRecord, CardRow, ChainLink, KeyPurpose, KeyState, PrincipalRow, SigningKeyRow,
    Store, StoreError, StoredKey,
};

const FORMAT: &str = "cardvault-backup";
const VERSION: u32 = 1;
const SEAL_LABEL: &str = "cardvault-backup-digest:v1";
/// Domain tag of the backup signature's signed bytes (see the module doc).
const SIGNATURE_TAG: &[u8] = b"cardvault/backup/v1";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a backup")]
    Exists(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("backup is corrupt at line {line}: {reason}")]
    Corrupt { line: usize, reason: &'static str },
    #[error("backup integrity check failed: {0}")]
    Integrity(&'static str),
    #[error("backup was sealed under KEK {backup}, but the configured KEK is {configured}")]
    WrongKek { backup: String, configured: String },
    #[error("the target database is not empty; restore only into an empty database")]
    NotEmpty,
    #[error("KEK operation failed: {0}")]
    Kek(#[from] hsm_shim::KekError),
    #[error("the audit signing key in the backup is unusable: {0}")]
    SigningKey(String),
    #[error("backup signature check failed: {0}")]
    Signature(String),
}

/// What a backup holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BackupSummary {
    pub keys: u64,
    pub principals: u64,
    #[serde(default)]
    pub tenants: u64,
    pub cards: u64,
    pub audit_events: u64,
    pub audit_checkpoints: u64,
    pub audit_signing_keys: u64,
    pub audit_archives: u64,
}

impl BackupSummary {
    fn count(&mut self, r: &BackupRecord) {
        match r {
            BackupRecord::Key(_) => self.keys += 1,
            BackupRecord::Principal(_) => self.principals += 1,
            BackupRecord::Tenant(_) => self.tenants += 1,
            BackupRecord::Card(_) => self.cards += 1,
            BackupRecord::Audit(_) => self.audit_events += 1,
            BackupRecord::Checkpoint(_) => self.audit_checkpoints += 1,
            BackupRecord::SigningKey(_) => self.audit_signing_keys += 1,
            BackupRecord::Archive(_) => self.audit_archives += 1,
        }
    }

    /// Counts for the audit trail (no content).
    fn describe(&self) -> String {
        format!(
            "keys={} principals={} tenants={} cards={} audit_events={} audit_checkpoints={} audit_signing_keys={} audit_archives={}",
            self.keys,
            self.principals,
            self.tenants,
            self.cards,
            self.audit_events,
            self.audit_checkpoints,
            self.audit_signing_keys,
            self.audit_archives
        )
    }

    /// The records the end line counts (tenants are not counted there).
    pub fn records(&self) -> u64 {
        self.total()
    }

    fn total(&self) -> u64 {
        self.keys
            + self.principals
            + self.cards
            + self.audit_events
            + self.audit_checkpoints
            + self.audit_signing_keys
            + self.audit_archives
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Header {
        format: String,
        version: u32,
        kek_id: String,
        #[serde(with = "time::serde::rfc3339")]
        created_at: time::OffsetDateTime,
    },
    Key {
        purpose: String,
        version: u32,
        kek_id: String,
        wrapped: String,
        created_at: i64,
        // Lifecycle (migration 0004); absent in older backups: active.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retired_at: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        destroyed_at: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reencrypted_at: Option<i64>,
    },
    Principal {
        id: String,
        name: String,
        roles: String,
        tenants: String,
        key_hash: String,
        created_at: i64,
        revoked_at: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert_identity: Option<String>,
    },
    Card {
        token: String,
        tenant: String,
        fingerprint: String,
        brand: String,
        bin: String,
        last4: String,
        pan_len: u8,
        key_version: u32,
        nonce: String,
        ciphertext: String,
        created_at: i64,
        /// Absent in backups from before migration 0004: version 1.
        #[serde(default = "first_version")]
        fingerprint_version: u32,
        /// Absent in backups from before migration 0006.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_used_at: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        updated_at: Option<i64>,
    },
    /// A tenant (from migration 0006): its policy and fingerprint salt
    /// (base64; absent for legacy and deleted tenants).
    Tenant {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint_salt: Option<String>,
        pan_shaped: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_ttl_days: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retention_days: Option<u32>,
        created_at: i64,
        updated_at: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deleted_at: Option<i64>,
    },
    Audit {
        seq: i64,
        event: AuditEvent,
        chain_seq: Option<u64>,
        leaf_hash: Option<String>,
        chain_hash: Option<String>,
    },
    Checkpoint(audit::Checkpoint),
    SigningKey {
        generation: u32,
        key_id: String,
        kek_id: String,
        wrapped: String,
        public_key: String,
        created_at: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retired_at: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        destroyed_at: Option<i64>,
    },
    /// An archived segment of the audit trail (its entries may no longer be
    /// in the backup: they are in the archive file).
    AuditArchive {
        from_seq: u64,
        to_seq: u64,
        anchor: audit::Anchor,
        file_name: String,
        file_sha256: String,
        archived_at: String,
    },
    End {
        records: u64,
        sha256: String,
        seal: String,
        /// Ed25519 signature (128 hex) by the audit signing key `signing_key_id`
        /// over the bytes in the module doc; absent in older backups.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signing_key_id: Option<String>,
    },
}

fn first_version() -> u32 {
    1
}

impl From<BackupRecord> for Line {
    fn from(r: BackupRecord) -> Line {
        match r {
            BackupRecord::Key(k) => Line::Key {
                purpose: k.purpose.as_str().to_owned(),
                version: k.version,
                kek_id: k.kek_id,
                wrapped: B64.encode(k.wrapped),
                created_at: k.created_at,
                state: Some(k.state.as_str().to_owned()),
                retired_at: k.retired_at,
                destroyed_at: k.destroyed_at,
                reencrypted_at: k.reencrypted_at,
            },
            BackupRecord::Principal(p) => Line::Principal {
                id: p.id,
                name: p.name,
                roles: p.roles,
                tenants: p.tenants,
                key_hash: p.key_hash,
                created_at: p.created_at,
                revoked_at: p.revoked_at,
                cert_identity: p.cert_identity,
            },
            BackupRecord::Card(c) => Line::Card {
                token: c.token,
                tenant: c.tenant,
                fingerprint: c.fingerprint,
                brand: c.brand,
                bin: c.bin,
                last4: c.last4,
                pan_len: c.pan_len,
                key_version: c.key_version,
                nonce: B64.encode(c.nonce),
                ciphertext: B64.encode(c.ciphertext),
                created_at: c.created_at,
                fingerprint_version: c.fingerprint_version,
                expires_at: c.expires_at,
                last_used_at: c.last_used_at,
                updated_at: c.updated_at,
            },
            BackupRecord::Tenant(t) => Line::Tenant {
                name: t.name,
                fingerprint_salt: t.fingerprint_salt.map(|s| B64.encode(s)),
                pan_shaped: t.pan_shaped,
                token_ttl_days: t.token_ttl_days,
                retention_days: t.retention_days,
                created_at: t.created_at,
                updated_at: t.updated_at,
                deleted_at: t.deleted_at,
            },
            BackupRecord::Audit(a) => Line::Audit {
                seq: a.seq,
                event: a.event,
                chain_seq: a.chain.map(|l| l.chain_seq),
                leaf_hash: a.chain.map(|l| B64.encode(l.leaf_hash)),
                chain_hash: a.chain.map(|l| B64.encode(l.chain_hash)),
            },
            BackupRecord::Checkpoint(cp) => Line::Checkpoint(cp),
            BackupRecord::SigningKey(k) => Line::SigningKey {
                generation: k.generation,
                key_id: k.key_id,
                kek_id: k.kek_id,
                wrapped: B64.encode(k.wrapped),
                public_key: k.public_key,
                created_at: k.created_at,
                retired_at: k.retired_at,
                destroyed_at: k.destroyed_at,
            },
            BackupRecord::Archive(a) => Line::AuditArchive {
                from_seq: a.from_seq,
                to_seq: a.to_seq,
                anchor: a.anchor,
                file_name: a.file_name,
                file_sha256: a.file_sha256,
                archived_at: a.archived_at,
            },
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Append one JSON line to the file and to the running digest.
fn write_line(
    out: &mut impl Write,
    line: &Line,
    hasher: &mut Sha256,
) -> Result<(), std::io::Error> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    hasher.update(&bytes);
    out.write_all(&bytes)
}

/// Make a complete backup durable under its name: flush, fsync, rename the
/// `.partial` file, fsync the directory (the rename is durable only then).
fn finish(out: BufWriter<fs::File>, tmp: &Path, path: &Path) -> Result<(), BackupError> {
    let file = out.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err(tmp))?;
    fs::rename(tmp, path).map_err(io_err(path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_dir(dir).map_err(io_err(dir))
}

/// fsync a directory: a file renamed into it is durable only then.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all())
}

/// The bytes a backup's signature covers (layout in the module doc).
fn signed_bytes(records: u64, digest: &[u8], seal: &[u8], key_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_TAG.len() + 8 + 32 + 8 + seal.len() + key_id.len());
    out.extend_from_slice(SIGNATURE_TAG);
    out.extend_from_slice(&records.to_be_bytes());
    out.extend_from_slice(digest);
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len(seal.len()));
    out.extend_from_slice(seal);
    out.extend_from_slice(&len(key_id.len()));
    out.extend_from_slice(key_id.as_bytes());
    out
}

/// Sign with the audit signing key held (wrapped) in `row`.
fn sign(
    kek: &dyn KeyEncryptionKey,
    row: &SigningKeyRow,
    message: &[u8],
) -> Result<String, BackupError> {
    let secret = kek
        .unwrap(&format!("audit_signing:{}", row.generation), &row.wrapped)
        .map_err(|e| BackupError::SigningKey(e.to_string()))?;
    let key = audit::SigningKey::from_secret_slice(&secret)
        .map_err(|e| BackupError::SigningKey(e.to_string()))?;
    if key.key_id() != row.key_id {
        return Err(BackupError::SigningKey(
            "the unwrapped key does not match its key id".into(),
        ));
    }
    Ok(audit::hex::encode(&key.sign_message(message)))
}

/// A backup written: what it holds, when it began, which key signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupWritten {
    pub summary: BackupSummary,
    /// The header's time, taken before the snapshot: every write
    /// acknowledged before it is in the backup.
    pub started_at: time::OffsetDateTime,
    /// The audit signing key that signed it (None: the store had none).
    pub signing_key_id: Option<String>,
}

/// Write a backup of `store` to `path` (created 0600; written to a temporary
/// name, synced, then renamed, and the directory synced, so a crash never
/// leaves a half file under the final name). Records a `backup_exported`
/// audit event (counts and the file name).
pub async fn write_backup(
    store: &dyn Store,
    kek: &dyn KeyEncryptionKey,
    path: &Path,
) -> Result<BackupSummary, BackupError> {
    Ok(write_backup_file(store, kek, path).await?.summary)
}

/// [`write_backup`], saying when the backup began and who signed it.
pub async fn write_backup_file(
    store: &dyn Store,
    kek: &dyn KeyEncryptionKey,
    path: &Path,
) -> Result<BackupWritten, BackupError> {
    if path.exists() {
        return Err(BackupError::Exists(path.display().to_string()));
    }
    let tmp = path.with_extension("partial");
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // Large writes: fewer system calls on the runtime thread.
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut summary = BackupSummary::default();
    let started_at = time::OffsetDateTime::now_utc();
    let header = Line::Header {
        format: FORMAT.to_owned(),
        version: VERSION,
        kek_id: kek.kek_id().to_owned(),
        created_at: started_at,
    };
    // The newest signing key generation of the snapshot (rows come oldest
    // first): the one that signs now.
    let mut signer: Option<SigningKeyRow> = None;
    let result = async {
        write_line(&mut out, &header, &mut hasher).map_err(io_err(&tmp))?;
        store
            .export(&mut |record| {
                summary.count(&record);
                if let BackupRecord::SigningKey(k) = &record {
                    signer = Some(k.clone());
                }
                write_line(&mut out, &Line::from(record), &mut hasher).map_err(StoreError::Output)
            })
            .await?;
        let digest = hasher.finalize();
        let seal = kek.wrap(SEAL_LABEL, &digest)?;
        let records = summary.total();
        let signature = match &signer {
            Some(row) => Some(sign(
                kek,
                row,
                &signed_bytes(records, &digest, &seal, &row.key_id),
            )?),
            None => {
                tracing::warn!("the store has no audit signing key: the backup is unsigned");
                None
            }
        };
        let end = Line::End {
            records,
            sha256: audit::hex::encode(&digest),
            seal: B64.encode(&seal),
            signing_key_id: signature
                .as_ref()
                .and(signer.as_ref())
                .map(|r| r.key_id.clone()),
            signature,
        };
        write_line(&mut out, &end, &mut Sha256::new()).map_err(io_err(&tmp))?;
        // The flush and the fsyncs of a large file take seconds: off the
        // runtime thread, which also runs the service's background jobs.
        let (partial, complete) = (tmp.clone(), path.to_path_buf());
        tokio::task::spawn_blocking(move || finish(out, &partial, &complete))
            .await
            .map_err(|e| io_err(&tmp)(std::io::Error::other(e)))?
    }
    .await;
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let event = AuditEvent::new(Action::BackupExported, Outcome::Success)
        .source("local")
        .detail(format!("{} file={file_name}", summary.describe()));
    store.append_audit(event).await?;
    Ok(BackupWritten {
        summary,
        started_at,
        signing_key_id: signer.map(|r| r.key_id),
    })
}

impl crate::Vault {
    /// Write a backup of this vault's store (see [`write_backup_file`]),
    /// sealed with the KEK the vault holds.
    pub async fn write_backup(&self, path: &Path) -> Result<BackupWritten, BackupError> {
        let kek = self.keys.kek();
        write_backup_file(self.store().as_ref(), &*kek, path).await
    }
}

fn decode_b64(s: &str, line: usize) -> Result<Vec<u8>, BackupError> {
    B64.decode(s).map_err(|_| BackupError::Corrupt {
        line,
        reason: "invalid base64",
    })
}

fn to_record(line: Line, n: usize) -> Result<Option<BackupRecord>, BackupError> {
    let corrupt = |reason| BackupError::Corrupt { line: n, reason };
    Ok(Some(match line {
        Line::Key {
            purpose,
            version,
            kek_id,
            wrapped,
            created_at,
            state,
            retired_at,
            destroyed_at,
            reencrypted_at,
        } => BackupRecord::Key(StoredKey {
            purpose: KeyPurpose::parse(&purpose).ok_or_else(|| corrupt("unknown key purpose"))?,
            version,
            kek_id,
            wrapped: decode_b64(&wrapped, n)?,
            created_at,
            // Backups from before migration 0004 hold only first keys:
            // active, nothing to re-encrypt.
            reencrypted_at: if state.is_none() {
                Some(created_at)
            } else {
                reencrypted_at
            },
            state: match state {
                None => KeyState::Active,
                Some(s) => KeyState::parse(&s).ok_or_else(|| corrupt("unknown key state"))?,
            },
            retired_at,
            destroyed_at,
        }),
        Line::Principal {
            id,
            name,
            roles,
            tenants,
            key_hash,
            created_at,
            revoked_at,
            cert_identity,
        } => BackupRecord::Principal(PrincipalRow {
            id,
            name,
            roles,
            tenants,
            key_hash,
            created_at,
            revoked_at,
            cert_identity,
        }),
        Line::Card {
            token,
            tenant,
            fingerprint,
            brand,
            bin,
            last4,
            pan_len,
            key_version,
            nonce,
            ciphertext,
            created_at,
            fingerprint_version,
            expires_at,
            last_used_at,
            updated_at,
        } => BackupRecord::Card(CardRow {
            token,
            tenant,
            fingerprint,
            brand,
            bin,
            last4,
            pan_len,
            key_version,
            nonce: decode_b64(&nonce, n)?,
            ciphertext: decode_b64(&ciphertext, n)?,
            created_at,
            fingerprint_version,
            expires_at,
            // A backup from before migration 0006: last used when created
            // (as the migration sets it; retention reads it).
            last_used_at: last_used_at.or(Some(created_at)),
            updated_at,
        }),
        Line::Tenant {
            name,
            fingerprint_salt,
            pan_shaped,
            token_ttl_days,
            retention_days,
            created_at,
            updated_at,
            deleted_at,
        } => BackupRecord::Tenant(crate::store::TenantRow {
            name,
            fingerprint_salt: fingerprint_salt.map(|s| decode_b64(&s, n)).transpose()?,
            pan_shaped,
            token_ttl_days,
            retention_days,
            created_at,
            updated_at,
            deleted_at,
        }),
        Line::Audit {
            seq,
            event,
            chain_seq,
            leaf_hash,
            chain_hash,
        } => {
            let hash32 = |h: &str| -> Result<[u8; 32], BackupError> {
                decode_b64(h, n)?
                    .try_into()
                    .map_err(|_| corrupt("hash is not 32 bytes"))
            };
            let chain = match (chain_seq, leaf_hash, chain_hash) {
                (Some(chain_seq), Some(l), Some(c)) => Some(ChainLink {
                    chain_seq,
                    leaf_hash: hash32(&l)?,
                    chain_hash: hash32(&c)?,
                }),
                (None, None, None) => None,
                _ => return Err(corrupt("partial chain link")),
            };
            BackupRecord::Audit(AuditRow { seq, event, chain })
        }
        Line::Checkpoint(cp) => BackupRecord::Checkpoint(cp),
        Line::SigningKey {
            generation,
            key_id,
            kek_id,
            wrapped,
            public_key,
            created_at,
            retired_at,
            destroyed_at,
        } => BackupRecord::SigningKey(SigningKeyRow {
            generation,
            key_id,
            kek_id,
            wrapped: decode_b64(&wrapped, n)?,
            public_key,
            created_at,
            retired_at,
            destroyed_at,
        }),
        Line::AuditArchive {
            from_seq,
            to_seq,
            anchor,
            file_name,
            file_sha256,
            archived_at,
        } => {
            if anchor.tree_size != to_seq {
                return Err(corrupt("archive anchor does not match its range"));
            }
            BackupRecord::Archive(audit::db::ArchiveRow {
                from_seq,
                to_seq,
                anchor,
                file_name,
                file_sha256,
                archived_at,
            })
        }
        Line::Header { .. } => return Err(corrupt("a second header")),
        Line::End { .. } => return Ok(None),
    }))
}

/// A backup file read and checked for shape, count and digest.
struct Scanned {
    kek_id: String,
    created_at: time::OffsetDateTime,
    records: Vec<BackupRecord>,
    summary: BackupSummary,
    digest: Vec<u8>,
    seal: String,
    signature: Option<(String, String)>,
}

/// Read a backup; check its shape, record count and SHA-256. Records are
/// kept only when `keep` (a restore needs them, a verification does not).
fn scan(path: &Path, keep: bool) -> Result<Scanned, BackupError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    let mut hasher = Sha256::new();
    let mut records = Vec::new();
    let mut summary = BackupSummary::default();
    let mut buf = Vec::new();
    let mut n = 0usize;
    let mut end = None;
    let mut head = None;
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
        if read == 0 {
            break;
        }
        n += 1;
        if end.is_some() {
            return Err(BackupError::Corrupt {
                line: n,
                reason: "data after the end line",
            });
        }
        if buf.last() != Some(&b'\n') {
            return Err(BackupError::Corrupt {
                line: n,
                reason: "truncated line",
            });
        }
        let line: Line = serde_json::from_slice(&buf).map_err(|_| BackupError::Corrupt {
            line: n,
            reason: "not a backup record",
        })?;
        if n == 1 {
            match line {
                Line::Header {
                    format,
                    version,
                    kek_id,
                    created_at,
                } => {
                    if format != FORMAT || version != VERSION {
                        return Err(BackupError::Corrupt {
                            line: 1,
                            reason: "unknown format or version",
                        });
                    }
                    head = Some((kek_id, created_at));
                }
                _ => {
                    return Err(BackupError::Corrupt {
                        line: 1,
                        reason: "missing header",
                    })
                }
            }
            hasher.update(&buf);
            continue;
        }
        if let Line::End {
            records,
            sha256,
            seal,
            signature,
            signing_key_id,
        } = line
        {
            let signature = match (signature, signing_key_id) {
                (Some(s), Some(k)) => Some((s, k)),
                (None, None) => None,
                _ => {
                    return Err(BackupError::Corrupt {
                        line: n,
                        reason: "a signature without its key id, or a key id without a signature",
                    })
                }
            };
            end = Some((records, sha256, seal, signature));
            continue;
        }
        hasher.update(&buf);
        if let Some(record) = to_record(line, n)? {
            summary.count(&record);
            if keep {
                records.push(record);
            }
        }
    }
    let (kek_id, created_at) = head.ok_or(BackupError::Corrupt {
        line: 1,
        reason: "missing header",
    })?;
    let (count, sha256, seal, signature) =
        end.ok_or(BackupError::Integrity("no end line: the file is truncated"))?;
    let digest = hasher.finalize();
    if count != summary.total() {
        return Err(BackupError::Integrity("record count does not match"));
    }
    if sha256 != audit::hex::encode(&digest) {
        return Err(BackupError::Integrity("SHA-256 does not match the content"));
    }
    Ok(Scanned {
        kek_id,
        created_at,
        records,
        summary,
        digest: digest.to_vec(),
        seal,
        signature,
    })
}

/// What [`verify_backup`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub summary: BackupSummary,
    /// The records the end line counts.
    pub records: u64,
    /// SHA-256 of the content (hex).
    pub sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    /// The KEK that sealed it (needed to restore it, not to verify it).
    pub kek_id: String,
    /// The signing key id whose signature verified; None: unsigned backup
    /// (count and digest checked, nobody vouches for them).
    pub signed_by: Option<String>,
}

/// Check a backup offline with the audit signing public keys alone (no KEK,
/// no database): shape, record count, SHA-256, and the signature by one of
/// `keys` (the one its key id names). An unsigned backup (from before
/// signing) passes with `signed_by: None`; the caller decides.
pub fn verify_backup(path: &Path, keys: &[audit::VerifyingKey]) -> Result<Verified, BackupError> {
    let scanned = scan(path, false)?;
    let seal = B64
        .decode(&scanned.seal)
        .map_err(|_| BackupError::Integrity("seal is malformed"))?;
    let records = scanned.summary.total();
    let signed_by = match &scanned.signature {
        None => None,
        Some((signature, key_id)) => {
            let key = keys.iter().find(|k| k.key_id() == key_id).ok_or_else(|| {
                BackupError::Signature(format!(
                    "signed by key {key_id}, which is not among the given public keys"
                ))
            })?;
            let bytes: [u8; 64] = audit::hex::decode_array(signature)
                .ok_or_else(|| BackupError::Signature("the signature is malformed".into()))?;
            let public = ed25519_dalek::VerifyingKey::from_bytes(&key.to_bytes())
                .map_err(|_| BackupError::Signature("the public key is invalid".into()))?;
            public
                .verify_strict(
                    &signed_bytes(records, &scanned.digest, &seal, key_id),
                    &ed25519_dalek::Signature::from_bytes(&bytes),
                )
                .map_err(|_| {
                    BackupError::Signature(format!("the signature by key {key_id} does not verify"))
                })?;
            Some(key_id.clone())
        }
    };
    Ok(Verified {
        summary: scanned.summary,
        records,
        sha256: audit::hex::encode(&scanned.digest),
        created_at: scanned.created_at,
        kek_id: scanned.kek_id,
        signed_by,
    })
}

/// Read and fully check a backup file without touching any database.
pub fn read_backup(
    kek: &dyn KeyEncryptionKey,
    path: &Path,
) -> Result<(Vec<BackupRecord>, BackupSummary), BackupError> {
    let Scanned {
        kek_id,
        records,
        summary,
        digest,
        seal,
        ..
    } = scan(path, true)?;
    if kek_id != kek.kek_id() {
        return Err(BackupError::WrongKek {
            backup: kek_id,
            configured: kek.kek_id().to_owned(),
        });
    }
    let sealed = B64
        .decode(&seal)
        .map_err(|_| BackupError::Integrity("seal is malformed"))?;
    let unsealed = kek
        .unwrap(SEAL_LABEL, &sealed)
        .map_err(|_| BackupError::Integrity("seal does not open under this KEK"))?;
    if unsealed.as_slice() != digest.as_slice() {
        return Err(BackupError::Integrity("seal does not match the content"));
    }
    // A backup whose keys this KEK cannot open would restore a dead vault.
    for r in &records {
        if let BackupRecord::SigningKey(k) = r {
            // A destroyed signing key keeps only its public key.
            if k.destroyed_at.is_some() {
                continue;
            }
            kek.unwrap(&format!("audit_signing:{}", k.generation), &k.wrapped)
                .map_err(|_| {
                    BackupError::Integrity("the audit signing key does not open under this KEK")
                })?;
        }
        if let BackupRecord::Key(k) = r {
            // A destroyed key has no material left to check.
            if k.state == KeyState::Destroyed {
                continue;
            }
            if k.kek_id != kek.kek_id() {
                return Err(BackupError::WrongKek {
                    backup: k.kek_id.clone(),
                    configured: kek.kek_id().to_owned(),
                });
            }
            kek.unwrap(&label(k.purpose, k.version), &k.wrapped)
                .map_err(|_| {
                    BackupError::Integrity("a wrapped key does not open under this KEK")
                })?;
        }
    }
    Ok((records, summary))
}

/// Restore a backup into `store`, which must be empty (migrated, no rows).
/// Records a `backup_restored` audit event after the restored trail.
pub async fn restore_backup(
    store: &dyn Store,
    kek: &dyn KeyEncryptionKey,
    path: &Path,
) -> Result<BackupSummary, BackupError> {
    let (records, summary) = read_backup(kek, path)?;
    if !store.is_empty().await? {
        return Err(BackupError::NotEmpty);
    }
    store.import(records).await?;
    let event = AuditEvent::new(Action::BackupRestored, Outcome::Success)
        .source("local")
        .detail(summary.describe());
    store.append_audit(event).await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use zeroize::Zeroizing;

    use super::*;
    use crate::access::{self, Role, TenantScope};
    use crate::store::tests::TestStore;
    use crate::{CardInput, Principal, RequestContext, Vault};

    fn ctx() -> RequestContext {
        RequestContext {
            principal: Principal {
                id: "id".into(),
                name: "ops".into(),
                roles: [Role::Tokenize, Role::Detokenize]
                    .into_iter()
                    .collect::<BTreeSet<_>>(),
                tenants: TenantScope::All,
            },
            source: "test".into(),
            request_id: "r".into(),
        }
    }

    const CARDS: &[(&str, Option<&str>)] = &[
        ("4111111111111111", Some("Jane Doe")),
        ("5555555555554444", None),
        ("378282246310005", Some("Łukasz Żółć")),
        ("2200000000000004", None),
    ];

    /// A vault with cards, a principal and an audit trail; returns tokens and the API key.
    async fn populate(
        store: Arc<dyn Store>,
        kek: Arc<dyn KeyEncryptionKey>,
    ) -> (Vec<String>, String) {
        let vault = Vault::open(store.clone(), kek).await.unwrap();
        let mut tokens = Vec::new();
        for (pan, name) in CARDS {
            let card = CardInput {
                pan: Zeroizing::new((*pan).to_owned()),
                exp_month: 11,
                exp_year: i64::from(time::OffsetDateTime::now_utc().year()) + 2,
                cardholder_name: name.map(|n| Zeroizing::new(n.to_owned())),
                cvc: None,
            };
            tokens.push(vault.tokenize(&ctx(), "shop-1", card).await.unwrap().token);
        }
        vault.detokenize(&ctx(), &tokens[0], "check").await.unwrap();
        let roles = access::parse_roles("tokenize").unwrap();
        let (_, key) =
            access::create_principal(&*store, "checkout", &roles, &TenantScope::All, None)
                .await
                .unwrap();
        (tokens, key.expose().to_owned())
    }

    #[tokio::test]
    async fn backups_restore_across_backends() {
        let dir = tempfile::tempdir().unwrap();
        let kek: Arc<dyn KeyEncryptionKey> =
            Arc::new(hsm_shim::SoftwareKek::generate(&dir.path().join("kek.key")).unwrap());
        for (from, to) in [
            (TestStore::sqlite().await, TestStore::postgres().await),
            (TestStore::postgres().await, TestStore::sqlite().await),
        ] {
            let (tokens, key) = populate(from.store(), kek.clone()).await;
            let file = dir
                .path()
                .join(format!("{}-to-{}.backup", from.name(), to.name()));
            let written = write_backup(&*from.store(), &*kek, &file).await.unwrap();
            assert_eq!((written.cards, written.principals, written.keys), (4, 1, 2));
            assert!(written.audit_events >= 8);
            // Nothing in clear in the file.
            let text = std::fs::read_to_string(&file).unwrap();
            for (pan, name) in CARDS {
                assert!(!text.contains(pan));
                if let Some(name) = name {
                    assert!(!text.contains(name));
                }
            }
            assert!(matches!(
                write_backup(&*from.store(), &*kek, &file).await,
                Err(BackupError::Exists(_))
            ));

            let restored = restore_backup(&*to.store(), &*kek, &file).await.unwrap();
            assert_eq!(restored, written);
            let vault = Vault::open(to.store(), kek.clone()).await.unwrap();
            for ((pan, name), token) in CARDS.iter().zip(&tokens) {
                let d = vault
                    .detokenize(&ctx(), token, "restore check")
                    .await
                    .unwrap();
                assert_eq!(
                    d.card.pan.expose_digits(),
                    *pan,
                    "{} -> {}",
                    from.name(),
                    to.name()
                );
                assert_eq!(d.card.name.as_ref().map(|n| n.expose()), *name);
            }
            // Idempotency survives: the same card gets the same token.
            let again = CardInput {
                pan: Zeroizing::new(CARDS[1].0.to_owned()),
                exp_month: 11,
                exp_year: i64::from(time::OffsetDateTime::now_utc().year()) + 2,
                cardholder_name: None,
                cvc: None,
            };
            assert_eq!(
                vault.tokenize(&ctx(), "shop-1", again).await.unwrap().token,
                tokens[1]
            );
            // Principals and their keys survive.
            let p = crate::access::Authenticator::new(to.store().clone())
                .authenticate(&key)
                .await
                .unwrap();
            assert_eq!(p.name, "checkout");
            // The audit trail came along, numbers kept, and continues after them.
            let src = from.store().audit_events(0, 10_000).await.unwrap();
            let dst = to.store().audit_events(0, 10_000).await.unwrap();
            let exported: Vec<_> = src
                .iter()
                .filter(|e| e.event.action != Action::BackupExported)
                .collect();
            assert_eq!(dst[..exported.len()].iter().collect::<Vec<_>>(), exported);
            let last = dst.last().unwrap();
            assert!(last.seq > exported.last().unwrap().seq);
            // A second restore into the now non-empty database is refused.
            assert!(matches!(
                restore_backup(&*to.store(), &*kek, &file).await,
                Err(BackupError::NotEmpty)
            ));
        }
    }

    #[tokio::test]
    async fn corrupt_or_foreign_backups_restore_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let kek: Arc<dyn KeyEncryptionKey> =
            Arc::new(hsm_shim::SoftwareKek::generate(&dir.path().join("kek.key")).unwrap());
        let other_kek = hsm_shim::SoftwareKek::generate(&dir.path().join("other.key")).unwrap();
        let src = TestStore::sqlite().await;
        populate(src.store(), kek.clone()).await;
        let good = dir.path().join("good.backup");
        write_backup(&*src.store(), &*kek, &good).await.unwrap();
        let text = std::fs::read_to_string(&good).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let card_line = lines
            .iter()
            .position(|l| l.contains("\"type\":\"card\""))
            .unwrap();

        let mut cases: Vec<(&str, String)> = Vec::new();
        // One changed character inside a ciphertext.
        let mut flipped = lines.clone();
        let changed = flipped[card_line].replacen("\"ciphertext\":\"", "\"ciphertext\":\"A", 1);
        flipped[card_line] = &changed;
        cases.push(("changed byte", flipped.join("\n") + "\n"));
        // A removed record.
        let mut removed = lines.clone();
        removed.remove(card_line);
        cases.push(("removed record", removed.join("\n") + "\n"));
        // Truncated: no end line, or a cut line.
        cases.push(("no end line", lines[..lines.len() - 1].join("\n") + "\n"));
        cases.push(("cut line", text[..text.len() - 10].to_owned()));
        // Swapped records.
        let mut swapped = lines.clone();
        swapped.swap(card_line, card_line + 1);
        cases.push(("swapped records", swapped.join("\n") + "\n"));
        // Content changed and the digest recomputed, without the KEK for the seal.
        let mut forged = lines.clone();
        let forged_card =
            forged[card_line].replace("\"tenant\":\"shop-1\"", "\"tenant\":\"shop-2\"");
        forged[card_line] = &forged_card;
        let body = forged[..forged.len() - 1].join("\n") + "\n";
        let digest = audit::hex::encode(&Sha256::digest(body.as_bytes()));
        let end: serde_json::Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
        let end = serde_json::json!({"type": "end", "records": end["records"], "sha256": digest, "seal": end["seal"]});
        cases.push(("forged with recomputed digest", format!("{body}{end}\n")));

        for (what, content) in cases {
            let path = dir.path().join("bad.backup");
            std::fs::write(&path, content).unwrap();
            let target = TestStore::sqlite().await;
            let err = restore_backup(&*target.store(), &*kek, &path)
                .await
                .unwrap_err();
            assert!(
                matches!(err, BackupError::Corrupt { .. } | BackupError::Integrity(_)),
                "{what}: {err}"
            );
            assert!(
                target.store().is_empty().await.unwrap(),
                "{what}: nothing restored"
            );
        }
        let target = TestStore::sqlite().await;
        let err = restore_backup(&*target.store(), &other_kek, &good)
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::WrongKek { .. }), "{err}");
        assert!(target.store().is_empty().await.unwrap());
    }

    #[tokio::test]
    async fn backups_are_signed_and_verify_with_the_public_key_alone() {
        let dir = tempfile::tempdir().unwrap();
        let kek: Arc<dyn KeyEncryptionKey> =
            Arc::new(hsm_shim::SoftwareKek::generate(&dir.path().join("kek.key")).unwrap());
        let src = TestStore::sqlite().await;
        populate(src.store(), kek.clone()).await;
        let vault = Vault::open(src.store(), kek.clone()).await.unwrap();
        let public = vault.keys.audit_public_key();
        let key = audit::VerifyingKey::parse(&public).unwrap();
        let good = dir.path().join("signed.backup");
        let written = vault.write_backup(&good).await.unwrap();
        assert_eq!(written.signing_key_id.as_deref(), Some(key.key_id()));
        let v = verify_backup(&good, std::slice::from_ref(&key)).unwrap();
        assert_eq!(v.signed_by.as_deref(), Some(key.key_id()));
        assert_eq!(v.summary, written.summary);
        assert_eq!(v.created_at, written.started_at);
        // The audit event names the file and the counts, nothing else.
        let events = src.store().audit_events(0, 10_000).await.unwrap();
        let last = events
            .iter()
            .rev()
            .find(|e| e.event.action == Action::BackupExported)
            .unwrap();
        assert!(
            last.event
                .detail
                .as_deref()
                .unwrap()
                .ends_with(" file=signed.backup"),
            "{:?}",
            last.event.detail
        );

        // Another key: refused.
        let other = audit::SigningKey::generate().unwrap().verifying_key();
        assert!(matches!(
            verify_backup(&good, std::slice::from_ref(&other)),
            Err(BackupError::Signature(_))
        ));
        // Every single byte changed (outside the file's JSON syntax, which
        // fails to parse anyway) is found: a few positions of every line.
        let bytes = std::fs::read(&good).unwrap();
        let mut positions = Vec::new();
        let mut start = 0;
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'\n' {
                positions.extend([start + (i - start) / 2, i.saturating_sub(3)]);
                start = i + 1;
            }
        }
        for at in positions {
            let mut bad = bytes.clone();
            bad[at] = if bad[at] == b'0' { b'1' } else { b'0' };
            let path = dir.path().join("tampered.backup");
            std::fs::write(&path, &bad).unwrap();
            let err = verify_backup(&path, std::slice::from_ref(&key)).unwrap_err();
            assert!(
                matches!(
                    err,
                    BackupError::Corrupt { .. }
                        | BackupError::Integrity(_)
                        | BackupError::Signature(_)
                ),
                "byte {at}: {err}"
            );
        }
        // An unsigned (older) backup: verifies as unsigned and restores.
        let text = std::fs::read_to_string(&good).unwrap();
        let (body, end) = text.trim_end().rsplit_once('\n').unwrap();
        let mut end: serde_json::Value = serde_json::from_str(end).unwrap();
        end.as_object_mut().unwrap().remove("signature");
        end.as_object_mut().unwrap().remove("signing_key_id");
        let unsigned = dir.path().join("unsigned.backup");
        std::fs::write(&unsigned, format!("{body}\n{end}\n")).unwrap();
        let v = verify_backup(&unsigned, std::slice::from_ref(&key)).unwrap();
        assert_eq!(v.signed_by, None);
        let target = TestStore::sqlite().await;
        restore_backup(&*target.store(), &*kek, &unsigned)
            .await
            .unwrap();
        // A signature without its key id is malformed.
        end["signature"] = serde_json::json!("00");
        std::fs::write(&unsigned, format!("{body}\n{end}\n")).unwrap();
        assert!(matches!(
            verify_backup(&unsigned, std::slice::from_ref(&key)),
            Err(BackupError::Corrupt { .. })
        ));
    }
}
