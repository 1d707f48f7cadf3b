#![allow(clippy::unwrap_used)]
use super::*;
use crate::access::TenantScope;
use crate::cvc::Cvc;
use crate::monitor::{DetokenizeMonitor, LimitScope};
use crate::store::sqlite::SqliteStore;
use crate::store::AuditFilter;
use std::collections::BTreeSet;
use zeroize::Zeroizing;

#[test]
fn card_inputs_print_no_cardholder_data() {
    let input = CardInput {
        pan: Zeroizing::new("4111111111111111".into()),
        exp_month: 12,
        exp_year: 2030,
        cardholder_name: Some(Zeroizing::new("Jane Cardholder".into())),
        cvc: Some(Zeroizing::new("123".into())),
    };
    let update = CardUpdate {
        exp_month: Some(1),
        exp_year: Some(2031),
        cardholder_name: Some(Zeroizing::new("Jane Cardholder".into())),
    };
    let printed = format!("{input:?} {update:?}");
    assert_eq!(printed, "CardInput([REDACTED]) CardUpdate([REDACTED])");
}

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) sqlite: SqliteStore,
    pub(super) vault: Vault,
}

pub(super) async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let kek = hsm_shim::SoftwareKek::generate(&dir.path().join("kek.key")).unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("v.db")).await.unwrap();
    let vault = Vault::open(Arc::new(sqlite.clone()), Arc::new(kek))
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        sqlite,
        vault,
    }
}

pub(super) fn ctx(roles: &[Role], tenants: TenantScope) -> RequestContext {
    RequestContext {
        principal: Principal {
            id: "id".into(),
            name: "tester".into(),
            roles: roles.iter().copied().collect::<BTreeSet<_>>(),
            tenants,
        },
        source: "127.0.0.1:1".into(),
        request_id: "req".into(),
    }
}

pub(super) fn all() -> RequestContext {
    ctx(&[Role::Tokenize, Role::Detokenize], TenantScope::All)
}

pub(super) fn card(pan: &str) -> CardInput {
    CardInput {
        pan: Zeroizing::new(pan.to_owned()),
        exp_month: 12,
        exp_year: i64::from(time::OffsetDateTime::now_utc().year()) + 3,
        cardholder_name: Some(Zeroizing::new("Jane Doe".to_owned())),
        cvc: None,
    }
}

#[tokio::test]
async fn round_trip_idempotency_and_tenants() {
    let f = fixture().await;
    let a = f
        .vault
        .tokenize(&all(), "shop-1", card("4111 1111 1111 1111"))
        .await
        .unwrap();
    assert!(a.created);
    assert_eq!(a.masked_pan, "411111******1111");
    let again = f
        .vault
        .tokenize(&all(), "shop-1", card("4111-1111-1111-1111"))
        .await
        .unwrap();
    assert_eq!(
        (again.token.as_str(), again.created),
        (a.token.as_str(), false)
    );
    let other = f
        .vault
        .tokenize(&all(), "shop-2", card("4111111111111111"))
        .await
        .unwrap();
    assert_ne!(other.token, a.token);
    assert_ne!(other.fingerprint, a.fingerprint);
    let d = f
        .vault
        .detokenize(&all(), &a.token, "capture")
        .await
        .unwrap();
    assert_eq!(d.card.pan.expose_digits(), "4111111111111111");
    assert_eq!(d.card.name.as_ref().unwrap().expose(), "Jane Doe");
    let only_2 = ctx(&[Role::Detokenize], TenantScope::parse("shop-2").unwrap());
    assert!(matches!(
        f.vault.detokenize(&only_2, &a.token, "x").await,
        Err(VaultError::NotFound)
    ));
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_row_does_not_open() {
    let f = fixture().await;
    let a = f
        .vault
        .tokenize(&all(), "shop-1", card("4111111111111111"))
        .await
        .unwrap();
    let b = f
        .vault
        .tokenize(&all(), "shop-1", card("5555555555554444"))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE cards SET nonce = (SELECT nonce FROM cards WHERE token = ?1),
                              ciphertext = (SELECT ciphertext FROM cards WHERE token = ?1)
             WHERE token = ?2",
    )
    .bind(&a.token)
    .bind(&b.token)
    .execute(f.sqlite.pool())
    .await
    .unwrap();
    assert!(matches!(
        f.vault.detokenize(&all(), &b.token, "x").await,
        Err(VaultError::Integrity)
    ));
    assert!(matches!(
        f.vault.metadata(&all(), &b.token).await,
        Err(VaultError::Integrity)
    ));
    // Moving a row to another tenant fails the same way.
    sqlx::query("UPDATE cards SET tenant = 'shop-9' WHERE token = ?")
        .bind(&a.token)
        .execute(f.sqlite.pool())
        .await
        .unwrap();
    assert!(matches!(
        f.vault.detokenize(&all(), &a.token, "x").await,
        Err(VaultError::Integrity)
    ));
}

#[tokio::test]
async fn no_audit_no_operation() {
    let f = fixture().await;
    let a = f
        .vault
        .tokenize(&all(), "shop-1", card("4111111111111111"))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER audit_broken BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit down'); END",
    )
    .execute(f.sqlite.pool())
    .await
    .unwrap();
    let err = f
        .vault
        .tokenize(&all(), "shop-1", card("5555555555554444"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage_unavailable");
    let err = f
        .vault
        .detokenize(&all(), &a.token, "capture")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "storage_unavailable");
    let err = f.vault.delete(&all(), &a.token).await.unwrap_err();
    assert_eq!(err.code(), "storage_unavailable");
    sqlx::query("DROP TRIGGER audit_broken")
        .execute(f.sqlite.pool())
        .await
        .unwrap();
    // Nothing happened while the audit trail was down.
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cards")
        .fetch_one(f.sqlite.pool())
        .await
        .unwrap();
    assert_eq!(count, 1);
    assert!(f
        .vault
        .detokenize(&all(), &a.token, "capture")
        .await
        .is_ok());
}

#[tokio::test]
async fn roles_and_audit_of_refusals() {
    let f = fixture().await;
    let a = f
        .vault
        .tokenize(&all(), "shop-1", card("4111111111111111"))
        .await
        .unwrap();
    let tok_only = ctx(&[Role::Tokenize], TenantScope::All);
    assert!(matches!(
        f.vault.detokenize(&tok_only, &a.token, "x").await,
        Err(VaultError::Forbidden)
    ));
    let det_only = ctx(&[Role::Detokenize], TenantScope::All);
    assert!(matches!(
        f.vault.metadata(&det_only, &a.token).await,
        Err(VaultError::Forbidden)
    ));
    assert!(matches!(
        f.vault
            .tokenize(&det_only, "shop-1", card("4111111111111111"))
            .await,
        Err(VaultError::Forbidden)
    ));
    let auditor = ctx(&[Role::Auditor, Role::KeyAdmin], TenantScope::All);
    assert!(matches!(
        f.vault.delete(&auditor, &a.token).await,
        Err(VaultError::Forbidden)
    ));
    let shop2 = ctx(&[Role::Tokenize], TenantScope::parse("shop-2").unwrap());
    assert!(matches!(
        f.vault
            .tokenize(&shop2, "shop-1", card("4111111111111111"))
            .await,
        Err(VaultError::Forbidden)
    ));
    assert!(matches!(
        f.vault.delete(&shop2, &a.token).await,
        Err(VaultError::NotFound)
    ));
    assert!(matches!(
        f.vault
            .detokenize(&all(), &a.token, "card 4111111111111111")
            .await,
        Err(VaultError::InvalidReason)
    ));
    let events = f.vault.store().audit_events(0, 1000).await.unwrap();
    let denied = events
        .iter()
        .filter(|e| e.event.outcome == Outcome::Denied)
        .count();
    assert_eq!(denied, 6);
    for e in &events {
        for field in e.event.text_fields() {
            assert!(!field.contains("4111111111111111"), "{field}");
        }
    }
}

#[tokio::test]
async fn audit_queries_filter_paginate_and_are_audited() {
    let f = fixture().await;
    let a = f
        .vault
        .tokenize(&all(), "shop-1", card("4111111111111111"))
        .await
        .unwrap();
    f.vault
        .tokenize(&all(), "shop-2", card("5555555555554444"))
        .await
        .unwrap();
    f.vault
        .detokenize(&all(), &a.token, "settle")
        .await
        .unwrap();
    let auditor = ctx(&[Role::Auditor], TenantScope::All);
    let q = |filter: AuditFilter, after: u64, limit: u32| AuditQuery {
        filter,
        after,
        limit,
        ..AuditQuery::default()
    };
    // Only auditors.
    assert!(matches!(
        f.vault
            .audit_query(&all(), q(AuditFilter::default(), 0, 10))
            .await,
        Err(VaultError::Forbidden)
    ));
    let by_token = AuditFilter {
        token: Some(a.token.clone()),
        ..AuditFilter::default()
    };
    let page = f
        .vault
        .audit_query(&auditor, q(by_token, 0, 100))
        .await
        .unwrap();
    let actions: Vec<_> = page.events.iter().map(|e| e.event.action).collect();
    assert_eq!(actions, [Action::Tokenize, Action::Detokenize]);
    assert_eq!(page.events[1].event.reason.as_deref(), Some("settle"));
    // Pagination by chain number, one at a time: each match once, in order.
    let tokenizes = || AuditFilter {
        action: Some(Action::Tokenize),
        ..AuditFilter::default()
    };
    let mut seen = Vec::new();
    let mut after = 0;
    for _ in 0..10 {
        let page = f
            .vault
            .audit_query(&auditor, q(tokenizes(), after, 1))
            .await
            .unwrap();
        if page.next_after == after {
            break;
        }
        seen.extend(page.events.iter().map(|e| e.seq));
        after = page.next_after;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0] < seen[1]);
    // Every query was itself recorded.
    let reads = AuditFilter {
        action: Some(Action::AuditRead),
        ..AuditFilter::default()
    };
    let page = f
        .vault
        .audit_query(&auditor, q(reads, 0, 1000))
        .await
        .unwrap();
    assert!(page.events.len() >= 3, "{}", page.events.len());
    // Bad filters are refused; an auditor limited to a tenant must filter by it.
    let bad = AuditFilter {
        token: Some("4111111111111111".into()),
        ..AuditFilter::default()
    };
    assert!(matches!(
        f.vault.audit_query(&auditor, q(bad, 0, 10)).await,
        Err(VaultError::InvalidFilter(_))
    ));
    // A digit string we did not issue may be a mistyped card number:
    // the query is recorded with it masked, never in full.
    let mistyped = AuditFilter {
        token: Some("4111111111111112".into()),
        ..AuditFilter::default()
    };
    let page = f
        .vault
        .audit_query(&auditor, q(mistyped, 0, 100))
        .await
        .unwrap();
    assert!(page.events.is_empty());
    let reads = AuditFilter {
        action: Some(Action::AuditRead),
        ..AuditFilter::default()
    };
    let page = f
        .vault
        .audit_query(&auditor, q(reads, 0, 1000))
        .await
        .unwrap();
    let details: Vec<String> = page
        .events
        .iter()
        .filter_map(|e| e.event.detail.clone())
        .collect();
    assert!(
        details.iter().any(|d| d.contains("token=411111******1112")),
        "{details:?}"
    );
    assert!(!details.iter().any(|d| d.contains("4111111111111112")));
    let shop1_auditor = ctx(&[Role::Auditor], TenantScope::parse("shop-1").unwrap());
    assert!(matches!(
        f.vault
            .audit_query(&shop1_auditor, q(AuditFilter::default(), 0, 10))
            .await,
        Err(VaultError::Forbidden)
    ));
    let shop1 = AuditFilter {
        tenant: Some("shop-1".into()),
        ..AuditFilter::default()
    };
    let page = f
        .vault
        .audit_query(&shop1_auditor, q(shop1, 0, 100))
        .await
        .unwrap();
    assert!(page
        .events
        .iter()
        .all(|e| e.event.tenant.as_deref() == Some("shop-1")));
    assert!(!page.events.is_empty());
}

#[tokio::test]
async fn batch_keeps_order_and_isolates_bad_cards() {
    let f = fixture().await;
    let cards = vec![
        card("4111111111111111"),
        card("4111111111111112"),
        CardInput {
            exp_month: 13,
            ..card("5555555555554444")
        },
        card("4111111111111111"),
        card("378282246310005"),
    ];
    let out = f
        .vault
        .tokenize_many(&all(), "shop-1", cards)
        .await
        .unwrap();
    assert!(out[0].as_ref().unwrap().created);
    assert_eq!(out[1].as_ref().unwrap_err().code(), "invalid_pan");
    assert_eq!(out[2].as_ref().unwrap_err().code(), "invalid_expiry");
    assert_eq!(
        out[3].as_ref().unwrap().token,
        out[0].as_ref().unwrap().token
    );
    assert!(!out[3].as_ref().unwrap().created);
    assert_eq!(out[4].as_ref().unwrap().brand, Brand::Amex);
    assert!(matches!(
        f.vault.tokenize_many(&all(), "shop-1", vec![]).await,
        Err(VaultError::InvalidBatchSize)
    ));
}

#[tokio::test]
async fn monitored_detokenize_limits_and_flags_anomalies() {
    use crate::monitor::{AnomalyRule, DetokenizeMonitor, MonitorConfig, Rate};
    let f = fixture().await;
    let monitor = DetokenizeMonitor::new(MonitorConfig {
        per_principal: Rate {
            per_minute: 1,
            burst: 3,
        },
        per_tenant: Rate::OFF,
        anomaly: AnomalyRule {
            window: std::time::Duration::from_secs(3600),
            factor: 5,
            min_distinct: 2,
            baseline_windows: 12,
        },
    });
    let mut tokens = Vec::new();
    for pan in ["4111111111111111", "5555555555554444", "378282246310005"] {
        let t = f.vault.tokenize(&all(), "shop-1", card(pan)).await.unwrap();
        tokens.push(t.token);
    }
    for t in &tokens {
        f.vault
            .detokenize_monitored(&all(), t, "settle", &monitor, false)
            .await
            .unwrap();
    }
    let refused = f
        .vault
        .detokenize_monitored(&all(), &tokens[0], "settle", &monitor, false)
        .await;
    assert!(
        matches!(
            refused,
            Err(VaultError::RateLimited {
                scope: LimitScope::Principal,
                retry_after,
            }) if retry_after > std::time::Duration::from_secs(50)
        ),
        "{refused:?}"
    );
    let events = f.vault.store().audit_events(0, 1000).await.unwrap();
    let of = |a: Action, o: Outcome| {
        events
            .iter()
            .filter(|e| e.event.action == a && e.event.outcome == o)
            .map(|e| e.event.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(of(Action::Detokenize, Outcome::Success).len(), 3);
    let denied = of(Action::Detokenize, Outcome::Denied);
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].error_code.as_deref(), Some("rate_limited"));
    assert_eq!(denied[0].detail.as_deref(), Some("principal_rate_limit"));
    assert_eq!(denied[0].token.as_deref(), Some(tokens[0].as_str()));
    // The third distinct token crossed the minimum of 2: one event.
    let anomalies = of(Action::DetokenizeAnomaly, Outcome::Success);
    assert_eq!(anomalies.len(), 1);
    assert_eq!(anomalies[0].principal.as_deref(), Some("tester"));
    assert_eq!(anomalies[0].token.as_deref(), Some(tokens[2].as_str()));
    assert!(anomalies[0]
        .detail
        .as_deref()
        .unwrap()
        .starts_with("distinct_tokens=3 threshold=2 "));
    assert_eq!(monitor.counts().anomalies, 1);
    assert_eq!(monitor.counts().limited_principal, 1);
    // The unmonitored call is not limited.
    f.vault
        .detokenize(&all(), &tokens[0], "settle")
        .await
        .unwrap();
}

/// A 12-digit card number of BIN 411111 and last four 1111 with these
/// two middle digits (Luhn digit fixed up to be valid): generated from a
/// test BIN, as the test-card rules allow.
fn twelve_digit(middle: u8) -> Option<String> {
    let s = format!("411111{middle:02}1111");
    crate::pan::luhn_valid(s.as_bytes()).then_some(s)
}

#[tokio::test]
async fn pan_shaped_space_runs_out_with_a_clear_error() {
    let f = fixture().await;
    let pans: Vec<String> = (0..100).filter_map(twelve_digit).collect();
    assert_eq!(pans.len(), 10, "ten Luhn-valid middles");
    let opts = TokenizeOptions {
        format: TokenFormat::PanShaped,
        expires_at: None,
    };
    // Not allowed until the tenant's policy says so.
    assert!(matches!(
        f.vault
            .tokenize_with(&all(), "legacy-0", card(&pans[0]), opts)
            .await,
        Err(VaultError::TokenFormatNotPermitted)
    ));
    let mut tokens = std::collections::HashSet::new();
    let mut refused = None;
    'fill: for t in 0..10 {
        let tenant = format!("legacy-{t}");
        crate::tenants::set_policy(
            f.vault.store().as_ref(),
            &tenant,
            crate::tenants::PolicyChange {
                pan_shaped: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // Other processes see a policy change within `tenants::FRESH`.
        f.vault.tenants.invalidate(&tenant);
        for pan in &pans {
            match f
                .vault
                .tokenize_with(&all(), &tenant, card(pan), opts)
                .await
            {
                Ok(info) => {
                    assert!(!crate::pan::luhn_valid(info.token.as_bytes()));
                    assert!(info.token.starts_with("411111") && info.token.ends_with("1111"));
                    assert!(tokens.insert(info.token), "a token issued twice");
                }
                Err(VaultError::TokenSpaceExhausted { used, space }) => {
                    refused = Some((used, space));
                    break 'fill;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let (used, space) = refused.expect("the space ran out");
    assert_eq!(space, 90);
    assert!(used as f64 >= 81.0 && used <= 90, "{used}");
    assert_eq!(tokens.len() as u64, used);
}

#[tokio::test]
async fn security_codes_are_released_once() {
    let f = fixture().await;
    let mut c = card("378282246310005");
    c.cvc = Some(Zeroizing::new("123".to_owned()));
    assert!(matches!(
        f.vault.tokenize(&all(), "shop-1", c).await,
        Err(VaultError::InvalidCard(CardError::Cvc))
    ));
    let mut c = card("378282246310005");
    c.cvc = Some(Zeroizing::new("9183".to_owned()));
    let info = f.vault.tokenize(&all(), "shop-1", c).await.unwrap();
    assert!(info.cvc_available);
    assert_eq!(f.vault.cvc_held(), 1);
    let monitor = DetokenizeMonitor::new(crate::monitor::MonitorConfig {
        per_principal: crate::monitor::Rate::OFF,
        per_tenant: crate::monitor::Rate::OFF,
        anomaly: crate::monitor::AnomalyRule {
            window: std::time::Duration::from_secs(3600),
            factor: 5,
            min_distinct: 0,
            baseline_windows: 12,
        },
    });
    let plain = f
        .vault
        .detokenize_monitored(&all(), &info.token, "settle", &monitor, false)
        .await
        .unwrap();
    assert!(plain.cvc.is_none() && plain.cvc_available);
    let once = f
        .vault
        .detokenize_monitored(&all(), &info.token, "settle", &monitor, true)
        .await
        .unwrap();
    assert_eq!(once.cvc.as_ref().map(Cvc::expose), Some("9183"));
    assert!(!once.cvc_available);
    let twice = f
        .vault
        .detokenize_monitored(&all(), &info.token, "settle", &monitor, true)
        .await
        .unwrap();
    assert!(twice.cvc.is_none());
    // Nothing of it in any file (database, WAL, KEK).
    for entry in std::fs::read_dir(f._dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        // As a whole number: times in the audit trail hold digit runs
        // that may contain these four digits by chance.
        let whole = bytes
            .windows(6)
            .any(|w| &w[1..5] == b"9183" && !w[0].is_ascii_digit() && !w[5].is_ascii_digit());
        assert!(!whole, "the code reached a file");
    }
}

#[tokio::test]
async fn newer_expiry_updates_older_never_does() {
    let f = fixture().await;
    let year = i64::from(time::OffsetDateTime::now_utc().year());
    let with = |y: i64, name: Option<&str>| CardInput {
        pan: Zeroizing::new("5555555555554444".to_owned()),
        exp_month: 6,
        exp_year: y,
        cardholder_name: name.map(|n| Zeroizing::new(n.to_owned())),
        cvc: None,
    };
    let a = f
        .vault
        .tokenize(&all(), "shop-1", with(year + 2, None))
        .await
        .unwrap();
    let newer = f
        .vault
        .tokenize(&all(), "shop-1", with(year + 4, Some("A B")))
        .await
        .unwrap();
    assert_eq!(
        (newer.token.as_str(), newer.updated, newer.exp_year),
        (
            a.token.as_str(),
            true,
            Some(u16::try_from(year + 4).unwrap())
        )
    );
    let older = f
        .vault
        .tokenize(&all(), "shop-1", with(year + 3, None))
        .await
        .unwrap();
    assert_eq!(
        (older.updated, older.exp_year),
        (false, Some(u16::try_from(year + 4).unwrap()))
    );
    let d = f.vault.detokenize(&all(), &a.token, "check").await.unwrap();
    assert_eq!(d.card.name.as_ref().map(|n| n.expose()), Some("A B"));
    assert!(matches!(
        f.vault
            .update(
                &all(),
                &a.token,
                CardUpdate {
                    exp_month: Some(1),
                    exp_year: Some(year + 3),
                    cardholder_name: None
                }
            )
            .await,
        Err(VaultError::OlderExpiry)
    ));
    let patched = f
        .vault
        .update(
            &all(),
            &a.token,
            CardUpdate {
                exp_month: None,
                exp_year: None,
                cardholder_name: Some(Zeroizing::new("C D".to_owned())),
            },
        )
        .await
        .unwrap();
    assert!(patched.updated);
    let d = f.vault.detokenize(&all(), &a.token, "check").await.unwrap();
    assert_eq!(d.card.name.as_ref().map(|n| n.expose()), Some("C D"));
    assert_eq!(
        d.card.expiry.map(|e| e.year()),
        Some(u16::try_from(year + 4).unwrap())
    );
}

#[tokio::test]
async fn expired_tokens_are_gone_and_purged_and_a_deleted_tenant_is_shredded() {
    let f = fixture().await;
    let store = f.vault.store().clone();
    let soon = now_millis() + 300;
    let opts = TokenizeOptions {
        format: TokenFormat::Random,
        expires_at: Some(soon),
    };
    let short = f
        .vault
        .tokenize_with(&all(), "shop-1", card("4242424242424242"), opts)
        .await
        .unwrap();
    assert_eq!(short.expires_at, Some(soon));
    let keep = f
        .vault
        .tokenize(&all(), "shop-2", card("4242424242424242"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        f.vault.detokenize(&all(), &short.token, "x").await,
        Err(VaultError::NotFound)
    ));
    let counts = crate::tenants::purge(store.as_ref(), "test").await.unwrap();
    assert_eq!((counts.expired, counts.retention), (1, 0));
    assert!(store.find_card(&short.token).await.unwrap().is_none());
    // Tokenized again after expiry: a new token.
    let again = f
        .vault
        .tokenize(&all(), "shop-1", card("4242424242424242"))
        .await
        .unwrap();
    assert_ne!(again.token, short.token);

    // Deleting shop-1: its salt goes first, then its records.
    let salted = store.tenant("shop-1").await.unwrap().unwrap();
    assert!(salted.fingerprint_salt.is_some());
    let n = crate::tenants::delete_tenant(store.as_ref(), "shop-1")
        .await
        .unwrap();
    assert_eq!(n, 1);
    let gone = store.tenant("shop-1").await.unwrap().unwrap();
    assert!(gone.fingerprint_salt.is_none() && gone.deleted_at.is_some());
    f.vault.tenants.invalidate("shop-1");
    assert!(matches!(
        f.vault
            .tokenize(&all(), "shop-1", card("4242424242424242"))
            .await,
        Err(VaultError::TenantDeleted)
    ));
    assert!(
        f.vault.detokenize(&all(), &keep.token, "x").await.is_ok(),
        "another tenant is untouched"
    );
}

#[tokio::test]
async fn an_unknown_digit_token_is_never_written_down() {
    let f = fixture().await;
    // One digit off a test card: fails Luhn, so it has the shape of a
    // pan-shaped token; it may be a mistyped card number.
    let typo = "4111111111111112";
    for r in [
        f.vault.detokenize(&all(), typo, "settle").await.map(|_| ()),
        f.vault.metadata(&all(), typo).await.map(|_| ()),
        f.vault.delete(&all(), typo).await,
    ] {
        assert!(matches!(r, Err(VaultError::NotFound)));
    }
    let events = f.vault.store().audit_events(0, 1000).await.unwrap();
    assert!(events.len() >= 3);
    for e in events {
        let text = format!("{:?}", e.event);
        assert!(!text.contains(typo), "written down: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_commits_and_keep_every_answer() {
    let f = fixture().await;
    let vault = Arc::new(f.vault);
    // 96 tokenizes of 8 cards for 3 tenants at once: one token per card
    // and tenant, whatever group each request landed in.
    let cards = [
        "4111111111111111",
        "4242424242424242",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
        "3530111333300000",
        "6200000000000005",
        "2223003122003222",
    ];
    let mut tasks = Vec::new();
    for i in 0..96 {
        let vault = vault.clone();
        let pan = cards[i % cards.len()];
        let tenant = format!("shop-{}", i % 3);
        tasks.push(tokio::spawn(async move {
            let info = vault.tokenize(&all(), &tenant, card(pan)).await.unwrap();
            (tenant, pan, info.token)
        }));
    }
    let mut seen: HashMap<(String, &str), String> = HashMap::new();
    for t in tasks {
        let (tenant, pan, token) = t.await.unwrap();
        let first = seen.entry((tenant, pan)).or_insert_with(|| token.clone());
        assert_eq!(*first, token, "one token per card and tenant");
    }
    assert_eq!(seen.len(), 24);
    // And as many detokenizes at once, each audited before it answers.
    let before = vault.store().audit_events(0, 100_000).await.unwrap().len();
    let mut reads = Vec::new();
    for ((_, pan), token) in seen.iter().map(|(k, v)| (k.clone(), v.clone())) {
        for _ in 0..4 {
            let (vault, token, pan) = (vault.clone(), token.clone(), pan);
            reads.push(tokio::spawn(async move {
                let d = vault.detokenize(&all(), &token, "settle").await.unwrap();
                assert_eq!(d.card.pan.expose_digits(), pan);
            }));
        }
    }
    for r in reads {
        r.await.unwrap();
    }
    let after = vault.store().audit_events(0, 100_000).await.unwrap().len();
    assert_eq!(after - before, 96, "every read audited once");
    let chained = vault.store().chained_events(0, 100_000).await.unwrap();
    assert_eq!(chained.len(), after, "one chain, no gaps");
}
