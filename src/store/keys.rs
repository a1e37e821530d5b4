//! API keys across the three phases: the rules of every key operation of a request, as `Store`
//! methods, and the statements they are made of. The whole-database work of the phase commands
//! is in `phases.rs`, the key rotation in `rotation.rs`, fixtures' writes in `seed.rs`.
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

use rusqlite::{params, Connection, OptionalExtension};

use super::classify::{classify, Verdict};
use super::events::{self as ev, ServiceActor};
use super::inspect::{find_user, UserRef};
use super::users::{session_in, User};
use super::{meta, now, Ctx, Result, Source, Store, StoreError};
use crate::crypto::{Binding, KeyId, KeyRing, OpenError};
use crate::domain::{ApiKey, ExpiresAt, KeyName, Provider};
use crate::phase::Phase;

const OPENAI: &str = Provider::OPENAI;

/// A row of `api_keys`.
#[derive(Debug, Clone)]
pub(super) struct Row {
    id: i64,
    provider: String,
    name: Option<String>,
    sealed: String,
    is_default: bool,
    created_at: i64,
    updated_at: i64,
    last_used_at: Option<i64>,
    usage_count: i64,
    expires_at: Option<i64>,
}

impl Row {
    fn expired(&self, now: i64) -> bool {
        expired(self.expires_at, now)
    }
}

/// Whether a key with this expiry has expired at `now` (`None`: never expires).
fn expired(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_some_and(|t| t <= now)
}

/// What reading a user's default key needs of its row (the reveal reads nothing more).
#[derive(Debug)]
struct DefaultKeyRow {
    id: i64,
    sealed: String,
    expires_at: Option<i64>,
}

fn default_key_row(
    conn: &Connection,
    user_id: i64,
    provider: &str,
) -> Result<Option<DefaultKeyRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, sealed_key, expires_at FROM api_keys
             WHERE user_id = ?1 AND provider = ?2 AND is_default = 1",
        )?
        .query_row(params![user_id, provider], |r| {
            Ok(DefaultKeyRow {
                id: r.get(0)?,
                sealed: r.get(1)?,
                expires_at: r.get(2)?,
            })
        })
        .optional()?)
}

/// The columns `row` reads, in its order; a macro so that statements are built at compile time
/// (these run on every key read).
macro_rules! row_columns {
    () => {
        "id, provider, name, sealed_key, is_default, created_at, updated_at, last_used_at, usage_count, expires_at"
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
        expires_at: r.get(9)?,
    })
}

/// A key as the listing shows it.
#[derive(Debug, Clone)]
pub(crate) struct KeyView {
    /// `None` for the legacy column's key.
    pub(crate) id: Option<i64>,
    pub(crate) provider: String,
    pub(crate) name: Option<String>,
    /// `None` when the stored value does not decrypt (logged).
    pub(crate) masked_key: Option<String>,
    pub(crate) is_default: bool,
    pub(crate) source: Source,
    pub(crate) created_at: Option<i64>,
    pub(crate) updated_at: Option<i64>,
    pub(crate) last_used_at: Option<i64>,
    pub(crate) usage_count: i64,
    /// When the key expires (`None`: never), and whether it has.
    pub(crate) expires_at: Option<i64>,
    pub(crate) expired: bool,
}

#[derive(Debug)]
pub(crate) struct KeyList {
    pub(crate) phase: Phase,
    pub(crate) keys: Vec<KeyView>,
    pub(crate) column_present: bool,
    pub(crate) column_has_key: bool,
}

/// A user's default key of one provider, as one request found it.
#[derive(Debug)]
pub(crate) struct FoundKey {
    pub(crate) key: ApiKey,
    pub(crate) source: Source,
}

/// What GET /user/api-key finds for one provider.
#[derive(Debug)]
pub(crate) enum DefaultKey {
    Found(FoundKey),
    Missing,
    /// The default key has expired: it is neither revealed nor counted as a use.
    Expired,
}

/// The outcome of moving one user's column key into the table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moved {
    pub(crate) migrated: u64,
    pub(crate) already_migrated: u64,
    pub(crate) conflicts: u64,
}

/// A key to add with POST /user/api-keys.
#[derive(Debug)]
pub(crate) struct NewKey {
    pub(crate) provider: Provider,
    pub(crate) key: ApiKey,
    pub(crate) name: Option<KeyName>,
    pub(crate) is_default: Option<bool>,
    pub(crate) expires_at: Option<ExpiresAt>,
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

pub(super) fn column_set(conn: &Connection, user_id: i64, sealed: Option<&str>) -> Result<()> {
    // The marker tells the foreign-write triggers this write is keyrack's (`store::evidence`).
    conn.prepare_cached(
        "UPDATE users SET openai_api_key = ?2, keyrack_key_writes = keyrack_key_writes + 1
         WHERE id = ?1",
    )?
    .execute(params![user_id, sealed])?;
    Ok(())
}

pub(super) fn default_row(conn: &Connection, user_id: i64, provider: &str) -> Result<Option<Row>> {
    Ok(conn
        .prepare_cached(concat!(
            "SELECT ",
            row_columns!(),
            " FROM api_keys WHERE user_id = ?1 AND provider = ?2 AND is_default = 1"
        ))?
        .query_row(params![user_id, provider], row)
        .optional()?)
}

pub(super) fn insert_row(
    conn: &Connection,
    user_id: i64,
    provider: &str,
    name: Option<&str>,
    sealed: &str,
    is_default: bool,
    expires_at: Option<i64>,
) -> Result<i64> {
    let t = now();
    Ok(conn
        .prepare_cached(
            "INSERT INTO api_keys(user_id, provider, name, sealed_key, is_default, created_at, updated_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
        )?
        .insert(params![user_id, provider, name, sealed, is_default, t, expires_at])?)
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

pub(super) fn clear_default(conn: &Connection, user_id: i64, provider: &str) -> Result<()> {
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

// ---- settling one user's OpenAI key between the column and the table (dual phase) ----------

/// Settles the user's OpenAI key as `classify` says: a column key the table lacks, or one that
/// wins (the user is pending backfill from legacy), becomes the default row — the old default
/// stays as an extra key — and the user is no longer pending. A conflict is counted, both values
/// kept. A value that does not open is an error naming where it is; nothing is moved.
fn settle(tx: &Connection, ctx: &Ctx<'_>, user_id: i64) -> Result<(Verdict, Moved)> {
    let column = column_get(tx, user_id)?;
    let table = default_row(tx, user_id, OPENAI)?;
    let pending = meta::backfill_pending(tx, user_id)?;
    let verdict = classify(
        column.as_deref(),
        table.as_ref().map(|r| r.sealed.as_str()),
        pending,
        |sealed| {
            ctx.ring
                .open(
                    Binding {
                        user_id,
                        provider: OPENAI,
                    },
                    sealed,
                )
                .ok()
        },
    );
    let mut out = Moved::default();
    match (verdict, &column, &table) {
        (Verdict::NoColumn, _, t) => out.already_migrated = u64::from(t.is_some()),
        (Verdict::InStep, _, _) => out.already_migrated = 1,
        (Verdict::Unmigrated | Verdict::ColumnWins, Some(c), t) => {
            if t.is_some() {
                clear_default(tx, user_id, OPENAI)?;
            }
            let id = insert_row(tx, user_id, OPENAI, None, c, true, None)?;
            ev::record(
                tx,
                &ctx.event(ev::KEY_MIGRATED, user_id)
                    .key(Some(id), OPENAI, Source::Column),
            )?;
            out.migrated = 1;
        }
        (Verdict::Conflict, _, _) => out.conflicts = 1,
        (Verdict::ColumnUnreadable, Some(c), _) => {
            return Err(unreadable(ctx, user_id, c, (Source::Column, None)))
        }
        (Verdict::TableUnreadable, _, Some(r)) => {
            return Err(unreadable(
                ctx,
                user_id,
                &r.sealed,
                (Source::Table, Some(r.id)),
            ))
        }
        // `classify` gives these verdicts only with the values they name.
        (Verdict::Unmigrated | Verdict::ColumnWins | Verdict::ColumnUnreadable, None, _)
        | (Verdict::TableUnreadable, _, None) => {}
    }
    if pending {
        meta::backfill_done(tx, user_id)?;
    }
    Ok((verdict, out))
}

/// The error for an OpenAI value that does not open.
fn unreadable(ctx: &Ctx<'_>, user_id: i64, sealed: &str, at: (Source, Option<i64>)) -> StoreError {
    match open(ctx, user_id, OPENAI, sealed, at) {
        Err(e) => e,
        Ok(_) => StoreError::KeyUnreadable {
            user_id,
            source_store: at.0,
            key_id: at.1,
            reason: OpenError::Rejected,
        },
    }
}

/// In phase dual, before a write that touches the user's OpenAI keys: the column's key is
/// settled first (moved when the table lacks it or when it wins), so the write can neither lose
/// it nor be undone by it later. With `replacing`, the write replaces the user's key anyway, so
/// a value that does not open does not stop it (the user is settled all the same).
fn settle_before_write(
    tx: &Connection,
    ctx: &Ctx<'_>,
    user_id: i64,
    replacing: bool,
) -> Result<()> {
    match settle(tx, ctx, user_id) {
        Ok(_) => Ok(()),
        Err(e @ StoreError::KeyUnreadable { .. }) if replacing => {
            log::warn!("{e}; the user's write replaces it");
            meta::backfill_done(tx, user_id)
        }
        Err(e) => Err(e),
    }
}

/// Whether a dual-phase read of this user must settle the column first (a write): the user is
/// pending backfill from legacy (the column wins), or the column holds a key and the table has
/// no default OpenAI row. `column_has_key` is asked only when that decides.
fn needs_move(
    pending: bool,
    has_default_row: bool,
    column_has_key: impl FnOnce() -> Result<bool>,
) -> Result<bool> {
    Ok(pending || (!has_default_row && column_has_key()?))
}

/// A write that sealed `sealed` before its transaction: the value must be sealed with the
/// database's current key. When `rotate-encryption-key` has recorded another one since, a ring
/// holding it switches to it (the caller seals again: `StoreError::Reseal`); a ring without it
/// refuses the write (`StoreError::KeyChanged`, 503), logged once.
fn check_sealing_key(tx: &Connection, ctx: &Ctx<'_>, sealed: &str) -> Result<()> {
    let Some(recorded) = meta::key_id(tx)? else {
        return Ok(());
    };
    if KeyRing::sealed_with(sealed).is_some_and(|id| id.as_str() == recorded) {
        return Ok(());
    }
    let id = KeyId::from_stored(&recorded);
    if ctx.ring.switch_to(&id) {
        log::warn!(
            "the database's current key is now key id {id} (rotate-encryption-key ran): new values \
             are sealed with it from now on"
        );
        return Err(StoreError::Reseal);
    }
    if !KEY_CHANGE_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log::error!(
            "the database's current key is now key id {id}, which this server does not hold: \
             writes of keys are refused (503) until keyrack is restarted with that key as \
             KEYRACK_ENCRYPTION_KEY (and the keys it replaces in KEYRACK_OLD_ENCRYPTION_KEYS)"
        );
    }
    Err(StoreError::KeyChanged(recorded))
}

/// A read's value sealed with a key this process does not hold, when that key is the database's
/// current one: `rotate-encryption-key`, run by another process, re-sealed it since this server
/// started (which checked that it held every key in use), so the read answers `KeyChanged` (503,
/// until a restart with the new key) as a write does. Any other key stays `KeyUnreadable`.
fn rotated_since(conn: &Connection, e: StoreError) -> StoreError {
    if let StoreError::KeyUnreadable {
        reason: OpenError::UnknownKey(id),
        ..
    } = &e
    {
        if meta::key_id(conn).ok().flatten().as_deref() == Some(id.as_str()) {
            return StoreError::KeyChanged(id.clone());
        }
    }
    e
}

static KEY_CHANGE_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

// ---- the key operations of the HTTP API ----------------------------------------------------

#[derive(Debug)]
enum Lookup {
    Found(FoundKey, Option<i64>),
    Missing,
    /// The default key (this `api_keys` id) has expired.
    Expired(i64),
    /// Dual phase, a key only in the column: read again in a write transaction to move it.
    MustMove,
}

fn lookup(
    tx: &Connection,
    ctx: &Ctx<'_>,
    user_id: i64,
    provider: &Provider,
    may_move: bool,
) -> Result<Lookup> {
    let settled = meta::settled(tx, ctx.memo)?;
    let phase = settled.phase;
    let p = provider.as_str();
    if phase == Phase::Legacy {
        if !provider.is_openai() {
            return Ok(Lookup::Missing);
        }
        return Ok(match column_get(tx, user_id)? {
            Some(c) => Lookup::Found(
                FoundKey {
                    key: open(ctx, user_id, p, &c, (Source::Column, None))?,
                    source: Source::Column,
                },
                None,
            ),
            None => Lookup::Missing,
        });
    }
    // The default row is read once: for the checks, and as the answer when no move is needed.
    let pending =
        phase == Phase::Dual && provider.is_openai() && settled.backfill_pending(tx, user_id)?;
    let row = default_key_row(tx, user_id, p)?;
    if row_alone_answers(phase, provider, pending, row.is_some()) {
        return found_in_row(ctx, user_id, p, row.as_ref());
    }
    // Dual, OpenAI, and the user is pending a backfill or has no default row.
    if !needs_move(pending, row.is_some(), || {
        Ok(column_get(tx, user_id)?.is_some())
    })? {
        return found_in_row(ctx, user_id, p, row.as_ref());
    }
    // A column key the table lacks, or the user is pending backfill from legacy (the column
    // wins): settled in a write transaction, then read from the table.
    if !may_move {
        return Ok(Lookup::MustMove);
    }
    let (verdict, _) = settle(tx, ctx, user_id)?;
    let after = found_in_row(ctx, user_id, p, default_key_row(tx, user_id, p)?.as_ref())?;
    if verdict.needs_move() {
        super::evidence::record_legacy_read(tx, now())?;
        log::info!(
            "user {user_id}: moved the OpenAI key from the legacy column into api_keys on read"
        );
        if let Lookup::Found(key, id) = after {
            return Ok(Lookup::Found(
                FoundKey {
                    source: Source::Column,
                    ..key
                },
                id,
            ));
        }
    }
    Ok(after)
}

/// Whether a read of the default key of `provider` is answered by its `api_keys` row, or its
/// absence, alone: nothing to read from the column, nothing to move. Always in phase new_only
/// and for providers other than OpenAI in phase dual; for OpenAI in phase dual when the user is
/// not pending a backfill and has a default row (then `needs_move` is false whatever the column
/// holds). Never in phase legacy (the column is the store).
fn row_alone_answers(
    phase: Phase,
    provider: &Provider,
    pending: bool,
    has_default_row: bool,
) -> bool {
    match phase {
        Phase::Legacy => false,
        Phase::Dual if provider.is_openai() => !pending && has_default_row,
        Phase::Dual | Phase::NewOnly => true,
    }
}

/// The answer a default row (or its absence) gives: an expired key is neither opened nor served
/// (and, in phase dual, not replaced by the column's mirror of it).
fn found_in_row(
    ctx: &Ctx<'_>,
    user_id: i64,
    provider: &str,
    row: Option<&DefaultKeyRow>,
) -> Result<Lookup> {
    Ok(match row {
        Some(r) if expired(r.expires_at, now()) => Lookup::Expired(r.id),
        Some(r) => Lookup::Found(
            FoundKey {
                key: open(
                    ctx,
                    user_id,
                    provider,
                    &r.sealed,
                    (Source::Table, Some(r.id)),
                )?,
                source: Source::Table,
            },
            Some(r.id),
        ),
        None => Lookup::Missing,
    })
}

const SESSION_AND_DEFAULT_ROW: &str = "SELECT u.id, s.expires_at, k.id, k.sealed_key, k.expires_at
     FROM sessions s JOIN users u ON u.id = s.user_id
     LEFT JOIN api_keys k ON k.user_id = u.id AND k.provider = ?3 AND k.is_default = 1
     WHERE s.token_hash = ?1 AND s.expires_at > ?2";

/// The user of a live session, the session's expiry and the user's default row of `provider`,
/// in one statement: outside a transaction, its own snapshot. `None`: no live session has this
/// token hash.
fn session_and_default_row(
    conn: &Connection,
    session: &[u8],
    provider: &str,
) -> Result<Option<SessionRead>> {
    Ok(conn
        .prepare_cached(SESSION_AND_DEFAULT_ROW)?
        .query_row(params![session, now(), provider], |r| {
            let row = match r.get::<_, Option<i64>>(2)? {
                Some(id) => Some(DefaultKeyRow {
                    id,
                    sealed: r.get(3)?,
                    expires_at: r.get(4)?,
                }),
                None => None,
            };
            Ok(SessionRead {
                user_id: r.get(0)?,
                session_expires_at: r.get(1)?,
                row,
            })
        })
        .optional()?)
}

/// The user a service named and their default row of `provider`, in one statement (its own
/// snapshot, as `session_and_default_row`). `None`: no such user.
fn named_and_default_row(
    conn: &Connection,
    named: &UserRef,
    provider: &str,
) -> Result<Option<(i64, Option<DefaultKeyRow>)>> {
    macro_rules! by {
        ($where:literal) => {
            concat!(
                "SELECT u.id, k.id, k.sealed_key, k.expires_at FROM users u
                 LEFT JOIN api_keys k ON k.user_id = u.id AND k.provider = ?2 AND k.is_default = 1
                 WHERE ",
                $where
            )
        };
    }
    let (sql, value): (&str, &dyn rusqlite::ToSql) = match named {
        UserRef::Id(id) => (by!("u.id = ?1"), id),
        UserRef::Email(e) => (by!("u.email = ?1"), e),
        UserRef::External(x) => (by!("u.external_id = ?1"), x),
    };
    Ok(conn
        .prepare_cached(sql)?
        .query_row(params![value, provider], |r| {
            let row = match r.get::<_, Option<i64>>(1)? {
                Some(id) => Some(DefaultKeyRow {
                    id,
                    sealed: r.get(2)?,
                    expires_at: r.get(3)?,
                }),
                None => None,
            };
            Ok((r.get(0)?, row))
        })
        .optional()?)
}

/// What `session_and_default_row` read.
#[derive(Debug)]
struct SessionRead {
    user_id: i64,
    session_expires_at: i64,
    row: Option<DefaultKeyRow>,
}

/// This connection's last read of a session and its default row (`Store::default_key_at_once`),
/// kept to be its answer again while the database is unchanged, that is while SQLite's data
/// version of the file is the one it was read at (any commit, by any connection or process,
/// changes it), and while the session has not expired. A client revealing the same key again
/// and again then costs a statement that only opens a snapshot. It holds the token's hash and
/// the sealed value, as the database does; never a plaintext key.
#[derive(Debug, Default)]
pub(crate) struct LastRead(Option<Kept>);

#[derive(Debug)]
struct Kept {
    token_hash: Vec<u8>,
    provider: String,
    version: u32,
    read: SessionRead,
}

impl LastRead {
    /// Whether a read of this session and provider was kept and its session is live at `now`:
    /// then the data version is worth checking.
    fn may_answer(&self, token_hash: &[u8], provider: &str, now: i64) -> bool {
        self.0.as_ref().is_some_and(|k| {
            k.token_hash == token_hash && k.provider == provider && k.read.session_expires_at > now
        })
    }

    /// The kept read of this session and provider, if the database is still at `version` and
    /// the session is live at `now`.
    fn answer(
        &self,
        token_hash: &[u8],
        provider: &str,
        version: u32,
        now: i64,
    ) -> Option<&SessionRead> {
        self.0
            .as_ref()
            .filter(|k| k.version == version && self.may_answer(token_hash, provider, now))
            .map(|k| &k.read)
    }

    fn keep(&mut self, token_hash: &[u8], provider: &str, version: u32, read: SessionRead) {
        self.0 = Some(Kept {
            token_hash: token_hash.to_vec(),
            provider: provider.to_owned(),
            version,
            read,
        });
    }
}

/// Runs a write that seals before its transaction, once more when the database's current key
/// changed under it (`check_sealing_key` switched the ring): the value is then sealed again.
fn sealing_again<T>(mut write: impl FnMut() -> Result<T>) -> Result<T> {
    match write() {
        Err(StoreError::Reseal) => write(),
        other => other,
    }
}

/// Whose keys a request reads: the user of a session, or a user a service named.
#[derive(Clone, Copy)]
pub(crate) enum Who<'a> {
    /// A session token's hash, checked in the read's own snapshot.
    Session(&'a [u8]),
    /// A user named by a service (looked up in the read's own snapshot), the service, and the
    /// hash of its token, confirmed live in that snapshot.
    Named(&'a UserRef, &'a ServiceActor, &'a [u8; 32]),
}

impl<'a> Who<'a> {
    fn service(self) -> Option<&'a ServiceActor> {
        match self {
            Who::Session(_) => None,
            Who::Named(_, s, _) => Some(s),
        }
    }
}

/// A service's read goes on only while its token is live in the read's own snapshot.
fn token_live_in(conn: &Connection, token: &[u8; 32]) -> Result<()> {
    match super::service_tokens::live(conn, token)? {
        Some(_) => Ok(()),
        None => Err(StoreError::TokenNotLive),
    }
}

/// The user a service named, recorded for the request's log lines.
fn named_user(conn: &Connection, named: &UserRef) -> Result<Option<User>> {
    let user = find_user(conn, named)?;
    if let Some(u) = &user {
        crate::logging::set_user(u.id);
    }
    Ok(user)
}

impl Store {
    /// GET /user/api-key for the session whose token hashes to `session`: `None` when no live
    /// session has it. The session is checked in the same snapshot as the key is read. With
    /// `count_use`, a found table key counts one use.
    pub(crate) fn get_default_key(
        &mut self,
        who: Who<'_>,
        provider: &Provider,
        count_use: bool,
    ) -> Result<Option<DefaultKey>> {
        let first = match who {
            Who::Session(session) => {
                let at_once = match self.default_key_at_once(session, provider) {
                    Ok(at_once) => at_once,
                    Err(e) => return Err(rotated_since(&self.conn, e)),
                };
                match at_once {
                    Some(first) => first,
                    None => self.read(|tx, ctx| {
                        let Some(user) = session_in(tx, session)? else {
                            return Ok(None);
                        };
                        let found = lookup(tx, ctx, user.id, provider, false);
                        Ok(Some((user.id, found.map_err(|e| rotated_since(tx, e))?)))
                    })?,
                }
            }
            Who::Named(named, _, token) => {
                let at_once = match self.named_default_key_at_once(named, provider, token) {
                    Ok(at_once) => at_once,
                    Err(e) => return Err(rotated_since(&self.conn, e)),
                };
                match at_once {
                    Some(first) => first,
                    None => self.read(|tx, ctx| {
                        token_live_in(tx, token)?;
                        let Some(user) = named_user(tx, named)? else {
                            return Ok(None);
                        };
                        let found = lookup(tx, ctx, user.id, provider, false);
                        Ok(Some((user.id, found.map_err(|e| rotated_since(tx, e))?)))
                    })?,
                }
            }
        };
        let Some((user_id, mut found)) = first else {
            return Ok(None);
        };
        let service = who.service();
        if let Lookup::MustMove = found {
            let provider = provider.clone();
            let by = service.cloned();
            found = self.write(move |tx, ctx| {
                lookup(tx, &ctx.acting(by.as_ref()), user_id, &provider, true)
                    .map_err(|e| rotated_since(tx, e))
            })?;
        }
        let key = match found {
            Lookup::Found(key, row_id) => {
                if count_use {
                    // Queued with the usage counters: a reveal costs no transaction of its own.
                    if let Some(id) = row_id {
                        self.shared.usage.record(&self.uses, id, now());
                    }
                    self.shared.usage.record_event(
                        &self.uses,
                        ev::ReadEvent::new(
                            ev::KEY_REVEALED,
                            user_id,
                            row_id,
                            provider.as_str(),
                            key.source,
                        )
                        .by(service),
                    );
                }
                DefaultKey::Found(key)
            }
            Lookup::Expired(id) => {
                self.shared.usage.record_event(
                    &self.uses,
                    ev::ReadEvent::new(
                        ev::KEY_EXPIRED,
                        user_id,
                        Some(id),
                        provider.as_str(),
                        Source::Table,
                    )
                    .by(service),
                );
                DefaultKey::Expired
            }
            Lookup::Missing | Lookup::MustMove => DefaultKey::Missing,
        };
        Ok(Some(key))
    }

    /// The common case of `get_default_key`'s read in one statement (no BEGIN and COMMIT around
    /// it): the session's user and their default row together, answered from the row when the
    /// connection's memo of the phase covers the statement's snapshot and `row_alone_answers`.
    /// `Some(None)`: no live session; `None`: the read needs a snapshot of its own (the memo is
    /// empty or stale, phase legacy, a backfill pending, no default row in phase dual).
    fn default_key_at_once(
        &mut self,
        session: &[u8],
        provider: &Provider,
    ) -> Result<Option<Option<(i64, Lookup)>>> {
        let p = provider.as_str();
        let t = now();
        // The kept read answers when no commit has happened since (the statement that checks
        // this is then the one statement).
        let unchanged = if self.last_read.may_answer(session, p, t) {
            meta::current_version(&self.conn)?
        } else {
            None
        };
        if unchanged
            .and_then(|v| self.last_read.answer(session, p, v, t))
            .is_none()
        {
            let Some(read) = session_and_default_row(&self.conn, session, p)? else {
                self.last_read = LastRead::default();
                return Ok(Some(None));
            };
            match meta::current_version_after_statement(&self.conn) {
                Some(v) => self.last_read.keep(session, p, v, read),
                None => self.last_read = LastRead::default(),
            }
        }
        let Some(read) = self.last_read.0.as_ref().map(|k| &k.read) else {
            return Ok(None);
        };
        crate::logging::set_user(read.user_id);
        let Some(settled) = meta::settled_at_last_statement(&self.conn, &self.memo) else {
            return Ok(None);
        };
        let pending = !settled.nobody_pending();
        if !row_alone_answers(settled.phase, provider, pending, read.row.is_some()) {
            return Ok(None);
        }
        let found = found_in_row(&self.read_ctx(), read.user_id, p, read.row.as_ref())?;
        Ok(Some(Some((read.user_id, found))))
    }

    /// `default_key_at_once` for a user a service named: the user and their default row in one
    /// statement, answered from the row when the memo covers that statement's snapshot and
    /// `row_alone_answers`. `Some(None)`: no such user; `None`: the read needs a snapshot of
    /// its own.
    fn named_default_key_at_once(
        &mut self,
        named: &UserRef,
        provider: &Provider,
        token: &[u8; 32],
    ) -> Result<Option<Option<(i64, Lookup)>>> {
        let p = provider.as_str();
        let found = named_and_default_row(&self.conn, named, p)?;
        // The service's token was live at the version this statement saw (else: a snapshot
        // of its own, which checks it).
        let confirmed = match meta::current_version_after_statement(&self.conn) {
            Some(v) if self.token_memo.confirms(token, v, now()) => true,
            // Something was committed since the token was last checked: checked again, and
            // confirmed if nothing was committed since the statement above.
            Some(v) => self.token_live_at(token, v)?,
            None => false,
        };
        if !confirmed {
            return Ok(None);
        }
        let Some((user_id, row)) = found else {
            return Ok(Some(None));
        };
        crate::logging::set_user(user_id);
        let Some(settled) = meta::settled_at_last_statement(&self.conn, &self.memo) else {
            return Ok(None);
        };
        let pending = !settled.nobody_pending();
        if !row_alone_answers(settled.phase, provider, pending, row.is_some()) {
            return Ok(None);
        }
        let found = found_in_row(&self.read_ctx(), user_id, p, row.as_ref())?;
        Ok(Some(Some((user_id, found))))
    }

    /// POST /user/api-key: sets the user's default key of the provider.
    pub(crate) fn set_default_key(
        &mut self,
        user_id: i64,
        by: Option<&ServiceActor>,
        provider: &Provider,
        key: &ApiKey,
        expires_at: Option<ExpiresAt>,
    ) -> Result<Source> {
        let expires_at = expires_at.map(ExpiresAt::secs);
        sealing_again(|| {
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
            let by = by.cloned();
            self.write(move |tx, ctx| {
                let ctx = &ctx.acting(by.as_ref());
                check_sealing_key(tx, ctx, &sealed)?;
                let phase = meta::phase(tx)?;
                let p = provider.as_str();
                match phase {
                    Phase::Legacy => {
                        if !provider.is_openai() {
                            return Err(conflict_in_legacy(
                                "a key for a provider other than openai",
                            ));
                        }
                        if expires_at.is_some() {
                            return Err(conflict_in_legacy("an expiry (expires_at)"));
                        }
                        let action = match column_get(tx, user_id)? {
                            Some(_) => ev::KEY_REPLACED,
                            None => ev::KEY_CREATED,
                        };
                        column_set(tx, user_id, Some(&sealed))?;
                        ev::record(
                            tx,
                            &ctx.event(action, user_id).key(None, p, Source::Column),
                        )?;
                        Ok(Source::Column)
                    }
                    Phase::Dual | Phase::NewOnly => {
                        if phase == Phase::Dual && provider.is_openai() {
                            settle_before_write(tx, ctx, user_id, true)?;
                        }
                        let event = match default_row(tx, user_id, p)? {
                            Some(r) => {
                                // The new key replaces the old one, expiry included.
                                tx.prepare_cached(
                                    "UPDATE api_keys SET sealed_key = ?2, updated_at = ?3, expires_at = ?4
                                     WHERE id = ?1",
                                )?
                                .execute(params![r.id, sealed, now(), expires_at])?;
                                ctx.event(ev::KEY_REPLACED, user_id).key(
                                    Some(r.id),
                                    p,
                                    Source::Table,
                                )
                            }
                            None => {
                                // A column key being replaced is not a new key for the limit.
                                let replaces_column = phase == Phase::Dual
                                    && provider.is_openai()
                                    && column_get(tx, user_id)?.is_some();
                                if !replaces_column {
                                    check_key_limit(tx, user_id, limit)?;
                                }
                                let id =
                                    insert_row(tx, user_id, p, None, &sealed, true, expires_at)?;
                                ctx.event(ev::KEY_CREATED, user_id).key(
                                    Some(id),
                                    p,
                                    Source::Table,
                                )
                            }
                        };
                        ev::record(tx, &event)?;
                        if phase == Phase::Dual && provider.is_openai() {
                            column_set(tx, user_id, Some(&sealed))?;
                        }
                        Ok(Source::Table)
                    }
                }
            })
        })
    }

    /// DELETE /user/api-key: removes the default key of the provider from every store of the phase.
    pub(crate) fn delete_default_key(
        &mut self,
        user_id: i64,
        by: Option<&ServiceActor>,
        provider: &Provider,
    ) -> Result<()> {
        let provider = provider.clone();
        let by = by.cloned();
        self.write(move |tx, ctx| {
            let ctx = &ctx.acting(by.as_ref());
            let phase = meta::phase(tx)?;
            if phase == Phase::Dual && provider.is_openai() {
                // The key the user sees goes; an older default the column had replaced stays.
                settle_before_write(tx, ctx, user_id, true)?;
            }
            let p = provider.as_str();
            let mut deleted = None;
            if phase.uses_table() {
                if let Some(r) = default_row(tx, user_id, p)? {
                    tx.prepare_cached("DELETE FROM api_keys WHERE id = ?1")?
                        .execute([r.id])?;
                    deleted = Some((Some(r.id), Source::Table));
                }
            }
            if phase.has_column() && provider.is_openai() {
                if deleted.is_none() && column_get(tx, user_id)?.is_some() {
                    deleted = Some((None, Source::Column));
                }
                column_set(tx, user_id, None)?;
            }
            if let Some((id, source)) = deleted {
                ev::record(tx, &ctx.event(ev::KEY_DELETED, user_id).key(id, p, source))?;
            }
            Ok(())
        })
    }

    /// GET /user/api-keys for the session whose token hashes to `session` (`None`: no live
    /// session has it), checked in the listing's own read transaction. In phase dual a key found
    /// only in the column is moved first.
    pub(crate) fn list_keys(&mut self, who: Who<'_>) -> Result<Option<(User, KeyList)>> {
        let first = self.read(|tx, ctx| {
            let found = match who {
                Who::Session(session) => session_in(tx, session)?,
                Who::Named(named, _, token) => {
                    token_live_in(tx, token)?;
                    named_user(tx, named)?
                }
            };
            let Some(user) = found else {
                return Ok(None);
            };
            let list = list_in(tx, ctx, user.id, true)?;
            Ok(Some((user, list)))
        })?;
        let user = match first {
            None => return Ok(None),
            Some((user, Some(list))) => return Ok(Some((user, list))),
            Some((user, None)) => user,
        };
        let user_id = user.id;
        let by = who.service().cloned();
        let moved = self.write(move |tx, ctx| {
            let ctx = &ctx.acting(by.as_ref());
            if meta::phase(tx)? == Phase::Dual {
                let (verdict, _) = settle(tx, ctx, user_id)?;
                if verdict.needs_move() {
                    super::evidence::record_legacy_read(tx, now())?;
                }
            }
            Ok(())
        });
        match moved {
            // A column value that does not open stays where it is; the listing still answers.
            Err(e @ StoreError::KeyUnreadable { .. }) => log::error!("{e}"),
            other => other?,
        }
        let list = self
            .read(|tx, ctx| list_in(tx, ctx, user_id, false))?
            .ok_or(StoreError::Changed)?;
        Ok(Some((user, list)))
    }

    /// POST /user/api-keys.
    pub(crate) fn add_key(&mut self, user_id: i64, new: &NewKey) -> Result<KeyView> {
        sealing_again(|| self.add_key_once(user_id, new))
    }

    fn add_key_once(&mut self, user_id: i64, new: &NewKey) -> Result<KeyView> {
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
        let expires_at = new.expires_at.map(ExpiresAt::secs);
        let limit = self.key_limit;
        self.write(move |tx, ctx| {
            check_sealing_key(tx, ctx, &sealed)?;
            let phase = meta::phase(tx)?;
            if phase == Phase::Legacy {
                return Err(conflict_in_legacy("adding keys"));
            }
            let p = provider.as_str();
            if phase == Phase::Dual && provider.is_openai() {
                settle_before_write(tx, ctx, user_id, false)?;
            }
            check_key_limit(tx, user_id, limit)?;
            let has_default = default_row(tx, user_id, p)?.is_some();
            let make_default = !has_default || wants_default == Some(true);
            if make_default && has_default {
                clear_default(tx, user_id, p)?;
            }
            let id = insert_row(
                tx,
                user_id,
                p,
                name.as_deref(),
                &sealed,
                make_default,
                expires_at,
            )?;
            ev::record(
                tx,
                &ctx.event(ev::KEY_CREATED, user_id)
                    .key(Some(id), p, Source::Table),
            )?;
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
                expires_at,
                expired: false,
            })
        })
    }

    /// DELETE /user/api-keys/{id}.
    pub(crate) fn delete_key(&mut self, user_id: i64, id: i64) -> Result<()> {
        self.write(move |tx, ctx| {
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
            let deleted =
                ctx.event(ev::KEY_DELETED, user_id)
                    .key(Some(id), &provider, Source::Table);
            if phase == Phase::Dual && provider == OPENAI && is_default {
                // A column key that replaced this row wins first: deleting the row then
                // deletes the stale key, not the user's newer one.
                settle_before_write(tx, ctx, user_id, true)?;
                if default_row(tx, user_id, OPENAI)?.map(|r| r.id) != Some(id) {
                    tx.prepare_cached("DELETE FROM api_keys WHERE id = ?1 AND user_id = ?2")?
                        .execute(params![id, user_id])?;
                    ev::record(tx, &deleted)?;
                    return Ok(());
                }
            }
            tx.prepare_cached("DELETE FROM api_keys WHERE id = ?1 AND user_id = ?2")?
                .execute(params![id, user_id])?;
            ev::record(tx, &deleted)?;
            if phase == Phase::Dual && provider == OPENAI && is_default {
                column_set(tx, user_id, None)?;
            }
            Ok(())
        })
    }

    /// POST /user/migrate-api-keys: moves this user's column key, reporting a conflict.
    pub(crate) fn migrate_user(&mut self, user_id: i64) -> Result<(Moved, Phase)> {
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
                    let (_, moved) = settle(tx, ctx, user_id)?;
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
    tx: &Connection,
    ctx: &Ctx<'_>,
    user_id: i64,
    check_move: bool,
) -> Result<Option<KeyList>> {
    let settled = meta::settled(tx, ctx.memo)?;
    let phase = settled.phase;
    let must_check = check_move && phase == Phase::Dual;
    let pending = must_check && settled.backfill_pending(tx, user_id)?;
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
                expires_at: None,
                expired: false,
            });
        }
    } else {
        let t = now();
        let mut stmt = tx.prepare_cached(concat!(
            "SELECT ",
            row_columns!(),
            " FROM api_keys WHERE user_id = ?1 ORDER BY provider, id"
        ))?;
        let rows = stmt
            .query_map([user_id], row)?
            .collect::<rusqlite::Result<Vec<Row>>>()?;
        // The user's rows tell whether there is a default OpenAI row.
        let has_default = rows.iter().any(|r| r.is_default && r.provider == OPENAI);
        if must_check && needs_move(pending, has_default, || Ok(column.is_some()))? {
            return Ok(None);
        }
        keys.reserve(rows.len());
        for r in rows {
            let (pending, last) = ctx.usage.pending(r.id);
            let expired = r.expired(t);
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
                expires_at: r.expires_at,
                expired,
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

// ---- used by the whole-database work of the phase commands (`store::phases`) ---------------

pub(super) fn settle_user(
    tx: &Connection,
    ctx: &Ctx<'_>,
    user_id: i64,
) -> Result<(Verdict, Moved)> {
    settle(tx, ctx, user_id)
}

/// An extra (not default) OpenAI row holding `sealed` as it is.
pub(super) fn insert_extra_openai_row(
    tx: &Connection,
    user_id: i64,
    name: &str,
    sealed: &str,
) -> Result<i64> {
    insert_row(tx, user_id, OPENAI, Some(name), sealed, false, None)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::DbLocation;
    use crate::crypto::EncryptionKey;
    use crate::db::{self, Database};
    use crate::domain::Email;
    use crate::store::Shared;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    const SESSION: [u8; 32] = [7; 32];

    /// What the one-statement read answers: `None` for "needs a snapshot", else whether a
    /// session was found and the key it served with its store.
    fn at_once(store: &mut Store, p: &Provider) -> Result<Option<Option<(String, Source)>>> {
        Ok(store.default_key_at_once(&SESSION, p)?.map(|first| {
            first.map(|(_, found)| match found {
                Lookup::Found(f, _) => (f.key.expose().to_owned(), f.source),
                other => (format!("{other:?}"), Source::Table),
            })
        }))
    }

    /// A kept read answers only its own session and provider, at the data version it was read
    /// at, while the session is live.
    #[test]
    fn a_kept_read_answers_only_while_nothing_changed_and_the_session_lives() {
        let mut last = LastRead::default();
        assert!(!last.may_answer(&SESSION, "openai", 100));
        last.keep(
            &SESSION,
            "openai",
            7,
            SessionRead {
                user_id: 3,
                session_expires_at: 200,
                row: None,
            },
        );
        assert!(last.may_answer(&SESSION, "openai", 199));
        assert_eq!(
            last.answer(&SESSION, "openai", 7, 199).map(|r| r.user_id),
            Some(3)
        );
        assert!(
            last.answer(&SESSION, "openai", 8, 199).is_none(),
            "a commit since"
        );
        assert!(
            last.answer(&SESSION, "openai", 7, 200).is_none(),
            "the session expired"
        );
        assert!(!last.may_answer(&SESSION, "openai", 200));
        assert!(
            last.answer(&[8; 32], "openai", 7, 199).is_none(),
            "another session"
        );
        assert!(
            last.answer(&SESSION, "anthropic", 7, 199).is_none(),
            "another provider"
        );
    }

    /// The read of a default key in one statement answers only while the connection's memo of
    /// the phase covers that statement's snapshot: a phase change, a pending backfill or a
    /// missing default row committed by another connection sends the very next read through a
    /// snapshot of its own, which then answers as the phase rules say.
    #[test]
    fn a_read_at_once_answers_only_what_the_memo_covers() -> TestResult {
        let dir = tempfile::tempdir()?;
        for location in [
            DbLocation::Memory,
            DbLocation::File(dir.path().join("at_once.db")),
        ] {
            let db = Database::new(&location)?;
            let mut other = db.connect()?;
            db::migrate_schema(&mut other)?;
            let ring = Arc::new(KeyRing::new(EncryptionKey::generate(), vec![]));
            let mut store = Store::new(db.connect()?, ring.clone(), Arc::new(Shared::default()));
            let openai = Provider::openai();
            let user = store.create_user(&Email::parse("a@x.org")?, "h")?;
            store.create_session(user.id, &SESSION, now() + 3600)?;
            store.set_default_key(
                user.id,
                None,
                &openai,
                &ApiKey::parse("sk-table-0123456789")?,
                None,
            )?;

            // Nothing in the memo yet: a snapshot of its own, which fills it.
            assert_eq!(at_once(&mut store, &openai)?, None, "{location:?}");
            let served = |store: &mut Store| -> Result<Option<(String, Source)>> {
                Ok(
                    match store.get_default_key(Who::Session(&SESSION), &openai, false)? {
                        Some(DefaultKey::Found(f)) => Some((f.key.expose().to_owned(), f.source)),
                        _ => None,
                    },
                )
            };
            let table = Some(("sk-table-0123456789".to_owned(), Source::Table));
            assert_eq!(served(&mut store)?, table);
            assert_eq!(
                at_once(&mut store, &openai)?,
                Some(table.clone()),
                "{location:?}"
            );
            // Asked again with nothing committed since: the kept read answers, the session and
            // key statement does not run again.
            let runs = |store: &Store| -> Result<i32> {
                Ok(store
                    .conn
                    .prepare_cached(SESSION_AND_DEFAULT_ROW)?
                    .get_status(rusqlite::StatementStatus::Run))
            };
            let before = runs(&store)?;
            assert_eq!(
                at_once(&mut store, &openai)?,
                Some(table.clone()),
                "{location:?}"
            );
            assert_eq!(runs(&store)?, before, "{location:?}");
            // The session deleted by another connection (a log-out elsewhere): no user at once.
            other.execute("DELETE FROM sessions", [])?;
            assert_eq!(
                store
                    .default_key_at_once(&SESSION, &openai)?
                    .map(|f| f.is_some()),
                Some(false),
                "{location:?}"
            );
            store.create_session(user.id, &SESSION, now() + 3600)?;
            assert_eq!(served(&mut store)?, table);
            assert_eq!(
                at_once(&mut store, &openai)?,
                Some(table.clone()),
                "{location:?}"
            );
            assert_eq!(
                at_once(&mut store, &openai)?,
                Some(table.clone()),
                "{location:?}"
            );
            // Another session: no user, whatever the memo.
            assert_eq!(
                store
                    .default_key_at_once(&[8; 32], &openai)?
                    .map(|f| f.is_some()),
                Some(false)
            );

            // Another connection reverts to phase legacy, the column holding another key.
            let sealed = ring.seal(
                Binding {
                    user_id: user.id,
                    provider: "openai",
                },
                "sk-column-0123456789",
            );
            other.execute(
                "UPDATE users SET openai_api_key = ?1 WHERE id = ?2",
                params![sealed, user.id],
            )?;
            meta::set_phase(&other, Phase::Legacy, "test")?;
            assert_eq!(at_once(&mut store, &openai)?, None, "{location:?}");
            let column = Some(("sk-column-0123456789".to_owned(), Source::Column));
            assert_eq!(served(&mut store)?, column, "{location:?}");
            // Phase legacy is never answered from a row.
            assert_eq!(at_once(&mut store, &openai)?, None, "{location:?}");

            // Back to dual with the user pending a backfill: the column wins, so no answer from
            // the row; the read moves the column's key.
            meta::set_phase(&other, Phase::Dual, "test")?;
            other.execute(
                "INSERT INTO legacy_backfill(user_id) VALUES (?1)",
                [user.id],
            )?;
            assert_eq!(served(&mut store)?, column, "{location:?}");
            assert_eq!(at_once(&mut store, &openai)?, None, "{location:?}");
            // Settled by another connection: the row answers again, after one snapshot.
            other.execute("DELETE FROM legacy_backfill", [])?;
            assert_eq!(at_once(&mut store, &openai)?, None, "{location:?}");
            assert_eq!(
                served(&mut store)?,
                Some(("sk-column-0123456789".to_owned(), Source::Table))
            );
            let moved = Some(("sk-column-0123456789".to_owned(), Source::Table));
            assert_eq!(at_once(&mut store, &openai)?, Some(moved), "{location:?}");

            // No default row in phase dual: the column must be looked at.
            other.execute("DELETE FROM api_keys", [])?;
            assert_eq!(
                served(&mut store)?,
                Some(("sk-column-0123456789".to_owned(), Source::Column))
            );
            other.execute("DELETE FROM api_keys", [])?;
            other.execute("UPDATE users SET openai_api_key = NULL", [])?;
            assert_eq!(served(&mut store)?, None);
            assert_eq!(at_once(&mut store, &openai)?, None, "{location:?}");
            // Another provider in phase dual, or any in new_only: the row (or none) answers.
            let other_provider = Provider::parse("anthropic")?;
            assert!(matches!(
                store.default_key_at_once(&SESSION, &other_provider)?,
                Some(Some((_, Lookup::Missing)))
            ));
            meta::set_phase(&other, Phase::NewOnly, "test")?;
            assert_eq!(served(&mut store)?, None);
            assert!(matches!(
                store.default_key_at_once(&SESSION, &openai)?,
                Some(Some((_, Lookup::Missing)))
            ));
        }
        Ok(())
    }

    /// Adversarial: a kept read is never served past a change made between two reveals by this
    /// connection or another (a log-out here, a key replaced or re-sealed elsewhere, a
    /// checkpoint that truncates the WAL, a VACUUM, a session shortened to the past), in
    /// memory and in a file.
    #[test]
    fn a_kept_read_is_never_served_past_a_change() -> TestResult {
        let dir = tempfile::tempdir()?;
        for location in [
            DbLocation::Memory,
            DbLocation::File(dir.path().join("kept.db")),
        ] {
            let db = Database::new(&location)?;
            let mut other = db.connect()?;
            db::migrate_schema(&mut other)?;
            meta::set_phase(&other, Phase::NewOnly, "test")?;
            let ring = Arc::new(KeyRing::new(EncryptionKey::generate(), vec![]));
            let mut store = Store::new(db.connect()?, ring.clone(), Arc::new(Shared::default()));
            let openai = Provider::openai();
            let user = store.create_user(&Email::parse("k@x.org")?, "h")?;
            store.create_session(user.id, &SESSION, now() + 3600)?;
            let set = |store: &mut Store, k: &str| -> TestResult {
                store.set_default_key(user.id, None, &openai, &ApiKey::parse(k)?, None)?;
                Ok(())
            };
            let served = |store: &mut Store| -> Result<Option<String>> {
                Ok(
                    match store.get_default_key(Who::Session(&SESSION), &openai, false)? {
                        Some(DefaultKey::Found(f)) => Some(f.key.expose().to_owned()),
                        Some(DefaultKey::Expired) => Some("expired".to_owned()),
                        Some(DefaultKey::Missing) => Some("missing".to_owned()),
                        None => None,
                    },
                )
            };
            set(&mut store, "sk-first-0123456789")?;
            for _ in 0..3 {
                assert_eq!(served(&mut store)?.as_deref(), Some("sk-first-0123456789"));
            }
            // Replaced through another connection with a value of the same length.
            let second = ring.seal(
                Binding {
                    user_id: user.id,
                    provider: "openai",
                },
                "sk-secnd-0123456789",
            );
            other.execute("UPDATE api_keys SET sealed_key = ?1", [&second])?;
            assert_eq!(served(&mut store)?.as_deref(), Some("sk-secnd-0123456789"));
            // A checkpoint truncating the WAL, then a VACUUM, then a change: still the truth.
            for _ in 0..2 {
                other.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                assert_eq!(served(&mut store)?.as_deref(), Some("sk-secnd-0123456789"));
            }
            other.execute_batch("VACUUM")?;
            assert_eq!(served(&mut store)?.as_deref(), Some("sk-secnd-0123456789"));
            set(&mut store, "sk-third-0123456789")?;
            other.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            assert_eq!(served(&mut store)?.as_deref(), Some("sk-third-0123456789"));
            // The key made expired elsewhere.
            other.execute("UPDATE api_keys SET expires_at = ?1", [now() - 1])?;
            assert_eq!(served(&mut store)?.as_deref(), Some("expired"));
            other.execute("UPDATE api_keys SET expires_at = NULL", [])?;
            assert_eq!(served(&mut store)?.as_deref(), Some("sk-third-0123456789"));
            // The session shortened to the past elsewhere, then restored; then a log-out on
            // this very connection.
            other.execute("UPDATE sessions SET expires_at = ?1", [now() - 1])?;
            assert_eq!(served(&mut store)?, None);
            other.execute("UPDATE sessions SET expires_at = ?1", [now() + 3600])?;
            assert_eq!(served(&mut store)?.as_deref(), Some("sk-third-0123456789"));
            store.delete_session(&SESSION)?;
            assert_eq!(served(&mut store)?, None);
            // Two providers alternating on one session.
            store.create_session(user.id, &SESSION, now() + 3600)?;
            let anthropic = Provider::parse("anthropic")?;
            store.set_default_key(
                user.id,
                None,
                &anthropic,
                &ApiKey::parse("sk-ant-0123456789")?,
                None,
            )?;
            for _ in 0..3 {
                assert_eq!(served(&mut store)?.as_deref(), Some("sk-third-0123456789"));
                let Some(DefaultKey::Found(f)) =
                    store.get_default_key(Who::Session(&SESSION), &anthropic, false)?
                else {
                    return Err("anthropic not found".into());
                };
                assert_eq!(f.key.expose(), "sk-ant-0123456789");
            }
        }
        Ok(())
    }

    /// With nothing committed at all, the clock alone ends a kept read's answer: the key is
    /// expired from its second on, and the session's end is the end of the user, each at the
    /// very next reveal, while the kept read answers the reveals before them.
    #[test]
    fn a_kept_read_ends_with_the_key_s_and_the_session_s_expiry() -> TestResult {
        let db = Database::new(&DbLocation::Memory)?;
        let mut other = db.connect()?;
        db::migrate_schema(&mut other)?;
        meta::set_phase(&other, Phase::NewOnly, "test")?;
        let ring = Arc::new(KeyRing::new(EncryptionKey::generate(), vec![]));
        let mut store = Store::new(db.connect()?, ring, Arc::new(Shared::default()));
        let openai = Provider::openai();
        let user = store.create_user(&Email::parse("t@x.org")?, "h")?;
        let start = now();
        let (key_end, session_end) = (start + 1, start + 2);
        store.create_session(user.id, &SESSION, session_end)?;
        store.set_default_key(
            user.id,
            None,
            &openai,
            &ApiKey::parse("sk-ticking-0123456789")?,
            Some(crate::domain::ExpiresAt::parse(
                &crate::clock::rfc3339(key_end),
                start,
            )?),
        )?;
        let runs = |store: &Store| -> Result<i32> {
            Ok(store
                .conn
                .prepare_cached(SESSION_AND_DEFAULT_ROW)?
                .get_status(rusqlite::StatementStatus::Run))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (mut found, mut expired) = (0, 0);
        loop {
            let before = now();
            let got = store.get_default_key(Who::Session(&SESSION), &openai, false)?;
            let after = now();
            match got {
                Some(DefaultKey::Found(f)) => {
                    assert!(
                        before < key_end,
                        "served at {before}, the key ends at {key_end}"
                    );
                    assert_eq!(f.key.expose(), "sk-ticking-0123456789");
                    found += 1;
                }
                Some(DefaultKey::Expired) => {
                    assert!(after >= key_end && before < session_end);
                    expired += 1;
                }
                Some(DefaultKey::Missing) => return Err("missing".into()),
                None => {
                    assert!(after >= session_end, "no session at {after}");
                    break;
                }
            }
            assert!(std::time::Instant::now() < deadline, "never ended");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(found > 0 && expired > 0, "{found} found, {expired} expired");
        // The statement ran a few times (the first read, a memo refill), not once per reveal.
        assert!(runs(&store)? < 5, "{} runs", runs(&store)?);
        Ok(())
    }
}
