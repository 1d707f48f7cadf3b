-- Card lifecycle (issue 9): tenants with their policy and fingerprint salt,
-- token expiry, last use (retention) and updates.
--
-- tenants.fingerprint_salt: 32 random bytes mixed into the tenant's
-- fingerprint key (HMAC(fingerprint master, tenant, salt)). Erased when the
-- tenant is deleted: its fingerprint key can then never be derived again
-- (crypto-shred). NULL for a tenant that existed before this migration (its
-- key is derived from the master and the name alone, as before) and for a
-- deleted tenant (deleted_at set).
CREATE TABLE tenants (
    name              TEXT    NOT NULL PRIMARY KEY,
    fingerprint_salt  BLOB,
    pan_shaped        INTEGER NOT NULL DEFAULT 0 CHECK (pan_shaped IN (0, 1)),
    token_ttl_days    INTEGER CHECK (token_ttl_days > 0),
    retention_days    INTEGER CHECK (retention_days > 0),
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    deleted_at        INTEGER
) STRICT;

INSERT INTO tenants (name, created_at, updated_at)
    SELECT tenant, MIN(created_at), MIN(created_at) FROM cards GROUP BY tenant;

-- expires_at: the token is gone after it (NULL: no expiry). last_used_at:
-- when the card was last tokenized or detokenized (retention). updated_at:
-- the last expiry or name update.
ALTER TABLE cards ADD COLUMN expires_at INTEGER;
ALTER TABLE cards ADD COLUMN last_used_at INTEGER;
ALTER TABLE cards ADD COLUMN updated_at INTEGER;
UPDATE cards SET last_used_at = created_at;
CREATE INDEX cards_expires_at ON cards (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX cards_tenant_last_used ON cards (tenant, last_used_at);
-- Pan-shaped tokens of one BIN and last four share a small space: counted
-- when it runs out.
CREATE INDEX cards_bin_last4 ON cards (bin, last4, pan_len);
