//! The operator's repairs of one user's keys, so that a runbook needs neither the user's
//! password nor hand-written SQL: `resolve` settles a conflict between the legacy column and
//! the default OpenAI key of `api_keys`, `clear-key` removes values that do not open. Each runs
//! in the caller's IMMEDIATE transaction and touches only the user it is given.

use rusqlite::{params, Connection};

use super::classify::{classify, Verdict};
use super::keys::insert_extra_openai_row;
use super::{meta, Result, Source};
use crate::crypto::{Binding, KeyRing};
use crate::domain::Provider;
use crate::phase::Phase;

const OPENAI: &str = Provider::OPENAI;

/// The name of the extra key that keeps the value `resolve` did not keep.
pub(crate) const KEPT_AT_RESOLVE: &str = "value kept at resolve";

/// Which store's value `resolve` keeps as the user's OpenAI key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Column,
    Table,
}

/// The default OpenAI row of `api_keys`: its id and sealed value.
type DefaultRow = (i64, String);

/// The user's OpenAI values in the two stores: the column's, and the default row.
fn openai_values(conn: &Connection, user_id: i64) -> Result<(Option<String>, Option<DefaultRow>)> {
    let column = conn
        .prepare_cached("SELECT openai_api_key FROM users WHERE id = ?1")?
        .query_row([user_id], |r| r.get::<_, Option<String>>(0))?;
    let table = conn
        .prepare_cached(
            "SELECT id, sealed_key FROM api_keys
             WHERE user_id = ?1 AND provider = 'openai' AND is_default = 1",
        )?
        .query_row([user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    Ok((column, table))
}

/// The id of the user's default OpenAI row of `api_keys`, if any.
pub(crate) fn default_openai_id(conn: &Connection, user_id: i64) -> Result<Option<i64>> {
    Ok(openai_values(conn, user_id)?.1.map(|(id, _)| id))
}

/// Whether the user has a conflict now (phase dual, both values open and differ, not pending).
pub(crate) fn has_conflict(conn: &Connection, ring: &KeyRing, user_id: i64) -> Result<bool> {
    if meta::phase(conn)? != Phase::Dual {
        return Ok(false);
    }
    let (column, table) = openai_values(conn, user_id)?;
    let pending = meta::backfill_pending(conn, user_id)?;
    let verdict = classify(
        column.as_deref(),
        table.as_ref().map(|t| t.1.as_str()),
        pending,
        |s| {
            ring.open(
                Binding {
                    user_id,
                    provider: OPENAI,
                },
                s,
            )
            .ok()
        },
    );
    Ok(verdict == Verdict::Conflict)
}

/// Settles the user's conflict: the kept value becomes both the column and the default OpenAI
/// key of `api_keys`; the other value is kept as an extra OpenAI key (`KEPT_AT_RESOLVE`), so
/// nothing is lost. Returns false (and writes nothing) when the user has no conflict.
pub(crate) fn resolve(conn: &Connection, ring: &KeyRing, user_id: i64, keep: Keep) -> Result<bool> {
    if !has_conflict(conn, ring, user_id)? {
        return Ok(false);
    }
    let (Some(column), Some((row_id, table))) = openai_values(conn, user_id)? else {
        return Ok(false);
    };
    match keep {
        Keep::Column => {
            insert_extra_openai_row(conn, user_id, KEPT_AT_RESOLVE, &table)?;
            conn.prepare_cached(
                "UPDATE api_keys SET sealed_key = ?2, updated_at = ?3 WHERE id = ?1",
            )?
            .execute(params![row_id, column, super::now()])?;
        }
        Keep::Table => {
            insert_extra_openai_row(conn, user_id, KEPT_AT_RESOLVE, &column)?;
            conn.prepare_cached(
                "UPDATE users SET openai_api_key = ?2, keyrack_key_writes = keyrack_key_writes + 1
                 WHERE id = ?1",
            )?
            .execute(params![user_id, table])?;
        }
    }
    Ok(true)
}

/// Which stores `clear-key` looks in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stores {
    Column,
    Table,
    All,
}

/// A value that does not open: where it is and why.
#[derive(Debug, Clone)]
pub(crate) struct Unopenable {
    pub(crate) store: Source,
    /// The `api_keys` id (`None` for the column).
    pub(crate) id: Option<i64>,
    pub(crate) reason: String,
}

/// The values of `provider` of the user, in `stores`, that do not open with the configured keys.
/// With `apply`, they are removed (a column value is set to NULL). Values that open are never
/// touched: the user deletes those.
pub(crate) fn clear_unopenable(
    conn: &Connection,
    ring: &KeyRing,
    user_id: i64,
    provider: &Provider,
    stores: Stores,
    apply: bool,
) -> Result<Vec<Unopenable>> {
    let p = provider.as_str();
    let binding = Binding {
        user_id,
        provider: p,
    };
    let mut found = Vec::new();
    if matches!(stores, Stores::Table | Stores::All) {
        let rows: Vec<(i64, String)> = conn
            .prepare_cached(
                "SELECT id, sealed_key FROM api_keys WHERE user_id = ?1 AND provider = ?2",
            )?
            .query_map(params![user_id, p], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (id, sealed) in rows {
            if let Err(e) = ring.open(binding, &sealed) {
                found.push(Unopenable {
                    store: Source::Table,
                    id: Some(id),
                    reason: e.to_string(),
                });
            }
        }
    }
    if matches!(stores, Stores::Column | Stores::All)
        && provider.is_openai()
        && meta::column_present(conn)?
    {
        let (column, _) = openai_values(conn, user_id)?;
        if let Some(sealed) = column {
            if let Err(e) = ring.open(binding, &sealed) {
                found.push(Unopenable {
                    store: Source::Column,
                    id: None,
                    reason: e.to_string(),
                });
            }
        }
    }
    if apply {
        for u in &found {
            match u.id {
                Some(id) => {
                    conn.prepare_cached("DELETE FROM api_keys WHERE id = ?1 AND user_id = ?2")?
                        .execute(params![id, user_id])?;
                }
                None => {
                    conn.prepare_cached(
                        "UPDATE users SET openai_api_key = NULL,
                             keyrack_key_writes = keyrack_key_writes + 1
                         WHERE id = ?1",
                    )?
                    .execute([user_id])?;
                    // A cleared column value no longer wins for a user pending backfill.
                    meta::backfill_done(conn, user_id)?;
                }
            }
        }
    }
    Ok(found)
}
