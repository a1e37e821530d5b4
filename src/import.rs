//! `keyrack import-legacy`: adopts another application's users table, the one whose
//! `openai_api_key` column the three-phase migration starts from.
//!
//! The foreign database is opened read-only. The new keyrack database is built in a temporary
//! file beside the target (mode 0600) — schema from keyrack's own migrations, phase `legacy`,
//! the users under their old ids with their keys sealed into the legacy column — and moved into
//! place only when everything succeeded: a failed or refused import leaves nothing behind.
//!
//! Key values are plaintext or Fernet tokens (Python `cryptography`), decided per value; a value
//! that decodes to no valid key is never imported. Password hashes in bcrypt or argon2 form are
//! kept as they are and replaced by keyrack's own at the first login (`crate::auth`).

use fernet::Fernet;
use rusqlite::types::Value;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use zeroize::Zeroizing;

use crate::app;
use crate::auth::{self, HashForm};
use crate::config::{Config, DbLocation};
use crate::crypto::{EncryptionKey, KeyRing};
use crate::db;
use crate::domain::{ApiKey, Email};
use crate::phase::Phase;
use crate::store::import::{self as source, SourceColumns, SourceRow};
use crate::store::{meta, seed, StoreError};
use crate::Failure;

/// The environment variable holding the application's Fernet keys, comma-separated.
pub const FERNET_VAR: &str = "KEYRACK_LEGACY_FERNET_KEY";

/// The password hash forms kept, in the order the summary counts them.
const KEPT_FORMS: [HashForm; 6] = [
    HashForm::Bcrypt,
    HashForm::Argon2,
    HashForm::Other(crate::passwords::Form::WerkzeugScrypt),
    HashForm::Other(crate::passwords::Form::WerkzeugPbkdf2),
    HashForm::Other(crate::passwords::Form::DjangoPbkdf2),
    HashForm::Other(crate::passwords::Form::PasslibPbkdf2),
];

/// Detail lines printed per kind of problem before "… and N more".
const SHOWN: usize = 20;

/// What to import, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub from: PathBuf,
    pub users_table: String,
    pub id_column: String,
    pub email_column: String,
    pub key_column: String,
    pub password_column: Option<String>,
    pub skip_unreadable: bool,
    /// `--report PATH`: the JSON report, written new (mode 0600).
    pub report: Option<PathBuf>,
}

/// The application's Fernet keys: every one is tried on every token (its own rotations).
pub struct LegacyKeys(Vec<Fernet>);

impl LegacyKeys {
    /// Parses the comma-separated list of `KEYRACK_LEGACY_FERNET_KEY` (unset: no keys). A key
    /// that is not 32 bytes of URL-safe base64 is a configuration error naming its position.
    pub fn parse(list: Option<&str>) -> Result<LegacyKeys, Failure> {
        let Some(list) = list else {
            return Ok(LegacyKeys(Vec::new()));
        };
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, k)| {
                Fernet::new(k).ok_or_else(|| {
                    Failure::Config(format!(
                        "{FERNET_VAR}: key {} is not a Fernet key; give the application's keys \
                         as they are (32 bytes in URL-safe base64, 44 characters), comma-separated",
                        i + 1
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map(LegacyKeys)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first key: the one `export-legacy --format fernet` seals with.
    pub(crate) fn first(&self) -> Option<&Fernet> {
        self.0.first()
    }
}

/// What one value of the key column turned out to be.
#[derive(Debug)]
pub enum Decoded {
    /// NULL, or nothing but white space.
    Empty,
    Plain(ApiKey),
    Fernet(ApiKey),
    /// Not importable; the reason names no part of the value.
    Unreadable(&'static str),
}

/// Whether `s` has the shape of a Fernet token: URL-safe base64 of version byte 0x80, an
/// 8-byte time, a 16-byte IV, whole AES blocks and a 32-byte HMAC.
fn looks_like_fernet(s: &str) -> bool {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    if !s.starts_with("gAAAAA") {
        return false;
    }
    match URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')) {
        Ok(raw) => raw[0] == 0x80 && raw.len() >= 73 && (raw.len() - 57) % 16 == 0,
        Err(_) => false,
    }
}

/// Decides what one key column value is. Text (or a BLOB holding UTF-8 text, as an application
/// that stores `Fernet.encrypt`'s bytes leaves it) is a Fernet token when it has a token's
/// shape, otherwise a plaintext key; either way the key must then be a valid API key.
pub fn decode_key(value: &Value, keys: &LegacyKeys) -> Decoded {
    let text = match value {
        Value::Null => return Decoded::Empty,
        Value::Text(t) => t.as_str(),
        Value::Blob(b) => match std::str::from_utf8(b) {
            Ok(t) => t,
            Err(_) => return Decoded::Unreadable("a binary value that is not text"),
        },
        Value::Integer(_) | Value::Real(_) => return Decoded::Unreadable("a number, not a key"),
    };
    let text = text.trim();
    if text.is_empty() {
        return Decoded::Empty;
    }
    if looks_like_fernet(text) {
        if keys.is_empty() {
            return Decoded::Unreadable("a Fernet token, and KEYRACK_LEGACY_FERNET_KEY is not set");
        }
        let Some(plain) = keys.0.iter().find_map(|f| f.decrypt(text).ok()) else {
            return Decoded::Unreadable(
                "a Fernet token that no key in KEYRACK_LEGACY_FERNET_KEY opens",
            );
        };
        let plain = Zeroizing::new(plain);
        return match std::str::from_utf8(&plain).ok().map(ApiKey::parse) {
            Some(Ok(k)) => Decoded::Fernet(k),
            _ => Decoded::Unreadable("a Fernet token whose content is not a valid API key"),
        };
    }
    if text.starts_with("kr1:") {
        return Decoded::Unreadable("a value sealed by keyrack, not one of the application's");
    }
    match ApiKey::parse(text) {
        Ok(k) => Decoded::Plain(k),
        Err(_) => Decoded::Unreadable(
            "neither a Fernet token nor a plaintext API key (8 to 512 printable characters)",
        ),
    }
}

/// What the import keeps of one password column value.
#[derive(Debug, PartialEq, Eq)]
pub enum PasswordValue {
    Usable(HashForm, String),
    /// NULL or empty.
    None,
    /// A hash keyrack does not verify; the name of its form, for the report.
    Unsupported(&'static str),
}

pub fn decode_password(value: &Value) -> PasswordValue {
    let text = match value {
        Value::Null => return PasswordValue::None,
        Value::Text(t) => t.as_str(),
        Value::Blob(b) => match std::str::from_utf8(b) {
            Ok(t) => t,
            Err(_) => return PasswordValue::Unsupported("binary"),
        },
        Value::Integer(_) | Value::Real(_) => return PasswordValue::Unsupported("a number"),
    };
    let text = text.trim();
    if text.is_empty() {
        return PasswordValue::None;
    }
    match auth::hash_form(text) {
        Some(form) => PasswordValue::Usable(form, text.to_owned()),
        None => PasswordValue::Unsupported(unsupported_form(text)),
    }
}

/// A name for a password hash form keyrack does not verify, for the report only.
fn unsupported_form(hash: &str) -> &'static str {
    const FORMS: [(&str, &str); 12] = [
        ("$pbkdf2-sha256$", "malformed passlib pbkdf2-sha256"),
        ("$pbkdf2-sha512$", "passlib pbkdf2-sha512"),
        ("$pbkdf2$", "passlib pbkdf2-sha1"),
        ("pbkdf2_sha256$", "malformed Django pbkdf2_sha256"),
        ("pbkdf2_sha1$", "Django pbkdf2_sha1"),
        ("argon2$", "Django argon2"),
        ("bcrypt_sha256$", "Django bcrypt_sha256"),
        ("pbkdf2:sha256", "malformed Werkzeug pbkdf2:sha256"),
        ("pbkdf2:", "Werkzeug pbkdf2 with another digest"),
        ("scrypt:", "malformed or too costly Werkzeug scrypt"),
        ("$6$", "sha512-crypt"),
        ("$5$", "sha256-crypt"),
    ];
    if auth::hash_form(hash).is_none() && (hash.starts_with("$2") || hash.starts_with("$argon2")) {
        return "malformed bcrypt or argon2";
    }
    FORMS
        .iter()
        .find(|(prefix, _)| hash.starts_with(prefix))
        .map_or("unknown", |(_, name)| name)
}

/// The counts and the problems of one import, as printed.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: u64,
    pub users: u64,
    pub keys_plain: u64,
    pub keys_fernet: u64,
    pub empty: u64,
    /// Users whose key did not decode: (user id, reason).
    pub unreadable: Vec<(i64, &'static str)>,
    /// Rows not imported: (the id as the table holds it, why).
    pub skipped: Vec<(String, String)>,
    pub skipped_by_reason: BTreeMap<&'static str, u64>,
    /// Users whose hash was kept, by its form's name (`HashForm::name`).
    pub passwords_kept: BTreeMap<&'static str, u64>,
    pub passwords_none: u64,
    pub passwords_unsupported: BTreeMap<&'static str, u64>,
    pub password_column: bool,
    /// Users imported without a usable password: (id, email, why), for `--report`.
    pub without_password: Vec<(i64, String, String)>,
    /// Emails of the users whose key did not decode, by user id, for `--report`.
    pub unreadable_emails: HashMap<i64, String>,
}

impl Report {
    fn skip(&mut self, id: String, kind: &'static str, why: String) {
        *self.skipped_by_reason.entry(kind).or_default() += 1;
        self.skipped.push((id, why));
    }

    /// The summary for stdout.
    pub fn summary(&self, from: &Path, table: &str) -> String {
        let mut out = format!(
            "imported {} users from {} (table {table}, {} rows)\n",
            self.users,
            from.display(),
            self.rows
        );
        out += &format!(
            "keys: {} (plaintext {}, fernet {})\n",
            self.keys_plain + self.keys_fernet,
            self.keys_plain,
            self.keys_fernet
        );
        out += &format!("empty: {}\n", self.empty);
        out += &format!("unreadable: {}\n", self.unreadable.len());
        let reasons: Vec<String> = self
            .skipped_by_reason
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        out += &format!("skipped: {}", self.skipped.len());
        if !reasons.is_empty() {
            out += &format!(" ({})", reasons.join(", "));
        }
        out.push('\n');
        if self.password_column {
            let unsupported: u64 = self.passwords_unsupported.values().sum();
            let kept: Vec<String> = KEPT_FORMS
                .iter()
                .map(|f| {
                    format!(
                        "{} {}",
                        f.name(),
                        self.passwords_kept.get(f.name()).copied().unwrap_or(0)
                    )
                })
                .collect();
            out += &format!(
                "passwords: {}, none {}, unsupported {unsupported}",
                kept.join(", "),
                self.passwords_none
            );
            if unsupported > 0 {
                let forms: Vec<String> = self
                    .passwords_unsupported
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                out += &format!(" ({})", forms.join(", "));
            }
            out.push('\n');
        } else {
            out += "passwords: none imported (no --password-column)\n";
        }
        out
    }

    /// Users who can log in only after `keyrack reset-password`.
    fn without_password(&self) -> u64 {
        self.users - self.passwords_kept.values().sum::<u64>()
    }

    /// The `--report` file's JSON: who has no usable password, which rows were skipped, whose
    /// key did not decode, and why. Never a key or a hash.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let user = |id: i64, email: &str, reason: &str| json!({"id": id, "email": email, "external_id": id.to_string(), "reason": reason});
        json!({
            "users_without_password": self
                .without_password
                .iter()
                .map(|(id, email, why)| user(*id, email, why))
                .collect::<Vec<_>>(),
            "skipped": self
                .skipped
                .iter()
                .map(|(id, why)| json!({"id": id, "reason": why}))
                .collect::<Vec<_>>(),
            "unreadable": self
                .unreadable
                .iter()
                .map(|(id, why)| {
                    user(*id, self.unreadable_emails.get(id).map_or("", String::as_str), why)
                })
                .collect::<Vec<_>>(),
        })
    }

    /// The problem lines for stderr, at most `SHOWN` of each kind.
    fn problem_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (id, why) in self.unreadable.iter().take(SHOWN) {
            lines.push(format!("user {id}: key not imported: {why}"));
        }
        if self.unreadable.len() > SHOWN {
            lines.push(format!(
                "… and {} more unreadable keys",
                self.unreadable.len() - SHOWN
            ));
        }
        for (id, why) in self.skipped.iter().take(SHOWN) {
            lines.push(format!("row with id {id}: skipped: {why}"));
        }
        if self.skipped.len() > SHOWN {
            lines.push(format!(
                "… and {} more skipped rows",
                self.skipped.len() - SHOWN
            ));
        }
        lines
    }
}

/// A value of the foreign table as the report names it (ids and emails, never keys).
fn shown(v: &Value) -> String {
    match v {
        Value::Null => "NULL".to_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => r.to_string(),
        Value::Text(t) => format!("{t:?}"),
        Value::Blob(b) => format!("<{} bytes>", b.len()),
    }
}

/// Imports one row into the open transaction, or records why not.
struct Importer<'a> {
    keys: &'a LegacyKeys,
    ring: &'a KeyRing,
    report: Report,
    emails: HashMap<String, i64>,
    ids: HashSet<i64>,
}

impl Importer<'_> {
    fn row(&mut self, tx: &rusqlite::Transaction<'_>, row: SourceRow) -> Result<(), StoreError> {
        self.report.rows += 1;
        let id = match row.id {
            Value::Integer(i) => i,
            ref other => {
                self.report.skip(
                    shown(other),
                    "id not an integer",
                    "the id is not an integer".into(),
                );
                return Ok(());
            }
        };
        if !self.ids.insert(id) {
            self.report.skip(
                id.to_string(),
                "duplicate id",
                "another row has the same id".into(),
            );
            return Ok(());
        }
        let email = match &row.email {
            Value::Null => {
                self.report
                    .skip(id.to_string(), "no email", "the email is NULL".into());
                return Ok(());
            }
            Value::Text(t) => Email::parse(t),
            other => {
                self.report.skip(
                    id.to_string(),
                    "invalid email",
                    format!("the email {} is not text", shown(other)),
                );
                return Ok(());
            }
        };
        let email = match email {
            Ok(e) => e,
            Err(e) => {
                self.report.skip(
                    id.to_string(),
                    "invalid email",
                    format!(
                        "the email {} is not valid: {}",
                        shown(&row.email),
                        e.message
                    ),
                );
                return Ok(());
            }
        };
        if let Some(first) = self.emails.get(email.as_str()) {
            self.report.skip(
                id.to_string(),
                "duplicate email",
                format!(
                    "the email {} (trimmed and lowercased) belongs to user {first} already",
                    email.as_str()
                ),
            );
            return Ok(());
        }
        self.emails.insert(email.as_str().to_owned(), id);

        let hash = match row.password.as_ref().map(decode_password) {
            Some(PasswordValue::Usable(form, hash)) => {
                *self.report.passwords_kept.entry(form.name()).or_default() += 1;
                hash
            }
            Some(PasswordValue::Unsupported(form)) => {
                *self.report.passwords_unsupported.entry(form).or_default() += 1;
                self.report.without_password.push((
                    id,
                    email.as_str().to_owned(),
                    format!("a password hash keyrack does not verify: {form}"),
                ));
                auth::NO_PASSWORD.to_owned()
            }
            Some(PasswordValue::None) => {
                self.report.passwords_none += 1;
                self.report.without_password.push((
                    id,
                    email.as_str().to_owned(),
                    "no password hash (NULL or empty)".to_owned(),
                ));
                auth::NO_PASSWORD.to_owned()
            }
            None => {
                self.report.without_password.push((
                    id,
                    email.as_str().to_owned(),
                    "no password column was imported (--password-column)".to_owned(),
                ));
                auth::NO_PASSWORD.to_owned()
            }
        };
        source::insert_user(tx, id, &email, &hash)?;
        self.report.users += 1;

        let key = match decode_key(&row.key, self.keys) {
            Decoded::Empty => {
                self.report.empty += 1;
                return Ok(());
            }
            Decoded::Unreadable(why) => {
                self.report.unreadable.push((id, why));
                self.report
                    .unreadable_emails
                    .insert(id, email.as_str().to_owned());
                return Ok(());
            }
            Decoded::Plain(k) => {
                self.report.keys_plain += 1;
                k
            }
            Decoded::Fernet(k) => {
                self.report.keys_fernet += 1;
                k
            }
        };
        seed::column_key(tx, self.ring, id, &key)
    }
}

/// Why reading the rows stopped early.
enum Stop {
    Store(StoreError),
    /// SIGINT or SIGTERM arrived.
    Interrupted,
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Stop {
        Stop::Store(e)
    }
}

fn interrupted() -> Failure {
    Failure::Runtime("import-legacy: interrupted; nothing was created".into())
}

/// Removes the temporary database unless the import got as far as moving it into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            for suffix in ["", "-journal", "-wal", "-shm"] {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
        }
    }
}

fn io_fail<'a>(what: &str, path: &'a Path) -> impl Fn(std::io::Error) -> Failure + 'a {
    let what = what.to_owned();
    move |e| {
        Failure::Runtime(format!(
            "{what} {}: {e}; nothing was created",
            path.display()
        ))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// An application's users table, by the name its database declares, and its columns: for
/// `import-legacy` and `export-legacy` alike. A table or column that is missing is a usage
/// error naming it (exit 2).
pub(crate) struct ForeignTable {
    pub(crate) name: String,
    columns: Vec<String>,
    /// The database, as messages name it.
    label: String,
    /// Said after each of those messages (`export-legacy`: that nothing was written).
    tail: &'static str,
}

impl ForeignTable {
    pub(crate) fn find(
        conn: &rusqlite::Connection,
        label: String,
        users_table: &str,
        tail: &'static str,
    ) -> Result<ForeignTable, Failure> {
        let read = |e: StoreError| Failure::Config(format!("cannot read {label}: {e}"));
        let name = source::table_name(conn, users_table)
            .map_err(read)?
            .ok_or_else(|| {
                Failure::Config(format!(
                    "{label} has no table {users_table:?}; name the users table with \
                     --users-table{tail}"
                ))
            })?;
        let columns = source::column_names(conn, &name).map_err(read)?;
        Ok(ForeignTable {
            name,
            columns,
            label,
            tail,
        })
    }

    /// The column named `wanted` (whatever its case), as the table declares it; `flag` names it.
    pub(crate) fn column(&self, wanted: &str, flag: &str) -> Result<String, Failure> {
        self.columns
            .iter()
            .find(|n| n.eq_ignore_ascii_case(wanted))
            .cloned()
            .ok_or_else(|| {
                Failure::Config(format!(
                    "the table {} of {} has no column {wanted:?} (its columns: {}); name it with \
                     {flag}{}",
                    self.name,
                    self.label,
                    self.columns.join(", "),
                    self.tail
                ))
            })
    }
}

/// Finds the table and columns, by the names the foreign database declares.
fn resolve_columns(conn: &rusqlite::Connection, opts: &Options) -> Result<SourceColumns, Failure> {
    let table = ForeignTable::find(conn, opts.from.display().to_string(), &opts.users_table, "")?;
    Ok(SourceColumns {
        id: table.column(&opts.id_column, "--id-column")?,
        email: table.column(&opts.email_column, "--email-column")?,
        key: table.column(&opts.key_column, "--key-column")?,
        password: opts
            .password_column
            .as_deref()
            .map(|c| table.column(c, "--password-column"))
            .transpose()?,
        table: table.name,
    })
}

/// The encryption key of the new database: the configured one, else the key file beside the
/// target when it exists, else a new key whose file is written when the import succeeds.
fn settle_key(
    config: &mut Config,
    target: &Path,
) -> Result<(KeyRing, Option<(PathBuf, EncryptionKey)>), Failure> {
    let old = std::mem::take(&mut config.old_encryption_keys);
    if let Some(k) = config.encryption_key.take() {
        return Ok((KeyRing::new(k, old), None));
    }
    let key_file = with_suffix(target, ".key");
    if key_file.exists() {
        return Ok((KeyRing::new(app::read_key_file(&key_file)?, old), None));
    }
    let key = EncryptionKey::generate();
    let copy = EncryptionKey::from_base64(&key.to_base64())
        .map_err(|e| Failure::Runtime(format!("a new encryption key {e}")))?;
    Ok((KeyRing::new(key, old), Some((key_file, copy))))
}

/// Writes `--report PATH` (a new file, mode 0600), when asked for.
fn write_report(opts: &Options, report: &Report) -> Result<(), Failure> {
    use std::io::Write as _;
    let Some(path) = &opts.report else {
        return Ok(());
    };
    let fail = |e: std::io::Error| {
        Failure::Runtime(format!("cannot write the report {}: {e}", path.display()))
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(fail)?;
    let mut text = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
    text.push('\n');
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    log::info!("wrote the import report {}", path.display());
    Ok(())
}

/// Runs `keyrack import-legacy`.
pub fn run(mut config: Config, fernet_keys: Option<&str>, opts: &Options) -> Result<(), Failure> {
    // SIGINT and SIGTERM stop the import at any stage within a second, leaving nothing: noted
    // here, before anything is read or created, and acted on between stages, between rows and
    // inside every statement on the source (SQLite's progress handler interrupts it: a view
    // that never ends is stopped as well as a large table).
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Failure::Runtime(format!("cannot handle signals: {e}")))?;
    }
    let go_on = || {
        if stop.load(Ordering::Relaxed) {
            Err(interrupted())
        } else {
            Ok(())
        }
    };
    let target =
        match &config.db {
            DbLocation::File(p) => p.clone(),
            DbLocation::Memory => return Err(Failure::Config(
                "import-legacy creates a database file: give --db a path that does not exist yet"
                    .into(),
            )),
        };
    for p in [
        target.clone(),
        with_suffix(&target, "-wal"),
        with_suffix(&target, "-journal"),
    ] {
        if p.exists() || p.symlink_metadata().is_ok() {
            return Err(Failure::Config(format!(
                "{} already exists; import-legacy only creates a new database and never writes \
                 into an existing one: give --db a path that does not exist yet",
                p.display()
            )));
        }
    }
    if let Some(r) = &opts.report {
        if r.symlink_metadata().is_ok() {
            return Err(Failure::Config(format!(
                "--report {}: the file already exists (a report never replaces a file); give a \
                 new path; nothing was created",
                r.display()
            )));
        }
    }
    let legacy_keys = LegacyKeys::parse(fernet_keys)?;
    if !opts.from.is_file() {
        return Err(Failure::Config(format!(
            "--from {}: no such file",
            opts.from.display()
        )));
    }
    let src = source::open_source(&opts.from, stop.clone()).map_err(|e| {
        if stop.load(Ordering::Relaxed) {
            return interrupted();
        }
        Failure::Config(format!(
            "--from {}: cannot read it as a SQLite database: {e}",
            opts.from.display()
        ))
    })?;
    if source::is_keyrack_database(&src).map_err(|e| Failure::Config(e.to_string()))? {
        return Err(Failure::Config(format!(
            "{} is already a keyrack database: use it as it is (--db {0})",
            opts.from.display()
        )));
    }
    let cols = resolve_columns(&src, opts)?;
    go_on()?;
    let (ring, new_key_file) = settle_key(&mut config, &target)?;

    // The temporary file beside the target (same file system, so the final move is a rename).
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keyrack.db".into());
    let temp_path = dir.join(format!(".{name}.import-{}.tmp", std::process::id()));
    // A SIGKILL leaves the temporary file (never a file at the target): the next import to the
    // same target removes those of processes that are gone.
    crate::backup::remove_stale(&dir.join(format!(".{name}")), ".import-", ".tmp");
    go_on()?;
    let mut temp = TempFile {
        path: temp_path.clone(),
        keep: false,
    };
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp_path)
        .map_err(io_fail("cannot create the temporary database", &temp_path))?;

    let started = std::time::Instant::now();
    let total = source::count_rows(&src, &cols).map_err(|e| {
        if stop.load(Ordering::Relaxed) {
            interrupted()
        } else {
            Failure::Runtime(e.to_string())
        }
    })?;
    log::info!(
        "importing {total} rows of table {} from {}",
        cols.table,
        opts.from.display()
    );
    let db_fail =
        |e: StoreError| Failure::Runtime(format!("import-legacy failed, nothing was created: {e}"));
    let mut conn = source::open_target(&temp_path).map_err(db_fail)?;
    db::migrate_schema(&mut conn).map_err(|e| {
        Failure::Runtime(format!(
            "import-legacy: cannot apply keyrack's schema, nothing was created: {e}"
        ))
    })?;
    let tx = conn.transaction().map_err(|e| db_fail(e.into()))?;
    meta::set_phase(&tx, Phase::Legacy, "import-legacy").map_err(db_fail)?;
    meta::set_key_id(&tx, ring.current_id().as_str()).map_err(db_fail)?;
    let mut importer = Importer {
        keys: &legacy_keys,
        ring: &ring,
        report: Report {
            password_column: cols.password.is_some(),
            ..Report::default()
        },
        emails: HashMap::new(),
        ids: HashSet::new(),
    };
    source::each_row(&src, &cols, |row| {
        if stop.load(Ordering::Relaxed) {
            return Err(Stop::Interrupted);
        }
        importer.row(&tx, row).map_err(Stop::Store)
    })
    .map_err(|e| match e {
        _ if stop.load(Ordering::Relaxed) => interrupted(),
        Stop::Store(e) => db_fail(e),
        Stop::Interrupted => interrupted(),
    })?;
    go_on()?;
    let report = importer.report;

    for line in report.problem_lines() {
        eprintln!("{line}");
    }
    if !report.unreadable.is_empty() && !opts.skip_unreadable {
        // The report names the users whose key did not decode, though nothing was imported.
        write_report(opts, &report)?;
        let ids: Vec<String> = report
            .unreadable
            .iter()
            .take(SHOWN)
            .map(|(id, _)| id.to_string())
            .collect();
        let more = if report.unreadable.len() > SHOWN {
            format!(" and {} more", report.unreadable.len() - SHOWN)
        } else {
            String::new()
        };
        return Err(Failure::Refused(format!(
            "{} keys do not decode (users {}{more}); nothing was created. Set \
             KEYRACK_LEGACY_FERNET_KEY to the application's key(s), or run again with \
             --skip-unreadable to import these users without their key",
            report.unreadable.len(),
            ids.join(", ")
        )));
    }
    // `export-legacy` leaves these users' rows of the application alone.
    let unreadable: Vec<i64> = report.unreadable.iter().map(|(id, _)| *id).collect();
    crate::store::export::note_unreadable_at_import(&tx, &unreadable).map_err(db_fail)?;
    tx.commit().map_err(|e| db_fail(e.into()))?;
    source::close_target(conn).map_err(db_fail)?;
    drop(src);
    File::open(&temp_path)
        .and_then(|f| f.sync_all())
        .map_err(io_fail("cannot sync the temporary database", &temp_path))?;

    if let Some((key_file, key)) = &new_key_file {
        app::write_key_file(key_file, key)?;
    }
    if stop.load(Ordering::Relaxed) {
        if let Some((key_file, _)) = &new_key_file {
            let _ = std::fs::remove_file(key_file);
        }
        return Err(interrupted());
    }
    // Into place without ever replacing a file that appeared meanwhile: a hard link fails when
    // the target exists. (A file system without hard links gets a rename after one more check.)
    let placed = match std::fs::hard_link(&temp_path, &target) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !target.exists() => {
            std::fs::rename(&temp_path, &target)
        }
        other => other,
    };
    if let Err(e) = placed {
        if let Some((key_file, _)) = &new_key_file {
            let _ = std::fs::remove_file(key_file);
        }
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            Failure::Config(format!(
                "{} appeared while importing; nothing was written to it",
                target.display()
            ))
        } else {
            io_fail("cannot move the new database to", &target)(e)
        });
    }
    let _ = std::fs::remove_file(&temp_path);
    temp.keep = true;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }

    if let Some((key_file, _)) = &new_key_file {
        log::warn!(
            "created the key file {} with a new encryption key; production should set \
             KEYRACK_ENCRYPTION_KEY instead (keep the key safe: without it the stored keys are lost)",
            key_file.display()
        );
    }
    log::info!(
        "imported {} users and {} keys into {} in {:.1?}",
        report.users,
        report.keys_plain + report.keys_fernet,
        target.display(),
        started.elapsed()
    );
    write_report(opts, &report)?;
    print!("{}", report.summary(&opts.from, &cols.table));
    let without = report.without_password();
    if without > 0 {
        println!(
            "{without} users have no usable password: give each one with `keyrack reset-password EMAIL`"
        );
    }
    println!(
        "created {} in phase legacy; next: `keyrack --db {} status`, then `keyrack migrate`",
        target.display(),
        target.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn two_keys() -> (Fernet, Fernet, LegacyKeys) {
        let (a, b) = (Fernet::generate_key(), Fernet::generate_key());
        let keys = LegacyKeys::parse(Some(&format!(" {a} , {b},"))).unwrap();
        (Fernet::new(&a).unwrap(), Fernet::new(&b).unwrap(), keys)
    }

    #[test]
    fn fernet_tokens_open_under_any_listed_key_as_text_or_blob() {
        let (a, b, keys) = two_keys();
        for f in [&a, &b] {
            let token = f.encrypt(b"sk-proj-0123456789abcdef");
            for v in [text(&token), Value::Blob(token.clone().into_bytes())] {
                match decode_key(&v, &keys) {
                    Decoded::Fernet(k) => assert_eq!(k.expose(), "sk-proj-0123456789abcdef"),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_token_under_another_key_or_with_no_keys_is_unreadable() {
        let (_, _, keys) = two_keys();
        let other = Fernet::new(&Fernet::generate_key()).unwrap();
        let token = other.encrypt(b"sk-proj-0123456789abcdef");
        assert!(matches!(
            decode_key(&text(&token), &keys),
            Decoded::Unreadable(r) if r.contains("no key")
        ));
        assert!(matches!(
            decode_key(&text(&token), &LegacyKeys::parse(None).unwrap()),
            Decoded::Unreadable(r) if r.contains("not set")
        ));
        // A token whose content is not a key (here: 3 bytes) is not imported either.
        let (a, _, keys) = two_keys();
        assert!(matches!(
            decode_key(&text(&a.encrypt(b"abc")), &keys),
            Decoded::Unreadable(_)
        ));
    }

    #[test]
    fn plaintext_empty_and_garbage() {
        let keys = LegacyKeys::parse(None).unwrap();
        assert!(
            matches!(decode_key(&text("  sk-plain-0123456789 "), &keys), Decoded::Plain(k) if k.expose() == "sk-plain-0123456789")
        );
        for empty in [Value::Null, text(""), text("   ")] {
            assert!(matches!(decode_key(&empty, &keys), Decoded::Empty));
        }
        for garbage in [
            text("short"),
            text("has a space inside it"),
            text("kr1:0123456789abcdef:AAAA"),
            Value::Integer(12345678),
            Value::Blob(vec![0xff, 0xfe, 0x00, 0x80, 1, 2, 3, 4, 5]),
        ] {
            assert!(
                matches!(decode_key(&garbage, &keys), Decoded::Unreadable(_)),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn fernet_key_list_errors_name_the_position_not_the_value() {
        let good = Fernet::generate_key();
        let e = LegacyKeys::parse(Some(&format!("{good},not-a-key")))
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.message().contains("key 2"), "{}", e.message());
        assert!(!e.message().contains("not-a-key"));
        assert!(LegacyKeys::parse(Some("")).unwrap().is_empty());
    }

    #[test]
    fn password_values() {
        let bcrypt = "$2b$04$Ki1V8GbvdZpt7I9ABRlVeuLlXByJ02FuJ0vDVpofBaKapyqbthP4W";
        assert_eq!(
            decode_password(&text(bcrypt)),
            PasswordValue::Usable(HashForm::Bcrypt, bcrypt.to_owned())
        );
        assert_eq!(decode_password(&Value::Null), PasswordValue::None);
        assert_eq!(decode_password(&text(" ")), PasswordValue::None);
        assert_eq!(
            decode_password(&text("$pbkdf2-sha256$29000$abc$def")),
            PasswordValue::Unsupported("malformed passlib pbkdf2-sha256")
        );
        assert_eq!(
            decode_password(&text(&bcrypt[..50])),
            PasswordValue::Unsupported("malformed bcrypt or argon2")
        );
        assert_eq!(
            decode_password(&text("plaintext-password")),
            PasswordValue::Unsupported("unknown")
        );
    }
}
