//! Submission and completion queues in DMA memory, and their doorbells.
//!
//! With Doorbell Buffer Config (shadow doorbells, NVMe 1.3 section 7.13, for emulated
//! controllers), the driver writes each new tail/head into the shadow buffer and writes the
//! MMIO doorbell (an exit under emulation) only when the controller's event index asks for it:
//! when `(new - event_idx - 1) mod 2^16 < (new - old) mod 2^16`, i.e. the index moved past the
//! point where the controller said it stops looking (virtio's event index rule; Linux's
//! `nvme_dbbuf_need_event`).

use alloc::rc::Rc;
use core::sync::atomic::{fence, Ordering};

use guest_kernel::dma::{DmaBuffer, PAGE_SIZE};
use guest_kernel::mmio::WriteOnly;
use guest_kernel::shared::full_fence;

use super::cmd::{Command, CompletionEntry, CQE_SIZE, SQE_SIZE};
use super::error::NvmeError;

/// Whether a doorbell moving from `old` to `new` must be written, given the controller's
/// event index.
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The two pages given to the controller by Doorbell Buffer Config.
pub struct ShadowBuffers {
    /// Shadow doorbells (the driver writes, the controller reads).
    pub shadow: DmaBuffer,
    /// Event indices (the controller writes, the driver reads).
    pub eventidx: DmaBuffer,
}

impl ShadowBuffers {
    /// Two zeroed pages.
    pub fn new() -> Result<Self, NvmeError> {
        let page = || DmaBuffer::new(1).ok_or(NvmeError::OutOfMemory);
        Ok(ShadowBuffers {
            shadow: page()?,
            eventidx: page()?,
        })
    }
}

/// A queue's shadow slot.
struct Shadow {
    buffers: Rc<ShadowBuffers>,
    offset: u64,
    /// Write the MMIO doorbell every time, the shadow only to keep it in step (admin queues:
    /// some controllers never look at their shadow).
    always_mmio: bool,
}

/// Counts of doorbell updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellStats {
    /// MMIO doorbell writes.
    pub mmio: u64,
    /// Updates left in the shadow buffer only.
    pub suppressed: u64,
}

/// A queue's doorbell: the MMIO register, and optionally its shadow.
pub struct Doorbell {
    register: WriteOnly<u32>,
    shadow: Option<Shadow>,
    value: u16,
    stats: DoorbellStats,
}

impl Doorbell {
    /// A doorbell written through MMIO only.
    pub fn new(register: WriteOnly<u32>) -> Self {
        Doorbell {
            register,
            shadow: None,
            value: 0,
            stats: DoorbellStats::default(),
        }
    }

    /// Uses the shadow slot at `offset` of `buffers` from now on (offset checked by the
    /// caller to lie inside the pages).
    pub fn use_shadow(&mut self, buffers: Rc<ShadowBuffers>, offset: u64, always_mmio: bool) {
        buffers.shadow.write::<u32>(offset, u32::from(self.value));
        self.shadow = Some(Shadow {
            buffers,
            offset,
            always_mmio,
        });
    }

    /// Publishes `new` (a tail or head, below the queue's size).
    pub fn write(&mut self, new: u16) {
        let old = core::mem::replace(&mut self.value, new);
        let ring = match &self.shadow {
            None => true,
            Some(s) => {
                // Queue entries before the shadow value; the shadow value before reading the
                // event index (a store then a load: only a full fence orders them).
                fence(Ordering::Release);
                s.buffers.shadow.write::<u32>(s.offset, u32::from(new));
                full_fence();
                s.always_mmio || {
                    let event_idx = s.buffers.eventidx.read::<u32>(s.offset) as u16;
                    need_event(event_idx, new, old)
                }
            }
        };
        if ring {
            self.register.write(u32::from(new));
            self.stats.mmio += 1;
        } else {
            self.stats.suppressed += 1;
        }
    }

    /// Counts so far.
    pub fn stats(&self) -> DoorbellStats {
        self.stats
    }
}

/// Pages holding `entries` entries of `size` bytes.
fn pages_for(entries: u16, size: u64) -> usize {
    (u64::from(entries) * size).div_ceil(PAGE_SIZE) as usize
}

/// A submission queue. The caller keeps at most `entries - 1` commands outstanding, so the
/// queue never overflows.
pub struct SubmissionQueue {
    mem: DmaBuffer,
    entries: u16,
    tail: u16,
    unrung: bool,
    /// The tail doorbell.
    pub doorbell: Doorbell,
}

impl SubmissionQueue {
    /// A zeroed queue of `entries` (2..=4096) entries.
    pub fn new(entries: u16, doorbell: Doorbell) -> Result<Self, NvmeError> {
        let mem = DmaBuffer::new(pages_for(entries, SQE_SIZE)).ok_or(NvmeError::OutOfMemory)?;
        Ok(SubmissionQueue {
            mem,
            entries,
            tail: 0,
            unrung: false,
            doorbell,
        })
    }

    /// Address of the queue (for the controller).
    pub fn addr(&self) -> u64 {
        self.mem.addr()
    }

    /// Entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Writes `cmd` at the tail (not yet visible to the controller: see [`Self::ring`]).
    pub fn push(&mut self, cmd: &Command) {
        let base = u64::from(self.tail) * SQE_SIZE;
        for (i, dword) in cmd.to_dwords().into_iter().enumerate() {
            self.mem.write::<u32>(base + 4 * i as u64, dword);
        }
        self.tail = (self.tail + 1) % self.entries;
        self.unrung = true;
    }

    /// Tells the controller about every pushed command (one doorbell update for the batch).
    pub fn ring(&mut self) {
        if self.unrung {
            self.unrung = false;
            self.doorbell.write(self.tail);
        }
    }
}

/// A completion queue, consumed by phase tag.
pub struct CompletionQueue {
    mem: DmaBuffer,
    entries: u16,
    head: u16,
    /// The head the controller was last given.
    rung_head: u16,
    phase: bool,
    unrung: bool,
    /// The head doorbell.
    pub doorbell: Doorbell,
}

impl CompletionQueue {
    /// A zeroed queue of `entries` (2..=4096) entries: phase 0 everywhere, so the first pass
    /// looks for phase 1.
    pub fn new(entries: u16, doorbell: Doorbell) -> Result<Self, NvmeError> {
        let mem = DmaBuffer::new(pages_for(entries, CQE_SIZE)).ok_or(NvmeError::OutOfMemory)?;
        Ok(CompletionQueue {
            mem,
            entries,
            head: 0,
            rung_head: 0,
            phase: true,
            unrung: false,
            doorbell,
        })
    }

    /// Address of the queue (for the controller).
    pub fn addr(&self) -> u64 {
        self.mem.addr()
    }

    /// The entry at the head, if the controller has posted it (copied out once; the status
    /// dword, which carries the phase, is read first).
    pub fn peek(&self) -> Option<CompletionEntry> {
        let base = u64::from(self.head) * CQE_SIZE;
        let dw3: u32 = self.mem.read(base + 12);
        if (dw3 & (1 << 16) != 0) != self.phase {
            return None;
        }
        fence(Ordering::Acquire);
        let dw0: u32 = self.mem.read(base);
        let dw1: u32 = self.mem.read(base + 4);
        let dw2: u32 = self.mem.read(base + 8);
        Some(CompletionEntry::from_dwords([dw0, dw1, dw2, dw3]))
    }

    /// Consumes the head entry (the controller learns at [`Self::ring`]).
    pub fn advance(&mut self) {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.unrung = true;
    }

    /// Gives consumed entries back to the controller.
    pub fn ring(&mut self) {
        if self.unrung {
            self.unrung = false;
            self.rung_head = self.head;
            self.doorbell.write(self.head);
        }
    }

    /// Gives consumed entries back only once half the queue has been consumed since the last
    /// ring. The head doorbell only tells the controller which entries are free again, so a
    /// driver with fewer than half the queue's entries in flight (the admin queue runs one
    /// batch at a time) never lets it see the queue full, and saves a doorbell write (an exit
    /// under emulation) per completion. Call [`Self::ring`] when done to make the controller's
    /// view exact.
    pub fn ring_if_half_consumed(&mut self) {
        let consumed = (self.head + self.entries - self.rung_head) % self.entries;
        if consumed >= self.entries / 2 {
            self.ring();
        }
    }
}
