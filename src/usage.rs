//! Usage counters (`usage_count`, `last_used_at`), batched in memory and flushed to the
//! database about once a second and at a clean shutdown (SPEC section 5 allows the batching;
//! a reveal then costs no disk sync). The listing adds what is still pending, so a client
//! always sees its own uses.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::Connection;

#[derive(Debug, Default)]
pub struct UsageLog {
    pending: Mutex<HashMap<i64, (i64, i64)>>,
}

impl UsageLog {
    /// Counts one use of the table key `id` at time `at`.
    pub fn record(&self, id: i64, at: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(id).or_insert((0, at));
        e.0 += 1;
        e.1 = e.1.max(at);
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
            if p.is_empty() {
                return Ok(0);
            }
            p.iter().map(|(k, v)| (*k, *v)).collect()
        };
        let _serial = crate::store::write_lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (id, (n, at)) in &batch {
            crate::store::keys::add_usage(&tx, *id, *n, *at)?;
        }
        tx.commit()?;
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
        Ok(batch.len())
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
