//! Harness for the end-to-end tests: it runs the real `tokenizer` binary on a
//! fresh data directory, talks to it over HTTP, and afterwards searches every
//! byte the service wrote (data files, database tables and captured output)
//! for card numbers.
//!
//! Backends: `CARDVAULT_TEST_BACKEND=sqlite` (default) keeps the database in
//! the data directory; `CARDVAULT_TEST_BACKEND=postgres` gives every
//! [`Service`] its own fresh database on the PostgreSQL server named by
//! `CARDVAULT_TEST_PG_URL` (an admin URL, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), passed with
//! `--database-url` to every `serve` and CLI call and dropped afterwards. A
//! PostgreSQL server that cannot be reached fails the tests; it never skips
//! them.
//!
//! Nothing here knows how the service works inside: only the CLI and HTTP
//! contract, plus the table names of the schema for the tests that reach
//! under the service on purpose ([`Service::sql`]).
#![forbid(unsafe_code)]
// Test support: a panic with a clear message is the right way to fail here.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub mod acquirer;
pub mod browser;

/// How long a server may take to log its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a single HTTP request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a CLI command (`kek generate`, `principal create`, ...) may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

const LISTENING: &str = "listening on ";

// ---------------------------------------------------------------------------
// Locating the binary
// ---------------------------------------------------------------------------

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives one level below the workspace root")
        .to_path_buf()
}

/// Where the `tokenizer` binary is expected: `$TOKENIZER_BIN`, else
/// `$CARGO_TARGET_DIR/debug/tokenizer` (a relative target dir is taken from the
/// workspace root), else `<workspace>/target/debug/tokenizer`.
pub fn tokenizer_path() -> PathBuf {
    if let Some(bin) = std::env::var_os("TOKENIZER_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    };
    target.join("debug").join("tokenizer")
}

/// The `tokenizer` binary; panics with instructions when it was not built.
pub fn tokenizer_bin() -> PathBuf {
    let path = tokenizer_path();
    if !path.is_file() {
        panic!(
            "the tokenizer binary was not found at {}.\n\
             Build it first: `cargo build -p tokenizer-api --bin tokenizer` \
             (or point TOKENIZER_BIN at it), then run `cargo test -p cardvault-e2e`.",
            path.display()
        );
    }
    path
}

/// A `Command` for the binary with a predictable environment: no inherited
/// `RUST_LOG` (the `--log-level` flag decides) and no colours in the logs.
/// When the tests run as root it runs as the [`service_user`] (the service
/// refuses to run as root outside `--dev`, as it should in production); see
/// [`tokenizer_command_as_invoker`] for the one test that wants root.
pub fn tokenizer_command() -> Command {
    let mut cmd = tokenizer_command_as_invoker();
    if let Some(user) = service_user() {
        use std::os::unix::process::CommandExt as _;
        // std drops the supplementary groups too when root switches uid.
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// [`tokenizer_command`] without the switch to the [`service_user`]: the
/// process runs as whoever runs the tests (root, here and in CI).
pub fn tokenizer_command_as_invoker() -> Command {
    let mut cmd = Command::new(tokenizer_bin());
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

// ---------------------------------------------------------------------------
// The unprivileged user the binary runs as
// ---------------------------------------------------------------------------

/// The account every `tokenizer` process of the tests runs as when the tests
/// run as root: `nobody`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceUser {
    pub uid: u32,
    pub gid: u32,
}

/// `nobody` from `/etc/passwd` (65534/65534 when it is not listed), or
/// `None` when the tests do not run as root (then every process runs as the
/// test's own user, as before).
pub fn service_user() -> Option<ServiceUser> {
    if !running_as_root() {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    Some(
        passwd
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                match fields.as_slice() {
                    ["nobody", _, uid, gid, ..] => Some(ServiceUser {
                        uid: uid.parse().ok()?,
                        gid: gid.parse().ok()?,
                    }),
                    _ => None,
                }
            })
            .unwrap_or(ServiceUser {
                uid: 65_534,
                gid: 65_534,
            }),
    )
}

/// Hands `path` (and everything under it, symlinks not followed) to the
/// [`service_user`], so a service running as that user can read and write
/// what a test prepared: data directories, configuration and PIN files,
/// SoftHSM2 token directories. Nothing to do when the tests do not run as
/// root.
pub fn give_to_service_user(path: &Path) {
    let Some(user) = service_user() else {
        return;
    };
    chown_tree(path, user).unwrap_or_else(|e| {
        panic!(
            "cannot give {} to uid {} gid {}: {e}",
            path.display(),
            user.uid,
            user.gid
        )
    });
}

/// A configuration file holding `toml`, given to the service user, and the
/// `serve` arguments that name it (keep the directory until the service
/// has stopped).
pub fn config_file(toml: &str) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.toml");
    fs::write(&path, toml).unwrap();
    give_to_service_user(dir.path());
    let args = vec!["--config".to_owned(), path.display().to_string()];
    (dir, args)
}

/// A file that vanishes meanwhile (a running instance renaming its own
/// files) is skipped.
fn chown_tree(path: &Path, user: ServiceUser) -> io::Result<()> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    match std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)) {
        Err(e) if gone(&e) => return Ok(()),
        other => other?,
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Err(e) if !gone(&e) => return Err(e),
        _ => return Ok(()),
    }
    let entries = match fs::read_dir(path) {
        Err(e) if gone(&e) => return Ok(()),
        entries => entries?,
    };
    for entry in entries {
        chown_tree(&entry?.path(), user)?;
    }
    Ok(())
}

/// Where the auditors' `vault-audit` binary is expected: `$VAULT_AUDIT_BIN`,
/// else next to the `tokenizer` binary ([`tokenizer_path`]).
pub fn vault_audit_path() -> PathBuf {
    if let Some(bin) = std::env::var_os("VAULT_AUDIT_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    tokenizer_path().with_file_name("vault-audit")
}

/// Runs `vault-audit <args...>` to completion (with a timeout); panics with
/// instructions when it was not built.
pub fn run_vault_audit(args: &[&str]) -> CliOutput {
    let path = vault_audit_path();
    if !path.is_file() {
        panic!(
            "the vault-audit binary was not found at {}.\n\
             Build it first: `cargo build -p cardvault-audit --bin vault-audit` \
             (`cargo test --workspace` builds it too), or point VAULT_AUDIT_BIN at it.",
            path.display()
        );
    }
    let mut cmd = Command::new(path);
    cmd.args(args).stdin(Stdio::null());
    let output = wait_with_timeout(cmd, CLI_TIMEOUT, args);
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------
// Captured output
// ---------------------------------------------------------------------------

/// Everything the binary printed, across every process started for one data
/// directory (CLI commands and every server run). Kept for the leak scan.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Captured {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_bytes(&self) -> Vec<u8> {
        self.stderr.lock().unwrap().clone()
    }

    fn append_stdout(&self, bytes: &[u8]) {
        self.stdout.lock().unwrap().extend_from_slice(bytes);
    }

    fn append_stderr(&self, bytes: &[u8]) {
        self.stderr.lock().unwrap().extend_from_slice(bytes);
    }
}

/// Keeps draining one pipe of a child into a buffer, line by line, and
/// reports each line (ANSI escapes removed) on a channel.
fn drain<R: Read + Send + 'static>(
    pipe: R,
    sink: Arc<Mutex<Vec<u8>>>,
    lines: Sender<String>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    sink.lock().unwrap().extend_from_slice(&line);
                    let text = strip_ansi(&String::from_utf8_lossy(&line));
                    // The receiver may be gone; keep draining regardless.
                    let _ = lines.send(text);
                }
            }
        }
    })
}

/// Removes ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// The listener named in a listening line (`listening on ADDR (api,
/// https)`); `dev` when none is named.
pub fn listener_name(line: &str) -> String {
    line.rsplit_once('(')
        .and_then(|(_, rest)| rest.split([',', ')']).next())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dev".to_string())
}

/// The address in a line containing `listening on `: the rest of the line,
/// trimmed (falling back to its first word if the rest is not an address).
pub fn parse_listening_line(line: &str) -> Option<String> {
    let idx = line.find(LISTENING)?;
    let rest = line[idx + LISTENING.len()..].trim();
    if rest.parse::<std::net::SocketAddr>().is_ok() {
        return Some(rest.to_string());
    }
    let word = rest
        .split_whitespace()
        .next()?
        .trim_matches(|c: char| c == '"' || c == '\'' || c == ',');
    word.parse::<std::net::SocketAddr>()
        .ok()
        .map(|_| word.to_string())
}

/// The message of a log line: the `message` of a JSON log line
/// (`--log-format json`), else the line itself.
pub fn log_message(line: &str) -> String {
    let trimmed = line.trim_end();
    if trimmed.starts_with('{') {
        if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(trimmed) {
            if let Some(Value::String(message)) = fields.get("message") {
                return message.clone();
            }
        }
    }
    line.to_string()
}

/// The keys every line of `--log-format json` carries. `message` too, but
/// for sqlx's query log (target `sqlx::query`), whose events have no
/// message: they carry `summary` and `db.statement` instead.
pub const JSON_LOG_KEYS: [&str; 3] = ["timestamp", "level", "target"];

/// What [`check_json_log`] found.
#[derive(Debug, Default)]
pub struct JsonLog {
    /// Lines read (each one JSON object).
    pub lines: usize,
    /// Lines per level (`TRACE`, `DEBUG`, ...).
    pub levels: std::collections::BTreeMap<String, usize>,
    /// Access-log lines (`"message": "request"`), each with a `request_id`.
    pub requests: usize,
    /// Lines logged inside a span (`span` and `spans` keys).
    pub in_spans: usize,
}

/// Checks that every line of `text` (a process's stdout or stderr written
/// with `--log-format json`) is one JSON object with [`JSON_LOG_KEYS`] and
/// a `message`
/// (stdout may also hold the CLI's one-line JSON answers, which need no
/// log keys: `log_keys` false), that access-log lines carry a non-empty
/// `request_id`, and that a line inside a span names it; returns what it
/// counted, or the first offending line.
pub fn check_json_log(text: &str, log_keys: bool) -> Result<JsonLog, String> {
    let mut found = JsonLog::default();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
            return Err(format!("not a JSON object: {}", at()));
        };
        found.lines += 1;
        if !log_keys {
            continue;
        }
        let text_key = if fields.get("target").and_then(Value::as_str) == Some("sqlx::query") {
            "summary"
        } else {
            "message"
        };
        for key in JSON_LOG_KEYS.into_iter().chain([text_key]) {
            if !fields.get(key).is_some_and(Value::is_string) {
                return Err(format!("no string `{key}`: {}", at()));
            }
        }
        let level = fields["level"].as_str().unwrap_or_default().to_string();
        *found.levels.entry(level).or_default() += 1;
        if fields.get("message").and_then(Value::as_str) == Some("request") {
            if fields
                .get("request_id")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(format!("an access-log line without request_id: {}", at()));
            }
            found.requests += 1;
        }
        if let Some(span) = fields.get("span") {
            let spans = fields.get("spans").and_then(Value::as_array);
            if !span.get("name").is_some_and(Value::is_string) || spans.is_none_or(Vec::is_empty) {
                return Err(format!("a span without its name or list: {}", at()));
            }
            found.in_spans += 1;
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

/// The result of one CLI run.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    fn describe(&self) -> String {
        format!(
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `tokenizer <args...> --data-dir <dir>` to completion (with a timeout),
/// appending its output to `captured`. No `--database-url`: the binary's
/// default (SQLite in the data dir); see [`run_cli_on`].
pub fn run_cli(data_dir: &Path, args: &[&str], captured: &Captured) -> CliOutput {
    run_cli_on(data_dir, None, args, captured)
}

/// [`run_cli`] with `--database-url URL` when `database_url` is given.
pub fn run_cli_on(
    data_dir: &Path,
    database_url: Option<&str>,
    args: &[&str],
    captured: &Captured,
) -> CliOutput {
    run_cli_with_env(data_dir, database_url, args, &[], captured)
}

/// [`run_cli_on`] with environment variables (e.g. `TOKENIZER_LOG_FORMAT`).
pub fn run_cli_with_env(
    data_dir: &Path,
    database_url: Option<&str>,
    args: &[&str],
    env: &[(String, String)],
    captured: &Captured,
) -> CliOutput {
    let mut cmd = tokenizer_command();
    cmd.args(args).arg("--data-dir").arg(data_dir);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(url) = database_url {
        cmd.arg("--database-url").arg(url);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = wait_with_timeout(cmd, CLI_TIMEOUT, args);
    captured.append_stdout(&output.stdout);
    captured.append_stderr(&output.stderr);
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a command to completion with piped output (read by threads of
/// their own, so a chatty command cannot block on a full pipe), killing it
/// after `timeout`.
pub fn wait_with_timeout(mut cmd: Command, timeout: Duration, what: &[&str]) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what:?}: {e}"));
    let out = read_all_in_thread(child.stdout.take());
    let err = read_all_in_thread(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{what:?} did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn read_all_in_thread<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

// ---------------------------------------------------------------------------
// Backends and databases
// ---------------------------------------------------------------------------

/// Selects the backend of the end-to-end run: `sqlite` (default) or `postgres`.
pub const BACKEND_ENV: &str = "CARDVAULT_TEST_BACKEND";
/// Admin URL of the PostgreSQL server the tests create their databases on.
pub const PG_URL_ENV: &str = "CARDVAULT_TEST_PG_URL";
/// [`PG_URL_ENV`] when unset: the local server, trust authentication.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long connecting to PostgreSQL from the harness may take.
pub const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the service keeps its data in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: `<data-dir>/cardvault.db`.
    Sqlite,
    /// A database of its own on the server of [`pg_admin_url`].
    Postgres,
}

impl Backend {
    /// From [`BACKEND_ENV`]; panics on a value it does not know (a typo must
    /// not silently test the other backend).
    pub fn from_env() -> Backend {
        match std::env::var(BACKEND_ENV) {
            Err(std::env::VarError::NotPresent) => Backend::Sqlite,
            Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("sqlite") => Backend::Sqlite,
            Ok(v) if v.eq_ignore_ascii_case("postgres") || v.eq_ignore_ascii_case("postgresql") => {
                Backend::Postgres
            }
            Ok(v) => panic!("{BACKEND_ENV}={v:?}: expected `sqlite` or `postgres`"),
            Err(e) => panic!("{BACKEND_ENV}: {e}"),
        }
    }

    /// The backend a database URL names (`postgres://` or `postgresql://`,
    /// anything else is SQLite).
    pub fn of_url(url: &str) -> Backend {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// The backend of this run ([`BACKEND_ENV`]).
pub fn backend() -> Backend {
    Backend::from_env()
}

/// The admin URL of the test PostgreSQL server ([`PG_URL_ENV`]).
pub fn pg_admin_url() -> String {
    std::env::var(PG_URL_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_string())
}

/// `url` with its password (if any) replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &authority[..colon],
                &rest[at..]
            ),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// `url` naming database `database` instead of its own (query kept).
pub fn with_database(url: &str, database: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url[scheme_end..].find('?') {
        Some(q) => url.split_at(scheme_end + q),
        None => (url, ""),
    };
    let authority = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    format!("{authority}/{database}{query}")
}

/// Runs a future to completion on a small current-thread runtime: the
/// harness is synchronous, sqlx is not.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime for the harness")
        .block_on(future)
}

/// Connects to PostgreSQL (bounded), or explains what is missing.
async fn pg_connect(url: &str) -> Result<sqlx::PgConnection, String> {
    use sqlx::ConnectOptions as _;
    let opts = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url)
        .map_err(|e| format!("invalid PostgreSQL URL {}: {e}", redact_url(url)))?;
    match tokio::time::timeout(PG_CONNECT_TIMEOUT, opts.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", redact_url(url))),
        Err(_) => Err(format!(
            "connecting to {} took more than {PG_CONNECT_TIMEOUT:?}",
            redact_url(url)
        )),
    }
}

fn pg_unavailable(why: &str) -> ! {
    panic!(
        "PostgreSQL is required here but not usable: {why}.\n\
         These tests need a PostgreSQL server (the multi-instance and outage tests \
         always, every test with {BACKEND_ENV}=postgres). Start it (locally: \
         127.0.0.1:5432, trust authentication for user `postgres`) or point \
         {PG_URL_ENV} at an admin URL (default {DEFAULT_PG_URL}). \
         The tests never skip when it is missing."
    )
}

/// Runs SQL (any number of statements) on a PostgreSQL database.
pub fn pg_execute(url: &str, sql: &str) {
    block_on(async {
        use sqlx::Connection as _;
        let mut conn = pg_connect(url).await.unwrap_or_else(|e| pg_unavailable(&e));
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("SQL on {} failed: {e}\n{sql}", redact_url(url)));
        let _ = conn.close().await;
    });
}

/// Runs SQL (any number of statements) on a SQLite database file (opened
/// read-write, never created).
pub fn sqlite_execute(path: &Path, sql: &str) {
    block_on(async {
        use sqlx::{ConnectOptions as _, Connection as _};
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("SQL on {} failed: {e}\n{sql}", path.display()));
        let _ = conn.close().await;
    });
}

/// A database of its own on the test PostgreSQL server: created by
/// [`PgDatabase::create`], dropped (`WITH (FORCE)`) on drop.
#[derive(Debug)]
pub struct PgDatabase {
    name: String,
    url: String,
    admin_url: String,
}

impl PgDatabase {
    /// A fresh `cv_e2e_<random>` on the server of [`pg_admin_url`]; panics
    /// with instructions when PostgreSQL cannot be reached.
    pub fn create() -> PgDatabase {
        PgDatabase::create_on(&pg_admin_url())
    }

    /// A fresh `cv_e2e_<random>` on the server of this admin URL.
    pub fn create_on(admin_url: &str) -> PgDatabase {
        let name = format!("cv_e2e_{:016x}", random_u64());
        block_on(async {
            use sqlx::Connection as _;
            let mut conn = pg_connect(admin_url)
                .await
                .unwrap_or_else(|e| pg_unavailable(&e));
            sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| {
                    pg_unavailable(&format!(
                        "CREATE DATABASE {name} on {} failed: {e}",
                        redact_url(admin_url)
                    ))
                });
            let _ = conn.close().await;
        });
        PgDatabase {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_string(),
        }
    }

    /// The URL for `--database-url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A copy of the database at `url` (`CREATE DATABASE .. TEMPLATE ..`,
    /// on the server of [`pg_admin_url`]): nobody may be connected to it.
    pub fn copy_of(url: &str) -> PgDatabase {
        let admin_url = pg_admin_url();
        let path = url.split('?').next().unwrap_or(url);
        let template = path.rsplit('/').next().unwrap_or_default();
        assert!(
            !template.is_empty()
                && template
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "cannot tell the database name of {}",
            redact_url(url)
        );
        let name = format!("cv_e2e_{:016x}", random_u64());
        pg_execute(
            &admin_url,
            &format!("CREATE DATABASE {name} TEMPLATE {template}"),
        );
        PgDatabase {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let result = block_on(async {
            use sqlx::Connection as _;
            let mut conn = pg_connect(&self.admin_url).await?;
            let done = sqlx::raw_sql(&sql)
                .execute(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = conn.close().await;
            done
        });
        if let Err(e) = result {
            // Never panic in drop (it may run during a panic): say it.
            eprintln!("e2e: could not drop test database {}: {e}", self.name);
        }
    }
}

/// The rows of every table in the public schema as text (`t::text`), one
/// buffer per table, for the leak scan.
pub fn pg_dump_tables(url: &str) -> Vec<(String, Vec<u8>)> {
    block_on(async {
        use sqlx::Connection as _;
        let mut conn = pg_connect(url).await.unwrap_or_else(|e| pg_unavailable(&e));
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("listing tables: {e}"));
        let mut dumps = Vec::new();
        for table in tables {
            let quoted = table.replace('"', "\"\"");
            let rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT t::text FROM public.\"{quoted}\" t"))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("dumping table {table}: {e}"));
            let mut text = Vec::new();
            for row in rows {
                text.extend_from_slice(row.as_bytes());
                text.push(b'\n');
            }
            dumps.push((table, text));
        }
        let _ = conn.close().await;
        dumps
    })
}

// ---------------------------------------------------------------------------
// A throwaway PostgreSQL cluster
// ---------------------------------------------------------------------------

/// Directory of `initdb` and `pg_ctl`: `$CARDVAULT_TEST_PG_BIN`, else the
/// newest `/usr/lib/postgresql/<version>/bin` that has them.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARDVAULT_TEST_PG_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server binaries (initdb, pg_ctl) under {}/*/bin; \
             install the PostgreSQL server or set CARDVAULT_TEST_PG_BIN",
            root.display()
        ),
    }
}

/// As root: `chown -R postgres:` `paths` (the server runs as the `postgres`
/// OS user there); otherwise nothing (the server runs as this user).
fn give_to_postgres(paths: &[&Path]) {
    if !running_as_root() {
        return;
    }
    let out = Command::new("chown")
        .arg("-R")
        .arg("postgres:")
        .args(paths)
        .output()
        .expect("cannot run chown");
    assert!(
        out.status.success(),
        "chown -R postgres: {paths:?} failed (is there a `postgres` OS user?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// What a server (PostgreSQL, the tokenizer) says when a port it was told
/// to listen on is taken: the harness then tries again.
const PORT_TAKEN: &str = "Address already in use";

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

/// A PostgreSQL cluster of its own (initdb in a temporary directory, trust
/// authentication, superuser `postgres`, 127.0.0.1 on a free port), for tests
/// that stop and start the database under the service. Stopped (immediate)
/// and removed on drop, also when the test panics.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    port: u16,
    /// Declared last: removed after the server is stopped.
    dir: tempfile::TempDir,
}

/// A `pg_ctl start` that failed: whether the server found its port taken,
/// and the message to panic with.
struct StartError {
    port_taken: bool,
    message: String,
}

impl PgCluster {
    /// initdb and start. initdb refuses to run as root: as root the commands
    /// run as the `postgres` OS user (`runuser`), in a directory it owns.
    pub fn start() -> PgCluster {
        let mut cluster = PgCluster::init();
        cluster.start_on_a_free_port();
        cluster
    }

    /// initdb only (not started; its port is chosen when it first starts),
    /// so settings can go into `postgresql.conf` before the first start.
    fn init() -> PgCluster {
        let bin = pg_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("cardvault-e2e-pg-")
            .tempdir()
            .expect("cannot create a temporary directory for PostgreSQL");
        fs::create_dir(dir.path().join("sock")).unwrap();
        give_to_postgres(&[dir.path()]);
        let cluster = PgCluster { bin, port: 0, dir };
        let data = cluster.data_dir();
        let data = data.to_str().unwrap();
        cluster.pg_command(
            "initdb",
            &[
                "-D",
                data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster
    }

    /// The first start: on a free port, and on another one if something
    /// took that port between [`free_port`] and the server's bind (tests
    /// run in parallel, and every client connection takes an ephemeral
    /// port from the same range).
    fn start_on_a_free_port(&mut self) {
        let mut tries = 0;
        loop {
            self.port = free_port();
            match self.try_start() {
                Ok(()) => return,
                Err(e) if e.port_taken && tries < 5 => tries += 1,
                Err(e) => panic!("{}", e.message),
            }
        }
    }

    fn pg_command(&self, tool: &str, args: &[&str]) -> String {
        self.try_pg_command(tool, args)
            .unwrap_or_else(|message| panic!("{message}"))
    }

    /// Runs a PostgreSQL tool as the cluster's OS user; a failure is the
    /// message to panic with (the tool's output and the server log).
    fn try_pg_command(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let program = self.bin.join(tool);
        let mut cmd = if running_as_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        // The cluster directory is not readable by others: run from it.
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        let what: Vec<&str> = std::iter::once(tool).chain(args.iter().copied()).collect();
        let out = wait_with_timeout(cmd, Duration::from_secs(120), &what);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "{what:?} failed ({}):\n{text}\n--- server log ---\n{}",
                out.status,
                self.log()
            ))
        }
    }

    /// The cluster's data directory (PGDATA).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start` (waits until it accepts connections), same port. If
    /// another test took the port while the server was down, tries again
    /// for 10 s (the port is in the URLs the test handed out).
    pub fn start_again(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(e) if e.port_taken && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(250))
                }
                Err(e) => panic!("{}", e.message),
            }
        }
    }

    /// `pg_ctl start -w` on `self.port`; a failure says whether the port
    /// was taken (from the part of the server log this start wrote).
    fn try_start(&self) -> Result<(), StartError> {
        let log_before = fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize);
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().join("sock").display()
        );
        self.try_pg_command(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-l",
                self.log_path().to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        )
        .map(drop)
        .map_err(|message| {
            let log = self.log();
            StartError {
                port_taken: log
                    .get(log_before..)
                    .is_some_and(|new| new.contains(PORT_TAKEN)),
                message,
            }
        })
    }

    /// `pg_ctl stop -m immediate`: every server process quits at once, no
    /// checkpoint, crash recovery at the next start (a database crash, as
    /// far as its clients can tell).
    pub fn stop_immediate(&self) {
        self.stop("immediate");
    }

    /// `pg_ctl stop -m fast`: a clean shutdown with a checkpoint.
    pub fn stop_fast(&self) {
        self.stop("fast");
    }

    fn stop(&self, mode: &str) {
        self.pg_command(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "stop",
            ],
        );
    }

    fn is_up(&self) -> bool {
        self.data_dir().join("postmaster.pid").exists()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.is_up() {
            return;
        }
        // No panics in drop: try, and say so if it did not work.
        let program = self.bin.join("pg_ctl");
        let mut cmd = if running_as_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        let result = cmd
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(&result, Ok(s) if s.success()) {
            eprintln!(
                "e2e: could not stop the throwaway PostgreSQL cluster in {} ({result:?})",
                self.dir.path().display()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A primary and a synchronous standby
// ---------------------------------------------------------------------------

/// `cluster_name` of the standby of a [`PgReplicaPair`]: the name it
/// streams under (`application_name` in `pg_stat_replication`) and the one
/// the primary's `synchronous_standby_names` waits for.
pub const STANDBY_NAME: &str = "cardvault_standby";

impl PgCluster {
    /// Appends settings to the cluster's `postgresql.conf` (a later line
    /// wins over an earlier one); they apply at the next start.
    pub fn append_conf(&self, lines: &str) {
        let path = self.data_dir().join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        writeln!(file, "\n# cardvault e2e\n{lines}")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// `pg_ctl promote` (waits until the standby accepts writes).
    pub fn promote(&self) {
        self.pg_command(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "promote",
            ],
        );
    }

    /// The first column of the first row of `query` on the cluster's
    /// `postgres` database, as text (`NULL` and no row: `None`).
    pub fn sql_text(&self, query: &str) -> Option<String> {
        let url = self.url();
        block_on(async {
            use sqlx::Connection as _;
            let mut conn = pg_connect(&url)
                .await
                .unwrap_or_else(|e| pg_unavailable(&e));
            let value: Option<Option<String>> = sqlx::query_scalar(query)
                .fetch_optional(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{query} on {} failed: {e}", redact_url(&url)));
            let _ = conn.close().await;
            value.flatten()
        })
    }

    /// `query` (one `BIGINT` column, one row) on the cluster's `postgres`
    /// database.
    pub fn sql_i64(&self, query: &str) -> i64 {
        let url = self.url();
        block_on(async {
            use sqlx::Connection as _;
            let mut conn = pg_connect(&url)
                .await
                .unwrap_or_else(|e| pg_unavailable(&e));
            let value: i64 = sqlx::query_scalar(query)
                .fetch_one(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{query} on {} failed: {e}", redact_url(&url)));
            let _ = conn.close().await;
            value
        })
    }
}

/// Two throwaway clusters in streaming replication: a primary (initdb,
/// `wal_level = replica`, `synchronous_commit = on`,
/// `synchronous_standby_names` naming the standby) and a standby made from
/// it by `pg_basebackup -R` on another port, streaming synchronously when
/// [`PgReplicaPair::start`] returns. The standby's own
/// `synchronous_standby_names` is empty: once promoted it is a primary
/// alone, committing without waiting for a standby it does not have.
/// Trust authentication (initdb's `pg_hba.conf` lets local replication
/// connections in). TLS on both (`ssl = on`, a self-signed certificate for
/// 127.0.0.1 in the data directory, which the base backup copies), and
/// [`PgReplicaPair::url`] asks for it (`sslmode=require`), as production
/// does. Both are stopped and removed on drop.
#[derive(Debug)]
pub struct PgReplicaPair {
    pub primary: PgCluster,
    pub standby: PgCluster,
}

impl PgReplicaPair {
    /// Primary, base backup, standby; waits (at most `bound`) until the
    /// primary reports the standby `streaming` and `sync`.
    pub fn start(bound: Duration) -> PgReplicaPair {
        // Configured before its first start: a stop and start would leave
        // its port free for another test to take in between.
        let mut primary = PgCluster::init();
        primary.install_server_certificate();
        primary.append_conf(&format!(
            "ssl = on\n\
             wal_level = replica\n\
             max_wal_senders = 4\n\
             synchronous_commit = on\n\
             synchronous_standby_names = '{STANDBY_NAME}'\n\
             wal_sender_timeout = 5s"
        ));
        primary.start_on_a_free_port();
        let mut standby = PgCluster::base_backup_of(&primary);
        standby.append_conf(&format!(
            "cluster_name = '{STANDBY_NAME}'\n\
             synchronous_standby_names = ''\n\
             wal_receiver_status_interval = 1s"
        ));
        standby.start_on_a_free_port();
        let pair = PgReplicaPair { primary, standby };
        pair.wait_until_synchronous(bound);
        pair
    }

    /// A libpq-style URL naming both, primary first (superuser, `postgres`
    /// database, TLS required).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?sslmode=require",
            self.primary.port(),
            self.standby.port()
        )
    }

    /// Polls `pg_stat_replication` on the primary until the standby is
    /// `streaming` with `sync_state = 'sync'`; panics after `bound`.
    pub fn wait_until_synchronous(&self, bound: Duration) {
        let query = format!(
            "SELECT state || '/' || sync_state FROM pg_stat_replication \
             WHERE application_name = '{STANDBY_NAME}'"
        );
        let start = Instant::now();
        loop {
            let state = self.primary.sql_text(&query);
            if state.as_deref() == Some("streaming/sync") {
                return;
            }
            assert!(
                start.elapsed() < bound,
                "the standby is not a synchronous streaming standby after {bound:?} \
                 (pg_stat_replication: {state:?})\n--- primary log ---\n{}\n--- standby log ---\n{}",
                self.primary.log(),
                self.standby.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl PgCluster {
    /// `server.crt` and `server.key` (self-signed, 127.0.0.1 and
    /// localhost) in the data directory, the key private to the server's
    /// user: what `ssl = on` reads.
    fn install_server_certificate(&self) {
        use std::os::unix::fs::PermissionsExt as _;
        let key = rcgen::KeyPair::generate().expect("a TLS key for PostgreSQL");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .and_then(|p| p.self_signed(&key))
            .expect("a self-signed certificate for PostgreSQL");
        let data = self.data_dir();
        let (crt, pem) = (data.join("server.crt"), data.join("server.key"));
        fs::write(&crt, cert.pem()).unwrap();
        fs::write(&pem, key.serialize_pem()).unwrap();
        fs::set_permissions(&pem, fs::Permissions::from_mode(0o600)).unwrap();
        give_to_postgres(&[&crt, &pem]);
    }

    /// A standby of `primary`: `pg_basebackup -R -X stream` into a new
    /// directory (not started; its port is chosen when it starts).
    fn base_backup_of(primary: &PgCluster) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("cardvault-e2e-pg-standby-")
            .tempdir()
            .expect("cannot create a temporary directory for PostgreSQL");
        fs::create_dir(dir.path().join("sock")).unwrap();
        give_to_postgres(&[dir.path()]);
        let standby = PgCluster {
            bin: primary.bin.clone(),
            port: 0,
            dir,
        };
        let data = standby.data_dir();
        let port = primary.port().to_string();
        standby.pg_command(
            "pg_basebackup",
            &[
                "-D",
                data.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        standby
    }
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--dev`: the server makes its own KEK and dev principal.
    pub dev: bool,
    /// Run `kek generate` before the first start (ignored with `dev`).
    pub generate_kek: bool,
    pub log_level: String,
    /// `--log-format` of `serve` (and `TOKENIZER_LOG_FORMAT` of the CLI
    /// calls of a [`Service`]); `None`: the binary's default (text).
    pub log_format: Option<String>,
    pub listen: String,
    /// Extra arguments for `serve`.
    pub extra_args: Vec<String>,
    /// `--database-url` for `serve` and every CLI call. `None`: chosen by
    /// the backend of the run (a fresh PostgreSQL database per service with
    /// `postgres`, the binary's SQLite default otherwise).
    pub database_url: Option<String>,
    /// Environment variables of the `serve` process (e.g. `SOFTHSM2_CONF`).
    pub env: Vec<(String, String)>,
    /// Run `serve` as whoever runs the tests (root, here and in CI) instead
    /// of the [`service_user`]: for the tests of the refusal to run as root.
    pub as_invoker: bool,
    /// `--dev` only: plain HTTP (`--insecure-plain-http`) instead of TLS.
    pub plain_http: bool,
    /// Outside `--dev`: also pass the harness PKI's CA as the client CA
    /// (then the listeners default to mutual TLS; tests add `--api-auth`
    /// etc. in `extra_args`). Without it every listener takes API keys.
    pub client_ca: bool,
    /// `--collect-public-url` (the hosted-collection edge's public base
    /// URL, for `frame_url`s); `None`: not configured.
    pub collect_public_url: Option<String>,
}

/// The edge address the harness's services name by default.
pub const HARNESS_EDGE_URL: &str = "https://pay.cardvault.test";

impl Default for Options {
    fn default() -> Self {
        Options {
            dev: false,
            generate_kek: true,
            log_level: "trace".to_string(),
            log_format: None,
            listen: "127.0.0.1:0".to_string(),
            extra_args: Vec::new(),
            database_url: None,
            env: Vec::new(),
            as_invoker: false,
            plain_http: false,
            client_ca: false,
            collect_public_url: Some(HARNESS_EDGE_URL.to_string()),
        }
    }
}

impl Options {
    pub fn dev() -> Self {
        Options {
            dev: true,
            generate_kek: false,
            ..Options::default()
        }
    }

    /// The environment of the CLI calls made for a service with these
    /// options: its log format, so that they log like the service.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        self.log_format
            .iter()
            .map(|f| ("TOKENIZER_LOG_FORMAT".to_string(), f.clone()))
            .collect()
    }

    /// `serve`'s arguments. `previous`: the addresses of the last run of the
    /// same service (a restart comes back on the same ports).
    fn serve_args(&self, data_dir: &Path, previous: &[(String, String)]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["serve".into(), "--data-dir".into(), data_dir.into()];
        let again = |name: &str, default: &str| {
            previous
                .iter()
                .find(|(n, _)| n == name)
                .map_or_else(|| default.to_string(), |(_, a)| a.clone())
        };
        if self.dev {
            args.push("--listen".into());
            args.push(again("dev", &self.listen).into());
        } else {
            // `listen` names the api listener; the others take free ports.
            for (flag, name, default) in [
                ("--listen-api", "api", self.listen.as_str()),
                ("--listen-reveal", "reveal", "127.0.0.1:0"),
                ("--listen-admin", "admin", "127.0.0.1:0"),
            ] {
                args.push(flag.into());
                args.push(again(name, default).into());
            }
            let pki = harness_pki_dir(data_dir);
            args.push("--tls-cert-file".into());
            args.push(pki.join("server.pem").into());
            args.push("--tls-key-file".into());
            args.push(pki.join("server.key").into());
            if self.client_ca {
                args.push("--tls-client-ca-file".into());
                args.push(pki.join("ca.pem").into());
            }
        }
        args.push("--log-level".into());
        args.push(self.log_level.clone().into());
        if let Some(format) = &self.log_format {
            args.push("--log-format".into());
            args.push(format.into());
        }
        if self.dev {
            args.push("--dev".into());
            if self.plain_http {
                args.push("--insecure-plain-http".into());
            } else {
                // The trial edge `serve --dev` starts beside the vault.
                args.push("--dev-edge-listen".into());
                args.push(again("collect", "127.0.0.1:0").into());
            }
        }
        if let Some(url) = &self.database_url {
            args.push("--database-url".into());
            args.push(url.into());
        }
        if let Some(url) = &self.collect_public_url {
            args.push("--collect-public-url".into());
            args.push(url.into());
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }
}

/// A server process that is running (and whose pipes are being drained).
struct Running {
    child: Child,
    readers: Vec<JoinHandle<()>>,
}

/// What happened to a `serve` process.
#[derive(Debug)]
pub enum Launch {
    /// It logged its listening lines: (listener, address) each.
    Started { listeners: Vec<(String, String)> },
    /// It exited before listening.
    Exited { status: ExitStatus, stderr: String },
}

fn launch(
    data_dir: &Path,
    opts: &Options,
    captured: &Captured,
    previous: &[(String, String)],
) -> (Launch, Option<Running>) {
    let mut cmd = if opts.as_invoker {
        tokenizer_command_as_invoker()
    } else {
        tokenizer_command()
    };
    cmd.args(opts.serve_args(data_dir, previous))
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", tokenizer_bin().display()));
    let stderr_before = captured.stderr_bytes().len();
    let (tx, rx) = mpsc::channel();
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let stderr: ChildStderr = child.stderr.take().unwrap();
    let readers = vec![
        drain(stdout, captured.stdout.clone(), mpsc::channel().0),
        drain(stderr, captured.stderr.clone(), tx),
    ];
    // `--dev`: the one listener, and the trial edge's unless plain HTTP.
    let expected = match (opts.dev, opts.plain_http) {
        (true, true) => 1,
        (true, false) => 2,
        (false, _) => 3,
    };
    match wait_for_listening(&mut child, &rx, expected) {
        Ok(listeners) => (
            Launch::Started { listeners },
            Some(Running { child, readers }),
        ),
        Err(Some(status)) => {
            join_readers(readers);
            let stderr = captured.stderr_bytes();
            let stderr = String::from_utf8_lossy(&stderr[stderr_before.min(stderr.len())..]);
            (
                Launch::Exited {
                    status,
                    stderr: stderr.into_owned(),
                },
                None,
            )
        }
        Err(None) => {
            let _ = child.kill();
            let _ = child.wait();
            join_readers(readers);
            panic!(
                "tokenizer serve did not log `{LISTENING}ADDR` within {START_TIMEOUT:?}.\n\
                 --- stderr ---\n{}\n--- stdout ---\n{}",
                captured.stderr(),
                captured.stdout()
            );
        }
    }
}

/// `Ok(listeners)` once `expected` listeners logged their line,
/// `Err(Some(status))` if the process exited, `Err(None)` on timeout.
fn wait_for_listening(
    child: &mut Child,
    lines: &Receiver<String>,
    expected: usize,
) -> Result<Vec<(String, String)>, Option<ExitStatus>> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut listeners = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                let line = log_message(&line);
                if let Some(addr) = parse_listening_line(&line) {
                    listeners.push((listener_name(&line), addr));
                    if listeners.len() >= expected {
                        return Ok(listeners);
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait().unwrap() {
            // Drain what is left: the listening line may still be queued.
            while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
                if parse_listening_line(&log_message(&line)).is_some() {
                    break;
                }
            }
            return Err(Some(status));
        }
        if Instant::now() > deadline {
            return Err(None);
        }
    }
}

fn join_readers(readers: Vec<JoinHandle<()>>) {
    // The pipes close when the process is gone; give the threads a moment to
    // copy the last bytes, but never hang the test on them.
    let deadline = Instant::now() + Duration::from_secs(5);
    for reader in readers {
        while !reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
    }
}

/// Where the data lives: a temporary directory owned by the service, removed
/// at the end, or one owned by the caller.
#[derive(Debug)]
enum DataDir {
    Temp(tempfile::TempDir),
    Path(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Temp(dir) => dir.path(),
            DataDir::Path(path) => path,
        }
    }
}

/// A tempdir for a data directory (call sites that need to prepare one).
/// Private (0700), as an operator would set it up, and owned by the
/// [`service_user`] when the tests run as root.
pub fn temp_data_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("cardvault-e2e-")
        .tempdir()
        .expect("cannot create a temporary data directory");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
        .expect("cannot chmod the temporary data directory");
    give_to_service_user(dir.path());
    dir
}

/// A running `tokenizer serve` on its own data directory (and, on the
/// postgres backend, its own database).
pub struct Service {
    data_dir: DataDir,
    opts: Options,
    captured: Captured,
    running: Option<Running>,
    endpoints: Endpoints,
    /// Declared last: dropped after the process is gone.
    db: Option<PgDatabase>,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("data_dir", &self.data_dir.path())
            .field("endpoints", &self.endpoints)
            .field("running", &self.running.is_some())
            .field(
                "database",
                &self.opts.database_url.as_deref().map(redact_url),
            )
            .field("owned_database", &self.db.as_ref().map(PgDatabase::name))
            .finish()
    }
}

impl Service {
    /// A fresh data directory, a KEK, and a server at trace log level.
    pub fn start() -> Service {
        Service::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Service {
        Service::start_in(DataDir::Temp(temp_data_dir()), opts)
    }

    /// Starts on a directory the caller owns (it is not removed). The
    /// directory and everything in it are given to the [`service_user`].
    pub fn start_in_dir(dir: &Path, opts: Options) -> Service {
        give_to_service_user(dir);
        Service::start_in(DataDir::Path(dir.to_path_buf()), opts)
    }

    fn start_in(data_dir: DataDir, mut opts: Options) -> Service {
        let captured = Captured::default();
        let db = match (&opts.database_url, backend()) {
            (None, Backend::Postgres) => {
                let db = PgDatabase::create();
                opts.database_url = Some(db.url().to_string());
                Some(db)
            }
            _ => None,
        };
        if opts.generate_kek && !opts.dev && !data_dir.path().join("kek.key").exists() {
            let out = run_cli_with_env(
                data_dir.path(),
                opts.database_url.as_deref(),
                &["kek", "generate"],
                &opts.cli_env(),
                &captured,
            );
            assert!(
                out.success(),
                "`tokenizer kek generate` failed\n{}",
                out.describe()
            );
        }
        if !opts.dev {
            ensure_harness_pki(data_dir.path(), &captured);
        }
        let mut service = Service {
            data_dir,
            opts,
            captured,
            running: None,
            endpoints: Endpoints::default(),
            db,
        };
        service.spawn();
        service
    }

    fn spawn(&mut self) {
        // A restart comes back on its ports; another test may have taken one
        // meanwhile (a free_port() probe, a throwaway PostgreSQL cluster):
        // try again for a while, then take fresh ports (clients made before
        // the restart then no longer reach it).
        let mut previous = self.endpoints.listeners.clone();
        let mut attempt = 0;
        let (launch, running) = loop {
            let (launch, running) =
                launch(self.data_dir.path(), &self.opts, &self.captured, &previous);
            match &launch {
                Launch::Exited { stderr, .. }
                    if !previous.is_empty() && stderr.contains(PORT_TAKEN) =>
                {
                    attempt += 1;
                    if attempt == 20 {
                        eprintln!("a port of the restarted service stays taken: fresh ports");
                        previous.clear();
                    } else {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
                _ => break (launch, running),
            }
        };
        match (launch, running) {
            (Launch::Started { listeners }, Some(running)) => {
                let ca = match (self.opts.dev, self.opts.plain_http) {
                    (true, true) => None,
                    (true, false) => Some(self.data_dir.path().join("dev-tls").join("ca.pem")),
                    (false, _) => Some(harness_pki_dir(self.data_dir.path()).join("ca.pem")),
                };
                self.endpoints = Endpoints { listeners, ca };
                register_tls(&self.endpoints);
                self.running = Some(running);
            }
            (Launch::Exited { status, stderr }, _) => panic!(
                "tokenizer serve exited before listening ({status}).\n--- stderr ---\n{stderr}"
            ),
            (Launch::Started { .. }, None) => unreachable!("a started server has a process"),
        }
    }

    /// `host:port` of the `api` listener (of the one listener in `--dev`).
    pub fn addr(&self) -> &str {
        self.endpoints.addr_for("/v1/tokens")
    }

    /// Where the service listens, and the CA of its TLS.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// `host:port` of a listener by name (`api`, `reveal`, `admin`, `dev`).
    pub fn listener(&self, name: &str) -> Option<&str> {
        self.endpoints.listener(name)
    }

    /// The admin interface's URL (what `tokenizer unseal --url` takes).
    pub fn base_url(&self) -> String {
        format!(
            "{}://{}",
            self.endpoints.scheme(),
            self.endpoints.addr_for("/v1/admin")
        )
    }

    /// Environment for operator commands that call the admin interface
    /// (`unseal`, `seal`, `keys ...`): the CA that signed its certificate.
    pub fn admin_env(&self) -> Vec<(String, String)> {
        self.endpoints
            .ca
            .iter()
            .map(|ca| {
                (
                    "TOKENIZER_ADMIN_CA_FILE".to_string(),
                    ca.display().to_string(),
                )
            })
            .collect()
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// How this service is started (with its `--database-url` on postgres):
    /// what a test needs to start another process on the same data.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Where this service keeps its data.
    pub fn backend(&self) -> Backend {
        self.opts
            .database_url
            .as_deref()
            .map_or(Backend::Sqlite, Backend::of_url)
    }

    /// The database URL the service uses (its SQLite default spelled out).
    pub fn database_url(&self) -> String {
        match &self.opts.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.data_dir().join("cardvault.db").display()
            ),
        }
    }

    /// Runs SQL (one or more statements) on the service's database from
    /// outside the process, whichever the backend: for tests that break
    /// the database under a running service on purpose.
    pub fn sql(&self, sql: &str) {
        match self.backend() {
            Backend::Postgres => pg_execute(&self.database_url(), sql),
            Backend::Sqlite => block_on(async {
                use sqlx::Connection as _;
                let mut conn = self.sqlite_connect().await;
                sqlx::raw_sql(sql)
                    .execute(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("SQL on the SQLite database failed: {e}\n{sql}"));
                let _ = conn.close().await;
            }),
        }
    }

    /// The first column of every row a query returns, as text
    /// (`SELECT token FROM cards`).
    pub fn sql_strings(&self, query: &str) -> Vec<String> {
        block_on(async {
            use sqlx::Connection as _;
            match self.backend() {
                Backend::Postgres => {
                    let mut conn = pg_connect(&self.database_url())
                        .await
                        .unwrap_or_else(|e| pg_unavailable(&e));
                    let rows = sqlx::query_scalar::<_, String>(query)
                        .fetch_all(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("{query}: {e}"));
                    let _ = conn.close().await;
                    rows
                }
                Backend::Sqlite => {
                    let mut conn = self.sqlite_connect().await;
                    let rows = sqlx::query_scalar::<_, String>(query)
                        .fetch_all(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("{query}: {e}"));
                    let _ = conn.close().await;
                    rows
                }
            }
        })
    }

    /// The single integer a query returns (`SELECT COUNT(*) FROM cards`).
    pub fn sql_i64(&self, query: &str) -> i64 {
        block_on(async {
            use sqlx::Connection as _;
            match self.backend() {
                Backend::Postgres => {
                    let mut conn = pg_connect(&self.database_url())
                        .await
                        .unwrap_or_else(|e| pg_unavailable(&e));
                    let n = sqlx::query_scalar::<_, i64>(query)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("{query}: {e}"));
                    let _ = conn.close().await;
                    n
                }
                Backend::Sqlite => {
                    let mut conn = self.sqlite_connect().await;
                    let n = sqlx::query_scalar::<_, i64>(query)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("{query}: {e}"));
                    let _ = conn.close().await;
                    n
                }
            }
        })
    }

    async fn sqlite_connect(&self) -> sqlx::SqliteConnection {
        use sqlx::ConnectOptions as _;
        let path = self.data_dir().join("cardvault.db");
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
    }

    pub fn captured(&self) -> &Captured {
        &self.captured
    }

    pub fn stdout(&self) -> String {
        self.captured.stdout()
    }

    pub fn stderr(&self) -> String {
        self.captured.stderr()
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|running| running.child.id())
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.running {
            Some(running) => running.child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGKILL, then wait for the process and the last captured bytes.
    pub fn kill(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
            join_readers(running.readers);
        }
    }

    /// Graceful stop: SIGTERM, then wait for the process to exit by itself
    /// (the service finishes its requests, records its stop and signs a last
    /// audit checkpoint). Killed after `timeout`. Returns its exit status, or
    /// `None` if it had to be killed (or was not running).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut running = self.running.take()?;
        let pid = running.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + timeout;
        let status = loop {
            match running.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if sent.is_ok() && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = running.child.kill();
                    let _ = running.child.wait();
                    break None;
                }
            }
        };
        join_readers(running.readers);
        status
    }

    /// Kill (if running) and start again on the same data directory. The
    /// address usually changes.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a CLI subcommand on this data directory and database (output
    /// captured too).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        run_cli_with_env(
            self.data_dir(),
            self.opts.database_url.as_deref(),
            args,
            &self.opts.cli_env(),
            &self.captured,
        )
    }

    /// Runs a CLI subcommand on this data directory and database with its
    /// stdout a pipe closed before it writes: the first `println!` fails
    /// (EPIPE; Rust ignores SIGPIPE) and the binary panics, so this shows
    /// what its panic hook prints. Stderr is captured (for the leak scan).
    pub fn cli_with_stdout_closed(&self, args: &[&str]) -> CliOutput {
        let mut cmd = tokenizer_command();
        cmd.args(args).arg("--data-dir").arg(self.data_dir());
        if let Some(url) = &self.opts.database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd.envs(self.opts.cli_env());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
        drop(child.stdout.take());
        let err = read_all_in_thread(child.stderr.take());
        let deadline = Instant::now() + CLI_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} did not finish within {CLI_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stderr = err.join().unwrap_or_default();
        self.captured.append_stderr(&stderr);
        CliOutput {
            status,
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// `principal create`; returns the whole JSON line.
    pub fn create_principal_json(&self, name: &str, roles: &[&str], tenants: &[&str]) -> Value {
        let roles = roles.join(",");
        let tenants = tenants.join(",");
        let out = self.cli(&[
            "principal",
            "create",
            "--name",
            name,
            "--roles",
            &roles,
            "--tenants",
            &tenants,
        ]);
        assert!(
            out.success(),
            "`tokenizer principal create --name {name}` failed\n{}",
            out.describe()
        );
        let lines: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "`principal create` must print exactly one line\n{}",
            out.describe()
        );
        serde_json::from_str(lines[0]).unwrap_or_else(|e| {
            panic!(
                "`principal create` printed no JSON ({e})\n{}",
                out.describe()
            )
        })
    }

    /// `principal create`; returns the API key.
    pub fn create_principal(&self, name: &str, roles: &[&str], tenants: &[&str]) -> String {
        let json = self.create_principal_json(name, roles, tenants);
        json["api_key"]
            .as_str()
            .unwrap_or_else(|| panic!("`principal create` printed no api_key: {json}"))
            .to_string()
    }

    /// A client for a new principal.
    pub fn principal_client(&self, name: &str, roles: &[&str], tenants: &[&str]) -> Client {
        let key = self.create_principal(name, roles, tenants);
        self.client(&key)
    }

    /// `principal revoke NAME`.
    pub fn revoke(&self, name: &str) {
        let out = self.cli(&["principal", "revoke", name]);
        assert!(
            out.success(),
            "`tokenizer principal revoke {name}` failed\n{}",
            out.describe()
        );
    }

    /// An authenticated client (`Authorization: Bearer <key>`).
    pub fn client(&self, api_key: &str) -> Client {
        Client::for_endpoints(&self.endpoints, Some(format!("Bearer {api_key}")))
    }

    /// A client that sends no `Authorization` header.
    pub fn anonymous(&self) -> Client {
        Client::for_endpoints(&self.endpoints, None)
    }

    /// A client sending this exact `Authorization` value.
    pub fn client_with_authorization(&self, value: &str) -> Client {
        Client::for_endpoints(&self.endpoints, Some(value.to_string()))
    }

    /// Searches the data directory, everything the binary printed, and on
    /// PostgreSQL the content of every table (as text).
    pub fn scan_for_leaks<S: AsRef<str>>(&self, pans: &[S]) -> Vec<Finding> {
        self.scan(pans).findings
    }

    /// [`Service::scan_for_leaks`] with its tally (bytes and places).
    pub fn scan<S: AsRef<str>>(&self, pans: &[S]) -> Scan {
        let mut scan = Scan::default();
        scan.dir(self.data_dir(), pans);
        if self.backend() == Backend::Postgres {
            for (table, text) in pg_dump_tables(&self.database_url()) {
                scan.bytes(&format!("table {table}"), &text, pans);
            }
        }
        scan.bytes("captured stdout", &self.captured.stdout_bytes(), pans);
        scan.bytes("captured stderr", &self.captured.stderr_bytes(), pans);
        scan
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            // Keep the whole log for the post-mortem; show the tail without
            // the TRACE chatter of the HTTP stack.
            let stderr = self.captured.stderr();
            let saved = save_failure_log(self.data_dir(), &stderr);
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(" TRACE ")).collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} non-TRACE lines of tokenizer stderr ({} backend; full log: {saved}) ---\n{}",
                tail.len(),
                self.backend().name(),
                tail.join("\n")
            );
        }
    }
}

/// Writes a failed test's server log to `<workspace>/target/e2e-logs/`; returns where
/// (or why not).
fn save_failure_log(data_dir: &Path, stderr: &str) -> String {
    let dir = workspace_root().join("target").join("e2e-logs");
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "service".to_string());
    let path = dir.join(format!("{name}.stderr.log"));
    match fs::create_dir_all(&dir).and_then(|()| fs::write(&path, stderr)) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("not saved: {e}"),
    }
}

/// Starts `serve` expecting it to refuse: returns its exit status and
/// stderr. Panics (after killing it) if it starts listening instead. On the
/// postgres backend, options without a database get a fresh one for the
/// attempt (to refuse a restart on a service's data, pass its
/// [`Service::options`]).
pub fn expect_refused_start(data_dir: &Path, opts: &Options) -> (ExitStatus, String) {
    let captured = Captured::default();
    let mut opts = opts.clone();
    let _db = match (&opts.database_url, backend()) {
        (None, Backend::Postgres) => {
            let db = PgDatabase::create();
            opts.database_url = Some(db.url().to_string());
            Some(db)
        }
        _ => None,
    };
    // The refusal must be about what the test set up, not a missing
    // certificate.
    if !opts.dev && data_dir.is_dir() && !harness_pki_dir(data_dir).exists() {
        give_to_service_user(data_dir);
        ensure_harness_pki(data_dir, &captured);
    }
    let (launch, running) = launch(data_dir, &opts, &captured, &[]);
    match launch {
        Launch::Exited { status, stderr } => (status, stderr),
        Launch::Started { listeners } => {
            let addr = format!("{listeners:?}");
            if let Some(mut running) = running {
                let _ = running.child.kill();
                let _ = running.child.wait();
                join_readers(running.readers);
            }
            panic!(
                "tokenizer serve was expected to refuse to start but listens on {addr}.\n\
                 --- stderr ---\n{}",
                captured.stderr()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// One HTTP response, whatever its status.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub request_id: Option<String>,
    pub content_type: Option<String>,
    /// `x-cardvault-source`: `vault` on the service's errors, `upstream`
    /// on an answer a forwarded call relays.
    pub source: Option<String>,
    /// `Location`, when sent.
    pub location: Option<String>,
    /// The raw body.
    pub text: String,
    /// The body as JSON, `Null` when empty or not JSON.
    pub json: Value,
}

impl Resp {
    /// `error.code` of an error body.
    pub fn error_code(&self) -> Option<&str> {
        self.json["error"]["code"].as_str()
    }

    pub fn error_message(&self) -> Option<&str> {
        self.json["error"]["message"].as_str()
    }

    /// A string field of the body (panics with the body when absent).
    pub fn str(&self, field: &str) -> String {
        self.json[field]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "no string `{field}` in response {}: {}",
                    self.status, self.text
                )
            })
            .to_string()
    }

    fn from_parts(
        status: u16,
        request_id: Option<String>,
        content_type: Option<String>,
        text: String,
    ) -> Resp {
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            request_id,
            content_type,
            source: None,
            location: None,
            text,
            json,
        }
    }
}

impl fmt::Display for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HTTP {} (x-request-id: {:?}) {}",
            self.status, self.request_id, self.text
        )
    }
}

/// A minimal HTTP client for one server and one `Authorization` value.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    endpoints: Endpoints,
    /// TLS client configuration (with the client certificate, if any).
    tls: Option<Arc<rustls::ClientConfig>>,
    authorization: Option<String>,
}

impl Client {
    /// A plain-HTTP client of one address (every path goes there).
    pub fn new(addr: &str, authorization: Option<String>) -> Client {
        let endpoints = Endpoints {
            listeners: vec![("dev".to_string(), addr.to_string())],
            ca: None,
        };
        Client::for_endpoints(&endpoints, authorization)
    }

    /// A client of a service's listeners: each path goes to the listener
    /// that serves it, over TLS when the service has a CA.
    pub fn for_endpoints(endpoints: &Endpoints, authorization: Option<String>) -> Client {
        let tls = endpoints
            .ca
            .as_deref()
            .map(|ca| tls_client_config(ca, None));
        Client::build(endpoints.clone(), tls, authorization)
    }

    fn build(
        endpoints: Endpoints,
        tls: Option<Arc<rustls::ClientConfig>>,
        authorization: Option<String>,
    ) -> Client {
        // No pooled connections: a server that closes a connection after an
        // error must not break the next request.
        let mut agent = ureq::AgentBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .max_idle_connections(0)
            .redirects(0);
        if let Some(tls) = &tls {
            agent = agent.tls_config(tls.clone());
        }
        Client {
            agent: agent.build(),
            endpoints,
            tls,
            authorization,
        }
    }

    /// The same client presenting a client certificate (PEM files) at the
    /// TLS handshake.
    pub fn with_client_cert(&self, cert: &Path, key: &Path) -> Client {
        let ca = self
            .endpoints
            .ca
            .clone()
            .expect("client certificates need a TLS service");
        Client::build(
            self.endpoints.clone(),
            Some(tls_client_config(&ca, Some((cert, key)))),
            self.authorization.clone(),
        )
    }

    /// The same client with another `Authorization` value (or none).
    pub fn with_authorization(&self, authorization: Option<String>) -> Client {
        Client::build(self.endpoints.clone(), self.tls.clone(), authorization)
    }

    /// The api listener's address (the one listener's in `--dev`).
    pub fn addr(&self) -> &str {
        self.endpoints.addr_for("/v1/tokens")
    }

    /// The same credentials against `svc` (after a restart the address
    /// may change).
    pub fn reconnect(&self, svc: &Service) -> Client {
        Client::build(
            svc.endpoints().clone(),
            self.tls.clone(),
            self.authorization.clone(),
        )
    }

    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref()
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://{}{}",
            self.endpoints.scheme(),
            self.endpoints.addr_for(path),
            path
        )
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let req = self.agent.request(method, &self.url(path));
        match &self.authorization {
            Some(value) => req.set("Authorization", value),
            None => req,
        }
    }

    /// Any method, no body.
    pub fn send(&self, method: &str, path: &str) -> Resp {
        finish(method, path, self.request(method, path).call())
    }

    /// Any method, raw body, optional `Content-Type` (none sent if `None`).
    pub fn send_raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Resp {
        let mut req = self.request(method, path);
        if let Some(ct) = content_type {
            req = req.set("Content-Type", ct);
        }
        finish(method, path, req.send_bytes(body))
    }

    /// [`Client::send_raw`] with extra request headers.
    pub fn send_raw_with_headers(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        let mut req = self.request(method, path);
        if let Some(ct) = content_type {
            req = req.set("Content-Type", ct);
        }
        for (name, value) in headers {
            req = req.set(name, value);
        }
        finish(method, path, req.send_bytes(body))
    }

    /// [`Client::send_raw`] that reports a transport failure (connection
    /// refused or reset, timeout) instead of panicking.
    pub fn try_send_raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Resp, String> {
        let mut req = self.request(method, path);
        if let Some(ct) = content_type {
            req = req.set("Content-Type", ct);
        }
        try_finish(method, path, req.send_bytes(body))
    }

    /// [`Client::send`] that reports a transport failure instead of panicking.
    pub fn try_send(&self, method: &str, path: &str) -> Result<Resp, String> {
        try_finish(method, path, self.request(method, path).call())
    }

    /// [`Client::tokenize`] that reports a transport failure instead of
    /// panicking.
    pub fn try_tokenize(
        &self,
        tenant: &str,
        pan: &str,
        exp_month: i64,
        exp_year: i64,
    ) -> Result<Resp, String> {
        let body = serde_json::json!({
            "tenant": tenant, "pan": pan, "exp_month": exp_month, "exp_year": exp_year,
        });
        self.try_send_raw(
            "POST",
            "/v1/tokens",
            Some("application/json"),
            body.to_string().as_bytes(),
        )
    }

    /// POST a JSON value with `Content-Type: application/json`.
    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.post_raw(path, body.to_string().as_bytes())
    }

    /// POST raw bytes with `Content-Type: application/json`.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> Resp {
        self.send_raw("POST", path, Some("application/json"), body)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.send("GET", path)
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.send("DELETE", path)
    }

    // --- the API, one helper per route ---

    pub fn tokenize(&self, tenant: &str, pan: &str, exp_month: i64, exp_year: i64) -> Resp {
        self.post_json(
            "/v1/tokens",
            &serde_json::json!({
                "tenant": tenant, "pan": pan, "exp_month": exp_month, "exp_year": exp_year,
            }),
        )
    }

    pub fn tokenize_named(
        &self,
        tenant: &str,
        pan: &str,
        exp_month: i64,
        exp_year: i64,
        name: &str,
    ) -> Resp {
        self.post_json(
            "/v1/tokens",
            &serde_json::json!({
                "tenant": tenant, "pan": pan, "exp_month": exp_month, "exp_year": exp_year,
                "cardholder_name": name,
            }),
        )
    }

    pub fn batch(&self, tenant: &str, cards: &[Value]) -> Resp {
        self.post_json(
            "/v1/tokens/batch",
            &serde_json::json!({ "tenant": tenant, "cards": cards }),
        )
    }

    pub fn detokenize(&self, token: &str, reason: &str) -> Resp {
        self.post_json(
            "/v1/detokenize",
            &serde_json::json!({ "token": token, "reason": reason }),
        )
    }

    pub fn metadata(&self, token: &str) -> Resp {
        self.get(&format!("/v1/tokens/{token}"))
    }

    pub fn delete_token(&self, token: &str) -> Resp {
        self.delete(&format!("/v1/tokens/{token}"))
    }

    /// A request written on a raw socket, for bodies the server may refuse
    /// before reading them (413): the body is written from another thread
    /// while the response is read, and write errors are ignored.
    pub fn raw_exchange(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        raw_exchange(
            self.endpoints.addr_for(path),
            self.tls.clone(),
            method,
            path,
            self.authorization.as_deref(),
            content_type,
            body,
        )
    }
}

fn finish(method: &str, path: &str, result: Result<ureq::Response, ureq::Error>) -> Resp {
    try_finish(method, path, result).unwrap_or_else(|e| panic!("{e}"))
}

fn try_finish(
    method: &str,
    path: &str,
    result: Result<ureq::Response, ureq::Error>,
) -> Result<Resp, String> {
    let resp = match result {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(ureq::Error::Transport(err)) => {
            return Err(format!("{method} {path}: transport error: {err}"))
        }
    };
    let status = resp.status();
    let request_id = resp.header("x-request-id").map(str::to_string);
    let content_type = resp.header("content-type").map(str::to_string);
    let source = resp.header("x-cardvault-source").map(str::to_string);
    let location = resp.header("location").map(str::to_string);
    let text = resp
        .into_string()
        .map_err(|e| format!("{method} {path}: cannot read the body: {e}"))?;
    let mut out = Resp::from_parts(status, request_id, content_type, text);
    out.source = source;
    out.location = location;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn raw_exchange(
    addr: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Resp {
    if let Some(tls) = tls {
        return raw_exchange_tls(addr, tls, method, path, authorization, content_type, body);
    }
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    let head = request_head(addr, method, path, authorization, content_type, body.len());
    let mut writer = stream.try_clone().unwrap();
    let write = thread::spawn(move || {
        let result = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(&body));
        if result.is_ok() {
            let _ = writer.flush();
        }
    });
    let mut reader = stream;
    let raw = read_raw_response(&mut reader, method, path);
    let _ = reader.shutdown(Shutdown::Both);
    let _ = write.join();
    parsed_raw_response(&raw, method, path)
}

/// The head of a raw request (`Connection: close`, a `Content-Length`).
fn request_head(
    addr: &str,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    content_type: Option<&str>,
    len: usize,
) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {len}\r\n"
    );
    if let Some(auth) = authorization {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Read until a whole response arrived or the server closed.
fn read_raw_response(reader: &mut impl Read, method: &str, path: &str) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if response_complete(&raw) {
                    break;
                }
            }
            // A reset after the response was sent is the server refusing
            // the rest of the body; what arrived before it is the answer.
            Err(e) if !raw.is_empty() && e.kind() != io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{method} {path}: reading the response: {e}"),
        }
    }
    raw
}

fn parsed_raw_response(raw: &[u8], method: &str, path: &str) -> Resp {
    parse_raw_response(raw).unwrap_or_else(|| {
        panic!(
            "{method} {path}: cannot parse the raw response: {:?}",
            String::from_utf8_lossy(raw)
        )
    })
}

fn split_head(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let pos = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&raw[..pos], &raw[pos + 4..]))
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn response_complete(raw: &[u8]) -> bool {
    let Some((head, body)) = split_head(raw) else {
        return false;
    };
    let head = String::from_utf8_lossy(head);
    if let Some(len) = header_value(&head, "content-length") {
        return len.parse::<usize>().is_ok_and(|len| body.len() >= len);
    }
    if header_value(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
}

fn parse_raw_response(raw: &[u8]) -> Option<Resp> {
    let (head, body) = split_head(raw)?;
    let head = String::from_utf8_lossy(head).into_owned();
    let status: u16 = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let body = if header_value(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(body)?
    } else if let Some(len) = header_value(&head, "content-length") {
        let len: usize = len.parse().ok()?;
        body.get(..len)?.to_vec()
    } else {
        body.to_vec()
    };
    Some(Resp::from_parts(
        status,
        header_value(&head, "x-request-id").map(str::to_string),
        header_value(&head, "content-type").map(str::to_string),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------
// Card numbers
// ---------------------------------------------------------------------------

/// The Luhn check digit for `payload` (all ASCII digits).
pub fn luhn_check_digit(payload: &str) -> u8 {
    let sum: u32 = payload
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let d = d * 2;
                if d > 9 {
                    d - 9
                } else {
                    d
                }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// Whether `number` (all ASCII digits) passes the Luhn check.
pub fn luhn_valid(number: &str) -> bool {
    match number.len() {
        0 => false,
        n => {
            number.bytes().all(|b| b.is_ascii_digit())
                && luhn_check_digit(&number[..n - 1]) == number.as_bytes()[n - 1] - b'0'
        }
    }
}

/// `payload` followed by its Luhn check digit.
pub fn with_luhn_digit(payload: &str) -> String {
    format!("{payload}{}", luhn_check_digit(payload))
}

/// A random `u64` (std's randomly seeded hasher: no extra dependency).
pub fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.finish()
}

/// `n` random decimal digits.
pub fn random_digits(n: usize) -> String {
    let mut out = String::with_capacity(n);
    while out.len() < n {
        let mut x = random_u64();
        for _ in 0..18 {
            if out.len() == n {
                break;
            }
            out.push(char::from(b'0' + (x % 10) as u8));
            x /= 10;
        }
    }
    out
}

/// A Luhn-valid number of `len` digits on a test BIN (`411111` or `424242`).
pub fn generated_pan(bin: &str, len: usize) -> String {
    assert!(
        bin == "411111" || bin == "424242",
        "only the test BINs 411111 and 424242 may be used"
    );
    assert!(len > bin.len(), "a PAN is longer than its BIN");
    with_luhn_digit(&format!("{bin}{}", random_digits(len - bin.len() - 1)))
}

/// A fresh 16-digit test Visa number (`411111` + 9 random digits + Luhn).
pub fn fresh_pan() -> String {
    generated_pan("411111", 16)
}

/// The current UTC (year, month).
pub fn current_year_month() -> (i64, i64) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    let (y, m, _) = civil_from_days((secs / 86_400) as i64);
    (y, m)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------
// Leak scanner
// ---------------------------------------------------------------------------

/// How a card number was written where it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// ASCII/UTF-8 digits, possibly grouped with single spaces or dashes.
    Ascii,
    /// UTF-16LE digits, possibly grouped with single spaces or dashes.
    Utf16Le,
    /// UTF-16BE digits, possibly grouped with single spaces or dashes.
    Utf16Be,
    /// The number as a 64-bit integer, big-endian (SQLite's integer format).
    U64BigEndian,
    /// The number as a 64-bit integer, little-endian.
    U64LittleEndian,
}

/// The shortest run of a card's consecutive digits that counts as a leak:
/// more than the first six plus the last four, which may be shown.
pub const LEAK_FRAGMENT_DIGITS: usize = 11;

/// One card number (or a fragment of one longer than BIN plus last four)
/// found somewhere it must not be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub pan: String,
    pub location: String,
    pub encoding: Encoding,
    /// Byte offset in the file or buffer (of the digit run, for text).
    pub offset: usize,
    /// How many consecutive digits of the card were found: `pan.len()`
    /// for the whole number, at least [`LEAK_FRAGMENT_DIGITS`] for a
    /// fragment.
    pub digits: usize,
}

impl Finding {
    /// The whole number, not a fragment of it.
    pub fn is_whole(&self) -> bool {
        self.digits == self.pan.len()
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Show only the last four digits: this is printed in test output.
        let last4 = &self.pan[self.pan.len().saturating_sub(4)..];
        write!(
            f,
            "card ending {last4} found as {:?} ({} of its {} digits in a row) in {} at byte {}",
            self.encoding,
            self.digits,
            self.pan.len(),
            self.location,
            self.offset
        )
    }
}

/// A leak scan with its tally: what was found, how many bytes were read,
/// and every place (file, table, buffer) searched.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub findings: Vec<Finding>,
    pub bytes: u64,
    pub places: Vec<String>,
}

impl Scan {
    /// Searches one buffer ([`scan_bytes`]) and counts it.
    pub fn bytes<S: AsRef<str>>(&mut self, location: &str, bytes: &[u8], pans: &[S]) {
        self.findings.extend(scan_bytes(location, bytes, pans));
        self.bytes += bytes.len() as u64;
        self.places.push(location.to_string());
    }

    /// Searches every regular file under `root` (recursively) and counts
    /// each one.
    pub fn dir<S: AsRef<str>>(&mut self, root: &Path, pans: &[S]) {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => panic!("leak scan: cannot list {}: {e}", dir.display()),
            };
            for entry in entries {
                let entry = entry.unwrap();
                let path = entry.path();
                let kind = entry.file_type().unwrap();
                if kind.is_dir() {
                    stack.push(path);
                } else if kind.is_file() {
                    // A file may vanish between listing and reading (a
                    // running server removing its -shm); anything else is
                    // an error.
                    match fs::read(&path) {
                        Ok(bytes) => self.bytes(&path.display().to_string(), &bytes, pans),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => panic!("leak scan: cannot read {}: {e}", path.display()),
                    }
                }
            }
        }
    }

    /// Adds another scan's findings and tally.
    pub fn merge(&mut self, other: Scan) {
        self.findings.extend(other.findings);
        self.bytes += other.bytes;
        self.places.extend(other.places);
    }
}

/// Searches every regular file under `root` (recursively) for the PANs.
pub fn scan_dir<S: AsRef<str>>(root: &Path, pans: &[S]) -> Vec<Finding> {
    let mut scan = Scan::default();
    scan.dir(root, pans);
    scan.findings
}

/// Searches one buffer for the PANs in every supported encoding: digit runs
/// (ASCII, UTF-16LE and UTF-16BE at both alignments, single spaces or
/// dashes allowed between digits) holding a whole PAN or any
/// [`LEAK_FRAGMENT_DIGITS`] consecutive digits of one, and the whole PAN as
/// a 64-bit integer (both byte orders).
pub fn scan_bytes<S: AsRef<str>>(location: &str, bytes: &[u8], pans: &[S]) -> Vec<Finding> {
    let pans: Vec<&str> = pans.iter().map(AsRef::as_ref).collect();
    for pan in &pans {
        assert!(
            pan.len() >= 12 && pan.bytes().all(|b| b.is_ascii_digit()),
            "leak scan: give PANs as 12+ bare digits"
        );
    }
    let mut findings = Vec::new();
    let mut report = |pan: &str, encoding: Encoding, offset: usize, digits: usize| {
        let finding = Finding {
            pan: pan.to_string(),
            location: location.to_string(),
            encoding,
            offset,
            digits,
        };
        if !findings.contains(&finding) {
            findings.push(finding);
        }
    };

    // Every window of LEAK_FRAGMENT_DIGITS digits of every PAN, to the PANs
    // that have it.
    let mut fragments: std::collections::HashMap<&[u8], Vec<usize>> =
        std::collections::HashMap::new();
    for (i, pan) in pans.iter().enumerate() {
        for window in pan.as_bytes().windows(LEAK_FRAGMENT_DIGITS) {
            let owners = fragments.entry(window).or_default();
            if !owners.contains(&i) {
                owners.push(i);
            }
        }
    }

    // Digit runs, single-byte and UTF-16 (both byte orders, both
    // alignments).
    let mut text_hits: Vec<(usize, Encoding, usize, usize, usize)> = Vec::new();
    for (encoding, start, step) in [
        (Encoding::Ascii, 0, 1),
        (Encoding::Utf16Le, 0, 2),
        (Encoding::Utf16Le, 1, 2),
        (Encoding::Utf16Be, 0, 2),
        (Encoding::Utf16Be, 1, 2),
    ] {
        for (offset, digits) in digit_runs(bytes, start, step, encoding == Encoding::Utf16Be) {
            let mut longest = vec![0usize; pans.len()];
            for (at, window) in digits.as_bytes().windows(LEAK_FRAGMENT_DIGITS).enumerate() {
                for &i in fragments.get(window).map(Vec::as_slice).unwrap_or(&[]) {
                    let n = common_run(digits.as_bytes(), at, pans[i].as_bytes());
                    longest[i] = longest[i].max(n);
                }
            }
            for (i, &n) in longest.iter().enumerate() {
                if n >= LEAK_FRAGMENT_DIGITS {
                    text_hits.push((i, encoding, offset, n, digits.len()));
                }
            }
        }
    }
    // UTF-16 digits with zero bytes on both sides read the same in the
    // other byte order one byte further on: such a pair is one finding,
    // named after the reading with the longer digit run (little-endian on
    // a tie).
    for &(i, encoding, offset, n, run) in &text_hits {
        let shadowed = encoding != Encoding::Ascii
            && text_hits.iter().any(|&(j, other, o, _, other_run)| {
                j == i
                    && other != encoding
                    && other != Encoding::Ascii
                    && o.abs_diff(offset) == 1
                    && (other_run > run || (other_run == run && other == Encoding::Utf16Le))
            });
        if !shadowed {
            report(pans[i], encoding, offset, n);
        }
    }

    // 64-bit integers. A table of the two middle bytes of every wanted
    // encoding (mid-significance bits: rarely zero, and never both zero for
    // most numbers) rules out almost every window before any hashing; this
    // runs unoptimised in debug builds over megabytes of database files.
    let mut wanted_be: HashSet<[u8; 8]> = HashSet::new();
    let mut wanted_le: HashSet<[u8; 8]> = HashSet::new();
    let mut middle = vec![false; 1 << 16];
    for pan in &pans {
        if let Ok(n) = pan.parse::<u64>() {
            for encoded in [n.to_be_bytes(), n.to_le_bytes()] {
                middle[usize::from(encoded[3]) << 8 | usize::from(encoded[4])] = true;
            }
            wanted_be.insert(n.to_be_bytes());
            wanted_le.insert(n.to_le_bytes());
        }
    }
    for offset in 0..bytes.len().saturating_sub(7) {
        if !middle[usize::from(bytes[offset + 3]) << 8 | usize::from(bytes[offset + 4])] {
            continue;
        }
        let w: [u8; 8] = bytes[offset..offset + 8].try_into().unwrap();
        for (set, encoding) in [
            (&wanted_be, Encoding::U64BigEndian),
            (&wanted_le, Encoding::U64LittleEndian),
        ] {
            if set.contains(&w) {
                let n = match encoding {
                    Encoding::U64BigEndian => u64::from_be_bytes(w),
                    _ => u64::from_le_bytes(w),
                };
                for pan in &pans {
                    if pan.parse::<u64>() == Ok(n) {
                        report(pan, encoding, offset, pan.len());
                    }
                }
            }
        }
    }
    findings
}

/// The longest run of consecutive digits of `pan` that `run` has around
/// position `at` (where at least one window of both starts): the longest
/// common substring through that position, found by extending every
/// alignment that matches there.
fn common_run(run: &[u8], at: usize, pan: &[u8]) -> usize {
    let mut best = 0;
    let width = LEAK_FRAGMENT_DIGITS;
    for q in 0..=pan.len().saturating_sub(width) {
        if run[at..at + width] != pan[q..q + width] {
            continue;
        }
        let back = (1..=at.min(q))
            .take_while(|&k| run[at - k] == pan[q - k])
            .count();
        let fwd = (0..)
            .take_while(|&k| {
                at + width + k < run.len()
                    && q + width + k < pan.len()
                    && run[at + width + k] == pan[q + width + k]
            })
            .count();
        best = best.max(back + width + fwd);
    }
    best
}

/// Maximal runs of digits (units of `step` bytes from `start`; for step 2 a
/// unit is a digit and a zero byte, in that order or, `big_endian`, the
/// other), allowing a single space or dash between digits. Returns (byte
/// offset, digits without separators) for runs of [`LEAK_FRAGMENT_DIGITS`]
/// digits or more.
fn digit_runs(bytes: &[u8], start: usize, step: usize, big_endian: bool) -> Vec<(usize, String)> {
    // Where the meaningful byte of a unit is, and where its zero byte is.
    let (value_at, zero_at) = if big_endian { (1, 0) } else { (0, 1) };
    let unit = |i: usize| -> Option<u8> {
        if step == 1 {
            return bytes.get(i).copied();
        }
        if bytes.get(i + zero_at) != Some(&0) {
            return None;
        }
        bytes.get(i + value_at).copied()
    };
    let value_offset = if step == 2 { value_at } else { 0 };
    let mut runs = Vec::new();
    let mut digits = String::new();
    let mut run_start = 0;
    let mut pending_separator = false;
    let mut i = start;
    let flush = |digits: &mut String, run_start: usize, runs: &mut Vec<(usize, String)>| {
        if digits.len() >= LEAK_FRAGMENT_DIGITS {
            runs.push((run_start, std::mem::take(digits)));
        } else {
            digits.clear();
        }
    };
    while i < bytes.len() {
        if digits.is_empty() {
            // Outside a run only a digit matters: skip to the next one
            // without the bookkeeping (this runs over megabytes unoptimised).
            while i + value_offset < bytes.len() && !bytes[i + value_offset].is_ascii_digit() {
                i += step;
            }
            if i + value_offset >= bytes.len() {
                break;
            }
        }
        match unit(i) {
            Some(b) if b.is_ascii_digit() => {
                if digits.is_empty() {
                    run_start = i;
                }
                digits.push(char::from(b));
                pending_separator = false;
            }
            Some(b' ') | Some(b'-') if !digits.is_empty() && !pending_separator => {
                pending_separator = true;
            }
            _ => {
                flush(&mut digits, run_start, &mut runs);
                pending_separator = false;
            }
        }
        i += step;
    }
    flush(&mut digits, run_start, &mut runs);
    runs
}

/// Panics listing the findings (last four digits only) if there are any.
pub fn assert_no_leaks(findings: &[Finding]) {
    if !findings.is_empty() {
        let list: Vec<String> = findings.iter().map(ToString::to_string).collect();
        panic!(
            "{} card number leak(s) found:\n  {}",
            findings.len(),
            list.join("\n  ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAN: &str = "4111111111111111";

    fn utf16le(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    #[test]
    fn luhn_matches_published_test_cards() {
        for pan in [
            "4111111111111111",
            "4242424242424242",
            "378282246310005",
            "36227206271667",
            "6759649826438453",
            "2200000000000004",
            "2223003122003222",
        ] {
            assert!(luhn_valid(pan), "{pan} is Luhn-valid");
        }
        for pan in ["4111111111111112", "5555555555554443", "", "41x1"] {
            assert!(!luhn_valid(pan), "{pan:?} is not Luhn-valid");
        }
        for _ in 0..50 {
            let pan = fresh_pan();
            assert_eq!(pan.len(), 16);
            assert!(pan.starts_with("411111"));
            assert!(luhn_valid(&pan));
        }
        assert!(luhn_valid(&generated_pan("424242", 19)));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
        let (y, m) = current_year_month();
        assert!(y >= 2024 && (1..=12).contains(&m));
    }

    #[test]
    fn scanner_finds_planted_pans_in_files() {
        let dir = temp_data_dir();
        let sub = dir.path().join("nested");
        fs::create_dir(&sub).unwrap();
        let other = generated_pan("424242", 16);
        fs::write(dir.path().join("plain.log"), format!("x pan={PAN} y")).unwrap();
        let mut wide = b"\x00\x01junk".to_vec();
        wide.extend(utf16le(&format!("card {other}!")));
        fs::write(sub.join("wide.bin"), &wide).unwrap();
        fs::write(
            dir.path().join("clean.txt"),
            "nothing 411111******1111 here",
        )
        .unwrap();

        let findings = scan_dir(dir.path(), &[PAN, other.as_str(), "5555555555554444"]);
        assert_eq!(findings.len(), 2, "{findings:?}");
        assert!(findings.iter().any(|f| f.pan == PAN
            && f.encoding == Encoding::Ascii
            && f.location.ends_with("plain.log")));
        assert!(findings.iter().any(|f| f.pan == other
            && f.encoding == Encoding::Utf16Le
            && f.location.ends_with("wide.bin")));
    }

    #[test]
    fn scanner_finds_every_encoding() {
        let grouped = b"{\"pan\":\"4111 1111-1111 1111\"}".to_vec();
        let found = scan_bytes("grouped", &grouped, &[PAN]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].offset, 8);

        // Odd alignment in UTF-16LE.
        let mut odd = vec![0x41];
        odd.extend(utf16le(PAN));
        let found = scan_bytes("odd", &odd, &[PAN]);
        assert!(found.iter().any(|f| f.encoding == Encoding::Utf16Le));

        let n: u64 = PAN.parse().unwrap();
        let mut ints = vec![7u8; 5];
        ints.extend(n.to_be_bytes());
        ints.extend([1, 2, 3]);
        ints.extend(n.to_le_bytes());
        let found = scan_bytes("ints", &ints, &[PAN]);
        assert!(found
            .iter()
            .any(|f| f.encoding == Encoding::U64BigEndian && f.offset == 5));
        assert!(found
            .iter()
            .any(|f| f.encoding == Encoding::U64LittleEndian && f.offset == 16));

        // Embedded inside a longer digit run still counts.
        assert_eq!(
            scan_bytes("embedded", format!("99{PAN}00").as_bytes(), &[PAN]).len(),
            1
        );
    }

    /// A cluster restarted on its port while something else holds it
    /// waits for the port (as it must: its URL is in the test's hands)
    /// and comes up once it is free.
    #[test]
    fn a_restarted_cluster_waits_for_its_port() {
        let cluster = PgCluster::start();
        assert_eq!(cluster.sql_text("SELECT 1::text").as_deref(), Some("1"));
        cluster.stop_fast();
        let holder = std::net::TcpListener::bind(("127.0.0.1", cluster.port())).unwrap();
        let release = thread::spawn(move || {
            thread::sleep(Duration::from_millis(1500));
            drop(holder);
        });
        cluster.start_again();
        release.join().unwrap();
        assert_eq!(cluster.sql_text("SELECT 1::text").as_deref(), Some("1"));
        assert!(
            cluster.log().contains(PORT_TAKEN),
            "the first try must have met the taken port"
        );
    }

    #[test]
    fn scanner_ignores_masked_and_short_fragments() {
        // BIN and last four, masked forms, and digit runs of at most ten
        // digits of the card: not leaks.
        let text = "411111******1111, last4=1111, bin=411111, 4111-1111 11--1111 1111, 4111 1111  11  1111111111, 4111111111";
        assert!(scan_bytes("t", text.as_bytes(), &[PAN]).is_empty());
        assert!(scan_bytes("t", &utf16le(text), &[PAN]).is_empty());
        assert!(scan_bytes("t", &utf16be(text), &[PAN]).is_empty());
        assert!(scan_bytes("t", b"", &[PAN]).is_empty());
        // Ten digits of a card inside a longer run of other digits.
        let other = "5555555555554444";
        let ten = &other[3..13];
        assert!(scan_bytes("t", format!("99999{ten}99999").as_bytes(), &[other]).is_empty());
    }

    fn utf16be(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_be_bytes).collect()
    }

    /// A leak planted in every encoding, whole and as an 11-digit
    /// fragment, is found with its encoding, offset and length.
    #[test]
    fn scanner_finds_planted_leaks_in_every_encoding_and_fragment() {
        let pan = "5555555555554444";
        let amex = "378282246310005";
        let pans = [pan, amex];
        type Encode = fn(&str) -> Vec<u8>;
        let encoders: [(Encoding, Encode); 3] = [
            (Encoding::Ascii, |s| s.as_bytes().to_vec()),
            (Encoding::Utf16Le, utf16le),
            (Encoding::Utf16Be, utf16be),
        ];
        for (encoding, encode) in encoders {
            for misalign in [0usize, 1] {
                for (planted, expect_digits, expect_pan) in [
                    (pan.to_string(), 16, pan),
                    (spaced4(pan), 16, pan),
                    // 11 digits from the middle: BIN and last four cut off.
                    (amex[2..13].to_string(), 11, amex),
                    (pan[1..12].to_string(), 11, pan),
                    (pan[5..16].to_string(), 11, pan),
                    // 13 digits grouped, inside other digits.
                    (format!("00{}-{}99", &amex[1..8], &amex[8..14]), 13, amex),
                ] {
                    let mut bytes = vec![0xAB; 3 + misalign];
                    let offset = bytes.len();
                    bytes.extend(encode(&planted));
                    // Not text: in UTF-16 of either order, the bytes next
                    // to the digits tell the byte order.
                    bytes.extend([0xAB; 3]);
                    let found = scan_bytes("planted", &bytes, &pans);
                    assert_eq!(
                        found.len(),
                        1,
                        "{encoding:?} +{misalign} {}: {found:?}",
                        planted.len()
                    );
                    let f = &found[0];
                    assert_eq!(f.encoding, encoding, "{f}");
                    assert_eq!(f.pan, expect_pan, "{f}");
                    assert_eq!(f.digits, expect_digits, "{f}");
                    assert_eq!(f.is_whole(), expect_digits == expect_pan.len(), "{f}");
                    assert_eq!(f.offset, offset, "{f}");
                }
            }
        }
        // UTF-16 inside UTF-16 text: one finding, whatever the order.
        for encode in [utf16le as Encode, utf16be] {
            let found = scan_bytes("t", &encode(&format!("card {pan}, ok")), &pans);
            assert!(found.len() == 1 && found[0].is_whole(), "{found:?}");
        }
        // 64-bit integers, both byte orders.
        let n: u64 = pan.parse().unwrap();
        for (bytes, encoding) in [
            (n.to_be_bytes(), Encoding::U64BigEndian),
            (n.to_le_bytes(), Encoding::U64LittleEndian),
        ] {
            let mut buf = vec![1u8, 2, 3];
            buf.extend(bytes);
            let found = scan_bytes("int", &buf, &pans);
            assert!(
                found
                    .iter()
                    .any(|f| f.encoding == encoding && f.offset == 3 && f.is_whole()),
                "{found:?}"
            );
        }
        // Every length from 11 to the whole number, at every start.
        for len in LEAK_FRAGMENT_DIGITS..=pan.len() {
            for start in 0..=pan.len() - len {
                let found = scan_bytes(
                    "t",
                    format!("x{}x", &pan[start..start + len]).as_bytes(),
                    &[pan],
                );
                assert!(
                    found.len() == 1 && found[0].digits == len,
                    "{len} digits from {start}: {found:?}"
                );
            }
        }
        // The tally counts bytes and places.
        let mut scan = Scan::default();
        scan.bytes("a", pan.as_bytes(), &pans);
        scan.bytes("b", b"nothing", &pans);
        assert_eq!(
            (scan.bytes, scan.places.len(), scan.findings.len()),
            (23, 2, 1)
        );
    }

    fn spaced4(pan: &str) -> String {
        pan.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn database_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "cv_e2e_1"),
            "postgres://postgres@127.0.0.1:5432/cv_e2e_1"
        );
        assert_eq!(
            with_database("postgres://u:p@db:5433/admin?sslmode=disable", "x"),
            "postgres://u:p@db:5433/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://db", "x"), "postgres://db/x");
        assert_eq!(
            with_database("postgres://db?a=b", "x"),
            "postgres://db/x?a=b"
        );
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x?a=b"),
            "postgres://u:***@db:5432/x?a=b"
        );
        assert_eq!(redact_url(DEFAULT_PG_URL), DEFAULT_PG_URL);
        assert_eq!(Backend::of_url("postgres://db/x"), Backend::Postgres);
        assert_eq!(Backend::of_url("postgresql://db/x"), Backend::Postgres);
        assert_eq!(Backend::of_url("sqlite:///tmp/x.db"), Backend::Sqlite);
    }

    #[test]
    fn scanner_prefilter_keeps_every_number() {
        // Numbers at every alignment, among zeros and noise.
        let pans: Vec<String> = (0..50).map(|_| fresh_pan()).collect();
        for (i, pan) in pans.iter().enumerate() {
            let n: u64 = pan.parse().unwrap();
            let mut bytes = vec![0u8; i % 9];
            bytes.extend(n.to_le_bytes());
            bytes.extend([0xff; 3]);
            bytes.extend(n.to_be_bytes());
            let found = scan_bytes("t", &bytes, &pans);
            assert_eq!(found.len(), 2, "{found:?}");
        }
    }

    #[test]
    fn listening_line_parsing() {
        assert_eq!(
            parse_listening_line(
                "2025-01-01T00:00:00Z  INFO tokenizer: listening on 127.0.0.1:4321"
            )
            .as_deref(),
            Some("127.0.0.1:4321")
        );
        assert_eq!(
            parse_listening_line(&strip_ansi(
                "\u{1b}[32m INFO\u{1b}[0m listening on 127.0.0.1:80\u{1b}[0m\n"
            ))
            .as_deref(),
            Some("127.0.0.1:80")
        );
        assert_eq!(parse_listening_line("starting"), None);
    }

    #[test]
    fn raw_response_parsing() {
        let resp = parse_raw_response(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 11\r\nX-Request-Id: abc\r\n\r\n{\"a\":\"bc\"}\nignored",
        )
        .unwrap();
        assert_eq!(resp.status, 413);
        assert_eq!(resp.request_id.as_deref(), Some("abc"));
        assert_eq!(resp.json["a"], "bc");
        let chunked = parse_raw_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n5\r\n\":1}\n\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(chunked.json["a"], 1);
    }
}

// ---------------------------------------------------------------------------
// Comparing stored data (hostile-input tests)
// ---------------------------------------------------------------------------

/// Whether a table holds the audit trail (or SQLite/sqlx bookkeeping), which
/// legitimately grows with every request, refused or not; the readiness
/// probe's row (`/readyz` commits it); or the fleet's monitoring counters
/// (PostgreSQL: rate-limit buckets, which count refused authentications
/// too, anomaly windows, source blocks).
pub fn is_audit_or_bookkeeping_table(name: &str) -> bool {
    name.starts_with("audit")
        || name.starts_with("sqlite_")
        || name.starts_with("_sqlx")
        || matches!(
            name,
            "storage_probe"
                | "rate_buckets"
                | "anomaly_windows"
                | "anomaly_tokens"
                | "source_blocks"
        )
}

impl Service {
    /// Every row of every table except the audit trail and bookkeeping
    /// ([`is_audit_or_bookkeeping_table`]), as text, rows sorted: equal
    /// dumps mean equal stored data. SQLite: each column as an SQL literal
    /// (`quote()`); PostgreSQL: each row as `t::text`.
    pub fn dump_data(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out = std::collections::BTreeMap::new();
        match self.backend() {
            Backend::Postgres => {
                for (table, text) in pg_dump_tables(&self.database_url()) {
                    if is_audit_or_bookkeeping_table(&table) {
                        continue;
                    }
                    let mut rows: Vec<String> = String::from_utf8_lossy(&text)
                        .lines()
                        .map(str::to_string)
                        .collect();
                    rows.sort();
                    out.insert(table, rows);
                }
            }
            Backend::Sqlite => block_on(async {
                use sqlx::Connection as _;
                let mut conn = self.sqlite_connect().await;
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1",
                )
                .fetch_all(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("listing tables: {e}"));
                for table in tables {
                    if is_audit_or_bookkeeping_table(&table) {
                        continue;
                    }
                    let quoted = table.replace('"', "\"\"");
                    let columns: Vec<String> = sqlx::query_scalar(&format!(
                        "SELECT name FROM pragma_table_info('{}') ORDER BY cid",
                        table.replace('\'', "''")
                    ))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("columns of {table}: {e}"));
                    let row = columns
                        .iter()
                        .map(|c| format!("quote(\"{}\")", c.replace('"', "\"\"")))
                        .collect::<Vec<_>>()
                        .join(" || '|' || ");
                    let mut rows: Vec<String> =
                        sqlx::query_scalar(&format!("SELECT {row} FROM \"{quoted}\""))
                            .fetch_all(&mut conn)
                            .await
                            .unwrap_or_else(|e| panic!("dumping table {table}: {e}"));
                    rows.sort();
                    out.insert(table, rows);
                }
                let _ = conn.close().await;
            }),
        }
        out
    }
}

/// What a raw HTTP exchange ended in: a response, or the server closing (or
/// resetting) the connection without one.
#[derive(Debug)]
pub enum RawOutcome {
    Response(Resp),
    Closed {
        after: Duration,
        error: Option<String>,
    },
}

/// Writes `request` (a whole HTTP request, head and body, exactly as given)
/// on a new connection to `addr`, `chunk` bytes at a time with `pause`
/// between chunks, while reading; stops writing when the server answers or
/// closes. Gives up after `limit` (then reports `Closed` with the error
/// "client gave up").
pub fn raw_http(
    addr: &str,
    request: &[u8],
    chunk: usize,
    pause: Duration,
    limit: Duration,
) -> RawOutcome {
    let started = Instant::now();
    let mut wire = Wire::connect(addr, tls_for_addr(addr));
    wire.tcp()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut sent = 0;
    let mut next_write = Instant::now();
    let mut write_failed = false;
    loop {
        if started.elapsed() > limit {
            let _ = wire.tcp().shutdown(Shutdown::Both);
            return RawOutcome::Closed {
                after: started.elapsed(),
                error: Some("client gave up".to_string()),
            };
        }
        if sent < request.len() && !write_failed && Instant::now() >= next_write {
            let end = (sent + chunk.max(1)).min(request.len());
            match wire.write_all(&request[sent..end]) {
                Ok(()) => {
                    let _ = wire.flush();
                    sent = end;
                    next_write = Instant::now() + pause;
                }
                Err(_) => write_failed = true,
            }
        }
        match wire.read(&mut buf) {
            Ok(0) => {
                return match parse_raw_response(&raw) {
                    Some(resp) => RawOutcome::Response(resp),
                    None => RawOutcome::Closed {
                        after: started.elapsed(),
                        error: None,
                    },
                }
            }
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if response_complete(&raw) {
                    let _ = wire.tcp().shutdown(Shutdown::Both);
                    return RawOutcome::Response(parse_raw_response(&raw).unwrap());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                return match parse_raw_response(&raw) {
                    Some(resp) => RawOutcome::Response(resp),
                    None => RawOutcome::Closed {
                        after: started.elapsed(),
                        error: Some(e.to_string()),
                    },
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// TLS: the harness PKI, client configurations, raw connections
// ---------------------------------------------------------------------------

/// Where a service listens: (listener, `host:port`) per listener, and the
/// CA of its server certificate (`None`: plain HTTP, `--dev` only).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub listeners: Vec<(String, String)>,
    pub ca: Option<PathBuf>,
}

impl Endpoints {
    pub fn scheme(&self) -> &'static str {
        if self.ca.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn listener(&self, name: &str) -> Option<&str> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_str())
    }

    /// The listener serving `path`: `reveal` for detokenize, `admin` for
    /// metrics, readiness, admin and audit routes and the API document,
    /// `api` for the rest (the one listener of `--dev` for everything).
    pub fn addr_for(&self, path: &str) -> &str {
        let name = if path.starts_with("/v1/detokenize") || path.starts_with("/v1/forward/") {
            "reveal"
        } else if [
            "/metrics",
            "/readyz",
            "/v1/admin",
            "/v1/audit",
            "/v1/openapi.json",
        ]
        .iter()
        .any(|p| path.starts_with(p))
        {
            "admin"
        } else {
            "api"
        };
        self.listener(name)
            .or_else(|| self.listener("dev"))
            .or_else(|| self.listeners.first().map(|(_, a)| a.as_str()))
            .unwrap_or("127.0.0.1:1")
    }
}

/// The harness's PKI of a data directory (made by `tokenizer dev-pki`).
pub fn harness_pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("harness-pki")
}

/// [`make_harness_pki`] unless the data directory has one; several services
/// starting at once on one directory make it once.
pub fn ensure_harness_pki(data_dir: &Path, captured: &Captured) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !harness_pki_dir(data_dir)
        .join("client-key_admin.key")
        .exists()
    {
        make_harness_pki(data_dir, captured);
    }
}

/// `tokenizer dev-pki --out <data-dir>/harness-pki`: a CA, the server
/// certificate (localhost, 127.0.0.1, ::1) and one client certificate per
/// role, `client-<role>.pem` with identity `spiffe://cardvault.dev/<role>`.
pub fn make_harness_pki(data_dir: &Path, captured: &Captured) {
    let dir = harness_pki_dir(data_dir);
    let mut cmd = tokenizer_command();
    cmd.arg("dev-pki").arg("--out").arg(&dir);
    let output = wait_with_timeout(cmd, CLI_TIMEOUT, &["dev-pki"]);
    captured
        .stdout
        .lock()
        .unwrap()
        .extend_from_slice(&output.stdout);
    captured
        .stderr
        .lock()
        .unwrap()
        .extend_from_slice(&output.stderr);
    assert!(
        output.status.success(),
        "`tokenizer dev-pki` failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read_pem_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| panic!("cannot read certificates from {}: {e}", path.display()))
}

/// A rustls client configuration trusting `ca`, optionally with a client
/// certificate (PEM certificate and key files). TLS 1.3 and 1.2, ring.
pub fn tls_client_config(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_pem_certs(ca) {
        roots.add(cert).expect("a usable CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain = read_pem_certs(cert);
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .unwrap_or_else(|e| panic!("cannot read the key {}: {e}", key.display()));
            builder
                .with_client_auth_cert(chain, key)
                .expect("a usable client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// TLS client configurations of the listeners of every running service
/// of this process, by address: what lets [`raw_http`] reach a TLS
/// listener by its address alone.
fn tls_registry() -> &'static Mutex<std::collections::HashMap<String, Arc<rustls::ClientConfig>>> {
    static REGISTRY: std::sync::OnceLock<
        Mutex<std::collections::HashMap<String, Arc<rustls::ClientConfig>>>,
    > = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(std::collections::HashMap::new()))
}

fn register_tls(endpoints: &Endpoints) {
    let Some(ca) = &endpoints.ca else { return };
    let config = tls_client_config(ca, None);
    let mut registry = tls_registry().lock().unwrap();
    for (_, addr) in &endpoints.listeners {
        registry.insert(addr.clone(), config.clone());
    }
}

/// The TLS client configuration for a listener address of a running
/// service (`None`: plain HTTP).
pub fn tls_for_addr(addr: &str) -> Option<Arc<rustls::ClientConfig>> {
    tls_registry().lock().unwrap().get(addr).cloned()
}

/// A client connection, plain or TLS (handshake done), read and written
/// from one thread.
pub enum Wire {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wire::Plain(_) => "Wire::Plain",
            Wire::Tls(_) => "Wire::Tls",
        })
    }
}

impl Wire {
    /// Connects (and completes the TLS handshake) or panics.
    pub fn connect(addr: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Wire {
        Wire::try_connect(addr, tls).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }

    pub fn try_connect(addr: &str, tls: Option<Arc<rustls::ClientConfig>>) -> io::Result<Wire> {
        Wire::over(TcpStream::connect(addr)?, addr, tls)
    }

    /// An established TCP connection to `addr`, with TLS when `tls` is
    /// given (the handshake is done here).
    pub fn over(
        tcp: TcpStream,
        addr: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> io::Result<Wire> {
        tcp.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        tcp.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let Some(tls) = tls else {
            return Ok(Wire::Plain(tcp));
        };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = rustls::ClientConnection::new(tls, name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Wire::Tls(Box::new(stream)))
    }

    /// The TCP connection underneath (timeouts, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Wire::Plain(s) => s,
            Wire::Tls(s) => &s.sock,
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(buf),
            Wire::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.write(buf),
            Wire::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Wire::Plain(s) => s.flush(),
            Wire::Tls(s) => s.flush(),
        }
    }
}

/// [`raw_exchange`] over TLS: one thread writes everything, then reads (a
/// server that answers early and stops reading ends the writing with an
/// error after a few seconds; its answer is still read).
fn raw_exchange_tls(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Resp {
    let mut wire = Wire::connect(addr, Some(tls));
    wire.tcp()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = request_head(addr, method, path, authorization, content_type, body.len());
    let _ = wire
        .write_all(head.as_bytes())
        .and_then(|()| wire.write_all(&body))
        .and_then(|()| wire.flush());
    let raw = read_raw_response(&mut wire, method, path);
    let _ = wire.tcp().shutdown(Shutdown::Both);
    parsed_raw_response(&raw, method, path)
}
