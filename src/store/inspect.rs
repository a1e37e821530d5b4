//! What `keyrack inspect` shows of one user: every key in every store of the current phase,
//! where it lives, the key that sealed it, whether it opens (and why not), and what keyrack
//! would do with it next — judged by `classify`, the rule the requests and `migrate` follow.
//! Never a plaintext key: a key that opens is shown masked.

use rusqlite::{Connection, OptionalExtension};

use super::classify::{classify, Verdict};
use super::users::User;
use super::{meta, Result, Source};
use crate::crypto::{Binding, KeyRing, OpenError};
use crate::domain::{mask, Email, Provider};
use crate::phase::Phase;

/// How the operator (or a service) names a user: an id, an email or an external id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UserRef {
    Id(i64),
    Email(String),
    /// An application's id for the user (`external_id`).
    External(String),
}

impl UserRef {
    /// The USER of the commands: `ext:<external_id>`, a whole number (an id), or anything else
    /// as an email (trimmed, lowercased).
    pub(crate) fn parse(raw: &str) -> UserRef {
        if let Some(ext) = raw.strip_prefix("ext:") {
            return UserRef::External(ext.to_owned());
        }
        match raw.trim().parse::<i64>() {
            Ok(id) => UserRef::Id(id),
            Err(_) => UserRef::Email(
                Email::parse(raw)
                    .map(|e| e.as_str().to_owned())
                    .unwrap_or_else(|_| raw.trim().to_lowercase()),
            ),
        }
    }
}

/// Finds the user named by `who`.
pub(crate) fn find_user(conn: &Connection, who: &UserRef) -> Result<Option<User>> {
    let row = |r: &rusqlite::Row<'_>| {
        Ok(User {
            id: r.get(0)?,
            email: r.get(1)?,
        })
    };
    Ok(match who {
        UserRef::Id(id) => conn
            .prepare_cached("SELECT id, email FROM users WHERE id = ?1")?
            .query_row([id], row)
            .optional()?,
        UserRef::Email(e) => conn
            .prepare_cached("SELECT id, email FROM users WHERE email = ?1")?
            .query_row([e], row)
            .optional()?,
        UserRef::External(x) => conn
            .prepare_cached("SELECT id, email FROM users WHERE external_id = ?1")?
            .query_row([x], row)
            .optional()?,
    })
}

/// One stored key as `inspect` shows it.
#[derive(Debug, Clone)]
pub(crate) struct KeyReport {
    /// The `api_keys` id; `None` for the legacy column.
    pub(crate) id: Option<i64>,
    pub(crate) provider: String,
    pub(crate) name: Option<String>,
    pub(crate) is_default: bool,
    pub(crate) store: Source,
    /// The id of the encryption key that sealed the value; `None` when it is not in keyrack's
    /// sealed format.
    pub(crate) sealed_with: Option<String>,
    pub(crate) opens: bool,
    /// Why the value does not open, in words (`None` when it opens).
    pub(crate) why_not: Option<String>,
    pub(crate) masked_key: Option<String>,
    pub(crate) created_at: Option<i64>,
    pub(crate) updated_at: Option<i64>,
    pub(crate) last_used_at: Option<i64>,
    pub(crate) usage_count: i64,
    /// When the key expires (`None`: never).
    pub(crate) expires_at: Option<i64>,
    /// What keyrack does with this value next, in words.
    pub(crate) next: String,
}

#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) user: User,
    pub(crate) phase: Phase,
    /// Whether the user is still pending a backfill from phase legacy (the column wins).
    pub(crate) backfill_pending: bool,
    pub(crate) keys: Vec<KeyReport>,
}

/// Why a value does not open, for a person.
fn why(e: &OpenError) -> String {
    match e {
        OpenError::UnknownKey(id) => format!(
            "sealed with key {id}, which is not configured (add it to KEYRACK_OLD_ENCRYPTION_KEYS)"
        ),
        OpenError::Rejected => {
            "does not authenticate: tampered, or bound to another user or provider".to_owned()
        }
        OpenError::Malformed => "not in keyrack's sealed format".to_owned(),
    }
}

/// Opens `sealed` to describe it: (opens, why not, masked key).
fn describe(
    ring: &KeyRing,
    user_id: i64,
    provider: &str,
    sealed: &str,
) -> (bool, Option<String>, Option<String>) {
    match ring.open(Binding { user_id, provider }, sealed) {
        Ok(plain) => (true, None, Some(mask(plain.expose()))),
        Err(e) => (false, Some(why(&e)), None),
    }
}

/// Everything `inspect` shows of `user`, read in the caller's (read) transaction.
pub(crate) fn report(conn: &Connection, ring: &KeyRing, user: User) -> Result<Report> {
    let phase = meta::phase(conn)?;
    let pending = meta::backfill_pending(conn, user.id)?;
    let mut keys = Vec::new();
    let mut default_openai: Option<String> = None;
    let mut stmt = conn.prepare(
        "SELECT id, provider, name, sealed_key, is_default, created_at, updated_at,
                last_used_at, usage_count, expires_at
         FROM api_keys WHERE user_id = ?1 ORDER BY provider, id",
    )?;
    let mut rows = stmt.query([user.id])?;
    while let Some(r) = rows.next()? {
        let (id, provider, sealed, is_default): (i64, String, String, bool) =
            (r.get(0)?, r.get(1)?, r.get(3)?, r.get(4)?);
        if is_default && provider == Provider::OPENAI {
            default_openai = Some(sealed.clone());
        }
        let (opens, why_not, masked_key) = describe(ring, user.id, &provider, &sealed);
        let next = match (phase, opens) {
            (Phase::Legacy, _) => {
                "nothing: not used in phase legacy (kept for the next `keyrack migrate`)".to_owned()
            }
            (_, true) => "nothing: served from api_keys".to_owned(),
            (_, false) => "nothing: requests for it answer 500 key_unreadable until the user \
                           replaces it or an operator clears it"
                .to_owned(),
        };
        keys.push(KeyReport {
            id: Some(id),
            sealed_with: crate::crypto::KeyRing::sealed_with(&sealed).map(|k| k.to_string()),
            provider,
            name: r.get(2)?,
            is_default,
            store: Source::Table,
            opens,
            why_not,
            masked_key,
            created_at: Some(r.get(5)?),
            updated_at: Some(r.get(6)?),
            last_used_at: r.get(7)?,
            usage_count: r.get(8)?,
            expires_at: r.get(9)?,
            next,
        });
    }
    drop(rows);
    drop(stmt);

    let column: Option<String> = if meta::column_present(conn)? {
        conn.prepare_cached("SELECT openai_api_key FROM users WHERE id = ?1")?
            .query_row([user.id], |r| r.get(0))
            .optional()?
            .flatten()
    } else {
        None
    };
    if let Some(sealed) = column {
        let (opens, why_not, masked_key) = describe(ring, user.id, Provider::OPENAI, &sealed);
        let next = if phase == Phase::Legacy {
            "nothing: the source of truth in phase legacy".to_owned()
        } else {
            let verdict = classify(Some(&sealed), default_openai.as_deref(), pending, |s| {
                ring.open(
                    Binding {
                        user_id: user.id,
                        provider: Provider::OPENAI,
                    },
                    s,
                )
                .ok()
            });
            next_for_column(verdict).to_owned()
        };
        keys.push(KeyReport {
            id: None,
            provider: Provider::OPENAI.to_owned(),
            name: None,
            // In phase legacy the column is the default key; in phase dual it mirrors it.
            is_default: true,
            store: Source::Column,
            sealed_with: crate::crypto::KeyRing::sealed_with(&sealed).map(|k| k.to_string()),
            opens,
            why_not,
            masked_key,
            created_at: None,
            updated_at: None,
            last_used_at: None,
            usage_count: 0,
            expires_at: None,
            next,
        });
    }
    Ok(Report {
        user,
        phase,
        backfill_pending: pending,
        keys,
    })
}

/// What keyrack does next with a column value in phase dual, as `classify` judged it.
pub(crate) fn next_for_column(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::NoColumn | Verdict::InStep => {
            "nothing: the column mirrors the default OpenAI key of api_keys"
        }
        Verdict::Unmigrated => {
            "move on read: copied into api_keys at the user's next request or `keyrack migrate`"
        }
        Verdict::ColumnWins => {
            "move on read: pending backfill from legacy, it replaces the default OpenAI key of \
             api_keys (kept as an extra key) at the next request or `keyrack migrate`"
        }
        Verdict::Conflict => {
            "conflict: the column and api_keys hold different keys; reported, never resolved \
             by itself (`keyrack resolve`)"
        }
        Verdict::ColumnUnreadable => {
            "nothing: it does not open, so it stays where it is and is counted as undecryptable \
             (`keyrack clear-key --store column` removes it)"
        }
        Verdict::TableUnreadable => {
            "nothing: the default OpenAI key of api_keys does not open, so nothing moves"
        }
    }
}
