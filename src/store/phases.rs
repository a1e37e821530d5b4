//! Whole-database work of the phase commands: the survey behind `status`, the backfill of
//! `migrate`, the last re-check of `remove-legacy-column`, the plan and the work of `revert`, and
//! the key ids in use. Every comparison of a user's column and table values goes through
//! `classify`, the rule the per-request code uses too.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::BTreeSet;

use super::classify::{classify, Verdict};
use super::keys::{insert_extra_openai_row, settle_user};
use super::{meta, Ctx, Result, Shared, StoreError};
use crate::crypto::{Binding, KeyId, KeyRing};
use crate::domain::{Provider, Secret};
use crate::phase::Phase;

const OPENAI: &str = Provider::OPENAI;

/// Up to this many user ids are named for each kind of problem.
pub(crate) const SAMPLE: usize = 20;

/// A count, and up to `SAMPLE` of the user ids counted, for a report: the shape of every
/// problem a phase command counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) count: u64,
    /// The first `SAMPLE` user ids counted, each once when counted in a row.
    pub(crate) ids: Vec<i64>,
}

impl Tally {
    /// Counts one more, for user `id`.
    pub(crate) fn add(&mut self, id: i64) {
        self.count += 1;
        self.sample(id);
    }

    /// Adds the count and ids of `other` (one batch's, to a whole run's).
    pub(crate) fn merge(&mut self, other: &Tally) {
        self.count += other.count;
        other.ids.iter().for_each(|&id| self.sample(id));
    }

    fn sample(&mut self, id: i64) {
        sample(&mut self.ids, id);
    }
}

/// Keeps up to `SAMPLE` user ids, each once when met in a row.
fn sample(ids: &mut Vec<i64>, id: i64) {
    if ids.len() < SAMPLE && ids.last() != Some(&id) {
        ids.push(id);
    }
}

fn opener(ring: &KeyRing, user_id: i64) -> impl Fn(&str) -> Option<Secret> + '_ {
    move |sealed| {
        ring.open(
            Binding {
                user_id,
                provider: OPENAI,
            },
            sealed,
        )
        .ok()
    }
}

/// Counts of the whole store, as `keyrack status` reports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Survey {
    pub(crate) users: u64,
    pub(crate) column_keys: u64,
    pub(crate) table_keys: u64,
    pub(crate) unmigrated: Tally,
    pub(crate) conflicts: Tally,
    pub(crate) undecryptable: Tally,
    /// Users still pending a backfill from phase legacy (the column wins for them).
    pub(crate) backfill_left: u64,
    /// The emails of the users the problem lists name, so that an operator can tell who they
    /// are.
    pub(crate) emails: std::collections::BTreeMap<i64, String>,
}

impl Survey {
    /// One line per kind of problem found: `unmigrated: user ids 3 (ada@example.com), 7 (…)`.
    pub(crate) fn problem_lines(&self) -> Vec<String> {
        [
            ("unmigrated", &self.unmigrated.ids),
            ("conflicts", &self.conflicts.ids),
            ("undecryptable", &self.undecryptable.ids),
        ]
        .into_iter()
        .filter(|(_, ids)| !ids.is_empty())
        .map(|(what, ids)| {
            let ids: Vec<String> = ids
                .iter()
                .map(|id| match self.emails.get(id) {
                    Some(e) => format!("{id} ({})", crate::logging::printable(e)),
                    None => id.to_string(),
                })
                .collect();
            format!("{what}: user ids {}", ids.join(", "))
        })
        .collect()
    }

    /// Looks up the emails of the users the problem lists name.
    fn name_users(&mut self, conn: &Connection) -> Result<()> {
        let ids: BTreeSet<i64> = [
            &self.unmigrated.ids,
            &self.conflicts.ids,
            &self.undecryptable.ids,
        ]
        .into_iter()
        .flatten()
        .copied()
        .collect();
        let mut stmt = conn.prepare_cached("SELECT email FROM users WHERE id = ?1")?;
        for id in ids {
            if let Some(email) = stmt.query_row([id], |r| r.get::<_, String>(0)).optional()? {
                self.emails.insert(id, email);
            }
        }
        Ok(())
    }

    /// Counts one user's column value as `classify` judged it (phase dual).
    fn count(&mut self, uid: i64, verdict: Verdict) {
        match verdict {
            Verdict::NoColumn => {}
            Verdict::InStep => {}
            Verdict::Unmigrated | Verdict::ColumnWins => self.unmigrated.add(uid),
            Verdict::Conflict => self.conflicts.add(uid),
            Verdict::ColumnUnreadable => self.undecryptable.add(uid),
            // Counted once, among the undecryptable table values.
            Verdict::TableUnreadable => {}
        }
    }
}

/// The column values of every user, with the default OpenAI table value and whether the user is
/// pending backfill; `only_mismatches` leaves out users whose two stores hold one sealed text.
fn column_rows_sql(only_mismatches: bool) -> &'static str {
    if only_mismatches {
        "SELECT u.id, u.openai_api_key, k.sealed_key, p.user_id IS NOT NULL FROM users u
         LEFT JOIN api_keys k ON k.user_id = u.id AND k.provider = 'openai' AND k.is_default = 1
         LEFT JOIN legacy_backfill p ON p.user_id = u.id
         WHERE u.openai_api_key IS NOT NULL AND u.openai_api_key IS NOT k.sealed_key
         ORDER BY u.id"
    } else {
        "SELECT u.id, u.openai_api_key, k.sealed_key, p.user_id IS NOT NULL FROM users u
         LEFT JOIN api_keys k ON k.user_id = u.id AND k.provider = 'openai' AND k.is_default = 1
         LEFT JOIN legacy_backfill p ON p.user_id = u.id
         WHERE u.openai_api_key IS NOT NULL ORDER BY u.id"
    }
}

type ColumnRow = (i64, String, Option<String>, bool);

fn column_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ColumnRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

/// Decrypts every stored value and compares the column with the table, streaming (memory does
/// not grow with the number of keys).
pub(crate) fn survey(conn: &Connection, ring: &KeyRing, phase: Phase) -> Result<Survey> {
    let mut s = Survey {
        users: conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?,
        backfill_left: meta::backfill_left(conn)?,
        ..Survey::default()
    };

    let mut stmt = conn.prepare("SELECT user_id, provider, sealed_key FROM api_keys")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        s.table_keys += 1;
        let (uid, provider, sealed): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let opens = ring
            .open(
                Binding {
                    user_id: uid,
                    provider: &provider,
                },
                &sealed,
            )
            .is_ok();
        if !opens {
            s.undecryptable.add(uid);
        }
    }

    if meta::column_present(conn)? {
        let mut stmt = conn.prepare(column_rows_sql(false))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (uid, column, table, pending) = column_row(r)?;
            s.column_keys += 1;
            if phase == Phase::Legacy {
                // The column is the source of truth; the table is not used.
                if opener(ring, uid)(&column).is_none() {
                    s.count(uid, Verdict::ColumnUnreadable);
                }
                continue;
            }
            s.count(
                uid,
                classify(Some(&column), table.as_deref(), pending, opener(ring, uid)),
            );
        }
    }
    s.name_users(conn)?;
    Ok(s)
}

/// Counts of one backfill batch (or of a whole `migrate`).
#[derive(Debug, Default, Clone)]
pub(crate) struct Backfill {
    pub(crate) migrated: u64,
    pub(crate) already_migrated: u64,
    pub(crate) conflicts: Tally,
    pub(crate) failed: Tally,
    /// The last user id looked at; `None` when there was nothing after `after`.
    pub(crate) last_user_id: Option<i64>,
    pub(crate) users_seen: u64,
}

impl Backfill {
    pub(crate) fn add(&mut self, b: &Backfill) {
        self.migrated += b.migrated;
        self.already_migrated += b.already_migrated;
        self.conflicts.merge(&b.conflicts);
        self.failed.merge(&b.failed);
        self.users_seen += b.users_seen;
    }

    fn count(&mut self, uid: i64, verdict: Verdict) {
        match verdict {
            Verdict::Unmigrated | Verdict::ColumnWins => self.migrated += 1,
            Verdict::InStep => self.already_migrated += 1,
            Verdict::Conflict => self.conflicts.add(uid),
            Verdict::ColumnUnreadable | Verdict::TableUnreadable => self.failed.add(uid),
            Verdict::NoColumn => {}
        }
    }
}

/// The start of Phase 1 from phase legacy, in the transaction that sets phase dual: the column
/// was the source of truth, so every user holding a column key is pending backfill (the column
/// wins for them until settled), and a default OpenAI row of a user whose column is empty (the
/// user removed the key in phase legacy) stays as an extra key, no longer the default. Returns
/// (users pending, rows no longer default).
pub(crate) fn start_backfill_from_legacy(tx: &Transaction<'_>) -> Result<(u64, u64)> {
    let pending = meta::backfill_start(tx)?;
    let undefaulted = tx.execute(
        "UPDATE api_keys SET is_default = 0
         WHERE provider = 'openai' AND is_default = 1
           AND user_id IN (SELECT id FROM users WHERE openai_api_key IS NULL)",
        [],
    )? as u64;
    Ok((pending, undefaulted))
}

/// One batch of Phase 1: settles the next `limit` users after `after` that hold a column key.
/// Runs in the caller's IMMEDIATE transaction.
pub(crate) fn backfill_batch(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    shared: &Shared,
    after: i64,
    limit: i64,
) -> Result<Backfill> {
    let ctx = Ctx {
        ring,
        usage: &shared.usage,
        actor: Some("command:migrate"),
        service: None,
        memo: None,
    };
    let mut b = Backfill::default();
    let batch: Vec<i64> = tx
        .prepare_cached(
            "SELECT id FROM users WHERE id > ?1 AND openai_api_key IS NOT NULL ORDER BY id LIMIT ?2",
        )?
        .query_map(params![after, limit], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for uid in batch {
        b.last_user_id = Some(uid);
        b.users_seen += 1;
        match settle_user(tx, &ctx, uid) {
            Ok((verdict, _)) => b.count(uid, verdict),
            Err(e @ StoreError::KeyUnreadable { .. }) => {
                log::error!("{e}");
                b.failed.add(uid);
            }
            Err(e) => return Err(e),
        }
    }
    if b.last_user_id.is_none() {
        // The end: users pending whose column is empty have nothing left to backfill.
        meta::backfill_clear(tx, true)?;
    }
    Ok(b)
}

/// What `migrate` would do, without writing (`--dry-run`): each column value as the backfill
/// would judge it. From phase legacy every column key would be pending (the column wins).
pub(crate) fn backfill_plan(conn: &Connection, ring: &KeyRing, phase: Phase) -> Result<Backfill> {
    let mut b = Backfill::default();
    let mut stmt = conn.prepare(column_rows_sql(false))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (uid, column, table, pending) = column_row(r)?;
        b.users_seen += 1;
        let pending = pending || phase == Phase::Legacy;
        b.count(
            uid,
            classify(Some(&column), table.as_deref(), pending, opener(ring, uid)),
        );
    }
    Ok(b)
}

/// The last check of `remove-legacy-column`, inside its final transaction: the users whose two
/// stores differ by sealed text, judged by `classify` (a writer other than keyrack may have
/// changed the column since the survey), and the users still pending backfill.
pub(crate) fn recheck_before_drop(tx: &Transaction<'_>, ring: &KeyRing) -> Result<Survey> {
    let mut s = Survey {
        backfill_left: meta::backfill_left(tx)?,
        ..Survey::default()
    };
    let mut stmt = tx.prepare(column_rows_sql(true))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (uid, column, table, pending) = column_row(r)?;
        let verdict = classify(Some(&column), table.as_deref(), pending, opener(ring, uid));
        if verdict == Verdict::TableUnreadable {
            // Not counted by the table pass here: count it now.
            s.undecryptable.add(uid);
        }
        s.count(uid, verdict);
    }
    drop(rows);
    drop(stmt);
    s.name_users(tx)?;
    Ok(s)
}

/// Phase 3: drops the legacy column (and keyrack's index on it first, which SQLite requires).
pub(crate) fn drop_column(tx: &Transaction<'_>) -> Result<()> {
    super::evidence::drop_triggers(tx)?;
    tx.execute_batch(
        "DROP INDEX IF EXISTS users_by_key_id; ALTER TABLE users DROP COLUMN openai_api_key",
    )?;
    Ok(())
}

/// The index of the legacy column's key ids (the table's is created by a schema migration; the
/// column comes and goes with the phase commands, so its index is kept here).
pub(crate) fn ensure_column_index(conn: &Connection) -> Result<()> {
    if meta::column_present(conn)? {
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS users_by_key_id ON users(substr(openai_api_key, 5, 16))",
        )?;
    }
    Ok(())
}

/// What `revert` writes into the column and what it keeps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RevertPlan {
    /// Default OpenAI table keys written into an empty column.
    pub(crate) written: u64,
    /// Column values that already hold the table's key.
    pub(crate) in_step: u64,
    /// Column values kept as they are: the table lacks them.
    pub(crate) kept_unmigrated: u64,
    /// Column values kept as they are: they do not open (undecryptable, sealed with a key that
    /// is not configured, not in keyrack's format).
    pub(crate) kept_unreadable: u64,
    /// Column values kept as they are: newer than the table's key (users pending backfill from
    /// phase legacy), or the table's key does not open.
    pub(crate) kept_newer: u64,
    /// Column values that conflict with the table's key: replaced by the table's key (the one
    /// served in phase dual), each first kept in `api_keys` as an extra OpenAI key.
    pub(crate) overwritten: Tally,
    /// Up to `SAMPLE` user ids of the kept values.
    pub(crate) kept_ids: Vec<i64>,
    /// Table keys that stay in `api_keys`, unreachable in phase legacy (other providers, extra
    /// keys, expired default keys), the extra keys `revert` adds included.
    pub(crate) table_stay: u64,
    /// Expired default OpenAI keys: not written into the column (phase legacy knows no expiry),
    /// and a column mirror of one is emptied; `api_keys` keeps them.
    pub(crate) expired: u64,
}

impl RevertPlan {
    pub(crate) fn kept(&self) -> u64 {
        self.kept_unmigrated + self.kept_unreadable + self.kept_newer
    }

    /// Keys in the legacy column once the revert is done.
    pub(crate) fn in_column(&self) -> u64 {
        self.written + self.in_step + self.kept() + self.overwritten.count
    }
}

/// The name of the extra key that keeps a conflicting column value `revert` replaces.
pub(crate) const KEPT_AT_REVERT: &str = "legacy column value kept at revert";

/// `revert`'s plan (`apply` false: nothing written) or its work (`apply` true, in the caller's
/// IMMEDIATE transaction, which also sets phase legacy): re-adds the column if it is gone, writes
/// each user's default OpenAI key into an empty column, keeps every column value the table lacks
/// or cannot replace exactly as it is, and replaces a conflicting one by the table's key after
/// keeping it in `api_keys` as an extra key. No key is lost; no row of `api_keys` is deleted.
pub(crate) fn revert(tx: &Connection, ring: &KeyRing, apply: bool) -> Result<RevertPlan> {
    let mut plan = RevertPlan::default();
    let column = meta::column_present(tx)?;
    if apply && !column {
        tx.execute_batch("ALTER TABLE users ADD COLUMN openai_api_key TEXT")?;
        ensure_column_index(tx)?;
        super::evidence::ensure_triggers(tx)?;
    }
    // An expired key is not written into the column (the table keeps it).
    let t = super::now();
    let defaults_sql = if column {
        "SELECT COUNT(*) FROM users u JOIN api_keys k ON k.user_id = u.id
         AND k.provider = 'openai' AND k.is_default = 1
         AND (k.expires_at IS NULL OR k.expires_at > ?1) WHERE u.openai_api_key IS NULL"
    } else {
        "SELECT COUNT(*) FROM api_keys WHERE provider = 'openai' AND is_default = 1
         AND (expires_at IS NULL OR expires_at > ?1)"
    };
    plan.written = tx.query_row(defaults_sql, [t], |r| r.get(0))?;
    let mut conflicts: Vec<(i64, String, String)> = Vec::new();
    if column {
        plan.in_step = tx.query_row(
            "SELECT COUNT(*) FROM users u JOIN api_keys k ON k.user_id = u.id
             AND k.provider = 'openai' AND k.is_default = 1
             AND (k.expires_at IS NULL OR k.expires_at > ?1)
             WHERE u.openai_api_key = k.sealed_key",
            [t],
            |r| r.get(0),
        )?;
        let mut stmt = tx.prepare(column_rows_sql(true))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (uid, column, table, pending) = column_row(r)?;
            match classify(Some(&column), table.as_deref(), pending, opener(ring, uid)) {
                Verdict::InStep | Verdict::NoColumn => {
                    plan.in_step += 1;
                    continue;
                }
                Verdict::Unmigrated => plan.kept_unmigrated += 1,
                Verdict::ColumnUnreadable => plan.kept_unreadable += 1,
                Verdict::ColumnWins | Verdict::TableUnreadable => plan.kept_newer += 1,
                Verdict::Conflict => {
                    plan.overwritten.add(uid);
                    if let (true, Some(t)) = (apply, table) {
                        conflicts.push((uid, column, t));
                    }
                    continue;
                }
            }
            sample(&mut plan.kept_ids, uid);
        }
    }
    plan.expired = tx.query_row(
        "SELECT COUNT(*) FROM api_keys WHERE provider = 'openai' AND is_default = 1
         AND expires_at <= ?1",
        [t],
        |r| r.get(0),
    )?;
    if apply {
        if column {
            tx.execute(
                "UPDATE users SET openai_api_key = NULL, keyrack_key_writes = keyrack_key_writes + 1
                 WHERE openai_api_key = (SELECT k.sealed_key FROM api_keys k
                     WHERE k.user_id = users.id AND k.provider = 'openai' AND k.is_default = 1
                       AND k.expires_at <= ?1)",
                [t],
            )?;
        }
        for (uid, column, table) in &conflicts {
            insert_extra_openai_row(tx, *uid, KEPT_AT_REVERT, column)?;
            tx.prepare_cached(
                "UPDATE users SET openai_api_key = ?2, keyrack_key_writes = keyrack_key_writes + 1
                 WHERE id = ?1",
            )?
            .execute(params![uid, table])?;
        }
        tx.execute(
            "UPDATE users SET openai_api_key = (
                 SELECT k.sealed_key FROM api_keys k
                 WHERE k.user_id = users.id AND k.provider = 'openai' AND k.is_default = 1
                   AND (k.expires_at IS NULL OR k.expires_at > ?1)),
                 keyrack_key_writes = keyrack_key_writes + 1
             WHERE openai_api_key IS NULL",
            [t],
        )?;
        meta::backfill_clear(tx, false)?;
    }
    let total: u64 = tx.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
    let defaults: u64 = tx.query_row(
        "SELECT COUNT(*) FROM api_keys WHERE provider = 'openai' AND is_default = 1
         AND (expires_at IS NULL OR expires_at > ?1)",
        [t],
        |r| r.get(0),
    )?;
    plan.table_stay = total - defaults + if apply { 0 } else { plan.overwritten.count };
    Ok(plan)
}

/// The ids of the keys that sealed the stored values, found by seeks on the key-id indexes
/// (a few per key in use), never by reading or decrypting every value. Values not in keyrack's
/// format name no key and are left out.
pub(crate) fn key_ids_in_use(conn: &Connection) -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    for (table, col) in stores(conn)? {
        let next_sql = format!(
            "SELECT min(substr({col}, 5, 16)) FROM {table} WHERE substr({col}, 5, 16) > ?1"
        );
        let sealed_sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE substr({col}, 5, 16) = ?1
             AND substr({col}, 1, 4) = 'kr1:' AND substr({col}, 21, 1) = ':')"
        );
        let mut after = String::new();
        while let Some(id) = conn
            .prepare_cached(&next_sql)?
            .query_row([&after], |r| r.get::<_, Option<String>>(0))?
        {
            let sealed: bool = conn
                .prepare_cached(&sealed_sql)?
                .query_row([&id], |r| r.get(0))?;
            if sealed {
                ids.insert(id.clone());
            }
            after = id;
        }
    }
    Ok(ids)
}

/// How many stored values were sealed with key `id` (an index range count).
pub(crate) fn count_sealed_with(conn: &Connection, id: &KeyId) -> Result<u64> {
    let mut n = 0;
    for (table, col) in stores(conn)? {
        n += conn.query_row(
            &format!(
                "SELECT COUNT(*) FROM {table} WHERE substr({col}, 5, 16) = ?1
                 AND substr({col}, 1, 4) = 'kr1:'"
            ),
            [id.as_str()],
            |r| r.get::<_, u64>(0),
        )?;
    }
    Ok(n)
}

fn stores(conn: &Connection) -> Result<Vec<(&'static str, &'static str)>> {
    let mut v = vec![("api_keys", "sealed_key")];
    if meta::column_present(conn)? {
        v.push(("users", "openai_api_key"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DbLocation;
    use crate::crypto::EncryptionKey;
    use crate::db::{self, Database};

    fn fresh() -> (Database, Connection) {
        let db = Database::new(&DbLocation::Memory).unwrap();
        let mut conn = db.connect().unwrap();
        db::migrate_schema(&mut conn).unwrap();
        ensure_column_index(&conn).unwrap();
        (db, conn)
    }

    fn user(conn: &Connection, id: i64, column: Option<&str>) {
        conn.execute(
            "INSERT INTO users(id, email, password_hash, openai_api_key, created_at)
             VALUES (?1, ?2, 'x', ?3, 0)",
            params![id, format!("u{id}@example.com"), column],
        )
        .unwrap();
    }

    fn default_row(conn: &Connection, id: i64, sealed: &str) {
        conn.execute(
            "INSERT INTO api_keys(user_id, provider, sealed_key, is_default, created_at, updated_at)
             VALUES (?1, 'openai', ?2, 1, 0, 0)",
            params![id, sealed],
        )
        .unwrap();
    }

    fn column(conn: &Connection, id: i64) -> Option<String> {
        conn.query_row(
            "SELECT openai_api_key FROM users WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    }

    fn seal(ring: &KeyRing, id: i64, key: &str) -> String {
        ring.seal(
            Binding {
                user_id: id,
                provider: OPENAI,
            },
            key,
        )
    }

    #[test]
    fn a_tally_counts_all_and_names_the_first_users_once_each() {
        let mut a = Tally::default();
        for id in [1, 1, 2] {
            a.add(id);
        }
        assert_eq!(
            a,
            Tally {
                count: 3,
                ids: vec![1, 2]
            }
        );
        let mut b = Tally::default();
        (3..40).for_each(|id| b.add(id));
        a.merge(&b);
        assert_eq!(a.count, 40);
        assert_eq!(a.ids, (1..=20).collect::<Vec<i64>>());
    }

    /// One user for each verdict, and their expected column after a revert.
    #[test]
    fn revert_writes_keeps_and_replaces_as_the_rule_says() {
        let (_db, conn) = fresh();
        let ring = KeyRing::new(EncryptionKey::generate(), vec![]);
        let other = KeyRing::new(EncryptionKey::generate(), vec![]);
        let t1 = seal(&ring, 1, "sk-table-1");
        user(&conn, 1, None); // empty column, default row: written
        default_row(&conn, 1, &t1);
        let t2 = seal(&ring, 2, "sk-same-2");
        user(&conn, 2, Some(&t2)); // in step
        default_row(&conn, 2, &t2);
        let c3 = seal(&ring, 3, "sk-column-only-3");
        user(&conn, 3, Some(&c3)); // unmigrated: kept
        let c4 = seal(&other, 4, "sk-unknown-key-4");
        user(&conn, 4, Some(&c4)); // undecryptable: kept
        default_row(&conn, 4, &seal(&ring, 4, "sk-table-4"));
        let c5 = seal(&ring, 5, "sk-newer-5");
        user(&conn, 5, Some(&c5)); // pending, newer: kept
        default_row(&conn, 5, &seal(&ring, 5, "sk-older-5"));
        conn.execute("INSERT INTO legacy_backfill VALUES (5)", [])
            .unwrap();
        let c6 = seal(&ring, 6, "sk-foreign-6");
        let t6 = seal(&ring, 6, "sk-table-6");
        user(&conn, 6, Some(&c6)); // conflict: replaced, kept as an extra row
        default_row(&conn, 6, &t6);
        user(&conn, 7, Some("sk-plaintext-7")); // not keyrack's format: kept

        let plan = revert(&conn, &ring, false).unwrap();
        let want = RevertPlan {
            written: 1,
            in_step: 1,
            kept_unmigrated: 1,
            kept_unreadable: 2,
            kept_newer: 1,
            overwritten: Tally {
                count: 1,
                ids: vec![6],
            },
            kept_ids: vec![3, 4, 5, 7],
            table_stay: 1,
            expired: 0,
        };
        assert_eq!(plan, want);
        assert_eq!(column(&conn, 1), None, "a plan writes nothing");

        let done = revert(&conn, &ring, true).unwrap();
        assert_eq!(done, want);
        assert_eq!(done.in_column(), 7);
        assert_eq!(column(&conn, 1), Some(t1));
        assert_eq!(column(&conn, 2), Some(t2));
        assert_eq!(column(&conn, 3), Some(c3));
        assert_eq!(column(&conn, 4), Some(c4));
        assert_eq!(column(&conn, 5), Some(c5));
        assert_eq!(column(&conn, 6), Some(t6));
        assert_eq!(column(&conn, 7).as_deref(), Some("sk-plaintext-7"));
        let kept: String = conn
            .query_row(
                "SELECT sealed_key FROM api_keys WHERE user_id = 6 AND is_default = 0 AND name = ?1",
                [KEPT_AT_REVERT],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept, c6);
        assert_eq!(meta::backfill_left(&conn).unwrap(), 0);
    }

    #[test]
    fn key_ids_in_use_are_found_without_decrypting() {
        let (_db, conn) = fresh();
        let a = KeyRing::new(EncryptionKey::generate(), vec![]);
        let b = KeyRing::new(EncryptionKey::generate(), vec![]);
        for id in 1..=50 {
            let col = seal(&a, id, "sk-a");
            user(&conn, id, Some(&col));
            default_row(&conn, id, &col);
        }
        user(&conn, 51, Some(&seal(&b, 51, "sk-b")));
        user(&conn, 52, Some("sk-plaintext-not-sealed"));
        user(&conn, 53, Some("kr1:short"));
        let ids = key_ids_in_use(&conn).unwrap();
        let want: BTreeSet<String> = [a.current_id(), b.current_id()]
            .into_iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(ids, want);
        assert_eq!(count_sealed_with(&conn, a.current_id()).unwrap(), 100);
        assert_eq!(count_sealed_with(&conn, b.current_id()).unwrap(), 1);
        // The lookups use the key-id indexes.
        for (table, col) in stores(&conn).unwrap() {
            let plan: String = conn
                .query_row(
                    &format!(
                        "EXPLAIN QUERY PLAN SELECT min(substr({col}, 5, 16)) FROM {table} \
                         WHERE substr({col}, 5, 16) > ''"
                    ),
                    [],
                    |r| r.get(3),
                )
                .unwrap();
            assert!(
                plan.contains("USING INDEX") || plan.contains("USING COVERING INDEX"),
                "{plan}"
            );
        }
    }
}
