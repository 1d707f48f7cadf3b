//! Lowercase hexadecimal for hashes, signatures and keys in exports, proofs
//! and key files.
//!
//! Strict on input: exactly the expected length and lowercase digits only,
//! so that every value has one spelling (the export reader relies on that to
//! refuse lines that are not exactly what the exporter wrote).

use serde::{Deserialize, Deserializer, Serializer};

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decode exactly `N` bytes from `2 * N` lowercase hex digits.
pub fn decode_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// `#[serde(with = "crate::hex::array")]` for `[u8; N]` fields.
pub(crate) mod array {
    use super::*;

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        deserializer.deserialize_str(HexVisitor::<N>)
    }

    /// Decodes straight from the input, without an intermediate `String`.
    struct HexVisitor<const N: usize>;

    impl<const N: usize> serde::de::Visitor<'_> for HexVisitor<N> {
        type Value = [u8; N];

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} lowercase hex digits", 2 * N)
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<[u8; N], E> {
            decode_array(text)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Other("other text"), &self))
        }
    }
}

/// `#[serde(with = "crate::hex::array_vec")]` for `Vec<[u8; 32]>` fields.
pub(crate) mod array_vec {
    use super::*;
    use serde::ser::SerializeSeq;

    pub(crate) fn serialize<S: Serializer>(
        items: &[[u8; 32]],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(items.len()))?;
        for item in items {
            seq.serialize_element(&encode(item))?;
        }
        seq.end()
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<[u8; 32]>, D::Error> {
        let texts = Vec::<std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        texts
            .iter()
            .map(|t| {
                decode_array(t)
                    .ok_or_else(|| serde::de::Error::custom("expected 64 lowercase hex digits"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let bytes = [0x00, 0x01, 0xab, 0xff];
        assert_eq!(encode(&bytes), "0001abff");
        assert_eq!(decode_array::<4>("0001abff"), Some(bytes));
        assert_eq!(decode_array::<4>("0001ABFF"), None, "uppercase refused");
        assert_eq!(decode_array::<4>("0001abf"), None, "odd length refused");
        assert_eq!(decode_array::<4>("0001abff00"), None, "too long refused");
        assert_eq!(decode_array::<4>("0001abfg"), None, "non-hex refused");
        assert_eq!(decode_array::<4>("+001abff"), None);
    }
}
