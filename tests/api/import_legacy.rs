//! `keyrack import-legacy` on databases keyrack did not write: a Python script
//! (`tests/scripts/legacy_app.py`) builds a SQLAlchemy-style `users` table with plaintext keys,
//! Fernet tokens made by Python's `cryptography` and bcrypt hashes made by Python's `bcrypt`.
//! Without python3 and its `venv` module these tests pass after one line on stderr; under CI
//! (`CI=true`, as `.ci/run` is run) or with `KEYRACK_TEST_REQUIRE_PYTHON=1`, a missing Python is a
//! failure.

use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::support::*;

/// The application's Fernet keys (URL-safe base64 of 32 bytes), as its settings would hold them.
pub(crate) const FERNET_A: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
pub(crate) const FERNET_B: &str = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=";
/// A key the application never used.
pub(crate) const FERNET_WRONG: &str = "YGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6e3x9fn8=";

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/legacy_app.py");

fn venv_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("legacy-py")
}

/// Sets up the script's virtual environment once; `false` when Python is not there to run it
/// (then one line says so on stderr, past the test harness's capture, once per run).
pub(crate) fn python_ready() -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let out = Command::new("python3")
            .arg(SCRIPT)
            .arg("--venv")
            .arg(venv_dir())
            .arg("setup")
            .output();
        let ready = match out {
            Err(e) => Err(format!("python3 is not available ({e})")),
            Ok(o) if o.status.code() == Some(3) => Err(stderr(&o).trim().to_owned()),
            Ok(o) if !o.status.success() => panic!("legacy_app.py setup failed: {}", stderr(&o)),
            Ok(_) => Ok(()),
        };
        if let Err(why) = &ready {
            if !python_required() {
                let _ = writeln!(
                    std::io::stderr(),
                    "import_legacy tests skipped: they need python3 with venv: {why}"
                );
            }
        }
        ready
    });
    match ready {
        Ok(()) => true,
        Err(why) => {
            assert!(
                !python_required(),
                "CI or KEYRACK_TEST_REQUIRE_PYTHON is set but {why}"
            );
            false
        }
    }
}

pub(crate) fn script(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .arg("--venv")
        .arg(venv_dir())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run legacy_app.py");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "legacy_app.py: {}", stderr(&out));
}

/// The application's database from a list of rows (see the script for their form).
pub(crate) fn app_db(env: &Env, rows: Value) -> PathBuf {
    let out = env.path("app.db");
    script(
        &[
            "rows",
            "--out",
            out.to_str().unwrap(),
            "--fernet-keys",
            &format!("{FERNET_A},{FERNET_B}"),
        ],
        Some(&rows.to_string()),
    );
    out
}

pub(crate) fn import(env: &Env, app: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["import-legacy", "--from", app.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.run(&args)
}

/// Every file in the environment's directory but the application's database.
pub(crate) fn files_beside(env: &Env) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "app.db" && !n.starts_with("server-"))
        .collect();
    names.sort();
    names
}

/// Opens a column value of keyrack's database with AES-256-GCM written here, not keyrack's code.
pub(crate) fn open_column(key_b64: &str, user_id: i64, sealed: &str) -> String {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::{Aes256Gcm, Key, Nonce};
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = sealed.splitn(3, ':').nth(2).expect("kr1:<id>:<body>");
    let raw = b64.decode(body).unwrap();
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&b64.decode(key_b64).unwrap()));
    let aad = format!("keyrack/v1/user:{user_id}/provider:openai");
    let plain = cipher
        .decrypt(
            Nonce::from_slice(&raw[..12]),
            Payload {
                msg: &raw[12..],
                aad: aad.as_bytes(),
            },
        )
        .expect("a column value opens under the test key");
    String::from_utf8(plain).unwrap()
}

/// Every user's column key, opened independently.
pub(crate) fn column_keys(db: &Path) -> Vec<(i64, String, Option<String>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT id, email, openai_api_key FROM users ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>();
    rows.into_iter()
        .map(|(id, email, sealed)| (id, email, sealed.map(|s| open_column(KEY_A, id, &s))))
        .collect()
}

pub(crate) fn login_with(server: &Server, email: &str, password: &str) -> Resp {
    server.post(
        "/auth/login",
        None,
        json!({"email": email, "password": password}),
    )
}

pub(crate) fn token(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body["token"].as_str().unwrap().to_owned()
}

pub(crate) fn password_hash(db: &Path, id: i64) -> String {
    match sql_value(
        db,
        &format!("SELECT password_hash FROM users WHERE id = {id}"),
    ) {
        rusqlite::types::Value::Text(t) => t,
        other => panic!("{other:?}"),
    }
}

/// The whole way at scale: 10,000 users, every phase, logins at keyrack's real hashing cost.
/// About 4 s alone and far more on shared cores: a step of its own in CI (`make slow-tests`);
/// the quick suite covers each format and refusal at small scale.
#[test]
#[ignore = "scale, about 4 s: `make slow-tests`, a step of its own in CI"]
fn ten_thousand_users_import_migrate_serve_revert_and_remove() {
    if !python_ready() {
        return;
    }
    // keyrack's real argon2id: the re-hashed passwords are checked for its parameters.
    let env = Env::new().real_hash().var(
        "KEYRACK_LEGACY_FERNET_KEY",
        &format!("{FERNET_A},{FERNET_B}"),
    );
    let app = env.path("app.db");
    let manifest_path = env.path("manifest.json");
    script(
        &[
            "bulk",
            "--out",
            app.to_str().unwrap(),
            "--users",
            "10000",
            "--fernet-keys",
            &format!("{FERNET_A},{FERNET_B}"),
            "--manifest",
            manifest_path.to_str().unwrap(),
        ],
        None,
    );
    let manifest: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest.len(), 10_000);
    let app_before = std::fs::read(&app).unwrap();

    let out = import(&env, &app, &["--password-column", "hashed_password"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout(&out);
    for line in [
        "imported 10000 users",
        "keys: 9000 (plaintext 3000, fernet 6000)",
        "empty: 1000",
        "unreadable: 0",
        "skipped: 0",
        "passwords: bcrypt 9800, argon2 100, werkzeug scrypt 0, werkzeug pbkdf2 0, django pbkdf2_sha256 0, passlib pbkdf2-sha256 100, none 0, unsupported 0",
    ] {
        assert!(report.contains(line), "{line:?} not in:\n{report}");
    }
    assert!(!report.contains("no usable password"), "{report}");
    // The application's database is not changed, not even by a journal.
    assert_eq!(std::fs::read(&app).unwrap(), app_before);
    assert!(!env.path("app.db-wal").exists() && !env.path("app.db-journal").exists());
    let mode = std::fs::metadata(env.db()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(files_beside(&env), ["keyrack.db", "manifest.json"]);

    // Every key, opened with an AES-GCM of the test's own, is the application's plaintext, under
    // the user's old id and lowercased email; no Fernet token or plaintext is stored.
    let stored = column_keys(&env.db());
    assert_eq!(stored.len(), 10_000);
    for ((id, email, key), m) in stored.iter().zip(&manifest) {
        assert_eq!(*id, m["id"].as_i64().unwrap());
        assert_eq!(email, m["email"].as_str().unwrap());
        assert_eq!(key.as_deref(), m["key"].as_str(), "user {id}");
    }
    let bytes = db_bytes(&env.db());
    assert!(!contains(&bytes, "gAAAAA"));
    assert!(!contains(&bytes, "sk-proj-00000001-"));

    let s = status_json(&env);
    assert_eq!(s["phase"], "legacy");
    assert_eq!(s["users"], 10_000);
    assert_eq!(s["column_keys"], 9_000);
    assert_eq!(s["undecryptable"], 0);

    let find = |id: i64| manifest[(id - 1) as usize].clone();
    let log_in_and_reveal = |server: &Server, id: i64| {
        let m = find(id);
        let email = m["email"].as_str().unwrap();
        let t = token(&login_with(server, email, m["password"].as_str().unwrap()));
        assert_eq!(
            server.reveal(&t, "openai").as_deref(),
            m["key"].as_str(),
            "user {id}"
        );
    };

    // Phase legacy, served: old passwords log in ($2a$, $2b$, $2y$, argon2), keys reveal.
    let sample = [1, 2, 3, 4, 7, 10, 50, 150, 4321, 9999];
    let server = env.serve();
    for id in sample {
        log_in_and_reveal(&server, id);
        let h = password_hash(&env.db(), id);
        assert!(
            h.starts_with("$argon2id$v=19$m=9216,t=4,p=1$"),
            "user {id} re-hashed: {h}"
        );
        log_in_and_reveal(&server, id);
    }
    assert!(
        password_hash(&env.db(), 5).starts_with("$2"),
        "not yet logged in"
    );
    let wrong = login_with(&server, "user5@example.com", "bcrypt pass 6");
    assert_eq!(wrong.status, 401);
    // A passlib pbkdf2-sha256 account logs in with its old password, then has keyrack's hash.
    assert_eq!(
        login_with(&server, "user100@example.com", "pbkdf2 pass 3").status,
        401
    );
    token(&login_with(&server, "user100@example.com", "pbkdf2 pass 2"));
    assert!(password_hash(&env.db(), 100).starts_with("$argon2id$v=19$m=9216,t=4,p=1$"));
    server.terminate();

    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("migrated 9000, already migrated 0, conflicts 0, failed 0"));
    let server = env.serve();
    for id in [1, 11, 12, 13, 14, 9998] {
        log_in_and_reveal(&server, id);
    }
    server.terminate();

    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(status_json(&env)["phase"], "legacy");
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let backup = env.path("before-phase-3.db");
    let out = env.run(&[
        "remove-legacy-column",
        "--yes",
        "--backup",
        backup.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = status_json(&env);
    assert_eq!(s["phase"], "new_only");
    assert_eq!(s["table_keys"], 9_000);

    let out = reset_password(&env, "user100@example.com", "a new password\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let server = env.serve();
    for id in [1, 21, 22, 23, 24, 49, 9997] {
        log_in_and_reveal(&server, id);
    }
    let t = token(&login_with(
        &server,
        "user100@example.com",
        "a new password",
    ));
    assert_eq!(server.reveal(&t, "openai"), None, "user 100 had no key");
    server.terminate();
}

fn reset_password(env: &Env, email: &str, stdin: &str) -> Output {
    let mut c = Command::new(BIN);
    c.current_dir(env.dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--db")
        .arg(env.db())
        .args(["reset-password", email])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &env.vars {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Rows of every key format, under both Fernet keys, in text and BLOB columns.
fn mixed_rows() -> Value {
    json!([
        {"id": 1, "email": "plain@example.com", "key": {"plain": "sk-plain-0000000001"},
         "password": {"bcrypt": "password one", "prefix": "$2b$"}},
        {"id": 2, "email": "fernet-a@example.com", "key": {"fernet": "sk-fernet-a-000002", "with": 0},
         "password": {"bcrypt": "password two", "prefix": "$2y$"}},
        {"id": 3, "email": "fernet-b@example.com", "key": {"fernet": "sk-fernet-b-000003", "with": 1},
         "password": {"argon2": "password three"}},
        {"id": 4, "email": "blob@example.com", "key": {"fernet": "sk-fernet-blob-0004", "blob": true},
         "password": {"bcrypt": "password four", "prefix": "$2a$"}},
        {"id": 5, "email": "null@example.com", "key": null, "password": null},
        {"id": 6, "email": "blank@example.com", "key": {"raw": "   "}, "password": {"raw": ""}},
        {"id": 7, "email": "garbage@example.com", "key": {"raw": "not a key at all"},
         "password": {"pbkdf2": "password seven"}},
        {"id": 8, "email": "Spaced.Upper@Example.COM ", "key": {"plain": " sk-plain-0000000008 "},
         "password": {"bcrypt": "password eight"}}
    ])
}

#[test]
fn mixed_formats_in_one_column() {
    if !python_ready() {
        return;
    }
    let env = Env::new().var(
        "KEYRACK_LEGACY_FERNET_KEY",
        &format!("{FERNET_A},{FERNET_B}"),
    );
    let app = app_db(&env, mixed_rows());

    // One value decodes to no key: refused, naming the user and why, and nothing is created.
    let out = import(&env, &app, &["--password-column", "hashed_password"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("user 7: key not imported: neither a Fernet token nor a plaintext"));
    assert!(err.contains("1 keys do not decode (users 7)"), "{err}");
    assert!(
        !err.contains("not a key at all"),
        "the value is never printed"
    );
    assert!(files_beside(&env).is_empty(), "{:?}", files_beside(&env));

    let out = import(
        &env,
        &app,
        &["--password-column", "hashed_password", "--skip-unreadable"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout(&out);
    for line in [
        "imported 8 users",
        "keys: 5 (plaintext 2, fernet 3)",
        "empty: 2",
        "unreadable: 1",
        "passwords: bcrypt 4, argon2 1, werkzeug scrypt 0, werkzeug pbkdf2 0, django pbkdf2_sha256 0, passlib pbkdf2-sha256 1, none 2, unsupported 0",
    ] {
        assert!(report.contains(line), "{line:?} not in:\n{report}");
    }
    let keys: Vec<(i64, String, Option<String>)> = column_keys(&env.db());
    let expected = [
        (1, "plain@example.com", Some("sk-plain-0000000001")),
        (2, "fernet-a@example.com", Some("sk-fernet-a-000002")),
        (3, "fernet-b@example.com", Some("sk-fernet-b-000003")),
        (4, "blob@example.com", Some("sk-fernet-blob-0004")),
        (5, "null@example.com", None),
        (6, "blank@example.com", None),
        (7, "garbage@example.com", None),
        (8, "spaced.upper@example.com", Some("sk-plain-0000000008")),
    ];
    let got: Vec<(i64, &str, Option<&str>)> = keys
        .iter()
        .map(|(i, e, k)| (*i, e.as_str(), k.as_deref()))
        .collect();
    assert_eq!(got, expected);

    let server = env.serve();
    for (email, pw) in [
        ("plain@example.com", "password one"),
        ("fernet-a@example.com", "password two"),
        ("fernet-b@example.com", "password three"),
        ("blob@example.com", "password four"),
        ("spaced.upper@example.com", "password eight"),
        ("garbage@example.com", "password seven"),
    ] {
        token(&login_with(&server, email, pw));
    }
    for (email, pw) in [
        ("null@example.com", "anything at all"),
        ("blank@example.com", "anything at all"),
    ] {
        assert_eq!(login_with(&server, email, pw).status, 401, "{email}");
    }
    server.terminate();
}

#[test]
fn a_wrong_fernet_key_refuses_and_leaves_nothing_behind() {
    if !python_ready() {
        return;
    }
    let rows = json!([
        {"id": 10, "email": "a@example.com", "key": {"fernet": "sk-fernet-0000000a"}},
        {"id": 11, "email": "b@example.com", "key": {"fernet": "sk-fernet-0000000b"}},
        {"id": 12, "email": "c@example.com", "key": {"plain": "sk-plain-0000000c"}}
    ]);
    // No key configured at all: a key file would be created, and must not be.
    let env = Env::without_key().var("KEYRACK_LEGACY_FERNET_KEY", FERNET_WRONG);
    let app = app_db(&env, rows);
    let before = std::fs::read(&app).unwrap();
    let out = import(&env, &app, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("user 10: key not imported: a Fernet token that no key in KEYRACK_LEGACY_FERNET_KEY opens"),
        "{err}"
    );
    assert!(err.contains("2 keys do not decode (users 10, 11)"), "{err}");
    assert!(files_beside(&env).is_empty(), "{:?}", files_beside(&env));
    assert_eq!(std::fs::read(&app).unwrap(), before);

    // Unset: the same refusal, saying the variable is not set.
    // The same application database each time: one copy of it per environment.
    let copy_of_app = |env: &Env| {
        let to = env.path("app.db");
        std::fs::copy(&app, &to).unwrap();
        to
    };
    let env2 = Env::new();
    let app2 = copy_of_app(&env2);
    let out = import(&env2, &app2, &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("KEYRACK_LEGACY_FERNET_KEY is not set"));

    // A value that is not a Fernet key at all: exit 2 naming its position, not its value.
    let env3 = Env::new().var(
        "KEYRACK_LEGACY_FERNET_KEY",
        &format!("{FERNET_A},secret-typo"),
    );
    let app3 = copy_of_app(&env3);
    let out = import(&env3, &app3, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEYRACK_LEGACY_FERNET_KEY: key 2"));
    assert!(!stderr(&out).contains("secret-typo"));
    assert!(files_beside(&env3).is_empty());

    // The right key, after the wrong one in the list: a fresh key file (0600) and every key.
    let env4 = Env::without_key().var(
        "KEYRACK_LEGACY_FERNET_KEY",
        &format!("{FERNET_WRONG},{FERNET_A}"),
    );
    let app4 = copy_of_app(&env4);
    let out = import(&env4, &app4, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(files_beside(&env4), ["keyrack.db", "keyrack.db.key"]);
    for f in ["keyrack.db", "keyrack.db.key"] {
        let mode = std::fs::metadata(env4.path(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    assert_eq!(status_json(&env4)["column_keys"], 3);
    let server = env4.serve();
    let t = token(&{
        let out = reset_password(&env4, "b@example.com", "correct horse battery\n");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        login_with(&server, "b@example.com", "correct horse battery")
    });
    assert_eq!(
        server.reveal(&t, "openai").as_deref(),
        Some("sk-fernet-0000000b")
    );
    server.terminate();
}

#[test]
fn duplicate_and_null_emails_are_skipped_and_named() {
    if !python_ready() {
        return;
    }
    let env = Env::new();
    let app = app_db(
        &env,
        json!([
            {"id": 1, "email": "Ada@Example.com", "key": {"plain": "sk-ada-first-0001"}},
            {"id": 2, "email": null, "key": {"plain": "sk-nobody-00002"}},
            {"id": 3, "email": " ada@example.com ", "key": {"plain": "sk-ada-second-003"}},
            {"id": 4, "email": "bob@example.com", "key": null},
            {"id": 5, "email": "not-an-email", "key": null},
            {"id": 6, "email": "", "key": null}
        ]),
    );
    let out = import(&env, &app, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(report.contains("imported 2 users"), "{report}");
    assert!(
        report.contains("skipped: 4 (duplicate email 1, invalid email 2, no email 1)"),
        "{report}"
    );
    assert!(report.contains("passwords: none imported (no --password-column)"));
    assert!(report.contains("2 users have no usable password"));
    let err = stderr(&out);
    for line in [
        "row with id 2: skipped: the email is NULL",
        "row with id 3: skipped: the email ada@example.com (trimmed and lowercased) belongs to user 1 already",
        "row with id 5: skipped: the email \"not-an-email\" is not valid",
        "row with id 6: skipped: the email \"\" is not valid",
    ] {
        assert!(err.contains(line), "{line:?} not in:\n{err}");
    }
    let keys = column_keys(&env.db());
    assert_eq!(
        keys,
        [
            (
                1,
                "ada@example.com".into(),
                Some("sk-ada-first-0001".into())
            ),
            (4, "bob@example.com".into(), None)
        ]
    );
    // Nobody has a password yet: none logs in, whatever is typed.
    let server = env.serve();
    assert_eq!(
        login_with(&server, "ada@example.com", "anything at all").status,
        401
    );
    assert_eq!(
        login_with(&server, "ada@example.com", "!no-password").status,
        401
    );
    server.terminate();
}

#[test]
fn a_missing_table_or_column_exits_2_naming_it() {
    if !python_ready() {
        return;
    }
    let env = Env::new();
    let app = app_db(
        &env,
        json!([{"id": 1, "email": "a@example.com", "key": {"plain": "sk-plain-00000001"}}]),
    );
    for (args, named) in [
        (
            vec!["--users-table", "accounts"],
            "has no table \"accounts\"",
        ),
        (
            vec!["--key-column", "openai_key"],
            "has no column \"openai_key\"",
        ),
        (vec!["--email-column", "mail"], "has no column \"mail\""),
        (
            vec!["--password-column", "password_hash"],
            "has no column \"password_hash\"",
        ),
        (vec!["--id-column", "user_id"], "has no column \"user_id\""),
    ] {
        let out = import(&env, &app, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
        assert!(files_beside(&env).is_empty());
    }
    let out = import(&env, &env.path("nope.db"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope.db: no such file"));
    std::fs::write(
        env.path("text.db"),
        "not a database, just text\n".repeat(100),
    )
    .unwrap();
    let out = import(&env, &env.path("text.db"), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot read it as a SQLite database"));
    std::fs::remove_file(env.path("text.db")).unwrap();

    // Names as SQLite matches them (any case), from the flags.
    let out = import(
        &env,
        &app,
        &[
            "--users-table",
            "USERS",
            "--key-column",
            "OpenAI_API_Key",
            "--id-column",
            "ID",
            "--email-column",
            "Email",
            "--password-column",
            "hashed_password",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("keys: 1 (plaintext 1, fernet 0)"));
}

#[test]
fn an_existing_database_is_never_a_target() {
    if !python_ready() {
        return;
    }
    let env = Env::new();
    let app = app_db(
        &env,
        json!([{"id": 1, "email": "a@example.com", "key": {"plain": "sk-plain-00000001"}}]),
    );
    // A keyrack database with a user in it.
    let server = env.serve();
    server.user("kept@example.com");
    server.terminate();
    let before = db_bytes(&env.db());
    let out = import(&env, &app, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(db_bytes(&env.db()), before);
    assert_eq!(status_json(&env)["users"], 1);

    // Nor is any other file, nor :memory:; and a keyrack database is no source either.
    let other = Env::new();
    std::fs::write(other.db(), b"precious").unwrap();
    let out = import(&other, &app, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(other.db()).unwrap(), b"precious");
    let out = Command::new(BIN)
        .env_clear()
        .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
        .args(["--db", ":memory:", "import-legacy", "--from"])
        .arg(&app)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let fresh = Env::new();
    let out = import(&fresh, &env.db(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is already a keyrack database"));
    assert!(!fresh.db().exists());
}

#[test]
fn sigint_during_an_import_leaves_nothing_behind() {
    // A large table written here with rusqlite (no Python needed): the import takes seconds in
    // a debug build, and the signal comes as soon as its temporary file exists.
    let env = Env::without_key();
    let app = env.path("app.db");
    {
        let mut c = rusqlite::Connection::open(&app).unwrap();
        c.execute_batch(
            "CREATE TABLE users (id INTEGER NOT NULL, email VARCHAR(255), openai_api_key TEXT,
             PRIMARY KEY (id))",
        )
        .unwrap();
        let tx = c.transaction().unwrap();
        {
            let mut ins = tx.prepare("INSERT INTO users VALUES (?1, ?2, ?3)").unwrap();
            for i in 1..=150_000i64 {
                ins.execute(rusqlite::params![
                    i,
                    format!("user{i}@example.com"),
                    format!("sk-plain-{i:010}")
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let mut child = Command::new(BIN)
        .current_dir(env.dir.path())
        .env_clear()
        .arg("--db")
        .arg(env.db())
        .args(["import-legacy", "--from"])
        .arg(&app)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !files_beside(&env).iter().any(|n| n.ends_with(".tmp")) {
        assert!(std::time::Instant::now() < deadline, "no temporary file");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    signal(&child, libc::SIGINT);
    let status = wait_timeout(&mut child, std::time::Duration::from_secs(30)).expect("exit");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted; nothing was created"), "{err}");
    assert!(files_beside(&env).is_empty(), "{:?}", files_beside(&env));
}

#[test]
fn reset_password_from_stdin_or_a_terminal_ends_sessions() {
    let env = Env::new();
    let server = env.serve();
    let old = server.user("ada@example.com");
    let out = reset_password(&env, "Ada@Example.com", "a brand new password\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("password set for ada@example.com"));
    assert_eq!(
        server.get("/user/me", Some(&old)).status,
        401,
        "sessions ended"
    );
    assert_eq!(
        login_with(&server, "ada@example.com", "correct horse battery").status,
        401
    );
    token(&login_with(
        &server,
        "ada@example.com",
        "a brand new password",
    ));

    // Unknown user: exit 1; a password keyrack does not accept: exit 2; nothing changes.
    let out = reset_password(&env, "bob@example.com", "a brand new password\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no user has the email bob@example.com"));
    let out = reset_password(&env, "ada@example.com", "short\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr(&out).contains("short"), "{}", stderr(&out));

    // On a terminal (util-linux `script`): asked twice. (Whether it echoes cannot be seen here:
    // the text is typed ahead, before the prompt turns echo off.)
    let on_terminal = |typed: &str| {
        let cmd = format!(
            "{BIN} --db {} reset-password ada@example.com",
            env.db().display()
        );
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .current_dir(env.dir.path())
            .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script(1) from util-linux");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(typed.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = on_terminal("typed password one\ntyped password two\n");
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stdout(&out).contains("the two passwords differ"));
    let out = on_terminal("typed password one\ntyped password one\n");
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("New password for ada@example.com"));
    token(&login_with(
        &server,
        "ada@example.com",
        "typed password one",
    ));
    server.terminate();
}

/// Whether a missing Python fails these tests instead of skipping them: under CI, or when asked.
fn python_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var_os("KEYRACK_TEST_REQUIRE_PYTHON").is_some()
}
