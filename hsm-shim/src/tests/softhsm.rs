//! SoftHSM2 for the tests: one token directory per test binary run, one token
//! per test.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the module is initialised, and the
//! module is initialised once per process: so the configuration is written and
//! the variable set exactly once (a `OnceLock`), before the first use of the
//! module, together with the PIN variable the PIN tests read. Nothing else in
//! this test binary sets environment variables.
//!
//! A missing module is a test failure with a clear message, never a skip.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use crate::pkcs11::{self, PinSource, Pkcs11Config, DEFAULT_MODULE};

/// The user PIN of every test token.
pub(crate) const USER_PIN: &str = "cardvault-user-4711";
const SO_PIN: &str = "cardvault-so-0815";
/// Environment variable holding [`USER_PIN`], set once with `SOFTHSM2_CONF`.
pub(crate) const PIN_VAR: &str = "CARDVAULT_HSM_SHIM_TEST_PIN";
/// Overrides the module path (default: Debian's SoftHSM2).
const MODULE_VAR: &str = "CARDVAULT_TEST_PKCS11_MODULE";

struct Env {
    module: PathBuf,
    ctx: Pkcs11,
    /// Serialises token creation: each test takes the first free slot.
    create: Mutex<u32>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let module = std::env::var_os(MODULE_VAR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
        assert!(
            module.exists(),
            "SoftHSM2 is required by the hsm-shim tests, and the PKCS#11 module {} does not exist. \
             Install it (Debian/Ubuntu: `apt-get install -y softhsm2`) or point {MODULE_VAR} at \
             libsofthsm2.so. These tests never skip.",
            module.display()
        );
        let dir = token_dir();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                dir.display()
            ),
        )
        .expect("write softhsm2.conf");
        // The only environment writes of this test binary, before any use of
        // the module (which reads SOFTHSM2_CONF in C_Initialize).
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var(PIN_VAR, USER_PIN);
        let ctx = pkcs11::module(&module)
            .unwrap_or_else(|e| panic!("SoftHSM2 module {} failed to load: {e}", module.display()));
        Env {
            module,
            ctx,
            create: Mutex::new(0),
        }
    })
}

/// A fresh directory for this run's tokens under the system temp dir;
/// leftovers of runs older than a day are removed (the directory of a run
/// cannot be removed at exit: statics are never dropped).
fn token_dir() -> PathBuf {
    let parent = std::env::temp_dir().join("cardvault-hsm-shim-softhsm");
    std::fs::create_dir_all(&parent).expect("create token parent dir");
    if let Ok(entries) = std::fs::read_dir(&parent) {
        let day_ago = SystemTime::now() - Duration::from_secs(24 * 3600);
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t < day_ago)
                .unwrap_or(false);
            if old {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&parent)
        .expect("create token dir")
        .keep()
}

/// The module path the tests use (SoftHSM2 ensured to be there).
pub(crate) fn module() -> &'static Path {
    &env().module
}

/// A new initialised token with user PIN [`USER_PIN`], and a configuration
/// for it (PIN from [`PIN_VAR`], KEK label `kek-1`). Token labels are unique.
pub(crate) fn new_token(tag: &str) -> Pkcs11Config {
    let env = env();
    let mut counter = env.create.lock().unwrap_or_else(|p| p.into_inner());
    *counter += 1;
    let mut label = format!("{}-{tag}", *counter);
    label.truncate(32);
    let ctx = &env.ctx;
    // Token creation rescans the slot list: one at a time with every other
    // slot-list call of the process (see `pkcs11::slot_list_lock`).
    let serial = crate::pkcs11::slot_list_lock();
    let initialised = ctx.get_slots_with_initialized_token().expect("slots");
    let free = ctx
        .get_all_slots()
        .expect("slots")
        .into_iter()
        .find(|s| !initialised.contains(s))
        .expect("SoftHSM2 always offers one free slot");
    let so = AuthPin::from(SO_PIN.to_owned());
    ctx.init_token(free, &so, &label).expect("C_InitToken");
    // A fresh slot list, so the new token is found, before others rescan.
    ctx.get_slots_with_initialized_token().expect("slots");
    drop(serial);
    let session = ctx.open_rw_session(free).expect("session");
    session.login(UserType::So, Some(&so)).expect("SO login");
    session
        .init_pin(&AuthPin::from(USER_PIN.to_owned()))
        .expect("C_InitPIN");
    session.logout().expect("SO logout");
    drop(session);
    let mut config = Pkcs11Config::new(label, PinSource::Env(PIN_VAR.to_owned()), "kek-1");
    config.module = env.module.clone();
    config
}
