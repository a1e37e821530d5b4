//! Upgrades and versions: a database written by keyrack's first release (commit d9f99fa, schema
//! version 2; `tests/fixtures/first-release/`, made by that release's binary, see `make.py`
//! there) is refused by every command but `serve`, `migrate` and `upgrade`, byte for byte
//! unchanged; `upgrade` writes a backup first and keeps every key, session and password. A
//! newer schema stops every command. `--version`, `version`, `status` and `/healthz` name the
//! versions.

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

const FIRST_RELEASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/first-release");

/// The schema version this binary brings, as `keyrack version` prints it.
fn binary_schema() -> i64 {
    let out = Command::new(BIN).arg("version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("schema version "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no schema version in {text:?}"))
}

/// An environment holding a copy of the first release's database as `keyrack.db`, with its
/// key file beside it (no KEYRACK_ENCRYPTION_KEY), mode 0644 as that release left it.
fn first_release_env() -> Env {
    let env = Env::without_key();
    std::fs::copy(format!("{FIRST_RELEASE}/first-release.db"), env.db()).unwrap();
    std::fs::copy(
        format!("{FIRST_RELEASE}/first-release.db.key"),
        env.path("keyrack.db.key"),
    )
    .unwrap();
    std::fs::set_permissions(env.db(), std::fs::Permissions::from_mode(0o644)).unwrap();
    env
}

fn manifest() -> Value {
    serde_json::from_slice(&std::fs::read(format!("{FIRST_RELEASE}/manifest.json")).unwrap())
        .unwrap()
}

fn with_suffix(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The database file, and its `-wal` unless it holds no frame (SQLite may make an empty one
/// for a reader; the `-shm` index is any reader's to rewrite).
fn database_state(db: &Path) -> (Vec<u8>, Vec<u8>) {
    let wal = std::fs::read(with_suffix(db, "-wal")).unwrap_or_default();
    (std::fs::read(db).unwrap(), wal)
}

/// The files of the directory but the -wal and -shm a reader may make.
fn names(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm") && !n.starts_with("server-"))
        .collect();
    v.sort();
    v
}

fn backups(env: &Env) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("keyrack.db.backup-"))
        .collect();
    v.sort();
    v
}

#[test]
fn the_first_release_s_database_is_refused_unchanged_then_upgraded_keeping_everything() {
    let env = first_release_env();
    let m = manifest();
    let current = binary_schema();
    assert!(current > 2);
    let fixtures = env.path("more.json");
    std::fs::write(&fixtures, r#"{"users": []}"#).unwrap();
    let before = database_state(&env.db());
    let files_before = names(&env);

    // Every command that may not apply migrations: exit 2 naming `keyrack upgrade`, nothing
    // written (not the database, not a key id, not a backup).
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["audit"],
        vec!["backup", "copy.db"],
        vec!["inspect", "api1@example.com"],
        vec!["revert", "--yes"],
        vec!["revert", "--dry-run"],
        vec!["remove-legacy-column", "--dry-run"],
        vec!["rotate-encryption-key"],
        vec!["resolve", "1", "--keep", "table", "--yes"],
        vec!["clear-key", "1", "--yes"],
        vec!["load-fixtures", fixtures.to_str().unwrap()],
        vec!["reset-password", "api1@example.com"],
        vec!["users"],
        vec!["service-token", "list"],
        vec!["service-token", "create", "app"],
        vec!["delete-user", "1", "--yes"],
        vec!["invite", "1"],
        vec![
            "export-legacy",
            "--to",
            "app.db",
            "--format",
            "plaintext",
            "--yes",
        ],
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("keyrack upgrade"), "{args:?}: {err}");
        assert!(
            err.contains("schema version 2") && err.contains(&format!("schema version {current}")),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            database_state(&env.db()) == before,
            "{args:?} changed the database"
        );
        assert_eq!(names(&env), files_before, "{args:?} made a file");
    }
    // A plan on its in-memory copy: it says what it would apply, never that it applied it.
    let out = env.run(&["migrate", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("nothing was written"));
    assert!(
        !stderr(&out).contains("applied schema migration"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("would be applied"),
        "{}",
        stderr(&out)
    );
    assert!(database_state(&env.db()) == before);
    assert_eq!(names(&env), files_before);

    // The upgrade: a backup first (schema 2 in its name, owner-only, logged), then the
    // migrations; the database becomes owner-only.
    let out = env.run(&["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    says(
        &out,
        0,
        &format!("from schema version 2 to {current}; the backup is"),
    );
    let b = backups(&env);
    assert_eq!(b.len(), 1, "{b:?}");
    let name = b[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with("-schema-2"), "{name}");
    assert!(stderr(&out).contains(&name), "logged: {}", stderr(&out));
    for f in [b[0].clone(), env.db()] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f:?}");
    }
    assert!(
        stderr(&out).contains("made it owner-only"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        sql_value(&b[0], "SELECT MAX(version) FROM refinery_schema_history"),
        rusqlite::types::Value::Integer(2)
    );
    assert_eq!(
        sql_value(&b[0], "SELECT COUNT(*) FROM users"),
        rusqlite::types::Value::Integer(30)
    );
    // Run again: nothing to do, no second backup.
    says(&env.run(&["upgrade"]), 0, "nothing to upgrade");
    assert_eq!(backups(&env).len(), 1);

    let st = status_json(&env);
    assert_eq!(st["schema_version"], current);
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["phase"], "dual");
    assert_eq!(st["users"], 30);
    assert_eq!(
        st["unmigrated"], 10,
        "the first release's unmigrated keys are still there"
    );
    assert_eq!(st["undecryptable"], 0);

    // Every session still works, every key reveals, every password logs in.
    let server = env.serve();
    let health = server.get("/healthz", None);
    assert_eq!(health.body["schema_version"], current);
    for u in m["users"].as_array().unwrap() {
        let email = u["email"].as_str().unwrap();
        let old = u["token"].as_str().unwrap();
        let me = server.get("/user/me", Some(old));
        assert_eq!(me.status, 200, "{email}: {}", me.raw);
        assert_eq!(me.body["user"]["email"], email);
        assert_eq!(
            server.reveal(old, "openai").as_deref(),
            u["openai"].as_str(),
            "{email}"
        );
        assert_eq!(
            server.reveal(old, "anthropic").as_deref(),
            u["anthropic"].as_str(),
            "{email}"
        );
        let login = server.post(
            "/auth/login",
            None,
            serde_json::json!({"email": email, "password": u["password"]}),
        );
        assert_eq!(login.status, 200, "{email}: {}", login.raw);
        let wrong = server.post(
            "/auth/login",
            None,
            serde_json::json!({"email": email, "password": "not the password"}),
        );
        assert_eq!(wrong.status, 401);
    }
    server.terminate();
    let st = status_json(&env);
    assert_eq!(st["unmigrated"], 0, "each read moved its column key");
    assert_eq!(st["table_keys"], 30);
}

#[test]
fn serve_upgrades_after_a_backup_unless_it_is_turned_off() {
    let current = binary_schema();
    let env = first_release_env();
    let server = env.serve();
    let b = backups(&env);
    assert_eq!(b.len(), 1, "{b:?}");
    let logs = server.logs();
    assert!(
        logs.contains(&b[0].file_name().unwrap().to_string_lossy().to_string()),
        "{logs}"
    );
    assert_eq!(server.get("/healthz", None).body["schema_version"], current);
    server.terminate();

    let env = first_release_env().var("KEYRACK_UPGRADE_BACKUP", "off");
    let server = env.serve();
    assert!(backups(&env).is_empty());
    server.terminate();
    assert_eq!(status_json(&env)["schema_version"], current);

    let env = first_release_env();
    says(
        &env.run(&["upgrade", "--no-backup"]),
        0,
        "no backup was written",
    );
    assert!(backups(&env).is_empty());
    let env = first_release_env().var("KEYRACK_UPGRADE_BACKUP", "sometimes");
    let out = env.run(&["upgrade"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("KEYRACK_UPGRADE_BACKUP"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_newer_schema_stops_every_command_naming_both_versions() {
    let env = Env::new();
    env.create_db();
    sql(
        &env.db(),
        "INSERT INTO refinery_schema_history(version, name, applied_on, checksum) \
         VALUES (999, 'from_the_future', '2030-01-01T00:00:00Z', '0')",
    );
    let before = database_state(&env.db());
    let fixtures = env.path("no-users.json");
    for args in [
        vec!["serve", "--listen", "127.0.0.1:0"],
        vec!["upgrade"],
        vec!["migrate"],
        vec!["migrate", "--dry-run"],
        vec!["status"],
        vec!["backup", "copy.db"],
        vec!["audit"],
        vec!["load-fixtures", fixtures.to_str().unwrap()],
        vec!["users"],
        vec!["service-token", "list"],
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        for needle in [
            "schema version 999".to_owned(),
            format!("schema version {}", binary_schema()),
            env!("CARGO_PKG_VERSION").to_owned(),
        ] {
            assert!(err.contains(&needle), "{args:?}: {needle} not in {err}");
        }
        assert!(database_state(&env.db()) == before, "{args:?} wrote");
        assert!(!env.path("copy.db").exists());
    }
}

#[test]
fn backup_and_audit_need_no_encryption_key_and_make_no_key_file() {
    // A database whose key is elsewhere (the key file moved away, no variable set).
    let env = Env::without_key();
    env.create_db();
    let server = env.serve();
    let t = server.user("ada@example.com");
    server.set_key(&t, "openai", "sk-ada-0123456789abcdef");
    server.terminate();
    std::fs::rename(env.path("keyrack.db.key"), env.path("elsewhere.key")).unwrap();

    let out = env.run(&["backup", "copy.db"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = env.run(&["audit", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("key.created"), "{}", stdout(&out));
    assert!(!env.path("keyrack.db.key").exists(), "no key file appears");
    // A wrong key configured does not matter to them either.
    let env2 = Env {
        dir: env.dir,
        vars: vec![("KEYRACK_ENCRYPTION_KEY".into(), KEY_B.into())],
    };
    let out = env2.run(&["audit"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The commands that decrypt still need it.
    let out = env2.run(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("KEYRACK_ENCRYPTION_KEY"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn versions_are_named_by_the_binary_status_and_healthz() {
    let version = env!("CARGO_PKG_VERSION");
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("keyrack {version}")
    );
    let out = Command::new(BIN).arg("version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("keyrack {version}\n")));
    let env = Env::new();
    let server = env.serve();
    let h = server.get("/healthz", None);
    assert_eq!(h.body["version"], version);
    assert_eq!(h.body["schema_version"], binary_schema());
    server.terminate();
    let st = status_json(&env);
    assert_eq!(st["version"], version);
    assert_eq!(st["schema_version"], binary_schema());
    let out = env.run(&["status"]);
    assert!(stdout(&out).contains(&format!("version          {version}")));
}

#[test]
fn every_command_declares_what_it_needs() {
    // The commands `keyrack --help` lists, each in keyrack::open::NEEDS (a command missing
    // there does not run).
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        // A command's line is indented by two spaces; a wrapped description, by more.
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() > 15, "{commands:?}");
    for c in commands {
        assert!(
            keyrack::open::NEEDS.iter().any(|(name, _)| *name == c),
            "{c} is not declared in keyrack::open::NEEDS"
        );
    }
}
