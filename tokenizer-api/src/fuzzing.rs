//! In-process driver of the real service, for the `request_bodies` fuzz
//! target in `fuzz/` (not used by the binary).
//!
//! [`Harness::start`] builds the same [`Application`] as `tokenizer serve
//! --dev` (software KEK, SQLite) on a throwaway directory and loopback port
//! 0, creates one principal holding every role on every tenant, and runs it
//! on a thread of its own: every request goes through the real middleware,
//! handlers, body reading, deserialisation and error mapping, with no copy
//! of the request types. [`Harness::call`] sends one request over a kept-alive
//! loopback connection and returns the status and body.
//!
//! The directory is `$CARDVAULT_FUZZ_DIR/cardvault-fuzz-<random>` (default:
//! `/dev/shm` when writable, else the system temp dir) and is removed when
//! the harness is dropped; a fuzzer that exits without dropping it leaves
//! it behind (`scripts/fuzz-smoke` removes its own).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Duration;

use actix_web::http::Uri;
use clap::Parser;
use vault::TenantScope;

use crate::app::Application;
use crate::config::{ServeOptions, Settings};

/// What the service answered.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// `error.code` of an error body, if the body is one.
    pub fn error_code(&self) -> Option<String> {
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        json["error"]["code"].as_str().map(str::to_owned)
    }
}

/// A dev-mode service in-process (see the module documentation).
#[derive(Debug)]
pub struct Harness {
    addr: SocketAddr,
    authorization: String,
    dir: PathBuf,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

/// Why the harness could not start.
#[derive(Debug, thiserror::Error)]
#[error("fuzz harness: {0}")]
pub struct HarnessError(String);

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    common: ServeOptions,
}

fn data_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARDVAULT_FUZZ_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && std::fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly()) {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

impl Harness {
    /// Build and start the service; returns once it listens.
    pub fn start() -> Result<Harness, HarnessError> {
        let err = |e: &dyn std::fmt::Display| HarnessError(e.to_string());
        let mut raw = [0u8; 8];
        getrandom::getrandom(&mut raw).map_err(|e| err(&e))?;
        let dir = data_root().join(format!("cardvault-fuzz-{:016x}", u64::from_le_bytes(raw)));
        let flags = Flags::try_parse_from([
            std::ffi::OsString::from("fuzz"),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.clone().into_os_string(),
            // Half the inputs carry no key: without this the source
            // (127.0.0.1) would be blocked after a few hundred and the
            // fuzzer would see only 429 for them instead of authentication.
            "--auth-failures-per-source".into(),
            "0".into(),
        ])
        .map_err(|e| err(&e))?;
        // Plain HTTP on loopback: the fuzzer's target is the HTTP layer.
        let settings = Settings::resolve_serve(&flags.common, true, true).map_err(|e| err(&e))?;
        let (ready_tx, ready) = mpsc::channel::<Result<(SocketAddr, String), String>>();
        thread::Builder::new()
            .name("fuzz-service".into())
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let app = match Application::build(&settings).await {
                        Ok(app) => app,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let created =
                        match vault::access::parse_roles("tokenize,detokenize,auditor,key_admin") {
                            Ok(roles) => vault::access::create_principal(
                                app.store().as_ref(),
                                "fuzz",
                                &roles,
                                &TenantScope::All,
                                None,
                            )
                            .await
                            .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                    match created {
                        Ok((_, key)) => {
                            let auth = format!("Bearer {}", key.expose());
                            let addr = app.addr().ok_or_else(|| "no listener".to_owned());
                            let _ = ready_tx.send(addr.map(|a| (a, auth)));
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                    let _ = app.run().await;
                });
            })
            .map_err(|e| err(&e))?;
        match ready.recv() {
            Ok(Ok((addr, authorization))) => Ok(Harness {
                addr,
                authorization,
                dir,
                conn: Mutex::new(None),
            }),
            Ok(Err(e)) => Err(HarnessError(e)),
            Err(_) => Err(HarnessError("the service thread ended".into())),
        }
    }

    /// One request. `target` is sent as given when it is a plain
    /// origin-form request target (`/` then RFC 3986 path and query
    /// characters), else every byte outside `A-Za-z0-9-._~/?=&` is
    /// percent-encoded. `authorized`: with the all-roles principal's key
    /// (else without an `Authorization` header). Panics if the service does
    /// not answer (closed connection twice, or 30 s without a response).
    pub fn call(
        &self,
        method: &str,
        target: &[u8],
        content_type: Option<&str>,
        authorized: bool,
        body: &[u8],
    ) -> Reply {
        let target = request_target(target);
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {}\r\n",
            body.len()
        );
        if authorized {
            head.push_str(&format!("Authorization: {}\r\n", self.authorization));
        }
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut last_error = String::new();
        for _ in 0..2 {
            if conn.is_none() {
                match TcpStream::connect(self.addr) {
                    Ok(s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                        let _ = s.set_nodelay(true);
                        *conn = Some(BufReader::new(s));
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        continue;
                    }
                }
            }
            let Some(reader) = conn.as_mut() else {
                continue;
            };
            let sent = reader.get_mut().write_all(&request);
            match sent
                .map_err(|e| e.to_string())
                .and_then(|()| read_response(reader))
            {
                Ok((reply, keep)) => {
                    if !keep {
                        *conn = None;
                    }
                    return reply;
                }
                Err(e) => {
                    last_error = e;
                    *conn = None;
                }
            }
        }
        panic!("the service did not answer {method} {target}: {last_error}");
    }

    /// The throwaway data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads one response; also says whether the connection stays open.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<(Reply, bool), String> {
    let mut status_line = String::new();
    if reader
        .read_line(&mut status_line)
        .map_err(|e| e.to_string())?
        == 0
    {
        return Err("connection closed".into());
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let mut length = 0usize;
    let mut keep = true;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("connection closed in the head".into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(|_| "bad content-length")?;
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                keep = false;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err("chunked responses are not expected".into());
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((Reply { status, body }, keep))
}

fn request_target(raw: &[u8]) -> String {
    // As given only when every byte is one a request target may hold
    // (RFC 3986 path and query characters, `%` included) and it parses:
    // the point is to reach our handlers, not the HTTP parser's refusals.
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~/?=&%:@!$'()*+,;".contains(&b);
    if raw.first() == Some(&b'/') && raw.iter().all(|&b| plain(b)) {
        if let Ok(text) = std::str::from_utf8(raw) {
            if text.parse::<Uri>().is_ok() {
                return text.to_owned();
            }
        }
    }
    let mut out = String::with_capacity(raw.len() * 3 + 1);
    if raw.first() != Some(&b'/') {
        out.push('/');
    }
    for &b in raw {
        if b.is_ascii_alphanumeric() || b"-._~/?=&".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
