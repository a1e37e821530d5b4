-- Applications and people. An application's own id for a user (`external_id`, unique when
-- present), the last successful login, service tokens (stored only as their SHA-256, like
-- sessions) and one-time invites to set a password. A user "has a password" when their hash is
-- not the marker of an account without one (`!no-password`), so no column says it twice.
ALTER TABLE users ADD COLUMN external_id TEXT;
ALTER TABLE users ADD COLUMN last_login_at INTEGER;
CREATE UNIQUE INDEX users_by_external_id ON users(external_id) WHERE external_id IS NOT NULL;

CREATE TABLE service_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL,
    scope        TEXT    NOT NULL CHECK (scope IN ('read', 'write')),
    token_hash   BLOB    NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    expires_at   INTEGER,
    revoked_at   INTEGER
);
-- A name is held by at most one token that is not revoked (an expired one still holds it).
CREATE UNIQUE INDEX service_tokens_live_name ON service_tokens(name) WHERE revoked_at IS NULL;

-- One-time links to set a password: the token's SHA-256 only.
CREATE TABLE invites (
    token_hash BLOB    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
) WITHOUT ROWID;
CREATE INDEX invites_by_user ON invites(user_id);

-- The service token an event was caused through (its id: a name may be used again later).
ALTER TABLE events ADD COLUMN service_token_id INTEGER;
