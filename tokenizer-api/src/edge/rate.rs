//! Submission rate limits of the edge: per source address and per session,
//! each a fixed one-minute window in this process's memory (several edges
//! behind one balancer each count their own), O(1) per hit.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Never more keys than this in one window: a flood of new keys is refused
/// (until the window ends) instead of growing the map.
const MAX_KEYS: usize = 200_000;

/// At most `per_minute` hits per key and window. The window is one for
/// every key (a fixed minute, started by the first hit after the last one
/// ended), so a hit is O(1): no scan of old entries, the map is dropped
/// whole when the window ends.
#[derive(Debug)]
pub struct RateLimit<K> {
    per_minute: u32,
    window: Mutex<Window<K>>,
}

#[derive(Debug)]
struct Window<K> {
    started: Instant,
    counts: HashMap<K, u32>,
}

impl<K: Eq + Hash> RateLimit<K> {
    pub fn new(per_minute: u32) -> RateLimit<K> {
        RateLimit {
            per_minute,
            window: Mutex::new(Window {
                started: Instant::now(),
                counts: HashMap::new(),
            }),
        }
    }

    /// Count one hit of `key`: `Err(retry_after_secs)` when over the limit
    /// (0 per minute: no limit).
    pub fn hit(&self, key: K) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(w.started) >= WINDOW {
            w.started = now;
            w.counts = HashMap::new();
        }
        let left = WINDOW
            .saturating_sub(now.duration_since(w.started))
            .as_secs()
            .max(1);
        if w.counts.len() >= MAX_KEYS && !w.counts.contains_key(&key) {
            return Err(left);
        }
        let count = w.counts.entry(key).or_insert(0);
        if *count >= self.per_minute {
            return Err(left);
        }
        *count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_per_key() {
        let limit = RateLimit::new(2);
        assert!(limit.hit("a").is_ok());
        assert!(limit.hit("a").is_ok());
        let retry = limit.hit("a").unwrap_err();
        assert!((1..=60).contains(&retry));
        assert!(limit.hit("b").is_ok());
        // The window is shared: a key first seen late in it gets what is left.
        let many = RateLimit::new(1);
        for i in 0..1000 {
            assert!(many.hit(i).is_ok());
            assert!(many.hit(i).is_err());
        }
        let off = RateLimit::new(0);
        for _ in 0..100 {
            assert!(off.hit("a").is_ok());
        }
    }
}
