-- Cluster-wide detokenization monitoring (issue 20): the state of the rate
-- limits and of the anomaly rule, shared by every instance on this
-- database, so that N instances enforce the configured limits, not N times
-- them, and a restart forgets nothing. Counters, not records: written with
-- synchronous_commit off (a database crash forgets at most the last
-- fraction of a second), not in backups. PostgreSQL only: SQLite is one
-- process and keeps this state in memory (vault/src/monitor.rs). Configure
-- every instance alike: each applies the rates and the rule it is
-- configured with to the shared state.

-- One token bucket per (scope, key): scope `principal` (key: the principal
-- id) or `tenant` (key: the tenant name). `tokens` is what the bucket held
-- at `at_ms` (the database's clock, unix ms).
CREATE TABLE rate_buckets (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);

-- The anomaly rule: per principal and window (windows aligned to the
-- database's clock, `window_start` unix ms), the distinct tokens it
-- revealed and whether the rule fired (once per window, whichever instance
-- claims it first).
CREATE TABLE anomaly_windows (
    principal TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    distinct_tokens BIGINT NOT NULL,
    fired BOOLEAN NOT NULL,
    PRIMARY KEY (principal, window_start)
);

-- The tokens seen in a principal's current window, as the first 8 bytes of
-- their SHA-256 (tokens are random, not card data), until the rule fires
-- for that window (then nothing more is recorded: at most threshold + 1 rows
-- per principal). Windows before the current one are deleted when an
-- instance starts a principal's new window.
CREATE TABLE anomaly_tokens (
    principal TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    token_hash BIGINT NOT NULL,
    PRIMARY KEY (principal, window_start, token_hash)
);
