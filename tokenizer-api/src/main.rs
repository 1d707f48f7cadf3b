//! `tokenizer`: reads the command line and hands over to `tokenizer_api`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use tokenizer_api::cli;
use tokenizer_api::config::{Cli, Command, EdgeCommand};

#[actix_web::main]
async fn main() -> ExitCode {
    install_panic_hook();
    match Cli::parse().command {
        Command::Serve(args) => cli::serve(*args).await,
        Command::Principal { command } => cli::principal(command).await,
        Command::Migrate { vault, database } => cli::migrate(vault, database).await,
        Command::Backup {
            store,
            kek_file,
            out,
        } => cli::backup(store, kek_file, out).await,
        Command::Restore {
            vault,
            database,
            kek_file,
            from,
        } => cli::restore(vault, database, kek_file, from).await,
        Command::Audit { command } => cli::audit(command).await,
        Command::Keys { command } => cli::keys(command),
        Command::Unseal { url, custodian } => cli::unseal(&url, custodian.as_deref()),
        Command::Seal { url } => cli::seal(&url),
        Command::Kek { command } => cli::kek(command),
        Command::Tenant { command } => cli::tenant(command).await,
        Command::Purge { store } => cli::purge(store).await,
        Command::Edge { args, command } => match command {
            None => tokenizer_api::edge::run(*args).await,
            Some(EdgeCommand::Check(check)) => {
                // Blocking HTTP calls: off the async runtime's thread.
                tokio::task::spawn_blocking(move || tokenizer_api::edge::check::check(&check))
                    .await
                    .unwrap_or(ExitCode::FAILURE)
            }
        },
        Command::DevPki { out, server_names } => cli::dev_pki(&out, &server_names),
    }
}

/// Panics are logged with their location only. Our code never formats card
/// data into a panic, and this keeps a future mistake from printing it.
/// With JSON logs the hook writes one JSON event instead of a plain line.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown".to_owned());
        if cli::json_logs() {
            // One JSON line, like every other line on stderr.
            tracing::error!(%location, "panic at {location} (message withheld)");
            return;
        }
        tracing::error!(%location, "panic (message withheld)");
        #[allow(clippy::print_stderr)]
        {
            eprintln!("panic at {location} (message withheld)");
        }
    }));
}
