//! The event log behind recovery: every delivered event gets an offset, and
//! recent events are kept (by time, by count and, in memory, by bytes) so
//! that a client that reconnects can ask for what it missed.
//!
//! An offset is `EEEEEEEEEEEEE-TTTTTTTTTTTTT-SSSSSSSSSS`: the log's epoch (the
//! millisecond it was created), then the position in it. Fixed width, so
//! offsets compare as plain strings; a log created later (after a Redis
//! restart lost the old one) has a later epoch, so offsets keep increasing.
//!
//! One instance keeps the log in memory ([`MemoryLog`]); a fleet keeps it in a
//! Redis Stream that every instance reads (see [`crate::delivery`]).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::events::EventKind;
use crate::rooms::Room;

/// A position in the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    /// When the log was created (ms since the epoch).
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

    /// The Redis Stream id of this offset (`ms-seq`).
    pub fn stream_id(&self) -> String {
        format!("{}-{}", self.major, self.minor)
    }

    /// Parses a Redis Stream id (`ms-seq`) within `epoch`.
    pub fn from_stream_id(epoch: u64, id: &str) -> Option<Offset> {
        let (ms, seq) = id.split_once('-')?;
        let (major, minor) = (ms.parse().ok()?, seq.parse().ok()?);
        (major <= MAX_13 && minor <= MAX_10 && epoch <= MAX_13).then_some(Offset { epoch, major, minor })
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:013}-{:013}-{:010}", self.epoch, self.major, self.minor)
    }
}

/// How long and how many events the log keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub window: Duration,
    pub max_events: usize,
    /// Most bytes of event objects the in-memory log keeps.
    pub max_bytes: usize,
    /// Most events one replay sends to one socket (half its buffer, so that
    /// the replay and the ack fit); a longer gap answers `recovered: false`.
    pub max_replay: usize,
}

/// One logged event, as every instance delivers it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub offset: Offset,
    pub kind: EventKind,
    pub rooms: Arc<[Room]>,
    /// The event object clients receive, offset included.
    pub json: Arc<str>,
}

impl Logged {
    /// Builds the event object clients receive: the published envelope
    /// (`{...}`) with `"offset"` added as its last field.
    pub fn new(offset: Offset, kind: EventKind, rooms: Arc<[Room]>, envelope: &str) -> Logged {
        let body = envelope.trim_end();
        let body = body.strip_suffix('}').unwrap_or(body);
        let json = format!("{body},\"offset\":\"{offset}\"}}");
        Logged { offset, kind, rooms, json: json.into() }
    }

    /// Whether it is delivered to `room`.
    pub fn targets(&self, room: &Room) -> bool {
        self.rooms.iter().any(|r| r == room)
    }
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Whether the log holds every event after `since` (else the client must refetch).
    pub recovered: bool,
    /// The room's events after `since`, in order.
    pub events: Vec<Logged>,
}

/// The in-memory log of one instance.
pub struct MemoryLog {
    epoch: u64,
    next: u64,
    entries: VecDeque<(Instant, Logged)>,
    /// The bytes of the event objects in `entries`.
    bytes: usize,
    retention: Retention,
}

impl MemoryLog {
    /// An empty log whose epoch is now.
    pub fn new(retention: Retention) -> MemoryLog {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        MemoryLog { epoch, next: 1, entries: VecDeque::new(), bytes: 0, retention }
    }

    /// Appends an event and returns it with its offset.
    pub fn append(&mut self, kind: EventKind, rooms: Arc<[Room]>, envelope: &str) -> Logged {
        let offset = Offset { epoch: self.epoch, major: self.next, minor: 0 };
        self.next += 1;
        let logged = Logged::new(offset, kind, rooms, envelope);
        self.bytes += logged.json.len();
        self.entries.push_back((Instant::now(), logged.clone()));
        self.trim();
        logged
    }

    /// Drops what is past the window, the count or the bytes (oldest first).
    pub fn trim(&mut self) {
        while self.entries.len() > self.retention.max_events
            || self.bytes > self.retention.max_bytes
            || self.entries.front().is_some_and(|(at, _)| at.elapsed() > self.retention.window)
        {
            match self.entries.pop_front() {
                Some((_, dropped)) => self.bytes -= dropped.json.len(),
                None => break,
            }
        }
    }

    /// How many events and bytes of event objects the log holds.
    pub fn size(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    /// The offset of the last event logged (`None` before the first).
    pub fn head(&self) -> Option<Offset> {
        (self.next > 1).then_some(Offset { epoch: self.epoch, major: self.next - 1, minor: 0 })
    }

    /// The events of `room` after `since`, if the log still holds all of them.
    pub fn replay(&mut self, room: &Room, since: Offset) -> Replay {
        self.trim();
        let last = self.next - 1;
        // The oldest position whose successors are all still here.
        let first_kept = self.entries.front().map_or(self.next, |(_, e)| e.offset.major);
        let holds =
            since.epoch == self.epoch && since.minor == 0 && since.major <= last && since.major + 1 >= first_kept;
        if !holds {
            return Replay::default();
        }
        let events = self
            .entries
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.offset.major > since.major && e.targets(room))
            .cloned()
            .collect();
        Replay { recovered: true, events }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> Room {
        Room::parse(s).unwrap()
    }

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
    }

    #[test]
    fn the_offset_is_the_last_field_of_the_event_object() {
        let o = Offset { epoch: 1, major: 2, minor: 0 };
        let l = Logged::new(o, EventKind::StateInvalidated, Arc::from(vec![]), r#"{"type":"state_invalidated"}"#);
        let v: serde_json::Value = serde_json::from_str(&l.json).unwrap();
        assert_eq!(v["offset"], o.to_string());
    }

    #[test]
    fn the_memory_log_replays_one_room_within_retention() {
        let mut log = MemoryLog::new(Retention {
            window: Duration::from_secs(60),
            max_events: 3,
            max_bytes: 1 << 20,
            max_replay: 64,
        });
        let c1: Arc<[Room]> = Arc::from(vec![room("campaign:c1")]);
        let s1: Arc<[Room]> = Arc::from(vec![room("campaign:c1"), room("settlement:s1")]);
        let a = log.append(EventKind::StateInvalidated, c1.clone(), "{}");
        let b = log.append(EventKind::SettlementUpdated, s1.clone(), "{}");
        let c = log.append(EventKind::StateInvalidated, c1.clone(), "{}");
        let r = log.replay(&room("settlement:s1"), a.offset);
        assert!(r.recovered);
        assert_eq!(r.events.iter().map(|e| e.offset).collect::<Vec<_>>(), [b.offset]);
        let r = log.replay(&room("campaign:c1"), c.offset);
        assert!(r.recovered && r.events.is_empty());
        // A fourth event pushes the first out: `a` is still a valid since (all after it are kept)...
        log.append(EventKind::StateInvalidated, c1.clone(), "{}");
        assert!(log.replay(&room("campaign:c1"), a.offset).recovered);
        // ...but one before it is not.
        let before = Offset { major: a.offset.major - 1, ..a.offset };
        log.append(EventKind::StateInvalidated, c1, "{}");
        assert!(!log.replay(&room("campaign:c1"), before).recovered);
        // The future, another epoch: not recoverable.
        assert!(!log.replay(&room("campaign:c1"), Offset { major: 99, ..a.offset }).recovered);
        assert!(!log.replay(&room("campaign:c1"), Offset { epoch: 1, ..a.offset }).recovered);
    }

    #[test]
    fn the_memory_log_keeps_at_most_its_bytes_and_its_window() {
        let retention =
            Retention { window: Duration::from_millis(50), max_events: 100, max_bytes: 1000, max_replay: 64 };
        let mut log = MemoryLog::new(retention);
        let c1: Arc<[Room]> = Arc::from(vec![room("campaign:c1")]);
        let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(300));
        let mut offsets = Vec::new();
        for _ in 0..5 {
            offsets.push(log.append(EventKind::StateInvalidated, c1.clone(), &big).offset);
        }
        let (events, bytes) = log.size();
        assert!(bytes <= 1000 && events == 2, "{events} events, {bytes} bytes");
        // The oldest still recoverable is the one before the first kept.
        assert!(log.replay(&room("campaign:c1"), offsets[2]).recovered);
        assert!(!log.replay(&room("campaign:c1"), offsets[1]).recovered);
        // Past the window, a trim with no append empties it.
        std::thread::sleep(Duration::from_millis(80));
        log.trim();
        assert_eq!(log.size(), (0, 0));
    }
}
