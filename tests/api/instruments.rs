//! The operator's instruments: `backup`, `inspect`, `key-id`, the emails in `status`'s problem
//! lists, and the evidence of legacy use before Phase 3.

use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::support::*;

fn fixtures(env: &Env, name: &str, users: Value) -> String {
    let p = env.path(name);
    std::fs::write(&p, json!({ "users": users }).to_string()).unwrap();
    p.to_str().unwrap().to_owned()
}

// ---- backup ----------------------------------------------------------------------------------

#[test]
fn backup_copies_a_serving_writing_database_owner_only_and_never_over_a_file() {
    let env = Env::new();
    let server = env.serve();
    let ada = server.user("ada@example.com");
    assert_eq!(
        server
            .set_key(&ada, "openai", "sk-ada-0123456789abcd")
            .status,
        200
    );
    // A writer keeps writing while the backup is taken.
    let bob = server.user("bob@example.com");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, base) = (stop.clone(), server.base.clone());
        std::thread::spawn(move || {
            let agent = ureq::agent();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = agent
                    .post(&format!("{base}/user/api-keys"))
                    .set("Authorization", &format!("Bearer {bob}"))
                    .send_json(
                        json!({"provider": format!("p{n}"), "api_key": format!("sk-bob-{n:012}")}),
                    );
                n += 1;
            }
            n
        })
    };
    let copy = env.path("copy.db");
    let out = env.run(&["backup", copy.to_str().unwrap()]);
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains(copy.to_str().unwrap()), "{said}");
    assert!(said.contains("2 users"), "{said}");
    assert!(writes > 0);
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(integrity_ok(&copy));
    // The counts printed are the copy's.
    let keys_in_copy = sql_value(
        &copy,
        "SELECT (SELECT COUNT(*) FROM api_keys)
              + (SELECT COUNT(*) FROM users WHERE openai_api_key IS NOT NULL)",
    );
    let rusqlite::types::Value::Integer(k) = keys_in_copy else {
        panic!("count")
    };
    assert!(said.contains(&format!(", {k} keys")), "{said} / {k}");

    // Never over an existing file: exit 2, the file untouched.
    let before = std::fs::read(&copy).unwrap();
    let again = env.run(&["backup", copy.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    drop(server);

    // Restored (copied into place) and served with the same key, it answers as the original.
    let restored = Env::new();
    std::fs::copy(&copy, restored.db()).unwrap();
    let server = restored.serve();
    let ada = server.login("ada@example.com");
    assert_eq!(
        server.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-0123456789abcd")
    );
}

// ---- inspect, key-id, status's emails -----------------------------------------------------------

#[test]
fn inspect_shows_where_each_key_lives_what_sealed_it_and_why_it_does_not_open() {
    let env = Env::new();
    let f = fixtures(
        &env,
        "f.json",
        json!([
            {"email": "cy@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-column-value-0123456789",
             "api_keys": [{"provider": "openai", "api_key": "sk-table-value-0123456789"}]},
            {"email": "dee@example.com", "password": "correct horse battery"}
        ]),
    );
    let out = env.run(&["load-fixtures", &f]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // dee's column holds a value sealed with a key keyrack is not given.
    let foreign = seal_like_keyrack(KEY_B, 2, "openai", "sk-other-key-0123456789");
    sql(
        &env.db(),
        &format!("UPDATE users SET openai_api_key = '{foreign}' WHERE id = 2"),
    );

    let ids = env.run(&["key-id"]);
    assert_eq!(ids.status.code(), Some(0), "{}", stderr(&ids));
    let key_a_id = stdout(&ids).split_whitespace().next().unwrap().to_owned();
    assert_eq!(key_a_id.len(), 16);
    let key_b_id = foreign.split(':').nth(1).unwrap().to_owned();
    let both = Env {
        dir: std::sync::Arc::new(tempfile::tempdir().unwrap()),
        vars: vec![
            ("KEYRACK_ENCRYPTION_KEY".into(), KEY_A.into()),
            ("KEYRACK_OLD_ENCRYPTION_KEYS".into(), KEY_B.into()),
        ],
    };
    let listed = stdout(&both.run(&["key-id"]));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].starts_with(&key_a_id) && lines[1].starts_with(&key_b_id),
        "{listed}"
    );
    assert!(!both.db().exists(), "key-id uses no database");

    let out = env.run(&["inspect", "CY@example.com", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        !text.contains("sk-column-value-0123456789") && !text.contains("sk-table-value-0123456789")
    );
    let r: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(r["user"], json!({"id": 1, "email": "cy@example.com"}));
    assert_eq!(r["phase"], "dual");
    let keys = r["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{text}");
    let table = keys.iter().find(|k| k["store"] == "api_keys").unwrap();
    assert_eq!(table["sealed_with"], key_a_id.as_str());
    assert_eq!(table["opens"], true);
    assert_eq!(table["masked_key"], "sk-...6789");
    assert_eq!(table["is_default"], true);
    assert_eq!(table["expired"], false);
    assert!(table["created_at"].is_string());
    let column = keys.iter().find(|k| k["store"] == "users_column").unwrap();
    assert_eq!(column["id"], Value::Null);
    assert_eq!(column["opens"], true);
    assert!(
        column["next"].as_str().unwrap().starts_with("conflict"),
        "{column}"
    );

    let out = env.run(&["inspect", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("dee@example.com"), "{said}");
    assert!(said.contains(&format!("sealed with  {key_b_id}")), "{said}");
    assert!(
        said.contains(&format!(
            "no: sealed with key {key_b_id}, which is not configured"
        )),
        "{said}"
    );
    assert!(!said.contains("sk-other-key"), "{said}");

    let out = env.run(&["inspect", "nobody@example.com"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // status names the users of its problem lists by email too.
    let said = stdout(&env.run(&["status"]));
    assert!(
        said.contains("conflicts: user ids 1 (cy@example.com)"),
        "{said}"
    );
    assert!(
        said.contains("undecryptable: user ids 2 (dee@example.com)"),
        "{said}"
    );
}

// ---- evidence of legacy use ---------------------------------------------------------------------

#[test]
fn foreign_column_writes_are_counted_and_hold_back_phase_3() {
    let env = Env::new();
    env.create_db();
    let server = env.serve();
    let ada = server.user("ada@example.com");
    assert_eq!(
        server
            .set_key(&ada, "openai", "sk-ada-0123456789abcd")
            .status,
        200
    );
    // keyrack's own writes, a fixture load included, are not foreign writes.
    let f = fixtures(
        &env,
        "f.json",
        json!([{"email": "eve@example.com", "password": "correct horse battery",
                "openai_api_key": "sk-eve-column-0123456789"}]),
    );
    let out = env.run(&["load-fixtures", &f]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = status_json(&env);
    assert_eq!(s["foreign_column_writes"], 0, "{s}");
    assert_eq!(s["last_foreign_column_write_at"], Value::Null);
    assert_eq!(s["legacy_reads"], 0);

    // A read that finds eve's key only in the column is a legacy read.
    let eve = server.login("eve@example.com");
    assert_eq!(
        server.reveal(&eve, "openai").as_deref(),
        Some("sk-eve-column-0123456789")
    );
    let s = status_json(&env);
    assert_eq!(s["legacy_reads"], 1, "{s}");
    // The move is an event of the user who read.
    let moved = stdout(&env.run(&["audit", "--user", "eve@example.com", "--json"]));
    let moved: Vec<Value> = moved
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        moved.iter().any(|e| e["action"] == "key.migrated"
            && e["actor"] == "user:2"
            && e["source"] == "users_column"
            && e["api_key_id"].is_i64()),
        "{moved:?}"
    );
    assert!(s["last_legacy_read_at"].is_string(), "{s}");
    assert_eq!(s["foreign_column_writes"], 0, "{s}");

    // Another program empties ada's column: a foreign write.
    sql(
        &env.db(),
        "UPDATE users SET openai_api_key = NULL WHERE email = 'ada@example.com'",
    );
    let s = status_json(&env);
    assert_eq!(s["foreign_column_writes"], 1, "{s}");
    assert!(s["last_foreign_column_write_at"].is_string(), "{s}");
    let admin = stdout(&env.run(&["status"]));
    assert!(admin.contains("foreign column writes     1"), "{admin}");
    drop(server);

    let out = env.run(&["remove-legacy-column", "--yes"]);
    says(&out, 3, "legacy reads     1");
    let err = stderr(&out);
    assert!(
        err.contains("1 times") && err.contains("--ignore-foreign-writes"),
        "{err}"
    );
    assert_eq!(status_json(&env)["phase"], "dual");

    let out = env.run(&["remove-legacy-column", "--yes", "--ignore-foreign-writes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(status_json(&env)["phase"], "new_only");
}

// ---- key expiry -----------------------------------------------------------------------------------

fn in_hours(h: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::hours(h))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn an_expired_key_is_neither_revealed_nor_counted_and_a_new_key_replaces_it() {
    let mut env = Env::new();
    env.create_db();
    let server = env.serve();
    let ada = server.user("ada@example.com");
    let bob = server.user("bob@example.com");
    // A time in the past, or not a time: 422 naming the field.
    for bad in ["2001-01-01T00:00:00Z", "next week"] {
        let r = server.post(
            "/user/api-key",
            Some(&ada),
            json!({"api_key": "sk-ada-0123456789abcd", "expires_at": bad}),
        );
        assert_eq!(r.status, 422, "{}", r.raw);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("expires_at"),
            "{}",
            r.raw
        );
    }
    let soon = in_hours(1);
    for (token, key) in [
        (&ada, "sk-ada-0123456789abcd"),
        (&bob, "sk-bob-0123456789abcd"),
    ] {
        let r = server.post(
            "/user/api-key",
            Some(token),
            json!({"api_key": key, "expires_at": soon}),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
    }
    let r = server.post(
        "/user/api-keys",
        Some(&ada),
        json!({"provider": "anthropic", "api_key": "sk-ant-0123456789abcd", "expires_at": soon}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.body["key"]["expired"], false);
    assert!(r.body["key"]["expires_at"].is_string(), "{}", r.raw);
    assert_eq!(
        server.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-0123456789abcd")
    );
    let listed = server.get("/user/api-keys", Some(&ada));
    assert!(
        listed.body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["expired"] == false && k["expires_at"].is_string()),
        "{}",
        listed.raw
    );
    assert_eq!(server.terminate().code(), Some(0));

    // Two hours later (keyrack's clock moved for the test).
    env.vars
        .push(("KEYRACK_TEST_CLOCK_OFFSET".into(), "7200".into()));
    let server = env.serve();
    let uses = |s: &Server| -> Vec<Value> {
        s.get("/user/api-keys", Some(&ada)).body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["usage_count"].clone())
            .collect()
    };
    let before = uses(&server);
    for provider in ["openai", "anthropic"] {
        let r = server.get(
            &format!("/user/api-key?provider={provider}&reveal=true"),
            Some(&ada),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
        assert_eq!(
            r.body,
            json!({"has_key": false, "provider": provider, "masked_key": null, "source": null, "expired": true}),
            "in phase dual the column's mirror is not served either"
        );
    }
    assert_eq!(
        uses(&server),
        before,
        "an expired key is not counted as a use"
    );
    let listed = server.get("/user/api-keys", Some(&ada));
    assert!(
        listed.body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["expired"] == true),
        "{}",
        listed.raw
    );
    let inspected: Value =
        serde_json::from_str(stdout(&env.run(&["inspect", "ada@example.com", "--json"])).trim())
            .unwrap();
    assert!(
        inspected["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["store"] == "api_keys" && k["expired"] == true),
        "{inspected}"
    );

    // Setting a new key replaces the expired one.
    assert_eq!(
        server
            .set_key(&ada, "openai", "sk-ada-new-0123456789")
            .status,
        200
    );
    assert_eq!(
        server.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-new-0123456789")
    );
    assert_eq!(server.terminate().code(), Some(0));

    // revert does not write bob's expired key into the column (the table keeps it).
    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        sql_value(
            &env.db(),
            "SELECT openai_api_key IS NULL FROM users WHERE email = 'bob@example.com'"
        ),
        rusqlite::types::Value::Integer(1)
    );
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM api_keys WHERE user_id = 2"),
        rusqlite::types::Value::Integer(1)
    );
    // In phase legacy there is no expiry.
    let server = env.serve();
    let r = server.post(
        "/user/api-key",
        Some(&ada),
        json!({"api_key": "sk-ada-0123456789abcd", "expires_at": in_hours(24)}),
    );
    assert_eq!(r.status, 409, "{}", r.raw);
    assert_eq!(r.code(), "phase_conflict");
}

// ---- resolve and clear-key ------------------------------------------------------------------------

#[test]
fn resolve_and_clear_key_repair_one_user_after_a_confirmation() {
    let env = Env::new();
    let f = fixtures(
        &env,
        "f.json",
        json!([
            {"email": "cy@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-column-value-0123456789",
             "api_keys": [{"provider": "openai", "api_key": "sk-table-value-0123456789"}]},
            {"email": "dee@example.com", "password": "correct horse battery",
             "api_keys": [{"provider": "anthropic", "api_key": "sk-ant-dee-0123456789"}]},
            {"email": "fay@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-fay-column-0123456789",
             "api_keys": [{"provider": "openai", "api_key": "sk-fay-table-0123456789"}]}
        ]),
    );
    assert_eq!(env.run(&["load-fixtures", &f]).status.code(), Some(0));
    let foreign = seal_like_keyrack(KEY_B, 2, "openai", "sk-other-key-0123456789");
    sql(
        &env.db(),
        &format!("UPDATE users SET openai_api_key = '{foreign}' WHERE id = 2"),
    );
    let s = status_json(&env);
    assert_eq!(
        (s["conflicts"].clone(), s["undecryptable"].clone()),
        (json!(2), json!(1))
    );

    // No terminal and no --yes: exit 2, nothing changed.
    let out = env.run(&["resolve", "cy@example.com", "--keep", "column"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(status_json(&env)["conflicts"], 2);

    let out = env.run(&["resolve", "cy@example.com", "--keep", "column", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        status_json(&env)["conflicts"],
        1,
        "fay's conflict is not touched"
    );
    let again = env.run(&["resolve", "1", "--keep", "table", "--yes"]);
    assert_eq!(again.status.code(), Some(0));
    assert!(stdout(&again).contains("no conflict"), "{}", stdout(&again));

    let out = env.run(&["resolve", "fay@example.com", "--keep", "table", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(status_json(&env)["conflicts"], 0);

    // A value that opens is never cleared; one that does not is, after confirmation.
    let out = env.run(&["clear-key", "cy@example.com", "--yes"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("nothing was changed"),
        "{}",
        stdout(&out)
    );
    let out = env.run(&["clear-key", "dee@example.com"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = env.run(&["clear-key", "dee@example.com", "--store", "column", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("cleared 1 value"), "{}", stdout(&out));
    assert_eq!(status_json(&env)["undecryptable"], 0);

    let server = env.serve();
    let cy = server.login("cy@example.com");
    assert_eq!(
        server.reveal(&cy, "openai").as_deref(),
        Some("sk-column-value-0123456789")
    );
    let listed = server.get("/user/api-keys", Some(&cy));
    let names: Vec<&Value> = listed.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["name"])
        .collect();
    assert!(
        names.contains(&&json!("value kept at resolve")),
        "{}",
        listed.raw
    );
    let fay = server.login("fay@example.com");
    assert_eq!(
        server.reveal(&fay, "openai").as_deref(),
        Some("sk-fay-table-0123456789")
    );
    let dee = server.login("dee@example.com");
    assert_eq!(server.reveal(&dee, "openai"), None);
    assert_eq!(
        server.reveal(&dee, "anthropic").as_deref(),
        Some("sk-ant-dee-0123456789")
    );
}

// ---- events -----------------------------------------------------------------------------------------

fn actions(r: &Resp) -> Vec<String> {
    r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn events_record_who_did_what_to_which_key_and_never_a_secret() {
    let env = Env::new().var("KEYRACK_ADMIN_TOKEN", "admin-secret-token");
    env.create_db();
    let server = env.serve();
    let ada = server.user("ada@example.com");
    let bob = server.user("bob@example.com");
    assert_eq!(
        server
            .set_key(&ada, "openai", "sk-ada-first-0123456789")
            .status,
        200
    );
    assert_eq!(
        server
            .set_key(&ada, "openai", "sk-ada-second-0123456789")
            .status,
        200
    );
    assert_eq!(
        server.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-second-0123456789")
    );
    let added = server.post(
        "/user/api-keys",
        Some(&ada),
        json!({"provider": "anthropic", "api_key": "sk-ant-ada-0123456789"}),
    );
    let id = added.body["key"]["id"].as_i64().unwrap();
    assert_eq!(
        server
            .delete(&format!("/user/api-keys/{id}"), Some(&ada))
            .status,
        204
    );
    for (email, password) in [
        ("ada@example.com", "wrong password ada"),
        ("ghost@example.com", "wrong password ghost"),
    ] {
        let r = server.post(
            "/auth/login",
            None,
            json!({"email": email, "password": password}),
        );
        assert_eq!(r.status, 401);
    }

    // The reveal is batched with the usage counters: it shows within a flush.
    let start = std::time::Instant::now();
    let mine = loop {
        let r = server.get("/user/events", Some(&ada));
        assert_eq!(r.status, 200, "{}", r.raw);
        if actions(&r).contains(&"key.revealed".to_owned()) || start.elapsed().as_secs() > 20 {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Events are listed in the order they were written. Every event but the reveal is written
    // with its request, in the order of the requests; the reveal is written at the flush after
    // it, which can come before or after any of the later requests (the flusher ticks once a
    // second on a clock of its own), but always after the replacement it followed.
    let listed = actions(&mine);
    let revealed = listed.iter().position(|a| a == "key.revealed");
    let replaced = listed.iter().position(|a| a == "key.replaced");
    assert!(
        matches!((revealed, replaced), (Some(r), Some(k)) if r < k),
        "{}",
        mine.raw
    );
    assert_eq!(
        listed
            .iter()
            .filter(|a| *a != "key.revealed")
            .collect::<Vec<_>>(),
        [
            "login.failed",
            "key.deleted",
            "key.created",
            "key.replaced",
            "key.created",
            "login.succeeded",
            "user.created"
        ],
        "{}",
        mine.raw
    );
    let events = mine.body["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .all(|e| e["user_id"] == 1 && e["at"].is_string()),
        "{}",
        mine.raw
    );
    let deleted = events
        .iter()
        .find(|e| e["action"] == "key.deleted")
        .expect("the deletion");
    assert_eq!(deleted["api_key_id"], id);
    assert_eq!(deleted["provider"], "anthropic");
    assert_eq!(deleted["source"], "api_keys");
    assert_eq!(deleted["actor"], "user:1");
    // A user never sees another user's events.
    let theirs = server.get("/user/events", Some(&bob));
    assert_eq!(
        actions(&theirs),
        ["login.succeeded", "user.created"],
        "{}",
        theirs.raw
    );
    assert_eq!(
        actions(&server.get("/user/events?limit=2", Some(&ada))).len(),
        2
    );
    assert_eq!(server.get("/user/events?limit=0", Some(&ada)).status, 422);
    assert_eq!(server.get("/user/events?limit=501", Some(&ada)).status, 422);
    assert_eq!(server.get("/user/events", None).status, 401);
    let all = server.get("/admin/events", Some("admin-secret-token"));
    assert_eq!(all.status, 200, "{}", all.raw);
    assert_eq!(actions(&all).len(), 10, "{}", all.raw);
    assert_eq!(server.get("/admin/events", Some("wrong")).status, 401);
    assert_eq!(server.get("/admin/events", Some(&ada)).status, 401);
    assert_eq!(server.terminate().code(), Some(0));

    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let last = env.run(&["audit", "--limit", "1", "--json"]);
    assert_eq!(last.status.code(), Some(0), "{}", stderr(&last));
    let e: Value = serde_json::from_str(stdout(&last).trim()).unwrap();
    assert_eq!(
        (
            e["action"].clone(),
            e["actor"].clone(),
            e["from"].clone(),
            e["to"].clone()
        ),
        (
            json!("phase.changed"),
            json!("command:revert"),
            json!("dual"),
            json!("legacy")
        )
    );
    let text = stdout(&env.run(&["audit", "--user", "ada@example.com"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    assert!(lines[0].contains("user.created user:1"), "{text}");
    assert!(lines[1].contains("login.succeeded user:1"), "{text}");

    // Never a key, a masked key, a password, a token or a failed login's email.
    let every = stdout(&env.run(&["audit", "--json"])) + &all.raw + &mine.raw;
    for secret in [
        "sk-ada-first-0123456789",
        "sk-ada-second-0123456789",
        "sk-...6789",
        "sk-ant-ada-0123456789",
        "correct horse battery",
        "wrong password",
        "ghost@example.com",
        "ada@example.com",
        ada.as_str(),
        bob.as_str(),
        "admin-secret-token",
    ] {
        assert!(!every.contains(secret), "{secret} in {every}");
    }
}

#[test]
fn events_older_than_the_audit_days_are_pruned_at_start() {
    let env = Env::new().var("KEYRACK_AUDIT_DAYS", "2");
    env.create_db();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    sql(
        &env.db(),
        &format!(
            "INSERT INTO events(at, action, actor) VALUES ({}, 'login.failed', 'user:1');
             INSERT INTO events(at, action, actor) VALUES ({}, 'login.failed', 'user:1');",
            now - 3 * 86_400,
            now - 86_400
        ),
    );
    let _server = env.serve();
    let start = std::time::Instant::now();
    let count = || sql_value(&env.db(), "SELECT COUNT(*) FROM events");
    while count() != rusqlite::types::Value::Integer(1) && start.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(count(), rusqlite::types::Value::Integer(1));
}

// ---- fixtures for harnesses --------------------------------------------------------------------

#[test]
fn fixtures_take_ready_argon2id_hashes_and_can_build_a_legacy_system() {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(b"correct horse battery", &salt)
        .unwrap()
        .to_string();
    assert!(hash.starts_with("$argon2id$"));
    let users: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"email": format!("u{i}@example.com"), "password_hash": hash,
                   "openai_api_key": format!("sk-legacy-{i:08}-abcdefgh")})
        })
        .collect();
    let env = Env::new();
    let p = env.path("many.json");
    std::fs::write(&p, json!({"phase": "legacy", "users": users}).to_string()).unwrap();
    let start = std::time::Instant::now();
    let out = env.run(&["load-fixtures", p.to_str().unwrap()]);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    eprintln!("1000 users with ready hashes loaded in {took:?}");
    assert!(took.as_secs() < 60, "{took:?}");
    let s = status_json(&env);
    assert_eq!(
        (
            s["phase"].clone(),
            s["users"].clone(),
            s["column_keys"].clone()
        ),
        (json!("legacy"), json!(1000), json!(1000))
    );

    let server = env.serve();
    let t = server.login("u7@example.com");
    let r = server.get("/user/api-key?reveal=true", Some(&t));
    assert_eq!(
        r.body["api_key"], "sk-legacy-00000007-abcdefgh",
        "{}",
        r.raw
    );
    assert_eq!(r.body["source"], "users_column");
    drop(server);
    // The rehearsal: migrate moves every key.
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("migrated 1000"), "{}", stdout(&out));
    let last: Value =
        serde_json::from_str(stdout(&env.run(&["audit", "--limit", "1", "--json"])).trim())
            .unwrap();
    assert_eq!(
        (
            last["action"].clone(),
            last["actor"].clone(),
            last["source"].clone()
        ),
        (
            json!("key.migrated"),
            json!("command:migrate"),
            json!("users_column")
        )
    );

    // A bad or doubled password field names the user and the field, never the value.
    for (user, field) in [
        (
            json!({"email": "a@example.com", "password_hash": "$2b$12$abcdefghijklmnopqrstuvCsecretsecretsecretsecretsec"}),
            "users[0].password_hash",
        ),
        (
            json!({"email": "a@example.com", "password": "correct horse battery", "password_hash": hash}),
            "users[0].password",
        ),
    ] {
        let bad = Env::new();
        let f = fixtures(&bad, "bad.json", json!([user]));
        let out = bad.run(&["load-fixtures", &f]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(field), "{}", stderr(&out));
        assert!(!stderr(&out).contains("secretsecret"), "{}", stderr(&out));
        assert!(!bad.db().exists());
    }
    // "phase": "legacy" is for a new database.
    let p = env.path("late.json");
    std::fs::write(
        &p,
        json!({"phase": "legacy", "users": [{"email": "late@example.com", "password_hash": hash}]})
            .to_string(),
    )
    .unwrap();
    let dual = Env::new();
    dual.create_db();
    let f = fixtures(
        &dual,
        "one.json",
        json!([{"email": "b@example.com", "password_hash": hash}]),
    );
    assert_eq!(dual.run(&["load-fixtures", &f]).status.code(), Some(0));
    let out = dual.run(&["load-fixtures", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(status_json(&dual)["users"], 1);
    assert_eq!(status_json(&dual)["phase"], "dual");
}

/// A clean shutdown writes the queued events of reveals even when another process holds the
/// database's write lock past the busy timeout for a while: the last flush has no later one to
/// catch up, so it tries again instead of dropping them (seen: 10 reveals answered, 0 events, exit
/// 0, with a lock held 12 s against the default 5 s timeout).
#[test]
fn a_shutdown_writes_queued_reveals_past_a_lock_held_longer_than_the_busy_timeout() {
    let env = Env::new().var("KEYRACK_BUSY_TIMEOUT", "1");
    let server = env.serve();
    let token = server.user("lock@example.com");
    assert_eq!(
        server
            .set_key(&token, "openai", "sk-lockheld0123456789")
            .status,
        200
    );
    let lock = rusqlite::Connection::open(env.db()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    for _ in 0..10 {
        assert!(server.reveal(&token, "openai").is_some());
    }
    // Held past two busy timeouts of the server after the signal, then released.
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(2500));
        lock.execute_batch("COMMIT").unwrap();
    });
    let status = server.terminate();
    holder.join().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        sql_value(
            &env.db(),
            "SELECT SUM(count) FROM events WHERE action = 'key.revealed'"
        ),
        rusqlite::types::Value::Integer(10)
    );
}
