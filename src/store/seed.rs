//! Fixtures' writes: a user's keys as data written before keyrack served them, in the caller's
//! transaction (`crate::fixtures` loads a whole file in one). Sealed with the database's
//! current key like any other value; usage counters start at zero.

use rusqlite::Transaction;

use super::keys::{clear_default, column_set, default_row, insert_row, NewKey};
use super::Result;
use crate::crypto::{Binding, KeyRing};
use crate::domain::{ApiKey, ExpiresAt, KeyName, Provider};
use crate::phase::Phase;

const OPENAI: &str = Provider::OPENAI;

/// A user's OpenAI key as the application before keyrack held it: in the legacy column, or,
/// once the column is gone (phase new_only), as the default OpenAI row.
pub(crate) fn legacy_key(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    phase: Phase,
    user_id: i64,
    key: &ApiKey,
) -> Result<()> {
    if phase == Phase::NewOnly {
        let as_row = NewKey {
            provider: Provider::openai(),
            key: key.clone(),
            name: None,
            is_default: Some(true),
            expires_at: None,
        };
        table_key(tx, ring, user_id, &as_row)
    } else {
        column_key(tx, ring, user_id, key)
    }
}

/// A legacy column value, as data written before the migration (fixtures, `import-legacy`).
pub(crate) fn column_key(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    user_id: i64,
    key: &ApiKey,
) -> Result<()> {
    let sealed = ring.seal(
        Binding {
            user_id,
            provider: OPENAI,
        },
        key.expose(),
    );
    column_set(tx, user_id, Some(&sealed))
}

/// A table row. The first key of a provider becomes its default unless `is_default` says
/// otherwise for a later one.
pub(crate) fn table_key(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    user_id: i64,
    new: &NewKey,
) -> Result<()> {
    let p = new.provider.as_str();
    let has_default = default_row(tx, user_id, p)?.is_some();
    let make_default = !has_default || new.is_default == Some(true);
    if make_default && has_default {
        clear_default(tx, user_id, p)?;
    }
    let sealed = ring.seal(
        Binding {
            user_id,
            provider: p,
        },
        new.key.expose(),
    );
    insert_row(
        tx,
        user_id,
        p,
        new.name.as_ref().map(KeyName::as_str),
        &sealed,
        make_default,
        new.expires_at.map(ExpiresAt::secs),
    )?;
    Ok(())
}
