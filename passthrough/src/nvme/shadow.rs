//! Shadow doorbells and event indexes (Doorbell Buffer Config, NVMe 1.3+).
//!
//! The driver writes each I/O queue's new SQ tail / CQ head into the shadow doorbell page and
//! rings the MMIO doorbell only if [`need_event`] says the device asked for it through the
//! EventIdx page; the device polls the shadow page while it has work. Slot layout follows the
//! doorbell registers with DSTRD = 0: SQ y tail at `8 * y`, CQ y head at `8 * y + 4`.
//!
//! The admin queue never uses shadow doorbells (as in Linux): its MMIO doorbells carry values.
//!
//! Before the worker sleeps it sets each SQ's event index to the tail it has seen (the next
//! submission rings), and each CQ's to "never" unless a submission queue is held back by that
//! CQ being full, in which case to the head it has seen (the next consumption rings). Then it
//! re-reads the shadow page: a value written before the driver could see the new event index
//! is caught there, so no wakeup is lost.
//!
//! A driver that waits in the VMM right after it submits, where its wait runs the
//! controller's passes ([`crate::NvmePoller::set_driver_waits`]), is told "never" for its
//! SQs too: the wait that follows a submission is where the controller sees it, and a
//! doorbell would only cost the driver an exit and wake the poller's owner for nothing.

use std::sync::atomic::{fence, Ordering};

use super::controller::{Controller, Observed};

/// Where the driver gave the two pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoorbellBuffer {
    /// Shadow doorbell page (driver writes, device reads).
    pub shadow: u64,
    /// EventIdx page (device writes, driver reads).
    pub event_idx: u64,
}

impl DoorbellBuffer {
    fn sq_slot(base: u64, qid: usize) -> u64 {
        base + 8 * qid as u64
    }

    fn cq_slot(base: u64, qid: usize) -> u64 {
        base + 8 * qid as u64 + 4
    }
}

/// The driver-side rule: after moving a shadow value from `old` to `new`, ring the MMIO
/// doorbell only if the move passed `event_idx` (all modulo 2^16, like virtio's event index).
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Controller {
    /// Takes new SQ tails and CQ heads from the shadow page for every I/O queue. A bad value
    /// is counted once and ignored.
    pub(super) fn read_shadow_doorbells(&mut self) {
        let Some(db) = self.dbbuf else {
            return;
        };
        for qid in 1..self.sqs.len() {
            let sq_seen = self.sqs[qid].as_ref().map(|q| q.shadow_seen);
            if let Some(seen) = sq_seen {
                let Ok(v) = self
                    .dma
                    .load_u32(DoorbellBuffer::sq_slot(db.shadow, qid), Ordering::Acquire)
                else {
                    return;
                };
                if v != seen {
                    if let Some(q) = self.sqs[qid].as_mut() {
                        q.shadow_seen = v;
                    }
                    if !self.set_sq_tail(qid, v) {
                        Observed::bump(&self.observed.invalid_doorbells);
                    }
                }
            }
            let cq_seen = self.cqs[qid].as_ref().map(|q| q.shadow_seen);
            if let Some(seen) = cq_seen {
                let Ok(v) = self
                    .dma
                    .load_u32(DoorbellBuffer::cq_slot(db.shadow, qid), Ordering::Acquire)
                else {
                    return;
                };
                if v != seen {
                    if let Some(q) = self.cqs[qid].as_mut() {
                        q.shadow_seen = v;
                    }
                    if !self.set_cq_head(qid, v) {
                        Observed::bump(&self.observed.invalid_doorbells);
                    }
                }
            }
        }
    }

    /// Whether a submission queue bound to CQ `cqid` has commands held back by it being full.
    fn cq_blocking(&self, cqid: usize) -> bool {
        let full = self
            .cqs
            .get(cqid)
            .and_then(Option::as_ref)
            .is_some_and(|cq| cq.is_full());
        full && self
            .sqs
            .iter()
            .flatten()
            .any(|sq| usize::from(sq.cqid) == cqid && sq.has_work())
    }

    /// Sets the event indexes before sleeping and re-reads the shadow page; true if the driver
    /// moved a value the device has not seen yet (so it must not sleep).
    pub(super) fn arm_event_idx(&mut self) -> bool {
        let Some(db) = self.dbbuf else {
            return false;
        };
        for qid in 1..self.sqs.len() {
            if let Some(sq) = &self.sqs[qid] {
                // A driver whose waits run the passes is looked at when it waits next.
                let ev = if self.driver_waits {
                    sq.tail.wrapping_sub(1)
                } else {
                    sq.tail
                };
                let at = DoorbellBuffer::sq_slot(db.event_idx, qid);
                let _ = self.dma.store_u32(at, u32::from(ev), Ordering::Relaxed);
            }
            if let Some(cq) = &self.cqs[qid] {
                let ev = if self.cq_blocking(qid) {
                    cq.head
                } else {
                    cq.head.wrapping_sub(1)
                };
                let at = DoorbellBuffer::cq_slot(db.event_idx, qid);
                let _ = self.dma.store_u32(at, u32::from(ev), Ordering::Relaxed);
            }
        }
        // Pairs with the driver's barrier between writing a shadow value and reading the
        // event index.
        fence(Ordering::SeqCst);
        for qid in 1..self.sqs.len() {
            if let Some(sq) = &self.sqs[qid] {
                let at = DoorbellBuffer::sq_slot(db.shadow, qid);
                if self
                    .dma
                    .load_u32(at, Ordering::Acquire)
                    .is_ok_and(|v| v != sq.shadow_seen)
                {
                    return true;
                }
            }
            if let Some(cq) = &self.cqs[qid] {
                let at = DoorbellBuffer::cq_slot(db.shadow, qid);
                if self
                    .dma
                    .load_u32(at, Ordering::Acquire)
                    .is_ok_and(|v| v != cq.shadow_seen)
                {
                    return true;
                }
            }
        }
        false
    }

    /// Puts a queue's shadow and event index slots in step with the queue (on creation, and
    /// for existing queues when the buffer is configured).
    pub(super) fn sync_shadow_slots(&mut self, qid: usize) {
        let Some(db) = self.dbbuf else {
            return;
        };
        if qid == 0 {
            return;
        }
        if let Some(sq) = self.sqs.get_mut(qid).and_then(Option::as_mut) {
            let _ = self.dma.store_u32(
                DoorbellBuffer::sq_slot(db.shadow, qid),
                u32::from(sq.tail),
                Ordering::Relaxed,
            );
            let _ = self.dma.store_u32(
                DoorbellBuffer::sq_slot(db.event_idx, qid),
                u32::from(sq.tail),
                Ordering::Relaxed,
            );
            sq.shadow_seen = u32::from(sq.tail);
        }
        if let Some(cq) = self.cqs.get_mut(qid).and_then(Option::as_mut) {
            let _ = self.dma.store_u32(
                DoorbellBuffer::cq_slot(db.shadow, qid),
                u32::from(cq.head),
                Ordering::Relaxed,
            );
            let _ = self.dma.store_u32(
                DoorbellBuffer::cq_slot(db.event_idx, qid),
                u32::from(cq.head),
                Ordering::Relaxed,
            );
            cq.shadow_seen = u32::from(cq.head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_follows_the_event_index() {
        // The device saw tail 5: moving 5 -> 6 rings, 6 -> 7 does not.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 7, 6));
        // A batch that passes the index rings once.
        assert!(need_event(5, 9, 5));
        // Wrap-around of the 16-bit space.
        assert!(need_event(0xffff, 0, 0xffff));
        assert!(need_event(0xfffe, 2, 0xfff0));
        // An index of head - 1 never asks.
        assert!(!need_event(9, 12, 10));
    }
}
