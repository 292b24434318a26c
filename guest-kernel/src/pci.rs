//! PCI configuration space through mechanism #1 (ports 0xcf8/0xcfc).
//!
//! Every access is two port exits (~140 µs on PVM): enumerate once at boot and keep what you
//! need.

use alloc::vec::Vec;
use core::fmt;

use ddvm_abi::port::{PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};

use crate::arch::io::Port;

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus (0–255).
    pub bus: u8,
    /// Device (0–31).
    pub dev: u8,
    /// Function (0–7).
    pub func: u8,
}

impl Bdf {
    /// A BDF; panics when `dev` > 31 or `func` > 7.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        assert!(dev < 32 && func < 8, "PCI device or function out of range");
        Bdf { bus, dev, func }
    }

    /// The mechanism #1 address of the dword holding `offset`.
    const fn address(self, offset: u8) -> u32 {
        0x8000_0000
            | (self.bus as u32) << 16
            | (self.dev as u32) << 11
            | (self.func as u32) << 8
            | (offset as u32 & 0xfc)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

fn address_port() -> Port<u32> {
    // SAFETY: selecting a configuration dword has no effect by itself.
    unsafe { Port::new(PCI_CONFIG_ADDRESS) }
}

/// The data port for the bytes at `offset` within the selected dword.
fn data_port<T: crate::arch::io::PortValue>(offset: u8) -> Port<T> {
    // SAFETY: configuration space accesses can reprogram devices (BARs, bus mastering); this
    // module is the HAL that drivers use for it, and the VMM confines what a device can reach
    // to this VM.
    unsafe { Port::new(PCI_CONFIG_DATA + u16::from(offset & 3)) }
}

/// Reads the dword at `offset` (rounded down to a multiple of 4).
pub fn read_u32(bdf: Bdf, offset: u8) -> u32 {
    address_port().write(bdf.address(offset));
    data_port::<u32>(0).read()
}

/// Reads the word at `offset` (rounded down to a multiple of 2).
pub fn read_u16(bdf: Bdf, offset: u8) -> u16 {
    address_port().write(bdf.address(offset));
    data_port::<u16>(offset & 2).read()
}

/// Reads the byte at `offset`.
pub fn read_u8(bdf: Bdf, offset: u8) -> u8 {
    address_port().write(bdf.address(offset));
    data_port::<u8>(offset).read()
}

/// Writes the dword at `offset` (rounded down to a multiple of 4).
pub fn write_u32(bdf: Bdf, offset: u8, value: u32) {
    address_port().write(bdf.address(offset));
    data_port::<u32>(0).write(value);
}

/// Writes the word at `offset` (rounded down to a multiple of 2).
pub fn write_u16(bdf: Bdf, offset: u8, value: u16) {
    address_port().write(bdf.address(offset));
    data_port::<u16>(offset & 2).write(value);
}

/// Writes the byte at `offset`.
pub fn write_u8(bdf: Bdf, offset: u8, value: u8) {
    address_port().write(bdf.address(offset));
    data_port::<u8>(offset).write(value);
}

/// Standard configuration header offsets.
pub mod reg {
    /// Vendor ID (16 bits), device ID at +2.
    pub const VENDOR_ID: u8 = 0x00;
    /// Command register (16 bits).
    pub const COMMAND: u8 = 0x04;
    /// Revision (8 bits), class code (24 bits) above it.
    pub const CLASS_REVISION: u8 = 0x08;
    /// Header type (8 bits); bit 7: multi-function device.
    pub const HEADER_TYPE: u8 = 0x0e;
    /// First base address register.
    pub const BAR0: u8 = 0x10;
}

/// A present function found by [`enumerate_bus0`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code: base class << 16 | subclass << 8 | programming interface.
    pub class: u32,
}

impl PciFunction {
    /// Base class (e.g. 0x01 mass storage).
    pub fn base_class(&self) -> u8 {
        (self.class >> 16) as u8
    }

    /// Subclass (e.g. 0x08 non-volatile memory under mass storage).
    pub fn subclass(&self) -> u8 {
        (self.class >> 8) as u8
    }
}

/// Lists the functions present on bus 0 (reads each device's function 0 and, for
/// multi-function devices, functions 1–7).
pub fn enumerate_bus0() -> Vec<PciFunction> {
    let mut found = Vec::new();
    for dev in 0..32 {
        let Some(first) = probe(Bdf::new(0, dev, 0)) else {
            continue;
        };
        found.push(first);
        if read_u8(first.bdf, reg::HEADER_TYPE) & 0x80 != 0 {
            found.extend((1..8).filter_map(|func| probe(Bdf::new(0, dev, func))));
        }
    }
    found
}

fn probe(bdf: Bdf) -> Option<PciFunction> {
    let id = read_u32(bdf, reg::VENDOR_ID);
    let vendor = id as u16;
    if vendor == 0xffff || vendor == 0 {
        return None;
    }
    Some(PciFunction {
        bdf,
        vendor,
        device: (id >> 16) as u16,
        class: read_u32(bdf, reg::CLASS_REVISION) >> 8,
    })
}
