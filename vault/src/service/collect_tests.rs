//! Hosted collection sessions: opened, read back, completed once, retried,
//! refused, closed, expired and purged, each audited without the card or
//! the secret.
#![allow(clippy::unwrap_used)]
use super::tests::{all, card, ctx, fixture};
use super::*;
use crate::access::TenantScope;
use crate::collect::CollectStyle;
use zeroize::Zeroizing;

fn input(origin: &str) -> CollectSessionInput {
    CollectSessionInput {
        tenant: "shop-42".into(),
        allowed_origin: origin.into(),
        ttl_secs: None,
        require_cvc: false,
        token_format: TokenFormat::Random,
        reference: Some("order-1001".into()),
        style: None,
    }
}

fn edge() -> RequestContext {
    ctx(&[Role::Collect], TenantScope::All)
}

fn submission(secret: &str, pan: &str) -> Submission {
    Submission {
        client_secret: Zeroizing::new(secret.to_owned()),
        card: card(pan),
        buyer: Some("198.51.100.7".parse().unwrap()),
    }
}

#[tokio::test]
async fn a_session_is_completed_once_and_read_back_by_the_checkout() {
    let f = fixture().await;
    let new = f
        .vault
        .create_collect_session(&all(), input("https://shop.example"))
        .await
        .unwrap();
    let id = new.session.id.clone();
    let secret = new.client_secret.expose().to_owned();
    assert!(id.starts_with("cs_"));
    assert_eq!(new.session.status, SessionStatus::Open);
    assert_eq!(new.session.allowed_origin, "https://shop.example");

    // The edge sees the public settings, not a token.
    let public = f.vault.collect_session_public(&edge(), &id).await.unwrap();
    assert!(public.token.is_none());
    // Roles: the checkout cannot complete, the edge cannot read the token.
    assert!(matches!(
        f.vault
            .complete_collect_session(&all(), &id, submission(&secret, "4111111111111111"))
            .await,
        Err(VaultError::Forbidden)
    ));
    assert!(matches!(
        f.vault.collect_session(&edge(), &id).await,
        Err(VaultError::Forbidden)
    ));

    let info = f
        .vault
        .complete_collect_session(&edge(), &id, submission(&secret, "4111111111111111"))
        .await
        .unwrap();
    assert_eq!(info.last4, "1111");
    // A retry of the same submission answers the same token.
    let again = f
        .vault
        .complete_collect_session(&edge(), &id, submission(&secret, "4111 1111 1111 1111"))
        .await
        .unwrap();
    assert_eq!(again.token, info.token);
    // Another card is refused, and not stored.
    assert!(matches!(
        f.vault
            .complete_collect_session(&edge(), &id, submission(&secret, "5555555555554444"))
            .await,
        Err(VaultError::SessionCompleted)
    ));
    let read = f.vault.collect_session(&all(), &id).await.unwrap();
    assert_eq!(read.status, SessionStatus::Completed);
    assert_eq!(
        read.token.as_ref().map(|t| t.token.as_str()),
        Some(info.token.as_str())
    );
    let shown = f
        .vault
        .detokenize(&all(), &info.token, "collect test")
        .await
        .unwrap();
    assert_eq!(shown.card.pan.expose_digits(), "4111111111111111");
    assert!(
        f.vault
            .tokenize(&all(), "shop-42", card("5555555555554444"))
            .await
            .unwrap()
            .created
    );

    // Another tenant's checkout sees nothing.
    let other = ctx(
        &[Role::Tokenize],
        TenantScope::Only(["shop-7".to_owned()].into_iter().collect()),
    );
    assert!(matches!(
        f.vault.collect_session(&other, &id).await,
        Err(VaultError::NotFound)
    ));

    // The trail: created, submissions, completed; no secret, no card number.
    let events = f.vault.store().audit_events(0, 1000).await.unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e.event.action.as_str()).collect();
    for a in [
        "collect_session_created",
        "collect_submission",
        "collect_session_completed",
    ] {
        assert!(actions.contains(&a), "{a} missing: {actions:?}");
    }
    let text = format!("{events:?}");
    assert!(!text.contains(&secret));
    assert!(!text.contains("4111111111111111"));
    assert!(text.contains("buyer 198.51.100.7"));
}

#[tokio::test]
async fn wrong_secrets_and_bad_cards_close_the_session_at_the_limit() {
    let f = fixture().await;
    let new = f
        .vault
        .create_collect_session(&all(), input("https://shop.example"))
        .await
        .unwrap();
    let id = new.session.id.clone();
    let secret = new.client_secret.expose().to_owned();
    for _ in 0..2 {
        assert!(matches!(
            f.vault
                .complete_collect_session(&edge(), &id, submission("wrong", "4111111111111111"))
                .await,
            Err(VaultError::WrongSecret)
        ));
    }
    for _ in 0..3 {
        assert!(matches!(
            f.vault
                .complete_collect_session(&edge(), &id, submission(&secret, "4111111111111112"))
                .await,
            Err(VaultError::InvalidCard(_))
        ));
    }
    // Five refused: closed, even for a good card.
    assert!(matches!(
        f.vault
            .complete_collect_session(&edge(), &id, submission(&secret, "4111111111111111"))
            .await,
        Err(VaultError::SessionClosed)
    ));
    let read = f.vault.collect_session(&all(), &id).await.unwrap();
    assert_eq!(read.status, SessionStatus::Closed);
    assert!(read.token.is_none());
}

#[tokio::test]
async fn the_security_code_is_required_when_the_session_says_so() {
    let f = fixture().await;
    let mut i = input("https://shop.example");
    i.require_cvc = true;
    let new = f.vault.create_collect_session(&all(), i).await.unwrap();
    let secret = new.client_secret.expose().to_owned();
    let id = new.session.id;
    assert!(matches!(
        f.vault
            .complete_collect_session(&edge(), &id, submission(&secret, "4111111111111111"))
            .await,
        Err(VaultError::InvalidCard(CardError::Cvc))
    ));
    let mut s = submission(&secret, "4111111111111111");
    s.card.cvc = Some(Zeroizing::new("123".into()));
    let info = f
        .vault
        .complete_collect_session(&edge(), &id, s)
        .await
        .unwrap();
    assert!(info.cvc_available);
    let shown = f
        .vault
        .detokenize_monitored(
            &all(),
            &info.token,
            "collect cvc",
            &crate::monitor::DetokenizeMonitor::new(crate::monitor::MonitorConfig {
                per_principal: crate::monitor::Rate::OFF,
                per_tenant: crate::monitor::Rate::OFF,
                anomaly: crate::monitor::AnomalyRule {
                    window: std::time::Duration::from_secs(3600),
                    factor: 5,
                    min_distinct: 0,
                    baseline_windows: 12,
                },
            }),
            true,
        )
        .await
        .unwrap();
    assert_eq!(shown.cvc.as_ref().map(|c| c.expose()), Some("123"));
}

#[tokio::test]
async fn bad_session_input_is_refused_and_nothing_is_stored() {
    let f = fixture().await;
    let bad = |change: &dyn Fn(&mut CollectSessionInput)| {
        let mut i = input("https://shop.example");
        change(&mut i);
        i
    };
    let cases: Vec<(CollectSessionInput, &str)> = vec![
        (
            bad(&|i| i.allowed_origin = "http://shop.example".into()),
            "invalid_origin",
        ),
        (
            bad(&|i| i.allowed_origin = "https://shop.example/pay".into()),
            "invalid_origin",
        ),
        (
            bad(&|i| i.allowed_origin = "https://a.example https://b.example".into()),
            "invalid_origin",
        ),
        (
            bad(&|i| i.allowed_origin = "https://4111111111111111.example".into()),
            "invalid_origin",
        ),
        (bad(&|i| i.ttl_secs = Some(0)), "invalid_ttl"),
        (bad(&|i| i.ttl_secs = Some(901)), "invalid_ttl"),
        (
            bad(&|i| i.reference = Some("card 4111111111111111".into())),
            "invalid_reference",
        ),
        (
            bad(&|i| i.reference = Some("x".repeat(65))),
            "invalid_reference",
        ),
        (bad(&|i| i.tenant = "bad tenant".into()), "invalid_tenant"),
        (
            bad(&|i| i.token_format = TokenFormat::PanShaped),
            "token_format_not_permitted",
        ),
        (
            bad(&|i| {
                i.style = Some(CollectStyle {
                    color: Some("url(x)".into()),
                    ..CollectStyle::default()
                })
            }),
            "invalid_style",
        ),
    ];
    for (i, code) in cases {
        let err = f.vault.create_collect_session(&all(), i).await.unwrap_err();
        assert_eq!(err.code(), code);
    }
    // Loopback http only where the vault allows it (--dev).
    assert!(f
        .vault
        .create_collect_session(&all(), input("http://127.0.0.1:9000"))
        .await
        .is_err());
    let none: Option<crate::store::CollectSessionRow> = None;
    assert_eq!(
        f.vault
            .store()
            .find_collect_session("cs_AAAAAAAAAAAAAAAAAAAAAA")
            .await
            .unwrap(),
        none
    );
}

#[tokio::test]
async fn expired_sessions_refuse_submissions_and_are_purged() {
    let f = fixture().await;
    let mut i = input("https://shop.example");
    i.ttl_secs = Some(1);
    let new = f.vault.create_collect_session(&all(), i).await.unwrap();
    let secret = new.client_secret.expose().to_owned();
    let id = new.session.id;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(matches!(
        f.vault
            .complete_collect_session(&edge(), &id, submission(&secret, "4111111111111111"))
            .await,
        Err(VaultError::SessionExpired)
    ));
    assert_eq!(
        f.vault.collect_session(&all(), &id).await.unwrap().status,
        SessionStatus::Expired
    );
    // Kept a day after expiry, then purged with a counted event.
    assert_eq!(
        f.vault.purge_collect_sessions("test").await.unwrap(),
        (0, 0)
    );
    let event = |c: u64, o: u64| {
        audit::AuditEvent::new(Action::CollectSessionsExpired, Outcome::Success)
            .detail(format!("completed={c} not_completed={o}"))
    };
    let purged = f
        .sqlite
        .purge_collect_sessions(now_millis(), 10, &event)
        .await
        .unwrap();
    assert_eq!(purged, (0, 1));
    assert!(matches!(
        f.vault.collect_session(&all(), &id).await,
        Err(VaultError::NotFound)
    ));
}

#[tokio::test]
async fn a_submission_while_another_is_tokenized_is_refused_and_stores_nothing() {
    let f = fixture().await;
    let new = f
        .vault
        .create_collect_session(&all(), input("https://shop.example"))
        .await
        .unwrap();
    let id = new.session.id.clone();
    let secret = new.client_secret.expose().to_owned();
    // Another submission holds the session (as while its card is sealed).
    let now = now_millis();
    assert!(f
        .vault
        .store()
        .claim_collect_session(&id, now, now + 60_000)
        .await
        .unwrap());
    assert!(matches!(
        f.vault
            .complete_collect_session(&edge(), &id, submission(&secret, "5555555555554444"))
            .await,
        Err(VaultError::SessionBusy)
    ));
    // A refusal that never claimed (a wrong secret) leaves the claim alone.
    assert!(matches!(
        f.vault
            .complete_collect_session(&edge(), &id, submission("wrong", "4111111111111111"))
            .await,
        Err(VaultError::WrongSecret)
    ));
    let held = f
        .vault
        .store()
        .find_collect_session(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.claimed_until, Some(now + 60_000));
    // Its card was not stored: tokenizing it now makes a new record.
    assert!(
        f.vault
            .tokenize(&all(), "shop-42", card("5555555555554444"))
            .await
            .unwrap()
            .created
    );
    // Once the hold has run out, a submission completes the session.
    assert!(f
        .vault
        .store()
        .claim_collect_session(&id, now + 60_000, now + 60_001)
        .await
        .unwrap());
    let read = f
        .vault
        .store()
        .find_collect_session(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.claimed_until, Some(now + 60_001));
}
