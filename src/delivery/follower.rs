//! Followers: one task per stream an instance reads. A follower applies
//! every entry of its stream in order, and serves the joins of its shard's
//! rooms between two entries.
//!
//! A shard is followed from the first join into one of its rooms (the
//! follower starts at the stream's head, and that join is served there:
//! replay, room, ack, then live events), and left once none of its rooms
//! has had a local socket for the linger time. The in-memory log's one shard
//! and the control stream are followed for the instance's whole life.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use socketioxide::adapter::Adapter;
use tokio::sync::{mpsc, watch};

use crate::log::{Entry, EventLog, LogError, Position, Stream};
use crate::rooms::Room;
use crate::telemetry::error_chain;

use super::joins::{Join, batch_of};
use super::{Inner, Part};

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
    /// Read from the stream's start (the instance's own log), else from its
    /// head (a fleet's instance delivers what is published from now on).
    pub from_start: bool,
    /// Which part of a revocation it applies.
    pub part: Part,
}

/// A stream being followed.
pub(super) struct Following<A: Adapter> {
    pub joins: mpsc::UnboundedSender<Join<A>>,
    /// The position of the last entry the follower applied.
    pub applied: watch::Receiver<Position>,
}

impl<A: Adapter> Inner<A> {
    /// Starts following `role.stream` (the caller holds the followers' lock).
    pub(super) fn start(self: &Arc<Self>, role: Role) -> Following<A> {
        let (joins, join_rx) = mpsc::unbounded_channel();
        let (applied_tx, applied) = watch::channel(Position::default());
        if matches!(role.stream, Stream::Shard(_)) {
            self.metrics.fleet_shards_followed.inc();
        }
        tracing::debug!(stream = %role.stream, "event log: following");
        tokio::spawn(follow(Arc::downgrade(self), self.log.clone(), role, join_rx, applied_tx));
        Following { joins, applied }
    }

    /// Hands a join to the follower of `stream`, starting it if needed.
    /// Under the followers' lock, so that a follower that stops sees every
    /// join sent to it. Gives the join back when the follower is gone.
    pub(super) fn send_join(self: &Arc<Self>, stream: Stream, join: Join<A>) -> Result<(), Join<A>> {
        let mut followers = self.followers();
        let following = followers
            .entry(stream)
            .or_insert_with(|| self.start(Role { stream, permanent: false, from_start: false, part: Part::Rooms }));
        following.joins.send(join).map_err(|e| e.0)
    }

    /// The names of the rooms that have a local socket, and when they were
    /// listed: one listing serves every follower. Listing goes over every
    /// socket, so it is taken at most every [`LISTING_MAX_AGE`] (sooner with
    /// a short linger).
    async fn rooms_in_use(&self) -> Option<(Instant, Arc<HashSet<String>>)> {
        let max_age = (self.linger / 2).min(LISTING_MAX_AGE);
        let fresh = |(at, _): &&(Instant, _)| at.elapsed() < max_age;
        if let Some(listing) = self.in_use.lock().unwrap_or_else(|e| e.into_inner()).as_ref().filter(fresh) {
            return Some(listing.clone());
        }
        let at = Instant::now();
        let listed = self.io.of("/")?.local().rooms().await.ok()?;
        let listing = (at, Arc::new(listed.into_iter().map(|r| r.into_owned()).collect()));
        *self.in_use.lock().unwrap_or_else(|e| e.into_inner()) = Some(listing.clone());
        Some(listing)
    }

    /// Forgets the `rooms` of a follower that have no local socket. A room
    /// joined after the listing was taken is kept: the listing cannot know it.
    async fn prune(&self, rooms: &mut Joined) {
        if rooms.is_empty() {
            return;
        }
        if let Some((listed_at, in_use)) = self.rooms_in_use().await {
            rooms.retain(|room, joined_at| *joined_at >= listed_at || in_use.contains(room));
        }
    }

    /// Whether the follower of `stream` stops: none of its `rooms` has had
    /// a local socket for the linger time, and no join waits.
    async fn may_stop(
        &self,
        stream: Stream,
        rooms: &Joined,
        idle_since: &mut Option<Instant>,
        joins: &mpsc::UnboundedReceiver<Join<A>>,
    ) -> bool {
        if !rooms.is_empty() || !joins.is_empty() {
            *idle_since = None;
            return false;
        }
        if idle_since.get_or_insert_with(Instant::now).elapsed() < self.linger {
            return false;
        }
        let mut followers = self.followers();
        // A join sent since is served first.
        if !joins.is_empty() {
            return false;
        }
        followers.remove(&stream);
        self.metrics.fleet_shards_followed.dec();
        tracing::debug!(%stream, "event log: no local socket needs this shard any more; left");
        true
    }

    /// Cuts the local sockets in `rooms` (names) so that they recover (see
    /// [`crate::session::Session::cut`]). Returns how many.
    fn cut_rooms(&self, rooms: &Joined) -> usize {
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
        let mut held = self.claim_problem.lock().unwrap_or_else(|e| e.into_inner());
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

/// Follows one stream: applies every entry, in order, and serves the joins
/// of its rooms between entries. Reconnects by itself; while the log is
/// unreachable, a join with `since` waits for it (up to [`REPLAY_WAIT`]) so
/// that it can be replayed. After a new epoch (Redis lost the stream), or
/// when it served joins before it could ever read the stream, it cuts the
/// sockets in its rooms (they recover) and reads the new stream from its
/// start.
async fn follow<A: Adapter>(
    inner: Weak<Inner<A>>,
    log: Arc<dyn EventLog>,
    role: Role,
    mut joins: mpsc::UnboundedReceiver<Join<A>>,
    applied: watch::Sender<Position>,
) {
    let stream = role.stream;
    let mut epoch: Option<u64> = None;
    let mut last = Position::default();
    let mut started = false;
    // Joins were served before the stream could be read: its head was not known.
    let mut blind = false;
    // The rooms it joined sockets to (pruned every tick).
    let mut rooms = Joined::new();
    let mut idle_since: Option<Instant> = None;
    // Joins with `since` that wait for the log to come back, and since when.
    let mut held: Vec<(Instant, Join<A>)> = Vec::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let reached = async { Ok::<_, LogError>((log.reader(stream).await?, log.head(stream).await?)) }.await;
        let (reader, head) = match reached {
            Ok(reached) => reached,
            Err(e) => {
                tracing::debug!(%stream, error = %e, "event log: unreachable; retrying");
                // Meanwhile, joins are served without a replay (the client
                // refetches); one with `since` first waits a while for the log.
                while let Ok(join) = joins.try_recv() {
                    held.push((Instant::now(), join));
                }
                let (due, waiting) =
                    held.into_iter().partition(|(at, join)| join.since.is_none() || at.elapsed() >= REPLAY_WAIT);
                held = waiting;
                for (_, join) in due {
                    blind |= !started;
                    rooms.extend(joined(strong.serve_joins(stream, vec![join], None, last).await));
                }
                strong.prune(&mut rooms).await;
                if held.is_empty() && !role.permanent && strong.may_stop(stream, &rooms, &mut idle_since, &joins).await
                {
                    return;
                }
                drop(strong);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if stream == Stream::Control {
            strong.check_claim().await;
        }
        match (started, epoch, head.epoch) {
            (false, _, _) => {
                (started, epoch) = (true, head.epoch);
                last = if role.from_start { Position::default() } else { head.last };
                applied.send_replace(last);
                if std::mem::take(&mut blind) {
                    let cut = strong.cut_rooms(&rooms);
                    tracing::info!(%stream, sockets = cut, "event log: reached; sockets that joined before are cut to recover");
                }
            }
            (true, Some(old), Some(new)) if old == new => {}
            // The stream is new: entries appended just before the old one was
            // lost may never have been read, so every socket in its rooms may
            // have a gap.
            (true, _, _) => {
                let cut = strong.cut_rooms(&rooms);
                tracing::warn!(
                    %stream,
                    sockets = cut,
                    "event log: a new epoch (Redis lost the stream); reading it from the start, \
                     its rooms' sockets are cut to recover"
                );
                // Without an epoch, what the stream holds (if anything) is
                // from the lost epoch: the next append starts a new stream.
                (epoch, last) = (head.epoch, if head.epoch.is_some() { Position::default() } else { head.last });
            }
        }
        if !held.is_empty() {
            let batch = held.drain(..).map(|(_, join)| join).collect();
            rooms.extend(joined(strong.serve_joins(stream, batch, epoch, last).await));
        }
        drop(strong);
        backoff = Duration::from_millis(50);

        let mut read = reader.read_after(epoch.unwrap_or_default(), last, BLOCK);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        let error = loop {
            tokio::select! {
                (reader, result) = &mut read => {
                    let entries = match result {
                        Ok(entries) => entries,
                        Err(e) => break e,
                    };
                    let Some(strong) = inner.upgrade() else { return };
                    if epoch.is_none() && !entries.is_empty() {
                        // The first entry of a new stream created its epoch: learn it, then read again.
                        epoch = log.head(stream).await.ok().and_then(|h| h.epoch);
                    } else {
                        strong.metrics.fleet_entries_read.inc_by(entries.len() as u64);
                        for (position, entry) in entries {
                            strong.apply(entry, role.part).await;
                            last = position;
                        }
                        applied.send_replace(last);
                        strong.count();
                    }
                    read = reader.read_after(epoch.unwrap_or_default(), last, BLOCK);
                }
                join = joins.recv() => {
                    let Some(join) = join else { return };
                    let Some(strong) = inner.upgrade() else { return };
                    rooms.extend(joined(strong.serve_joins(stream, batch_of(join, &mut joins), epoch, last).await));
                }
                _ = tick.tick() => {
                    let Some(strong) = inner.upgrade() else { return };
                    strong.count();
                    ticks = ticks.wrapping_add(1);
                    if stream == Stream::Control && ticks.is_multiple_of(CLAIM_EVERY) {
                        strong.check_claim().await;
                    }
                    strong.prune(&mut rooms).await;
                    if !role.permanent && strong.may_stop(stream, &rooms, &mut idle_since, &joins).await {
                        return;
                    }
                }
            }
        };
        let Some(strong) = inner.upgrade() else { return };
        if matches!(error, LogError::Gap) {
            // Entries were dropped before they were read: as with a new stream.
            let cut = strong.cut_rooms(&rooms);
            tracing::warn!(%stream, sockets = cut, "event log: entries were dropped unread; sockets are cut to recover");
            // Read on from the stream's head.
            if let Ok(head) = log.head(stream).await {
                last = head.last;
                applied.send_replace(last);
            }
            continue;
        }
        strong.metrics.log_errors.inc();
        tracing::warn!(%stream, error = %error_chain(&error), "event log: reading failed; reconnecting");
    }
}

/// The rooms a follower joined sockets to, by name, with when it last did.
type Joined = HashMap<String, Instant>;

fn joined(rooms: Vec<Room>) -> impl Iterator<Item = (String, Instant)> {
    let now = Instant::now();
    rooms.into_iter().map(move |room| (room.to_string(), now))
}

impl<A: Adapter> Inner<A> {
    /// Applies one entry of the log.
    async fn apply(&self, entry: Entry, part: Part) {
        match entry {
            Entry::Event(logged) => self.deliver(&logged).await,
            Entry::Revocation(json) => match self.on_revoke.get() {
                Some(handler) => handler(json, part).await,
                None => tracing::warn!("a revocation arrived before the gateway was ready; ignored"),
            },
            Entry::Unreadable => tracing::warn!("event log: an entry herald cannot read; skipped"),
        }
    }
}
