//! A guest VM: memory, image, vCPU threads (one, but for a Linux client's), devices — from
//! creation to teardown.
//!
//! Booting checks everything that can be wrong with the request (image, sizes) before any KVM
//! object exists; a failure after that drops what was built, so nothing is left half-started.
//! Teardown stops the vCPU threads (a kick signal takes each out of KVM_RUN), joins them, then
//! drops the vCPUs, the VM and the memory, in that order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddvm_abi::boot::{BootInfo, Platform, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use ddvm_abi::channel::{class, offset as chan, ChannelHeader};
use ddvm_abi::layout;
use ddvm_abi::port;
use ddvm_passthrough::{
    DmaWindow, EmulatedNvme, NvmeConfig, NvmeMonitor, NvmePoller, PciBus, PciDevice,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;

use crate::arch;
use crate::console::{Console, Echo, LogReader};
use crate::devices::pci::{BarWindow, PciConfigPorts, PciEcam};
use crate::devices::serial::SerialPort;
use crate::devices::Bus;
use crate::hypervisor::{register_pvm_vif, Hypervisor};
use crate::loader::{Image, ImageError, Loaded};
use crate::memory::{self, GuestMem, MemoryError};
use crate::stats::VcpuStats;
use crate::vcpu::{self, DomainExit, RunState, Shared, VcpuContext};

/// Smallest guest: low pages, a 1 MiB-based image and a channel must fit.
pub const MIN_MEMORY: u64 = 4 << 20;

/// How to build a domain.
#[derive(Clone, Debug)]
pub struct DomainConfig {
    /// Name used in logs and reports.
    pub name: String,
    /// The image to boot.
    pub image: Image,
    /// RAM in bytes (a multiple of 2 MiB).
    pub memory: u64,
    /// Guest command line.
    pub cmdline: String,
    /// Channel size in bytes (a multiple of 4 KiB; 0: no channel).
    pub channel_size: u64,
    /// Echo the console to stderr.
    pub echo: Echo,
    /// The device handed to the domain, if any.
    pub device: Option<DeviceSpec>,
}

/// A device handed to a driver domain.
#[derive(Clone, Debug)]
pub enum DeviceSpec {
    /// A fresh emulated NVMe controller (stands in for hardware; VFIO comes later), created
    /// with the domain and gone with it.
    EmulatedNvme(NvmeConfig),
    /// A device that outlives its domains (recovery hands it from a dead domain to a fresh
    /// one, as a VFIO device would be).
    Persistent(Arc<DomainDevice>),
}

/// A PCI device that outlives the driver domains it is handed to.
///
/// Each boot attaches it to the new domain's memory; when the domain goes (crash or stop) the
/// domain quiesces it — bus mastering off, function reset (which waits for DMA in progress and
/// drops a volatile write cache), DMA detached — before its memory is freed.
pub struct DomainDevice {
    pci: Arc<Mutex<PciDevice>>,
    monitor: NvmeMonitor,
    // Set when the device's owner runs its passes (`DeviceThread::Owner`).
    poller: Option<NvmePoller>,
    // The VM whose ioeventfds the shadow-doorbell callback (un)registers: the current domain's.
    vm: Arc<Mutex<Option<Arc<VmFd>>>>,
    // The owner's pass, run on the domain's vCPU thread when the domain waits.
    owner_pass: Arc<Mutex<Option<OwnerPass>>>,
    // Whether the device has a volatile write cache, as the VMM itself knows it (`None`:
    // unknown to the VMM).
    volatile_write_cache: Option<bool>,
}

/// One pass of the device's owner (the block service: device, channel, clients), run on a
/// domain's vCPU thread when the domain waits; true when it made progress. It must not block
/// on the thread it runs on (it may find the owner busy and do nothing).
pub type OwnerPass = Arc<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for DomainDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainDevice").finish_non_exhaustive()
    }
}

/// Which thread serves an emulated controller's shadow doorbells (trapped doorbell writes are
/// always served on the vCPU thread that wrote them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceThread {
    /// A worker thread of its own.
    Worker,
    /// The device's owner, in its own loop: [`DomainDevice::poll`], [`DomainDevice::arm`],
    /// [`DomainDevice::eventfd`]. The block service of the disk does this, so a request
    /// costs no hand-off to another thread.
    Owner,
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
        let nvme = EmulatedNvme::new(cfg.clone(), dma).map_err(|e| device_err(Box::new(e)))?;
        let poller = match thread {
            DeviceThread::Worker => {
                nvme.start_worker(Arc::new(|| {}))
                    .map_err(|e| device_err(Box::new(e)))?;
                None
            }
            DeviceThread::Owner => Some(nvme.poller()),
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
            let Some(vm) = current.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
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
        Ok(Arc::new(DomainDevice {
            pci: Arc::new(Mutex::new(pci)),
            monitor,
            poller,
            owner_pass: Arc::default(),
            vm,
            volatile_write_cache: Some(cfg.volatile_write_cache),
        }))
    }

    /// Whether the device has a volatile write cache that a reset may drop, as the VMM knows
    /// it without asking a driver domain (the emulated controller's configuration); `None`
    /// where the VMM does not know. A domain's own claim can add to this, never take away.
    pub fn volatile_write_cache(&self) -> Option<bool> {
        self.volatile_write_cache
    }

    /// The device's counters (they keep counting across domains).
    pub fn stats(&self) -> ddvm_passthrough::NvmeStats {
        self.monitor.stats()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PciDevice> {
        self.pci.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves what the driver submitted through shadow doorbells (owner-served devices only;
    /// see [`DeviceThread::Owner`]). Returns the commands taken.
    pub fn poll(&self) -> u64 {
        self.poller.as_ref().map_or(0, NvmePoller::poll)
    }

    /// Work for the vCPU thread of the domain this device serves when the domain waits (see
    /// [`crate::vcpu::VcpuContext::on_wait`]): the owner's pass if it set one
    /// ([`DomainDevice::set_owner_pass`]), else the device's passes. A domain waits when it
    /// has nothing to do until the device or the VMM acts, so its thread acts itself, in the
    /// exit it pays anyway, instead of blocking until the owner's thread gets a CPU and wakes
    /// it. The owner's thread keeps serving too, so a domain that never waits (hung, or busy)
    /// changes nothing for it.
    pub fn wait_work(&self) -> Option<crate::vcpu::WaitWork> {
        let poller = self.poller.clone()?;
        let owner = self.owner_pass.clone();
        Some(Box::new(move || {
            let pass = owner.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match pass {
                Some(pass) => pass(),
                None => poller.poll() > 0,
            }
        }))
    }

    /// Sets (or clears) the owner's pass that [`DomainDevice::wait_work`] runs; it holds for
    /// every domain the device serves from now on.
    pub fn set_owner_pass(&self, pass: Option<OwnerPass>) {
        *self.owner_pass.lock().unwrap_or_else(|p| p.into_inner()) = pass;
    }

    /// Before the owner sleeps: asks the driver to ring, and re-checks. True when work
    /// arrived meanwhile (poll instead of sleeping).
    pub fn arm(&self) -> bool {
        self.poller.as_ref().is_some_and(NvmePoller::arm)
    }

    /// The eventfd an owner sleeps on (an ioeventfd doorbell, bus mastering back on).
    pub fn eventfd(&self) -> Option<std::os::fd::RawFd> {
        self.poller.as_ref().map(NvmePoller::eventfd)
    }

    /// Resets the eventfd after the owner woke.
    pub fn clear(&self) {
        if let Some(p) = &self.poller {
            p.clear();
        }
    }

    /// Attaches the device to a domain: DMA into `mem`, completions kick its vCPU, shadow
    /// doorbells become ioeventfds of `vm`.
    fn attach_to(&self, mem: &GuestMem, shared: &Arc<Shared>, vm: &Arc<VmFd>) {
        // The controller's completions wake the domain if it waits. The closure holds the
        // shared state, never the device (no reference cycle).
        let waker = shared.clone();
        self.lock()
            .attach(mem.clone(), Arc::new(move || waker.kick()));
        *self.vm.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm.clone());
    }

    /// Bus mastering off, function reset, DMA detached: the device can no longer touch the
    /// domain it served.
    pub fn quiesce(&self) {
        // The VM goes first: the reset then stops shadow doorbells without unregistering the
        // dying VM's ioeventfds one by one (each waits for a KVM SRCU grace period: 0.3–1 ms
        // in all, sometimes tens of ms, on the recovery path). They go with the VM.
        *self.vm.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.lock().quiesce();
    }

    /// The NVMe normal shutdown given by the VMM itself, through the controller's registers
    /// (BAR0: CC.SHN = 01b, then CSTS.SHST polled until it reads 10b, at most `timeout`):
    /// the controller writes its volatile cache back to the medium. It is what an orderly
    /// stop falls back to when the domain cannot shut the controller down itself (dead,
    /// hung, or an image without the channel's SHUTDOWN): the VMM reaches the registers of
    /// the emulated controller, as it would a VFIO device's through its BAR region. Call it
    /// with the domain's vCPU stopped (nothing else drives the controller) and before the
    /// reset of [`DomainDevice::quiesce`], which would drop the cache.
    pub fn shutdown_controller(&self, timeout: Duration) -> DeviceShutdown {
        const CC: u64 = 0x14;
        const CSTS: u64 = 0x1c;
        const CC_EN: u32 = 1;
        const CC_SHN: u32 = 0b11 << 14;
        const CC_SHN_NORMAL: u32 = 0b01 << 14;
        const CSTS_SHST: u32 = 0b11 << 2;
        const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;
        let t0 = Instant::now();
        let read = |off: u64| {
            let mut b = [0u8; 4];
            self.lock().backend.bar_read(0, off, &mut b);
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
        self.lock().backend.bar_write(0, CC, &value.to_le_bytes());
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
}

/// What [`DomainDevice::shutdown_controller`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceShutdown {
    /// The controller reported its shutdown complete after this long: its cache is on the
    /// medium.
    Done(Duration),
    /// The controller was not enabled: its last reset left no cache to write back.
    NotEnabled,
    /// It could not be shut down (why).
    Failed(String),
}

/// Guest-physical address of the ECAM window of bus 0 ([`ddvm_passthrough::ECAM_BUS_SIZE`]
/// bytes) in a domain with a device: above RAM, below the BARs, inside the identity map.
pub const PCI_ECAM_BASE: u64 = 0xd800_0000;
/// Guest-physical address of the first device BAR: above RAM, inside the identity map.
pub const PCI_MMIO_BASE: u64 = 0xe000_0000;
const _: () = assert!(PCI_ECAM_BASE + ddvm_passthrough::ECAM_BUS_SIZE <= PCI_MMIO_BASE);
const _: () = assert!(ddvm_passthrough::ECAM_BUS_SIZE == ddvm_abi::boot::PCI_ECAM_SIZE);
/// PCI device number of the passed-through device on bus 0.
pub const PCI_DEVICE_NUMBER: u8 = 1;

/// Errors creating a domain.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// A bad image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A bad memory size.
    #[error("domain {name}: memory: {source}")]
    Memory {
        /// Domain name.
        name: String,
        /// Cause.
        #[source]
        source: MemoryError,
    },
    /// Memory too small for the layout.
    #[error("domain {name}: memory of {memory} bytes is too small; expected at least {MIN_MEMORY} bytes")]
    MemoryTooSmall {
        /// Domain name.
        name: String,
        /// Requested size.
        memory: u64,
    },
    /// Memory reaching into the device window.
    #[error("domain {name}: memory of {memory} bytes overlaps the PCI windows from {PCI_ECAM_BASE:#x}; expected at most {PCI_ECAM_BASE} bytes with a device")]
    MemoryTooLarge {
        /// Domain name.
        name: String,
        /// Requested size.
        memory: u64,
    },
    /// Bad channel size.
    #[error("domain {name}: channel of {size} bytes; expected a multiple of 4096 of at most half the memory, with room for {RING_ENTRIES} slots of 4 KiB or more")]
    ChannelSize {
        /// Domain name.
        name: String,
        /// Requested size.
        size: u64,
    },
    /// Command line too long or with a NUL.
    #[error(
        "domain {name}: command line of {len} bytes; expected at most {} bytes without NUL",
        layout::CMDLINE_MAX
    )]
    Cmdline {
        /// Domain name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// A KVM call failed.
    #[error("domain {name}: {what}: {source}")]
    Kvm {
        /// Domain name.
        name: String,
        /// What we were doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the boot structures failed.
    #[error("domain {name}: writing {what} into guest memory: {source}")]
    Setup {
        /// Domain name.
        name: String,
        /// Which structure.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The device could not be created.
    #[error("domain {name}: device: {source}")]
    Device {
        /// Domain name.
        name: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A warm standby could not be booted or handed its device.
    #[error("domain {name}: standby: {what}")]
    Standby {
        /// Domain name.
        name: String,
        /// What went wrong.
        what: &'static str,
    },
    /// A stock Linux guest could not be set up.
    #[error("guest {name}: {source}")]
    Linux {
        /// Guest name.
        name: String,
        /// Cause.
        #[source]
        source: crate::linux::LinuxError,
    },
    /// The host cannot run this guest.
    #[error("guest {name}: {what}")]
    Unsupported {
        /// Guest name.
        name: String,
        /// Why.
        what: String,
    },
    /// Host resources (threads, eventfds, signals).
    #[error("domain {name}: {what}: {source}")]
    Host {
        /// Domain name.
        name: String,
        /// What we were doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A device a caller puts on the guest's MMIO bus (see [`Domain::boot_with`]).
pub struct MmioAttachment {
    /// Guest-physical base.
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// The device.
    pub device: Arc<Mutex<dyn crate::devices::BusDevice>>,
    /// Eventfds to register as ioeventfds (guest-physical address, eventfd), no datamatch.
    pub ioevents: Vec<(u64, vmm_sys_util::eventfd::EventFd)>,
    /// The device's interrupt line. Only guests with an interrupt controller take it (a
    /// stock Linux guest); ddvm's own guests poll.
    pub irq: Option<LevelIrq>,
}

/// A device's level-triggered interrupt line on the guest's I/O APIC (as QEMU's virtio-mmio
/// lines are). An irqfd with a resample eventfd: writing `trigger` asserts the line; at the
/// guest's EOI KVM de-asserts it and signals the resample eventfd, and the line is asserted
/// again while `pending` holds. Unlike an edge, a level survives the guest masking the pin
/// for a moment (as Linux does when it reprograms one): KVM's I/O APIC drops an edge that
/// arrives on a masked pin. With edges, a 2-vCPU Linux client stopped for good now and then.
pub struct LevelIrq {
    /// The I/O APIC input.
    pub gsi: u32,
    /// Written to assert the line.
    pub trigger: vmm_sys_util::eventfd::EventFd,
    /// Whether the device still has an interrupt for the guest.
    pub pending: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Re-asserts level-triggered lines after each EOI while their device has an interrupt
/// pending; ends once the guest is asked to stop.
fn resample_lines(shared: &Shared, lines: Vec<(LevelIrq, vmm_sys_util::eventfd::EventFd)>) {
    use std::os::fd::AsRawFd;
    let fds: Vec<_> = lines.iter().map(|(_, r)| r.as_raw_fd()).collect();
    while !shared.stopping() {
        if !vcpu::wait_fds(&fds, Duration::from_millis(50)) {
            continue;
        }
        for (line, resample) in &lines {
            if resample.read().is_ok() && (line.pending)() {
                // Fails only when the counter would overflow: asserted already.
                let _ = line.trigger.write(1);
            }
        }
    }
}

/// Builds the devices of a guest once its memory and shared state exist.
pub type AttachFn<'a> =
    dyn FnMut(&GuestMem, &Arc<Shared>) -> Result<Vec<MmioAttachment>, DomainError> + 'a;

/// What a standby is handed when it is promoted.
struct Handover {
    device: Arc<DomainDevice>,
    pci_bus: Arc<Mutex<PciBus>>,
    present: Arc<AtomicBool>,
}

fn lock_bus(bus: &Mutex<PciBus>) -> std::sync::MutexGuard<'_, PciBus> {
    bus.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running guest.
pub struct Domain {
    name: String,
    epoch: u64,
    platform: Platform,
    loaded: Loaded,
    channel: Option<u64>,
    channel_header: Option<ChannelHeader>,
    started: Instant,
    shared: Arc<Shared>,
    console: Arc<Console>,
    stats: Option<VcpuStats>,
    thread: Option<JoinHandle<DomainExit>>,
    // The other vCPUs' threads (a Linux client's application processors), joined with it.
    aps: Vec<JoinHandle<DomainExit>>,
    // Threads that end when the guest is asked to stop (the interrupt-line resampler).
    helpers: Vec<JoinHandle<()>>,
    // The vCPU thread's CPU-time clock (valid while `thread` is held, not joined).
    cpu_clock: Option<libc::clockid_t>,
    exit: Option<DomainExit>,
    // Quiesced after the vCPU thread (which holds it through the buses) is joined, before the
    // VM and the memory its DMA window maps are freed.
    device: Option<Arc<DomainDevice>>,
    // A standby's device, PCI slot and BAR gate, until its promotion.
    handover: Option<Handover>,
    // Dropped after the vCPU thread has been joined; the VM before the memory it maps.
    vm: Option<Arc<VmFd>>,
    mem: GuestMem,
}

impl Domain {
    /// Builds and starts a domain for boot generation `epoch`.
    pub fn boot(hv: &Hypervisor, cfg: &DomainConfig, epoch: u64) -> Result<Domain, DomainError> {
        Self::boot_with(hv, cfg, epoch, &mut |_, _| Ok(Vec::new()))
    }

    /// Like [`Domain::boot`], with devices built by `attach` (client guests' virtio devices)
    /// on the MMIO bus; their ioeventfds are registered before the vCPU starts.
    pub fn boot_with(
        hv: &Hypervisor,
        cfg: &DomainConfig,
        epoch: u64,
        attach: &mut AttachFn<'_>,
    ) -> Result<Domain, DomainError> {
        Self::build(hv, cfg, epoch, attach, false)
    }

    /// Boots a warm standby for boot generation `epoch`: a fresh domain that boots and opens
    /// its channel, then waits in the VMM without its device (`standby` on its command line;
    /// its PCI slot reads empty and its BAR windows are dead) until [`promote`](Self::promote)
    /// hands the device over. A restart then costs the device's bring-up, not VM creation and
    /// guest boot. `cfg.device` must be a [`DeviceSpec::Persistent`] device: the one the live
    /// domain holds meanwhile, which the standby never touches before its promotion.
    pub fn boot_standby(
        hv: &Hypervisor,
        cfg: &DomainConfig,
        epoch: u64,
    ) -> Result<Domain, DomainError> {
        if !matches!(cfg.device, Some(DeviceSpec::Persistent(_))) {
            return Err(DomainError::Standby {
                name: cfg.name.clone(),
                what: "a standby needs a device that outlives its domains",
            });
        }
        Self::build(hv, cfg, epoch, &mut |_, _| Ok(Vec::new()), true)
    }

    fn build(
        hv: &Hypervisor,
        cfg: &DomainConfig,
        epoch: u64,
        attach: &mut AttachFn<'_>,
        standby: bool,
    ) -> Result<Domain, DomainError> {
        let started = Instant::now();
        let name = cfg.name.clone();
        // 1. Everything the request can get wrong, before any KVM object exists.
        if cfg.memory < MIN_MEMORY {
            return Err(DomainError::MemoryTooSmall {
                name,
                memory: cfg.memory,
            });
        }
        if cfg.channel_size % layout::PAGE_SIZE != 0 || cfg.channel_size > cfg.memory / 2 {
            return Err(DomainError::ChannelSize {
                name,
                size: cfg.channel_size,
            });
        }
        // Tell the domain where its device is (or that it has none): probing the bus costs
        // an exit per config access. Where its BAR0 is follows once the device exists.
        let user_placed = cfg
            .cmdline
            .split_whitespace()
            .any(|t| t.starts_with("nvme="));
        let cmdline = if user_placed {
            cfg.cmdline.clone()
        } else {
            let nvme = match cfg.device {
                Some(_) => format!("nvme=00:{PCI_DEVICE_NUMBER:02x}.0"),
                None => "nvme=none".to_string(),
            };
            format!("{} {nvme}", cfg.cmdline).trim_start().to_string()
        };
        let cmdline = if standby {
            format!("{cmdline} standby").trim_start().to_string()
        } else {
            cmdline
        };
        if cmdline.len() > layout::CMDLINE_MAX || cmdline.contains('\0') {
            return Err(DomainError::Cmdline {
                name,
                len: cmdline.len(),
            });
        }
        if cfg.device.is_some() && cfg.memory > PCI_ECAM_BASE {
            return Err(DomainError::MemoryTooLarge {
                name,
                memory: cfg.memory,
            });
        }
        let channel_gpa = cfg.memory - cfg.channel_size;
        let header = match cfg.channel_size {
            0 => None,
            size => Some(channel_header(&name, epoch, size)?),
        };
        let info = cfg.image.check(layout::IMAGE_BASE, channel_gpa)?;
        let mem = guest_memory(&name, cfg.memory)?;

        // 2. Guest memory contents.
        let setup = |what: &'static str| {
            let name = name.clone();
            move |source| DomainError::Setup { name, what, source }
        };
        let loaded = cfg.image.load(&info, &mem)?;
        arch::write_page_tables_and_gdt(&mem).map_err(setup("page tables"))?;
        let log = LogReader::create(&mem, layout::LOG_RING, layout::LOG_RING_SIZE)
            .map_err(setup("log ring"))?;
        let channel = (cfg.channel_size > 0).then_some(channel_gpa);
        if let (Some(gpa), Some(header)) = (channel, header) {
            mem.write_obj(header, GuestAddress(gpa))
                .map_err(setup("channel header"))?;
        }

        let shared = if standby {
            Shared::standby()
        } else {
            Shared::new()
        };
        let shared = Arc::new(shared.map_err(|source| DomainError::Host {
            name: name.clone(),
            what: "eventfd",
            source,
        })?);
        let device = match &cfg.device {
            None => None,
            Some(DeviceSpec::EmulatedNvme(nvme_cfg)) => {
                let dev = DomainDevice::emulated_nvme(&name, nvme_cfg, DeviceThread::Worker)?;
                Some((dev, false))
            }
            Some(DeviceSpec::Persistent(d)) => Some((d.clone(), true)),
        };
        let bar0 = device.as_ref().filter(|_| !user_placed).and_then(|(d, _)| {
            d.lock()
                .config
                .bars()
                .into_iter()
                .find(|(b, _)| b.index == 0)
        });
        let cmdline = match bar0 {
            // The VMM placed it (BARs cannot be moved): the domain need not size it.
            Some((bar, gpa)) => format!("{cmdline} nvme_bar0={gpa:#x}/{:#x}", bar.size),
            None => cmdline,
        };
        if cmdline.len() > layout::CMDLINE_MAX {
            return Err(DomainError::Cmdline {
                name,
                len: cmdline.len(),
            });
        }

        // 3. KVM objects.
        let kvm_err = |what: &'static str| {
            let name = name.clone();
            move |source| DomainError::Kvm { name, what, source }
        };
        let vm = vm_with_memory(hv, &name, &mem)?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = hv
            .supported_cpuid()
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&arch::long_mode_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&arch::entry_regs(loaded.entry))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        let platform = if register_pvm_vif(&vcpu, layout::VIF_PAGE) {
            Platform::Pvm
        } else {
            hv.host_kind()
        };
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        let stats = VcpuStats::open(&vcpu);

        // 4. Boot info, now that the platform is known.
        let boot_info = BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            platform: platform as u32,
            mem_size: cfg.memory,
            tsc_khz: u64::from(tsc_khz),
            log_ring: layout::LOG_RING,
            log_ring_size: layout::LOG_RING_SIZE,
            panic_record: layout::PANIC_RECORD,
            channel: channel.unwrap_or(0),
            channel_size: cfg.channel_size,
            cmdline: layout::BOOT_INFO + layout::CMDLINE_OFFSET,
            cmdline_len: cmdline.len() as u64,
            // Configuration space through ECAM: one exit per access instead of two.
            pci_ecam: if cfg.device.is_some() {
                PCI_ECAM_BASE
            } else {
                0
            },
            reserved: [0; 4],
        };
        arch::write_boot_info(&mem, &boot_info, &cmdline).map_err(setup("boot info"))?;

        // 5. Devices and the vCPU thread.
        let console = Arc::new(Console::new(&name, cfg.echo));
        let mut pio = Bus::new();
        pio.insert(
            u64::from(port::SERIAL_COM1),
            u64::from(port::SERIAL_LEN),
            Arc::new(Mutex::new(SerialPort::new(console.clone()))),
        )
        .map_err(|e| DomainError::Host {
            name: name.clone(),
            what: "port bus",
            source: std::io::Error::other(e),
        })?;
        let mut mmio = Bus::new();
        // A standby's device stays with the live domain until the hand-over.
        let present = Arc::new(AtomicBool::new(!standby));
        if let Some((dev, _)) = device.as_ref().filter(|_| !standby) {
            dev.attach_to(&mem, &shared, &vm);
        }
        let mut handover = None;
        if let Some((dev, _)) = &device {
            let device = &dev.pci;
            let bus_err = |e: crate::devices::bus::BusError| DomainError::Host {
                name: name.clone(),
                what: "device buses",
                source: std::io::Error::other(e),
            };
            let device_err =
                |source: Box<dyn std::error::Error + Send + Sync>| DomainError::Device {
                    name: name.clone(),
                    source,
                };
            let mut pci_bus = PciBus::new();
            if !standby {
                pci_bus
                    .insert(PCI_DEVICE_NUMBER, device.clone())
                    .map_err(|e| device_err(Box::new(e)))?;
            }
            let pci_bus = Arc::new(Mutex::new(pci_bus));
            pio.insert(
                u64::from(port::PCI_CONFIG_ADDRESS),
                8,
                Arc::new(Mutex::new(PciConfigPorts(pci_bus.clone()))),
            )
            .map_err(bus_err)?;
            mmio.insert(
                PCI_ECAM_BASE,
                ddvm_passthrough::ECAM_BUS_SIZE,
                Arc::new(Mutex::new(PciEcam(pci_bus.clone()))),
            )
            .map_err(bus_err)?;
            let bars = device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config
                .bars();
            for (bar, gpa) in bars {
                mmio.insert(
                    gpa,
                    bar.size,
                    Arc::new(Mutex::new(BarWindow {
                        base: gpa,
                        device: device.clone(),
                        present: present.clone(),
                    })),
                )
                .map_err(bus_err)?;
            }
            if standby {
                handover = Some(Handover {
                    device: dev.clone(),
                    pci_bus,
                    present: present.clone(),
                });
            }
        }
        for a in attach(&mem, &shared)? {
            // ddvm's guests poll: their devices have no interrupt line to resample.
            let _ = put_on_bus(&vm, &name, &mut mmio, a)?;
        }
        // Completion notifications are handled in the kernel: ~23 µs instead of ~70 µs.
        if let Err(e) = vm.register_ioevent(
            &shared.notify,
            &IoEventAddress::Pio(u64::from(port::NOTIFY)),
            NoDatamatch,
        ) {
            // Once per boot, and a failing domain is booted again and again: limited.
            crate::limited!(
                warn,
                key: name,
                "domain {name}: notify ioeventfd unavailable ({e}); using exits"
            );
        }
        let ctx = VcpuContext {
            mem: mem.clone(),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            shared: shared.clone(),
            console: console.clone(),
            log: Some(log),
            channel: channel.map(|gpa| (gpa, epoch)),
            started,
            abi_ports: true,
            // A standby runs none of the disk's work before it is handed the device.
            on_wait: device
                .as_ref()
                .and_then(|(d, _)| d.wait_work())
                .map(|mut work| {
                    let present = present.clone();
                    Box::new(move || present.load(Ordering::Acquire) && work()) as vcpu::WaitWork
                }),
            index: 0,
        };
        let (thread, cpu_clock) = start_vcpu(&name, vcpu, ctx)?;
        Ok(Domain {
            name,
            epoch,
            platform,
            loaded,
            channel,
            channel_header: header,
            started,
            shared,
            console,
            stats,
            thread: Some(thread),
            aps: Vec::new(),
            helpers: Vec::new(),
            cpu_clock,
            exit: None,
            device: device.map(|(d, _)| d).filter(|_| !standby),
            handover,
            vm: Some(vm),
            mem,
        })
    }

    /// Boots a stock Linux kernel ([`crate::linux`]) with the devices `attach` builds: each
    /// goes on the MMIO bus and into the ACPI tables, its interrupt an irqfd on the I/O APIC.
    /// VMX/SVM hosts only: under PVM a stock kernel never leaves the instruction emulator.
    pub fn boot_linux(
        hv: &Hypervisor,
        cfg: &DomainConfig,
        boot: &crate::linux::LinuxBoot,
        attach: &mut AttachFn<'_>,
    ) -> Result<Domain, DomainError> {
        use crate::linux;
        let started = Instant::now();
        let name = cfg.name.clone();
        if cfg.memory < linux::MIN_MEMORY {
            return Err(DomainError::Unsupported {
                name,
                what: format!(
                    "memory of {} MiB; a Linux guest needs at least {} MiB",
                    cfg.memory >> 20,
                    linux::MIN_MEMORY >> 20
                ),
            });
        }
        let mem = guest_memory(&name, cfg.memory)?;
        let setup = |what: &'static str| {
            let name = name.clone();
            move |source| DomainError::Setup { name, what, source }
        };
        let host_err = |what: &'static str| {
            let name = name.clone();
            move |source| DomainError::Host { name, what, source }
        };
        let kvm_err = |what: &'static str| {
            let name = name.clone();
            move |source| DomainError::Kvm { name, what, source }
        };
        arch::write_page_tables_and_gdt(&mem).map_err(setup("page tables"))?;
        let shared = Arc::new(Shared::new().map_err(host_err("eventfd"))?);
        let attachments = attach(&mem, &shared)?;
        let devices: Vec<linux::MmioDevice> = attachments
            .iter()
            .filter_map(|a| {
                a.irq.as_ref().map(|line| linux::MmioDevice {
                    base: a.base,
                    len: a.len,
                    gsi: line.gsi,
                })
            })
            .collect();
        if let Some(a) = attachments.iter().find(|a| a.base < cfg.memory) {
            return Err(DomainError::Unsupported {
                name,
                what: format!(
                    "memory of {} MiB reaches the device window at {:#x}",
                    cfg.memory >> 20,
                    a.base
                ),
            });
        }
        let kernel = linux::load(&mem, boot, &devices).map_err(|source| DomainError::Linux {
            name: name.clone(),
            source,
        })?;

        let vm = vm_with_memory(hv, &name, &mem)?;
        // VMX needs a TSS area for real-mode emulation; elsewhere the call fails harmlessly.
        let _ = vm.set_tss_address(linux::TSS_ADDRESS);
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let mut vcpus = Vec::new();
        for index in 0..boot.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            if index == 0 && register_pvm_vif(&vcpu, layout::VIF_PAGE) {
                return Err(DomainError::Unsupported {
                    name,
                    what: "/dev/kvm is PVM, which cannot run a stock Linux kernel (it would run \
                           in PVM's instruction emulator); run it on a VMX/SVM host, or in the \
                           TCG rig (scripts/rig)"
                        .into(),
                });
            }
            let mut cpuid = hv
                .supported_cpuid()
                .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?
                .clone();
            linux::vcpu_cpuid(&mut cpuid, index, boot.vcpus);
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if index == 0 {
                // The boot processor: the legacy PIC's wire, long mode, the 64-bit entry. The
                // others stay in reset until the kernel's INIT/SIPI (KVM's local APIC holds
                // them: with the in-kernel irqchip they start uninitialized).
                let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
                linux::virtual_wire(&mut lapic);
                vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
                let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                vcpu.set_sregs(&arch::long_mode_sregs(sregs))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
                vcpu.set_regs(&kvm_bindings::kvm_regs {
                    rip: kernel.entry,
                    rsi: linux::ZERO_PAGE,
                    rsp: linux::INITIAL_RSP,
                    rflags: 0x2,
                    ..Default::default()
                })
                .map_err(kvm_err("KVM_SET_REGS"))?;
            }
            vcpus.push(vcpu);
        }
        let platform = hv.host_kind();
        let stats = VcpuStats::open(&vcpus[0]);

        let console = Arc::new(Console::new(&name, cfg.echo));
        let bus_err = |e: crate::devices::bus::BusError| DomainError::Host {
            name: name.clone(),
            what: "device buses",
            source: std::io::Error::other(e),
        };
        // COM1's line, level-triggered like the disk's: asserted while the UART has an
        // interrupt pending.
        let trigger =
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("eventfd"))?;
        let uart = Arc::new(Mutex::new(SerialPort::with_interrupt(
            console.clone(),
            trigger.try_clone().map_err(host_err("eventfd"))?,
        )));
        let pending = uart.clone();
        let mut lines = vec![register_line(
            &vm,
            &name,
            LevelIrq {
                gsi: linux::SERIAL_GSI,
                trigger,
                pending: Arc::new(move || {
                    pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .interrupt_pending()
                }),
            },
        )?];
        let mut pio = Bus::new();
        pio.insert(
            u64::from(port::SERIAL_COM1),
            u64::from(port::SERIAL_LEN),
            uart,
        )
        .map_err(bus_err)?;
        pio.insert(
            u64::from(linux::CMOS_PORT),
            2,
            Arc::new(Mutex::new(linux::Cmos::default())),
        )
        .map_err(bus_err)?;
        pio.insert(
            u64::from(linux::I8042_PORT),
            5,
            Arc::new(Mutex::new(linux::I8042::new(shared.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(
            u64::from(linux::SLEEP_PORT),
            2,
            Arc::new(Mutex::new(linux::SleepControl::new(shared.clone()))),
        )
        .map_err(bus_err)?;
        let mut mmio = Bus::new();
        for a in attachments {
            lines.extend(put_on_bus(&vm, &name, &mut mmio, a)?);
        }
        let mut helpers = Vec::new();
        {
            let shared = shared.clone();
            helpers.push(
                std::thread::Builder::new()
                    .name(format!("irq-{name}"))
                    .spawn(move || resample_lines(&shared, lines))
                    .map_err(host_err("spawning the interrupt thread"))?,
            );
        }
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let mut threads = Vec::new();
        for (index, vcpu) in (0..).zip(vcpus) {
            let ctx = VcpuContext {
                mem: mem.clone(),
                pio: pio.clone(),
                mmio: mmio.clone(),
                shared: shared.clone(),
                console: console.clone(),
                log: None,
                channel: None,
                started,
                abi_ports: false,
                on_wait: None,
                index,
            };
            let thread_name = match index {
                0 => name.clone(),
                i => format!("{name}-{i}"),
            };
            match start_vcpu(&thread_name, vcpu, ctx) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Those started go down with the guest.
                    shared.request_stop();
                    for (t, _) in threads {
                        join_vcpu(t);
                    }
                    for h in helpers {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        let mut threads = threads.into_iter();
        let Some((thread, cpu_clock)) = threads.next() else {
            return Err(DomainError::Unsupported {
                name,
                what: "no vCPU".into(),
            });
        };
        let aps = threads.map(|(t, _)| t).collect();
        Ok(Domain {
            name,
            epoch: 0,
            platform,
            loaded: Loaded {
                entry: kernel.entry,
                end: kernel.end,
                has_pvh_entry: false,
            },
            channel: None,
            channel_header: None,
            started,
            shared,
            console,
            stats,
            thread: Some(thread),
            aps,
            helpers,
            cpu_clock,
            exit: None,
            device: None,
            handover: None,
            vm: Some(vm),
            mem,
        })
    }

    /// Hands a standby its device ([`Domain::boot_standby`]): attaches the device to this
    /// domain's memory and VM, puts it in the PCI slot, opens its BAR windows, and lets the
    /// vCPU go on to probe it. The previous holder must have been quiesced (its
    /// [`retire`](Self::retire) or drop). From then on the domain is timed as booting: wait for
    /// it with [`wait_ready`](Self::wait_ready).
    pub fn promote(&mut self) -> Result<(), DomainError> {
        let standby_err = |what| DomainError::Standby {
            name: self.name.clone(),
            what,
        };
        if self.has_stopped().is_some() {
            return Err(standby_err("the standby has stopped"));
        }
        let (Some(h), Some(vm)) = (self.handover.take(), self.vm.clone()) else {
            return Err(standby_err("the domain is not a standby"));
        };
        h.device.attach_to(&self.mem, &self.shared, &vm);
        // Quiesced with this domain from now on, whatever happens next.
        self.device = Some(h.device.clone());
        lock_bus(&h.pci_bus)
            .insert(PCI_DEVICE_NUMBER, h.device.pci.clone())
            .map_err(|_| standby_err("the standby's PCI slot is taken"))?;
        h.present.store(true, Ordering::Release);
        if !self.shared.promote() {
            return Err(standby_err("the standby has stopped"));
        }
        Ok(())
    }

    /// Whether this domain is a standby not yet handed its device.
    pub fn is_standby(&self) -> bool {
        self.handover.is_some()
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Boot generation.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Platform the domain runs on.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// What was loaded.
    pub fn loaded(&self) -> Loaded {
        self.loaded
    }

    /// When boot started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The console.
    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    /// Guest memory (for the channel and tests).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Channel address, if the domain has a channel.
    pub fn channel(&self) -> Option<u64> {
        self.channel
    }

    /// The channel header as the VMM wrote it at boot (the geometry the VMM trusts).
    pub fn channel_header(&self) -> Option<ChannelHeader> {
        self.channel_header
    }

    /// The eventfd written when the domain notifies completions.
    pub fn notify_eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.shared.notify
    }

    /// Statistics of the emulated NVMe controller, if the domain has one.
    pub fn nvme_stats(&self) -> Option<ddvm_passthrough::NvmeStats> {
        self.device.as_ref().map(|d| d.stats())
    }

    /// Exit counters.
    pub fn exits(&self) -> &vcpu::ExitCounters {
        &self.shared.exits
    }

    /// A KVM statistic of the vCPU (e.g. `exits`, `insn_emulation`).
    pub fn vcpu_stat(&self, name: &str) -> Option<u64> {
        self.stats.as_ref()?.get(name)
    }

    /// Every KVM statistic of the vCPU.
    pub fn vcpu_stats(&self) -> Vec<(String, u64)> {
        self.stats.as_ref().map(|s| s.all()).unwrap_or_default()
    }

    /// Current state.
    pub fn state(&self) -> RunState {
        self.shared.state()
    }

    /// Waits for the ready mark; returns the time from boot start to it, or the state at the
    /// timeout (still booting, or stopped).
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, RunState> {
        match self
            .shared
            .wait_for(timeout, |s| !matches!(s, RunState::Booting))
        {
            RunState::Ready(t) => Ok(t),
            other => Err(other),
        }
    }

    /// Waits until a standby is held at its standby exit (true), or `timeout` passes or it
    /// stops (false).
    pub fn wait_standby(&self, timeout: Duration) -> bool {
        self.shared.wait_for(timeout, |s| {
            matches!(s, RunState::Standby | RunState::Stopped(_))
        }) == RunState::Standby
    }

    /// Waits until the guest stops or `timeout` passes.
    pub fn wait_stopped(&self, timeout: Duration) -> Option<DomainExit> {
        match self
            .shared
            .wait_for(timeout, |s| matches!(s, RunState::Stopped(_)))
        {
            RunState::Stopped(e) => Some(e),
            _ => None,
        }
    }

    /// The domain's heartbeat counter.
    pub fn heartbeat(&self) -> Option<u64> {
        let gpa = self.channel?;
        self.mem
            .read_obj::<u64>(GuestAddress(gpa + chan::HEARTBEAT))
            .ok()
    }

    /// Puts a fault-injection request in the channel header and wakes the domain.
    pub fn request_fault(&self, fault: u32) -> bool {
        self.request_fault_with(fault, 0)
    }

    /// Puts a fault-injection request with its argument in the channel header (the argument
    /// first: the domain reads it when it sees the code) and wakes the domain.
    pub fn request_fault_with(&self, fault: u32, arg: u32) -> bool {
        let ok = self.arm_fault(fault, arg);
        self.shared.kick();
        ok
    }

    /// Puts a fault-injection request in the channel header without waking the domain: a
    /// warm standby, parked before its bring-up, finds it there once promoted (its bring-up
    /// acts on a pending request before it marks itself ready).
    pub fn arm_fault(&self, fault: u32, arg: u32) -> bool {
        let Some(gpa) = self.channel else {
            return false;
        };
        let ok = self
            .mem
            .write_obj(arg, GuestAddress(gpa + chan::FAULT_ARG))
            .is_ok();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ok && self
            .mem
            .store(
                fault,
                GuestAddress(gpa + chan::FAULT),
                std::sync::atomic::Ordering::Release,
            )
            .is_ok()
    }

    /// How long the vCPU thread has run on a CPU so far, guest and VMM work together (`None`
    /// once it is stopped, or where the host does not say). A heartbeat that stood still
    /// while this did not move is the host's stall, not the guest's hang.
    pub fn vcpu_cpu_time(&self) -> Option<Duration> {
        let clock = self.cpu_clock.filter(|_| self.thread.is_some())?;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out pointer; `clock` names the CPU clock of the vCPU thread,
        // which is not joined while `self.thread` holds it, so the id cannot name another
        // thread.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(ts.tv_sec).ok()?,
            u32::try_from(ts.tv_nsec).ok()?,
        ))
    }

    /// The vCPU thread's id, while it runs.
    pub fn vcpu_tid(&self) -> Option<i32> {
        self.shared.tid().filter(|_| self.thread.is_some())
    }

    /// Whether the vCPU is blocked in a wait exit (idle, so a still heartbeat is no hang).
    pub fn is_waiting(&self) -> bool {
        self.shared.waiting()
    }

    /// Whether the guest has stopped (without blocking).
    pub fn has_stopped(&self) -> Option<DomainExit> {
        match self.shared.state() {
            RunState::Stopped(e) => Some(e),
            _ => None,
        }
    }

    /// The device handed to the domain, if it has one (and is not retired).
    pub fn device(&self) -> Option<&Arc<DomainDevice>> {
        self.device.as_ref()
    }

    /// Wakes the domain if it waits.
    pub fn kick(&self) {
        self.shared.kick();
    }

    /// Stops the guest (if it still runs), joins its vCPU thread and returns why it stopped.
    pub fn stop(&mut self) -> DomainExit {
        if let Some(thread) = self.thread.take() {
            self.shared.request_stop();
            let exit = join_vcpu(thread);
            for ap in self.aps.drain(..) {
                join_vcpu(ap);
            }
            for h in self.helpers.drain(..) {
                let _ = h.join();
            }
            // With several vCPUs, the first to stop says why.
            self.exit = Some(self.has_stopped().unwrap_or(exit));
        }
        self.exit.clone().unwrap_or(DomainExit::Stopped)
    }
}

/// Entries of each channel ring.
pub const RING_ENTRIES: u32 = 64;
/// Largest request data.
pub const MAX_TRANSFER_LIMIT: u32 = 128 << 10;

/// The channel header for a channel of `size` bytes: [`RING_ENTRIES`] per ring, the rest as
/// bounce slots, one per ring entry, each as large as fits (at most 128 KiB).
pub fn channel_header(name: &str, epoch: u64, size: u64) -> Result<ChannelHeader, DomainError> {
    let probe = ChannelHeader::new(class::BLK, epoch, size, RING_ENTRIES, 512);
    let per_slot = u64::from(probe.data_size) / u64::from(RING_ENTRIES);
    let max_transfer = (per_slot.min(u64::from(MAX_TRANSFER_LIMIT)) / 4096 * 4096) as u32;
    let header = ChannelHeader::new(class::BLK, epoch, size, RING_ENTRIES, max_transfer);
    if max_transfer == 0 || header.check_geometry().is_err() {
        return Err(DomainError::ChannelSize {
            name: name.to_string(),
            size,
        });
    }
    Ok(header)
}

/// A guest's RAM, identity-mapped by the entry page tables.
fn guest_memory(name: &str, size: u64) -> Result<GuestMem, DomainError> {
    memory::create(size, layout::IDENTITY_MAPPED).map_err(|source| DomainError::Memory {
        name: name.to_string(),
        source,
    })
}

/// A VM whose one memory slot is `mem`, from guest address 0.
fn vm_with_memory(hv: &Hypervisor, name: &str, mem: &GuestMem) -> Result<Arc<VmFd>, DomainError> {
    let kvm_err = |what: &'static str| {
        let name = name.to_string();
        move |source| DomainError::Kvm { name, what, source }
    };
    let vm = Arc::new(hv.kvm().create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    let (host, len) = memory::host_range(mem).ok_or_else(|| DomainError::Setup {
        name: name.to_string(),
        what: "memory slot",
        source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(0)),
    })?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: len,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: the region maps `mem`, which the guest owns and drops only after the VM (field
    // order and `Drop` of `Domain`); the host range is exactly the mapping vm-memory created.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    Ok(vm)
}

/// Puts a caller's device on the MMIO bus, with its ioeventfds and its irqfd.
/// Puts a device on the MMIO bus with its ioeventfds and, if it has one, its interrupt line
/// (returned with its resample eventfd, for [`resample_lines`]).
fn put_on_bus(
    vm: &VmFd,
    name: &str,
    mmio: &mut Bus,
    a: MmioAttachment,
) -> Result<Option<(LevelIrq, vmm_sys_util::eventfd::EventFd)>, DomainError> {
    let kvm_err = |what: &'static str| {
        let name = name.to_string();
        move |source| DomainError::Kvm { name, what, source }
    };
    mmio.insert(a.base, a.len, a.device)
        .map_err(|e| DomainError::Host {
            name: name.to_string(),
            what: "MMIO bus",
            source: std::io::Error::other(e),
        })?;
    for (addr, fd) in &a.ioevents {
        vm.register_ioevent(fd, &IoEventAddress::Mmio(*addr), NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
    }
    a.irq.map(|line| register_line(vm, name, line)).transpose()
}

/// Registers `line` as an irqfd with a resample eventfd; returns both, for
/// [`resample_lines`].
fn register_line(
    vm: &VmFd,
    name: &str,
    line: LevelIrq,
) -> Result<(LevelIrq, vmm_sys_util::eventfd::EventFd), DomainError> {
    let resample = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
        DomainError::Host {
            name: name.to_string(),
            what: "eventfd",
            source,
        }
    })?;
    vm.register_irqfd_with_resample(&line.trigger, &resample, line.gsi)
        .map_err(|source| DomainError::Kvm {
            name: name.to_string(),
            what: "KVM_IRQFD (resample)",
            source,
        })?;
    Ok((line, resample))
}

/// Starts the vCPU thread (`vcpu-NAME`); returns it and its CPU-time clock.
fn start_vcpu(
    name: &str,
    vcpu: kvm_ioctls::VcpuFd,
    ctx: VcpuContext,
) -> Result<(JoinHandle<DomainExit>, Option<libc::clockid_t>), DomainError> {
    let host_err = |what: &'static str, source| DomainError::Host {
        name: name.to_string(),
        what,
        source,
    };
    vcpu::install_kick_handler().map_err(|e| {
        host_err(
            "kick signal handler",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    let thread = std::thread::Builder::new()
        .name(format!("vcpu-{name}"))
        .spawn(move || vcpu::run(vcpu, ctx))
        .map_err(|e| host_err("spawning the vCPU thread", e))?;
    let clock = thread_cpu_clock(&thread);
    Ok((thread, clock))
}

/// The CPU-time clock of a running thread, if the host gives one.
fn thread_cpu_clock<T>(thread: &JoinHandle<T>) -> Option<libc::clockid_t> {
    use std::os::unix::thread::JoinHandleExt;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the thread is not joined (we borrow its handle), so its pthread_t is valid;
    // `clock` is a valid out pointer.
    let r = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) };
    (r == 0).then_some(clock)
}

/// Kicks the vCPU thread out of KVM_RUN until it finishes. The first signal normally does;
/// one that lands just before the thread enters KVM_RUN is repeated.
fn join_vcpu(thread: JoinHandle<DomainExit>) -> DomainExit {
    let mut delay = Duration::from_micros(20);
    while !thread.is_finished() {
        // The thread exists until joined, so the signal target is valid.
        let _ = thread.kill(vcpu::kick_signal());
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(5));
    }
    thread
        .join()
        .unwrap_or(DomainExit::HostError { errno: libc::EIO })
}

impl Domain {
    /// Stops the vCPU and quiesces the device: the domain can no longer run nor be reached
    /// by its device. Freeing its VM and memory is left to the drop, which the caller may put
    /// off to a less urgent moment (it takes about half a millisecond here).
    pub fn retire(&mut self) {
        self.stop();
        // The vCPU fd went with its thread; now the device lets go of this domain's memory.
        if let Some(d) = self.device.take() {
            d.quiesce();
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.retire();
        // Then the VM goes, and then (as a field) the memory.
        self.vm.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use vmm_sys_util::eventfd::EventFd;

    /// After an EOI (the resample eventfd), the line is asserted again exactly while its
    /// device has an interrupt pending; the thread ends once the guest is asked to stop.
    #[test]
    fn a_level_line_is_asserted_again_after_eoi_only_while_pending() {
        let shared = Arc::new(Shared::new().unwrap());
        let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = trigger.try_clone().unwrap();
        let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let eoi = resample.try_clone().unwrap();
        let pending = Arc::new(AtomicBool::new(true));
        let p = pending.clone();
        let line = LevelIrq {
            gsi: 5,
            trigger,
            pending: Arc::new(move || p.load(Ordering::Acquire)),
        };
        let s = shared.clone();
        let thread = std::thread::spawn(move || resample_lines(&s, vec![(line, resample)]));
        let asserted =
            |timeout: Duration| vcpu::wait_eventfd(&seen, timeout) && seen.read().is_ok();
        eoi.write(1).unwrap();
        assert!(
            asserted(Duration::from_secs(2)),
            "pending at EOI: asserted again"
        );
        pending.store(false, Ordering::Release);
        eoi.write(1).unwrap();
        assert!(
            !asserted(Duration::from_millis(200)),
            "nothing pending: left low"
        );
        shared.request_stop();
        thread.join().unwrap();
    }
}
