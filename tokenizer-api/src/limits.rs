//! The guard against unauthenticated floods, per source address.
//!
//! A failed authentication with a well-formed key id costs one argon2 check
//! (~50 ms of CPU) and every failure writes an audit event, so failures are
//! counted per source address (IPv4 address, IPv6 /64) in a token bucket of
//! `auth_failures_per_source` a minute. When a source has used them up it is
//! *blocked* for `auth_block_secs`: its requests get 429 `rate_limited` with
//! `Retry-After` before anything is read from the store or hashed, and the
//! block itself is one `source_blocked` audit event (the refused requests
//! are counted in `cardvault_rate_limited_total{scope="source"}`, not
//! audited one by one: a flood must not write the trail).
//!
//! Well-behaved callers are not affected: other sources have their own
//! budget, and a request from a blocked source whose key this process has
//! already verified (the authenticator's cache: one SHA-256, no I/O) is let
//! through to the normal authentication.
//!
//! In memory on SQLite (one process). On PostgreSQL the count is the
//! fleet's: every instance takes a failure from the same bucket
//! (`Store::take_shared_rate`, scope `source`), the instance that empties
//! it records the block in `source_blocks` (once: `Store::block_source`),
//! and every instance reads the blocks in force every second into this
//! map (`app::watch_source_blocks`), so the check stays in memory and a
//! restart keeps the blocks. The source is the TCP peer (behind a proxy,
//! every caller shares the proxy's address).
//!
//! Also here: [`append_within`], the size limit of a body (a request's, an
//! upstream's answer) read into a zeroizing buffer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vault::monitor::{Rate, TokenBucket, MAX_KEYS};

#[derive(Debug)]
enum SourceState {
    Counting(TokenBucket),
    Blocked { until: Instant },
}

/// Failed authentications per source, and the sources blocked for now.
#[derive(Debug)]
pub struct SourceGuard {
    rate: Rate,
    block: Duration,
    sources: Mutex<HashMap<IpAddr, SourceState>>,
    refused: AtomicU64,
    blocks: AtomicU64,
}

/// The key of a source: IPv4 as is, IPv6 by its /64 (one host usually has a
/// whole /64 to pick addresses from).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

impl SourceGuard {
    /// `per_minute` failed authentications (0: no limit), then blocked for `block`.
    pub fn new(per_minute: u32, block: Duration) -> SourceGuard {
        SourceGuard {
            rate: Rate {
                per_minute,
                burst: per_minute,
            },
            block,
            sources: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
        }
    }

    /// `Err(wait)` while `ip` is blocked. A request actually refused for
    /// it is counted with [`SourceGuard::refuse`].
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let key = source_key(ip);
        match sources.get(&key) {
            Some(SourceState::Blocked { until }) if *until > now => Err(*until - now),
            Some(SourceState::Blocked { .. }) => {
                sources.remove(&key);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Record a failed authentication from `ip`; `Some(block)` when this
    /// failure starts a block.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.rate.is_off() {
            return None;
        }
        let rate = self.rate;
        let key = source_key(ip);
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_KEYS && !sources.contains_key(&key) {
            sources.retain(|_, s| match s {
                SourceState::Blocked { until } => *until > now,
                SourceState::Counting(b) => !b.is_full(rate, now),
            });
            if sources.len() >= MAX_KEYS {
                // Keep the blocks; forget the counts.
                sources.retain(|_, s| matches!(s, SourceState::Blocked { .. }));
            }
        }
        let state = sources
            .entry(key)
            .or_insert_with(|| SourceState::Counting(TokenBucket::full(rate, now)));
        let exhausted = match state {
            SourceState::Counting(bucket) => bucket.take(rate, now).is_err(),
            SourceState::Blocked { until } if *until > now => return None,
            SourceState::Blocked { .. } => {
                let mut bucket = TokenBucket::full(rate, now);
                let exhausted = bucket.take(rate, now).is_err();
                *state = SourceState::Counting(bucket);
                exhausted
            }
        };
        if !exhausted {
            return None;
        }
        *state = SourceState::Blocked {
            until: now + self.block,
        };
        self.blocks.fetch_add(1, Ordering::Relaxed);
        Some(self.block)
    }

    /// Count one request refused because its source is blocked.
    pub fn refuse(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused while blocked, since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Blocks started, since start.
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// Sources blocked now.
    pub fn blocked_now(&self) -> usize {
        let now = Instant::now();
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| matches!(s, SourceState::Blocked { until } if *until > now))
            .count()
    }

    pub fn limit_per_minute(&self) -> u32 {
        self.rate.per_minute
    }

    pub fn block_duration(&self) -> Duration {
        self.block
    }

    /// The failure budget of a source (per minute, the same burst).
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Block `ip` until `now + wait`, as decided elsewhere (a block of the
    /// fleet, read from the database); a longer block in place stays.
    /// `started`: this instance started it (counted in `blocks`).
    pub fn block(&self, ip: IpAddr, wait: Duration, now: Instant, started: bool) {
        if self.rate.is_off() {
            return;
        }
        let until = now + wait;
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_KEYS {
            sources.retain(|_, s| matches!(s, SourceState::Blocked { until } if *until > now));
        }
        let state = sources
            .entry(source_key(ip))
            .or_insert(SourceState::Blocked { until });
        match state {
            SourceState::Blocked { until: held } if *held >= until => {}
            _ => *state = SourceState::Blocked { until },
        }
        if started {
            self.blocks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The database key of a source (IPv4 address, IPv6 /64), as text.
pub fn source_id(ip: IpAddr) -> String {
    source_key(ip).to_string()
}

/// Seconds for `Retry-After`: rounded up, at least 1.
/// Append `chunk` to `buf` unless that would pass `limit` bytes (then
/// `false`, nothing appended). The buffer is grown by hand, into a new
/// zeroizing one, so that no unzeroized copy of what it holds (it may be
/// card data) is left behind by a reallocation.
pub fn append_within(buf: &mut zeroize::Zeroizing<Vec<u8>>, chunk: &[u8], limit: usize) -> bool {
    let needed = buf.len() + chunk.len();
    if needed > limit {
        return false;
    }
    if needed > buf.capacity() {
        let mut bigger = zeroize::Zeroizing::new(Vec::with_capacity(
            needed.max(buf.capacity() * 2).min(limit),
        ));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(chunk);
    true
}

pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_source_is_blocked_after_its_failures_and_released_later() {
        let g = SourceGuard::new(3, Duration::from_secs(10));
        let bad: IpAddr = "127.0.0.2".parse().unwrap();
        let good: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            g.check(bad, t).unwrap();
            assert_eq!(g.failed(bad, t), None);
        }
        assert_eq!(g.failed(bad, t), Some(Duration::from_secs(10)));
        let wait = g.check(bad, t + Duration::from_secs(4)).unwrap_err();
        g.refuse();
        assert_eq!(wait, Duration::from_secs(6));
        assert_eq!(retry_after_secs(wait), 6);
        // Failures while blocked do not extend the block.
        assert_eq!(g.failed(bad, t + Duration::from_secs(5)), None);
        // Others are unaffected.
        g.check(good, t).unwrap();
        assert_eq!(g.failed(good, t), None);
        assert_eq!((g.refused(), g.blocks(), g.blocked_now()), (1, 1, 1));
        // After the block: a fresh budget.
        let later = t + Duration::from_secs(11);
        g.check(bad, later).unwrap();
        for _ in 0..3 {
            assert_eq!(g.failed(bad, later), None);
        }
        assert!(g.failed(bad, later).is_some());
    }

    #[test]
    fn ipv6_sources_are_keyed_by_their_64_prefix() {
        let g = SourceGuard::new(1, Duration::from_secs(10));
        let t = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(g.failed(a, t), None);
        assert!(g.failed(b, t).is_some());
        assert!(g.check(a, t).is_err());
        g.check(c, t).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn no_limit_when_off() {
        let g = SourceGuard::new(0, Duration::from_secs(10));
        let t = Instant::now();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        for _ in 0..1000 {
            assert_eq!(g.failed(ip, t), None);
            g.check(ip, t).unwrap();
        }
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
