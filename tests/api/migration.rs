//! The migration's two promises under stress: no phase command loses a key, and no request
//! answers a key that was replaced. Revert over values the table lacks, revert/set/migrate
//! cycles read by a client, an interrupted migrate, foreign writes to the column, rotation under
//! a running server, and the plans (`--dry-run`) and backups of the destructive commands.

use rusqlite::types::Value as Sql;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

fn text(db: &std::path::Path, query: &str) -> Option<String> {
    match sql_value(db, query) {
        Sql::Text(t) => Some(t),
        Sql::Null => None,
        other => panic!("{query}: {other:?}"),
    }
}

fn int(db: &std::path::Path, query: &str) -> i64 {
    match sql_value(db, query) {
        Sql::Integer(n) => n,
        other => panic!("{query}: {other:?}"),
    }
}

/// Every user's column value and every key row, to show that a command wrote nothing.
fn snapshot(db: &std::path::Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut out = String::new();
    let pending: bool = c
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'legacy_backfill')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    for q in [
        "SELECT value FROM keyrack_meta WHERE name = 'phase'",
        "SELECT group_concat(id || '=' || ifnull(openai_api_key, '-'), ',') FROM users",
        "SELECT group_concat(id || ':' || user_id || ':' || provider || ':' || is_default || ':' || sealed_key, ',') FROM api_keys",
        if pending {
            "SELECT group_concat(user_id, ',') FROM legacy_backfill"
        } else {
            "SELECT NULL"
        },
    ] {
        let v: Option<String> = c.query_row(q, [], |r| r.get(0)).unwrap();
        out.push_str(&v.unwrap_or_default());
        out.push('\n');
    }
    out
}

fn backups_in(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".backup-"))
        .collect()
}

// ---- item 1: revert keeps what the table lacks --------------------------------------------

#[test]
fn revert_keeps_an_unmigrated_column_key() {
    let env = Env::new();
    let out = env.run(&["load-fixtures", &repo_fixture("legacy-one.json")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let before = text(&env.db(), "SELECT openai_api_key FROM users").expect("a column key");
    assert_eq!(status_json(&env)["unmigrated"], 1);

    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains("1 keys in the legacy column (0 written from api_keys, 0 already there, 1 kept as they were"),
        "{said}"
    );
    assert!(said.contains("1 not in api_keys"), "{said}");
    assert_eq!(
        text(&env.db(), "SELECT openai_api_key FROM users").as_deref(),
        Some(before.as_str()),
        "the column value is kept exactly"
    );
    // A backup was written first, beside the database, and it holds the key too.
    let backups = backups_in(&env);
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert!(said.contains(&format!(
        "the backup is {}",
        env.path(&backups[0]).display()
    )));
    assert_eq!(
        text(&env.path(&backups[0]), "SELECT openai_api_key FROM users").as_deref(),
        Some(before.as_str())
    );
    let s = env.serve();
    let t = s.login("ada@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-legacy-0123456789abcdef")
    );
}

#[test]
fn revert_keeps_undecryptable_column_values_and_replaces_conflicts_without_losing_them() {
    let env = legacy_env(8);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let db = env.db();
    // Users 1-3: values that do not open (tampered, another user's, not keyrack's format);
    // users 4-5: sealed with key B, which is not configured yet. Users 6-8 are in step.
    sql(
        &db,
        "UPDATE users SET openai_api_key = 'kr1:' || substr(openai_api_key, 5, 17) || 'AAAA' || substr(openai_api_key, 26) WHERE id = 1;
         UPDATE users SET openai_api_key = (SELECT openai_api_key FROM users WHERE id = 7) WHERE id = 2;
         UPDATE users SET openai_api_key = 'sk-plaintext-written-by-hand' WHERE id = 3;",
    );
    for id in [4, 5] {
        sql(
            &db,
            &format!(
                "UPDATE users SET openai_api_key = '{}' WHERE id = {id}",
                seal_like_keyrack(KEY_B, id, "openai", &format!("sk-under-key-b-{id}-0123"))
            ),
        );
    }
    // User 6: a conflict (another program wrote a valid key into the column in phase dual).
    sql(
        &db,
        &format!(
            "UPDATE users SET openai_api_key = '{}' WHERE id = 6",
            seal_like_keyrack(KEY_A, 6, "openai", "sk-foreign-write-0123456789")
        ),
    );
    let st = status_json(&env);
    assert_eq!(
        (st["undecryptable"].as_i64(), st["conflicts"].as_i64()),
        (Some(5), Some(1))
    );
    let column_before: Vec<Option<String>> = (1..=6)
        .map(|id| {
            text(
                &db,
                &format!("SELECT openai_api_key FROM users WHERE id = {id}"),
            )
        })
        .collect();

    // The plan first: nothing written.
    let snap = snapshot(&db);
    let out = env.run(&["revert", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = stdout(&out);
    assert!(plan.contains("5 would be kept as they were"), "{plan}");
    assert!(plan.contains("1 conflicting would be replaced"), "{plan}");
    assert!(
        plan.contains("0 not in api_keys, 5 that do not decrypt"),
        "{plan}"
    );
    assert_eq!(snapshot(&db), snap, "a dry run writes nothing");
    assert!(backups_in(&env).is_empty());

    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("5 kept as they were"), "{said}");
    assert!(said.contains("user ids 1, 2, 3, 4, 5"), "{said}");
    assert!(
        said.contains("1 conflicting replaced by the api_keys key"),
        "{said}"
    );
    for id in 1..=5 {
        assert_eq!(
            text(
                &db,
                &format!("SELECT openai_api_key FROM users WHERE id = {id}")
            ),
            column_before[id as usize - 1],
            "user {id}: kept exactly"
        );
    }
    // The conflict: the column now holds the table's key, and the column's value is an extra key.
    assert_eq!(
        int(&db, "SELECT COUNT(*) FROM users u JOIN api_keys k ON k.user_id = u.id AND k.is_default = 1 WHERE u.id = 6 AND k.sealed_key = u.openai_api_key"),
        1
    );
    assert_eq!(
        text(
            &db,
            "SELECT sealed_key FROM api_keys WHERE user_id = 6 AND is_default = 0"
        ),
        column_before[5]
    );
    // status still sees every undecryptable value; none was made to look healthy.
    let st = status_json(&env);
    assert_eq!(st["phase"], "legacy");
    assert_eq!(st["undecryptable"], 5);
    // With key B configured, the two values sealed with it open.
    let with_b = Env {
        dir: env.dir,
        vars: vec![],
    }
    .var("KEYRACK_ENCRYPTION_KEY", KEY_A)
    .var("KEYRACK_OLD_ENCRYPTION_KEYS", KEY_B);
    assert_eq!(status_json(&with_b)["undecryptable"], 3);
    let s = with_b.serve();
    let t = s.login("user3@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-under-key-b-4-0123")
    );
    // After a migrate, both of user 6's values are still there.
    drop(s);
    with_b.run(&["migrate"]);
    let s = with_b.serve();
    let t = s.login("user5@example.com");
    let keys = s.get("/user/api-keys", Some(&t)).body["keys"].clone();
    assert_eq!(keys.as_array().unwrap().len(), 2, "{keys}");
}

// ---- item 2: no replaced key is served across revert / set / migrate ---------------------

/// One revert/set/migrate cycle with a reader of the last user; returns (reads, stale reads).
fn cycle_reads(env: &Env, s: &Server, token: &str, cycle: usize) -> (usize, usize) {
    let k1 = format!("sk-cycle{cycle}-first-0123456789");
    let k2 = format!("sk-cycle{cycle}-second-0123456789");
    assert_eq!(s.set_key(token, "openai", &k1).status, 200);
    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(s.set_key(token, "openai", &k2).status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let stale = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, stale) = (stop.clone(), reads.clone(), stale.clone());
        let (base, token, k2) = (s.base.clone(), token.to_owned(), k2.clone());
        std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build();
            while !stop.load(Ordering::Relaxed) {
                let r = agent
                    .get(&format!("{base}/user/api-key?reveal=true"))
                    .set("Authorization", &format!("Bearer {token}"))
                    .call();
                reads.fetch_add(1, Ordering::Relaxed);
                let v: serde_json::Value = match r {
                    Ok(resp) => resp.into_json().unwrap_or_default(),
                    Err(e) => json!({ "error": e.to_string() }),
                };
                if v["api_key"] != k2.as_str() {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let out = env.run(&["migrate"]);
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(s.reveal(token, "openai").as_deref(), Some(k2.as_str()));
    (reads.load(Ordering::Relaxed), stale.load(Ordering::Relaxed))
}

#[test]
fn no_read_answers_a_replaced_key_while_migrate_runs_after_a_revert() {
    // Enough users that the backfill takes a while; the reader's user is created last, so the
    // backfill reaches it last.
    let env = legacy_env(6_000);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let s = env.serve();
    let t = s.user("last@example.com");
    let (mut reads, mut stale) = (0, 0);
    for cycle in 0..2 {
        let (r, st) = cycle_reads(&env, &s, &t, cycle);
        eprintln!("cycle {cycle}: {r} reads during migrate, {st} answered a replaced key");
        reads += r;
        stale += st;
    }
    assert!(reads > 0, "no read ran during the migrates");
    assert_eq!(stale, 0, "{stale} of {reads} reads answered a replaced key");
}

#[test]
fn an_interrupted_migrate_says_so_and_the_column_still_wins() {
    // Three batches of 200 users (a debug build's KEYRACK_TEST_BATCH in place of 2,000): a
    // signal as soon as the phase is dual stops after the first.
    let n = 600;
    let template = legacy_env(n).var("KEYRACK_TEST_BATCH", "200");
    assert_eq!(template.run(&["migrate"]).status.code(), Some(0));
    // The last user sets K1 in phase dual, then K2 in phase legacy after a revert.
    {
        let s = template.serve();
        let t = s.user("last@example.com");
        assert_eq!(
            s.set_key(&t, "openai", "sk-first-K1-0123456789").status,
            200
        );
        assert_eq!(template.run(&["revert", "--yes"]).status.code(), Some(0));
        assert_eq!(
            s.set_key(&t, "openai", "sk-second-K2-0123456789").status,
            200
        );
    }
    let mut landed = false;
    for attempt in 0..6 {
        let env = Env::new();
        for suffix in ["", "-wal", "-shm"] {
            let from = format!("{}{suffix}", template.db().display());
            if std::path::Path::new(&from).exists() {
                std::fs::copy(&from, format!("{}{suffix}", env.db().display())).unwrap();
            }
        }
        let child = std::process::Command::new(BIN)
            .current_dir(env.dir.path())
            .args(["--db", env.db().to_str().unwrap(), "migrate"])
            .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
            .env("KEYRACK_TEST_BATCH", "200")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Ctrl-C as soon as the phase is dual (the backfill has started).
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let c = rusqlite::Connection::open(env.db()).unwrap();
            let phase: Option<String> = c
                .query_row(
                    "SELECT value FROM keyrack_meta WHERE name = 'phase'",
                    [],
                    |r| r.get(0),
                )
                .ok();
            if phase.as_deref() == Some("dual") {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        signal(&child, libc::SIGINT);
        let out = child.wait_with_output().unwrap();
        let said = stdout(&out);
        if out.status.code() == Some(0) {
            eprintln!("attempt {attempt}: migrate finished before the signal; again");
            continue;
        }
        // A signal that comes late (a busy machine) can land after the last batch but before
        // migrate sees that it was the last: interrupted, with no user left to backfill. That
        // tells nothing about an interrupted backfill either.
        if out.status.code() == Some(1) && status_json(&env)["backfill_unfinished"] == false {
            eprintln!("attempt {attempt}: the signal came after the last batch; again");
            continue;
        }
        landed = true;
        assert_eq!(out.status.code(), Some(1), "{said}{}", stderr(&out));
        assert!(said.contains("migrate interrupted after"), "{said}");
        assert!(
            said.contains("still pending backfill from legacy"),
            "{said}"
        );
        let st = status_json(&env);
        assert_eq!(st["backfill_unfinished"], true, "{st}");
        let left = st["backfill_users_left"].as_i64().unwrap();
        assert!(left > 0 && left <= n + 1, "{st}");
        let text_status = stdout(&env.run(&["status"]));
        assert!(
            text_status.contains(&format!(
                "backfill from legacy unfinished: {left} users left"
            )),
            "{text_status}"
        );
        // The last user is not backfilled yet: the column's K2 wins, in every request.
        let s = env.serve();
        let t = s.login("last@example.com");
        let r = s.get("/user/api-key?reveal=true", Some(&t));
        assert_eq!(r.body["api_key"], "sk-second-K2-0123456789", "{}", r.raw);
        assert_eq!(r.body["source"], "users_column");
        assert_eq!(
            s.reveal(&t, "openai").as_deref(),
            Some("sk-second-K2-0123456789")
        );
        // A rerun finishes the job.
        let out = env.run(&["migrate"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let st = status_json(&env);
        assert_eq!(
            (
                st["backfill_unfinished"].as_bool(),
                st["unmigrated"].as_i64(),
                st["conflicts"].as_i64()
            ),
            (Some(false), Some(0), Some(0))
        );
        break;
    }
    assert!(
        landed,
        "no Ctrl-C landed inside a migrate; the test proved nothing"
    );
}

#[test]
fn a_delete_while_the_column_wins_removes_the_newer_key_only_as_asked() {
    // Pending backfill after a revert, the user deletes their key: the key they see (K2) goes,
    // the older one is not brought back, and nothing of K2 is served afterwards.
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    assert_eq!(s.set_key(&t, "openai", "sk-first-K1-aaaa1111").status, 200);
    assert_eq!(env.run(&["revert", "--yes"]).status.code(), Some(0));
    assert_eq!(s.set_key(&t, "openai", "sk-second-K2-bbbb2222").status, 200);
    // What an interrupted migrate leaves: phase dual, the user pending.
    sql(
        &env.db(),
        "UPDATE keyrack_meta SET value = 'dual' WHERE name = 'phase'; INSERT INTO legacy_backfill SELECT id FROM users;",
    );
    let listing = s.get("/user/api-keys", Some(&t));
    let keys = listing.body["keys"].as_array().unwrap().clone();
    let default: Vec<_> = keys.iter().filter(|k| k["is_default"] == true).collect();
    assert_eq!(default.len(), 1, "{keys:?}");
    assert_eq!(default[0]["masked_key"], "sk-...2222");
    // Deleting the default deletes K2; K1 stays an extra key, not served as the default.
    assert_eq!(s.delete("/user/api-key", Some(&t)).status, 204);
    let r = s.get("/user/api-key?reveal=true", Some(&t));
    assert_eq!(r.body["has_key"], false, "{}", r.raw);
    assert_eq!(int(&env.db(), "SELECT COUNT(*) FROM legacy_backfill"), 0);
}

// ---- item 3: a value keyrack wrote in dual is never replaced by a later column value ------

#[test]
fn a_column_write_after_keyrack_wrote_in_dual_is_a_conflict_even_while_backfill_is_unfinished() {
    let env = legacy_env(3);
    // User 1's column value does not open: the backfill stays unfinished for that user.
    sql(
        &env.db(),
        "UPDATE users SET openai_api_key = 'sk-not-sealed-by-keyrack' WHERE id = 1",
    );
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("backfill from legacy unfinished: 1 users left"));
    let st = status_json(&env);
    assert_eq!(
        (
            st["backfill_unfinished"].as_bool(),
            st["backfill_users_left"].as_i64()
        ),
        (Some(true), Some(1))
    );
    // User 2 (id 2) sets a key through keyrack in phase dual.
    let s = env.serve();
    let t = s.login("user1@example.com");
    assert_eq!(
        s.set_key(&t, "openai", "sk-set-in-dual-0123456789").status,
        200
    );
    // Then another program writes an older value back into the column.
    sql(
        &env.db(),
        &format!(
            "UPDATE users SET openai_api_key = '{}' WHERE id = 2",
            seal_like_keyrack(KEY_A, 2, "openai", "sk-stale-from-elsewhere-0123")
        ),
    );
    // keyrack's value is served and kept; the column's is a conflict, reported, not applied.
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-set-in-dual-0123456789")
    );
    let st = status_json(&env);
    assert_eq!(
        (st["conflicts"].as_i64(), st["unmigrated"].as_i64()),
        (Some(1), Some(0)),
        "{st}"
    );
    let m = s.post("/user/migrate-api-keys", Some(&t), json!({}));
    assert_eq!(m.status, 200, "{}", m.raw);
    assert_eq!(
        (m.body["migrated"].as_i64(), m.body["conflicts"].as_i64()),
        (Some(0), Some(1))
    );
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-set-in-dual-0123456789")
    );
    let out = env.run(&["migrate"]);
    assert!(stdout(&out).contains("conflicts 1"), "{}", stdout(&out));
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-set-in-dual-0123456789")
    );
    // remove-legacy-column refuses, naming the backfill that is not finished.
    let out = env.run(&["remove-legacy-column", "--yes", "--dry-run"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("conflicts 1")
            && stderr(&out).contains("backfill from legacy unfinished: 1 users left"),
        "{}",
        stderr(&out)
    );
}

// ---- item 4: rotation under a running server ------------------------------------------------

#[test]
fn a_rotation_under_a_server_without_the_new_key_refuses_writes_and_says_to_restart() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    assert_eq!(
        s.set_key(&t, "openai", "sk-before-rotation-0123").status,
        200
    );
    let rotate = |e: &Env| {
        let mut c = std::process::Command::new(BIN);
        c.args(["--db", e.db().to_str().unwrap(), "rotate-encryption-key"])
            .env_clear()
            .env("KEYRACK_ENCRYPTION_KEY", KEY_B)
            .env("KEYRACK_OLD_ENCRYPTION_KEYS", KEY_A)
            .stdin(std::process::Stdio::null());
        c.output().unwrap()
    };
    let out = rotate(&env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The server holds A only: it never seals with A again; writes answer 503 and say why.
    for _ in 0..2 {
        let r = s.set_key(&t, "openai", "sk-after-rotation-0123");
        assert_eq!(r.status, 503, "{}", r.raw);
        assert_eq!(r.code(), "key_changed");
        assert!(r.header("Retry-After").is_some(), "{:?}", r.headers);
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("the database's current key") && msg.contains("restart"),
            "{msg}"
        );
    }
    // Reads of the values the rotation re-sealed with B answer the same 503, never 500.
    for path in ["/user/api-key?reveal=true", "/user/api-key"] {
        let r = s.get(path, Some(&t));
        assert_eq!(r.status, 503, "{path}: {}", r.raw);
        assert_eq!(r.code(), "key_changed");
        assert!(
            r.header("Retry-After")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v >= 1),
            "{:?}",
            r.headers
        );
    }
    let logs = s.logs_settled();
    assert_eq!(
        logs.matches("which this server does not hold").count(),
        1,
        "logged once: {logs}"
    );
    assert!(
        text(&env.db(), "SELECT sealed_key FROM api_keys")
            .unwrap()
            .starts_with(&seal_like_keyrack(KEY_B, 1, "openai", "x")[..21]),
        "nothing was sealed with A after the rotation"
    );
    s.terminate();
    // A restart with A alone: exit 2, saying it is not the database's current key.
    let out = serve_briefly(&env);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not the database's current key"),
        "{}",
        stderr(&out)
    );
    // With B alone, while a value sealed with A remains: refused at start, naming A's key id.
    let only_b = Env {
        dir: env.dir,
        vars: vec![],
    }
    .var("KEYRACK_ENCRYPTION_KEY", KEY_B);
    sql(
        &only_b.db(),
        &format!(
            "UPDATE api_keys SET sealed_key = '{}';
             UPDATE users SET openai_api_key = (SELECT sealed_key FROM api_keys);",
            seal_like_keyrack(KEY_A, 1, "openai", "sk-left-behind-0123")
        ),
    );
    let a_id = &seal_like_keyrack(KEY_A, 1, "openai", "x")[4..20];
    let out = serve_briefly(&only_b);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("key id {a_id} (2 values)")),
        "{}",
        stderr(&out)
    );
    // Finishing the rotation with both keys clears the way.
    let out = rotate(&only_b);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = only_b.serve();
    let t = s.login("ada@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-left-behind-0123")
    );
}

/// `serve` expected to refuse at start: its output, or a panic if it serves after all.
fn serve_briefly(env: &Env) -> std::process::Output {
    let mut child = std::process::Command::new(BIN)
        .current_dir(env.dir.path())
        .env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args([
            "--db",
            env.db().to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if wait_timeout(&mut child, Duration::from_secs(30)).is_none() {
        let _ = child.kill();
        panic!("serve did not refuse to start");
    }
    child.wait_with_output().unwrap()
}

// ---- item 5: plans, confirmation before backup, failed backups ------------------------------

#[test]
fn dry_runs_write_nothing_and_exit_as_the_real_run_would() {
    let env = legacy_env(4);
    let snap = snapshot(&env.db());
    let out = env.run(&["migrate", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .contains("migrated 4, already migrated 0, conflicts 0, failed 0; nothing was written"),
        "{}",
        stdout(&out)
    );
    assert_eq!(snapshot(&env.db()), snap);
    let out = env.run(&["remove-legacy-column", "--dry-run"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "refused in phase legacy, as the real run"
    );
    let out = env.run(&["revert", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("already legacy"));

    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let snap = snapshot(&env.db());
    let out = env.run(&["remove-legacy-column", "--dry-run"]);
    says(&out, 0, "4 column keys, all in api_keys");
    let out = env.run(&["revert", "--dry-run"]);
    says(&out, 0, "4 keys in the legacy column");
    assert_eq!(snapshot(&env.db()), snap);
    assert!(backups_in(&env).is_empty());

    // A conflict: migrate's plan exits 1, as the run would.
    let env = Env::new();
    env.run(&["load-fixtures", &repo_fixture("conflict.json")]);
    let snap = snapshot(&env.db());
    let out = env.run(&["migrate", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("conflicts 1"), "{}", stdout(&out));
    assert_eq!(snapshot(&env.db()), snap);
}

#[test]
fn a_backup_that_fails_is_removed_and_nothing_changes() {
    let env = legacy_env(3_000);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let snap = snapshot(&env.db());
    // A file size limit makes the copy fail part way, as a full disk would (SIGXFSZ ignored,
    // so the write fails with EFBIG instead of killing the process). 64 KiB lets the database's
    // own shared-memory file be created; the backup of 3,000 keys is far larger.
    for (cmd, path) in [("revert", "r.db"), ("remove-legacy-column", "p.db")] {
        let backup = env.path(path);
        let script = format!(
            "trap '' XFSZ; ulimit -f 64; exec {BIN} --db {} {cmd} --yes --backup {}",
            env.db().display(),
            backup.display()
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "{cmd}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(stderr(&out).contains("backup"), "{}", stderr(&out));
        assert!(!backup.exists(), "{cmd}: the partial backup was removed");
        let left: Vec<String> = std::fs::read_dir(env.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(path))
            .collect();
        assert!(left.is_empty(), "{cmd}: left behind {left:?}");
        assert_eq!(snapshot(&env.db()), snap, "{cmd}: nothing changed");
    }
}

#[test]
fn a_backup_path_is_a_plain_new_file_never_a_uri_or_a_link() {
    use std::os::unix::fs::PermissionsExt;
    let env = legacy_env(2);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    // A path that SQLite would read as a URI is written as the file it names.
    for name in ["file:x?mode=memory", "file:b.db"] {
        let out = env.run(&["revert", "--yes", "--backup", name]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        assert!(
            stdout(&out).contains(&format!("backup written to {name}\n")),
            "{}",
            stdout(&out)
        );
        let written = env.path(name);
        assert!(written.is_file(), "{name} was written as named");
        assert_eq!(
            std::fs::metadata(&written).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(int(&written, "SELECT COUNT(openai_api_key) FROM users"), 2);
        assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    }
    assert!(!env.path("b.db").exists() && !env.path("x").exists());
    // An existing file, and a symbolic link (even to a file that does not exist), are refused.
    let target = env.path("elsewhere.db");
    std::os::unix::fs::symlink(&target, env.path("link.db")).unwrap();
    std::fs::write(env.path("taken.db"), b"keep me").unwrap();
    for name in ["link.db", "taken.db"] {
        let out = env.run(&["revert", "--yes", "--backup", name]);
        assert_eq!(out.status.code(), Some(3), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
        assert_eq!(status_json(&env)["phase"], "dual");
    }
    assert!(!target.exists());
    assert_eq!(std::fs::read(env.path("taken.db")).unwrap(), b"keep me");
}

/// The files of the environment's directory with their bytes, to show that a command wrote
/// nothing at all (no schema upgrade, no journal mode change, no key file, no leftover WAL).
fn files_in(env: &Env) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn dry_runs_on_a_database_of_the_previous_version_or_a_missing_path_write_nothing() {
    // A database as the version before the per-user backfill marker left it: schema 2, the one
    // flag `backfill_from_legacy`, no key-id indexes, a rollback journal.
    let env = legacy_env(3);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    sql(
        &env.db(),
        &format!(
            "{BACK_TO_SCHEMA_2}
             INSERT INTO keyrack_meta(name, value) VALUES ('backfill_from_legacy', '1');
             PRAGMA journal_mode = DELETE;"
        ),
    );
    let before = files_in(&env);
    for args in [
        &["migrate", "--dry-run"][..],
        &["revert", "--dry-run"],
        &["remove-legacy-column", "--dry-run"],
    ] {
        let out = env.run(args);
        // Only migrate applies schema migrations (here to its in-memory copy); the other
        // commands refuse an older schema, naming `keyrack upgrade`.
        assert!(
            stdout(&out).contains("nothing was written")
                || (out.status.code() == Some(2) && stderr(&out).contains("keyrack upgrade")),
            "{args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("applied schema migration"),
            "{args:?}: a dry run never says it applied anything: {}",
            stderr(&out)
        );
        assert!(
            files_in(&env) == before,
            "{args:?} wrote to the database's files"
        );
    }
    // The plan is the one the upgraded database would follow: every user pending is copied.
    let out = env.run(&["migrate", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A path that does not exist: exit 2 naming it, and no database or key file appears.
    let env = Env::without_key();
    for cmd in ["migrate", "revert", "remove-legacy-column"] {
        let out = env.run(&[cmd, "--dry-run"]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stdout(&out));
        assert!(stderr(&out).contains("keyrack.db"), "{}", stderr(&out));
        assert!(files_in(&env).is_empty(), "{cmd} created files");
    }
}

#[test]
fn a_dry_run_refuses_a_backup_path_as_the_real_run_would() {
    let env = legacy_env(2);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    std::fs::write(env.path("taken.db"), b"keep me").unwrap();
    for cmd in ["revert", "remove-legacy-column"] {
        for path in ["taken.db", "no/such/dir/b.db"] {
            let real = env.run(&[cmd, "--yes", "--backup", path]);
            let dry = env.run(&[cmd, "--dry-run", "--backup", path]);
            assert_eq!(
                real.status.code(),
                Some(3),
                "{cmd} {path}: {}",
                stderr(&real)
            );
            assert_eq!(
                dry.status.code(),
                real.status.code(),
                "{cmd} --dry-run --backup {path}: {}",
                stdout(&dry)
            );
        }
    }
    assert_eq!(std::fs::read(env.path("taken.db")).unwrap(), b"keep me");
    assert_eq!(status_json(&env)["phase"], "dual");
}

#[test]
fn a_revert_killed_while_writing_its_backup_is_finished_by_a_rerun_of_the_same_command() {
    // 4,000 users: the backup takes some tens of milliseconds, and the kill comes within a
    // millisecond or two of the backup's first file. When it came too late all the same (the
    // revert had finished: cores are shared), again from the same database, up to five times.
    let n = 4_000;
    let env = legacy_env(n);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let pristine = env.path("pristine.db");
    assert_eq!(
        env.run(&["backup", pristine.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let named = |env: &Env| {
        std::fs::read_dir(env.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("b.db"))
            .collect::<Vec<_>>()
    };
    let mut landed = false;
    for attempt in 0..5 {
        for f in named(&env) {
            std::fs::remove_file(env.path(&f)).unwrap();
        }
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", env.db().display()));
        }
        std::fs::copy(&pristine, env.db()).unwrap();
        let mut child = std::process::Command::new(BIN)
            .current_dir(env.dir.path())
            .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
            .env("RUST_LOG", "warn")
            .args(["--db", env.db().to_str().unwrap()])
            .args(["revert", "--yes", "--backup", "b.db"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed as soon as the backup has begun.
        let deadline = Instant::now() + Duration::from_secs(60);
        while named(&env).is_empty() {
            assert!(Instant::now() < deadline, "the backup never began");
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if status_json(&env)["phase"] == "dual" {
            eprintln!(
                "attempt {attempt}: killed before the revert ({:?})",
                named(&env)
            );
            landed = true;
            break;
        }
        eprintln!("attempt {attempt}: the revert finished before the kill; again");
    }
    assert!(
        landed,
        "no kill landed while the backup was written; the test proved nothing"
    );
    // The same command again finishes, and the backup at the path is complete.
    let out = env.run(&["revert", "--yes", "--backup", "b.db"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(integrity_ok(&env.path("b.db")));
    assert_eq!(
        int(&env.path("b.db"), "SELECT COUNT(openai_api_key) FROM users"),
        n
    );
    assert_eq!(status_json(&env)["phase"], "legacy");
}

#[test]
fn a_backup_path_that_is_one_of_the_databases_own_files_is_refused() {
    // SQLite takes `keyrack.db-journal` for a journal of the database and deletes it at the next
    // open: a backup written there would vanish.
    let env = legacy_env(2);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let db = env.db();
    let db = db.to_str().unwrap();
    for path in [
        "keyrack.db-journal".to_owned(),
        "./keyrack.db-wal".to_owned(),
        format!("{db}-shm"),
        format!("{}/../{}/keyrack.db-journal", env.dir.path().display(), {
            env.dir.path().file_name().unwrap().to_str().unwrap()
        }),
    ] {
        for cmd in ["revert", "remove-legacy-column"] {
            for dry in [false, true] {
                let mut args = vec![cmd, "--yes", "--backup", &path];
                if dry {
                    args.push("--dry-run");
                }
                let out = env.run(&args);
                assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stdout(&out));
                assert!(
                    stderr(&out).contains("the database's own files"),
                    "{}",
                    stderr(&out)
                );
            }
        }
    }
    assert_eq!(status_json(&env)["phase"], "dual");
    assert!(!env.path("keyrack.db-journal").exists());
}

#[test]
fn a_user_deleted_outside_keyrack_while_pending_does_not_block_the_backfill_forever() {
    let env = legacy_env(3);
    sql(
        &env.db(),
        "UPDATE users SET openai_api_key = 'not keyrack format' WHERE id = 2",
    );
    assert_eq!(env.run(&["migrate"]).status.code(), Some(1), "user 2 fails");
    assert_eq!(status_json(&env)["backfill_users_left"], 1);
    // The operator removes the broken account by hand, with a client that does not enforce
    // foreign keys (the sqlite3 shell's default): the user's rows elsewhere stay behind.
    sql(
        &env.db(),
        "PRAGMA foreign_keys = OFF; DELETE FROM users WHERE id = 2",
    );
    let out = env.run(&["migrate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(!stdout(&out).contains("unfinished"), "{}", stdout(&out));
    let s = status_json(&env);
    assert_eq!(s["backfill_users_left"], 0, "{s}");
    assert_eq!(s["backfill_unfinished"], false, "{s}");
    let out = env.run(&["remove-legacy-column", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn the_previous_versions_flag_becomes_per_user_markers() {
    // The previous version kept "the column wins" as one flag, set by a migrate from legacy that
    // had not finished. Its column value is newer than the table's: after the upgrade the column
    // still wins for that user; the flag itself is gone.
    let env = Env::new();
    let out = env.run(&["load-fixtures", &repo_fixture("conflict.json")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let old = BACK_TO_SCHEMA_2;
    sql(
        &env.db(),
        &format!(
            "{old} INSERT INTO keyrack_meta(name, value) VALUES ('backfill_from_legacy', '1');"
        ),
    );
    says(&env.run(&["upgrade"]), 0, "upgraded");
    let s = status_json(&env);
    assert_eq!(s["backfill_users_left"], 1, "{s}");
    assert_eq!(s["conflicts"], 0, "{s}");
    assert_eq!(
        int(
            &env.db(),
            "SELECT COUNT(*) FROM keyrack_meta WHERE name = 'backfill_from_legacy'"
        ),
        0
    );
    let srv = env.serve();
    let t = srv.login("cy@example.com");
    assert_eq!(
        srv.reveal(&t, "openai").as_deref(),
        Some("sk-column-value-0123456789")
    );
    srv.terminate();
    assert_eq!(status_json(&env)["backfill_users_left"], 0);

    // Without the flag the same database shows a conflict, reported and not resolved.
    let env = Env::new();
    env.run(&["load-fixtures", &repo_fixture("conflict.json")]);
    sql(&env.db(), old);
    says(&env.run(&["upgrade"]), 0, "upgraded");
    let s = status_json(&env);
    assert_eq!(s["backfill_users_left"], 0, "{s}");
    assert_eq!(s["conflicts"], 1, "{s}");
}

#[test]
fn dry_runs_read_a_database_a_server_is_writing() {
    // With a server running the WAL file exists: the plan reads the database through a
    // read-only connection and sees what the server committed.
    let env = legacy_env(3);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let s = env.serve();
    let t = s.user("new@example.com");
    assert_eq!(
        s.set_key(&t, "openai", "sk-set-while-serving-01").status,
        200
    );
    let out = env.run(&["revert", "--dry-run"]);
    says(&out, 0, "4 keys in the legacy column");
    let out = env.run(&["migrate", "--dry-run"]);
    says(&out, 0, "already migrated 4");
    assert_eq!(
        s.set_key(&t, "openai", "sk-set-while-serving-02").status,
        200
    );
    s.terminate();
}
