//! The only place with SQL. A `Store` is one connection (one per worker thread) plus the key
//! ring; every operation is one transaction — IMMEDIATE for anything that may write, so that a
//! read-then-write never fails with a BUSY that no timeout cures — and every key operation
//! reads the phase inside its own transaction (`store::keys`), so a phase command run by another
//! process takes effect at the next request.

pub mod classify;
pub mod events;
pub mod evidence;
pub mod inspect;
pub mod keys;
pub mod meta;
pub mod phases;
pub mod repair;
pub mod users;

use rusqlite::{Connection, ErrorCode, Transaction, TransactionBehavior};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::crypto::{KeyRing, OpenError};
use crate::usage::UsageLog;

/// Which store a value was read from or written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `api_keys` table.
    Table,
    /// The legacy column `users.openai_api_key`.
    Column,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Table => "api_keys",
            Source::Column => "users_column",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database stayed locked past the time limit")]
    Busy,
    #[error("this email is already registered")]
    EmailTaken,
    #[error("not found")]
    NotFound,
    /// The current phase cannot do this; the message says why and what to do.
    #[error("{0}")]
    PhaseConflict(String),
    /// A stored value does not open. Carries where it is, never the value.
    #[error("the stored key of user {user_id} in {} does not decrypt: {reason}", place(*.source_store, *.key_id))]
    KeyUnreadable {
        user_id: i64,
        source_store: Source,
        key_id: Option<i64>,
        reason: OpenError,
    },
    /// The database's current key is one this process does not hold (a rotation recorded it
    /// while a server was serving): writes are refused until a restart with that key.
    #[error("the database's current key is key id {0}, which this server does not hold")]
    KeyChanged(String),
    /// The database's current key changed and the ring switched to it: seal again and retry.
    /// Never leaves the store.
    #[error("the database's current key changed; the value is sealed again")]
    Reseal,
    /// The user holds the most keys allowed (`KEYRACK_MAX_KEYS_PER_USER`).
    #[error("this account already holds {limit} keys, the most allowed; delete one first")]
    LimitReached { limit: i64 },
    #[error("database error: {0}")]
    Sql(rusqlite::Error),
}

/// Where a stored key is, in words: `api_keys (key 12)` or `users_column`. The one wording of
/// an unreadable key, in logs and command output alike.
pub fn place(store: Source, key_id: Option<i64>) -> String {
    match key_id {
        Some(id) => format!("{} (key {id})", store.as_str()),
        None => store.as_str().to_owned(),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy,
            _ => StoreError::Sql(e),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One connection and what the key operations need beside it.
pub struct Store {
    conn: Connection,
    ring: Arc<KeyRing>,
    usage: Arc<UsageLog>,
    /// Most `api_keys` rows a user may create through the API.
    key_limit: i64,
}

impl Store {
    pub fn new(conn: Connection, ring: Arc<KeyRing>, usage: Arc<UsageLog>) -> Store {
        Store {
            conn,
            ring,
            usage,
            key_limit: crate::config::DEFAULT_MAX_KEYS_PER_USER,
        }
    }

    /// Sets the per-user key limit (`KEYRACK_MAX_KEYS_PER_USER`).
    pub fn with_key_limit(mut self, limit: i64) -> Store {
        self.key_limit = limit;
        self
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Runs `f` in an IMMEDIATE transaction of its own and commits when it returns `Ok`. For
    /// large one-off work (fixtures); requests use `write`, which shares commits.
    pub fn write_alone<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        let _serial = write_lock();
        self.in_transaction(TransactionBehavior::Immediate, f)
    }

    /// Runs `f` as one write and returns once it is committed and synced (group commit).
    ///
    /// Writers of this process queue `f` and then take `WRITE_LOCK`. Whoever holds the lock
    /// runs every queued write in one IMMEDIATE transaction, each inside a savepoint (a write
    /// that fails is undone alone and gets its own error), commits once — one sync for the
    /// whole group — and hands each writer its result. A writer that finds its result already
    /// there when it gets the lock just returns it. Queuing on a mutex also replaces SQLite's
    /// busy handler, which sleeps in steps of up to 100 ms, for writers of this process; other
    /// processes (the phase commands) still meet the busy timeout.
    pub fn write<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let slot: Arc<Mutex<Option<Result<T>>>> = Arc::new(Mutex::new(None));
        let mine = slot.clone();
        let job: Job = Box::new(move |tx| {
            let result = match tx {
                Some((tx, ctx)) => f(tx, ctx),
                None => Err(StoreError::Busy),
            };
            let ok = result.is_ok();
            let deliver: Deliver = Box::new(move |commit_error| {
                let out = match commit_error {
                    None => result,
                    Some(e) => Err(e),
                };
                *mine.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
            });
            (ok, deliver)
        });
        lock(&PENDING).push(job);
        let _serial = write_lock();
        loop {
            if let Some(out) = lock(&slot).take() {
                return out;
            }
            let batch: Vec<Job> = {
                let mut pending = lock(&PENDING);
                let n = pending.len().min(MAX_GROUP);
                pending.drain(..n).collect()
            };
            if batch.is_empty() {
                // Only if a leader panicked with our write in its group.
                return Err(StoreError::Sql(rusqlite::Error::ExecuteReturnedResults));
            }
            self.run_group(batch);
        }
    }

    /// Runs one group of queued writes in one transaction and delivers every result.
    fn run_group(&mut self, batch: Vec<Job>) {
        let ctx = Ctx {
            ring: &self.ring,
            usage: &self.usage,
            actor: None,
        };
        let tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(_) => {
                // The lock stayed taken by another process: every write answers busy.
                for job in batch {
                    job(None).1(None);
                }
                return;
            }
        };
        let mut delivers = Vec::with_capacity(batch.len());
        if batch.len() == 1 {
            // Alone in its group: no savepoint needed; a failure rolls the transaction back.
            for job in batch {
                let (ok, deliver) = job(Some((&tx, &ctx)));
                if !ok {
                    drop(tx);
                    deliver(None);
                    return;
                }
                delivers.push(deliver);
            }
        } else {
            for job in batch {
                if savepoint(&tx, "SAVEPOINT w").is_err() {
                    delivers.push(job(None).1);
                    continue;
                }
                let (ok, deliver) = job(Some((&tx, &ctx)));
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
                crate::metrics::group_commit(delivers.len());
                delivers.into_iter().for_each(|d| d(None))
            }
            Err(e) => {
                log::warn!("a group commit failed: {e}");
                let busy = matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                );
                for d in delivers {
                    d(Some(if busy {
                        StoreError::Busy
                    } else {
                        StoreError::Sql(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                            Some("commit failed".into()),
                        ))
                    }));
                }
            }
        }
    }

    /// Runs `f` in a read transaction: one consistent snapshot, no lock taken for writing.
    pub fn read<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.in_transaction(TransactionBehavior::Deferred, f)
    }

    fn in_transaction<T>(
        &mut self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        let tx = self.conn.transaction_with_behavior(behavior)?;
        let ctx = Ctx {
            ring: &self.ring,
            usage: &self.usage,
            actor: None,
        };
        let out = f(&tx, &ctx)?;
        tx.commit()?;
        Ok(out)
    }
}

static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// Most writes committed together.
const MAX_GROUP: usize = 128;

/// A queued write: run with the group's transaction (`None`: no transaction could be had), it
/// says whether it succeeded and returns how to hand over its result once the commit is known.
type Job = Box<dyn FnOnce(Option<(&Transaction<'_>, &Ctx<'_>)>) -> (bool, Deliver) + Send>;
/// Hands a result over; given the commit's error when the commit failed.
type Deliver = Box<dyn FnOnce(Option<StoreError>) + Send>;

static PENDING: Mutex<Vec<Job>> = Mutex::new(Vec::new());

fn savepoint(tx: &Transaction<'_>, sql: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The in-process writer lock (see `Store::write`).
pub fn write_lock() -> MutexGuard<'static, ()> {
    WRITE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a transaction body may use beside the transaction itself.
pub struct Ctx<'a> {
    pub ring: &'a KeyRing,
    pub usage: &'a UsageLog,
    /// Who acts, for the events: a command's name (`command:<name>`), or `None` for the user
    /// whose keys a request touches (`user:<id>`).
    pub actor: Option<&'a str>,
}

impl Ctx<'_> {
    /// The actor of an event about `user_id`'s keys.
    pub fn actor_for(&self, user_id: i64) -> String {
        match self.actor {
            Some(a) => a.to_owned(),
            None => events::user_actor(user_id),
        }
    }
}

pub use crate::clock::{now, rfc3339};

/// True when the error is a UNIQUE constraint violation.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}
