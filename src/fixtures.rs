//! Fixtures files (SPEC section 3): users with passwords, a legacy column key, and table keys,
//! loaded all or nothing in one transaction.

use serde::Deserialize;
use std::path::Path;

use crate::app::App;
use crate::auth;
use crate::domain::{ApiKey, Email, Invalid, KeyName, Password, Provider};
use crate::phase::Phase;
use crate::store::keys::{self, NewKey};
use crate::store::{meta, users, StoreError};
use crate::Failure;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    users: Vec<RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    email: String,
    password: String,
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

fn parse(path: &Path) -> Result<Vec<User>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Config(format!("fixtures: cannot read {}: {e}", path.display())))?;
    let file: File = serde_json::from_str(&text).map_err(|e| {
        Failure::Config(format!(
            "fixtures: {} is not a valid fixtures file: {e}",
            path.display()
        ))
    })?;
    file.users
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let password = Password::parse(&u.password).map_err(|e| at(i, e))?;
            let keys = u
                .api_keys
                .iter()
                .map(|k| {
                    Ok(NewKey {
                        provider: Provider::parse_or_default(k.provider.as_deref())?,
                        key: ApiKey::parse(&k.api_key)?,
                        name: k.name.as_deref().map(KeyName::parse).transpose()?,
                        is_default: k.is_default,
                    })
                })
                .collect::<Result<Vec<_>, Invalid>>()
                .map_err(|e| at(i, e))?;
            Ok(User {
                email: Email::parse(&u.email).map_err(|e| at(i, e))?,
                password_hash: auth::hash_password(&password)
                    .map_err(|e| Failure::Runtime(format!("password hashing failed: {e}")))?,
                column_key: u
                    .openai_api_key
                    .as_deref()
                    .map(ApiKey::parse)
                    .transpose()
                    .map_err(|e| at(i, e))?,
                keys,
            })
        })
        .collect()
}

/// Loads a fixtures file, all or nothing. Returns the number of users loaded.
pub fn load(app: &App, path: &Path) -> Result<usize, Failure> {
    let users = parse(path)?;
    let mut store = app.store()?;
    let n = users.len();
    store
        .write_alone(|tx, ctx| {
            let phase = meta::phase(tx)?;
            for u in &users {
                let user =
                    users::insert_user(tx, &u.email, &u.password_hash).map_err(|e| match e {
                        StoreError::EmailTaken => StoreError::PhaseConflict(format!(
                            "fixtures: the email {} is already registered; nothing was loaded",
                            u.email.as_str()
                        )),
                        e => e,
                    })?;
                if let Some(k) = &u.column_key {
                    if phase == Phase::NewOnly {
                        let as_row = NewKey {
                            provider: Provider::openai(),
                            key: k.clone(),
                            name: None,
                            is_default: Some(true),
                        };
                        keys::fixture_table_key(tx, ctx.ring, user.id, &as_row)?;
                    } else {
                        keys::fixture_column_key(tx, ctx.ring, user.id, k)?;
                    }
                }
                for k in &u.keys {
                    keys::fixture_table_key(tx, ctx.ring, user.id, k)?;
                }
            }
            Ok(())
        })
        .map_err(|e| match e {
            StoreError::PhaseConflict(m) => Failure::Runtime(m),
            e => Failure::Runtime(format!("fixtures: loading failed, nothing was loaded: {e}")),
        })?;
    log::info!("loaded {n} users from the fixtures file {}", path.display());
    Ok(n)
}
