//! The operator's instruments beside the phase commands: `backup`, `inspect` and `key-id`,
//! which read (or copy) the database and print, and the repairs `resolve` and `clear-key`,
//! which change one user's keys after a confirmation.

use std::path::Path;

use serde_json::{json, Value};

use crate::app::App;
use crate::backup::{self, BackupTo};
use crate::commands::{db_err, immediate, store_err};
use crate::config::{Config, DbLocation};
use crate::domain::Provider;
use crate::logging::printable;
use crate::store::events::{self, Event};
use crate::store::inspect::{self, KeyReport, Report, UserRef};
use crate::store::repair;
pub use crate::store::repair::{Keep, Stores};
use crate::store::{now, rfc3339, Source};
use crate::Failure;

/// `keyrack backup PATH`: a consistent copy of the database, written by `backup` (see there:
/// PATH holds a whole backup or nothing, whenever the command stops), mode 0600. A PATH that
/// exists is refused (exit 2) and left untouched.
pub fn backup(app: &App, db: &DbLocation, path: &Path) -> Result<(), Failure> {
    let to = BackupTo::new(db, Some(path)).map_err(backup_failure)?;
    let conn = app.db.connect().map_err(db_err)?;
    let written = to.write(&conn).map_err(backup_failure)?;
    match backup_counts(&written) {
        Ok((users, column, table)) => {
            let line = format!(
                "backup written to {}: {users} users, {} keys ({table} in api_keys, {column} in the legacy column)",
                printable(&written.display().to_string()),
                column + table
            );
            log::info!("{line}");
            println!("{line}");
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&written);
            Err(Failure::Runtime(format!(
                "the backup written to {} does not read back ({e}); it was removed",
                printable(&written.display().to_string())
            )))
        }
    }
}

/// A backup not written, as `keyrack backup` says it: a path it cannot use is a usage error
/// (exit 2), a copy that failed or was interrupted a run-time failure (exit 1).
fn backup_failure(e: backup::Error) -> Failure {
    match e {
        e @ (backup::Error::NoFile
        | backup::Error::OwnFile(_)
        | backup::Error::Exists(_)
        | backup::Error::CannotCreate(..)) => Failure::Config(format!("{e}; nothing was written")),
        e @ (backup::Error::Failed(..) | backup::Error::Interrupted(_)) => {
            Failure::Runtime(e.to_string())
        }
    }
}

/// The counts of the copy itself: (users, column keys, table keys).
fn backup_counts(path: &Path) -> Result<(u64, u64, u64), String> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    let users = crate::store::meta::user_count(&conn).map_err(|e| e.to_string())?;
    let (column, table) =
        crate::store::meta::stored_key_counts(&conn).map_err(|e| e.to_string())?;
    Ok((users, column, table))
}

/// `keyrack key-id`: the id of each configured key, the current one first. Uses no database:
/// with no key configured, the key file beside the database is read when it exists.
pub fn key_id(config: &Config) -> Result<(), Failure> {
    let mut lines = Vec::new();
    match &config.encryption_key {
        Some(k) => lines.push(format!(
            "{}  KEYRACK_ENCRYPTION_KEY (seals new values)",
            k.id()
        )),
        None => {
            match config.db.key_file().filter(|p| p.exists()) {
                Some(path) => {
                    let k = crate::app::read_key_file(&path)?;
                    lines.push(format!(
                        "{}  key file {} (seals new values)",
                        k.id(),
                        printable(&path.display().to_string())
                    ));
                }
                None => return Err(Failure::Config(
                    "no encryption key is configured: set KEYRACK_ENCRYPTION_KEY (or keep the key \
                     file <database>.key beside the database)"
                        .into(),
                )),
            }
        }
    }
    for (i, k) in config.old_encryption_keys.iter().enumerate() {
        lines.push(format!(
            "{}  KEYRACK_OLD_ENCRYPTION_KEYS, key {} (opens only)",
            k.id(),
            i + 1
        ));
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// `keyrack inspect USER [--json]`.
pub fn inspect(app: &App, who: &str, as_json: bool) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    let tx = conn.transaction().map_err(db_err)?;
    let Some(user) = inspect::find_user(&tx, &UserRef::parse(who)).map_err(store_err)? else {
        return Err(Failure::Runtime(format!(
            "no user {} (give an email or a user id)",
            printable(who.trim())
        )));
    };
    let report = inspect::report(&tx, &app.ring, user).map_err(store_err)?;
    drop(tx);
    if as_json {
        println!("{}", report_json(&report));
    } else {
        print!("{}", report_text(&report));
    }
    Ok(())
}

fn time_or_null(t: Option<i64>) -> Value {
    t.map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

fn key_json(k: &KeyReport) -> Value {
    json!({
        "id": k.id,
        "provider": k.provider,
        "name": k.name,
        "is_default": k.is_default,
        "store": k.store.as_str(),
        "sealed_with": k.sealed_with,
        "opens": k.opens,
        "why_not": k.why_not,
        "masked_key": k.masked_key,
        "created_at": time_or_null(k.created_at),
        "updated_at": time_or_null(k.updated_at),
        "last_used_at": time_or_null(k.last_used_at),
        "usage_count": k.usage_count,
        "expires_at": time_or_null(k.expires_at),
        "expired": k.expires_at.is_some_and(|t| t <= now()),
        "next": k.next,
    })
}

pub(crate) fn report_json(r: &Report) -> Value {
    json!({
        "user": {"id": r.user.id, "email": r.user.email},
        "phase": r.phase.as_str(),
        "backfill_pending": r.backfill_pending,
        "keys": r.keys.iter().map(key_json).collect::<Vec<_>>(),
    })
}

pub(crate) fn report_text(r: &Report) -> String {
    let mut out = format!(
        "user {} {}\nphase {}{}\n",
        r.user.id,
        printable(&r.user.email),
        r.phase,
        if r.backfill_pending {
            " (this user is pending backfill from legacy: the column wins)"
        } else {
            ""
        }
    );
    if r.keys.is_empty() {
        out.push_str("no keys\n");
    }
    for k in &r.keys {
        let id = k.id.map_or("column".to_owned(), |i| i.to_string());
        out.push_str(&format!(
            "\nkey {id}: {} {}{}\n  store        {}\n  sealed with  {}\n  opens        {}\n",
            printable(&k.provider),
            k.name.as_deref().map(printable).unwrap_or_default(),
            if k.is_default { " (default)" } else { "" },
            k.store.as_str(),
            k.sealed_with
                .as_deref()
                .map(printable)
                .unwrap_or_else(|| "(not keyrack's format)".into()),
            match (&k.masked_key, &k.why_not) {
                (Some(m), _) => format!("yes, {m}"),
                (None, Some(w)) => format!("no: {w}"),
                (None, None) => "no".to_owned(),
            }
        ));
        if k.created_at.is_some() {
            out.push_str(&format!(
                "  created      {}\n  updated      {}\n  last used    {}\n  uses         {}\n  expires      {}\n",
                time_or_null(k.created_at).as_str().unwrap_or("-"),
                time_or_null(k.updated_at).as_str().unwrap_or("-"),
                time_or_null(k.last_used_at).as_str().unwrap_or("never"),
                k.usage_count,
                time_or_null(k.expires_at).as_str().unwrap_or("never"),
            ));
        }
        out.push_str(&format!("  next         {}\n", k.next));
    }
    out
}

fn find(conn: &rusqlite::Connection, who: &str) -> Result<crate::store::users::User, Failure> {
    inspect::find_user(conn, &UserRef::parse(who))
        .map_err(store_err)?
        .ok_or_else(|| {
            Failure::Runtime(format!(
                "no user {} (give an email or a user id)",
                printable(who.trim())
            ))
        })
}

/// `keyrack resolve USER --keep column|table`: settles the user's conflict, keeping the other
/// value as an extra OpenAI key.
pub fn resolve(app: &App, who: &str, keep: Keep, yes: bool) -> Result<(), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    let user = find(&conn, who)?;
    let label = format!("user {} ({})", user.id, printable(&user.email));
    if !repair::has_conflict(&conn, &app.ring, user.id).map_err(store_err)? {
        println!("{label} has no conflict to resolve (see `keyrack inspect`); nothing was changed");
        return Ok(());
    }
    let (kept, other) = match keep {
        Keep::Column => ("the legacy column's value", "the api_keys value"),
        Keep::Table => ("the api_keys value", "the legacy column's value"),
    };
    crate::commands::confirm(
        yes,
        "resolve",
        &format!(
            "This makes {kept} the OpenAI key of {label} in both stores; {other} is kept as an extra OpenAI key named \"{}\"",
            repair::KEPT_AT_RESOLVE
        ),
        "resolve",
    )?;
    let tx = immediate(&mut conn)?;
    let done = repair::resolve(&tx, &app.ring, user.id, keep).map_err(store_err)?;
    if done {
        // The store whose value was replaced.
        let (id, source) = match keep {
            Keep::Column => (
                repair::default_openai_id(&tx, user.id).map_err(store_err)?,
                Source::Table,
            ),
            Keep::Table => (None, Source::Column),
        };
        events::record(
            &tx,
            &Event::new(events::KEY_REPLACED, events::command_actor("resolve"))
                .user(user.id)
                .key(id, Provider::OPENAI, source),
        )
        .map_err(store_err)?;
    }
    tx.commit().map_err(db_err)?;
    let line = if done {
        format!(
            "resolved the conflict of {label}: kept {kept}; {other} is kept as an extra OpenAI key"
        )
    } else {
        format!("{label} has no conflict any more; nothing was changed")
    };
    log::info!("{line}");
    println!("{line}");
    Ok(())
}

/// `keyrack clear-key USER [--provider P] [--store column|table|all]`: removes the values of
/// the user that do not open with the configured keys; a value that opens is never touched.
pub fn clear_key(
    app: &App,
    who: &str,
    provider: Option<&str>,
    stores: Stores,
    yes: bool,
) -> Result<(), Failure> {
    let provider = Provider::parse_or_default(provider)
        .map_err(|e| Failure::Config(format!("--provider: {}", e.message)))?;
    let mut conn = app.db.connect().map_err(db_err)?;
    let user = find(&conn, who)?;
    let label = format!("user {} ({})", user.id, printable(&user.email));
    let plan = repair::clear_unopenable(&conn, &app.ring, user.id, &provider, stores, false)
        .map_err(store_err)?;
    if plan.is_empty() {
        println!(
            "{label} has no {} value that fails to open in the chosen stores; nothing was changed",
            provider.as_str()
        );
        return Ok(());
    }
    let what: Vec<String> = plan
        .iter()
        .map(|u| format!("{} ({})", crate::store::place(u.store, u.id), u.reason))
        .collect();
    crate::commands::confirm(
        yes,
        "clear",
        &format!(
            "This removes {} value(s) of {label} that do not open: {}",
            plan.len(),
            what.join("; ")
        ),
        "clear-key",
    )?;
    let tx = immediate(&mut conn)?;
    let done = repair::clear_unopenable(&tx, &app.ring, user.id, &provider, stores, true)
        .map_err(store_err)?;
    for u in &done {
        events::record(
            &tx,
            &Event::new(events::KEY_DELETED, events::command_actor("clear-key"))
                .user(user.id)
                .key(u.id, provider.as_str(), u.store),
        )
        .map_err(store_err)?;
    }
    tx.commit().map_err(db_err)?;
    let line = format!(
        "cleared {} value(s) of {label} that do not open: {}",
        done.len(),
        done.iter()
            .map(|u| crate::store::place(u.store, u.id))
            .collect::<Vec<_>>()
            .join(", ")
    );
    log::info!("{line}");
    println!("{line}");
    Ok(())
}

/// `keyrack audit`: the recorded events, oldest first; `limit`: only the most recent ones.
pub fn audit(
    app: &App,
    who: Option<&str>,
    since: Option<&str>,
    limit: Option<i64>,
    as_json: bool,
) -> Result<(), Failure> {
    let since = since
        .map(|s| {
            crate::clock::parse_rfc3339(s).ok_or_else(|| {
                Failure::Config(
                    "--since must be an RFC 3339 time such as 2026-11-26T09:00:00Z".into(),
                )
            })
        })
        .transpose()?;
    if limit.is_some_and(|n| n < 1) {
        return Err(Failure::Config("--limit must be at least 1".into()));
    }
    let conn = app.db.connect().map_err(db_err)?;
    let user_id = match who {
        Some(w) => Some(find(&conn, w)?.id),
        None => None,
    };
    let mut list = events::newest_first(
        &conn,
        &events::Query {
            user_id,
            since,
            limit: limit.unwrap_or(i64::MAX),
        },
    )
    .map_err(store_err)?;
    list.reverse();
    let mut out = std::io::stdout().lock();
    for e in &list {
        let line = if as_json {
            e.to_json().to_string()
        } else {
            e.to_text()
        };
        use std::io::Write;
        writeln!(out, "{line}").map_err(|e| Failure::Runtime(format!("cannot write: {e}")))?;
    }
    Ok(())
}
