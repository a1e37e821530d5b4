//! Fixtures files (docs/commands.md, "Fixtures files"): users with passwords (or ready argon2id hashes),
//! a legacy column key, and table keys, loaded all or nothing in one transaction. Passwords are
//! hashed on every core; a top-level `"phase": "legacy"` makes a new database a legacy system.

use serde::Deserialize;
use std::path::Path;

use crate::app::App;
use crate::auth;
use crate::domain::{ApiKey, Email, Invalid, KeyName, Password, Provider};
use crate::phase::Phase;
use crate::progress::Progress;
use crate::store::keys::NewKey;
use crate::store::{meta, seed, users, StoreError};
use crate::Failure;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// `legacy`: the new database starts in phase legacy (a system to rehearse `migrate` on).
    phase: Option<String>,
    users: Vec<RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    email: String,
    password: Option<String>,
    /// A ready argon2id PHC string, in place of `password` (no hashing at load time).
    password_hash: Option<String>,
    openai_api_key: Option<String>,
    #[serde(default)]
    api_keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    provider: Option<String>,
    api_key: String,
    name: Option<String>,
    is_default: Option<bool>,
}

struct User {
    email: Email,
    password_hash: String,
    column_key: Option<ApiKey>,
    keys: Vec<NewKey>,
}

fn at(i: usize, e: Invalid) -> Failure {
    Failure::Config(format!("fixtures: users[{i}].{}: {}", e.field, e.message))
}

/// How a user's password arrives: to be hashed, or hashed already.
enum Pass {
    Plain(Password),
    Hashed(String),
}

/// A ready hash must be an argon2id PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
fn check_phc(raw: &str) -> Result<String, Invalid> {
    let not_phc = || {
        Invalid::new(
            "password_hash",
            "is not an argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash)",
        )
    };
    let parsed = argon2::PasswordHash::new(raw).map_err(|_| not_phc())?;
    if parsed.algorithm.as_str() != "argon2id" || parsed.hash.is_none() {
        return Err(not_phc());
    }
    Ok(raw.to_owned())
}

/// Hashes the passwords on every core (the hash slots of `auth` keep it to one per core),
/// showing progress on a terminal. Order is kept.
fn hash_all(passes: Vec<Pass>) -> Result<Vec<String>, Failure> {
    let n = passes.len();
    let to_hash = passes
        .iter()
        .filter(|p| matches!(p, Pass::Plain(_)))
        .count() as u64;
    let progress = Progress::new("load-fixtures (hashing passwords)", to_hash);
    let done = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
    let chunk = n.div_ceil(threads).max(1);
    let hashed: Vec<Result<Vec<String>, Failure>> = std::thread::scope(|s| {
        let handles: Vec<_> = passes
            .chunks(chunk)
            .map(|part| {
                let (done, progress) = (&done, &progress);
                s.spawn(move || {
                    part.iter()
                        .map(|p| match p {
                            Pass::Hashed(h) => Ok(h.clone()),
                            Pass::Plain(pw) => {
                                let h = auth::hash_password(pw).map_err(|e| {
                                    Failure::Runtime(format!("password hashing failed: {e}"))
                                })?;
                                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                                if d % 20 == 0 {
                                    progress.update(d);
                                }
                                Ok(h)
                            }
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Failure::Runtime("password hashing failed".into())))
            })
            .collect()
    });
    if to_hash >= 20 {
        progress.update(done.load(Ordering::Relaxed));
        progress.finish();
    }
    let mut out = Vec::with_capacity(n);
    for part in hashed {
        out.extend(part?);
    }
    Ok(out)
}

fn parse(path: &Path) -> Result<(Option<Phase>, Vec<User>), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Config(format!("fixtures: cannot read {}: {e}", path.display())))?;
    let file: File = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(
        &text,
    ))
    .map_err(|e| {
        Failure::Config(format!(
            "fixtures: {} is not a valid fixtures file: {}",
            path.display(),
            describe_parse_error(&e)
        ))
    })?;
    let phase = match file.phase.as_deref() {
        None => None,
        Some("legacy") => Some(Phase::Legacy),
        Some(_) => {
            return Err(Failure::Config(format!(
                "fixtures: {}: phase must be \"legacy\" (a new database starts in phase legacy) or absent",
                path.display()
            )))
        }
    };
    let mut passes = Vec::with_capacity(file.users.len());
    let users: Vec<User> = file
        .users
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let pass = match (&u.password, &u.password_hash) {
                (Some(p), None) => Pass::Plain(Password::parse(p).map_err(|e| at(i, e))?),
                (None, Some(h)) => Pass::Hashed(check_phc(h).map_err(|e| at(i, e))?),
                _ => {
                    return Err(at(
                        i,
                        Invalid::new("password", "give exactly one of password and password_hash"),
                    ))
                }
            };
            passes.push(pass);
            let keys = u
                .api_keys
                .iter()
                .map(|k| {
                    Ok(NewKey {
                        provider: Provider::parse_or_default(k.provider.as_deref())?,
                        key: ApiKey::parse(&k.api_key)?,
                        name: k.name.as_deref().map(KeyName::parse).transpose()?,
                        is_default: k.is_default,
                        expires_at: None,
                    })
                })
                .collect::<Result<Vec<_>, Invalid>>()
                .map_err(|e| at(i, e))?;
            Ok(User {
                email: Email::parse(&u.email).map_err(|e| at(i, e))?,
                password_hash: String::new(),
                column_key: u
                    .openai_api_key
                    .as_deref()
                    .map(ApiKey::parse)
                    .transpose()
                    .map_err(|e| at(i, e))?,
                keys,
            })
        })
        .collect::<Result<_, Failure>>()?;
    // Every value is checked before the first password is hashed.
    let hashes = hash_all(passes)?;
    let users = users
        .into_iter()
        .zip(hashes)
        .map(|(u, password_hash)| User { password_hash, ..u })
        .collect();
    Ok((phase, users))
}

/// Where a fixtures file went wrong: the line and the field, never a value from the file (it
/// holds passwords and keys, and serde's own messages quote the value they met).
fn describe_parse_error(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    use serde_json::error::Category;
    let inner = e.inner();
    let line = inner.line();
    let path = e.path().to_string();
    let field = if path == "." {
        "the file".to_owned()
    } else {
        path
    };
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            format!("line {line}: not valid JSON near {field}")
        }
        Category::Data => {
            let msg = inner.to_string();
            // These two name a field of the format, never a value.
            if msg.starts_with("missing field") || msg.starts_with("unknown field") {
                let what = msg.split(" at line ").next().unwrap_or(&msg);
                let what = what.split(", expected").next().unwrap_or(what);
                format!("line {line}: {field}: {what}")
            } else {
                let expected = msg
                    .split(", expected ")
                    .nth(1)
                    .and_then(|rest| rest.split(" at line ").next())
                    .map(|x| format!(" (expected {x})"))
                    .unwrap_or_default();
                format!("line {line}: {field} has the wrong type or value{expected}")
            }
        }
    }
}

/// Loads a fixtures file, all or nothing. Returns the number of users loaded.
pub fn load(app: &App, path: &Path) -> Result<usize, Failure> {
    let (wanted_phase, users) = parse(path)?;
    let mut store = app.store()?;
    let n = users.len();
    // The user being inserted, to name its email if it is taken.
    let mut at = None;
    store
        .write_alone(|tx, ctx| {
            if let Some(p) = wanted_phase {
                if meta::user_count(tx)? > 0 && meta::phase(tx)? != p {
                    return Err(StoreError::PhaseConflict(format!(
                        "fixtures: \"phase\": \"{p}\" is for a new database, and this one already holds users in phase {}; nothing was loaded",
                        meta::phase(tx)?
                    )));
                }
                meta::set_phase(tx, p, "load-fixtures")?;
                // In phase legacy the column is the truth: nobody is pending a backfill.
                meta::backfill_clear(tx, false)?;
            }
            let phase = meta::phase(tx)?;
            let progress = Progress::new("load-fixtures (writing)", users.len() as u64);
            let mut written = 0u64;
            for u in &users {
                at = Some(&u.email);
                let user = users::insert_user(
                    tx,
                    &u.email,
                    &u.password_hash,
                    Some("command:load-fixtures"),
                )?;
                if let Some(k) = &u.column_key {
                    seed::legacy_key(tx, ctx.ring, phase, user.id, k)?;
                }
                for k in &u.keys {
                    seed::table_key(tx, ctx.ring, user.id, k)?;
                }
                written += 1;
                if written % 500 == 0 {
                    progress.update(written);
                }
            }
            if written >= 500 {
                progress.finish();
            }
            Ok(())
        })
        .map_err(|e| match (e, at) {
            (StoreError::EmailTaken, Some(email)) => Failure::Runtime(format!(
                "fixtures: the email {} is already registered; nothing was loaded",
                email.as_str()
            )),
            (e, _) => Failure::store("fixtures: loading failed, nothing was loaded", e),
        })?;
    log::info!("loaded {n} users from the fixtures file {}", path.display());
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        let e = serde_path_to_error::deserialize::<_, File>(
            &mut serde_json::Deserializer::from_str(text),
        )
        .err()
        .expect("an error");
        describe_parse_error(&e)
    }

    #[test]
    fn parse_errors_name_line_and_field_never_a_value() {
        let wrong_type = "{\"users\": [\n {\"email\": \"a@b.c\",\n  \"password\": \"hunter2hunter2\",\n  \"api_keys\": [{\"api_key\": \"sk-secret-0123456789\", \"is_default\": \"sk-secret-0123456789\"}]}]}";
        let m = error_of(wrong_type);
        assert_eq!(
            m,
            "line 4: users[0].api_keys[0].is_default has the wrong type or value (expected a boolean)"
        );
        let m = error_of("{\"users\": [{\"email\": \"a@b.c\", \"password\": 12345678}]}");
        assert!(
            m.starts_with("line 1: users[0].password has the wrong type"),
            "{m}"
        );
        assert!(!m.contains("12345678"), "{m}");
        // `password` or `password_hash`: which one is missing is checked after parsing.
        let m = error_of("{\"users\": [{\"password\": \"hunter2hunter2\"}]}");
        assert!(m.contains("missing field `email`"), "{m}");
        let m = error_of(
            "{\"users\": [\n{\"email\": \"a@b.c\", \"password\": \"sk-secret-0123456789}]}",
        );
        assert!(m.starts_with("line 2: not valid JSON"), "{m}");
        assert!(!m.contains("secret"), "{m}");
        let m = error_of("{\"users\": [{\"email\": \"a@b.c\", \"pasword\": \"x\"}]}");
        assert!(m.contains("unknown field `pasword`"), "{m}");
        assert!(!m.contains("\"x\""), "{m}");
    }
}
