//! keyrack as a throwaway server of a test harness (docs/harness.md): little started before the
//! ready line, pools that grow on demand within their settings, `--exit-with-parent`, a fresh
//! file made durable before its first write, and the README's tour runnable twice.

use crate::support::*;
use serde_json::json;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Connections to the database file a process holds open.
fn open_database_files(pid: u32, db: &std::path::Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
                .filter(|p| p == db)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_ready_line_comes_before_the_pools_and_the_pools_grow_within_their_settings() {
    let env = Env::new().var("KEYRACK_WRITE_WORKERS", "3");
    let s = env.serve_with(&["--workers", "2"]);
    let pid = s.child.id();
    // At the ready line: one reader; no writer, no connection per worker. (The flusher and
    // the log writer start right after the line, each with at most one connection.) A thread's
    // name is set once it runs: read until the reader has its name.
    let count =
        |prefix: &str, names: &[String]| names.iter().filter(|n| n.starts_with(prefix)).count();
    let mut names = Vec::new();
    poll_until(Duration::from_secs(5), || {
        names = thread_names(pid);
        count("worker-", &names) == 1
    });
    assert_eq!(count("worker-", &names), 1, "{names:?}");
    assert_eq!(count("writer-", &names), 0, "{names:?}");
    // Beside them: the main thread, and tiny_http's accept thread and its four pooled
    // connection threads.
    assert!(names.len() <= 9, "{names:?}");
    assert!(open_database_files(pid, &env.db()) <= 2);

    // Many writes at once: the writers' pool grows, never past KEYRACK_WRITE_WORKERS, and
    // every write is answered. (Registrations and logins go to the hashing pool, not the
    // writers: each client registers and logs in first.)
    let base = s.base.clone();
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || {
                let email = format!("u{i}@example.com");
                let creds = json!({"email": email, "password": "correct horse battery"});
                ureq::post(&format!("{base}/auth/register"))
                    .send_json(creds.clone())
                    .expect("register");
                let token: Value = ureq::post(&format!("{base}/auth/login"))
                    .send_json(creds)
                    .expect("login")
                    .into_json()
                    .expect("login answer");
                let token = token["token"].as_str().expect("token").to_owned();
                ureq::post(&format!("{base}/user/api-key"))
                    .set("Authorization", &format!("Bearer {token}"))
                    .send_json(json!({"api_key": format!("sk-harness-key-{i:04}")}))
                    .map(|r| r.status())
                    .unwrap_or_else(|e| match e {
                        ureq::Error::Status(code, _) => code,
                        other => panic!("{other}"),
                    })
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    let names = thread_names(pid);
    let writers = count("writer-", &names);
    assert!((1..=3).contains(&writers), "{names:?}");
    assert!(count("worker-", &names) <= 2, "{names:?}");
    // One connection per worker that served something, the hashing threads', the flusher's,
    // no more.
    let hashers = count("hasher-", &names);
    assert!(open_database_files(pid, &env.db()) <= 2 + 3 + hashers + 1);
    let token = s.login("u3@example.com");
    assert_eq!(
        s.set_key(&token, "openai", "sk-harness-key-1234").status,
        200
    );
    assert_eq!(s.terminate().code(), Some(0));
}

#[test]
fn a_fresh_file_is_on_disk_before_its_first_write_is_answered() {
    let env = Env::new();
    let s = env.serve();
    let token = s.user("first@example.com");
    assert_eq!(
        s.set_key(&token, "openai", "sk-first-write-1234").status,
        200
    );
    // The database file alone (its write-ahead log left out, as a crash of the machine could
    // lose a log never synced): the start-up's schema and key identity are in it.
    let copy = env.path("copy.db");
    std::fs::copy(env.db(), &copy).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('users', 'api_keys', 'keyrack_meta')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 3);
    drop(s);
}

/// `sh` starts keyrack in the background and waits: the server's parent is the shell. `vars`
/// are the server's settings beside the key; its log goes to `server.log`. The shell, the
/// server's pid and its base URL.
fn serve_under_a_shell(
    env: &Env,
    vars: &[(&str, &str)],
    args: &str,
) -> (std::process::Child, u32, String) {
    let script = format!(
        "'{BIN}' --db '{}' serve --listen 127.0.0.1:0 {args} > '{}' 2> '{}' & echo $!; wait",
        env.db().display(),
        env.path("ready.txt").display(),
        env.path("server.log").display()
    );
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEYRACK_ENCRYPTION_KEY", KEY_A)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    for (k, v) in vars {
        sh.env(k, v);
    }
    let mut sh = sh.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(sh.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: u32 = line.trim().parse().unwrap();
    let mut ready = String::new();
    assert!(
        poll_until(Duration::from_secs(30), || {
            ready = std::fs::read_to_string(env.path("ready.txt")).unwrap_or_default();
            ready.contains("listening on")
        }),
        "no ready line: {}",
        std::fs::read_to_string(env.path("server.log")).unwrap_or_default()
    );
    let base = ready
        .trim()
        .trim_start_matches("keyrack listening on ")
        .to_owned();
    (sh, pid, base)
}

/// The process is gone (or a zombie: exited, not yet reaped by whoever adopted it).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[test]
fn exit_with_parent_stops_the_server_gracefully_when_its_parent_is_killed() {
    for (vars, args) in [
        (&[][..], "--exit-with-parent"),
        (&[("KEYRACK_EXIT_WITH_PARENT", "1")][..], ""),
    ] {
        let env = Env::new();
        let (mut sh, pid, base) = serve_under_a_shell(&env, vars, args);
        assert_eq!(
            ureq::get(&format!("{base}/healthz"))
                .call()
                .unwrap()
                .status(),
            200
        );
        // The harness dies without a chance to clean up.
        sh.kill().unwrap();
        sh.wait().unwrap();
        assert!(
            poll_until(Duration::from_secs(10), || exited(pid)),
            "the server outlived its parent ({vars:?} {args})"
        );
        // By the graceful path of SIGTERM: it logged its last line.
        let log = std::fs::read_to_string(env.path("server.log")).unwrap();
        assert!(
            log.contains("signal 15") && log.contains("stopped"),
            "{log}"
        );
    }
    // Without the setting the server runs on after its parent's death (what the setting
    // changes); stopped here by hand.
    let env = Env::new();
    let (mut sh, pid, base) = serve_under_a_shell(&env, &[], "");
    sh.kill().unwrap();
    sh.wait().unwrap();
    assert!(!poll_until(Duration::from_secs(2), || exited(pid)));
    assert_eq!(
        ureq::get(&format!("{base}/healthz"))
            .call()
            .unwrap()
            .status(),
        200
    );
    // SAFETY: kill(2) on the server's pid, which the test saw alive just now.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    assert!(poll_until(Duration::from_secs(10), || exited(pid)));
}

#[test]
fn a_bad_exit_with_parent_setting_is_refused() {
    let env = Env::new().var("KEYRACK_EXIT_WITH_PARENT", "sometimes");
    let out = env.run(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("KEYRACK_EXIT_WITH_PARENT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_readme_tour_runs_twice_and_says_how_to_stop_its_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let tour = readme
        .split_once("A short tour")
        .and_then(|(_, rest)| rest.split_once("```sh\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("the README's tour");
    assert!(
        tour.lines().any(|l| l.starts_with("kill ")),
        "the tour does not say how to stop its server:\n{tour}"
    );
    // The tour's server command, as written, on port 0, run twice from one directory.
    let line = tour.lines().next().unwrap();
    let args: Vec<String> = line
        .split_once("cargo run --release -- ")
        .and_then(|(_, rest)| rest.split(" &").next())
        .expect("the tour starts a server")
        .split_whitespace()
        .map(|a| match a.strip_prefix("fixtures/") {
            Some(f) => repo_fixture(f),
            None => a.to_owned(),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    for run in 1..=2 {
        let mut child = Command::new(BIN)
            .args(&args)
            .args(["--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .env_clear()
            .env("KEYRACK_TEST_CHEAP_HASH", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        if !ready.contains("listening on") {
            let out = child.wait_with_output().unwrap();
            panic!("run {run} of the tour: {}", stderr(&out));
        }
        let base = ready
            .trim()
            .trim_start_matches("keyrack listening on ")
            .to_owned();
        let r = ureq::post(&format!("{base}/auth/login"))
            .send_json(json!({"email": "ada@example.com", "password": "correct horse battery"}))
            .unwrap();
        assert_eq!(r.status(), 200);
        signal(&child, libc::SIGTERM);
        let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("stopped");
        assert_eq!(status.code(), Some(0), "run {run}");
    }
}
