//! The API contract: the running binary serves its OpenAPI document on the
//! admin listener only, and what it serves is the committed
//! `docs/openapi.json` (which the tokenizer-api unit tests hold equal to
//! the generated one). schemathesis then checks the real answers against
//! it (`scripts/api-contract`).

use e2e::{Client, Service};

#[test]
fn the_served_document_is_the_committed_one_on_the_admin_listener_only() {
    let svc = Service::start();
    let committed = include_str!("../../../docs/openapi.json");
    let served = svc.anonymous().get("/v1/openapi.json");
    assert_eq!(served.status, 200, "{served}");
    assert_eq!(
        served.content_type.as_deref(),
        Some("application/json"),
        "{served}"
    );
    assert!(
        served.text == committed,
        "the served document differs from docs/openapi.json (stale binary, or regenerate it)"
    );
    assert_eq!(served.json["openapi"], "3.1.0");
    // Every operation names its listener.
    let paths = served.json["paths"].as_object().unwrap();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["x-cardvault-listener"].is_array(),
                "{method} {path} names no listener"
            );
        }
    }
    for listener in ["api", "reveal"] {
        let endpoints = e2e::Endpoints {
            listeners: vec![(
                "dev".to_string(),
                svc.listener(listener).unwrap().to_string(),
            )],
            ca: svc.endpoints().ca.clone(),
        };
        let resp = Client::for_endpoints(&endpoints, None).get("/v1/openapi.json");
        assert_eq!(resp.status, 404, "{listener}: {resp}");
        assert_eq!(resp.error_code(), Some("not_found"), "{listener}: {resp}");
    }
}
