//! The password hashes other applications wrote, which `import-legacy` keeps and login verifies
//! (then replaces with keyrack's own argon2id at the first success, `crate::auth`): the forms
//! of Werkzeug (Flask), Django and passlib. bcrypt and argon2 are verified in `crate::auth`.
//!
//! | form | text |
//! |---|---|
//! | Werkzeug scrypt (its default since 3.0) | `scrypt:N:r:p$salt$hex` (64-byte key, the salt's text as bytes) |
//! | Werkzeug pbkdf2 | `pbkdf2:sha256[:iterations]$salt$hex` (1,000,000 iterations when absent) |
//! | Django | `pbkdf2_sha256$iterations$salt$base64` |
//! | passlib | `$pbkdf2-sha256$rounds$salt$checksum`, both in passlib's "ab64" (base64 with `.` for `+`, no padding) |
//!
//! The primitives are the RustCrypto crates `scrypt`, `pbkdf2`, `hmac` and `sha2`; only the
//! text forms are parsed here. Costs are bounded (a hash is data from another program): scrypt
//! at most 256 MiB of memory, pbkdf2 at most 10 million iterations; a hash outside them is not
//! usable (its user gets no password, and the import's report says why).

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use hmac::Hmac;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The forms this module verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    WerkzeugScrypt,
    WerkzeugPbkdf2,
    DjangoPbkdf2,
    PasslibPbkdf2,
}

impl Form {
    /// The name the import's counts and report use.
    pub fn name(self) -> &'static str {
        match self {
            Form::WerkzeugScrypt => "werkzeug scrypt",
            Form::WerkzeugPbkdf2 => "werkzeug pbkdf2",
            Form::DjangoPbkdf2 => "django pbkdf2_sha256",
            Form::PasslibPbkdf2 => "passlib pbkdf2-sha256",
        }
    }
}

/// Werkzeug's pbkdf2 iterations when the hash names none (what Werkzeug 3.1 assumes; it
/// always writes them).
const WERKZEUG_PBKDF2_DEFAULT: u32 = 1_000_000;
/// The most pbkdf2 iterations a kept hash may ask for.
const MAX_ITERATIONS: u32 = 10_000_000;
/// The most memory an scrypt hash may ask for (128 · r · N bytes).
const MAX_SCRYPT_BYTES: u64 = 256 * 1024 * 1024;

/// One parsed hash: what to compute and what it must equal.
struct Parsed {
    kdf: Kdf,
    salt: Vec<u8>,
    expected: Vec<u8>,
}

enum Kdf {
    Scrypt { log_n: u8, r: u32, p: u32 },
    Pbkdf2Sha256 { iterations: u32 },
}

/// The form of `hash` when it is one of this module's, well formed and within the bounds.
pub fn form(hash: &str) -> Option<Form> {
    parse(hash).map(|(form, _)| form)
}

/// Whether `password` matches `hash` (false for a hash that is not one of these forms).
pub fn verify(password: &str, hash: &str) -> bool {
    let Some((_, parsed)) = parse(hash) else {
        return false;
    };
    let mut out = Zeroizing::new(vec![0u8; parsed.expected.len()]);
    match parsed.kdf {
        Kdf::Scrypt { log_n, r, p } => {
            let Ok(params) = scrypt::Params::new(log_n, r, p, parsed.expected.len()) else {
                return false;
            };
            if scrypt::scrypt(password.as_bytes(), &parsed.salt, &params, &mut out).is_err() {
                return false;
            }
        }
        Kdf::Pbkdf2Sha256 { iterations } => {
            if pbkdf2::pbkdf2::<Hmac<Sha256>>(
                password.as_bytes(),
                &parsed.salt,
                iterations,
                &mut out,
            )
            .is_err()
            {
                return false;
            }
        }
    }
    crate::auth::constant_time_eq(&out, &parsed.expected)
}

fn parse(hash: &str) -> Option<(Form, Parsed)> {
    if let Some(rest) = hash.strip_prefix("scrypt:") {
        return werkzeug_scrypt(rest).map(|p| (Form::WerkzeugScrypt, p));
    }
    if let Some(rest) = hash.strip_prefix("pbkdf2:sha256") {
        return werkzeug_pbkdf2(rest).map(|p| (Form::WerkzeugPbkdf2, p));
    }
    if let Some(rest) = hash.strip_prefix("pbkdf2_sha256$") {
        return django(rest).map(|p| (Form::DjangoPbkdf2, p));
    }
    if let Some(rest) = hash.strip_prefix("$pbkdf2-sha256$") {
        return passlib(rest).map(|p| (Form::PasslibPbkdf2, p));
    }
    None
}

/// `N:r:p$salt$hex`.
fn werkzeug_scrypt(rest: &str) -> Option<Parsed> {
    let (method, salt, digest) = three(rest)?;
    let mut nums = method.split(':');
    let n: u64 = number(nums.next()?)?;
    let r: u32 = number(nums.next()?)?;
    let p: u32 = number(nums.next()?)?;
    if nums.next().is_some() || !n.is_power_of_two() || n < 2 || r == 0 || p == 0 || p > 16 {
        return None;
    }
    if 128u64.checked_mul(u64::from(r))?.checked_mul(n)? > MAX_SCRYPT_BYTES {
        return None;
    }
    // Werkzeug's scrypt key is 64 bytes.
    let expected = hex(digest).filter(|d| d.len() == 64)?;
    Some(Parsed {
        kdf: Kdf::Scrypt {
            log_n: n.trailing_zeros() as u8,
            r,
            p,
        },
        salt: nonempty(salt)?.as_bytes().to_vec(),
        expected,
    })
}

/// `[:iterations]$salt$hex` (after `pbkdf2:sha256`).
fn werkzeug_pbkdf2(rest: &str) -> Option<Parsed> {
    let (method, salt, digest) = three(rest)?;
    let iterations = match method {
        "" => WERKZEUG_PBKDF2_DEFAULT,
        m => iterations(m.strip_prefix(':')?)?,
    };
    Some(Parsed {
        kdf: Kdf::Pbkdf2Sha256 { iterations },
        salt: nonempty(salt)?.as_bytes().to_vec(),
        expected: sha256_sized(hex(digest)?)?,
    })
}

/// `iterations$salt$base64` (after `pbkdf2_sha256$`).
fn django(rest: &str) -> Option<Parsed> {
    let (iters, salt, digest) = three(rest)?;
    let expected = STANDARD.decode(digest).ok()?;
    Some(Parsed {
        kdf: Kdf::Pbkdf2Sha256 {
            iterations: iterations(iters)?,
        },
        salt: nonempty(salt)?.as_bytes().to_vec(),
        expected: sha256_sized(expected)?,
    })
}

/// `rounds$ab64 salt$ab64 checksum` (after `$pbkdf2-sha256$`).
fn passlib(rest: &str) -> Option<Parsed> {
    let (rounds, salt, checksum) = three(rest)?;
    Some(Parsed {
        kdf: Kdf::Pbkdf2Sha256 {
            iterations: iterations(rounds)?,
        },
        salt: ab64(salt)?,
        expected: sha256_sized(ab64(checksum)?)?,
    })
}

/// `a$b$c`, none containing `$`.
fn three(s: &str) -> Option<(&str, &str, &str)> {
    let mut parts = s.split('$');
    let out = (parts.next()?, parts.next()?, parts.next()?);
    parts.next().is_none().then_some(out)
}

fn number<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn iterations(s: &str) -> Option<u32> {
    number::<u32>(s).filter(|n| (1..=MAX_ITERATIONS).contains(n))
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// A PBKDF2-HMAC-SHA256 digest as these programs write it: the hash's own size, 32 bytes.
fn sha256_sized(b: Vec<u8>) -> Option<Vec<u8>> {
    (b.len() == 32).then_some(b)
}

/// Lowercase or uppercase hexadecimal.
fn hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// passlib's "ab64": standard base64 with `.` for `+`, without padding.
fn ab64(s: &str) -> Option<Vec<u8>> {
    if s.contains('+') || s.contains('=') {
        return None;
    }
    STANDARD_NO_PAD.decode(s.replace('.', "+")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by the programs themselves (Werkzeug 3.1.9, passlib 1.9.5, Django 5.2.20), low
    // costs for the quick ones; the password is "correct horse battery".
    const PASSWORD: &str = "correct horse battery";
    const MADE: [(Form, &str); 4] = [
        (
            Form::WerkzeugScrypt,
            "scrypt:1024:8:1$OZoVqAEuvsRoj5ye$ef075890c6978e9828f62f8e5d7590768afeb5dbadfebdf9ba95ce6f975a5819e347dfa914aa0f2fcf020a6b86425d81b96536a6388919abb3bf0edb9c9e2c27",
        ),
        (
            Form::WerkzeugPbkdf2,
            "pbkdf2:sha256:1000$ZrJ0bYyT86zFGls0$4f17a83bca7f2549cb371bd55ed769cca89938a5055f60e918acc6cec67b8c1c",
        ),
        (
            Form::PasslibPbkdf2,
            "$pbkdf2-sha256$1000$k1IK4RxDCOF8TwkhxHjvHQ$nus3lSLfiPediy9lc4TetwkDm9hG/CL/y1ftvBjLJLs",
        ),
        (
            Form::DjangoPbkdf2,
            "pbkdf2_sha256$1000$djangosalt123$vlWBfC1d6kaVqHXUSRZCC8szkX2nKeSf8xujyzGniiQ=",
        ),
    ];
    // Each program's default, made the same way: Werkzeug's `generate_password_hash` (scrypt,
    // and method "pbkdf2"), passlib's `pbkdf2_sha256.hash`, Django's `PBKDF2PasswordHasher`.
    const DEFAULTS: [(Form, &str); 4] = [
        (
            Form::WerkzeugScrypt,
            "scrypt:32768:8:1$IbsD9z89hM0rjgEK$ee267ecc3fa1b82c17e38ee2693c5366e47411aba3725091d0caa27949d850631860201b20d4828baa7f07e6b5cd57cdbc436cbfb966285afba9674b8d4abd0d",
        ),
        (
            Form::WerkzeugPbkdf2,
            "pbkdf2:sha256:1000000$b6QJJtdusoVawu3d$f3b058234961babe30d1e80edd5ebec355d0741d33e9c2cab829cd88cc93ead7",
        ),
        (
            Form::PasslibPbkdf2,
            "$pbkdf2-sha256$29000$2VtLSYlxDiHk3Ntbay0lpA$q8KClx.Wir/Gp3UJ3je6QHoWIYZ440gij5HIkTaHs/s",
        ),
        (
            Form::DjangoPbkdf2,
            "pbkdf2_sha256$1000000$djangosalt123$U0HcHPajDPmVZZ6uEPQGa6mLtaFzN71zBKwnCoVI3JU=",
        ),
    ];

    #[test]
    fn each_form_verifies_the_right_password_only() {
        for (form_expected, hash) in MADE {
            assert_eq!(form(hash), Some(form_expected), "{hash}");
            assert!(verify(PASSWORD, hash), "{hash}");
            assert!(!verify("correct horse batterY", hash), "{hash}");
            assert!(!verify("", hash), "{hash}");
            // One changed character of the digest: no match.
            let mut tampered = hash.to_owned();
            let last = tampered.pop().unwrap();
            tampered.push(if last == 'a' { 'b' } else { 'a' });
            assert!(!verify(PASSWORD, &tampered), "{tampered}");
        }
    }

    #[test]
    fn each_program_s_default_hash_verifies() {
        for (form_expected, hash) in DEFAULTS {
            assert_eq!(form(hash), Some(form_expected), "{hash}");
            // A million rounds of HMAC take seconds in a debug build: those two are verified
            // in an optimized one (`cargo test --release --lib passwords`), parsed in both.
            let million = hash.contains("$1000000$") || hash.contains(":1000000$");
            if !million || !cfg!(debug_assertions) {
                assert!(verify(PASSWORD, hash), "{hash}");
            }
        }
    }

    #[test]
    fn the_production_defaults_parse() {
        let hex64 = "ab".repeat(64);
        let hex32 = "cd".repeat(32);
        let b64 = STANDARD.encode([7u8; 32]);
        let ab = |b: &[u8]| STANDARD_NO_PAD.encode(b).replace('+', ".");
        for (hash, f) in [
            // Werkzeug 3's default method, `scrypt`, is written with its parameters.
            (
                format!("scrypt:32768:8:1$Zr8vjX1TyNhE2Tnz${hex64}"),
                Form::WerkzeugScrypt,
            ),
            (
                format!("pbkdf2:sha256:600000$N2Hc5H3Cq0UJn8pd${hex32}"),
                Form::WerkzeugPbkdf2,
            ),
            (
                format!("pbkdf2:sha256:260000$N2Hc5H3Cq0UJn8pd${hex32}"),
                Form::WerkzeugPbkdf2,
            ),
            (
                format!("pbkdf2:sha256$N2Hc5H3Cq0UJn8pd${hex32}"),
                Form::WerkzeugPbkdf2,
            ),
            (
                format!("pbkdf2_sha256$870000$Uo1pGk1B2kXc0v8yHq3x7p${b64}"),
                Form::DjangoPbkdf2,
            ),
            (
                format!("$pbkdf2-sha256$29000${}${}", ab(&[0xfb; 16]), ab(&[1; 32])),
                Form::PasslibPbkdf2,
            ),
        ] {
            assert_eq!(form(&hash), Some(f), "{hash}");
        }
    }

    #[test]
    fn malformed_or_too_costly_hashes_are_not_usable() {
        let hex64 = "ab".repeat(64);
        for bad in [
            format!("scrypt:1000:8:1$salt${hex64}"), // N not a power of two
            format!("scrypt:1048576:8:1$salt${hex64}"), // 1 GiB
            format!("scrypt:16384:8$salt${hex64}"),  // no p
            "scrypt:16384:8:1$salt$xyz".to_owned(),
            format!("pbkdf2:sha256:0$salt${hex64}"),
            format!("pbkdf2:sha256:99999999$salt${hex64}"),
            format!("pbkdf2:sha1:1000$salt${hex64}"),
            format!("pbkdf2:sha256:1000$${hex64}"),
            "pbkdf2_sha256$1000$salt$not base64!".to_owned(),
            "$pbkdf2-sha256$1000$a+b$cdef".to_owned(),
            "$pbkdf2-sha256$x$abc$def".to_owned(),
            format!("pbkdf2:sha256:1000$salt${hex64}$extra"),
        ] {
            assert_eq!(form(&bad), None, "{bad}");
            assert!(!verify("anything", &bad));
        }
    }
}
