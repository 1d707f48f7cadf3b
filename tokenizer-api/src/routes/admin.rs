//! The key administrators' routes (admin listener, role `key_admin`):
//! unseal, seal and the seal state, the vault keys (status, rotation,
//! retirement, destruction) and the KEK (rotation, destruction). They
//! authenticate from the store alone, so they work while sealed.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use audit::Action;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::body::{read_json, SecretString};
use super::rfc3339_millis;
use crate::auth::admin_context;
use crate::error::ApiError;
use crate::seal::SealStatus;
use crate::state::AppState;

/// `POST /v1/admin/unseal`: a custodian's passphrase (keyring backend), or
/// `{}` (HSM login, KEK file).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnsealRequest {
    custodian: Option<String>,
    #[schema(value_type = Option<String>)]
    passphrase: Option<SecretString>,
}

/// `POST /v1/admin/unseal` (role `key_admin`): one custodian's passphrase
/// (keyring backend), or a new login to the HSM / a new read of the KEK
/// file (other backends, empty body `{}`). Every attempt is audited by
/// custodian name, never the passphrase.
#[utoipa::path(post, path = "/v1/admin/unseal", tag = "admin",
    request_body = UnsealRequest,
    responses((status = 200, description = "The seal state after the attempt.", body = SealStatus)))]
pub async fn unseal(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::UnsealAttempt).await?;
    let body: UnsealRequest = read_json(&req, payload, state.max_body_bytes).await?;
    let passphrase = body.passphrase.as_ref().map(|p| p.0.as_str());
    let status = state
        .seal
        .unseal(&ctx, body.custodian.as_deref(), passphrase)
        .await?;
    Ok(HttpResponse::Ok().json(status))
}

/// `POST /v1/admin/seal` (role `key_admin`): drop every key from memory.
#[utoipa::path(post, path = "/v1/admin/seal", tag = "admin",
    responses((status = 200, description = "Sealed.", body = SealStatus)))]
pub async fn seal(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::Sealed).await?;
    let status = state.seal.seal(&ctx).await?;
    Ok(HttpResponse::Ok().json(status))
}

/// `GET /v1/admin/seal-status` (role `key_admin`).
#[utoipa::path(get, path = "/v1/admin/seal-status", tag = "admin",
    responses((status = 200, description = "The seal state.", body = SealStatus)))]
pub async fn seal_status(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_context(&req, &state, Action::UnsealAttempt).await?;
    Ok(HttpResponse::Ok().json(state.seal.status()))
}

/// One key version's status.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyJson {
    /// `dek` or `fingerprint`.
    #[schema(value_type = String)]
    purpose: &'static str,
    version: u32,
    /// `active`, `decrypt_only`, `retired` or `destroyed`.
    #[schema(value_type = String)]
    state: &'static str,
    /// RFC 3339.
    created_at: String,
    age_days: f64,
    crypto_period_days: f64,
    past_crypto_period: bool,
    retired_at: Option<String>,
    destroyed_at: Option<String>,
    /// Records sealed under it.
    records: u64,
}

impl KeyJson {
    fn new(k: &vault::KeyInfo) -> KeyJson {
        const DAY: f64 = 86_400.0;
        KeyJson {
            purpose: k.purpose.as_str(),
            version: k.version,
            state: k.state.as_str(),
            created_at: rfc3339_millis(k.created_at),
            age_days: (k.age.as_secs_f64() / DAY * 10.0).round() / 10.0,
            crypto_period_days: (k.crypto_period.as_secs_f64() / DAY).round(),
            past_crypto_period: k.past_crypto_period,
            retired_at: k.retired_at.map(rfc3339_millis),
            destroyed_at: k.destroyed_at.map(rfc3339_millis),
            records: k.records,
        }
    }
}

/// One audit signing key generation.
#[derive(Serialize, ToSchema)]
pub(crate) struct SigningKeyJson {
    generation: u32,
    /// First 8 bytes of SHA-256 of the public key, hex (in every
    /// checkpoint it signed).
    key_id: String,
    /// `cardvault-audit-ed25519:<hex>`.
    public_key: String,
    /// `active` (signs checkpoints), `retired` (replaced by a rotation; it
    /// signs nothing more) or `destroyed` (secret erased; the public key
    /// stays, to verify what it signed).
    #[schema(value_type = String)]
    state: &'static str,
    /// RFC 3339.
    created_at: String,
    age_days: f64,
    crypto_period_days: f64,
    past_crypto_period: bool,
    retired_at: Option<String>,
    destroyed_at: Option<String>,
}

impl SigningKeyJson {
    fn new(k: &vault::SigningKeyInfo) -> Self {
        const DAY: f64 = 86_400.0;
        SigningKeyJson {
            generation: k.generation,
            key_id: k.key_id.clone(),
            public_key: k.public_key.clone(),
            state: k.state.as_str(),
            created_at: rfc3339_millis(k.created_at),
            age_days: (k.age.as_secs_f64() / DAY * 10.0).round() / 10.0,
            crypto_period_days: (k.crypto_period.as_secs_f64() / DAY).round(),
            past_crypto_period: k.past_crypto_period,
            retired_at: k.retired_at.map(rfc3339_millis),
            destroyed_at: k.destroyed_at.map(rfc3339_millis),
        }
    }
}

/// Every key and the re-encryption progress.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyStatus {
    active_dek: u32,
    active_fingerprint: u32,
    /// Records still under an older key.
    remaining: u64,
    /// RFC 3339: when the last pass finished.
    reencrypted_at: Option<String>,
    keys: Vec<KeyJson>,
    /// The audit checkpoint signing key generations, oldest first.
    audit_signing_keys: Vec<SigningKeyJson>,
}

/// `GET /v1/admin/keys` (role `key_admin`): every key's version, state,
/// age, crypto-period and records, and the re-encryption progress.
#[utoipa::path(get, path = "/v1/admin/keys", tag = "admin",
    responses((status = 200, description = "Key status (`Cache-Control: no-store`).", body = KeyStatus)))]
pub async fn key_status(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_context(&req, &state, Action::KeyRotated).await?;
    let vault = state.vault()?;
    let status = vault.key_status(state.crypto_periods).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(KeyStatus {
            active_dek: status.active_dek,
            active_fingerprint: status.active_fingerprint,
            remaining: status.remaining,
            reencrypted_at: status.reencrypted_at.map(rfc3339_millis),
            keys: status.keys.iter().map(KeyJson::new).collect(),
            audit_signing_keys: status
                .signing_keys
                .iter()
                .map(SigningKeyJson::new)
                .collect(),
        }))
}

/// `POST /v1/admin/keys/rotate`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateRequest {
    /// Also rotate the fingerprint key (re-fingerprinting in the same pass).
    #[serde(default)]
    fingerprint: bool,
}

/// The new active versions.
#[derive(Serialize, ToSchema)]
pub(crate) struct Rotation {
    dek_version: u32,
    fingerprint_version: u32,
    fingerprint_rotated: bool,
}

/// `POST /v1/admin/keys/rotate` `{"fingerprint": bool}` (role `key_admin`):
/// a new active DEK (and fingerprint key); the background pass moves every
/// record to it.
#[utoipa::path(post, path = "/v1/admin/keys/rotate", tag = "admin",
    request_body = RotateRequest,
    responses((status = 200, description = "Rotated.", body = Rotation)))]
pub async fn rotate_keys(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::KeyRotated).await?;
    let body: RotateRequest = read_json(&req, payload, state.max_body_bytes).await?;
    let vault = state.vault()?;
    let rotation = vault
        .rotate_dek(vault::Actor::Request(&ctx), body.fingerprint)
        .await?;
    Ok(HttpResponse::Ok().json(Rotation {
        dek_version: rotation.dek_version,
        fingerprint_version: rotation.fingerprint_version,
        fingerprint_rotated: rotation.fingerprint_rotated,
    }))
}

/// The new audit signing key.
#[derive(Serialize, ToSchema)]
pub(crate) struct SigningRotated {
    generation: u32,
    key_id: String,
    /// `cardvault-audit-ed25519:<hex>`.
    public_key: String,
    /// The key it replaces (now retired: it signs nothing more).
    previous_key_id: String,
    /// The key announcement: the checkpoint for this many entries, signed
    /// by the previous key, names the new one (also appended to the
    /// witness file).
    announced_at_tree_size: u64,
}

/// `POST /v1/admin/keys/audit_signing/rotate` (role `key_admin`): a new
/// audit checkpoint signing key. The old key signs a key announcement (a
/// checkpoint naming the new key) in the same transaction as the
/// `key_rotated` event and is retired; every later checkpoint is signed by
/// the new key. Auditors verify from the first key alone.
#[utoipa::path(post, path = "/v1/admin/keys/audit_signing/rotate", tag = "admin",
    responses((status = 200, description = "Rotated.", body = SigningRotated)))]
pub async fn rotate_audit_signing(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::KeyRotated).await?;
    let vault = state.vault()?;
    let r = state.seal.rotate_audit_signing(&vault, &ctx).await?;
    Ok(HttpResponse::Ok().json(SigningRotated {
        generation: r.generation,
        key_id: r.key_id,
        public_key: r.public_key,
        previous_key_id: r.previous_key_id,
        announced_at_tree_size: r.announcement.tree_size,
    }))
}

/// The `{purpose}/{version}` of a key route; 404 for anything else.
fn key_path(path: &(String, String)) -> Result<(vault::store::KeyPurpose, u32), ApiError> {
    let purpose = vault::store::KeyPurpose::parse(&path.0).ok_or(ApiError::NotFound)?;
    let version = path.1.parse().map_err(|_| ApiError::NotFound)?;
    Ok((purpose, version))
}

/// A key version's new state.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyChanged {
    #[schema(value_type = String)]
    purpose: &'static str,
    version: u32,
    /// `retired` or `destroyed`.
    #[schema(value_type = String)]
    state: &'static str,
}

/// `POST /v1/admin/keys/{purpose}/{version}/retire` (role `key_admin`).
#[utoipa::path(post, path = "/v1/admin/keys/{purpose}/{version}/retire", tag = "admin",
    params(
        ("purpose" = String, Path, description = "`dek` or `fingerprint` (`audit_signing`: retired by its rotation, so `key_active` or `key_state`)."),
        ("version" = String, Path, description = "The key version."),
    ),
    responses((status = 200, description = "Retired.", body = KeyChanged)))]
pub async fn retire_key(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    change_key(req, &path, &state, Action::KeyRetired).await
}

/// `POST /v1/admin/keys/{purpose}/{version}/destroy` (role `key_admin`):
/// crypto-shred a retired key.
#[utoipa::path(post, path = "/v1/admin/keys/{purpose}/{version}/destroy", tag = "admin",
    params(
        ("purpose" = String, Path, description = "`dek`, `fingerprint` or `audit_signing` (the version is the signing key generation)."),
        ("version" = String, Path, description = "The key version."),
    ),
    responses((status = 200, description = "Destroyed.", body = KeyChanged)))]
pub async fn destroy_key(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    change_key(req, &path, &state, Action::KeyDestroyed).await
}

/// Retire (`KeyRetired`) or destroy (`KeyDestroyed`) one key version.
async fn change_key(
    req: HttpRequest,
    path: &(String, String),
    state: &AppState,
    action: Action,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, state, action).await?;
    if path.0 == "audit_signing" {
        return change_signing_key(&ctx, &path.1, state, action).await;
    }
    let (purpose, version) = key_path(path)?;
    let vault = state.vault()?;
    let actor = vault::Actor::Request(&ctx);
    let new_state = if action == Action::KeyDestroyed {
        vault.destroy(actor, purpose, version).await?;
        "destroyed"
    } else {
        vault.retire(actor, purpose, version).await?;
        "retired"
    };
    Ok(HttpResponse::Ok().json(KeyChanged {
        purpose: purpose.as_str(),
        version,
        state: new_state,
    }))
}

/// Destroy an audit signing key generation (`audit_signing/{generation}`).
/// Retiring one is the rotation's part: a signing key is retired when its
/// successor is announced, so `retire` answers `key_state` for a retired
/// one and `key_active` for the one that signs.
async fn change_signing_key(
    ctx: &vault::RequestContext,
    generation: &str,
    state: &AppState,
    action: Action,
) -> Result<HttpResponse, ApiError> {
    let generation: u32 = generation.parse().map_err(|_| ApiError::NotFound)?;
    let vault = state.vault()?;
    if action == Action::KeyDestroyed {
        vault
            .destroy_audit_signing(vault::Actor::Request(ctx), generation)
            .await?;
        return Ok(HttpResponse::Ok().json(KeyChanged {
            purpose: "audit_signing",
            version: generation,
            state: "destroyed",
        }));
    }
    // Always refused (and the refusal audited): see the doc above.
    match vault
        .retire_audit_signing(vault::Actor::Request(ctx), generation)
        .await
    {
        Ok(never) => match never {},
        Err(e) => Err(e.into()),
    }
}

/// The KEK version now in use.
#[derive(Serialize, ToSchema)]
pub(crate) struct KekRotated {
    kek_id: String,
}

/// `POST /v1/admin/kek/rotate` (role `key_admin`): a new KEK version (in
/// the keyring or the HSM) and every stored key re-wrapped under it.
#[utoipa::path(post, path = "/v1/admin/kek/rotate", tag = "admin",
    responses((status = 200, description = "Rotated.", body = KekRotated)))]
pub async fn rotate_kek(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::KekRotated).await?;
    let kek_id = state.seal.rotate_kek(&ctx).await?;
    Ok(HttpResponse::Ok().json(KekRotated { kek_id }))
}

/// `POST /v1/admin/kek/destroy`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DestroyKekRequest {
    kek_id: String,
}

/// A destroyed KEK version.
#[derive(Serialize, ToSchema)]
pub(crate) struct KekDestroyed {
    kek_id: String,
    /// `destroyed`.
    #[schema(value_type = String)]
    state: &'static str,
}

/// `POST /v1/admin/kek/destroy` `{"kek_id"}` (role `key_admin`): destroy an
/// old KEK version that nothing is wrapped under any more.
#[utoipa::path(post, path = "/v1/admin/kek/destroy", tag = "admin",
    request_body = DestroyKekRequest,
    responses((status = 200, description = "Destroyed.", body = KekDestroyed)))]
pub async fn destroy_kek(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::KeyDestroyed).await?;
    let body: DestroyKekRequest = read_json(&req, payload, state.max_body_bytes).await?;
    state.seal.destroy_kek(&ctx, &body.kek_id).await?;
    Ok(HttpResponse::Ok().json(KekDestroyed {
        kek_id: body.kek_id,
        state: "destroyed",
    }))
}

/// `GET /v1/admin/upstreams`.
#[derive(Serialize, ToSchema)]
pub(crate) struct UpstreamList {
    upstreams: Vec<crate::upstream::UpstreamInfo>,
}

/// `GET /v1/admin/upstreams` (role `key_admin` or `auditor`): the
/// forwarding proxy's upstreams as configured now (reloaded on SIGHUP).
#[utoipa::path(get, path = "/v1/admin/upstreams", tag = "admin",
    responses((status = 200, description = "The configured upstreams.", body = UpstreamList)))]
pub async fn upstreams(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    crate::auth::admin_context_for(
        &req,
        &state,
        Action::Forward,
        &[vault::Role::KeyAdmin, vault::Role::Auditor],
    )
    .await?;
    Ok(HttpResponse::Ok().json(UpstreamList {
        upstreams: state.upstreams.current().listing(),
    }))
}
