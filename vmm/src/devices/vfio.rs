//! A real PCI function passed through VFIO as a driver domain's device: what it needs from
//! the VMM beyond its PCI function ([`crate::domain::DeviceModel`]).
//!
//! - Opened once ([`DomainDevice::vfio`]): the host check first ([`crate::host::vfio_ready`]:
//!   the device exists, is bound to vfio-pci, its IOMMU group is viable), then the VFIO
//!   container and device ([`ddvm_passthrough::vfio::VfioPci`]), which live as long as the
//!   device does, across every domain it serves.
//! - Its BAR areas become memory slots of each domain's VM when the domain is handed the
//!   device, so register and doorbell accesses run at memory speed; the MSI-X table and PBA
//!   are left out of them and trap.
//! - The VMM's own orderly shutdown of an NVMe controller goes through its registers, as for
//!   the emulated controller ([`crate::devices::nvme::nvme_shutdown`]); a NIC has nothing a
//!   reset loses.
//! - Its class comes from the device: an Ethernet controller (class 02/00/00) is served over
//!   a network channel by a NIC domain (`nic=` on the domain's command line), anything else
//!   over a block channel (`nvme=`).
//! - A function without MSI-X wakes its domain through its INTx line, which vfio-pci masks
//!   each time it fires: the domain's vCPU unmasks it when the domain next waits
//!   ([`DeviceModel::on_wait`]), in the exit the wait costs anyway.

use std::any::Any;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddvm_abi::channel::class;
use ddvm_passthrough::vfio::{ResetMethod, VfioCounters, VfioHandle, VfioPci};
use ddvm_passthrough::{DmaWindow, PciBackend, PciDevice};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use crate::domain::{DeviceModel, DeviceShutdown, DomainDevice, DomainError, PCI_MMIO_BASE};

/// First KVM memory slot of a device's BAR areas (slot 0 is the domain's RAM).
const FIRST_BAR_SLOT: u32 = 8;
/// End of the window BARs are placed in (the I/O APIC sits at 0xfec0_0000).
const PCI_MMIO_END: u64 = 0xfec0_0000;
/// Class code of an NVMe controller.
const CLASS_NVME: u32 = 0x01_08_02;
/// Class code of an Ethernet controller.
const CLASS_ETHERNET: u32 = 0x02_00_00;

/// The channel class a domain serves a real device of PCI class code `class_code` as: a
/// network channel for an Ethernet controller, a block channel for anything else (whose
/// driver domain then finds out whether it has a driver for it).
pub fn channel_class(class_code: u32) -> u32 {
    if class_code == CLASS_ETHERNET {
        class::NET
    } else {
        class::BLK
    }
}

/// How to open a VFIO device (`[domain.device] kind = "vfio"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioSpec {
    /// PCI address, `0000:00:03.0`.
    pub address: String,
    /// How it is reset between domains.
    pub reset: ResetMethod,
}

/// A VFIO device's part of a [`DomainDevice`].
pub struct VfioModel {
    handle: VfioHandle,
    // The IOMMU's fault reports about this device.
    faults: Mutex<Option<DmarWatch>>,
    // (slot, guest-physical address, area index) of each BAR area.
    slots: Vec<(u32, u64, usize)>,
    nvme: bool,
    class: u32,
    vm: Mutex<Option<Arc<VmFd>>>,
}

impl VfioModel {
    /// The device's counters (attach, map and reset timings; quiesce checks).
    pub fn counters(&self) -> VfioCounters {
        self.handle.counters()
    }

    /// The device's handle (its address, areas, and the reset-failure test hook).
    pub fn handle(&self) -> &VfioHandle {
        &self.handle
    }
}

impl DeviceModel for VfioModel {
    fn set_vm(&self, vm: Option<Arc<VmFd>>) {
        if let Some(vm) = &vm {
            for &(slot, gpa, i) in &self.slots {
                let area = &self.handle.areas()[i];
                let region = kvm_userspace_memory_region {
                    slot,
                    guest_phys_addr: gpa,
                    memory_size: area.size,
                    userspace_addr: area.host_addr,
                    flags: 0,
                };
                // SAFETY: the range is a mapping of the device's BAR that its backend keeps
                // while the device is open, which is longer than any VM it is handed (the
                // device outlives its domains, and a domain's VM goes before its device can);
                // its slot and guest range are this device's own, outside the domain's RAM.
                if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
                    tracing::warn!(
                        "VFIO device {}: BAR {} area at {gpa:#x} as memory slot {slot}: {e}; its accesses exit",
                        self.handle.address(),
                        area.bar
                    );
                }
            }
        }
        // Clearing: the slots go with the VM.
        *crate::sync::lock(&self.vm) = vm;
    }

    fn shutdown(&self, pci: &Mutex<PciDevice>, timeout: Duration) -> DeviceShutdown {
        if self.class == class::NET {
            // A NIC has nothing a reset loses.
            return DeviceShutdown::NotEnabled;
        }
        if !self.nvme {
            return DeviceShutdown::Failed("not an NVMe controller".into());
        }
        crate::devices::nvme::nvme_shutdown(pci, timeout)
    }

    fn class(&self) -> u32 {
        self.class
    }

    /// A line vfio-pci masked when it fired is unmasked before the domain's vCPU blocks: a
    /// cause raised since the domain acknowledged its causes then ends the wait at once.
    fn on_wait(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        let line = self.handle.intx()?.clone();
        Some(Arc::new(move || line.unmask()))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn dma_faults(&self) -> u64 {
        crate::sync::lock(&self.faults)
            .as_mut()
            .map_or(0, DmarWatch::poll)
    }
}

/// The IOMMU's DMA fault reports about one device, read from the kernel log.
///
/// VFIO's type1 IOMMU gives userspace no fault notification; Intel's IOMMU driver logs each
/// fault (`DMAR: [DMA Write NO_PASID] Request device [00:10.0] fault addr ...`), rate-limited.
/// `/dev/kmsg` is read without blocking, from where it was when the device was opened; a
/// fault is logged by the IOMMU's interrupt handler when the DMA is refused, before the
/// device can complete the command that attempted it.
struct DmarWatch {
    kmsg: std::fs::File,
    // `[bb:dd.f]`, as the kernel prints the requester.
    requester: String,
    faults: u64,
}

impl DmarWatch {
    /// Watches for faults of the device at `address` (`0000:bb:dd.f`); None (with a warning)
    /// where the kernel log cannot be read.
    fn open(address: &str) -> Option<DmarWatch> {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)).map(|_| f));
        match opened {
            Ok(kmsg) => Some(DmarWatch {
                kmsg,
                requester: format!("[{}]", address.strip_prefix("0000:").unwrap_or(address)),
                faults: 0,
            }),
            Err(e) => {
                tracing::warn!(
                    "VFIO device {address}: /dev/kmsg: {e}; DMA the IOMMU blocks is noticed only by what follows from it (a request deadline)"
                );
                None
            }
        }
    }

    /// Reads what the kernel logged since the last call; returns the faults counted so far.
    fn poll(&mut self) -> u64 {
        use std::io::Read;
        let mut record = [0u8; 1024];
        // Bounded: a flood of kernel messages costs at most this many reads per call.
        for _ in 0..256 {
            match self.kmsg.read(&mut record) {
                Ok(0) => break,
                Ok(n) => {
                    let text = String::from_utf8_lossy(&record[..n]);
                    if is_dma_fault(&text, &self.requester) {
                        self.faults += 1;
                    }
                }
                // Records overwritten before they were read: go on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        self.faults
    }
}

/// Whether a kernel log record reports a DMA fault of `requester` (`[bb:dd.f]`).
fn is_dma_fault(record: &str, requester: &str) -> bool {
    let text = record.split_once(';').map_or(record, |(_, t)| t);
    text.contains("DMAR:") && text.contains("fault") && text.contains(requester)
}

/// Places `bars` (index, size) from [`PCI_MMIO_BASE`], largest first, each aligned to its
/// size; None when they do not fit below the I/O APIC.
fn place_bars(mut bars: Vec<(u8, u64)>) -> Option<Vec<(u8, u64)>> {
    bars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut next = PCI_MMIO_BASE;
    let mut out = Vec::new();
    for (index, size) in bars {
        let at = next.checked_next_multiple_of(size)?;
        let end = at.checked_add(size)?;
        if end > PCI_MMIO_END {
            return None;
        }
        out.push((index, at));
        next = end;
    }
    Some(out)
}

impl DomainDevice {
    /// Opens the VFIO device of `spec` for the domain `name`: checked on the host first (it
    /// exists, is bound to vfio-pci, its IOMMU group is viable), then its container and
    /// device, its BARs placed from [`PCI_MMIO_BASE`]. Detached until a boot attaches it.
    pub fn vfio(name: &str, spec: &VfioSpec) -> Result<Arc<DomainDevice>, DomainError> {
        let device_err = |source: Box<dyn std::error::Error + Send + Sync>| DomainError::Device {
            name: name.to_string(),
            source,
        };
        let ready = crate::host::vfio_ready(Path::new("/sys"), &spec.address)
            .map_err(|e| device_err(Box::new(e)))?;
        let (backend, handle) = VfioPci::open(&ready.address, &ready.sysfs_path, spec.reset)
            .map_err(|e| device_err(Box::new(e)))?;
        let nvme = backend.ids().class_code == CLASS_NVME;
        let class = channel_class(backend.ids().class_code);
        let sizes: Vec<(u8, u64)> = backend.bars().iter().map(|b| (b.index, b.size)).collect();
        let placed = place_bars(sizes.clone()).ok_or_else(|| {
            device_err(
                format!(
                    "VFIO device {}: BARs {sizes:?} (index, bytes) do not fit between {PCI_MMIO_BASE:#x} and {PCI_MMIO_END:#x}",
                    ready.address
                )
                .into(),
            )
        })?;
        let slots = handle
            .areas()
            .iter()
            .enumerate()
            .filter_map(|(i, area)| {
                let base = placed.iter().find(|(b, _)| *b == area.bar)?.1;
                Some((FIRST_BAR_SLOT + i as u32, base + area.offset, i))
            })
            .collect();
        let pci =
            PciDevice::new(Box::new(backend), &placed).map_err(|e| device_err(Box::new(e)))?;
        Ok(DomainDevice::new(
            pci,
            // The IOMMU is the real device's DMA window; this one only counts (nothing goes
            // through it).
            DmaWindow::detached(),
            Box::new(VfioModel {
                faults: Mutex::new(DmarWatch::open(&ready.address)),
                handle,
                slots,
                nvme,
                class,
                vm: Mutex::new(None),
            }),
            None,
            // Whether it has a volatile write cache is the domain's to find out (Identify).
            None,
        ))
    }

    /// The VFIO device's counters, if this device is one.
    pub fn vfio_counters(&self) -> Option<VfioCounters> {
        let model = self.model().as_any().downcast_ref::<VfioModel>()?;
        Some(model.counters())
    }

    /// The VFIO device's handle, if this device is one.
    pub fn vfio_handle(&self) -> Option<&VfioHandle> {
        let model = self.model().as_any().downcast_ref::<VfioModel>()?;
        Some(model.handle())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ethernet_controller_is_served_over_a_network_channel() {
        assert_eq!(channel_class(0x02_00_00), class::NET);
        assert_eq!(channel_class(0x01_08_02), class::BLK);
        assert_eq!(channel_class(0x02_80_00), class::BLK);
    }

    #[test]
    fn bars_are_placed_largest_first_and_aligned() {
        let placed = place_bars(vec![(0, 0x4000), (2, 0x10_0000), (4, 0x1000)]).unwrap();
        assert_eq!(
            placed,
            vec![
                (2, PCI_MMIO_BASE),
                (0, PCI_MMIO_BASE + 0x10_0000),
                (4, PCI_MMIO_BASE + 0x10_4000)
            ]
        );
        assert!(place_bars(vec![(0, 1 << 30)]).is_none());
    }

    #[test]
    fn dma_faults_are_recognised_in_kernel_records() {
        let r = "[00:10.0]";
        assert!(is_dma_fault("3,512,26875116,-;DMAR: [DMA Read NO_PASID] Request device [00:10.0] fault addr 0x2000000 [fault reason 0x06] PTE Read access is not set", r));
        assert!(is_dma_fault("3,9,1,-;DMAR: [DMA Write] Request device [00:10.0] PASID ffffffff fault addr 3a98000 [fault reason 05] PTE Write access is not set", r));
        assert!(!is_dma_fault(
            "3,512,1,-;DMAR: [DMA Read NO_PASID] Request device [00:11.0] fault addr 0x0",
            r
        ));
        assert!(!is_dma_fault(
            "6,1,1,-;nvme nvme0: I/O 12 QID 1 timeout [00:10.0]",
            r
        ));
        assert!(!is_dma_fault(
            "3,2,1,-;DMAR: DRHD: handling fault status reg 2",
            r
        ));
    }
}
