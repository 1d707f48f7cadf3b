//! Templates, escaping and the response scan of the forwarding proxy.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use time::macros::datetime;

use super::*;
use crate::brand::Brand;

const T1: &str = "tok_AAAAAAAAAAAAAAAAAAAAAA";
const T2: &str = "tok_B-B_BBBBBBBBBBBBBBBBBB";
/// A pan-shaped token: 16 digits failing Luhn (shared/test-cards.md).
const PS: &str = "4111111111111112";

/// Public test card numbers (shared/test-cards.md).
const CARDS: &[&str] = crate::pan::TEST_CARDS;

const HOSTILE: &str = "O'Brien & \"Sons\" <Zoë>\\ \u{1}\n\t\r\u{2028}}}{{x";

fn tok(s: &str) -> Token {
    Token::parse(s).unwrap()
}

fn parse(kind: BodyKind, body: &str) -> Result<Template, TemplateError> {
    Template::parse(kind, body.as_bytes())
}

/// Render with one value for every placeholder.
fn render_all(t: &Template, v: &str) -> Result<String, TemplateError> {
    t.render(|_, _| Some(v))
        .map(|out| String::from_utf8(out.to_vec()).unwrap())
}

fn offset(e: TemplateError) -> Option<usize> {
    match e {
        TemplateError::InvalidPlaceholder { offset } => Some(offset),
        _ => None,
    }
}

#[test]
fn content_types() {
    use BodyKind::*;
    for (ct, kind) in [
        ("application/json", Json),
        ("Application/JSON; charset=utf-8", Json),
        ("application/json;charset=\"UTF-8\"", Json),
        ("application/json; foo=bar", Json),
        ("application/x-www-form-urlencoded", Form),
        ("application/x-www-form-urlencoded; charset=utf-8", Form),
        ("application/xml", Xml),
        ("text/xml; charset=UTF-8", Xml),
        ("application/soap+xml; charset=utf-8; action=\"urn:x\"", Xml),
        ("application/vnd.api+json", Json),
    ] {
        assert_eq!(BodyKind::from_content_type(ct), Ok(kind), "{ct}");
    }
    for ct in [
        "",
        "text/plain",
        "application/jsonx",
        "multipart/form-data",
        "application/+json",
        "text/json",
        "json",
    ] {
        assert_eq!(
            BodyKind::from_content_type(ct),
            Err(TemplateError::UnsupportedContentType),
            "{ct}"
        );
    }
    for ct in ["application/json; charset=iso-8859-1", "text/xml; charset="] {
        let e = BodyKind::from_content_type(ct).unwrap_err();
        assert_eq!(e.code(), "invalid_body", "{ct}");
    }
}

#[test]
fn fields_round_trip() {
    for f in Field::ALL {
        assert_eq!(Field::parse(f.as_str()), Some(f));
    }
    for bad in ["", "PAN", "pan ", "exp", "cvv", "name"] {
        assert_eq!(Field::parse(bad), None);
    }
}

fn card_values(field: Field) -> Option<Zeroizing<String>> {
    let pan = Pan::parse("4111111111111111").unwrap();
    let name = CardholderName::parse("O'Brien & \"Sons\" <Zoë>\\").unwrap();
    let cvc = Cvc::parse("123", Brand::Visa).unwrap();
    let expiry = Expiry::new_at(4, 2031, datetime!(2026-11-27 12:00 UTC)).unwrap();
    let parts = CardParts {
        pan: &pan,
        expiry: Some(expiry),
        cardholder_name: Some(&name),
        cvc: Some(&cvc),
    };
    assert_eq!(format!("{parts:?}"), "CardParts([REDACTED])");
    format_field(field, &parts)
}

#[test]
fn format_every_field() {
    let want = [
        (Field::Pan, "4111111111111111"),
        (Field::ExpMonth, "04"),
        (Field::ExpYear, "2031"),
        (Field::ExpYy, "31"),
        (Field::ExpMmyy, "0431"),
        (Field::CardholderName, "O'Brien & \"Sons\" <Zoë>\\"),
        (Field::Cvc, "123"),
        (Field::Bin, "411111"),
        (Field::Last4, "1111"),
    ];
    assert_eq!(want.len(), Field::ALL.len());
    for (f, v) in want {
        assert_eq!(card_values(f).unwrap().as_str(), v, "{f}");
    }
    let amex = Pan::parse("378282246310005").unwrap();
    let bare = CardParts {
        pan: &amex,
        expiry: None,
        cardholder_name: None,
        cvc: None,
    };
    assert_eq!(format_field(Field::Bin, &bare).unwrap().as_str(), "378282");
    assert_eq!(format_field(Field::Last4, &bare).unwrap().as_str(), "0005");
    for f in [
        Field::ExpMonth,
        Field::ExpYear,
        Field::ExpYy,
        Field::ExpMmyy,
        Field::CardholderName,
        Field::Cvc,
    ] {
        assert!(format_field(f, &bare).is_none(), "{f}");
    }
}

/// Every field in every kind, with the values of [`card_values`].
#[test]
fn every_field_in_every_kind() {
    let values = |_: &Token, f: Field| card_values(f);
    // JSON
    let mut body = String::from("{");
    for f in Field::ALL {
        body.push_str(&format!("\"{f}\":\"{{{{{T1}.{f}}}}}\","));
    }
    body.push_str("\"n\":1}");
    let t = parse(BodyKind::Json, &body).unwrap();
    assert_eq!(t.tokens(), &[tok(T1)]);
    assert_eq!(t.fields_of(&tok(T1)), Field::ALL.to_vec());
    let out: serde_json::Value = serde_json::from_slice(&t.render(values).unwrap()).unwrap();
    for f in Field::ALL {
        assert_eq!(out[f.as_str()], card_values(f).unwrap().as_str(), "{f}");
    }
    // Form
    let body: Vec<String> = Field::ALL
        .iter()
        .map(|f| format!("{f}={{{{{PS}.{f}}}}}"))
        .collect();
    let t = parse(BodyKind::Form, &body.join("&")).unwrap();
    let out = t.render(values).unwrap();
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&out).into_owned().collect();
    assert_eq!(pairs.len(), Field::ALL.len());
    for (f, (k, v)) in Field::ALL.iter().zip(pairs) {
        assert_eq!(k, f.as_str());
        assert_eq!(v, card_values(*f).unwrap().as_str(), "{f}");
    }
    // XML
    let mut body = String::from("<?xml version=\"1.0\"?><r>");
    for f in Field::ALL {
        body.push_str(&format!("<{f} a='{{{{{T2}.{f}}}}}'>{{{{{T2}.{f}}}}}</{f}>"));
    }
    body.push_str("</r>");
    let t = parse(BodyKind::Xml, &body).unwrap();
    let out = String::from_utf8(t.render(values).unwrap().to_vec()).unwrap();
    assert!(out.contains("<pan a='4111111111111111'>4111111111111111</pan>"));
    assert!(out.contains("<exp_mmyy a='0431'>0431</exp_mmyy>"));
    let name = "O&apos;Brien &amp; &quot;Sons&quot; &lt;Zoë&gt;\\";
    assert!(out.contains(&format!(
        "<cardholder_name a='{name}'>{name}</cardholder_name>"
    )));
}

#[test]
fn hostile_values_are_escaped() {
    let v = HOSTILE;
    // JSON: in a value and in a key; the value comes back exactly.
    let body = format!(r#"{{"k":"a{{{{{T1}.cardholder_name}}}}b","{{{{{T1}.cvc}}}}":[1]}}"#);
    let out = render_all(&parse(BodyKind::Json, &body).unwrap(), v).unwrap();
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["k"], format!("a{v}b"));
    assert_eq!(j[v], serde_json::json!([1]));
    assert!(out.contains(r#"\u0001\n\t\r\u2028"#), "{out}");
    assert!(out.contains("Zoë"), "non-ASCII stays UTF-8");
    // Form: keys and values.
    let body = format!("a={{{{{T1}.cardholder_name}}}}&{{{{{T1}.cardholder_name}}}}=b");
    let out = render_all(&parse(BodyKind::Form, &body).unwrap(), v).unwrap();
    let pairs: Vec<(String, String)> = form_urlencoded::parse(out.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(
        pairs,
        vec![("a".into(), v.into()), (v.into(), "b".into())],
        "{out}"
    );
    assert!(out.starts_with("a=O%27Brien+%26+%22Sons%22+%3CZo%C3%AB%3E%5C+%01%0A"));
    // XML: entities; control characters but tab, LF and CR are refused.
    let body = format!("<a b=\"{{{{{T1}.cardholder_name}}}}\">{{{{{T1}.cardholder_name}}}}</a>");
    let t = parse(BodyKind::Xml, &body).unwrap();
    assert_eq!(
        render_all(&t, v),
        Err(TemplateError::InvalidValue {
            offset: 6,
            field: Field::CardholderName
        })
    );
    let v = "O'Brien & \"Sons\" <Zoë>\\\t\n\r]]>";
    let esc = "O&apos;Brien &amp; &quot;Sons&quot; &lt;Zoë&gt;\\&#9;&#10;&#13;]]&gt;";
    assert_eq!(
        render_all(&t, v).unwrap(),
        format!("<a b=\"{esc}\">{esc}</a>")
    );
    for bad in ["\u{0}", "\u{b}", "\u{1f}", "\u{fffe}", "\u{ffff}"] {
        assert_eq!(render_all(&t, bad).unwrap_err().code(), "invalid_value");
    }
}

#[test]
fn json_placeholders_in_keys_values_and_adjacent() {
    let body = format!(
        r#"{{"{{{{{T1}.bin}}}}":"{{{{{T1}.bin}}}}{{{{{T1}.last4}}}}{{{{{PS}.last4}}}}}}","x":["{{{{{T2}.exp_mmyy}}}} {{{{{PS}.pan}}}}"]}}"#
    );
    let t = parse(BodyKind::Json, &body).unwrap();
    assert_eq!(t.tokens(), &[tok(T1), tok(PS), tok(T2)]);
    assert_eq!(t.placeholder_count(), 6);
    assert_eq!(t.fields_of(&tok(T1)), vec![Field::Bin, Field::Last4]);
    assert_eq!(t.fields_of(&tok(PS)), vec![Field::Pan, Field::Last4]);
    assert_eq!(t.fields_of(&tok(T2)), vec![Field::ExpMmyy]);
    assert!(t.fields_of(&tok("tok_CCCCCCCCCCCCCCCCCCCCCC")).is_empty());
    let out = t
        .render(|token: &Token, f: Field| Some(format!("<{}:{f}>", &token.as_str()[..4])))
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        j,
        serde_json::json!({
            "<tok_:bin>": "<tok_:bin><tok_:last4><4111:last4>}",
            "x": ["<tok_:exp_mmyy> <4111:pan>"],
        })
    );
}

#[test]
fn malformed_placeholders() {
    let cases: Vec<(String, usize)> = vec![
        ("{{".into(), 0),
        ("a{{".into(), 1),
        ("{{tok_x}}".into(), 0),
        ("{{tok_x.nope}}".into(), 0),
        ("{{tok_x.pan}}".into(), 0),
        ("{{ tok.pan }}".into(), 0),
        (format!("{{{{ {T1}.pan}}}}"), 0),
        (format!("{{{{{T1}.pan }}}}"), 0),
        (format!("{{{{{T1}.nope}}}}"), 0),
        (format!("{{{{{T1}.PAN}}}}"), 0),
        (format!("{{{{{T1}.pan.pan}}}}"), 0),
        (format!("{{{{{T1}pan}}}}"), 0),
        ("{{.pan}}".to_string(), 0),
        (format!("{{{{{T1}.}}}}"), 0),
        (format!("{{{{{T1}.pan"), 0),
        (format!("{{{{{T1}.pan}}"), 0),
        (format!("{{{{{T1}.pan}} }}"), 0),
        (format!("{{{{{{{T1}.pan}}}}}}"), 0),
        (format!("ok {{{{{T1}.pan}}}} then {{{{{T1}.pan"), 43),
        // A card number is never a token (it passes Luhn).
        ("{{4111111111111111.pan}}".into(), 0),
        ("{{41111111111.pan}}".into(), 0),
        (format!("{{{{{}.pan}}}}", "4".repeat(200)), 0),
    ];
    for (text, at) in &cases {
        for kind in [BodyKind::Form, BodyKind::Json] {
            let body = match kind {
                BodyKind::Json => serde_json::to_string(text).unwrap(),
                _ => text.clone(),
            };
            let shift = usize::from(kind == BodyKind::Json);
            let e = parse(kind, &body).unwrap_err();
            assert_eq!(offset(e), Some(at + shift), "{kind:?} {body}");
            assert_eq!(e.code(), "invalid_placeholder");
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("tok") && !shown.contains("4111"), "{shown}");
        }
    }
    // In JSON: an escape inside a placeholder makes it malformed; braces
    // written as escapes make no placeholder at all.
    let split = format!(r#"["{{{{{}\u002epan}}}}"]"#, T1);
    assert_eq!(offset(parse(BodyKind::Json, &split).unwrap_err()), Some(2));
    let escaped = format!(r#"["\u007b\u007b{T1}.pan}}}}", "\u007b{{{{{T1}.pan}}}}"]"#);
    let t = parse(BodyKind::Json, &escaped).unwrap();
    assert_eq!(t.placeholder_count(), 1, "only the raw {{{{ counts");
    let out = render_all(&t, "V").unwrap();
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j, serde_json::json!([format!("{{{{{T1}.pan}}}}"), "{V"]));
}

#[test]
fn at_most_twenty_tokens() {
    let ph = |i: usize| format!("{{{{tok_{i:0>22}.last4}}}}");
    let body = |n: usize| {
        let list: Vec<String> = (0..n).map(|i| format!("\"{}{}\"", ph(i), ph(i))).collect();
        format!("[{}]", list.join(","))
    };
    let t = parse(BodyKind::Json, &body(MAX_TOKENS)).unwrap();
    assert_eq!(t.tokens().len(), 20);
    assert_eq!(t.placeholder_count(), 40);
    assert_eq!(
        parse(BodyKind::Json, &body(MAX_TOKENS + 1)).unwrap_err(),
        TemplateError::TooManyTokens
    );
    assert_eq!(TemplateError::TooManyTokens.code(), "too_many_tokens");
}

#[test]
fn invalid_bodies() {
    for kind in [BodyKind::Json, BodyKind::Form, BodyKind::Xml] {
        let e = Template::parse(kind, b"<a>\xff</a>").unwrap_err();
        assert_eq!(e, TemplateError::InvalidBody("not UTF-8"));
    }
    for bad in ["", "{", "{\"a\":1,}", "[1] 2", "{{\"a\":1}}", "'x'"] {
        let e = parse(BodyKind::Json, bad).unwrap_err();
        assert_eq!(e.code(), "invalid_body", "{bad}");
    }
    for bad in [
        "a=%",
        "a=%4",
        "a=%zz",
        "a=%{{tok_AAAAAAAAAAAAAAAAAAAAAA.pan}}",
    ] {
        let e = parse(BodyKind::Form, bad).unwrap_err();
        assert_eq!(e.code(), "invalid_body", "{bad}");
    }
    assert!(parse(BodyKind::Form, "").is_ok());
    assert!(parse(BodyKind::Form, "a=%41%2b&b").is_ok());
}

#[test]
fn xml_checks_and_placeholder_places() {
    let ph = format!("{{{{{T1}.pan}}}}");
    for ok in [
        format!("<a>{ph}</a>"),
        format!("<?xml version='1.0'?>\n<!-- c --><s:E xmlns:s=\"u\"><b x='{ph}' y=\"{ph}\"/>t{ph}&amp;</s:E>\n"),
        "<a><b/><c></c ><![CDATA[<x>]]></a>".to_string(),
    ] {
        let t = parse(BodyKind::Xml, &ok).unwrap();
        let out = render_all(&t, "<\"'&>").unwrap();
        // The output passes the same check (no placeholders left).
        parse(BodyKind::Xml, &out).unwrap();
    }
    for (bad, code) in [
        (format!("<{ph}></{ph}>"), "invalid_placeholder"),
        (format!("<a {ph}='1'></a>"), "invalid_placeholder"),
        (format!("<a b={ph}></a>"), "invalid_placeholder"),
        (format!("<a><!-- {ph} --></a>"), "invalid_placeholder"),
        (format!("<a><![CDATA[{ph}]]></a>"), "invalid_placeholder"),
        (format!("<a><?pi {ph}?></a>"), "invalid_placeholder"),
        (format!("{ph}<a></a>"), "invalid_placeholder"),
        (format!("<a></a>{ph}"), "invalid_placeholder"),
        ("<a></b>".to_string(), "invalid_body"),
        ("<a>".to_string(), "invalid_body"),
        ("<a><b></a></b>".to_string(), "invalid_body"),
        ("<a b='1></a>".to_string(), "invalid_body"),
        ("<a><!-- x </a>".to_string(), "invalid_body"),
        (
            "<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>".to_string(),
            "invalid_body",
        ),
        ("<a></a><b></b>".to_string(), "invalid_body"),
        ("just text".to_string(), "invalid_body"),
        ("".to_string(), "invalid_body"),
        ("<>".to_string(), "invalid_body"),
        ("<a b='<'></a>".to_string(), "invalid_body"),
    ] {
        let e = parse(BodyKind::Xml, &bad).unwrap_err();
        assert_eq!(e.code(), code, "{bad}");
    }
}

#[test]
fn missing_values_and_errors_never_show_values() {
    let body = format!(r#"{{"p":"{{{{{T1}.pan}}}}","c":"{{{{{T1}.cvc}}}}"}}"#);
    let t = parse(BodyKind::Json, &body).unwrap();
    let e = t
        .render(|_, f| (f == Field::Pan).then_some("4111111111111111"))
        .unwrap_err();
    assert_eq!(
        e,
        TemplateError::MissingValue {
            offset: 47,
            field: Field::Cvc
        }
    );
    assert_eq!(e.code(), "missing_value");
    let shown = format!("{e} {e:?} {t:?}");
    assert!(
        !shown.contains("4111") && !shown.contains("tok_"),
        "{shown}"
    );
    assert_eq!(
        format!("{t:?}"),
        format!(
            "Template {{ kind: Json, len: {}, tokens: 1, placeholders: 2 }}",
            body.len()
        )
    );
    // Values are asked for once per placeholder, in order.
    let mut asked = Vec::new();
    t.render(|_, f| {
        asked.push(f);
        Some("1")
    })
    .unwrap();
    assert_eq!(asked, vec![Field::Pan, Field::Cvc]);
}

// ---------------------------------------------------------------------
// The response scan.

fn found_digits(body: &str) -> Vec<String> {
    find_card_numbers(body.as_bytes())
        .iter()
        .map(|f| f.pan().expose_digits().to_owned())
        .collect()
}

fn spaced(card: &str, sep: &str) -> String {
    let chunks: Vec<&str> = card
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    chunks.join(sep)
}

#[test]
fn scanner_finds_every_test_card_in_context() {
    for card in CARDS {
        for form in [
            card.to_string(),
            spaced(card, " "),
            spaced(card, "-"),
            spaced(card, "+"),
            spaced(card, "%20"),
            format!("{}-{}", &card[..6], spaced(&card[6..], " ")),
        ] {
            for ctx in [
                "{}",
                "{\"pan\":\"{}\"}",
                "{\"pan\":{}}",
                "[{},-{}.5e3]",
                "pan={}&x=1",
                "<pan a='{}'>{}</pan>",
                "card: {}, exp 12 2030, ref 123",
                "x{}y",
                "PAN={}=2512",
                "(4111){}(1)",
            ] {
                let body = ctx.replace("{}", &form);
                let n = ctx.matches("{}").count();
                let got = found_digits(&body);
                assert_eq!(got, vec![card.to_string(); n], "{body}");
                let f = find_card_numbers(body.as_bytes());
                assert_eq!(&body.as_bytes()[f[0].range()], form.as_bytes());
            }
        }
    }
}

#[test]
fn scanner_ignores_what_is_not_a_card() {
    for body in [
        "4111111111111112",
        "5555555555554443",
        "4111 1111 1111 1112",
        "42424242424",
        "411111111111111111111",
        "41111111111111111111",
        "4111111111111111111111111",
        "4111  1111  1111  1111",
        "4111--1111--1111--1111",
        "4111 -1111 -1111 -1111",
        "4111%2B1111%2B1111%2B1111",
        "4111%1111%1111%1111",
        "4111.1111.1111.1111",
        "4111_1111_1111_1111",
        "2026-12-01T10:20:30Z",
        "12/2030 amount 1234.56 EUR",
        "+1 555 555 5555",
        "order 123456789012",
        "",
        "-",
        " 1 2 3",
    ] {
        assert_eq!(found_digits(body), Vec::<String>::new(), "{body}");
    }
    assert_eq!(found_digits(&CARDS.concat()), Vec::<String>::new());
    // A test card with a digit glued in front: 20 digits, no card (built
    // here: its 18-digit tail would pass the Luhn check written down).
    let glued = format!("1{}111", CARDS[0]);
    assert_eq!(found_digits(&glued), Vec::<String>::new(), "{glued}");
}

#[test]
fn scanner_takes_the_longest_from_each_group() {
    // Two cards with one space between: each on its own, the shorter
    // sequence first would cut the second.
    let body = format!("{} {}", CARDS[0], CARDS[8]);
    assert_eq!(found_digits(&body), vec![CARDS[0], CARDS[8]]);
    // 12 digits of a 16-digit card may pass by themselves.
    let twelve: Vec<&str> = CARDS
        .iter()
        .copied()
        .filter(|c| c.len() == 16 && luhn_valid(&c.as_bytes()[..12]))
        .collect();
    assert!(!twelve.is_empty());
    for c in twelve {
        assert_eq!(found_digits(&spaced(c, " ")), vec![c]);
    }
}

fn tokens_for(found: &[Found]) -> Vec<Token> {
    (0..found.len())
        .map(|i| tok(&format!("tok_{i:a<22}")))
        .collect()
}

fn redact(body: &str, kind: Option<BodyKind>) -> Result<String, ReplaceError> {
    let found = find_card_numbers(body.as_bytes());
    replace_card_numbers(body.as_bytes(), kind, &found, &tokens_for(&found))
        .map(|o| String::from_utf8(o).unwrap())
}

#[test]
fn replace_in_text_form_xml_and_json() {
    let t0 = "tok_0aaaaaaaaaaaaaaaaaaaaa";
    let t1 = "tok_1aaaaaaaaaaaaaaaaaaaaa";
    assert_eq!(
        redact("card 4111 1111-1111 1111, 12/30", None).unwrap(),
        format!("card {t0}, 12/30")
    );
    assert_eq!(
        redact("a=5555555555554444&b=378282246310005", Some(BodyKind::Form)).unwrap(),
        format!("a={t0}&b={t1}")
    );
    assert_eq!(
        redact("<p n='4242424242424242'>x</p>", Some(BodyKind::Xml)).unwrap(),
        format!("<p n='{t0}'>x</p>")
    );
    assert_eq!(
        redact(
            "a=4111%201111%201111%201111&b=4111+1111+1111+1111%20",
            Some(BodyKind::Form)
        )
        .unwrap(),
        format!("a={t0}&b={t1}%20")
    );
    // Not valid JSON: numbers are replaced in place, nothing is quoted.
    let body = "[4111111111111111.4242 4242%204242+4242]";
    let out = redact(body, Some(BodyKind::Json)).unwrap();
    assert_eq!(out, format!("[{t0}.{t1}]"));
    // JSON: in strings in place; bare numbers with their whole number token
    // become strings.
    let body = r#"{"a":"4111111111111111","b":4111111111111111,"c":[-378282246310005.25e+2, 1],"d":"x\"4242424242424242"}"#;
    let out = redact(body, Some(BodyKind::Json)).unwrap();
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"a": t0, "b": t1, "c": ["tok_2aaaaaaaaaaaaaaaaaaaaa", 1], "d": "x\"tok_3aaaaaaaaaaaaaaaaaaaaa"})
    );
    // As text, the same bare number is replaced in place (no quotes).
    let out = redact(r#"{"b":4111111111111111}"#, None).unwrap();
    assert_eq!(out, format!(r#"{{"b":{t0}}}"#));
    // Two numbers in one JSON number token: one string.
    let body = format!("[{}e{}]", CARDS[0], CARDS[1]);
    let out = redact(&body, Some(BodyKind::Json)).unwrap();
    assert_eq!(out, format!("[\"{t0}\"]"));
}

#[test]
fn replace_refuses_mismatches_and_card_like_output() {
    let body = b"a 4111111111111111 b";
    let found = find_card_numbers(body);
    let other = find_card_numbers(b"4111111111111111 and more");
    assert_eq!(
        replace_card_numbers(body, None, &found, &[]),
        Err(ReplaceError::Mismatch)
    );
    assert_eq!(
        replace_card_numbers(b"short", None, &found, &tokens_for(&found)),
        Err(ReplaceError::Mismatch)
    );
    assert_eq!(
        replace_card_numbers(body, None, &other, &tokens_for(&other)),
        Err(ReplaceError::Mismatch)
    );
    // A pan-shaped token next to another digit can make a Luhn-valid
    // sequence: refused, never returned.
    let d = (0..10u8)
        .map(|d| char::from(b'0' + d))
        .find(|&d| {
            !luhn_valid(format!("{}{d}", CARDS[0]).as_bytes())
                && luhn_valid(format!("{PS}{d}").as_bytes())
        })
        .unwrap();
    let body = format!("{} {d}", CARDS[0]);
    let found = find_card_numbers(body.as_bytes());
    assert_eq!(found.len(), 1);
    assert_eq!(
        replace_card_numbers(body.as_bytes(), None, &found, &[tok(PS)]),
        Err(ReplaceError::CardLikeOutput)
    );
    assert_eq!(ReplaceError::CardLikeOutput.code(), "card_like_output");
    let shown = format!("{found:?}");
    assert!(!shown.contains("4111"), "{shown}");
}

// ---------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
enum Seg {
    Lit(String),
    Ph(usize, Field),
}

#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Num(i64),
    Str(Vec<Seg>),
    Arr(Vec<J>),
    Obj(Vec<(Vec<Seg>, J)>),
}

const POOL: [&str; 3] = [T1, T2, PS];

fn segs(lit: &'static str) -> impl Strategy<Value = Vec<Seg>> {
    prop::collection::vec(
        prop_oneof![
            lit.prop_map(Seg::Lit),
            (0..POOL.len(), prop::sample::select(Field::ALL.to_vec()))
                .prop_map(|(t, f)| Seg::Ph(t, f)),
        ],
        0..4,
    )
}

fn json_tree() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::Num),
        segs("[^{]{0,6}").prop_map(J::Str),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Arr),
            prop::collection::vec((segs("[^{]{0,6}"), inner), 0..4).prop_map(J::Obj),
        ]
    })
}

fn text_of(s: &[Seg], value: &dyn Fn(usize, Field) -> String) -> String {
    s.iter()
        .map(|s| match s {
            Seg::Lit(l) => l.clone(),
            Seg::Ph(t, f) => value(*t, *f),
        })
        .collect()
}

fn placeholder(t: usize, f: Field) -> String {
    format!("{{{{{}.{f}}}}}", POOL[t])
}

/// The template text of a tree (placeholders in strings).
fn write_template(j: &J, out: &mut String) {
    match j {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(&b.to_string()),
        J::Num(n) => out.push_str(&n.to_string()),
        J::Str(s) => out.push_str(&serde_json::to_string(&text_of(s, &placeholder)).unwrap()),
        J::Arr(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(" , ");
                }
                write_template(x, out);
            }
            out.push(']');
        }
        J::Obj(o) => {
            out.push('{');
            for (i, (k, v)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(&text_of(k, &placeholder)).unwrap());
                out.push_str(": ");
                write_template(v, out);
            }
            out.push('}');
        }
    }
}

fn expected(j: &J, value: &dyn Fn(usize, Field) -> String) -> serde_json::Value {
    use serde_json::Value;
    match j {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Num(n) => Value::from(*n),
        J::Str(s) => Value::String(text_of(s, value)),
        J::Arr(a) => Value::Array(a.iter().map(|x| expected(x, value)).collect()),
        J::Obj(o) => {
            let mut m = serde_json::Map::new();
            for (k, v) in o {
                m.insert(text_of(k, value), expected(v, value));
            }
            Value::Object(m)
        }
    }
}

fn hostile_values() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<char>(), 0..10).prop_map(|c| c.into_iter().collect()),
            prop::sample::select(vec![
                HOSTILE.to_string(),
                "\"}]".to_string(),
                "\\".to_string(),
                "{{tok_AAAAAAAAAAAAAAAAAAAAAA.pan}}".to_string(),
                "&=%+ ".to_string(),
            ]),
        ],
        POOL.len() * Field::ALL.len(),
    )
}

fn value_index(t: usize, f: Field) -> usize {
    t * Field::ALL.len() + Field::ALL.iter().position(|x| *x == f).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn json_keeps_its_structure(tree in json_tree(), values in hostile_values()) {
        let mut body = String::new();
        write_template(&tree, &mut body);
        let t = Template::parse(BodyKind::Json, body.as_bytes()).unwrap();
        let value = |t: usize, f: Field| values[value_index(t, f)].clone();
        let out = t
            .render(|token: &Token, f: Field| {
                let i = POOL.iter().position(|p| *p == token.as_str()).unwrap();
                Some(value(i, f))
            })
            .unwrap();
        let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(got, expected(&tree, &value));
    }

    #[test]
    fn form_values_decode_back(
        pairs in prop::collection::vec((segs("[A-Za-z0-9._~-]{0,5}"), segs("[A-Za-z0-9._~-]{0,5}")), 0..5),
        values in hostile_values(),
    ) {
        let body: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", text_of(k, &placeholder), text_of(v, &placeholder)))
            .collect();
        let t = Template::parse(BodyKind::Form, body.join("&").as_bytes()).unwrap();
        let value = |t: usize, f: Field| values[value_index(t, f)].clone();
        let out = t
            .render(|token: &Token, f: Field| {
                let i = POOL.iter().position(|p| *p == token.as_str()).unwrap();
                Some(value(i, f))
            })
            .unwrap();
        let got: Vec<(String, String)> = form_urlencoded::parse(&out).into_owned().collect();
        let want: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (text_of(k, &value), text_of(v, &value)))
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn xml_values_decode_back(value in "[^\u{0}-\u{8}\u{b}\u{c}\u{e}-\u{1f}{\u{fffe}\u{ffff}]{0,12}") {
        let body = format!("<a b=\"{{{{{T1}.pan}}}}\" c='{{{{{T1}.pan}}}}'>{{{{{T1}.pan}}}}</a>");
        let t = Template::parse(BodyKind::Xml, body.as_bytes()).unwrap();
        let out = String::from_utf8(t.render(|_, _| Some(value.as_str())).unwrap().to_vec()).unwrap();
        // Still well-formed, and each part decodes to the value.
        Template::parse(BodyKind::Xml, out.as_bytes()).unwrap();
        let esc = out
            .strip_prefix("<a b=\"")
            .and_then(|r| r.split_once('"'))
            .map(|(e, _)| e.to_owned())
            .unwrap();
        prop_assert!(!esc.contains(['<', '>', '"', '\'']) && !esc.contains(['\t', '\n', '\r']));
        prop_assert_eq!(out, format!("<a b=\"{esc}\" c='{esc}'>{esc}</a>"));
        let decoded = esc
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&#9;", "\t")
            .replace("&#10;", "\n")
            .replace("&#13;", "\r")
            .replace("&amp;", "&");
        prop_assert_eq!(decoded, value);
    }

    #[test]
    fn parse_never_panics(kind in 0..3u8, body in prop::collection::vec(any::<u8>(), 0..64)) {
        let kind = [BodyKind::Json, BodyKind::Form, BodyKind::Xml][usize::from(kind)];
        if let Ok(t) = Template::parse(kind, &body) {
            let _ = t.render(|_, _| Some("v"));
        }
    }

    #[test]
    fn scanner_finds_cards_anywhere(
        before in "[a-z \\-\"{}]{0,6}",
        after in "[a-z \\-\"{}]{0,6}",
        card in prop::sample::select(CARDS.to_vec()),
        sep in prop::sample::select(vec!["", " ", "-", "+", "%20"]),
    ) {
        // Separators next to the card are fine unless digits follow them.
        let body = format!("{before}{}{after}", spaced(card, sep));
        prop_assert_eq!(found_digits(&body), vec![card.to_string()]);
    }

    #[test]
    fn replacement_leaves_no_card_number(body in "[0-9 \\-a\"]{0,80}") {
        // Tokens ending in a letter cannot join digits: never refused.
        let out = redact(&body, None).unwrap();
        prop_assert!(find_card_numbers(out.as_bytes()).is_empty());
        let json = format!("[{}]", body.replace(' ', ","));
        if serde_json::from_str::<serde_json::Value>(&json).is_ok() {
            let out = redact(&json, Some(BodyKind::Json)).unwrap();
            prop_assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{}", out);
        }
    }
}

#[test]
fn a_bare_number_in_a_body_that_is_not_json_is_replaced_in_place() {
    // A fuzz find: taking the whole JSON number `4111111111111111.14111`
    // left a `%20` whose `20` joined the digits after it into a new
    // card-like run. In a body that is not valid JSON nothing is quoted.
    // `20` and the digits after the `%` pass the Luhn check (generated: no
    // such number is written down).
    let cut = crate::pan::with_check_digit("201511201111111").unwrap();
    let groups = format!("%{}-{}%20{}", &cut[..6], &cut[6..12], &cut[12..]);
    let body = format!("[4111111111111111.14111{groups}\"}}]");
    let found = find_card_numbers(body.as_bytes());
    assert_eq!(found.len(), 1);
    let tokens = vec![Token::parse("tok_AAAAAAAAAAAAAAAAAAAAAA").unwrap()];
    let out = replace_card_numbers(body.as_bytes(), Some(BodyKind::Json), &found, &tokens).unwrap();
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        format!("[tok_AAAAAAAAAAAAAAAAAAAAAA.14111{groups}\"}}]")
    );
    assert!(find_card_numbers(&out).is_empty());
}

#[test]
fn a_percent_encoded_space_after_a_replaced_number_stays_a_space() {
    // A fuzz find: a number followed by `%20` and more digits, once
    // replaced, left `%20...` where `20` joined the digits after it into a
    // new card-like run. The `%20` is written as the space it encodes.
    // The digits after `%20` are chosen so that `20` and they pass the Luhn
    // check (generated: no such number is written down).
    let cut = crate::pan::with_check_digit("201511201111111").unwrap();
    let body = format!("x 4111111111111111%{cut} y");
    let body = body.as_bytes();
    let found = find_card_numbers(body);
    let tokens: Vec<Token> = (0..found.len())
        .map(|i| Token::parse(&format!("tok_{i:A<22}")).unwrap())
        .collect();
    for kind in [None, Some(BodyKind::Form), Some(BodyKind::Json)] {
        let out = replace_card_numbers(body, kind, &found, &tokens).unwrap();
        assert!(find_card_numbers(&out).is_empty(), "{kind:?}");
        assert!(!out.windows(3).any(|w| w == b"%20"), "{kind:?}");
    }
}
