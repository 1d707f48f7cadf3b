//! The card-number parser and the code around it: `Pan::parse`, Luhn,
//! brand detection, the PAN-like detector, and the other card fields'
//! parsers. Never a panic; a parsed PAN is 12-19 digits passing Luhn whose
//! digits parse again to the same PAN; errors never repeat the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vault::pan::{contains_pan_like, luhn_valid, masked_form};
use vault::{Brand, CardDataError, CardholderName, Expiry, Pan, Tenant, Token};

/// Textbook Luhn, independent of the code under test.
fn reference_luhn(digits: &[u8]) -> bool {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let d = d * 2;
                if d > 9 {
                    d - 9
                } else {
                    d
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// Longest run of ASCII digits in `s`.
fn longest_digit_run(s: &str) -> usize {
    s.split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(luhn_valid(data), reference_luhn(data), "luhn disagrees");
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Brand::from_digits(input);
    let _ = contains_pan_like(input);
    match Pan::parse(input) {
        Ok(pan) => {
            let digits = pan.expose_digits().to_owned();
            assert!((12..=19).contains(&digits.len()), "length");
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "digits only");
            assert!(reference_luhn(digits.as_bytes()), "luhn");
            assert_eq!(pan.len(), digits.len());
            // Only the separators were dropped.
            let kept: String = input.chars().filter(char::is_ascii_digit).collect();
            assert_eq!(kept, digits, "parse kept exactly the digits");
            assert!(input
                .chars()
                .all(|c| c.is_ascii_digit() || c == ' ' || c == '-'));
            // The digits re-parse to the same card.
            let again = Pan::parse(&digits).expect("a parsed PAN's digits parse again");
            assert_eq!(again.expose_digits(), digits);
            assert_eq!(again.brand(), pan.brand());
            assert_eq!(pan.brand(), Brand::from_digits(&digits));
            assert_eq!(pan.bin(), digits[..6]);
            assert_eq!(pan.last4(), digits[digits.len() - 4..]);
            let masked = pan.masked();
            assert_eq!(masked, masked_form(&pan.bin(), &pan.last4(), pan.len()));
            assert_eq!(masked.len(), digits.len());
            assert_eq!(
                masked.bytes().filter(|b| *b == b'*').count(),
                digits.len() - 10
            );
            assert_eq!(format!("{pan:?}"), "Pan([REDACTED])");
            assert!(contains_pan_like(&digits), "the detector finds a valid PAN");
            assert_eq!(Brand::parse(pan.brand().as_str()), Some(pan.brand()));
        }
        Err(e) => {
            // Messages describe, never quote: at most a digit count.
            let shown = format!("{e} {e:?}");
            assert!(
                longest_digit_run(&shown) <= 6,
                "error repeats digits: {shown}"
            );
        }
    }
    // The other card fields: never a panic, never an echo.
    if let Ok(t) = Tenant::parse(input) {
        assert_eq!(t.as_str(), input);
    }
    if let Err(e) = CardholderName::parse(input) {
        // One of the two name errors: fieldless variants, so their texts
        // are fixed and cannot echo the input. (A search for the input in
        // the text is no oracle: the fuzzer copies the fixed text from its
        // dictionary, e.g. "cardholder name must be 1 to 64 printable
        // characters CardholderNa", 65 characters, which is then "found".)
        assert!(
            matches!(
                e,
                CardDataError::CardholderName | CardDataError::CardholderNameHasPan
            ),
            "a name error of another kind: {e:?}"
        );
    }
    if let Some(t) = Token::parse(input) {
        assert_eq!(t.as_str(), input);
    }
    if data.len() >= 16 {
        let month = i64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        let year = i64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
        if let Ok(exp) = Expiry::new(month, year) {
            assert!((1..=12).contains(&exp.month()));
            assert_eq!(i64::from(exp.month()), month);
            assert_eq!(i64::from(exp.year()), year);
        }
    }
});
