-- Evidence that something other than keyrack still uses the legacy column, counted since the
-- phase last became dual: reads that found a key only in the column (counted by keyrack), and
-- writes of the column by anything else (counted by triggers on `users`, which keyrack keeps
-- while the column exists). One row.
CREATE TABLE legacy_use (
    id                           INTEGER PRIMARY KEY CHECK (id = 1),
    legacy_reads                 INTEGER NOT NULL DEFAULT 0,
    last_legacy_read_at          INTEGER,
    foreign_column_writes        INTEGER NOT NULL DEFAULT 0,
    last_foreign_column_write_at INTEGER
);
INSERT INTO legacy_use(id) VALUES (1);

-- keyrack's own writes of `users.openai_api_key` change this counter in the same statement; a
-- write of the column that leaves it as it was (or an inserted row that leaves it 0) was made by
-- another program. A marker in the row itself works with every SQLite version another program
-- may use, where a per-connection marker would need a recent one.
ALTER TABLE users ADD COLUMN keyrack_key_writes INTEGER NOT NULL DEFAULT 0;

-- Key expiry: Unix seconds, NULL for never.
ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;
