-- Card lifecycle (issue 9; PostgreSQL): the same tables and columns as
-- migrations/sqlite/0006_card_lifecycle.sql, where each is explained.
CREATE TABLE tenants (
    name              TEXT    NOT NULL PRIMARY KEY,
    fingerprint_salt  BYTEA,
    pan_shaped        BIGINT  NOT NULL DEFAULT 0 CHECK (pan_shaped IN (0, 1)),
    token_ttl_days    BIGINT  CHECK (token_ttl_days > 0),
    retention_days    BIGINT  CHECK (retention_days > 0),
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL,
    deleted_at        BIGINT
);

INSERT INTO tenants (name, created_at, updated_at)
    SELECT tenant, MIN(created_at), MIN(created_at) FROM cards GROUP BY tenant;

ALTER TABLE cards ADD COLUMN expires_at BIGINT;
ALTER TABLE cards ADD COLUMN last_used_at BIGINT;
ALTER TABLE cards ADD COLUMN updated_at BIGINT;
UPDATE cards SET last_used_at = created_at;
CREATE INDEX cards_expires_at ON cards (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX cards_tenant_last_used ON cards (tenant, last_used_at);
CREATE INDEX cards_bin_last4 ON cards (bin, last4, pan_len);
