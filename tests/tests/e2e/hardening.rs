//! Process hardening of `serve`, seen from outside the process: no core
//! dumps (`/proc/<pid>/limits`), not dumpable (its `/proc/<pid>/` files
//! belong to root although it runs as another user), memory locking as the
//! start-up report says (`VmLck`), never root outside `--dev`, and the
//! harness's own promise that the service runs as the unprivileged
//! [`e2e::service_user`] when the tests run as root.

use std::fs;
use std::os::unix::fs::MetadataExt as _;

use e2e::{expect_refused_start, service_user, temp_data_dir, Options, Service};

use crate::expect_status;

/// One `Name:\tvalue` line of `/proc/<pid>/status`.
fn status_field(pid: u32, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
        .trim()
        .to_string()
}

/// The effective uid of a process (second field of `Uid:`).
fn euid(pid: u32) -> u32 {
    status_field(pid, "Uid")
        .split_whitespace()
        .nth(1)
        .and_then(|uid| uid.parse().ok())
        .unwrap()
}

/// `VmLck` in kB.
fn locked_kb(pid: u32) -> u64 {
    status_field(pid, "VmLck")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// Soft and hard "Max core file size" of `/proc/<pid>/limits`.
fn core_limits(pid: u32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core limit in /proc/{pid}/limits:\n{limits}"));
    let mut fields = line["Max core file size".len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

/// Whether this (test) process has CAP_IPC_LOCK (bit 14) in its effective
/// set: then so has a child that keeps its uid.
fn test_process_can_lock_memory() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|caps| u64::from_str_radix(caps.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

#[test]
fn serve_runs_unprivileged_without_core_dumps_and_not_dumpable() {
    let svc = Service::start();
    let pid = svc.pid().unwrap();
    expect_status(&svc.anonymous().get("/healthz"), 200);

    let uid = euid(pid);
    if let Some(user) = service_user() {
        assert_eq!(
            uid, user.uid,
            "the harness runs the service as the service user"
        );
    }
    assert_ne!(uid, 0, "the service never runs as root outside --dev");

    assert_eq!(
        core_limits(pid),
        ("0".to_string(), "0".to_string()),
        "RLIMIT_CORE soft and hard are 0"
    );
    // A dumpable process owns its /proc/<pid> files; a non-dumpable one's
    // belong to root.
    let owner = fs::metadata(format!("/proc/{pid}/status")).unwrap().uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid}/status belongs to uid {owner}: the process is still dumpable"
    );

    // Unprivileged with the default RLIMIT_MEMLOCK: not locked, and the log
    // says so, naming the limit; locked memory shows as VmLck.
    let log = svc.stderr();
    let report = log
        .lines()
        .find(|line| line.contains("process hardening:"))
        .unwrap_or_else(|| panic!("no hardening report in the log:\n{log}"));
    assert!(report.contains("core dumps off"), "{report}");
    assert!(report.contains("not dumpable"), "{report}");
    if locked_kb(pid) > 0 {
        assert!(report.contains("memory locked"), "{report}");
    } else {
        assert!(report.contains("memory not locked"), "{report}");
        assert!(
            log.lines()
                .any(|line| line.contains(" WARN ") && line.contains("RLIMIT_MEMLOCK")),
            "no warning naming RLIMIT_MEMLOCK:\n{log}"
        );
    }
}

/// As root: refused without `--dev` (with the message that says what to
/// do), accepted with it, and then memory is locked when root may lock
/// (CAP_IPC_LOCK), else reported as not locked. Needs root (CI runs the
/// tests as root); it fails without, never skips.
#[test]
fn root_is_refused_outside_dev_mode() {
    assert!(
        service_user().is_some(),
        "this test starts the service as root: run the tests as root (CI does)"
    );
    let dir = temp_data_dir();
    let opts = Options {
        as_invoker: true,
        ..Options::default()
    };
    let (status, stderr) = expect_refused_start(dir.path(), &opts);
    assert!(!status.success());
    assert!(
        stderr.contains("refusing to run as root")
            && stderr.contains("unprivileged user")
            && stderr.contains("cardvault"),
        "{stderr}"
    );

    let dev = Service::start_with(Options {
        as_invoker: true,
        ..Options::dev()
    });
    let pid = dev.pid().unwrap();
    expect_status(&dev.anonymous().get("/healthz"), 200);
    assert_eq!(euid(pid), 0, "--dev as root runs as root");
    assert_eq!(core_limits(pid), ("0".to_string(), "0".to_string()));
    if test_process_can_lock_memory() {
        assert!(
            locked_kb(pid) > 0,
            "root with CAP_IPC_LOCK: memory locked, VmLck {} kB",
            locked_kb(pid)
        );
        assert!(dev.stderr().contains("memory locked"), "{}", dev.stderr());
    } else {
        assert!(
            dev.stderr().contains("memory not locked"),
            "{}",
            dev.stderr()
        );
    }
}
