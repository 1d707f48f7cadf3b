//! Authentication, the one path every authenticated route takes: who the
//! caller is (API key, client certificate, or both, as the listener
//! requires), the flood guard in front of it, and the record of every
//! failure (audit event, metrics, count against the source). Also the role
//! check of the admin routes, which runs without the vault (it may be
//! sealed).

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpMessage, HttpRequest};
use audit::Action;
use vault::{RequestContext, Role};

use crate::error::ApiError;
use crate::listeners::{AuthMode, Connection};
use crate::state::{AppState, RequestId};

/// Authenticate the caller (before the body is read, behind the flood
/// guard of `limits`) as its listener requires (see
/// `listeners::AuthMode`): an API key, the principal bound to its verified
/// client certificate, or both naming the same principal. Works sealed or
/// not (principals need no key). A failure is audited (if that write fails,
/// the caller gets a storage error), counted in the metrics and against
/// its source.
pub async fn authenticate(req: &HttpRequest, state: &AppState) -> Result<RequestContext, ApiError> {
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
    let block = match shared_failure(state, ip).await {
        Some(shared) => shared,
        None => state.sources.failed(ip, std::time::Instant::now()),
    };
    let Some(block) = block else {
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

/// A failed authentication counted in the fleet's bucket of its source
/// (PostgreSQL): `None` when the store shares no state, or cannot be asked
/// (then the in-memory count decides); `Some(Some(block))` for the
/// instance whose failure started the fleet's block.
async fn shared_failure(
    state: &AppState,
    ip: std::net::IpAddr,
) -> Option<Option<std::time::Duration>> {
    let rate = state.sources.rate();
    if rate.is_off() {
        return Some(None);
    }
    let store = state.seal.store();
    let id = crate::limits::source_id(ip);
    let taken = match store.take_shared_rate("source", &id, rate).await {
        Ok(taken) => taken?,
        Err(e) => {
            tracing::warn!(error = %e, "shared failure count unavailable; counting in memory");
            return None;
        }
    };
    if taken.is_ok() {
        return Some(None);
    }
    let block = state.sources.block_duration();
    let now = std::time::Instant::now();
    match store.block_source(&id, block).await {
        Ok(started) => {
            state.sources.block(ip, block, now, started);
            Some(started.then_some(block))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record a source block for the fleet; blocking here");
            state.sources.block(ip, block, now, true);
            Some(Some(block))
        }
    }
}

/// The credential of `Authorization: Bearer <key>`; `None` if another scheme
/// or not ASCII (an empty key then fails authentication as malformed).
fn bearer(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let (scheme, rest) = s.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The caller of an admin request, authenticated without the vault (which
/// may be sealed), with role `key_admin`; a refusal is audited.
pub async fn admin_context(
    req: &HttpRequest,
    state: &AppState,
    action: Action,
) -> Result<RequestContext, ApiError> {
    admin_context_for(req, state, action, &[Role::KeyAdmin]).await
}

/// [`admin_context`] for a principal holding any of `roles`.
pub async fn admin_context_for(
    req: &HttpRequest,
    state: &AppState,
    action: Action,
    roles: &[Role],
) -> Result<RequestContext, ApiError> {
    let ctx = authenticate(req, state).await?;
    if roles.iter().any(|r| ctx.principal.has_role(*r)) {
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
