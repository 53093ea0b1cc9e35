//! Delivery: the one path every outgoing domain event takes. Validated
//! [`Event`]s are appended to the event log ([`crate::log`]), which gives
//! each one its offset; one follower task per instance reads the log, in log
//! order, and delivers each entry to the local sockets in its rooms (a
//! revocation, to the gateway). So a client gets each event once, whichever
//! instance it is on, and an instance that lost Redis for a moment catches
//! up from where it stopped.
//!
//! Every join is served by the follower between two entries: the socket gets
//! the room's logged events after its `since` (a replay), then joins the
//! room and is acked, so between the replayed events and the live ones there
//! is no gap, no duplicate, and the ack comes before any live event. A socket
//! in several of an event's rooms gets one copy.
//!
//! A socket whose buffer is full when an event arrives (a slow consumer) is
//! cut (see [`Session::cut`]) rather than left to miss it; so is every
//! subscribed socket when the log was lost (a new epoch).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use serde_json::value::RawValue;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::events::Event;
use crate::log::{Entry, EventLog, LogError, Logged, NewEntry, Offset, Position, Retention};
use crate::rooms::Room;
use crate::session::{JoinRefused, Session, Ticket};
use crate::telemetry::{Metrics, error_chain};
use crate::transport::Transports;

/// What an instance does with a revocation it reads from the log (its JSON).
pub type RevocationHandler = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

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

/// How long one read of the log waits for new entries.
const BLOCK: Duration = Duration::from_millis(1_000);
/// How many waiting joins the follower serves at once (a reconnect storm
/// sends many at once; their replays share one read of the log).
const MAX_JOIN_BATCH: usize = 1024;
/// How often the log is trimmed by age.
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// The longest pause between two attempts to reach the log.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

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

/// A join, served by the follower.
struct Join<A: Adapter> {
    socket: SocketRef<A>,
    room: Room,
    since: Option<Offset>,
    ticket: Ticket,
    joined: Joined,
    reply: oneshot::Sender<JoinResult>,
}

struct Inner<A: Adapter> {
    io: SocketIo<A>,
    metrics: Arc<Metrics>,
    transports: Arc<Transports>,
    retention: Retention,
    log: Arc<dyn EventLog>,
    /// One instance: a publish's 202 comes once its events were delivered.
    delivered_before_accepted: bool,
    /// Longest a revocation's 202 waits for this instance to apply it.
    apply_wait: Duration,
    joins: mpsc::Sender<Join<A>>,
    on_revoke: OnceLock<RevocationHandler>,
    /// The position of the last entry the follower applied.
    applied: watch::Sender<Position>,
}

/// Delivers domain events to rooms, and replays them on request.
pub struct Delivery<A: Adapter>(Arc<Inner<A>>);

impl<A: Adapter> Clone for Delivery<A> {
    fn clone(&self) -> Self {
        Delivery(self.0.clone())
    }
}

/// Where a [`Delivery`] reads and writes.
pub struct DeliveryLog {
    pub log: Arc<dyn EventLog>,
    /// Whether the log is this instance's own (in memory): then a publish
    /// answers once its events were delivered here.
    pub local: bool,
    /// Longest a revocation's 202 waits for this instance to apply it.
    pub apply_wait: Duration,
}

impl<A: Adapter> Delivery<A> {
    /// Delivers what `log` holds to the sockets of `io`, and starts its
    /// follower. Slow consumers are cut through `transports`.
    pub fn new(
        io: SocketIo<A>,
        metrics: Arc<Metrics>,
        transports: Arc<Transports>,
        retention: Retention,
        log: DeliveryLog,
    ) -> Self {
        let (joins, join_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            io,
            metrics,
            transports,
            retention,
            log: log.log.clone(),
            delivered_before_accepted: log.local,
            apply_wait: log.apply_wait,
            joins,
            on_revoke: OnceLock::new(),
            applied: watch::Sender::new(Position::default()),
        });
        tokio::spawn(follow(Arc::downgrade(&inner), log.log, join_rx, log.local));
        Delivery(inner)
    }

    /// Logs every event, in order, in one step. Returns how many were
    /// handed over; on a failure, says how many were (none: a batch goes in
    /// whole or not at all).
    pub async fn publish(&self, events: &[Event]) -> Result<usize, DeliveryError> {
        let mut entries = Vec::with_capacity(events.len());
        for event in events {
            let envelope = serde_json::to_string(&event.envelope).map_err(|e| DeliveryError::Encode(e.to_string()))?;
            entries.push(NewEntry::Event { kind: event.kind(), rooms: Arc::from(event.rooms.clone()), envelope });
        }
        let (_, last) = self.append(entries).await?;
        if self.0.delivered_before_accepted {
            // Bounded: past it the events are logged, and will be delivered.
            let mut applied = self.0.applied.subscribe();
            let _ = tokio::time::timeout(self.0.apply_wait, applied.wait_for(|at| *at >= last)).await;
        }
        for event in events {
            self.0.metrics.events_published.get_or_create(&[("type", event.kind().as_str())]).inc();
        }
        Ok(events.len())
    }

    async fn append(&self, entries: Vec<NewEntry>) -> Result<(u64, Position), DeliveryError> {
        self.0
            .log
            .append(entries)
            .await
            .map_err(|e| DeliveryError::LogUnavailable { accepted: 0, reason: e.to_string() })
    }

    /// Sets what every instance does with a revocation (once, at start-up).
    pub fn on_revoke(&self, handler: RevocationHandler) {
        let _ = self.0.on_revoke.set(handler);
    }

    /// Logs a revocation (its JSON); every instance applies it in log
    /// order, so no event logged after it reaches the user's sockets in the
    /// revoked rooms. Returns once this instance has applied it.
    pub async fn revoke(&self, revocation: String) -> Result<(), DeliveryError> {
        let (_, last) = self.append(vec![NewEntry::Revocation(revocation)]).await?;
        let mut applied = self.0.applied.subscribe();
        match tokio::time::timeout(self.0.apply_wait, applied.wait_for(|at| *at >= last)).await {
            Ok(Ok(_)) => Ok(()),
            // Logged: every instance will apply it; a retry is harmless.
            _ => Err(DeliveryError::LogUnavailable {
                accepted: 0,
                reason: "logged, but not applied by this instance in time".into(),
            }),
        }
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
        let (reply, answer) = oneshot::channel();
        let join = Join {
            socket: socket.clone(),
            room: room.clone(),
            since,
            ticket: ticket.clone(),
            joined: joined.clone(),
            reply,
        };
        let answered = match self.0.joins.send(join).await {
            Ok(()) => answer.await.ok(),
            Err(_) => None,
        };
        // Without an answer the follower is gone (shutting down).
        answered.unwrap_or_else(|| {
            joined.fire(Err(JoinRefused::Closed));
            Err(JoinRefused::Closed)
        })
    }
}

impl<A: Adapter> Inner<A> {
    /// The log was lost (or entries were dropped unread): every local socket
    /// subscribed to a room is cut to recover. Returns how many.
    fn recover_every_subscriber(&self) -> usize {
        let Some(ns) = self.io.of("/") else { return 0 };
        ns.local()
            .sockets()
            .into_iter()
            .filter(|s| !Session::subscriptions(s).is_empty())
            .filter(|s| Session::of(s).is_some_and(|session| session.cut(s, &self.transports)))
            .count()
    }

    /// Applies one entry of the log.
    async fn apply(&self, entry: Entry) {
        match entry {
            Entry::Event(logged) => self.deliver(&logged).await,
            Entry::Revocation(json) => match self.on_revoke.get() {
                Some(handler) => handler(json).await,
                None => tracing::warn!("a revocation arrived before the gateway was ready; ignored"),
            },
            Entry::Unreadable => tracing::warn!("event log: an entry herald cannot read; skipped"),
        }
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
        let rooms: Vec<String> = logged.rooms.iter().map(ToString::to_string).collect();
        for socket in ns.local().to(rooms).sockets() {
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

    /// Sends a replay (the room's events after `since`) to one socket and
    /// joins it to the room. When the socket cannot take every event, it is
    /// cut (it comes back and asks again) rather than left with a gap.
    fn replay_to(
        &self,
        join: &Join<A>,
        session: &Session,
        since: Offset,
        head: Option<Offset>,
        events: &[Logged],
    ) -> Result<bool, JoinRefused> {
        let events: Vec<Logged> =
            events.iter().filter(|l| l.offset > since && l.targets(&join.room)).cloned().collect();
        let missed = session.missed(&join.socket, &events, &join.room);
        if missed.len() > self.retention.max_replay {
            // More than the socket's buffer can take at once: the client refetches.
            session.join(&join.socket, &join.room, &join.ticket, head)?;
            return Ok(false);
        }
        for logged in missed {
            let sent = RawValue::from_string(logged.json.to_string())
                .is_ok_and(|raw| self.emit_to(&join.socket, logged, &raw));
            if !sent {
                return Err(JoinRefused::Closed);
            }
        }
        session.join(&join.socket, &join.room, &join.ticket, Some(since))?;
        Ok(true)
    }

    /// Serves a batch of joins between two entries, at `last` of `epoch`:
    /// the replays share one read of the log.
    async fn serve_joins(&self, batch: Vec<Join<A>>, epoch: Option<u64>, last: Position) {
        let head = epoch.and_then(|e| Offset::at(e, last));
        let servable = |since: &Offset| epoch == Some(since.epoch) && since.position() <= last;
        let from = batch.iter().filter_map(|j| j.since).filter(servable).min();
        let mut shared = match (epoch, from) {
            (Some(epoch), Some(from)) => self.log.events_between(epoch, from, last).await.ok().flatten(),
            _ => None,
        };
        for join in batch {
            let result = match Session::of(&join.socket) {
                None => Err(JoinRefused::Closed),
                Some(session) => match join.since {
                    None => session.join(&join.socket, &join.room, &join.ticket, head).map(|()| None),
                    Some(since) if servable(&since) => {
                        // The shared read starts before this `since`; if it failed (trimmed), ask for this one.
                        let events = match (&shared, epoch) {
                            (Some(events), _) => Some(events.clone()),
                            (None, Some(epoch)) => self.log.events_between(epoch, since, last).await.ok().flatten(),
                            (None, None) => None,
                        };
                        match events {
                            Some(events) => {
                                if shared.is_none() {
                                    shared = Some(events.clone());
                                }
                                self.replay_to(&join, &session, since, head, &events).map(Some)
                            }
                            None => session.join(&join.socket, &join.room, &join.ticket, head).map(|()| Some(false)),
                        }
                    }
                    // Not in the log any more: joined without a replay, the client refetches.
                    Some(_) => session.join(&join.socket, &join.room, &join.ticket, head).map(|()| Some(false)),
                },
            };
            // Before the follower delivers the next entry.
            join.joined.fire(result);
            let _ = join.reply.send(result);
        }
    }

    /// Shows what the in-memory log holds in the metrics.
    fn count(&self) {
        if let Some((events, bytes)) = self.log.size() {
            self.metrics.replay_log_events.set(events as i64);
            self.metrics.replay_log_bytes.set(bytes as i64);
        }
    }
}

/// Takes the waiting joins (the one given, and those queued behind it).
fn batch_of<A: Adapter>(first: Join<A>, joins: &mut mpsc::Receiver<Join<A>>) -> Vec<Join<A>> {
    let mut batch = vec![first];
    while batch.len() < MAX_JOIN_BATCH {
        match joins.try_recv() {
            Ok(join) => batch.push(join),
            Err(_) => break,
        }
    }
    batch
}

/// Follows the log: applies every entry, in order, and serves joins between
/// entries. It starts at the log's start when the log is this instance's own
/// (`local`), else at its end (a fleet's instance delivers what is published
/// from now on). Reconnects by itself; after a new epoch (Redis lost the
/// log) it cuts every subscribed socket and reads the new log from its start.
async fn follow<A: Adapter>(
    inner: Weak<Inner<A>>,
    log: Arc<dyn EventLog>,
    mut joins: mpsc::Receiver<Join<A>>,
    local: bool,
) {
    let mut epoch: Option<u64> = None;
    let mut last = Position::default();
    let mut started = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let reached = async { Ok::<_, LogError>((log.reader().await?, log.head().await?)) }.await;
        let (reader, head) = match reached {
            Ok(reached) => reached,
            Err(e) => {
                tracing::debug!(error = %e, "event log: unreachable; retrying");
                // Meanwhile, joins are served without a replay (the client refetches).
                while let Ok(join) = joins.try_recv() {
                    strong.serve_joins(vec![join], None, last).await;
                }
                drop(strong);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        match (started, epoch, head.epoch) {
            (false, _, _) => {
                (started, epoch) = (true, head.epoch);
                last = if local { Position::default() } else { head.last };
                strong.applied.send_replace(last);
            }
            (true, Some(old), Some(new)) if old == new => {}
            // The log is new: entries appended just before the old one was
            // lost may never have been read, so every subscribed socket may
            // have a gap.
            (true, _, _) => {
                let cut = strong.recover_every_subscriber();
                tracing::warn!(
                    sockets = cut,
                    "event log: a new epoch (Redis lost the old log); reading it from the start, \
                     subscribed sockets are cut to recover"
                );
                (epoch, last) = (head.epoch, Position::default());
            }
        }
        drop(strong);
        backoff = Duration::from_millis(50);
        tracing::debug!("event log: following");

        let mut read = reader.read_after(epoch.unwrap_or_default(), last, BLOCK);
        let mut trim = tokio::time::interval(TRIM_EVERY);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let error = loop {
            tokio::select! {
                (reader, result) = &mut read => {
                    let entries = match result {
                        Ok(entries) => entries,
                        Err(e) => break e,
                    };
                    let Some(strong) = inner.upgrade() else { return };
                    if epoch.is_none() && !entries.is_empty() {
                        // The first entry of a new log created its epoch: learn it, then read again.
                        epoch = log.head().await.ok().and_then(|h| h.epoch);
                    } else {
                        for (position, entry) in entries {
                            strong.apply(entry).await;
                            last = position;
                        }
                        strong.applied.send_replace(last);
                        strong.count();
                    }
                    read = reader.read_after(epoch.unwrap_or_default(), last, BLOCK);
                }
                join = joins.recv() => {
                    let Some(join) = join else { return };
                    let Some(strong) = inner.upgrade() else { return };
                    strong.serve_joins(batch_of(join, &mut joins), epoch, last).await;
                }
                _ = trim.tick() => {
                    let Some(strong) = inner.upgrade() else { return };
                    let _ = log.trim().await;
                    strong.count();
                }
            }
        };
        let Some(strong) = inner.upgrade() else { return };
        if matches!(error, LogError::Gap) {
            // Entries were dropped before they were read: as with a new log.
            let cut = strong.recover_every_subscriber();
            tracing::warn!(
                sockets = cut,
                "event log: entries were dropped unread; subscribed sockets are cut to recover"
            );
            started = false;
            continue;
        }
        strong.metrics.log_errors.inc();
        tracing::warn!(error = %error_chain(&error), "event log: reading failed; reconnecting");
    }
}
