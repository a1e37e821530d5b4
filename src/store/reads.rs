//! The events of reads (`key.revealed`, `key.expired`) as they wait in the usage queues: plain
//! values, held inline, until a flush folds and writes them (`fold`).

use super::events::ServiceActor;
use super::{now, Source};

/// The event of a read (`key.revealed`, `key.expired`) done by the user, queued with the usage
/// counters until the next flush. Plain values, no allocation: a busy server queues one per
/// reveal, many thousands a second. With `at` 0, the key a read is folded by (`fold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ReadEvent {
    pub(crate) at: i64,
    pub(crate) action: &'static str,
    pub(crate) user_id: i64,
    pub(crate) api_key_id: Option<i64>,
    provider: ShortName,
    pub(crate) source: Source,
    /// The service that read, if a service did (its token's id and name).
    service: Option<(i64, ShortName<64>)>,
}

impl ReadEvent {
    pub(crate) fn new(
        action: &'static str,
        user_id: i64,
        api_key_id: Option<i64>,
        provider: &str,
        source: Source,
    ) -> ReadEvent {
        ReadEvent {
            at: now(),
            action,
            user_id,
            api_key_id,
            provider: ShortName::new(provider),
            source,
            service: None,
        }
    }

    /// The key its reads are folded by (`fold`): the event without its time.
    pub(crate) fn fold_key(self) -> ReadEvent {
        ReadEvent { at: 0, ..self }
    }

    /// The provider read.
    pub(crate) fn provider(&self) -> &str {
        self.provider.as_str()
    }

    /// The same read, done by a service.
    pub(crate) fn by(mut self, service: Option<&ServiceActor>) -> ReadEvent {
        self.service = service.map(|s| {
            let name = s.actor.strip_prefix("service:").unwrap_or(&s.actor);
            (s.token_id, ShortName::new(name))
        });
        self
    }

    /// The service token the read was done through, if a service did it.
    pub(crate) fn service_token_id(&self) -> Option<i64> {
        self.service.map(|(id, _)| id)
    }

    /// `user:<id>`, or `service:<name>` when a service read.
    pub(crate) fn actor(&self) -> String {
        let mut out = String::new();
        self.write_actor(&mut out);
        out
    }

    fn write_actor(&self, out: &mut String) {
        match &self.service {
            Some((_, name)) => {
                out.push_str("service:");
                out.push_str(name.as_str());
            }
            None => {
                use std::fmt::Write;
                let _ = write!(out, "user:{}", self.user_id);
            }
        }
    }

    /// The same event as every other one is written: what `fold` writes, as the tests check.
    #[cfg(test)]
    pub(crate) fn to_event(self) -> super::events::Event {
        let mut actor = String::new();
        self.write_actor(&mut actor);
        let mut e = super::events::Event::new(self.action, actor)
            .user(self.user_id)
            .key(self.api_key_id, self.provider.as_str(), self.source)
            .service_token(self.service.map(|(id, _)| id));
        e.at = self.at;
        e
    }
}

/// A name held inline: a provider (at most 32 bytes: `domain::Provider`) or a service token's
/// name (at most 64: `domain::TokenName`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ShortName<const N: usize = 32> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> ShortName<N> {
    fn new(s: &str) -> ShortName<N> {
        // A longer name is cut at a character boundary; the checked names never give one.
        let mut len = s.len().min(N);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0; N];
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        ShortName {
            len: len as u8,
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        // Built from a `&str` cut at a character boundary.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl<const N: usize> std::fmt::Debug for ShortName<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}
