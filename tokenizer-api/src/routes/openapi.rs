//! The OpenAPI 3.1 document of the service (`GET /v1/openapi.json`, and
//! `docs/openapi.json` in the repository).
//!
//! Request and success bodies come from the handlers' `#[utoipa::path]`
//! annotations and the `ToSchema` types beside them. The rest comes from the
//! route table ([`super::ROUTES`]): which listener serves each operation
//! (`x-cardvault-listener`), who may call it (`x-cardvault-roles` and the
//! security schemes), and its error answers, one response per status with
//! the stable codes it can carry (statuses from `crate::error`, the one
//! error-to-HTTP mapping). [`document`] fails to build if the annotations
//! and the table disagree about a single operation, so a route cannot be
//! served without being documented, nor documented without being served.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use super::{admin, audit, cards, collect, forward, health, reveal, Access, ROUTES};
use crate::error::{error_status, ErrorBody};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cardvault",
        description = "The card vault and tokenizer of the payment aggregator: \
            the one service that sees card numbers. Three listeners, each on its \
            own address: `api` (tokenize, metadata, update, delete: the checkout \
            network), `reveal` (detokenize: the payment router only) and `admin` \
            (health, metrics, keys, unseal, audit: the operators' network); each \
            operation names its listener in `x-cardvault-listener` (`--dev` serves \
            every operation on one loopback listener). Errors are \
            `{\"error\": {\"code\", \"message\"}}` with stable codes, listed per \
            status on every operation. Every response carries `x-request-id`, \
            also recorded in the audit trail."
    ),
    paths(
        health::healthz,
        health::readyz,
        health::metrics,
        health::ping,
        document,
        cards::tokenize,
        cards::tokenize_batch,
        cards::metadata,
        cards::update,
        cards::delete,
        collect::create_session,
        collect::read_session,
        collect::public_session,
        collect::complete_session,
        reveal::detokenize,
        forward::forward,
        forward::forward_put,
        forward::forward_patch,
        audit::events,
        audit::checkpoints,
        admin::unseal,
        admin::seal,
        admin::seal_status,
        admin::upstreams,
        admin::key_status,
        admin::rotate_keys,
        admin::rotate_audit_signing,
        admin::retire_key,
        admin::destroy_key,
        admin::rotate_kek,
        admin::destroy_kek,
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "cards", description = "Tokenize and manage cards (api listener)."),
        (name = "collect", description = "Hosted card collection sessions (api listener): opened and read back by the checkout server (role `tokenize`), completed by the edge (role `collect`)."),
        (name = "reveal", description = "Detokenize (reveal listener)."),
        (name = "audit", description = "The tamper-evident audit trail (admin listener, role `auditor`)."),
        (name = "admin", description = "Seal, keys and KEK (admin listener, role `key_admin`)."),
        (name = "health", description = "Liveness, readiness, metrics, the API document and the authenticated ping."),
    )
)]
struct Annotated;

/// Why the document cannot be built: the annotations and the route table
/// disagree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    #[error("{0} {1} is in the route table but not in the OpenAPI annotations")]
    Undocumented(String, String),
    #[error("{0} {1} is documented but not in the route table")]
    NotServed(String, String),
    #[error("{0} {1} lists error code {2}, which has no HTTP status in crate::error")]
    UnknownCode(String, String, String),
    #[error(
        "{0} {1}: its annotation already documents status {2}, which its error codes answer too"
    )]
    StatusTwice(String, String, u16),
}

/// The HTTP methods of a path item (its other keys are not operations).
fn methods_of(item: &Map<String, Value>) -> impl Iterator<Item = &String> {
    item.keys().filter(|k| {
        matches!(
            k.as_str(),
            "get" | "put" | "post" | "delete" | "options" | "head" | "patch" | "trace"
        )
    })
}

/// Build the document: the annotations, completed from the route table.
pub fn build() -> Result<Value, ContractError> {
    let mut doc =
        serde_json::to_value(Annotated::openapi()).expect("an OpenAPI document serializes");
    let mut seen = Vec::new();
    for route in ROUTES {
        let method = route.method.as_str().to_ascii_lowercase();
        let path = route.document_path();
        let undocumented = || ContractError::Undocumented(route.method.to_string(), path.clone());
        let op = doc
            .pointer_mut(&format!(
                "/paths/{}/{method}",
                path.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_object_mut)
            .ok_or_else(undocumented)?;
        seen.push((method, path.clone()));
        let homes: Vec<&str> = route.homes.iter().map(|h| h.name()).collect();
        op.insert("x-cardvault-listener".into(), json!(homes));
        match route.access {
            Access::Open => {
                op.insert("security".into(), json!([]));
            }
            Access::AnyPrincipal => {
                op.insert("x-cardvault-roles".into(), json!([]));
                op.insert("security".into(), json!([{"api_key": []}, {"mtls": []}]));
            }
            Access::Roles(roles) => {
                op.insert("x-cardvault-roles".into(), json!(roles));
                op.insert("security".into(), json!([{"api_key": []}, {"mtls": []}]));
            }
        }
        // Every answer may be refused for an oversized head; then the
        // route's own codes, grouped by status.
        let mut by_status: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for code in std::iter::once(&"headers_too_large").chain(route.errors) {
            let status = error_status(code).ok_or_else(|| {
                ContractError::UnknownCode(
                    route.method.to_string(),
                    route.document_path(),
                    (*code).to_owned(),
                )
            })?;
            let codes = by_status.entry(status).or_default();
            if !codes.contains(code) {
                codes.push(code);
            }
        }
        let responses = op
            .entry("responses")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(undocumented)?;
        for (status, codes) in by_status {
            let listed: Vec<String> = codes.iter().map(|c| format!("`{c}`")).collect();
            let mut response = json!({
                "description": format!("Error: {}.", listed.join(", ")),
                "content": {"application/json": {"schema": error_schema(&codes)}},
            });
            let extra = match status {
                401 => Some(("WWW-Authenticate", "The scheme to use: `Bearer`.")),
                429 => Some(("Retry-After", "Seconds to wait before trying again.")),
                _ => None,
            };
            if let Some((name, description)) = extra {
                response["headers"] = json!({
                    name: {"description": description, "required": true, "schema": {"type": "string"}}
                });
            }
            if responses.insert(status.to_string(), response).is_some() {
                return Err(ContractError::StatusTwice(
                    route.method.to_string(),
                    route.document_path(),
                    status,
                ));
            }
        }
        // Every answer carries its request id.
        for response in responses.values_mut() {
            if let Some(response) = response.as_object_mut() {
                let headers = response.entry("headers").or_insert_with(|| json!({}));
                headers["x-request-id"] = json!({
                    "description": "The request id, also recorded in the audit trail.",
                    "required": true,
                    "schema": {"type": "string"},
                });
            }
        }
    }
    // The other direction: nothing documented that is not served.
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            let Some(item) = item.as_object() else {
                continue;
            };
            for method in methods_of(item) {
                if !seen.iter().any(|(m, p)| m == method && p == path) {
                    return Err(ContractError::NotServed(
                        method.to_ascii_uppercase(),
                        path.clone(),
                    ));
                }
            }
        }
    }
    let components = doc
        .as_object_mut()
        .expect("the document is an object")
        .entry("components")
        .or_insert_with(|| json!({}));
    components["securitySchemes"] = json!({
        "api_key": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`cvk_...`) of a principal, from `tokenizer principal create`. \
                Used where the listener's mode is `api_key` or `mtls_and_api_key`.",
        },
        "mtls": {
            "type": "mutualTLS",
            "description": "A client certificate verified at the TLS handshake, whose URI or DNS \
                subject alternative name is bound to a principal (`--cert-identity`). \
                Used where the listener's mode is `mtls` or `mtls_and_api_key`.",
        },
    });
    Ok(canonical(doc))
}

/// The error body of one response: its `code` is one of `codes`.
fn error_schema(codes: &[&str]) -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {"type": "string"},
                },
            },
        },
    })
}

/// The same document with every object's keys sorted, so that the text is
/// the same on every build (utoipa keeps extensions in a hash map).
fn canonical(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// The document as served and committed: pretty JSON, a final newline.
pub fn to_text(doc: &Value) -> String {
    let mut text = serde_json::to_string_pretty(doc).expect("JSON serializes");
    text.push('\n');
    text
}

/// Built once per process.
fn served() -> &'static Result<String, ContractError> {
    static DOC: OnceLock<Result<String, ContractError>> = OnceLock::new();
    DOC.get_or_init(|| build().map(|d| to_text(&d)))
}

/// `GET /v1/openapi.json` (no credentials; admin listener, every listener in
/// `--dev`): this document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document of this service.",
        content_type = "application/json", body = Object)))]
pub async fn document() -> HttpResponse {
    match served() {
        Ok(text) => HttpResponse::Ok()
            .content_type("application/json")
            .body(text.clone()),
        Err(e) => {
            tracing::error!(error = %e, "the OpenAPI document cannot be built");
            HttpResponse::InternalServerError().finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the committed copy lives.
    fn committed_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
    }

    #[test]
    fn every_route_is_documented_and_every_operation_served() {
        let doc = build().expect("annotations and route table agree");
        for route in ROUTES {
            let op = &doc["paths"][route.document_path().as_str()]
                [route.method.as_str().to_ascii_lowercase()];
            assert!(op.is_object(), "{} {}", route.method, route.path);
            let homes: Vec<&str> = route.homes.iter().map(|h| h.name()).collect();
            assert_eq!(op["x-cardvault-listener"], json!(homes));
            assert!(op["responses"]
                .as_object()
                .is_some_and(|r| r.keys().any(|s| s.starts_with('2'))));
        }
        let operations: usize = doc["paths"]
            .as_object()
            .map(|p| {
                p.values()
                    .filter_map(Value::as_object)
                    .map(|i| methods_of(i).count())
                    .sum()
            })
            .unwrap_or(0);
        assert_eq!(operations, ROUTES.len());
        assert_eq!(doc["openapi"], "3.1.0");
    }

    #[test]
    fn error_responses_carry_their_codes_with_the_mapped_status() {
        let doc = build().expect("document");
        let tokenize = &doc["paths"]["/v1/tokens"]["post"]["responses"];
        let codes = |status: &str| {
            tokenize[status]["content"]["application/json"]["schema"]["properties"]["error"]
                ["properties"]["code"]["enum"]
                .clone()
        };
        assert_eq!(codes("422").as_array().map(Vec::len), Some(5));
        assert!(codes("400")
            .as_array()
            .is_some_and(|c| c.contains(&json!("malformed_json"))));
        assert_eq!(codes("401"), json!(["unauthenticated"]));
        assert!(codes("503")
            .as_array()
            .is_some_and(|c| c.contains(&json!("sealed"))));
        let healthz = &doc["paths"]["/healthz"]["get"];
        assert_eq!(healthz["security"], json!([]));
        assert!(healthz["responses"]["431"].is_object());
    }

    /// The committed `docs/openapi.json` is what the code generates; a
    /// change to the API shows in review. To refresh it after a deliberate
    /// change: `CARDVAULT_UPDATE_OPENAPI=1 cargo test -p tokenizer-api openapi`.
    #[test]
    fn committed_document_matches_the_generated_one() {
        let generated = to_text(&build().expect("document"));
        let path = committed_path();
        if std::env::var_os("CARDVAULT_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the generated document: \
             run CARDVAULT_UPDATE_OPENAPI=1 cargo test -p tokenizer-api openapi and review the diff"
        );
    }
}
