//! Guest memory: one anonymous mapping per guest, handed to vm-memory.
//!
//! Guest RAM is sized in 2 MiB units to match the guest's identity map. It is not advised for
//! transparent huge pages: measured on PVM, a 16 MiB driver domain boots in ~1.9 ms with small
//! pages and ~2.5 ms with THP, because every 2 MiB page the VMM touches while loading is zeroed
//! whole (~0.35 ms each), while the guest itself touches only a dozen 4 KiB pages to boot.
//! Measured again with a 32 MiB NVMe driver domain (`madvise(MADV_HUGEPAGE)` on this 2 MiB-
//! aligned mapping, 2 × 10 boots): the domain's own bring-up got faster (median 1.4 ms against
//! 2.1 ms: ~30 guest page faults fewer) but boot to ready got slower (median 7.1 / 11.0 ms
//! against 5.5 / 6.0 ms, worst 22 ms), so small pages stay.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory type used across the VMM.
pub type GuestMem = GuestMemoryMmap<()>;

/// Granularity of guest RAM.
pub const RAM_ALIGN: u64 = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size is zero, not a multiple of 2 MiB, or beyond what the identity map covers.
    #[error(
        "guest memory of {size} bytes: expected a non-zero multiple of 2 MiB up to {max} bytes"
    )]
    BadSize {
        /// Requested size.
        size: u64,
        /// Largest size supported.
        max: u64,
    },
    /// The mapping could not be created.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Creates `size` bytes of guest RAM at guest-physical 0.
pub fn create(size: u64, max: u64) -> Result<GuestMem, MemoryError> {
    if size == 0 || !size.is_multiple_of(RAM_ALIGN) || size > max {
        return Err(MemoryError::BadSize { size, max });
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| MemoryError::Map { size, source })?;
    Ok(mem)
}

/// Host address and length of the (single) RAM region, for the KVM memslot.
pub fn host_range(mem: &GuestMem) -> Option<(u64, u64)> {
    let region = mem.iter().next()?;
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .ok()?;
    Some((host as u64, region.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn sizes_must_be_whole_large_pages() {
        assert!(matches!(
            create(0, 1 << 30),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            create(3 << 20, 1 << 30),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            create(4 << 30, 1 << 30),
            Err(MemoryError::BadSize { .. })
        ));
    }

    #[test]
    fn memory_is_usable_through_vm_memory() {
        let mem = create(4 << 20, 1 << 30).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x3f_fffc))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x3f_fffc)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u32>(GuestAddress(0x40_0000)).is_err());
        assert_eq!(host_range(&mem).unwrap().1, 4 << 20);
    }
}
