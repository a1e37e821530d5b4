//! `keyrack service-token create|list|revoke`: an application's tokens. A token is printed once,
//! alone on its line, and stored only as its SHA-256. No encryption key is needed.

use serde_json::json;

use crate::commands::{db_err, immediate, store_err};
use crate::config::Config;
use crate::domain::{ExpiresAt, Scope, TokenName};
use crate::people::open_without_key;
use crate::store::events::command_actor;
use crate::store::service_tokens::{self, TokenInfo};
use crate::store::{now, rfc3339, StoreError};
use crate::Failure;

/// `service-token create NAME [--scope read|write] [--expires RFC3339]`.
pub fn create(
    config: &Config,
    name: &str,
    scope: Option<&str>,
    expires: Option<&str>,
) -> Result<(), Failure> {
    let name =
        TokenName::parse(name).map_err(|e| Failure::Config(format!("NAME: {}", e.message)))?;
    let scope = Scope::parse(scope.unwrap_or("read"))
        .map_err(|e| Failure::Config(format!("--scope: {}", e.message)))?;
    let expires_at = expires
        .map(|raw| ExpiresAt::parse(raw, now()).map(ExpiresAt::secs))
        .transpose()
        .map_err(|e| Failure::Config(format!("--expires: {}", e.message)))?;
    let mut conn = open_without_key(config)?;
    let token = crate::auth::new_service_token();
    let tx = immediate(&mut conn)?;
    let info = match service_tokens::create(
        &tx,
        &name,
        scope,
        expires_at,
        &crate::auth::token_hash(token.expose()),
        &command_actor("service-token"),
    ) {
        Err(StoreError::NameTaken) => {
            return Err(Failure::Runtime(format!(
                "a service token named {} exists and is not revoked; revoke it first or choose \
                 another name",
                name.as_str()
            )))
        }
        other => other.map_err(store_err)?,
    };
    tx.commit().map_err(db_err)?;
    log::info!(
        "service token {} (id {}, scope {}) created",
        info.name,
        info.id,
        info.scope.as_str()
    );
    println!("{}", token.expose());
    Ok(())
}

fn text(t: &TokenInfo) -> String {
    let time = |v: Option<i64>, none: &str| v.map(rfc3339).unwrap_or_else(|| none.to_owned());
    format!(
        "{:>4}  {}  {}  created={}  last_used={}  expires={}  {}",
        t.id,
        t.name,
        t.scope.as_str(),
        rfc3339(t.created_at),
        time(t.last_used_at, "never"),
        time(t.expires_at, "never"),
        match t.revoked_at {
            Some(at) => format!("revoked={}", rfc3339(at)),
            None => "live".to_owned(),
        }
    )
}

/// `service-token list [--json]`: never the token.
pub fn list(config: &Config, as_json: bool) -> Result<(), Failure> {
    let conn = open_without_key(config)?;
    let list = service_tokens::list(&conn).map_err(store_err)?;
    if as_json {
        println!(
            "{}",
            json!({"service_tokens": list.iter().map(TokenInfo::to_json).collect::<Vec<_>>()})
        );
    } else {
        for t in &list {
            println!("{}", text(t));
        }
        println!("{} service tokens", list.len());
    }
    Ok(())
}

/// `service-token revoke NAME`: from the next request on, on every server of the file.
pub fn revoke(config: &Config, name: &str) -> Result<(), Failure> {
    let mut conn = open_without_key(config)?;
    let tx = immediate(&mut conn)?;
    let revoked =
        service_tokens::revoke(&tx, name, &command_actor("service-token")).map_err(store_err)?;
    tx.commit().map_err(db_err)?;
    match revoked {
        Some(t) => {
            log::info!("service token {} (id {}) revoked", t.name, t.id);
            println!("revoked service token {} (id {})", t.name, t.id);
            Ok(())
        }
        None => Err(Failure::Runtime(format!(
            "no service token named {} that is not revoked",
            crate::logging::printable(name)
        ))),
    }
}
