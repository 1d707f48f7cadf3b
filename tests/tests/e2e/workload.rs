//! The write workload of the database outage and failover tests
//! (`outage.rs`, `failover.rs`): threads tokenizing fresh cards until
//! stopped, every request recorded with when it was sent, when it was
//! answered and what came back, so that a test can tell which writes were
//! acknowledged and check each of them afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use e2e::{fresh_pan, Client};

use crate::{exp_year, TENANT};

/// One tokenize request of the workload.
#[derive(Debug, Clone)]
pub struct Sample {
    pub pan: String,
    pub started: Instant,
    pub finished: Instant,
    pub outcome: Outcome,
}

impl Sample {
    pub fn elapsed(&self) -> Duration {
        self.finished.duration_since(self.started)
    }

    /// The token, if the write was acknowledged.
    pub fn token(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Acknowledged(token) => Some(token),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// 201 or 200: acknowledged, with its token.
    Acknowledged(String),
    /// 503 `storage_unavailable`.
    Unavailable,
    /// Anything else (another status or code, a transport error).
    Other(String),
}

/// Threads tokenizing until [`Workload::stop`]; stopped when dropped too, so
/// that no thread outlives a failing test.
pub struct Workload {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workload {
    /// `threads` threads, each sending one tokenize at a time with `client`.
    pub fn start(client: &Client, threads: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|_| {
                let (client, stop, samples) =
                    (client.clone(), Arc::clone(&stop), Arc::clone(&samples));
                thread::spawn(move || tokenize_until(&client, &stop, &samples))
            })
            .collect();
        Workload {
            stop,
            samples,
            threads,
        }
    }

    /// The requests answered so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Waits until `count` writes were acknowledged; panics after `bound`.
    pub fn wait_for_acknowledged(&self, count: usize, bound: Duration) {
        let start = Instant::now();
        loop {
            let (acknowledged, last) = {
                let samples = self.samples.lock().unwrap();
                let n = samples.iter().filter(|s| s.token().is_some()).count();
                (n, samples.last().cloned())
            };
            if acknowledged >= count {
                return;
            }
            assert!(
                start.elapsed() < bound,
                "the workload got {acknowledged} of {count} 2xx within {bound:?}; last: {last:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// When the first acknowledged write matching `which` was answered;
    /// waits for one, panics after `bound` (counted from the call).
    pub fn first_acknowledged(&self, which: impl Fn(&Sample) -> bool, bound: Duration) -> Instant {
        let start = Instant::now();
        loop {
            let first = self
                .samples
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.token().is_some() && which(s))
                .map(|s| s.finished)
                .min();
            if let Some(first) = first {
                return first;
            }
            assert!(
                start.elapsed() < bound,
                "no write succeeded within {bound:?}; last: {:?}",
                self.samples.lock().unwrap().last()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the threads, wait for them, and return every request.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("a workload thread panicked");
        }
        self.samples()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn tokenize_until(client: &Client, stop: &AtomicBool, samples: &Mutex<Vec<Sample>>) {
    let year = exp_year();
    while !stop.load(Ordering::SeqCst) {
        let pan = fresh_pan();
        let started = Instant::now();
        let result = client.try_tokenize(TENANT, &pan, 8, year);
        let finished = Instant::now();
        let outcome = match &result {
            Ok(r) if (r.status == 201 || r.status == 200) && r.json["token"].is_string() => {
                Outcome::Acknowledged(r.str("token"))
            }
            Ok(r) if r.status == 503 && r.error_code() == Some("storage_unavailable") => {
                Outcome::Unavailable
            }
            Ok(r) => Outcome::Other(r.to_string()),
            Err(e) => Outcome::Other(e.clone()),
        };
        let failed = !matches!(outcome, Outcome::Acknowledged(_));
        samples.lock().unwrap().push(Sample {
            pan,
            started,
            finished,
            outcome,
        });
        if failed {
            // Keep asking while the database is away, without spinning.
            thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The acknowledged writes, with their tokens.
pub fn acknowledged(samples: &[Sample]) -> Vec<(&Sample, &str)> {
    samples
        .iter()
        .filter_map(|s| s.token().map(|t| (s, t)))
        .collect()
}

/// How many requests got 503 `storage_unavailable`.
pub fn unavailable(samples: &[Sample]) -> usize {
    samples
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Unavailable))
        .count()
}

/// Answers that were neither 2xx nor 503 `storage_unavailable`, described.
pub fn others(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter_map(|s| match &s.outcome {
            Outcome::Other(what) => Some(format!("after {:?}: {what}", s.elapsed())),
            _ => None,
        })
        .collect()
}

pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}
