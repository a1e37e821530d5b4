//! The SQL of `export-legacy`: on keyrack's side, each user the application knows (by external
//! id) and the OpenAI key `GET /user/api-key` would reveal for them, read without moving
//! anything; on the application's side, its rows' ids and the one column the export writes.
//! What is written is decided in `crate::export`.

use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::collections::HashSet;
use std::path::Path;

use super::classify::{classify, Verdict};
use super::{meta, Result, Source, StoreError};
use crate::crypto::{Binding, KeyRing};
use crate::domain::{ApiKey, Provider};
use crate::phase::Phase;

const OPENAI: &str = Provider::OPENAI;

/// Where `import-legacy` notes the users whose key it skipped as unreadable
/// (`--skip-unreadable`), as a JSON list of user ids: the export leaves their rows alone.
const UNREADABLE_AT_IMPORT: &str = "import_unreadable_users";

/// Notes the users whose key the import skipped as unreadable (inside the import).
pub(crate) fn note_unreadable_at_import(conn: &Connection, users: &[i64]) -> Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let list = serde_json::to_string(users).unwrap_or_else(|_| "[]".into());
    conn.execute(
        "INSERT INTO keyrack_meta(name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![UNREADABLE_AT_IMPORT, list],
    )?;
    Ok(())
}

/// The users whose key `import-legacy` skipped as unreadable.
pub(crate) fn unreadable_at_import(conn: &Connection) -> Result<HashSet<i64>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM keyrack_meta WHERE name = ?1",
            [UNREADABLE_AT_IMPORT],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text
        .and_then(|t| serde_json::from_str::<Vec<i64>>(&t).ok())
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// A keyrack user the application knows: keyrack's id and the application's.
#[derive(Debug, Clone)]
pub(crate) struct Holder {
    pub(crate) user_id: i64,
    pub(crate) external_id: String,
}

/// Every user with an external id, and how many users have none. A database without the
/// `external_id` column (before external ids were kept) knows imported users by their id,
/// which `import-legacy` kept from the application.
pub(crate) fn holders(conn: &Connection) -> Result<(Vec<Holder>, u64)> {
    let has_external: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('users') WHERE name = 'external_id')",
        [],
        |r| r.get(0),
    )?;
    let sql = if has_external {
        "SELECT id, external_id FROM users WHERE external_id IS NOT NULL ORDER BY id"
    } else {
        "SELECT id, CAST(id AS TEXT) FROM users ORDER BY id"
    };
    let mut stmt = conn.prepare(sql)?;
    let list = stmt
        .query_map([], |r| {
            Ok(Holder {
                user_id: r.get(0)?,
                external_id: r.get(1)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let all = meta::user_count(conn)?;
    let without = all.saturating_sub(list.len() as u64);
    Ok((list, without))
}

/// The OpenAI key a `GET /user/api-key?reveal=true` of this user would answer now, read
/// without moving anything: `None` for no key or an expired one. A value that does not open
/// is an error naming its store.
pub(crate) fn revealed_openai(
    conn: &Connection,
    ring: &KeyRing,
    phase: Phase,
    user_id: i64,
    now: i64,
) -> Result<Option<ApiKey>> {
    let open = |sealed: &str, at: (Source, Option<i64>)| -> Result<ApiKey> {
        ring.open(
            Binding {
                user_id,
                provider: OPENAI,
            },
            sealed,
        )
        .map(ApiKey::from_stored)
        .map_err(|reason| StoreError::KeyUnreadable {
            user_id,
            source_store: at.0,
            key_id: at.1,
            reason,
        })
    };
    let column: Option<String> = if phase == Phase::NewOnly {
        None
    } else {
        conn.prepare_cached("SELECT openai_api_key FROM users WHERE id = ?1")?
            .query_row([user_id], |r| r.get::<_, Option<String>>(0))
            .optional()?
            .flatten()
    };
    if phase == Phase::Legacy {
        // In phase legacy the column is the store, and a key there never expires.
        return column.map(|c| open(&c, (Source::Column, None))).transpose();
    }
    let row: Option<(i64, String, Option<i64>)> = conn
        .prepare_cached(
            "SELECT id, sealed_key, expires_at FROM api_keys
             WHERE user_id = ?1 AND provider = ?2 AND is_default = 1",
        )?
        .query_row(params![user_id, OPENAI], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let from_row = |row: &Option<(i64, String, Option<i64>)>| -> Result<Option<ApiKey>> {
        match row {
            Some((_, _, Some(t))) if *t <= now => Ok(None),
            Some((id, sealed, _)) => open(sealed, (Source::Table, Some(*id))).map(Some),
            None => Ok(None),
        }
    };
    let pending = phase == Phase::Dual && meta::backfill_pending(conn, user_id)?;
    // Phase dual: the read moves a column key the table lacks, or one that wins (the user is
    // pending backfill from legacy), and answers it; otherwise the table answers.
    if phase == Phase::Dual && column.is_some() && (pending || row.is_none()) {
        let verdict = classify(
            column.as_deref(),
            row.as_ref().map(|r| r.1.as_str()),
            pending,
            |sealed| {
                ring.open(
                    Binding {
                        user_id,
                        provider: OPENAI,
                    },
                    sealed,
                )
                .ok()
            },
        );
        return match verdict {
            Verdict::Unmigrated | Verdict::ColumnWins | Verdict::ColumnUnreadable => {
                column.map(|c| open(&c, (Source::Column, None))).transpose()
            }
            Verdict::NoColumn | Verdict::InStep | Verdict::Conflict | Verdict::TableUnreadable => {
                from_row(&row)
            }
        };
    }
    from_row(&row)
}

/// The application's database, opened for reading and, later, the export's one transaction.
/// No setting of the file is changed (its journal mode stays the application's).
pub(crate) fn open_app(path: &Path, write: bool) -> Result<Connection> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    };
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(crate::db::BUSY_TIMEOUT)?;
    conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(conn)
}

/// One row of the application's table: its id as text (what is matched), and as stored (what
/// the write names, so that it finds the row through the table's index).
#[derive(Debug)]
pub(crate) struct AppRow {
    pub(crate) id: String,
    pub(crate) stored: Value,
}

/// Every row of the application's table (ids compared as text; a NULL id is never matched).
pub(crate) fn app_rows(conn: &Connection, table: &str, id: &str) -> Result<Vec<AppRow>> {
    let sql = format!(
        "SELECT CAST({} AS TEXT), {0} FROM {} WHERE {0} IS NOT NULL",
        quote(id),
        quote(table)
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(AppRow {
                id: r.get(0)?,
                stored: r.get(1)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Sets the key column of the rows whose id is `id` as stored. Returns the rows changed.
pub(crate) fn set_app_key(
    conn: &Connection,
    (table, id_col, key_col): (&str, &str, &str),
    id: &Value,
    value: Option<&str>,
) -> Result<usize> {
    let sql = format!(
        "UPDATE {} SET {} = ?1 WHERE {} = ?2",
        quote(table),
        quote(key_col),
        quote(id_col)
    );
    Ok(conn.prepare_cached(&sql)?.execute(params![value, id])?)
}

/// An identifier in double quotes, as SQLite quotes names.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
