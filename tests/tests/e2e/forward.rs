//! The forwarding proxy (issue 18), against the real binary. So far: the
//! `[[upstream]]` tables of the configuration file, refused at start when
//! unusable (naming the upstream), and read again on SIGHUP.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use e2e::{
    expect_refused_start, give_to_service_user, run_cli, temp_data_dir, tokenizer_command,
    Captured, Options, Service,
};

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
