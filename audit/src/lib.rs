//! Audit events of cardvault: who touched which card data, when, from where,
//! and with what result (PCI DSS 10.2), and the tamper-evident trail they
//! form (PCI DSS 10.3.2, 10.3.4).
//!
//! This crate owns the *shape* of an audit event, its canonical encoding,
//! and the cryptography of the trail. It stores nothing itself: the vault's
//! store appends entries in the same database transaction as the change
//! they record, and the `vault-audit` tool checks them with the public key.
//!
//! The trail: entries numbered 1, 2, 3, ... form a hash chain and an RFC 6962
//! Merkle tree over the same leaf hashes; at intervals the service signs a
//! checkpoint (tree size, Merkle root, chain head, time) with an Ed25519 key
//! the database never holds, and also appends it to a file outside the
//! database. Anyone with the public key can verify the whole trail, locate
//! the first changed, inserted, removed, reordered or truncated entry, and
//! check an inclusion proof of one entry.
//!
//! Public API:
//! - [`AuditEvent`]: one entry; built with [`AuditEvent::new`] and setters;
//!   [`AuditEvent::canonical_bytes`] is what the leaf hash covers.
//! - [`Action`], [`Outcome`]: closed vocabularies with stable names.
//! - [`StoredEvent`]: an event with the sequence number the store gave it.
//! - [`chain`]: [`leaf_hash`], [`chain_hash`], [`ChainedEvent`] (what the
//!   store keeps per entry), [`ChainState`] (appending), [`Trail`] (chain +
//!   Merkle frontier, signs checkpoints).
//! - [`merkle`]: [`merkle::mth`], [`Frontier`], inclusion and consistency
//!   proofs ([`merkle::inclusion_proof`], [`merkle::verify_inclusion`],
//!   [`merkle::consistency_proof`], [`merkle::verify_consistency`],
//!   streamed by [`merkle::ProofBuilder`]).
//! - [`checkpoint`]: [`Checkpoint`] (signed bytes, JSON), [`SigningKey`],
//!   [`VerifyingKey`] (the auditor's one-line public key file).
//! - [`verify`]: [`verify_trail`], [`verify_export`], the streaming
//!   [`Verifier`], [`Report`] and [`Failure`] (what and where).
//! - [`export`]: JSON Lines [`Record`]s (entry or checkpoint), writers and
//!   the strict streaming [`ExportReader`].
//! - [`proof`]: [`EntryProof`], one entry's inclusion proof against a
//!   signed checkpoint.
//!
//! Invariant: an event holds token ids, tenants, principal names and error
//! codes, never a PAN, never a fingerprint (fingerprints could correlate cards
//! across tenants). The one free-text field, `reason`, is checked by the
//! caller to hold no card number before it gets here, and the store refuses
//! events whose text looks like one. Nothing in the trail is secret: the
//! signing key is used here, never stored here.
#![forbid(unsafe_code)]

pub mod auditor;
pub mod chain;
pub mod checkpoint;
pub mod db;
pub mod export;
pub mod hex;
pub mod merkle;
pub mod proof;
pub mod verify;

#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod tamper_tests;

pub use chain::{chain_hash, leaf_hash, Anchor, ChainState, ChainedEvent, Trail};
pub use checkpoint::{
    Checkpoint, CheckpointError, Handover, KeyError, SigningKey, Trust, TrustedKeys, VerifyingKey,
};
pub use export::{ExportReader, ReadError, Record};
pub use merkle::Frontier;
pub use proof::{EntryProof, ProofError};
pub use verify::{verify_export, verify_trail, Evidence, Failure, Report, Verifier};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What was done. The string names are stable: they are stored and audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Tokenize,
    Detokenize,
    MetadataRead,
    Delete,
    /// A request whose credentials were missing, malformed, unknown or revoked.
    AuthenticationFailed,
    /// An authenticated request that its principal's roles or tenants do not allow.
    AuthorizationDenied,
    PrincipalCreated,
    PrincipalRevoked,
    KeyGenerated,
    ServiceStart,
    ServiceStop,
    /// A backup (which includes the audit trail) was written.
    BackupExported,
    /// A backup was restored into an empty database.
    BackupRestored,
    /// The audit trail was read or exported (queries of the auditor API).
    AuditRead,
    /// A segment of the audit trail past its online retention was archived
    /// to a file (its entries may then be deleted from the database).
    AuditArchived,
    /// An attempt to unseal the service: one custodian's passphrase, an HSM
    /// login or a KEK file read (detail: who and the result; never the
    /// passphrase or PIN).
    UnsealAttempt,
    /// The service was sealed: every key dropped from memory.
    Sealed,
    /// A new DEK version (and optionally a new fingerprint key) became
    /// active; the previous one is decrypt-only (detail: the key labels).
    KeyRotated,
    /// A decrypt-only key no record uses any more was retired: never used
    /// again, dropped from memory.
    KeyRetired,
    /// A retired key's wrapped material was erased (crypto-shredding).
    KeyDestroyed,
    /// A re-encryption pass began (records under older keys are moved to
    /// the active ones).
    ReencryptionStarted,
    /// The re-encryption pass finished: no record is under an older key.
    ReencryptionFinished,
    /// Every vault key and the audit signing key were re-wrapped under a new
    /// KEK (detail: old and new KEK ids).
    KekRotated,
    /// The detokenize anomaly rule fired: a principal detokenized many more
    /// distinct tokens in a window than its recent baseline (detail: the
    /// counts; the detokenize itself is its own event).
    DetokenizeAnomaly,
    /// A source address was refused for a while after too many failed
    /// authentications (detail: the limit and how long).
    SourceBlocked,
    /// An expiry date or cardholder name of a stored card changed (the token
    /// stays).
    CardUpdated,
    /// Records past their expiry or their tenant's retention were deleted
    /// (counts only).
    Purged,
    /// A tenant's policy (pan-shaped tokens, token lifetime, retention) set.
    TenantUpdated,
    /// A tenant deleted: its records and its fingerprint key (crypto-shred).
    TenantDeleted,
    /// A hosted collection session was opened (detail: its origin and
    /// lifetime; never the client secret).
    CollectSessionCreated,
    /// The edge submitted a card for a session: accepted (a retry of the
    /// completed submission too) or refused (error code; detail: the
    /// buyer's address as the edge reports it). Never the card.
    CollectSubmission,
    /// A session was completed with its card's token.
    CollectSessionCompleted,
    /// Sessions past their lifetime were purged (counts only).
    CollectSessionsExpired,
    /// Card data is released to a forwarding upstream (before anything is
    /// sent: principal, tenant, the tokens, the upstream and the path
    /// pattern; never a card value). Or refused (error code).
    Forward,
    /// The forwarded call's end: the upstream's status or the failure, the
    /// duration, the bytes each way, the SHA-256 of the upstream's
    /// certificate, the count of card numbers replaced by tokens in its
    /// answer.
    ForwardCompleted,
    /// Stored answers of forwarded calls with an `Idempotency-Key` were
    /// purged 24 hours after their call (count only).
    ForwardKeysExpired,
}

impl Action {
    /// The stable name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Tokenize => "tokenize",
            Action::Detokenize => "detokenize",
            Action::MetadataRead => "metadata_read",
            Action::Delete => "delete",
            Action::AuthenticationFailed => "authentication_failed",
            Action::AuthorizationDenied => "authorization_denied",
            Action::PrincipalCreated => "principal_created",
            Action::PrincipalRevoked => "principal_revoked",
            Action::KeyGenerated => "key_generated",
            Action::ServiceStart => "service_start",
            Action::ServiceStop => "service_stop",
            Action::BackupExported => "backup_exported",
            Action::BackupRestored => "backup_restored",
            Action::AuditRead => "audit_read",
            Action::AuditArchived => "audit_archived",
            Action::UnsealAttempt => "unseal_attempt",
            Action::Sealed => "sealed",
            Action::KeyRotated => "key_rotated",
            Action::KeyRetired => "key_retired",
            Action::KeyDestroyed => "key_destroyed",
            Action::ReencryptionStarted => "reencryption_started",
            Action::ReencryptionFinished => "reencryption_finished",
            Action::KekRotated => "kek_rotated",
            Action::DetokenizeAnomaly => "detokenize_anomaly",
            Action::SourceBlocked => "source_blocked",
            Action::CardUpdated => "card_updated",
            Action::Purged => "purged",
            Action::TenantUpdated => "tenant_updated",
            Action::TenantDeleted => "tenant_deleted",
            Action::CollectSessionCreated => "collect_session_created",
            Action::CollectSubmission => "collect_submission",
            Action::CollectSessionCompleted => "collect_session_completed",
            Action::CollectSessionsExpired => "collect_sessions_expired",
            Action::Forward => "forward",
            Action::ForwardCompleted => "forward_completed",
            Action::ForwardKeysExpired => "forward_keys_expired",
        }
    }

    /// Parse a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        ALL_ACTIONS.iter().copied().find(|a| a.as_str() == name)
    }
}

const ALL_ACTIONS: [Action; 36] = [
    Action::Tokenize,
    Action::Detokenize,
    Action::MetadataRead,
    Action::Delete,
    Action::AuthenticationFailed,
    Action::AuthorizationDenied,
    Action::PrincipalCreated,
    Action::PrincipalRevoked,
    Action::KeyGenerated,
    Action::ServiceStart,
    Action::ServiceStop,
    Action::BackupExported,
    Action::BackupRestored,
    Action::AuditRead,
    Action::AuditArchived,
    Action::UnsealAttempt,
    Action::Sealed,
    Action::KeyRotated,
    Action::KeyRetired,
    Action::KeyDestroyed,
    Action::ReencryptionStarted,
    Action::ReencryptionFinished,
    Action::KekRotated,
    Action::DetokenizeAnomaly,
    Action::SourceBlocked,
    Action::CardUpdated,
    Action::Purged,
    Action::TenantUpdated,
    Action::TenantDeleted,
    Action::CollectSessionCreated,
    Action::CollectSubmission,
    Action::CollectSessionCompleted,
    Action::CollectSessionsExpired,
    Action::Forward,
    Action::ForwardCompleted,
    Action::ForwardKeysExpired,
];

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The operation happened.
    Success,
    /// The caller was refused (authentication or authorization).
    Denied,
    /// The operation did not happen (bad input, unknown token, server fault).
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Failure => "failure",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Outcome::Success, Outcome::Denied, Outcome::Failure]
            .into_iter()
            .find(|o| o.as_str() == name)
    }
}

/// One audit entry (PCI DSS 10.2.2: user, type of event, date and time,
/// success or failure, origination, identity of affected data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// UTC time the event was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Principal name, when the caller authenticated (or claimed one).
    pub principal: Option<String>,
    /// Source address of the request (`ip:port`), or `local` for the CLI.
    pub source: Option<String>,
    pub action: Action,
    pub tenant: Option<String>,
    /// Token id affected; never a PAN.
    pub token: Option<String>,
    pub outcome: Outcome,
    /// Stable error code when the outcome is not success.
    pub error_code: Option<String>,
    /// Request id, echoed to the caller in `x-request-id`.
    pub request_id: Option<String>,
    /// Business reason given by the caller (detokenize).
    pub reason: Option<String>,
    /// Short non-secret detail, e.g. `created` / `existing` for tokenize.
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A new event stamped with the current UTC time.
    pub fn new(action: Action, outcome: Outcome) -> Self {
        Self {
            time: OffsetDateTime::now_utc(),
            principal: None,
            source: None,
            action,
            tenant: None,
            token: None,
            outcome,
            error_code: None,
            request_id: None,
            reason: None,
            detail: None,
        }
    }

    pub fn principal(mut self, v: impl Into<String>) -> Self {
        self.principal = Some(v.into());
        self
    }
    pub fn source(mut self, v: impl Into<String>) -> Self {
        self.source = Some(v.into());
        self
    }
    pub fn tenant(mut self, v: impl Into<String>) -> Self {
        self.tenant = Some(v.into());
        self
    }
    pub fn token(mut self, v: impl Into<String>) -> Self {
        self.token = Some(v.into());
        self
    }
    pub fn error_code(mut self, v: impl Into<String>) -> Self {
        self.error_code = Some(v.into());
        self
    }
    pub fn request_id(mut self, v: impl Into<String>) -> Self {
        self.request_id = Some(v.into());
        self
    }
    pub fn reason(mut self, v: impl Into<String>) -> Self {
        self.reason = Some(v.into());
        self
    }
    pub fn detail(mut self, v: impl Into<String>) -> Self {
        self.detail = Some(v.into());
        self
    }

    /// Every free-text field of the event, for content checks before storing.
    pub fn text_fields(&self) -> impl Iterator<Item = &str> {
        [
            &self.principal,
            &self.source,
            &self.tenant,
            &self.token,
            &self.error_code,
            &self.request_id,
            &self.reason,
            &self.detail,
        ]
        .into_iter()
        .filter_map(|f| f.as_deref())
    }

    /// Canonical, unambiguous encoding of the event (without its sequence
    /// number): the input of the hash chain. Fields are length-prefixed in a
    /// fixed order; absent fields are distinguishable from empty ones.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"cardvault/audit-event/v1");
        let time = self.time.unix_timestamp_nanos().to_be_bytes();
        put(&mut out, Some(&time[..]));
        for field in [
            self.principal.as_deref(),
            self.source.as_deref(),
            Some(self.action.as_str()),
            self.tenant.as_deref(),
            self.token.as_deref(),
            Some(self.outcome.as_str()),
            self.error_code.as_deref(),
            self.request_id.as_deref(),
            self.reason.as_deref(),
            self.detail.as_deref(),
        ] {
            put(&mut out, field.map(str::as_bytes));
        }
        out
    }
}

fn put(out: &mut Vec<u8>, field: Option<&[u8]>) {
    match field {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            // Fields are bounded far below 4 GiB by the API's input limits.
            let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

/// An event as stored, with the sequence number the store assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: i64,
    #[serde(flatten)]
    pub event: AuditEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_and_outcome_names_round_trip() {
        for a in ALL_ACTIONS {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        for o in [Outcome::Success, Outcome::Denied, Outcome::Failure] {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(Action::parse("nope"), None);
    }

    #[test]
    fn canonical_bytes_distinguish_absent_empty_and_shifted_fields() {
        let base = AuditEvent::new(Action::Tokenize, Outcome::Success);
        let empty_tenant = base.clone().tenant("");
        let a = base.clone().tenant("ab").token("c");
        let b = base.clone().tenant("a").token("bc");
        assert_ne!(base.canonical_bytes(), empty_tenant.canonical_bytes());
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(a.canonical_bytes(), a.clone().canonical_bytes());
    }
}
