//! The phase commands: migrate, status, remove-legacy-column, revert, rotate-encryption-key,
//! load-fixtures, run against real database files, some while a server serves the same file.

use rusqlite::types::Value as Sql;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

#[test]
fn schema_v2_over_a_legacy_database_starts_in_phase_legacy() {
    // A database of the legacy system: V1 only, users with column keys.
    let env = Env::new();
    env.create_db();
    sql(
        &env.db(),
        "DROP TABLE invites; DROP TABLE service_tokens; DROP INDEX users_by_external_id; \
         ALTER TABLE users DROP COLUMN external_id; ALTER TABLE users DROP COLUMN last_login_at; \
         DROP TRIGGER keyrack_foreign_column_update; DROP TRIGGER keyrack_foreign_column_insert; \
         DROP TABLE legacy_use; ALTER TABLE users DROP COLUMN keyrack_key_writes; DROP TABLE events; \
         DROP TABLE legacy_backfill; DROP INDEX users_by_key_id; DROP TABLE api_keys; \
         DROP TABLE keyrack_meta; DELETE FROM refinery_schema_history WHERE version >= 2;",
    );
    seed_legacy_users(&env.db(), 3);
    // An older schema: only serve, migrate and upgrade apply migrations.
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("keyrack upgrade"), "{}", stderr(&out));
    says(&env.run(&["upgrade"]), 0, "from schema version 1 to");
    let st = status_json(&env);
    assert_eq!(st["phase"], "legacy");
    assert_eq!(st["schema_version"], 7);
    assert_eq!(st["column_keys"], 3);
    assert_eq!(st["unmigrated"], 0, "nothing is unmigrated in phase legacy");
}

#[test]
fn migrate_backfills_reports_and_is_idempotent() {
    let env = legacy_env(25);
    let st = status_json(&env);
    assert_eq!(st["phase"], "legacy");
    assert_eq!(st["users"], 25);
    assert_eq!(st["column_keys"], 25);
    assert_eq!(st["table_keys"], 0);

    let out = env.run(&["migrate"]);
    says(
        &out,
        0,
        "migrated 25, already migrated 0, conflicts 0, failed 0",
    );
    assert!(stderr(&out).contains("migrated 25"), "logged too");
    let st = status_json(&env);
    assert_eq!(st["phase"], "dual");
    assert_eq!(st["table_keys"], 25);
    assert_eq!(
        (
            st["unmigrated"].as_i64(),
            st["conflicts"].as_i64(),
            st["undecryptable"].as_i64()
        ),
        (Some(0), Some(0), Some(0))
    );

    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("migrated 0, already migrated 25, conflicts 0, failed 0"));

    // The keys read back through the API are the seeded plaintexts.
    let s = env.serve();
    let t = s.login("user7@example.com");
    let id = sql_value(
        &env.db(),
        "SELECT id FROM users WHERE email = 'user7@example.com'",
    );
    let Sql::Integer(id) = id else { panic!() };
    assert_eq!(s.reveal(&t, "openai"), Some(seed_key(id)));
}

#[test]
fn migrate_from_legacy_lets_the_column_win_over_stale_rows() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "openai", "sk-before-revert-0123456789");
    assert_eq!(env.run(&["revert", "--yes"]).status.code(), Some(0));
    // In phase legacy the column changes; the table row is now stale.
    s.set_key(&t, "openai", "sk-written-in-legacy-0123456789");
    let out = env.run(&["migrate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("conflicts 0"));
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-written-in-legacy-0123456789")
    );
    // The stale row was kept, as an extra key.
    let l = s.get("/user/api-keys", Some(&t));
    assert_eq!(l.body["keys"].as_array().unwrap().len(), 2);
    assert_eq!(status_json(&env)["conflicts"], 0);
}

#[test]
fn migrate_reports_conflicts_and_failures_with_exit_1() {
    let env = Env::new();
    let f = repo_fixture("conflict.json");
    let out = env.run(&["load-fixtures", &f]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("conflicts 1"), "{}", stdout(&out));
    // A value sealed for someone else fails.
    sql(&env.db(), "INSERT INTO users(email, password_hash, created_at, openai_api_key) SELECT 'eve@example.com', 'x', 0, openai_api_key FROM users WHERE email = 'cy@example.com'");
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("failed 1"), "{}", stdout(&out));
    let st = status_json(&env);
    assert_eq!(st["undecryptable"], 1);
}

#[test]
fn remove_legacy_column_refuses_on_conflict_with_exit_3() {
    let env = Env::new();
    let f = repo_fixture("conflict.json");
    env.run(&["load-fixtures", &f]);
    let out = env.run(&["remove-legacy-column", "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("conflicts 1") && err.contains("user ids 1"),
        "{err}"
    );
    assert_eq!(status_json(&env)["phase"], "dual");
    // Unmigrated keys refuse too.
    let env = legacy_env(3);
    sql(
        &env.db(),
        "UPDATE keyrack_meta SET value = 'dual' WHERE name = 'phase'",
    );
    let out = env.run(&["remove-legacy-column", "--yes"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("unmigrated 3"), "{}", stderr(&out));
    // From phase legacy: run migrate first.
    let env = legacy_env(1);
    let out = env.run(&["remove-legacy-column", "--yes"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("keyrack migrate"));
}

#[test]
fn remove_legacy_column_needs_confirmation_backs_up_then_drops() {
    let env = legacy_env(10);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    // No terminal, no --yes: exit 2 and nothing changed.
    let out = env.run(&["remove-legacy-column"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"));
    assert_eq!(status_json(&env)["phase"], "dual");
    assert_eq!(
        std::fs::read_dir(env.dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("backup"))
            .count(),
        0
    );

    let backup = env.path("before-phase-3.db");
    let out = env.run(&[
        "remove-legacy-column",
        "--yes",
        "--backup",
        backup.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let st = status_json(&env);
    assert_eq!(st["phase"], "new_only");
    assert_eq!(st["column_keys"], 0);
    assert_eq!(st["table_keys"], 10);
    assert_eq!(
        sql_value(
            &env.db(),
            "SELECT COUNT(*) FROM pragma_table_info('users') WHERE name = 'openai_api_key'"
        ),
        Sql::Integer(0)
    );
    // The backup still has the column and its keys.
    assert_eq!(
        sql_value(&backup, "SELECT COUNT(openai_api_key) FROM users"),
        Sql::Integer(10)
    );
    assert_eq!(
        sql_value(
            &backup,
            "SELECT value FROM keyrack_meta WHERE name = 'phase'"
        ),
        Sql::Text("dual".into())
    );
    assert!(integrity_ok(&backup));
    // A rerun has nothing to do.
    let out = env.run(&["remove-legacy-column", "--yes"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("already"));

    // Keys still serve in new_only; writes go to the table.
    let s = env.serve();
    let t = s.login("user3@example.com");
    assert_eq!(s.reveal(&t, "openai"), Some(seed_key(4)));
    let l = s.get("/user/api-keys", Some(&t));
    assert_eq!(
        l.body["legacy_column"],
        json!({"present": false, "has_key": false})
    );
    assert_eq!(
        s.set_key(&t, "openai", "sk-new-only-0123456789").body["source"],
        "api_keys"
    );

    // Revert re-adds the column with each default key.
    let out = env.run(&["revert", "--yes"]);
    says(&out, 0, "10 keys in the legacy column");
    assert_eq!(s.get("/healthz", None).body["phase"], "legacy");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-new-only-0123456789")
    );
    let t9 = s.login("user9@example.com");
    assert_eq!(s.reveal(&t9, "openai"), Some(seed_key(10)));
    // And forward again.
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    assert_eq!(status_json(&env)["unmigrated"], 0);
}

#[test]
fn revert_needs_confirmation_and_reports_counts() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "openai", "sk-openai-0123456789");
    s.set_key(&t, "anthropic", "sk-ant-0123456789");
    let out = env.run(&["revert"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(status_json(&env)["phase"], "dual");
    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out)
            .contains("1 keys in the legacy column (0 written from api_keys, 1 already there")
            && stdout(&out).contains(", 1 table keys"),
        "{}",
        stdout(&out)
    );
    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("already legacy"));
    // Rows are never deleted by a phase change.
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM api_keys"),
        Sql::Integer(2)
    );
}

#[test]
fn migrate_killed_at_random_moments_then_rerun_finishes() {
    // Five batches of 200 users (a debug build's KEYRACK_TEST_BATCH in place of 2,000): room
    // for a kill between two of them.
    let n = 1_000;
    let env = legacy_env(n).var("KEYRACK_TEST_BATCH", "200");
    // How long a whole run takes here, measured on a copy, so the kills land inside it.
    let copy = Env::new().var("KEYRACK_TEST_BATCH", "200");
    std::fs::copy(env.db(), copy.db()).unwrap();
    let pristine = copy.path("pristine.db");
    std::fs::copy(env.db(), &pristine).unwrap();
    let start = std::time::Instant::now();
    assert_eq!(copy.run(&["migrate"]).status.code(), Some(0));
    let full = start.elapsed().as_micros() as u64;

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut interrupted = 0;
    // Each round starts from the legacy database again, so that every kill can land inside a
    // run (once a run has finished, later ones have nothing left to do). Six rounds, one in each
    // sixth of the measured run; when none of them landed between two batches (the measurement
    // and the runs take different times when other tests share the cores: a CI run saw all six
    // land before the first batch or after the last), up to eight more that watch the table and
    // kill as soon as a batch has committed and others are left.
    let pristine = env.path("pristine.db");
    std::fs::copy(env.db(), &pristine).unwrap();
    let rounds = 6;
    for round in 0..rounds + 8 {
        if round >= rounds && interrupted > 0 {
            break;
        }
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", env.db().display()));
        }
        std::fs::copy(&pristine, env.db()).unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // One kill at a random moment of each sixth of the measured run.
        let wait = Duration::from_micros((round * full + seed % full.max(1)) / rounds);
        let mut child = std::process::Command::new(BIN)
            .current_dir(env.dir.path())
            .args(["--db", env.db().to_str().unwrap(), "migrate"])
            .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
            .env("KEYRACK_TEST_BATCH", "200")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if round < rounds {
            std::thread::sleep(wait);
        } else {
            let watcher = rusqlite::Connection::open(env.db()).unwrap();
            watcher.busy_timeout(Duration::from_secs(10)).unwrap();
            // Every millisecond (a batch takes a few here), for at most 30 s.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                let moved: i64 = watcher
                    .query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))
                    .unwrap_or(0);
                if moved > 0 && moved < n {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let _ = child.kill();
        let finished = child.wait().unwrap().success();
        assert!(integrity_ok(&env.db()), "round {round}");
        let Sql::Integer(moved) = sql_value(&env.db(), "SELECT COUNT(*) FROM api_keys") else {
            panic!()
        };
        if round < rounds {
            eprintln!(
                "round {round}: killed after {wait:?} of {full}us, {moved} keys in the table"
            );
        } else {
            eprintln!("round {round}: killed after a batch, {moved} keys in the table");
        }
        if !finished && moved > 0 && moved < n {
            interrupted += 1;
            // Every run killed between two batches is finished by a rerun.
            rerun_finishes(&env, &format!("round {round}"));
        }
    }
    assert!(
        interrupted > 0,
        "no kill landed between two batches of a run; the test proved nothing"
    );
    rerun_finishes(&env, "after the last round");
}

/// `migrate` run again over a killed run's database finishes it: every key in the table, the
/// same sealed text as in the column, nothing unmigrated, the file intact.
fn rerun_finishes(env: &Env, when: &str) {
    let Sql::Integer(n) = sql_value(&env.db(), "SELECT COUNT(*) FROM users") else {
        panic!("no count of users")
    };
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{when}: {}", stderr(&out));
    let st = status_json(env);
    assert_eq!(st["phase"], "dual", "{when}");
    assert_eq!(st["table_keys"], n, "{when}");
    assert_eq!(st["column_keys"], n, "{when}");
    assert_eq!(
        (
            st["unmigrated"].as_i64(),
            st["conflicts"].as_i64(),
            st["undecryptable"].as_i64()
        ),
        (Some(0), Some(0), Some(0)),
        "{when}"
    );
    assert!(integrity_ok(&env.db()), "{when}");
    // Every key is still the seeded one: the column and the table hold the same sealed text.
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM users u JOIN api_keys k ON k.user_id = u.id AND k.is_default = 1 WHERE k.sealed_key = u.openai_api_key"),
        Sql::Integer(n),
        "{when}"
    );
}

#[test]
fn phase_commands_under_a_serving_server_fail_no_request() {
    let env = Env::new();
    let s = env.serve();
    let users: Vec<(String, String)> = (0..6)
        .map(|i| {
            let email = format!("load{i}@example.com");
            let t = s.user(&email);
            let key = format!("sk-load-{i}-0123456789");
            assert_eq!(s.set_key(&t, "openai", &key).status, 200);
            (t, key)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let base = s.base.clone();
    let workers: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(i, (t, key))| {
            let (stop, bad, done, base) = (stop.clone(), bad.clone(), done.clone(), base.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let r = if n % 3 == 0 {
                        agent
                            .post(&format!("{base}/user/api-key"))
                            .set("Authorization", &format!("Bearer {t}"))
                            .send_json(json!({"api_key": key}))
                    } else {
                        agent
                            .get(&format!("{base}/user/api-key?reveal=true"))
                            .set("Authorization", &format!("Bearer {t}"))
                            .call()
                    };
                    match r {
                        Ok(resp) => {
                            let v: serde_json::Value = resp.into_json().unwrap_or_default();
                            if n % 3 != 0 && v["api_key"] != key.as_str() {
                                eprintln!("worker {i}: wrong answer {v}");
                                bad.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            eprintln!("worker {i}: {e}");
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Between two commands, the load goes on: 20 more requests answered.
    let more_requests = || {
        let at = done.load(Ordering::Relaxed);
        assert!(
            poll_until(Duration::from_secs(10), || done.load(Ordering::Relaxed)
                >= at + 20),
            "the load stalled"
        );
    };
    more_requests();
    let out = env.run(&[
        "remove-legacy-column",
        "--yes",
        "--backup",
        env.path("b1.db").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    more_requests();
    assert_eq!(s.get("/healthz", None).body["phase"], "new_only");
    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    more_requests();
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    more_requests();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 50, "load ran");
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "a request failed or answered wrong"
    );
    // The server logged each phase change it followed.
    let logs = s.logs_settled();
    for change in [
        "the phase changed from dual to new_only",
        "the phase changed from new_only to legacy",
        "the phase changed from legacy to dual",
    ] {
        assert!(logs.contains(change), "{change}: {logs}");
    }
    let st = status_json(&env);
    assert_eq!(
        (st["conflicts"].as_i64(), st["undecryptable"].as_i64()),
        (Some(0), Some(0))
    );
}

#[test]
fn rotate_encryption_key_reseals_everything() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "openai", "sk-rotate-0123456789");
    s.set_key(&t, "anthropic", "sk-ant-rotate-0123456789");
    s.terminate();
    let rotated = Env {
        dir: env.dir,
        vars: vec![],
    }
    .var("KEYRACK_ENCRYPTION_KEY", KEY_B)
    .var("KEYRACK_OLD_ENCRYPTION_KEYS", KEY_A);
    // A server with both keys serves every value before, during and after the rotation.
    let during = rotated.serve();
    let t = during.login("ada@example.com");
    assert_eq!(
        during.reveal(&t, "openai").as_deref(),
        Some("sk-rotate-0123456789")
    );
    // A value written now is sealed with the database's current key, still A: a server with
    // A alone could still read it.
    during.set_key(&t, "mistral", "sk-mistral-rotate-0123456789");
    let sealed_with = |provider: &str| match sql_value(
        &rotated.db(),
        &format!("SELECT substr(sealed_key, 1, 21) FROM api_keys WHERE provider = '{provider}'"),
    ) {
        Sql::Text(t) => t,
        other => panic!("{other:?}"),
    };
    let id_of = |key: &str| seal_like_keyrack(key, 1, "openai", "x")[..21].to_owned();
    assert_eq!(sealed_with("mistral"), id_of(KEY_A));
    let out = rotated.run(&["rotate-encryption-key"]);
    says(&out, 0, "re-encrypted 4, already under the current key 0");
    // The running server follows: what it writes now is sealed with B, and it says so once.
    assert_eq!(
        during
            .set_key(&t, "groq", "sk-groq-rotate-0123456789")
            .status,
        200
    );
    assert_eq!(sealed_with("groq"), id_of(KEY_B));
    assert!(
        during
            .logs_settled()
            .contains("the database's current key is now key id"),
        "{}",
        during.logs()
    );
    assert_eq!(
        during.reveal(&t, "anthropic").as_deref(),
        Some("sk-ant-rotate-0123456789")
    );
    assert_eq!(
        during.reveal(&t, "mistral").as_deref(),
        Some("sk-mistral-rotate-0123456789")
    );
    during.terminate();
    // A rerun has nothing left to do.
    let out = rotated.run(&["rotate-encryption-key"]);
    assert!(stdout(&out).contains("re-encrypted 0"), "{}", stdout(&out));
    // The new key alone now opens everything, and is the recorded identity.
    let new_only = Env {
        dir: rotated.dir,
        vars: vec![],
    }
    .var("KEYRACK_ENCRYPTION_KEY", KEY_B);
    let st = status_json(&new_only);
    assert_eq!(st["undecryptable"], 0);
    let s = new_only.serve();
    let t = s.login("ada@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-rotate-0123456789")
    );
    assert_eq!(
        s.reveal(&t, "anthropic").as_deref(),
        Some("sk-ant-rotate-0123456789")
    );
    s.terminate();
    let old_only = Env {
        dir: new_only.dir,
        vars: vec![],
    }
    .var("KEYRACK_ENCRYPTION_KEY", KEY_A);
    assert_eq!(old_only.run(&["status"]).status.code(), Some(2));
}

#[test]
fn load_fixtures_is_all_or_nothing() {
    let env = Env::new();
    let good = repo_fixture("demo.json");
    let out = env.run(&["load-fixtures", &good]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dup = fixtures_file(
        &env,
        "dup.json",
        &json!({"users": [{"email": "new@example.com", "password": "correct horse battery"},
                          {"email": "ADA@example.com", "password": "correct horse battery"}]}),
    );
    let out = env.run(&["load-fixtures", dup.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("ada@example.com"), "{}", stderr(&out));
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM users"),
        Sql::Integer(2),
        "nothing inserted"
    );
    let bad = fixtures_file(
        &env,
        "bad.json",
        &json!({"users": [{"email": "x@y.z", "password": "short"}]}),
    );
    let out = env.run(&["load-fixtures", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("password"));
    let st = status_json(&env);
    assert_eq!(
        (
            st["column_keys"].as_i64(),
            st["table_keys"].as_i64(),
            st["unmigrated"].as_i64()
        ),
        (Some(1), Some(3), Some(1))
    );
}

/// Runs a keyrack command on a pseudo-terminal (util-linux `script`), typing `typed`.
fn on_terminal(env: &Env, args: &str, typed: &str) -> std::process::Output {
    use std::io::Write;
    let cmd = format!("{BIN} --db {} {args}", env.db().display());
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(env.dir.path())
        .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(typed.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn confirmation_on_a_terminal_takes_the_exact_word() {
    let env = legacy_env(2);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let backup = env.path("typed.db");
    let args = format!("remove-legacy-column --backup {}", backup.display());
    let out = on_terminal(&env, &args, "yes\n");
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(stdout(&out).contains("Type `remove`"), "{}", stdout(&out));
    assert_eq!(
        status_json(&env)["phase"],
        "dual",
        "a wrong word changes nothing"
    );
    assert!(
        !backup.exists(),
        "the confirmation comes before the backup: a declined prompt writes none"
    );
    let out = on_terminal(&env, &args, "remove\n");
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(status_json(&env)["phase"], "new_only");
    let out = on_terminal(&env, "revert", "revert\n");
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(status_json(&env)["phase"], "legacy");
}

#[test]
fn a_failed_backup_refuses_and_changes_nothing() {
    let env = legacy_env(2);
    assert_eq!(env.run(&["migrate"]).status.code(), Some(0));
    let nowhere = env.path("no-such-dir/backup.db");
    let out = env.run(&[
        "remove-legacy-column",
        "--yes",
        "--backup",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("backup"));
    assert_eq!(status_json(&env)["phase"], "dual");
    assert_eq!(status_json(&env)["column_keys"], 2);
}
