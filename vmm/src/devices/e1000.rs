//! The emulated e1000 (an Intel 82540EM, `ddvm_passthrough::EmulatedE1000`) as a driver
//! domain's device: what it needs from the VMM beyond its PCI function
//! ([`crate::domain::DeviceModel`]).
//!
//! - Its BAR0 (128 KiB of registers) is placed at [`PCI_MMIO_BASE`]; every register access is
//!   a trapped MMIO exit, and a TDT write transmits on the writing vCPU's thread — except the
//!   page of filter tables (`0x5000..0x6000`: the MTA, the receive addresses, the VFTA and
//!   the other registers without side effects), which the model keeps in a page of memory
//!   that becomes a memory slot of each domain's VM. A driver's initialization writes every
//!   entry of those tables (about 160 registers); as exits, at 23 to 75 µs each under PVM,
//!   they were most of a restarted NIC domain's time to ready.
//! - Reception runs on a worker thread of its own, or on its owner's thread
//!   ([`DeviceThread::Owner`], through the model's `E1000Poller`).
//! - It has no MSI-X: the model writes the domain's wake eventfd when a cause enabled in IMS
//!   is raised, which ends the domain's wait.
//! - The domain serves it over a network channel (`class::NET`), named on its command line as
//!   `nic=00:01.0 nic_bar0=0xe0000000/0x20000`.
//! - There is no orderly shutdown through its registers to fall back on: a NIC holds nothing
//!   that a reset loses ([`DeviceShutdown::NotEnabled`]).

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddvm_abi::channel::class;
use ddvm_passthrough::{
    DmaWindow, E1000Config, E1000Monitor, E1000Poller, E1000Stats, EmulatedE1000, PciDevice,
    TablePage, Wire, WireStats,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use crate::domain::{
    DeviceModel, DevicePoller, DeviceShutdown, DeviceThread, Domain, DomainDevice, DomainError,
    PCI_MMIO_BASE,
};

/// An emulated e1000 to build with a domain ([`crate::devices::DeviceSpec::EmulatedE1000`]):
/// its MAC and the wire it is plugged into, which only the first device built from the spec
/// gets (clones share it).
#[derive(Clone)]
pub struct E1000Spec {
    mac: [u8; 6],
    wire: Arc<Mutex<Option<Box<dyn Wire>>>>,
}

impl std::fmt::Debug for E1000Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E1000Spec")
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

impl E1000Spec {
    /// A NIC with MAC `mac` on `wire`.
    pub fn new(mac: [u8; 6], wire: Box<dyn Wire>) -> Self {
        E1000Spec {
            mac,
            wire: Arc::new(Mutex::new(Some(wire))),
        }
    }

    /// The configuration of the device to build for domain `name`; an error when the wire
    /// went to a device built before.
    pub fn take(&self, name: &str) -> Result<E1000Config, DomainError> {
        let wire = crate::sync::lock(&self.wire)
            .take()
            .ok_or_else(|| DomainError::Device {
                name: name.to_string(),
                source: "the e1000's wire is already plugged into a NIC built before".into(),
            })?;
        Ok(E1000Config {
            mac: self.mac,
            wire,
        })
    }
}

/// The memory slot of the page of filter tables: the first after the domain's RAM (a domain
/// has one device, so it is not also a VFIO device's).
const TABLE_PAGE_SLOT: u32 = 8;

/// The emulated e1000's part of a [`DomainDevice`].
pub struct E1000Model {
    monitor: E1000Monitor,
    // The page of filter tables and its guest-physical address.
    tables: TablePage,
    tables_gpa: u64,
}

impl E1000Model {
    /// The NIC's counters (they keep counting across domains).
    pub fn stats(&self) -> E1000Stats {
        self.monitor.stats()
    }

    /// Its wire's counters.
    pub fn wire_stats(&self) -> WireStats {
        self.monitor.wire_stats()
    }
}

impl DeviceModel for E1000Model {
    /// The page of filter tables becomes a memory slot of the VM; every other register access
    /// traps.
    fn set_vm(&self, vm: Option<Arc<VmFd>>) {
        let Some(vm) = vm else {
            // The slot goes with the VM.
            return;
        };
        let region = kvm_userspace_memory_region {
            slot: TABLE_PAGE_SLOT,
            guest_phys_addr: self.tables_gpa,
            memory_size: self.tables.size(),
            userspace_addr: self.tables.host_addr(),
            flags: 0,
        };
        // SAFETY: the page is the model's, kept alive by `self.tables` for as long as this
        // device lives, which is longer than any VM it is handed (a domain's VM goes before
        // its device can); the guest range is inside the device's BAR0, outside the domain's
        // RAM, and the slot is this device's own. The domain writing the page is its purpose:
        // the model reads it only with volatile loads.
        if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
            tracing::warn!(
                "e1000: filter tables at {:#x} as memory slot {TABLE_PAGE_SLOT}: {e}; their accesses exit",
                self.tables_gpa
            );
        }
    }

    /// Not applicable: a NIC has nothing a reset loses, so there is nothing to write back.
    fn shutdown(&self, _pci: &Mutex<PciDevice>, _timeout: Duration) -> DeviceShutdown {
        DeviceShutdown::NotEnabled
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn class(&self) -> u32 {
        class::NET
    }
}

impl DevicePoller for E1000Poller {
    fn poll(&self) -> u64 {
        E1000Poller::poll(self) as u64
    }

    /// Nothing to arm: the wire's descriptor is readable while frames wait.
    fn arm(&self) -> bool {
        false
    }

    fn eventfd(&self) -> std::os::fd::RawFd {
        self.fd()
    }

    /// The receive pass drains what made the wire's descriptor readable.
    fn clear(&self) {}
}

impl DomainDevice {
    /// Creates the emulated e1000 of `cfg`, detached, with a worker thread that receives from
    /// its wire: a NIC that outlives its domains (hand it over as
    /// [`crate::devices::DeviceSpec::Persistent`]).
    pub fn emulated_e1000(name: &str, cfg: E1000Config) -> Result<Arc<DomainDevice>, DomainError> {
        Self::emulated_e1000_on(name, cfg, DeviceThread::Worker)
    }

    /// As [`DomainDevice::emulated_e1000`], its reception run by `thread`.
    pub fn emulated_e1000_on(
        name: &str,
        cfg: E1000Config,
        thread: DeviceThread,
    ) -> Result<Arc<DomainDevice>, DomainError> {
        let device_err = |source: Box<dyn std::error::Error + Send + Sync>| DomainError::Device {
            name: name.to_string(),
            source,
        };
        // Detached until a boot attaches it to the domain's memory.
        let dma = DmaWindow::detached();
        let nic = EmulatedE1000::new(cfg, dma.clone()).map_err(|e| device_err(Box::new(e)))?;
        let poller = match thread {
            DeviceThread::Worker => {
                nic.start_worker().map_err(|e| device_err(Box::new(e)))?;
                None
            }
            DeviceThread::Owner => Some(Arc::new(nic.poller()) as Arc<dyn DevicePoller>),
        };
        let monitor = nic.monitor();
        let tables = nic.table_page();
        let tables_gpa = PCI_MMIO_BASE + tables.offset;
        let pci = PciDevice::new(Box::new(nic), &[(0, PCI_MMIO_BASE)])
            .map_err(|e| device_err(Box::new(e)))?;
        Ok(DomainDevice::new(
            pci,
            dma,
            Box::new(E1000Model {
                monitor,
                tables,
                tables_gpa,
            }),
            poller,
            None,
        ))
    }

    /// The emulated e1000's counters, if this device is one.
    pub fn e1000_stats(&self) -> Option<E1000Stats> {
        let model = self.model().as_any().downcast_ref::<E1000Model>()?;
        Some(model.stats())
    }

    /// The emulated e1000's wire counters, if this device is one.
    pub fn e1000_wire_stats(&self) -> Option<WireStats> {
        let model = self.model().as_any().downcast_ref::<E1000Model>()?;
        Some(model.wire_stats())
    }
}

impl Domain {
    /// Statistics of the emulated e1000, if the domain has one.
    pub fn e1000_stats(&self) -> Option<E1000Stats> {
        self.device()?.e1000_stats()
    }
}
