//! `cardvault-bench`: the benchmark of issue 7, run by `scripts/bench`.
//!
//! It sets up a real `tokenizer` (release build, production mode: TLS on
//! the api and reveal listeners, API keys, durable commits), seeds N cards
//! through the vault's batch path (in-process, before the service starts),
//! and drives the service over keep-alive HTTPS connections from the same
//! machine, one blocking client per thread:
//!
//! - `baseline`: `GET /v1/ping`, a trivial authenticated JSON endpoint on
//!   the same server and stack (TLS, authentication, routing, JSON);
//! - `tokenize_new`: new cards; `tokenize_repeat`: cards already stored (the
//!   idempotent path); `detokenize`; `batch100`: 100 new cards per call;
//!   `mix`: 80% tokenize (new), 20% detokenize;
//!
//! and, only when asked for (`--cases ...,collect_submit,collect_flow`),
//! hosted card collection (issue 17) through a real `tokenizer edge`
//! started beside the service (TLS, its own origin, forwarding to the
//! vault's api listener over mutual TLS as the principal `collect`):
//!
//! - `collect_submit`: only the buyer's submission of a new card to the
//!   edge (`POST /v1/collect/submit/{session}`, `Origin` the edge's own),
//!   on sessions each client opened before the timed part; compared with
//!   `tokenize_new` (the same new card posted straight to the api
//!   listener): the ratios of p50, p99 and throughput are "the latency the
//!   edge adds";
//! - `collect_complete`: the same, but posted straight to the vault's
//!   `POST /v1/collect/sessions/{session}/complete` as the edge's principal
//!   (no edge): splits that ratio into the vault's session work and the
//!   edge's own hop;
//! - `collect_flow`: one checkout end to end per iteration: open a session
//!   (api listener, role tokenize), submit a new card through the edge,
//!   confirm (`GET /v1/collect/sessions/{session}`: completed, with the
//!   token the edge answered); flows/s and latency per flow.
//!
//! and, also only when asked for (`--cases ...,forward,acquirer_direct`),
//! the forwarding proxy (issue 18) against the test acquirer of the e2e
//! harness (`e2e::acquirer`, in this process: HTTPS, a CA of its own, a
//! client certificate required, answering `{"status":"approved"}` at once),
//! configured as the vault's `[[upstream]]` `bench-acq`:
//!
//! - `forward`: the payment router's call, `POST /v1/forward/bench-acq/v1/payments`
//!   on the reveal listener (role `forward`, API key) with one seeded
//!   token's placeholder in a small JSON body; the vault detokenizes, calls
//!   the acquirer over mutual TLS (its own keep-alive pool) and relays the
//!   answer (scanned for card numbers);
//! - `acquirer_direct`: the same request with the card number itself,
//!   straight to the acquirer over mutual TLS with the client certificate
//!   it issued, one keep-alive connection per client like every other case;
//!   `forward / acquirer_direct` is "the latency the vault adds".
//!
//! The acquirer comes from the e2e crate rather than a copy: it is a plain
//! library (`cardvault-e2e`, lib `e2e`) whose dependencies are the
//! workspace's own, already compiled for the service and its tests, and
//! one server shared by the end-to-end tests and the benchmark stays one.
//!
//! With `--edge-auth mtls` (the default) the api listener runs `--api-auth
//! mtls` in those runs (the client CA of the dev PKI), the bench's own api
//! clients present `client-tokenize.pem` and the edge `client-collect.pem`;
//! with `--edge-auth api_key` the api listener stays as in the other runs
//! and the edge uses an API key file. The edge's rate limits (30 and 10 a
//! minute by default, which would throttle a benchmark from one address)
//! are raised to `--edge-rate`.
//!
//! Each case runs at each client count, printing requests/s (flows/s for
//! `collect_flow`), cards/s, p50/p99/p99.9 latency, errors, requests/s as
//! a ratio to the baseline of the same run (machines here are shared and
//! noisy: compare ratios of one run), and the CPU time per request of the
//! service process and of this one (utime + stime from /proc/<pid>/stat
//! over the measured interval, divided by the requests measured): on a
//! shared machine the load-independent figure. The resident size of the
//! service (and of the edge) is sampled during the largest client count:
//! at the first sample after warm-up, at the end, and the most seen (a
//! long run: `--cases detokenize --clients 64 --seconds 600`). It is also
//! printed after seeding and start, and after the cases, with what it
//! consists of (RssAnon, RssFile, RssShmem of /proc/<pid>/status).
//! Everything is also written as JSON (`--json FILE`); `--compare A B`
//! prints, per case and client count of two such files, the req/s ratio
//! B/A and the p99s. No card number is printed or logged: errors are shown
//! as status and error code only.
//!
//! Scale (issue 19): `--tenants N` spreads the seeded cards over N tenants
//! (`bench-00000`, ...; card `i` to tenant `i % N`; all created by the
//! seeding); `tokenize_new`, `tokenize_repeat` (with the card's own
//! tenant), `detokenize`, `batch100` and `mix` pick a uniformly random
//! tenant per request (the kept tokens, about 100,000, span all tenants).
//! The seeding is the vault's batch path itself (every card sealed, with
//! its audit event, exactly as a batch call stores it): the card inputs are
//! made on a thread of their own, `--seed-in-flight` batch calls (default
//! 16) run at once on `--seed-threads` runtime threads, so that the vault's
//! group commit merges them (up to 2000 cards per transaction) while the
//! next ones are sealed.
//!
//! Card numbers are generated from the test BIN 411111 with a valid Luhn
//! digit, as the project's test-card rules allow; every submission and
//! every `tokenize_new` call uses a card not used before.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

mod wrk;
use vault::access::{Role, TenantScope};
use vault::store::{self, Store, StoreConfig};
use vault::{CardInput, Principal, RequestContext, Vault, MAX_BATCH};
use zeroize::Zeroizing;

#[derive(Debug, Parser)]
#[command(
    name = "cardvault-bench",
    about = "Throughput and latency of the real tokenizer"
)]
struct Args {
    /// `sqlite` or `postgres` (a fresh database on CARDVAULT_TEST_PG_URL,
    /// default postgres://postgres@127.0.0.1:5432/postgres, dropped after).
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Cards stored before the load starts (seeded in-process; at least
    /// one per tenant: raised to `--tenants` if lower).
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Tenants the seeded cards are spread over, round robin (1: the one
    /// tenant `bench`; more: `bench-00000`, `bench-00001`, ...). The card
    /// cases then pick a uniformly random tenant per request.
    #[arg(long, default_value_t = 1)]
    tenants: u64,
    /// Seeding: batch calls (up to 1000 cards of one tenant each) in
    /// flight at once; the vault's group commit merges concurrent batches
    /// (up to 2000 cards per transaction).
    #[arg(long, default_value_t = 16)]
    seed_in_flight: usize,
    /// Seeding: Tokio worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    seed_threads: usize,
    /// Print the req/s ratio B/A and the p99s per case and client count of
    /// two JSON files of this bench (e.g. one tenant vs 30,000), and exit.
    #[arg(long, num_args = 2, value_names = ["A_JSON", "B_JSON"])]
    compare: Option<Vec<PathBuf>>,
    /// Client counts, comma-separated.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Seconds each case runs at each client count (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Cases to run, comma-separated (default: all).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,tokenize_new,tokenize_repeat,detokenize,batch100,mix"
    )]
    cases: Vec<String>,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The tokenizer binary (default: next to this one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Extra arguments for `tokenizer serve` (repeat), e.g.
    /// `--serve-arg=--db-group-commit --serve-arg=false`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// How the edge authenticates to the vault (collect cases only):
    /// `mtls` (its client certificate; the api listener then runs
    /// `--api-auth mtls` and the bench's api clients present
    /// client-tokenize.pem) or `api_key` (an API key file; the api
    /// listener stays on API keys as in runs without a collect case).
    #[arg(long, default_value = "mtls")]
    edge_auth: String,
    /// What drives the simple cases (baseline, tokenize_new,
    /// tokenize_repeat, detokenize): `wrk` (Debian's wrk, a light C client:
    /// the figures of issue 19) or `ureq` (threads of blocking clients, as
    /// the other cases always are). Runs whose api listener needs client
    /// certificates (collect cases with --edge-auth mtls) use ureq.
    #[arg(long, default_value = "wrk")]
    driver: String,
    /// The edge's `--rate-per-source` and `--rate-per-session` (a minute;
    /// 0: off). Its defaults, 30 and 10, would throttle a benchmark coming
    /// from one address.
    #[arg(long, default_value_t = 1_000_000_000)]
    edge_rate: u32,
    /// Extra arguments for `tokenizer edge` (repeat).
    #[arg(long = "edge-arg", allow_hyphen_values = true)]
    edge_args: Vec<String>,
    /// Keep the logs of the service and of the edge here (`service.log`,
    /// `edge.log`; they carry no card data).
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

/// The cases that need an edge (and sessions).
const COLLECT_CASES: [&str; 3] = ["collect_submit", "collect_complete", "collect_flow"];

/// The cases that need the test acquirer (and an `[[upstream]]`).
const FORWARD_CASES: [&str; 2] = ["forward", "acquirer_direct"];

/// The vault's name of the test acquirer, and the path it is called on.
const UPSTREAM: &str = "bench-acq";
const UPSTREAM_PATH: &str = "/v1/payments";

fn is_collect(case: &str) -> bool {
    COLLECT_CASES.contains(&case)
}

/// The checkout's origin in every session (the edge only puts it into the
/// form's `frame-ancestors`; the bench plays the frame itself).
const SHOP_ORIGIN: &str = "https://shop.example";

type Res<T> = Result<T, String>;

fn main() {
    let args = Args::parse();
    let result = match &args.compare {
        Some(files) => compare(files),
        None => run(&args),
    };
    if let Err(e) = result {
        eprintln!("cardvault-bench: {e}");
        std::process::exit(1);
    }
}

/// A test-BIN (411111) card number with a correct Luhn digit, from `n`.
fn test_pan(n: u64) -> String {
    vault::pan::with_check_digit(&format!("411111{:09}", n % 1_000_000_000)).unwrap_or_default()
}

/// The name of tenant `t` of `n`: `bench` alone, else `bench-00000`, ...
fn tenant_name(t: u64, n: u64) -> String {
    if n <= 1 {
        "bench".to_owned()
    } else {
        format!("bench-{t:05}")
    }
}

/// The next number of a client's xorshift generator.
fn next_random(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// A fixed scramble of `i` (splitmix64), to sample seeded cards evenly
/// over all tenants whatever their number.
fn mix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; Linux
/// exports them in USER_HZ, 100 everywhere this runs).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// User plus system CPU time of a process (`self` or a pid), in clock
/// ticks, from /proc/<pid>/stat (fields 14 and 15; the name in field 2 may
/// hold spaces, so counted after its closing parenthesis).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime = fields.get(11)?.parse::<u64>().ok()?;
    let stime = fields.get(12)?.parse::<u64>().ok()?;
    Some(utime + stime)
}

/// CPU time (clock ticks, user and system) of the waited-for children of
/// this process: wrk's runs, once each has ended.
fn children_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let cutime = fields.get(13)?.parse::<u64>().ok()?;
    let cstime = fields.get(14)?.parse::<u64>().ok()?;
    Some(cutime + cstime)
}

/// The kB fields of /proc/<pid>/status named, in MiB (absent: 0).
fn status_mib(pid: u32, names: &[&str]) -> Vec<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names
        .iter()
        .map(|name| {
            status
                .lines()
                .find(|l| l.split(':').next() == Some(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        })
        .collect()
}

/// What the service's resident memory consists of (/proc/<pid>/status):
/// a line to print, and as JSON.
fn memory_breakdown(pid: u32) -> (String, Value) {
    const FIELDS: [&str; 6] = ["VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "VmSwap"];
    let values = status_mib(pid, &FIELDS);
    let line: Vec<String> = FIELDS
        .iter()
        .zip(&values)
        .map(|(n, v)| format!("{n} {v:.1}"))
        .collect();
    let line = format!(
        "service memory after the cases (MiB, /proc/<pid>/status; RssAnon: heap and stacks, \
         RssFile: the mapped binary and libraries, RssShmem: shared memory; VmHWM: the peak): {}",
        line.join(", ")
    );
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        });
    let mut doc = serde_json::Map::new();
    for (n, v) in FIELDS.iter().zip(values) {
        doc.insert(format!("{}_mib", n.to_lowercase()), json!(v));
    }
    doc.insert("threads".into(), json!(threads));
    (
        format!("{line}; threads {}", threads.unwrap_or_default()),
        Value::Object(doc),
    )
}

/// `--compare A B`: per case and client count of B also in A, the req/s
/// of both, B/A, the p99s and the service CPU per request.
fn compare(files: &[PathBuf]) -> Res<()> {
    let load = |p: &PathBuf| -> Res<Value> {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
    };
    let (Some(a_path), Some(b_path)) = (files.first(), files.get(1)) else {
        return Err("--compare needs two JSON files".into());
    };
    let (a, b) = (load(a_path)?, load(b_path)?);
    for (tag, doc, path) in [("A", &a, a_path), ("B", &b, b_path)] {
        println!(
            "{tag}: {} ({}, {} cards, {} tenant(s); service RSS after start {} MiB, after the cases {} MiB)",
            path.display(),
            doc["backend"].as_str().unwrap_or("?"),
            doc["seeded_cards"].as_u64().unwrap_or(0),
            doc["tenants"].as_u64().unwrap_or(1),
            fmt_mib(&doc["service_rss_after_start_mib"]),
            fmt_mib(&doc["service_rss_after_cases_mib"]),
        );
    }
    println!(
        "\n{:<16} {:>7} {:>10} {:>10} {:>8} {:>9} {:>9} {:>10} {:>10}",
        "case",
        "clients",
        "A req/s",
        "B req/s",
        "B/A",
        "A p99 ms",
        "B p99 ms",
        "A svc µs",
        "B svc µs"
    );
    let rows = |doc: &Value| doc["results"].as_array().cloned().unwrap_or_default();
    let a_rows = rows(&a);
    let mut compared = 0;
    for rb in rows(&b) {
        let Some(ra) = a_rows
            .iter()
            .find(|ra| ra["case"] == rb["case"] && ra["clients"] == rb["clients"])
        else {
            continue;
        };
        let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
        let us = |r: &Value| {
            r["service_cpu_us_per_request"]
                .as_f64()
                .map_or("-".to_owned(), |v| format!("{v:.0}"))
        };
        println!(
            "{:<16} {:>7} {:>10.0} {:>10.0} {:>8.2} {:>9.2} {:>9.2} {:>10} {:>10}",
            rb["case"].as_str().unwrap_or("?"),
            rb["clients"].as_u64().unwrap_or(0),
            f(ra, "requests_per_second"),
            f(&rb, "requests_per_second"),
            f(&rb, "requests_per_second") / f(ra, "requests_per_second").max(1e-9),
            f(ra, "p99_ms"),
            f(&rb, "p99_ms"),
            us(ra),
            us(&rb),
        );
        compared += 1;
    }
    if compared == 0 {
        return Err("no case and client count in both files".into());
    }
    Ok(())
}

fn fmt_mib(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |m| format!("{m:.0}"))
}

/// The unprivileged user the service runs as when we are root (it refuses
/// root outside `--dev`).
fn service_user() -> Option<(u32, u32)> {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    root.then_some((65_534, 65_534))
}

fn chown_tree(path: &Path, owner: (u32, u32)) -> Res<()> {
    match std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1)) {
        // SQLite's -shm and -wal files go when the seeding's last
        // connection closes, maybe just after they were listed.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(|e| format!("chown {}: {e}", path.display()))?,
    }
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| e.to_string())? {
            chown_tree(&entry.map_err(|e| e.to_string())?.path(), owner)?;
        }
    }
    Ok(())
}

fn tokenizer_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    if let Some((uid, gid)) = service_user() {
        use std::os::unix::process::CommandExt as _;
        cmd.uid(uid).gid(gid);
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    cmd
}

fn cli(bin: &Path, args: &[&str]) -> Res<String> {
    let out = tokenizer_command(bin)
        .args(args)
        .output()
        .map_err(|e| format!("tokenizer {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "tokenizer {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(args: &Args) -> Res<()> {
    let tokenizer = match &args.tokenizer {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("tokenizer"),
    };
    if !tokenizer.is_file() {
        return Err(format!(
            "no tokenizer at {} (cargo build --release -p tokenizer-api)",
            tokenizer.display()
        ));
    }
    let dir = tempfile::Builder::new()
        .prefix("cardvault-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data).map_err(|e| e.to_string())?;
    let owner = service_user();
    if let Some(owner) = owner {
        chown_tree(dir.path(), owner)?;
    }
    let admin_url = std::env::var("CARDVAULT_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let db_name = format!("cardvault_bench_{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let url = match args.backend.as_str() {
        "sqlite" => store::sqlite_url(&data.join("cardvault.db")),
        "postgres" => {
            rt.block_on(pg_execute(
                &admin_url,
                &format!("CREATE DATABASE {db_name}"),
            ))?;
            format!(
                "{}/{db_name}",
                admin_url.rsplit_once('/').map_or("", |(a, _)| a)
            )
        }
        other => return Err(format!("unknown backend {other}")),
    };
    let result = bench(args, &tokenizer, &data, &url, owner);
    if args.backend == "postgres" {
        let _ = rt.block_on(pg_execute(
            &admin_url,
            &format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"),
        ));
    }
    result
}

async fn pg_execute(url: &str, sql: &str) -> Res<()> {
    use sqlx::{Connection as _, Executor as _};
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("PostgreSQL: {e}"))?;
    conn.execute(sql).await.map_err(|e| e.to_string())?;
    Ok(())
}

fn bench(
    args: &Args,
    tokenizer: &Path,
    data: &Path,
    url: &str,
    owner: Option<(u32, u32)>,
) -> Res<()> {
    let d = data.display().to_string();
    let common = ["--data-dir", d.as_str(), "--database-url", url];
    let with = |extra: &[&str]| -> Vec<String> {
        extra
            .iter()
            .chain(common.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    let run_cli = |extra: &[&str]| -> Res<String> {
        let a = with(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        cli(tokenizer, &refs)
    };
    let collect = args.cases.iter().any(|c| is_collect(c));
    let mtls = match args.edge_auth.as_str() {
        "mtls" => collect,
        "api_key" => false,
        other => return Err(format!("--edge-auth must be mtls or api_key, not {other}")),
    };
    if let Some(dir) = &args.log_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    run_cli(&["kek", "generate"])?;
    run_cli(&["migrate"])?;
    let pki = data.join("pki");
    let p = pki.display().to_string();
    cli(tokenizer, &["dev-pki", "--out", &p])?;
    let api_key_of = |created: &str| -> Res<String> {
        serde_json::from_str::<Value>(created.trim())
            .ok()
            .and_then(|v| v["api_key"].as_str().map(str::to_owned))
            .ok_or_else(|| "principal create printed no key".to_owned())
    };
    let key = api_key_of(&run_cli(&[
        "principal",
        "create",
        "--name",
        "bench",
        "--roles",
        "tokenize,detokenize",
        "--tenants",
        "*",
    ])?)?;
    // Hosted collection: the edge's principal (role collect) and, with
    // mutual TLS on the api listener, the bench's own by certificate.
    let mut edge_key = None;
    if collect {
        let mut edge = vec![
            "principal",
            "create",
            "--name",
            "edge",
            "--roles",
            "collect",
            "--tenants",
            "*",
        ];
        if mtls {
            run_cli(&[
                "principal",
                "create",
                "--name",
                "bench-cert",
                "--roles",
                "tokenize",
                "--tenants",
                "*",
                "--cert-identity",
                "spiffe://cardvault.dev/tokenize",
            ])?;
            edge.extend(["--cert-identity", "spiffe://cardvault.dev/collect"]);
            run_cli(&edge)?;
        } else {
            let k = api_key_of(&run_cli(&edge)?)?;
            let file = data.join("edge-vault.key");
            write_secret_file(&file, &k)?;
            edge_key = Some((k, file));
        }
    }

    // Forwarding: the test acquirer (its files given to the service user),
    // the vault's `[[upstream]]` for it in a configuration file of its own,
    // and the payment router's principal (role forward, API key).
    let forwarding = args
        .cases
        .iter()
        .any(|c| FORWARD_CASES.contains(&c.as_str()));
    let acquirer = forwarding.then(|| e2e::acquirer::Acquirer::start(Default::default()));
    let mut forward_key = None;
    let mut serve_config = Vec::new();
    if let Some(acq) = &acquirer {
        let config = data.join("forward.toml");
        let table = acq.upstream_toml(
            UPSTREAM,
            &format!("paths = [\"{UPSTREAM_PATH}\"]\ntenants = [\"*\"]\n"),
        );
        std::fs::write(&config, table).map_err(|e| format!("{}: {e}", config.display()))?;
        serve_config = vec!["--config".to_owned(), config.display().to_string()];
        forward_key = Some(api_key_of(&run_cli(&[
            "principal",
            "create",
            "--name",
            "bench-forward",
            "--roles",
            "forward",
            "--tenants",
            "*",
        ])?)?);
    }

    // Seed through the vault's batch path, in this process, on a runtime
    // of its own (`--seed-threads` workers).
    let tenants = args.tenants.max(1);
    let seeded = args.seed.max(tenants);
    if seeded > args.seed {
        println!("--seed raised to {seeded}: at least one card per tenant");
    }
    let seed_threads = match args.seed_threads {
        0 => std::thread::available_parallelism().map_or(2, usize::from),
        n => n,
    };
    let seed_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(seed_threads)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let seed_cpu_from = cpu_ticks("self");
    let sample = seed_rt.block_on(seed(
        url,
        &data.join("kek.key"),
        seeded,
        tenants,
        args.seed_in_flight,
    ))?;
    let seed_secs = started.elapsed().as_secs_f64();
    drop(seed_rt);
    // This process's CPU per seeded card (sealing, audit chain, the SQLite
    // writer thread; not PostgreSQL's server): near 2 cores' worth of the
    // wall time means the seeding is CPU-bound here.
    let seed_cpu_secs = match (seed_cpu_from, cpu_ticks("self")) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / clock_ticks(),
        _ => 0.0,
    };
    let seed_rate = seeded as f64 / seed_secs.max(1e-9);
    println!(
        "seeded {seeded} cards over {tenants} tenant{} on {} in {seed_secs:.1} s ({seed_rate:.0} cards/s; \
         {} batch calls in flight, {seed_threads} runtime threads; {} kept for the load; \
         this process's CPU {seed_cpu_secs:.1} s, {:.0} µs per card)",
        if tenants == 1 { "" } else { "s" },
        args.backend,
        args.seed_in_flight.max(1),
        sample.len(),
        seed_cpu_secs * 1e6 / seeded.max(1) as f64,
    );
    if let Some(owner) = owner {
        chown_tree(data, owner)?;
    }

    // The edge's port is chosen first: the vault names it in frame URLs.
    let edge_origin = if collect {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for the edge: {e}"))?
            .port();
        Some(format!("https://127.0.0.1:{port}"))
    } else {
        None
    };
    let ca = pki.join("ca.pem");
    let mut serve_args = Vec::new();
    if let Some(origin) = &edge_origin {
        serve_args.extend(["--collect-public-url".to_owned(), origin.clone()]);
    }
    if mtls {
        serve_args.extend(
            [
                "--tls-client-ca-file",
                &ca.display().to_string(),
                "--api-auth",
                "mtls",
                "--reveal-auth",
                "api_key",
                "--admin-auth",
                "api_key",
            ]
            .map(str::to_owned),
        );
    }
    serve_args.extend(serve_config);
    serve_args.extend(args.serve_args.iter().cloned());
    let mut service = Service::start(
        tokenizer,
        data,
        url,
        &pki,
        &serve_args,
        args.log_dir.as_ref().map(|d| d.join("service.log")),
    )?;
    let mut edge = match &edge_origin {
        None => None,
        Some(origin) => {
            let started = Edge::start(
                tokenizer,
                &pki,
                origin,
                &service.api,
                edge_key.as_ref().map(|(_, f)| f.as_path()),
                args,
            );
            match started {
                Ok(e) => Some(e),
                Err(e) => {
                    service.proc.stop();
                    return Err(e);
                }
            }
        }
    };
    let rss_after_start = service.proc.rss_mib();
    println!(
        "service resident size after seeding and start: {rss_after_start:.1} MiB ({tenants} tenant{} stored, none used yet)",
        if tenants == 1 { "" } else { "s" }
    );
    if let Some(acq) = &acquirer {
        println!(
            "test acquirer at {} (upstream {UPSTREAM}; mutual TLS, answers {{\"status\":\"approved\"}} at once; \
             forward: reveal listener, API key of a principal with the role forward)",
            acq.origin()
        );
    }
    if let Some(e) = &edge {
        println!(
            "edge at {} (TLS; to the vault over {}; --rate-per-source and --rate-per-session {}{})",
            e.origin,
            if mtls {
                "mutual TLS, client-collect.pem; the api listener runs --api-auth mtls and the \
                 bench's api clients present client-tokenize.pem"
            } else {
                "TLS with an API key file; the api listener on API keys"
            },
            args.edge_rate,
            if args.edge_rate == 0 {
                " (off)"
            } else {
                " a minute, raised from 30 and 10: one source address would be throttled"
            }
        );
    }
    let creds = Creds {
        mtls_api: mtls,
        tls: tls_config(&ca, mtls.then(|| client_pair(&pki, "tokenize")).as_ref())?,
        key,
        collect_tls: tls_config(&ca, mtls.then(|| client_pair(&pki, "collect")).as_ref())?,
        collect_key: edge_key.map(|(k, _)| k),
        forward_key,
        acquirer_tls: match &acquirer {
            Some(acq) => Some(tls_config(
                &acq.server_ca_pem_path(),
                Some(&(acq.client_cert_path(), acq.client_key_path())),
            )?),
            None => None,
        },
    };
    let result = load(
        args,
        &service,
        edge.as_ref(),
        acquirer.as_ref(),
        &creds,
        sample,
    );
    let rss_after_cases = service.proc.rss_mib();
    let (memory_line, memory) = memory_breakdown(service.proc.child.id());
    let edge_log_lines = edge.as_mut().map(|e| e.proc.stop());
    let log_lines = service.proc.stop();
    let (results, comparisons) = result?;
    println!(
        "\nservice resident size after the cases: {rss_after_cases:.1} MiB (after seeding and start: \
         {rss_after_start:.1} MiB; {tenants} tenant{})",
        if tenants == 1 { "" } else { "s" }
    );
    println!("{memory_line}");
    println!("service log lines: {log_lines}");
    if let Some(n) = edge_log_lines {
        println!("edge log lines: {n}");
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "backend": args.backend,
            "seeded_cards": seeded,
            "tenants": tenants,
            "seed_seconds": seed_secs,
            "seed_cards_per_second": seed_rate,
            "seed_cpu_seconds": seed_cpu_secs,
            "seed_in_flight": args.seed_in_flight.max(1),
            "seed_threads": seed_threads,
            "service_rss_after_start_mib": rss_after_start,
            "service_rss_after_cases_mib": rss_after_cases,
            "service_memory_after_cases": memory,
            "clock_ticks_per_second": clock_ticks(),
            "seconds_per_case": args.seconds,
            "edge": edge_origin.as_ref().map(|_| json!({
                "auth": if mtls { "mtls" } else { "api_key" },
                "api_listener_auth": if mtls { "mtls" } else { "api_key" },
                "rate_per_source": args.edge_rate,
                "rate_per_session": args.edge_rate,
                "log_lines": edge_log_lines,
            })),
            "results": results,
            "comparisons": comparisons,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

/// The dev PKI's client certificate and key of `role`.
fn client_pair(pki: &Path, role: &str) -> (PathBuf, PathBuf) {
    (
        pki.join(format!("client-{role}.pem")),
        pki.join(format!("client-{role}.key")),
    )
}

/// A file of mode 0600 holding `secret` (the edge's API key file).
fn write_secret_file(path: &Path, secret: &str) -> Res<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(secret.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The seeded cards kept for the load, per tenant: (card index, token).
/// Card `i` belongs to tenant `i % tenants`.
struct Sample {
    by_tenant: Vec<Vec<(u64, String)>>,
}

impl Sample {
    fn tenants(&self) -> u64 {
        self.by_tenant.len().max(1) as u64
    }

    /// A uniformly random tenant, then one of its kept cards.
    fn pick(&self, rng: &mut u64) -> Option<(u64, String)> {
        let t = (next_random(rng) % self.tenants()) as usize;
        let cards = self.by_tenant.get(t)?;
        cards
            .get((next_random(rng) % cards.len().max(1) as u64) as usize)
            .cloned()
    }

    fn len(&self) -> usize {
        self.by_tenant.iter().map(Vec::len).sum()
    }
}

/// One batch call of the seeding: cards `indices` of one tenant.
struct SeedBatch {
    tenant: String,
    indices: Vec<u64>,
    cards: Vec<CardInput>,
}

/// The batches of seeding `n` cards over `tenants`: card `i` goes to
/// tenant `i % tenants`; each tenant's cards in calls of up to
/// [`MAX_BATCH`], the tenants taken in turn (one round of calls over all
/// tenants, then the next).
fn seed_batches(n: u64, tenants: u64, mut each: impl FnMut(u64, Vec<u64>) -> bool) {
    let per = MAX_BATCH as u64;
    let tenants = tenants.max(1);
    let most = n.div_ceil(tenants);
    let mut round = 0;
    while round * per < most {
        for t in 0..tenants {
            let count = n / tenants + u64::from(t < n % tenants);
            let (from, to) = (round * per, ((round + 1) * per).min(count));
            if from >= to {
                continue;
            }
            if !each(t, (from..to).map(|k| t + k * tenants).collect()) {
                return;
            }
        }
        round += 1;
    }
}

/// Seed `n` cards over `tenants` with the vault's batch path (every card
/// sealed and audited as a batch call does it; the tenants are created by
/// their first batch), `in_flight` calls at once. The card inputs are made
/// on a thread of their own, off the runtime. Returns the cards kept for
/// the detokenize and repeat cases: about 100,000, evenly over the tenants
/// and at least one of each.
async fn seed(url: &str, kek_file: &Path, n: u64, tenants: u64, in_flight: usize) -> Res<Sample> {
    let in_flight = in_flight.max(1);
    let store: Arc<dyn Store> = store::open(&StoreConfig {
        url: url.to_owned(),
        migrate: true,
        op_timeout: Duration::from_secs(300),
        max_connections: u32::try_from(in_flight.clamp(4, 32)).unwrap_or(4),
    })
    .await
    .map_err(|e| e.to_string())?;
    let kek = hsm_shim::SoftwareKek::load(kek_file).map_err(|e| e.to_string())?;
    let vault = Arc::new(
        Vault::open(store.clone(), Arc::new(kek))
            .await
            .map_err(|e| e.to_string())?,
    );
    let ctx = RequestContext {
        principal: Principal {
            id: "bench-seed".into(),
            name: "bench-seed".into(),
            roles: [Role::Tokenize].into_iter().collect::<BTreeSet<_>>(),
            tenants: TenantScope::All,
        },
        source: "local".into(),
        request_id: "seed".into(),
    };
    // The card inputs, made ahead on a plain thread.
    let (tx, rx) = tokio::sync::mpsc::channel::<SeedBatch>(in_flight * 2);
    let tenants = tenants.max(1);
    let maker = std::thread::spawn(move || {
        seed_batches(n, tenants, |t, indices| {
            let cards = indices
                .iter()
                .map(|&i| CardInput {
                    pan: Zeroizing::new(test_pan(i)),
                    exp_month: 12,
                    exp_year: 2035,
                    cardholder_name: None,
                    cvc: None,
                })
                .collect();
            let batch = SeedBatch {
                tenant: tenant_name(t, tenants),
                indices,
                cards,
            };
            tx.blocking_send(batch).is_ok()
        });
    });
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    // Keep about 100k tokens for the load, evenly (a scramble of the
    // index, not every k-th: that could miss whole tenants), and the
    // first card of every tenant.
    let keep_every = (n / 100_000).max(1);
    let keep = move |i: u64| i < tenants || mix64(i).is_multiple_of(keep_every);
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (vault, ctx, rx) = (vault.clone(), ctx.clone(), rx.clone());
            tokio::spawn(async move {
                let mut kept = Vec::new();
                let mut refused = 0u64;
                loop {
                    let Some(batch) = rx.lock().await.recv().await else {
                        break;
                    };
                    let infos = match vault.tokenize_many(&ctx, &batch.tenant, batch.cards).await {
                        Ok(infos) => infos,
                        Err(e) => {
                            // The maker and the other workers stop.
                            rx.lock().await.close();
                            return Err(format!("seeding tenant {}: {e:?}", batch.tenant));
                        }
                    };
                    for (r, i) in infos.into_iter().zip(batch.indices) {
                        match r {
                            Ok(info) if keep(i) => kept.push((i, info.token)),
                            Ok(_) => {}
                            Err(_) => refused += 1,
                        }
                    }
                }
                Ok::<_, String>((kept, refused))
            })
        })
        .collect();
    let mut by_tenant = vec![Vec::new(); usize::try_from(tenants).unwrap_or(1)];
    let mut refused = 0;
    let mut failed = None;
    for w in workers {
        match w.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((kept, r)) => {
                refused += r;
                for (i, token) in kept {
                    if let Some(v) = by_tenant.get_mut((i % tenants) as usize) {
                        v.push((i, token));
                    }
                }
            }
            Err(e) => {
                rx.lock().await.close();
                failed.get_or_insert(e);
            }
        }
    }
    let _ = maker.join();
    store.close().await;
    if let Some(e) = failed {
        return Err(e);
    }
    if refused > 0 {
        return Err(format!("{refused} seeded cards were refused"));
    }
    Ok(Sample { by_tenant })
}

/// A running `tokenizer` process, its log drained (and counted).
struct Proc {
    child: Child,
    log_lines: Arc<AtomicU64>,
}

impl Proc {
    /// Start `cmd` and wait until it logged `listening on <addr> (<tag>,`
    /// for every tag; returns the addresses in the order of `tags`.
    fn spawn(
        mut cmd: Command,
        what: &str,
        tags: &[&str],
        log: Option<PathBuf>,
    ) -> Res<(Proc, Vec<String>)> {
        let mut keep = match log {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?,
            )),
            None => None,
        };
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the {what}: {e}"))?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no stderr".into());
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let log_lines = Arc::new(AtomicU64::new(0));
        let counter = log_lines.clone();
        std::thread::spawn(move || {
            // Drain (and count) the log; the listening lines go to the
            // main thread.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                counter.fetch_add(1, Ordering::Relaxed);
                if let Some(f) = keep.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("listening on ") {
                    let _ = tx.send(line);
                }
            }
            if let Some(f) = keep.as_mut() {
                use std::io::Write as _;
                let _ = f.flush();
            }
        });
        let mut proc = Proc { child, log_lines };
        let mut addrs: Vec<Option<String>> = vec![None; tags.len()];
        let deadline = Instant::now() + Duration::from_secs(60);
        while addrs.iter().any(Option::is_none) {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                proc.stop();
                return Err(format!("the {what} did not start listening"));
            };
            let addr = line
                .split("listening on ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned);
            for (tag, slot) in tags.iter().zip(addrs.iter_mut()) {
                if line.contains(&format!("({tag},")) {
                    slot.clone_from(&addr);
                }
            }
        }
        Ok((
            proc,
            addrs.into_iter().map(Option::unwrap_or_default).collect(),
        ))
    }

    /// Resident set size now, in MiB.
    fn rss_mib(&self) -> f64 {
        status_mib(self.child.id(), &["VmRSS"])
            .first()
            .copied()
            .unwrap_or(0.0)
    }

    /// Stop it (TERM, then KILL after 15 s); returns its log line count.
    fn stop(&mut self) -> u64 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_lines.load(Ordering::Relaxed)
    }
}

/// The running service: its process and listener addresses.
struct Service {
    proc: Proc,
    api: String,
    reveal: String,
}

impl Service {
    fn start(
        bin: &Path,
        data: &Path,
        url: &str,
        pki: &Path,
        extra: &[String],
        log: Option<PathBuf>,
    ) -> Res<Service> {
        let d = data.display().to_string();
        let cert = pki.join("server.pem").display().to_string();
        let key = pki.join("server.key").display().to_string();
        let mut cmd = tokenizer_command(bin);
        cmd.args([
            "serve",
            "--data-dir",
            &d,
            "--database-url",
            url,
            "--listen-api",
            "127.0.0.1:0",
            "--listen-reveal",
            "127.0.0.1:0",
            "--listen-admin",
            "127.0.0.1:0",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
        ])
        .args(extra);
        let (proc, addrs) = Proc::spawn(cmd, "tokenizer", &["api", "reveal"], log)?;
        let mut addrs = addrs.into_iter();
        Ok(Service {
            proc,
            api: addrs.next().unwrap_or_default(),
            reveal: addrs.next().unwrap_or_default(),
        })
    }
}

/// The running edge (`tokenizer edge`): its process and public origin.
struct Edge {
    proc: Proc,
    /// `https://127.0.0.1:<port>`: where the bench submits, and the
    /// `Origin` it sends (the edge's own, as its frame's fetch would).
    origin: String,
}

impl Edge {
    /// Start the edge on `origin`'s port, forwarding to the vault's api
    /// listener `api`, with the dev PKI's server certificate (it names
    /// 127.0.0.1) and the edge's credential: the dev PKI's client-collect
    /// certificate, or `api_key_file`.
    fn start(
        bin: &Path,
        pki: &Path,
        origin: &str,
        api: &str,
        api_key_file: Option<&Path>,
        args: &Args,
    ) -> Res<Edge> {
        let listen = origin.trim_start_matches("https://");
        let path = |name: &str| pki.join(name).display().to_string();
        let rate = args.edge_rate.to_string();
        let mut cmd = tokenizer_command(bin);
        cmd.args([
            "edge",
            "--listen",
            listen,
            "--public-url",
            origin,
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--vault-url",
            &format!("https://{api}"),
            "--vault-ca-file",
            &path("ca.pem"),
            "--rate-per-source",
            &rate,
            "--rate-per-session",
            &rate,
        ]);
        match api_key_file {
            Some(file) => cmd.arg("--api-key-file").arg(file),
            None => cmd.args([
                "--client-cert-file",
                &path("client-collect.pem"),
                "--client-key-file",
                &path("client-collect.key"),
            ]),
        };
        cmd.args(&args.edge_args);
        let (proc, _) = Proc::spawn(
            cmd,
            "edge",
            &["collect"],
            args.log_dir.as_ref().map(|d| d.join("edge.log")),
        )?;
        Ok(Edge {
            proc,
            origin: origin.to_owned(),
        })
    }
}

/// A client TLS configuration trusting `ca` only, presenting the client
/// certificate `client` (PEM chain, PEM key) when a listener asks for one.
fn tls_config(ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> Res<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let shown = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
            let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
                .map_err(|e| shown(cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| shown(cert, &e))?;
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| shown(key, &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| shown(cert, &e))?
        }
    };
    Ok(Arc::new(config))
}

/// The credentials of the client threads: TLS for the api, reveal and edge
/// listeners, and the bench principal's key; for `collect_complete`, the
/// edge principal's TLS (its client certificate) or key.
struct Creds {
    tls: Arc<rustls::ClientConfig>,
    key: String,
    collect_tls: Arc<rustls::ClientConfig>,
    collect_key: Option<String>,
    /// The payment router's key (role forward), forward cases only.
    forward_key: Option<String>,
    /// To the test acquirer: its server CA, its client certificate.
    acquirer_tls: Option<Arc<rustls::ClientConfig>>,
    /// The api listener authenticates by client certificate.
    mtls_api: bool,
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    cards: u64,
    /// The first error: status and error code, never a body.
    first_error: Option<String>,
    /// Sessions opened before the timed part (`collect_submit`,
    /// `collect_complete`), and those that failed to open.
    sessions_ahead: u64,
    session_errors: u64,
    /// Sessions opened during the timed part because the ones opened ahead
    /// ran out: not in the latencies, but they took the client's time.
    sessions_inline: u64,
}

impl Tally {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// One request of a case: (method, listener address, path, body, cards).
type Step = (&'static str, String, &'static str, Option<String>, u64);

/// A collection session as the checkout holds it.
struct Session {
    id: String,
    secret: String,
}

/// One client thread: its keep-alive connections (one agent for the api,
/// reveal and edge listeners; one as the edge's principal, for
/// `collect_complete`), and the sessions it opened ahead.
struct Client {
    agent: ureq::Agent,
    auth: String,
    collect_agent: ureq::Agent,
    collect_auth: Option<String>,
    /// `forward`'s credential (the router's key), and `acquirer_direct`'s
    /// own connection to the acquirer (mutual TLS).
    forward_auth: Option<String>,
    acquirer_agent: ureq::Agent,
    sessions: Vec<Session>,
    tally: Tally,
}

/// One iteration of a case: when its timed part started, how long it took,
/// and the cards it stored (or why it failed).
struct Outcome {
    start: Instant,
    elapsed: Duration,
    result: Result<u64, String>,
}

fn timed(f: impl FnOnce() -> Result<u64, String>) -> Outcome {
    let start = Instant::now();
    let result = f();
    Outcome {
        start,
        elapsed: start.elapsed(),
        result,
    }
}

/// One iteration of a case, run by a client thread (`None`: nothing to do).
type Iteration = Arc<dyn Fn(&mut Client, &mut u64) -> Option<Outcome> + Send + Sync>;

/// An error answer as `<status> <error code>` (the code only if it has the
/// documented shape: never anything that could echo a request).
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(status, r) => {
            let code = r
                .into_string()
                .ok()
                .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                .filter(|c| c.len() <= 40 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .unwrap_or_default();
            format!("{status} {code}")
        }
        ureq::Error::Transport(t) => format!("transport: {}", t.kind()),
    }
}

/// One HTTPS request; the answer's body, or why it failed.
fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<String, String> {
    let mut req = agent.request(method, url);
    if let Some(a) = auth {
        req = req.set("Authorization", a);
    }
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match result {
        Ok(r) => r
            .into_string()
            .map_err(|e| format!("reading the answer: {}", e.kind())),
        Err(e) => Err(describe(e)),
    }
}

/// `POST /v1/collect/sessions` on the api listener, as the checkout does.
fn open_session(c: &Client, api: &str) -> Result<Session, String> {
    let body = json!({"tenant": "bench", "allowed_origin": SHOP_ORIGIN, "ttl_secs": 900});
    let answer = send(
        &c.agent,
        "POST",
        &format!("{api}/v1/collect/sessions"),
        Some(&c.auth),
        &[],
        Some(&body.to_string()),
    )
    .map_err(|e| format!("open: {e}"))?;
    let v = serde_json::from_str::<Value>(&answer).map_err(|_| "open: not JSON".to_owned())?;
    match (v["session"].as_str(), v["client_secret"].as_str()) {
        (Some(id), Some(secret)) if v["frame_url"].is_string() => Ok(Session {
            id: id.to_owned(),
            secret: secret.to_owned(),
        }),
        _ => Err("open: no session in the answer".into()),
    }
}

/// What the frame posts (frame.js: client secret, number, expiry; no
/// security code, no name, as `tokenize_new` sends none); straight to the
/// vault, the edge's `buyer_address` too.
fn submission(s: &Session, pan: &str, direct: bool) -> String {
    let mut body =
        json!({"client_secret": s.secret, "pan": pan, "exp_month": 12, "exp_year": 2035});
    if direct {
        body["buyer_address"] = json!("127.0.0.1");
    }
    body.to_string()
}

/// The token of a submission's answer.
fn token_of(answer: &str) -> Result<String, String> {
    serde_json::from_str::<Value>(answer)
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_owned))
        .ok_or_else(|| "no token in the answer".to_owned())
}

/// The buyer's submission through the edge, as the frame's `fetch` sends
/// it: the edge's own `Origin`, `Sec-Fetch-Site: same-origin`, no
/// credentials.
fn submit(c: &Client, edge: &str, s: &Session, body: &str) -> Result<String, String> {
    let answer = send(
        &c.agent,
        "POST",
        &format!("{edge}/v1/collect/submit/{}", s.id),
        None,
        &[("Origin", edge), ("Sec-Fetch-Site", "same-origin")],
        Some(body),
    )
    .map_err(|e| format!("submit: {e}"))?;
    token_of(&answer).map_err(|e| format!("submit: {e}"))
}

/// The same submission straight to the vault, as the edge's principal.
fn complete_direct(c: &Client, api: &str, s: &Session, body: &str) -> Result<String, String> {
    let answer = send(
        &c.collect_agent,
        "POST",
        &format!("{api}/v1/collect/sessions/{}/complete", s.id),
        c.collect_auth.as_deref(),
        &[],
        Some(body),
    )
    .map_err(|e| format!("complete: {e}"))?;
    token_of(&answer).map_err(|e| format!("complete: {e}"))
}

/// The checkout's confirmation: the session is completed, with `token`.
fn confirm(c: &Client, api: &str, s: &Session, token: &str) -> Result<(), String> {
    let answer = send(
        &c.agent,
        "GET",
        &format!("{api}/v1/collect/sessions/{}", s.id),
        Some(&c.auth),
        &[],
        None,
    )
    .map_err(|e| format!("confirm: {e}"))?;
    let v = serde_json::from_str::<Value>(&answer).map_err(|_| "confirm: not JSON".to_owned())?;
    if v["status"] != "completed" {
        return Err("confirm: the session is not completed".into());
    }
    if v["token"]["token"].as_str() != Some(token) {
        return Err("confirm: not the token the edge answered".into());
    }
    Ok(())
}

/// Where the load goes.
struct Targets {
    api: String,
    reveal: String,
    /// The test acquirer's origin (forward cases only).
    acquirer: Option<String>,
    /// The edge's origin (collect cases only).
    edge: Option<String>,
}

/// The iteration of `case` (an unknown case does nothing).
fn iteration(
    case: &str,
    targets: &Arc<Targets>,
    sample: &Arc<Sample>,
    fresh: &Arc<AtomicU64>,
) -> Iteration {
    let (t, fresh) = (targets.clone(), fresh.clone());
    if is_collect(case) {
        let edge = t.edge.clone().unwrap_or_default();
        let api = t.api.clone();
        let it: Iteration = match case {
            "collect_flow" => Arc::new(move |c: &mut Client, _: &mut u64| {
                let pan = test_pan(fresh.fetch_add(1, Ordering::Relaxed));
                Some(timed(|| {
                    let s = open_session(c, &api)?;
                    let token = submit(c, &edge, &s, &submission(&s, &pan, false))?;
                    confirm(c, &api, &s, &token)?;
                    Ok(1)
                }))
            }),
            _ => {
                let direct = case == "collect_complete";
                Arc::new(move |c: &mut Client, _: &mut u64| {
                    let s = match c.sessions.pop() {
                        Some(s) => s,
                        None => match open_session(c, &api) {
                            Ok(s) => {
                                c.tally.sessions_inline += 1;
                                s
                            }
                            Err(e) => return Some(timed(|| Err(e))),
                        },
                    };
                    let body =
                        submission(&s, &test_pan(fresh.fetch_add(1, Ordering::Relaxed)), direct);
                    Some(timed(|| {
                        if direct {
                            complete_direct(c, &api, &s, &body)?;
                        } else {
                            submit(c, &edge, &s, &body)?;
                        }
                        Ok(1)
                    }))
                })
            }
        };
        return it;
    }
    if FORWARD_CASES.contains(&case) {
        let direct = case == "acquirer_direct";
        let url = if direct {
            format!("{}{UPSTREAM_PATH}", t.acquirer.clone().unwrap_or_default())
        } else {
            format!("{}/v1/forward/{UPSTREAM}{UPSTREAM_PATH}", t.reveal)
        };
        let sample = sample.clone();
        return Arc::new(move |c: &mut Client, rng: &mut u64| {
            let (i, token) = sample.pick(rng)?;
            // The same small JSON either way: a placeholder for the vault,
            // the card itself for the acquirer.
            let number = if direct {
                test_pan(i)
            } else {
                format!("{{{{{token}.pan}}}}")
            };
            let body =
                json!({"card": {"number": number}, "amount": 1000, "currency": "EUR"}).to_string();
            Some(timed(|| {
                let (agent, auth) = if direct {
                    (&c.acquirer_agent, None)
                } else {
                    (&c.agent, c.forward_auth.as_deref())
                };
                let answer = send(agent, "POST", &url, auth, &[], Some(&body))?;
                if answer.contains("approved") {
                    Ok(1)
                } else {
                    Err("not the acquirer's answer".to_owned())
                }
            }))
        });
    }
    let case_name = case.to_owned();
    let sample = sample.clone();
    let tenants = sample.tenants();
    let next = move |rng: &mut u64| -> Option<Step> {
        let (api, reveal) = (&t.api, &t.reveal);
        let pick = |rng: &mut u64| sample.pick(rng);
        // A new card for a uniformly random tenant.
        let new_card = |rng: &mut u64| {
            let i = fresh.fetch_add(1, Ordering::Relaxed);
            let tenant = tenant_name(next_random(rng) % tenants, tenants);
            json!({"tenant": tenant, "pan": test_pan(i), "exp_month": 12, "exp_year": 2035})
                .to_string()
        };
        match case_name.as_str() {
            "baseline" => Some(("GET", api.clone(), "/v1/ping", None, 0)),
            "tokenize_new" => Some(("POST", api.clone(), "/v1/tokens", Some(new_card(rng)), 1)),
            "tokenize_repeat" => {
                // The card's own tenant (else it would be a new card there).
                let (i, _) = pick(rng)?;
                let tenant = tenant_name(i % tenants, tenants);
                let body = json!({"tenant": tenant, "pan": test_pan(i), "exp_month": 12, "exp_year": 2035});
                Some(("POST", api.clone(), "/v1/tokens", Some(body.to_string()), 1))
            }
            "detokenize" => {
                let (_, token) = pick(rng)?;
                let body = json!({"token": token, "reason": "benchmark"});
                Some((
                    "POST",
                    reveal.clone(),
                    "/v1/detokenize",
                    Some(body.to_string()),
                    1,
                ))
            }
            "batch100" => {
                let cards: Vec<Value> = (0..100)
                    .map(|_| {
                        let i = fresh.fetch_add(1, Ordering::Relaxed);
                        json!({"pan": test_pan(i), "exp_month": 12, "exp_year": 2035})
                    })
                    .collect();
                let tenant = tenant_name(next_random(rng) % tenants, tenants);
                let body = json!({"tenant": tenant, "cards": cards});
                Some((
                    "POST",
                    api.clone(),
                    "/v1/tokens/batch",
                    Some(body.to_string()),
                    100,
                ))
            }
            "mix" => {
                if (*rng).is_multiple_of(5) {
                    let (_, token) = pick(rng)?;
                    let body = json!({"token": token, "reason": "benchmark"});
                    Some((
                        "POST",
                        reveal.clone(),
                        "/v1/detokenize",
                        Some(body.to_string()),
                        1,
                    ))
                } else {
                    Some(("POST", api.clone(), "/v1/tokens", Some(new_card(rng)), 1))
                }
            }
            _ => None,
        }
    };
    Arc::new(move |c: &mut Client, rng: &mut u64| {
        let (method, base, path, body, cards) = next(rng)?;
        let url = format!("{base}{path}");
        Some(timed(|| {
            send(&c.agent, method, &url, Some(&c.auth), &[], body.as_deref()).map(|_| cards)
        }))
    })
}

/// A percentile of sorted latencies, in ms.
fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() as f64 * p).ceil() as usize).saturating_sub(1);
    f64::from(sorted_us[idx.min(sorted_us.len() - 1)]) / 1000.0
}

/// The comparisons printed after the table: (case, reference, what it
/// shows). Each at every client count both ran at.
const COMPARISONS: [(&str, &str, &str); 6] = [
    (
        "collect_submit",
        "tokenize_new",
        "the edge's whole cost over a direct tokenize",
    ),
    (
        "collect_complete",
        "tokenize_new",
        "the vault's session work (no edge)",
    ),
    ("collect_submit", "collect_complete", "the edge's own hop"),
    (
        "collect_flow",
        "tokenize_new",
        "a whole checkout (open, submit, confirm)",
    ),
    (
        "forward",
        "acquirer_direct",
        "the latency the vault adds over calling the acquirer directly",
    ),
    (
        "forward",
        "detokenize",
        "the proxying's cost over a detokenize (the same card read and audit event)",
    ),
];

fn load(
    args: &Args,
    service: &Service,
    edge: Option<&Edge>,
    acquirer: Option<&e2e::acquirer::Acquirer>,
    creds: &Creds,
    sample: Sample,
) -> Res<(Vec<Value>, Vec<Value>)> {
    let sample = Arc::new(sample);
    // The wrk driver: not when the api listener wants client certificates.
    let use_wrk = match args.driver.as_str() {
        "wrk" if creds.mtls_api => {
            println!(
                "(the api listener runs mutual TLS in this run: every case is driven by ureq)"
            );
            false
        }
        "wrk" if !wrk::available() => {
            return Err("--driver wrk: no wrk (apt-get install wrk), or --driver ureq".to_owned())
        }
        "wrk" => true,
        "ureq" => false,
        other => return Err(format!("--driver must be wrk or ureq, not {other}")),
    };
    let wrk_dir = tempfile::Builder::new()
        .prefix("cardvault-bench-wrk-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let wrk_tenants: Vec<String> = (0..sample.tenants())
        .map(|t| tenant_name(t, sample.tenants()))
        .collect();
    let wrk_sample: Vec<(u64, String, String)> = sample
        .by_tenant
        .iter()
        .enumerate()
        .flat_map(|(t, cards)| {
            let name = tenant_name(t as u64, sample.tenants());
            cards
                .iter()
                .map(move |(i, token)| (*i, name.clone(), token.clone()))
        })
        .collect();
    // New cards get indices far above the seeded ones, per case and thread.
    let fresh = Arc::new(AtomicU64::new(args.seed.max(args.tenants) + 1_000_000));
    let ticks = clock_ticks();
    let targets = Arc::new(Targets {
        api: format!("https://{}", service.api),
        reveal: format!("https://{}", service.reveal),
        edge: edge.map(|e| e.origin.clone()),
        acquirer: acquirer.map(e2e::acquirer::Acquirer::origin),
    });
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let mut baseline: std::collections::HashMap<usize, f64> = Default::default();
    // (case, clients) -> (req/s, p50, p99), for the sessions to open ahead
    // and the comparisons.
    let mut seen: std::collections::HashMap<(String, usize), (f64, f64, f64)> = Default::default();
    let mut out = Vec::new();
    println!(
        "\n{:<16} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>7} {:>9} {:>11} {:>11}",
        "case",
        "clients",
        "req/s",
        "cards/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "x base",
        "svc µs/req",
        "cli µs/req"
    );
    for named in &args.cases {
        // `case@SECONDS`: this case runs that long, at the largest client
        // count only (a soak run for memory growth: `detokenize@600`).
        let (case, seconds, counts) = match named.split_once('@') {
            Some((c, secs)) => (
                &c.to_owned(),
                secs.parse::<u64>()
                    .map_err(|_| format!("{named}: the seconds after @ are not a number"))?,
                vec![max_clients],
            ),
            None => (named, args.seconds, args.clients.clone()),
        };
        for &clients in &counts {
            let it = iteration(case, &targets, &sample, &fresh);
            // Sessions for the submissions of the timed part, opened
            // before it: twice what the rate of a submission case already
            // measured at this client count allows in warm-up and
            // measurement (else 1.3 times tokenize_new's: the same card
            // work without the session's); more are opened on the fly (and
            // counted).
            let ahead = match case.as_str() {
                "collect_submit" | "collect_complete" => {
                    let measured = ["collect_submit", "collect_complete"]
                        .iter()
                        .filter_map(|c| seen.get(&((*c).to_owned(), clients)))
                        .map(|r| r.0)
                        .reduce(f64::max);
                    let (rate, margin) = match measured {
                        // The other submission case may well be faster.
                        Some(r) => (r, 2.0),
                        None => seen
                            .get(&("tokenize_new".to_owned(), clients))
                            .map_or((1500.0, 1.3), |r| (r.0, 1.3)),
                    };
                    let total = rate * (1 + seconds.max(1)) as f64 * margin;
                    (total / clients.max(1) as f64).ceil() as usize + 4
                }
                _ => 0,
            };
            let sample_rss = clients == max_clients;
            let connections_before = acquirer.map(e2e::acquirer::Acquirer::connection_count);
            let by_wrk = use_wrk && wrk::CASES.contains(&case.as_str());
            let Driven {
                tallies,
                elapsed,
                rss,
                edge_rss,
                opening_secs,
                service_ticks,
                client_ticks,
                wrk: by_wrk_measured,
            } = if by_wrk {
                let auth = format!("Bearer {}", creds.key);
                let prepared = wrk::prepare(
                    case,
                    clients,
                    &wrk::Target {
                        api: &targets.api,
                        reveal: &targets.reveal,
                        auth: &auth,
                        tenants: &wrk_tenants,
                    },
                    &wrk_sample,
                    fresh_span(&fresh)?,
                    wrk_dir.path(),
                )?;
                drive_wrk(&prepared, seconds, service, sample_rss)?
            } else {
                drive(
                    clients, seconds, creds, it, service, edge, sample_rss, ahead,
                )?
            };
            // What the acquirer saw (warm-up included), then forgotten: it
            // keeps every request in memory.
            let at_acquirer = acquirer.map(|a| {
                let seen = (
                    a.request_count(),
                    a.connection_count() - connections_before.unwrap_or(0),
                );
                a.clear();
                seen
            });
            let latencies: Vec<u32> = {
                let mut all: Vec<u32> = tallies
                    .iter()
                    .flat_map(|t| t.latencies_us.iter().copied())
                    .collect();
                all.sort_unstable();
                all
            };
            let sum = |f: fn(&Tally) -> u64| -> u64 { tallies.iter().map(f).sum() };
            let (requests, errors, cards) = match &by_wrk_measured {
                // One card per request but for the baseline.
                Some(m) => (
                    m.requests as f64,
                    m.errors,
                    if case == "baseline" {
                        0
                    } else {
                        m.requests.saturating_sub(m.errors)
                    },
                ),
                None => (latencies.len() as f64, sum(|t| t.errors), sum(|t| t.cards)),
            };
            let rps = (requests - errors as f64).max(0.0) / elapsed.max(1e-9);
            let pct = |p: f64| match &by_wrk_measured {
                Some(m) if p <= 0.5 => m.p50_ms,
                Some(m) if p <= 0.99 => m.p99_ms,
                Some(m) => m.p999_ms,
                None => percentile(&latencies, p),
            };
            if case == "baseline" {
                baseline.insert(clients, rps);
            }
            seen.insert((case.clone(), clients), (rps, pct(0.50), pct(0.99)));
            let ratio = baseline.get(&clients).map(|b| rps / b.max(1e-9));
            // CPU time over the measured interval per request measured
            // (errors included: they took CPU too).
            let per_request = |t: Option<u64>| {
                t.map(|t| t as f64 / ticks * 1e6 / (requests + errors as f64).max(1.0))
            };
            let (service_us, client_us) = (per_request(service_ticks), per_request(client_ticks));
            let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            println!(
                "{:<16} {:>7} {:>10.0} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>9} {:>11} {:>11}",
                case,
                clients,
                rps,
                cards as f64 / elapsed,
                pct(0.50),
                pct(0.99),
                pct(0.999),
                errors,
                ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
                us(service_us),
                us(client_us),
            );
            let first_error = tallies.iter().find_map(|t| t.first_error.clone());
            let mut row = json!({
                "case": case,
                "clients": clients,
                "requests_per_second": rps,
                "cards_per_second": cards as f64 / elapsed,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "p999_ms": pct(0.999),
                "errors": errors,
                "first_error": first_error,
                "ratio_to_baseline": ratio,
                "service_cpu_us_per_request": service_us,
                "client_cpu_us_per_request": client_us,
                "service_rss_mib": rss.map(|r| r.max),
                "service_rss_start_mib": rss.map(|r| r.start),
                "service_rss_end_mib": rss.map(|r| r.end),
            });
            if let Some(e) = &first_error {
                println!("{:<16} first error: {e}", "");
            }
            if let Some((requests, connections)) =
                at_acquirer.filter(|_| FORWARD_CASES.contains(&case.as_str()))
            {
                row["acquirer_requests"] = json!(requests);
                row["acquirer_connections"] = json!(connections);
                println!(
                    "{:<16} the acquirer received {requests} requests on {connections} new connections (warm-up included)",
                    ""
                );
            }
            if is_collect(case) {
                let (ahead_n, ahead_err, inline) = (
                    sum(|t| t.sessions_ahead),
                    sum(|t| t.session_errors),
                    sum(|t| t.sessions_inline),
                );
                row["edge_rss_mib"] = json!(edge_rss);
                if ahead > 0 {
                    row["sessions_opened_ahead"] = json!(ahead_n);
                    row["sessions_failed_ahead"] = json!(ahead_err);
                    row["sessions_opened_inline"] = json!(inline);
                    row["sessions_opened_ahead_per_second"] =
                        json!(ahead_n as f64 / opening_secs.max(1e-9));
                    println!(
                        "{:<16} sessions opened before the timed part: {ahead_n} ({ahead_err} failed) \
                         in {opening_secs:.1} s ({:.0}/s, {clients} clients); opened during it (ran out): {inline}",
                        "",
                        ahead_n as f64 / opening_secs.max(1e-9)
                    );
                }
                if case == "collect_flow" {
                    row["flows_per_second"] = json!(rps);
                }
            }
            out.push(row);
            if let Some(r) = rss {
                println!(
                    "{:<16} service resident size: {:.1} MiB after warm-up, {:.1} MiB at the end, {:.1} MiB at most",
                    "", r.start, r.end, r.max
                );
            }
            if let Some(rss) = edge_rss.filter(|_| is_collect(case)) {
                println!("{:<16} edge resident size during the run: {rss:.0} MiB", "");
            }
        }
    }
    if args.cases.iter().any(|c| c == "collect_flow") {
        println!("\ncollect_flow: req/s are flows/s (3 requests each: open, submit through the edge, confirm)");
    }
    let mut comparisons = Vec::new();
    for (case, reference, what) in COMPARISONS {
        let rows: Vec<_> = args
            .clients
            .iter()
            .filter_map(|&n| {
                let a = seen.get(&(case.to_owned(), n))?;
                let b = seen.get(&(reference.to_owned(), n))?;
                Some((
                    n,
                    a.1 / b.1.max(1e-9),
                    a.2 / b.2.max(1e-9),
                    a.0 / b.0.max(1e-9),
                    a.1 - b.1,
                    a.2 - b.2,
                ))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        println!("\n{case} / {reference}: {what}");
        println!(
            "{:>7} {:>9} {:>9} {:>12} {:>10} {:>10}",
            "clients", "p50 x", "p99 x", "req/s x", "p50 +ms", "p99 +ms"
        );
        for (n, p50, p99, rps, p50_added, p99_added) in rows {
            println!(
                "{n:>7} {p50:>9.2} {p99:>9.2} {rps:>12.2} {p50_added:>10.2} {p99_added:>10.2}"
            );
            comparisons.push(json!({
                "case": case,
                "reference": reference,
                "clients": n,
                "p50_ratio": p50,
                "p99_ratio": p99,
                "throughput_ratio": rps,
                "p50_added_ms": p50_added,
                "p99_added_ms": p99_added,
            }));
        }
    }
    Ok((out, comparisons))
}

/// The service's resident size over a measured interval, in MiB: at the
/// first sample after warm-up, at the end, and the most seen.
#[derive(Debug, Clone, Copy)]
struct Rss {
    start: f64,
    end: f64,
    max: f64,
}

impl Rss {
    fn first(now: f64) -> Rss {
        Rss {
            start: now,
            end: now,
            max: now,
        }
    }

    fn add(self, now: f64) -> Rss {
        Rss {
            end: now,
            max: self.max.max(now),
            ..self
        }
    }
}

/// What one run of a case at one client count gave.
struct Driven {
    tallies: Vec<Tally>,
    /// The measured interval, seconds.
    elapsed: f64,
    rss: Option<Rss>,
    edge_rss: Option<f64>,
    opening_secs: f64,
    /// CPU time (clock ticks) over the measured interval: the service
    /// process, and this process (all client threads; the test acquirer
    /// too in the forward cases).
    service_ticks: Option<u64>,
    client_ticks: Option<u64>,
    /// wrk's figures (the wrk driver; `tallies` is then empty).
    wrk: Option<wrk::Measured>,
}

/// The first of [`wrk::SPAN`] new card numbers for one wrk case: card
/// numbers have nine digits of index, so the runs of one benchmark share a
/// billion.
fn fresh_span(fresh: &AtomicU64) -> Res<u64> {
    let first = fresh.fetch_add(wrk::SPAN, Ordering::Relaxed);
    if first + wrk::SPAN > 1_000_000_000 {
        return Err(
            "too many new-card runs in one benchmark for the nine digits of a test card's index"
                .to_owned(),
        );
    }
    Ok(first)
}

/// [`drive`] by wrk: a warm-up run of one second, then the measured one,
/// with the service's CPU time and resident size around it.
fn drive_wrk(
    prepared: &wrk::Prepared,
    seconds: u64,
    service: &Service,
    sample_rss: bool,
) -> Res<Driven> {
    prepared.run(1, 0)?;
    let pid = service.proc.child.id().to_string();
    // The client is wrk: its CPU time is counted once it has ended.
    let (service_from, client_from) = (cpu_ticks(&pid), children_cpu_ticks());
    let stop = AtomicBool::new(false);
    let (measured, rss) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut rss: Option<Rss> = None;
            while !stop.load(Ordering::Relaxed) {
                if sample_rss {
                    let now = service.proc.rss_mib();
                    rss = Some(rss.map_or(Rss::first(now), |r| r.add(now)));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            rss
        });
        let measured = prepared.run(seconds, wrk::MEASURED_OFFSET);
        stop.store(true, Ordering::Relaxed);
        (measured, sampler.join().ok().flatten())
    });
    let measured = measured?;
    let (service_to, client_to) = (cpu_ticks(&pid), children_cpu_ticks());
    let spent = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
    Ok(Driven {
        tallies: Vec::new(),
        elapsed: measured.seconds,
        rss: sample_rss.then_some(rss).flatten(),
        edge_rss: None,
        opening_secs: 0.0,
        service_ticks: spent(service_from, service_to),
        client_ticks: spent(client_from, client_to),
        wrk: Some(measured),
    })
}

#[allow(clippy::too_many_arguments)]
fn drive(
    clients: usize,
    seconds: u64,
    creds: &Creds,
    it: Iteration,
    service: &Service,
    edge: Option<&Edge>,
    sample_rss: bool,
    sessions_ahead: usize,
) -> Res<Driven> {
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(seconds.max(1));
    let stop = Arc::new(AtomicBool::new(false));
    // Every client has opened its sessions (if any) before the clock starts.
    let ready = Arc::new(std::sync::Barrier::new(clients + 1));
    let agent = |tls: &Arc<rustls::ClientConfig>| {
        ureq::AgentBuilder::new()
            .tls_config(tls.clone())
            .timeout(Duration::from_secs(30))
            .max_idle_connections_per_host(1)
            .build()
    };
    let api = format!("https://{}", service.api);
    let opening = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|n| {
            let mut client = Client {
                agent: agent(&creds.tls),
                auth: format!("Bearer {}", creds.key),
                collect_agent: agent(&creds.collect_tls),
                collect_auth: creds.collect_key.as_ref().map(|k| format!("Bearer {k}")),
                forward_auth: creds.forward_key.as_ref().map(|k| format!("Bearer {k}")),
                acquirer_agent: agent(creds.acquirer_tls.as_ref().unwrap_or(&creds.tls)),
                sessions: Vec::new(),
                tally: Tally::default(),
            };
            let (it, stop, ready, api) = (it.clone(), stop.clone(), ready.clone(), api.clone());
            std::thread::spawn(move || {
                for _ in 0..sessions_ahead {
                    match open_session(&client, &api) {
                        Ok(s) => {
                            client.sessions.push(s);
                            client.tally.sessions_ahead += 1;
                        }
                        Err(e) => {
                            client.tally.session_errors += 1;
                            client.tally.first_error.get_or_insert(e);
                        }
                    }
                }
                ready.wait();
                let measuring_from = Instant::now() + warmup;
                let mut rng =
                    0x9E37_79B9_7F4A_7C15u64 ^ (n as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
                while !stop.load(Ordering::Relaxed) {
                    let Some(outcome) = it(&mut client, &mut rng) else {
                        break;
                    };
                    if outcome.start < measuring_from {
                        continue;
                    }
                    match outcome.result {
                        Ok(cards) => {
                            client.tally.latencies_us.push(
                                u32::try_from(outcome.elapsed.as_micros()).unwrap_or(u32::MAX),
                            );
                            client.tally.cards += cards;
                        }
                        Err(e) => client.tally.error(e),
                    }
                }
                client.tally
            })
        })
        .collect();
    ready.wait();
    let opening_secs = opening.elapsed().as_secs_f64();
    let start = Instant::now();
    let pid = service.proc.child.id().to_string();
    let sample = |rss: Option<Rss>, edge_rss: Option<f64>| {
        let now = service.proc.rss_mib();
        let rss = Some(rss.map_or(Rss::first(now), |r| r.add(now)));
        let edge_rss = edge.map(|e| edge_rss.unwrap_or(0.0_f64).max(e.proc.rss_mib()));
        (rss, edge_rss)
    };
    std::thread::sleep(warmup);
    // The measured interval starts here: CPU times, the first sample.
    let (service_from, client_from) = (cpu_ticks(&pid), cpu_ticks("self"));
    let (mut rss, mut edge_rss) = if sample_rss {
        sample(None, None)
    } else {
        (None, None)
    };
    let end = start + warmup + measure;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(250)));
        if sample_rss {
            (rss, edge_rss) = sample(rss, edge_rss);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (service_to, client_to) = (cpu_ticks(&pid), cpu_ticks("self"));
    let elapsed = (start.elapsed() - warmup).as_secs_f64();
    let tallies = handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "a client thread panicked".to_owned()))
        .collect::<Res<Vec<_>>>()?;
    let spent = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
    Ok(Driven {
        tallies,
        elapsed,
        rss,
        edge_rss,
        opening_secs,
        service_ticks: spent(service_from, service_to),
        client_ticks: spent(client_from, client_to),
        wrk: None,
    })
}
