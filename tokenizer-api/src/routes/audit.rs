//! The auditors' routes (admin listener, role `auditor`): the trail's
//! entries (`GET /v1/audit/events`, every query itself audited) and the
//! signed checkpoints with the key that verifies them.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use audit::Action;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use vault::Role;

use crate::auth::authenticate;
use crate::error::ApiError;
use crate::state::AppState;

/// Query parameters of `GET /v1/audit/events`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditParams {
    /// Entries after this chain number (the previous page's `next_after`).
    #[param(maximum = 9223372036854775807_u64)]
    after: Option<u64>,
    /// Entries per page (default 100; clamped to 1..1000).
    #[param(value_type = Option<u64>, maximum = 4294967295_u64)]
    limit: Option<u32>,
    principal: Option<String>,
    token: Option<String>,
    /// An audit action name (`tokenize`, `detokenize`, ...).
    action: Option<String>,
    tenant: Option<String>,
    /// `success`, `denied` or `failure`.
    outcome: Option<String>,
    /// RFC 3339, inclusive.
    #[param(format = DateTime)]
    from: Option<String>,
    /// RFC 3339, exclusive.
    #[param(format = DateTime)]
    to: Option<String>,
}

fn parse_time(v: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    v.map(|t| OffsetDateTime::parse(t, &Rfc3339))
        .transpose()
        .map_err(|_| {
            ApiError::Vault(vault::VaultError::InvalidFilter(
                "from and to are RFC 3339 times",
            ))
        })
}

/// One entry of the trail, as `audit::ChainedEvent` serializes it (the
/// document's description of that type; schemathesis checks real answers
/// against it).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct AuditEntry {
    /// Gap-free chain number, from 1.
    seq: u64,
    event: AuditEventBody,
    /// SHA-256 leaf hash, hex.
    leaf_hash: String,
    /// SHA-256 chain hash, hex.
    chain_hash: String,
}

/// An audit event: never a card number.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct AuditEventBody {
    /// RFC 3339, UTC.
    time: String,
    principal: Option<String>,
    /// `ip:port` of the request, or `local`.
    source: Option<String>,
    action: String,
    tenant: Option<String>,
    token: Option<String>,
    /// `success`, `denied` or `failure`.
    outcome: String,
    error_code: Option<String>,
    request_id: Option<String>,
    reason: Option<String>,
    detail: Option<String>,
}

/// A page of entries.
#[derive(Serialize, ToSchema)]
pub(crate) struct AuditPage {
    #[schema(value_type = Vec<AuditEntry>)]
    events: Vec<audit::ChainedEvent>,
    /// Pass as `after` for the next page.
    next_after: u64,
}

/// `GET /v1/audit/events` (role `auditor`): filtered, paginated by chain
/// number, each query audited. Entries carry their leaf and chain hashes.
#[utoipa::path(get, path = "/v1/audit/events", tag = "audit",
    params(AuditParams),
    responses((status = 200, description = "A page of entries (`Cache-Control: no-store`).", body = AuditPage)))]
pub async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault
        .require_role(&ctx, Action::AuditRead, &[Role::Auditor])
        .await?;
    let params = web::Query::<AuditParams>::from_query(req.query_string())
        .map_err(|_| {
            ApiError::Vault(vault::VaultError::InvalidFilter(
                "unknown or malformed query parameter",
            ))
        })?
        .into_inner();
    let bad = |what| ApiError::Vault(vault::VaultError::InvalidFilter(what));
    let query = vault::AuditQuery {
        filter: vault::store::AuditFilter {
            principal: params.principal,
            token: params.token,
            action: params
                .action
                .map(|a| audit::Action::parse(&a).ok_or(bad("unknown action")))
                .transpose()?,
            tenant: params.tenant,
            outcome: params
                .outcome
                .map(|o| audit::Outcome::parse(&o).ok_or(bad("unknown outcome")))
                .transpose()?,
        },
        from: parse_time(params.from.as_deref())?,
        to: parse_time(params.to.as_deref())?,
        // Chain numbers are stored as signed 64-bit integers.
        after: match params.after {
            Some(after) if i64::try_from(after).is_err() => {
                return Err(bad("after is beyond the largest chain number"))
            }
            after => after.unwrap_or(0),
        },
        limit: params.limit.unwrap_or(100),
    };
    let page = vault.audit_query(&ctx, query).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(AuditPage {
            events: page.events,
            next_after: page.next_after,
        }))
}

/// A signed checkpoint, as `audit::Checkpoint` serializes it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct CheckpointBody {
    /// Entries covered (1..=tree_size).
    tree_size: u64,
    /// Merkle tree hash of their leaf hashes, hex.
    root: String,
    /// Chain hash of entry `tree_size`, hex.
    chain_head: String,
    /// RFC 3339, UTC.
    time: String,
    /// Id of the signing key: the first 8 bytes of SHA-256 of its public
    /// key, hex.
    key_id: String,
    /// Only on a key announcement (a signing key rotation): the new public
    /// key (`cardvault-audit-ed25519:<hex>`), which signs every later
    /// checkpoint. Signed by the old key over the v2 layout.
    #[schema(nullable = false)]
    next_key: Option<String>,
    /// Ed25519 signature, hex.
    signature: String,
}

/// Every checkpoint and the keys that verify them.
#[derive(Serialize, ToSchema)]
pub(crate) struct Checkpoints<'a> {
    /// The Ed25519 public key that signs now.
    public_key: &'a str,
    /// Every signing key generation's public key, oldest first (also in
    /// `<data-dir>/audit-verify.pub`). After a rotation the checkpoints
    /// name their key (`key_id`), and the old key's announcement
    /// (`next_key`) names the new one.
    public_keys: Vec<String>,
    #[schema(value_type = Vec<CheckpointBody>)]
    checkpoints: Vec<audit::Checkpoint>,
}

/// `GET /v1/audit/checkpoints` (role `auditor`): every signed checkpoint and
/// the public key that verifies them.
#[utoipa::path(get, path = "/v1/audit/checkpoints", tag = "audit",
    responses((status = 200, description = "The checkpoints and the public key.", body = Checkpoints)))]
pub async fn checkpoints(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    let checkpoints = vault.audit_checkpoints(&ctx).await?;
    let public_key = vault.audit_public_key();
    Ok(HttpResponse::Ok().json(Checkpoints {
        public_key: &public_key,
        public_keys: vault.audit_public_keys(),
        checkpoints,
    }))
}
