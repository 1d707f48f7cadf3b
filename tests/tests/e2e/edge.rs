//! The hosted-collection edge (`tokenizer edge`) in front of the real
//! vault: the edge's own listener is plain HTTP on loopback
//! (`--insecure-plain-http`), its calls to the vault's api listener are TLS
//! with the harness CA and the API key of a principal with the role
//! `collect`. The form and its files with their headers and digests, a card
//! submitted and retried, the refusals of the edge, the checkout reading the
//! token, `tokenizer edge check` (passing, and failing against something
//! that is not this edge), and an edge that holds nothing that can read a
//! card.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use e2e::{
    free_port, give_to_service_user, scan_bytes, temp_data_dir, tokenizer_command, Client,
    Endpoints, Service,
};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::{exp_year, REASON, TENANT};

const SHOP: &str = "https://shop.example";
const CSP_BASE: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; font-src 'self'; form-action 'none'; base-uri 'none'; \
    frame-ancestors ";

/// A running `tokenizer edge`, killed on drop.
pub(crate) struct Edge {
    child: Child,
    log: PathBuf,
    /// The file holding its API key for the vault (mode 0600).
    key_file: PathBuf,
    pub(crate) url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Edge {
    /// An edge for `svc` with the API key `key` (in a 0600 file: the only
    /// file the edge gets).
    pub(crate) fn start(svc: &Service, key: &str, extra: &[&str]) -> Edge {
        Edge::start_with(svc, key, None, None, extra)
    }

    /// `tls`: serve `server.pem` and `server.key` of this directory instead
    /// of plain HTTP (for `localhost`);
    /// `vault`: the vault's address as the edge is told it (default the
    /// vault's api listener).
    fn start_with(
        svc: &Service,
        key: &str,
        tls: Option<&std::path::Path>,
        vault: Option<&str>,
        extra: &[&str],
    ) -> Edge {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_data_dir();
        let key_file = dir.path().join("edge.key");
        std::fs::write(&key_file, format!("{key}\n")).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        give_to_service_user(dir.path());
        let log = dir.path().join("edge.log");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let ca = svc.endpoints().ca.clone().expect("the vault serves TLS");
        let mut cmd = tokenizer_command();
        cmd.arg("edge").args(["--listen", &listen]);
        if let Some(pki) = tls {
            cmd.arg("--tls-cert-file")
                .arg(pki.join("server.pem"))
                .arg("--tls-key-file")
                .arg(pki.join("server.key"))
                .args(["--public-url", &format!("https://localhost:{port}")]);
        } else {
            cmd.arg("--insecure-plain-http");
        }
        cmd.args([
            "--vault-url",
            &format!("https://{}", vault.unwrap_or(svc.addr())),
        ])
        .arg("--vault-ca-file")
        .arg(&ca)
        .arg("--api-key-file")
        .arg(&key_file)
        .args(["--log-level", "trace"])
        .args(extra)
        .stdout(Stdio::from(
            std::fs::File::create(dir.path().join("edge.out")).unwrap(),
        ))
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        let child = cmd.spawn().unwrap();
        let mut edge = Edge {
            child,
            log,
            key_file,
            url: if tls.is_some() {
                format!("https://localhost:{port}")
            } else {
                format!("http://{listen}")
            },
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !edge.log_text().contains("listening on ") {
            if let Some(status) = edge.child.try_wait().unwrap() {
                panic!("the edge exited ({status}):\n{}", edge.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the edge did not start:\n{}",
                edge.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        edge
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Fetched {
        fetch(ureq::get(&format!("{}{path}", self.url)).call())
    }

    fn submit(&self, session: &str, origin: Option<&str>, ctype: &str, body: &[u8]) -> Fetched {
        let mut req = ureq::post(&format!("{}/v1/collect/submit/{session}", self.url))
            .set("Content-Type", ctype);
        if let Some(o) = origin {
            req = req.set("Origin", o);
        }
        fetch(req.send_bytes(body))
    }
}

struct Fetched {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn code(&self) -> Option<String> {
        self.json()["error"]["code"].as_str().map(str::to_owned)
    }
}

fn fetch(r: Result<ureq::Response, ureq::Error>) -> Fetched {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("no answer: {e}"),
    };
    let headers = r
        .headers_names()
        .into_iter()
        .map(|n| (n.clone(), r.header(&n).unwrap_or_default().to_owned()))
        .collect();
    let status = r.status();
    let mut body = Vec::new();
    r.into_reader().read_to_end(&mut body).unwrap();
    Fetched {
        status,
        headers,
        body,
    }
}

fn sri(bytes: &[u8]) -> String {
    format!(
        "sha384-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha384::digest(bytes))
    )
}

fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The value of `attr="..."` after `marker` in a page.
fn attribute<'a>(page: &'a str, marker: &str) -> &'a str {
    let rest = page
        .split_once(marker)
        .unwrap_or_else(|| panic!("no {marker}"))
        .1;
    rest.split_once('"').unwrap().0
}

fn open_session(checkout: &Client) -> (String, String) {
    let made = checkout.post_json(
        "/v1/collect/sessions",
        &json!({"tenant": TENANT, "allowed_origin": SHOP, "ttl_secs": 300, "require_cvc": true,
                "reference": "order-9", "style": {"font_family": "serif", "placeholder_name": "Name on card"}}),
    );
    assert_eq!(made.status, 201, "{made}");
    (made.str("session"), made.str("client_secret"))
}

fn card(secret: &str, pan: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"client_secret": secret, "pan": pan, "exp_month": 12,
                                "exp_year": exp_year(), "cvc": "123", "cardholder_name": "Jane Doe"}))
    .unwrap()
}

/// The frame's security headers, as the edge must send them.
fn assert_frame_headers(f: &Fetched, ancestors: &str) {
    let want = [
        ("content-security-policy", format!("{CSP_BASE}{ancestors}")),
        ("cache-control", "no-store".to_owned()),
        ("referrer-policy", "no-referrer".to_owned()),
        ("x-content-type-options", "nosniff".to_owned()),
        (
            "permissions-policy",
            "camera=(), microphone=(), geolocation=(), payment=(), usb=()".to_owned(),
        ),
        ("cross-origin-opener-policy", "same-origin".to_owned()),
        ("content-type", "text/html; charset=utf-8".to_owned()),
    ];
    for (name, value) in want {
        assert_eq!(f.header(name), Some(value.as_str()), "{name}");
    }
    // Plain HTTP here: no HSTS (it is sent over TLS only).
    assert_eq!(f.header("strict-transport-security"), None);
}

fn edge_check(args: &[&str]) -> (bool, Value) {
    let out = tokenizer_command()
        .args(["edge", "check"])
        .args(args)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), report)
}

#[test]
fn the_edge_serves_the_form_and_forwards_a_card_to_the_vault() {
    let svc = Service::start();
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let key = svc.create_principal("edge", &["collect"], &["*"]);
    let edge = Edge::start(&svc, &key, &[]);
    let own_origin = edge.url.clone();
    let (id, secret) = open_session(&checkout);

    // The frame: headers, the configuration it carries, the files it names.
    let frame = edge.get(&format!("/v1/collect/frame/{id}"));
    assert_eq!(frame.status, 200, "{}", frame.text());
    assert_frame_headers(&frame, SHOP);
    let page = frame.text();
    assert!(
        !page.contains(&secret),
        "the secret stays in the URL fragment"
    );
    let config: Value =
        serde_json::from_str(&html_unescape(attribute(&page, "data-config=\""))).unwrap();
    assert_eq!(config["session"], id.as_str());
    assert_eq!(config["allowed_origin"], SHOP);
    assert_eq!(config["require_cvc"], true);
    assert_eq!(config["submit_url"], format!("/v1/collect/submit/{id}"));
    assert_eq!(config["style"]["font_family"], "serif");
    assert_eq!(config["style"]["placeholder_name"], "Name on card");
    // The JSON's quotes are escaped for the attribute.
    assert!(
        attribute(&page, "data-config=\"").starts_with("{&quot;"),
        "{page}"
    );

    let manifest = edge.get("/v1/collect/manifest.json");
    assert_eq!(manifest.status, 200);
    let manifest = manifest.json();
    assert_eq!(manifest["version"], env!("CARGO_PKG_VERSION"));
    let listed = |path: &str| -> Value {
        manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("{path} not in the manifest: {manifest}"))
    };
    let css = format!(
        "/v1/collect/assets/{}",
        attribute(&page, "href=\"/v1/collect/assets/")
    );
    let js = format!(
        "/v1/collect/assets/{}",
        attribute(&page, "src=\"/v1/collect/assets/")
    );
    for (path, ctype) in [
        (&css, "text/css; charset=utf-8"),
        (&js, "text/javascript; charset=utf-8"),
    ] {
        let f = edge.get(path);
        assert_eq!(f.status, 200, "{path}");
        assert_eq!(f.header("content-type"), Some(ctype));
        assert_eq!(
            f.header("cache-control"),
            Some("public, max-age=31536000, immutable")
        );
        assert_eq!(f.header("x-content-type-options"), Some("nosniff"));
        let entry = listed(path);
        assert_eq!(entry["sha384"], sri(&f.body), "{path}");
        assert_eq!(entry["bytes"], f.body.len(), "{path}");
        // The name is versioned by the content.
        let hex: String = sha2::Sha256::digest(&f.body)[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(path.contains(&format!("frame-{hex}.")), "{path}");
    }
    assert_eq!(edge.get("/v1/collect/assets/frame-00000000.js").status, 404);
    let frame_route = manifest["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == "/v1/collect/frame/{session}" && r["status"] == 200)
        .unwrap()
        .clone();
    assert_eq!(
        frame_route["headers"]["content-security-policy"],
        format!("{CSP_BASE}<allowed_origin>")
    );
    for path in [
        "/v1/collect/cardvault.js".to_owned(),
        listed_cardvault(&manifest),
    ] {
        let f = edge.get(&path);
        assert_eq!(f.status, 200, "{path}");
        assert_eq!(
            f.header("cross-origin-resource-policy"),
            Some("cross-origin")
        );
        assert_eq!(f.header("access-control-allow-origin"), Some("*"));
        assert_eq!(listed(&path)["sha384"], sri(&f.body));
    }
    assert_eq!(edge.get("/healthz").status, 200);

    // Refusals of the edge itself.
    let body = card(&secret, "4242424242424242");
    let json_type = "application/json";
    let wrong = edge.submit(&id, Some("https://evil.example"), json_type, &body);
    assert_eq!(
        (wrong.status, wrong.code().as_deref()),
        (403, Some("forbidden_origin"))
    );
    assert_eq!(edge.submit(&id, None, json_type, &body).status, 403);
    assert_eq!(edge.submit(&id, Some("null"), json_type, &body).status, 403);
    let big = vec![b' '; 5000];
    let oversize = edge.submit(&id, Some(&own_origin), json_type, &big);
    assert_eq!(
        (oversize.status, oversize.code().as_deref()),
        (413, Some("payload_too_large"))
    );
    let plain = edge.submit(&id, Some(&own_origin), "text/plain", &body);
    assert_eq!(
        (plain.status, plain.code().as_deref()),
        (415, Some("unsupported_media_type"))
    );
    let junk = edge.submit(&id, Some(&own_origin), json_type, b"{not json");
    assert_eq!(
        (junk.status, junk.code().as_deref()),
        (400, Some("malformed_json"))
    );
    let extra = edge.submit(
        &id,
        Some(&own_origin),
        json_type,
        br#"{"client_secret":"x","pan":"4242424242424242","exp_month":12,"exp_year":2040,"buyer_address":"10.0.0.1"}"#,
    );
    assert_eq!(
        (extra.status, extra.code().as_deref()),
        (400, Some("invalid_request"))
    );
    let array = edge.submit(
        &id,
        Some(&own_origin),
        json_type,
        br#"["x","4242424242424242",12,2040]"#,
    );
    assert_eq!(array.status, 400);
    assert_eq!(
        edge.submit("cs_short", Some(&own_origin), json_type, &body)
            .status,
        404
    );

    // The vault's answers, relayed: wrong secret, then the card, then a retry.
    let bad_secret = edge.submit(
        &id,
        Some(&own_origin),
        json_type,
        &card("nope", "4242424242424242"),
    );
    assert_eq!(
        (bad_secret.status, bad_secret.code().as_deref()),
        (403, Some("wrong_secret"))
    );
    let done = edge.submit(&id, Some(&own_origin), json_type, &body);
    assert_eq!(done.status, 200, "{}", done.text());
    let token = done.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(done.json()["last4"], "4242");
    assert_eq!(done.json()["brand"], "visa");
    assert_eq!(done.header("cache-control"), Some("no-store"));
    // A same-origin fetch under no-referrer may send `Origin: null`.
    let again = fetch(
        ureq::post(&format!("{}/v1/collect/submit/{id}", edge.url))
            .set("Content-Type", json_type)
            .set("Origin", "null")
            .set("Sec-Fetch-Site", "same-origin")
            .send_bytes(&body),
    );
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["token"], token.as_str());
    let cross = fetch(
        ureq::post(&format!("{}/v1/collect/submit/{id}", edge.url))
            .set("Content-Type", json_type)
            .set("Origin", &own_origin)
            .set("Sec-Fetch-Site", "cross-site")
            .send_bytes(&body),
    );
    assert_eq!(cross.status, 403);
    let other = edge.submit(
        &id,
        Some(&own_origin),
        json_type,
        &card(&secret, "5555555555554444"),
    );
    assert_eq!(
        (other.status, other.code().as_deref()),
        (409, Some("session_completed"))
    );

    // The checkout learns the token from the vault.
    let read = checkout.get(&format!("/v1/collect/sessions/{id}"));
    assert_eq!(read.json["status"], "completed", "{read}");
    assert_eq!(read.json["token"]["token"], token.as_str());
    let router = svc.principal_client("router", &["detokenize"], &["*"]);
    assert_eq!(
        router.detokenize(&token, REASON).json["pan"],
        "4242424242424242"
    );

    // A completed session's frame is gone (still framable by the shop, to
    // show why); an unknown one is framable by nobody.
    let gone = edge.get(&format!("/v1/collect/frame/{id}"));
    assert_eq!(gone.status, 410);
    assert_frame_headers(&gone, SHOP);
    let unknown = edge.get("/v1/collect/frame/cs_BBBBBBBBBBBBBBBBBBBBBB");
    assert_eq!(unknown.status, 404);
    assert_frame_headers(&unknown, "'none'");
    assert_eq!(edge.get("/v1/collect/frame/not-a-session").status, 404);

    // `tokenizer edge check`: this edge is this binary's; something else is not.
    let (id2, _) = open_session(&checkout);
    let (ok, report) = edge_check(&["--url", &edge.url, "--session", &id2]);
    assert!(ok, "{report}");
    assert_eq!(report["differences"], json!([]));
    assert!(report["checked"].as_u64().unwrap() > 20, "{report}");
    let (ok, report) = edge_check(&["--url", &edge.url, "--session", &id]);
    assert!(ok, "a closed session's page is this binary's too: {report}");
    let ca = svc.endpoints().ca.clone().unwrap();
    let vault_url = format!("https://{}", svc.addr());
    let (ok, report) = edge_check(&["--url", &vault_url, "--ca-file", ca.to_str().unwrap()]);
    assert!(!ok, "the vault is not an edge: {report}");
    let tampered = TamperingProxy::start(&edge.url);
    let (ok, report) = edge_check(&["--url", &tampered.url]);
    assert!(!ok, "{report}");
    let found = report["differences"].to_string();
    assert!(
        found.contains(&js),
        "the changed frame script is named: {report}"
    );

    // Nothing of the card anywhere: the vault's files and tables, the edge's log.
    let pans = ["4242424242424242", "5555555555554444"];
    let findings = svc.scan_for_leaks(&pans);
    assert!(findings.is_empty(), "{findings:?}");
    let log = edge.log_text();
    let findings = scan_bytes("edge log", log.as_bytes(), &pans);
    assert!(findings.is_empty(), "{findings:?}");
    assert!(
        !log.contains(&secret) && !log.contains(&id),
        "the log names routes, not paths"
    );
    assert!(log.contains("/v1/collect/submit/{session}"), "{log}");
}

fn listed_cardvault(manifest: &Value) -> String {
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["path"].as_str())
        .find(|p| p.starts_with("/v1/collect/cardvault-"))
        .unwrap()
        .to_owned()
}

/// A plain-HTTP proxy in front of an edge that appends a byte to the frame
/// script: what `edge check` must notice.
struct TamperingProxy {
    url: String,
}

impl TamperingProxy {
    fn start(upstream: &str) -> TamperingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let mut got = fetch(ureq::get(&format!("{upstream}{path}")).call());
                if path.starts_with("/v1/collect/assets/frame-") && path.ends_with(".js") {
                    got.body.extend_from_slice(b"\n//x");
                }
                let mut out = format!("HTTP/1.1 {} X\r\nconnection: close\r\n", got.status);
                for (n, v) in &got.headers {
                    if !n.eq_ignore_ascii_case("content-length")
                        && !n.eq_ignore_ascii_case("connection")
                        && !n.eq_ignore_ascii_case("transfer-encoding")
                    {
                        out.push_str(&format!("{n}: {v}\r\n"));
                    }
                }
                out.push_str(&format!("content-length: {}\r\n\r\n", got.body.len()));
                let _ = stream.write_all(out.as_bytes());
                let _ = stream.write_all(&got.body);
            }
        });
        TamperingProxy { url }
    }
}

#[test]
fn the_edge_holds_nothing_that_reads_a_card() {
    let svc = Service::start();
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let key = svc.create_principal("edge", &["collect"], &["*"]);
    // Started with an API key file and nothing else: no KEK, keyring,
    // database or data directory.
    let edge = Edge::start(&svc, &key, &["--rate-per-session", "2"]);
    let own = edge.url.clone();

    // Its credential cannot read a card back.
    let token = checkout
        .tokenize(TENANT, "4111111111111111", 12, exp_year())
        .str("token");
    let as_edge = svc.client(&key);
    assert_eq!(as_edge.get(&format!("/v1/tokens/{token}")).status, 403);
    assert_eq!(
        as_edge
            .post_json("/v1/detokenize", &json!({"token": token, "reason": REASON}))
            .status,
        403,
        "the role collect may not detokenize on the reveal listener"
    );
    let api_only = Endpoints {
        listeners: vec![("api".to_owned(), svc.addr().to_owned())],
        ca: svc.endpoints().ca.clone(),
    };
    let on_api = Client::for_endpoints(&api_only, Some(format!("Bearer {key}")));
    assert_eq!(
        on_api
            .post_json("/v1/detokenize", &json!({"token": token, "reason": REASON}))
            .status,
        404,
        "detokenize is not served on the api listener the edge reaches"
    );

    // The per-session limit: the third submission in a minute waits.
    let (id, _) = open_session(&checkout);
    for _ in 0..2 {
        let r = edge.submit(
            &id,
            Some(&own),
            "application/json",
            &card("nope", "4111111111111111"),
        );
        assert_eq!(r.code().as_deref(), Some("wrong_secret"));
    }
    let limited = edge.submit(
        &id,
        Some(&own),
        "application/json",
        &card("nope", "4111111111111111"),
    );
    assert_eq!(
        (limited.status, limited.code().as_deref()),
        (429, Some("rate_limited"))
    );
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));

    // A key file others can read is refused at start.
    let dir = temp_data_dir();
    let loose = dir.path().join("edge.key");
    std::fs::write(&loose, &key).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    give_to_service_user(dir.path());
    let out = tokenizer_command()
        .args(["edge", "--insecure-plain-http", "--listen", "127.0.0.1:0"])
        .args(["--vault-url", &format!("https://{}", svc.addr())])
        .arg("--vault-ca-file")
        .arg(svc.endpoints().ca.clone().unwrap())
        .arg("--api-key-file")
        .arg(&loose)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("chmod 600") && !stderr.contains(&key),
        "{stderr}"
    );

    // The vault gone: the edge says so with stable codes.
    let (id2, secret2) = open_session(&checkout);
    drop(svc);
    let down = edge.submit(
        &id2,
        Some(&own),
        "application/json",
        &card(&secret2, "4111111111111111"),
    );
    assert_eq!(
        (down.status, down.code().as_deref()),
        (502, Some("vault_unavailable"))
    );
    let frame = edge.get(&format!("/v1/collect/frame/{id2}"));
    assert_eq!(frame.status, 502);
    assert_frame_headers(&frame, "'none'");
    let findings = scan_bytes(
        "edge log",
        edge.log_text().as_bytes(),
        &["4111111111111111"],
    );
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn the_edge_serves_tls_with_hsts_and_checks_over_it() {
    let svc = Service::start();
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let key = svc.create_principal("edge", &["collect"], &["*"]);
    let pki = e2e::harness_pki_dir(svc.data_dir());
    let edge = Edge::start_with(&svc, &key, Some(&pki), None, &[]);
    let ca = svc.endpoints().ca.clone().unwrap();
    let agent = ureq::AgentBuilder::new()
        .tls_config(e2e::tls_client_config(&ca, None))
        .build();
    let (id, secret) = open_session(&checkout);
    let frame = fetch(
        agent
            .get(&format!("{}/v1/collect/frame/{id}", edge.url))
            .call(),
    );
    assert_eq!(frame.status, 200, "{}", frame.text());
    assert_eq!(
        frame.header("strict-transport-security"),
        Some("max-age=63072000")
    );
    assert_eq!(
        frame.header("content-security-policy"),
        Some(format!("{CSP_BASE}{SHOP}").as_str())
    );
    let done = fetch(
        agent
            .post(&format!("{}/v1/collect/submit/{id}", edge.url))
            .set("Content-Type", "application/json")
            .set("Origin", &edge.url)
            .send_bytes(&card(&secret, "378282246310005")),
    );
    // Amex takes a 4-digit code: the vault's refusal is relayed as is.
    assert_eq!(
        (done.status, done.code().as_deref()),
        (422, Some("invalid_cvc")),
        "{}",
        done.text()
    );
    let (ok, report) = edge_check(&[
        "--url",
        &edge.url,
        "--ca-file",
        ca.to_str().unwrap(),
        "--session",
        &id,
    ]);
    assert!(ok, "{report}");
    // Without the CA the edge's certificate is not trusted: no check passes.
    let (ok, _) = edge_check(&["--url", &edge.url]);
    assert!(!ok);
    let findings = scan_bytes("edge log", edge.log_text().as_bytes(), &["378282246310005"]);
    assert!(findings.is_empty(), "{findings:?}");
}

/// `serve --dev` starts a trial edge on a loopback port of its own, with
/// the dev PKI: TLS with the dev server certificate, and mutual TLS to the
/// vault with the dev client certificate of the role `collect` (it has no
/// API key). The vault's frame URLs name it. A card typed into it reaches
/// the vault, and the trail names the edge's certificate principal.
#[test]
fn serve_dev_runs_a_trial_edge_that_reaches_the_vault_over_mutual_tls() {
    let svc = Service::start_with(e2e::Options {
        collect_public_url: None,
        ..e2e::Options::dev()
    });
    let edge_addr = svc
        .listener("collect")
        .expect("serve --dev logs its trial edge's listener")
        .to_owned();
    let edge_url = format!("https://{edge_addr}");
    assert!(
        svc.stderr()
            .contains("DEV MODE: a trial edge (hosted card form)"),
        "the trial edge is not marked as such"
    );
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let auditor = svc.principal_client("auditor", &["auditor"], &["*"]);
    let made = checkout.post_json(
        "/v1/collect/sessions",
        &json!({"tenant": TENANT, "allowed_origin": SHOP, "require_cvc": true}),
    );
    assert_eq!(made.status, 201, "{made}");
    let (id, secret) = (made.str("session"), made.str("client_secret"));
    assert_eq!(
        made.str("frame_url"),
        format!("{edge_url}/v1/collect/frame/{id}#{secret}")
    );

    let ca = svc.endpoints().ca.clone().unwrap();
    let agent = ureq::AgentBuilder::new()
        .tls_config(e2e::tls_client_config(&ca, None))
        .build();
    let frame = fetch(
        agent
            .get(&format!("{edge_url}/v1/collect/frame/{id}"))
            .call(),
    );
    assert_eq!(frame.status, 200, "{}", frame.text());
    assert_eq!(
        frame.header("content-security-policy"),
        Some(format!("{CSP_BASE}{SHOP}").as_str())
    );
    let done = fetch(
        agent
            .post(&format!("{edge_url}/v1/collect/submit/{id}"))
            .set("Content-Type", "application/json")
            .set("Origin", &edge_url)
            .send_bytes(&card(&secret, "4111111111111111")),
    );
    assert_eq!(done.status, 200, "{}", done.text());
    let token = done.json()["token"].as_str().unwrap().to_owned();
    let read = checkout.get(&format!("/v1/collect/sessions/{id}"));
    assert_eq!(read.status, 200, "{read}");
    assert_eq!(read.json["status"], "completed");
    assert_eq!(read.json["token"]["token"], token.as_str());

    // The submission was the dev edge's certificate principal's.
    let events = auditor.get("/v1/audit/events?limit=1000");
    assert_eq!(events.status, 200, "{events}");
    let submissions: Vec<&Value> = events.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["event"])
        .filter(|e| e["action"] == "collect_submission")
        .collect();
    assert_eq!(submissions.len(), 1, "{submissions:?}");
    assert_eq!(
        submissions[0]["principal"], "dev-cert-collect",
        "{submissions:?}"
    );
    let findings = scan_bytes(
        "serve --dev log",
        svc.stderr().as_bytes(),
        &["4111111111111111"],
    );
    assert!(findings.is_empty(), "{findings:?}");
}

/// A TCP relay between the edge and the vault that can stop relaying the
/// vault's answers (what the vault sends is read and dropped), as a link
/// that breaks after the request went through.
struct AnswerEater {
    addr: String,
    eat: Arc<AtomicBool>,
}

impl AnswerEater {
    fn start(upstream: &str) -> AnswerEater {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let eat = Arc::new(AtomicBool::new(false));
        let (upstream, flag) = (upstream.to_owned(), eat.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                });
                let (mut s_in, mut c_out, flag) = (server, client, flag.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if flag.load(Ordering::SeqCst) => {}
                            Ok(n) => {
                                if c_out.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        AnswerEater { addr, eat }
    }
}

/// The vault stores a card but its answer never reaches the edge: the
/// buyer gets 504 `vault_timeout` (the outcome unknown to the edge), and a
/// retry of the same card once the link is back answers the same token,
/// the one the checkout reads. A frame asked for while no answer comes
/// back is the 504 page.
#[test]
fn a_lost_vault_answer_is_a_504_and_the_retry_gets_the_same_token() {
    let svc = Service::start();
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let key = svc.create_principal("edge", &["collect"], &["*"]);
    let link = AnswerEater::start(svc.addr());
    let edge = Edge::start_with(
        &svc,
        &key,
        None,
        Some(&link.addr),
        &["--request-timeout-ms", "1500"],
    );
    let (id, secret) = open_session(&checkout);
    // The frame over the link: the edge now holds a kept-alive connection.
    let frame = edge.get(&format!("/v1/collect/frame/{id}"));
    assert_eq!(frame.status, 200, "{}", frame.text());

    link.eat.store(true, Ordering::SeqCst);
    let body = card(&secret, "4012888888881881");
    let lost = edge.submit(&id, Some(&edge.url), "application/json", &body);
    assert_eq!(
        (lost.status, lost.code().as_deref()),
        (504, Some("vault_timeout")),
        "{}",
        lost.text()
    );
    // The vault did store it: the request went through, its answer did not.
    let read = checkout.get(&format!("/v1/collect/sessions/{id}"));
    assert_eq!(read.json["status"], "completed", "{read}");
    let stored = read.json["token"]["token"].as_str().unwrap().to_owned();
    let page = edge.get(&format!("/v1/collect/frame/{id}"));
    assert_eq!(page.status, 504, "{}", page.text());
    assert_frame_headers(&page, "'none'");

    link.eat.store(false, Ordering::SeqCst);
    let retried = edge.submit(&id, Some(&edge.url), "application/json", &body);
    assert_eq!(retried.status, 200, "{}", retried.text());
    assert_eq!(retried.json()["token"], stored.as_str());
    let findings = scan_bytes(
        "edge log",
        edge.log_text().as_bytes(),
        &["4012888888881881"],
    );
    assert!(findings.is_empty(), "{findings:?}");
}

/// `kill -HUP` makes the edge read its certificate and key again: new
/// connections get the new certificate (a client trusting only the new CA
/// connects, one trusting only the old CA no longer does), and its
/// credential for the vault (a new API key replacing a revoked one); a
/// broken file then leaves the last good material in use.
#[test]
fn sighup_reloads_the_edge_certificate_and_credential_and_a_broken_file_keeps_the_last_good_one() {
    let svc = Service::start();
    let checkout = svc.principal_client("checkout", &["tokenize"], &["*"]);
    let key = svc.create_principal("edge", &["collect"], &["*"]);
    let files = temp_data_dir();
    let (old_pki, new_pki) = (files.path().join("old"), files.path().join("new"));
    for dir in [&old_pki, &new_pki] {
        let out = tokenizer_command()
            .args(["dev-pki", "--out"])
            .arg(dir)
            .args(["--server-name", "localhost"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let served = files.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let install = |from: &std::path::Path| {
        for f in ["server.pem", "server.key"] {
            // Written in place and renamed, as a deploy tool does.
            let tmp = served.join(format!(".{f}.new"));
            std::fs::copy(from.join(f), &tmp).unwrap();
            std::fs::rename(&tmp, served.join(f)).unwrap();
        }
        give_to_service_user(&served);
    };
    install(&old_pki);
    let edge = Edge::start_with(&svc, &key, Some(&served), None, &[]);
    let healthz = |ca: &std::path::Path| {
        let agent = ureq::AgentBuilder::new()
            .tls_config(e2e::tls_client_config(&ca.join("ca.pem"), None))
            .build();
        agent.get(&format!("{}/healthz", edge.url)).call().is_ok()
    };
    assert!(healthz(&old_pki));
    assert!(!healthz(&new_pki));

    install(&new_pki);
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &edge.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !healthz(&new_pki) {
        assert!(Instant::now() < deadline, "no reload:\n{}", edge.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!healthz(&old_pki), "the old certificate is still served");

    // The credential: the old principal revoked, a new key in the file.
    let (id, _) = open_session(&checkout);
    let frame = |edge: &Edge| {
        let agent = ureq::AgentBuilder::new()
            .tls_config(e2e::tls_client_config(&new_pki.join("ca.pem"), None))
            .build();
        fetch(
            agent
                .get(&format!("{}/v1/collect/frame/{id}", edge.url))
                .call(),
        )
        .status
    };
    assert_eq!(frame(&edge), 200);
    svc.revoke("edge");
    assert_eq!(frame(&edge), 502, "a revoked edge still reads sessions");
    let key2 = svc.create_principal("edge-2", &["collect"], &["*"]);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = edge.key_file.with_extension("new");
        std::fs::write(&tmp, format!("{key2}\n")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        give_to_service_user(&tmp);
        std::fs::rename(&tmp, &edge.key_file).unwrap();
    }
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while frame(&edge) != 200 {
        assert!(
            Instant::now() < deadline,
            "no new credential:\n{}",
            edge.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    std::fs::write(served.join("server.pem"), "not a certificate\n").unwrap();
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !edge.log_text().contains("TLS reload failed") {
        assert!(Instant::now() < deadline, "{}", edge.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        healthz(&new_pki),
        "a broken file replaced the good material"
    );
    let alive = std::process::Command::new("kill")
        .args(["-0", &edge.child.id().to_string()])
        .status()
        .unwrap();
    assert!(alive.success(), "the edge died on SIGHUP");
}
