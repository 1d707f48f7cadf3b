-- Idempotent forwarding (issue 18; PostgreSQL): the same table as
-- migrations/sqlite/0008_forward_idempotency.sql, where each column is
-- explained.
CREATE TABLE forward_idempotency (
    principal_id    TEXT    NOT NULL,
    upstream        TEXT    NOT NULL,
    key_hash        TEXT    NOT NULL,
    request_hash    TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'completed')),
    created_at      BIGINT  NOT NULL,
    completed_at    BIGINT,
    tenant          TEXT,
    status          BIGINT,
    content_type    TEXT,
    location        TEXT,
    key_version     BIGINT,
    nonce           BYTEA,
    ciphertext      BYTEA,
    PRIMARY KEY (principal_id, upstream, key_hash),
    CHECK (state = 'pending' OR (completed_at IS NOT NULL AND status IS NOT NULL
        AND key_version IS NOT NULL AND nonce IS NOT NULL AND ciphertext IS NOT NULL))
);
CREATE INDEX forward_idempotency_created_at ON forward_idempotency (created_at);
CREATE INDEX forward_idempotency_key_version ON forward_idempotency (key_version);
