//! Physical Region Page entries (NVMe base specification 1.4, section 4.3) for one physically
//! contiguous buffer, with the driver's memory page size of 4 KiB.
//!
//! - up to the end of the first page: PRP1 only;
//! - up to one more page: PRP1 and PRP2 = the second page;
//! - longer: PRP2 points at a PRP list holding the addresses of the second and following
//!   pages. A list may start inside a page (qword aligned) but must not reach past the end of
//!   that page (its last entry would be read as a pointer to the next list): the driver gives
//!   each command slot a power-of-two chunk of a page, [`list_bytes`] for its largest
//!   transfer. A whole page holds 512 entries, so a transfer of up to 2 MiB always fits
//!   without chaining lists ([`MAX_TRANSFER`]).

use core::fmt;

/// Memory page size the driver configures (CC.MPS = 0).
pub const PAGE_SIZE: u64 = 4096;
/// Entries in one PRP list page.
pub const LIST_ENTRIES: u64 = PAGE_SIZE / 8;
/// Largest transfer one list page always covers, whatever the buffer's offset in its page.
pub const MAX_TRANSFER: u32 = (LIST_ENTRIES * PAGE_SIZE) as u32;

/// List entries a transfer of up to `max_transfer` bytes (at most [`MAX_TRANSFER`]) needs at
/// most, whatever its offset in its first page.
pub fn list_entries(max_transfer: u32) -> u64 {
    u64::from(max_transfer).div_ceil(PAGE_SIZE)
}

/// Bytes of the list chunk for transfers of up to `max_transfer` bytes: a power of two, at
/// least 16 (a Dataset Management range), at most a page; chunks of this size laid out from
/// a page boundary never cross one.
pub fn list_bytes(max_transfer: u32) -> u64 {
    (8 * list_entries(max_transfer))
        .max(16)
        .next_power_of_two()
        .min(PAGE_SIZE)
}

/// PRP1 and PRP2 of a command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prp {
    /// First entry: the buffer's address.
    pub prp1: u64,
    /// Second entry: 0, the second page, or the PRP list.
    pub prp2: u64,
}

/// Why a buffer cannot be described.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrpError {
    /// Zero length.
    Empty,
    /// The address is not dword aligned (PRP offsets must be).
    Unaligned(u64),
    /// The buffer needs more list entries than one page holds, or wraps the address space.
    TooLong(u32),
}

impl fmt::Display for PrpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PrpError::Empty => write!(f, "empty transfer"),
            PrpError::Unaligned(a) => write!(f, "buffer address {a:#x} is not dword aligned"),
            PrpError::TooLong(len) => write!(f, "transfer of {len} bytes needs a chained PRP list"),
        }
    }
}

/// Describes `len` bytes at `addr`. When a list is needed, `put(i, address)` is called for
/// each list entry `i` and PRP2 is `list` (the qword-aligned address of a list chunk with
/// room for `max_entries` entries, not crossing a page boundary).
pub fn build(
    addr: u64,
    len: u32,
    list: u64,
    max_entries: u64,
    mut put: impl FnMut(u64, u64),
) -> Result<Prp, PrpError> {
    if len == 0 {
        return Err(PrpError::Empty);
    }
    if !addr.is_multiple_of(4) {
        return Err(PrpError::Unaligned(addr));
    }
    let end = addr
        .checked_add(u64::from(len))
        .ok_or(PrpError::TooLong(len))?;
    let second = (addr / PAGE_SIZE + 1) * PAGE_SIZE;
    if end <= second {
        return Ok(Prp {
            prp1: addr,
            prp2: 0,
        });
    }
    let pages = (end - second).div_ceil(PAGE_SIZE);
    if pages == 1 {
        return Ok(Prp {
            prp1: addr,
            prp2: second,
        });
    }
    if pages > max_entries.min(LIST_ENTRIES) {
        return Err(PrpError::TooLong(len));
    }
    for i in 0..pages {
        put(i, second + i * PAGE_SIZE);
    }
    Ok(Prp {
        prp1: addr,
        prp2: list,
    })
}
