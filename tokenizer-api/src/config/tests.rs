//! Resolution (precedence, defaults, refusals) and the command line
//! (which options each subcommand has, and that the invocations of the
//! scripts and tests still parse).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use super::*;

/// No flag given.
fn common() -> Flags {
    Flags::default()
}

#[test]
fn defaults_and_precedence() {
    let s = Settings::resolve(&common(), false).unwrap();
    assert_eq!(s.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    assert_eq!(s.kek_file, PathBuf::from(DEFAULT_DATA_DIR).join("kek.key"));
    assert!(s.listeners.is_empty(), "only serve listens");
    assert!(matches!(
        Settings::resolve_serve(&common(), false, false),
        Err(ConfigError::TlsRequired)
    ));
    assert!(matches!(
        Settings::resolve_serve(&common(), false, true),
        Err(ConfigError::PlainHttpOutsideDev)
    ));
    let dev = Settings::resolve_serve(&common(), true, false).unwrap();
    assert_eq!(dev.listeners.len(), 1);
    assert_eq!(dev.listeners[0].addr.to_string(), DEFAULT_LISTEN);
    assert!(dev.dev_pki);
    let mut tls = common();
    tls.tls_cert_file = Some("/etc/cardvault/server.pem".into());
    tls.tls_key_file = Some("/etc/cardvault/server.key".into());
    let prod = Settings::resolve_serve(&tls, false, false).unwrap();
    let shown: Vec<String> = prod
        .listeners
        .iter()
        .map(|l| format!("{} {} {}", l.kind.name(), l.addr, l.auth.as_str()))
        .collect();
    assert_eq!(
        shown,
        [
            "api 127.0.0.1:8443 api_key",
            "reveal 127.0.0.1:8444 api_key",
            "admin 127.0.0.1:8445 api_key"
        ]
    );
    tls.reveal_auth = Some("mtls".into());
    assert!(matches!(
        Settings::resolve_serve(&tls, false, false),
        Err(ConfigError::MtlsWithoutCa("reveal_auth"))
    ));
    tls.tls_client_ca_file = Some("/etc/cardvault/clients-ca.pem".into());
    tls.reveal_auth = None;
    tls.admin_auth = Some("mtls_and_api_key".into());
    let prod = Settings::resolve_serve(&tls, false, false).unwrap();
    let modes: Vec<&str> = prod.listeners.iter().map(|l| l.auth.as_str()).collect();
    assert_eq!(modes, ["mtls", "mtls", "mtls_and_api_key"]);
    tls.api_auth = Some("mtls_or_api_key".into());
    assert!(matches!(
        Settings::resolve_serve(&tls, false, false),
        Err(ConfigError::AuthMode("api_auth"))
    ));
    assert_eq!(
        s.sqlite_path(),
        Some(PathBuf::from(DEFAULT_DATA_DIR).join("cardvault.db"))
    );
    let mut pg = common();
    pg.database_url = Some("postgres://vault@db/cardvault".into());
    assert_eq!(Settings::resolve(&pg, false).unwrap().sqlite_path(), None);
    assert_eq!(
        Settings::resolve(&common(), true).unwrap().data_dir,
        PathBuf::from(DEV_DATA_DIR)
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "data_dir = \"/srv/vault\"\nlisten = \"127.0.0.1:9000\"\nmax_body_bytes = 100\n",
    )
    .unwrap();
    let mut c = common();
    c.config = Some(file.clone());
    let s = Settings::resolve(&c, false).unwrap();
    assert_eq!(s.data_dir, PathBuf::from("/srv/vault"));
    let listen = |c: &Flags| Settings::resolve_serve(c, true, true).unwrap().listeners[0].addr;
    assert_eq!(listen(&c).port(), 9000);
    assert_eq!(s.max_body_bytes, 100);
    c.listen = Some("127.0.0.1:9001".parse().unwrap());
    assert_eq!(listen(&c).port(), 9001);

    // Monitoring: defaults, then the file, then a flag.
    let m = Settings::resolve(&common(), false).unwrap();
    assert!(m.detokenize_monitor.per_principal.is_off());
    assert!(m.detokenize_monitor.per_tenant.is_off());
    assert_eq!(m.detokenize_monitor.anomaly.min_distinct, 200);
    assert_eq!(m.auth_failures_per_source, 300);
    std::fs::write(
        &file,
        "detokenize_rate_per_principal = 5\ndetokenize_burst_per_tenant = 7\nauth_block_secs = 9\n",
    )
    .unwrap();
    let mut c = common();
    c.config = Some(file.clone());
    c.detokenize_anomaly_min_distinct = Some(3);
    let m = Settings::resolve(&c, false).unwrap();
    assert_eq!(m.detokenize_monitor.per_principal.per_minute, 5);
    assert_eq!(m.detokenize_monitor.per_tenant.burst, 7);
    assert_eq!(m.detokenize_monitor.anomaly.min_distinct, 3);
    assert_eq!(m.auth_block, std::time::Duration::from_secs(9));
    c.detokenize_rate_per_principal = Some(0);
    let m = Settings::resolve(&c, false).unwrap();
    assert!(m.detokenize_monitor.per_principal.is_off());

    // Log format: text by default, then the file, then a flag; an
    // unknown value is an error that does not repeat it.
    assert_eq!(m.log_format, LogFormat::Text);
    std::fs::write(&file, "log_format = \"json\"\n").unwrap();
    let mut c = common();
    c.config = Some(file.clone());
    assert_eq!(
        Settings::resolve(&c, false).unwrap().log_format,
        LogFormat::Json
    );
    c.log_format = Some("text".into());
    assert_eq!(
        Settings::resolve(&c, false).unwrap().log_format,
        LogFormat::Text
    );
    c.log_format = Some("yaml".into());
    let refused = Settings::resolve(&c, false).unwrap_err();
    assert!(matches!(refused, ConfigError::LogFormat));
    assert!(!refused.to_string().contains("yaml"), "{refused}");

    std::fs::write(&file, "data_dr = \"/typo\"\n").unwrap();
    assert!(matches!(
        Settings::resolve(&c, false),
        Err(ConfigError::Parse(..))
    ));
}

/// Every subcommand path (`["tenant", "set"]`, ...) that runs something,
/// with the long names of the options its `--help` lists.
fn leaf_commands() -> Vec<(String, Vec<String>)> {
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<(String, Vec<String>)>) {
        let subs: Vec<_> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        let shown: Vec<String> = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(str::to_owned))
            .filter(|l| l != "help" && l != "version")
            .collect();
        // A leaf, or a command that runs something itself and has
        // subcommands too (`edge` and `edge check`).
        if subs.is_empty() || !shown.is_empty() {
            out.push((path.join(" "), shown));
        }
        for sub in subs {
            path.push(sub.get_name().to_owned());
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(
        &<Cli as clap::CommandFactory>::command(),
        &mut Vec::new(),
        &mut out,
    );
    out
}

/// Each subcommand's help lists exactly the options it uses: the serve-only
/// ones only under `serve`.
#[test]
fn help_lists_only_the_options_a_subcommand_uses() {
    let vault = "config data-dir log-level log-format";
    let database = "database-url db-timeout-ms db-max-connections";
    let store = format!("{vault} {database} migrate-on-start");
    let keyring = "kek-backend keyring-file";
    let pkcs11 = "pkcs11-module pkcs11-token pkcs11-pin-file pkcs11-pin-env pkcs11-kek-label";
    let url = "url";
    let expected: Vec<(&str, String)> = vec![
        (
            "principal create",
            format!("{store} name roles tenants cert-identity"),
        ),
        ("principal list", store.clone()),
        ("principal revoke", store.clone()),
        ("migrate", format!("{vault} {database}")),
        ("backup", format!("{store} kek-file out")),
        ("backup verify", "public-key allow-unsigned".to_owned()),
        ("restore", format!("{vault} {database} kek-file from")),
        (
            "audit archive",
            format!(
                "{store} audit-retention-days audit-archive-dir older-than-days below-pci-minimum"
            ),
        ),
        (
            "keys init",
            format!("{vault} {keyring} shares threshold custodian"),
        ),
        (
            "keys rotate",
            format!("{url} fingerprint kek audit-signing"),
        ),
        ("keys status", format!("{url} watch")),
        ("keys retire", format!("{url} purpose")),
        ("keys destroy", format!("{url} purpose kek")),
        ("unseal", format!("{url} custodian")),
        ("seal", url.to_owned()),
        (
            "kek generate",
            format!("{vault} kek-file {keyring} {pkcs11}"),
        ),
        (
            "tenant set",
            format!("{store} pan-shaped token-ttl-days retention-days"),
        ),
        ("tenant list", store.clone()),
        ("tenant delete", store.clone()),
        ("purge", store.clone()),
        ("dev-pki", "out server-name".to_owned()),
        (
            "edge",
            "listen tls-cert-file tls-key-file insecure-plain-http vault-url vault-ca-file \
             client-cert-file client-key-file api-key-file public-url max-body-bytes \
             rate-per-source rate-per-session request-timeout-ms log-level log-format"
                .to_owned(),
        ),
        ("edge check", "url ca-file session".to_owned()),
    ];
    let leaves = leaf_commands();
    let mut checked = 0;
    for (path, shown) in &leaves {
        if path == "serve" {
            for option in
                SERVE_ONLY_OPTIONS
                    .iter()
                    .chain(&["dev", "insecure-plain-http", "dev-edge-listen"])
            {
                assert!(shown.iter().any(|s| s == option), "serve lacks --{option}");
            }
            for option in store
                .split(' ')
                .chain(["kek-file"])
                .chain(keyring.split(' '))
            {
                assert!(shown.iter().any(|s| s == option), "serve lacks --{option}");
            }
            checked += 1;
            continue;
        }
        // The edge's --listen, --tls-cert-file, ... are its own (with
        // TOKENIZER_EDGE_* variables, checked below), not serve's.
        for option in shown.iter().filter(|_| path != "edge") {
            assert!(
                !SERVE_ONLY_OPTIONS.contains(&option.as_str()),
                "`{path} --help` lists the serve option --{option}"
            );
        }
        let Some((_, want)) = expected.iter().find(|(p, _)| p == path) else {
            panic!("no expectation for `{path}`: it lists {shown:?}");
        };
        let mut want: Vec<&str> = want.split(' ').collect();
        let mut got: Vec<&str> = shown.iter().map(String::as_str).collect();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "`{path} --help`");
        checked += 1;
    }
    assert_eq!(checked, expected.len() + 1, "{leaves:?}");

    // The rendered help too, as an operator reads it.
    let mut cli = <Cli as clap::CommandFactory>::command();
    let tenant = cli.find_subcommand_mut("tenant").unwrap();
    let set = tenant.find_subcommand_mut("set").unwrap();
    let help = set.render_long_help().to_string();
    assert!(
        help.contains("--data-dir") && help.contains("--pan-shaped"),
        "{help}"
    );
    for option in [
        "--listen-api",
        "--tls-cert-file",
        "--detokenize-rate-per-principal",
    ] {
        assert!(
            !help.contains(option),
            "tenant set --help lists {option}:\n{help}"
        );
    }
    // The edge has nothing of a vault: no key, keyring, database or data
    // directory option, in its help or its variables.
    let edge = cli.find_subcommand_mut("edge").unwrap();
    for arg in edge
        .get_arguments()
        .filter(|a| a.get_long().is_some_and(|l| l != "help"))
    {
        let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
        assert!(
            env.starts_with("TOKENIZER_EDGE_"),
            "edge --{:?}: {env}",
            arg.get_long()
        );
    }
    let help = edge.render_long_help().to_string().to_lowercase();
    assert!(help.contains("--vault-url"), "{help}");
    for word in ["kek", "keyring", "database", "data-dir", "pkcs11", "db-"] {
        for option in [format!("--{word}"), format!("tokenizer_edge_{word}")] {
            assert!(!help.contains(&option), "edge --help has {option}:\n{help}");
        }
    }
    let serve = cli.find_subcommand_mut("serve").unwrap();
    let help = serve.render_long_help().to_string();
    assert!(
        help.contains("--listen-api") && help.contains("TOKENIZER_LISTEN_API"),
        "{help}"
    );
}

/// The invocations of the e2e tests, scripts, bench, deploy files and the
/// README still parse, and name the same settings as before.
#[test]
fn existing_invocations_still_parse() {
    use clap::Parser as _;
    let parse = |line: &str| -> Cli {
        let args = std::iter::once("tokenizer").chain(line.split_whitespace());
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("`tokenizer {line}`: {e}"))
    };
    for line in [
        "kek generate --data-dir /d --database-url postgres://u@h/db",
        "kek generate --data-dir /d --kek-backend pkcs11 --pkcs11-token t --pkcs11-pin-file /p",
        "keys init --kek-backend keyring --shares 3 --threshold 2 --data-dir /d --custodian a --custodian b --custodian c",
        "migrate --config /c.toml --data-dir /d --database-url postgres://u@h/db",
        "principal create --data-dir /d --database-url sqlite:///x --name n --roles tokenize --tenants * --cert-identity spiffe://x/y",
        "principal list --data-dir /d",
        "principal revoke --data-dir /d checkout",
        "tenant set --data-dir /d shop-42 --pan-shaped true --token-ttl-days 30 --retention-days 395",
        "tenant list --data-dir /d",
        "tenant delete --data-dir /d shop-42",
        "purge --data-dir /d --database-url postgres://u@h/db",
        "backup --data-dir /d --out /b",
        "backup verify /b --public-key /d/audit-verify.pub",
        "backup verify /b --public-key cardvault-audit-ed25519:00 --public-key /k --allow-unsigned",
        "serve --data-dir /d --backup-dir /b --backup-interval-secs 86400 --backup-keep 14 --tls-cert-file /s.pem --tls-key-file /s.key",
        "restore --data-dir /d --from /b",
        "audit archive --older-than-days 0 --below-pci-minimum --data-dir /d --database-url postgres://u@h/db",
        "keys status --url https://127.0.0.1:8445 --watch",
        "serve --data-dir /d --listen-api 127.0.0.1:0 --listen-reveal 127.0.0.1:0 --listen-admin 127.0.0.1:0 --tls-cert-file /s.pem --tls-key-file /s.key --log-level trace --log-format json --reencrypt-batch 7",
        "serve --dev --listen 127.0.0.1:0 --insecure-plain-http",
    ] {
        parse(line);
    }
    for refused in [
        "tenant set --data-dir /d shop --listen-api 127.0.0.1:1",
        "principal list --tls-cert-file /s.pem",
        "purge --reencrypt-batch 7",
        "kek generate --listen 127.0.0.1:1",
    ] {
        let args = std::iter::once("tokenizer").chain(refused.split_whitespace());
        assert!(Cli::try_parse_from(args).is_err(), "`{refused}` parsed");
    }

    // What a storage command resolves is what serve resolves from the same
    // flags.
    let Command::Tenant {
        command: TenantCommand::Set { store, .. },
    } = parse("tenant set shop --data-dir /d --database-url postgres://u@h/db --db-timeout-ms 7 --migrate-on-start false --log-format json").command
    else {
        unreachable!("parsed above as tenant set");
    };
    let Command::Serve(serve) = parse(
        "serve --data-dir /d --database-url postgres://u@h/db --db-timeout-ms 7 --migrate-on-start false --log-format json",
    )
    .command
    else {
        unreachable!("parsed above as serve");
    };
    let a = Settings::resolve(&store, false).unwrap();
    let b = Settings::resolve(&serve.common, false).unwrap();
    assert_eq!(
        format!(
            "{:?} {} {:?} {} {:?}",
            a.data_dir, a.database_url, a.db_timeout, a.migrate_on_start, a.log_format
        ),
        format!(
            "{:?} {} {:?} {} {:?}",
            b.data_dir, b.database_url, b.db_timeout, b.migrate_on_start, b.log_format
        )
    );
    assert_eq!(a.db_timeout, std::time::Duration::from_millis(7));
    assert!(!a.migrate_on_start);
    assert_eq!(a.log_format, LogFormat::Json);
}

/// Scheduled backups: off unless an interval is set, which needs a
/// directory; keep at least one; the file and the flags agree.
#[test]
fn backup_settings() {
    let s = Settings::resolve(&common(), false).unwrap();
    assert_eq!(s.backup, None);
    let mut flags = common();
    flags.backup_interval_secs = Some(0);
    flags.backup_dir = Some("/srv/backups".into());
    assert_eq!(Settings::resolve(&flags, false).unwrap().backup, None);
    flags.backup_interval_secs = Some(3600);
    let b = Settings::resolve(&flags, false).unwrap().backup.unwrap();
    assert_eq!(
        (b.dir, b.interval.as_secs(), b.keep),
        (PathBuf::from("/srv/backups"), 3600, DEFAULT_BACKUP_KEEP)
    );
    flags.backup_keep = Some(0);
    assert!(matches!(
        Settings::resolve(&flags, false),
        Err(ConfigError::BackupKeep)
    ));
    flags.backup_keep = None;
    flags.backup_dir = None;
    assert!(matches!(
        Settings::resolve(&flags, false),
        Err(ConfigError::BackupDirMissing)
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        "backup_dir = \"/mnt/backups\"\nbackup_interval_secs = 60\nbackup_keep = 3\n",
    )
    .unwrap();
    let mut flags = common();
    flags.config = Some(file);
    let b = Settings::resolve(&flags, false).unwrap().backup.unwrap();
    assert_eq!(
        (b.dir, b.interval.as_secs(), b.keep),
        (PathBuf::from("/mnt/backups"), 60, 3)
    );
    // A flag wins over the file.
    flags.backup_keep = Some(9);
    let b = Settings::resolve(&flags, false).unwrap().backup.unwrap();
    assert_eq!(b.keep, 9);
}
