//! The SQL of `import-legacy`: reading another application's users table (read-only) and
//! writing the users of a new keyrack database. What the values mean is decided in
//! `crate::import`; this module only moves them.

use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{now, Result};
use crate::domain::Email;

/// A table of the foreign database and the columns the import reads, by the names the
/// database declares them with.
#[derive(Debug, Clone)]
pub(crate) struct SourceColumns {
    pub(crate) table: String,
    pub(crate) id: String,
    pub(crate) email: String,
    pub(crate) key: String,
    pub(crate) password: Option<String>,
}

/// One row of the foreign users table, values as SQLite holds them.
#[derive(Debug)]
pub(crate) struct SourceRow {
    pub(crate) id: Value,
    pub(crate) email: Value,
    pub(crate) key: Value,
    pub(crate) password: Option<Value>,
}

/// Opens a foreign database read-only: nothing this connection does can change it. Once `stop`
/// is set, every statement on it ends (SQLite's progress handler interrupts it within a few
/// thousand steps), however long the table or view it reads.
pub(crate) fn open_source(path: &Path, stop: Arc<AtomicBool>) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.progress_handler(1000, Some(move || stop.load(Ordering::Relaxed)));
    conn.busy_timeout(crate::db::BUSY_TIMEOUT)?;
    conn.execute_batch("PRAGMA query_only = ON")?;
    // Reading the schema fails here, not halfway through, when the file is not a database.
    conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(conn)
}

/// Whether the database is one of keyrack's own (it has keyrack's meta table).
pub(crate) fn is_keyrack_database(conn: &Connection) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'keyrack_meta')",
        [],
        |r| r.get(0),
    )?)
}

/// The declared name of table (or view) `name`, matched as SQLite matches names (ignoring
/// ASCII case); `None` when there is none.
pub(crate) fn table_name(conn: &Connection, name: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE",
            [name],
            |r| r.get(0),
        )
        .optional()?)
}

/// The declared names of the columns of `table` (which exists).
pub(crate) fn column_names(conn: &Connection, table: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let names = stmt
        .query_map([table], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(names)
}

/// How many rows the table holds.
pub(crate) fn count_rows(conn: &Connection, cols: &SourceColumns) -> Result<i64> {
    let sql = format!("SELECT COUNT(*) FROM {}", quote(&cols.table));
    Ok(conn.query_row(&sql, [], |r| r.get(0))?)
}

/// Calls `f` with every row of the table, in the order of the id column (so that of two rows
/// that share an email the older account comes first). Stops at the first error `f` returns.
pub(crate) fn each_row<E: From<super::StoreError>>(
    conn: &Connection,
    cols: &SourceColumns,
    mut f: impl FnMut(SourceRow) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let password = cols
        .password
        .as_deref()
        .map_or_else(|| "NULL".to_owned(), quote);
    let sql = format!(
        "SELECT {}, {}, {}, {password} FROM {} ORDER BY {}",
        quote(&cols.id),
        quote(&cols.email),
        quote(&cols.key),
        quote(&cols.table),
        quote(&cols.id),
    );
    let with_password = cols.password.is_some();
    let mut stmt = conn.prepare(&sql).map_err(|e| E::from(e.into()))?;
    let mut rows = stmt.query([]).map_err(|e| E::from(e.into()))?;
    while let Some(r) = rows.next().map_err(|e| E::from(e.into()))? {
        let get = |i| r.get::<_, Value>(i).map_err(|e| E::from(e.into()));
        let row = SourceRow {
            id: get(0)?,
            email: get(1)?,
            key: get(2)?,
            password: if with_password { Some(get(3)?) } else { None },
        };
        f(row)?;
    }
    Ok(())
}

/// An identifier in double quotes, as SQLite quotes names.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Opens the new database file that the import fills. It is not yet anyone's database, so
/// nothing needs a journal: a failed import deletes the whole file.
pub(crate) fn open_target(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

/// Closes the new database (the caller then syncs the file to disk and moves it into place).
pub(crate) fn close_target(conn: Connection) -> Result<()> {
    conn.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// Inserts an imported user under the id it had in the application it comes from.
pub(crate) fn insert_user(
    tx: &Transaction<'_>,
    id: i64,
    email: &Email,
    password_hash: &str,
) -> Result<()> {
    // The application's own id for the user, as text (`external_id`).
    tx.prepare_cached(
        "INSERT INTO users(id, email, password_hash, created_at, external_id)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        id,
        email.as_str(),
        password_hash,
        now(),
        id.to_string()
    ])?;
    super::events::record(
        tx,
        &super::events::Event::new(
            super::events::USER_CREATED,
            super::events::command_actor("import-legacy"),
        )
        .user(id),
    )?;
    Ok(())
}
