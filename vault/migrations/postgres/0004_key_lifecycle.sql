-- Key lifecycle (PostgreSQL): rotation, retirement, destruction (PCI DSS
-- 3.6/3.7). Same columns and constraints as migrations/sqlite.
--
-- vault_keys.state:
--   active        the one key of its purpose new records use (at most one,
--                 enforced by a partial unique index);
--   decrypt_only  an older version: still opens (DEK) or still finds (fingerprint)
--                 the records not yet moved by the re-encryption pass;
--   retired       no record uses it; never loaded into memory again;
--   destroyed     retired and its wrapped material erased (crypto-shredding;
--                 dead tuples keep the old bytes until VACUUM, and older
--                 backups hold them: see ARCHITECTURE.md).
-- reencrypted_at marks, on the active DEK, when the re-encryption pass to it
-- finished (set once: only one "finished" audit event, whatever the number of
-- instances).

ALTER TABLE vault_keys DROP CONSTRAINT vault_keys_state_check;
ALTER TABLE vault_keys ADD COLUMN retired_at BIGINT;
ALTER TABLE vault_keys ADD COLUMN destroyed_at BIGINT;
ALTER TABLE vault_keys ADD COLUMN reencrypted_at BIGINT;

UPDATE vault_keys k
   SET state = CASE
           WHEN k.state = 'retired' THEN 'retired'
           WHEN k.version < (SELECT MAX(o.version) FROM vault_keys o WHERE o.purpose = k.purpose) THEN 'decrypt_only'
           ELSE 'active'
       END,
       retired_at = CASE WHEN k.state = 'retired' THEN k.created_at END,
       reencrypted_at = CASE WHEN (SELECT COUNT(*) FROM vault_keys o WHERE o.purpose = k.purpose) = 1 THEN k.created_at END;

ALTER TABLE vault_keys ADD CONSTRAINT vault_keys_state_check
    CHECK (state IN ('active', 'decrypt_only', 'retired', 'destroyed'));
ALTER TABLE vault_keys ADD CONSTRAINT vault_keys_retired_at_check
    CHECK ((state IN ('retired', 'destroyed')) = (retired_at IS NOT NULL));
ALTER TABLE vault_keys ADD CONSTRAINT vault_keys_destroyed_at_check
    CHECK ((state = 'destroyed') = (destroyed_at IS NOT NULL));
ALTER TABLE vault_keys ADD CONSTRAINT vault_keys_destroyed_wrapped_check
    CHECK ((state = 'destroyed') = (length(wrapped) = 0));

CREATE UNIQUE INDEX vault_keys_one_active ON vault_keys (purpose) WHERE state = 'active';

-- Cards: the fingerprint key version next to the DEK version, and what the
-- re-encryption pass looks for: rows under an older DEK or fingerprint key,
-- in token order. With these indexes a batch is one short range scan per
-- older version (DEK: key_version = v; fingerprint key: fingerprint_version
-- = v under the active DEK), however large the table and however much of it
-- was moved already; they also serve the counts (index-only).
ALTER TABLE cards ADD COLUMN fingerprint_version BIGINT NOT NULL DEFAULT 1 CHECK (fingerprint_version > 0);
CREATE INDEX cards_key_version ON cards (key_version, token);
CREATE INDEX cards_fingerprint_version ON cards (fingerprint_version, key_version, token);
