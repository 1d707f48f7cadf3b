-- Tamper-evident audit trail (PostgreSQL); same shape as the SQLite
-- migration. Every event inserted from now on carries its place in one
-- gap-free chain (chain_seq = 1, 2, ...), its RFC 6962 leaf hash and the
-- running chain hash.

ALTER TABLE audit_events ADD COLUMN chain_seq BIGINT;
ALTER TABLE audit_events ADD COLUMN leaf_hash BYTEA;
ALTER TABLE audit_events ADD COLUMN chain_hash BYTEA;
CREATE UNIQUE INDEX audit_events_chain_seq ON audit_events (chain_seq);

-- The head of the chain: one row, updated (and so row-locked) by every
-- append, which serialises appends across connections and instances.
CREATE TABLE audit_head (
    id        BIGINT NOT NULL PRIMARY KEY CHECK (id = 1),
    size      BIGINT NOT NULL,
    head      BYTEA  NOT NULL,
    frontier  BYTEA  NOT NULL
);
INSERT INTO audit_head (id, size, head, frontier) VALUES (1, 0, decode(repeat('00', 32), 'hex'), ''::bytea);

CREATE TABLE audit_checkpoints (
    tree_size   BIGINT NOT NULL PRIMARY KEY,
    root        BYTEA  NOT NULL,
    chain_head  BYTEA  NOT NULL,
    time        TEXT   NOT NULL,
    key_id      TEXT   NOT NULL,
    signature   BYTEA  NOT NULL
);

CREATE TRIGGER audit_checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- The checkpoint signing key (Ed25519), stored only wrapped by the KEK.
-- `generation` 1 is the first key; a rotation adds the next generation. The
-- primary key makes first-start generation race-free across instances.
CREATE TABLE audit_signing_keys (
    generation  BIGINT  NOT NULL PRIMARY KEY,
    key_id      TEXT     NOT NULL UNIQUE,
    kek_id      TEXT     NOT NULL,
    wrapped     BYTEA    NOT NULL,
    public_key  TEXT     NOT NULL,
    created_at  BIGINT  NOT NULL
);
