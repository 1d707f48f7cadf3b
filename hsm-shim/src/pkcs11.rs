//! PKCS#11 backend: the KEK is an AES-256 secret key generated inside a token
//! (an HSM; SoftHSM2 in tests) and never leaves it.
//!
//! # Lifecycle
//!
//! ```text
//! let config = Pkcs11Config::new("cardvault", PinSource::File("/run/credentials/pin".into()), "cardvault-kek-1");
//! let token = Pkcs11Token::open(&config)?;        // sealed: module loaded, token found, no login
//! token.login(&config.pin.load()?)?;              // unseal
//! let kek = token.kek(&config.kek_label)?;        // or token.generate_kek(label) the first time
//! let blob = kek.wrap("dek:1", &dek)?;
//! token.destroy_kek("cardvault-kek-0")?;          // crypto-shred an old KEK version
//! token.logout()?;                                // seal again
//! ```
//!
//! [`Pkcs11Config::unseal`] does open, login and `kek` in one call.
//!
//! # The key
//!
//! `generate_kek` runs `C_GenerateKey(CKM_AES_KEY_GEN)` with: `CKA_TOKEN`,
//! `CKA_PRIVATE`, `CKA_SENSITIVE` true; `CKA_EXTRACTABLE`, `CKA_MODIFIABLE`,
//! `CKA_COPYABLE` false; `CKA_ENCRYPT`/`CKA_DECRYPT` true and every other usage
//! (wrap, unwrap, sign, verify, derive) false; `CKA_VALUE_LEN` 32; `CKA_LABEL` =
//! the KEK label (which names the version, for example `cardvault-kek-2`);
//! `CKA_ID` = 16 random bytes. It refuses a label that already exists (and, if
//! a concurrent creator raced it, destroys its own key and refuses). `kek`
//! refuses a key with that label that is not an AES-256 key, is extractable or
//! is not sensitive.
//!
//! The KEK id is `p11:<label>:<hex CKA_ID>`: stable across restarts, and a
//! KEK destroyed and re-created under the same label gets a new id, so a key
//! wrapped under the old one is reported as "wrong KEK". The random id is
//! drawn again if its hex holds a run of 12 or more digits, so a KEK id never
//! looks like a card number to the vault's PAN guard.
//!
//! # Wrapping: AES-GCM inside the token
//!
//! `wrap` is `C_Encrypt(CKM_AES_GCM)` with a fresh 96-bit IV from the OS
//! CSPRNG, a 128-bit tag, and associated data `"cardvault/kek-wrap/v1\0" ||
//! label`; `unwrap` is `C_Decrypt` with the same. Blob: `0x01 || IV(12) ||
//! ciphertext || tag(16)`: exactly the software backend's format, so a
//! software KEK imported into an HSM keeps unwrapping its blobs (a test checks
//! this against SoftHSM2). GCM was chosen over RFC 5649 key wrap
//! (`CKM_AES_KEY_WRAP_KWP`) because it binds the label as associated data;
//! KWP has no associated data, so binding the label would need a second
//! mechanism (a MAC under another key, or a label-derived key). Random 96-bit
//! IVs are safe for far more than the few thousand wraps a KEK ever does
//! (NIST SP 800-38D allows 2^32 per key). The IV is chosen by the caller;
//! some HSMs in FIPS mode insist on generating it themselves (PKCS#11 3.0
//! message-based encryption), which would be a change in this one module.
//!
//! # Sessions, login and `C_Initialize`
//!
//! - `C_Initialize` runs once per module and process: a process-wide registry
//!   maps each module (by canonical path) to its initialised context, which
//!   is never finalised. `CKR_CRYPTOKI_ALREADY_INITIALIZED` (another library in
//!   the process got there first) is accepted.
//! - PKCS#11 login state belongs to the application and the token, not to a
//!   session: `login` unseals every session of this process on that token, and
//!   `logout` seals them all. A login while the process is already logged in
//!   succeeds without the token re-checking the PIN (the token answers
//!   `CKR_USER_ALREADY_LOGGED_IN` first). The token handle keeps one anchor
//!   session open for its whole life, because closing the last session of a
//!   token would silently log the process out.
//! - `cryptoki`'s `Session` is `Send` but not `Sync`; [`Pkcs11Kek`] is both: it
//!   takes a session from a small pool behind a mutex for each operation (a
//!   session that saw an error is closed rather than reused).
//!
//! # The PIN
//!
//! [`Pin::from_file`] (the file must be 0600/0400 like a key file; one
//! trailing newline is ignored) or [`Pin::from_env`]; never a command-line
//! argument. The PIN is held in zeroizing memory, has a redacted `Debug` and no
//! `Display`/`Clone`, and never appears in an error.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::fsutil;
use crate::{wrap_aad, KekError, KeyEncryptionKey, BLOB_VERSION, NONCE_LEN, TAG_LEN};

/// Where SoftHSM2 lives on Debian and Ubuntu.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Longest PIN accepted (PKCS#11 tokens typically allow 4..=255).
const MAX_PIN_LEN: usize = 255;
/// Sessions kept open for reuse beyond the anchor session.
const POOL_MAX: usize = 8;
/// Length of the random `CKA_ID` of a generated KEK.
const KEK_ID_LEN: usize = 16;

// ---------------------------------------------------------------------------
// PIN

/// The token's user PIN. Zeroized on drop; `Debug` prints `Pin([REDACTED])`.
pub struct Pin(Zeroizing<String>);

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin([REDACTED])")
    }
}

impl Pin {
    /// Read the PIN from a file readable only by its owner (mode 0600 or
    /// 0400; anything group/other-accessible is refused). One trailing newline
    /// (`\n` or `\r\n`) is ignored.
    pub fn from_file(path: &Path) -> Result<Self, KekError> {
        let from = || format!("file {}", path.display());
        let bytes = Zeroizing::new(fsutil::read_private(path)?);
        let text = std::str::from_utf8(&bytes).map_err(|_| KekError::PinUnavailable {
            from: from(),
            reason: "not valid UTF-8",
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        Self::checked(Zeroizing::new(text.to_owned()), from)
    }

    /// Read the PIN from the environment variable `var` (for example one set
    /// by the service manager). The variable is left in place.
    pub fn from_env(var: &str) -> Result<Self, KekError> {
        let from = || format!("environment variable {var}");
        let value = match std::env::var(var) {
            Ok(v) => Zeroizing::new(v),
            Err(std::env::VarError::NotPresent) => {
                return Err(KekError::PinUnavailable {
                    from: from(),
                    reason: "not set",
                })
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(KekError::PinUnavailable {
                    from: from(),
                    reason: "not valid UTF-8",
                })
            }
        };
        Self::checked(value, from)
    }

    fn checked(pin: Zeroizing<String>, from: impl Fn() -> String) -> Result<Self, KekError> {
        let reason = if pin.is_empty() {
            Some("empty")
        } else if pin.len() > MAX_PIN_LEN {
            Some("longer than 255 bytes")
        } else if pin.contains(['\0', '\n', '\r']) {
            Some("contains a NUL or line break")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(KekError::PinUnavailable {
                from: from(),
                reason,
            }),
            None => Ok(Self(pin)),
        }
    }

    fn auth_pin(&self) -> AuthPin {
        // `AuthPin` is secrecy's `SecretString`: zeroized on drop too.
        AuthPin::from(self.0.as_str().to_owned())
    }
}

/// Where the PIN comes from: a file or an environment variable, never a
/// command-line argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file of mode 0600/0400 holding the PIN (for example a systemd
    /// credential).
    File(PathBuf),
    /// The name of an environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    /// Read the PIN now.
    pub fn load(&self) -> Result<Pin, KekError> {
        match self {
            Self::File(path) => Pin::from_file(path),
            Self::Env(var) => Pin::from_env(var),
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration

/// What the service needs to reach its KEK in a PKCS#11 token.
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library); default [`DEFAULT_MODULE`].
    pub module: PathBuf,
    /// `CKA_LABEL` of the token (up to 32 bytes).
    pub token_label: String,
    /// Where the user PIN is read from.
    pub pin: PinSource,
    /// Label of the KEK key object, naming its version (`cardvault-kek-1`).
    pub kek_label: String,
}

impl Pkcs11Config {
    /// A configuration using the default module path.
    pub fn new(
        token_label: impl Into<String>,
        pin: PinSource,
        kek_label: impl Into<String>,
    ) -> Self {
        Self {
            module: PathBuf::from(DEFAULT_MODULE),
            token_label: token_label.into(),
            pin,
            kek_label: kek_label.into(),
        }
    }

    /// Open the token, log in with the configured PIN and find the configured
    /// KEK: what a service does at start-up.
    pub fn unseal(&self) -> Result<Pkcs11Kek, KekError> {
        let token = Pkcs11Token::open(self)?;
        token.login(&self.pin.load()?)?;
        token.kek(&self.kek_label)
    }
}

/// Slot-list calls (C_GetSlotList, which rescans the token store) one at a
/// time per process: SoftHSM2 2.6 aborts (`SlotManager::insertToken:
/// Assertion result.second failed`) when two threads rescan at once, even
/// with OS locking enabled (seen in the test suite, 1 run in ~10).
pub(crate) fn slot_list_lock() -> MutexGuard<'static, ()> {
    static SLOTS: OnceLock<Mutex<()>> = OnceLock::new();
    SLOTS
        .get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// Module registry: C_Initialize once per module and process.

fn modules() -> MutexGuard<'static, HashMap<PathBuf, Pkcs11>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    MODULES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        // The map is only ever inserted into; a panic elsewhere cannot leave
        // it half-updated.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The initialised context of the module at `path`, loading and initialising
/// it on first use in this process.
pub(crate) fn module(path: &Path) -> Result<Pkcs11, KekError> {
    let shown = path.display().to_string();
    let canonical = std::fs::canonicalize(path).map_err(|e| KekError::Pkcs11Module {
        module: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut map = modules();
    if let Some(ctx) = map.get(&canonical) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&canonical).map_err(|e| KekError::Pkcs11Module {
        module: shown.clone(),
        reason: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(KekError::Pkcs11Module {
                module: shown,
                reason: e.to_string(),
            })
        }
    }
    map.insert(canonical, ctx.clone());
    Ok(ctx)
}

fn p11(e: P11Error) -> KekError {
    match e {
        P11Error::Pkcs11(rv, function) => KekError::Pkcs11 {
            op: function_name(function),
            code: format!("{rv:?}"),
        },
        other => KekError::Pkcs11 {
            op: "call".to_owned(),
            code: other.to_string(),
        },
    }
}

fn function_name(f: Function) -> String {
    format!("C_{f:?}")
}

// ---------------------------------------------------------------------------
// Token

struct TokenInner {
    ctx: Pkcs11,
    slot: Slot,
    label: String,
    /// Never closed while the token handle lives: closing a token's last
    /// session ends the login.
    anchor: Mutex<Session>,
    pool: Mutex<Vec<Session>>,
}

impl TokenInner {
    fn anchor(&self) -> MutexGuard<'_, Session> {
        // A session has no invariant a panic could break.
        self.anchor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn what(&self) -> String {
        format!("PKCS#11 token {:?}", self.label)
    }

    /// Run `op` on a pooled session. A session that saw an error is closed
    /// instead of being put back.
    fn with_session<T>(
        &self,
        op: impl FnOnce(&Session) -> Result<T, P11Error>,
    ) -> Result<T, P11Error> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let session = match pooled {
            Some(s) => s,
            None => self.ctx.open_rw_session(self.slot)?,
        };
        let result = op(&session);
        if result.is_ok() {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(session);
            }
        }
        result
    }

    fn logged_in(&self) -> Result<bool, KekError> {
        let state = self
            .anchor()
            .get_session_info()
            .map_err(p11)?
            .session_state();
        Ok(matches!(state, SessionState::RoUser | SessionState::RwUser))
    }

    fn ensure_unsealed(&self) -> Result<(), KekError> {
        if self.logged_in()? {
            Ok(())
        } else {
            Err(KekError::Sealed { what: self.what() })
        }
    }

    fn find_keks(&self, label: &str) -> Result<Vec<ObjectHandle>, KekError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        self.with_session(|s| s.find_objects(&template))
            .map_err(|e| self.map_err(e, label))
    }

    fn map_err(&self, e: P11Error, kek_label: &str) -> KekError {
        match e {
            P11Error::Pkcs11(RvError::UserNotLoggedIn, _) => KekError::Sealed { what: self.what() },
            // A private object is invisible while logged out: its handle is
            // then invalid too (SoftHSM2), so ask which of the two it is.
            P11Error::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _) => {
                match self.logged_in() {
                    Ok(false) => KekError::Sealed { what: self.what() },
                    Ok(true) => KekError::KekGone {
                        kek: kek_label.to_owned(),
                    },
                    Err(e) => e,
                }
            }
            other => p11(other),
        }
    }
}

/// An open PKCS#11 token. Opening does not log in: a service can start sealed
/// and unseal later with [`Pkcs11Token::login`]. Clones and the KEKs taken
/// from it share its sessions; when the last of them is dropped, its sessions
/// close, which also ends the login if no other handle of this process holds
/// a session on the token.
#[derive(Clone)]
pub struct Pkcs11Token {
    inner: Arc<TokenInner>,
}

impl fmt::Debug for Pkcs11Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Token")
            .field("label", &self.inner.label)
            .field("slot", &self.inner.slot.id())
            .finish_non_exhaustive()
    }
}

impl Pkcs11Token {
    /// Load the module (once per process), find the initialised token with
    /// `config.token_label`, and open a session on it. No login yet.
    pub fn open(config: &Pkcs11Config) -> Result<Self, KekError> {
        let label = config.token_label.as_str();
        if label.is_empty() || label.len() > 32 {
            return Err(KekError::InvalidLabel {
                what: "token label",
                reason: "must be 1 to 32 bytes",
            });
        }
        let ctx = module(&config.module)?;
        let mut found = Vec::new();
        {
            let _serial = slot_list_lock();
            for slot in ctx.get_slots_with_initialized_token().map_err(p11)? {
                let info = ctx.get_token_info(slot).map_err(p11)?;
                if info.label().trim_end() == label {
                    found.push(slot);
                }
            }
        }
        let slot = match found.as_slice() {
            [] => {
                return Err(KekError::TokenNotFound {
                    token: label.to_owned(),
                })
            }
            [slot] => *slot,
            _ => {
                return Err(KekError::TokenAmbiguous {
                    token: label.to_owned(),
                    count: found.len(),
                })
            }
        };
        let anchor = ctx.open_rw_session(slot).map_err(p11)?;
        Ok(Self {
            inner: Arc::new(TokenInner {
                ctx,
                slot,
                label: label.to_owned(),
                anchor: Mutex::new(anchor),
                pool: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Log in as the token's user: unseals every session of this process on
    /// this token. A wrong PIN is [`KekError::WrongPin`]; a locked PIN
    /// [`KekError::PinLocked`]. Succeeds at once if this process is already
    /// logged in to the token.
    pub fn login(&self, pin: &Pin) -> Result<(), KekError> {
        let token = || self.inner.label.clone();
        match self
            .inner
            .anchor()
            .login(UserType::User, Some(&pin.auth_pin()))
        {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(P11Error::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            )) => Err(KekError::WrongPin { token: token() }),
            Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
                Err(KekError::PinLocked { token: token() })
            }
            Err(e) => Err(p11(e)),
        }
    }

    /// Log out: every session of this process on this token is sealed again,
    /// and KEK handles fail with [`KekError::Sealed`] until the next login.
    pub fn logout(&self) -> Result<(), KekError> {
        match self.inner.anchor().logout() {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserNotLoggedIn, _)) => Ok(()),
            Err(e) => Err(p11(e)),
        }
    }

    /// Whether this process is logged in to the token.
    pub fn is_unsealed(&self) -> Result<bool, KekError> {
        self.inner.logged_in()
    }

    /// Generate a new KEK version inside the token under `label`. Refuses if a
    /// secret key with that label already exists.
    pub fn generate_kek(&self, label: &str) -> Result<Pkcs11Kek, KekError> {
        check_kek_label(label)?;
        let inner = &self.inner;
        inner.ensure_unsealed()?;
        if !inner.find_keks(label)?.is_empty() {
            return Err(KekError::KekExists {
                label: label.to_owned(),
            });
        }
        let id = random_kek_id()?;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
            Attribute::Destroyable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let handle = inner
            .with_session(|s| s.generate_key(&Mechanism::AesKeyGen, &template))
            .map_err(|e| inner.map_err(e, label))?;
        // Another process may have created the same label between the check
        // and the generation: then ours goes, and theirs stays.
        let now = inner.find_keks(label)?;
        if now.len() > 1 {
            let _ = inner.with_session(|s| s.destroy_object(handle));
            return Err(KekError::KekExists {
                label: label.to_owned(),
            });
        }
        Ok(Pkcs11Kek::new(inner.clone(), handle, label, &id))
    }

    /// The existing KEK labelled `label`. Refuses a key that is not AES-256,
    /// is extractable or not sensitive.
    pub fn kek(&self, label: &str) -> Result<Pkcs11Kek, KekError> {
        check_kek_label(label)?;
        let inner = &self.inner;
        inner.ensure_unsealed()?;
        let handle = match inner.find_keks(label)?.as_slice() {
            [] => {
                return Err(KekError::KekNotFound {
                    label: label.to_owned(),
                })
            }
            [h] => *h,
            more => {
                return Err(KekError::KekAmbiguous {
                    label: label.to_owned(),
                    count: more.len(),
                })
            }
        };
        let attrs = inner
            .with_session(|s| {
                s.get_attributes(
                    handle,
                    &[
                        AttributeType::KeyType,
                        AttributeType::ValueLen,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::Id,
                    ],
                )
            })
            .map_err(|e| inner.map_err(e, label))?;
        let mut aes = false;
        let mut len32 = false;
        let mut sensitive = false;
        let mut extractable = true;
        let mut id = Vec::new();
        for a in attrs {
            match a {
                Attribute::KeyType(t) => aes = t == KeyType::AES,
                Attribute::ValueLen(l) => len32 = usize::from(l) == 32,
                Attribute::Sensitive(v) => sensitive = v,
                Attribute::Extractable(v) => extractable = v,
                Attribute::Id(v) => id = v,
                _ => {}
            }
        }
        let policy = |reason| KekError::KekPolicy {
            label: label.to_owned(),
            reason,
        };
        if !(aes && len32) {
            return Err(policy("not an AES-256 key"));
        }
        if !sensitive || extractable {
            return Err(policy("the key is extractable or not sensitive"));
        }
        if id.is_empty() {
            return Err(policy("the key has no CKA_ID"));
        }
        Ok(Pkcs11Kek::new(inner.clone(), handle, label, &id))
    }

    /// Destroy the KEK labelled `label` (`C_DestroyObject`): a crypto-shred of
    /// that KEK version. Everything wrapped under it is lost for good.
    pub fn destroy_kek(&self, label: &str) -> Result<(), KekError> {
        check_kek_label(label)?;
        let inner = &self.inner;
        inner.ensure_unsealed()?;
        let handles = inner.find_keks(label)?;
        if handles.is_empty() {
            return Err(KekError::KekNotFound {
                label: label.to_owned(),
            });
        }
        for handle in handles {
            inner
                .with_session(|s| s.destroy_object(handle))
                .map_err(|e| inner.map_err(e, label))?;
        }
        Ok(())
    }

    /// Labels of the secret keys visible in the token (sorted).
    pub fn kek_labels(&self) -> Result<Vec<String>, KekError> {
        let inner = &self.inner;
        inner.ensure_unsealed()?;
        let mut labels = inner
            .with_session(|s| {
                let mut labels = Vec::new();
                for h in s.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])? {
                    for a in s.get_attributes(h, &[AttributeType::Label])? {
                        if let Attribute::Label(l) = a {
                            labels.push(String::from_utf8_lossy(&l).into_owned());
                        }
                    }
                }
                Ok(labels)
            })
            .map_err(p11)?;
        labels.sort();
        Ok(labels)
    }
}

fn check_kek_label(label: &str) -> Result<(), KekError> {
    let reason = if label.is_empty() || label.len() > 64 {
        Some("must be 1 to 64 characters")
    } else if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KekError::InvalidLabel {
            what: "KEK label",
            reason,
        }),
        None => Ok(()),
    }
}

/// A random `CKA_ID` whose hex form has no run of 12 or more digits.
fn random_kek_id() -> Result<[u8; KEK_ID_LEN], KekError> {
    loop {
        let mut id = [0u8; KEK_ID_LEN];
        getrandom::getrandom(&mut id).map_err(|_| KekError::Rng)?;
        if !has_long_digit_run(&crate::to_hex(&id)) {
            return Ok(id);
        }
    }
}

fn has_long_digit_run(s: &str) -> bool {
    let mut run = 0;
    for c in s.chars() {
        run = if c.is_ascii_digit() { run + 1 } else { 0 };
        if run >= 12 {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------
// KEK

/// A KEK inside a PKCS#11 token: wrap and unwrap run inside the token
/// (AES-256-GCM). `Send + Sync`; usable only while the token is logged in.
pub struct Pkcs11Kek {
    token: Arc<TokenInner>,
    /// Handles of private objects do not survive a logout (SoftHSM2 hands
    /// out new ones after the next login), so the key is found again by its
    /// label and `CKA_ID` when its handle turns invalid.
    handle: Mutex<ObjectHandle>,
    label: String,
    cka_id: Vec<u8>,
    id: String,
}

impl fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Kek")
            .field("kek_id", &self.id)
            .field("token", &self.token.label)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Kek {
    fn new(token: Arc<TokenInner>, handle: ObjectHandle, label: &str, id: &[u8]) -> Self {
        Self {
            token,
            handle: Mutex::new(handle),
            label: label.to_owned(),
            cka_id: id.to_vec(),
            id: format!("p11:{label}:{}", crate::to_hex(id)),
        }
    }

    /// Run `op` with the key's handle; if the handle is invalid, find the key
    /// again (same label and `CKA_ID`) and retry once.
    fn call<T>(
        &self,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, P11Error>,
    ) -> Result<T, P11Error> {
        let lock = || self.handle.lock().unwrap_or_else(|p| p.into_inner());
        let handle = *lock();
        match self.token.with_session(|s| op(s, handle)) {
            Err(P11Error::Pkcs11(
                rv @ (RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid),
                f,
            )) => {
                let template = [
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(self.label.as_bytes().to_vec()),
                    Attribute::Id(self.cka_id.clone()),
                ];
                match self
                    .token
                    .with_session(|s| s.find_objects(&template))?
                    .as_slice()
                {
                    [found] => {
                        *lock() = *found;
                        self.token.with_session(|s| op(s, *found))
                    }
                    _ => Err(P11Error::Pkcs11(rv, f)),
                }
            }
            other => other,
        }
    }

    /// The key's label in the token (`CKA_LABEL`).
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl KeyEncryptionKey for Pkcs11Kek {
    fn kek_id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, label: &str, key: &[u8]) -> Result<Vec<u8>, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|_| KekError::Rng)?;
        let aad = wrap_aad(label);
        let ct = self
            .call(|s, handle| {
                let mut iv = nonce;
                let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())?;
                s.encrypt(&Mechanism::AesGcm(params), handle, key)
            })
            .map_err(|e| self.token.map_err(e, &self.label))?;
        if ct.len() != key.len() + TAG_LEN {
            return Err(KekError::Pkcs11 {
                op: "C_Encrypt".to_owned(),
                code: "unexpected ciphertext length".to_owned(),
            });
        }
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        blob.push(BLOB_VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        Ok(blob)
    }

    fn unwrap(&self, label: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KekError> {
        if wrapped.len() < 1 + NONCE_LEN + TAG_LEN || wrapped[0] != BLOB_VERSION {
            return Err(KekError::MalformedBlob);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[1..1 + NONCE_LEN]);
        let aad = wrap_aad(label);
        let token = &self.token;
        self.call(|s, handle| {
            let mut iv = nonce;
            let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())?;
            s.decrypt(
                &Mechanism::AesGcm(params),
                handle,
                &wrapped[1 + NONCE_LEN..],
            )
        })
        .map(Zeroizing::new)
        .map_err(|e| match e {
            // A failed GCM tag check: SoftHSM2 reports CKR_GENERAL_ERROR,
            // the standard says CKR_ENCRYPTED_DATA_INVALID.
            P11Error::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError,
                Function::Decrypt,
            ) => KekError::UnwrapFailed,
            other => token.map_err(other, &self.label),
        })
    }
}

#[cfg(test)]
impl Pkcs11Token {
    /// Test only: import known key bytes as a KEK (to check that blobs are
    /// interchangeable with the software backend). Never in production: a
    /// real KEK is generated inside the token.
    pub(crate) fn import_kek_for_test(
        &self,
        label: &str,
        key: &[u8; 32],
    ) -> Result<Pkcs11Kek, KekError> {
        let id = random_kek_id()?;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Value(key.to_vec()),
        ];
        self.inner
            .with_session(|s| s.create_object(&template))
            .map_err(p11)?;
        self.kek(label)
    }

    /// Test only: the raw context and slot, to inspect key attributes.
    pub(crate) fn raw_for_test(&self) -> (Pkcs11, Slot) {
        (self.inner.ctx.clone(), self.inner.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_runs_are_found() {
        assert!(has_long_digit_run("ab123456789012cd"));
        assert!(!has_long_digit_run("12345678901a2345678901"));
        assert!(!has_long_digit_run("abcdef"));
    }

    #[test]
    fn kek_labels_are_checked() {
        for ok in ["cardvault-kek-1", "a", "K_2.v3"] {
            assert!(check_kek_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "with space", "ü", &"x".repeat(65), "a/b"] {
            assert!(
                matches!(check_kek_label(bad), Err(KekError::InvalidLabel { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn pin_debug_is_redacted() {
        let pin = Pin::checked(Zeroizing::new("1234-secret".to_owned()), String::new).ok();
        let shown = format!("{pin:?}");
        assert!(!shown.contains("1234"), "{shown}");
        assert!(shown.contains("REDACTED"));
    }
}
