//! The one mapping from errors to HTTP responses.
//!
//! Body: `{"error": {"code": "...", "message": "..."}}`. Codes are stable;
//! messages are written by us and never include request content.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;
use vault::{CardError, KeyLifecycleError, VaultError};

use crate::seal::{SealError, UnsealError};

/// Every error an HTTP handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("request body is not valid JSON")]
    MalformedJson,
    #[error("request body does not match the expected schema (wrong type, missing, unknown or duplicate field)")]
    InvalidRequest,
    #[error("request body is too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("the request body could not be read")]
    BodyRead,
    #[error("the vault is sealed: card operations resume when it is unsealed")]
    Sealed,
    #[error(transparent)]
    Unseal(#[from] UnsealError),
    #[error(transparent)]
    Seal(SealError),
    #[error("the request did not arrive within the request timeout")]
    RequestTimeout,
    #[error("request headers are too large (limit {0} bytes)")]
    HeadersTooLarge(usize),
    /// Too many failed authentications from this source address: refused
    /// before authentication for the given time.
    #[error("too many failed authentications from this address: retry later")]
    SourceBlocked(std::time::Duration),
    /// Hosted collection needs `collect_public_url` (the edge's address).
    #[error("hosted collection is not configured: set collect_public_url")]
    CollectNotConfigured,
    /// Forwarding: no upstream of that name is configured.
    #[error("no upstream of that name is configured")]
    UnknownUpstream,
    /// Forwarding: the path is not one of the upstream's allowed paths
    /// (or not a plain path at all).
    #[error("this path is not allowed for the upstream")]
    PathNotAllowed,
    /// Forwarding: the body or its placeholders (see the code).
    #[error(transparent)]
    Template(#[from] vault::forward::TemplateError),
    #[error("the upstream could not be reached; nothing was received by it")]
    UpstreamUnreachable,
    #[error("the TLS handshake with the upstream failed (its certificate, or ours, was refused)")]
    UpstreamTls,
    #[error("the upstream did not answer in time: the outcome of the call at the upstream is unknown (retry with the same Idempotency-Key)")]
    UpstreamTimeout,
    #[error("the upstream's answer is larger than its max_response_bytes")]
    UpstreamResponseTooLarge,
    #[error("the upstream's answer holds a card number that could not be replaced by a token; it is not relayed")]
    UpstreamResponseUnsafe,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Vault(e) => e.code(),
            ApiError::MalformedJson => "malformed_json",
            ApiError::InvalidRequest => "invalid_request",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BodyRead => "invalid_request",
            ApiError::Sealed => "sealed",
            ApiError::Unseal(e) => e.code(),
            ApiError::Seal(e) => e.code(),
            ApiError::RequestTimeout => "request_timeout",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::SourceBlocked(_) => "rate_limited",
            ApiError::CollectNotConfigured => "collect_not_configured",
            ApiError::UnknownUpstream => "unknown_upstream",
            ApiError::PathNotAllowed => "path_not_allowed",
            ApiError::Template(e) => e.code(),
            ApiError::UpstreamUnreachable => "upstream_unreachable",
            ApiError::UpstreamTls => "upstream_tls",
            ApiError::UpstreamTimeout => "upstream_timeout",
            ApiError::UpstreamResponseTooLarge => "upstream_response_too_large",
            ApiError::UpstreamResponseUnsafe => "upstream_response_unsafe",
        }
    }
}

impl ApiError {
    /// How long a rate-limited caller should wait (`Retry-After`).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ApiError::SourceBlocked(wait) => Some(*wait),
            ApiError::Vault(VaultError::RateLimited { retry_after, .. }) => Some(*retry_after),
            _ => None,
        }
    }
}

/// HTTP status of a vault error.
fn vault_status(e: &VaultError) -> StatusCode {
    match e {
        VaultError::InvalidCard(_) => StatusCode::UNPROCESSABLE_ENTITY,
        VaultError::InvalidTenant
        | VaultError::InvalidReason
        | VaultError::InvalidBatchSize
        | VaultError::InvalidFilter(_) => StatusCode::BAD_REQUEST,
        VaultError::Unauthenticated => StatusCode::UNAUTHORIZED,
        VaultError::Forbidden => StatusCode::FORBIDDEN,
        VaultError::NotFound => StatusCode::NOT_FOUND,
        VaultError::Storage(_) | VaultError::StorageReadOnly(_) | VaultError::Keys(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        VaultError::Integrity | VaultError::Rng => StatusCode::INTERNAL_SERVER_ERROR,
        VaultError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        VaultError::TokenFormatNotPermitted => StatusCode::FORBIDDEN,
        VaultError::TokenSpaceExhausted { .. }
        | VaultError::TenantDeleted
        | VaultError::OlderExpiry => StatusCode::CONFLICT,
        VaultError::InvalidExpiresAt => StatusCode::BAD_REQUEST,
        VaultError::InvalidOrigin(_)
        | VaultError::InvalidTtl
        | VaultError::InvalidReference
        | VaultError::InvalidStyle(_) => StatusCode::BAD_REQUEST,
        VaultError::SessionExpired => StatusCode::GONE,
        VaultError::SessionCompleted | VaultError::SessionClosed | VaultError::SessionBusy => {
            StatusCode::CONFLICT
        }
        VaultError::WrongSecret => StatusCode::FORBIDDEN,
        VaultError::TooManyTokens | VaultError::MixedTenants => StatusCode::BAD_REQUEST,
        VaultError::UpstreamTenant => StatusCode::FORBIDDEN,
        VaultError::CvcUnavailable => StatusCode::CONFLICT,
        VaultError::InvalidIdempotencyKey => StatusCode::BAD_REQUEST,
        VaultError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        // Both about the key's state, never the upstream's answer: a 4xx,
        // which generic clients do not retry blindly (with a new key, a
        // retry after `upstream_outcome_unknown` could charge twice).
        VaultError::IdempotencyKeyInUse | VaultError::UpstreamOutcomeUnknown => {
            StatusCode::CONFLICT
        }
        VaultError::KeyLifecycle(k) => match k {
            KeyLifecycleError::NotFound => StatusCode::NOT_FOUND,
            // The record exists but its key is gone for good (crypto-shred).
            KeyLifecycleError::Destroyed | KeyLifecycleError::Retired => StatusCode::GONE,
            _ => StatusCode::CONFLICT,
        },
    }
}

/// HTTP status of a failed unseal.
fn unseal_status(e: &UnsealError) -> StatusCode {
    match e {
        UnsealError::WrongPassphrase(_) => StatusCode::FORBIDDEN,
        UnsealError::UnknownCustodian | UnsealError::CustodianRequired => StatusCode::BAD_REQUEST,
        UnsealError::Kek(_) | UnsealError::Keys(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<SealError> for ApiError {
    fn from(e: SealError) -> ApiError {
        match e {
            // One variant per meaning: a sealed vault is `Sealed` wherever
            // it is found, a vault error is `Vault`.
            SealError::Sealed => ApiError::Sealed,
            SealError::Vault(v) => ApiError::Vault(v),
            SealError::Unseal(u) => ApiError::Unseal(u),
            other => ApiError::Seal(other),
        }
    }
}

/// Who wrote an answer: `vault` on every error of the service, `upstream`
/// on the answer a forwarded call relays.
pub const SOURCE_HEADER: &str = "x-cardvault-source";

/// The error body of every answer that is not a success.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail<'a> {
    /// Stable error code (see each operation's error responses).
    #[schema(value_type = String)]
    pub code: &'a str,
    /// Written by the service; never quotes the request.
    pub message: String,
}

impl<'a> ErrorBody<'a> {
    /// The error object of one card in a batch response.
    pub fn card(e: &CardError) -> ErrorBody<'a> {
        ErrorBody {
            error: ErrorDetail {
                code: e.code(),
                message: e.to_string(),
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Vault(e) => vault_status(e),
            ApiError::MalformedJson | ApiError::InvalidRequest | ApiError::BodyRead => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Sealed => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Seal(SealError::Sealed) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Seal(SealError::KekNotFound) => StatusCode::NOT_FOUND,
            ApiError::Seal(SealError::KekRotationUnsupported | SealError::KekInUse) => {
                StatusCode::CONFLICT
            }
            ApiError::Seal(SealError::Unseal(e)) => unseal_status(e),
            ApiError::Seal(SealError::Vault(e)) => vault_status(e),
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::SourceBlocked(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::CollectNotConfigured => StatusCode::CONFLICT,
            ApiError::Unseal(e) => unseal_status(e),
            ApiError::UnknownUpstream => StatusCode::NOT_FOUND,
            ApiError::PathNotAllowed => StatusCode::FORBIDDEN,
            ApiError::Template(vault::forward::TemplateError::UnsupportedContentType) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            // The card lacks what a placeholder names (no name, no expiry),
            // or a value cannot be written in this body type.
            ApiError::Template(
                vault::forward::TemplateError::MissingValue { .. }
                | vault::forward::TemplateError::InvalidValue { .. },
            ) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Template(_) => StatusCode::BAD_REQUEST,
            ApiError::UpstreamUnreachable
            | ApiError::UpstreamTls
            | ApiError::UpstreamResponseTooLarge
            | ApiError::UpstreamResponseUnsafe => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            // The source chain names database or key errors, never card data.
            tracing::error!(code = self.code(), error = %error_chain(self), "request failed");
        }
        let message = match self {
            // Server-side details stay in the log.
            ApiError::Vault(VaultError::Storage(_)) => {
                "storage is unavailable; retry later".to_owned()
            }
            ApiError::Vault(VaultError::StorageReadOnly(_)) => {
                "storage cannot commit; retry later".to_owned()
            }
            ApiError::Vault(VaultError::Keys(_)) => "keys are unavailable; retry later".to_owned(),
            other => other.to_string(),
        };
        let mut res = HttpResponse::build(status).json(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
            },
        });
        if let Some(wait) = self.retry_after() {
            let secs = crate::limits::retry_after_secs(wait);
            res.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from(secs),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                actix_web::http::header::WWW_AUTHENTICATE,
                actix_web::http::header::HeaderValue::from_static("Bearer"),
            );
        }
        // Every error is the vault's own: never confused with an answer a
        // forwarded call relays from its upstream (`upstream` there).
        res.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static(SOURCE_HEADER),
            actix_web::http::header::HeaderValue::from_static("vault"),
        );
        res
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// One error of every kind the service answers, for the catalogue below.
/// The `match` makes a new `ApiError` variant a compile error here until
/// its sample is added.
fn samples() -> Vec<ApiError> {
    use hsm_shim::KekError;
    use vault::keys::KeysError;
    use vault::store::StoreError;
    let all = vec![
        ApiError::MalformedJson,
        ApiError::InvalidRequest,
        ApiError::PayloadTooLarge(0),
        ApiError::UnsupportedMediaType,
        ApiError::NotFound,
        ApiError::MethodNotAllowed,
        ApiError::BodyRead,
        ApiError::Sealed,
        ApiError::RequestTimeout,
        ApiError::HeadersTooLarge(0),
        ApiError::SourceBlocked(std::time::Duration::ZERO),
        ApiError::Unseal(UnsealError::WrongPassphrase(String::new())),
        ApiError::Unseal(UnsealError::UnknownCustodian),
        ApiError::Unseal(UnsealError::CustodianRequired),
        ApiError::Unseal(UnsealError::Kek(KekError::Rng)),
        ApiError::Unseal(UnsealError::Keys(KeysError::Store(StoreError::Timeout))),
        ApiError::Seal(SealError::KekRotationUnsupported),
        ApiError::Seal(SealError::KekInUse),
        ApiError::Seal(SealError::KekNotFound),
        ApiError::CollectNotConfigured,
        ApiError::UnknownUpstream,
        ApiError::PathNotAllowed,
        ApiError::Template(vault::forward::TemplateError::UnsupportedContentType),
        ApiError::Template(vault::forward::TemplateError::InvalidBody("")),
        ApiError::Template(vault::forward::TemplateError::InvalidPlaceholder { offset: 0 }),
        ApiError::Template(vault::forward::TemplateError::TooManyTokens),
        ApiError::Template(vault::forward::TemplateError::MissingValue {
            offset: 0,
            field: vault::forward::Field::Pan,
        }),
        ApiError::Template(vault::forward::TemplateError::InvalidValue {
            offset: 0,
            field: vault::forward::Field::Pan,
        }),
        ApiError::UpstreamUnreachable,
        ApiError::UpstreamTls,
        ApiError::UpstreamTimeout,
        ApiError::UpstreamResponseTooLarge,
        ApiError::UpstreamResponseUnsafe,
    ];
    for e in &all {
        match e {
            ApiError::Vault(_)
            | ApiError::MalformedJson
            | ApiError::InvalidRequest
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType
            | ApiError::NotFound
            | ApiError::MethodNotAllowed
            | ApiError::BodyRead
            | ApiError::Sealed
            | ApiError::Unseal(_)
            | ApiError::Seal(_)
            | ApiError::RequestTimeout
            | ApiError::HeadersTooLarge(_)
            | ApiError::SourceBlocked(_)
            | ApiError::CollectNotConfigured
            | ApiError::UnknownUpstream
            | ApiError::PathNotAllowed
            | ApiError::Template(_)
            | ApiError::UpstreamUnreachable
            | ApiError::UpstreamTls
            | ApiError::UpstreamTimeout
            | ApiError::UpstreamResponseTooLarge
            | ApiError::UpstreamResponseUnsafe => {}
        }
    }
    let card = [
        CardError::Pan(vault::pan::PanError::Length(0)),
        CardError::Data(vault::card::CardDataError::Expired),
        CardError::Data(vault::card::CardDataError::ExpiryMonth),
        CardError::Data(vault::card::CardDataError::CardholderName),
        CardError::Cvc,
    ];
    let lifecycle = [
        KeyLifecycleError::NotFound,
        KeyLifecycleError::Active,
        KeyLifecycleError::InUse,
        KeyLifecycleError::WrongState(vault::store::KeyState::Active),
        KeyLifecycleError::Conflict,
        KeyLifecycleError::SameKek,
        KeyLifecycleError::Destroyed,
        KeyLifecycleError::Retired,
    ];
    let vault = [
        VaultError::InvalidTenant,
        VaultError::InvalidReason,
        VaultError::InvalidBatchSize,
        VaultError::Unauthenticated,
        VaultError::Forbidden,
        VaultError::NotFound,
        VaultError::Storage(StoreError::Timeout),
        VaultError::Keys(KeysError::Store(StoreError::Timeout)),
        VaultError::Integrity,
        VaultError::Rng,
        VaultError::InvalidFilter(""),
        VaultError::TokenFormatNotPermitted,
        VaultError::TokenSpaceExhausted { used: 0, space: 0 },
        VaultError::TenantDeleted,
        VaultError::InvalidExpiresAt,
        VaultError::OlderExpiry,
        VaultError::RateLimited {
            scope: vault::monitor::LimitScope::Principal,
            retry_after: std::time::Duration::ZERO,
        },
        VaultError::InvalidOrigin(vault::collect::OriginError::Shape),
        VaultError::InvalidTtl,
        VaultError::InvalidReference,
        VaultError::InvalidStyle(""),
        VaultError::SessionExpired,
        VaultError::SessionCompleted,
        VaultError::SessionClosed,
        VaultError::WrongSecret,
        VaultError::SessionBusy,
        VaultError::TooManyTokens,
        VaultError::UpstreamTenant,
        VaultError::MixedTenants,
        VaultError::CvcUnavailable,
        VaultError::InvalidIdempotencyKey,
        VaultError::IdempotencyKeyReused,
        VaultError::IdempotencyKeyInUse,
        VaultError::UpstreamOutcomeUnknown,
    ];
    all.into_iter()
        .chain(card.into_iter().map(|c| ApiError::Vault(c.into())))
        .chain(lifecycle.into_iter().map(|k| ApiError::Vault(k.into())))
        .chain(vault.into_iter().map(ApiError::Vault))
        .collect()
}

/// The HTTP status of a stable error code, from the mapping above (the
/// OpenAPI document's error responses are built from it).
pub fn error_status(code: &str) -> Option<u16> {
    use std::sync::OnceLock;
    static CATALOGUE: OnceLock<Vec<(&'static str, u16)>> = OnceLock::new();
    CATALOGUE
        .get_or_init(|| {
            samples()
                .iter()
                .map(|e| (e.code(), e.status_code().as_u16()))
                .collect()
        })
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A code means one status wherever it is answered (the document lists
    /// codes per status).
    #[test]
    fn every_code_has_one_status() {
        let mut seen: std::collections::HashMap<&str, u16> = Default::default();
        for e in samples() {
            let status = e.status_code().as_u16();
            if let Some(before) = seen.insert(e.code(), status) {
                assert_eq!(before, status, "{} answers two statuses", e.code());
            }
        }
        assert_eq!(error_status("invalid_pan"), Some(422));
        assert_eq!(error_status("sealed"), Some(503));
        assert_eq!(error_status("kek_in_use"), Some(409));
        assert_eq!(error_status("no_such_code"), None);
    }
}
