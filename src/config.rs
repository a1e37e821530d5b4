//! Configuration: command-line flag, then environment variable, then the `.env` file, then the
//! default (docs/configuration.md). Values are checked here; an invalid one is a
//! `ConfigError` whose message names the setting and what would be valid (exit 2).
//!
//! The `.env` file is read into a map, never into the process environment, so that a real
//! environment variable always wins over it.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::crypto::EncryptionKey;
use crate::domain::Secret;
use zeroize::Zeroizing;

/// A configuration error: one line for stderr, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where settings come from, in order: the process environment, then the `.env` file.
pub struct Lookup {
    dotenv: HashMap<String, String>,
}

impl Lookup {
    /// Reads `--env-file PATH` (which must exist), else `./.env` when it exists.
    pub fn load(env_file: Option<&Path>) -> Result<Lookup, ConfigError> {
        let path = match env_file {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let p = PathBuf::from(".env");
                p.exists().then_some(p)
            }
        };
        let mut dotenv = HashMap::new();
        if let Some(path) = path {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError(format!(
                    "--env-file: cannot read {}: {e}; give a readable .env file",
                    path.display()
                ))
            })?;
            for item in dotenvy::from_read_iter(text.as_bytes()) {
                let (k, v) = item.map_err(|e| {
                    ConfigError(format!(
                        "--env-file: {} is not a valid .env file: {}",
                        path.display(),
                        describe_dotenv_error(&text, &e)
                    ))
                })?;
                dotenv.insert(k, v);
            }
        }
        Ok(Lookup { dotenv })
    }

    #[cfg(test)]
    fn from_map(dotenv: HashMap<String, String>) -> Lookup {
        Lookup { dotenv }
    }

    /// The value of `name` from the environment, else from the `.env` file; empty counts as unset.
    /// (docker-compose passes `${VAR}` of an unset variable as an empty one: it must not hide
    /// the `.env` value.)
    pub fn get(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| self.dotenv.get(name).cloned())
            .filter(|v| !v.is_empty())
    }
}

/// Where a `.env` file went wrong: the line number and the variable, never the line itself
/// (it may hold the encryption key or the admin token).
fn describe_dotenv_error(text: &str, e: &dotenvy::Error) -> String {
    let dotenvy::Error::LineParse(logical, _) = e else {
        return e.to_string();
    };
    // dotenvy stops at the first bad line and gives back its text: find where it starts.
    let logical = logical.trim_end_matches(['\r', '\n']);
    let at = text
        .match_indices(logical)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n');
    let line = at.map(|i| text[..i].matches('\n').count() + 1);
    let stripped = logical.trim_start();
    let stripped = stripped
        .strip_prefix("export ")
        .unwrap_or(stripped)
        .trim_start();
    let name: String = stripped
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
        .collect();
    let whose = if name.is_empty() || !stripped[name.len()..].trim_start().starts_with('=') {
        "it is not a NAME=value line".to_owned()
    } else {
        format!("the value of {name} cannot be read (check its quotes and escapes)")
    };
    match line {
        Some(n) => format!("line {n}: {whose}"),
        None => whose,
    }
}

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// A throwaway database shared by every worker, gone at exit.
    Memory,
    File(PathBuf),
}

impl DbLocation {
    fn parse(raw: &str) -> DbLocation {
        if raw == ":memory:" {
            DbLocation::Memory
        } else {
            DbLocation::File(PathBuf::from(raw))
        }
    }

    /// `<db path>.key`, the key file used when no key is configured.
    pub fn key_file(&self) -> Option<PathBuf> {
        match self {
            DbLocation::Memory => None,
            DbLocation::File(p) => {
                let mut s = p.clone().into_os_string();
                s.push(".key");
                Some(PathBuf::from(s))
            }
        }
    }
}

/// Settings every command needs.
#[derive(Debug)]
pub struct Config {
    pub db: DbLocation,
    pub encryption_key: Option<EncryptionKey>,
    pub old_encryption_keys: Vec<EncryptionKey>,
    pub admin_token: Option<Secret>,
    pub session_ttl_secs: i64,
    pub log_filter: String,
    /// `KEYRACK_SIGNUPS`: whether POST /auth/register creates accounts.
    pub signups_open: bool,
    /// `KEYRACK_MAX_KEYS_PER_USER`: most `api_keys` rows one user may create.
    pub max_keys_per_user: i64,
    /// `KEYRACK_BUSY_TIMEOUT`: how long a statement waits for a lock another process holds.
    pub busy_timeout: std::time::Duration,
    /// `KEYRACK_AUDIT_DAYS`: events older than this many days are pruned.
    pub audit_days: i64,
    /// `KEYRACK_AUDIT_FOLD_SECONDS`: the window over which one actor's reads of one key are one
    /// event.
    pub audit_fold_secs: i64,
    /// `KEYRACK_WRITE_RATE`: the writes one account may make per minute (bursts up to as many).
    pub write_rate_per_minute: u32,
    /// `KEYRACK_LOGIN_FAILURES_PER_ADDRESS`: failed logins from one client address within the
    /// throttle's window before its logins are refused; 0 turns this throttle off.
    pub login_failures_per_address: usize,
}

/// Default of `KEYRACK_AUDIT_FOLD_SECONDS`: an hour.
pub const DEFAULT_AUDIT_FOLD_SECONDS: i64 = 3600;

/// Default of `KEYRACK_WRITE_RATE`: far above what a person or a script that manages keys does,
/// low enough that one account's events stay small (docs/operations.md).
pub const DEFAULT_WRITE_RATE: u32 = 600;

/// Default of `KEYRACK_AUDIT_DAYS`.
pub const DEFAULT_AUDIT_DAYS: i64 = 365;

/// Default of `KEYRACK_MAX_KEYS_PER_USER`.
pub const DEFAULT_MAX_KEYS_PER_USER: i64 = 1_000;

/// Settings of `serve` only.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Threads that take requests from the connections and serve the reads.
    pub workers: usize,
    /// `KEYRACK_WRITE_WORKERS`: threads that serve the writes (POST, PUT, PATCH, DELETE).
    pub write_workers: usize,
    /// The HTTP layer's timeouts.
    pub timeouts: HttpTimeouts,
    /// `KEYRACK_METRICS_REFRESH`: the least time between two background counts of the
    /// undecryptable values (`http::surveyor`), run only when the database changed.
    pub metrics_refresh: std::time::Duration,
    /// `--exit-with-parent` / `KEYRACK_EXIT_WITH_PARENT`: stop (as on SIGTERM) when the process
    /// that started the server is gone.
    pub exit_with_parent: bool,
    /// The process that started keyrack, as it was when the settings were read (early).
    pub parent_pid: u32,
}

/// Default of `KEYRACK_METRICS_REFRESH`.
pub const DEFAULT_METRICS_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// A switch of the test suite, `KEYRACK_TEST_<name>` (trimmed), read in debug builds only:
/// release builds never see one, whatever the environment holds. Each switch only makes a test
/// quicker (a moved clock, a cheaper password hash, a lower connection cap, smaller batches) or
/// lets it hold a state long enough to look at it (a slow password hash, a short hashing queue).
pub(crate) fn test_switch(name: &str) -> Option<String> {
    if cfg!(debug_assertions) {
        std::env::var(format!("KEYRACK_TEST_{name}"))
            .ok()
            .map(|v| v.trim().to_owned())
    } else {
        None
    }
}

/// A test switch holding a positive number (`test_switch`); `None` when unset, not a number, or
/// not above zero.
pub(crate) fn test_switch_positive<T: std::str::FromStr + PartialOrd + Default>(
    name: &str,
) -> Option<T> {
    test_switch(name)
        .and_then(|v| v.parse::<T>().ok())
        .filter(|n| *n > T::default())
}

/// How long the HTTP layer waits for a client (`KEYRACK_SOCKET_TIMEOUT`,
/// `KEYRACK_HEAD_TIMEOUT`, `KEYRACK_IDLE_TIMEOUT`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpTimeouts {
    /// Each read or write on a socket.
    pub socket: std::time::Duration,
    /// A request head and a body of up to 64 KiB, from the head's first byte.
    pub head: std::time::Duration,
    /// A keep-alive connection waiting for its next request.
    pub idle: std::time::Duration,
}

impl HttpTimeouts {
    fn resolve(lookup: &Lookup) -> Result<HttpTimeouts, ConfigError> {
        let ten = std::time::Duration::from_secs(10);
        Ok(HttpTimeouts {
            socket: seconds(lookup, "KEYRACK_SOCKET_TIMEOUT", ten)?,
            head: seconds(lookup, "KEYRACK_HEAD_TIMEOUT", ten)?,
            idle: seconds(lookup, "KEYRACK_IDLE_TIMEOUT", ten)?,
        })
    }
}

/// A timeout setting: seconds, fractions allowed, from 0.1 to 3600.
fn seconds(
    lookup: &Lookup,
    name: &str,
    default: std::time::Duration,
) -> Result<std::time::Duration, ConfigError> {
    let Some(v) = lookup.get(name) else {
        return Ok(default);
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| (0.1..=3600.0).contains(n))
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| {
            ConfigError(format!(
                "{name}={v:?} is not valid; give a number of seconds from 0.1 to 3600"
            ))
        })
}

/// The name of the systemd credential that holds the encryption key (`LoadCredential=` or
/// `SetCredentialEncrypted=` with this name): read from `$CREDENTIALS_DIRECTORY` when neither
/// `KEYRACK_ENCRYPTION_KEY` nor `KEYRACK_ENCRYPTION_KEY_FILE` is set.
pub const KEY_CREDENTIAL: &str = "keyrack-encryption-key";

/// The configured encryption key, from (in this order) `KEYRACK_ENCRYPTION_KEY`,
/// `KEYRACK_ENCRYPTION_KEY_FILE`, the systemd credential [`KEY_CREDENTIAL`]; none of them: `None`
/// (the key file beside the database). The first two both set: an error. A file holds the key
/// as `keyrack gen-key` prints it; surrounding whitespace (a final newline) is ignored.
fn resolve_encryption_key(lookup: &Lookup) -> Result<Option<EncryptionKey>, ConfigError> {
    let inline = lookup.get("KEYRACK_ENCRYPTION_KEY").map(Zeroizing::new);
    let file = lookup.get("KEYRACK_ENCRYPTION_KEY_FILE");
    let (source, text) =
        match (inline, file) {
            (Some(_), Some(_)) => return Err(ConfigError(
                "KEYRACK_ENCRYPTION_KEY and KEYRACK_ENCRYPTION_KEY_FILE are both set; set only one"
                    .to_owned(),
            )),
            (Some(v), None) => ("KEYRACK_ENCRYPTION_KEY".to_owned(), v),
            (None, Some(path)) => {
                let source = format!("KEYRACK_ENCRYPTION_KEY_FILE ({path})");
                let text = read_secret_file(Path::new(&path), &source)?;
                (source, text)
            }
            (None, None) => {
                let Some(dir) = lookup.get("CREDENTIALS_DIRECTORY") else {
                    return Ok(None);
                };
                let path = Path::new(&dir).join(KEY_CREDENTIAL);
                if !path.exists() {
                    return Ok(None);
                }
                let source = format!("the credential {KEY_CREDENTIAL} ({})", path.display());
                let text = read_secret_file(&path, &source)?;
                (source, text)
            }
        };
    EncryptionKey::from_base64(text.trim())
        .map(Some)
        .map_err(|e| {
            ConfigError(format!(
                "{source} {e}; it must be 32 random bytes in standard base64 (44 characters), as \
                 `keyrack gen-key` prints"
            ))
        })
}

/// What to do about a key file this process may not read: keyrack's container image runs as uid
/// 65532, and a key file made 0600 by the host's user is not readable by it.
fn unreadable_hint(uid: u32, meta: Option<&std::fs::Metadata>) -> String {
    use std::os::unix::fs::MetadataExt;
    let owner = meta.map_or(String::new(), |m| {
        format!(
            " (the file is owned by uid {}, mode {:o})",
            m.uid(),
            m.mode() & 0o777
        )
    });
    format!(
        "keyrack runs as uid {uid}{owner}: make the file readable by that user, e.g. `chown {uid} \
         FILE` with mode 0400 (in keyrack's container image the user is uid 65532), or give the \
         key as KEYRACK_ENCRYPTION_KEY"
    )
}

/// Reads a file holding a secret; the error names the file, never its content.
fn read_secret_file(path: &Path, source: &str) -> Result<Zeroizing<String>, ConfigError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            unreadable_hint(uid, std::fs::metadata(path).ok().as_ref())
        } else {
            "give a readable file holding the key".to_owned()
        };
        ConfigError(format!("{source}: cannot read the file: {e}; {hint}"))
    })?);
    std::str::from_utf8(&bytes)
        .map(|s| Zeroizing::new(s.to_owned()))
        .map_err(|_| ConfigError(format!("{source} is not base64 text")))
}

impl Config {
    pub fn resolve(db_flag: Option<&str>, lookup: &Lookup) -> Result<Config, ConfigError> {
        let db = db_flag
            .map(str::to_owned)
            .or_else(|| lookup.get("KEYRACK_DB"))
            .unwrap_or_else(|| "keyrack.db".to_owned());

        let encryption_key = resolve_encryption_key(lookup)?;

        let old_encryption_keys = match lookup.get("KEYRACK_OLD_ENCRYPTION_KEYS") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .enumerate()
                .map(|(i, v)| {
                    EncryptionKey::from_base64(v).map_err(|e| {
                        ConfigError(format!(
                            "KEYRACK_OLD_ENCRYPTION_KEYS: key {} {e}; give comma-separated keys \
                             of 32 bytes in standard base64",
                            i + 1
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        let session_ttl_secs = match lookup.get("KEYRACK_SESSION_TTL") {
            None => 2_592_000,
            Some(v) => v
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=10 * 365 * 86_400).contains(n))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "KEYRACK_SESSION_TTL={v:?} is not valid; give a whole number of seconds \
                         from 1 to 315360000"
                    ))
                })?,
        };

        let signups_open = match lookup.get("KEYRACK_SIGNUPS").as_deref().map(str::trim) {
            None | Some("open") => true,
            Some("closed") => false,
            Some(_) => {
                return Err(ConfigError(
                    "KEYRACK_SIGNUPS is not valid; give `open` or `closed`".to_owned(),
                ))
            }
        };

        let max_keys_per_user = match lookup.get("KEYRACK_MAX_KEYS_PER_USER") {
            None => DEFAULT_MAX_KEYS_PER_USER,
            Some(v) => v
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "KEYRACK_MAX_KEYS_PER_USER={v:?} is not valid; give a whole number from 1 \
                         to 1000000"
                    ))
                })?,
        };

        let audit_days = match lookup.get("KEYRACK_AUDIT_DAYS") {
            None => DEFAULT_AUDIT_DAYS,
            Some(v) => v
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=36_500).contains(n))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "KEYRACK_AUDIT_DAYS={v:?} is not valid; give a whole number of days from 1 \
                         to 36500"
                    ))
                })?,
        };

        let audit_fold_secs = whole(
            lookup,
            "KEYRACK_AUDIT_FOLD_SECONDS",
            DEFAULT_AUDIT_FOLD_SECONDS,
            1..=86_400,
        )?;
        let write_rate_per_minute = whole(
            lookup,
            "KEYRACK_WRITE_RATE",
            i64::from(DEFAULT_WRITE_RATE),
            1..=1_000_000,
        )? as u32;
        let login_failures_per_address = match lookup.get("KEYRACK_LOGIN_FAILURES_PER_ADDRESS") {
            None => crate::auth::DEFAULT_FAILURES_PER_ADDRESS,
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 1_000_000)
                .ok_or_else(|| {
                    ConfigError(format!(
                        "KEYRACK_LOGIN_FAILURES_PER_ADDRESS={v:?} is not valid; give a whole \
                         number from 0 (no limit per address) to 1000000"
                    ))
                })?,
        };

        Ok(Config {
            db: DbLocation::parse(&db),
            encryption_key,
            old_encryption_keys,
            admin_token: lookup.get("KEYRACK_ADMIN_TOKEN").map(Secret::new),
            session_ttl_secs,
            // refinery's own info lines (one per start) are noise for the one-shot commands.
            log_filter: lookup
                .get("RUST_LOG")
                .unwrap_or_else(|| "info,refinery_core=warn".to_owned()),
            signups_open,
            max_keys_per_user,
            busy_timeout: seconds(lookup, "KEYRACK_BUSY_TIMEOUT", crate::db::BUSY_TIMEOUT)?,
            audit_days,
            audit_fold_secs,
            write_rate_per_minute,
            login_failures_per_address,
        })
    }
}

/// A whole number setting within `range`, or its default; an error names the setting.
fn whole(
    lookup: &Lookup,
    name: &str,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64, ConfigError> {
    let Some(v) = lookup.get(name) else {
        return Ok(default);
    };
    v.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            ConfigError(format!(
                "{name}={v:?} is not valid; give a whole number from {} to {}",
                range.start(),
                range.end()
            ))
        })
}

impl ServeConfig {
    pub fn resolve(
        listen_flag: Option<&str>,
        workers_flag: Option<&str>,
        lookup: &Lookup,
    ) -> Result<ServeConfig, ConfigError> {
        let listen_raw = listen_flag
            .map(str::to_owned)
            .or_else(|| lookup.get("KEYRACK_LISTEN"))
            .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen = listen_raw
            .to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| {
                ConfigError(format!(
                    "--listen / KEYRACK_LISTEN {listen_raw:?} is not a valid address; give \
                     HOST:PORT such as 127.0.0.1:8080 (port 0 takes any free port)"
                ))
            })?;

        let threads = |raw: Option<String>, name: &str, default: usize| match raw {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "{name} {v:?} is not valid; give a whole number from 1 to 256"
                    ))
                }),
        };
        let workers = threads(
            workers_flag
                .map(str::to_owned)
                .or_else(|| lookup.get("KEYRACK_WORKERS")),
            "--workers / KEYRACK_WORKERS",
            default_workers(),
        )?;
        let write_workers = threads(
            lookup.get("KEYRACK_WRITE_WORKERS"),
            "KEYRACK_WRITE_WORKERS",
            DEFAULT_WRITE_WORKERS,
        )?;
        let timeouts = HttpTimeouts::resolve(lookup)?;
        let metrics_refresh = match lookup.get("KEYRACK_METRICS_REFRESH") {
            None => DEFAULT_METRICS_REFRESH,
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| (0.1..=60.0).contains(n))
                .map(std::time::Duration::from_secs_f64)
                .ok_or_else(|| {
                    ConfigError(format!(
                        "KEYRACK_METRICS_REFRESH={v:?} is not valid; give a number of seconds \
                         from 0.1 to 60"
                    ))
                })?,
        };
        let exit_with_parent = match lookup
            .get("KEYRACK_EXIT_WITH_PARENT")
            .as_deref()
            .map(str::trim)
        {
            None | Some("0" | "false" | "no" | "off") => false,
            Some("1" | "true" | "yes" | "on") => true,
            Some(v) => {
                return Err(ConfigError(format!(
                    "KEYRACK_EXIT_WITH_PARENT {v:?} is not valid; give 1 (or true) or 0 (or false)"
                )))
            }
        };
        Ok(ServeConfig {
            listen,
            workers,
            write_workers,
            timeouts,
            metrics_refresh,
            exit_with_parent,
            parent_pid: std::os::unix::process::parent_id(),
        })
    }
}

/// Default of `KEYRACK_WRITE_WORKERS`. A write waits for its group's commit to reach the disk,
/// and a group holds as many writes as there are threads waiting: with 16 the dual-write POST
/// at 16 connections went from about 4,500–5,000 to 7,200–8,000 requests/s on a 2-core machine
/// (against 4). Threads that wait on the disk cost reads nothing, being apart from the readers.
pub const DEFAULT_WRITE_WORKERS: usize = 16;

/// Twice the cores, at least 4: enough to keep the cores busy with reads, few enough that
/// they do not contend (more readers than this made reveals slower on 2 cores).
fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).clamp(4, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> Lookup {
        Lookup::from_map(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn encryption_key_from_a_file_or_a_credential() {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::generate();
        let text = format!("{}\n", key.to_base64().as_str());
        let file = dir.path().join("k");
        std::fs::write(&file, &text).unwrap();
        let file_s = file.to_str().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let creds_s = creds.to_str().unwrap();
        let id = |c: &Config| c.encryption_key.as_ref().map(|k| k.id().to_string());

        let c = Config::resolve(
            Some("x.db"),
            &lookup(&[("KEYRACK_ENCRYPTION_KEY_FILE", file_s)]),
        )
        .unwrap();
        assert_eq!(id(&c), Some(key.id().to_string()));

        // Both set: refused, naming both.
        let l = lookup(&[
            ("KEYRACK_ENCRYPTION_KEY_FILE", file_s),
            ("KEYRACK_ENCRYPTION_KEY", text.trim()),
        ]);
        let e = Config::resolve(Some("x.db"), &l).unwrap_err();
        assert!(
            e.0.contains("KEYRACK_ENCRYPTION_KEY and KEYRACK_ENCRYPTION_KEY_FILE"),
            "{e}"
        );

        // The credential directory without the credential: no key configured.
        let l = lookup(&[("CREDENTIALS_DIRECTORY", creds_s)]);
        assert_eq!(id(&Config::resolve(Some("x.db"), &l).unwrap()), None);
        // With it: its key; the variables win over it.
        std::fs::write(creds.join(KEY_CREDENTIAL), &text).unwrap();
        assert_eq!(
            id(&Config::resolve(Some("x.db"), &l).unwrap()),
            Some(key.id().to_string())
        );
        let other = EncryptionKey::generate();
        let other_text = other.to_base64();
        let l = lookup(&[
            ("CREDENTIALS_DIRECTORY", creds_s),
            ("KEYRACK_ENCRYPTION_KEY", other_text.as_str()),
        ]);
        assert_eq!(
            id(&Config::resolve(Some("x.db"), &l).unwrap()),
            Some(other.id().to_string())
        );

        // A missing or bad file: named, its content never shown.
        let l = lookup(&[("KEYRACK_ENCRYPTION_KEY_FILE", "/nonexistent/keyrack.key")]);
        let e = Config::resolve(Some("x.db"), &l).unwrap_err();
        assert!(
            e.0.contains("KEYRACK_ENCRYPTION_KEY_FILE (/nonexistent/keyrack.key)"),
            "{e}"
        );
        std::fs::write(&file, "not-a-key-s3cret\n").unwrap();
        let e = Config::resolve(
            Some("x.db"),
            &lookup(&[("KEYRACK_ENCRYPTION_KEY_FILE", file_s)]),
        )
        .unwrap_err();
        assert!(e.0.contains("KEYRACK_ENCRYPTION_KEY_FILE"), "{e}");
        assert!(!e.0.contains("s3cret"), "{e}");
    }

    #[test]
    fn defaults() {
        // The environment is read too: this test needs one without keyrack's variables.
        let set: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("KEYRACK_") || k == "RUST_LOG")
            // Switches of the test suites themselves, not settings.
            .filter(|k| !k.starts_with("KEYRACK_REQUIRE_") && !k.starts_with("KEYRACK_TEST_"))
            .collect();
        assert!(set.is_empty(), "unset {set:?} to run this test");
        let c = Config::resolve(None, &lookup(&[])).unwrap();
        assert_eq!(c.db, DbLocation::File("keyrack.db".into()));
        assert_eq!(c.db.key_file(), Some(PathBuf::from("keyrack.db.key")));
        assert!(c.encryption_key.is_none());
        assert!(c.old_encryption_keys.is_empty());
        assert!(c.admin_token.is_none());
        assert_eq!(c.session_ttl_secs, 30 * 24 * 3600);
        assert_eq!(c.log_filter, "info,refinery_core=warn");
        assert!(c.signups_open);
        assert_eq!(c.max_keys_per_user, 1000);
        assert_eq!(c.busy_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.login_failures_per_address, 50);
        let s = ServeConfig::resolve(None, None, &lookup(&[])).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(s.workers, (cores * 2).clamp(4, 64));
        assert_eq!(s.write_workers, DEFAULT_WRITE_WORKERS);
        assert_eq!(s.metrics_refresh, DEFAULT_METRICS_REFRESH);
        // The HTTP timeouts' default: `http_timeouts_are_seconds_with_a_default_of_ten`.
    }

    #[test]
    fn flag_beats_dotenv() {
        let l = lookup(&[("KEYRACK_DB", "from-dotenv.db")]);
        let c = Config::resolve(Some("flag.db"), &l).unwrap();
        assert_eq!(c.db, DbLocation::File("flag.db".into()));
        let s = ServeConfig::resolve(Some("127.0.0.1:0"), Some("3"), &l).unwrap();
        assert_eq!(s.workers, 3);
        assert_eq!(s.listen.port(), 0);
    }

    #[test]
    fn write_workers_are_a_number_from_1_to_256() {
        let s =
            ServeConfig::resolve(None, None, &lookup(&[("KEYRACK_WRITE_WORKERS", " 8 ")])).unwrap();
        assert_eq!(s.write_workers, 8);
        for bad in ["0", "257", "many", ""] {
            let e = ServeConfig::resolve(None, None, &lookup(&[("KEYRACK_WRITE_WORKERS", bad)]));
            match e {
                // An empty variable is unset (the default), like every other setting.
                Ok(s) if bad.is_empty() => assert_eq!(s.write_workers, DEFAULT_WRITE_WORKERS),
                Ok(s) => panic!("{bad:?} accepted as {}", s.write_workers),
                Err(e) => assert!(e.0.contains("KEYRACK_WRITE_WORKERS"), "{}", e.0),
            }
        }
    }

    #[test]
    fn metrics_refresh_is_seconds_up_to_a_minute() {
        let l = lookup(&[("KEYRACK_METRICS_REFRESH", "0.5")]);
        let s = ServeConfig::resolve(None, None, &l).unwrap();
        assert_eq!(s.metrics_refresh, std::time::Duration::from_millis(500));
        for bad in ["0", "61", "soon"] {
            let l = lookup(&[("KEYRACK_METRICS_REFRESH", bad)]);
            let e = ServeConfig::resolve(None, None, &l).unwrap_err();
            assert!(e.0.contains("KEYRACK_METRICS_REFRESH"), "{e}");
        }
    }

    #[test]
    fn an_unreadable_key_file_says_which_user_must_read_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("encryption.key");
        std::fs::write(&file, "x").unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        let hint = unreadable_hint(65532, Some(&meta));
        assert!(hint.contains("keyrack runs as uid 65532"), "{hint}");
        assert!(
            hint.contains(&format!("owned by uid {}", meta.uid())),
            "{hint}"
        );
        assert!(hint.contains("chown 65532"), "{hint}");
    }

    #[test]
    fn exit_with_parent_is_a_yes_or_no() {
        let on = |v: &str| {
            ServeConfig::resolve(None, None, &lookup(&[("KEYRACK_EXIT_WITH_PARENT", v)]))
                .map(|s| s.exit_with_parent)
        };
        for v in ["1", "true", " yes ", "on"] {
            assert!(on(v).unwrap(), "{v:?}");
        }
        for v in ["0", "false", "no", "off", ""] {
            assert!(!on(v).unwrap(), "{v:?}");
        }
        let e = on("sometimes").unwrap_err();
        assert!(e.0.contains("KEYRACK_EXIT_WITH_PARENT"), "{}", e.0);
    }

    #[test]
    fn memory_has_no_key_file() {
        let c = Config::resolve(Some(":memory:"), &lookup(&[])).unwrap();
        assert_eq!(c.db, DbLocation::Memory);
        assert_eq!(c.db.key_file(), None);
    }

    #[test]
    fn new_settings_default_and_parse() {
        let c = Config::resolve(Some("x.db"), &lookup(&[])).unwrap();
        assert!(c.signups_open);
        assert_eq!(c.max_keys_per_user, 1000);
        let l = lookup(&[
            ("KEYRACK_SIGNUPS", "closed"),
            ("KEYRACK_MAX_KEYS_PER_USER", "3"),
        ]);
        let c = Config::resolve(Some("x.db"), &l).unwrap();
        assert!(!c.signups_open);
        assert_eq!(c.max_keys_per_user, 3);
        let e =
            Config::resolve(Some("x.db"), &lookup(&[("KEYRACK_SIGNUPS", "maybe")])).unwrap_err();
        assert!(e.0.contains("KEYRACK_SIGNUPS"), "{e}");
        let l = lookup(&[("KEYRACK_MAX_KEYS_PER_USER", "0")]);
        let e = Config::resolve(Some("x.db"), &l).unwrap_err();
        assert!(e.0.contains("KEYRACK_MAX_KEYS_PER_USER"), "{e}");
        for (v, n) in [("0", 0), (" 7 ", 7), ("1000000", 1_000_000)] {
            let l = lookup(&[("KEYRACK_LOGIN_FAILURES_PER_ADDRESS", v)]);
            let c = Config::resolve(Some("x.db"), &l).unwrap();
            assert_eq!(c.login_failures_per_address, n);
        }
        for bad in ["-1", "many", "1000001"] {
            let l = lookup(&[("KEYRACK_LOGIN_FAILURES_PER_ADDRESS", bad)]);
            let e = Config::resolve(Some("x.db"), &l).unwrap_err();
            assert!(e.0.contains("KEYRACK_LOGIN_FAILURES_PER_ADDRESS"), "{e}");
        }
    }

    #[test]
    fn dotenv_errors_name_line_and_variable_never_the_value() {
        let text =
            "# settings\nKEYRACK_DB=a.db\n\nKEYRACK_ADMIN_TOKEN=\"s3cret-token\nKEYRACK_LISTEN=x\n";
        let e = dotenvy::from_read_iter(text.as_bytes())
            .find_map(Result::err)
            .expect("a parse error");
        let msg = describe_dotenv_error(text, &e);
        assert_eq!(
            msg,
            "line 4: the value of KEYRACK_ADMIN_TOKEN cannot be read (check its quotes and escapes)"
        );
        let text = "KEYRACK_DB=a.db\nthis is not a setting s3cret\n";
        let e = dotenvy::from_read_iter(text.as_bytes())
            .find_map(Result::err)
            .expect("a parse error");
        let msg = describe_dotenv_error(text, &e);
        assert_eq!(msg, "line 2: it is not a NAME=value line");
        assert!(!msg.contains("s3cret"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = ServeConfig::resolve(Some("nope"), None, &lookup(&[])).unwrap_err();
        assert!(e.0.contains("KEYRACK_LISTEN"), "{e}");
        let e = ServeConfig::resolve(Some("127.0.0.1:0"), Some("0"), &lookup(&[])).unwrap_err();
        assert!(e.0.contains("KEYRACK_WORKERS"), "{e}");
    }

    #[test]
    fn http_timeouts_are_seconds_with_a_default_of_ten() {
        let s = ServeConfig::resolve(Some("127.0.0.1:0"), Some("1"), &lookup(&[])).unwrap();
        let ten = std::time::Duration::from_secs(10);
        assert_eq!(
            s.timeouts,
            HttpTimeouts {
                socket: ten,
                head: ten,
                idle: ten
            }
        );
        let l = lookup(&[
            ("KEYRACK_SOCKET_TIMEOUT", "2"),
            ("KEYRACK_HEAD_TIMEOUT", "0.5"),
            ("KEYRACK_IDLE_TIMEOUT", "30"),
        ]);
        let s = ServeConfig::resolve(Some("127.0.0.1:0"), Some("1"), &l).unwrap();
        assert_eq!(s.timeouts.socket, std::time::Duration::from_secs(2));
        assert_eq!(s.timeouts.head, std::time::Duration::from_millis(500));
        assert_eq!(s.timeouts.idle, std::time::Duration::from_secs(30));
        for bad in ["0", "-1", "abc", "1e9", "NaN"] {
            let l = lookup(&[("KEYRACK_HEAD_TIMEOUT", bad)]);
            let e = ServeConfig::resolve(Some("127.0.0.1:0"), Some("1"), &l).unwrap_err();
            assert!(e.0.contains("KEYRACK_HEAD_TIMEOUT"), "{e}");
        }
    }
}
