//! API keys across the three phases: the rules of SPEC section 1, and all key SQL.
//!
//! Every public operation reads the phase inside its own transaction and branches on it, so a
//! phase command committed by another process changes the behaviour of the very next request.
//!
//! | phase    | reads                                         | writes                        |
//! |----------|-----------------------------------------------|-------------------------------|
//! | legacy   | column only (OpenAI only)                     | column only                   |
//! | dual     | table, then column; a column-only key is moved | table and column, one tx      |
//! | new_only | table                                         | table                         |
//!
//! The column holds a value sealed exactly as a default OpenAI table row is (same binding: user
//! and `openai`), so moving a key between the stores copies the sealed text; nothing is
//! decrypted and re-sealed on the way, and "same sealed text" means "same key".

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::{meta, now, Ctx, Result, Source, Store, StoreError};
use crate::crypto::{Binding, KeyRing};
use crate::domain::{ApiKey, KeyName, Provider};
use crate::phase::Phase;

const OPENAI: &str = Provider::OPENAI;

/// A row of `api_keys`.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    provider: String,
    name: Option<String>,
    sealed: String,
    is_default: bool,
    created_at: i64,
    updated_at: i64,
    last_used_at: Option<i64>,
    usage_count: i64,
}

/// The columns `row` reads, in its order; a macro so that statements are built at compile time
/// (these run on every key read).
macro_rules! row_columns {
    () => {
        "id, provider, name, sealed_key, is_default, created_at, updated_at, last_used_at, usage_count"
    };
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        provider: r.get(1)?,
        name: r.get(2)?,
        sealed: r.get(3)?,
        is_default: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        last_used_at: r.get(7)?,
        usage_count: r.get(8)?,
    })
}

/// A key as the listing shows it.
#[derive(Debug, Clone)]
pub struct KeyView {
    /// `None` for the legacy column's key.
    pub id: Option<i64>,
    pub provider: String,
    pub name: Option<String>,
    /// `None` when the stored value does not decrypt (logged).
    pub masked_key: Option<String>,
    pub is_default: bool,
    pub source: Source,
    pub created_at: Option<i64>,
    pub updated_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub usage_count: i64,
}

#[derive(Debug)]
pub struct KeyList {
    pub phase: Phase,
    pub keys: Vec<KeyView>,
    pub column_present: bool,
    pub column_has_key: bool,
}

/// A user's default key of one provider, as one request found it.
#[derive(Debug)]
pub struct FoundKey {
    pub key: ApiKey,
    pub source: Source,
}

/// The outcome of moving one user's column key into the table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub migrated: u64,
    pub already_migrated: u64,
    pub conflicts: u64,
}

/// A key to add with POST /user/api-keys.
#[derive(Debug)]
pub struct NewKey {
    pub provider: Provider,
    pub key: ApiKey,
    pub name: Option<KeyName>,
    pub is_default: Option<bool>,
}

fn conflict_in_legacy(what: &str) -> StoreError {
    StoreError::PhaseConflict(format!(
        "{what} is not available in phase legacy, where only the OpenAI key in the legacy \
         column exists; an operator runs `keyrack migrate` to enable it"
    ))
}

// ---- the lowest layer: one statement each ----------------------------------------------------

fn column_get(conn: &Connection, user_id: i64) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT openai_api_key FROM users WHERE id = ?1")?
        .query_row([user_id], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

fn column_set(conn: &Connection, user_id: i64, sealed: Option<&str>) -> Result<()> {
    conn.prepare_cached("UPDATE users SET openai_api_key = ?2 WHERE id = ?1")?
        .execute(params![user_id, sealed])?;
    Ok(())
}

fn default_row(conn: &Connection, user_id: i64, provider: &str) -> Result<Option<Row>> {
    Ok(conn
        .prepare_cached(concat!(
            "SELECT ",
            row_columns!(),
            " FROM api_keys WHERE user_id = ?1 AND provider = ?2 AND is_default = 1"
        ))?
        .query_row(params![user_id, provider], row)
        .optional()?)
}

fn insert_row(
    conn: &Connection,
    user_id: i64,
    provider: &str,
    name: Option<&str>,
    sealed: &str,
    is_default: bool,
) -> Result<i64> {
    let t = now();
    Ok(conn
        .prepare_cached(
            "INSERT INTO api_keys(user_id, provider, name, sealed_key, is_default, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )?
        .insert(params![user_id, provider, name, sealed, is_default, t])?)
}

/// Refuses a new `api_keys` row past the per-user limit (`KEYRACK_MAX_KEYS_PER_USER`). Only the
/// API's new keys are counted against it: moving a column key into the table never is.
fn check_key_limit(conn: &Connection, user_id: i64, limit: i64) -> Result<()> {
    let n: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM api_keys WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))?;
    if n >= limit {
        return Err(StoreError::LimitReached { limit });
    }
    Ok(())
}

fn clear_default(conn: &Connection, user_id: i64, provider: &str) -> Result<()> {
    conn.prepare_cached(
        "UPDATE api_keys SET is_default = 0, updated_at = ?3
         WHERE user_id = ?1 AND provider = ?2 AND is_default = 1",
    )?
    .execute(params![user_id, provider, now()])?;
    Ok(())
}

fn open(
    ctx: &Ctx<'_>,
    user_id: i64,
    provider: &str,
    sealed: &str,
    at: (Source, Option<i64>),
) -> Result<ApiKey> {
    ctx.ring
        .open(Binding { user_id, provider }, sealed)
        .map(ApiKey::from_stored)
        .map_err(|reason| StoreError::KeyUnreadable {
            user_id,
            source_store: at.0,
            key_id: at.1,
            reason,
        })
}

// ---- moving one user's column key into the table (dual phase) ------------------------------

/// Moves the user's column key into the table when the table lacks it. `column` is the sealed
/// column value. With `column_wins` (a `migrate` from phase legacy), a differing column value is
/// the newer one: the old default row stays as an extra key and the column value becomes the
/// default. Otherwise a differing value is a conflict: both are kept and it is counted.
fn move_column_key(
    tx: &Connection,
    ctx: &Ctx<'_>,
    user_id: i64,
    column: &str,
    column_wins: bool,
) -> Result<Moved> {
    let mut out = Moved::default();
    match default_row(tx, user_id, OPENAI)? {
        None => {
            // Only a value that opens is moved; one that does not is reported, not copied.
            open(ctx, user_id, OPENAI, column, (Source::Column, None))?;
            insert_row(tx, user_id, OPENAI, None, column, true)?;
            out.migrated = 1;
        }
        Some(r) if r.sealed == column => out.already_migrated = 1,
        Some(r) => {
            let in_column = open(ctx, user_id, OPENAI, column, (Source::Column, None))?;
            let in_table = open(ctx, user_id, OPENAI, &r.sealed, (Source::Table, Some(r.id)))?;
            if in_column == in_table {
                out.already_migrated = 1;
            } else if column_wins {
                clear_default(tx, user_id, OPENAI)?;
                insert_row(tx, user_id, OPENAI, None, column, true)?;
                out.migrated = 1;
            } else {
                out.conflicts = 1;
            }
        }
    }
    Ok(out)
}

/// In phase dual, before a write that touches the user's OpenAI keys: a key found only in the
/// column is moved into the table first, so the write cannot lose it.
fn ensure_moved(tx: &Connection, ctx: &Ctx<'_>, user_id: i64) -> Result<()> {
    if let Some(column) = column_get(tx, user_id)? {
        if default_row(tx, user_id, OPENAI)?.is_none() {
            let wins = meta::backfill_from_legacy(tx)?;
            move_column_key(tx, ctx, user_id, &column, wins)?;
        }
    }
    Ok(())
}

/// Whether a dual-phase read of this user would move a column-only key.
fn needs_move(tx: &Connection, user_id: i64) -> Result<bool> {
    Ok(column_get(tx, user_id)?.is_some() && default_row(tx, user_id, OPENAI)?.is_none())
}

// ---- the key operations of the HTTP API ----------------------------------------------------

enum Lookup {
    Found(FoundKey, Option<i64>),
    Missing,
    /// Dual phase, a key only in the column: read again in a write transaction to move it.
    MustMove,
}

fn lookup(
    tx: &Transaction<'_>,
    ctx: &Ctx<'_>,
    user_id: i64,
    provider: &Provider,
    may_move: bool,
) -> Result<Lookup> {
    let phase = meta::phase(tx)?;
    let p = provider.as_str();
    let from_table = |tx: &Transaction<'_>| -> Result<Option<Lookup>> {
        Ok(match default_row(tx, user_id, p)? {
            Some(r) => Some(Lookup::Found(
                FoundKey {
                    key: open(ctx, user_id, p, &r.sealed, (Source::Table, Some(r.id)))?,
                    source: Source::Table,
                },
                Some(r.id),
            )),
            None => None,
        })
    };
    match phase {
        Phase::Legacy => {
            if !provider.is_openai() {
                return Ok(Lookup::Missing);
            }
            Ok(match column_get(tx, user_id)? {
                Some(c) => Lookup::Found(
                    FoundKey {
                        key: open(ctx, user_id, p, &c, (Source::Column, None))?,
                        source: Source::Column,
                    },
                    None,
                ),
                None => Lookup::Missing,
            })
        }
        Phase::Dual => {
            if let Some(found) = from_table(tx)? {
                return Ok(found);
            }
            if !provider.is_openai() {
                return Ok(Lookup::Missing);
            }
            let Some(column) = column_get(tx, user_id)? else {
                return Ok(Lookup::Missing);
            };
            if !may_move {
                return Ok(Lookup::MustMove);
            }
            let key = open(ctx, user_id, p, &column, (Source::Column, None))?;
            let wins = meta::backfill_from_legacy(tx)?;
            move_column_key(tx, ctx, user_id, &column, wins)?;
            let id = default_row(tx, user_id, p)?.map(|r| r.id);
            log::info!(
                "user {user_id}: moved the OpenAI key from the legacy column into api_keys on read"
            );
            Ok(Lookup::Found(
                FoundKey {
                    key,
                    source: Source::Column,
                },
                id,
            ))
        }
        Phase::NewOnly => Ok(from_table(tx)?.unwrap_or(Lookup::Missing)),
    }
}

impl Store {
    /// GET /user/api-key. With `count_use`, a found table key counts one use.
    pub fn get_default_key(
        &mut self,
        user_id: i64,
        provider: &Provider,
        count_use: bool,
    ) -> Result<Option<FoundKey>> {
        let mut found = self.read(|tx, ctx| lookup(tx, ctx, user_id, provider, false))?;
        if let Lookup::MustMove = found {
            let provider = provider.clone();
            found = self.write(move |tx, ctx| lookup(tx, ctx, user_id, &provider, true))?;
        }
        match found {
            Lookup::Found(key, row_id) => {
                if let (true, Some(id)) = (count_use, row_id) {
                    self.usage.record(id, now());
                }
                Ok(Some(key))
            }
            Lookup::Missing | Lookup::MustMove => Ok(None),
        }
    }

    /// POST /user/api-key: sets the user's default key of the provider.
    pub fn set_default_key(
        &mut self,
        user_id: i64,
        provider: &Provider,
        key: &ApiKey,
    ) -> Result<Source> {
        // Sealing needs no transaction: done before, so the group's transaction stays short.
        let sealed = self.ring.seal(
            Binding {
                user_id,
                provider: provider.as_str(),
            },
            key.expose(),
        );
        let provider = provider.clone();
        let limit = self.key_limit;
        self.write(move |tx, _| {
            let phase = meta::phase(tx)?;
            let p = provider.as_str();
            match phase {
                Phase::Legacy => {
                    if !provider.is_openai() {
                        return Err(conflict_in_legacy("a key for a provider other than openai"));
                    }
                    column_set(tx, user_id, Some(&sealed))?;
                    Ok(Source::Column)
                }
                Phase::Dual | Phase::NewOnly => {
                    match default_row(tx, user_id, p)? {
                        Some(r) => {
                            tx.prepare_cached(
                                "UPDATE api_keys SET sealed_key = ?2, updated_at = ?3 WHERE id = ?1",
                            )?
                            .execute(params![r.id, sealed, now()])?;
                        }
                        None => {
                            // A column key being replaced is not a new key for the limit.
                            let replaces_column = phase == Phase::Dual
                                && provider.is_openai()
                                && column_get(tx, user_id)?.is_some();
                            if !replaces_column {
                                check_key_limit(tx, user_id, limit)?;
                            }
                            insert_row(tx, user_id, p, None, &sealed, true)?;
                        }
                    }
                    if phase == Phase::Dual && provider.is_openai() {
                        column_set(tx, user_id, Some(&sealed))?;
                    }
                    Ok(Source::Table)
                }
            }
        })
    }

    /// DELETE /user/api-key: removes the default key of the provider from every store of the phase.
    pub fn delete_default_key(&mut self, user_id: i64, provider: &Provider) -> Result<()> {
        let provider = provider.clone();
        self.write(move |tx, _| {
            let phase = meta::phase(tx)?;
            if phase.uses_table() {
                tx.prepare_cached(
                    "DELETE FROM api_keys WHERE user_id = ?1 AND provider = ?2 AND is_default = 1",
                )?
                .execute(params![user_id, provider.as_str()])?;
            }
            if phase.has_column() && provider.is_openai() {
                column_set(tx, user_id, None)?;
            }
            Ok(())
        })
    }

    /// GET /user/api-keys. In phase dual a key found only in the column is moved first.
    pub fn list_keys(&mut self, user_id: i64) -> Result<KeyList> {
        if let Some(list) = self.read(|tx, ctx| list_in(tx, ctx, user_id, true))? {
            return Ok(list);
        }
        let moved = self.write(move |tx, ctx| {
            if meta::phase(tx)? == Phase::Dual {
                ensure_moved(tx, ctx, user_id)?;
            }
            Ok(())
        });
        match moved {
            // A column value that does not open stays where it is; the listing still answers.
            Err(e @ StoreError::KeyUnreadable { .. }) => log::error!("{e}"),
            other => other?,
        }
        self.read(|tx, ctx| list_in(tx, ctx, user_id, false))?
            .ok_or_else(|| {
                StoreError::PhaseConflict("the listing changed under it; try again".into())
            })
    }

    /// POST /user/api-keys.
    pub fn add_key(&mut self, user_id: i64, new: &NewKey) -> Result<KeyView> {
        let provider = new.provider.clone();
        let sealed = self.ring.seal(
            Binding {
                user_id,
                provider: provider.as_str(),
            },
            new.key.expose(),
        );
        let name = new.name.as_ref().map(|n| n.as_str().to_owned());
        let masked_key = new.key.masked();
        let wants_default = new.is_default;
        let limit = self.key_limit;
        self.write(move |tx, ctx| {
            let phase = meta::phase(tx)?;
            if phase == Phase::Legacy {
                return Err(conflict_in_legacy("adding keys"));
            }
            let p = provider.as_str();
            if phase == Phase::Dual && provider.is_openai() {
                ensure_moved(tx, ctx, user_id)?;
            }
            check_key_limit(tx, user_id, limit)?;
            let has_default = default_row(tx, user_id, p)?.is_some();
            let make_default = !has_default || wants_default == Some(true);
            if make_default && has_default {
                clear_default(tx, user_id, p)?;
            }
            let id = insert_row(tx, user_id, p, name.as_deref(), &sealed, make_default)?;
            if phase == Phase::Dual && provider.is_openai() && make_default {
                column_set(tx, user_id, Some(&sealed))?;
            }
            let t = now();
            Ok(KeyView {
                id: Some(id),
                provider: p.to_owned(),
                name,
                masked_key: Some(masked_key),
                is_default: make_default,
                source: Source::Table,
                created_at: Some(t),
                updated_at: Some(t),
                last_used_at: None,
                usage_count: 0,
            })
        })
    }

    /// DELETE /user/api-keys/{id}.
    pub fn delete_key(&mut self, user_id: i64, id: i64) -> Result<()> {
        self.write(move |tx, _| {
            let phase = meta::phase(tx)?;
            if phase == Phase::Legacy {
                return Err(conflict_in_legacy("deleting keys by id"));
            }
            let found: Option<(String, bool)> = tx
                .prepare_cached(
                    "SELECT provider, is_default FROM api_keys WHERE id = ?1 AND user_id = ?2",
                )?
                .query_row(params![id, user_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((provider, is_default)) = found else {
                return Err(StoreError::NotFound);
            };
            tx.prepare_cached("DELETE FROM api_keys WHERE id = ?1 AND user_id = ?2")?
                .execute(params![id, user_id])?;
            if phase == Phase::Dual && provider == OPENAI && is_default {
                column_set(tx, user_id, None)?;
            }
            Ok(())
        })
    }

    /// POST /user/migrate-api-keys: moves this user's column key, reporting a conflict.
    pub fn migrate_user(&mut self, user_id: i64) -> Result<(Moved, Phase)> {
        self.write(move |tx, ctx| {
            let phase = meta::phase(tx)?;
            match phase {
                Phase::Legacy => Err(conflict_in_legacy("migrating keys")),
                Phase::NewOnly => {
                    let has = default_row(tx, user_id, OPENAI)?.is_some();
                    Ok((
                        Moved {
                            already_migrated: u64::from(has),
                            ..Moved::default()
                        },
                        phase,
                    ))
                }
                Phase::Dual => {
                    let moved = match column_get(tx, user_id)? {
                        Some(c) => {
                            let wins = meta::backfill_from_legacy(tx)?;
                            move_column_key(tx, ctx, user_id, &c, wins)?
                        }
                        None => Moved {
                            already_migrated: u64::from(default_row(tx, user_id, OPENAI)?.is_some()),
                            ..Moved::default()
                        },
                    };
                    if moved.conflicts > 0 {
                        log::warn!("user {user_id}: the legacy column and api_keys hold different OpenAI keys (conflict kept, not resolved)");
                    }
                    Ok((moved, phase))
                }
            }
        })
    }
}

/// The listing, read in one transaction; `None` when `check_move` finds a column-only key that a
/// dual-phase read must move first.
fn list_in(
    tx: &Transaction<'_>,
    ctx: &Ctx<'_>,
    user_id: i64,
    check_move: bool,
) -> Result<Option<KeyList>> {
    let phase = meta::phase(tx)?;
    if check_move && phase == Phase::Dual && needs_move(tx, user_id)? {
        return Ok(None);
    }
    let column = if phase.has_column() {
        column_get(tx, user_id)?
    } else {
        None
    };
    let mut keys = Vec::new();
    if phase == Phase::Legacy {
        if let Some(c) = &column {
            keys.push(KeyView {
                id: None,
                provider: OPENAI.to_owned(),
                name: None,
                masked_key: masked(ctx, user_id, OPENAI, c, (Source::Column, None)),
                is_default: true,
                source: Source::Column,
                created_at: None,
                updated_at: None,
                last_used_at: None,
                usage_count: 0,
            });
        }
    } else {
        let mut stmt = tx.prepare_cached(concat!(
            "SELECT ",
            row_columns!(),
            " FROM api_keys WHERE user_id = ?1 ORDER BY provider, id"
        ))?;
        let rows = stmt.query_map([user_id], row)?;
        for r in rows {
            let r = r?;
            let (pending, last) = ctx.usage.pending(r.id);
            keys.push(KeyView {
                id: Some(r.id),
                masked_key: masked(
                    ctx,
                    user_id,
                    &r.provider,
                    &r.sealed,
                    (Source::Table, Some(r.id)),
                ),
                provider: r.provider,
                name: r.name,
                is_default: r.is_default,
                source: Source::Table,
                created_at: Some(r.created_at),
                updated_at: Some(r.updated_at),
                last_used_at: r.last_used_at.max(last),
                usage_count: r.usage_count + pending,
            });
        }
    }
    Ok(Some(KeyList {
        phase,
        keys,
        column_present: phase.has_column(),
        column_has_key: column.is_some(),
    }))
}

fn masked(
    ctx: &Ctx<'_>,
    user_id: i64,
    provider: &str,
    sealed: &str,
    at: (Source, Option<i64>),
) -> Option<String> {
    match open(ctx, user_id, provider, sealed, at) {
        Ok(k) => Some(k.masked()),
        Err(e) => {
            log::error!("{e}");
            None
        }
    }
}

// ---- whole-database work for the phase commands --------------------------------------------

/// Counts of the whole store, as `keyrack status` reports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Survey {
    pub users: u64,
    pub column_keys: u64,
    pub table_keys: u64,
    pub unmigrated: u64,
    pub conflicts: u64,
    pub undecryptable: u64,
    /// Up to `SAMPLE` user ids for each kind of problem.
    pub unmigrated_ids: Vec<i64>,
    pub conflict_ids: Vec<i64>,
    pub undecryptable_ids: Vec<i64>,
}

pub const SAMPLE: usize = 20;

impl Survey {
    /// One line per kind of problem found: `unmigrated: user ids 3, 7`.
    pub fn problem_lines(&self) -> Vec<String> {
        [
            ("unmigrated", &self.unmigrated_ids),
            ("conflicts", &self.conflict_ids),
            ("undecryptable", &self.undecryptable_ids),
        ]
        .into_iter()
        .filter(|(_, ids)| !ids.is_empty())
        .map(|(what, ids)| {
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            format!("{what}: user ids {}", ids.join(", "))
        })
        .collect()
    }
}

/// Keeps up to `SAMPLE` user ids for a report.
pub fn sample(ids: &mut Vec<i64>, id: i64) {
    if ids.len() < SAMPLE && ids.last() != Some(&id) {
        ids.push(id);
    }
}

/// Decrypts every stored value and compares the column with the table, streaming (memory does
/// not grow with the number of keys).
pub fn survey(conn: &Connection, ring: &KeyRing, phase: Phase) -> Result<Survey> {
    let mut s = Survey {
        users: conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?,
        ..Survey::default()
    };
    let opens = |user_id: i64, provider: &str, sealed: &str| {
        ring.open(Binding { user_id, provider }, sealed).ok()
    };

    let mut stmt = conn.prepare("SELECT user_id, provider, sealed_key FROM api_keys")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        s.table_keys += 1;
        let (uid, provider, sealed): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        if opens(uid, &provider, &sealed).is_none() {
            s.undecryptable += 1;
            sample(&mut s.undecryptable_ids, uid);
        }
    }

    if meta::column_present(conn)? {
        let column_wins = meta::backfill_from_legacy(conn)?;
        let mut stmt = conn.prepare(
            "SELECT u.id, u.openai_api_key, k.sealed_key FROM users u
             LEFT JOIN api_keys k ON k.user_id = u.id AND k.provider = 'openai' AND k.is_default = 1
             WHERE u.openai_api_key IS NOT NULL ORDER BY u.id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            s.column_keys += 1;
            let (uid, column, table): (i64, String, Option<String>) =
                (r.get(0)?, r.get(1)?, r.get(2)?);
            let Some(in_column) = opens(uid, OPENAI, &column) else {
                s.undecryptable += 1;
                sample(&mut s.undecryptable_ids, uid);
                continue;
            };
            if phase == Phase::Legacy {
                // The column is the source of truth; the table is not used.
                continue;
            }
            match table {
                None => {
                    s.unmigrated += 1;
                    sample(&mut s.unmigrated_ids, uid);
                }
                Some(t) if t == column => {}
                Some(t) => match opens(uid, OPENAI, &t) {
                    // Counted once, among the undecryptable table values above.
                    None => {}
                    Some(in_table) if in_table == in_column => {}
                    Some(_) if column_wins => {
                        s.unmigrated += 1;
                        sample(&mut s.unmigrated_ids, uid);
                    }
                    Some(_) => {
                        s.conflicts += 1;
                        sample(&mut s.conflict_ids, uid);
                    }
                },
            }
        }
    }
    Ok(s)
}

/// Counts of one backfill batch.
#[derive(Debug, Default, Clone)]
pub struct Backfill {
    pub migrated: u64,
    pub already_migrated: u64,
    pub conflicts: u64,
    pub failed: u64,
    pub conflict_ids: Vec<i64>,
    pub failed_ids: Vec<i64>,
    /// The last user id looked at; `None` when there was nothing after `after`.
    pub last_user_id: Option<i64>,
    pub users_seen: u64,
}

/// One batch of Phase 1: the next `limit` users after `after` that hold a column key.
/// Runs in the caller's IMMEDIATE transaction.
pub fn backfill_batch(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    usage: &crate::usage::UsageLog,
    after: i64,
    limit: i64,
) -> Result<Backfill> {
    let ctx = Ctx { ring, usage };
    let column_wins = meta::backfill_from_legacy(tx)?;
    let mut b = Backfill::default();
    let batch: Vec<(i64, String)> = tx
        .prepare_cached(
            "SELECT id, openai_api_key FROM users
             WHERE id > ?1 AND openai_api_key IS NOT NULL ORDER BY id LIMIT ?2",
        )?
        .query_map(params![after, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (uid, column) in batch {
        b.last_user_id = Some(uid);
        b.users_seen += 1;
        match move_column_key(tx, &ctx, uid, &column, column_wins) {
            Ok(m) => {
                b.migrated += m.migrated;
                b.already_migrated += m.already_migrated;
                if m.conflicts > 0 {
                    b.conflicts += 1;
                    sample(&mut b.conflict_ids, uid);
                }
            }
            Err(e @ StoreError::KeyUnreadable { .. }) => {
                log::error!("{e}");
                b.failed += 1;
                sample(&mut b.failed_ids, uid);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(b)
}

/// In legacy→dual migration: a default OpenAI row of a user whose column is empty was written
/// before the revert to legacy, and the user has since removed the key. It stays as an extra
/// key, no longer the default (rows are never deleted by a phase change).
pub fn undefault_stale_rows(tx: &Transaction<'_>) -> Result<u64> {
    Ok(tx.execute(
        "UPDATE api_keys SET is_default = 0
         WHERE provider = 'openai' AND is_default = 1
           AND user_id IN (SELECT id FROM users WHERE openai_api_key IS NULL)",
        [],
    )? as u64)
}

/// The users whose column and default table key differ by sealed text, with both values:
/// what `remove-legacy-column` checks again inside its final transaction.
pub fn column_table_mismatches(tx: &Transaction<'_>) -> Result<Vec<(i64, String, Option<String>)>> {
    Ok(tx
        .prepare(
            "SELECT u.id, u.openai_api_key, k.sealed_key FROM users u
             LEFT JOIN api_keys k ON k.user_id = u.id AND k.provider = 'openai' AND k.is_default = 1
             WHERE u.openai_api_key IS NOT NULL AND (k.sealed_key IS NULL OR k.sealed_key != u.openai_api_key)",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?)
}

/// Phase 3: drops the legacy column.
pub fn drop_column(tx: &Transaction<'_>) -> Result<()> {
    tx.execute_batch("ALTER TABLE users DROP COLUMN openai_api_key")?;
    Ok(())
}

/// Revert: re-adds the column if it is gone and writes each user's default OpenAI key into it.
/// Returns (keys written back, table keys that stay in the table unreachable in phase legacy).
pub fn restore_column(tx: &Transaction<'_>) -> Result<(u64, u64)> {
    if !meta::column_present(tx)? {
        tx.execute_batch("ALTER TABLE users ADD COLUMN openai_api_key TEXT")?;
    }
    tx.execute(
        "UPDATE users SET openai_api_key = (
             SELECT k.sealed_key FROM api_keys k
             WHERE k.user_id = users.id AND k.provider = 'openai' AND k.is_default = 1)
         WHERE openai_api_key IS NOT (
             SELECT k.sealed_key FROM api_keys k
             WHERE k.user_id = users.id AND k.provider = 'openai' AND k.is_default = 1)",
        [],
    )?;
    let written: u64 = tx.query_row(
        "SELECT COUNT(*) FROM users WHERE openai_api_key IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    let total: u64 = tx.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
    let defaults: u64 = tx.query_row(
        "SELECT COUNT(*) FROM api_keys WHERE provider = 'openai' AND is_default = 1",
        [],
        |r| r.get(0),
    )?;
    Ok((written, total - defaults))
}

/// Fixtures: a legacy column value, as data written before the migration.
pub fn fixture_column_key(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    user_id: i64,
    key: &ApiKey,
) -> Result<()> {
    let sealed = ring.seal(
        Binding {
            user_id,
            provider: OPENAI,
        },
        key.expose(),
    );
    column_set(tx, user_id, Some(&sealed))
}

/// Fixtures: a table row. The first key of a provider becomes its default unless `is_default`
/// says otherwise for a later one.
pub fn fixture_table_key(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    user_id: i64,
    new: &NewKey,
) -> Result<()> {
    let p = new.provider.as_str();
    let has_default = default_row(tx, user_id, p)?.is_some();
    let make_default = !has_default || new.is_default == Some(true);
    if make_default && has_default {
        clear_default(tx, user_id, p)?;
    }
    let sealed = ring.seal(
        Binding {
            user_id,
            provider: p,
        },
        new.key.expose(),
    );
    insert_row(
        tx,
        user_id,
        p,
        new.name.as_ref().map(KeyName::as_str),
        &sealed,
        make_default,
    )?;
    Ok(())
}

/// The two stores a sealed value can live in, for `reseal_batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    Table,
    Column,
}

/// Counts of one rotation batch.
#[derive(Debug, Default)]
pub struct Reseal {
    pub resealed: u64,
    pub current: u64,
    pub failed: u64,
    pub failed_ids: Vec<i64>,
    /// The last row (table) or user (column) id looked at; `None` when nothing was left.
    pub last_id: Option<i64>,
}

/// One batch of `rotate-encryption-key`: re-seals, under the current key, the next `limit`
/// values of one store after id `after`. A default OpenAI row's column mirror is re-sealed with
/// it (the two stay one sealed text) and is not visited again in the column pass.
pub fn reseal_batch(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    which: Sealed,
    after: i64,
    limit: i64,
) -> Result<Reseal> {
    let column = meta::column_present(tx)?;
    let mut out = Reseal::default();
    if which == Sealed::Column && !column {
        return Ok(out);
    }
    let sql = match which {
        Sealed::Table => {
            "SELECT id, user_id, provider, sealed_key FROM api_keys WHERE id > ?1 ORDER BY id LIMIT ?2"
        }
        Sealed::Column => {
            "SELECT id, id, 'openai', openai_api_key FROM users
             WHERE id > ?1 AND openai_api_key IS NOT NULL
               AND openai_api_key IS NOT (SELECT k.sealed_key FROM api_keys k
                   WHERE k.user_id = users.id AND k.provider = 'openai' AND k.is_default = 1)
             ORDER BY id LIMIT ?2"
        }
    };
    let rows: Vec<(i64, i64, String, String)> = tx
        .prepare(sql)?
        .query_map(params![after, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    out.last_id = rows.last().map(|r| r.0);
    for (id, uid, provider, sealed) in rows {
        if ring.is_current(&sealed) {
            out.current += 1;
            continue;
        }
        let binding = Binding {
            user_id: uid,
            provider: &provider,
        };
        match ring.open(binding, &sealed) {
            Ok(plain) => {
                let new = ring.seal(binding, plain.expose());
                match which {
                    Sealed::Table => {
                        tx.execute(
                            "UPDATE api_keys SET sealed_key = ?2 WHERE id = ?1",
                            params![id, new],
                        )?;
                        if column && provider == OPENAI {
                            out.resealed += tx.execute(
                                "UPDATE users SET openai_api_key = ?2
                                 WHERE id = ?1 AND openai_api_key = ?3",
                                params![uid, new, sealed],
                            )? as u64;
                        }
                    }
                    Sealed::Column => column_set(tx, uid, Some(&new))?,
                }
                out.resealed += 1;
            }
            Err(reason) => {
                let (source_store, key_id) = match which {
                    Sealed::Table => (Source::Table, Some(id)),
                    Sealed::Column => (Source::Column, None),
                };
                let e = StoreError::KeyUnreadable {
                    user_id: uid,
                    source_store,
                    key_id,
                    reason,
                };
                log::error!("{e}");
                out.failed += 1;
                sample(&mut out.failed_ids, uid);
            }
        }
    }
    Ok(out)
}

/// Adds batched uses to a key's counters (`usage::UsageLog::flush`).
pub fn add_usage(tx: &Transaction<'_>, id: i64, uses: i64, last_used_at: i64) -> Result<()> {
    tx.prepare_cached(
        "UPDATE api_keys SET usage_count = usage_count + ?2,
             last_used_at = MAX(COALESCE(last_used_at, 0), ?3)
         WHERE id = ?1",
    )?
    .execute(params![id, uses, last_used_at])?;
    Ok(())
}
