//! A flood of logins slows logins only: password checks run in a hashing pool of their own
//! (never on a writer), behind a bounded queue (503 `busy` when full), and failed logins from
//! one address across many emails are throttled. No timing is asserted: the tests keep every
//! hashing slot busy for as long as they need (`KEYRACK_TEST_SLOW_HASH`) and look at what is
//! answered meanwhile.

use serde_json::json;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const ADMIN: &str = "flood-admin-token";

/// The value of one sample line `series value` in a metrics text.
fn gauge(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Starts a failed login (a new email, on a connection of its own) that counts itself in
/// `answered` once answered; it ends when the server goes.
fn failed_login(s: &Server, i: usize, answered: &Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    let addr = s.addr.clone();
    let answered = answered.clone();
    std::thread::spawn(move || {
        let body =
            json!({"email": "writer@example.com", "password": format!("wrong password {i}")})
                .to_string();
        let mut c = connect(&addr, Duration::from_secs(120));
        let req = format!(
                    "POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
        if c.write_all(req.as_bytes()).is_err() {
            return;
        }
        let mut first = [0u8; 12];
        if c.read_exact(&mut first).is_ok() {
            answered.fetch_add(1, Ordering::SeqCst);
        }
    })
}

#[test]
fn a_key_write_is_answered_while_every_hashing_slot_is_busy() {
    let env = Env::new()
        .var("KEYRACK_ADMIN_TOKEN", ADMIN)
        .var("KEYRACK_WRITE_WORKERS", "1");
    // The writer's account and session, made before password checks are slowed.
    let s = env.serve();
    let token = s.user("writer@example.com");
    s.terminate();

    // Every password check now holds its slot a minute; two may wait for a slot.
    let env = env
        .var("KEYRACK_TEST_SLOW_HASH", "60000")
        .var("KEYRACK_TEST_HASH_QUEUE", "2");
    let s = env.serve();
    let metrics = || s.get("/metrics", Some(ADMIN)).raw;
    let slots = gauge(&metrics(), "keyrack_password_hash_slots").expect("the slots") as usize;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut logins = vec![failed_login(&s, 0, &answered)];
    assert!(
        poll_until(Duration::from_secs(20), || {
            gauge(&metrics(), "keyrack_password_hashes_running") >= Some(1)
        }),
        "no password check started:\n{}",
        metrics()
    );

    // The one writer is free: the key write is answered while the logins still wait.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let r = agent
        .post(&format!("{}/user/api-key", s.base))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(json!({"api_key": "sk-during-the-flood-0001"}));
    assert_eq!(r.map(|r| r.status()).ok(), Some(200));
    assert_eq!(
        answered.load(Ordering::SeqCst),
        0,
        "the key write was answered only after a login"
    );

    // Every slot busy and the queue full (one login at a time, each once the one before is
    // taken: a burst could find the queue full before a thread took its first request): the
    // next login is refused at once, not queued.
    for i in 1..slots + 2 {
        logins.push(failed_login(&s, i, &answered));
        assert!(
            poll_until(Duration::from_secs(20), || {
                let m = metrics();
                let running = gauge(&m, "keyrack_password_hashes_running").unwrap_or(0);
                let queued = gauge(&m, "keyrack_password_hash_queue").unwrap_or(0);
                running + queued == i as u64 + 1
            }),
            "login {i} neither running nor queued:\n{}",
            metrics()
        );
    }
    let m = metrics();
    assert_eq!(
        gauge(&m, "keyrack_password_hashes_running"),
        Some(slots as u64),
        "{m}"
    );
    assert_eq!(gauge(&m, "keyrack_password_hash_queue"), Some(2), "{m}");
    let r = s.post(
        "/auth/login",
        None,
        json!({"email": "late@flood.example", "password": "wrong password 1"}),
    );
    assert_eq!((r.status, r.code()), (503, "busy"), "{}", r.raw);
    assert_eq!(r.header("Retry-After"), Some("1"));
    // Reads and key writes go on.
    assert_eq!(
        s.reveal(&token, "openai").as_deref(),
        Some("sk-during-the-flood-0001")
    );
    assert_eq!(answered.load(Ordering::SeqCst), 0);
    s.kill9();
    for l in logins {
        let _ = l.join();
    }
}

#[test]
fn failed_logins_from_one_address_are_throttled_across_emails() {
    let env = Env::new().var("KEYRACK_LOGIN_FAILURES_PER_ADDRESS", "3");
    let s = env.serve();
    s.user("ada@example.com");
    // Right passwords are never counted.
    for _ in 0..5 {
        s.login("ada@example.com");
    }
    let fail = |email: &str| {
        s.post(
            "/auth/login",
            None,
            json!({"email": email, "password": "wrong password 1"}),
        )
    };
    for i in 0..3 {
        let r = fail(&format!("nobody{i}@example.com"));
        assert_eq!(
            (r.status, r.code()),
            (401, "invalid_credentials"),
            "{}",
            r.raw
        );
    }
    // A fourth email, never tried before: refused, as is the right password of an account.
    for email in ["nobody3@example.com", "ada@example.com"] {
        let r = s.post(
            "/auth/login",
            None,
            json!({"email": email, "password": "correct horse battery"}),
        );
        assert_eq!(
            (r.status, r.code()),
            (429, "too_many_requests"),
            "{}",
            r.raw
        );
        assert!(r.raw.contains("address"), "{}", r.raw);
        let wait: i64 = r
            .header("Retry-After")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=15 * 60).contains(&wait), "{wait}");
    }
    // Key routes are not throttled.
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn the_throttle_per_address_can_be_turned_off() {
    let env = Env::new().var("KEYRACK_LOGIN_FAILURES_PER_ADDRESS", "0");
    let s = env.serve();
    s.user("ada@example.com");
    for i in 0..60 {
        let r = s.post(
            "/auth/login",
            None,
            json!({"email": format!("nobody{i}@example.com"), "password": "wrong password 1"}),
        );
        assert_eq!(r.status, 401, "{}", r.raw);
    }
    s.login("ada@example.com");
}
