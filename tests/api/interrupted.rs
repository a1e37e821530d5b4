//! Commands stopped part way: `backup PATH` killed or signalled at any moment leaves no file at
//! PATH (at most a temporary file beside it after a SIGKILL, which the next backup removes), and
//! `import-legacy` stops within a second of SIGINT or SIGTERM at any stage, even reading a
//! source that never ends, leaving nothing behind.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A database of about `mib` MiB (keyrack's tables and a filler table of random bytes), so that
/// a copy of it takes long enough to be caught in the middle.
fn large_database(env: &Env, mib: i64) {
    env.create_db();
    let c = rusqlite::Connection::open(env.db()).unwrap();
    c.execute_batch(&format!(
        "CREATE TABLE filler (b BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {})
         INSERT INTO filler SELECT randomblob(1000) FROM n;",
        mib * 1024
    ))
    .unwrap();
}

/// The names of the files in the environment's folder that start with `prefix`.
fn files_starting(env: &Env, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Starts `keyrack backup copy.db` and returns once a file named after it has appeared.
fn backup_under_way(env: &Env) -> Child {
    let child = env
        .command(&["backup", "copy.db"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_starting(env, "copy.db").is_empty() {
        assert!(Instant::now() < deadline, "no file of the backup appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    child
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

#[test]
fn a_backup_killed_part_way_leaves_no_file_at_its_path_and_the_rerun_succeeds() {
    let env = Env::new();
    large_database(&env, 100);
    let copy = env.path("copy.db");
    let mut child = backup_under_way(&env);
    signal(&child, libc::SIGKILL);
    wait_timeout(&mut child, Duration::from_secs(30)).expect("killed");
    assert!(
        !copy.exists(),
        "a file at the backup's path: {:?}",
        files_starting(&env, "copy.db")
    );
    // At most the temporary file (and its journal) beside it.
    for name in files_starting(&env, "copy.db") {
        assert!(name.starts_with("copy.db.partial-"), "{name}");
    }
    let out = env.run(&["backup", "copy.db"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(integrity_ok(&copy));
    // The killed run's temporary file is gone with it.
    assert_eq!(files_starting(&env, "copy.db"), ["copy.db"]);
}

#[test]
fn sigint_or_sigterm_during_a_backup_stops_it_and_removes_its_temporary_file() {
    let env = Env::new();
    large_database(&env, 100);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = backup_under_way(&env);
        signal(&child, sig);
        let sent = Instant::now();
        let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("exit");
        let waited = sent.elapsed();
        let err = stderr_of(&mut child);
        assert_eq!(status.code(), Some(1), "signal {sig}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        assert!(waited < within(Duration::from_secs(1)), "{waited:?}");
        assert!(
            files_starting(&env, "copy.db").is_empty(),
            "signal {sig}: {:?}",
            files_starting(&env, "copy.db")
        );
    }
}

/// A source database whose `users` is a view that never ends.
fn endless_source(path: &Path) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE VIEW users AS
           WITH RECURSIVE r(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM r)
           SELECT id, 'u' || id || '@x.com' AS email, NULL AS openai_api_key FROM r;",
    )
    .unwrap();
}

/// Every file in the environment's folder but the source.
fn files_but_source(env: &Env) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "app.db")
        .collect();
    names.sort();
    names
}

fn import_of(env: &Env, app: &Path) -> Child {
    env.command(&["import-legacy", "--from", app.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn sigint_or_sigterm_stop_an_import_reading_an_endless_source_within_a_second() {
    let env = Env::without_key();
    let app = env.path("app.db");
    endless_source(&app);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = import_of(&env, &app);
        // Well into the reading (the temporary file exists from before it starts).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !files_but_source(&env).iter().any(|n| n.ends_with(".tmp")) {
            assert!(Instant::now() < deadline, "no temporary file");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(300));
        signal(&child, sig);
        let sent = Instant::now();
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        let waited = sent.elapsed();
        if status.is_none() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
            panic!("signal {sig}: still running 30 s after it");
        }
        let err = stderr_of(&mut child);
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
        assert!(err.contains("interrupted; nothing was created"), "{err}");
        assert!(waited < within(Duration::from_secs(1)), "{waited:?}");
        assert!(
            files_but_source(&env).is_empty(),
            "{:?}",
            files_but_source(&env)
        );
    }
}

#[test]
fn an_import_killed_part_way_leaves_nothing_at_its_target_and_the_next_one_clears_it() {
    let env = Env::without_key();
    let app = env.path("app.db");
    endless_source(&app);
    let mut child = import_of(&env, &app);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_but_source(&env).iter().any(|n| n.ends_with(".tmp")) {
        assert!(Instant::now() < deadline, "no temporary file");
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    assert!(!env.db().exists());
    // The next import (of a source that ends) removes what the killed one left.
    let good = env.path("good.db");
    {
        let c = rusqlite::Connection::open(&good).unwrap();
        c.execute_batch(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, openai_api_key TEXT);
             INSERT INTO users VALUES (1, 'a@x.com', 'sk-plain-0123456789');",
        )
        .unwrap();
    }
    let out = env.run(&["import-legacy", "--from", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let left: Vec<String> = files_but_source(&env)
        .into_iter()
        .filter(|n| n != "good.db")
        .collect();
    assert_eq!(left, ["keyrack.db", "keyrack.db.key"], "{left:?}");
}
