//! Sealing and opening of stored API keys, and nothing else: no SQL, no HTTP.
//!
//! A sealed value is `kr1:<key id>:<base64(nonce || ciphertext+tag)>`: AES-256-GCM under a fresh
//! random 96-bit nonce, with associated data that binds the value to its user and provider, so
//! a ciphertext copied into another user's row (or another provider's) does not open. The key id
//! names the key that sealed the value; it is a short hash of the key, safe to store and to log.

use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use zeroize::Zeroizing;

use crate::domain::Secret;

const PREFIX: &str = "kr1";
const NONCE_LEN: usize = 12;

/// The identity of an encryption key: 16 hex characters of a domain-separated SHA-256 of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn from_stored(s: &str) -> KeyId {
        KeyId(s.to_owned())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 256-bit encryption key. Wiped on drop, never printed.
pub struct EncryptionKey {
    bytes: Zeroizing<[u8; 32]>,
    id: KeyId,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey(id={})", self.id)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    #[error("is not standard base64")]
    NotBase64,
    #[error("must decode to 32 bytes, got {0}")]
    WrongLength(usize),
}

impl EncryptionKey {
    pub fn generate() -> EncryptionKey {
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(bytes.as_mut());
        EncryptionKey::from_bytes(bytes)
    }

    /// Parses 32 bytes in standard base64 (44 characters), white space around it ignored.
    pub fn from_base64(text: &str) -> Result<EncryptionKey, KeyParseError> {
        let decoded = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| KeyParseError::NotBase64)?,
        );
        if decoded.len() != 32 {
            return Err(KeyParseError::WrongLength(decoded.len()));
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&decoded);
        Ok(EncryptionKey::from_bytes(bytes))
    }

    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> EncryptionKey {
        let mut h = Sha256::new();
        h.update(b"keyrack key id v1\0");
        h.update(bytes.as_ref());
        let digest = h.finalize();
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        EncryptionKey {
            bytes,
            id: KeyId(id),
        }
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.bytes.as_ref()))
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.bytes.as_ref()))
    }
}

/// What a sealed value is bound to. Opening with any other binding fails.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub user_id: i64,
    pub provider: &'a str,
}

impl Binding<'_> {
    /// The associated data every value of this binding is sealed with. Written on the stack when
    /// it fits (a value is opened on every reveal): a user id has at most 20 characters and a
    /// provider 32, so every binding keyrack makes does.
    fn aad(&self) -> Aad {
        let mut buf = [0; AAD_INLINE];
        let mut rest = &mut buf[..];
        if self.write_aad(&mut rest).is_ok() {
            let len = AAD_INLINE - rest.len();
            return Aad::Inline(buf, len);
        }
        let mut heap = Vec::new();
        let _ = self.write_aad(&mut heap);
        Aad::Heap(heap)
    }

    fn write_aad(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        write!(
            out,
            "keyrack/v1/user:{}/provider:{}",
            self.user_id, self.provider
        )
    }
}

const AAD_INLINE: usize = 128;

/// `Binding::aad`'s bytes.
enum Aad {
    Inline([u8; AAD_INLINE], usize),
    Heap(Vec<u8>),
}

impl std::ops::Deref for Aad {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Aad::Inline(buf, len) => buf.get(..*len).unwrap_or_default(),
            Aad::Heap(v) => v,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("the value is not in keyrack's sealed format")]
    Malformed,
    #[error("the value was sealed with key {0}, which is not configured")]
    UnknownKey(String),
    #[error("the value does not authenticate (tampered, or bound to another user or provider)")]
    Rejected,
}

/// The configured keys: the one that seals, and others that only open (rotation).
///
/// The key that seals is the database's current key (the id recorded in the database), which
/// a ring holding it switches to (`switch_to`): at start, and when `rotate-encryption-key` run
/// by another process records a new one while a server is serving. It is the configured
/// `KEYRACK_ENCRYPTION_KEY` unless the database still records an older key of the ring.
pub struct KeyRing {
    /// The configured current key first, then the old keys.
    keys: Vec<(EncryptionKey, Aes256Gcm)>,
    /// Index into `keys` of the key that seals.
    sealing: AtomicUsize,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", self.current_id())
            .field(
                "keys",
                &self.keys.iter().map(|k| &k.0.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KeyRing {
    pub fn new(current: EncryptionKey, old: Vec<EncryptionKey>) -> KeyRing {
        KeyRing {
            keys: std::iter::once(current)
                .chain(old)
                .map(|k| {
                    let c = k.cipher();
                    (k, c)
                })
                .collect(),
            sealing: AtomicUsize::new(0),
        }
    }

    /// The id of the key that seals new values.
    pub fn current_id(&self) -> &KeyId {
        self.keys[self.sealing.load(Ordering::Relaxed)].0.id()
    }

    /// The id of `KEYRACK_ENCRYPTION_KEY`, the key a rotation re-seals under.
    pub fn configured_id(&self) -> &KeyId {
        self.keys[0].0.id()
    }

    /// The ids of every key of the ring, the configured current key first.
    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.iter().map(|(k, _)| k.id())
    }

    /// Makes the key `id` the one that seals. False when the ring does not hold it.
    pub fn switch_to(&self, id: &KeyId) -> bool {
        match self.keys.iter().position(|(k, _)| k.id() == id) {
            Some(i) => {
                self.sealing.store(i, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// True when `id` is the current key or one of the old ones.
    pub fn knows(&self, id: &KeyId) -> bool {
        self.cipher_for(id.as_str()).is_some()
    }

    fn cipher_for(&self, id: &str) -> Option<&Aes256Gcm> {
        self.keys
            .iter()
            .find(|(k, _)| k.id.as_str() == id)
            .map(|(_, c)| c)
    }

    /// Seals `plaintext` under the current key with a fresh random nonce.
    pub fn seal(&self, binding: Binding<'_>, plaintext: &str) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = binding.aad();
        let (key, cipher) = &self.keys[self.sealing.load(Ordering::Relaxed)];
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            // AES-GCM encryption fails only for messages over 64 GiB; keys are at most 512 bytes.
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut raw = Vec::with_capacity(NONCE_LEN + ct.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&ct);
        format!("{PREFIX}:{}:{}", key.id, STANDARD.encode(raw))
    }

    /// The id of the key that sealed `sealed`, if the value is well formed.
    pub fn sealed_with(sealed: &str) -> Option<KeyId> {
        let mut parts = sealed.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(PREFIX), Some(id), Some(_)) => Some(KeyId(id.to_owned())),
            _ => None,
        }
    }

    /// Opens a sealed value bound to `binding`.
    pub fn open(&self, binding: Binding<'_>, sealed: &str) -> Result<Secret, OpenError> {
        let mut parts = sealed.splitn(3, ':');
        let (id, body) = match (parts.next(), parts.next(), parts.next()) {
            (Some(PREFIX), Some(id), Some(body)) => (id, body),
            _ => return Err(OpenError::Malformed),
        };
        let cipher = self
            .cipher_for(id)
            .ok_or_else(|| OpenError::UnknownKey(id.to_owned()))?;
        // Decrypted in place, in a buffer wiped when dropped: the plaintext is never copied, and
        // a value that fails to authenticate (whose buffer holds it decrypted all the same) is
        // wiped too.
        let mut buf = Zeroizing::new(STANDARD.decode(body).map_err(|_| OpenError::Malformed)?);
        if buf.len() < NONCE_LEN + 16 {
            return Err(OpenError::Malformed);
        }
        let nonce = *Nonce::from_slice(&buf[..NONCE_LEN]);
        buf.drain(..NONCE_LEN);
        cipher
            .decrypt_in_place(&nonce, &binding.aad(), &mut *buf)
            .map_err(|_| OpenError::Rejected)?;
        match String::from_utf8(std::mem::take(&mut *buf)) {
            Ok(text) => Ok(Secret::new(text)),
            Err(e) => {
                drop(Zeroizing::new(e.into_bytes()));
                Err(OpenError::Malformed)
            }
        }
    }

    /// True when `sealed` was sealed with the current key (nothing to re-encrypt).
    pub fn is_current(&self, sealed: &str) -> bool {
        KeyRing::sealed_with(sealed).is_some_and(|id| &id == self.current_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(EncryptionKey::generate(), vec![])
    }

    const ADA: Binding<'static> = Binding {
        user_id: 1,
        provider: "openai",
    };

    #[test]
    fn round_trip() {
        let r = ring();
        let sealed = r.seal(ADA, "sk-secret-123456");
        assert!(!sealed.contains("sk-secret"));
        assert_eq!(r.open(ADA, &sealed).unwrap().expose(), "sk-secret-123456");
    }

    #[test]
    fn fresh_nonce_each_time() {
        let r = ring();
        assert_ne!(r.seal(ADA, "same-value"), r.seal(ADA, "same-value"));
    }

    #[test]
    fn bound_to_user_and_provider() {
        let r = ring();
        let sealed = r.seal(ADA, "sk-secret-123456");
        let other_user = Binding {
            user_id: 2,
            provider: "openai",
        };
        let other_provider = Binding {
            user_id: 1,
            provider: "anthropic",
        };
        assert_eq!(r.open(other_user, &sealed), Err(OpenError::Rejected));
        assert_eq!(r.open(other_provider, &sealed), Err(OpenError::Rejected));
    }

    /// The associated data is the same text whether it fits on the stack or not: values sealed
    /// by any version open with it.
    #[test]
    fn the_associated_data_is_the_binding_as_text() {
        let long = "p".repeat(200);
        for (user_id, provider) in [(1, "openai"), (i64::MIN, &*"q".repeat(32)), (7, &*long)] {
            let b = Binding { user_id, provider };
            assert_eq!(
                &*b.aad(),
                format!("keyrack/v1/user:{user_id}/provider:{provider}").as_bytes()
            );
        }
        assert!(matches!(ADA.aad(), Aad::Inline(..)));
        let b = Binding {
            user_id: 7,
            provider: &long,
        };
        assert!(matches!(b.aad(), Aad::Heap(_)));
        let r = ring();
        assert_eq!(
            r.open(b, &r.seal(b, "sk-long-provider"))
                .map(|s| s.expose().to_owned()),
            Ok("sk-long-provider".to_owned())
        );
    }

    /// At the stack buffer's edge (a text of 127, 128 and 129 bytes, and a negative user id
    /// whose digits end exactly at the edge) the associated data is still the whole text, the
    /// one `format!` made before it was written on the stack, and a value sealed with it opens.
    #[test]
    fn the_associated_data_at_the_stack_buffer_s_edge_is_the_whole_text() {
        let prefix = "keyrack/v1/user:1/provider:".len();
        let r = ring();
        let mut cases: Vec<(i64, String)> = (AAD_INLINE - prefix - 1..=AAD_INLINE - prefix + 1)
            .map(|n| (1, "p".repeat(n)))
            .collect();
        let negative = "keyrack/v1/user:-9223372036854775808/provider:".len();
        cases.push((i64::MIN, "q".repeat(AAD_INLINE - negative)));
        cases.push((i64::MIN, "q".repeat(AAD_INLINE - negative + 1)));
        for (user_id, provider) in &cases {
            let b = Binding {
                user_id: *user_id,
                provider,
            };
            let text = format!("keyrack/v1/user:{user_id}/provider:{provider}");
            assert_eq!(&*b.aad(), text.as_bytes(), "{} bytes", text.len());
            let sealed = r.seal(b, "sk-at-the-edge");
            assert_eq!(
                r.open(b, &sealed).map(|s| s.expose().to_owned()),
                Ok("sk-at-the-edge".to_owned()),
                "{} bytes",
                text.len()
            );
        }
    }

    #[test]
    fn a_value_that_opens_to_no_text_or_is_too_short_is_malformed() {
        let r = ring();
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = ADA.aad();
        let ct = r.keys[0]
            .1
            .encrypt(
                &nonce,
                Payload {
                    msg: &[0xff, 0xfe, 0x00],
                    aad: &aad,
                },
            )
            .unwrap();
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&ct);
        let sealed = format!("{PREFIX}:{}:{}", r.current_id(), STANDARD.encode(&raw));
        assert_eq!(r.open(ADA, &sealed), Err(OpenError::Malformed));
        let short = format!(
            "{PREFIX}:{}:{}",
            r.current_id(),
            STANDARD.encode(&raw[..27])
        );
        assert_eq!(r.open(ADA, &short), Err(OpenError::Malformed));
        // The same bytes as text open.
        let ok = r.seal(ADA, "sk-0123456789");
        assert_eq!(r.open(ADA, &ok).unwrap().expose(), "sk-0123456789");
    }

    #[test]
    fn tampering_is_detected() {
        let r = ring();
        let sealed = r.seal(ADA, "sk-secret-123456");
        let (head, body) = sealed.rsplit_once(':').unwrap();
        let mut raw = STANDARD.decode(body).unwrap();
        raw[20] ^= 1;
        let tampered = format!("{head}:{}", STANDARD.encode(raw));
        assert_eq!(r.open(ADA, &tampered), Err(OpenError::Rejected));
        assert_eq!(r.open(ADA, "plaintext"), Err(OpenError::Malformed));
    }

    #[test]
    fn names_its_key_and_old_keys_open() {
        let old = EncryptionKey::generate();
        let old_b64 = old.to_base64();
        let old_ring = KeyRing::new(old, vec![]);
        let sealed = old_ring.seal(ADA, "sk-rotated-value");
        assert_eq!(
            KeyRing::sealed_with(&sealed).as_ref(),
            Some(old_ring.current_id())
        );

        let new_only = ring();
        assert!(matches!(
            new_only.open(ADA, &sealed),
            Err(OpenError::UnknownKey(_))
        ));
        let both = KeyRing::new(
            EncryptionKey::generate(),
            vec![EncryptionKey::from_base64(&old_b64).unwrap()],
        );
        assert_eq!(
            both.open(ADA, &sealed).unwrap().expose(),
            "sk-rotated-value"
        );
        assert!(!both.is_current(&sealed));

        // Switching to the old key seals with it; a key the ring lacks is refused.
        let old_id = KeyRing::sealed_with(&sealed).unwrap();
        assert!(both.switch_to(&old_id));
        assert_eq!(both.current_id(), &old_id);
        assert_ne!(both.configured_id(), &old_id);
        assert_eq!(
            KeyRing::sealed_with(&both.seal(ADA, "sk-after-switch")),
            Some(old_id)
        );
        assert!(!both.switch_to(&KeyId::from_stored("0000000000000000")));
        assert_eq!(both.ids().count(), 2);
    }

    #[test]
    fn key_parsing() {
        let k = EncryptionKey::generate();
        let b64 = k.to_base64();
        assert_eq!(b64.len(), 44);
        assert_eq!(EncryptionKey::from_base64(&b64).unwrap().id(), k.id());
        assert_eq!(
            EncryptionKey::from_base64("not base64!").unwrap_err(),
            KeyParseError::NotBase64
        );
        assert_eq!(
            EncryptionKey::from_base64("AAAA").unwrap_err(),
            KeyParseError::WrongLength(3)
        );
        assert!(!format!("{k:?}").contains(b64.as_str()));
    }
}
