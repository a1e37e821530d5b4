//! Group commit: the writes of one database's connections in this process are queued, and a
//! writer that finds no group running leads one: it takes the writer lock, runs every queued
//! write in one IMMEDIATE transaction, each inside a savepoint (a write that fails is undone
//! alone and gets its own error), commits once — one sync for the whole group — hands each
//! writer its result and wakes them all at once (waking them one by one through the lock cost
//! more than the sync: the POST under 64 connections went 60–75% faster with this).
//!
//! The queue and the lock belong to one database (`store::Shared`): connections to another
//! database in the same process never run these writes. Queuing on a mutex also replaces
//! SQLite's busy handler, which sleeps in steps of up to 100 ms, for writers of this process;
//! other processes (the phase commands) still meet the busy timeout.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::{Connection, ErrorCode, Transaction, TransactionBehavior};

use super::{Ctx, Result, StoreError};
use crate::lock;

/// Most writes committed together.
const MAX_GROUP: usize = 128;

/// A queued write: run with the group's transaction (`None`: no transaction could be had, the
/// error says why), it says whether it succeeded and returns how to hand over its result once
/// the commit is known.
type Job = Box<
    dyn FnOnce(std::result::Result<(&Transaction<'_>, &Ctx<'_>), StoreError>) -> (bool, Deliver)
        + Send,
>;
/// Hands a result over; given the commit's error when the commit failed.
type Deliver = Box<dyn FnOnce(Option<StoreError>) + Send>;

/// The writer lock and the queue of writes waiting for it, of one database.
#[derive(Default)]
pub(crate) struct GroupCommit {
    serial: Mutex<()>,
    pending: Mutex<Queue>,
    /// Notified when a leader has run its group (results delivered, or lost to a panic).
    led: Condvar,
}

/// The writes waiting for a leader, and whether one is leading a group now.
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    leading: bool,
}

impl Queue {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }
}

/// A leader's term: however it ends (a panic included), the next writer may lead and every
/// waiting writer looks at its result.
struct Leading<'a>(&'a GroupCommit);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        lock(&self.0.pending).leading = false;
        self.0.led.notify_all();
    }
}

impl GroupCommit {
    /// The writer lock: held while a transaction that writes is open on this database.
    pub(crate) fn serial(&self) -> MutexGuard<'_, ()> {
        lock(&self.serial)
    }

    /// Runs `f` on `conn` as one write and returns once it is committed and synced, possibly
    /// in the same transaction as other writers' writes.
    ///
    /// A writer queues its write, then either leads (no group is running: it takes the writer
    /// lock, then every write queued by then, and runs them as one group) or waits for the
    /// running group to end. Each group's writers are woken together when it ends, not one
    /// after another through the lock, so the next group starts at once.
    pub(crate) fn write<T: Send + 'static>(
        &self,
        conn: &mut Connection,
        ctx: &Ctx<'_>,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let slot: Arc<Mutex<Option<Result<T>>>> = Arc::new(Mutex::new(None));
        let mine = slot.clone();
        let job: Job = Box::new(move |tx| {
            let result = tx.and_then(|(tx, ctx)| f(tx, ctx));
            let ok = result.is_ok();
            let deliver: Deliver = Box::new(move |commit_error| {
                let out = match commit_error {
                    None => result,
                    Some(e) => Err(e),
                };
                *lock(&mine) = Some(out);
            });
            (ok, deliver)
        });
        let mut queue = lock(&self.pending);
        queue.jobs.push(job);
        loop {
            if let Some(out) = lock(&slot).take() {
                return out;
            }
            if queue.leading {
                queue = self.led.wait(queue).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            queue.leading = true;
            drop(queue);
            let leading = Leading(self);
            let serial = self.serial();
            // Everything queued while the lock was busy goes into this group.
            let batch: Vec<Job> = {
                let mut queue = lock(&self.pending);
                let n = queue.jobs.len().min(MAX_GROUP);
                queue.jobs.drain(..n).collect()
            };
            if batch.is_empty() {
                // Our write was in the group of a leader that panicked: its transaction was
                // rolled back as the leader's thread unwound.
                return Err(StoreError::GroupAborted);
            }
            run_group(conn, ctx, batch);
            drop(serial);
            drop(leading);
            queue = lock(&self.pending);
        }
    }
}

/// Runs one group of queued writes in one transaction and delivers every result.
fn run_group(conn: &mut Connection, ctx: &Ctx<'_>, batch: Vec<Job>) {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // Typically the lock stayed taken by another process: every write answers busy.
            log::warn!("a group of writes could not begin: {e}");
            let e = group_error(e, "begin");
            for job in batch {
                job(Err(e())).1(None);
            }
            return;
        }
    };
    let mut delivers = Vec::with_capacity(batch.len());
    if batch.len() == 1 {
        // Alone in its group: no savepoint needed; a failure rolls the transaction back.
        for job in batch {
            let (ok, deliver) = job(Ok((&tx, ctx)));
            if !ok {
                drop(tx);
                deliver(None);
                return;
            }
            delivers.push(deliver);
        }
    } else {
        for job in batch {
            if let Err(e) = savepoint(&tx, "SAVEPOINT w") {
                delivers.push(job(Err(StoreError::from(e))).1);
                continue;
            }
            let (ok, deliver) = job(Ok((&tx, ctx)));
            let ended = if ok {
                savepoint(&tx, "RELEASE w")
            } else {
                savepoint(&tx, "ROLLBACK TO w").and_then(|()| savepoint(&tx, "RELEASE w"))
            };
            if let Err(e) = ended {
                log::error!("ending a savepoint failed: {e}");
            }
            delivers.push(deliver);
        }
    }
    match tx.commit() {
        Ok(()) => {
            // At debug level only (`RUST_LOG=keyrack::store=debug`): how writes were grouped.
            log::debug!("committed {} writes in one transaction", delivers.len());
            crate::metrics::group_commit(delivers.len());
            delivers.into_iter().for_each(|d| d(None));
        }
        Err(e) => {
            log::warn!("a group commit failed: {e}");
            let e = group_error(e, "commit");
            for d in delivers {
                d(Some(e()));
            }
        }
    }
}

fn savepoint(tx: &Transaction<'_>, sql: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// The error of a group's `BEGIN` or `COMMIT`, for each writer of the group: busy when another
/// connection held the lock past the busy timeout, otherwise SQLite's own error.
fn group_error(e: rusqlite::Error, at: &'static str) -> impl Fn() -> StoreError {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    let source = Arc::new(e);
    move || {
        if busy {
            StoreError::Busy
        } else {
            StoreError::Transaction {
                at,
                source: source.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Group commit on a fresh database file, in rusqlite's style: each test returns `Result`.

    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use crate::config::DbLocation;
    use crate::crypto::{EncryptionKey, KeyRing};
    use crate::db::{self, Database};
    use crate::store::{Shared, Store, StoreError};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    struct Fresh {
        _dir: tempfile::TempDir,
        db: Database,
        ring: Arc<KeyRing>,
        shared: Arc<Shared>,
    }

    impl Fresh {
        fn new() -> std::result::Result<Fresh, Box<dyn std::error::Error>> {
            let dir = tempfile::tempdir()?;
            let db = Database::new(&DbLocation::File(dir.path().join("t.db")))?;
            db::migrate_schema(&mut db.connect()?)?;
            Ok(Fresh {
                _dir: dir,
                db,
                ring: Arc::new(KeyRing::new(EncryptionKey::generate(), vec![])),
                shared: Arc::new(Shared::default()),
            })
        }

        fn store(&self) -> rusqlite::Result<Store> {
            Ok(Store::new(
                self.db.connect()?,
                self.ring.clone(),
                self.shared.clone(),
            ))
        }

        fn emails(&self) -> rusqlite::Result<Vec<String>> {
            let conn = self.db.connect()?;
            let mut stmt = conn.prepare("SELECT email FROM users ORDER BY email")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        }
    }

    fn insert_user(tx: &rusqlite::Transaction<'_>, email: &str) -> crate::store::Result<()> {
        tx.execute(
            "INSERT INTO users(email, password_hash, created_at) VALUES (?1, 'x', 0)",
            [email],
        )?;
        Ok(())
    }

    /// Polls until `cond` holds, for at most 10 s.
    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// One writer's work, run on a thread of its own.
    type Writer<T> = Box<dyn FnOnce(&mut Store) -> T + Send>;

    /// Holds the writer lock while `n` writers queue, then lets them go: they run as one group.
    fn as_one_group<T: Send + 'static>(
        f: &Fresh,
        writes: Vec<Writer<T>>,
    ) -> Vec<thread::Result<T>> {
        let n = writes.len();
        let held = f.shared.writes.serial();
        let threads: Vec<_> = writes
            .into_iter()
            .map(|w| {
                let mut store = f.store().expect("a store");
                thread::spawn(move || w(&mut store))
            })
            .collect();
        wait_until("every write to queue", || {
            super::lock(&f.shared.writes.pending).len() == n
        });
        drop(held);
        threads.into_iter().map(|t| t.join()).collect()
    }

    /// A writer that adds one user, then fails with `then` (`None`: succeeds).
    fn adds(
        email: &'static str,
        then: Option<fn() -> StoreError>,
    ) -> Writer<crate::store::Result<()>> {
        Box::new(move |s: &mut Store| {
            s.write(move |tx, _| {
                insert_user(tx, email)?;
                then.map_or(Ok(()), |e| Err(e()))
            })
        })
    }

    #[test]
    fn a_failing_write_is_undone_alone_and_the_group_commits() -> TestResult {
        let f = Fresh::new()?;
        let results = as_one_group(
            &f,
            vec![
                adds("a@example.com", None),
                adds("b@example.com", Some(|| StoreError::NotFound)),
                adds("c@example.com", None),
            ],
        );
        let results: Vec<_> = results.into_iter().map(|r| r.expect("no panic")).collect();
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(matches!(results[1], Err(StoreError::NotFound)));
        assert!(results[2].is_ok(), "{:?}", results[2]);
        // The failing write's own insert is undone; the others' are committed.
        assert_eq!(f.emails()?, ["a@example.com", "c@example.com"]);
        Ok(())
    }

    #[test]
    fn writes_queued_together_commit_in_one_transaction() -> TestResult {
        let f = Fresh::new()?;
        // Each write reads SQLite's count of changes made by its connection: in one group the
        // leader's connection runs them all, so the counts follow each other.
        let results = as_one_group(
            &f,
            (0..4)
                .map(|i| {
                    Box::new(move |s: &mut Store| {
                        s.write(move |tx, _| {
                            insert_user(tx, &format!("{i}@example.com"))?;
                            Ok(tx.query_row("SELECT total_changes()", [], |r| r.get::<_, i64>(0))?)
                        })
                    }) as Writer<crate::store::Result<i64>>
                })
                .collect(),
        );
        let mut changes: Vec<i64> = results
            .into_iter()
            .map(|r| r.expect("no panic").expect("written"))
            .collect();
        changes.sort_unstable();
        assert_eq!(changes, [1, 2, 3, 4], "one connection ran every write");
        assert_eq!(f.emails()?.len(), 4);
        Ok(())
    }

    #[test]
    fn a_busy_database_answers_busy_and_writes_nothing() -> TestResult {
        let f = Fresh::new()?;
        // Another process's writer, as a phase command would be.
        let other = f.db.connect()?;
        other.execute_batch("BEGIN IMMEDIATE")?;
        let conn = f.db.connect()?;
        conn.busy_timeout(Duration::from_millis(50))?;
        let mut store = Store::new(conn, f.ring.clone(), f.shared.clone());
        let out = store.write(|tx, _| insert_user(tx, "a@example.com"));
        assert!(matches!(out, Err(StoreError::Busy)), "{out:?}");
        other.execute_batch("ROLLBACK")?;
        assert!(f.emails()?.is_empty());
        // Once the other writer is gone, the same store writes.
        store.write(|tx, _| insert_user(tx, "a@example.com"))?;
        assert_eq!(f.emails()?, ["a@example.com"]);
        Ok(())
    }

    #[test]
    fn a_panicking_leader_rolls_back_its_group_and_no_writer_hangs() -> TestResult {
        let f = Fresh::new()?;
        let results = as_one_group(
            &f,
            vec![
                adds("a@example.com", None),
                adds("b@example.com", Some(|| panic!("a bug in a write"))),
            ],
        );
        // Whichever thread led the group panicked; the other was told its write was lost.
        let panicked = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(panicked, 1, "the leader panicked");
        for r in results.into_iter().flatten() {
            assert!(matches!(r, Err(StoreError::GroupAborted)), "{r:?}");
        }
        assert!(f.emails()?.is_empty(), "the group was rolled back");
        // The lock is usable again (its poison is ignored).
        f.store()?.write(|tx, _| insert_user(tx, "c@example.com"))?;
        assert_eq!(f.emails()?, ["c@example.com"]);
        Ok(())
    }

    #[test]
    fn two_databases_in_one_process_never_share_a_group() -> TestResult {
        let one = Fresh::new()?;
        let two = Fresh::new()?;
        // A write to database one waits in database one's queue...
        let held = one.shared.writes.serial();
        let mut store_one = one.store()?;
        let waiting =
            thread::spawn(move || store_one.write(|tx, _| insert_user(tx, "one@example.com")));
        wait_until("the write to database one to queue", || {
            super::lock(&one.shared.writes.pending).len() == 1
        });
        // ...while a writer of database two neither waits for it nor runs it.
        let mut store_two = two.store()?;
        let (done, finished) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = done.send(store_two.write(|tx, _| insert_user(tx, "two@example.com")));
        });
        finished.recv_timeout(Duration::from_secs(10))??;
        assert_eq!(two.emails()?, ["two@example.com"]);
        assert!(one.emails()?.is_empty());
        assert_eq!(super::lock(&one.shared.writes.pending).len(), 1);
        drop(held);
        waiting.join().expect("no panic")?;
        assert_eq!(one.emails()?, ["one@example.com"]);
        Ok(())
    }
}
