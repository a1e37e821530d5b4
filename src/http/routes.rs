//! The router and the handlers. Handlers are thin: parse into domain types, call the store,
//! shape the JSON. They hold no SQL and no phase rules.

use serde::Serialize;
use serde_json::json;

use super::api::{ApiError, Incoming, Reply};
use super::principal::{self, Principal};
use crate::app::App;
use crate::auth;
use crate::domain::Scope;
use crate::domain::{ApiKey, Email, ExpiresAt, Invalid, KeyName, Password, Provider};
use crate::status::Status;
use crate::store::events::{self, Event};
use crate::store::keys::{DefaultKey, KeyList, KeyView, NewKey};
use crate::store::users::{Credentials, User};
use crate::store::{now, rfc3339, Store};

type Handler = fn(&App, &mut Store, &Incoming, &[&str]) -> Result<Reply, ApiError>;

/// The routes: each path with its methods. Path segments `{id}` match anything and are passed on.
const ROUTES: &[(&str, &[(&str, Handler)])] = &[
    ("/", &[("GET", super::page::index)]),
    ("/page.css", &[("GET", super::page::css)]),
    ("/page.js", &[("GET", super::page::js)]),
    ("/healthz", &[("GET", healthz)]),
    ("/openapi.yaml", &[("GET", openapi)]),
    ("/auth/register", &[("POST", register)]),
    ("/auth/login", &[("POST", login)]),
    ("/auth/logout", &[("POST", logout)]),
    ("/user/me", &[("GET", me)]),
    (
        "/user/api-key",
        &[
            ("GET", get_key),
            ("POST", set_key),
            ("DELETE", delete_default_key),
        ],
    ),
    ("/user/api-keys", &[("GET", list_keys), ("POST", add_key)]),
    ("/user/api-keys/{id}", &[("DELETE", delete_key)]),
    ("/user/migrate-api-keys", &[("POST", migrate_keys)]),
    ("/user/events", &[("GET", user_events)]),
    (
        "/auth/set-password",
        &[("POST", super::people::set_password)],
    ),
    (
        "/service/users/{user}",
        &[
            ("GET", super::people::service_get_user),
            ("PUT", super::people::service_put_user),
            ("DELETE", super::people::service_delete_user),
        ],
    ),
    (
        "/service/users/{user}/api-key",
        &[
            ("GET", service_get_key),
            ("POST", service_set_key),
            ("DELETE", service_delete_default_key),
        ],
    ),
    (
        "/service/users/{user}/api-keys",
        &[("GET", service_list_keys)],
    ),
    ("/admin/status", &[("GET", admin_status)]),
    ("/admin/events", &[("GET", admin_events)]),
    (
        "/admin/service-tokens",
        &[
            ("GET", super::people::admin_service_tokens),
            ("POST", super::people::admin_create_service_token),
        ],
    ),
    (
        "/admin/service-tokens/{name}",
        &[("DELETE", super::people::admin_revoke_service_token)],
    ),
    ("/admin/users", &[("GET", super::people::admin_users)]),
    ("/metrics", &[("GET", metrics)]),
];

/// The routes whose handler hashes or checks a password (argon2, tens of milliseconds of a
/// core each): the server serves them in its hashing pool (`http::hashing`), never on a
/// writer, so that a flood of logins slows logins only.
const HASHING: &[(&str, &str)] = &[("POST", "/auth/login"), ("POST", "/auth/register")];

/// Whether a request of `method` to `path` (no query) hashes or checks a password.
pub(crate) fn hashes_password(method: &str, path: &str) -> bool {
    HASHING.iter().any(|(m, p)| *m == method && *p == path)
}

fn match_path<'a>(pattern: &str, path: &'a str) -> Option<Vec<&'a str>> {
    if !pattern.contains('{') {
        // Most patterns have no parameter: one comparison, no splitting.
        return (pattern == path).then(Vec::new);
    }
    let mut params = Vec::new();
    let mut pat = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (pat.next(), got.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(g)) if p.starts_with('{') => {
                if g.is_empty() {
                    return None;
                }
                params.push(g);
            }
            (Some(p), Some(g)) if p == g => {}
            _ => return None,
        }
    }
}

/// The route patterns, in the order `route_index` numbers them (for the metrics).
pub fn route_patterns() -> Vec<&'static str> {
    ROUTES.iter().map(|(p, _)| *p).collect()
}

/// The index of the route pattern `path` matches, if any (for the metrics).
pub fn route_index(path: &str) -> Option<usize> {
    ROUTES
        .iter()
        .position(|(pattern, _)| match_path(pattern, path).is_some())
}

thread_local! {
    /// The index of the route `route` matched on this thread, for the metrics: the request path
    /// is then not matched a second time.
    static MATCHED: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The route pattern of the request this thread served last (and forgets it), else of `path`.
pub fn served_route(path: &str) -> Option<usize> {
    MATCHED.with(|m| m.take()).or_else(|| route_index(path))
}

/// Finds the handler for a request: 404 for an unknown path, 405 with `Allow` for a known path
/// and another method.
pub(crate) fn route(app: &App, store: &mut Store, req: &Incoming) -> Result<Reply, ApiError> {
    // Debug builds only: lets the test suite show that a panicking handler answers 500 and
    // that its worker lives on. Release builds do not contain this route.
    #[cfg(debug_assertions)]
    if req.path == "/debug/panic" && std::env::var_os("KEYRACK_DEBUG_PANIC_ROUTE").is_some() {
        panic!("deliberate panic for the test suite");
    }
    for (i, (pattern, methods)) in ROUTES.iter().enumerate() {
        let Some(params) = match_path(pattern, req.path) else {
            continue;
        };
        MATCHED.with(|m| m.set(Some(i)));
        if pattern.starts_with("/admin/") && app.admin_token.is_none() {
            return Err(ApiError::not_found());
        }
        return match methods.iter().find(|(m, _)| *m == req.method) {
            Some((_, handler)) => handler(app, store, req, &params),
            None => {
                let allow = methods
                    .iter()
                    .map(|(m, _)| *m)
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(ApiError::new(
                    405,
                    "method_not_allowed",
                    format!("{} is not allowed here; allowed: {allow}", req.method),
                )
                .with_header("Allow", allow))
            }
        };
    }
    Err(ApiError::not_found())
}

// ---- authentication ------------------------------------------------------------------------

pub(super) fn authenticate(store: &mut Store, req: &Incoming) -> Result<User, ApiError> {
    let session = session_token(req)?;
    store.session_user(&session)?.ok_or_else(invalid_token)
}

/// The hash of the request's bearer token, as sessions are stored; 401 without one. The hot
/// reads (the default key, the listing) check it in their own read transaction.
/// `authenticate` for a write: the account's writes over its rate (`KEYRACK_WRITE_RATE`) answer
/// 429 with `Retry-After`.
fn authenticate_write(app: &App, store: &mut Store, req: &Incoming) -> Result<User, ApiError> {
    let user = authenticate(store, req)?;
    within_write_rate(app, user.id)?;
    Ok(user)
}

/// The user a write is for (401/404 as `Principal::user_id`), once the write is within the
/// user's rate and, for a service, the token's.
fn writing_for(app: &App, store: &mut Store, who: &Principal) -> Result<i64, ApiError> {
    let user_id = who.user_id(store)?;
    within_write_rate(app, user_id)?;
    within_service_rate(app, who.service())?;
    Ok(user_id)
}

/// A service token's writes, whichever users they are for, over the same rate answer 429 too:
/// one token working flat out cannot grow the audit trail faster than one account. The token's
/// bucket is kept apart from the users' (keyed by the negated token id; user ids are positive).
pub(super) fn within_service_rate(
    app: &App,
    service: Option<&crate::store::events::ServiceActor>,
) -> Result<(), ApiError> {
    match service {
        Some(s) => within_write_rate(app, -s.token_id),
        None => Ok(()),
    }
}

fn within_write_rate(app: &App, user_id: i64) -> Result<(), ApiError> {
    app.write_rate
        .take(user_id, std::time::Instant::now())
        .map_err(|wait| {
            ApiError::new(
                429,
                "too_many_requests",
                "this account's writes are over its rate; try again later",
            )
            .with_header("Retry-After", wait.to_string())
        })
}

pub(super) fn session_token(req: &Incoming) -> Result<[u8; 32], ApiError> {
    let header = req
        .authorization()
        .ok_or_else(|| ApiError::unauthorized("this route needs an Authorization: Bearer token"))?;
    let token = bearer(header).ok_or_else(|| {
        ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
    })?;
    Ok(auth::token_hash(token))
}

pub(super) fn invalid_token() -> ApiError {
    ApiError::unauthorized("the token is invalid, expired or revoked")
}

pub(super) fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

// ---- handlers ------------------------------------------------------------------------------

#[derive(Serialize)]
struct Health {
    status: &'static str,
    phase: &'static str,
    version: &'static str,
    schema_version: i64,
}

fn healthz(app: &App, store: &mut Store, _: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    let phase = store.phase()?;
    // Read once at start: only serve, migrate and upgrade change it, and this server applied
    // every migration it knows before serving.
    let schema_version = app.schema_version;
    Ok(Reply::of(
        200,
        &Health {
            status: "ok",
            phase: phase.as_str(),
            version: env!("CARGO_PKG_VERSION"),
            schema_version,
        },
    ))
}

/// The API description, kept true by `tests::openapi_matches_the_router`.
const OPENAPI: &str = include_str!("../../openapi.yaml");

fn openapi(_: &App, _: &mut Store, _: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    Ok(Reply::raw(200, "application/yaml", OPENAPI.as_bytes()))
}

fn register(app: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    if !app.signups_open {
        return Err(ApiError::new(
            403,
            "signups_closed",
            "this server does not take sign-ups; ask its operator for an account",
        ));
    }
    let body = req.json()?;
    let email = Email::parse(body.required_str("email")?)?;
    let password = Password::parse(body.required_str("password")?)?;
    let hash = auth::hash_password(&password).map_err(|e| {
        log::error!("password hashing failed: {e}");
        ApiError::internal()
    })?;
    let user = store.create_user(&email, &hash)?;
    Ok(Reply::json(
        201,
        json!({"user": {"id": user.id, "email": user.email}}),
    ))
}

fn login(app: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    let body = req.json()?;
    let (raw_email, raw_password) = (body.required_str("email")?, body.required_str("password")?);
    // Lengths no account can have are refused before anything is lowercased, hashed or
    // recorded by the throttle. Otherwise no format check on login: any email that is not
    // registered gets the same 401.
    if raw_email.trim().chars().count() > Email::MAX_CHARS {
        return Err(Invalid::new("email", "email must be at most 254 characters").into());
    }
    if raw_password.chars().count() > Password::MAX_CHARS {
        return Err(Invalid::new("password", "password must be at most 1024 characters").into());
    }
    let email = raw_email.trim().to_lowercase();
    let password = crate::domain::Secret::new(raw_password.to_owned());
    let t = now();
    let address = req.remote.map(auth::address_key);
    let from_address = app.address_throttle.as_ref().zip(address.as_deref());
    if let Some(wait) = from_address.and_then(|(throttle, a)| throttle.check(a, t)) {
        return Err(ApiError::new(
            429,
            "too_many_requests",
            "too many failed logins from this address; try again later",
        )
        .with_header("Retry-After", wait.to_string()));
    }
    if let Some(wait) = app.throttle.check(&email, t) {
        return Err(ApiError::new(
            429,
            "too_many_requests",
            "too many failed logins for this email; try again later",
        )
        .with_header("Retry-After", wait.to_string()));
    }
    // Err: the id of the existing account whose password was wrong (None: no such account).
    let verified = match store.credentials(&email)? {
        Some(c) if auth::verify_password(password.expose(), &c.password_hash) => {
            upgrade_hash(store, &c, &password);
            Ok(c.user)
        }
        Some(c) => Err(Some(c.user.id)),
        None => {
            auth::verify_against_dummy(password.expose());
            Err(None)
        }
    };
    let user = match verified {
        Ok(user) => user,
        Err(account) => {
            app.throttle.record_failure(&email, t);
            // A success from the address never clears its failures: one account's right
            // password would otherwise let its holder try other accounts' again.
            if let Some((throttle, a)) = from_address {
                throttle.record_failure(a, t);
            }
            // Only for an existing account, by id: an email typed at a failed login is never kept.
            if let Some(id) = account {
                store.record_event(Event::by_user(events::LOGIN_FAILED, id))?;
            }
            return Err(ApiError::new(
                401,
                "invalid_credentials",
                "the email or the password is wrong",
            ));
        }
    };
    app.throttle.record_success(&email);
    // A session and an event per login: logins count among the account's writes.
    within_write_rate(app, user.id)?;
    let token = auth::new_token();
    let expires_at = auth::session_expiry(app.session_ttl_secs);
    store.create_session(user.id, &auth::token_hash(token.expose()), expires_at)?;
    Ok(Reply::json(
        200,
        json!({"token": token.expose(), "token_type": "Bearer", "expires_at": rfc3339(expires_at)}),
    ))
}

/// An imported hash (bcrypt, other argon2 settings) that just verified is replaced by keyrack's
/// own argon2id. A failure here is logged and does not fail the login: the old hash still works.
fn upgrade_hash(store: &mut Store, c: &Credentials, password: &crate::domain::Secret) {
    if !auth::needs_rehash(&c.password_hash) {
        return;
    }
    let Ok(p) = Password::parse(password.expose()) else {
        // Shorter or longer than keyrack allows: keep the old hash rather than refuse a login.
        return;
    };
    let result = auth::hash_password(&p)
        .map_err(|e| e.to_string())
        .and_then(|new| {
            store
                .upgrade_password_hash(c.user.id, &c.password_hash, &new)
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(true) => log::info!("user {}: password re-hashed with argon2id", c.user.id),
        Ok(false) => {}
        Err(e) => log::warn!("user {}: re-hashing the password failed: {e}", c.user.id),
    }
}

fn logout(_: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    authenticate(store, req)?;
    let token = req.authorization().and_then(bearer).unwrap_or_default();
    store.delete_session(&auth::token_hash(token))?;
    Ok(Reply::no_content())
}

fn me(_: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    let user = authenticate(store, req)?;
    Ok(Reply::json(
        200,
        json!({"user": {"id": user.id, "email": user.email}}),
    ))
}

fn provider_param(req: &Incoming) -> Result<Provider, ApiError> {
    Ok(Provider::parse_or_default(req.query_param("provider"))?)
}

fn get_key(_: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    get_key_as(store, req, &Principal::Session(session_token(req)?))
}

fn service_get_key(
    _: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let who = principal::service_reading(store, req, params)?;
    get_key_as(store, req, &who)
}

/// GET /user/api-key and GET /service/users/{user}/api-key: one body for both.
fn get_key_as(store: &mut Store, req: &Incoming, who: &Principal) -> Result<Reply, ApiError> {
    let params = provider_param(req).and_then(|p| Ok((p, reveal_param(req)?)));
    let (provider, reveal) = match params {
        Ok(params) => params,
        Err(e) => {
            // The caller (and the user it names) are checked first, as on every route: 401
            // (404) before 422.
            who.user_id(store)?;
            return Err(e);
        }
    };
    let found = store
        .get_default_key(who.who(), &provider, reveal)?
        .ok_or_else(|| who.not_found())?;
    let body = match &found {
        DefaultKey::Missing | DefaultKey::Expired => KeyState {
            has_key: false,
            provider: provider.as_str(),
            masked_key: None,
            source: None,
            api_key: None,
            expired: matches!(found, DefaultKey::Expired),
        },
        DefaultKey::Found(f) => KeyState {
            has_key: true,
            provider: provider.as_str(),
            masked_key: Some(f.key.masked()),
            source: Some(f.source.as_str()),
            api_key: reveal.then(|| f.key.expose()),
            expired: false,
        },
    };
    Ok(key_state_reply(&body))
}

/// The answer of GET /user/api-key: room for its revealed key, if any, at once.
fn key_state_reply(body: &KeyState<'_>) -> Reply {
    Reply::of_secret(200, body, body.api_key.unwrap_or_default())
}

/// `?reveal=`: true or false (1 or 0), false when absent.
fn reveal_param(req: &Incoming) -> Result<bool, ApiError> {
    match req.query_param("reveal") {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(_) => Err(ApiError::new(
            422,
            "validation_failed",
            "reveal must be true or false",
        )),
    }
}

/// The answer of GET and POST /user/api-key.
#[derive(Serialize)]
struct KeyState<'a> {
    has_key: bool,
    provider: &'a str,
    masked_key: Option<String>,
    source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<&'a str>,
    /// Present (true) only when the default key has expired.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    expired: bool,
}

/// The optional `expires_at` of a key being set: a future RFC 3339 time, or null for never.
pub(super) fn expires_at_field(body: &super::api::Fields) -> Result<Option<ExpiresAt>, ApiError> {
    Ok(body
        .optional_str("expires_at")?
        .map(|raw| ExpiresAt::parse(raw, now()))
        .transpose()?)
}

fn set_key(app: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    set_key_as(app, store, req, &Principal::Session(session_token(req)?))
}

fn service_set_key(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let who = principal::service(store, req, params, Scope::Write)?;
    set_key_as(app, store, req, &who)
}

/// POST /user/api-key and POST /service/users/{user}/api-key.
fn set_key_as(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    who: &Principal,
) -> Result<Reply, ApiError> {
    let user_id = writing_for(app, store, who)?;
    let body = req.json()?;
    let key = ApiKey::parse(body.required_str("api_key")?)?;
    let provider = Provider::parse_or_default(body.optional_str("provider")?)?;
    let expires_at = expires_at_field(&body)?;
    let source = store.set_default_key(user_id, who.service(), &provider, &key, expires_at)?;
    Ok(Reply::of(
        200,
        &KeyState {
            has_key: true,
            provider: provider.as_str(),
            masked_key: Some(key.masked()),
            source: Some(source.as_str()),
            api_key: None,
            expired: false,
        },
    ))
}

fn delete_default_key(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    delete_default_key_as(app, store, req, &Principal::Session(session_token(req)?))
}

fn service_delete_default_key(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let who = principal::service(store, req, params, Scope::Write)?;
    delete_default_key_as(app, store, req, &who)
}

/// DELETE /user/api-key and DELETE /service/users/{user}/api-key.
fn delete_default_key_as(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    who: &Principal,
) -> Result<Reply, ApiError> {
    let user_id = writing_for(app, store, who)?;
    let provider = provider_param(req)?;
    store.delete_default_key(user_id, who.service(), &provider)?;
    Ok(Reply::no_content())
}

/// A key as GET and POST /user/api-keys show it.
#[derive(Serialize)]
struct KeyJson<'a> {
    id: Option<i64>,
    provider: &'a str,
    name: Option<&'a str>,
    masked_key: Option<&'a str>,
    is_default: bool,
    source: &'static str,
    created_at: Option<String>,
    updated_at: Option<String>,
    last_used_at: Option<String>,
    usage_count: i64,
    expires_at: Option<String>,
    expired: bool,
}

impl<'a> From<&'a KeyView> for KeyJson<'a> {
    fn from(k: &'a KeyView) -> KeyJson<'a> {
        KeyJson {
            id: k.id,
            provider: &k.provider,
            name: k.name.as_deref(),
            masked_key: k.masked_key.as_deref(),
            is_default: k.is_default,
            source: k.source.as_str(),
            created_at: k.created_at.map(rfc3339),
            updated_at: k.updated_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
            usage_count: k.usage_count,
            expires_at: k.expires_at.map(rfc3339),
            expired: k.expired,
        }
    }
}

#[derive(Serialize)]
struct KeyListJson<'a> {
    phase: &'static str,
    keys: Vec<KeyJson<'a>>,
    legacy_column: LegacyColumn,
}

#[derive(Serialize)]
struct LegacyColumn {
    present: bool,
    has_key: bool,
}

fn list_keys(_: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    list_keys_as(store, &Principal::Session(session_token(req)?))
}

fn service_list_keys(
    _: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let who = principal::service_reading(store, req, params)?;
    list_keys_as(store, &who)
}

/// GET /user/api-keys and GET /service/users/{user}/api-keys.
fn list_keys_as(store: &mut Store, who: &Principal) -> Result<Reply, ApiError> {
    let (_, list): (User, KeyList) = store.list_keys(who.who())?.ok_or_else(|| who.not_found())?;
    Ok(Reply::of(
        200,
        &KeyListJson {
            phase: list.phase.as_str(),
            keys: list.keys.iter().map(KeyJson::from).collect(),
            legacy_column: LegacyColumn {
                present: list.column_present,
                has_key: list.column_has_key,
            },
        },
    ))
}

fn add_key(app: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    let user = authenticate_write(app, store, req)?;
    let body = req.json()?;
    let new = NewKey {
        provider: Provider::parse(body.required_str("provider")?)?,
        key: ApiKey::parse(body.required_str("api_key")?)?,
        name: body.optional_str("name")?.map(KeyName::parse).transpose()?,
        is_default: body.optional_bool("is_default")?,
        expires_at: expires_at_field(&body)?,
    };
    let view = store.add_key(user.id, &new)?;
    #[derive(Serialize)]
    struct Created<'a> {
        key: KeyJson<'a>,
    }
    Ok(Reply::of(
        201,
        &Created {
            key: KeyJson::from(&view),
        },
    ))
}

fn delete_key(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    params: &[&str],
) -> Result<Reply, ApiError> {
    let user = authenticate_write(app, store, req)?;
    // An id that is not a number is not this user's key either.
    let id: i64 = params
        .first()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::new(404, "not_found", "no such key"))?;
    store.delete_key(user.id, id)?;
    Ok(Reply::no_content())
}

fn migrate_keys(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    let user = authenticate_write(app, store, req)?;
    let (moved, phase) = store.migrate_user(user.id)?;
    Ok(Reply::json(
        200,
        json!({
            "migrated": moved.migrated,
            "already_migrated": moved.already_migrated,
            "conflicts": moved.conflicts,
            "phase": phase.as_str(),
        }),
    ))
}

fn admin_status(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    check_admin(app, req)?;
    let status = Status::collect(store)?;
    Ok(Reply::json(200, status.to_json()))
}

/// How long a scrape right after start waits for the first count of undecryptable values.
const FIRST_SURVEY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// GET /metrics: the Prometheus text format, behind the admin token like /admin/*. Counts only:
/// the undecryptable values are counted in the background (`http::surveyor`).
fn metrics(app: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    check_admin(app, req)?;
    let counts = store.counts()?;
    let undecryptable = crate::metrics::undecryptable(FIRST_SURVEY_WAIT);
    let mut reply = Reply::json(200, json!(null));
    reply.content_type = "text/plain; version=0.0.4; charset=utf-8";
    reply.body = Some(zeroize::Zeroizing::new(
        crate::metrics::render(&counts, undecryptable).into_bytes(),
    ));
    Ok(reply)
}

/// The admin routes' check: 404 without an admin token configured, 401 for a wrong one.
pub(super) fn check_admin(app: &App, req: &Incoming) -> Result<(), ApiError> {
    let expected = app.admin_token.as_ref().ok_or_else(ApiError::not_found)?;
    let given = req.authorization().and_then(bearer).unwrap_or_default();
    if !auth::constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
        return Err(ApiError::unauthorized(
            "the admin token is missing or wrong",
        ));
    }
    Ok(())
}

/// `?limit=N`: 1 to 500, default 100.
pub(super) fn events_limit(req: &Incoming) -> Result<i64, ApiError> {
    match req.query_param("limit") {
        None => Ok(100),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=events::MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    422,
                    "validation_failed",
                    "limit must be a whole number from 1 to 500",
                )
            }),
    }
}

fn events_reply(list: &[events::Recorded]) -> Reply {
    Reply::json(
        200,
        json!({"events": list.iter().map(events::Recorded::to_json).collect::<Vec<_>>()}),
    )
}

fn user_events(_: &App, store: &mut Store, req: &Incoming, _: &[&str]) -> Result<Reply, ApiError> {
    let user = authenticate(store, req)?;
    let list = store.events(&events::Query {
        user_id: Some(user.id),
        since: None,
        limit: events_limit(req)?,
    })?;
    Ok(events_reply(&list))
}

fn admin_events(
    app: &App,
    store: &mut Store,
    req: &Incoming,
    _: &[&str],
) -> Result<Reply, ApiError> {
    check_admin(app, req)?;
    let list = store.events(&events::Query {
        user_id: None,
        since: None,
        limit: events_limit(req)?,
    })?;
    Ok(events_reply(&list))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revealed key is serialized into the reply's buffer: were the buffer to grow, the
    /// allocation it leaves behind (a copy of the key, JSON-escaped) would be freed unwiped. The
    /// largest reveal body (a key of 512 characters that each take two bytes in JSON, the longest
    /// provider), and one of a usual key, fit the buffer the reply starts with.
    #[test]
    fn a_reveal_fits_the_reply_buffer_without_growing_it() {
        let provider = "p".repeat(32);
        let largest = "\"".repeat(256) + &"\\".repeat(256);
        for key in [
            largest.as_str(),
            "sk-0123456789abcdef0123456789abcdef",
            "\"\"\"\"\"\"\"\"",
        ] {
            assert!(crate::domain::ApiKey::parse(key).is_ok());
            let state = KeyState {
                has_key: true,
                provider: &provider,
                masked_key: Some(crate::domain::mask(key)),
                source: Some(crate::store::Source::Column.as_str()),
                api_key: Some(key),
                expired: false,
            };
            let room = Reply::of_secret(200, &(), key)
                .body
                .unwrap_or_default()
                .capacity();
            let body = key_state_reply(&state).body.unwrap_or_default();
            assert!(body.len() > key.len(), "{}", body.len());
            assert_eq!(body.capacity(), room, "{key}");
        }
    }

    /// A key read back from the store is not checked again (`ApiKey::from_stored`): one
    /// written before keys had to be printable ASCII, or into the legacy column by another
    /// program, may hold control characters, six bytes each in JSON. Its reveal's buffer does
    /// not grow either.
    #[test]
    fn a_stored_key_with_control_characters_fits_the_reply_buffer() {
        for key in [
            "\u{1}".repeat(200),
            "\u{1}".repeat(512),
            "\u{7}x".repeat(150),
        ] {
            assert!(crate::domain::ApiKey::parse(&key).is_err());
            let state = KeyState {
                has_key: true,
                provider: "openai",
                masked_key: Some(crate::domain::mask(&key)),
                source: Some(crate::store::Source::Column.as_str()),
                api_key: Some(&key),
                expired: false,
            };
            let room = Reply::of_secret(200, &(), &key)
                .body
                .unwrap_or_default()
                .capacity();
            let body = key_state_reply(&state).body.unwrap_or_default();
            assert!(body.len() > 3 * key.len(), "{}", body.len());
            assert_eq!(body.capacity(), room, "{} bytes", body.len());
        }
    }

    #[test]
    fn path_matching() {
        assert_eq!(
            match_path("/user/api-keys/{id}", "/user/api-keys/12"),
            Some(vec!["12"])
        );
        assert_eq!(match_path("/user/api-keys/{id}", "/user/api-keys/"), None);
        assert_eq!(match_path("/user/api-keys/{id}", "/user/api-keys"), None);
        assert_eq!(match_path("/healthz", "/healthz"), Some(vec![]));
        assert_eq!(match_path("/healthz", "/healthz/x"), None);
    }

    /// Every path and method of the router is in openapi.yaml, and nothing else is.
    #[test]
    fn openapi_matches_the_router() {
        use std::collections::BTreeSet;
        let mut documented = BTreeSet::new();
        let mut in_paths = false;
        let mut path = String::new();
        for line in OPENAPI.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /") {
                path = format!("/{}", p.trim_end_matches(':'));
            } else if let Some(m) = line.strip_prefix("    ") {
                let m = m.trim_end_matches(':');
                if ["get", "post", "delete", "put", "patch"].contains(&m) {
                    documented.insert((path.clone(), m.to_uppercase()));
                }
            }
        }
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .flat_map(|(p, ms)| ms.iter().map(|(m, _)| (p.to_string(), m.to_string())))
            .collect();
        assert!(documented.len() > 10, "the parser found {documented:?}");
        let missing: Vec<_> = routed.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(
            missing.is_empty(),
            "routes missing from openapi.yaml: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "documented routes that do not exist: {extra:?}"
        );
    }

    /// The routes served by the hashing pool exist, and are the ones that hash a password.
    #[test]
    fn the_hashing_routes_are_routes() {
        for (m, p) in HASHING {
            let methods = ROUTES.iter().find(|(path, _)| path == p).map(|(_, ms)| *ms);
            assert!(
                methods.is_some_and(|ms| ms.iter().any(|(method, _)| method == m)),
                "{m} {p} is not routed"
            );
        }
        assert!(hashes_password("POST", "/auth/login"));
        assert!(hashes_password("POST", "/auth/register"));
        assert!(!hashes_password("POST", "/user/api-key"));
        assert!(!hashes_password("POST", "/auth/logout"));
        assert!(!hashes_password("GET", "/auth/login"));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
