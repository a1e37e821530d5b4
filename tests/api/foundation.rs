//! The foundation: start-up, configuration, key handling, accounts, and HTTP behaviour.

use serde_json::json;
use std::os::unix::fs::PermissionsExt;

use crate::support::*;

#[test]
fn ready_line_healthz_and_sigterm_exits_zero() {
    let env = Env::new();
    let s = env.serve();
    assert!(s.base.starts_with("http://127.0.0.1:"), "{}", s.base);
    assert!(!s.base.ends_with(":0"));
    let r = s.get("/healthz", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");
    assert_eq!(r.body["phase"], "dual");
    assert!(r.body["version"].is_string());
    let status = s.terminate();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sigint_exits_zero() {
    let s = Env::new().serve();
    signal(&s.child, libc::SIGINT);
    let mut s = s;
    let st = wait_timeout(&mut s.child, std::time::Duration::from_secs(20)).expect("exits");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn key_file_is_created_0600_and_reused() {
    let env = Env::without_key();
    let s = env.serve();
    let key_file = env.path("keyrack.db.key");
    let meta = std::fs::metadata(&key_file).expect("key file created");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(s.logs().contains("KEYRACK_ENCRYPTION_KEY"), "{}", s.logs());
    assert!(s.logs().contains("keyrack.db.key"));
    let t = s.user("ada@example.com");
    assert_eq!(
        s.set_key(&t, "openai", "sk-file-key-0123456789").status,
        200
    );
    let before = std::fs::read(&key_file).unwrap();
    assert_eq!(s.terminate().code(), Some(0));

    let s = env.serve();
    assert_eq!(std::fs::read(&key_file).unwrap(), before, "key file reused");
    let t = s.login("ada@example.com");
    assert_eq!(
        s.reveal(&t, "openai").as_deref(),
        Some("sk-file-key-0123456789")
    );
}

#[test]
fn missing_key_file_with_encrypted_data_refuses() {
    let env = Env::without_key();
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "openai", "sk-file-key-0123456789");
    s.terminate();
    std::fs::remove_file(env.path("keyrack.db.key")).unwrap();
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("KEYRACK_ENCRYPTION_KEY"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn wrong_key_refuses_to_start() {
    let env = Env::new();
    let s = env.serve();
    s.terminate();
    let env = env.var("KEYRACK_ENCRYPTION_KEY", KEY_B);
    let out = env.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).is_empty(), "no ready line: {}", stdout(&out));
    assert!(
        stderr(&out).contains("KEYRACK_ENCRYPTION_KEY"),
        "{}",
        stderr(&out)
    );
    // With the right key listed as old, it starts (rotation in progress).
    let env = env.var("KEYRACK_OLD_ENCRYPTION_KEYS", KEY_A);
    assert_eq!(env.run(&["status"]).status.code(), Some(0));
}

#[test]
fn invalid_configuration_exits_2_naming_the_setting() {
    let env = Env::new().var("KEYRACK_ENCRYPTION_KEY", "too-short");
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("KEYRACK_ENCRYPTION_KEY"),
        "{}",
        stderr(&out)
    );

    let env = Env::new().var("KEYRACK_WORKERS", "lots");
    let out = env.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEYRACK_WORKERS"), "{}", stderr(&out));

    let out = Env::new().run(&["serve", "--listen", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEYRACK_LISTEN"), "{}", stderr(&out));

    let out = Env::new().run(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn env_file_and_precedence() {
    let env = Env::without_key();
    let k = stdout(&env.run(&["gen-key"])).trim().to_owned();
    assert_eq!(k.len(), 44);
    std::fs::write(
        env.path(".env"),
        format!("KEYRACK_ENCRYPTION_KEY={k}\nKEYRACK_SESSION_TTL=abc\n"),
    )
    .unwrap();
    // ./.env is read: its bad TTL is reported.
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEYRACK_SESSION_TTL"));
    // The environment beats the .env file.
    let env = env.var("KEYRACK_SESSION_TTL", "60");
    env.create_db();
    let out = env.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        !env.path("keyrack.db.key").exists(),
        "the .env key was used"
    );
    // --env-file names another file.
    std::fs::write(env.path("other.env"), "KEYRACK_DB=other.db\n").unwrap();
    let other = Env::without_key().var("KEYRACK_ENCRYPTION_KEY", &k);
    other.create_db();
    let out = other.run(&[
        "--env-file",
        env.path("other.env").to_str().unwrap(),
        "status",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn memory_database_serves() {
    let env = Env::without_key();
    let s = env.serve_with(&["--db", ":memory:"]);
    let t = s.user("ada@example.com");
    assert_eq!(s.set_key(&t, "openai", "sk-memory-0123456789").status, 200);
    // Several requests land on different workers: all see the same database.
    for _ in 0..8 {
        assert_eq!(
            s.reveal(&t, "openai").as_deref(),
            Some("sk-memory-0123456789")
        );
    }
    assert!(!env.path("keyrack.db").exists());
    assert!(!env.path(":memory:").exists());
    assert!(!env.path(":memory:.key").exists());
}

#[test]
fn register_login_me_logout() {
    let s = Env::new().serve();
    let r = s.post(
        "/auth/register",
        None,
        json!({"email": "  Ada@Example.com ", "password": "correct horse battery"}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.body["user"]["email"], "ada@example.com");
    assert!(r.body["user"]["id"].is_i64());

    let r = s.post(
        "/auth/register",
        None,
        json!({"email": "ada@example.com", "password": "another password"}),
    );
    assert_eq!((r.status, r.code()), (409, "email_taken"));

    let r = s.post(
        "/auth/login",
        None,
        json!({"email": "ADA@example.com", "password": "correct horse battery"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["token_type"], "Bearer");
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 43);
    let exp = r.body["expires_at"].as_str().unwrap();
    assert!(exp.ends_with('Z') && exp.contains('T'), "{exp}");

    let me = s.get("/user/me", Some(&token));
    assert_eq!(me.status, 200);
    assert_eq!(me.body["user"]["email"], "ada@example.com");

    let other = s.login("ada@example.com");
    assert_eq!(s.post("/auth/logout", Some(&token), json!({})).status, 204);
    let r = s.get("/user/me", Some(&token));
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    // Only that token was revoked.
    assert_eq!(s.get("/user/me", Some(&other)).status, 200);

    assert_eq!(s.get("/user/me", None).status, 401);
    assert_eq!(s.get("/user/me", Some("kr_not-a-real-token")).status, 401);
    let r = s.request("GET", "/user/me", None, None);
    assert_eq!(r.code(), "unauthorized");
}

/// The default key and the listing check the session inside their own read: a bad token is
/// still 401 before any check of the query, and a good one still gets the query's 422.
#[test]
fn the_session_is_checked_before_the_query_of_a_key_read() {
    let s = Env::new().serve();
    let t = s.user("ada@example.com");
    for path in [
        "/user/api-key?reveal=maybe",
        "/user/api-key?provider=Not%20A%20Provider",
    ] {
        for bad in [None, Some("kr_not-a-real-token")] {
            let r = s.get(path, bad);
            assert_eq!(
                (r.status, r.code()),
                (401, "unauthorized"),
                "{path} {bad:?}"
            );
        }
        let r = s.get(path, Some(&t));
        assert_eq!((r.status, r.code()), (422, "validation_failed"), "{path}");
    }
    for path in ["/user/api-key?reveal=true", "/user/api-keys"] {
        let r = s.get(path, Some("kr_not-a-real-token"));
        assert_eq!((r.status, r.code()), (401, "unauthorized"), "{path}");
        assert_eq!(s.get(path, Some(&t)).status, 200, "{path}");
    }
}

#[test]
fn tokens_are_stored_only_as_hashes_and_expire() {
    let env = Env::new().var("KEYRACK_SESSION_TTL", "1");
    let s = env.serve();
    let t = s.user("ada@example.com");
    assert!(!contains(&db_bytes(&env.db()), &t));
    assert!(!s.logs_settled().contains(&t));
    assert!(
        poll_until(std::time::Duration::from_secs(5), || s
            .get("/user/me", Some(&t))
            .status
            == 401),
        "not expired 5 s into a 1 s session"
    );
}

#[test]
fn unknown_email_and_wrong_password_get_identical_401() {
    let s = Env::new().serve();
    s.user("ada@example.com");
    let a = s.post(
        "/auth/login",
        None,
        json!({"email": "ada@example.com", "password": "wrong password"}),
    );
    let b = s.post(
        "/auth/login",
        None,
        json!({"email": "nobody@example.com", "password": "wrong password"}),
    );
    assert_eq!(a.status, 401);
    assert_eq!(a.code(), "invalid_credentials");
    assert_eq!(a.status, b.status);
    assert_eq!(a.raw, b.raw);
}

#[test]
fn login_throttled_after_ten_failures() {
    let s = Env::new().serve();
    s.user("ada@example.com");
    for i in 0..10 {
        let r = s.post(
            "/auth/login",
            None,
            json!({"email": "ada@example.com", "password": "wrong password"}),
        );
        assert_eq!(r.status, 401, "attempt {i}");
    }
    // Even the right password is refused now.
    let r = s.post(
        "/auth/login",
        None,
        json!({"email": "ada@example.com", "password": "correct horse battery"}),
    );
    assert_eq!((r.status, r.code()), (429, "too_many_requests"));
    let wait: u64 = r
        .header("Retry-After")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(wait > 0 && wait <= 900, "{wait}");
    // Another email is not affected.
    s.user("bob@example.com");
}

#[test]
fn bad_input_gets_clear_4xx() {
    let s = Env::new().serve();
    let check = |body: &str, status: u16, code: &str, field: &str| {
        let r = s.post_raw("/auth/register", body);
        assert_eq!((r.status, r.code()), (status, code), "{}", r.raw);
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{}", r.raw);
    };
    check("{not json", 400, "invalid_json", "JSON");
    check("[1,2]", 400, "invalid_request", "object");
    check(
        r#"{"password":"correct horse"}"#,
        400,
        "invalid_request",
        "email",
    );
    check(
        r#"{"email":5,"password":"correct horse"}"#,
        400,
        "invalid_request",
        "email",
    );
    check(
        r#"{"email":"nope","password":"correct horse"}"#,
        422,
        "validation_failed",
        "email",
    );
    check(
        r#"{"email":"a@b.c","password":"short"}"#,
        422,
        "validation_failed",
        "password",
    );
    // The server goes on serving.
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn unknown_route_404_and_wrong_method_405_with_allow() {
    let s = Env::new().serve();
    let r = s.get("/nope", None);
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = s.request("PUT", "/user/api-key", None, None);
    assert_eq!((r.status, r.code()), (405, "method_not_allowed"));
    assert_eq!(r.header("Allow"), Some("GET, POST, DELETE"));
    let r = s.get("/auth/login", None);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("POST"));
    // /admin/* without an admin token configured does not exist.
    let r = s.get("/admin/status", None);
    assert_eq!(r.status, 404);
}

#[test]
fn payload_too_large_by_content_length_is_refused_unread() {
    let s = Env::new().serve();
    // Declares 1 GiB and sends none of it: the answer comes at once and the connection closes.
    let ans = exchange(
        &s.addr,
        b"POST /auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n",
    );
    assert!(ans.starts_with("HTTP/1.1 413"), "{ans}");
    assert!(ans.contains("payload_too_large"));
    assert!(
        ans.to_ascii_lowercase().contains("connection: close"),
        "{ans}"
    );
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn payload_too_large_one_mib_body() {
    let s = Env::new().serve();
    let body = format!(
        "{{\"email\":\"a@b.c\",\"password\":\"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    // A real client sends the whole body and reads the answer.
    let r = ureq::post(&format!("{}/auth/register", s.base))
        .set("Content-Type", "application/json")
        .send_string(&body);
    match r {
        Err(ureq::Error::Status(413, resp)) => {
            assert!(resp.into_string().unwrap().contains("payload_too_large"))
        }
        other => panic!("expected 413, got {other:?}"),
    }
    // Chunked, with no declared length: refused after 64 KiB.
    let mut chunked =
        b"POST /auth/register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        chunked.extend_from_slice(&[b'x'; 8192]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let ans = exchange(&s.addr, &chunked);
    assert!(ans.starts_with("HTTP/1.1 413"), "{ans}");
    assert_eq!(s.get("/healthz", None).status, 200);
}

/// `threads` clients at once, each asking for `each` paths (`path(i, j)`) that answer 404, so
/// that many request lines are logged from many threads together.
fn many_404s_at_once(
    base: &str,
    threads: usize,
    each: usize,
    path: impl Fn(usize, usize) -> String + Send + Sync + 'static,
) {
    let path = std::sync::Arc::new(path);
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (base, path) = (base.to_owned(), path.clone());
            std::thread::spawn(move || {
                let agent = ureq::agent();
                for j in 0..each {
                    let url = format!("{base}{}", path(i, j));
                    assert!(matches!(
                        agent.get(&url).call(),
                        Err(ureq::Error::Status(404, _))
                    ));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

/// Every line of `logs` is a whole log line: it starts with its timestamp and level.
fn assert_whole_lines(logs: &str) {
    for line in logs.lines() {
        assert!(
            line.len() > 24 && line.as_bytes()[23] == b'Z' && line[24..].starts_with(" ["),
            "not a whole line: {line:?}"
        );
    }
}

/// With stderr a pipe set non-blocking by whoever made it (the flag belongs to the pipe, so the
/// server's writes see it) and read slowly: every request line still arrives, whole, none lost
/// when the pipe is full, and the server stops.
#[test]
fn a_slow_non_blocking_stderr_gets_every_line_whole() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let (mut reader, writer) = std::io::pipe().unwrap();
    // SAFETY: fcntl(2) on a pipe this test owns.
    unsafe {
        let flags = libc::fcntl(writer.as_raw_fd(), libc::F_GETFL);
        assert!(flags >= 0);
        assert_eq!(
            libc::fcntl(writer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK),
            0
        );
    }
    let env = Env::new();
    let s = env.serve_logging_to(&[], writer.into(), env.path("no-log-file"));
    // 4 KiB every 5 ms: slower than the requests below make lines, so the pipe fills.
    let slow_reader = std::thread::spawn(move || {
        let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
        loop {
            std::thread::sleep(std::time::Duration::from_millis(5));
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    let (threads, each) = (4, 100);
    let long = "x".repeat(1000);
    let path_long = long.clone();
    many_404s_at_once(&s.base, threads, each, move |i, j| {
        format!("/slow-{i}-{j}-{path_long}")
    });
    assert!(s.terminate().success());
    let logs = String::from_utf8(slow_reader.join().unwrap()).unwrap();
    for i in 0..threads {
        for j in 0..each {
            let line = format!("] GET /slow-{i}-{j}-{long} 404 ");
            let n = logs.lines().filter(|l| l.contains(&line)).count();
            assert_eq!(n, 1, "GET /slow-{i}-{j}-x...: {n} lines");
        }
    }
    assert_whole_lines(&logs);
    assert!(
        logs.ends_with("] stopped\n"),
        "{}",
        &logs[logs.len().saturating_sub(300)..]
    );
}

/// The server writes its log lines from a thread of its own, many in one write: under
/// requests from many threads at once every line is there, whole and one to a line, and a
/// graceful stop writes the ones still waiting.
#[test]
fn every_request_line_is_written_whole_by_the_stop() {
    let env = Env::new();
    let s = env.serve();
    let (threads, each) = (8, 50);
    many_404s_at_once(&s.base, threads, each, |i, j| format!("/healthz-{i}-{j}"));
    let log = s.log.clone();
    assert!(s.terminate().success());
    let logs = std::fs::read_to_string(log).unwrap();
    let request_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("] GET /healthz-"))
        .collect();
    assert_eq!(request_lines.len(), threads * each, "{logs}");
    for i in 0..threads {
        for j in 0..each {
            let path = format!(" GET /healthz-{i}-{j} 404 ");
            assert_eq!(
                request_lines.iter().filter(|l| l.contains(&path)).count(),
                1,
                "{path}"
            );
        }
    }
    // The server's last line, logged just before it exits, is written too.
    assert!(
        logs.lines()
            .last()
            .is_some_and(|l| l.ends_with("] stopped")),
        "{logs}"
    );
    assert_whole_lines(&logs);
}

#[test]
fn request_log_has_method_path_status_never_secrets() {
    let env = Env::new().var("RUST_LOG", "trace");
    let s = env.serve();
    let t = s.user("ada@example.com");
    s.set_key(&t, "openai", "sk-logcheck-0123456789");
    s.reveal(&t, "openai");
    s.post(
        "/auth/login",
        None,
        json!({"email": "ada@example.com", "password": "wrong password!"}),
    );
    // Every request's line is in the log before it is searched for secrets.
    let logs = s.logs_with(&[
        "POST /auth/register 201",
        "POST /auth/login 200",
        "POST /user/api-key 200",
        "GET /user/api-key 200",
        "POST /auth/login 401",
    ]);
    for secret in [
        "sk-logcheck-0123456789",
        "correct horse battery",
        "wrong password!",
        &t,
    ] {
        assert!(!logs.contains(secret), "{secret} in the log");
    }
}

#[test]
fn many_clients_connect_at_once_all_answered() {
    use std::io::{BufRead, BufReader, Write};
    use std::time::{Duration, Instant};
    let s = Env::new().serve_with(&["--workers", "4"]);
    let conns: Vec<_> = (0..32)
        .map(|_| std::net::TcpStream::connect(&s.addr).unwrap())
        .collect();
    let start = Instant::now();
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut reader = BufReader::new(c.try_clone().unwrap());
                for _ in 0..2 {
                    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut status = String::new();
                    reader.read_line(&mut status).unwrap();
                    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
                    // Read headers and the body by its length, keeping the connection open.
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    std::io::Read::read_exact(&mut reader, &mut body).unwrap();
                }
                c
            })
        })
        .collect();
    let conns: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("answered"))
        .collect();
    let took = start.elapsed();
    assert!(
        took < within(Duration::from_secs(1)),
        "32 keep-alive clients took {took:?}"
    );
    drop(conns);
}

#[test]
fn keeps_accepting_after_running_out_of_descriptors() {
    use std::io::Write;
    // The server runs with few descriptors; the test opens more connections than it can hold.
    let env = Env::new();
    let bin = BIN;
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 48 && exec \"$0\" \"$@\"")
        .arg(bin)
        .args([
            "--db",
            env.db().to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
        ])
        .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
        .env("RUST_LOG", "warn")
        // Few database connections (each holds descriptors from the start: a reader's, a
        // writer's, a hashing thread's per core), so that the server starts within the limit.
        .env("KEYRACK_WRITE_WORKERS", "4")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(env.path("fd.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = KillOnDrop(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let addr = line
        .trim()
        .trim_start_matches("keyrack listening on http://")
        .to_owned();
    let mut hogs = Vec::new();
    for _ in 0..60 {
        if let Ok(mut c) = std::net::TcpStream::connect(&addr) {
            let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
            hogs.push(c);
        }
    }
    let log = || std::fs::read_to_string(env.path("fd.log")).unwrap();
    assert!(
        poll_until(std::time::Duration::from_secs(10), || log()
            .contains("Error accepting")),
        "descriptors never ran out: {}",
        log()
    );
    drop(hogs);
    // Descriptors come free again as the server sees the dropped connections close: a new
    // client is answered. Until it has seen enough of them, a client may still be accepted and
    // then reset (its connection's thread needs one more descriptor): tries until a deadline.
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(10))
        .build();
    let mut last = None;
    let answered = poll_until(std::time::Duration::from_secs(10), || {
        let r = agent.get(&format!("http://{addr}/healthz")).call();
        let ok = matches!(&r, Ok(r) if r.status() == 200);
        last = Some(r.map(|r| r.status()));
        ok
    });
    assert!(answered, "{last:?}; server log: {}", log());
}

#[test]
fn a_panicking_handler_answers_500_and_the_worker_lives() {
    let env = Env::new().var("KEYRACK_DEBUG_PANIC_ROUTE", "1");
    let s = env.serve_with(&["--workers", "1"]);
    for _ in 0..3 {
        let r = s.get("/debug/panic", None);
        assert_eq!((r.status, r.code()), (500, "internal"));
        assert!(!r.raw.contains("deliberate"), "no details in the body");
    }
    // The one worker still serves.
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn a_database_locked_too_long_answers_503_busy() {
    let env = Env::new().var("KEYRACK_BUSY_TIMEOUT", "0.3");
    let s = env.serve();
    let t = s.user("ada@example.com");
    // Another process holds the write lock past keyrack's busy timeout.
    let mut holder = rusqlite::Connection::open(env.db()).unwrap();
    let tx = holder
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    let start = std::time::Instant::now();
    let r = s.set_key(&t, "openai", "sk-busy-0123456789");
    assert_eq!((r.status, r.code()), (503, "busy"), "{}", r.raw);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(3),
        "answered after the setting's 0.3 s, not the default 5 s ({:?})",
        start.elapsed()
    );
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert!(
        !r.raw.contains("locked"),
        "no SQLite text reaches the client"
    );
    tx.rollback().unwrap();
    assert_eq!(s.set_key(&t, "openai", "sk-busy-0123456789").status, 200);
}

#[test]
fn reads_are_served_while_writes_wait_for_the_database() {
    use std::time::{Duration, Instant};
    // One reader; the writes have a pool of their own.
    let env = Env::new()
        .var("KEYRACK_BUSY_TIMEOUT", "30")
        .var("KEYRACK_WRITE_WORKERS", "2");
    let s = env.serve_with(&["--workers", "1"]);
    let t = s.user("ada@example.com");
    // Another process holds the write lock: the write below waits for it.
    let mut holder = rusqlite::Connection::open(env.db()).unwrap();
    let tx = holder
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    let writer = {
        let (base, t) = (s.base.clone(), t.clone());
        std::thread::spawn(move || {
            ureq::post(&format!("{base}/user/api-key"))
                .set("Authorization", &format!("Bearer {t}"))
                .send_json(json!({"api_key": "sk-waiting-0123456789"}))
                .map(|r| r.status())
                .map_err(|e| e.to_string())
        })
    };
    // For a second and a half, reads come one after another: each is answered at once, not
    // after the write (which would hold the one reader for the 30 s busy timeout).
    let start = Instant::now();
    let mut reads = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let asked = Instant::now();
        let r = s.get("/user/api-keys", Some(&t));
        assert_eq!(r.status, 200, "{}", r.raw);
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "a read waited {:?} behind a write",
            asked.elapsed()
        );
        reads += 1;
    }
    assert!(!writer.is_finished(), "the write did not wait for the lock");
    tx.rollback().unwrap();
    assert_eq!(writer.join().unwrap(), Ok(200));
    assert!(reads > 1);
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    use std::io::Read;
    let s = Env::new().var("KEYRACK_IDLE_TIMEOUT", "0.3").serve();
    let start = std::time::Instant::now();
    let mut c = connect(&s.addr, std::time::Duration::from_secs(10));
    // Sends nothing: the server closes the connection (it would otherwise hold a thread). The
    // client's own timeout is an error here, never taken for a close.
    let mut buf = [0u8; 64];
    let n = c
        .read(&mut buf)
        .expect("the server closes the idle connection before the client gives up");
    assert_eq!(n, 0, "closed without an answer");
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn a_refused_body_that_never_comes_does_not_hold_the_worker() {
    use std::io::{Read, Write};
    let s = Env::new().serve_with(&["--workers", "1"]);
    let mut a = connect(&s.addr, std::time::Duration::from_secs(20));
    a.write_all(b"POST /auth/register HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("payload_too_large") {
        let n = a.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    // `a` stays open and silent. The only worker still answers someone else, well before the
    // 10 s socket timeout would have freed it.
    let r = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(6))
        .build()
        .get(&format!("{}/healthz", s.base))
        .call();
    assert_eq!(r.map(|r| r.status()).ok(), Some(200));
    drop(a);
}
