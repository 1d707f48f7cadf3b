//! SQLite's dedicated writer against the pool's writes: the same results,
//! one audit chain across both, and the same refusals.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use audit::{Action, AuditEvent, Outcome};

use super::tests::{row, TestStore};
use super::*;

fn card(token: &str, tenant: &str, fp: &str) -> NewCard {
    NewCard {
        row: row(token, tenant, fp),
        event: AuditEvent::new(Action::Tokenize, Outcome::Success),
        previous_fingerprints: vec![],
    }
}

fn ev() -> AuditEvent {
    AuditEvent::new(Action::Detokenize, Outcome::Success)
}

async fn setup() -> (TestStore, Arc<dyn Store>, Arc<dyn Writer>) {
    let b = TestStore::sqlite().await;
    b.seed_keys().await;
    let s = b.store();
    let w = s.dedicated_writer().unwrap().expect("SQLite has a writer");
    (b, s, w)
}

#[tokio::test]
async fn the_writer_inserts_like_the_pool_and_shares_its_audit_chain() {
    let (_b, s, w) = setup().await;
    // Through the pool first, then the writer, then the pool again: one
    // gap-free chain whatever wrote each entry.
    s.append_audit(ev().reason("pool 1")).await.unwrap();
    let out = w
        .insert_cards(
            vec![
                card("tok_a", "t1", "fp_1"),
                card("tok_b", "t1", "fp_1"),
                card("tok_c", "t2", "fp_1"),
            ],
            vec![ev().detail("refused card")],
        )
        .await
        .unwrap();
    assert_eq!(
        out.iter()
            .map(|i| (i.row.token.as_str(), i.created))
            .collect::<Vec<_>>(),
        [("tok_a", true), ("tok_a", false), ("tok_c", true)]
    );
    // A card stored before is found, not inserted again.
    let again = w
        .insert_cards(vec![card("tok_x", "t1", "fp_1")], vec![])
        .await
        .unwrap();
    assert_eq!(
        (again[0].row.token.as_str(), again[0].created),
        ("tok_a", false)
    );
    w.append_audit(ev().reason("writer")).await.unwrap();
    s.insert_cards(vec![card("tok_d", "t1", "fp_2")], vec![])
        .await
        .unwrap();
    assert_eq!(
        s.find_card("tok_a").await.unwrap().unwrap(),
        row("tok_a", "t1", "fp_1")
    );

    let entries = s.chained_events(0, 100).await.unwrap();
    let details: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.event.token.clone().unwrap_or_default(),
                e.event.detail.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(entries.len(), 8);
    assert_eq!(details[2], ("tok_a".into(), "created".into()));
    assert_eq!(details[3], ("tok_a".into(), "existing".into()));
    assert_eq!(details[5], ("tok_a".into(), "existing".into()));
    let key = audit::SigningKey::generate().unwrap();
    s.write_checkpoint(&key).await.unwrap();
    let report = audit::verify_trail(
        &entries,
        s.checkpoints().await.unwrap(),
        &key.verifying_key(),
    )
    .unwrap();
    assert_eq!(report.entries, 8);
}

#[tokio::test]
async fn the_writer_refuses_like_the_pool_and_writes_nothing() {
    let (b, s, w) = setup().await;
    w.insert_cards(vec![card("tok_a", "t1", "fp_1")], vec![])
        .await
        .unwrap();
    // A new token already taken (another card).
    assert!(matches!(
        w.insert_cards(vec![card("tok_a", "t1", "fp_2")], vec![])
            .await,
        Err(StoreError::TokenTaken)
    ));
    // A card number in an audit field.
    let mut bad = card("tok_b", "t1", "fp_3");
    bad.event = bad.event.reason("4111111111111111");
    assert!(matches!(
        w.insert_cards(vec![bad], vec![]).await,
        Err(StoreError::AuditContent)
    ));
    // The audit insert fails in the database: the card is not kept either,
    // and the connection is usable afterwards.
    b.break_audit().await;
    assert!(matches!(
        w.insert_cards(vec![card("tok_c", "t1", "fp_4")], vec![])
            .await,
        Err(StoreError::Sqlite(_))
    ));
    assert!(w.append_audit(ev()).await.is_err());
    b.repair_audit().await;
    // Keys rotated elsewhere: stale.
    b.exec("UPDATE vault_keys SET state = 'retired', retired_at = 2 WHERE purpose = 'dek'")
        .await
        .unwrap();
    assert!(matches!(
        w.insert_cards(vec![card("tok_e", "t1", "fp_5")], vec![])
            .await,
        Err(StoreError::StaleKeys)
    ));
    b.exec("UPDATE vault_keys SET state = 'active', retired_at = NULL WHERE purpose = 'dek'")
        .await
        .unwrap();
    for t in ["tok_b", "tok_c", "tok_e"] {
        assert!(s.find_card(t).await.unwrap().is_none(), "{t}");
    }
    assert_eq!(s.chained_events(0, 100).await.unwrap().len(), 1);
    w.insert_cards(vec![card("tok_f", "t1", "fp_6")], vec![])
        .await
        .unwrap();
    assert_eq!(s.chained_events(0, 100).await.unwrap().len(), 2);
}

#[tokio::test]
async fn the_writer_replaces_expired_cards_and_records_uses() {
    let (_b, s, w) = setup().await;
    let mut old = card("tok_old", "t1", "fp_1");
    old.row.expires_at = Some(1_500);
    w.insert_cards(vec![old], vec![]).await.unwrap();
    // Tokenized again after its expiry: a new token, the old row purged.
    let mut later = card("tok_new", "t1", "fp_1");
    later.row.created_at = 2_000;
    let out = w.insert_cards(vec![later], vec![]).await.unwrap();
    assert_eq!(
        (out[0].row.token.as_str(), out[0].created),
        ("tok_new", true)
    );
    assert!(s.find_card("tok_old").await.unwrap().is_none());
    let events = s.chained_events(0, 100).await.unwrap();
    assert_eq!(events[1].event.action, Action::Purged);

    let day = 86_400_000;
    w.touch_cards(&["tok_new".into()], 10 * day, day)
        .await
        .unwrap();
    assert_eq!(
        s.find_card("tok_new").await.unwrap().unwrap().last_used_at,
        Some(10 * day)
    );
    // Within the granularity: not written again.
    w.touch_cards(&["tok_new".into()], 10 * day + 5, day)
        .await
        .unwrap();
    assert_eq!(
        s.find_card("tok_new").await.unwrap().unwrap().last_used_at,
        Some(10 * day)
    );
}

/// A pooled connection given back inside a transaction (as after a COMMIT
/// that SQLite refused) is closed, never reused: otherwise it would hold
/// the write lock, and writes "committed" on it would never reach the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_returned_inside_a_transaction_is_not_reused() {
    let b = TestStore::sqlite().await;
    let TestStore::Sqlite(dir, store) = &b else {
        unreachable!()
    };
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::Executor::execute(&mut *conn, "BEGIN IMMEDIATE")
        .await
        .unwrap();
    drop(conn);
    // Another connection must get the write lock within its busy timeout.
    let path = dir.path().join("t.db");
    tokio::task::spawn_blocking(move || {
        let other = rusqlite::Connection::open(path).unwrap();
        other.busy_timeout(Duration::from_secs(5)).unwrap();
        other.execute_batch("BEGIN IMMEDIATE; ROLLBACK").unwrap();
    })
    .await
    .unwrap();
}

/// The inline point reads (`sqlite_reader.rs`) see every write committed
/// before them, by the writer or the pool, on a reused connection: no read
/// keeps an old snapshot open. Revocation is seen at once.
#[tokio::test]
async fn point_reads_see_each_committed_write_at_once() {
    let (_b, s, w) = setup().await;
    let cert = "spiffe://aggregator.example/router";
    let principal = PrincipalRow {
        id: "p1".into(),
        name: "router".into(),
        roles: "detokenize".into(),
        tenants: "*".into(),
        key_hash: "h".into(),
        created_at: 1,
        revoked_at: None,
        cert_identity: Some(cert.into()),
    };
    for round in 0..3 {
        let token = format!("tok_{round}");
        assert_eq!(s.find_card(&token).await.unwrap(), None);
        w.insert_cards(vec![card(&token, "t1", &format!("fp_{round}"))], vec![])
            .await
            .unwrap();
        assert_eq!(
            s.find_card(&token).await.unwrap(),
            Some(row(&token, "t1", &format!("fp_{round}")))
        );
    }
    assert!(s.delete_card("tok_0", "t1", ev()).await.unwrap());
    assert_eq!(s.find_card("tok_0").await.unwrap(), None);

    assert_eq!(s.find_principal("p1").await.unwrap(), None);
    s.insert_principal(&principal, ev()).await.unwrap();
    assert_eq!(
        s.find_principal("p1").await.unwrap().as_ref(),
        Some(&principal)
    );
    assert_eq!(
        s.find_principal_by_cert(cert).await.unwrap().as_ref(),
        Some(&principal)
    );
    assert!(s.revoke_principal("router", 2, ev()).await.unwrap());
    assert_eq!(
        s.find_principal("p1").await.unwrap().unwrap().revoked_at,
        Some(2)
    );
    assert_eq!(s.find_principal_by_cert(cert).await.unwrap(), None);
}
