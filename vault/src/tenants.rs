//! Tenants: their policy (pan-shaped tokens allowed, default token
//! lifetime, retention), the salt of their fingerprint key, deletion
//! (crypto-shred), and the purge of records past their expiry or retention.
//!
//! A tenant row is created on the tenant's first tokenization with 32
//! random bytes of salt; its fingerprint key is HMAC(master, tenant, salt)
//! (`crypto::FingerprintKey`). Tenants that existed before (migration 0006)
//! have no salt and keep HMAC(master, tenant). Deleting a tenant marks it
//! deleted and erases its salt first, then deletes its records in batches:
//! from then on no fingerprint of it can be computed again, and it cannot be
//! tokenized for (409 `tenant_deleted`). Policies are cached per process for
//! [`FRESH`]; a deletion waits that long and sweeps again, so a record an
//! instance with a stale cache inserted meanwhile is deleted too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit::{Action, AuditEvent, Outcome};

use crate::store::{now_millis, PurgeCounts, Store, StoreError, TenantRow};

/// How long a process trusts its cached copy of a tenant's row.
pub const FRESH: Duration = Duration::from_secs(5);

/// Records deleted per transaction by the purge and tenant deletion.
pub const BATCH: u32 = 500;

/// One day in milliseconds.
pub(crate) const DAY_MS: i64 = 86_400_000;

/// Cached tenant rows of one process.
#[derive(Debug)]
pub struct Tenants {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<String, (TenantRow, Instant)>>,
}

impl Tenants {
    pub fn new(store: Arc<dyn Store>) -> Tenants {
        Tenants {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, name: &str) -> Option<TenantRow> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(name)
            .filter(|(_, at)| at.elapsed() < FRESH)
            .map(|(row, _)| row.clone())
    }

    fn remember(&self, row: &TenantRow) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(row.name.clone(), (row.clone(), Instant::now()));
    }

    /// The tenant's row, created (with a fresh salt) on first use.
    pub async fn for_use(&self, name: &str) -> Result<TenantRow, StoreError> {
        if let Some(row) = self.cached(name) {
            return Ok(row);
        }
        let row = match self.store.tenant(name).await? {
            Some(row) => row,
            None => self.store.ensure_tenant(&new_tenant(name)?).await?,
        };
        self.remember(&row);
        Ok(row)
    }

    /// The fingerprint salt of every tenant that is not deleted (for the
    /// re-encryption pass; `None`: a legacy tenant without salt). A deleted
    /// tenant's salt is erased: its records are never fingerprinted again.
    pub async fn salts(&self) -> Result<HashMap<String, Option<Vec<u8>>>, StoreError> {
        Ok(self
            .store
            .tenants()
            .await?
            .into_iter()
            .filter(|t| t.deleted_at.is_none())
            .map(|t| (t.name, t.fingerprint_salt))
            .collect())
    }

    /// Forget the cached row (after this process changed it).
    pub fn invalidate(&self, name: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// A new tenant row with 32 random bytes of salt and no policy.
pub fn new_tenant(name: &str) -> Result<TenantRow, StoreError> {
    let mut salt = vec![0u8; 32];
    getrandom::getrandom(&mut salt).map_err(|_| StoreError::Corrupt("random salt"))?;
    let now = now_millis();
    Ok(TenantRow {
        name: name.to_owned(),
        fingerprint_salt: Some(salt),
        pan_shaped: false,
        token_ttl_days: None,
        retention_days: None,
        created_at: now,
        updated_at: now,
        deleted_at: None,
    })
}

/// A change of a tenant's policy: `None` leaves a setting as it is;
/// `Some(None)` clears a lifetime or retention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyChange {
    pub pan_shaped: Option<bool>,
    pub token_ttl_days: Option<Option<u32>>,
    pub retention_days: Option<Option<u32>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("tenant must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    InvalidName,
    #[error("the tenant was deleted")]
    Deleted,
    #[error("no such tenant")]
    Unknown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Set a tenant's policy (operator command; audited `tenant_updated`).
pub async fn set_policy(
    store: &dyn Store,
    name: &str,
    change: PolicyChange,
) -> Result<TenantRow, TenantError> {
    let name = crate::Tenant::parse(name)
        .map_err(|_| TenantError::InvalidName)?
        .as_str()
        .to_owned();
    let mut row = match store.tenant(&name).await? {
        Some(row) if row.deleted_at.is_some() => return Err(TenantError::Deleted),
        Some(row) => row,
        None => new_tenant(&name)?,
    };
    if let Some(p) = change.pan_shaped {
        row.pan_shaped = p;
    }
    if let Some(t) = change.token_ttl_days {
        row.token_ttl_days = t;
    }
    if let Some(r) = change.retention_days {
        row.retention_days = r;
    }
    row.updated_at = now_millis();
    let days = |d: Option<u32>| d.map_or_else(|| "none".to_owned(), |d| format!("{d}d"));
    let event = AuditEvent::new(Action::TenantUpdated, Outcome::Success)
        .source("local")
        .tenant(name.clone())
        .detail(format!(
            "pan_shaped={} token_ttl={} retention={}",
            row.pan_shaped,
            days(row.token_ttl_days),
            days(row.retention_days)
        ));
    Ok(store.set_tenant_policy(&row, event).await?)
}

/// Delete a tenant: mark it deleted and erase its fingerprint salt (one
/// audited transaction), delete its records in batches, wait out the other
/// processes' caches and sweep again, then record how many were deleted.
/// Returns that count. Idempotent for the records (a second run finds the
/// tenant deleted and sweeps what is left).
pub async fn delete_tenant(store: &dyn Store, name: &str) -> Result<u64, TenantError> {
    let name = crate::Tenant::parse(name)
        .map_err(|_| TenantError::InvalidName)?
        .as_str()
        .to_owned();
    match store.tenant(&name).await? {
        None => return Err(TenantError::Unknown),
        Some(row) if row.deleted_at.is_none() => {
            let event = AuditEvent::new(Action::TenantDeleted, Outcome::Success)
                .source("local")
                .tenant(name.clone())
                .detail("started: fingerprint key erased");
            store
                .mark_tenant_deleted(&name, now_millis(), event)
                .await?;
        }
        Some(_) => {}
    }
    let mut deleted = 0;
    let mut swept_after_wait = false;
    loop {
        let n = store.delete_tenant_cards(&name, BATCH).await?;
        deleted += n;
        if n > 0 {
            continue;
        }
        if swept_after_wait {
            break;
        }
        tokio::time::sleep(FRESH + Duration::from_secs(1)).await;
        swept_after_wait = true;
    }
    let event = AuditEvent::new(Action::TenantDeleted, Outcome::Success)
        .source("local")
        .tenant(name.clone())
        .detail(format!("finished: records_deleted={deleted}"));
    store.append_audit(event).await?;
    Ok(deleted)
}

/// Delete every record past its expiry or its tenant's retention, in
/// batches (each one transaction with a `purged` audit event with its
/// counts). `actor` names who runs it (`purge` command or the service).
pub async fn purge(store: &dyn Store, actor: &str) -> Result<PurgeCounts, StoreError> {
    let now = now_millis();
    let retention: Vec<(String, i64)> = store
        .tenants()
        .await?
        .into_iter()
        .filter(|t| t.deleted_at.is_none())
        .filter_map(|t| {
            t.retention_days
                .map(|d| (t.name, now - i64::from(d) * DAY_MS))
        })
        .collect();
    let mut total = PurgeCounts::default();
    loop {
        let event = AuditEvent::new(Action::Purged, Outcome::Success).source(actor);
        let counts = store.purge_due(now, &retention, BATCH, event).await?;
        total.expired += counts.expired;
        total.retention += counts.retention;
        if counts.expired + counts.retention < u64::from(BATCH) {
            return Ok(total);
        }
    }
}

/// When a token of this tenant expires, given the request's own expiry
/// (which wins) and the tenant's default lifetime.
pub fn expiry_for(tenant: &TenantRow, requested: Option<i64>, now: i64) -> Option<i64> {
    requested.or_else(|| tenant.token_ttl_days.map(|d| now + i64::from(d) * DAY_MS))
}
