//! The phase commands and the other one-shot commands of SPEC section 3. Each checks the
//! transition table (`phase::plan`) first, then does its work, saving the new phase in the same
//! transaction as the work that makes it true.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rusqlite::TransactionBehavior;

use crate::app::App;
use crate::config::DbLocation;
use crate::crypto::{Binding, EncryptionKey};
use crate::phase::{self, Command, Phase, Step};
use crate::status::{join_ids, Status};
use crate::store::keys::{self, Backfill};
use crate::store::{meta, StoreError};
use crate::Failure;

/// Users per Phase 1 transaction: small enough that a server sharing the file waits
/// milliseconds for the lock, large enough that syncs do not dominate.
const BATCH: i64 = 2_000;

fn db_err(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(format!("database error: {e}"))
}

fn store_err(e: StoreError) -> Failure {
    match e {
        StoreError::Busy => {
            Failure::Runtime("the database stayed locked past the time limit; try again".to_owned())
        }
        e => db_err(e),
    }
}

/// Progress on stderr, only when stderr is a terminal.
struct Progress {
    on: bool,
    start: Instant,
    what: &'static str,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        Progress {
            on: std::io::stderr().is_terminal(),
            start: Instant::now(),
            what,
        }
    }

    fn update(&self, done: u64) {
        if self.on {
            let secs = self.start.elapsed().as_secs_f64().max(0.001);
            eprint!(
                "\r{}: {done} rows, {:.0} rows/s   ",
                self.what,
                done as f64 / secs
            );
        }
    }

    fn finish(&self) {
        if self.on {
            eprintln!();
        }
    }
}

fn current_phase(app: &App) -> Result<Phase, Failure> {
    let conn = app.db.connect().map_err(db_err)?;
    meta::phase(&conn).map_err(store_err)
}

/// Phase 1. Returns the report line; fails (exit 1) when there were conflicts or failures.
pub fn migrate(app: &App) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    // The phase change is committed first, on its own: in phase dual every read already falls
    // back to the column, so nothing is missed while the backfill runs.
    {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let current = meta::phase(&tx).map_err(store_err)?;
        match phase::plan(Command::Migrate, current) {
            Step::AlreadyDone(m) => {
                println!("{m}");
                return Ok(());
            }
            Step::WrongPhase(m) => return Err(Failure::Refused(m)),
            Step::Run { target } => {
                if current == Phase::Legacy {
                    // The column was the source of truth: its values win over stale table rows.
                    meta::set_backfill_from_legacy(&tx, true).map_err(store_err)?;
                    let n = keys::undefault_stale_rows(&tx).map_err(store_err)?;
                    if n > 0 {
                        log::info!("{n} default OpenAI table keys of users whose column is empty are kept as extra keys");
                    }
                }
                meta::set_phase(&tx, target).map_err(store_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
    }

    let progress = Progress::new("migrate");
    let mut total = Backfill::default();
    let mut after = 0;
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let b =
            keys::backfill_batch(&tx, &app.ring, &app.usage, after, BATCH).map_err(store_err)?;
        tx.commit().map_err(db_err)?;
        total.migrated += b.migrated;
        total.already_migrated += b.already_migrated;
        total.conflicts += b.conflicts;
        total.failed += b.failed;
        total.users_seen += b.users_seen;
        b.conflict_ids
            .iter()
            .for_each(|&id| keys::sample(&mut total.conflict_ids, id));
        b.failed_ids
            .iter()
            .for_each(|&id| keys::sample(&mut total.failed_ids, id));
        progress.update(total.users_seen);
        match b.last_user_id {
            Some(id) => after = id,
            None => break,
        }
    }
    progress.finish();
    if total.failed == 0 {
        meta::set_backfill_from_legacy(&conn, false).map_err(store_err)?;
    }

    let line = format!(
        "migrated {}, already migrated {}, conflicts {}, failed {}",
        total.migrated, total.already_migrated, total.conflicts, total.failed
    );
    log::info!("{line}");
    println!("{line}");
    if !total.conflict_ids.is_empty() {
        println!("conflicts: user ids {}", join_ids(&total.conflict_ids));
    }
    if !total.failed_ids.is_empty() {
        println!(
            "failed (value does not decrypt): user ids {}",
            join_ids(&total.failed_ids)
        );
    }
    if total.conflicts > 0 || total.failed > 0 {
        return Err(Failure::Runtime(
            "migrate finished with conflicts or failures; see `keyrack status` and the README's troubleshooting".into(),
        ));
    }
    Ok(())
}

pub fn status(app: &App, json: bool) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    let status = Status::collect(&mut conn, &app.ring).map_err(store_err)?;
    if json {
        println!("{}", status.to_json());
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}

/// Asks for `word` on the terminal unless `--yes`. No terminal and no `--yes`: exit 2.
fn confirm(yes: bool, word: &str, what: &str) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Config(format!(
            "{what} needs confirmation: run it on a terminal and type `{word}`, or pass --yes; nothing was changed"
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

fn default_backup_path(db: &Path) -> PathBuf {
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]-[hour][minute][second]"
        ))
        .unwrap_or_else(|_| "backup".into());
    let mut s = db.as_os_str().to_owned();
    s.push(format!(".backup-{stamp}"));
    PathBuf::from(s)
}

fn refuse_with(survey: &keys::Survey) -> Failure {
    let mut msg = format!(
        "refused: the legacy column cannot be removed yet (unmigrated {}, conflicts {}, undecryptable {})",
        survey.unmigrated, survey.conflicts, survey.undecryptable
    );
    for line in survey.problem_lines() {
        msg.push('\n');
        msg.push_str(&line);
    }
    msg.push_str("\nrun `keyrack migrate` for unmigrated keys; see the README's troubleshooting for conflicts");
    Failure::Refused(msg)
}

/// Phase 3.
pub fn remove_legacy_column(
    app: &App,
    db: &DbLocation,
    yes: bool,
    backup: Option<&Path>,
) -> Result<(), Failure> {
    match phase::plan(Command::RemoveLegacyColumn, current_phase(app)?) {
        Step::AlreadyDone(m) => {
            println!("{m}");
            return Ok(());
        }
        Step::WrongPhase(m) => return Err(Failure::Refused(m)),
        Step::Run { .. } => {}
    }
    let mut conn = app.db.connect().map_err(db_err)?;
    let status = Status::collect(&mut conn, &app.ring).map_err(store_err)?;
    let s = &status.survey;
    if s.unmigrated > 0 || s.conflicts > 0 || s.undecryptable > 0 {
        return Err(refuse_with(s));
    }
    if !yes && !std::io::stdin().is_terminal() {
        return Err(Failure::Config(
            "remove-legacy-column needs confirmation: run it on a terminal and type `remove`, or pass --yes; nothing was changed".into(),
        ));
    }
    let DbLocation::File(db_path) = db else {
        return Err(Failure::Config(
            "remove-legacy-column needs a database file, not :memory:".into(),
        ));
    };
    let backup_path = backup.map_or_else(|| default_backup_path(db_path), Path::to_path_buf);
    if backup_path.exists() {
        return Err(Failure::Refused(format!(
            "refused: the backup file {} already exists; give another --backup PATH",
            backup_path.display()
        )));
    }
    // VACUUM INTO writes a consistent snapshot, whoever else is writing.
    crate::db::backup_to(&conn, &backup_path).map_err(|e| {
        Failure::Refused(format!(
            "refused: the backup to {} failed ({e}); nothing was changed",
            backup_path.display()
        ))
    })?;
    println!("backup written to {}", backup_path.display());
    confirm(
        yes,
        "remove",
        &format!(
            "This drops users.openai_api_key from {} ({} column keys, all in api_keys)",
            db_path.display(),
            s.column_keys
        ),
    )?;

    let start = Instant::now();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    // Check again under the write lock: a writer other than keyrack may have changed the column.
    match phase::plan(
        Command::RemoveLegacyColumn,
        meta::phase(&tx).map_err(store_err)?,
    ) {
        Step::AlreadyDone(m) => {
            println!("{m}");
            return Ok(());
        }
        Step::WrongPhase(m) => return Err(Failure::Refused(m)),
        Step::Run { target } => {
            let mut late = keys::Survey::default();
            for (uid, column, table) in keys::column_table_mismatches(&tx).map_err(store_err)? {
                let b = |p| Binding {
                    user_id: uid,
                    provider: p,
                };
                let c = app.ring.open(b("openai"), &column).ok();
                let t = table
                    .as_deref()
                    .and_then(|t| app.ring.open(b("openai"), t).ok());
                match (c, t, table.is_some()) {
                    (None, _, _) => late.undecryptable += 1,
                    (Some(_), None, false) => late.unmigrated += 1,
                    (Some(_), None, true) => late.undecryptable += 1,
                    (Some(c), Some(t), _) if c != t => late.conflicts += 1,
                    _ => {}
                }
            }
            if late.unmigrated + late.conflicts + late.undecryptable > 0 {
                return Err(refuse_with(&late));
            }
            keys::drop_column(&tx).map_err(store_err)?;
            meta::set_phase(&tx, target).map_err(store_err)?;
        }
    }
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

/// Back to phase legacy.
pub fn revert(app: &App, yes: bool) -> Result<(), Failure> {
    let before = current_phase(app)?;
    match phase::plan(Command::Revert, before) {
        Step::AlreadyDone(m) => {
            println!("{m}");
            return Ok(());
        }
        Step::WrongPhase(m) => return Err(Failure::Refused(m)),
        Step::Run { .. } => {}
    }
    confirm(yes, "revert", &format!(
        "This returns the database from phase {before} to phase legacy: only the default OpenAI keys stay reachable"
    ))?;
    let mut conn = app.db.connect().map_err(db_err)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let (written, stay) = match phase::plan(Command::Revert, meta::phase(&tx).map_err(store_err)?) {
        Step::AlreadyDone(m) => {
            println!("{m}");
            return Ok(());
        }
        Step::WrongPhase(m) => return Err(Failure::Refused(m)),
        Step::Run { target } => {
            let counts = keys::restore_column(&tx).map_err(store_err)?;
            meta::set_backfill_from_legacy(&tx, false).map_err(store_err)?;
            meta::set_phase(&tx, target).map_err(store_err)?;
            counts
        }
    };
    tx.commit().map_err(db_err)?;
    let line = format!(
        "reverted to phase legacy: {written} keys in the legacy column, {stay} table keys (other providers, extra keys) stay in api_keys unreachable until the next `keyrack migrate`"
    );
    log::info!("{line}");
    println!("{line}");
    Ok(())
}

/// Re-seals every value not sealed with the current key, in batches; a rerun resumes.
pub fn rotate_encryption_key(app: &App) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    let progress = Progress::new("rotate-encryption-key");
    let (mut resealed, mut failed, mut current) = (0u64, 0u64, 0u64);
    let mut failed_ids = Vec::new();
    for which in [keys::Sealed::Table, keys::Sealed::Column] {
        let mut after = 0i64;
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let batch =
                keys::reseal_batch(&tx, &app.ring, which, after, BATCH).map_err(store_err)?;
            tx.commit().map_err(db_err)?;
            resealed += batch.resealed;
            current += batch.current;
            failed += batch.failed;
            batch
                .failed_ids
                .iter()
                .for_each(|&id| keys::sample(&mut failed_ids, id));
            progress.update(resealed + current + failed);
            match batch.last_id {
                Some(id) => after = id,
                None => break,
            }
        }
    }
    progress.finish();
    if failed == 0 {
        meta::set_key_id(&conn, app.ring.current_id().as_str()).map_err(store_err)?;
    }
    let line = format!(
        "re-encrypted {resealed}, already under the current key {current}, failed {failed}"
    );
    log::info!("{line}");
    println!("{line}");
    if failed > 0 {
        println!("failed: user ids {}", join_ids(&failed_ids));
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
