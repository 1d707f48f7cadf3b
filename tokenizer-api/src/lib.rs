//! The cardvault HTTP service and operator CLI (the `tokenizer` binary).
//!
//! This crate owns HTTP and the command line: configuration ([`config`]),
//! building and running the server ([`app::Application`]), the handlers
//! ([`routes`]), the one mapping from errors to HTTP responses ([`error`]),
//! the guard against unauthenticated floods ([`limits`]), the sealed start
//! and unsealing ([`seal`]), and the operator commands
//! ([`cli`]).
//!
//! Invariants: no SQL and no cryptography here (both live in `vault`);
//! handlers authenticate before reading a body; request bodies are parsed
//! into zeroizing buffers and never quoted in errors or logs; logs name the
//! route pattern, never the raw path.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod error;
pub mod fuzzing;
pub mod hardening;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod routes;
pub mod seal;
pub mod tls;

pub use app::Application;
pub use config::{Cli, Settings};
