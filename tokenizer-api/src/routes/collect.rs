//! Hosted card collection on the api listener: the checkout server opens a
//! session and reads it back (role `tokenize`), the edge reads a session's
//! public settings and completes it with the card the buyer typed (role
//! `collect`). The card form itself is served by the edge (`tokenizer
//! edge`), never by the vault.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vault::collect::CollectStyle;
use vault::{CardInput, CollectSession, CollectSessionInput, Submission};

use super::body::{read_json, SecretString};
use super::cards::TokenResponse;
use super::rfc3339_millis;
use crate::auth::authenticate;
use crate::error::ApiError;
use crate::state::AppState;

/// The allowed look of the form (every key optional).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StyleBody {
    /// `system`, `sans-serif`, `serif` or `monospace`.
    #[schema(value_type = Option<FontFamily>)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    font_family: Option<String>,
    #[schema(minimum = 10, maximum = 24)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    font_size_px: Option<u8>,
    #[schema(pattern = "^#[0-9A-Fa-f]{6}$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    color: Option<String>,
    #[schema(pattern = "^#[0-9A-Fa-f]{6}$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    background_color: Option<String>,
    #[schema(pattern = "^#[0-9A-Fa-f]{6}$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    border_color: Option<String>,
    #[schema(pattern = "^#[0-9A-Fa-f]{6}$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_color: Option<String>,
    #[schema(pattern = "^#[0-9A-Fa-f]{6}$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accent_color: Option<String>,
    #[schema(maximum = 16)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    border_radius_px: Option<u8>,
    /// Placeholder texts: 1 to 40 characters, no markup characters.
    #[schema(min_length = 1, max_length = 40)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    placeholder_number: Option<String>,
    #[schema(min_length = 1, max_length = 40)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    placeholder_expiry: Option<String>,
    #[schema(min_length = 1, max_length = 40)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    placeholder_cvc: Option<String>,
    #[schema(min_length = 1, max_length = 40)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    placeholder_name: Option<String>,
}

/// The fonts a form may use.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) enum FontFamily {
    #[schema(rename = "system")]
    System,
    #[schema(rename = "sans-serif")]
    SansSerif,
    #[schema(rename = "serif")]
    Serif,
    #[schema(rename = "monospace")]
    Monospace,
}

impl From<StyleBody> for CollectStyle {
    fn from(s: StyleBody) -> CollectStyle {
        CollectStyle {
            font_family: s.font_family,
            font_size_px: s.font_size_px,
            color: s.color,
            background_color: s.background_color,
            border_color: s.border_color,
            error_color: s.error_color,
            accent_color: s.accent_color,
            border_radius_px: s.border_radius_px,
            placeholder_number: s.placeholder_number,
            placeholder_expiry: s.placeholder_expiry,
            placeholder_cvc: s.placeholder_cvc,
            placeholder_name: s.placeholder_name,
        }
    }
}

impl From<CollectStyle> for StyleBody {
    fn from(s: CollectStyle) -> StyleBody {
        StyleBody {
            font_family: s.font_family,
            font_size_px: s.font_size_px,
            color: s.color,
            background_color: s.background_color,
            border_color: s.border_color,
            error_color: s.error_color,
            accent_color: s.accent_color,
            border_radius_px: s.border_radius_px,
            placeholder_number: s.placeholder_number,
            placeholder_expiry: s.placeholder_expiry,
            placeholder_cvc: s.placeholder_cvc,
            placeholder_name: s.placeholder_name,
        }
    }
}

/// `POST /v1/collect/sessions`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSessionRequest {
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$", example = "shop-42")]
    tenant: String,
    /// Exactly one origin (scheme, host, optional port): https only (http
    /// on loopback in `--dev`). The only site the browser will show the
    /// form in (`frame-ancestors`), and the only one told the token.
    #[schema(example = "https://shop.example")]
    allowed_origin: String,
    /// 1 to 900 (default 600).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 900)]
    ttl_secs: Option<i64>,
    /// The form asks for the security code (held once, as `POST /v1/tokens`
    /// holds it).
    #[serde(default)]
    require_cvc: bool,
    /// `random` (default) or `pan_shaped`.
    #[serde(default)]
    #[schema(value_type = Option<super::cards::TokenFormatName>)]
    token_format: Option<String>,
    /// The checkout's own reference (an order id): up to 64 printable
    /// characters, never a card number.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, example = "order-1001")]
    reference: Option<String>,
    #[serde(default)]
    style: Option<StyleBody>,
}

/// A new session: give `frame_url` (which carries the client secret in its
/// fragment) to the buyer's browser, and keep `session` to read it back.
#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedSession {
    #[schema(example = "cs_3kTMd9vQ2dYcXbRj6wHn1A")]
    session: String,
    /// Shown only here; stored only as a hash.
    client_secret: String,
    /// RFC 3339.
    expires_at: String,
    /// `<collect_public_url>/v1/collect/frame/{session}#<client_secret>`.
    frame_url: String,
}

/// A session as the checkout server reads it back.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionBody {
    session: String,
    /// `open`, `completed`, `expired` or `closed` (too many refused
    /// submissions).
    #[schema(value_type = String)]
    status: &'static str,
    reference: Option<String>,
    /// RFC 3339.
    expires_at: String,
    /// Once completed (and while the card is stored): the token object.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<TokenResponse>,
}

impl SessionBody {
    fn new(s: CollectSession) -> SessionBody {
        SessionBody {
            session: s.id,
            status: s.status.as_str(),
            reference: s.reference,
            expires_at: rfc3339_millis(s.expires_at),
            token: s.token.map(|t| TokenResponse::new(t, false)),
        }
    }
}

fn session_input(body: CreateSessionRequest) -> Result<CollectSessionInput, ApiError> {
    let token_format = match body.token_format.as_deref() {
        None => vault::TokenFormat::Random,
        Some(f) => vault::TokenFormat::parse(f).ok_or(ApiError::InvalidRequest)?,
    };
    Ok(CollectSessionInput {
        tenant: body.tenant,
        allowed_origin: body.allowed_origin,
        ttl_secs: body.ttl_secs,
        require_cvc: body.require_cvc,
        token_format,
        reference: body.reference,
        style: body.style.map(CollectStyle::from),
    })
}

/// `POST /v1/collect/sessions` (role `tokenize`): open a collection session
/// for one buyer.
#[utoipa::path(post, path = "/v1/collect/sessions", tag = "collect",
    request_body = CreateSessionRequest,
    responses((status = 201, description = "The session (`Cache-Control: no-store`).", body = CreatedSession)))]
pub async fn create_session(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault
        .require_role(
            &ctx,
            audit::Action::CollectSessionCreated,
            &[vault::Role::Tokenize],
        )
        .await?;
    let body: CreateSessionRequest = read_json(&req, payload, state.max_body_bytes).await?;
    let base = state
        .collect_public_url
        .as_deref()
        .ok_or(ApiError::CollectNotConfigured)?;
    let created = vault
        .create_collect_session(&ctx, session_input(body)?)
        .await?;
    let secret = created.client_secret.expose();
    let id = &created.session.id;
    Ok(HttpResponse::Created()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(CreatedSession {
            session: id.clone(),
            client_secret: secret.to_owned(),
            expires_at: rfc3339_millis(created.session.expires_at),
            frame_url: format!("{base}/v1/collect/frame/{id}#{secret}"),
        }))
}

/// `GET /v1/collect/sessions/{session}` (role `tokenize`, tenant rules as
/// for tokens): how the checkout server learns the token.
#[utoipa::path(get, path = "/v1/collect/sessions/{session}", tag = "collect",
    params(("session" = String, Path, description = "The session id (`cs_...`).")),
    responses((status = 200, description = "The session (`Cache-Control: no-store`).", body = SessionBody)))]
pub async fn read_session(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    let session = vault.collect_session(&ctx, &path).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(SessionBody::new(session)))
}

/// What the edge needs to serve a session's form.
#[derive(Serialize, ToSchema)]
pub(crate) struct PublicSession {
    session: String,
    /// `open`, `completed`, `expired` or `closed`.
    #[schema(value_type = String)]
    status: &'static str,
    allowed_origin: String,
    require_cvc: bool,
    style: StyleBody,
    /// RFC 3339.
    expires_at: String,
}

/// `GET /v1/collect/sessions/{session}/public` (role `collect`: the edge):
/// the settings its form needs; no token, no secret.
#[utoipa::path(get, path = "/v1/collect/sessions/{session}/public", tag = "collect",
    params(("session" = String, Path, description = "The session id (`cs_...`).")),
    responses((status = 200, description = "The public settings.", body = PublicSession)))]
pub async fn public_session(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    let s = vault.collect_session_public(&ctx, &path).await?;
    Ok(HttpResponse::Ok().json(PublicSession {
        session: s.id,
        status: s.status.as_str(),
        allowed_origin: s.allowed_origin,
        require_cvc: s.require_cvc,
        style: s.style.into(),
        expires_at: rfc3339_millis(s.expires_at),
    }))
}

/// `POST /v1/collect/sessions/{session}/complete`: what the edge forwards
/// from the form, with the buyer's address.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompleteRequest {
    #[schema(value_type = String)]
    client_secret: SecretString,
    #[schema(value_type = String, example = "4111111111111111")]
    pan: SecretString,
    exp_month: i64,
    exp_year: i64,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    cardholder_name: Option<SecretString>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    cvc: Option<SecretString>,
    /// The buyer's IP address as the edge saw it.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "198.51.100.7")]
    buyer_address: Option<String>,
}

/// What the form tells the merchant page (and nothing more).
#[derive(Serialize, ToSchema)]
pub(crate) struct Completed {
    token: String,
    #[schema(value_type = String, example = "visa")]
    brand: &'static str,
    last4: String,
    exp_month: Option<u8>,
    exp_year: Option<u16>,
}

/// `POST /v1/collect/sessions/{session}/complete` (role `collect`: the
/// edge): complete a session with the buyer's card. A retry of the same
/// card answers the same token.
#[utoipa::path(post, path = "/v1/collect/sessions/{session}/complete", tag = "collect",
    params(("session" = String, Path, description = "The session id (`cs_...`).")),
    request_body = CompleteRequest,
    responses((status = 200, description = "The token (`Cache-Control: no-store`).", body = Completed)))]
pub async fn complete_session(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault
        .require_role(
            &ctx,
            audit::Action::CollectSubmission,
            &[vault::Role::Collect],
        )
        .await?;
    let body: CompleteRequest = read_json(&req, payload, state.max_body_bytes).await?;
    let buyer = match body.buyer_address.as_deref() {
        None => None,
        Some(a) => Some(a.parse().map_err(|_| ApiError::InvalidRequest)?),
    };
    let submission = Submission {
        client_secret: body.client_secret.0,
        card: CardInput {
            pan: body.pan.0,
            exp_month: body.exp_month,
            exp_year: body.exp_year,
            cardholder_name: body.cardholder_name.map(|n| n.0),
            cvc: body.cvc.map(|c| c.0),
        },
        buyer,
    };
    let info = vault
        .complete_collect_session(&ctx, &path, submission)
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(Completed {
            token: info.token,
            brand: info.brand.as_str(),
            last4: info.last4,
            exp_month: info.exp_month,
            exp_year: info.exp_year,
        }))
}
