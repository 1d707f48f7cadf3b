//! The SQL of the vault, once, for every backend.
//!
//! Both schemas use the same tables, column names and column types as seen
//! from Rust (TEXT, BLOB/BYTEA, 64-bit integers), and every statement uses
//! `$N` placeholders, which SQLite and PostgreSQL both accept. So one body of
//! code serves both: `sql_store!` expands it for a concrete `sqlx` database.
//! A backend module provides the struct (with `pool` and `op_timeout`
//! fields), opening, and `after_delete` (SQLite checkpoints its WAL there).
//!
//! One file on purpose. Most of it is a single `impl Store for $store`
//! block (53 operations): a trait impl cannot be spread over several blocks,
//! files or macros, so grouping the operations by table (cards, tenants,
//! principals, audit, keys, archives, backup) would need a forwarding
//! method for each, its signature written a third time. What precedes the
//! impl (column lists, row decoding, the audit-chain append, restore
//! inserts) is used only by it and must expand in the same backend module,
//! as its types (`Row`, `Tx`) are the backend's: a second macro for it would
//! split one expansion over two files, neither readable alone.

/// Implement [`Store`](super::Store) for `$store`, a struct with fields
/// `pool: sqlx::Pool<$db>` and `op_timeout: std::time::Duration`.
macro_rules! sql_store {
    ($store:ty, $db:ty) => {
        use $crate::store::rows::{CARD_COLUMNS, EVENT_INSERT, PRINCIPAL_COLUMNS, TENANT_COLUMNS};
        const KEY_COLUMNS: &str =
            "purpose, version, kek_id, wrapped, created_at, state, retired_at, destroyed_at, reencrypted_at";
        const EVENT_COLUMNS: &str =
            "seq, time, principal, source, action, tenant, token, outcome, error_code, request_id, reason, detail, chain_seq, leaf_hash, chain_hash";
        const CHECKPOINT_COLUMNS: &str = "tree_size, root, chain_head, time, key_id, next_key, signature";
        const SIGNING_KEY_COLUMNS: &str = "generation, key_id, kek_id, wrapped, public_key, created_at, retired_at, destroyed_at";
        const ARCHIVE_COLUMNS: &str = "from_seq, to_seq, chain_head, frontier, file_name, file_sha256, archived_at";
        const COLLECT_COLUMNS: &str = "id, tenant, allowed_origin, secret_hash, code_required, token_format, reference, style, created_at, expires_at, failures, closed_at, completed_at, token, claimed_until";

        /// Cards the re-encryption pass still has to move ($1: active DEK
        /// version, $2: active fingerprint key version). Two counts, each a
        /// range of its own index (index-only), rather than an OR.
        const COUNT_OUTDATED: &str = "SELECT (SELECT COUNT(*) FROM cards WHERE key_version < $1)
              + (SELECT COUNT(*) FROM cards WHERE fingerprint_version < $2 AND key_version >= $1)";

        type Row = <$db as sqlx::Database>::Row;
        type Tx<'c> = sqlx::Transaction<'c, $db>;

        impl $store {
            /// Run one store operation within the configured time bound, so a
            /// dead or hung database fails a request fast instead of holding it.
            async fn bounded<T>(
                &self,
                op: impl std::future::Future<Output = Result<T, $crate::store::StoreError>>,
            ) -> Result<T, $crate::store::StoreError> {
                tokio::time::timeout(self.op_timeout, op)
                    .await
                    .map_err(|_| $crate::store::StoreError::Timeout)?
            }
        }

        /// Take one token from a shared rate-limit bucket (PostgreSQL only:
        /// `rate_buckets`, migration 0013): a new bucket starts full ($3,
        /// the burst) less the one taken; an existing one is refilled at $4
        /// per millisecond of the database's clock since it last changed
        /// and loses one token, only if it has one (else no row: refused,
        /// and unchanged, so the refill is computed from its last change).
        /// One statement under the row's lock, so concurrent instances
        /// never both take the last token. `synchronous_commit` off for
        /// this transaction only: a counter, not a record, need not wait
        /// for the WAL flush (a database crash forgets at most the last
        /// fraction of a second of takes). What is stored is rounded to
        /// whole millionths of a token: a refill at a rate such as 1/60000
        /// per ms leaves binary-float noise (`19.000000000000004`) whose
        /// long runs of zeros read, in a dump of the table, like a
        /// fragment of a card number with zeros in the middle; a rounded
        /// value prints with at most six decimals, and the rounding error
        /// (half a millionth of a token per change) is immaterial.
        const SHARED_RATE_TAKE: &str = "WITH clock AS (
                SELECT set_config('synchronous_commit', 'off', true) AS sync,
                       (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms)
            INSERT INTO rate_buckets AS b (scope, key, tokens, at_ms)
            SELECT $1, $2, $3::float8 - 1, now_ms FROM clock
            ON CONFLICT (scope, key) DO UPDATE
            SET tokens = round((LEAST($3::float8, b.tokens + GREATEST(EXCLUDED.at_ms - b.at_ms, 0) * $4::float8) - 1)::numeric, 6)::float8,
                at_ms = GREATEST(b.at_ms, EXCLUDED.at_ms)
            WHERE LEAST($3::float8, b.tokens + GREATEST(EXCLUDED.at_ms - b.at_ms, 0) * $4::float8) >= 1
            RETURNING b.tokens";
        /// A bucket's tokens, last change and the database's clock (ms).
        const SHARED_RATE_READ: &str = "SELECT tokens, at_ms,
                (extract(epoch FROM clock_timestamp()) * 1000)::bigint
            FROM rate_buckets WHERE scope = $1 AND key = $2";
        /// One token back, up to the burst ($3), rounded as a take rounds.
        const SHARED_RATE_GIVE_BACK: &str = "WITH clock AS (
                SELECT set_config('synchronous_commit', 'off', true) AS sync)
            UPDATE rate_buckets SET tokens = round(LEAST($3::float8, tokens + 1)::numeric, 6)::float8
            FROM clock WHERE scope = $1 AND key = $2";

        /// Record a reveal for the shared anomaly rule (PostgreSQL only,
        /// migration 0013): the window of $2 ms the database's clock is
        /// in; the token hash $3 is added to the principal's window unless
        /// the rule fired there already, and the window's distinct count
        /// goes up when it was new. Answers (window start, distinct count,
        /// fired, new). Data-modifying CTEs see the table as it was when
        /// the statement began, so the count of a token already seen is
        /// read from `before`. synchronous_commit off, as for the buckets.
        const SHARED_REVEAL_RECORD: &str = "WITH clock AS (
                SELECT set_config('synchronous_commit', 'off', true) AS sync, now_ms,
                       (floor(now_ms / $2) * $2)::bigint AS win
                  FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms) t),
            before AS (
                SELECT w.distinct_tokens, w.fired FROM anomaly_windows w, clock
                 WHERE w.principal = $1 AND w.window_start = clock.win),
            new AS (
                INSERT INTO anomaly_tokens (principal, window_start, token_hash)
                SELECT $1, win, $3 FROM clock
                 WHERE NOT EXISTS (SELECT 1 FROM before WHERE fired)
                ON CONFLICT DO NOTHING
                RETURNING window_start),
            counted AS (
                INSERT INTO anomaly_windows AS w (principal, window_start, distinct_tokens, fired)
                SELECT $1, window_start, 1, false FROM new
                ON CONFLICT (principal, window_start)
                DO UPDATE SET distinct_tokens = w.distinct_tokens + 1
                RETURNING w.distinct_tokens)
            SELECT clock.win,
                   COALESCE((SELECT distinct_tokens FROM counted),
                            (SELECT distinct_tokens FROM before), 0)::bigint,
                   COALESCE((SELECT fired FROM before), false),
                   EXISTS (SELECT 1 FROM new),
                   clock.win + $2 - clock.now_ms
              FROM clock";
        /// What the rule no longer needs of a principal: the tokens of
        /// windows before the current one ($3), windows before the
        /// baseline ($2).
        const SHARED_ANOMALY_PRUNE: &str = "WITH tokens AS (
                DELETE FROM anomaly_tokens WHERE principal = $1 AND window_start < $3)
            DELETE FROM anomaly_windows WHERE principal = $1 AND window_start < $2";

        /// Most rows in one multi-row statement (SQLite allows 32766 bound
        /// parameters per statement, PostgreSQL 65535; rows here bind 11-14).
        const ROWS_PER_STATEMENT: usize = 64;

        /// Lock the head of the audit chain and read it. The UPDATE takes
        /// SQLite's write lock or PostgreSQL's row lock, held until commit:
        /// appends are serialised across connections and instances, so the
        /// chain is gap-free and in commit order.
        async fn lock_head(tx: &mut Tx<'_>) -> Result<audit::Trail, $crate::store::StoreError> {
            use sqlx::Row as _;
            let r = sqlx::query("UPDATE audit_head SET size = size WHERE id = 1 RETURNING size, head, frontier")
                .fetch_one(&mut **tx)
                .await?;
            $crate::store::rows::trail_from_head(r.try_get("size")?, r.try_get("head")?, r.try_get("frontier")?)
        }

        async fn save_head(tx: &mut Tx<'_>, trail: &audit::Trail) -> Result<(), $crate::store::StoreError> {
            let (size, head, frontier) = $crate::store::rows::head_row(trail)?;
            sqlx::query("UPDATE audit_head SET size = $1, head = $2, frontier = $3 WHERE id = 1")
                .bind(size)
                .bind(head)
                .bind(frontier)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// The end of a write that may have found nothing to change: if
        /// `changed` rows changed, `event` is appended and the transaction
        /// committed (true); otherwise it is rolled back, nothing recorded
        /// (false).
        async fn commit_if_changed(mut tx: Tx<'_>, changed: u64, event: &audit::AuditEvent) -> Result<bool, $crate::store::StoreError> {
            if changed == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            insert_event(&mut tx, event).await?;
            tx.commit().await?;
            Ok(true)
        }

        async fn insert_event(tx: &mut Tx<'_>, event: &audit::AuditEvent) -> Result<i64, $crate::store::StoreError> {
            insert_events(tx, std::slice::from_ref(event)).await
        }

        /// Append events to the audit chain and insert them, in order, in
        /// multi-row statements. Returns the chain number of the last one.
        async fn insert_events(tx: &mut Tx<'_>, events: &[audit::AuditEvent]) -> Result<i64, $crate::store::StoreError> {
            $crate::store::rows::check_events(events)?;
            let mut trail = lock_head(tx).await?;
            let chained: Vec<audit::ChainedEvent> = events.iter().map(|e| trail.append(e.clone())).collect();
            for chunk in chained.chunks(ROWS_PER_STATEMENT) {
                let rows = chunk
                    .iter()
                    .map(|c| $crate::store::rows::event_row(c).map(|(time, seq)| (c, time, seq)))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut q = sqlx::QueryBuilder::<$db>::new(EVENT_INSERT);
                q.push_values(rows, |mut b, (c, time, seq)| {
                    let e = &c.event;
                    b.push_bind(time)
                        .push_bind(e.principal.clone())
                        .push_bind(e.source.clone())
                        .push_bind(e.action.as_str())
                        .push_bind(e.tenant.clone())
                        .push_bind(e.token.clone())
                        .push_bind(e.outcome.as_str())
                        .push_bind(e.error_code.clone())
                        .push_bind(e.request_id.clone())
                        .push_bind(e.reason.clone())
                        .push_bind(e.detail.clone())
                        .push_bind(seq)
                        .push_bind(c.leaf_hash.to_vec())
                        .push_bind(c.chain_hash.to_vec());
                });
                q.build().execute(&mut **tx).await?;
            }
            save_head(tx, &trail).await?;
            $crate::store::rows::last_seq(&trail)
        }

        async fn insert_archive(tx: &mut Tx<'_>, a: &audit::db::ArchiveRow) -> Result<(), $crate::store::StoreError> {
            use $crate::store::StoreError;
            let seq = |n: u64| i64::try_from(n).map_err(|_| StoreError::Corrupt("archive range"));
            let frontier: Vec<u8> = a.anchor.frontier.iter().flatten().copied().collect();
            let res = sqlx::query(&format!(
                "INSERT INTO audit_archives ({ARCHIVE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ))
            .bind(seq(a.from_seq)?)
            .bind(seq(a.to_seq)?)
            .bind(a.anchor.chain_head.to_vec())
            .bind(frontier)
            .bind(&a.file_name)
            .bind(&a.file_sha256)
            .bind(&a.archived_at)
            .execute(&mut **tx)
            .await;
            match res {
                Ok(_) => Ok(()),
                // The contiguity trigger, or a segment recorded twice.
                Err(sqlx::Error::Database(e))
                    if e.is_unique_violation() || e.message().contains("audit_archives:") =>
                {
                    Err(StoreError::Conflict)
                }
                Err(e) => Err(e.into()),
            }
        }

        fn archive_from_row(r: &Row) -> Result<audit::db::ArchiveRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::StoreError;
            let seq = |c: &str| -> Result<u64, StoreError> {
                let n: i64 = r.try_get(c)?;
                u64::try_from(n).map_err(|_| StoreError::Corrupt("archive range"))
            };
            let to_seq = seq("to_seq")?;
            let head: Vec<u8> = r.try_get("chain_head")?;
            let frontier: Vec<u8> = r.try_get("frontier")?;
            if frontier.len() % 32 != 0 {
                return Err(StoreError::Corrupt("archive frontier"));
            }
            Ok(audit::db::ArchiveRow {
                from_seq: seq("from_seq")?,
                to_seq,
                anchor: audit::Anchor {
                    tree_size: to_seq,
                    chain_head: head.try_into().map_err(|_| StoreError::Corrupt("archive chain head"))?,
                    frontier: frontier.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect(),
                },
                file_name: r.try_get("file_name")?,
                file_sha256: r.try_get("file_sha256")?,
                archived_at: r.try_get("archived_at")?,
            })
        }

        /// Insert an audit row exactly as a backup holds it (restore).
        async fn insert_restored_event(tx: &mut Tx<'_>, row: &$crate::store::AuditRow) -> Result<(), $crate::store::StoreError> {
            use $crate::store::StoreError;
            $crate::store::check_event(&row.event)?;
            let e = &row.event;
            let time = e
                .time
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|_| StoreError::Corrupt("audit time cannot be formatted"))?;
            let (chain_seq, leaf, chain) = match &row.chain {
                Some(l) => (
                    Some(i64::try_from(l.chain_seq).map_err(|_| StoreError::Corrupt("audit chain size"))?),
                    Some(l.leaf_hash.to_vec()),
                    Some(l.chain_hash.to_vec()),
                ),
                None => (None, None, None),
            };
            sqlx::query(
                "INSERT INTO audit_events (seq, time, principal, source, action, tenant, token, outcome, error_code, request_id, reason, detail, chain_seq, leaf_hash, chain_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(row.seq)
            .bind(time)
            .bind(&e.principal)
            .bind(&e.source)
            .bind(e.action.as_str())
            .bind(&e.tenant)
            .bind(&e.token)
            .bind(e.outcome.as_str())
            .bind(&e.error_code)
            .bind(&e.request_id)
            .bind(&e.reason)
            .bind(&e.detail)
            .bind(chain_seq)
            .bind(leaf)
            .bind(chain)
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// Insert one card row as it is (restore).
        async fn insert_card(tx: &mut Tx<'_>, row: &$crate::store::CardRow) -> Result<u64, $crate::store::StoreError> {
            let sql = "INSERT INTO cards (token, tenant, fingerprint, brand, bin, last4, pan_len, key_version, nonce, ciphertext, created_at, fingerprint_version, expires_at, last_used_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)";
            let res = sqlx::query(sql)
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
                .bind(i64::from(row.fingerprint_version))
                .bind(row.expires_at)
                .bind(row.last_used_at)
                .bind(row.updated_at)
                .execute(&mut **tx)
                .await?;
            Ok(res.rows_affected())
        }

        /// Insert a tenant row as it is (restore) or as new.
        async fn insert_tenant(tx: &mut Tx<'_>, row: &$crate::store::TenantRow, on_conflict: &str) -> Result<u64, $crate::store::StoreError> {
            let sql = format!(
                "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) {on_conflict}"
            );
            let res = sqlx::query(&sql)
                .bind(&row.name)
                .bind(&row.fingerprint_salt)
                .bind(i64::from(row.pan_shaped))
                .bind(row.token_ttl_days.map(i64::from))
                .bind(row.retention_days.map(i64::from))
                .bind(row.created_at)
                .bind(row.updated_at)
                .bind(row.deleted_at)
                .execute(&mut **tx)
                .await?;
            Ok(res.rows_affected())
        }

        fn key_from_row(r: &Row) -> Result<$crate::store::StoredKey, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::{KeyPurpose, KeyState, StoreError, StoredKey};
            let purpose: String = r.try_get("purpose")?;
            let version: i64 = r.try_get("version")?;
            let state: String = r.try_get("state")?;
            Ok(StoredKey {
                purpose: KeyPurpose::parse(&purpose).ok_or(StoreError::Corrupt("key purpose"))?,
                version: u32::try_from(version).map_err(|_| StoreError::Corrupt("key version"))?,
                kek_id: r.try_get("kek_id")?,
                wrapped: r.try_get("wrapped")?,
                created_at: r.try_get("created_at")?,
                state: KeyState::parse(&state).ok_or(StoreError::Corrupt("key state"))?,
                retired_at: r.try_get("retired_at")?,
                destroyed_at: r.try_get("destroyed_at")?,
                reencrypted_at: r.try_get("reencrypted_at")?,
            })
        }

        /// Insert a key row as it is; false if its purpose and version exist.
        /// Insert a key row unless it conflicts with any unique index: the
        /// same purpose and version, or a second active key of its purpose
        /// (instances starting at once on a new database both generate keys;
        /// PostgreSQL checks only the named arbiter of `ON CONFLICT (..)`,
        /// so the partial index `vault_keys_one_active` raised an error
        /// there). Returns whether it was inserted.
        async fn insert_key_row(tx: &mut Tx<'_>, k: &$crate::store::StoredKey) -> Result<bool, $crate::store::StoreError> {
            let res = sqlx::query(&format!(
                "INSERT INTO vault_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT DO NOTHING"
            ))
            .bind(k.purpose.as_str())
            .bind(i64::from(k.version))
            .bind(&k.kek_id)
            .bind(&k.wrapped)
            .bind(k.created_at)
            .bind(k.state.as_str())
            .bind(k.retired_at)
            .bind(k.destroyed_at)
            .bind(k.reencrypted_at)
            .execute(&mut **tx)
            .await?;
            Ok(res.rows_affected() == 1)
        }

        /// Check, in `tx`, that the DEK and fingerprint key versions are the
        /// active ones; `shared` also holds them until commit (a share lock on
        /// PostgreSQL; SQLite's write lock, which the statement takes, does
        /// that anyway), so a rotation waits for the transaction.
        async fn guard_keys(tx: &mut Tx<'_>, dek: u32, fingerprint: u32, shared: bool) -> Result<(), $crate::store::StoreError> {
            use sqlx::Row as _;
            let sql = if shared { <$store>::KEY_GUARD_SHARED } else { <$store>::KEY_GUARD };
            let rows = sqlx::query(sql)
                .bind(i64::from(dek))
                .bind(i64::from(fingerprint))
                .fetch_all(&mut **tx)
                .await?;
            let active = rows
                .iter()
                .filter(|r| r.try_get::<String, _>("state").is_ok_and(|s| s == "active"))
                .count();
            if active == 2 {
                Ok(())
            } else {
                Err($crate::store::StoreError::StaleKeys)
            }
        }

        fn card_from_row(r: &Row) -> Result<$crate::store::CardRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::StoreError;
            let pan_len: i64 = r.try_get("pan_len")?;
            let key_version: i64 = r.try_get("key_version")?;
            Ok($crate::store::CardRow {
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
                fingerprint_version: {
                    let v: i64 = r.try_get("fingerprint_version")?;
                    u32::try_from(v).map_err(|_| StoreError::Corrupt("fingerprint_version"))?
                },
                expires_at: r.try_get("expires_at")?,
                last_used_at: r.try_get("last_used_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        }

        fn collect_from_row(r: &Row) -> Result<$crate::store::CollectSessionRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            let require_cvc: i64 = r.try_get("code_required")?;
            Ok($crate::store::CollectSessionRow {
                id: r.try_get("id")?,
                tenant: r.try_get("tenant")?,
                allowed_origin: r.try_get("allowed_origin")?,
                secret_hash: r.try_get("secret_hash")?,
                require_cvc: require_cvc != 0,
                token_format: r.try_get("token_format")?,
                reference: r.try_get("reference")?,
                style: r.try_get("style")?,
                created_at: r.try_get("created_at")?,
                expires_at: r.try_get("expires_at")?,
                failures: r.try_get("failures")?,
                closed_at: r.try_get("closed_at")?,
                completed_at: r.try_get("completed_at")?,
                token: r.try_get("token")?,
                claimed_until: r.try_get("claimed_until")?,
            })
        }

        const FORWARD_KEY_COLUMNS: &str = "principal_id, upstream, key_hash, request_hash, state, created_at, completed_at, tenant, status, content_type, location, key_version, nonce, ciphertext";

        fn forward_key_from_row(r: &Row) -> Result<$crate::store::ForwardKeyRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::{ForwardKeyState, StoreError, StoredForwardAnswer};
            let state: String = r.try_get("state")?;
            let state = ForwardKeyState::parse(&state).ok_or(StoreError::Corrupt("forward_idempotency.state"))?;
            let status: Option<i64> = r.try_get("status")?;
            let key_version: Option<i64> = r.try_get("key_version")?;
            let nonce: Option<Vec<u8>> = r.try_get("nonce")?;
            let ciphertext: Option<Vec<u8>> = r.try_get("ciphertext")?;
            let tenant: Option<String> = r.try_get("tenant")?;
            let answer = match (state, tenant, status, key_version, nonce, ciphertext) {
                (ForwardKeyState::Pending, ..) => None,
                (ForwardKeyState::Completed, Some(tenant), Some(status), Some(key_version), Some(nonce), Some(ciphertext)) => {
                    Some(StoredForwardAnswer {
                        tenant,
                        status: u16::try_from(status).map_err(|_| StoreError::Corrupt("forward_idempotency.status"))?,
                        content_type: r.try_get("content_type")?,
                        location: r.try_get("location")?,
                        key_version: u32::try_from(key_version).map_err(|_| StoreError::Corrupt("forward_idempotency.key_version"))?,
                        nonce,
                        ciphertext,
                    })
                }
                (ForwardKeyState::Completed, ..) => return Err(StoreError::Corrupt("forward_idempotency answer")),
            };
            Ok($crate::store::ForwardKeyRow {
                principal_id: r.try_get("principal_id")?,
                upstream: r.try_get("upstream")?,
                key_hash: r.try_get("key_hash")?,
                request_hash: r.try_get("request_hash")?,
                state,
                created_at: r.try_get("created_at")?,
                completed_at: r.try_get("completed_at")?,
                answer,
            })
        }

        fn tenant_from_row(r: &Row) -> Result<$crate::store::TenantRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::StoreError;
            let days = |v: Option<i64>, what: &'static str| {
                v.map(|d| u32::try_from(d).map_err(|_| StoreError::Corrupt(what))).transpose()
            };
            let pan_shaped: i64 = r.try_get("pan_shaped")?;
            Ok($crate::store::TenantRow {
                name: r.try_get("name")?,
                fingerprint_salt: r.try_get("fingerprint_salt")?,
                pan_shaped: pan_shaped != 0,
                token_ttl_days: days(r.try_get("token_ttl_days")?, "token_ttl_days")?,
                retention_days: days(r.try_get("retention_days")?, "retention_days")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
                deleted_at: r.try_get("deleted_at")?,
            })
        }

        fn principal_from_row(r: &Row) -> Result<$crate::store::PrincipalRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            Ok($crate::store::PrincipalRow {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                roles: r.try_get("roles")?,
                tenants: r.try_get("tenants")?,
                key_hash: r.try_get("key_hash")?,
                created_at: r.try_get("created_at")?,
                revoked_at: r.try_get("revoked_at")?,
                cert_identity: r.try_get("cert_identity")?,
            })
        }

        fn audit_row_from_row(r: &Row) -> Result<$crate::store::AuditRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::StoreError;
            let stored = event_from_row(r)?;
            let chain_seq: Option<i64> = r.try_get("chain_seq")?;
            let leaf: Option<Vec<u8>> = r.try_get("leaf_hash")?;
            let chain: Option<Vec<u8>> = r.try_get("chain_hash")?;
            let chain = match (chain_seq, leaf, chain) {
                (Some(n), Some(l), Some(c)) => Some($crate::store::ChainLink {
                    chain_seq: u64::try_from(n).map_err(|_| StoreError::Corrupt("chain_seq"))?,
                    leaf_hash: l.try_into().map_err(|_| StoreError::Corrupt("leaf_hash"))?,
                    chain_hash: c.try_into().map_err(|_| StoreError::Corrupt("chain_hash"))?,
                }),
                (None, None, None) => None,
                _ => return Err(StoreError::Corrupt("partial chain columns")),
            };
            Ok($crate::store::AuditRow {
                seq: stored.seq,
                event: stored.event,
                chain,
            })
        }

        fn checkpoint_from_row(r: &Row) -> Result<audit::Checkpoint, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::StoreError;
            let size: i64 = r.try_get("tree_size")?;
            let root: Vec<u8> = r.try_get("root")?;
            let head: Vec<u8> = r.try_get("chain_head")?;
            let time: String = r.try_get("time")?;
            let sig: Vec<u8> = r.try_get("signature")?;
            let next_key: Option<String> = r.try_get("next_key")?;
            let next_key = next_key
                .map(|k| audit::VerifyingKey::parse(&k).map_err(|_| StoreError::Corrupt("checkpoint next key")))
                .transpose()?;
            Ok(audit::Checkpoint {
                tree_size: u64::try_from(size).map_err(|_| StoreError::Corrupt("checkpoint size"))?,
                root: root.try_into().map_err(|_| StoreError::Corrupt("checkpoint root"))?,
                chain_head: head.try_into().map_err(|_| StoreError::Corrupt("checkpoint head"))?,
                time: time::OffsetDateTime::parse(&time, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| StoreError::Corrupt("checkpoint time"))?,
                key_id: r.try_get("key_id")?,
                next_key,
                signature: sig.try_into().map_err(|_| StoreError::Corrupt("checkpoint signature"))?,
            })
        }

        async fn insert_checkpoint(tx: &mut Tx<'_>, cp: &audit::Checkpoint) -> Result<(), $crate::store::StoreError> {
            use $crate::store::StoreError;
            let time = cp
                .time
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|_| StoreError::Corrupt("checkpoint time"))?;
            sqlx::query(
                "INSERT INTO audit_checkpoints (tree_size, root, chain_head, time, key_id, signature, next_key) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(i64::try_from(cp.tree_size).map_err(|_| StoreError::Corrupt("checkpoint size"))?)
            .bind(cp.root.to_vec())
            .bind(cp.chain_head.to_vec())
            .bind(time)
            .bind(&cp.key_id)
            .bind(cp.signature.to_vec())
            .bind(cp.next_key.as_ref().map(ToString::to_string))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        async fn insert_signing_key_row(tx: &mut Tx<'_>, k: &$crate::store::SigningKeyRow) -> Result<u64, $crate::store::StoreError> {
            let res = sqlx::query(
                "INSERT INTO audit_signing_keys (generation, key_id, kek_id, wrapped, public_key, created_at, retired_at, destroyed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (generation) DO NOTHING",
            )
            .bind(i64::from(k.generation))
            .bind(&k.key_id)
            .bind(&k.kek_id)
            .bind(&k.wrapped)
            .bind(&k.public_key)
            .bind(k.created_at)
            .bind(k.retired_at)
            .bind(k.destroyed_at)
            .execute(&mut **tx)
            .await?;
            Ok(res.rows_affected())
        }

        fn signing_key_from_row(r: &Row) -> Result<$crate::store::SigningKeyRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            let generation: i64 = r.try_get("generation")?;
            Ok($crate::store::SigningKeyRow {
                generation: u32::try_from(generation).map_err(|_| $crate::store::StoreError::Corrupt("key generation"))?,
                key_id: r.try_get("key_id")?,
                kek_id: r.try_get("kek_id")?,
                wrapped: r.try_get("wrapped")?,
                public_key: r.try_get("public_key")?,
                created_at: r.try_get("created_at")?,
                retired_at: r.try_get("retired_at")?,
                destroyed_at: r.try_get("destroyed_at")?,
            })
        }

        fn event_from_row(r: &Row) -> Result<audit::StoredEvent, $crate::store::StoreError> {
            use sqlx::Row as _;
            use $crate::store::StoreError;
            let time: String = r.try_get("time")?;
            let action: String = r.try_get("action")?;
            let outcome: String = r.try_get("outcome")?;
            Ok(audit::StoredEvent {
                seq: r.try_get("seq")?,
                event: audit::AuditEvent {
                    time: time::OffsetDateTime::parse(&time, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| StoreError::Corrupt("audit time"))?,
                    principal: r.try_get("principal")?,
                    source: r.try_get("source")?,
                    action: audit::Action::parse(&action).ok_or(StoreError::Corrupt("audit action"))?,
                    tenant: r.try_get("tenant")?,
                    token: r.try_get("token")?,
                    outcome: audit::Outcome::parse(&outcome).ok_or(StoreError::Corrupt("audit outcome"))?,
                    error_code: r.try_get("error_code")?,
                    request_id: r.try_get("request_id")?,
                    reason: r.try_get("reason")?,
                    detail: r.try_get("detail")?,
                },
            })
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn dedicated_writer(&self) -> Result<Option<std::sync::Arc<dyn $crate::store::Writer>>, $crate::store::StoreError> {
                <$store>::own_writer(self)
            }

            fn principal_changes(&self) -> Option<$crate::store::PrincipalChanges> {
                <$store>::principal_feed(self)
            }

            async fn ping(&self) -> Result<(), $crate::store::StoreError> {
                self.bounded(async {
                    sqlx::query("SELECT 1").execute(&self.pool).await?;
                    Ok(())
                })
                .await
            }

            async fn probe_write(&self) -> Result<(), $crate::store::StoreError> {
                self.bounded(async {
                    sqlx::query("UPDATE storage_probe SET probed_at = $1 WHERE id = 1")
                        .bind($crate::store::now_millis())
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                })
                .await
            }

            async fn take_shared_rate(
                &self,
                scope: &str,
                key: &str,
                rate: $crate::monitor::Rate,
            ) -> Result<Option<Result<(), std::time::Duration>>, $crate::store::StoreError> {
                if !<$store>::SHARED_LIMITS || rate.is_off() {
                    return Ok(None);
                }
                let capacity = f64::from(rate.burst.max(1));
                let per_ms = f64::from(rate.per_minute) / 60_000.0;
                self.bounded(async {
                    let taken = sqlx::query(SHARED_RATE_TAKE)
                        .bind(scope)
                        .bind(key)
                        .bind(capacity)
                        .bind(per_ms)
                        .fetch_optional(&self.pool)
                        .await?;
                    if taken.is_some() {
                        return Ok(Some(Ok(())));
                    }
                    // Refused: how long until the next token.
                    let row = sqlx::query(SHARED_RATE_READ)
                        .bind(scope)
                        .bind(key)
                        .fetch_optional(&self.pool)
                        .await?;
                    let now_tokens = match row {
                        Some(r) => {
                            let tokens: f64 = sqlx::Row::try_get(&r, 0)?;
                            let at: i64 = sqlx::Row::try_get(&r, 1)?;
                            let now: i64 = sqlx::Row::try_get(&r, 2)?;
                            // Milliseconds: exact in f64.
                            (tokens + (now - at).max(0) as f64 * per_ms).min(capacity)
                        }
                        None => 0.0,
                    };
                    let wait_ms = ((1.0 - now_tokens) / per_ms).max(1.0);
                    Ok(Some(Err(std::time::Duration::from_secs_f64(wait_ms / 1000.0))))
                })
                .await
            }

            async fn give_back_shared_rate(
                &self,
                scope: &str,
                key: &str,
                rate: $crate::monitor::Rate,
            ) -> Result<(), $crate::store::StoreError> {
                if !<$store>::SHARED_LIMITS || rate.is_off() {
                    return Ok(());
                }
                self.bounded(async {
                    sqlx::query(SHARED_RATE_GIVE_BACK)
                        .bind(scope)
                        .bind(key)
                        .bind(f64::from(rate.burst.max(1)))
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                })
                .await
            }

            async fn record_shared_reveal(
                &self,
                principal: &str,
                window_ms: i64,
                token_hash: i64,
            ) -> Result<Option<$crate::store::SharedReveal>, $crate::store::StoreError> {
                if !<$store>::SHARED_LIMITS {
                    return Ok(None);
                }
                self.bounded(async {
                    let r = sqlx::query(SHARED_REVEAL_RECORD)
                        .bind(principal)
                        .bind(window_ms.max(1))
                        .bind(token_hash)
                        .fetch_one(&self.pool)
                        .await?;
                    let distinct: i64 = sqlx::Row::try_get(&r, 1)?;
                    Ok(Some($crate::store::SharedReveal {
                        window_start: sqlx::Row::try_get(&r, 0)?,
                        distinct: u64::try_from(distinct).unwrap_or(0),
                        fired: sqlx::Row::try_get(&r, 2)?,
                        new: sqlx::Row::try_get(&r, 3)?,
                        left_ms: sqlx::Row::try_get(&r, 4)?,
                    }))
                })
                .await
            }

            async fn shared_anomaly_history(
                &self,
                principal: &str,
                from_ms: i64,
                to_ms: i64,
            ) -> Result<Vec<(i64, u64)>, $crate::store::StoreError> {
                if !<$store>::SHARED_LIMITS {
                    return Ok(Vec::new());
                }
                self.bounded(async {
                    sqlx::query(SHARED_ANOMALY_PRUNE)
                        .bind(principal)
                        .bind(from_ms)
                        .bind(to_ms)
                        .execute(&self.pool)
                        .await?;
                    let rows = sqlx::query(
                        "SELECT window_start, distinct_tokens FROM anomaly_windows
                          WHERE principal = $1 AND window_start >= $2 AND window_start < $3
                          ORDER BY window_start",
                    )
                    .bind(principal)
                    .bind(from_ms)
                    .bind(to_ms)
                    .fetch_all(&self.pool)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            let n: i64 = sqlx::Row::try_get(r, 1)?;
                            Ok((sqlx::Row::try_get(r, 0)?, u64::try_from(n).unwrap_or(0)))
                        })
                        .collect()
                })
                .await
            }

            fn shared_monitoring(&self) -> bool {
                <$store>::SHARED_LIMITS
            }

            async fn block_source(
                &self,
                source: &str,
                block: std::time::Duration,
            ) -> Result<bool, $crate::store::StoreError> {
                if !<$store>::SHARED_LIMITS {
                    return Ok(false);
                }
                let block_ms = i64::try_from(block.as_millis()).unwrap_or(i64::MAX).max(1);
                self.bounded(async {
                    let started = sqlx::query(
                        "WITH clock AS (
                            SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms)
                         INSERT INTO source_blocks AS b (source, until_ms)
                         SELECT $1, now_ms + $2 FROM clock
                         ON CONFLICT (source) DO UPDATE SET until_ms = EXCLUDED.until_ms
                         WHERE b.until_ms <= EXCLUDED.until_ms - $2",
                    )
                    .bind(source)
                    .bind(block_ms)
                    .execute(&self.pool)
                    .await?;
                    Ok(started.rows_affected() == 1)
                })
                .await
            }

            async fn source_blocks(
                &self,
            ) -> Result<Vec<(String, std::time::Duration)>, $crate::store::StoreError> {
                if !<$store>::SHARED_LIMITS {
                    return Ok(Vec::new());
                }
                self.bounded(async {
                    let rows = sqlx::query(
                        "WITH clock AS (
                            SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms),
                         ended AS (
                            DELETE FROM source_blocks USING clock WHERE until_ms < now_ms - 60000)
                         SELECT source, until_ms - now_ms FROM source_blocks, clock
                          WHERE until_ms > now_ms",
                    )
                    .fetch_all(&self.pool)
                    .await?;
                    rows.iter()
                        .map(|r| {
                            let left: i64 = sqlx::Row::try_get(r, 1)?;
                            Ok((
                                sqlx::Row::try_get(r, 0)?,
                                std::time::Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                            ))
                        })
                        .collect()
                })
                .await
            }

            async fn claim_shared_anomaly(
                &self,
                principal: &str,
                window_start: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                if !<$store>::SHARED_LIMITS {
                    return Ok(true);
                }
                self.bounded(async {
                    let claimed = sqlx::query(
                        "UPDATE anomaly_windows SET fired = true
                          WHERE principal = $1 AND window_start = $2 AND NOT fired",
                    )
                    .bind(principal)
                    .bind(window_start)
                    .execute(&self.pool)
                    .await?;
                    Ok(claimed.rows_affected() == 1)
                })
                .await
            }

            async fn close(&self) {
                self.pool.close().await;
            }

            fn pool_state(&self) -> $crate::store::PoolState {
                $crate::store::PoolState {
                    open: self.pool.size(),
                    idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
                    max: self.pool.options().get_max_connections(),
                }
            }

            async fn load_keys(&self) -> Result<Vec<$crate::store::StoredKey>, $crate::store::StoreError> {
                self.bounded(async {
                    let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM vault_keys ORDER BY purpose, version"))
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(key_from_row).collect()
                })
                .await
            }

            async fn insert_key(
                &self,
                key: &$crate::store::StoredKey,
                event: audit::AuditEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let inserted = insert_key_row(&mut tx, key).await?;
                    if inserted {
                        insert_event(&mut tx, &event).await?;
                    }
                    tx.commit().await?;
                    Ok(inserted)
                })
                .await
            }

            async fn insert_cards(
                &self,
                cards: Vec<$crate::store::NewCard>,
                other_events: Vec<audit::AuditEvent>,
            ) -> Result<Vec<$crate::store::Inserted>, $crate::store::StoreError> {
                use sqlx::Row as _;
                use $crate::store::NewCard;
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    if let Some((dek, fingerprint)) = $crate::store::rows::one_key_set(&cards)? {
                        guard_keys(&mut tx, dek, fingerprint, true).await?;
                    }
                    let mut found = $crate::store::rows::Found::default();
                    // During a fingerprint rotation: cards stored under an
                    // older fingerprint key are found by their old
                    // fingerprints (the rows cannot move meanwhile without
                    // this transaction seeing it: a moved row conflicts with
                    // the insert below).
                    let lookups: Vec<(&String, &String)> = cards
                        .iter()
                        .flat_map(|c| c.previous_fingerprints.iter().map(move |f| (&c.row.tenant, f)))
                        .collect();
                    for chunk in lookups.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                            "SELECT {CARD_COLUMNS} FROM cards WHERE (tenant, fingerprint) IN ("
                        ));
                        let mut sep = q.separated(", ");
                        for (tenant, fp) in chunk {
                            sep.push("(");
                            sep.push_bind_unseparated(*tenant);
                            sep.push_unseparated(", ");
                            sep.push_bind_unseparated(*fp);
                            sep.push_unseparated(")");
                        }
                        q.push(")");
                        for r in q.build().fetch_all(&mut *tx).await? {
                            let row = card_from_row(&r)?;
                            found.previous.insert((row.tenant.clone(), row.fingerprint.clone()), row);
                        }
                    }
                    let to_insert: Vec<&NewCard> = cards.iter().filter(|c| found.before(c).is_none()).collect();
                    // A stored card past its expiry is gone as if deleted:
                    // the same card tokenized again gets a new token.
                    for chunk in to_insert.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlx::QueryBuilder::<$db>::new("DELETE FROM cards WHERE expires_at IS NOT NULL AND expires_at <= ");
                        q.push_bind(chunk.first().map_or(0, |c| c.row.created_at));
                        q.push(" AND (tenant, fingerprint) IN (");
                        let mut sep = q.separated(", ");
                        for c in chunk {
                            sep.push("(");
                            sep.push_bind_unseparated(&c.row.tenant);
                            sep.push_unseparated(", ");
                            sep.push_bind_unseparated(&c.row.fingerprint);
                            sep.push_unseparated(")");
                        }
                        q.push(")");
                        found.expired_replaced += q.build().execute(&mut *tx).await?.rows_affected();
                    }
                    // Multi-row statements: a 1000-card batch is a few dozen
                    // round trips, not two thousand.
                    for chunk in to_insert.chunks(ROWS_PER_STATEMENT) {
                        // The unique (tenant, fingerprint) constraint carries
                        // idempotency: a card whose tenant already has its
                        // fingerprint (stored before, inserted concurrently, or
                        // earlier in this very batch) is not inserted, and the
                        // select below returns the stored row.
                        let mut q = sqlx::QueryBuilder::<$db>::new(format!("INSERT INTO cards ({CARD_COLUMNS}) "));
                        q.push_values(chunk, |mut b, c| {
                            let r = &c.row;
                            b.push_bind(&r.token)
                                .push_bind(&r.tenant)
                                .push_bind(&r.fingerprint)
                                .push_bind(&r.brand)
                                .push_bind(&r.bin)
                                .push_bind(&r.last4)
                                .push_bind(i64::from(r.pan_len))
                                .push_bind(i64::from(r.key_version))
                                .push_bind(&r.nonce)
                                .push_bind(&r.ciphertext)
                                .push_bind(r.created_at)
                                .push_bind(i64::from(r.fingerprint_version))
                                .push_bind(r.expires_at)
                                .push_bind(r.last_used_at)
                                .push_bind(r.updated_at);
                        });
                        q.push(" ON CONFLICT (tenant, fingerprint) DO NOTHING RETURNING token");
                        // A new token that is already taken (a pan-shaped
                        // token drawn twice) violates the primary key: the
                        // caller draws again.
                        let rows = match q.build().fetch_all(&mut *tx).await {
                            Ok(rows) => rows,
                            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                                return Err($crate::store::StoreError::TokenTaken)
                            }
                            Err(e) => return Err(e.into()),
                        };
                        for r in rows {
                            found.created.insert(r.try_get("token")?);
                        }
                    }
                    let stale: Vec<&NewCard> = to_insert.iter().copied().filter(|c| !found.created.contains(&c.row.token)).collect();
                    for chunk in stale.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                            "SELECT {CARD_COLUMNS} FROM cards WHERE (tenant, fingerprint) IN ("
                        ));
                        let mut sep = q.separated(", ");
                        for c in chunk {
                            sep.push("(");
                            sep.push_bind_unseparated(&c.row.tenant);
                            sep.push_unseparated(", ");
                            sep.push_bind_unseparated(&c.row.fingerprint);
                            sep.push_unseparated(")");
                        }
                        q.push(")");
                        for r in q.build().fetch_all(&mut *tx).await? {
                            let row = card_from_row(&r)?;
                            found.existing.insert((row.tenant.clone(), row.fingerprint.clone()), row);
                        }
                    }
                    let (out, events) = $crate::store::rows::settle(cards, other_events, &found)?;
                    insert_events(&mut tx, &events).await?;
                    tx.commit().await?;
                    Ok(out)
                })
                .await
            }

            async fn find_card(&self, token: &str) -> Result<Option<$crate::store::CardRow>, $crate::store::StoreError> {
                if let Some(reader) = <$store>::point_reader(self) {
                    return reader.find_card(token);
                }
                self.bounded(async {
                    let row = sqlx::query(&format!("SELECT {CARD_COLUMNS} FROM cards WHERE token = $1"))
                        .bind(token)
                        .fetch_optional(&self.pool)
                        .await?;
                    row.as_ref().map(card_from_row).transpose()
                })
                .await
            }

            async fn tokens_taken(&self, tokens: &[String]) -> Result<Vec<String>, $crate::store::StoreError> {
                use sqlx::Row as _;
                self.bounded(async {
                    let mut taken = Vec::new();
                    for chunk in tokens.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlx::QueryBuilder::<$db>::new("SELECT token FROM cards WHERE token IN (");
                        let mut sep = q.separated(", ");
                        for t in chunk {
                            sep.push_bind(t);
                        }
                        q.push(")");
                        for r in q.build().fetch_all(&self.pool).await? {
                            taken.push(r.try_get("token")?);
                        }
                    }
                    Ok(taken)
                })
                .await
            }

            async fn pan_shaped_in_use(&self, bin: &str, last4: &str, pan_len: u8) -> Result<u64, $crate::store::StoreError> {
                self.bounded(async {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM cards WHERE bin = $1 AND last4 = $2 AND pan_len = $3 AND substr(token, 1, 4) <> 'tok_'",
                    )
                    .bind(bin)
                    .bind(last4)
                    .bind(i64::from(pan_len))
                    .fetch_one(&self.pool)
                    .await?;
                    Ok(u64::try_from(n).unwrap_or(0))
                })
                .await
            }

            async fn update_card(
                &self,
                row: &$crate::store::CardRow,
                expected_nonce: &[u8],
                active_fingerprint: u32,
                event: audit::AuditEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    guard_keys(&mut tx, row.key_version, active_fingerprint, true).await?;
                    let res = sqlx::query(
                        "UPDATE cards SET key_version = $1, nonce = $2, ciphertext = $3, updated_at = $4, last_used_at = $5
                         WHERE token = $6 AND tenant = $7 AND nonce = $8",
                    )
                    .bind(i64::from(row.key_version))
                    .bind(&row.nonce)
                    .bind(&row.ciphertext)
                    .bind(row.updated_at)
                    .bind(row.last_used_at)
                    .bind(&row.token)
                    .bind(&row.tenant)
                    .bind(expected_nonce)
                    .execute(&mut *tx)
                    .await?;
                    commit_if_changed(tx, res.rows_affected(), &event).await
                })
                .await
            }

            async fn touch_cards(&self, tokens: &[String], now: i64, granularity_ms: i64) -> Result<(), $crate::store::StoreError> {
                self.bounded(async {
                    // One transaction (one commit) for the whole list.
                    let mut tx = self.pool.begin().await?;
                    for chunk in tokens.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlx::QueryBuilder::<$db>::new("UPDATE cards SET last_used_at = ");
                        q.push_bind(now);
                        q.push(" WHERE (last_used_at IS NULL OR last_used_at < ");
                        q.push_bind(now - granularity_ms);
                        q.push(") AND token IN (");
                        let mut sep = q.separated(", ");
                        for t in chunk {
                            sep.push_bind(t);
                        }
                        q.push(")");
                        q.build().execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            async fn purge_due(
                &self,
                now: i64,
                retention: &[(String, i64)],
                limit: u32,
                mut event: audit::AuditEvent,
            ) -> Result<$crate::store::PurgeCounts, $crate::store::StoreError> {
                let counts = self
                    .bounded(async {
                        let mut tx = self.pool.begin().await?;
                        let limit = i64::from(limit.max(1));
                        let expired = sqlx::query(
                            "DELETE FROM cards WHERE token IN
                               (SELECT token FROM cards WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2)",
                        )
                        .bind(now)
                        .bind(limit)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        let mut retained = 0u64;
                        for (tenant, cutoff) in retention {
                            let left = limit - i64::try_from(expired + retained).unwrap_or(limit);
                            if left <= 0 {
                                break;
                            }
                            retained += sqlx::query(
                                "DELETE FROM cards WHERE token IN
                                   (SELECT token FROM cards WHERE tenant = $1 AND last_used_at < $2 LIMIT $3)",
                            )
                            .bind(tenant)
                            .bind(*cutoff)
                            .bind(left)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        }
                        let counts = $crate::store::PurgeCounts { expired, retention: retained };
                        if expired + retained == 0 {
                            tx.rollback().await?;
                            return Ok(counts);
                        }
                        event.detail = Some(format!("expired={expired} retention={retained}"));
                        insert_event(&mut tx, &event).await?;
                        tx.commit().await?;
                        Ok(counts)
                    })
                    .await?;
                if counts.expired + counts.retention > 0 {
                    self.after_delete().await;
                }
                Ok(counts)
            }

            async fn tenant(&self, name: &str) -> Result<Option<$crate::store::TenantRow>, $crate::store::StoreError> {
                // On the request path (a tenant's policy, re-read every
                // `tenants::FRESH`; with 30,000 tenants nearly every
                // request's): inline where the backend can.
                if let Some(reader) = <$store>::point_reader(self) {
                    return reader.find_tenant(name);
                }
                self.bounded(async {
                    let row = sqlx::query(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"))
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await?;
                    row.as_ref().map(tenant_from_row).transpose()
                })
                .await
            }

            async fn tenants(&self) -> Result<Vec<$crate::store::TenantRow>, $crate::store::StoreError> {
                self.bounded(async {
                    let rows = sqlx::query(&format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name"))
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(tenant_from_row).collect()
                })
                .await
            }

            async fn ensure_tenant(&self, row: &$crate::store::TenantRow) -> Result<$crate::store::TenantRow, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    insert_tenant(&mut tx, row, "ON CONFLICT (name) DO NOTHING").await?;
                    let stored = sqlx::query(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"))
                        .bind(&row.name)
                        .fetch_one(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    tenant_from_row(&stored)
                })
                .await
            }

            async fn set_tenant_policy(
                &self,
                row: &$crate::store::TenantRow,
                event: audit::AuditEvent,
            ) -> Result<$crate::store::TenantRow, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    insert_tenant(
                        &mut tx,
                        row,
                        "ON CONFLICT (name) DO UPDATE SET pan_shaped = excluded.pan_shaped,
                           token_ttl_days = excluded.token_ttl_days, retention_days = excluded.retention_days,
                           updated_at = excluded.updated_at",
                    )
                    .await?;
                    let stored = sqlx::query(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"))
                        .bind(&row.name)
                        .fetch_one(&mut *tx)
                        .await?;
                    insert_event(&mut tx, &event).await?;
                    tx.commit().await?;
                    tenant_from_row(&stored)
                })
                .await
            }

            async fn mark_tenant_deleted(&self, name: &str, at: i64, event: audit::AuditEvent) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let res = sqlx::query(
                        "UPDATE tenants SET deleted_at = $1, updated_at = $1, fingerprint_salt = NULL
                         WHERE name = $2 AND deleted_at IS NULL",
                    )
                    .bind(at)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                    commit_if_changed(tx, res.rows_affected(), &event).await
                })
                .await
            }

            async fn delete_tenant_cards(&self, tenant: &str, limit: u32) -> Result<u64, $crate::store::StoreError> {
                let n = self
                    .bounded(async {
                        let res = sqlx::query(
                            "DELETE FROM cards WHERE token IN (SELECT token FROM cards WHERE tenant = $1 LIMIT $2)",
                        )
                        .bind(tenant)
                        .bind(i64::from(limit.max(1)))
                        .execute(&self.pool)
                        .await?;
                        Ok(res.rows_affected())
                    })
                    .await?;
                if n > 0 {
                    self.after_delete().await;
                }
                Ok(n)
            }

            async fn insert_collect_session(
                &self,
                row: &$crate::store::CollectSessionRow,
                event: audit::AuditEvent,
            ) -> Result<(), $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    sqlx::query(&format!(
                        "INSERT INTO collect_sessions ({COLLECT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                    ))
                    .bind(&row.id)
                    .bind(&row.tenant)
                    .bind(&row.allowed_origin)
                    .bind(&row.secret_hash)
                    .bind(i64::from(row.require_cvc))
                    .bind(&row.token_format)
                    .bind(&row.reference)
                    .bind(&row.style)
                    .bind(row.created_at)
                    .bind(row.expires_at)
                    .bind(row.failures)
                    .bind(row.closed_at)
                    .bind(row.completed_at)
                    .bind(&row.token)
                    .bind(row.claimed_until)
                    .execute(&mut *tx)
                    .await?;
                    insert_event(&mut tx, &event).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            async fn find_collect_session(
                &self,
                id: &str,
            ) -> Result<Option<$crate::store::CollectSessionRow>, $crate::store::StoreError> {
                self.bounded(async {
                    let row = sqlx::query(&format!("SELECT {COLLECT_COLUMNS} FROM collect_sessions WHERE id = $1"))
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                    row.as_ref().map(collect_from_row).transpose()
                })
                .await
            }

            async fn complete_collect_session(
                &self,
                id: &str,
                token: &str,
                at: i64,
                event: audit::AuditEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let res = sqlx::query(
                        "UPDATE collect_sessions SET completed_at = $1, token = $2, claimed_until = NULL
                         WHERE id = $3 AND completed_at IS NULL AND closed_at IS NULL AND expires_at > $1",
                    )
                    .bind(at)
                    .bind(token)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    commit_if_changed(tx, res.rows_affected(), &event).await
                })
                .await
            }

            async fn claim_collect_session(
                &self,
                id: &str,
                now: i64,
                until: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let res = sqlx::query(
                        "UPDATE collect_sessions SET claimed_until = $3
                         WHERE id = $1 AND completed_at IS NULL AND closed_at IS NULL AND expires_at > $2
                           AND (claimed_until IS NULL OR claimed_until <= $2)",
                    )
                    .bind(id)
                    .bind(now)
                    .bind(until)
                    .execute(&self.pool)
                    .await?;
                    Ok(res.rows_affected() == 1)
                })
                .await
            }

            async fn fail_collect_session(
                &self,
                id: &str,
                max_failures: u32,
                at: i64,
                release: bool,
                event: audit::AuditEvent,
            ) -> Result<Option<i64>, $crate::store::StoreError> {
                use sqlx::Row as _;
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let row = sqlx::query(
                        "UPDATE collect_sessions SET failures = failures + 1,
                           claimed_until = CASE WHEN $4 = 1 THEN NULL ELSE claimed_until END,
                           closed_at = CASE WHEN failures + 1 >= $2 THEN $3 ELSE closed_at END
                         WHERE id = $1 AND completed_at IS NULL AND closed_at IS NULL AND expires_at > $3
                         RETURNING failures",
                    )
                    .bind(id)
                    .bind(i64::from(max_failures))
                    .bind(at)
                    .bind(i64::from(release))
                    .fetch_optional(&mut *tx)
                    .await?;
                    let failures = row.map(|r| r.try_get::<i64, _>("failures")).transpose()?;
                    insert_event(&mut tx, &event).await?;
                    tx.commit().await?;
                    Ok(failures)
                })
                .await
            }

            async fn purge_collect_sessions(
                &self,
                before: i64,
                limit: u32,
                event: &(dyn Fn(u64, u64) -> audit::AuditEvent + Send + Sync),
            ) -> Result<(u64, u64), $crate::store::StoreError> {
                use sqlx::Row as _;
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let rows = sqlx::query(
                        "SELECT id, completed_at FROM collect_sessions WHERE expires_at < $1 ORDER BY expires_at LIMIT $2",
                    )
                    .bind(before)
                    .bind(i64::from(limit.max(1)))
                    .fetch_all(&mut *tx)
                    .await?;
                    if rows.is_empty() {
                        tx.rollback().await?;
                        return Ok((0, 0));
                    }
                    let mut completed = 0u64;
                    let mut ids = Vec::with_capacity(rows.len());
                    for r in &rows {
                        let id: String = r.try_get("id")?;
                        let done: Option<i64> = r.try_get("completed_at")?;
                        completed += u64::from(done.is_some());
                        ids.push(id);
                    }
                    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlx::QueryBuilder::<$db>::new("DELETE FROM collect_sessions WHERE id IN (");
                        let mut list = q.separated(", ");
                        for id in chunk {
                            list.push_bind(id.clone());
                        }
                        list.push_unseparated(")");
                        q.build().execute(&mut *tx).await?;
                    }
                    let open = ids.len() as u64 - completed;
                    insert_event(&mut tx, &event(completed, open)).await?;
                    tx.commit().await?;
                    Ok((completed, open))
                })
                .await
            }

            async fn claim_forward_key(
                &self,
                row: &$crate::store::ForwardKeyRow,
                expired_before: i64,
            ) -> Result<$crate::store::ForwardClaim, $crate::store::StoreError> {
                use $crate::store::{ForwardClaim, ForwardKeyState, StoreError};
                let (claim, expired) = self.bounded(async {
                    // The found row may be released between the insert and
                    // the read (on PostgreSQL, in another transaction): try
                    // again, a few times.
                    for _ in 0..3 {
                        let mut tx = self.pool.begin().await?;
                        // The first statement writes: SQLite takes its write
                        // lock here, so concurrent claims are serialised.
                        let expired = sqlx::query(
                            "DELETE FROM forward_idempotency
                              WHERE principal_id = $1 AND upstream = $2 AND key_hash = $3 AND created_at < $4",
                        )
                        .bind(&row.principal_id)
                        .bind(&row.upstream)
                        .bind(&row.key_hash)
                        .bind(expired_before)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        let inserted = sqlx::query(
                            "INSERT INTO forward_idempotency (principal_id, upstream, key_hash, request_hash, state, created_at)
                             VALUES ($1, $2, $3, $4, $5, $6)
                             ON CONFLICT (principal_id, upstream, key_hash) DO NOTHING",
                        )
                        .bind(&row.principal_id)
                        .bind(&row.upstream)
                        .bind(&row.key_hash)
                        .bind(&row.request_hash)
                        .bind(ForwardKeyState::Pending.as_str())
                        .bind(row.created_at)
                        .execute(&mut *tx)
                        .await?;
                        if inserted.rows_affected() == 1 {
                            tx.commit().await?;
                            return Ok((ForwardClaim::Claimed, expired > 0));
                        }
                        let found = sqlx::query(&format!(
                            "SELECT {FORWARD_KEY_COLUMNS} FROM forward_idempotency
                              WHERE principal_id = $1 AND upstream = $2 AND key_hash = $3"
                        ))
                        .bind(&row.principal_id)
                        .bind(&row.upstream)
                        .bind(&row.key_hash)
                        .fetch_optional(&mut *tx)
                        .await?;
                        tx.commit().await?;
                        if let Some(found) = found {
                            return Ok((ForwardClaim::Existing(Box::new(forward_key_from_row(&found)?)), expired > 0));
                        }
                    }
                    Err(StoreError::Conflict)
                })
                .await?;
                if expired {
                    // An expired answer's ciphertext went: out of SQLite's WAL.
                    self.after_delete().await;
                }
                Ok(claim)
            }

            async fn complete_forward_key(
                &self,
                principal_id: &str,
                upstream: &str,
                key_hash: &str,
                created_at: i64,
                completed_at: i64,
                answer: &$crate::store::StoredForwardAnswer,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let res = sqlx::query(
                        "UPDATE forward_idempotency SET state = 'completed', completed_at = $5, tenant = $6, status = $7,
                                content_type = $8, location = $9, key_version = $10, nonce = $11, ciphertext = $12
                          WHERE principal_id = $1 AND upstream = $2 AND key_hash = $3 AND created_at = $4
                            AND state = 'pending'
                            AND EXISTS (SELECT 1 FROM vault_keys WHERE purpose = 'dek' AND version = $10
                                          AND state IN ('active', 'decrypt_only'))",
                    )
                    .bind(principal_id)
                    .bind(upstream)
                    .bind(key_hash)
                    .bind(created_at)
                    .bind(completed_at)
                    .bind(&answer.tenant)
                    .bind(i64::from(answer.status))
                    .bind(&answer.content_type)
                    .bind(&answer.location)
                    .bind(i64::from(answer.key_version))
                    .bind(&answer.nonce)
                    .bind(&answer.ciphertext)
                    .execute(&self.pool)
                    .await?;
                    Ok(res.rows_affected() == 1)
                })
                .await
            }

            async fn release_forward_key(
                &self,
                principal_id: &str,
                upstream: &str,
                key_hash: &str,
                created_at: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let res = sqlx::query(
                        "DELETE FROM forward_idempotency
                          WHERE principal_id = $1 AND upstream = $2 AND key_hash = $3 AND created_at = $4
                            AND state = 'pending'",
                    )
                    .bind(principal_id)
                    .bind(upstream)
                    .bind(key_hash)
                    .bind(created_at)
                    .execute(&self.pool)
                    .await?;
                    Ok(res.rows_affected() == 1)
                })
                .await
            }

            async fn find_forward_key(
                &self,
                principal_id: &str,
                upstream: &str,
                key_hash: &str,
            ) -> Result<Option<$crate::store::ForwardKeyRow>, $crate::store::StoreError> {
                self.bounded(async {
                    let row = sqlx::query(&format!(
                        "SELECT {FORWARD_KEY_COLUMNS} FROM forward_idempotency
                          WHERE principal_id = $1 AND upstream = $2 AND key_hash = $3"
                    ))
                    .bind(principal_id)
                    .bind(upstream)
                    .bind(key_hash)
                    .fetch_optional(&self.pool)
                    .await?;
                    row.as_ref().map(forward_key_from_row).transpose()
                })
                .await
            }

            async fn purge_forward_keys(
                &self,
                before: i64,
                limit: u32,
                event: &(dyn Fn(u64) -> audit::AuditEvent + Send + Sync),
            ) -> Result<u64, $crate::store::StoreError> {
                use sqlx::Row as _;
                let n = self
                    .bounded(async {
                        let mut tx = self.pool.begin().await?;
                        let rows = sqlx::query(
                            "SELECT principal_id, upstream, key_hash FROM forward_idempotency
                              WHERE created_at < $1 ORDER BY created_at LIMIT $2",
                        )
                        .bind(before)
                        .bind(i64::from(limit.max(1)))
                        .fetch_all(&mut *tx)
                        .await?;
                        if rows.is_empty() {
                            tx.rollback().await?;
                            return Ok(0);
                        }
                        let mut keys = Vec::with_capacity(rows.len());
                        for r in &rows {
                            let p: String = r.try_get("principal_id")?;
                            let u: String = r.try_get("upstream")?;
                            let k: String = r.try_get("key_hash")?;
                            keys.push((p, u, k));
                        }
                        let mut deleted = 0u64;
                        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
                            let mut q = sqlx::QueryBuilder::<$db>::new(
                                "DELETE FROM forward_idempotency WHERE (principal_id, upstream, key_hash) IN (",
                            );
                            for (i, (p, u, k)) in chunk.iter().enumerate() {
                                q.push(if i == 0 { "(" } else { ", (" });
                                q.push_bind(p.clone());
                                q.push(", ");
                                q.push_bind(u.clone());
                                q.push(", ");
                                q.push_bind(k.clone());
                                q.push(")");
                            }
                            // A key claimed again meanwhile stays.
                            q.push(") AND created_at < ");
                            q.push_bind(before);
                            deleted += q.build().execute(&mut *tx).await?.rows_affected();
                        }
                        if deleted == 0 {
                            tx.rollback().await?;
                            return Ok(0);
                        }
                        insert_event(&mut tx, &event(deleted)).await?;
                        tx.commit().await?;
                        Ok(deleted)
                    })
                    .await?;
                if n > 0 {
                    // Deleted answers hold ciphertext: out of SQLite's WAL.
                    self.after_delete().await;
                }
                Ok(n)
            }

            async fn delete_card(
                &self,
                token: &str,
                tenant: &str,
                event: audit::AuditEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                let deleted = self
                    .bounded(async {
                        let mut tx = self.pool.begin().await?;
                        let res = sqlx::query("DELETE FROM cards WHERE token = $1 AND tenant = $2")
                            .bind(token)
                            .bind(tenant)
                            .execute(&mut *tx)
                            .await?;
                        commit_if_changed(tx, res.rows_affected(), &event).await
                    })
                    .await?;
                if deleted {
                    self.after_delete().await;
                }
                Ok(deleted)
            }

            async fn append_audit(&self, event: audit::AuditEvent) -> Result<i64, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let seq = insert_event(&mut tx, &event).await?;
                    tx.commit().await?;
                    Ok(seq)
                })
                .await
            }

            async fn audit_events(&self, after: i64, limit: u32) -> Result<Vec<audit::StoredEvent>, $crate::store::StoreError> {
                self.bounded(async {
                    let rows = sqlx::query(&format!(
                        "SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
                    ))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                    rows.iter().map(event_from_row).collect()
                })
                .await
            }

            async fn insert_principal(
                &self,
                row: &$crate::store::PrincipalRow,
                event: audit::AuditEvent,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::StoreError;
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let res = sqlx::query(
                        "INSERT INTO principals (id, name, roles, tenants, key_hash, created_at, cert_identity) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&row.id)
                    .bind(&row.name)
                    .bind(&row.roles)
                    .bind(&row.tenants)
                    .bind(&row.key_hash)
                    .bind(row.created_at)
                    .bind(&row.cert_identity)
                    .execute(&mut *tx)
                    .await;
                    match res {
                        Ok(_) => {}
                        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(StoreError::Conflict),
                        Err(e) => return Err(e.into()),
                    }
                    insert_event(&mut tx, &event).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            async fn find_principal(&self, id: &str) -> Result<Option<$crate::store::PrincipalRow>, $crate::store::StoreError> {
                if let Some(reader) = <$store>::point_reader(self) {
                    return reader.find_principal(id);
                }
                self.bounded(async {
                    let row = sqlx::query(&format!("SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE id = $1"))
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                    row.as_ref().map(principal_from_row).transpose()
                })
                .await
            }

            async fn find_principal_by_cert(&self, identity: &str) -> Result<Option<$crate::store::PrincipalRow>, $crate::store::StoreError> {
                if let Some(reader) = <$store>::point_reader(self) {
                    return reader.find_principal_by_cert(identity);
                }
                self.bounded(async {
                    let row = sqlx::query(&format!(
                        "SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE cert_identity = $1 AND revoked_at IS NULL"
                    ))
                    .bind(identity)
                    .fetch_optional(&self.pool)
                    .await?;
                    row.as_ref().map(principal_from_row).transpose()
                })
                .await
            }

            async fn list_principals(&self) -> Result<Vec<$crate::store::PrincipalRow>, $crate::store::StoreError> {
                self.bounded(async {
                    let rows = sqlx::query(&format!(
                        "SELECT {PRINCIPAL_COLUMNS} FROM principals ORDER BY created_at, name"
                    ))
                    .fetch_all(&self.pool)
                    .await?;
                    rows.iter().map(principal_from_row).collect()
                })
                .await
            }

            async fn revoke_principal(
                &self,
                name: &str,
                at: i64,
                event: audit::AuditEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let res = sqlx::query("UPDATE principals SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL")
                        .bind(at)
                        .bind(name)
                        .execute(&mut *tx)
                        .await?;
                    commit_if_changed(tx, res.rows_affected(), &event).await
                })
                .await
            }

            async fn query_audit(
                &self,
                filter: &$crate::store::AuditFilter,
                after: u64,
                limit: u32,
            ) -> Result<Vec<audit::ChainedEvent>, $crate::store::StoreError> {
                use $crate::store::StoreError;
                self.bounded(async {
                    let mut q = sqlx::QueryBuilder::<$db>::new(format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE chain_seq > "));
                    q.push_bind(i64::try_from(after).map_err(|_| StoreError::Corrupt("chain_seq"))?);
                    for (column, value) in [
                        ("principal", filter.principal.as_deref()),
                        ("token", filter.token.as_deref()),
                        ("action", filter.action.map(|a| a.as_str())),
                        ("tenant", filter.tenant.as_deref()),
                        ("outcome", filter.outcome.map(|o| o.as_str())),
                    ] {
                        if let Some(v) = value {
                            q.push(format!(" AND {column} = "));
                            q.push_bind(v.to_owned());
                        }
                    }
                    q.push(" ORDER BY chain_seq LIMIT ");
                    q.push_bind(i64::from(limit));
                    let rows = q.build().fetch_all(&self.pool).await?;
                    rows.iter()
                        .map(|r| {
                            let row = audit_row_from_row(r)?;
                            let link = row.chain.ok_or(StoreError::Corrupt("unchained row"))?;
                            Ok(audit::ChainedEvent {
                                seq: link.chain_seq,
                                event: row.event,
                                leaf_hash: link.leaf_hash,
                                chain_hash: link.chain_hash,
                            })
                        })
                        .collect()
                })
                .await
            }

            async fn chained_events(&self, after: u64, limit: u32) -> Result<Vec<audit::ChainedEvent>, $crate::store::StoreError> {
                self.query_audit(&$crate::store::AuditFilter::default(), after, limit).await
            }

            async fn audit_size(&self) -> Result<u64, $crate::store::StoreError> {
                self.bounded(async {
                    let size: i64 = sqlx::query_scalar("SELECT size FROM audit_head WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?;
                    u64::try_from(size).map_err(|_| $crate::store::StoreError::Corrupt("audit head size"))
                })
                .await
            }

            async fn checkpoints(&self) -> Result<Vec<audit::Checkpoint>, $crate::store::StoreError> {
                self.bounded(async {
                    let rows = sqlx::query(&format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY tree_size"))
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(checkpoint_from_row).collect()
                })
                .await
            }

            async fn last_checkpoint(&self) -> Result<Option<audit::Checkpoint>, $crate::store::StoreError> {
                self.bounded(async {
                    let row = sqlx::query(&format!(
                        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1"
                    ))
                    .fetch_optional(&self.pool)
                    .await?;
                    row.as_ref().map(checkpoint_from_row).transpose()
                })
                .await
            }

            async fn write_checkpoint(&self, key: &audit::SigningKey) -> Result<Option<audit::Checkpoint>, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let trail = lock_head(&mut tx).await?;
                    let last: Option<i64> = sqlx::query_scalar("SELECT MAX(tree_size) FROM audit_checkpoints")
                        .fetch_one(&mut *tx)
                        .await?;
                    let last = last.and_then(|n| u64::try_from(n).ok());
                    if last == Some(trail.size()) {
                        tx.rollback().await?;
                        return Ok(None);
                    }
                    // A retired signing key signs nothing more (checked under
                    // the head lock, which a rotation holds too).
                    let retired: Option<bool> = sqlx::query_scalar(
                        "SELECT retired_at IS NOT NULL FROM audit_signing_keys WHERE key_id = $1",
                    )
                    .bind(key.key_id())
                    .fetch_optional(&mut *tx)
                    .await?;
                    if retired == Some(true) {
                        tx.rollback().await?;
                        return Err($crate::store::StoreError::StaleKeys);
                    }
                    let cp = trail.checkpoint(key, time::OffsetDateTime::now_utc());
                    insert_checkpoint(&mut tx, &cp).await?;
                    tx.commit().await?;
                    Ok(Some(cp))
                })
                .await
            }

            async fn load_signing_keys(&self) -> Result<Vec<$crate::store::SigningKeyRow>, $crate::store::StoreError> {
                self.bounded(async {
                    let rows = sqlx::query(&format!("SELECT {SIGNING_KEY_COLUMNS} FROM audit_signing_keys ORDER BY generation"))
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(signing_key_from_row).collect()
                })
                .await
            }

            async fn insert_signing_key(
                &self,
                key: &$crate::store::SigningKeyRow,
                event: audit::AuditEvent,
            ) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let inserted = insert_signing_key_row(&mut tx, key).await? == 1;
                    if inserted {
                        insert_event(&mut tx, &event).await?;
                    }
                    tx.commit().await?;
                    Ok(inserted)
                })
                .await
            }

            async fn rotate_signing_key(
                &self,
                old: &audit::SigningKey,
                new: &$crate::store::SigningKeyRow,
                event: audit::AuditEvent,
            ) -> Result<audit::Checkpoint, $crate::store::StoreError> {
                use $crate::store::StoreError;
                let next = audit::VerifyingKey::parse(&new.public_key).map_err(|_| StoreError::Corrupt("signing public key"))?;
                let previous = new.generation.checked_sub(1).ok_or(StoreError::Corrupt("key generation"))?;
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    // `kek_id`: a KEK rotation that re-wrapped the old
                    // generation meanwhile makes this a conflict, rather
                    // than a new generation under the KEK it replaced.
                    let retired = sqlx::query(
                        "UPDATE audit_signing_keys SET retired_at = $3
                          WHERE generation = $1 AND key_id = $2 AND retired_at IS NULL
                            AND kek_id = $4",
                    )
                    .bind(i64::from(previous))
                    .bind(old.key_id())
                    .bind(new.created_at)
                    .bind(&new.kek_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if retired != 1 || insert_signing_key_row(&mut tx, new).await? != 1 {
                        tx.rollback().await?;
                        return Err(StoreError::Conflict);
                    }
                    // The event first (it takes the head lock), then the
                    // announcement covers it.
                    insert_event(&mut tx, &event).await?;
                    let trail = lock_head(&mut tx).await?;
                    let announcement = trail.announce(old, time::OffsetDateTime::now_utc(), &next);
                    insert_checkpoint(&mut tx, &announcement).await?;
                    tx.commit().await?;
                    Ok(announcement)
                })
                .await
            }

            async fn destroy_signing_key(
                &self,
                generation: u32,
                at: i64,
                event: audit::AuditEvent,
            ) -> Result<$crate::store::KeyChangeOutcome, $crate::store::StoreError> {
                use $crate::store::{KeyChangeOutcome, KeyState};
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let changed = sqlx::query(
                        "UPDATE audit_signing_keys SET wrapped = $2, destroyed_at = $3
                          WHERE generation = $1 AND retired_at IS NOT NULL AND destroyed_at IS NULL",
                    )
                    .bind(i64::from(generation))
                    .bind(Vec::<u8>::new())
                    .bind(at)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if changed == 1 {
                        insert_event(&mut tx, &event).await?;
                        tx.commit().await?;
                        return Ok(KeyChangeOutcome::Done);
                    }
                    let row = sqlx::query(&format!("SELECT {SIGNING_KEY_COLUMNS} FROM audit_signing_keys WHERE generation = $1"))
                        .bind(i64::from(generation))
                        .fetch_optional(&mut *tx)
                        .await?;
                    tx.rollback().await?;
                    Ok(match row.as_ref().map(signing_key_from_row).transpose()? {
                        None => KeyChangeOutcome::NotFound,
                        Some(k) if k.state() == KeyState::Active => KeyChangeOutcome::Active,
                        Some(k) => KeyChangeOutcome::WrongState(k.state()),
                    })
                })
                .await
            }

            async fn rotate_keys(
                &self,
                keys: &[$crate::store::StoredKey],
                events: Vec<audit::AuditEvent>,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::StoreError;
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    // Key rows are always locked in (purpose, version) order,
                    // as the tokenization guard does: no lock cycle.
                    let mut keys: Vec<&$crate::store::StoredKey> = keys.iter().collect();
                    keys.sort_by_key(|k| (k.purpose, k.version));
                    for k in keys {
                        let previous = k.version.checked_sub(1).ok_or(StoreError::Corrupt("key version"))?;
                        // Demote the active key this one replaces; if it is not
                        // active any more, another instance rotated first.
                        let res = sqlx::query(
                            "UPDATE vault_keys SET state = 'decrypt_only'
                              WHERE purpose = $1 AND version = $2 AND state = 'active'",
                        )
                        .bind(k.purpose.as_str())
                        .bind(i64::from(previous))
                        .execute(&mut *tx)
                        .await?;
                        if res.rows_affected() != 1 {
                            tx.rollback().await?;
                            return Err(StoreError::Conflict);
                        }
                        if !insert_key_row(&mut tx, k).await? {
                            tx.rollback().await?;
                            return Err(StoreError::Conflict);
                        }
                    }
                    insert_events(&mut tx, &events).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            async fn reencrypt_batch(
                &self,
                pass: &$crate::store::PassBatch,
                reseal: &(dyn for<'r> Fn(&'r $crate::store::CardRow) -> Option<$crate::store::Resealed> + Send + Sync),
            ) -> Result<$crate::store::BatchOutcome, $crate::store::StoreError> {
                use $crate::store::{BatchOutcome, StoreError};
                let dek = i64::from(pass.dek_version);
                let fp = i64::from(pass.fingerprint_version);
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    guard_keys(&mut tx, pass.dek_version, pass.fingerprint_version, false).await?;
                    // The first `limit` cards in insertion order (`CARD_SEQ`:
                    // SQLite's rowid, PostgreSQL's identity column) under any
                    // older version: one range scan per older version on its
                    // (version, seq) index, merged here. Each scan reads at
                    // most `limit` rows, whatever the size of the table and
                    // however much of it was moved already. The indexes end
                    // in an append-ordered key, so a new card adds its entry
                    // at their right edge instead of a random page
                    // (migration 0009).
                    let older = sqlx::query(
                        "SELECT purpose, version FROM vault_keys
                          WHERE (purpose = 'dek' AND version < $1) OR (purpose = 'fingerprint' AND version < $2)",
                    )
                    .bind(dek)
                    .bind(fp)
                    .fetch_all(&mut *tx)
                    .await?;
                    let after = pass.after.unwrap_or(0);
                    let seq = <$store>::CARD_SEQ;
                    let mut found: std::collections::BTreeMap<i64, $crate::store::CardRow> = std::collections::BTreeMap::new();
                    for r in &older {
                        use sqlx::Row as _;
                        let purpose: String = r.try_get("purpose")?;
                        let version: i64 = r.try_get("version")?;
                        // Rows under an older DEK, on (key_version, seq); rows
                        // under an older fingerprint key only (already under
                        // the active DEK: the others are found by their DEK),
                        // on (fingerprint_version, key_version, seq).
                        let (range, under_active) = if purpose == "dek" {
                            ("key_version = $1", None)
                        } else {
                            ("fingerprint_version = $1 AND key_version = $4", Some(dek))
                        };
                        let sql = format!(
                            "SELECT {CARD_COLUMNS}, {seq} AS pass_seq FROM cards WHERE {range} AND {seq} > $2 ORDER BY {seq} LIMIT $3{}",
                            <$store>::PASS_LOCK
                        );
                        let mut q = sqlx::query(&sql).bind(version).bind(after).bind(i64::from(pass.limit));
                        if let Some(active) = under_active {
                            q = q.bind(active);
                        }
                        let rows = q.fetch_all(&mut *tx).await?;
                        for r in &rows {
                            let n: i64 = r.try_get("pass_seq")?;
                            found.insert(n, card_from_row(r)?);
                        }
                    }
                    let rows: Vec<(i64, $crate::store::CardRow)> = found
                        .into_iter()
                        .take(usize::try_from(pass.limit).unwrap_or(usize::MAX))
                        .collect();
                    let mut out = BatchOutcome {
                        selected: rows.len() as u64,
                        last_seq: rows.last().map(|(n, _)| *n),
                        ..BatchOutcome::default()
                    };
                    let rows: Vec<$crate::store::CardRow> = rows.into_iter().map(|(_, r)| r).collect();
                    let moves: Vec<_> = rows
                        .iter()
                        .filter_map(|r| reseal(r).map(|n| (r, n)))
                        .collect();
                    // Each row changes only if it is still under the versions
                    // it was read with (optimistic check: another instance's
                    // pass may have moved it meanwhile).
                    for chunk in moves.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "WITH v (token, old_key_version, old_fingerprint_version, key_version, fingerprint_version, fingerprint, nonce, ciphertext) AS (",
                        );
                        q.push_values(chunk, |mut b, (r, n)| {
                            b.push_bind(r.token.clone())
                                .push_bind(i64::from(r.key_version))
                                .push_bind(i64::from(r.fingerprint_version))
                                .push_bind(i64::from(n.key_version))
                                .push_bind(i64::from(n.fingerprint_version))
                                .push_bind(n.fingerprint.clone())
                                .push_bind(n.nonce.clone())
                                .push_bind(n.ciphertext.clone());
                        });
                        q.push(
                            ") UPDATE cards SET key_version = v.key_version, fingerprint_version = v.fingerprint_version,
                                     fingerprint = v.fingerprint, nonce = v.nonce, ciphertext = v.ciphertext
                               FROM v
                              WHERE cards.token = v.token AND cards.key_version = v.old_key_version
                                AND cards.fingerprint_version = v.old_fingerprint_version",
                        );
                        match q.build().execute(&mut *tx).await {
                            Ok(res) => out.moved += res.rows_affected(),
                            // A new fingerprint that another row already has:
                            // cannot happen while tokenization looks up old
                            // fingerprints first; refuse rather than merge.
                            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                                return Err(StoreError::Conflict)
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    out.skipped = out.selected - out.moved;
                    // Counting costs a scan of what remains: only when asked,
                    // or when this batch ran out of rows (the end may be here).
                    if pass.count || out.selected < u64::from(pass.limit) {
                        let remaining: i64 = sqlx::query_scalar(COUNT_OUTDATED)
                            .bind(dek)
                            .bind(fp)
                            .fetch_one(&mut *tx)
                            .await?;
                        out.remaining = Some(u64::try_from(remaining).map_err(|_| StoreError::Corrupt("count"))?);
                    }
                    tx.commit().await?;
                    if out.remaining == Some(0) {
                        // Once per pass, whatever the number of instances: the
                        // first to set the mark records the event, in the
                        // same transaction. A transaction of its own, holding
                        // no card row: tokenizations hold the active DEK row
                        // (share lock on PostgreSQL) and may wait for card
                        // rows, so taking that row while holding card rows
                        // could deadlock. Hence the re-check of "nothing left".
                        let mut tx = self.pool.begin().await?;
                        let res = sqlx::query(
                            "UPDATE vault_keys SET reencrypted_at = $3
                              WHERE purpose = 'dek' AND version = $1 AND state = 'active' AND reencrypted_at IS NULL
                                AND NOT EXISTS (SELECT 1 FROM cards WHERE key_version < $1)
                                AND NOT EXISTS (SELECT 1 FROM cards WHERE fingerprint_version < $2)",
                        )
                        .bind(dek)
                        .bind(fp)
                        .bind($crate::store::now_millis())
                        .execute(&mut *tx)
                        .await?;
                        if res.rows_affected() == 1 {
                            insert_event(&mut tx, &pass.finished_event).await?;
                            tx.commit().await?;
                            out.finished = true;
                        } else {
                            tx.rollback().await?;
                        }
                    }
                    Ok(out)
                })
                .await
            }

            async fn change_key_state(
                &self,
                purpose: $crate::store::KeyPurpose,
                version: u32,
                change: $crate::store::KeyChange,
                at: i64,
                event: audit::AuditEvent,
            ) -> Result<$crate::store::KeyChangeOutcome, $crate::store::StoreError> {
                use $crate::store::{KeyChange, KeyChangeOutcome, KeyPurpose, KeyState, StoreError};
                let column = match purpose {
                    KeyPurpose::Dek => "key_version",
                    KeyPurpose::Fingerprint => "fingerprint_version",
                };
                // A DEK also seals stored forwarded answers (kept 24 hours):
                // it is retired only once none uses it.
                let answers = match purpose {
                    KeyPurpose::Dek => " AND NOT EXISTS (SELECT 1 FROM forward_idempotency WHERE key_version = $2)",
                    KeyPurpose::Fingerprint => "",
                };
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    // The change itself is the first statement (SQLite takes its
                    // write lock there); its conditions carry the rules.
                    let res = match change {
                        KeyChange::Retire => sqlx::query(&format!(
                            "UPDATE vault_keys SET state = 'retired', retired_at = $3
                              WHERE purpose = $1 AND version = $2 AND state = 'decrypt_only'
                                AND NOT EXISTS (SELECT 1 FROM cards WHERE {column} = $2){answers}"
                        ))
                        .bind(purpose.as_str())
                        .bind(i64::from(version))
                        .bind(at)
                        .execute(&mut *tx)
                        .await?,
                        KeyChange::Destroy => sqlx::query(
                            "UPDATE vault_keys SET state = 'destroyed', destroyed_at = $3, wrapped = $4
                              WHERE purpose = $1 AND version = $2 AND state = 'retired'",
                        )
                        .bind(purpose.as_str())
                        .bind(i64::from(version))
                        .bind(at)
                        .bind(Vec::<u8>::new())
                        .execute(&mut *tx)
                        .await?,
                    };
                    if res.rows_affected() == 1 {
                        insert_event(&mut tx, &event).await?;
                        tx.commit().await?;
                        return Ok(KeyChangeOutcome::Done);
                    }
                    let state: Option<String> =
                        sqlx::query_scalar("SELECT state FROM vault_keys WHERE purpose = $1 AND version = $2")
                            .bind(purpose.as_str())
                            .bind(i64::from(version))
                            .fetch_optional(&mut *tx)
                            .await?;
                    tx.rollback().await?;
                    let Some(state) = state else {
                        return Ok(KeyChangeOutcome::NotFound);
                    };
                    let state = KeyState::parse(&state).ok_or(StoreError::Corrupt("key state"))?;
                    Ok(match (change, state) {
                        (_, KeyState::Active) => KeyChangeOutcome::Active,
                        (KeyChange::Retire, KeyState::DecryptOnly) => KeyChangeOutcome::InUse,
                        (_, other) => KeyChangeOutcome::WrongState(other),
                    })
                })
                .await
            }

            async fn rewrap_keys(
                &self,
                old_kek_id: &str,
                keys: &[$crate::store::StoredKey],
                signing: &[$crate::store::SigningKeyRow],
                event: audit::AuditEvent,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::StoreError;
                let new_kek_id = keys
                    .first()
                    .map(|k| k.kek_id.clone())
                    .or_else(|| signing.first().map(|k| k.kek_id.clone()))
                    .ok_or(StoreError::Corrupt("nothing to re-wrap"))?;
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    let mut changed = 0u64;
                    for k in keys {
                        changed += sqlx::query(
                            "UPDATE vault_keys SET wrapped = $3, kek_id = $4
                              WHERE purpose = $1 AND version = $2 AND kek_id = $5 AND state <> 'destroyed'",
                        )
                        .bind(k.purpose.as_str())
                        .bind(i64::from(k.version))
                        .bind(&k.wrapped)
                        .bind(&k.kek_id)
                        .bind(old_kek_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    }
                    for k in signing {
                        changed += sqlx::query(
                            "UPDATE audit_signing_keys SET wrapped = $2, kek_id = $3 WHERE generation = $1 AND kek_id = $4 AND destroyed_at IS NULL",
                        )
                        .bind(i64::from(k.generation))
                        .bind(&k.wrapped)
                        .bind(&k.kek_id)
                        .bind(old_kek_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    }
                    // Every key, none left behind (e.g. one added by a
                    // concurrent rotation under the old KEK).
                    let left: i64 = sqlx::query_scalar(
                        "SELECT (SELECT COUNT(*) FROM vault_keys WHERE state <> 'destroyed' AND kek_id <> $1)
                              + (SELECT COUNT(*) FROM audit_signing_keys WHERE destroyed_at IS NULL AND kek_id <> $1)",
                    )
                    .bind(&new_kek_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    if changed != (keys.len() + signing.len()) as u64 || left != 0 {
                        tx.rollback().await?;
                        return Err(StoreError::Conflict);
                    }
                    insert_event(&mut tx, &event).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            async fn count_outdated(&self, dek_version: u32, fingerprint_version: u32) -> Result<u64, $crate::store::StoreError> {
                self.bounded(async {
                    let n: i64 = sqlx::query_scalar(COUNT_OUTDATED)
                        .bind(i64::from(dek_version))
                        .bind(i64::from(fingerprint_version))
                        .fetch_one(&self.pool)
                        .await?;
                    u64::try_from(n).map_err(|_| $crate::store::StoreError::Corrupt("count"))
                })
                .await
            }

            async fn key_usage(&self) -> Result<$crate::store::KeyUsage, $crate::store::StoreError> {
                use sqlx::Row as _;
                use $crate::store::{KeyUsage, StoreError};
                self.bounded(async {
                    let mut usage = KeyUsage::default();
                    for (column, map) in [
                        ("key_version", &mut usage.by_dek),
                        ("fingerprint_version", &mut usage.by_fingerprint),
                    ] {
                        let rows = sqlx::query(&format!("SELECT {column} AS v, COUNT(*) AS n FROM cards GROUP BY {column}"))
                            .fetch_all(&self.pool)
                            .await?;
                        for r in rows {
                            let v: i64 = r.try_get("v")?;
                            let n: i64 = r.try_get("n")?;
                            map.insert(
                                u32::try_from(v).map_err(|_| StoreError::Corrupt("key version"))?,
                                u64::try_from(n).map_err(|_| StoreError::Corrupt("count"))?,
                            );
                        }
                    }
                    Ok(usage)
                })
                .await
            }

            async fn audit_archives(&self) -> Result<Vec<audit::db::ArchiveRow>, $crate::store::StoreError> {
                self.bounded(async {
                    let rows = sqlx::query(&format!("SELECT {ARCHIVE_COLUMNS} FROM audit_archives ORDER BY to_seq"))
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(archive_from_row).collect()
                })
                .await
            }

            async fn checkpoint_before(
                &self,
                after: u64,
                cutoff: time::OffsetDateTime,
            ) -> Result<Option<u64>, $crate::store::StoreError> {
                use $crate::store::StoreError;
                // Checkpoint times are RFC 3339 UTC text ("...Z") with a
                // fraction of varying length, which sorts like the times
                // except within one second ("…:14.5Z" < "…:14Z"). Comparing
                // with the whole second before the cutoff's is exact up to
                // that: every time found is before the cutoff (at most one
                // second early, never late).
                let bound = (cutoff.to_offset(time::UtcOffset::UTC) - time::Duration::SECOND)
                    .replace_nanosecond(0)
                    .map_err(|_| StoreError::Corrupt("cutoff time"))?
                    .format(&time::format_description::well_known::Rfc3339)
                    .map_err(|_| StoreError::Corrupt("cutoff time"))?;
                self.bounded(async {
                    let size: Option<i64> = sqlx::query_scalar(
                        "SELECT MAX(tree_size) FROM audit_checkpoints WHERE tree_size > $1 AND time < $2",
                    )
                    .bind(i64::try_from(after).map_err(|_| StoreError::Corrupt("tree size"))?)
                    .bind(bound)
                    .fetch_one(&self.pool)
                    .await?;
                    Ok(size.and_then(|n| u64::try_from(n).ok()))
                })
                .await
            }

            async fn record_archive(
                &self,
                archive: &audit::db::ArchiveRow,
                event: audit::AuditEvent,
            ) -> Result<(), $crate::store::StoreError> {
                self.bounded(async {
                    let mut tx = self.pool.begin().await?;
                    // The event first: it takes the audit head lock, which
                    // serialises archivers before the contiguity check runs.
                    insert_event(&mut tx, &event).await?;
                    insert_archive(&mut tx, archive).await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await
            }

            async fn delete_archived_audit(&self, limit: u32) -> Result<u64, $crate::store::StoreError> {
                self.bounded(async {
                    let res = sqlx::query(
                        "DELETE FROM audit_events WHERE seq IN (SELECT seq FROM audit_events
                          WHERE chain_seq <= (SELECT COALESCE(MAX(to_seq), 0) FROM audit_archives)
                          ORDER BY chain_seq LIMIT $1)",
                    )
                    .bind(i64::from(limit))
                    .execute(&self.pool)
                    .await?;
                    Ok(res.rows_affected())
                })
                .await
            }

            async fn export(
                &self,
                sink: &mut (dyn FnMut($crate::store::BackupRecord) -> Result<(), $crate::store::StoreError> + Send),
            ) -> Result<(), $crate::store::StoreError> {
                use futures_util::TryStreamExt as _;
                use $crate::store::{BackupRecord, StoreError};
                let mut tx = self.pool.begin().await?;
                if let Some(sql) = <$store>::SNAPSHOT_ISOLATION {
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
                {
                    let sql = format!("SELECT {KEY_COLUMNS} FROM vault_keys ORDER BY purpose, version");
                    let mut rows = sqlx::query(&sql).fetch(&mut *tx);
                    while let Some(r) = rows.try_next().await? {
                        sink(BackupRecord::Key(key_from_row(&r)?))?;
                    }
                }
                type ToRecord = fn(&Row) -> Result<BackupRecord, StoreError>;
                let tables: [(String, ToRecord); 7] = [
                    (format!("SELECT {PRINCIPAL_COLUMNS} FROM principals ORDER BY id"), |r| {
                        Ok(BackupRecord::Principal(principal_from_row(r)?))
                    }),
                    (format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name"), |r| {
                        Ok(BackupRecord::Tenant(tenant_from_row(r)?))
                    }),
                    (format!("SELECT {CARD_COLUMNS} FROM cards ORDER BY token"), |r| {
                        Ok(BackupRecord::Card(card_from_row(r)?))
                    }),
                    (
                        format!("SELECT {SIGNING_KEY_COLUMNS} FROM audit_signing_keys ORDER BY generation"),
                        |r| Ok(BackupRecord::SigningKey(signing_key_from_row(r)?)),
                    ),
                    (format!("SELECT {EVENT_COLUMNS} FROM audit_events ORDER BY seq"), |r| {
                        Ok(BackupRecord::Audit(audit_row_from_row(r)?))
                    }),
                    (format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY tree_size"), |r| {
                        Ok(BackupRecord::Checkpoint(checkpoint_from_row(r)?))
                    }),
                    // After the checkpoints: a restore inserts them in this
                    // order, and a segment must end at a checkpoint.
                    (format!("SELECT {ARCHIVE_COLUMNS} FROM audit_archives ORDER BY to_seq"), |r| {
                        Ok(BackupRecord::Archive(archive_from_row(r)?))
                    }),
                ];
                for (sql, to_record) in tables {
                    let mut rows = sqlx::query(&sql).fetch(&mut *tx);
                    while let Some(r) = rows.try_next().await? {
                        sink(to_record(&r)?)?;
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn is_empty(&self) -> Result<bool, $crate::store::StoreError> {
                self.bounded(async {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT (SELECT COUNT(*) FROM vault_keys) + (SELECT COUNT(*) FROM cards)
                              + (SELECT COUNT(*) FROM principals) + (SELECT COUNT(*) FROM audit_events)
                              + (SELECT COUNT(*) FROM audit_checkpoints) + (SELECT COUNT(*) FROM audit_signing_keys)
                              + (SELECT COUNT(*) FROM audit_archives) + (SELECT COUNT(*) FROM tenants)",
                    )
                    .fetch_one(&self.pool)
                    .await?;
                    Ok(n == 0)
                })
                .await
            }

            async fn import(&self, records: Vec<$crate::store::BackupRecord>) -> Result<(), $crate::store::StoreError> {
                use $crate::store::BackupRecord;
                let mut tx = self.pool.begin().await?;
                for record in &records {
                    match record {
                        BackupRecord::Key(k) => {
                            if !insert_key_row(&mut tx, k).await? {
                                return Err($crate::store::StoreError::Conflict);
                            }
                        }
                        BackupRecord::Principal(p) => {
                            sqlx::query(
                                "INSERT INTO principals (id, name, roles, tenants, key_hash, created_at, revoked_at, cert_identity)
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                            )
                            .bind(&p.id)
                            .bind(&p.name)
                            .bind(&p.roles)
                            .bind(&p.tenants)
                            .bind(&p.key_hash)
                            .bind(p.created_at)
                            .bind(p.revoked_at)
                            .bind(&p.cert_identity)
                            .execute(&mut *tx)
                            .await?;
                        }
                        BackupRecord::Card(row) => {
                            insert_card(&mut tx, row).await?;
                        }
                        BackupRecord::Tenant(row) => {
                            insert_tenant(&mut tx, row, "").await?;
                        }
                        BackupRecord::Audit(row) => {
                            insert_restored_event(&mut tx, row).await?;
                        }
                        BackupRecord::Checkpoint(cp) => {
                            insert_checkpoint(&mut tx, cp).await?;
                        }
                        BackupRecord::SigningKey(k) => {
                            insert_signing_key_row(&mut tx, k).await?;
                        }
                        BackupRecord::Archive(a) => {
                            insert_archive(&mut tx, a).await?;
                        }
                    }
                }
                // A backup from before tenant rows: its tenants keep their
                // unsalted fingerprint keys (as the migration does).
                sqlx::query(
                    "INSERT INTO tenants (name, created_at, updated_at)
                     SELECT tenant, MIN(created_at), MIN(created_at) FROM cards
                     WHERE tenant NOT IN (SELECT name FROM tenants) GROUP BY tenant",
                )
                .execute(&mut *tx)
                .await?;
                // The chain head follows from the restored chain, which must
                // link up entry by entry: a broken chain is not restored.
                let mut chained: Vec<audit::ChainedEvent> = records
                    .iter()
                    .filter_map(|r| match r {
                        BackupRecord::Audit(row) => row.chain.as_ref().map(|l| audit::ChainedEvent {
                            seq: l.chain_seq,
                            event: row.event.clone(),
                            leaf_hash: l.leaf_hash,
                            chain_hash: l.chain_hash,
                        }),
                        _ => None,
                    })
                    .collect();
                chained.sort_by_key(|c| c.seq);
                // Entries of archived segments may be gone: the chain goes on
                // from the last segment's anchor.
                let start = records
                    .iter()
                    .filter_map(|r| match r {
                        BackupRecord::Archive(a) => Some(&a.anchor),
                        _ => None,
                    })
                    .max_by_key(|a| a.tree_size)
                    .cloned()
                    .unwrap_or_else(audit::Anchor::genesis);
                let mut trail = start
                    .trail()
                    .ok_or($crate::store::StoreError::Corrupt("the anchor of an archived audit segment"))?;
                for entry in chained.iter().filter(|c| c.seq > start.tree_size) {
                    if !trail.append_chained(entry) {
                        return Err($crate::store::StoreError::Corrupt("the audit chain in the backup does not link up"));
                    }
                }
                save_head(&mut tx, &trail).await?;
                if let Some(sql) = <$store>::AFTER_IMPORT {
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(crate) use sql_store;
