//! The database's figures that `GET /metrics` reads at every scrape: counts from indexes and
//! one-row tables, nothing decrypted, so that a scrape costs milliseconds whatever the number
//! of keys. The one figure that needs every value opened, the undecryptable count, is surveyed
//! in the background (`http::surveyor`) and read from there.

use rusqlite::Connection;

use super::{events, evidence, meta, Result};
use crate::phase::Phase;

/// What a scrape reads, in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) phase: Phase,
    pub(crate) users: u64,
    /// Rows of `api_keys`.
    pub(crate) table_keys: u64,
    /// Users whose legacy column holds a value (0 once the column is gone).
    pub(crate) column_keys: u64,
    pub(crate) evidence: evidence::Evidence,
    /// The audit trail's rows and bytes.
    pub(crate) events: events::Size,
}

/// Counts the rows as `keyrack status` does (`phases::survey`), from indexes only.
pub(crate) fn counts(conn: &Connection) -> Result<Counts> {
    let count = |sql: &str| {
        conn.prepare_cached(sql)?
            .query_row([], |r| r.get::<_, u64>(0))
    };
    let column_keys = if meta::column_present(conn)? {
        // From the index of the column's key ids: `substr` of a value is never NULL, of NULL
        // always, so the values are the users less the index's NULL entries. Both counts read
        // the index only (a plain COUNT(*) reads no entry at all), and the NULL entries, sorted
        // first, are a range: the cost follows the users without a column key, not the keys
        // (0.4 ms at 100,000 keys, where counting the non-NULL entries took 8 ms).
        count(
            "SELECT (SELECT COUNT(*) FROM users)
                  - (SELECT COUNT(*) FROM users INDEXED BY users_by_key_id
                     WHERE substr(openai_api_key, 5, 16) IS NULL)",
        )
        .or_else(|_| count("SELECT COUNT(*) FROM users WHERE openai_api_key IS NOT NULL"))?
    } else {
        0
    };
    Ok(Counts {
        phase: meta::phase(conn)?,
        users: count("SELECT COUNT(*) FROM users")?,
        table_keys: count("SELECT COUNT(*) FROM api_keys")?,
        column_keys,
        evidence: evidence::read(conn)?,
        events: events::size(conn)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DbLocation;
    use crate::db::{self, Database};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// The counts agree with a plain count of the rows, whether the column's index exists or
    /// not, and in every phase's shape of the schema.
    #[test]
    fn counts_agree_with_the_rows() -> TestResult {
        let db = Database::new(&DbLocation::Memory)?;
        let mut conn = db.connect()?;
        db::migrate_schema(&mut conn)?;
        conn.execute_batch(
            "INSERT INTO users(id, email, password_hash, created_at, openai_api_key)
               VALUES (1, 'a@x.org', 'h', 0, 'kr1:0123456789abcdef:AAAA'),
                      (2, 'b@x.org', 'h', 0, NULL),
                      (3, 'c@x.org', 'h', 0, 'no');
             INSERT INTO api_keys(user_id, provider, sealed_key, is_default, created_at, updated_at)
               VALUES (1, 'openai', 'kr1:0123456789abcdef:AAAA', 1, 0, 0),
                      (2, 'other', 'x', 1, 0, 0);",
        )?;
        let c = counts(&conn)?;
        assert_eq!((c.users, c.table_keys, c.column_keys), (3, 2, 2));
        super::super::phases::ensure_column_index(&conn)?;
        let c = counts(&conn)?;
        assert_eq!((c.users, c.table_keys, c.column_keys), (3, 2, 2));
        conn.execute_batch(
            "DROP INDEX IF EXISTS users_by_key_id; ALTER TABLE users DROP COLUMN openai_api_key",
        )?;
        let c = counts(&conn)?;
        assert_eq!((c.users, c.table_keys, c.column_keys), (3, 2, 0));
        Ok(())
    }
}
