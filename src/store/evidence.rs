//! Evidence before Phase 3, "does anything still use the legacy column?": the reads in phase
//! dual that found a key only in the column (counted here by keyrack, in the transaction that
//! moves the key), and the writes of `users.openai_api_key` in phase dual by anything other than
//! keyrack (counted by triggers, which see every writer of the file).
//!
//! keyrack's own writes of the column — requests, commands, fixture loads — bump
//! `users.keyrack_key_writes` in the same statement
//! (`keyrack_key_writes = keyrack_key_writes + 1`); the triggers count a
//! change of the column that leaves that marker as it was, or an inserted row carrying a key
//! with the marker at 0. Counts start again each time the phase becomes dual.

use rusqlite::Connection;

use super::Result;

/// The assignment every keyrack write of the column carries (see the module comment), for the
/// tests that write the column as keyrack does.
#[cfg(test)]
const OWN_COLUMN_WRITE: &str = "keyrack_key_writes = keyrack_key_writes + 1";

/// How far back a foreign write of the column blocks `remove-legacy-column`.
pub(crate) const RECENT_FOREIGN_WRITE_SECS: i64 = 24 * 3600;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Evidence {
    pub(crate) legacy_reads: u64,
    pub(crate) last_legacy_read_at: Option<i64>,
    pub(crate) foreign_column_writes: u64,
    pub(crate) last_foreign_column_write_at: Option<i64>,
}

impl Evidence {
    /// The time of a foreign write within `RECENT_FOREIGN_WRITE_SECS` before `now`, if any.
    pub(crate) fn recent_foreign_write(&self, now: i64) -> Option<i64> {
        self.last_foreign_column_write_at
            .filter(|&t| now - t < RECENT_FOREIGN_WRITE_SECS)
    }
}

const TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS keyrack_foreign_column_update
AFTER UPDATE OF openai_api_key ON users
WHEN NEW.openai_api_key IS NOT OLD.openai_api_key
 AND NEW.keyrack_key_writes IS OLD.keyrack_key_writes
 AND (SELECT value FROM keyrack_meta WHERE name = 'phase') = 'dual'
BEGIN
  UPDATE legacy_use SET foreign_column_writes = foreign_column_writes + 1,
      last_foreign_column_write_at = CAST(strftime('%s', 'now') AS INTEGER)
  WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS keyrack_foreign_column_insert
AFTER INSERT ON users
WHEN NEW.openai_api_key IS NOT NULL
 AND NEW.keyrack_key_writes = 0
 AND (SELECT value FROM keyrack_meta WHERE name = 'phase') = 'dual'
BEGIN
  UPDATE legacy_use SET foreign_column_writes = foreign_column_writes + 1,
      last_foreign_column_write_at = CAST(strftime('%s', 'now') AS INTEGER)
  WHERE id = 1;
END;";

/// Creates the triggers while the legacy column exists (at start, and when `revert` adds the
/// column back). They go before the column is dropped (`drop_triggers`).
pub(crate) fn ensure_triggers(conn: &Connection) -> Result<()> {
    if super::meta::column_present(conn)? {
        conn.execute_batch(TRIGGERS)?;
    }
    Ok(())
}

/// Phase 3: SQLite refuses to drop a column a trigger names.
pub(crate) fn drop_triggers(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "DROP TRIGGER IF EXISTS keyrack_foreign_column_update;
         DROP TRIGGER IF EXISTS keyrack_foreign_column_insert;",
    )?;
    Ok(())
}

/// A read in phase dual found the user's key only in the column (and moved it).
pub(crate) fn record_legacy_read(conn: &Connection, at: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE legacy_use SET legacy_reads = legacy_reads + 1,
             last_legacy_read_at = MAX(COALESCE(last_legacy_read_at, 0), ?1)
         WHERE id = 1",
    )?
    .execute([at])?;
    Ok(())
}

/// The phase became dual: the counts start again.
pub(crate) fn reset(conn: &Connection) -> Result<()> {
    conn.execute(
        "UPDATE legacy_use SET legacy_reads = 0, last_legacy_read_at = NULL,
             foreign_column_writes = 0, last_foreign_column_write_at = NULL
         WHERE id = 1",
        [],
    )?;
    Ok(())
}

pub(crate) fn read(conn: &Connection) -> Result<Evidence> {
    Ok(conn.query_row(
        "SELECT legacy_reads, last_legacy_read_at, foreign_column_writes,
                last_foreign_column_write_at FROM legacy_use WHERE id = 1",
        [],
        |r| {
            Ok(Evidence {
                legacy_reads: r.get(0)?,
                last_legacy_read_at: r.get(1)?,
                foreign_column_writes: r.get(2)?,
                last_foreign_column_write_at: r.get(3)?,
            })
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DbLocation;
    use crate::db::{self, Database};

    fn fresh() -> (Database, Connection) {
        let db = Database::new(&DbLocation::Memory).unwrap();
        let mut conn = db.connect().unwrap();
        db::migrate_schema(&mut conn).unwrap();
        ensure_triggers(&conn).unwrap();
        (db, conn)
    }

    fn writes(conn: &Connection) -> u64 {
        read(conn).unwrap().foreign_column_writes
    }

    #[test]
    fn only_writes_without_the_marker_in_phase_dual_count() {
        let (_db, conn) = fresh();
        // keyrack's own insert and column writes carry the marker.
        conn.execute_batch(&format!(
            "INSERT INTO users(id, email, password_hash, created_at) VALUES (1, 'a@b.c', 'x', 0);
             UPDATE users SET openai_api_key = 'kr1:own', {OWN_COLUMN_WRITE} WHERE id = 1;"
        ))
        .unwrap();
        assert_eq!(writes(&conn), 0);
        // Another program's update and insert do not.
        conn.execute_batch(
            "UPDATE users SET openai_api_key = 'foreign' WHERE id = 1;
             UPDATE users SET openai_api_key = 'foreign' WHERE id = 1;
             INSERT INTO users(email, password_hash, openai_api_key, created_at)
                 VALUES ('d@b.c', 'x', 'foreign-2', 0);
             INSERT INTO users(email, password_hash, created_at) VALUES ('e@b.c', 'x', 0);",
        )
        .unwrap();
        // The second update changed nothing; the insert without a key is no write of the column.
        let e = read(&conn).unwrap();
        assert_eq!(e.foreign_column_writes, 2);
        assert!(e.recent_foreign_write(crate::clock::now()).is_some());
        // In phase legacy the column is the truth: nothing counts.
        conn.execute_batch(
            "UPDATE keyrack_meta SET value = 'legacy' WHERE name = 'phase';
             UPDATE users SET openai_api_key = 'legacy-write' WHERE id = 1;",
        )
        .unwrap();
        assert_eq!(writes(&conn), 2);
        reset(&conn).unwrap();
        assert_eq!(read(&conn).unwrap(), Evidence::default());
        // The triggers go before the column (SQLite refuses to drop a column a trigger names).
        drop_triggers(&conn).unwrap();
        conn.execute_batch("ALTER TABLE users DROP COLUMN openai_api_key")
            .unwrap();
    }

    #[test]
    fn legacy_reads_keep_the_latest_time() {
        let (_db, conn) = fresh();
        record_legacy_read(&conn, 200).unwrap();
        record_legacy_read(&conn, 100).unwrap();
        let e = read(&conn).unwrap();
        assert_eq!((e.legacy_reads, e.last_legacy_read_at), (2, Some(200)));
        assert_eq!(e.recent_foreign_write(1_000_000), None);
    }
}
