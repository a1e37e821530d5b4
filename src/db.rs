//! Opening the SQLite database: connection settings and the embedded refinery migrations.
//!
//! Every connection gets WAL (file databases), `synchronous=FULL` (a commit is on disk before it
//! returns, which the promise of a 2xx answer to a write rests on), foreign keys, and an explicit busy
//! timeout. `:memory:` is SQLite's `memdb` VFS under a name unique to the process, so that every
//! worker's connection sees the same throwaway database, with ordinary locking.

use rusqlite::{Connection, OpenFlags};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::DbLocation;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// How long a statement waits for a lock held by another connection before giving up
/// (the request then answers 503 `busy`), unless `KEYRACK_BUSY_TIMEOUT` says otherwise.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens connections to one database.
pub struct Database {
    target: Target,
    busy_timeout: Duration,
    /// A file this process found empty (it created it, or a start before it stopped before
    /// writing anything): it holds nothing a crash could lose, so its start-up runs without
    /// syncing and is made durable once at its end (`connect_for_start`, `finish_start`).
    fresh: bool,
    /// `finish_start` has made the fresh file's start-up durable.
    settled: AtomicBool,
    /// For `:memory:`: one connection held for the life of the process, since the memdb
    /// database is freed when its last connection closes.
    _keep_alive: Option<Mutex<Connection>>,
}

enum Target {
    File(PathBuf),
    Memory(String),
}

impl Database {
    pub fn new(location: &DbLocation) -> rusqlite::Result<Database> {
        match location {
            DbLocation::File(p) => {
                create_owner_only(p);
                let fresh = std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == 0);
                Ok(Database {
                    target: Target::File(p.clone()),
                    busy_timeout: BUSY_TIMEOUT,
                    fresh,
                    settled: AtomicBool::new(false),
                    _keep_alive: None,
                })
            }
            DbLocation::Memory => {
                let name = format!(
                    "file:/keyrack-{}-{:016x}?vfs=memdb",
                    std::process::id(),
                    rand::random::<u64>()
                );
                let mut db = Database {
                    target: Target::Memory(name),
                    busy_timeout: BUSY_TIMEOUT,
                    fresh: false,
                    settled: AtomicBool::new(false),
                    _keep_alive: None,
                };
                let holder = db.connect()?;
                db._keep_alive = Some(Mutex::new(holder));
                Ok(db)
            }
        }
    }

    /// Sets how long a statement of the connections opened from now on waits for a lock.
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Database {
        self.busy_timeout = timeout;
        self
    }

    /// A private copy of the database file at `path`, held in memory, for the plans of the phase
    /// commands (`--dry-run`): schema migrations and every other start-up step then run on the
    /// copy, and the file is only read. The file must exist (the caller checks). A WAL file
    /// left beside it is read through a read-only connection, so that closing it checkpoints
    /// nothing into the database file; otherwise the connection is read-write, without changing
    /// any setting, so that SQLite removes the `-wal` and `-shm` files it made for the reading.
    pub fn snapshot_of(path: &std::path::Path) -> rusqlite::Result<Database> {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        // Read-write needs the create flag for SQLite to make the `-wal` and `-shm` files it
        // reads through (and removes at close); the caller checked that the database exists.
        let access = if std::path::Path::new(&wal).exists() {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        };
        // The URI flag lets `VACUUM INTO` name the in-memory copy; the file's own name is then
        // given so that SQLite cannot read it as a URI.
        let source = Connection::open_with_flags(
            plain_name(path)?,
            access | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        source.busy_timeout(BUSY_TIMEOUT)?;
        let copy = Database::new(&DbLocation::Memory)?;
        let Target::Memory(uri) = &copy.target else {
            unreachable!("Database::new(Memory) is in memory")
        };
        // `VACUUM INTO` writes a consistent snapshot in rollback-journal mode (the file's WAL
        // mode could not be opened again in memory).
        source.execute("VACUUM INTO ?1", [uri])?;
        Ok(copy)
    }

    /// A new connection with keyrack's settings. One per worker thread.
    pub fn connect(&self) -> rusqlite::Result<Connection> {
        self.open("FULL")
    }

    /// The connection of the start-up (schema migrations, the key's identity). On a fresh
    /// file it does not sync: its switch to WAL, the migrations and the other first writes
    /// would otherwise each wait for the disk (15 syncs), for a file that holds nothing yet;
    /// a crash during them loses nothing. `finish_start` makes all of it durable at once.
    /// Otherwise the same as `connect`.
    pub fn connect_for_start(&self) -> rusqlite::Result<Connection> {
        self.open(if self.fresh { "OFF" } else { "FULL" })
    }

    /// Ends the start-up on the connection `connect_for_start` gave: on a fresh file, back to
    /// `synchronous=FULL`, and one checkpoint that syncs the write-ahead log, the directory
    /// (the new files' names) and the database file, before anything else is written. The
    /// connection is then like any other. Once is enough.
    pub fn finish_start(&self, conn: &Connection) -> rusqlite::Result<()> {
        if self.fresh && !self.settled.load(Ordering::SeqCst) {
            conn.execute_batch("PRAGMA synchronous=FULL")?;
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
            self.settled.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn open(&self, synchronous: &str) -> rusqlite::Result<Connection> {
        let conn = match &self.target {
            // Never creates the file (`Database::new` did): a worker opening its connection
            // after the file was removed gets an error, not a new empty database.
            Target::File(p) => Connection::open_with_flags(
                p,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_URI
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
            Target::Memory(uri) => Connection::open_with_flags(
                uri,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_URI
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
        };
        conn.busy_timeout(self.busy_timeout)?;
        // Before the switch to WAL, which on a new file is itself a write.
        conn.execute_batch(&format!("PRAGMA synchronous={synchronous}"))?;
        if matches!(self.target, Target::File(_)) {
            // WAL lets readers go on while one connection writes.
            let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                log::warn!("the database did not switch to WAL (journal_mode={mode})");
            }
        }
        conn.execute_batch("PRAGMA foreign_keys=ON")?;
        Ok(conn)
    }
}

/// Creates an empty database file readable by its owner only, when there is none. SQLite gives
/// the `-wal` and `-shm` files it creates later the database file's mode, so those follow; the
/// process's file creation mask (set in `main`) covers the rest.
fn create_owner_only(path: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    // An existing file is left as it is; an unusable path is reported by SQLite at its open.
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

/// Applies pending schema migrations, all in one transaction (a crash re-runs nothing twice).
pub fn migrate_schema(conn: &mut Connection) -> Result<(), refinery::Error> {
    let report = embedded::migrations::runner().set_grouped(true).run(conn)?;
    for m in report.applied_migrations() {
        log::info!("applied schema migration {}", m);
    }
    Ok(())
}

/// The same on a plan's in-memory copy (`--dry-run`): the migrations run on the copy only, and
/// the log says what a real run would apply, never that anything was applied.
pub fn migrate_schema_of_copy(conn: &mut Connection) -> Result<(), refinery::Error> {
    let report = embedded::migrations::runner().set_grouped(true).run(conn)?;
    for m in report.applied_migrations() {
        log::info!("dry run: schema migration {m} would be applied (not written)");
    }
    Ok(())
}

/// The schema version this binary brings: the highest embedded migration.
pub fn binary_schema_version() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

/// What a database file is, read on a read-only connection before anything opens it for
/// writing (`crate::open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// No table at all: an empty file, as a command that creates a database starts from.
    pub empty: bool,
    /// The highest applied schema migration (0: none).
    pub schema_version: i64,
    /// Users in the database (0 when it has no users table yet).
    pub users: u64,
}

/// Reads what [`Probe`] says without writing a byte of the database file: a read-only
/// connection (SQLite may make the `-wal` and `-shm` files it reads through; the `-wal` then
/// holds no frame).
pub fn probe(path: &std::path::Path) -> rusqlite::Result<Probe> {
    let conn = Connection::open_with_flags(
        plain_name(path)?,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let has = |table: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
            [table],
            |r| r.get(0),
        )
    };
    let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0))?;
    let schema_version = if has("refinery_schema_history")? {
        schema_version(&conn)?
    } else {
        0
    };
    let users = if has("users")? {
        conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?
    } else {
        0
    };
    Ok(Probe {
        empty: tables == 0,
        schema_version,
        users,
    })
}

/// The highest applied schema migration.
pub fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM refinery_schema_history",
        [],
        |r| r.get(0),
    )
}

/// Writes a consistent copy of the database to `path` (`VACUUM INTO`: a snapshot, whoever else
/// is writing). `path` must not exist or be an empty file. It is a plain file path, never read
/// as an SQLite URI (`file:…?mode=…`): a relative path is given to SQLite as `./path`.
pub fn backup_to(conn: &Connection, path: &std::path::Path) -> rusqlite::Result<()> {
    conn.execute("VACUUM INTO ?1", [plain_name(path)?])
        .map(|_| ())
}

/// A file name SQLite never reads as a URI (`file:…`): a relative path becomes `./path`.
fn plain_name(path: &std::path::Path) -> rusqlite::Result<String> {
    let Some(text) = path.to_str() else {
        return Err(rusqlite::Error::InvalidPath(path.to_path_buf()));
    };
    Ok(if path.is_absolute() {
        text.to_owned()
    } else {
        format!("./{text}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_database_and_its_wal_and_shm_are_owner_only() {
        // Whatever the process's file creation mask (the test runner's is usually 022).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        let db = Database::new(&DbLocation::File(path.clone())).unwrap();
        let mut conn = db.connect().unwrap();
        migrate_schema(&mut conn).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{p:?}");
        }
    }

    /// The tables of the database file alone, without its write-ahead log (as a machine's crash
    /// that lost an unsynced log would leave it).
    fn tables_in_file_alone(path: &std::path::Path) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy.db");
        std::fs::copy(path, &copy).unwrap();
        let conn = Connection::open(&copy).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn a_fresh_file_starts_without_syncing_and_is_in_the_file_once_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.db");
        let db = Database::new(&DbLocation::File(path.clone())).unwrap();
        assert!(db.fresh);
        let mut conn = db.connect_for_start().unwrap();
        let sync = |c: &Connection| c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0));
        assert_eq!(
            sync(&conn).unwrap(),
            0,
            "OFF during a fresh file's start-up"
        );
        migrate_schema(&mut conn).unwrap();
        db.finish_start(&conn).unwrap();
        assert_eq!(sync(&conn).unwrap(), 2, "FULL after it");
        assert!(tables_in_file_alone(&path) >= 5);
        // Any other connection, and a file that is not new: FULL throughout.
        assert_eq!(sync(&db.connect().unwrap()).unwrap(), 2);
        let again = Database::new(&DbLocation::File(path.clone())).unwrap();
        assert!(!again.fresh);
        assert_eq!(sync(&again.connect_for_start().unwrap()).unwrap(), 2);
    }
}
