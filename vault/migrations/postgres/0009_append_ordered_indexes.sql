-- Fewer index entries at random places per new card (issue 19). Every new
-- card used to add an entry at a random place in six indexes (token,
-- (tenant, fingerprint), (bin, last4), the two key-version indexes ending
-- in the token, and the audit trail's token index).
--
-- seq: insertion order (an identity, never written by the vault). The
-- key-version indexes serve the re-encryption pass, which now pages by it:
-- a new card's entry lands at the right edge of its version's range.
ALTER TABLE cards ADD COLUMN seq BIGINT GENERATED ALWAYS AS IDENTITY;
DROP INDEX cards_key_version;
DROP INDEX cards_fingerprint_version;
CREATE INDEX cards_key_version ON cards (key_version, seq);
CREATE INDEX cards_fingerprint_version ON cards (fingerprint_version, key_version, seq);

-- (bin, last4, pan_len) only counts the pan-shaped tokens of one BIN and
-- last four (when their small space runs out): random tokens (`tok_...`)
-- no longer get an entry.
DROP INDEX cards_bin_last4;
CREATE INDEX cards_bin_last4 ON cards (bin, last4, pan_len) WHERE substr(token, 1, 4) <> 'tok_';
