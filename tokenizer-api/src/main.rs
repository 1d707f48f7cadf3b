//! `tokenizer`: reads the command line and hands over to `tokenizer_api`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use tokenizer_api::cli;
use tokenizer_api::config::{BackupCommand, Cli, Command, EdgeCommand};

#[actix_web::main]
async fn main() -> ExitCode {
    install_panic_hook();
    let code = run().await;
    // The log writer thread's queue, before the process ends.
    tokenizer_api::logging::flush();
    code
}

async fn run() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => cli::serve(*args).await,
        Command::Principal { command } => cli::principal(command).await,
        Command::Migrate { vault, database } => cli::migrate(vault, database).await,
        Command::Backup {
            command:
                Some(BackupCommand::Verify {
                    file,
                    public_key,
                    allow_unsigned,
                }),
            ..
        } => cli::backup_verify(&file, &public_key, allow_unsigned),
        Command::Backup {
            store,
            kek_file,
            out: Some(out),
            command: None,
        } => cli::backup(store, kek_file, out).await,
        // clap requires --out without a subcommand.
        Command::Backup { .. } => ExitCode::from(2),
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
/// Written straight to stderr, not through the log writer thread: a panic
/// that ends the process must not leave its line in that thread's queue.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown".to_owned());
        let message = format!("panic at {location} (message withheld)");
        let line = if cli::json_logs() {
            // One JSON line, like every other line on stderr.
            serde_json::json!({
                "timestamp": time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                "level": "ERROR",
                "target": "panic",
                "location": location,
                "message": message,
            })
            .to_string()
        } else {
            message
        };
        #[allow(clippy::print_stderr)]
        {
            eprintln!("{line}");
        }
    }));
}
