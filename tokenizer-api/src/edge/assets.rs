//! The browser files the edge serves, embedded in the binary
//! (`tokenizer-api/assets/collect`), with their digests computed once at
//! start: the SRI form `sha384-<base64>` (what merchants pin and the
//! manifest lists) and versioned, immutable names
//! `<stem>-<first 8 hex of sha256>.<ext>`.
//!
//! Also here: the frame page rendered from its template, and the small
//! static pages answered for a session that cannot take a card.

use std::sync::OnceLock;

use base64::Engine as _;
use sha2::{Digest, Sha256, Sha384};

const FRAME_HTML: &str = include_str!("../../assets/collect/frame.html");
const FRAME_JS: &str = include_str!("../../assets/collect/frame.js");
const FRAME_CSS: &str = include_str!("../../assets/collect/frame.css");
const CARDVAULT_JS: &str = include_str!("../../assets/collect/cardvault.js");

/// What a file is, which decides its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// frame.js, frame.css: loaded by the frame only, versioned, immutable.
    FrameAsset,
    /// cardvault.js at its versioned name: loaded by merchant pages, with SRI.
    MerchantScript,
    /// cardvault.js at its plain name (what a merchant pins changes with it).
    MerchantScriptLatest,
}

/// One served file.
#[derive(Debug)]
pub struct File {
    /// The path it is served at.
    pub path: String,
    pub body: &'static str,
    pub content_type: &'static str,
    /// `sha384-<base64>`.
    pub sha384: String,
    pub kind: FileKind,
}

/// Why a frame is not shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorPage {
    /// No such session (404).
    NotFound,
    /// The vault did not answer (502/504).
    Unavailable,
}

impl ErrorPage {
    pub const ALL: [ErrorPage; 2] = [ErrorPage::NotFound, ErrorPage::Unavailable];

    pub fn name(self) -> &'static str {
        match self {
            ErrorPage::NotFound => "not_found",
            ErrorPage::Unavailable => "unavailable",
        }
    }

    /// The page: static, no script, nothing from the request.
    pub fn body(self) -> &'static str {
        match self {
            ErrorPage::NotFound => ERROR_NOT_FOUND,
            ErrorPage::Unavailable => ERROR_UNAVAILABLE,
        }
    }
}

const ERROR_NOT_FOUND: &str = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"robots\" content=\"noindex, nofollow\"><title>Card form not found</title></head>\n\
<body><p>This card form does not exist.</p></body></html>\n";
const ERROR_UNAVAILABLE: &str = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"robots\" content=\"noindex, nofollow\"><title>Card form unavailable</title></head>\n\
<body><p>The card form is unavailable right now. Please try again in a moment.</p></body></html>\n";

/// Every embedded file, digested once.
#[derive(Debug)]
pub struct Assets {
    pub frame_js: File,
    pub frame_css: File,
    pub cardvault: File,
    pub cardvault_latest: File,
    /// `sha384-...` of the frame template (the page is rendered per session).
    pub template_sha384: String,
    pub template_bytes: usize,
}

/// The assets of this binary.
pub fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let frame_js = versioned("frame", "js", FRAME_JS);
        let frame_css = versioned("frame", "css", FRAME_CSS);
        let cardvault = versioned("cardvault", "js", CARDVAULT_JS);
        Assets {
            frame_js: File {
                path: format!("/v1/collect/assets/{frame_js}"),
                body: FRAME_JS,
                content_type: "text/javascript; charset=utf-8",
                sha384: sri(FRAME_JS.as_bytes()),
                kind: FileKind::FrameAsset,
            },
            frame_css: File {
                path: format!("/v1/collect/assets/{frame_css}"),
                body: FRAME_CSS,
                content_type: "text/css; charset=utf-8",
                sha384: sri(FRAME_CSS.as_bytes()),
                kind: FileKind::FrameAsset,
            },
            cardvault: File {
                path: format!("/v1/collect/{cardvault}"),
                body: CARDVAULT_JS,
                content_type: "text/javascript; charset=utf-8",
                sha384: sri(CARDVAULT_JS.as_bytes()),
                kind: FileKind::MerchantScript,
            },
            cardvault_latest: File {
                path: "/v1/collect/cardvault.js".to_owned(),
                body: CARDVAULT_JS,
                content_type: "text/javascript; charset=utf-8",
                sha384: sri(CARDVAULT_JS.as_bytes()),
                kind: FileKind::MerchantScriptLatest,
            },
            template_sha384: sri(FRAME_HTML.as_bytes()),
            template_bytes: FRAME_HTML.len(),
        }
    })
}

impl Assets {
    /// Every file served as is, in the manifest's order.
    pub fn files(&self) -> [&File; 4] {
        [
            &self.frame_js,
            &self.frame_css,
            &self.cardvault,
            &self.cardvault_latest,
        ]
    }

    /// The file served at `path`.
    pub fn by_path(&self, path: &str) -> Option<&File> {
        self.files().into_iter().find(|f| f.path == path)
    }

    /// The frame page for a session: `config` is
    /// `{"session","allowed_origin","require_cvc","style","submit_url"}`
    /// for an open session, `{"session","allowed_origin","final": CODE}`
    /// for one that is over (410: the form shows why and posts
    /// `cardvault:error` with CODE), HTML-escaped into `data-config`.
    pub fn render_frame(&self, config: &serde_json::Value) -> String {
        let file_name = |f: &File| f.path.rsplit('/').next().unwrap_or_default().to_owned();
        FRAME_HTML
            .replace("{{CONFIG_JSON}}", &html_escape(&config.to_string()))
            .replace("{{FRAME_JS}}", &html_escape(&file_name(&self.frame_js)))
            .replace("{{FRAME_CSS}}", &html_escape(&file_name(&self.frame_css)))
    }
}

/// `sha384-<base64>`, the Subresource Integrity form.
pub fn sri(bytes: &[u8]) -> String {
    format!(
        "sha384-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha384::digest(bytes))
    )
}

/// `<stem>-<first 8 hex digits of the SHA-256 of body>.<ext>`.
fn versioned(stem: &str, ext: &str, body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{stem}-{hex}.{ext}")
}

/// Escape for HTML text and quoted attribute values: `& < > " '`.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 4);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
}

/// The reverse of [`html_escape`] (and of the common named and numeric
/// references), for `tokenizer edge check` reading a served attribute.
pub fn html_unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after.find(';')?;
        let entity = &after[..end];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            e if e.starts_with("#x") || e.starts_with("#X") => {
                char::from_u32(u32::from_str_radix(&e[2..], 16).ok()?)?
            }
            e if e.starts_with('#') => char::from_u32(e[1..].parse().ok()?)?,
            _ => return None,
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_digests_and_rendering() {
        let a = assets();
        assert!(a.frame_js.path.starts_with("/v1/collect/assets/frame-"));
        assert!(a.frame_js.path.ends_with(".js") && a.frame_js.path.len() == 36);
        assert!(a.cardvault.path.starts_with("/v1/collect/cardvault-"));
        for f in a.files() {
            assert!(f.sha384.starts_with("sha384-") && f.sha384.len() == 7 + 64);
            assert_eq!(a.by_path(&f.path).unwrap().path, f.path);
        }
        // Known answer: SHA-384 of "abc" (FIPS 180-2).
        assert_eq!(
            sri(b"abc"),
            "sha384-ywB1P0WjXou1oD1pmsZQBycsMqsO3tFjGotgWkP/W+2AhgcroefMI1i67KE0yCWn"
        );
        let config = serde_json::json!({"session": "cs_AAAAAAAAAAAAAAAAAAAAAA",
            "allowed_origin": "https://shop.example", "require_cvc": true,
            "style": {"placeholder_name": "<b>\"x\"&'y'"}, "submit_url": "/v1/collect/submit/cs_AAAAAAAAAAAAAAAAAAAAAA"});
        let page = a.render_frame(&config);
        assert!(!page.contains("{{"));
        let attr = page.split("data-config=\"").nth(1).unwrap();
        let attr = &attr[..attr.find('"').unwrap()];
        assert!(!attr.contains('<') && !attr.contains('\''));
        let back: serde_json::Value = serde_json::from_str(&html_unescape(attr).unwrap()).unwrap();
        assert_eq!(back, config);
        assert_eq!(a.render_frame(&back), page);
    }
}
