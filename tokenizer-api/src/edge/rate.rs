//! Submission rate limits of the edge: per source address and per session,
//! each a fixed one-minute window in this process's memory (several edges
//! behind one balancer each count their own).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Past this many keys the expired windows are dropped.
const PRUNE_AT: usize = 10_000;
/// Never more keys than this: a flood of new keys is refused instead.
const MAX_KEYS: usize = 100_000;

/// At most `per_minute` hits per key and window.
#[derive(Debug)]
pub struct RateLimit<K> {
    per_minute: u32,
    windows: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Eq + Hash> RateLimit<K> {
    pub fn new(per_minute: u32) -> RateLimit<K> {
        RateLimit {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Count one hit of `key`: `Err(retry_after_secs)` when over the limit
    /// (0 per minute: no limit).
    pub fn hit(&self, key: K) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= PRUNE_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        if windows.len() >= MAX_KEYS && !windows.contains_key(&key) {
            return Err(WINDOW.as_secs());
        }
        let (start, count) = windows.entry(key).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        if *count >= self.per_minute {
            let left = WINDOW.saturating_sub(now.duration_since(*start));
            return Err(left.as_secs().max(1));
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
        let off = RateLimit::new(0);
        for _ in 0..100 {
            assert!(off.hit("a").is_ok());
        }
    }
}
