//! The reveal listener's route: detokenize (`POST /v1/detokenize`), the one
//! place a card number leaves the vault.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use audit::Action;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vault::Role;

use super::body::read_json;
use crate::auth::authenticate;
use crate::error::ApiError;
use crate::state::AppState;

/// `POST /v1/detokenize`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DetokenizeRequest {
    #[schema(example = "tok_3kTMd9vQ2dYcXbRj6wHn1A")]
    token: String,
    /// Why the card is needed: 1 to 256 printable characters, never a card
    /// number (recorded in the audit trail).
    #[schema(min_length = 1, max_length = 256, example = "settlement")]
    reason: String,
    /// Release the held security code with this answer (then it is gone).
    #[serde(default)]
    include_cvc: bool,
}

/// The card behind a token.
#[derive(Serialize, ToSchema)]
pub(crate) struct DetokenizeResponse<'a> {
    token: &'a str,
    /// The card number, digits only.
    #[schema(example = "4111111111111111")]
    pan: &'a str,
    /// Null only for a card number found in a forwarded call's answer,
    /// stored without an expiry.
    exp_month: Option<u8>,
    exp_year: Option<u16>,
    cardholder_name: Option<&'a str>,
    /// Only with `include_cvc` while one is held: released once.
    #[serde(skip_serializing_if = "Option::is_none")]
    cvc: Option<&'a str>,
    cvc_available: bool,
}

/// `POST /v1/detokenize` (role `detokenize`, reveal listener): the card
/// behind a token, audited with the reason before it is returned; rate
/// limited per principal and tenant.
#[utoipa::path(post, path = "/v1/detokenize", tag = "reveal",
    request_body = DetokenizeRequest,
    responses((status = 200, description = "The card (`Cache-Control: no-store`).", body = DetokenizeResponse)))]
pub async fn detokenize(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault
        .require_role(&ctx, Action::Detokenize, &[Role::Detokenize])
        .await?;
    let body: DetokenizeRequest = read_json(&req, payload, state.max_body_bytes).await?;
    let out = vault
        .detokenize_monitored(
            &ctx,
            &body.token,
            &body.reason,
            &state.monitor,
            body.include_cvc,
        )
        .await?;
    let card = &out.card;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(DetokenizeResponse {
            token: &out.token,
            // The one place a PAN leaves the vault: to a caller holding the
            // detokenize role, for a tenant it may act on, audited above.
            // (The serialized response buffer is not zeroized: see ARCHITECTURE.md.)
            pan: card.pan.expose_digits(),
            exp_month: card.expiry.map(|e| e.month()),
            exp_year: card.expiry.map(|e| e.year()),
            cardholder_name: card.name.as_ref().map(|n| n.expose()),
            cvc: out.cvc.as_ref().map(|c| c.expose()),
            cvc_available: out.cvc_available,
        }))
}
