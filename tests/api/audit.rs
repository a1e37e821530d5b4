//! The audit trail's bound: one actor's reads of one key fold into one event with a count and
//! its first and last times; an account's writes over `KEYRACK_WRITE_RATE` answer 429 with
//! `Retry-After` while its reads go on; the trail's size shows in `status` and `/metrics`.

use serde_json::{json, Value};
use std::time::Duration;

use crate::support::*;

const ADMIN: &str = "admin-secret-token";

fn events_of(r: &Resp, action: &str) -> Vec<Value> {
    r.body["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["action"] == action)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn reveals_from_many_connections_fold_into_one_event_per_key_and_actor() {
    let env = Env::new().var("KEYRACK_ADMIN_TOKEN", ADMIN);
    let server = env.serve();
    let ada = server.user("ada@example.com");
    let bob = server.user("bob@example.com");
    for (t, key) in [(&ada, "sk-ada-0123456789"), (&bob, "sk-bob-0123456789")] {
        assert_eq!(server.set_key(t, "openai", key).status, 200);
    }
    assert_eq!(
        server
            .set_key(&ada, "anthropic", "sk-ant-ada-0123456789")
            .status,
        200
    );
    // Ada reveals her OpenAI key 4 x 50 times from four connections, in two rounds each written
    // by a flush of its own, her Anthropic key 3 times; Bob his key twice.
    let counted = |r: &Resp| -> i64 {
        events_of(r, "key.revealed")
            .iter()
            .map(|e| e["count"].as_i64().unwrap_or(0))
            .sum()
    };
    let mut mine = server.get("/user/events", Some(&ada));
    for round in 1..=2 {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..25 {
                        assert!(server.reveal(&ada, "openai").is_some());
                    }
                });
            }
        });
        assert!(
            poll_until(Duration::from_secs(20), || {
                mine = server.get("/user/events", Some(&ada));
                counted(&mine) == round * 100
            }),
            "{}",
            mine.raw
        );
    }
    for _ in 0..3 {
        assert!(server.reveal(&ada, "anthropic").is_some());
    }
    for _ in 0..2 {
        assert!(server.reveal(&bob, "openai").is_some());
    }
    assert!(
        poll_until(Duration::from_secs(20), || {
            mine = server.get("/user/events", Some(&ada));
            counted(&mine) == 203
        }),
        "{}",
        mine.raw
    );
    let revealed = events_of(&mine, "key.revealed");
    assert_eq!(revealed.len(), 2, "{}", mine.raw);
    let openai = revealed
        .iter()
        .find(|e| e["provider"] == "openai")
        .expect("the OpenAI reveals");
    assert_eq!(openai["count"], 200, "{}", mine.raw);
    assert_eq!(openai["actor"], "user:1");
    assert_eq!(openai["at"], openai["first_at"]);
    assert!(openai["first_at"].as_str() <= openai["last_at"].as_str());
    let anthropic = revealed
        .iter()
        .find(|e| e["provider"] == "anthropic")
        .expect("the Anthropic reveals");
    assert_eq!(anthropic["count"], 3, "{}", mine.raw);
    // A write stands for one event.
    let created = events_of(&mine, "key.created");
    assert!(created.iter().all(|e| e["count"] == 1), "{}", mine.raw);

    let mut theirs = server.get("/user/events", Some(&bob));
    assert!(poll_until(Duration::from_secs(20), || {
        theirs = server.get("/user/events", Some(&bob));
        counted(&theirs) == 2
    }));
    assert_eq!(
        events_of(&theirs, "key.revealed").len(),
        1,
        "{}",
        theirs.raw
    );

    // The trail's size: rows and bytes, in /admin/status and /metrics.
    let status = server.get("/admin/status", Some(ADMIN));
    assert_eq!(status.status, 200, "{}", status.raw);
    let rows = status.body["events"]["rows"].as_i64().expect("events.rows");
    // 2 accounts created, 2 logins, 3 keys created, 3 folded reveals.
    assert_eq!(rows, 10, "{}", status.raw);
    assert!(status.body["events"]["bytes"].as_i64().unwrap_or(0) > 0);
    let metrics = server.get("/metrics", Some(ADMIN));
    assert!(
        metrics
            .raw
            .contains(&format!("\nkeyrack_events_rows {rows}\n")),
        "{}",
        metrics.raw
    );
    assert!(metrics.raw.contains("\nkeyrack_events_bytes "));
    assert_eq!(server.terminate().code(), Some(0));

    // `status` (text and JSON) and `audit` show the same.
    let st = status_json(&env);
    assert_eq!(st["events"]["rows"], rows);
    let text = stdout(&env.run(&["status"]));
    assert!(
        text.contains(&format!("events           {rows} rows, ")),
        "{text}"
    );
    let audit = stdout(&env.run(&["audit", "--user", "ada@example.com", "--json"]));
    let folded: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["action"] == "key.revealed" && e["provider"] == "openai")
        .collect();
    assert_eq!(folded.len(), 1, "{audit}");
    assert_eq!(folded[0]["count"], 200);
    let text = stdout(&env.run(&["audit", "--user", "ada@example.com"]));
    assert!(text.contains(" count=200 last_at="), "{text}");
}

#[test]
fn an_account_s_writes_over_its_rate_answer_429_with_retry_after_and_its_reads_go_on() {
    let env = Env::new().var("KEYRACK_WRITE_RATE", "4");
    let server = env.serve();
    // The login is the account's first write.
    let ada = server.user("ada@example.com");
    for i in 0..3 {
        let r = server.set_key(&ada, "openai", &format!("sk-ada-{i}-0123456789"));
        assert_eq!(r.status, 200, "{}", r.raw);
    }
    let over = server.set_key(&ada, "openai", "sk-ada-over-0123456789");
    assert_eq!(over.status, 429, "{}", over.raw);
    assert_eq!(over.code(), "too_many_requests");
    let wait: u64 = over
        .header("Retry-After")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=15).contains(&wait), "Retry-After {wait}");
    // Every kind of write counts; the refused one changed nothing.
    let add = server.post(
        "/user/api-keys",
        Some(&ada),
        json!({"provider": "anthropic", "api_key": "sk-ant-0123456789"}),
    );
    assert_eq!(add.status, 429, "{}", add.raw);
    assert_eq!(server.delete("/user/api-key", Some(&ada)).status, 429);
    let login = server.post(
        "/auth/login",
        None,
        json!({"email": "ada@example.com", "password": "correct horse battery"}),
    );
    assert_eq!(login.status, 429, "{}", login.raw);
    // Reads are never refused for their rate.
    for _ in 0..20 {
        assert_eq!(
            server.reveal(&ada, "openai").as_deref(),
            Some("sk-ada-2-0123456789")
        );
    }
    // Another account has its own rate.
    let bob = server.user("bob@example.com");
    assert_eq!(
        server.set_key(&bob, "openai", "sk-bob-0123456789").status,
        200
    );
    // The rate refills: one write a quarter minute.
    assert!(poll_until(Duration::from_secs(30), || {
        server
            .set_key(&ada, "openai", "sk-ada-later-0123456789")
            .status
            == 200
    }));
    assert_eq!(
        server.reveal(&ada, "openai").as_deref(),
        Some("sk-ada-later-0123456789")
    );
}

#[test]
fn a_write_rate_or_fold_window_out_of_range_is_refused_naming_it() {
    for (name, value) in [
        ("KEYRACK_WRITE_RATE", "fast"),
        ("KEYRACK_WRITE_RATE", "0"),
        ("KEYRACK_AUDIT_FOLD_SECONDS", "0"),
    ] {
        let env = Env::new().var(name, value);
        let out = env.run(&["status"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(name), "{}", stderr(&out));
    }
}
