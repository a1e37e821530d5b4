//! The only place with SQL. A `Store` is one connection (one per worker thread) plus the key
//! ring; every operation is one transaction — IMMEDIATE for anything that may write, so that a
//! read-then-write never fails with a BUSY that no timeout cures — and every key operation
//! reads the phase inside its own transaction (`store::keys`), so a phase command run by another
//! process takes effect at the next request.

pub mod keys;
pub mod meta;
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
    #[error("stored key of user {user_id} in {} (key id {key_id:?}) does not decrypt: {reason}", .source_store.as_str())]
    KeyUnreadable {
        user_id: i64,
        source_store: Source,
        key_id: Option<i64>,
        reason: OpenError,
    },
    #[error("database error: {0}")]
    Sql(rusqlite::Error),
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
}

impl Store {
    pub fn new(conn: Connection, ring: Arc<KeyRing>, usage: Arc<UsageLog>) -> Store {
        Store { conn, ring, usage }
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Runs `f` in an IMMEDIATE transaction and commits when it returns `Ok`.
    ///
    /// Writers of this process take `WRITE_LOCK` first: they then queue on a mutex instead of
    /// in SQLite's busy handler, which sleeps in steps of up to 100 ms and made p99 latency
    /// under concurrent writes hundreds of milliseconds. Other processes (the phase commands)
    /// still meet the busy timeout.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        let _serial = write_lock();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ctx = Ctx {
            ring: &self.ring,
            usage: &self.usage,
        };
        let out = f(&tx, &ctx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` in a read transaction: one consistent snapshot, no lock taken for writing.
    pub fn read<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Ctx<'_>) -> Result<T>,
    ) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let ctx = Ctx {
            ring: &self.ring,
            usage: &self.usage,
        };
        let out = f(&tx, &ctx)?;
        tx.commit()?;
        Ok(out)
    }
}

static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// The in-process writer lock (see `Store::write`).
pub fn write_lock() -> MutexGuard<'static, ()> {
    WRITE_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a transaction body may use beside the transaction itself.
pub struct Ctx<'a> {
    pub ring: &'a KeyRing,
    pub usage: &'a UsageLog,
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
