//! The edge's calls to the vault's api listener: one shared `ureq` agent
//! over rustls, trusting only the configured vault CA, presenting the
//! edge's client certificate and/or its API key (role `collect`). The
//! calls block: handlers run them in `web::block`. [`VaultClient::reload`]
//! reads the CA, the client certificate and the key file again (SIGHUP):
//! new calls use them, a broken file leaves the previous ones in use.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use zeroize::Zeroizing;

/// The largest answer of the vault the edge reads.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// Why a call got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// No connection, TLS refused, connection dropped: 502 `vault_unavailable`.
    Unavailable,
    /// No answer within the timeout: 504 `vault_timeout` (the outcome of a
    /// submission is unknown; a retry of the same card gets the same token).
    Timeout,
}

/// The vault's answer: its status, (JSON) body, and its request id (for
/// the edge's log line: the vault's audit trail names it).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub vault_request_id: Option<String>,
}

/// How the edge reaches the vault.
pub struct VaultClient {
    base: String,
    /// The files it is built from, read again on reload.
    files: Files,
    current: RwLock<Arc<Current>>,
}

#[derive(Debug, Clone)]
struct Files {
    ca: PathBuf,
    client_cert: Option<(PathBuf, PathBuf)>,
    api_key: Option<PathBuf>,
    timeout: Duration,
}

/// The agent and credential in use.
struct Current {
    agent: ureq::Agent,
    /// `Bearer cvk_...`, when an API key is configured.
    authorization: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient")
            .field("base", &self.base)
            .field(
                "api_key",
                &self.files.api_key.as_ref().map(|_| "[REDACTED]"),
            )
            .finish_non_exhaustive()
    }
}

/// What the client is built from.
#[derive(Debug)]
pub struct VaultClientConfig<'a> {
    pub url: &'a str,
    pub ca_file: &'a Path,
    pub client_cert: Option<(&'a Path, &'a Path)>,
    pub api_key_file: Option<&'a Path>,
    pub timeout: Duration,
}

/// Read an API key file: private ([`hsm_shim::is_private_file`]: 0600, or
/// 0640 owned by root), one `cvk_...` key.
fn read_api_key(path: &Path) -> Result<Zeroizing<String>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !hsm_shim::is_private_file(&meta) {
        return Err(format!(
            "{shown} is readable by group or others; chmod 600 it (or 640 when owned by root)"
        ));
    }
    let raw = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?,
    );
    let key = raw.trim();
    if !key.starts_with("cvk_") || key.contains(char::is_whitespace) {
        return Err(format!("{shown} does not hold one API key (cvk_...)"));
    }
    Ok(Zeroizing::new(format!("Bearer {key}")))
}

impl VaultClient {
    pub fn new(config: VaultClientConfig<'_>) -> Result<VaultClient, String> {
        let base = config.url.trim_end_matches('/');
        if !base.starts_with("https://") || base.len() <= "https://".len() {
            return Err("--vault-url must be https://host:port (the vault's api listener)".into());
        }
        if base["https://".len()..].contains(['/', '?', '#']) {
            return Err("--vault-url is the listener's origin only, without a path".into());
        }
        if config.api_key_file.is_none() && config.client_cert.is_none() {
            return Err(
                "the edge needs a credential for the vault: --client-cert-file and \
                 --client-key-file, and/or --api-key-file"
                    .into(),
            );
        }
        let files = Files {
            ca: config.ca_file.to_path_buf(),
            client_cert: config
                .client_cert
                .map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
            api_key: config.api_key_file.map(Path::to_path_buf),
            timeout: config.timeout,
        };
        let current = RwLock::new(Arc::new(build(&files)?));
        Ok(VaultClient {
            base: base.to_owned(),
            files,
            current,
        })
    }

    /// Read the CA, the client certificate and key, and the API key file
    /// again; on error the previous ones stay in use.
    pub fn reload(&self) -> Result<(), String> {
        let built = build(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(built);
        Ok(())
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let req = current
            .agent
            .request(method, &format!("{}{path}", self.base));
        match &current.authorization {
            Some(a) => req.set("Authorization", a.as_str()),
            None => req,
        }
    }

    /// `GET /v1/collect/sessions/{id}/public`. `id` is of the session shape.
    pub fn public_session(&self, id: &str) -> Result<Answer, CallError> {
        let path = format!("/v1/collect/sessions/{id}/public");
        answer(self.request("GET", &path).call())
    }

    /// `POST /v1/collect/sessions/{id}/complete` with `body` (JSON, already
    /// holding the buyer's address). The body is never logged or kept.
    pub fn complete(&self, id: &str, body: &[u8]) -> Result<Answer, CallError> {
        let path = format!("/v1/collect/sessions/{id}/complete");
        answer(
            self.request("POST", &path)
                .set("Content-Type", "application/json")
                .send_bytes(body),
        )
    }
}

fn build(files: &Files) -> Result<Current, String> {
    let authorization = files.api_key.as_deref().map(read_api_key).transpose()?;
    let client_cert = files
        .client_cert
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    let tls = crate::tls::client_config(&files.ca, client_cert).map_err(|e| e.to_string())?;
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls))
        .timeout(files.timeout)
        .redirects(0)
        .max_idle_connections_per_host(16)
        .build();
    Ok(Current {
        agent,
        authorization,
    })
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Result<Answer, CallError> {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(transport(&t)),
    };
    let status = response.status();
    let vault_request_id = response
        .header("x-request-id")
        .filter(|v| {
            v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned);
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut body)
        .map_err(|e| io_error(&e))?;
    Ok(Answer {
        status,
        body,
        vault_request_id,
    })
}

fn io_error(e: &std::io::Error) -> CallError {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => CallError::Timeout,
        _ => CallError::Unavailable,
    }
}

/// A timeout anywhere in the error's chain is a timeout; anything else
/// (refused, reset, TLS) is unavailable.
fn transport(t: &ureq::Transport) -> CallError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_error(io);
        }
        source = e.source();
    }
    CallError::Unavailable
}
