//! TLS and mutual TLS on the real listeners: which listener serves what,
//! client certificates mapped to principals, certificates refused at the
//! handshake (wrong CA, expired, revoked, none) and audited, both
//! credentials together, protocol versions, and reloading the server
//! certificate on SIGHUP without a restart.
//!
//! Certificates come from `tokenizer dev-pki` (the harness PKI of every
//! service, `harness-pki/` in its data directory); the expired and revoked
//! ones are signed here with that PKI's CA key (rcgen), the CRL too.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{harness_pki_dir, Client, Endpoints, Options, Service};
use serde_json::json;

use crate::{exp_year, REASON, TENANT};

/// A client of one listener only (every path goes there).
fn on_listener(svc: &Service, name: &str, authorization: Option<String>) -> Client {
    let addr = svc
        .listener(name)
        .unwrap_or_else(|| panic!("no {name} listener"));
    let endpoints = Endpoints {
        listeners: vec![("dev".to_string(), addr.to_string())],
        ca: svc.endpoints().ca.clone(),
    };
    Client::for_endpoints(&endpoints, authorization)
}

fn pki(svc: &Service) -> PathBuf {
    harness_pki_dir(svc.data_dir())
}

fn cert_of(svc: &Service, role: &str) -> (PathBuf, PathBuf) {
    let dir = pki(svc);
    (
        dir.join(format!("client-{role}.pem")),
        dir.join(format!("client-{role}.key")),
    )
}

fn identity(role: &str) -> String {
    format!("spiffe://cardvault.dev/{role}")
}

/// `principal create ... --cert-identity`; returns the API key.
fn bind(svc: &Service, name: &str, roles: &str, identity: &str) -> String {
    let out = svc.cli(&[
        "principal",
        "create",
        "--name",
        name,
        "--roles",
        roles,
        "--tenants",
        "*",
        "--cert-identity",
        identity,
    ]);
    assert!(out.success(), "principal create failed\n{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    v["api_key"].as_str().unwrap().to_string()
}

/// Audit details of refused client certificates.
fn refused_certificates(svc: &Service) -> Vec<String> {
    svc.sql_strings(
        "SELECT detail FROM audit_events WHERE action = 'authentication_failed' \
         AND detail LIKE 'client_certificate_refused%' ORDER BY seq",
    )
}

/// Waits until the audit trail holds `n` refused certificates (the audit
/// write runs after the handshake failed, concurrently with the client).
fn wait_for_refusals(svc: &Service, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = refused_certificates(svc);
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_route_is_served_on_its_listener_only() {
    let svc = Service::start();
    let key = svc.create_principal("split", &["tokenize", "detokenize", "auditor"], &["*"]);
    let auth = Some(format!("Bearer {key}"));
    let api = on_listener(&svc, "api", auth.clone());
    let reveal = on_listener(&svc, "reveal", auth.clone());
    let admin = on_listener(&svc, "admin", auth);

    let created = api.tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert_eq!(created.status, 201, "{created}");
    let token = created.str("token");
    let detok = json!({"token": token, "reason": REASON});
    // Detokenize only on reveal; tokenize and metadata only on api; metrics,
    // readiness and audit only on admin.
    assert_eq!(reveal.post_json("/v1/detokenize", &detok).status, 200);
    for (client, method, path) in [
        (&api, "POST", "/v1/detokenize"),
        (&admin, "POST", "/v1/detokenize"),
        (&reveal, "POST", "/v1/tokens"),
        (&admin, "POST", "/v1/tokens"),
        (&reveal, "GET", &*format!("/v1/tokens/{token}")),
        (&api, "GET", "/metrics"),
        (&reveal, "GET", "/metrics"),
        (&api, "GET", "/readyz"),
        (&api, "GET", "/v1/audit/events"),
        (&reveal, "POST", "/v1/admin/seal"),
        (&api, "POST", "/v1/admin/seal"),
    ] {
        let resp = if method == "POST" {
            client.send_raw(
                method,
                path,
                Some("application/json"),
                br#"{"token":"x","reason":"y"}"#,
            )
        } else {
            client.send(method, path)
        };
        assert_eq!(
            (resp.status, resp.error_code()),
            (404, Some("not_found")),
            "{method} {path} on another listener: {resp}"
        );
    }
    assert_eq!(api.get(&format!("/v1/tokens/{token}")).status, 200);
    assert_eq!(admin.get("/readyz").status, 200);
    assert_eq!(admin.get("/metrics").status, 200);
    assert_eq!(admin.get("/v1/audit/events?limit=1").status, 200);
    for client in [&api, &reveal, &admin] {
        assert_eq!(client.get("/healthz").status, 200);
    }
}

#[test]
fn client_certificates_authenticate_as_their_principals() {
    let svc = Service::start_with(Options {
        client_ca: true,
        ..Options::default()
    });
    bind(&svc, "checkout", "tokenize", &identity("tokenize"));
    bind(&svc, "router", "detokenize", &identity("detokenize"));
    let anonymous = svc.anonymous();
    let (cert, key) = cert_of(&svc, "tokenize");
    let checkout = anonymous.with_client_cert(&cert, &key);
    let (cert, key) = cert_of(&svc, "detokenize");
    let router = anonymous.with_client_cert(&cert, &key);

    let created = checkout.tokenize(TENANT, "5555555555554444", 12, exp_year());
    assert_eq!(created.status, 201, "{created}");
    let token = created.str("token");
    let revealed = router.detokenize(&token, REASON);
    assert_eq!(revealed.status, 200, "{revealed}");
    assert_eq!(revealed.str("pan"), "5555555555554444");

    // The wrong role: the checkout's certificate on reveal.
    let denied = checkout.detokenize(&token, REASON);
    assert_eq!(
        (denied.status, denied.error_code()),
        (403, Some("forbidden")),
        "{denied}"
    );
    // A valid certificate no principal is bound to.
    let (cert, key) = cert_of(&svc, "auditor");
    let unbound = anonymous.with_client_cert(&cert, &key).tokenize(
        TENANT,
        "4111111111111111",
        12,
        exp_year(),
    );
    assert_eq!(
        (unbound.status, unbound.error_code()),
        (401, Some("unauthenticated")),
        "{unbound}"
    );
    // The audit trail names the principal of the certificate.
    let actors = svc.sql_strings(
        "SELECT principal FROM audit_events WHERE action = 'detokenize' AND outcome = 'success'",
    );
    assert_eq!(actors, ["router"]);
    let unknown = svc.sql_strings(
        "SELECT detail FROM audit_events WHERE detail = 'unknown_certificate_identity'",
    );
    assert_eq!(unknown.len(), 1, "{unknown:?}");

    // No certificate at all: the mTLS listener refuses the handshake (an
    // API key does not help), and the refusal is audited.
    let api_key = bind(
        &svc,
        "keyholder",
        "tokenize",
        "spiffe://cardvault.dev/keyholder",
    );
    let without_cert =
        svc.client(&api_key)
            .try_tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert!(
        without_cert.is_err(),
        "no certificate, no handshake: {without_cert:?}"
    );
    let refused = wait_for_refusals(&svc, 1);
    assert!(
        refused
            .iter()
            .any(|d| d.starts_with("client_certificate_refused: no_certificate")),
        "{refused:?}"
    );
}

#[test]
fn certificate_and_key_together_must_name_one_principal() {
    let svc = Service::start_with(Options {
        client_ca: true,
        extra_args: vec!["--api-auth".into(), "mtls_and_api_key".into()],
        ..Options::default()
    });
    let own_key = bind(&svc, "checkout", "tokenize", &identity("tokenize"));
    let other_key = svc.create_principal("other", &["tokenize"], &["*"]);
    let (cert, key) = cert_of(&svc, "tokenize");
    let with_cert = svc.anonymous().with_client_cert(&cert, &key);

    let both = with_cert
        .with_authorization(Some(format!("Bearer {own_key}")))
        .tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert_eq!(both.status, 201, "{both}");
    for (what, authorization) in [
        ("the certificate alone", None),
        (
            "another principal's key",
            Some(format!("Bearer {other_key}")),
        ),
    ] {
        let resp = with_cert.with_authorization(authorization).tokenize(
            TENANT,
            "4111111111111111",
            12,
            exp_year(),
        );
        assert_eq!(
            (resp.status, resp.error_code()),
            (401, Some("unauthenticated")),
            "{what}: {resp}"
        );
    }
    let mismatch = svc.sql_strings(
        "SELECT detail FROM audit_events WHERE detail = 'certificate_and_key_mismatch'",
    );
    assert_eq!(mismatch.len(), 1);
}

/// A client certificate for `identity` signed by the harness CA (or self
/// signed), valid from `not_before` to `not_after` (days from now), with
/// this serial. Returns (cert, key) file paths in `dir`.
fn signed_client_cert(
    svc: &Service,
    dir: &Path,
    name: &str,
    not_before: i64,
    not_after: i64,
    serial: u64,
) -> (PathBuf, PathBuf) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_pem = fs::read_to_string(pki(svc).join("ca.pem")).unwrap();
    let ca_key = KeyPair::from_pem(&fs::read_to_string(pki(svc).join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(identity("tokenize")).unwrap(),
    )];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(not_before);
    params.not_after = now + time::Duration::days(not_after);
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    fs::write(&c, cert.pem()).unwrap();
    fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// A CRL of the harness CA revoking `serial`.
fn crl_revoking(svc: &Service, path: &Path, serial: u64) {
    let now = time::OffsetDateTime::now_utc();
    write_crl(
        svc,
        path,
        serial,
        now - time::Duration::hours(1),
        now + time::Duration::days(7),
    );
}

/// A CRL of the harness CA revoking `serial`, valid from `this_update` to
/// `next_update`.
fn write_crl(
    svc: &Service,
    path: &Path,
    serial: u64,
    this_update: time::OffsetDateTime,
    next_update: time::OffsetDateTime,
) {
    use rcgen::{
        CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
        RevokedCertParams, SerialNumber,
    };
    let ca_pem = fs::read_to_string(pki(svc).join("ca.pem")).unwrap();
    let ca_key = KeyPair::from_pem(&fs::read_to_string(pki(svc).join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(serial),
            revocation_time: now - time::Duration::minutes(5),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    fs::write(path, crl.pem().unwrap()).unwrap();
    e2e::give_to_service_user(path);
}

#[test]
fn wrong_ca_expired_and_revoked_certificates_are_refused_at_the_handshake_and_audited() {
    let scratch = tempfile::tempdir().unwrap();
    // The CRL must exist before the start; it names a serial the test
    // issues below.
    let dir = e2e::temp_data_dir();
    let crl = dir.path().join("clients.crl.pem");
    let svc = {
        // The harness PKI is made on the first start: start once without
        // the CRL to get the CA, write the CRL, restart with it.
        let mut svc = Service::start_in_dir(
            dir.path(),
            Options {
                client_ca: true,
                ..Options::default()
            },
        );
        crl_revoking(&svc, &crl, 0x0bad);
        svc.kill();
        drop(svc);
        Service::start_in_dir(
            dir.path(),
            Options {
                client_ca: true,
                extra_args: vec!["--tls-client-crl-file".into(), crl.display().to_string()],
                ..Options::default()
            },
        )
    };
    bind(&svc, "checkout", "tokenize", &identity("tokenize"));

    let anonymous = svc.anonymous();
    let (good_cert, good_key) = signed_client_cert(&svc, scratch.path(), "good", -1, 30, 0x600d);
    let ok = anonymous.with_client_cert(&good_cert, &good_key).tokenize(
        TENANT,
        "4111111111111111",
        12,
        exp_year(),
    );
    assert_eq!(ok.status, 201, "a valid certificate of the CA works: {ok}");

    // Another CA's certificate for the same identity.
    let other = scratch.path().join("other-pki");
    let out = e2e::tokenizer_command_as_invoker()
        .args(["dev-pki", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (expired_cert, expired_key) =
        signed_client_cert(&svc, scratch.path(), "expired", -30, -1, 0x0e);
    let (revoked_cert, revoked_key) =
        signed_client_cert(&svc, scratch.path(), "revoked", -1, 30, 0x0bad);
    let cases = [
        (
            "unknown_ca",
            other.join("client-tokenize.pem"),
            other.join("client-tokenize.key"),
        ),
        ("expired", expired_cert, expired_key),
        ("revoked", revoked_cert, revoked_key),
    ];
    for (i, (reason, cert, key)) in cases.iter().enumerate() {
        let refused = anonymous.with_client_cert(cert, key).try_tokenize(
            TENANT,
            "4111111111111111",
            12,
            exp_year(),
        );
        assert!(
            refused.is_err(),
            "{reason}: the handshake must fail: {refused:?}"
        );
        let audited = wait_for_refusals(&svc, i + 1);
        assert!(
            audited
                .iter()
                .any(|d| d == &format!("client_certificate_refused: {reason} (listener api)")),
            "{reason} not audited: {audited:?}"
        );
    }
    // Each refusal names its source address.
    let sources = svc.sql_strings(
        "SELECT source FROM audit_events WHERE detail LIKE 'client_certificate_refused%'",
    );
    assert!(
        sources.iter().all(|s| s.starts_with("127.0.0.1:")),
        "{sources:?}"
    );
    // Nothing was tokenized by the refused clients.
    assert_eq!(svc.sql_i64("SELECT COUNT(*) FROM cards"), 1);
}

/// The value of an unlabelled series in the admin listener's `/metrics`.
fn gauge(svc: &Service, name: &str) -> f64 {
    let text = svc.anonymous().get("/metrics").text;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn sighup(svc: &Service) {
    let pid = svc.pid().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_crl_past_its_next_update_refuses_client_certificates_unless_crl_stale_is_warn() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = e2e::temp_data_dir();
    let crl = dir.path().join("clients.crl.pem");
    // `database`: the database of an earlier service (on PostgreSQL each
    // new service gets a fresh one otherwise; the CLI bindings live there).
    let start = |extra: &[&str], database: Option<String>| {
        // The admin listener (metrics) by API key: with `refuse`, the stale
        // CRL refuses every certificate, the operators' too.
        let mut args = vec![
            "--tls-client-crl-file".to_owned(),
            crl.display().to_string(),
            "--admin-auth".to_owned(),
            "api_key".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Service::start_in_dir(
            dir.path(),
            Options {
                client_ca: true,
                extra_args: args,
                database_url: database,
                ..Options::default()
            },
        )
    };
    // The harness CA first, then a CRL that went stale a day ago.
    let mut svc = Service::start_in_dir(
        dir.path(),
        Options {
            client_ca: true,
            ..Options::default()
        },
    );
    let now = time::OffsetDateTime::now_utc();
    let stale = |svc: &Service| {
        write_crl(
            svc,
            &crl,
            0x0bad,
            now - time::Duration::days(8),
            now - time::Duration::days(1),
        )
    };
    stale(&svc);
    svc.kill();
    drop(svc);

    // Default (`refuse`): a certificate the CRL does not list is refused
    // too, since the CRL may no longer list every revoked one.
    let mut svc = start(&[], None);
    bind(&svc, "checkout", "tokenize", &identity("tokenize"));
    let (cert, key) = signed_client_cert(&svc, scratch.path(), "good", -1, 30, 0x600d);
    let client = svc.anonymous().with_client_cert(&cert, &key);
    let refused = client.try_tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert!(refused.is_err(), "a stale CRL must refuse: {refused:?}");
    let audited = wait_for_refusals(&svc, 1);
    assert!(
        audited
            .iter()
            .any(|d| d == "client_certificate_refused: crl_expired (listener api)"),
        "{audited:?}"
    );
    assert_eq!(gauge(&svc, "cardvault_tls_client_crl_stale"), 1.0);
    let age = gauge(&svc, "cardvault_tls_client_crl_age_seconds");
    assert!((8.0 * 86400.0..9.0 * 86400.0).contains(&age), "age {age}");
    let next = gauge(
        &svc,
        "cardvault_tls_client_crl_next_update_timestamp_seconds",
    );
    let expected = (now - time::Duration::days(1)).unix_timestamp() as f64;
    assert!((next - expected).abs() <= 1.0, "{next} vs {expected}");
    assert!(
        svc.stderr().contains("client CRL is past its nextUpdate"),
        "the log says the CRL is stale"
    );

    // A fresh CRL on SIGHUP: accepted again without a restart.
    crl_revoking(&svc, &crl, 0x0bad);
    sighup(&svc);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.try_tokenize(TENANT, "4111111111111111", 12, exp_year()) {
            Ok(ok) => {
                assert_eq!(ok.status, 201, "{ok}");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no reload after SIGHUP: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gauge(&svc, "cardvault_tls_client_crl_stale"), 0.0);
    stale(&svc);
    svc.kill();
    // Kept (stopped) until the end: it holds the database on PostgreSQL.
    let stopped = svc;

    // `warn`: the stale CRL still refuses what it lists, accepts the rest,
    // and says so in the log and the metrics.
    let svc = start(
        &["--tls-client-crl-stale", "warn"],
        Some(stopped.database_url()),
    );
    let ok = svc.anonymous().with_client_cert(&cert, &key).tokenize(
        TENANT,
        "4111111111111111",
        12,
        exp_year(),
    );
    assert_eq!(ok.status, 200, "warn accepts (an idempotent repeat): {ok}");
    let (revoked_cert, revoked_key) =
        signed_client_cert(&svc, scratch.path(), "revoked", -1, 30, 0x0bad);
    let revoked = svc
        .anonymous()
        .with_client_cert(&revoked_cert, &revoked_key)
        .try_tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert!(
        revoked.is_err(),
        "a listed certificate stays refused: {revoked:?}"
    );
    assert_eq!(gauge(&svc, "cardvault_tls_client_crl_stale"), 1.0);
    assert!(svc
        .stderr()
        .contains("certificates are still accepted (crl_stale = warn)"));
}

/// `curl` with the service's CA against the api listener, with extra
/// arguments; whether the request got an HTTP answer.
fn curl_answers(svc: &Service, extra: &[&str]) -> bool {
    let ca = svc.endpoints().ca.clone().unwrap();
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "10",
            "--cacert",
        ])
        .arg(&ca)
        .args(extra)
        .arg(format!("https://{}/healthz", svc.addr()))
        .output()
        .expect("curl is needed for this test (apt-get install curl)");
    String::from_utf8_lossy(&out.stdout).trim() == "200"
}

#[test]
fn only_tls_12_and_13_with_aead_suites_are_accepted() {
    let svc = Service::start();
    assert!(curl_answers(&svc, &["--tlsv1.3"]), "TLS 1.3");
    assert!(
        curl_answers(
            &svc,
            &[
                "--tlsv1.2",
                "--tls-max",
                "1.2",
                "--ciphers",
                "ECDHE-ECDSA-AES128-GCM-SHA256"
            ]
        ),
        "TLS 1.2 with ECDHE and AES-GCM"
    );
    // SECLEVEL=0: curl's OpenSSL 3 would not offer TLS 1.0/1.1 otherwise,
    // and this check could not fail (with it, curl reaches a TLS 1.1
    // server).
    assert!(
        !curl_answers(
            &svc,
            &[
                "--tlsv1",
                "--tls-max",
                "1.1",
                "--ciphers",
                "DEFAULT@SECLEVEL=0"
            ]
        ),
        "TLS 1.0/1.1 refused"
    );
    assert!(
        !curl_answers(
            &svc,
            &[
                "--tlsv1.2",
                "--tls-max",
                "1.2",
                "--ciphers",
                "ECDHE-ECDSA-AES128-SHA256:AES128-SHA"
            ]
        ),
        "CBC suites refused"
    );
    // Plain HTTP on a TLS listener gets no HTTP answer.
    let plain = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
        .arg(format!("http://{}/healthz", svc.addr()))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout).trim(), "200");
}

#[test]
fn plain_http_is_refused_outside_dev() {
    let dir = e2e::temp_data_dir();
    let (status, stderr) = e2e::expect_refused_start(
        dir.path(),
        &Options {
            extra_args: vec!["--insecure-plain-http".into()],
            ..Options::default()
        },
    );
    assert!(!status.success());
    assert!(stderr.contains("--dev"), "{stderr}");
}

#[test]
fn sighup_reloads_the_server_certificate_without_a_restart() {
    let svc = Service::start();
    let key = svc.create_principal("reload", &["tokenize"], &["*"]);
    let before = svc.client(&key);
    assert_eq!(
        before
            .tokenize(TENANT, "4111111111111111", 12, exp_year())
            .status,
        201
    );
    // A new PKI; its server certificate and key replace the files in place.
    let scratch = tempfile::tempdir().unwrap();
    let next = scratch.path().join("next");
    let out = e2e::tokenizer_command_as_invoker()
        .args(["dev-pki", "--out"])
        .arg(&next)
        .output()
        .unwrap();
    assert!(out.status.success());
    for file in ["server.pem", "server.key"] {
        fs::write(pki(&svc).join(file), fs::read(next.join(file)).unwrap()).unwrap();
    }
    let pid = svc.pid().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // New handshakes present the new certificate: a client trusting only
    // the new CA gets in, one trusting only the old CA does not.
    let endpoints = Endpoints {
        ca: Some(next.join("ca.pem")),
        ..svc.endpoints().clone()
    };
    let after = Client::for_endpoints(&endpoints, Some(format!("Bearer {key}")));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match after.try_tokenize(TENANT, "4111111111111111", 12, exp_year()) {
            Ok(resp) => {
                assert_eq!(resp.status, 200, "an idempotent repeat: {resp}");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no reload after SIGHUP: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let old = svc
        .client(&key)
        .try_tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert!(
        old.is_err(),
        "the old CA no longer verifies the server: {old:?}"
    );
    assert!(svc.stderr().contains("TLS material reloaded"));
    // A broken file on reload leaves the current material in use.
    fs::write(pki(&svc).join("server.pem"), "not a certificate").unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(500));
    let still = after.tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert_eq!(still.status, 200, "{still}");
}

#[test]
fn dev_mode_serves_tls_with_a_client_certificate_per_role() {
    let svc = Service::start_with(Options::dev());
    assert_eq!(svc.endpoints().scheme(), "https");
    let dir = svc.data_dir().join("dev-tls");
    let anonymous = svc.anonymous();
    let as_role = |role: &str| {
        anonymous.with_client_cert(
            &dir.join(format!("client-{role}.pem")),
            &dir.join(format!("client-{role}.key")),
        )
    };
    // Each dev certificate is bound to a principal of its role.
    let created = as_role("tokenize").tokenize(TENANT, "4111111111111111", 12, exp_year());
    assert_eq!(created.status, 201, "{created}");
    let token = created.str("token");
    let revealed = as_role("detokenize").detokenize(&token, REASON);
    assert_eq!(revealed.status, 200, "{revealed}");
    assert_eq!(revealed.str("pan"), "4111111111111111");
    let denied = as_role("auditor").detokenize(&token, REASON);
    assert_eq!(denied.status, 403, "{denied}");
    // Without a certificate the dev listener still takes an API key.
    assert_eq!(anonymous.get("/healthz").status, 200);
    assert_eq!(
        anonymous
            .tokenize(TENANT, "4111111111111111", 12, exp_year())
            .status,
        401
    );
    // The dev CA key never leaves the data dir; keys are private.
    use std::os::unix::fs::PermissionsExt as _;
    for key in ["ca.key", "server.key", "client-tokenize.key"] {
        let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    assert!(
        svc.stdout().contains("--cert"),
        "the dev example shows mTLS"
    );
}

#[test]
fn each_listener_holds_at_most_max_connections() {
    let svc = Service::start_with(Options {
        extra_args: vec!["--max-connections".into(), "3".into()],
        ..Options::default()
    });
    let api = svc.listener("api").unwrap().to_string();
    let tls = e2e::tls_for_addr(&api);
    let held: Vec<e2e::Wire> = (0..3)
        .map(|_| e2e::Wire::connect(&api, tls.clone()))
        .collect();
    // The fourth is closed at once (no handshake) ...
    let fourth = e2e::Wire::try_connect(&api, tls.clone());
    assert!(
        fourth.is_err(),
        "a fourth connection on a full listener: {fourth:?}"
    );
    // ... while the other listeners have their own room.
    let admin = svc.anonymous();
    assert_eq!(admin.get("/readyz").status, 200);
    // Closing one frees its slot.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while e2e::Wire::try_connect(&api, tls.clone()).is_err() {
        assert!(Instant::now() < deadline, "slots were not freed");
        std::thread::sleep(Duration::from_millis(100));
    }
}
