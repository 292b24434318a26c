//! Submission and completion queues in domain memory, and the entries that travel on them.
//!
//! Queue geometry is validated when a queue is created (contiguous, inside the DMA window), and
//! indexes the driver gives (doorbells) are validated before they are stored, so `head`/`tail`
//! are always below `size` here.

use std::sync::atomic::Ordering;

use super::status::Status;
use crate::dma::{DmaError, DmaWindow};

/// Bytes per submission queue entry.
pub const SQE_SIZE: u64 = 64;
/// Bytes per completion queue entry.
pub const CQE_SIZE: u64 = 16;

/// A submission queue entry, copied out of domain memory once and decoded (never re-read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation (must be 0: fused commands are not supported).
    pub fuse: u8,
    /// PRP or SGL (must be 0: PRPs only).
    pub psdt: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2.
    pub prp2: u64,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

impl Command {
    /// Decodes a 64-byte entry.
    pub fn parse(raw: &[u8; SQE_SIZE as usize]) -> Command {
        let d = |i: usize| {
            u32::from_le_bytes([raw[i * 4], raw[i * 4 + 1], raw[i * 4 + 2], raw[i * 4 + 3]])
        };
        let q = |i: usize| u64::from(d(i)) | (u64::from(d(i + 1)) << 32);
        let dw0 = d(0);
        Command {
            opcode: dw0 as u8,
            fuse: ((dw0 >> 8) & 0x3) as u8,
            psdt: ((dw0 >> 14) & 0x3) as u8,
            cid: (dw0 >> 16) as u16,
            nsid: d(1),
            prp1: q(6),
            prp2: q(8),
            cdw: [d(10), d(11), d(12), d(13), d(14), d(15)],
        }
    }

    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.cdw.get(n.wrapping_sub(10)).copied().unwrap_or(0)
    }

    /// Encodes the entry (used by the test driver).
    pub fn to_bytes(&self) -> [u8; SQE_SIZE as usize] {
        let mut b = [0u8; SQE_SIZE as usize];
        let dw0 = u32::from(self.opcode)
            | (u32::from(self.fuse) << 8)
            | (u32::from(self.psdt) << 14)
            | (u32::from(self.cid) << 16);
        b[0..4].copy_from_slice(&dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (i, v) in self.cdw.iter().enumerate() {
            b[40 + i * 4..44 + i * 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// A completion to post.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Submission queue head after fetching the command.
    pub sqhd: u16,
    /// Submission queue the command came from.
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status.
    pub status: Status,
}

/// A submission queue.
#[derive(Clone, Debug)]
pub struct SubQueue {
    /// Base address (page aligned, inside the DMA window).
    pub base: u64,
    /// Number of entries (2..=max).
    pub size: u16,
    /// Next entry the controller fetches.
    pub head: u16,
    /// Tail the driver last gave.
    pub tail: u16,
    /// Completion queue this queue posts to.
    pub cqid: u16,
    /// Last raw value seen in the shadow doorbell (bad values are counted once).
    pub shadow_seen: u32,
}

impl SubQueue {
    /// A fresh queue (head = tail = 0).
    pub fn new(base: u64, size: u16, cqid: u16) -> SubQueue {
        SubQueue {
            base,
            size,
            head: 0,
            tail: 0,
            cqid,
            shadow_seen: 0,
        }
    }

    /// Whether commands are waiting.
    pub fn has_work(&self) -> bool {
        self.head != self.tail
    }

    /// Copies the entry at `head` out of domain memory and advances `head`.
    pub fn fetch(&mut self, dma: &DmaWindow) -> Result<Command, DmaError> {
        let mut raw = [0u8; SQE_SIZE as usize];
        dma.read(self.base + u64::from(self.head) * SQE_SIZE, &mut raw)?;
        self.head = (self.head + 1) % self.size;
        Ok(Command::parse(&raw))
    }
}

/// A completion queue.
#[derive(Clone, Debug)]
pub struct CompQueue {
    /// Base address (page aligned, inside the DMA window).
    pub base: u64,
    /// Number of entries (2..=max).
    pub size: u16,
    /// Head the driver last gave.
    pub head: u16,
    /// Next entry the controller writes.
    pub tail: u16,
    /// Phase tag of the pass the controller is writing.
    pub phase: bool,
    /// Last raw value seen in the shadow doorbell.
    pub shadow_seen: u32,
    /// The MSI-X vector raised after completions are posted, if interrupts are enabled (IEN).
    pub vector: Option<u16>,
}

impl CompQueue {
    /// A fresh queue (head = tail = 0, phase 1) signalling `vector` (None: IEN = 0).
    pub fn new(base: u64, size: u16, vector: Option<u16>) -> CompQueue {
        CompQueue {
            base,
            size,
            head: 0,
            tail: 0,
            phase: true,
            shadow_seen: 0,
            vector,
        }
    }

    /// Whether one more completion would overwrite an entry the driver has not consumed.
    pub fn is_full(&self) -> bool {
        self.free() == 0
    }

    /// Completions that can be posted before the queue is full.
    pub fn free(&self) -> usize {
        let used = (usize::from(self.tail) + usize::from(self.size) - usize::from(self.head))
            % usize::from(self.size);
        usize::from(self.size) - 1 - used
    }

    /// Writes `c` at the tail: dwords 0 to 2 first, then dword 3 (status and phase) with
    /// release ordering, so a driver polling the phase tag never sees a half-written entry.
    /// The caller checks `is_full` first.
    pub fn post(&mut self, dma: &DmaWindow, c: &Completion) -> Result<(), DmaError> {
        let at = self.base + u64::from(self.tail) * CQE_SIZE;
        let mut head = [0u8; 12];
        head[0..4].copy_from_slice(&c.dw0.to_le_bytes());
        head[8..10].copy_from_slice(&c.sqhd.to_le_bytes());
        head[10..12].copy_from_slice(&c.sqid.to_le_bytes());
        dma.write(at, &head)?;
        let dw3 = u32::from(c.cid) | (u32::from(c.status.field() | u16::from(self.phase)) << 16);
        dma.store_u32(at + 12, dw3, Ordering::Release)?;
        self.tail = (self.tail + 1) % self.size;
        if self.tail == 0 {
            self.phase = !self.phase;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    #[test]
    fn command_round_trips() {
        let c = Command {
            opcode: 0x02,
            fuse: 0,
            psdt: 0,
            cid: 0xbeef,
            nsid: 1,
            prp1: 0x1234_5000,
            prp2: 0xdead_0000_1000,
            cdw: [1, 2, 3, 4, 5, 6],
        };
        assert_eq!(Command::parse(&c.to_bytes()), c);
        assert_eq!(c.cdw(12), 3);
        assert_eq!(c.cdw(3), 0);
    }

    #[test]
    fn completion_queue_wraps_and_flips_phase() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dma = DmaWindow::new(mem.clone());
        let mut cq = CompQueue::new(0x1000, 2, None);
        let c = Completion {
            dw0: 7,
            sqhd: 1,
            sqid: 0,
            cid: 9,
            status: Status::SUCCESS,
        };
        cq.post(&dma, &c).unwrap();
        assert!(cq.is_full());
        let dw3: u32 = mem.read_obj(GuestAddress(0x100c)).unwrap();
        assert_eq!(dw3, 0x0001_0009);
        cq.head = 1;
        cq.post(&dma, &c).unwrap();
        assert_eq!((cq.tail, cq.phase), (0, false));
    }
}
