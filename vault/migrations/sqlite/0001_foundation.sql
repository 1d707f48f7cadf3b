-- cardvault foundation schema (SQLite).
-- Card rows hold only what may be shown in clear (brand, BIN, last four,
-- length) plus the sealed record; the PAN, expiry and name are only inside
-- `ciphertext`, sealed under the data key `key_version`.

CREATE TABLE vault_keys (
    purpose     TEXT    NOT NULL CHECK (purpose IN ('dek', 'fingerprint')),
    version     INTEGER NOT NULL CHECK (version > 0),
    kek_id      TEXT    NOT NULL,
    wrapped     BLOB    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (purpose, version)
) STRICT;

CREATE TABLE cards (
    token        TEXT    NOT NULL PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    brand        TEXT    NOT NULL,
    bin          TEXT    NOT NULL,
    last4        TEXT    NOT NULL,
    pan_len      INTEGER NOT NULL CHECK (pan_len BETWEEN 12 AND 19),
    key_version  INTEGER NOT NULL,
    nonce        BLOB    NOT NULL,
    ciphertext   BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (tenant, fingerprint)
) STRICT;

CREATE TABLE principals (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    roles       TEXT    NOT NULL,
    tenants     TEXT    NOT NULL,
    key_hash    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;

-- One active principal per name; a revoked name can be reused.
CREATE UNIQUE INDEX principals_active_name ON principals (name) WHERE revoked_at IS NULL;

CREATE TABLE audit_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    time        TEXT    NOT NULL,
    principal   TEXT,
    source      TEXT,
    action      TEXT    NOT NULL,
    tenant      TEXT,
    token       TEXT,
    outcome     TEXT    NOT NULL,
    error_code  TEXT,
    request_id  TEXT,
    reason      TEXT,
    detail      TEXT
);

CREATE INDEX audit_events_token ON audit_events (token);

-- The audit trail is append-only, also for anyone holding the database file.
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only');
END;

CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only');
END;
