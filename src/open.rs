//! What each command needs of its database, declared once, and the one way a command opens it.
//!
//! Every command that uses a database says here whether the file must exist or may be created,
//! whether it needs the encryption key, and whether it may apply schema migrations ([`NEEDS`]).
//! [`open`] then reads the database's schema version on a read-only connection before anything
//! opens the file for writing:
//!
//! - a schema newer than this binary knows: exit 2 naming both versions and the binary's;
//! - an older schema, for a command that may not apply migrations: exit 2 naming `keyrack
//!   upgrade`, and not a byte of the database's files changed;
//! - an older schema, for `serve`, `migrate` and `upgrade`: a backup beside the database first
//!   (`<db>.backup-<time>-schema-<n>`, mode 0600, logged), when the database holds any user and
//!   neither `--no-backup` nor `KEYRACK_UPGRADE_BACKUP=off` says otherwise; then the migrations.
//!   An existing database file (and its `-wal`, `-shm`) readable by others is made owner-only
//!   at that point, and the log says so: files keyrack creates are 0600, and older releases
//!   created some 0644.
//!
//! A plan (`--dry-run`) runs on an in-memory copy and only logs what it would apply.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::app::{App, Start};
use crate::config::{Config, DbLocation};
use crate::db::{self, Probe};
use crate::logging::printable;
use crate::Failure;

/// Whether the database file must exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// A `--db` path that does not exist: exit 2, nothing created.
    Existing,
    /// A new file is created at the current schema (and removed again if the command fails
    /// before it has done anything with it).
    MayCreate,
}

/// What one command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub database: Database,
    /// The encryption key: read, checked against the database's, created for a new database.
    pub key: bool,
    /// May apply pending schema migrations to an existing database.
    pub migrations: bool,
}

const fn needs(database: Database, key: bool, migrations: bool) -> Option<Needs> {
    Some(Needs {
        database,
        key,
        migrations,
    })
}

use Database::{Existing, MayCreate};

/// Every command by its name on the command line; `None`: it uses no database. A command
/// missing from this table does not run (`for_command` says so), so a new command must be
/// declared here.
pub const NEEDS: &[(&str, Option<Needs>)] = &[
    ("serve", needs(MayCreate, true, true)),
    ("migrate", needs(Existing, true, true)),
    ("upgrade", needs(Existing, false, true)),
    ("status", needs(Existing, true, false)),
    ("remove-legacy-column", needs(Existing, true, false)),
    ("revert", needs(Existing, true, false)),
    ("rotate-encryption-key", needs(Existing, true, false)),
    ("load-fixtures", needs(MayCreate, true, false)),
    ("backup", needs(Existing, false, false)),
    ("inspect", needs(Existing, true, false)),
    ("resolve", needs(Existing, true, false)),
    ("clear-key", needs(Existing, true, false)),
    ("audit", needs(Existing, false, false)),
    ("add-user", needs(Existing, true, false)),
    ("reset-password", needs(Existing, true, false)),
    ("export-legacy", needs(Existing, true, false)),
    // import-legacy builds its new database itself (`crate::import`), at the current schema.
    ("import-legacy", needs(MayCreate, true, false)),
    // The people and service-token commands (declared ahead of them): none reads a sealed value.
    ("users", needs(Existing, false, false)),
    ("delete-user", needs(Existing, false, false)),
    ("invite", needs(Existing, false, false)),
    ("service-token", needs(Existing, false, false)),
    ("gen-key", None),
    ("key-id", None),
    ("healthcheck", None),
    ("version", None),
];

/// The declaration of `command`; a command that is not declared is a bug, refused (exit 1).
pub fn for_command(command: &str) -> Result<Option<Needs>, Failure> {
    NEEDS
        .iter()
        .find(|(name, _)| *name == command)
        .map(|(_, n)| *n)
        .ok_or_else(|| {
            Failure::Runtime(format!(
                "the command {command} does not declare what it needs of the database (a bug)"
            ))
        })
}

/// How a migrating command runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A plan: everything on an in-memory copy, nothing written.
    pub dry_run: bool,
    /// `upgrade --no-backup` or `KEYRACK_UPGRADE_BACKUP=off`.
    pub no_backup: bool,
    /// `serve`: a fresh file's start-up is made durable after the ready line
    /// (`App::open_to_serve`).
    pub serving: bool,
}

/// What happened to the schema on the way in.
#[derive(Debug, Clone, Default)]
pub struct Opened {
    /// The schema version before and after (equal when nothing was applied).
    pub schema_before: i64,
    pub schema_after: i64,
    /// The upgrade backup written first, if any.
    pub backup: Option<PathBuf>,
}

/// The binary's own version, as `--version` prints it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Opens the database of `config` as `needs` says. The caller has already refused a file that
/// must exist and does not.
pub fn open(config: Config, needs: Needs, options: Options) -> Result<(App, Opened), Failure> {
    let current = db::binary_schema_version();
    let mut opened = Opened {
        schema_before: current,
        schema_after: current,
        backup: None,
    };
    let start = Start {
        migrations: true,
        key: needs.key,
    };
    let path = match &config.db {
        DbLocation::File(p) if p.exists() => p.clone(),
        // A new file or `:memory:`: created at the current schema.
        _ => return Ok((open_real(config, start, options)?, opened)),
    };
    let probe = probe_for(&path, needs, current)?;
    opened.schema_before = probe.schema_version;
    let older = probe.schema_version < current && !probe.empty;
    let start = Start {
        // A database of the current schema (or a new, empty file) never runs the migration
        // runner of a command that may not migrate: it would take the write lock.
        migrations: needs.migrations || probe.empty,
        key: needs.key,
    };
    if options.dry_run {
        return Ok((App::open_copy(config, start)?, opened));
    }
    if older {
        if probe.users > 0 && !options.no_backup {
            opened.backup = Some(upgrade_backup(&path, probe.schema_version)?);
        }
        owner_only(&path);
    }
    let app = open_real(config, start, options)?;
    opened.schema_after = current;
    if older {
        log::info!(
            "upgraded the schema of {} from version {} to {current}",
            printable(&path.display().to_string()),
            probe.schema_version
        );
    }
    Ok((app, opened))
}

fn check_not_newer(path: &Path, probe: &Probe, current: i64) -> Result<(), Failure> {
    if probe.schema_version > current {
        return Err(Failure::Config(format!(
            "the database {} has schema version {}, newer than this keyrack ({VERSION}) knows \
             (schema version {current}): use the keyrack release that upgraded it, or a newer \
             one; nothing was changed",
            printable(&path.display().to_string()),
            probe.schema_version
        )));
    }
    Ok(())
}

/// The schema of the existing file `path`, read on a read-only connection: a newer schema than
/// `current` exits 2 naming both; an older one exits 2 naming `keyrack upgrade` unless the
/// command may apply migrations.
fn probe_for(path: &Path, needs: Needs, current: i64) -> Result<db::Probe, Failure> {
    let probe = db::probe(path).map_err(|e| {
        Failure::Runtime(format!(
            "cannot read the database {}: {e}",
            printable(&path.display().to_string())
        ))
    })?;
    check_not_newer(path, &probe, current)?;
    if probe.schema_version < current && !probe.empty && !needs.migrations {
        return Err(Failure::Config(format!(
            "the database {} has schema version {} and this keyrack ({VERSION}) uses schema \
             version {current}: run `keyrack upgrade` first (it writes a backup, then applies the \
             schema migrations); nothing was changed",
            printable(&path.display().to_string()),
            probe.schema_version
        )));
    }
    Ok(probe)
}

/// For a command that opens the database itself (without `open`): refuses, as `open` would, a
/// database whose schema is newer than this binary's, or older when the command may not apply
/// migrations. Reads the schema on a read-only connection; writes nothing.
pub fn check_schema(db: &DbLocation, needs: Needs) -> Result<(), Failure> {
    let DbLocation::File(path) = db else {
        return Ok(());
    };
    if !path.exists() {
        return Ok(());
    }
    probe_for(path, needs, db::binary_schema_version())?;
    Ok(())
}

/// The real database (not a plan's copy), opened as a server or as a command opens it.
fn open_real(config: Config, start: Start, options: Options) -> Result<App, Failure> {
    if options.serving {
        App::open_to_serve(config, start)
    } else {
        App::open_with(config, start)
    }
}

/// `<db>.backup-<time>-schema-<n>`, `n` the schema the database had before.
fn upgrade_backup(path: &Path, schema: i64) -> Result<PathBuf, Failure> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Failure::Runtime(format!("cannot read the database for its backup: {e}")))?;
    let _ = conn.busy_timeout(db::BUSY_TIMEOUT);
    let written = crate::backup::BackupTo::beside(path, &format!("-schema-{schema}"))
        .write(&conn)
        .map_err(|e| {
            Failure::Runtime(format!(
                "{e}; the schema was not upgraded (KEYRACK_UPGRADE_BACKUP=off, or `keyrack \
                 upgrade --no-backup`, skips the backup)"
            ))
        })?;
    log::info!(
        "wrote the backup {} of schema version {schema} before upgrading the schema",
        printable(&written.display().to_string())
    );
    Ok(written)
}

/// Makes the database's files owner-only when an older release left them readable by others.
fn owner_only(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if !meta.is_file() || mode & 0o077 == 0 {
            continue;
        }
        let shown = printable(&p.display().to_string());
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o700)) {
            Ok(()) => log::warn!(
                "{shown} was readable by others (mode {mode:04o}); made it owner-only (mode {:04o})",
                mode & 0o700
            ),
            Err(e) => log::warn!(
                "{shown} is readable by others (mode {mode:04o}) and could not be made owner-only: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_serve_migrate_and_upgrade_apply_migrations() {
        let migrating: Vec<&str> = NEEDS
            .iter()
            .filter(|(_, n)| n.is_some_and(|n| n.migrations))
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(migrating, ["serve", "migrate", "upgrade"]);
        let creating: Vec<&str> = NEEDS
            .iter()
            .filter(|(_, n)| n.is_some_and(|n| n.database == MayCreate))
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(creating, ["serve", "load-fixtures", "import-legacy"]);
        for keyless in ["backup", "audit", "upgrade"] {
            assert!(!for_command(keyless).unwrap().unwrap().key, "{keyless}");
        }
        assert!(for_command("no-such-command").is_err());
    }
}
