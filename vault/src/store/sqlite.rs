//! SQLite store: the embedded default. One file under the data dir, WAL
//! journal, `synchronous=FULL` (an acknowledged token survives power loss),
//! `secure_delete` (deleted ciphertext is overwritten, not left in free pages).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use audit::{Action, AuditEvent, Outcome, StoredEvent};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{
    check_event, CardRow, Inserted, KeyPurpose, NewCard, PrincipalRow, Store, StoreError, StoredKey,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Open (creating if missing) the database file and apply migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// The pool, for tests that must reach under the store (tampering,
    /// failure injection).
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Close the pool, checkpointing the WAL into the main file.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn insert_event(
    tx: &mut Transaction<'_, Sqlite>,
    event: &AuditEvent,
) -> Result<i64, StoreError> {
    check_event(event)?;
    let time = event
        .time
        .format(&Rfc3339)
        .map_err(|_| StoreError::Corrupt("audit time cannot be formatted"))?;
    let res = sqlx::query(
        "INSERT INTO audit_events (time, principal, source, action, tenant, token, outcome, error_code, request_id, reason, detail)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(time)
    .bind(&event.principal)
    .bind(&event.source)
    .bind(event.action.as_str())
    .bind(&event.tenant)
    .bind(&event.token)
    .bind(event.outcome.as_str())
    .bind(&event.error_code)
    .bind(&event.request_id)
    .bind(&event.reason)
    .bind(&event.detail)
    .execute(&mut **tx)
    .await?;
    Ok(res.last_insert_rowid())
}

fn card_from_row(r: &SqliteRow) -> Result<CardRow, StoreError> {
    let pan_len: i64 = r.try_get("pan_len")?;
    let key_version: i64 = r.try_get("key_version")?;
    Ok(CardRow {
        token: r.try_get("token")?,
        tenant: r.try_get("tenant")?,
        fingerprint: r.try_get("fingerprint")?,
        brand: r.try_get("brand")?,
        bin: r.try_get("bin")?,
        last4: r.try_get("last4")?,
        pan_len: u8::try_from(pan_len).map_err(|_| StoreError::Corrupt("pan_len"))?,
        key_version: u32::try_from(key_version).map_err(|_| StoreError::Corrupt("key_version"))?,
        nonce: r.try_get("nonce")?,
        ciphertext: r.try_get("ciphertext")?,
        created_at: r.try_get("created_at")?,
    })
}

fn principal_from_row(r: &SqliteRow) -> Result<PrincipalRow, StoreError> {
    Ok(PrincipalRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        roles: r.try_get("roles")?,
        tenants: r.try_get("tenants")?,
        key_hash: r.try_get("key_hash")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn event_from_row(r: &SqliteRow) -> Result<StoredEvent, StoreError> {
    let time: String = r.try_get("time")?;
    let action: String = r.try_get("action")?;
    let outcome: String = r.try_get("outcome")?;
    Ok(StoredEvent {
        seq: r.try_get("seq")?,
        event: AuditEvent {
            time: OffsetDateTime::parse(&time, &Rfc3339)
                .map_err(|_| StoreError::Corrupt("audit time"))?,
            principal: r.try_get("principal")?,
            source: r.try_get("source")?,
            action: Action::parse(&action).ok_or(StoreError::Corrupt("audit action"))?,
            tenant: r.try_get("tenant")?,
            token: r.try_get("token")?,
            outcome: Outcome::parse(&outcome).ok_or(StoreError::Corrupt("audit outcome"))?,
            error_code: r.try_get("error_code")?,
            request_id: r.try_get("request_id")?,
            reason: r.try_get("reason")?,
            detail: r.try_get("detail")?,
        },
    })
}

const PRINCIPAL_COLUMNS: &str = "id, name, roles, tenants, key_hash, created_at, revoked_at";

const CARD_COLUMNS: &str =
    "token, tenant, fingerprint, brand, bin, last4, pan_len, key_version, nonce, ciphertext, created_at";

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT purpose, version, kek_id, wrapped, created_at FROM vault_keys ORDER BY purpose, version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let purpose: String = r.try_get("purpose")?;
                let version: i64 = r.try_get("version")?;
                Ok(StoredKey {
                    purpose: KeyPurpose::parse(&purpose)
                        .ok_or(StoreError::Corrupt("key purpose"))?,
                    version: u32::try_from(version)
                        .map_err(|_| StoreError::Corrupt("key version"))?,
                    kek_id: r.try_get("kek_id")?,
                    wrapped: r.try_get("wrapped")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn insert_key(&self, key: &StoredKey, event: AuditEvent) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(
            "INSERT INTO vault_keys (purpose, version, kek_id, wrapped, created_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (purpose, version) DO NOTHING",
        )
        .bind(key.purpose.as_str())
        .bind(i64::from(key.version))
        .bind(&key.kek_id)
        .bind(&key.wrapped)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        let inserted = res.rows_affected() == 1;
        if inserted {
            insert_event(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn insert_cards(
        &self,
        cards: Vec<NewCard>,
        other_events: Vec<AuditEvent>,
    ) -> Result<Vec<Inserted>, StoreError> {
        let mut out = Vec::with_capacity(cards.len());
        let mut tx = self.pool.begin().await?;
        for event in &other_events {
            insert_event(&mut tx, event).await?;
        }
        for NewCard { row, mut event } in cards {
            let res = sqlx::query(
                "INSERT INTO cards (token, tenant, fingerprint, brand, bin, last4, pan_len, key_version, nonce, ciphertext, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (tenant, fingerprint) DO NOTHING",
            )
            .bind(&row.token)
            .bind(&row.tenant)
            .bind(&row.fingerprint)
            .bind(&row.brand)
            .bind(&row.bin)
            .bind(&row.last4)
            .bind(i64::from(row.pan_len))
            .bind(i64::from(row.key_version))
            .bind(&row.nonce)
            .bind(&row.ciphertext)
            .bind(row.created_at)
            .execute(&mut *tx)
            .await?;
            let inserted = if res.rows_affected() == 1 {
                Inserted { row, created: true }
            } else {
                let existing = sqlx::query(&format!(
                    "SELECT {CARD_COLUMNS} FROM cards WHERE tenant = ? AND fingerprint = ?"
                ))
                .bind(&row.tenant)
                .bind(&row.fingerprint)
                .fetch_one(&mut *tx)
                .await?;
                Inserted {
                    row: card_from_row(&existing)?,
                    created: false,
                }
            };
            event.token = Some(inserted.row.token.clone());
            event.detail = Some(
                if inserted.created {
                    "created"
                } else {
                    "existing"
                }
                .to_owned(),
            );
            insert_event(&mut tx, &event).await?;
            out.push(inserted);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn find_card(&self, token: &str) -> Result<Option<CardRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {CARD_COLUMNS} FROM cards WHERE token = ?"))
            .bind(token)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(card_from_row).transpose()
    }

    async fn delete_card(
        &self,
        token: &str,
        tenant: &str,
        event: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query("DELETE FROM cards WHERE token = ? AND tenant = ?")
            .bind(token)
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        // Move the overwritten pages out of the WAL into the main file and
        // truncate the WAL, so no copy of the deleted ciphertext stays in it.
        // Best effort: with concurrent readers the checkpoint may be partial
        // and the next one finishes the job.
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint after delete failed");
        }
        Ok(true)
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let seq = insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn audit_events(&self, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, time, principal, source, action, tenant, token, outcome, error_code, request_id, reason, detail
             FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn insert_principal(
        &self,
        row: &PrincipalRow,
        event: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(
            "INSERT INTO principals (id, name, roles, tenants, key_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.roles)
        .bind(&row.tenants)
        .bind(&row.key_hash)
        .bind(row.created_at)
        .execute(&mut *tx)
        .await;
        match res {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::Conflict)
            }
            Err(e) => return Err(e.into()),
        }
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(principal_from_row).transpose()
    }

    async fn list_principals(&self) -> Result<Vec<PrincipalRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {PRINCIPAL_COLUMNS} FROM principals ORDER BY created_at, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(principal_from_row).collect()
    }

    async fn revoke_principal(
        &self,
        name: &str,
        at: i64,
        event: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(
            "UPDATE principals SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        (dir, s)
    }

    fn row(token: &str, tenant: &str, fp: &str) -> CardRow {
        CardRow {
            token: token.into(),
            tenant: tenant.into(),
            fingerprint: fp.into(),
            brand: "visa".into(),
            bin: "411111".into(),
            last4: "1111".into(),
            pan_len: 16,
            key_version: 1,
            nonce: vec![0; 12],
            ciphertext: vec![1, 2, 3],
            created_at: 1,
        }
    }

    fn ev() -> AuditEvent {
        AuditEvent::new(Action::Tokenize, Outcome::Success)
    }

    #[tokio::test]
    async fn same_fingerprint_in_a_tenant_is_one_row() {
        let (_d, s) = store().await;
        let out = s
            .insert_cards(
                vec![
                    NewCard {
                        row: row("tok_a", "t1", "fp_1"),
                        event: ev(),
                    },
                    NewCard {
                        row: row("tok_b", "t1", "fp_1"),
                        event: ev(),
                    },
                    NewCard {
                        row: row("tok_c", "t2", "fp_1"),
                        event: ev(),
                    },
                ],
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            out.iter()
                .map(|i| (i.row.token.as_str(), i.created))
                .collect::<Vec<_>>(),
            [("tok_a", true), ("tok_a", false), ("tok_c", true)]
        );
        let events = s.audit_events(0, 100).await.unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1].event.token.as_deref(), Some("tok_a"));
        assert_eq!(events[1].event.detail.as_deref(), Some("existing"));
    }

    #[tokio::test]
    async fn audit_is_append_only_and_refuses_card_numbers() {
        let (_d, s) = store().await;
        s.append_audit(ev().reason("ok")).await.unwrap();
        assert!(matches!(
            s.append_audit(ev().reason("card 4111 1111 1111 1111"))
                .await,
            Err(StoreError::AuditContent)
        ));
        assert!(sqlx::query("UPDATE audit_events SET reason = 'x'")
            .execute(&s.pool)
            .await
            .is_err());
        assert!(sqlx::query("DELETE FROM audit_events")
            .execute(&s.pool)
            .await
            .is_err());
        assert_eq!(s.audit_events(0, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn failed_audit_rolls_back_the_card() {
        let (_d, s) = store().await;
        let bad = ev().reason("4111111111111111");
        let res = s
            .insert_cards(
                vec![NewCard {
                    row: row("tok_a", "t1", "fp_1"),
                    event: bad,
                }],
                vec![],
            )
            .await;
        assert!(matches!(res, Err(StoreError::AuditContent)));
        assert!(s.find_card("tok_a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn delete_is_scoped_to_tenant() {
        let (_d, s) = store().await;
        s.insert_cards(
            vec![NewCard {
                row: row("tok_a", "t1", "fp_1"),
                event: ev(),
            }],
            vec![],
        )
        .await
        .unwrap();
        assert!(!s.delete_card("tok_a", "t2", ev()).await.unwrap());
        assert!(s.delete_card("tok_a", "t1", ev()).await.unwrap());
        assert!(s.find_card("tok_a").await.unwrap().is_none());
        assert!(!s.delete_card("tok_a", "t1", ev()).await.unwrap());
    }

    fn files_contain(dir: &Path, needle: &[u8]) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                let bytes = std::fs::read(&path).ok()?;
                bytes
                    .windows(needle.len())
                    .any(|w| w == needle)
                    .then(|| path.display().to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn deleted_ciphertext_leaves_no_copy_in_database_or_wal() {
        let (dir, s) = store().await;
        let mut marker = vec![0u8; 48];
        getrandom::getrandom(&mut marker).unwrap();
        let mut r = row("tok_a", "t1", "fp_1");
        r.ciphertext = marker.clone();
        s.insert_cards(
            vec![NewCard {
                row: r,
                event: ev(),
            }],
            vec![],
        )
        .await
        .unwrap();
        assert!(
            !files_contain(dir.path(), &marker).is_empty(),
            "the marker must be on disk first"
        );
        assert!(s.delete_card("tok_a", "t1", ev()).await.unwrap());
        assert_eq!(files_contain(dir.path(), &marker), Vec::<String>::new());
    }

    #[tokio::test]
    async fn principal_names_are_unique_among_active_ones() {
        let (_d, s) = store().await;
        let p = |id: &str| PrincipalRow {
            id: id.into(),
            name: "checkout".into(),
            roles: "tokenize".into(),
            tenants: "*".into(),
            key_hash: "h".into(),
            created_at: 1,
            revoked_at: None,
        };
        s.insert_principal(&p("a"), ev()).await.unwrap();
        assert!(matches!(
            s.insert_principal(&p("b"), ev()).await,
            Err(StoreError::Conflict)
        ));
        assert!(s.revoke_principal("checkout", 2, ev()).await.unwrap());
        assert!(!s.revoke_principal("checkout", 3, ev()).await.unwrap());
        s.insert_principal(&p("b"), ev()).await.unwrap();
        assert_eq!(
            s.find_principal("a").await.unwrap().unwrap().revoked_at,
            Some(2)
        );
        assert_eq!(s.list_principals().await.unwrap().len(), 2);
    }
}
