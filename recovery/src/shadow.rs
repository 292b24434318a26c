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
//! With a volatile write cache a reset may drop writes the device already acknowledged. The
//! [`WriteLog`] keeps a copy of each acknowledged write until a flush that was submitted after
//! it completes; after a reset those writes are replayed first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

/// What a request does (the channel's operations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read sectors.
    Read,
    /// Write sectors.
    Write,
    /// Flush the volatile write cache.
    Flush,
    /// Write zeroes to sectors.
    WriteZeroes,
    /// Discard sectors.
    Discard,
}

impl Op {
    /// Whether the request changes what the medium holds.
    pub fn modifies(self) -> bool {
        matches!(self, Op::Write | Op::WriteZeroes | Op::Discard)
    }
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
pub struct Entry<C> {
    /// Order of arrival (replay order).
    pub seq: u64,
    /// Operation.
    pub op: Op,
    /// First device sector (already mapped into the client's range).
    pub sector: u64,
    /// Number of sectors (0 for a flush).
    pub sectors: u32,
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
pub struct ShadowQueue<C> {
    entries: BTreeMap<u64, Entry<C>>,
    by_tag: HashMap<(u64, u32), u64>,
    /// Sequence numbers of the queued entries, in order (the next to post is the first).
    queued: BTreeSet<u64>,
    next_seq: u64,
}

impl<C> Default for ShadowQueue<C> {
    fn default() -> Self {
        ShadowQueue {
            entries: BTreeMap::new(),
            by_tag: HashMap::new(),
            queued: BTreeSet::new(),
            next_seq: 0,
        }
    }
}

impl<C> ShadowQueue<C> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts a request; it is queued until [`ShadowQueue::posted`]. Returns its sequence
    /// number.
    pub fn push(&mut self, op: Op, sector: u64, sectors: u32, client: C, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            seq,
            Entry {
                seq,
                op,
                sector,
                sectors,
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
    pub fn next_queued(&self) -> Option<&Entry<C>> {
        self.entries.get(self.queued.first()?)
    }

    /// The oldest queued entry that arrived after `seq` (to pass over entries that must wait).
    pub fn next_queued_after(&self, seq: u64) -> Option<&Entry<C>> {
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
        self.by_tag.insert((epoch, tag), seq);
        true
    }

    /// Takes the entry completed by `tag` in `epoch`. Each entry completes at most once: a
    /// second completion, or one from another epoch, is refused.
    pub fn complete(&mut self, tag: u32, epoch: u64) -> Result<Entry<C>, NotInFlight> {
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

    /// Removes an entry whatever its state (a client that reset its device, or give-up).
    pub fn remove(&mut self, seq: u64) -> Option<Entry<C>> {
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

    /// The domain is gone: every in-flight entry becomes queued again, in its original place.
    /// Returns how many were in flight.
    pub fn domain_lost(&mut self) -> usize {
        let mut n = 0;
        for e in self.entries.values_mut() {
            if matches!(e.state, State::InFlight { .. }) {
                e.state = State::Queued;
                self.queued.insert(e.seq);
                n += 1;
            }
        }
        self.by_tag.clear();
        n
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

    /// The in-flight entry posted longest ago: (tag, posted).
    pub fn oldest_in_flight(&self) -> Option<(u32, Instant)> {
        self.entries
            .values()
            .filter_map(|e| match e.state {
                State::InFlight { tag, posted, .. } => Some((tag, posted)),
                State::Queued => None,
            })
            .min_by_key(|&(_, posted)| posted)
    }

    /// Every entry, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<C>> {
        self.entries.values()
    }

    /// Removes and returns every entry (give-up: each is failed to its client).
    pub fn drain(&mut self) -> Vec<Entry<C>> {
        self.by_tag.clear();
        self.queued.clear();
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

/// One acknowledged write a volatile write cache may still hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedWrite {
    /// Order in which it was acknowledged.
    pub seq: u64,
    /// Operation (write, write zeroes or discard).
    pub op: Op,
    /// First device sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u32,
    /// Data (writes only).
    pub data: Vec<u8>,
}

/// Acknowledged changes not yet covered by a completed flush, for devices with a volatile write
/// cache that a reset may drop.
///
/// A flush covers exactly the writes acknowledged before it was *posted*: call
/// [`WriteLog::flush_posted`] when posting and [`WriteLog::flush_completed`] with its mark.
#[derive(Debug, Default)]
pub struct WriteLog {
    writes: Vec<LoggedWrite>,
    bytes: usize,
    next_seq: u64,
}

impl WriteLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an acknowledged change.
    pub fn acknowledged(&mut self, op: Op, sector: u64, sectors: u32, data: Vec<u8>) {
        self.bytes += data.len();
        self.writes.push(LoggedWrite {
            seq: self.next_seq,
            op,
            sector,
            sectors,
            data,
        });
        self.next_seq += 1;
    }

    /// A flush is being posted: returns the mark its completion will clear up to.
    pub fn flush_posted(&self) -> u64 {
        self.next_seq
    }

    /// A flush posted at `mark` completed: every write acknowledged before it is durable.
    pub fn flush_completed(&mut self, mark: u64) {
        self.writes.retain(|w| w.seq >= mark);
        self.bytes = self.writes.iter().map(|w| w.data.len()).sum();
    }

    /// Writes to replay after a reset, in acknowledgement order.
    pub fn pending(&self) -> &[LoggedWrite] {
        &self.writes
    }

    /// Bytes of data held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of writes held.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether every acknowledged write is durable.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_entries_can_be_walked_past_ones_that_wait() {
        let now = Instant::now();
        let mut q = ShadowQueue::new();
        let a = q.push(Op::Write, 0, 8, "a", now);
        let b = q.push(Op::Flush, 0, 0, "b", now);
        let c = q.push(Op::Read, 16, 8, "c", now);
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
        let a = q.push(Op::Write, 8, 8, "a", now);
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
        let a = q.push(Op::Write, 0, 8, 'a', now);
        let b = q.push(Op::Read, 8, 8, 'b', now);
        let c = q.push(Op::Flush, 0, 0, 'c', now);
        assert!(q.posted(a, 1, 1, now));
        assert!(q.posted(b, 2, 1, now));
        assert_eq!(q.next_queued().unwrap().seq, c);
        assert_eq!(q.domain_lost(), 2);
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
    fn removal_and_drain_keep_counts_right() {
        let now = Instant::now();
        let mut q = ShadowQueue::new();
        let a = q.push(Op::Read, 0, 1, 0, now);
        let b = q.push(Op::Read, 1, 1, 1, now);
        q.posted(a, 1, 1, now);
        assert_eq!(q.oldest_in_flight().map(|(t, _)| t), Some(1));
        assert!(q.remove(a).is_some());
        assert!(q.complete(1, 1).is_err());
        assert_eq!((q.queued(), q.in_flight()), (1, 0));
        assert_eq!(q.drain().len(), 1);
        assert_eq!((q.len(), q.queued()), (0, 0));
        assert!(q.remove(b).is_none());
    }

    #[test]
    fn a_flush_covers_only_writes_acknowledged_before_it_was_posted() {
        let mut log = WriteLog::new();
        log.acknowledged(Op::Write, 0, 1, vec![1; 512]);
        let mark = log.flush_posted();
        log.acknowledged(Op::Write, 1, 1, vec![2; 512]);
        assert_eq!(log.len(), 2);
        log.flush_completed(mark);
        assert_eq!(log.len(), 1);
        assert_eq!(log.pending()[0].sector, 1);
        assert_eq!(log.bytes(), 512);
        let mark = log.flush_posted();
        log.flush_completed(mark);
        assert!(log.is_empty());
    }
}
