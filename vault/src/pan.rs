//! The primary account number (PAN): parsed once, held in zeroizing memory,
//! never printed.

use std::fmt;

use zeroize::Zeroizing;

use crate::brand::Brand;

/// Why a string is not a PAN. Messages describe the problem and never repeat
/// the input (not even a part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PanError {
    #[error("card number is empty")]
    Empty,
    #[error("card number may contain only digits, spaces and dashes")]
    InvalidCharacter,
    #[error("card number has {0} digits; it must have 12 to 19")]
    Length(usize),
    #[error("card number fails the Luhn check")]
    Luhn,
}

/// A validated card number: 12 to 19 ASCII digits passing the Luhn check.
///
/// - The only way in is [`Pan::parse`].
/// - The digits are wiped from memory on drop.
/// - `Debug` prints a redaction; there is no `Display`, `Serialize` or `Clone`.
/// - The digits come out only through [`Pan::expose_digits`]: grep for it.
pub struct Pan {
    digits: Zeroizing<String>,
}

impl Pan {
    /// Parse a card number typed by a person: spaces and dashes are ignored.
    pub fn parse(input: &str) -> Result<Pan, PanError> {
        let mut digits = Zeroizing::new(String::with_capacity(input.len().min(32)));
        for c in input.chars() {
            match c {
                '0'..='9' => {
                    if digits.len() == 19 {
                        // Keep counting without growing the buffer.
                        let total = input.chars().filter(char::is_ascii_digit).count();
                        if input
                            .chars()
                            .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
                        {
                            return Err(PanError::Length(total));
                        }
                        return Err(PanError::InvalidCharacter);
                    }
                    digits.push(c);
                }
                ' ' | '-' => {}
                _ => return Err(PanError::InvalidCharacter),
            }
        }
        if digits.is_empty() {
            return Err(PanError::Empty);
        }
        if digits.len() < 12 {
            return Err(PanError::Length(digits.len()));
        }
        if !luhn_valid(digits.as_bytes()) {
            return Err(PanError::Luhn);
        }
        Ok(Pan { digits })
    }

    /// The digits of the card number. Every call site is a place where card
    /// data is handled in clear: keep them few and reviewed.
    pub fn expose_digits(&self) -> &str {
        &self.digits
    }

    /// Number of digits (12 to 19).
    pub fn len(&self) -> usize {
        self.digits.len()
    }

    /// Always false: a `Pan` has at least 12 digits.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Issuer identification number, first 6 digits. Safe to show: PCI DSS
    /// 3.4.1 allows BIN and last four to be displayed.
    pub fn bin(&self) -> String {
        self.digits[..6].to_owned()
    }

    /// Last four digits. Safe to show (PCI DSS 3.4.1).
    pub fn last4(&self) -> String {
        self.digits[self.digits.len() - 4..].to_owned()
    }

    /// `411111******1111`: at most first six and last four in clear.
    pub fn masked(&self) -> String {
        masked_form(&self.bin(), &self.last4(), self.len())
    }

    /// Card brand from the number's prefix.
    pub fn brand(&self) -> Brand {
        Brand::from_digits(&self.digits)
    }
}

/// The masked form from the parts that may be shown in clear.
pub fn masked_form(bin: &str, last4: &str, len: usize) -> String {
    let stars = len.saturating_sub(bin.len() + last4.len());
    let mut s = String::with_capacity(len);
    s.push_str(bin);
    s.extend(std::iter::repeat_n('*', stars));
    s.push_str(last4);
    s
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pan([REDACTED])")
    }
}

/// Luhn (mod 10) check over ASCII digits. Non-digits make it fail.
pub fn luhn_valid(digits: &[u8]) -> bool {
    !digits.is_empty() && luhn_sum(digits).is_some_and(|sum| sum.is_multiple_of(10))
}

/// `payload` with the one Luhn check digit appended that makes it pass (for
/// generating test card numbers from a test BIN); None if it holds a
/// non-digit.
pub fn with_check_digit(payload: &str) -> Option<String> {
    let sum = luhn_sum(format!("{payload}0").as_bytes())?;
    Some(format!("{payload}{}", (10 - sum % 10) % 10))
}

/// The Luhn sum of ASCII digits (every second digit from the right doubled,
/// digits of the product added); None on a non-digit.
fn luhn_sum(digits: &[u8]) -> Option<u32> {
    let mut sum = 0u32;
    for (i, &c) in digits.iter().rev().enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        let mut d = u32::from(c - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    Some(sum)
}

/// Whether free text (a reason, a tenant, a name that will be stored in clear)
/// contains something that looks like a card number: a run of 12 to 19 digits,
/// possibly separated by single spaces or dashes, that passes the Luhn check,
/// or a longer run of digits with such a number anywhere inside it.
/// Used to keep card numbers out of clear-text fields and the audit trail.
pub fn contains_pan_like(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // Collect a run of digits with single separators.
        let mut run = Zeroizing::new(Vec::with_capacity(32));
        let mut j = i;
        while j < bytes.len() {
            let c = bytes[j];
            if c.is_ascii_digit() {
                run.push(c);
                j += 1;
            } else if (c == b' ' || c == b'-')
                && j + 1 < bytes.len()
                && bytes[j + 1].is_ascii_digit()
            {
                j += 1;
            } else {
                break;
            }
        }
        // A run of card-number length is checked as a whole; a longer run is
        // checked window by window, since a card number may hide inside it.
        if (12..=19).contains(&run.len()) {
            if luhn_valid(&run) {
                return true;
            }
        } else if run.len() > 19 {
            for start in 0..run.len() {
                for len in 12..=19 {
                    if start + len <= run.len() && luhn_valid(&run[start..start + len]) {
                        return true;
                    }
                }
            }
        }
        i = j.max(i + 1);
    }
    false
}

/// The public test card numbers (shared/test-cards.md), for the crate's
/// tests.
#[cfg(test)]
pub(crate) const TEST_CARDS: &[&str] = &[
    "4111111111111111",
    "4242424242424242",
    "4012888888881881",
    "4000056655665556",
    "5555555555554444",
    "5105105105105100",
    "5200828282828210",
    "2223003122003222",
    "378282246310005",
    "371449635398431",
    "6011111111111117",
    "6011000990139424",
    "3530111333300000",
    "3566002020360505",
    "6200000000000005",
    "36227206271667",
    "30569309025904",
    "6759649826438453",
    "2200000000000004",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Public test card numbers (shared/test-cards.md): all Luhn-valid.
    const VALID: &[&str] = TEST_CARDS;
    const LUHN_INVALID: &[&str] = &["4111111111111112", "5555555555554443"];

    #[test]
    fn reference_numbers() {
        for n in VALID {
            assert!(luhn_valid(n.as_bytes()), "{n}");
            assert!(Pan::parse(n).is_ok());
        }
        for n in LUHN_INVALID {
            assert!(!luhn_valid(n.as_bytes()));
            assert_eq!(Pan::parse(n).unwrap_err(), PanError::Luhn);
        }
    }

    #[test]
    fn separators_are_stripped_other_characters_are_not() {
        let p = Pan::parse(" 4111 1111-1111 1111 ").unwrap();
        assert_eq!(p.expose_digits(), "4111111111111111");
        assert_eq!(p.bin(), "411111");
        assert_eq!(p.last4(), "1111");
        assert_eq!(p.masked(), "411111******1111");
        assert_eq!(
            Pan::parse("378282246310005").unwrap().masked(),
            "378282*****0005"
        );
        for bad in [
            "4111.1111.1111.1111",
            "4111111111111111\0",
            "４１１１",
            "41111111111111a1",
        ] {
            assert_eq!(
                Pan::parse(bad).unwrap_err(),
                PanError::InvalidCharacter,
                "{bad:?}"
            );
        }
        assert_eq!(Pan::parse("").unwrap_err(), PanError::Empty);
        assert_eq!(Pan::parse(" - ").unwrap_err(), PanError::Empty);
        assert_eq!(Pan::parse("42424242424").unwrap_err(), PanError::Length(11));
        assert_eq!(
            Pan::parse(&"4".repeat(25)).unwrap_err(),
            PanError::Length(25)
        );
    }

    #[test]
    fn debug_and_errors_never_show_digits() {
        let p = Pan::parse("4111111111111111").unwrap();
        assert_eq!(format!("{p:?}"), "Pan([REDACTED])");
        for bad in [
            "4111111111111112",
            "4111111111111111x",
            "41111111111111111111",
        ] {
            let e = Pan::parse(bad).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("1111"), "{shown}");
        }
    }

    #[test]
    fn pan_like_detection() {
        assert!(contains_pan_like("refund for 4111111111111111 ok"));
        assert!(contains_pan_like("card 4111-1111-1111-1111"));
        assert!(contains_pan_like("card 4111 1111 1111 1111."));
        assert!(contains_pan_like("ref 0000099378282246310005"));
        assert!(!contains_pan_like("order 123456789012"));
        assert!(!contains_pan_like("order 12345 for 2030-12"));
        assert!(!contains_pan_like("4111111111111112"));
        assert!(!contains_pan_like("shop-42"));
    }

    /// Reference Luhn: compute the check digit the textbook way.
    fn check_digit(payload: &[u8]) -> u8 {
        let mut sum = 0u32;
        for (i, &d) in payload.iter().rev().enumerate() {
            let mut v = u32::from(d);
            if i % 2 == 0 {
                v *= 2;
                if v > 9 {
                    v -= 9;
                }
            }
            sum += v;
        }
        u8::try_from((10 - sum % 10) % 10).unwrap()
    }

    proptest! {
        #[test]
        fn luhn_accepts_exactly_the_right_check_digit(
            payload in proptest::collection::vec(0u8..10, 11..19),
            wrong in 1u8..10,
        ) {
            let good = check_digit(&payload);
            let mut s: Vec<u8> = payload.iter().map(|d| b'0' + d).collect();
            let text = String::from_utf8(s.clone()).unwrap();
            s.push(b'0' + good);
            prop_assert!(luhn_valid(&s));
            prop_assert_eq!(with_check_digit(&text).map(String::into_bytes), Some(s.clone()));
            let last = s.len() - 1;
            s[last] = b'0' + (good + wrong) % 10;
            prop_assert!(!luhn_valid(&s));
        }

        #[test]
        fn any_single_digit_change_fails_luhn(
            payload in proptest::collection::vec(0u8..10, 11..19),
            pos in any::<prop::sample::Index>(),
            delta in 1u8..10,
        ) {
            let mut s: Vec<u8> = payload.iter().map(|d| b'0' + d).collect();
            s.push(b'0' + check_digit(&payload));
            let i = pos.index(s.len());
            s[i] = b'0' + ((s[i] - b'0') + delta) % 10;
            prop_assert!(!luhn_valid(&s));
        }

        #[test]
        fn parse_never_panics_and_errors_never_echo(input in "\\PC{0,40}") {
            if let Err(e) = Pan::parse(&input) {
                let shown = e.to_string();
                if input.len() >= 4 && input.chars().all(|c| c.is_ascii_digit()) {
                    prop_assert!(!shown.contains(&input));
                }
            }
        }
    }
}
