//! Who a request acts as. A user acts for themself with their session; a service acts for a
//! user it names (`/service/users/{user}`) with its token. The handlers of the key routes take a
//! `Principal` and serve `/user/*` and `/service/users/{user}/*` with one body.

use super::api::{ApiError, Incoming};
use super::routes::{bearer, invalid_token};
use crate::auth;
use crate::domain::{ExternalId, Scope};
use crate::store::events::ServiceActor;
use crate::store::inspect::UserRef;
use crate::store::keys::Who;
use crate::store::service_tokens::TokenInfo;
use crate::store::Store;

pub(super) enum Principal {
    /// The hash of a session token: the session's user, checked where the work reads.
    Session([u8; 32]),
    /// A service (its live token) acting for the user it named.
    Service {
        actor: ServiceActor,
        user: UserRef,
        /// The SHA-256 of its token.
        token: [u8; 32],
    },
}

impl Principal {
    /// What the store's reads take.
    pub(super) fn who(&self) -> Who<'_> {
        match self {
            Principal::Session(hash) => Who::Session(hash),
            Principal::Service { actor, user, token } => Who::Named(user, actor, token),
        }
    }

    /// The service acting, for the events (`None`: the user themself).
    pub(super) fn service(&self) -> Option<&ServiceActor> {
        match self {
            Principal::Session(_) => None,
            Principal::Service { actor, .. } => Some(actor),
        }
    }

    /// The answer when the read found nobody: no live session (401), or no such user (404).
    pub(super) fn not_found(&self) -> ApiError {
        match self {
            Principal::Session(_) => invalid_token(),
            Principal::Service { .. } => no_such_user(),
        }
    }

    /// The id of the user this request acts for: 401 without a live session, 404 when the
    /// user a service named does not exist.
    pub(super) fn user_id(&self, store: &mut Store) -> Result<i64, ApiError> {
        match self {
            Principal::Session(hash) => Ok(store.session_user(hash)?.ok_or_else(invalid_token)?.id),
            Principal::Service { user, token, .. } => {
                // A read route's check may have been the connection's kept one: checked again
                // here, so a revoked token never learns whether a user exists.
                if store.service_token(token, false)?.is_none() {
                    return Err(ApiError::unauthorized(
                        "the service token is invalid, expired or revoked",
                    ));
                }
                let found = store.person(user)?.ok_or_else(no_such_user)?;
                crate::logging::set_user(found.id);
                Ok(found.id)
            }
        }
    }
}

pub(super) fn no_such_user() -> ApiError {
    ApiError::new(404, "not_found", "no such user")
}

/// The live service token of the request (and its SHA-256), with at least `scope`: 401
/// without one (a session token is no service token), 403 for a `read` token on a write route.
/// With `kept`, the connection's last check of the same token may answer, and the caller's read
/// confirms it in its own snapshot (`Who::Named`).
fn service_token(
    store: &mut Store,
    req: &Incoming,
    scope: Scope,
    kept: bool,
) -> Result<(TokenInfo, [u8; 32]), ApiError> {
    let header = req
        .authorization()
        .ok_or_else(|| ApiError::unauthorized("this route needs an Authorization: Bearer token"))?;
    let token = bearer(header).ok_or_else(|| {
        ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
    })?;
    let hash = auth::token_hash(token);
    let info = store.service_token(&hash, kept)?.ok_or_else(|| {
        ApiError::unauthorized("the service token is invalid, expired or revoked")
    })?;
    if scope == Scope::Write && info.scope != Scope::Write {
        return Err(ApiError::new(
            403,
            "forbidden",
            "this service token has scope read; this route needs scope write",
        ));
    }
    Ok((info, hash))
}

/// A service route's principal: its token (401, 403), then the user it names (400).
pub(super) fn service(
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
    scope: Scope,
) -> Result<Principal, ApiError> {
    principal(store, req, params, scope, false)
}

/// `service` for the reads that confirm the token in their own snapshot (the default key, the
/// listing): the connection's last check of the token may answer first.
pub(super) fn service_reading(
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Principal, ApiError> {
    principal(store, req, params, Scope::Read, true)
}

fn principal(
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
    scope: Scope,
    kept: bool,
) -> Result<Principal, ApiError> {
    let (info, token) = service_token(store, req, scope, kept)?;
    let user = selector(params.first().copied().unwrap_or_default())?;
    Ok(Principal::Service {
        actor: info.actor(),
        user,
        token,
    })
}

/// `{user}` of a service route: `id:<n>`, `ext:<external_id>` or `email:<email>`,
/// percent-decoded; anything else 400.
pub(super) fn selector(raw: &str) -> Result<UserRef, ApiError> {
    let bad = |why: &str| {
        ApiError::invalid_request(format!(
            "user: {why}; name a user as id:<keyrack user id>, ext:<external id> or email:<email>"
        ))
    };
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad("not UTF-8 once percent-decoded"))?;
    let (kind, value) = decoded
        .split_once(':')
        .ok_or_else(|| bad("no id:, ext: or email: prefix"))?;
    match kind {
        "id" => value
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .map(UserRef::Id)
            .ok_or_else(|| bad("id: takes a whole number")),
        "ext" => ExternalId::parse(value)
            .map(|x| UserRef::External(x.as_str().to_owned()))
            .map_err(|e| bad(&e.message)),
        "email" => {
            let email = value.trim().to_lowercase();
            if email.is_empty() || email.chars().count() > crate::domain::Email::MAX_CHARS {
                return Err(bad("email: takes an email"));
            }
            Ok(UserRef::Email(email))
        }
        _ => Err(bad("unknown prefix")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        assert_eq!(selector("id:12").ok(), Some(UserRef::Id(12)));
        assert_eq!(
            selector("ext:a%2Fb%20c").ok(),
            Some(UserRef::External("a/b c".into()))
        );
        assert_eq!(
            selector("email:%20Ada@Example.com").ok(),
            Some(UserRef::Email("ada@example.com".into()))
        );
        for bad in [
            "12",
            "id:",
            "id:x",
            "id:-1",
            "ext:",
            "email:",
            "user:1",
            "ext:%FF",
            "ext:a%0Ab",
        ] {
            let e = selector(bad).err().map(|e| e.status);
            assert_eq!(e, Some(400), "{bad}");
        }
    }
}
