//! Usage counters (`usage_count`, `last_used_at`), batched in memory and flushed to the
//! database about once a second and at a clean shutdown (the README's "Choices" explain the
//! batching: a reveal then costs no disk sync). The listing adds what is still pending, so a
//! client always sees its own uses.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::events::{self, Event};
use super::{GroupCommit, Result};
use crate::lock;

/// Uses counted but not yet written, per `api_keys` row: (count, last time).
#[derive(Debug, Default)]
pub(crate) struct UsageLog {
    pending: Mutex<HashMap<i64, (i64, i64)>>,
    /// Events of reads (`key.revealed`, `key.expired`), written with the counters.
    events: Mutex<Vec<Event>>,
}

impl UsageLog {
    /// Counts one use of the table key `id` at time `at`.
    pub(crate) fn record(&self, id: i64, at: i64) {
        let mut p = lock(&self.pending);
        let e = p.entry(id).or_insert((0, at));
        e.0 += 1;
        e.1 = e.1.max(at);
    }

    /// Queues the event of a read; written at the next flush.
    pub(crate) fn record_event(&self, e: Event) {
        lock(&self.events).push(e);
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
        let queued: Vec<Event> = std::mem::take(&mut *lock(&self.events));
        if batch.is_empty() && queued.is_empty() {
            return Ok(0);
        }
        let written = (|| {
            let _serial = writes.serial();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (id, (n, at)) in &batch {
                add_usage(&tx, *id, *n, *at)?;
            }
            for e in &queued {
                events::record(&tx, e)?;
            }
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

    #[test]
    fn records_and_reports_pending() {
        let u = UsageLog::default();
        u.record(7, 100);
        u.record(7, 90);
        assert_eq!(u.pending(7), (2, Some(100)));
        assert_eq!(u.pending(8), (0, None));
    }
}
