//! The key routes in every phase, and the promises of SPEC section 5 about keys.

use rusqlite::types::Value as Sql;
use serde_json::json;

use crate::support::*;

#[test]
fn dual_phase_routes_write_both_stores_and_read_the_table() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");

    let none = s.get("/user/api-key", Some(&t));
    assert_eq!(
        none.body,
        json!({"has_key": false, "provider": "openai", "masked_key": null, "source": null})
    );

    let r = s.set_key(&t, "openai", "  sk-0123456789abcdefWxyz \n");
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.body,
        json!({"has_key": true, "provider": "openai", "masked_key": "sk-...Wxyz", "source": "api_keys"})
    );
    assert_eq!(r.header("Cache-Control"), Some("no-store"));
    // Dual write: the column mirrors the default row, sealed, in the same transaction.
    let col = sql_value(
        &env.db(),
        "SELECT openai_api_key FROM users WHERE email = 'ada@example.com'",
    );
    let row = sql_value(
        &env.db(),
        "SELECT sealed_key FROM api_keys WHERE is_default = 1",
    );
    assert_eq!(col, row);

    let g = s.get("/user/api-key", Some(&t));
    assert_eq!(g.body["masked_key"], "sk-...Wxyz");
    assert!(
        g.body.get("api_key").is_none(),
        "no plaintext without reveal"
    );
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-0123456789abcdefWxyz")
    );

    // Another provider: table only.
    assert_eq!(s.set_key(&t, "anthropic", "sk-ant-0123456789").status, 200);
    assert_eq!(
        s.reveal(&t, "anthropic").as_deref(),
        Some("sk-ant-0123456789")
    );
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-0123456789abcdefWxyz")
    );

    // Listing.
    let l = s.get("/user/api-keys", Some(&t));
    assert_eq!(l.status, 200);
    assert_eq!(l.body["phase"], "dual");
    assert_eq!(
        l.body["legacy_column"],
        json!({"present": true, "has_key": true})
    );
    let keys = l.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let openai = keys.iter().find(|k| k["provider"] == "openai").unwrap();
    for field in [
        "id",
        "provider",
        "name",
        "masked_key",
        "is_default",
        "source",
        "created_at",
        "updated_at",
        "last_used_at",
        "usage_count",
    ] {
        assert!(openai.get(field).is_some(), "{field} missing: {openai}");
    }
    assert_eq!(openai["is_default"], true);
    assert_eq!(openai["source"], "api_keys");
    assert_eq!(openai["usage_count"], 2, "two reveals counted");
    assert!(!l.raw.contains("sk-0123456789abcdefWxyz"));

    // Delete the default: both stores of the phase.
    assert_eq!(s.delete("/user/api-key", Some(&t)).status, 204);
    assert_eq!(
        s.delete("/user/api-key", Some(&t)).status,
        204,
        "idempotent"
    );
    assert_eq!(
        sql_value(&env.db(), "SELECT openai_api_key FROM users"),
        Sql::Null
    );
    assert_eq!(s.get("/user/api-key", Some(&t)).body["has_key"], false);
    assert_eq!(
        s.reveal(&t, "anthropic").as_deref(),
        Some("sk-ant-0123456789")
    );
}

#[test]
fn several_keys_defaults_and_delete_by_id() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    let add = |provider: &str, key: &str, extra: serde_json::Value| {
        let mut body = json!({"provider": provider, "api_key": key});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post("/user/api-keys", Some(&t), body)
    };
    let first = add(
        "openai",
        "sk-first-0123456789",
        json!({"name": "work", "is_default": false}),
    );
    assert_eq!(first.status, 201, "{}", first.raw);
    assert_eq!(
        first.body["key"]["is_default"], true,
        "the first key of a provider is its default"
    );
    assert_eq!(first.body["key"]["name"], "work");
    let second = add("openai", "sk-second-0123456789", json!({}));
    assert_eq!(second.body["key"]["is_default"], false);
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-first-0123456789")
    );

    let third = add("openai", "sk-third-0123456789", json!({"is_default": true}));
    assert_eq!(third.body["key"]["is_default"], true);
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-third-0123456789")
    );
    // The column follows the default (dual phase).
    let col = sql_value(&env.db(), "SELECT openai_api_key FROM users");
    let def = sql_value(
        &env.db(),
        "SELECT sealed_key FROM api_keys WHERE is_default = 1",
    );
    assert_eq!(col, def);
    let l = s.get("/user/api-keys", Some(&t));
    let defaults = l.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["is_default"] == true)
        .count();
    assert_eq!(defaults, 1);

    // Deleting the default OpenAI key by id clears the column too.
    let id = third.body["key"]["id"].as_i64().unwrap();
    assert_eq!(
        s.delete(&format!("/user/api-keys/{id}"), Some(&t)).status,
        204
    );
    assert_eq!(
        sql_value(&env.db(), "SELECT openai_api_key FROM users"),
        Sql::Null
    );
    let r = s.delete(&format!("/user/api-keys/{id}"), Some(&t));
    assert_eq!((r.status, r.code()), (404, "not_found"));
    assert_eq!(s.delete("/user/api-keys/abc", Some(&t)).status, 404);

    // Validation names the field.
    let r = add("OpenAI!", "sk-valid-0123456789", json!({}));
    assert_eq!((r.status, r.code()), (422, "validation_failed"));
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("provider"));
    let r = add("openai", "short", json!({}));
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("api_key"));
    let r = s.post("/user/api-keys", Some(&t), json!({"provider": "openai"}));
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("api_key"));
    let r = add(
        "openai",
        "sk-valid-0123456789",
        json!({"is_default": "yes"}),
    );
    assert_eq!(r.status, 400);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("is_default"));
    // A name that would display as another (a right-to-left override, a line separator) is
    // refused, naming the field; an ordinary non-Latin name is not.
    for disguised in [
        "work\u{202e}txt.exe",
        "a\u{2028}b",
        "x\u{2066}y\u{2069}",
        "tab\there",
    ] {
        let r = add(
            "openai",
            "sk-valid-0123456789",
            json!({ "name": disguised }),
        );
        assert_eq!(
            (r.status, r.code()),
            (422, "validation_failed"),
            "{disguised:?}"
        );
        assert!(r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("name"));
    }
    let r = add(
        "openai",
        "sk-valid-0123456789",
        json!({"name": "עבודה مفتاح"}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let r = s.get("/user/api-key?provider=Bad%20Provider", Some(&t));
    assert_eq!((r.status, r.code()), (422, "validation_failed"));
    let r = s.get("/user/api-key?reveal=maybe", Some(&t));
    assert_eq!(r.status, 422);
    // Key routes need a token.
    assert_eq!(s.get("/user/api-keys", None).status, 401);
}

#[test]
fn one_user_never_reaches_another_users_keys() {
    let s = Env::new().serve();
    let ada = s.user("ada@example.com");
    let bob = s.user("bob@example.com");
    let r = s.post(
        "/user/api-keys",
        Some(&ada),
        json!({"provider": "openai", "api_key": "sk-ada-0123456789"}),
    );
    let ada_key = r.body["key"]["id"].as_i64().unwrap();

    assert_eq!(s.get("/user/api-key", Some(&bob)).body["has_key"], false);
    assert!(s.get("/user/api-keys", Some(&bob)).body["keys"]
        .as_array()
        .unwrap()
        .is_empty());
    // Deleting Ada's key id as Bob: the same 404 as an id that does not exist.
    let as_bob = s.delete(&format!("/user/api-keys/{ada_key}"), Some(&bob));
    let missing = s.delete("/user/api-keys/999999", Some(&bob));
    assert_eq!(as_bob.status, 404);
    assert_eq!(as_bob.raw, missing.raw);
    assert_eq!(
        s.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-0123456789")
    );
    // Bob's writes touch only Bob.
    s.set_key(&bob, "openai", "sk-bob-0123456789");
    s.delete("/user/api-key", Some(&bob));
    assert_eq!(
        s.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-0123456789")
    );
}

#[test]
fn a_ciphertext_copied_to_another_user_does_not_decrypt() {
    let env = Env::new();
    let s = env.serve();
    let ada = s.user("ada@example.com");
    let bob = s.user("bob@example.com");
    s.set_key(&ada, "openai", "sk-ada-secret-0123456789");
    s.set_key(&bob, "openai", "sk-bob-secret-0123456789");
    sql(
        &env.db(),
        "UPDATE api_keys SET sealed_key = (SELECT k.sealed_key FROM api_keys k JOIN users u ON u.id = k.user_id WHERE u.email = 'ada@example.com')
         WHERE user_id = (SELECT id FROM users WHERE email = 'bob@example.com')",
    );
    let r = s.get("/user/api-key?reveal=true", Some(&bob));
    assert_eq!((r.status, r.code()), (500, "key_unreadable"));
    assert!(!r.raw.contains("sk-ada"), "never the other user's key");
    let logs = s.logs_settled();
    assert!(
        logs.contains("user 2") && logs.contains("in api_keys (key "),
        "{logs}"
    );
    assert!(!logs.contains("sk-ada-secret"));
    // The listing still answers, without the unreadable value.
    let l = s.get("/user/api-keys", Some(&bob));
    assert_eq!(l.status, 200);
    assert_eq!(l.body["keys"][0]["masked_key"], serde_json::Value::Null);
    // Ada is unaffected.
    assert_eq!(
        s.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-secret-0123456789")
    );
}

#[test]
fn no_plaintext_in_the_database_wal_or_trace_log() {
    let env = Env::new().var("RUST_LOG", "trace");
    let s = env.serve();
    let t = s.user("ada@example.com");
    let secrets = [
        "sk-plaintext-check-0123456789",
        "sk-ant-plaintext-0123456789",
    ];
    s.set_key(&t, "openai", secrets[0]);
    s.post(
        "/user/api-keys",
        Some(&t),
        json!({"provider": "anthropic", "api_key": secrets[1]}),
    );
    s.reveal(&t, "openai");
    s.get("/user/api-keys", Some(&t));
    let bytes = db_bytes(&env.db());
    assert!(bytes.len() > 10_000);
    // Each request's line (written after its answer) is in the log before it is searched.
    let logs = s.logs_with(&[
        "POST /user/api-key 200",
        "POST /user/api-keys 201",
        "GET /user/api-key 200",
        "GET /user/api-keys 200",
    ]);
    for secret in secrets
        .iter()
        .chain(["correct horse battery", t.as_str()].iter())
    {
        assert!(!contains(&bytes, secret), "{secret} in the database files");
        assert!(!logs.contains(secret), "{secret} in the log");
    }
    // The test can see what it looks for: the sealed format is there.
    assert!(contains(&bytes, "kr1:"));
}

#[test]
fn keys_survive_logout_login_restart_and_kill9() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    assert_eq!(
        s.set_key(&t, "openai", "sk-survivor-0123456789").status,
        200
    );
    assert_eq!(s.post("/auth/logout", Some(&t), json!({})).status, 204);
    let t = s.login("ada@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-survivor-0123456789")
    );
    assert_eq!(s.terminate().code(), Some(0));

    let s = env.serve();
    let t = s.login("ada@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-survivor-0123456789")
    );
    // A 2xx write, then kill -9 at once: it is on disk.
    let r = s.post(
        "/user/api-keys",
        Some(&t),
        json!({"provider": "mistral", "api_key": "sk-killed-0123456789"}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        s.set_key(&t, "openai", "sk-after-kill-0123456789").status,
        200
    );
    s.kill9();
    assert!(integrity_ok(&env.db()));
    let s = env.serve();
    let t = s.login("ada@example.com");
    assert_eq!(
        s.reveal(&t, "mistral").as_deref(),
        Some("sk-killed-0123456789")
    );
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-after-kill-0123456789")
    );
}

#[test]
fn usage_is_counted_and_flushed_at_clean_shutdown() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "openai", "sk-usage-0123456789");
    for _ in 0..3 {
        s.reveal(&t, "openai");
    }
    // A GET without reveal is not a use.
    s.get("/user/api-key", Some(&t));
    let k = &s.get("/user/api-keys", Some(&t)).body["keys"][0];
    assert_eq!(k["usage_count"], 3);
    assert!(k["last_used_at"].is_string());
    assert_eq!(s.terminate().code(), Some(0));
    assert_eq!(
        sql_value(&env.db(), "SELECT usage_count FROM api_keys"),
        Sql::Integer(3)
    );
}

#[test]
fn dual_read_moves_a_column_only_key() {
    let env = Env::new();
    let s = env.serve_with(&["--fixtures", &repo_fixture("legacy-one.json")]);
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM api_keys"),
        Sql::Integer(0)
    );
    let t = s.login("ada@example.com");
    let r = s.get("/user/api-key?reveal=true", Some(&t));
    assert_eq!(
        r.body["source"], "users_column",
        "found in the column by this request"
    );
    assert_eq!(r.body["api_key"], "sk-legacy-0123456789abcdef");
    assert_eq!(
        sql_value(
            &env.db(),
            "SELECT COUNT(*) FROM api_keys WHERE is_default = 1"
        ),
        Sql::Integer(1)
    );
    let r = s.get("/user/api-key", Some(&t));
    assert_eq!(r.body["source"], "api_keys");
    let l = s.get("/user/api-keys", Some(&t));
    assert_eq!(l.body["keys"][0]["usage_count"], 1);
}

#[test]
fn adding_an_openai_key_first_moves_the_column_key() {
    let env = Env::new();
    let s = env.serve_with(&["--fixtures", &repo_fixture("legacy-one.json")]);
    let t = s.login("ada@example.com");
    let r = s.post(
        "/user/api-keys",
        Some(&t),
        json!({"provider": "openai", "api_key": "sk-extra-0123456789"}),
    );
    assert_eq!(
        r.body["key"]["is_default"], false,
        "the column key was the default"
    );
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-legacy-0123456789abcdef")
    );
}

#[test]
fn migrate_endpoint_counts_and_reports_conflicts() {
    let env = Env::new();
    let f = fixtures_file(
        &env,
        "f.json",
        &json!({"users": [
            {"email": "ada@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-legacy-0123456789abcdef"},
            {"email": "cy@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-column-value-0123456789",
             "api_keys": [{"provider": "openai", "api_key": "sk-table-value-0123456789"}]}
        ]}),
    );
    let s = env.serve_with(&["--fixtures", f.to_str().unwrap()]);
    let ada = s.login("ada@example.com");
    let r = s.post("/user/migrate-api-keys", Some(&ada), json!({}));
    assert_eq!(
        r.body,
        json!({"migrated": 1, "already_migrated": 0, "conflicts": 0, "phase": "dual"})
    );
    let r = s.post("/user/migrate-api-keys", Some(&ada), json!({}));
    assert_eq!(
        r.body,
        json!({"migrated": 0, "already_migrated": 1, "conflicts": 0, "phase": "dual"})
    );

    let cy = s.login("cy@example.com");
    let r = s.post("/user/migrate-api-keys", Some(&cy), json!({}));
    assert_eq!(
        r.body,
        json!({"migrated": 0, "already_migrated": 0, "conflicts": 1, "phase": "dual"})
    );
    // Both values kept; the table (source of truth) answers.
    assert_eq!(
        s.reveal(&cy, "openai").as_deref(),
        Some("sk-table-value-0123456789")
    );
    let st = status_json(&env);
    assert_eq!(st["conflicts"], 1);
    let bob = s.user("bob@example.com");
    let r = s.post("/user/migrate-api-keys", Some(&bob), json!({}));
    assert_eq!(
        r.body,
        json!({"migrated": 0, "already_migrated": 0, "conflicts": 0, "phase": "dual"})
    );
}

#[test]
fn legacy_phase_keeps_only_the_column_key() {
    let env = Env::new();
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "anthropic", "sk-ant-0123456789");
    let out = env.run(&["revert", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The running server sees the new phase at its next request.
    assert_eq!(s.get("/healthz", None).body["phase"], "legacy");

    assert_eq!(
        s.get("/user/api-key?provider=anthropic", Some(&t)).body["has_key"],
        false
    );
    let r = s.set_key(&t, "openai", "sk-legacy-write-0123456789");
    assert_eq!(r.body["source"], "users_column");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-legacy-write-0123456789")
    );
    assert_eq!(
        sql_value(
            &env.db(),
            "SELECT COUNT(*) FROM api_keys WHERE provider = 'openai'"
        ),
        Sql::Integer(0),
        "column only"
    );
    let l = s.get("/user/api-keys", Some(&t));
    assert_eq!(l.body["phase"], "legacy");
    assert_eq!(l.body["keys"].as_array().unwrap().len(), 1);
    assert_eq!(l.body["keys"][0]["id"], serde_json::Value::Null);
    assert_eq!(l.body["keys"][0]["source"], "users_column");
    assert_eq!(
        l.body["legacy_column"],
        json!({"present": true, "has_key": true})
    );

    for r in [
        s.post(
            "/user/api-keys",
            Some(&t),
            json!({"provider": "openai", "api_key": "sk-new-0123456789"}),
        ),
        s.delete("/user/api-keys/1", Some(&t)),
        s.set_key(&t, "anthropic", "sk-ant-other-0123456789"),
        s.post("/user/migrate-api-keys", Some(&t), json!({})),
    ] {
        assert_eq!((r.status, r.code()), (409, "phase_conflict"), "{}", r.raw);
    }
    assert_eq!(s.delete("/user/api-key", Some(&t)).status, 204);
    assert_eq!(s.get("/user/api-key", Some(&t)).body["has_key"], false);
}

#[test]
fn admin_status_needs_the_admin_token() {
    let env = Env::new().var("KEYRACK_ADMIN_TOKEN", "admin-secret-token");
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "openai", "sk-admin-0123456789");
    let r = s.get("/admin/status", Some("admin-secret-token"));
    assert_eq!(r.status, 200, "{}", r.raw);
    for field in [
        "phase",
        "schema_version",
        "users",
        "column_keys",
        "table_keys",
        "unmigrated",
        "conflicts",
        "undecryptable",
        "legacy_reads",
        "last_legacy_read_at",
        "foreign_column_writes",
        "last_foreign_column_write_at",
    ] {
        assert!(r.body.get(field).is_some(), "{field}");
    }
    assert_eq!(r.body["users"], 1);
    assert_eq!(r.body["table_keys"], 1);
    assert_eq!(r.body["schema_version"], 7);
    assert_eq!(s.get("/admin/status", Some("wrong")).status, 401);
    assert_eq!(s.get("/admin/status", Some(&t)).status, 401);
    assert_eq!(s.get("/admin/status", None).status, 401);
    assert!(!s.logs_settled().contains("admin-secret-token"));
}

#[test]
fn concurrent_writes_commit_in_groups_each_with_its_own_answer() {
    // The store logs the size of each group it commits at debug level.
    let env = Env::new().var("RUST_LOG", "info,keyrack::store=debug");
    let s = env.serve_with(&["--workers", "8"]);
    let users: Vec<(String, String)> = (0..8)
        .map(|i| {
            let email = format!("w{i}@example.com");
            let t = s.user(&email);
            (email, t)
        })
        .collect();
    let base = s.base.clone();
    let threads: Vec<_> = users
        .iter()
        .cloned()
        .map(|(email, t)| {
            let base = base.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                let mut created = 0;
                for j in 0..15 {
                    let r = agent
                        .post(&format!("{base}/user/api-keys"))
                        .set("Authorization", &format!("Bearer {t}"))
                        .send_json(json!({"provider": "p", "api_key": format!("sk-{email}-{j}-0123456789")}));
                    assert_eq!(r.map(|r| r.status()).ok(), Some(201));
                    created += 1;
                    // A write that fails in the same groups: answered alone, undoes nothing else.
                    let r = agent
                        .delete(&format!("{base}/user/api-keys/999999"))
                        .set("Authorization", &format!("Bearer {t}"))
                        .call();
                    assert!(matches!(r, Err(ureq::Error::Status(404, _))));
                }
                created
            })
        })
        .collect();
    let created: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(created, 120);
    // Writes of different workers shared a commit: at least one group held more than one.
    let logs = s.logs_settled();
    let groups: Vec<usize> = logs
        .lines()
        .filter_map(|l| l.split("] committed ").nth(1))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        groups.iter().any(|&n| n > 1),
        "no group commit held more than one write: {groups:?}"
    );
    // Acknowledged means on disk: kill -9, then count.
    s.kill9();
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM api_keys"),
        Sql::Integer(120)
    );
    assert_eq!(
        sql_value(
            &env.db(),
            "SELECT COUNT(*) FROM api_keys WHERE is_default = 1"
        ),
        Sql::Integer(8),
        "one default per user"
    );
    let s = env.serve();
    let (email, _) = &users[3];
    let t = s.login(email);
    assert_eq!(
        s.get("/user/api-keys", Some(&t)).body["keys"]
            .as_array()
            .unwrap()
            .len(),
        15
    );
}

/// A reveal repeated on one connection is answered from that connection's last read while the
/// database is unchanged: another process changing the file between two reveals (a session
/// shortened to the past, a checkpoint that truncates the WAL, a VACUUM, the key removed), and a
/// log-out, are all seen by the very next reveal with the same token.
#[test]
fn a_repeated_reveal_sees_every_change_made_by_another_process() {
    let env = Env::new();
    let s = env.serve_with(&["--workers", "1"]);
    let token = s.user("again@example.com");
    assert_eq!(
        s.set_key(&token, "openai", "sk-again-0123456789").status,
        200
    );
    let reveal = || s.reveal(&token, "openai");
    let me = || s.get("/user/api-key?reveal=true", Some(&token)).status;
    for _ in 0..3 {
        assert_eq!(reveal().as_deref(), Some("sk-again-0123456789"));
    }
    let other = rusqlite::Connection::open(env.db()).unwrap();
    other
        .execute("UPDATE sessions SET expires_at = 1", [])
        .unwrap();
    assert_eq!(me(), 401);
    other
        .execute("UPDATE sessions SET expires_at = 4102444800", [])
        .unwrap();
    for _ in 0..2 {
        assert_eq!(reveal().as_deref(), Some("sk-again-0123456789"));
    }
    other
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    assert_eq!(reveal().as_deref(), Some("sk-again-0123456789"));
    other.execute_batch("VACUUM").unwrap();
    assert_eq!(reveal().as_deref(), Some("sk-again-0123456789"));
    // Removed from both stores (phase dual mirrors the key into the legacy column).
    other
        .execute_batch(
            "BEGIN; DELETE FROM api_keys; UPDATE users SET openai_api_key = NULL; COMMIT;",
        )
        .unwrap();
    assert_eq!(reveal(), None);
    assert_eq!(
        s.set_key(&token, "openai", "sk-later-0123456789").status,
        200
    );
    assert_eq!(reveal().as_deref(), Some("sk-later-0123456789"));
    assert_eq!(reveal().as_deref(), Some("sk-later-0123456789"));
    assert_eq!(s.post("/auth/logout", Some(&token), json!({})).status, 204);
    assert_eq!(me(), 401);
}
