//! Service tokens: an application's credential to read (and, with scope `write`, change) the
//! users and keys it names. Stored only as the SHA-256 of the token; checked against the
//! database on every request, so a revocation by any process is seen by every server of the
//! file at its next request.

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::events::{self, Event, ServiceActor};
use super::{is_unique_violation, now, Result, Store, StoreError};
use crate::domain::{Scope, TokenName};

/// A service token as listed: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenInfo {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) scope: Scope,
    pub(crate) created_at: i64,
    pub(crate) last_used_at: Option<i64>,
    pub(crate) expires_at: Option<i64>,
    pub(crate) revoked_at: Option<i64>,
}

impl TokenInfo {
    /// Who acts, in the events, when this token is used.
    pub(crate) fn actor(&self) -> ServiceActor {
        ServiceActor::new(self.id, &self.name)
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let t = |v: Option<i64>| v.map(super::rfc3339);
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "scope": self.scope.as_str(),
            "created_at": super::rfc3339(self.created_at),
            "last_used_at": t(self.last_used_at),
            "expires_at": t(self.expires_at),
            "revoked": self.revoked_at.is_some(),
            "revoked_at": t(self.revoked_at),
        })
    }
}

/// How often a token's `last_used_at` is written at most (seconds): a token used on every
/// request costs one write a minute, not one per request.
const TOUCH_EVERY: i64 = 60;

macro_rules! columns {
    () => {
        "id, name, scope, created_at, last_used_at, expires_at, revoked_at, token_hash"
    };
}
const COLUMNS: &str = columns!();
/// The token of a hash (`live`): a constant, so the request path formats no SQL.
const LIVE: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM service_tokens WHERE token_hash = ?1"
);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(TokenInfo, Vec<u8>)> {
    let scope: String = r.get(2)?;
    Ok((
        TokenInfo {
            id: r.get(0)?,
            name: r.get(1)?,
            // The table's CHECK allows only these two.
            scope: if scope == "write" {
                Scope::Write
            } else {
                Scope::Read
            },
            created_at: r.get(3)?,
            last_used_at: r.get(4)?,
            expires_at: r.get(5)?,
            revoked_at: r.get(6)?,
        },
        r.get(7)?,
    ))
}

/// Creates a token under `name` (held by no token that is not revoked: else `NameTaken`).
pub(crate) fn create(
    tx: &Transaction<'_>,
    name: &TokenName,
    scope: Scope,
    expires_at: Option<i64>,
    token_hash: &[u8; 32],
    actor: &str,
) -> Result<TokenInfo> {
    let t = now();
    let id = tx
        .prepare_cached(
            "INSERT INTO service_tokens(name, scope, token_hash, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .insert(params![
            name.as_str(),
            scope.as_str(),
            &token_hash[..],
            t,
            expires_at
        ])
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::NameTaken
            } else {
                e.into()
            }
        })?;
    events::record(
        tx,
        &Event::new(events::SERVICE_TOKEN_CREATED, actor.to_owned()).service_token(Some(id)),
    )?;
    Ok(TokenInfo {
        id,
        name: name.as_str().to_owned(),
        scope,
        created_at: t,
        last_used_at: None,
        expires_at,
        revoked_at: None,
    })
}

/// Every token, revoked ones included, oldest first.
pub(crate) fn list(conn: &Connection) -> Result<Vec<TokenInfo>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM service_tokens ORDER BY id"))?;
    let rows = stmt.query_map([], row)?;
    Ok(rows
        .map(|r| r.map(|(info, _)| info))
        .collect::<rusqlite::Result<_>>()?)
}

/// Revokes the token that holds `name` (not yet revoked); `None` when none does.
pub(crate) fn revoke(tx: &Transaction<'_>, name: &str, actor: &str) -> Result<Option<TokenInfo>> {
    let found = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM service_tokens WHERE name = ?1 AND revoked_at IS NULL"
        ))?
        .query_row([name], row)
        .optional()?;
    let Some((mut info, _)) = found else {
        return Ok(None);
    };
    let t = now();
    tx.prepare_cached("UPDATE service_tokens SET revoked_at = ?2 WHERE id = ?1")?
        .execute(params![info.id, t])?;
    events::record(
        tx,
        &Event::new(events::SERVICE_TOKEN_REVOKED, actor.to_owned()).service_token(Some(info.id)),
    )?;
    info.revoked_at = Some(t);
    Ok(Some(info))
}

/// The live token (not revoked, not expired) whose SHA-256 is `token_hash`. The index finds
/// the row; the hash is then compared again in constant time.
pub(crate) fn live(conn: &Connection, token_hash: &[u8; 32]) -> Result<Option<TokenInfo>> {
    let found = conn
        .prepare_cached(LIVE)?
        .query_row([&token_hash[..]], row)
        .optional()?;
    let t = now();
    Ok(found.and_then(|(info, stored)| {
        let same = crate::auth::constant_time_eq(&stored, token_hash);
        let live = info.revoked_at.is_none() && info.expires_at.is_none_or(|e| e > t);
        (same && live).then_some(info)
    }))
}

/// This connection's last check of a live token, kept with SQLite's data version of the file
/// at the time (`meta::current_version_after_statement`): while the version is unchanged no
/// commit has happened, by any connection or process, so no revocation either. A read that
/// takes the token from here confirms it in its own snapshot (`confirms`, or `live` inside its
/// transaction) before it answers: a revocation is still seen at the next request.
#[derive(Debug, Default)]
pub(crate) struct TokenMemo(Option<([u8; 32], TokenInfo, u32)>);

impl TokenMemo {
    /// The kept token of this hash, if it had not expired by `now` (not yet confirmed).
    fn get(&self, token_hash: &[u8; 32], now: i64) -> Option<&TokenInfo> {
        self.0
            .as_ref()
            .filter(|(h, info, _)| h == token_hash && info.expires_at.is_none_or(|e| e > now))
            .map(|(_, info, _)| info)
    }

    /// Whether the token of this hash was live at data version `version` (the version a read's
    /// own snapshot saw) and is not expired at `now`.
    pub(crate) fn confirms(&self, token_hash: &[u8; 32], version: u32, now: i64) -> bool {
        self.get(token_hash, now).is_some() && self.0.as_ref().is_some_and(|k| k.2 == version)
    }
}

impl Store {
    /// The live service token of a request's bearer token (its SHA-256). With `kept`, the
    /// connection's last check may answer (`TokenMemo`): then the caller's read must confirm it
    /// (`Who::Named` reads do). Its `last_used_at` is written when it is older than a minute.
    pub(crate) fn service_token(
        &mut self,
        token_hash: &[u8; 32],
        kept: bool,
    ) -> Result<Option<TokenInfo>> {
        let t = now();
        if kept {
            if let Some(info) = self.token_memo.get(token_hash, t) {
                if info.last_used_at.is_some_and(|u| u + TOUCH_EVERY > t) {
                    return Ok(Some(info.clone()));
                }
            }
        }
        let found = live(&self.conn, token_hash)?;
        let version = super::meta::current_version_after_statement(&self.conn);
        self.token_memo = TokenMemo(match (&found, version) {
            (Some(info), Some(v)) => Some((*token_hash, info.clone(), v)),
            _ => None,
        });
        let Some(info) = found else {
            return Ok(None);
        };
        if info.last_used_at.is_none_or(|u| u + TOUCH_EVERY <= t) {
            let id = info.id;
            self.write(move |tx, _| {
                tx.prepare_cached(
                    "UPDATE service_tokens SET last_used_at = ?2
                     WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
                )?
                .execute(params![id, t])?;
                Ok(())
            })?;
        }
        Ok(Some(info))
    }

    /// Checks the token again (and keeps the check): true when it is live and the database is
    /// still at data version `version` (the version a read just saw).
    pub(crate) fn token_live_at(&mut self, token_hash: &[u8; 32], version: u32) -> Result<bool> {
        let found = live(&self.conn, token_hash)?;
        let after = super::meta::current_version_after_statement(&self.conn);
        let (memo, confirmed) = match (found, after) {
            (Some(info), Some(a)) => (Some((*token_hash, info, a)), a == version),
            _ => (None, false),
        };
        self.token_memo = TokenMemo(memo);
        Ok(confirmed)
    }

    pub(crate) fn create_service_token(
        &mut self,
        name: &TokenName,
        scope: Scope,
        expires_at: Option<i64>,
        token_hash: &[u8; 32],
        actor: &str,
    ) -> Result<TokenInfo> {
        let (name, hash, actor) = (name.clone(), *token_hash, actor.to_owned());
        self.write(move |tx, _| create(tx, &name, scope, expires_at, &hash, &actor))
    }

    pub(crate) fn service_tokens(&mut self) -> Result<Vec<TokenInfo>> {
        self.read(|tx, _| list(tx))
    }

    pub(crate) fn revoke_service_token(
        &mut self,
        name: &str,
        actor: &str,
    ) -> Result<Option<TokenInfo>> {
        let (name, actor) = (name.to_owned(), actor.to_owned());
        self.write(move |tx, _| revoke(tx, &name, &actor))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::{EncryptionKey, KeyRing};
    use crate::db::{self, Database};
    use crate::domain::{ApiKey, Email, Provider};
    use crate::store::inspect::UserRef;
    use crate::store::keys::{DefaultKey, Who};
    use crate::store::Shared;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// A connection that kept its check of a token answers no read for it once another
    /// connection has revoked it, whatever the path the read takes (one statement, or a
    /// snapshot of its own), and a kept check expires with the token.
    #[test]
    fn a_kept_token_check_never_outlives_a_revocation() -> TestResult {
        let dir = tempfile::tempdir()?;
        let db = Database::new(&crate::config::DbLocation::File(dir.path().join("k.db")))?;
        let mut conn = db.connect()?;
        db::migrate_schema(&mut conn)?;
        let ring = Arc::new(KeyRing::new(EncryptionKey::generate(), vec![]));
        let mut store = Store::new(conn, ring, Arc::new(Shared::default()));
        let other = db.connect()?;
        let user = store.create_user(&Email::parse("a@x.org")?, "h")?;
        let openai = Provider::openai();
        store.set_default_key(
            user.id,
            None,
            &openai,
            &ApiKey::parse("sk-0123456789")?,
            None,
        )?;
        let hash = [9u8; 32];
        let info = store.create_service_token(
            &TokenName::parse("app")?,
            Scope::Read,
            None,
            &hash,
            "admin",
        )?;
        let actor = info.actor();
        let named = UserRef::Id(user.id);
        let reveal = |store: &mut Store| {
            store.service_token(&hash, true).and_then(|_| {
                store.get_default_key(Who::Named(&named, &actor, &hash), &openai, false)
            })
        };
        for _ in 0..3 {
            assert!(matches!(reveal(&mut store)?, Some(DefaultKey::Found(_))));
        }
        other.execute("UPDATE service_tokens SET revoked_at = 1", [])?;
        for _ in 0..3 {
            assert!(matches!(reveal(&mut store), Err(StoreError::TokenNotLive)));
        }
        // The kept check itself: only at the version it was made at, and not past the expiry.
        let memo = TokenMemo(Some((
            hash,
            TokenInfo {
                expires_at: Some(100),
                ..info
            },
            5,
        )));
        assert!(memo.confirms(&hash, 5, 99));
        assert!(!memo.confirms(&hash, 6, 99));
        assert!(!memo.confirms(&hash, 5, 100));
        assert!(!memo.confirms(&[1; 32], 5, 99));
        Ok(())
    }
}
