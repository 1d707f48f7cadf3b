-- The fleet's blocks of source addresses (issue 20): failed
-- authentications per source are counted in `rate_buckets` (scope
-- `source`, key the address or IPv6 /64); the instance whose failure
-- empties a source's bucket records the block here, and every instance
-- reads the blocks in force every second, so a source blocked by one is
-- refused by all, and a restart keeps the blocks. `until_ms`: the
-- database's clock, unix ms. Rows past their end are deleted by the
-- readers. PostgreSQL only (SQLite: one process, blocks in memory).
CREATE TABLE source_blocks (
    source TEXT PRIMARY KEY,
    until_ms BIGINT NOT NULL
);
