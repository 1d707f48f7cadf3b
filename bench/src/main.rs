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
//! at each client count, printing requests/s, cards/s, p50/p99/p99.9
//! latency, errors, and requests/s as a ratio to the baseline of the same
//! run (machines here are shared and noisy: compare ratios of one run). The
//! resident size of the service is sampled during the largest client count.
//! Everything is also written as JSON (`--json FILE`).
//!
//! Card numbers are generated from the test BIN 411111 with a valid Luhn
//! digit, as the project's test-card rules allow.
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
    /// Cards stored before the load starts (seeded in-process).
    #[arg(long, default_value_t = 1000)]
    seed: u64,
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
}

type Res<T> = Result<T, String>;

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("cardvault-bench: {e}");
        std::process::exit(1);
    }
}

/// A test-BIN (411111) card number with a correct Luhn digit, from `n`.
fn test_pan(n: u64) -> String {
    vault::pan::with_check_digit(&format!("411111{:09}", n % 1_000_000_000)).unwrap_or_default()
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
    std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1))
        .map_err(|e| format!("chown {}: {e}", path.display()))?;
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
    let result = bench(args, &tokenizer, &rt, &data, &url, owner);
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
    rt: &tokio::runtime::Runtime,
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
    run_cli(&["kek", "generate"])?;
    run_cli(&["migrate"])?;
    let pki = data.join("pki");
    let p = pki.display().to_string();
    cli(tokenizer, &["dev-pki", "--out", &p])?;
    let created = run_cli(&[
        "principal",
        "create",
        "--name",
        "bench",
        "--roles",
        "tokenize,detokenize",
        "--tenants",
        "*",
    ])?;
    let key = serde_json::from_str::<Value>(created.trim())
        .ok()
        .and_then(|v| v["api_key"].as_str().map(str::to_owned))
        .ok_or("principal create printed no key")?;

    // Seed through the vault's batch path, in this process.
    let started = Instant::now();
    let sample = rt.block_on(seed(url, &data.join("kek.key"), args.seed))?;
    let seed_secs = started.elapsed().as_secs_f64();
    println!(
        "seeded {} cards on {} in {seed_secs:.1} s ({:.0} cards/s)",
        args.seed,
        args.backend,
        args.seed as f64 / seed_secs.max(1e-9)
    );
    if let Some(owner) = owner {
        chown_tree(data, owner)?;
    }

    let mut service = Service::start(tokenizer, data, url, &pki, &args.serve_args)?;
    let ca = pki.join("ca.pem");
    let result = load(args, &service, &ca, &key, &sample);
    let log_lines = service.stop();
    let results = result?;
    println!("\nservice log lines: {log_lines}");
    if let Some(path) = &args.json {
        let doc = json!({
            "backend": args.backend,
            "seeded_cards": args.seed,
            "seed_cards_per_second": args.seed as f64 / seed_secs.max(1e-9),
            "seconds_per_case": args.seconds,
            "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

/// Seed `n` cards (tenant `bench`) with the batch path: 1000 per call, two
/// calls in flight. Returns a sample of (card index, token) for the
/// detokenize and repeat cases.
async fn seed(url: &str, kek_file: &Path, n: u64) -> Res<Vec<(u64, String)>> {
    let store: Arc<dyn Store> = store::open(&StoreConfig {
        url: url.to_owned(),
        migrate: true,
        op_timeout: Duration::from_secs(300),
        max_connections: 4,
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
    let per = MAX_BATCH as u64;
    // Keep at most ~100k tokens for the load.
    let keep_every = (n / 100_000).max(1);
    let mut sample = Vec::new();
    let mut next = 0;
    while next < n {
        let mut tasks = Vec::new();
        for _ in 0..2 {
            if next >= n {
                break;
            }
            let (from, to) = (next, (next + per).min(n));
            next = to;
            let (vault, ctx) = (vault.clone(), ctx.clone());
            tasks.push(tokio::spawn(async move {
                let cards = (from..to)
                    .map(|i| CardInput {
                        pan: Zeroizing::new(test_pan(i)),
                        exp_month: 12,
                        exp_year: 2035,
                        cardholder_name: None,
                        cvc: None,
                    })
                    .collect();
                let infos = vault
                    .tokenize_many(&ctx, "bench", cards)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(
                    infos
                        .into_iter()
                        .zip(from..to)
                        .filter(|(_, i)| i % keep_every == 0)
                        .filter_map(|(r, i)| r.ok().map(|info| (i, info.token)))
                        .collect::<Vec<_>>(),
                )
            }));
        }
        for t in tasks {
            sample.extend(t.await.map_err(|e| e.to_string())??);
        }
    }
    store.close().await;
    Ok(sample)
}

/// The running service: its process and listener addresses.
struct Service {
    child: Child,
    api: String,
    reveal: String,
    log_lines: Arc<AtomicU64>,
}

impl Service {
    fn start(bin: &Path, data: &Path, url: &str, pki: &Path, extra: &[String]) -> Res<Service> {
        let d = data.display().to_string();
        let cert = pki.join("server.pem").display().to_string();
        let key = pki.join("server.key").display().to_string();
        let mut child = tokenizer_command(bin)
            .args([
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
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the tokenizer: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let log_lines = Arc::new(AtomicU64::new(0));
        let counter = log_lines.clone();
        std::thread::spawn(move || {
            // Drain (and count) the log; the listening lines go to the
            // main thread.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                counter.fetch_add(1, Ordering::Relaxed);
                if line.contains("listening on ") {
                    let _ = tx.send(line);
                }
            }
        });
        let (mut api, mut reveal) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while api.is_none() || reveal.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .map_err(|_| "the tokenizer did not start listening")?;
            let addr = line
                .split("listening on ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned);
            if line.contains("(api,") {
                api = addr;
            } else if line.contains("(reveal,") {
                reveal = addr;
            }
        }
        Ok(Service {
            child,
            api: api.unwrap_or_default(),
            reveal: reveal.unwrap_or_default(),
            log_lines,
        })
    }

    /// Resident set size of the service now, in MiB.
    fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

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

fn tls_config(ca: &Path) -> Res<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    cards: u64,
}

/// One request of a case: (method, listener address, path, body, cards).
type Step = (&'static str, String, &'static str, Option<String>, u64);

fn load(
    args: &Args,
    service: &Service,
    ca: &Path,
    key: &str,
    sample: &[(u64, String)],
) -> Res<Vec<Value>> {
    let tls = tls_config(ca)?;
    let sample = Arc::new(sample.to_vec());
    // New cards get indices far above the seeded ones, per case and thread.
    let fresh = Arc::new(AtomicU64::new(args.seed + 1_000_000));
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let mut baseline: std::collections::HashMap<usize, f64> = Default::default();
    let mut out = Vec::new();
    println!(
        "\n{:<16} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "case", "clients", "req/s", "cards/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "x base"
    );
    for case in &args.cases {
        for &clients in &args.clients {
            let case_name = case.clone();
            let api = format!("https://{}", service.api);
            let reveal = format!("https://{}", service.reveal);
            let sample = sample.clone();
            let fresh = fresh.clone();
            let next = move |rng: &mut u64| -> Option<Step> {
                let pick = |rng: &mut u64| {
                    *rng ^= *rng << 13;
                    *rng ^= *rng >> 7;
                    *rng ^= *rng << 17;
                    sample
                        .get((*rng % sample.len().max(1) as u64) as usize)
                        .cloned()
                };
                let new_card = || {
                    let i = fresh.fetch_add(1, Ordering::Relaxed);
                    json!({"tenant": "bench", "pan": test_pan(i), "exp_month": 12, "exp_year": 2035})
                        .to_string()
                };
                match case_name.as_str() {
                    "baseline" => Some(("GET", api.clone(), "/v1/ping", None, 0)),
                    "tokenize_new" => {
                        Some(("POST", api.clone(), "/v1/tokens", Some(new_card()), 1))
                    }
                    "tokenize_repeat" => {
                        let (i, _) = pick(rng)?;
                        let body = json!({"tenant": "bench", "pan": test_pan(i), "exp_month": 12, "exp_year": 2035});
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
                        let body = json!({"tenant": "bench", "cards": cards});
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
                            Some(("POST", api.clone(), "/v1/tokens", Some(new_card()), 1))
                        }
                    }
                    _ => None,
                }
            };
            let next = Arc::new(next);
            let sample_rss = clients == max_clients;
            let (tallies, elapsed, rss) =
                drive(clients, args.seconds, &tls, key, next, service, sample_rss)?;
            let latencies: Vec<u32> = {
                let mut all: Vec<u32> = tallies
                    .iter()
                    .flat_map(|t| t.latencies_us.iter().copied())
                    .collect();
                all.sort_unstable();
                all
            };
            let requests = latencies.len() as f64;
            let errors: u64 = tallies.iter().map(|t| t.errors).sum();
            let cards: u64 = tallies.iter().map(|t| t.cards).sum();
            let rps = requests / elapsed;
            let pct = |p: f64| -> f64 {
                if latencies.is_empty() {
                    return 0.0;
                }
                let idx = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
                f64::from(latencies[idx.min(latencies.len() - 1)]) / 1000.0
            };
            if case == "baseline" {
                baseline.insert(clients, rps);
            }
            let ratio = baseline.get(&clients).map(|b| rps / b.max(1e-9));
            println!(
                "{:<16} {:>7} {:>10.0} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>9}",
                case,
                clients,
                rps,
                cards as f64 / elapsed,
                pct(0.50),
                pct(0.99),
                pct(0.999),
                errors,
                ratio.map_or("-".to_owned(), |r| format!("{r:.2}"))
            );
            out.push(json!({
                "case": case,
                "clients": clients,
                "requests_per_second": rps,
                "cards_per_second": cards as f64 / elapsed,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "p999_ms": pct(0.999),
                "errors": errors,
                "ratio_to_baseline": ratio,
                "service_rss_mib": rss,
            }));
            if let Some(rss) = rss {
                println!(
                    "{:<16} service resident size during the run: {rss:.0} MiB",
                    ""
                );
            }
        }
    }
    Ok(out)
}

#[allow(clippy::type_complexity)]
fn drive(
    clients: usize,
    seconds: u64,
    tls: &Arc<rustls::ClientConfig>,
    key: &str,
    next: Arc<dyn Fn(&mut u64) -> Option<Step> + Send + Sync>,
    service: &Service,
    sample_rss: bool,
) -> Res<(Vec<Tally>, f64, Option<f64>)> {
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(seconds.max(1));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let measuring_from = start + warmup;
    let handles: Vec<_> = (0..clients)
        .map(|n| {
            let agent = ureq::AgentBuilder::new()
                .tls_config(tls.clone())
                .timeout(Duration::from_secs(30))
                .max_idle_connections_per_host(1)
                .build();
            let auth = format!("Bearer {key}");
            let (next, stop) = (next.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                let mut rng =
                    0x9E37_79B9_7F4A_7C15u64 ^ (n as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
                while !stop.load(Ordering::Relaxed) {
                    let Some((method, base, path, body, cards)) = next(&mut rng) else {
                        break;
                    };
                    let req = agent
                        .request(method, &format!("{base}{path}"))
                        .set("Authorization", &auth);
                    let t = Instant::now();
                    let result = match body {
                        Some(b) => req.set("Content-Type", "application/json").send_string(&b),
                        None => req.call(),
                    };
                    let ok = match result {
                        Ok(r) => r.into_string().is_ok(),
                        Err(_) => false,
                    };
                    if t < measuring_from {
                        continue;
                    }
                    if ok {
                        tally
                            .latencies_us
                            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        tally.cards += cards;
                    } else {
                        tally.errors += 1;
                    }
                }
                tally
            })
        })
        .collect();
    let mut rss = None;
    while start.elapsed() < warmup + measure {
        std::thread::sleep(Duration::from_millis(250));
        if sample_rss && start.elapsed() > warmup {
            let now = service.rss_mib();
            rss = Some(rss.map_or(now, |r: f64| r.max(now)));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = (start.elapsed() - warmup).as_secs_f64();
    let tallies = handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "a client thread panicked".to_owned()))
        .collect::<Res<Vec<_>>>()?;
    Ok((tallies, elapsed, rss))
}
