//! Memory the device reads and writes: virtio-drivers' [`Hal`] for guest-kernel, and
//! [`DmaArea`], the request buffers of the block driver.
//!
//! Guest memory is identity-mapped (virtual = guest-physical) and the heap is one contiguous
//! range of RAM, so a page-aligned heap allocation is physically contiguous and its address is
//! the address the device uses: sharing a buffer is naming its address, unsharing is nothing.

#![allow(unsafe_code)]

use alloc::alloc::{alloc_zeroed, dealloc};
use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// virtio-drivers' hardware layer for ddvm guests.
pub struct GuestHal;

fn pages_layout(pages: usize) -> Option<Layout> {
    let size = pages.checked_mul(PAGE_SIZE)?;
    if size == 0 {
        return None;
    }
    Layout::from_size_align(size, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns fresh, zeroed, page-aligned heap memory that nothing else refers
// to until `dma_dealloc` frees it; addresses are identity-mapped, so the physical address the
// device uses is the pointer's address (`share`), and nothing needs copying back (`unshare`).
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = pages_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // A physical address of 0 tells virtio-drivers the allocation failed.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = pages_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back an allocation of `dma_alloc` with the same page count,
        // hence the same layout, freed once.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity map: only the PCI transport calls this, and this image uses virtio-mmio.
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Zeroed, page-aligned heap memory handed to the device in pieces, owned through a raw
/// pointer: no Rust reference into it outlives the accessor call that made it, so the device
/// may write any piece it was given while the driver works on the others.
pub struct DmaArea {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl DmaArea {
    /// `len` zeroed bytes (rounded up to whole pages); `None` when the heap has no room.
    pub fn new(len: usize) -> Option<Self> {
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let layout = pages_layout(pages)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(DmaArea { ptr, layout })
    }

    fn checked(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.layout.size()),
            "DMA area access out of bounds: {offset:#x}+{len:#x} of {:#x}",
            self.layout.size()
        );
        // In bounds (checked above) of one allocation.
        self.ptr.as_ptr().wrapping_add(offset)
    }

    /// The `len` bytes at `offset`, shared.
    ///
    /// # Safety
    /// For the life of the slice the device must not write these bytes (no request naming them
    /// is in flight) and no mutable slice may overlap them.
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let p = self.checked(offset, len);
        // SAFETY: in bounds of the live allocation (checked); no concurrent writer or
        // overlapping mutable slice (the caller's contract).
        unsafe { core::slice::from_raw_parts(p, len) }
    }

    /// The `len` bytes at `offset`, writable.
    ///
    /// # Safety
    /// For the life of the slice no other slice may overlap these bytes and the device must not
    /// use them, except that the slice may be handed to virtio-drivers' `VirtQueue::add` for
    /// the device to use until the matching `pop_used`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        let p = self.checked(offset, len);
        // SAFETY: in bounds of the live allocation (checked); exclusive (the caller's
        // contract).
        unsafe { core::slice::from_raw_parts_mut(p, len) }
    }

    /// Copies one byte out (volatile: the device may have written it).
    pub fn read_u8(&self, offset: usize) -> u8 {
        let p = self.checked(offset, 1);
        // SAFETY: in bounds of the live allocation (checked); a volatile byte read cannot tear
        // and creates no reference.
        unsafe { core::ptr::read_volatile(p) }
    }
}

impl Drop for DmaArea {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with `self.layout`, freed once; the driver resets the
        // device before dropping the areas its requests named.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
