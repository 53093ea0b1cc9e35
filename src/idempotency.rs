//! Idempotent publishing: a backend names each event with a key, and an
//! event published again with the same key within the window (a retry) is
//! stored and delivered once, on any instance.
//!
//! - The key is the event object's `idempotencyKey`, or the
//!   `Idempotency-Key` header for a body that is one event object: bare (as
//!   Stripe takes it) or as the quoted string of the IETF draft
//!   (`"8e03978e-…"`). It is 1 to 255 visible ASCII characters other than
//!   `"` and `\`, scoped to the event's campaign, and never delivered to
//!   clients.
//! - The log remembers a key, atomically with the append of its event, for
//!   the window and at most as many keys per shard as the shard keeps events
//!   (`HERALD_REPLAY_MAX_EVENTS`): in memory ([`Seen`]), or in a sorted set
//!   beside each shard's stream in Redis, in the stream's hash slot.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};

use crate::rooms::CampaignId;

/// The header that carries a single event's key.
pub const HEADER: &str = "idempotency-key";

/// Longest key, in bytes (every accepted character is ASCII).
pub const MAX_KEY_LEN: usize = 255;

/// Why a string is not an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected 1 to 255 visible ASCII characters, without '\"' or '\\'")]
pub struct InvalidKey;

/// A valid idempotency key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Validates `s` as a key.
    pub fn parse(s: &str) -> Result<Self, InvalidKey> {
        let ok = !s.is_empty()
            && s.len() <= MAX_KEY_LEN
            && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if ok { Ok(IdempotencyKey(Arc::from(s))) } else { Err(InvalidKey) }
    }

    /// Reads the `Idempotency-Key` header's value: the key bare, or as a
    /// structured-field string (in double quotes).
    pub fn from_header(value: &[u8]) -> Result<Self, InvalidKey> {
        let text = std::str::from_utf8(value).map_err(|_| InvalidKey)?.trim_matches(' ');
        let bare = match text.strip_prefix('"') {
            Some(quoted) => quoted.strip_suffix('"').ok_or(InvalidKey)?,
            None => text,
        };
        IdempotencyKey::parse(bare)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as the log remembers it: scoped to `campaign` (neither holds
    /// a space).
    pub fn scoped(&self, campaign: &CampaignId) -> Arc<str> {
        Arc::from(format!("{campaign} {}", self.0))
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        IdempotencyKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The keys an in-memory log has stored events under: each for the window,
/// and at most `max` of them (the oldest are forgotten first).
pub struct Seen {
    window: Duration,
    max: usize,
    keys: HashSet<Arc<str>>,
    order: VecDeque<(Instant, Arc<str>)>,
}

impl Seen {
    pub fn new(window: Duration, max: usize) -> Seen {
        Seen { window, max: max.max(1), keys: HashSet::new(), order: VecDeque::new() }
    }

    /// Records `key` at `now`; false when it was recorded within the window
    /// (the event is a duplicate).
    pub fn first(&mut self, key: &Arc<str>, now: Instant) -> bool {
        self.expire(now);
        if self.keys.contains(key) {
            return false;
        }
        while self.order.len() >= self.max {
            self.forget_oldest();
        }
        self.keys.insert(key.clone());
        self.order.push_back((now, key.clone()));
        true
    }

    /// Forgets the keys older than the window.
    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.window) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.keys.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_without_quotes_or_backslashes() {
        for good in ["a", "8e03978e-40d5-43e8-bc93-6894a57f9324", "KG5LxwFBepaKHyUD", "a/b+c=d:e", &"k".repeat(255)] {
            assert!(IdempotencyKey::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", "two words", "tab\t", "quote\"", "back\\slash", "é", "line\n", &"k".repeat(256)] {
            assert_eq!(IdempotencyKey::parse(bad), Err(InvalidKey), "{bad:?}");
        }
    }

    #[test]
    fn the_header_takes_a_bare_key_or_a_quoted_string() {
        let key = |v: &str| IdempotencyKey::from_header(v.as_bytes()).map(|k| k.as_str().to_owned());
        assert_eq!(key("abc-1").unwrap(), "abc-1");
        assert_eq!(key("\"abc-1\"").unwrap(), "abc-1");
        assert_eq!(key(" abc-1 ").unwrap(), "abc-1");
        for bad in ["", "\"\"", "\"abc", "\"a\\\"b\"", "a b"] {
            assert_eq!(key(bad), Err(InvalidKey), "{bad:?}");
        }
        assert_eq!(IdempotencyKey::from_header(&[0xff, b'a']), Err(InvalidKey));
    }

    #[test]
    fn a_key_is_scoped_to_its_campaign() {
        let key = IdempotencyKey::parse("k1").unwrap();
        assert_eq!(&*key.scoped(&CampaignId::parse("c1").unwrap()), "c1 k1");
    }

    #[test]
    fn seen_keys_last_the_window_and_at_most_max() {
        let start = Instant::now();
        let mut seen = Seen::new(Duration::from_secs(10), 3);
        let k = |s: &str| Arc::<str>::from(s);
        assert!(seen.first(&k("a"), start));
        assert!(!seen.first(&k("a"), start + Duration::from_secs(9)), "a retry within the window");
        assert!(seen.first(&k("a"), start + Duration::from_secs(10)), "the window is over");
        for (i, key) in ["b", "c", "d"].into_iter().enumerate() {
            assert!(seen.first(&k(key), start + Duration::from_secs(11 + i as u64)));
        }
        // "a" (at 10 s) was the oldest of four: forgotten to keep three.
        assert!(seen.first(&k("a"), start + Duration::from_secs(14)), "the oldest was forgotten first");
        assert!(!seen.first(&k("d"), start + Duration::from_secs(15)), "the newest is kept");
        seen.expire(start + Duration::from_secs(60));
        assert_eq!(seen.order.len(), 0, "all past the window");
    }
}
