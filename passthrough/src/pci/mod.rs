//! PCI functions as a driver domain sees them.
//!
//! A [`PciDevice`] pairs a [`ConfigSpace`] (what the domain reads and writes through
//! configuration mechanism #1 or the ECAM window of the [`PciBus`]) with a [`PciBackend`] (the
//! device model, or VFIO for real hardware). BAR addresses are fixed by the VMM before boot; the domain may size
//! BARs but not move them. Memory Space Enable gates MMIO, Bus Master Enable gates DMA, and the
//! PCI Express capability's Initiate Function Level Reset resets the backend.
//!
//! A backend with MSI-X ([`PciBackend::msix`]) gets an MSI-X capability; the [`PciDevice`]
//! serves its table and Pending Bit Array from an [`Msix`] it shares with the backend. An
//! interrupt is a wake-up of the domain's vCPU: the domain never takes a real one.
//!
//! A device outlives the driver domain it serves: when the domain dies the VMM quiesces it
//! ([`PciDevice::quiesce`]) before the domain's memory goes, and attaches it to the next domain
//! ([`PciDevice::attach`]) before that one boots.

mod bus;
mod config;
mod device;
mod msix;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use bus::{PciBus, ECAM_BUS_SIZE};
pub use config::{ConfigSpace, CONFIG_SPACE_SIZE, MSIX_CAP_OFFSET, PCIE_CAP_OFFSET};
pub use device::PciDevice;
pub use msix::{Msix, MsixLayout, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS};

/// Smallest BAR this crate hands out (one page, so BARs can be mapped into a domain).
pub const MIN_BAR_SIZE: u64 = 4096;
/// Number of base address registers in a type-0 header.
pub const NUM_BARS: u8 = 6;

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Class code: base class, subclass, programming interface (e.g. 0x010802 for NVMe).
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
}

/// Kind of a memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit MMIO: one BAR register, address below 4 GiB.
    Mmio32,
    /// 64-bit MMIO: this BAR register and the next one.
    Mmio64,
}

/// One memory BAR of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR register index, 0..=5 (a 64-bit BAR also uses `index + 1`).
    pub index: u8,
    /// Size in bytes: a power of two, at least [`MIN_BAR_SIZE`].
    pub size: u64,
    /// 32- or 64-bit.
    pub kind: BarKind,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// The domain's wake eventfd: writing 1 ends its vCPU's wait. It is what an interrupt of the
/// device (an MSI-X message) does to the domain.
pub type WakeDomain = Arc<EventFd>;

/// A device model (or real device) behind a [`PciDevice`].
///
/// Calls come from vCPU threads (MMIO), from the configuration path, and from the VMM
/// (reset). `bar_read`/`bar_write` are only called with `offset + data.len()` inside the BAR.
pub trait PciBackend: Send {
    /// The function's identity.
    fn ids(&self) -> PciIds;
    /// The function's memory BARs.
    fn bars(&self) -> Vec<BarInfo>;
    /// An MMIO read at `offset` inside BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// An MMIO write at `offset` inside BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// Function reset: the device goes back to its power-on state and all its DMA stops before
    /// this returns.
    fn reset(&mut self);
    /// Bus Master Enable changed: the device may DMA only while enabled.
    fn set_bus_master(&mut self, enabled: bool);
    /// The domain the device served is going away (called by [`PciDevice::quiesce`] after the
    /// function reset): once this returns the device neither accesses that domain's memory
    /// (every DMA is refused until [`PciBackend::attach`]) nor writes the wake eventfd it was
    /// given (a VFIO device unbinds its vectors), and holds no reference to the memory. The
    /// [`Msix`] is detached by the [`PciDevice`]. The default does nothing, which is right
    /// only for a backend that neither DMAs nor holds the wake eventfd: every other backend
    /// implements it.
    fn detach(&mut self) {}
    /// Serve a new domain: DMA into `mem` (its memory; device addresses are its
    /// guest-physical addresses) and wake it with `wake` (the [`Msix`] of the device gets it
    /// too). Called on a quiesced device before the new domain boots; bus mastering stays off
    /// until its driver enables it. An error (why, in one line) leaves the device detached:
    /// it is refused to the domain (a real device whose reset keeps failing). The default
    /// does nothing (see [`PciBackend::detach`]).
    fn attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) -> Result<(), String> {
        let _ = (mem, wake);
        Ok(())
    }
    /// Where the function's MSI-X table and Pending Bit Array are, if it has MSI-X. The
    /// [`PciDevice`] serves those ranges itself: `bar_read`/`bar_write` are never called for
    /// them.
    fn msix(&self) -> Option<MsixLayout> {
        None
    }
    /// The function's MSI-X state, given once by [`PciDevice::new`] when
    /// [`PciBackend::msix`] is `Some`: an emulated device keeps it to [`Msix::raise`] vectors.
    fn set_msix(&mut self, msix: Arc<Msix>) {
        let _ = msix;
    }
    /// Whether the function may send MSI-X messages changed (MSI-X Enable set and Function
    /// Mask clear); also called with `false` at every function reset of a function with MSI-X. A device whose vectors
    /// signal the wake eventfd directly (VFIO) arms and disarms them here.
    fn msix_enabled(&mut self, enabled: bool) {
        let _ = enabled;
    }
    /// Whether the function has an INTx line that wakes the domain (a VFIO function without
    /// MSI-X): its configuration space then shows Interrupt Pin INTA#.
    fn intx(&self) -> bool {
        false
    }
    /// Whether every domain is handed the function at its documented power-on state: the
    /// function reset the quiesce gives is complete (every register at its power-on value,
    /// nothing the last domain left behind), as the VMM's own models guarantee and a real
    /// device's reset does not always (QEMU's e1000 ignores CTRL.RST). Its driver may then
    /// skip its own reset and the writes of power-on values.
    fn clean_at_handover(&self) -> bool {
        false
    }
    /// Whether the function may assert INTx changed (the Command register's Interrupt
    /// Disable, which a function reset clears); also called with `false` before every
    /// function reset of a function with INTx, and with `true` after one the domain asked for.
    /// A device whose line signals the wake eventfd directly (VFIO) arms and disarms it here.
    fn intx_enabled(&mut self, enabled: bool) {
        let _ = enabled;
    }
}

/// Errors building PCI devices and buses (all are VMM configuration errors).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// The backend describes a BAR that cannot exist.
    #[error("BAR {index}: size {size:#x} with kind {kind:?}; expected a power of two of at least 4 KiB in registers 0..=5, not overlapping another BAR")]
    BadBar {
        /// BAR index.
        index: u8,
        /// Size reported by the backend.
        size: u64,
        /// Kind reported by the backend.
        kind: BarKind,
    },
    /// A BAR of the backend was given no address.
    #[error("BAR {index}: no address assigned; expected one entry in bar_addresses")]
    MissingBarAddress {
        /// BAR index.
        index: u8,
    },
    /// An address was given for a BAR the backend does not have (or twice).
    #[error("BAR {index}: address given for a BAR the device does not have, or given twice")]
    UnknownBar {
        /// BAR index.
        index: u8,
    },
    /// The address is not aligned to the BAR size, or does not fit the BAR kind.
    #[error("BAR {index}: address {addr:#x} for {size:#x} bytes; expected a multiple of the size, below 4 GiB for a 32-bit BAR")]
    BadBarAddress {
        /// BAR index.
        index: u8,
        /// Requested address.
        addr: u64,
        /// BAR size.
        size: u64,
    },
    /// Two BARs of the device overlap.
    #[error("BAR {index}: range at {addr:#x} overlaps another BAR of the device")]
    BarOverlap {
        /// BAR index.
        index: u8,
        /// Requested address.
        addr: u64,
    },
    /// The backend's MSI-X layout cannot exist.
    #[error("MSI-X: {layout:?}; expected 1 to 2048 vectors, table and PBA 8-byte aligned inside BARs of the device, not overlapping")]
    BadMsix {
        /// Layout reported by the backend.
        layout: MsixLayout,
    },
    /// Device number outside 0..=31.
    #[error("PCI device number {device}: expected 0..=31")]
    BadDeviceNumber {
        /// Requested device number.
        device: u8,
    },
    /// Device number already used on the bus.
    #[error("PCI device number {device} is already in use on bus 0")]
    SlotInUse {
        /// Requested device number.
        device: u8,
    },
}
