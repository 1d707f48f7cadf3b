//! Detokenization monitoring (PCI DSS 10.4, 10.7): rate limits per
//! principal and per tenant, and an anomaly rule on the distinct tokens a
//! principal detokenizes.
//!
//! Everything here is in memory and per instance. No I/O:
//! [`crate::Vault::detokenize_monitored`] asks, and writes the audit events.
//! Time is passed in, so the logic is tested without sleeping. On a store
//! that shares limit state between instances (PostgreSQL: one bucket row
//! per principal and per tenant, `Store::take_shared_rate`), the vault
//! takes the rate limits' tokens there instead, with the rates configured
//! here, and the buckets here are unused; the counters here count the
//! refusals of both.
//!
//! - Limits are token buckets ([`TokenBucket`]): `per_minute` tokens a
//!   minute, at most `burst` saved up. A refusal says how long until the
//!   next token (the `Retry-After` of the 429).
//! - The anomaly rule ([`AnomalyRule`]): time is cut in fixed windows; a
//!   principal's baseline is the mean number of distinct tokens it
//!   detokenized per window over its last `baseline_windows` windows (idle
//!   windows count as 0). In the current window the rule fires once, when
//!   the distinct tokens exceed `max(min_distinct, factor x baseline)`.
//!   Token ids are kept as keyed 64-bit hashes, at most threshold + 1 per
//!   principal, so memory stays bounded.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys (principals, tenants, sources) held per map before idle ones are
/// dropped; a bound on memory whatever the callers send.
pub const MAX_KEYS: usize = 100_000;

/// A rate: `per_minute` (0: no limit) with at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    pub const OFF: Rate = Rate {
        per_minute: 0,
        burst: 0,
    };

    pub fn is_off(self) -> bool {
        self.per_minute == 0
    }

    fn capacity(self) -> f64 {
        f64::from(self.burst.max(1))
    }

    fn per_second(self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }
}

/// One token bucket; starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn full(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: rate.capacity(),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_second()).min(rate.capacity());
        if now > self.at {
            self.at = now;
        }
    }

    /// Take one token, or say how long until one is there.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        if rate.is_off() {
            return Ok(());
        }
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second(),
            ))
        }
    }

    /// Return a token taken for a request that was refused later.
    pub fn give_back(&mut self, rate: Rate) {
        self.tokens = (self.tokens + 1.0).min(rate.capacity());
    }

    /// Full again: nothing to remember about this key.
    pub fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= rate.capacity()
    }
}

/// One bucket per key.
#[derive(Debug)]
pub struct KeyedBuckets {
    rate: Rate,
    map: Mutex<HashMap<String, TokenBucket>>,
}

impl KeyedBuckets {
    pub fn new(rate: Rate) -> KeyedBuckets {
        KeyedBuckets {
            rate,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let rate = self.rate;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            // Full buckets hold nothing worth keeping; if every key is busy,
            // forget them all rather than grow without bound.
            map.retain(|_, b| !b.is_full(rate, now));
            if map.len() >= MAX_KEYS {
                map.clear();
            }
        }
        map.entry(key.to_owned())
            .or_insert_with(|| TokenBucket::full(rate, now))
            .take(rate, now)
    }

    pub fn give_back(&self, key: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get_mut(key) {
            b.give_back(self.rate);
        }
    }
}

/// The anomaly rule (see the module doc). `min_distinct` 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnomalyRule {
    pub window: Duration,
    pub factor: u32,
    pub min_distinct: u32,
    pub baseline_windows: u32,
}

impl AnomalyRule {
    pub const OFF: AnomalyRule = AnomalyRule {
        window: Duration::from_secs(300),
        factor: 5,
        min_distinct: 0,
        baseline_windows: 12,
    };

    pub fn is_off(&self) -> bool {
        self.min_distinct == 0 || self.window.is_zero()
    }
}

/// What the anomaly rule saw when it fired. Counts only: safe for the audit
/// trail and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    /// Distinct tokens in the current window (threshold + 1 when it fired).
    pub distinct: u64,
    /// Mean distinct tokens per window over the baseline windows.
    pub baseline: f64,
    /// The count the window had to exceed.
    pub threshold: u64,
    pub window: Duration,
    /// Windows the baseline was taken over.
    pub baseline_windows: usize,
}

impl Anomaly {
    /// The audit detail: `distinct_tokens=51 threshold=50 baseline=2.5
    /// window_s=300 baseline_windows=12` (short numbers, never a card).
    pub fn detail(&self) -> String {
        format!(
            "distinct_tokens={} threshold={} baseline={:.1} window_s={} baseline_windows={}",
            self.distinct,
            self.threshold,
            self.baseline,
            self.window.as_secs(),
            self.baseline_windows
        )
    }
}

#[derive(Debug)]
struct Activity {
    window_start: Instant,
    seen: HashSet<u64>,
    history: VecDeque<u64>,
    threshold: u64,
    fired: bool,
}

impl Activity {
    fn new(rule: &AnomalyRule, now: Instant) -> Activity {
        Activity {
            window_start: now,
            seen: HashSet::new(),
            history: VecDeque::new(),
            threshold: u64::from(rule.min_distinct),
            fired: false,
        }
    }

    fn baseline(&self) -> f64 {
        if self.history.is_empty() {
            return 0.0;
        }
        // At most a few hundred windows of small counts: exact in f64.
        let sum: u64 = self.history.iter().sum();
        sum as f64 / self.history.len() as f64
    }

    /// Move to the window `now` is in, closing the ones that passed.
    fn roll(&mut self, rule: &AnomalyRule, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        let passed = elapsed.as_nanos() / rule.window.as_nanos().max(1);
        if passed == 0 {
            return;
        }
        let keep = usize::try_from(rule.baseline_windows.max(1)).unwrap_or(usize::MAX);
        self.history.push_back(self.seen.len() as u64);
        let idle = usize::try_from(passed - 1).unwrap_or(usize::MAX).min(keep);
        self.history.extend(std::iter::repeat_n(0, idle));
        while self.history.len() > keep {
            self.history.pop_front();
        }
        let passed32 = u32::try_from(passed).unwrap_or(u32::MAX);
        self.window_start = rule
            .window
            .checked_mul(passed32)
            .and_then(|d| self.window_start.checked_add(d))
            .unwrap_or(now);
        self.seen.clear();
        self.fired = false;
        let scaled = (self.baseline() * f64::from(rule.factor)).ceil();
        // Saturating float-to-int cast: a baseline is a small count.
        self.threshold = u64::from(rule.min_distinct).max(scaled as u64);
    }
}

/// The anomaly rule's state, per principal.
#[derive(Debug)]
pub struct AnomalyDetector {
    rule: AnomalyRule,
    hasher: RandomState,
    principals: Mutex<HashMap<String, Activity>>,
}

impl AnomalyDetector {
    pub fn new(rule: AnomalyRule) -> AnomalyDetector {
        AnomalyDetector {
            rule,
            hasher: RandomState::new(),
            principals: Mutex::new(HashMap::new()),
        }
    }

    /// Record that `principal` detokenized `token` at `now`; `Some` the
    /// first time in a window the rule fires.
    pub fn observe(&self, principal: &str, token: &str, now: Instant) -> Option<Anomaly> {
        if self.rule.is_off() {
            return None;
        }
        let rule = self.rule;
        let hash = self.hasher.hash_one(token);
        let mut map = self.principals.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_KEYS && !map.contains_key(principal) {
            map.clear();
        }
        let a = map
            .entry(principal.to_owned())
            .or_insert_with(|| Activity::new(&rule, now));
        a.roll(&rule, now);
        if a.fired {
            return None;
        }
        a.seen.insert(hash);
        let distinct = a.seen.len() as u64;
        if distinct > a.threshold {
            a.fired = true;
            // Nothing more to learn in this window: the next one starts
            // from the count it reached.
            return Some(Anomaly {
                distinct,
                baseline: a.baseline(),
                threshold: a.threshold,
                window: rule.window,
                baseline_windows: a.history.len(),
            });
        }
        None
    }
}

/// What this instance knows of the anomaly rule's windows counted by the
/// database (several instances, see
/// [`crate::store::Store::record_shared_reveal`]): the threshold of a
/// principal's window from the counts of the windows before it (computed
/// once per principal and window), and the tokens this instance already
/// recorded in the principal's current window and whether it fired, so
/// that a repeat (which cannot change the fleet's distinct count) or any
/// reveal after the window fired asks the database nothing.
#[derive(Debug, Default)]
pub struct SharedThresholds {
    windows: Mutex<HashMap<String, SeenWindow>>,
}

/// A principal's current shared window as this instance saw it.
#[derive(Debug)]
struct SeenWindow {
    window_start: i64,
    ends: Instant,
    hashes: HashSet<i64>,
    fired: bool,
    /// (threshold, baseline, baseline windows), once computed.
    threshold: Option<(u64, f64, usize)>,
}

/// Token hashes remembered per principal and window (beyond: asked again).
const MAX_SEEN_PER_WINDOW: usize = 10_000;

impl SharedThresholds {
    /// Whether recording `hash` for `principal` now would change nothing:
    /// this instance recorded it in the current window already, or the
    /// window fired.
    pub fn already_counted(&self, principal: &str, hash: i64, now: Instant) -> bool {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows
            .get(principal)
            .is_some_and(|w| w.ends > now && (w.fired || w.hashes.contains(&hash)))
    }

    /// Remember what the database answered for `hash` (a new window
    /// replaces the principal's previous one).
    pub fn note(
        &self,
        principal: &str,
        hash: i64,
        reveal: &crate::store::SharedReveal,
        now: Instant,
    ) {
        let left = Duration::from_millis(u64::try_from(reveal.left_ms).unwrap_or(0));
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_KEYS && !windows.contains_key(principal) {
            windows.clear();
        }
        let fresh = || SeenWindow {
            window_start: reveal.window_start,
            ends: now + left,
            hashes: HashSet::new(),
            fired: false,
            threshold: None,
        };
        let w = windows.entry(principal.to_owned()).or_insert_with(fresh);
        if w.window_start != reveal.window_start {
            *w = fresh();
        }
        w.fired |= reveal.fired;
        if w.hashes.len() < MAX_SEEN_PER_WINDOW {
            w.hashes.insert(hash);
        }
    }

    /// The principal's window fired (this instance claimed it).
    pub fn note_fired(&self, principal: &str, window_start: i64) {
        self.with_window(principal, window_start, |w| w.fired = true);
    }

    /// The (threshold, baseline, baseline windows) of the principal's
    /// window starting at `window_start`, if computed here.
    pub fn get(&self, principal: &str, window_start: i64) -> Option<(u64, f64, usize)> {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows
            .get(principal)
            .filter(|w| w.window_start == window_start)
            .and_then(|w| w.threshold)
    }

    /// Keep the threshold of the window (noted before by [`Self::note`]).
    pub fn put(&self, principal: &str, window_start: i64, value: (u64, f64, usize)) {
        self.with_window(principal, window_start, |w| w.threshold = Some(value));
    }

    fn with_window(&self, principal: &str, window_start: i64, f: impl FnOnce(&mut SeenWindow)) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = windows
            .get_mut(principal)
            .filter(|w| w.window_start == window_start)
        {
            f(w);
        }
    }
}

impl AnomalyRule {
    /// The window length in ms (at least 1).
    pub fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// The threshold of the window starting at `window_start` from the
    /// principal's earlier windows (`(start, distinct)`, any order; idle
    /// windows absent): the baseline is their mean over the windows since
    /// the first of them, at most `baseline_windows` back, idle ones
    /// counting 0 (the in-memory rule's baseline, over shared counts).
    /// Returns (threshold, baseline, windows the baseline was taken over).
    pub fn threshold_from(&self, history: &[(i64, u64)], window_start: i64) -> (u64, f64, usize) {
        let w = self.window_ms();
        let keep = i64::from(self.baseline_windows.max(1));
        let earliest = window_start.saturating_sub(keep.saturating_mul(w));
        let past: Vec<&(i64, u64)> = history
            .iter()
            .filter(|(s, _)| *s >= earliest && *s < window_start)
            .collect();
        let Some(first) = past.iter().map(|(s, _)| *s).min() else {
            return (u64::from(self.min_distinct), 0.0, 0);
        };
        let windows = ((window_start - first) / w).clamp(1, keep);
        let sum: u64 = past.iter().map(|(_, n)| *n).sum();
        // Small counts over at most a few hundred windows: exact in f64.
        let baseline = sum as f64 / windows as f64;
        let scaled = (baseline * f64::from(self.factor)).ceil();
        let threshold = u64::from(self.min_distinct).max(scaled as u64);
        (
            threshold,
            baseline,
            usize::try_from(windows).unwrap_or(usize::MAX),
        )
    }
}

/// Which limit refused a detokenize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    Principal,
    Tenant,
}

impl LimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Principal => "principal",
            LimitScope::Tenant => "tenant",
        }
    }
}

/// The settings of [`DetokenizeMonitor`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MonitorConfig {
    pub per_principal: Rate,
    pub per_tenant: Rate,
    pub anomaly: AnomalyRule,
}

impl MonitorConfig {
    /// No limit, no anomaly rule.
    pub const OFF: MonitorConfig = MonitorConfig {
        per_principal: Rate::OFF,
        per_tenant: Rate::OFF,
        anomaly: AnomalyRule::OFF,
    };
}

/// Counters since start (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonitorCounts {
    pub limited_principal: u64,
    pub limited_tenant: u64,
    pub anomalies: u64,
}

/// Rate limits and the anomaly rule of detokenize, for one instance.
#[derive(Debug)]
pub struct DetokenizeMonitor {
    principals: KeyedBuckets,
    tenants: KeyedBuckets,
    anomaly: AnomalyDetector,
    shared: SharedThresholds,
    limited_principal: AtomicU64,
    limited_tenant: AtomicU64,
    anomalies: AtomicU64,
}

impl DetokenizeMonitor {
    pub fn new(config: MonitorConfig) -> DetokenizeMonitor {
        DetokenizeMonitor {
            principals: KeyedBuckets::new(config.per_principal),
            tenants: KeyedBuckets::new(config.per_tenant),
            anomaly: AnomalyDetector::new(config.anomaly),
            shared: SharedThresholds::default(),
            limited_principal: AtomicU64::new(0),
            limited_tenant: AtomicU64::new(0),
            anomalies: AtomicU64::new(0),
        }
    }

    /// One detokenize by this principal (by id), before the token is looked up.
    pub fn admit_principal(&self, principal_id: &str, now: Instant) -> Result<(), Duration> {
        self.principals.take(principal_id, now).inspect_err(|_| {
            self.limited_principal.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// One detokenize of a card of this tenant; a refusal gives the
    /// principal's token back (the request did not happen).
    pub fn admit_tenant(
        &self,
        tenant: &str,
        principal_id: &str,
        now: Instant,
    ) -> Result<(), Duration> {
        self.tenants.take(tenant, now).inspect_err(|_| {
            self.principals.give_back(principal_id);
            self.limited_tenant.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// The configured rate of a scope (the shared buckets of a PostgreSQL
    /// store take it per call: see [`crate::Vault`]'s admission).
    pub fn rate(&self, scope: LimitScope) -> Rate {
        match scope {
            LimitScope::Principal => self.principals.rate,
            LimitScope::Tenant => self.tenants.rate,
        }
    }

    /// The anomaly rule configured.
    pub fn anomaly_rule(&self) -> AnomalyRule {
        self.anomaly.rule
    }

    /// Count an anomaly decided elsewhere (by the shared windows).
    pub fn count_anomaly(&self) {
        self.anomalies.fetch_add(1, Ordering::Relaxed);
    }

    /// The shared windows' thresholds known to this instance.
    pub fn shared_thresholds(&self) -> &SharedThresholds {
        &self.shared
    }

    /// Count a refusal decided elsewhere (by the shared buckets).
    pub fn count_limited(&self, scope: LimitScope) {
        match scope {
            LimitScope::Principal => &self.limited_principal,
            LimitScope::Tenant => &self.limited_tenant,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// A detokenize that happened; `Some` when the anomaly rule fires.
    pub fn observe(&self, principal_id: &str, token: &str, now: Instant) -> Option<Anomaly> {
        let fired = self.anomaly.observe(principal_id, token, now);
        if fired.is_some() {
            self.anomalies.fetch_add(1, Ordering::Relaxed);
        }
        fired
    }

    pub fn counts(&self) -> MonitorCounts {
        MonitorCounts {
            limited_principal: self.limited_principal.load(Ordering::Relaxed),
            limited_tenant: self.limited_tenant.load(Ordering::Relaxed),
            anomalies: self.anomalies.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let rate = Rate {
            per_minute: 60,
            burst: 3,
        };
        let t0 = Instant::now();
        let mut b = TokenBucket::full(rate, t0);
        for _ in 0..3 {
            b.take(rate, t0).unwrap();
        }
        let wait = b.take(rate, t0).unwrap_err();
        assert!(wait > Duration::from_millis(990) && wait <= SEC, "{wait:?}");
        // Half a second later: half a token, half a second to wait.
        let wait = b.take(rate, t0 + SEC / 2).unwrap_err();
        assert!(
            wait > Duration::from_millis(490) && wait <= SEC / 2,
            "{wait:?}"
        );
        b.take(rate, t0 + SEC).unwrap();
        assert!(b.take(rate, t0 + SEC).is_err());
        // Never more than the burst saved up.
        let later = t0 + 100 * SEC;
        for _ in 0..3 {
            b.take(rate, later).unwrap();
        }
        assert!(b.take(rate, later).is_err());
        // Off: always admitted.
        let mut off = TokenBucket::full(Rate::OFF, t0);
        for _ in 0..1000 {
            off.take(Rate::OFF, t0).unwrap();
        }
    }

    #[test]
    fn keyed_buckets_are_independent_and_give_back() {
        let m = DetokenizeMonitor::new(MonitorConfig {
            per_principal: Rate {
                per_minute: 6,
                burst: 2,
            },
            per_tenant: Rate {
                per_minute: 6,
                burst: 1,
            },
            anomaly: AnomalyRule::OFF,
        });
        let t = Instant::now();
        m.admit_principal("a", t).unwrap();
        m.admit_tenant("shop-1", "a", t).unwrap();
        m.admit_principal("a", t).unwrap();
        // The tenant's one token is used: refused, and "a" gets its token back.
        let wait = m.admit_tenant("shop-1", "a", t).unwrap_err();
        assert!(wait > 9 * SEC && wait <= 10 * SEC, "{wait:?}");
        m.admit_principal("a", t).unwrap();
        assert!(m.admit_principal("a", t).is_err());
        // Another principal, another tenant: unaffected.
        m.admit_principal("b", t).unwrap();
        m.admit_tenant("shop-2", "b", t).unwrap();
        assert_eq!(
            m.counts(),
            MonitorCounts {
                limited_principal: 1,
                limited_tenant: 1,
                anomalies: 0
            }
        );
    }

    #[test]
    fn keyed_buckets_stay_bounded() {
        let k = KeyedBuckets::new(Rate {
            per_minute: 60,
            burst: 1,
        });
        let t = Instant::now();
        for i in 0..MAX_KEYS + 10 {
            let _ = k.take(&format!("p{i}"), t);
        }
        assert!(k.map.lock().unwrap().len() <= MAX_KEYS);
    }

    fn rule(min: u32) -> AnomalyRule {
        AnomalyRule {
            window: 60 * SEC,
            factor: 3,
            min_distinct: min,
            baseline_windows: 4,
        }
    }

    #[test]
    fn anomaly_fires_once_above_the_minimum_without_history() {
        let d = AnomalyDetector::new(rule(3));
        let t = Instant::now();
        for tok in ["t1", "t2", "t3", "t1", "t2"] {
            assert_eq!(d.observe("p", tok, t), None);
        }
        let a = d.observe("p", "t4", t + SEC).unwrap();
        assert_eq!((a.distinct, a.threshold, a.baseline_windows), (4, 3, 0));
        assert_eq!(
            a.detail(),
            "distinct_tokens=4 threshold=3 baseline=0.0 window_s=60 baseline_windows=0"
        );
        // Once per window.
        assert_eq!(d.observe("p", "t5", t + 2 * SEC), None);
        // Other principals have their own count.
        for tok in ["t1", "t2", "t3"] {
            assert_eq!(d.observe("q", tok, t), None);
        }
        assert!(d.observe("q", "t4", t).is_some());
    }

    #[test]
    fn anomaly_threshold_follows_the_baseline() {
        let d = AnomalyDetector::new(rule(3));
        let t0 = Instant::now();
        // Four windows of 4 distinct tokens each: each fires (first one
        // against the minimum; then 3 x baseline grows past 4).
        let mut fired = Vec::new();
        for w in 0..4u32 {
            let t = t0 + w * 60 * SEC;
            for i in 0..4 {
                fired.push(d.observe("p", &format!("w{w}-{i}"), t).is_some());
            }
        }
        // Window 0: threshold 3, fires at the 4th. Window 1: baseline 4,
        // threshold 12: quiet from then on.
        assert_eq!(fired.iter().filter(|f| **f).count(), 1, "{fired:?}");
        // Window 4: baseline 4, threshold 12; the 13th distinct fires.
        let t = t0 + 4 * 60 * SEC;
        for i in 0..12 {
            assert_eq!(d.observe("p", &format!("x{i}"), t), None);
        }
        let a = d.observe("p", "x12", t).unwrap();
        assert_eq!((a.distinct, a.threshold), (13, 12));
        assert!((a.baseline - 4.0).abs() < 1e-9, "{a:?}");
        // A long pause: idle windows count as 0, so the baseline falls back
        // and the minimum applies again.
        let t = t0 + 100 * 60 * SEC;
        for i in 0..3 {
            assert_eq!(d.observe("p", &format!("y{i}"), t), None);
        }
        let a = d.observe("p", "y3", t).unwrap();
        assert_eq!((a.threshold, a.baseline_windows), (3, 4));
    }

    #[test]
    fn anomaly_rule_off() {
        let d = AnomalyDetector::new(rule(0));
        let t = Instant::now();
        for i in 0..1000 {
            assert_eq!(d.observe("p", &format!("t{i}"), t), None);
        }
    }

    #[test]
    fn shared_thresholds_follow_the_baseline_of_earlier_windows() {
        let rule = AnomalyRule {
            window: Duration::from_secs(60),
            factor: 5,
            min_distinct: 10,
            baseline_windows: 4,
        };
        let w = 60_000;
        let now = 100 * w;
        // No history: the minimum.
        assert_eq!(rule.threshold_from(&[], now), (10, 0.0, 0));
        // Four windows back, 4 and 8 distinct (two idle): baseline 3, x5.
        let history = [(now - 4 * w, 4), (now - 2 * w, 8)];
        assert_eq!(rule.threshold_from(&history, now), (15, 3.0, 4));
        // Since the first window only: one window of 6 -> baseline 6.
        assert_eq!(rule.threshold_from(&[(now - w, 6)], now), (30, 6.0, 1));
        // Windows beyond baseline_windows, and the current one, do not count.
        let history = [(now - 9 * w, 500), (now, 500), (now - w, 1)];
        assert_eq!(rule.threshold_from(&history, now), (10, 1.0, 1));
    }
}
