//! Fail closed: when the audit trail cannot be written, nothing happens and
//! the caller gets 503, with no card data in the answer.

use e2e::{fresh_pan, Service};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _};

use crate::{admin, exp_year, expect_error, expect_status, token_for, REASON, TENANT};

/// Run one SQL statement on the service's database from outside the process.
fn sql(svc: &Service, statement: &str) {
    let path = svc.data_dir().join("cardvault.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        sqlx::query(statement).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    });
}

fn count_cards(svc: &Service) -> i64 {
    let path = svc.data_dir().join("cardvault.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .connect()
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cards")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        n
    })
}

#[test]
fn no_audit_means_503_and_no_change() {
    let svc = Service::start();
    let client = admin(&svc);
    let kept = fresh_pan();
    let token = token_for(&client, TENANT, &kept);
    let before = count_cards(&svc);

    sql(
        &svc,
        "CREATE TRIGGER e2e_audit_down BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit down'); END",
    );
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

    sql(&svc, "DROP TRIGGER e2e_audit_down");
    let back = client.detokenize(&token, REASON);
    expect_status(&back, 200);
    assert_eq!(back.json["pan"], kept.as_str());
    let created = client.tokenize(TENANT, &new_pan, 12, exp_year());
    expect_status(&created, 201);
}
