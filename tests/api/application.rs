//! An application that uses keyrack as a part of itself (`tests/app/app.py`, Python standard
//! library): its own users and login; it provisions its users into keyrack with a `write`
//! service token and calls a fake provider on 127.0.0.1 with each user's key, read through a
//! `read` token — the flow of `docs/applications.md`.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

const ADMIN: &str = "admin-token-0123456789";

struct App {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl App {
    fn start(env: &Env, keyrack: &str, write: &str, read: &str) -> App {
        let mut child = Command::new("python3")
            .arg(format!("{}/tests/app/app.py", env!("CARGO_MANIFEST_DIR")))
            .arg("--db")
            .arg(env.path("app.db"))
            .env("KEYRACK_URL", keyrack)
            .env("KEYRACK_WRITE_TOKEN", write)
            .env("KEYRACK_READ_TOKEN", read)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 tests/app/app.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("ready line {line:?}"))
            .to_owned();
        App {
            child,
            base,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
        }
    }

    fn call(&self, method: &str, path: &str, session: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(s) = session {
            req = req.set("Authorization", &format!("Bearer {s}"));
        }
        let resp = match req.send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let raw = resp.into_string().unwrap_or_default();
        (status, serde_json::from_str(&raw).unwrap_or(Value::Null))
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn an_application_provisions_its_users_and_calls_a_provider_with_each_users_key() {
    if Command::new("python3").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI needs python3");
        eprintln!("skipped: no python3");
        return;
    }
    let env = Env::new().var("KEYRACK_ADMIN_TOKEN", ADMIN);
    env.create_db();
    let token = |name: &str, scope: &str| {
        let out = env.run(&["service-token", "create", name, "--scope", scope]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    let (write, read) = (token("app-write", "write"), token("app-read", "read"));
    let keyrack = env.serve();
    let app = App::start(&env, &keyrack.base, &write, &read);

    let people = [
        ("alice@example.com", "sk-alice-0123456789abcdef"),
        ("bob@example.com", "sk-bob-0123456789abcdef"),
    ];
    let mut sessions = Vec::new();
    for (email, key) in people {
        let (s, b) = app.call(
            "POST",
            "/signup",
            None,
            json!({"email": email, "password": "app password 1"}),
        );
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["keyrack_user"]["external_id"], b["id"].to_string());
        let (s, b) = app.call(
            "POST",
            "/login",
            None,
            json!({"email": email, "password": "app password 1"}),
        );
        assert_eq!(s, 200, "{b}");
        let session = b["session"].as_str().unwrap().to_owned();
        let (s, _) = app.call("POST", "/ask", Some(&session), json!({"prompt": "hi"}));
        assert_eq!(s, 409, "no key yet");
        let (s, b) = app.call(
            "PUT",
            "/me/openai-key",
            Some(&session),
            json!({"api_key": key}),
        );
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["source"], "api_keys");
        sessions.push(session);
    }
    // Each user's question reaches the provider with that user's own key.
    for ((_, key), session) in people.iter().zip(&sessions) {
        let (s, b) = app.call("POST", "/ask", Some(session), json!({"prompt": "2+2?"}));
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["key_sha256"], sha256_hex(key));
        assert_eq!(b["echo"], "2+2?");
    }
    // keyrack knows them by the application's ids; the reads are the read token's.
    let users = keyrack.get("/admin/users", Some(ADMIN));
    let list = users.body["users"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list
        .iter()
        .all(|u| u["has_password"] == false && u["key_count"] == 1));
    assert!(poll_until(Duration::from_secs(10), || {
        let ev = keyrack.get("/admin/events?limit=500", Some(ADMIN));
        ev.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "key.revealed" && e["actor"] == "service:app-read")
            .count()
            == 2
    }));
    // A user who leaves the application leaves keyrack too, with their key.
    let (s, _) = app.call("DELETE", "/me", Some(&sessions[1]), json!({}));
    assert_eq!(s, 204);
    let left = keyrack.get("/admin/users", Some(ADMIN));
    assert_eq!(left.body["users"].as_array().unwrap().len(), 1);
    assert!(!contains(&db_bytes(&env.path("app.db")), people[0].1));
}
