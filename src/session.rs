//! A socket's own state, and the one place its subscription rooms change.
//!
//! Every join and leave of a subscription room goes through the socket's
//! [`Session`], under one lock, and moves the `herald_subscriptions` gauge
//! with it. The session keeps its own list of the rooms it joined (not the
//! adapter's, which socketioxide may clear first when a socket closes twice),
//! so the gauge is the sum of what every socket is in, whichever path (a
//! subscribe, a replay, a revocation, a cut, a disconnect) changed it. A
//! session that was cut (to recover) or is gone takes no new room, the
//! subscription cap is checked at the join itself (concurrent subscribes
//! cannot pass it together), and a subscribe whose membership was checked
//! before a revocation of its campaign is refused at the join, so that no
//! socket is in a room its user lost.
//!
//! A room joined with presence counts the socket's user in the room's
//! presence ([`crate::presence`]) until the socket leaves it, whichever path.
//!
//! The session id is a credential (with it, anyone can take over a polling
//! session), so it is never logged: a per-process socket number is.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use socketioxide::SocketError;
use socketioxide::extract::SocketRef;

use crate::event_log::{Logged, Offset};
use crate::expiry::TimerId;
use crate::presence::{Presence, PresenceAck};
use crate::rate::TokenBucket;
use crate::rooms::{CampaignId, Room};
use crate::telemetry::Metrics;
use crate::transport::Transports;

/// How many campaign revocations a session remembers for racing subscribes.
/// Past that, a subscribe checked before the oldest one is refused anyway.
const REMEMBERED_REVOCATIONS: usize = 16;

static SOCKET_NUMBERS: AtomicU64 = AtomicU64::new(1);

/// A socket's state, kept in its extensions (one allocation per socket).
#[derive(Clone)]
pub struct Session(Arc<SessionState>);

pub struct SessionState {
    /// This socket's number in this process, for logs.
    pub number: u64,
    /// When the socket is cut (its token's `exp` plus the leeway), in seconds since the epoch.
    pub deadline: AtomicU64,
    /// Its entry in the gateway's token expiry timer.
    pub timer: TimerId,
    pub bucket: Mutex<TokenBucket>,
    /// Set once the connect handler has run (see the gateway's ready gate).
    pub ready: AtomicBool,
    /// Set once the socket is gone and its state released (see [`Session::release`]).
    released: AtomicBool,
    /// Its user.
    pub user: Arc<str>,
    /// The presence its rooms' members are counted in.
    presence: Presence,
    /// Most subscription rooms it may be in.
    max_rooms: usize,
    rooms: Mutex<Rooms>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Rooms {
    /// No room may be joined any more: the socket was cut to recover, or is gone.
    closed: bool,
    /// How many campaign revocations were applied to this socket.
    revocations: u64,
    /// The latest ones: (number, campaign).
    revoked: VecDeque<(u64, CampaignId)>,
    /// The subscription rooms the socket is in.
    joined: HashMap<Room, InRoom>,
}

/// What a session knows of a room it is in.
struct InRoom {
    /// The campaign the membership check said the room belongs to (a
    /// revocation of it takes the socket out).
    campaign: CampaignId,
    /// The offset after which the socket has every event of the room (from a
    /// replay), if known. A replay for another room skips what the socket
    /// already got through one of these, so overlapping rooms never deliver
    /// an event twice.
    covered_from: Option<Offset>,
    /// Whether the socket is a member of the room's presence.
    presence: bool,
}

impl std::ops::Deref for Session {
    type Target = SessionState;
    fn deref(&self) -> &SessionState {
        &self.0
    }
}

/// Leave to join a room: the membership check that allowed it, and when.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The campaign the room belongs to.
    pub campaign: CampaignId,
    /// The session's revocation count before the check.
    revocations: u64,
}

/// Why a join did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefused {
    /// The socket is cut or gone.
    Closed,
    /// Its campaign was revoked for this user after the membership check.
    Revoked,
    /// The socket is in as many rooms as it may be.
    TooManyRooms,
}

impl Session {
    /// A new session for a socket of `user` whose token lets it live until
    /// `deadline`, in at most `max_rooms` subscription rooms, counted in
    /// `presence` where it asks to be.
    pub fn new(
        user: Arc<str>,
        deadline: u64,
        timer: TimerId,
        bucket: TokenBucket,
        max_rooms: usize,
        presence: Presence,
        metrics: Arc<Metrics>,
    ) -> Session {
        Session(Arc::new(SessionState {
            number: SOCKET_NUMBERS.fetch_add(1, Ordering::Relaxed),
            deadline: AtomicU64::new(deadline),
            timer,
            bucket: Mutex::new(bucket),
            ready: AtomicBool::new(false),
            released: AtomicBool::new(false),
            user,
            presence,
            max_rooms,
            rooms: Mutex::new(Rooms::default()),
            metrics,
        }))
    }

    /// Marks the socket gone; true only the first time, for whoever must
    /// release what it held (its connection count, its timer, its rooms).
    pub fn release(&self) -> bool {
        !self.released.swap(true, Ordering::SeqCst)
    }

    /// Whether the socket is gone and its state released.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// The session of `socket` (every authenticated socket has one).
    pub fn of(socket: &SocketRef) -> Option<Session> {
        socket.extensions.get::<Session>()
    }

    fn rooms(&self) -> MutexGuard<'_, Rooms> {
        self.0.rooms.lock()
    }

    fn gauge(&self, room: &Room, delta: i64) {
        self.metrics.subscriptions.get_or_create(&[("kind", room.kind().as_str())]).inc_by(delta);
    }

    /// Starts a membership check for a room of `campaign`: the ticket is
    /// refused at the join if the campaign is revoked for this socket meanwhile.
    pub fn ticket(&self, campaign: CampaignId, before_check: u64) -> Ticket {
        Ticket { campaign, revocations: before_check }
    }

    /// The revocation count, read before a membership check.
    pub fn revocations(&self) -> u64 {
        self.rooms().revocations
    }

    /// Joins `room`, recording that the socket has every event of it after
    /// `covered_from` (`None`: from now on). Refused when the socket is cut
    /// or gone (socketioxide may have removed it already), when the room's
    /// campaign was revoked since the membership check, and when the socket
    /// is in as many rooms as it may be.
    pub fn join(
        &self,
        socket: &SocketRef,
        room: &Room,
        ticket: &Ticket,
        covered_from: Option<Offset>,
    ) -> Result<(), JoinRefused> {
        let mut rooms = self.rooms();
        if rooms.closed || !socket.connected() {
            return Err(JoinRefused::Closed);
        }
        let oldest = rooms.revocations - rooms.revoked.len() as u64;
        let revoked_since = rooms.revoked.iter().any(|(n, c)| *n > ticket.revocations && *c == ticket.campaign);
        if revoked_since || ticket.revocations < oldest {
            return Err(JoinRefused::Revoked);
        }
        let fresh = !rooms.joined.contains_key(room);
        if fresh && rooms.joined.len() >= self.max_rooms {
            return Err(JoinRefused::TooManyRooms);
        }
        let presence = rooms.joined.get(room).is_some_and(|r| r.presence);
        rooms.joined.insert(room.clone(), InRoom { campaign: ticket.campaign.clone(), covered_from, presence });
        if fresh {
            socket.join(room.to_string());
            self.gauge(room, 1);
        }
        Ok(())
    }

    /// Leaves `room`; whether the socket was in it.
    pub fn leave(&self, socket: &SocketRef, room: &Room) -> bool {
        let mut rooms = self.rooms();
        self.leave_locked(&mut rooms, socket, room)
    }

    fn leave_locked(&self, rooms: &mut Rooms, socket: &SocketRef, room: &Room) -> bool {
        let Some(left) = rooms.joined.remove(room) else { return false };
        socket.leave(room.to_string());
        self.gauge(room, -1);
        if left.presence {
            self.presence.exit(socket, room, &self.user);
        }
        true
    }

    /// Makes the socket a member of `room`'s presence (it is in the room),
    /// and gives `ack` the members (see [`Presence::enter`]); false, and no
    /// ack, when the socket is not in the room (any more).
    pub fn enter_presence(&self, socket: &SocketRef, room: &Room, ack: impl FnOnce(PresenceAck)) -> bool {
        let mut rooms = self.rooms();
        let Some(in_room) = rooms.joined.get_mut(room) else { return false };
        if in_room.presence {
            self.presence.told(room, ack);
        } else {
            in_room.presence = true;
            self.presence.enter(socket, room, &self.user, ack);
        }
        true
    }

    /// Notes that `campaign` was revoked for this socket: a subscribe to one
    /// of its rooms whose membership was checked before now will be refused.
    pub fn note_revocation(&self, campaign: &CampaignId) {
        let mut rooms = self.rooms();
        rooms.revocations += 1;
        let n = rooms.revocations;
        rooms.revoked.push_back((n, campaign.clone()));
        if rooms.revoked.len() > REMEMBERED_REVOCATIONS {
            rooms.revoked.pop_front();
        }
    }

    /// Leaves every room of `campaign` (as the membership checks found it);
    /// how many.
    pub fn leave_campaign(&self, socket: &SocketRef, campaign: &CampaignId) -> usize {
        let mut rooms = self.rooms();
        let of_campaign: Vec<Room> =
            rooms.joined.iter().filter(|(_, r)| r.campaign == *campaign).map(|(room, _)| room.clone()).collect();
        let left = of_campaign.iter().filter(|room| self.leave_locked(&mut rooms, socket, room)).count();
        if left > 0 {
            // The others learn at once that its user is gone.
            self.presence.hurry();
        }
        left
    }

    /// The subscription rooms the socket is in.
    pub fn subscriptions(&self) -> Vec<Room> {
        self.rooms().joined.keys().cloned().collect()
    }

    /// Whether the socket is in one of `rooms`.
    pub fn in_any(&self, rooms: &[Room]) -> bool {
        let joined = &self.rooms().joined;
        rooms.iter().any(|room| joined.contains_key(room))
    }

    /// Whether the socket is in `room`, and in how many rooms it is.
    pub fn subscribed(&self, room: &Room) -> (bool, usize) {
        let rooms = self.rooms();
        (rooms.joined.contains_key(room), rooms.joined.len())
    }

    /// Leaves every subscription room and takes no new one; false when that
    /// was already done.
    pub fn close(&self, socket: &SocketRef) -> bool {
        let mut rooms = self.rooms();
        if rooms.closed {
            return false;
        }
        rooms.closed = true;
        for (room, left) in std::mem::take(&mut rooms.joined) {
            socket.leave(room.to_string());
            self.gauge(&room, -1);
            if left.presence {
                self.presence.exit(socket, &room, &self.user);
            }
        }
        true
    }

    /// Ends a socket for good (a user revocation, repeated rate-limit abuse)
    /// with a DISCONNECT packet, which the stock client takes as final. When
    /// its buffer is full that packet cannot be queued, and socketioxide then
    /// leaves the socket open: its transport is cut instead, so the
    /// connection ends either way. False when it was already closed or cut.
    pub fn end(&self, socket: &SocketRef, transports: &Arc<Transports>) -> bool {
        if !self.close(socket) {
            return false;
        }
        self.presence.hurry();
        if let Err(SocketError::InternalChannelFull) = socket.clone().disconnect() {
            transports.close_transport(socket);
        }
        true
    }

    /// Cuts a socket that must come back and recover: it leaves every room at
    /// once (what it received stays a prefix of the log) and its transport is
    /// ended, not its Socket.IO session, so the stock client reconnects by
    /// itself and re-subscribes with `since`. False when it was already cut.
    pub fn cut(&self, socket: &SocketRef, transports: &Arc<Transports>) -> bool {
        if !self.close(socket) {
            return false;
        }
        transports.close_transport(socket);
        true
    }

    /// The events of a replay for `room` that the socket did not already get
    /// through another room it is in (overlapping rooms never deliver an
    /// event twice).
    pub fn missed<'a>(&self, events: &'a [Logged], room: &Room) -> Vec<&'a Logged> {
        let rooms = self.rooms();
        let already_sent = |logged: &Logged| {
            logged.rooms.iter().filter(|r| *r != room).any(|other| {
                rooms.joined.get(other).is_some_and(|r| r.covered_from.is_some_and(|from| logged.offset > from))
            })
        };
        events.iter().filter(|logged| !already_sent(logged)).collect()
    }
}
