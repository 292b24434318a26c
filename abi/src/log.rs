//! The console log ring: the guest appends bytes, the VMM drains them.
//!
//! A byte per port exit costs ~70 µs on PVM; a shared ring costs nothing until the VMM drains it
//! (at its next exit of any kind, or on a timer). The guest is the only writer: it copies bytes
//! into `data[head % size]` and then publishes the new `head` (a free-running byte count). The
//! VMM keeps its own read position and never trusts `head` beyond what the arithmetic in
//! [`plan_drain`] allows: a writer that laps the reader loses the oldest bytes, and the VMM says
//! how many.

use crate::assert_abi_size;

/// `LogHeader::magic`.
pub const LOG_MAGIC: u32 = 0x6c6f_6721; // "log!"
/// Bytes before the data area.
pub const LOG_HEADER_SIZE: u64 = 64;

/// Header at the start of the log ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogHeader {
    /// [`LOG_MAGIC`], written by the VMM.
    pub magic: u32,
    /// Size of the data area in bytes, written by the VMM.
    pub data_size: u32,
    /// Bytes ever written by the guest (free-running).
    pub head: u64,
    /// Reserved, zero.
    pub reserved: [u64; 6],
}
assert_abi_size!(LogHeader, 64);

/// Byte offset of `LogHeader::head`.
pub const LOG_HEAD_OFFSET: u64 = 8;

/// What the reader should copy out of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// Bytes the writer overwrote before they could be read.
    pub lost: u64,
    /// Free-running position of the first byte to copy.
    pub from: u64,
    /// Bytes to copy (at most the data size).
    pub len: u64,
}

/// Plans a drain from reader position `read` to writer position `head` in a ring of `size`
/// bytes. A `head` behind `read` (a writer that went backwards: garbage) yields `None`.
pub fn plan_drain(read: u64, head: u64, size: u64) -> Option<Drain> {
    if size == 0 || head < read {
        return None;
    }
    let pending = head - read;
    let lost = pending.saturating_sub(size);
    Some(Drain {
        lost,
        from: read + lost,
        len: pending - lost,
    })
}

/// Splits `len` bytes starting at free-running position `from` into at most two contiguous
/// `(offset, len)` pieces of a ring of `size` bytes.
pub fn ring_pieces(from: u64, len: u64, size: u64) -> [(u64, u64); 2] {
    if size == 0 {
        return [(0, 0), (0, 0)];
    }
    let start = from % size;
    let first = len.min(size - start);
    [(start, first), (0, len - first)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_of_nothing_is_empty() {
        assert_eq!(
            plan_drain(10, 10, 64),
            Some(Drain {
                lost: 0,
                from: 10,
                len: 0
            })
        );
    }

    #[test]
    fn drain_reports_lapped_bytes_as_lost() {
        let d = plan_drain(0, 100, 64).unwrap();
        assert_eq!(d.lost, 36);
        assert_eq!(d.from, 36);
        assert_eq!(d.len, 64);
    }

    #[test]
    fn head_moving_backwards_is_rejected() {
        assert_eq!(plan_drain(50, 49, 64), None);
        assert_eq!(plan_drain(0, 1, 0), None);
    }

    #[test]
    fn pieces_wrap_at_the_end_of_the_ring() {
        assert_eq!(ring_pieces(60, 10, 64), [(60, 4), (0, 6)]);
        assert_eq!(ring_pieces(64, 10, 64), [(0, 10), (0, 0)]);
        assert_eq!(ring_pieces(3, 0, 64), [(3, 0), (0, 0)]);
    }
}
