//! A forwarded call's `Idempotency-Key`, on both backends: claimed fresh,
//! completed and replayed with the same answer; refused when reused with
//! another request, in use, or of unknown outcome; released; per principal
//! and upstream; purged after 24 hours; one winner among concurrent claims;
//! sealed (no card number in the row) and opened after a DEK rotation.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use audit::Action;
use hsm_shim::{KeyEncryptionKey, SoftwareKek};

use super::*;
use crate::access::{Principal, TenantScope};
use crate::rotation::Actor;
use crate::store::tests::TestStore;
use crate::store::{ForwardKeyState, KeyPurpose};

const LONG: Duration = Duration::from_secs(600);
/// A test card number, in an answer body (the handler re-tokenizes
/// answers; the store must not show it even if one got through).
const PAN: &str = "4111111111111111";

fn fwd(principal: &str) -> RequestContext {
    RequestContext {
        principal: Principal {
            id: principal.into(),
            name: format!("router-{principal}"),
            roles: [Role::Forward].into_iter().collect::<BTreeSet<_>>(),
            tenants: TenantScope::All,
        },
        source: "127.0.0.1:1".into(),
        request_id: "req".into(),
    }
}

fn target(upstream: &str) -> ForwardTarget<'_> {
    ForwardTarget {
        upstream,
        path_pattern: "/v1/payments",
        tenants: None,
    }
}

fn request(body: &str) -> [u8; 32] {
    forward_request_hash(
        "POST",
        "acquirer/v1/payments",
        "application/json",
        body.as_bytes(),
    )
}

const BODY: &str = r#"{"card":"{{tok_AAAAAAAAAAAAAAAAAAAAAA.pan}}","amount":100}"#;

fn answer_body() -> String {
    format!(r#"{{"id":"pay_1","status":"authorized","echo":"{PAN}"}}"#)
}

fn answer(body: &[u8]) -> ForwardAnswer<'_> {
    ForwardAnswer {
        tenant: "shop-42",
        status: 201,
        content_type: Some("application/json"),
        location: Some("/v1/payments/pay_1"),
        body,
    }
}

struct Env {
    _dir: tempfile::TempDir,
    kek: Arc<dyn KeyEncryptionKey>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let kek = Arc::new(SoftwareKek::generate(&dir.path().join("kek.key")).unwrap());
    Env { _dir: dir, kek }
}

async fn vault(t: &TestStore, e: &Env) -> Vault {
    Vault::open(t.store(), e.kek.clone()).await.unwrap()
}

async fn fresh(v: &Vault, ctx: &RequestContext, upstream: &str, key: &str) -> ClaimHandle {
    match v
        .forward_claim(ctx, target(upstream), key, request(BODY), LONG)
        .await
        .unwrap()
    {
        IdempotentClaim::Fresh(h) => h,
        IdempotentClaim::Replay(a) => panic!("expected a fresh claim, got {a:?}"),
    }
}

async fn claim(
    v: &Vault,
    ctx: &RequestContext,
    key: &str,
    body: &str,
    stale_after: Duration,
) -> Result<IdempotentClaim, VaultError> {
    v.forward_claim(ctx, target("acquirer"), key, request(body), stale_after)
        .await
}

async fn events(t: &TestStore, action: Action) -> Vec<audit::AuditEvent> {
    t.store()
        .audit_events(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .filter(|e| e.action == action)
        .collect()
}

#[tokio::test]
async fn a_completed_call_is_replayed_with_the_same_answer_and_audited() {
    for t in TestStore::all().await {
        let name = t.name();
        let e = env();
        let v = vault(&t, &e).await;
        let router = fwd("p1");
        let h = fresh(&v, &router, "acquirer", "order-1001-attempt-1").await;
        let body = answer_body();
        assert!(v
            .forward_complete(h, answer(body.as_bytes()))
            .await
            .unwrap());
        for _ in 0..2 {
            match claim(&v, &router, "order-1001-attempt-1", BODY, LONG)
                .await
                .unwrap()
            {
                IdempotentClaim::Replay(a) => {
                    assert_eq!(a.status, 201, "{name}");
                    assert_eq!(a.content_type.as_deref(), Some("application/json"));
                    assert_eq!(a.location.as_deref(), Some("/v1/payments/pay_1"));
                    assert_eq!(a.tenant, "shop-42");
                    assert_eq!(a.body.as_slice(), body.as_bytes(), "{name}");
                    let printed = format!("{a:?}");
                    assert!(!printed.contains(PAN) && !printed.contains("pay_1"));
                }
                IdempotentClaim::Fresh(_) => panic!("{name}: a repeat must replay"),
            }
        }
        let replays = events(&t, Action::ForwardCompleted).await;
        assert_eq!(replays.len(), 2, "{name}");
        for r in &replays {
            assert_eq!(r.outcome, audit::Outcome::Success);
            assert_eq!(r.tenant.as_deref(), Some("shop-42"));
            assert_eq!(r.principal.as_deref(), Some("router-p1"));
            let detail = r.detail.as_deref().unwrap();
            assert!(detail.contains("idempotent_replay"), "{detail}");
            assert!(detail.contains("upstream acquirer path /v1/payments status 201"));
            assert!(!detail.contains("order-1001"), "the key is not recorded");
        }
        // The same key with another body: refused, audited, whatever the
        // state; the stored answer stays.
        let other = r#"{"card":"{{tok_AAAAAAAAAAAAAAAAAAAAAA.pan}}","amount":999}"#;
        assert!(matches!(
            claim(&v, &router, "order-1001-attempt-1", other, LONG).await,
            Err(VaultError::IdempotencyKeyReused)
        ));
        // Another method or path of the same body is another request.
        assert_ne!(
            forward_request_hash(
                "PUT",
                "acquirer/v1/payments",
                "application/json",
                BODY.as_bytes()
            ),
            request(BODY)
        );
        assert_ne!(
            forward_request_hash(
                "POST",
                "acquirer/v1/payment",
                "sapplication/json",
                BODY.as_bytes()
            ),
            request(BODY)
        );
        let h = fresh(&v, &router, "acquirer", "order-1002").await;
        assert!(matches!(
            claim(&v, &router, "order-1002", other, LONG).await,
            Err(VaultError::IdempotencyKeyReused)
        ));
        v.forward_key_release(h).await.unwrap();
        let refused: Vec<_> = events(&t, Action::Forward)
            .await
            .into_iter()
            .filter_map(|e| e.error_code)
            .collect();
        assert_eq!(refused, ["idempotency_key_reused"; 2], "{name}");
    }
}

#[tokio::test]
async fn a_pending_key_is_in_use_then_of_unknown_outcome_and_a_released_one_is_free() {
    for t in TestStore::all().await {
        let name = t.name();
        let e = env();
        let v = vault(&t, &e).await;
        let router = fwd("p1");
        let h = fresh(&v, &router, "acquirer", "k-pending").await;
        // Young: in use (retry shortly).
        assert!(matches!(
            claim(&v, &router, "k-pending", BODY, LONG).await,
            Err(VaultError::IdempotencyKeyInUse)
        ));
        // Older than stale_after: the vault stopped mid-call; the acquirer
        // may have it. Never fresh again for that key.
        for _ in 0..2 {
            assert!(
                matches!(
                    claim(&v, &router, "k-pending", BODY, Duration::ZERO).await,
                    Err(VaultError::UpstreamOutcomeUnknown)
                ),
                "{name}"
            );
        }
        // Released (the call never left): the key is free again.
        assert!(v.forward_key_release(h).await.unwrap());
        let h = fresh(&v, &router, "acquirer", "k-pending").await;
        assert!(v.forward_complete(h, answer(b"{}")).await.unwrap());
        let codes: Vec<_> = events(&t, Action::Forward)
            .await
            .into_iter()
            .filter_map(|e| e.error_code)
            .collect();
        assert_eq!(
            codes,
            [
                "idempotency_key_in_use",
                "upstream_outcome_unknown",
                "upstream_outcome_unknown"
            ],
            "{name}"
        );
    }
}

#[tokio::test]
async fn keys_are_per_principal_and_upstream_and_checked() {
    for t in TestStore::all().await {
        let name = t.name();
        let e = env();
        let v = vault(&t, &e).await;
        let a = fwd("p1");
        let b = fwd("p2");
        let h = fresh(&v, &a, "acquirer", "shared-key").await;
        v.forward_complete(h, answer(b"{\"by\":\"a\"}"))
            .await
            .unwrap();
        // The same key by another principal, or to another upstream: fresh.
        let hb = fresh(&v, &b, "acquirer", "shared-key").await;
        let hu = fresh(&v, &a, "other-acquirer", "shared-key").await;
        v.forward_complete(hb, answer(b"{\"by\":\"b\"}"))
            .await
            .unwrap();
        v.forward_key_release(hu).await.unwrap();
        for (ctx, want) in [(&a, &b"{\"by\":\"a\"}"[..]), (&b, &b"{\"by\":\"b\"}"[..])] {
            match claim(&v, ctx, "shared-key", BODY, LONG).await.unwrap() {
                IdempotentClaim::Replay(r) => assert_eq!(r.body.as_slice(), want, "{name}"),
                IdempotentClaim::Fresh(_) => panic!("{name}"),
            }
        }

        // Keys: 1 to 255 visible ASCII characters, never a card number.
        let long = "k".repeat(256);
        for bad in [
            "",
            " ",
            "a b",
            "tab\t",
            "é",
            long.as_str(),
            PAN,
            "order-4242424242424242",
        ] {
            assert!(
                matches!(
                    claim(&v, &a, bad, BODY, LONG).await,
                    Err(VaultError::InvalidIdempotencyKey)
                ),
                "{name}: {bad:?}"
            );
        }
        let ok = "~".repeat(255);
        let h = fresh(&v, &a, "acquirer", &ok).await;
        v.forward_key_release(h).await.unwrap();
        // Role forward only.
        let mut reader = fwd("p1");
        reader.principal.roles = [Role::Detokenize].into_iter().collect();
        assert!(matches!(
            claim(&v, &reader, "shared-key", BODY, LONG).await,
            Err(VaultError::Forbidden)
        ));
        assert_eq!(
            VaultError::InvalidIdempotencyKey.code(),
            "invalid_idempotency_key"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_claims_exactly_one_is_fresh() {
    for t in TestStore::all().await {
        let name = t.name();
        let e = env();
        let v = Arc::new(vault(&t, &e).await);
        for round in 0..3 {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let v = v.clone();
                    tokio::spawn(async move {
                        claim(&v, &fwd("p1"), &format!("race-{round}"), BODY, LONG).await
                    })
                })
                .collect();
            let (mut fresh, mut in_use) = (0, 0);
            for task in tasks {
                match task.await.unwrap() {
                    Ok(IdempotentClaim::Fresh(h)) => {
                        fresh += 1;
                        v.forward_complete(h, answer(b"{}")).await.unwrap();
                    }
                    Err(VaultError::IdempotencyKeyInUse) => in_use += 1,
                    // The winner may have completed before a later claim.
                    Ok(IdempotentClaim::Replay(_)) => {}
                    Err(other) => panic!("{name}: {other}"),
                }
            }
            assert_eq!(fresh, 1, "{name}");
            assert!(in_use <= 7, "{name}");
        }
    }
}

#[tokio::test]
async fn the_stored_answer_is_sealed_bound_to_its_row_and_opens_after_a_rotation() {
    for t in TestStore::all().await {
        let name = t.name();
        let e = env();
        let a = vault(&t, &e).await;
        // A second instance, opened before the rotation.
        let b = vault(&t, &e).await;
        let router = fwd("p1");
        let body = answer_body();
        let h = fresh(&a, &router, "acquirer", "k-v1").await;
        a.forward_complete(h, answer(body.as_bytes()))
            .await
            .unwrap();

        // The row: no card number, no clear body, no raw key anywhere.
        let store = t.store();
        let key_hash = {
            use sha2::{Digest, Sha256};
            Sha256::digest(b"k-v1")
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        };
        let row = store
            .find_forward_key("p1", "acquirer", &key_hash)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.state, ForwardKeyState::Completed);
        let stored = row.answer.clone().unwrap();
        assert_eq!(stored.key_version, 1);
        let printed = format!("{row:?}");
        assert!(
            !printed.contains(PAN) && !printed.contains("k-v1"),
            "{name}"
        );
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(!find(&stored.ciphertext, PAN.as_bytes()), "{name}");
        assert!(!find(&stored.ciphertext, b"authorized"), "{name}");
        let raw_hits = t
            .exec(&format!(
                "DELETE FROM forward_idempotency WHERE principal_id = 'nobody'
                   OR request_hash LIKE '%{PAN}%' OR key_hash LIKE '%k-v1%'
                   OR tenant LIKE '%{PAN}%' OR location LIKE '%{PAN}%'"
            ))
            .await
            .unwrap();
        assert_eq!(raw_hits, 0, "{name}");

        // A location or content type holding a card number is not stored.
        let h = fresh(&a, &router, "acquirer", "k-loc").await;
        let loc = format!("/v1/payments?card={PAN}");
        a.forward_complete(
            h,
            ForwardAnswer {
                location: Some(&loc),
                ..answer(b"{}")
            },
        )
        .await
        .unwrap();
        match claim(&a, &router, "k-loc", BODY, LONG).await.unwrap() {
            IdempotentClaim::Replay(r) => assert_eq!(r.location, None, "{name}"),
            IdempotentClaim::Fresh(_) => panic!("{name}"),
        }

        // The rotation: the old answer still opens (its version is kept);
        // a new one is sealed under DEK 2 by the rotating instance and
        // opened by the instance that did not know DEK 2 yet.
        a.rotate_dek(Actor::Local, false).await.unwrap();
        let h = fresh(&a, &router, "acquirer", "k-v2").await;
        a.forward_complete(h, answer(b"{\"v\":2}")).await.unwrap();
        for (v, key, want) in [
            (&a, "k-v1", body.as_bytes()),
            (&b, "k-v1", body.as_bytes()),
            (&b, "k-v2", &b"{\"v\":2}"[..]),
        ] {
            match claim(v, &router, key, BODY, LONG).await.unwrap() {
                IdempotentClaim::Replay(r) => assert_eq!(r.body.as_slice(), want, "{name} {key}"),
                IdempotentClaim::Fresh(_) => panic!("{name}"),
            }
        }
        // DEK 1 is retired only once no stored answer uses it.
        while a.reencrypt_batch(100).await.unwrap().remaining > 0 {}
        assert!(
            matches!(
                a.retire(Actor::Local, KeyPurpose::Dek, 1).await,
                Err(VaultError::KeyLifecycle(KeyLifecycleError::InUse))
            ),
            "{name}"
        );
        assert_eq!(
            t.exec("UPDATE forward_idempotency SET created_at = 0")
                .await
                .unwrap(),
            3
        );
        assert_eq!(a.purge_forward_keys("test").await.unwrap(), 3, "{name}");
        a.retire(Actor::Local, KeyPurpose::Dek, 1).await.unwrap();

        // The clear metadata is bound: a changed status fails to open.
        let h = fresh(&a, &router, "acquirer", "k-bound").await;
        a.forward_complete(h, answer(b"{}")).await.unwrap();
        t.exec("UPDATE forward_idempotency SET status = 200")
            .await
            .unwrap();
        assert!(
            matches!(
                claim(&a, &router, "k-bound", BODY, LONG).await,
                Err(VaultError::Integrity)
            ),
            "{name}"
        );
    }
}

#[tokio::test]
async fn keys_are_purged_after_a_day_and_an_expired_key_is_free() {
    for t in TestStore::all().await {
        let name = t.name();
        let e = env();
        let v = vault(&t, &e).await;
        let router = fwd("p1");
        for key in ["old-done", "old-pending", "new"] {
            let h = fresh(&v, &router, "acquirer", key).await;
            if key != "old-pending" {
                v.forward_complete(h, answer(b"{}")).await.unwrap();
            }
        }
        let day = i64::try_from(FORWARD_ANSWER_TTL.as_millis()).unwrap();
        let old = crate::store::now_millis() - day - 1000;
        // Older than a day, not purged yet: gone for a claim (fresh).
        t.exec(&format!(
            "UPDATE forward_idempotency SET created_at = {old} WHERE principal_id = 'p1'"
        ))
        .await
        .unwrap();
        let h = fresh(&v, &router, "acquirer", "new").await;
        v.forward_key_release(h).await.unwrap();
        assert_eq!(v.purge_forward_keys("service").await.unwrap(), 2, "{name}");
        assert_eq!(v.purge_forward_keys("service").await.unwrap(), 0, "{name}");
        let purged = events(&t, Action::ForwardKeysExpired).await;
        assert_eq!(purged.len(), 1, "{name}");
        assert_eq!(purged[0].detail.as_deref(), Some("deleted=2"));
        assert_eq!(purged[0].source.as_deref(), Some("service"));
        let h = fresh(&v, &router, "acquirer", "old-done").await;
        v.forward_key_release(h).await.unwrap();
    }
}
