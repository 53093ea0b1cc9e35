//! The event log of a single instance, in memory: one shard and no control
//! stream (its one follower applies every revocation whole). Bounded by the
//! replay window, a count and bytes: trimmed whenever it is used, and a
//! reader uses it at least once per blocking read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{
    Appended, Entry, EventLog, Head, LogError, LogFuture, LogReader, Logged, NewEntry, Offset, Position, ReadFuture,
    Retention, Stream,
};

struct Entries {
    epoch: u64,
    /// The next entry's counter.
    next: u64,
    entries: VecDeque<(Instant, Position, Entry)>,
    /// The bytes of the event objects in `entries`.
    bytes: usize,
    retention: Retention,
}

fn entry_bytes(entry: &Entry) -> usize {
    match entry {
        Entry::Event(logged) => logged.json.len(),
        Entry::Revocation(json) => json.len(),
        Entry::Unreadable => 0,
    }
}

impl Entries {
    fn trim(&mut self) {
        while self.entries.len() > self.retention.max_events
            || self.bytes > self.retention.max_bytes
            || self.entries.front().is_some_and(|(at, _, _)| at.elapsed() > self.retention.window)
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
}

struct Shared {
    entries: Mutex<Entries>,
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
        let entries = Entries { epoch, next: 1, entries: VecDeque::new(), bytes: 0, retention };
        MemoryLog(Arc::new(Shared { entries: Mutex::new(entries), appended: Notify::new() }))
    }

    /// The entries, without those past the retention.
    fn entries(&self) -> MutexGuard<'_, Entries> {
        let mut entries = self.0.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.trim();
        entries
    }

    fn append_now(&self, new: Vec<(Stream, NewEntry)>) -> Appended {
        let mut log = self.entries();
        let epoch = log.epoch;
        for (_, entry) in new {
            let position = Position { major: log.next, minor: 0 };
            log.next += 1;
            let entry = match entry {
                NewEntry::Event { kind, rooms, envelope } => match Offset::at(epoch, position) {
                    Some(offset) => Entry::Event(Logged::new(offset, kind, rooms, &envelope)),
                    None => Entry::Unreadable,
                },
                NewEntry::Revocation(json) => Entry::Revocation(json),
            };
            log.bytes += entry_bytes(&entry);
            log.entries.push_back((Instant::now(), position, entry));
        }
        log.trim();
        let last = log.last();
        drop(log);
        self.0.appended.notify_waiters();
        Appended { stream: Stream::Shard(0), epoch, last }
    }

    /// The entries after `after`, or a gap when some were trimmed first.
    fn after(&self, after: Position) -> Result<Vec<(Position, Entry)>, LogError> {
        let log = self.entries();
        if after.major + 1 < log.first_kept() {
            return Err(LogError::Gap);
        }
        Ok(log.entries.iter().filter(|(_, p, _)| *p > after).map(|(_, p, e)| (*p, e.clone())).collect())
    }
}

/// Every stream is the one log: there is one shard, and no control stream.
impl EventLog for MemoryLog {
    fn shards(&self) -> u32 {
        1
    }

    fn has_control(&self) -> bool {
        false
    }

    fn atomic_across_streams(&self) -> bool {
        true
    }

    fn append(&self, entries: Vec<(Stream, NewEntry)>) -> LogFuture<'_, Vec<Appended>> {
        let appended = self.append_now(entries);
        Box::pin(async move { Ok(vec![appended]) })
    }

    fn head(&self, _: Stream) -> LogFuture<'_, Head> {
        let log = self.entries();
        let head = Head { epoch: Some(log.epoch), last: log.last() };
        Box::pin(async move { Ok(head) })
    }

    fn reader(&self, _: Stream) -> LogFuture<'_, Box<dyn LogReader>> {
        let reader: Box<dyn LogReader> = Box::new(self.clone());
        Box::pin(async move { Ok(reader) })
    }

    fn events_between(
        &self,
        _: Stream,
        epoch: u64,
        since: Offset,
        until: Position,
    ) -> LogFuture<'_, Option<Vec<Logged>>> {
        let log = self.entries();
        let holds = since.epoch == epoch
            && epoch == log.epoch
            && since.minor == 0
            && since.position() <= until
            && since.major + 1 >= log.first_kept();
        let events = holds.then(|| {
            log.entries
                .iter()
                .filter(|(_, p, _)| *p > since.position() && *p <= until)
                .filter_map(|(_, _, e)| match e {
                    Entry::Event(logged) => Some(logged.clone()),
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
        let log = self.entries();
        let events = log.entries.iter().filter(|(_, _, e)| matches!(e, Entry::Event(_))).count();
        Some((events, log.bytes))
    }
}

impl LogReader for MemoryLog {
    fn read_after(self: Box<Self>, _epoch: u64, after: Position, block: Duration) -> ReadFuture {
        Box::pin(async move {
            let read = async {
                // Registered before looking, so an append in between is not missed.
                let appended = self.0.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                let entries = self.after(after)?;
                if !entries.is_empty() {
                    return Ok(entries);
                }
                let _ = tokio::time::timeout(block, appended).await;
                self.after(after)
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
        NewEntry::Event { kind: EventKind::StateInvalidated, rooms: rooms.clone(), envelope: envelope.to_owned() }
    }

    fn retention(window: Duration, max_events: usize, max_bytes: usize) -> Retention {
        Retention { window, max_events, max_bytes, max_replay: 64 }
    }

    const ONE: Stream = Stream::Shard(0);

    async fn append(log: &MemoryLog, entry: NewEntry) -> Offset {
        let appended = log.append(vec![(ONE, entry)]).await.unwrap();
        Offset::at(appended[0].epoch, appended[0].last).unwrap()
    }

    async fn replay(log: &MemoryLog, room: &Room, since: Offset) -> Option<Vec<Offset>> {
        let head = log.head(ONE).await.unwrap();
        let events = log.events_between(ONE, head.epoch.unwrap(), since, head.last).await.unwrap()?;
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
        let reader = Box::new(log.clone());
        let (_, gap) = reader.read_after(offsets[0].epoch, Position::default(), Duration::ZERO).await;
        assert!(matches!(gap, Err(LogError::Gap)));
        // Past the window, it holds nothing, with no append.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(log.size(), Some((0, 0)));
    }

    #[tokio::test]
    async fn a_reader_waits_for_the_next_append() {
        let log = MemoryLog::new(retention(Duration::from_secs(60), 10, 1 << 20));
        let reader = Box::new(log.clone());
        let head = log.head(ONE).await.unwrap();
        let read = tokio::spawn(async move {
            reader.read_after(head.epoch.unwrap(), head.last, Duration::from_secs(5)).await.1.unwrap().len()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        log.append(vec![(ONE, NewEntry::Revocation("{}".into()))]).await.unwrap();
        assert_eq!(read.await.unwrap(), 1);
    }
}
