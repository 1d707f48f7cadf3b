//! The routes of the `collect` listener: the frame, its files, the
//! merchant helper, the submission forwarded to the vault, the manifest and
//! `/healthz`. Every answer carries exactly the headers of `headers.rs`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use futures_util::StreamExt as _;
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Serialize, Serializer};
use vault::collect::SessionId;
use zeroize::Zeroizing;

use super::assets::{assets, ErrorPage, File};
use super::headers::{self, Headers};
use super::rate::RateLimit;
use super::vault_client::{Answer, CallError, VaultClient};
use crate::routes::body::{object_shaped, SecretString};

/// What every worker of the edge shares.
#[derive(Debug)]
pub struct EdgeState {
    pub vault: VaultClient,
    /// The edge's own origin (`https://pay.example`).
    pub origin: String,
    pub tls: bool,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub per_source: RateLimit<IpAddr>,
    pub per_session: RateLimit<String>,
}

/// The routes (patterns as logged), for `http`'s app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/v1/collect/manifest.json", web::get().to(manifest))
        .route("/v1/collect/frame/{session}", web::get().to(frame))
        .route("/v1/collect/assets/{file}", web::get().to(asset))
        .route("/v1/collect/cardvault.js", web::get().to(merchant_script))
        .route("/v1/collect/{script}", web::get().to(merchant_script))
        .route("/v1/collect/submit/{session}", web::post().to(submit));
}

fn with_headers(mut b: HttpResponseBuilder, h: Headers) -> HttpResponseBuilder {
    for (name, value) in h {
        b.insert_header((name, value));
    }
    b
}

/// `{"error":{"code","message"}}` with the JSON headers.
pub fn json_error(tls: bool, status: StatusCode, code: &str, message: &str) -> HttpResponse {
    with_headers(HttpResponse::build(status), headers::json(tls))
        .json(serde_json::json!({"error": {"code": code, "message": message}}))
}

fn state_tls(req: &HttpRequest) -> bool {
    req.app_data::<web::Data<EdgeState>>()
        .is_some_and(|s| s.tls)
}

/// Every unknown route.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    json_error(
        state_tls(&req),
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route",
    )
}

async fn healthz(state: web::Data<EdgeState>) -> HttpResponse {
    with_headers(HttpResponse::Ok(), headers::json(state.tls))
        .json(serde_json::json!({"status": "ok"}))
}

async fn manifest(state: web::Data<EdgeState>) -> HttpResponse {
    with_headers(HttpResponse::Ok(), headers::json(state.tls))
        .json(super::manifest::manifest(state.tls, &state.origin))
}

fn file_response(f: &File, tls: bool) -> HttpResponse {
    with_headers(HttpResponse::Ok(), headers::file(f.kind, tls))
        .insert_header((header::CONTENT_TYPE, f.content_type))
        .body(f.body)
}

async fn asset(req: HttpRequest, state: web::Data<EdgeState>) -> HttpResponse {
    let a = assets();
    match a.by_path(req.path()) {
        Some(f) if f.path.starts_with("/v1/collect/assets/") => file_response(f, state.tls),
        _ => json_error(
            state.tls,
            StatusCode::NOT_FOUND,
            "not_found",
            "no such file",
        ),
    }
}

async fn merchant_script(req: HttpRequest, state: web::Data<EdgeState>) -> HttpResponse {
    let a = assets();
    match a.by_path(req.path()) {
        Some(f) if !f.path.starts_with("/v1/collect/assets/") => file_response(f, state.tls),
        _ => json_error(
            state.tls,
            StatusCode::NOT_FOUND,
            "not_found",
            "no such file",
        ),
    }
}

fn page(status: StatusCode, which: ErrorPage, ancestors: &str, tls: bool) -> HttpResponse {
    with_headers(HttpResponse::build(status), headers::frame(ancestors, tls))
        .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
        .body(which.body())
}

/// The settings the vault gives for a session's form.
#[derive(Deserialize)]
struct PublicSession {
    session: String,
    status: String,
    allowed_origin: String,
    require_cvc: bool,
    #[serde(default)]
    style: serde_json::Map<String, serde_json::Value>,
}

async fn call<T: Send + 'static>(
    state: &web::Data<EdgeState>,
    f: impl FnOnce(&VaultClient) -> Result<T, CallError> + Send + 'static,
) -> Result<T, CallError> {
    let state = Arc::clone(state);
    web::block(move || f(&state.vault))
        .await
        .unwrap_or(Err(CallError::Unavailable))
}

/// `GET /v1/collect/frame/{session}`.
async fn frame(path: web::Path<String>, state: web::Data<EdgeState>) -> HttpResponse {
    let tls = state.tls;
    let none = "'none'";
    let Some(id) = SessionId::parse(&path) else {
        return page(StatusCode::NOT_FOUND, ErrorPage::NotFound, none, tls);
    };
    let id = id.as_str().to_owned();
    let answer = call(&state, {
        let id = id.clone();
        move |v| v.public_session(&id)
    })
    .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = ?e, "the vault did not answer for a frame");
            let status = match e {
                CallError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                CallError::Unavailable => StatusCode::BAD_GATEWAY,
            };
            return page(status, ErrorPage::Unavailable, none, tls);
        }
    };
    match answer.status {
        200 => {}
        404 => return page(StatusCode::NOT_FOUND, ErrorPage::NotFound, none, tls),
        status => {
            // 401/403: the edge's credential is wrong; 503: sealed.
            tracing::error!(
                vault_status = status,
                vault_request_id = answer.vault_request_id.as_deref().unwrap_or("-"),
                "the vault refused the edge's session lookup"
            );
            return page(StatusCode::BAD_GATEWAY, ErrorPage::Unavailable, none, tls);
        }
    }
    let session: PublicSession = match serde_json::from_slice(&answer.body) {
        Ok(s) => s,
        Err(_) => {
            tracing::error!("the vault's session settings are not of the expected shape");
            return page(StatusCode::BAD_GATEWAY, ErrorPage::Unavailable, none, tls);
        }
    };
    if session.session != id || !headers::is_origin(&session.allowed_origin, true) {
        tracing::error!("the vault's session settings are not usable for a frame");
        return page(StatusCode::BAD_GATEWAY, ErrorPage::Unavailable, none, tls);
    }
    if session.status != "open" {
        // The form, already final: it shows why and tells the merchant's
        // page (`cardvault:error`), so that its `mount` promise settles.
        let code = match session.status.as_str() {
            "expired" => "session_expired",
            "completed" => "session_completed",
            _ => "session_closed",
        };
        let config = serde_json::json!({
            "session": id,
            "allowed_origin": session.allowed_origin,
            "final": code,
        });
        return with_headers(
            HttpResponse::build(StatusCode::GONE),
            headers::frame(&session.allowed_origin, tls),
        )
        .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
        .body(assets().render_frame(&config));
    }
    let config = serde_json::json!({
        "session": id,
        "allowed_origin": session.allowed_origin,
        "require_cvc": session.require_cvc,
        "style": session.style,
        "submit_url": format!("/v1/collect/submit/{id}"),
    });
    with_headers(
        HttpResponse::Ok(),
        headers::frame(&session.allowed_origin, tls),
    )
    .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
    .body(assets().render_frame(&config))
}

/// What the frame posts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FormSubmission {
    client_secret: SecretString,
    pan: SecretString,
    exp_month: i64,
    exp_year: i64,
    #[serde(default)]
    cvc: Option<SecretString>,
    #[serde(default)]
    cardholder_name: Option<SecretString>,
}

/// What goes to the vault: the form's fields and the buyer's address.
struct Forward<'a> {
    form: &'a FormSubmission,
    buyer_address: String,
}

impl Serialize for Forward<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let f = self.form;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("client_secret", f.client_secret.0.as_str())?;
        map.serialize_entry("pan", f.pan.0.as_str())?;
        map.serialize_entry("exp_month", &f.exp_month)?;
        map.serialize_entry("exp_year", &f.exp_year)?;
        if let Some(cvc) = &f.cvc {
            map.serialize_entry("cvc", cvc.0.as_str())?;
        }
        if let Some(name) = &f.cardholder_name {
            map.serialize_entry("cardholder_name", name.0.as_str())?;
        }
        map.serialize_entry("buyer_address", &self.buyer_address)?;
        map.end()
    }
}

/// Whether the submission comes from the edge's own pages: `Origin` is the
/// edge's origin (or `null` on a same-origin fetch with no-referrer), and
/// `Sec-Fetch-Site`, when sent, is `same-origin`.
fn same_origin(req: &HttpRequest, own: &str) -> bool {
    let value = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let site = value("sec-fetch-site");
    if site.as_deref().is_some_and(|s| s != "same-origin") {
        return false;
    }
    match value("origin").as_deref() {
        Some(o) if o == own => true,
        Some("null") => site.as_deref() == Some("same-origin"),
        _ => false,
    }
}

fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

fn rate_limited(tls: bool, retry_after: u64) -> HttpResponse {
    let mut res = json_error(
        tls,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many submissions; try again later",
    );
    if let Ok(v) = header::HeaderValue::from_str(&retry_after.to_string()) {
        res.headers_mut().insert(header::RETRY_AFTER, v);
    }
    res
}

enum BodyError {
    TooLarge,
    Read,
}

/// The body into a zeroizing buffer allocated once, at most `limit` bytes.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, BodyError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Zeroizing::new(Vec::with_capacity(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| BodyError::Read)?;
        if !crate::limits::append_within(&mut body, &chunk, limit) {
            return Err(BodyError::TooLarge);
        }
    }
    Ok(body)
}

/// `POST /v1/collect/submit/{session}`: checked here (origin, media type,
/// rate, size, shape), then forwarded to the vault's `.../complete` with
/// the buyer's address; the vault's status and JSON answer are relayed.
async fn submit(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<EdgeState>,
) -> HttpResponse {
    let tls = state.tls;
    let Some(id) = SessionId::parse(&path) else {
        return json_error(tls, StatusCode::NOT_FOUND, "not_found", "no such session");
    };
    let id = id.as_str().to_owned();
    if !same_origin(&req, &state.origin) {
        return json_error(
            tls,
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "submissions are accepted from this form's own pages only",
        );
    }
    if !is_json(&req) {
        return json_error(
            tls,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be application/json",
        );
    }
    let Some(peer) = req.peer_addr().map(|a| a.ip()) else {
        return json_error(
            tls,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "no source address",
        );
    };
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if let Err(retry) = state.per_source.hit(peer) {
        return rate_limited(tls, retry);
    }
    if let Err(retry) = state.per_session.hit(id.clone()) {
        return rate_limited(tls, retry);
    }
    let limit = state.max_body_bytes;
    let body =
        match tokio::time::timeout(state.request_timeout, read_body(&req, payload, limit)).await {
            Err(_) => {
                return json_error(
                    tls,
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the body did not arrive in time",
                )
            }
            Ok(Err(BodyError::TooLarge)) => {
                return json_error(
                    tls,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    &format!("the body is larger than {limit} bytes"),
                )
            }
            Ok(Err(BodyError::Read)) => {
                return json_error(
                    tls,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body could not be read",
                )
            }
            Ok(Ok(b)) => b,
        };
    // serde's messages may quote the input: never shown.
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return json_error(
            tls,
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body is not JSON",
        );
    }
    let form: FormSubmission = match object_shaped(&body)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten()
    {
        Some(f) => f,
        None => {
            return json_error(
                tls,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body does not have the form's fields",
            )
        }
    };
    drop(body);
    let mut forward = Zeroizing::new(Vec::with_capacity(limit + 128));
    let encoded = serde_json::to_writer(
        &mut *forward,
        &Forward {
            form: &form,
            buyer_address: peer.to_string(),
        },
    );
    drop(form);
    if encoded.is_err() {
        return json_error(
            tls,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        );
    }
    let answer = call(&state, move |v| v.complete(&id, &forward)).await;
    relay(tls, answer)
}

fn relay(tls: bool, answer: Result<Answer, CallError>) -> HttpResponse {
    let answer = match answer {
        Ok(a) => a,
        Err(CallError::Timeout) => {
            return json_error(
                tls,
                StatusCode::GATEWAY_TIMEOUT,
                "vault_timeout",
                "no answer in time; the card may have been saved: submit it again to learn",
            )
        }
        Err(CallError::Unavailable) => {
            return json_error(
                tls,
                StatusCode::BAD_GATEWAY,
                "vault_unavailable",
                "the card vault cannot be reached",
            )
        }
    };
    let vault_request_id = answer.vault_request_id.as_deref().unwrap_or("-");
    tracing::info!(
        vault_status = answer.status,
        vault_request_id,
        "submission forwarded"
    );
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    // Only JSON of the two shapes the frame understands is relayed.
    let shaped = serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .filter(|v| v.get("token").is_some() || v["error"]["code"].is_string());
    // 401 and `forbidden` are about the edge's own credential, not the
    // buyer's card: the buyer learns only that the vault failed.
    let about_the_edge = answer.status == 401
        || shaped
            .as_ref()
            .is_some_and(|v| v["error"]["code"] == "forbidden");
    match shaped {
        Some(v) if matches!(answer.status, 200 | 400..=499) && !about_the_edge => {
            with_headers(HttpResponse::build(status), headers::json(tls)).json(v)
        }
        _ => {
            tracing::error!(
                vault_status = answer.status,
                vault_request_id,
                "the vault could not take the submission"
            );
            let code = if answer.status == 503 {
                "vault_unavailable"
            } else {
                "vault_error"
            };
            json_error(
                tls,
                StatusCode::BAD_GATEWAY,
                code,
                "the card vault could not take the card",
            )
        }
    }
}
