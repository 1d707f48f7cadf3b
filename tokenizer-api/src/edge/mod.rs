//! `tokenizer edge`: the hosted-collection edge, the one internet-facing
//! process of hosted card collection (issue 17). It serves the card form
//! (the frame page, its script and style, the merchant helper
//! `cardvault.js`) and forwards what the buyer typed to the vault's
//! `POST /v1/collect/sessions/{session}/complete`, as a principal with the
//! role `collect`.
//!
//! Invariants: the edge has no key, no keyring, no database and no data
//! directory (it has no option for any); its one credential lets it read a
//! session's public settings and complete a session, nothing else. A card
//! passes through it only inside one request, in zeroizing buffers, and is
//! never logged (log lines carry the route pattern, status and request id).
//!
//! Modules: `assets` (the embedded files, digests and versioned names,
//! computed once at start), `headers` (the security headers of each
//! route), `rate` (per-source and per-session limits), `vault_client` (the
//! calls to the vault), `routes` (the handlers), `manifest` (what this
//! binary serves), `server` (the listener), `check` (`tokenizer edge
//! check`).

pub mod assets;
pub mod check;
pub mod headers;
pub mod manifest;
pub mod rate;
pub mod routes;
pub mod server;
pub mod vault_client;

use std::process::ExitCode;
use std::time::Duration;

use actix_web::web;

use crate::config::{EdgeArgs, LogFormat};
use crate::tls::{ClientCerts, ReloadableTls, TlsFiles};

use self::rate::RateLimit;
use self::routes::EdgeState;
use self::vault_client::{VaultClient, VaultClientConfig};

#[allow(clippy::print_stderr)]
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    if crate::cli::json_logs() {
        tracing::error!("{msg}");
    } else {
        eprintln!("error: {msg}");
    }
    ExitCode::FAILURE
}

/// The origin of a URL in browser form: scheme and host in lower case,
/// default port dropped; `None` for anything with a path, query, fragment,
/// user info, or another scheme.
pub fn origin_of(url: &str, allow_http: bool) -> Option<String> {
    let url = url.trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme {
        "https" => ":443",
        "http" if allow_http => ":80",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let host = rest.strip_suffix(default_port).unwrap_or(rest);
    let origin = format!("{scheme}://{host}");
    headers::is_origin(&origin, allow_http).then_some(origin)
}

/// `tokenizer edge`: check the options, build the client of the vault,
/// bind the `collect` listener and serve until stopped.
pub async fn run(args: EdgeArgs) -> ExitCode {
    let Some(format) = LogFormat::parse(&args.log_format) else {
        return fail("--log-format must be text or json");
    };
    crate::cli::init_logging(&args.log_level, format);
    let plain = args.insecure_plain_http;
    if plain && !args.listen.ip().is_loopback() {
        return fail(format!(
            "--insecure-plain-http listens on loopback only; {} is not a loopback address",
            args.listen
        ));
    }
    let tls = match (plain, &args.tls_cert_file, &args.tls_key_file) {
        (true, None, None) => None,
        (true, _, _) => {
            return fail("--insecure-plain-http serves no TLS: drop --tls-cert-file/--tls-key-file")
        }
        (false, Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
                client_crl: None,
            };
            match ReloadableTls::load(files).and_then(|t| t.config(ClientCerts::None)) {
                Ok(config) => Some(config),
                Err(e) => return fail(e),
            }
        }
        (false, _, _) => {
            return fail(
                "the edge serves TLS: give --tls-cert-file and --tls-key-file \
                 (or --insecure-plain-http on loopback, for trials)",
            )
        }
    };
    let public = match &args.public_url {
        Some(url) => url.clone(),
        None if plain => format!("http://{}", args.listen),
        None => return fail("give --public-url, the edge's public origin (https://pay.example)"),
    };
    let Some(origin) = origin_of(&public, plain) else {
        return fail("--public-url must be an origin: https://host[:port], without a path");
    };
    let (Some(vault_url), Some(ca)) = (&args.vault_url, &args.vault_ca_file) else {
        return fail("give --vault-url (the vault's api listener) and --vault-ca-file (its CA)");
    };
    let client_cert = match (&args.client_cert_file, &args.client_key_file) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => return fail("--client-cert-file and --client-key-file go together"),
    };
    let timeout = Duration::from_millis(args.request_timeout_ms.max(1));
    let vault = match VaultClient::new(VaultClientConfig {
        url: vault_url,
        ca_file: ca,
        client_cert,
        api_key_file: args.api_key_file.as_deref(),
        timeout,
    }) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let a = assets::assets();
    for f in a.files() {
        tracing::info!(path = %f.path, sha384 = %f.sha384, bytes = f.body.len(), "serving");
    }
    let state = web::Data::new(EdgeState {
        vault,
        origin,
        tls: tls.is_some(),
        max_body_bytes: args.max_body_bytes,
        request_timeout: timeout,
        per_source: RateLimit::new(args.rate_per_source),
        per_session: RateLimit::new(args.rate_per_session),
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    if tls.is_none() {
        tracing::warn!("INSECURE: the edge serves plain HTTP (--insecure-plain-http); trials only");
    }
    let (server, bound) = match server::build(args.listen, tls, state) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.listen)),
    };
    tracing::info!("listening on {bound} (collect, {scheme})");
    match server.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::origin_of;

    #[test]
    fn public_origins() {
        assert_eq!(
            origin_of("https://Pay.Example/", false).as_deref(),
            Some("https://pay.example")
        );
        assert_eq!(
            origin_of("https://pay.example:443", false).as_deref(),
            Some("https://pay.example")
        );
        assert_eq!(
            origin_of("https://pay.example:8446", false).as_deref(),
            Some("https://pay.example:8446")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8446", true).as_deref(),
            Some("http://127.0.0.1:8446")
        );
        for bad in [
            "http://pay.example",
            "https://pay.example/x",
            "https://u@pay.example",
            "pay.example",
        ] {
            assert_eq!(origin_of(bad, false), None, "{bad}");
        }
    }
}
