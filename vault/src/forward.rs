//! The pure core of the forwarding proxy (issue 18): request templates with
//! card-data placeholders, and the scan of an acquirer's answer for card
//! numbers. No I/O, no storage, no tokenizing: the HTTP layer resolves the
//! tokens, fetches the values and tokenizes what the scan finds.
//!
//! Request side:
//! - [`BodyKind::from_content_type`]: JSON, form or XML, UTF-8 only;
//! - [`Template::parse`]: the body, checked for its content type, with its
//!   placeholders `{{<token>.<field>}}` ([`Field`]) and at most
//!   [`MAX_TOKENS`] distinct tokens; [`Template::tokens`] and
//!   [`Template::fields_of`] say exactly which values to fetch (a security
//!   code only where one is used);
//! - [`Template::render`]: every placeholder replaced by its value, escaped
//!   for the body's kind, so that no value can change the structure of the
//!   body; [`format_field`] formats a field from card parts.
//!
//! Response side: [`find_card_numbers`] then [`replace_card_numbers`] with
//! one token per number found.
//!
//! Invariants:
//! - errors and `Debug` never show a value, a body or a part of one (only
//!   byte offsets, field names and counts);
//! - a rendered body lives in one zeroizing buffer, allocated once at its
//!   exact final size (no reallocation leaves a copy behind);
//! - a placeholder is substituted only where its escaping is exact: inside
//!   a JSON string, anywhere in a form, in XML character data or a quoted
//!   attribute value. Anywhere else the template is refused.

use std::fmt;
use std::ops::Range;

use zeroize::Zeroizing;

use crate::card::{CardholderName, Expiry, Token};
use crate::cvc::Cvc;
use crate::pan::{luhn_valid, Pan};

/// At most this many distinct tokens in one template.
pub const MAX_TOKENS: usize = 20;

/// Why a template or a content type was refused. Messages hold byte
/// offsets and field names, never the body or a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("content type not supported for forwarding (JSON, form or XML)")]
    UnsupportedContentType,
    #[error("invalid body: {0}")]
    InvalidBody(&'static str),
    #[error("malformed or misplaced placeholder at byte {offset}")]
    InvalidPlaceholder { offset: usize },
    #[error("more than {MAX_TOKENS} distinct tokens in one call")]
    TooManyTokens,
    #[error("no value for {field} of the placeholder at byte {offset}")]
    MissingValue { offset: usize, field: Field },
    #[error("the value for {field} at byte {offset} cannot be written in this body type")]
    InvalidValue { offset: usize, field: Field },
}

impl TemplateError {
    /// Stable error code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            TemplateError::UnsupportedContentType => "unsupported_content_type",
            TemplateError::InvalidBody(_) => "invalid_body",
            TemplateError::InvalidPlaceholder { .. } => "invalid_placeholder",
            TemplateError::TooManyTokens => "too_many_tokens",
            TemplateError::MissingValue { .. } => "missing_value",
            TemplateError::InvalidValue { .. } => "invalid_value",
        }
    }
}

/// The kind of a request body, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyKind {
    /// `application/json`
    Json,
    /// `application/x-www-form-urlencoded`
    Form,
    /// `application/xml` or `text/xml`
    Xml,
}

impl BodyKind {
    /// The kind for a Content-Type header value: `application/json`,
    /// `application/x-www-form-urlencoded`, `application/xml`, `text/xml`,
    /// or a structured syntax suffix `+json` / `+xml` (RFC 6839:
    /// `application/soap+xml` of SOAP 1.2). Media type and parameter names
    /// are case-insensitive; a `charset` parameter must be `utf-8` (any
    /// case, quoted or not): anything else is `InvalidBody`. Other
    /// parameters are ignored. Anything else is `UnsupportedContentType`.
    pub fn from_content_type(value: &str) -> Result<BodyKind, TemplateError> {
        let mut parts = value.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let (top, sub) = media.split_once('/').unwrap_or(("", ""));
        let kind = match (top, sub) {
            ("application", "json") => BodyKind::Json,
            ("application", "x-www-form-urlencoded") => BodyKind::Form,
            ("application" | "text", "xml") => BodyKind::Xml,
            ("application", s) if s.len() > 5 && s.ends_with("+json") => BodyKind::Json,
            ("application" | "text", s) if s.len() > 4 && s.ends_with("+xml") => BodyKind::Xml,
            _ => return Err(TemplateError::UnsupportedContentType),
        };
        for param in parts {
            let (name, v) = param.split_once('=').unwrap_or((param, ""));
            if name.trim().eq_ignore_ascii_case("charset") {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                if !v.eq_ignore_ascii_case("utf-8") {
                    return Err(TemplateError::InvalidBody("charset must be utf-8"));
                }
            }
        }
        Ok(kind)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BodyKind::Json => "json",
            BodyKind::Form => "form",
            BodyKind::Xml => "xml",
        }
    }
}

/// A card field a placeholder asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// All digits of the card number.
    Pan,
    /// Expiry month, 2 digits (`04`).
    ExpMonth,
    /// Expiry year, 4 digits (`2031`).
    ExpYear,
    /// Expiry year, 2 digits (`31`).
    ExpYy,
    /// Expiry as `MMYY` (`0431`).
    ExpMmyy,
    /// The cardholder name as stored.
    CardholderName,
    /// The security code: released once (the caller takes it from the
    /// holder only if [`Template::fields_of`] lists it).
    Cvc,
    /// First 6 digits.
    Bin,
    /// Last 4 digits.
    Last4,
}

impl Field {
    pub const ALL: [Field; 9] = [
        Field::Pan,
        Field::ExpMonth,
        Field::ExpYear,
        Field::ExpYy,
        Field::ExpMmyy,
        Field::CardholderName,
        Field::Cvc,
        Field::Bin,
        Field::Last4,
    ];

    pub fn parse(s: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Field::Pan => "pan",
            Field::ExpMonth => "exp_month",
            Field::ExpYear => "exp_year",
            Field::ExpYy => "exp_yy",
            Field::ExpMmyy => "exp_mmyy",
            Field::CardholderName => "cardholder_name",
            Field::Cvc => "cvc",
            Field::Bin => "bin",
            Field::Last4 => "last4",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of a card a field is formatted from. `Debug` shows nothing.
pub struct CardParts<'a> {
    pub pan: &'a Pan,
    pub expiry: Option<Expiry>,
    pub cardholder_name: Option<&'a CardholderName>,
    pub cvc: Option<&'a Cvc>,
}

impl fmt::Debug for CardParts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardParts([REDACTED])")
    }
}

/// The value of `field` for a card; None if the card lacks that part (no
/// name, no expiry, no code held). `bin` is the first 6 digits for every
/// length (what [`Pan::bin`] gives and what acquirers' `bin` fields mean;
/// the 8-digit BIN of PCI DSS 3.4.1 is a display rule, not a field).
pub fn format_field(field: Field, card: &CardParts<'_>) -> Option<Zeroizing<String>> {
    let two = |n: u16| Zeroizing::new(format!("{:02}", n % 100));
    Some(match field {
        Field::Pan => Zeroizing::new(card.pan.expose_digits().to_owned()),
        Field::Bin => Zeroizing::new(card.pan.bin()),
        Field::Last4 => Zeroizing::new(card.pan.last4()),
        Field::ExpMonth => two(u16::from(card.expiry?.month())),
        Field::ExpYear => Zeroizing::new(format!("{:04}", card.expiry?.year())),
        Field::ExpYy => two(card.expiry?.year()),
        Field::ExpMmyy => {
            let e = card.expiry?;
            Zeroizing::new(format!("{:02}{:02}", e.month(), e.year() % 100))
        }
        Field::CardholderName => Zeroizing::new(card.cardholder_name?.expose().to_owned()),
        Field::Cvc => Zeroizing::new(card.cvc?.expose().to_owned()),
    })
}

/// One placeholder: its byte range in the body, which token, which field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placeholder {
    range: (usize, usize),
    token: usize,
    field: Field,
}

/// A parsed request body with its placeholders. `Debug` shows the kind and
/// counts, never the body.
pub struct Template {
    kind: BodyKind,
    body: Zeroizing<Vec<u8>>,
    tokens: Vec<Token>,
    placeholders: Vec<Placeholder>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Template")
            .field("kind", &self.kind)
            .field("len", &self.body.len())
            .field("tokens", &self.tokens.len())
            .field("placeholders", &self.placeholders.len())
            .finish()
    }
}

/// The longest placeholder: `{{` + `tok_` and 22 characters + `.` +
/// `cardholder_name` + `}}`.
const MAX_PLACEHOLDER: usize = 2 + 26 + 1 + 15 + 2;

impl Template {
    /// Parse a body of `kind`. The body must be UTF-8 and:
    /// - JSON: valid JSON. A placeholder can then only be inside a string
    ///   (`{{` is nowhere else in valid JSON) and, having no `"` or `\`,
    ///   stays inside that one string. Braces written as escapes
    ///   (`\u007b`) do not make a placeholder; a placeholder with an
    ///   escape inside is malformed.
    /// - Form: every `%` followed by two hex digits.
    /// - XML: a light well-formedness check (tags balance and close,
    ///   comments, CDATA sections and processing instructions end, no
    ///   DOCTYPE), placeholders only in character data or quoted attribute
    ///   values: not in names, comments, CDATA or processing instructions.
    ///
    /// Every `{{` must start a placeholder `{{TOKEN.FIELD}}` (no spaces)
    /// whose token parses as a vault token and whose field is a [`Field`].
    pub fn parse(kind: BodyKind, body: &[u8]) -> Result<Template, TemplateError> {
        let text =
            std::str::from_utf8(body).map_err(|_| TemplateError::InvalidBody("not UTF-8"))?;
        match kind {
            BodyKind::Json => {
                serde_json::from_str::<serde::de::IgnoredAny>(text)
                    .map_err(|_| TemplateError::InvalidBody("not valid JSON"))?;
            }
            BodyKind::Form => check_form(body)?,
            BodyKind::Xml => {}
        }
        let mut tokens: Vec<Token> = Vec::new();
        let mut placeholders = Vec::new();
        let mut i = 0;
        while let Some(at) = find(body, b"{{", i) {
            let (token, field, end) = placeholder_at(body, at)?;
            let index = match tokens.iter().position(|t| *t == token) {
                Some(index) => index,
                None => {
                    if tokens.len() == MAX_TOKENS {
                        return Err(TemplateError::TooManyTokens);
                    }
                    tokens.push(token);
                    tokens.len() - 1
                }
            };
            placeholders.push(Placeholder {
                range: (at, end),
                token: index,
                field,
            });
            i = end;
        }
        if kind == BodyKind::Xml {
            check_xml(body, &placeholders)?;
        }
        Ok(Template {
            kind,
            body: Zeroizing::new(body.to_vec()),
            tokens,
            placeholders,
        })
    }

    pub fn kind(&self) -> BodyKind {
        self.kind
    }

    /// The distinct tokens, in order of first appearance.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The distinct fields used with `token`, in [`Field`] order (empty for
    /// a token not in the template).
    pub fn fields_of(&self, token: &Token) -> Vec<Field> {
        let Some(index) = self.tokens.iter().position(|t| t == token) else {
            return Vec::new();
        };
        let mut fields: Vec<Field> = self
            .placeholders
            .iter()
            .filter(|p| p.token == index)
            .map(|p| p.field)
            .collect();
        fields.sort_unstable();
        fields.dedup();
        fields
    }

    /// Number of placeholders (a token and field used twice count twice).
    pub fn placeholder_count(&self) -> usize {
        self.placeholders.len()
    }

    /// The body with every placeholder replaced by `values(token, field)`,
    /// escaped for the body's kind:
    /// - JSON: JSON string escaping (`"`, `\`, control characters, U+2028
    ///   and U+2029 as escapes; other non-ASCII as UTF-8);
    /// - form: percent-encoding of every byte but `A-Z a-z 0-9 - . _ ~`,
    ///   space as `+`;
    /// - XML: `&amp; &lt; &gt; &quot; &apos;`, tab, line feed and carriage
    ///   return as character references (kept in attribute values); other
    ///   control characters, U+FFFE and U+FFFF cannot be in XML 1.0:
    ///   `InvalidValue`.
    ///
    /// `values` is called once per placeholder, in body order, before
    /// anything is written. A None is `MissingValue`.
    pub fn render<V, F>(&self, mut values: F) -> Result<Zeroizing<Vec<u8>>, TemplateError>
    where
        V: AsRef<str>,
        F: FnMut(&Token, Field) -> Option<V>,
    {
        let mut got: Vec<V> = Vec::with_capacity(self.placeholders.len());
        let mut len = self.body.len();
        for p in &self.placeholders {
            let token = &self.tokens[p.token];
            let v = values(token, p.field).ok_or(TemplateError::MissingValue {
                offset: p.range.0,
                field: p.field,
            })?;
            let mut count = Count(0);
            escape(self.kind, v.as_ref(), &mut count).map_err(|()| {
                TemplateError::InvalidValue {
                    offset: p.range.0,
                    field: p.field,
                }
            })?;
            len = len - (p.range.1 - p.range.0) + count.0;
            got.push(v);
        }
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        let mut pos = 0;
        for (p, v) in self.placeholders.iter().zip(&got) {
            out.extend_from_slice(&self.body[pos..p.range.0]);
            // Checked above: cannot fail.
            let _ = escape(self.kind, v.as_ref(), &mut *out);
            pos = p.range.1;
        }
        out.extend_from_slice(&self.body[pos..]);
        debug_assert_eq!(out.len(), len);
        Ok(out)
    }
}

/// The first `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// The placeholder starting at `at` (where `{{` is): token, field, end.
fn placeholder_at(body: &[u8], at: usize) -> Result<(Token, Field, usize), TemplateError> {
    let bad = TemplateError::InvalidPlaceholder { offset: at };
    let start = at + 2;
    let inner_len = body[start..]
        .iter()
        .take(MAX_PLACEHOLDER)
        .position(|&c| !(c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')))
        .ok_or(bad)?;
    let end = start + inner_len;
    if body.get(end..end + 2) != Some(b"}}".as_slice()) {
        return Err(bad);
    }
    // Only ASCII bytes in the inner part: it is UTF-8.
    let inner = std::str::from_utf8(&body[start..end]).map_err(|_| bad)?;
    let (token, field) = inner.split_once('.').ok_or(bad)?;
    let token = Token::parse(token).ok_or(bad)?;
    let field = Field::parse(field).ok_or(bad)?;
    Ok((token, field, end + 2))
}

/// Where escaped bytes go: a counter first, then the buffer.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

struct Count(usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `value` escaped for `kind`; Err if it cannot be written there.
fn escape(kind: BodyKind, value: &str, out: &mut impl Sink) -> Result<(), ()> {
    match kind {
        BodyKind::Json => {
            for c in value.chars() {
                match c {
                    '"' => out.put(b"\\\""),
                    '\\' => out.put(b"\\\\"),
                    '\n' => out.put(b"\\n"),
                    '\r' => out.put(b"\\r"),
                    '\t' => out.put(b"\\t"),
                    c if u32::from(c) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                        let n = u32::from(c);
                        let hex = |shift: u32| HEX[((n >> shift) & 0xF) as usize];
                        out.put(&[b'\\', b'u', hex(12), hex(8), hex(4), hex(0)]);
                    }
                    c => out.put(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
                }
            }
        }
        BodyKind::Form => {
            for &b in value.as_bytes() {
                match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        out.put(&[b]);
                    }
                    b' ' => out.put(b"+"),
                    b => out.put(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xF)]]),
                }
            }
        }
        BodyKind::Xml => {
            for c in value.chars() {
                match c {
                    '&' => out.put(b"&amp;"),
                    '<' => out.put(b"&lt;"),
                    '>' => out.put(b"&gt;"),
                    '"' => out.put(b"&quot;"),
                    '\'' => out.put(b"&apos;"),
                    '\t' => out.put(b"&#9;"),
                    '\n' => out.put(b"&#10;"),
                    '\r' => out.put(b"&#13;"),
                    c if u32::from(c) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                        return Err(());
                    }
                    c => out.put(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
                }
            }
        }
    }
    Ok(())
}

/// A form body: every `%` starts a `%XX` escape.
fn check_form(body: &[u8]) -> Result<(), TemplateError> {
    for (i, &b) in body.iter().enumerate() {
        if b == b'%' {
            let ok = body
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if !ok {
                return Err(TemplateError::InvalidBody("malformed percent-encoding"));
            }
        }
    }
    Ok(())
}

/// Where the XML scanner is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Xml {
    Text,
    /// In a tag's name, from this byte; true for an end tag.
    Name(usize, bool),
    /// In a start tag after its name.
    Tag,
    /// In an end tag after its name.
    EndTag,
    /// In a quoted attribute value.
    Attr(u8),
    Comment,
    CData,
    Pi,
}

/// The light XML check of [`Template::parse`], and that every placeholder
/// is in character data or an attribute value. The literals the scanner
/// jumps over (`<!--`, `-->`, `<![CDATA[`, ...) hold no `{`, so it never
/// jumps over the start of a placeholder; a placeholder holds none of
/// `< > " ' & ? ]`, so it never changes the scanner's state.
fn check_xml(body: &[u8], placeholders: &[Placeholder]) -> Result<(), TemplateError> {
    let bad = TemplateError::InvalidBody;
    let mut stack: Vec<&[u8]> = Vec::new();
    let mut elements = 0usize;
    let mut next = placeholders.iter().peekable();
    let mut state = Xml::Text;
    let mut i = 0;
    while i < body.len() {
        if let Some(p) = next.next_if(|p| p.range.0 == i) {
            let text = state == Xml::Text && !stack.is_empty();
            if !(text || matches!(state, Xml::Attr(_))) {
                return Err(TemplateError::InvalidPlaceholder { offset: i });
            }
            i = p.range.1;
            continue;
        }
        let rest = &body[i..];
        let c = body[i];
        match state {
            Xml::Text => {
                if c == b'<' {
                    if rest.starts_with(b"<!--") {
                        state = Xml::Comment;
                        i += 4;
                    } else if rest.starts_with(b"<![CDATA[") {
                        if stack.is_empty() {
                            return Err(bad("CDATA outside the root element"));
                        }
                        state = Xml::CData;
                        i += 9;
                    } else if rest.starts_with(b"<?") {
                        state = Xml::Pi;
                        i += 2;
                    } else if rest.starts_with(b"<!") {
                        return Err(bad("DOCTYPE and declarations are not accepted"));
                    } else if rest.starts_with(b"</") {
                        state = Xml::Name(i + 2, true);
                        i += 2;
                    } else {
                        if stack.is_empty() && elements > 0 {
                            return Err(bad("more than one root element"));
                        }
                        state = Xml::Name(i + 1, false);
                        i += 1;
                    }
                    continue;
                }
            }
            Xml::Name(start, end_tag) => {
                if c.is_ascii_whitespace() || c == b'/' || c == b'>' {
                    let name = &body[start..i];
                    if name.is_empty() {
                        return Err(bad("a tag without a name"));
                    }
                    if end_tag {
                        if stack.pop() != Some(name) {
                            return Err(bad("end tag does not match its start tag"));
                        }
                        state = Xml::EndTag;
                    } else {
                        stack.push(name);
                        elements += 1;
                        state = Xml::Tag;
                    }
                    continue;
                }
                if matches!(c, b'<' | b'"' | b'\'' | b'=' | b'&') {
                    return Err(bad("invalid character in a tag name"));
                }
            }
            Xml::Tag => match c {
                b'>' => state = Xml::Text,
                b'/' if rest.starts_with(b"/>") => {
                    stack.pop();
                    state = Xml::Text;
                    i += 2;
                    continue;
                }
                b'"' | b'\'' => state = Xml::Attr(c),
                b'<' | b'&' | b'/' => return Err(bad("invalid character in a tag")),
                _ => {}
            },
            Xml::EndTag => match c {
                b'>' => state = Xml::Text,
                c if c.is_ascii_whitespace() => {}
                _ => return Err(bad("invalid character in an end tag")),
            },
            Xml::Attr(q) => {
                if c == q {
                    state = Xml::Tag;
                } else if c == b'<' {
                    return Err(bad("'<' in an attribute value"));
                }
            }
            Xml::Comment => {
                if rest.starts_with(b"-->") {
                    state = Xml::Text;
                    i += 3;
                    continue;
                }
            }
            Xml::CData => {
                if rest.starts_with(b"]]>") {
                    state = Xml::Text;
                    i += 3;
                    continue;
                }
            }
            Xml::Pi => {
                if rest.starts_with(b"?>") {
                    state = Xml::Text;
                    i += 2;
                    continue;
                }
            }
        }
        i += 1;
    }
    if state != Xml::Text || !stack.is_empty() {
        return Err(bad("unterminated markup"));
    }
    if elements == 0 {
        return Err(bad("no root element"));
    }
    Ok(())
}

// ---------------------------------------------------------------------
// The response side.

/// A card number found in a response: where it is and what it is.
/// `Debug` shows the range only (the [`Pan`] is redacted).
#[derive(Debug)]
pub struct Found {
    range: Range<usize>,
    pan: Pan,
}

impl Found {
    /// Its bytes in the scanned body, separators included.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The card number, to tokenize.
    pub fn pan(&self) -> &Pan {
        &self.pan
    }
}

/// The card numbers in a response body (any content type, any bytes).
///
/// A *group* is a maximal run of ASCII digits; groups separated by exactly
/// one separator form a *chain*. A separator is a space, a dash, a plus
/// (a space in a form) or `%20` (a space percent-encoded), mixed freely
/// (`4111 1111-1111 1111`); two separators in a row end the chain. A card number is a sequence of whole consecutive groups of one
/// chain, 12 to 19 digits in all, passing the Luhn check: so a card
/// number is never cut out of a longer run of digits (a 20-digit run, or a
/// card number glued to other digits, is not one), but one followed by a
/// date or an amount after a space (`4111111111111111 12 2030`) is found.
/// From each group, left to right, the longest such sequence is taken;
/// the scan goes on after it.
///
/// Found numbers never overlap and come in body order. After
/// [`replace_card_numbers`], no sequence of the output is a card number
/// (checked there).
pub fn find_card_numbers(body: &[u8]) -> Vec<Found> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < body.len() {
        if !body[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A chain: its groups as byte ranges.
        let mut groups: Vec<Range<usize>> = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < body.len() && body[j].is_ascii_digit() {
                j += 1;
            }
            groups.push(start..j);
            match separator_at(body, j) {
                Some(n) => j += n,
                None => break,
            }
        }
        let mut g = 0;
        while g < groups.len() {
            match longest_card_from(body, &groups[g..]) {
                Some((n, pan)) => {
                    found.push(Found {
                        range: groups[g].start..groups[g + n - 1].end,
                        pan,
                    });
                    g += n;
                }
                None => g += 1,
            }
        }
        i = j;
    }
    found
}

/// The length of the separator at `j` if a digit follows it.
fn separator_at(body: &[u8], j: usize) -> Option<usize> {
    let len = match body.get(j)? {
        b' ' | b'-' | b'+' => 1,
        b'%' if body.get(j + 1..j + 3) == Some(b"20".as_slice()) => 3,
        _ => return None,
    };
    body.get(j + len)
        .filter(|c| c.is_ascii_digit())
        .map(|_| len)
}

/// The longest card number made of the first groups of `groups`: how many
/// groups, and the number.
fn longest_card_from(body: &[u8], groups: &[Range<usize>]) -> Option<(usize, Pan)> {
    let mut digits = Zeroizing::new(Vec::with_capacity(19));
    let mut best = None;
    for (n, g) in groups.iter().enumerate() {
        if digits.len() + g.len() > 19 {
            break;
        }
        digits.extend_from_slice(&body[g.clone()]);
        if digits.len() >= 12 && luhn_valid(&digits) {
            best = Some(n + 1);
        }
    }
    let n = best?;
    let mut digits = Zeroizing::new(String::with_capacity(19));
    for g in &groups[..n] {
        digits.extend(body[g.clone()].iter().map(|&b| char::from(b)));
    }
    Pan::parse(&digits).ok().map(|pan| (n, pan))
}

/// Why the found card numbers could not be replaced. Never shows data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplaceError {
    #[error("the card numbers found and the tokens given do not match this body")]
    Mismatch,
    #[error("a replacement would make a card-like number in the output")]
    CardLikeOutput,
}

impl ReplaceError {
    pub fn code(&self) -> &'static str {
        match self {
            ReplaceError::Mismatch => "replace_mismatch",
            ReplaceError::CardLikeOutput => "card_like_output",
        }
    }
}

/// `body` with each found card number replaced by its token (`tokens[i]`
/// for `found[i]`, as [`find_card_numbers`] returned them for this body).
///
/// `kind` is the response's kind (None: text, or anything else). For JSON,
/// a number that is a bare JSON number (not in a string) is replaced, with
/// the whole number token around it (sign, fraction, exponent), by a quoted
/// string: `{"pan":4111111111111111}` becomes `{"pan":"tok_..."}`, still
/// valid JSON, with a string where the acquirer wrote a number. Everywhere
/// else the token replaces the digits and their separators in place:
/// tokens need no escaping in a JSON string, a form or XML.
///
/// The output is scanned again: if a replacement made a card number (a
/// pan-shaped token next to other digits can), `CardLikeOutput`, and the
/// caller fails the call or retries with other tokens (random tokens
/// cannot, unless they hold digits at their end).
pub fn replace_card_numbers(
    body: &[u8],
    kind: Option<BodyKind>,
    found: &[Found],
    tokens: &[Token],
) -> Result<Vec<u8>, ReplaceError> {
    if found.len() != tokens.len() {
        return Err(ReplaceError::Mismatch);
    }
    let mut out = Vec::with_capacity(body.len() + 16 * found.len());
    let mut pos = 0;
    let mut json = JsonStrings::default();
    // Bare JSON numbers are quoted only in valid JSON: there a number is
    // followed by a delimiter, so taking the whole number never cuts a
    // separator in half (in `[4111111111111111.14111%201511...`, not JSON,
    // taking `.14111` would leave `%201511` to read as digits `201511`: a
    // fuzz find). Anything else is text: the digits are replaced in place.
    let valid_json = kind == Some(BodyKind::Json)
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    // The end of the last range found (they never overlap).
    let mut last_end = 0;
    for (f, token) in found.iter().zip(tokens) {
        let r = f.range();
        let same = r.start >= last_end
            && body
                .get(r.clone())
                .is_some_and(|b| same_digits(b, f.pan.expose_digits().as_bytes()));
        if !same {
            return Err(ReplaceError::Mismatch);
        }
        last_end = r.end;
        if r.end <= pos {
            // Inside the JSON number just replaced (`4111111111111111e4111111111111111`).
            continue;
        }
        let bare = valid_json && !json.in_string_at(body, r.start);
        let (start, end) = if bare {
            let number =
                |b: &u8| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
            let before = body
                .get(pos..r.start)
                .map_or(0, |b| b.iter().rev().take_while(|b| number(b)).count());
            let after = body[r.end..].iter().take_while(|b| number(b)).count();
            (r.start - before, r.end + after)
        } else {
            (r.start, r.end)
        };
        // Past what a JSON number before took (not valid JSON, then).
        let start = start.max(pos);
        let quote = bare;
        out.extend_from_slice(&body[pos..start]);
        if quote {
            out.push(b'"');
        }
        out.extend_from_slice(token.as_str().as_bytes());
        if quote {
            out.push(b'"');
        }
        pos = end;
        // A `%20` that separated this number from more digits would, once
        // the number is gone, read as the digits `20` joined to what
        // follows (a new card-like run, a fuzz find): it is written as the
        // space it encodes, `+` in a form.
        if !quote
            && body.get(pos..pos + 3) == Some(b"%20".as_slice())
            && body.get(pos + 3).is_some_and(u8::is_ascii_digit)
        {
            out.push(if kind == Some(BodyKind::Form) {
                b'+'
            } else {
                b' '
            });
            pos += 3;
        }
    }
    out.extend_from_slice(&body[pos..]);
    if !find_card_numbers(&out).is_empty() {
        return Err(ReplaceError::CardLikeOutput);
    }
    Ok(out)
}

/// Whether `range`, a found card number with its separators, holds
/// exactly `digits` (the `2` and `0` of a `%20` are not digits of it).
fn same_digits(range: &[u8], digits: &[u8]) -> bool {
    let mut i = 0;
    let mut n = 0;
    while i < range.len() {
        match range[i] {
            b'%' => i += 3,
            c if c.is_ascii_digit() => {
                if digits.get(n) != Some(&c) {
                    return false;
                }
                n += 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    n == digits.len()
}

/// Whether a byte of a JSON text is inside a string, walking forward only.
#[derive(Default)]
struct JsonStrings {
    at: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonStrings {
    fn in_string_at(&mut self, body: &[u8], target: usize) -> bool {
        while self.at < target && self.at < body.len() {
            let c = body[self.at];
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if c == b'\\' {
                    self.escaped = true;
                } else if c == b'"' {
                    self.in_string = false;
                }
            } else if c == b'"' {
                self.in_string = true;
            }
            self.at += 1;
        }
        self.in_string
    }
}

#[cfg(test)]
#[path = "forward_tests.rs"]
mod tests;
