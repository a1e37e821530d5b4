//! `GET /metrics` decrypts nothing: its count of undecryptable values comes from a survey run
//! in the background when the database changed (`KEYRACK_METRICS_REFRESH` apart at least), also
//! when another process changed the file.

use std::time::Duration;

use crate::support::*;

const ADMIN: &str = "survey-admin-token";

/// The value of one sample line `series value` in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A value sealed with another key, written into user `id`'s row by another process.
fn garbage_row(env: &Env, user_id: i64) {
    let sealed = seal_like_keyrack(KEY_B, user_id, "anthropic", "sk-not-for-this-server");
    sql(
        &env.db(),
        &format!(
            "INSERT INTO api_keys(user_id, provider, sealed_key, is_default, created_at, updated_at)
             VALUES ({user_id}, 'anthropic', '{sealed}', 1, 0, 0)"
        ),
    );
}

/// A server with one user holding one key; the metrics text and the user's id.
fn server_with_a_key(env: &Env) -> (Server, i64) {
    let s = env.serve();
    let token = s.user("ada@example.com");
    assert_eq!(s.set_key(&token, "openai", "sk-ada-0123456789").status, 200);
    let id = s.get("/user/me", Some(&token)).body["user"]["id"]
        .as_i64()
        .expect("id");
    (s, id)
}

/// The kept count lags: within the refresh time a scrape still shows the count surveyed before
/// the change, though the row counts (read at every scrape) show the change. A scrape that
/// decrypted would count the new value at once.
#[test]
fn a_scrape_counts_rows_but_decrypts_nothing() {
    let env = Env::new()
        .var("KEYRACK_ADMIN_TOKEN", ADMIN)
        .var("KEYRACK_METRICS_REFRESH", "60");
    let (s, id) = server_with_a_key(&env);
    let scrape = || s.get("/metrics", Some(ADMIN)).raw;
    let text = scrape();
    assert_eq!(
        sample(&text, "keyrack_undecryptable_keys"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "keyrack_keys{store=\"api_keys\"}"), Some(1.0));

    garbage_row(&env, id);
    let text = scrape();
    assert_eq!(
        sample(&text, "keyrack_keys{store=\"api_keys\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keyrack_undecryptable_keys"),
        Some(0.0),
        "the scrape decrypted:\n{text}"
    );
    // The full check still decrypts.
    let r = s.get("/admin/status", Some(ADMIN));
    assert_eq!(r.body["undecryptable"].as_i64(), Some(1), "{}", r.raw);
}

/// Another process writes a value this server cannot open, then removes it: the gauge follows
/// within the (shortened) refresh time.
#[test]
fn the_undecryptable_count_follows_changes_made_by_another_process() {
    let env = Env::new()
        .var("KEYRACK_ADMIN_TOKEN", ADMIN)
        .var("KEYRACK_METRICS_REFRESH", "0.2");
    let (s, id) = server_with_a_key(&env);
    let undecryptable = || {
        sample(
            &s.get("/metrics", Some(ADMIN)).raw,
            "keyrack_undecryptable_keys",
        )
    };
    assert_eq!(undecryptable(), Some(0.0));

    garbage_row(&env, id);
    assert!(
        poll_until(Duration::from_secs(10), || undecryptable() == Some(1.0)),
        "not counted: {:?}",
        undecryptable()
    );
    sql(
        &env.db(),
        "DELETE FROM api_keys WHERE provider = 'anthropic'",
    );
    assert!(
        poll_until(Duration::from_secs(10), || undecryptable() == Some(0.0)),
        "still counted: {:?}",
        undecryptable()
    );
}
