//! Throughput of building and verifying an audit trail in memory.
//!
//! `cargo run --release -p cardvault-audit --example verify_bench -- 1000000`
//!
//! Builds N chained events with a signed checkpoint every 10,000 entries
//! (and one at the end), then runs `verify_trail` over them, and also
//! writes the JSON Lines export to memory and runs `verify_export` over it.
//! Prints entries per second for each step.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::time::Instant;

use audit::export::write_export;
use audit::{verify_export, verify_trail, Action, AuditEvent, Outcome, SigningKey, Trail};
use time::{Duration, OffsetDateTime};

const CHECKPOINT_EVERY: u64 = 10_000;

fn event(i: u64, base: OffsetDateTime) -> AuditEvent {
    let action = [Action::Tokenize, Action::Detokenize, Action::MetadataRead][(i % 3) as usize];
    let mut e = AuditEvent::new(action, Outcome::Success)
        .principal(format!("svc-{}", i % 16))
        .source("10.20.30.40:51234")
        .tenant(format!("tenant-{}", i % 50))
        .token(format!(
            "tok_{:032x}",
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ))
        .request_id(format!("{:016x}-{i}", i.wrapping_mul(31)));
    if action == Action::Detokenize {
        e = e.reason("chargeback review");
    }
    e.time = base + Duration::microseconds(i as i64 * 250);
    e
}

fn rate(n: u64, seconds: f64) -> String {
    format!("{:>10.0} entries/s ({seconds:.2} s)", n as f64 / seconds)
}

fn main() -> ExitCode {
    let n: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1_000_000,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("usage: verify_bench [ENTRIES]");
            return ExitCode::FAILURE;
        }
    };
    let Ok(key) = SigningKey::generate() else {
        eprintln!("no randomness");
        return ExitCode::FAILURE;
    };
    let base = OffsetDateTime::now_utc();

    let started = Instant::now();
    let mut trail = Trail::new();
    let mut entries = Vec::with_capacity(n as usize);
    let mut checkpoints = Vec::new();
    for i in 1..=n {
        entries.push(trail.append(event(i, base)));
        if i % CHECKPOINT_EVERY == 0 || i == n {
            checkpoints.push(trail.checkpoint(&key, base));
        }
    }
    let build = started.elapsed().as_secs_f64();
    println!(
        "build         {n} entries, {} checkpoints: {}",
        checkpoints.len(),
        rate(n, build)
    );

    let public = key.verifying_key();
    let started = Instant::now();
    let report = verify_trail(&entries, checkpoints.iter().cloned(), &public);
    let verify = started.elapsed().as_secs_f64();
    match &report {
        Ok(r) => println!("verify_trail  {}: {}", r.entries, rate(n, verify)),
        Err(f) => {
            println!("verify_trail FAILED: {f}");
            return ExitCode::FAILURE;
        }
    }

    let started = Instant::now();
    let mut export = Vec::with_capacity(n as usize * 400);
    if write_export(
        &mut export,
        &audit::chain::Anchor::genesis(),
        &checkpoints,
        &entries,
    )
    .is_err()
    {
        eprintln!("export failed");
        return ExitCode::FAILURE;
    }
    let write = started.elapsed().as_secs_f64();
    println!(
        "write_export  {} MiB: {}",
        export.len() >> 20,
        rate(n, write)
    );
    drop(entries);

    let started = Instant::now();
    let from_export = verify_export(&export[..], Vec::new(), &public);
    let read = started.elapsed().as_secs_f64();
    match from_export {
        Ok(r) if Ok(&r) == report.as_ref() => {
            println!("verify_export {}: {}", r.entries, rate(n, read))
        }
        other => {
            println!("verify_export FAILED: {other:?}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
