//! The block device class ([`class::BLK`]): what a block channel adds to the generic one.
//!
//! Requests address 512-byte sectors whatever the device's block size; the device info says
//! the capacity, the block size requests must be aligned to, the largest transfer and what the
//! device can do ([`device_flags`]). Completions, their status codes, the rings, the header
//! and the fault words are the generic ones of [`super`].
//!
//! [`class::BLK`]: super::class::BLK

use super::{u16_at, u32_at, u64_at, Entry, REQUEST_SIZE};
use crate::assert_abi_size;

/// What the domain tells the VMM about its block device, written at
/// [`DEVICE_INFO_OFFSET`](super::DEVICE_INFO_OFFSET)
/// before it marks itself ready.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size of the device in bytes (512 or 4096): requests must be aligned to it.
    pub block_size: u32,
    /// [`device_flags`].
    pub flags: u32,
    /// Largest data length of one request the domain accepts (at most the header's).
    pub max_transfer: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Device serial number, ASCII, space or NUL padded.
    pub serial: [u8; 20],
    /// Device model, ASCII, space or NUL padded.
    pub model: [u8; 40],
    /// Reserved, zero.
    pub reserved2: [u8; 44],
}
assert_abi_size!(DeviceInfo, 128);

impl Default for DeviceInfo {
    fn default() -> Self {
        DeviceInfo {
            capacity_sectors: 0,
            block_size: 0,
            flags: 0,
            max_transfer: 0,
            reserved: 0,
            serial: [0; 20],
            model: [0; 40],
            reserved2: [0; 44],
        }
    }
}

/// `DeviceInfo::flags`.
pub mod device_flags {
    /// The device has a volatile write cache: writes are durable only after a flush.
    pub const VOLATILE_WRITE_CACHE: u32 = 1 << 0;
    /// The device supports deallocate (discard).
    pub const DISCARD: u32 = 1 << 1;
    /// The device supports write zeroes.
    pub const WRITE_ZEROES: u32 = 1 << 2;
}

/// Request operations.
pub mod op {
    /// Read `sectors` into the data slot.
    pub const READ: u16 = 1;
    /// Write `sectors` from the data slot.
    pub const WRITE: u16 = 2;
    /// Make every completed write durable.
    pub const FLUSH: u16 = 3;
    /// Zero `sectors` (no data).
    pub const WRITE_ZEROES: u16 = 4;
    /// Deallocate `sectors` (no data).
    pub const DISCARD: u16 = 5;
    /// Orderly stop (no range, no data): once every request taken before it has completed,
    /// make every completed write durable and shut the device down as its specification
    /// says (NVMe: a Flush, then the normal shutdown notification, CC.SHN = 01b, until
    /// CSTS.SHST = 10b). Completes `OK` only when both succeeded. The domain takes no
    /// requests after it: later ones complete `IO_ERROR`. A domain that does not know it
    /// completes it `UNSUPPORTED`.
    pub const SHUTDOWN: u16 = 6;
}

/// A block request, VMM → domain: one [`REQUEST_SIZE`]-byte request ring entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// VMM-chosen tag, unique among requests in flight.
    pub tag: u32,
    /// One of [`op`].
    pub op: u16,
    /// Reserved, zero.
    pub flags: u16,
    /// First 512-byte sector.
    pub sector: u64,
    /// Number of 512-byte sectors.
    pub sectors: u32,
    /// Bytes of data in the slot (reads and writes: `sectors * 512`; others 0).
    pub len: u32,
    /// Offset of the data slot from the channel start.
    pub data: u64,
}

impl Entry for Request {
    const SIZE: u64 = REQUEST_SIZE;
    type Bytes = [u8; 32];
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.tag.to_le_bytes());
        b[4..6].copy_from_slice(&self.op.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b[16..20].copy_from_slice(&self.sectors.to_le_bytes());
        b[20..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.data.to_le_bytes());
        b
    }
    fn decode(b: &[u8; 32]) -> Self {
        Request {
            tag: u32_at(b, 0),
            op: u16_at(b, 4),
            flags: u16_at(b, 6),
            sector: u64_at(b, 8),
            sectors: u32_at(b, 16),
            len: u32_at(b, 20),
            data: u64_at(b, 24),
        }
    }
}

const _: () = assert!(core::mem::size_of::<DeviceInfo>() as u64 <= super::DEVICE_INFO_MAX);
