//! A small browser-automation layer for end-to-end tests of the hosted card
//! form: Debian's Chromium driven by chromedriver over the W3C WebDriver HTTP
//! API, with the harness's `ureq` and `serde_json` (no WebDriver crate).
//!
//! Nothing here downloads a browser: `/usr/bin/chromium` and
//! `/usr/bin/chromedriver` come from the `chromium` and `chromium-driver`
//! packages (`.ci/run` installs them). Without them [`Browser::start`]
//! panics with the command to run: the browser tests fail, never skip.
//!
//! Every [`Browser`] has its own chromedriver on a free loopback port, its own
//! headless Chromium and a fresh profile in a temporary directory; drop ends
//! the session (Chromium quits) and kills chromedriver.
//!
//! TLS: Chromium has no command-line switch to add a trust anchor (on Linux
//! it reads the user's NSS database or enterprise policy, both outside a
//! test's reach without `certutil` or root-owned files). So a test that loads
//! a harness HTTPS listener names the listener's *leaf* key instead:
//! [`BrowserOptions::trust_leaf_certificate`] passes
//! `--ignore-certificate-errors-spki-list=<base64 SHA-256 of the leaf's
//! SubjectPublicKeyInfo>` (honoured because the profile is given with
//! `--user-data-dir`): certificates with that one key are accepted whatever
//! their other errors (unknown issuer, name, dates), every other certificate
//! is checked as usual (the smoke test shows both). That is narrower than
//! `acceptInsecureCerts` (any certificate at all), which stays available as
//! [`BrowserOptions::accept_insecure_certs`], off by default. chromedriver
//! reports a refused certificate as a finished navigation to Chromium's
//! interstitial (`NET::ERR_CERT_AUTHORITY_INVALID` in its text), not as
//! W3C's `insecure certificate` error.
//!
//! Page content is the tests' business: errors and browser-log entries never
//! carry it unfiltered, every run of 12 or more digits in a WebDriver error
//! message or a log message is replaced by `[digits]` before it can reach a
//! panic message.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`), the same version.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long chromedriver may take to answer `GET /status` as ready.
pub const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one WebDriver command may take (page loads included).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The W3C name of an element reference in JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Keys for [`Browser::send_keys_to_active`] and [`Element::send_keys`]
/// (W3C WebDriver's code points for them).
pub mod keys {
    pub const TAB: &str = "\u{E004}";
    pub const ENTER: &str = "\u{E007}";
    pub const BACKSPACE: &str = "\u{E003}";
    pub const ESCAPE: &str = "\u{E00C}";
    pub const SHIFT: &str = "\u{E008}";
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A WebDriver command that failed: the command, the HTTP status, and the
/// W3C error code and message (digit runs masked; no stack trace).
#[derive(Debug, Clone)]
pub struct WebDriverError {
    /// `METHOD /path` of the command (no element ids, no arguments).
    pub command: String,
    /// The HTTP status of the answer (0: no answer, or a local timeout).
    pub status: u16,
    /// The W3C error code: `no such element`, `javascript error`, ...; also
    /// `transport` (no answer) and `timeout` ([`Browser::wait_for`]).
    pub error: String,
    pub message: String,
}

impl WebDriverError {
    /// `no such element`, `no such frame` or `no such window`.
    pub fn is_no_such(&self) -> bool {
        self.error.starts_with("no such ")
    }
}

impl fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WebDriver {}: {} (HTTP {}): {}",
            self.command, self.error, self.status, self.message
        )
    }
}

impl std::error::Error for WebDriverError {}

pub type Result<T> = std::result::Result<T, WebDriverError>;

/// `text` with every run of 12 or more digits (single spaces or dashes
/// between them allowed) replaced by `[digits]`: what a card number would
/// look like in an error or a console message.
pub fn mask_digit_runs(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = 0;
        while i < chars.len() {
            if chars[i].is_ascii_digit() {
                digits += 1;
                i += 1;
            } else if (chars[i] == ' ' || chars[i] == '-')
                && chars.get(i + 1).is_some_and(char::is_ascii_digit)
            {
                i += 1;
            } else {
                break;
            }
        }
        if digits >= 12 {
            out.push_str("[digits]");
        } else {
            out.extend(&chars[start..i]);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// How [`Browser::start_with`] starts the browser.
#[derive(Debug, Clone, Default)]
pub struct BrowserOptions {
    /// W3C `acceptInsecureCerts`: accept any certificate. Prefer
    /// [`BrowserOptions::trust_leaf_certificate`], which accepts one key.
    pub accept_insecure_certs: bool,
    /// Base64 SHA-256 hashes of SubjectPublicKeyInfos Chromium accepts
    /// whatever their certificate's issuer (`--ignore-certificate-errors-spki-list`).
    pub trusted_spki: Vec<String>,
}

impl BrowserOptions {
    /// Trust the leaf certificate of `pem` (the first certificate in the
    /// file, e.g. `harness-pki/server.pem`) by the hash of its key.
    pub fn trust_leaf_certificate(mut self, pem: &Path) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        let cert = rustls::pki_types::CertificateDer::pem_file_iter(pem)
            .ok()
            .and_then(|mut certs| certs.next())
            .and_then(|c| c.ok())
            .unwrap_or_else(|| panic!("no certificate in {}", pem.display()));
        self.trusted_spki.push(
            spki_sha256_base64(&cert)
                .unwrap_or_else(|| panic!("cannot parse the certificate in {}", pem.display())),
        );
        self
    }
}

/// Base64 (standard, padded) of the SHA-256 of a DER certificate's
/// SubjectPublicKeyInfo, the form `--ignore-certificate-errors-spki-list`
/// takes (`openssl x509 -pubkey | openssl pkey -pubin -outform der |
/// openssl dgst -sha256 -binary | base64`). `None` if it is not a
/// certificate.
pub fn spki_sha256_base64(cert_der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
    //   signature, issuer, validity, subject, subjectPublicKeyInfo, ... }
    let (cert, _) = der_next(cert_der)?;
    if cert.tag != 0x30 {
        return None;
    }
    let (tbs, _) = der_next(cert.contents)?;
    if tbs.tag != 0x30 {
        return None;
    }
    let mut fields = tbs.contents;
    if fields.first() == Some(&0xa0) {
        fields = der_next(fields)?.1;
    }
    for _ in 0..5 {
        fields = der_next(fields)?.1;
    }
    let (spki, _) = der_next(fields)?;
    if spki.tag != 0x30 {
        return None;
    }
    Some(base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki.whole)))
}

/// One DER element: its tag, its contents, and all of it (header included).
struct Tlv<'a> {
    tag: u8,
    contents: &'a [u8],
    whole: &'a [u8],
}

/// The DER element at the start of `input`, and what follows it.
fn der_next(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    let whole = input.get(..end)?;
    let tlv = Tlv {
        tag,
        contents: &whole[header..],
        whole,
    };
    Some((tlv, &input[end..]))
}

// ---------------------------------------------------------------------------
// The browser
// ---------------------------------------------------------------------------

/// One entry of the browser's console log, as chromedriver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// `SEVERE`, `WARNING`, `INFO`, `DEBUG`.
    pub level: String,
    /// `console-api`, `javascript`, `network`, `security`, ... (may be empty).
    pub source: String,
    /// The message, digit runs masked ([`mask_digit_runs`]).
    pub message: String,
    pub timestamp: i64,
}

impl LogEntry {
    pub fn is_severe(&self) -> bool {
        self.level == "SEVERE"
    }
}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} {}] {}", self.level, self.source, self.message)
    }
}

/// A headless Chromium under its own chromedriver, with one WebDriver
/// session. Not for sharing between threads.
pub struct Browser {
    agent: ureq::Agent,
    /// `http://127.0.0.1:<port>` of chromedriver.
    driver: String,
    session: String,
    child: Child,
    /// The browser log read so far (chromedriver hands each entry out once).
    log: Mutex<Vec<LogEntry>>,
    driver_log: PathBuf,
    // Dropped last: the profile directory and chromedriver's log.
    _profile: tempfile::TempDir,
}

impl fmt::Debug for Browser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Browser")
            .field("driver", &self.driver)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: the browser tests need Debian's Chromium and its driver \
         (apt-get install -y chromium chromium-driver; package {package})"
    );
}

impl Browser {
    /// [`Browser::start_with`] default options: no certificate errors
    /// accepted.
    pub fn start() -> Browser {
        Browser::start_with(BrowserOptions::default())
    }

    /// Starts chromedriver on a free port, waits for it, and opens a session
    /// with a headless Chromium on a fresh profile. Panics with a clear
    /// message when either program is missing or will not start.
    pub fn start_with(options: BrowserOptions) -> Browser {
        require(CHROMIUM, "chromium");
        require(CHROMEDRIVER, "chromium-driver");
        let profile = tempfile::Builder::new()
            .prefix("cardvault-browser-")
            .tempdir()
            .expect("cannot create a browser profile directory");
        let user_data = profile.path().join("profile");
        let driver_log = profile.path().join("chromedriver.log");
        let port = crate::free_port();
        let log_file = fs::File::create(&driver_log).expect("cannot create chromedriver's log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!("--log-path={}", driver_log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER}: {e}"));
        let agent = ureq::AgentBuilder::new()
            .timeout(COMMAND_TIMEOUT)
            .max_idle_connections(0)
            .build();
        let mut browser = Browser {
            agent,
            driver: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            child,
            log: Mutex::new(Vec::new()),
            driver_log,
            _profile: profile,
        };
        browser.wait_ready();

        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-quic".to_string(),
            "--no-first-run".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            format!("--user-data-dir={}", user_data.display()),
            "--window-size=900,900".to_string(),
        ];
        if !options.trusted_spki.is_empty() {
            args.push(format!(
                "--ignore-certificate-errors-spki-list={}",
                options.trusted_spki.join(",")
            ));
        }
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": options.accept_insecure_certs,
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                    "goog:loggingPrefs": { "browser": "ALL" },
                }
            }
        });
        let created = browser
            .raw("POST", "/session", Some(capabilities))
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start a Chromium session: {e}\nchromedriver log:\n{}",
                    browser.driver_log_tail()
                )
            });
        browser.session = created
            .get("sessionId")
            .and_then(Value::as_str)
            .expect("a new session has an id")
            .to_string();
        browser
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + DRIVER_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                panic!(
                    "{CHROMEDRIVER} exited at start ({status}):\n{}",
                    self.driver_log_tail()
                );
            }
            let ready = self
                .agent
                .get(&format!("{}/status", self.driver))
                .timeout(Duration::from_secs(2))
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .and_then(|v| v.pointer("/value/ready").and_then(Value::as_bool))
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{CHROMEDRIVER} not ready after {DRIVER_START_TIMEOUT:?}:\n{}",
                self.driver_log_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of chromedriver's own log (start-up problems).
    fn driver_log_tail(&self) -> String {
        let text = fs::read_to_string(&self.driver_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        mask_digit_runs(&lines[lines.len().saturating_sub(30)..].join("\n"))
    }

    /// A command on the driver (`path` from the root), its `value`.
    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.driver);
        let request = self.agent.request(method, &url);
        let result = match body {
            Some(body) => request.send_json(body),
            None if method == "POST" => request.send_json(json!({})),
            None => request.call(),
        };
        // Element and session ids stay out of the error's command name.
        let command = format!(
            "{method} {}",
            path.split('/')
                .map(|s| if s.len() >= 20 { "{id}" } else { s })
                .collect::<Vec<_>>()
                .join("/")
        );
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(status, response)) => {
                let body: Value = response.into_json().unwrap_or(Value::Null);
                let field = |name: &str| {
                    body.pointer(&format!("/value/{name}"))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                // The first line only: chromedriver appends its version and
                // a stack trace.
                let message = field("message");
                let message = message.lines().next().unwrap_or_default();
                return Err(WebDriverError {
                    command,
                    status,
                    error: field("error"),
                    message: mask_digit_runs(message),
                });
            }
            Err(ureq::Error::Transport(e)) => {
                return Err(WebDriverError {
                    command,
                    status: 0,
                    error: "transport".to_string(),
                    message: mask_digit_runs(&e.to_string()),
                })
            }
        };
        let body: Value = response.into_json().map_err(|e| WebDriverError {
            command,
            status: 200,
            error: "invalid answer".to_string(),
            message: e.to_string(),
        })?;
        Ok(body.get("value").cloned().unwrap_or(Value::Null))
    }

    /// A command on this session (`path` below `/session/{id}`).
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Navigates the top-level browsing context and waits for the load.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// The URL of the top-level browsing context.
    pub fn current_url(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The first element matching a CSS selector in the current frame.
    pub fn find_css(&self, selector: &str) -> Result<Element<'_>> {
        let value = self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": selector })),
        )?;
        self.element(&value)
    }

    /// Every element matching a CSS selector in the current frame (none is
    /// not an error).
    pub fn find_all(&self, selector: &str) -> Result<Vec<Element<'_>>> {
        let value = self.cmd(
            "POST",
            "/elements",
            Some(json!({ "using": "css selector", "value": selector })),
        )?;
        self.elements(&value)
    }

    fn element(&self, value: &Value) -> Result<Element<'_>> {
        match value.get(ELEMENT_KEY).and_then(Value::as_str) {
            Some(id) => Ok(Element {
                browser: self,
                id: id.to_string(),
            }),
            None => Err(WebDriverError {
                command: "element reference".to_string(),
                status: 200,
                error: "invalid answer".to_string(),
                message: "no element reference in the answer".to_string(),
            }),
        }
    }

    fn elements(&self, value: &Value) -> Result<Vec<Element<'_>>> {
        value
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|v| self.element(v))
            .collect()
    }

    /// Makes an `<iframe>` (or `<frame>`) element's document the current
    /// frame: later finds, scripts and keys go there.
    pub fn switch_to_frame(&self, frame: &Element<'_>) -> Result<()> {
        self.cmd("POST", "/frame", Some(json!({ "id": frame.to_json() })))
            .map(drop)
    }

    /// Back to the parent of the current frame.
    pub fn switch_to_parent(&self) -> Result<()> {
        self.cmd("POST", "/frame/parent", None).map(drop)
    }

    /// Back to the top-level document.
    pub fn switch_to_top(&self) -> Result<()> {
        self.cmd("POST", "/frame", Some(json!({ "id": null })))
            .map(drop)
    }

    /// Runs `script` (a function body: `return ...;`, arguments in
    /// `arguments[i]`; pass elements with [`Element::to_json`]) in the
    /// current frame and returns what it returned.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Polls `check` every 50 ms until it returns `Some`, or fails with
    /// error `timeout` naming `what` after `timeout`.
    pub fn wait_for<'b, T>(
        &'b self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&'b Browser) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check(self) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(WebDriverError {
                    command: "wait".to_string(),
                    status: 0,
                    error: "timeout".to_string(),
                    message: format!("{what}: not after {timeout:?}"),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every browser console entry since the session started (from every
    /// frame chromedriver reports; chromedriver hands each one out once, so
    /// they are kept here).
    pub fn browser_log(&self) -> Result<Vec<LogEntry>> {
        let value = self.cmd("POST", "/se/log", Some(json!({ "type": "browser" })))?;
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        for entry in value.as_array().map(Vec::as_slice).unwrap_or_default() {
            let text = |name: &str| {
                entry
                    .get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            log.push(LogEntry {
                level: text("level"),
                source: text("source"),
                message: mask_digit_runs(&text("message")),
                timestamp: entry.get("timestamp").and_then(Value::as_i64).unwrap_or(0),
            });
        }
        Ok(log.clone())
    }

    /// A PNG of the viewport, written to `path` (parent directories made).
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let value = self.cmd("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap_or_default())
            .map_err(|e| WebDriverError {
                command: "GET /session/{id}/screenshot".to_string(),
                status: 200,
                error: "invalid answer".to_string(),
                message: format!("not base64: {e}"),
            })?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        fs::write(path, png).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        Ok(())
    }

    /// Types `text` on the keyboard into whatever has the focus, as a user
    /// would (W3C actions: one key down and up per character; the
    /// [`keys`] constants for Tab, Enter, ...), then releases every key.
    pub fn send_keys_to_active(&self, text: &str) -> Result<()> {
        let actions: Vec<Value> = text
            .chars()
            .flat_map(|c| {
                let key = c.to_string();
                [
                    json!({ "type": "keyDown", "value": key }),
                    json!({ "type": "keyUp", "value": key }),
                ]
            })
            .collect();
        self.cmd(
            "POST",
            "/actions",
            Some(json!({
                "actions": [{ "type": "key", "id": "keyboard", "actions": actions }]
            })),
        )?;
        self.cmd("DELETE", "/actions", None).map(drop)
    }

    /// The element that has the focus in the current frame.
    pub fn active_element(&self) -> Result<Element<'_>> {
        let value = self.cmd("GET", "/element/active", None)?;
        self.element(&value)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Chromium quits with its session.
            let _ = self.raw("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An element of the page, valid while its document lives.
#[derive(Debug, Clone)]
pub struct Element<'b> {
    browser: &'b Browser,
    id: String,
}

impl Element<'_> {
    fn path(&self, rest: &str) -> String {
        format!("/element/{}{rest}", self.id)
    }

    /// The W3C element reference, for [`Browser::execute`] arguments.
    pub fn to_json(&self) -> Value {
        json!({ ELEMENT_KEY: self.id })
    }

    /// Focuses the element and types `text` into it.
    pub fn send_keys(&self, text: &str) -> Result<()> {
        self.browser
            .cmd("POST", &self.path("/value"), Some(json!({ "text": text })))
            .map(drop)
    }

    /// Empties an input or text area.
    pub fn clear(&self) -> Result<()> {
        self.browser
            .cmd("POST", &self.path("/clear"), None)
            .map(drop)
    }

    /// Clicks the element's centre (scrolled into view).
    pub fn click(&self) -> Result<()> {
        self.browser
            .cmd("POST", &self.path("/click"), None)
            .map(drop)
    }

    /// The rendered text.
    pub fn text(&self) -> Result<String> {
        Ok(self
            .browser
            .cmd("GET", &self.path("/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// An attribute's value (`None`: absent).
    pub fn attribute(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .browser
            .cmd("GET", &self.path(&format!("/attribute/{name}")), None)?
            .as_str()
            .map(str::to_string))
    }

    /// A DOM property (`value` of an input, ...).
    pub fn property(&self, name: &str) -> Result<Value> {
        self.browser
            .cmd("GET", &self.path(&format!("/property/{name}")), None)
    }

    /// The first descendant matching a CSS selector.
    pub fn find_css(&self, selector: &str) -> Result<Element<'_>> {
        let value = self.browser.cmd(
            "POST",
            &self.path("/element"),
            Some(json!({ "using": "css selector", "value": selector })),
        )?;
        self.browser.element(&value)
    }
}

// ---------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------

/// `<target>/browser-artifacts` (`$CARGO_TARGET_DIR`, else the workspace's
/// `target/`), created: where browser tests leave screenshots.
pub fn artifacts_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => crate::workspace_root().join(dir),
        None => crate::workspace_root().join("target"),
    };
    let dir = target.join("browser-artifacts");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------
// A static site on a loopback origin
// ---------------------------------------------------------------------------

/// One file of a [`StaticSite`].
#[derive(Debug, Clone)]
struct File {
    content_type: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// A tiny HTTP/1.1 server on `127.0.0.1:<free port>` (its own origin) that
/// answers `GET` with the files put into it (`Cache-Control: no-store`, the
/// connection closed after each answer), 204 for `/favicon.ico` and 404 for
/// anything else, and counts the requests per path. Bound first, filled
/// afterwards: pages usually name each other's origins. Stopped on drop.
#[derive(Debug)]
pub struct StaticSite {
    origin: String,
    addr: std::net::SocketAddr,
    files: Arc<Mutex<HashMap<String, File>>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StaticSite {
    pub fn start() -> StaticSite {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let files: Arc<Mutex<HashMap<String, File>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (files, requests, stop) = (files.clone(), requests.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (files, requests) = (files.clone(), requests.clone());
                    // A connection of its own thread: browsers open spare
                    // connections that never send a request.
                    thread::spawn(move || answer(stream, &files, &requests));
                }
            })
        };
        StaticSite {
            origin: format!("http://{addr}"),
            addr,
            files,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The absolute URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }

    /// Serves `body` at `path` with `content_type` and extra headers
    /// (`Content-Security-Policy`, ...); replaces an earlier file.
    pub fn put(&self, path: &str, content_type: &str, body: &str, headers: &[(&str, &str)]) {
        let file = File {
            content_type: content_type.to_string(),
            body: body.as_bytes().to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        };
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_string(), file);
    }

    /// How many requests asked for `path` (query strings ignored).
    pub fn requests(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl Drop for StaticSite {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(stream: TcpStream, files: &Mutex<HashMap<String, File>>, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    // The headers: read and ignored (no request bodies here).
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_string();
    requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.clone());
    let file = files
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&path)
        .cloned();
    let (status, file) = match (method, file) {
        ("GET" | "HEAD", Some(file)) => ("200 OK", file),
        ("GET" | "HEAD", None) if path == "/favicon.ico" => (
            "204 No Content",
            File {
                content_type: "image/x-icon".to_string(),
                body: Vec::new(),
                headers: Vec::new(),
            },
        ),
        ("GET" | "HEAD", None) => (
            "404 Not Found",
            File {
                content_type: "text/plain; charset=utf-8".to_string(),
                body: b"not found\n".to_vec(),
                headers: Vec::new(),
            },
        ),
        _ => (
            "405 Method Not Allowed",
            File {
                content_type: "text/plain; charset=utf-8".to_string(),
                body: b"method not allowed\n".to_vec(),
                headers: Vec::new(),
            },
        ),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n",
        file.content_type,
        file.body.len()
    );
    for (name, value) in &file.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = &stream;
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&file.body);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Drain what the client still sends so the close is not a reset.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = std::io::copy(&mut stream.take(64 * 1024), &mut std::io::sink());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_runs_of_twelve_or_more_are_masked() {
        assert_eq!(mask_digit_runs("card 4111111111111111."), "card [digits].");
        assert_eq!(mask_digit_runs("4111 1111 1111 1111 x"), "[digits] x");
        assert_eq!(mask_digit_runs("4111-1111-1111-1111"), "[digits]");
        assert_eq!(
            mask_digit_runs("http://127.0.0.1:43815/ at 12:30, 12345678901"),
            "http://127.0.0.1:43815/ at 12:30, 12345678901"
        );
        assert_eq!(mask_digit_runs("1 2 3"), "1 2 3");
    }

    #[test]
    fn the_spki_hash_is_the_hash_of_the_certificates_public_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(
            rcgen::PublicKeyData::subject_public_key_info(&key),
        ));
        assert_eq!(spki_sha256_base64(cert.der()).as_deref(), Some(&*expected));
        assert_eq!(spki_sha256_base64(b"\x30\x03\x02\x01\x01"), None);
        assert_eq!(spki_sha256_base64(b""), None);
    }
}
