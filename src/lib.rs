//! keyrack as a library: everything but the command-line parsing, so that the binary, the
//! benchmarks and the tests build on the same code. See ARCHITECTURE.md for the map.

pub mod accounts;
pub mod app;
pub mod auth;
pub(crate) mod backup;
pub(crate) mod clock;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod db;
pub mod domain;
pub mod export;
pub mod fixtures;
pub mod healthcheck;
pub mod http;
pub mod import;
pub mod logging;
pub(crate) mod metrics;
pub mod open;
pub mod operator;
pub mod passwords;
pub mod people;
pub(crate) mod phase;
pub(crate) mod progress;
pub mod service_tokens;
pub(crate) mod status;
pub(crate) mod store;

/// How a command failed, and so its exit code (listed in `keyrack --help`).
#[derive(Debug)]
pub enum Failure {
    /// Exit 1: failure at run time.
    Runtime(String),
    /// Exit 1: the database failed; what was being done, and the store's error with its causes.
    Store {
        doing: String,
        source: Box<dyn std::error::Error + Send + Sync>,
        /// Busy: the same command may succeed when run again.
        retry: bool,
    },
    /// Exit 2: usage or configuration error.
    Config(String),
    /// Exit 3: refused by a safety check.
    Refused(String),
}

impl Failure {
    /// A store error met while `doing` something (empty: the error says enough).
    pub(crate) fn store(doing: impl Into<String>, source: store::StoreError) -> Failure {
        Failure::Store {
            doing: doing.into(),
            retry: matches!(source, store::StoreError::Busy),
            source: Box::new(source),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Runtime(_) | Failure::Store { .. } => 1,
            Failure::Config(_) => 2,
            Failure::Refused(_) => 3,
        }
    }

    /// The message for the operator: for a store error, every cause in the chain.
    pub fn message(&self) -> String {
        match self {
            Failure::Runtime(m) | Failure::Config(m) | Failure::Refused(m) => m.clone(),
            Failure::Store {
                doing,
                source,
                retry,
            } => {
                let chain = error_chain(source.as_ref());
                let hint = if *retry { "; try again" } else { "" };
                if doing.is_empty() {
                    format!("{chain}{hint}")
                } else {
                    format!("{doing}: {chain}{hint}")
                }
            }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failure::Store { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// Locks `m`, going on when a thread panicked while holding it: no value keyrack keeps behind a
/// mutex (counters, a queue, a map of failures, a unit) is left half-changed between two
/// statements, so the poison says nothing about it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error and its causes in one line: `database error: disk I/O error`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_keeps_the_cause_chain() {
        let sql = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            Some("disk I/O error".into()),
        );
        let f = Failure::store("migrate", store::StoreError::from(sql));
        assert_eq!(f.exit_code(), 1);
        assert_eq!(
            f.message(),
            "migrate: database error: disk I/O error: Error code 10: Some kind of disk I/O error occurred"
        );
        let source = std::error::Error::source(&f).expect("a source");
        assert!(source.source().is_some(), "the rusqlite error is kept");
    }
}
