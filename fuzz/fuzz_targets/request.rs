//! Request parsing and validation: the query string, the JSON body and its field readers, every
//! domain parser, masking, and opening of arbitrary "sealed" values. None may panic.
//!
//!     RUSTC_BOOTSTRAP=1 cargo fuzz run request -- -max_total_time=600
#![no_main]

use keyrack::crypto::{Binding, EncryptionKey, KeyRing};
use keyrack::domain::{mask, ApiKey, Email, KeyName, Password, Provider};
use keyrack::http::api::{parse_query, Incoming};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| {
        KeyRing::new(
            EncryptionKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
                .expect("a valid key"),
            vec![],
        )
    })
}

fn check_str(s: &str) {
    let _ = Email::parse(s);
    let _ = Password::parse(s);
    let _ = ApiKey::parse(s).map(|k| k.masked());
    let _ = Provider::parse(s);
    let _ = KeyName::parse(s);
    let _ = mask(s);
    let _ = ring().open(Binding { user_id: 1, provider: "openai" }, s);
    let _ = KeyRing::sealed_with(s);
}

fuzz_target!(|data: &[u8]| {
    // First line: a request target (path and query); the rest: the body.
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (head, body) = data.split_at(split);
    let head = String::from_utf8_lossy(head);
    let (path, query) = head.split_once('?').unwrap_or((&head, ""));
    let query = parse_query(query);
    for (k, v) in &query {
        check_str(k);
        check_str(v);
    }
    let _ = Provider::parse_or_default(query.first().map(|(_, v)| v.as_ref()));
    let req = Incoming {
        method: "POST",
        path: &path,
        query,
        authorization: None,
        body: body.get(1..).unwrap_or_default().to_vec().into(),
    };
    if let Ok(fields) = req.json() {
        for name in ["email", "password", "api_key", "provider", "name", "is_default"] {
            if let Ok(s) = fields.required_str(name) {
                check_str(s);
            }
            let _ = fields.optional_str(name);
            let _ = fields.optional_bool(name);
        }
    }
});
