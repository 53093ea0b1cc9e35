//! Presence: who has a room open, per user, across the fleet.
//!
//! A socket that subscribes with `presence: true` is a member of the room's
//! presence (as its user: several tabs are one member with a connection
//! count) and is told who the others are: the subscribe ack lists the
//! members, then `presence_joined` / `presence_left` follow. It stays a
//! member while it is in the room: an unsubscribe, a revocation, a cut or a
//! disconnect takes it out (through its [`Session`](crate::session::Session),
//! the one place its rooms change).
//!
//! Each instance keeps its own members per room, and a ticker (every
//! `HERALD_PRESENCE_INTERVAL`, and at once after a revocation) makes one
//! round: in a fleet it writes them to Redis and reads the other instances'
//! (see [`store`]); then, per room, it compares the members with what this
//! instance's presence sockets were last told and sends the difference: a
//! user's first connection anywhere is `presence_joined`, its last one gone
//! is `presence_left`, once it has been missing for `HERALD_PRESENCE_TIMEOUT`
//! (a client that reconnects, after a cut or a Redis restart, within that
//! time is never said to have left and come back; a revoked user is said to
//! have left at the next round). So a user who comes and goes within one
//! round is never announced, and each user is announced at most once per
//! round. An instance that stops making rounds (it died) has its members
//! dropped once it missed them for the timeout (see [`store`]).
//!
//! Above `HERALD_PRESENCE_MAX_MEMBERS`, a room's listeners here are told
//! counts only (`presence_count`, at most once a second), for as long as the
//! room has listeners here. A round is in [`round`].
//!
//! An ack and the differences sent after it are made under one lock, from
//! one state (what the room's sockets were last told), so a client that
//! applies them in order has the members as of the latest round.

pub mod api;
mod round;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tokio::sync::Notify;
use ts_rs::TS;

pub use crate::config::PresenceSettings;
use crate::redis_conn::{Redis, RedisError};
use crate::rooms::Room;
use crate::telemetry::Metrics;

use store::RedisPresence;

/// A member of a room's presence: a user and how many connections of it are
/// in the room, fleet-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct PresenceMember {
    pub user_id: String,
    pub connections: u32,
}

/// `presence_joined`: a user's first connection in the room.
#[derive(Debug, Clone, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct PresenceJoined {
    /// The room, `<kind>:<id>`.
    pub room: String,
    pub user_id: String,
    pub connections: u32,
}

/// `presence_left`: a user's last connection in the room is gone.
#[derive(Debug, Clone, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct PresenceLeft {
    /// The room, `<kind>:<id>`.
    pub room: String,
    pub user_id: String,
}

/// `presence_count`: how many members a room has, for a room told counts
/// only (over `HERALD_PRESENCE_MAX_MEMBERS`).
#[derive(Debug, Clone, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct PresenceCount {
    /// The room, `<kind>:<id>`.
    pub room: String,
    pub count: usize,
}

/// What a presence subscription's ack carries: the members, or, in a room
/// told counts only, how many there are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceAck {
    Members(Vec<PresenceMember>),
    Count(usize),
}

/// How presence cuts a socket whose buffer is full.
pub type Cut = Box<dyn Fn(&SocketRef) + Send + Sync>;

/// Users and their connection counts.
type Members = BTreeMap<Arc<str>, u32>;

/// Most often a room told counts only is told its count.
const COUNT_EVERY: Duration = Duration::from_secs(1);

/// One room's presence on this instance.
struct LocalRoom {
    /// This instance's presence sockets in the room, per user.
    users: HashMap<Arc<str>, u32>,
    /// What this instance's presence sockets in the room were last told.
    sent: Members,
    /// The users told of but missing from the latest rounds, since when.
    missing: HashMap<Arc<str>, Instant>,
    /// Its listeners here are told counts only (it went over the maximum;
    /// it stays so while it has listeners here), and the count they were
    /// last told, when.
    counts_only: bool,
    told_count: Option<(usize, Instant)>,
}

impl LocalRoom {
    fn told(sent: Members) -> LocalRoom {
        LocalRoom { users: HashMap::new(), sent, missing: HashMap::new(), counts_only: false, told_count: None }
    }

    /// What an ack carries: what the room's listeners here were last told.
    fn ack(&self) -> PresenceAck {
        if self.counts_only { PresenceAck::Count(self.sent.len()) } else { PresenceAck::Members(listed(&self.sent)) }
    }
}

struct Inner {
    /// This instance's name among the fleet's (random, per process).
    instance: String,
    store: Option<RedisPresence>,
    settings: PresenceSettings,
    io: SocketIo,
    /// Cuts a socket that cannot take what it is told (it comes back, to a
    /// fresh ack): its session's cut, given at start.
    cut: Cut,
    metrics: Arc<Metrics>,
    rooms: Mutex<HashMap<Room, LocalRoom>>,
    /// Users revoked lately (within the timeout), and when: their absence
    /// is told at once.
    revoked: Mutex<HashMap<Arc<str>, Instant>>,
    /// Wakes the ticker before its time (a revocation).
    wake: Notify,
    /// Held through each round; true once this instance said goodbye (no
    /// round may write its members again).
    said_goodbye: tokio::sync::Mutex<bool>,
}

/// The presence of every room, as this instance sees and tells it.
#[derive(Clone)]
pub struct Presence(Arc<Inner>);

/// The name of the Socket.IO room of a room's presence sockets (the
/// `presence:` kind is not one clients can name).
fn presence_room(room: &Room) -> String {
    format!("presence:{room}")
}

/// The members a room's presence sockets are told of.
fn listed(members: &Members) -> Vec<PresenceMember> {
    members.iter().map(|(user, n)| PresenceMember { user_id: user.to_string(), connections: *n }).collect()
}

/// Encodes one instance's members of a room (`alice 2 bob 1`).
fn encode(users: &HashMap<Arc<str>, u32>) -> String {
    let mut sorted: Vec<_> = users.iter().collect();
    sorted.sort();
    sorted.iter().map(|(user, n)| format!("{user} {n}")).collect::<Vec<_>>().join(" ")
}

/// Adds what [`encode`] wrote to `members`; skips what it cannot read.
fn add_encoded(members: &mut Members, encoded: &str) {
    let mut parts = encoded.split(' ');
    while let (Some(user), Some(n)) = (parts.next(), parts.next()) {
        if let (Ok(n), false) = (n.parse::<u32>(), user.is_empty()) {
            *members.entry(Arc::from(user)).or_default() += n;
        }
    }
}

fn add_local(members: &mut Members, users: &HashMap<Arc<str>, u32>) {
    for (user, n) in users {
        *members.entry(user.clone()).or_default() += n;
    }
}

impl Presence {
    /// Presence for the sockets of `io`: one instance's alone, or, with
    /// `redis`, the fleet's. Starts its ticker.
    pub fn start(
        io: SocketIo,
        cut: Cut,
        metrics: Arc<Metrics>,
        redis: Option<Redis>,
        settings: PresenceSettings,
    ) -> Presence {
        let instance = format!("{:016x}", rand::random::<u64>());
        let store = redis.map(|redis| RedisPresence::new(redis, settings.timeout.as_millis() as u64));
        let inner = Arc::new(Inner {
            instance,
            store,
            settings,
            io,
            cut,
            metrics,
            rooms: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            said_goodbye: tokio::sync::Mutex::new(false),
        });
        tokio::spawn(round::tick_forever(Arc::downgrade(&inner)));
        Presence(inner)
    }

    /// Before a presence socket joins `room`: when this instance has no
    /// presence state for it yet, reads the fleet's members, so that the ack
    /// lists them. When Redis cannot say, the ack lists what this instance
    /// knows, and the next round tells the rest.
    pub async fn prime(&self, room: &Room) {
        if self.0.rooms.lock().contains_key(room) {
            return;
        }
        let mut members = Members::new();
        if let Some(store) = &self.0.store {
            match store.read(room).await {
                Ok(fields) => {
                    for pair in fields.chunks(2) {
                        if let [instance, encoded] = pair
                            && *instance != self.0.instance
                        {
                            add_encoded(&mut members, encoded);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::error_chain(&e), "presence: cannot read a room's members")
                }
            }
        }
        self.0.rooms.lock().entry(room.clone()).or_insert_with(|| LocalRoom::told(members));
    }

    /// A presence socket of `user` enters `room`: it counts as a member
    /// from the next round on, and `ack` is given the members its room's
    /// sockets were last told (called under the lock the rounds take, so
    /// that no difference reaches the socket before its ack).
    pub(crate) fn enter(&self, socket: &SocketRef, room: &Room, user: &Arc<str>, ack: impl FnOnce(PresenceAck)) {
        let mut rooms = self.0.rooms.lock();
        let count = rooms.len() + usize::from(!rooms.contains_key(room));
        self.0.metrics.presence_rooms.set(count as i64);
        self.0.metrics.presence_subscriptions.inc();
        let local = rooms.entry(room.clone()).or_insert_with(|| LocalRoom::told(Members::new()));
        *local.users.entry(user.clone()).or_default() += 1;
        socket.join(presence_room(room));
        ack(local.ack());
    }

    /// The members `room`'s presence sockets here were last told, for an
    /// ack (the socket already a member).
    pub(crate) fn told(&self, room: &Room, ack: impl FnOnce(PresenceAck)) {
        let rooms = self.0.rooms.lock();
        ack(rooms.get(room).map_or(PresenceAck::Members(Vec::new()), LocalRoom::ack));
    }

    /// A presence socket of `user` leaves `room`.
    pub(crate) fn exit(&self, socket: &SocketRef, room: &Room, user: &Arc<str>) {
        let mut rooms = self.0.rooms.lock();
        if let Some(local) = rooms.get_mut(room)
            && let Some(n) = local.users.get_mut(user)
        {
            *n -= 1;
            if *n == 0 {
                local.users.remove(user);
            }
            self.0.metrics.presence_subscriptions.dec();
        }
        socket.leave(presence_room(room));
    }

    /// Makes the next round now (a revocation took members out).
    pub fn hurry(&self) {
        self.0.wake.notify_one();
    }

    /// `user` was revoked (from a campaign, or altogether): on every
    /// instance, its absence from a room is told at the next round, without
    /// the linger that spares a reconnecting client a leave and a join.
    pub fn revoked(&self, user: &Arc<str>) {
        let timeout = self.0.settings.timeout;
        let mut revoked = self.0.revoked.lock();
        revoked.retain(|_, at| at.elapsed() < timeout);
        revoked.insert(user.clone(), Instant::now());
        drop(revoked);
        self.hurry();
    }

    /// The members of `room`, fleet-wide, now (the backend's query).
    pub async fn members(&self, room: &Room) -> Result<Vec<PresenceMember>, RedisError> {
        let mut members = Members::new();
        if let Some(store) = &self.0.store {
            for pair in store.read(room).await?.chunks(2) {
                if let [instance, encoded] = pair
                    && *instance != self.0.instance
                {
                    add_encoded(&mut members, encoded);
                }
            }
        }
        if let Some(local) = self.0.rooms.lock().get(room) {
            add_local(&mut members, &local.users);
        }
        Ok(listed(&members))
    }

    /// A clean stop: this instance's members leave the fleet's presence at
    /// once (else within the timeout, as after a crash).
    pub async fn goodbye(&self) {
        // After the round in flight, if any; none after.
        let mut said_goodbye = self.0.said_goodbye.lock().await;
        *said_goodbye = true;
        if let Some(store) = &self.0.store
            && let Err(e) = store.goodbye(&self.0.instance).await
        {
            tracing::warn!(error = %crate::telemetry::error_chain(&e), "presence: the goodbye failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instances_members_round_trip() {
        let users: HashMap<Arc<str>, u32> = [(Arc::from("bob"), 1), (Arc::from("auth0|x"), 3)].into_iter().collect();
        let encoded = encode(&users);
        assert_eq!(encoded, "auth0|x 3 bob 1");
        let mut members = Members::new();
        add_encoded(&mut members, &encoded);
        add_encoded(&mut members, "bob 2 broken x");
        assert_eq!(
            listed(&members),
            vec![
                PresenceMember { user_id: "auth0|x".into(), connections: 3 },
                PresenceMember { user_id: "bob".into(), connections: 3 },
            ]
        );
        add_encoded(&mut members, "");
        assert_eq!(members.len(), 2);
    }
}
