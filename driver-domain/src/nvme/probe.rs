//! Finding the device the VMM gave the domain on PCI bus 0 and reaching its registers: the
//! NVMe controller (`nvme=`, `nvme_bar0=`), or, through [`find_for`], the function of another
//! driver (the NIC: `nic=`, `nic_bar0=`).
//!
//! Each configuration access is an exit (one through ECAM, two through the ports): finding and
//! enabling a controller at a known address takes nine (vendor and class, BAR0 read and sized,
//! the command register read once and written once).
//!
//! Under ddvm the VMM has assigned BAR0, and says where (`nvme_bar0=BASE/SIZE`, see
//! [`BarHint`]): the probe then reads only the vendor and device IDs (something is in the slot;
//! a warm standby's slot is empty until the hand-over) and writes the command register: two
//! exits instead of nine, on the path of every restart. Without the hint BAR0 is used as found. Under QEMU's PVH boot no
//! firmware ran and BAR0 reads 0: the driver places it itself at [`FALLBACK_BAR0`] (above RAM,
//! below 4 GiB, inside the identity map).

use core::fmt;

use guest_kernel::boot;
use guest_kernel::mmio::MmioRegion;
use guest_kernel::pci::{self, command, BarError, Bdf, MemoryBar, PciFunction};

use ddvm_abi::layout::IDENTITY_MAPPED;

/// Class code of an NVM Express controller (mass storage, non-volatile memory, NVMe).
pub const NVME_CLASS: u32 = 0x01_08_02;
/// Where an unassigned BAR0 goes (QEMU q35: above its ECAM window at 0xb000_0000).
pub const FALLBACK_BAR0: u64 = 0xc000_0000;

/// Where to look for the controller (command line `nvme=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Scan bus 0 for the NVMe class code (32+ configuration reads).
    Scan,
    /// Only this function (`nvme=BB:DD.F`): two configuration reads.
    At(Bdf),
    /// Do not look (`nvme=none`).
    Nowhere,
}

impl Location {
    /// Parses the `nvme=` value: `none`/`off`, `BB:DD.F` (hex), anything else is `None`.
    pub fn parse(value: &str) -> Option<Self> {
        if value == "none" || value == "off" {
            return Some(Location::Nowhere);
        }
        let (bus, rest) = value.split_once(':')?;
        let (dev, func) = rest.split_once('.')?;
        let bus = u8::from_str_radix(bus, 16).ok()?;
        let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
        let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
        Some(Location::At(Bdf::new(bus, dev, func)))
    }
}

/// Where the VMM placed BAR0 (`nvme_bar0=BASE/SIZE`, each hex with `0x`): the VMM is this
/// machine's firmware, so the BAR is neither read nor sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarHint {
    /// Guest-physical base.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

impl BarHint {
    /// Parses `0xBASE/0xSIZE`; anything else is `None`.
    pub fn parse(value: &str) -> Option<Self> {
        let (base, size) = value.split_once('/')?;
        let hex = |v: &str| u64::from_str_radix(v.strip_prefix("0x")?, 16).ok();
        Some(BarHint {
            base: hex(base)?,
            size: hex(size)?,
        })
    }
}

/// A controller ready for the driver: memory decode and bus mastering on, INTx off.
#[derive(Clone, Copy, Debug)]
pub struct Found {
    /// The PCI function.
    pub function: PciFunction,
    /// Its BAR0.
    pub bar: MemoryBar,
    /// The registers behind BAR0.
    pub registers: MmioRegion,
}

/// Why a controller that is present cannot be used.
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
            ProbeError::Bar(bdf, e) => write!(f, "device at {bdf}: BAR0: {e}"),
            ProbeError::NoRoom(bdf, size) => write!(
                f,
                "device at {bdf}: BAR0 ({size:#x} bytes) is unassigned and does not fit below 4 GiB"
            ),
        }
    }
}

/// Finds the first NVMe controller at `location` and enables it on the bus. With `hint` and
/// a known function, the VMM's placement of BAR0 is taken as given.
pub fn find(location: Location, hint: Option<BarHint>) -> Result<Option<Found>, ProbeError> {
    find_for(crate::driver::Driver::Nvme, location, hint, false)
}

/// Finds the first function `driver` drives at `location` and enables it on the bus. With
/// `hint` and a known function, the VMM's placement of BAR0 is taken as given, and so is the
/// class: the hint's key (`nvme=`, `nic=`) says which driver the VMM meant, so the function
/// is taken as that driver's class; the IDs are read. INTx is left enabled when `intx` (the
/// VMM said the function's INTx line wakes the domain: `nic_intx`), else disabled.
pub fn find_for(
    driver: crate::driver::Driver,
    location: Location,
    hint: Option<BarHint>,
    intx: bool,
) -> Result<Option<Found>, ProbeError> {
    let intx_bit = if intx { 0 } else { command::INTX_DISABLE };
    if let (Location::At(bdf), Some(hint)) = (location, hint) {
        return find_placed(driver, bdf, hint, intx_bit);
    }
    let ours = |f: &PciFunction| crate::driver::pick(f) == Some(driver);
    let function = match location {
        Location::Nowhere => None,
        Location::At(bdf) => pci::function(bdf).filter(ours),
        // The first function the driver is picked for (`driver::pick`).
        Location::Scan => pci::enumerate_bus0().into_iter().find(ours),
    };
    let Some(function) = function else {
        return Ok(None);
    };
    let bdf = function.bdf;
    // Read once: sizing BAR0 needs it, and so does enabling the function at the end.
    let command = pci::read_u16(bdf, pci::reg::COMMAND);
    let mut bar =
        pci::memory_bar_with_command(bdf, 0, command).map_err(|e| ProbeError::Bar(bdf, e))?;
    if bar.base == 0 {
        let ram_end = boot::info().mem_size;
        let base = FALLBACK_BAR0.max(ram_end).next_multiple_of(bar.size);
        if base
            .checked_add(bar.size)
            .is_none_or(|end| end > IDENTITY_MAPPED)
        {
            return Err(ProbeError::NoRoom(bdf, bar.size));
        }
        bar = pci::assign_memory_bar(bdf, bar, base);
    }
    let registers = pci::map_memory_bar(&bar).map_err(|e| ProbeError::Bar(bdf, e))?;
    pci::write_u16(
        bdf,
        pci::reg::COMMAND,
        (command & !command::INTX_DISABLE) | command::MEMORY | command::BUS_MASTER | intx_bit,
    );
    Ok(Some(Found {
        function,
        bar,
        registers,
    }))
}

/// [`find_for`] where the VMM said where BAR0 is: one read to see what is in the slot, one
/// write to enable it.
fn find_placed(
    driver: crate::driver::Driver,
    bdf: Bdf,
    hint: BarHint,
    intx_bit: u16,
) -> Result<Option<Found>, ProbeError> {
    let id = pci::read_u32(bdf, pci::reg::VENDOR_ID);
    let vendor = id as u16;
    if vendor == 0xffff || vendor == 0 {
        return Ok(None);
    }
    let (class, is_64bit) = match driver {
        // NVMe's BAR0 is 64-bit (MLBAR/MUBAR).
        crate::driver::Driver::Nvme => (NVME_CLASS, true),
        // The 8254x's BAR0 is 32-bit memory.
        crate::driver::Driver::E1000 => (crate::e1000::probe::ETHERNET_CLASS, false),
    };
    let function = PciFunction {
        bdf,
        vendor,
        device: (id >> 16) as u16,
        // The VMM put a device of this driver's class here (`nvme=`, `nic=`).
        class,
    };
    let bar = MemoryBar {
        index: 0,
        base: hint.base,
        size: hint.size,
        is_64bit,
        prefetchable: false,
    };
    let registers = pci::map_memory_bar(&bar).map_err(|e| ProbeError::Bar(bdf, e))?;
    // After a function reset every other bit of the register is 0.
    pci::write_u16(
        bdf,
        pci::reg::COMMAND,
        command::MEMORY | command::BUS_MASTER | intx_bit,
    );
    Ok(Some(Found {
        function,
        bar,
        registers,
    }))
}
