//! Start-up shared by every command: open the database, apply schema migrations, settle the
//! encryption key (docs/configuration.md), and hold what the workers share.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use crate::auth::Throttle;
use crate::config::{Config, DbLocation};
use crate::crypto::{EncryptionKey, KeyId, KeyRing};
use crate::db::{self, Database};
use crate::domain::Secret;
use crate::store::{meta, phases, Shared, Store};
use crate::Failure;

/// What every worker and command shares.
pub struct App {
    pub(crate) db: Database,
    pub(crate) ring: Arc<KeyRing>,
    /// What the connections to the database share (group commit, pending usage counts).
    pub(crate) shared: Arc<Shared>,
    pub(crate) throttle: Throttle,
    /// Failed logins per client address (`KEYRACK_LOGIN_FAILURES_PER_ADDRESS`); `None` when 0.
    pub(crate) address_throttle: Option<Throttle>,
    pub(crate) session_ttl_secs: i64,
    pub(crate) admin_token: Option<Secret>,
    /// `KEYRACK_SIGNUPS=open`: POST /auth/register creates accounts.
    pub(crate) signups_open: bool,
    pub(crate) max_keys_per_user: i64,
    /// `KEYRACK_AUDIT_DAYS`: how long events are kept.
    pub(crate) audit_days: i64,
    /// `KEYRACK_WRITE_RATE`: the writes one account may make (`http::rate`).
    pub(crate) write_rate: crate::http::rate::WriteRate,
    /// The database's schema version once opened (`GET /healthz`).
    pub(crate) schema_version: i64,
    /// The start-up's connection, kept for the first `store()` (a server's first worker), so
    /// that a start opens one connection, not two. On a fresh file (`Database::finish_start`)
    /// the start-up is made durable when it is first taken: no connection of this process
    /// writes before that.
    first: Mutex<Option<rusqlite::Connection>>,
}

/// What the start-up does beside opening, as `crate::open` decides it from a command's needs.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// Apply pending schema migrations (on a plan's copy: logged as what would be applied).
    pub migrations: bool,
    /// Settle the encryption key (configured, key file, the identity the database recorded).
    /// Without it the app holds a throwaway key that seals nothing and opens nothing stored,
    /// and the start-up writes nothing: no key id, no key file, no triggers.
    pub key: bool,
}

impl App {
    /// Opens the database, applies pending schema migrations and checks the encryption key.
    pub fn open(config: Config) -> Result<App, Failure> {
        App::open_with(
            config,
            Start {
                migrations: true,
                key: true,
            },
        )
    }

    /// Opens the database and does what `start` says.
    pub fn open_with(config: Config, start: Start) -> Result<App, Failure> {
        let app = App::open_to_serve(config, start)?;
        let conn = app.connection()?;
        *app.first.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
        Ok(app)
    }

    /// `open_with` for a server: on a fresh file, the start-up is made durable by the first
    /// `store()` (the first request's, or the flusher's right after the ready line) instead of
    /// before the ready line.
    pub fn open_to_serve(config: Config, start: Start) -> Result<App, Failure> {
        let db = Database::new(&config.db).map_err(|e| {
            Failure::Runtime(format!(
                "cannot open the database {}: {e}",
                describe(&config.db)
            ))
        })?;
        App::start(config, db, true, start)
    }

    /// For a plan (`--dry-run`): the same start-up, run on an in-memory copy of the database
    /// file, so that nothing is written: not the schema migrations or other upgrades an older
    /// database gets at start, not a key file. A path that does not exist: exit 2, nothing
    /// created.
    pub fn open_copy(config: Config, start: Start) -> Result<App, Failure> {
        let db = match &config.db {
            DbLocation::File(p) if !p.exists() => {
                return Err(Failure::Config(format!(
                    "the database {} does not exist",
                    p.display()
                )))
            }
            DbLocation::File(p) => Database::snapshot_of(p).map_err(|e| {
                Failure::Runtime(format!("cannot read the database {}: {e}", p.display()))
            })?,
            DbLocation::Memory => Database::new(&config.db)
                .map_err(|e| Failure::Runtime(format!("cannot open the database :memory:: {e}")))?,
        };
        App::start(config, db, false, start)
    }

    /// The start-up shared by `open` and `open_copy`; `may_create_files` allows creating the key
    /// file beside a database that holds no sealed value yet (and says the database is the
    /// real one, not a plan's copy).
    fn start(
        mut config: Config,
        db: Database,
        may_create_files: bool,
        start: Start,
    ) -> Result<App, Failure> {
        let db = db.with_busy_timeout(config.busy_timeout);
        let mut conn = db.connect_for_start().map_err(|e| {
            Failure::Runtime(format!(
                "cannot open the database {}: {e}",
                describe(&config.db)
            ))
        })?;
        if start.migrations {
            let applied = if may_create_files {
                db::migrate_schema(&mut conn)
            } else {
                db::migrate_schema_of_copy(&mut conn)
            };
            applied.map_err(|e| {
                Failure::Runtime(format!(
                    "cannot apply schema migrations to {}: {e}",
                    describe(&config.db)
                ))
            })?;
        }
        let sql = |e: crate::store::StoreError| {
            Failure::store(
                format!("cannot prepare the database {}", describe(&config.db)),
                e,
            )
        };
        let schema_version = db::schema_version(&conn).map_err(|e| {
            Failure::Runtime(format!(
                "cannot read the schema version of {}: {e}",
                describe(&config.db)
            ))
        })?;
        let ring = if start.key {
            phases::ensure_column_index(&conn).map_err(sql)?;
            crate::store::evidence::ensure_triggers(&conn).map_err(sql)?;
            meta::upgrade_backfill_flag(&conn).map_err(sql)?;
            settle_key(&mut config, &conn, may_create_files)?
        } else {
            // Commands that neither read nor write a sealed value: no key is read, checked or
            // created; this one is never recorded and seals nothing.
            KeyRing::new(EncryptionKey::generate(), Vec::new())
        };
        Ok(App {
            db,
            ring: Arc::new(ring),
            shared: Arc::new(Shared::new(config.audit_fold_secs)),
            throttle: Throttle::new(),
            address_throttle: (config.login_failures_per_address > 0)
                .then(|| Throttle::with_limit(config.login_failures_per_address)),
            session_ttl_secs: config.session_ttl_secs,
            admin_token: config.admin_token,
            signups_open: config.signups_open,
            max_keys_per_user: config.max_keys_per_user,
            audit_days: config.audit_days,
            write_rate: crate::http::rate::WriteRate::new(config.write_rate_per_minute),
            schema_version,
            first: Mutex::new(Some(conn)),
        })
    }

    /// Before serving: every stored value must be sealed with a key of the ring, so that a
    /// missing key stops keyrack here (exit 2, naming the key ids) instead of answering 500 one
    /// request at a time. The key ids in use are read from an index, nothing is decrypted.
    pub fn check_keys_for_serving(&self) -> Result<(), Failure> {
        let sql = |e: crate::store::StoreError| Failure::store("cannot read the database", e);
        // Read on the start-up's connection where it is still kept (it only reads here).
        let first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        let opened;
        let conn = match &*first {
            Some(conn) => conn,
            None => {
                opened = self
                    .db
                    .connect()
                    .map_err(|e| Failure::Runtime(format!("cannot open the database: {e}")))?;
                &opened
            }
        };
        let mut missing = Vec::new();
        for id in phases::key_ids_in_use(conn).map_err(sql)? {
            let id = KeyId::from_stored(&id);
            if !self.ring.knows(&id) {
                let n = phases::count_sealed_with(conn, &id).map_err(sql)?;
                missing.push(format!("key id {id} ({n} values)"));
            }
        }
        drop(first);
        if missing.is_empty() {
            return Ok(());
        }
        let configured: Vec<String> = self.ring.ids().map(KeyId::to_string).collect();
        Err(Failure::Config(format!(
            "stored values are sealed with keys that are not configured: {}; the configured keys \
             are {} (the database's current key is key id {}). Add the missing keys to \
             KEYRACK_OLD_ENCRYPTION_KEYS (and finish `keyrack rotate-encryption-key`) before serving",
            missing.join(", "),
            configured.join(", "),
            self.ring.current_id()
        )))
    }

    /// A store on a connection of its own (one per worker thread): the start-up's connection
    /// for the first, a new one for every other.
    pub(crate) fn store(&self) -> Result<Store, Failure> {
        let conn = self.connection()?;
        Ok(Store::new(conn, self.ring.clone(), self.shared.clone())
            .with_key_limit(self.max_keys_per_user))
    }

    /// The start-up's connection the first time (made durable first, on a fresh file, while
    /// any other caller waits for the lock), a new one after.
    fn connection(&self) -> Result<rusqlite::Connection, Failure> {
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(conn) = first.take() {
            if let Err(e) = self.db.finish_start(&conn) {
                *first = Some(conn);
                return Err(Failure::Runtime(format!(
                    "cannot write the new database to disk: {e}"
                )));
            }
            return Ok(conn);
        }
        drop(first);
        self.db
            .connect()
            .map_err(|e| Failure::Runtime(format!("cannot open the database: {e}")))
    }
}

fn describe(db: &DbLocation) -> String {
    match db {
        DbLocation::Memory => ":memory:".to_owned(),
        DbLocation::File(p) => p.display().to_string(),
    }
}

/// Finds the encryption key (configured, key file, or none) and checks it against the identity the database
/// recorded at its first start: a wrong key stops keyrack here, before it serves anything.
fn settle_key(
    config: &mut Config,
    conn: &rusqlite::Connection,
    may_create_files: bool,
) -> Result<KeyRing, Failure> {
    let sql = |e: crate::store::StoreError| Failure::store("cannot read the database", e);
    let old = std::mem::take(&mut config.old_encryption_keys);

    let mut fresh_key_file = false;
    let configured = config.encryption_key.take();
    let current = match (configured, &config.db) {
        (Some(k), _) => k,
        (None, DbLocation::Memory) => EncryptionKey::generate(),
        (None, DbLocation::File(_)) => {
            let path = config
                .db
                .key_file()
                .expect("a file database has a key file path");
            if path.exists() {
                read_key_file(&path)?
            } else if !meta::has_encrypted_values(conn).map_err(sql)? && !may_create_files {
                // A plan on a database without sealed values: any key will do, none is kept.
                fresh_key_file = true;
                EncryptionKey::generate()
            } else if !meta::has_encrypted_values(conn).map_err(sql)? {
                let key = EncryptionKey::generate();
                write_key_file(&path, &key)?;
                log::warn!(
                    "created the key file {} with a new encryption key; production should set \
                     KEYRACK_ENCRYPTION_KEY instead (keep the key safe: without it the stored keys are lost)",
                    path.display()
                );
                fresh_key_file = true;
                key
            } else {
                return Err(Failure::Config(format!(
                    "KEYRACK_ENCRYPTION_KEY is not set and the key file {} does not exist, but the \
                     database holds encrypted keys; set KEYRACK_ENCRYPTION_KEY to the key they were \
                     sealed with",
                    path.display()
                )));
            }
        }
    };

    let recorded = meta::key_id(conn)
        .map_err(sql)?
        .map(|s| KeyId::from_stored(&s));
    let ring = KeyRing::new(current, old);
    match recorded {
        None => meta::set_key_id(conn, ring.current_id().as_str()).map_err(sql)?,
        Some(id) if ring.switch_to(&id) => {
            if &id != ring.configured_id() {
                // The configured key is not current yet: values go on being sealed with the
                // database's current key until a rotation makes the configured one current.
                log::info!(
                    "KEYRACK_ENCRYPTION_KEY (key id {}) is not yet the database's current key \
                     (key id {id}): new values are sealed with key id {id} until \
                     `keyrack rotate-encryption-key` makes it current",
                    ring.configured_id()
                );
            }
        }
        Some(_) if fresh_key_file => {
            // Nothing was sealed with the recorded key: the new key file's key takes its place.
            meta::set_key_id(conn, ring.current_id().as_str()).map_err(sql)?
        }
        Some(id) => {
            return Err(Failure::Config(format!(
                "KEYRACK_ENCRYPTION_KEY (key id {}) is not the database's current key (key id \
                 {id}), and no key of KEYRACK_OLD_ENCRYPTION_KEYS is; set KEYRACK_ENCRYPTION_KEY \
                 to the database's current key (to change keys: restart with the new key and the \
                 old one in KEYRACK_OLD_ENCRYPTION_KEYS, run `keyrack rotate-encryption-key`, then \
                 restart with the new key alone)",
                ring.configured_id()
            )))
        }
    }
    Ok(ring)
}

pub(crate) fn read_key_file(path: &Path) -> Result<EncryptionKey, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::Config(format!("cannot read the key file {}: {e}", path.display()))
    })?;
    let text = Secret::new(text);
    EncryptionKey::from_base64(text.expose()).map_err(|e| {
        Failure::Config(format!(
            "the key file {} {e}; it must hold 32 bytes in standard base64, as `keyrack gen-key` prints",
            path.display()
        ))
    })
}

pub(crate) fn write_key_file(path: &Path, key: &EncryptionKey) -> Result<(), Failure> {
    let fail = |e: std::io::Error| {
        Failure::Runtime(format!(
            "cannot create the key file {}: {e}",
            path.display()
        ))
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    f.write_all(key.to_base64().as_bytes()).map_err(fail)?;
    f.write_all(b"\n").map_err(fail)?;
    f.sync_all().map_err(fail)?;
    Ok(())
}
