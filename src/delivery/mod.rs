//! Delivery: the one path every outgoing domain event takes. Validated
//! [`Event`]s are appended to the event log ([`crate::event_log`]), each to the
//! shard of its campaign, which gives it its offset. An instance follows
//! (see [`follower`]) the shards its sockets need, and delivers each entry,
//! in its shard's order, to the local sockets in its rooms. So a client gets
//! each event once, whichever instance it is on, and an instance that lost
//! Redis for a moment catches up from where it stopped.
//!
//! Every join is served by its shard's follower between two entries (see
//! [`joins`]): the socket gets the room's logged events after its `since` (a
//! replay), then joins the room and is acked, so between the replayed events
//! and the live ones there is no gap, no duplicate, and the ack comes before
//! any live event. A socket in several of an event's rooms gets one copy.
//!
//! A revocation goes to the control stream, which every instance follows
//! and applies whole (the membership cache, racing subscribes, the rooms, a
//! user's sockets). It takes no room in any shard: an event carries the
//! control stream's head when it was appended, and a follower delivers it
//! only once this instance has applied the control stream up to there
//! (serving joins meanwhile), so no event logged after a revocation reaches
//! the sockets it took out.
//!
//! An addressed event (with an audience) goes only to the sockets of its
//! audience's users among those in its rooms, live and in a replay.
//!
//! A socket whose buffer is full when an event arrives (a slow consumer) is
//! cut (see [`Session::cut`]) rather than left to miss it; so is every socket
//! in a shard's rooms when that shard's stream was lost (a new epoch).

mod follower;
mod joins;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use serde_json::value::RawValue;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};
use tokio::sync::{oneshot, watch};

use crate::event_log::{
    Appended, Appends, EventLog, LogError, Logged, NewEntry, Offset, Retention, Stream, mark, shard_of,
};
use crate::events::Event;
use crate::health::Probe;
use crate::redis_conn::Redis;
use crate::rooms::{Room, user_room};
use crate::session::{JoinRefused, Session, Ticket};
use crate::telemetry::Metrics;
use crate::transport::Transports;

use follower::{Following, ReadFrom, Role};
use joins::Join;
pub use joins::{JoinResult, Joined};

/// A future of the revocation hooks.
pub type RevocationFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a revocation could not be remembered.
pub type RevocationError = Box<dyn std::error::Error + Send + Sync>;

/// What an instance does with revocations (given at start-up). The log
/// carries their JSON, which delivery does not read.
pub trait Revocations: Send + Sync + 'static {
    /// On the instance that logs it, before it is logged: what must outlive
    /// the log (a user's revocation, in the store). When it fails, nothing
    /// is logged.
    fn remember<'a>(&'a self, json: &'a str) -> RevocationFuture<'a, Result<(), RevocationError>>;

    /// On every instance, in the control stream's order.
    fn apply(&self, json: String) -> RevocationFuture<'_, ()>;
}

/// What a publish did: how many events were handed over (now, or within
/// the window under the same key), and how many of those were duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub accepted: usize,
    pub duplicates: usize,
}

/// An event could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The event log (Redis) is unavailable. `accepted` events of the batch
    /// were handed over before it failed; none of the others was.
    #[error("the event log is unavailable")]
    LogUnavailable {
        accepted: usize,
        #[source]
        source: LogError,
    },
    /// The event log did not answer in time: after the first `accepted`
    /// events of the batch (handed over), the next `unknown` may or may not
    /// have been (Redis may still append them); none of the others was.
    #[error("the event log did not answer in time")]
    Unknown {
        accepted: usize,
        unknown: usize,
        #[source]
        source: LogError,
    },
    /// A revocation could not be remembered (the store failed): nothing was logged.
    #[error("the store is unavailable")]
    Store(#[source] RevocationError),
    /// The event could not be serialized (a bug, never the publisher's fault).
    #[error("the event could not be encoded")]
    Encode(#[source] serde_json::Error),
}

struct Inner {
    io: SocketIo,
    metrics: Arc<Metrics>,
    transports: Arc<Transports>,
    retention: Retention,
    log: Arc<dyn EventLog>,
    /// One instance: a publish's 202 comes once its events were delivered.
    delivered_before_accepted: bool,
    /// Longest a revocation's 202 waits for this instance to apply it.
    apply_wait: Duration,
    /// How long a shard stays followed once none of its rooms is in use.
    linger: Duration,
    /// The streams followed, each by its follower.
    followers: Mutex<HashMap<Stream, Following>>,
    /// Where this instance has applied the control stream up to.
    control: watch::Receiver<Offset>,
    /// What this instance does with revocations.
    revocations: Arc<dyn Revocations>,
    /// Why the log's keys are not this instance's (another layout holds them).
    claim_problem: Mutex<Option<String>>,
    /// The names of the rooms with a local socket, and when they were listed.
    in_use: Mutex<Option<(std::time::Instant, Arc<std::collections::HashSet<String>>)>>,
}

/// Delivers domain events to rooms, and replays them on request.
pub struct Delivery(Arc<Inner>);

impl Clone for Delivery {
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
    /// How long a shard stays followed once none of its rooms is in use.
    pub linger: Duration,
    /// Where the control stream stood when the instance started: it is read
    /// from there (`None`: from its start, the instance's own log).
    pub control_from: Option<Offset>,
}

impl Delivery {
    /// Delivers what `log` holds to the sockets of `io`, and starts the
    /// followers an instance always has (the control stream's, which applies
    /// each revocation with `revocations` from its first entry on). Slow
    /// consumers are cut through `transports`.
    pub fn new(
        io: SocketIo,
        metrics: Arc<Metrics>,
        transports: Arc<Transports>,
        retention: Retention,
        log: DeliveryLog,
        revocations: Arc<dyn Revocations>,
    ) -> Self {
        let (control_tx, control) = watch::channel(Offset { epoch: 0, major: 0, minor: 0 });
        let inner = Arc::new(Inner {
            io,
            metrics,
            transports,
            retention,
            log: log.log.clone(),
            delivered_before_accepted: log.local,
            apply_wait: log.apply_wait,
            linger: log.linger,
            followers: Mutex::new(HashMap::new()),
            control,
            revocations,
            claim_problem: Mutex::new(None),
            in_use: Mutex::new(None),
        });
        let from = match log.control_from {
            None => ReadFrom::Start,
            Some(mark) => ReadFrom::Mark(mark),
        };
        let always = Role { stream: Stream::Control, permanent: true, from };
        let following = inner.start_with(always, control_tx);
        inner.followers().insert(always.stream, following);
        Delivery(inner)
    }

    /// Logs every event, in order, each in its campaign's shard, except
    /// those whose idempotency key the log stored within the window. Every
    /// event is handed over (now or before); on a failure, says which were,
    /// which may have been, and which were not (see [`DeliveryError`]): all
    /// or nothing when the log appends across shards in one step (one Redis
    /// node, or one campaign), else a run of one shard at a time.
    pub async fn publish(&self, events: &[Event]) -> Result<Published, DeliveryError> {
        let shards = self.0.log.shards();
        let mut entries = Vec::with_capacity(events.len());
        for event in events {
            let envelope = serde_json::to_string(&event.envelope).map_err(DeliveryError::Encode)?;
            let campaign = event.payload.campaign_id();
            entries.push((
                Stream::Shard(shard_of(campaign, shards)),
                NewEntry::Event {
                    kind: event.kind(),
                    rooms: Arc::from(event.rooms.clone()),
                    audience: event.audience.clone(),
                    envelope,
                    key: event.key.as_ref().map(|key| key.scoped(campaign)),
                },
            ));
        }
        let appends = self.append(entries).await?;
        if self.0.delivered_before_accepted {
            // Bounded: past it the events are logged, and will be delivered.
            let _ = tokio::time::timeout(self.0.apply_wait, self.0.applied(&appends.streams)).await;
        }
        for event in events {
            self.0.metrics.events_published.get_or_create(&[("type", event.kind().as_str())]).inc();
        }
        Ok(Published { accepted: events.len(), duplicates: appends.duplicates })
    }

    /// Appends in one step when the log can; else one stream's run at a
    /// time, in order, counting the entries handed over before a failure.
    async fn append(&self, entries: Vec<(Stream, NewEntry)>) -> Result<Appends, DeliveryError> {
        let log = &self.0.log;
        let failed = |accepted: usize, unknown: usize, e: LogError| match e {
            source @ LogError::Unknown(_) => DeliveryError::Unknown { accepted, unknown, source },
            source => DeliveryError::LogUnavailable { accepted, source },
        };
        if log.atomic_across_streams() {
            let n = entries.len();
            return log.append(entries).await.map_err(|e| failed(0, n, e));
        }
        let mut done = Appends::default();
        let mut accepted = 0;
        let mut rest = entries.into_iter().peekable();
        while let Some(first) = rest.next() {
            let mut run = vec![first];
            while let Some(next) = rest.next_if(|(stream, _)| *stream == run[0].0) {
                run.push(next);
            }
            let n = run.len();
            let appends = log.append(run).await.map_err(|e| failed(accepted, n, e))?;
            done.streams.extend(appends.streams);
            done.duplicates += appends.duplicates;
            accepted += n;
        }
        Ok(done)
    }

    /// Remembers a revocation (its JSON; see [`Revocations::remember`]),
    /// then logs it to the control stream, which every instance applies in
    /// order, and before any event logged after it. Returns once this
    /// instance has applied it.
    pub async fn revoke(&self, revocation: String) -> Result<(), DeliveryError> {
        self.0.revocations.remember(&revocation).await.map_err(DeliveryError::Store)?;
        let appends = self.append(vec![(Stream::Control, NewEntry::Revocation(revocation))]).await?;
        match tokio::time::timeout(self.0.apply_wait, self.0.applied(&appends.streams)).await {
            Ok(()) => Ok(()),
            // Logged: every instance will apply it; a retry is harmless.
            Err(_) => {
                Err(DeliveryError::Unknown { accepted: 0, unknown: 1, source: LogError::NotApplied(self.0.apply_wait) })
            }
        }
    }

    /// Joins `socket` to `room` with the `ticket` of its membership check;
    /// with `since`, first replays the room's events after it. Says whether
    /// every missed event could be replayed (`None` without `since`), or why
    /// the socket did not join. `joined` is fired on every path, as soon as
    /// the socket is in the room and before any later event reaches it.
    pub async fn join(
        &self,
        socket: &SocketRef,
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
        let stream = Stream::Shard(shard_of(&ticket.campaign, self.0.log.shards()));
        let answered = match self.0.send_join(stream, join) {
            Ok(()) => answer.await.ok(),
            Err(_) => None,
        };
        // Without an answer the follower is gone (shutting down).
        answered.unwrap_or_else(|| {
            joined.fire(Err(JoinRefused::Closed));
            Err(JoinRefused::Closed)
        })
    }

    /// `/readyz`'s probe of a fleet's log: `redis` answers, and no other
    /// layout of the log (an older version, another shard count) uses its
    /// keys (the fleet would be split).
    pub fn probe(&self, redis: Redis) -> Probe {
        let delivery = self.clone();
        Arc::new(move || {
            let answer = match (redis.is_healthy(), delivery.0.claim_problem.lock().clone()) {
                (false, _) => Err("redis is unreachable".to_owned()),
                (true, Some(why)) => Err(why),
                (true, None) => Ok(()),
            };
            Box::pin(async move { answer })
        })
    }
}

impl Inner {
    fn followers(&self) -> MutexGuard<'_, HashMap<Stream, Following>> {
        self.followers.lock()
    }

    /// Resolves once this instance has applied every append it follows the
    /// stream of (a stream it does not follow has no socket here to reach).
    fn applied(&self, appended: &[Appended]) -> impl Future<Output = ()> + use<> {
        let waits: Vec<(watch::Receiver<Offset>, Offset)> = {
            let followers = self.followers();
            appended
                .iter()
                .filter_map(|a| followers.get(&a.stream).map(|f| (f.applied.clone(), mark(a.epoch, a.last))))
                .collect()
        };
        async move {
            for (mut applied, last) in waits {
                let _ = applied.wait_for(|at| *at >= last).await;
            }
        }
    }

    /// Delivers one logged event to the local sockets in its rooms (of its
    /// audience's users, when it has one). An event no local socket wants
    /// (another campaign of a shard this instance follows) costs only the
    /// look-up.
    async fn deliver(&self, logged: &Logged) {
        // After shutdown the namespace is gone: nothing to deliver to.
        let Some(ns) = self.io.of("/") else { return };
        let sockets = match &logged.audience {
            None => ns.local().to(logged.rooms.iter().map(ToString::to_string).collect::<Vec<_>>()).sockets(),
            // The audience's sockets here (each user's room), those in one of
            // the event's rooms: the cost follows the audience, not the rooms.
            Some(audience) => ns
                .local()
                .to(audience.users().map(user_room).collect::<Vec<_>>())
                .sockets()
                .into_iter()
                .filter(|socket| Session::of(socket).is_some_and(|session| session.in_any(&logged.rooms)))
                .collect(),
        };
        if sockets.is_empty() {
            return;
        }
        let Ok(raw) = RawValue::from_string(logged.json.to_string()) else {
            tracing::error!(offset = %logged.offset, "a logged event is not valid JSON");
            return;
        };
        // One emit per socket rather than a broadcast: a broadcast's errors do
        // not say which socket failed, and a socket that misses an event must
        // not stay connected as if it had not.
        for socket in sockets {
            self.emit_to(&socket, logged, &raw);
        }
        // Lets the sockets' writers drain between the events of a burst.
        tokio::task::yield_now().await;
    }

    /// Emits a logged event to one socket; returns whether it went into the
    /// socket's buffer. A socket whose buffer is full is a slow consumer: it
    /// is cut, and recovers.
    fn emit_to(&self, socket: &SocketRef, logged: &Logged, raw: &RawValue) -> bool {
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

    /// Shows what the in-memory log holds in the metrics.
    fn count(&self) {
        if let Some((events, bytes)) = self.log.size() {
            self.metrics.replay_log_events.set(events as i64);
            self.metrics.replay_log_bytes.set(bytes as i64);
        }
    }
}
