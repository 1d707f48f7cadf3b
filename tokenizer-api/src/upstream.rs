//! The forwarding proxy's upstreams (issue 18), loaded: each checked
//! `[[upstream]]` table of the configuration file with its HTTP client
//! (reqwest over the workspace's rustls: its CA as the only roots, its
//! client certificate, HTTP/1.1, no redirects, no proxy, its timeouts). An
//! upstream whose files are missing, unreadable or whose key is not
//! private refuses the start, naming the upstream; on SIGHUP the tables are
//! read again and swapped as a whole, or, if any is refused, the previous
//! set stays in use. [`Upstream::send`] makes one call and reads at most
//! `max_response_bytes` of the answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use zeroize::Zeroizing;

use crate::config::upstreams::UpstreamSpec;
use crate::tls::TlsError;

/// An upstream ready to be called.
#[derive(Debug)]
pub struct Upstream {
    pub spec: UpstreamSpec,
    client: reqwest::Client,
}

/// The upstream's answer.
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    /// `Location` (a redirect is an answer: never followed).
    pub location: Option<String>,
    /// At most `max_response_bytes`; zeroized when dropped (it may hold
    /// card numbers until they are replaced).
    pub body: Zeroizing<Vec<u8>>,
    /// SHA-256 of the certificate the upstream presented, as
    /// `openssl x509 -fingerprint -sha256` prints it (`AB:01:...`).
    pub certificate_sha256: Option<String>,
    pub elapsed: Duration,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Why a call got no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No connection (refused, unreachable, reset before an answer).
    Unreachable,
    /// The TLS handshake failed: the upstream's certificate is not trusted
    /// (wrong CA, expired, wrong name) or it refused ours.
    Tls,
    /// No complete answer within `timeout_ms` (or no connection within
    /// `connect_timeout_ms`): the outcome at the upstream is unknown.
    Timeout,
    /// The answer is larger than `max_response_bytes`.
    TooLarge,
}

impl Upstream {
    /// One call: `method` to `origin + base_path + path` with `headers`
    /// and `body`. Redirects are answers like any other (never followed).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(String, String)],
        content_type: &str,
        body: Zeroizing<Vec<u8>>,
    ) -> Result<Answer, SendError> {
        let started = Instant::now();
        let url = format!("{}{}{path}", self.spec.origin, self.spec.base_path);
        let mut req = self
            .client
            .request(method, url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            // The card values stay in their zeroizing buffer: it is
            // wiped when the last reference to it goes.
            .body(bytes::Bytes::from_owner(ZeroizingBody(body)));
        for (name, value) in headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let mut response = req.send().await.map_err(classify)?;
        let certificate_sha256 = response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .map(|der| fingerprint(&sha2::Sha256::digest(der)));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let limit = self.spec.max_response_bytes;
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(SendError::TooLarge);
        }
        let mut body = Zeroizing::new(Vec::new());
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if !crate::limits::append_within(&mut body, &chunk, limit) {
                return Err(SendError::TooLarge);
            }
        }
        Ok(Answer {
            status,
            content_type,
            location,
            body,
            certificate_sha256,
            elapsed: started.elapsed(),
        })
    }
}

/// A request body that holds card values: zeroized when dropped.
struct ZeroizingBody(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Colon-separated upper-case hex, the form `openssl x509 -fingerprint`
/// prints. The separators matter: it goes into the audit trail, whose guard
/// refuses any run of 12 to 19 digits passing the Luhn check, and plain hex
/// of a random digest holds such a run about once in seventy certificates.
/// Here no digit run is longer than two.
fn fingerprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What went wrong, from reqwest's error and its sources: a rustls error
/// anywhere in the chain is a TLS failure.
fn classify(e: reqwest::Error) -> SendError {
    let kind = classify_chain(&e);
    // No card data in it: the URL (origin and path) and transport errors.
    let e = e.without_url();
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    tracing::warn!(outcome = ?kind, error = %chain, "upstream call failed");
    kind
}

fn classify_chain(e: &reqwest::Error) -> SendError {
    if e.is_timeout() {
        return SendError::Timeout;
    }
    match std::error::Error::source(e).map(look_into) {
        Some(Some(kind)) => kind,
        _ => SendError::Unreachable,
    }
}

/// TLS or timeout, found anywhere in an error's chain, looking through
/// `io::Error`s. tokio-rustls reports every TLS failure (a refused
/// certificate, an alert from the peer) as an `io::Error` of kind
/// `InvalidData` holding the rustls error.
fn look_into(e: &(dyn std::error::Error + 'static)) -> Option<SendError> {
    if e.downcast_ref::<rustls::Error>().is_some() {
        return Some(SendError::Tls);
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return match io.kind() {
            std::io::ErrorKind::InvalidData => Some(SendError::Tls),
            std::io::ErrorKind::TimedOut => Some(SendError::Timeout),
            _ => io.get_ref().and_then(|inner| look_into(inner)),
        };
    }
    e.source().and_then(look_into)
}

/// Why the upstreams cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0}: {1}")]
    Tls(String, #[source] TlsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// One upstream as `GET /v1/admin/upstreams` lists it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UpstreamInfo {
    pub name: String,
    /// `https://host[:port][/base]`.
    pub url: String,
    /// The only roots trusted for it.
    pub ca_file: String,
    /// Mutual TLS: the client certificate presented (absent: none).
    pub client_cert_file: Option<String>,
    /// Allowed paths (`*`: one segment).
    pub paths: Vec<String>,
    /// Whose tokens may be sent (`*`: every tenant).
    pub tenants: Vec<String>,
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    /// Caller headers passed on (lower case).
    pub forward_headers: Vec<String>,
}

/// Every upstream, by name.
#[derive(Debug, Default)]
pub struct Upstreams {
    by_name: BTreeMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// Read every upstream's CA, client certificate and key.
    pub fn load(specs: &[UpstreamSpec]) -> Result<Upstreams, UpstreamError> {
        let mut by_name = BTreeMap::new();
        for spec in specs {
            let client = spec
                .client_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            let tls = crate::tls::client_config(&spec.ca_file, client)
                .map_err(|e| UpstreamError::Tls(spec.name.clone(), e))?;
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .tls_info(true)
                .http1_only()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .connect_timeout(spec.connect_timeout)
                .timeout(spec.timeout)
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(32)
                .referer(false)
                .build()
                .map_err(|e| {
                    UpstreamError::Tls(spec.name.clone(), TlsError::Rustls(e.to_string()))
                })?;
            by_name.insert(
                spec.name.clone(),
                Arc::new(Upstream {
                    spec: spec.clone(),
                    client,
                }),
            );
        }
        Ok(Upstreams { by_name })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.by_name.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// What `GET /v1/admin/upstreams` shows: the configuration, no secret
    /// (file paths, not their contents).
    pub fn listing(&self) -> Vec<UpstreamInfo> {
        self.by_name
            .values()
            .map(|u| {
                let s = &u.spec;
                let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                UpstreamInfo {
                    name: s.name.clone(),
                    url: format!("{}{}", s.origin, s.base_path),
                    ca_file: s.ca_file.display().to_string(),
                    client_cert_file: s.client_cert.as_ref().map(|(c, _)| c.display().to_string()),
                    paths: s.paths.iter().map(|p| p.as_str().to_owned()).collect(),
                    tenants: s.tenants.clone().unwrap_or_else(|| vec!["*".to_owned()]),
                    connect_timeout_ms: ms(s.connect_timeout),
                    timeout_ms: ms(s.timeout),
                    max_request_bytes: s.max_request_bytes,
                    max_response_bytes: s.max_response_bytes,
                    forward_headers: s.forward_headers.clone(),
                }
            })
            .collect()
    }
}

/// The upstreams in use, swapped as a whole on reload.
#[derive(Debug)]
pub struct ReloadableUpstreams {
    config_file: Option<PathBuf>,
    current: RwLock<Arc<Upstreams>>,
}

impl ReloadableUpstreams {
    pub fn new(config_file: Option<&Path>, upstreams: Upstreams) -> ReloadableUpstreams {
        ReloadableUpstreams {
            config_file: config_file.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(upstreams)),
        }
    }

    pub fn current(&self) -> Arc<Upstreams> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Read the configuration file's `[[upstream]]` tables and their files
    /// again; on any error the previous set stays. Returns the names now
    /// in use.
    pub fn reload(&self) -> Result<Vec<String>, UpstreamError> {
        let specs = match &self.config_file {
            Some(path) => crate::config::read_upstreams(path)?,
            None => Vec::new(),
        };
        let loaded = Upstreams::load(&specs)?;
        let names = loaded.names().map(str::to_owned).collect();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::fingerprint;
    use sha2::Digest;
    use vault::pan::contains_pan_like;

    #[test]
    fn a_fingerprint_never_looks_like_a_card_number_to_the_audit_guard() {
        // A digest whose plain hex is a test card number followed by more.
        let digest = [0x41, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xab];
        let plain: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert!(contains_pan_like(&plain), "the case this form exists for");
        assert_eq!(fingerprint(&digest), "41:11:11:11:11:11:11:11:AB");
        assert!(!contains_pan_like(&fingerprint(&digest)));
        for i in 0u32..20_000 {
            let d = sha2::Sha256::digest(i.to_be_bytes());
            assert!(!contains_pan_like(&fingerprint(&d)));
        }
    }
}
