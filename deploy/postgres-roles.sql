-- cardvault on PostgreSQL: roles and privileges (least privilege).
--
-- Three roles per cardvault database:
--
--   cardvault_owner  owns the database, the schema `public`, every table and
--                    the migration bookkeeping (`_sqlx_migrations`). Used only
--                    to run `tokenizer migrate`, `tokenizer restore` (which
--                    migrates and moves the audit sequence past the restored
--                    events) and `tokenizer audit archive` (which records an
--                    archived segment in audit_archives and deletes the
--                    archived audit_events rows); nothing else logs in as it.
--   cardvault_app    the role `tokenizer serve` runs as. It reads and writes
--                    rows and can do nothing else: it owns nothing, cannot
--                    create, alter or drop anything (no CREATE on the schema
--                    or the database, no TEMPORARY), and gets per table only:
--                      cards         SELECT, INSERT, UPDATE, DELETE
--                      tenants       SELECT, INSERT, UPDATE
--                      vault_keys    SELECT, INSERT, UPDATE (state,
--                                    retired_at, destroyed_at,
--                                    reencrypted_at, wrapped, kek_id) --
--                                    key lifecycle: rotation demotes the
--                                    active key, retirement and destruction
--                                    (which erases `wrapped`), the end of a
--                                    re-encryption pass, KEK rotation
--                                    (re-wrap); purpose, version and
--                                    created_at never change, no DELETE
--                      principals    SELECT, INSERT, UPDATE (revoked_at) --
--                                    revocation is the only update; roles,
--                                    tenants and key hashes cannot be changed
--                                    in place (each change is notified
--                                    on channel cardvault_principals by
--                                    migration 0010's trigger: firing a
--                                    trigger, LISTEN and NOTIFY need no
--                                    grant)
--                      audit_events  SELECT, INSERT -- no UPDATE, DELETE or
--                                    TRUNCATE
--                      audit_head    SELECT, UPDATE (the chain head row)
--                      audit_checkpoints  SELECT, INSERT
--                      audit_signing_keys  SELECT, INSERT, UPDATE (wrapped,
--                                    kek_id, retired_at, destroyed_at) --
--                                    KEK rotation re-wraps them, a
--                                    signing key rotation retires one,
--                                    destroy erases a retired one
--                      audit_archives  SELECT (backups read it; archiving
--                                    runs as the owner)
--                      collect_sessions  SELECT, INSERT, DELETE, UPDATE
--                                    (failures, closed_at, completed_at,
--                                    token, claimed_until)
--                      forward_idempotency  SELECT, INSERT, DELETE, UPDATE
--                                    (state, completed_at, tenant, status,
--                                    content_type, location, key_version,
--                                    nonce, ciphertext) -- completion of a
--                                    claimed key only
--                    plus CONNECT on the database and USAGE on the schema.
--                    No sequence privilege: `audit_events.seq` is an identity
--                    column, whose sequence INSERT advances without one.
--                    No privilege at all on `_sqlx_migrations`.
--   cardvault_auditor  the role an auditor's `vault-audit verify
--                    --database-url postgres://cardvault_auditor@.../cardvault`
--                    runs as. Read-only, and only the audit trail: CONNECT on
--                    the database, USAGE on the schema, and SELECT on
--                    audit_events, audit_checkpoints and audit_archives.
--                    Nothing on cards, principals, vault_keys, audit_head,
--                    audit_signing_keys or `_sqlx_migrations`; no INSERT,
--                    UPDATE or DELETE anywhere; owns nothing.
--
-- The audit trail is append-only twice over: the runtime and auditor roles
-- lack the grants, and triggers reject UPDATE and TRUNCATE on audit_events,
-- audit_checkpoints and audit_archives, and DELETE on the latter two, for
-- every role, the owner included. DELETE on audit_events is refused too,
-- except (trigger of migration 0003) for entries inside a segment recorded in
-- audit_archives, i.e. already written to an archive file; only a role with
-- DELETE on audit_events, the owner, can issue it at all. (The owner could
-- still drop those triggers: keep its credentials away from the service and
-- use them only for migrations, restores and archiving.)
--
-- Order of operations, once per database:
--
--   1. As a superuser (on a managed service: its admin role, which must be
--      able to act as cardvault_owner), create the roles and the database:
--        psql "postgres://admin@db.internal/postgres" \
--             -v phase=setup -f deploy/postgres-roles.sql
--      The roles are created without a password. Set one per role from psql
--      with `\password cardvault_owner`, `\password cardvault_app` and
--      `\password cardvault_auditor` (psql sends only a SCRAM hash: the
--      password never appears in a command line, the server log or shell
--      history), or use certificate auth.
--   2. Apply the schema as the owner:
--        tokenizer migrate --database-url \
--            'postgres://cardvault_owner@db.internal/cardvault?sslmode=verify-full&sslrootcert=/etc/cardvault/pg-ca.pem'
--      (with a password: put the whole URL in TOKENIZER_DATABASE_URL from a
--      secret store instead of on the command line).
--   3. Grant the runtime and auditor roles their privileges (as the
--      superuser or as cardvault_owner):
--        psql "postgres://admin@db.internal/postgres" \
--             -v phase=grants -f deploy/postgres-roles.sql
--   4. Run the service as the runtime role, with `migrate_on_start = false`
--      in its configuration file (the runtime role cannot migrate, so the
--      default `true` makes start-up fail) and TOKENIZER_DATABASE_URL set to
--        postgres://cardvault_app:PASSWORD@db.internal/cardvault?sslmode=verify-full&sslrootcert=/etc/cardvault/pg-ca.pem
--      then `tokenizer serve --config /etc/cardvault/tokenizer.toml`.
--   5. An auditor verifies the trail as the auditor role:
--        vault-audit verify --key audit-verify.pub --database-url \
--            'postgres://cardvault_auditor@db.internal/cardvault?sslmode=verify-full&sslrootcert=/etc/cardvault/pg-ca.pem'
--
-- After every later `tokenizer migrate`, run phase grants again (step 3). It
-- is idempotent and exact: it first revokes everything the runtime role, the
-- auditor role (and PUBLIC) have on the database, the schema, every table,
-- sequence and routine, then grants the lists above. A table added by a
-- migration is unreachable for both (fail closed) until its lines are added
-- to phase grants below; there are deliberately no default privileges on
-- tables or sequences for either. Phase setup is idempotent too.
--
-- Names: psql variables, with these defaults:
--   -v owner_role=cardvault_owner -v app_role=cardvault_app
--   -v auditor_role=cardvault_auditor -v db_name=cardvault
-- They are always substituted as :"var" (identifier) or :'var' (literal), so
-- any name is quoted correctly. The tests (vault/src/store/roles_tests.rs)
-- run this file with psql under random names.
--
-- Requires psql 10 or later (\if, \gexec). PostgreSQL 11 or later.

\set ON_ERROR_STOP on

\if :{?owner_role}
\else
\set owner_role cardvault_owner
\endif
\if :{?app_role}
\else
\set app_role cardvault_app
\endif
\if :{?auditor_role}
\else
\set auditor_role cardvault_auditor
\endif
\if :{?db_name}
\else
\set db_name cardvault
\endif
\if :{?phase}
\else
\set phase ''
\endif

SELECT :'phase' = 'setup' AS cardvault_phase_setup,
       :'phase' = 'grants' AS cardvault_phase_grants,
       current_database() <> :'db_name' AS cardvault_elsewhere \gset

SET cardvault.owner_role = :'owner_role';
SET cardvault.app_role = :'app_role';
SET cardvault.auditor_role = :'auditor_role';

-- Three distinct roles, checked before either phase changes anything.
DO $$
BEGIN
    IF current_setting('cardvault.owner_role') = current_setting('cardvault.app_role')
       OR current_setting('cardvault.auditor_role')
          IN (current_setting('cardvault.owner_role'), current_setting('cardvault.app_role')) THEN
        RAISE EXCEPTION 'the owner, the runtime and the auditor role must be three roles';
    END IF;
END
$$;

\if :cardvault_phase_setup

-- ---------------------------------------------------------------------------
-- Phase setup: roles and database. Run on any database of the cluster.
-- ---------------------------------------------------------------------------

-- The roles. No superuser, no CREATEDB/CREATEROLE, no replication, no RLS
-- bypass.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
              :'owner_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner_role') \gexec
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
              :'app_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_role') \gexec
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
              :'auditor_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'auditor_role') \gexec
ALTER ROLE :"owner_role" LOGIN;
ALTER ROLE :"app_role" LOGIN;
ALTER ROLE :"auditor_role" LOGIN;

-- Refuse roles that already existed with more power than this file gives,
-- a runtime or auditor role that is (or acts as) the owner, and an auditor
-- role that acts as the runtime role (it would gain its writes).
DO $$
DECLARE
    owner_role   text := current_setting('cardvault.owner_role');
    app_role     text := current_setting('cardvault.app_role');
    auditor_role text := current_setting('cardvault.auditor_role');
    r record;
BEGIN
    FOR r IN SELECT rolname FROM pg_roles
              WHERE rolname IN (owner_role, app_role, auditor_role)
                AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls)
    LOOP
        RAISE EXCEPTION 'role % has SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS: remove it first',
            r.rolname;
    END LOOP;
    IF pg_has_role(app_role, owner_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role % is a member of %: revoke that membership first', app_role, owner_role;
    END IF;
    IF pg_has_role(auditor_role, owner_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role % is a member of %: revoke that membership first', auditor_role, owner_role;
    END IF;
    IF pg_has_role(auditor_role, app_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role % is a member of %: revoke that membership first', auditor_role, app_role;
    END IF;
END
$$;

-- The database, owned by the owner role (also when it existed already, e.g.
-- created from a cloud console).
SELECT format('CREATE DATABASE %I OWNER %I', :'db_name', :'owner_role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db_name') \gexec
ALTER DATABASE :"db_name" OWNER TO :"owner_role";
-- PUBLIC loses CONNECT and TEMPORARY; phase grants gives CONNECT to the
-- runtime and auditor roles only.
REVOKE ALL ON DATABASE :"db_name" FROM PUBLIC;

\connect :"db_name"

-- The owner owns the schema the migrations create their tables in; nobody
-- else may create anything in it (PostgreSQL before 15 let PUBLIC create).
ALTER SCHEMA public OWNER TO :"owner_role";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE USAGE ON SCHEMA public FROM PUBLIC;

-- Routines the owner creates in later migrations are not executable by
-- PUBLIC (PostgreSQL's default would be EXECUTE for everyone).
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" REVOKE EXECUTE ON ROUTINES FROM PUBLIC;

\echo 'cardvault: roles and database ready; next: tokenizer migrate as the owner role, then -v phase=grants'

\elif :cardvault_phase_grants

-- ---------------------------------------------------------------------------
-- Phase grants: after `tokenizer migrate`, and again after every migration.
-- Run as a superuser or as the owner role.
-- ---------------------------------------------------------------------------

\if :cardvault_elsewhere
\connect :"db_name"
\endif

BEGIN;

-- Start from nothing, so the result is exactly the lists below.
REVOKE ALL ON DATABASE :"db_name" FROM PUBLIC, :"app_role", :"auditor_role";
REVOKE ALL ON SCHEMA public FROM PUBLIC, :"app_role", :"auditor_role";
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC, :"app_role", :"auditor_role";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM PUBLIC, :"app_role", :"auditor_role";
REVOKE ALL ON ALL ROUTINES IN SCHEMA public FROM PUBLIC, :"app_role", :"auditor_role";

-- The runtime role.

GRANT CONNECT ON DATABASE :"db_name" TO :"app_role";
GRANT USAGE ON SCHEMA public TO :"app_role";

-- One line per table. A table missing here is unreachable for the service;
-- "relation ... does not exist" means `tokenizer migrate` has not run yet.
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE cards TO :"app_role";
-- Key lifecycle: state changes, erasing a destroyed key's material, the
-- end of a re-encryption pass, re-wrapping under a new KEK.
GRANT SELECT, INSERT, UPDATE (state, retired_at, destroyed_at, reencrypted_at, wrapped, kek_id)
    ON TABLE vault_keys TO :"app_role";
GRANT SELECT, INSERT, UPDATE (revoked_at) ON TABLE principals TO :"app_role";
GRANT SELECT, INSERT ON TABLE audit_events TO :"app_role";
-- The chain head: every audit append locks and advances it (UPDATE).
GRANT SELECT, UPDATE ON TABLE audit_head TO :"app_role";
GRANT SELECT, INSERT ON TABLE audit_checkpoints TO :"app_role";
-- KEK rotation re-wraps the signing keys; a signing key rotation retires
-- the old generation (retired_at), destroying one erases its secret
-- (wrapped, destroyed_at; migration 0012). key_id and public_key never
-- change.
GRANT SELECT, INSERT, UPDATE (wrapped, kek_id, retired_at, destroyed_at)
    ON TABLE audit_signing_keys TO :"app_role";
-- Backups read the archived segments; recording one (and deleting the
-- archived entries) is `tokenizer audit archive`, run as the owner.
GRANT SELECT ON TABLE audit_archives TO :"app_role";
-- Tenants: created on first use, policy set by `tokenizer tenant set`,
-- marked deleted (and their fingerprint salt erased) by `tenant delete`.
GRANT SELECT, INSERT, UPDATE ON TABLE tenants TO :"app_role";
-- Hosted collection sessions: opened, held by one submission at a time
-- (claimed_until), completed (completed_at, token) or refused (failures,
-- closed_at), purged after they expire; nothing else of a session changes.
GRANT SELECT, INSERT, DELETE ON TABLE collect_sessions TO :"app_role";
GRANT UPDATE (failures, closed_at, completed_at, token, claimed_until) ON TABLE collect_sessions TO :"app_role";
-- Idempotent forwarding: a key claimed (pending) before the acquirer is
-- called, completed once with the sealed answer (the completion columns
-- only: who, where, which key and which request never change), released
-- when the call never left, purged 24 hours after the claim.
GRANT SELECT, INSERT, DELETE ON TABLE forward_idempotency TO :"app_role";
GRANT UPDATE (state, completed_at, tenant, status, content_type, location, key_version, nonce, ciphertext)
    ON TABLE forward_idempotency TO :"app_role";

-- Readiness (migration 0011): `/readyz` commits one row to prove the
-- database takes writes.
GRANT SELECT, UPDATE (probed_at) ON TABLE storage_probe TO :"app_role";
-- Cluster-wide detokenization monitoring (migration 0013): one rate-limit
-- bucket per principal and per tenant, the anomaly rule's windows and the
-- tokens of each principal's current window (older ones deleted).
GRANT SELECT, INSERT, UPDATE ON TABLE rate_buckets TO :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE anomaly_windows TO :"app_role";
GRANT SELECT, INSERT, DELETE ON TABLE anomaly_tokens TO :"app_role";
-- The fleet's blocks of source addresses (migration 0014).
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE source_blocks TO :"app_role";

-- The auditor role (`vault-audit verify`): reads the audit trail, nothing
-- else.
GRANT CONNECT ON DATABASE :"db_name" TO :"auditor_role";
GRANT USAGE ON SCHEMA public TO :"auditor_role";
GRANT SELECT ON TABLE audit_events TO :"auditor_role";
GRANT SELECT ON TABLE audit_checkpoints TO :"auditor_role";
GRANT SELECT ON TABLE audit_archives TO :"auditor_role";

COMMIT;

\echo 'cardvault: privileges of the runtime and auditor roles applied'

\else

DO $$
BEGIN
    RAISE EXCEPTION 'cardvault roles: run with -v phase=setup (before tokenizer migrate) or -v phase=grants (after it)';
END
$$;

\endif
