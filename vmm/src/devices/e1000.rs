//! The emulated e1000 (an Intel 82540EM, `ddvm_passthrough::EmulatedE1000`) as a driver
//! domain's device: what it needs from the VMM beyond its PCI function
//! ([`crate::domain::DeviceModel`]).
//!
//! - Its BAR0 (128 KiB of registers) is placed at [`PCI_MMIO_BASE`]; every register access is
//!   a trapped MMIO exit, and a TDT write transmits on the writing vCPU's thread — except the
//!   page of filter tables (`0x5000..0x6000`: the MTA, the receive addresses, the VFTA and
//!   the other registers without side effects), which is memory. A driver's initialization
//!   writes every entry of those tables (about 160 registers); as exits, at 23 to 75 µs each
//!   under PVM, they were most of a restarted NIC domain's time to ready. Each domain's VM
//!   gets a page of its own as a memory slot when the VM is made
//!   ([`DeviceModel::vm_created`]; a standby's too, so the slot's KVM SRCU grace period is
//!   not waited for on the recovery path); the model makes it the NIC's when the domain is
//!   handed the NIC and takes it back at the quiesce.
//! - Reception runs on a worker thread of its own, or on its owner's thread
//!   ([`DeviceThread::Owner`], through the model's `E1000Poller`).
//! - It has no MSI-X: the model writes the domain's wake eventfd when a cause enabled in IMS
//!   is raised, which ends the domain's wait.
//! - The domain serves it over a network channel (`class::NET`), named on its command line as
//!   `nic=00:01.0 nic_bar0=0xe0000000/0x20000`.
//! - There is no orderly shutdown through its registers to fall back on: a NIC holds nothing
//!   that a reset loses ([`DeviceShutdown::NotEnabled`]).

use std::any::Any;
use std::sync::{Arc, Mutex, Weak};
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
    // Guest-physical address of the page of filter tables.
    tables_gpa: u64,
    // Each live VM made for the NIC and its page of tables (mapped at the VM's creation).
    pages: Mutex<Vec<(Weak<VmFd>, TablePage)>>,
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

    /// A new page of tables mapped into `vm` as its memory slot; `None` (with a warning) when
    /// it cannot be: the domain's table accesses then exit, as every other register's.
    fn map_page(&self, vm: &VmFd) -> Option<TablePage> {
        let page = match TablePage::new() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    "e1000: cannot allocate a page of filter tables: {e}; their accesses exit"
                );
                return None;
            }
        };
        let region = kvm_userspace_memory_region {
            slot: TABLE_PAGE_SLOT,
            guest_phys_addr: self.tables_gpa,
            memory_size: page.size(),
            userspace_addr: page.host_addr(),
            flags: 0,
        };
        // SAFETY: the page lives as long as a clone of `page` does, and the domain made with
        // this VM holds one until after its VM is dropped ([`DeviceModel::vm_created`]); the
        // guest range is inside the device's BAR0, outside the domain's RAM, and the slot is
        // this device's own. The domain writing the page is its purpose: the model reads it
        // only with volatile loads.
        match unsafe { vm.set_user_memory_region(region) } {
            Ok(()) => Some(page),
            Err(e) => {
                tracing::warn!(
                    "e1000: filter tables at {:#x} as memory slot {TABLE_PAGE_SLOT}: {e}; their accesses exit",
                    self.tables_gpa
                );
                None
            }
        }
    }
}

impl DeviceModel for E1000Model {
    /// The page of filter tables mapped into the VM at its creation becomes the NIC's (its
    /// values copied in); `None` gives the NIC its own page back, so that nothing the going
    /// domain writes in its page reaches the NIC. Every other register access traps.
    fn set_vm(&self, vm: Option<Arc<VmFd>>) {
        let Some(vm) = vm else {
            self.monitor.use_tables(None);
            return;
        };
        let found = crate::sync::lock(&self.pages)
            .iter()
            .find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&vm)))
            .map(|(_, p)| p.clone());
        // A VM made without `vm_created` keeps every table access trapped.
        self.monitor.use_tables(found.as_ref());
    }

    /// Maps a page of tables into the new VM now, off the recovery path.
    fn vm_created(&self, vm: &Arc<VmFd>) -> Option<Box<dyn Any + Send + Sync>> {
        let page = self.map_page(vm)?;
        let mut pages = crate::sync::lock(&self.pages);
        pages.retain(|(w, _)| w.strong_count() > 0);
        pages.push((Arc::downgrade(vm), page.clone()));
        Some(Box::new(page))
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
        let tables_gpa = PCI_MMIO_BASE + nic.table_page().offset;
        let pci = PciDevice::new(Box::new(nic), &[(0, PCI_MMIO_BASE)])
            .map_err(|e| device_err(Box::new(e)))?;
        Ok(DomainDevice::new(
            pci,
            dma,
            Box::new(E1000Model {
                monitor,
                tables_gpa,
                pages: Mutex::new(Vec::new()),
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
