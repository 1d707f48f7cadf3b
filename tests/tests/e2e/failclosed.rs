//! Fail closed: when the audit trail cannot be written, nothing happens and
//! the caller gets 503, with no card data in the answer.

use e2e::{fresh_pan, Backend, Service};

use crate::{admin, exp_year, expect_error, expect_status, token_for, REASON, TENANT};

/// SQL making every insert into the audit trail fail, and undoing it.
fn audit_down_sql(backend: Backend) -> (&'static str, &'static str) {
    match backend {
        Backend::Sqlite => (
            "CREATE TRIGGER e2e_audit_down BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'audit down'); END",
            "DROP TRIGGER e2e_audit_down",
        ),
        Backend::Postgres => (
            "CREATE FUNCTION e2e_audit_down() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'audit down'; END; $$; \
             CREATE TRIGGER e2e_audit_down BEFORE INSERT ON audit_events \
             FOR EACH ROW EXECUTE FUNCTION e2e_audit_down();",
            "DROP TRIGGER e2e_audit_down ON audit_events; DROP FUNCTION e2e_audit_down();",
        ),
    }
}

fn count_cards(svc: &Service) -> i64 {
    svc.sql_i64("SELECT COUNT(*) FROM cards")
}

fn count_audit_events(svc: &Service) -> i64 {
    svc.sql_i64("SELECT COUNT(*) FROM audit_events")
}

#[test]
fn no_audit_means_503_and_no_change() {
    let svc = Service::start();
    let client = admin(&svc);
    let kept = fresh_pan();
    let token = token_for(&client, TENANT, &kept);
    let before = count_cards(&svc);
    assert!(before >= 1, "the card tokenized above is not in `cards`");
    let events_before = count_audit_events(&svc);
    assert!(events_before >= 1, "tokenizing wrote no audit event");

    let (down, up) = audit_down_sql(svc.backend());
    svc.sql(down);
    let new_pan = fresh_pan();
    expect_error(
        &client.tokenize(TENANT, &new_pan, 12, exp_year()),
        503,
        "storage_unavailable",
        &[&new_pan],
    );
    expect_error(
        &client.detokenize(&token, REASON),
        503,
        "storage_unavailable",
        &[&kept],
    );
    expect_error(
        &client.metadata(&token),
        503,
        "storage_unavailable",
        &[&kept],
    );
    expect_error(
        &client.delete_token(&token),
        503,
        "storage_unavailable",
        &[&kept],
    );
    // A failed authentication cannot be audited either: refused with 503 too.
    let stranger = svc.client_with_authorization("Bearer nope");
    expect_error(&stranger.metadata(&token), 503, "storage_unavailable", &[]);
    assert_eq!(
        count_cards(&svc),
        before,
        "nothing changed while the audit trail was down"
    );
    assert_eq!(
        count_audit_events(&svc),
        events_before,
        "the audit trail was down: no event can have been written"
    );

    svc.sql(up);
    let back = client.detokenize(&token, REASON);
    expect_status(&back, 200);
    assert_eq!(back.json["pan"], kept.as_str());
    let created = client.tokenize(TENANT, &new_pan, 12, exp_year());
    expect_status(&created, 201);
    assert_eq!(count_cards(&svc), before + 1);
    assert!(
        count_audit_events(&svc) >= events_before + 2,
        "the detokenize and the tokenize after recovery are audited"
    );
}
