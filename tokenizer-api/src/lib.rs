//! The cardvault HTTP service and operator CLI (the `tokenizer` binary).
//!
//! This crate owns HTTP and the command line. Its modules, from the bottom
//! up (each uses only those above it, so there is no import circle):
//! - [`config`] (flags, environment, TOML file), [`tls`] (rustls
//!   configurations, client certificates, `dev-pki`), [`limits`] (the guard
//!   against unauthenticated floods), [`hardening`], [`listeners`] (what a
//!   listener is: kind, authentication mode, the connection a handler sees),
//!   [`logging`] (text or JSON logs on stderr), [`upstream`] (the
//!   forwarding proxy's upstreams with their TLS client configurations);
//! - [`seal`] (the sealed start and unsealing), [`error`] (the one mapping
//!   from errors to HTTP responses), [`metrics`] (Prometheus);
//! - [`state`] (what every worker shares), [`auth`] (the one authentication
//!   path), [`routes`] (the route table, the handlers by area, the OpenAPI
//!   document);
//! - [`http`] (a listener's actix-web app and middleware), [`server`] (TLS
//!   handshake, connection limits, the HTTP server), [`app`] (building and
//!   running the service: [`app::Application`]);
//! - [`edge`] (`tokenizer edge`: the hosted-collection edge, a process of
//!   its own that serves the card form and forwards to the vault's api
//!   listener; it uses `tls`, `http`'s request ids, `server`'s stream and
//!   `routes::body`'s secret strings, and nothing of the vault's state);
//! - [`cli`] (the operator commands, and `serve`, whose `--dev` also runs
//!   a trial edge), [`fuzzing`] (entry points of the fuzz targets).
//!
//! Invariants: no SQL and no cryptography here (both live in `vault`; the
//! edge's SHA-384/SHA-256 digests of its public files are integrity
//! checks over no secret);
//! handlers authenticate before reading a body; request bodies are parsed
//! into zeroizing buffers and never quoted in errors or logs; logs name the
//! route pattern, never the raw path.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod backups;
pub mod cli;
pub mod config;
pub mod edge;
pub mod error;
pub mod fuzzing;
pub mod hardening;
pub mod http;
pub mod limits;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod routes;
pub mod seal;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;

pub use app::Application;
pub use config::{Cli, Settings};
