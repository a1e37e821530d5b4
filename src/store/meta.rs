//! `keyrack_meta`: the phase, the identity of the database's current encryption key, and the
//! users still pending a backfill from phase legacy (`legacy_backfill`).

use rusqlite::{params, Connection, OptionalExtension, TransactionState, MAIN_DB};
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use super::{Result, StoreError};
use crate::phase::Phase;

const PHASE: &str = "phase";
const KEY_ID: &str = "encryption_key_id";
/// Written by versions before `legacy_backfill` existed: one flag for the whole database.
/// Turned into per-user rows at start (`upgrade_backfill_flag`).
const OLD_BACKFILL_FLAG: &str = "backfill_from_legacy";

fn get(conn: &Connection, name: &str) -> Result<Option<String>> {
    get_with(conn, name, str::to_owned)
}

/// The value of `name` as `f` makes it from the stored text, without copying the text first.
fn get_with<T>(conn: &Connection, name: &str, f: impl FnOnce(&str) -> T) -> Result<Option<T>> {
    Ok(conn
        .prepare_cached("SELECT value FROM keyrack_meta WHERE name = ?1")?
        .query_row([name], |r| Ok(f(r.get_ref(0)?.as_str()?)))
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

/// The current phase. Read inside the caller's transaction. A change since this process last
/// read it (a phase command run by another process) is logged once.
pub(crate) fn phase(conn: &Connection) -> Result<Phase> {
    // Read every request: parsed from the row as it is, no copy of the text.
    let phase = match get_with(conn, PHASE, |raw| {
        Phase::parse(raw).ok_or_else(|| raw.to_owned())
    })? {
        None => Phase::Dual,
        Some(Ok(phase)) => phase,
        Some(Err(stored)) => return Err(StoreError::BadPhase { stored }),
    };
    let code = phase_code(phase);
    // Read first: the phase rarely changes, and a write to the shared counter on every request
    // would move its cache line between the workers' cores.
    if LAST_SEEN_PHASE.load(Ordering::Relaxed) == code {
        return Ok(phase);
    }
    let before = LAST_SEEN_PHASE.swap(code, Ordering::Relaxed);
    if before != 0 && before != code {
        log::info!(
            "the phase changed from {} to {phase} (a phase command ran); following it from this request on",
            PHASES[usize::from(before) - 1]
        );
    }
    Ok(phase)
}

/// The phase this process last read (0: none yet), for logging the changes it follows.
static LAST_SEEN_PHASE: AtomicU8 = AtomicU8::new(0);
const PHASES: [Phase; 3] = [Phase::Legacy, Phase::Dual, Phase::NewOnly];

fn phase_code(p: Phase) -> u8 {
    match p {
        Phase::Legacy => 1,
        Phase::Dual => 2,
        Phase::NewOnly => 3,
    }
}

/// Sets the phase; a change is recorded as a `phase.changed` event of `command`.
pub(crate) fn set_phase(conn: &Connection, phase: Phase, command: &str) -> Result<()> {
    let before = get(conn, PHASE)?;
    if before.as_deref() != Some(phase.as_str()) {
        // The evidence of legacy use counts from the moment the phase becomes dual.
        if phase == Phase::Dual {
            super::evidence::reset(conn)?;
        }
        let mut e = super::events::Event::new(
            super::events::PHASE_CHANGED,
            super::events::command_actor(command),
        );
        e.from = before.as_deref().and_then(Phase::parse).map(Phase::as_str);
        e.to = Some(phase.as_str());
        super::events::record(conn, &e)?;
    }
    set(conn, PHASE, phase.as_str())
}

pub(crate) fn key_id(conn: &Connection) -> Result<Option<String>> {
    get(conn, KEY_ID)
}

pub(crate) fn set_key_id(conn: &Connection, id: &str) -> Result<()> {
    set(conn, KEY_ID, id)
}

/// What a key operation reads of `keyrack_meta` and `legacy_backfill` before anything else: the
/// phase, and whether any user at all is still pending a backfill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    pub(crate) phase: Phase,
    /// False only when no user is pending (then nobody's check needs a statement); true when
    /// some user is, or when it was not read.
    any_pending: bool,
}

impl Settled {
    /// True when no user at all is pending a backfill (then nobody's check needs a statement).
    pub(crate) fn nobody_pending(&self) -> bool {
        !self.any_pending
    }

    /// `backfill_pending`, without a statement when no user is pending.
    pub(crate) fn backfill_pending(&self, conn: &Connection, user_id: i64) -> Result<bool> {
        Ok(self.any_pending && backfill_pending(conn, user_id)?)
    }
}

/// One connection's last `Settled`, with the SQLite data version of the database file it was
/// read at. The data version changes with every commit to the file, by this connection, another
/// one or another process, so while it is unchanged the rows are unchanged and the values need
/// no statement: a read request then runs two statements fewer.
#[derive(Debug, Default)]
pub(crate) struct Memo(Cell<Option<(u32, Settled)>>);

/// The phase and whether any backfill is pending, inside the caller's transaction. With a memo
/// (read-only snapshots only: a write's own uncommitted changes do not move the data version),
/// taken from it while the database is unchanged since it was filled.
pub(crate) fn settled(conn: &Connection, memo: Option<&Memo>) -> Result<Settled> {
    let Some(memo) = memo else {
        return Ok(Settled {
            phase: phase(conn)?,
            any_pending: true,
        });
    };
    // Before the snapshot's first read the data version is the previous snapshot's.
    if conn.transaction_state(Some(MAIN_DB))? != TransactionState::None {
        if let (Some((seen, settled)), Some(now)) = (memo.0.get(), data_version(conn)) {
            if seen == now {
                return Ok(settled);
            }
        }
    }
    let settled = Settled {
        phase: phase(conn)?,
        any_pending: conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM legacy_backfill)")?
            .query_row([], |r| r.get(0))?,
    };
    // Read after the statements above: the version of the snapshot they read.
    memo.0.set(data_version(conn).map(|v| (v, settled)));
    Ok(settled)
}

/// The memo's `Settled` for the statement that just ran on `conn` outside any transaction (in
/// its own snapshot): the values as of that snapshot, or `None` when the memo is empty or the
/// database changed since it was filled. Right after such a statement the data version is the
/// one that statement's snapshot saw, and it stays so until the connection's next statement.
/// Inside a transaction, `settled`.
pub(crate) fn settled_at_last_statement(conn: &Connection, memo: &Memo) -> Option<Settled> {
    let (seen, settled) = memo.0.get()?;
    (current_version_after_statement(conn)? == seen).then_some(settled)
}

/// The data version right after the statement that just ran on `conn` outside any transaction
/// (in its own snapshot): the version that snapshot saw, until the connection's next statement.
/// `None` inside a transaction or when it cannot be read.
pub(crate) fn current_version_after_statement(conn: &Connection) -> Option<u32> {
    if !conn.is_autocommit() {
        return None;
    }
    data_version(conn)
}

/// The database's data version as of now: a statement that only opens a snapshot (and closes
/// it) runs first, so that the version is read from the file's current state, not remembered
/// from the connection's last snapshot. Outside a transaction only (else `None`).
pub(crate) fn current_version(conn: &Connection) -> Result<Option<u32>> {
    if !conn.is_autocommit() {
        return Ok(None);
    }
    conn.prepare_cached("SELECT 1 FROM keyrack_meta LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?;
    Ok(data_version(conn))
}

/// SQLite's data version of the main database file (`SQLITE_FCNTL_DATA_VERSION`): changes
/// whenever the file's content changes, through this connection or any other. `None` when it
/// cannot be read (then nothing is remembered).
fn data_version(conn: &Connection) -> Option<u32> {
    let mut version: u32 = 0;
    // SAFETY: the handle is this open connection's; the call only reads a counter of its pager
    // into `version`, a u32 as SQLITE_FCNTL_DATA_VERSION requires; the connection is not used
    // concurrently (`&Connection` on this thread, rusqlite connections are not Sync).
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_DATA_VERSION,
            (&mut version as *mut u32).cast(),
        )
    };
    (rc == rusqlite::ffi::SQLITE_OK).then_some(version)
}

/// Whether the user is still pending a backfill from phase legacy: their column value wins.
pub(crate) fn backfill_pending(conn: &Connection, user_id: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM legacy_backfill WHERE user_id = ?1)")?
        .query_row([user_id], |r| r.get(0))?)
}

/// The user's OpenAI key is settled: the column no longer wins for them.
pub(crate) fn backfill_done(conn: &Connection, user_id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM legacy_backfill WHERE user_id = ?1")?
        .execute([user_id])?;
    Ok(())
}

/// How many users are still pending a backfill from phase legacy. A row left by a user deleted
/// outside keyrack (a client that does not enforce foreign keys) is not a user.
pub(crate) fn backfill_left(conn: &Connection) -> Result<u64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM legacy_backfill b JOIN users u ON u.id = b.user_id",
        [],
        |r| r.get(0),
    )?)
}

/// `migrate` from phase legacy: every user holding a column key is pending.
pub(crate) fn backfill_start(conn: &Connection) -> Result<u64> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO legacy_backfill(user_id)
         SELECT id FROM users WHERE openai_api_key IS NOT NULL",
        [],
    )? as u64)
}

/// Forgets every pending user (revert: in phase legacy the column is the truth for all).
/// Only the users whose column became empty, when `only_empty_columns` (and the rows of users
/// deleted outside keyrack).
pub(crate) fn backfill_clear(conn: &Connection, only_empty_columns: bool) -> Result<u64> {
    let sql = if only_empty_columns {
        "DELETE FROM legacy_backfill
         WHERE user_id NOT IN (SELECT id FROM users WHERE openai_api_key IS NOT NULL)"
    } else {
        "DELETE FROM legacy_backfill"
    };
    Ok(conn.execute(sql, params![])? as u64)
}

/// A database written by a version that kept one flag for the whole backfill: the users it
/// covered (every column key) become pending, and the flag goes.
/// One transaction, so that two processes starting at once cannot mark again a user that a
/// request of the first has settled in between.
pub(crate) fn upgrade_backfill_flag(conn: &Connection) -> Result<()> {
    if get(conn, OLD_BACKFILL_FLAG)?.is_none() {
        return Ok(());
    }
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    if get(&tx, OLD_BACKFILL_FLAG)?.is_some() {
        if column_present(&tx)? {
            backfill_start(&tx)?;
        }
        tx.execute(
            "DELETE FROM keyrack_meta WHERE name = ?1",
            [OLD_BACKFILL_FLAG],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Whether `users.openai_api_key` exists (it is dropped in phase new_only).
pub(crate) fn column_present(conn: &Connection) -> Result<bool> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('users') WHERE name = 'openai_api_key'",
        [],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Whether any sealed value is stored, in either store.
pub(crate) fn has_encrypted_values(conn: &Connection) -> Result<bool> {
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
pub(crate) fn stored_key_counts(conn: &Connection) -> Result<(u64, u64)> {
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

/// How many users there are (`keyrack backup` counts its copy).
pub(crate) fn user_count(conn: &Connection) -> Result<u64> {
    Ok(conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DbLocation;
    use crate::db::{self, Database};

    #[test]
    fn a_stored_phase_that_is_no_phase_is_named_as_such(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let db = Database::new(&DbLocation::Memory)?;
        let mut conn = db.connect()?;
        db::migrate_schema(&mut conn)?;
        set(&conn, PHASE, "halfway")?;
        match phase(&conn) {
            Err(StoreError::BadPhase { stored }) => assert_eq!(stored, "halfway"),
            other => panic!("expected BadPhase, got {other:?}"),
        }
        set_phase(&conn, Phase::NewOnly, "test")?;
        assert_eq!(phase(&conn)?, Phase::NewOnly);
        Ok(())
    }

    /// `settled` where the memo may answer: after another statement of the same snapshot.
    fn settled_in_a_read(store: &mut crate::store::Store) -> Result<Settled> {
        store.read(|c, ctx| {
            c.query_row("SELECT count(*) FROM users", [], |_| Ok(()))?;
            let first = settled(c, ctx.memo)?;
            // Asked twice in one snapshot: the same answer.
            assert_eq!(settled(c, ctx.memo)?, first);
            Ok(first)
        })
    }

    /// The memo of the phase is dropped by every commit to the database: another connection's,
    /// another process's (the same file), and the connection's own.
    #[test]
    fn the_memo_follows_every_commit_to_the_database(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        use crate::crypto::{EncryptionKey, KeyRing};
        use crate::store::{Shared, Store};
        use std::sync::Arc;
        let dir = tempfile::tempdir()?;
        for location in [
            DbLocation::Memory,
            DbLocation::File(dir.path().join("memo.db")),
        ] {
            let db = Database::new(&location)?;
            let mut other = db.connect()?;
            db::migrate_schema(&mut other)?;
            let ring = Arc::new(KeyRing::new(EncryptionKey::generate(), vec![]));
            let mut store = Store::new(db.connect()?, ring, Arc::new(Shared::default()));
            let unchanged = Settled {
                phase: Phase::Dual,
                any_pending: false,
            };
            assert_eq!(settled_in_a_read(&mut store)?, unchanged);
            assert_eq!(settled_in_a_read(&mut store)?, unchanged);

            set(&other, PHASE, "new_only")?;
            assert_eq!(
                settled_in_a_read(&mut store)?.phase,
                Phase::NewOnly,
                "{location:?}"
            );
            // The first statement of a snapshot: the data version is still the last snapshot's.
            set(&other, PHASE, "dual")?;
            let first = store.read(|c, ctx| settled(c, ctx.memo))?;
            assert_eq!(first.phase, Phase::Dual, "{location:?}");

            other.execute(
                "INSERT INTO users(email, password_hash, created_at) VALUES ('a@x.org', 'h', 0)",
                [],
            )?;
            let user = other.last_insert_rowid();
            other.execute("INSERT INTO legacy_backfill(user_id) VALUES (?1)", [user])?;
            let now = settled_in_a_read(&mut store)?;
            assert!(now.any_pending, "{location:?}");
            assert!(store.read(|c, ctx| settled(c, ctx.memo)?.backfill_pending(c, user))?);

            // The store's own connection commits (a write of its own, or a group it led).
            store.write_alone(|tx, _| set(tx, PHASE, "legacy"))?;
            assert_eq!(
                settled_in_a_read(&mut store)?.phase,
                Phase::Legacy,
                "{location:?}"
            );
            other.execute("DELETE FROM legacy_backfill", [])?;
            assert!(!settled_in_a_read(&mut store)?.any_pending, "{location:?}");
        }
        Ok(())
    }
}
