//! The only place with SQL. A `Store` is one connection (one per worker thread) plus the key
//! ring; every operation is one transaction — IMMEDIATE for anything that may write, so that a
//! read-then-write never fails with a BUSY that no timeout cures — and every key operation
//! reads the phase inside its own transaction (`store::keys`), so a phase command run by another
//! process takes effect at the next request.

pub(crate) mod classify;
pub(crate) mod counts;
mod error;
pub(crate) mod events;
pub(crate) mod evidence;
pub(crate) mod export;
mod fold;
mod group;
pub(crate) mod import;
pub(crate) mod inspect;
pub(crate) mod keys;
pub(crate) mod meta;
pub(crate) mod people;
pub(crate) mod phases;
mod reads;
pub(crate) mod repair;
pub(crate) mod rotation;
pub(crate) mod seed;
pub(crate) mod service_tokens;
mod usage;
pub(crate) mod users;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::sync::Arc;

use crate::crypto::KeyRing;
use crate::phase::Phase;
use group::GroupCommit;
pub(crate) use usage::UsageLog;

use error::is_unique_violation;
pub(crate) use error::{place, Result, Source, StoreError};

/// What the connections of this process to one database share: the group-commit queue and
/// writer lock, and the usage counts not yet written. One per database, never a process
/// global, so that two databases in one process never run each other's writes.
#[derive(Default)]
pub(crate) struct Shared {
    writes: GroupCommit,
    usage: UsageLog,
}

impl Shared {
    /// What a database's connections share, the events of reads folded over windows of
    /// `fold_window_secs` (`KEYRACK_AUDIT_FOLD_SECONDS`).
    pub(crate) fn new(fold_window_secs: i64) -> Shared {
        Shared {
            writes: GroupCommit::default(),
            usage: UsageLog::new(fold_window_secs),
        }
    }

    /// Tells the server's flusher to write what is pending once more and stop.
    pub(crate) fn stop_flusher(&self) {
        self.usage.stop();
    }

    /// The flusher's wait (`UsageLog::wait_for_flush`) while it has no connection yet: true
    /// when it is to stop.
    pub(crate) fn wait_for_flush(&self, timeout: std::time::Duration) -> bool {
        self.usage.wait_for_flush(timeout)
    }
}

/// One connection and what the key operations need beside it.
pub(crate) struct Store {
    conn: Connection,
    ring: Arc<KeyRing>,
    shared: Arc<Shared>,
    /// Most `api_keys` rows a user may create through the API.
    key_limit: i64,
    /// The phase and pending backfill as this connection's read snapshots last saw them.
    memo: meta::Memo,
    /// This connection's uses not yet written (`usage::UsageLog`).
    uses: Arc<usage::Queue>,
    /// This connection's last read of a session and its default key, kept while the database
    /// is unchanged (`keys::LastRead`).
    last_read: keys::LastRead,
    /// This connection's last check of a live service token (`service_tokens::TokenMemo`).
    token_memo: service_tokens::TokenMemo,
}

impl Store {
    pub(crate) fn new(conn: Connection, ring: Arc<KeyRing>, shared: Arc<Shared>) -> Store {
        Store {
            conn,
            ring,
            uses: shared.usage.queue(),
            shared,
            key_limit: crate::config::DEFAULT_MAX_KEYS_PER_USER,
            memo: meta::Memo::default(),
            last_read: keys::LastRead::default(),
            token_memo: service_tokens::TokenMemo::default(),
        }
    }

    /// Sets the per-user key limit (`KEYRACK_MAX_KEYS_PER_USER`).
    pub(crate) fn with_key_limit(mut self, limit: i64) -> Store {
        self.key_limit = limit;
        self
    }

    /// Writes the usage counts still pending (the server's flusher, once a second and at exit).
    pub(crate) fn flush_usage(&mut self) -> Result<usize> {
        self.shared.usage.flush(&mut self.conn, &self.shared.writes)
    }

    /// The flusher's wait between two flushes (`UsageLog::wait_for_flush`): true when it is to
    /// stop.
    pub(crate) fn wait_for_flush(&self, timeout: std::time::Duration) -> bool {
        self.shared.usage.wait_for_flush(timeout)
    }

    /// The phase, as the next request will see it (GET /healthz).
    pub(crate) fn phase(&self) -> Result<Phase> {
        meta::phase(&self.conn)
    }

    /// The phase, the schema version, the counts of every stored value and the evidence of
    /// legacy use, read in one transaction so that they agree (`keyrack status`,
    /// GET /admin/status).
    pub(crate) fn survey(
        &mut self,
    ) -> Result<(Phase, i64, phases::Survey, evidence::Evidence, events::Size)> {
        let tx = self.conn.transaction()?;
        let phase = meta::phase(&tx)?;
        let schema_version = crate::db::schema_version(&tx)?;
        let survey = phases::survey(&tx, &self.ring, phase)?;
        let evidence = evidence::read(&tx)?;
        let events = events::size(&tx)?;
        tx.commit()?;
        Ok((phase, schema_version, survey, evidence, events))
    }

    /// The counts `GET /metrics` reads at every scrape, in one read snapshot; nothing is
    /// decrypted (`store::counts`).
    pub(crate) fn counts(&mut self) -> Result<counts::Counts> {
        self.read(|conn, _| counts::counts(conn))
    }

    /// The number of stored values that do not open (every value decrypted, as `survey`
    /// counts them), with the database's data version read just before the survey's snapshot:
    /// while the version is unchanged, so is the count.
    pub(crate) fn undecryptable(&mut self) -> Result<(u64, Option<u32>)> {
        let version = meta::current_version(&self.conn)?;
        let (_, _, survey, _, _) = self.survey()?;
        Ok((survey.undecryptable.count, version))
    }

    /// The database's data version now (`meta::current_version`).
    pub(crate) fn data_version(&self) -> Result<Option<u32>> {
        meta::current_version(&self.conn)
    }

    /// Runs `f` in an IMMEDIATE transaction of its own and commits when it returns `Ok`. For
    /// large one-off work (fixtures); requests use `write`, which shares commits.
    pub(crate) fn write_alone<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        let shared = self.shared.clone();
        let _serial = shared.writes.serial();
        self.in_transaction(TransactionBehavior::Immediate, f)
    }

    /// Runs `f` as one write and returns once it is committed and synced, possibly in one
    /// transaction with other writers' writes (group commit, `store::group`).
    pub(crate) fn write<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ctx = Ctx {
            ring: &self.ring,
            usage: &self.shared.usage,
            actor: None,
            service: None,
            memo: None,
        };
        self.shared.writes.write(&mut self.conn, &ctx, f)
    }

    /// Runs `f` in a read transaction: one consistent snapshot, no lock taken for writing.
    /// `BEGIN` and `COMMIT` are prepared once per connection (rusqlite's `Transaction` prepares
    /// them again on every use, and reads run on every request).
    pub(crate) fn read<T>(
        &mut self,
        f: impl FnOnce(&Connection, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        let ctx = self.read_ctx();
        let snapshot = ReadSnapshot::begin(&self.conn)?;
        let out = f(&self.conn, &ctx)?;
        snapshot.end()?;
        Ok(out)
    }

    /// What a read-only body may use: the memo of the phase included.
    fn read_ctx(&self) -> Ctx<'_> {
        Ctx {
            ring: &self.ring,
            usage: &self.shared.usage,
            actor: None,
            service: None,
            memo: Some(&self.memo),
        }
    }

    fn in_transaction<T>(
        &mut self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        let tx = self.conn.transaction_with_behavior(behavior)?;
        let ctx = Ctx {
            ring: &self.ring,
            usage: &self.shared.usage,
            actor: None,
            service: None,
            memo: None,
        };
        let out = f(&tx, &ctx)?;
        tx.commit()?;
        Ok(out)
    }
}

/// An open read transaction of `Store::read`: committed by `end`, rolled back when dropped
/// otherwise (an error or a panic in the body), so the connection never stays inside it.
struct ReadSnapshot<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> ReadSnapshot<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<ReadSnapshot<'c>> {
        conn.prepare_cached("BEGIN DEFERRED")?.execute([])?;
        Ok(ReadSnapshot { conn, open: true })
    }

    fn end(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl Drop for ReadSnapshot<'_> {
    fn drop(&mut self) {
        if self.open && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// What a transaction body may use beside the transaction itself.
pub(crate) struct Ctx<'a> {
    pub(crate) ring: &'a KeyRing,
    pub(crate) usage: &'a UsageLog,
    /// Who acts, for the events: a command's name (`command:<name>`), or `None` for the user
    /// whose keys a request touches (`user:<id>`).
    pub(crate) actor: Option<&'a str>,
    /// The service acting for the user, when one is (its events carry the token's id).
    pub(crate) service: Option<&'a events::ServiceActor>,
    /// The connection's memo of the phase (`meta::settled`), in read-only snapshots only.
    pub(crate) memo: Option<&'a meta::Memo>,
}

impl<'a> Ctx<'a> {
    /// The same context, with `service` (if any) as the actor of its events.
    pub(crate) fn acting<'b>(&'b self, service: Option<&'b events::ServiceActor>) -> Ctx<'b>
    where
        'a: 'b,
    {
        Ctx {
            ring: self.ring,
            usage: self.usage,
            actor: service.map(|s| s.actor.as_str()).or(self.actor),
            service: service.or(self.service),
            memo: self.memo,
        }
    }

    /// An event of `action` about `user_id`, by this context's actor.
    pub(crate) fn event(&self, action: &'static str, user_id: i64) -> events::Event {
        events::Event::new(action, self.actor_for(user_id))
            .user(user_id)
            .service_token(self.service.map(|s| s.token_id))
    }

    /// The actor of an event about `user_id`'s keys.
    pub(crate) fn actor_for(&self, user_id: i64) -> String {
        match self.actor {
            Some(a) => a.to_owned(),
            None => events::user_actor(user_id),
        }
    }
}

pub(crate) use crate::clock::{now, rfc3339};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DbLocation;
    use crate::crypto::EncryptionKey;
    use crate::db::{self, Database};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// `Store::read` opens its transaction with cached statements: a body that fails or panics
    /// must still leave the connection outside any transaction, or the worker's next request
    /// could not begin one.
    #[test]
    fn a_read_that_fails_or_panics_leaves_no_transaction_open() -> TestResult {
        let db = Database::new(&DbLocation::Memory)?;
        let mut conn = db.connect()?;
        db::migrate_schema(&mut conn)?;
        let ring = Arc::new(KeyRing::new(EncryptionKey::generate(), vec![]));
        let mut store = Store::new(conn, ring, Arc::new(Shared::default()));

        let failed: Result<()> = store.read(|_, _| Err(StoreError::NotFound));
        assert!(matches!(failed, Err(StoreError::NotFound)));
        assert!(store.conn.is_autocommit());

        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = store.read(|_, _| -> Result<()> { panic!("a read's body panics") });
        }));
        assert!(panicked.is_err());
        assert!(store.conn.is_autocommit());

        assert_eq!(store.read(|c, _| meta::phase(c))?, Phase::Dual);
        assert!(store.conn.is_autocommit());
        Ok(())
    }
}
