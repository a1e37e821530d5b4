//! Applications and people: service tokens (CLI and admin routes), the service routes that serve
//! `/user/*` for a user the service names, external ids, the users listing, delete-user,
//! invites and POST /auth/set-password.

use serde_json::{json, Value};
use std::time::Duration;

use crate::support::*;

const ADMIN: &str = "admin-token-0123456789";

fn admin_env() -> Env {
    Env::new().var("KEYRACK_ADMIN_TOKEN", ADMIN)
}

/// Creates a service token through the admin route; returns (token, id).
fn service_token(server: &Server, name: &str, scope: &str) -> (String, i64) {
    let r = server.post(
        "/admin/service-tokens",
        Some(ADMIN),
        json!({"name": name, "scope": scope}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let token = r.body["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("krs_"), "{token}");
    (token, r.body["service_token"]["id"].as_i64().expect("id"))
}

fn put_user(server: &Server, token: &str, ext: &str, email: &str) -> Resp {
    server.request(
        "PUT",
        &format!("/service/users/ext:{ext}"),
        Some(token),
        Some(&json!({"email": email})),
    )
}

/// The events of the admin listing, oldest first.
fn all_events(server: &Server) -> Vec<Value> {
    let r = server.get("/admin/events?limit=500", Some(ADMIN));
    assert_eq!(r.status, 200, "{}", r.raw);
    let mut list = r.body["events"].as_array().cloned().unwrap_or_default();
    list.reverse();
    list
}

#[test]
fn service_token_cli_prints_once_stores_a_hash_lists_and_revokes() {
    let mut env = Env::new();
    env.create_db();
    // From here on no encryption key is configured and there is no key file: these commands
    // do not need one.
    env.vars.retain(|(n, _)| n != "KEYRACK_ENCRYPTION_KEY");
    let run = |args: &[&str]| env.run(args);
    let out = run(&["service-token", "create", "billing", "--scope", "write"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = stdout(&out);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "{printed}");
    let token = lines[0];
    assert!(token.starts_with("krs_") && token.len() > 40, "{token}");
    assert!(!env.path("keyrack.db.key").exists(), "no key file appears");
    assert!(
        !contains(&db_bytes(&env.db()), token),
        "the token is stored"
    );
    assert!(!stderr(&out).contains(token), "the token is logged");

    // A name held by a token that is not revoked: exit 1. A bad name or scope: exit 2.
    let again = run(&["service-token", "create", "billing"]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert_eq!(
        run(&["service-token", "create", "Bad Name"]).status.code(),
        Some(2)
    );
    assert_eq!(
        run(&["service-token", "create", "x", "--scope", "admin"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&[
            "service-token",
            "create",
            "x",
            "--expires",
            "2001-01-01T00:00:00Z"
        ])
        .status
        .code(),
        Some(2)
    );

    let listed = run(&["service-token", "list", "--json"]);
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    assert!(!stdout(&listed).contains(token));
    let v: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let t = &v["service_tokens"][0];
    assert_eq!(t["name"], "billing");
    assert_eq!(t["scope"], "write");
    assert_eq!(t["revoked"], false);
    assert!(t["id"].is_i64() && t["created_at"].is_string(), "{t}");
    assert!(
        t["last_used_at"].is_null() && t["expires_at"].is_null(),
        "{t}"
    );

    assert_eq!(
        run(&["service-token", "revoke", "nobody"]).status.code(),
        Some(1)
    );
    let revoked = run(&["service-token", "revoke", "billing"]);
    assert_eq!(revoked.status.code(), Some(0), "{}", stderr(&revoked));
    // A revoked token's name may be used again; the new token has a new id.
    let reused = run(&["service-token", "create", "billing"]);
    assert_eq!(reused.status.code(), Some(0), "{}", stderr(&reused));
    let v: Value =
        serde_json::from_str(&stdout(&run(&["service-token", "list", "--json"]))).unwrap();
    let list = v["service_tokens"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["revoked"], true);
    assert_eq!(list[1]["revoked"], false);
    assert_eq!(list[1]["scope"], "read", "read is the default scope");
    assert_ne!(list[0]["id"], list[1]["id"]);
    assert!(!env.path("keyrack.db.key").exists(), "no key file appears");

    // users, invite and delete-user need no encryption key either.
    sql(
        &env.db(),
        "INSERT INTO users(email, password_hash, created_at) VALUES ('z@example.com', '!no-password', 0)",
    );
    for args in [
        &["users", "--json"][..],
        &["invite", "z@example.com"],
        &["invite", "--without-password", "--json"],
        &["delete-user", "z@example.com", "--yes"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
    assert!(!env.path("keyrack.db.key").exists(), "no key file appears");
}

#[test]
fn a_revocation_is_seen_by_every_server_of_the_file_on_its_next_request() {
    let env = admin_env();
    let one = env.serve();
    let two = env.serve();
    let (token, _) = service_token(&one, "reader", "read");
    let put = {
        let (w, _) = service_token(&one, "writer", "write");
        put_user(&one, &w, "u1", "u1@example.com")
    };
    assert_eq!(put.status, 201, "{}", put.raw);
    // Each route a read token reaches, many times, so that every worker of both servers has
    // checked (and keeps) the token.
    let routes = [
        "/service/users/ext:u1",
        "/service/users/ext:u1/api-key",
        "/service/users/ext:u1/api-key?reveal=true",
        "/service/users/ext:u1/api-keys",
    ];
    for s in [&one, &two] {
        for _ in 0..8 {
            for path in routes {
                assert_eq!(s.get(path, Some(&token)).status, 200, "{path}");
            }
        }
    }
    let out = env.run(&["service-token", "revoke", "reader"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A revoked token learns nothing, not even whether a user exists (401 before 404 and 422).
    let routes = [
        routes[0],
        routes[1],
        routes[2],
        routes[3],
        "/service/users/ext:nobody/api-key",
        "/service/users/ext:u1/api-key?provider=BAD",
        "/service/users/ext:nobody/api-key?provider=BAD",
    ];
    for s in [&one, &two] {
        for _ in 0..8 {
            for path in routes {
                let r = s.get(path, Some(&token));
                assert_eq!(
                    (r.status, r.code()),
                    (401, "unauthorized"),
                    "{path} {}",
                    r.raw
                );
            }
        }
    }
    // Through the admin route too.
    let (again, _) = service_token(&two, "reader", "read");
    assert_eq!(one.get("/service/users/ext:u1", Some(&again)).status, 200);
    assert_eq!(
        two.delete("/admin/service-tokens/reader", Some(ADMIN))
            .status,
        204
    );
    assert_eq!(one.get("/service/users/ext:u1", Some(&again)).status, 401);
    assert_eq!(
        two.delete("/admin/service-tokens/reader", Some(ADMIN))
            .status,
        404
    );
}

#[test]
fn bad_tokens_scopes_selectors_and_users_get_the_codes_in_order() {
    let env = admin_env();
    let server = env.serve();
    let (read, _) = service_token(&server, "reader", "read");
    let (write, _) = service_token(&server, "writer", "write");
    let session = server.user("ada@example.com");
    assert_eq!(
        put_user(&server, &write, "42", "bob@example.com").status,
        201
    );

    // 401: none, unknown, a session token, a revoked or expired token.
    for t in [None, Some("krs_nothing"), Some(session.as_str())] {
        let r = server.get("/service/users/ext:42/api-key", t);
        assert_eq!(
            (r.status, r.code()),
            (401, "unauthorized"),
            "{t:?} {}",
            r.raw
        );
    }
    let (old, old_id) = service_token(&server, "old", "read");
    sql(
        &env.db(),
        &format!("UPDATE service_tokens SET expires_at = 1 WHERE id = {old_id}"),
    );
    assert_eq!(server.get("/service/users/ext:42", Some(&old)).status, 401);
    // An expired token still holds its name until revoked.
    let taken = server.post("/admin/service-tokens", Some(ADMIN), json!({"name": "old"}));
    assert_eq!(
        (taken.status, taken.code()),
        (409, "name_taken"),
        "{}",
        taken.raw
    );

    // A service token on /user/* and /admin/*: 401.
    assert_eq!(server.get("/user/api-key", Some(&write)).status, 401);
    assert_eq!(server.get("/user/api-keys", Some(&write)).status, 401);
    assert_eq!(server.get("/admin/status", Some(&write)).status, 401);

    // 403: a read token on each write route (before the selector's 400 and the user's 404).
    for (method, path) in [
        ("POST", "/service/users/ext:42/api-key"),
        ("DELETE", "/service/users/ext:42/api-key"),
        ("DELETE", "/service/users/ext:42"),
        ("PUT", "/service/users/ext:43"),
        ("PUT", "/service/users/bad"),
        ("DELETE", "/service/users/id:999999"),
    ] {
        let r = server.request(
            method,
            path,
            Some(&read),
            Some(&json!({"api_key": "sk-0123456789"})),
        );
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden"),
            "{method} {path} {}",
            r.raw
        );
    }
    // 400: a selector of none of the forms; PUT with id: or email:.
    for path in [
        "/service/users/42",
        "/service/users/user:42",
        "/service/users/id:x/api-key",
    ] {
        let r = server.get(path, Some(&read));
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_request"),
            "{path} {}",
            r.raw
        );
    }
    for sel in ["id:1", "email:bob@example.com"] {
        let r = server.request(
            "PUT",
            &format!("/service/users/{sel}"),
            Some(&write),
            Some(&json!({"email": "x@example.com"})),
        );
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_request"),
            "{sel} {}",
            r.raw
        );
    }
    // 404: an unknown user, before 422.
    for path in [
        "/service/users/ext:nobody",
        "/service/users/id:999999/api-key",
        "/service/users/email:nobody@example.com/api-keys",
        "/service/users/ext:nobody/api-key?provider=BAD",
    ] {
        let r = server.get(path, Some(&read));
        assert_eq!((r.status, r.code()), (404, "not_found"), "{path} {}", r.raw);
    }
    let r = server.post(
        "/service/users/ext:nobody/api-key",
        Some(&write),
        json!({"api_key": "x"}),
    );
    assert_eq!(r.status, 404, "{}", r.raw);
    // 422 once the user exists.
    let r = server.post(
        "/service/users/ext:42/api-key",
        Some(&write),
        json!({"api_key": "x"}),
    );
    assert_eq!(
        (r.status, r.code()),
        (422, "validation_failed"),
        "{}",
        r.raw
    );
    // 409: an email held by another user, with or without an external id.
    let r = put_user(&server, &write, "43", "ada@example.com");
    assert_eq!((r.status, r.code()), (409, "email_taken"), "{}", r.raw);
    assert_eq!(put_user(&server, &write, "44", "c@example.com").status, 201);
    let r = put_user(&server, &write, "44", "bob@example.com");
    assert_eq!((r.status, r.code()), (409, "email_taken"), "{}", r.raw);
    // The same user again: 200, and a changed email.
    let r = put_user(&server, &write, "42", "Bob2@Example.com");
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.body["user"],
        json!({"id": r.body["user"]["id"], "email": "bob2@example.com", "external_id": "42"})
    );
    // A selector's email is trimmed and lowercased; percent-encoded selectors decode.
    assert_eq!(
        server
            .get("/service/users/email:%20BOB2@example.COM", Some(&read))
            .body["user"]["external_id"],
        "42"
    );
    assert_eq!(
        put_user(&server, &write, "a%2Fb", "slash@example.com").status,
        201
    );
    assert_eq!(
        server.get("/service/users/ext:a%2Fb", Some(&read)).body["user"]["external_id"],
        "a/b"
    );
    // An external id with a control or bidirectional character: 400.
    assert_eq!(
        put_user(&server, &write, "a%E2%80%AEb", "bidi@example.com").status,
        400
    );
    // A service token on /admin/* without an admin token configured: 404.
    let plain = Env::new();
    let s2 = plain.serve();
    assert_eq!(s2.get("/admin/users", Some(&write)).status, 404);
}

#[test]
fn service_routes_answer_exactly_as_the_user_routes_and_name_the_service_in_events() {
    let env = admin_env();
    let server = env.serve();
    let (write, write_id) = service_token(&server, "app-writer", "write");
    let (read, read_id) = service_token(&server, "app-reader", "read");
    let created = put_user(&server, &write, "7", "carol@example.com");
    assert_eq!(created.status, 201, "{}", created.raw);
    let id = created.body["user"]["id"].as_i64().unwrap();
    let other = server.user("dave@example.com");
    server.set_key(&other, "openai", "sk-dave-0123456789");

    let set = server.post(
        "/service/users/ext:7/api-key",
        Some(&write),
        json!({"api_key": " sk-carol-0123456789 ", "expires_at": "2999-01-01T00:00:00Z"}),
    );
    assert_eq!(set.status, 200, "{}", set.raw);
    // The user gets a password through an invite and compares both routes.
    let link = stdout(&env.run(&["invite", "ext:7"]));
    let invite = link
        .trim()
        .rsplit("#set-password=")
        .next()
        .unwrap()
        .to_owned();
    let login = server.post(
        "/auth/set-password",
        None,
        json!({"token": invite, "password": "carol's new password"}),
    );
    assert_eq!(login.status, 200, "{}", login.raw);
    let session = login.body["token"].as_str().unwrap().to_owned();
    for sel in [
        format!("id:{id}"),
        "ext:7".into(),
        "email:carol@example.com".into(),
    ] {
        for q in [
            "",
            "?reveal=true",
            "?provider=anthropic",
            "?reveal=1&provider=openai",
        ] {
            let mine = server.get(&format!("/user/api-key{q}"), Some(&session));
            let theirs = server.get(&format!("/service/users/{sel}/api-key{q}"), Some(&read));
            assert_eq!(
                (mine.status, &mine.raw),
                (theirs.status, &theirs.raw),
                "{sel}{q}"
            );
        }
    }
    let mine = server.get("/user/api-key?reveal=true", Some(&session));
    assert_eq!(mine.body["api_key"], "sk-carol-0123456789");
    // The listing: the same but for usage, which the reveals above change while batched.
    let strip = |mut v: Value| {
        for k in v["keys"].as_array_mut().unwrap() {
            k["usage_count"] = json!(0);
            k["last_used_at"] = json!(null);
        }
        v
    };
    let a = server.get("/user/api-keys", Some(&session));
    let b = server.get("/service/users/ext:7/api-keys", Some(&read));
    assert_eq!(a.status, 200);
    assert_eq!(strip(a.body), strip(b.body));
    // Dave's key is untouched by anything the service did for Carol.
    assert_eq!(
        server.reveal(&other, "openai").as_deref(),
        Some("sk-dave-0123456789")
    );

    // Delete through the service: 204 also with nothing to delete, as the user route.
    assert_eq!(
        server
            .delete("/service/users/ext:7/api-key", Some(&write))
            .status,
        204
    );
    assert_eq!(
        server
            .delete("/service/users/ext:7/api-key", Some(&write))
            .status,
        204
    );
    assert_eq!(
        server.get("/user/api-key", Some(&session)).body["has_key"],
        false
    );

    // Events: the service's carry its actor and token id; reveals are batched, so poll.
    let by = |e: &Value, action: &str, actor: &str, token: i64| {
        e["action"] == action
            && e["actor"] == actor
            && e["service_token_id"] == token
            && e["user_id"] == id
    };
    assert!(poll_until(Duration::from_secs(10), || {
        let ev = all_events(&server);
        ev.iter()
            .any(|e| by(e, "key.revealed", "service:app-reader", read_id))
    }));
    let ev = all_events(&server);
    for (action, actor, token) in [
        ("user.created", "service:app-writer", write_id),
        ("key.created", "service:app-writer", write_id),
        ("key.deleted", "service:app-writer", write_id),
    ] {
        assert!(
            ev.iter().any(|e| by(e, action, actor, token)),
            "{action}: {ev:#?}"
        );
    }
    assert!(ev.iter().any(|e| e["action"] == "service_token.created"
        && e["actor"] == "admin"
        && e["service_token_id"] == read_id));
    // The user's own reveals name the user.
    assert!(ev.iter().any(|e| e["action"] == "key.revealed"
        && e["actor"] == format!("user:{id}")
        && e["service_token_id"].is_null()));
    // Nothing a service did reached Dave.
    let dave = server.get("/user/events", Some(&other));
    assert!(dave.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| !e["actor"].as_str().unwrap().starts_with("service:")));
}

#[test]
fn in_phase_dual_a_service_read_moves_a_column_key_and_in_legacy_only_openai_exists() {
    let env = admin_env();
    let fixtures = fixtures_file(
        &env,
        "f.json",
        &json!({"users": [
            {"email": "ada@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-legacy-0123456789abcdef"},
            {"email": "bea@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-bea-legacy-0123456789"}]}),
    );
    let out = env.run(&["load-fixtures", fixtures.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let server = env.serve();
    let (read, read_id) = service_token(&server, "reader", "read");
    let (write, _) = service_token(&server, "writer", "write");
    let first = server.get(
        "/service/users/email:ada@example.com/api-key?reveal=true",
        Some(&read),
    );
    assert_eq!(first.status, 200, "{}", first.raw);
    assert_eq!(first.body["source"], "users_column");
    assert_eq!(first.body["api_key"], "sk-legacy-0123456789abcdef");
    let second = server.get("/service/users/email:ada@example.com/api-key", Some(&read));
    assert_eq!(second.body["source"], "api_keys", "moved by the first read");
    let ev = all_events(&server);
    assert!(
        ev.iter().any(|e| e["action"] == "key.migrated"
            && e["actor"] == "service:reader"
            && e["service_token_id"] == read_id),
        "{ev:#?}"
    );
    // The request log names the user by id, never by the email of the selector.
    let logs = server.logs_settled();
    assert!(
        logs.contains("GET /service/users/email:…/api-key 200"),
        "{logs}"
    );
    assert!(!logs.contains("ada@example.com"), "{logs}");
    // Bea's column key was not moved: only the user named was touched.
    let bea_rows = sql_value(
        &env.db(),
        "SELECT COUNT(*) FROM api_keys k JOIN users u ON u.id = k.user_id WHERE u.email = 'bea@example.com'",
    );
    assert_eq!(bea_rows, rusqlite::types::Value::Integer(0));

    // Phase legacy: only the OpenAI key exists; another provider's write is a phase conflict.
    sql(
        &env.db(),
        "UPDATE keyrack_meta SET value = 'legacy' WHERE name = 'phase'",
    );
    let r = server.get(
        "/service/users/email:bea@example.com/api-key?reveal=true",
        Some(&read),
    );
    assert_eq!(r.body["api_key"], "sk-bea-legacy-0123456789", "{}", r.raw);
    assert_eq!(r.body["source"], "users_column");
    let r = server.post(
        "/service/users/email:bea@example.com/api-key",
        Some(&write),
        json!({"api_key": "sk-ant-0123456789", "provider": "anthropic"}),
    );
    assert_eq!((r.status, r.code()), (409, "phase_conflict"), "{}", r.raw);
    let r = server.get(
        "/service/users/email:bea@example.com/api-key?provider=anthropic",
        Some(&read),
    );
    assert_eq!(r.body["has_key"], false);
}

#[test]
fn an_expired_key_is_not_revealed_to_a_service_either() {
    let env = admin_env();
    let server = env.serve();
    let (write, _) = service_token(&server, "w", "write");
    assert_eq!(
        put_user(&server, &write, "e1", "e1@example.com").status,
        201
    );
    let r = server.post(
        "/service/users/ext:e1/api-key",
        Some(&write),
        json!({"api_key": "sk-expiring-0123456789", "expires_at": "2999-01-01T00:00:00Z"}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    sql(&env.db(), "UPDATE api_keys SET expires_at = 1");
    let r = server.get("/service/users/ext:e1/api-key?reveal=true", Some(&write));
    assert_eq!(
        r.body,
        json!({"has_key": false, "provider": "openai", "masked_key": null, "source": null, "expired": true})
    );
}

#[test]
fn users_listing_delete_user_and_its_events() {
    let env = admin_env();
    let server = env.serve();
    let (write, _) = service_token(&server, "w", "write");
    let ada = server.user("ada@example.com");
    server.set_key(&ada, "openai", "sk-ada-0123456789");
    server.set_key(&ada, "anthropic", "sk-ant-ada-0123456789");
    assert_eq!(
        put_user(&server, &write, "app-9", "zed@example.com").status,
        201
    );

    let r = server.get("/admin/users", Some(ADMIN));
    assert_eq!(r.status, 200, "{}", r.raw);
    let users = r.body["users"].as_array().unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(users[0]["email"], "ada@example.com");
    assert_eq!(users[0]["key_count"], 2);
    assert_eq!(users[0]["has_password"], true);
    assert!(users[0]["last_login_at"].is_string());
    assert!(users[0]["external_id"].is_null());
    assert_eq!(users[1]["external_id"], "app-9");
    assert_eq!(users[1]["has_password"], false);
    assert!(users[1]["last_login_at"].is_null());
    let q = server.get("/admin/users?query=APP-&limit=1", Some(ADMIN));
    assert_eq!(q.body["users"].as_array().unwrap().len(), 1);
    assert_eq!(q.body["users"][0]["email"], "zed@example.com");
    assert_eq!(server.get("/admin/users?limit=0", Some(ADMIN)).status, 422);
    assert_eq!(server.get("/admin/users", Some("wrong")).status, 401);

    let out = env.run(&["users", "--json", "--query", "ada"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["users"][0]["key_count"], 2);
    assert_eq!(v["users"].as_array().unwrap().len(), 1);

    // A user without a password cannot log in.
    let r = server.post(
        "/auth/login",
        None,
        json!({"email": "zed@example.com", "password": "!no-password"}),
    );
    assert_eq!((r.status, r.code()), (401, "invalid_credentials"));

    // delete-user: confirmation, then every key, session and the row go; events stay.
    let ada_id = users[0]["id"].as_i64().unwrap();
    let refused = env.run(&["delete-user", "ada@example.com"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert_eq!(server.get("/user/me", Some(&ada)).status, 200);
    assert_eq!(
        env.run(&["delete-user", "nobody@example.com", "--yes"])
            .status
            .code(),
        Some(1)
    );
    let out = env.run(&["delete-user", &ada_id.to_string(), "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(server.get("/user/me", Some(&ada)).status, 401);
    let count = |q: &str| sql_value(&env.db(), q);
    use rusqlite::types::Value::Integer;
    assert_eq!(
        count(&format!(
            "SELECT COUNT(*) FROM api_keys WHERE user_id = {ada_id}"
        )),
        Integer(0)
    );
    assert_eq!(
        count(&format!(
            "SELECT COUNT(*) FROM sessions WHERE user_id = {ada_id}"
        )),
        Integer(0)
    );
    assert_eq!(
        count(&format!("SELECT COUNT(*) FROM users WHERE id = {ada_id}")),
        Integer(0)
    );
    let kept = count(&format!(
        "SELECT COUNT(*) FROM events WHERE user_id = {ada_id}"
    ));
    assert!(matches!(kept, Integer(n) if n >= 4), "{kept:?}");
    assert!(all_events(&server)
        .iter()
        .any(|e| e["action"] == "user.deleted"
            && e["actor"] == "command:delete-user"
            && e["user_id"] == ada_id));
    // The email can be registered again, with no key of the old account.
    let again = server.user("ada@example.com");
    assert_eq!(server.reveal(&again, "openai"), None);

    // user.created names who made the account.
    let out = env.run_with_stdin(&["add-user", "cli@example.com"], "a long password\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let created: Vec<Value> = all_events(&server)
        .into_iter()
        .filter(|e| e["action"] == "user.created")
        .collect();
    let actors: Vec<&str> = created
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(
        actors,
        [
            &format!("user:{ada_id}"),
            "service:w",
            "user:3",
            "command:add-user"
        ],
        "{created:?}"
    );

    // Through the service route: 204, then 404.
    assert_eq!(
        server
            .delete("/service/users/ext:app-9", Some(&write))
            .status,
        204
    );
    assert_eq!(
        server
            .delete("/service/users/ext:app-9", Some(&write))
            .status,
        404
    );
}

#[test]
fn delete_user_removes_the_column_key_in_phase_dual() {
    let env = admin_env();
    let fixtures = fixtures_file(
        &env,
        "f.json",
        &json!({"users": [{"email": "ada@example.com", "password": "correct horse battery",
             "openai_api_key": "sk-legacy-0123456789abcdef"}]}),
    );
    assert_eq!(
        env.run(&["load-fixtures", fixtures.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let out = env.run(&["delete-user", "ada@example.com", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        sql_value(&env.db(), "SELECT COUNT(*) FROM users"),
        rusqlite::types::Value::Integer(0)
    );
    let st = status_json(&env);
    assert_eq!(
        (st["column_keys"].clone(), st["table_keys"].clone()),
        (json!(0), json!(0))
    );
}

#[test]
fn invites_set_a_password_once_and_end_other_sessions() {
    let env = admin_env();
    let server = env.serve();
    let ada = server.user("ada@example.com");
    let (write, _) = service_token(&server, "w", "write");
    assert_eq!(
        put_user(&server, &write, "x1", "x1@example.com").status,
        201
    );
    assert_eq!(
        put_user(&server, &write, "x2", "x2@example.com").status,
        201
    );

    assert_eq!(
        env.run(&["invite", "nobody@example.com"]).status.code(),
        Some(1)
    );
    let out = env.run(&[
        "invite",
        "ada@example.com",
        "--url",
        "https://keys.example.com/",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let link = stdout(&out).trim().to_owned();
    let token = link
        .strip_prefix("https://keys.example.com/#set-password=")
        .unwrap_or_else(|| panic!("{link}"))
        .to_owned();
    assert!(
        !contains(&db_bytes(&env.db()), &token),
        "the invite is stored"
    );
    assert!(!stderr(&out).contains(&token));
    // An unused invite leaves the current password working.
    server.login("ada@example.com");

    let bad = server.post(
        "/auth/set-password",
        None,
        json!({"token": token, "password": "short"}),
    );
    assert_eq!(bad.status, 422, "{}", bad.raw);
    let unknown = server.post(
        "/auth/set-password",
        None,
        json!({"token": "kri_nothing", "password": "a long new password"}),
    );
    assert_eq!((unknown.status, unknown.code()), (401, "unauthorized"));
    // A second invite, unused: using the first ends it.
    let second = stdout(&env.run(&["invite", "1"]));
    let second = second.trim().rsplit('=').next().unwrap().to_owned();
    let used = server.post(
        "/auth/set-password",
        None,
        json!({"token": token, "password": "a long new password"}),
    );
    assert_eq!(used.status, 200, "{}", used.raw);
    assert_eq!(used.body["token_type"], "Bearer");
    let session = used.body["token"].as_str().unwrap();
    assert_eq!(server.get("/user/me", Some(session)).status, 200);
    assert_eq!(
        server.get("/user/me", Some(&ada)).status,
        401,
        "other sessions end"
    );
    let again = server.post(
        "/auth/set-password",
        None,
        json!({"token": token, "password": "another new password"}),
    );
    assert_eq!(again.status, 401, "an invite is used once");
    let other = server.post(
        "/auth/set-password",
        None,
        json!({"token": second, "password": "another new password"}),
    );
    assert_eq!(other.status, 401, "the user's other unused invites end");
    let r = server.post(
        "/auth/login",
        None,
        json!({"email": "ada@example.com", "password": "a long new password"}),
    );
    assert_eq!(r.status, 200);

    // Expired: 401.
    let out = env.run(&["invite", "ada@example.com"]);
    let token = stdout(&out).trim().rsplit('=').next().unwrap().to_owned();
    assert!(stdout(&out).starts_with("http://127.0.0.1:8080/#set-password=kri_"));
    sql(&env.db(), "UPDATE invites SET expires_at = 1");
    let r = server.post(
        "/auth/set-password",
        None,
        json!({"token": token, "password": "a long new password"}),
    );
    assert_eq!(r.status, 401);

    // Everyone without a password, as JSON lines.
    let out = env.run(&["invite", "--without-password", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["email"], "x1@example.com");
    assert_eq!(lines[0]["external_id"], "x1");
    let link = lines[1]["link"].as_str().unwrap();
    let token = link.rsplit('=').next().unwrap();
    let r = server.post(
        "/auth/set-password",
        None,
        json!({"token": token, "password": "x2's own password"}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    let out = env.run(&["invite", "--without-password"]);
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
}

#[test]
fn import_legacy_sets_the_external_id_and_user_arguments_take_it() {
    let env = Env::new();
    let app = env.path("app.db");
    let c = rusqlite::Connection::open(&app).unwrap();
    c.execute_batch(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, openai_api_key TEXT);
         INSERT INTO users VALUES (7, 'ada@example.com', 'sk-ada-plain-0123456789');
         INSERT INTO users VALUES (42, 'bob@example.com', NULL);",
    )
    .unwrap();
    drop(c);
    let out = env.run(&["import-legacy", "--from", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&env.run(&["users", "--json"]))).unwrap();
    assert_eq!(v["users"][0]["external_id"], "7");
    assert_eq!(v["users"][1]["external_id"], "42");
    assert_eq!(v["users"][0]["has_password"], false);
    assert_eq!(
        v["users"][0]["key_count"], 1,
        "phase legacy: the column's key"
    );
    let out = env.run(&["inspect", "ext:7", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["user"]["email"], "ada@example.com");
}

#[test]
fn a_service_token_s_writes_over_the_rate_answer_429_whichever_users_they_are_for() {
    let env = admin_env().var("KEYRACK_WRITE_RATE", "4");
    let server = env.serve();
    let (writer, _) = service_token(&server, "app-write", "write");
    let (reader, _) = service_token(&server, "app-read", "read");
    // Four writes, each for another user (each user far under the rate): the token's own rate.
    for i in 0..2 {
        assert_eq!(
            put_user(
                &server,
                &writer,
                &format!("{i}"),
                &format!("u{i}@example.com")
            )
            .status,
            201
        );
        let r = server.post(
            &format!("/service/users/ext:{i}/api-key"),
            Some(&writer),
            json!({"api_key": format!("sk-service-{i}-0123456789")}),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
    }
    let over = put_user(&server, &writer, "9", "u9@example.com");
    assert_eq!(over.status, 429, "{}", over.raw);
    assert_eq!(over.code(), "too_many_requests");
    assert!(over.header("Retry-After").is_some());
    let over = server.delete("/service/users/ext:0/api-key", Some(&writer));
    assert_eq!(over.status, 429, "{}", over.raw);
    // The refused writes changed nothing, and reads are never refused for their rate.
    for _ in 0..10 {
        let r = server.get("/service/users/ext:0/api-key?reveal=true", Some(&reader));
        assert_eq!(r.status, 200, "{}", r.raw);
        assert_eq!(r.body["api_key"], "sk-service-0-0123456789");
    }
    assert_eq!(
        server.get("/service/users/ext:9", Some(&reader)).status,
        404
    );
}
