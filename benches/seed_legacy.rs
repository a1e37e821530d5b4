//! Seeds a database with N users of the legacy system, each with an OpenAI key in the legacy
//! column, for measuring `migrate` and `remove-legacy-column` at scale:
//!
//!     KEYRACK_ENCRYPTION_KEY=… cargo run --release --example seed_legacy -- bench.db 100000
//!
//! Every user's password is `correct horse battery` (one argon2 hash, shared, to keep seeding
//! fast); user N's key is `sk-legacy-<N, 8 digits>-abcdefgh`. The database ends in phase legacy.

use keyrack::crypto::{Binding, EncryptionKey, KeyRing};
use keyrack::domain::Password;
use rusqlite::params;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(n)) = (args.next(), args.next()) else {
        eprintln!("usage: seed_legacy DB_PATH N   (with KEYRACK_ENCRYPTION_KEY set)");
        std::process::exit(2);
    };
    let n: i64 = n.parse()?;
    let key = EncryptionKey::from_base64(&std::env::var("KEYRACK_ENCRYPTION_KEY")?)?;
    let key_id = key.id().as_str().to_owned();
    let ring = KeyRing::new(key, vec![]);
    let start = Instant::now();

    let db = keyrack::db::Database::new(&keyrack::config::DbLocation::File(path.into()))?;
    let mut conn = db.connect()?;
    keyrack::db::migrate_schema(&mut conn)?;
    conn.execute_batch("PRAGMA synchronous=OFF")?;
    let hash = keyrack::auth::hash_password(&Password::parse("correct horse battery")?)
        .map_err(|e| e.to_string())?;
    let tx = conn.transaction()?;
    {
        let mut ins = tx.prepare(
            "INSERT INTO users(email, password_hash, openai_api_key, created_at) VALUES (?1, ?2, NULL, 0)",
        )?;
        let mut col = tx.prepare("UPDATE users SET openai_api_key = ?2 WHERE id = ?1")?;
        for i in 0..n {
            let id = ins.insert(params![format!("user{i}@example.com"), hash])?;
            let sealed = ring.seal(
                Binding {
                    user_id: id,
                    provider: "openai",
                },
                &format!("sk-legacy-{id:08}-abcdefgh"),
            );
            col.execute(params![id, sealed])?;
        }
        tx.execute(
            "INSERT INTO keyrack_meta(name, value) VALUES ('phase', 'legacy')
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            [],
        )?;
        tx.execute(
            "INSERT INTO keyrack_meta(name, value) VALUES ('encryption_key_id', ?1)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            [key_id],
        )?;
    }
    tx.commit()?;
    eprintln!(
        "seeded {n} legacy users in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
