//! Validated card attributes other than the PAN, tenants and token ids.

use std::fmt;

use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::pan::contains_pan_like;

/// Why card data (other than the PAN) or an identifier is invalid. Messages
/// never repeat the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CardDataError {
    #[error("expiry month must be 1 to 12")]
    ExpiryMonth,
    #[error("expiry year must be a four-digit year within 50 years from now")]
    ExpiryYear,
    #[error("card expired: the expiry date is before the current month")]
    Expired,
    #[error("cardholder name must be 1 to 64 printable characters")]
    CardholderName,
    #[error("cardholder name must not contain a card number")]
    CardholderNameHasPan,
}

/// Why a tenant id is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "tenant must be 1 to 64 characters of A-Z a-z 0-9 _ . - and must not look like a card number"
)]
pub struct TenantError;

/// A tenant id: 1 to 64 characters of `[A-Za-z0-9_.-]`, never a card number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    pub fn parse(s: &str) -> Result<Tenant, TenantError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
            && !contains_pan_like(s);
        if ok {
            Ok(Tenant(s.to_owned()))
        } else {
            Err(TenantError)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Card expiry: month and four-digit year, not before the current month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    month: u8,
    year: u16,
}

impl Expiry {
    /// Validate against the current UTC month.
    pub fn new(month: i64, year: i64) -> Result<Expiry, CardDataError> {
        Self::new_at(month, year, OffsetDateTime::now_utc())
    }

    /// Validate against a given "now" (for tests).
    pub fn new_at(month: i64, year: i64, now: OffsetDateTime) -> Result<Expiry, CardDataError> {
        let month = u8::try_from(month)
            .ok()
            .filter(|m| (1..=12).contains(m))
            .ok_or(CardDataError::ExpiryMonth)?;
        let this_year = i64::from(now.year());
        if !(1000..=9999).contains(&year) || year > this_year + 50 {
            return Err(CardDataError::ExpiryYear);
        }
        let this_month = i64::from(u8::from(now.month()));
        if year < this_year || (year == this_year && i64::from(month) < this_month) {
            return Err(CardDataError::Expired);
        }
        let year = u16::try_from(year).map_err(|_| CardDataError::ExpiryYear)?;
        Ok(Expiry { month, year })
    }

    /// An expiry read back from storage: checked for shape, not for the past.
    pub(crate) fn from_stored(month: u8, year: u16) -> Option<Expiry> {
        ((1..=12).contains(&month)).then_some(Expiry { month, year })
    }

    pub fn month(self) -> u8 {
        self.month
    }

    pub fn year(self) -> u16 {
        self.year
    }
}

/// Later is greater: by year, then month.
impl PartialOrd for Expiry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Expiry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.year, self.month).cmp(&(other.year, other.month))
    }
}

/// Cardholder name: 1 to 64 printable characters. Stored encrypted; zeroized
/// on drop; `Debug` is redacted.
#[derive(Clone)]
pub struct CardholderName(Zeroizing<String>);

impl CardholderName {
    pub fn parse(s: &str) -> Result<CardholderName, CardDataError> {
        let count = s.chars().count();
        let printable = s
            .chars()
            .all(|c| !c.is_control() && !is_invisible_format(c));
        if count == 0 || count > 64 || !printable || s.trim().is_empty() {
            return Err(CardDataError::CardholderName);
        }
        if contains_pan_like(s) {
            return Err(CardDataError::CardholderNameHasPan);
        }
        Ok(CardholderName(Zeroizing::new(s.to_owned())))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Unicode format characters that render as nothing (bidi overrides, zero
/// widths): not "printable" for a name on a card.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

impl fmt::Debug for CardholderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardholderName([REDACTED])")
    }
}

/// A token id. Either `tok_` + 22 characters of the URL-safe base64
/// alphabet (a millisecond time prefix and 84 random bits, see
/// [`Token::generate`]; the default, [`TokenFormat::Random`]), or a pan-shaped token
/// ([`TokenFormat::PanShaped`]): as many digits as the card number, its
/// first six and last four, random digits between, and a Luhn check that
/// always fails, so that no system can take it for a card number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

/// Random bits in a token (after its time prefix).
pub const TOKEN_RANDOM_BITS: u32 = 6 * TOKEN_RANDOM_CHARS as u32;

/// The characters of a random token's body (base64url's, in ASCII order),
/// so that a prefix encoding a number sorts as text as the number does.
const TOKEN_ALPHABET: &[u8; 64] =
    b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";
/// Characters of the time prefix: 48 bits of milliseconds since 1970.
const TOKEN_TIME_CHARS: usize = 8;
/// Characters drawn from the CSPRNG after the time prefix.
const TOKEN_RANDOM_CHARS: usize = 14;

/// How a new token looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenFormat {
    #[default]
    Random,
    PanShaped,
}

impl TokenFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenFormat::Random => "random",
            TokenFormat::PanShaped => "pan_shaped",
        }
    }

    pub fn parse(s: &str) -> Option<TokenFormat> {
        match s {
            "random" => Some(TokenFormat::Random),
            "pan_shaped" => Some(TokenFormat::PanShaped),
            _ => None,
        }
    }

    /// The format of a stored token.
    pub fn of(token: &str) -> TokenFormat {
        if token.starts_with("tok_") {
            TokenFormat::Random
        } else {
            TokenFormat::PanShaped
        }
    }
}

/// How many pan-shaped tokens one BIN, last four and length have: the
/// middle digits (length - 10) that make the number fail the Luhn check,
/// nine in ten of them (of each ten middles differing in one digit, exactly
/// one passes). A 16-digit card: 900,000; a 12-digit card: 90.
pub fn pan_shaped_space(pan_len: usize) -> u64 {
    let middle = u32::try_from(pan_len.saturating_sub(10)).unwrap_or(0);
    9 * 10u64.saturating_pow(middle.saturating_sub(1)) * u64::from(middle > 0)
}

impl Token {
    /// A new token: `tok_`, the time in milliseconds (8 characters, 48
    /// bits), then 84 bits from the OS CSPRNG (14 characters). Never
    /// derived from card data. Like a ULID, tokens made later sort later:
    /// the token indexes (the cards' and the audit trail's) then grow at
    /// their right edge, and a group commit of new cards dirties a few
    /// adjacent index pages instead of one random page per card. The cost:
    /// a token tells when it was made; 84 random bits per millisecond keep
    /// it unguessable.
    pub fn generate() -> Result<Token, getrandom::Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Self::generate_at(u64::try_from(now).unwrap_or(u64::MAX))
    }

    /// [`Token::generate`] at `unix_ms` (its low 48 bits).
    fn generate_at(unix_ms: u64) -> Result<Token, getrandom::Error> {
        let mut out = String::with_capacity(4 + TOKEN_TIME_CHARS + TOKEN_RANDOM_CHARS);
        out.push_str("tok_");
        for i in (0..TOKEN_TIME_CHARS).rev() {
            let six = (unix_ms >> (6 * i)) & 63;
            out.push(char::from(TOKEN_ALPHABET[six as usize]));
        }
        let mut raw = [0u8; TOKEN_RANDOM_CHARS];
        getrandom::getrandom(&mut raw)?;
        // 256 is a multiple of 64: the low six bits of a byte are uniform.
        for b in raw {
            out.push(char::from(TOKEN_ALPHABET[usize::from(b & 63)]));
        }
        Ok(Token(out))
    }

    /// A new pan-shaped token for `pan`: its BIN and last four around
    /// middle digits drawn from the OS CSPRNG (never from the card number),
    /// redrawn until the whole fails the Luhn check (nine draws in ten
    /// succeed at once). Unique only by the store's primary key: the caller
    /// checks and draws again.
    pub fn pan_shaped(pan: &crate::Pan) -> Result<Token, getrandom::Error> {
        let len = pan.len();
        let middle = len.saturating_sub(10);
        loop {
            let mut digits = String::with_capacity(len);
            digits.push_str(&pan.bin());
            let mut raw = [0u8; 16];
            getrandom::getrandom(&mut raw[..middle])?;
            for b in &raw[..middle] {
                // 250 = 25 x 10: reject above it to keep the digits uniform.
                let mut b = *b;
                while b >= 250 {
                    let mut one = [0u8; 1];
                    getrandom::getrandom(&mut one)?;
                    b = one[0];
                }
                digits.push(char::from(b'0' + b % 10));
            }
            digits.push_str(&pan.last4());
            if !crate::pan::luhn_valid(digits.as_bytes()) {
                return Ok(Token(digits));
            }
        }
    }

    /// Accept only the exact shape of a token; anything else is "not found".
    pub fn parse(s: &str) -> Option<Token> {
        if let Some(body) = s.strip_prefix("tok_") {
            let ok = body.len() == 22
                && body
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
            return ok.then(|| Token(s.to_owned()));
        }
        // Pan-shaped: 12 to 19 digits that fail the Luhn check (a number
        // that passes is a card number, never a token).
        let ok = (12..=19).contains(&s.len())
            && s.bytes().all(|c| c.is_ascii_digit())
            && !crate::pan::luhn_valid(s.as_bytes());
        ok.then(|| Token(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn format(&self) -> TokenFormat {
        TokenFormat::of(&self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use time::macros::datetime;

    #[test]
    fn expiry_rules() {
        let now = datetime!(2026-11-27 12:00 UTC);
        assert!(Expiry::new_at(11, 2026, now).is_ok(), "this month is valid");
        assert!(Expiry::new_at(12, 2026, now).is_ok());
        assert!(Expiry::new_at(1, 2027, now).is_ok());
        assert_eq!(Expiry::new_at(10, 2026, now), Err(CardDataError::Expired));
        assert_eq!(Expiry::new_at(12, 2025, now), Err(CardDataError::Expired));
        assert_eq!(
            Expiry::new_at(0, 2030, now),
            Err(CardDataError::ExpiryMonth)
        );
        assert_eq!(
            Expiry::new_at(13, 2030, now),
            Err(CardDataError::ExpiryMonth)
        );
        assert_eq!(
            Expiry::new_at(-1, 2030, now),
            Err(CardDataError::ExpiryMonth)
        );
        assert_eq!(Expiry::new_at(1, 30, now), Err(CardDataError::ExpiryYear));
        assert_eq!(Expiry::new_at(1, 2077, now), Err(CardDataError::ExpiryYear));
        assert_eq!(
            Expiry::new_at(1, i64::MAX, now),
            Err(CardDataError::ExpiryYear)
        );
    }

    #[test]
    fn tenant_rules() {
        for ok in ["shop-42", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(Tenant::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "shop 42",
            "shop/42",
            "é",
            &"x".repeat(65),
            "4111111111111111",
            "t\0",
        ] {
            assert!(Tenant::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(CardholderName::parse("Jane Q. Doe").is_ok());
        assert!(CardholderName::parse("Łukasz Żółć").is_ok());
        assert!(CardholderName::parse(&"é".repeat(64)).is_ok());
        for bad in ["", "   ", "a\nb", "a\0", "a\u{202E}b", &"a".repeat(65)] {
            assert_eq!(
                CardholderName::parse(bad).unwrap_err(),
                CardDataError::CardholderName,
                "{bad:?}"
            );
        }
        assert_eq!(
            CardholderName::parse("4111 1111 1111 1111").unwrap_err(),
            CardDataError::CardholderNameHasPan
        );
        assert_eq!(
            format!("{:?}", CardholderName::parse("Jane").unwrap()),
            "CardholderName([REDACTED])"
        );
    }

    #[test]
    fn tokens_sort_by_the_time_they_were_made_and_differ_within_a_millisecond() {
        let a = Token::generate_at(1_764_800_000_000).unwrap();
        let b = Token::generate_at(1_764_800_000_001).unwrap();
        let c = Token::generate_at(1_764_800_000_000 + (1 << 30)).unwrap();
        assert!(a.as_str() < b.as_str() && b.as_str() < c.as_str());
        assert_eq!(
            &a.as_str()[..12],
            &Token::generate_at(1_764_800_000_000).unwrap().as_str()[..12]
        );
        let many: std::collections::HashSet<String> = (0..10_000)
            .map(|_| Token::generate_at(1_764_800_000_000).unwrap().0)
            .collect();
        assert_eq!(many.len(), 10_000, "84 random bits per millisecond");
        for t in &many {
            assert!(Token::parse(t).is_some(), "{t}");
        }
        // Every character of the random part is used.
        let used: std::collections::HashSet<u8> = many
            .iter()
            .flat_map(|t| t.as_bytes()[12..].to_vec())
            .collect();
        assert_eq!(used.len(), 64);
        assert_eq!(TOKEN_RANDOM_BITS, 84);
    }

    #[test]
    fn tokens() {
        let t = Token::generate().unwrap();
        assert!(Token::parse(t.as_str()).is_some());
        assert_ne!(t, Token::generate().unwrap());
        for bad in [
            "",
            "tok_",
            "tok_abc",
            "tok_../../etc/passwd00000",
            "xok_AAAAAAAAAAAAAAAAAAAAAA",
            "tok_AAAAAAAAAAAAAAAAAAAAA=",
            "4111111111111111",
            "41111111111",
            "41111111111111111112",
        ] {
            assert!(Token::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn pan_shaped_tokens_keep_bin_and_last_four_and_fail_luhn() {
        for number in ["4111111111111111", "378282246310005", "36227206271667"] {
            let pan = crate::Pan::parse(number).unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..500 {
                let t = Token::pan_shaped(&pan).unwrap();
                let s = t.as_str();
                assert_eq!(s.len(), number.len());
                assert_eq!(&s[..6], &number[..6]);
                assert_eq!(&s[s.len() - 4..], &number[number.len() - 4..]);
                assert!(!crate::pan::luhn_valid(s.as_bytes()), "{s}");
                assert_ne!(s, number);
                assert_eq!(Token::parse(s).as_ref(), Some(&t));
                assert_eq!(t.format(), TokenFormat::PanShaped);
                seen.insert(s.to_owned());
            }
            assert!(seen.len() > 450, "draws repeat too often: {}", seen.len());
        }
        assert_eq!(pan_shaped_space(16), 900_000);
        assert_eq!(pan_shaped_space(12), 90);
        assert_eq!(pan_shaped_space(19), 900_000_000);
    }
}
