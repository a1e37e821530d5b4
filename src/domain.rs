//! Checked values: every input from a request, a fixtures file or the command line is parsed
//! into one of these types before it reaches the store, so the store only ever holds valid data.
//!
//! No I/O here. Secrets (`Secret`) zeroize their memory on drop and never print themselves.

use std::fmt;
use zeroize::Zeroizing;

/// A value that failed validation: which field, and a sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl Into<String>) -> Invalid {
        Invalid {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for Invalid {}

/// Plaintext that must never be logged, printed or kept after use: API keys, passwords and
/// session tokens. The memory is wiped on drop; `Debug` prints a placeholder; there is no
/// `Display`, so a secret cannot slip into a `format!` by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// The plaintext, for the few places that need it (sealing, hashing, a reveal response).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// An email address: trimmed, lowercased, one `@` with text on both sides, at most 254 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// The longest email, in characters.
    pub const MAX_CHARS: usize = 254;

    pub fn parse(raw: &str) -> Result<Email, Invalid> {
        if raw.trim().chars().count() > Self::MAX_CHARS {
            return Err(Invalid::new(
                "email",
                "email must be at most 254 characters",
            ));
        }
        let email = raw.trim().to_lowercase();
        if email.is_empty() {
            return Err(Invalid::new("email", "email must not be empty"));
        }
        if email.chars().count() > Self::MAX_CHARS {
            return Err(Invalid::new(
                "email",
                "email must be at most 254 characters",
            ));
        }
        let mut parts = email.split('@');
        let (local, domain, rest) = (parts.next(), parts.next(), parts.next());
        match (local, domain, rest) {
            (Some(l), Some(d), None) if !l.is_empty() && !d.is_empty() => {}
            _ => {
                return Err(Invalid::new(
                    "email",
                    "email must contain exactly one @ with text on both sides",
                ))
            }
        }
        // An email is shown to operators (`status`, `inspect`, the page, listings): it must
        // read as what it is, under the rule of key names (`disguises_text`).
        if email.chars().any(disguises_text) {
            return Err(Invalid::new(
                "email",
                "email must not contain control, line-separator or bidirectional formatting \
                 characters",
            ));
        }
        if email.chars().any(char::is_whitespace) {
            return Err(Invalid::new("email", "email must not contain spaces"));
        }
        Ok(Email(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password of 8 to 1024 characters, kept as a secret.
#[derive(Debug)]
pub struct Password(Secret);

impl Password {
    /// The longest password, in characters.
    pub const MAX_CHARS: usize = 1024;

    pub fn parse(raw: &str) -> Result<Password, Invalid> {
        let n = raw.chars().count();
        if !(8..=Self::MAX_CHARS).contains(&n) {
            return Err(Invalid::new(
                "password",
                "password must be 8 to 1024 characters",
            ));
        }
        Ok(Password(Secret::new(raw.to_owned())))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

/// A provider API key: surrounding white space trimmed, then 8 to 512 printable ASCII
/// characters without spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey(Secret);

impl ApiKey {
    pub fn parse(raw: &str) -> Result<ApiKey, Invalid> {
        let key = raw.trim();
        let n = key.len();
        if !(8..=512).contains(&n) {
            return Err(Invalid::new(
                "api_key",
                "api_key must be 8 to 512 characters",
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Invalid::new(
                "api_key",
                "api_key must be printable ASCII without spaces",
            ));
        }
        Ok(ApiKey(Secret::new(key.to_owned())))
    }

    /// A key read back from the store, already checked when it was written.
    pub fn from_stored(secret: Secret) -> ApiKey {
        ApiKey(secret)
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    pub fn masked(&self) -> String {
        mask(self.expose())
    }
}

/// The masked form of a key: the first 3 and last 4 characters joined by `...` when the key has
/// at least 12 characters, otherwise `...`.
pub fn mask(key: &str) -> String {
    if key.is_ascii() {
        // Every key keyrack accepts is ASCII: characters are bytes.
        if key.len() < 12 {
            return "...".to_owned();
        }
        let mut out = String::with_capacity(10);
        out.push_str(&key[..3]);
        out.push_str("...");
        out.push_str(&key[key.len() - 4..]);
        return out;
    }
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "...".to_owned();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}...{tail}")
}

/// A provider name: `[a-z0-9_-]{1,32}`; `openai` when absent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provider(String);

impl Provider {
    pub const OPENAI: &'static str = "openai";

    pub fn openai() -> Provider {
        Provider(Self::OPENAI.to_owned())
    }

    pub fn parse(raw: &str) -> Result<Provider, Invalid> {
        let ok = (1..=32).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(Invalid::new(
                "provider",
                "provider must be 1 to 32 characters of a-z, 0-9, _ and -",
            ));
        }
        Ok(Provider(raw.to_owned()))
    }

    pub fn parse_or_default(raw: Option<&str>) -> Result<Provider, Invalid> {
        raw.map_or_else(|| Ok(Provider::openai()), Provider::parse)
    }

    pub fn is_openai(&self) -> bool {
        self.0 == Self::OPENAI
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether a character makes text break or display as other text: a control character
/// (`char::is_control`: C0, DEL and C1), a line or paragraph separator (U+2028, U+2029: a line
/// end to editors and log viewers), or a bidirectional mark, embedding, override or isolate
/// (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069: they reorder what a terminal or
/// a page shows, so that `txt.exe` can read as `exe.txt`). Log lines escape these; key names
/// refuse them.
pub fn disguises_text(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// An optional label for a key: trimmed, 1 to 100 characters, none of them a control,
/// line-separator or bidirectional formatting character (`disguises_text`): a name is shown
/// on the page, by `inspect` and in listings, and must read as what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(String);

impl KeyName {
    pub fn parse(raw: &str) -> Result<KeyName, Invalid> {
        let name = raw.trim();
        let n = name.chars().count();
        if !(1..=100).contains(&n) || name.chars().any(disguises_text) {
            return Err(Invalid::new(
                "name",
                "name must be 1 to 100 characters without control, line-separator or \
                 bidirectional formatting characters",
            ));
        }
        Ok(KeyName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An application's own id for a user: 1 to 255 characters, none of them a control,
/// line-separator or bidirectional formatting character (the rule of key names). Not trimmed:
/// it is the application's value, compared exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalId(String);

impl ExternalId {
    pub const MAX_CHARS: usize = 255;

    pub fn parse(raw: &str) -> Result<ExternalId, Invalid> {
        let n = raw.chars().count();
        if !(1..=Self::MAX_CHARS).contains(&n) || raw.chars().any(disguises_text) {
            return Err(Invalid::new(
                "external_id",
                "external_id must be 1 to 255 characters without control, line-separator or \
                 bidirectional formatting characters",
            ));
        }
        Ok(ExternalId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name of a service token: `[a-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenName(String);

impl TokenName {
    pub fn parse(raw: &str) -> Result<TokenName, Invalid> {
        let ok = (1..=64).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(Invalid::new(
                "name",
                "name must be 1 to 64 characters of a-z, 0-9, _ and -",
            ));
        }
        Ok(TokenName(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a service token may do: `read` users and keys, or also `write` them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Read,
    Write,
}

impl Scope {
    pub fn parse(raw: &str) -> Result<Scope, Invalid> {
        match raw {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            _ => Err(Invalid::new("scope", "scope must be read or write")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_trimmed_and_lowercased() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
    }

    #[test]
    fn email_needs_one_at_with_text_on_both_sides() {
        for bad in ["", "ada", "@example.com", "ada@", "a@b@c", "a b@c.d"] {
            let err = Email::parse(bad).unwrap_err();
            assert_eq!(err.field, "email", "{bad:?}");
        }
        let long = format!("{}@example.com", "a".repeat(243));
        assert_eq!(long.len(), 255);
        assert!(Email::parse(&long).is_err());
        assert!(Email::parse(&long[1..]).is_ok());
    }

    /// Emails are shown to operators: none may carry what reorders or breaks a line, as key
    /// names may not (`b\u{202e}exe.txt@example.com` would read `btxt.exe@example.com`).
    #[test]
    fn email_refuses_what_disguises_text() {
        for bad in [
            "b\u{202e}exe.txt@example.com",
            "ada\u{2066}@example.com",
            "ada@exa\u{200f}mple.com",
            "ada@example.com\u{2028}x",
            "ada\u{061c}@example.com",
            "ada\u{7}@example.com",
            "ada@exam\u{85}ple.com",
        ] {
            let err = Email::parse(bad).unwrap_err();
            assert_eq!(err.field, "email", "{bad:?}");
            assert!(
                err.message.contains("bidirectional"),
                "{bad:?}: {}",
                err.message
            );
        }
        // Other letters than ASCII stay allowed.
        assert!(Email::parse("zoë@exämple.com").is_ok());
        assert!(Email::parse("אדה@example.com").is_ok());
    }

    #[test]
    fn password_length_bounds() {
        assert!(Password::parse("1234567").is_err());
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse(&"x".repeat(1024)).is_ok());
        assert!(Password::parse(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn api_key_rules() {
        assert_eq!(
            ApiKey::parse("  sk-abcdefgh \n").unwrap().expose(),
            "sk-abcdefgh"
        );
        assert!(ApiKey::parse("short").is_err());
        assert!(ApiKey::parse("sk-abc def").is_err());
        assert!(ApiKey::parse("sk-abcdé12345").is_err());
        assert!(ApiKey::parse(&"k".repeat(512)).is_ok());
        assert!(ApiKey::parse(&"k".repeat(513)).is_err());
    }

    #[test]
    fn provider_rules() {
        assert!(Provider::parse("anthropic").is_ok());
        assert!(Provider::parse("my_prov-2").is_ok());
        assert!(Provider::parse("").is_err());
        assert!(Provider::parse("OpenAI").is_err());
        assert!(Provider::parse(&"a".repeat(33)).is_err());
        assert_eq!(Provider::parse_or_default(None).unwrap().as_str(), "openai");
    }

    #[test]
    fn masking() {
        assert_eq!(mask("sk-0123456789Wxyz"), "sk-...Wxyz");
        assert_eq!(mask("abcdefghijkl"), "abc...ijkl");
        assert_eq!(mask("abcdefghijk"), "...");
        // A stored key from elsewhere need not be ASCII: characters, not bytes.
        assert_eq!(mask("ééé-0123456-éééé"), "ééé...éééé");
        assert_eq!(mask("éééééééééé1"), "...");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-very-secret".into());
        assert!(!format!("{s:?}").contains("very"));
        let k = ApiKey::parse("sk-very-secret").unwrap();
        assert!(!format!("{k:?}").contains("very"));
        let p = Password::parse("hunter2hunter2").unwrap();
        assert!(!format!("{p:?}").contains("hunter"));
    }
}

/// When a key expires: a time in the future (Unix seconds). `parse` takes the RFC 3339 text of
/// the `expires_at` field and the current time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiresAt(i64);

impl ExpiresAt {
    pub fn parse(raw: &str, now: i64) -> Result<ExpiresAt, Invalid> {
        let at = crate::clock::parse_rfc3339(raw).ok_or_else(|| {
            Invalid::new(
                "expires_at",
                "expires_at must be an RFC 3339 time such as 2027-01-31T12:00:00Z, or null for never",
            )
        })?;
        if at <= now {
            return Err(Invalid::new(
                "expires_at",
                "expires_at must be a time in the future",
            ));
        }
        Ok(ExpiresAt(at))
    }

    pub fn secs(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod expiry_tests {
    use super::*;

    #[test]
    fn expiry_is_a_future_rfc3339_time() {
        let now = 951_782_400;
        assert_eq!(
            ExpiresAt::parse("2000-02-29T00:00:01Z", now).map(ExpiresAt::secs),
            Ok(now + 1)
        );
        for bad in [
            "2000-02-29T00:00:00Z",
            "1999-01-01T00:00:00Z",
            "tomorrow",
            "",
        ] {
            let e = ExpiresAt::parse(bad, now).unwrap_err();
            assert_eq!(e.field, "expires_at", "{bad}");
        }
    }

    #[test]
    fn external_ids_token_names_and_scopes() {
        assert!(ExternalId::parse("42").is_ok());
        assert!(ExternalId::parse(&"x".repeat(255)).is_ok());
        for bad in [
            String::new(),
            "x".repeat(256),
            "a\u{202e}b".into(),
            "a\nb".into(),
        ] {
            assert_eq!(ExternalId::parse(&bad).unwrap_err().field, "external_id");
        }
        assert!(TokenName::parse("billing-app_2").is_ok());
        for bad in ["", "Billing", "a b", "a.b"] {
            assert!(TokenName::parse(bad).is_err(), "{bad}");
        }
        assert!(TokenName::parse(&"a".repeat(65)).is_err());
        assert_eq!(Scope::parse("write").unwrap(), Scope::Write);
        assert!(Scope::parse("admin").is_err());
        assert!(Email::parse("ada\u{200f}@example.com").is_err());
    }
}
