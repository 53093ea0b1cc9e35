//! Joins: a socket enters a room between two entries of its shard, after a
//! replay of what it missed, and is acked before any later event.

use std::sync::Arc;

use serde_json::value::RawValue;
use socketioxide::extract::SocketRef;
use tokio::sync::{mpsc, oneshot};

use crate::auth::User;
use crate::event_log::{Logged, Offset, Position, Stream};
use crate::rooms::Room;
use crate::session::{JoinRefused, Session, Ticket};

use super::Inner;

/// How many waiting joins a follower serves at once (a reconnect storm
/// sends many at once; their replays share one read of the log).
const MAX_JOIN_BATCH: usize = 1024;

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
pub struct Joined(Arc<parking_lot::Mutex<Option<JoinedFn>>>);

type JoinedFn = Box<dyn FnOnce(JoinResult) + Send>;

impl Joined {
    pub fn new(f: impl FnOnce(JoinResult) + Send + 'static) -> Self {
        Joined(Arc::new(parking_lot::Mutex::new(Some(Box::new(f)))))
    }

    /// Runs it with how the join ended, unless it already ran.
    pub fn fire(&self, result: JoinResult) {
        let f = self.0.lock().take();
        if let Some(f) = f {
            f(result);
        }
    }
}

/// A join, served by the follower of its room's shard.
pub(super) struct Join {
    pub socket: SocketRef,
    pub room: Room,
    pub since: Option<Offset>,
    pub ticket: Ticket,
    pub joined: Joined,
    pub reply: oneshot::Sender<JoinResult>,
}

/// Takes the waiting joins (the one given, and those queued behind it).
pub(super) fn batch_of(first: Join, joins: &mut mpsc::UnboundedReceiver<Join>) -> Vec<Join> {
    let mut batch = vec![first];
    while batch.len() < MAX_JOIN_BATCH {
        match joins.try_recv() {
            Ok(join) => batch.push(join),
            Err(_) => break,
        }
    }
    batch
}

impl Inner {
    /// Sends a replay (the room's events after `since`) to one socket and
    /// joins it to the room. When the socket cannot take every event, it is
    /// cut (it comes back and asks again) rather than left with a gap.
    fn replay_to(
        &self,
        join: &Join,
        session: &Session,
        since: Offset,
        head: Option<Offset>,
        events: &[Logged],
    ) -> Result<bool, JoinRefused> {
        // An addressed event is replayed only to its audience's sockets.
        let user = join.socket.extensions.get::<User>().map(|user| user.id);
        let for_user = |l: &Logged| l.audience.is_none() || user.as_deref().is_some_and(|u| l.is_for(u));
        let events: Vec<Logged> =
            events.iter().filter(|l| l.offset > since && l.targets(&join.room) && for_user(l)).cloned().collect();
        let missed = session.missed(&events, &join.room);
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

    /// Serves a batch of joins between two entries of `stream`, at `last` of
    /// `epoch` (`None`: the stream cannot be read now): the replays share one
    /// read of the log. Returns the rooms that sockets joined.
    pub(super) async fn serve_joins(
        &self,
        stream: Stream,
        batch: Vec<Join>,
        epoch: Option<u64>,
        last: Position,
    ) -> Vec<Room> {
        let head = epoch.and_then(|e| Offset::at(e, last));
        let servable = |since: &Offset| epoch == Some(since.epoch) && since.position() <= last;
        let from = batch.iter().filter_map(|j| j.since).filter(servable).min();
        let mut shared = match (epoch, from) {
            (Some(epoch), Some(from)) => self.log.events_between(stream, epoch, from, last).await.ok().flatten(),
            _ => None,
        };
        let mut rooms = Vec::new();
        for join in batch {
            let result = match Session::of(&join.socket) {
                None => Err(JoinRefused::Closed),
                Some(session) => match join.since {
                    None => session.join(&join.socket, &join.room, &join.ticket, head).map(|()| None),
                    Some(since) if servable(&since) => {
                        // The shared read starts before this `since`; if it failed (trimmed), ask for this one.
                        let events = match (&shared, epoch) {
                            (Some(events), _) => Some(events.clone()),
                            (None, Some(epoch)) => {
                                self.log.events_between(stream, epoch, since, last).await.ok().flatten()
                            }
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
            if result.is_ok() {
                rooms.push(join.room.clone());
            }
            // Before the follower delivers the next entry.
            join.joined.fire(result);
            let _ = join.reply.send(result);
        }
        rooms
    }
}
