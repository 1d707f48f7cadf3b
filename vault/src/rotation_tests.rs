//! Key lifecycle on both backends: rotation and the re-encryption pass,
//! interruption, idempotent tokenization during a fingerprint rotation,
//! retirement, destruction (crypto-shredding) and KEK rotation.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use audit::Action;
use hsm_shim::{KeyEncryptionKey, SoftwareKek};
use zeroize::Zeroizing;

use super::*;
use crate::access::{Principal, Role, TenantScope};
use crate::service::CardInput;
use crate::store::tests::TestStore;
use crate::store::Store;

/// A card number from the Visa test BIN 411111 with a valid Luhn digit.
fn test_pan(i: u32) -> String {
    let body = format!("411111{i:09}");
    let sum: u32 = body
        .chars()
        .rev()
        .enumerate()
        .map(|(n, c)| {
            let d = c.to_digit(10).unwrap();
            if n % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

fn card(pan: &str) -> CardInput {
    CardInput {
        pan: Zeroizing::new(pan.to_owned()),
        exp_month: 12,
        exp_year: i64::from(time::OffsetDateTime::now_utc().year()) + 3,
        cardholder_name: None,
        cvc: None,
    }
}

fn ctx() -> RequestContext {
    RequestContext {
        principal: Principal {
            id: "id".into(),
            name: "tester".into(),
            roles: [Role::Tokenize, Role::Detokenize]
                .into_iter()
                .collect::<BTreeSet<_>>(),
            tenants: TenantScope::All,
        },
        source: "127.0.0.1:1".into(),
        request_id: "req".into(),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    kek: Arc<dyn KeyEncryptionKey>,
    other_kek: Arc<dyn KeyEncryptionKey>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let kek = Arc::new(SoftwareKek::generate(&dir.path().join("kek.key")).unwrap());
    let other_kek = Arc::new(SoftwareKek::generate(&dir.path().join("new.key")).unwrap());
    Env {
        _dir: dir,
        kek,
        other_kek,
    }
}

/// Tokenize `n` generated cards over two tenants; token -> card number.
async fn populate(vault: &Vault, n: u32) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for tenant in ["shop-1", "shop-2"] {
        let pans: Vec<String> = (0..n / 2).map(test_pan).collect();
        let infos = vault
            .tokenize_many(&ctx(), tenant, pans.iter().map(|p| card(p)).collect())
            .await
            .unwrap();
        for (info, pan) in infos.into_iter().zip(pans) {
            out.insert(info.unwrap().token, pan);
        }
    }
    out
}

async fn assert_all_readable(vault: &Vault, tokens: &BTreeMap<String, String>, name: &str) {
    for (token, pan) in tokens {
        let d = vault
            .detokenize(&ctx(), token, "rotation test")
            .await
            .unwrap_or_else(|e| panic!("{name}: {token}: {e}"));
        assert_eq!(d.card.pan.expose_digits(), pan.as_str(), "{name}");
    }
}

async fn count(store: &Arc<dyn Store>, action: Action) -> usize {
    store
        .audit_events(0, 100_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event.action == action)
        .count()
}

async fn card_count(store: &Arc<dyn Store>) -> u64 {
    let usage = store.key_usage().await.unwrap();
    usage.by_dek.values().sum()
}

/// Run the pass to the end on the given instances in turn.
async fn finish_pass(vaults: &[&Vault], limit: u32) -> (u64, usize) {
    let (mut moved, mut finished) = (0, 0);
    for round in 0..10_000 {
        let p = vaults[round % vaults.len()]
            .reencrypt_batch(limit)
            .await
            .unwrap();
        moved += p.moved;
        finished += usize::from(p.finished);
        if p.remaining == 0 {
            break;
        }
    }
    (moved, finished)
}

#[tokio::test]
async fn rotation_and_the_pass_move_every_record_and_every_token_still_opens() {
    for t in TestStore::all().await {
        let e = env();
        let store = t.store();
        let a = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        // A second instance on the same database, opened before the rotation.
        let b = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let tokens = populate(&a, 30).await;

        let r = a.rotate_dek(Actor::Local, true).await.unwrap();
        assert_eq!(
            r,
            Rotation {
                dek_version: 2,
                fingerprint_version: 2,
                fingerprint_rotated: true
            }
        );
        let status = a.key_status(CryptoPeriods::default()).await.unwrap();
        assert_eq!((status.active_dek, status.active_fingerprint), (2, 2));
        assert_eq!(status.remaining, 30, "{}", t.name());
        assert_eq!(status.reencrypted_at, None);
        let states: Vec<_> = status
            .keys
            .iter()
            .map(|k| (k.purpose, k.version, k.state, k.records))
            .collect();
        assert_eq!(
            states,
            [
                (KeyPurpose::Dek, 1, KeyState::DecryptOnly, 30),
                (KeyPurpose::Dek, 2, KeyState::Active, 0),
                (KeyPurpose::Fingerprint, 1, KeyState::DecryptOnly, 30),
                (KeyPurpose::Fingerprint, 2, KeyState::Active, 0),
            ]
        );
        assert!(status.keys.iter().all(|k| !k.past_crypto_period));
        let expired = a
            .key_status(CryptoPeriods {
                dek: std::time::Duration::ZERO,
                fingerprint: std::time::Duration::from_secs(3600),
                audit_signing: std::time::Duration::from_secs(3600),
            })
            .await
            .unwrap();
        assert!(expired
            .keys
            .iter()
            .all(|k| k.past_crypto_period == (k.purpose == KeyPurpose::Dek)));

        // New records go under the new keys, also from the stale instance
        // (refused as stale by the store, it reloads and seals again).
        let fresh = b
            .tokenize(&ctx(), "shop-3", card("5555555555554444"))
            .await
            .unwrap();
        let row = store.find_card(&fresh.token).await.unwrap().unwrap();
        assert_eq!((row.key_version, row.fingerprint_version), (2, 2));

        // Both instances run the pass, in small batches; one finish event.
        let (moved, finished) = finish_pass(&[&a, &b], 7).await;
        assert_eq!(moved, 30, "{}", t.name());
        assert_eq!(finished, 1);
        let usage = store.key_usage().await.unwrap();
        assert_eq!(usage.by_dek.into_iter().collect::<Vec<_>>(), [(2, 31)]);
        assert_eq!(
            usage.by_fingerprint.into_iter().collect::<Vec<_>>(),
            [(2, 31)]
        );
        // Idle batches record nothing more.
        assert_eq!(
            a.reencrypt_batch(7).await.unwrap(),
            Progress {
                counted: true,
                ..Progress::default()
            }
        );
        assert_eq!(count(&store, Action::ReencryptionStarted).await, 1);
        assert_eq!(count(&store, Action::ReencryptionFinished).await, 1);
        assert_eq!(count(&store, Action::KeyRotated).await, 2);
        assert!(a
            .key_status(CryptoPeriods::default())
            .await
            .unwrap()
            .reencrypted_at
            .is_some());

        assert_all_readable(&a, &tokens, t.name()).await;
        assert_all_readable(&b, &tokens, t.name()).await;
        // A card tokenized before the rotation keeps its token (now found
        // under its new fingerprint).
        let (_, pan) = tokens.iter().next().unwrap();
        let again = b
            .tokenize_many(&ctx(), "shop-1", vec![card(pan)])
            .await
            .unwrap();
        let again = again[0].as_ref().unwrap();
        assert!(!again.created && tokens.contains_key(&again.token));
        assert_eq!(tokens[&again.token], *pan);
        assert_eq!(card_count(&store).await, 31);
    }
}

#[tokio::test]
async fn an_interrupted_pass_leaves_every_record_readable_and_a_later_one_finishes() {
    for t in TestStore::all().await {
        let e = env();
        let store = t.store();
        let vault = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let tokens = populate(&vault, 20).await;
        vault.rotate_dek(Actor::Local, true).await.unwrap();

        // One batch, then the pass stops (between batches).
        let p = vault.reencrypt_batch(6).await.unwrap();
        assert_eq!((p.moved, p.remaining, p.finished), (6, 14, false));
        assert_all_readable(&vault, &tokens, t.name()).await;

        // A batch whose transaction fails midway (its UPDATE is refused
        // after the rows were read and resealed): nothing of it stays.
        let (break_sql, repair_sql): (&[&str], &[&str]) = match t {
            TestStore::Sqlite(..) => (
                &["CREATE TRIGGER cards_broken BEFORE UPDATE ON cards BEGIN SELECT RAISE(ABORT, 'pass down'); END"],
                &["DROP TRIGGER cards_broken"],
            ),
            TestStore::Postgres(..) => (
                &[
                    "CREATE FUNCTION pass_down() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'pass down'; END $$",
                    "CREATE TRIGGER cards_broken BEFORE UPDATE ON cards FOR EACH ROW EXECUTE FUNCTION pass_down()",
                ],
                &["DROP TRIGGER cards_broken ON cards", "DROP FUNCTION pass_down()"],
            ),
        };
        for sql in break_sql {
            t.exec(sql).await.unwrap();
        }
        let err = vault.reencrypt_batch(6).await.unwrap_err();
        assert_eq!(err.code(), "storage_unavailable");
        assert_eq!(
            store.count_outdated(2, 2).await.unwrap(),
            14,
            "{}: the failed batch changed nothing",
            t.name()
        );
        assert_all_readable(&vault, &tokens, t.name()).await;
        for sql in repair_sql {
            t.exec(sql).await.unwrap();
        }

        // A restarted instance (no memory of where the pass was) finishes it.
        drop(vault);
        let restarted = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let (moved, finished) = finish_pass(&[&restarted], 4).await;
        assert_eq!((moved, finished), (14, 1), "{}", t.name());
        assert_all_readable(&restarted, &tokens, t.name()).await;
        assert_eq!(count(&store, Action::ReencryptionFinished).await, 1);
    }
}

#[tokio::test]
async fn a_known_card_keeps_its_token_during_a_fingerprint_rotation() {
    for t in TestStore::all().await {
        let e = env();
        let store = t.store();
        let a = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let stale = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let tokens = populate(&a, 10).await;
        let first = a
            .tokenize(&ctx(), "shop-1", card("4242424242424242"))
            .await
            .unwrap();
        a.rotate_dek(Actor::Local, true).await.unwrap();

        let check = |info: &crate::TokenInfo| {
            assert_eq!(info.token, first.token, "{}", t.name());
            assert!(!info.created);
        };
        // Before any record moved: found under its old fingerprint, by the
        // rotating instance and by a stale one.
        check(
            &a.tokenize(&ctx(), "shop-1", card("4242 4242 4242 4242"))
                .await
                .unwrap(),
        );
        check(
            &stale
                .tokenize(&ctx(), "shop-1", card("4242424242424242"))
                .await
                .unwrap(),
        );
        // In a batch with itself and a new card.
        let batch = a
            .tokenize_many(
                &ctx(),
                "shop-1",
                vec![
                    card("4242424242424242"),
                    card("378282246310005"),
                    card("4242424242424242"),
                ],
            )
            .await
            .unwrap();
        check(batch[0].as_ref().unwrap());
        check(batch[2].as_ref().unwrap());
        assert!(batch[1].as_ref().unwrap().created);
        // Midway through the pass, and after it.
        a.reencrypt_batch(3).await.unwrap();
        check(
            &a.tokenize(&ctx(), "shop-1", card("4242424242424242"))
                .await
                .unwrap(),
        );
        finish_pass(&[&a], 3).await;
        check(
            &stale
                .tokenize(&ctx(), "shop-1", card("4242424242424242"))
                .await
                .unwrap(),
        );
        // Every card of before also keeps its token.
        for (token, pan) in &tokens {
            let mut found = Vec::new();
            for tenant in ["shop-1", "shop-2"] {
                found.push(a.tokenize(&ctx(), tenant, card(pan)).await.unwrap().token);
            }
            assert!(found.contains(token), "{}", t.name());
        }
        // Never a second row: 10 generated + the known card + the new one.
        assert_eq!(card_count(&store).await, 12, "{}", t.name());
    }
}

#[tokio::test]
async fn retirement_waits_for_the_pass_and_destruction_shreds_the_key() {
    for t in TestStore::all().await {
        let e = env();
        let store = t.store();
        let vault = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let tokens = populate(&vault, 8).await;
        let (keep_token, _) = tokens.iter().next().unwrap();
        // A record under DEK 1, kept aside to be put back after DEK 1 is
        // destroyed (a record nothing can open any more).
        let old_row = store.find_card(keep_token).await.unwrap().unwrap();
        vault.rotate_dek(Actor::Local, false).await.unwrap();

        let code = |r: Result<(), VaultError>| r.unwrap_err().code();
        let local = Actor::Local;
        assert_eq!(
            code(vault.retire(local, KeyPurpose::Dek, 1).await),
            "key_in_use"
        );
        assert_eq!(
            code(vault.retire(local, KeyPurpose::Dek, 2).await),
            "key_active"
        );
        assert_eq!(
            code(vault.retire(local, KeyPurpose::Fingerprint, 1).await),
            "key_active"
        );
        assert_eq!(
            code(vault.retire(local, KeyPurpose::Dek, 9).await),
            "key_not_found"
        );
        assert_eq!(
            code(vault.destroy(local, KeyPurpose::Dek, 1).await),
            "key_state"
        );
        // API callers need key_admin.
        let no_admin = ctx();
        assert_eq!(
            code(
                vault
                    .retire(Actor::Request(&no_admin), KeyPurpose::Dek, 1)
                    .await
            ),
            "forbidden"
        );

        finish_pass(&[&vault], 5).await;
        vault.retire(local, KeyPurpose::Dek, 1).await.unwrap();
        assert!(vault.keys.keys().dek(1).is_none(), "dropped from memory");
        assert_eq!(
            code(vault.retire(local, KeyPurpose::Dek, 1).await),
            "key_state"
        );
        vault.destroy(local, KeyPurpose::Dek, 1).await.unwrap();
        let keys = store.load_keys().await.unwrap();
        let dek1 = keys
            .iter()
            .find(|k| k.purpose == KeyPurpose::Dek && k.version == 1)
            .unwrap();
        assert_eq!(dek1.state, KeyState::Destroyed);
        assert!(dek1.wrapped.is_empty() && dek1.destroyed_at.is_some());
        assert_eq!(count(&store, Action::KeyRetired).await, 6, "1 + 5 refusals");
        assert_eq!(count(&store, Action::KeyDestroyed).await, 2, "1 + refusal");

        // Put the old record back under DEK 1 (as a forgotten copy would be).
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let blob = |b: &[u8]| match t {
            TestStore::Sqlite(..) => format!("x'{}'", hex(b)),
            TestStore::Postgres(..) => format!("decode('{}', 'hex')", hex(b)),
        };
        t.exec(&format!(
            "UPDATE cards SET key_version = 1, nonce = {}, ciphertext = {} WHERE token = '{}'",
            blob(&old_row.nonce),
            blob(&old_row.ciphertext),
            keep_token
        ))
        .await
        .unwrap();
        // Opening a vault needs no destroyed key; the record cannot be opened.
        let reopened = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        for v in [&vault, &reopened] {
            let err = v
                .detokenize(&ctx(), keep_token, "after destruction")
                .await
                .unwrap_err();
            assert_eq!(err.code(), "key_destroyed", "{}", t.name());
            assert!(matches!(
                err,
                VaultError::KeyLifecycle(KeyLifecycleError::Destroyed)
            ));
        }
        // The pass cannot move it either (skipped, never finished again).
        let p = reopened.reencrypt_batch(50).await.unwrap();
        assert_eq!((p.moved, p.skipped, p.remaining), (0, 1, 1));
        // Everything else still opens.
        let rest: BTreeMap<String, String> = tokens
            .iter()
            .filter(|(k, _)| *k != keep_token)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_all_readable(&reopened, &rest, t.name()).await;

        // A backup carries the key states (the destroyed key without
        // material) and restores into a vault that behaves the same.
        let file = e._dir.path().join(format!("{}.backup", t.name()));
        crate::backup::write_backup(&*store, &*e.kek, &file)
            .await
            .unwrap();
        let target = TestStore::sqlite().await;
        crate::backup::restore_backup(&*target.store(), &*e.kek, &file)
            .await
            .unwrap();
        assert_eq!(
            target.store().load_keys().await.unwrap(),
            store.load_keys().await.unwrap()
        );
        let restored = Vault::open(target.store(), e.kek.clone()).await.unwrap();
        assert_all_readable(&restored, &rest, t.name()).await;
        assert_eq!(
            restored
                .detokenize(&ctx(), keep_token, "after restore")
                .await
                .unwrap_err()
                .code(),
            "key_destroyed"
        );
    }
}

#[tokio::test]
async fn a_kek_rotation_rewraps_every_key_and_the_old_kek_opens_none() {
    for t in TestStore::all().await {
        let e = env();
        let store = t.store();
        let vault = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let tokens = populate(&vault, 6).await;
        vault.rotate_dek(Actor::Local, true).await.unwrap();
        let public_key = vault.audit_public_key().to_owned();
        assert_eq!(
            vault
                .rotate_kek(Actor::Local, e.kek.clone())
                .await
                .unwrap_err()
                .code(),
            "kek_unchanged"
        );
        vault
            .rotate_kek(Actor::Local, e.other_kek.clone())
            .await
            .unwrap();
        assert_eq!(vault.keys.kek_id(), e.other_kek.kek_id());
        assert_eq!(count(&store, Action::KekRotated).await, 2, "1 + refusal");
        // The running vault goes on, and wraps new keys under the new KEK.
        assert_all_readable(&vault, &tokens, t.name()).await;
        vault.rotate_dek(Actor::Local, false).await.unwrap();
        assert!(vault.checkpoint().await.unwrap().is_some());

        // Reopened with the new KEK: every key (and the signing key) opens.
        let reopened = Vault::open(store.clone(), e.other_kek.clone())
            .await
            .unwrap();
        assert_eq!(reopened.audit_public_key(), public_key);
        assert_all_readable(&reopened, &tokens, t.name()).await;
        // The old KEK opens nothing any more.
        let err = Vault::open(store.clone(), e.kek.clone()).await.unwrap_err();
        assert!(matches!(err, KeysError::WrongKek { .. }), "{err}");
        for k in store.load_keys().await.unwrap() {
            assert_eq!(k.kek_id, e.other_kek.kek_id());
            assert!(e
                .kek
                .unwrap(&label(k.purpose, k.version), &k.wrapped)
                .is_err());
        }
        for k in store.load_signing_keys().await.unwrap() {
            assert_eq!(k.kek_id, e.other_kek.kek_id());
            assert!(e
                .kek
                .unwrap(&signing_label(k.generation), &k.wrapped)
                .is_err());
        }
    }
}

#[tokio::test]
async fn concurrent_passes_and_tokenizations_make_no_duplicate_and_one_finish() {
    for t in TestStore::all().await {
        let e = env();
        let store = t.store();
        let a = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let b = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let c = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let tokens = populate(&a, 40).await;
        a.rotate_dek(Actor::Local, true).await.unwrap();

        let (only_a, only_b) = ([&a], [&b]);
        let retokenize = || async {
            let mut same = 0;
            for _ in 0..2 {
                for (token, pan) in &tokens {
                    let again = c
                        .tokenize_many(&ctx(), "shop-1", vec![card(pan)])
                        .await
                        .unwrap();
                    let again = again[0].as_ref().unwrap();
                    assert!(!again.created, "{}", t.name());
                    same += usize::from(again.token == *token);
                }
            }
            same
        };
        let ((_, fa), (_, fb), same) = tokio::join!(
            finish_pass(&only_a, 3),
            finish_pass(&only_b, 3),
            retokenize()
        );
        assert_eq!(fa + fb, 1, "{}: one finish", t.name());
        assert_eq!(
            same,
            40,
            "{}: each shop-1 card found once per round",
            t.name()
        );
        assert_eq!(card_count(&store).await, 40, "{}", t.name());
        assert_eq!(store.count_outdated(2, 2).await.unwrap(), 0);
        assert_eq!(count(&store, Action::ReencryptionFinished).await, 1);
        assert_all_readable(&c, &tokens, t.name()).await;
    }
}

/// The whole chained trail and its checkpoints, verified with `keys`.
async fn verify_stored(
    store: &Arc<dyn Store>,
    keys: impl Into<audit::TrustedKeys>,
) -> Result<audit::Report, audit::Failure> {
    let entries = store.chained_events(0, 100_000).await.unwrap();
    let checkpoints = store.checkpoints().await.unwrap();
    audit::verify_trail(&entries, checkpoints, keys)
}

#[tokio::test]
async fn an_audit_signing_rotation_is_announced_by_the_old_key_and_verifies_from_it() {
    for t in TestStore::all().await {
        let e = env();
        let store = t.store();
        let vault = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        // A second instance that still holds the first key.
        let other = Vault::open(store.clone(), e.kek.clone()).await.unwrap();
        let first = audit::VerifyingKey::parse(&vault.audit_public_key()).unwrap();
        let tokens = populate(&vault, 4).await;
        assert!(vault.checkpoint().await.unwrap().is_some());
        let old_key = vault.keys.audit_signing_key();

        let r = vault.rotate_audit_signing(Actor::Local).await.unwrap();
        assert_eq!(r.generation, 2);
        assert_eq!(r.previous_key_id, first.key_id());
        let next = audit::VerifyingKey::parse(&r.public_key).unwrap();
        assert_eq!(r.announcement.key_id, first.key_id());
        assert_eq!(r.announcement.next_key.as_ref(), Some(&next));
        assert_eq!(r.announcement.tree_size, store.audit_size().await.unwrap());
        assert_eq!(vault.audit_public_key(), r.public_key);
        assert_eq!(
            vault.audit_public_keys(),
            vec![first.to_string(), r.public_key.clone()]
        );
        let rotated: Vec<_> = store
            .audit_events(0, 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event.action == Action::KeyRotated)
            .collect();
        assert_eq!(
            rotated.last().unwrap().event.detail.as_deref(),
            Some("audit_signing:2 active, audit_signing:1 retired"),
            "{}",
            t.name()
        );

        // The other instance signs next: the store refuses its retired
        // key, it reloads and signs with the new one.
        populate(&other, 2).await;
        let cp = other.checkpoint().await.unwrap().unwrap();
        assert_eq!(cp.key_id, next.key_id(), "{}", t.name());
        assert_eq!(other.audit_public_key(), r.public_key);
        // The old key itself is refused by the store.
        populate(&vault, 2).await;
        assert!(matches!(
            store.write_checkpoint(&old_key).await,
            Err(crate::store::StoreError::StaleKeys)
        ));
        assert!(vault.checkpoint().await.unwrap().is_some());
        let keys = store.load_signing_keys().await.unwrap();
        assert_eq!(keys[0].state(), KeyState::Retired);
        assert_eq!(keys[1].state(), KeyState::Active);

        // The trail verifies from the first key alone, across the rotation.
        let report = verify_stored(&store, &first).await.unwrap();
        assert_eq!(report.handovers.len(), 1);
        assert_eq!(report.handovers[0].to, next.key_id());
        // The new key alone does not verify the checkpoints before it.
        assert!(verify_stored(&store, &next).await.is_err());

        // Destroy: only a retired generation; its secret erased, its public
        // key kept.
        assert_eq!(
            vault
                .destroy_audit_signing(Actor::Local, 2)
                .await
                .unwrap_err()
                .code(),
            "key_active"
        );
        assert_eq!(
            vault
                .destroy_audit_signing(Actor::Local, 7)
                .await
                .unwrap_err()
                .code(),
            "key_not_found"
        );
        vault.destroy_audit_signing(Actor::Local, 1).await.unwrap();
        assert_eq!(
            vault
                .destroy_audit_signing(Actor::Local, 1)
                .await
                .unwrap_err()
                .code(),
            "key_state"
        );
        let keys = store.load_signing_keys().await.unwrap();
        assert_eq!(keys[0].state(), KeyState::Destroyed);
        assert!(keys[0].wrapped.is_empty());
        assert_eq!(keys[0].public_key, first.to_string());
        let status = vault.key_status(CryptoPeriods::default()).await.unwrap();
        let states: Vec<_> = status.signing_keys.iter().map(|k| k.state).collect();
        assert_eq!(states, vec![KeyState::Destroyed, KeyState::Active]);

        // A KEK rotation skips the destroyed generation; reopened, the vault
        // signs with generation 2 and a second rotation announces a third.
        vault
            .rotate_kek(Actor::Local, e.other_kek.clone())
            .await
            .unwrap();
        let reopened = Vault::open(store.clone(), e.other_kek.clone())
            .await
            .unwrap();
        assert_eq!(reopened.audit_public_key(), r.public_key);
        assert_all_readable(&reopened, &tokens, t.name()).await;
        let third = reopened.rotate_audit_signing(Actor::Local).await.unwrap();
        assert_eq!(third.generation, 3);
        assert_eq!(third.previous_key_id, next.key_id());
        populate(&reopened, 2).await;
        assert!(reopened.checkpoint().await.unwrap().is_some());
        let report = verify_stored(&store, &first).await.unwrap();
        assert_eq!(report.handovers.len(), 2, "{}", t.name());
        assert_eq!(report.anchored, report.last_seq);
    }
}
