//! Usage counters (`usage_count`, `last_used_at`), batched in memory and flushed to the
//! database about once a second (sooner when `FLUSH_AT` events of reads are queued) and at a
//! clean shutdown (the README's "Choices" explain the batching: a reveal then costs no disk
//! sync). The listing adds what is still pending, so a
//! client always sees its own uses.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::events::{self, ReadEvent};
use super::{GroupCommit, Result};
use crate::lock;

/// Queued events of reads past which the flusher is woken before its second is up, so that the
/// queue (memory, and what a crash would lose) stays small under a stream of reveals.
pub(crate) const FLUSH_AT: usize = 4096;

/// Uses counted but not yet written, per `api_keys` row: (count, last time).
#[derive(Debug, Default)]
pub(crate) struct UsageLog {
    pending: Mutex<HashMap<i64, (i64, i64)>>,
    /// Events of reads (`key.revealed`, `key.expired`), written with the counters.
    events: Mutex<Vec<ReadEvent>>,
    /// What the flusher waits for: (a flush is wanted now, the flusher is to stop).
    wake: Mutex<(bool, bool)>,
    woken: Condvar,
}

impl UsageLog {
    /// Counts one use of the table key `id` at time `at`.
    pub(crate) fn record(&self, id: i64, at: i64) {
        let mut p = lock(&self.pending);
        let e = p.entry(id).or_insert((0, at));
        e.0 += 1;
        e.1 = e.1.max(at);
    }

    /// Queues the event of a read; written at the next flush, which the `FLUSH_AT`th queued
    /// event brings forward.
    pub(crate) fn record_event(&self, e: ReadEvent) {
        let queued = {
            let mut q = lock(&self.events);
            q.push(e);
            q.len()
        };
        if queued == FLUSH_AT {
            lock(&self.wake).0 = true;
            self.woken.notify_one();
        }
    }

    /// The flusher's wait: until `timeout` has passed, `FLUSH_AT` events are queued, or `stop`
    /// was called. True when the flusher is to stop (after one last flush).
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

    /// Uses of key `id` not yet written: (count, last time).
    pub(crate) fn pending(&self, id: i64) -> (i64, Option<i64>) {
        lock(&self.pending)
            .get(&id)
            .map_or((0, None), |&(n, t)| (n, Some(t)))
    }

    /// Writes the pending counts and the queued events of reads in one transaction, in turn
    /// with the database's other writers of this process. On failure they are kept for the
    /// next try.
    pub(crate) fn flush(&self, conn: &mut Connection, writes: &GroupCommit) -> Result<usize> {
        let batch: Vec<(i64, (i64, i64))> =
            lock(&self.pending).iter().map(|(k, v)| (*k, *v)).collect();
        let queued: Vec<ReadEvent> = std::mem::take(&mut *lock(&self.events));
        if batch.is_empty() && queued.is_empty() {
            return Ok(0);
        }
        let written = (|| {
            let _serial = writes.serial();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (id, (n, at)) in &batch {
                add_usage(&tx, *id, *n, *at)?;
            }
            events::record_reads(&tx, &queued)?;
            tx.commit()?;
            Ok::<(), super::StoreError>(())
        })();
        if let Err(e) = written {
            // Kept for the next try, before the events queued meanwhile.
            let mut q = lock(&self.events);
            let newer = std::mem::replace(&mut *q, queued);
            q.extend(newer);
            return Err(e);
        }
        // Subtract what was written; uses recorded meanwhile stay pending.
        let mut p = lock(&self.pending);
        for (id, (n, _)) in &batch {
            if let Some(e) = p.get_mut(id) {
                e.0 -= n;
                if e.0 <= 0 {
                    p.remove(id);
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
    use super::*;

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
        for i in 0..FLUSH_AT as i64 {
            u.record_event(reveal(i));
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
    fn records_and_reports_pending() {
        let u = UsageLog::default();
        u.record(7, 100);
        u.record(7, 90);
        assert_eq!(u.pending(7), (2, Some(100)));
        assert_eq!(u.pending(8), (0, None));
    }
}
