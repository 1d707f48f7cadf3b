//! The card vault: the only crate that ever holds a decrypted PAN.
//!
//! It owns the card data model and its validation ([`Pan`], [`Brand`],
//! [`Expiry`], [`CardholderName`], [`Tenant`], [`Token`]), envelope encryption
//! of card records and keyed fingerprints ([`crypto`]), the vault's own keys
//! unwrapped through the KEK of `hsm-shim` ([`keys`]), principals and API
//! keys ([`access`]), storage behind one trait ([`store`]), and the
//! operations that tie them together with the audit trail ([`Vault`]),
//! backups of all of it ([`backup`]), the audit trail's retention
//! ([`archive`]), and the pure core of the forwarding proxy ([`forward`]).
//!
//! Public API, in the order a caller meets it:
//! - [`store::sqlite::SqliteStore::open`] then [`Vault::open`] with a KEK;
//! - [`access::Authenticator`]: an API key or a client-certificate identity
//!   into a [`Principal`] (no vault key needed: works sealed);
//! - [`Vault::tokenize`], [`Vault::tokenize_many`] (and `_with` a token
//!   format and expiry), [`Vault::detokenize`], [`Vault::metadata`],
//!   [`Vault::update`], [`Vault::delete`] with a [`RequestContext`];
//! - [`Vault::detokenize_monitored`] with a [`monitor::DetokenizeMonitor`]:
//!   rate limits and the anomaly rule of detokenize (for the fleet on a
//!   store with [`store::Store::shared_monitoring`], else per process);
//! - hosted collection ([`collect`]): [`Vault::create_collect_session`],
//!   [`Vault::collect_session`] (checkout server),
//!   [`Vault::collect_session_public`] and
//!   [`Vault::complete_collect_session`] (the edge, role `collect`),
//!   [`Vault::purge_collect_sessions`];
//! - key lifecycle ([`rotation`]): [`Vault::rotate_dek`],
//!   [`Vault::reencrypt_batch`], [`Vault::retire`], [`Vault::destroy`],
//!   [`Vault::rotate_kek`], [`Vault::key_status`], [`Vault::refresh_keys`];
//! - forwarding ([`forward`], pure: no I/O): [`BodyKind::from_content_type`],
//!   [`Template::parse`] of a body with `{{<token>.<field>}}` placeholders,
//!   [`Template::tokens`] and [`Template::fields_of`] (what to fetch),
//!   [`Template::render`] (values escaped for the body's kind, into a
//!   zeroizing buffer); on the answer [`forward::find_card_numbers`] then
//!   [`forward::replace_card_numbers`]; errors [`TemplateError`] (stable
//!   `code()`, never a value);
//! - idempotent forwarding (`Idempotency-Key`): [`Vault::forward_claim`]
//!   before anything is released ([`IdempotentClaim::Fresh`]: call, then
//!   [`Vault::forward_complete`] with the re-tokenized answer, or
//!   [`Vault::forward_key_release`] if nothing was sent;
//!   [`IdempotentClaim::Replay`]: answer from it), the request's
//!   [`forward_request_hash`], [`Vault::purge_forward_keys`];
//! - errors are [`VaultError`] (with a stable `code()`), per-card errors
//!   [`CardError`].
//!
//! Invariants: a PAN exists in clear only inside a [`Pan`] (zeroized, redacted
//! `Debug`, no `Display`/`Serialize`) or a zeroizing buffer; it is never
//! logged, never sent to `hsm-shim`, never in an audit event.
#![forbid(unsafe_code)]

pub mod access;
pub mod archive;
pub mod backup;
pub mod brand;
pub mod card;
pub mod collect;
pub mod commit;
pub mod crypto;
pub mod cvc;
pub mod forward;
pub mod keys;
pub mod monitor;
pub mod pan;
pub mod rotation;
mod service;
pub mod store;
pub mod tenants;

pub use access::{Principal, Role, TenantScope};
pub use brand::Brand;
pub use card::{CardDataError, CardholderName, Expiry, Tenant, Token, TokenFormat};
pub use crypto::CardSecret;
pub use forward::{BodyKind, Field, Template, TemplateError};
pub use keys::KeysError;
pub use pan::{Pan, PanError};
pub use rotation::{
    Actor, CryptoPeriods, KeyInfo, KeyStatus, Progress, Rotation, SigningKeyInfo, SigningRotation,
};
pub use service::probe_commit;
pub use service::{
    forward_request_hash, ClaimHandle, ForwardAnswer, IdempotentClaim, StoredAnswer,
    FORWARD_ANSWER_TTL, MAX_IDEMPOTENCY_KEY_LEN,
};
pub use service::{
    AuditPage, AuditQuery, CardError, CardInput, CardUpdate, CollectSession, CollectSessionInput,
    Detokenized, ForwardOutcome, ForwardRelease, ForwardTarget, KeyLifecycleError,
    NewCollectSession, Released, RequestContext, SessionStatus, Submission, TokenInfo,
    TokenizeOptions, Vault, VaultError, VaultOptions, Wanted, MAX_BATCH, MAX_FORWARD_TOKENS,
};
