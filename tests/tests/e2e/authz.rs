//! The authorization matrix, generated from one table: every endpoint
//! (method and path) against every kind of caller, with the expected status
//! of each cell.
//!
//! The table must list every route the service serves: the test reads the
//! service's route table (`tokenizer_api::routes::ROUTES`, what
//! `routes::configure_for` serves) and fails when it names a method and
//! path the table lacks (or the table names one it does not serve), so
//! adding an endpoint without deciding who may call it fails here. Each route of the source is also probed on every listener of the
//! running service: served (anything but 404 `not_found`) on the listener
//! its row names (`API`, `REVEAL`, `ADMIN`, or `ALL`), 404 on the others,
//! so moving a route to another listener fails here too.
//!
//! `POST /v1/admin/seal` seals the service: its cells run last.

use e2e::acquirer::{Acquirer, AcquirerOptions};
use e2e::{fresh_pan, Client, Resp, Service};
use serde_json::json;

use crate::{card, exp_year, token_for, REASON, TENANT};

/// Who calls. The order is the order of the columns of [`TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// No `Authorization` header.
    NoKey,
    /// `Bearer` followed by something that is not an API key.
    Malformed,
    /// A well-formed key nobody has.
    Unknown,
    /// A real key id with the wrong secret.
    WrongSecret,
    /// A key whose principal (every role) was revoked.
    Revoked,
    /// One role each, on every tenant.
    Tokenize,
    Detokenize,
    Auditor,
    KeyAdmin,
    /// Role `tokenize`, limited to a tenant other than the one the
    /// requests name (and the tokens belong to).
    TokenizeOtherTenant,
    /// The hosted-collection edge's role.
    Collect,
    /// The payment router's forwarding role.
    Forward,
}

const CALLERS: [Caller; 12] = [
    Caller::NoKey,
    Caller::Malformed,
    Caller::Unknown,
    Caller::WrongSecret,
    Caller::Revoked,
    Caller::Tokenize,
    Caller::Detokenize,
    Caller::Auditor,
    Caller::KeyAdmin,
    Caller::TokenizeOtherTenant,
    Caller::Collect,
    Caller::Forward,
];

/// What a request sends besides method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    /// A fresh card for tenant [`TENANT`].
    Tokenize,
    Batch,
    /// A fresh token of [`TENANT`] with a reason.
    Detokenize,
    /// `{"cardholder_name": ..}`: a valid update of the token's card.
    Patch,
    /// `{}`: the file backend re-reads its KEK.
    Unseal,
    /// `{"fingerprint": false}`.
    Rotate,
    /// `{"kek_id": ..}` of a KEK that wraps nothing.
    DestroyKek,
    /// A new collection session of [`TENANT`].
    CollectSession,
    /// A fresh card with the client secret of the `{session}` made for the
    /// cell.
    CollectComplete,
    /// A payment for the test acquirer naming a fresh token's card number.
    Forward,
}

/// One row: method, path (`{token}` is a fresh token of [`TENANT`]), body,
/// and the expected status per caller, in [`CALLERS`] order:
/// no key, malformed, unknown, wrong secret, revoked, tokenize, detokenize,
/// auditor, key_admin, tokenize on another tenant, collect, forward.
type Row = (&'static str, &'static str, Body, [u16; 12]);

#[rustfmt::skip]
const TABLE: &[Row] = &[
    //                                                              none mal  unk  wrng rev  tok  detk aud  kadm other coll fwd
    ("GET",    "/healthz",                              Body::None,       [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    ("GET",    "/readyz",                               Body::None,       [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    ("GET",    "/metrics",                              Body::None,       [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    ("GET",    "/v1/openapi.json",                      Body::None,       [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    ("GET",    "/v1/ping",                              Body::None,       [401, 401, 401, 401, 401, 200, 200, 200, 200, 200, 200, 200]),
    ("POST",   "/v1/tokens",                            Body::Tokenize,   [401, 401, 401, 401, 401, 201, 403, 403, 403, 403, 403, 403]),
    ("POST",   "/v1/tokens/batch",                      Body::Batch,      [401, 401, 401, 401, 401, 200, 403, 403, 403, 403, 403, 403]),
    ("POST",   "/v1/detokenize",                        Body::Detokenize, [401, 401, 401, 401, 401, 403, 200, 403, 403, 403, 403, 403]),
    ("GET",    "/v1/tokens/{token}",                    Body::None,       [401, 401, 401, 401, 401, 200, 403, 403, 403, 404, 403, 403]),
    ("PATCH",  "/v1/tokens/{token}",                    Body::Patch,      [401, 401, 401, 401, 401, 200, 403, 403, 403, 404, 403, 403]),
    ("DELETE", "/v1/tokens/{token}",                    Body::None,       [401, 401, 401, 401, 401, 204, 204, 403, 403, 404, 403, 403]),
    ("POST",   "/v1/collect/sessions",                  Body::CollectSession, [401, 401, 401, 401, 401, 201, 403, 403, 403, 403, 403, 403]),
    ("GET",    "/v1/collect/sessions/{session}",        Body::None,       [401, 401, 401, 401, 401, 200, 403, 403, 403, 404, 403, 403]),
    ("GET",    "/v1/collect/sessions/{session}/public", Body::None,       [401, 401, 401, 401, 401, 403, 403, 403, 403, 403, 200, 403]),
    ("POST",   "/v1/collect/sessions/{session}/complete", Body::CollectComplete, [401, 401, 401, 401, 401, 403, 403, 403, 403, 403, 200, 403]),
    ("GET",    "/v1/audit/events",                      Body::None,       [401, 401, 401, 401, 401, 403, 403, 200, 403, 403, 403, 403]),
    ("GET",    "/v1/audit/checkpoints",                 Body::None,       [401, 401, 401, 401, 401, 403, 403, 200, 403, 403, 403, 403]),
    ("GET",    "/v1/admin/seal-status",                 Body::None,       [401, 401, 401, 401, 401, 403, 403, 403, 200, 403, 403, 403]),
    ("POST",   "/v1/admin/unseal",                      Body::Unseal,     [401, 401, 401, 401, 401, 403, 403, 403, 200, 403, 403, 403]),
    ("GET",    "/v1/admin/keys",                        Body::None,       [401, 401, 401, 401, 401, 403, 403, 403, 200, 403, 403, 403]),
    ("POST",   "/v1/admin/keys/rotate",                 Body::Rotate,     [401, 401, 401, 401, 401, 403, 403, 403, 200, 403, 403, 403]),
    ("POST",   "/v1/admin/keys/audit_signing/rotate",   Body::None,       [401, 401, 401, 401, 401, 403, 403, 403, 200, 403, 403, 403]),
    // The active DEK cannot be retired, nor an unretired key destroyed: 409 after authorization.
    ("POST",   "/v1/admin/keys/{purpose}/{version}/retire",  Body::None,  [401, 401, 401, 401, 401, 403, 403, 403, 409, 403, 403, 403]),
    ("POST",   "/v1/admin/keys/{purpose}/{version}/destroy", Body::None,  [401, 401, 401, 401, 401, 403, 403, 403, 409, 403, 403, 403]),
    // The file KEK backend cannot rotate or destroy its KEK: 409 after authorization.
    ("POST",   "/v1/admin/kek/rotate",                  Body::None,       [401, 401, 401, 401, 401, 403, 403, 403, 409, 403, 403, 403]),
    ("POST",   "/v1/admin/kek/destroy",                 Body::DestroyKek, [401, 401, 401, 401, 401, 403, 403, 403, 409, 403, 403, 403]),
    ("GET",    "/v1/admin/upstreams",                   Body::None,       [401, 401, 401, 401, 401, 403, 403, 200, 200, 403, 403, 403]),
    // The test acquirer answers 200 to every method.
    ("POST",   "/v1/forward/{upstream}/{path:.*}",      Body::Forward,    [401, 401, 401, 401, 401, 403, 403, 403, 403, 403, 403, 200]),
    ("PUT",    "/v1/forward/{upstream}/{path:.*}",      Body::Forward,    [401, 401, 401, 401, 401, 403, 403, 403, 403, 403, 403, 200]),
    ("PATCH",  "/v1/forward/{upstream}/{path:.*}",      Body::Forward,    [401, 401, 401, 401, 401, 403, 403, 403, 403, 403, 403, 200]),
    // Last: key_admin seals the service.
    ("POST",   "/v1/admin/seal",                        Body::None,       [401, 401, 401, 401, 401, 403, 403, 403, 200, 403, 403, 403]),
];

/// The tenant of [`Caller::TokenizeOtherTenant`].
const OTHER_TENANT: &str = "shop-other";

/// The error code that goes with a refusal status.
fn code_for(status: u16) -> Option<&'static str> {
    match status {
        401 => Some("unauthenticated"),
        403 => Some("forbidden"),
        404 => Some("not_found"),
        _ => None,
    }
}

/// Every (method, path) `routes::configure_for` serves: the service's
/// route table.
fn served_routes() -> Vec<(String, String)> {
    let mut routes: Vec<(String, String)> = tokenizer_api::routes::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    routes.sort();
    routes.dedup();
    routes
}

#[test]
fn the_table_lists_exactly_the_served_routes() {
    let served = served_routes();
    assert!(
        served.len() >= 10,
        "suspiciously few routes read from configure(): {served:?}"
    );
    let mut table: Vec<(String, String)> = TABLE
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .collect();
    table.sort();
    let missing: Vec<_> = served.iter().filter(|r| !table.contains(r)).collect();
    let stale: Vec<_> = table.iter().filter(|r| !served.contains(r)).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "the authorization table in tests/tests/e2e/authz.rs is out of date:\n  \
         served but not in the table (decide who may call them): {missing:?}\n  \
         in the table but not served: {stale:?}"
    );
}

/// The request of one cell. Tokens are made fresh for every cell (DELETE
/// consumes them).
fn call(client: &Client, admin: &Client, method: &str, path: &str, body: Body) -> Resp {
    let mut path = path
        .replace("{purpose}/{version}", "dek/1")
        .replace("{upstream}/{path:.*}", "acq-a/v1/payments");
    let mut token = None;
    let mut secret = None;
    if path.contains("{session}") {
        let made = admin.post_json(
            "/v1/collect/sessions",
            &json!({"tenant": TENANT, "allowed_origin": "https://shop.example"}),
        );
        assert_eq!(made.status, 201, "{made}");
        path = path.replace("{session}", made.json["session"].as_str().unwrap());
        secret = made.json["client_secret"].as_str().map(str::to_owned);
    }
    if path.contains("{token}") || body == Body::Detokenize || body == Body::Forward {
        let t = token_for(admin, TENANT, &fresh_pan());
        path = path.replace("{token}", &t);
        token = Some(t);
    }
    let value = match body {
        Body::None => None,
        Body::Tokenize => Some(json!({
            "tenant": TENANT, "pan": fresh_pan(), "exp_month": 12, "exp_year": exp_year(),
        })),
        Body::Batch => Some(json!({
            "tenant": TENANT, "cards": [card(&fresh_pan(), 12, exp_year())],
        })),
        Body::Detokenize => Some(json!({ "token": token, "reason": REASON })),
        Body::Patch => Some(json!({ "cardholder_name": "Matrix Holder" })),
        Body::Unseal => Some(json!({})),
        Body::Rotate => Some(json!({ "fingerprint": false })),
        Body::DestroyKek => Some(json!({ "kek_id": "no-such-kek" })),
        Body::CollectSession => Some(json!({
            "tenant": TENANT, "allowed_origin": "https://shop.example",
        })),
        Body::CollectComplete => Some(json!({
            "client_secret": secret, "pan": fresh_pan(), "exp_month": 12, "exp_year": exp_year(),
        })),
        Body::Forward => Some(json!({
            "card": {"number": format!("{{{{{}.pan}}}}", token.as_deref().unwrap_or_default())},
        })),
    };
    match value {
        Some(v) => client.send_raw(
            method,
            &path,
            Some("application/json"),
            v.to_string().as_bytes(),
        ),
        None if method == "POST" => client.send_raw(method, &path, None, b""),
        None => client.send(method, &path),
    }
}

#[test]
fn authorization_matrix() {
    // The rotate cell makes a new DEK; the retire and destroy cells expect
    // the old one still in use (409). The background re-encryption pass
    // would race them (and win on a busy machine): it waits here.
    let acquirer = Acquirer::start(AcquirerOptions::default());
    let config = tempfile::tempdir().unwrap();
    let config_file = config.path().join("tokenizer.toml");
    std::fs::write(
        &config_file,
        acquirer.upstream_toml("acq-a", "paths = [\"/v1/payments\"]\ntenants = [\"*\"]\n"),
    )
    .unwrap();
    e2e::give_to_service_user(config.path());
    let svc = Service::start_with(e2e::Options {
        extra_args: vec![
            "--reencrypt-interval-ms".into(),
            "3600000".into(),
            "--config".into(),
            config_file.display().to_string(),
        ],
        ..e2e::Options::default()
    });
    let admin = svc.principal_client("matrix-admin", &["tokenize", "detokenize"], &["*"]);

    let revoked_key = svc.create_principal(
        "matrix-revoked",
        &["tokenize", "detokenize", "auditor", "key_admin"],
        &["*"],
    );
    svc.revoke("matrix-revoked");
    let live_key = svc.create_principal("matrix-live", &["auditor"], &["*"]);
    // Same id, same length, another secret.
    let mut wrong_secret = live_key.clone();
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == 'A' { 'B' } else { 'A' });

    let client_for = |caller: Caller| -> Client {
        match caller {
            Caller::NoKey => svc.anonymous(),
            Caller::Malformed => svc.client_with_authorization("Bearer not-an-api-key"),
            Caller::Unknown => svc.client(&format!("cvk_AAAAAAAAAAAA_{}", "A".repeat(43))),
            Caller::WrongSecret => svc.client(&wrong_secret),
            Caller::Revoked => svc.client(&revoked_key),
            Caller::Tokenize => svc.principal_client("matrix-tokenize", &["tokenize"], &["*"]),
            Caller::Detokenize => {
                svc.principal_client("matrix-detokenize", &["detokenize"], &["*"])
            }
            Caller::Auditor => svc.principal_client("matrix-auditor", &["auditor"], &["*"]),
            Caller::KeyAdmin => svc.principal_client("matrix-key-admin", &["key_admin"], &["*"]),
            Caller::TokenizeOtherTenant => {
                svc.principal_client("matrix-other-tenant", &["tokenize"], &[OTHER_TENANT])
            }
            Caller::Collect => svc.principal_client("matrix-collect", &["collect"], &["*"]),
            Caller::Forward => svc.principal_client("matrix-forward", &["forward"], &["*"]),
        }
    };
    let clients: Vec<(Caller, Client)> = CALLERS.iter().map(|&c| (c, client_for(c))).collect();

    let mut failures = Vec::new();
    let mut cells = 0;
    for (method, path, body, expected) in TABLE {
        for (i, (caller, client)) in clients.iter().enumerate() {
            let want = expected[i];
            let resp = call(client, &admin, method, path, *body);
            cells += 1;
            let code_ok = match code_for(want) {
                Some(code) => resp.error_code() == Some(code),
                None => true,
            };
            if resp.status != want || !code_ok || resp.request_id.is_none() {
                failures.push(format!(
                    "{method} {path} as {caller:?}: want {want}, got {resp}"
                ));
            }
        }
    }
    // After the key_admin's seal (the last row): sealed for everyone.
    let sealed = svc.anonymous().get("/readyz");
    assert_eq!(
        sealed.status, 503,
        "the last cell seals the service: {sealed}"
    );
    crate::report(&format!(
        "authz: {cells} matrix cells checked ({} endpoints x {} callers) on {}",
        TABLE.len(),
        CALLERS.len(),
        svc.backend().name()
    ));
    assert!(
        failures.is_empty(),
        "{} of {cells} authorization cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every route of the route table is served by the running binary: a request
/// without a key gets anything but 404 `not_found`.
#[test]
fn every_route_in_the_source_is_served() {
    let svc = Service::start();
    let homes = route_homes();
    let mut wrong = Vec::new();
    let mut probes = 0;
    for (method, path) in served_routes() {
        let home = homes
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| panic!("no listener read for {path}"));
        let path = path
            .replace("{token}", "tok_AAAAAAAAAAAAAAAAAAAAAA")
            .replace("{session}", "cs_AAAAAAAAAAAAAAAAAAAAAA")
            .replace("{purpose}/{version}", "dek/1")
            .replace("{upstream}/{path:.*}", "acq-a/v1/payments");
        // Each route on each listener: served on its own (anything but 404
        // `not_found`), 404 `not_found` on the others.
        for listener in ["api", "reveal", "admin"] {
            probes += 1;
            let endpoints = e2e::Endpoints {
                listeners: vec![(
                    "dev".to_string(),
                    svc.listener(listener).unwrap().to_string(),
                )],
                ca: svc.endpoints().ca.clone(),
            };
            let anon = Client::for_endpoints(&endpoints, None);
            let resp = if method == "POST" {
                anon.send_raw(&method, &path, Some("application/json"), b"{}")
            } else {
                anon.send(&method, &path)
            };
            let not_found = resp.status == 404 && resp.error_code() == Some("not_found");
            let at_home = home == "ALL" || home.eq_ignore_ascii_case(listener);
            if at_home == not_found {
                wrong.push(format!(
                    "{method} {path} on {listener} (home {home}): {resp}"
                ));
            }
        }
    }
    // A path nobody serves is 404, so the probe can tell.
    let nothing = svc.anonymous().get("/v1/no-such-route");
    assert_eq!(nothing.status, 404, "{nothing}");
    crate::report(&format!("authz: {probes} route x listener probes"));
    assert!(
        wrong.is_empty(),
        "routes served on the wrong listener, or not served on their own (stale binary?):\n{}",
        wrong.join("\n")
    );
}

/// The home listener (`ALL`, `API`, `REVEAL`, `ADMIN`) of each path of the
/// route table.
fn route_homes() -> Vec<(String, String)> {
    let homes: Vec<(String, String)> = tokenizer_api::routes::ROUTES
        .iter()
        .map(|r| {
            let home = if r.homes.len() == 3 {
                "ALL".to_owned()
            } else {
                r.homes
                    .iter()
                    .map(|h| h.name().to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join("+")
            };
            (r.path.to_owned(), home)
        })
        .collect();
    assert!(homes.len() >= 10, "suspiciously few rows read: {homes:?}");
    homes
}
