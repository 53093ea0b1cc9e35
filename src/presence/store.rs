//! Where a fleet's presence lives: Redis, under one hash tag
//! (`{p:presence}`, one slot).
//!
//! - `{p:presence}:room:<room>`: a hash, one field per instance with local
//!   members in the room, its value that instance's members and their local
//!   connection counts (`alice 2 bob 1`: user ids have no whitespace);
//! - `{p:presence}:rooms:<instance>`: the rooms an instance has a field in;
//! - `{p:presence}:alive`: a sorted set of instances, scored by their last
//!   tick (Redis' clock, ms);
//! - `{p:presence}:last` and `{p:presence}:grace`: when any instance last
//!   ticked, and until when nobody is swept nor reported gone.
//!
//! Each instance's tick is one script: it marks the instance alive, sweeps
//! the instances not seen for the timeout (their fields and room sets go),
//! writes the instance's own members of every room it has (all of them,
//! every tick: a Redis that restarted empty has them back within one tick)
//! and reads the rooms it needs. A Redis that nobody reached for longer than
//! the timeout (restarted empty, paused, unreachable) starts a grace period
//! of one timeout: no sweep, and the instances report no one gone, until
//! every live instance has written its members again.

use crate::redis_conn::{Redis, RedisError};
use crate::rooms::Room;

/// What both scripts share: the time, and whether a field's instance counts.
macro_rules! presence_prelude {
    () => {
        r"
local p, dead_after = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local alive = p .. ':alive'
local function in_grace()
  return now < tonumber(redis.call('GET', p .. ':grace') or '0')
end
local function counted(grace, instance)
  if grace then
    return true
  end
  local seen = redis.call('ZSCORE', alive, instance)
  return seen and tonumber(seen) >= now - dead_after
end
local function read(grace, room)
  local fields = redis.call('HGETALL', p .. ':room:' .. room)
  local out = {}
  for i = 1, #fields, 2 do
    if counted(grace, fields[i]) then
      out[#out + 1] = fields[i]
      out[#out + 1] = fields[i + 1]
    end
  end
  return out
end
"
    };
}

/// One instance's tick. `KEYS[1]`: the alive set. `ARGV`: the prefix
/// (`{p:presence}`), the timeout (ms), the instance, how many writes; the
/// writes (room, members; `''`: none left); then the rooms to read. Returns
/// whether presence is in its grace period (`'1'`), then each room read: the
/// other counted instances' fields and values.
const TICK: &str = concat!(
    presence_prelude!(),
    r"
local me, writes = ARGV[3], tonumber(ARGV[4])
local last = tonumber(redis.call('GET', p .. ':last') or '0')
if now - last > dead_after then
  redis.call('SET', p .. ':grace', now + dead_after)
end
redis.call('SET', p .. ':last', now)
local grace = in_grace()
redis.call('ZADD', alive, now, me)
if not grace then
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', alive, '-inf', '(' .. (now - dead_after))) do
    local rooms = p .. ':rooms:' .. dead
    for _, room in ipairs(redis.call('SMEMBERS', rooms)) do
      redis.call('HDEL', p .. ':room:' .. room, dead)
    end
    redis.call('DEL', rooms)
    redis.call('ZREM', alive, dead)
  end
end
local i = 5
for _ = 1, writes do
  local room, members = ARGV[i], ARGV[i + 1]
  if members == '' then
    redis.call('HDEL', p .. ':room:' .. room, me)
    redis.call('SREM', p .. ':rooms:' .. me, room)
  else
    redis.call('HSET', p .. ':room:' .. room, me, members)
    redis.call('SADD', p .. ':rooms:' .. me, room)
  end
  i = i + 2
end
local out = { grace and '1' or '0' }
while i <= #ARGV do
  local fields = read(grace, ARGV[i])
  local mine = {}
  for j = 1, #fields, 2 do
    if fields[j] ~= me then
      mine[#mine + 1] = fields[j]
      mine[#mine + 1] = fields[j + 1]
    end
  end
  out[#out + 1] = mine
  i = i + 1
end
return out
"
);

/// One room's counted fields. `KEYS[1]`: the alive set. `ARGV`: the prefix,
/// the timeout (ms), the room.
const READ: &str = concat!(presence_prelude!(), "return read(in_grace(), ARGV[3])\n");

/// An instance's goodbye: its fields and its place in the alive set go.
/// `KEYS[1]`: the alive set. `ARGV`: the prefix, the timeout, the instance.
const GOODBYE: &str = concat!(
    presence_prelude!(),
    r"
local rooms = p .. ':rooms:' .. ARGV[3]
for _, room in ipairs(redis.call('SMEMBERS', rooms)) do
  redis.call('HDEL', p .. ':room:' .. room, ARGV[3])
end
redis.call('DEL', rooms)
redis.call('ZREM', alive, ARGV[3])
return 1
"
);

/// What one tick read: whether presence is in its grace period, and per
/// room asked for, the other instances' members (encoded, one per instance).
pub(super) struct TickRead {
    pub grace: bool,
    pub rooms: Vec<Vec<String>>,
}

/// The Redis side of a fleet's presence.
pub(super) struct RedisPresence {
    redis: Redis,
    tick: redis::Script,
    read: redis::Script,
    goodbye: redis::Script,
    prefix: String,
    timeout_ms: u64,
}

impl RedisPresence {
    pub fn new(redis: Redis, timeout_ms: u64) -> RedisPresence {
        let prefix = format!("{{{}:presence}}", redis.prefix());
        RedisPresence {
            redis,
            tick: redis::Script::new(TICK),
            read: redis::Script::new(READ),
            goodbye: redis::Script::new(GOODBYE),
            prefix,
            timeout_ms,
        }
    }

    fn alive(&self) -> String {
        format!("{}:alive", self.prefix)
    }

    /// One tick of `instance`: writes (room, encoded members, `""`: none),
    /// reads `rooms`.
    pub async fn tick(
        &self,
        instance: &str,
        writes: &[(Room, String)],
        rooms: &[Room],
    ) -> Result<TickRead, RedisError> {
        let mut invocation = self.tick.prepare_invoke();
        invocation.key(self.alive()).arg(&self.prefix).arg(self.timeout_ms).arg(instance).arg(writes.len());
        for (room, members) in writes {
            invocation.arg(room.to_string()).arg(members);
        }
        for room in rooms {
            invocation.arg(room.to_string());
        }
        let mut conn = self.redis.conn();
        let reply: Vec<redis::Value> = self.redis.bounded(invocation.invoke_async(&mut conn)).await?;
        let unreadable = || RedisError::Unreadable("a presence tick's reply");
        let mut parts = reply.into_iter();
        let grace = parts.next().ok_or_else(unreadable)?;
        let grace = <String as redis::FromRedisValue>::from_redis_value(grace).map_err(|_| unreadable())?;
        let rooms = parts
            .map(<Vec<String> as redis::FromRedisValue>::from_redis_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| unreadable())?;
        Ok(TickRead { grace: grace == "1", rooms })
    }

    /// The counted fields of `room`, every instance's (own included).
    pub async fn read(&self, room: &Room) -> Result<Vec<String>, RedisError> {
        let mut conn = self.redis.conn();
        let mut invocation = self.read.prepare_invoke();
        invocation.key(self.alive()).arg(&self.prefix).arg(self.timeout_ms).arg(room.to_string());
        self.redis.bounded(invocation.invoke_async(&mut conn)).await
    }

    /// Takes `instance`'s members out at once (a clean stop).
    pub async fn goodbye(&self, instance: &str) -> Result<(), RedisError> {
        let mut conn = self.redis.conn();
        let mut invocation = self.goodbye.prepare_invoke();
        invocation.key(self.alive()).arg(&self.prefix).arg(self.timeout_ms).arg(instance);
        let _: i64 = self.redis.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }
}
