//! The audit trail: who did what to which key, when. An event is written in the transaction of
//! the write it records; reveals and reads that found a key expired write nothing themselves and
//! are queued with the usage counters (`usage::UsageLog`, as `ReadEvent`s), flushed about once a
//! second (sooner when many are queued) and at a clean shutdown, folded (`fold`): repeated reads
//! of one key by one actor within a window are one row with a `count` and first and last times. An event holds ids, a provider,
//! a store and phase names: never a key, a masked key, a password, a token or an email.

use rusqlite::{params, Connection};
use serde_json::{json, Map, Value};

use super::{now, rfc3339, Result, Source, Store};

pub(crate) const KEY_CREATED: &str = "key.created";
pub(crate) const KEY_REPLACED: &str = "key.replaced";
pub(crate) const KEY_REVEALED: &str = "key.revealed";
pub(crate) const KEY_DELETED: &str = "key.deleted";
pub(crate) const KEY_MIGRATED: &str = "key.migrated";
pub(crate) const KEY_REENCRYPTED: &str = "key.reencrypted";
pub(crate) const KEY_EXPIRED: &str = "key.expired";
pub(crate) const PHASE_CHANGED: &str = "phase.changed";
pub(crate) const LOGIN_SUCCEEDED: &str = "login.succeeded";
pub(crate) const LOGIN_FAILED: &str = "login.failed";
pub(crate) const SERVICE_TOKEN_CREATED: &str = "service_token.created";
pub(crate) const SERVICE_TOKEN_REVOKED: &str = "service_token.revoked";
pub(crate) const USER_CREATED: &str = "user.created";
pub(crate) const USER_DELETED: &str = "user.deleted";
pub(crate) const PASSWORD_SET: &str = "password.set";

/// A service acting for a user through its token: the actor `service:<name>` and the token's
/// id, which every event it causes carries (a name may be used again by a later token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceActor {
    pub(crate) token_id: i64,
    /// `service:<name>`.
    pub(crate) actor: String,
}

impl ServiceActor {
    pub(crate) fn new(token_id: i64, name: &str) -> ServiceActor {
        ServiceActor {
            token_id,
            actor: format!("service:{name}"),
        }
    }
}

/// Most events one request may list.
pub(crate) const MAX_LIMIT: i64 = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) at: i64,
    pub(crate) action: &'static str,
    /// `user:<id>`, `command:<name>`, `service:<name>` or `admin`.
    pub(crate) actor: String,
    /// The service token an event was caused through.
    pub(crate) service_token_id: Option<i64>,
    pub(crate) user_id: Option<i64>,
    pub(crate) api_key_id: Option<i64>,
    pub(crate) provider: Option<String>,
    pub(crate) source: Option<&'static str>,
    /// `phase.changed`: the phases before and after.
    pub(crate) from: Option<&'static str>,
    pub(crate) to: Option<&'static str>,
}

impl Event {
    /// An event of `action` done now by `actor`.
    pub(crate) fn new(action: &'static str, actor: String) -> Event {
        Event {
            at: now(),
            action,
            actor,
            service_token_id: None,
            user_id: None,
            api_key_id: None,
            provider: None,
            source: None,
            from: None,
            to: None,
        }
    }

    /// An event of the user's own key, done by the user.
    pub(crate) fn by_user(action: &'static str, user_id: i64) -> Event {
        Event::new(action, user_actor(user_id)).user(user_id)
    }

    /// An event caused by a service (`None`: by anyone else).
    pub(crate) fn by_service(action: &'static str, service: Option<&ServiceActor>) -> Event {
        match service {
            Some(s) => {
                let mut e = Event::new(action, s.actor.clone());
                e.service_token_id = Some(s.token_id);
                e
            }
            None => Event::new(action, "admin".to_owned()),
        }
    }

    pub(crate) fn service_token(mut self, id: Option<i64>) -> Event {
        self.service_token_id = id;
        self
    }

    pub(crate) fn user(mut self, id: i64) -> Event {
        self.user_id = Some(id);
        self
    }

    /// The key: its `api_keys` id (`None` for the legacy column), provider and store.
    pub(crate) fn key(mut self, id: Option<i64>, provider: &str, source: Source) -> Event {
        self.api_key_id = id;
        self.provider = Some(provider.to_owned());
        self.source = Some(source.as_str());
        self
    }
}

pub(crate) use super::reads::ReadEvent;

pub(crate) fn user_actor(id: i64) -> String {
    format!("user:{id}")
}

pub(crate) fn command_actor(name: &str) -> String {
    format!("command:{name}")
}

/// The columns of an event, in the order `bind` gives them (macros, so that the statements are
/// put together at compile time).
macro_rules! insert_into {
    () => {
        "INSERT INTO events(at, action, actor, user_id, api_key_id, provider, source, from_phase, to_phase, service_token_id) VALUES "
    };
}
macro_rules! one_row {
    () => {
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    };
}
const FIELDS: usize = 10;

pub(crate) fn record(conn: &Connection, e: &Event) -> Result<()> {
    let mut stmt = conn.prepare_cached(concat!(insert_into!(), one_row!()))?;
    bind(&mut stmt, 0, &e.columns())?;
    stmt.raw_execute()?;
    Ok(())
}

/// One event's columns as `insert_into!` names them, borrowed from an `Event`.
struct Columns<'a> {
    at: i64,
    action: &'a str,
    actor: &'a str,
    user_id: Option<i64>,
    api_key_id: Option<i64>,
    provider: Option<&'a str>,
    source: Option<&'a str>,
    from: Option<&'a str>,
    to: Option<&'a str>,
    service_token_id: Option<i64>,
}

impl Event {
    fn columns(&self) -> Columns<'_> {
        Columns {
            at: self.at,
            action: self.action,
            actor: &self.actor,
            user_id: self.user_id,
            api_key_id: self.api_key_id,
            provider: self.provider.as_deref(),
            source: self.source,
            from: self.from,
            to: self.to,
            service_token_id: self.service_token_id,
        }
    }
}

/// Binds `e` to the parameters after the first `before` of `stmt`.
fn bind(stmt: &mut rusqlite::CachedStatement<'_>, before: usize, e: &Columns<'_>) -> Result<()> {
    let values: [&dyn rusqlite::ToSql; FIELDS] = [
        &e.at,
        &e.action,
        &e.actor,
        &e.user_id,
        &e.api_key_id,
        &e.provider,
        &e.source,
        &e.from,
        &e.to,
        &e.service_token_id,
    ];
    for (i, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(before + i + 1, v)?;
    }
    Ok(())
}

impl Store {
    /// Records an event that goes with no other write (a failed login).
    pub(crate) fn record_event(&mut self, e: Event) -> Result<()> {
        self.write(move |tx, _| record(tx, &e))
    }

    /// The most recent events matching `q`, newest first (GET /user/events, /admin/events).
    pub(crate) fn events(&mut self, q: &Query) -> Result<Vec<Recorded>> {
        self.read(|tx, _| newest_first(tx, q))
    }

    /// Removes the events older than `days` days (the server's flusher, at start and hourly).
    pub(crate) fn prune_events(&mut self, days: i64) -> Result<u64> {
        self.write_alone(|tx, _| prune(tx, days))
    }
}

/// A recorded event, as listed.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) id: i64,
    /// The first (or only) time.
    pub(crate) at: i64,
    /// How many events the row stands for (reads of one key folded: `fold`), and the last time.
    pub(crate) count: i64,
    pub(crate) last_at: i64,
    pub(crate) action: String,
    pub(crate) actor: String,
    pub(crate) user_id: Option<i64>,
    pub(crate) api_key_id: Option<i64>,
    pub(crate) provider: Option<String>,
    pub(crate) source: Option<String>,
    pub(crate) from: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) service_token_id: Option<i64>,
}

impl Recorded {
    /// The fields that apply, times in RFC 3339 (`at` and `first_at` are the first time).
    pub(crate) fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("at".into(), json!(rfc3339(self.at)));
        m.insert("first_at".into(), json!(rfc3339(self.at)));
        m.insert("last_at".into(), json!(rfc3339(self.last_at)));
        m.insert("count".into(), json!(self.count));
        m.insert("action".into(), json!(self.action));
        m.insert("actor".into(), json!(self.actor));
        let optional = [
            ("user_id", self.user_id.map(|v| json!(v))),
            ("api_key_id", self.api_key_id.map(|v| json!(v))),
            ("provider", self.provider.as_ref().map(|v| json!(v))),
            ("source", self.source.as_ref().map(|v| json!(v))),
            ("from", self.from.as_ref().map(|v| json!(v))),
            ("to", self.to.as_ref().map(|v| json!(v))),
            ("service_token_id", self.service_token_id.map(|v| json!(v))),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        Value::Object(m)
    }

    /// One line for a person.
    pub(crate) fn to_text(&self) -> String {
        let mut line = format!("{} {} {}", rfc3339(self.at), self.action, self.actor);
        if self.count != 1 || self.last_at != self.at {
            line.push_str(&format!(
                " count={} last_at={}",
                self.count,
                rfc3339(self.last_at)
            ));
        }
        if let Some(v) = self.user_id {
            line.push_str(&format!(" user_id={v}"));
        }
        if let Some(v) = self.api_key_id {
            line.push_str(&format!(" api_key_id={v}"));
        }
        if let Some(v) = self.service_token_id {
            line.push_str(&format!(" service_token_id={v}"));
        }
        for (k, v) in [
            ("provider", &self.provider),
            ("source", &self.source),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(v) = v {
                line.push_str(&format!(" {k}={}", crate::logging::printable(v)));
            }
        }
        line
    }
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query {
    pub(crate) user_id: Option<i64>,
    /// Events (folded rows) whose last time is at or after this.
    pub(crate) since: Option<i64>,
    /// The most recent `limit` events.
    pub(crate) limit: i64,
}

/// The most recent `q.limit` events matching `q`, newest first.
pub(crate) fn newest_first(conn: &Connection, q: &Query) -> Result<Vec<Recorded>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at, action, actor, user_id, api_key_id, provider, source, from_phase, to_phase,
                count, COALESCE(last_at, at), service_token_id
         FROM events
         WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR COALESCE(last_at, at) >= ?2)
         ORDER BY id DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![q.user_id, q.since, q.limit], |r| {
        Ok(Recorded {
            id: r.get(0)?,
            at: r.get(1)?,
            action: r.get(2)?,
            actor: r.get(3)?,
            user_id: r.get(4)?,
            api_key_id: r.get(5)?,
            provider: r.get(6)?,
            source: r.get(7)?,
            from: r.get(8)?,
            to: r.get(9)?,
            count: r.get(10)?,
            last_at: r.get(11)?,
            service_token_id: r.get(12)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes the events (folded rows: their last time) older than `days` days. Returns how many
/// went.
pub(crate) fn prune(conn: &Connection, days: i64) -> Result<u64> {
    let cutoff = now() - days.saturating_mul(86_400);
    Ok(conn
        .prepare_cached("DELETE FROM events WHERE at < ?1 AND COALESCE(last_at, at) < ?1")?
        .execute([cutoff])? as u64)
}

/// The audit trail's size: its rows, and the bytes of its table and indexes in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Size {
    pub(crate) rows: i64,
    pub(crate) bytes: i64,
}

/// The audit trail's size (`status`, `/metrics`). The bytes are the pages SQLite's `dbstat`
/// counts for the table and its indexes.
pub(crate) fn size(conn: &Connection) -> Result<Size> {
    let rows = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    let bytes = conn.query_row(
        "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat('main', 1)
         WHERE name = 'events' OR name IN
               (SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events')",
        [],
        |r| r.get(0),
    )?;
    Ok(Size { rows, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DbLocation;
    use crate::db::{self, Database};

    #[test]
    fn records_lists_newest_first_filters_and_prunes() {
        let db = Database::new(&DbLocation::Memory).unwrap();
        let mut conn = db.connect().unwrap();
        db::migrate_schema(&mut conn).unwrap();
        let mut old = Event::by_user(KEY_CREATED, 1).key(Some(7), "openai", Source::Table);
        old.at = now() - 3 * 86_400;
        record(&conn, &old).unwrap();
        record(&conn, &Event::by_user(KEY_REVEALED, 2)).unwrap();
        let mut phase = Event::new(PHASE_CHANGED, command_actor("migrate"));
        phase.from = Some("legacy");
        phase.to = Some("dual");
        record(&conn, &phase).unwrap();

        let all = newest_first(
            &conn,
            &Query {
                limit: 10,
                ..Query::default()
            },
        )
        .unwrap();
        let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, [PHASE_CHANGED, KEY_REVEALED, KEY_CREATED]);
        assert_eq!(
            all[0].to_json(),
            json!({"id": 3, "at": rfc3339(phase.at), "first_at": rfc3339(phase.at),
                   "last_at": rfc3339(phase.at), "count": 1, "action": "phase.changed",
                   "actor": "command:migrate", "from": "legacy", "to": "dual"})
        );
        let one = newest_first(
            &conn,
            &Query {
                user_id: Some(1),
                limit: 10,
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(
            one[0].to_text(),
            format!(
                "{} key.created user:1 user_id=1 api_key_id=7 provider=openai source=api_keys",
                rfc3339(old.at)
            )
        );
        assert_eq!(prune(&conn, 2).unwrap(), 1);
        assert_eq!(
            newest_first(
                &conn,
                &Query {
                    limit: 10,
                    ..Query::default()
                }
            )
            .unwrap()
            .len(),
            2
        );
    }
}
