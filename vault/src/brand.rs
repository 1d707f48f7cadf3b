//! Card brand (scheme) from the number's prefix.

use serde::{Deserialize, Serialize};

/// Card brand. Names are stable API values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Brand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Jcb,
    Unionpay,
    DinersClub,
    Maestro,
    Mir,
    Unknown,
}

impl Brand {
    pub fn as_str(self) -> &'static str {
        match self {
            Brand::Visa => "visa",
            Brand::Mastercard => "mastercard",
            Brand::Amex => "amex",
            Brand::Discover => "discover",
            Brand::Jcb => "jcb",
            Brand::Unionpay => "unionpay",
            Brand::DinersClub => "diners_club",
            Brand::Maestro => "maestro",
            Brand::Mir => "mir",
            Brand::Unknown => "unknown",
        }
    }

    pub fn parse(name: &str) -> Option<Brand> {
        ALL.iter().copied().find(|b| b.as_str() == name)
    }

    /// Brand from the leading digits (IIN ranges as published by the schemes).
    /// Order matters where ranges nest: the more specific range wins.
    pub fn from_digits(digits: &str) -> Brand {
        let prefix = |n: usize| -> u32 {
            digits
                .get(..n)
                .and_then(|p| p.parse().ok())
                .unwrap_or(u32::MAX)
        };
        let (p1, p2, p3, p4, p6) = (prefix(1), prefix(2), prefix(3), prefix(4), prefix(6));
        if (2200..=2204).contains(&p4) {
            Brand::Mir
        } else if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) {
            Brand::Mastercard
        } else if p2 == 34 || p2 == 37 {
            Brand::Amex
        } else if p1 == 4 {
            Brand::Visa
        } else if (3528..=3589).contains(&p4) {
            Brand::Jcb
        } else if p2 == 36 || p2 == 38 || p2 == 39 || (300..=305).contains(&p3) || p4 == 3095 {
            Brand::DinersClub
        } else if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 {
            Brand::Discover
        } else if (622126..=622925).contains(&p6) || p2 == 62 || p2 == 81 {
            Brand::Unionpay
        } else if p2 == 50
            || (56..=58).contains(&p2)
            || p2 == 63
            || p2 == 67
            || p4 == 6304
            || p4 == 6759
        {
            Brand::Maestro
        } else {
            Brand::Unknown
        }
    }
}

const ALL: [Brand; 10] = [
    Brand::Visa,
    Brand::Mastercard,
    Brand::Amex,
    Brand::Discover,
    Brand::Jcb,
    Brand::Unionpay,
    Brand::DinersClub,
    Brand::Maestro,
    Brand::Mir,
    Brand::Unknown,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cases: &[(&str, Brand)]) {
        for (digits, want) in cases {
            assert_eq!(Brand::from_digits(digits), *want, "{digits}");
        }
    }

    #[test]
    fn public_test_cards() {
        check(&[
            ("4111111111111111", Brand::Visa),
            ("4242424242424242", Brand::Visa),
            ("4012888888881881", Brand::Visa),
            ("5555555555554444", Brand::Mastercard),
            ("5105105105105100", Brand::Mastercard),
            ("2223003122003222", Brand::Mastercard),
            ("378282246310005", Brand::Amex),
            ("371449635398431", Brand::Amex),
            ("6011111111111117", Brand::Discover),
            ("6011000990139424", Brand::Discover),
            ("3530111333300000", Brand::Jcb),
            ("3566002020360505", Brand::Jcb),
            ("6200000000000005", Brand::Unionpay),
            ("36227206271667", Brand::DinersClub),
            ("30569309025904", Brand::DinersClub),
            ("6759649826438453", Brand::Maestro),
            ("2200000000000004", Brand::Mir),
        ]);
    }

    #[test]
    fn range_edges() {
        check(&[
            ("2220990000000000", Brand::Unknown),
            ("2221000000000000", Brand::Mastercard),
            ("2720990000000000", Brand::Mastercard),
            ("2721000000000000", Brand::Unknown),
            ("2204990000000000", Brand::Mir),
            ("2205000000000000", Brand::Unknown),
            ("3527000000000000", Brand::Unknown),
            ("3589000000000000", Brand::Jcb),
            ("6440000000000000", Brand::Discover),
            ("6500000000000000", Brand::Discover),
            ("6221260000000001", Brand::Unionpay),
            ("5018000000000000", Brand::Maestro),
            ("9999000000000000", Brand::Unknown),
            ("1", Brand::Unknown),
        ]);
    }

    #[test]
    fn names_round_trip() {
        for b in ALL {
            assert_eq!(Brand::parse(b.as_str()), Some(b));
        }
    }
}
