//! The one path every outgoing domain event takes: validated [`Event`]s are
//! appended to the event log, which gives each one its offset, and delivered
//! from the log, in log order, to the sockets in their rooms.
//!
//! - One instance: the log is in memory; appending and delivering happen
//!   under one lock.
//! - A fleet: the log is a Redis Stream. A publish is one atomic append (all
//!   of a batch, or none of it); every instance runs a reader that follows the
//!   stream and delivers each entry to its own local sockets, so a client
//!   gets each event once whichever instance it is on, and an instance that
//!   lost Redis for a moment catches up from where it stopped.
//!
//! A subscription with `since` is served in the same sequence as deliveries
//! (under the lock, or by the reader between two entries): the socket gets
//! the room's logged events after `since`, then joins the room, so between
//! the replayed events and the live ones there is no gap and no duplicate.
//! A socket in several of an event's rooms gets one copy.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::value::RawValue;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use crate::events::{Event, EventKind};
use crate::fleet::{Conn, FleetDriver};
use crate::replay::{Logged, MemoryLog, Offset, Replay, Retention};
use crate::revocation::Revocation;
use crate::rooms::Room;
use crate::session::{JoinRefused, Session, Ticket};
use crate::telemetry::{Metrics, error_chain};
use crate::transport::Transports;

/// What an instance does with a revocation (the gateway's part).
pub type RevocationHandler = Arc<dyn Fn(Revocation) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The stream entry kind of a revocation.
const REVOKE: &str = "@revoke";

/// An event could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The event log (Redis) is unavailable. `accepted` events of the batch
    /// were handed over before it failed.
    #[error("the event log is unavailable")]
    LogUnavailable { accepted: usize, reason: String },
    /// The event could not be serialized (a bug, never the publisher's fault).
    #[error("the event could not be encoded: {0}")]
    Encode(String),
}

/// Appends `ARGV[2..]` (triples: kind, rooms, event object) to the stream
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

/// How long one blocking read of the stream waits.
const BLOCK: Duration = Duration::from_millis(1_000);
/// How many waiting replays one read of the stream serves at most.
const MAX_REPLAY_BATCH: usize = 1024;
/// How many entries one read takes at most.
const READ_BATCH: usize = 512;
/// How often the log (the stream, or the in-memory log) is trimmed by age.
const TRIM_EVERY: Duration = Duration::from_secs(1);

enum Backend<A: Adapter> {
    Memory(Mutex<MemoryLog>),
    Redis { driver: FleetDriver, append: redis::Script, commands: mpsc::Sender<ReaderCommand<A>> },
}

/// A subscription with `since`, served by the stream reader.
struct ReaderCommand<A: Adapter> {
    socket: SocketRef<A>,
    room: Room,
    since: Offset,
    ticket: Ticket,
    joined: Joined,
    reply: oneshot::Sender<JoinResult>,
}

/// How a join ended: whether every missed event could be replayed (`None`
/// without `since`), or why the socket did not join.
pub type JoinResult = Result<Option<bool>, JoinRefused>;

/// What to do once a joining socket is in its room, before any later event
/// of the room is delivered to it: the gateway sends the subscribe ack there.
/// Otherwise a live event could reach the client before a
/// `recovered: false` ack; a client cut in between would then re-subscribe
/// with that event's offset and never learn of the events it missed. Runs at
/// most once, whoever fires it first.
#[derive(Clone)]
pub struct Joined(Arc<std::sync::Mutex<Option<JoinedFn>>>);

type JoinedFn = Box<dyn FnOnce(JoinResult) + Send>;

impl Joined {
    pub fn new(f: impl FnOnce(JoinResult) + Send + 'static) -> Self {
        Joined(Arc::new(std::sync::Mutex::new(Some(Box::new(f)))))
    }

    /// Runs it with how the join ended, unless it already ran.
    pub fn fire(&self, result: JoinResult) {
        let f = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            f(result);
        }
    }
}

struct Inner<A: Adapter> {
    io: SocketIo<A>,
    metrics: Arc<Metrics>,
    transports: Arc<Transports>,
    retention: Retention,
    backend: Backend<A>,
    on_revoke: OnceLock<RevocationHandler>,
    /// The last offset the stream reader delivered.
    head: std::sync::Mutex<Option<Offset>>,
    /// The stream id (ms, seq) of the last entry the stream reader applied.
    applied: watch::Sender<(u64, u64)>,
}

/// Delivers domain events to rooms, and replays them on request.
pub struct Delivery<A: Adapter>(Arc<Inner<A>>);

impl<A: Adapter> Clone for Delivery<A> {
    fn clone(&self) -> Self {
        Delivery(self.0.clone())
    }
}

fn stream_key(prefix: &str) -> String {
    format!("{{{prefix}}}:log")
}

fn epoch_key(prefix: &str) -> String {
    format!("{{{prefix}}}:epoch")
}

/// A stream id (`ms-seq`) as numbers, to compare.
fn stream_position(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn room_names(rooms: &[Room]) -> Vec<String> {
    rooms.iter().map(ToString::to_string).collect()
}

impl<A: Adapter> Delivery<A> {
    /// A delivery path over `io`: in memory, or through Redis when `driver`
    /// is given. Slow consumers are cut through `transports`.
    pub fn new(
        io: SocketIo<A>,
        metrics: Arc<Metrics>,
        transports: Arc<Transports>,
        retention: Retention,
        driver: Option<FleetDriver>,
    ) -> Self {
        match driver {
            None => {
                let inner = Arc::new(Inner {
                    io,
                    metrics,
                    transports,
                    retention,
                    backend: Backend::Memory(Mutex::new(MemoryLog::new(retention))),
                    on_revoke: OnceLock::new(),
                    head: std::sync::Mutex::new(None),
                    applied: watch::Sender::new((0, 0)),
                });
                tokio::spawn(trim_memory_log(Arc::downgrade(&inner)));
                Delivery(inner)
            }
            Some(driver) => {
                let (commands, command_rx) = mpsc::channel(1024);
                let inner = Arc::new(Inner {
                    io,
                    metrics,
                    transports,
                    retention,
                    backend: Backend::Redis { driver: driver.clone(), append: redis::Script::new(APPEND), commands },
                    on_revoke: OnceLock::new(),
                    head: std::sync::Mutex::new(None),
                    applied: watch::Sender::new((0, 0)),
                });
                tokio::spawn(reader(Arc::downgrade(&inner), driver, command_rx));
                Delivery(inner)
            }
        }
    }

    /// Logs and delivers every event, in order. Returns how many were handed
    /// over; on a failure, says how many were.
    pub async fn publish(&self, events: &[Event]) -> Result<usize, DeliveryError> {
        let mut encoded = Vec::with_capacity(events.len());
        for event in events {
            let json = serde_json::to_string(&event.envelope).map_err(|e| DeliveryError::Encode(e.to_string()))?;
            encoded.push((event.kind(), Arc::<[Room]>::from(event.rooms.clone()), json));
        }
        match &self.0.backend {
            Backend::Memory(log) => {
                let mut log = log.lock().await;
                for (kind, rooms, json) in encoded {
                    let logged = log.append(kind, rooms, &json);
                    self.deliver(&logged).await;
                }
                self.0.count(&log);
            }
            Backend::Redis { driver, append, .. } => {
                let entries =
                    encoded.iter().map(|(kind, rooms, json)| (kind.as_str(), room_names(rooms).join(" "), json));
                self.append_to_stream(driver, append, entries).await?;
            }
        }
        for event in events {
            self.0.metrics.events_published.get_or_create(&[("type", event.kind().as_str())]).inc();
        }
        Ok(events.len())
    }

    /// Appends entries (kind, rooms, content) to the Redis Stream in one
    /// atomic step: all of them, or none when Redis fails. Returns the last
    /// entry's stream id.
    async fn append_to_stream<'a>(
        &self,
        driver: &FleetDriver,
        append: &redis::Script,
        entries: impl IntoIterator<Item = (&'a str, String, &'a String)>,
    ) -> Result<String, DeliveryError> {
        let unavailable = |reason: String| {
            self.0.metrics.adapter_errors.inc();
            DeliveryError::LogUnavailable { accepted: 0, reason }
        };
        if !driver.is_healthy() {
            return Err(unavailable("redis is unreachable".into()));
        }
        let prefix = driver.prefix();
        let mut invocation = append.key(stream_key(prefix));
        invocation.key(epoch_key(prefix)).arg(self.0.retention.max_events);
        for (kind, rooms, content) in entries {
            invocation.arg(kind).arg(rooms).arg(content);
        }
        let mut conn = driver.conn();
        let result: Result<redis::RedisResult<(String, String)>, _> =
            tokio::time::timeout(driver.op_timeout(), invocation.invoke_async(&mut conn)).await;
        match result {
            Ok(Ok((_epoch, id))) => Ok(id),
            Ok(Err(e)) => Err(unavailable(error_chain(&e))),
            Err(_) => Err(unavailable("timed out".into())),
        }
    }

    /// Sets what every instance does with a revocation (once, at start-up).
    pub fn on_revoke(&self, handler: RevocationHandler) {
        let _ = self.0.on_revoke.set(handler);
    }

    /// Logs a revocation; every instance applies it in log order, so no event
    /// logged after it reaches the user's sockets in the revoked rooms.
    /// Returns once this instance has applied it.
    pub async fn revoke(&self, revocation: Revocation) -> Result<(), DeliveryError> {
        let json = serde_json::to_string(&revocation).map_err(|e| DeliveryError::Encode(e.to_string()))?;
        match &self.0.backend {
            Backend::Memory(log) => {
                let _order = log.lock().await;
                self.0.apply(revocation).await;
                Ok(())
            }
            Backend::Redis { driver, append, .. } => {
                let id = self.append_to_stream(driver, append, [(REVOKE, String::new(), &json)]).await?;
                let id = stream_position(&id).unwrap_or_default();
                let mut applied = self.0.applied.subscribe();
                match tokio::time::timeout(driver.op_timeout(), applied.wait_for(|at| *at >= id)).await {
                    Ok(Ok(_)) => Ok(()),
                    // Logged: every instance will apply it; a retry is harmless.
                    _ => Err(DeliveryError::LogUnavailable {
                        accepted: 0,
                        reason: "logged, but not applied by this instance in time".into(),
                    }),
                }
            }
        }
    }

    /// Sends a logged event to the local sockets in its rooms.
    async fn deliver(&self, logged: &Logged) {
        self.0.deliver(logged).await;
    }

    /// Joins `socket` to `room` with the `ticket` of its membership check;
    /// with `since`, first replays the room's events after it. Says whether
    /// every missed event could be replayed (`None` without `since`), or why
    /// the socket did not join. `joined` is fired on every path, as soon as
    /// the socket is in the room and before any later event reaches it.
    pub async fn join(
        &self,
        socket: &SocketRef<A>,
        room: &Room,
        since: Option<Offset>,
        ticket: &Ticket,
        joined: &Joined,
    ) -> JoinResult {
        let Some(session) = Session::of(socket) else {
            joined.fire(Err(JoinRefused::Closed));
            return Err(JoinRefused::Closed);
        };
        let Some(since) = since else {
            let head = match &self.0.backend {
                Backend::Memory(log) => log.lock().await.head(),
                Backend::Redis { .. } => *self.0.head.lock().unwrap_or_else(|e| e.into_inner()),
            };
            let result = session.join(socket, room, ticket, head).map(|()| None);
            joined.fire(result);
            return result;
        };
        match &self.0.backend {
            Backend::Memory(log) => {
                let mut log = log.lock().await;
                let head = log.head();
                let replay = log.replay(room, since);
                let result = self.0.replay_to(socket, &session, room, since, head, replay, ticket).map(Some);
                // Still holding the log: no event is delivered before this.
                joined.fire(result);
                result
            }
            Backend::Redis { commands, .. } => {
                let (reply, answer) = oneshot::channel();
                let command = ReaderCommand {
                    socket: socket.clone(),
                    room: room.clone(),
                    since,
                    ticket: ticket.clone(),
                    joined: joined.clone(),
                    reply,
                };
                if commands.send(command).await.is_err() {
                    // The reader is gone (shutting down): the client will refetch.
                    return join_without_replay(socket, &session, room, ticket, joined);
                }
                match answer.await {
                    Ok(result) => result,
                    Err(_) => join_without_replay(socket, &session, room, ticket, joined),
                }
            }
        }
    }
}

/// Joins without replaying anything: `recovered: false`, the client refetches.
fn join_without_replay<A: Adapter>(
    socket: &SocketRef<A>,
    session: &Session,
    room: &Room,
    ticket: &Ticket,
    joined: &Joined,
) -> JoinResult {
    let result = session.join(socket, room, ticket, None).map(|()| Some(false));
    joined.fire(result);
    result
}

/// Trims the in-memory log by age every second, so that an idle instance
/// lets go of old events too (appends trim as well).
async fn trim_memory_log<A: Adapter>(inner: std::sync::Weak<Inner<A>>) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Backend::Memory(log) = &inner.backend {
            let mut log = log.lock().await;
            log.trim();
            inner.count(&log);
        }
    }
}

impl<A: Adapter> Inner<A> {
    /// Shows what the in-memory log holds in the metrics.
    fn count(&self, log: &MemoryLog) {
        let (events, bytes) = log.size();
        self.metrics.replay_log_events.set(events as i64);
        self.metrics.replay_log_bytes.set(bytes as i64);
    }

    async fn apply(&self, revocation: Revocation) {
        match self.on_revoke.get() {
            Some(handler) => handler(revocation).await,
            None => tracing::warn!("a revocation arrived before the gateway was ready; ignored"),
        }
    }

    /// The log was lost: every local socket subscribed to a room is cut to
    /// recover. Returns how many.
    fn recover_every_subscriber(&self) -> usize {
        let Some(ns) = self.io.of("/") else { return 0 };
        ns.local()
            .sockets()
            .into_iter()
            .filter(|s| !Session::subscriptions(s).is_empty())
            .filter(|s| Session::of(s).is_some_and(|session| session.cut(s, &self.transports)))
            .count()
    }

    async fn deliver(&self, logged: &Logged) {
        let Ok(raw) = RawValue::from_string(logged.json.to_string()) else {
            tracing::error!(offset = %logged.offset, "a logged event is not valid JSON");
            return;
        };
        // After shutdown the namespace is gone: nothing to deliver to.
        let Some(ns) = self.io.of("/") else { return };
        // One emit per socket rather than a broadcast: a broadcast's errors do
        // not say which socket failed, and a socket that misses an event must
        // not stay connected as if it had not.
        for socket in ns.local().to(room_names(&logged.rooms)).sockets() {
            self.emit_to(&socket, logged, &raw);
        }
        // Lets the sockets' writers drain between the events of a burst.
        tokio::task::yield_now().await;
    }

    /// Emits a logged event to one socket; returns whether it went into the
    /// socket's buffer. A socket whose buffer is full is a slow consumer: it
    /// is cut, and recovers.
    fn emit_to(&self, socket: &SocketRef<A>, logged: &Logged, raw: &RawValue) -> bool {
        match socket.emit(logged.kind.as_str(), raw) {
            Ok(()) => true,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                if let Some(session) = Session::of(socket)
                    && session.cut(socket, &self.transports)
                {
                    self.metrics.limits_hit.get_or_create(&[("limit", "slow_consumer")]).inc();
                    tracing::info!(
                        socket = session.number,
                        "a socket's buffer is full; cutting it so that it recovers"
                    );
                }
                false
            }
            // It is leaving: its disconnect handler cleans up.
            Err(SendError::Socket(SocketError::Closed)) => false,
            Err(e) => {
                tracing::error!(error = %e, offset = %logged.offset, "cannot encode an event for a socket");
                false
            }
        }
    }

    /// Sends a replay to one socket and joins it to the room. When the socket
    /// cannot take every event, it is cut (it comes back and asks again)
    /// rather than left with a gap. Says whether the replay was complete.
    #[allow(clippy::too_many_arguments)]
    fn replay_to(
        &self,
        socket: &SocketRef<A>,
        session: &Session,
        room: &Room,
        since: Offset,
        head: Option<Offset>,
        replay: Replay,
        ticket: &Ticket,
    ) -> Result<bool, JoinRefused> {
        let missed = session.missed(socket, &replay.events, room);
        if missed.len() > self.retention.max_replay {
            // More than the socket's buffer can take at once: the client refetches.
            session.join(socket, room, ticket, head)?;
            return Ok(false);
        }
        for logged in missed {
            let sent =
                RawValue::from_string(logged.json.to_string()).is_ok_and(|raw| self.emit_to(socket, logged, &raw));
            if !sent {
                return Err(JoinRefused::Closed);
            }
        }
        session.join(socket, room, ticket, if replay.recovered { Some(since) } else { head })?;
        Ok(replay.recovered)
    }
}

/// Follows the Redis Stream: delivers every entry to the local sockets, in
/// order, and serves replays between entries. Reconnects by itself; after a
/// Redis restart (a new epoch) it starts at the new log's beginning.
async fn reader<A: Adapter>(
    inner: std::sync::Weak<Inner<A>>,
    driver: FleetDriver,
    mut commands: mpsc::Receiver<ReaderCommand<A>>,
) {
    let key = stream_key(driver.prefix());
    let epoch_key = epoch_key(driver.prefix());
    let mut epoch: Option<u64> = None;
    let mut last_id = String::from("0-0");
    let mut backoff = Duration::from_millis(50);
    loop {
        if inner.upgrade().is_none() {
            return;
        }
        let conn = match driver.dedicated(BLOCK).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "event log: cannot connect; retrying");
                refuse_pending(&inner, &mut commands);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        let mut shared = driver.conn();
        // The log's epoch: a new one means Redis lost the old log.
        let current = match current_epoch(&mut shared, &epoch_key, driver.op_timeout()).await {
            Ok(e) => e,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        match (epoch, current) {
            (Some(old), Some(new)) if old == new => {}
            (None, _) => {
                // First start: deliver from now on.
                last_id = last_entry_id(&mut shared, &key).await.unwrap_or_else(|| "0-0".into());
                epoch = current;
            }
            _ => {
                // Entries appended just before Redis lost the log may never
                // have been read: every subscribed socket may have a gap.
                let recovering = inner.upgrade().map_or(0, |strong| strong.recover_every_subscriber());
                tracing::warn!(
                    sockets = recovering,
                    "event log: a new epoch (Redis lost the old log); reading it from the start, \
                     subscribed sockets are disconnected to recover"
                );
                last_id = "0-0".into();
                epoch = current;
            }
        }
        backoff = Duration::from_millis(50);
        tracing::debug!(last_id, "event log: following the stream");

        let mut read = Box::pin(read_after(conn.clone(), key.clone(), last_id.clone()));
        let mut trim = tokio::time::interval(TRIM_EVERY);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let error = loop {
            tokio::select! {
                result = &mut read => {
                    let entries = match result {
                        Ok(entries) => entries,
                        Err(e) => break e,
                    };
                    let Some(strong) = inner.upgrade() else { return };
                    // The first entry of a new epoch creates the epoch key: learn it.
                    if epoch.is_none() {
                        epoch = current_epoch(&mut shared, &epoch_key, driver.op_timeout()).await.ok().flatten();
                    }
                    for (id, decoded) in entries {
                        match decoded {
                            Some(Decoded::Event(kind, rooms, json)) => {
                                if let Some(offset) = epoch.and_then(|e| Offset::from_stream_id(e, &id)) {
                                    strong.deliver(&Logged::new(offset, kind, rooms, &json)).await;
                                    *strong.head.lock().unwrap_or_else(|e| e.into_inner()) = Some(offset);
                                }
                            }
                            Some(Decoded::Revoke(revocation)) => strong.apply(revocation).await,
                            None => tracing::warn!(id, "event log: an entry herald cannot read; skipped"),
                        }
                        last_id = id;
                    }
                    if let Some(position) = stream_position(&last_id) {
                        strong.applied.send_replace(position);
                    }
                    drop(strong);
                    read = Box::pin(read_after(conn.clone(), key.clone(), last_id.clone()));
                }
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    // Serve every waiting replay from one read of the stream
                    // (a reconnect storm sends many at once).
                    let mut batch = vec![command];
                    while batch.len() < MAX_REPLAY_BATCH {
                        match commands.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    let Some(strong) = inner.upgrade() else { return };
                    let served = match epoch {
                        Some(e) => serve_replays(&strong, &mut shared, &key, e, &last_id, &batch).await,
                        None => vec![None; batch.len()],
                    };
                    let head = epoch.and_then(|e| Offset::from_stream_id(e, &last_id));
                    for (command, served) in batch.into_iter().zip(served) {
                        let result = match served {
                            Some(result) => result.map(Some),
                            // Not in the log any more: joined without a replay, the client refetches.
                            None => match Session::of(&command.socket) {
                                Some(session) => {
                                    session.join(&command.socket, &command.room, &command.ticket, head).map(|()| Some(false))
                                }
                                None => Err(JoinRefused::Closed),
                            },
                        };
                        // Before this task delivers the next entry.
                        command.joined.fire(result);
                        let _ = command.reply.send(result);
                    }
                }
                _ = trim.tick() => {
                    if let Some(strong) = inner.upgrade() {
                        trim_by_age(&mut shared, &key, strong.retention.window).await;
                    }
                }
            }
        };
        if let Some(strong) = inner.upgrade() {
            strong.metrics.adapter_errors.inc();
        }
        tracing::warn!(error = %error_chain(&error), "event log: reading the stream failed; reconnecting");
    }
}

/// While the reader cannot reach Redis, subscriptions with `since` are
/// joined without a replay (the client refetches).
fn refuse_pending<A: Adapter>(inner: &std::sync::Weak<Inner<A>>, commands: &mut mpsc::Receiver<ReaderCommand<A>>) {
    if inner.upgrade().is_none() {
        return;
    }
    while let Ok(command) = commands.try_recv() {
        let result = match Session::of(&command.socket) {
            Some(session) => {
                join_without_replay(&command.socket, &session, &command.room, &command.ticket, &command.joined)
            }
            None => {
                command.joined.fire(Err(JoinRefused::Closed));
                Err(JoinRefused::Closed)
            }
        };
        let _ = command.reply.send(result);
    }
}

async fn current_epoch(conn: &mut Conn, key: &str, timeout: Duration) -> Result<Option<u64>, ()> {
    let result: Result<redis::RedisResult<Option<String>>, _> =
        tokio::time::timeout(timeout, redis::cmd("GET").arg(key).query_async(conn)).await;
    match result {
        Ok(Ok(value)) => Ok(value.and_then(|v| v.parse().ok())),
        _ => Err(()),
    }
}

async fn last_entry_id(conn: &mut Conn, key: &str) -> Option<String> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XREVRANGE").arg(key).arg("+").arg("-").arg("COUNT").arg(1).query_async(conn).await.ok()?;
    reply.ids.first().map(|e| e.id.clone())
}

/// A stream entry: an event (kind, rooms, event object) or a revocation.
enum Decoded {
    Event(EventKind, Arc<[Room]>, String),
    Revoke(Revocation),
}

/// A stream entry's id and content (`None`: not readable by this version).
type Entry = (String, Option<Decoded>);

fn decode(entry: &redis::streams::StreamId) -> Option<Decoded> {
    let text = |field: &str| -> Option<String> { entry.get::<String>(field) };
    let kind = text("k")?;
    if kind == REVOKE {
        return serde_json::from_str(&text("e")?).ok().map(Decoded::Revoke);
    }
    let kind: EventKind = serde_json::from_value(serde_json::Value::String(kind)).ok()?;
    let rooms: Vec<Room> = text("r")?.split(' ').filter_map(Room::parse).collect();
    Some(Decoded::Event(kind, Arc::from(rooms), text("e")?))
}

/// Blocks until entries after `after` arrive (or the block time passes).
async fn read_after(mut conn: Conn, key: String, after: String) -> redis::RedisResult<Vec<Entry>> {
    let options = redis::streams::StreamReadOptions::default().block(BLOCK.as_millis() as usize).count(READ_BATCH);
    let reply: Option<redis::streams::StreamReadReply> =
        redis::AsyncCommands::xread_options(&mut conn, &[&key], &[&after], &options).await?;
    let mut entries = Vec::new();
    for stream in reply.map(|r| r.keys).unwrap_or_default() {
        for entry in &stream.ids {
            entries.push((entry.id.clone(), decode(entry)));
        }
    }
    Ok(entries)
}

/// Serves a batch of replays from one read of the stream: each one whose
/// `since` is still covered (not trimmed, this epoch, not ahead of what this
/// reader delivered) gets its room's entries after `since`.
async fn serve_replays<A: Adapter>(
    inner: &Inner<A>,
    conn: &mut Conn,
    key: &str,
    epoch: u64,
    last_id: &str,
    batch: &[ReaderCommand<A>],
) -> Vec<Option<Result<bool, JoinRefused>>> {
    let refused = vec![None; batch.len()];
    let Some(last) = Offset::from_stream_id(epoch, last_id) else { return refused };
    // Entries up to `max-deleted-entry-id` were trimmed.
    let info: redis::RedisResult<std::collections::HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("STREAM").arg(key).query_async(conn).await;
    let Ok(info) = info else { return refused };
    let trimmed = match info.get("max-deleted-entry-id") {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(redis::Value::SimpleString(s)) => s.clone(),
        _ => return refused,
    };
    let Some(max_deleted) = Offset::from_stream_id(epoch, &trimmed) else { return refused };
    let servable = |since: Offset| since.epoch == epoch && since <= last && since >= max_deleted;
    let Some(from) = batch.iter().map(|c| c.since).filter(|s| servable(*s)).min() else { return refused };
    let range: redis::RedisResult<redis::streams::StreamRangeReply> =
        redis::cmd("XRANGE").arg(key).arg(format!("({}", from.stream_id())).arg(last_id).query_async(conn).await;
    let Ok(range) = range else { return refused };
    let logged: Vec<Logged> = range
        .ids
        .iter()
        .filter_map(|entry| match decode(entry)? {
            Decoded::Event(kind, rooms, json) => {
                Some(Logged::new(Offset::from_stream_id(epoch, &entry.id)?, kind, rooms, &json))
            }
            Decoded::Revoke(_) => None,
        })
        .collect();
    batch
        .iter()
        .map(|command| {
            if !servable(command.since) {
                return None;
            }
            let Some(session) = Session::of(&command.socket) else { return Some(Err(JoinRefused::Closed)) };
            let events =
                logged.iter().filter(|l| l.offset > command.since && l.targets(&command.room)).cloned().collect();
            let replay = Replay { recovered: true, events };
            Some(inner.replay_to(
                &command.socket,
                &session,
                &command.room,
                command.since,
                Some(last),
                replay,
                &command.ticket,
            ))
        })
        .collect()
}

/// Drops entries older than the window (approximately; Redis keeps whole nodes).
async fn trim_by_age(conn: &mut Conn, key: &str, window: Duration) {
    let time: redis::RedisResult<(u64, u64)> = redis::cmd("TIME").query_async(conn).await;
    let Ok((secs, micros)) = time else { return };
    let now_ms = secs * 1000 + micros / 1000;
    let min_id = now_ms.saturating_sub(window.as_millis() as u64);
    let _: redis::RedisResult<i64> =
        redis::cmd("XTRIM").arg(key).arg("MINID").arg("~").arg(min_id).query_async(conn).await;
}
