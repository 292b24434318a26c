//! Memory that someone else writes too: the log ring, the panic record, the channel.
//!
//! A [`SharedRegion`] never hands out a Rust reference into the memory: every access is a
//! volatile copy of a [`Plain`] value in or out, bounds-checked against the region. Readers copy
//! a value once and validate the copy (the VMM and the domain distrust each other's writes).

use core::mem::size_of;
use core::ptr;
use core::sync::atomic::{compiler_fence, fence, Ordering};

use ddvm_abi::boot::BootInfo;
use ddvm_abi::channel::ring::SharedMemory;
use ddvm_abi::channel::ChannelHeader;
use ddvm_abi::channel::{blk, net};
use ddvm_abi::log::LogHeader;

/// Types for which every bit pattern is a valid value and that have no padding: safe to copy
/// in and out of shared memory.
///
/// # Safety
/// Implementors must be `#[repr(C)]` (or primitive) plain data with no padding, no pointers, no
/// references and no invalid bit patterns.
pub unsafe trait Plain: Copy {}

// SAFETY: primitive integers: every bit pattern is valid, no padding.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for u16 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for u64 {}
// SAFETY: ABI structures: `#[repr(C)]`, integers only, sizes asserted by ddvm-abi (no padding).
unsafe impl Plain for BootInfo {}
// SAFETY: as above.
unsafe impl Plain for ChannelHeader {}
// SAFETY: as above.
unsafe impl Plain for LogHeader {}
// SAFETY: as above (`DeviceInfo` is 128 bytes of integers and byte arrays, no padding).
unsafe impl Plain for blk::DeviceInfo {}
// SAFETY: as above (the network `DeviceInfo` is 128 bytes of integers and byte arrays, no
// padding).
unsafe impl Plain for net::DeviceInfo {}

/// A range of guest-physical (= virtual) memory shared with the VMM or a device.
#[derive(Clone, Copy, Debug)]
pub struct SharedRegion {
    base: u64,
    len: u64,
}

impl SharedRegion {
    /// A region of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base + len` must be mapped, writable memory of this VM that no Rust reference
    /// covers for as long as the region (and its copies) is used: not the image, not the stack,
    /// not the heap.
    pub const unsafe fn new(base: u64, len: u64) -> Self {
        SharedRegion { base, len }
    }

    /// Start address.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of `size` bytes at `offset`; panics when they are not inside the region or not
    /// aligned for `align`.
    fn addr(&self, offset: u64, size: usize, align: usize) -> u64 {
        let end = offset.checked_add(size as u64);
        assert!(
            end.is_some_and(|end| end <= self.len),
            "shared region access out of bounds: offset {offset:#x} size {size} len {:#x}",
            self.len
        );
        let addr = self.base + offset;
        assert!(
            addr.is_multiple_of(align as u64),
            "misaligned shared region access at {addr:#x}"
        );
        addr
    }

    /// Copies a `T` out of the region at `offset` (a volatile read).
    pub fn read<T: Plain>(&self, offset: u64) -> T {
        let addr = self.addr(offset, size_of::<T>(), core::mem::align_of::<T>());
        // SAFETY: in bounds and aligned (checked above) in memory `new`'s contract makes valid
        // for volatile access; `T: Plain` accepts any bit pattern.
        unsafe { ptr::read_volatile(addr as *const T) }
    }

    /// Copies `value` into the region at `offset` (a volatile write).
    pub fn write<T: Plain>(&self, offset: u64, value: T) {
        let addr = self.addr(offset, size_of::<T>(), core::mem::align_of::<T>());
        // SAFETY: as for `read`.
        unsafe { ptr::write_volatile(addr as *mut T, value) }
    }

    /// Copies `bytes` into the region at `offset`, one volatile byte write each.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        let addr = self.addr(offset, bytes.len(), 1);
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `addr..addr + bytes.len()` is in bounds (checked above).
            unsafe { ptr::write_volatile((addr + i as u64) as *mut u8, *b) }
        }
    }

    /// Copies `buf.len()` bytes out of the region at `offset`, one volatile byte read each.
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) {
        let addr = self.addr(offset, buf.len(), 1);
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `addr..addr + buf.len()` is in bounds (checked above).
            *b = unsafe { ptr::read_volatile((addr + i as u64) as *const u8) };
        }
    }

    /// Sets `len` bytes at `offset` to `value`, with volatile writes.
    pub fn fill(&self, offset: u64, len: u64, value: u8) {
        let addr = self.addr(offset, len as usize, 1);
        for i in 0..len {
            // SAFETY: `addr..addr + len` is in bounds (checked above).
            unsafe { ptr::write_volatile((addr + i) as *mut u8, value) }
        }
    }

    /// Whether `len` bytes at `offset` lie inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// A sub-region of `len` bytes at `offset`; panics when it does not fit.
    pub fn subregion(&self, offset: u64, len: u64) -> SharedRegion {
        let base = self.addr(offset, len as usize, 1);
        SharedRegion { base, len }
    }
}

/// The channel rings (`ddvm_abi::channel::ring`) over a region: offsets are from the region's
/// start; indices are single aligned 32-bit volatile accesses, entries volatile byte copies.
/// Every access is bounds-checked (a geometry the domain validated never trips the check).
impl SharedMemory for SharedRegion {
    fn load_u32(&self, offset: u64) -> u32 {
        self.read(offset)
    }

    fn store_u32(&self, offset: u64, value: u32) {
        self.write(offset, value)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.read_bytes(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) {
        self.write_bytes(offset, buf)
    }

    fn release(&self) {
        fence(Ordering::Release);
    }

    fn acquire(&self) {
        fence(Ordering::Acquire);
    }
}

/// Orders this CPU's earlier stores before its later loads as other agents (the VMM's threads,
/// a device) see them: `mfence` on x86. Needed between publishing something and reading the
/// peer's "tell me" flag (event suppression), where release/acquire are not enough.
#[inline]
pub fn full_fence() {
    fence(Ordering::SeqCst);
}

/// Orders this CPU's earlier accesses to shared memory before later ones, as another CPU (the
/// VMM's thread) sees them. x86 keeps stores in order, so only the compiler needs stopping.
#[inline]
pub fn publish_fence() {
    compiler_fence(Ordering::SeqCst);
}
