//! Texts an operator reads (emails, key names) refuse what would make them read as other text:
//! control characters, line separators and bidirectional marks, embeddings, overrides and
//! isolates. Each way an email enters keyrack is tried: `POST /auth/register`, `add-user`, a
//! fixtures file, `import-legacy`.

use serde_json::json;

use crate::support::*;

/// `b<RLO>exe.txt@example.com` shows as `btxt.exe@example.com` wherever it is printed.
const DISGUISED: &str = "b\u{202e}exe.txt@example.com";

#[test]
fn register_refuses_an_email_with_a_bidirectional_override() {
    let s = Env::new().serve();
    for email in [
        DISGUISED,
        "ada\u{2066}@example.com",
        "ada@exa\u{2028}mple.com",
        "a\u{200f}da@example.com",
    ] {
        let r = s.post(
            "/auth/register",
            None,
            json!({"email": email, "password": "correct horse battery"}),
        );
        assert_eq!(
            (r.status, r.code()),
            (422, "validation_failed"),
            "{email:?}"
        );
        let message = r.body["error"]["message"].as_str().unwrap_or("");
        assert!(message.starts_with("email"), "{message}");
    }
    // A key name follows the same rule.
    let token = s.user("ada@example.com");
    let r = s.post(
        "/user/api-keys",
        Some(&token),
        json!({"provider": "openai", "api_key": "sk-0123456789abcdef", "name": "w\u{202e}txt.exe"}),
    );
    assert_eq!((r.status, r.code()), (422, "validation_failed"));
    assert!(r.raw.contains("name"), "{}", r.raw);
}

#[test]
fn add_user_refuses_an_email_with_a_bidirectional_override() {
    let env = Env::new();
    env.create_db();
    let out = env.run_with_stdin(&["add-user", DISGUISED], "correct horse battery\n");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("email"), "{}", stderr(&out));
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM users"),
        rusqlite::types::Value::Integer(0)
    );
}

#[test]
fn fixtures_refuse_an_email_with_a_bidirectional_override() {
    let env = Env::new();
    let file = fixtures_file(
        &env,
        "disguised.json",
        &json!({"users": [{"email": "ada@example.com", "password": "correct horse battery"},
                          {"email": DISGUISED, "password": "correct horse battery"}]}),
    );
    let out = env.run(&["load-fixtures", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("users[1].email"), "{}", stderr(&out));
}

/// An imported row whose email carries such a character is skipped like any other row with an
/// invalid email: counted under "invalid email" and named by id, the email shown escaped.
#[test]
fn import_legacy_skips_a_row_whose_email_has_a_bidirectional_override() {
    let env = Env::new();
    let app = env.path("app.db");
    let c = rusqlite::Connection::open(&app).unwrap();
    c.execute_batch(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, openai_api_key TEXT);",
    )
    .unwrap();
    c.execute(
        "INSERT INTO users VALUES (1, 'ada@example.com', 'sk-ada-0123456789'), (2, ?1, 'sk-b-0123456789')",
        [DISGUISED],
    )
    .unwrap();
    drop(c);
    let out = env.run(&["import-legacy", "--from", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(report.contains("imported 1 users"), "{report}");
    assert!(report.contains("skipped: 1 (invalid email 1)"), "{report}");
    let err = stderr(&out);
    assert!(
        err.contains(
            "row with id 2: skipped: the email \"b\\u{202e}exe.txt@example.com\" is not valid"
        ),
        "{err}"
    );
    assert!(
        !err.contains('\u{202e}'),
        "the override reached the output: {err}"
    );
    assert_eq!(
        sql_value(&env.db(), "SELECT group_concat(email) FROM users"),
        rusqlite::types::Value::Text("ada@example.com".into())
    );
}
