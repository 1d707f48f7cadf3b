-- Idempotent forwarding (issue 18): a forwarded call with an
-- `Idempotency-Key` is claimed here before the acquirer is called, and its
-- (re-tokenized) answer kept for 24 hours, so that a repeat after a lost
-- connection is answered from it instead of charging again.
--
-- The key is the caller's: per principal and upstream, one row.
-- key_hash: hex SHA-256 of the Idempotency-Key (the raw key may be anything
-- and is never stored). request_hash: hex SHA-256 of method, path, content
-- type and body as the caller sent them (its body holds tokens, not card
-- data): the same key with another request is refused. state: 'pending'
-- (claimed: the call is under way, or the vault stopped during it) or
-- 'completed' (the answer is stored). tenant, status, content_type and
-- location: of the stored answer (the tenant of the call's tokens, the
-- upstream's HTTP status and headers); ciphertext: the answer's body,
-- sealed with the DEK of key_version (nonce), its associated data binding
-- the row's principal, upstream, key and request hashes, tenant, status,
-- content type, location and key version. Rows are purged 24 hours after
-- created_at.
CREATE TABLE forward_idempotency (
    principal_id    TEXT    NOT NULL,
    upstream        TEXT    NOT NULL,
    key_hash        TEXT    NOT NULL,
    request_hash    TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'completed')),
    created_at      INTEGER NOT NULL,
    completed_at    INTEGER,
    tenant          TEXT,
    status          INTEGER,
    content_type    TEXT,
    location        TEXT,
    key_version     INTEGER,
    nonce           BLOB,
    ciphertext      BLOB,
    PRIMARY KEY (principal_id, upstream, key_hash),
    CHECK (state = 'pending' OR (completed_at IS NOT NULL AND status IS NOT NULL
        AND key_version IS NOT NULL AND nonce IS NOT NULL AND ciphertext IS NOT NULL))
) STRICT;
CREATE INDEX forward_idempotency_created_at ON forward_idempotency (created_at);
CREATE INDEX forward_idempotency_key_version ON forward_idempotency (key_version);
