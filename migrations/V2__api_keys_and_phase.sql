-- The dedicated key table and the place where the migration phase is kept.
CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    provider     TEXT    NOT NULL,
    name         TEXT,
    sealed_key   TEXT    NOT NULL,
    is_default   INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    usage_count  INTEGER NOT NULL DEFAULT 0
);

-- At most one default key per user and provider.
CREATE UNIQUE INDEX api_keys_one_default ON api_keys(user_id, provider) WHERE is_default = 1;
CREATE INDEX api_keys_by_user ON api_keys(user_id, provider);

CREATE TABLE keyrack_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- A fresh database starts in phase dual. A database that already holds users when this
-- migration runs was written by the legacy system: it stays in phase legacy until the
-- operator runs `keyrack migrate`.
INSERT INTO keyrack_meta(name, value)
    SELECT 'phase', CASE WHEN EXISTS (SELECT 1 FROM users) THEN 'legacy' ELSE 'dual' END;
