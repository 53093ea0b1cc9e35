//! The event log of a single instance, in memory: one shard and the
//! control stream, with one epoch. Each is bounded by the replay window, a
//! count and bytes: trimmed whenever it is used, and a reader uses it at
//! least once per blocking read. The idempotency keys of the shard's events
//! are remembered beside it ([`Seen`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;

use crate::idempotency::Seen;

use super::{
    Appended, Appends, Entry, EventLog, Head, LogError, LogFuture, LogReader, Logged, NewEntry, Offset, Position,
    ReadFuture, Retention, Stream, mark,
};

/// One stream's entries.
struct Entries {
    /// The next entry's counter.
    next: u64,
    entries: VecDeque<(Instant, Position, Entry)>,
    /// The bytes of the event objects (or revocations) in `entries`.
    bytes: usize,
}

/// Both streams, and the keys of the shard's events.
struct Streams {
    epoch: u64,
    retention: Retention,
    shard: Entries,
    control: Entries,
    seen: Seen,
}

impl Streams {
    /// One stream, trimmed to the retention.
    fn stream(&mut self, stream: Stream) -> &mut Entries {
        let retention = self.retention;
        let entries = match stream {
            Stream::Shard(_) => &mut self.shard,
            Stream::Control => &mut self.control,
        };
        entries.trim(&retention);
        entries
    }
}

fn entry_bytes(entry: &Entry) -> usize {
    match entry {
        Entry::Event { logged, .. } => logged.json.len(),
        Entry::Revocation(json) => json.len(),
        Entry::Unreadable => 0,
    }
}

impl Entries {
    fn new() -> Entries {
        Entries { next: 1, entries: VecDeque::new(), bytes: 0 }
    }

    fn trim(&mut self, retention: &Retention) {
        while self.entries.len() > retention.max_events
            || self.bytes > retention.max_bytes
            || self.entries.front().is_some_and(|(at, _, _)| at.elapsed() > retention.window)
        {
            match self.entries.pop_front() {
                Some((_, _, dropped)) => self.bytes -= entry_bytes(&dropped),
                None => break,
            }
        }
    }

    fn last(&self) -> Position {
        Position { major: self.next - 1, minor: 0 }
    }

    /// The oldest position whose successors are all still here.
    fn first_kept(&self) -> u64 {
        self.entries.front().map_or(self.next, |(_, position, _)| position.major)
    }

    fn push(&mut self, entry: Entry) -> Position {
        let position = Position { major: self.next, minor: 0 };
        self.next += 1;
        self.bytes += entry_bytes(&entry);
        self.entries.push_back((Instant::now(), position, entry));
        position
    }

    /// The entries after `after`, or a gap when some were trimmed first.
    fn after(&self, after: Position) -> Result<Vec<(Position, Entry)>, LogError> {
        if after.major + 1 < self.first_kept() {
            return Err(LogError::Gap);
        }
        Ok(self.entries.iter().filter(|(_, p, _)| *p > after).map(|(_, p, e)| (*p, e.clone())).collect())
    }
}

struct Shared {
    streams: Mutex<Streams>,
    /// Woken on every append.
    appended: Notify,
}

/// The in-memory log. Clones share it.
#[derive(Clone)]
pub struct MemoryLog(Arc<Shared>);

impl MemoryLog {
    /// An empty log whose epoch is now.
    pub fn new(retention: Retention) -> MemoryLog {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let streams = Streams {
            epoch,
            retention,
            shard: Entries::new(),
            control: Entries::new(),
            seen: Seen::new(retention.keys_window, retention.max_events),
        };
        MemoryLog(Arc::new(Shared { streams: Mutex::new(streams), appended: Notify::new() }))
    }

    fn streams(&self) -> MutexGuard<'_, Streams> {
        self.0.streams.lock()
    }

    fn append_now(&self, new: Vec<(Stream, NewEntry)>) -> Appends {
        let mut log = self.streams();
        let epoch = log.epoch;
        let after = mark(epoch, log.stream(Stream::Control).last());
        let now = Instant::now();
        let mut appends = Appends::default();
        for (stream, entry) in new {
            let stream = match stream {
                Stream::Shard(_) => Stream::Shard(0),
                Stream::Control => Stream::Control,
            };
            let entry = match entry {
                NewEntry::Event { key: Some(key), .. } if !log.seen.first(&key, now) => {
                    appends.duplicates += 1;
                    continue;
                }
                NewEntry::Event { kind, rooms, audience, envelope, .. } => {
                    let position = Position { major: log.stream(stream).next, minor: 0 };
                    match Offset::at(epoch, position) {
                        Some(offset) => Entry::Event {
                            logged: Logged::new(offset, kind, rooms, audience, &envelope),
                            after: Some(after),
                        },
                        None => Entry::Unreadable,
                    }
                }
                NewEntry::Revocation(json) => Entry::Revocation(json),
            };
            let last = log.stream(stream).push(entry);
            appends.streams.retain(|a| a.stream != stream);
            appends.streams.push(Appended { stream, epoch, last });
        }
        drop(log);
        self.0.appended.notify_waiters();
        appends
    }
}

impl EventLog for MemoryLog {
    fn shards(&self) -> u32 {
        1
    }

    fn atomic_across_streams(&self) -> bool {
        true
    }

    fn append(&self, entries: Vec<(Stream, NewEntry)>) -> LogFuture<'_, Appends> {
        let appends = self.append_now(entries);
        Box::pin(async move { Ok(appends) })
    }

    fn head(&self, stream: Stream) -> LogFuture<'_, Head> {
        let mut log = self.streams();
        let head = Head { epoch: log.epoch, last: log.stream(stream).last() };
        Box::pin(async move { Ok(head) })
    }

    fn reader(&self, stream: Stream) -> LogFuture<'_, Box<dyn LogReader>> {
        let reader: Box<dyn LogReader> = Box::new(MemoryReader { log: self.clone(), stream });
        Box::pin(async move { Ok(reader) })
    }

    fn events_between(
        &self,
        stream: Stream,
        epoch: u64,
        since: Offset,
        until: Position,
    ) -> LogFuture<'_, Option<Vec<Logged>>> {
        let mut log = self.streams();
        let same_epoch = epoch == log.epoch;
        let entries = log.stream(stream);
        let holds = since.epoch == epoch
            && same_epoch
            && since.minor == 0
            && since.position() <= until
            && since.major + 1 >= entries.first_kept();
        let events = holds.then(|| {
            entries
                .entries
                .iter()
                .filter(|(_, p, _)| *p > since.position() && *p <= until)
                .filter_map(|(_, _, e)| match e {
                    Entry::Event { logged, .. } => Some(logged.clone()),
                    _ => None,
                })
                .collect()
        });
        Box::pin(async move { Ok(events) })
    }

    fn claim(&self) -> LogFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn size(&self) -> Option<(usize, usize)> {
        let mut log = self.streams();
        let shard = log.stream(Stream::Shard(0));
        Some((shard.entries.len(), shard.bytes))
    }
}

/// Follows one stream of the in-memory log.
struct MemoryReader {
    log: MemoryLog,
    stream: Stream,
}

impl LogReader for MemoryReader {
    fn read_after(self: Box<Self>, _epoch: u64, after: Position, block: Duration) -> ReadFuture {
        Box::pin(async move {
            let read = async {
                // Registered before looking, so an append in between is not missed.
                let appended = self.log.0.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                let entries = self.log.streams().stream(self.stream).after(after)?;
                if !entries.is_empty() {
                    return Ok(entries);
                }
                let _ = tokio::time::timeout(block, appended).await;
                self.log.streams().stream(self.stream).after(after)
            }
            .await;
            (self as Box<dyn LogReader>, read)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use crate::rooms::Room;

    fn room(s: &str) -> Room {
        Room::parse(s).unwrap()
    }

    fn event(rooms: &Arc<[Room]>, envelope: &str) -> NewEntry {
        NewEntry::Event {
            kind: EventKind::StateInvalidated,
            rooms: rooms.clone(),
            audience: None,
            envelope: envelope.to_owned(),
            key: None,
        }
    }

    fn retention(window: Duration, max_events: usize, max_bytes: usize) -> Retention {
        Retention { window, max_events, max_bytes, max_replay: 64, keys_window: window }
    }

    const ONE: Stream = Stream::Shard(0);

    async fn append(log: &MemoryLog, entry: NewEntry) -> Offset {
        let appended = log.append(vec![(ONE, entry)]).await.unwrap().streams;
        Offset::at(appended[0].epoch, appended[0].last).unwrap()
    }

    async fn replay(log: &MemoryLog, room: &Room, since: Offset) -> Option<Vec<Offset>> {
        let head = log.head(ONE).await.unwrap();
        let events = log.events_between(ONE, head.epoch, since, head.last).await.unwrap()?;
        Some(events.into_iter().filter(|l| l.targets(room)).map(|l| l.offset).collect())
    }

    #[tokio::test]
    async fn the_memory_log_replays_one_room_within_retention() {
        let log = MemoryLog::new(retention(Duration::from_secs(60), 3, 1 << 20));
        let c1: Arc<[Room]> = Arc::from(vec![room("campaign:c1")]);
        let s1: Arc<[Room]> = Arc::from(vec![room("campaign:c1"), room("settlement:s1")]);
        let a = append(&log, event(&c1, "{}")).await;
        let b = append(&log, event(&s1, "{}")).await;
        let c = append(&log, event(&c1, "{}")).await;
        assert_eq!(replay(&log, &room("settlement:s1"), a).await, Some(vec![b]));
        assert_eq!(replay(&log, &room("campaign:c1"), c).await, Some(vec![]));
        // A fourth event pushes the first out: `a` is still a valid since (all after it are kept)...
        append(&log, event(&c1, "{}")).await;
        assert!(replay(&log, &room("campaign:c1"), a).await.is_some());
        // ...but one before it is not.
        let before = Offset { major: a.major - 1, ..a };
        append(&log, event(&c1, "{}")).await;
        assert_eq!(replay(&log, &room("campaign:c1"), before).await, None);
        // The future, another epoch: not recoverable.
        assert_eq!(replay(&log, &room("campaign:c1"), Offset { major: 99, ..a }).await, None);
        assert_eq!(replay(&log, &room("campaign:c1"), Offset { epoch: 1, ..a }).await, None);
    }

    #[tokio::test]
    async fn the_memory_log_keeps_at_most_its_bytes_and_its_window() {
        let log = MemoryLog::new(retention(Duration::from_millis(50), 100, 1000));
        let c1: Arc<[Room]> = Arc::from(vec![room("campaign:c1")]);
        let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(300));
        let mut offsets = Vec::new();
        for _ in 0..5 {
            offsets.push(append(&log, event(&c1, &big)).await);
        }
        let (events, bytes) = log.size().unwrap();
        assert!(bytes <= 1000 && events == 2, "{events} events, {bytes} bytes");
        // The oldest still recoverable is the one before the first kept.
        assert!(replay(&log, &room("campaign:c1"), offsets[2]).await.is_some());
        assert_eq!(replay(&log, &room("campaign:c1"), offsets[1]).await, None);
        // A reader that had not read them is told of the gap.
        let reader = log.reader(ONE).await.unwrap();
        let (_, gap) = reader.read_after(offsets[0].epoch, Position::default(), Duration::ZERO).await;
        assert!(matches!(gap, Err(LogError::Gap)));
        // Past the window, it holds nothing, with no append.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(log.size(), Some((0, 0)));
    }

    #[tokio::test]
    async fn a_reader_waits_for_the_next_append() {
        let log = MemoryLog::new(retention(Duration::from_secs(60), 10, 1 << 20));
        let reader = log.reader(Stream::Control).await.unwrap();
        let head = log.head(Stream::Control).await.unwrap();
        let read = tokio::spawn(async move {
            reader.read_after(head.epoch, head.last, Duration::from_secs(5)).await.1.unwrap().len()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        log.append(vec![(Stream::Control, NewEntry::Revocation("{}".into()))]).await.unwrap();
        assert_eq!(read.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn revocations_take_no_room_in_the_shard_and_events_are_marked_after_them() {
        let log = MemoryLog::new(retention(Duration::from_secs(60), 3, 1 << 20));
        let c1: Arc<[Room]> = Arc::from(vec![room("campaign:c1")]);
        let first = append(&log, event(&c1, "{}")).await;
        for _ in 0..10 {
            log.append(vec![(Stream::Control, NewEntry::Revocation("{}".into()))]).await.unwrap();
        }
        // Ten revocations later, the first event is still there to replay from.
        assert_eq!(replay(&log, &room("campaign:c1"), first).await, Some(vec![]));
        let control = log.head(Stream::Control).await.unwrap();
        append(&log, event(&c1, "{}")).await;
        let reader = log.reader(ONE).await.unwrap();
        let (_, read) = reader.read_after(first.epoch, first.position(), Duration::ZERO).await;
        match &read.unwrap()[..] {
            [(_, Entry::Event { after, .. })] => assert_eq!(*after, Some(mark(control.epoch, control.last))),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_event_whose_key_was_seen_within_the_window_is_stored_once() {
        let log = MemoryLog::new(retention(Duration::from_millis(200), 100, 1 << 20));
        let c1: Arc<[Room]> = Arc::from(vec![room("campaign:c1")]);
        let keyed = |key: &str| NewEntry::Event {
            kind: EventKind::StateInvalidated,
            rooms: c1.clone(),
            audience: None,
            envelope: "{}".into(),
            key: Some(Arc::from(key)),
        };
        let once = log.append(vec![(ONE, keyed("c1 a")), (ONE, keyed("c1 a")), (ONE, keyed("c1 b"))]).await.unwrap();
        assert_eq!(once.duplicates, 1, "the second in the same batch");
        let again = log.append(vec![(ONE, keyed("c1 a"))]).await.unwrap();
        assert_eq!((again.duplicates, again.streams.len()), (1, 0), "a retry stores nothing");
        assert_eq!(log.size().unwrap().0, 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(log.append(vec![(ONE, keyed("c1 a"))]).await.unwrap().duplicates, 0, "the window is over");
    }
}
