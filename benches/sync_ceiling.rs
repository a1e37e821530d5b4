//! The disk's sync ceiling, for the benchmark: single-row committed inserts per second into a
//! SQLite file with keyrack's settings (WAL, synchronous=FULL), one transaction each, for
//! SECONDS. A durable write cannot beat this; keyrack's POST is reported as a ratio of it.
//!
//!     cargo run --release --example sync_ceiling -- DIR SECONDS

use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".into());
    let secs: f64 = args.next().map_or(Ok(3.0), |s| s.parse())?;
    let path = std::path::Path::new(&dir).join("sync-ceiling.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);",
    )?;
    let mut stmt = conn.prepare("INSERT INTO t(v) VALUES (?1)")?;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while start.elapsed() < limit {
        // Outside an explicit transaction each INSERT commits (and syncs) on its own.
        stmt.execute([
            "kr1:0000000000000000:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ])?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("{rate:.1}");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(())
}
