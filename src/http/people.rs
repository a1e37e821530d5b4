//! The routes of applications and people: a service's own user routes (`/service/users/{user}`
//! itself; its key routes share their handlers with `/user/*` in `routes.rs`), the operator's
//! service tokens and users (`/admin/service-tokens`, `/admin/users`), and
//! `POST /auth/set-password` (an invite's link).

use serde_json::json;

use super::api::{ApiError, Incoming, Reply};
use super::principal::{self, no_such_user, Principal};
use super::routes::{check_admin, events_limit, expires_at_field};
use crate::app::App;
use crate::auth;
use crate::domain::{Email, ExternalId, Password, Scope, TokenName};
use crate::store::inspect::UserRef;
use crate::store::people::UserQuery;
use crate::store::{rfc3339, Store};

/// GET /service/users/{user}.
pub(super) fn service_get_user(
    _: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let Principal::Service { user, .. } = principal::service(store, req, params, Scope::Read)?
    else {
        return Err(ApiError::internal());
    };
    let person = store.person(&user)?.ok_or_else(no_such_user)?;
    crate::logging::set_user(person.id);
    Ok(Reply::json(200, json!({"user": person.short_json()})))
}

/// PUT /service/users/ext:{external_id} `{"email"}`: creates the user (201) or changes their
/// email (200). Only an `ext:` selector names a user here.
pub(super) fn service_put_user(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let Principal::Service { actor, user, .. } =
        principal::service(store, req, params, Scope::Write)?
    else {
        return Err(ApiError::internal());
    };
    let UserRef::External(ext) = user else {
        return Err(ApiError::invalid_request(
            "user: PUT creates or changes a user by its external id: ext:<external id>",
        ));
    };
    super::routes::within_service_rate(app, Some(&actor))?;
    let ext = ExternalId::parse(&ext)?;
    let body = req.json()?;
    let email = Email::parse(body.required_str("email")?)?;
    let (created, is_new) = store.put_external_user(&ext, &email, Some(&actor))?;
    crate::logging::set_user(created.id);
    Ok(Reply::json(
        if is_new { 201 } else { 200 },
        json!({"user": {"id": created.id, "email": created.email, "external_id": ext.as_str()}}),
    ))
}

/// DELETE /service/users/{user}: as `keyrack delete-user`.
pub(super) fn service_delete_user(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let Principal::Service { actor, user, .. } =
        principal::service(store, req, params, Scope::Write)?
    else {
        return Err(ApiError::internal());
    };
    super::routes::within_service_rate(app, Some(&actor))?;
    if !store.delete_user(&user, Some(&actor))? {
        return Err(no_such_user());
    }
    Ok(Reply::no_content())
}

/// GET /admin/service-tokens.
pub(super) fn admin_service_tokens(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    check_admin(app, req)?;
    let list = store.service_tokens()?;
    Ok(Reply::json(
        200,
        json!({"service_tokens": list.iter().map(|t| t.to_json()).collect::<Vec<_>>()}),
    ))
}

/// POST /admin/service-tokens `{"name","scope"?,"expires_at"?}`: the token, shown this once.
pub(super) fn admin_create_service_token(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    check_admin(app, req)?;
    let body = req.json()?;
    let name = TokenName::parse(body.required_str("name")?)?;
    let scope = Scope::parse(body.optional_str("scope")?.unwrap_or("read"))?;
    let expires_at = expires_at_field(&body)?.map(crate::domain::ExpiresAt::secs);
    let token = auth::new_service_token();
    let info = store.create_service_token(
        &name,
        scope,
        expires_at,
        &auth::token_hash(token.expose()),
        "admin",
    )?;
    Ok(Reply::of_secret(
        201,
        &json!({"token": token.expose(), "service_token": info.to_json()}),
        token.expose(),
    ))
}

/// DELETE /admin/service-tokens/{name}: revokes it.
pub(super) fn admin_revoke_service_token(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    check_admin(app, req)?;
    let name = params.first().copied().unwrap_or_default();
    match store.revoke_service_token(name, "admin")? {
        Some(_) => Ok(Reply::no_content()),
        None => Err(ApiError::new(
            404,
            "not_found",
            "no service token that is not revoked has this name",
        )),
    }
}

/// GET /admin/users[?query=TEXT][&limit=N].
pub(super) fn admin_users(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    check_admin(app, req)?;
    let q = UserQuery {
        text: req
            .query_param("query")
            .filter(|q| !q.is_empty())
            .map(str::to_owned),
        limit: Some(events_limit(req)?),
    };
    let list = store.users(&q)?;
    Ok(Reply::json(
        200,
        json!({"users": list.iter().map(|p| p.to_json()).collect::<Vec<_>>()}),
    ))
}

/// POST /auth/set-password `{"token","password"}`: uses an invite, answers as a login.
pub(super) fn set_password(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    let body = req.json()?;
    let invite = auth::token_hash(body.required_str("token")?);
    let unusable =
        || ApiError::unauthorized("this link is unknown, used or expired; ask for a new one");
    if !store.invite_is_live(&invite)? {
        return Err(unusable());
    }
    let password = Password::parse(body.required_str("password")?)?;
    let hash = auth::hash_password(&password).map_err(|e| {
        log::error!("password hashing failed: {e}");
        ApiError::internal()
    })?;
    let token = auth::new_token();
    let expires_at = auth::session_expiry(app.session_ttl_secs);
    let user = store
        .use_invite(
            &invite,
            &hash,
            &auth::token_hash(token.expose()),
            expires_at,
        )?
        .ok_or_else(unusable)?;
    crate::logging::set_user(user.id);
    Ok(Reply::json(
        200,
        json!({"token": token.expose(), "token_type": "Bearer", "expires_at": rfc3339(expires_at)}),
    ))
}
