//! `keyrack export-legacy`: gives an adopted application its keys back in its own column, the
//! way back of `import-legacy`.
//!
//! Each keyrack user with an external id is matched to the application's row whose id (as
//! text) equals it; the row's key column gets the key `GET /user/api-key` reveals for the user
//! now (plaintext, or a Fernet token under the first key of `KEYRACK_LEGACY_FERNET_KEY`), or
//! NULL when the user has none (or it expired). Every key is read and opened before anything
//! is written: one that does not open refuses the whole export (exit 3). Then the confirmation,
//! a backup of the application's database, and one transaction on it that touches nothing but
//! that column. Rows of users whose key `import-legacy` skipped as unreadable are left alone
//! unless keyrack now holds a key for them.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::app::App;
use crate::backup::{self, BackupTo};
use crate::commands::{db_err, immediate, store_err};
use crate::domain::ApiKey;
use crate::import::{LegacyKeys, FERNET_VAR};
use crate::logging::printable;
use crate::store::export as sql;
use crate::store::{meta, now, StoreError};
use crate::Failure;

/// How the keys are written into the application's column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plaintext,
    Fernet,
}

/// What to export, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub to: PathBuf,
    pub format: Format,
    pub users_table: String,
    pub id_column: String,
    pub key_column: String,
    pub backup: Option<PathBuf>,
    pub dry_run: bool,
    pub yes: bool,
}

/// The counts of one export, as printed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Matched rows given a key.
    pub keys: u64,
    /// Matched rows set to NULL (the user has no key, or it expired).
    pub nulls: u64,
    /// Matched rows left alone: the import skipped their value as unreadable and keyrack holds
    /// no key for the user.
    pub left_unreadable: u64,
    /// Application rows with no keyrack user.
    pub rows_without_user: u64,
    /// keyrack users with an external id that no row has.
    pub users_without_row: u64,
    /// keyrack users without an external id.
    pub users_without_external_id: u64,
}

impl Counts {
    fn line(&self) -> String {
        format!(
            "keys {}, null {}, left alone (unreadable at import) {}, application rows without a keyrack user {}, keyrack users without a row {}, keyrack users without an external id {}",
            self.keys,
            self.nulls,
            self.left_unreadable,
            self.rows_without_user,
            self.users_without_row,
            self.users_without_external_id
        )
    }
}

/// One write planned: the application's row id as stored, and the key (None: NULL).
struct Write {
    id: rusqlite::types::Value,
    key: Option<ApiKey>,
}

/// Runs `keyrack export-legacy`.
pub fn run(app: &App, opts: &Options, fernet_keys: Option<&str>) -> Result<(), Failure> {
    let fernet = match opts.format {
        Format::Plaintext => None,
        Format::Fernet => {
            let keys = LegacyKeys::parse(fernet_keys)?;
            let Some(first) = keys.first() else {
                return Err(Failure::Config(format!(
                    "--format fernet seals with the first key of {FERNET_VAR}, which is not set; \
                     set it to the application's Fernet key(s); nothing was written"
                )));
            };
            Some(first.clone())
        }
    };
    let to = printable(&opts.to.display().to_string());
    if !opts.to.is_file() {
        return Err(Failure::Config(format!(
            "--to {to}: no such file; nothing was written"
        )));
    }
    if let Some(b) = &opts.backup {
        if std::fs::symlink_metadata(b).is_ok() {
            return Err(Failure::Config(format!(
                "--backup {}: the file already exists (a backup never replaces a file); give a new \
                 path; nothing was written",
                printable(&b.display().to_string())
            )));
        }
    }
    let app_conn = sql::open_app(&opts.to, false).map_err(|e| {
        Failure::Config(format!(
            "--to {to}: cannot read it as a SQLite database: {e}"
        ))
    })?;
    let (table, id_col, key_col) = resolve_columns(&app_conn, opts)?;
    let rows = sql::app_rows(&app_conn, &table, &id_col)
        .map_err(|e| Failure::store(format!("cannot read {to}"), e))?;
    drop(app_conn);

    // keyrack's side, in one read transaction: every key is opened before anything is written.
    let (writes, counts) = plan(app, &rows)?;
    let summary = counts.line();
    if opts.dry_run {
        println!(
            "dry run: export-legacy would write to {to} ({}): {summary}; nothing was written",
            format_name(opts.format)
        );
        return Ok(());
    }
    crate::commands::confirm(
        opts.yes,
        "export",
        &format!(
            "This writes the keys of {} users into {}.{} of {to} ({}), after a backup of it: {summary}",
            counts.keys + counts.nulls,
            printable(&table),
            printable(&key_col),
            format_name(opts.format)
        ),
        "export-legacy",
    )?;
    let mut conn = sql::open_app(&opts.to, true)
        .map_err(|e| Failure::Runtime(format!("cannot open {to} for writing: {e}")))?;
    let backup_to = match &opts.backup {
        Some(p) => BackupTo::Given(p.clone()),
        None => BackupTo::beside(&opts.to, ""),
    };
    let backup = backup_to.write(&conn).map_err(|e| match e {
        // A path it cannot use: a usage error, nothing written.
        backup::Error::Exists(_)
        | backup::Error::OwnFile(_)
        | backup::Error::CannotCreate(..)
        | backup::Error::NoFile => Failure::Config(e.to_string()),
        e => Failure::Runtime(format!("{e}; nothing was exported")),
    })?;
    log::info!(
        "export-legacy: the backup of {to} is {}",
        printable(&backup.display().to_string())
    );
    let tx = immediate(&mut conn)?;
    let names = (table.as_str(), id_col.as_str(), key_col.as_str());
    for w in &writes {
        let value = match (&w.key, &fernet) {
            (None, _) => None,
            (Some(k), None) => Some(zeroize::Zeroizing::new(k.expose().to_owned())),
            (Some(k), Some(f)) => Some(zeroize::Zeroizing::new(f.encrypt(k.expose().as_bytes()))),
        };
        sql::set_app_key(&tx, names, &w.id, value.as_deref().map(String::as_str)).map_err(|e| {
            Failure::store(
                format!("export-legacy: writing {to} failed, nothing was changed"),
                e,
            )
        })?;
    }
    tx.commit().map_err(db_err)?;
    let line = format!(
        "exported to {to} ({}): {summary}; the backup is {}",
        format_name(opts.format),
        printable(&backup.display().to_string())
    );
    log::info!("{line}");
    println!("{line}");
    Ok(())
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Plaintext => "plaintext",
        Format::Fernet => "fernet",
    }
}

/// What to write to each matched row, and the counts; a key that does not open refuses (3).
fn plan(app: &App, rows: &[sql::AppRow]) -> Result<(Vec<Write>, Counts), Failure> {
    let mut conn = app.db.connect().map_err(db_err)?;
    let tx = conn.transaction().map_err(db_err)?;
    let phase = meta::phase(&tx).map_err(store_err)?;
    let (holders, without_external) = sql::holders(&tx).map_err(store_err)?;
    let unreadable = sql::unreadable_at_import(&tx).map_err(store_err)?;
    let by_external: HashMap<&str, i64> = holders
        .iter()
        .map(|h| (h.external_id.as_str(), h.user_id))
        .collect();
    let mut counts = Counts {
        users_without_external_id: without_external,
        ..Counts::default()
    };
    let mut matched = std::collections::HashSet::new();
    let mut writes = Vec::new();
    let mut refused = Vec::new();
    let t = now();
    for row in rows {
        let Some(&user_id) = by_external.get(row.id.as_str()) else {
            counts.rows_without_user += 1;
            continue;
        };
        // Two rows with the same id as text are both written, the same way.
        matched.insert(user_id);
        match sql::revealed_openai(&tx, &app.ring, phase, user_id, t) {
            Ok(Some(key)) => {
                counts.keys += 1;
                writes.push(Write {
                    id: row.stored.clone(),
                    key: Some(key),
                });
            }
            Ok(None) if unreadable.contains(&user_id) => counts.left_unreadable += 1,
            Ok(None) => {
                counts.nulls += 1;
                writes.push(Write {
                    id: row.stored.clone(),
                    key: None,
                });
            }
            Err(e @ StoreError::KeyUnreadable { .. }) => refused.push(format!("{e}")),
            Err(e) => return Err(store_err(e)),
        }
    }
    counts.users_without_row = holders
        .iter()
        .filter(|h| !matched.contains(&h.user_id))
        .count() as u64;
    if !refused.is_empty() {
        let shown: Vec<&str> = refused.iter().take(20).map(String::as_str).collect();
        return Err(Failure::Refused(format!(
            "refused: {} keys do not open ({}{}); nothing was written. Configure the key they were \
             sealed with (KEYRACK_OLD_ENCRYPTION_KEYS), or settle them with `keyrack inspect` and \
             `keyrack clear-key` first",
            refused.len(),
            shown.join("; "),
            if refused.len() > 20 { "; …" } else { "" }
        )));
    }
    Ok((writes, counts))
}

/// The table and columns by the names the application's database declares; a missing one is a
/// usage error naming it.
fn resolve_columns(
    conn: &rusqlite::Connection,
    opts: &Options,
) -> Result<(String, String, String), Failure> {
    let table = crate::import::ForeignTable::find(
        conn,
        printable(&opts.to.display().to_string()),
        &opts.users_table,
        "; nothing was written",
    )?;
    let id = table.column(&opts.id_column, "--id-column")?;
    let key = table.column(&opts.key_column, "--key-column")?;
    Ok((table.name, id, key))
}
