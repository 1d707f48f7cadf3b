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
    let files = temp_data_dir();
    give_to_service_user(files.path());
    let table = acq.upstream_toml(
        "acq-a",
        &format!(
            "paths = [\"/v1/payments\", \"/v1/payments/*/capture\"]\ntenants = [\"*\"]\nforward_headers = [\"Idempotency-Key\"]\n{extra}"
        ),
    );
    let svc = Service::start_with(with_config(files.path(), &table));
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
