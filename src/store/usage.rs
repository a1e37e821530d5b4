//! Usage counters (`usage_count`, `last_used_at`), batched in memory and flushed to the
//! database about once a second (sooner when `FLUSH_AT` events of reads are queued on one
//! connection) and at a clean shutdown (docs/choices.md explains the batching: a reveal
//! then costs no disk sync). The listing adds what is still pending, so a client always sees its
//! own uses.
//!
//! Each connection that records uses queues them in a `Queue` of its own (a worker's `Store`
//! holds it), so that the workers never wait for one another's lock on every reveal; the
//! flusher takes every queue's contents in turn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::events::ReadEvent;
use super::fold::Folds;
use super::{GroupCommit, Result};
use crate::lock;

/// Events of reads queued on one connection past which the flusher is woken before its second
/// is up, so that the queues (memory, and what a crash would lose) stay small under a stream of
/// reveals: with the server's four readers, about 4,096 in all.
pub(crate) const FLUSH_AT: usize = 1024;

/// Every queue of one database's connections, and the flusher's wake-up.
#[derive(Debug, Default)]
pub(crate) struct UsageLog {
    /// One per connection that recorded a use; kept for the life of the process (a dropped
    /// connection's uses are still written), so at most one per worker.
    queues: Mutex<Vec<Arc<Queue>>>,
    /// The number of the next event of a read, over every connection: the flush writes the
    /// events in this order, the order in which they were recorded.
    next_event: AtomicU64,
    /// What the flusher waits for: (a flush is wanted now, the flusher is to stop).
    wake: Mutex<(bool, bool)>,
    woken: Condvar,
    /// The open folded rows of the events of reads.
    folds: Folds,
}

/// One connection's uses not yet written.
#[derive(Debug, Default)]
pub(crate) struct Queue(Mutex<Queued>);

#[derive(Debug, Default)]
struct Queued {
    /// Per `api_keys` row: (count, last time).
    pending: HashMap<i64, (i64, i64)>,
    /// Events of reads (`key.revealed`, `key.expired`), written with the counters, each with
    /// its number in the order of recording (`UsageLog::next_event`).
    events: Vec<(u64, ReadEvent)>,
}

impl UsageLog {
    /// A log whose events of reads fold over windows of `fold_window_secs`.
    pub(crate) fn new(fold_window_secs: i64) -> UsageLog {
        UsageLog {
            folds: Folds::new(fold_window_secs),
            ..UsageLog::default()
        }
    }

    /// A new queue for one connection's uses, taken by the flusher from now on.
    pub(crate) fn queue(&self) -> Arc<Queue> {
        let q = Arc::new(Queue::default());
        lock(&self.queues).push(q.clone());
        q
    }

    /// Counts one use of the table key `id` at time `at`.
    pub(crate) fn record(&self, queue: &Queue, id: i64, at: i64) {
        let mut q = lock(&queue.0);
        let e = q.pending.entry(id).or_insert((0, at));
        e.0 += 1;
        e.1 = e.1.max(at);
    }

    /// Queues the event of a read; written at the next flush, which the `FLUSH_AT`th event
    /// queued on the connection brings forward.
    pub(crate) fn record_event(&self, queue: &Queue, e: ReadEvent) {
        let queued = {
            let mut q = lock(&queue.0);
            let n = self.next_event.fetch_add(1, Ordering::SeqCst);
            q.events.push((n, e));
            q.events.len()
        };
        if queued == FLUSH_AT {
            lock(&self.wake).0 = true;
            self.woken.notify_one();
        }
    }

    /// The flusher's wait: until `timeout` has passed, `FLUSH_AT` events are queued on one
    /// connection, or `stop` was called. True when the flusher is to stop (after one last
    /// flush).
    pub(crate) fn wait_for_flush(&self, timeout: Duration) -> bool {
        let mut wake = lock(&self.wake);
        if !wake.0 && !wake.1 {
            wake = self
                .woken
                .wait_timeout(wake, timeout)
                .map_or_else(|e| e.into_inner().0, |(w, _)| w);
        }
        wake.0 = false;
        wake.1
    }

    /// Tells the flusher to flush once more and stop.
    pub(crate) fn stop(&self) {
        lock(&self.wake).1 = true;
        self.woken.notify_one();
    }

    fn queues(&self) -> Vec<Arc<Queue>> {
        lock(&self.queues).clone()
    }

    /// Uses of key `id` not yet written, on every connection: (count, last time).
    pub(crate) fn pending(&self, id: i64) -> (i64, Option<i64>) {
        let mut total = (0, None::<i64>);
        for q in lock(&self.queues).iter() {
            if let Some(&(n, t)) = lock(&q.0).pending.get(&id) {
                total = (total.0 + n, Some(total.1.map_or(t, |u| u.max(t))));
            }
        }
        total
    }

    /// Writes the pending counts and the queued events of reads of every connection in one
    /// transaction, in turn with the database's other writers of this process; the events in
    /// the order they were recorded over every connection (as one queue for all would have
    /// them). On failure they are kept for the next try.
    pub(crate) fn flush(&self, conn: &mut Connection, writes: &GroupCommit) -> Result<usize> {
        let queues = self.queues();
        // Each queue's counts as taken (subtracted from that queue once written), and every
        // queue's events.
        let mut taken: Vec<Vec<(i64, (i64, i64))>> = Vec::with_capacity(queues.len());
        let mut queued: Vec<(u64, ReadEvent)> = Vec::new();
        for q in &queues {
            let mut q = lock(&q.0);
            taken.push(q.pending.iter().map(|(k, v)| (*k, *v)).collect());
            queued.append(&mut q.events);
        }
        if taken.iter().all(Vec::is_empty) && queued.is_empty() {
            return Ok(0);
        }
        queued.sort_unstable_by_key(|&(n, _)| n);
        let events: Vec<ReadEvent> = queued.iter().map(|&(_, e)| e).collect();
        let mut batch: HashMap<i64, (i64, i64)> = HashMap::new();
        for (id, (n, at)) in taken.iter().flatten() {
            let e = batch.entry(*id).or_insert((0, *at));
            e.0 += n;
            e.1 = e.1.max(*at);
        }
        let written = (|| {
            let _serial = writes.serial();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (id, (n, at)) in &batch {
                add_usage(&tx, *id, *n, *at)?;
            }
            let opened = self.folds.write(&tx, &events)?;
            tx.commit()?;
            Ok::<_, super::StoreError>(opened)
        })();
        let opened = match written {
            Ok(opened) => opened,
            Err(e) => {
                // Kept for the next try, before the events queued meanwhile (the next flush puts
                // them in the order they were recorded again).
                if let Some(first) = queues.first() {
                    let mut q = lock(&first.0);
                    queued.append(&mut q.events);
                    q.events = queued;
                }
                return Err(e);
            }
        };
        self.folds.remember(opened);
        // Subtract what was written; uses recorded meanwhile stay pending.
        for (q, taken) in queues.iter().zip(&taken) {
            let mut q = lock(&q.0);
            for (id, (n, _)) in taken {
                if let Some(e) = q.pending.get_mut(id) {
                    e.0 -= n;
                    if e.0 <= 0 {
                        q.pending.remove(id);
                    }
                }
            }
        }
        Ok(batch.len() + queued.len())
    }
}

/// Adds batched uses to a key's counters.
fn add_usage(tx: &Transaction<'_>, id: i64, uses: i64, last_used_at: i64) -> Result<()> {
    tx.prepare_cached(
        "UPDATE api_keys SET usage_count = usage_count + ?2,
                last_used_at = MAX(COALESCE(last_used_at, 0), ?3)
         WHERE id = ?1",
    )?
    .execute(rusqlite::params![id, uses, last_used_at])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::events;
    use super::*;

    /// A fresh database with one user and one key (its id), for the flush's writes.
    fn database_with_a_key(
    ) -> std::result::Result<(crate::db::Database, Connection, i64), Box<dyn std::error::Error>>
    {
        use crate::config::DbLocation;
        use crate::db::{self, Database};
        let db = Database::new(&DbLocation::Memory)?;
        let mut conn = db.connect()?;
        db::migrate_schema(&mut conn)?;
        conn.execute(
            "INSERT INTO users(email, password_hash, created_at) VALUES ('a@x.org', 'h', 0)",
            [],
        )?;
        conn.execute(
            "INSERT INTO api_keys(user_id, provider, sealed_key, is_default, created_at, updated_at)
             VALUES (1, 'openai', 'x', 1, 0, 0)",
            [],
        )?;
        let key = conn.last_insert_rowid();
        Ok((db, conn, key))
    }

    /// The first ten events written, oldest first.
    fn oldest_first(conn: &Connection) -> Result<Vec<events::Recorded>> {
        let mut written = events::newest_first(
            conn,
            &events::Query {
                limit: 10,
                ..events::Query::default()
            },
        )?;
        written.reverse();
        Ok(written)
    }

    fn reveal(user_id: i64) -> ReadEvent {
        ReadEvent::new(
            events::KEY_REVEALED,
            user_id,
            Some(7),
            "openai",
            super::super::Source::Table,
        )
    }

    #[test]
    fn a_full_queue_wakes_the_flusher_and_stop_ends_it() {
        use std::sync::Arc;
        use std::time::Instant;
        let u = Arc::new(UsageLog::default());
        let waiter = {
            let u = u.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                (u.wait_for_flush(Duration::from_secs(30)), t.elapsed())
            })
        };
        let q = u.queue();
        for i in 0..FLUSH_AT as i64 {
            u.record_event(&q, reveal(i));
        }
        let (stop, waited) = waiter.join().unwrap();
        assert!(!stop);
        assert!(waited < Duration::from_secs(20), "woken after {waited:?}");
        u.stop();
        assert!(u.wait_for_flush(Duration::from_secs(30)));
    }

    #[test]
    fn a_queued_read_is_written_as_the_event_it_records() {
        let e = reveal(3);
        let mut expected = events::Event::by_user(events::KEY_REVEALED, 3).key(
            Some(7),
            "openai",
            super::super::Source::Table,
        );
        expected.at = e.at;
        assert_eq!(e.to_event(), expected);
        let long = "p".repeat(32);
        let e = ReadEvent::new(
            events::KEY_EXPIRED,
            3,
            None,
            &long,
            super::super::Source::Table,
        );
        assert_eq!(e.to_event().provider.as_deref(), Some(long.as_str()));
    }

    #[test]
    fn records_and_reports_pending_over_every_connection() {
        let u = UsageLog::default();
        let (a, b) = (u.queue(), u.queue());
        u.record(&a, 7, 100);
        u.record(&a, 7, 90);
        assert_eq!(u.pending(7), (2, Some(100)));
        u.record(&b, 7, 120);
        u.record(&b, 9, 80);
        assert_eq!(u.pending(7), (3, Some(120)));
        assert_eq!(u.pending(9), (1, Some(80)));
        assert_eq!(u.pending(8), (0, None));
    }

    /// A flush writes every connection's counts and events: the events in the order they were
    /// recorded (not sorted by their times: a clock set back does not reorder them), the counts
    /// summed. A failed flush keeps them all for the next one, and uses
    /// recorded after a flush took its counts stay pending.
    #[test]
    fn a_flush_takes_every_connection_s_queue_and_a_failed_one_keeps_it(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (_db, mut conn, key) = database_with_a_key()?;
        let u = UsageLog::default();
        let (a, b) = (u.queue(), u.queue());
        let at = |user_id: i64, at: i64| {
            let mut e = reveal(user_id);
            e.at = at;
            e
        };
        u.record(&a, key, 50);
        u.record_event(&a, at(1, 50));
        u.record_event(&a, at(2, 70));
        u.record(&b, key, 60);
        u.record_event(&b, at(3, 60));

        // The table the events go to is gone: the flush fails and keeps everything.
        conn.execute_batch("ALTER TABLE events RENAME TO events_away")?;
        let writes = GroupCommit::default();
        assert!(u.flush(&mut conn, &writes).is_err());
        assert_eq!(u.pending(key), (2, Some(60)));
        conn.execute_batch("ALTER TABLE events_away RENAME TO events")?;

        assert_eq!(u.flush(&mut conn, &writes)?, 1 + 3);
        assert_eq!(u.pending(key), (0, None));
        let written: Vec<(i64, i64)> = oldest_first(&conn)?
            .iter()
            .map(|e| (e.at, e.user_id.unwrap_or_default()))
            .collect();
        assert_eq!(written, [(50, 1), (70, 2), (60, 3)]);
        let (count, last): (i64, Option<i64>) = conn.query_row(
            "SELECT usage_count, last_used_at FROM api_keys WHERE id = ?1",
            [key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        assert_eq!((count, last), (2, Some(60)));
        assert_eq!(u.flush(&mut conn, &writes)?, 0);
        Ok(())
    }

    /// Events recorded in one second on two connections are written in the order they were
    /// recorded, whatever the order in which the connections' queues were made: a client's
    /// reveal answered by one worker, then its next by another, are listed in that order.
    #[test]
    fn events_of_one_second_on_two_connections_are_written_in_the_order_recorded(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (_db, mut conn, _) = database_with_a_key()?;
        let u = UsageLog::default();
        // The second worker's queue was made first.
        let (second, first) = (u.queue(), u.queue());
        let at = |user_id: i64| {
            let mut e = reveal(user_id);
            e.at = 100;
            e
        };
        u.record_event(&first, at(1));
        u.record_event(&second, at(2));
        u.record_event(&first, at(3));
        assert_eq!(u.flush(&mut conn, &GroupCommit::default())?, 3);
        let written: Vec<i64> = oldest_first(&conn)?
            .iter()
            .map(|e| e.user_id.unwrap_or_default())
            .collect();
        assert_eq!(written, [1, 2, 3]);
        Ok(())
    }

    /// A connection dropped before the flush (a worker's `Store` gone) leaves its uses to be
    /// written: neither lost nor written twice, and a use recorded after a flush took the counts
    /// stays pending for the next one.
    #[test]
    fn a_dropped_connection_s_uses_are_written_once(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (_db, mut conn, key) = database_with_a_key()?;
        let u = UsageLog::default();
        let gone = u.queue();
        u.record(&gone, key, 10);
        u.record_event(&gone, reveal(1));
        drop(gone);
        let writes = GroupCommit::default();
        assert_eq!(u.flush(&mut conn, &writes)?, 2);
        assert_eq!(u.flush(&mut conn, &writes)?, 0);
        let live = u.queue();
        u.record(&live, key, 20);
        assert_eq!(u.flush(&mut conn, &writes)?, 1);
        u.record(&live, key, 30);
        assert_eq!(u.pending(key), (1, Some(30)));
        let (count, last, events): (i64, Option<i64>, i64) = conn.query_row(
            "SELECT usage_count, last_used_at, (SELECT count(*) FROM events WHERE action = ?2)
             FROM api_keys WHERE id = ?1",
            rusqlite::params![key, events::KEY_REVEALED],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        assert_eq!((count, last, events), (2, Some(20), 1));
        Ok(())
    }

    /// Four connections recording while flushes run over and over: every use and every event is
    /// written exactly once, whatever falls between a flush taking the counts and subtracting
    /// them.
    #[test]
    fn uses_recorded_during_flushes_are_written_exactly_once(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        const EACH: i64 = 3000;
        let (_db, mut conn, key) = database_with_a_key()?;
        let u = std::sync::Arc::new(UsageLog::default());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let (u, done) = (u.clone(), done.clone());
                std::thread::spawn(move || {
                    let q = u.queue();
                    for i in 0..EACH {
                        u.record(&q, key, i);
                        u.record_event(&q, reveal(1));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        let writes = GroupCommit::default();
        while done.load(Ordering::SeqCst) < 4 {
            u.flush(&mut conn, &writes)?;
        }
        for w in writers {
            w.join().map_err(|_| "a writer panicked")?;
        }
        u.flush(&mut conn, &writes)?;
        assert_eq!(u.pending(key), (0, None));
        // Folded: one row of the user's reads of the key, counting them all.
        let (count, events): (i64, i64) = conn.query_row(
            "SELECT usage_count, (SELECT SUM(count) FROM events WHERE action = ?2)
             FROM api_keys WHERE id = ?1",
            rusqlite::params![key, events::KEY_REVEALED],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        assert_eq!((count, events), (4 * EACH, 4 * EACH));
        Ok(())
    }
}
