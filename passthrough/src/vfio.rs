//! Real PCI functions through VFIO, behind [`PciBackend`].
//!
//! The VFIO container and device are opened once and live as long as the VMM; driver domains
//! come and go. What the domain sees is synthesised ([`crate::pci::ConfigSpace`] from the real
//! IDs, BAR sizes and MSI-X layout): nothing of the real configuration space passes through,
//! and memory decode, bus mastering, interrupts and resets are the only effects ddvm has on the
//! hardware's configuration.
//!
//! - **Attach** ([`PciBackend::attach`]): a device left unclean by a failed reset is reset
//!   again first (or the attach fails); then the domain's RAM is mapped for DMA with
//!   IOVA = guest-physical address, and memory decode is switched on. The BAR areas
//!   ([`VfioHandle::areas`], mmapped once at open, with the MSI-X table and PBA pages left out)
//!   become KVM memory slots of the domain's VM, so doorbell writes cost no exit; the table
//!   and PBA trap and are served by [`crate::pci::PciDevice`]. When the domain enables MSI-X,
//!   every vector signals the domain's wake eventfd. A function without MSI-X (an Intel 8254x)
//!   has its INTx line bound to the wake eventfd instead ([`IntxLine`]).
//! - **Quiesce** ([`crate::pci::PciDevice::quiesce`], after the domain's vCPU stopped): bus
//!   mastering off and read back, then the reset ([`ResetMethod`]: the device's own reset for
//!   its class — an NVMe controller disable, an 8254x's CTRL.RST with its DMA engines and ring
//!   registers cleared — or a function level reset; either way MSI-X and INTx off first), then
//!   the unmap of the domain's RAM
//!   (its size checked) and memory decode off. Only then may the domain's memory be freed:
//!   the backend holds a clone of the mapped memory until the unmap succeeded, so it cannot be
//!   freed while the device may still reach it.
//! - A reset that fails leaves the device **unclean**: bus mastering is off and nothing is
//!   mapped, so it can DMA nowhere; the next attach retries the reset and refuses the device
//!   to the domain if it fails again.
//!
//! Interrupt masking is not passed to the hardware: an interrupt is only a wake-up for a
//! driver domain, and a spurious one costs a poll.
//!
//! **INTx** is level-triggered: vfio-pci masks the line each time it fires (and signals the
//! eventfd), and it stays masked until unmasked. ddvm unmasks it when the domain next asks to
//! wait ([`IntxLine::unmask`], on the wait exit the domain pays anyway: no exit of its own).
//! The domain acknowledges the device's causes (reads them clear) before it looks for work and
//! waits, so a line still asserted at the unmask is a cause raised since: vfio-pci then
//! signals the eventfd at once and the wait ends. No assertion is lost (a line asserted while
//! masked is seen at the unmask) and a line the domain left asserted costs one spurious
//! wake-up per wait, never a storm (it is masked again until the next wait).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_set, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::pci::{BarInfo, BarKind, MsixLayout, PciBackend, PciIds, WakeDomain, MIN_BAR_SIZE};

/// The VFIO ioctls whose result the crate's wrappers do not give back, or that are called
/// where the crate's device is out of reach (the INTx unmask on a domain's wait).
mod ioctls {
    #![allow(missing_docs)]
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE.into(), VFIO_BASE + 7);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE.into(), VFIO_BASE + 10);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE.into(), VFIO_BASE + 11);
}
use ioctls::{VFIO_DEVICE_GET_INFO, VFIO_DEVICE_RESET, VFIO_DEVICE_SET_IRQS};

const PAGE: u64 = 4096;
const COMMAND: u64 = 0x04;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const STATUS: u64 = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_PTR: u64 = 0x34;
const CAP_ID_MSIX: u8 = 0x11;
/// Class code of an NVMe controller (mass storage, non-volatile memory, NVM Express).
const CLASS_NVME: u32 = 0x01_08_02;
/// Class code of an Ethernet controller.
const CLASS_ETHERNET: u32 = 0x02_00_00;
/// Intel's PCI vendor ID.
const INTEL: u16 = 0x8086;
/// Device IDs of the Intel 8254x copper parts ddvm's driver domain drives (and whose reset
/// [`DeviceKind::E1000`] knows).
const E1000_IDS: &[u16] = &[
    0x100e, 0x1015, 0x1016, 0x1017, 0x101e, 0x1008, 0x100c, 0x100d, 0x100f,
];
/// MSI-X vectors bound to the wake eventfd when the domain enables MSI-X (a fixed set per
/// attach: changing the count re-enables MSI-X in the kernel).
const MAX_WAKE_VECTORS: u32 = 16;

/// How the device is reset when its domain goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetMethod {
    /// A function level reset (`VFIO_DEVICE_RESET`): every register back to power-on; the
    /// kernel waits about 100 ms for the function to come back.
    Flr,
    /// The device's own reset, by class ([`DeviceKind`]): for an NVMe controller CC.EN = 0
    /// and CSTS.RDY = 0 awaited (bounded by CAP.TO), which stops its queues in milliseconds;
    /// for an Intel 8254x the interrupts masked, receiver and transmitter off, CTRL.RST, then
    /// the ring registers cleared and the DMA engines read back off. A function level reset
    /// only when that does not quiesce the device and the kernel offers one. Devices of
    /// another class get a function level reset.
    Controller,
}

/// What ddvm knows of a device's class: which reset of its own it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// An NVMe controller (class 01/08/02).
    Nvme,
    /// An Intel 8254x Ethernet controller (class 02/00/00, a known device ID).
    E1000,
    /// Anything else: only a function level reset.
    Other,
}

impl DeviceKind {
    /// The kind of the function with `ids`.
    pub fn of(ids: &PciIds) -> DeviceKind {
        if ids.class_code == CLASS_NVME {
            DeviceKind::Nvme
        } else if ids.class_code == CLASS_ETHERNET
            && ids.vendor == INTEL
            && E1000_IDS.contains(&ids.device)
        {
            DeviceKind::E1000
        } else {
            DeviceKind::Other
        }
    }

    /// Its own reset, as logs name it; None when it has none.
    pub fn own_reset(self) -> Option<&'static str> {
        match self {
            DeviceKind::Nvme => Some("CC.EN = 0"),
            DeviceKind::E1000 => Some("CTRL.RST"),
            DeviceKind::Other => None,
        }
    }
}

/// The INTx line of a VFIO function bound to its domain's wake eventfd, as the domain's wait
/// path unmasks it (see the module documentation): vfio-pci masks the line each time it
/// fires. Shared by the backend (which arms and disarms the line) and its [`VfioHandle`].
pub struct IntxLine {
    // A duplicate of the device fd, closed with the device (its group cannot leave the
    // container while any fd of the device is open).
    file: std::sync::Mutex<Option<File>>,
    armed: std::sync::atomic::AtomicBool,
    unmasks: AtomicU64,
}

impl std::fmt::Debug for IntxLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxLine")
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

impl IntxLine {
    /// Unmasks the line if it is bound to a domain (one `VFIO_DEVICE_SET_IRQS`; nothing
    /// otherwise). A line still asserted makes vfio-pci signal the eventfd at once.
    pub fn unmask(&self) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = file.as_ref() else {
            return;
        };
        let set = vfio_irq_set {
            argsz: std::mem::size_of::<vfio_irq_set>() as u32,
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
            index: VFIO_PCI_INTX_IRQ_INDEX,
            start: 0,
            count: 1,
            ..Default::default()
        };
        // SAFETY: the kernel reads `argsz` bytes of `set` (no data follows with DATA_NONE),
        // which lives across the call; the fd is a VFIO device's.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(file, VFIO_DEVICE_SET_IRQS(), &set) };
        if rc == 0 {
            self.unmasks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the line is bound to a domain's wake eventfd now.
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Unmasks done so far.
    pub fn unmasks(&self) -> u64 {
        self.unmasks.load(Ordering::Relaxed)
    }
}

impl ResetMethod {
    /// The configuration name (`flr`, `controller`).
    pub fn name(self) -> &'static str {
        match self {
            ResetMethod::Flr => "flr",
            ResetMethod::Controller => "controller",
        }
    }
}

/// Errors opening or driving a VFIO device; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A VFIO call failed.
    #[error("VFIO device {address}: {what}: {source}")]
    Vfio {
        /// PCI address.
        address: String,
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A system call failed.
    #[error("VFIO device {address}: {what}: {source}")]
    Io {
        /// PCI address.
        address: String,
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The device cannot be used as ddvm needs it.
    #[error("VFIO device {address}: {what}")]
    Unsupported {
        /// PCI address.
        address: String,
        /// What it lacks, and what is expected.
        what: String,
    },
    /// A reset failed: the device stays unclean (no DMA, bus mastering off).
    #[error("VFIO device {address}: reset failed: {why}; the device stays unclean with bus mastering off and no DMA mapping")]
    Reset {
        /// PCI address.
        address: String,
        /// Why.
        why: String,
    },
}

/// One mmapped area of a BAR (the device's registers, reached without exits once it is a
/// memory slot of the domain's VM). The mapping belongs to the [`VfioPci`]: it lives as long
/// as the device is open, which is longer than any domain it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarArea {
    /// BAR index.
    pub bar: u8,
    /// Offset of the area in the BAR (a multiple of 4 KiB).
    pub offset: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Host virtual address of the mapping (for `KVM_SET_USER_MEMORY_REGION`).
    pub host_addr: u64,
}

/// Counters and last timings of a VFIO device, shared between the backend and its handle.
#[derive(Default)]
struct Stats {
    attaches: AtomicU64,
    attach_ns: AtomicU64,
    map_ns: AtomicU64,
    flr_resets: AtomicU64,
    flr_ns: AtomicU64,
    controller_resets: AtomicU64,
    controller_ns: AtomicU64,
    reset_failures: AtomicU64,
    unclean: AtomicU64,
    unmapped_bytes: AtomicU64,
    unmap_failures: AtomicU64,
    bus_master_after_quiesce: AtomicU64,
    quiesces: AtomicU64,
    fail_resets: AtomicU32,
    // What the last reset was: 0 none, 1 controller, 2 FLR; and its time.
    last_reset: AtomicU64,
    last_reset_ns: AtomicU64,
}

/// A snapshot of a VFIO device's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioCounters {
    /// Domains the device was attached to.
    pub attaches: u64,
    /// The last attach (reset retry if unclean, DMA map, memory decode on).
    pub last_attach: Duration,
    /// The last DMA map of a domain's RAM.
    pub last_map: Duration,
    /// Function level resets done.
    pub flr_resets: u64,
    /// The last function level reset.
    pub last_flr: Duration,
    /// Controller disables that quiesced the device.
    pub controller_resets: u64,
    /// The last controller disable.
    pub last_controller_reset: Duration,
    /// Resets that failed.
    pub reset_failures: u64,
    /// Whether the device is unclean now (its last reset failed).
    pub unclean: bool,
    /// Bytes the last unmap removed from the IOMMU.
    pub last_unmapped_bytes: u64,
    /// Unmaps that failed or removed less than was mapped.
    pub unmap_failures: u64,
    /// Quiesces done.
    pub quiesces: u64,
    /// Quiesces after which the command register still had bus mastering on (read back).
    pub bus_master_after_quiesce: u64,
}

/// The VMM's side of a VFIO device: its BAR areas (for memory slots) and counters.
#[derive(Clone)]
pub struct VfioHandle {
    address: String,
    ids: PciIds,
    intx: Option<Arc<IntxLine>>,
    areas: Arc<Vec<BarArea>>,
    stats: Arc<Stats>,
    container: Arc<VfioContainer>,
}

/// A page of the VMM's memory mapped into a device's IOMMU address space on purpose (see
/// [`VfioHandle::map_page`]); unmapped when dropped.
pub struct PageMapping {
    container: Arc<VfioContainer>,
    iova: u64,
    // Kept mapped in the process until the IOMMU mapping is gone.
    page: Arc<MmapRegion<()>>,
}

impl Drop for PageMapping {
    fn drop(&mut self) {
        if self
            .container
            .vfio_dma_unmap(self.iova, self.page.size())
            .is_err()
        {
            // Never free a page the device may still reach.
            std::mem::forget(self.page.clone());
        }
    }
}

impl std::fmt::Debug for VfioHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioHandle")
            .field("address", &self.address)
            .field("areas", &self.areas)
            .finish_non_exhaustive()
    }
}

impl VfioHandle {
    /// The device's PCI address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The BAR areas to map into each domain's VM (the MSI-X table and PBA left out).
    pub fn areas(&self) -> &[BarArea] {
        &self.areas
    }

    /// The device's IDs and class code (what its configuration space says).
    pub fn ids(&self) -> PciIds {
        self.ids
    }

    /// Its INTx line, when that is how it wakes its domain (a function without MSI-X).
    pub fn intx(&self) -> Option<&Arc<IntxLine>> {
        self.intx.as_ref()
    }

    /// The device's counters.
    pub fn counters(&self) -> VfioCounters {
        let s = &self.stats;
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VfioCounters {
            attaches: n(&s.attaches),
            last_attach: d(&s.attach_ns),
            last_map: d(&s.map_ns),
            flr_resets: n(&s.flr_resets),
            last_flr: d(&s.flr_ns),
            controller_resets: n(&s.controller_resets),
            last_controller_reset: d(&s.controller_ns),
            reset_failures: n(&s.reset_failures),
            unclean: n(&s.unclean) != 0,
            last_unmapped_bytes: n(&s.unmapped_bytes),
            unmap_failures: n(&s.unmap_failures),
            quiesces: n(&s.quiesces),
            bus_master_after_quiesce: n(&s.bus_master_after_quiesce),
        }
    }

    /// Maps `page` (one or more whole pages of the VMM's own memory) into the device's IOMMU
    /// address space at `iova`, until the returned mapping is dropped: the negative control of
    /// an isolation check (DMA aimed there must then reach the page). Only for tests: a device
    /// serving a domain must reach nothing but the domain's RAM.
    pub fn map_page(&self, iova: u64, page: Arc<MmapRegion<()>>) -> Result<PageMapping, String> {
        // SAFETY: the range is a mapping of the VMM's own, which the `PageMapping` keeps alive
        // (an Arc) until the IOMMU mapping is removed; the VMM reaches it only through
        // volatile accesses.
        unsafe {
            self.container
                .vfio_dma_map(iova, page.size(), page.as_ptr())
        }
        .map_err(|e| format!("DMA map of a page at IOVA {iova:#x}: {e}"))?;
        Ok(PageMapping {
            container: self.container.clone(),
            iova,
            page,
        })
    }

    /// Makes the next `count` resets fail as a broken device's would (for tests of the
    /// reset-failure path): the device is left unclean, as after a real failure.
    pub fn fail_next_resets(&self, count: u32) {
        self.stats.fail_resets.store(count, Ordering::Relaxed);
    }
}

/// One memory BAR of the real device.
#[derive(Clone, Copy, Debug)]
struct Bar {
    info: BarInfo,
    region_offset: u64,
    region_size: u64,
}

/// A PCI function opened through VFIO (see the module documentation).
pub struct VfioPci {
    address: String,
    // Field order is drop order: the BAR mappings and the duplicate of the device fd close
    // before the device (whose drop releases its group, refused while the device is open),
    // and the device before its container.
    maps: Vec<MmapRegion<()>>,
    // A duplicate of the device fd for region reads and writes whose errors we see.
    file: File,
    device: VfioDevice,
    container: Arc<VfioContainer>,
    config_offset: u64,
    ids: PciIds,
    bars: Vec<Bar>,
    msix: Option<MsixLayout>,
    msix_vectors: u32,
    msix_armed: bool,
    // The INTx line (a function without MSI-X whose line VFIO offers), and whether the
    // domain's Command register lets it interrupt (Interrupt Disable clear).
    intx: Option<Arc<IntxLine>>,
    intx_wanted: bool,
    kind: DeviceKind,
    // Whether the kernel can reset the function (VFIO_DEVICE_FLAGS_RESET).
    kernel_reset: bool,
    reset: ResetMethod,
    wake: Option<WakeDomain>,
    // The domain memory mapped for DMA, held until its unmap succeeded.
    mapped: Option<GuestMemoryMmap<()>>,
    unclean: bool,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("address", &self.address)
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

impl VfioPci {
    /// Opens the device at `sysfs_path` (`/sys/bus/pci/devices/ADDRESS`, bound to vfio-pci in
    /// a viable IOMMU group): a container of its own (the domain's RAM is mapped at its
    /// guest-physical addresses, which every domain shares), the device, its BARs, MSI-X
    /// layout and mmappable areas. The device must support a reset. On return bus mastering
    /// and memory decode are off; nothing is mapped.
    pub fn open(
        address: &str,
        sysfs_path: &Path,
        reset: ResetMethod,
    ) -> Result<(VfioPci, VfioHandle), VfioError> {
        let address = address.to_string();
        let vfio = |what| {
            let address = address.clone();
            move |source| VfioError::Vfio {
                address,
                what,
                source,
            }
        };
        let unsupported = |what: String| VfioError::Unsupported {
            address: address.clone(),
            what,
        };
        let container =
            Arc::new(VfioContainer::new(None).map_err(vfio("open the VFIO container"))?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(sysfs_path, ops, false).map_err(|e| match &e {
            vfio_ioctls::VfioError::OpenGroup(io, group)
                if io.raw_os_error() == Some(libc::EBUSY) =>
            {
                unsupported(format!(
                    "its IOMMU group (/dev/vfio/{group}) is open in another process (another ddvm?); expected a device no other process holds"
                ))
            }
            _ => vfio("open the VFIO device")(e),
        })?;
        // SAFETY: the fd is the device's, open for as long as `device` lives; it is borrowed
        // only to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let file = File::from(
            borrowed
                .try_clone_to_owned()
                .map_err(|source| VfioError::Io {
                    address: address.clone(),
                    what: "duplicate the device fd".into(),
                    source,
                })?,
        );
        let flags = device_flags(&file).map_err(|source| VfioError::Io {
            address: address.clone(),
            what: "VFIO_DEVICE_GET_INFO".into(),
            source,
        })?;
        if flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(unsupported(
                "not a PCI device; expected a PCI function".into(),
            ));
        }
        let kernel_reset = flags & VFIO_DEVICE_FLAGS_RESET != 0;
        let config_offset = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        let mut backend = VfioPci {
            address: address.clone(),
            maps: Vec::new(),
            file,
            device,
            container,
            config_offset,
            ids: PciIds {
                vendor: 0,
                device: 0,
                subsystem_vendor: 0,
                subsystem: 0,
                class_code: 0,
                revision: 0,
            },
            bars: Vec::new(),
            msix: None,
            msix_vectors: 0,
            msix_armed: false,
            intx: None,
            intx_wanted: true,
            kind: DeviceKind::Other,
            kernel_reset,
            reset,
            wake: None,
            mapped: None,
            unclean: false,
            stats: Arc::default(),
        };
        backend.ids = backend.read_ids()?;
        backend.kind = DeviceKind::of(&backend.ids);
        if !kernel_reset {
            // Each new driver domain needs a clean device: the device's own reset must do.
            match (backend.kind.own_reset(), reset) {
                (Some(_), ResetMethod::Controller) => {}
                (Some(own), ResetMethod::Flr) => {
                    return Err(unsupported(format!(
                        "the kernel offers no reset for it (no FLR, PM or bus reset), so reset = \"flr\" cannot be done; expected reset = \"controller\" (the device's own reset, {own})"
                    )))
                }
                (None, _) => {
                    return Err(unsupported(
                        "the kernel offers no reset for it (no FLR, PM or bus reset) and ddvm knows no reset of its own for its class; expected a resettable function, since each new driver domain needs a clean device".into(),
                    ))
                }
            }
        }
        backend.bars = backend.read_bars()?;
        if backend.bars.is_empty() {
            return Err(unsupported(
                "has no memory BAR; expected at least one".into(),
            ));
        }
        backend.msix = backend.read_msix()?;
        if let Some(m) = backend.msix {
            let irqs = backend
                .device
                .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
                .map_or(0, |i| i.count);
            if irqs == 0 {
                return Err(unsupported(
                    "advertises MSI-X but VFIO offers no MSI-X interrupts".into(),
                ));
            }
            backend.msix_vectors = irqs.min(u32::from(m.vectors)).min(MAX_WAKE_VECTORS);
        } else if backend
            .device
            .get_irq_info(VFIO_PCI_INTX_IRQ_INDEX)
            .is_some_and(|i| i.count >= 1)
        {
            let file = backend
                .file
                .try_clone()
                .map_err(backend.io_err("duplicate the device fd".into()))?;
            backend.intx = Some(Arc::new(IntxLine {
                file: std::sync::Mutex::new(Some(file)),
                armed: Default::default(),
                unmasks: AtomicU64::new(0),
            }));
        }
        let (maps, areas) = backend.map_areas()?;
        backend.maps = maps;
        // The kernel cleared bus mastering and reset the function when it was opened, if it
        // can; otherwise the device's own reset does it now (a predecessor ddvm killed with
        // SIGKILL may have left its DMA engines on; bus mastering is off). Memory decode
        // stays off until a domain is attached.
        backend.set_command(0)?;
        if !kernel_reset {
            if let Err(why) = backend.do_reset(false) {
                backend.stats.reset_failures.fetch_add(1, Ordering::Relaxed);
                warn(&backend.address, &format!("reset at open failed: {why}; the device stays unclean until its reset succeeds"));
                backend.set_unclean(true);
            }
            backend.set_command(0)?;
        }
        tracing::info!(
            "VFIO device {}: {:04x}:{:04x} class {:06x} ({}), interrupts {}, reset {}{}",
            backend.address,
            backend.ids.vendor,
            backend.ids.device,
            backend.ids.class_code,
            match backend.kind {
                DeviceKind::Nvme => "NVMe",
                DeviceKind::E1000 => "e1000",
                DeviceKind::Other => "other",
            },
            match (&backend.msix, &backend.intx) {
                (Some(_), _) => format!("MSI-X ({} vectors)", backend.msix_vectors),
                (None, Some(_)) => "INTx".to_string(),
                (None, None) => "none".to_string(),
            },
            reset.name(),
            match (reset, backend.kind.own_reset()) {
                (ResetMethod::Controller, Some(own)) => format!(" ({own})"),
                _ => String::new(),
            }
        );
        let handle = VfioHandle {
            address,
            ids: backend.ids,
            intx: backend.intx.clone(),
            areas: Arc::new(areas),
            stats: backend.stats.clone(),
            container: backend.container.clone(),
        };
        Ok((backend, handle))
    }

    fn io_err(&self, what: String) -> impl FnOnce(io::Error) -> VfioError {
        let address = self.address.clone();
        move |source| VfioError::Io {
            address,
            what,
            source,
        }
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        self.file
            .read_exact_at(buf, self.config_offset + offset)
            .map_err(self.io_err(format!("read config space at {offset:#x}")))
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        self.file
            .write_all_at(buf, self.config_offset + offset)
            .map_err(self.io_err(format!("write config space at {offset:#x}")))
    }

    fn config_u8(&self, offset: u64) -> Result<u8, VfioError> {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b)?;
        Ok(b[0])
    }

    fn config_u16(&self, offset: u64) -> Result<u16, VfioError> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn config_u32(&self, offset: u64) -> Result<u32, VfioError> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_ids(&self) -> Result<PciIds, VfioError> {
        let class_rev = self.config_u32(0x08)?;
        Ok(PciIds {
            vendor: self.config_u16(0x00)?,
            device: self.config_u16(0x02)?,
            subsystem_vendor: self.config_u16(0x2c)?,
            subsystem: self.config_u16(0x2e)?,
            class_code: class_rev >> 8,
            revision: class_rev as u8,
        })
    }

    /// The memory BARs: kind and prefetchability from the real registers, sizes from VFIO's
    /// region info (rounded up to a page: the rest reads as all ones). I/O BARs are left out.
    fn read_bars(&self) -> Result<Vec<Bar>, VfioError> {
        let mut bars = Vec::new();
        let mut i = 0u8;
        while i < 6 {
            let raw = self.config_u32(0x10 + 4 * u64::from(i))?;
            let size = self.device.get_region_size(u32::from(i));
            let is_64 = raw & 0b111 == 0b100;
            let next = if is_64 { i + 2 } else { i + 1 };
            if raw & 1 == 0 && size > 0 {
                let padded = size.max(MIN_BAR_SIZE).next_power_of_two();
                bars.push(Bar {
                    info: BarInfo {
                        index: i,
                        size: padded,
                        kind: if is_64 {
                            BarKind::Mmio64
                        } else {
                            BarKind::Mmio32
                        },
                        prefetchable: raw & 0b1000 != 0,
                    },
                    region_offset: self.device.get_region_offset(u32::from(i)),
                    region_size: size,
                });
            }
            i = next;
        }
        Ok(bars)
    }

    /// The MSI-X capability, if the function has one (the capability list walked with a bound
    /// on its length, as a hostile device could loop it).
    fn read_msix(&self) -> Result<Option<MsixLayout>, VfioError> {
        if self.config_u16(STATUS)? & STATUS_CAP_LIST == 0 {
            return Ok(None);
        }
        let mut ptr = self.config_u8(CAP_PTR)? & !3;
        for _ in 0..48 {
            if ptr < 0x40 {
                return Ok(None);
            }
            let at = u64::from(ptr);
            if self.config_u8(at)? == CAP_ID_MSIX {
                let control = self.config_u16(at + 2)?;
                let table = self.config_u32(at + 4)?;
                let pba = self.config_u32(at + 8)?;
                let layout = MsixLayout {
                    vectors: (control & 0x7ff) + 1,
                    table_bar: (table & 7) as u8,
                    table_offset: u64::from(table & !7),
                    pba_bar: (pba & 7) as u8,
                    pba_offset: u64::from(pba & !7),
                };
                let inside = |bar: u8, offset: u64, len: u64| {
                    self.bars.iter().any(|b| {
                        b.info.index == bar
                            && offset.checked_add(len).is_some_and(|e| e <= b.region_size)
                    })
                };
                if !inside(
                    layout.table_bar,
                    layout.table_offset,
                    u64::from(layout.vectors) * 16,
                ) || !inside(
                    layout.pba_bar,
                    layout.pba_offset,
                    u64::from(layout.vectors).div_ceil(64) * 8,
                ) {
                    return Err(VfioError::Unsupported {
                        address: self.address.clone(),
                        what: format!("MSI-X table or PBA outside its BAR ({layout:?})"),
                    });
                }
                return Ok(Some(layout));
            }
            ptr = self.config_u8(at + 1)? & !3;
        }
        Ok(None)
    }

    /// Mmaps each BAR's mmappable areas, leaving out the pages of the MSI-X table and PBA.
    fn map_areas(&self) -> Result<(Vec<MmapRegion<()>>, Vec<BarArea>), VfioError> {
        let mut maps = Vec::new();
        let mut areas = Vec::new();
        for bar in &self.bars {
            let index = u32::from(bar.info.index);
            if self.device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
                continue;
            }
            let mut ranges: Vec<(u64, u64)> = self
                .device
                .get_region_caps(index)
                .iter()
                .find_map(|c| match c {
                    VfioRegionInfoCap::SparseMmap(s) => Some(
                        s.areas
                            .iter()
                            .map(|a| (a.offset, a.offset + a.size))
                            .collect(),
                    ),
                    _ => None,
                })
                .unwrap_or_else(|| vec![(0, bar.region_size)]);
            if let Some(m) = self.msix {
                let table = (m.table_offset, m.table_offset + u64::from(m.vectors) * 16);
                let pba = (
                    m.pba_offset,
                    m.pba_offset + u64::from(m.vectors).div_ceil(64) * 8,
                );
                for (b, (start, end)) in [(m.table_bar, table), (m.pba_bar, pba)] {
                    if b == bar.info.index {
                        ranges = punch(&ranges, start / PAGE * PAGE, end.div_ceil(PAGE) * PAGE);
                    }
                }
            }
            for (start, end) in ranges {
                let (start, end) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
                if end <= start || end > bar.region_size {
                    continue;
                }
                let file = self
                    .file
                    .try_clone()
                    .map_err(self.io_err("duplicate the device fd".into()))?;
                let map = MmapRegion::<()>::from_file(
                    FileOffset::new(file, bar.region_offset + start),
                    (end - start) as usize,
                )
                .map_err(|e| VfioError::Io {
                    address: self.address.clone(),
                    what: format!("mmap BAR {} at {start:#x}", bar.info.index),
                    source: io::Error::other(e.to_string()),
                })?;
                areas.push(BarArea {
                    bar: bar.info.index,
                    offset: start,
                    size: end - start,
                    host_addr: map.as_ptr() as u64,
                });
                maps.push(map);
            }
        }
        Ok((maps, areas))
    }

    fn command(&self) -> Result<u16, VfioError> {
        self.config_u16(COMMAND)
    }

    fn set_command(&self, value: u16) -> Result<(), VfioError> {
        let old = self.command()?;
        let new = old & !(CMD_MEMORY | CMD_BUS_MASTER) | value;
        self.config_write(COMMAND, &new.to_le_bytes())
    }

    fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.info.index == index)
    }

    fn bar_u32(&self, bar: u8, offset: u64) -> Option<u32> {
        let b = self.bar(bar)?;
        let mut v = [0u8; 4];
        self.file
            .read_exact_at(&mut v, b.region_offset + offset)
            .ok()
            .map(|_| u32::from_le_bytes(v))
    }

    fn bar_set_u32(&self, bar: u8, offset: u64, value: u32) -> bool {
        self.bar(bar).is_some_and(|b| {
            self.file
                .write_all_at(&value.to_le_bytes(), b.region_offset + offset)
                .is_ok()
        })
    }

    fn arm_msix(&mut self, on: bool) {
        let want = on && self.wake.is_some() && self.msix_vectors > 0;
        if want == self.msix_armed {
            return;
        }
        let r = match (&self.wake, want) {
            (Some(wake), true) => {
                let fds = vec![wake.as_ref(); self.msix_vectors as usize];
                self.device.enable_msix(fds)
            }
            _ => self.device.disable_msix(),
        };
        match r {
            Ok(()) => self.msix_armed = want,
            Err(e) => warn(
                &self.address,
                &format!("MSI-X {}: {e}", if want { "enable" } else { "disable" }),
            ),
        }
    }

    /// Binds the INTx line to the domain's wake eventfd, or unbinds it (`on` only takes
    /// effect with a domain attached whose Command register lets the function interrupt).
    fn arm_intx(&mut self, on: bool) {
        let Some(line) = self.intx.clone() else {
            return;
        };
        let want = on && self.intx_wanted && self.wake.is_some() && !self.unclean;
        if want == line.armed() {
            return;
        }
        let r = match (&self.wake, want) {
            (Some(wake), true) => self
                .device
                .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![wake.as_ref()]),
            _ => {
                // No unmask may reach a line being unbound.
                line.armed.store(false, Ordering::Release);
                self.device.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
            }
        };
        match r {
            Ok(()) => line.armed.store(want, Ordering::Release),
            Err(e) => warn(
                &self.address,
                &format!("INTx {}: {e}", if want { "enable" } else { "disable" }),
            ),
        }
    }

    /// Runs `f` with memory decode on (a region access to a BAR fails while it is off), and
    /// puts the bit back as it was.
    fn with_memory<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        let cmd = self.command().ok();
        let off = cmd.is_some_and(|c| c & CMD_MEMORY == 0);
        if let (true, Some(c)) = (off, cmd) {
            let _ = self.config_write(COMMAND, &(c | CMD_MEMORY).to_le_bytes());
        }
        let r = f(self);
        if let (true, Some(c)) = (off, cmd) {
            let _ = self.config_write(COMMAND, &c.to_le_bytes());
        }
        r
    }

    /// The device's own reset ([`DeviceKind`]); Err when it has none or it did not quiesce.
    fn own_reset(&self) -> Result<Duration, String> {
        match self.kind {
            DeviceKind::Nvme => self.with_memory(Self::controller_disable),
            DeviceKind::E1000 => self.with_memory(Self::e1000_reset),
            DeviceKind::Other => Err("no reset of its own for its class".into()),
        }
    }

    /// Intel 8254x: interrupts masked, receiver and transmitter off, CTRL.RST (awaited, at
    /// most 20 ms), then everything a reset should have cleared written explicitly, since a
    /// model may ignore CTRL.RST (QEMU 7.2's does): interrupts masked, receiver and
    /// transmitter off, ring bases, lengths, heads and tails 0, the causes read clear (which
    /// deasserts INTx). Err when the device does not respond or its receiver or transmitter
    /// reads back on.
    fn e1000_reset(&self) -> Result<Duration, String> {
        const CTRL: u64 = 0x0000;
        const CTRL_RST: u32 = 1 << 26;
        const ICR: u64 = 0x00c0;
        const IMC: u64 = 0x00d8;
        const RCTL: u64 = 0x0100;
        const TCTL: u64 = 0x0400;
        const EN: u32 = 1 << 1;
        const RINGS: [u64; 10] = [
            0x2800, 0x2804, 0x2808, 0x2810, 0x2818, // RDBAL, RDBAH, RDLEN, RDH, RDT
            0x3800, 0x3804, 0x3808, 0x3810, 0x3818, // TDBAL, TDBAH, TDLEN, TDH, TDT
        ];
        let t0 = Instant::now();
        let write = |reg: u64, v: u32| {
            if self.bar_set_u32(0, reg, v) {
                Ok(())
            } else {
                Err(format!("write of register {reg:#x} failed"))
            }
        };
        let ctrl = self.bar_u32(0, CTRL).ok_or("CTRL unreadable")?;
        if ctrl == u32::MAX {
            return Err("the device does not respond (CTRL reads all ones)".into());
        }
        write(IMC, u32::MAX)?;
        write(RCTL, 0)?;
        write(TCTL, 0)?;
        write(CTRL, ctrl | CTRL_RST)?;
        let limit = Duration::from_millis(20);
        loop {
            std::thread::sleep(Duration::from_micros(10));
            let c = self.bar_u32(0, CTRL).ok_or("CTRL unreadable")?;
            if c != u32::MAX && c & CTRL_RST == 0 {
                break;
            }
            if t0.elapsed() >= limit {
                return Err(format!("CTRL.RST still set after {limit:?} (CTRL {c:#x})"));
            }
        }
        write(IMC, u32::MAX)?;
        write(RCTL, 0)?;
        write(TCTL, 0)?;
        for reg in RINGS {
            write(reg, 0)?;
        }
        let _ = self.bar_u32(0, ICR);
        let rctl = self.bar_u32(0, RCTL).ok_or("RCTL unreadable")?;
        let tctl = self.bar_u32(0, TCTL).ok_or("TCTL unreadable")?;
        if rctl == u32::MAX || rctl & EN != 0 || tctl & EN != 0 {
            return Err(format!(
                "receiver or transmitter still on after the reset (RCTL {rctl:#x}, TCTL {tctl:#x})"
            ));
        }
        Ok(t0.elapsed())
    }

    /// NVMe: CC.EN = 0, then CSTS.RDY = 0 awaited for CAP.TO (at most 30 s). Err when the
    /// controller does not quiesce.
    fn controller_disable(&self) -> Result<Duration, String> {
        const CAP: u64 = 0x00;
        const CC: u64 = 0x14;
        const CSTS: u64 = 0x1c;
        let t0 = Instant::now();
        let cap = self.bar_u32(0, CAP).ok_or("CAP unreadable")?;
        let timeout = Duration::from_millis(u64::from((cap >> 24) & 0xff).max(1) * 500)
            .min(Duration::from_secs(30));
        let cc = self.bar_u32(0, CC).ok_or("CC unreadable")?;
        if cc == u32::MAX {
            return Err("the controller does not respond (CC reads all ones)".into());
        }
        if !self.bar_set_u32(0, CC, cc & !1) {
            return Err("CC write failed".into());
        }
        loop {
            let csts = self.bar_u32(0, CSTS).ok_or("CSTS unreadable")?;
            if csts == u32::MAX || csts & 2 != 0 {
                return Err(format!("controller fatal status (CSTS {csts:#x})"));
            }
            if csts & 1 == 0 {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() >= timeout {
                return Err(format!("CSTS.RDY still 1 after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn flr(&self) -> Result<Duration, String> {
        let t0 = Instant::now();
        for _ in 0..10 {
            // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is a VFIO device's.
            let rc = unsafe { vmm_sys_util::ioctl::ioctl(&self.file, VFIO_DEVICE_RESET()) };
            if rc == 0 {
                return Ok(t0.elapsed());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(format!("VFIO_DEVICE_RESET: {e}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("VFIO_DEVICE_RESET: busy (EAGAIN) ten times".into())
    }

    /// The reset of the configured method (`fresh`: a function level reset whatever the
    /// method, for a device whose last reset failed, if the kernel offers one); MSI-X and
    /// INTx are off first and bus mastering must be.
    fn do_reset(&mut self, fresh: bool) -> Result<(), String> {
        self.arm_msix(false);
        self.arm_intx(false);
        let s = self.stats.clone();
        if s.fail_resets
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("failed on purpose (test hook)".into());
        }
        let own = self.reset == ResetMethod::Controller && self.kind.own_reset().is_some();
        if own && (!fresh || !self.kernel_reset) {
            match self.own_reset() {
                Ok(t) => {
                    s.controller_resets.fetch_add(1, Ordering::Relaxed);
                    s.controller_ns
                        .store(t.as_nanos() as u64, Ordering::Relaxed);
                    s.last_reset.store(1, Ordering::Relaxed);
                    s.last_reset_ns
                        .store(t.as_nanos() as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Err(why) if self.kernel_reset => warn(
                    &self.address,
                    &format!("its own reset did not quiesce it ({why}); function level reset"),
                ),
                Err(why) => return Err(why),
            }
        }
        if !self.kernel_reset {
            return Err(
                "no reset: the kernel offers none and the device has none of its own".into(),
            );
        }
        let t = self.flr()?;
        s.flr_resets.fetch_add(1, Ordering::Relaxed);
        s.flr_ns.store(t.as_nanos() as u64, Ordering::Relaxed);
        s.last_reset.store(2, Ordering::Relaxed);
        s.last_reset_ns
            .store(t.as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn set_unclean(&mut self, unclean: bool) {
        self.unclean = unclean;
        self.stats
            .unclean
            .store(u64::from(unclean), Ordering::Relaxed);
    }

    /// Bus mastering off, then read back; true when it reads off.
    fn bus_master_off(&self) -> bool {
        let cmd = self.command().unwrap_or(u16::MAX);
        if cmd & CMD_BUS_MASTER != 0 {
            let _ = self.config_write(COMMAND, &(cmd & !CMD_BUS_MASTER).to_le_bytes());
        }
        self.command().is_ok_and(|c| c & CMD_BUS_MASTER == 0)
    }

    fn unmap(&mut self) {
        let Some(mem) = self.mapped.take() else {
            self.stats.unmapped_bytes.store(0, Ordering::Relaxed);
            return;
        };
        let mut removed = 0u64;
        let mut ok = true;
        for region in mem.iter() {
            let (iova, len) = (region.start_addr().0, region.len());
            match self.container.vfio_dma_unmap(iova, len as usize) {
                Ok(()) => removed += len,
                Err(e) => {
                    ok = false;
                    warn(
                        &self.address,
                        &format!("DMA unmap of {len:#x} bytes at {iova:#x}: {e}"),
                    );
                }
            }
        }
        self.stats.unmapped_bytes.store(removed, Ordering::Relaxed);
        if !ok {
            self.stats.unmap_failures.fetch_add(1, Ordering::Relaxed);
            // Never free memory the device may still reach: keep it until the VMM exits.
            std::mem::forget(mem);
        }
    }

    fn map(&mut self, mem: &GuestMemoryMmap<()>) -> Result<(), String> {
        let t0 = Instant::now();
        let mut done: Vec<(u64, u64)> = Vec::new();
        for region in mem.iter() {
            let (iova, len) = (region.start_addr().0, region.len());
            let host = region.as_ptr();
            // SAFETY: the range is a region of the domain's guest memory, which ddvm reaches
            // only through vm-memory's volatile accesses (no Rust reference into it) and which
            // the device may write at any time like the guest. `self.mapped` holds a clone of
            // the memory until the unmap of this range succeeded, so it is not unmapped from
            // the process before.
            let r = unsafe { self.container.vfio_dma_map(iova, len as usize, host) };
            if let Err(e) = r {
                for (iova, len) in done {
                    let _ = self.container.vfio_dma_unmap(iova, len as usize);
                }
                return Err(format!("DMA map of {len:#x} bytes at IOVA {iova:#x}: {e}"));
            }
            done.push((iova, len));
        }
        self.mapped = Some(mem.clone());
        self.stats
            .map_ns
            .store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Attaches to a domain (see [`PciBackend::attach`]); Err leaves the device detached.
    fn try_attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) -> Result<(), String> {
        let t0 = Instant::now();
        if self.mapped.is_some() {
            // Never detached (a domain that failed before its quiesce): quiesce now.
            self.quiesce_hw();
        }
        if self.unclean {
            if !self.bus_master_off() {
                return Err("bus mastering does not read back off".into());
            }
            match self.do_reset(true) {
                Ok(()) => self.set_unclean(false),
                Err(why) => {
                    self.stats.reset_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(format!(
                        "the device is unclean and its reset failed again: {why}"
                    ));
                }
            }
        }
        self.map(&mem)?;
        if let Err(e) = self.set_command(CMD_MEMORY) {
            self.unmap();
            return Err(e.to_string());
        }
        self.wake = Some(wake);
        // A function reset left Interrupt Disable clear: the line may wake the domain.
        self.intx_wanted = true;
        self.arm_intx(true);
        self.stats.attaches.fetch_add(1, Ordering::Relaxed);
        let took = t0.elapsed();
        self.stats
            .attach_ns
            .store(took.as_nanos() as u64, Ordering::Relaxed);
        tracing::info!(
            "VFIO device {}: attached in {:.2} ms (DMA map of {} bytes in {:.2} ms)",
            self.address,
            took.as_secs_f64() * 1e3,
            mem.iter().map(|r| r.len()).sum::<u64>(),
            self.stats.map_ns.load(Ordering::Relaxed) as f64 / 1e6
        );
        Ok(())
    }

    /// Bus mastering off (read back), reset, unmap, memory decode off.
    fn quiesce_hw(&mut self) {
        if !self.bus_master_off() {
            self.stats
                .bus_master_after_quiesce
                .fetch_add(1, Ordering::Relaxed);
        }
        match self.do_reset(false) {
            Ok(()) => self.set_unclean(false),
            Err(why) => {
                self.stats.reset_failures.fetch_add(1, Ordering::Relaxed);
                warn(&self.address, &format!("reset failed: {why}; the device stays unclean, with bus mastering off and no DMA mapping, until its reset succeeds"));
                self.set_unclean(true);
            }
        }
        if self.command().is_ok_and(|c| c & CMD_BUS_MASTER != 0) {
            self.stats
                .bus_master_after_quiesce
                .fetch_add(1, Ordering::Relaxed);
        }
        self.unmap();
        let _ = self.set_command(0);
        self.stats.quiesces.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        // The INTx line's duplicate of the device fd closes before the device, which its
        // handle may outlive.
        if let Some(line) = &self.intx {
            line.armed.store(false, Ordering::Release);
            line.file.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// A warning about the real device at `address`.
fn warn(address: &str, what: &str) {
    tracing::warn!("VFIO device {address}: {what}");
}

/// `ranges` without `[start, end)`.
fn punch(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, b) in ranges {
        if end <= a || start >= b {
            out.push((a, b));
            continue;
        }
        if a < start {
            out.push((a, start));
        }
        if end < b {
            out.push((end, b));
        }
    }
    out
}

fn device_flags(file: &File) -> io::Result<u32> {
    let mut info = vfio_device_info {
        argsz: std::mem::size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most `argsz` bytes into `info`, which lives across the call.
    let rc =
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, VFIO_DEVICE_GET_INFO(), &mut info) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.flags)
}

impl PciBackend for VfioPci {
    fn ids(&self) -> PciIds {
        self.ids
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.bars.iter().map(|b| b.info).collect()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let ok = self.bar(bar).is_some_and(|b| {
            offset + data.len() as u64 <= b.region_size
                && self
                    .file
                    .read_exact_at(data, b.region_offset + offset)
                    .is_ok()
        });
        if !ok {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if let Some(b) = self.bar(bar) {
            if offset + data.len() as u64 <= b.region_size {
                let _ = self.file.write_all_at(data, b.region_offset + offset);
            }
        }
    }

    fn reset(&mut self) {
        // Called with bus mastering off (PciDevice::function_reset): the kernel restores the
        // command register around a function level reset.
        match self.do_reset(false) {
            Ok(()) => self.set_unclean(false),
            Err(why) => {
                self.stats.reset_failures.fetch_add(1, Ordering::Relaxed);
                warn(
                    &self.address,
                    &format!("reset failed: {why}; the device stays unclean"),
                );
                self.set_unclean(true);
            }
        }
    }

    fn set_bus_master(&mut self, enabled: bool) {
        if !enabled {
            if !self.bus_master_off() {
                warn(&self.address, "bus mastering does not read back off");
            }
            return;
        }
        // Only a domain the device is attached to (memory mapped, device clean) gets DMA.
        if self.mapped.is_some() && !self.unclean {
            if let Ok(cmd) = self.command() {
                let _ = self.config_write(COMMAND, &(cmd | CMD_BUS_MASTER).to_le_bytes());
            }
        }
    }

    fn detach(&mut self) {
        self.stats.quiesces.fetch_add(1, Ordering::Relaxed);
        self.arm_msix(false);
        self.arm_intx(false);
        let bus_master = self.command().map(|c| c & CMD_BUS_MASTER != 0);
        if bus_master.as_ref().ok() != Some(&false) {
            self.stats
                .bus_master_after_quiesce
                .fetch_add(1, Ordering::Relaxed);
        }
        let mapped: u64 = self
            .mapped
            .as_ref()
            .map_or(0, |m| m.iter().map(|r| r.len()).sum());
        // What this quiesce unmapped, nothing else's.
        self.stats.unmapped_bytes.store(0, Ordering::Relaxed);
        self.unmap();
        let unmapped = self.stats.unmapped_bytes.load(Ordering::Relaxed);
        let _ = self.set_command(0);
        self.wake = None;
        let reset = match (self.unclean, self.stats.last_reset.load(Ordering::Relaxed)) {
            (true, _) => "FAILED (unclean)",
            (false, 1) => "controller",
            (false, 2) => "flr",
            _ => "none",
        };
        let reset_ms = self.stats.last_reset_ns.load(Ordering::Relaxed) as f64 / 1e6;
        let bus_master = match bus_master {
            Ok(false) => "off (read back)".to_string(),
            Ok(true) => "STILL ON".to_string(),
            Err(e) => format!("UNREADABLE ({e})"),
        };
        let unmap = if unmapped == mapped {
            "complete"
        } else {
            "INCOMPLETE"
        };
        tracing::info!(
            "VFIO device {}: quiesced: bus master {bus_master}, reset {reset} in {reset_ms:.2} ms, unmap {unmap} ({unmapped} of {mapped} bytes)",
            self.address
        );
    }

    fn attach(&mut self, mem: GuestMemoryMmap<()>, wake: WakeDomain) -> Result<(), String> {
        self.try_attach(mem, wake)
    }

    fn msix(&self) -> Option<MsixLayout> {
        self.msix
    }

    fn msix_enabled(&mut self, enabled: bool) {
        self.arm_msix(enabled);
    }

    fn intx(&self) -> bool {
        self.intx.is_some()
    }

    fn intx_enabled(&mut self, enabled: bool) {
        self.intx_wanted = enabled;
        self.arm_intx(enabled);
    }
}

/// The sysfs directory of a PCI function.
pub fn sysfs_path(sysfs: &Path, address: &str) -> PathBuf {
    sysfs.join("bus/pci/devices").join(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_kind_and_its_own_reset_come_from_ids_and_class() {
        let ids = |vendor, device, class_code| PciIds {
            vendor,
            device,
            subsystem_vendor: 0,
            subsystem: 0,
            class_code,
            revision: 0,
        };
        assert_eq!(
            DeviceKind::of(&ids(0x1b36, 0x0010, 0x010802)),
            DeviceKind::Nvme
        );
        assert_eq!(
            DeviceKind::of(&ids(0x8086, 0x100e, 0x020000)),
            DeviceKind::E1000
        );
        assert_eq!(
            DeviceKind::of(&ids(0x8086, 0x100f, 0x020000)),
            DeviceKind::E1000
        );
        // q35's default 82574L is another part; a known ID under another class is not one.
        assert_eq!(
            DeviceKind::of(&ids(0x8086, 0x10d3, 0x020000)),
            DeviceKind::Other
        );
        assert_eq!(
            DeviceKind::of(&ids(0x8086, 0x100e, 0x010802)),
            DeviceKind::Nvme
        );
        assert_eq!(
            DeviceKind::of(&ids(0x1af4, 0x100e, 0x020000)),
            DeviceKind::Other
        );
        assert_eq!(DeviceKind::E1000.own_reset(), Some("CTRL.RST"));
        assert_eq!(DeviceKind::Other.own_reset(), None);
    }

    #[test]
    fn holes_are_punched_out_of_areas() {
        assert_eq!(punch(&[(0, 0x4000)], 0x2000, 0x4000), vec![(0, 0x2000)]);
        assert_eq!(
            punch(&[(0, 0x4000)], 0x1000, 0x2000),
            vec![(0, 0x1000), (0x2000, 0x4000)]
        );
        assert_eq!(punch(&[(0, 0x1000)], 0x2000, 0x3000), vec![(0, 0x1000)]);
        assert_eq!(punch(&[(0x2000, 0x3000)], 0x1000, 0x4000), vec![]);
    }
}
