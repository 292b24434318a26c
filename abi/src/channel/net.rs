//! The network device class ([`class::NET`]): what a network channel adds to the generic one.
//!
//! The VMM owns every buffer: frames to send and empty buffers for frames to receive are bounce
//! slots of the channel's data area, posted as requests.
//!
//! - [`op::TRANSMIT`]: the slot holds a frame of `len` bytes (destination MAC first, no CRC).
//!   It completes `OK` once the NIC reported the frame sent (at-least-once: the VMM holds the
//!   client's frame until then, and sends it again after a restart), `IO_ERROR` if the NIC
//!   dropped it.
//! - [`op::RECEIVE`]: the slot is an empty buffer of `len` bytes (at least the device info's
//!   `rx_buffer`). It completes `OK` with the frame's length when a frame arrived in it; it
//!   may stay posted indefinitely (waiting for a frame is not a late request). At a shutdown
//!   posted buffers complete `IO_ERROR` with length 0.
//! - [`op::CONFIG`]: the slot holds a [`FilterSet`] of `len` bytes, the receive filters the VMM
//!   computed from every client's configuration. The first request after ready, and again
//!   whenever a client's configuration changes; frames received before it may be dropped.
//! - [`op::SHUTDOWN`]: stop receiving and transmitting; every posted buffer completes, then
//!   this request.
//!
//! The domain never decides which client sees a frame: it hands every frame its filters let
//! through to the VMM, which demultiplexes.
//!
//! Link state is the device info's [`DeviceInfo::link`] word, which the domain rewrites when
//! the link changes; the VMM reads it (and debounces it) like any word the domain writes.
//!
//! [`class::NET`]: super::class::NET

use super::{u16_at, u32_at, u64_at, Entry, REQUEST_SIZE};
use crate::assert_abi_size;

/// Length of a MAC address.
pub const MAC_LEN: usize = 6;

/// What the domain tells the VMM about its NIC, written at
/// [`DEVICE_INFO_OFFSET`](super::DEVICE_INFO_OFFSET) before it marks itself ready.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The NIC's permanent MAC address.
    pub mac: [u8; MAC_LEN],
    /// Reserved, zero.
    pub reserved0: [u8; 2],
    /// Largest frame the NIC sends or receives, without CRC (1514 for an untagged Ethernet
    /// frame).
    pub max_frame: u32,
    /// [`link`] state; rewritten by the domain when the link changes.
    pub link: u32,
    /// Link speed in Mb/s (0 when down or unknown).
    pub speed_mbps: u32,
    /// Exact unicast addresses the NIC filters besides its own (more: it goes promiscuous
    /// for unicast and the VMM drops what no client wants).
    pub unicast_filters: u32,
    /// Smallest receive buffer the domain accepts.
    pub rx_buffer: u32,
    /// Frames the NIC dropped for want of a posted buffer, as its counters say.
    pub rx_missed: u32,
    /// Reserved, zero.
    pub reserved1: u32,
    /// NIC model, ASCII, space or NUL padded.
    pub model: [u8; 40],
    /// Reserved, zero.
    pub reserved2: [u8; 52],
}
assert_abi_size!(DeviceInfo, 128);

impl Default for DeviceInfo {
    fn default() -> Self {
        DeviceInfo {
            mac: [0; MAC_LEN],
            reserved0: [0; 2],
            max_frame: 0,
            link: 0,
            speed_mbps: 0,
            unicast_filters: 0,
            rx_buffer: 0,
            rx_missed: 0,
            reserved1: 0,
            model: [0; 40],
            reserved2: [0; 52],
        }
    }
}

const _: () = assert!(core::mem::size_of::<DeviceInfo>() as u64 <= super::DEVICE_INFO_MAX);

/// Byte offsets of [`DeviceInfo`] fields from the start of the channel, for single-field
/// volatile access.
pub mod offset {
    use super::super::DEVICE_INFO_OFFSET;
    /// `DeviceInfo::link`.
    pub const LINK: u64 = DEVICE_INFO_OFFSET + 12;
    /// `DeviceInfo::rx_missed`.
    pub const RX_MISSED: u64 = DEVICE_INFO_OFFSET + 28;
}

/// `DeviceInfo::link`.
pub mod link {
    /// Link down (or unknown).
    pub const DOWN: u32 = 0;
    /// Link up.
    pub const UP: u32 = 1;
}

/// Request operations.
pub mod op {
    /// Send the frame in the slot.
    pub const TRANSMIT: u16 = 1;
    /// Receive a frame into the slot.
    pub const RECEIVE: u16 = 2;
    /// Apply the [`super::FilterSet`] in the slot.
    pub const CONFIG: u16 = 3;
    /// Orderly stop (no data): every posted buffer completes, then this request.
    pub const SHUTDOWN: u16 = 4;
}

/// A network request, VMM → domain: one [`REQUEST_SIZE`]-byte request ring entry. `len` and
/// `data` sit where a block request has them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// VMM-chosen tag, unique among requests in flight.
    pub tag: u32,
    /// One of [`op`].
    pub op: u16,
    /// Reserved, zero.
    pub flags: u16,
    /// Transmit: the frame's length; receive: the buffer's size; config: the filter set's
    /// encoded length.
    pub len: u32,
    /// Offset of the slot from the channel start.
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
        b[20..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.data.to_le_bytes());
        b
    }
    fn decode(b: &[u8; 32]) -> Self {
        Request {
            tag: u32_at(b, 0),
            op: u16_at(b, 4),
            flags: u16_at(b, 6),
            len: u32_at(b, 20),
            data: u64_at(b, 24),
        }
    }
}

/// `FilterSet::flags`.
pub mod filter_flags {
    /// Every unicast frame.
    pub const PROMISCUOUS: u32 = 1 << 0;
    /// Every multicast frame.
    pub const ALL_MULTICAST: u32 = 1 << 1;
    /// Broadcast frames.
    pub const BROADCAST: u32 = 1 << 2;
}

/// Most unicast or multicast addresses one [`FilterSet`] carries.
pub const MAX_FILTER_ADDRESSES: usize = 64;
/// Largest encoded [`FilterSet`].
pub const MAX_FILTER_SET_LEN: usize = 8 + 2 * MAX_FILTER_ADDRESSES * MAC_LEN;

/// The receive filters of a NIC, as the VMM computes them from its clients: encoded as
/// `flags: u32`, `unicast: u16` (count), `multicast: u16` (count), then the unicast addresses,
/// then the multicast ones, 6 bytes each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterSet {
    /// [`filter_flags`].
    pub flags: u32,
    /// Unicast addresses to accept (the clients' MACs).
    pub unicast: heapless_macs::Macs,
    /// Multicast addresses to accept.
    pub multicast: heapless_macs::Macs,
}

/// A bounded list of MAC addresses without allocation (the ABI crate is `no_std` without
/// `alloc` for its users that have none).
pub mod heapless_macs {
    use super::{MAC_LEN, MAX_FILTER_ADDRESSES};

    /// At most [`MAX_FILTER_ADDRESSES`] MAC addresses.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct Macs {
        len: usize,
        macs: [[u8; MAC_LEN]; MAX_FILTER_ADDRESSES],
    }

    impl Default for Macs {
        fn default() -> Self {
            Macs {
                len: 0,
                macs: [[0; MAC_LEN]; MAX_FILTER_ADDRESSES],
            }
        }
    }

    impl core::fmt::Debug for Macs {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_list().entries(self.as_slice()).finish()
        }
    }

    impl Macs {
        /// Adds `mac`; false when full.
        pub fn push(&mut self, mac: [u8; MAC_LEN]) -> bool {
            if self.len == MAX_FILTER_ADDRESSES {
                return false;
            }
            self.macs[self.len] = mac;
            self.len += 1;
            true
        }
        /// The addresses.
        pub fn as_slice(&self) -> &[[u8; MAC_LEN]] {
            &self.macs[..self.len]
        }
        /// How many.
        pub fn len(&self) -> usize {
            self.len
        }
        /// None at all.
        pub fn is_empty(&self) -> bool {
            self.len == 0
        }
    }
}

/// Why an encoded [`FilterSet`] is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterSetError {
    /// Shorter than its header, or than its counts say, or longer.
    Length,
    /// More addresses than [`MAX_FILTER_ADDRESSES`] of a kind.
    TooMany,
    /// Flags this version does not know.
    Flags,
}

impl FilterSet {
    /// Encodes into `out`; returns the length used (at most [`MAX_FILTER_SET_LEN`]).
    pub fn encode(&self, out: &mut [u8; MAX_FILTER_SET_LEN]) -> usize {
        out[0..4].copy_from_slice(&self.flags.to_le_bytes());
        out[4..6].copy_from_slice(&(self.unicast.len() as u16).to_le_bytes());
        out[6..8].copy_from_slice(&(self.multicast.len() as u16).to_le_bytes());
        let mut at = 8;
        for mac in self
            .unicast
            .as_slice()
            .iter()
            .chain(self.multicast.as_slice())
        {
            out[at..at + MAC_LEN].copy_from_slice(mac);
            at += MAC_LEN;
        }
        at
    }

    /// Decodes `b` exactly (its length must be what the counts say).
    pub fn decode(b: &[u8]) -> Result<FilterSet, FilterSetError> {
        if b.len() < 8 {
            return Err(FilterSetError::Length);
        }
        let flags = u32_at(b, 0);
        let known =
            filter_flags::PROMISCUOUS | filter_flags::ALL_MULTICAST | filter_flags::BROADCAST;
        if flags & !known != 0 {
            return Err(FilterSetError::Flags);
        }
        let (nu, nm) = (u16_at(b, 4) as usize, u16_at(b, 6) as usize);
        if nu > MAX_FILTER_ADDRESSES || nm > MAX_FILTER_ADDRESSES {
            return Err(FilterSetError::TooMany);
        }
        if b.len() != 8 + (nu + nm) * MAC_LEN {
            return Err(FilterSetError::Length);
        }
        let mut set = FilterSet {
            flags,
            ..FilterSet::default()
        };
        for i in 0..nu + nm {
            let at = 8 + i * MAC_LEN;
            let mut mac = [0u8; MAC_LEN];
            mac.copy_from_slice(&b[at..at + MAC_LEN]);
            let list = if i < nu {
                &mut set.unicast
            } else {
                &mut set.multicast
            };
            list.push(mac);
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_len_and_data_where_block_has_them() {
        let r = Request {
            tag: 7,
            op: op::RECEIVE,
            flags: 0,
            len: 2048,
            data: 0x4_0000,
        };
        let b = r.encode();
        assert_eq!(Request::decode(&b), r);
        let blk = super::super::blk::Request::decode(&b);
        assert_eq!((blk.len, blk.data), (2048, 0x4_0000));
    }

    #[test]
    fn filter_sets_round_trip_and_bad_encodings_are_refused() {
        let mut set = FilterSet {
            flags: filter_flags::BROADCAST,
            ..FilterSet::default()
        };
        set.unicast.push([2, 0, 0, 0, 0, 1]);
        set.unicast.push([2, 0, 0, 0, 0, 2]);
        set.multicast.push([1, 0, 0x5e, 0, 0, 1]);
        let mut buf = [0u8; MAX_FILTER_SET_LEN];
        let n = set.encode(&mut buf);
        assert_eq!(n, 8 + 3 * MAC_LEN);
        assert_eq!(FilterSet::decode(&buf[..n]), Ok(set.clone()));
        assert_eq!(
            FilterSet::decode(&buf[..n - 1]),
            Err(FilterSetError::Length)
        );
        assert_eq!(FilterSet::decode(&buf[..4]), Err(FilterSetError::Length));
        let mut bad = buf;
        bad[0] = 0x80;
        assert_eq!(FilterSet::decode(&bad[..n]), Err(FilterSetError::Flags));
        let mut bad = buf;
        bad[4..6].copy_from_slice(&65u16.to_le_bytes());
        assert_eq!(FilterSet::decode(&bad[..n]), Err(FilterSetError::TooMany));
        let mut full = FilterSet::default();
        for i in 0..MAX_FILTER_ADDRESSES {
            assert!(full.unicast.push([2, 0, 0, 0, 0, i as u8]));
        }
        assert!(!full.unicast.push([2, 0, 0, 0, 1, 0]));
    }

    #[test]
    fn the_link_word_is_where_its_offset_says() {
        assert_eq!(offset::LINK - super::super::DEVICE_INFO_OFFSET, 12);
        assert_eq!(offset::RX_MISSED - super::super::DEVICE_INFO_OFFSET, 28);
    }
}
