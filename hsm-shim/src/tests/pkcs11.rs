//! PKCS#11-specific tests, on SoftHSM2 (each test on its own token).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use cryptoki::object::{Attribute, AttributeType};

use super::softhsm::{self, PIN_VAR, USER_PIN};
use crate::pkcs11::{Pin, PinSource, Pkcs11Config, Pkcs11Token};
use crate::{KekError, KeyEncryptionKey, SoftwareKek};

fn write_file(path: &std::path::Path, mode: u32, body: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn unsealed(tag: &str) -> (Pkcs11Config, Pkcs11Token) {
    let config = softhsm::new_token(tag);
    let token = Pkcs11Token::open(&config).unwrap();
    token.login(&Pin::from_env(PIN_VAR).unwrap()).unwrap();
    (config, token)
}

#[test]
fn starts_sealed_and_unseals_by_login() {
    let config = softhsm::new_token("sealed");
    let token = Pkcs11Token::open(&config).unwrap();
    assert!(!token.is_unsealed().unwrap());
    for err in [
        token.kek("kek-1").unwrap_err(),
        token.generate_kek("kek-1").unwrap_err(),
        token.destroy_kek("kek-1").unwrap_err(),
    ] {
        assert!(matches!(err, KekError::Sealed { .. }), "{err:?}");
    }
    token.login(&Pin::from_env(PIN_VAR).unwrap()).unwrap();
    assert!(token.is_unsealed().unwrap());
    let kek = token.generate_kek("kek-1").unwrap();
    let blob = kek.wrap("dek:1", &[1u8; 32]).unwrap();

    // Logging out seals every handle; logging in again unseals them.
    token.logout().unwrap();
    assert!(!token.is_unsealed().unwrap());
    let err = kek.unwrap("dek:1", &blob).unwrap_err();
    assert!(matches!(err, KekError::Sealed { .. }), "{err:?}");
    assert!(matches!(
        kek.wrap("dek:1", &[1u8; 32]),
        Err(KekError::Sealed { .. })
    ));
    token.login(&Pin::from_env(PIN_VAR).unwrap()).unwrap();
    assert_eq!(kek.unwrap("dek:1", &blob).unwrap().as_slice(), &[1u8; 32]);
}

#[test]
fn wrong_pin_refused_at_login() {
    let config = softhsm::new_token("wrongpin");
    let token = Pkcs11Token::open(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pin");
    write_file(&path, 0o600, b"not-the-pin-9999\n");
    let err = token.login(&Pin::from_file(&path).unwrap()).unwrap_err();
    assert!(matches!(err, KekError::WrongPin { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(!shown.contains("not-the-pin"), "{shown}");
    assert!(shown.contains(&config.token_label), "{shown}");
    assert!(!token.is_unsealed().unwrap());
    // The right PIN still works (one failure does not lock SoftHSM2's PIN).
    token.login(&Pin::from_env(PIN_VAR).unwrap()).unwrap();
    assert!(token.is_unsealed().unwrap());
}

#[test]
fn pin_from_env() {
    // Creating the token also sets PIN_VAR (once per test binary).
    let config = softhsm::new_token("pinenv");
    let pin = Pin::from_env(PIN_VAR).unwrap();
    assert_eq!(format!("{pin:?}"), "Pin([REDACTED])");
    let err = Pin::from_env("CARDVAULT_HSM_SHIM_TEST_UNSET_VARIABLE").unwrap_err();
    assert!(
        matches!(
            err,
            KekError::PinUnavailable {
                reason: "not set",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("CARDVAULT_HSM_SHIM_TEST_UNSET_VARIABLE"));
    // And it logs in.
    assert_eq!(config.pin, PinSource::Env(PIN_VAR.to_owned()));
    config.pin.load().unwrap();
    let token = Pkcs11Token::open(&config).unwrap();
    token.login(&pin).unwrap();
    assert!(token.is_unsealed().unwrap());
}

#[test]
fn pin_from_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("pin");
    write_file(&good, 0o600, format!("{USER_PIN}\n").as_bytes());
    let crlf = dir.path().join("pin-crlf");
    write_file(&crlf, 0o400, format!("{USER_PIN}\r\n").as_bytes());

    let mut config = softhsm::new_token("pinfile");
    config.pin = PinSource::File(good.clone());
    let token = Pkcs11Token::open(&config).unwrap();
    token.login(&config.pin.load().unwrap()).unwrap();
    assert!(token.is_unsealed().unwrap());
    token.logout().unwrap();
    token.login(&Pin::from_file(&crlf).unwrap()).unwrap();
    assert!(token.is_unsealed().unwrap());

    for mode in [0o660, 0o604, 0o644] {
        let path = dir.path().join(format!("pin-{mode:o}"));
        write_file(&path, mode, USER_PIN.as_bytes());
        let err = Pin::from_file(&path).unwrap_err();
        assert!(
            matches!(err, KekError::InsecurePermissions { .. }),
            "{mode:o}: {err:?}"
        );
    }
    for (name, body) in [
        ("empty", &b""[..]),
        ("nl", b"\n"),
        ("two-lines", b"12\n34\n"),
    ] {
        let path = dir.path().join(name);
        write_file(&path, 0o600, body);
        let err = Pin::from_file(&path).unwrap_err();
        assert!(
            matches!(err, KekError::PinUnavailable { .. }),
            "{name}: {err:?}"
        );
    }
    let err = Pin::from_file(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, KekError::Read { .. }), "{err:?}");
}

#[test]
fn generate_refuses_an_existing_label_and_kek_finds_it() {
    let (config, token) = unsealed("exists");
    let kek = token.generate_kek("cardvault-kek-1").unwrap();
    let err = token.generate_kek("cardvault-kek-1").unwrap_err();
    assert!(matches!(err, KekError::KekExists { .. }), "{err:?}");
    let found = token.kek("cardvault-kek-1").unwrap();
    assert_eq!(found.kek_id(), kek.kek_id());
    assert!(kek.kek_id().starts_with("p11:cardvault-kek-1:"));
    assert_eq!(found.label(), "cardvault-kek-1");
    let err = token.kek("cardvault-kek-2").unwrap_err();
    assert!(matches!(err, KekError::KekNotFound { .. }), "{err:?}");
    token.generate_kek("cardvault-kek-2").unwrap();
    assert_eq!(
        token.kek_labels().unwrap(),
        vec!["cardvault-kek-1".to_owned(), "cardvault-kek-2".to_owned()]
    );
    // A destroyed label can be generated again, as a different KEK.
    token.destroy_kek("cardvault-kek-1").unwrap();
    assert!(matches!(
        token.destroy_kek("cardvault-kek-1"),
        Err(KekError::KekNotFound { .. })
    ));
    let again = token.generate_kek("cardvault-kek-1").unwrap();
    assert_ne!(again.kek_id(), kek.kek_id());
    // Config-driven start-up.
    let mut c = config.clone();
    c.kek_label = "cardvault-kek-2".to_owned();
    assert_eq!(
        c.unseal().unwrap().kek_id(),
        token.kek("cardvault-kek-2").unwrap().kek_id()
    );
    assert!(matches!(
        token.generate_kek("bad label"),
        Err(KekError::InvalidLabel { .. })
    ));
}

#[test]
fn the_key_is_generated_inside_and_cannot_leave() {
    let (_config, token) = unsealed("attrs");
    let kek = token.generate_kek("kek-1").unwrap();
    let (ctx, slot) = token.raw_for_test();
    let session = ctx.open_ro_session(slot).unwrap();
    let handle = session
        .find_objects(&[Attribute::Label(b"kek-1".to_vec())])
        .unwrap()[0];
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Derive,
                AttributeType::Modifiable,
                AttributeType::Copyable,
                AttributeType::ValueLen,
                AttributeType::Id,
                AttributeType::Value,
            ],
        )
        .unwrap();
    let mut seen = 0;
    for a in &attrs {
        match a {
            Attribute::Token(v)
            | Attribute::Private(v)
            | Attribute::Sensitive(v)
            | Attribute::AlwaysSensitive(v)
            | Attribute::NeverExtractable(v)
            | Attribute::Encrypt(v)
            | Attribute::Decrypt(v) => {
                assert!(*v, "{a:?}");
                seen += 1;
            }
            Attribute::Extractable(v)
            | Attribute::Wrap(v)
            | Attribute::Unwrap(v)
            | Attribute::Derive(v)
            | Attribute::Modifiable(v)
            | Attribute::Copyable(v) => {
                assert!(!*v, "{a:?}");
                seen += 1;
            }
            Attribute::ValueLen(l) => {
                assert_eq!(usize::from(*l), 32);
                seen += 1;
            }
            Attribute::Id(id) => {
                assert_eq!(id.len(), 16);
                assert!(kek.kek_id().ends_with(&crate::to_hex(id)));
                seen += 1;
            }
            Attribute::Value(_) => panic!("the token revealed the KEK's value"),
            other => panic!("unexpected attribute {other:?}"),
        }
    }
    assert_eq!(seen, 15, "{attrs:?}");
}

#[test]
fn blobs_are_interchangeable_with_the_software_backend() {
    // Same key in both backends: a software KEK imported into a token keeps
    // unwrapping its blobs, and the token's GCM matches ours bit for bit.
    let (_config, token) = unsealed("interop");
    let key = [0x42u8; 32];
    let soft = SoftwareKek::from_key(&key);
    let hard = token.import_kek_for_test("imported", &key).unwrap();
    let from_soft = soft.wrap("dek:7", &[8u8; 32]).unwrap();
    assert_eq!(
        hard.unwrap("dek:7", &from_soft).unwrap().as_slice(),
        &[8u8; 32]
    );
    let from_hard = hard.wrap("dek:7", &[9u8; 32]).unwrap();
    assert_eq!(
        soft.unwrap("dek:7", &from_hard).unwrap().as_slice(),
        &[9u8; 32]
    );
    assert!(matches!(
        soft.unwrap("dek:8", &from_hard),
        Err(KekError::UnwrapFailed)
    ));
}

#[test]
fn keys_outside_the_policy_are_refused() {
    let (_config, token) = unsealed("policy");
    let (ctx, slot) = token.raw_for_test();
    let session = ctx.open_rw_session(slot).unwrap();
    session
        .create_object(&[
            Attribute::Class(cryptoki::object::ObjectClass::SECRET_KEY),
            Attribute::KeyType(cryptoki::object::KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(b"weak".to_vec()),
            Attribute::Id(vec![1, 2, 3]),
            Attribute::Value(vec![7u8; 32]),
        ])
        .unwrap();
    let err = token.kek("weak").unwrap_err();
    assert!(matches!(err, KekError::KekPolicy { .. }), "{err:?}");
}

#[test]
fn missing_module_and_token_are_typed_errors() {
    let mut config = Pkcs11Config::new("nope", PinSource::Env(PIN_VAR.to_owned()), "kek-1");
    config.module = "/nonexistent/libpkcs11-missing.so".into();
    let err = Pkcs11Token::open(&config).unwrap_err();
    assert!(matches!(err, KekError::Pkcs11Module { .. }), "{err:?}");
    assert!(err
        .to_string()
        .contains("/nonexistent/libpkcs11-missing.so"));

    let mut config =
        Pkcs11Config::new("no-such-token", PinSource::Env(PIN_VAR.to_owned()), "kek-1");
    config.module = softhsm::module().to_owned();
    let err = Pkcs11Token::open(&config).unwrap_err();
    assert!(matches!(err, KekError::TokenNotFound { .. }), "{err:?}");
    config.token_label = "x".repeat(33);
    assert!(matches!(
        Pkcs11Token::open(&config),
        Err(KekError::InvalidLabel { .. })
    ));
}

#[test]
fn debug_output_has_no_secret() {
    let (config, token) = unsealed("debug");
    let kek = token.generate_kek("kek-1").unwrap();
    let pin = Pin::from_env(PIN_VAR).unwrap();
    for shown in [
        format!("{config:?}"),
        format!("{token:?}"),
        format!("{kek:?}"),
        format!("{pin:?}"),
    ] {
        assert!(!shown.contains(USER_PIN), "{shown}");
    }
    assert!(format!("{kek:?}").contains(kek.kek_id()));
}
