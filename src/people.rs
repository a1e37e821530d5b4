//! `keyrack users`, `delete-user` and `invite`, and the database opening they share with
//! `service-token` (`service_tokens.rs`): none of them reads, checks or creates an encryption
//! key, so they open the database without settling one (no key file appears).

use std::io::Write;

use rusqlite::Connection;
use serde_json::json;

use crate::commands::{confirm, db_err, immediate, store_err};
use crate::config::Config;
use crate::db::{self, Database};
use crate::logging::printable;
use crate::store::events::{self, Event};
use crate::store::inspect::{find_user, UserRef};
use crate::store::people::{self, Person, UserQuery};
use crate::store::{now, rfc3339};
use crate::Failure;

/// The link base of `invite` when `--url` is not given.
pub const DEFAULT_INVITE_URL: &str = "http://127.0.0.1:8080";
/// How long an invite may be used (seconds) when `--ttl` is not given: 72 hours.
pub const DEFAULT_INVITE_TTL: i64 = 72 * 3600;

/// Opens the database as the other commands do (schema migrations and the start-up upgrades),
/// without the encryption key: for commands that never decrypt or seal.
pub fn open_without_key(config: &Config) -> Result<Connection, Failure> {
    let db = Database::new(&config.db)
        .map_err(|e| Failure::Runtime(format!("cannot open the database: {e}")))?
        .with_busy_timeout(config.busy_timeout);
    let mut conn = db
        .connect()
        .map_err(|e| Failure::Runtime(format!("cannot open the database: {e}")))?;
    db::migrate_schema(&mut conn)
        .map_err(|e| Failure::Runtime(format!("cannot apply schema migrations: {e}")))?;
    let sql = |e| Failure::store("cannot prepare the database", e);
    crate::store::phases::ensure_column_index(&conn).map_err(sql)?;
    crate::store::evidence::ensure_triggers(&conn).map_err(sql)?;
    crate::store::meta::upgrade_backfill_flag(&conn).map_err(sql)?;
    Ok(conn)
}

fn person_text(p: &Person) -> String {
    format!(
        "{:>6}  {}  ext={}  keys={}  password={}  created={}  last_login={}",
        p.id,
        printable(&p.email),
        p.external_id
            .as_deref()
            .map(printable)
            .unwrap_or("-".into()),
        p.key_count,
        if p.has_password { "yes" } else { "no" },
        rfc3339(p.created_at),
        p.last_login_at.map(rfc3339).unwrap_or("never".into()),
    )
}

/// `keyrack users [--query TEXT] [--json]`.
pub fn users(config: &Config, query: Option<&str>, as_json: bool) -> Result<(), Failure> {
    let conn = open_without_key(config)?;
    let list = people::list(
        &conn,
        &UserQuery {
            text: query.filter(|q| !q.is_empty()).map(str::to_owned),
            limit: None,
        },
    )
    .map_err(store_err)?;
    if as_json {
        println!(
            "{}",
            json!({"users": list.iter().map(Person::to_json).collect::<Vec<_>>()})
        );
    } else {
        for p in &list {
            println!("{}", person_text(p));
        }
        println!("{} users", list.len());
    }
    Ok(())
}

fn unknown_user(who: &str) -> Failure {
    Failure::Runtime(format!(
        "no user {} (give a user id, an email or ext:<external id>)",
        printable(who.trim())
    ))
}

/// `keyrack delete-user USER [--yes]`: the user, every key of theirs in every store, their
/// sessions, invites and pending usage go; their events stay (ids, never an email).
pub fn delete_user(config: &Config, who: &str, yes: bool) -> Result<(), Failure> {
    let mut conn = open_without_key(config)?;
    let user = find_user(&conn, &UserRef::parse(who))
        .map_err(store_err)?
        .ok_or_else(|| unknown_user(who))?;
    confirm(
        yes,
        "delete",
        &format!(
            "This deletes user {} ({}) with every key of theirs",
            user.id,
            printable(&user.email)
        ),
        "delete-user",
    )?;
    let tx = immediate(&mut conn)?;
    let gone = people::delete(
        &tx,
        user.id,
        Event::new(events::USER_DELETED, events::command_actor("delete-user")),
    )
    .map_err(store_err)?;
    tx.commit().map_err(db_err)?;
    if !gone {
        return Err(unknown_user(who));
    }
    log::info!("user {}: deleted by delete-user", user.id);
    println!("deleted user {} and every key of theirs", user.id);
    Ok(())
}

/// What `invite` is asked for.
pub enum InviteWho<'a> {
    One(&'a str),
    WithoutPassword { json: bool },
}

/// `keyrack invite USER [--url BASE] [--ttl SECONDS]` and `invite --without-password [--json]`:
/// one-time links `BASE/#set-password=<token>`; only the token's hash is stored.
pub fn invite(
    config: &Config,
    who: InviteWho<'_>,
    url: Option<&str>,
    ttl: Option<i64>,
) -> Result<(), Failure> {
    let ttl = ttl.unwrap_or(DEFAULT_INVITE_TTL);
    if ttl <= 0 {
        return Err(Failure::Config(
            "--ttl: give a number of seconds above 0".into(),
        ));
    }
    let base = url.unwrap_or(DEFAULT_INVITE_URL).trim_end_matches('/');
    let mut conn = open_without_key(config)?;
    let targets: Vec<(i64, String, Option<String>)> = match who {
        InviteWho::One(raw) => {
            let user = find_user(&conn, &UserRef::parse(raw))
                .map_err(store_err)?
                .ok_or_else(|| unknown_user(raw))?;
            let ext = people::person(&conn, &UserRef::Id(user.id))
                .map_err(store_err)?
                .and_then(|p| p.external_id);
            vec![(user.id, user.email, ext)]
        }
        InviteWho::WithoutPassword { .. } => people::without_password(&conn)
            .map_err(store_err)?
            .into_iter()
            .map(|p| (p.id, p.email, p.external_id))
            .collect(),
    };
    let as_json = matches!(who, InviteWho::WithoutPassword { json: true });
    let expires_at = now() + ttl;
    let tx = immediate(&mut conn)?;
    let mut lines = Vec::new();
    for (id, email, ext) in &targets {
        let token = crate::auth::new_invite_token();
        people::create_invite(
            &tx,
            *id,
            &crate::auth::token_hash(token.expose()),
            expires_at,
        )
        .map_err(store_err)?;
        let link = crate::domain::Secret::new(format!("{base}/#set-password={}", token.expose()));
        lines.push(if as_json {
            crate::domain::Secret::new(
                json!({"email": email, "external_id": ext, "link": link.expose()}).to_string(),
            )
        } else {
            link
        });
    }
    tx.commit().map_err(db_err)?;
    let mut out = std::io::stdout().lock();
    for l in &lines {
        writeln!(out, "{}", l.expose())
            .map_err(|e| Failure::Runtime(format!("cannot write to stdout: {e}")))?;
    }
    log::info!(
        "invite: {} links, usable until {}",
        targets.len(),
        rfc3339(expires_at)
    );
    Ok(())
}
