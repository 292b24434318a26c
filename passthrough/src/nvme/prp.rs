//! Physical Region Page entries: from PRP1/PRP2 (and PRP lists) to guest-physical segments.
//!
//! Only 4 KiB memory pages (CC.MPS = 0). PRP1 may start anywhere dword aligned; every later
//! data entry must be page aligned. PRP2 is a second data entry when the transfer ends in the
//! next page, else a pointer to a PRP list, which may start at a qword-aligned offset; when a
//! list needs more entries than fit before the end of its page, the last entry of that page
//! points to the next list page. A misaligned entry is PRP Offset Invalid; a list or a data
//! page outside the DMA window is a Data Transfer Error.

use super::status::Status;
use crate::dma::DmaWindow;

/// Memory page size (CAP.MPSMIN = CAP.MPSMAX = 0).
pub const PAGE_SIZE: u64 = 4096;
const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// Why a PRP walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrpFault {
    /// An entry breaks the alignment rules.
    Offset,
    /// A list or a data page is outside the DMA window (or DMA is off).
    Dma,
}

impl PrpFault {
    /// The completion status for this fault.
    pub fn status(self) -> Status {
        match self {
            PrpFault::Offset => Status::PRP_OFFSET_INVALID,
            PrpFault::Dma => Status::DATA_TRANSFER_ERROR,
        }
    }
}

/// The segments (address, length) of a `len`-byte transfer, adjacent pages merged; every
/// segment has been checked to lie inside the DMA window.
pub fn segments(
    dma: &DmaWindow,
    prp1: u64,
    prp2: u64,
    len: usize,
) -> Result<Vec<(u64, usize)>, PrpFault> {
    let mut segs: Vec<(u64, usize)> = Vec::new();
    if len == 0 {
        return Ok(segs);
    }
    if prp1 & 0x3 != 0 {
        return Err(PrpFault::Offset);
    }
    let first = (PAGE_SIZE - (prp1 & PAGE_MASK)).min(len as u64) as usize;
    push(&mut segs, prp1, first);
    let mut remaining = len - first;
    if remaining == 0 {
    } else if remaining as u64 <= PAGE_SIZE {
        if prp2 & PAGE_MASK != 0 {
            return Err(PrpFault::Offset);
        }
        push(&mut segs, prp2, remaining);
    } else {
        if prp2 & 0x7 != 0 {
            return Err(PrpFault::Offset);
        }
        let mut list = prp2;
        while remaining > 0 {
            let slots = ((PAGE_SIZE - (list & PAGE_MASK)) / 8) as usize;
            let pages = remaining.div_ceil(PAGE_SIZE as usize);
            // Data entries read from this list page, and whether its last slot chains on.
            let (data, chained) = if pages > slots {
                (slots - 1, true)
            } else {
                (pages, false)
            };
            let count = data + usize::from(chained);
            let mut raw = vec![0u8; count * 8];
            dma.read(list, &mut raw).map_err(|_| PrpFault::Dma)?;
            let entries: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            for &e in &entries[..data] {
                if e & PAGE_MASK != 0 {
                    return Err(PrpFault::Offset);
                }
                let n = remaining.min(PAGE_SIZE as usize);
                push(&mut segs, e, n);
                remaining -= n;
            }
            if chained {
                let next = entries[data];
                if next & PAGE_MASK != 0 {
                    return Err(PrpFault::Offset);
                }
                list = next;
            }
        }
    }
    for &(addr, n) in &segs {
        dma.check(addr, n).map_err(|_| PrpFault::Dma)?;
    }
    Ok(segs)
}

fn push(segs: &mut Vec<(u64, usize)>, addr: u64, len: usize) {
    if let Some(last) = segs.last_mut() {
        if last.0.checked_add(last.1 as u64) == Some(addr) {
            last.1 += len;
            return;
        }
    }
    segs.push((addr, len));
}

/// Copies domain memory described by `segs` into `buf` (a device write from memory).
pub fn gather(dma: &DmaWindow, segs: &[(u64, usize)], buf: &mut [u8]) -> Result<(), PrpFault> {
    let mut at = 0;
    for &(addr, n) in segs {
        let dst = buf.get_mut(at..at + n).ok_or(PrpFault::Dma)?;
        dma.read(addr, dst).map_err(|_| PrpFault::Dma)?;
        at += n;
    }
    Ok(())
}

/// Copies `buf` into domain memory described by `segs` (a device read into memory).
pub fn scatter(dma: &DmaWindow, segs: &[(u64, usize)], buf: &[u8]) -> Result<(), PrpFault> {
    let mut at = 0;
    for &(addr, n) in segs {
        let src = buf.get(at..at + n).ok_or(PrpFault::Dma)?;
        dma.write(addr, src).map_err(|_| PrpFault::Dma)?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    fn setup() -> (GuestMemoryMmap<()>, DmaWindow) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (mem.clone(), DmaWindow::new(mem))
    }

    fn put_list(mem: &GuestMemoryMmap<()>, at: u64, entries: &[u64]) {
        for (i, e) in entries.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(at + 8 * i as u64)).unwrap();
        }
    }

    #[test]
    fn one_and_two_pages() {
        let (_m, dma) = setup();
        assert_eq!(segments(&dma, 0x1000, 0, 4096), Ok(vec![(0x1000, 4096)]));
        assert_eq!(
            segments(&dma, 0x1800, 0x5000, 4096),
            Ok(vec![(0x1800, 2048), (0x5000, 2048)])
        );
        assert_eq!(segments(&dma, 0x1800, 0x5800, 4096), Err(PrpFault::Offset));
        assert_eq!(segments(&dma, 0x1002, 0, 512), Err(PrpFault::Offset));
    }

    #[test]
    fn list_with_offset_and_chain() {
        let (mem, dma) = setup();
        // The list starts 16 bytes before the end of its page: one data entry, then a chain.
        put_list(&mem, 0x8ff0, &[0x20000, 0x9000]);
        put_list(&mem, 0x9000, &[0x30000, 0x40000]);
        let segs = segments(&dma, 0x10000, 0x8ff0, 4 * 4096).unwrap();
        assert_eq!(
            segs,
            vec![
                (0x10000, 4096),
                (0x20000, 4096),
                (0x30000, 4096),
                (0x40000, 4096)
            ]
        );
        put_list(&mem, 0x9000, &[0x30000, 0x40010]);
        assert_eq!(
            segments(&dma, 0x10000, 0x8ff0, 4 * 4096),
            Err(PrpFault::Offset)
        );
    }

    #[test]
    fn outside_the_window_is_a_dma_fault() {
        let (mem, dma) = setup();
        assert_eq!(segments(&dma, 1 << 20, 0, 512), Err(PrpFault::Dma));
        assert_eq!(
            segments(&dma, 0x1000, 0xffff_f000, 3 * 4096),
            Err(PrpFault::Dma)
        );
        put_list(&mem, 0x2000, &[0x3000, 1 << 30]);
        assert_eq!(segments(&dma, 0x1000, 0x2000, 3 * 4096), Err(PrpFault::Dma));
    }
}
