//! The test harness: starts the real `keyrack` binary on port 0 with its own temporary database,
//! waits for its ready line, and talks HTTP to it with a real client (ureq).

#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyrack");

/// A fixed test key, so that separate runs over one database agree.
pub const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const KEY_B: &str = "HxweHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";

/// A temporary directory holding one database, shared by a server and the commands run on it.
pub struct Env {
    /// Shared with the servers started here: the directory (and the database in it) lives as
    /// long as they do, even when a test drops its `Env` first (`Env::new().serve()`), since a
    /// server opens its workers' connections by the database's path when they are first used.
    pub dir: std::sync::Arc<TempDir>,
    pub vars: Vec<(String, String)>,
}

impl Env {
    /// A fresh directory with KEYRACK_ENCRYPTION_KEY set to `KEY_A` (and keyrack's cheapest
    /// password hash, see `real_hash`).
    pub fn new() -> Env {
        Env::without_key().var("KEYRACK_ENCRYPTION_KEY", KEY_A)
    }

    /// A fresh directory with no encryption key configured. Debug builds of keyrack hash
    /// passwords with their cheapest argon2id here (KEYRACK_TEST_CHEAP_HASH): the suite
    /// registers and logs in hundreds of times.
    pub fn without_key() -> Env {
        Env {
            dir: std::sync::Arc::new(tempfile::tempdir().expect("temp dir")),
            vars: vec![("KEYRACK_TEST_CHEAP_HASH".into(), "1".into())],
        }
    }

    /// keyrack's real argon2id parameters (9 MiB, 4 passes), for a test that needs a login to
    /// take its real time or checks the parameters of a stored hash.
    pub fn real_hash(mut self) -> Env {
        self.vars.retain(|(n, _)| n != "KEYRACK_TEST_CHEAP_HASH");
        self
    }

    pub fn var(mut self, k: &str, v: &str) -> Env {
        self.vars.retain(|(n, _)| n != k);
        self.vars.push((k.into(), v.into()));
        self
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("keyrack.db")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .arg("--db")
            .arg(self.db())
            .args(args);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Creates the database (with `load-fixtures` of no users: the other commands never create
    /// one).
    pub fn create_db(&self) {
        let empty = self.path("no-users.json");
        std::fs::write(&empty, r#"{"users": []}"#).expect("write fixtures");
        let out = self.run(&["load-fixtures", empty.to_str().expect("utf-8 path")]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }

    /// Runs a one-shot command (no terminal on stdin) and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run keyrack")
    }

    /// Runs a one-shot command with `input` on stdin (a pipe, not a terminal).
    pub fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run keyrack");
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        child.wait_with_output().expect("wait for keyrack")
    }

    /// Starts `keyrack serve` on port 0 and waits for the ready line.
    pub fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    pub fn serve_with(&self, extra: &[&str]) -> Server {
        let log = self.dir.path().join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let stderr = std::fs::File::create(&log).expect("log file");
        self.serve_logging_to(extra, stderr.into(), log)
    }

    /// A server whose stderr is `stderr`; `log` is the file `Server::logs` reads (none when
    /// the log goes elsewhere).
    pub fn serve_logging_to(&self, extra: &[&str], stderr: Stdio, log: PathBuf) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let child = self
            .command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn keyrack");
        Server::wait_ready(child, log, self.dir.clone())
    }
}

pub struct Server {
    pub child: Child,
    /// The directory of its database (`Env::dir`), removed once the server is gone.
    _dir: std::sync::Arc<TempDir>,
    pub base: String,
    pub addr: String,
    pub log: PathBuf,
    agent: ureq::Agent,
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub raw: String,
    pub headers: Vec<(String, String)>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Server {
    fn wait_ready(mut child: Child, log: PathBuf, dir: std::sync::Arc<TempDir>) -> Server {
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the server never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no ready line; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let base = line
            .trim()
            .strip_prefix("keyrack listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "unexpected ready line {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_owned();
        let addr = base.trim_start_matches("http://").to_owned();
        Server {
            child,
            _dir: dir,
            base,
            addr,
            log,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it holds each of `lines` (10 s at most). A request's line is written after
    /// its answer (its duration covers the writing), so a client can hold the answer before the
    /// line is in the log, and a later request's line can come first: a test that reads the log
    /// right after its requests waits for their lines with this.
    pub fn logs_with(&self, lines: &[&str]) -> String {
        let all_in = |logs: &str| lines.iter().all(|l| logs.contains(l));
        assert!(
            poll_until(Duration::from_secs(10), || all_in(&self.logs())),
            "not all of {lines:?} in the log:\n{}",
            self.logs()
        );
        self.logs()
    }

    /// The log holding every line logged before this call: the server writes its lines from a
    /// thread of its own, in order, so once the line of a request made now is in, so is every
    /// line logged before it.
    pub fn logs_settled(&self) -> String {
        static MARKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mark = format!(
            "/log-mark-{}",
            MARKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        assert_eq!(self.get(&mark, None).status, 404);
        self.logs_with(&[&format!("] GET {mark} 404 ")])
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut req = self
            .agent
            .request(method, &format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        Self::into_resp(result, &format!("{method} {path}"))
    }

    fn into_resp(result: Result<ureq::Response, ureq::Error>, what: &str) -> Resp {
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{what}: {e}"),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .map(|n| {
                let v = resp.header(&n).unwrap_or("").to_owned();
                (n, v)
            })
            .collect();
        let raw = resp.into_string().unwrap_or_default();
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Resp {
            status,
            body,
            raw,
            headers,
        }
    }

    /// POSTs `body` as it is, with a JSON content type.
    pub fn post_raw(&self, path: &str, body: &str) -> Resp {
        let result = self
            .agent
            .post(&format!("{}{}", self.base, path))
            .set("Content-Type", "application/json")
            .send_string(body);
        Self::into_resp(result, path)
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.request("GET", path, token, None)
    }

    pub fn post(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.request("POST", path, token, Some(&body))
    }

    pub fn delete(&self, path: &str, token: Option<&str>) -> Resp {
        self.request("DELETE", path, token, None)
    }

    /// Registers `email` (password `correct horse battery`) and returns a login token.
    pub fn user(&self, email: &str) -> String {
        let r = self.post(
            "/auth/register",
            None,
            json!({"email": email, "password": "correct horse battery"}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        self.login(email)
    }

    pub fn login(&self, email: &str) -> String {
        let r = self.post(
            "/auth/login",
            None,
            json!({"email": email, "password": "correct horse battery"}),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
        r.body["token"].as_str().expect("token").to_owned()
    }

    pub fn set_key(&self, token: &str, provider: &str, key: &str) -> Resp {
        self.post(
            "/user/api-key",
            Some(token),
            json!({"api_key": key, "provider": provider}),
        )
    }

    pub fn reveal(&self, token: &str, provider: &str) -> Option<String> {
        let r = self.get(
            &format!("/user/api-key?provider={provider}&reveal=true"),
            Some(token),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
        r.body["api_key"].as_str().map(str::to_owned)
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        signal(&self.child, libc::SIGTERM);
        wait_timeout(&mut self.child, Duration::from_secs(20)).expect("exit after SIGTERM")
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A command ended with `code` (else its stderr is shown) and its stdout holds `needle`.
#[track_caller]
pub fn says(out: &Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", stderr(out));
    assert!(stdout(out).contains(needle), "{}", stdout(out));
}

/// Every byte of the database files (main file, WAL, shared memory), for plaintext greps.
pub fn db_bytes(db: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(b) = std::fs::read(PathBuf::from(p)) {
            all.extend(b);
        }
    }
    all
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Runs SQL on the database with a separate connection (as another writer would).
pub fn sql(db: &Path, stmt: &str) {
    let c = rusqlite::Connection::open(db).expect("open db");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c.execute_batch(stmt).expect("sql");
}

pub fn sql_value(db: &Path, query: &str) -> rusqlite::types::Value {
    let c = rusqlite::Connection::open(db).expect("open db");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c.query_row(query, [], |r| r.get(0)).expect("query")
}

/// Seals a value exactly as keyrack does (format `kr1:<key id>:<base64(nonce || ct)>`, bound to
/// user and provider), so tests can write thousands of legacy rows without thousands of HTTP
/// calls. The tests that read these rows back through keyrack check that the formats agree.
pub fn seal_like_keyrack(key_b64: &str, user_id: i64, provider: &str, plaintext: &str) -> String {
    use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
    use aes_gcm::{Aes256Gcm, Key};
    use base64::Engine as _;
    use sha2::Digest;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(key_b64).unwrap();
    let mut h = sha2::Sha256::new();
    h.update(b"keyrack key id v1\0");
    h.update(&key);
    let id: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key));
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let aad = format!("keyrack/v1/user:{user_id}/provider:{provider}");
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext.as_bytes(),
                aad: aad.as_bytes(),
            },
        )
        .unwrap();
    let mut raw = nonce.to_vec();
    raw.extend(ct);
    format!("kr1:{id}:{}", b64.encode(raw))
}

/// The password of every seeded user.
pub const SEED_PASSWORD: &str = "correct horse battery";

/// The plaintext key of seeded user `id`.
pub fn seed_key(id: i64) -> String {
    format!("sk-legacy-{id:08}-abcdefgh")
}

/// Adds `n` users `user<i>@example.com`, each with a legacy column key sealed under `KEY_A`,
/// in one transaction. The database must exist (run any command first).
pub fn seed_legacy_users(db: &Path, n: i64) {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(SEED_PASSWORD.as_bytes(), &salt)
        .unwrap()
        .to_string();
    let mut c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let tx = c.transaction().unwrap();
    {
        let mut ins = tx
            .prepare("INSERT INTO users(email, password_hash, created_at) VALUES (?1, ?2, 0)")
            .unwrap();
        let mut col = tx
            .prepare("UPDATE users SET openai_api_key = ?2 WHERE id = ?1")
            .unwrap();
        for i in 0..n {
            let id = ins
                .insert(rusqlite::params![format!("user{i}@example.com"), hash])
                .unwrap();
            col.execute(rusqlite::params![
                id,
                seal_like_keyrack(KEY_A, id, "openai", &seed_key(id))
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// `keyrack status --json`, parsed.
pub fn status_json(env: &Env) -> Value {
    let out = env.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).expect("status JSON")
}

pub fn integrity_ok(db: &Path) -> bool {
    let c = rusqlite::Connection::open(db).unwrap();
    let r: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    r == "ok"
}

/// Writes a fixtures file into the environment's directory and returns its path.
pub fn fixtures_file(env: &Env, name: &str, v: &Value) -> PathBuf {
    let p = env.path(name);
    std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    p
}

/// A fixtures file of the repository's `fixtures/` folder.
pub fn repo_fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Calls `f` until it holds or `limit` has passed (every 20 ms); whether it held.
pub fn poll_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A latency bound of a test: as written in release builds, three times it in debug builds,
/// which run several times slower on a loaded machine. Each bound it is used for tells apart a
/// failure that takes far longer (a timeout of 5 s or more, or the client's own).
pub fn within(bound: Duration) -> Duration {
    if cfg!(debug_assertions) {
        bound * 3
    } else {
        bound
    }
}

// ---- raw connections, for what an HTTP client library would not send ----------------------

/// A raw connection to the server, reads timing out after `read_timeout`.
pub fn connect(addr: &str, read_timeout: Duration) -> std::net::TcpStream {
    let c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(read_timeout)).unwrap();
    c
}

/// Sends `request`, then reads until the server closes the connection or `limit` passes.
/// Returns what was read and whether the server closed.
pub fn exchange_within(addr: &str, request: &[u8], limit: Duration) -> (String, bool) {
    let mut c = connect(addr, limit);
    let _ = c.write_all(request);
    let mut out = Vec::new();
    let closed = c.read_to_end(&mut out).is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The answer to `request`, which must come, with the connection closed, within 3 s.
pub fn answer_and_close(addr: &str, request: &[u8]) -> String {
    let start = Instant::now();
    let (ans, closed) = exchange_within(addr, request, Duration::from_secs(3));
    assert!(
        closed,
        "not closed after {:?}; read so far: {ans:?}",
        start.elapsed()
    );
    ans
}

/// Sends `request` and reads the answer until the server closes the connection (20 s at most).
pub fn exchange(addr: &str, request: &[u8]) -> String {
    exchange_within(addr, request, Duration::from_secs(20)).0
}

/// SQL that turns a database of the current schema back into schema version 2 (the version
/// before the per-user backfill markers, legacy-use evidence, expiry and events), for tests of
/// upgrades from it. A new migration adds its objects' removal here.
pub const BACK_TO_SCHEMA_2: &str = "
    DROP TABLE invites;
    DROP TABLE service_tokens;
    DROP INDEX users_by_external_id;
    ALTER TABLE users DROP COLUMN external_id;
    ALTER TABLE users DROP COLUMN last_login_at;
    DROP TRIGGER IF EXISTS keyrack_foreign_column_update;
    DROP TRIGGER IF EXISTS keyrack_foreign_column_insert;
    DROP TABLE events;
    DROP TABLE legacy_use;
    ALTER TABLE users DROP COLUMN keyrack_key_writes;
    ALTER TABLE api_keys DROP COLUMN expires_at;
    DROP TABLE legacy_backfill;
    DROP INDEX api_keys_by_key_id;
    DROP INDEX users_by_key_id;
    DELETE FROM refinery_schema_history WHERE version >= 3;";

/// A database in phase legacy holding `n` users with column keys.
pub fn legacy_env(n: i64) -> Env {
    let env = Env::new();
    env.create_db();
    seed_legacy_users(&env.db(), n);
    sql(
        &env.db(),
        "UPDATE keyrack_meta SET value = 'legacy' WHERE name = 'phase'",
    );
    env
}

/// Asks `/healthz` on a new connection (giving up after `timeout`) and asserts a 200 within a
/// second (`within` widens it in debug builds).
pub fn healthz_answers_within_a_second(base: &str, timeout: Duration) {
    let start = Instant::now();
    let r = ureq::AgentBuilder::new()
        .timeout(timeout)
        .build()
        .get(&format!("{base}/healthz"))
        .call();
    assert_eq!(r.map(|r| r.status()).ok(), Some(200));
    assert!(
        start.elapsed() < within(Duration::from_secs(1)),
        "{:?}",
        start.elapsed()
    );
}
