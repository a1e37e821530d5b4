//! The phase commands and the other one-shot commands (docs/commands.md). Each checks the
//! transition table (`phase::plan`) first, then does its work, saving the new phase in the same
//! transaction as the work that makes it true.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use signal_hook::consts::{SIGINT, SIGTERM};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::app::App;
use crate::backup::{self, BackupTo};
use crate::config::DbLocation;
use crate::crypto::EncryptionKey;
use crate::phase::{self, Command, Phase, Step};
use crate::progress::Progress;
use crate::status::{join_ids, Status};
use crate::store::phases::{self, Backfill, RevertPlan, Survey, Tally};
use crate::store::rotation::{self, Sealed};
use crate::store::{meta, StoreError};
use crate::Failure;

/// Users per Phase 1 transaction (and keys per re-seal transaction): small enough that a server
/// sharing the file waits milliseconds for the lock, large enough that syncs do not dominate.
const BATCH: i64 = 2_000;

/// `BATCH`, or in debug builds only `KEYRACK_TEST_BATCH` (a positive number), so the test suite
/// can kill a run between two batches without building tens of thousands of users.
fn batch() -> i64 {
    crate::config::test_switch_positive("BATCH").unwrap_or(BATCH)
}

pub(crate) fn db_err(e: rusqlite::Error) -> Failure {
    store_err(StoreError::from(e))
}

pub(crate) fn store_err(e: StoreError) -> Failure {
    Failure::store("", e)
}

fn current_phase(app: &App) -> Result<Phase, Failure> {
    let conn = app.db.connect().map_err(db_err)?;
    meta::phase(&conn).map_err(store_err)
}

/// An IMMEDIATE transaction: the one kind a command writes in (a read-then-write never meets a
/// BUSY that no timeout cures).
pub(crate) fn immediate(conn: &mut Connection) -> Result<Transaction<'_>, Failure> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)
}

/// What `phase::plan` says `command` does in `current`: `Some(target)` to run; `None` when it
/// is already done (said on stdout, exit 0); in a wrong phase, the refusal (exit 3).
fn plan(command: Command, current: Phase) -> Result<Option<Phase>, Failure> {
    match phase::plan(command, current) {
        Step::Run { target } => Ok(Some(target)),
        Step::AlreadyDone(m) => {
            println!("{m}");
            Ok(None)
        }
        Step::WrongPhase(m) => Err(Failure::Refused(m)),
    }
}

/// Phase 1. Fails (exit 1) when there were conflicts or failures, or when interrupted.
pub fn migrate(app: &App, dry_run: bool) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    if dry_run {
        let tx = conn.transaction().map_err(db_err)?;
        let current = meta::phase(&tx).map_err(store_err)?;
        if plan(Command::Migrate, current)?.is_none() {
            return Ok(());
        }
        let plan = phases::backfill_plan(&tx, &app.ring, current).map_err(store_err)?;
        let first = if current == Phase::Dual {
            "dry run: phase is dual; migrate would copy".to_owned()
        } else {
            format!("dry run: migrate would set phase dual (now {current}) and copy")
        };
        println!(
            "{first}: migrated {}, already migrated {}, conflicts {}, failed {}; nothing was written",
            plan.migrated, plan.already_migrated, plan.conflicts.count, plan.failed.count
        );
        return finish_migrate(&plan);
    }
    // Ctrl-C or SIGTERM: finish the batch in flight, then say how far the backfill got.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;
    }
    // The phase change is committed first, on its own: in phase dual every request settles a
    // user pending backfill (the column wins) or a column-only key before answering, so nothing
    // stale is served while the backfill runs.
    {
        let tx = immediate(&mut conn)?;
        let current = meta::phase(&tx).map_err(store_err)?;
        let Some(target) = plan(Command::Migrate, current)? else {
            return Ok(());
        };
        if current == Phase::Legacy {
            let (pending, undefaulted) =
                phases::start_backfill_from_legacy(&tx).map_err(store_err)?;
            log::info!("{pending} users hold a column key: until the backfill reaches them, their column value wins");
            if undefaulted > 0 {
                log::info!("{undefaulted} default OpenAI table keys of users whose column is empty are kept as extra keys");
            }
        }
        meta::set_phase(&tx, target, "migrate").map_err(store_err)?;
        tx.commit().map_err(db_err)?;
    }

    let (column_keys, _) = meta::stored_key_counts(&conn).map_err(store_err)?;
    let progress = Progress::new("migrate", column_keys);
    let mut total = Backfill::default();
    let mut after = 0;
    loop {
        if stop.load(Ordering::Relaxed) {
            progress.finish();
            let left = meta::backfill_left(&conn).map_err(store_err)?;
            let rest = if left > 0 {
                format!("{left} users are still pending backfill from legacy (their legacy column value still wins)")
            } else {
                "column keys not copied yet are still served from the column".to_owned()
            };
            let line = format!(
                "migrate interrupted after {} users (migrated {}, already migrated {}, conflicts {}, failed {}); \
                 {rest}; run `keyrack migrate` again to finish",
                total.users_seen, total.migrated, total.already_migrated, total.conflicts.count, total.failed.count
            );
            log::warn!("{line}");
            println!("{line}");
            return Err(Failure::Runtime(
                "migrate was interrupted; nothing is lost, and a rerun finishes it".into(),
            ));
        }
        let tx = immediate(&mut conn)?;
        let b = phases::backfill_batch(&tx, &app.ring, &app.shared, after, batch())
            .map_err(store_err)?;
        tx.commit().map_err(db_err)?;
        total.add(&b);
        progress.update(total.users_seen);
        match b.last_user_id {
            Some(id) => after = id,
            None => break,
        }
    }
    progress.finish();

    let line = format!(
        "migrated {}, already migrated {}, conflicts {}, failed {}",
        total.migrated, total.already_migrated, total.conflicts.count, total.failed.count
    );
    log::info!("{line}");
    println!("{line}");
    let left = meta::backfill_left(&conn).map_err(store_err)?;
    if left > 0 {
        println!(
            "backfill from legacy unfinished: {left} users left (their values do not decrypt)"
        );
    }
    finish_migrate(&total)
}

fn finish_migrate(total: &Backfill) -> Result<(), Failure> {
    if !total.conflicts.ids.is_empty() {
        println!("conflicts: user ids {}", join_ids(&total.conflicts.ids));
    }
    if !total.failed.ids.is_empty() {
        println!("undecryptable: user ids {}", join_ids(&total.failed.ids));
    }
    if total.conflicts.count > 0 || total.failed.count > 0 {
        return Err(Failure::Runtime(
            "migrate finished with conflicts or failures; see `keyrack status` and docs/runbook.md's troubleshooting".into(),
        ));
    }
    Ok(())
}

pub fn status(app: &App, json: bool) -> Result<(), Failure> {
    let status = Status::collect(&mut app.store()?).map_err(store_err)?;
    if json {
        println!("{}", status.to_json());
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}

/// Asks for `word` on the terminal unless `--yes`. No terminal and no `--yes`: exit 2.
pub(crate) fn confirm(yes: bool, word: &str, what: &str, command: &str) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Config(format!(
            "{command} needs confirmation: run it on a terminal and type `{word}`, or pass --yes; nothing was changed"
        )));
    }
    eprint!("{what}. Type `{word}` to go on: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::Runtime(format!("cannot read the confirmation: {e}")))?;
    if line.trim() != word {
        return Err(Failure::Refused(
            "not confirmed; nothing was changed".into(),
        ));
    }
    Ok(())
}

/// A backup that a phase command could not write, in its terms: it refuses (exit 3) and
/// changes nothing.
fn backup_failure(command: &str, e: backup::Error) -> Failure {
    match e {
        backup::Error::NoFile => {
            Failure::Config(format!("{command} needs a database file, not :memory:"))
        }
        e @ backup::Error::Interrupted(_) => {
            Failure::Runtime(format!("{command}: {e}; nothing was changed"))
        }
        e => Failure::Refused(format!("refused: {e}; nothing was changed")),
    }
}

fn refuse_with(survey: &Survey) -> Failure {
    let mut msg = format!(
        "refused: the legacy column cannot be removed yet (unmigrated {}, conflicts {}, undecryptable {})",
        survey.unmigrated.count, survey.conflicts.count, survey.undecryptable.count
    );
    if survey.backfill_left > 0 {
        msg.push_str(&format!(
            "; backfill from legacy unfinished: {} users left",
            survey.backfill_left
        ));
    }
    for line in survey.problem_lines() {
        msg.push('\n');
        msg.push_str(&line);
    }
    msg.push_str("\nrun `keyrack migrate` for unmigrated keys; see docs/runbook.md's troubleshooting for conflicts");
    Failure::Refused(msg)
}

/// Phase 3 waits for a day without foreign writes of the column, unless the operator says
/// otherwise (`--ignore-foreign-writes`).
fn refuse_on_foreign_writes(
    e: &crate::store::evidence::Evidence,
    ignore: bool,
) -> Result<(), Failure> {
    match e.recent_foreign_write(crate::clock::now()) {
        Some(at) if !ignore => Err(Failure::Refused(format!(
            "refused: something other than keyrack wrote users.openai_api_key {} times since the \
             phase became dual, the last at {} (within the last 24 hours); find and stop that \
             writer first (`keyrack status` shows the counts), or pass --ignore-foreign-writes; \
             nothing was changed",
            e.foreign_column_writes,
            crate::clock::rfc3339(at)
        ))),
        _ => Ok(()),
    }
}

fn blocks_removal(s: &Survey) -> bool {
    s.unmigrated.count > 0
        || s.conflicts.count > 0
        || s.undecryptable.count > 0
        || s.backfill_left > 0
}

/// Phase 3.
pub fn remove_legacy_column(
    app: &App,
    db: &DbLocation,
    yes: bool,
    backup: Option<&Path>,
    dry_run: bool,
    ignore_foreign_writes: bool,
) -> Result<(), Failure> {
    if plan(Command::RemoveLegacyColumn, current_phase(app)?)?.is_none() {
        return Ok(());
    }
    let status = Status::collect(&mut app.store()?).map_err(store_err)?;
    let mut conn = app.db.connect().map_err(db_err)?;
    let s = &status.survey;
    print!("{}", status.evidence_text());
    if blocks_removal(s) {
        return Err(refuse_with(s));
    }
    refuse_on_foreign_writes(&status.evidence, ignore_foreign_writes)?;
    let fail = |e| backup_failure("remove-legacy-column", e);
    let backup_to = BackupTo::new(db, backup).map_err(fail)?;
    let DbLocation::File(db_path) = db else {
        unreachable!("BackupTo::new refuses :memory:")
    };
    if dry_run {
        backup_to.check().map_err(fail)?;
        println!(
            "dry run: the checks pass (unmigrated 0, conflicts 0, undecryptable 0); remove-legacy-column would write a backup to {}, then drop users.openai_api_key ({} column keys, all in api_keys) and set phase new_only; nothing was written",
            backup_to.describe(),
            s.column_keys
        );
        return Ok(());
    }
    confirm(
        yes,
        "remove",
        &format!(
            "This drops users.openai_api_key from {} ({} column keys, all in api_keys), after a backup to {}",
            db_path.display(),
            s.column_keys,
            backup_to.describe()
        ),
        "remove-legacy-column",
    )?;
    // VACUUM INTO writes a consistent snapshot, whoever else is writing.
    let backup_path = backup_to.write(&conn).map_err(fail)?;
    println!("backup written to {}", backup_path.display());

    let start = Instant::now();
    let tx = immediate(&mut conn)?;
    // Check again under the write lock: a writer other than keyrack may have changed the column.
    let Some(target) = plan(
        Command::RemoveLegacyColumn,
        meta::phase(&tx).map_err(store_err)?,
    )?
    else {
        return Ok(());
    };
    let late = phases::recheck_before_drop(&tx, &app.ring).map_err(store_err)?;
    if blocks_removal(&late) {
        return Err(refuse_with(&late));
    }
    let evidence = crate::store::evidence::read(&tx).map_err(store_err)?;
    refuse_on_foreign_writes(&evidence, ignore_foreign_writes)?;
    phases::drop_column(&tx).map_err(store_err)?;
    meta::set_phase(&tx, target, "remove-legacy-column").map_err(store_err)?;
    tx.commit().map_err(db_err)?;
    let line = format!(
        "removed the legacy column; phase is now new_only ({:.1}s); the backup is {}",
        start.elapsed().as_secs_f64(),
        backup_path.display()
    );
    log::info!("{line}");
    println!("{line}");
    Ok(())
}

/// What a revert writes and keeps, in words.
fn revert_lines(p: &RevertPlan, done: bool) -> Vec<String> {
    let (will, keeps, stays) = if done {
        ("", "kept", "stay")
    } else {
        ("would be ", "would be kept", "would stay")
    };
    let mut lines = vec![format!(
        "{} keys in the legacy column ({} {will}written from api_keys, {} already there, {} {keeps} as they were, {} conflicting {will}replaced by the api_keys key), {} table keys (other providers, extra keys) {stays} in api_keys unreachable until the next `keyrack migrate`",
        p.in_column(),
        p.written,
        p.in_step,
        p.kept(),
        p.overwritten.count,
        p.table_stay
    )];
    if p.kept() > 0 {
        lines.push(format!(
            "column values {keeps} as they were: {} not in api_keys, {} that do not decrypt, {} newer than api_keys; user ids {}",
            p.kept_unmigrated,
            p.kept_unreadable,
            p.kept_newer,
            join_ids(&p.kept_ids)
        ));
    }
    if p.overwritten.count > 0 {
        lines.push(format!(
            "conflicting column values {will}replaced by the api_keys key, each {keeps} first in api_keys as an extra OpenAI key named \"{}\": user ids {}",
            phases::KEPT_AT_REVERT,
            join_ids(&p.overwritten.ids)
        ));
    }
    if p.expired > 0 {
        lines.push(format!(
            "{} expired default OpenAI keys {stays} in api_keys only: phase legacy has no expiry, so they are not {will}written into the legacy column",
            p.expired
        ));
    }
    lines
}

/// Back to phase legacy.
pub fn revert(
    app: &App,
    db: &DbLocation,
    yes: bool,
    backup: Option<&Path>,
    dry_run: bool,
) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    let (before, preview) = {
        let tx = conn.transaction().map_err(db_err)?;
        let before = meta::phase(&tx).map_err(store_err)?;
        if plan(Command::Revert, before)?.is_none() {
            return Ok(());
        }
        (
            before,
            phases::revert(&tx, &app.ring, false).map_err(store_err)?,
        )
    };
    let fail = |e| backup_failure("revert", e);
    let backup_to = BackupTo::new(db, backup).map_err(fail)?;
    if dry_run {
        backup_to.check().map_err(fail)?;
        println!(
            "dry run: revert would write a backup to {}, then return the database from phase {before} to phase legacy:",
            backup_to.describe()
        );
        for line in revert_lines(&preview, false) {
            println!("{line}");
        }
        println!("nothing was written");
        return Ok(());
    }
    let mut what = format!(
        "This returns the database from phase {before} to phase legacy, after a backup to {}: {} keys from api_keys are written into the empty legacy column, {} conflicting column values are replaced by the api_keys key (each kept in api_keys first), {} column values the table lacks or cannot replace stay as they are; {} table keys stay in api_keys unreachable until the next `keyrack migrate`",
        backup_to.describe(),
        preview.written,
        preview.overwritten.count,
        preview.kept(),
        preview.table_stay
    );
    if before == Phase::Dual && preview.kept() + preview.overwritten.count == 0 {
        what.push_str("; only the default OpenAI keys stay reachable");
    }
    confirm(yes, "revert", &what, "revert")?;
    let backup_path = backup_to.write(&conn).map_err(fail)?;
    println!("backup written to {}", backup_path.display());

    let tx = immediate(&mut conn)?;
    let Some(target) = plan(Command::Revert, meta::phase(&tx).map_err(store_err)?)? else {
        return Ok(());
    };
    let done = phases::revert(&tx, &app.ring, true).map_err(store_err)?;
    meta::set_phase(&tx, target, "revert").map_err(store_err)?;
    tx.commit().map_err(db_err)?;
    let mut lines = revert_lines(&done, true);
    lines[0] = format!("reverted to phase legacy: {}", lines[0]);
    lines.push(format!("the backup is {}", backup_path.display()));
    for line in &lines {
        log::info!("{line}");
        println!("{line}");
    }
    Ok(())
}

/// Re-seals every value not sealed with the current key, in batches; a rerun resumes.
pub fn rotate_encryption_key(app: &App) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    // The configured key becomes the database's current key first: a server that holds it
    // switches to it at its next write, one that does not refuses writes (and says to restart),
    // so no value is sealed with the old key behind the rotation's back.
    let new = app.ring.configured_id().clone();
    let recorded = meta::key_id(&conn).map_err(store_err)?;
    if recorded.as_deref() != Some(new.as_str()) {
        meta::set_key_id(&conn, new.as_str()).map_err(store_err)?;
        log::info!("the database's current key is now key id {new}");
    }
    app.ring.switch_to(&new);
    let (column_keys, table_keys) = meta::stored_key_counts(&conn).map_err(store_err)?;
    let progress = Progress::new("rotate-encryption-key", column_keys + table_keys);
    let (mut resealed, mut current) = (0u64, 0u64);
    let mut failed = Tally::default();
    for which in [Sealed::Table, Sealed::Column] {
        let mut after = 0i64;
        loop {
            let tx = immediate(&mut conn)?;
            let batch =
                rotation::reseal_batch(&tx, &app.ring, which, after, batch()).map_err(store_err)?;
            tx.commit().map_err(db_err)?;
            resealed += batch.resealed;
            current += batch.current;
            failed.merge(&batch.failed);
            progress.update(resealed + current + failed.count);
            match batch.last_id {
                Some(id) => after = id,
                None => break,
            }
        }
    }
    progress.finish();
    let line = format!(
        "re-encrypted {resealed}, already under the current key {current}, failed {}",
        failed.count
    );
    log::info!("{line}");
    println!("{line}");
    if failed.count > 0 {
        println!("undecryptable: user ids {}", join_ids(&failed.ids));
        return Err(Failure::Runtime(
            "some values do not decrypt with the configured keys; add the missing key to KEYRACK_OLD_ENCRYPTION_KEYS and rerun".into(),
        ));
    }
    Ok(())
}

pub fn gen_key() {
    let key = EncryptionKey::generate();
    println!("{}", key.to_base64().as_str());
}

/// `keyrack reset-password EMAIL`: gives an account a new password (an imported account with no
/// usable hash, or a forgotten one) and ends its sessions. The password comes from a terminal
/// prompt (asked twice, not echoed) or, without a terminal, from the first line of stdin.
pub fn reset_password(app: &App, email: &str) -> Result<(), Failure> {
    let email = crate::domain::Email::parse(email)
        .map_err(|e| Failure::Config(format!("EMAIL: {}", e.message)))?;
    let password = read_new_password(email.as_str())?;
    let hash = crate::auth::hash_password(&password)
        .map_err(|e| Failure::Runtime(format!("password hashing failed: {e}")))?;
    let mut store = app.store()?;
    match store.reset_password(&email, &hash).map_err(store_err)? {
        Some(user) => {
            log::info!("user {}: password reset by reset-password", user.id);
            println!(
                "password set for {} (user {}); their sessions were ended",
                user.email, user.id
            );
            Ok(())
        }
        None => Err(Failure::Runtime(format!(
            "no user has the email {}; nothing was changed",
            email.as_str()
        ))),
    }
}

fn read_new_password(email: &str) -> Result<crate::domain::Password, Failure> {
    use crate::domain::{Password, Secret};
    let read_fail = |e: std::io::Error| Failure::Runtime(format!("cannot read the password: {e}"));
    let raw = if std::io::stdin().is_terminal() {
        let first = Secret::new(
            rpassword::prompt_password(format!("New password for {email}: ")).map_err(read_fail)?,
        );
        let again = Secret::new(rpassword::prompt_password("Again: ").map_err(read_fail)?);
        if first != again {
            return Err(Failure::Config(
                "the two passwords differ; nothing was changed".into(),
            ));
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(read_fail)?;
        let line = Secret::new(line);
        Secret::new(line.expose().trim_end_matches(['\n', '\r']).to_owned())
    };
    Password::parse(raw.expose()).map_err(|e| {
        Failure::Config(format!(
            "{} (stdin: the password on its first line); nothing was changed",
            e.message
        ))
    })
}
