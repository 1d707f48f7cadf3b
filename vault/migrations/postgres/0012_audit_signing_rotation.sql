-- Audit signing key rotation (issue 20). Same columns and rules as
-- migrations/sqlite.
--
-- audit_checkpoints.next_key: set on a key announcement, the checkpoint the
-- old signing key signs at a rotation, naming the new key
-- (`cardvault-audit-ed25519:<hex>`; the signature covers it).
--
-- audit_signing_keys: the newest generation is the one that signs
-- (retired_at NULL); a rotation sets retired_at on the one it replaces (it
-- signs nothing after); destroying a retired generation erases its wrapped
-- secret (empty) and sets destroyed_at. Its public key stays: it verifies
-- the checkpoints it signed. The runtime role may UPDATE only wrapped,
-- kek_id, retired_at and destroyed_at (deploy/postgres-roles.sql); the
-- trigger keeps those changes to the lifecycle's, for the owner too.
ALTER TABLE audit_checkpoints ADD COLUMN next_key TEXT;
ALTER TABLE audit_signing_keys ADD COLUMN retired_at BIGINT;
ALTER TABLE audit_signing_keys ADD COLUMN destroyed_at BIGINT;
ALTER TABLE audit_signing_keys ADD CONSTRAINT audit_signing_keys_destroyed_check
    CHECK ((destroyed_at IS NOT NULL) = (length(wrapped) = 0)
           AND (destroyed_at IS NULL OR retired_at IS NOT NULL));

CREATE FUNCTION audit_signing_keys_lifecycle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'audit_signing_keys: public keys are kept to verify the checkpoints they signed';
    END IF;
    IF NEW.generation IS DISTINCT FROM OLD.generation
       OR NEW.key_id IS DISTINCT FROM OLD.key_id
       OR NEW.public_key IS DISTINCT FROM OLD.public_key
       OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR (OLD.retired_at IS NOT NULL AND NEW.retired_at IS DISTINCT FROM OLD.retired_at)
       OR (OLD.destroyed_at IS NOT NULL AND NEW.destroyed_at IS DISTINCT FROM OLD.destroyed_at) THEN
        RAISE EXCEPTION 'audit_signing_keys: only retirement, destruction and re-wrapping change a key';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_signing_keys_lifecycle BEFORE UPDATE OR DELETE ON audit_signing_keys
    FOR EACH ROW EXECUTE FUNCTION audit_signing_keys_lifecycle();
