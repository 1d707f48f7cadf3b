//! The forwarding proxy (issue 18), against the real binary. So far: the
//! `[[upstream]]` tables of the configuration file, refused at start when
//! unusable (naming the upstream), and read again on SIGHUP.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use e2e::acquirer::{Acquirer, AcquirerOptions};

use e2e::{
    expect_refused_start, give_to_service_user, run_cli, temp_data_dir, tokenizer_command,
    Captured, Options, Service,
};

use crate::{exp_year, TENANT};

/// A throwaway PKI (CA, server certificate, client certificates) in `dir`.
fn pki(dir: &Path) {
    let out = tokenizer_command()
        .args(["dev-pki", "--out"])
        .arg(dir)
        .args(["--server-name", "acquirer.test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn upstream_table(name: &str, url: &str, ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut t = format!(
        "[[upstream]]\nname = {name:?}\nurl = {url:?}\nca_file = {:?}\npaths = [\"/v1/payments\", \"/v1/payments/*/capture\"]\ntenants = [\"*\"]\nforward_headers = [\"Idempotency-Key\"]\n",
        ca.display().to_string()
    );
    if let Some((c, k)) = client {
        t.push_str(&format!(
            "client_cert_file = {:?}\nclient_key_file = {:?}\n",
            c.display().to_string(),
            k.display().to_string()
        ));
    }
    t
}

fn with_config(dir: &Path, text: &str) -> Options {
    let path = dir.join("tokenizer.toml");
    std::fs::write(&path, text).unwrap();
    Options {
        extra_args: vec!["--config".into(), path.display().to_string()],
        ..Options::default()
    }
}

#[test]
fn an_unusable_upstream_refuses_the_start_naming_it_and_a_good_one_is_loaded() {
    let files = temp_data_dir();
    let acq = files.path().join("acq");
    pki(&acq);
    give_to_service_user(files.path());
    let ca = acq.join("ca.pem");
    let (cert, key) = (
        acq.join("client-tokenize.pem"),
        acq.join("client-tokenize.key"),
    );
    let url = "https://acquirer.test:9443/api";

    let refused = |text: String, want: &[&str]| {
        let dir = temp_data_dir();
        // A KEK, so that the refusal is about the upstream.
        assert!(run_cli(dir.path(), &["kek", "generate"], &Captured::default()).success());
        let (status, stderr) = expect_refused_start(dir.path(), &with_config(files.path(), &text));
        assert!(!status.success());
        for w in want {
            assert!(stderr.contains(w), "{w:?} not in:\n{stderr}");
        }
    };
    refused(
        upstream_table("acq-a", url, &files.path().join("missing-ca.pem"), None),
        &["upstream acq-a", "missing-ca.pem"],
    );
    refused(
        upstream_table("acq-a", "http://acquirer.test/api", &ca, None),
        &["upstream acq-a", "https"],
    );
    refused(
        upstream_table("acq-a", url, &ca, Some((&cert, &key)))
            .replace("\"/v1/payments\", ", "\"/v1/../admin\", "),
        &["upstream acq-a", "/v1/../admin"],
    );
    refused(
        upstream_table("acq-a", url, &ca, None).replace("\"Idempotency-Key\"", "\"Authorization\""),
        &["upstream acq-a", "Authorization"],
    );
    // A client key others can read (owned by the service user, not root).
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        upstream_table("acq-b", url, &ca, Some((&cert, &key))),
        &["upstream acq-b", "readable by group or others"],
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Usable: the service starts and names it; SIGHUP reads the file again.
    let first = upstream_table("acq-a", url, &ca, Some((&cert, &key)));
    let opts = with_config(files.path(), &first);
    let svc = Service::start_with(opts);
    assert!(
        svc.stderr().contains("forwarding upstream configured") && svc.stderr().contains("acq-a"),
        "{}",
        svc.stderr()
    );
    let config = files.path().join("tokenizer.toml");
    let hup = |svc: &Service| {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &svc.pid().unwrap().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let wait_for = |svc: &Service, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !svc.stderr().contains(what) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {what:?}:\n{}",
                svc.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    // A broken table on reload: refused, the previous set stays.
    std::fs::write(
        &config,
        format!("{first}{}", upstream_table("acq-a", url, &ca, None)),
    )
    .unwrap();
    hup(&svc);
    wait_for(&svc, "upstream reload failed");
    std::fs::write(
        &config,
        format!("{first}{}", upstream_table("acq-c", url, &ca, None)),
    )
    .unwrap();
    hup(&svc);
    wait_for(&svc, "forwarding upstreams reloaded");
    let text = svc.stderr();
    let line = text
        .lines()
        .find(|l| l.contains("forwarding upstreams reloaded"))
        .unwrap();
    assert!(line.contains("acq-a") && line.contains("acq-c"), "{line}");
}

/// The vault with `acq` configured as upstream `acq-a`, a checkout (tokenize)
/// and a router (forward) client.
fn forwarding(
    acq: &Acquirer,
    extra: &str,
) -> (Service, e2e::Client, e2e::Client, tempfile::TempDir) {
    forwarding_with(acq, "", extra)
}

/// [`forwarding`] with top-level configuration keys `top`.
fn forwarding_with(
    acq: &Acquirer,
    top: &str,
    extra: &str,
) -> (Service, e2e::Client, e2e::Client, tempfile::TempDir) {
    let files = temp_data_dir();
    give_to_service_user(files.path());
    let table = acq.upstream_toml(
        "acq-a",
        &format!(
            "paths = [\"/v1/payments\", \"/v1/payments/*/capture\"]\ntenants = [\"*\"]\nforward_headers = [\"Idempotency-Key\"]\n{extra}"
        ),
    );
    let svc = Service::start_with(with_config(files.path(), &format!("{top}{table}")));
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let router = svc.principal_client("router", &["forward"], &["*"]);
    (svc, checkout, router, files)
}

const NAME: &str = "O'Brien & \"Sons\" <Zoë> \\ 1";

#[test]
fn the_acquirer_gets_the_card_in_json_form_and_xml_and_the_caller_never_does() {
    let acq = Acquirer::start(AcquirerOptions::default());
    let (svc, checkout, router, _files) = forwarding(&acq, "");
    let made = checkout.tokenize_named(TENANT, "4111111111111111", 12, exp_year(), NAME);
    assert_eq!(made.status, 201, "{made}");
    let tok = made.json["token"].as_str().unwrap().to_owned();

    // JSON.
    let body = format!(
        r#"{{"card":{{"number":"{{{{{tok}.pan}}}}","exp":"{{{{{tok}.exp_mmyy}}}}","holder":"{{{{{tok}.cardholder_name}}}}","bin":"{{{{{tok}.bin}}}}"}},"amount":1000}}"#
    );
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.source.as_deref(), Some("upstream"));
    assert_eq!(r.json["status"], "approved");
    let seen = acq.wait_for_requests(1, Duration::from_secs(10));
    let got = seen[0].json();
    assert_eq!(got["card"]["number"], "4111111111111111");
    assert_eq!(got["card"]["holder"], NAME);
    assert_eq!(got["card"]["exp"], format!("12{:02}", exp_year() % 100));
    assert_eq!(got["card"]["bin"], "411111");
    assert_eq!(got["amount"], 1000);
    assert_eq!(seen[0].path(), "/v1/payments");
    assert_eq!(
        seen[0].client_cert.as_ref().map(|c| c.sha256.as_str()),
        Some(acq.client_cert_sha256()),
        "mutual TLS"
    );
    assert!(
        seen[0].header("authorization").is_none(),
        "the router's credential travelled"
    );

    // Form.
    let form = format!(
        "number={{{{{tok}.pan}}}}&holder={{{{{tok}.cardholder_name}}}}&mm={{{{{tok}.exp_month}}}}"
    );
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments/pay_1/capture",
        Some("application/x-www-form-urlencoded"),
        form.as_bytes(),
    );
    assert_eq!(r.status, 200, "{r}");
    let seen = acq.wait_for_requests(2, Duration::from_secs(10));
    let pairs: Vec<(String, String)> = url_decode_pairs(&seen[1].body_text());
    assert_eq!(
        pairs,
        vec![
            ("number".to_owned(), "4111111111111111".to_owned()),
            ("holder".to_owned(), NAME.to_owned()),
            ("mm".to_owned(), "12".to_owned()),
        ]
    );

    // XML.
    let xml = format!("<?xml version=\"1.0\"?><pay><pan>{{{{{tok}.pan}}}}</pan><name attr=\"{{{{{tok}.cardholder_name}}}}\">{{{{{tok}.cardholder_name}}}}</name></pay>");
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/xml"),
        xml.as_bytes(),
    );
    assert_eq!(r.status, 200, "{r}");
    let seen = acq.wait_for_requests(3, Duration::from_secs(10));
    let text = seen[2].body_text();
    assert!(text.contains("<pan>4111111111111111</pan>"), "{text}");
    assert!(
        text.contains("O&apos;Brien &amp; &quot;Sons&quot; &lt;Zoë&gt; \\ 1"),
        "{text}"
    );

    // The trail: a forward event before, a forward_completed after, no card.
    let auditor = svc.principal_client("auditor", &["auditor"], &["*"]);
    let events = auditor.get("/v1/audit/events?limit=1000");
    let text = events.text.clone();
    assert!(
        text.contains("\"forward\"") && text.contains("forward_completed"),
        "{text}"
    );
    assert!(!text.contains("4111111111111111"));
    let findings = svc.scan_for_leaks(&["4111111111111111"]);
    assert!(findings.is_empty(), "{findings:?}");

    // Listed for operators; counted per upstream and outcome.
    let listed = auditor.get("/v1/admin/upstreams");
    assert_eq!(listed.status, 200, "{listed}");
    let u = &listed.json["upstreams"][0];
    assert_eq!(u["name"], "acq-a");
    assert_eq!(u["url"], acq.origin());
    assert_eq!(
        u["paths"],
        serde_json::json!(["/v1/payments", "/v1/payments/*/capture"])
    );
    assert_eq!(u["forward_headers"], serde_json::json!(["idempotency-key"]));
    assert!(u["client_cert_file"].is_string());
    assert_eq!(
        router.get("/v1/admin/upstreams").status,
        403,
        "the router may not list upstreams"
    );
    let metrics = svc.anonymous().get("/metrics").text;
    assert!(
        metrics.contains(r#"forward_calls_total{outcome="2xx",upstream="acq-a"} 3"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("forward"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(metrics.contains(r#"forward_upstream_duration_seconds_count{upstream="acq-a"} 3"#));
}

/// `a=b&c=d` decoded (`+` and `%XX`).
fn url_decode_pairs(s: &str) -> Vec<(String, String)> {
    let decode = |v: &str| {
        let v = v.replace('+', " ");
        let bytes = v.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    s.split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (decode(k), decode(v))
        })
        .collect()
}

fn pay(router: &e2e::Client, path: &str, tok: &str) -> e2e::Resp {
    let body = format!(r#"{{"card":{{"number":"{{{{{tok}.pan}}}}"}}}}"#);
    router.send_raw("POST", path, Some("application/json"), body.as_bytes())
}

fn token_of(checkout: &e2e::Client, pan: &str) -> String {
    let made = checkout.tokenize(TENANT, pan, 12, exp_year());
    assert!(made.status == 201 || made.status == 200, "{made}");
    made.json["token"].as_str().unwrap().to_owned()
}

#[test]
fn card_numbers_in_the_answer_come_back_as_tokens() {
    use e2e::acquirer::Response;
    let acq = Acquirer::start(AcquirerOptions::default());
    let (svc, checkout, router, _files) = forwarding(&acq, "");
    let tok = token_of(&checkout, "4111111111111111");
    // The acquirer echoes the card (known: the same token), and a card the
    // vault never saw (an updated card), as a string and as a bare number,
    // with separators.
    acq.set_response(Response::json(
        200,
        &serde_json::json!({"echo": "4111 1111 1111 1111", "updated": 5555555555554444_u64,
                            "text": "card 4012-8888-8888-1881 ok", "amount": 1000, "date": "2030-12-31"}),
    ));
    let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
    assert_eq!(r.status, 200, "{r}");
    for pan in ["4111", "5555555555554444", "4012"] {
        assert!(
            !r.text.contains(pan)
                || pan == "4111"
                    && !r.text.contains("4111111111111111")
                    && !r.text.contains("4111 1111"),
            "{}",
            r.text
        );
    }
    // The leak scanner over what the caller received: no card number in
    // any form it knows.
    let findings = e2e::scan_bytes(
        "forwarded answer",
        r.text.as_bytes(),
        &["4111111111111111", "5555555555554444", "4012888888881881"],
    );
    assert!(findings.is_empty(), "{findings:?}");
    assert_eq!(
        r.json["echo"],
        tok.as_str(),
        "a known card gives its token: {}",
        r.text
    );
    assert_eq!(r.json["amount"], 1000);
    assert_eq!(r.json["date"], "2030-12-31");
    let updated = r.json["updated"]
        .as_str()
        .expect("a bare JSON number becomes a token string");
    let text = r.json["text"].as_str().unwrap();
    assert!(
        text.starts_with("card tok_") && text.ends_with(" ok"),
        "{text}"
    );
    // The new card is the tenant's, with no expiry known; a tokenize of
    // the same card with an expiry gives the same token and fills it in.
    let meta = checkout.get(&format!("/v1/tokens/{updated}"));
    assert_eq!(meta.status, 200, "{meta}");
    assert_eq!(meta.json["last4"], "4444");
    assert!(meta.json["exp_month"].is_null(), "{meta}");
    let again = checkout.tokenize(TENANT, "5555555555554444", 11, exp_year());
    assert_eq!(again.json["token"], updated, "{again}");
    assert_eq!(again.json["exp_month"], 11, "{again}");
    let findings =
        svc.scan_for_leaks(&["4111111111111111", "5555555555554444", "4012888888881881"]);
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn tls_failures_timeouts_redirects_and_large_answers_are_the_vaults_typed_errors() {
    use e2e::acquirer::Response;
    // The wrong CA, an expired certificate, no client certificate.
    for (opts, client) in [
        (
            AcquirerOptions {
                server_cert_from_other_ca: true,
                ..AcquirerOptions::default()
            },
            true,
        ),
        (
            AcquirerOptions {
                expired_server_cert: true,
                ..AcquirerOptions::default()
            },
            true,
        ),
        (AcquirerOptions::default(), false),
    ] {
        let acq = Acquirer::start(opts);
        let files = temp_data_dir();
        let mut table =
            acq.upstream_toml("acq-a", "paths = [\"/v1/payments\"]\ntenants = [\"*\"]\n");
        if !client {
            table = table
                .lines()
                .filter(|l| !l.starts_with("client_"))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let svc = Service::start_with(with_config(files.path(), &table));
        let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
        let router = svc.principal_client("router", &["forward"], &["*"]);
        let tok = token_of(&checkout, "4111111111111111");
        let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
        assert_eq!(
            (r.status, r.error_code()),
            (502, Some("upstream_tls")),
            "{r}"
        );
        assert_eq!(r.source.as_deref(), Some("vault"));
        assert_eq!(acq.request_count(), 0, "a request reached the acquirer");
    }

    let acq = Acquirer::start(AcquirerOptions::default());
    let (_svc, checkout, router, _files) =
        forwarding(&acq, "timeout_ms = 1500\nmax_response_bytes = 4096\n");
    let tok = token_of(&checkout, "4111111111111111");
    // Slow: 504 within the configured time (generous bound: noisy machines).
    acq.set_response(Response::approved().with_delay(Duration::from_secs(20)));
    let started = std::time::Instant::now();
    let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
    assert_eq!(
        (r.status, r.error_code()),
        (504, Some("upstream_timeout")),
        "{r}"
    );
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown"),
        "{r}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // A redirect is the answer: relayed, not followed.
    acq.clear();
    acq.set_response(Response::redirect(302, "https://elsewhere.example/3ds"));
    let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
    assert_eq!(r.status, 302, "{r}");
    assert_eq!(r.location.as_deref(), Some("https://elsewhere.example/3ds"));
    assert_eq!(r.source.as_deref(), Some("upstream"));
    assert_eq!(acq.request_count(), 1);
    // Over max_response_bytes: refused, never relayed in part.
    acq.set_response(Response::new(200).with_body("text/plain", vec![b'x'; 10_000]));
    let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
    assert_eq!(
        (r.status, r.error_code()),
        (502, Some("upstream_response_too_large")),
        "{r}"
    );
    acq.set_response(Response::new(200).with_chunked_body("text/plain", &[b'y'; 10_000], 1000));
    let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
    assert_eq!(
        (r.status, r.error_code()),
        (502, Some("upstream_response_too_large")),
        "{r}"
    );
}

#[test]
fn nothing_reaches_the_acquirer_for_refused_paths_upstreams_tokens_or_placeholders() {
    let acq = Acquirer::start(AcquirerOptions::default());
    let (svc, checkout, router, _files) = forwarding(&acq, "");
    let tok = token_of(&checkout, "4111111111111111");
    let other_checkout = svc.principal_client("other-checkout", &["tokenize"], &["shop-other"]);
    let other = other_checkout.tokenize("shop-other", "4242424242424242", 12, exp_year());
    let other_tok = other.json["token"].as_str().unwrap().to_owned();
    let shop_router = svc.principal_client("shop-router", &["forward"], &[TENANT]);
    let detokenizer = svc.principal_client("detok", &["detokenize"], &["*"]);
    let cases: Vec<(&e2e::Client, String, String, u16, &str)> = vec![
        (
            &router,
            "/v1/forward/nope/v1/payments".into(),
            tok.clone(),
            404,
            "unknown_upstream",
        ),
        (
            &router,
            "/v1/forward/acq-a/v1/refunds".into(),
            tok.clone(),
            403,
            "path_not_allowed",
        ),
        (
            &router,
            "/v1/forward/acq-a/v1/payments/x/y/capture".into(),
            tok.clone(),
            403,
            "path_not_allowed",
        ),
        (
            &router,
            "/v1/forward/acq-a/v1/payments/../admin".into(),
            tok.clone(),
            403,
            "path_not_allowed",
        ),
        (
            &router,
            "/v1/forward/acq-a/v1/payments/%2e%2e/capture".into(),
            tok.clone(),
            403,
            "path_not_allowed",
        ),
        (
            &router,
            "/v1/forward/acq-a/v1/payments%2Fx".into(),
            tok.clone(),
            403,
            "path_not_allowed",
        ),
        (
            &router,
            "/v1/forward/acq-a//evil.example/v1/payments".into(),
            tok.clone(),
            403,
            "path_not_allowed",
        ),
        (
            &router,
            "/v1/forward/acq-a/v1/payments?x=1".into(),
            tok.clone(),
            403,
            "path_not_allowed",
        ),
        (
            &router,
            "/v1/forward/acq-a/v1/payments".into(),
            "tok_AAAAAAAAAAAAAAAAAAAAAA".into(),
            404,
            "not_found",
        ),
        (
            &shop_router,
            "/v1/forward/acq-a/v1/payments".into(),
            other_tok.clone(),
            404,
            "not_found",
        ),
        (
            &detokenizer,
            "/v1/forward/acq-a/v1/payments".into(),
            tok.clone(),
            403,
            "forbidden",
        ),
        (
            &checkout,
            "/v1/forward/acq-a/v1/payments".into(),
            tok.clone(),
            403,
            "forbidden",
        ),
    ];
    for (client, path, t, status, code) in &cases {
        let r = pay(client, path, t);
        assert_eq!(
            (r.status, r.error_code()),
            (*status, Some(*code)),
            "{path}: {r}"
        );
        assert_eq!(r.source.as_deref(), Some("vault"), "{path}");
    }
    // Mixed tenants; malformed placeholders; too many tokens.
    let mixed = format!(r#"{{"a":"{{{{{tok}.pan}}}}","b":"{{{{{other_tok}.pan}}}}"}}"#);
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/json"),
        mixed.as_bytes(),
    );
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some("mixed_tenants")),
        "{r}"
    );
    for bad in [
        format!(r#"{{"a":"{{{{{tok}.pin}}}}"}}"#),
        format!(r#"{{"a":"{{{{ {tok}.pan }}}}"}}"#),
        format!(r#"{{"a":"{{{{{tok}.pan"}}"#),
        r#"{"a":"{{4111111111111111.pan}}"}"#.to_owned(),
    ] {
        let r = router.send_raw(
            "POST",
            "/v1/forward/acq-a/v1/payments",
            Some("application/json"),
            bad.as_bytes(),
        );
        assert_eq!(
            (r.status, r.error_code()),
            (400, Some("invalid_placeholder")),
            "{bad}: {r}"
        );
    }
    let many: Vec<String> = (0..21)
        .map(|i| format!("\"{{{{tok_{:A>22}.pan}}}}\"", i))
        .collect();
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/json"),
        format!("[{}]", many.join(",")).as_bytes(),
    );
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some("too_many_tokens")),
        "{r}"
    );
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("text/plain"),
        b"x",
    );
    assert_eq!(
        (r.status, r.error_code()),
        (415, Some("unsupported_content_type")),
        "{r}"
    );
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/json"),
        b"{\"a\":",
    );
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some("invalid_body")),
        "{r}"
    );
    assert_eq!(
        acq.request_count(),
        0,
        "a refused call reached the acquirer: {:?}",
        acq.requests()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn the_security_code_is_forwarded_once() {
    let acq = Acquirer::start(AcquirerOptions::default());
    let (_svc, checkout, router, _files) = forwarding(&acq, "");
    let made = checkout.post_json(
        "/v1/tokens",
        &serde_json::json!({"tenant": TENANT, "pan": "4111111111111111", "exp_month": 12, "exp_year": exp_year(), "cvc": "123"}),
    );
    assert!(made.status == 201 || made.status == 200, "{made}");
    let tok = made.json["token"].as_str().unwrap().to_owned();
    let body = format!(r#"{{"pan":"{{{{{tok}.pan}}}}","cvc":"{{{{{tok}.cvc}}}}"}}"#);
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        acq.wait_for_requests(1, Duration::from_secs(10))[0].json()["cvc"],
        "123"
    );
    let r = router.send_raw(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(
        (r.status, r.error_code()),
        (409, Some("cvc_unavailable")),
        "{r}"
    );
    assert_eq!(acq.request_count(), 1);
    let meta = checkout.get(&format!("/v1/tokens/{tok}"));
    assert_eq!(meta.json["cvc_available"], false, "{meta}");
}

/// Hostile forwarding bodies: each a typed 4xx error before anything is
/// sent; afterwards nothing reached the acquirer and no stored data (but
/// the audit trail, which records the refusals) changed.
#[test]
fn hostile_forward_bodies_get_typed_errors_reach_nothing_and_change_nothing() {
    let acq = Acquirer::start(AcquirerOptions::default());
    let (mut svc, checkout, router, _files) = forwarding(&acq, "max_request_bytes = 2048\n");
    let tok = token_of(&checkout, "4111111111111111");
    let before = svc.dump_data();
    let p = |field: &str| format!("{{{{{tok}.{field}}}}}");
    let json = "application/json";
    let form = "application/x-www-form-urlencoded";
    let xml = "application/xml";
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        // JSON: not JSON, cut, placeholders outside the shapes allowed.
        (
            json,
            format!(r#"{{"a":"{}""#, p("pan")).into_bytes(),
            400,
            "invalid_body",
        ),
        (
            json,
            format!(r#"{{"a":{}}}"#, p("pan")).into_bytes(),
            400,
            "invalid_body",
        ),
        (
            json,
            format!(r#"{{"a":"{{{{{tok}\u002epan}}}}"}}"#).into_bytes(),
            400,
            "invalid_placeholder",
        ),
        (
            json,
            format!(r#"{{"a":"{{{{{{{{{tok}.pan}}}}}}}}"}}"#).into_bytes(),
            400,
            "invalid_placeholder",
        ),
        (
            json,
            format!(r#"{{"a":"{{{{{tok}.pan}}"}}"#).into_bytes(),
            400,
            "invalid_placeholder",
        ),
        (
            json,
            format!(r#"{{"a":"{{{{{tok}.}}}}"}}"#).into_bytes(),
            400,
            "invalid_placeholder",
        ),
        (
            json,
            br#"{"a":"{{.pan}}"}"#.to_vec(),
            400,
            "invalid_placeholder",
        ),
        (json, b"{\"a\":\"\xff\xfe\"}".to_vec(), 400, "invalid_body"),
        (
            json,
            format!("{{\"a\":\"{}\u{0}\"}}", p("pan")).into_bytes(),
            400,
            "invalid_body",
        ),
        (json, vec![b' '; 4096], 413, "payload_too_large"),
        (json, b"".to_vec(), 400, "invalid_body"),
        (
            "application/json; charset=latin1",
            format!(r#"{{"a":"{}"}}"#, p("pan")).into_bytes(),
            400,
            "invalid_body",
        ),
        // Form: broken percent-encoding.
        (
            form,
            format!("a={}&b=%zz", p("pan")).into_bytes(),
            400,
            "invalid_body",
        ),
        // XML: a DOCTYPE (entity expansion, external entities), placeholders
        // in names, comments and CDATA, unbalanced tags.
        (
            xml,
            format!(
                "<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]><x>&e;{}</x>",
                p("pan")
            )
            .into_bytes(),
            400,
            "invalid_body",
        ),
        (
            xml,
            format!("<x><!-- {} --></x>", p("pan")).into_bytes(),
            400,
            "invalid_placeholder",
        ),
        (
            xml,
            format!("<x><![CDATA[{}]]></x>", p("pan")).into_bytes(),
            400,
            "invalid_placeholder",
        ),
        (
            xml,
            format!("<{}>1</{}>", p("pan"), p("pan")).into_bytes(),
            400,
            "invalid_placeholder",
        ),
        (
            xml,
            format!("<x><y>{}</x>", p("pan")).into_bytes(),
            400,
            "invalid_body",
        ),
        (
            "text/plain",
            p("pan").into_bytes(),
            415,
            "unsupported_content_type",
        ),
    ];
    let mut failures = Vec::new();
    for (ct, body, status, code) in &cases {
        let r = router.send_raw("POST", "/v1/forward/acq-a/v1/payments", Some(ct), body);
        if (r.status, r.error_code()) != (*status, Some(*code))
            || r.source.as_deref() != Some("vault")
        {
            failures.push(format!(
                "{ct} {:?}: want {status} {code}, got {r}",
                String::from_utf8_lossy(body)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(
        acq.request_count(),
        0,
        "a refused body reached the acquirer"
    );
    assert!(svc.is_running());
    let after = svc.dump_data();
    assert!(
        before == after,
        "hostile forwarding bodies changed stored data"
    );
    e2e::assert_no_leaks(&svc.scan_for_leaks(&["4111111111111111"]));
}

/// A token revealed to an upstream counts as a detokenize: past the
/// principal's limit the call is 429 and nothing is sent.
#[test]
fn forwarded_tokens_count_in_the_detokenize_limits() {
    let acq = Acquirer::start(AcquirerOptions::default());
    let (_svc, checkout, router, _files) = forwarding_with(
        &acq,
        "detokenize_rate_per_principal = 1\ndetokenize_burst_per_principal = 2\n",
        "",
    );
    let tok = token_of(&checkout, "4111111111111111");
    for _ in 0..2 {
        let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
        assert_eq!(r.status, 200, "{r}");
    }
    let r = pay(&router, "/v1/forward/acq-a/v1/payments", &tok);
    assert_eq!(
        (r.status, r.error_code()),
        (429, Some("rate_limited")),
        "{r}"
    );
    assert_eq!(acq.request_count(), 2);
}

fn pay_with_key(router: &e2e::Client, tok: &str, key: &str, amount: u32) -> e2e::Resp {
    let body = format!(r#"{{"amount":{amount},"card":{{"number":"{{{{{tok}.pan}}}}"}}}}"#);
    router.send_raw_with_headers(
        "POST",
        "/v1/forward/acq-a/v1/payments",
        Some("application/json"),
        &[("Idempotency-Key", key)],
        body.as_bytes(),
    )
}

/// A payment retried with its Idempotency-Key (a lost connection between
/// router and vault) is answered from the stored answer, not sent again;
/// the same key with another body is refused; a call whose outcome is
/// unknown (the acquirer timed out) is never sent again with that key.
#[test]
fn an_idempotent_retry_never_reaches_the_acquirer_twice() {
    use e2e::acquirer::Response;
    let acq = Acquirer::start(AcquirerOptions::default());
    let (svc, checkout, router, _files) = forwarding(&acq, "timeout_ms = 1000\n");
    let tok = token_of(&checkout, "4111111111111111");
    // The answer holds the card: the stored answer is the re-tokenized one.
    acq.set_response(Response::json(
        201,
        &serde_json::json!({"id": "pay_1", "status": "authorised", "card": "4111111111111111"}),
    ));
    let first = pay_with_key(&router, &tok, "order-1001-auth", 1000);
    assert_eq!(first.status, 201, "{first}");
    assert_eq!(first.json["card"], tok.as_str());
    for _ in 0..2 {
        let again = pay_with_key(&router, &tok, "order-1001-auth", 1000);
        assert_eq!(again.status, 201, "{again}");
        assert_eq!(again.text, first.text, "a replay answers the stored answer");
        assert_eq!(again.source.as_deref(), Some("upstream"));
    }
    assert_eq!(acq.request_count(), 1, "the retry reached the acquirer");
    // Another body with the same key: refused, nothing sent.
    let other = pay_with_key(&router, &tok, "order-1001-auth", 2000);
    assert_eq!(
        (other.status, other.error_code()),
        (422, Some("idempotency_key_reused")),
        "{other}"
    );
    // Another principal's same key is its own.
    let router2 = svc.principal_client("router-2", &["forward"], &["*"]);
    let theirs = pay_with_key(&router2, &tok, "order-1001-auth", 1000);
    assert_eq!(theirs.status, 201, "{theirs}");
    assert_eq!(acq.request_count(), 2);

    // The acquirer does not answer in time: the outcome is unknown, so the
    // key is never sent again (in use while the call could still be
    // running, then outcome unknown).
    acq.set_response(Response::approved().with_delay(Duration::from_secs(10)));
    let slow = pay_with_key(&router, &tok, "order-1002-auth", 1000);
    assert_eq!(
        (slow.status, slow.error_code()),
        (504, Some("upstream_timeout")),
        "{slow}"
    );
    acq.set_response(Response::approved());
    let retry = pay_with_key(&router, &tok, "order-1002-auth", 1000);
    assert_eq!(
        (retry.status, retry.error_code()),
        (409, Some("idempotency_key_in_use")),
        "{retry}"
    );
    assert_eq!(
        acq.request_count(),
        3,
        "a call of unknown outcome was sent again"
    );

    // A call that never reached the acquirer (a refused token) leaves the
    // key free.
    let unknown = "tok_AAAAAAAAAAAAAAAAAAAAAA";
    let refused = pay_with_key(&router, unknown, "order-1003-auth", 1000);
    assert_eq!(refused.status, 404, "{refused}");
    let ok = pay_with_key(&router, &tok, "order-1003-auth", 1000);
    assert_eq!(
        ok.status, 200,
        "the key of a call that sent nothing is free: {ok}"
    );
    assert_eq!(acq.request_count(), 4);
    let bad = pay_with_key(&router, &tok, "", 1000);
    assert_eq!(
        (bad.status, bad.error_code()),
        (400, Some("invalid_idempotency_key")),
        "{bad}"
    );
    let findings = svc.scan_for_leaks(&["4111111111111111"]);
    assert!(findings.is_empty(), "{findings:?}");
}
