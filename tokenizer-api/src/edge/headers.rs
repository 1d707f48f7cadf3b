//! The security headers of every edge route, in one place: the handlers
//! send exactly these, the manifest lists them, and `tokenizer edge check`
//! expects them.

use super::assets::FileKind;

/// The placeholder of the frame's `frame-ancestors` in the manifest.
pub const ALLOWED_ORIGIN: &str = "<allowed_origin>";

/// A route's headers: (name, value), names in lower case.
pub type Headers = Vec<(&'static str, String)>;

/// The frame's Content-Security-Policy; `ancestors` is the session's
/// origin, or `'none'`.
pub fn frame_csp(ancestors: &str) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self'; font-src 'self'; form-action 'none'; base-uri 'none'; \
         frame-ancestors {ancestors}"
    )
}

const PERMISSIONS: &str = "camera=(), microphone=(), geolocation=(), payment=(), usb=()";
const HSTS: &str = "max-age=63072000";

fn common(tls: bool, mut h: Headers) -> Headers {
    h.push(("x-content-type-options", "nosniff".to_owned()));
    h.push(("referrer-policy", "no-referrer".to_owned()));
    if tls {
        h.push(("strict-transport-security", HSTS.to_owned()));
    }
    h
}

/// The frame page of an open session (`ancestors`: its origin) or an error
/// page (`'none'` for an unknown session, else the session's origin).
/// COOP applies to top-level documents only; in the merchant's iframe it
/// changes nothing, and postMessage to the parent keeps working (it was
/// served so in the Chromium trial of the assets).
pub fn frame(ancestors: &str, tls: bool) -> Headers {
    common(
        tls,
        vec![
            ("content-security-policy", frame_csp(ancestors)),
            ("cache-control", "no-store".to_owned()),
            ("permissions-policy", PERMISSIONS.to_owned()),
            ("cross-origin-opener-policy", "same-origin".to_owned()),
        ],
    )
}

/// A served file.
pub fn file(kind: FileKind, tls: bool) -> Headers {
    let h = match kind {
        FileKind::FrameAsset => vec![
            (
                "cache-control",
                "public, max-age=31536000, immutable".to_owned(),
            ),
            ("cross-origin-resource-policy", "same-origin".to_owned()),
        ],
        // `crossorigin="anonymous"` makes a merchant's SRI load a CORS
        // request: it needs both.
        FileKind::MerchantScript => vec![
            (
                "cache-control",
                "public, max-age=31536000, immutable".to_owned(),
            ),
            ("cross-origin-resource-policy", "cross-origin".to_owned()),
            ("access-control-allow-origin", "*".to_owned()),
        ],
        FileKind::MerchantScriptLatest => vec![
            ("cache-control", "public, max-age=300".to_owned()),
            ("cross-origin-resource-policy", "cross-origin".to_owned()),
            ("access-control-allow-origin", "*".to_owned()),
        ],
    };
    common(tls, h)
}

/// JSON answers: submit, manifest, health, errors.
pub fn json(tls: bool) -> Headers {
    common(
        tls,
        vec![
            ("cache-control", "no-store".to_owned()),
            ("cross-origin-resource-policy", "same-origin".to_owned()),
        ],
    )
}

/// Whether `s` is one origin in browser form (`https://host[:port]`,
/// lower case, nothing after it): what may go into `frame-ancestors`.
pub fn is_origin(s: &str, allow_http: bool) -> bool {
    let rest = match s.strip_prefix("https://") {
        Some(r) => r,
        None if allow_http => match s.strip_prefix("http://") {
            Some(r) => r,
            None => return false,
        },
        None => return false,
    };
    !rest.is_empty()
        && rest.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_fit_for_a_header() {
        assert!(is_origin("https://shop.example", false));
        assert!(is_origin("https://shop.example:8443", false));
        assert!(!is_origin("http://127.0.0.1:9", false));
        assert!(is_origin("http://127.0.0.1:9", true));
        for bad in [
            "https://",
            "https://a.example; script-src *",
            "https://a.example https://b.example",
            "https://a.example/x",
            "*",
            "'none'",
            "https://A.example",
        ] {
            assert!(!is_origin(bad, true), "{bad}");
        }
        assert!(frame_csp("https://shop.example").ends_with("frame-ancestors https://shop.example"));
    }
}
