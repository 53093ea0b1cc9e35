//! Engine.IO sessions that have not sent their Socket.IO CONNECT yet.
//!
//! Opening a session takes no token (the token comes with the CONNECT), so a
//! peer could open sessions faster than the connect timeout closes them.
//! They are counted, per address and in all, from the handshake request
//! until the socket connects (or the session is gone, whichever comes
//! first), and a handshake past either bound is refused before
//! socketioxide sees it. The count is a guard kept in the handshake
//! request's extensions, which engineioxide keeps as long as the session
//! lives: the session's end releases it whatever path ends it (a session
//! opened as a WebSocket also when its connection closes; a long-polling
//! session whose CONNECT was refused at the latest at the connect timeout,
//! when socketioxide lets go of it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::telemetry::Metrics;
use parking_lot::{Mutex, MutexGuard};

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRefused {
    /// Too many sessions of this address wait for their CONNECT.
    Address,
    /// Too many sessions wait for their CONNECT, in all.
    Total,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

struct Shared {
    counts: Mutex<Counts>,
    max_total: usize,
    max_per_address: usize,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock()
    }

    fn release(&self, peer: IpAddr) {
        let mut counts = self.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_address.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                counts.by_address.remove(&peer);
            }
        }
        self.metrics.pending_sessions.set(counts.total as i64);
    }
}

/// The sessions waiting for their CONNECT, with their bounds.
#[derive(Clone)]
pub struct PendingSessions(Arc<Shared>);

impl PendingSessions {
    pub fn new(max_total: usize, max_per_address: usize, metrics: Arc<Metrics>) -> PendingSessions {
        PendingSessions(Arc::new(Shared { counts: Mutex::default(), max_total, max_per_address, metrics }))
    }

    /// Counts a new session of `peer`, or refuses it.
    pub fn admit(&self, peer: IpAddr) -> Result<PendingSession, PendingRefused> {
        let shared = &self.0;
        let mut counts = shared.counts();
        let limit_hit = |limit| shared.metrics.limits_hit.get_or_create(&[("limit", limit)]).inc();
        if counts.total >= shared.max_total {
            limit_hit("pending_sessions");
            return Err(PendingRefused::Total);
        }
        let of_peer = counts.by_address.entry(peer).or_default();
        if *of_peer >= shared.max_per_address {
            if *of_peer == 0 {
                counts.by_address.remove(&peer);
            }
            limit_hit("pending_per_address");
            return Err(PendingRefused::Address);
        }
        *of_peer += 1;
        counts.total += 1;
        shared.metrics.pending_sessions.set(counts.total as i64);
        Ok(PendingSession(Arc::new(Guard { shared: self.0.clone(), peer, settled: AtomicBool::new(false) })))
    }
}

struct Guard {
    shared: Arc<Shared>,
    peer: IpAddr,
    settled: AtomicBool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::SeqCst) {
            self.shared.release(self.peer);
        }
    }
}

/// One counted session (in its handshake request's extensions).
#[derive(Clone)]
pub struct PendingSession(Arc<Guard>);

impl PendingSession {
    /// The session's socket connected, or its connection closed: it no longer counts.
    pub fn settle(&self) {
        if !self.0.settled.swap(true, Ordering::SeqCst) {
            self.0.shared.release(self.0.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_count_per_address_and_in_all_until_settled_or_gone() {
        let metrics = Metrics::new();
        let pending = PendingSessions::new(3, 2, metrics.clone());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = pending.admit(a).unwrap();
        let a2 = pending.admit(a).unwrap();
        assert_eq!(pending.admit(a).err(), Some(PendingRefused::Address));
        let b1 = pending.admit(b).unwrap();
        assert_eq!(pending.admit(b).err(), Some(PendingRefused::Total));
        assert_eq!(metrics.pending_sessions.get(), 3);
        // Settled once, however often it is told; dropped after settling, not counted twice.
        a1.settle();
        a1.settle();
        drop(a1);
        assert_eq!(metrics.pending_sessions.get(), 2);
        let a3 = pending.admit(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!(metrics.pending_sessions.get(), 0);
        assert!(pending.0.counts().by_address.is_empty());
    }
}
