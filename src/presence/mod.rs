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
//! An ack and the differences sent after it are made under one lock, from
//! one state (what the room's sockets were last told), so a client that
//! applies them in order has the members as of the latest round.

pub mod api;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::Notify;
use ts_rs::TS;

use crate::redis_conn::{Redis, RedisError};
use crate::rooms::Room;
use crate::session::Session;
use crate::transport::Transports;

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

/// Users and their connection counts.
type Members = BTreeMap<Arc<str>, u32>;

/// How often presence makes a round, and after how long without a round an
/// instance's members are dropped (it is taken for dead).
#[derive(Debug, Clone, Copy)]
pub struct PresenceSettings {
    pub interval: Duration,
    pub timeout: Duration,
}

/// One room's presence on this instance.
struct LocalRoom {
    /// This instance's presence sockets in the room, per user.
    users: HashMap<Arc<str>, u32>,
    /// What this instance's presence sockets in the room were last told.
    sent: Members,
    /// The users told of but missing from the latest rounds, since when.
    missing: HashMap<Arc<str>, Instant>,
}

impl LocalRoom {
    fn told(sent: Members) -> LocalRoom {
        LocalRoom { users: HashMap::new(), sent, missing: HashMap::new() }
    }
}

struct Inner {
    /// This instance's name among the fleet's (random, per process).
    instance: String,
    store: Option<RedisPresence>,
    settings: PresenceSettings,
    io: SocketIo,
    transports: Arc<Transports>,
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
        transports: Arc<Transports>,
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
            transports,
            rooms: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            said_goodbye: tokio::sync::Mutex::new(false),
        });
        tokio::spawn(tick_forever(Arc::downgrade(&inner)));
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
    pub(crate) fn enter(
        &self,
        socket: &SocketRef,
        room: &Room,
        user: &Arc<str>,
        ack: impl FnOnce(Vec<PresenceMember>),
    ) {
        let mut rooms = self.0.rooms.lock();
        let local = rooms.entry(room.clone()).or_insert_with(|| LocalRoom::told(Members::new()));
        *local.users.entry(user.clone()).or_default() += 1;
        socket.join(presence_room(room));
        ack(listed(&local.sent));
    }

    /// The members `room`'s presence sockets here were last told, for an
    /// ack (the socket already a member).
    pub(crate) fn told(&self, room: &Room, ack: impl FnOnce(Vec<PresenceMember>)) {
        let rooms = self.0.rooms.lock();
        ack(rooms.get(room).map(|local| listed(&local.sent)).unwrap_or_default());
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

/// Makes a round every interval (or when woken), until presence is dropped.
async fn tick_forever(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let interval = strong.settings.interval;
        {
            let said_goodbye = strong.said_goodbye.lock().await;
            if *said_goodbye {
                return;
            }
            strong.round().await;
        }
        let wake = async { strong.wake.notified().await };
        let _ = tokio::time::timeout(interval, wake).await;
    }
}

impl Inner {
    /// One round: writes and reads the fleet's members (in a fleet), then
    /// tells each room's presence sockets what changed.
    async fn round(&self) {
        let (writes, names): (Vec<(Room, String)>, Vec<Room>) = {
            let rooms = self.rooms.lock();
            let writes = rooms.iter().map(|(room, local)| (room.clone(), encode(&local.users))).collect();
            (writes, rooms.keys().cloned().collect())
        };
        let (grace, others) = match &self.store {
            None => (false, vec![Vec::new(); names.len()]),
            Some(store) => match store.tick(&self.instance, &writes, &names).await {
                Ok(read) if read.rooms.len() == names.len() => (read.grace, read.rooms),
                Ok(_) => {
                    tracing::warn!("presence: a round's reply does not match its rooms");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::error_chain(&e), "presence: a round failed");
                    return;
                }
            },
        };
        // After shutdown the namespace is gone: nobody to tell.
        if self.io.of("/").is_none() {
            return;
        }
        let mut to_cut = Vec::new();
        let revoked = {
            let mut revoked = self.revoked.lock();
            revoked.retain(|_, at| at.elapsed() < self.settings.timeout);
            revoked.clone()
        };
        {
            let mut rooms = self.rooms.lock();
            for ((room, _), fields) in writes.iter().zip(others) {
                let Some(local) = rooms.get_mut(room) else { continue };
                let mut now = Members::new();
                for pair in fields.chunks(2) {
                    if let [_, encoded] = pair {
                        add_encoded(&mut now, encoded);
                    }
                }
                add_local(&mut now, &local.users);
                let mut messages: Vec<(&'static str, serde_json::Value)> = Vec::new();
                for (user, n) in &now {
                    if !local.sent.contains_key(user) {
                        let joined =
                            PresenceJoined { room: room.to_string(), user_id: user.to_string(), connections: *n };
                        messages.extend(serde_json::to_value(joined).ok().map(|v| ("presence_joined", v)));
                    }
                }
                local.missing.retain(|user, _| !now.contains_key(user));
                for (user, n) in &local.sent {
                    if now.contains_key(user) {
                        continue;
                    }
                    let since = *local.missing.entry(user.clone()).or_insert_with(Instant::now);
                    let revoked = revoked.contains_key(user);
                    // Redis is being rebuilt, or the user may be reconnecting: not gone yet.
                    if grace || (!revoked && since.elapsed() < self.settings.timeout) {
                        now.insert(user.clone(), *n);
                        continue;
                    }
                    local.missing.remove(user);
                    let left = PresenceLeft { room: room.to_string(), user_id: user.to_string() };
                    messages.extend(serde_json::to_value(left).ok().map(|v| ("presence_left", v)));
                }
                local.sent = now;
                if let (false, Some(ns)) = (messages.is_empty(), self.io.of("/")) {
                    for socket in ns.local().to(presence_room(room)).sockets() {
                        for (name, message) in &messages {
                            match socket.emit(*name, message) {
                                Ok(()) => {}
                                Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                                    to_cut.push(socket.clone());
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                }
            }
            // A room with no presence socket here, written empty this round
            // (so none of this instance's members stays in Redis): forgotten.
            let written_empty: std::collections::HashSet<&Room> =
                writes.iter().filter(|(_, encoded)| encoded.is_empty()).map(|(room, _)| room).collect();
            rooms.retain(|room, local| !local.users.is_empty() || !written_empty.contains(room));
        }
        // A socket that cannot take what it was told is cut, and comes back
        // to a fresh ack (after the lock: cutting takes its session's).
        for socket in to_cut {
            if let Some(session) = Session::of(&socket) {
                session.cut(&socket, &self.transports);
            }
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
