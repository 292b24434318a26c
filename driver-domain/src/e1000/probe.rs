//! Finding 8254x functions on PCI bus 0 and reaching their registers.
//!
//! A function is driven when it is an Ethernet controller (class 02/00/00) from Intel with a
//! device ID of a part this driver knows ([`model`]): the 82540, 82544 and 82545 copper parts,
//! which share the legacy descriptor format and differ in how the EEPROM is read. Other Intel
//! Ethernet functions (e.g. the 82574L that QEMU's q35 machine adds by default) are left alone.
//!
//! Under QEMU's PVH boot no firmware placed the BARs: an unassigned BAR0 goes at
//! [`FALLBACK_BAR0`] and up (above RAM and the NVMe driver's fallback, below 4 GiB).

#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

use ddvm_abi::layout::IDENTITY_MAPPED;
use guest_kernel::boot;
use guest_kernel::mmio::MmioRegion;
use guest_kernel::pci::{self, command, BarError, Bdf, MemoryBar, PciFunction};

/// Class code of an Ethernet controller.
pub const ETHERNET_CLASS: u32 = 0x02_00_00;
/// Intel's PCI vendor ID.
pub const INTEL: u16 = 0x8086;
/// Where unassigned BAR0s go, one after the other.
pub const FALLBACK_BAR0: u64 = 0xc800_0000;

/// The 8254x parts this driver knows, by how they differ for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// 82540EM/EP: EEPROM through EERD.
    I82540,
    /// 82544EI/GC: no EERD, the EEPROM is bit-banged through EECD (Microwire).
    I82544,
    /// 82545EM: EEPROM through EERD.
    I82545,
}

impl Model {
    /// Whether the part has the EEPROM Read register.
    pub fn has_eerd(self) -> bool {
        !matches!(self, Model::I82544)
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Model::I82540 => "82540",
            Model::I82544 => "82544",
            Model::I82545 => "82545",
        })
    }
}

/// Device IDs of the copper parts this driver drives.
const KNOWN: &[(u16, Model)] = &[
    (0x100e, Model::I82540), // 82540EM (QEMU `e1000`, `e1000-82540em`)
    (0x1015, Model::I82540), // 82540EM LOM
    (0x1016, Model::I82540), // 82540EP LOM
    (0x1017, Model::I82540), // 82540EP
    (0x101e, Model::I82540), // 82540EP LP
    (0x1008, Model::I82544), // 82544EI copper
    (0x100c, Model::I82544), // 82544GC copper (QEMU `e1000-82544gc`)
    (0x100d, Model::I82544), // 82544GC LOM
    (0x100f, Model::I82545), // 82545EM copper (QEMU `e1000-82545em`)
];

/// The part at `function`, if this driver drives it.
pub fn model(function: &PciFunction) -> Option<Model> {
    if function.class != ETHERNET_CLASS || function.vendor != INTEL {
        return None;
    }
    KNOWN
        .iter()
        .find(|(id, _)| *id == function.device)
        .map(|(_, m)| *m)
}

/// A function ready for the driver: memory decode and bus mastering on.
#[derive(Clone, Copy, Debug)]
pub struct Found {
    /// The PCI function.
    pub function: PciFunction,
    /// Which part it is.
    pub model: Model,
    /// Its BAR0.
    pub bar: MemoryBar,
    /// The registers behind BAR0.
    pub registers: MmioRegion,
}

/// Why a function that is present cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// BAR0 is unusable.
    Bar(Bdf, BarError),
    /// BAR0 is unassigned and does not fit between RAM and 4 GiB.
    NoRoom(Bdf, u64),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Bar(bdf, e) => write!(f, "e1000 at {bdf}: BAR0: {e}"),
            ProbeError::NoRoom(bdf, size) => write!(
                f,
                "e1000 at {bdf}: BAR0 ({size:#x} bytes) is unassigned and does not fit below 4 GiB"
            ),
        }
    }
}

/// Every 8254x function on bus 0, each enabled on the bus, in bus order.
pub fn find_all() -> Result<Vec<Found>, ProbeError> {
    let mut next = FALLBACK_BAR0.max(boot::info().mem_size);
    let mut found = Vec::new();
    for function in pci::enumerate_bus0() {
        let Some(model) = model(&function) else {
            continue;
        };
        found.push(enable(function, model, &mut next)?);
    }
    Ok(found)
}

/// Places BAR0 if nobody did (at `*next`, which moves past it), maps it, and turns on memory
/// decode and bus mastering (INTx stays off: the driver polls, see `device`).
fn enable(function: PciFunction, model: Model, next: &mut u64) -> Result<Found, ProbeError> {
    let bdf = function.bdf;
    let command = pci::read_u16(bdf, pci::reg::COMMAND);
    let mut bar =
        pci::memory_bar_with_command(bdf, 0, command).map_err(|e| ProbeError::Bar(bdf, e))?;
    if bar.base == 0 {
        let base = next.next_multiple_of(bar.size);
        let end = base
            .checked_add(bar.size)
            .filter(|end| *end <= IDENTITY_MAPPED)
            .ok_or(ProbeError::NoRoom(bdf, bar.size))?;
        *next = end;
        bar = pci::assign_memory_bar(bdf, bar, base);
    }
    let registers = pci::map_memory_bar(&bar).map_err(|e| ProbeError::Bar(bdf, e))?;
    pci::write_u16(
        bdf,
        pci::reg::COMMAND,
        command | command::MEMORY | command::BUS_MASTER | command::INTX_DISABLE,
    );
    Ok(Found {
        function,
        model,
        bar,
        registers,
    })
}
