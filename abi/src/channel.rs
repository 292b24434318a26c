//! The channel between the VMM and a driver domain.
//!
//! One region inside the domain's memory, at the address given in the boot info:
//!
//! ```text
//! 0x0000  ChannelHeader (VMM: magic, version, class, epoch, geometry; domain: state, ...)
//! 0x0100  device info of the class (domain, before it marks itself ready)
//! req     request ring:    RingIndex (producer = VMM, consumer = domain) + request entries
//! cpl     completion ring: RingIndex (producer = domain, consumer = VMM) + Completion entries
//! data    bounce area: request data, addressed by offset from the channel start
//! ```
//!
//! Rings are single-producer single-consumer with free-running `u32` indices. Each side keeps
//! its own index privately as the truth and only *reads* the peer's index, validating it
//! against what is possible (see [`ring`]); the peer can write anything at any time.
//!
//! This module is what every device class shares: the header and its [`class`] field, the
//! domain [`state`], the [`fault`] words, the notification flags ([`vmm_flags`],
//! [`domain_flags`]), the rings, the [`Completion`] entry and its [`status`] codes. A class
//! adds its device info (at [`DEVICE_INFO_OFFSET`], at most [`DEVICE_INFO_MAX`] bytes), its
//! request entry ([`REQUEST_SIZE`] bytes, starting with the tag, the operation and its flags)
//! and its operations, in a module of its own: [`blk`] for block devices, [`net`] for NICs.

use crate::assert_abi_size;

pub mod blk;
pub mod net;

/// `ChannelHeader::magic`.
pub const CHANNEL_MAGIC: u32 = 0x6464_6368; // "ddch"
/// `ChannelHeader::version`. 3: the header names the device class (`class`).
pub const CHANNEL_VERSION: u32 = 3;

/// Offset of the class's device info in the channel (block: [`blk::DeviceInfo`]).
pub const DEVICE_INFO_OFFSET: u64 = 0x100;
/// Most bytes a class's device info may take (it ends before the rings).
pub const DEVICE_INFO_MAX: u64 = HEADER_AREA - DEVICE_INFO_OFFSET;
/// Bytes reserved at the start of the channel for the header and device info.
pub const HEADER_AREA: u64 = 0x1000;
/// Bytes of one request ring entry, whatever the class: the tag (`u32`), the operation
/// (`u16`) and its flags (`u16`), then 24 bytes the class defines (block: [`blk::Request`]).
pub const REQUEST_SIZE: u64 = 32;

/// Device classes, written by the VMM into `ChannelHeader::class`. A domain serves the
/// classes it has a channel service for and fails at boot on any other (it marks the channel
/// failed and panics naming the class); the VMM opens a channel only as the class it wrote.
pub mod class {
    /// Block devices: requests address 512-byte sectors ([`super::blk`]).
    pub const BLK: u32 = 1;
    /// Network devices: frames through VMM-owned slots ([`super::net`]).
    pub const NET: u32 = 2;

    /// A class's name, for messages.
    pub fn name(class: u32) -> &'static str {
        match class {
            BLK => "blk",
            NET => "net",
            _ => "unknown",
        }
    }
}

/// Domain states written by the domain into `ChannelHeader::state`.
pub mod state {
    /// Booting: the VMM wrote the header, the domain has not taken it yet.
    pub const BOOTING: u32 = 0;
    /// The domain has initialised its device and serves the rings.
    pub const READY: u32 = 1;
    /// The domain saw an error it cannot recover from and is about to panic.
    pub const FAILED: u32 = 2;
}

/// Fault-injection requests the VMM may put in `ChannelHeader::fault` (chaos runs and tests).
/// The domain acts on a non-zero value in its main loop and clears the word first; it reads
/// the request's argument from `ChannelHeader::fault_arg` (written by the VMM before `fault`)
/// when it takes the word.
///
/// Requests 1 to 5 end the domain at once. From 6 on they make the domain misbehave the ways
/// the VMM must survive: break the channel protocol (6 to 9), misprogram the device (10), be
/// slow (11), or corrupt itself at random (12). Unknown requests are logged and ignored.
pub mod fault {
    /// Nothing.
    pub const NONE: u32 = 0;
    /// Call `panic!`.
    pub const PANIC: u32 = 1;
    /// Execute `ud2` (#UD through the IDT).
    pub const INVALID_OPCODE: u32 = 2;
    /// Touch an unmapped address (#PF through the IDT).
    pub const PAGE_FAULT: u32 = 3;
    /// Stop heartbeating and spin forever.
    pub const HANG: u32 = 4;
    /// Load an empty IDT and raise an exception: the CPU cannot deliver it (triple fault,
    /// a shutdown exit).
    pub const TRIPLE_FAULT: u32 = 5;
    /// Scribble on the channel: garbage into the completion ring's entries, into the header
    /// fields and device info the VMM wrote or validated, and into the completion ring's
    /// producer index, which jumps past the ring (the domain keeps counting from there, as if
    /// its own copy of the index had been hit too). The domain then carries on serving.
    /// `fault_arg` selects targets as a mask of [`WILD_WRITE_ENTRIES`], [`WILD_WRITE_HEADER`],
    /// [`WILD_WRITE_PRODUCER`]; 0 means all three.
    /// The VMM sees a ring index violation (producer index too far) at its next poll of the
    /// completion ring when the producer is hit; entries and header garbage must change nothing
    /// it does (it keeps its own copy of what it wrote).
    pub const WILD_WRITE: u32 = 6;
    /// Post a completion for a tag the VMM never gave: `fault_arg`, or `u32::MAX` when 0,
    /// with the current epoch, status OK and length 0 — at once, or as soon as the completion
    /// ring has room beyond what requests in flight need.
    pub const BOGUS_TAG: u32 = 7;
    /// Complete the next request taken claiming `fault_arg` bytes (512 when 0) more than it
    /// had, whatever the device says.
    pub const BOGUS_LEN: u32 = 8;
    /// Complete the next request taken with the epoch `fault_arg` boots back (1 when 0).
    pub const STALE_EPOCH: u32 = 9;
    /// Program the device to DMA outside the domain's memory: the next read or write taken
    /// is submitted with its buffer address `fault_arg` pages past the end of the domain's
    /// memory, instead of its bounce slot. An IOMMU (the VMM's DMA window) refuses it; the
    /// device completes the command with an error, which the domain reports as the request's
    /// completion (`status::IO_ERROR`, `detail` = the NVMe status field), as a buggy driver
    /// would.
    pub const DMA_OUTSIDE: u32 = 10;
    /// Hold back completions: the completion of each of the next `fault_arg >> 16` requests
    /// taken (every request when 0, until the next `SLOW`) is posted `fault_arg & 0xffff`
    /// milliseconds late. `fault_arg` 0 ends a slow period. The domain keeps heartbeating.
    pub const SLOW: u32 = 11;
    /// Flip `fault_arg & 0xffff` bits (1 when 0) chosen at random in the domain's own loaded
    /// image (code, read-only data, data, `.bss`), as SWIFI experiments mutate a driver; the
    /// random generator is seeded with `fault_arg >> 16`, or from the TSC when 0 (the console
    /// names the seed and every flip). The effect is whatever it is: a crash, a hang, garbage
    /// on the channel, or nothing.
    pub const BITFLIP: u32 = 12;
    /// Fail a write: the next write request taken that starts at sector `fault_arg` completes
    /// with `status::IO_ERROR` without reaching the device, as a driver whose command failed
    /// would. Armed before a restarted domain is ready, at the first sector the VMM will
    /// replay, it fails a replayed write (a client's write to those sectors waits for it).
    pub const FAIL_WRITE: u32 = 13;
    /// Fail a flush: the next flush request taken completes with `status::IO_ERROR` without
    /// reaching the device. The VMM treats a failed flush as a failure of the domain (the
    /// writes it should have made durable are replayed on the next one, then flushed again).
    pub const FAIL_FLUSH: u32 = 14;
    /// Flap the link: a network domain rewrites its device info's link word (down, up, ...)
    /// every 10 ms, `fault_arg` times (100 when 0), whatever the NIC's link, then writes the
    /// NIC's own again. An honest domain changes the word at most once per link check
    /// (100 ms); the VMM fails a domain whose word changes more often than twice that rate.
    /// A block domain has no link: ignored.
    pub const LINK_FLAP: u32 = 15;

    /// [`WILD_WRITE`] target: every completion ring entry.
    pub const WILD_WRITE_ENTRIES: u32 = 1 << 0;
    /// [`WILD_WRITE`] target: the header fields the VMM wrote (magic, version, epoch, size,
    /// geometry, `max_transfer`, class) and the device info (which the VMM checks when it sees the
    /// ready mark: garbage there before that is a device-info violation).
    pub const WILD_WRITE_HEADER: u32 = 1 << 1;
    /// [`WILD_WRITE`] target: the completion ring's producer index.
    pub const WILD_WRITE_PRODUCER: u32 = 1 << 2;
}

/// `ChannelHeader::vmm_flags`.
pub mod vmm_flags {
    /// The VMM sleeps until told: after publishing completions, the domain writes the
    /// [`crate::port::NOTIFY`] port. Clear: the VMM is polling, no notification needed.
    pub const NOTIFY_ME: u32 = 1 << 0;
}

/// `ChannelHeader::domain_flags`.
pub mod domain_flags {
    /// The domain is about to wait (or waits): the VMM must kick it after publishing requests.
    /// Clear: the domain polls the request ring, no kick needed.
    pub const WAITING: u32 = 1 << 0;
}

/// Header at the start of the channel. Everything in it may be written by the domain at any
/// time; the VMM copies fields out and validates them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelHeader {
    /// [`CHANNEL_MAGIC`] (VMM).
    pub magic: u32,
    /// [`CHANNEL_VERSION`] (VMM).
    pub version: u32,
    /// Boot generation of the domain, set by the VMM at every boot (VMM).
    pub epoch: u64,
    /// One of [`state`] (domain).
    pub state: u32,
    /// Fault-injection word, see [`fault`] (VMM sets, domain clears).
    pub fault: u32,
    /// The epoch the domain saw when it became ready (domain).
    pub ready_epoch: u64,
    /// Bumped by the domain on every pass of its main loop (domain).
    pub heartbeat: u64,
    /// [`domain_flags`] (domain).
    pub domain_flags: u32,
    /// [`vmm_flags`] (VMM).
    pub vmm_flags: u32,
    /// Total size of the channel in bytes (VMM).
    pub size: u64,
    /// Offset of the request ring (VMM).
    pub req_ring: u32,
    /// Entries of the request ring, a power of two (VMM).
    pub req_entries: u32,
    /// Offset of the completion ring (VMM).
    pub cpl_ring: u32,
    /// Entries of the completion ring, a power of two (VMM).
    pub cpl_entries: u32,
    /// Offset of the data area (VMM).
    pub data: u32,
    /// Size of the data area (VMM).
    pub data_size: u32,
    /// Largest data length of one request (VMM).
    pub max_transfer: u32,
    /// Argument of the fault-injection request in `fault` (VMM; zero when unused). The VMM
    /// writes it before `fault`; the domain reads it when it takes `fault`. This slot was
    /// `reserved0` before fault arguments existed (same offset, the layout is unchanged).
    pub fault_arg: u32,
    /// Device class served over this channel, one of [`class`] (VMM). This slot was reserved
    /// (zero) before version 3.
    pub class: u32,
    /// Reserved, zero.
    pub reserved: [u32; 9],
}
assert_abi_size!(ChannelHeader, 128);

/// Byte offsets of the header fields, for single-field volatile access.
pub mod offset {
    /// `epoch`.
    pub const EPOCH: u64 = 8;
    /// `state`.
    pub const STATE: u64 = 16;
    /// `fault`.
    pub const FAULT: u64 = 20;
    /// `ready_epoch`.
    pub const READY_EPOCH: u64 = 24;
    /// `heartbeat`.
    pub const HEARTBEAT: u64 = 32;
    /// `domain_flags`.
    pub const DOMAIN_FLAGS: u64 = 40;
    /// `vmm_flags`.
    pub const VMM_FLAGS: u64 = 44;
    /// `fault_arg`.
    pub const FAULT_ARG: u64 = 84;
    /// `class`.
    pub const CLASS: u64 = 88;
}

/// Why a channel geometry is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeometryError {
    /// Ring entries zero, not a power of two, or too many.
    RingEntries,
    /// A ring or the data area is outside the channel or overlaps another part.
    Placement,
    /// `max_transfer` zero, not a multiple of 512 or larger than the data area.
    MaxTransfer,
}

/// Largest ring the ABI allows.
pub const MAX_RING_ENTRIES: u32 = 4096;

impl ChannelHeader {
    /// A header as the VMM writes it at boot for a channel of device class `class` (one of
    /// [`class`]), with the standard geometry for a channel of `size` bytes: `entries` in each
    /// ring, the rest of the channel as data area.
    pub fn new(class: u32, epoch: u64, size: u64, entries: u32, max_transfer: u32) -> Self {
        let req_ring = HEADER_AREA;
        let cpl_ring = align_up(req_ring + ring::ring_bytes(entries, REQUEST_SIZE), 4096);
        let data = align_up(cpl_ring + ring::ring_bytes(entries, Completion::SIZE), 4096);
        ChannelHeader {
            magic: CHANNEL_MAGIC,
            version: CHANNEL_VERSION,
            class,
            epoch,
            size,
            req_ring: req_ring as u32,
            req_entries: entries,
            cpl_ring: cpl_ring as u32,
            cpl_entries: entries,
            data: data as u32,
            data_size: size.saturating_sub(data) as u32,
            max_transfer,
            ..Default::default()
        }
    }

    /// Whether the domain has marked itself ready for the VMM's current epoch `epoch`.
    pub fn is_ready_for(&self, epoch: u64) -> bool {
        self.state == state::READY && self.ready_epoch == epoch
    }

    /// Checks the geometry: both sides do before using the rings.
    pub fn check_geometry(&self) -> Result<(), GeometryError> {
        let entries_ok = |n: u32| n.is_power_of_two() && n <= MAX_RING_ENTRIES;
        if !entries_ok(self.req_entries) || !entries_ok(self.cpl_entries) {
            return Err(GeometryError::RingEntries);
        }
        let parts = [
            (
                self.req_ring as u64,
                ring::ring_bytes(self.req_entries, REQUEST_SIZE),
            ),
            (
                self.cpl_ring as u64,
                ring::ring_bytes(self.cpl_entries, Completion::SIZE),
            ),
            (self.data as u64, self.data_size as u64),
        ];
        for (i, &(start, len)) in parts.iter().enumerate() {
            if start < HEADER_AREA || start % 64 != 0 || start + len > self.size {
                return Err(GeometryError::Placement);
            }
            for &(other, olen) in &parts[..i] {
                if start < other + olen && other < start + len {
                    return Err(GeometryError::Placement);
                }
            }
        }
        if self.max_transfer == 0
            || !self.max_transfer.is_multiple_of(512)
            || self.max_transfer > self.data_size
        {
            return Err(GeometryError::MaxTransfer);
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` lies inside the data area.
    pub fn data_range_ok(&self, offset: u64, len: u64) -> bool {
        let start = self.data as u64;
        let end = start + self.data_size as u64;
        offset >= start && offset.checked_add(len).is_some_and(|e| e <= end)
    }
}

const fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// Completion status.
pub mod status {
    /// Done.
    pub const OK: u16 = 0;
    /// The device reported an error (`detail` carries its status).
    pub const IO_ERROR: u16 = 1;
    /// The device cannot do this operation.
    pub const UNSUPPORTED: u16 = 2;
    /// The request itself was malformed (range, alignment, data slot): a VMM bug.
    pub const BAD_REQUEST: u16 = 3;
}

/// A completion, domain → VMM. 16 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Tag of the request.
    pub tag: u32,
    /// One of [`status`].
    pub status: u16,
    /// Device-specific detail (NVMe: status field of the completion entry).
    pub detail: u16,
    /// Bytes transferred.
    pub len: u32,
    /// Low 32 bits of the epoch the domain serves.
    pub epoch: u32,
}

/// Fixed-size entries of a ring, encoded little-endian without unsafe.
pub trait Entry: Sized + Copy {
    /// Encoded size in bytes.
    const SIZE: u64;
    /// Encoded form.
    type Bytes: AsRef<[u8]> + AsMut<[u8]> + Default;
    /// Encodes.
    fn encode(&self) -> Self::Bytes;
    /// Decodes (any bytes decode: validation is the reader's job).
    fn decode(b: &Self::Bytes) -> Self;
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    (u32_at(b, at) as u64) | ((u32_at(b, at + 4) as u64) << 32)
}

impl Entry for Completion {
    const SIZE: u64 = 16;
    type Bytes = [u8; 16];
    fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.tag.to_le_bytes());
        b[4..6].copy_from_slice(&self.status.to_le_bytes());
        b[6..8].copy_from_slice(&self.detail.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }
    fn decode(b: &[u8; 16]) -> Self {
        Completion {
            tag: u32_at(b, 0),
            status: u16_at(b, 4),
            detail: u16_at(b, 6),
            len: u32_at(b, 8),
            epoch: u32_at(b, 12),
        }
    }
}

pub mod ring {
    //! Single-producer single-consumer rings over shared memory.
    //!
    //! A ring at offset `base` of the channel: the producer index (`u32`) at `base`, the
    //! consumer index at `base + 64` (its own cache line), entries from `base + 128`. Indices
    //! are free-running; entry `i` lives in slot `i % entries`.

    use super::Entry;
    use core::marker::PhantomData;

    /// Offset of the producer index from the ring base.
    pub const PRODUCER: u64 = 0;
    /// Offset of the consumer index from the ring base.
    pub const CONSUMER: u64 = 64;
    /// Offset of the first entry from the ring base.
    pub const ENTRIES: u64 = 128;

    /// Bytes a ring of `entries` entries of `size` bytes occupies.
    pub const fn ring_bytes(entries: u32, size: u64) -> u64 {
        ENTRIES + entries as u64 * size
    }

    /// Access to the shared memory holding a ring, by offset from the channel start. The
    /// guest implements it with volatile accesses, the VMM with vm-memory. Index accesses are
    /// single 32-bit loads and stores; `release` orders entry writes before a following index
    /// store, `acquire` orders an index load before following entry reads.
    pub trait SharedMemory {
        /// Loads a 32-bit index.
        fn load_u32(&self, offset: u64) -> u32;
        /// Stores a 32-bit index.
        fn store_u32(&self, offset: u64, value: u32);
        /// Copies bytes out.
        fn read(&self, offset: u64, buf: &mut [u8]);
        /// Copies bytes in.
        fn write(&self, offset: u64, buf: &[u8]);
        /// Fence: earlier writes become visible before later ones.
        fn release(&self);
        /// Fence: earlier reads complete before later ones.
        fn acquire(&self);
    }

    /// An index the peer published that cannot be right.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum IndexError {
        /// The producer index claims more entries than the ring holds.
        ProducerTooFar {
            /// Index read.
            producer: u32,
            /// Our consumer index.
            consumer: u32,
        },
        /// The producer index moved backwards.
        ProducerBackwards {
            /// Index read.
            producer: u32,
            /// Last index seen.
            last: u32,
        },
        /// The consumer index is past what we produced.
        ConsumerPastProducer {
            /// Index read.
            consumer: u32,
            /// Our producer index.
            producer: u32,
        },
        /// The consumer index moved backwards.
        ConsumerBackwards {
            /// Index read.
            consumer: u32,
            /// Last index seen.
            last: u32,
        },
    }

    /// Producer side of a ring.
    pub struct Producer<T: Entry> {
        base: u64,
        entries: u32,
        /// Next index to fill (our truth).
        prod: u32,
        /// Last consumer index seen (validated).
        cons: u32,
        _t: PhantomData<T>,
    }

    impl<T: Entry> Producer<T> {
        /// A producer for the ring at `base` with `entries` entries (a power of two), starting
        /// at index 0. The ring's indices must be zero in shared memory.
        pub fn new(base: u64, entries: u32) -> Self {
            Producer {
                base,
                entries,
                prod: 0,
                cons: 0,
                _t: PhantomData,
            }
        }

        /// A producer resuming at `index` (both indices in shared memory equal `index`).
        pub fn starting_at(base: u64, entries: u32, index: u32) -> Self {
            Producer {
                prod: index,
                cons: index,
                ..Self::new(base, entries)
            }
        }

        /// Our producer index.
        pub fn index(&self) -> u32 {
            self.prod
        }

        /// Reads and validates the consumer's index; returns the free entries.
        pub fn refresh<M: SharedMemory>(&mut self, mem: &M) -> Result<u32, IndexError> {
            let consumer = mem.load_u32(self.base + CONSUMER);
            // The consumer may only move forward, up to our producer index.
            let moved = consumer.wrapping_sub(self.cons);
            let outstanding = self.prod.wrapping_sub(self.cons);
            if moved > outstanding {
                return Err(if consumer.wrapping_sub(self.prod) <= self.entries {
                    IndexError::ConsumerPastProducer {
                        consumer,
                        producer: self.prod,
                    }
                } else {
                    IndexError::ConsumerBackwards {
                        consumer,
                        last: self.cons,
                    }
                });
            }
            mem.acquire();
            self.cons = consumer;
            Ok(self.free())
        }

        /// Free entries as of the last refresh.
        pub fn free(&self) -> u32 {
            self.entries - self.prod.wrapping_sub(self.cons)
        }

        /// Entries produced and not yet consumed as of the last refresh.
        pub fn outstanding(&self) -> u32 {
            self.prod.wrapping_sub(self.cons)
        }

        /// Writes `entry` in the next slot without publishing it; false if the ring is full.
        pub fn push<M: SharedMemory>(&mut self, mem: &M, entry: &T) -> bool {
            if self.free() == 0 {
                return false;
            }
            let slot = (self.prod & (self.entries - 1)) as u64;
            mem.write(
                self.base + ENTRIES + slot * T::SIZE,
                entry.encode().as_ref(),
            );
            self.prod = self.prod.wrapping_add(1);
            true
        }

        /// Makes every pushed entry visible to the consumer.
        pub fn publish<M: SharedMemory>(&self, mem: &M) {
            mem.release();
            mem.store_u32(self.base + PRODUCER, self.prod);
        }
    }

    /// Consumer side of a ring.
    pub struct Consumer<T: Entry> {
        base: u64,
        entries: u32,
        /// Next index to take (our truth).
        cons: u32,
        /// Last producer index seen (validated).
        prod: u32,
        _t: PhantomData<T>,
    }

    impl<T: Entry> Consumer<T> {
        /// A consumer for the ring at `base` with `entries` entries, starting at index 0.
        pub fn new(base: u64, entries: u32) -> Self {
            Consumer {
                base,
                entries,
                cons: 0,
                prod: 0,
                _t: PhantomData,
            }
        }

        /// A consumer resuming at `index` (both indices in shared memory equal `index`).
        pub fn starting_at(base: u64, entries: u32, index: u32) -> Self {
            Consumer {
                cons: index,
                prod: index,
                ..Self::new(base, entries)
            }
        }

        /// Our consumer index.
        pub fn index(&self) -> u32 {
            self.cons
        }

        /// Reads and validates the producer's index; returns the entries available.
        pub fn refresh<M: SharedMemory>(&mut self, mem: &M) -> Result<u32, IndexError> {
            let producer = mem.load_u32(self.base + PRODUCER);
            let available = producer.wrapping_sub(self.cons);
            let before = self.prod.wrapping_sub(self.cons);
            if available < before {
                return Err(IndexError::ProducerBackwards {
                    producer,
                    last: self.prod,
                });
            }
            if available > self.entries {
                return Err(IndexError::ProducerTooFar {
                    producer,
                    consumer: self.cons,
                });
            }
            mem.acquire();
            self.prod = producer;
            Ok(available)
        }

        /// Entries available as of the last refresh.
        pub fn available(&self) -> u32 {
            self.prod.wrapping_sub(self.cons)
        }

        /// Copies out the next available entry (not yet released to the producer).
        pub fn pop<M: SharedMemory>(&mut self, mem: &M) -> Option<T> {
            if self.available() == 0 {
                return None;
            }
            let slot = (self.cons & (self.entries - 1)) as u64;
            let mut b = T::Bytes::default();
            mem.read(self.base + ENTRIES + slot * T::SIZE, b.as_mut());
            self.cons = self.cons.wrapping_add(1);
            Some(T::decode(&b))
        }

        /// Gives every popped slot back to the producer.
        pub fn release<M: SharedMemory>(&self, mem: &M) {
            mem.release();
            mem.store_u32(self.base + CONSUMER, self.cons);
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::blk::{op, Request};
    use super::ring::*;
    use super::*;
    use core::cell::RefCell;
    use core::mem::offset_of;
    use std::vec;
    use std::vec::Vec;

    struct Mem(RefCell<Vec<u8>>);
    impl SharedMemory for Mem {
        fn load_u32(&self, o: u64) -> u32 {
            let m = self.0.borrow();
            u32_at(&m, o as usize)
        }
        fn store_u32(&self, o: u64, v: u32) {
            self.0.borrow_mut()[o as usize..o as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
        fn read(&self, o: u64, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0.borrow()[o as usize..o as usize + buf.len()]);
        }
        fn write(&self, o: u64, buf: &[u8]) {
            self.0.borrow_mut()[o as usize..o as usize + buf.len()].copy_from_slice(buf);
        }
        fn release(&self) {}
        fn acquire(&self) {}
    }

    fn mem() -> Mem {
        Mem(RefCell::new(vec![0; 64 * 1024]))
    }

    fn req(tag: u32) -> Request {
        Request {
            tag,
            op: op::READ,
            sector: tag as u64 * 8,
            sectors: 8,
            len: 4096,
            data: 0x8000,
            ..Default::default()
        }
    }

    #[test]
    fn field_offsets_match_the_published_constants() {
        assert_eq!(offset_of!(ChannelHeader, epoch) as u64, offset::EPOCH);
        assert_eq!(offset_of!(ChannelHeader, state) as u64, offset::STATE);
        assert_eq!(offset_of!(ChannelHeader, fault) as u64, offset::FAULT);
        assert_eq!(
            offset_of!(ChannelHeader, ready_epoch) as u64,
            offset::READY_EPOCH
        );
        assert_eq!(
            offset_of!(ChannelHeader, heartbeat) as u64,
            offset::HEARTBEAT
        );
        assert_eq!(
            offset_of!(ChannelHeader, domain_flags) as u64,
            offset::DOMAIN_FLAGS
        );
        assert_eq!(
            offset_of!(ChannelHeader, vmm_flags) as u64,
            offset::VMM_FLAGS
        );
        assert_eq!(
            offset_of!(ChannelHeader, fault_arg) as u64,
            offset::FAULT_ARG
        );
        assert_eq!(
            offset_of!(ChannelHeader, max_transfer) as u64 + 4,
            offset::FAULT_ARG,
            "fault_arg took the place of reserved0, right after max_transfer"
        );
        assert_eq!(offset_of!(ChannelHeader, class) as u64, offset::CLASS);
        assert_eq!(
            offset::FAULT_ARG + 4,
            offset::CLASS,
            "class took the first reserved word, right after fault_arg"
        );
    }

    #[test]
    fn the_header_names_its_class() {
        let h = ChannelHeader::new(class::BLK, 1, 1 << 20, 64, 128 << 10);
        assert_eq!(h.class, class::BLK);
        assert_eq!(h.version, CHANNEL_VERSION);
        assert_eq!(class::name(h.class), "blk");
        assert_eq!(class::name(class::NET), "net");
        assert_eq!(class::name(0), "unknown");
        assert_eq!(
            Request::SIZE,
            REQUEST_SIZE,
            "a block request is one ring entry"
        );
    }

    #[test]
    fn ready_needs_the_current_epoch() {
        let mut h = ChannelHeader::new(class::BLK, 7, 1 << 20, 64, 128 << 10);
        assert!(!h.is_ready_for(7));
        h.state = state::READY;
        h.ready_epoch = 6;
        assert!(
            !h.is_ready_for(7),
            "a ready mark from an old epoch is stale"
        );
        h.ready_epoch = 7;
        assert!(h.is_ready_for(7));
    }

    #[test]
    fn standard_geometry_is_valid_and_bad_ones_are_refused() {
        let h = ChannelHeader::new(class::BLK, 1, 1 << 20, 64, 128 << 10);
        assert_eq!(h.check_geometry(), Ok(()));
        assert!(h.data_range_ok(h.data as u64, h.data_size as u64));
        assert!(!h.data_range_ok(h.data as u64 - 1, 1));
        assert!(!h.data_range_ok(h.data as u64, h.data_size as u64 + 1));
        assert!(!h.data_range_ok(u64::MAX, 2));
        let mut b = h;
        b.req_entries = 48;
        assert_eq!(b.check_geometry(), Err(GeometryError::RingEntries));
        let mut b = h;
        b.cpl_ring = b.req_ring + 64;
        assert_eq!(b.check_geometry(), Err(GeometryError::Placement));
        let mut b = h;
        b.data_size = u32::MAX;
        assert_eq!(b.check_geometry(), Err(GeometryError::Placement));
        let mut b = h;
        b.max_transfer = 1000;
        assert_eq!(b.check_geometry(), Err(GeometryError::MaxTransfer));
        let tiny = ChannelHeader::new(class::BLK, 1, 8192, 64, 4096);
        assert!(tiny.check_geometry().is_err());
    }

    #[test]
    fn entries_round_trip() {
        let r = req(0xdead_beef);
        assert_eq!(Request::decode(&r.encode()), r);
        let c = Completion {
            tag: 9,
            status: status::IO_ERROR,
            detail: 0x281,
            len: 512,
            epoch: 3,
        };
        assert_eq!(Completion::decode(&c.encode()), c);
    }

    #[test]
    fn empty_full_and_wrap_around() {
        let m = mem();
        let mut p = Producer::<Request>::new(0x1000, 4);
        let mut c = Consumer::<Request>::new(0x1000, 4);
        assert_eq!(c.refresh(&m), Ok(0), "empty");
        assert_eq!(c.pop(&m), None);
        let mut next = 0u32;
        let mut expect = 0u32;
        for round in 0..10 {
            p.refresh(&m).unwrap();
            while p.push(&m, &req(next)) {
                next += 1;
            }
            assert_eq!(p.free(), 0, "full after round {round}");
            p.publish(&m);
            assert_eq!(c.refresh(&m), Ok(4));
            while let Some(r) = c.pop(&m) {
                assert_eq!(r, req(expect));
                expect += 1;
            }
            c.release(&m);
        }
        assert_eq!(expect, 40);
    }

    #[test]
    fn indices_wrap_past_u32_max() {
        let m = mem();
        let start = u32::MAX - 2;
        m.store_u32(0x1000 + PRODUCER, start);
        m.store_u32(0x1000 + CONSUMER, start);
        let mut p = Producer::<Completion>::starting_at(0x1000, 8, start);
        let mut c = Consumer::<Completion>::starting_at(0x1000, 8, start);
        for i in 0..6u32 {
            let entry = Completion {
                tag: i,
                ..Default::default()
            };
            assert!(p.push(&m, &entry));
        }
        p.publish(&m);
        assert_eq!(c.refresh(&m), Ok(6));
        for i in 0..6u32 {
            assert_eq!(c.pop(&m).unwrap().tag, i);
        }
        c.release(&m);
        assert_eq!(p.refresh(&m), Ok(8));
        assert_eq!(c.index(), start.wrapping_add(6));
    }

    #[test]
    fn producer_index_past_the_ring_is_refused() {
        let m = mem();
        let mut c = Consumer::<Request>::new(0x1000, 8);
        m.store_u32(0x1000 + PRODUCER, 9);
        assert_eq!(
            c.refresh(&m),
            Err(IndexError::ProducerTooFar {
                producer: 9,
                consumer: 0
            })
        );
        m.store_u32(0x1000 + PRODUCER, u32::MAX);
        assert!(
            c.refresh(&m).is_err(),
            "an index behind the consumer is garbage"
        );
        assert_eq!(c.available(), 0, "nothing consumed from a refused index");
    }

    #[test]
    fn producer_index_moving_backwards_is_refused() {
        let m = mem();
        let mut c = Consumer::<Request>::new(0x1000, 8);
        m.store_u32(0x1000 + PRODUCER, 5);
        assert_eq!(c.refresh(&m), Ok(5));
        c.pop(&m).unwrap();
        m.store_u32(0x1000 + PRODUCER, 3);
        assert_eq!(
            c.refresh(&m),
            Err(IndexError::ProducerBackwards {
                producer: 3,
                last: 5
            })
        );
    }

    #[test]
    fn consumer_index_past_the_producer_or_backwards_is_refused() {
        let m = mem();
        let mut p = Producer::<Request>::new(0x1000, 8);
        for i in 0..3 {
            assert!(p.push(&m, &req(i)));
        }
        p.publish(&m);
        m.store_u32(0x1000 + CONSUMER, 4);
        assert_eq!(
            p.refresh(&m),
            Err(IndexError::ConsumerPastProducer {
                consumer: 4,
                producer: 3
            })
        );
        m.store_u32(0x1000 + CONSUMER, 2);
        assert_eq!(p.refresh(&m), Ok(7));
        m.store_u32(0x1000 + CONSUMER, 1);
        assert_eq!(
            p.refresh(&m),
            Err(IndexError::ConsumerBackwards {
                consumer: 1,
                last: 2
            })
        );
        assert_eq!(p.free(), 7, "a refused index changes nothing");
    }
}
