//! The adoption round trip on databases keyrack did not write (`tests/scripts/legacy_app.py`,
//! a Python application's SQLAlchemy-style `users` table): `import-legacy` with every password
//! form it keeps and its `--report`, then `export-legacy` giving the application its keys back,
//! each row decoded by that Python program. Skipped like `import_legacy` without Python.

use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::import_legacy::{
    app_db, import, login_with, password_hash, python_ready, token, FERNET_A, FERNET_B,
};
use crate::support::*;

/// The six forms, one user each, then what keyrack cannot use.
fn password_rows() -> Value {
    json!([
        {"id": 1, "email": "bcrypt@example.com", "key": {"plain": "sk-pw-bcrypt-0001"},
         "password": {"bcrypt": "bcrypt password"}},
        {"id": 2, "email": "argon2@example.com", "key": {"plain": "sk-pw-argon2-0002"},
         "password": {"argon2": "argon2 password"}},
        {"id": 3, "email": "scrypt@example.com", "key": {"fernet": "sk-pw-scrypt-0003", "with": 1},
         "password": {"werkzeug_scrypt": "werkzeug scrypt password"}},
        {"id": 4, "email": "wpbkdf2@example.com", "key": {"fernet": "sk-pw-wpbkdf2-0004"},
         "password": {"werkzeug_pbkdf2": "werkzeug pbkdf2 password"}},
        {"id": 5, "email": "django@example.com", "key": null,
         "password": {"django": "django password"}},
        {"id": 6, "email": "passlib@example.com", "key": {"plain": "sk-pw-passlib-0006"},
         "password": {"pbkdf2": "passlib password"}},
        {"id": 7, "email": "sha512@example.com", "key": {"plain": "sk-pw-sha512-0007"},
         "password": {"raw": "$6$rounds=5000$saltsalt$abcdefghijklmnopqrstuvwxyz0123456789"}},
        {"id": 8, "email": "nopassword@example.com", "key": null, "password": null},
        {"id": 9, "email": "garbage@example.com", "key": {"raw": "not a key at all"},
         "password": {"bcrypt": "garbage password"}},
        {"id": 20, "email": null, "key": null, "password": null}
    ])
}

#[test]
fn six_password_forms_log_in_are_rehashed_and_the_report_names_the_rest() {
    if !python_ready() {
        return;
    }
    let env = Env::new().var(
        "KEYRACK_LEGACY_FERNET_KEY",
        &format!("{FERNET_A},{FERNET_B}"),
    );
    let app = app_db(&env, password_rows());
    let report = env.path("report.json");
    // A report path that exists: exit 2, nothing created, the file untouched.
    std::fs::write(&report, "keep me").unwrap();
    let out = import(
        &env,
        &app,
        &[
            "--password-column",
            "hashed_password",
            "--skip-unreadable",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("report.json"), "{}", stderr(&out));
    assert!(!env.db().exists());
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "keep me");
    std::fs::remove_file(&report).unwrap();

    // Refused (a key does not decode, no --skip-unreadable): nothing is created, and the report
    // names whom to look at.
    let out = import(
        &env,
        &app,
        &[
            "--password-column",
            "hashed_password",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(!env.db().exists());
    let refused: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(refused["unreadable"][0]["id"], 9, "{refused}");
    std::fs::remove_file(&report).unwrap();

    let out = import(
        &env,
        &app,
        &[
            "--password-column",
            "hashed_password",
            "--skip-unreadable",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = stdout(&out);
    assert!(
        summary.contains(
            "passwords: bcrypt 2, argon2 1, werkzeug scrypt 1, werkzeug pbkdf2 1, \
             django pbkdf2_sha256 1, passlib pbkdf2-sha256 1, none 1, unsupported 1 (sha512-crypt 1)"
        ),
        "{summary}"
    );
    assert!(
        summary.contains("2 users have no usable password"),
        "{summary}"
    );

    // The report: owner-only, what the counts say by user, never a key or a hash.
    let mode = std::fs::metadata(&report).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&report).unwrap();
    for secret in [
        "$6$",
        "$2b$",
        "sk-pw-",
        "gAAAAA",
        "not a key at all",
        "saltsalt",
    ] {
        assert!(!text.contains(secret), "{secret:?} in the report: {text}");
    }
    let r: Value = serde_json::from_str(&text).unwrap();
    let without = r["users_without_password"].as_array().unwrap();
    let ids: Vec<i64> = without.iter().map(|u| u["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [7, 8], "{r}");
    assert_eq!(without[0]["email"], "sha512@example.com");
    assert_eq!(without[0]["external_id"], "7");
    assert!(
        without[0]["reason"]
            .as_str()
            .unwrap()
            .contains("sha512-crypt"),
        "{r}"
    );
    assert!(
        without[1]["reason"].as_str().unwrap().contains("NULL"),
        "{r}"
    );
    assert_eq!(r["skipped"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["skipped"][0]["id"], "20");
    assert_eq!(r["unreadable"][0]["id"], 9);
    assert_eq!(r["unreadable"][0]["email"], "garbage@example.com");

    // Each of the six forms logs in with its own password only, is replaced by keyrack's own
    // argon2id at the first success, and logs in again.
    let server = env.serve();
    let forms = [
        (1, "bcrypt@example.com", "bcrypt password", "$2b$"),
        (
            2,
            "argon2@example.com",
            "argon2 password",
            "$argon2id$v=19$m=1024",
        ),
        (
            3,
            "scrypt@example.com",
            "werkzeug scrypt password",
            "scrypt:1024:8:1$",
        ),
        (
            4,
            "wpbkdf2@example.com",
            "werkzeug pbkdf2 password",
            "pbkdf2:sha256:1000$",
        ),
        (
            5,
            "django@example.com",
            "django password",
            "pbkdf2_sha256$1000$",
        ),
        (
            6,
            "passlib@example.com",
            "passlib password",
            "$pbkdf2-sha256$1000$",
        ),
    ];
    for (id, email, pw, form) in forms {
        assert!(password_hash(&env.db(), id).starts_with(form), "user {id}");
        assert_eq!(login_with(&server, email, "wrong password").status, 401);
        assert!(password_hash(&env.db(), id).starts_with(form), "user {id}");
        let t = token(&login_with(&server, email, pw));
        let rehashed = password_hash(&env.db(), id);
        assert!(
            rehashed.starts_with("$argon2id$") && !rehashed.starts_with(form),
            "user {id}: {rehashed}"
        );
        token(&login_with(&server, email, pw));
        assert_eq!(login_with(&server, email, "wrong password").status, 401);
        let _ = t;
    }
    for (email, pw) in [
        ("sha512@example.com", "anything at all"),
        ("nopassword@example.com", "anything at all"),
    ] {
        assert_eq!(login_with(&server, email, pw).status, 401, "{email}");
    }
    server.terminate();
}

/// The application's rows, after what the test did, decoded by the Python program.
fn decode(env: &Env, app: &Path, fernet_keys: &str) -> Vec<(i64, Option<String>, String)> {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/scripts/legacy_app.py"
        ))
        .arg("--venv")
        .arg(std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("legacy-py"))
        // `--fernet-keys=…` in one argument: a key may start with `-`.
        .args(["decode", "--db", app.to_str().unwrap()])
        .arg(format!("--fernet-keys={fernet_keys}"))
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "decode: {}", stderr(&out));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["key"].as_str().map(str::to_owned),
                r["stored"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every column but the key column, and the other table: what the export must not touch.
fn untouched_part(app: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open(app).unwrap();
    let mut out = Vec::new();
    let mut stmt = c
        .prepare("SELECT id, email, hashed_password, is_active, created_at FROM users ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok(format!(
                "{:?}",
                (
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?
                )
            ))
        })
        .unwrap();
    out.extend(rows.map(|r| r.unwrap()));
    let projects: i64 = c
        .query_row("SELECT COUNT(*) FROM projects", [], |r| r.get(0))
        .unwrap();
    out.push(format!("projects {projects}"));
    out
}

fn export(env: &Env, app: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["export-legacy", "--to", app.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.run(&args)
}

/// Users of the round trip: (id, email, password). All bcrypt, so that logins are quick.
const PEOPLE: [(i64, &str); 10] = [
    (1, "plain1@example.com"),
    (2, "plain2@example.com"),
    (3, "fernet-a@example.com"),
    (4, "fernet-b@example.com"),
    (5, "expiring@example.com"),
    (6, "null@example.com"),
    (7, "empty@example.com"),
    (8, "deleted@example.com"),
    (9, "garbage@example.com"),
    (10, "garbage-then-set@example.com"),
];

fn round_trip_rows() -> Value {
    let key = |id: i64| match id {
        1 | 2 | 8 => json!({"plain": format!("sk-app-plain-{id:04}")}),
        3 | 5 => json!({"fernet": format!("sk-app-fernet-{id:04}"), "with": 0}),
        4 => json!({"fernet": format!("sk-app-fernet-{id:04}"), "with": 1, "blob": true}),
        6 => Value::Null,
        7 => json!({"raw": ""}),
        _ => json!({"raw": format!("garbage value {id}")}),
    };
    Value::Array(
        PEOPLE
            .iter()
            .map(|(id, email)| {
                json!({"id": id, "email": email, "key": key(*id),
                       "password": {"bcrypt": format!("password {id}")}})
            })
            .collect(),
    )
}

/// What keyrack reveals now for each of `PEOPLE`, through the API.
fn revealed(env: &Env) -> Vec<(i64, Option<String>)> {
    let server = env.serve();
    let out = PEOPLE
        .iter()
        .map(|(id, email)| {
            let t = token(&login_with(&server, email, &format!("password {id}")));
            (*id, server.reveal(&t, "openai"))
        })
        .collect();
    server.terminate();
    out
}

/// An export in `format` to a copy of the application's database, each row decoded by the
/// Python program: every matched row is exactly what keyrack reveals; rows 9 (unreadable at
/// import, no key since) and 100 (no keyrack user) keep their values.
fn export_and_check(env: &Env, app: &Path, name: &str, format: &str) -> String {
    let copy = env.path(name);
    std::fs::copy(app, &copy).unwrap();
    let before = decode_raw(&copy);
    let out = export(env, &copy, &["--format", format, "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = stdout(&out);
    let reveals = revealed(env);
    let rows = decode(env, &copy, FERNET_A);
    for (id, key) in &reveals {
        let row = rows.iter().find(|r| r.0 == *id).unwrap();
        if key.is_none() && (*id == 9 || *id == 10) {
            let i = (*id - 1) as usize;
            assert_eq!(decode_raw(&copy)[i], before[i], "row {id} is left alone");
            continue;
        }
        assert_eq!(&row.1, key, "row {id} ({format}): {printed}");
        let expected_store = match (key, format) {
            (None, _) => "null",
            (Some(_), "fernet") => "fernet",
            (Some(_), _) => "plaintext",
        };
        assert_eq!(row.2, expected_store, "row {id}");
    }
    let last = decode_raw(&copy);
    assert_eq!(last.last(), before.last(), "row 100 has no keyrack user");
    printed
}

/// The key column's raw values, by row.
fn decode_raw(app: &Path) -> Vec<Option<String>> {
    let c = rusqlite::Connection::open(app).unwrap();
    let mut stmt = c
        .prepare("SELECT CAST(openai_api_key AS TEXT) FROM users ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| r.get::<_, Option<String>>(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows
}

#[test]
fn export_legacy_round_trip_through_every_phase_and_key_change() {
    if !python_ready() {
        return;
    }
    let fernet_keys = format!("{FERNET_A},{FERNET_B}");
    let mut env = Env::new().var("KEYRACK_LEGACY_FERNET_KEY", &fernet_keys);
    let app = app_db(&env, round_trip_rows());
    let out = import(
        &env,
        &app,
        &["--password-column", "hashed_password", "--skip-unreadable"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The application goes on: a user keyrack never imported.
    sql(
        &app,
        "INSERT INTO users (id, email, openai_api_key, is_active) \
         VALUES (100, 'late@example.com', 'sk-app-late-0100', 1)",
    );
    let untouched = untouched_part(&app);

    // Phase legacy: keyrack's copy holds every key; the export gives back what was imported.
    let printed = export_and_check(&env, &app, "legacy.db", "plaintext");
    assert!(
        printed.contains("keys 6, null 2, left alone (unreadable at import) 2, application rows without a keyrack user 1"),
        "{printed}"
    );
    let server = env.serve();
    let t1 = token(&login_with(&server, "plain1@example.com", "password 1"));
    server.set_key(&t1, "openai", "sk-keyrack-legacy-0001");
    server.terminate();

    // Phase dual, with key changes: set, delete, an expiring key, a key for an unreadable user.
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let server = env.serve();
    let t = |email: &str, id: i64| token(&login_with(&server, email, &format!("password {id}")));
    server.set_key(
        &t("plain2@example.com", 2),
        "openai",
        "sk-keyrack-dual-0002",
    );
    assert_eq!(
        server
            .delete("/user/api-key", Some(&t("deleted@example.com", 8)))
            .status,
        204
    );
    server.set_key(
        &t("garbage-then-set@example.com", 10),
        "openai",
        "sk-keyrack-dual-0010",
    );
    let in_two_hours = (time::OffsetDateTime::now_utc() + time::Duration::hours(2))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let expiring = server.post(
        "/user/api-key",
        Some(&t("expiring@example.com", 5)),
        json!({"api_key": "sk-keyrack-expiring-0005", "expires_at": in_two_hours}),
    );
    assert_eq!(expiring.status, 200, "{}", expiring.raw);
    server.terminate();
    // Something else writes user 6's column (a key the table lacks): a read would move and
    // answer it, so the export gives it too.
    sql(
        &env.db(),
        &format!(
            "UPDATE users SET openai_api_key = '{}' WHERE id = 6",
            seal_like_keyrack(KEY_A, 6, "openai", "sk-foreign-write-0006")
        ),
    );
    let printed = export_and_check(&env, &app, "dual.db", "fernet");
    assert!(
        printed.contains("keys 7, null 2, left alone (unreadable at import) 1"),
        "{printed}"
    );

    // A new encryption key (rotation), phase new_only, one more change.
    env.vars.retain(|(k, _)| k != "KEYRACK_ENCRYPTION_KEY");
    env.vars
        .push(("KEYRACK_ENCRYPTION_KEY".into(), KEY_B.into()));
    env.vars
        .push(("KEYRACK_OLD_ENCRYPTION_KEYS".into(), KEY_A.into()));
    let out = env.run(&["rotate-encryption-key"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // (The foreign write above is counted: phase 3 goes on only when told to.)
    let out = env.run(&["remove-legacy-column", "--yes", "--ignore-foreign-writes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(status_json(&env)["phase"], "new_only");
    let server = env.serve();
    server.set_key(&t_of(&server, 3), "openai", "sk-keyrack-new-only-0003");
    server.terminate();

    // The expiring key has expired by now (keyrack's clock moved on three hours): exported as
    // NULL.
    env.vars
        .push(("KEYRACK_TEST_CLOCK_OFFSET".into(), "10800".into()));
    let reveals = revealed(&env);
    assert_eq!(reveals[4], (5, None), "expired");

    // A dry run writes nothing and says what it would do; no terminal and no --yes: exit 2.
    let before = std::fs::read(&app).unwrap();
    let out = export(&env, &app, &["--format", "fernet", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("nothing was written"),
        "{}",
        stdout(&out)
    );
    let out = export(&env, &app, &["--format", "fernet"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&app).unwrap(), before);
    assert!(backups_of(&app).is_empty());

    // The real export, Fernet: the program opens each row with its first key alone.
    let out = export(&env, &app, &["--format", "fernet", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(
        printed.contains("keys 6, null 3, left alone (unreadable at import) 1, application rows without a keyrack user 1"),
        "{printed}"
    );
    let rows = decode(&env, &app, FERNET_A);
    let want: Vec<(i64, Option<&str>, &str)> = vec![
        (1, Some("sk-keyrack-legacy-0001"), "fernet"),
        (2, Some("sk-keyrack-dual-0002"), "fernet"),
        (3, Some("sk-keyrack-new-only-0003"), "fernet"),
        (4, Some("sk-app-fernet-0004"), "fernet"),
        (5, None, "null"),
        (6, Some("sk-foreign-write-0006"), "fernet"),
        (7, None, "null"),
        (8, None, "null"),
        (10, Some("sk-keyrack-dual-0010"), "fernet"),
        (100, Some("sk-app-late-0100"), "plaintext"),
    ];
    let got: Vec<(i64, Option<&str>, &str)> = rows
        .iter()
        .filter(|r| r.0 != 9)
        .map(|r| (r.0, r.1.as_deref(), r.2.as_str()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(decode_raw(&app)[8].as_deref(), Some("garbage value 9"));
    assert_eq!(
        untouched_part(&app),
        untouched,
        "only the key column changed"
    );
    // The backup beside it: owner-only, the application's database as it was.
    let backups = backups_of(&app);
    assert_eq!(backups.len(), 1, "{backups:?}");
    let mode = std::fs::metadata(&backups[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        decode_raw(&backups[0])[0].as_deref(),
        Some("sk-app-plain-0001")
    );

    // A backup path that exists, a missing table or column, Fernet without a key: exit 2.
    let taken = backups[0].to_str().unwrap().to_owned();
    for (args, needle) in [
        (
            vec!["--format", "plaintext", "--yes", "--backup", &taken],
            "already exists",
        ),
        (
            vec!["--format", "plaintext", "--yes", "--users-table", "people"],
            "people",
        ),
        (
            vec!["--format", "plaintext", "--yes", "--key-column", "api_key"],
            "api_key",
        ),
    ] {
        let before = std::fs::read(&app).unwrap();
        let out = export(&env, &app, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert_eq!(std::fs::read(&app).unwrap(), before);
    }
    let no_fernet: Vec<(String, String)> = env
        .vars
        .iter()
        .filter(|(k, _)| k != "KEYRACK_LEGACY_FERNET_KEY")
        .cloned()
        .collect();
    let saved = std::mem::replace(&mut env.vars, no_fernet);
    let out = export(&env, &app, &["--format", "fernet", "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("KEYRACK_LEGACY_FERNET_KEY"),
        "{}",
        stderr(&out)
    );
    env.vars = saved;

    // A stored value that does not open refuses the whole export before anything is written.
    sql(
        &env.db(),
        "UPDATE api_keys SET sealed_key = substr(sealed_key, 1, length(sealed_key) - 4) || 'AAAA' \
         WHERE user_id = 2 AND is_default = 1",
    );
    let before = std::fs::read(&app).unwrap();
    let backups_before = backups_of(&app).len();
    let out = export(&env, &app, &["--format", "plaintext", "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("user 2"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&app).unwrap(), before);
    assert_eq!(backups_of(&app).len(), backups_before);
}

fn t_of(server: &Server, id: i64) -> String {
    let email = PEOPLE[(id - 1) as usize].1;
    token(&login_with(server, email, &format!("password {id}")))
}

/// The export's backups beside the application's database.
fn backups_of(app: &Path) -> Vec<std::path::PathBuf> {
    let name = format!("{}.backup-", app.file_name().unwrap().to_string_lossy());
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(app.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&name))
        .collect();
    found.sort();
    found
}
