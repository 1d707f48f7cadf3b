//! The forwarding proxy's pure core (`vault::forward`): the placeholder
//! parser, the substitution and the response scan. Never a panic; a JSON
//! template renders, with any value for every placeholder, into valid JSON
//! of the same structure (same nesting, keys in the same order, same
//! numbers, booleans and nulls; only string contents differ); a form
//! renders into a body with as many `&`-separated pairs; an XML template
//! renders into a body passing the same check. The scan finds only
//! Luhn-valid 12-19 digit sequences, and their replacement by tokens leaves
//! none (or is refused).
//!
//! Input: a selector byte (kind = selector % 3: JSON, form, XML), a length
//! byte, that many bytes of value (lossy UTF-8), then the body. The whole
//! input is also scanned as a response.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use vault::forward::{find_card_numbers, replace_card_numbers, ReplaceError};
use vault::pan::luhn_valid;
use vault::{BodyKind, Template, TemplateError, Token};

/// The structure of a JSON text in document order, strings without content.
#[derive(Debug, PartialEq)]
enum Shape {
    Null,
    Bool(bool),
    Num(String),
    Str,
    Seq(Vec<Shape>),
    Map(Vec<(Shape, Shape)>),
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Shape, E> {
        Ok(Shape::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Shape, E> {
        Ok(Shape::Num(format!("u{v}")))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Shape, E> {
        Ok(Shape::Num(format!("i{v}")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Shape, E> {
        Ok(Shape::Num(format!("f{}", v.to_bits())))
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Str)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Shape, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = a.next_element()? {
            v.push(x);
        }
        Ok(Shape::Seq(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Shape, A::Error> {
        let mut v = Vec::new();
        while let Some(kv) = a.next_entry()? {
            v.push(kv);
        }
        Ok(Shape::Map(v))
    }
}

/// Valid JSON whose numbers all fit an f64 has a shape; valid JSON with
/// a number out of range (`1e999`: valid by the grammar, accepted by
/// `Template::parse`) has none.
fn shape(json: &[u8]) -> Option<Shape> {
    serde_json::from_slice(json).ok()
}

fn is_json(body: &[u8]) -> bool {
    serde_json::from_slice::<IgnoredAny>(body).is_ok()
}

fn check_template(kind: BodyKind, value: &str, body: &[u8]) {
    let Ok(t) = Template::parse(kind, body) else {
        return;
    };
    assert!(t.tokens().len() <= vault::forward::MAX_TOKENS);
    let out = match t.render(|_, _| Some(value)) {
        Ok(out) => out,
        Err(TemplateError::InvalidValue { .. }) if kind == BodyKind::Xml => return,
        Err(e) => panic!("render failed: {e}"),
    };
    match kind {
        BodyKind::Json => {
            assert!(is_json(&out), "rendered JSON invalid");
            if let Some(before) = shape(body) {
                assert_eq!(Some(before), shape(&out), "structure changed");
            }
        }
        BodyKind::Form => {
            let pairs = |b: &[u8]| b.split(|&c| c == b'&').count();
            assert_eq!(pairs(body), pairs(&out), "form pairs changed");
            assert_eq!(
                body.iter().filter(|&&c| c == b'=').count(),
                out.iter().filter(|&&c| c == b'=').count(),
                "form names and values changed"
            );
        }
        BodyKind::Xml => {
            // The rendered body passes the same check once its own `{{`
            // (from the value) are out of the way.
            let neutral: Vec<u8> = out
                .iter()
                .map(|&c| if c == b'{' { b'(' } else { c })
                .collect();
            if let Err(e) = Template::parse(BodyKind::Xml, &neutral) {
                panic!("rendered XML refused: {e}");
            }
        }
    }
}

fn check_scan(body: &[u8], kind: Option<BodyKind>) {
    let found = find_card_numbers(body);
    let mut end = 0;
    for f in &found {
        let r = f.range();
        assert!(r.start >= end && r.end <= body.len());
        end = r.end;
        let digits = f.pan().expose_digits().as_bytes();
        assert!((12..=19).contains(&digits.len()) && luhn_valid(digits));
    }
    let tokens: Vec<Token> = (0..found.len())
        .map(|i| Token::parse(&format!("tok_{i:x<22}")).expect("a token"))
        .collect();
    match replace_card_numbers(body, kind, &found, &tokens) {
        Ok(out) => {
            assert!(find_card_numbers(&out).is_empty());
            if kind == Some(BodyKind::Json) && is_json(body) {
                assert!(is_json(&out), "replacement broke the JSON");
            }
        }
        Err(ReplaceError::CardLikeOutput) => {
            panic!("a token ending in a letter made a card number")
        }
        Err(e) => panic!("replace failed: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let kind = [BodyKind::Json, BodyKind::Form, BodyKind::Xml][usize::from(selector % 3)];
    if let Some((&len, rest)) = rest.split_first() {
        let len = usize::from(len).min(rest.len());
        let (value, body) = rest.split_at(len);
        check_template(kind, &String::from_utf8_lossy(value), body);
    }
    check_scan(data, None);
    check_scan(data, Some(BodyKind::Json));
});
