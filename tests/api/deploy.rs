//! Running keyrack as a deployed service: the key from a file or a systemd credential,
//! `keyrack healthcheck`, and GET /metrics.

use crate::support::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn the_key_comes_from_a_file_or_a_systemd_credential() {
    let env = Env::without_key();
    std::fs::write(env.path("key.txt"), format!("{KEY_A}\n")).unwrap();
    let key_file = env.path("key.txt").to_str().unwrap().to_owned();

    // KEYRACK_ENCRYPTION_KEY_FILE: the server seals with KEY_A; no key file beside the database.
    let env = env.var("KEYRACK_ENCRYPTION_KEY_FILE", &key_file);
    let s = env.serve();
    let token = s.user("file@example.com");
    assert_eq!(
        s.set_key(&token, "openai", "sk-from-the-file-1234").status,
        200
    );
    assert_eq!(s.terminate().code(), Some(0));
    assert!(!env.path("keyrack.db.key").exists());

    // The same key as a systemd credential: the stored key opens.
    let creds = env.path("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("keyrack-encryption-key"), KEY_A).unwrap();
    let mut env = env.var("CREDENTIALS_DIRECTORY", creds.to_str().unwrap());
    env.vars.retain(|(k, _)| k != "KEYRACK_ENCRYPTION_KEY_FILE");
    let s = env.serve();
    let token = s.login("file@example.com");
    assert_eq!(
        s.reveal(&token, "openai").as_deref(),
        Some("sk-from-the-file-1234")
    );
    drop(s);

    // A different key as the credential: refused at start like a wrong KEYRACK_ENCRYPTION_KEY.
    std::fs::write(creds.join("keyrack-encryption-key"), KEY_B).unwrap();
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // Both variables set: exit 2 naming both, before anything is opened.
    let env = env
        .var("KEYRACK_ENCRYPTION_KEY", KEY_A)
        .var("KEYRACK_ENCRYPTION_KEY_FILE", &key_file);
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("KEYRACK_ENCRYPTION_KEY and KEYRACK_ENCRYPTION_KEY_FILE"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn healthcheck_exits_zero_only_while_a_server_answers() {
    let env = Env::new();
    let s = env.serve();
    let out = env.run(&["healthcheck", "--url", &s.base]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Without --url: the listen address.
    let env2 = Env::new().var("KEYRACK_LISTEN", &s.addr);
    let out = env2.run(&["healthcheck"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // It uses no database: none was created.
    assert!(!env2.db().exists());
    // A path that is not /healthz and answers 404: not healthy.
    let out = env.run(&["healthcheck", "--url", &format!("{}/nope", s.base)]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let base = s.base.clone();
    assert_eq!(s.terminate().code(), Some(0));
    let out = env.run(&["healthcheck", "--url", &base, "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&base), "{}", stderr(&out));
    let out = env.run(&["healthcheck", "--url", "https://example.com"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn metrics_need_the_admin_token() {
    let env = Env::new();
    let s = env.serve();
    assert_eq!(s.get("/metrics", None).status, 404);
    drop(s);
    let env = env.var("KEYRACK_ADMIN_TOKEN", "metrics-admin-token");
    let s = env.serve();
    assert_eq!(s.get("/metrics", None).status, 401);
    assert_eq!(s.get("/metrics", Some("wrong")).status, 401);
    let r = s.get("/metrics", Some("metrics-admin-token"));
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers
    );
}

/// The value of one sample line `series value` in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_requests_keys_and_the_phase_and_promtool_accepts_them() {
    let env = Env::new().var("KEYRACK_ADMIN_TOKEN", "metrics-admin-token");
    let s = env.serve();
    let token = s.user("m@example.com");
    assert_eq!(
        s.set_key(&token, "openai", "sk-metrics-key-123456").status,
        200
    );
    assert_eq!(
        s.post(
            "/user/api-keys",
            Some(&token),
            json!({"provider": "anthropic", "api_key": "sk-ant-123456789"})
        )
        .status,
        201
    );
    for _ in 0..3 {
        assert_eq!(s.get("/healthz", None).status, 200);
    }
    assert_eq!(s.get("/no/such/path", None).status, 404);
    assert_eq!(s.get("/user/api-keys/17", None).status, 405);

    // A request is counted once its answer is written: the client can have an answer before
    // its worker has counted it. Scrape until the requests above are all counted.
    let scrape = || s.get("/metrics", Some("metrics-admin-token")).raw;
    let counted = |text: &str| {
        [
            ("/healthz", "200", 3.0),
            ("other", "404", 1.0),
            ("/user/api-keys/{id}", "405", 1.0),
        ]
        .iter()
        .all(|(route, status, n)| {
            let series =
                format!("keyrack_http_requests_total{{route=\"{route}\",status=\"{status}\"}}");
            sample(text, &series) == Some(*n)
        }) && sample(
            text,
            "keyrack_http_request_duration_seconds_count{route=\"/healthz\"}",
        ) == Some(3.0)
    };
    assert!(
        poll_until(Duration::from_secs(5), || counted(&scrape())),
        "not all counted:\n{}",
        scrape()
    );
    let text = scrape();
    let get = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        get("keyrack_http_requests_total{route=\"/healthz\",status=\"200\"}"),
        3.0
    );
    assert_eq!(
        get("keyrack_http_requests_total{route=\"other\",status=\"404\"}"),
        1.0
    );
    assert_eq!(
        get("keyrack_http_requests_total{route=\"/user/api-keys/{id}\",status=\"405\"}"),
        1.0
    );
    assert_eq!(
        get("keyrack_http_request_duration_seconds_count{route=\"/healthz\"}"),
        3.0
    );
    assert_eq!(
        get("keyrack_http_request_duration_seconds_bucket{route=\"/healthz\",le=\"+Inf\"}"),
        3.0
    );
    assert_eq!(get("keyrack_keys{store=\"api_keys\"}"), 2.0);
    assert_eq!(
        get("keyrack_phase{phase=\"dual\"}")
            + get("keyrack_phase{phase=\"new_only\"}")
            + get("keyrack_phase{phase=\"legacy\"}"),
        1.0
    );
    assert_eq!(get("keyrack_undecryptable_keys"), 0.0);
    assert_eq!(get("keyrack_legacy_reads_total"), 0.0);
    assert_eq!(get("keyrack_foreign_column_writes_total"), 0.0);
    // register, login, set, add: at least those writes were group-committed.
    assert!(get("keyrack_group_commit_writes_count") >= 1.0, "{text}");
    assert!(get("keyrack_group_commit_writes_sum") >= 4.0, "{text}");

    // promtool (Debian package `prometheus`) accepts the text. .ci/run installs it and sets
    // KEYRACK_REQUIRE_PROMTOOL=1; elsewhere the check runs when promtool is on the PATH.
    let file = env.path("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
    {
        Ok(out) => assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            assert!(
                std::env::var_os("KEYRACK_REQUIRE_PROMTOOL").is_none(),
                "promtool: {e}"
            );
            eprintln!("promtool not found ({e}): the format check was skipped");
        }
    }
}

/// Whether `.dockerignore`'s `pattern` keeps `path` (relative to the context) out, as Docker
/// reads it: `*` within one path segment, a leading `**/` at any depth, a plain name at the
/// root (and everything under it).
fn docker_ignores(pattern: &str, path: &str) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                glob(&p[1..], s) || (!s.is_empty() && s[0] != b'/' && glob(p, &s[1..]))
            }
            (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let under = |p: &str, s: &str| {
        glob(p.as_bytes(), s.as_bytes())
            || s.char_indices()
                .filter(|(_, c)| *c == '/')
                .any(|(i, _)| glob(p.as_bytes(), &s.as_bytes()[..i]))
    };
    match pattern.strip_prefix("**/") {
        Some(rest) => {
            let mut tails = vec![path];
            tails.extend(
                path.char_indices()
                    .filter(|(_, c)| *c == '/')
                    .map(|(i, _)| &path[i + 1..]),
            );
            tails.into_iter().any(|t| under(rest, t))
        }
        None => under(pattern, path),
    }
}

#[test]
fn the_docker_build_context_leaves_out_databases_keys_backups_and_settings() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let ignored = |path: &str| patterns.iter().any(|p| docker_ignores(p, path));
    // What the README's set-up, the Dockerfile's comment and keyrack's commands write into the
    // directory they run in, at the root or deeper.
    for secret in [
        "keyrack.db",
        "keyrack.db-wal",
        "keyrack.db-shm",
        "keyrack.db-journal",
        "keyrack.db.key",
        "encryption.key",
        "demo.db",
        ".env",
        ".env.production",
        "keyrack.db.backup-20261208",
        "keyrack.db.partial-0badcafe",
        ".keyrack.db.import-42.tmp",
        "deploy/keyrack.db",
        "some/dir/encryption.key",
        "some/dir/.env",
        "target/release/keyrack",
        ".git/config",
        ".venv-litestream/bin/litestream",
    ] {
        assert!(
            ignored(secret),
            ".dockerignore lets {secret} into the build context"
        );
    }
    // What the build needs stays in.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "migrations/V1__users_and_sessions.sql",
        "vendor/tiny_http/src/lib.rs",
        "deploy/Dockerfile",
        "build.rs",
    ] {
        assert!(!ignored(needed), ".dockerignore leaves out {needed}");
    }
}
