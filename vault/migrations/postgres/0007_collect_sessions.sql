-- Hosted card collection (issue 17; PostgreSQL): the same table as
-- migrations/sqlite/0007_collect_sessions.sql, where each column is explained.
CREATE TABLE collect_sessions (
    id              TEXT    NOT NULL PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    allowed_origin  TEXT    NOT NULL,
    secret_hash     BYTEA   NOT NULL,
    code_required   BIGINT  NOT NULL CHECK (code_required IN (0, 1)),
    token_format    TEXT    NOT NULL,
    reference       TEXT,
    style           TEXT,
    created_at      BIGINT  NOT NULL,
    expires_at      BIGINT  NOT NULL,
    failures        BIGINT  NOT NULL DEFAULT 0,
    closed_at       BIGINT,
    completed_at    BIGINT,
    token           TEXT,
    claimed_until   BIGINT
);
CREATE INDEX collect_sessions_expires_at ON collect_sessions (expires_at);
