//! `keyrack_meta`: the phase, the identity of the encryption key, and the markers of phase
//! commands in progress.

use rusqlite::{Connection, OptionalExtension};

use super::{Result, StoreError};
use crate::phase::Phase;

const PHASE: &str = "phase";
const KEY_ID: &str = "encryption_key_id";
/// Set while a `migrate` that started from phase legacy has not finished its backfill: until
/// then a column value that differs from the table is the newer one, not a conflict.
const BACKFILL_FROM_LEGACY: &str = "backfill_from_legacy";

fn get(conn: &Connection, name: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT value FROM keyrack_meta WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

fn set(conn: &Connection, name: &str, value: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO keyrack_meta(name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
    )?
    .execute([name, value])?;
    Ok(())
}

/// The current phase. Read inside the caller's transaction.
pub fn phase(conn: &Connection) -> Result<Phase> {
    let raw = get(conn, PHASE)?.unwrap_or_else(|| "dual".to_owned());
    Phase::parse(&raw).ok_or_else(|| {
        StoreError::Sql(rusqlite::Error::InvalidColumnType(
            0,
            format!("keyrack_meta.phase={raw}"),
            rusqlite::types::Type::Text,
        ))
    })
}

pub fn set_phase(conn: &Connection, phase: Phase) -> Result<()> {
    set(conn, PHASE, phase.as_str())
}

pub fn key_id(conn: &Connection) -> Result<Option<String>> {
    get(conn, KEY_ID)
}

pub fn set_key_id(conn: &Connection, id: &str) -> Result<()> {
    set(conn, KEY_ID, id)
}

pub fn backfill_from_legacy(conn: &Connection) -> Result<bool> {
    Ok(get(conn, BACKFILL_FROM_LEGACY)?.is_some())
}

pub fn set_backfill_from_legacy(conn: &Connection, on: bool) -> Result<()> {
    if on {
        set(conn, BACKFILL_FROM_LEGACY, "1")
    } else {
        conn.execute(
            "DELETE FROM keyrack_meta WHERE name = ?1",
            [BACKFILL_FROM_LEGACY],
        )?;
        Ok(())
    }
}

/// Whether `users.openai_api_key` exists (it is dropped in phase new_only).
pub fn column_present(conn: &Connection) -> Result<bool> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('users') WHERE name = 'openai_api_key'",
        [],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Whether any sealed value is stored, in either store.
pub fn has_encrypted_values(conn: &Connection) -> Result<bool> {
    let in_table: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM api_keys)", [], |r| r.get(0))?;
    if in_table {
        return Ok(true);
    }
    if column_present(conn)? {
        let in_column: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM users WHERE openai_api_key IS NOT NULL)",
            [],
            |r| r.get(0),
        )?;
        return Ok(in_column);
    }
    Ok(false)
}

/// How many values are stored: (in the legacy column, in the table). The total that progress
/// lines count towards.
pub fn stored_key_counts(conn: &Connection) -> Result<(u64, u64)> {
    let table: i64 = conn.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
    let column: i64 = if column_present(conn)? {
        conn.query_row(
            "SELECT COUNT(*) FROM users WHERE openai_api_key IS NOT NULL",
            [],
            |r| r.get(0),
        )?
    } else {
        0
    };
    Ok((column as u64, table as u64))
}
