//! Folding the events of reads: repeated reads of one key by one actor (`key.revealed`,
//! `key.expired`) within a window (`KEYRACK_AUDIT_FOLD_SECONDS`, an hour by default) are one row
//! of the audit trail, updated in place at each flush: `count`, `at` (the first read), `last_at`
//! (the last one). The next read after the window has ended opens a new row. So the trail still
//! answers who read which key, when and how often, while a client revealing flat out adds one
//! row per key per window instead of one per reveal (the trail's growth is bounded by the
//! accounts and keys, not by the request rate).
//!
//! The open rows are remembered in memory (one entry per key read in the current window,
//! dropped when its window ends): a restarted server opens new rows for the keys read next.
//! A row found missing (deleted meanwhile) is opened again.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::{params, Connection};

use super::events::ReadEvent;
use super::{now, Result};
use crate::lock;

/// The open folded rows of one database.
#[derive(Debug)]
pub(crate) struct Folds {
    /// Seconds from a row's first read after which a read opens a new row.
    window: i64,
    /// Per key (a `ReadEvent` with `at` 0): the open row.
    open: Mutex<HashMap<ReadEvent, Open>>,
}

/// An open folded row: its id and the time of its first read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Open {
    id: i64,
    first_at: i64,
}

/// Rows opened by a flush, remembered once its transaction has committed (`Folds::remember`).
pub(crate) type Opened = Vec<(ReadEvent, Open)>;

impl Default for Folds {
    fn default() -> Folds {
        Folds::new(crate::config::DEFAULT_AUDIT_FOLD_SECONDS)
    }
}

/// The reads of one key in one flush: (the key, count, first time, last time).
type Group = (ReadEvent, i64, i64, i64);

impl Folds {
    pub(crate) fn new(window_secs: i64) -> Folds {
        Folds {
            window: window_secs.max(1),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Writes `queued` (in the order recorded) into `tx`: each key's reads added to its open row
    /// while that row's window lasts, otherwise into a new row. Returns the rows opened, for
    /// `remember` once the transaction has committed (a failed flush opens nothing).
    pub(crate) fn write(&self, tx: &Connection, queued: &[ReadEvent]) -> Result<Opened> {
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<ReadEvent, usize> = HashMap::new();
        for e in queued {
            let key = e.fold_key();
            match index.get(&key) {
                Some(&i) => {
                    let g = &mut groups[i];
                    g.1 += 1;
                    g.2 = g.2.min(e.at);
                    g.3 = g.3.max(e.at);
                }
                None => {
                    index.insert(key, groups.len());
                    groups.push((key, 1, e.at, e.at));
                }
            }
        }
        let open = lock(&self.open);
        let mut opened = Opened::new();
        for (key, count, first, last) in groups {
            if let Some(o) = open.get(&key).filter(|o| first < o.first_at + self.window) {
                let updated = tx
                    .prepare_cached(
                        "UPDATE events SET count = count + ?2,
                                last_at = MAX(COALESCE(last_at, at), ?3)
                         WHERE id = ?1",
                    )?
                    .execute(params![o.id, count, last])?;
                if updated == 1 {
                    continue;
                }
            }
            let id = insert(tx, &key, count, first, last)?;
            opened.push((
                key,
                Open {
                    id,
                    first_at: first,
                },
            ));
        }
        Ok(opened)
    }

    /// Remembers the rows a committed flush opened, and forgets those whose window has ended.
    pub(crate) fn remember(&self, opened: Opened) {
        let mut open = lock(&self.open);
        open.extend(opened);
        let ended = now() - self.window;
        open.retain(|_, o| o.first_at > ended);
    }
}

/// A new folded row; returns its id.
fn insert(tx: &Connection, e: &ReadEvent, count: i64, first: i64, last: i64) -> Result<i64> {
    tx.prepare_cached(
        "INSERT INTO events(at, action, actor, user_id, api_key_id, provider, source, count, last_at,
                            service_token_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        first,
        e.action,
        e.actor(),
        e.user_id,
        e.api_key_id,
        e.provider(),
        e.source.as_str(),
        count,
        last,
        e.service_token_id()
    ])?;
    Ok(tx.last_insert_rowid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DbLocation;
    use crate::db::{self, Database};
    use crate::store::events::{self, KEY_EXPIRED, KEY_REVEALED};
    use crate::store::Source;

    fn fresh() -> std::result::Result<(Database, Connection), Box<dyn std::error::Error>> {
        let db = Database::new(&DbLocation::Memory)?;
        let mut conn = db.connect()?;
        db::migrate_schema(&mut conn)?;
        Ok((db, conn))
    }

    fn read(action: &'static str, user: i64, key: i64, at: i64) -> ReadEvent {
        let mut e = ReadEvent::new(action, user, Some(key), "openai", Source::Table);
        e.at = at;
        e
    }

    fn flush(folds: &Folds, conn: &mut Connection, queued: &[ReadEvent]) -> Result<()> {
        let tx = conn.transaction()?;
        let opened = folds.write(&tx, queued)?;
        tx.commit()?;
        folds.remember(opened);
        Ok(())
    }

    /// (action, user, key, count, at, last_at) of a row.
    type Row = (String, i64, i64, i64, i64, i64);

    /// Every row, oldest first.
    fn rows(conn: &Connection) -> Result<Vec<Row>> {
        let mut listed = events::newest_first(
            conn,
            &events::Query {
                limit: events::MAX_LIMIT,
                ..events::Query::default()
            },
        )?;
        listed.reverse();
        Ok(listed
            .into_iter()
            .map(|e| {
                (
                    e.action,
                    e.user_id.unwrap_or_default(),
                    e.api_key_id.unwrap_or_default(),
                    e.count,
                    e.at,
                    e.last_at,
                )
            })
            .collect())
    }

    /// Many reads of one key by one user, over several flushes, are one row with their count
    /// and first and last times; another key, another user or another action is another row.
    #[test]
    fn reads_of_one_key_by_one_actor_fold_into_one_row(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (_db, mut conn) = fresh()?;
        let t = now();
        let folds = Folds::new(3600);
        let first: Vec<ReadEvent> = (0..1000)
            .map(|i| read(KEY_REVEALED, 1, 7, t + i % 3))
            .collect();
        flush(&folds, &mut conn, &first)?;
        flush(
            &folds,
            &mut conn,
            &[
                read(KEY_REVEALED, 1, 7, t + 10),
                read(KEY_REVEALED, 1, 8, t + 10),
                read(KEY_REVEALED, 2, 7, t + 11),
                read(KEY_EXPIRED, 1, 7, t + 12),
                read(KEY_REVEALED, 1, 7, t + 12),
            ],
        )?;
        assert_eq!(
            rows(&conn)?,
            [
                (KEY_REVEALED.into(), 1, 7, 1002, t, t + 12),
                (KEY_REVEALED.into(), 1, 8, 1, t + 10, t + 10),
                (KEY_REVEALED.into(), 2, 7, 1, t + 11, t + 11),
                (KEY_EXPIRED.into(), 1, 7, 1, t + 12, t + 12),
            ]
        );
        Ok(())
    }

    /// A read after the window of its key's row has ended opens a new row; a row deleted
    /// meanwhile is opened again; a failed flush remembers nothing.
    #[test]
    fn the_window_s_end_or_a_missing_row_opens_a_new_one(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (_db, mut conn) = fresh()?;
        let t = now();
        let folds = Folds::new(60);
        flush(&folds, &mut conn, &[read(KEY_REVEALED, 1, 7, t)])?;
        flush(&folds, &mut conn, &[read(KEY_REVEALED, 1, 7, t + 59)])?;
        flush(&folds, &mut conn, &[read(KEY_REVEALED, 1, 7, t + 60)])?;
        assert_eq!(
            rows(&conn)?,
            [
                (KEY_REVEALED.into(), 1, 7, 2, t, t + 59),
                (KEY_REVEALED.into(), 1, 7, 1, t + 60, t + 60),
            ]
        );
        conn.execute_batch("DELETE FROM events")?;
        flush(&folds, &mut conn, &[read(KEY_REVEALED, 1, 7, t + 61)])?;
        assert_eq!(
            rows(&conn)?,
            [(KEY_REVEALED.into(), 1, 7, 1, t + 61, t + 61)]
        );

        // Written, then rolled back: the row it opened is not remembered.
        let tx = conn.transaction()?;
        let opened = folds.write(&tx, &[read(KEY_REVEALED, 3, 9, t)])?;
        assert_eq!(opened.len(), 1);
        drop(tx);
        flush(&folds, &mut conn, &[read(KEY_REVEALED, 3, 9, t + 1)])?;
        assert_eq!(rows(&conn)?.len(), 2);
        Ok(())
    }
}
