-- The audit trail. An event names ids, a provider, a store and phases: never a key, a masked
-- key, a password, a token or an email.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    action     TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    user_id    INTEGER,
    api_key_id INTEGER,
    provider   TEXT,
    source     TEXT,
    from_phase TEXT,
    to_phase   TEXT
);

CREATE INDEX events_by_user ON events(user_id, id);
CREATE INDEX events_by_time ON events(at);
