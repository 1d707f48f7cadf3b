-- Audit signing key rotation (issue 20). Same columns and rules as
-- migrations/postgres.
--
-- audit_checkpoints.next_key: set on a key announcement, the checkpoint the
-- old signing key signs at a rotation, naming the new key
-- (`cardvault-audit-ed25519:<hex>`; the signature covers it).
--
-- audit_signing_keys: the newest generation is the one that signs
-- (retired_at NULL); a rotation sets retired_at on the one it replaces (it
-- signs nothing after); destroying a retired generation erases its wrapped
-- secret (empty) and sets destroyed_at. Its public key stays: it verifies
-- the checkpoints it signed. Nothing else of a row ever changes.
ALTER TABLE audit_checkpoints ADD COLUMN next_key TEXT;
ALTER TABLE audit_signing_keys ADD COLUMN retired_at INTEGER;
ALTER TABLE audit_signing_keys ADD COLUMN destroyed_at INTEGER;

CREATE TRIGGER audit_signing_keys_lifecycle BEFORE UPDATE ON audit_signing_keys
WHEN NEW.generation IS NOT OLD.generation
  OR NEW.key_id IS NOT OLD.key_id
  OR NEW.public_key IS NOT OLD.public_key
  OR NEW.created_at IS NOT OLD.created_at
  OR (OLD.retired_at IS NOT NULL AND NEW.retired_at IS NOT OLD.retired_at)
  OR (OLD.destroyed_at IS NOT NULL AND (NEW.destroyed_at IS NOT OLD.destroyed_at OR length(NEW.wrapped) <> 0))
  OR (NEW.destroyed_at IS NOT NULL AND (NEW.retired_at IS NULL OR length(NEW.wrapped) <> 0))
  OR (NEW.destroyed_at IS NULL AND length(NEW.wrapped) = 0)
BEGIN
    SELECT RAISE(ABORT, 'audit_signing_keys: only retirement, destruction and re-wrapping change a key');
END;

CREATE TRIGGER audit_signing_keys_no_delete BEFORE DELETE ON audit_signing_keys
BEGIN
    SELECT RAISE(ABORT, 'audit_signing_keys: public keys are kept to verify the checkpoints they signed');
END;
