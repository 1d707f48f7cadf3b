//! Liveness (`/healthz`), readiness (`/readyz`), Prometheus metrics
//! (`/metrics`) and the authenticated baseline (`/v1/ping`).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::authenticate;
use crate::error::ApiError;
use crate::seal::SealStatus;
use crate::state::AppState;

/// `{"status": "ok"}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Alive {
    #[schema(example = "ok")]
    status: &'static str,
}

/// `GET /healthz` (no credentials, every listener): 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process runs.", body = Alive)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Alive { status: "ok" })
}

/// The answer of `/v1/ping`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Pong<'a> {
    #[schema(example = "ok")]
    status: &'static str,
    /// The authenticated principal's name.
    principal: &'a str,
}

/// `GET /v1/ping` (any principal): the smallest authenticated call, the
/// benchmark's baseline (TLS, authentication, routing, JSON; no card).
#[utoipa::path(get, path = "/v1/ping", tag = "health",
    responses((status = 200, description = "Authenticated.", body = Pong)))]
pub async fn ping(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let ctx = authenticate(&req, &state).await?;
    Ok(HttpResponse::Ok().json(Pong {
        status: "ok",
        principal: &ctx.principal.name,
    }))
}

/// `/readyz` when ready.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Ready {
    /// `ready`.
    #[schema(example = "ready")]
    status: &'static str,
    /// Keys in use past their crypto-period (`purpose:version`; the audit
    /// signing key that signs as `audit_signing:generation`): flagged, not
    /// fatal.
    keys_past_crypto_period: Vec<String>,
}

/// `/readyz` when not ready.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NotReady {
    /// `sealed` or `unavailable`.
    #[schema(example = "sealed")]
    status: &'static str,
    error: NotReadyCode,
    /// While sealed: the seal state.
    #[serde(skip_serializing_if = "Option::is_none")]
    seal: Option<SealStatus>,
}

/// Why the service is not ready: `sealed`, `storage_unavailable` (the
/// database does not answer), `storage_read_only` (it answers but cannot
/// commit: a full disk, a read-only database, a standby) or
/// `keys_unavailable`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NotReadyCode {
    code: &'static str,
}

/// `GET /readyz` (no credentials): 200 when storage answers and commits
/// (the probe writes one row) and keys are loaded; 503 while sealed, when
/// storage does not answer, cannot commit, or keys are unavailable.
/// Recovers by itself.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Storage answers and commits, and the keys are loaded.", body = Ready),
        (status = 503, description = "Sealed (`status: sealed`), or storage or keys unavailable (`status: unavailable`; `error.code`: `storage_unavailable`, `storage_read_only` when the database answers but cannot commit, `keys_unavailable`).", body = NotReady),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let Ok(vault) = state.vault() else {
        return HttpResponse::ServiceUnavailable().json(NotReady {
            status: "sealed",
            error: NotReadyCode { code: "sealed" },
            seal: Some(state.seal.status()),
        });
    };
    match vault.ready().await {
        Ok(()) => {
            // Keys in use past their crypto-period are flagged, not fatal
            // (from the key rows only: no record counting here).
            let now = vault::store::now_millis();
            let periods = state.crypto_periods;
            let mut past: Vec<String> = match vault.store().load_keys().await {
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
            // The audit signing key that signs (not retired) too.
            if let Ok(rows) = vault.store().load_signing_keys().await {
                past.extend(
                    rows.iter()
                        .filter(|k| k.retired_at.is_none())
                        .filter(|k| {
                            u128::try_from(now - k.created_at).unwrap_or(0)
                                > periods.audit_signing.as_millis()
                        })
                        .map(|k| format!("audit_signing:{}", k.generation)),
                );
            }
            HttpResponse::Ok().json(Ready {
                status: "ready",
                keys_past_crypto_period: past,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            HttpResponse::ServiceUnavailable().json(NotReady {
                status: "unavailable",
                error: NotReadyCode { code: e.code() },
                seal: None,
            })
        }
    }
}

/// `GET /metrics` (no credentials): Prometheus text format (counts and
/// states only).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format, version 0.0.4.",
        content_type = "text/plain", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let body = state
        .metrics
        .render(
            &state.seal,
            state.crypto_periods,
            &state.monitor,
            &state.sources,
            state.tls.as_ref().and_then(|t| t.crl_status()),
        )
        .await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}
