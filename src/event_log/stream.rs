//! The event log of a fleet: Redis Streams, one per shard and one for
//! control. An instance follows the control stream and only the shards its
//! sockets need.
//!
//! Keys, under the prefix `p`: shard `K`'s stream `{p:K}:log`, its epoch
//! `{p:K}:epoch` and the idempotency keys of its events `{p:K}:keys` (a
//! sorted set: `<campaign> <key>` scored by when it was stored); the control
//! stream `{p:control}:log` and its epoch. The hash tag (`{p:K}`) keeps a
//! stream, its epoch and its keys in one slot, and spreads the shards over a
//! Redis Cluster's slots (so over its nodes).
//!
//! An append is one Lua script: all of it or none of it, across shards on a
//! single Redis node, within one shard on a cluster (a script cannot span
//! slots, which is why a shard's keys share its slot). It skips the events
//! whose key the shard stored within the key window, and records the keys
//! of those it appends, in the same step. It caps each stream, and each
//! shard's keys, near `HERALD_REPLAY_MAX_EVENTS` entries and drops entries
//! older than the replay window (keys older than their window). Each event
//! carries the control stream's head as its `after` mark. On one node the
//! control stream's head is read in the append's own step; on a cluster
//! (another slot) just before it.
//!
//! A stream and its epoch are made together (an empty stream), when it is
//! first appended to or looked at after Redis lost either (a restart without
//! persistence, a deletion, an eviction): a new, later epoch, and the
//! shard's idempotency keys forgotten with the events they kept out. Each
//! entry carries its epoch, so a reader notices a stream made anew under it
//! ([`LogError::NewEpoch`]).
//!
//! An append that fails with Redis' own error, or while Redis is known to be
//! down, appended nothing; one that timed out, or whose connection broke,
//! has an unknown outcome ([`LogError::Unknown`]): Redis may still run it.
//!
//! An addressed event keeps its audience in the entry's field `a`, and its
//! kind is marked (`entity_updated@to`) so that a version that knows no
//! audience skips it (an entry it cannot read) instead of delivering it to
//! every socket in its rooms.
//!
//! `{p}:log` was the one stream of the versions before the sharded log; it
//! now holds this log's layout (see [`EventLog::claim`]), so that an older
//! instance on the same prefix fails loudly (its reads and appends hit a
//! string, not a stream) instead of splitting the fleet in silence.

use std::collections::HashMap;
use std::time::Duration;

use crate::audience::Audience;
use crate::redis_conn::{Conn, Redis, RedisError};
use crate::rooms::Room;

use super::{
    Appended, Appends, Entry, EventLog, Head, LogError, LogFuture, LogReader, Logged, NewEntry, Offset, Position,
    ReadFuture, Retention, Stream, mark,
};

/// What both scripts share: the server's time (ms), a stream's epoch and
/// its last entry's id. When the epoch or the stream is missing (Redis lost
/// it), both are made anew: a new epoch (server time, later than the lost
/// one) on an empty stream (an entry added and trimmed at once), and the
/// idempotency keys (`keys`, when given) of the lost events forgotten.
macro_rules! lua_prelude {
    () => {
        r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function epoch_of(log, key, now, keys)
  local epoch = redis.call('GET', key)
  if epoch and redis.call('EXISTS', log) == 1 then
    return epoch
  end
  local fresh = now
  if epoch and tonumber(epoch) >= fresh then
    fresh = tonumber(epoch) + 1
  end
  epoch = string.format('%013d', fresh)
  redis.call('DEL', log)
  redis.call('XADD', log, 'MAXLEN', '0', '*', 'k', '@epoch')
  redis.call('SET', key, epoch)
  if keys then
    redis.call('DEL', keys)
  end
  return epoch
end
local function last_of(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if last[1] then
    return last[1][1]
  end
  return '0-0'
end
"
    };
}

/// Appends entries to streams in one atomic step. `KEYS`: each stream
/// touched, its epoch and its keys, in triples; then, when `ARGV[4]` is
/// empty, the control stream and its epoch, whose head marks the events
/// (else `ARGV[4]` is the mark). `ARGV[1]`: the cap (entries per stream,
/// keys per shard); `ARGV[2]`: the window (ms); `ARGV[3]`: the key window
/// (ms); then sextuples: the triple (from 1), kind, rooms, content, key
/// (`''`: none), audience (`''`: none; else kept in the field `a`). An
/// event whose key is in its triple's keys is not appended. Returns, per triple, its epoch and the id of its last entry
/// appended (`''`: none), then how many events were not.
const APPEND: &str = concat!(
    lua_prelude!(),
    r"
local now = now_ms()
local cap = tonumber(ARGV[1])
local n = math.floor(#KEYS / 3)
local mark = ARGV[4]
if mark == '' then
  local epoch = epoch_of(KEYS[#KEYS - 1], KEYS[#KEYS], now)
  local ms, seq = string.match(last_of(KEYS[#KEYS - 1]), '(%d+)-(%d+)')
  mark = string.format('%013d-%013d-%010d', tonumber(epoch), tonumber(ms), tonumber(seq))
end
local epochs, last = {}, {}
for p = 1, n do
  epochs[p], last[p] = epoch_of(KEYS[3 * p - 2], KEYS[3 * p - 1], now, KEYS[3 * p]), ''
  redis.call('ZREMRANGEBYSCORE', KEYS[3 * p], '-inf', now - tonumber(ARGV[3]))
end
local duplicates = 0
for i = 5, #ARGV, 6 do
  local p, key, audience = tonumber(ARGV[i]), ARGV[i + 4], ARGV[i + 5]
  if key ~= '' and redis.call('ZSCORE', KEYS[3 * p], key) then
    duplicates = duplicates + 1
  else
    local c = mark
    if ARGV[i + 1] == '@revoke' then
      c = ''
    end
    if audience == '' then
      last[p] = redis.call('XADD', KEYS[3 * p - 2], 'MAXLEN', '~', cap, '*',
        'k', ARGV[i + 1], 'r', ARGV[i + 2], 'e', ARGV[i + 3], 'c', c, 'epoch', epochs[p])
    else
      last[p] = redis.call('XADD', KEYS[3 * p - 2], 'MAXLEN', '~', cap, '*',
        'k', ARGV[i + 1], 'r', ARGV[i + 2], 'e', ARGV[i + 3], 'c', c, 'epoch', epochs[p], 'a', audience)
    end
    if key ~= '' then
      redis.call('ZADD', KEYS[3 * p], now, key)
    end
  end
end
local out = {}
for p = 1, n do
  redis.call('XTRIM', KEYS[3 * p - 2], 'MINID', '~', now - tonumber(ARGV[2]))
  local over = redis.call('ZCARD', KEYS[3 * p]) - cap
  if over > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[3 * p], 0, over - 1)
  end
  out[2 * p - 1], out[2 * p] = epochs[p], last[p]
end
out[#out + 1] = tostring(duplicates)
return out
"
);

/// A stream's head: its epoch (the stream made anew when lost) and the id
/// of its last entry (`0-0`: none). `KEYS`: the stream, its epoch, its keys.
const HEAD: &str =
    concat!(lua_prelude!(), "return {epoch_of(KEYS[1], KEYS[2], now_ms(), KEYS[3]), last_of(KEYS[1])}\n");

/// The stream entry kind of a revocation.
const REVOKE: &str = "@revoke";
/// What follows the kind of an addressed event (`entity_updated@to`), whose
/// audience is in the field `a`: a version before addressed events reads no
/// kind there, and skips the entry rather than deliver it to everyone.
const ADDRESSED: &str = "@to";
/// How many entries one read takes at most.
const READ_BATCH: usize = 512;
/// The longest blocking read a reader makes.
const BLOCK_MAX: Duration = Duration::from_millis(1_000);

/// The Redis Streams log.
pub struct StreamLog {
    redis: Redis,
    append: redis::Script,
    head: redis::Script,
    retention: Retention,
    shards: u32,
    /// `{p}:log`: the layout, where older versions kept their one stream.
    layout_key: String,
}

impl StreamLog {
    /// The log under `redis`'s prefix, in `shards` shards.
    pub fn new(redis: Redis, retention: Retention, shards: u32) -> StreamLog {
        let layout_key = format!("{{{}}}:log", redis.prefix());
        StreamLog {
            redis,
            append: redis::Script::new(APPEND),
            head: redis::Script::new(HEAD),
            retention,
            shards: shards.max(1),
            layout_key,
        }
    }

    /// The keys of `stream`: the stream itself, its epoch and its events'
    /// idempotency keys.
    fn keys(&self, stream: Stream) -> (String, String, String) {
        let prefix = self.redis.prefix();
        let tag = match stream {
            Stream::Shard(k) => format!("{prefix}:{k}"),
            Stream::Control => format!("{prefix}:control"),
        };
        (format!("{{{tag}}}:log"), format!("{{{tag}}}:epoch"), format!("{{{tag}}}:keys"))
    }

    /// What `{p}:log` holds for this layout. Version 2: revocations only in
    /// the control stream, events marked with its head (an instance of the
    /// first layout would miss the revocations' rooms part).
    fn layout(&self) -> String {
        format!("herald sharded log 2, {} shards", self.shards)
    }

    /// Runs `fut` within the operation timeout; a failure counts.
    async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, LogError> {
        self.redis.bounded(fut).await.map_err(|e| {
            self.redis.failed();
            LogError::Unavailable(e)
        })
    }

    /// One script call: `entries` to their streams, atomically, events
    /// marked `after` (`None`: with the control stream's head, read in the
    /// same step, which needs its keys in the same slot: one Redis node).
    async fn append_at_once(&self, entries: &[(Stream, NewEntry)], after: Option<Offset>) -> Result<Appends, LogError> {
        let mut streams: Vec<Stream> = Vec::new();
        let mut invocation = self.append.prepare_invoke();
        invocation
            .arg(self.retention.max_events)
            .arg(self.retention.window.as_millis() as u64)
            .arg(self.retention.keys_window.as_millis() as u64)
            .arg(after.map(|mark| mark.to_string()).unwrap_or_default());
        for (stream, entry) in entries {
            let triple = match streams.iter().position(|s| s == stream) {
                Some(p) => p,
                None => {
                    let (log, epoch, keys) = self.keys(*stream);
                    invocation.key(log).key(epoch).key(keys);
                    streams.push(*stream);
                    streams.len() - 1
                }
            };
            invocation.arg(triple + 1);
            match entry {
                NewEntry::Event { kind, rooms, audience, envelope, key } => match audience {
                    None => invocation.arg(kind.as_str()),
                    Some(_) => invocation.arg(format!("{}{ADDRESSED}", kind.as_str())),
                }
                .arg(room_names(rooms))
                .arg(envelope)
                .arg(key.as_deref().unwrap_or_default())
                .arg(audience.as_ref().map(Audience::encode).unwrap_or_default()),
                NewEntry::Revocation(json) => invocation.arg(REVOKE).arg("").arg(json).arg("").arg(""),
            };
        }
        if after.is_none() {
            let (log, epoch, _) = self.keys(Stream::Control);
            invocation.key(log).key(epoch);
        }
        let mut conn = self.redis.conn();
        let reply: Vec<String> = match self.redis.bounded(invocation.invoke_async(&mut conn)).await {
            Ok(reply) => reply,
            Err(e) => {
                self.redis.failed();
                return Err(if not_run(&e) { LogError::Unavailable(e) } else { LogError::Unknown(e) });
            }
        };
        // It ran: a reply herald cannot read does not undo it.
        let unreadable = || LogError::Unknown(RedisError::Unreadable("an append's reply"));
        let (duplicates, pairs) = reply.split_last().ok_or_else(unreadable)?;
        if pairs.len() != streams.len() * 2 {
            return Err(unreadable());
        }
        let mut appends = Appends { streams: Vec::new(), duplicates: duplicates.parse().map_err(|_| unreadable())? };
        for (stream, pair) in streams.iter().zip(pairs.chunks(2)) {
            // Every entry of this stream was a duplicate.
            if pair[1].is_empty() {
                continue;
            }
            let epoch = pair[0].parse().map_err(|_| unreadable())?;
            let last = Position::from_stream_id(&pair[1]).ok_or_else(unreadable)?;
            appends.streams.push(Appended { stream: *stream, epoch, last });
        }
        Ok(appends)
    }
}

/// Whether a failed call surely did not run: Redis answered with an error,
/// or the connection was refused or never made. Anything else (a timeout, a
/// connection that broke) may have run.
fn not_run(error: &RedisError) -> bool {
    use redis::ErrorKind;
    match error {
        RedisError::Redis(e) => {
            e.is_connection_refusal()
                || matches!(
                    e.kind(),
                    ErrorKind::Server(_)
                        | ErrorKind::Extension
                        | ErrorKind::AuthenticationFailed
                        | ErrorKind::InvalidClientConfig
                        | ErrorKind::Client
                        | ErrorKind::ClusterConnectionNotFound
                )
        }
        RedisError::NoNodeForSlot(_) | RedisError::Unreachable => true,
        RedisError::Timeout(_) | RedisError::Unreadable(_) => false,
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
        let (kind, audience) = match kind.strip_suffix(ADDRESSED) {
            Some(kind) => (kind.to_owned(), Some(Audience::decode(&text("a")?)?)),
            None => (kind, None),
        };
        let kind = serde_json::from_value(serde_json::Value::String(kind)).ok()?;
        let rooms: Vec<Room> = text("r")?.split(' ').filter_map(Room::parse).collect();
        let offset = Offset::at(epoch, position)?;
        let after = text("c").and_then(|mark| Offset::parse(&mark));
        Some(Entry::Event { logged: Logged::new(offset, kind, rooms.into(), audience, &text("e")?), after })
    })();
    Some((position, decoded.unwrap_or(Entry::Unreadable)))
}

impl EventLog for StreamLog {
    fn shards(&self) -> u32 {
        self.shards
    }

    fn atomic_across_streams(&self) -> bool {
        !self.redis.is_cluster()
    }

    fn append(&self, entries: Vec<(Stream, NewEntry)>) -> LogFuture<'_, Appends> {
        Box::pin(async move {
            if !self.redis.is_healthy() {
                return Err(LogError::Unavailable(RedisError::Unreachable));
            }
            if self.atomic_across_streams() {
                return self.append_at_once(&entries, None).await;
            }
            // A cluster: the control stream is in another slot, so its head
            // is read first (a failure here appended nothing): any revocation
            // appended before this publish began is at or before it.
            let after = Some(if entries.iter().any(|(_, e)| matches!(e, NewEntry::Event { .. })) {
                let control = self.head(Stream::Control).await?;
                mark(control.epoch, control.last)
            } else {
                // Nothing to mark (revocations are not).
                mark(0, Position::default())
            });
            // One step per run of one stream, in order.
            let mut done = Appends::default();
            for run in entries.chunk_by(|a, b| a.0 == b.0) {
                let run = self.append_at_once(run, after).await?;
                done.duplicates += run.duplicates;
                for appended in run.streams {
                    done.streams.retain(|a| a.stream != appended.stream);
                    done.streams.push(appended);
                }
            }
            Ok(done)
        })
    }

    fn head(&self, stream: Stream) -> LogFuture<'_, Head> {
        Box::pin(async move {
            let (log, epoch, keys) = self.keys(stream);
            let mut conn = self.redis.conn();
            let (epoch, last): (String, String) =
                self.bounded(self.head.key(log).key(epoch).key(keys).invoke_async(&mut conn)).await?;
            let unreadable = || LogError::Unavailable(RedisError::Unreadable("a stream's head"));
            Ok(Head {
                epoch: epoch.parse().map_err(|_| unreadable())?,
                last: Position::from_stream_id(&last).ok_or_else(unreadable)?,
            })
        })
    }

    fn reader(&self, stream: Stream) -> LogFuture<'_, Box<dyn LogReader>> {
        Box::pin(async move {
            let key = self.keys(stream).0;
            let conn = self.redis.dedicated(&key, BLOCK_MAX).await.map_err(LogError::Unavailable)?;
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
                    (_, Entry::Event { logged, .. }) => Some(logged),
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
                    Ok(Err(e)) => return Err(LogError::Unavailable(e.into())),
                    Err(_) => return Err(LogError::Unavailable(RedisError::Timeout(self.redis.op_timeout()))),
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
            let read = reply.map_err(|e| LogError::Unavailable(e.into())).and_then(|reply| {
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
