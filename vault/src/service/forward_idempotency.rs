//! A forwarded call's `Idempotency-Key` (issue 18): a payment must survive
//! a lost connection between the router and the vault without a second
//! charge. When the caller sends a key, the call is claimed under it
//! (per principal, upstream and key) before any card is released; the
//! acquirer's answer, with its card numbers already replaced by tokens, is
//! stored sealed under the active DEK; a repeat is answered from it for 24
//! hours ([`FORWARD_ANSWER_TTL`]) without calling the acquirer again.
//!
//! The flow, on the handler's side:
//! 1. [`Vault::forward_claim`] with the key and the [`forward_request_hash`]
//!    of the request as the caller sent it. [`IdempotentClaim::Replay`]:
//!    answer with it, release nothing. [`IdempotentClaim::Fresh`]: go on.
//! 2. If the call never reaches the upstream (a token refused, a body that
//!    cannot be rendered, the upstream unreachable before anything was
//!    sent): [`Vault::forward_key_release`], so the caller may try again
//!    with the same key.
//! 3. Once the upstream answered and its answer was re-tokenized:
//!    [`Vault::forward_complete`]; then relay the answer.
//!
//! A claim that is neither completed nor released (the vault stopped, the
//! store failed, the call timed out after it was sent) stays pending: a
//! repeat is refused `idempotency_key_in_use` until `stale_after`, then
//! `upstream_outcome_unknown`, for good: the acquirer may have the payment
//! and only the caller can find out.
//!
//! Invariants: the raw key is never stored or logged (its SHA-256 is, per
//! principal and upstream), and a key that looks like a card number is
//! refused; the same key with another request is refused
//! (`idempotency_key_reused`) whatever its state; of concurrent claims of a
//! key exactly one is fresh (the store's primary key decides); a stored
//! answer's body is sealed, its associated data binding the row's
//! principal, upstream, key and request hashes, the answer's tenant,
//! status, content type and location and the DEK version (opened after a
//! rotation by that version); a content type or location that holds a
//! card number is not stored; a replay and every refusal is audited.

use std::time::Duration;

use audit::{Action, AuditEvent, Outcome};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{ForwardTarget, RequestContext, Vault, VaultError};
use crate::access::Role;
use crate::crypto::ForwardAnswerAad;
use crate::pan::contains_pan_like;
use crate::store::{
    now_millis, ForwardClaim, ForwardKeyRow, ForwardKeyState, KeyPurpose, StoredForwardAnswer,
};

/// How long a completed call's answer is kept (and a key remembered).
pub const FORWARD_ANSWER_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Keys deleted per purge transaction.
const PURGE_BATCH: u32 = 500;

/// SHA-256 of a forwarded request as the caller sent it: method, path (the
/// upstream's name and the path after it), content type and body (with its
/// placeholders: tokens, not card data), each length-prefixed so no two
/// requests share an encoding.
pub fn forward_request_hash(method: &str, path: &str, content_type: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cardvault/forward-request/v1\0");
    for part in [
        method.as_bytes(),
        path.as_bytes(),
        content_type.as_bytes(),
        body,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// What [`Vault::forward_claim`] decided.
#[derive(Debug)]
pub enum IdempotentClaim {
    /// The key is this call's: make the call, then complete or release it.
    Fresh(ClaimHandle),
    /// A completed call with this key and request: answer with it.
    Replay(StoredAnswer),
}

/// A claimed key. Complete it ([`Vault::forward_complete`]) or release it
/// ([`Vault::forward_key_release`]); dropped, it stays pending (a repeat
/// is `idempotency_key_in_use`, then `upstream_outcome_unknown`). Holds
/// hashes only.
#[derive(Debug)]
#[must_use = "complete or release the claim"]
pub struct ClaimHandle {
    principal_id: String,
    upstream: String,
    key_hash: String,
    request_hash: String,
    created_at: i64,
}

/// A stored answer, opened. `Debug` shows no body.
pub struct StoredAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub location: Option<String>,
    /// The tenant of the original call's tokens.
    pub tenant: String,
    /// Re-tokenized (no card number), in a zeroizing buffer all the same.
    pub body: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for StoredAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredAnswer")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("tenant", &self.tenant)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// The answer to store: the upstream's status and headers, and its body
/// with every card number replaced by a token.
#[derive(Clone, Copy)]
pub struct ForwardAnswer<'a> {
    /// The tenant of the call's tokens (`ForwardRelease::tenant`).
    pub tenant: &'a str,
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub location: Option<&'a str>,
    pub body: &'a [u8],
}

impl std::fmt::Debug for ForwardAnswer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardAnswer")
            .field("tenant", &self.tenant)
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// 1 to 255 visible ASCII characters (no space, no control), nothing that
/// looks like a card number (its unkeyed hash is stored).
fn valid_key(key: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_graphic())
        && !contains_pan_like(key)
}

/// A header value that may be stored in clear: none with a card number.
fn clean_header(value: Option<&str>) -> Option<&str> {
    value.filter(|v| {
        !contains_pan_like(v) && crate::forward::find_card_numbers(v.as_bytes()).is_empty()
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn answer_aad<'a>(
    principal_id: &'a str,
    upstream: &'a str,
    key_hash: &'a str,
    request_hash: &'a str,
    answer: &'a StoredForwardAnswer,
) -> ForwardAnswerAad<'a> {
    ForwardAnswerAad {
        principal_id,
        upstream,
        key_hash,
        request_hash,
        tenant: &answer.tenant,
        status: answer.status,
        content_type: answer.content_type.as_deref(),
        location: answer.location.as_deref(),
        key_version: answer.key_version,
    }
}

impl Vault {
    /// Claim `key` for a forwarded call of the caller's principal to
    /// `target.upstream`, for the request whose [`forward_request_hash`] is
    /// `request_hash`. Fresh: the call is this one's. Replay: a completed
    /// call with the same key and request (audited `forward_completed`,
    /// detail `idempotent_replay`). Refused (audited `forward`):
    /// `invalid_idempotency_key`, `idempotency_key_reused` (another
    /// request), `idempotency_key_in_use` (pending, claimed less than
    /// `stale_after` ago: retry shortly), `upstream_outcome_unknown`
    /// (pending for longer: the vault stopped during the call; never sent
    /// again). `stale_after` must exceed the longest a call can take
    /// (the upstream's timeout and the re-tokenization of its answer).
    pub async fn forward_claim(
        &self,
        ctx: &RequestContext,
        target: ForwardTarget<'_>,
        key: &str,
        request_hash: [u8; 32],
        stale_after: Duration,
    ) -> Result<IdempotentClaim, VaultError> {
        self.require_role(ctx, Action::Forward, &[Role::Forward])
            .await?;
        let base = ctx.event(Action::Forward, Outcome::Failure).detail(format!(
            "upstream {} path {} idempotency_key",
            target.upstream, target.path_pattern
        ));
        if !valid_key(key) {
            return Err(self.fail(base, VaultError::InvalidIdempotencyKey).await);
        }
        let now = now_millis();
        let row = ForwardKeyRow {
            principal_id: ctx.principal.id.clone(),
            upstream: target.upstream.to_owned(),
            key_hash: hex(&Sha256::digest(key.as_bytes())),
            request_hash: hex(&request_hash),
            state: ForwardKeyState::Pending,
            created_at: now,
            completed_at: None,
            answer: None,
        };
        let expired_before = now.saturating_sub(millis(FORWARD_ANSWER_TTL));
        let existing = match self.store.claim_forward_key(&row, expired_before).await? {
            ForwardClaim::Claimed => {
                return Ok(IdempotentClaim::Fresh(ClaimHandle {
                    principal_id: row.principal_id,
                    upstream: row.upstream,
                    key_hash: row.key_hash,
                    request_hash: row.request_hash,
                    created_at: row.created_at,
                }))
            }
            ForwardClaim::Existing(existing) => *existing,
        };
        if existing.request_hash != row.request_hash {
            return Err(self.fail(base, VaultError::IdempotencyKeyReused).await);
        }
        let answer = match (existing.state, &existing.answer) {
            (ForwardKeyState::Completed, Some(answer)) => answer,
            (ForwardKeyState::Completed, None) => {
                return Err(self
                    .fail(base.detail("integrity"), VaultError::Integrity)
                    .await)
            }
            (ForwardKeyState::Pending, _) => {
                let age = now.saturating_sub(existing.created_at);
                if age < millis(stale_after) {
                    return Err(self.fail(base, VaultError::IdempotencyKeyInUse).await);
                }
                tracing::warn!(
                    principal = %ctx.principal.name,
                    upstream = %target.upstream,
                    request_id = %ctx.request_id,
                    claimed_ms_ago = age,
                    "a forwarded call with this Idempotency-Key was sent and never completed: its outcome at the upstream is unknown"
                );
                return Err(self.fail(base, VaultError::UpstreamOutcomeUnknown).await);
            }
        };
        let base = base.tenant(answer.tenant.clone());
        let body = match self.open_answer(&existing, answer).await {
            Ok(body) => body,
            Err(e) => return Err(self.fail(base.detail("integrity"), e).await),
        };
        let event = AuditEvent {
            action: Action::ForwardCompleted,
            outcome: Outcome::Success,
            ..base
        }
        .detail(format!(
            "upstream {} path {} status {} idempotent_replay",
            target.upstream, target.path_pattern, answer.status
        ));
        self.write_event(event).await?;
        Ok(IdempotentClaim::Replay(StoredAnswer {
            status: answer.status,
            content_type: answer.content_type.clone(),
            location: answer.location.clone(),
            tenant: answer.tenant.clone(),
            body,
        }))
    }

    /// Store the answer of the claimed call, sealed under the active DEK.
    /// False: the claim was no longer pending (nothing stored; relay the
    /// answer all the same). A content type or location with a card number
    /// in it is not stored (nor relayed: see the handler).
    pub async fn forward_complete(
        &self,
        handle: ClaimHandle,
        answer: ForwardAnswer<'_>,
    ) -> Result<bool, VaultError> {
        let keys = self.keys.keys();
        let dek = keys.active_dek();
        let mut stored = StoredForwardAnswer {
            tenant: answer.tenant.to_owned(),
            status: answer.status,
            content_type: clean_header(answer.content_type).map(str::to_owned),
            location: clean_header(answer.location).map(str::to_owned),
            key_version: dek.version(),
            nonce: Vec::new(),
            ciphertext: Vec::new(),
        };
        let aad = answer_aad(
            &handle.principal_id,
            &handle.upstream,
            &handle.key_hash,
            &handle.request_hash,
            &stored,
        );
        let sealed = dek.seal(&aad, answer.body).map_err(|_| VaultError::Rng)?;
        stored.nonce = sealed.nonce.to_vec();
        stored.ciphertext = sealed.ciphertext;
        let done = self
            .store
            .complete_forward_key(
                &handle.principal_id,
                &handle.upstream,
                &handle.key_hash,
                handle.created_at,
                now_millis(),
                &stored,
            )
            .await?;
        if !done {
            tracing::warn!(
                upstream = %handle.upstream,
                "a forwarded call's answer was not stored: its Idempotency-Key claim is gone"
            );
        }
        Ok(done)
    }

    /// Let go of a claim whose call never reached the upstream: the key is
    /// free again. False: it was not pending any more.
    pub async fn forward_key_release(&self, handle: ClaimHandle) -> Result<bool, VaultError> {
        Ok(self
            .store
            .release_forward_key(
                &handle.principal_id,
                &handle.upstream,
                &handle.key_hash,
                handle.created_at,
            )
            .await?)
    }

    /// Delete keys claimed more than [`FORWARD_ANSWER_TTL`] ago, with their
    /// answers, in batches; audited with the count
    /// (`forward_keys_expired`). Returns how many went.
    pub async fn purge_forward_keys(&self, actor: &str) -> Result<u64, VaultError> {
        let before = now_millis().saturating_sub(millis(FORWARD_ANSWER_TTL));
        let actor = actor.to_owned();
        let event = move |n: u64| {
            AuditEvent::new(Action::ForwardKeysExpired, Outcome::Success)
                .source(actor.clone())
                .detail(format!("deleted={n}"))
        };
        let mut total = 0;
        loop {
            let n = self
                .store
                .purge_forward_keys(before, PURGE_BATCH, &event)
                .await?;
            total += n;
            if n < u64::from(PURGE_BATCH) {
                return Ok(total);
            }
        }
    }

    /// Open a stored answer with the DEK of its version (reloading the keys
    /// once for a version this instance does not know: another rotated).
    async fn open_answer(
        &self,
        row: &ForwardKeyRow,
        answer: &StoredForwardAnswer,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let version = answer.key_version;
        let mut keys = self.keys.keys();
        if keys.dek(version).is_none() && keys.state(KeyPurpose::Dek, version).is_none() {
            self.refresh_keys().await?;
            keys = self.keys.keys();
        }
        let dek = super::dek_of(&keys, version)?;
        let sealed = super::sealed_of(&answer.nonce, &answer.ciphertext)?;
        let aad = answer_aad(
            &row.principal_id,
            &row.upstream,
            &row.key_hash,
            &row.request_hash,
            answer,
        );
        dek.open(&aad, &sealed).map_err(|_| VaultError::Integrity)
    }
}
