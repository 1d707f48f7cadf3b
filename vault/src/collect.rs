//! Hosted card collection: what a collection session is made of, checked
//! before anything is stored. The operations are in `service/collect.rs`.
//!
//! A session is opened by the checkout server (role `tokenize`) for one
//! buyer: it names the tenant, the one merchant origin allowed to embed the
//! card form ([`Origin`]), how long it lives, whether a security code is
//! required, and a few style settings from an allow-list ([`CollectStyle`]).
//! The buyer's browser receives the session id and a client secret
//! ([`ClientSecret`], 256 random bits, shown once, stored only as a hash),
//! and the edge completes the session once with the card typed.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::pan::contains_pan_like;

/// Longest and default session lifetime, in seconds.
pub const MAX_TTL_SECS: i64 = 900;
pub const DEFAULT_TTL_SECS: i64 = 600;
/// Refused submissions before a session is closed.
pub const DEFAULT_MAX_FAILURES: u32 = 5;
/// How long a session row stays after it expired (so that the checkout
/// server can still read `completed` or `expired`), in milliseconds.
pub const KEEP_AFTER_EXPIRY_MS: i64 = 24 * 3600 * 1000;

/// Random bytes of a session id and of a client secret.
const SESSION_ID_BYTES: usize = 16;
const CLIENT_SECRET_BYTES: usize = 32;
/// Domain tag of the stored secret hash.
const SECRET_HASH_TAG: &[u8] = b"cardvault/collect-secret/v1\0";

fn url_safe(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `cs_` and 22 URL-safe characters (128 random bits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId(String);

impl SessionId {
    pub fn generate() -> Result<SessionId, getrandom::Error> {
        let mut raw = [0u8; SESSION_ID_BYTES];
        getrandom::getrandom(&mut raw)?;
        Ok(SessionId(format!("cs_{}", url_safe(&raw))))
    }

    /// A session id of our shape; anything else cannot name a session.
    pub fn parse(s: &str) -> Option<SessionId> {
        let rest = s.strip_prefix("cs_")?;
        let ok = rest.len() == 22
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| SessionId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client secret of a session: shown once (to the checkout server, for
/// the buyer's browser), stored only as [`ClientSecret::hash`].
pub struct ClientSecret(Zeroizing<String>);

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret([REDACTED])")
    }
}

impl ClientSecret {
    pub fn generate() -> Result<ClientSecret, getrandom::Error> {
        let mut raw = Zeroizing::new([0u8; CLIENT_SECRET_BYTES]);
        getrandom::getrandom(raw.as_mut())?;
        Ok(ClientSecret(Zeroizing::new(url_safe(raw.as_ref()))))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What is stored: SHA-256 over a domain tag and the secret. A fast hash
    /// is enough for 256 random bits (nothing to guess at).
    pub fn hash(secret: &str) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(SECRET_HASH_TAG);
        h.update(secret.as_bytes());
        h.finalize().to_vec()
    }

    /// Whether `presented` is the secret whose hash is `stored`, in
    /// constant time.
    pub fn matches(presented: &str, stored: &[u8]) -> bool {
        bool::from(Self::hash(presented).ct_eq(stored))
    }
}

/// Why an origin was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("allowed_origin must be one origin: scheme, host and optional port, nothing else")]
    Shape,
    #[error("allowed_origin must use https (http only for loopback in --dev)")]
    Scheme,
}

/// Exactly one web origin, serialized as a browser serializes it (lower
/// case, no default port, no path): what `frame-ancestors` and
/// `postMessage`'s `targetOrigin` are set to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin(String);

impl Origin {
    /// `https://host[:port]`; `http://` only when `allow_http_loopback` and
    /// the host is a loopback address or `localhost`.
    pub fn parse(s: &str, allow_http_loopback: bool) -> Result<Origin, OriginError> {
        let (scheme, rest) = s.split_once("://").ok_or(OriginError::Shape)?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return Err(OriginError::Scheme),
        };
        if rest.is_empty() || rest.len() > 255 || rest.contains(['/', '?', '#', '@', '\\']) {
            return Err(OriginError::Shape);
        }
        let rest = rest.to_ascii_lowercase();
        let (host, port) = split_port(&rest)?;
        if !valid_host(host) {
            return Err(OriginError::Shape);
        }
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if scheme == "http" && !(allow_http_loopback && loopback) {
            return Err(OriginError::Scheme);
        }
        Ok(Origin(match port {
            Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
            _ => format!("{scheme}://{host}"),
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn split_port(rest: &str) -> Result<(&str, Option<u16>), OriginError> {
    // An IPv6 literal keeps its colons inside brackets.
    let colon = if rest.starts_with('[') {
        let close = rest.find(']').ok_or(OriginError::Shape)?;
        rest[close..].find(':').map(|i| close + i)
    } else {
        rest.rfind(':')
    };
    match colon {
        None => Ok((rest, None)),
        Some(i) => {
            let port = &rest[i + 1..];
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(OriginError::Shape);
            }
            let port: u16 = port.parse().map_err(|_| OriginError::Shape)?;
            if port == 0 {
                return Err(OriginError::Shape);
            }
            Ok((&rest[..i], Some(port)))
        }
    }
}

/// A DNS name of letters, digits and hyphens in dot-separated labels, an
/// IPv4 address or a bracketed IPv6 address.
fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

/// The look of the card form: a few properties from an allow-list, each
/// value checked. No CSS text, no URLs, no selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectStyle {
    /// `system`, `sans-serif`, `serif` or `monospace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub font_family: Option<String>,
    /// 10 to 24.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub font_size_px: Option<u8>,
    /// Colours as `#rrggbb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background_color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub border_color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_color: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accent_color: Option<String>,
    /// 0 to 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub border_radius_px: Option<u8>,
    /// Placeholder texts: 1 to 40 printable characters, no markup
    /// characters, never a card number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder_expiry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder_cvc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder_name: Option<String>,
}

/// The fonts a form may use (each maps to a font stack in the frame).
pub const FONT_FAMILIES: [&str; 4] = ["system", "sans-serif", "serif", "monospace"];

impl CollectStyle {
    /// Every value within its rules, or the name of the first that is not.
    pub fn check(&self) -> Result<(), &'static str> {
        if self
            .font_family
            .as_deref()
            .is_some_and(|f| !FONT_FAMILIES.contains(&f))
        {
            return Err("font_family");
        }
        if self.font_size_px.is_some_and(|s| !(10..=24).contains(&s)) {
            return Err("font_size_px");
        }
        if self.border_radius_px.is_some_and(|r| r > 16) {
            return Err("border_radius_px");
        }
        let colours = [
            ("color", &self.color),
            ("background_color", &self.background_color),
            ("border_color", &self.border_color),
            ("error_color", &self.error_color),
            ("accent_color", &self.accent_color),
        ];
        for (name, value) in colours {
            if value.as_deref().is_some_and(|c| !hex_colour(c)) {
                return Err(name);
            }
        }
        let texts = [
            ("placeholder_number", &self.placeholder_number),
            ("placeholder_expiry", &self.placeholder_expiry),
            ("placeholder_cvc", &self.placeholder_cvc),
            ("placeholder_name", &self.placeholder_name),
        ];
        for (name, value) in texts {
            if value.as_deref().is_some_and(|t| !plain_text(t, 40)) {
                return Err(name);
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == CollectStyle::default()
    }
}

fn hex_colour(c: &str) -> bool {
    c.len() == 7 && c.starts_with('#') && c[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// 1 to `max` characters, none a control character or one of `<>"'&\``,
/// and no card number in it.
pub fn plain_text(t: &str, max: usize) -> bool {
    let count = t.chars().count();
    count > 0
        && count <= max
        && !t.trim().is_empty()
        && !t
            .chars()
            .any(|c| c.is_control() || matches!(c, '<' | '>' | '"' | '\'' | '&' | '`' | '\\'))
        && !contains_pan_like(t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_one_origin_in_browser_form() {
        let ok = |s: &str| Origin::parse(s, false).map(|o| o.as_str().to_owned());
        assert_eq!(
            ok("https://shop.example").as_deref(),
            Ok("https://shop.example")
        );
        assert_eq!(
            ok("HTTPS://Shop.Example:443").as_deref(),
            Ok("https://shop.example")
        );
        assert_eq!(
            ok("https://shop.example:8443").as_deref(),
            Ok("https://shop.example:8443")
        );
        assert_eq!(
            ok("https://[::1]:9443").as_deref(),
            Ok("https://[::1]:9443")
        );
        assert_eq!(ok("https://10.0.0.5").as_deref(), Ok("https://10.0.0.5"));
        for bad in [
            "shop.example",
            "https://",
            "https://shop.example/",
            "https://shop.example/path",
            "https://shop.example?x",
            "https://shop.example#f",
            "https://user@shop.example",
            "https://shop.example:0",
            "https://shop.example:99999",
            "https://shop..example",
            "https://-shop.example",
            "https://shop_example.com",
            "https://shop.example https://other.example",
            "https://*.example",
            "https://[::1",
        ] {
            assert_eq!(Origin::parse(bad, true), Err(OriginError::Shape), "{bad}");
        }
        assert_eq!(
            Origin::parse("http://shop.example", true),
            Err(OriginError::Scheme)
        );
        assert_eq!(
            Origin::parse("http://127.0.0.1:8080", false),
            Err(OriginError::Scheme)
        );
        assert_eq!(
            Origin::parse("javascript://x", true),
            Err(OriginError::Scheme)
        );
        assert_eq!(
            Origin::parse("http://127.0.0.1:8080", true).map(|o| o.0),
            Ok("http://127.0.0.1:8080".to_owned())
        );
        assert_eq!(
            Origin::parse("http://localhost:80", true).map(|o| o.0),
            Ok("http://localhost".to_owned())
        );
    }

    #[test]
    fn style_values_are_checked() {
        let mut s = CollectStyle {
            font_family: Some("serif".into()),
            font_size_px: Some(16),
            color: Some("#1a2B3c".into()),
            border_radius_px: Some(4),
            placeholder_number: Some("Card number".into()),
            ..CollectStyle::default()
        };
        assert_eq!(s.check(), Ok(()));
        s.font_family = Some("Comic Sans".into());
        assert_eq!(s.check(), Err("font_family"));
        s.font_family = None;
        s.color = Some("red".into());
        assert_eq!(s.check(), Err("color"));
        s.color = Some("#fff".into());
        assert_eq!(s.check(), Err("color"));
        s.color = None;
        s.font_size_px = Some(40);
        assert_eq!(s.check(), Err("font_size_px"));
        s.font_size_px = None;
        for bad in [
            "<b>x</b>",
            "a\"b",
            "",
            "   ",
            "4111 1111 1111 1111",
            "x\u{7}",
        ] {
            s.placeholder_number = Some(bad.into());
            assert_eq!(s.check(), Err("placeholder_number"), "{bad:?}");
        }
        let parsed: Result<CollectStyle, _> =
            serde_json::from_str(r#"{"css": "body{background:url(x)}"}"#);
        assert!(parsed.is_err());
    }

    #[test]
    fn secrets_and_ids() {
        let id = SessionId::generate().unwrap();
        assert!(SessionId::parse(id.as_str()).is_some());
        assert!(SessionId::parse("cs_short").is_none());
        assert!(SessionId::parse("tok_AAAAAAAAAAAAAAAAAAAAAA").is_none());
        let secret = ClientSecret::generate().unwrap();
        assert_eq!(secret.expose().len(), 43);
        let stored = ClientSecret::hash(secret.expose());
        assert!(ClientSecret::matches(secret.expose(), &stored));
        assert!(!ClientSecret::matches("nope", &stored));
        assert_eq!(format!("{secret:?}"), "ClientSecret([REDACTED])");
    }
}
