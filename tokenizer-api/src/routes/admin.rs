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
        ("purpose" = String, Path, description = "`dek` or `fingerprint`."),
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
        ("purpose" = String, Path, description = "`dek` or `fingerprint`."),
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
