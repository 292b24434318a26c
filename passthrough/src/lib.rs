//! The PCI devices handed to ddvm driver domains.
//!
//! A driver domain owns exactly one device. This crate models what the domain sees of it:
//!
//! - [`pci`]: the device's type-0 configuration space (IDs, command register, BARs with the
//!   sizing protocol, a PCI Express capability advertising Function Level Reset, an MSI-X
//!   capability whose table and PBA the [`pci::Msix`] serves: an interrupt is a wake-up of the
//!   domain's vCPU), the [`pci::PciBackend`] trait that each device model (and VFIO) implements, and a
//!   [`pci::PciBus`] answering configuration mechanism #1 (ports 0xCF8/0xCFC) and a memory-mapped
//!   ECAM window.
//! - [`dma`]: the [`dma::DmaWindow`], the only way a device reaches domain memory. It plays the
//!   IOMMU: anything not entirely inside the domain's memory, or attempted while bus mastering is
//!   off or while the device serves no domain, is refused and counted.
//! - [`nvme`]: an emulated NVMe 1.4 controller backed by a file, with a worker thread, shadow
//!   doorbells with event indexes, completion interrupts through MSI-X, and a volatile write
//!   cache that a reset can lose.
//! - [`e1000`]: an emulated Intel 82540EM Ethernet controller (legacy descriptors, receive
//!   filter, interrupts as wake-ups, a reset that keeps the link up) joined to a wire.
//! - [`net`]: the wires an emulated NIC's frames travel on: an in-process pair (with loss,
//!   duplication and delay), QEMU's stream and datagram socket framings, a TAP device.
//! - [`vfio`]: a real PCI function through VFIO (container, device, DMA map of the domain's
//!   RAM, BAR areas, MSI-X to the domain's wake eventfd, quiesce and reset).
//!
//! Everything here runs on the host without KVM, so it is tested with plain vm-memory guest
//! memory standing in for a domain. Everything the domain writes (config space, registers,
//! queues, commands, PRPs, doorbells) is hostile input: bad values get the status a real device
//! gives, or are ignored and counted; nothing panics.

#![deny(missing_docs)]

pub mod dma;
pub mod e1000;
pub mod fileio;
pub mod net;
pub mod nvme;
pub mod pci;
mod sync;
pub mod vfio;

pub use dma::{DmaError, DmaWindow};

static THREAD_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what every thread this crate starts (the device models' workers) runs first; the VMM
/// installs the worker's seccomp filter there. Only the first call counts.
pub fn on_thread_start(hook: fn()) {
    let _ = THREAD_START.set(hook);
}

/// Runs the [`on_thread_start`] hook, if one was set, on the calling thread.
pub(crate) fn thread_started() {
    if let Some(hook) = THREAD_START.get() {
        hook();
    }
}
pub use e1000::{
    E1000Config, E1000Error, E1000Monitor, E1000Poller, E1000Stats, EmulatedE1000, TablePage,
};
pub use net::{
    wire_pair, DgramWire, Every, PairConfig, PairEnd, StreamListener, StreamWire, TapWire, Wire,
    WireError, WireStats, MAX_FRAME,
};
pub use nvme::{EmulatedNvme, NvmeConfig, NvmeError, NvmeMonitor, NvmePoller, NvmeStats};
pub use pci::{
    BarInfo, BarKind, ConfigSpace, Msix, MsixLayout, PciBackend, PciBus, PciDevice, PciError,
    PciIds, WakeDomain, ECAM_BUS_SIZE,
};
