-- Retention of the audit trail (SQLite). Entries past the online retention
-- period are archived to a file (`tokenizer audit archive`): a segment ends
-- at a signed checkpoint, and the file starts from an anchor (the chain head
-- and Merkle frontier before its first entry), so it verifies on its own.
-- Each archived segment is recorded here, with the anchor after its last
-- entry: where the entries still in the database continue.

CREATE TABLE audit_archives (
    to_seq       INTEGER NOT NULL PRIMARY KEY,
    from_seq     INTEGER NOT NULL,
    chain_head   BLOB    NOT NULL,
    -- Merkle frontier after to_seq: concatenated 32-byte hashes.
    frontier     BLOB    NOT NULL,
    file_name    TEXT    NOT NULL,
    file_sha256  TEXT    NOT NULL,
    archived_at  TEXT    NOT NULL,
    CHECK (from_seq >= 1 AND to_seq >= from_seq)
) STRICT;

CREATE TRIGGER audit_archives_no_update BEFORE UPDATE ON audit_archives
BEGIN
    SELECT RAISE(ABORT, 'audit_archives is append-only');
END;

CREATE TRIGGER audit_archives_no_delete BEFORE DELETE ON audit_archives
BEGIN
    SELECT RAISE(ABORT, 'audit_archives is append-only');
END;

-- Segments are contiguous (each starts right after the one before) and end
-- at a signed checkpoint.
CREATE TRIGGER audit_archives_contiguous BEFORE INSERT ON audit_archives
WHEN NEW.from_seq <> COALESCE((SELECT MAX(to_seq) FROM audit_archives), 0) + 1
  OR NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE tree_size = NEW.to_seq)
BEGIN
    SELECT RAISE(ABORT, 'audit_archives: a segment starts right after the last one and ends at a checkpoint');
END;

-- The one exception to append-only: entries inside an archived segment may
-- be deleted (they are in the archive file). Every other entry still
-- refuses DELETE.
DROP TRIGGER audit_events_no_delete;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN OLD.chain_seq IS NULL
  OR OLD.chain_seq > COALESCE((SELECT MAX(to_seq) FROM audit_archives), 0)
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only (only archived entries may be deleted)');
END;
