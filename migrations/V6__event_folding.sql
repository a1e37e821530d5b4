-- Folded events: repeated reads of one key by one actor within a window (`KEYRACK_AUDIT_FOLD_SECONDS`)
-- are one row, updated in place: `at` is the first of them, `last_at` the last, `count` how many.
-- Rows written before this migration stand for one event each (`last_at` NULL reads as `at`).
ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
ALTER TABLE events ADD COLUMN last_at INTEGER;
