//! `GET /v1/collect/manifest.json`: what this binary serves, for the
//! merchant's script inventory (PCI DSS 6.4.3) and for change and tamper
//! detection (11.6.1, `tokenizer edge check`): every file with its SHA-384
//! (SRI form) and size, the frame template's digest, the static error
//! pages', and the exact security headers of every route (the frame's CSP
//! with an `<allowed_origin>` placeholder).

use serde_json::{json, Value};

use super::assets::{assets, ErrorPage};
use super::headers::{self, Headers, ALLOWED_ORIGIN};

fn object(h: Headers) -> Value {
    Value::Object(
        h.into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect(),
    )
}

/// The manifest of this binary. `tls`: whether the edge serves TLS (HSTS);
/// `origin`: its public origin.
pub fn manifest(tls: bool, origin: &str) -> Value {
    let a = assets();
    let files: Vec<Value> = a
        .files()
        .iter()
        .map(|f| {
            json!({"path": f.path, "sha384": f.sha384, "bytes": f.body.len(),
                   "content_type": f.content_type})
        })
        .collect();
    let pages: Vec<Value> = ErrorPage::ALL
        .iter()
        .map(|p| json!({"page": p.name(), "sha384": super::assets::sri(p.body().as_bytes()), "bytes": p.body().len()}))
        .collect();
    let frame = "/v1/collect/frame/{session}";
    let mut routes = vec![
        json!({"path": frame, "method": "GET", "status": 200,
               "headers": object(headers::frame(ALLOWED_ORIGIN, tls))}),
        json!({"path": frame, "method": "GET", "status": 410,
               "headers": object(headers::frame(ALLOWED_ORIGIN, tls))}),
        json!({"path": frame, "method": "GET", "status": 404,
               "headers": object(headers::frame("'none'", tls))}),
    ];
    for f in a.files() {
        routes.push(json!({"path": f.path, "method": "GET", "status": 200,
                           "headers": object(headers::file(f.kind, tls))}));
    }
    routes.push(
        json!({"path": "/v1/collect/submit/{session}", "method": "POST", "status": 200,
                       "headers": object(headers::json(tls))}),
    );
    for path in ["/v1/collect/manifest.json", "/healthz"] {
        routes.push(json!({"path": path, "method": "GET", "status": 200,
                           "headers": object(headers::json(tls))}));
    }
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "origin": origin,
        "files": files,
        "frame_template": {"sha384": a.template_sha384, "bytes": a.template_bytes},
        "error_pages": pages,
        "routes": routes,
    })
}
