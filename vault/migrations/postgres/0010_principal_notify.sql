-- Principal change notifications (issue 19): every instance caches the
-- principal rows it authenticates with (vault/src/access.rs) and drops a
-- row when its id is notified on channel `cardvault_principals`. A trigger,
-- not code in the store, so that every path notifies: the service, the CLI
-- of another process, a restore, an operator's manual SQL. NOTIFY is
-- transactional: listeners get it when (and only if) the change commits.
--
-- Payload: the principal id (both the old and the new one if an UPDATE
-- changed it); `*` after TRUNCATE (every row may have gone). The runtime
-- role needs no privilege for this: a trigger function is not checked for
-- EXECUTE when it fires, and LISTEN and pg_notify need none.
CREATE FUNCTION principals_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify('cardvault_principals', '*');
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('cardvault_principals', NEW.id);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('cardvault_principals', OLD.id);
    ELSE
        PERFORM pg_notify('cardvault_principals', OLD.id);
        IF NEW.id <> OLD.id THEN
            PERFORM pg_notify('cardvault_principals', NEW.id);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER principals_notify_change AFTER INSERT OR UPDATE OR DELETE ON principals
    FOR EACH ROW EXECUTE FUNCTION principals_notify_change();

CREATE TRIGGER principals_notify_truncate AFTER TRUNCATE ON principals
    FOR EACH STATEMENT EXECUTE FUNCTION principals_notify_change();
