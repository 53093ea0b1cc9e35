//! The event log: the ordered sequences every outgoing event and every
//! revocation goes through. It gives each event its offset, and keeps recent
//! events (by time, by count and, in memory, by bytes) so that a client that
//! reconnects can ask for what it missed.
//!
//! The log is made of [`Stream`]s: shards, each holding the events of the
//! campaigns that hash to it ([`shard_of`]) in one order, and a control
//! stream that carries every revocation to every instance. Every event has a
//! campaign, and every room belongs to one, so a room's events are all in
//! one shard, in one order; events of campaigns in different shards have no
//! order between them.
//!
//! Revocations are never in a shard, so they cannot push events out of its
//! replay history. Each event carries instead the control stream's head
//! when it was appended (its `after` mark): an instance delivers it only
//! once it has applied the control stream up to there, so no event appended
//! after a revocation reaches the sockets that revocation took out.
//!
//! An append may carry an idempotency key per event: the log stores an
//! event whose key it has seen within the window once (see
//! [`crate::idempotency`]), in the same atomic step as the append.
//!
//! One interface, [`EventLog`] (append, read a stream after a position, read
//! what a replay needs, a stream's epoch and head), with two implementations:
//!
//! - [`MemoryLog`]: one instance, in memory, one shard;
//! - [`StreamLog`]: a fleet, one Redis Stream per shard plus the control
//!   stream; an instance reads only the shards its sockets need.
//!
//! An offset is `EEEEEEEEEEEEE-TTTTTTTTTTTTT-SSSSSSSSSS`: its shard's epoch
//! (the millisecond the shard's stream was created), then the position in it.
//! Fixed width, so offsets compare as plain strings; a stream created later
//! (after a Redis restart lost the old one) has a later epoch, so the offsets
//! of a room keep increasing.

mod memory;
mod stream;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use memory::MemoryLog;
pub use stream::StreamLog;

use crate::audience::Audience;
use crate::events::EventKind;
use crate::redis_conn::RedisError;
use crate::rooms::{CampaignId, Room};

/// One ordered sequence of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    /// The events of the campaigns that hash to it (numbered from 0).
    Shard(u32),
    /// Every revocation, for every instance.
    Control,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stream::Shard(k) => write!(f, "shard {k}"),
            Stream::Control => f.write_str("control"),
        }
    }
}

/// The shard of `campaign` among `shards`: CRC-16 (XMODEM, as Redis Cluster
/// hashes keys) of its id. Stable across versions and machines, so every
/// instance puts a campaign in the same shard.
pub fn shard_of(campaign: &CampaignId, shards: u32) -> u32 {
    u32::from(crc16::State::<crc16::XMODEM>::calculate(campaign.as_str().as_bytes())) % shards.max(1)
}

/// A position within one epoch of the log: a Redis Stream id (`ms-seq`), or
/// the memory log's counter (`n-0`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub major: u64,
    pub minor: u64,
}

impl Position {
    /// Parses a Redis Stream id (`ms-seq`).
    pub fn from_stream_id(id: &str) -> Option<Position> {
        let (ms, seq) = id.split_once('-')?;
        Some(Position { major: ms.parse().ok()?, minor: seq.parse().ok()? })
    }

    /// The Redis Stream id of this position (`ms-seq`).
    pub fn stream_id(&self) -> String {
        format!("{}-{}", self.major, self.minor)
    }
}

/// Where an event is in the log, as clients see it; also (see [`mark`]) a
/// position in the control stream: an event's `after` mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    /// When the stream was created (ms since the epoch).
    pub epoch: u64,
    /// Redis Stream id's milliseconds, or the memory log's counter.
    pub major: u64,
    /// Redis Stream id's sequence (0 in memory).
    pub minor: u64,
}

/// Largest values that keep the fixed width.
const MAX_13: u64 = 9_999_999_999_999;
const MAX_10: u64 = 9_999_999_999;

impl Offset {
    /// Parses an offset herald could have made; anything else is `None`.
    pub fn parse(s: &str) -> Option<Offset> {
        let mut parts = s.split('-');
        let (e, a, b) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || e.len() != 13 || a.len() != 13 || b.len() != 10 {
            return None;
        }
        let digits = |p: &str| p.bytes().all(|c| c.is_ascii_digit()).then(|| p.parse::<u64>().ok()).flatten();
        Some(Offset { epoch: digits(e)?, major: digits(a)?, minor: digits(b)? })
    }

    /// The offset of `position` in the log of `epoch`, if it fits the fixed width.
    pub fn at(epoch: u64, position: Position) -> Option<Offset> {
        let Position { major, minor } = position;
        (major <= MAX_13 && minor <= MAX_10 && epoch <= MAX_13).then_some(Offset { epoch, major, minor })
    }

    /// The position within its epoch.
    pub fn position(&self) -> Position {
        Position { major: self.major, minor: self.minor }
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:013}-{:013}-{:010}", self.epoch, self.major, self.minor)
    }
}

/// How long, how many and how many bytes of events the log keeps, and how
/// long it remembers idempotency keys.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub window: Duration,
    /// Most entries per stream; also most idempotency keys per shard.
    pub max_events: usize,
    /// Most bytes of event objects the in-memory log keeps.
    pub max_bytes: usize,
    /// Most events one replay sends to one socket (half its buffer, so that
    /// the replay and the ack fit); a longer gap answers `recovered: false`.
    pub max_replay: usize,
    /// How long an idempotency key is remembered.
    pub keys_window: Duration,
}

/// One logged event, as every instance delivers it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub offset: Offset,
    pub kind: EventKind,
    pub rooms: Arc<[Room]>,
    /// The users it is for (`None`: every socket in its rooms).
    pub audience: Option<Audience>,
    /// The event object clients receive, offset included.
    pub json: Arc<str>,
}

impl Logged {
    /// Builds the event object clients receive: the published envelope
    /// (`{...}`) with `"offset"` added as its last field.
    pub fn new(
        offset: Offset,
        kind: EventKind,
        rooms: Arc<[Room]>,
        audience: Option<Audience>,
        envelope: &str,
    ) -> Logged {
        let body = envelope.trim_end();
        let body = body.strip_suffix('}').unwrap_or(body);
        let json = format!("{body},\"offset\":\"{offset}\"}}");
        Logged { offset, kind, rooms, audience, json: json.into() }
    }

    /// Whether it is delivered to `room`.
    pub fn targets(&self, room: &Room) -> bool {
        self.rooms.iter().any(|r| r == room)
    }

    /// Whether `user` may receive it (it has no audience, or `user` is in it).
    pub fn is_for(&self, user: &str) -> bool {
        self.audience.as_ref().is_none_or(|audience| audience.contains(user))
    }
}

/// What is appended: an event (its kind, rooms, audience, published
/// envelope and idempotency key scoped to its campaign) to a shard, or a
/// revocation (its JSON: the log does not read it) to the control stream.
#[derive(Debug, Clone)]
pub enum NewEntry {
    Event { kind: EventKind, rooms: Arc<[Room]>, audience: Option<Audience>, envelope: String, key: Option<Arc<str>> },
    Revocation(String),
}

/// What is read back.
#[derive(Debug, Clone)]
pub enum Entry {
    /// An event, to be delivered once the control stream is applied up to
    /// `after` (`None`: no condition).
    Event {
        logged: Logged,
        after: Option<Offset>,
    },
    Revocation(String),
    /// Written by another version of herald: skipped.
    Unreadable,
}

/// Where a stream stands: its epoch (made by the first look at a stream
/// that has none) and its last position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub epoch: u64,
    pub last: Position,
}

/// The log could not be reached, or lost entries.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Redis failed, or was known to be down: nothing was appended.
    #[error("the event log is unavailable")]
    Unavailable(#[source] RedisError),
    /// An append did not complete in time (or its connection broke): Redis
    /// may still carry it out.
    #[error("the event log did not answer")]
    Unknown(#[source] RedisError),
    /// An entry was logged, but this instance did not apply it in time.
    #[error("logged, but not applied by this instance within {0:?}")]
    NotApplied(Duration),
    /// Entries after the position asked for were dropped before they were read.
    #[error("entries were dropped before they were read")]
    Gap,
    /// The stream being read was made anew under the reader (Redis lost it:
    /// deleted, evicted, or restarted empty): its entries are of a new epoch.
    #[error("the stream was made anew (a new epoch)")]
    NewEpoch,
    /// Another layout of the log (another shard count, an older version)
    /// uses the same keys.
    #[error("the event log's keys are taken: {0}")]
    Claimed(String),
}

/// What an [`EventLog`] operation returns.
pub type LogFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LogError>> + Send + 'a>>;

/// Where an append left one stream: its epoch and the last entry's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub stream: Stream,
    pub epoch: u64,
    pub last: Position,
}

/// What one append did: where it left each stream it wrote to, and how many
/// events it did not store because their key was seen within the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appends {
    pub streams: Vec<Appended>,
    pub duplicates: usize,
}

/// The mark of a stream's position: an offset (no fixed width needed).
pub fn mark(epoch: u64, position: Position) -> Offset {
    Offset { epoch, major: position.major, minor: position.minor }
}

/// The event log. Each stream is read back in one order by every reader;
/// entries past the retention are dropped as it goes.
pub trait EventLog: Send + Sync + 'static {
    /// How many shards it has.
    fn shards(&self) -> u32;

    /// Whether one append is atomic across streams (else only within one).
    fn atomic_across_streams(&self) -> bool;

    /// Appends `entries`, each to its stream, in one step (within one stream
    /// always; across streams when [`EventLog::atomic_across_streams`]),
    /// except the events whose key it has seen within the window; each event
    /// is marked with the control stream's head. Returns where each stream
    /// it wrote to stands. [`LogError::Unknown`]: the append may still happen.
    fn append(&self, entries: Vec<(Stream, NewEntry)>) -> LogFuture<'_, Appends>;

    /// A stream's epoch (made now if it has none) and last position.
    fn head(&self, stream: Stream) -> LogFuture<'_, Head>;

    /// A reader that follows one stream (a blocking read needs a connection of its own).
    fn reader(&self, stream: Stream) -> LogFuture<'_, Box<dyn LogReader>>;

    /// The events of `stream` after `since` up to `until`, if it still holds
    /// every one of them (else `None`: trimmed, another epoch, or ahead).
    fn events_between(
        &self,
        stream: Stream,
        epoch: u64,
        since: Offset,
        until: Position,
    ) -> LogFuture<'_, Option<Vec<Logged>>>;

    /// Makes sure no other layout of the log (another shard count, an older
    /// version) shares its place; `LogError::Claimed` says which does.
    fn claim(&self) -> LogFuture<'_, ()>;

    /// How many events and bytes of events it holds, when it knows cheaply
    /// (the in-memory log).
    fn size(&self) -> Option<(usize, usize)>;
}

/// What [`LogReader::read_after`] returns: the reader back, and what it read.
pub type ReadFuture =
    Pin<Box<dyn Future<Output = (Box<dyn LogReader>, Result<Vec<(Position, Entry)>, LogError>)> + Send>>;

/// Follows the log. A read owns the reader until it ends (and hands it
/// back), so that one read can stay in flight while other work goes on.
pub trait LogReader: Send {
    /// Waits, at most `block`, for entries after `after` in `epoch`, and
    /// returns them in order (none when the wait ends first).
    fn read_after(self: Box<Self>, epoch: u64, after: Position, block: Duration) -> ReadFuture;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_fixed_width_and_round_trip() {
        let o = Offset { epoch: 1_795_636_036_000, major: 42, minor: 7 };
        let s = o.to_string();
        assert_eq!(s, "1795636036000-0000000000042-0000000007");
        assert_eq!(Offset::parse(&s), Some(o));
        let later = Offset { epoch: o.epoch, major: 1_795_636_036_001, minor: 0 };
        assert!(later.to_string() > s);
        for bad in ["", "1", "x-y-z", "1795636036000-42-7", "1795636036000-0000000000042-000000000+", &format!("{s}-1")]
        {
            assert_eq!(Offset::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Offset::at(o.epoch, o.position()), Some(o));
        assert_eq!(Offset::at(o.epoch, Position { major: MAX_13 + 1, minor: 0 }), None);
        assert_eq!(Position::from_stream_id("17-3"), Some(Position { major: 17, minor: 3 }));
        assert_eq!(Position { major: 17, minor: 3 }.stream_id(), "17-3");
    }

    #[test]
    fn a_campaign_always_has_the_same_shard() {
        let c = |s: &str| CampaignId::parse(s).unwrap();
        // Pinned (CRC-16/XMODEM's check value is 0x31C3): every instance and every version must agree.
        assert_eq!(shard_of(&c("123456789"), 65_536), 0x31C3);
        assert_eq!(shard_of(&c("c1"), 64), 11);
        assert_eq!(shard_of(&c("c1"), 1), 0);
        let spread: std::collections::HashSet<u32> = (0..1000).map(|i| shard_of(&c(&format!("c{i}")), 64)).collect();
        assert_eq!(spread.len(), 64);
    }

    #[test]
    fn the_offset_is_the_last_field_of_the_event_object() {
        let o = Offset { epoch: 1, major: 2, minor: 0 };
        let l = Logged::new(o, EventKind::StateInvalidated, Arc::from(vec![]), None, r#"{"type":"state_invalidated"}"#);
        assert!(mark(2, Position { major: 1, minor: 0 }) > mark(1, Position { major: 9, minor: 9 }), "epoch first");
        let v: serde_json::Value = serde_json::from_str(&l.json).unwrap();
        assert_eq!(v["offset"], o.to_string());
    }
}
