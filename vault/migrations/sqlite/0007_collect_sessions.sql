-- Hosted card collection (issue 17): a session the checkout server opens
-- for one buyer, completed once by the edge with the card the buyer typed.
--
-- secret_hash: SHA-256 of the client secret (128 random bits, shown once at
-- creation; a fast hash suffices for a secret that long). style: the
-- validated style settings as JSON (an allow-list, no CSS text). token:
-- the card's token once completed (the card itself is in `cards`).
-- failures: refused submissions; at `collect_max_failures` the session is
-- closed (closed_at). Rows are purged a while after they expire.
-- code_required: the form asks for the card's security code (the code
-- itself is never stored; no column is named after it). claimed_until: a
-- submission is being tokenized until then (one at a time per session, so
-- that a losing concurrent submission never stores its card).
CREATE TABLE collect_sessions (
    id              TEXT    NOT NULL PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    allowed_origin  TEXT    NOT NULL,
    secret_hash     BLOB    NOT NULL,
    code_required   INTEGER NOT NULL CHECK (code_required IN (0, 1)),
    token_format    TEXT    NOT NULL,
    reference       TEXT,
    style           TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    failures        INTEGER NOT NULL DEFAULT 0,
    closed_at       INTEGER,
    completed_at    INTEGER,
    token           TEXT,
    claimed_until   INTEGER
) STRICT;
CREATE INDEX collect_sessions_expires_at ON collect_sessions (expires_at);
