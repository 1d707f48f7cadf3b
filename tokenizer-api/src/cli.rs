//! Operator commands of the `tokenizer` binary. Their stdout is a contract
//! (one JSON document per command); logs go to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod progress;

use std::os::unix::fs::DirBuilderExt as _;
use std::process::ExitCode;
use std::sync::Arc;

use vault::access::{self, TenantScope};
use vault::store::Store;

pub use crate::logging::{init_logging, json_logs};

use self::progress::Progress;
use crate::app::{self, Application};
use crate::config::{
    AuditCommand, DatabaseArgs, FlagGroup, KekCommand, KekFileArg, KeysCommand, PrincipalCommand,
    ServeArgs, Settings, StoreArgs, VaultArgs,
};

/// Print an error to stderr and fail: a plain `error: ...` line, or with
/// JSON logs an `ERROR` event, so that every line on stderr stays JSON.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    if json_logs() {
        tracing::error!("{msg}");
    } else {
        eprintln!("error: {msg}");
    }
    ExitCode::FAILURE
}

pub async fn serve(args: ServeArgs) -> ExitCode {
    let mut settings =
        match Settings::resolve_serve(&args.common, args.dev, args.insecure_plain_http) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
    init_logging(&settings.log_level, settings.log_format);
    // Before any key or card number is in memory.
    match crate::hardening::harden(settings.dev) {
        Ok(report) => {
            tracing::info!("{report}");
            if let Some(warning) = report.warning() {
                tracing::warn!("{warning}");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "start-up refused");
            return fail(e);
        }
    }
    if settings.dev {
        tracing::warn!("==================================================================");
        tracing::warn!("DEV MODE (--dev): INSECURE, NOT A PRODUCTION SETUP.");
        tracing::warn!(
            "Software KEK, a dev API key and a dev PKI in {}; one loopback listener{}.",
            settings.data_dir.display(),
            if settings.tls.is_none() {
                ", INSECURE PLAIN HTTP"
            } else {
                ""
            }
        );
        tracing::warn!("==================================================================");
    }
    if settings.dev_pki {
        let dir = settings.data_dir.join(crate::config::DEV_TLS_DIR);
        if !dir.join("ca.pem").exists() {
            if let Err(e) = app::prepare_data_dir(&settings.data_dir) {
                return fail(e);
            }
            if let Err(e) = crate::tls::write_dev_pki(&dir, &[]) {
                return fail(e);
            }
        }
    }
    let dev_edge = match bind_dev_edge(&args, &mut settings) {
        Ok(edge) => edge,
        Err(e) => return fail(e),
    };
    let app = match Application::build(&settings).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            return fail(e);
        }
    };
    let scheme = if app.tls() { "https" } else { "http" };
    for (kind, addr) in app.listeners() {
        tracing::info!("listening on {addr} ({}, {scheme})", kind.name());
    }
    let edge_url = dev_edge.as_ref().map(crate::edge::DevEdge::public_url);
    let dev_edge = match (dev_edge, app.addr()) {
        (Some(edge), Some(vault)) => {
            let dir = settings.data_dir.join(crate::config::DEV_TLS_DIR);
            match edge.start(&dir, vault) {
                Ok(server) => {
                    let handle = server.handle();
                    tokio::spawn(server);
                    Some(handle)
                }
                Err(e) => return fail(format!("the dev edge: {e}")),
            }
        }
        _ => None,
    };
    if settings.dev {
        if let Err(e) = print_dev_example(&app, &settings, edge_url.as_deref()).await {
            return fail(e);
        }
    }
    let ran = app.run().await;
    if let Some(edge) = dev_edge {
        edge.stop(true).await;
    }
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// `serve --dev` with TLS on the dev PKI: bind the trial edge's listener
/// (so that `collect_public_url`, when not set, names it) before the vault
/// starts. `None` when there is no dev edge to run: not `--dev`, plain HTTP
/// (the edge reaches the vault over mutual TLS only), or certificates of
/// the operator's own (the dev edge uses the dev PKI's).
fn bind_dev_edge(
    args: &ServeArgs,
    settings: &mut Settings,
) -> Result<Option<crate::edge::DevEdge>, String> {
    use crate::edge::DevEdge;
    if !settings.dev {
        return match args.dev_edge_listen {
            Some(_) => Err("--dev-edge-listen is for --dev only".into()),
            None => Ok(None),
        };
    }
    let dir = settings.data_dir.join(crate::config::DEV_TLS_DIR);
    if settings.tls.is_none() {
        tracing::warn!(
            "no dev edge with plain HTTP: the edge reaches the vault over mutual TLS only"
        );
        return Ok(None);
    }
    if !settings.dev_pki {
        tracing::info!(
            "no dev edge: it runs on the dev PKI, and this --dev run has certificates of its own"
        );
        return Ok(None);
    }
    if !DevEdge::pki_ready(&dir) {
        tracing::warn!(
            "no dev edge: the dev PKI in {} predates the role collect (no client-collect.pem); \
             delete that directory to have it made again",
            dir.display()
        );
        return Ok(None);
    }
    let edge = match args.dev_edge_listen {
        Some(addr) => DevEdge::bind(addr)?,
        // The default port taken (another trial, a `tokenizer edge`): the
        // vault runs without its trial edge rather than not at all.
        None => {
            let addr = crate::config::DEFAULT_EDGE_LISTEN
                .parse()
                .map_err(|e| format!("{e}"))?;
            match DevEdge::bind(addr) {
                Ok(edge) => edge,
                Err(e) => {
                    tracing::warn!("no dev edge: {e}");
                    return Ok(None);
                }
            }
        }
    };
    if settings.collect_public_url.is_none() {
        settings.collect_public_url = Some(edge.public_url());
    }
    Ok(Some(edge))
}

async fn print_dev_example(
    app: &Application,
    settings: &Settings,
    edge_url: Option<&str>,
) -> Result<(), access::AccessError> {
    let store: &dyn Store = app.store().as_ref();
    let suffix = format!("{:08x}", rand_u32());
    let roles = access::parse_roles("tokenize,detokenize")?;
    let (principal, key) = access::create_principal(
        store,
        &format!("dev-{suffix}"),
        &roles,
        &TenantScope::All,
        None,
    )
    .await?;
    let addr = app.addr().map(|a| a.to_string()).unwrap_or_default();
    let key = key.expose();
    let body = r#"{"tenant":"shop-42","pan":"4111 1111 1111 1111","exp_month":12,"exp_year":2030}"#;
    if !app.tls() {
        print_dev_text(&format!(
            "\n# cardvault DEV MODE -- not a production setup; INSECURE PLAIN HTTP. Dev principal `{}` (roles tokenize,detokenize; all tenants).\n\
             # Tokenize a public test card:\n\
             curl -s http://{addr}/v1/tokens -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{body}'\n",
            principal.name,
        ));
        return Ok(());
    }
    // One principal per dev client certificate, bound to its identity.
    let dir = settings.data_dir.join(crate::config::DEV_TLS_DIR);
    for role in crate::tls::DEV_ROLES {
        let identity = crate::tls::dev_identity(role);
        if store.find_principal_by_cert(&identity).await?.is_none() {
            access::create_principal(
                store,
                &format!("dev-cert-{}", role.replace('_', "-")),
                &access::parse_roles(role)?,
                &TenantScope::All,
                Some(&identity),
            )
            .await?;
        }
    }
    let d = dir.display();
    print_dev_text(&format!(
        "\n# cardvault DEV MODE -- not a production setup. TLS with a dev CA ({d}/ca.pem).\n\
         # Dev principal `{}` (roles tokenize,detokenize; all tenants) with an API key, and one principal per\n\
         # client certificate {d}/client-<role>.pem (tokenize, detokenize, auditor, key_admin, collect, forward).\n\
         # Tokenize a public test card with mutual TLS:\n\
         curl -s --cacert {d}/ca.pem --cert {d}/client-tokenize.pem --key {d}/client-tokenize.key \\\n  \
         https://{addr}/v1/tokens -H 'Content-Type: application/json' -d '{body}'\n\
         # Or with the API key:\n\
         curl -s --cacert {d}/ca.pem https://{addr}/v1/tokens -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{body}'\n\
         # Swap a token back (client certificate of role detokenize):\n\
         curl -s --cacert {d}/ca.pem --cert {d}/client-detokenize.pem --key {d}/client-detokenize.key \\\n  \
         https://{addr}/v1/detokenize -H 'Content-Type: application/json' -d '{{\"token\":\"tok_PASTE_HERE\",\"reason\":\"trying cardvault\"}}'\n",
        principal.name,
    ));
    if let Some(edge) = edge_url {
        print_dev_text(&format!(
            "# Hosted card form: a TRIAL EDGE (DEV MODE, not a production setup) on {edge}, as the principal\n\
             # of client-collect.pem. Open a collection session for your page's origin, then embed its frame_url\n\
             # with {edge}/v1/collect/cardvault.js (see README, hosted card collection):\n\
             curl -s --cacert {d}/ca.pem --cert {d}/client-tokenize.pem --key {d}/client-tokenize.key \\\n  \
             https://{addr}/v1/collect/sessions -H 'Content-Type: application/json' -d '{{\"tenant\":\"shop-42\",\"allowed_origin\":\"http://localhost:3000\"}}'\n"
        ));
    }
    Ok(())
}

/// The dev example on stdout: as it is, or with JSON logs as one JSON object
/// (`{"dev_example": TEXT}`), so that every line the service writes is JSON.
fn print_dev_text(text: &str) {
    if json_logs() {
        println!("{}", serde_json::json!({ "dev_example": text }));
    } else {
        println!("{text}");
    }
}

/// `tokenizer tenant set|list|delete`.
pub async fn tenant(cmd: crate::config::TenantCommand) -> ExitCode {
    use crate::config::TenantCommand;
    use vault::tenants;
    let shown = |t: &vault::store::TenantRow| {
        let time = |ms: i64| crate::routes::rfc3339_millis(ms);
        serde_json::json!({
            "tenant": t.name,
            "pan_shaped": t.pan_shaped,
            "token_ttl_days": t.token_ttl_days,
            "retention_days": t.retention_days,
            "created_at": time(t.created_at),
            "updated_at": time(t.updated_at),
            "deleted_at": t.deleted_at.map(time),
        })
    };
    match cmd {
        TenantCommand::Set {
            store: args,
            name,
            pan_shaped,
            token_ttl_days,
            retention_days,
        } => {
            let (_, store) = match store_for(&args).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            let days = |d: Option<u32>| d.map(|d| (d > 0).then_some(d));
            let change = tenants::PolicyChange {
                pan_shaped,
                token_ttl_days: days(token_ttl_days),
                retention_days: days(retention_days),
            };
            let result = tenants::set_policy(store.as_ref(), &name, change).await;
            store.close().await;
            match result {
                Ok(row) => {
                    println!("{}", shown(&row));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        TenantCommand::List { store: args } => {
            let (_, store) = match store_for(&args).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            let result = store.tenants().await;
            store.close().await;
            match result {
                Ok(rows) => {
                    let rows: Vec<_> = rows.iter().map(shown).collect();
                    println!("{}", serde_json::Value::Array(rows));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        TenantCommand::Delete { store: args, name } => {
            let (_, store) = match store_for(&args).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            let result = tenants::delete_tenant(store.as_ref(), &name).await;
            store.close().await;
            match result {
                Ok(n) => {
                    println!(
                        "{}",
                        serde_json::json!({"tenant": name, "records_deleted": n})
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// `tokenizer purge`: records past their expiry or retention, now.
pub async fn purge(args: StoreArgs) -> ExitCode {
    let (_, store) = match store_for(&args).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let progress = Progress::spinner("purge");
    progress.phase(match stored_counts(store.as_ref()).await {
        Some((cards, _)) => format!(
            "deleting records past their expiry or retention, in batches of {} (the store holds {cards} cards)",
            vault::tenants::BATCH
        ),
        None => "deleting records past their expiry or retention".to_owned(),
    });
    let result = vault::tenants::purge(store.as_ref(), "local").await;
    store.close().await;
    match result {
        Ok(c) => {
            progress.finish(format!(
                "{} expired and {} past their retention deleted",
                c.expired, c.retention
            ));
            println!(
                "{}",
                serde_json::json!({"expired": c.expired, "retention": c.retention})
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            progress.fail();
            fail(e)
        }
    }
}

/// `tokenizer dev-pki --out DIR`: a throwaway local PKI (see `tls`).
pub fn dev_pki(out: &std::path::Path, server_names: &[String]) -> ExitCode {
    match crate::tls::write_dev_pki(out, server_names) {
        Ok(pki) => {
            println!("{}", serde_json::json!(pki));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::getrandom(&mut b);
    u32::from_le_bytes(b)
}

/// Settings from a command's option groups, logging, and the store opened
/// (migrated when `migrate_on_start` says so).
async fn store_for(flags: &impl FlagGroup) -> Result<(Settings, Arc<dyn Store>), ExitCode> {
    let settings = Settings::resolve(flags, false).map_err(fail)?;
    init_logging(&settings.log_level, settings.log_format);
    let store = app::open_store(&settings, settings.migrate_on_start)
        .await
        .map_err(fail)?;
    Ok((settings, store))
}

/// `tokenizer backup --out FILE`.
pub async fn backup(args: StoreArgs, kek_file: KekFileArg, out: std::path::PathBuf) -> ExitCode {
    let (settings, store) = match store_for(&(&args, &kek_file)).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let kek = match hsm_shim::SoftwareKek::load(&settings.kek_file) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    // `write_backup` reports nothing until it is done: the phase, what the
    // store holds now, and the counts written.
    let progress = Progress::spinner("backup");
    progress.phase(match stored_counts(store.as_ref()).await {
        Some((cards, events)) => format!(
            "writing {} (the store holds {cards} cards, {events} audit entries)",
            out.display()
        ),
        None => format!("writing {}", out.display()),
    });
    let result = vault::backup::write_backup(store.as_ref(), &kek, &out).await;
    store.close().await;
    match result {
        Ok(summary) => {
            progress.finish(format!("{} written, fsynced", contents(&summary)));
            println!(
                "{}",
                serde_json::json!({"backup": out.display().to_string(), "contents": summary})
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            progress.fail();
            fail(e)
        }
    }
}

/// `tokenizer backup verify FILE --public-key KEY_OR_FILE`: offline, with
/// the public keys alone. Exit 0 verified, 1 failed (or unsigned without
/// `--allow-unsigned`), 2 usage or unreadable file.
pub fn backup_verify(
    file: &std::path::Path,
    public_keys: &[String],
    allow_unsigned: bool,
) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(2)
    };
    let mut keys = Vec::new();
    for given in public_keys {
        let text = if given
            .trim_start()
            .starts_with(audit::checkpoint::PUBLIC_KEY_PREFIX)
        {
            given.clone()
        } else {
            match std::fs::read_to_string(given) {
                Ok(t) => t,
                Err(e) => return usage(format!("{given}: {e}")),
            }
        };
        match audit::VerifyingKey::parse_many(&text) {
            Ok(k) => keys.extend(k),
            Err(e) => return usage(format!("{given}: {e}")),
        }
    }
    let shown = file.display().to_string();
    match vault::backup::verify_backup(file, &keys) {
        Ok(v) => {
            let verified = v.signed_by.is_some();
            let status = if verified { "verified" } else { "unsigned" };
            println!(
                "{}",
                serde_json::json!({
                    "backup": shown,
                    "status": status,
                    "signed_by": v.signed_by,
                    "records": v.records,
                    "sha256": v.sha256,
                    "created_at": v.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                    "kek_id": v.kek_id,
                    "contents": v.summary,
                })
            );
            if verified {
                eprintln!(
                    "{shown}: verified ({}), signed by audit key {}",
                    contents(&v.summary),
                    v.signed_by.unwrap_or_default()
                );
                ExitCode::SUCCESS
            } else if allow_unsigned {
                eprintln!(
                    "{shown}: unsigned; record count and SHA-256 hold ({})",
                    contents(&v.summary)
                );
                ExitCode::SUCCESS
            } else {
                eprintln!("{shown}: unsigned (a backup from before signing): record count and SHA-256 hold, but nothing vouches for them; --allow-unsigned accepts it");
                ExitCode::FAILURE
            }
        }
        Err(vault::backup::BackupError::Io { path, source }) => usage(format!("{path}: {source}")),
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"backup": shown, "status": "failed", "error": e.to_string()})
            );
            eprintln!("{shown}: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Cards and audit entries in the store (for the progress of commands whose
/// vault function reports only at the end); `None` if it cannot say.
async fn stored_counts(store: &dyn Store) -> Option<(u64, u64)> {
    let usage = store.key_usage().await.ok()?;
    let events = store.audit_size().await.ok()?;
    Some((usage.by_dek.values().sum(), events))
}

/// What a backup holds, in words (counts only).
fn contents(summary: &vault::backup::BackupSummary) -> String {
    format!(
        "{} cards, {} audit entries, {} checkpoints, {} principals, {} tenants, {} keys",
        summary.cards,
        summary.audit_events,
        summary.audit_checkpoints,
        summary.principals,
        summary.tenants,
        summary.keys + summary.audit_signing_keys
    )
}

/// `tokenizer restore --from FILE`: into an empty (freshly migrated) database.
pub async fn restore(
    vault: VaultArgs,
    database: DatabaseArgs,
    kek_file: KekFileArg,
    from: std::path::PathBuf,
) -> ExitCode {
    let settings = match Settings::resolve(&(&vault, &database, &kek_file), false) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    init_logging(&settings.log_level, settings.log_format);
    let kek = match hsm_shim::SoftwareKek::load(&settings.kek_file) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let store = match app::open_store(&settings, true).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // `restore_backup` checks the whole file, then writes it, and reports
    // only at the end.
    let progress = Progress::spinner("restore");
    progress.phase(format!(
        "checking {}, then writing it into the empty database",
        from.display()
    ));
    let result = vault::backup::restore_backup(store.as_ref(), &kek, &from).await;
    store.close().await;
    match result {
        Ok(summary) => {
            progress.finish(format!("{} restored", contents(&summary)));
            println!(
                "{}",
                serde_json::json!({"restored": from.display().to_string(), "contents": summary})
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            progress.fail();
            fail(e)
        }
    }
}

/// `tokenizer audit archive`: move audit segments past the retention period
/// to files (see `vault::archive`).
pub async fn audit(cmd: AuditCommand) -> ExitCode {
    let AuditCommand::Archive {
        store: args,
        retention,
        older_than_days,
        below_pci_minimum,
    } = cmd;
    let (settings, store) = match store_for(&(&args, &retention)).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let days = older_than_days.unwrap_or(settings.audit_retention_days);
    if days < vault::archive::PCI_MINIMUM_RETENTION_DAYS && !below_pci_minimum {
        store.close().await;
        return fail(format!(
            "refusing to keep only {days} days of audit history online: PCI DSS 10.5.1 asks for at least {} (pass --below-pci-minimum for a trial)",
            vault::archive::PCI_MINIMUM_RETENTION_DAYS
        ));
    }
    let dir = &settings.audit_archive_dir;
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        store.close().await;
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    let cutoff = time::OffsetDateTime::now_utc() - time::Duration::days(i64::from(days));
    let event = audit::AuditEvent::new(audit::Action::AuditArchived, audit::Outcome::Success)
        .source("local");
    // `archive_audit` exports, verifies from disk, records and deletes, and
    // reports only at the end.
    let progress = Progress::spinner("audit archive");
    let size = store
        .audit_size()
        .await
        .map(|n| format!(" (the trail holds {n} entries)"))
        .unwrap_or_default();
    progress.phase(format!(
        "exporting the entries older than {days} days to {}, verifying the file, deleting them{size}",
        dir.display()
    ));
    let result =
        vault::archive::archive_audit(store.as_ref(), &settings.database_url, dir, cutoff, event)
            .await;
    store.close().await;
    match result {
        Ok(done) => {
            progress.finish(match &done.segment {
                Some((row, path)) => format!(
                    "entries {} to {} archived to {}, {} deleted from the database",
                    row.from_seq,
                    row.to_seq,
                    path.display(),
                    done.deleted
                ),
                None => format!(
                    "nothing to archive, {} deleted from the database",
                    done.deleted
                ),
            });
            let segment = done.segment.map(|(row, path)| {
                serde_json::json!({
                    "from_seq": row.from_seq,
                    "to_seq": row.to_seq,
                    "file": path.display().to_string(),
                    "sha256": row.file_sha256,
                })
            });
            println!(
                "{}",
                serde_json::json!({
                    "archived": segment,
                    "deleted_from_database": done.deleted,
                    "retention_days": days,
                })
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            progress.fail();
            fail(e)
        }
    }
}

/// `tokenizer migrate`: apply pending migrations and say so.
pub async fn migrate(vault: VaultArgs, database: DatabaseArgs) -> ExitCode {
    let settings = match Settings::resolve(&(&vault, &database), false) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    init_logging(&settings.log_level, settings.log_format);
    match app::open_store(&settings, true).await {
        Ok(store) => {
            store.close().await;
            println!("{}", serde_json::json!({"migrated": true}));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

pub async fn principal(cmd: PrincipalCommand) -> ExitCode {
    match cmd {
        PrincipalCommand::Create {
            store: args,
            name,
            roles,
            tenants,
            cert_identity,
        } => {
            let (roles, tenants) = match (access::parse_roles(&roles), TenantScope::parse(&tenants))
            {
                (Ok(r), Ok(t)) => (r, t),
                (Err(e), _) | (_, Err(e)) => return fail(e),
            };
            let (_, store) = match store_for(&args).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            match access::create_principal(
                store.as_ref(),
                &name,
                &roles,
                &tenants,
                cert_identity.as_deref(),
            )
            .await
            {
                Ok((p, key)) => {
                    let line =
                        serde_json::json!({"id": p.id, "name": p.name, "api_key": key.expose()});
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        PrincipalCommand::List { store: args } => {
            let (_, store) = match store_for(&args).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            match access::list_principals(store.as_ref()).await {
                Ok(list) => match serde_json::to_string_pretty(&list) {
                    Ok(json) => {
                        println!("{json}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(e),
                },
                Err(e) => fail(e),
            }
        }
        PrincipalCommand::Revoke { store: args, name } => {
            let (_, store) = match store_for(&args).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            match access::revoke_principal(store.as_ref(), &name).await {
                Ok(()) => {
                    println!("{}", serde_json::json!({"revoked": name}));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

pub fn kek(cmd: KekCommand) -> ExitCode {
    match cmd {
        KekCommand::Generate {
            vault,
            database: _,
            kek_file,
            kek,
        } => {
            let settings = match Settings::resolve(&(&vault, &kek_file, &kek), false) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            init_logging(&settings.log_level, settings.log_format);
            use hsm_shim::KeyEncryptionKey as _;
            match &settings.kek_source {
                crate::seal::KekSource::File { .. } => {}
                crate::seal::KekSource::Pkcs11(config) => {
                    // Generated inside the token (non-extractable); logging
                    // in needs the PIN from its file or variable.
                    let generated = config.pin.load().and_then(|pin| {
                        let token = hsm_shim::Pkcs11Token::open(config)?;
                        token.login(&pin)?;
                        token.generate_kek(&config.kek_label)
                    });
                    return match generated {
                        Ok(kek) => {
                            println!(
                                "{}",
                                serde_json::json!({"pkcs11_token": config.token_label, "kek_label": config.kek_label, "kek_id": kek.kek_id()})
                            );
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail(e),
                    };
                }
                crate::seal::KekSource::Keyring { .. } => {
                    return fail("the keyring backend's KEK is created by `tokenizer keys init`");
                }
            }
            if let Some(parent) = settings.kek_file.parent() {
                if !parent.as_os_str().is_empty() {
                    if let Err(e) = app::prepare_data_dir(parent) {
                        return fail(e);
                    }
                }
            }
            match hsm_shim::SoftwareKek::generate(&settings.kek_file) {
                Ok(kek) => {
                    println!(
                        "{}",
                        serde_json::json!({"kek_file": settings.kek_file.display().to_string(), "kek_id": kek.kek_id()})
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// Read one line of standard input (a passphrase), without its newline, into
/// zeroizing memory.
fn read_secret_line(prompt: &str) -> Result<zeroize::Zeroizing<String>, ExitCode> {
    use std::io::BufRead as _;
    eprint!("{prompt}: ");
    let mut line = zeroize::Zeroizing::new(String::new());
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) => Err(fail(
            "standard input ended before every passphrase was read",
        )),
        Ok(_) => {
            while line.ends_with('\n') || line.ends_with('\r') {
                line.pop();
            }
            Ok(line)
        }
        Err(e) => Err(fail(format!("cannot read standard input: {e}"))),
    }
}

/// `tokenizer keys ...`.
pub fn keys(cmd: KeysCommand) -> ExitCode {
    match cmd {
        KeysCommand::Init {
            vault,
            keyring,
            database: _,
            shares,
            threshold,
            custodians,
        } => keys_init(&(&vault, &keyring), shares, threshold, &custodians),
        KeysCommand::Rotate {
            url,
            fingerprint,
            kek,
            audit_signing,
        } => {
            if audit_signing {
                admin_post(
                    &url,
                    "/v1/admin/keys/audit_signing/rotate",
                    serde_json::json!({}),
                )
            } else if kek {
                admin_post(&url, "/v1/admin/kek/rotate", serde_json::json!({}))
            } else {
                admin_post(
                    &url,
                    "/v1/admin/keys/rotate",
                    serde_json::json!({ "fingerprint": fingerprint }),
                )
            }
        }
        KeysCommand::Status { url, watch } => keys_status(&url, watch),
        KeysCommand::Retire {
            url,
            purpose,
            version,
        } => admin_post(
            &url,
            &format!("/v1/admin/keys/{purpose}/{version}/retire"),
            serde_json::json!({}),
        ),
        KeysCommand::Destroy {
            url,
            purpose,
            version,
            kek,
        } => match (version, kek) {
            (_, Some(kek_id)) => admin_post(
                &url,
                "/v1/admin/kek/destroy",
                serde_json::json!({ "kek_id": kek_id }),
            ),
            (Some(version), None) => admin_post(
                &url,
                &format!("/v1/admin/keys/{purpose}/{version}/destroy"),
                serde_json::json!({}),
            ),
            (None, None) => fail("give a key VERSION or --kek KEK_ID"),
        },
    }
}

/// `tokenizer keys status [--watch]`.
fn keys_status(url: &str, watch: bool) -> ExitCode {
    let key = match admin_key() {
        Ok(k) => k,
        Err(code) => return code,
    };
    let endpoint = format!("{}/v1/admin/keys", url.trim_end_matches('/'));
    let fetch = || -> Result<serde_json::Value, String> {
        let response = key.request("GET", &endpoint).call();
        match response {
            Ok(r) => r.into_json().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(_, r)) => Err(r.into_string().unwrap_or_default()),
            Err(e) => Err(format!("cannot reach {endpoint}: {e}")),
        }
    };
    // The first answer's remaining records are the pass's total (a rotation
    // while watching makes it grow).
    let mut total = 0;
    let mut progress = None;
    loop {
        let status = match fetch() {
            Ok(s) => s,
            Err(e) => return fail(e.trim()),
        };
        let remaining = status["remaining"].as_u64().unwrap_or(0);
        if !watch {
            println!("{status}");
            return ExitCode::SUCCESS;
        }
        total = total.max(remaining);
        let bar = progress.get_or_insert_with(|| Progress::bar("re-encryption", total));
        let done = total - remaining;
        if remaining == 0 {
            bar.update(done, total, "records moved");
            bar.finish(format!(
                "done: every record is under the active keys ({total} moved while watching)"
            ));
            println!("{status}");
            return ExitCode::SUCCESS;
        }
        bar.update(done, total, format!("records moved, {remaining} left"));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `tokenizer keys init`: the split-knowledge keyring.
fn keys_init(
    flags: &impl FlagGroup,
    shares: usize,
    threshold: usize,
    custodians: &[String],
) -> ExitCode {
    let settings = match Settings::resolve(flags, false) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    init_logging(&settings.log_level, settings.log_format);
    let crate::seal::KekSource::Keyring { path } = &settings.kek_source else {
        return fail(
            "keys init creates the keyring of kek_backend = \"keyring\"; set --kek-backend keyring",
        );
    };
    if custodians.len() != shares {
        return fail(format!(
            "--shares {shares} but {} custodian names were given",
            custodians.len()
        ));
    }
    let mut passphrases = Vec::with_capacity(shares);
    for name in custodians {
        match read_secret_line(&format!("passphrase of custodian {name}")) {
            Ok(p) => passphrases.push(p),
            Err(code) => return code,
        }
    }
    if let Err(e) = app::prepare_data_dir(&settings.data_dir) {
        return fail(e);
    }
    let pairs: Vec<(&str, &str)> = custodians
        .iter()
        .map(String::as_str)
        .zip(passphrases.iter().map(|p| p.as_str()))
        .collect();
    match hsm_shim::SealedKeyring::init(path, threshold, &pairs, hsm_shim::KdfParams::default()) {
        Ok(keyring) => {
            println!(
                "{}",
                serde_json::json!({
                    "keyring": path.display().to_string(),
                    "custodians": keyring.custodians(),
                    "threshold": keyring.threshold(),
                })
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// The admin API key, from the environment only.
/// The operator's client of the admin listener. From the environment:
/// `TOKENIZER_API_KEY` (a key with role key_admin; optional with a client
/// certificate on an mTLS admin listener), `TOKENIZER_ADMIN_CA_FILE` (the
/// CA that signed the server certificate), `TOKENIZER_ADMIN_CLIENT_CERT` and
/// `TOKENIZER_ADMIN_CLIENT_KEY` (the operator's client certificate).
struct AdminClient {
    agent: ureq::Agent,
    key: Option<zeroize::Zeroizing<String>>,
}

impl AdminClient {
    fn request(&self, method: &str, endpoint: &str) -> ureq::Request {
        let req = self.agent.request(method, endpoint);
        match &self.key {
            Some(key) => req.set("Authorization", &format!("Bearer {}", key.as_str())),
            None => req,
        }
    }
}

fn admin_key() -> Result<AdminClient, ExitCode> {
    use std::path::Path;
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let key = std::env::var("TOKENIZER_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(zeroize::Zeroizing::new);
    let client_cert = var("TOKENIZER_ADMIN_CLIENT_CERT");
    if key.is_none() && client_cert.is_none() {
        return Err(fail(
            "set TOKENIZER_API_KEY to an API key with the role key_admin \
             (or TOKENIZER_ADMIN_CLIENT_CERT and TOKENIZER_ADMIN_CLIENT_KEY on an mTLS admin listener)",
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = var("TOKENIZER_ADMIN_CA_FILE") {
        let certs = crate::tls::read_certs(Path::new(&ca))
            .map_err(|e| fail(format!("TOKENIZER_ADMIN_CA_FILE: {e}")))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| fail(format!("TOKENIZER_ADMIN_CA_FILE: {e}")))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| fail(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let config = match (client_cert, var("TOKENIZER_ADMIN_CLIENT_KEY")) {
        (Some(cert), Some(key_file)) => {
            // The server's readers: a key file readable by others is
            // refused, and no error quotes the file's content.
            let chain = crate::tls::read_certs(Path::new(&cert))
                .map_err(|e| fail(format!("TOKENIZER_ADMIN_CLIENT_CERT: {e}")))?;
            let private = crate::tls::read_key(Path::new(&key_file))
                .map_err(|e| fail(format!("TOKENIZER_ADMIN_CLIENT_KEY: {e}")))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| fail(format!("client certificate: {e}")))?
        }
        (Some(_), None) => {
            return Err(fail(
                "TOKENIZER_ADMIN_CLIENT_CERT needs TOKENIZER_ADMIN_CLIENT_KEY",
            ))
        }
        _ => builder.with_no_client_auth(),
    };
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .timeout(std::time::Duration::from_secs(60))
        .build();
    Ok(AdminClient { agent, key })
}

/// POST `body` to the admin interface; print the JSON answer.
fn admin_post(url: &str, path: &str, body: serde_json::Value) -> ExitCode {
    match serde_json::to_vec(&body) {
        Ok(bytes) => admin_post_bytes(url, path, &bytes),
        Err(e) => fail(format!("cannot encode the request: {e}")),
    }
}

/// POST a JSON body (already encoded) to the admin interface.
fn admin_post_bytes(url: &str, path: &str, body: &[u8]) -> ExitCode {
    let key = match admin_key() {
        Ok(k) => k,
        Err(code) => return code,
    };
    let endpoint = format!("{}{path}", url.trim_end_matches('/'));
    let response = key
        .request("POST", &endpoint)
        .set("Content-Type", "application/json")
        .send_bytes(body);
    let (ok, answer) = match response {
        Ok(r) => (true, r.into_string()),
        Err(ureq::Error::Status(_, r)) => (false, r.into_string()),
        Err(e) => return fail(format!("cannot reach {endpoint}: {e}")),
    };
    let text = answer.unwrap_or_default();
    if ok {
        println!("{}", text.trim());
        ExitCode::SUCCESS
    } else {
        fail(text.trim())
    }
}

/// `tokenizer unseal`: one custodian (or an HSM login) per call.
pub fn unseal(url: &str, custodian: Option<&str>) -> ExitCode {
    #[derive(serde::Serialize)]
    struct Submission<'a> {
        custodian: &'a str,
        passphrase: &'a str,
    }
    let Some(name) = custodian else {
        return admin_post(url, "/v1/admin/unseal", serde_json::json!({}));
    };
    let passphrase = match read_secret_line(&format!("passphrase of custodian {name}")) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // Encoded straight into zeroizing memory sized for the worst case (an
    // escape is at most 6 bytes per character), so it never reallocates:
    // no other copy of the passphrase is made on the way to the socket.
    let worst = 64 + 6 * (name.len() + passphrase.len());
    let mut body = zeroize::Zeroizing::new(Vec::with_capacity(worst));
    let submission = Submission {
        custodian: name,
        passphrase: passphrase.as_str(),
    };
    if let Err(e) = serde_json::to_writer(&mut *body, &submission) {
        return fail(format!("cannot encode the request: {e}"));
    }
    admin_post_bytes(url, "/v1/admin/unseal", &body)
}

/// `tokenizer seal`.
pub fn seal(url: &str) -> ExitCode {
    admin_post(url, "/v1/admin/seal", serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{Arc, Mutex};

    /// Lines written by a subscriber, kept for the test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_carry_event_and_span_fields() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = crate::logging::json_subscriber("info", move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(request_id = "r-1", status = 201_u16, "request");
            let outer = tracing::info_span!("unseal", custodian = "alice");
            let _outer = outer.enter();
            let inner = tracing::info_span!("kek", backend = "keyring");
            let _inner = inner.enter();
            tracing::warn!(tries = 2_u32, "retrying");
            tracing::debug!("below the level");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        let request = &parsed[0];
        for key in ["timestamp", "level", "target", "message"] {
            assert!(request[key].is_string(), "{key} missing: {request}");
        }
        assert_eq!(request["level"], "INFO");
        assert_eq!(request["message"], "request");
        assert_eq!(request["request_id"], "r-1");
        assert_eq!(request["status"], 201);
        assert!(request.get("span").is_none(), "{request}");
        let retry = &parsed[1];
        assert_eq!(retry["level"], "WARN");
        assert_eq!(retry["tries"], 2);
        assert_eq!(retry["span"]["name"], "kek");
        assert_eq!(retry["span"]["backend"], "keyring");
        assert_eq!(retry["spans"][0]["name"], "unseal");
        assert_eq!(retry["spans"][0]["custodian"], "alice");
        assert_eq!(retry["spans"][1]["name"], "kek");
    }
}
