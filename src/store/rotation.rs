//! `rotate-encryption-key`'s work, one batch at a time in the caller's IMMEDIATE transaction:
//! every value not sealed with the database's current key is opened and sealed again with it.

use rusqlite::{params, Transaction};

use super::events::{self as ev, Event};
use super::keys::column_set;
use super::phases::Tally;
use super::{meta, Result, Source, StoreError};
use crate::crypto::{Binding, KeyRing};
use crate::domain::Provider;

const OPENAI: &str = Provider::OPENAI;

/// The two stores a sealed value can live in, for `reseal_batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sealed {
    Table,
    Column,
}

/// Counts of one rotation batch.
#[derive(Debug, Default)]
pub(crate) struct Reseal {
    pub(crate) resealed: u64,
    pub(crate) current: u64,
    pub(crate) failed: Tally,
    /// The last row (table) or user (column) id looked at; `None` when nothing was left.
    pub(crate) last_id: Option<i64>,
}

/// One batch of `rotate-encryption-key`: re-seals, under the current key, the next `limit`
/// values of one store after id `after`. A default OpenAI row's column mirror is re-sealed with
/// it (the two stay one sealed text) and is not visited again in the column pass.
pub(crate) fn reseal_batch(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    which: Sealed,
    after: i64,
    limit: i64,
) -> Result<Reseal> {
    let column = meta::column_present(tx)?;
    let mut out = Reseal::default();
    if which == Sealed::Column && !column {
        return Ok(out);
    }
    let sql = match which {
        Sealed::Table => {
            "SELECT id, user_id, provider, sealed_key FROM api_keys WHERE id > ?1 ORDER BY id LIMIT ?2"
        }
        Sealed::Column => {
            "SELECT id, id, 'openai', openai_api_key FROM users
             WHERE id > ?1 AND openai_api_key IS NOT NULL
               AND openai_api_key IS NOT (SELECT k.sealed_key FROM api_keys k
                   WHERE k.user_id = users.id AND k.provider = 'openai' AND k.is_default = 1)
             ORDER BY id LIMIT ?2"
        }
    };
    let rows: Vec<(i64, i64, String, String)> = tx
        .prepare(sql)?
        .query_map(params![after, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    out.last_id = rows.last().map(|r| r.0);
    for (id, uid, provider, sealed) in rows {
        if ring.is_current(&sealed) {
            out.current += 1;
            continue;
        }
        let binding = Binding {
            user_id: uid,
            provider: &provider,
        };
        match ring.open(binding, &sealed) {
            Ok(plain) => {
                let new = ring.seal(binding, plain.expose());
                match which {
                    Sealed::Table => {
                        tx.execute(
                            "UPDATE api_keys SET sealed_key = ?2 WHERE id = ?1",
                            params![id, new],
                        )?;
                        if column && provider == OPENAI {
                            out.resealed += tx.execute(
                                "UPDATE users SET openai_api_key = ?2,
                                     keyrack_key_writes = keyrack_key_writes + 1
                                 WHERE id = ?1 AND openai_api_key = ?3",
                                params![uid, new, sealed],
                            )? as u64;
                        }
                    }
                    Sealed::Column => column_set(tx, uid, Some(&new))?,
                }
                let (event_id, source) = match which {
                    Sealed::Table => (Some(id), Source::Table),
                    Sealed::Column => (None, Source::Column),
                };
                ev::record(
                    tx,
                    &Event::new(
                        ev::KEY_REENCRYPTED,
                        ev::command_actor("rotate-encryption-key"),
                    )
                    .user(uid)
                    .key(event_id, &provider, source),
                )?;
                out.resealed += 1;
            }
            Err(reason) => {
                let (source_store, key_id) = match which {
                    Sealed::Table => (Source::Table, Some(id)),
                    Sealed::Column => (Source::Column, None),
                };
                let e = StoreError::KeyUnreadable {
                    user_id: uid,
                    source_store,
                    key_id,
                    reason,
                };
                log::error!("{e}");
                out.failed.add(uid);
            }
        }
    }
    Ok(out)
}
