//! The account a persistent client of the soak keeps of its campaign's events, across its
//! connections: what it is owed, what arrived twice, and which holes are silent.
//!
//! The publisher sends one request at a time, so the order of `seq` is the log's order, and
//! `begun` (the seqs whose request has started) only grows. When a client reads the ack of a
//! subscribe without `since`, every seq from `begun` on started after its join, so it is owed;
//! seqs below may arrive (they were in flight) and are welcome. A re-subscribe with `since`
//! acked `recovered: true` owes everything after the last event received, with no hole; one
//! acked `recovered: false` is a declared gap, and the client is owed what a fresh subscribe
//! is. Deliveries that come before a subscribe's ack (the replay, with `since`) are held and
//! judged once the ack says which of these applies. A seq whose publish failed is owed to no
//! one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::stats::SeqSet;

/// The counts of every client, together.
#[derive(Debug, Default)]
pub struct Tally {
    /// Events received for the first time.
    pub deliveries: AtomicU64,
    /// A seq received again by the same client.
    pub duplicates: AtomicU64,
    /// An owed seq that arrived after a later one.
    pub out_of_order: AtomicU64,
    /// Holes in what a client was owed, and the events in them.
    pub silent_gaps: AtomicU64,
    pub silent_events: AtomicU64,
    /// `recovered: false` acks, and the events between the last one received and the ack.
    pub declared_gaps: AtomicU64,
    pub declared_events: AtomicU64,
    /// `recovered: true` acks.
    pub recovered: AtomicU64,
    /// Re-subscribes of a client that had received nothing yet, so had no offset to pass as
    /// `since` (the recipe then subscribes afresh), and the events it was owed and missed.
    pub blind_resubscribes: AtomicU64,
    pub blind_events: AtomicU64,
}

/// A snapshot of a [`Tally`], as reported.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Counts {
    pub deliveries: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub silent_gaps: u64,
    pub silent_events: u64,
    pub declared_gaps: u64,
    pub declared_events: u64,
    pub recovered: u64,
    pub blind_resubscribes: u64,
    pub blind_events: u64,
}

impl Tally {
    pub fn counts(&self) -> Counts {
        Counts {
            deliveries: self.deliveries.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            out_of_order: self.out_of_order.load(Relaxed),
            silent_gaps: self.silent_gaps.load(Relaxed),
            silent_events: self.silent_events.load(Relaxed),
            declared_gaps: self.declared_gaps.load(Relaxed),
            declared_events: self.declared_events.load(Relaxed),
            recovered: self.recovered.load(Relaxed),
            blind_resubscribes: self.blind_resubscribes.load(Relaxed),
            blind_events: self.blind_events.load(Relaxed),
        }
    }
}

/// What a subscribe's ack said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// `{ success: true }` to a subscribe without `since`.
    Fresh,
    /// `recovered: true`.
    Recovered,
    /// `recovered: false`.
    Unrecovered,
}

pub struct Ledger {
    tally: Arc<Tally>,
    /// The campaign's seqs whose publish failed.
    failed: Arc<Mutex<SeqSet>>,
    seen: SeqSet,
    /// The next seq owed; `None` before the first ack.
    expect: Option<u64>,
    /// Seqs below it were begun before the current stretch of owed events started.
    start: u64,
    /// The last event received: its seq and offset (the recipe's `last`).
    last: Option<(u64, String)>,
    /// While a subscribe waits for its ack: the deliveries that came before it.
    held: Option<Vec<u64>>,
}

impl Ledger {
    pub fn new(tally: Arc<Tally>, failed: Arc<Mutex<SeqSet>>) -> Self {
        Ledger { tally, failed, seen: SeqSet::default(), expect: None, start: 0, last: None, held: None }
    }

    /// The offset to pass as `since`: the last event's.
    pub fn since(&self) -> Option<&str> {
        self.last.as_ref().map(|(_, o)| o.as_str())
    }

    /// The next seq owed (`None` before the first ack).
    pub fn expect(&self) -> Option<u64> {
        self.expect
    }

    /// A subscribe was sent: deliveries wait for its ack.
    pub fn subscribing(&mut self) {
        self.held = Some(Vec::new());
    }

    /// An event arrived. `Err` for a seq the generator never publishes.
    pub fn delivered(&mut self, seq: u64, offset: &str) -> Result<(), &'static str> {
        match self.seen.insert(seq) {
            None => return Err("seq out of range"),
            Some(false) => {
                self.tally.duplicates.fetch_add(1, Relaxed);
            }
            Some(true) => {
                self.tally.deliveries.fetch_add(1, Relaxed);
                match &mut self.held {
                    Some(held) => held.push(seq),
                    None => self.judge(seq),
                }
            }
        }
        self.last = Some((seq, offset.to_owned()));
        Ok(())
    }

    /// The subscribe's ack arrived, when the publisher had begun the seqs below `begun`.
    pub fn acked(&mut self, ack: Ack, begun: u64) {
        let held = self.held.take().unwrap_or_default();
        let after_last = self.last.as_ref().map(|(s, _)| s + 1);
        match ack {
            Ack::Fresh => {
                if let Some(from) = self.expect {
                    // subscribed before, and came back with nothing to pass as `since`
                    let missed = self.unreceived(from, begun);
                    self.tally.blind_resubscribes.fetch_add(1, Relaxed);
                    self.tally.blind_events.fetch_add(missed, Relaxed);
                }
                self.restart(begun);
            }
            Ack::Recovered => {
                self.tally.recovered.fetch_add(1, Relaxed);
                if self.expect.is_none() {
                    // its offset came from a delivery before its first ack
                    self.restart(after_last.unwrap_or(begun));
                }
            }
            Ack::Unrecovered => {
                let from = self.expect.or(after_last).unwrap_or(begun);
                let missed = self.unreceived(from, begun);
                self.tally.declared_gaps.fetch_add(1, Relaxed);
                self.tally.declared_events.fetch_add(missed, Relaxed);
                self.restart(begun);
            }
        }
        for seq in held {
            self.judge(seq);
        }
    }

    /// Owed seqs below `hi` that never arrived (at the end, `hi` is the last accepted seq + 1).
    pub fn missing_to(&self, hi: u64) -> u64 {
        self.expect.map_or(0, |from| self.unreceived(from, hi))
    }

    fn restart(&mut self, from: u64) {
        let from = self.expect.map_or(from, |e| e.max(from));
        self.expect = Some(from);
        self.start = from;
    }

    /// Seqs of `lo..hi` neither received nor failed.
    fn unreceived(&self, lo: u64, hi: u64) -> u64 {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        self.seen.absent_in(&failed, lo, hi)
    }

    /// A first delivery of `seq`, once its subscribe is acked.
    fn judge(&mut self, seq: u64) {
        let Some(expect) = self.expect else { return };
        if seq >= expect {
            let hole = self.unreceived(expect, seq);
            if hole > 0 {
                self.tally.silent_gaps.fetch_add(1, Relaxed);
                self.tally.silent_events.fetch_add(hole, Relaxed);
            }
            self.expect = Some(seq + 1);
        } else if seq >= self.start {
            self.tally.out_of_order.fetch_add(1, Relaxed);
        }
        // below `start`: in flight when the subscribe was acked, welcome but not owed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> (Ledger, Arc<Tally>, Arc<Mutex<SeqSet>>) {
        let tally = Arc::new(Tally::default());
        let failed = Arc::new(Mutex::new(SeqSet::default()));
        (Ledger::new(tally.clone(), failed.clone()), tally, failed)
    }

    fn deliver(l: &mut Ledger, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            l.delivered(s, &format!("o-{s}")).unwrap();
        }
    }

    #[test]
    fn a_fresh_subscribe_owes_what_began_after_its_ack_and_welcomes_what_was_in_flight() {
        let (mut l, tally, _) = ledger();
        l.subscribing();
        deliver(&mut l, [7]); // live before the ack
        l.acked(Ack::Fresh, 10);
        deliver(&mut l, [8, 9, 10, 11]); // 8 and 9 were in flight at the ack
        assert_eq!(l.expect(), Some(12));
        assert_eq!(l.missing_to(12), 0);
        assert_eq!(l.missing_to(14), 2);
        let c = tally.counts();
        assert_eq!((c.deliveries, c.duplicates, c.silent_gaps, c.out_of_order), (5, 0, 0, 0));
        assert_eq!(l.since(), Some("o-11"));
    }

    #[test]
    fn holes_duplicates_and_late_arrivals_are_counted() {
        let (mut l, tally, failed) = ledger();
        l.subscribing();
        l.acked(Ack::Fresh, 0);
        failed.lock().unwrap().insert(3); // its publish failed: owed to no one
        deliver(&mut l, [0, 1, 4, 5, 5, 9, 2]);
        let c = tally.counts();
        assert_eq!(c.duplicates, 1);
        assert_eq!((c.silent_gaps, c.silent_events), (2, 4)); // 2 (3 failed), then 6, 7, 8
        assert_eq!(c.out_of_order, 1); // 2, after 9
        assert!(l.delivered(SeqSet::LIMIT, "x").is_err());
    }

    #[test]
    fn recovered_true_continues_without_a_hole_and_the_replay_is_judged_after_the_ack() {
        let (mut l, tally, _) = ledger();
        l.subscribing();
        l.acked(Ack::Fresh, 0);
        deliver(&mut l, [0, 1, 2]);
        // dropped; 3..6 published meanwhile; re-subscribed with since = o-2
        assert_eq!(l.since(), Some("o-2"));
        l.subscribing();
        deliver(&mut l, [3, 4, 5]);
        l.acked(Ack::Recovered, 6);
        deliver(&mut l, [6]);
        assert_eq!(tally.counts().silent_gaps, 0);
        // a replay that skips an event is a silent gap
        l.subscribing();
        deliver(&mut l, [8]);
        l.acked(Ack::Recovered, 9);
        let c = tally.counts();
        assert_eq!((c.recovered, c.silent_gaps, c.silent_events), (2, 1, 1));
    }

    #[test]
    fn recovered_false_declares_the_gap_and_restarts_what_is_owed() {
        let (mut l, tally, _) = ledger();
        l.subscribing();
        l.acked(Ack::Fresh, 0);
        deliver(&mut l, [0, 1]);
        l.subscribing();
        l.acked(Ack::Unrecovered, 20);
        deliver(&mut l, [19, 20, 21]); // 19 in flight at the ack: welcome
        let c = tally.counts();
        assert_eq!((c.declared_gaps, c.declared_events), (1, 18)); // 2..=19, none received at the ack
        assert_eq!((c.silent_gaps, c.out_of_order), (0, 0));
        assert_eq!(l.missing_to(22), 0);
    }

    #[test]
    fn a_client_that_had_no_offset_to_pass_is_counted_apart() {
        let (mut l, tally, _) = ledger();
        l.subscribing();
        l.acked(Ack::Fresh, 5);
        // dropped before any event: re-subscribed without since
        assert_eq!(l.since(), None);
        l.subscribing();
        l.acked(Ack::Fresh, 9);
        deliver(&mut l, [9]);
        let c = tally.counts();
        assert_eq!((c.blind_resubscribes, c.blind_events), (1, 4));
        assert_eq!((c.silent_gaps, c.declared_gaps), (0, 0));
    }

    #[test]
    fn an_offset_from_before_the_first_ack_is_recovered_from() {
        let (mut l, tally, _) = ledger();
        l.subscribing();
        deliver(&mut l, [3]); // live, before an ack that never came: dropped
        l.subscribing();
        deliver(&mut l, [4, 5]);
        l.acked(Ack::Recovered, 6);
        assert_eq!(l.expect(), Some(6));
        assert_eq!(tally.counts().silent_gaps, 0);
    }
}
