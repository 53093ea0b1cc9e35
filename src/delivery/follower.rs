//! Followers: one task per stream an instance reads. A follower applies
//! every entry of its stream in order, and serves the joins of its shard's
//! rooms between two entries. An event is applied only once the control
//! stream is, up to the event's `after` mark (joins are served meanwhile).
//!
//! A shard is followed from the first join into one of its rooms (the
//! follower starts at the stream's head, and that join is served there:
//! replay, room, ack, then live events), and left once none of its rooms
//! has had a local socket for the linger time. The control stream is
//! followed for the instance's whole life.
//!
//! A stream's epoch is known from the first time its follower reaches it
//! (looking at a stream makes its epoch). A follower that reconnects (Redis
//! paused, restarted, or a connection broke) and finds the same epoch reads
//! on where it stopped; another epoch means Redis lost the stream.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::event_log::{Entry, EventLog, Head, LogError, LogReader, Offset, Position, Stream, mark};
use crate::rooms::Room;
use crate::telemetry::error_chain;

use super::Inner;
use super::joins::{Join, batch_of};

/// How long one read of the log waits for new entries.
const BLOCK: Duration = Duration::from_millis(1_000);
/// How often a follower looks after itself: the in-memory log's gauges,
/// its rooms (is any still in use?), the control stream's claim.
const TICK: Duration = Duration::from_secs(1);
/// The oldest listing of the rooms in use that a follower prunes with: a
/// listing is a pass over every local socket and its rooms, and a shard is
/// left at most this much later than its linger.
const LISTING_MAX_AGE: Duration = Duration::from_secs(5);
/// How often the control follower checks that the log's keys are still its own.
const CLAIM_EVERY: u32 = 10;
/// The longest pause between two attempts to reach the log.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How long a join with `since` waits for an unreachable log (a Redis
/// restart) before it is served without a replay (`recovered: false`).
const REPLAY_WAIT: Duration = Duration::from_secs(5);

/// What a follower reads, and what it does with it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Role {
    pub stream: Stream,
    /// Followed for the instance's life (else left when no room of it is in use).
    pub permanent: bool,
    /// Where it starts reading.
    pub from: ReadFrom,
}

/// Where a follower starts reading its stream.
#[derive(Debug, Clone, Copy)]
pub enum ReadFrom {
    /// Its start: the instance's own log.
    Start,
    /// Its head when first reached: a fleet's instance delivers what is
    /// published from then on (a shard followed from its first join).
    Head,
    /// Where it stood when the instance started (read then, before any
    /// socket connected), so that nothing logged since is missed however
    /// late the stream is first read: the control stream of a fleet. In
    /// another epoch (Redis lost the stream since), from that epoch's start.
    Mark(Offset),
}

/// A stream being followed.
pub(super) struct Following {
    pub joins: mpsc::UnboundedSender<Join>,
    /// Where the follower has applied the stream up to (its epoch and the
    /// last entry's position).
    pub applied: watch::Receiver<Offset>,
}

/// Nothing applied yet.
const NOTHING: Offset = Offset { epoch: 0, major: 0, minor: 0 };

impl Inner {
    /// Starts following `role.stream` (the caller holds the followers' lock).
    fn start(self: &Arc<Self>, role: Role) -> Following {
        self.start_with(role, watch::channel(NOTHING).0)
    }

    /// Starts following `role.stream`, saying where it has applied it up to
    /// on `applied_tx` (the caller holds the followers' lock).
    pub(super) fn start_with(self: &Arc<Self>, role: Role, applied_tx: watch::Sender<Offset>) -> Following {
        let (joins, join_rx) = mpsc::unbounded_channel();
        let applied = applied_tx.subscribe();
        if matches!(role.stream, Stream::Shard(_)) {
            self.metrics.fleet_shards_followed.inc();
        }
        tracing::debug!(stream = %role.stream, "event log: following");
        tokio::spawn(Follower::new(Arc::downgrade(self), self.log.clone(), role, join_rx, applied_tx).run());
        Following { joins, applied }
    }

    /// Hands a join to the follower of `stream`, starting it if needed.
    /// Under the followers' lock, so that a follower that stops sees every
    /// join sent to it. Gives the join back when the follower is gone.
    pub(super) fn send_join(self: &Arc<Self>, stream: Stream, join: Join) -> Result<(), Join> {
        let mut followers = self.followers();
        let following = followers
            .entry(stream)
            .or_insert_with(|| self.start(Role { stream, permanent: false, from: ReadFrom::Head }));
        following.joins.send(join).map_err(|e| e.0)
    }

    /// The names of the rooms that have a local socket, and when they were
    /// listed: one listing serves every follower. Listing goes over every
    /// socket, so it is taken at most every [`LISTING_MAX_AGE`] (sooner with
    /// a short linger).
    async fn rooms_in_use(&self) -> Option<(Instant, Arc<HashSet<String>>)> {
        let max_age = (self.linger / 2).min(LISTING_MAX_AGE);
        let fresh = |(at, _): &&(Instant, _)| at.elapsed() < max_age;
        if let Some(listing) = self.in_use.lock().as_ref().filter(fresh) {
            return Some(listing.clone());
        }
        let at = Instant::now();
        let listed = self.io.of("/")?.local().rooms().await.ok()?;
        let listing = (at, Arc::new(listed.into_iter().map(|r| r.into_owned()).collect()));
        *self.in_use.lock() = Some(listing.clone());
        Some(listing)
    }

    /// Forgets the `rooms` of a follower that have no local socket. A room
    /// joined after the listing was taken is kept: the listing cannot know it.
    async fn prune(&self, rooms: &mut RoomsServed) {
        if rooms.is_empty() {
            return;
        }
        if let Some((listed_at, in_use)) = self.rooms_in_use().await {
            rooms.retain(|room, joined_at| *joined_at >= listed_at || in_use.contains(room));
        }
    }

    /// Cuts the local sockets in `rooms` (names) so that they recover (see
    /// [`crate::session::Session::cut`]). Returns how many.
    fn cut_rooms(&self, rooms: &RoomsServed) -> usize {
        let Some(ns) = self.io.of("/") else { return 0 };
        if rooms.is_empty() {
            return 0;
        }
        ns.local()
            .to(rooms.keys().cloned().collect::<Vec<_>>())
            .sockets()
            .into_iter()
            .filter(|s| crate::session::Session::of(s).is_some_and(|session| session.cut(s, &self.transports)))
            .count()
    }

    /// Checks the log's claim on its keys; `/readyz` fails while another
    /// layout holds them.
    async fn check_claim(&self) {
        let problem = match self.log.claim().await {
            Ok(()) => None,
            Err(LogError::Claimed(why)) => Some(why),
            // Unreachable: said elsewhere; checked again later.
            Err(_) => return,
        };
        let mut held = self.claim_problem.lock();
        match (&*held, &problem) {
            (None, Some(why)) => tracing::error!(
                problem = %why,
                "event log: another layout writes this Redis prefix; this fleet is split, not ready until it stops"
            ),
            (Some(_), None) => tracing::info!("event log: the prefix is this layout's again"),
            _ => {}
        }
        *held = problem;
    }
}

/// What a read of the stream ended with.
enum ReadEnd {
    /// The instance, or this follower's part in it, is gone: stop.
    Stop,
    /// Reading failed: reach the stream again.
    Failed(LogError),
}

/// The one task that follows a stream: it applies every entry in the
/// stream's order and serves the joins of its rooms between two entries.
/// Being the only reader of its stream in this instance is what makes a
/// socket get each event once, and a replay's events before the live ones:
/// a join is served at one place in the stream (its replay up to there,
/// then the room, then its ack), and every later entry reaches the room
/// after it. Reconnects by itself; while the stream is unreachable, a join
/// with `since` waits for it (up to [`REPLAY_WAIT`]) so that it can be
/// replayed. After a new epoch (Redis lost the stream), or when it served
/// joins before it could ever read the stream, it cuts the sockets in its
/// rooms (they recover) and reads the new stream from its start.
struct Follower {
    inner: Weak<Inner>,
    log: Arc<dyn EventLog>,
    role: Role,
    joins: mpsc::UnboundedReceiver<Join>,
    /// Where it has applied the stream up to (for publishes and revocations that wait).
    applied: watch::Sender<Offset>,
    /// The stream's epoch, once reached.
    epoch: Option<u64>,
    /// The last entry applied.
    last: Position,
    /// Joins were served before the stream could be read: its head was not known.
    blind: bool,
    /// The rooms it joined sockets to (pruned every tick).
    rooms: RoomsServed,
    /// Since when none of its rooms has had a local socket.
    idle_since: Option<Instant>,
    /// Joins with `since` that wait for the stream to come back, and since when.
    held: Vec<(Instant, Join)>,
}

impl Follower {
    fn new(
        inner: Weak<Inner>,
        log: Arc<dyn EventLog>,
        role: Role,
        joins: mpsc::UnboundedReceiver<Join>,
        applied: watch::Sender<Offset>,
    ) -> Self {
        Follower {
            inner,
            log,
            role,
            joins,
            applied,
            epoch: None,
            last: Position::default(),
            blind: false,
            rooms: RoomsServed::new(),
            idle_since: None,
            held: Vec::new(),
        }
    }

    async fn run(mut self) {
        let stream = self.role.stream;
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.inner.strong_count() == 0 {
                return;
            }
            let reached = async { Ok::<_, LogError>((self.log.reader(stream).await?, self.log.head(stream).await?)) };
            let (reader, head) = match reached.await {
                Ok(reached) => reached,
                Err(e) => {
                    tracing::debug!(%stream, error = %error_chain(&e), "event log: unreachable; retrying");
                    if !self.while_unreachable().await {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let Some(strong) = self.inner.upgrade() else { return };
            self.reached(&strong, head).await;
            drop(strong);
            backoff = Duration::from_millis(50);
            match self.read(reader, head.epoch).await {
                ReadEnd::Stop => return,
                ReadEnd::Failed(error) => {
                    if !self.read_failed(error).await {
                        return;
                    }
                }
            }
        }
    }

    /// The stream cannot be reached: joins are served without a replay (the
    /// client refetches), one with `since` after waiting a while for the
    /// stream. False when the follower stops.
    async fn while_unreachable(&mut self) -> bool {
        let Some(strong) = self.inner.upgrade() else { return false };
        while let Ok(join) = self.joins.try_recv() {
            self.held.push((Instant::now(), join));
        }
        let (due, waiting) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(at, join)| join.since.is_none() || at.elapsed() >= REPLAY_WAIT);
        self.held = waiting;
        for (_, join) in due {
            self.blind |= self.epoch.is_none();
            let served = strong.serve_joins(self.role.stream, vec![join], None, self.last).await;
            self.rooms.extend(served_now(served));
        }
        strong.prune(&mut self.rooms).await;
        !(self.held.is_empty() && !self.role.permanent && self.may_stop(&strong).await)
    }

    /// The stream was reached (the first time, or again): where to read from.
    async fn reached(&mut self, strong: &Inner, head: Head) {
        let stream = self.role.stream;
        if stream == Stream::Control {
            strong.check_claim().await;
        }
        match self.epoch {
            None => {
                self.last = match self.role.from {
                    ReadFrom::Start => Position::default(),
                    ReadFrom::Head => head.last,
                    ReadFrom::Mark(mark) if mark.epoch == head.epoch => mark.position().min(head.last),
                    ReadFrom::Mark(_) => Position::default(),
                };
                self.applied.send_replace(mark(head.epoch, self.last));
                if std::mem::take(&mut self.blind) {
                    let cut = strong.cut_rooms(&self.rooms);
                    tracing::info!(%stream, sockets = cut, "event log: reached; sockets that joined before are cut to recover");
                }
            }
            // Reached again (Redis was paused, or a connection broke): read on.
            Some(known) if known == head.epoch => {}
            // The stream is new: entries appended just before the old one was
            // lost may never have been read, so every socket in its rooms may
            // have a gap.
            Some(_) => {
                let cut = strong.cut_rooms(&self.rooms);
                tracing::warn!(
                    %stream,
                    sockets = cut,
                    "event log: a new epoch (Redis lost the stream); reading it from the start, \
                     its rooms' sockets are cut to recover"
                );
                self.last = Position::default();
                self.applied.send_replace(mark(head.epoch, self.last));
            }
        }
        self.epoch = Some(head.epoch);
        if !self.held.is_empty() {
            let batch = self.held.drain(..).map(|(_, join)| join).collect();
            self.rooms.extend(served_now(strong.serve_joins(stream, batch, self.epoch, self.last).await));
        }
    }

    /// Reads the stream of `epoch` until reading fails or the follower stops,
    /// serving joins and looking after itself meanwhile.
    async fn read(&mut self, reader: Box<dyn LogReader>, epoch: u64) -> ReadEnd {
        let mut read = reader.read_after(epoch, self.last, BLOCK);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                (reader, result) = &mut read => {
                    let entries = match result {
                        Ok(entries) => entries,
                        Err(e) => return ReadEnd::Failed(e),
                    };
                    if !self.apply_all(entries, epoch).await {
                        return ReadEnd::Stop;
                    }
                    read = reader.read_after(epoch, self.last, BLOCK);
                }
                join = self.joins.recv() => {
                    let (Some(join), Some(strong)) = (join, self.inner.upgrade()) else { return ReadEnd::Stop };
                    let batch = batch_of(join, &mut self.joins);
                    self.rooms.extend(served_now(strong.serve_joins(self.role.stream, batch, self.epoch, self.last).await));
                }
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if !self.tick(ticks).await {
                        return ReadEnd::Stop;
                    }
                }
            }
        }
    }

    /// Applies what one read returned, in order. An event waits until this
    /// instance has applied the control stream up to its mark (a revocation
    /// logged before it). False when the follower stops.
    async fn apply_all(&mut self, entries: Vec<(Position, Entry)>, epoch: u64) -> bool {
        if let Some(strong) = self.inner.upgrade() {
            strong.metrics.fleet_entries_read.inc_by(entries.len() as u64);
        }
        for (position, entry) in entries {
            if let Entry::Event { after: Some(after), .. } = &entry
                && !self.control_reached(*after, epoch).await
            {
                return false;
            }
            let Some(strong) = self.inner.upgrade() else { return false };
            strong.apply(entry, self.role.stream).await;
            self.last = position;
        }
        self.applied.send_replace(mark(epoch, self.last));
        let Some(strong) = self.inner.upgrade() else { return false };
        strong.count();
        true
    }

    /// Waits until this instance has applied the control stream up to
    /// `after`, serving the joins that arrive meanwhile where the follower
    /// stands (the entry that waits comes after it). False when the
    /// instance is gone.
    async fn control_reached(&mut self, after: Offset, epoch: u64) -> bool {
        let Some(mut control) = self.inner.upgrade().map(|strong| strong.control.clone()) else { return false };
        if *control.borrow() >= after {
            return true;
        }
        self.applied.send_replace(mark(epoch, self.last));
        loop {
            tokio::select! {
                // Without its sender, the control follower (so the instance) is gone.
                reached = async { control.wait_for(|applied| *applied >= after).await.is_ok() } => return reached,
                join = self.joins.recv() => {
                    let (Some(join), Some(strong)) = (join, self.inner.upgrade()) else { return false };
                    let batch = batch_of(join, &mut self.joins);
                    let served = strong.serve_joins(self.role.stream, batch, Some(epoch), self.last).await;
                    self.rooms.extend(served_now(served));
                }
            }
        }
    }

    /// Looks after itself once a [`TICK`]: the in-memory log's gauges, the
    /// control stream's claim, its rooms (still in use?). False when it stops.
    async fn tick(&mut self, ticks: u32) -> bool {
        let Some(strong) = self.inner.upgrade() else { return false };
        strong.count();
        if self.role.stream == Stream::Control && ticks.is_multiple_of(CLAIM_EVERY) {
            strong.check_claim().await;
        }
        strong.prune(&mut self.rooms).await;
        self.role.permanent || !self.may_stop(&strong).await
    }

    /// Reading failed. Entries dropped before they were read are as a new
    /// stream: its sockets are cut, and it reads on from the stream's head.
    /// False when the instance is gone.
    async fn read_failed(&mut self, error: LogError) -> bool {
        let stream = self.role.stream;
        let Some(strong) = self.inner.upgrade() else { return false };
        if matches!(error, LogError::Gap) {
            let cut = strong.cut_rooms(&self.rooms);
            tracing::warn!(%stream, sockets = cut, "event log: entries were dropped unread; sockets are cut to recover");
            if let Ok(head) = self.log.head(stream).await {
                self.last = head.last;
                self.applied.send_replace(mark(head.epoch, self.last));
            }
            return true;
        }
        strong.metrics.log_errors.inc();
        tracing::warn!(%stream, error = %error_chain(&error), "event log: reading failed; reconnecting");
        true
    }

    /// Whether it stops: none of its rooms has had a local socket for the
    /// linger time, and no join waits. Then it is no longer a follower of
    /// the instance (under the followers' lock, so that no join is lost).
    async fn may_stop(&mut self, strong: &Inner) -> bool {
        if !self.rooms.is_empty() || !self.joins.is_empty() {
            self.idle_since = None;
            return false;
        }
        if self.idle_since.get_or_insert_with(Instant::now).elapsed() < strong.linger {
            return false;
        }
        let mut followers = strong.followers();
        // A join sent since is served first.
        if !self.joins.is_empty() {
            return false;
        }
        let stream = self.role.stream;
        followers.remove(&stream);
        strong.metrics.fleet_shards_followed.dec();
        tracing::debug!(%stream, "event log: no local socket needs this shard any more; left");
        true
    }
}

/// The rooms a follower joined sockets to, by name, with when it last did.
type RoomsServed = HashMap<String, Instant>;

fn served_now(rooms: Vec<Room>) -> impl Iterator<Item = (String, Instant)> {
    let now = Instant::now();
    rooms.into_iter().map(move |room| (room.to_string(), now))
}

impl Inner {
    /// Applies one entry of `stream`.
    async fn apply(&self, entry: Entry, stream: Stream) {
        match entry {
            Entry::Event { logged, .. } => self.deliver(&logged).await,
            Entry::Revocation(json) if stream == Stream::Control => self.revocations.apply(json).await,
            // Written to a shard by the first layout of the log: never applied from there.
            Entry::Revocation(_) => {}
            Entry::Unreadable => tracing::warn!("event log: an entry herald cannot read; skipped"),
        }
    }
}
