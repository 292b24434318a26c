//! A scripted virtio driver for the targets that serve virtqueues: split rings written into
//! the client's memory through vm-memory, as a guest would write them, from fuzz input.
//!
//! Layout of queue `n` (each queue's rings 16 KiB after the previous queue's):
//! descriptors at [`DESC`], available ring at [`AVAIL`], used ring at [`USED`]; indirect
//! tables anywhere, conventionally at [`TABLE`]; buffers from [`DATA`] up.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::{Input, Seed};
use ddvm::memory::GuestMem;

/// Descriptor table of queue 0.
pub const DESC: u64 = 0x1000;
/// Available ring of queue 0.
pub const AVAIL: u64 = 0x2000;
/// Used ring of queue 0.
pub const USED: u64 = 0x3000;
/// Distance between the rings of one queue and the next.
pub const QUEUE_STRIDE: u64 = 0x4000;
/// Where seeds put indirect tables.
pub const TABLE: u64 = 0x10000;
/// Where seeds put buffers.
pub const DATA: u64 = 0x20000;

/// VIRTQ_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT.
pub const F_INDIRECT: u16 = 4;

/// One queue's driver side.
pub struct Driver {
    /// The client's memory.
    pub mem: GuestMem,
    /// Offset of this queue's rings from queue 0's.
    pub rings: u64,
    /// Queue size.
    pub size: u16,
    /// The driver's available index.
    pub avail: u16,
    /// Used entries already looked at.
    pub used_seen: u16,
    /// The available ring as this driver wrote it (flags, index, entries, used_event).
    avail_shadow: Vec<u8>,
}

impl Driver {
    /// The driver of queue `n` (size `size`) in `mem`.
    pub fn new(mem: GuestMem, n: u16, size: u16) -> Driver {
        Driver {
            mem,
            rings: u64::from(n) * QUEUE_STRIDE,
            size,
            avail: 0,
            used_seen: 0,
            avail_shadow: vec![0; 6 + 2 * usize::from(size)],
        }
    }

    /// Whether the available ring still holds what this driver wrote: the device (a read's
    /// data, a received frame) or a stray write may have put heads there that the driver
    /// never made available, and then what comes back cannot be checked against them.
    pub fn avail_intact(&self) -> bool {
        let mut now = vec![0u8; self.avail_shadow.len()];
        let at = GuestAddress(AVAIL + self.rings);
        self.mem.read_slice(&mut now, at).is_ok() && now == self.avail_shadow
    }

    /// Takes the available ring as it is now for what this driver wrote (at a device reset,
    /// when the device starts again from index 0 whatever the ring held).
    pub fn adopt_avail(&mut self) {
        let at = GuestAddress(AVAIL + self.rings);
        if self.mem.read_slice(&mut self.avail_shadow, at).is_err() {
            self.avail_shadow.fill(0);
        }
    }

    fn shadow(&mut self, offset: usize, bytes: &[u8]) {
        self.avail_shadow[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// The queue as a transport hands it to a device: this size and these rings, ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two queue size");
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(DESC + self.rings))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(AVAIL + self.rings))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(USED + self.rings))
            .expect("aligned");
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i` of the table at `table`, unless its buffer overlaps a used ring:
    /// the device would write a read's data or a received frame over the ring the targets
    /// read back (the driver's own doing, which they cannot tell from a wrong answer).
    pub fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let end = addr.saturating_add(u64::from(len));
        if (0..8u64).any(|n| {
            let used = USED + n * QUEUE_STRIDE;
            addr < used + 0x1000 && end > used
        }) {
            return;
        }
        let at = table + u64::from(i) * 16;
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&d, GuestAddress(at));
    }

    /// Writes descriptor `i` of this queue's table (modulo the queue size).
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(DESC + self.rings, i % self.size, addr, len, flags, next);
    }

    /// Makes `head` available (one entry, then the index).
    pub fn publish(&mut self, head: u16) {
        let entry = 4 + usize::from(self.avail % self.size) * 2;
        let _ = self
            .mem
            .write_obj(head, GuestAddress(AVAIL + self.rings + entry as u64));
        self.shadow(entry, &head.to_le_bytes());
        self.avail = self.avail.wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.avail, GuestAddress(AVAIL + self.rings + 2));
        self.shadow(2, &self.avail.to_le_bytes());
    }

    /// Sets the available index to anything (a driver that lies about it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail = idx;
        let _ = self
            .mem
            .write_obj(idx, GuestAddress(AVAIL + self.rings + 2));
        self.shadow(2, &idx.to_le_bytes());
    }

    /// Sets `used_event` (EVENT_IDX), after the available ring.
    pub fn set_used_event(&mut self, v: u16) {
        let offset = 4 + 2 * usize::from(self.size);
        let at = AVAIL + self.rings + offset as u64;
        let _ = self.mem.write_obj(v, GuestAddress(at));
        self.shadow(offset, &v.to_le_bytes());
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED + self.rings + 2))
            .unwrap_or(0)
    }

    /// Used entries not yet looked at: (id, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = USED + self.rings + 4 + u64::from(self.used_seen % self.size) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap_or(u32::MAX);
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap_or(u32::MAX);
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// One driver step read from `input`, by `op` (0 to [`DRIVER_OPS`] - 1): write a
    /// descriptor, an indirect table entry or bytes of memory (never a used ring), or
    /// publish a head. Returns what a target that counts the heads it is owed must know.
    pub fn step(&mut self, op: u8, input: &mut Input) -> Option<Step> {
        match op % DRIVER_OPS {
            0 => {
                let (i, addr, len, flags, next) = (
                    input.u16(),
                    input.u64(),
                    input.u32(),
                    input.u16(),
                    input.u16(),
                );
                self.desc(i, addr, len, flags, next);
                None
            }
            1 => {
                let (i, addr, len, flags, next) = (
                    input.u16(),
                    input.u64(),
                    input.u32(),
                    input.u16(),
                    input.u16(),
                );
                self.desc_at(TABLE, i % 4096, addr, len, flags, next);
                None
            }
            2 => {
                let head = input.u16();
                self.publish(head);
                Some(Step::Published(head))
            }
            _ => {
                let at = u64::from(input.u32());
                let bytes = input.blob();
                // Anywhere but a used ring, which only the device writes (the targets read
                // back what it answered). A write over an available ring (its index, its
                // entries) makes heads available behind the targets' backs: they are told.
                let end = at + bytes.len() as u64;
                let overlaps = |from: u64, to: u64| at < to && end > from;
                // Nor a descriptor table (ops 0 and 1 write those, and keep buffers off the
                // used rings).
                let hits = (0..8u64).any(|n| {
                    let used = USED + n * QUEUE_STRIDE;
                    let desc = DESC + n * QUEUE_STRIDE;
                    overlaps(used, used + 0x1000) || overlaps(desc, desc + 0x1000)
                }) || overlaps(TABLE, TABLE + 0x1_0000);
                if hits {
                    return None;
                }
                let _ = self.mem.write_slice(bytes, GuestAddress(at));
                let rings = (0..8u64)
                    .filter(|&n| {
                        let avail = AVAIL + n * QUEUE_STRIDE;
                        overlaps(avail, avail + 0x1000)
                    })
                    .fold(0u8, |mask, n| mask | 1 << n);
                (rings != 0).then_some(Step::AvailRings(rings))
            }
        }
    }
}

/// What a driver step did that a target counting its heads must know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// This head was made available.
    Published(u16),
    /// The available rings of these queues (a bit each) were written directly: what the
    /// device takes from them is no longer known.
    AvailRings(u8),
}

/// Ops [`Driver::step`] takes.
pub const DRIVER_OPS: u8 = 4;

/// Seeds of [`Driver::step`]: what each op reads, in order.
pub trait SeedDriver {
    /// Op 0: descriptor `i` of the queue's table.
    fn desc(&mut self, op: u8, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> &mut Self;
    /// Op 1: entry `i` of the indirect table at [`TABLE`].
    fn indirect(&mut self, op: u8, i: u16, addr: u64, len: u32, flags: u16, next: u16)
        -> &mut Self;
    /// Op 2: publish `head`.
    fn publish(&mut self, op: u8, head: u16) -> &mut Self;
    /// Op 3: write `bytes` at `at`.
    fn poke(&mut self, op: u8, at: u32, bytes: &[u8]) -> &mut Self;
}

impl SeedDriver for Seed {
    fn desc(&mut self, op: u8, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> &mut Self {
        self.u8(op).u16(i).u64(addr).u32(len).u16(flags).u16(next)
    }
    fn indirect(
        &mut self,
        op: u8,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.desc(op, i, addr, len, flags, next)
    }
    fn publish(&mut self, op: u8, head: u16) -> &mut Self {
        self.u8(op).u16(head)
    }
    fn poke(&mut self, op: u8, at: u32, bytes: &[u8]) -> &mut Self {
        self.u8(op).u32(at).blob(bytes)
    }
}
