-- Retention of the audit trail (PostgreSQL). Entries past the online
-- retention period are archived to a file (`tokenizer audit archive`): a
-- segment ends at a signed checkpoint, and the file starts from an anchor
-- (the chain head and Merkle frontier before its first entry), so it
-- verifies on its own. Each archived segment is recorded here, with the
-- anchor after its last entry: where the entries still in the database
-- continue.

CREATE TABLE audit_archives (
    to_seq       BIGINT  NOT NULL PRIMARY KEY,
    from_seq     BIGINT  NOT NULL,
    chain_head   BYTEA   NOT NULL,
    -- Merkle frontier after to_seq: concatenated 32-byte hashes.
    frontier     BYTEA   NOT NULL,
    file_name    TEXT    NOT NULL,
    file_sha256  TEXT    NOT NULL,
    archived_at  TEXT    NOT NULL,
    CHECK (from_seq >= 1 AND to_seq >= from_seq)
);

CREATE TRIGGER audit_archives_no_update_delete BEFORE UPDATE OR DELETE ON audit_archives
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_archives_no_truncate BEFORE TRUNCATE ON audit_archives
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Segments are contiguous (each starts right after the one before) and end
-- at a signed checkpoint. (Concurrent archivers are serialised by the audit
-- head lock that recording a segment takes.)
CREATE FUNCTION audit_archives_contiguous() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.from_seq <> COALESCE((SELECT MAX(to_seq) FROM audit_archives), 0) + 1
       OR NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE tree_size = NEW.to_seq) THEN
        RAISE EXCEPTION 'audit_archives: a segment starts right after the last one and ends at a checkpoint';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER audit_archives_contiguous BEFORE INSERT ON audit_archives
    FOR EACH ROW EXECUTE FUNCTION audit_archives_contiguous();

-- The one exception to append-only: entries inside an archived segment may
-- be deleted (they are in the archive file), by a role that has DELETE (the
-- owner; the runtime role has no DELETE grant). Every other entry still
-- refuses DELETE; UPDATE and TRUNCATE are refused as before.
CREATE FUNCTION audit_events_delete_archived_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.chain_seq IS NULL
       OR OLD.chain_seq > COALESCE((SELECT MAX(to_seq) FROM audit_archives), 0) THEN
        RAISE EXCEPTION 'audit_events is append-only (only archived entries may be deleted)';
    END IF;
    RETURN OLD;
END;
$$;
DROP TRIGGER audit_events_no_update_delete ON audit_events;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_delete_archived_only BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_delete_archived_only();
