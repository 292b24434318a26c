//! PCI configuration space: through the ECAM window of bus 0 when the boot info names one
//! (ddvm domains with a device), through mechanism #1 (ports 0xcf8/0xcfc) otherwise (QEMU PVH
//! boots, other buses).
//!
//! Every access is an exit: one through ECAM (~70 µs on PVM), two through the ports (the
//! address, then the data). Enumerate once at boot and keep what you need.

use alloc::vec::Vec;
use core::fmt;

use ddvm_abi::layout::IDENTITY_MAPPED;
use ddvm_abi::port::{PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};

use crate::arch::io::Port;
use crate::boot;
use crate::mmio::{MmioRegion, ReadWrite, RegisterValue};

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

    /// The offset of register `offset` in the ECAM window of this function's bus.
    const fn ecam_offset(self, offset: u8) -> u64 {
        (self.dev as u64) << 15 | (self.func as u64) << 12 | offset as u64
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// The ECAM register of `bdf` at `offset` (rounded down to the width of `T`), if the boot info
/// gives a window for the bus (bus 0 only).
fn ecam_register<T: RegisterValue>(bdf: Bdf, offset: u8) -> Option<ReadWrite<T>> {
    if bdf.bus != 0 {
        return None;
    }
    let window = boot::pci_ecam()?;
    let aligned = offset & !(core::mem::size_of::<T>() as u8 - 1);
    Some(window.read_write::<T>(bdf.ecam_offset(aligned)))
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
    if let Some(r) = ecam_register::<u32>(bdf, offset) {
        return r.read();
    }
    address_port().write(bdf.address(offset));
    data_port::<u32>(0).read()
}

/// Reads the word at `offset` (rounded down to a multiple of 2).
pub fn read_u16(bdf: Bdf, offset: u8) -> u16 {
    if let Some(r) = ecam_register::<u16>(bdf, offset) {
        return r.read();
    }
    address_port().write(bdf.address(offset));
    data_port::<u16>(offset & 2).read()
}

/// Reads the byte at `offset`.
pub fn read_u8(bdf: Bdf, offset: u8) -> u8 {
    if let Some(r) = ecam_register::<u8>(bdf, offset) {
        return r.read();
    }
    address_port().write(bdf.address(offset));
    data_port::<u8>(offset).read()
}

/// Writes the dword at `offset` (rounded down to a multiple of 4).
pub fn write_u32(bdf: Bdf, offset: u8, value: u32) {
    if let Some(r) = ecam_register::<u32>(bdf, offset) {
        return r.write(value);
    }
    address_port().write(bdf.address(offset));
    data_port::<u32>(0).write(value);
}

/// Writes the word at `offset` (rounded down to a multiple of 2).
pub fn write_u16(bdf: Bdf, offset: u8, value: u16) {
    if let Some(r) = ecam_register::<u16>(bdf, offset) {
        return r.write(value);
    }
    address_port().write(bdf.address(offset));
    data_port::<u16>(offset & 2).write(value);
}

/// Writes the byte at `offset`.
pub fn write_u8(bdf: Bdf, offset: u8, value: u8) {
    if let Some(r) = ecam_register::<u8>(bdf, offset) {
        return r.write(value);
    }
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
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: u8 = 0x34;
}

/// Capability IDs.
pub mod cap {
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// The offset of the first capability with ID `id`, walking the list from the capabilities
/// pointer (one configuration read, then one per capability passed). `None` when the
/// function has none, or the list is malformed (a pointer into the header, a loop).
pub fn find_capability(bdf: Bdf, id: u8) -> Option<u8> {
    capability(bdf, id).map(|(at, _)| at)
}

/// [`find_capability`], with the capability's first dword (ID, next pointer, and the
/// capability's own 16 bits: Message Control for MSI and MSI-X).
fn capability(bdf: Bdf, id: u8) -> Option<(u8, u32)> {
    let mut at = read_u8(bdf, reg::CAPABILITIES) & 0xfc;
    // 48 capabilities of 4 bytes fill the 192 bytes after the header: more is a loop.
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        let first = read_u32(bdf, at);
        if first as u8 == id {
            return Some((at, first));
        }
        at = (first >> 8) as u8 & 0xfc;
    }
    None
}

/// A function's MSI-X capability (PCI Local Bus 3.0, 6.8.2), as read from configuration
/// space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in configuration space.
    pub offset: u8,
    /// Number of vectors (Table Size + 1).
    pub vectors: u16,
    /// BAR holding the table (Table BIR).
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
}

/// MSI-X table entry layout and Message Control bits.
pub mod msix {
    /// Bytes of one table entry.
    pub const ENTRY_SIZE: u64 = 16;
    /// Offset in an entry of the message address (64 bits).
    pub const ADDRESS: u64 = 0;
    /// Offset in an entry of the message data (32 bits), followed by Vector Control.
    pub const DATA: u64 = 8;
    /// Vector Control: Mask Bit.
    pub const MASKED: u32 = 1;
    /// Message Control: MSI-X Enable.
    pub const ENABLE: u16 = 1 << 15;
    /// Message Control: Function Mask.
    pub const FUNCTION_MASK: u16 = 1 << 14;
}

/// Finds and reads the MSI-X capability of `bdf`, if it has one: the capability walk (which
/// reads Message Control), then one read for the table's location.
pub fn msix_capability(bdf: Bdf) -> Option<MsixCapability> {
    let (offset, first) = capability(bdf, cap::MSIX)?;
    let control = (first >> 16) as u16;
    let table = read_u32(bdf, offset + 4);
    Some(MsixCapability {
        offset,
        vectors: (control & 0x7ff) + 1,
        table_bar: (table & 7) as u8,
        table_offset: table & !7,
    })
}

/// Writes Message Control of the MSI-X capability: MSI-X Enable and Function Mask (the
/// other bits are read-only).
pub fn set_msix_control(bdf: Bdf, cap: &MsixCapability, enable: bool, function_mask: bool) {
    let mut value = 0;
    if enable {
        value |= msix::ENABLE;
    }
    if function_mask {
        value |= msix::FUNCTION_MASK;
    }
    write_u16(bdf, cap.offset + 2, value);
}

/// Command register bits.
pub mod command {
    /// Respond to memory-space accesses (BAR decode).
    pub const MEMORY: u16 = 1 << 1;
    /// Let the device master the bus (DMA).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Do not assert INTx.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Reads the command register, sets `set`, clears `clear`, writes it back; returns the new
/// value.
pub fn update_command(bdf: Bdf, set: u16, clear: u16) -> u16 {
    let value = (read_u16(bdf, reg::COMMAND) & !clear) | set;
    write_u16(bdf, reg::COMMAND, value);
    value
}

/// A memory BAR as read (and sized) from configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBar {
    /// Which BAR (0–5).
    pub index: u8,
    /// Address programmed in it (0: unassigned).
    pub base: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// 64-bit BAR (occupies `index` and `index + 1`).
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// Why a BAR cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    /// BAR index past 5 (or a 64-bit BAR at 5).
    Index(u8),
    /// An I/O-space BAR, or a memory BAR of a reserved type.
    NotMemory(u32),
    /// The BAR is not implemented (sizes to zero).
    Unimplemented,
    /// The BAR lies (partly) outside `[top of RAM, 4 GiB)`, where this guest's identity map
    /// reaches device memory that is not RAM.
    Placement {
        /// BAR address.
        base: u64,
        /// BAR size.
        size: u64,
        /// Top of RAM.
        ram_end: u64,
    },
    /// The base is not aligned to the BAR's size.
    Misaligned {
        /// BAR address.
        base: u64,
        /// BAR size.
        size: u64,
    },
}

impl fmt::Display for BarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BarError::Index(i) => write!(f, "BAR {i} does not exist"),
            BarError::NotMemory(raw) => write!(f, "BAR is not a memory BAR (reads {raw:#x})"),
            BarError::Unimplemented => write!(f, "BAR is not implemented"),
            BarError::Placement {
                base,
                size,
                ram_end,
            } => write!(
                f,
                "BAR at {base:#x} size {size:#x} is not between the top of RAM ({ram_end:#x}) \
                 and 4 GiB"
            ),
            BarError::Misaligned { base, size } => {
                write!(f, "BAR at {base:#x} is not aligned to its size {size:#x}")
            }
        }
    }
}

const BAR_IO: u32 = 1 << 0;
const BAR_TYPE_MASK: u32 = 0b110;
const BAR_TYPE_32: u32 = 0b000;
const BAR_TYPE_64: u32 = 0b100;
const BAR_PREFETCH: u32 = 1 << 3;
const BAR_ADDR_MASK: u32 = !0xf;

/// Reads and sizes memory BAR `index` of `bdf`. Memory decode is off while the BAR holds the
/// sizing pattern; the BAR and the command register are restored afterwards. Boot only: four
/// configuration accesses (one more for a 64-bit BAR, two more if memory decode was on).
pub fn memory_bar(bdf: Bdf, index: u8) -> Result<MemoryBar, BarError> {
    memory_bar_with_command(bdf, index, read_u16(bdf, reg::COMMAND))
}

/// [`memory_bar`] for a caller that has just read the command register (`command`), which
/// saves reading it again. Memory decode is turned off (and back on) around the sizing only
/// when `command` has it on.
pub fn memory_bar_with_command(bdf: Bdf, index: u8, command: u16) -> Result<MemoryBar, BarError> {
    if index > 5 {
        return Err(BarError::Index(index));
    }
    let off = reg::BAR0 + 4 * index;
    let low = read_u32(bdf, off);
    if low & BAR_IO != 0 {
        return Err(BarError::NotMemory(low));
    }
    let is_64bit = match low & BAR_TYPE_MASK {
        BAR_TYPE_32 => false,
        BAR_TYPE_64 if index < 5 => true,
        BAR_TYPE_64 => return Err(BarError::Index(index)),
        _ => return Err(BarError::NotMemory(low)),
    };
    let high = if is_64bit { read_u32(bdf, off + 4) } else { 0 };

    let decoding = command & command::MEMORY != 0;
    if decoding {
        write_u16(bdf, reg::COMMAND, command & !command::MEMORY);
    }
    write_u32(bdf, off, u32::MAX);
    let size_low = read_u32(bdf, off) & BAR_ADDR_MASK;
    // A BAR's size is a power of two and every address bit above it is writable: when the low
    // dword has a writable address bit, the high dword's are all writable and need no sizing.
    let size_high = if is_64bit && size_low == 0 {
        write_u32(bdf, off + 4, u32::MAX);
        let v = read_u32(bdf, off + 4);
        write_u32(bdf, off + 4, high);
        v
    } else {
        u32::MAX
    };
    write_u32(bdf, off, low);
    if decoding {
        write_u16(bdf, reg::COMMAND, command);
    }

    let mask = u64::from(size_high) << 32 | u64::from(size_low);
    if mask == 0 || (!is_64bit && size_low == 0) {
        return Err(BarError::Unimplemented);
    }
    Ok(MemoryBar {
        index,
        base: u64::from(high) << 32 | u64::from(low & BAR_ADDR_MASK),
        size: (!mask).wrapping_add(1),
        is_64bit,
        prefetchable: low & BAR_PREFETCH != 0,
    })
}

/// Programs memory BAR `bar.index` of `bdf` with `base` (memory decode off meanwhile, if it
/// was on; the command register is restored). Returns the BAR with its new base.
pub fn assign_memory_bar(bdf: Bdf, bar: MemoryBar, base: u64) -> MemoryBar {
    let off = reg::BAR0 + 4 * bar.index;
    let flags = read_u32(bdf, off) & !BAR_ADDR_MASK;
    let command = read_u16(bdf, reg::COMMAND);
    let decoding = command & command::MEMORY != 0;
    if decoding {
        write_u16(bdf, reg::COMMAND, command & !command::MEMORY);
    }
    write_u32(bdf, off, (base as u32 & BAR_ADDR_MASK) | flags);
    if bar.is_64bit {
        write_u32(bdf, off + 4, (base >> 32) as u32);
    }
    if decoding {
        write_u16(bdf, reg::COMMAND, command);
    }
    MemoryBar { base, ..bar }
}

/// The registers behind a memory BAR, after checking it lies between the top of RAM and the
/// end of the identity map (4 GiB) and is aligned to its size.
pub fn map_memory_bar(bar: &MemoryBar) -> Result<MmioRegion, BarError> {
    let ram_end = boot::info().mem_size;
    let placement = BarError::Placement {
        base: bar.base,
        size: bar.size,
        ram_end,
    };
    let Some(end) = bar.base.checked_add(bar.size) else {
        return Err(placement);
    };
    if bar.base < ram_end || end > IDENTITY_MAPPED || bar.size == 0 {
        return Err(placement);
    }
    if !bar.size.is_power_of_two() || !bar.base.is_multiple_of(bar.size) {
        return Err(BarError::Misaligned {
            base: bar.base,
            size: bar.size,
        });
    }
    // SAFETY: the range is mapped (identity map below 4 GiB) and is not RAM (above the top of
    // RAM the boot info gives), so no Rust object lives there: it is the device's registers
    // as its BAR says. What the device does with DMA is the driver's to account for (it only
    // gives the device addresses of DMA buffers and channel slots).
    Ok(unsafe { MmioRegion::new(bar.base, bar.size) })
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

/// The function at `bdf`, if one is present (two configuration reads).
pub fn function(bdf: Bdf) -> Option<PciFunction> {
    probe(bdf)
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
