//! What an operator meets in the first week: file modes, typos in `--db`, settings, limits,
//! session lifetimes, the log, `--help` and the documents.

use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

/// The files of a directory, by name (not the ones the tests themselves write).
fn keyrack_files(env: &Env) -> Vec<(String, u32)> {
    let mut files: Vec<(String, u32)> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("keyrack.db"))
        .map(|e| {
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            (e.file_name().to_string_lossy().into_owned(), mode)
        })
        .collect();
    files.sort();
    files
}

// ---- item 1: every file keyrack creates is 0600 ---------------------------------------------

#[test]
fn every_file_keyrack_creates_is_owner_only() {
    let env = Env::without_key();
    let s = env.serve();
    let t = s.user("ada@example.com");
    assert_eq!(s.set_key(&t, "openai", "sk-mode-0123456789").status, 200);
    // While serving: the database, its -wal and -shm, and the key file.
    let files = keyrack_files(&env);
    for name in [
        "keyrack.db",
        "keyrack.db-wal",
        "keyrack.db-shm",
        "keyrack.db.key",
    ] {
        assert!(
            files.iter().any(|(n, _)| n == name),
            "{name} missing: {files:?}"
        );
    }
    s.terminate();
    // A backup, at its default place beside the database.
    let out = env.run(&["remove-legacy-column", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let files = keyrack_files(&env);
    assert!(
        files.iter().any(|(n, _)| n.contains("backup")),
        "no backup: {files:?}"
    );
    for (name, mode) in &files {
        assert_eq!(*mode, 0o600, "{name} is {mode:o}: {files:?}");
    }
}

// ---- item 2: only serve and load-fixtures create a database ---------------------------------

#[test]
fn commands_given_a_missing_database_exit_2_and_create_nothing() {
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["migrate"],
        vec!["revert", "--yes"],
        vec!["rotate-encryption-key"],
        vec!["remove-legacy-column", "--yes"],
        vec!["add-user", "ada@example.com"],
    ] {
        let env = Env::without_key();
        let out = env.run_with_stdin(&args, "correct horse battery\n");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.contains(&env.db().display().to_string()),
            "{args:?}: names the path: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(env.dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{args:?} created {left:?}");
    }
}

#[test]
fn a_failed_load_fixtures_on_a_new_path_leaves_nothing_behind() {
    let env = Env::without_key();
    let dup = fixtures_file(
        &env,
        "dup.json",
        &json!({"users": [
            {"email": "ada@example.com", "password": "correct horse battery"},
            {"email": "ADA@example.com", "password": "correct horse battery"}
        ]}),
    );
    let bad = fixtures_file(&env, "bad.json", &json!({"users": [{"email": 5}]}));
    for f in [&dup, &bad] {
        let out = env.run(&["load-fixtures", f.to_str().unwrap()]);
        assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
        assert_eq!(keyrack_files(&env), vec![], "{}", stderr(&out));
    }
    // The same through `serve --fixtures`: no ready line, nothing left.
    let out = env.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--fixtures",
        dup.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(keyrack_files(&env), vec![], "{}", stderr(&out));
    // And a good file creates the database.
    let good = fixtures_file(
        &env,
        "good.json",
        &json!({"users": [{"email": "ada@example.com", "password": "correct horse battery"}]}),
    );
    let out = env.run(&["load-fixtures", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(env.db().exists());
}

// ---- item 5: configuration ------------------------------------------------------------------

#[test]
fn an_empty_environment_variable_counts_as_unset() {
    let env = Env::new().var("KEYRACK_ADMIN_TOKEN", "");
    std::fs::write(env.path(".env"), "KEYRACK_ADMIN_TOKEN=from-dotenv-token\n").unwrap();
    let s = env.serve();
    let r = s.get("/admin/status", Some("from-dotenv-token"));
    assert_eq!(r.status, 200, "the .env value is used: {}", r.raw);
}

#[test]
fn env_and_fixtures_errors_name_line_and_variable_never_the_value() {
    let env = Env::without_key();
    std::fs::write(
        env.path(".env"),
        "# keyrack\nKEYRACK_DB=keyrack.db\nKEYRACK_ADMIN_TOKEN=\"s3cret-admin-token\nKEYRACK_LISTEN=127.0.0.1:0\n",
    )
    .unwrap();
    let out = env.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("KEYRACK_ADMIN_TOKEN"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    std::fs::remove_file(env.path(".env")).unwrap();

    let f = env.path("fixtures.json");
    std::fs::write(
        &f,
        "{\"users\": [\n  {\"email\": \"ada@example.com\", \"password\": \"correct horse battery\",\n   \"api_keys\": [{\"api_key\": \"sk-0123456789\", \"is_default\": \"s3cret-key-0123\"}]}\n]}\n",
    )
    .unwrap();
    let out = env.run(&["load-fixtures", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("users[0].api_keys[0].is_default"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

// ---- item 6: memory and limits --------------------------------------------------------------

#[test]
fn an_overlong_login_email_is_refused_before_the_throttle_counts_it() {
    let env = Env::new();
    let s = env.serve();
    let long = format!("{}@example.com", "a".repeat(60 * 1024));
    for _ in 0..12 {
        let r = s.post(
            "/auth/login",
            None,
            json!({"email": long, "password": "correct horse battery"}),
        );
        assert_eq!(
            (r.status, r.code()),
            (422, "validation_failed"),
            "{}",
            r.raw
        );
        assert!(r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("email"));
    }
    let r = s.post(
        "/auth/login",
        None,
        json!({"email": "ada@example.com", "password": "x".repeat(1025)}),
    );
    assert_eq!(
        (r.status, r.code()),
        (422, "validation_failed"),
        "{}",
        r.raw
    );
}

#[test]
fn keys_per_user_are_capped_but_a_column_key_always_moves() {
    let env = Env::new().var("KEYRACK_MAX_KEYS_PER_USER", "3");
    let s = env.serve();
    let t = s.user("ada@example.com");
    for p in ["p1", "p2", "p3"] {
        let r = s.post(
            "/user/api-keys",
            Some(&t),
            json!({"provider": p, "api_key": "sk-cap-0123456789"}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    let r = s.post(
        "/user/api-keys",
        Some(&t),
        json!({"provider": "p1", "api_key": "sk-cap-0123456789"}),
    );
    assert_eq!((r.status, r.code()), (409, "limit_reached"), "{}", r.raw);
    // A new provider's default is a new key too; replacing a default is not.
    assert_eq!(
        s.set_key(&t, "p4", "sk-cap-0123456789").code(),
        "limit_reached"
    );
    assert_eq!(s.set_key(&t, "p1", "sk-cap-9876543210").status, 200);
    // Another user has a limit of their own.
    let u = s.user("bob@example.com");
    assert_eq!(s.set_key(&u, "openai", "sk-bob-0123456789").status, 200);
    // Deleting one makes room.
    let list = s.get("/user/api-keys", Some(&t));
    let id = list.body["keys"][0]["id"].as_i64().unwrap();
    assert_eq!(
        s.delete(&format!("/user/api-keys/{id}"), Some(&t)).status,
        204
    );
    assert_eq!(s.set_key(&t, "p4", "sk-cap-0123456789").status, 200);
    s.terminate();

    // At the limit with a key still only in the legacy column: reading it moves it.
    let env = Env::new().var("KEYRACK_MAX_KEYS_PER_USER", "2");
    let f = fixtures_file(
        &env,
        "f.json",
        &json!({"users": [{"email": "cy@example.com", "password": "correct horse battery",
            "openai_api_key": "sk-column-0123456789",
            "api_keys": [{"provider": "p1", "api_key": "sk-t1-0123456789"},
                         {"provider": "p2", "api_key": "sk-t2-0123456789"}]},
            {"email": "dee@example.com", "password": "correct horse battery",
            "openai_api_key": "sk-column-0123456789",
            "api_keys": [{"provider": "p1", "api_key": "sk-t1-0123456789"},
                         {"provider": "p2", "api_key": "sk-t2-0123456789"}]}]}),
    );
    let s = env.serve_with(&["--fixtures", f.to_str().unwrap()]);
    let t = s.login("cy@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-column-0123456789")
    );
    let list = s.get("/user/api-keys", Some(&t));
    assert_eq!(
        list.body["keys"].as_array().unwrap().len(),
        3,
        "{}",
        list.raw
    );
    // Replacing the column key with a new one is not a new key either.
    let t = s.login("dee@example.com");
    let r = s.set_key(&t, "openai", "sk-newer-0123456789");
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-newer-0123456789")
    );
}

#[test]
fn expired_sessions_are_pruned() {
    let env = Env::new().var("KEYRACK_SESSION_TTL", "60");
    let s = env.serve();
    s.user("ada@example.com");
    s.login("ada@example.com");
    let last = s.user("bob@example.com");
    let db = env.db();
    let count = || match sql_value(&db, "SELECT COUNT(*) FROM sessions") {
        rusqlite::types::Value::Integer(n) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!(count(), 3);
    s.terminate();
    // Nobody logs in again. Two minutes later (keyrack's clock moved for the test) the last
    // session has expired, and a restart (and then every hour) removes the expired ones.
    let later = env.var("KEYRACK_TEST_CLOCK_OFFSET", "120");
    let s = later.serve();
    assert_eq!(s.get("/user/me", Some(&last)).status, 401);
    assert!(
        poll_until(Duration::from_secs(10), || count() == 0),
        "{} sessions left",
        count()
    );
}

#[test]
fn closed_signups_answer_403_and_add_user_makes_accounts() {
    let env = Env::new().var("KEYRACK_SIGNUPS", "closed");
    env.create_db();
    let out = env.run_with_stdin(&["add-user", "Ada@Example.com"], "correct horse battery\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("ada@example.com"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("horse") && !stderr(&out).contains("horse"));
    // Taken: exit 1.
    let out = env.run_with_stdin(&["add-user", "ada@example.com"], "another password\n");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // A password too short, or none: exit 2.
    let out = env.run_with_stdin(&["add-user", "bob@example.com"], "short\n");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = env.run_with_stdin(&["add-user", "bob@example.com"], "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let s = env.serve();
    let r = s.post(
        "/auth/register",
        None,
        json!({"email": "eve@example.com", "password": "correct horse battery"}),
    );
    assert_eq!((r.status, r.code()), (403, "signups_closed"), "{}", r.raw);
    let t = s.login("ada@example.com");
    assert_eq!(
        s.get("/user/me", Some(&t)).body["user"]["email"],
        "ada@example.com"
    );
}

// ---- item 7: sessions live their whole lifetime ---------------------------------------------

#[test]
fn a_one_second_session_lives_a_whole_second() {
    let env = Env::new().var("KEYRACK_SESSION_TTL", "1");
    let s = env.serve();
    s.user("ada@example.com");
    // Log in in the second half of a wall-clock second (the server shares this clock): a
    // lifetime cut to whole seconds would end before 0.5 s, so one login there tells. The
    // login must also end within its second (a lifetime cut down would then end by the next
    // one); one that a busy machine held longer tells nothing and is tried again.
    let subsec_tenth = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis()
            / 100
    };
    let mut slow = 0;
    let (t, start) = loop {
        while subsec_tenth() != 5 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let start = Instant::now();
        let t = s.login("ada@example.com");
        if start.elapsed() < Duration::from_millis(300) {
            break (t, start);
        }
        slow += 1;
        assert!(slow < 10, "ten logins in a row took 0.3 s or more");
    };
    std::thread::sleep(Duration::from_millis(800).saturating_sub(start.elapsed()));
    let r = s.get("/user/me", Some(&t));
    assert_eq!(r.status, 200, "refused 0.8 s into a 1 s session: {}", r.raw);
}

// ---- item 8: the log ------------------------------------------------------------------------

#[test]
fn request_lines_carry_request_and_user_ids_never_tokens_or_query_values() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    let id = s.get("/user/me", Some(&t)).body["user"]["id"]
        .as_i64()
        .unwrap();
    s.get(
        "/user/api-key?provider=secretprovider&reveal=true",
        Some(&t),
    );
    s.get("/healthz", None);
    // A request's line is written once it is answered, maybe after the next request's: wait
    // for all five (register, login, me, api-key, healthz).
    let ids_in = |logs: &str| -> std::collections::HashSet<String> {
        logs.lines()
            .filter_map(|l| l.split(" request=").nth(1))
            .map(|rest| rest.split(' ').next().unwrap().to_owned())
            .collect()
    };
    assert!(
        poll_until(Duration::from_secs(10), || ids_in(&s.logs()).len() >= 5),
        "each request its own id: {:?}",
        ids_in(&s.logs())
    );
    let logs = s.logs();
    let me = logs
        .lines()
        .find(|l| l.contains("] GET /user/me 200 "))
        .expect("the request line");
    assert!(me.contains(" request="), "{me}");
    assert!(me.ends_with(&format!(" user={id}")), "{me}");
    let health = logs
        .lines()
        .find(|l| l.contains("] GET /healthz 200 "))
        .expect("the request line");
    assert!(
        health.contains(" request=") && !health.contains("user="),
        "{health}"
    );
    assert!(!logs.contains(&t), "no token in the log");
    assert!(
        !logs.contains("secretprovider") && !logs.contains("reveal"),
        "{logs}"
    );
}

#[test]
fn a_500_names_its_request_id_in_the_log() {
    let env = Env::new().var("KEYRACK_DEBUG_PANIC_ROUTE", "1");
    let s = env.serve();
    assert_eq!(s.get("/debug/panic", None).status, 500);
    // And a stored key that does not decrypt: one wording, no debug text.
    let t = s.user("ada@example.com");
    s.set_key(&t, "anthropic", "sk-ant-0123456789");
    sql(
        &env.db(),
        "UPDATE api_keys SET sealed_key = 'kr1:0000:AAAA'",
    );
    let r = s.get("/user/api-key?provider=anthropic", Some(&t));
    assert_eq!((r.status, r.code()), (500, "key_unreadable"), "{}", r.raw);
    assert!(poll_until(Duration::from_secs(10), || {
        let logs = s.logs();
        logs.contains("] GET /user/api-key 500 ") && logs.contains("] GET /debug/panic 500 ")
    }));
    let logs = s.logs();
    let request_id = |l: &str| {
        l.split(" request=")
            .nth(1)
            .map(|r| r.split(' ').next().unwrap().to_owned())
    };
    let panic_line = logs
        .lines()
        .find(|l| l.contains("] the handler of GET /debug/panic panicked"))
        .expect("panic line");
    // The panic itself is logged as one line of the log, with the same request id.
    let hook_line = logs
        .lines()
        .find(|l| l.contains("] panicked at "))
        .expect("panic hook line");
    assert!(hook_line.starts_with("20"), "{hook_line}");
    assert_eq!(request_id(hook_line), request_id(panic_line));
    let answer_line = logs
        .lines()
        .find(|l| l.contains("] GET /debug/panic 500 "))
        .expect("request line");
    assert!(request_id(panic_line).is_some(), "{panic_line}");
    assert_eq!(request_id(panic_line), request_id(answer_line));

    let key_line = logs
        .lines()
        .find(|l| l.contains("does not decrypt"))
        .expect("key line");
    assert!(key_line.contains("in api_keys (key "), "{key_line}");
    let answer_line = logs
        .lines()
        .find(|l| l.contains("] GET /user/api-key 500 "))
        .expect("request line");
    assert_eq!(request_id(key_line), request_id(answer_line));
    assert!(key_line.contains(" user="), "{key_line}");
    // The listing logs the same key from inside its read (the session checked in the same
    // transaction): that line names the user too.
    let before = logs.matches("does not decrypt").count();
    assert_eq!(s.get("/user/api-keys", Some(&t)).status, 200);
    assert!(poll_until(Duration::from_secs(10), || {
        s.logs().matches("does not decrypt").count() > before
    }));
    let logs = s.logs();
    let listing_line = logs
        .lines()
        .filter(|l| l.contains("does not decrypt"))
        .nth(before)
        .expect("the listing's key line");
    let listing_answer = logs
        .lines()
        .find(|l| l.contains("] GET /user/api-keys 200 "));
    if let Some(answer) = listing_answer {
        assert_eq!(request_id(listing_line), request_id(answer));
    }
    assert!(
        listing_line.ends_with(&format!(
            " user={}",
            key_line.rsplit("user=").next().unwrap()
        )),
        "{listing_line}"
    );
    for debug_text in ["Some(", "None", "Column", "Table"] {
        assert!(!logs.contains(debug_text), "{debug_text} in {logs}");
    }
}

#[test]
fn control_characters_in_a_path_never_reach_the_log_raw() {
    let env = Env::new();
    let s = env.serve();
    let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"GET /x\x1b[2J\x1b[1;1Hforged\rline HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    // The head parser refuses control characters in a request target: they never reach a
    // handler or the log line of a request. (The logger escapes them anyway: logging::tests.)
    assert!(answer.starts_with(b"HTTP/1.1 400 "), "{answer:?}");
    assert_eq!(s.get("/healthz", None).status, 200);
    assert!(poll_until(Duration::from_secs(5), || s
        .logs()
        .contains("GET /healthz")));
    let logs = s.logs();
    assert!(!logs.contains('\x1b') && !logs.contains('\r'), "{logs:?}");
}

// ---- item 9: --help -------------------------------------------------------------------------

#[test]
fn help_lists_settings_and_exit_codes_and_describes_everything() {
    let env = Env::new();
    let help = stdout(&env.run(&["--help"]));
    for var in [
        "KEYRACK_DB",
        "KEYRACK_LISTEN",
        "KEYRACK_WORKERS",
        "KEYRACK_ENCRYPTION_KEY",
        "KEYRACK_OLD_ENCRYPTION_KEYS",
        "KEYRACK_ADMIN_TOKEN",
        "KEYRACK_SESSION_TTL",
        "KEYRACK_SIGNUPS",
        "KEYRACK_MAX_KEYS_PER_USER",
        "KEYRACK_HEAD_TIMEOUT",
        "KEYRACK_IDLE_TIMEOUT",
        "KEYRACK_SOCKET_TIMEOUT",
        "KEYRACK_LEGACY_FERNET_KEY",
        "RUST_LOG",
    ] {
        assert!(help.contains(var), "{var} missing from --help:\n{help}");
    }
    assert!(help.contains("Exit codes"), "{help}");
    for code in ["0  ", "1  ", "2  ", "3  "] {
        assert!(help.contains(code), "{code}");
    }
    let out = Command::new(BIN)
        .args(["gen-key", "--help"])
        .output()
        .unwrap();
    assert!(!stdout(&out).contains("--db"), "{}", stdout(&out));

    // Every command and every argument has a description (a debug build also panics at
    // start when one is missing: clap's help_expected).
    let commands: Vec<String> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap().to_owned();
            assert!(parts.next().is_some(), "no description: {l}");
            name
        })
        .collect();
    assert!(commands.len() >= 9, "{commands:?}");
    for c in commands.iter().filter(|c| *c != "help") {
        let out = Command::new(BIN)
            .args([c.as_str(), "--help"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{c}: {}", stderr(&out));
        let text = stdout(&out);
        for l in text.lines().filter(|l| {
            let t = l.trim_start();
            l.starts_with("  ") && (t.starts_with('-') || t.starts_with('<'))
        }) {
            assert!(
                l.trim().contains("  "),
                "{c}: an argument without a description: {l}"
            );
        }
    }
}

// ---- item 10: the documents stand alone -----------------------------------------------------

#[test]
fn the_documents_point_at_nothing_outside_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![
        root.join("README.md"),
        root.join("ARCHITECTURE.md"),
        root.join("openapi.yaml"),
    ];
    if let Ok(dir) = std::fs::read_dir(root.join("docs")) {
        docs.extend(dir.map(|e| e.unwrap().path()));
    }
    for doc in docs {
        // Pictures (the README's screenshots) are not documents that could point anywhere.
        if doc.extension().is_some_and(|e| e == "png") {
            continue;
        }
        let text = std::fs::read_to_string(&doc).unwrap();
        for outside in ["SPEC", "../shared", "shared/"] {
            assert!(
                !text.contains(outside),
                "{} mentions {outside}",
                doc.display()
            );
        }
    }
}
