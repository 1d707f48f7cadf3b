//! The one mapping from errors to HTTP responses.
//!
//! Body: `{"error": {"code": "...", "message": "..."}}`. Codes are stable;
//! messages are written by us and never include request content.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use vault::{CardError, KeyLifecycleError, VaultError};

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
    Unseal(#[from] crate::seal::UnsealError),
    #[error(
        "the file backend's KEK cannot be rotated in place: move to the keyring or pkcs11 backend"
    )]
    KekRotationUnsupported,
    #[error("stored keys are still wrapped under this KEK: rotate the KEK first")]
    KekInUse,
    #[error("the request did not arrive within the request timeout")]
    RequestTimeout,
    #[error("request headers are too large (limit {0} bytes)")]
    HeadersTooLarge(usize),
    /// Too many failed authentications from this source address: refused
    /// before authentication for the given time.
    #[error("too many failed authentications from this address: retry later")]
    SourceBlocked(std::time::Duration),
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
            ApiError::KekRotationUnsupported => "kek_rotation_unsupported",
            ApiError::KekInUse => "kek_in_use",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::SourceBlocked(_) => "rate_limited",
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
        VaultError::Storage(_) | VaultError::Keys(_) => StatusCode::SERVICE_UNAVAILABLE,
        VaultError::Integrity | VaultError::Rng => StatusCode::INTERNAL_SERVER_ERROR,
        VaultError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        VaultError::TokenFormatNotPermitted => StatusCode::FORBIDDEN,
        VaultError::TokenSpaceExhausted { .. }
        | VaultError::TenantDeleted
        | VaultError::OlderExpiry => StatusCode::CONFLICT,
        VaultError::InvalidExpiresAt => StatusCode::BAD_REQUEST,
        VaultError::KeyLifecycle(k) => match k {
            KeyLifecycleError::NotFound => StatusCode::NOT_FOUND,
            // The record exists but its key is gone for good (crypto-shred).
            KeyLifecycleError::Destroyed | KeyLifecycleError::Retired => StatusCode::GONE,
            _ => StatusCode::CONFLICT,
        },
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub code: &'a str,
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
            ApiError::KekRotationUnsupported | ApiError::KekInUse => StatusCode::CONFLICT,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::SourceBlocked(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unseal(e) => match e {
                crate::seal::UnsealError::WrongPassphrase(_) => StatusCode::FORBIDDEN,
                crate::seal::UnsealError::UnknownCustodian
                | crate::seal::UnsealError::CustodianRequired => StatusCode::BAD_REQUEST,
                crate::seal::UnsealError::Kek(_) | crate::seal::UnsealError::Keys(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            },
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
