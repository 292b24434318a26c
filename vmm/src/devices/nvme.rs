//! The emulated NVMe controller as a driver domain's device: what it needs from the VMM
//! beyond its PCI function ([`crate::domain::DeviceModel`]).
//!
//! - While the driver uses shadow doorbells, its I/O doorbell writes carry no information the
//!   controller needs: they are ioeventfds of the current domain's VM, served in the kernel
//!   (~23 µs) instead of exiting to the VMM (~70 µs).
//! - Its passes run on a worker thread of its own, or on its owner's thread
//!   ([`crate::domain::DeviceThread::Owner`], through [`NvmePoller`]).
//! - The VMM's own normal shutdown through the controller's registers (CC.SHN, CSTS.SHST).
//! - Its counters ([`NvmeStats`]).

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddvm_passthrough::{
    DmaWindow, EmulatedNvme, NvmeConfig, NvmeMonitor, NvmePoller, NvmeStats, PciDevice,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

use crate::domain::{
    DeviceModel, DevicePoller, DeviceShutdown, DeviceThread, Domain, DomainDevice, DomainError,
    PCI_MMIO_BASE,
};

/// The emulated controller's part of a [`DomainDevice`].
pub struct NvmeModel {
    monitor: NvmeMonitor,
    // The VM whose ioeventfds the shadow-doorbell callback (un)registers: the current domain's.
    vm: Arc<Mutex<Option<Arc<VmFd>>>>,
}

impl NvmeModel {
    /// The controller's counters (they keep counting across domains).
    pub fn stats(&self) -> NvmeStats {
        self.monitor.stats()
    }
}

impl DeviceModel for NvmeModel {
    fn set_vm(&self, vm: Option<Arc<VmFd>>) {
        *crate::sync::lock(&self.vm) = vm;
    }

    /// The NVMe normal shutdown ([`nvme_shutdown`]).
    fn shutdown(&self, pci: &Mutex<PciDevice>, timeout: Duration) -> DeviceShutdown {
        nvme_shutdown(pci, timeout)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The NVMe normal shutdown through the controller's registers (emulated or real): CC.SHN =
/// 01b, then CSTS.SHST polled until it reads 10b, at most `timeout`; the controller writes its
/// volatile cache back to the medium.
pub fn nvme_shutdown(pci: &Mutex<PciDevice>, timeout: Duration) -> DeviceShutdown {
    const CC: u64 = 0x14;
    const CSTS: u64 = 0x1c;
    const CC_EN: u32 = 1;
    const CC_SHN: u32 = 0b11 << 14;
    const CC_SHN_NORMAL: u32 = 0b01 << 14;
    const CSTS_SHST: u32 = 0b11 << 2;
    const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;
    let lock = || crate::sync::lock(pci);
    let t0 = Instant::now();
    let read = |off: u64| {
        let mut b = [0u8; 4];
        lock().backend.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    };
    let cc = read(CC);
    if cc == u32::MAX {
        return DeviceShutdown::Failed("the controller does not respond".into());
    }
    if cc & CC_EN == 0 {
        // Disabled: its last reset already dropped whatever its cache held.
        return DeviceShutdown::NotEnabled;
    }
    let value = cc & !CC_SHN | CC_SHN_NORMAL;
    lock().backend.bar_write(0, CC, &value.to_le_bytes());
    loop {
        let csts = read(CSTS);
        if csts != u32::MAX && csts & CSTS_SHST == CSTS_SHST_COMPLETE {
            return DeviceShutdown::Done(t0.elapsed());
        }
        if t0.elapsed() >= timeout {
            return DeviceShutdown::Failed(format!(
                "CSTS.SHST not complete within {timeout:?} (CSTS {csts:#x})"
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl DevicePoller for NvmePoller {
    fn poll(&self) -> u64 {
        NvmePoller::poll(self)
    }

    fn arm(&self) -> bool {
        NvmePoller::arm(self)
    }

    fn eventfd(&self) -> std::os::fd::RawFd {
        NvmePoller::eventfd(self)
    }

    fn clear(&self) {
        NvmePoller::clear(self)
    }

    fn set_driver_waits(&self, on: bool) {
        NvmePoller::set_driver_waits(self, on)
    }
}

impl DomainDevice {
    /// Creates the emulated NVMe controller of `cfg` (opening its backing file), detached.
    pub fn emulated_nvme(
        name: &str,
        cfg: &NvmeConfig,
        thread: DeviceThread,
    ) -> Result<Arc<DomainDevice>, DomainError> {
        let device_err = |source: Box<dyn std::error::Error + Send + Sync>| DomainError::Device {
            name: name.to_string(),
            source,
        };
        // Detached until a boot attaches it to the domain's memory.
        let dma = DmaWindow::detached();
        let nvme =
            EmulatedNvme::new(cfg.clone(), dma.clone()).map_err(|e| device_err(Box::new(e)))?;
        let poller = match thread {
            DeviceThread::Worker => {
                nvme.start_worker().map_err(|e| device_err(Box::new(e)))?;
                None
            }
            DeviceThread::Owner => Some(Arc::new(nvme.poller()) as Arc<dyn DevicePoller>),
        };
        let vm: Arc<Mutex<Option<Arc<VmFd>>>> = Arc::default();
        // While the driver uses shadow doorbells, its I/O doorbell writes carry no information
        // the device needs: serve them in the kernel (ioeventfd, ~23 µs) instead of exiting to
        // us (~70 µs).
        let doorbell = nvme
            .doorbell_eventfd()
            .try_clone()
            .map_err(|e| device_err(Box::new(e)))?;
        let range = nvme.io_doorbell_range();
        let current = vm.clone();
        let domain = name.to_string();
        nvme.set_on_shadow_doorbells(Box::new(move |active| {
            let Some(vm) = crate::sync::lock(&current).clone() else {
                return;
            };
            for off in range.clone().step_by(4) {
                let addr = IoEventAddress::Mmio(PCI_MMIO_BASE + off);
                let r = if active {
                    vm.register_ioevent(&doorbell, &addr, NoDatamatch)
                } else {
                    vm.unregister_ioevent(&doorbell, &addr, NoDatamatch)
                };
                if let Err(e) = r {
                    // The domain decides how often this runs (it sets up its shadow doorbells
                    // at every controller bring-up): limited.
                    crate::limited!(
                        debug,
                        key: domain,
                        "domain {domain}: doorbell ioeventfd at {off:#x}: {e}"
                    );
                }
            }
        }));
        let monitor = nvme.monitor();
        let pci = PciDevice::new(Box::new(nvme), &[(0, PCI_MMIO_BASE)])
            .map_err(|e| device_err(Box::new(e)))?;
        Ok(DomainDevice::new(
            pci,
            dma,
            Box::new(NvmeModel { monitor, vm }),
            poller,
            Some(cfg.volatile_write_cache),
        ))
    }

    /// The emulated controller's counters, if this device is one.
    pub fn nvme_stats(&self) -> Option<NvmeStats> {
        let model = self.model().as_any().downcast_ref::<NvmeModel>()?;
        Some(model.stats())
    }
}

impl Domain {
    /// Statistics of the emulated NVMe controller, if the domain has one.
    pub fn nvme_stats(&self) -> Option<NvmeStats> {
        self.device()?.nvme_stats()
    }
}
