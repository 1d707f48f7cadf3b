-- Tamper-evident audit trail (SQLite). Every event inserted from now on
-- carries its place in one gap-free chain (chain_seq = 1, 2, ...), its
-- RFC 6962 leaf hash and the running chain hash. Events written before this
-- migration (none on a fresh database) stay unchained and are reported as such.

ALTER TABLE audit_events ADD COLUMN chain_seq INTEGER;
ALTER TABLE audit_events ADD COLUMN leaf_hash BLOB;
ALTER TABLE audit_events ADD COLUMN chain_hash BLOB;
CREATE UNIQUE INDEX audit_events_chain_seq ON audit_events (chain_seq);

-- The head of the chain: one row, updated (and so locked) by every append,
-- which serialises appends across connections and instances. `frontier` is
-- the Merkle tree's right edge (concatenated 32-byte hashes), enough to sign
-- a checkpoint without rereading the trail.
CREATE TABLE audit_head (
    id        INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    size      INTEGER NOT NULL,
    head      BLOB    NOT NULL,
    frontier  BLOB    NOT NULL
) STRICT;
INSERT INTO audit_head (id, size, head, frontier) VALUES (1, 0, zeroblob(32), x'');

-- Signed checkpoints (tree size, Merkle root, chain head, time). Also
-- appended to a witness file outside the database.
CREATE TABLE audit_checkpoints (
    tree_size   INTEGER NOT NULL PRIMARY KEY,
    root        BLOB    NOT NULL,
    chain_head  BLOB    NOT NULL,
    time        TEXT    NOT NULL,
    key_id      TEXT    NOT NULL,
    signature   BLOB    NOT NULL
) STRICT;

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;

CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;

-- The checkpoint signing key (Ed25519), stored only wrapped by the KEK.
-- `generation` 1 is the first key; a rotation adds the next generation. The
-- primary key makes first-start generation race-free across instances.
CREATE TABLE audit_signing_keys (
    generation  INTEGER  NOT NULL PRIMARY KEY,
    key_id      TEXT     NOT NULL UNIQUE,
    kek_id      TEXT     NOT NULL,
    wrapped     BLOB     NOT NULL,
    public_key  TEXT     NOT NULL,
    created_at  INTEGER  NOT NULL
) STRICT;
