//! Typed memory-mapped device registers.
//!
//! A driver gets an [`MmioRegion`] for a BAR (the one `unsafe` step: vouching that the range
//! is the device's registers) and then typed register handles: [`ReadOnly`], [`WriteOnly`],
//! [`ReadWrite`]. Every access is a volatile read or write of exactly the register's width;
//! none produces a Rust reference to device memory. Each access is an exit when the VMM
//! emulates the device (68–75 µs on PVM); a passed-through BAR mapped into the VM is not.

use core::marker::PhantomData;
use core::mem::size_of;
use core::ptr;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

/// A register width: `u8`, `u16`, `u32` or `u64`.
pub trait RegisterValue: Copy + sealed::Sealed {}
impl RegisterValue for u8 {}
impl RegisterValue for u16 {}
impl RegisterValue for u32 {}
impl RegisterValue for u64 {}

/// A device's register window (a BAR, or part of one).
#[derive(Clone, Copy, Debug)]
pub struct MmioRegion {
    base: u64,
    len: u64,
}

impl MmioRegion {
    /// The registers at `base..base + len`.
    ///
    /// # Safety
    /// The range must be mapped, must be device registers (or memory no Rust reference
    /// covers), and reads and writes of any register in it must not break memory safety (what
    /// the device does with them, e.g. DMA, stays out of memory Rust owns or is accounted for
    /// by the driver).
    pub const unsafe fn new(base: u64, len: u64) -> Self {
        MmioRegion { base, len }
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

    fn register<T: RegisterValue>(&self, offset: u64) -> Mmio<T> {
        let size = size_of::<T>() as u64;
        assert!(
            offset.is_multiple_of(size)
                && offset.checked_add(size).is_some_and(|end| end <= self.len),
            "register at {offset:#x} ({size} bytes) is outside the {:#x}-byte window or misaligned",
            self.len
        );
        Mmio {
            addr: self.base + offset,
            _value: PhantomData,
        }
    }

    /// A read-only register at `offset`; panics when it is outside the region or misaligned.
    pub fn read_only<T: RegisterValue>(&self, offset: u64) -> ReadOnly<T> {
        ReadOnly(self.register(offset))
    }

    /// A write-only register at `offset`; panics when it is outside the region or misaligned.
    pub fn write_only<T: RegisterValue>(&self, offset: u64) -> WriteOnly<T> {
        WriteOnly(self.register(offset))
    }

    /// A read-write register at `offset`; panics when it is outside the region or misaligned.
    pub fn read_write<T: RegisterValue>(&self, offset: u64) -> ReadWrite<T> {
        ReadWrite(self.register(offset))
    }
}

/// A register of type `T` at a checked address.
#[derive(Clone, Copy, Debug)]
struct Mmio<T> {
    addr: u64,
    _value: PhantomData<T>,
}

impl<T: RegisterValue> Mmio<T> {
    fn read(self) -> T {
        // SAFETY: `MmioRegion::register` checked that the register lies inside a region whose
        // creator vouched for volatile access, and that it is aligned.
        unsafe { ptr::read_volatile(self.addr as *const T) }
    }

    fn write(self, value: T) {
        // SAFETY: as for `read`.
        unsafe { ptr::write_volatile(self.addr as *mut T, value) }
    }
}

/// A register the driver only reads.
#[derive(Clone, Copy, Debug)]
pub struct ReadOnly<T>(Mmio<T>);

impl<T: RegisterValue> ReadOnly<T> {
    /// Reads the register.
    pub fn read(&self) -> T {
        self.0.read()
    }
}

/// A register the driver only writes.
#[derive(Clone, Copy, Debug)]
pub struct WriteOnly<T>(Mmio<T>);

impl<T: RegisterValue> WriteOnly<T> {
    /// Writes the register.
    pub fn write(&self, value: T) {
        self.0.write(value)
    }
}

/// A register the driver reads and writes.
#[derive(Clone, Copy, Debug)]
pub struct ReadWrite<T>(Mmio<T>);

impl<T: RegisterValue> ReadWrite<T> {
    /// Reads the register.
    pub fn read(&self) -> T {
        self.0.read()
    }

    /// Writes the register.
    pub fn write(&self, value: T) {
        self.0.write(value)
    }

    /// Reads, applies `f`, writes the result back (two accesses, not atomic).
    pub fn modify(&self, f: impl FnOnce(T) -> T) {
        self.write(f(self.read()))
    }
}
