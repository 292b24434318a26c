//! The shadow queue: every request the VMM owes a client, kept in the VMM (never in the domain).
//!
//! Each client request becomes an [`Entry`] when the VMM accepts it and leaves only when the
//! client has been answered. An entry is `Queued` (waiting for room in the channel, or for a
//! domain to come back) or `InFlight` in one epoch of the domain under one channel tag. When a
//! domain is lost, [`ShadowQueue::domain_lost`] turns every in-flight entry back into a queued
//! one; [`ShadowQueue::next_queued`] then hands them out again in their original order, ahead of
//! anything that arrived later. A completion is matched by tag *and* epoch, so a late completion
//! from a dead domain can never answer a request twice.
//!
//! The queue is generic over what its requests are ([`Operation`]): the device class says
//! whether one changes the device's state, whether the request deadline applies to it, and
//! what becomes of it when its domain is lost. What a class replays beyond the queue (block's
//! write log of acknowledged writes a volatile cache may have dropped) is the class's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

/// What a device class's requests are, as the shadow queue needs to know them. The class
/// (block, network) decides; the queue keeps the order, the tags and the epochs.
pub trait Operation: Copy + std::fmt::Debug {
    /// Whether the request changes what the device holds (a write, a discard).
    fn modifies(&self) -> bool;

    /// Whether the request deadline applies while it is in flight. A request that waits on
    /// the world outside rather than on the device — a receive buffer posted for a frame that
    /// may come much later — is not bound by it.
    fn deadline_bound(&self) -> bool {
        true
    }

    /// What becomes of it, in flight, when its domain is lost.
    fn on_loss(&self) -> OnLoss {
        OnLoss::Requeue
    }
}

/// What becomes of an in-flight request when its domain is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLoss {
    /// It is queued again in its original place and posted to the next domain (reads,
    /// writes, flushes, discards: idempotent when replayed in order; a frame sent at least
    /// once).
    Requeue,
    /// It leaves the queue and is handed back to the class, which answers it (what a network
    /// may drop anyway).
    Drop,
}

/// Where an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting to be posted to the domain.
    Queued,
    /// Posted to the domain of `epoch` as `tag`.
    InFlight {
        /// Channel tag.
        tag: u32,
        /// Domain epoch.
        epoch: u64,
        /// When it was posted.
        posted: Instant,
    },
}

/// One request owed to a client.
#[derive(Clone, Debug)]
pub struct Entry<O, C> {
    /// Order of arrival (replay order).
    pub seq: u64,
    /// What it asks of the device (the class's operation).
    pub op: O,
    /// The client's handle for the request (its descriptor chain, or part of one).
    pub client: C,
    /// Where the entry is.
    pub state: State,
    /// How many times it was posted.
    pub attempts: u32,
    /// When the VMM accepted it.
    pub accepted: Instant,
}

/// A completion that matched no in-flight entry of the given epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no request in flight as tag {tag} in epoch {epoch}")]
pub struct NotInFlight {
    /// Tag.
    pub tag: u32,
    /// Epoch.
    pub epoch: u64,
}

/// The shadow queue of one driver domain.
#[derive(Debug)]
pub struct ShadowQueue<O, C> {
    entries: BTreeMap<u64, Entry<O, C>>,
    by_tag: HashMap<(u64, u32), u64>,
    /// Sequence numbers of the queued entries, in order (the next to post is the first).
    queued: BTreeSet<u64>,
    next_seq: u64,
    // Fault injection: the next entry posted is not found by its tag.
    forget_next: bool,
}

impl<O, C> Default for ShadowQueue<O, C> {
    fn default() -> Self {
        ShadowQueue {
            entries: BTreeMap::new(),
            by_tag: HashMap::new(),
            queued: BTreeSet::new(),
            next_seq: 0,
            forget_next: false,
        }
    }
}

impl<O: Operation, C> ShadowQueue<O, C> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts a request; it is queued until [`ShadowQueue::posted`]. Returns its sequence
    /// number.
    pub fn push(&mut self, op: O, client: C, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            seq,
            Entry {
                seq,
                op,
                client,
                state: State::Queued,
                attempts: 0,
                accepted: now,
            },
        );
        self.queued.insert(seq);
        seq
    }

    /// The oldest queued entry (the next to post).
    pub fn next_queued(&self) -> Option<&Entry<O, C>> {
        self.entries.get(self.queued.first()?)
    }

    /// The oldest queued entry that arrived after `seq` (to pass over entries that must wait).
    pub fn next_queued_after(&self, seq: u64) -> Option<&Entry<O, C>> {
        let next = self
            .queued
            .range((std::ops::Bound::Excluded(seq), std::ops::Bound::Unbounded))
            .next()?;
        self.entries.get(next)
    }

    /// Marks queued entry `seq` as posted in `epoch` under `tag`.
    pub fn posted(&mut self, seq: u64, tag: u32, epoch: u64, now: Instant) -> bool {
        let Some(e) = self.entries.get_mut(&seq) else {
            return false;
        };
        if e.state != State::Queued {
            return false;
        }
        e.state = State::InFlight {
            tag,
            epoch,
            posted: now,
        };
        e.attempts += 1;
        self.queued.remove(&seq);
        if !std::mem::take(&mut self.forget_next) {
            self.by_tag.insert((epoch, tag), seq);
        }
        true
    }

    /// Fault injection (`vmm-invariant`): forgets the tag of every entry in flight and of the
    /// next one posted, as a bug in the VMM's bookkeeping would; their completions then find no
    /// entry. The entries stay owed.
    pub fn forget_tags(&mut self) {
        self.by_tag.clear();
        self.forget_next = true;
    }

    /// Takes the entry completed by `tag` in `epoch`. Each entry completes at most once: a
    /// second completion, or one from another epoch, is refused.
    pub fn complete(&mut self, tag: u32, epoch: u64) -> Result<Entry<O, C>, NotInFlight> {
        let seq = self
            .by_tag
            .remove(&(epoch, tag))
            .ok_or(NotInFlight { tag, epoch })?;
        self.entries.remove(&seq).ok_or(NotInFlight { tag, epoch })
    }

    /// Whether the entry `seq` is still owed (queued or in flight).
    pub fn contains(&self, seq: u64) -> bool {
        self.entries.contains_key(&seq)
    }

    /// Sets how many times an entry was posted (an entry pushed again by its class after a
    /// failed attempt keeps its count).
    pub fn set_attempts(&mut self, seq: u64, attempts: u32) {
        if let Some(e) = self.entries.get_mut(&seq) {
            e.attempts = attempts;
        }
    }

    /// Removes an entry whatever its state (a client that reset its device, or give-up).
    pub fn remove(&mut self, seq: u64) -> Option<Entry<O, C>> {
        let e = self.entries.remove(&seq)?;
        match e.state {
            State::Queued => {
                self.queued.remove(&seq);
            }
            State::InFlight { tag, epoch, .. } => {
                self.by_tag.remove(&(epoch, tag));
            }
        }
        Some(e)
    }

    /// The domain is gone: every in-flight entry becomes queued again, in its original place,
    /// or leaves the queue, as its operation says ([`Operation::on_loss`]). Returns how many
    /// were requeued, and the entries that left (for the class to answer).
    pub fn domain_lost(&mut self) -> (usize, Vec<Entry<O, C>>) {
        let mut requeued = 0;
        let mut dropped = Vec::new();
        for e in self.entries.values_mut() {
            if matches!(e.state, State::InFlight { .. }) {
                match e.op.on_loss() {
                    OnLoss::Requeue => {
                        e.state = State::Queued;
                        self.queued.insert(e.seq);
                        requeued += 1;
                    }
                    OnLoss::Drop => dropped.push(e.seq),
                }
            }
        }
        self.by_tag.clear();
        let dropped = dropped
            .into_iter()
            .filter_map(|seq| self.entries.remove(&seq))
            .collect();
        (requeued, dropped)
    }

    /// Entries not yet answered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries waiting to be posted.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Entries posted and not completed.
    pub fn in_flight(&self) -> usize {
        self.entries.len() - self.queued.len()
    }

    /// The in-flight entry bound by the request deadline ([`Operation::deadline_bound`])
    /// that was posted longest ago: (tag, posted).
    pub fn oldest_deadline_bound(&self) -> Option<(u32, Instant)> {
        self.entries
            .values()
            .filter(|e| e.op.deadline_bound())
            .filter_map(|e| match e.state {
                State::InFlight { tag, posted, .. } => Some((tag, posted)),
                State::Queued => None,
            })
            .min_by_key(|&(_, posted)| posted)
    }

    /// Every entry, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<O, C>> {
        self.entries.values()
    }

    /// Removes and returns every entry (give-up: each is failed to its client).
    pub fn drain(&mut self) -> Vec<Entry<O, C>> {
        self.by_tag.clear();
        self.queued.clear();
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A class with reads, writes and receive buffers (not deadline-bound, dropped on loss).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum TestOp {
        Read,
        Write,
        Flush,
        Receive,
    }

    impl Operation for TestOp {
        fn modifies(&self) -> bool {
            *self == TestOp::Write
        }
        fn deadline_bound(&self) -> bool {
            *self != TestOp::Receive
        }
        fn on_loss(&self) -> OnLoss {
            match self {
                TestOp::Receive => OnLoss::Drop,
                _ => OnLoss::Requeue,
            }
        }
    }

    use TestOp::*;

    #[test]
    fn queued_entries_can_be_walked_past_ones_that_wait() {
        let now = Instant::now();
        let mut q = ShadowQueue::new();
        let a = q.push(Write, "a", now);
        let b = q.push(Flush, "b", now);
        let c = q.push(Read, "c", now);
        assert!(q.posted(b, 1, 1, now));
        assert_eq!(
            q.next_queued_after(a).unwrap().seq,
            c,
            "in-flight entries are passed"
        );
        assert!(q.next_queued_after(c).is_none());
        assert_eq!(q.next_queued().unwrap().seq, a);
    }

    #[test]
    fn entries_complete_once_and_only_in_their_epoch() {
        let now = Instant::now();
        let mut q = ShadowQueue::new();
        let a = q.push(Write, "a", now);
        assert_eq!(q.next_queued().unwrap().seq, a);
        assert!(q.posted(a, 7, 1, now));
        assert!(!q.posted(a, 8, 1, now), "posting twice is refused");
        assert_eq!(q.in_flight(), 1);
        assert_eq!(
            q.complete(7, 2).unwrap_err(),
            NotInFlight { tag: 7, epoch: 2 }
        );
        assert_eq!(q.complete(7, 1).unwrap().client, "a");
        assert!(q.complete(7, 1).is_err(), "a second completion is refused");
        assert!(q.is_empty());
    }

    #[test]
    fn a_lost_domain_requeues_in_flight_entries_ahead_of_later_ones() {
        let now = Instant::now();
        let mut q = ShadowQueue::new();
        let a = q.push(Write, 'a', now);
        let b = q.push(Read, 'b', now);
        let c = q.push(Flush, 'c', now);
        assert!(q.posted(a, 1, 1, now));
        assert!(q.posted(b, 2, 1, now));
        assert_eq!(q.next_queued().unwrap().seq, c);
        let (requeued, dropped) = q.domain_lost();
        assert_eq!((requeued, dropped.len()), (2, 0));
        assert_eq!(q.queued(), 3);
        // Replay in order of arrival: a, b, then c.
        let mut order = Vec::new();
        while let Some(e) = q.next_queued() {
            let seq = e.seq;
            order.push(e.client);
            assert!(q.posted(seq, 10 + seq as u32, 2, now));
        }
        assert_eq!(order, ['a', 'b', 'c']);
        // The old epoch's completions no longer match.
        assert!(q.complete(1, 1).is_err());
        let e = q.complete(10, 2).unwrap();
        assert_eq!((e.client, e.attempts), ('a', 2));
    }

    #[test]
    fn what_the_class_drops_on_loss_leaves_and_is_handed_back() {
        let now = Instant::now();
        let mut q = ShadowQueue::new();
        let rx = q.push(Receive, 'r', now);
        let w = q.push(Write, 'w', now);
        let queued_rx = q.push(Receive, 'q', now);
        assert!(q.posted(rx, 1, 1, now));
        assert!(q.posted(w, 2, 1, now));
        let (requeued, dropped) = q.domain_lost();
        assert_eq!(requeued, 1);
        assert_eq!(dropped.iter().map(|e| e.client).collect::<Vec<_>>(), ['r']);
        assert!(!q.contains(rx));
        // A receive buffer never posted is still owed, in its place.
        assert_eq!(q.next_queued().unwrap().seq, w);
        assert_eq!(q.next_queued_after(w).unwrap().seq, queued_rx);
    }

    #[test]
    fn only_deadline_bound_entries_age_against_the_deadline() {
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_millis(5);
        let mut q = ShadowQueue::new();
        let rx = q.push(Receive, 0, t0);
        let r = q.push(Read, 1, t0);
        assert!(q.posted(rx, 1, 1, t0));
        assert_eq!(
            q.oldest_deadline_bound(),
            None,
            "a receive buffer waits freely"
        );
        assert!(q.posted(r, 2, 1, later));
        assert_eq!(q.oldest_deadline_bound(), Some((2, later)));
        assert!(Write.modifies() && !Read.modifies());
    }

    #[test]
    fn removal_and_drain_keep_counts_right() {
        let now = Instant::now();
        let mut q = ShadowQueue::new();
        let a = q.push(Read, 0, now);
        let b = q.push(Read, 1, now);
        q.posted(a, 1, 1, now);
        assert_eq!(q.oldest_deadline_bound().map(|(t, _)| t), Some(1));
        assert!(q.remove(a).is_some());
        assert!(q.complete(1, 1).is_err());
        assert_eq!((q.queued(), q.in_flight()), (1, 0));
        assert_eq!(q.drain().len(), 1);
        assert_eq!((q.len(), q.queued()), (0, 0));
        assert!(q.remove(b).is_none());
    }
}
