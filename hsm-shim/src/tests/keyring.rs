//! Split-knowledge keyring tests (fast argon2 parameters except where noted).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::{unseal, ALICE, BOB, CAROL};
use crate::keyring::{KdfParams, SealedKeyring, UnsealProgress};
use crate::{KekError, KeyEncryptionKey};

const DAVE: (&str, &str) = ("dave", "dave's long passphrase");
const ERIN: (&str, &str) = ("erin", "erin-passphrase-2026");

fn fast() -> KdfParams {
    KdfParams::insecure_fast_for_tests()
}

fn init(k: usize, who: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    SealedKeyring::init(&path, k, who, fast()).unwrap();
    (dir, path)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec(value).unwrap()).unwrap();
}

#[test]
fn k_minus_one_custodians_do_not_unseal() {
    let (_d, path) = init(3, &[ALICE, BOB, CAROL, DAVE, ERIN]);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    assert_eq!(u.progress(), UnsealProgress { have: 0, need: 3 });
    assert_eq!(
        u.submit(ERIN.0, ERIN.1).unwrap(),
        UnsealProgress { have: 1, need: 3 }
    );
    let p = u.submit(BOB.0, BOB.1).unwrap();
    assert_eq!(p, UnsealProgress { have: 2, need: 3 });
    assert!(!p.is_complete());
    let err = u.finish().unwrap_err();
    assert!(
        matches!(err, KekError::NotEnoughShares { have: 2, need: 3 }),
        "{err:?}"
    );
}

#[test]
fn wrong_passphrase_is_refused_and_names_the_custodian() {
    let (_d, path) = init(2, &[ALICE, BOB, CAROL]);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    let err = u.submit("bob", "not bob's passphrase").unwrap_err();
    assert!(
        matches!(&err, KekError::WrongPassphrase { custodian } if custodian == "bob"),
        "{err:?}"
    );
    let shown = err.to_string();
    assert!(shown.contains("bob"), "{shown}");
    assert!(!shown.contains("not bob's passphrase"), "{shown}");
    // Another custodian's passphrase is wrong too.
    assert!(matches!(
        u.submit("bob", ALICE.1),
        Err(KekError::WrongPassphrase { .. })
    ));
    assert_eq!(u.progress().have, 0);
    // And then the right one counts.
    assert_eq!(u.submit(BOB.0, BOB.1).unwrap().have, 1);
}

#[test]
fn a_custodian_counts_once() {
    let (_d, path) = init(2, &[ALICE, BOB, CAROL]);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    assert_eq!(u.submit(ALICE.0, ALICE.1).unwrap().have, 1);
    assert_eq!(u.submit(ALICE.0, ALICE.1).unwrap().have, 1);
    assert!(matches!(
        u.finish(),
        Err(KekError::NotEnoughShares { have: 1, need: 2 })
    ));
}

#[test]
fn unknown_custodian_is_refused_without_echo() {
    let (_d, path) = init(1, &[ALICE, BOB]);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    let err = u
        .submit("correct horse battery", "x".repeat(20).as_str())
        .unwrap_err();
    assert!(matches!(err, KekError::UnknownCustodian), "{err:?}");
    assert!(!err.to_string().contains("horse"));
    // Names are matched exactly.
    assert!(matches!(
        u.submit("Alice", ALICE.1),
        Err(KekError::UnknownCustodian)
    ));
}

#[test]
fn short_passphrases_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    for short in ["", "eleven char", "ünïcödé-10"] {
        let err = SealedKeyring::init(&path, 1, &[ALICE, ("bob", short)], fast()).unwrap_err();
        assert!(
            matches!(err, KekError::PassphraseTooShort { min: 12 }),
            "{short:?}: {err:?}"
        );
    }
    assert!(!path.exists(), "nothing written on refusal");
    // Twelve characters (not bytes) are enough.
    SealedKeyring::init(&path, 1, &[("bob", "ünïcödé-1234")], fast()).unwrap();
    let (_d, path) = init(1, &[ALICE]);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    assert!(matches!(
        u.submit("alice", "short"),
        Err(KekError::PassphraseTooShort { .. })
    ));
}

#[test]
fn thresholds_and_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    for (k, who) in [(0, &[ALICE][..]), (2, &[ALICE][..]), (1, &[][..])] {
        assert!(matches!(
            SealedKeyring::init(&path, k, who, fast()),
            Err(KekError::InvalidThreshold { .. })
        ));
    }
    let many: Vec<(String, &str)> = (0..256)
        .map(|i| (format!("c{i}"), "a long enough passphrase"))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    assert!(matches!(
        SealedKeyring::init(&path, 2, &many, fast()),
        Err(KekError::InvalidThreshold {
            custodians: 256,
            ..
        })
    ));
    let long = "n".repeat(65);
    for bad in ["", " alice", "bob ", "ca\nrol", "tab\there", long.as_str()] {
        let err = SealedKeyring::init(&path, 1, &[ALICE, (bad, BOB.1)], fast()).unwrap_err();
        assert!(
            matches!(err, KekError::InvalidCustodian { index: 1, .. }),
            "{bad:?}: {err:?}"
        );
    }
    for dup in ["alice", "ALICE"] {
        let err = SealedKeyring::init(&path, 1, &[ALICE, (dup, BOB.1)], fast()).unwrap_err();
        assert!(
            matches!(err, KekError::InvalidCustodian { index: 1, .. }),
            "{err:?}"
        );
    }
    assert!(!path.exists());
    SealedKeyring::init(&path, 1, &[("Ærøskøbing custodian", BOB.1)], fast()).unwrap();
}

#[test]
fn every_k_subset_unseals_exhaustively_for_four_custodians() {
    let who = [ALICE, BOB, CAROL, DAVE];
    for k in 1..=who.len() {
        let (_d, path) = init(k, &who);
        let versions = SealedKeyring::open(&path).unwrap().versions();
        let id = versions[0].kek_id.clone();
        for mask in 0u32..(1 << who.len()) {
            let subset: Vec<_> = (0..who.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| who[i])
                .collect();
            let mut u = SealedKeyring::open(&path).unwrap().unsealer();
            for (name, pass) in &subset {
                u.submit(name, pass).unwrap();
            }
            match u.finish() {
                Ok(keyring) => {
                    assert!(subset.len() >= k, "k={k} mask={mask:b}");
                    assert_eq!(keyring.current_kek().unwrap().kek_id(), id);
                }
                Err(KekError::NotEnoughShares { .. }) => {
                    assert!(subset.len() < k, "k={k} mask={mask:b}")
                }
                Err(e) => panic!("k={k} mask={mask:b}: {e:?}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any K custodians of N, in any order, unseal to the same KEK.
    #[test]
    fn any_k_of_n_in_any_order_unseals(
        n in 1usize..=9,
        k_seed in 0usize..100,
        order in Just((0..9).collect::<Vec<usize>>()).prop_shuffle(),
    ) {
        let k = 1 + k_seed % n;
        let names: Vec<String> = (0..n).map(|i| format!("custodian-{i}")).collect();
        let passes: Vec<String> = (0..n).map(|i| format!("passphrase number {i}")).collect();
        let who: Vec<(&str, &str)> =
            names.iter().zip(&passes).map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let (_d, path) = init(k, &who);
        let id = SealedKeyring::open(&path).unwrap().versions()[0].kek_id.clone();
        let chosen: Vec<usize> = order.into_iter().filter(|i| *i < n).take(k).collect();
        let mut u = SealedKeyring::open(&path).unwrap().unsealer();
        for (step, i) in chosen.iter().enumerate() {
            let p = u.submit(who[*i].0, who[*i].1).unwrap();
            prop_assert_eq!(p, UnsealProgress { have: step + 1, need: k });
        }
        let keyring = u.finish().unwrap();
        let kek = keyring.current_kek().unwrap();
        prop_assert_eq!(kek.kek_id(), id.as_str());
    }
}

#[test]
fn the_largest_keyring_works() {
    let names: Vec<String> = (0..255).map(|i| format!("c{i}")).collect();
    let who: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), "a long enough passphrase"))
        .collect();
    let (_d, path) = init(255, &who);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    for (name, pass) in who.iter().rev() {
        u.submit(name, pass).unwrap();
    }
    let keyring = u.finish().unwrap();
    assert_eq!(keyring.versions().len(), 1);
}

#[test]
fn file_is_private_and_never_overwritten() {
    let (_d, path) = init(2, &[ALICE, BOB]);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = std::fs::read(&path).unwrap();
    let err = SealedKeyring::init(&path, 1, &[CAROL], fast()).unwrap_err();
    assert!(matches!(err, KekError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    for mode in [0o620, 0o604, 0o660, 0o644] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = SealedKeyring::open(&path).unwrap_err();
        assert!(
            matches!(err, KekError::InsecurePermissions { .. }),
            "{mode:o}: {err:?}"
        );
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    SealedKeyring::open(&path).unwrap();
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn file_holds_kdf_parameters_and_no_secret() {
    let (_d, path) = init(2, &[ALICE, BOB, CAROL]);
    let text = std::fs::read_to_string(&path).unwrap();
    for (_, pass) in [ALICE, BOB, CAROL] {
        assert!(!text.contains(pass));
    }
    let v = json(&path);
    assert_eq!(v["format"], "cardvault-sealed-keyring");
    assert_eq!(v["version"], 1);
    assert_eq!(v["threshold"], 2);
    assert_eq!(v["custodians"].as_array().unwrap().len(), 3);
    let kdf = &v["custodians"][1]["kdf"];
    assert_eq!(kdf["algorithm"], "argon2id");
    assert_eq!(kdf["version"], 19);
    assert_eq!(kdf["m_cost_kib"], 256);
    assert_eq!(kdf["t_cost"], 1);
    assert_eq!(kdf["p_cost"], 1);
    assert_ne!(
        v["custodians"][0]["kdf"]["salt"],
        v["custodians"][1]["kdf"]["salt"]
    );
    assert_eq!(v["keks"][0]["version"], 1);
    let sealed = SealedKeyring::open(&path).unwrap();
    assert_eq!(sealed.custodians(), vec!["alice", "bob", "carol"]);
    assert_eq!(sealed.threshold(), 2);
    let shown = format!("{sealed:?}");
    assert!(
        shown.contains("alice") && !shown.contains(ALICE.1),
        "{shown}"
    );
}

#[test]
fn kdf_parameters_have_a_floor_outside_tests() {
    let d = KdfParams::default();
    assert_eq!((d.m_cost_kib(), d.t_cost(), d.p_cost()), (65536, 3, 1));
    assert!(KdfParams::new(65536, 3, 1).is_ok());
    assert!(KdfParams::new(19 * 1024, 2, 1).is_ok());
    for (m, t, p) in [
        (1024, 3, 1),
        (65536, 1, 1),
        (65536, 3, 0),
        (65536, 65, 1),
        (8 * 1024 * 1024, 3, 1),
        (65536, 3, 17),
    ] {
        assert!(
            matches!(KdfParams::new(m, t, p), Err(KekError::KdfParams { .. })),
            "{m} {t} {p}"
        );
    }
}

#[test]
fn default_parameters_work_end_to_end() {
    // One custodian, the real cost (64 MiB, t = 3): two argon2 runs.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    SealedKeyring::init(&path, 1, &[ALICE], KdfParams::default()).unwrap();
    assert_eq!(json(&path)["custodians"][0]["kdf"]["m_cost_kib"], 65536);
    let keyring = unseal(&path, &[ALICE]);
    let kek = keyring.current_kek().unwrap();
    let blob = kek.wrap("dek:1", &[1u8; 32]).unwrap();
    assert_eq!(kek.unwrap("dek:1", &blob).unwrap().as_slice(), &[1u8; 32]);
}

#[test]
fn edited_threshold_or_custodians_fail_reconstruction() {
    // Raising K: 3 points of a line still interpolate it, but the check
    // value binds the threshold.
    let (_d, path) = init(2, &[ALICE, BOB, CAROL]);
    let mut v = json(&path);
    v["threshold"] = 3.into();
    write_json(&path, &v);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    u.submit(ALICE.0, ALICE.1).unwrap();
    u.submit(BOB.0, BOB.1).unwrap();
    let err = u.submit(CAROL.0, CAROL.1).unwrap_err();
    assert!(matches!(err, KekError::ReconstructionFailed), "{err:?}");
    // The shares were dropped: unsealing starts over.
    assert_eq!(u.progress().have, 0);

    // Lowering K: fewer shares than the polynomial needs give a wrong key.
    let (_d, path) = init(3, &[ALICE, BOB, CAROL]);
    let mut v = json(&path);
    v["threshold"] = 2.into();
    write_json(&path, &v);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    u.submit(ALICE.0, ALICE.1).unwrap();
    let err = u.submit(CAROL.0, CAROL.1).unwrap_err();
    assert!(matches!(err, KekError::ReconstructionFailed), "{err:?}");

    // A share moved to another custodian does not open.
    let (_d, path) = init(2, &[ALICE, BOB, CAROL]);
    let mut v = json(&path);
    let alices = v["custodians"][0].clone();
    v["custodians"][1]["share"] = alices["share"].clone();
    v["custodians"][1]["kdf"] = alices["kdf"].clone();
    write_json(&path, &v);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    let err = u.submit("bob", ALICE.1).unwrap_err();
    assert!(matches!(err, KekError::WrongPassphrase { .. }), "{err:?}");

    // A share from another keyring does not open either.
    let (_d1, one) = init(2, &[ALICE, BOB]);
    let (_d2, two) = init(2, &[ALICE, BOB]);
    let mut v = json(&one);
    v["custodians"][0] = json(&two)["custodians"][0].clone();
    write_json(&one, &v);
    let mut u = SealedKeyring::open(&one).unwrap().unsealer();
    assert!(matches!(
        u.submit(ALICE.0, ALICE.1),
        Err(KekError::WrongPassphrase { .. })
    ));
}

#[test]
fn tampered_kek_record_is_reported() {
    let (_d, path) = init(1, &[ALICE]);
    let mut v = json(&path);
    v["keks"][0]["kek_id"] = "soft:0000000000000000".into();
    write_json(&path, &v);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    let err = u.submit(ALICE.0, ALICE.1).unwrap_err();
    assert!(matches!(err, KekError::Malformed { .. }), "{err:?}");

    let (_d, path) = init(1, &[ALICE]);
    let mut v = json(&path);
    v["unexpected"] = 1.into();
    write_json(&path, &v);
    assert!(matches!(
        SealedKeyring::open(&path),
        Err(KekError::Malformed { .. })
    ));
}

#[test]
fn kek_versions_are_added_and_destroyed_in_the_file() {
    let (_d, path) = init(2, &[ALICE, BOB, CAROL]);
    let mut keyring = unseal(&path, &[ALICE, BOB]);
    let v1 = keyring.current_kek().unwrap();
    let v2 = keyring.add_kek_version().unwrap();
    assert_eq!((v1.version(), v2.version()), (1, 2));
    assert_ne!(v1.kek_id(), v2.kek_id());
    assert_eq!(keyring.current_kek().unwrap().kek_id(), v2.kek_id());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let on_disk = SealedKeyring::open(&path).unwrap().versions();
    assert_eq!(on_disk, keyring.versions());
    assert_eq!(on_disk.len(), 2);

    let blob = v2.wrap("dek:1", &[2u8; 32]).unwrap();
    let reopened = unseal(&path, &[CAROL, BOB]);
    assert_eq!(
        reopened
            .kek(2)
            .unwrap()
            .unwrap("dek:1", &blob)
            .unwrap()
            .as_slice(),
        &[2u8; 32]
    );

    keyring.destroy_kek_version(1).unwrap();
    assert!(matches!(
        keyring.destroy_kek_version(1),
        Err(KekError::KekVersionNotFound { version: 1 })
    ));
    assert!(matches!(
        v1.wrap("dek:1", &[0u8; 32]),
        Err(KekError::KekGone { .. })
    ));
    let versions: Vec<u32> = SealedKeyring::open(&path)
        .unwrap()
        .versions()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, vec![2]);
    // Numbers are never reused.
    keyring.destroy_kek_version(2).unwrap();
    assert!(keyring.current_kek().is_none());
    assert_eq!(keyring.add_kek_version().unwrap().version(), 3);
    // The empty-then-refilled keyring still unseals (the check value does not
    // depend on any KEK).
    let again = unseal(&path, &[ALICE, CAROL]);
    assert_eq!(again.versions().len(), 1);
    assert!(matches!(
        again.kek(1),
        Err(KekError::KekVersionNotFound { version: 1 })
    ));
}

#[test]
fn concurrent_edits_are_refused() {
    let (_d, path) = init(1, &[ALICE, BOB]);
    let mut one = unseal(&path, &[ALICE]);
    let mut two = unseal(&path, &[BOB]);
    one.add_kek_version().unwrap();
    let err = two.add_kek_version().unwrap_err();
    assert!(matches!(err, KekError::KeyringChanged { .. }), "{err:?}");
    assert!(matches!(
        two.destroy_kek_version(1),
        Err(KekError::KeyringChanged { .. })
    ));
    assert_eq!(SealedKeyring::open(&path).unwrap().versions().len(), 2);
}

#[test]
fn sealing_zeroizes_and_kills_handles() {
    let (_d, path) = init(1, &[ALICE]);
    let keyring = unseal(&path, &[ALICE]);
    let kek = keyring.current_kek().unwrap();
    let blob = kek.wrap("dek:1", &[1u8; 32]).unwrap();
    let shown = format!("{keyring:?} {kek:?}");
    assert!(!shown.contains(ALICE.1), "{shown}");
    keyring.seal();
    assert!(matches!(
        kek.unwrap("dek:1", &blob),
        Err(KekError::Sealed { .. })
    ));
    // Dropping seals too.
    let keyring = unseal(&path, &[ALICE]);
    let kek = keyring.kek(1).unwrap();
    drop(keyring);
    assert!(matches!(
        kek.wrap("dek:1", &[1u8; 32]),
        Err(KekError::Sealed { .. })
    ));
}

#[test]
fn unsealer_debug_names_custodians_only() {
    let (_d, path) = init(2, &[ALICE, BOB]);
    let mut u = SealedKeyring::open(&path).unwrap().unsealer();
    u.submit(ALICE.0, ALICE.1).unwrap();
    let shown = format!("{u:?}");
    assert!(shown.contains("alice"), "{shown}");
    assert!(!shown.contains(ALICE.1), "{shown}");
}
