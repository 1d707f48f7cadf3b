//! Process hardening, applied once at the start of `serve` before any key
//! or card number is in memory: [`harden`].
//!
//! - No core dumps: `RLIMIT_CORE` soft and hard limits 0 (a core file would
//!   hold unwrapped keys and card numbers). When the limits are already 0
//!   (`LimitCORE=0` in `deploy/systemd`) nothing is changed, so a seccomp
//!   filter that forbids `setrlimit` does not stop the start.
//! - Not dumpable: `prctl(PR_SET_DUMPABLE, 0)`: no core dump whatever the
//!   limit, no `ptrace` attach by other processes of the same user, and
//!   `/proc/<pid>/` files (`mem`, `environ`, ...) owned by root.
//! - Never as root (effective uid 0) outside `--dev`: the service runs as an
//!   unprivileged user (the `cardvault` user of `deploy/systemd`).
//! - Memory locked (`mlockall(MCL_CURRENT | MCL_FUTURE)`) so keys and card
//!   numbers are never written to swap, **only when the process may lock
//!   without a limit**: `RLIMIT_MEMLOCK` unlimited (`LimitMEMLOCK=infinity`,
//!   `ulimit -l unlimited`) or the `CAP_IPC_LOCK` capability (root in dev
//!   mode). Why not otherwise: with `MCL_FUTURE` every later mapping counts
//!   against the limit, and once it is reached allocations fail (Rust aborts
//!   the process on a failed allocation). The usual limits are far too small
//!   for this service: 8 MiB is the default here, `deploy/systemd` sets
//!   64 MiB, and one argon2id API-key check alone allocates 64 MiB, every
//!   thread stack 2 MiB. `MCL_CURRENT` alone would lock only what is mapped
//!   before the first key exists, which protects nothing. So with a finite
//!   limit and no capability the memory is not locked and the [`Report`]
//!   says why ([`Report::warning`]); the start goes on (no swap on the host
//!   is the other way to the same end). A refused `mlockall` (`EPERM`, e.g.
//!   a seccomp filter, or `ENOMEM`) is reported the same way.

use std::fmt;

use rustix::io::Errno;
use rustix::mm::{mlockall, MlockAllFlags};
use rustix::process::{
    dumpable_behavior, getrlimit, set_dumpable_behavior, setrlimit, DumpableBehavior, Resource,
    Rlimit,
};

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    #[error(
        "refusing to run as root (effective uid 0): run as an unprivileged user, \
         e.g. the `cardvault` user of deploy/systemd (only --dev may run as root)"
    )]
    Root,
    #[error("cannot disable core dumps (setting RLIMIT_CORE to 0): {0}")]
    CoreLimit(Errno),
    #[error("cannot mark the process not dumpable (prctl PR_SET_DUMPABLE 0): {0}")]
    Dumpable(Errno),
}

/// What [`harden`] applied. Core dumps off and not dumpable always hold in
/// a report ([`harden`] fails otherwise); memory locking may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `RLIMIT_CORE` was already 0 (set by the service manager) rather than
    /// lowered here.
    pub core_limit_was_zero: bool,
    pub memory: MemoryLock,
}

/// Whether the process's memory is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLock {
    /// `mlockall(MCL_CURRENT | MCL_FUTURE)` succeeded.
    Locked,
    /// Not attempted: `RLIMIT_MEMLOCK` is finite (this many bytes) and the
    /// process lacks `CAP_IPC_LOCK`.
    LimitTooSmall { limit_bytes: u64 },
    /// `mlockall` failed with this error.
    Refused(Errno),
}

impl Report {
    pub fn memory_locked(&self) -> bool {
        self.memory == MemoryLock::Locked
    }

    /// A line for a warning when memory is not locked, naming the limit and
    /// the setting that raises it; `None` when it is locked.
    pub fn warning(&self) -> Option<String> {
        let why = match self.memory {
            MemoryLock::Locked => return None,
            MemoryLock::LimitTooSmall { limit_bytes } => format!(
                "RLIMIT_MEMLOCK is {} KiB and the process lacks CAP_IPC_LOCK \
                 (locking all future memory under a finite limit would make allocations fail)",
                limit_bytes / 1024
            ),
            MemoryLock::Refused(errno) => format!("mlockall failed: {errno}"),
        };
        Some(format!(
            "memory not locked: {why}; keys and card data may be swapped out. \
             Allow unlimited locking (systemd LimitMEMLOCK=infinity, ulimit -l unlimited) \
             or run without swap"
        ))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "process hardening: core dumps off (RLIMIT_CORE 0{}), not dumpable, ",
            if self.core_limit_was_zero {
                ", already set"
            } else {
                ""
            }
        )?;
        match self.memory {
            MemoryLock::Locked => f.write_str("memory locked (mlockall current and future)"),
            MemoryLock::LimitTooSmall { limit_bytes } => write!(
                f,
                "memory not locked (RLIMIT_MEMLOCK {} KiB, no CAP_IPC_LOCK)",
                limit_bytes / 1024
            ),
            MemoryLock::Refused(errno) => {
                write!(
                    f,
                    "memory not locked (RLIMIT_MEMLOCK: mlockall failed: {errno})"
                )
            }
        }
    }
}

/// Hardens the running process (see the module documentation); refuses
/// root unless `dev`. Call it first thing in `serve`, log the report, and
/// log [`Report::warning`] as a warning when there is one.
pub fn harden(dev: bool) -> Result<Report, HardeningError> {
    check_user(rustix::process::geteuid().is_root(), dev)?;
    let core_limit_was_zero = disable_core_dumps()?;
    disable_dumpable()?;
    let memory = lock_memory();
    Ok(Report {
        core_limit_was_zero,
        memory,
    })
}

fn check_user(root: bool, dev: bool) -> Result<(), HardeningError> {
    if root && !dev {
        return Err(HardeningError::Root);
    }
    Ok(())
}

/// `RLIMIT_CORE` 0/0; `Ok(true)` when it already was.
fn disable_core_dumps() -> Result<bool, HardeningError> {
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if getrlimit(Resource::Core) == zero {
        return Ok(true);
    }
    setrlimit(Resource::Core, zero).map_err(HardeningError::CoreLimit)?;
    Ok(false)
}

fn disable_dumpable() -> Result<(), HardeningError> {
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(HardeningError::Dumpable)?;
    // Read back: a filter that fakes success must not pass for hardening.
    match dumpable_behavior() {
        Ok(DumpableBehavior::NotDumpable) => Ok(()),
        Ok(_) => Err(HardeningError::Dumpable(Errno::PERM)),
        Err(e) => Err(HardeningError::Dumpable(e)),
    }
}

/// Whether to call `mlockall(MCL_CURRENT | MCL_FUTURE)`: only when nothing
/// limits how much may be locked (see the module documentation).
fn lock_plan(memlock_limit: Option<u64>, cap_ipc_lock: bool) -> Result<(), MemoryLock> {
    match memlock_limit {
        Some(limit_bytes) if !cap_ipc_lock => Err(MemoryLock::LimitTooSmall { limit_bytes }),
        _ => Ok(()),
    }
}

fn has_cap_ipc_lock() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|caps| {
        caps.effective
            .contains(rustix::thread::CapabilitySet::IPC_LOCK)
    })
}

fn lock_memory() -> MemoryLock {
    if let Err(not_locked) = lock_plan(getrlimit(Resource::Memlock).current, has_cap_ipc_lock()) {
        return not_locked;
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE) {
        Ok(()) => MemoryLock::Locked,
        Err(errno) => MemoryLock::Refused(errno),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn root_is_refused_outside_dev() {
        let err = check_user(true, false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("root"), "{text}");
        assert!(text.contains("unprivileged user"), "{text}");
        assert!(
            text.contains("`cardvault` user of deploy/systemd"),
            "{text}"
        );
        assert!(check_user(true, true).is_ok());
        assert!(check_user(false, false).is_ok());
        assert!(check_user(false, true).is_ok());
    }

    #[test]
    fn memory_is_locked_only_without_a_limit() {
        assert_eq!(lock_plan(None, false), Ok(()));
        assert_eq!(lock_plan(None, true), Ok(()));
        assert_eq!(lock_plan(Some(64 << 20), true), Ok(()));
        assert_eq!(
            lock_plan(Some(8 << 20), false),
            Err(MemoryLock::LimitTooSmall {
                limit_bytes: 8 << 20
            })
        );
    }

    #[test]
    fn report_says_what_was_applied() {
        let locked = Report {
            core_limit_was_zero: false,
            memory: MemoryLock::Locked,
        };
        assert_eq!(
            locked.to_string(),
            "process hardening: core dumps off (RLIMIT_CORE 0), not dumpable, \
             memory locked (mlockall current and future)"
        );
        assert!(locked.memory_locked());
        assert_eq!(locked.warning(), None);

        let limited = Report {
            core_limit_was_zero: true,
            memory: MemoryLock::LimitTooSmall {
                limit_bytes: 64 << 20,
            },
        };
        assert!(!limited.memory_locked());
        let line = limited.to_string();
        assert!(line.contains("already set"), "{line}");
        assert!(
            line.contains("memory not locked (RLIMIT_MEMLOCK 65536 KiB"),
            "{line}"
        );
        let warning = limited.warning().unwrap();
        assert!(warning.contains("RLIMIT_MEMLOCK is 65536 KiB"), "{warning}");
        assert!(warning.contains("LimitMEMLOCK=infinity"), "{warning}");

        let refused = Report {
            core_limit_was_zero: false,
            memory: MemoryLock::Refused(Errno::PERM),
        };
        assert!(refused.warning().unwrap().contains("mlockall failed"));
        assert!(refused.to_string().contains("RLIMIT_MEMLOCK"));
    }

    /// The two settings that cannot be undone are applied to the test
    /// process itself (harmless for a test: no core dumps, not dumpable).
    /// `mlockall` is not: it would lock the whole test binary's memory.
    #[test]
    fn core_dumps_and_dumpable_are_turned_off() {
        disable_core_dumps().unwrap();
        assert_eq!(
            getrlimit(Resource::Core),
            Rlimit {
                current: Some(0),
                maximum: Some(0)
            }
        );
        // A second call finds it done.
        assert!(disable_core_dumps().unwrap());
        disable_dumpable().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
    }
}
