//! The forwarding proxy (issue 18, reveal listener, role `forward`):
//! `POST|PUT|PATCH /v1/forward/{upstream}/{path}`. The caller's body holds
//! placeholders `{{<token>.<field>}}`; the vault puts the card values in
//! (escaped for the body's type), sends the request to the configured
//! upstream, and relays the answer with every card number in it replaced
//! by a token of the call's tenant. The caller never holds a card number.
//!
//! Order of checks, each refusing before anything is sent: credentials and
//! role; the upstream by name (404 `unknown_upstream`); the path, plain and
//! one of the upstream's patterns, no query (403 `path_not_allowed`); the
//! content type and size; the placeholders; the tokens (known, of the
//! caller's tenants, of one tenant the upstream serves; the detokenize
//! limits); then the `forward` event, then the call. Vault errors carry
//! `x-cardvault-source: vault`, relayed answers `x-cardvault-source:
//! upstream`.

use std::time::Instant;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use audit::Action;
use vault::forward::{self, BodyKind, CardParts, Field, Template};
use vault::{ForwardOutcome, ForwardTarget, Role, Wanted};

use super::body::read_bytes;
use crate::auth::authenticate;
use crate::error::{ApiError, SOURCE_HEADER};
use crate::state::AppState;
use crate::upstream::SendError;

/// The route's prefix (the upstream's name and the path follow).
const PREFIX: &str = "/v1/forward/";

/// `POST /v1/forward/{upstream}/{path}` (also PUT and PATCH).
#[utoipa::path(post, path = "/v1/forward/{upstream}/{path}", tag = "reveal",
    params(
        ("upstream" = String, Path, description = "A configured upstream's name (`GET /v1/admin/upstreams`)."),
        ("path" = String, Path, description = "The path at the upstream, one of its allowed `paths` ('*' one segment); plain segments only, no query."),
        ("Idempotency-Key" = Option<String>, Header, description = "Forwarded when the upstream lists it in `forward_headers`."),
    ),
    request_body(content = String, description = "The upstream's request, `application/json`, `application/x-www-form-urlencoded` or `application/xml`/`text/xml` (UTF-8), with placeholders `{{<token>.<field>}}`: field `pan`, `exp_month`, `exp_year`, `exp_yy`, `exp_mmyy`, `cardholder_name`, `cvc` (released once), `bin` or `last4`; 1 to 20 distinct tokens of one tenant.",
        content_type = "application/json"),
    responses((status = 200, description = "The upstream's answer as it came (its status, `Content-Type` and body, with every card number replaced by a token of the call's tenant; `x-cardvault-source: upstream`). Any status the upstream answers is relayed; the vault's own errors are the documented ones, with `x-cardvault-source: vault`.", content_type = "application/json", body = String)))]
pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut upstream_time = None;
    let out = forward_call(&req, payload, &state, &mut upstream_time).await;
    // Counted per configured upstream (`other` for any other name) and
    // outcome: the upstream's status class, or the vault's error.
    let name = req
        .uri()
        .path()
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let label = if state.upstreams.current().get(name).is_some() {
        name
    } else {
        "other"
    };
    let outcome = match &out {
        Ok(res) => match res.status().as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        Err(e) if e.code().starts_with("upstream_") => e.code(),
        Err(_) => "refused",
    };
    state.metrics.forward(label, outcome, upstream_time);
    out
}

async fn forward_call(
    req: &HttpRequest,
    payload: web::Payload,
    state: &web::Data<AppState>,
    upstream_time: &mut Option<std::time::Duration>,
) -> Result<HttpResponse, ApiError> {
    let req = req.clone();
    let vault = state.vault()?;
    let ctx = authenticate(&req, state).await?;
    vault
        .require_role(&ctx, Action::Forward, &[Role::Forward])
        .await?;
    // The raw path (actix's match info is percent-decoded): `{upstream}/{path}`.
    let rest = req
        .uri()
        .path()
        .strip_prefix(PREFIX)
        .ok_or(ApiError::NotFound)?;
    let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let upstreams = state.upstreams.current();
    let upstream = upstreams.get(name).ok_or(ApiError::UnknownUpstream)?;
    if req.uri().query().is_some() {
        return Err(ApiError::PathNotAllowed);
    }
    let path =
        crate::config::upstreams::normalize_path(tail).map_err(|_| ApiError::PathNotAllowed)?;
    let pattern = upstream
        .spec
        .paths
        .iter()
        .find(|p| p.matches(&path))
        .ok_or(ApiError::PathNotAllowed)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let kind = BodyKind::from_content_type(&content_type)?;
    let body = read_bytes(&req, payload, upstream.spec.max_request_bytes).await?;
    let template = Template::parse(kind, &body)?;
    // What a repeat with the same Idempotency-Key must match (only then).
    let idempotency_key = req.headers().get("idempotency-key");
    let request_hash = idempotency_key
        .map(|_| vault::forward_request_hash(req.method().as_str(), rest, &content_type, &body));
    drop(body);
    let wanted: Vec<Wanted> = template
        .tokens()
        .iter()
        .map(|t| Wanted {
            token: t.as_str().to_owned(),
            cvc: template.fields_of(t).contains(&Field::Cvc),
        })
        .collect();
    let target = ForwardTarget {
        upstream: name,
        path_pattern: pattern.as_str(),
        tenants: upstream.spec.tenants.as_deref(),
    };
    // With an Idempotency-Key: claimed before any card is released; a
    // completed call's stored answer is given again without calling the
    // upstream (nor releasing a card, nor using a security code).
    let mut claim = None;
    if let (Some(key), Some(request_hash)) = (idempotency_key, request_hash) {
        let key = key
            .to_str()
            .map_err(|_| ApiError::Vault(vault::VaultError::InvalidIdempotencyKey))?;
        // Longer than any call can take: the upstream's timeout, the
        // answer's re-tokenization, clock skew between instances.
        let stale_after = upstream.spec.timeout * 2 + std::time::Duration::from_secs(30);
        match vault
            .forward_claim(&ctx, target, key, request_hash, stale_after)
            .await?
        {
            vault::IdempotentClaim::Fresh(handle) => claim = Some(handle),
            vault::IdempotentClaim::Replay(answer) => {
                let mut res = relay(
                    answer.status,
                    answer.content_type.as_deref(),
                    answer.location.as_deref(),
                    answer.body.to_vec(),
                );
                res.headers_mut().insert(
                    HeaderName::from_static("x-cardvault-idempotent-replay"),
                    HeaderValue::from_static("true"),
                );
                return Ok(res);
            }
        }
    }
    // Nothing reached the upstream: the claim goes, a retry is a new call.
    let release_claim = |claim: Option<vault::ClaimHandle>| async {
        if let Some(handle) = claim {
            if let Err(e) = vault.forward_key_release(handle).await {
                tracing::error!(error = %e, "an idempotency claim could not be released");
            }
        }
    };
    let mut release = match vault
        .forward_release(&ctx, target, &wanted, &state.monitor)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            release_claim(claim).await;
            return Err(e.into());
        }
    };
    let rendered = template.render(|token, field| {
        let card = release.cards.iter().find(|c| c.asked == token.as_str())?;
        forward::format_field(
            field,
            &CardParts {
                pan: &card.card.pan,
                expiry: card.card.expiry,
                cardholder_name: card.card.name.as_ref(),
                cvc: card.cvc.as_ref(),
            },
        )
    });
    let rendered = match rendered {
        Ok(r) => r,
        Err(e) => {
            // Nothing was sent: the security codes go back to the holder.
            vault.forward_return_cvcs(&mut release);
            let outcome = ForwardOutcome {
                error_code: Some(e.code()),
                ..ForwardOutcome::default()
            };
            release_claim(claim).await;
            vault
                .forward_completed(&ctx, target, &release.tenant, &outcome)
                .await?;
            return Err(e.into());
        }
    };
    // The card values are in `rendered` now; the released cards go.
    let tenant = release.tenant.clone();
    drop(release);
    let headers: Vec<(String, String)> = upstream
        .spec
        .forward_headers
        .iter()
        .filter_map(|h| {
            let v = req.headers().get(h.as_str())?.to_str().ok()?;
            Some((h.clone(), v.to_owned()))
        })
        .collect();
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|_| ApiError::MethodNotAllowed)?;
    let sent = rendered.len();
    let started = Instant::now();
    let answer = upstream
        .send(method, &path, &headers, &content_type, rendered)
        .await;
    *upstream_time = Some(started.elapsed());
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            let err = match e {
                SendError::Unreachable => ApiError::UpstreamUnreachable,
                SendError::Tls => ApiError::UpstreamTls,
                SendError::Timeout => ApiError::UpstreamTimeout,
                SendError::TooLarge => ApiError::UpstreamResponseTooLarge,
            };
            let outcome = ForwardOutcome {
                error_code: Some(err.code()),
                elapsed_ms,
                bytes_sent: sent,
                ..ForwardOutcome::default()
            };
            match e {
                // The connection or the handshake failed: nothing was sent.
                SendError::Unreachable | SendError::Tls => release_claim(claim.take()).await,
                // The upstream may have acted: the claim stays pending, a
                // retry with the key is refused (in use, then outcome
                // unknown), never sent again.
                SendError::Timeout | SendError::TooLarge => drop(claim.take()),
            }
            vault
                .forward_completed(&ctx, target, &tenant, &outcome)
                .await?;
            return Err(err);
        }
    };
    // Every card number in the answer becomes a token of the call's tenant.
    let answer_kind = answer
        .content_type
        .as_deref()
        .and_then(|ct| BodyKind::from_content_type(ct).ok());
    let found = forward::find_card_numbers(&answer.body);
    let mut tokens = Vec::with_capacity(found.len());
    for f in &found {
        tokens.push(vault.forward_tokenize(&ctx, &tenant, f.pan()).await?);
    }
    let body = if found.is_empty() {
        answer.body.to_vec()
    } else {
        forward::replace_card_numbers(&answer.body, answer_kind, &found, &tokens).map_err(|_| {
            tracing::error!("a card number in the upstream's answer could not be replaced");
            ApiError::UpstreamResponseUnsafe
        })?
    };
    let outcome = ForwardOutcome {
        status: Some(answer.status),
        error_code: None,
        elapsed_ms,
        bytes_sent: sent,
        bytes_received: answer.body.len(),
        certificate_sha256: answer.certificate_sha256.clone(),
        retokenized: found.len(),
    };
    vault
        .forward_completed(&ctx, target, &tenant, &outcome)
        .await?;
    if let Some(handle) = claim {
        let stored = vault
            .forward_complete(
                handle,
                vault::ForwardAnswer {
                    tenant: &tenant,
                    status: answer.status,
                    content_type: answer.content_type.as_deref(),
                    location: answer.location.as_deref(),
                    body: &body,
                },
            )
            .await;
        match stored {
            Ok(true) => {}
            // The answer is relayed anyway; a retry is refused (in use,
            // then outcome unknown), never sent again.
            Ok(false) => {
                tracing::warn!("the forwarded answer could not be kept for its Idempotency-Key")
            }
            Err(e) => {
                tracing::error!(error = %e, "the forwarded answer could not be kept for its Idempotency-Key")
            }
        }
    }
    Ok(relay(
        answer.status,
        answer.content_type.as_deref(),
        answer.location.as_deref(),
        body,
    ))
}

/// An upstream's answer as the caller gets it: its status, `Content-Type`
/// and body, `x-cardvault-source: upstream`, never cached; a redirect's
/// `Location` relayed (never followed), unless it holds a card number.
fn relay(
    status: u16,
    content_type: Option<&str>,
    location: Option<&str>,
    body: Vec<u8>,
) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut res = HttpResponse::build(status);
    res.insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            HeaderName::from_static(SOURCE_HEADER),
            HeaderValue::from_static("upstream"),
        ));
    if let Some(ct) = content_type.and_then(|ct| HeaderValue::from_str(ct).ok()) {
        res.insert_header((header::CONTENT_TYPE, ct));
    }
    if let Some(loc) = location {
        if forward::find_card_numbers(loc.as_bytes()).is_empty() {
            if let Ok(v) = HeaderValue::from_str(loc) {
                res.insert_header((header::LOCATION, v));
            }
        } else {
            tracing::warn!("the upstream's Location holds a card number: not relayed");
        }
    }
    res.body(body)
}

/// `PUT /v1/forward/{upstream}/{path}`: as POST.
#[utoipa::path(put, path = "/v1/forward/{upstream}/{path}", tag = "reveal",
    params(
        ("upstream" = String, Path, description = "A configured upstream's name."),
        ("path" = String, Path, description = "The path at the upstream (see POST)."),
    ),
    request_body(content = String, description = "As POST.", content_type = "application/json"),
    responses((status = 200, description = "As POST.", content_type = "application/json", body = String)))]
pub async fn forward_put(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    forward(req, payload, state).await
}

/// `PATCH /v1/forward/{upstream}/{path}`: as POST.
#[utoipa::path(patch, path = "/v1/forward/{upstream}/{path}", tag = "reveal",
    params(
        ("upstream" = String, Path, description = "A configured upstream's name."),
        ("path" = String, Path, description = "The path at the upstream (see POST)."),
    ),
    request_body(content = String, description = "As POST.", content_type = "application/json"),
    responses((status = 200, description = "As POST.", content_type = "application/json", body = String)))]
pub async fn forward_patch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    forward(req, payload, state).await
}
