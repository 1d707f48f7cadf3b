-- Readiness tells the truth (issue 20): `/readyz` is 503 `storage_read_only`
-- when the store cannot commit (a full disk, a read-only database, a
-- standby). Answering a query proves the connection, not a commit, so the
-- readiness probe writes this one row and commits (`Store::probe_write`).
-- Operational only: not in backups, never read by the service.
CREATE TABLE storage_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at BIGINT NOT NULL
);
INSERT INTO storage_probe (id, probed_at) VALUES (1, 0);
