//! The route table and the handlers, one module per area: [`cards`]
//! (tokenize, batch, metadata, update, delete), [`collect`] (hosted
//! collection sessions), [`reveal`] (detokenize),
//! [`admin`] (seal, keys, KEK), [`audit`] (events, checkpoints),
//! [`health`] (liveness, readiness, metrics, ping) and [`openapi`] (the API
//! document, built from the handlers' annotations and this table).
//!
//! Each handler authenticates first (`crate::auth`, the one path), then
//! checks the role, then reads its body ([`body`]); it parses the request
//! into domain input, calls the vault and shapes the response. No SQL, no
//! crypto, no card logic here.
//!
//! [`ROUTES`] is the one list of what is served: its home listeners, the
//! method and path, who may call it and the stable error codes it can
//! answer. The listeners, the OpenAPI document and the e2e authorization
//! matrix all read it.

pub mod admin;
pub mod audit;
pub(crate) mod body;
pub mod cards;
pub mod collect;
pub mod forward;
pub mod health;
pub mod openapi;
pub mod reveal;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::listeners::ListenerKind;

/// Where a route is served (see `listeners`).
const ALL: &[ListenerKind] = &[ListenerKind::Api, ListenerKind::Reveal, ListenerKind::Admin];
const API: &[ListenerKind] = &[ListenerKind::Api];
const REVEAL: &[ListenerKind] = &[ListenerKind::Reveal];
const ADMIN: &[ListenerKind] = &[ListenerKind::Admin];

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (liveness, readiness, metrics, the API document).
    Open,
    /// Any authenticated principal.
    AnyPrincipal,
    /// A principal holding one of these roles.
    Roles(&'static [&'static str]),
}

/// One served route.
#[derive(Debug)]
pub struct Route {
    /// The listeners it is served on (`--dev` serves every route).
    pub homes: &'static [ListenerKind],
    pub method: Method,
    /// The actix path pattern (`{name}` segments), as in the document.
    pub path: &'static str,
    pub access: Access,
    /// The stable error codes it may answer (their statuses come from
    /// `crate::error`); the OpenAPI document lists them per status.
    pub errors: &'static [&'static str],
    handler: fn() -> actix_web::Route,
}

impl Route {
    /// The path as the OpenAPI document writes it: `{name}` for a segment
    /// matched by a pattern (`{path:.*}` is `{path}`).
    pub fn document_path(&self) -> String {
        let mut out = String::with_capacity(self.path.len());
        let mut in_pattern = false;
        for c in self.path.chars() {
            match c {
                ':' if out.rfind('{') > out.rfind('}') => in_pattern = true,
                '}' => {
                    in_pattern = false;
                    out.push(c);
                }
                _ if in_pattern => {}
                _ => out.push(c),
            }
        }
        out
    }
}

/// What every authenticated route may answer besides its own errors.
const AUTH_ERRORS: &[&str] = &[
    "unauthenticated",
    "rate_limited",
    "storage_unavailable",
    "headers_too_large",
];
/// What a route that reads a JSON body may answer about the body.
const BODY_ERRORS: &[&str] = &[
    "unsupported_media_type",
    "payload_too_large",
    "malformed_json",
    "invalid_request",
    "request_timeout",
];

macro_rules! route {
    ($homes:expr, $method:ident, $path:literal, $access:expr, $handler:path, [$($errors:expr),* $(,)?]) => {
        Route {
            homes: $homes,
            method: Method::$method,
            path: $path,
            access: $access,
            errors: concat_codes!($($errors),*),
            handler: || web::to($handler),
        }
    };
}

/// The error codes of a route, as one static list (no duplicates matter:
/// the document groups them per status).
macro_rules! concat_codes {
    ($($list:expr),*) => {{
        const LISTS: &[&[&str]] = &[$($list),*];
        const LEN: usize = {
            let mut n = 0;
            let mut i = 0;
            while i < LISTS.len() {
                n += LISTS[i].len();
                i += 1;
            }
            n
        };
        const CODES: [&str; LEN] = {
            let mut out = [""; LEN];
            let (mut i, mut k) = (0, 0);
            while i < LISTS.len() {
                let mut j = 0;
                while j < LISTS[i].len() {
                    out[k] = LISTS[i][j];
                    j += 1;
                    k += 1;
                }
                i += 1;
            }
            out
        };
        &CODES
    }};
}

const CARD_ERRORS: &[&str] = &[
    "invalid_pan",
    "card_expired",
    "invalid_expiry",
    "invalid_cardholder_name",
    "invalid_cvc",
];
const COLLECT_INPUT_ERRORS: &[&str] = &[
    "invalid_origin",
    "invalid_ttl",
    "invalid_reference",
    "invalid_style",
];
const KEY_ADMIN: Access = Access::Roles(&["key_admin"]);
const SEALED: &[&str] = &["sealed"];
const FORBIDDEN: &[&str] = &["forbidden"];

/// What a forwarded call may answer of its own (the upstream's answers are
/// relayed, whatever their status).
const FORWARD_ERRORS: &[&str] = &[
    "unknown_upstream",
    "path_not_allowed",
    "unsupported_content_type",
    "payload_too_large",
    "request_timeout",
    "invalid_request",
    "invalid_body",
    "invalid_placeholder",
    "too_many_tokens",
    "mixed_tenants",
    "tenant_not_allowed",
    "not_found",
    "cvc_unavailable",
    "missing_value",
    "invalid_value",
    "upstream_unreachable",
    "upstream_tls",
    "upstream_timeout",
    "upstream_response_too_large",
    "upstream_response_unsafe",
    "keys_unavailable",
    "integrity_error",
    "invalid_idempotency_key",
    "idempotency_key_reused",
    "idempotency_key_in_use",
    "upstream_outcome_unknown",
];
const FORWARD: Access = Access::Roles(&["forward"]);

/// Every route of the service, in the order they are matched.
pub static ROUTES: &[Route] = &[
    route!(ALL, GET, "/healthz", Access::Open, health::healthz, []),
    // Its 503 body is its own (`health::NotReady`), in its annotation.
    route!(ADMIN, GET, "/readyz", Access::Open, health::readyz, []),
    route!(ADMIN, GET, "/metrics", Access::Open, health::metrics, []),
    route!(
        ADMIN,
        GET,
        "/v1/openapi.json",
        Access::Open,
        openapi::document,
        []
    ),
    route!(
        API,
        GET,
        "/v1/ping",
        Access::AnyPrincipal,
        health::ping,
        [AUTH_ERRORS]
    ),
    route!(
        API,
        POST,
        "/v1/tokens",
        Access::Roles(&["tokenize"]),
        cards::tokenize,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            CARD_ERRORS,
            &[
                "invalid_tenant",
                "invalid_expires_at",
                "token_format_not_permitted",
                "token_space_exhausted",
                "tenant_deleted",
                "keys_unavailable"
            ],
        ]
    ),
    route!(
        API,
        POST,
        "/v1/tokens/batch",
        Access::Roles(&["tokenize"]),
        cards::tokenize_batch,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            &[
                "invalid_tenant",
                "invalid_batch_size",
                "invalid_expires_at",
                "token_format_not_permitted",
                "token_space_exhausted",
                "tenant_deleted",
                "keys_unavailable"
            ],
        ]
    ),
    route!(
        API,
        POST,
        "/v1/collect/sessions",
        Access::Roles(&["tokenize"]),
        collect::create_session,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            COLLECT_INPUT_ERRORS,
            &[
                "invalid_tenant",
                "token_format_not_permitted",
                "tenant_deleted",
                "collect_not_configured"
            ]
        ]
    ),
    route!(
        API,
        GET,
        "/v1/collect/sessions/{session}",
        Access::Roles(&["tokenize"]),
        collect::read_session,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            &["not_found", "key_destroyed", "key_retired"]
        ]
    ),
    route!(
        API,
        GET,
        "/v1/collect/sessions/{session}/public",
        Access::Roles(&["collect"]),
        collect::public_session,
        [AUTH_ERRORS, FORBIDDEN, SEALED, &["not_found"]]
    ),
    route!(
        API,
        POST,
        "/v1/collect/sessions/{session}/complete",
        Access::Roles(&["collect"]),
        collect::complete_session,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            CARD_ERRORS,
            &[
                "not_found",
                "wrong_secret",
                "session_expired",
                "session_completed",
                "session_closed",
                "session_busy",
                "token_space_exhausted",
                "tenant_deleted",
                "keys_unavailable",
                "key_destroyed",
                "key_retired"
            ]
        ]
    ),
    route!(
        REVEAL,
        POST,
        "/v1/detokenize",
        Access::Roles(&["detokenize"]),
        reveal::detokenize,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            &[
                "not_found",
                "invalid_reason",
                "key_destroyed",
                "key_retired",
                "keys_unavailable"
            ],
        ]
    ),
    route!(
        API,
        GET,
        "/v1/tokens/{token}",
        Access::Roles(&["tokenize"]),
        cards::metadata,
        [AUTH_ERRORS, FORBIDDEN, SEALED, &["not_found"],]
    ),
    route!(
        API,
        DELETE,
        "/v1/tokens/{token}",
        Access::Roles(&["tokenize", "detokenize"]),
        cards::delete,
        [AUTH_ERRORS, FORBIDDEN, SEALED, &["not_found"],]
    ),
    route!(
        API,
        PATCH,
        "/v1/tokens/{token}",
        Access::Roles(&["tokenize"]),
        cards::update,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            &[
                "not_found",
                "invalid_expiry",
                "card_expired",
                "invalid_cardholder_name",
                "older_expiry",
                "key_destroyed",
                "key_retired",
                "keys_unavailable"
            ],
        ]
    ),
    route!(
        ADMIN,
        GET,
        "/v1/audit/events",
        Access::Roles(&["auditor"]),
        audit::events,
        [AUTH_ERRORS, FORBIDDEN, SEALED, &["invalid_filter"],]
    ),
    route!(
        ADMIN,
        GET,
        "/v1/audit/checkpoints",
        Access::Roles(&["auditor"]),
        audit::checkpoints,
        [AUTH_ERRORS, FORBIDDEN, SEALED,]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/unseal",
        KEY_ADMIN,
        admin::unseal,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            BODY_ERRORS,
            &[
                "wrong_passphrase",
                "unknown_custodian",
                "custodian_required",
                "kek_unavailable",
                "keys_unavailable"
            ],
        ]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/seal",
        KEY_ADMIN,
        admin::seal,
        [AUTH_ERRORS, FORBIDDEN]
    ),
    route!(
        ADMIN,
        GET,
        "/v1/admin/upstreams",
        Access::Roles(&["key_admin", "auditor"]),
        admin::upstreams,
        [AUTH_ERRORS, FORBIDDEN]
    ),
    route!(
        ADMIN,
        GET,
        "/v1/admin/seal-status",
        KEY_ADMIN,
        admin::seal_status,
        [AUTH_ERRORS, FORBIDDEN]
    ),
    route!(
        ADMIN,
        GET,
        "/v1/admin/keys",
        KEY_ADMIN,
        admin::key_status,
        [AUTH_ERRORS, FORBIDDEN, SEALED]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/keys/rotate",
        KEY_ADMIN,
        admin::rotate_keys,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            &["key_conflict", "keys_unavailable"],
        ]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/keys/audit_signing/rotate",
        KEY_ADMIN,
        admin::rotate_audit_signing,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            &["key_conflict", "keys_unavailable"],
        ]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/keys/{purpose}/{version}/retire",
        KEY_ADMIN,
        admin::retire_key,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            &[
                "not_found",
                "key_not_found",
                "key_active",
                "key_in_use",
                "key_state",
                "key_conflict"
            ],
        ]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/keys/{purpose}/{version}/destroy",
        KEY_ADMIN,
        admin::destroy_key,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            &[
                "not_found",
                "key_not_found",
                "key_active",
                "key_in_use",
                "key_state",
                "key_conflict"
            ],
        ]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/kek/rotate",
        KEY_ADMIN,
        admin::rotate_kek,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            &[
                "kek_rotation_unsupported",
                "kek_unavailable",
                "kek_unchanged",
                "keys_unavailable"
            ],
        ]
    ),
    route!(
        REVEAL,
        POST,
        "/v1/forward/{upstream}/{path:.*}",
        FORWARD,
        forward::forward,
        [AUTH_ERRORS, FORBIDDEN, SEALED, FORWARD_ERRORS]
    ),
    route!(
        REVEAL,
        PUT,
        "/v1/forward/{upstream}/{path:.*}",
        FORWARD,
        forward::forward,
        [AUTH_ERRORS, FORBIDDEN, SEALED, FORWARD_ERRORS]
    ),
    route!(
        REVEAL,
        PATCH,
        "/v1/forward/{upstream}/{path:.*}",
        FORWARD,
        forward::forward,
        [AUTH_ERRORS, FORBIDDEN, SEALED, FORWARD_ERRORS]
    ),
    route!(
        ADMIN,
        POST,
        "/v1/admin/kek/destroy",
        KEY_ADMIN,
        admin::destroy_kek,
        [
            AUTH_ERRORS,
            FORBIDDEN,
            SEALED,
            BODY_ERRORS,
            &[
                "not_found",
                "kek_in_use",
                "kek_rotation_unsupported",
                "kek_unavailable"
            ],
        ]
    ),
];

/// The routes of one listener; any other method on a known path is 405,
/// a path of another listener is 404.
pub fn configure_for(cfg: &mut web::ServiceConfig, listener: ListenerKind) {
    let mut paths: Vec<&str> = Vec::new();
    for route in ROUTES {
        if listener.serves(route.homes) && !paths.contains(&route.path) {
            paths.push(route.path);
        }
    }
    for path in paths {
        let served: Vec<&Route> = ROUTES
            .iter()
            .filter(|r| r.path == path && listener.serves(r.homes))
            .collect();
        let allow = served
            .iter()
            .map(|r| r.method.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let resource = served
            .iter()
            .fold(web::resource(path), |res, r| {
                res.route((r.handler)().method(r.method.clone()))
            })
            .default_service(web::to(move || method_not_allowed(allow.clone())));
        cfg.service(resource);
    }
}

pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// 405, with the `Allow` header RFC 9110 asks for: the methods the path
/// has on this listener.
async fn method_not_allowed(allow: String) -> HttpResponse {
    use actix_web::ResponseError as _;
    let mut res = ApiError::MethodNotAllowed.error_response();
    if let Ok(v) = HeaderValue::from_str(&allow) {
        res.headers_mut().insert(header::ALLOW, v);
    }
    res
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
