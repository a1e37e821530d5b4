//! Passwords (argon2id), session tokens (256 random bits, stored only as SHA-256) and the login
//! throttle. No SQL and no HTTP here.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, OnceLock};
use zeroize::Zeroizing;

use crate::domain::{Password, Secret};

/// argon2id with 9 MiB of memory, 4 passes, 1 lane: one of the settings OWASP recommends as
/// equivalent to its first (19 MiB, 2 passes), chosen so that a server hashing on every core at
/// once stays small in memory. Stored hashes carry their own parameters, so changing these later
/// leaves existing passwords valid.
fn hasher() -> Argon2<'static> {
    let (m_kib, passes) = if cheap_test_hash() {
        (8, 1)
    } else {
        (9 * 1024, 4)
    };
    let params = Params::new(m_kib, passes, 1, None).expect("constant argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Debug builds only: `KEYRACK_TEST_CHEAP_HASH=1` (read once) makes keyrack's own argon2id
/// its cheapest (8 KiB, 1 pass), so the test suite's hundreds of registrations and logins do
/// not spend its time on hashing; the tests that need the real cost leave it unset. Release
/// builds ignore it.
fn cheap_test_hash() -> bool {
    static CHEAP: OnceLock<bool> = OnceLock::new();
    *CHEAP.get_or_init(|| crate::config::test_switch("CHEAP_HASH").as_deref() == Some("1"))
}

/// How many passwords are hashed at once: one per core. The server's hashing pool has as many
/// threads (`http::hashing`).
pub fn hash_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The free slots of `with_hash_slot`, and the condition its waiters wait on.
fn slots() -> &'static (Mutex<usize>, Condvar) {
    static SLOTS: OnceLock<(Mutex<usize>, Condvar)> = OnceLock::new();
    SLOTS.get_or_init(|| (Mutex::new(hash_slots()), Condvar::new()))
}

/// How many passwords are being hashed or checked right now (for the metrics).
pub fn hashes_running() -> usize {
    hash_slots().saturating_sub(*crate::lock(&slots().0))
}

/// Password hashing is CPU- and memory-bound: more at once than there are cores only adds
/// memory. Callers beyond that wait here.
fn with_hash_slot<T>(f: impl FnOnce() -> T) -> T {
    let (free, cv) = slots();
    {
        let mut n = crate::lock(free);
        while *n == 0 {
            n = cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n -= 1;
    }
    struct Release<'a>(&'a Mutex<usize>, &'a Condvar);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            *crate::lock(self.0) += 1;
            self.1.notify_one();
        }
    }
    let _release = Release(free, cv);
    if let Some(ms) = slow_test_hash() {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    f()
}

/// Debug builds only: `KEYRACK_TEST_SLOW_HASH=MS` (read once) makes every hash and check hold
/// its slot MS milliseconds longer (sleeping, not computing), so that a test can keep every
/// slot busy as long as it needs. Release builds ignore it.
fn slow_test_hash() -> Option<u64> {
    static SLOW: OnceLock<Option<u64>> = OnceLock::new();
    *SLOW.get_or_init(|| crate::config::test_switch_positive("SLOW_HASH"))
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &Password) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    with_hash_slot(|| {
        Ok(hasher()
            .hash_password(password.expose().as_bytes(), &salt)?
            .to_string())
    })
}

/// Checks a password against a stored hash (with the parameters the hash names). A malformed
/// hash never matches. Besides keyrack's own argon2id, the forms `import-legacy` carries over
/// from another application are verified: bcrypt (`$2a$`, `$2b$`, `$2y$`), any argon2 PHC
/// string (`$argon2i$`, `$argon2d$`, other parameters), and Werkzeug's scrypt and pbkdf2,
/// Django's and passlib's pbkdf2-sha256 (`crate::passwords`).
pub fn verify_password(password: &str, hash: &str) -> bool {
    if is_bcrypt(hash) {
        // Truncates at 72 bytes, as the application that wrote the hash did when it checked it.
        return with_hash_slot(|| bcrypt::verify(password.as_bytes(), hash).unwrap_or(false));
    }
    if crate::passwords::form(hash).is_some() {
        // Werkzeug, Django and passlib hashes an import kept (`crate::passwords`).
        return with_hash_slot(|| crate::passwords::verify(password, hash));
    }
    if hash == NO_PASSWORD {
        // An account with no usable password: never matches, in the time a check takes.
        verify_against_dummy(password);
        return false;
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => with_hash_slot(|| {
            hasher()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        }),
        Err(_) => false,
    }
}

/// The password hash of an imported account that brought no usable one: matches no password
/// (not a PHC string, not bcrypt). `keyrack reset-password` gives such an account a password.
pub const NO_PASSWORD: &str = "!no-password";

/// A password hash in a form keyrack verifies, as `import-legacy` sorts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashForm {
    Bcrypt,
    Argon2,
    /// Werkzeug, Django or passlib.
    Other(crate::passwords::Form),
}

impl HashForm {
    /// The name the import's counts and report use.
    pub fn name(self) -> &'static str {
        match self {
            HashForm::Bcrypt => "bcrypt",
            HashForm::Argon2 => "argon2",
            HashForm::Other(f) => f.name(),
        }
    }
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
}

/// The form of a stored hash keyrack can verify, or `None` (then it is not usable). A bcrypt
/// hash must be well formed (`$2b$NN$` and 53 characters of salt and digest); an argon2 one
/// must parse as a PHC string with its parameters.
pub fn hash_form(hash: &str) -> Option<HashForm> {
    if is_bcrypt(hash) {
        let b = hash.as_bytes();
        let well_formed = b.len() == 60
            && b[4].is_ascii_digit()
            && b[5].is_ascii_digit()
            && b[6] == b'$'
            && b[7..]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/');
        return well_formed.then_some(HashForm::Bcrypt);
    }
    if let Some(f) = crate::passwords::form(hash) {
        return Some(HashForm::Other(f));
    }
    let parsed = PasswordHash::new(hash).ok()?;
    let argon2 = ["argon2id", "argon2i", "argon2d"].contains(&parsed.algorithm.as_str());
    (argon2 && parsed.hash.is_some() && Params::try_from(&parsed).is_ok())
        .then_some(HashForm::Argon2)
}

/// True when a hash that just verified should be replaced by keyrack's own: anything but
/// argon2id with keyrack's current parameters (an imported bcrypt or argon2 hash).
pub fn needs_rehash(hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return true;
    };
    let ours = hasher();
    parsed.algorithm.as_str() != "argon2id"
        || parsed.version != Some(Version::V0x13.into())
        || Params::try_from(&parsed).map_or(true, |p| {
            let o = ours.params();
            (p.m_cost(), p.t_cost(), p.p_cost()) != (o.m_cost(), o.t_cost(), o.p_cost())
        })
}

/// Spends the time of one verification, for an unknown email, so that the answer's timing does
/// not tell whether an account exists.
pub fn verify_against_dummy(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let hash = DUMMY.get_or_init(|| {
        let p = Password::parse("keyrack-dummy-password").expect("a valid constant password");
        hash_password(&p).unwrap_or_default()
    });
    let _ = verify_password(password, hash);
}

/// A new session token: 32 random bytes, URL-safe base64 with a `kr_` prefix.
pub fn new_token() -> Secret {
    new_token_with("kr_")
}

/// A new service token: `krs_` and 32 random bytes (base64url).
pub fn new_service_token() -> Secret {
    new_token_with("krs_")
}

/// A new invite token (the link's `#set-password=…`): `kri_` and 32 random bytes.
pub fn new_invite_token() -> Secret {
    new_token_with("kri_")
}

fn new_token_with(prefix: &str) -> Secret {
    let mut bytes = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(bytes.as_mut());
    Secret::new(format!(
        "{prefix}{}",
        URL_SAFE_NO_PAD.encode(bytes.as_ref())
    ))
}

/// When a session created now with a lifetime of `ttl_secs` ends, in whole Unix seconds
/// (sessions are stored to the second). Rounded up, so the session lives its whole lifetime:
/// rounding down cut up to a second off it, and a 1 s session often ended at once.
pub fn session_expiry(ttl_secs: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    expiry_after(now, ttl_secs)
}

fn expiry_after(now: std::time::Duration, ttl_secs: i64) -> i64 {
    let secs = now.as_secs() as i64 + ttl_secs;
    if now.subsec_nanos() > 0 {
        secs + 1
    } else {
        secs
    }
}

/// What is stored for a token: its SHA-256.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Login throttle: after `limit` failed logins for one key (an email, or a client's address)
/// within `WINDOW_SECS`, further attempts are refused until the oldest failure leaves the
/// window. Kept in memory: a restart forgets it (documented in docs/choices.md).
///
/// Two are kept: per email (`MAX_FAILURES`), and per client address
/// (`KEYRACK_LOGIN_FAILURES_PER_ADDRESS`, `address_key`), which stops one client trying many
/// emails — each of them never reaching the per-email limit, each costing a password check.
///
/// Bounded: a key is kept as its SHA-256 (32 bytes, whatever its length), and at most
/// `MAX_TRACKED` keys are tracked. When the map is full, keys with no failure left in the
/// window go first; if every entry is recent, the one whose last failure is oldest gives way.
pub struct Throttle {
    failures: Mutex<HashMap<[u8; 32], VecDeque<i64>>>,
    limit: usize,
}

/// Failed logins for one email within `WINDOW_SECS` before its logins are refused.
pub const MAX_FAILURES: usize = 10;
pub const WINDOW_SECS: i64 = 15 * 60;
/// Most keys tracked at once (about 150 bytes each).
pub const MAX_TRACKED: usize = 10_000;
/// Default of `KEYRACK_LOGIN_FAILURES_PER_ADDRESS`: failed logins from one client address
/// within `WINDOW_SECS` (whatever the emails) before its logins are refused.
pub const DEFAULT_FAILURES_PER_ADDRESS: usize = 50;

fn email_key(email: &str) -> [u8; 32] {
    Sha256::digest(email.as_bytes()).into()
}

/// What the per-address throttle counts a client by: its IPv4 address, or the /64 network of
/// its IPv6 address (one host commonly holds a whole /64, and could otherwise take a new
/// address for every few attempts).
pub fn address_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

impl Throttle {
    /// The per-email throttle: `MAX_FAILURES` failures.
    pub fn new() -> Throttle {
        Throttle::with_limit(MAX_FAILURES)
    }

    /// A throttle that refuses after `limit` failures within the window.
    pub fn with_limit(limit: usize) -> Throttle {
        Throttle {
            failures: Mutex::new(HashMap::new()),
            limit,
        }
    }

    /// `Some(seconds to wait)` when `email` is throttled at time `now`.
    pub fn check(&self, email: &str, now: i64) -> Option<i64> {
        let mut map = crate::lock(&self.failures);
        let q = map.get_mut(&email_key(email))?;
        while q.front().is_some_and(|&t| t <= now - WINDOW_SECS) {
            q.pop_front();
        }
        if q.len() >= self.limit {
            let oldest = q.front().copied().unwrap_or(now);
            Some((oldest + WINDOW_SECS - now).max(1))
        } else {
            None
        }
    }

    pub fn record_failure(&self, email: &str, now: i64) {
        let key = email_key(email);
        let mut map = crate::lock(&self.failures);
        if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
            map.retain(|_, q| q.back().is_some_and(|&t| t > now - WINDOW_SECS));
            if map.len() >= MAX_TRACKED {
                let stalest = map
                    .iter()
                    .min_by_key(|(_, q)| q.back().copied().unwrap_or(i64::MIN))
                    .map(|(k, _)| *k);
                if let Some(k) = stalest {
                    map.remove(&k);
                }
            }
        }
        let q = map.entry(key).or_default();
        q.push_back(now);
        while q.len() > self.limit {
            q.pop_front();
        }
    }

    pub fn record_success(&self, email: &str) {
        let mut map = crate::lock(&self.failures);
        map.remove(&email_key(email));
    }

    /// How many emails are tracked.
    pub fn tracked(&self) -> usize {
        crate::lock(&self.failures).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let p = Password::parse("correct horse battery").unwrap();
        let h = hash_password(&p).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains("correct horse"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("wrong horse battery", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    /// Made with Python's `bcrypt` (`bcrypt.hashpw(b"correct horse battery", bcrypt.gensalt(4))`).
    const PY_BCRYPT: &str = "$2b$04$Ki1V8GbvdZpt7I9ABRlVeuLlXByJ02FuJ0vDVpofBaKapyqbthP4W";

    #[test]
    fn imported_bcrypt_hashes_verify_in_every_prefix() {
        for prefix in ["$2a$", "$2b$", "$2y$"] {
            let h = format!("{prefix}{}", &PY_BCRYPT[4..]);
            assert_eq!(hash_form(&h), Some(HashForm::Bcrypt), "{h}");
            assert!(verify_password("correct horse battery", &h), "{h}");
            assert!(!verify_password("correct horse batterY", &h), "{h}");
            assert!(needs_rehash(&h));
        }
        // Cut short or with a foreign character: not usable, never matches.
        let short = &PY_BCRYPT[..59];
        assert_eq!(hash_form(short), None);
        assert!(!verify_password("correct horse battery", short));
    }

    #[test]
    fn other_argon2_forms_verify_and_are_rehashed() {
        let salt = SaltString::generate(&mut OsRng);
        for alg in [Algorithm::Argon2i, Algorithm::Argon2d, Algorithm::Argon2id] {
            let params = Params::new(1024, 1, 1, None).unwrap();
            let h = Argon2::new(alg, Version::V0x13, params)
                .hash_password(b"correct horse battery", &salt)
                .unwrap()
                .to_string();
            assert_eq!(hash_form(&h), Some(HashForm::Argon2), "{h}");
            assert!(verify_password("correct horse battery", &h), "{h}");
            assert!(!verify_password("wrong horse battery", &h), "{h}");
            assert!(needs_rehash(&h), "{h}");
        }
        let ours = hash_password(&Password::parse("correct horse battery").unwrap()).unwrap();
        assert_eq!(hash_form(&ours), Some(HashForm::Argon2));
        assert!(!needs_rehash(&ours));
    }

    #[test]
    fn unusable_hashes_never_match() {
        for h in [
            NO_PASSWORD,
            "",
            "pbkdf2_sha256$260000$salt$hash",
            "$pbkdf2-sha512$25000$N2YuDQGUfW3pvj3z.q/pQA$9p5Bq0cJ8oDeY4BsyxNbE9QSB3oiGJHylq9KqDM5SEs",
            "pbkdf2:sha1:1000$salt$0123456789abcdef0123456789abcdef01234567",
            "$6$rounds=5000$salt$hash",
        ] {
            assert_eq!(hash_form(h), None, "{h}");
            assert!(!verify_password("", h), "{h}");
            assert!(!verify_password("correct horse battery", h), "{h}");
        }
    }

    #[test]
    fn werkzeug_django_and_passlib_hashes_verify_and_are_replaced() {
        // Made by passlib 1.9.5 (`pbkdf2_sha256.using(rounds=1000).hash`).
        let h = "$pbkdf2-sha256$1000$k1IK4RxDCOF8TwkhxHjvHQ$nus3lSLfiPediy9lc4TetwkDm9hG/CL/y1ftvBjLJLs";
        assert_eq!(
            hash_form(h),
            Some(HashForm::Other(crate::passwords::Form::PasslibPbkdf2))
        );
        assert!(verify_password("correct horse battery", h));
        assert!(!verify_password("correct horse batter", h));
        assert!(needs_rehash(h));
    }

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.expose().len() >= 43 + 3);
        assert_ne!(token_hash(a.expose()), token_hash(b.expose()));
    }

    #[test]
    fn throttle_after_ten_failures_in_window() {
        let t = Throttle::new();
        for i in 0..9 {
            t.record_failure("a@b.c", 1000 + i);
            assert_eq!(t.check("a@b.c", 1000 + i), None);
        }
        t.record_failure("a@b.c", 1009);
        let wait = t.check("a@b.c", 1010).unwrap();
        assert_eq!(wait, 1000 + WINDOW_SECS - 1010);
        assert_eq!(t.check("other@b.c", 1010), None);
        // The oldest failure leaves the window: allowed again.
        assert_eq!(t.check("a@b.c", 1000 + WINDOW_SECS), None);
    }

    #[test]
    fn a_throttle_with_another_limit_counts_to_it() {
        let t = Throttle::with_limit(3);
        for i in 0..2 {
            t.record_failure("127.0.0.1", 1000 + i);
        }
        assert_eq!(t.check("127.0.0.1", 1002), None);
        t.record_failure("127.0.0.1", 1002);
        assert_eq!(t.check("127.0.0.1", 1003), Some(1000 + WINDOW_SECS - 1003));
        assert_eq!(t.check("127.0.0.2", 1003), None);
    }

    #[test]
    fn addresses_are_counted_by_ipv4_address_or_ipv6_network() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff::1"), key("2001:db8:1:2::9"));
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    #[test]
    fn success_clears() {
        let t = Throttle::new();
        for i in 0..10 {
            t.record_failure("a@b.c", i);
        }
        assert!(t.check("a@b.c", 10).is_some());
        t.record_success("a@b.c");
        assert!(t.check("a@b.c", 10).is_none());
    }

    #[test]
    fn throttle_map_is_bounded() {
        let t = Throttle::new();
        for i in 0..MAX_TRACKED + 500 {
            // All within one window: none can be pruned as old.
            t.record_failure(&format!("user{i}@example.com"), 1000 + i as i64 / 100);
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        // The newest are kept, the stalest went.
        let (first, last) = (
            "user0@example.com".to_owned(),
            format!("user{}@example.com", MAX_TRACKED + 499),
        );
        for _ in 0..MAX_FAILURES - 1 {
            t.record_failure(&first, 1200);
            t.record_failure(&last, 1200);
        }
        assert!(t.check(&first, 1200).is_none(), "user0 was evicted");
        assert!(t.check(&last, 1200).is_some());
        assert_eq!(t.tracked(), MAX_TRACKED);
    }

    #[test]
    fn sessions_live_their_whole_lifetime() {
        use std::time::Duration;
        assert_eq!(expiry_after(Duration::from_millis(10_700), 1), 12);
        assert_eq!(expiry_after(Duration::from_millis(10_001), 1), 12);
        assert_eq!(expiry_after(Duration::from_secs(10), 1), 11);
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
