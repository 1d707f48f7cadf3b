//! A test acquirer for the forwarding proxy's end-to-end tests (issue 18):
//! a real HTTPS server with PKIs of its own that requires a client
//! certificate, records everything it receives and answers what the test
//! tells it to (status, headers, body, after a delay).
//!
//! # Its PKI
//!
//! Generated at [`Acquirer::start`] (rcgen, ECDSA P-256) into a temporary
//! directory of its own, handed to the [`service_user`](crate::service_user)
//! like every other harness file (the vault runs as that user and reads the
//! CA and the client certificate and key):
//!
//! - `server-ca.pem` ([`Acquirer::server_ca_pem_path`]): the CA a vault
//!   must trust for this acquirer (its `ca_file`);
//! - `server.pem`/`server.key`: the server certificate, for
//!   [`AcquirerOptions::server_names`] (`127.0.0.1` and `localhost`). With
//!   [`AcquirerOptions::expired_server_cert`] it expired yesterday; with
//!   [`AcquirerOptions::server_cert_from_other_ca`] it is signed by another
//!   CA (`other-ca.pem`, [`Acquirer::signing_ca_pem_path`]) than the one
//!   handed out, so a vault trusting `server-ca.pem` must refuse it;
//! - `client-ca.pem`: a separate CA, the only one the acquirer accepts
//!   client certificates from, and `client.pem`/`client.key` (0600)
//!   ([`Acquirer::client_cert_path`], [`Acquirer::client_key_path`]): the
//!   certificate it issued, with the URI name
//!   [`AcquirerOptions::client_identity`], for the vault to present;
//! - the CAs' keys (`server-ca.key`, `client-ca.key`, 0600), for a test that
//!   wants to sign more certificates.
//!
//! # What it serves
//!
//! HTTP/1.1 over TLS 1.3 or 1.2 (rustls, ring: the workspace's provider;
//! ALPN `http/1.1` when the client offers ALPN), one thread per connection
//! (a delayed answer never holds up another connection), several requests
//! per connection (keep-alive, pipelining), `Content-Length` request bodies
//! (`Expect: 100-continue` honoured). A chunked (or any
//! `Transfer-Encoding`) request body is refused with 411 and the connection
//! closed; a body over [`AcquirerOptions::max_request_body`] with 413; a
//! malformed request with 400. Refusals and TLS handshake failures are not
//! requests: they are listed by [`Acquirer::failures`].
//!
//! # What it records
//!
//! Every complete request, in order ([`Recorded`]): method, target (path
//! with query), version, headers (names in lower case, in the order
//! received, repeated ones kept), body bytes, the client certificate shown
//! at the handshake ([`ClientCert`]: SHA-256 of its DER, subject, names),
//! the connection's number and peer address, and when it arrived. Requests
//! are recorded before the answer is computed or delayed, so a request
//! whose client gave up (a timeout) is still counted.
//!
//! # What it answers
//!
//! [`Response`]: status, headers, body, delay (slept before anything of the
//! answer is written), changeable while it runs ([`Acquirer::set_response`])
//! or computed per request by a hook ([`Acquirer::set_responder`]). The
//! default is 200 `application/json` `{"status":"approved"}`.
//! `Content-Length` is added unless the response's headers have a
//! `Content-Length` or `Transfer-Encoding` of their own (then the body is
//! written as given: [`Response::with_chunked_body`] encodes chunks).
//!
//! Dropping the [`Acquirer`] stops it: the accept loop ends, open
//! connections are shut down, delays cut short, threads joined.
//!
//! ```no_run
//! use e2e::acquirer::{Acquirer, AcquirerOptions, Response};
//! use std::time::Duration;
//!
//! let acquirer = Acquirer::start(AcquirerOptions::default());
//! let table = acquirer.upstream_toml("acquirer", "paths = [\"/v1/payments\"]\ntenants = [\"*\"]\n");
//! // ... start the vault with `table` in its configuration, forward ...
//! acquirer.set_response(Response::approved().with_delay(Duration::from_secs(40)));
//! let seen = acquirer.wait_for_requests(1, Duration::from_secs(30));
//! assert!(seen[0].client_cert.is_some());
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// The URI name of the client certificate the acquirer issues, by default.
pub const DEFAULT_CLIENT_IDENTITY: &str = "spiffe://cardvault.test/vault";

/// The largest request head (request line and headers) read: 431 beyond.
const MAX_HEAD: usize = 64 * 1024;
/// A connection idle (or a peer silent) this long is closed.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a delayed answer looks at the stop flag.
const DELAY_STEP: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Options and answers
// ---------------------------------------------------------------------------

/// How an [`Acquirer`] is set up. `AcquirerOptions::default()`: loopback,
/// a valid server certificate from the CA it hands out, client
/// certificates required, the default [`Response`].
#[derive(Debug, Clone)]
pub struct AcquirerOptions {
    /// Where to listen (`127.0.0.1:0`: a free loopback port).
    pub bind: SocketAddr,
    /// The server certificate's names (DNS names or IP addresses).
    pub server_names: Vec<String>,
    /// Request a client certificate from [`Acquirer::client_ca_pem_path`]
    /// and refuse the handshake without one (default). `false`: no client
    /// certificate is requested at all (plain server-authenticated TLS).
    pub require_client_cert: bool,
    /// The server certificate's validity ended yesterday (began 30 days ago).
    pub expired_server_cert: bool,
    /// The server certificate is signed by another CA than the one
    /// [`Acquirer::server_ca_pem_path`] hands out (a different name and key:
    /// a verifier trusting the handed-out CA finds no issuer).
    pub server_cert_from_other_ca: bool,
    /// The URI name of the client certificate issued for the vault.
    pub client_identity: String,
    /// The answer until [`Acquirer::set_response`] says otherwise.
    pub response: Response,
    /// Request bodies longer than this are refused with 413.
    pub max_request_body: usize,
}

impl Default for AcquirerOptions {
    fn default() -> Self {
        AcquirerOptions {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            server_names: vec!["127.0.0.1".to_string(), "localhost".to_string()],
            require_client_cert: true,
            expired_server_cert: false,
            server_cert_from_other_ca: false,
            client_identity: DEFAULT_CLIENT_IDENTITY.to_string(),
            response: Response::default(),
            max_request_body: 16 * 1024 * 1024,
        }
    }
}

/// One answer of the acquirer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Written as given, in order (`Content-Length` is added unless present,
    /// see the module documentation).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Slept after the request was read and recorded, before anything of
    /// the answer is written.
    pub delay: Duration,
}

impl Default for Response {
    /// [`Response::approved`].
    fn default() -> Self {
        Response::approved()
    }
}

impl Response {
    /// `status` with no headers and an empty body.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// 200 `application/json` `{"status":"approved"}`.
    pub fn approved() -> Response {
        Response::json(200, &serde_json::json!({"status": "approved"}))
    }

    /// `status` with `body` as `application/json`.
    pub fn json(status: u16, body: &Value) -> Response {
        Response::new(status).with_body("application/json", body.to_string())
    }

    /// A redirect (`status` 301, 302, 303, 307 or 308) to `location`.
    pub fn redirect(status: u16, location: &str) -> Response {
        Response::new(status)
            .with_header("Location", location)
            .with_body("text/plain", format!("see {location}\n"))
    }

    /// The same with one more header.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The same with `body` and a `Content-Type` header (replacing an
    /// earlier one).
    pub fn with_body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        self.headers
            .push(("Content-Type".to_string(), content_type.to_string()));
        self.body = body.into();
        self
    }

    /// The same with `body` sent as `Transfer-Encoding: chunked` in chunks
    /// of `chunk` bytes (no `Content-Length`: a client learns the size only
    /// by reading).
    pub fn with_chunked_body(mut self, content_type: &str, body: &[u8], chunk: usize) -> Response {
        let mut encoded = Vec::with_capacity(body.len() + body.len() / chunk.max(1) * 8 + 8);
        for piece in body.chunks(chunk.max(1)) {
            encoded.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            encoded.extend_from_slice(piece);
            encoded.extend_from_slice(b"\r\n");
        }
        encoded.extend_from_slice(b"0\r\n\r\n");
        self = self.with_body(content_type, encoded);
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("content-length"));
        self.with_header("Transfer-Encoding", "chunked")
    }

    /// The same after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Response {
        self.delay = delay;
        self
    }
}

/// A hook computing the answer of each request ([`Acquirer::set_responder`]).
pub type Responder = dyn Fn(&Recorded) -> Response + Send + Sync;

#[derive(Clone)]
enum Answer {
    Fixed(Response),
    Hook(Arc<Responder>),
}

// ---------------------------------------------------------------------------
// What it records
// ---------------------------------------------------------------------------

/// The client certificate shown at a connection's handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the leaf certificate's DER, lower-case hex.
    pub sha256: String,
    /// The subject, RFC 4514 style (`CN=...`).
    pub subject: String,
    /// Its subject alternative names: URIs, DNS names, IP addresses.
    pub names: Vec<String>,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// 0 for the first request the acquirer received, then 1, ...
    pub seq: usize,
    /// The connection's number (1 for the first accepted connection):
    /// requests of one keep-alive connection share it.
    pub connection: u64,
    pub peer: SocketAddr,
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Names in lower case, values trimmed, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `None`: no client certificate (only possible without
    /// [`AcquirerOptions::require_client_cert`]).
    pub client_cert: Option<ClientCert>,
    pub received_at: SystemTime,
    /// When the request was complete (for measuring delays).
    pub received: Instant,
}

impl Recorded {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The target without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The query (without `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The body as text (lossy).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request {} {} to the acquirer: the body is not JSON ({e}): {:?}",
                self.method,
                self.target,
                self.body_text()
            )
        })
    }
}

#[derive(Default)]
struct Log {
    requests: Vec<Recorded>,
    /// Failed handshakes and refused requests, as text.
    failures: Vec<String>,
    /// Requests ever recorded (not reset by `clear`).
    seq: usize,
}

struct Shared {
    answer: Mutex<Answer>,
    log: Mutex<Log>,
    logged: Condvar,
    stop: AtomicBool,
    /// Open connections (clones of their sockets), to shut down on drop.
    open: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    connections: AtomicU64,
    max_request_body: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn fail(&self, what: String) {
        lock(&self.log).failures.push(what);
        self.logged.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// The acquirer
// ---------------------------------------------------------------------------

/// A running test acquirer (see the module documentation). Stops on drop.
pub struct Acquirer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    client_cert_sha256: String,
    client_identity: String,
    signed_by_other_ca: bool,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for Acquirer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquirer")
            .field("addr", &self.addr)
            .field("dir", &self.dir.path())
            .field("requests", &self.request_count())
            .finish_non_exhaustive()
    }
}

impl Acquirer {
    /// Generates its PKI, binds [`AcquirerOptions::bind`] and serves until
    /// dropped. Panics when it cannot.
    pub fn start(opts: AcquirerOptions) -> Acquirer {
        let listener = TcpListener::bind(opts.bind)
            .unwrap_or_else(|e| panic!("the test acquirer cannot bind {}: {e}", opts.bind));
        Acquirer::start_on(listener, opts)
    }

    /// [`Acquirer::start`] on a listener bound elsewhere
    /// ([`AcquirerOptions::bind`] is ignored).
    pub fn start_on(listener: TcpListener, opts: AcquirerOptions) -> Acquirer {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let dir = tempfile::Builder::new()
            .prefix("cardvault-acquirer-")
            .tempdir()
            .expect("cannot create the acquirer's directory");
        let pki = write_pki(dir.path(), &opts);
        crate::give_to_service_user(dir.path());
        let config = server_config(dir.path(), opts.require_client_cert);
        let shared = Arc::new(Shared {
            answer: Mutex::new(Answer::Fixed(opts.response.clone())),
            log: Mutex::default(),
            logged: Condvar::new(),
            stop: AtomicBool::new(false),
            open: Mutex::default(),
            threads: Mutex::default(),
            connections: AtomicU64::new(0),
            max_request_body: opts.max_request_body,
        });
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("acquirer-accept".to_string())
                .spawn(move || accept_loop(&listener, &shared, &config))
                .expect("cannot start the acquirer's accept thread")
        };
        Acquirer {
            addr,
            dir,
            client_cert_sha256: pki.client_cert_sha256,
            client_identity: opts.client_identity,
            signed_by_other_ca: opts.server_cert_from_other_ca,
            shared,
            accept: Some(accept),
        }
    }

    /// The address it listens on (as bound: `127.0.0.1:<port>` by default).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>` (`https://[::1]:<port>` when bound to
    /// IPv6; the loopback address when bound to an unspecified one).
    pub fn origin(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// `https://localhost:<port>` (the certificate's DNS name).
    pub fn localhost_origin(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// [`Acquirer::origin`] followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    /// The directory of its files (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA a client must trust for this acquirer (a vault's `ca_file`).
    pub fn server_ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("server-ca.pem")
    }

    /// The CA that really signed the server certificate: `other-ca.pem`
    /// with [`AcquirerOptions::server_cert_from_other_ca`], else
    /// [`Acquirer::server_ca_pem_path`].
    pub fn signing_ca_pem_path(&self) -> PathBuf {
        if self.signed_by_other_ca {
            self.dir.path().join("other-ca.pem")
        } else {
            self.server_ca_pem_path()
        }
    }

    /// The only CA it accepts client certificates from.
    pub fn client_ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("client-ca.pem")
    }

    /// The client certificate it issued (a vault's `client_cert_file`).
    pub fn client_cert_path(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// Its key, mode 0600, owned by the service user when the tests run
    /// as root (a vault's `client_key_file`).
    pub fn client_key_path(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// SHA-256 (lower-case hex) of the issued client certificate's DER: what
    /// [`ClientCert::sha256`] is when the vault presented it.
    pub fn client_cert_sha256(&self) -> &str {
        &self.client_cert_sha256
    }

    /// The URI name of the issued client certificate.
    pub fn client_identity(&self) -> &str {
        &self.client_identity
    }

    /// An `[[upstream]]` table of the vault's configuration for this
    /// acquirer: `name`, `url` ([`Acquirer::origin`]), `ca_file`,
    /// `client_cert_file`, `client_key_file`, then `extra` as given (the
    /// `paths`, `tenants`, limits..., one `key = value` a line).
    pub fn upstream_toml(&self, name: &str, extra: &str) -> String {
        let path = |p: PathBuf| format!("{:?}", p.display().to_string());
        let mut table = format!(
            "[[upstream]]\nname = {name:?}\nurl = {:?}\nca_file = {}\nclient_cert_file = {}\nclient_key_file = {}\n",
            self.origin(),
            path(self.server_ca_pem_path()),
            path(self.client_cert_path()),
            path(self.client_key_path()),
        );
        table.push_str(extra);
        if !table.ends_with('\n') {
            table.push('\n');
        }
        table
    }

    /// Answers every following request with `response` (replacing a
    /// responder).
    pub fn set_response(&self, response: Response) {
        *lock(&self.shared.answer) = Answer::Fixed(response);
    }

    /// Answers every following request with what `responder` computes from
    /// it (called on the connection's thread, after the request was
    /// recorded; the response's delay applies).
    pub fn set_responder<F>(&self, responder: F)
    where
        F: Fn(&Recorded) -> Response + Send + Sync + 'static,
    {
        *lock(&self.shared.answer) = Answer::Hook(Arc::new(responder));
    }

    /// Every request recorded (since the last [`Acquirer::clear`]).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.log).requests.clone()
    }

    /// How many requests were recorded (since the last [`Acquirer::clear`]).
    pub fn request_count(&self) -> usize {
        lock(&self.shared.log).requests.len()
    }

    /// How many TCP connections were accepted, ever.
    pub fn connection_count(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Failed TLS handshakes and refused requests (chunked, too large,
    /// malformed), as text, in order (since the last [`Acquirer::clear`]).
    pub fn failures(&self) -> Vec<String> {
        lock(&self.shared.log).failures.clone()
    }

    /// Forgets the requests and failures recorded so far.
    pub fn clear(&self) {
        let mut log = lock(&self.shared.log);
        log.requests.clear();
        log.failures.clear();
    }

    /// The requests once there are at least `n`; panics (listing what
    /// arrived, failures included) after `timeout`.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        self.try_wait_for_requests(n, timeout).unwrap_or_else(|| {
            let log = lock(&self.shared.log);
            let seen: Vec<String> = log
                .requests
                .iter()
                .map(|r| format!("{} {}", r.method, r.target))
                .collect();
            panic!(
                "the test acquirer received {} request(s) in {timeout:?}, {n} expected: {seen:?}; failures: {:?}",
                log.requests.len(),
                log.failures
            )
        })
    }

    /// The requests once there are at least `n`, or `None` after `timeout`.
    pub fn try_wait_for_requests(&self, n: usize, timeout: Duration) -> Option<Vec<Recorded>> {
        let deadline = Instant::now() + timeout;
        let mut log = lock(&self.shared.log);
        loop {
            if log.requests.len() >= n {
                return Some(log.requests.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            log = self
                .shared
                .logged
                .wait_timeout(log, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Acquirer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let wake = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.addr.port())
            }
            _ => self.addr,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for stream in lock(&self.shared.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// PKI and TLS
// ---------------------------------------------------------------------------

struct Written {
    client_cert_sha256: String,
}

fn write_file(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A CA: its parameters (to sign with), key and certificate.
fn make_ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, rcgen::Certificate) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().expect("a CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own: two acquirers are two different CAs to a verifier.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{name} {:016x} (test only)", crate::random_u64()),
    );
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(60);
    params.not_after = now + time::Duration::days(30);
    let cert = params.self_signed(&key).expect("a self-signed CA");
    (params, key, cert)
}

fn write_pki(dir: &Path, opts: &AcquirerOptions) -> Written {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let now = time::OffsetDateTime::now_utc();

    let (server_ca, server_ca_key, server_ca_cert) = make_ca("cardvault test acquirer server CA");
    write_file(&dir.join("server-ca.pem"), &server_ca_cert.pem(), 0o644);
    write_file(
        &dir.join("server-ca.key"),
        &server_ca_key.serialize_pem(),
        0o600,
    );
    let signer = if opts.server_cert_from_other_ca {
        let (other, other_key, other_cert) = make_ca("cardvault test acquirer other CA");
        write_file(&dir.join("other-ca.pem"), &other_cert.pem(), 0o644);
        write_file(&dir.join("other-ca.key"), &other_key.serialize_pem(), 0o600);
        Issuer::new(other, other_key)
    } else {
        Issuer::new(server_ca, server_ca_key)
    };

    let server_key = KeyPair::generate().expect("a server key");
    let mut server =
        CertificateParams::new(opts.server_names.clone()).expect("server certificate names");
    server
        .distinguished_name
        .push(DnType::CommonName, "cardvault test acquirer");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if opts.expired_server_cert {
        server.not_before = now - time::Duration::days(30);
        server.not_after = now - time::Duration::days(1);
    } else {
        server.not_before = now - time::Duration::hours(1);
        server.not_after = now + time::Duration::days(7);
    }
    let server_cert = server
        .signed_by(&server_key, &signer)
        .expect("the server certificate");
    write_file(&dir.join("server.pem"), &server_cert.pem(), 0o644);
    write_file(&dir.join("server.key"), &server_key.serialize_pem(), 0o600);

    let (client_ca, client_ca_key, client_ca_cert) = make_ca("cardvault test acquirer client CA");
    write_file(&dir.join("client-ca.pem"), &client_ca_cert.pem(), 0o644);
    write_file(
        &dir.join("client-ca.key"),
        &client_ca_key.serialize_pem(),
        0o600,
    );
    let client_issuer = Issuer::new(client_ca, client_ca_key);
    let client_key = KeyPair::generate().expect("a client key");
    let mut client = CertificateParams::new(Vec::<String>::new()).expect("client parameters");
    client.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(opts.client_identity.clone())
            .expect("the client identity is an ASCII URI"),
    )];
    client
        .distinguished_name
        .push(DnType::CommonName, "cardvault vault (test acquirer client)");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.not_before = now - time::Duration::hours(1);
    client.not_after = now + time::Duration::days(7);
    let client_cert = client
        .signed_by(&client_key, &client_issuer)
        .expect("the client certificate");
    write_file(&dir.join("client.pem"), &client_cert.pem(), 0o644);
    write_file(&dir.join("client.key"), &client_key.serialize_pem(), 0o600);
    Written {
        client_cert_sha256: hex(&Sha256::digest(client_cert.der())),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn server_config(dir: &Path, require_client_cert: bool) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![CertificateDer::from_pem_file(dir.join("server.pem"))
        .expect("the acquirer's server certificate")];
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("the acquirer's key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("TLS versions");
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                CertificateDer::from_pem_file(dir.join("client-ca.pem"))
                    .expect("the acquirer's client CA"),
            )
            .expect("a usable client CA");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("a client certificate verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .expect("a usable server certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn client_cert_of(der: &[u8]) -> ClientCert {
    let sha256 = hex(&Sha256::digest(der));
    let mut subject = String::new();
    let mut names = Vec::new();
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        subject = cert.subject().to_string();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                use x509_parser::extensions::GeneralName;
                match name {
                    GeneralName::URI(uri) => names.push((*uri).to_string()),
                    GeneralName::DNSName(dns) => names.push((*dns).to_string()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => names.push(
                            IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default()).to_string(),
                        ),
                        16 => names.push(
                            IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default()).to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
    }
    ClientCert {
        sha256,
        subject,
        names,
    }
}

// ---------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, config: &Arc<rustls::ServerConfig>) {
    for stream in listener.incoming() {
        if shared.stopping() {
            break;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let (shared2, config) = (shared.clone(), config.clone());
        let spawned = thread::Builder::new()
            .name(format!("acquirer-conn-{id}"))
            .spawn(move || connection(&shared2, config, stream, id));
        let mut threads = lock(&shared.threads);
        threads.retain(|t| !t.is_finished());
        if let Ok(thread) = spawned {
            threads.push(thread);
        }
    }
}

fn connection(shared: &Shared, config: Arc<rustls::ServerConfig>, tcp: TcpStream, id: u64) {
    let peer = tcp
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
    let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_nodelay(true);
    if let Ok(clone) = tcp.try_clone() {
        lock(&shared.open).insert(id, clone);
    }
    // Registered after the drop shut the open connections down: the stop
    // flag was set before, so it is seen here.
    if !shared.stopping() {
        serve_tls(shared, config, tcp, id, peer);
    }
    lock(&shared.open).remove(&id);
}

fn serve_tls(
    shared: &Shared,
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    id: u64,
    peer: SocketAddr,
) {
    let conn = match rustls::ServerConnection::new(config) {
        Ok(conn) => conn,
        Err(e) => return shared.fail(format!("connection {id} from {peer}: TLS: {e}")),
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            if !shared.stopping() {
                shared.fail(format!("connection {id} from {peer}: TLS handshake: {e}"));
            }
            return;
        }
    }
    let client_cert = tls
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| client_cert_of(leaf.as_ref()));
    let conn = Conn {
        id,
        peer,
        client_cert,
    };
    if serve_http(shared, &mut tls, &conn) {
        tls.conn.send_close_notify();
        let _ = tls.flush();
        linger(&mut tls.sock);
    }
    let _ = tls.sock.shutdown(Shutdown::Both);
}

/// A lingering close: no more writing, then what the peer still sends
/// (the rest of a refused body) is read and dropped for a moment, so that
/// closing with unread data does not reset the connection before the peer
/// read the answer.
fn linger(sock: &mut TcpStream) {
    let _ = sock.shutdown(Shutdown::Write);
    let until = Instant::now() + Duration::from_secs(2);
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 16 * 1024];
    while Instant::now() < until {
        match sock.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// What a request inherits from its connection.
struct Conn {
    id: u64,
    peer: SocketAddr,
    client_cert: Option<ClientCert>,
}

/// Why a connection ends early.
enum Refusal {
    /// The peer closed (or the acquirer is stopping): nothing to answer.
    Gone,
    /// Answer `status` with `reason` as the body, then close.
    Answer(u16, String),
}

/// Serves HTTP/1.1 requests on `stream` until the peer closes, a request
/// asks to close, or a request is refused. `true`: the stream is still
/// usable (close it cleanly).
fn serve_http<S: Read + Write>(shared: &Shared, stream: &mut S, conn: &Conn) -> bool {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match one_request(shared, stream, conn, &mut buf) {
            Ok(true) => {}
            Ok(false) => return true,
            Err(Refusal::Gone) => return false,
            Err(Refusal::Answer(status, reason)) => {
                shared.fail(format!(
                    "connection {} from {}: refused with {status}: {reason}",
                    conn.id, conn.peer
                ));
                let response = Response::new(status)
                    .with_body("text/plain; charset=utf-8", format!("{reason}\n"));
                return write_response(stream, &response, false, false).is_ok();
            }
        }
    }
}

/// Reads, records and answers one request. `Ok(true)`: keep the
/// connection; `Ok(false)`: close it (asked to, or the peer closed between
/// requests).
fn one_request<S: Read + Write>(
    shared: &Shared,
    stream: &mut S,
    conn: &Conn,
    buf: &mut Vec<u8>,
) -> Result<bool, Refusal> {
    // Empty lines before a request line are ignored (RFC 9112, 2.2).
    let head_len = loop {
        while buf.starts_with(b"\r\n") {
            buf.drain(..2);
        }
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal::Answer(
                431,
                "the request head is too large".to_string(),
            ));
        }
        match read_more(stream, buf)? {
            0 if buf.is_empty() => return Ok(false),
            0 => return Err(Refusal::Gone),
            _ => {}
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len - 4]).into_owned();
    buf.drain(..head_len);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(bad(format!("malformed request line {request_line:?}")));
    };
    if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(bad(format!("malformed request line {request_line:?}")));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(bad("obsolete line folding".to_string()));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("malformed header line {line:?}")));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(bad(format!("malformed header name {name:?}")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    fn values<'h>(
        headers: &'h [(String, String)],
        name: &'static str,
    ) -> impl Iterator<Item = &'h str> + 'h {
        headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    let value = |name: &'static str| values(&headers, name);
    if value("transfer-encoding").next().is_some() {
        return Err(Refusal::Answer(
            411,
            "Transfer-Encoding request bodies are not supported: send Content-Length".to_string(),
        ));
    }
    let lengths: Vec<&str> = value("content-length").collect();
    let length = match lengths.first() {
        None => 0,
        Some(first) => {
            if lengths.iter().any(|l| l != first) || !first.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!("bad Content-Length {lengths:?}")));
            }
            first
                .parse::<usize>()
                .map_err(|_| bad(format!("bad Content-Length {first:?}")))?
        }
    };
    if length > shared.max_request_body {
        return Err(Refusal::Answer(
            413,
            format!(
                "the request body of {length} bytes is over {} bytes",
                shared.max_request_body
            ),
        ));
    }
    if length > buf.len()
        && value("expect")
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|()| stream.flush())
            .map_err(|_| Refusal::Gone)?;
    }
    while buf.len() < length {
        if read_more(stream, buf)? == 0 {
            return Err(Refusal::Gone);
        }
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    let connection_tokens: Vec<String> = value("connection")
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let keep_alive = if *version == "HTTP/1.0" {
        connection_tokens.iter().any(|t| t == "keep-alive")
    } else {
        !connection_tokens.iter().any(|t| t == "close")
    };
    let head_only = *method == "HEAD";

    let recorded = {
        let mut log = lock(&shared.log);
        let recorded = Recorded {
            seq: log.seq,
            connection: conn.id,
            peer: conn.peer,
            method: (*method).to_string(),
            target: (*target).to_string(),
            version: (*version).to_string(),
            headers,
            body,
            client_cert: conn.client_cert.clone(),
            received_at: SystemTime::now(),
            received: Instant::now(),
        };
        log.seq += 1;
        log.requests.push(recorded.clone());
        recorded
    };
    shared.logged.notify_all();

    let answer = lock(&shared.answer).clone();
    let response = match answer {
        Answer::Fixed(response) => response,
        Answer::Hook(hook) => hook(&recorded),
    };
    let deadline = Instant::now() + response.delay;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if shared.stopping() {
            return Err(Refusal::Gone);
        }
        thread::sleep(left.min(DELAY_STEP));
    }
    let keep_alive = keep_alive
        && !response
            .headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"));
    write_response(stream, &response, keep_alive, head_only).map_err(|_| Refusal::Gone)?;
    Ok(keep_alive)
}

fn bad(reason: String) -> Refusal {
    Refusal::Answer(400, reason)
}

/// Reads once more into `buf`; 0 at the end of the stream (a peer that
/// closed without `close_notify` too). Errors end the connection.
fn read_more<S: Read>(stream: &mut S, buf: &mut Vec<u8>) -> Result<usize, Refusal> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
            // Timeouts, resets, TLS errors, the shutdown of a stopping acquirer.
            Err(_) => return Err(Refusal::Gone),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn write_response<S: Write>(
    stream: &mut S,
    response: &Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let status = response.status;
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).into_bytes();
    let mut framed = false;
    for (name, value) in &response.headers {
        framed |= name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding");
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !framed && !no_body {
        out.extend_from_slice(format!("Content-Length: {}\r\n", response.body.len()).as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only && !no_body {
        out.extend_from_slice(&response.body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{tls_client_config, Wire};

    const GENEROUS: Duration = Duration::from_secs(60);

    /// An agent trusting `ca`, presenting the acquirer's client certificate
    /// when `with_cert`; pooled connections, no redirects.
    fn agent(acq: &Acquirer, ca: &Path, with_cert: bool) -> ureq::Agent {
        let (cert, key) = (acq.client_cert_path(), acq.client_key_path());
        let client = with_cert.then_some((cert.as_path(), key.as_path()));
        ureq::AgentBuilder::new()
            .tls_config(tls_client_config(ca, client))
            .timeout(GENEROUS)
            .redirects(0)
            .build()
    }

    fn trusting(acq: &Acquirer) -> ureq::Agent {
        agent(acq, &acq.server_ca_pem_path(), true)
    }

    /// (status, headers of interest, body) of an answer, 4xx/5xx included.
    fn call(req: ureq::Request, body: Option<&Value>) -> Result<(u16, ureq::Response), String> {
        let result = match body {
            Some(body) => req.send_json(body.clone()),
            None => req.call(),
        };
        match result {
            Ok(resp) => Ok((resp.status(), resp)),
            Err(ureq::Error::Status(status, resp)) => Ok((status, resp)),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    #[test]
    fn a_request_gets_the_configured_answer_and_is_recorded_with_the_client_certificate() {
        let acq = Acquirer::start(AcquirerOptions::default());
        let body = serde_json::json!({"amount": 1000, "card": {"number": "4111111111111111"}});
        let (status, resp) = call(
            trusting(&acq)
                .post(&acq.url("/v1/payments?merchant=m1"))
                .set("Idempotency-Key", "k-1"),
            Some(&body),
        )
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(resp.content_type(), "application/json");
        let answer: Value = resp.into_json().unwrap();
        assert_eq!(answer, serde_json::json!({"status": "approved"}));

        let seen = acq.wait_for_requests(1, GENEROUS);
        assert_eq!(seen.len(), 1);
        let r = &seen[0];
        assert_eq!((r.method.as_str(), r.path()), ("POST", "/v1/payments"));
        assert_eq!(r.query(), Some("merchant=m1"));
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.header("idempotency-key"), Some("k-1"));
        assert_eq!(r.header("Idempotency-Key"), Some("k-1"));
        assert!(r.headers.iter().all(|(n, _)| *n == n.to_ascii_lowercase()));
        assert_eq!(r.json(), body);
        assert_eq!(r.connection, 1);
        let cert = r.client_cert.as_ref().expect("mutual TLS");
        assert_eq!(cert.sha256, acq.client_cert_sha256());
        assert!(
            cert.names.iter().any(|n| n == DEFAULT_CLIENT_IDENTITY),
            "{cert:?}"
        );
        assert!(cert.subject.contains("test acquirer client"), "{cert:?}");
        assert_eq!(acq.request_count(), 1);
        assert!(acq.failures().is_empty(), "{:?}", acq.failures());

        // A new answer while running; the localhost name is in the certificate.
        acq.set_response(
            Response::json(402, &serde_json::json!({"status": "declined"}))
                .with_header("X-Acquirer-Ref", "r-7"),
        );
        let url = format!("{}/v1/payments", acq.localhost_origin());
        let (status, resp) = call(trusting(&acq).get(&url), None).unwrap();
        assert_eq!(status, 402);
        assert_eq!(resp.header("x-acquirer-ref"), Some("r-7"));
        assert_eq!(resp.into_string().unwrap(), r#"{"status":"declined"}"#);
        assert_eq!(acq.wait_for_requests(2, GENEROUS)[1].method, "GET");
        acq.clear();
        assert_eq!(acq.request_count(), 0);
    }

    #[test]
    fn the_files_are_where_it_says_and_the_keys_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let acq = Acquirer::start(AcquirerOptions::default());
        for path in [
            acq.server_ca_pem_path(),
            acq.signing_ca_pem_path(),
            acq.client_ca_pem_path(),
            acq.client_cert_path(),
        ] {
            assert!(fs::read_to_string(&path)
                .unwrap()
                .contains("BEGIN CERTIFICATE"));
        }
        let mode = fs::metadata(acq.client_key_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        if let Some(user) = crate::service_user() {
            use std::os::unix::fs::MetadataExt as _;
            let meta = fs::metadata(acq.client_key_path()).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid));
        }
        let table = acq.upstream_toml("acq", "paths = [\"/v1/payments\"]");
        assert!(
            table.starts_with("[[upstream]]\nname = \"acq\"\n"),
            "{table}"
        );
        assert!(table.contains(&format!(
            "url = \"https://127.0.0.1:{}\"",
            acq.addr().port()
        )));
        assert!(table.contains("client_key_file = "), "{table}");
        assert!(table.ends_with("paths = [\"/v1/payments\"]\n"), "{table}");
    }

    #[test]
    fn without_a_client_certificate_the_handshake_fails_and_nothing_is_recorded() {
        let acq = Acquirer::start(AcquirerOptions::default());
        let err = call(
            agent(&acq, &acq.server_ca_pem_path(), false).post(&acq.url("/v1/payments")),
            Some(&serde_json::json!({})),
        )
        .expect_err("the acquirer requires a client certificate");
        assert!(!err.is_empty());
        // The failure is the acquirer's to record (a TLS 1.3 client learns
        // of it only when reading).
        let deadline = Instant::now() + GENEROUS;
        while acq.failures().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let failures = acq.failures();
        assert!(
            failures.iter().any(|f| f.contains("handshake")),
            "{failures:?} ({err})"
        );
        assert_eq!(acq.request_count(), 0);

        // A client certificate from another CA is refused too.
        let other = Acquirer::start(AcquirerOptions::default());
        let foreign = tls_client_config(
            &acq.server_ca_pem_path(),
            Some((&other.client_cert_path(), &other.client_key_path())),
        );
        let agent = ureq::AgentBuilder::new()
            .tls_config(foreign)
            .timeout(GENEROUS)
            .build();
        call(agent.get(&acq.url("/")), None).expect_err("a foreign client certificate");
        assert_eq!(acq.request_count(), 0);
    }

    #[test]
    fn without_require_client_cert_no_certificate_is_asked_for() {
        let acq = Acquirer::start(AcquirerOptions {
            require_client_cert: false,
            ..AcquirerOptions::default()
        });
        let (status, _) = call(
            agent(&acq, &acq.server_ca_pem_path(), false).get(&acq.url("/ping")),
            None,
        )
        .unwrap();
        assert_eq!(status, 200);
        assert!(acq.requests()[0].client_cert.is_none());
    }

    #[test]
    fn an_expired_server_certificate_is_refused_by_the_client() {
        let acq = Acquirer::start(AcquirerOptions {
            expired_server_cert: true,
            ..AcquirerOptions::default()
        });
        let err = call(trusting(&acq).get(&acq.url("/")), None).expect_err("expired");
        assert!(err.to_lowercase().contains("expired"), "{err}");
        assert_eq!(acq.request_count(), 0);
    }

    #[test]
    fn a_server_certificate_from_another_ca_is_refused_and_its_real_ca_accepted() {
        let acq = Acquirer::start(AcquirerOptions {
            server_cert_from_other_ca: true,
            ..AcquirerOptions::default()
        });
        assert_ne!(acq.signing_ca_pem_path(), acq.server_ca_pem_path());
        let err = call(trusting(&acq).get(&acq.url("/")), None).expect_err("wrong CA");
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert_eq!(acq.request_count(), 0);
        // The control: the CA that did sign it is accepted.
        let (status, _) = call(
            agent(&acq, &acq.signing_ca_pem_path(), true).get(&acq.url("/")),
            None,
        )
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(acq.request_count(), 1);
    }

    #[test]
    fn a_delay_is_observed_recorded_first_and_holds_up_no_other_connection() {
        let acq = Acquirer::start(AcquirerOptions::default());
        acq.set_responder(|r| {
            if r.path() == "/slow" {
                Response::approved().with_delay(Duration::from_secs(30))
            } else {
                Response::approved().with_delay(Duration::from_secs(2))
            }
        });
        // A client that gives up first: the request is still recorded.
        let impatient = ureq::AgentBuilder::new()
            .tls_config(tls_client_config(
                &acq.server_ca_pem_path(),
                Some((&acq.client_cert_path(), &acq.client_key_path())),
            ))
            .timeout(Duration::from_secs(1))
            .build();
        let started = Instant::now();
        let err = call(impatient.get(&acq.url("/slow")), None).expect_err("a timeout");
        assert!(err.to_lowercase().contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(25));
        assert_eq!(acq.wait_for_requests(1, GENEROUS)[0].path(), "/slow");

        // A slow answer in flight on one connection, a fast one on another.
        let slow = {
            let agent = trusting(&acq);
            let url = acq.url("/slow");
            thread::spawn(move || call(agent.get(&url), None).map(|(s, _)| s))
        };
        acq.wait_for_requests(2, GENEROUS);
        let started = Instant::now();
        let (status, _) = call(trusting(&acq).get(&acq.url("/fast")), None).unwrap();
        assert_eq!(status, 200);
        assert!(started.elapsed() >= Duration::from_secs(2), "the delay");
        assert!(!slow.is_finished(), "the slow answer is still delayed");
        let seen = acq.requests();
        assert_eq!(seen.len(), 3);
        assert_ne!(seen[1].connection, seen[2].connection);
        // Dropping the acquirer cuts the delay short.
        let dropped = Instant::now();
        drop(acq);
        let _ = slow.join().unwrap();
        assert!(dropped.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let acq = Acquirer::start(AcquirerOptions::default());
        let agent = trusting(&acq);
        for i in 0..3 {
            let (status, resp) = call(
                agent.post(&acq.url("/v1/payments")),
                Some(&serde_json::json!({"n": i})),
            )
            .unwrap();
            assert_eq!(status, 200);
            resp.into_string().unwrap();
        }
        let seen = acq.wait_for_requests(3, GENEROUS);
        assert!(
            seen.iter().all(|r| r.connection == seen[0].connection),
            "{seen:?}"
        );
        assert_eq!(acq.connection_count(), 1);
        assert_eq!(
            seen.iter()
                .map(|r| r.json()["n"].clone())
                .collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(seen.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn a_responder_echoes_and_a_redirect_is_returned_as_is() {
        let acq = Acquirer::start(AcquirerOptions::default());
        acq.set_responder(|r| {
            let amount = r.json()["amount"].clone();
            Response::json(201, &serde_json::json!({"echo": amount, "path": r.path()}))
        });
        let (status, resp) = call(
            trusting(&acq).post(&acq.url("/v1/payments")),
            Some(&serde_json::json!({"amount": 42})),
        )
        .unwrap();
        assert_eq!(status, 201);
        let answer: Value = resp.into_json().unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"echo": 42, "path": "/v1/payments"})
        );

        acq.set_response(Response::redirect(302, "https://elsewhere.test/steal"));
        let (status, resp) = call(trusting(&acq).get(&acq.url("/x")), None).unwrap();
        assert_eq!(status, 302);
        assert_eq!(
            resp.header("location"),
            Some("https://elsewhere.test/steal")
        );
        assert_eq!(acq.request_count(), 2);
    }

    #[test]
    fn large_and_chunked_answers_arrive_whole() {
        let acq = Acquirer::start(AcquirerOptions::default());
        let big = vec![b'a'; 3 * 1024 * 1024];
        acq.set_response(Response::new(200).with_body("text/plain", big.clone()));
        let (_, resp) = call(trusting(&acq).get(&acq.url("/big")), None).unwrap();
        assert_eq!(resp.header("content-length"), Some("3145728"));
        let mut got = Vec::new();
        resp.into_reader().read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), big.len());

        acq.set_response(Response::new(200).with_chunked_body("text/plain", &big, 100_000));
        let (_, resp) = call(trusting(&acq).get(&acq.url("/chunked")), None).unwrap();
        assert_eq!(resp.header("content-length"), None);
        assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
        let mut got = Vec::new();
        resp.into_reader().read_to_end(&mut got).unwrap();
        assert!(got == big, "{} bytes", got.len());
    }

    /// Raw requests over one TLS connection with the client certificate.
    fn raw(acq: &Acquirer, bytes: &[u8]) -> String {
        let tls = tls_client_config(
            &acq.server_ca_pem_path(),
            Some((&acq.client_cert_path(), &acq.client_key_path())),
        );
        let addr = acq.addr().to_string();
        let mut wire = Wire::connect(&addr, Some(tls));
        wire.write_all(bytes).unwrap();
        wire.flush().unwrap();
        let mut out = Vec::new();
        // The acquirer closes after what this sends (close or refusal).
        let _ = wire.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn chunked_and_malformed_requests_are_refused_cleanly_and_pipelining_works() {
        let acq = Acquirer::start(AcquirerOptions {
            max_request_body: 10,
            ..AcquirerOptions::default()
        });
        let answer = raw(
            &acq,
            b"POST /v1/payments HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 411 "), "{answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
        let answer = raw(
            &acq,
            b"POST /v1/payments HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n01234567890",
        );
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        // A large refused body, unread: the answer still arrives (no reset).
        let mut large =
            b"POST /v1/payments HTTP/1.1\r\nHost: a\r\nContent-Length: 400000\r\n\r\n".to_vec();
        large.resize(large.len() + 400_000, b'x');
        let answer = raw(&acq, &large);
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        let answer = raw(&acq, b"NONSENSE\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert_eq!(acq.request_count(), 0);
        assert_eq!(acq.failures().len(), 4, "{:?}", acq.failures());

        // Two pipelined requests, the second asking to close; Expect honoured.
        let answer = raw(
            &acq,
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}\
              GET /b HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        );
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        let seen = acq.wait_for_requests(2, GENEROUS);
        assert_eq!(
            (seen[0].path(), seen[0].body.as_slice()),
            ("/a", &b"{}"[..])
        );
        assert_eq!(
            (seen[1].path(), seen[1].body.as_slice()),
            ("/b", &b"abc"[..])
        );
        assert_eq!(seen[0].connection, seen[1].connection);
    }
}
