-- Key lifecycle (SQLite): rotation, retirement, destruction (PCI DSS 3.6/3.7).
--
-- vault_keys.state:
--   active        the one key of its purpose new records use (at most one,
--                 enforced by a partial unique index);
--   decrypt_only  an older version: still opens (DEK) or still finds (fingerprint)
--                 the records not yet moved by the re-encryption pass;
--   retired       no record uses it; never loaded into memory again;
--   destroyed     retired and its wrapped material erased (crypto-shredding).
-- reencrypted_at marks, on the active DEK, when the re-encryption pass to it
-- finished (set once: only one "finished" audit event, whatever the number of
-- instances). SQLite cannot change a CHECK constraint in place: the table is
-- rebuilt (nothing references it).

CREATE TABLE vault_keys_v4 (
    purpose         TEXT    NOT NULL CHECK (purpose IN ('dek', 'fingerprint')),
    version         INTEGER NOT NULL CHECK (version > 0),
    kek_id          TEXT    NOT NULL,
    wrapped         BLOB    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'decrypt_only', 'retired', 'destroyed')),
    created_at      INTEGER NOT NULL,
    retired_at      INTEGER,
    destroyed_at    INTEGER,
    reencrypted_at  INTEGER,
    PRIMARY KEY (purpose, version),
    CHECK ((state IN ('retired', 'destroyed')) = (retired_at IS NOT NULL)),
    CHECK ((state = 'destroyed') = (destroyed_at IS NOT NULL)),
    CHECK ((state = 'destroyed') = (length(wrapped) = 0))
) STRICT;

INSERT INTO vault_keys_v4 (purpose, version, kek_id, wrapped, state, created_at, retired_at, reencrypted_at)
SELECT k.purpose, k.version, k.kek_id, k.wrapped,
       CASE
           WHEN k.state = 'retired' THEN 'retired'
           WHEN k.version < (SELECT MAX(o.version) FROM vault_keys o WHERE o.purpose = k.purpose) THEN 'decrypt_only'
           ELSE 'active'
       END,
       k.created_at,
       CASE WHEN k.state = 'retired' THEN k.created_at END,
       CASE WHEN (SELECT COUNT(*) FROM vault_keys o WHERE o.purpose = k.purpose) = 1 THEN k.created_at END
  FROM vault_keys k;

DROP TABLE vault_keys;
ALTER TABLE vault_keys_v4 RENAME TO vault_keys;

CREATE UNIQUE INDEX vault_keys_one_active ON vault_keys (purpose) WHERE state = 'active';

-- Cards: the fingerprint key version next to the DEK version, and what the
-- re-encryption pass looks for: rows under an older DEK or fingerprint key,
-- in token order. With these indexes a batch is one short range scan per
-- older version (DEK: key_version = v; fingerprint key: fingerprint_version
-- = v under the active DEK), however large the table and however much of it
-- was moved already; they also serve the counts (index-only).
ALTER TABLE cards ADD COLUMN fingerprint_version INTEGER NOT NULL DEFAULT 1 CHECK (fingerprint_version > 0);
CREATE INDEX cards_key_version ON cards (key_version, token);
CREATE INDEX cards_fingerprint_version ON cards (fingerprint_version, key_version, token);
