//! The event log of a fleet: Redis Streams, one per shard and one for
//! control. An instance follows the control stream and only the shards its
//! sockets need.
//!
//! Keys, under the prefix `p`: shard `K`'s stream `{p:K}:log` and its epoch
//! `{p:K}:epoch`; the control stream `{p:control}:log` and its epoch. The
//! hash tag (`{p:K}`) keeps a stream and its epoch in one slot, and spreads
//! the shards over a Redis Cluster's slots (so over its nodes).
//!
//! An append is one Lua script: all of it or none of it, across shards on a
//! single Redis node, within one shard on a cluster (a script cannot span
//! slots). It caps each stream near `HERALD_REPLAY_MAX_EVENTS` entries and
//! drops entries older than the replay window. A stream and its epoch are
//! made together, by the first append after Redis lost either (a restart
//! without persistence, a deletion, an eviction): a new, later epoch on an
//! empty stream. Each entry carries its epoch, so a reader notices a stream
//! made anew under it ([`LogError::NewEpoch`]).
//!
//! `{p}:log` was the one stream of the versions before the sharded log; it
//! now holds this log's layout (see [`EventLog::claim`]), so that an older
//! instance on the same prefix fails loudly (its reads and appends hit a
//! string, not a stream) instead of splitting the fleet in silence.

use std::collections::HashMap;
use std::time::Duration;

use crate::redis::{Conn, Redis};
use crate::rooms::Room;
use crate::telemetry::error_chain;

use super::{
    Appended, Entry, EventLog, Head, LogError, LogFuture, LogReader, Logged, NewEntry, Offset, Position, ReadFuture,
    Retention, Stream,
};

/// Appends entries to streams in one atomic step. `KEYS`: each stream
/// touched and its epoch, in pairs. `ARGV[1]`: the cap (entries per stream);
/// `ARGV[2]`: the window (ms); then quadruples: the pair (from 1), kind,
/// rooms, content. When the epoch or the stream is missing (Redis lost it),
/// starts a new epoch (server time, ms, later than the lost one) on an empty
/// stream. Each entry carries its epoch (field `epoch`: a stream stores a
/// field name once). Returns, per pair, its epoch and the id of its last
/// entry appended.
const APPEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epochs, last = {}, {}
for p = 1, #KEYS / 2 do
  local epoch = redis.call('GET', KEYS[2 * p])
  if not epoch or redis.call('EXISTS', KEYS[2 * p - 1]) == 0 then
    local fresh = now
    if epoch and tonumber(epoch) >= fresh then fresh = tonumber(epoch) + 1 end
    epoch = string.format('%013d', fresh)
    redis.call('DEL', KEYS[2 * p - 1])
    redis.call('SET', KEYS[2 * p], epoch)
  end
  epochs[p], last[p] = epoch, ''
end
for i = 3, #ARGV, 4 do
  local p = tonumber(ARGV[i])
  last[p] = redis.call('XADD', KEYS[2 * p - 1], 'MAXLEN', '~', ARGV[1], '*',
    'k', ARGV[i + 1], 'r', ARGV[i + 2], 'e', ARGV[i + 3], 'epoch', epochs[p])
end
local out = {}
for p = 1, #KEYS / 2 do
  redis.call('XTRIM', KEYS[2 * p - 1], 'MINID', '~', now - tonumber(ARGV[2]))
  out[2 * p - 1], out[2 * p] = epochs[p], last[p]
end
return out
";

/// The stream entry kind of a revocation.
const REVOKE: &str = "@revoke";
/// How many entries one read takes at most.
const READ_BATCH: usize = 512;
/// The longest blocking read a reader makes.
const BLOCK_MAX: Duration = Duration::from_millis(1_000);

/// The Redis Streams log.
pub struct StreamLog {
    redis: Redis,
    append: redis::Script,
    retention: Retention,
    shards: u32,
    /// `{p}:log`: the layout, where older versions kept their one stream.
    layout_key: String,
}

impl StreamLog {
    /// The log under `redis`'s prefix, in `shards` shards.
    pub fn new(redis: Redis, retention: Retention, shards: u32) -> StreamLog {
        let layout_key = format!("{{{}}}:log", redis.prefix());
        StreamLog { redis, append: redis::Script::new(APPEND), retention, shards: shards.max(1), layout_key }
    }

    /// The keys of `stream`: the stream itself and its epoch.
    fn keys(&self, stream: Stream) -> (String, String) {
        let prefix = self.redis.prefix();
        let tag = match stream {
            Stream::Shard(k) => format!("{prefix}:{k}"),
            Stream::Control => format!("{prefix}:control"),
        };
        (format!("{{{tag}}}:log"), format!("{{{tag}}}:epoch"))
    }

    /// What `{p}:log` holds for this layout.
    fn layout(&self) -> String {
        format!("herald sharded log, {} shards", self.shards)
    }

    /// Runs `fut` within the operation timeout; a failure counts.
    async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, LogError> {
        self.redis.bounded(fut).await.map_err(|e| {
            self.redis.failed();
            LogError::Unavailable(error_chain(&e))
        })
    }

    /// One script call: `entries` to their streams, atomically.
    async fn append_at_once(&self, entries: &[(Stream, NewEntry)]) -> Result<Vec<Appended>, LogError> {
        let mut streams: Vec<Stream> = Vec::new();
        let mut invocation = self.append.prepare_invoke();
        invocation.arg(self.retention.max_events).arg(self.retention.window.as_millis() as u64);
        for (stream, entry) in entries {
            let pair = match streams.iter().position(|s| s == stream) {
                Some(p) => p,
                None => {
                    let (log, epoch) = self.keys(*stream);
                    invocation.key(log).key(epoch);
                    streams.push(*stream);
                    streams.len() - 1
                }
            };
            invocation.arg(pair + 1);
            match entry {
                NewEntry::Event { kind, rooms, envelope } => {
                    invocation.arg(kind.as_str()).arg(room_names(rooms)).arg(envelope)
                }
                NewEntry::Revocation(json) => invocation.arg(REVOKE).arg("").arg(json),
            };
        }
        let mut conn = self.redis.conn();
        let reply: Vec<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let unreadable = || LogError::Unavailable("an unreadable append reply".into());
        if reply.len() != streams.len() * 2 {
            return Err(unreadable());
        }
        streams
            .iter()
            .zip(reply.chunks(2))
            .map(|(stream, pair)| {
                let epoch = pair[0].parse().map_err(|_| unreadable())?;
                let last = Position::from_stream_id(&pair[1]).ok_or_else(unreadable)?;
                Ok(Appended { stream: *stream, epoch, last })
            })
            .collect()
    }
}

fn room_names(rooms: &[Room]) -> String {
    rooms.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

/// Whether `entry` was appended in another epoch than `epoch` (0: not known
/// yet). Entries of versions before the field are taken as of `epoch`.
fn of_another_epoch(epoch: u64, entry: &redis::streams::StreamId) -> bool {
    epoch != 0 && entry.get::<u64>("epoch").is_some_and(|e| e != epoch)
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
    fn shards(&self) -> u32 {
        self.shards
    }

    fn has_control(&self) -> bool {
        true
    }

    fn atomic_across_streams(&self) -> bool {
        !self.redis.is_cluster()
    }

    fn append(&self, entries: Vec<(Stream, NewEntry)>) -> LogFuture<'_, Vec<Appended>> {
        Box::pin(async move {
            if !self.redis.is_healthy() {
                return Err(LogError::Unavailable("redis is unreachable".into()));
            }
            if self.atomic_across_streams() {
                return self.append_at_once(&entries).await;
            }
            // A cluster: one step per run of one stream, in order.
            let mut appended: Vec<Appended> = Vec::new();
            for run in entries.chunk_by(|a, b| a.0 == b.0) {
                for done in self.append_at_once(run).await? {
                    appended.retain(|a| a.stream != done.stream);
                    appended.push(done);
                }
            }
            Ok(appended)
        })
    }

    fn head(&self, stream: Stream) -> LogFuture<'_, Head> {
        Box::pin(async move {
            let (log, epoch) = self.keys(stream);
            let mut conn = self.redis.conn();
            let epoch: Option<String> = self.bounded(redis::cmd("GET").arg(&epoch).query_async(&mut conn)).await?;
            let last: redis::streams::StreamRangeReply = self
                .bounded(redis::cmd("XREVRANGE").arg(&log).arg("+").arg("-").arg("COUNT").arg(1).query_async(&mut conn))
                .await?;
            let last = last.ids.first().and_then(|e| Position::from_stream_id(&e.id)).unwrap_or_default();
            Ok(Head { epoch: epoch.and_then(|e| e.parse().ok()), last })
        })
    }

    fn reader(&self, stream: Stream) -> LogFuture<'_, Box<dyn LogReader>> {
        Box::pin(async move {
            let key = self.keys(stream).0;
            let conn =
                self.redis.dedicated(&key, BLOCK_MAX).await.map_err(|e| LogError::Unavailable(error_chain(&e)))?;
            let reader: Box<dyn LogReader> = Box::new(StreamReader { conn, stream: key });
            Ok(reader)
        })
    }

    fn events_between(
        &self,
        stream: Stream,
        epoch: u64,
        since: Offset,
        until: Position,
    ) -> LogFuture<'_, Option<Vec<Logged>>> {
        Box::pin(async move {
            if since.epoch != epoch || since.position() > until {
                return Ok(None);
            }
            let log = self.keys(stream).0;
            // Entries up to `max-deleted-entry-id` were trimmed.
            let mut conn = self.redis.conn();
            let info: HashMap<String, redis::Value> =
                self.bounded(redis::cmd("XINFO").arg("STREAM").arg(&log).query_async(&mut conn)).await?;
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
                        .arg(&log)
                        .arg(format!("({}", since.position().stream_id()))
                        .arg(until.stream_id())
                        .query_async(&mut conn),
                )
                .await?;
            if range.ids.iter().any(|entry| of_another_epoch(epoch, entry)) {
                return Ok(None);
            }
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

    /// Claims the prefix for this layout, or says who holds it: an older
    /// version's stream, or another shard count (the campaigns would be in
    /// other shards). Done at start, and again by the control follower (a
    /// Redis that restarted empty forgot the claim).
    fn claim(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let set = redis::cmd("SET").arg(&self.layout_key).arg(self.layout()).arg("NX").arg("GET").clone();
            let held: Option<String> =
                match tokio::time::timeout(self.redis.op_timeout(), set.query_async(&mut conn)).await {
                    Ok(Ok(held)) => held,
                    Ok(Err(e)) if e.code() == Some("WRONGTYPE") => {
                        return Err(LogError::Claimed(format!(
                            "{} is a stream: a herald older than the sharded log uses the prefix {:?}",
                            self.layout_key,
                            self.redis.prefix()
                        )));
                    }
                    Ok(Err(e)) => return Err(LogError::Unavailable(error_chain(&e))),
                    Err(_) => return Err(LogError::Unavailable("timed out".into())),
                };
            match held {
                Some(layout) if layout != self.layout() => Err(LogError::Claimed(format!(
                    "the prefix {:?} holds another layout ({layout:?}); this instance has {} shards",
                    self.redis.prefix(),
                    self.shards
                ))),
                _ => Ok(()),
            }
        })
    }

    fn size(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Follows one stream on a connection of its own.
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
            let read = reply.map_err(|e| LogError::Unavailable(error_chain(&e))).and_then(|reply| {
                let ids: Vec<_> = reply.map(|r| r.keys).unwrap_or_default().into_iter().flat_map(|s| s.ids).collect();
                if ids.iter().any(|entry| of_another_epoch(epoch, entry)) {
                    return Err(LogError::NewEpoch);
                }
                Ok(ids.iter().filter_map(|entry| decode(epoch, entry)).collect())
            });
            (self as Box<dyn LogReader>, read)
        })
    }
}
