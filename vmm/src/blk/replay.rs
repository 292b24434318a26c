//! What block replays after a restart, and how it tells the shadow queue what its requests
//! are: the block operations ([`Op`], [`BlockOp`]), the write log of acknowledged changes a
//! volatile write cache may have dropped ([`WriteLog`]), and the fence that keeps client
//! requests from overtaking a replayed write they overlap ([`ReplayFence`]).
//!
//! With a volatile write cache a reset may drop writes the device already acknowledged. The
//! write log keeps a copy of each acknowledged write until a flush that was posted after it
//! completes; after a reset those writes are replayed first, in acknowledgement order.

use ddvm_recovery::shadow::Operation;

/// What a block request does (the channel's block operations).
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

/// A block request as the shadow queue keeps it: the operation and its device sectors
/// (already mapped into the client's range; none for a flush).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOp {
    /// Operation.
    pub kind: Op,
    /// First device sector.
    pub sector: u64,
    /// Number of sectors (0 for a flush).
    pub sectors: u32,
}

/// Every block request is bound by the deadline and posted again, in order, to the next
/// domain: reads, writes, flushes and discards are idempotent when replayed in order.
impl Operation for BlockOp {
    fn modifies(&self) -> bool {
        self.kind.modifies()
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

/// Sector ranges of replayed writes not yet complete. A client part that overlaps one, or a
/// flush (which must cover them all), waits until they are: the device may run commands in
/// flight in any order, and a replayed write holds older data than a client's new one.
#[derive(Debug, Default)]
pub struct ReplayFence(pub Vec<(u64, u32)>);

impl ReplayFence {
    /// Whether a request of `op` over `sectors` from `sector` must wait.
    pub fn blocks(&self, op: Op, sector: u64, sectors: u32) -> bool {
        match op {
            _ if self.0.is_empty() => false,
            Op::Flush => true,
            Op::Read | Op::Write | Op::WriteZeroes | Op::Discard => {
                let end = sector.saturating_add(u64::from(sectors.max(1)));
                self.0
                    .iter()
                    .any(|&(s, n)| sector < s.saturating_add(u64::from(n)) && s < end)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn block_requests_are_deadline_bound_and_requeued_and_writes_modify() {
        use ddvm_recovery::shadow::OnLoss;
        let op = |kind| BlockOp {
            kind,
            sector: 0,
            sectors: 8,
        };
        for kind in [Op::Read, Op::Write, Op::Flush, Op::WriteZeroes, Op::Discard] {
            assert!(op(kind).deadline_bound());
            assert_eq!(op(kind).on_loss(), OnLoss::Requeue);
            assert_eq!(op(kind).modifies(), kind.modifies());
        }
        assert!(Op::Discard.modifies() && !Op::Read.modifies() && !Op::Flush.modifies());
    }

    #[test]
    fn replayed_writes_fence_what_overlaps_them_and_every_flush() {
        let fence = ReplayFence(vec![(8, 8), (100, 1)]);
        // Sectors 8..16 and 100.
        assert!(fence.blocks(Op::Read, 8, 8));
        assert!(fence.blocks(Op::Write, 15, 1));
        assert!(fence.blocks(Op::Write, 0, 9), "its last sector overlaps");
        assert!(fence.blocks(Op::Discard, 90, 20));
        assert!(fence.blocks(Op::WriteZeroes, 100, 1));
        assert!(
            !fence.blocks(Op::Read, 0, 8),
            "ends where the replay starts"
        );
        assert!(
            !fence.blocks(Op::Write, 16, 8),
            "starts where the replay ends"
        );
        assert!(!fence.blocks(Op::Read, 101, u32::MAX));
        assert!(
            fence.blocks(Op::Flush, 0, 0),
            "a flush must cover every replay"
        );
        assert!(
            !fence.blocks(Op::Read, u64::MAX, 8),
            "no overflow at the end"
        );
        let none = ReplayFence(Vec::new());
        assert!(!none.blocks(Op::Flush, 0, 0));
        assert!(!none.blocks(Op::Write, 8, 8));
    }
}
