//! Memory a device reads and writes by DMA.
//!
//! Guest memory is identity-mapped (virtual = guest-physical), and the heap is one contiguous
//! range of RAM, so a page-aligned heap allocation is physically contiguous and its address is
//! the address a device uses. A [`DmaBuffer`] owns such an allocation and, like
//! [`SharedRegion`], never hands out a Rust reference into it: the device may write it at any
//! time, so every access is a bounds-checked volatile copy.
//!
//! A buffer must outlive every command that names it: a driver keeps it until the device has
//! completed (or been reset), because freeing it would hand memory the device still writes
//! back to the allocator.

use alloc::alloc::{alloc_zeroed, dealloc};
use core::alloc::Layout;

use crate::shared::{Plain, SharedRegion};

/// Page size of DMA allocations and of the devices' page-granular structures.
pub const PAGE_SIZE: u64 = 4096;

/// Zeroed, page-aligned, physically contiguous memory for a device.
#[derive(Debug)]
pub struct DmaBuffer {
    region: SharedRegion,
    layout: Layout,
}

/// Allocates `pages` zeroed pages; `None` when the heap has no room (or `pages` is 0).
pub fn alloc_pages(pages: usize) -> Option<DmaBuffer> {
    DmaBuffer::new(pages)
}

impl DmaBuffer {
    /// Allocates `pages` zeroed pages; `None` when the heap has no room (or `pages` is 0).
    pub fn new(pages: usize) -> Option<Self> {
        let size = pages.checked_mul(PAGE_SIZE as usize)?;
        if size == 0 {
            return None;
        }
        let layout = Layout::from_size_align(size, PAGE_SIZE as usize).ok()?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: a fresh heap allocation of `size` bytes that this buffer owns until `drop`;
        // no Rust reference to it is ever created (all access goes through the region), so it
        // may be shared with a device.
        let region = unsafe { SharedRegion::new(ptr as u64, size as u64) };
        Some(DmaBuffer { region, layout })
    }

    /// The address a device uses (guest-physical = virtual).
    pub fn addr(&self) -> u64 {
        self.region.base()
    }

    /// Size in bytes (a whole number of pages).
    pub fn len(&self) -> u64 {
        self.region.len()
    }

    /// Always false: a buffer has at least one page.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// Copies a `T` out at `offset` (volatile); panics when out of bounds or misaligned.
    pub fn read<T: Plain>(&self, offset: u64) -> T {
        self.region.read(offset)
    }

    /// Copies `value` in at `offset` (volatile); panics when out of bounds or misaligned.
    pub fn write<T: Plain>(&self, offset: u64, value: T) {
        self.region.write(offset, value)
    }

    /// Copies bytes out at `offset`; panics when out of bounds.
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) {
        self.region.read_bytes(offset, buf)
    }

    /// Copies bytes in at `offset`; panics when out of bounds.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        self.region.write_bytes(offset, bytes)
    }

    /// Sets `len` bytes at `offset` to `value`; panics when out of bounds.
    pub fn fill(&self, offset: u64, len: u64, value: u8) {
        self.region.fill(offset, len, value)
    }

    /// Gives the memory up for good (it is never freed) and returns it as a shared region,
    /// which may then be copied and kept for ever: e.g. a stand-in for the VMM's channel.
    pub fn leak(self) -> SharedRegion {
        let region = self.region;
        core::mem::forget(self);
        region
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with `self.layout`, freed once; the owner guarantees no
        // device still uses it (module documentation).
        unsafe { dealloc(self.region.base() as *mut u8, self.layout) }
    }
}
