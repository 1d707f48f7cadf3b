//! What a listener is: its kind (`api`, `reveal`, `admin`, or `--dev`'s
//! one listener with every route), how callers authenticate on it, its
//! configured address, and what a handler knows about the connection it
//! was reached on. Serving them is `server`'s job.
//!
//! Production runs three listeners, each on its own address: `api`
//! (tokenize, metadata, delete: the checkout network), `reveal` (detokenize:
//! the payment router only) and `admin` (metrics, readiness, keys, unseal,
//! audit queries: the operators' network). A route is served only on its
//! listener (the route table in `routes`); elsewhere it is 404. `--dev`
//! runs one listener (`dev`) with every route.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::tls::{ClientCerts, ClientIdentity};

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    Api,
    Reveal,
    Admin,
    /// `--dev`: every route on one loopback listener.
    Dev,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Api => "api",
            ListenerKind::Reveal => "reveal",
            ListenerKind::Admin => "admin",
            ListenerKind::Dev => "dev",
        }
    }

    /// Whether a route homed on `homes` is served here.
    pub fn serves(self, homes: &[ListenerKind]) -> bool {
        self == ListenerKind::Dev || homes.contains(&self)
    }
}

/// How callers authenticate on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// `Authorization: Bearer <API key>`; no client certificate asked for.
    ApiKey,
    /// A client certificate (required at the handshake) bound to a principal.
    Mtls,
    /// Both, and they must name the same principal.
    MtlsAndApiKey,
    /// Either (a certificate if presented, else a key): `--dev` only.
    MtlsOrApiKey,
}

impl AuthMode {
    pub fn parse(s: &str) -> Option<AuthMode> {
        match s {
            "api_key" => Some(AuthMode::ApiKey),
            "mtls" => Some(AuthMode::Mtls),
            "mtls_and_api_key" => Some(AuthMode::MtlsAndApiKey),
            "mtls_or_api_key" => Some(AuthMode::MtlsOrApiKey),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::ApiKey => "api_key",
            AuthMode::Mtls => "mtls",
            AuthMode::MtlsAndApiKey => "mtls_and_api_key",
            AuthMode::MtlsOrApiKey => "mtls_or_api_key",
        }
    }

    /// What the TLS handshake asks of the client.
    pub fn client_certs(self) -> ClientCerts {
        match self {
            AuthMode::ApiKey => ClientCerts::None,
            AuthMode::Mtls | AuthMode::MtlsAndApiKey => ClientCerts::Required,
            AuthMode::MtlsOrApiKey => ClientCerts::Optional,
        }
    }
}

/// One configured listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub kind: ListenerKind,
    pub addr: SocketAddr,
    pub auth: AuthMode,
}

/// What a handler knows about its connection (`req.conn_data`).
#[derive(Debug, Clone)]
pub struct Connection {
    pub listener: ListenerKind,
    pub auth: AuthMode,
    /// The verified client certificate, if one was presented.
    pub client: Option<Arc<ClientIdentity>>,
}
