//! TLS for the listeners (rustls with the ring provider): what the server
//! presents, which client certificates it accepts, reloading both without a
//! restart, why a handshake failed, and who a verified client is.
//!
//! Protocols: TLS 1.3, and TLS 1.2 with ECDHE key exchange and AEAD suites
//! only (AES-GCM, ChaCha20-Poly1305); nothing older is offered. Client
//! certificates are verified against the configured CA bundle and, when a
//! CRL file is configured, checked for revocation (fail closed: a
//! certificate whose status the CRLs do not cover is refused). A verified
//! certificate's identity is its URI and DNS subject alternative names; a
//! principal bound to one of them (`tokenizer principal create
//! --cert-identity`) is the caller.
//!
//! Also here: `tokenizer dev-pki`, a throwaway local CA with a server
//! certificate and one client certificate per role, for trials only.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// Where the TLS material comes from. Every file is read again on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM; mode 0600 or 0400).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation lists of those CAs (PEM, one or more).
    pub client_crl: Option<PathBuf>,
    /// What a CRL past its nextUpdate means (`tls_client_crl_stale`).
    pub client_crl_stale: CrlStale,
}

/// What to do with client certificates while a CRL is past its nextUpdate
/// (it may no longer list every revoked certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CrlStale {
    /// Refuse every client certificate the stale CRL covers (handshake
    /// failure `crl_expired`) until a fresh CRL is loaded (SIGHUP).
    #[default]
    Refuse,
    /// Accept them; the log and the metrics say the CRL is stale.
    Warn,
}

impl CrlStale {
    pub fn as_str(self) -> &'static str {
        match self {
            CrlStale::Refuse => "refuse",
            CrlStale::Warn => "warn",
        }
    }
}

/// The validity of the client CRLs loaded (unix seconds): the oldest
/// thisUpdate and the earliest nextUpdate among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlStatus {
    pub this_update: i64,
    pub next_update: Option<i64>,
}

impl CrlStatus {
    /// Whether a CRL is past its nextUpdate at `now` (unix seconds).
    pub fn stale_at(&self, now: i64) -> bool {
        self.next_update.is_some_and(|next| now > next)
    }

    fn of(crls: &[CertificateRevocationListDer<'_>], path: &Path) -> Result<CrlStatus, TlsError> {
        let mut status: Option<CrlStatus> = None;
        for der in crls {
            let (_, crl) = x509_parser::parse_x509_crl(der)
                .map_err(|e| TlsError::BadCrl(shown(path), e.to_string()))?;
            let this = crl.last_update().timestamp();
            let next = crl.next_update().map(|t| t.timestamp());
            status = Some(match status {
                None => CrlStatus {
                    this_update: this,
                    next_update: next,
                },
                Some(s) => CrlStatus {
                    this_update: s.this_update.min(this),
                    next_update: match (s.next_update, next) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    },
                },
            });
        }
        status.ok_or_else(|| TlsError::NoCrl(shown(path)))
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Say in the log how old the client CRLs are, and what a stale one means.
fn log_crl(status: &CrlStatus, policy: CrlStale) {
    let now = unix_now();
    let age_s = now.saturating_sub(status.this_update);
    let next_update_in_s = status.next_update.map(|n| n - now);
    if status.stale_at(now) {
        match policy {
            CrlStale::Refuse => tracing::error!(
                crl_age_s = age_s,
                next_update_in_s,
                crl_stale = policy.as_str(),
                "client CRL is past its nextUpdate: certificates it covers are refused until a fresh CRL is loaded (SIGHUP)"
            ),
            CrlStale::Warn => tracing::warn!(
                crl_age_s = age_s,
                next_update_in_s,
                crl_stale = policy.as_str(),
                "client CRL is past its nextUpdate: certificates are still accepted (crl_stale = warn); load a fresh CRL (SIGHUP)"
            ),
        }
    } else {
        tracing::info!(
            crl_age_s = age_s,
            next_update_in_s,
            crl_stale = policy.as_str(),
            "client CRL loaded"
        );
    }
}

/// Whether a listener asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// The handshake fails without a valid one.
    Required,
    /// A presented certificate must be valid; none is fine too.
    Optional,
    /// Not asked for.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] io::Error),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(String),
    #[error("{0} holds no usable PEM private key")]
    NoKey(String),
    #[error("{0} is readable by group or others; chmod 600 it (or 640 when owned by root)")]
    KeyPermissions(String),
    #[error("{0} holds no PEM certificate revocation list")]
    NoCrl(String),
    #[error("certificate revocation list {0}: {1}")]
    BadCrl(String, String),
    #[error("client CA bundle {0}: {1}")]
    ClientCa(String, String),
    #[error("a listener requires client certificates but no tls_client_ca_file is configured")]
    NoClientCa,
    #[error("TLS configuration: {0}")]
    Rustls(String),
    #[error("cannot generate the development PKI: {0}")]
    Generate(String),
    #[error("cannot write {0}: {1}")]
    Write(String, #[source] io::Error),
}

/// The crypto provider of every listener: ring, with the suites we allow.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// The server configurations of every kind of listener, swapped as a whole
/// on reload.
#[derive(Debug, Clone)]
struct Built {
    required: Option<Arc<ServerConfig>>,
    optional: Option<Arc<ServerConfig>>,
    none: Arc<ServerConfig>,
    crl: Option<CrlStatus>,
}

/// TLS material that can be reloaded while serving: a new handshake uses
/// the configuration current when it starts; established connections keep
/// theirs.
#[derive(Debug)]
pub struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Built>,
    /// Whether the log already said that the loaded CRL went stale.
    stale_logged: std::sync::atomic::AtomicBool,
}

impl ReloadableTls {
    /// Load every file now; an error stops the start.
    pub fn load(files: TlsFiles) -> Result<ReloadableTls, TlsError> {
        let built = build(&files)?;
        let stale = built.crl.is_some_and(|c| c.stale_at(unix_now()));
        Ok(ReloadableTls {
            files,
            current: RwLock::new(built),
            stale_logged: stale.into(),
        })
    }

    /// Read every file again. On error the old material stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let built = build(&self.files)?;
        let stale = built.crl.is_some_and(|c| c.stale_at(unix_now()));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = built;
        self.stale_logged
            .store(stale, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The loaded client CRLs' validity (None without a CRL).
    pub fn crl_status(&self) -> Option<CrlStatus> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).crl
    }

    /// Say in the log, once per loading, that the client CRL went stale
    /// while in use (the service calls this every minute).
    pub fn check_crl(&self) {
        let Some(status) = self.crl_status() else {
            return;
        };
        if status.stale_at(unix_now())
            && !self
                .stale_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            log_crl(&status, self.files.client_crl_stale);
        }
    }

    /// The configuration for a new handshake.
    pub fn config(&self, client: ClientCerts) -> Result<Arc<ServerConfig>, TlsError> {
        let built = self.current.read().unwrap_or_else(|p| p.into_inner());
        match client {
            ClientCerts::Required => built.required.clone().ok_or(TlsError::NoClientCa),
            ClientCerts::Optional => built.optional.clone().ok_or(TlsError::NoClientCa),
            ClientCerts::None => Ok(built.none.clone()),
        }
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read(shown(path), pem_io(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read(shown(path), pem_io(e)))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(shown(path)));
    }
    Ok(certs)
}

fn pem_io(e: rustls_pki_types::pem::Error) -> io::Error {
    match e {
        rustls_pki_types::pem::Error::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let meta = fs::metadata(path).map_err(|e| TlsError::Read(shown(path), e))?;
    if !hsm_shim::is_private_file(&meta) {
        return Err(TlsError::KeyPermissions(shown(path)));
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::Io(e) => TlsError::Read(shown(path), e),
        _ => TlsError::NoKey(shown(path)),
    })
}

/// The client-certificate verifiers (required, optional) from one reading
/// of the CA bundle and the CRLs; none without a client CA.
type Verifiers = (
    Arc<dyn ClientCertVerifier>,
    Arc<dyn ClientCertVerifier>,
    Option<CrlStatus>,
);

fn verifiers(
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
) -> Result<Option<Verifiers>, TlsError> {
    let Some(ca) = &files.client_ca else {
        return Ok(None);
    };
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::ClientCa(shown(ca), e.to_string()))?;
    }
    let roots = Arc::new(roots);
    let crls = match &files.client_crl {
        Some(path) => {
            let crls = CertificateRevocationListDer::pem_file_iter(path)
                .map_err(|e| TlsError::Read(shown(path), pem_io(e)))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Read(shown(path), pem_io(e)))?;
            if crls.is_empty() {
                return Err(TlsError::NoCrl(shown(path)));
            }
            let status = CrlStatus::of(&crls, path)?;
            log_crl(&status, files.client_crl_stale);
            Some((crls, status))
        }
        None => None,
    };
    let build = |optional: bool| {
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
        if let Some((crls, _)) = &crls {
            builder = builder
                .with_crls(crls.iter().cloned())
                .only_check_end_entity_revocation();
            if files.client_crl_stale == CrlStale::Refuse {
                builder = builder.enforce_revocation_expiration();
            }
        }
        if optional {
            builder = builder.allow_unauthenticated();
        }
        builder
            .build()
            .map_err(|e| TlsError::ClientCa(shown(ca), e.to_string()))
    };
    Ok(Some((
        build(false)?,
        build(true)?,
        crls.map(|(_, status)| status),
    )))
}

fn build(files: &TlsFiles) -> Result<Built, TlsError> {
    let provider = provider();
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let server_config = |verifier: Option<Arc<dyn ClientCertVerifier>>| {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match verifier {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok::<_, TlsError>(Arc::new(config))
    };
    let (required, optional, crl) = match verifiers(files, &provider)? {
        Some((required, optional, crl)) => (
            Some(server_config(Some(required))?),
            Some(server_config(Some(optional))?),
            crl,
        ),
        None => (None, None, None),
    };
    Ok(Built {
        required,
        optional,
        none: server_config(None)?,
        crl,
    })
}

/// Why a handshake failed, as a fixed code (for the audit trail and the
/// metrics).
pub fn failure_reason(error: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(e) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    else {
        return match error.kind() {
            io::ErrorKind::TimedOut => "timeout",
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "aborted",
            _ => "protocol",
        };
    };
    match e {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownRevocationStatus => "unknown_revocation_status",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "crl_expired",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            _ => "bad_certificate",
        },
        Error::InvalidCertRevocationList(_) => "bad_crl",
        _ => "protocol",
    }
}

/// Whether a failure reason is about the client's certificate (audited as a
/// refused authentication), rather than transport or protocol noise.
pub fn is_certificate_failure(reason: &str) -> bool {
    !matches!(reason, "timeout" | "aborted" | "protocol")
}

/// A client whose certificate the handshake verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// URI and DNS subject alternative names, in certificate order.
    pub identities: Vec<String>,
}

/// The identity of the verified peer certificate, if one was presented.
pub fn client_identity(conn: &rustls::ServerConnection) -> Option<ClientIdentity> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut identities = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::URI(uri) => {
                    identities.push((*uri).to_owned())
                }
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    identities.push((*dns).to_owned())
                }
                _ => {}
            }
        }
    }
    Some(ClientIdentity { identities })
}

/// A rustls client configuration: `ca_file` as the only roots (never the
/// system's), TLS 1.3 and 1.2 with the listeners' suites, optionally a
/// client certificate. The edge's calls to the vault, `tokenizer edge
/// check`, and the forwarding proxy's upstreams use it.
pub fn client_config(
    ca_file: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Rustls(format!("{}: {e}", shown(ca_file))))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots);
    match client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Rustls(format!("client certificate {}: {e}", shown(cert))))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The roles `tokenizer dev-pki` makes a client certificate for.
pub const DEV_ROLES: [&str; 6] = [
    "tokenize",
    "detokenize",
    "auditor",
    "key_admin",
    "collect",
    "forward",
];

/// The URI identity of a dev client certificate.
pub fn dev_identity(role: &str) -> String {
    format!("spiffe://cardvault.dev/{role}")
}

/// What `tokenizer dev-pki` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// (role, certificate, key, identity)
    pub clients: Vec<(String, PathBuf, PathBuf, String)>,
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| TlsError::Write(shown(path), e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| TlsError::Write(shown(path), e))
}

/// A local CA (valid 90 days), a server certificate for `server_names` (DNS
/// names or IP addresses) and a client certificate per role of
/// [`DEV_ROLES`], written to `dir` (created 0700; existing files are never
/// overwritten). For trials and tests, never production: the CA key sits
/// next to the certificates.
pub fn write_dev_pki(dir: &Path, server_names: &[String]) -> Result<DevPki, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    fs::create_dir_all(dir).map_err(|e| TlsError::Write(shown(dir), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| TlsError::Write(shown(dir), e))?;
    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(90);
    };

    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own: two dev PKIs are two different CAs to a verifier.
    let mut tag = [0u8; 4];
    getrandom::getrandom(&mut tag).map_err(|e| TlsError::Generate(e.to_string()))?;
    ca.distinguished_name.push(
        DnType::CommonName,
        format!(
            "cardvault development CA {} (not for production)",
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    );
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let issuer = Issuer::new(ca, &ca_key);

    let leaf = |names: Vec<String>, cn: &str, purpose: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(gen)?;
        // `scheme://...` is a URI SAN; anything else a DNS name or IP.
        let (uris, names): (Vec<String>, Vec<String>) =
            names.into_iter().partition(|n| n.contains("://"));
        let mut params = CertificateParams::new(names).map_err(gen)?;
        for uri in uris {
            let uri = rcgen::string::Ia5String::try_from(uri).map_err(gen)?;
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params);
        let cert = params.signed_by(&key, &issuer).map_err(gen)?;
        Ok::<_, TlsError>((cert.pem(), key.serialize_pem()))
    };

    let pki = DevPki {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        clients: DEV_ROLES
            .iter()
            .map(|r| {
                (
                    (*r).to_owned(),
                    dir.join(format!("client-{r}.pem")),
                    dir.join(format!("client-{r}.key")),
                    dev_identity(r),
                )
            })
            .collect(),
    };
    write_new(&pki.ca, &ca_cert.pem(), 0o644)?;
    write_new(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    let names = if server_names.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    } else {
        server_names.to_vec()
    };
    let (cert, key) = leaf(
        names,
        "cardvault development server",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    write_new(&pki.server_cert, &cert, 0o644)?;
    write_new(&pki.server_key, &key, 0o600)?;
    for (role, cert_path, key_path, identity) in &pki.clients {
        let (cert, key) = leaf(
            vec![identity.clone()],
            &format!("cardvault development client {role}"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        write_new(cert_path, &cert, 0o644)?;
        write_new(key_path, &key, 0o600)?;
    }
    Ok(pki)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dev_pki_loads_and_refuses_loose_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_dev_pki(&dir.path().join("pki"), &[]).unwrap();
        let files = TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca.clone()),
            client_crl: None,
            client_crl_stale: crate::tls::CrlStale::default(),
        };
        let tls = ReloadableTls::load(files.clone()).unwrap();
        assert!(tls.config(ClientCerts::Required).is_ok());
        tls.reload().unwrap();
        // A second run never overwrites.
        assert!(write_dev_pki(&dir.path().join("pki"), &[]).is_err());
        fs::set_permissions(&pki.server_key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::KeyPermissions(_))));
        // The old material stays in use after a failed reload.
        assert!(tls.config(ClientCerts::None).is_ok());
        let no_ca = TlsFiles {
            client_ca: None,
            ..files
        };
        fs::set_permissions(&pki.server_key, fs::Permissions::from_mode(0o600)).unwrap();
        let tls = ReloadableTls::load(no_ca).unwrap();
        assert!(matches!(
            tls.config(ClientCerts::Required),
            Err(TlsError::NoClientCa)
        ));
    }

    #[test]
    fn only_tls12_and_13_with_aead_suites() {
        let p = provider();
        for suite in &p.cipher_suites {
            let name = format!("{:?}", suite.suite());
            assert!(
                name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
                "{name}"
            );
            assert!(
                name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
                "{name}"
            );
        }
    }
}
