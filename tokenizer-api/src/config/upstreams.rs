//! The forwarding proxy's upstreams (issue 18): the `[[upstream]]` tables
//! of the configuration file, checked for what can be checked without
//! touching a file or the network (name, URL, path patterns, tenants,
//! headers, limits). Reading the CA, the client certificate and its key is
//! the `upstream` module's (above `tls`), at start and on SIGHUP.
//!
//! Invariants: the destination is always the configured scheme, host and
//! port (a path pattern has no scheme, authority, `..` or encoded
//! separator); only https; the caller's credentials never travel
//! (`Authorization`, `Cookie`, `Proxy-Authorization` and hop-by-hop
//! headers cannot be in `forward_headers`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// One `[[upstream]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamFile {
    name: String,
    url: String,
    ca_file: PathBuf,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    paths: Vec<String>,
    tenants: Vec<String>,
    connect_timeout_ms: Option<u64>,
    timeout_ms: Option<u64>,
    max_request_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    #[serde(default)]
    forward_headers: Vec<String>,
}

/// Defaults of an upstream's limits.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// At most this many upstreams, paths per upstream, headers per upstream.
const MAX_UPSTREAMS: usize = 64;
const MAX_PATHS: usize = 64;
const MAX_HEADERS: usize = 16;

/// Headers that never travel to an upstream, whatever the configuration:
/// the caller's credentials for the vault, and what the proxy itself sets.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// An upstream, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// `[a-z0-9-]`, 1-63 characters: the `{upstream}` of the route.
    pub name: String,
    /// `https://host[:port]` (lower case, no default port).
    pub origin: String,
    /// The base path every allowed path is appended to (`""` or `/api`).
    pub base_path: String,
    pub ca_file: PathBuf,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub paths: Vec<PathPattern>,
    /// `None`: every tenant (`"*"`); else these.
    pub tenants: Option<Vec<String>>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    /// Lower case.
    pub forward_headers: Vec<String>,
}

/// An allowed path: segments, `*` matching exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    pattern: String,
    segments: Vec<Option<String>>,
}

impl PathPattern {
    /// `/a/*/b`: absolute, non-empty segments of unreserved characters
    /// (RFC 3986 `ALPHA DIGIT - . _ ~`, and `:` `@` `+` `,` `=`), `*` alone
    /// for one segment; no `.` or `..` segment.
    pub fn parse(s: &str) -> Option<PathPattern> {
        let rest = s.strip_prefix('/')?;
        if rest.is_empty() || s.len() > 512 {
            return None;
        }
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if seg == "*" {
                segments.push(None);
            } else if is_segment(seg) {
                segments.push(Some(seg.to_owned()));
            } else {
                return None;
            }
        }
        Some(PathPattern {
            pattern: s.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether a request path matches. The path must already be in the
    /// form [`normalize_path`] gives.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        parts.len() == self.segments.len()
            && parts.iter().zip(&self.segments).all(|(p, s)| match s {
                None => !p.is_empty(),
                Some(s) => p == s,
            })
    }
}

fn is_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.' | b'_' | b'~' | b':' | b'@' | b'+' | b',' | b'='
                )
        })
}

/// Why a request path cannot be forwarded (always 403 `path_not_allowed`
/// to the caller; the variant is for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Not `/seg/seg...` of unreserved characters (an encoded separator, a
    /// scheme or authority, a backslash, a query or fragment, an empty
    /// segment).
    Malformed,
    /// A `.` or `..` segment.
    Traversal,
}

/// The request's path as it will be appended to the upstream's base: the
/// `{path}` of the route with a leading `/`, refused unless every segment
/// is plain (see [`PathPattern::parse`]): no percent-encoding at all, so
/// no encoded separator or dot can slip through.
pub fn normalize_path(tail: &str) -> Result<String, PathRefusal> {
    let path = match tail.strip_prefix('/') {
        Some(_) => tail.to_owned(),
        None => format!("/{tail}"),
    };
    if path.len() > 1024 || path == "/" {
        return Err(PathRefusal::Malformed);
    }
    for seg in path[1..].split('/') {
        if seg == "." || seg == ".." {
            return Err(PathRefusal::Traversal);
        }
        if !is_segment(seg) {
            return Err(PathRefusal::Malformed);
        }
    }
    Ok(path)
}

/// Why an `[[upstream]]` table is refused (the message names the upstream).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamConfigError {
    #[error("upstream {0:?}: name must be 1-63 characters of a-z, 0-9 and -")]
    Name(String),
    #[error("upstream {0}: the name is used twice")]
    Duplicate(String),
    #[error("at most {MAX_UPSTREAMS} upstreams")]
    TooMany,
    #[error("upstream {0}: url must be https://host[:port][/base-path] without user info, query or fragment")]
    Url(String),
    #[error(
        "upstream {0}: path {1:?} is not an absolute path of plain segments ('*' for one segment)"
    )]
    Path(String, String),
    #[error("upstream {0}: give between 1 and {MAX_PATHS} paths")]
    PathCount(String),
    #[error("upstream {0}: tenants must be [\"*\"] or tenant names")]
    Tenants(String),
    #[error("upstream {0}: client_cert_file and client_key_file go together")]
    ClientCert(String),
    #[error("upstream {0}: forward_headers: {1:?} is not a header that may be forwarded")]
    Header(String, String),
    #[error("upstream {0}: {1} must be between {2} and {3}")]
    Limit(String, &'static str, u64, u64),
}

/// Check every table.
pub(super) fn check(tables: Vec<UpstreamFile>) -> Result<Vec<UpstreamSpec>, UpstreamConfigError> {
    if tables.len() > MAX_UPSTREAMS {
        return Err(UpstreamConfigError::TooMany);
    }
    let mut out: Vec<UpstreamSpec> = Vec::with_capacity(tables.len());
    for t in tables {
        let spec = check_one(t)?;
        if out.iter().any(|u| u.name == spec.name) {
            return Err(UpstreamConfigError::Duplicate(spec.name));
        }
        out.push(spec);
    }
    Ok(out)
}

fn check_one(t: UpstreamFile) -> Result<UpstreamSpec, UpstreamConfigError> {
    let name = t.name;
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(UpstreamConfigError::Name(name));
    }
    let (origin, base_path) =
        parse_url(&t.url).ok_or_else(|| UpstreamConfigError::Url(name.clone()))?;
    if t.paths.is_empty() || t.paths.len() > MAX_PATHS {
        return Err(UpstreamConfigError::PathCount(name));
    }
    let mut paths = Vec::with_capacity(t.paths.len());
    for p in &t.paths {
        paths.push(
            PathPattern::parse(p)
                .ok_or_else(|| UpstreamConfigError::Path(name.clone(), p.clone()))?,
        );
    }
    let tenants = match t.tenants.as_slice() {
        [all] if all == "*" => None,
        [] => return Err(UpstreamConfigError::Tenants(name)),
        list => {
            let mut names = Vec::new();
            for tenant in list {
                match vault::Tenant::parse(tenant) {
                    Ok(_) => names.push(tenant.clone()),
                    Err(_) => return Err(UpstreamConfigError::Tenants(name)),
                }
            }
            Some(names)
        }
    };
    let client_cert = match (t.client_cert_file, t.client_key_file) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(UpstreamConfigError::ClientCert(name)),
    };
    if t.forward_headers.len() > MAX_HEADERS {
        return Err(UpstreamConfigError::Header(
            name,
            format!("more than {MAX_HEADERS}"),
        ));
    }
    let mut forward_headers = Vec::new();
    for h in &t.forward_headers {
        let lower = h.to_ascii_lowercase();
        let token = !lower.is_empty()
            && lower.len() <= 64
            && lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !token || NEVER_FORWARDED.contains(&lower.as_str()) || lower.starts_with("x-cardvault") {
            return Err(UpstreamConfigError::Header(name, h.clone()));
        }
        if !forward_headers.contains(&lower) {
            forward_headers.push(lower);
        }
    }
    let ms = |v: Option<u64>, default: u64, what: &'static str, max: u64| {
        let v = v.unwrap_or(default);
        if (1..=max).contains(&v) {
            Ok(Duration::from_millis(v))
        } else {
            Err(UpstreamConfigError::Limit(name.clone(), what, 1, max))
        }
    };
    let connect_timeout = ms(
        t.connect_timeout_ms,
        DEFAULT_CONNECT_TIMEOUT_MS,
        "connect_timeout_ms",
        60_000,
    )?;
    let timeout = ms(t.timeout_ms, DEFAULT_TIMEOUT_MS, "timeout_ms", 120_000)?;
    let bytes = |v: Option<usize>, default: usize, what: &'static str, max: usize| {
        let v = v.unwrap_or(default);
        if (1..=max).contains(&v) {
            Ok(v)
        } else {
            Err(UpstreamConfigError::Limit(
                name.clone(),
                what,
                1,
                max as u64,
            ))
        }
    };
    let max_request_bytes = bytes(
        t.max_request_bytes,
        DEFAULT_MAX_REQUEST_BYTES,
        "max_request_bytes",
        1 << 20,
    )?;
    let max_response_bytes = bytes(
        t.max_response_bytes,
        DEFAULT_MAX_RESPONSE_BYTES,
        "max_response_bytes",
        16 << 20,
    )?;
    Ok(UpstreamSpec {
        name,
        origin,
        base_path,
        ca_file: t.ca_file,
        client_cert,
        paths,
        tenants,
        connect_timeout,
        timeout,
        max_request_bytes,
        max_response_bytes,
        forward_headers,
    })
}

/// `https://host[:port][/base]` -> (`https://host[:port]`, `/base` or "").
fn parse_url(raw: &str) -> Option<(String, String)> {
    let url = url::Url::parse(raw).ok()?;
    if url.scheme() != "https"
        || !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
        || raw.contains(['\\', '%'])
        || raw.split('/').any(|s| s == "." || s == "..")
    {
        return None;
    }
    let host = match url.host()? {
        url::Host::Domain(d) => d.to_ascii_lowercase(),
        url::Host::Ipv4(a) => a.to_string(),
        url::Host::Ipv6(a) => format!("[{a}]"),
    };
    let origin = match url.port() {
        Some(p) => format!("https://{host}:{p}"),
        None => format!("https://{host}"),
    };
    let base = url.path().trim_end_matches('/');
    if !base.is_empty() && normalize_path(base).is_err() {
        return None;
    }
    Some((origin, base.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn table(toml_text: &str) -> UpstreamFile {
        toml::from_str(toml_text).unwrap()
    }

    const GOOD: &str = r#"
        name = "acquirer-a"
        url = "https://Acq.Example:8443/api/"
        ca_file = "/etc/cardvault/acq-a-ca.pem"
        client_cert_file = "/etc/cardvault/acq-a.pem"
        client_key_file = "/etc/cardvault/acq-a.key"
        paths = ["/v1/payments", "/v1/payments/*/capture"]
        tenants = ["*"]
        connect_timeout_ms = 5000
        timeout_ms = 30000
        max_request_bytes = 65536
        max_response_bytes = 1048576
        forward_headers = ["Idempotency-Key", "X-Request-Id"]
    "#;

    #[test]
    fn the_issue_example_is_accepted() {
        let specs = check(vec![table(GOOD)]).unwrap();
        let u = &specs[0];
        assert_eq!(u.name, "acquirer-a");
        assert_eq!(u.origin, "https://acq.example:8443");
        assert_eq!(u.base_path, "/api");
        assert_eq!(u.tenants, None);
        assert_eq!(u.forward_headers, ["idempotency-key", "x-request-id"]);
        assert_eq!(u.timeout, Duration::from_secs(30));
        assert!(u.paths[0].matches("/v1/payments"));
        assert!(u.paths[1].matches("/v1/payments/pay_123/capture"));
        assert!(!u.paths[1].matches("/v1/payments//capture"));
        assert!(!u.paths[1].matches("/v1/payments/a/b/capture"));
        assert!(!u.paths[0].matches("/v1/payments/x"));
    }

    #[test]
    fn bad_tables_are_refused_naming_the_upstream() {
        let with = |from: &str, to: &str| {
            let text = GOOD.replace(from, to);
            check(vec![table(&text)]).unwrap_err()
        };
        for url in [
            "http://acq.example/api",
            "https://user@acq.example/api",
            "https://acq.example/api?x=1",
            "https://acq.example/api#f",
            "https://acq.example/a/../b",
            "ftp://acq.example",
            "https://",
        ] {
            let err = with("https://Acq.Example:8443/api/", url);
            assert_eq!(err, UpstreamConfigError::Url("acquirer-a".into()), "{url}");
            assert!(err.to_string().contains("acquirer-a"));
        }
        for path in [
            "v1/payments",
            "/v1/../x",
            "/v1/%2e%2e/x",
            "/v1//x",
            "/v1/**",
            "/v1/a*",
            "/",
        ] {
            let err = with("\"/v1/payments\",", &format!("{path:?},"));
            assert!(
                matches!(err, UpstreamConfigError::Path(..)),
                "{path}: {err}"
            );
        }
        for header in [
            "Authorization",
            "Cookie",
            "Host",
            "Content-Length",
            "X-Cardvault-Source",
            "Bad Header",
        ] {
            let err = with("\"X-Request-Id\"", &format!("{header:?}"));
            assert!(
                matches!(err, UpstreamConfigError::Header(..)),
                "{header}: {err}"
            );
        }
        assert!(matches!(
            with("acquirer-a", "Acquirer_A"),
            UpstreamConfigError::Name(_)
        ));
        assert!(matches!(
            with("client_key_file = \"/etc/cardvault/acq-a.key\"", ""),
            UpstreamConfigError::ClientCert(_)
        ));
        assert!(matches!(
            with("timeout_ms = 30000", "timeout_ms = 0"),
            UpstreamConfigError::Limit(..)
        ));
        assert!(matches!(
            with("tenants = [\"*\"]", "tenants = []"),
            UpstreamConfigError::Tenants(_)
        ));
        assert!(matches!(
            with("tenants = [\"*\"]", "tenants = [\"shop 1\"]"),
            UpstreamConfigError::Tenants(_)
        ));
        let twice = check(vec![table(GOOD), table(GOOD)]).unwrap_err();
        assert_eq!(twice, UpstreamConfigError::Duplicate("acquirer-a".into()));
        // Unknown keys are a parse error of the file.
        assert!(
            toml::from_str::<UpstreamFile>(&format!("{GOOD}\nfollow_redirects = true")).is_err()
        );
    }

    #[test]
    fn request_paths_are_plain_or_refused() {
        assert_eq!(normalize_path("v1/payments").unwrap(), "/v1/payments");
        assert_eq!(normalize_path("/v1/payments").unwrap(), "/v1/payments");
        assert_eq!(
            normalize_path("/v1/pay_1/capture").unwrap(),
            "/v1/pay_1/capture"
        );
        for (tail, why) in [
            ("v1/../admin", PathRefusal::Traversal),
            ("v1/./x", PathRefusal::Traversal),
            ("..", PathRefusal::Traversal),
            ("v1/%2e%2e/admin", PathRefusal::Malformed),
            ("v1%2Fadmin", PathRefusal::Malformed),
            ("v1\\admin", PathRefusal::Malformed),
            ("v1//x", PathRefusal::Malformed),
            ("v1/x?y=1", PathRefusal::Malformed),
            ("https://evil.example/x", PathRefusal::Malformed),
            ("//evil.example/x", PathRefusal::Malformed),
            ("", PathRefusal::Malformed),
        ] {
            assert_eq!(normalize_path(tail), Err(why), "{tail}");
        }
    }
}
