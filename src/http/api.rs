//! The HTTP vocabulary of keyrack: the request as handlers see it, the reply, the error body
//! and its status codes (docs/api.md), and the JSON field readers that name the bad field.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::domain::Invalid;
use crate::store::StoreError;

/// Largest request body read (64 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// A request, read off the socket: method, path, query, the one header handlers use, the body.
#[derive(Debug)]
pub struct Incoming<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The `Authorization` header (a bearer token): wiped when the request is dropped.
    pub authorization: Option<Zeroizing<String>>,
    /// The body (a key or a password, often): wiped when the request is dropped.
    pub body: Zeroizing<Vec<u8>>,
    /// The client's address (the last hop: a reverse proxy's own address behind one).
    pub remote: Option<std::net::IpAddr>,
}

impl Incoming<'_> {
    /// The `Authorization` header's value, if one was sent.
    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref().map(String::as_str)
    }

    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// The body as a JSON object.
    pub fn json(&self) -> Result<Fields, ApiError> {
        let value: Value = serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::new(
                400,
                "invalid_json",
                format!("the request body is not valid JSON ({e})"),
            )
        })?;
        match value {
            Value::Object(map) => Ok(Fields(map)),
            _ => Err(ApiError::invalid_request(
                "the request body must be a JSON object",
            )),
        }
    }
}

/// The fields of a JSON object body, read with errors that name the field. Every string in it
/// is wiped when it is dropped: the body's keys and passwords are parsed into these.
pub struct Fields(Map<String, Value>);

impl Drop for Fields {
    fn drop(&mut self) {
        self.0.values_mut().for_each(wipe);
    }
}

/// Zeroes every string of a JSON value in place.
fn wipe(v: &mut Value) {
    use zeroize::Zeroize;
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(wipe),
        Value::Object(m) => m.values_mut().for_each(wipe),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

impl Fields {
    pub fn required_str(&self, name: &str) -> Result<&str, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Err(ApiError::invalid_request(format!(
                "the field `{name}` is required"
            ))),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(ApiError::invalid_request(format!(
                "the field `{name}` must be a string"
            ))),
        }
    }

    pub fn optional_str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid_request(format!(
                "the field `{name}` must be a string"
            ))),
        }
    }

    pub fn optional_bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid_request(format!(
                "the field `{name}` must be true or false"
            ))),
        }
    }
}

/// The type of a JSON body, the API's every answer but the page's files and the metrics.
pub const JSON: &str = "application/json";

/// A reply: status, serialized JSON body (none for 204), extra headers, and whether to close
/// the connection. The body may hold a revealed key: it is wiped when the reply is dropped.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Option<Zeroizing<Vec<u8>>>,
    pub headers: Vec<(&'static str, String)>,
    pub close: bool,
}

/// The room a JSON reply body starts with: enough for every body that may hold a secret (a
/// session token, a revealed key of usual length), so that such a body never grows and leaves an
/// unwiped copy in the allocation it frees; small enough for the C library's per-thread cache
/// of freed blocks (1,032 bytes at most), which serves it again without a lock. A revealed key
/// asks for more room when it needs it (`Reply::of_secret`). Larger bodies (listings, which
/// carry no secret) grow as usual.
pub(crate) const BODY_CAPACITY: usize = 1024;

/// The bytes of `text` inside a JSON string as serde_json writes it: a quote or backslash and
/// the control characters with a short escape take two, the other control characters six
/// (`\u00XX`). A key checked when it was written is printable ASCII (at most two each), but
/// one read back from the store is not checked again.
fn json_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

impl Reply {
    /// A reply with `body` serialized as JSON.
    pub fn of<T: Serialize>(status: u16, body: &T) -> Reply {
        Reply::of_secret(status, body, "")
    }

    /// A reply with `body` serialized as JSON, holding `secret` once: room for it at once as
    /// JSON writes it (`json_len`), beside the rest of a reply, so the buffer never grows.
    pub fn of_secret<T: Serialize>(status: u16, body: &T, secret: &str) -> Reply {
        // Serializing plain structs and maps into memory cannot fail.
        let room = BODY_CAPACITY.max(BODY_CAPACITY / 2 + json_len(secret));
        let mut bytes = Vec::with_capacity(room);
        if serde_json::to_writer(&mut bytes, body).is_err() {
            bytes.clear();
        }
        Reply {
            status,
            content_type: JSON,
            body: Some(Zeroizing::new(bytes)),
            headers: Vec::new(),
            close: false,
        }
    }

    /// A reply of other bytes than JSON.
    pub fn raw(status: u16, content_type: &'static str, bytes: &[u8]) -> Reply {
        Reply {
            status,
            content_type,
            body: Some(Zeroizing::new(bytes.to_vec())),
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn json(status: u16, body: Value) -> Reply {
        Reply::of(status, &body)
    }

    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            content_type: JSON,
            body: None,
            headers: Vec::new(),
            close: false,
        }
    }
}

/// An error answer: `{"error": {"code", "message"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub headers: Vec<(&'static str, String)>,
    pub close: bool,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request", message)
    }

    pub fn unauthorized(message: &str) -> ApiError {
        ApiError::new(401, "unauthorized", message)
    }

    pub fn not_found() -> ApiError {
        ApiError::new(404, "not_found", "there is nothing at this address")
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            500,
            "internal",
            "something went wrong on our side; the server log has the details",
        )
    }

    pub fn payload_too_large() -> ApiError {
        let mut e = ApiError::new(
            413,
            "payload_too_large",
            format!("the request body is larger than {} KiB", MAX_BODY / 1024),
        );
        // The unread rest of the body would be taken for the next request: close instead.
        e.close = true;
        e
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> ApiError {
        self.headers.push((name, value));
        self
    }

    pub fn into_reply(self) -> Reply {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        let mut reply = Reply::of(
            self.status,
            &Body {
                error: Inner {
                    code: self.code,
                    message: &self.message,
                },
            },
        );
        reply.headers = self.headers;
        reply.close = self.close;
        reply
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> ApiError {
        ApiError::new(422, "validation_failed", e.message)
    }
}

/// Seconds a client is asked to wait after `key_changed`: the time for an operator's restart.
const KEY_CHANGED_RETRY_SECS: &str = "30";

/// 503 `key_changed`: the database's current key (key id `id`) is one this server does not hold.
fn key_changed(id: &str) -> ApiError {
    ApiError::new(
        503,
        "key_changed",
        format!(
            "the database's current key (key id {id}) changed and this server does not hold it; \
             an operator must restart keyrack with that key as KEYRACK_ENCRYPTION_KEY"
        ),
    )
    .with_header("Retry-After", KEY_CHANGED_RETRY_SECS.into())
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Busy => {
                ApiError::new(503, "busy", "the database is busy; try again in a moment")
                    .with_header("Retry-After", "1".into())
            }
            StoreError::EmailTaken => {
                ApiError::new(409, "email_taken", "this email is already registered")
            }
            StoreError::TokenNotLive => {
                ApiError::unauthorized("the service token is invalid, expired or revoked")
            }
            StoreError::NameTaken => ApiError::new(
                409,
                "name_taken",
                "a service token that is not revoked already has this name",
            ),
            StoreError::NotFound => ApiError::new(404, "not_found", "no such key"),
            StoreError::PhaseConflict(m) => ApiError::new(409, "phase_conflict", m),
            e @ StoreError::LimitReached { .. } => {
                ApiError::new(409, "limit_reached", e.to_string())
            }
            e @ StoreError::KeyUnreadable { .. } => {
                // The log names the user, the store and the key id; never the value.
                log::error!("{e}");
                ApiError::new(
                    500,
                    "key_unreadable",
                    "a stored key could not be decrypted; an operator must look at the server log",
                )
            }
            StoreError::KeyChanged(id) => key_changed(&id),
            StoreError::Changed => {
                ApiError::new(503, "busy", "the data changed while it was read; try again")
                    .with_header("Retry-After", "1".into())
            }
            e @ (StoreError::Sql(_)
            | StoreError::Reseal
            | StoreError::BadPhase { .. }
            | StoreError::GroupAborted
            | StoreError::Transaction { .. }) => {
                log::error!("{}", crate::error_chain(&e));
                ApiError::internal()
            }
        }
    }
}

/// Splits `a=1&b=two%20words` into decoded pairs (`application/x-www-form-urlencoded`: `+` is
/// a space, `%` takes exactly two hex digits or stays as it is, bytes that are not UTF-8 become
/// U+FFFD).
/// The query's pairs, decoded; a pair that needs no decoding borrows from `q`.
pub fn parse_query(q: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(q.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(
            parse_query("provider=open%61i&reveal=true&x"),
            vec![
                ("provider".into(), "openai".into()),
                ("reveal".into(), "true".into()),
                ("x".into(), "".into())
            ]
        );
        assert_eq!(
            parse_query("a=%zz&b=%4"),
            vec![("a".into(), "%zz".into()), ("b".into(), "%4".into())]
        );
        // Two hex digits or nothing: a sign is no digit, `+` is a space.
        assert_eq!(
            parse_query("a=%+1&b=%-f&c=x+y%41"),
            vec![
                ("a".into(), "% 1".into()),
                ("b".into(), "%-f".into()),
                ("c".into(), "x yA".into())
            ]
        );
    }

    #[test]
    fn every_string_of_a_body_is_wiped() {
        let mut v: Value = serde_json::json!({
            "api_key": "sk-secret-0123456789",
            "nested": {"password": "correct horse", "list": ["a", 1, true, null]},
        });
        wipe(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"api_key": "", "nested": {"password": "", "list": ["", 1, true, null]}})
        );
    }

    #[test]
    fn field_errors_name_the_field() {
        let inc = Incoming {
            method: "POST",
            path: "/",
            query: vec![],
            authorization: None,
            body: Zeroizing::new(br#"{"email": 5}"#.to_vec()),
            remote: None,
        };
        let f = inc.json().unwrap();
        let e = f.required_str("email").unwrap_err();
        assert_eq!((e.status, e.code), (400, "invalid_request"));
        assert!(e.message.contains("email"));
        let e = f.required_str("password").unwrap_err();
        assert!(e.message.contains("password"));
    }
}
