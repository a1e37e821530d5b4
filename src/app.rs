//! Start-up shared by every command: open the database, apply schema migrations, settle the
//! encryption key (SPEC section 2), and hold what the workers share.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::auth::Throttle;
use crate::config::{Config, DbLocation};
use crate::crypto::{EncryptionKey, KeyId, KeyRing};
use crate::db::{self, Database};
use crate::domain::Secret;
use crate::store::{meta, Store};
use crate::usage::UsageLog;
use crate::Failure;

/// What every worker and command shares.
pub struct App {
    pub db: Database,
    pub ring: Arc<KeyRing>,
    pub usage: Arc<UsageLog>,
    pub throttle: Throttle,
    pub session_ttl_secs: i64,
    pub admin_token: Option<Secret>,
}

impl App {
    /// Opens the database, applies pending schema migrations and checks the encryption key.
    pub fn open(mut config: Config) -> Result<App, Failure> {
        let db = Database::new(&config.db).map_err(|e| {
            Failure::Runtime(format!(
                "cannot open the database {}: {e}",
                describe(&config.db)
            ))
        })?;
        let mut conn = db.connect().map_err(|e| {
            Failure::Runtime(format!(
                "cannot open the database {}: {e}",
                describe(&config.db)
            ))
        })?;
        db::migrate_schema(&mut conn).map_err(|e| {
            Failure::Runtime(format!(
                "cannot apply schema migrations to {}: {e}",
                describe(&config.db)
            ))
        })?;
        let ring = settle_key(&mut config, &conn)?;
        Ok(App {
            db,
            ring: Arc::new(ring),
            usage: Arc::new(UsageLog::default()),
            throttle: Throttle::new(),
            session_ttl_secs: config.session_ttl_secs,
            admin_token: config.admin_token,
        })
    }

    /// A store on a new connection (one per worker thread).
    pub fn store(&self) -> Result<Store, Failure> {
        let conn = self
            .db
            .connect()
            .map_err(|e| Failure::Runtime(format!("cannot open the database: {e}")))?;
        Ok(Store::new(conn, self.ring.clone(), self.usage.clone()))
    }
}

fn describe(db: &DbLocation) -> String {
    match db {
        DbLocation::Memory => ":memory:".to_owned(),
        DbLocation::File(p) => p.display().to_string(),
    }
}

/// Finds the encryption key (SPEC section 2) and checks it against the identity the database
/// recorded at its first start: a wrong key stops keyrack here, before it serves anything.
fn settle_key(config: &mut Config, conn: &rusqlite::Connection) -> Result<KeyRing, Failure> {
    let sql =
        |e: crate::store::StoreError| Failure::Runtime(format!("cannot read the database: {e}"));
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
        Some(id) if ring.knows(&id) => {}
        Some(_) if fresh_key_file => {
            // Nothing was sealed with the recorded key: the new key file's key takes its place.
            meta::set_key_id(conn, ring.current_id().as_str()).map_err(sql)?
        }
        Some(id) => {
            return Err(Failure::Config(format!(
                "KEYRACK_ENCRYPTION_KEY is not the key this database was created with (the database \
                 expects key id {id}, the configured key is {}); set the right key, or list the old \
                 one in KEYRACK_OLD_ENCRYPTION_KEYS and run `keyrack rotate-encryption-key`",
                ring.current_id()
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
