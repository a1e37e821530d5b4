//! The store's errors and the two names of where a key is kept (`Source`): what every store
//! operation answers, and how a rusqlite error becomes one.

use rusqlite::ErrorCode;
use std::sync::Arc;

use crate::crypto::OpenError;

/// Which store a value was read from or written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// The `api_keys` table.
    Table,
    /// The legacy column `users.openai_api_key`.
    Column,
}

impl Source {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Table => "api_keys",
            Source::Column => "users_column",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("the database stayed locked past the time limit")]
    Busy,
    #[error("this email is already registered")]
    EmailTaken,
    /// The service token a read was answered for is no longer live in the read's snapshot.
    #[error("the service token is invalid, expired or revoked")]
    TokenNotLive,
    /// A service token that is not revoked holds this name.
    #[error("a service token that is not revoked already has this name")]
    NameTaken,
    #[error("not found")]
    NotFound,
    /// The current phase cannot do this; the message says why and what to do.
    #[error("{0}")]
    PhaseConflict(String),
    /// A read met a change made between its two transactions (a phase command moved keys
    /// meanwhile); the same request again sees the new state.
    #[error("the data changed while it was read; try again")]
    Changed,
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
    /// `keyrack_meta.phase` holds a value that is no phase.
    #[error("the database's phase is {stored:?}, which is no phase keyrack knows (legacy, dual, new_only)")]
    BadPhase { stored: String },
    /// The thread that ran this write's group panicked; the group was rolled back.
    #[error("the write was rolled back: the thread running its group commit panicked")]
    GroupAborted,
    /// The `BEGIN` or `COMMIT` of a group of writes failed (other than busy).
    #[error("the transaction of a group of writes failed to {at}")]
    Transaction {
        at: &'static str,
        #[source]
        source: Arc<rusqlite::Error>,
    },
    #[error("database error")]
    Sql(#[source] rusqlite::Error),
}

/// Where a stored key is, in words: `api_keys (key 12)` or `users_column`. The one wording of
/// an unreadable key, in logs and command output alike.
pub(crate) fn place(store: Source, key_id: Option<i64>) -> String {
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

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

/// True when the error is a UNIQUE constraint violation.
pub(super) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}
