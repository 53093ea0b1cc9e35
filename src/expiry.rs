//! Token expiry: one timer task for every socket, rather than a task per
//! socket (a sleeping task costs about 0.4 KiB per connection; an entry here
//! about a quarter of that).
//!
//! A socket is armed with its deadline when it connects and disarmed when it
//! disconnects. When a deadline passes, the entry is asked for its current
//! deadline: a refresh may have moved it later (the entry is re-armed), the
//! socket may be gone (the entry is dropped), or it is cut.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;

use crate::auth::unix_now;

/// Something cut at a deadline: a socket.
pub trait Expiring: Send + 'static {
    /// Its deadline now, in seconds since the epoch; `None` once it is gone.
    fn deadline(&self) -> Option<u64>;
    /// Its deadline passed.
    fn expire(self: Box<Self>);
}

/// Names one armed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(u64);

#[derive(Default)]
struct Timers {
    by_deadline: BTreeMap<(u64, TimerId), Box<dyn Expiring>>,
    deadline_of: HashMap<TimerId, u64>,
}

impl Timers {
    fn insert(&mut self, id: TimerId, deadline: u64, entry: Box<dyn Expiring>) -> bool {
        if let Some(old) = self.deadline_of.insert(id, deadline) {
            self.by_deadline.remove(&(old, id));
        }
        self.by_deadline.insert((deadline, id), entry);
        self.by_deadline.first_key_value().is_some_and(|(&(first, _), _)| first == deadline)
    }

    /// Takes out every entry due at `now`.
    fn take_due(&mut self, now: u64) -> Vec<(TimerId, Box<dyn Expiring>)> {
        let mut due = Vec::new();
        while let Some(entry) = self.by_deadline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, id), expiring) = entry.remove_entry();
            self.deadline_of.remove(&id);
            due.push((id, expiring));
        }
        due
    }

    fn next_deadline(&self) -> Option<u64> {
        self.by_deadline.first_key_value().map(|(&(deadline, _), _)| deadline)
    }
}

struct Shared {
    timers: Mutex<Timers>,
    next_id: AtomicU64,
    /// Wakes the timer task: an earlier deadline, or the end.
    wake: Arc<Notify>,
}

impl Shared {
    fn timers(&self) -> MutexGuard<'_, Timers> {
        self.timers.lock()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

/// The deadlines of every socket of one gateway, served by one task.
#[derive(Clone)]
pub struct Expiry(Arc<Shared>);

impl Expiry {
    /// Starts the timer task (it ends when the last handle is dropped).
    pub fn start() -> Expiry {
        let wake = Arc::new(Notify::new());
        let shared =
            Arc::new(Shared { timers: Mutex::new(Timers::default()), next_id: AtomicU64::new(0), wake: wake.clone() });
        tokio::spawn(run(Arc::downgrade(&shared), wake));
        Expiry(shared)
    }

    /// A fresh id for [`Expiry::arm`].
    pub fn next_id(&self) -> TimerId {
        TimerId(self.0.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Cuts `entry` at `deadline` (seconds since the epoch), unless its
    /// deadline moved by then or it was disarmed. Arming an id again
    /// replaces its entry.
    pub fn arm(&self, id: TimerId, deadline: u64, entry: Box<dyn Expiring>) {
        if self.0.timers().insert(id, deadline, entry) {
            self.0.wake.notify_one();
        }
    }

    /// Forgets an entry (its socket is gone).
    pub fn disarm(&self, id: TimerId) {
        let mut timers = self.0.timers();
        if let Some(deadline) = timers.deadline_of.remove(&id) {
            timers.by_deadline.remove(&(deadline, id));
        }
    }

    /// How many entries are armed.
    #[cfg(test)]
    fn armed(&self) -> usize {
        self.0.timers().deadline_of.len()
    }
}

async fn run(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else { return };
            let now = unix_now();
            let due = shared.timers().take_due(now);
            for (id, expiring) in due {
                match expiring.deadline() {
                    Some(later) if later > now => {
                        shared.timers().insert(id, later, expiring);
                    }
                    Some(_) => expiring.expire(),
                    None => {}
                }
            }
            shared.timers().next_deadline()
        };
        match next {
            Some(deadline) => {
                let wait = Duration::from_secs(deadline.saturating_sub(unix_now()));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::sync::mpsc;

    struct Probe {
        name: &'static str,
        deadline: Arc<AtomicU64>,
        gone: Arc<AtomicBool>,
        expired: mpsc::UnboundedSender<&'static str>,
    }

    impl Expiring for Probe {
        fn deadline(&self) -> Option<u64> {
            (!self.gone.load(Ordering::SeqCst)).then(|| self.deadline.load(Ordering::SeqCst))
        }
        fn expire(self: Box<Self>) {
            let _ = self.expired.send(self.name);
        }
    }

    fn probe(
        name: &'static str,
        deadline: u64,
        tx: &mpsc::UnboundedSender<&'static str>,
    ) -> (Box<Probe>, Arc<AtomicU64>, Arc<AtomicBool>) {
        let d = Arc::new(AtomicU64::new(deadline));
        let gone = Arc::new(AtomicBool::new(false));
        (Box::new(Probe { name, deadline: d.clone(), gone: gone.clone(), expired: tx.clone() }), d, gone)
    }

    type Expired = (mpsc::UnboundedSender<&'static str>, mpsc::UnboundedReceiver<&'static str>);

    /// A started timer, a channel for the names of the probes it cuts, and now.
    fn start() -> (Expiry, Expired, u64) {
        (Expiry::start(), mpsc::unbounded_channel(), unix_now())
    }

    #[tokio::test]
    async fn deadlines_pass_in_order_and_moved_or_gone_entries_are_spared() {
        let (expiry, (tx, mut rx), now) = start();
        let (late, _, _) = probe("late", now + 2, &tx);
        let (early, _, _) = probe("early", now + 1, &tx);
        let (moved, moved_deadline, _) = probe("moved", now + 1, &tx);
        let (gone, _, gone_flag) = probe("gone", now + 1, &tx);
        let (disarmed, _, _) = probe("disarmed", now + 1, &tx);
        for (entry, deadline) in [
            (late as Box<dyn Expiring>, now + 2),
            (early, now + 1),
            (moved, now + 1),
            (gone, now + 1),
            (disarmed, now + 1),
        ] {
            let id = expiry.next_id();
            expiry.arm(id, deadline, entry);
            if id == TimerId(4) {
                expiry.disarm(id);
            }
        }
        assert_eq!(expiry.armed(), 4);
        moved_deadline.store(now + 3, Ordering::SeqCst);
        gone_flag.store(true, Ordering::SeqCst);

        for expected in ["early", "late", "moved"] {
            let got = tokio::time::timeout(Duration::from_secs(6), rx.recv()).await;
            assert_eq!(got.ok().flatten(), Some(expected));
        }
        assert!(rx.try_recv().is_err(), "a gone or disarmed entry was cut");
        assert_eq!(expiry.armed(), 0);
    }

    #[tokio::test]
    async fn an_earlier_deadline_wakes_the_timer() {
        let (expiry, (tx, mut rx), now) = start();
        let (far, _, _) = probe("far", now + 3600, &tx);
        expiry.arm(expiry.next_id(), now + 3600, far);
        tokio::task::yield_now().await;
        let (due, _, _) = probe("due", now, &tx);
        expiry.arm(expiry.next_id(), now, due);
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert_eq!(got.ok().flatten(), Some("due"));
        assert_eq!(expiry.armed(), 1);
    }
}
