//! Scheduled backups (`backup_dir`, `backup_interval_secs`, `backup_keep`)
//! and `tokenizer backup verify`.
//!
//! The restore drill: backups taken by the scheduler every second while
//! writers tokenize; a completed one is verified with the public key,
//! restored into a fresh database on the other backend (SQLite backup into
//! PostgreSQL and the reverse) with `tokenizer restore`, a service started
//! on it, and every token acknowledged before the backup began (its
//! header's time, taken before the snapshot) detokenizes to its card.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use e2e::{
    expect_refused_start, fresh_pan, give_to_service_user, run_cli_on, temp_data_dir,
    tokenizer_command, Backend, Captured, Options, PgDatabase, Service,
};
use serde_json::Value;

use crate::{exp_year, expect_status, report, REASON};

const TENANT: &str = "shop-backup";

/// A backup directory outside the data directory, the service's to write.
fn backup_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cardvault-e2e-backups-")
        .tempdir()
        .unwrap();
    give_to_service_user(dir.path());
    dir
}

fn scheduled(dir: &Path, interval: &str, keep: &str) -> Options {
    Options {
        extra_args: vec![
            "--backup-dir".into(),
            dir.display().to_string(),
            "--backup-interval-secs".into(),
            interval.into(),
            "--backup-keep".into(),
            keep.into(),
        ],
        ..Options::default()
    }
}

/// The complete scheduled backups in `dir`, oldest first.
/// The complete backups once pruning caught up with the newest (a run
/// renames its file into place before it prunes: for a moment there are
/// `keep + 1`).
fn settled(dir: &Path, keep: usize) -> Vec<PathBuf> {
    let start = Instant::now();
    loop {
        let files = complete(dir);
        if files.len() <= keep || start.elapsed() > Duration::from_secs(5) {
            return files;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn complete(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("cardvault-backup-") && name.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    files
}

/// The header's `created_at` (taken before the snapshot).
fn started_at(file: &Path) -> SystemTime {
    let text = fs::read_to_string(file).unwrap();
    let header: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let at = time::OffsetDateTime::parse(
        header["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(at.unix_timestamp_nanos()).unwrap())
}

fn verify(file: &Path, args: &[&str]) -> (i32, String) {
    let out = tokenizer_command()
        .args(["backup", "verify"])
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn metric(svc: &Service, name: &str) -> f64 {
    let scrape = svc.anonymous().get("/metrics");
    expect_status(&scrape, 200);
    scrape
        .text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

#[test]
fn restore_drill_scheduled_backup_restores_on_the_other_backend() {
    let backups = backup_dir();
    let svc = Service::start_with(scheduled(backups.path(), "1", "3"));
    let key = svc.create_principal("drill", &["tokenize", "detokenize"], &["*"]);
    let acked: Arc<Mutex<Vec<(String, String, SystemTime)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|_| {
            let client = svc.client(&key);
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let pan = fresh_pan();
                    let resp = client.tokenize(TENANT, &pan, 12, exp_year());
                    if resp.status == 201 || resp.status == 200 {
                        let token = resp.json["token"].as_str().unwrap().to_owned();
                        acked.lock().unwrap().push((token, pan, SystemTime::now()));
                    }
                }
            })
        })
        .collect();
    // Several scheduled backups while the writers run.
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    // One more scheduled run after the writers, then keep-N holds.
    std::thread::sleep(Duration::from_millis(2500));
    let files = settled(backups.path(), 3);
    assert_eq!(files.len(), 3, "backup_keep = 3: {files:?}");
    // A backup that began while the writers ran (the newest that did),
    // held by a hard link of the test's own: the scheduler keeps running
    // (one a second, keep 3) and may prune it while the test reads it.
    let last_ack = acked.iter().map(|a| a.2).max().unwrap();
    let held_dir = tempfile::tempdir().unwrap();
    give_to_service_user(held_dir.path());
    let mut file = None;
    for _ in 0..10 {
        let files = complete(backups.path());
        let Some(chosen) = files
            .iter()
            .rev()
            .find(|f| started_at(f) < last_ack)
            .or(files.first())
        else {
            continue;
        };
        let held = held_dir.path().join(chosen.file_name().unwrap());
        match fs::hard_link(chosen, &held) {
            Ok(()) => {
                file = Some(held);
                break;
            }
            // Pruned between the listing and the link: list again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot hold {}: {e}", chosen.display()),
        }
    }
    let file = file.expect("no backup could be held");
    let start = started_at(&file);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pubkey = svc.data_dir().join("audit-verify.pub");
    let (code, out) = verify(&file, &["--public-key", pubkey.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"status\":\"verified\""), "{out}");

    // Audit trail and metrics.
    let details = svc.sql_strings(
        "SELECT detail FROM audit_events WHERE action = 'backup_exported' AND outcome = 'success'",
    );
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        details.iter().any(|d| d.ends_with(&format!("file={name}"))
            && d.contains("cards=")
            && !d.contains('/')),
        "{details:?}"
    );
    let last = metric(&svc, "cardvault_backup_last_success_timestamp_seconds");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - last < 10.0, "last success {last}, now {now}");
    assert!(metric(&svc, "cardvault_backup_last_records") > 0.0);
    assert_eq!(metric(&svc, "cardvault_backup_failures_total"), 0.0);

    // Restore into a fresh database on the other backend.
    let target = temp_data_dir();
    fs::copy(
        svc.data_dir().join("kek.key"),
        target.path().join("kek.key"),
    )
    .unwrap();
    fs::set_permissions(
        target.path().join("kek.key"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    give_to_service_user(target.path());
    let (other, _db, url) = match svc.backend() {
        Backend::Sqlite => {
            let db = PgDatabase::create();
            let url = db.url().to_owned();
            (Backend::Postgres, Some(db), url)
        }
        Backend::Postgres => (
            Backend::Sqlite,
            None,
            format!("sqlite://{}", target.path().join("cardvault.db").display()),
        ),
    };
    let restore = run_cli_on(
        target.path(),
        Some(&url),
        &["restore", "--from", file.to_str().unwrap()],
        &Captured::default(),
    );
    assert!(restore.success(), "{}", restore.stderr);
    let restored = Service::start_in_dir(
        target.path(),
        Options {
            database_url: Some(url),
            ..Options::default()
        },
    );
    let client = restored.client(&key);
    let (mut before, mut after_present) = (0usize, 0usize);
    for (token, pan, at) in &acked {
        let resp = client.detokenize(token, REASON);
        if *at < start {
            expect_status(&resp, 200);
            assert_eq!(resp.json["pan"].as_str(), Some(pan.as_str()), "{token}");
            before += 1;
        } else if resp.status == 200 {
            after_present += 1;
        }
    }
    assert!(
        before > 0,
        "no token was acknowledged before the backup began"
    );
    report(&format!(
        "restore drill {} -> {}: backups={} acknowledged={} before_backup={} verified={} lost=0 acknowledged_after_start={} of which in the backup={}",
        svc.backend().name(),
        other.name(),
        files.len(),
        acked.len(),
        before,
        before,
        acked.len() - before,
        after_present
    ));
}

#[test]
fn backup_verify_good_tampered_wrong_key_and_unsigned() {
    let svc = Service::start();
    let client = svc.principal_client("verify", &["tokenize"], &["*"]);
    for _ in 0..3 {
        expect_status(&client.tokenize(TENANT, &fresh_pan(), 12, exp_year()), 201);
    }
    let dir = tempfile::tempdir().unwrap();
    give_to_service_user(dir.path());
    let good = dir.path().join("good.jsonl");
    let out = svc.cli(&["backup", "--out", good.to_str().unwrap()]);
    assert!(out.success(), "{}", out.stderr);
    let pubkey = svc.data_dir().join("audit-verify.pub");
    let key_arg = ["--public-key", pubkey.to_str().unwrap()];
    let (code, out) = verify(&good, &key_arg);
    assert_eq!(code, 0, "{out}");
    // The key line itself works as well as the file.
    let line = fs::read_to_string(&pubkey).unwrap();
    let line = line.lines().next().unwrap().to_owned();
    assert_eq!(verify(&good, &["--public-key", &line]).0, 0);

    // One byte changed inside a card record.
    let text = fs::read_to_string(&good).unwrap();
    let at = text.find("\"ciphertext\":\"").unwrap() + 20;
    let mut bytes = text.clone().into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    let tampered = dir.path().join("tampered.jsonl");
    fs::write(&tampered, &bytes).unwrap();
    let (code, out) = verify(&tampered, &key_arg);
    assert_eq!(code, 1, "{out}");
    // A changed signature.
    let sig_at = text.find("\"signature\":\"").unwrap() + 14;
    let mut bytes = text.clone().into_bytes();
    bytes[sig_at] = if bytes[sig_at] == b'0' { b'1' } else { b'0' };
    fs::write(&tampered, &bytes).unwrap();
    assert_eq!(verify(&tampered, &key_arg).0, 1);

    // Another vault's key.
    let other = Service::start();
    let other_key = other.data_dir().join("audit-verify.pub");
    let (code, out) = verify(&good, &["--public-key", other_key.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");

    // Unsigned (a backup from before signing): 1, or 0 when allowed.
    let (body, end) = text.trim_end().rsplit_once('\n').unwrap();
    let mut end: Value = serde_json::from_str(end).unwrap();
    end.as_object_mut().unwrap().remove("signature");
    end.as_object_mut().unwrap().remove("signing_key_id");
    let unsigned = dir.path().join("unsigned.jsonl");
    fs::write(&unsigned, format!("{body}\n{end}\n")).unwrap();
    let (code, out) = verify(&unsigned, &key_arg);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unsigned"), "{out}");
    assert_eq!(
        verify(&unsigned, &[key_arg[0], key_arg[1], "--allow-unsigned"]).0,
        0
    );

    // Usage and IO: exit 2.
    assert_eq!(verify(&dir.path().join("missing.jsonl"), &key_arg).0, 2);
    assert_eq!(verify(&good, &["--public-key", "not-a-key-or-file"]).0, 2);
    assert_eq!(verify(&good, &[]).0, 2);
}

#[test]
fn a_backup_dir_inside_the_data_dir_is_refused_at_start() {
    let data = temp_data_dir();
    for inside in [data.path().to_path_buf(), data.path().join("backups")] {
        let (status, stderr) = expect_refused_start(data.path(), &scheduled(&inside, "3600", "7"));
        assert!(!status.success());
        assert!(stderr.contains("inside the data directory"), "{stderr}");
    }
    // So is one every user may write to (they could delete backups, or plant
    // a newer-looking file that postpones the next one).
    let shared = backup_dir();
    fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let (_, stderr) = expect_refused_start(data.path(), &scheduled(shared.path(), "3600", "7"));
    assert!(stderr.contains("writable by other users"), "{stderr}");
    // A scheduled backup without a directory is refused too.
    let opts = Options {
        extra_args: vec!["--backup-interval-secs".into(), "60".into()],
        ..Options::default()
    };
    let (_, stderr) = expect_refused_start(data.path(), &opts);
    assert!(stderr.contains("backup_dir"), "{stderr}");
}

#[test]
fn scheduled_backups_keep_the_newest_n_and_wait_one_interval_after_a_restart() {
    let backups = backup_dir();
    let mut svc = Service::start_with(scheduled(backups.path(), "1", "2"));
    // At least four runs, so that pruning had work to do.
    let t0 = Instant::now();
    while complete(backups.path()).len() < 2 || t0.elapsed() < Duration::from_secs(4) {
        assert!(t0.elapsed() < Duration::from_secs(20), "no backups written");
        std::thread::sleep(Duration::from_millis(200));
    }
    let files = settled(backups.path(), 2);
    assert_eq!(files.len(), 2, "{files:?}");
    // Only the newest two are left, and nothing half written.
    let newest = files.last().unwrap().clone();
    svc.restart();
    // At start the gauge already shows the newest backup in the directory.
    assert!(metric(&svc, "cardvault_backup_last_success_timestamp_seconds") > 0.0);
    std::thread::sleep(Duration::from_secs(3));
    let after = settled(backups.path(), 2);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after.last().unwrap() > &newest,
        "backups go on after a restart"
    );
}
