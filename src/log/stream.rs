//! The event log of a fleet: a Redis Stream that every instance follows.
//!
//! A publish is one atomic append (a Lua script: all of a batch, or none of
//! it). The stream is capped near `HERALD_REPLAY_MAX_EVENTS` entries on every
//! append and trimmed by age every second. Its epoch is a key beside it,
//! created with the first append after Redis lost the old log; both keys
//! share one hash slot (`{prefix}`), so a Redis Cluster keeps them on one node.

use std::time::Duration;

use crate::redis::{Conn, Redis};
use crate::rooms::Room;
use crate::telemetry::error_chain;

use super::{
    Entry, EventLog, Head, LogError, LogFuture, LogReader, Logged, NewEntry, Offset, Position, ReadFuture, Retention,
};

/// Appends `ARGV[2..]` (triples: kind, rooms, content) to the stream
/// `KEYS[1]`, capped near `ARGV[1]` entries, in one atomic step. Creates the
/// log's epoch `KEYS[2]` (server time, ms) when missing. Returns the epoch and
/// the id of the last entry appended.
const APPEND: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  local t = redis.call('TIME')
  epoch = string.format('%013d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('SET', KEYS[2], epoch)
end
local id = ''
for i = 2, #ARGV, 3 do
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'k', ARGV[i], 'r', ARGV[i + 1], 'e', ARGV[i + 2])
end
return {epoch, id}
";

/// The stream entry kind of a revocation.
const REVOKE: &str = "@revoke";
/// How many entries one read takes at most.
const READ_BATCH: usize = 512;

/// The Redis Stream log.
pub struct StreamLog {
    redis: Redis,
    append: redis::Script,
    retention: Retention,
    stream: String,
    epoch: String,
}

impl StreamLog {
    /// The log under `redis`'s prefix.
    pub fn new(redis: Redis, retention: Retention) -> StreamLog {
        let prefix = redis.prefix();
        let (stream, epoch) = (format!("{{{prefix}}}:log"), format!("{{{prefix}}}:epoch"));
        StreamLog { redis, append: redis::Script::new(APPEND), retention, stream, epoch }
    }

    /// Runs `fut` within the operation timeout; a failure counts.
    async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, LogError> {
        match tokio::time::timeout(self.redis.op_timeout(), fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.redis.failed();
                Err(LogError::Unavailable(error_chain(&e)))
            }
            Err(_) => {
                self.redis.failed();
                Err(LogError::Unavailable("timed out".into()))
            }
        }
    }
}

fn room_names(rooms: &[Room]) -> String {
    rooms.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

/// A stream entry, as this version reads it.
fn decode(epoch: u64, entry: &redis::streams::StreamId) -> Option<(Position, Entry)> {
    let position = Position::from_stream_id(&entry.id)?;
    let text = |field: &str| -> Option<String> { entry.get::<String>(field) };
    let decoded = (|| {
        let kind = text("k")?;
        if kind == REVOKE {
            return Some(Entry::Revocation(text("e")?));
        }
        let kind = serde_json::from_value(serde_json::Value::String(kind)).ok()?;
        let rooms: Vec<Room> = text("r")?.split(' ').filter_map(Room::parse).collect();
        let offset = Offset::at(epoch, position)?;
        Some(Entry::Event(Logged::new(offset, kind, rooms.into(), &text("e")?)))
    })();
    Some((position, decoded.unwrap_or(Entry::Unreadable)))
}

impl EventLog for StreamLog {
    fn append(&self, entries: Vec<NewEntry>) -> LogFuture<'_, (u64, Position)> {
        Box::pin(async move {
            if !self.redis.is_healthy() {
                return Err(LogError::Unavailable("redis is unreachable".into()));
            }
            let mut invocation = self.append.key(&self.stream);
            invocation.key(&self.epoch).arg(self.retention.max_events);
            for entry in &entries {
                match entry {
                    NewEntry::Event { kind, rooms, envelope } => {
                        invocation.arg(kind.as_str()).arg(room_names(rooms)).arg(envelope)
                    }
                    NewEntry::Revocation(json) => invocation.arg(REVOKE).arg("").arg(json),
                };
            }
            let mut conn = self.redis.conn();
            let (epoch, id): (String, String) = self.bounded(invocation.invoke_async(&mut conn)).await?;
            let epoch = epoch.parse().map_err(|_| LogError::Unavailable("an unreadable epoch".into()))?;
            let last = Position::from_stream_id(&id).ok_or_else(|| LogError::Unavailable("an unreadable id".into()))?;
            Ok((epoch, last))
        })
    }

    fn head(&self) -> LogFuture<'_, Head> {
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let epoch: Option<String> = self.bounded(redis::cmd("GET").arg(&self.epoch).query_async(&mut conn)).await?;
            let last: redis::streams::StreamRangeReply = self
                .bounded(
                    redis::cmd("XREVRANGE")
                        .arg(&self.stream)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut conn),
                )
                .await?;
            let last = last.ids.first().and_then(|e| Position::from_stream_id(&e.id)).unwrap_or_default();
            Ok(Head { epoch: epoch.and_then(|e| e.parse().ok()), last })
        })
    }

    fn reader(&self) -> LogFuture<'_, Box<dyn LogReader>> {
        Box::pin(async move {
            let conn = self.redis.dedicated(BLOCK_MAX).await.map_err(|e| LogError::Unavailable(error_chain(&e)))?;
            let reader: Box<dyn LogReader> = Box::new(StreamReader { conn, stream: self.stream.clone() });
            Ok(reader)
        })
    }

    fn events_between(&self, epoch: u64, since: Offset, until: Position) -> LogFuture<'_, Option<Vec<Logged>>> {
        Box::pin(async move {
            if since.epoch != epoch || since.position() > until {
                return Ok(None);
            }
            // Entries up to `max-deleted-entry-id` were trimmed.
            let mut conn = self.redis.conn();
            let info: std::collections::HashMap<String, redis::Value> =
                self.bounded(redis::cmd("XINFO").arg("STREAM").arg(&self.stream).query_async(&mut conn)).await?;
            let trimmed = match info.get("max-deleted-entry-id") {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(redis::Value::SimpleString(s)) => s.clone(),
                _ => return Ok(None),
            };
            let Some(max_deleted) = Position::from_stream_id(&trimmed) else { return Ok(None) };
            if since.position() < max_deleted {
                return Ok(None);
            }
            let range: redis::streams::StreamRangeReply = self
                .bounded(
                    redis::cmd("XRANGE")
                        .arg(&self.stream)
                        .arg(format!("({}", since.position().stream_id()))
                        .arg(until.stream_id())
                        .query_async(&mut conn),
                )
                .await?;
            let events = range
                .ids
                .iter()
                .filter_map(|entry| match decode(epoch, entry)? {
                    (_, Entry::Event(logged)) => Some(logged),
                    _ => None,
                })
                .collect();
            Ok(Some(events))
        })
    }

    fn trim(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let (secs, micros): (u64, u64) = self.bounded(redis::cmd("TIME").query_async(&mut conn)).await?;
            let min_id = (secs * 1000 + micros / 1000).saturating_sub(self.retention.window.as_millis() as u64);
            let _: i64 = self
                .bounded(redis::cmd("XTRIM").arg(&self.stream).arg("MINID").arg("~").arg(min_id).query_async(&mut conn))
                .await?;
            Ok(())
        })
    }

    fn size(&self) -> Option<(usize, usize)> {
        None
    }
}

/// The longest blocking read a reader makes.
const BLOCK_MAX: Duration = Duration::from_millis(1_000);

/// Follows the stream on a connection of its own.
struct StreamReader {
    conn: Conn,
    stream: String,
}

impl LogReader for StreamReader {
    fn read_after(mut self: Box<Self>, epoch: u64, after: Position, block: Duration) -> ReadFuture {
        Box::pin(async move {
            let block = block.min(BLOCK_MAX);
            let options =
                redis::streams::StreamReadOptions::default().block(block.as_millis() as usize).count(READ_BATCH);
            let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                redis::AsyncCommands::xread_options(&mut self.conn, &[&self.stream], &[&after.stream_id()], &options)
                    .await;
            let read = reply.map_err(|e| LogError::Unavailable(error_chain(&e))).map(|reply| {
                let mut entries = Vec::new();
                for stream in reply.map(|r| r.keys).unwrap_or_default() {
                    entries.extend(stream.ids.iter().filter_map(|entry| decode(epoch, entry)));
                }
                entries
            });
            (self as Box<dyn LogReader>, read)
        })
    }
}
