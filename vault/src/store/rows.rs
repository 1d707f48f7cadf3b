//! Pure pieces of the write path shared by the sqlx stores (`sql.rs`) and
//! SQLite's dedicated writer (`sqlite_writer.rs`): the audit head as a row,
//! an audit event as a row, and the outcome of an `insert_cards` once the
//! database has said which cards it created and which it already held.
//! No I/O here: each caller reads and writes with its own driver.

use std::collections::{HashMap, HashSet};

use audit::{Action, AuditEvent, ChainedEvent, Outcome, Trail};

use super::{check_event, CardRow, Inserted, NewCard, StoreError};

/// The principal columns, in the order the rusqlite reader reads them.
pub(crate) const PRINCIPAL_COLUMNS: &str =
    "id, name, roles, tenants, key_hash, created_at, revoked_at, cert_identity";
/// The columns of `cards`, in the order both drivers read and write them.
pub(crate) const TENANT_COLUMNS: &str =
    "name, fingerprint_salt, pan_shaped, token_ttl_days, retention_days, created_at, updated_at, deleted_at";
pub(crate) const CARD_COLUMNS: &str = "token, tenant, fingerprint, brand, bin, last4, pan_len, key_version, nonce, ciphertext, created_at, fingerprint_version, expires_at, last_used_at, updated_at";

/// The head of an `audit_events` insert; the values follow.
pub(crate) const EVENT_INSERT: &str = "INSERT INTO audit_events (time, principal, source, action, tenant, token, outcome, error_code, request_id, reason, detail, chain_seq, leaf_hash, chain_hash) ";

/// The audit chain resumed from the `audit_head` row.
pub(crate) fn trail_from_head(
    size: i64,
    head: Vec<u8>,
    frontier: Vec<u8>,
) -> Result<Trail, StoreError> {
    let size = u64::try_from(size).map_err(|_| StoreError::Corrupt("audit head size"))?;
    let head: [u8; 32] = head
        .try_into()
        .map_err(|_| StoreError::Corrupt("audit head hash"))?;
    if !frontier.len().is_multiple_of(32) {
        return Err(StoreError::Corrupt("audit head frontier"));
    }
    let nodes = frontier
        .chunks(32)
        .map(|c| <[u8; 32]>::try_from(c).map_err(|_| StoreError::Corrupt("audit head frontier")))
        .collect::<Result<Vec<_>, _>>()?;
    let tree = audit::merkle::Frontier::from_parts(size, nodes)
        .ok_or(StoreError::Corrupt("audit head frontier"))?;
    Trail::resume(audit::ChainState::resume(size, head), tree)
        .ok_or(StoreError::Corrupt("audit head"))
}

/// The `audit_head` row of a trail: size, head hash, frontier.
pub(crate) fn head_row(trail: &Trail) -> Result<(i64, Vec<u8>, Vec<u8>), StoreError> {
    let frontier: Vec<u8> = trail.tree().nodes().iter().flatten().copied().collect();
    let size = i64::try_from(trail.size()).map_err(|_| StoreError::Corrupt("audit size"))?;
    Ok((size, trail.chain().head.to_vec(), frontier))
}

/// Check events before they are chained (no card number in any field).
pub(crate) fn check_events(events: &[AuditEvent]) -> Result<(), StoreError> {
    events.iter().try_for_each(check_event)
}

/// The columns of an `audit_events` row that are not the event's own
/// fields: the time as RFC 3339 and the chain number.
pub(crate) fn event_row(c: &ChainedEvent) -> Result<(String, i64), StoreError> {
    let time = c
        .event
        .time
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| StoreError::Corrupt("audit time cannot be formatted"))?;
    let seq = i64::try_from(c.seq).map_err(|_| StoreError::Corrupt("audit chain size"))?;
    Ok((time, seq))
}

/// The chain number of a trail's last event.
pub(crate) fn last_seq(trail: &Trail) -> Result<i64, StoreError> {
    i64::try_from(trail.size()).map_err(|_| StoreError::Corrupt("audit chain size"))
}

/// What the database said about the cards of one `insert_cards` call.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// Stored under an older fingerprint key, by (tenant, old fingerprint).
    pub previous: HashMap<(String, String), CardRow>,
    /// Tokens this call inserted.
    pub created: HashSet<String>,
    /// Stored before (or earlier in this call), by (tenant, fingerprint).
    pub existing: HashMap<(String, String), CardRow>,
    /// Expired records deleted to make room for a new tokenization.
    pub expired_replaced: u64,
}

impl Found {
    /// The stored row a card was found under an older fingerprint, if any.
    pub fn before(&self, c: &NewCard) -> Option<&CardRow> {
        c.previous_fingerprints
            .iter()
            .find_map(|f| self.previous.get(&(c.row.tenant.clone(), f.clone())))
    }
}

/// The results in input order and every event to append, in order: the
/// caller's other events, a `purged` event if expired records were
/// replaced, then each card's event naming its token and whether it was
/// created.
pub(crate) fn settle(
    cards: Vec<NewCard>,
    other_events: Vec<AuditEvent>,
    found: &Found,
) -> Result<(Vec<Inserted>, Vec<AuditEvent>), StoreError> {
    let mut events = other_events;
    if found.expired_replaced > 0 {
        // Not any one request's doing (a group may hold several tenants):
        // the service's.
        events.push(
            AuditEvent::new(Action::Purged, Outcome::Success)
                .source("local")
                .detail(format!(
                    "expired={} retention=0 (replaced by a new tokenization)",
                    found.expired_replaced
                )),
        );
    }
    let mut out = Vec::with_capacity(cards.len());
    for card in cards {
        let before = found.before(&card).cloned();
        let NewCard { row, mut event, .. } = card;
        let inserted = if let Some(stored) = before {
            Inserted {
                row: stored,
                created: false,
            }
        } else if found.created.contains(&row.token) {
            Inserted { row, created: true }
        } else {
            let stored = found
                .existing
                .get(&(row.tenant.clone(), row.fingerprint.clone()))
                .cloned()
                .ok_or(StoreError::Corrupt("card neither inserted nor found"))?;
            Inserted {
                row: stored,
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
        events.push(event);
        out.push(inserted);
    }
    Ok((out, events))
}

/// Every card of one call must be sealed under the same key versions.
pub(crate) fn one_key_set(cards: &[NewCard]) -> Result<Option<(u32, u32)>, StoreError> {
    let Some(first) = cards.first() else {
        return Ok(None);
    };
    let versions = (first.row.key_version, first.row.fingerprint_version);
    if cards
        .iter()
        .any(|c| (c.row.key_version, c.row.fingerprint_version) != versions)
    {
        return Err(StoreError::Corrupt(
            "cards of one call under different keys",
        ));
    }
    Ok(Some(versions))
}
