-- Accounts and sessions. `openai_api_key` is the legacy column: a sealed OpenAI key per user,
-- the source of truth in phase legacy, a mirror in phase dual, dropped in phase new_only.
CREATE TABLE users (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    email          TEXT    NOT NULL UNIQUE,
    password_hash  TEXT    NOT NULL,
    openai_api_key TEXT,
    created_at     INTEGER NOT NULL
);

-- Session tokens are stored only as their SHA-256 hash.
CREATE TABLE sessions (
    token_hash BLOB    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX sessions_by_user ON sessions(user_id);
