//! HTTP handlers: authenticate, parse the request into domain input, call the
//! vault, shape the response. No SQL, no crypto, no card logic here.
//!
//! Bodies are read by hand (not by actix's `Json` extractor) so that the
//! order of checks is ours: credentials first, then media type, size and
//! JSON; and so that the raw bytes, which may hold a PAN, live in a zeroizing
//! buffer and never reach an error message.

use std::sync::Arc;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use audit::Action;
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use vault::{CardInput, RequestContext, Role, TokenInfo, Vault};
use zeroize::Zeroizing;

use crate::error::{ApiError, ErrorBody};
use crate::listeners::{AuthMode, Connection, ListenerKind};
use crate::seal::SealControl;

/// Shared state of every worker.
#[derive(Debug)]
pub struct AppState {
    /// Holds the vault once unsealed (see `seal`).
    pub seal: Arc<SealControl>,
    /// Crypto-periods shown by key status and `/readyz`.
    pub crypto_periods: vault::CryptoPeriods,
    pub metrics: crate::metrics::Metrics,
    pub max_body_bytes: usize,
    /// Deadline for the whole body to arrive (slow clients get 408).
    pub request_timeout: std::time::Duration,
    pub max_batch_body_bytes: usize,
    /// Largest accepted request head (header names and values), in bytes.
    pub max_header_bytes: usize,
    /// Detokenize rate limits and anomaly rule (per instance; survives
    /// sealing).
    pub monitor: vault::monitor::DetokenizeMonitor,
    /// Failed authentications per source address.
    pub sources: crate::limits::SourceGuard,
}

impl AppState {
    /// The unsealed vault, or 503 `sealed`.
    pub fn vault(&self) -> Result<Arc<Vault>, ApiError> {
        self.seal.vault().ok_or(ApiError::Sealed)
    }
}

/// Request id assigned by the middleware in `app.rs`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Where a route is served (see `listeners`).
const ALL: &[ListenerKind] = &[ListenerKind::Api, ListenerKind::Reveal, ListenerKind::Admin];
const API: &[ListenerKind] = &[ListenerKind::Api];
const REVEAL: &[ListenerKind] = &[ListenerKind::Reveal];
const ADMIN: &[ListenerKind] = &[ListenerKind::Admin];

/// The routes of one listener; any other method on a known path is 405,
/// a path of another listener is 404.
pub fn configure_for(cfg: &mut web::ServiceConfig, listener: ListenerKind) {
    let routes = [
        (ALL, "/healthz", vec![web::get().to(healthz)]),
        (ADMIN, "/readyz", vec![web::get().to(readyz)]),
        (ADMIN, "/metrics", vec![web::get().to(metrics)]),
        (API, "/v1/ping", vec![web::get().to(ping)]),
        (API, "/v1/tokens", vec![web::post().to(tokenize)]),
        (
            API,
            "/v1/tokens/batch",
            vec![web::post().to(tokenize_batch)],
        ),
        (REVEAL, "/v1/detokenize", vec![web::post().to(detokenize)]),
        (
            API,
            "/v1/tokens/{token}",
            vec![
                web::get().to(metadata),
                web::delete().to(delete),
                web::patch().to(update),
            ],
        ),
        (ADMIN, "/v1/audit/events", vec![web::get().to(audit_events)]),
        (ADMIN, "/v1/admin/unseal", vec![web::post().to(unseal)]),
        (ADMIN, "/v1/admin/seal", vec![web::post().to(seal)]),
        (
            ADMIN,
            "/v1/admin/seal-status",
            vec![web::get().to(seal_status)],
        ),
        (ADMIN, "/v1/admin/keys", vec![web::get().to(key_status)]),
        (
            ADMIN,
            "/v1/admin/keys/rotate",
            vec![web::post().to(rotate_keys)],
        ),
        (
            ADMIN,
            "/v1/admin/keys/{purpose}/{version}/retire",
            vec![web::post().to(retire_key)],
        ),
        (
            ADMIN,
            "/v1/admin/keys/{purpose}/{version}/destroy",
            vec![web::post().to(destroy_key)],
        ),
        (
            ADMIN,
            "/v1/admin/kek/rotate",
            vec![web::post().to(rotate_kek)],
        ),
        (
            ADMIN,
            "/v1/admin/kek/destroy",
            vec![web::post().to(destroy_kek)],
        ),
        (
            ADMIN,
            "/v1/audit/checkpoints",
            vec![web::get().to(audit_checkpoints)],
        ),
    ];
    for (homes, path, methods) in routes {
        if !listener.serves(homes) {
            continue;
        }
        let resource = methods
            .into_iter()
            .fold(web::resource(path), |r, route| r.route(route))
            .default_service(web::to(method_not_allowed));
        cfg.service(resource);
    }
}

pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// `GET /v1/ping` (any principal): the smallest authenticated call, the
/// benchmark's baseline (TLS, authentication, routing, JSON; no card).
async fn ping(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let ctx = authenticate(&req, &state).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "principal": ctx.principal.name,
    })))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let Ok(vault) = state.vault() else {
        return HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "sealed",
            "error": {"code": "sealed"},
            "seal": state.seal.status(),
        }));
    };
    match vault.ready().await {
        Ok(()) => {
            // Keys in use past their crypto-period are flagged, not fatal
            // (from the key rows only: no record counting here).
            let now = vault::store::now_millis();
            let periods = state.crypto_periods;
            let past: Vec<String> = match vault.store().load_keys().await {
                Ok(keys) => keys
                    .iter()
                    .filter(|k| k.state.is_loaded())
                    .filter(|k| {
                        let period = match k.purpose {
                            vault::store::KeyPurpose::Dek => periods.dek,
                            vault::store::KeyPurpose::Fingerprint => periods.fingerprint,
                        };
                        u128::try_from(now - k.created_at).unwrap_or(0) > period.as_millis()
                    })
                    .map(|k| format!("{}:{}", k.purpose.as_str(), k.version))
                    .collect(),
                Err(_) => Vec::new(),
            };
            HttpResponse::Ok()
                .json(serde_json::json!({"status": "ready", "keys_past_crypto_period": past}))
        }
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            HttpResponse::ServiceUnavailable()
                .json(serde_json::json!({"status": "unavailable", "error": {"code": e.code()}}))
        }
    }
}

/// `GET /metrics`: Prometheus text format (counts and states only).
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let body = state.metrics.render(&state).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}

/// Authenticate the caller (before the body is read, behind the flood
/// guard of `limits`) as its listener requires (see
/// `listeners::AuthMode`): an API key, the principal bound to its verified
/// client certificate, or both naming the same principal. Works sealed or
/// not (principals need no key). A failure is audited (if that write fails,
/// the caller gets a storage error), counted in the metrics and against
/// its source.
async fn authenticate(req: &HttpRequest, state: &AppState) -> Result<RequestContext, ApiError> {
    use vault::access::{AuthError, AuthFailure};
    let Caller {
        request_id,
        source,
        presented,
        ip,
    } = caller(req);
    let connection = req.conn_data::<Connection>();
    let mode = connection.map_or(AuthMode::ApiKey, |c| c.auth);
    let listener = connection.map_or("unknown", |c| c.listener.name());
    let certificate = connection.and_then(|c| c.client.clone());
    let auth = state.seal.authenticator();
    guard_source(state, ip, presented)?;
    async fn by_key(
        auth: &vault::access::Authenticator,
        presented: Option<&str>,
    ) -> Result<vault::access::Principal, AuthError> {
        match presented {
            Some(key) => auth.authenticate(key).await,
            None => Err(AuthError::Failed(AuthFailure::Missing)),
        }
    }
    let result = match (mode, certificate) {
        (AuthMode::ApiKey, _) | (AuthMode::MtlsOrApiKey, None) => by_key(auth, presented).await,
        (AuthMode::Mtls | AuthMode::MtlsOrApiKey, Some(cert)) => {
            auth.authenticate_cert(&cert.identities).await
        }
        // The handshake requires a certificate on these listeners.
        (AuthMode::Mtls | AuthMode::MtlsAndApiKey, None) => {
            Err(AuthError::Failed(AuthFailure::Missing))
        }
        (AuthMode::MtlsAndApiKey, Some(cert)) => {
            match auth.authenticate_cert(&cert.identities).await {
                Ok(by_cert) => match by_key(auth, presented).await {
                    Ok(p) if p.id == by_cert.id => Ok(by_cert),
                    Ok(_) => Err(AuthError::Failed(AuthFailure::CredentialMismatch)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        }
    };
    let failure = match result {
        Ok(principal) => {
            return Ok(RequestContext {
                principal,
                source,
                request_id,
            })
        }
        Err(AuthError::Store(e)) => return Err(vault::VaultError::from(e).into()),
        Err(AuthError::Failed(f)) => f,
    };
    state.metrics.auth_failure(listener, failure.as_str());
    record_auth_failure(
        state,
        ip,
        &source,
        Some(&request_id),
        failure.as_str().to_owned(),
    )
    .await
    .map_err(vault::VaultError::from)?;
    Err(vault::VaultError::Unauthenticated.into())
}

/// A failed authentication (a refused credential, or a client certificate
/// refused at the TLS handshake): audited with its source, and counted
/// against the source by the flood guard (also when the audit write
/// failed, which is returned).
pub(crate) async fn record_auth_failure(
    state: &AppState,
    ip: Option<std::net::IpAddr>,
    source: &str,
    request_id: Option<&str>,
    detail: String,
) -> Result<(), vault::store::StoreError> {
    let mut event = audit::AuditEvent::new(Action::AuthenticationFailed, audit::Outcome::Denied)
        .source(source)
        .error_code("unauthenticated")
        .detail(detail);
    event.request_id = request_id.map(str::to_owned);
    let written = state.seal.store().append_audit(event).await;
    count_failure(state, ip, request_id.unwrap_or_default()).await;
    written.map(|_| ())
}

/// Who is asking, as far as the request says before authentication.
struct Caller<'r> {
    request_id: String,
    /// `ip:port` of the peer, for the audit trail.
    source: String,
    /// The bearer credential (`""` for another scheme), if any.
    presented: Option<&'r str>,
    ip: Option<std::net::IpAddr>,
}

fn caller(req: &HttpRequest) -> Caller<'_> {
    let peer = req.peer_addr();
    Caller {
        request_id: req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default(),
        source: peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
        presented: req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| bearer(v).unwrap_or("")),
        ip: peer.map(|a| a.ip()),
    }
}

/// The flood guard in front of authentication: a blocked source gets 429
/// unless it presents a key this process already verified.
pub(crate) fn guard_source(
    state: &AppState,
    ip: Option<std::net::IpAddr>,
    presented: Option<&str>,
) -> Result<(), ApiError> {
    let Some(ip) = ip else { return Ok(()) };
    match state.sources.check(ip, std::time::Instant::now()) {
        Ok(()) => Ok(()),
        Err(_) if presented.is_some_and(|k| state.seal.authenticator().is_verified(k)) => Ok(()),
        Err(wait) => {
            state.sources.refuse();
            Err(ApiError::SourceBlocked(wait))
        }
    }
}

/// A failed authentication, counted against its source; the one that
/// blocks the source is a `source_blocked` audit event and a warning.
pub(crate) async fn count_failure(
    state: &AppState,
    ip: Option<std::net::IpAddr>,
    request_id: &str,
) {
    let Some(ip) = ip else { return };
    let Some(block) = state.sources.failed(ip, std::time::Instant::now()) else {
        return;
    };
    let detail = format!(
        "auth_failures_per_minute={} blocked_s={}",
        state.sources.limit_per_minute(),
        block.as_secs()
    );
    tracing::warn!(source = %ip, blocked_s = block.as_secs(), "too many failed authentications: source blocked");
    let event = audit::AuditEvent::new(Action::SourceBlocked, audit::Outcome::Denied)
        .source(ip.to_string())
        .request_id(request_id)
        .error_code("rate_limited")
        .detail(detail);
    // The block holds either way; a lost event is logged loudly.
    if let Err(e) = state.seal.store().append_audit(event).await {
        tracing::error!(error = %e, "cannot record a source block in the audit trail");
    }
}

/// The credential of `Authorization: Bearer <key>`; `None` if another scheme
/// or not ASCII (an empty key then fails authentication as malformed).
fn bearer(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let (scheme, rest) = s.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Whether a body has the shape every request body has: a JSON object whose
/// arrays (only the batch's `cards`) sit directly in it and hold objects.
/// serde's derived deserializers would also take a struct written as an
/// array of its fields in declaration order (`["shop-42", "<pan>", 12,
/// 2031]`); that is not our API, so it is refused before parsing. A scan of
/// the raw bytes (strings skipped), without copying anything out of them;
/// malformed JSON is left to the parser to report.
fn object_shaped(body: &[u8]) -> bool {
    // Containers open at this point: `true` for an array.
    let mut stack: Vec<bool> = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    // A value may start here inside an array (after `[` or `,`).
    let mut expect_array_value = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if stack.is_empty() && b != b'{' {
            return false;
        }
        if expect_array_value && b != b']' && b != b'{' {
            return false;
        }
        expect_array_value = false;
        match b {
            b'"' => in_string = true,
            b'{' => stack.push(false),
            b'[' => {
                // Only directly inside the top-level object.
                if stack.len() != 1 {
                    return false;
                }
                stack.push(true);
                expect_array_value = true;
            }
            b'}' | b']' => {
                stack.pop();
            }
            b',' if stack.last() == Some(&true) => expect_array_value = true,
            _ => {}
        }
    }
    true
}

/// Read and parse a JSON body: 415 unless JSON, 413 over `limit`, 400 when
/// not JSON or not of the schema. The raw bytes are zeroized afterwards.
async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    let deadline = req
        .app_data::<web::Data<AppState>>()
        .map_or(std::time::Duration::from_secs(10), |s| s.request_timeout);
    tokio::time::timeout(deadline, read_json_body(req, payload, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout)?
}

async fn read_json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    // Allocated once at the final size where the length is declared, so
    // growing does not leave unzeroized copies behind.
    let mut body = Zeroizing::new(Vec::with_capacity(declared.unwrap_or(4096).min(limit)));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::BodyRead)?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        if body.len() + chunk.len() > body.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                (body.len() + chunk.len())
                    .max(body.capacity() * 2)
                    .min(limit),
            ));
            bigger.extend_from_slice(&body);
            body = bigger;
        }
        body.extend_from_slice(&chunk);
    }
    // Syntax first (nothing is copied out of the body), then the shape,
    // then the schema: so not-JSON stays `malformed_json`.
    let syntax = |e: serde_json::Error| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::MalformedJson
        }
        _ => ApiError::InvalidRequest,
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(syntax)?;
    if !object_shaped(&body) {
        return Err(ApiError::InvalidRequest);
    }
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::MalformedJson
        }
        // The serde message may quote the offending value or key: never used.
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            ApiError::InvalidRequest
        }
    })
}

/// A string from the request that may hold card data: zeroized on drop,
/// never printed.
struct SecretString(Zeroizing<String>);

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SecretString;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretString, E> {
                Ok(SecretString(Zeroizing::new(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<SecretString, E> {
                Ok(SecretString(Zeroizing::new(v)))
            }
        }
        d.deserialize_string(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CardRequest {
    pan: SecretString,
    exp_month: i64,
    exp_year: i64,
    #[serde(default)]
    cardholder_name: Option<SecretString>,
    /// The security code: held in memory only, released once.
    #[serde(default)]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    tenant: String,
    pan: SecretString,
    exp_month: i64,
    exp_year: i64,
    #[serde(default)]
    cardholder_name: Option<SecretString>,
    #[serde(default)]
    cvc: Option<SecretString>,
    /// `random` (default) or `pan_shaped`.
    #[serde(default)]
    token_format: Option<String>,
    /// RFC 3339; after it the token is gone.
    #[serde(default)]
    expires_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    tenant: String,
    cards: Vec<CardRequest>,
    #[serde(default)]
    token_format: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    token: String,
    reason: String,
    /// Release the held security code with this answer (then it is gone).
    #[serde(default)]
    include_cvc: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    #[serde(default)]
    exp_month: Option<i64>,
    #[serde(default)]
    exp_year: Option<i64>,
    #[serde(default)]
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

#[derive(Serialize)]
struct TokenResponse {
    token: String,
    tenant: String,
    fingerprint: String,
    brand: &'static str,
    bin: String,
    last4: String,
    masked_pan: String,
    exp_month: u8,
    exp_year: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    created_at: String,
    token_format: &'static str,
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated: Option<bool>,
    cvc_available: bool,
}

impl TokenResponse {
    fn new(info: TokenInfo, with_created: bool) -> TokenResponse {
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

async fn tokenize(
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

#[derive(Serialize)]
#[serde(untagged)]
enum BatchItem<'a> {
    Token(TokenResponse),
    Error(ErrorBody<'a>),
}

async fn tokenize_batch(
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
    let items: Vec<BatchItem<'_>> = results
        .into_iter()
        .map(|r| match r {
            Ok(info) => BatchItem::Token(TokenResponse::new(info, true)),
            Err(e) => BatchItem::Error(ErrorBody::card(&e)),
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "results": items })))
}

#[derive(Serialize)]
struct DetokenizeResponse<'a> {
    token: &'a str,
    pan: &'a str,
    exp_month: u8,
    exp_year: u16,
    cardholder_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cvc: Option<&'a str>,
    cvc_available: bool,
}

async fn detokenize(
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
            exp_month: card.expiry.month(),
            exp_year: card.expiry.year(),
            cardholder_name: card.name.as_ref().map(|n| n.expose()),
            cvc: out.cvc.as_ref().map(|c| c.expose()),
            cvc_available: out.cvc_available,
        }))
}

/// `PATCH /v1/tokens/{token}` (role `tokenize`): a new expiry date or
/// cardholder name for a stored card, without its number.
async fn update(
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

async fn metadata(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    let info = vault.metadata(&ctx, &path).await?;
    Ok(HttpResponse::Ok().json(TokenResponse::new(info, false)))
}

async fn delete(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    vault.delete(&ctx, &path).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Query parameters of `GET /v1/audit/events`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    after: Option<u64>,
    limit: Option<u32>,
    principal: Option<String>,
    token: Option<String>,
    action: Option<String>,
    tenant: Option<String>,
    outcome: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
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

/// `GET /v1/audit/events` (role `auditor`): filtered, paginated by chain
/// number, each query audited. Entries carry their leaf and chain hashes.
async fn audit_events(
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
        after: params.after.unwrap_or(0),
        limit: params.limit.unwrap_or(100),
    };
    let page = vault.audit_query(&ctx, query).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(serde_json::json!({ "events": page.events, "next_after": page.next_after })))
}

/// `GET /v1/audit/checkpoints` (role `auditor`): every signed checkpoint and
/// the public key that verifies them.
async fn audit_checkpoints(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let vault = state.vault()?;
    let ctx = authenticate(&req, &state).await?;
    let checkpoints = vault.audit_checkpoints(&ctx).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "public_key": vault.audit_public_key(),
        "checkpoints": checkpoints,
    })))
}

/// The caller of an admin request, authenticated without the vault (which
/// may be sealed), with role `key_admin`; a refusal is audited.
async fn admin_context(
    req: &HttpRequest,
    state: &AppState,
    action: Action,
) -> Result<RequestContext, ApiError> {
    let ctx = authenticate(req, state).await?;
    if ctx.principal.has_role(Role::KeyAdmin) {
        return Ok(ctx);
    }
    let event = ctx
        .event(Action::AuthorizationDenied, audit::Outcome::Denied)
        .error_code("forbidden")
        .detail(format!("{}: role_not_permitted", action.as_str()));
    state
        .seal
        .store()
        .append_audit(event)
        .await
        .map_err(vault::VaultError::from)?;
    Err(vault::VaultError::Forbidden.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsealRequest {
    custodian: Option<String>,
    passphrase: Option<SecretString>,
}

/// `POST /v1/admin/unseal` (role `key_admin`): one custodian's passphrase
/// (keyring backend), or a new login to the HSM / a new read of the KEK
/// file (other backends, empty body `{}`). Every attempt is audited by
/// custodian name, never the passphrase.
async fn unseal(
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
async fn seal(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::Sealed).await?;
    let status = state.seal.seal(&ctx).await?;
    Ok(HttpResponse::Ok().json(status))
}

/// `GET /v1/admin/seal-status` (role `key_admin`).
async fn seal_status(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_context(&req, &state, Action::UnsealAttempt).await?;
    Ok(HttpResponse::Ok().json(state.seal.status()))
}

/// Unix milliseconds as RFC 3339. Times in answers are never bare digit
/// runs: a 13-digit millisecond count can pass the Luhn check and look
/// like a card number to every scanner (the fuzzer's check found one).
pub(crate) fn rfc3339_millis(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// A key's status as JSON (ages in days).
fn key_json(k: &vault::KeyInfo) -> serde_json::Value {
    const DAY: f64 = 86_400.0;
    serde_json::json!({
        "purpose": k.purpose.as_str(),
        "version": k.version,
        "state": k.state.as_str(),
        "created_at": rfc3339_millis(k.created_at),
        "age_days": (k.age.as_secs_f64() / DAY * 10.0).round() / 10.0,
        "crypto_period_days": (k.crypto_period.as_secs_f64() / DAY).round(),
        "past_crypto_period": k.past_crypto_period,
        "retired_at": k.retired_at.map(rfc3339_millis),
        "destroyed_at": k.destroyed_at.map(rfc3339_millis),
        "records": k.records,
    })
}

/// `GET /v1/admin/keys` (role `key_admin`): every key's version, state,
/// age, crypto-period and records, and the re-encryption progress.
async fn key_status(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_context(&req, &state, Action::KeyRotated).await?;
    let vault = state.vault()?;
    let status = vault.key_status(state.crypto_periods).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(serde_json::json!({
            "active_dek": status.active_dek,
            "active_fingerprint": status.active_fingerprint,
            "remaining": status.remaining,
            "reencrypted_at": status.reencrypted_at.map(rfc3339_millis),
            "keys": status.keys.iter().map(key_json).collect::<Vec<_>>(),
        })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    /// Also rotate the fingerprint key (re-fingerprinting in the same pass).
    #[serde(default)]
    fingerprint: bool,
}

/// `POST /v1/admin/keys/rotate` `{"fingerprint": bool}` (role `key_admin`):
/// a new active DEK (and fingerprint key); the background pass moves every
/// record to it.
async fn rotate_keys(
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
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "dek_version": rotation.dek_version,
        "fingerprint_version": rotation.fingerprint_version,
        "fingerprint_rotated": rotation.fingerprint_rotated,
    })))
}

/// The `{purpose}/{version}` of a key route; 404 for anything else.
fn key_path(path: &(String, String)) -> Result<(vault::store::KeyPurpose, u32), ApiError> {
    let purpose = vault::store::KeyPurpose::parse(&path.0).ok_or(ApiError::NotFound)?;
    let version = path.1.parse().map_err(|_| ApiError::NotFound)?;
    Ok((purpose, version))
}

/// `POST /v1/admin/keys/{purpose}/{version}/retire` (role `key_admin`).
async fn retire_key(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    change_key(req, &path, &state, Action::KeyRetired).await
}

/// `POST /v1/admin/keys/{purpose}/{version}/destroy` (role `key_admin`):
/// crypto-shred a retired key.
async fn destroy_key(
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
    Ok(HttpResponse::Ok().json(
        serde_json::json!({"purpose": purpose.as_str(), "version": version, "state": new_state}),
    ))
}

/// `POST /v1/admin/kek/rotate` (role `key_admin`): a new KEK version (in
/// the keyring or the HSM) and every stored key re-wrapped under it.
async fn rotate_kek(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::KekRotated).await?;
    let kek_id = state.seal.rotate_kek(&ctx).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "kek_id": kek_id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyKekRequest {
    kek_id: String,
}

/// `POST /v1/admin/kek/destroy` `{"kek_id"}` (role `key_admin`): destroy an
/// old KEK version that nothing is wrapped under any more.
async fn destroy_kek(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let ctx = admin_context(&req, &state, Action::KeyDestroyed).await?;
    let body: DestroyKekRequest = read_json(&req, payload, state.max_body_bytes).await?;
    state.seal.destroy_kek(&ctx, &body.kek_id).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"kek_id": body.kek_id, "state": "destroyed"})))
}

#[cfg(test)]
mod tests {
    use super::object_shaped;

    #[test]
    fn bodies_must_be_objects_with_arrays_of_objects() {
        for ok in [
            &br#"{"tenant":"t","pan":"x","exp_month":1,"exp_year":2}"#[..],
            br#" { "cards" : [ {"pan":"["}, { "pan" : "\"]" } ] , "tenant":"t"} "#,
            br#"{"cards":[]}"#,
            br#"{"reason":"a [b] {c}"}"#,
            // Malformed JSON is the parser's to report.
            br#"{"a":"#,
        ] {
            assert!(object_shaped(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &br#"["t","x",1,2]"#[..],
            br#"  [{"tenant":"t"}]"#,
            br#""string""#,
            br#"12"#,
            br#"{"cards":[["x",1,2,null]]}"#,
            br#"{"cards":[{"pan":"x"},["x"]]}"#,
            br#"{"cards":[1]}"#,
            br#"{"a":{"b":[{}]}}"#,
        ] {
            assert!(!object_shaped(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
