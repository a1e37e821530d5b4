//! Usage counters (`usage_count`, `last_used_at`), batched in memory and flushed to the
//! database about once a second and at a clean shutdown (the README's "Choices" explain the
//! batching: a reveal then costs no disk sync). The listing adds what is still pending, so a
//! client always sees its own uses.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::{GroupCommit, Result};
use crate::lock;

/// Uses counted but not yet written, per `api_keys` row: (count, last time).
#[derive(Debug, Default)]
pub(crate) struct UsageLog {
    pending: Mutex<HashMap<i64, (i64, i64)>>,
}

impl UsageLog {
    /// Counts one use of the table key `id` at time `at`.
    pub(crate) fn record(&self, id: i64, at: i64) {
        let mut p = lock(&self.pending);
        let e = p.entry(id).or_insert((0, at));
        e.0 += 1;
        e.1 = e.1.max(at);
    }

    /// Uses of key `id` not yet written: (count, last time).
    pub(crate) fn pending(&self, id: i64) -> (i64, Option<i64>) {
        lock(&self.pending)
            .get(&id)
            .map_or((0, None), |&(n, t)| (n, Some(t)))
    }

    /// Writes the pending counts in one transaction, in turn with the database's other writers
    /// of this process. On failure they are kept for the next try.
    pub(crate) fn flush(&self, conn: &mut Connection, writes: &GroupCommit) -> Result<usize> {
        let batch: Vec<(i64, (i64, i64))> = {
            let p = lock(&self.pending);
            if p.is_empty() {
                return Ok(0);
            }
            p.iter().map(|(k, v)| (*k, *v)).collect()
        };
        {
            let _serial = writes.serial();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (id, (n, at)) in &batch {
                add_usage(&tx, *id, *n, *at)?;
            }
            tx.commit()?;
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
        Ok(batch.len())
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
