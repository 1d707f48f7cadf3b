//! The card security code (CVC, CVV, CID), held only in this process's
//! memory and only as long as PCI DSS 3.3.1 allows: until the first
//! detokenize that asks for it, or its time to live (at most one hour),
//! whichever comes first.
//!
//! Never written anywhere: not to the database, a log, a backup or the audit
//! trail (which records only that a code was released). Each code is sealed
//! with AES-256-GCM under a key drawn when the holder is created (it lives
//! as long as the vault object: sealing the service or a restart loses every
//! code, by design), with its token as associated data, so a code cannot be
//! moved to another token. The clear digits exist only in a zeroizing
//! [`Cvc`] between parsing and sealing, and between opening and the
//! response. Whether pages of this process can be swapped out is the
//! process's memory lock (`tokenizer-api`'s hardening).
//!
//! With several instances a code lives on the instance that received it:
//! the payment router must reach that instance (route by token), or the
//! code is simply not available (`cvc_available: false`) and the payment
//! goes without it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use crate::brand::Brand;

/// The longest a code is held (PCI DSS: only until authorization; an hour
/// is the ceiling we allow for the first authorization to happen).
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// A card security code: 3 digits, 4 for American Express. Zeroized on
/// drop; its `Debug` shows nothing.
pub struct Cvc(Zeroizing<String>);

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc([REDACTED])")
    }
}

/// Why a code was refused (never the code itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CvcError {
    #[error("the security code must be 3 digits (4 for American Express)")]
    Invalid,
    #[error("the random number generator failed")]
    Rng,
}

impl Cvc {
    /// A code for a card of `brand`.
    pub fn parse(s: &str, brand: Brand) -> Result<Cvc, CvcError> {
        let want = if brand == Brand::Amex { 4 } else { 3 };
        if s.len() == want && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Cvc(Zeroizing::new(s.to_owned())))
        } else {
            Err(CvcError::Invalid)
        }
    }

    /// The digits, for the response of the one detokenize that releases it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

struct Held {
    nonce: [u8; 12],
    ciphertext: Vec<u8>,
    until: Instant,
}

/// Codes by token, sealed under a key of this holder's lifetime.
pub struct CvcHolder {
    cipher: Aes256Gcm,
    ttl: Duration,
    held: Mutex<HashMap<String, Held>>,
}

impl fmt::Debug for CvcHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CvcHolder")
            .field("ttl", &self.ttl)
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl CvcHolder {
    /// A holder with a fresh key; `ttl` is capped at [`MAX_TTL`].
    pub fn new(ttl: Duration) -> Result<CvcHolder, CvcError> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(key.as_mut()).map_err(|_| CvcError::Rng)?;
        let cipher = Aes256Gcm::new_from_slice(key.as_ref()).map_err(|_| CvcError::Rng)?;
        Ok(CvcHolder {
            cipher,
            ttl: ttl.min(MAX_TTL),
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold `cvc` for `token` (replacing one held before) until the time to
    /// live runs out.
    pub fn put(&self, token: &str, cvc: Cvc, now: Instant) -> Result<(), CvcError> {
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|_| CvcError::Rng)?;
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: cvc.expose().as_bytes(),
                    aad: token.as_bytes(),
                },
            )
            .map_err(|_| CvcError::Rng)?;
        self.lock().insert(
            token.to_owned(),
            Held {
                nonce,
                ciphertext,
                until: now + self.ttl,
            },
        );
        Ok(())
    }

    /// Release the code of `token`: returned once, then gone. `None` when
    /// none is held or it timed out.
    pub fn take(&self, token: &str, now: Instant) -> Option<Cvc> {
        let held = self.lock().remove(token)?;
        if held.until <= now {
            return None;
        }
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    Nonce::from_slice(&held.nonce),
                    Payload {
                        msg: &held.ciphertext,
                        aad: token.as_bytes(),
                    },
                )
                .ok()?,
        );
        let digits = std::str::from_utf8(&plain).ok()?;
        Some(Cvc(Zeroizing::new(digits.to_owned())))
    }

    /// Whether a code is held for `token` (and not timed out).
    pub fn has(&self, token: &str, now: Instant) -> bool {
        self.lock().get(token).is_some_and(|h| h.until > now)
    }

    /// Drop the code of `token` (the token was deleted or purged).
    pub fn forget(&self, token: &str) {
        self.lock().remove(token);
    }

    /// Drop every code past its time to live; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut held = self.lock();
        let before = held.len();
        held.retain(|_, h| h.until > now);
        before - held.len()
    }

    /// Codes held now.
    pub fn held(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn codes_by_brand() {
        assert!(Cvc::parse("123", Brand::Visa).is_ok());
        assert!(Cvc::parse("1234", Brand::Amex).is_ok());
        for (bad, brand) in [
            ("1234", Brand::Visa),
            ("123", Brand::Amex),
            ("12a", Brand::Visa),
            ("", Brand::Mastercard),
            ("١٢٣", Brand::Visa),
        ] {
            assert_eq!(Cvc::parse(bad, brand).unwrap_err(), CvcError::Invalid);
        }
        assert_eq!(
            format!("{:?}", Cvc::parse("123", Brand::Visa).unwrap()),
            "Cvc([REDACTED])"
        );
    }

    #[test]
    fn released_once_then_gone() {
        let h = CvcHolder::new(Duration::from_secs(60)).unwrap();
        let now = Instant::now();
        h.put("tok_a", Cvc::parse("737", Brand::Visa).unwrap(), now)
            .unwrap();
        assert!(h.has("tok_a", now));
        assert!(!h.has("tok_b", now));
        assert_eq!(h.held(), 1);
        assert_eq!(h.take("tok_a", now).unwrap().expose(), "737");
        assert!(h.take("tok_a", now).is_none());
        assert_eq!(h.held(), 0);
    }

    #[test]
    fn timed_out_codes_are_not_released() {
        let h = CvcHolder::new(Duration::from_secs(2)).unwrap();
        let now = Instant::now();
        h.put("tok_a", Cvc::parse("737", Brand::Visa).unwrap(), now)
            .unwrap();
        h.put("tok_b", Cvc::parse("738", Brand::Visa).unwrap(), now)
            .unwrap();
        let later = now + Duration::from_secs(3);
        assert!(!h.has("tok_a", later));
        assert!(h.take("tok_a", later).is_none());
        assert_eq!(h.sweep(later), 1);
        assert_eq!(h.held(), 0);
        // The time to live is capped at an hour.
        assert_eq!(
            CvcHolder::new(Duration::from_secs(86_400)).unwrap().ttl(),
            MAX_TTL
        );
    }

    #[test]
    fn a_code_is_bound_to_its_token_and_not_kept_in_clear() {
        let h = CvcHolder::new(Duration::from_secs(60)).unwrap();
        let now = Instant::now();
        h.put("tok_a", Cvc::parse("7391", Brand::Amex).unwrap(), now)
            .unwrap();
        {
            let mut held = h.lock();
            let entry = held.remove("tok_a").unwrap();
            assert!(
                !entry.ciphertext.windows(4).any(|w| w == b"7391"),
                "sealed, not in clear"
            );
            // Moved to another token, it no longer opens.
            held.insert("tok_b".into(), entry);
        }
        assert!(h.take("tok_b", now).is_none());
        // Another holder (another process, after a restart) has another key.
        let other = CvcHolder::new(Duration::from_secs(60)).unwrap();
        assert!(!other.has("tok_a", now));
    }
}
