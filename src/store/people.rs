//! People: the users listing, an application's users by their external id, deleting a user
//! with everything of theirs, and one-time invites to set a password.

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::events::{self, Event, ServiceActor};
use super::inspect::{find_user, UserRef};
use super::users::User;
use super::{is_unique_violation, meta, now, Result, Store, StoreError};
use crate::auth::NO_PASSWORD;
use crate::domain::{Email, ExternalId};
use crate::phase::Phase;

/// A user as the listings and the service routes show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Person {
    pub(crate) id: i64,
    pub(crate) email: String,
    pub(crate) external_id: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) last_login_at: Option<i64>,
    pub(crate) has_password: bool,
    /// The keys the current phase's listing shows.
    pub(crate) key_count: i64,
}

impl Person {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "email": self.email,
            "external_id": self.external_id,
            "created_at": super::rfc3339(self.created_at),
            "last_login_at": self.last_login_at.map(super::rfc3339),
            "has_password": self.has_password,
            "key_count": self.key_count,
        })
    }

    /// `{"id","email","external_id"}`, as the service routes answer.
    pub(crate) fn short_json(&self) -> serde_json::Value {
        serde_json::json!({"id": self.id, "email": self.email, "external_id": self.external_id})
    }
}

/// Which users to list.
#[derive(Debug, Clone, Default)]
pub(crate) struct UserQuery {
    /// Part of the email or of the external id.
    pub(crate) text: Option<String>,
    pub(crate) limit: Option<i64>,
}

/// The key count of the phase: the column's key in phase legacy; the table's rows otherwise,
/// and in phase dual a column key the table lacks (the listing moves it and shows it).
fn key_count_sql(phase: Phase) -> &'static str {
    match phase {
        Phase::Legacy => "(u.openai_api_key IS NOT NULL)",
        Phase::Dual => {
            "((SELECT COUNT(*) FROM api_keys k WHERE k.user_id = u.id)
              + (u.openai_api_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM api_keys d
                 WHERE d.user_id = u.id AND d.provider = 'openai' AND d.is_default = 1)))"
        }
        Phase::NewOnly => "(SELECT COUNT(*) FROM api_keys k WHERE k.user_id = u.id)",
    }
}

/// The users matching `q`, by id.
pub(crate) fn list(conn: &Connection, q: &UserQuery) -> Result<Vec<Person>> {
    let phase = meta::phase(conn)?;
    let sql = format!(
        "SELECT u.id, u.email, u.external_id, u.created_at, u.last_login_at,
                u.password_hash <> ?1, {}
         FROM users u
         WHERE ?2 IS NULL OR instr(u.email, lower(?2)) > 0 OR instr(lower(u.external_id), lower(?2)) > 0
         ORDER BY u.id LIMIT ?3",
        key_count_sql(phase)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![NO_PASSWORD, q.text, q.limit.unwrap_or(-1)], |r| {
        Ok(Person {
            id: r.get(0)?,
            email: r.get(1)?,
            external_id: r.get(2)?,
            created_at: r.get(3)?,
            last_login_at: r.get(4)?,
            has_password: r.get(5)?,
            key_count: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// One user as listed, found by `who`.
pub(crate) fn person(conn: &Connection, who: &UserRef) -> Result<Option<Person>> {
    let Some(user) = find_user(conn, who)? else {
        return Ok(None);
    };
    let phase = meta::phase(conn)?;
    let sql = format!(
        "SELECT u.id, u.email, u.external_id, u.created_at, u.last_login_at,
                u.password_hash <> ?1, {}
         FROM users u WHERE u.id = ?2",
        key_count_sql(phase)
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![NO_PASSWORD, user.id], |r| {
            Ok(Person {
                id: r.get(0)?,
                email: r.get(1)?,
                external_id: r.get(2)?,
                created_at: r.get(3)?,
                last_login_at: r.get(4)?,
                has_password: r.get(5)?,
                key_count: r.get(6)?,
            })
        })
        .optional()?)
}

/// Deletes the user and everything of theirs (keys in every store, sessions, invites, pending
/// backfill: the schema's cascades); the events stay, they hold ids and never an email. True
/// when the user existed.
pub(crate) fn delete(tx: &Transaction<'_>, user_id: i64, by: Event) -> Result<bool> {
    let n = tx
        .prepare_cached("DELETE FROM users WHERE id = ?1")?
        .execute([user_id])?;
    if n == 1 {
        events::record(tx, &by.user(user_id))?;
    }
    Ok(n == 1)
}

/// Creates the user holding `ext` (without a password) or changes their email. True when it
/// was created. An email held by another user: `EmailTaken`.
pub(crate) fn put_external(
    tx: &Transaction<'_>,
    ext: &ExternalId,
    email: &Email,
    service: Option<&ServiceActor>,
) -> Result<(User, bool)> {
    let taken = |e: rusqlite::Error| {
        if is_unique_violation(&e) {
            StoreError::EmailTaken
        } else {
            e.into()
        }
    };
    let existing: Option<i64> = tx
        .prepare_cached("SELECT id FROM users WHERE external_id = ?1")?
        .query_row([ext.as_str()], |r| r.get(0))
        .optional()?;
    let user = |id| User {
        id,
        email: email.as_str().to_owned(),
    };
    match existing {
        Some(id) => {
            tx.prepare_cached("UPDATE users SET email = ?2 WHERE id = ?1 AND email <> ?2")?
                .execute(params![id, email.as_str()])
                .map_err(taken)?;
            Ok((user(id), false))
        }
        None => {
            let id = tx
                .prepare_cached(
                    "INSERT INTO users(email, password_hash, created_at, external_id)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .insert(params![email.as_str(), NO_PASSWORD, now(), ext.as_str()])
                .map_err(taken)?;
            events::record(
                tx,
                &Event::by_service(events::USER_CREATED, service).user(id),
            )?;
            Ok((user(id), true))
        }
    }
}

/// Records an invite (the SHA-256 of its token) for `user_id`, usable until `expires_at`.
pub(crate) fn create_invite(
    tx: &Transaction<'_>,
    user_id: i64,
    token_hash: &[u8; 32],
    expires_at: i64,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO invites(token_hash, user_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![&token_hash[..], user_id, now(), expires_at])?;
    Ok(())
}

/// The users who cannot log in (no usable password), by id.
pub(crate) fn without_password(conn: &Connection) -> Result<Vec<Person>> {
    Ok(list(conn, &UserQuery::default())?
        .into_iter()
        .filter(|p| !p.has_password)
        .collect())
}

impl Store {
    /// GET /admin/users.
    pub(crate) fn users(&mut self, q: &UserQuery) -> Result<Vec<Person>> {
        self.read(|tx, _| list(tx, q))
    }

    /// GET /service/users/{user}.
    pub(crate) fn person(&mut self, who: &UserRef) -> Result<Option<Person>> {
        self.read(|tx, _| person(tx, who))
    }

    /// PUT /service/users/ext:{id}.
    pub(crate) fn put_external_user(
        &mut self,
        ext: &ExternalId,
        email: &Email,
        service: Option<&ServiceActor>,
    ) -> Result<(User, bool)> {
        let (ext, email, service) = (ext.clone(), email.clone(), service.cloned());
        self.write(move |tx, _| put_external(tx, &ext, &email, service.as_ref()))
    }

    /// DELETE /service/users/{user}: false when no such user.
    pub(crate) fn delete_user(
        &mut self,
        who: &UserRef,
        service: Option<&ServiceActor>,
    ) -> Result<bool> {
        let (who, service) = (who.clone(), service.cloned());
        self.write(move |tx, _| {
            let Some(user) = find_user(tx, &who)? else {
                return Ok(false);
            };
            delete(
                tx,
                user.id,
                Event::by_service(events::USER_DELETED, service.as_ref()),
            )
        })
    }

    /// Whether an invite with this token hash can still be used (POST /auth/set-password
    /// answers 401 before it looks at the password).
    pub(crate) fn invite_is_live(&mut self, token_hash: &[u8; 32]) -> Result<bool> {
        self.read(|tx, _| {
            Ok(tx
                .prepare_cached(
                    "SELECT 1 FROM invites
                     WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                )?
                .query_row(params![&token_hash[..], now()], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    /// POST /auth/set-password: uses an unused, unexpired invite: sets the password, ends every
    /// session of the user and their other invites, and opens a session (`session_hash`, until
    /// `session_expires_at`). `None`: no such invite.
    pub(crate) fn use_invite(
        &mut self,
        token_hash: &[u8; 32],
        password_hash: &str,
        session_hash: &[u8; 32],
        session_expires_at: i64,
    ) -> Result<Option<User>> {
        let (token_hash, hash, session) = (*token_hash, password_hash.to_owned(), *session_hash);
        self.write(move |tx, _| {
            let t = now();
            let found: Option<i64> = tx
                .prepare_cached(
                    "SELECT user_id FROM invites
                     WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                )?
                .query_row(params![&token_hash[..], t], |r| r.get(0))
                .optional()?;
            let Some(user_id) = found else {
                return Ok(None);
            };
            tx.prepare_cached(
                "UPDATE invites SET used_at = ?2 WHERE user_id = ?1 AND used_at IS NULL",
            )?
            .execute(params![user_id, t])?;
            tx.prepare_cached(
                "UPDATE users SET password_hash = ?2, last_login_at = ?3 WHERE id = ?1",
            )?
            .execute(params![user_id, hash, t])?;
            tx.prepare_cached("DELETE FROM sessions WHERE user_id = ?1")?
                .execute([user_id])?;
            tx.prepare_cached(
                "INSERT INTO sessions(token_hash, user_id, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![&session[..], user_id, t, session_expires_at])?;
            events::record(tx, &Event::by_user(events::PASSWORD_SET, user_id))?;
            let email: String = tx
                .prepare_cached("SELECT email FROM users WHERE id = ?1")?
                .query_row([user_id], |r| r.get(0))?;
            Ok(Some(User { id: user_id, email }))
        })
    }
}
