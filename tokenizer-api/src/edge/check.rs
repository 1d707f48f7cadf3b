//! `tokenizer edge check --url URL [--ca-file F] [--session cs_...]`: the
//! change and tamper detection of the payment page (PCI DSS 11.6.1), for a
//! cron job. It compares a running edge with THIS binary: the manifest it
//! serves, every file this binary serves (fetched, SHA-384 and size, content
//! type, headers), the page for an unknown session, and with `--session`
//! the frame of that session (headers, and the page rendered again here
//! from the configuration it carries: any other byte is a difference).
//! Prints one JSON line `{"url","ok","checked","differences"}`; exits 1 on
//! any difference.

use std::io::Read as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::assets::{assets, sri, ErrorPage};
use super::headers;
use super::manifest::manifest;
use crate::config::EdgeCheckArgs;

/// The most of one answer that is read.
const MAX_BYTES: u64 = 1024 * 1024;
/// A session id of the right shape that names no session.
const UNKNOWN_SESSION: &str = "cs_AAAAAAAAAAAAAAAAAAAAAA";

struct Fetched {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Fetched {
    /// Every value of a header (names compared in lower case).
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn fetch(agent: &ureq::Agent, url: &str) -> Result<Fetched, String> {
    let response = match agent.get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(format!("cannot fetch {url}: {t}")),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .flat_map(|name| {
            response
                .all(&name)
                .into_iter()
                .map(|v| (name.clone(), v.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_BYTES)
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read {url}: {e}"))?;
    Ok(Fetched {
        status,
        headers,
        body,
    })
}

/// The differences found so far, and how many things were compared.
#[derive(Default)]
struct Report {
    checked: usize,
    differences: Vec<String>,
}

impl Report {
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.differences.push(what());
        }
    }

    fn headers(&mut self, at: &str, got: &Fetched, want: &[(&'static str, String)]) {
        for (name, value) in want {
            let values = got.values(name);
            self.expect(values == [value.as_str()], || {
                format!("{at}: header {name} is {values:?}, expected {value:?}")
            });
        }
    }

    fn status(&mut self, at: &str, got: &Fetched, want: u16) -> bool {
        let ok = got.status == want;
        self.expect(ok, || {
            format!("{at}: status {}, expected {want}", got.status)
        });
        ok
    }
}

fn agent(args: &EdgeCheckArgs) -> Result<ureq::Agent, String> {
    let mut builder = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .redirects(0);
    if let Some(ca) = &args.ca_file {
        let config = crate::tls::client_config(ca, None).map_err(|e| e.to_string())?;
        builder = builder.tls_config(Arc::new(config));
    }
    Ok(builder.build())
}

/// Compare the served manifest with this binary's, key by key (files one
/// by one).
fn compare_manifest(report: &mut Report, live: &Value, local: &Value) {
    for key in [
        "version",
        "origin",
        "frame_template",
        "error_pages",
        "routes",
    ] {
        report.expect(live[key] == local[key], || {
            format!(
                "manifest: {key} is {}, this binary has {}",
                live[key], local[key]
            )
        });
    }
    let empty = Vec::new();
    let live_files = live["files"].as_array().unwrap_or(&empty);
    for want in local["files"].as_array().unwrap_or(&empty) {
        let got = live_files.iter().find(|f| f["path"] == want["path"]);
        report.expect(got == Some(want), || match got {
            Some(g) => format!(
                "manifest: file {} is listed as {g}, this binary has {want}",
                want["path"]
            ),
            None => format!("manifest: file {} is missing", want["path"]),
        });
    }
    for got in live_files {
        let known = local["files"]
            .as_array()
            .is_some_and(|l| l.iter().any(|f| f["path"] == got["path"]));
        report.expect(known, || {
            format!("manifest: unexpected file {}", got["path"])
        });
    }
}

/// The single origin in a frame's CSP (`frame-ancestors X` at the end), if
/// the rest of the policy is this binary's.
fn framed_by(csp: &str) -> Option<String> {
    let ancestors = csp.rsplit_once("frame-ancestors ")?.1;
    (headers::frame_csp(ancestors) == csp
        && (ancestors == "'none'" || headers::is_origin(ancestors, true)))
    .then(|| ancestors.to_owned())
}

fn check_session(report: &mut Report, agent: &ureq::Agent, base: &str, session: &str, tls: bool) {
    let at = format!("frame of {session}");
    let got = match fetch(agent, &format!("{base}/v1/collect/frame/{session}")) {
        Ok(f) => f,
        Err(e) => return report.expect(false, || e),
    };
    let csp = got.values("content-security-policy");
    let ancestors = csp.first().and_then(|c| framed_by(c));
    report.expect(csp.len() == 1 && ancestors.is_some(), || {
        format!("{at}: Content-Security-Policy {csp:?} is not this binary's frame policy")
    });
    let Some(ancestors) = ancestors else { return };
    report.headers(&at, &got, &headers::frame(&ancestors, tls));
    match got.status {
        // An open form (200), or a form that is over (410, `final` set).
        status @ (200 | 410) => {
            let page = String::from_utf8_lossy(&got.body);
            let config = page
                .split_once("data-config=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .and_then(|(attr, _)| super::assets::html_unescape(attr))
                .and_then(|json| serde_json::from_str::<Value>(&json).ok());
            let Some(config) = config else {
                return report.expect(false, || format!("{at}: no readable data-config"));
            };
            report.expect(config["allowed_origin"] == ancestors.as_str(), || {
                format!("{at}: frame-ancestors {ancestors} is not the form's allowed_origin")
            });
            let over = matches!(
                config["final"].as_str(),
                Some("session_expired" | "session_completed" | "session_closed")
            );
            report.expect(over == (status == 410), || {
                format!(
                    "{at}: status {status} with a form whose final code is {}",
                    config["final"]
                )
            });
            let expected = assets().render_frame(&config);
            report.expect(expected.as_bytes() == got.body.as_slice(), || {
                format!(
                    "{at}: the page ({} bytes, {}) differs from this binary's rendering ({} bytes, {})",
                    got.body.len(),
                    sri(&got.body),
                    expected.len(),
                    sri(expected.as_bytes())
                )
            });
        }
        404 => report.expect(got.body == ErrorPage::NotFound.body().as_bytes(), || {
            format!("{at}: the not-found page differs from this binary's")
        }),
        other => report.expect(false, || format!("{at}: status {other}")),
    }
}

fn run_checks(args: &EdgeCheckArgs) -> Result<Report, String> {
    let base = args.url.trim_end_matches('/');
    let tls = base.starts_with("https://");
    let origin = super::origin_of(base, true)
        .ok_or_else(|| "--url must be the edge's origin: https://host[:port]".to_owned())?;
    let agent = agent(args)?;
    let local = manifest(tls, &origin);
    let mut report = Report::default();

    let at = "/v1/collect/manifest.json";
    let got = fetch(&agent, &format!("{base}{at}"))?;
    if report.status(at, &got, 200) {
        match serde_json::from_slice::<Value>(&got.body) {
            Ok(live) => compare_manifest(&mut report, &live, &local),
            Err(_) => report.expect(false, || format!("{at}: not JSON")),
        }
        report.headers(at, &got, &headers::json(tls));
    }

    for f in assets().files() {
        let got = fetch(&agent, &format!("{base}{}", f.path))?;
        if !report.status(&f.path, &got, 200) {
            continue;
        }
        report.expect(got.body == f.body.as_bytes(), || {
            format!(
                "{}: served {} bytes ({}), this binary has {} bytes ({})",
                f.path,
                got.body.len(),
                sri(&got.body),
                f.body.len(),
                f.sha384
            )
        });
        let ct = got.values("content-type");
        report.expect(ct == [f.content_type], || {
            format!(
                "{}: content-type {ct:?}, expected {:?}",
                f.path, f.content_type
            )
        });
        report.headers(&f.path, &got, &headers::file(f.kind, tls));
    }

    let at = "frame of an unknown session";
    let got = fetch(
        &agent,
        &format!("{base}/v1/collect/frame/{UNKNOWN_SESSION}"),
    )?;
    if report.status(at, &got, 404) {
        report.headers(at, &got, &headers::frame("'none'", tls));
        report.expect(got.body == ErrorPage::NotFound.body().as_bytes(), || {
            format!("{at}: the not-found page differs from this binary's")
        });
    }

    if let Some(session) = &args.session {
        if vault::collect::SessionId::parse(session).is_none() {
            return Err("--session is not a session id (cs_...)".into());
        }
        check_session(&mut report, &agent, base, session, tls);
    }
    Ok(report)
}

/// `tokenizer edge check`.
#[allow(clippy::print_stdout)]
pub fn check(args: &EdgeCheckArgs) -> ExitCode {
    let report = match run_checks(args) {
        Ok(r) => r,
        Err(e) => Report {
            checked: 0,
            differences: vec![e],
        },
    };
    let ok = report.differences.is_empty();
    println!(
        "{}",
        serde_json::json!({
            "url": args.url,
            "ok": ok,
            "checked": report.checked,
            "differences": report.differences,
        })
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
