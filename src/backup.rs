//! The one writer of backups: `keyrack backup PATH`, and the backups `revert` and
//! `remove-legacy-column` write before their work.
//!
//! A backup's path holds a whole backup or nothing, whenever keyrack is stopped: the copy
//! (`VACUUM INTO`, a consistent snapshot while servers go on serving and writing) is written into
//! a new file under a temporary name beside it (`<path>.partial-<pid>`, never over an existing
//! file or through a symbolic link, readable by its owner only), synced, and only then given the
//! backup's name by a hard link, which never replaces a file. A kill (SIGKILL, a power cut) may
//! leave the temporary file and its journal beside the path, never a file at the path; the next
//! backup to the same path removes the ones whose process is gone. SIGINT and SIGTERM during the
//! copy interrupt it (SQLite's progress handler), remove the temporary file and end the command
//! (exit 1); outside a backup they keep their default action.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::config::DbLocation;
use crate::logging::printable;

/// Where a backup goes: a path given (`backup PATH`, `--backup PATH`), or beside the database,
/// named with the date and time (the phase commands' default).
pub(crate) enum BackupTo {
    Given(PathBuf),
    /// Beside the database, named with the date and time and then this suffix (a schema
    /// upgrade's backup: `-schema-<n>`).
    Beside(PathBuf, String),
}

/// Why a backup was not written. Each command says it in its own terms (`backup` exits 2 for a
/// path it cannot use, the phase commands refuse with exit 3).
#[derive(Debug)]
pub(crate) enum Error {
    /// The database is `:memory:`.
    NoFile,
    /// The path is one of the database's own files (journal, WAL, shared memory, key file).
    OwnFile(PathBuf),
    /// A file (or symbolic link) is at the path.
    Exists(PathBuf),
    /// The file cannot be created (no such folder, no permission).
    CannotCreate(PathBuf, std::io::Error),
    /// The copy failed; nothing is left at the path or beside it.
    Failed(PathBuf, String),
    /// SIGINT or SIGTERM stopped the copy; nothing is left at the path or beside it.
    Interrupted(PathBuf),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |p: &Path| printable(&p.display().to_string());
        match self {
            Error::NoFile => write!(f, "a backup needs a database file, not :memory:"),
            Error::OwnFile(p) => write!(
                f,
                "{} is one of the database's own files (its journal, WAL, shared-memory or key \
                 file: SQLite would delete or overwrite a copy there); give another path",
                show(p)
            ),
            Error::Exists(p) => write!(
                f,
                "{} already exists (a backup never replaces a file or follows a symbolic link); \
                 give a new path",
                show(p)
            ),
            Error::CannotCreate(p, e) => {
                write!(f, "cannot create the backup file {}: {e}", show(p))
            }
            Error::Failed(p, e) => write!(
                f,
                "the backup to {} failed ({e}); nothing was left there",
                show(p)
            ),
            Error::Interrupted(p) => write!(
                f,
                "interrupted; the backup to {} was not written and its temporary file was removed",
                show(p)
            ),
        }
    }
}

impl BackupTo {
    /// `given`, or beside the database `db`; a given path that is one of the database's own
    /// files is refused.
    pub(crate) fn new(db: &DbLocation, given: Option<&Path>) -> Result<BackupTo, Error> {
        let DbLocation::File(db_path) = db else {
            return Err(Error::NoFile);
        };
        Ok(match given {
            Some(p) if is_own_file(db_path, p) => return Err(Error::OwnFile(p.to_path_buf())),
            Some(p) => BackupTo::Given(p.to_path_buf()),
            None => BackupTo::Beside(db_path.clone(), String::new()),
        })
    }

    /// Beside the file `db`: `<db>.backup-<date>-<time><suffix>`.
    pub(crate) fn beside(db: &Path, suffix: &str) -> BackupTo {
        BackupTo::Beside(db.to_path_buf(), suffix.to_owned())
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            BackupTo::Given(p) => p.display().to_string(),
            BackupTo::Beside(db, suffix) => {
                format!("{}.backup-<date>-<time>{suffix}", db.display())
            }
        }
    }

    /// For a plan: refuses a given path as the real run would (a path that exists, a folder
    /// that does not), without creating anything.
    pub(crate) fn check(&self) -> Result<(), Error> {
        let BackupTo::Given(p) = self else {
            return Ok(());
        };
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(Error::Exists(p.clone()));
        }
        if !folder_of(p).is_dir() {
            return Err(Error::CannotCreate(
                p.clone(),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        Ok(())
    }

    /// The `n`th name tried for the backup (`n` > 1 only beside the database, when a backup of
    /// the same second exists).
    fn name(&self, n: u32, stamp: &str) -> PathBuf {
        match self {
            BackupTo::Given(p) => p.clone(),
            BackupTo::Beside(db, suffix) => {
                let mut s = db.as_os_str().to_owned();
                s.push(format!(".backup-{stamp}"));
                if n > 1 {
                    s.push(format!("-{n}"));
                }
                s.push(suffix);
                PathBuf::from(s)
            }
        }
    }

    /// Writes the backup of the database `conn` is connected to and returns its path (see the
    /// module's comment for what is at the path whenever keyrack stops).
    pub(crate) fn write(&self, conn: &rusqlite::Connection) -> Result<PathBuf, Error> {
        let stamp = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]-[hour][minute][second]"
            ))
            .unwrap_or_else(|_| "backup".into());
        let mut n = 1;
        let mut path = self.name(n, &stamp);
        while std::fs::symlink_metadata(&path).is_ok() {
            if matches!(self, BackupTo::Given(_)) || n >= 100 {
                return Err(Error::Exists(path));
            }
            n += 1;
            path = self.name(n, &stamp);
        }
        remove_stale(&path, ".partial-", "");
        let partial = with_suffix(&path, &format!(".partial-{}", std::process::id()));
        let signals = Signals::get().map_err(|e| Error::Failed(path.clone(), e))?;
        let during = signals.backup_begins();
        let file =
            create_new_owner_only(&partial).map_err(|e| Error::CannotCreate(path.clone(), e))?;
        let copied = copy(conn, &partial, &during).and_then(|()| {
            file.sync_all()
                .map_err(|e| CopyError::Failed(e.to_string()))
        });
        if let Err(e) = copied {
            remove_with_journal(&partial);
            return Err(match e {
                CopyError::Interrupted => {
                    during.consume();
                    Error::Interrupted(path)
                }
                CopyError::Failed(e) => Error::Failed(path, e),
            });
        }
        if during.caught() {
            remove_with_journal(&partial);
            during.consume();
            return Err(Error::Interrupted(path));
        }
        loop {
            match std::fs::hard_link(&partial, &path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if matches!(self, BackupTo::Given(_)) || n >= 100 {
                        remove_with_journal(&partial);
                        return Err(Error::Exists(path));
                    }
                    n += 1;
                    path = self.name(n, &stamp);
                }
                // A file system without hard links: a rename, after a last check.
                Err(_) if std::fs::symlink_metadata(&path).is_err() => {
                    if let Err(e) = std::fs::rename(&partial, &path) {
                        remove_with_journal(&partial);
                        return Err(Error::Failed(path, e.to_string()));
                    }
                    break;
                }
                Err(e) => {
                    remove_with_journal(&partial);
                    return Err(Error::Failed(path, e.to_string()));
                }
            }
        }
        remove_with_journal(&partial);
        // The new name is on disk before the command goes on.
        if let Ok(dir) = std::fs::File::open(folder_of(&path)) {
            let _ = dir.sync_all();
        }
        // A signal that came during the last steps ends the command now, the backup whole.
        drop(during);
        Ok(path)
    }
}

enum CopyError {
    Interrupted,
    Failed(String),
}

/// `VACUUM INTO` the empty file `partial`, interrupted when SIGINT or SIGTERM comes.
fn copy(conn: &rusqlite::Connection, partial: &Path, during: &During) -> Result<(), CopyError> {
    let caught = during.flag();
    // Every thousand virtual machine steps: a few microseconds of copying.
    conn.progress_handler(1000, Some(move || caught.load(Ordering::Relaxed) != 0));
    let copied = crate::db::backup_to(conn, partial);
    conn.progress_handler(0, None::<fn() -> bool>);
    match copied {
        Ok(()) if !during.caught() => Ok(()),
        Ok(()) => Err(CopyError::Interrupted),
        Err(_) if during.caught() => Err(CopyError::Interrupted),
        Err(e) => Err(CopyError::Failed(e.to_string())),
    }
}

/// The handlers of SIGINT and SIGTERM, installed once per process at its first backup. During a
/// backup they only note the signal (the copy stops at its next progress check); outside one,
/// the signal's default action runs (the process ends) as if no handler were installed.
struct Signals {
    /// The signal caught during the backup, 0 for none.
    caught: Arc<AtomicUsize>,
    /// No backup is being written: the default action runs.
    outside: Arc<AtomicBool>,
}

impl Signals {
    fn get() -> Result<&'static Signals, String> {
        static SIGNALS: OnceLock<Result<Signals, String>> = OnceLock::new();
        SIGNALS
            .get_or_init(|| {
                let s = Signals {
                    caught: Arc::new(AtomicUsize::new(0)),
                    outside: Arc::new(AtomicBool::new(true)),
                };
                for sig in [SIGINT, SIGTERM] {
                    // A signal the process was started ignoring (a background job of a script)
                    // stays ignored, during a backup too.
                    if ignored(sig) {
                        continue;
                    }
                    // The default action first: outside a backup the process ends there.
                    signal_hook::flag::register_conditional_default(sig, s.outside.clone())
                        .and_then(|_| {
                            signal_hook::flag::register_usize(sig, s.caught.clone(), sig as usize)
                        })
                        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
                }
                Ok(s)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn backup_begins(&'static self) -> During {
        self.caught.store(0, Ordering::SeqCst);
        self.outside.store(false, Ordering::SeqCst);
        During(self)
    }
}

/// Whether the process ignores `sig` (its disposition is `SIG_IGN`).
fn ignored(sig: i32) -> bool {
    // SAFETY: sigaction with no new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// A backup being written: SIGINT and SIGTERM are noted, not acted on. When it ends, a signal
/// noted and not consumed (by an `Interrupted` answer) is raised again, to its default action.
struct During(&'static Signals);

impl During {
    fn flag(&self) -> Arc<AtomicUsize> {
        self.0.caught.clone()
    }

    fn caught(&self) -> bool {
        self.0.caught.load(Ordering::SeqCst) != 0
    }

    /// The signal is answered (the command ends with `Interrupted`): not raised again.
    fn consume(&self) {
        self.0.caught.store(0, Ordering::SeqCst);
    }
}

impl Drop for During {
    fn drop(&mut self) {
        self.0.outside.store(true, Ordering::SeqCst);
        let sig = self.0.caught.swap(0, Ordering::SeqCst);
        if sig != 0 {
            let _ = signal_hook::low_level::raise(sig as i32);
        }
    }
}

/// A new, empty file, mode 0600; an existing file or a symbolic link at `path` is refused
/// (O_EXCL never follows one). SQLite's `VACUUM INTO` then writes into the empty file.
fn create_new_owner_only(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Removes the temporary files beside `target` named `<target file name><infix><pid><suffix>`
/// (and their journal, WAL and shared-memory files) left by processes that are gone (or by this
/// one's id, reused), so that a kill leaves at most one such file per path until the next run.
/// A temporary file of a process still running is left alone.
pub(crate) fn remove_stale(target: &Path, infix: &str, suffix: &str) {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(folder_of(target)) else {
        return;
    };
    let prefix = format!("{name}{infix}");
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 0 || (pid as u32 != std::process::id() && alive(pid)) {
            continue;
        }
        let path = entry.path();
        log::info!(
            "removing {}, left by an interrupted run (process {pid})",
            printable(&path.display().to_string())
        );
        remove_with_journal(&path);
    }
}

/// Whether process `pid` exists (a signal 0 reaches it, or it exists under another user).
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes `path` and the journal, WAL and shared-memory files SQLite may have made beside it.
pub(crate) fn remove_with_journal(path: &Path) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(path, suffix));
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

fn folder_of(p: &Path) -> &Path {
    match p.parent() {
        Some(f) if !f.as_os_str().is_empty() => f,
        _ => Path::new("."),
    }
}

/// Whether `path` names the database, its journal, WAL or shared-memory file, or its key file,
/// however it is written (relative, through `..` or a linked folder).
fn is_own_file(db: &Path, path: &Path) -> bool {
    let resolve = |p: &Path| -> Option<PathBuf> {
        Some(
            std::fs::canonicalize(folder_of(p))
                .ok()?
                .join(p.file_name()?),
        )
    };
    let (Some(db), Some(path)) = (resolve(db), resolve(path)) else {
        return false;
    };
    ["", "-journal", "-wal", "-shm", ".key"]
        .iter()
        .any(|suffix| {
            let mut own = db.clone().into_os_string();
            own.push(suffix);
            own == path.as_os_str()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporary_files_of_gone_processes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("b.db");
        // A process id that is not running: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let live = std::os::unix::process::parent_id();
        for name in [
            format!("b.db.partial-{gone}"),
            format!("b.db.partial-{gone}-journal"),
            format!("b.db.partial-{live}"),
            "b.db.partial-x".to_owned(),
            "other.db.partial-1".to_owned(),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        remove_stale(&target, ".partial-", "");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!("b.db.partial-{live}"),
                "b.db.partial-x".to_owned(),
                "other.db.partial-1".to_owned()
            ]
        );
    }
}
