//! Descriptor rings of legacy 16-byte descriptors in DMA memory, and the caller's token for
//! each descriptor in flight.
//!
//! A ring of `n` descriptors holds up to `n - 1` in flight: the driver owns `head..tail`
//! (submitted, not yet completed) and the device's head runs behind `tail`. Descriptors are
//! written with volatile copies and each write-back is copied once into a private value before
//! it is looked at.

#![forbid(unsafe_code)]

use alloc::vec;
use alloc::vec::Vec;

use guest_kernel::dma::DmaBuffer;

use super::error::E1000Error;

/// Bytes of one descriptor.
pub const DESCRIPTOR_SIZE: u64 = 16;
/// Most descriptors in a ring: one page.
pub const MAX_DESCRIPTORS: u16 = 256;

/// Legacy transmit descriptor command bits.
pub mod txcmd {
    /// End of packet.
    pub const EOP: u8 = 1 << 0;
    /// Insert the FCS.
    pub const IFCS: u8 = 1 << 1;
    /// Report status (write DD back).
    pub const RS: u8 = 1 << 3;
}

/// Descriptor status bits (both directions).
pub mod stat {
    /// Descriptor done.
    pub const DD: u8 = 1 << 0;
    /// Receive: end of packet.
    pub const EOP: u8 = 1 << 1;
    /// Transmit: excess collisions.
    pub const EC: u8 = 1 << 1;
    /// Transmit: late collision.
    pub const LC: u8 = 1 << 2;
}

/// What a descriptor's write-back says, copied out of DMA memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteBack {
    /// Length (receive: bytes written).
    pub length: u16,
    /// Status byte.
    pub status: u8,
    /// Errors byte (receive).
    pub errors: u8,
}

/// A ring and the tokens of its descriptors in flight.
#[derive(Debug)]
pub struct Ring {
    mem: DmaBuffer,
    tokens: Vec<u64>,
    /// Oldest descriptor in flight.
    head: u16,
    /// Next descriptor to fill.
    tail: u16,
    /// The tail the device was last told.
    told: u16,
}

impl Ring {
    /// A ring of `descriptors` (a multiple of 8 from 8 to [`MAX_DESCRIPTORS`]), zeroed.
    pub fn new(descriptors: u16) -> Result<Self, E1000Error> {
        debug_assert!(
            descriptors.is_multiple_of(8) && (8..=MAX_DESCRIPTORS).contains(&descriptors)
        );
        let mem = DmaBuffer::new(1).ok_or(E1000Error::OutOfMemory)?;
        Ok(Ring {
            mem,
            tokens: vec![0; usize::from(descriptors)],
            head: 0,
            tail: 0,
            told: 0,
        })
    }

    /// The address the device is given.
    pub fn addr(&self) -> u64 {
        self.mem.addr()
    }

    /// Descriptors in the ring.
    pub fn len(&self) -> u16 {
        self.tokens.len() as u16
    }

    /// The ring's length in bytes (RDLEN/TDLEN).
    pub fn bytes(&self) -> u32 {
        u32::from(self.len()) * DESCRIPTOR_SIZE as u32
    }

    /// Descriptors that can be in flight at once.
    pub fn capacity(&self) -> usize {
        usize::from(self.len()) - 1
    }

    /// Descriptors in flight.
    pub fn in_flight(&self) -> usize {
        usize::from((self.tail + self.len() - self.head) % self.len())
    }

    /// The oldest descriptor in flight.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The tail to tell the device, if it moved since it was last told.
    pub fn untold(&mut self) -> Option<u16> {
        if self.told == self.tail {
            return None;
        }
        self.told = self.tail;
        Some(self.tail)
    }

    /// Fills the next descriptor with `addr` and the upper quadword `upper`, keeps `token`.
    /// The caller checked there is room.
    pub fn push(&mut self, addr: u64, upper: u64, token: u64) {
        let at = u64::from(self.tail) * DESCRIPTOR_SIZE;
        self.mem.write::<u64>(at, addr);
        self.mem.write::<u64>(at + 8, upper);
        self.tokens[usize::from(self.tail)] = token;
        self.tail = (self.tail + 1) % self.len();
    }

    /// The oldest in-flight descriptor's write-back, if there is one in flight.
    pub fn peek(&self) -> Option<WriteBack> {
        if self.head == self.tail {
            return None;
        }
        // One copy of the device-written quadword, then only the copy is looked at.
        let upper = self
            .mem
            .read::<u64>(u64::from(self.head) * DESCRIPTOR_SIZE + 8);
        Some(WriteBack {
            length: upper as u16,
            status: (upper >> 32) as u8,
            errors: (upper >> 40) as u8,
        })
    }

    /// Retires the oldest in-flight descriptor; returns its token.
    pub fn pop(&mut self) -> u64 {
        let token = self.tokens[usize::from(self.head)];
        self.head = (self.head + 1) % self.len();
        token
    }
}
