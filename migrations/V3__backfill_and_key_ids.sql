-- Users whose legacy column value is still the source of truth in phase dual: `migrate` run
-- from phase legacy lists every user holding a column key here, and a user leaves the list once
-- the backfill (or a read, or a write of keyrack) has settled their OpenAI key. Until then "the
-- column wins" for that user; afterwards a differing column value is a conflict.
CREATE TABLE legacy_backfill (
    user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE
) WITHOUT ROWID;

-- The id of the key that sealed each value (`kr1:<16 hex>:…`), indexed so that the key ids in
-- use can be listed by a few index seeks, without reading or decrypting every value. The same
-- index on the legacy column is kept by keyrack itself, since the column comes and goes with
-- the phase commands.
CREATE INDEX api_keys_by_key_id ON api_keys(substr(sealed_key, 5, 16));
