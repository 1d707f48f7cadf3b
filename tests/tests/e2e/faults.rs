//! Fault injection under load: writer threads keep tokenizing new cards (in
//! tenants of their own, single calls and batches) while the service is
//! SIGKILLed and restarted on the same port, or while the file system under
//! its SQLite database fills up and frees again. Afterwards every token
//! whose tokenize was acknowledged (2xx received) gives its card back,
//! every stored row is whole (detokenizes, has its audit event), and an
//! unacknowledged write is either wholly there or wholly absent.
//!
//! PostgreSQL killed and restarted under load is `outage.rs` (four single
//! writers, 503 `storage_unavailable` while it is down, bounded failures,
//! recovery without a restart, every acknowledged token stored, audited and
//! detokenized afterwards). Added here: the same crash twice under this
//! workload (with batches), then the checks above (atomic batches, every
//! stored row whole, no orphan audit event).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use e2e::{free_port, fresh_pan, Client, Options, PgCluster, Resp, Service};
use serde_json::Value;

use crate::{card, exp_year, expect_status, REASON};

const WRITERS: usize = 4;
const BATCH: usize = 8;

/// What one write request of the workload ended in.
#[derive(Debug, Clone)]
enum Outcome {
    /// 2xx with a token per card.
    Acknowledged(Vec<String>),
    /// 503 `storage_unavailable`.
    Unavailable,
    /// No answer: the connection failed (the service was killed).
    NoAnswer,
    /// Anything else: never acceptable.
    Other(String),
}

/// One write request: its tenant, its cards, what came back.
#[derive(Debug, Clone)]
struct Write {
    tenant: String,
    pans: Vec<String>,
    batch: bool,
    outcome: Outcome,
    at: Instant,
}

/// Writer threads: thread `i` tokenizes in tenant `<prefix>-<i>`; the last
/// one sends batches of [`BATCH`].
struct Workload {
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<Vec<Write>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workload {
    fn start(client: &Client, prefix: &str) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..WRITERS)
            .map(|i| {
                let (client, stop, writes) = (client.clone(), stop.clone(), writes.clone());
                let tenant = format!("{prefix}-{i}");
                let batch = i == WRITERS - 1;
                thread::spawn(move || writer(&client, &tenant, batch, &stop, &writes))
            })
            .collect();
        Workload {
            stop,
            writes,
            threads,
        }
    }

    fn acknowledged(&self) -> usize {
        self.writes
            .lock()
            .unwrap()
            .iter()
            .filter(|w| matches!(w.outcome, Outcome::Acknowledged(_)))
            .count()
    }

    /// Waits until `n` more writes than now were acknowledged.
    fn wait_for_acks(&self, n: usize, bound: Duration) {
        let target = self.acknowledged() + n;
        let started = Instant::now();
        while self.acknowledged() < target {
            assert!(
                started.elapsed() < bound,
                "the workload got {} of {n} acknowledgements within {bound:?}; last: {:?}",
                self.acknowledged() + n - target,
                self.writes.lock().unwrap().last()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> Vec<Write> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("a writer thread panicked");
        }
        let writes = self.writes.lock().unwrap().clone();
        writes
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn writer(client: &Client, tenant: &str, batch: bool, stop: &AtomicBool, out: &Mutex<Vec<Write>>) {
    let year = exp_year();
    while !stop.load(Ordering::SeqCst) {
        let n = if batch { BATCH } else { 1 };
        let pans: Vec<String> = (0..n).map(|_| fresh_pan()).collect();
        let at = Instant::now();
        let result = if batch {
            let cards: Vec<Value> = pans.iter().map(|p| card(p, 9, year)).collect();
            let body = serde_json::json!({"tenant": tenant, "cards": cards}).to_string();
            client.try_send_raw(
                "POST",
                "/v1/tokens/batch",
                Some("application/json"),
                body.as_bytes(),
            )
        } else {
            client.try_tokenize(tenant, &pans[0], 9, year)
        };
        let outcome = classify(&result, batch, n);
        let failed = !matches!(outcome, Outcome::Acknowledged(_));
        out.lock().unwrap().push(Write {
            tenant: tenant.to_string(),
            pans,
            batch,
            outcome,
            at,
        });
        if failed {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn classify(result: &Result<Resp, String>, batch: bool, n: usize) -> Outcome {
    match result {
        Ok(r) if (200..300).contains(&r.status) => {
            let tokens: Vec<String> = if batch {
                r.json["results"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x["token"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                r.json["token"]
                    .as_str()
                    .map(str::to_string)
                    .into_iter()
                    .collect()
            };
            if tokens.len() == n {
                Outcome::Acknowledged(tokens)
            } else {
                Outcome::Other(format!("2xx without a token per card: {r}"))
            }
        }
        Ok(r) if r.status == 503 && r.error_code() == Some("storage_unavailable") => {
            Outcome::Unavailable
        }
        Ok(r) => Outcome::Other(r.to_string()),
        Err(_) => Outcome::NoAnswer,
    }
}

/// What the checks after a fault found.
#[derive(Debug, Default)]
struct Verified {
    /// Acknowledged tokens that detokenized to their card.
    tokens: usize,
    /// Unacknowledged cards found stored after all (retry answered 200).
    stored_unacknowledged: usize,
    /// Unacknowledged cards found absent (retry answered 201).
    absent_unacknowledged: usize,
    /// Rows in `cards`, all of them detokenized.
    rows: i64,
}

/// Every acknowledged token gives its card back; every unacknowledged
/// write is wholly stored or wholly absent (a batch: all its cards alike);
/// every row of `cards` is whole (has its tokenize audit event and
/// detokenizes) and no tokenize event names a token without a row.
fn verify(svc: &Service, client: &Client, writes: &[Write]) -> Verified {
    let mut v = Verified::default();
    let year = exp_year();
    let mut lost = Vec::new();
    for w in writes {
        if let Outcome::Acknowledged(tokens) = &w.outcome {
            for (token, pan) in tokens.iter().zip(&w.pans) {
                let clear = client.detokenize(token, REASON);
                if clear.status == 200 && clear.json["pan"] == pan.as_str() {
                    v.tokens += 1;
                } else {
                    lost.push(format!("{token}: HTTP {}", clear.status));
                }
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged token(s) lost:\n{}",
        lost.len(),
        lost.join("\n")
    );

    // Rows, before the retries below add any.
    let orphan_rows = svc.sql_i64(
        "SELECT COUNT(*) FROM cards c WHERE NOT EXISTS (SELECT 1 FROM audit_events a \
         WHERE a.action = 'tokenize' AND a.token = c.token)",
    );
    let orphan_events = svc.sql_i64(
        "SELECT COUNT(DISTINCT a.token) FROM audit_events a WHERE a.action = 'tokenize' \
         AND a.token IS NOT NULL AND NOT EXISTS (SELECT 1 FROM cards c WHERE c.token = a.token)",
    );
    assert_eq!(orphan_rows, 0, "stored cards without their audit event");
    assert_eq!(
        orphan_events, 0,
        "tokenize events naming a token with no card"
    );
    let tokens = svc.sql_strings("SELECT token FROM cards");
    v.rows = tokens.len() as i64;
    let acknowledged_cards: usize = writes
        .iter()
        .filter(|w| matches!(w.outcome, Outcome::Acknowledged(_)))
        .map(|w| w.pans.len())
        .sum();
    let attempted_cards: usize = writes.iter().map(|w| w.pans.len()).sum();
    assert!(
        (acknowledged_cards..=attempted_cards).contains(&tokens.len()),
        "{} rows in cards: acknowledged {acknowledged_cards}, attempted {attempted_cards}",
        tokens.len()
    );
    for token in &tokens {
        let clear = client.detokenize(token, REASON);
        assert_eq!(clear.status, 200, "a stored row does not open: {clear}");
    }

    // Unacknowledged writes: all there or all absent, never part.
    for w in writes {
        if matches!(w.outcome, Outcome::Acknowledged(_)) {
            continue;
        }
        let created: Vec<bool> = if w.batch {
            let cards: Vec<Value> = w.pans.iter().map(|p| card(p, 9, year)).collect();
            let r = client.batch(&w.tenant, &cards);
            expect_status(&r, 200);
            r.json["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    x["created"]
                        .as_bool()
                        .unwrap_or_else(|| panic!("batch result without `created`: {x}"))
                })
                .collect()
        } else {
            let r = client.tokenize(&w.tenant, &w.pans[0], 9, year);
            assert!(r.status == 200 || r.status == 201, "{r}");
            vec![r.status == 201]
        };
        assert!(
            created.iter().all(|c| *c == created[0]),
            "an unacknowledged batch was stored in part: {created:?} ({:?})",
            w.outcome
        );
        if created[0] {
            v.absent_unacknowledged += w.pans.len();
        } else {
            v.stored_unacknowledged += w.pans.len();
        }
    }
    v
}

fn outcomes(writes: &[Write]) -> (usize, usize, usize, Vec<String>) {
    let mut acked = 0;
    let mut unavailable = 0;
    let mut no_answer = 0;
    let mut other = Vec::new();
    for w in writes {
        match &w.outcome {
            Outcome::Acknowledged(_) => acked += 1,
            Outcome::Unavailable => unavailable += 1,
            Outcome::NoAnswer => no_answer += 1,
            Outcome::Other(what) => other.push(what.clone()),
        }
    }
    (acked, unavailable, no_answer, other)
}

/// SIGKILL in the middle of the write workload, three times, each followed
/// by a restart on the same port.
#[test]
fn sigkill_under_write_load_loses_no_acknowledged_token() {
    const KILLS: usize = 3;
    let port = free_port();
    let mut svc = Service::start_with(Options {
        listen: format!("127.0.0.1:{port}"),
        log_level: "info".into(),
        ..Options::default()
    });
    let key = svc.create_principal("writer", &["tokenize", "detokenize"], &["*"]);
    let client = svc.client(&key);
    let addr = svc.addr().to_string();
    let mut all = Vec::new();
    let mut in_flight_at_kill = 0;
    for round in 0..KILLS {
        let load = Workload::start(&client, &format!("kill{round}"));
        load.wait_for_acks(40, Duration::from_secs(60));
        // Kill at a moment that differs from round to round.
        thread::sleep(Duration::from_millis(150 + 170 * round as u64));
        let killed_at = Instant::now();
        svc.kill();
        // The writers see the dead service for a moment.
        thread::sleep(Duration::from_millis(200));
        let writes = load.finish();
        in_flight_at_kill += writes
            .iter()
            .filter(|w| w.at < killed_at && matches!(w.outcome, Outcome::NoAnswer))
            .count();
        let (_, _, _, other) = outcomes(&writes);
        assert!(
            other.is_empty(),
            "unexpected answers:\n{}",
            other.join("\n")
        );
        all.extend(writes);
        svc.restart();
        assert_eq!(svc.addr(), addr, "the restart moved to another port");
        expect_status(&svc.anonymous().get("/readyz"), 200);
    }
    let (acked, _, no_answer, _) = outcomes(&all);
    let v = verify(&svc, &client, &all);
    crate::report(&format!(
        "faults sigkill ({}): kills={KILLS} writers={WRITERS} (1 batching {BATCH}) \
         | writes acknowledged={acked} unanswered={no_answer} (in flight at the kill: {in_flight_at_kill}) \
         | tokens verified={} rows={} | unacknowledged: stored={} absent={} partial=0",
        svc.backend().name(),
        v.tokens,
        v.rows,
        v.stored_unacknowledged,
        v.absent_unacknowledged,
    ));
    assert!(in_flight_at_kill > 0, "no request was in flight at a kill");
}

/// PostgreSQL crashes (`pg_ctl stop -m immediate`) twice under the write
/// workload and comes back; the service is never restarted. Always on
/// PostgreSQL (a throwaway cluster), whatever `CARDVAULT_TEST_BACKEND` says.
#[test]
fn postgres_crashes_under_write_load_lose_nothing_and_write_nothing_in_part() {
    const CRASHES: usize = 2;
    let cluster = PgCluster::start();
    let (_config, config_args) = e2e::config_file("db_timeout_ms = 1000\n");
    let mut svc = Service::start_with(Options {
        database_url: Some(cluster.url()),
        extra_args: config_args,
        log_level: "info".into(),
        ..Options::default()
    });
    let key = svc.create_principal("writer", &["tokenize", "detokenize"], &["*"]);
    let client = svc.client(&key);
    let probe = svc.anonymous();
    let load = Workload::start(&client, "pgcrash");
    let mut down_total = Duration::ZERO;
    for _ in 0..CRASHES {
        load.wait_for_acks(30, Duration::from_secs(60));
        let down = Instant::now();
        cluster.stop_immediate();
        thread::sleep(Duration::from_secs(2));
        let during = load.writes.lock().unwrap().len();
        thread::sleep(Duration::from_secs(1));
        assert!(
            load.writes.lock().unwrap().len() > during,
            "no request answered while the database was down"
        );
        cluster.start_again();
        down_total += down.elapsed();
        load.wait_for_acks(30, Duration::from_secs(60));
        assert!(svc.is_running(), "the service died with its database");
    }
    let writes = load.finish();
    expect_status(&probe.get("/readyz"), 200);
    let (acked, unavailable, no_answer, other) = outcomes(&writes);
    assert!(
        other.is_empty() && no_answer == 0,
        "answers other than 2xx and 503 storage_unavailable ({no_answer} unanswered):\n{}",
        other.join("\n")
    );
    assert!(unavailable > 0, "no 503 while the database was down");
    let v = verify(&svc, &client, &writes);
    crate::report(&format!(
        "faults postgres-crash: crashes={CRASHES} down_ms={} writers={WRITERS} (1 batching {BATCH}) \
         | writes acknowledged={acked} 503={unavailable} other=0 | tokens verified={} rows={} \
         | unacknowledged: stored={} absent={} partial=0",
        down_total.as_millis(),
        v.tokens,
        v.rows,
        v.stored_unacknowledged,
        v.absent_unacknowledged,
    ));
}

/// A tmpfs of its own, unmounted on drop (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("cardvault-e2e-tmpfs-")
            .tempdir()
            .unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (as root, or with CAP_SYS_ADMIN): \
             `mount -t tmpfs -o size={size} tmpfs {}` failed ({}): {}",
            dir.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success())
            || Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("e2e: could not unmount {}", self.dir.path().display());
        }
    }
}

/// Writes `path` until the file system is full (ENOSPC); returns its size.
fn fill(path: &PathBuf) -> u64 {
    let mut file = fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial pages too.
    while let Ok(n) = file.write(&chunk[..512]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = file.sync_all();
    written
}

/// The SQLite database's file system fills up under load: writes fail with
/// 503 `storage_unavailable` (never a 500, never a token that was not
/// stored), the process stays up, and once space is freed it recovers by
/// itself with nothing acknowledged lost (also after a restart). Always on
/// SQLite, whatever `CARDVAULT_TEST_BACKEND` says.
#[test]
fn sqlite_disk_full_under_load_fails_clean_and_recovers() {
    let fs_ = Tmpfs::mount("24m");
    let data_dir = fs_.path().to_path_buf();
    let port = free_port();
    let mut svc = Service::start_in_dir(
        &data_dir,
        Options {
            listen: format!("127.0.0.1:{port}"),
            log_level: "info".into(),
            database_url: Some(format!(
                "sqlite://{}",
                data_dir.join("cardvault.db").display()
            )),
            ..Options::default()
        },
    );
    let key = svc.create_principal("writer", &["tokenize", "detokenize"], &["*"]);
    let client = svc.client(&key);
    let probe = svc.anonymous();
    let year = exp_year();
    let early_pan = fresh_pan();
    let early = crate::token_for(&client, "early", &early_pan);

    let load = Workload::start(&client, "full");
    load.wait_for_acks(60, Duration::from_secs(60));

    // The disk fills up.
    let filler = data_dir.join("filler.bin");
    let filled_at = Instant::now();
    let filler_bytes = fill(&filler);
    let first_503 = loop {
        let seen = load
            .writes
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.at >= filled_at && matches!(w.outcome, Outcome::Unavailable))
            .map(|w| w.at)
            .min();
        if let Some(at) = seen {
            break at;
        }
        assert!(
            filled_at.elapsed() < Duration::from_secs(90),
            "no 503 within 90 s of the disk filling up ({} acknowledged since)",
            load.writes
                .lock()
                .unwrap()
                .iter()
                .filter(|w| w.at >= filled_at && matches!(w.outcome, Outcome::Acknowledged(_)))
                .count()
        );
        assert!(svc.is_running(), "the service died when its disk filled up");
        thread::sleep(Duration::from_millis(50));
    };
    // A while with the disk full: reads and probes.
    thread::sleep(Duration::from_millis(1500));
    let read = client.detokenize(&early, REASON);
    assert!(
        (read.status == 200 && read.json["pan"] == early_pan.as_str())
            || (read.status == 503 && read.error_code() == Some("storage_unavailable")),
        "detokenize with the disk full: {read}"
    );
    let meta = client.metadata(&early);
    assert!(
        meta.status == 200
            || (meta.status == 503 && meta.error_code() == Some("storage_unavailable")),
        "metadata with the disk full: {meta}"
    );
    let one = client.tokenize("full-single", &fresh_pan(), 9, year);
    assert!(
        (one.status == 503 && one.error_code() == Some("storage_unavailable")) || one.status == 201,
        "tokenize with the disk full: {one}"
    );
    expect_status(&probe.get("/healthz"), 200);
    // Readiness says why: the database answers but cannot commit.
    let ready = probe.get("/readyz");
    let ready_full = ready.status;
    assert_eq!(ready_full, 503, "/readyz with the disk full: {ready}");
    assert_eq!(ready.error_code(), Some("storage_read_only"), "{ready}");
    assert!(svc.is_running(), "the service died with its disk full");

    // Space comes back.
    fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();
    let recovered_after = loop {
        let first = load
            .writes
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.at >= freed_at && matches!(w.outcome, Outcome::Acknowledged(_)))
            .map(|w| w.at - freed_at)
            .min();
        if let Some(after) = first {
            break after;
        }
        assert!(
            freed_at.elapsed() < Duration::from_secs(30),
            "no write succeeded within 30 s of the space coming back"
        );
        thread::sleep(Duration::from_millis(50));
    };
    load.wait_for_acks(20, Duration::from_secs(30));
    let writes = load.finish();
    // Ready again by itself (a refused write holds readiness back for 10 s).
    let ready_again = loop {
        let r = probe.get("/readyz");
        if r.status == 200 {
            break freed_at.elapsed();
        }
        assert!(
            freed_at.elapsed() < Duration::from_secs(45),
            "/readyz not 200 within 45 s of the space coming back: {r}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(svc.is_running(), "the service exited");

    let (acked, unavailable, no_answer, other) = outcomes(&writes);
    let acked_full = writes
        .iter()
        .filter(|w| {
            w.at >= first_503 && w.at < freed_at && matches!(w.outcome, Outcome::Acknowledged(_))
        })
        .count();
    assert!(
        other.is_empty() && no_answer == 0,
        "with the disk full, answers other than 2xx and 503 storage_unavailable:\n{}",
        other.join("\n")
    );
    assert!(unavailable > 0);
    let mut writes = writes;
    writes.push(Write {
        tenant: "early".into(),
        pans: vec![early_pan],
        batch: false,
        outcome: Outcome::Acknowledged(vec![early]),
        at: filled_at,
    });
    let v = verify(&svc, &client, &writes);
    let broken =
        svc.sql_i64("SELECT COUNT(*) FROM pragma_integrity_check WHERE integrity_check <> 'ok'");
    assert_eq!(broken, 0, "PRAGMA integrity_check after the disk was full");
    // And after a crash: nothing acknowledged lived only in memory.
    svc.kill();
    svc.restart();
    let again = verify(&svc, &client, &writes);
    crate::report(&format!(
        "faults disk-full (sqlite on a 24 MiB tmpfs): filler={} KiB | writes acknowledged={acked} \
         (during the full period after the first 503: {acked_full}) 503={unavailable} other=0 \
         | first_503_after_fill_ms={} recovered_after_free_ms={} readyz_while_full={ready_full} \
         readyz_200_after_free_ms={} \
         | tokens verified={} (again after SIGKILL+restart: {}) rows={} \
         | unacknowledged: stored={} absent={} partial=0",
        filler_bytes / 1024,
        (first_503 - filled_at).as_millis(),
        recovered_after.as_millis(),
        ready_again.as_millis(),
        v.tokens,
        again.tokens,
        v.rows,
        v.stored_unacknowledged,
        v.absent_unacknowledged,
    ));
}
