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

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;

use crate::config::{
    EdgeArgs, LogFormat, DEFAULT_EDGE_MAX_BODY_BYTES, DEFAULT_EDGE_RATE_PER_SESSION,
    DEFAULT_EDGE_RATE_PER_SOURCE, DEFAULT_EDGE_REQUEST_TIMEOUT_MS,
};
use crate::tls::{ReloadableTls, TlsFiles};

use self::rate::RateLimit;
use self::routes::EdgeState;
use self::vault_client::{VaultClient, VaultClientConfig};

#[allow(clippy::print_stderr)]
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    if crate::logging::json_logs() {
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
    crate::logging::init_logging(&args.log_level, format);
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
                client_crl_stale: crate::tls::CrlStale::default(),
            };
            match ReloadableTls::load(files) {
                Ok(tls) => Some(Arc::new(tls)),
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
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        rate_per_source: args.rate_per_source,
        rate_per_session: args.rate_per_session,
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
    };
    let vault = match VaultClient::new(VaultClientConfig {
        url: vault_url,
        ca_file: ca,
        client_cert,
        api_key_file: args.api_key_file.as_deref(),
        timeout: limits.request_timeout,
    }) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if tls.is_none() {
        tracing::warn!("INSECURE: the edge serves plain HTTP (--insecure-plain-http); trials only");
    }
    let listener = match std::net::TcpListener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.listen)),
    };
    let server = match start(listener, tls, vault, origin, &limits) {
        Ok((server, _)) => server,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.listen)),
    };
    match server.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// An edge's limits (the `tokenizer edge` options).
#[derive(Debug, Clone)]
struct Limits {
    max_body_bytes: usize,
    rate_per_source: u32,
    rate_per_session: u32,
    request_timeout: Duration,
}

/// Log what is served and build the server on `listener` (not yet running).
fn start(
    listener: std::net::TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    vault: VaultClient,
    origin: String,
    limits: &Limits,
) -> std::io::Result<(actix_server::Server, SocketAddr)> {
    for f in assets::assets().files() {
        tracing::info!(path = %f.path, sha384 = %f.sha384, bytes = f.body.len(), "serving");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let state = web::Data::new(EdgeState {
        vault,
        origin,
        tls: tls.is_some(),
        max_body_bytes: limits.max_body_bytes,
        request_timeout: limits.request_timeout,
        per_source: RateLimit::new(limits.rate_per_source),
        per_session: RateLimit::new(limits.rate_per_session),
    });
    let (server, bound) = server::build(listener, tls.clone(), state.clone())?;
    reload_on_hangup(tls, state);
    tracing::info!("listening on {bound} (collect, {scheme})");
    Ok((server, bound))
}

/// SIGHUP: read the edge's certificate and key, the vault's CA, the client
/// certificate and the API key file again. New connections use them; a
/// broken file leaves the previous material in use (and is logged).
fn reload_on_hangup(tls: Option<Arc<ReloadableTls>>, state: web::Data<EdgeState>) {
    use tokio::signal::unix::{signal, SignalKind};
    // Watched now, before the listening line: an early SIGHUP must not hit
    // the default action (exit).
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot watch SIGHUP: reloading certificates needs a restart");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let served = tls
                .as_ref()
                .map_or(Ok(()), |t| t.reload().map_err(|e| e.to_string()));
            let vault = state.vault.reload();
            match (served, vault) {
                (Ok(()), Ok(())) => tracing::info!("TLS material reloaded"),
                (served, vault) => tracing::error!(
                    served = served.err().as_deref().unwrap_or("reloaded"),
                    vault = vault.err().as_deref().unwrap_or("reloaded"),
                    "TLS reload failed; the previous material stays in use where it failed"
                ),
            }
        }
    });
}

/// The edge `serve --dev` runs beside the vault, for trials: a loopback
/// port of its own, the dev PKI's server certificate, and the dev client
/// certificate of the role `collect` for the vault's one dev listener.
/// Bound before the vault starts so that the vault's `collect_public_url`
/// can name it.
#[derive(Debug)]
pub struct DevEdge {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl DevEdge {
    /// Bind `addr` (loopback only).
    pub fn bind(addr: SocketAddr) -> Result<DevEdge, String> {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--dev-edge-listen takes a loopback address; {addr} is not one"
            ));
        }
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            format!("cannot listen on {addr} (the dev edge; --dev-edge-listen): {e}")
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        Ok(DevEdge { listener, addr })
    }

    /// Its public URL (`https://127.0.0.1:PORT`).
    pub fn public_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Whether the dev PKI in `tls_dir` has what the edge needs (a dev PKI
    /// made before the role `collect` existed has no certificate for it).
    pub fn pki_ready(tls_dir: &Path) -> bool {
        tls_dir.join("client-collect.pem").is_file() && tls_dir.join("client-collect.key").is_file()
    }

    /// Build the edge server (not yet running) for the vault at `vault`.
    pub fn start(self, tls_dir: &Path, vault: SocketAddr) -> Result<actix_server::Server, String> {
        let files = TlsFiles {
            cert: tls_dir.join("server.pem"),
            key: tls_dir.join("server.key"),
            client_ca: None,
            client_crl: None,
            client_crl_stale: crate::tls::CrlStale::default(),
        };
        let tls = ReloadableTls::load(files).map_err(|e| e.to_string())?;
        let limits = Limits {
            max_body_bytes: DEFAULT_EDGE_MAX_BODY_BYTES,
            rate_per_source: DEFAULT_EDGE_RATE_PER_SOURCE,
            rate_per_session: DEFAULT_EDGE_RATE_PER_SESSION,
            request_timeout: Duration::from_millis(DEFAULT_EDGE_REQUEST_TIMEOUT_MS),
        };
        let (cert, key) = (
            tls_dir.join("client-collect.pem"),
            tls_dir.join("client-collect.key"),
        );
        let vault = VaultClient::new(VaultClientConfig {
            url: &format!("https://{vault}"),
            ca_file: &tls_dir.join("ca.pem"),
            client_cert: Some((&cert, &key)),
            api_key_file: None,
            timeout: limits.request_timeout,
        })?;
        let origin = origin_of(&self.public_url(), false)
            .ok_or_else(|| format!("{} is not an origin", self.public_url()))?;
        tracing::warn!(
            "DEV MODE: a trial edge (hosted card form) on {}; not a production setup",
            self.addr
        );
        start(self.listener, Some(Arc::new(tls)), vault, origin, &limits)
            .map(|(server, _)| server)
            .map_err(|e| e.to_string())
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
