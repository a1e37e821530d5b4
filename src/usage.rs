//! Usage counters (`usage_count`, `last_used_at`), batched in memory and flushed to the
//! database about once a second and at a clean shutdown (SPEC section 5 allows the batching;
//! a reveal then costs no disk sync). The listing adds what is still pending, so a client
//! always sees its own uses.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::Connection;

use crate::store::events::{self, Event};

#[derive(Debug, Default)]
pub struct UsageLog {
    pending: Mutex<HashMap<i64, (i64, i64)>>,
    /// Events of reads (`key.revealed`, `key.expired`), written with the counters.
    events: Mutex<Vec<Event>>,
}

impl UsageLog {
    /// Counts one use of the table key `id` at time `at`.
    pub fn record(&self, id: i64, at: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(id).or_insert((0, at));
        e.0 += 1;
        e.1 = e.1.max(at);
    }

    /// Queues the event of a read; written at the next flush.
    pub fn record_event(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// Uses of key `id` not yet written: (count, last time).
    pub fn pending(&self, id: i64) -> (i64, Option<i64>) {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.get(&id).map_or((0, None), |&(n, t)| (n, Some(t)))
    }

    /// Writes the pending counts in one transaction. On failure they are kept for the next try.
    pub fn flush(&self, conn: &mut Connection) -> Result<usize, crate::store::StoreError> {
        let batch: Vec<(i64, (i64, i64))> = {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.iter().map(|(k, v)| (*k, *v)).collect()
        };
        let queued: Vec<Event> =
            std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() && queued.is_empty() {
            return Ok(0);
        }
        let written = (|| {
            let _serial = crate::store::write_lock();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for (id, (n, at)) in &batch {
                crate::store::keys::add_usage(&tx, *id, *n, *at)?;
            }
            for e in &queued {
                events::record(&tx, e)?;
            }
            tx.commit()?;
            Ok::<(), crate::store::StoreError>(())
        })();
        if let Err(e) = written {
            // Kept for the next try, before the events queued meanwhile.
            let mut q = self.events.lock().unwrap_or_else(|e| e.into_inner());
            let newer = std::mem::replace(&mut *q, queued);
            q.extend(newer);
            return Err(e);
        }
        // Subtract what was written; uses recorded meanwhile stay pending.
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
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
