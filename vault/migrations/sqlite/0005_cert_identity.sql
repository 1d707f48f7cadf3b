-- Client-certificate identities (mutual TLS): a principal may be bound to
-- the identity of a client certificate (a URI or DNS subject alternative
-- name, verified against the configured client CA at the handshake). At most
-- one active principal per identity; a revoked principal frees it.
ALTER TABLE principals ADD COLUMN cert_identity TEXT;
CREATE UNIQUE INDEX principals_active_cert_identity ON principals (cert_identity)
    WHERE revoked_at IS NULL AND cert_identity IS NOT NULL;
