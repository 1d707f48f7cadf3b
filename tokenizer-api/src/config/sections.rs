//! The settings that combine several keys and are checked together: the
//! listeners with their authentication modes and TLS files (`serve`), the
//! KEK source of the configured backend, and the detokenize limits and
//! anomaly rule. Each reads flag, then file, then default, like the rest.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::file::FileConfig;
use super::flags::Flags;
use super::{
    ConfigError, DEFAULT_LISTEN, DEFAULT_LISTEN_ADMIN, DEFAULT_LISTEN_API, DEFAULT_LISTEN_REVEAL,
    DEV_TLS_DIR,
};

/// The listeners, their authentication and the TLS files.
pub(super) fn listeners(
    flags: &Flags,
    file: &mut FileConfig,
    dev: bool,
    plain_http_flag: bool,
    data_dir: &Path,
) -> Result<
    (
        Vec<crate::listeners::ListenerSpec>,
        Option<crate::tls::TlsFiles>,
        bool,
    ),
    ConfigError,
> {
    use crate::listeners::{AuthMode, ListenerKind, ListenerSpec};
    let literal =
        |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|_| unreachable!("valid literal")) };
    let plain = plain_http_flag || file.insecure_plain_http.unwrap_or(false);
    if plain && !dev {
        return Err(ConfigError::PlainHttpOutsideDev);
    }
    let cert = flags.tls_cert_file.clone().or(file.tls_cert_file.take());
    let key = flags.tls_key_file.clone().or(file.tls_key_file.take());
    let client_ca = flags
        .tls_client_ca_file
        .clone()
        .or(file.tls_client_ca_file.take());
    let client_crl = flags
        .tls_client_crl_file
        .clone()
        .or(file.tls_client_crl_file.take());
    let client_crl_stale = flags
        .tls_client_crl_stale
        .or(file.tls_client_crl_stale.take())
        .unwrap_or_default();
    let dev_dir = data_dir.join(DEV_TLS_DIR);
    let (tls, dev_pki) = match (plain, cert, key) {
        (true, _, _) => (None, false),
        (false, Some(cert), Some(key)) => (
            Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca,
                client_crl,
                client_crl_stale,
            }),
            false,
        ),
        (false, None, None) if dev => (
            Some(crate::tls::TlsFiles {
                cert: dev_dir.join("server.pem"),
                key: dev_dir.join("server.key"),
                client_ca: Some(dev_dir.join("ca.pem")),
                client_crl,
                client_crl_stale,
            }),
            true,
        ),
        _ => return Err(ConfigError::TlsRequired),
    };
    let verifies = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let mode = |name: &'static str, flag: &Option<String>, key: Option<String>| {
        let mode = match flag.clone().or(key) {
            Some(s) => AuthMode::parse(&s)
                .filter(|m| *m != AuthMode::MtlsOrApiKey || dev)
                .ok_or(ConfigError::AuthMode(name))?,
            None if dev && verifies => AuthMode::MtlsOrApiKey,
            None if verifies => AuthMode::Mtls,
            None => AuthMode::ApiKey,
        };
        if mode != AuthMode::ApiKey && !verifies {
            return Err(ConfigError::MtlsWithoutCa(name));
        }
        Ok(mode)
    };
    let api_auth = mode("api_auth", &flags.api_auth, file.api_auth.take())?;
    let specs = if dev {
        vec![ListenerSpec {
            kind: ListenerKind::Dev,
            addr: flags
                .listen
                .or(file.listen)
                .unwrap_or_else(|| literal(DEFAULT_LISTEN)),
            auth: api_auth,
        }]
    } else {
        vec![
            ListenerSpec {
                kind: ListenerKind::Api,
                addr: flags
                    .listen_api
                    .or(file.listen_api)
                    .unwrap_or_else(|| literal(DEFAULT_LISTEN_API)),
                auth: api_auth,
            },
            ListenerSpec {
                kind: ListenerKind::Reveal,
                addr: flags
                    .listen_reveal
                    .or(file.listen_reveal)
                    .unwrap_or_else(|| literal(DEFAULT_LISTEN_REVEAL)),
                auth: mode("reveal_auth", &flags.reveal_auth, file.reveal_auth.take())?,
            },
            ListenerSpec {
                kind: ListenerKind::Admin,
                addr: flags
                    .listen_admin
                    .or(file.listen_admin)
                    .unwrap_or_else(|| literal(DEFAULT_LISTEN_ADMIN)),
                auth: mode("admin_auth", &flags.admin_auth, file.admin_auth.take())?,
            },
        ]
    };
    Ok((specs, tls, dev_pki))
}

/// Detokenize limits and the anomaly rule: flag, then variable, then file,
/// then default.
pub(super) fn monitor_config(flags: &Flags, file: &FileConfig) -> vault::monitor::MonitorConfig {
    use vault::monitor::{AnomalyRule, MonitorConfig, Rate};
    let pick = |flag: Option<u32>, key: Option<u32>, default: u32| flag.or(key).unwrap_or(default);
    MonitorConfig {
        per_principal: Rate {
            per_minute: pick(
                flags.detokenize_rate_per_principal,
                file.detokenize_rate_per_principal,
                0,
            ),
            burst: pick(
                flags.detokenize_burst_per_principal,
                file.detokenize_burst_per_principal,
                100,
            )
            .max(1),
        },
        per_tenant: Rate {
            per_minute: pick(
                flags.detokenize_rate_per_tenant,
                file.detokenize_rate_per_tenant,
                0,
            ),
            burst: pick(
                flags.detokenize_burst_per_tenant,
                file.detokenize_burst_per_tenant,
                100,
            )
            .max(1),
        },
        anomaly: AnomalyRule {
            window: std::time::Duration::from_secs(
                flags
                    .detokenize_anomaly_window_secs
                    .or(file.detokenize_anomaly_window_secs)
                    .unwrap_or(300)
                    .max(1),
            ),
            factor: pick(
                flags.detokenize_anomaly_factor,
                file.detokenize_anomaly_factor,
                5,
            )
            .max(1),
            min_distinct: pick(
                flags.detokenize_anomaly_min_distinct,
                file.detokenize_anomaly_min_distinct,
                200,
            ),
            baseline_windows: pick(
                flags.detokenize_anomaly_baseline_windows,
                file.detokenize_anomaly_baseline_windows,
                12,
            )
            .clamp(1, 1000),
        },
    }
}

/// The KEK backend keys of the configuration file.
#[derive(Debug, Default)]
pub(super) struct KekFileConfig {
    pub(super) kek_backend: Option<String>,
    pub(super) keyring_file: Option<PathBuf>,
    pub(super) pkcs11_module: Option<PathBuf>,
    pub(super) pkcs11_token: Option<String>,
    pub(super) pkcs11_pin_file: Option<PathBuf>,
    pub(super) pkcs11_pin_env: Option<String>,
    pub(super) pkcs11_kek_label: Option<String>,
}

pub(super) fn kek_source(
    flags: &Flags,
    file: &KekFileConfig,
    data_dir: &Path,
    kek_file: &Path,
    dev: bool,
) -> Result<crate::seal::KekSource, ConfigError> {
    use crate::seal::KekSource;
    let backend = flags
        .kek_backend
        .clone()
        .or(file.kek_backend.clone())
        .unwrap_or_else(|| "file".to_owned());
    match backend.as_str() {
        "file" => Ok(KekSource::File {
            path: kek_file.to_path_buf(),
            dev,
        }),
        _ if dev => Err(ConfigError::DevBackend),
        "keyring" => Ok(KekSource::Keyring {
            path: flags
                .keyring_file
                .clone()
                .or(file.keyring_file.clone())
                .unwrap_or_else(|| data_dir.join("keyring.json")),
        }),
        "pkcs11" => {
            let token = flags
                .pkcs11_token
                .clone()
                .or(file.pkcs11_token.clone())
                .ok_or(ConfigError::Pkcs11Token)?;
            let pin = match flags
                .pkcs11_pin_file
                .clone()
                .or(file.pkcs11_pin_file.clone())
            {
                Some(path) => hsm_shim::PinSource::File(path),
                None => hsm_shim::PinSource::Env(
                    flags
                        .pkcs11_pin_env
                        .clone()
                        .or(file.pkcs11_pin_env.clone())
                        .unwrap_or_else(|| "TOKENIZER_PKCS11_PIN".to_owned()),
                ),
            };
            let label = flags
                .pkcs11_kek_label
                .clone()
                .or(file.pkcs11_kek_label.clone())
                .unwrap_or_else(|| "cardvault-kek-1".to_owned());
            let mut config = hsm_shim::Pkcs11Config::new(token, pin, label);
            if let Some(module) = flags.pkcs11_module.clone().or(file.pkcs11_module.clone()) {
                config.module = module;
            }
            Ok(KekSource::Pkcs11(config))
        }
        _ => Err(ConfigError::KekBackend),
    }
}
