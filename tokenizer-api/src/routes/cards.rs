//! The card routes of the api listener: tokenize (`POST /v1/tokens`), a
//! batch (`POST /v1/tokens/batch`), metadata (`GET /v1/tokens/{token}`),
//! an update of expiry or name (`PATCH`) and deletion (`DELETE`), with
//! their request and response bodies.

use actix_web::{web, HttpRequest, HttpResponse};
use audit::Action;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::ToSchema;
use vault::{CardInput, Role, TokenInfo};

use super::body::{read_json, SecretString};
use super::rfc3339_millis;
use crate::auth::authenticate;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// One card of a batch. A card that is not valid (number, expiry, name,
/// security code: the same rules as `POST /v1/tokens`) does not fail the
/// batch: its result is that card's error.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CardRequest {
    /// The card number: 12 to 19 digits (spaces and dashes allowed), Luhn-valid.
    #[schema(value_type = String, example = "4111 1111 1111 1111")]
    pan: SecretString,
    /// 1 to 12.
    #[schema(example = 12)]
    exp_month: i64,
    /// Four digits; the expiry may not be before this month.
    #[schema(example = 2030)]
    exp_year: i64,
    /// 1 to 64 printable characters, never a card number.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    cardholder_name: Option<SecretString>,
    /// The security code (3 or 4 digits): held in memory only, released once.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    cvc: Option<SecretString>,
}

impl From<CardRequest> for CardInput {
    fn from(c: CardRequest) -> CardInput {
        CardInput {
            pan: c.pan.0,
            exp_month: c.exp_month,
            exp_year: c.exp_year,
            cardholder_name: c.cardholder_name.map(|n| n.0),
            cvc: c.cvc.map(|c| c.0),
        }
    }
}

/// `POST /v1/tokens`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenizeRequest {
    /// 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$", example = "shop-42")]
    tenant: String,
    /// The card number: 12 to 19 digits (spaces and dashes allowed), Luhn-valid.
    #[schema(value_type = String, min_length = 12, pattern = r"^[0-9 -]+$", example = "4111111111111111")]
    pan: SecretString,
    #[schema(minimum = 1, maximum = 12, example = 12)]
    exp_month: i64,
    #[schema(minimum = 1000, maximum = 9999, example = 2030)]
    exp_year: i64,
    #[serde(default)]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 64)]
    cardholder_name: Option<SecretString>,
    /// The security code: held in memory only, released once.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = r"^[0-9]{3,4}$")]
    cvc: Option<SecretString>,
    /// `random` (default) or `pan_shaped` (if the tenant allows it).
    #[serde(default)]
    #[schema(value_type = Option<TokenFormatName>)]
    token_format: Option<String>,
    /// RFC 3339, in the future; after it the token is gone.
    #[serde(default)]
    #[schema(format = DateTime, example = "2031-01-01T00:00:00Z")]
    expires_at: Option<String>,
}

/// `POST /v1/tokens/batch`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    /// 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$", example = "shop-42")]
    tenant: String,
    /// 1 to 1000 cards.
    #[schema(min_items = 1, max_items = 1000)]
    cards: Vec<CardRequest>,
    #[serde(default)]
    #[schema(value_type = Option<TokenFormatName>)]
    token_format: Option<String>,
    #[serde(default)]
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// A token format.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub(crate) enum TokenFormatName {
    /// `tok_` and 22 random characters (the default).
    Random,
    /// The card's length, BIN and last four around random middle digits
    /// that fail the Luhn check (if the tenant allows it).
    PanShaped,
}

/// `PATCH /v1/tokens/{token}`: a new expiry (month and year together)
/// and/or a new cardholder name.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateRequest {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 12)]
    exp_month: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 1000, maximum = 9999)]
    exp_year: Option<i64>,
    #[serde(default)]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 64)]
    cardholder_name: Option<SecretString>,
}

/// The token format and expiry of a tokenize request.
fn tokenize_options(
    format: Option<&str>,
    expires_at: Option<&str>,
) -> Result<vault::TokenizeOptions, ApiError> {
    let format = match format {
        None => vault::TokenFormat::Random,
        Some(f) => vault::TokenFormat::parse(f).ok_or(ApiError::InvalidRequest)?,
    };
    let expires_at = match expires_at {
        None => None,
        Some(t) => {
            let at = OffsetDateTime::parse(t, &Rfc3339)
                .map_err(|_| ApiError::Vault(vault::VaultError::InvalidExpiresAt))?;
            let ms = at.unix_timestamp_nanos() / 1_000_000;
            Some(
                i64::try_from(ms)
                    .map_err(|_| ApiError::Vault(vault::VaultError::InvalidExpiresAt))?,
            )
        }
    };
    Ok(vault::TokenizeOptions { format, expires_at })
}

/// A token and what may be shown about its card: never the number.
#[derive(Serialize, ToSchema)]
pub(crate) struct TokenResponse {
    #[schema(example = "tok_3kTMd9vQ2dYcXbRj6wHn1A")]
    token: String,
    tenant: String,
    /// Keyed fingerprint of the card number within the tenant (`fp_...`).
    fingerprint: String,
    #[schema(value_type = String, example = "visa")]
    brand: &'static str,
    /// The first six digits.
    bin: String,
    last4: String,
    #[schema(example = "411111******1111")]
    masked_pan: String,
    /// Null only for a card number the vault found in a forwarded call's
    /// answer and stored without an expiry (a tokenize with one fills it).
    exp_month: Option<u8>,
    exp_year: Option<u16>,
    /// Tokenize only: whether this call stored the card (201) or found it (200).
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    /// RFC 3339.
    created_at: String,
    /// `random` or `pan_shaped`.
    #[schema(value_type = String, example = "random")]
    token_format: &'static str,
    /// RFC 3339, or null when the token does not expire.
    expires_at: Option<String>,
    /// Tokenize and update only: whether this call changed the stored card.
    #[serde(skip_serializing_if = "Option::is_none")]
    updated: Option<bool>,
    /// Whether a security code is held for the next detokenize.
    cvc_available: bool,
}

impl TokenResponse {
    pub(crate) fn new(info: TokenInfo, with_created: bool) -> TokenResponse {
        let created_at = rfc3339_millis(info.created_at);
        TokenResponse {
            token: info.token,
            tenant: info.tenant,
            fingerprint: info.fingerprint,
            brand: info.brand.as_str(),
            bin: info.bin,
            last4: info.last4,
            masked_pan: info.masked_pan,
            exp_month: info.exp_month,
            exp_year: info.exp_year,
            created: with_created.then_some(info.created),
            created_at,
            token_format: info.token_format.as_str(),
            expires_at: info.expires_at.map(rfc3339_millis),
            updated: with_created.then_some(info.updated),
            cvc_available: info.cvc_available,
        }
    }
}

/// `POST /v1/tokens` (role `tokenize`): the token of a card, new (201) or
/// the one the tenant already has for it (200).
#[utoipa::path(post, path = "/v1/tokens", tag = "cards",
    request_body = TokenizeRequest,
    responses(
        (status = 201, description = "A new token.", body = TokenResponse),
        (status = 200, description = "The tenant's existing token for this card.", body = TokenResponse),
    ))]
pub async fn tokenize(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault
        .require_role(&ctx, Action::Tokenize, &[Role::Tokenize])
        .await?;
    let body: TokenizeRequest = read_json(&req, payload, state.max_body_bytes).await?;
    let options = tokenize_options(body.token_format.as_deref(), body.expires_at.as_deref())?;
    let card = CardInput {
        pan: body.pan.0,
        exp_month: body.exp_month,
        exp_year: body.exp_year,
        cardholder_name: body.cardholder_name.map(|n| n.0),
        cvc: body.cvc.map(|c| c.0),
    };
    let info = vault
        .tokenize_with(&ctx, &body.tenant, card, options)
        .await?;
    let mut res = if info.created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(res.json(TokenResponse::new(info, true)))
}

/// One result of a batch: a token, or the error of that card.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum BatchItem<'a> {
    Token(TokenResponse),
    Error(ErrorBody<'a>),
}

/// The results of a batch, in input order.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchResponse<'a> {
    results: Vec<BatchItem<'a>>,
}

/// `POST /v1/tokens/batch` (role `tokenize`): up to 1000 cards in one
/// transaction; each result is a token or that card's error.
#[utoipa::path(post, path = "/v1/tokens/batch", tag = "cards",
    request_body = BatchRequest,
    responses((status = 200, description = "One result per card, in input order.", body = BatchResponse)))]
pub async fn tokenize_batch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault
        .require_role(&ctx, Action::Tokenize, &[Role::Tokenize])
        .await?;
    let body: BatchRequest = read_json(&req, payload, state.max_batch_body_bytes).await?;
    let options = tokenize_options(body.token_format.as_deref(), body.expires_at.as_deref())?;
    let cards = body.cards.into_iter().map(CardInput::from).collect();
    let results = vault
        .tokenize_many_with(&ctx, &body.tenant, cards, options)
        .await?;
    let results = results
        .into_iter()
        .map(|r| match r {
            Ok(info) => BatchItem::Token(TokenResponse::new(info, true)),
            Err(e) => BatchItem::Error(ErrorBody::card(&e)),
        })
        .collect();
    Ok(HttpResponse::Ok().json(BatchResponse { results }))
}

/// `PATCH /v1/tokens/{token}` (role `tokenize`): a new expiry date or
/// cardholder name for a stored card, without its number.
#[utoipa::path(patch, path = "/v1/tokens/{token}", tag = "cards",
    params(("token" = String, Path, description = "The token.")),
    request_body = UpdateRequest,
    responses((status = 200, description = "The token object, with `updated`.", body = TokenResponse)))]
pub async fn update(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault
        .require_role(&ctx, Action::CardUpdated, &[Role::Tokenize])
        .await?;
    let body: UpdateRequest = read_json(&req, payload, state.max_body_bytes).await?;
    if body.exp_month.is_some() != body.exp_year.is_some() {
        return Err(ApiError::InvalidRequest);
    }
    let change = vault::CardUpdate {
        exp_month: body.exp_month,
        exp_year: body.exp_year,
        cardholder_name: body.cardholder_name.map(|n| n.0),
    };
    let info = vault.update(&ctx, &path, change).await?;
    let updated = info.updated;
    let mut res = TokenResponse::new(info, false);
    res.updated = Some(updated);
    Ok(HttpResponse::Ok().json(res))
}

/// `GET /v1/tokens/{token}` (role `tokenize`): the token object, no secret.
#[utoipa::path(get, path = "/v1/tokens/{token}", tag = "cards",
    params(("token" = String, Path, description = "The token.")),
    responses((status = 200, description = "The token object (no secret).", body = TokenResponse)))]
pub async fn metadata(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    let info = vault.metadata(&ctx, &path).await?;
    Ok(HttpResponse::Ok().json(TokenResponse::new(info, false)))
}

/// `DELETE /v1/tokens/{token}` (role `tokenize` or `detokenize`): the row
/// and its ciphertext are gone.
#[utoipa::path(delete, path = "/v1/tokens/{token}", tag = "cards",
    params(("token" = String, Path, description = "The token.")),
    responses((status = 204, description = "Deleted.")))]
pub async fn delete(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault.delete(&ctx, &path).await?;
    Ok(HttpResponse::NoContent().finish())
}
