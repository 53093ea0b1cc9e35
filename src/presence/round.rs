//! A presence round: this instance's members written, the others' read (in
//! a fleet), and each room's listeners told the difference (or, in a big
//! room, the count), under the lock acks take.

use std::time::Instant;

use socketioxide::{SendError, SocketError};

use crate::rooms::Room;

use super::{
    COUNT_EVERY, Inner, Members, PresenceCount, PresenceJoined, PresenceLeft, add_encoded, add_local, encode,
    presence_room,
};

/// Makes a round every interval (or when woken), until presence is dropped.
pub(super) async fn tick_forever(inner: std::sync::Weak<Inner>) {
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
                // A big room: counts only, at most one a second.
                if local.counts_only || now.len() > self.settings.max_members {
                    local.counts_only = true;
                    messages.clear();
                    let count = now.len();
                    let due = local.told_count.is_none_or(|(told, at)| told != count && at.elapsed() >= COUNT_EVERY);
                    if due {
                        local.told_count = Some((count, Instant::now()));
                        let message = PresenceCount { room: room.to_string(), count };
                        messages.extend(serde_json::to_value(message).ok().map(|v| ("presence_count", v)));
                    }
                }
                local.sent = now;
                if let (false, Some(ns)) = (messages.is_empty(), self.io.of("/")) {
                    for socket in ns.local().to(presence_room(room)).sockets() {
                        for (name, message) in &messages {
                            match socket.emit(*name, message) {
                                Ok(()) => {
                                    self.metrics.presence_messages.get_or_create(&[("event", name)]).inc();
                                }
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
            self.metrics.presence_rooms.set(rooms.len() as i64);
        }
        // A socket that cannot take what it was told is cut, and comes back
        // to a fresh ack (after the lock: cutting takes its session's).
        for socket in to_cut {
            (self.cut)(&socket);
        }
    }
}
