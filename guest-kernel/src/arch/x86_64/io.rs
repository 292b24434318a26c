//! Typed I/O ports.
//!
//! Every port access is a VM exit under ddvm (68–75 µs on PVM): none belongs on a hot path.
//! Creating a [`Port`] is `unsafe` (its owner vouches for what the device behind it can do);
//! reading and writing it is not.

use core::arch::asm;
use core::marker::PhantomData;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
}

/// A value that can be moved through an I/O port: `u8`, `u16` or `u32`.
pub trait PortValue: Copy + sealed::Sealed {
    /// Reads `port`.
    ///
    /// # Safety
    /// The access must not break memory safety (see [`Port::new`]).
    unsafe fn read_port(port: u16) -> Self;
    /// Writes `value` to `port`.
    ///
    /// # Safety
    /// As for [`PortValue::read_port`].
    unsafe fn write_port(port: u16, value: Self);
}

impl PortValue for u8 {
    unsafe fn read_port(port: u16) -> u8 {
        let v: u8;
        // SAFETY: `in` touches no memory and no stack; the caller vouches for the device.
        unsafe {
            asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
        };
        v
    }
    unsafe fn write_port(port: u16, value: u8) {
        // SAFETY: as above, for `out`.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
        };
    }
}

impl PortValue for u16 {
    unsafe fn read_port(port: u16) -> u16 {
        let v: u16;
        // SAFETY: `in` touches no memory and no stack; the caller vouches for the device.
        unsafe {
            asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
        };
        v
    }
    unsafe fn write_port(port: u16, value: u16) {
        // SAFETY: as above, for `out`.
        unsafe {
            asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
        };
    }
}

impl PortValue for u32 {
    unsafe fn read_port(port: u16) -> u32 {
        let v: u32;
        // SAFETY: `in` touches no memory and no stack; the caller vouches for the device.
        unsafe {
            asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
        };
        v
    }
    unsafe fn write_port(port: u16, value: u32) {
        // SAFETY: as above, for `out`.
        unsafe {
            asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
        };
    }
}

/// An I/O port carrying values of type `T`.
#[derive(Debug)]
pub struct Port<T> {
    port: u16,
    _value: PhantomData<T>,
}

impl<T: PortValue> Port<T> {
    /// A handle on `port`.
    ///
    /// # Safety
    /// Reads and writes of this port, in any order and with any value, must not break memory
    /// safety: the device behind it must not be able to write memory that Rust code owns, or
    /// the caller must only hand the port to code that accounts for it.
    pub const unsafe fn new(port: u16) -> Self {
        Port {
            port,
            _value: PhantomData,
        }
    }

    /// The port number.
    pub const fn number(&self) -> u16 {
        self.port
    }

    /// Reads the port (one VM exit).
    #[inline]
    pub fn read(&self) -> T {
        // SAFETY: `Port::new`'s contract covers any access.
        unsafe { T::read_port(self.port) }
    }

    /// Writes the port (one VM exit).
    #[inline]
    pub fn write(&self, value: T) {
        // SAFETY: `Port::new`'s contract covers any access.
        unsafe { T::write_port(self.port, value) }
    }
}
