//! Accounts and sessions. Passwords arrive here already hashed, tokens as their SHA-256.

use rusqlite::{params, Connection, OptionalExtension};

use super::{is_unique_violation, now, Result, Store, StoreError};
use crate::domain::Email;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) id: i64,
    pub(crate) email: String,
}

/// What a login needs: the user and their password hash.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub(crate) user: User,
    pub(crate) password_hash: String,
}

impl Store {
    /// POST /auth/register: the new user is the actor of its `user.created`.
    pub(crate) fn create_user(&mut self, email: &Email, password_hash: &str) -> Result<User> {
        self.create_user_by(email, password_hash, None)
    }

    /// A new account; `by` names a command that made it (`command:add-user`), else the user.
    pub(crate) fn create_user_by(
        &mut self,
        email: &Email,
        password_hash: &str,
        by: Option<&str>,
    ) -> Result<User> {
        let (email, hash, by) = (
            email.clone(),
            password_hash.to_owned(),
            by.map(str::to_owned),
        );
        self.write(move |tx, _| insert_user(tx, &email, &hash, by.as_deref()))
    }

    pub(crate) fn credentials(&mut self, email: &str) -> Result<Option<Credentials>> {
        self.read(|tx, _| {
            Ok(tx
                .prepare_cached("SELECT id, email, password_hash FROM users WHERE email = ?1")?
                .query_row([email], |r| {
                    Ok(Credentials {
                        user: User {
                            id: r.get(0)?,
                            email: r.get(1)?,
                        },
                        password_hash: r.get(2)?,
                    })
                })
                .optional()?)
        })
    }

    pub(crate) fn create_session(
        &mut self,
        user_id: i64,
        token_hash: &[u8],
        expires_at: i64,
    ) -> Result<()> {
        let token_hash = token_hash.to_vec();
        self.write(move |tx, _| {
            let t = now();
            // Expired sessions of this user go at the same time, so the table does not grow.
            tx.prepare_cached("DELETE FROM sessions WHERE user_id = ?1 AND expires_at <= ?2")?
                .execute(params![user_id, t])?;
            tx.prepare_cached(
                "INSERT INTO sessions(token_hash, user_id, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![token_hash, user_id, t, expires_at])?;
            tx.prepare_cached("UPDATE users SET last_login_at = ?2 WHERE id = ?1")?
                .execute(params![user_id, t])?;
            super::events::record(
                tx,
                &super::events::Event::by_user(super::events::LOGIN_SUCCEEDED, user_id),
            )?;
            Ok(())
        })
    }

    /// The user a live session token belongs to.
    pub(crate) fn session_user(&mut self, token_hash: &[u8]) -> Result<Option<User>> {
        session_in(&self.conn, token_hash)
    }

    pub(crate) fn delete_session(&mut self, token_hash: &[u8]) -> Result<()> {
        let token_hash = token_hash.to_vec();
        self.write(move |tx, _| {
            tx.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
                .execute([token_hash])?;
            Ok(())
        })
    }
}

impl Store {
    /// Deletes every expired session (they no longer authenticate; this keeps the table from
    /// growing with sessions nobody ends). Returns how many went.
    pub(crate) fn prune_sessions(&mut self) -> Result<u64> {
        self.write_alone(|tx, _| {
            let n = tx
                .prepare_cached("DELETE FROM sessions WHERE expires_at <= ?1")?
                .execute([now()])?;
            Ok(n as u64)
        })
    }
}

impl Store {
    /// Replaces a password hash that just verified with keyrack's own (the first login of an
    /// imported account), unless it changed in the meantime. True when it was replaced.
    pub(crate) fn upgrade_password_hash(
        &mut self,
        user_id: i64,
        old: &str,
        new: &str,
    ) -> Result<bool> {
        let (old, new) = (old.to_owned(), new.to_owned());
        self.write(move |tx, _| {
            let n = tx
                .prepare_cached(
                    "UPDATE users SET password_hash = ?3 WHERE id = ?1 AND password_hash = ?2",
                )?
                .execute(params![user_id, old, new])?;
            Ok(n == 1)
        })
    }

    /// Sets the password hash of the user with `email` and ends their sessions; `None` when no
    /// user has that email.
    pub(crate) fn reset_password(
        &mut self,
        email: &Email,
        password_hash: &str,
    ) -> Result<Option<User>> {
        let (email, hash) = (email.clone(), password_hash.to_owned());
        self.write(move |tx, _| {
            let user = tx
                .prepare_cached("SELECT id, email FROM users WHERE email = ?1")?
                .query_row([email.as_str()], |r| {
                    Ok(User {
                        id: r.get(0)?,
                        email: r.get(1)?,
                    })
                })
                .optional()?;
            if let Some(u) = &user {
                tx.prepare_cached("UPDATE users SET password_hash = ?2 WHERE id = ?1")?
                    .execute(params![u.id, hash])?;
                tx.prepare_cached("DELETE FROM sessions WHERE user_id = ?1")?
                    .execute([u.id])?;
            }
            Ok(user)
        })
    }
}

/// The user a live session token belongs to, read on `conn` (in the caller's transaction, when
/// it has one: a request's session check and its read then share one snapshot). The user is
/// recorded for the request's log lines (`logging::set_user`).
pub(crate) fn session_in(conn: &Connection, token_hash: &[u8]) -> Result<Option<User>> {
    let user = conn
        .prepare_cached(
            "SELECT u.id, u.email FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_hash = ?1 AND s.expires_at > ?2",
        )?
        .query_row(params![token_hash, now()], |r| {
            Ok(User {
                id: r.get(0)?,
                email: r.get(1)?,
            })
        })
        .optional()?;
    if let Some(u) = &user {
        crate::logging::set_user(u.id);
    }
    Ok(user)
}

pub(crate) fn insert_user(
    tx: &rusqlite::Transaction<'_>,
    email: &Email,
    password_hash: &str,
    by: Option<&str>,
) -> Result<User> {
    let id = tx
        .prepare_cached("INSERT INTO users(email, password_hash, created_at) VALUES (?1, ?2, ?3)")?
        .insert(params![email.as_str(), password_hash, now()])
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::EmailTaken
            } else {
                e.into()
            }
        })?;
    super::events::record(
        tx,
        &super::events::Event::new(
            super::events::USER_CREATED,
            by.map_or_else(|| super::events::user_actor(id), str::to_owned),
        )
        .user(id),
    )?;
    Ok(User {
        id,
        email: email.as_str().to_owned(),
    })
}
