//! The page for people: its files and headers over HTTP, and every flow in a real browser
//! (headless Chromium driven by tests/browser/walk.py through WebDriver).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

const ADMIN: &str = "admin-token-for-the-browser-test";

fn security_headers(r: &Resp, what: &str) {
    let csp = r.header("Content-Security-Policy").unwrap_or("");
    assert!(csp.contains("default-src 'self'"), "{what}: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert_eq!(
        r.header("X-Content-Type-Options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(r.header("Referrer-Policy"), Some("no-referrer"), "{what}");
}

#[test]
fn the_page_and_its_files_are_served_with_the_security_headers() {
    let env = Env::new();
    let server = env.serve();
    let page = server.get("/", None);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("Content-Type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page
        .raw
        .contains(r#"<script src="/page.js" defer></script>"#));
    assert!(page
        .raw
        .contains(r#"<link rel="stylesheet" href="/page.css">"#));
    // Nothing fetched from anywhere else.
    assert!(!page.raw.contains("http://") && !page.raw.contains("https://"));
    security_headers(&page, "GET /");
    for (path, kind) in [
        ("/page.js", "text/javascript; charset=utf-8"),
        ("/page.css", "text/css; charset=utf-8"),
    ] {
        let r = server.get(path, None);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("Content-Type"), Some(kind), "{path}");
        assert!(r.raw.len() > 1000, "{path}");
        security_headers(&r, path);
    }
    // Every answer carries them, the API's and its errors included.
    security_headers(&server.get("/healthz", None), "GET /healthz");
    security_headers(&server.get("/user/me", None), "GET /user/me (401)");
    security_headers(&server.get("/nowhere", None), "GET /nowhere (404)");
    assert_eq!(server.post("/", None, serde_json::json!({})).status, 405);
}

fn chromedriver() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("chromedriver"))
        .find(|p| p.is_file())
}

/// Every flow of the page in headless Chromium, about 20 s: not part of the quick `cargo test`
/// but its own step, `make browser-test` (which installs Chromium and selenium when missing) or
/// `cargo test --test api -- --ignored`, which `.ci/run` runs after `cargo test`. Skipped with
/// one line when Chromium's driver or the selenium environment is missing;
/// KEYRACK_BROWSER_TESTS=required, or running under CI (`CI=true`, as `.ci/run` is run), turns
/// the skip into a failure.
#[test]
#[ignore = "the browser walk, about 20 s: `make browser-test`, a step of its own in CI"]
fn every_flow_of_the_page_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/browser-venv/bin/python");
    let required = std::env::var("KEYRACK_BROWSER_TESTS").as_deref() == Ok("required")
        || std::env::var("CI").as_deref() == Ok("true");
    let driver = chromedriver();
    if driver.is_none() || !python.is_file() {
        let why = if driver.is_none() {
            "chromedriver is not on PATH"
        } else {
            "target/browser-venv is missing"
        };
        assert!(!required, "CI or KEYRACK_BROWSER_TESTS=required but {why}");
        // Written past the test harness's capture, so that a plain `cargo test` shows it.
        let line = format!(
            "browser tests skipped: {why} (`make browser-test` installs Chromium and selenium, then runs them)\n"
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        return;
    }
    let env = Env::new().var("KEYRACK_ADMIN_TOKEN", ADMIN);
    let server = env.serve();
    let shots = root.join("target/browser-screenshots");
    let out = Command::new(&python)
        .arg(root.join("tests/browser/walk.py"))
        .arg(&server.base)
        .arg(ADMIN)
        .arg(&shots)
        .env("CHROMEDRIVER", driver.expect("checked above"))
        // For `keyrack invite`: the set-your-password form's link.
        .env("KEYRACK_BIN", BIN)
        .env("KEYRACK_DB", env.db())
        .output()
        .expect("run tests/browser/walk.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser walk failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.logs()
    );
    assert!(stdout.contains("all flows passed"), "{stdout}");
}
