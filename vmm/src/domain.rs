//! Driver domains: a guest ([`crate::vm::Guest`]) with a channel at the top of its memory and,
//! if it has one, the PCI device it drives — boot, warm standby, promotion, retirement — and
//! the device that outlives its domains ([`DomainDevice`]).
//!
//! The device is reached through its PCI function only ([`PciDevice`] over a
//! [`ddvm_passthrough::PciBackend`]): attached to a domain's memory at boot or promotion,
//! quiesced (bus mastering off, function reset, DMA detached) when the domain goes. What one
//! kind of device needs beyond that (for the emulated NVMe controller: doorbells served in the
//! kernel, passes its owner runs, a shutdown through its registers) is its [`DeviceModel`],
//! in a module of its own ([`crate::devices::nvme`]).

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddvm_abi::channel::{class, offset as chan, ChannelHeader};
use ddvm_abi::layout;
use ddvm_abi::port;
use ddvm_passthrough::{DmaWindow, PciBus, PciDevice};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::console::Echo;
use crate::devices::pci::{BarWindow, PciConfigPorts, PciEcam};
use crate::devices::{Bus, DeviceSpec};
use crate::hypervisor::Hypervisor;
use crate::loader::Image;
use crate::memory::GuestMem;
use crate::vcpu::{self, RunState, Shared};
use crate::vm::{self, Guest, GuestConfig, GuestError, ImageExtras};

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

/// What one kind of device needs from the VMM beyond its PCI function (implemented by
/// [`crate::devices::nvme`]). The generic path calls only this.
pub trait DeviceModel: Send + Sync {
    /// The VM of the domain that holds the device now (`None`: the holder is going; whatever
    /// the model registered with its VM goes with that VM).
    fn set_vm(&self, vm: Option<Arc<VmFd>>);
    /// A domain's VM was made for this device (a standby's too, which is handed the device
    /// later), before its vCPU runs: the model registers with it what costs too much to
    /// register on the recovery path (a memory slot waits for a KVM SRCU grace period).
    /// Returns what must live until that VM is gone, which the domain drops after its VM.
    fn vm_created(&self, _vm: &Arc<VmFd>) -> Option<Box<dyn Any + Send + Sync>> {
        None
    }
    /// The device's own orderly shutdown, given by the VMM through its registers: what an
    /// orderly stop falls back to when the domain cannot give it. Called with the domain's
    /// vCPU stopped (nothing else drives the device), before the reset of
    /// [`DomainDevice::quiesce`].
    fn shutdown(&self, pci: &Mutex<PciDevice>, timeout: Duration) -> DeviceShutdown;
    /// The model, for its own module to look at (its counters).
    fn as_any(&self) -> &dyn Any;
    /// The channel class (`ddvm_abi::channel::class`) a domain serves this device as: what
    /// its channel header says, and which command-line keys name the device to the domain
    /// ([`device_hint_key`]).
    fn class(&self) -> u32 {
        class::BLK
    }
    /// DMA the device attempted that an IOMMU blocked, counted so far across every domain it
    /// served, where the model can see them (a VFIO device: the IOMMU's fault reports); the
    /// emulated controller's refusals are its DMA window's.
    fn dma_faults(&self) -> u64 {
        0
    }
    /// What the domain's vCPU does before it blocks in a wait, when the device has no
    /// poller of its own (a VFIO function's INTx unmask); it never ends the wait itself.
    fn on_wait(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        None
    }
}

/// A device's passes, run by its owner's thread instead of a worker thread of the device's
/// own ([`DeviceThread::Owner`]).
pub trait DevicePoller: Send + Sync {
    /// Serves what the driver submitted without trapping; returns the work taken.
    fn poll(&self) -> u64;
    /// Before the owner sleeps: asks the driver to ring, and re-checks. True when work
    /// arrived meanwhile (poll instead of sleeping).
    fn arm(&self) -> bool;
    /// The eventfd an owner sleeps on.
    fn eventfd(&self) -> std::os::fd::RawFd;
    /// Resets the eventfd after the owner woke.
    fn clear(&self);
    /// The driver waits in the VMM right after it submits, and its waits run
    /// [`DevicePoller::poll`] ([`DomainDevice::wait_work`]): the device may tell it that
    /// submissions need no doorbell ([`driver_waits`]).
    fn set_driver_waits(&self, _on: bool) {}
}

/// Whether a domain booted with `cmdline` waits in the VMM as soon as it has nothing to do,
/// without polling first: `poll_us=0 poll_busy_us=0` (what [`poll_keys`] adds where the VMM
/// has one CPU, or the operator's own). Its device's submissions are then seen in the wait
/// that follows them ([`DevicePoller::set_driver_waits`]).
pub fn driver_waits(cmdline: &str) -> bool {
    let line = ddvm_cmdline::Cmdline::new(cmdline);
    let zero = |key| line.value(key).is_some_and(|v| v.parse::<u64>() == Ok(0));
    zero("poll_us") && zero("poll_busy_us")
}

/// How long a driver domain polls before it waits in the VMM, as command-line keys to add to
/// `cmdline`: none where the VMM has CPUs to spare (the domain's own defaults, tens of µs),
/// or where the command line sets them already; `poll_us=0 poll_busy_us=0` where it has one
/// CPU. There the CPU the domain would poll on is the one the work it polls for needs (the
/// client, the block service, the emulated device), so it waits at once, and its wait's exit
/// serves that work on its own thread (`DomainDevice::wait_work`).
pub fn poll_keys(cmdline: &str, cpus_to_spare: bool) -> Option<&'static str> {
    let set = cmdline
        .split_whitespace()
        .any(|t| t.starts_with("poll_us=") || t.starts_with("poll_busy_us="));
    (!cpus_to_spare && !set).then_some("poll_us=0 poll_busy_us=0")
}

/// A PCI device that outlives the driver domains it is handed to.
///
/// Each boot attaches it to the new domain's memory; when the domain goes (crash or stop) the
/// domain quiesces it — bus mastering off, function reset (which waits for DMA in progress and
/// drops a volatile write cache), DMA detached — before its memory is freed.
pub struct DomainDevice {
    pci: Arc<Mutex<PciDevice>>,
    // The window the device's DMA goes through (a clone: its counters are the device's).
    dma: DmaWindow,
    model: Box<dyn DeviceModel>,
    // Set when the device's owner runs its passes (`DeviceThread::Owner`).
    poller: Option<Arc<dyn DevicePoller>>,
    // The owner's pass, run on the domain's vCPU thread when the domain waits.
    owner_pass: Arc<Mutex<Option<OwnerPass>>>,
    // The domain it serves waits as soon as it has nothing to do (`driver_waits`): its waits
    // also watch what the owner's pass watches.
    driver_waits: Arc<AtomicBool>,
    // Whether the device has a volatile write cache, as the VMM itself knows it (`None`:
    // unknown to the VMM).
    volatile_write_cache: Option<bool>,
}

/// The owner's pass ([`OwnerWork`]), shared.
pub type OwnerPass = Arc<dyn OwnerWork>;

/// The device's owner's work (the block service: device, channel, clients), run on a
/// domain's vCPU thread when the domain waits.
pub trait OwnerWork: Send + Sync {
    /// One pass; true when it made progress the domain waits for. It must not block on the
    /// thread it runs on (it may find the owner busy and do nothing).
    fn pass(&self) -> bool;
    /// Eventfds that mean work for [`OwnerWork::pass`] (the clients' notifications), for a
    /// domain that waits as soon as it has nothing to do ([`driver_waits`]) to watch in its
    /// waits: it takes the clients' requests itself, and the owner's thread, which then
    /// need not watch them, is no hop on their way. `None`: the owner watches them.
    fn watch(&self) -> Option<Arc<dyn crate::vcpu::WaitWatch>> {
        None
    }
}

impl std::fmt::Debug for DomainDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainDevice").finish_non_exhaustive()
    }
}

/// Which thread serves a device's work that does not trap (for the emulated controller: its
/// shadow doorbells; trapped doorbell writes are always served on the vCPU thread that wrote
/// them).
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
    /// A device that outlives its domains, detached: its PCI function (BARs placed from
    /// [`PCI_MMIO_BASE`]), the DMA window its backend reaches memory through, what its kind
    /// needs beyond PCI, and the passes its owner runs (`None`: it has a worker of its own).
    pub fn new(
        pci: PciDevice,
        dma: DmaWindow,
        model: Box<dyn DeviceModel>,
        poller: Option<Arc<dyn DevicePoller>>,
        volatile_write_cache: Option<bool>,
    ) -> Arc<DomainDevice> {
        Arc::new(DomainDevice {
            pci: Arc::new(Mutex::new(pci)),
            dma,
            model,
            poller,
            owner_pass: Arc::default(),
            driver_waits: Arc::default(),
            volatile_write_cache,
        })
    }

    /// Whether the device has a volatile write cache that a reset may drop, as the VMM knows
    /// it without asking a driver domain (the emulated controller's configuration); `None`
    /// where the VMM does not know. A domain's own claim can add to this, never take away.
    pub fn volatile_write_cache(&self) -> Option<bool> {
        self.volatile_write_cache
    }

    /// DMA of the device refused so far, across every domain it served: by its DMA window
    /// (outside the domain's memory, bus mastering off, or detached), or by the IOMMU (a VFIO
    /// device's faults as the kernel reports them).
    pub fn dma_refused(&self) -> u64 {
        self.dma.refused() + self.model.dma_faults()
    }

    /// What the device's kind adds to PCI.
    pub fn model(&self) -> &dyn DeviceModel {
        self.model.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PciDevice> {
        crate::sync::lock(&self.pci)
    }

    /// Serves what the driver submitted without trapping (owner-served devices only; see
    /// [`DeviceThread::Owner`]). Returns the work taken.
    pub fn poll(&self) -> u64 {
        self.poller.as_ref().map_or(0, |p| p.poll())
    }

    /// Work for the vCPU thread of the domain this device serves when the domain waits (see
    /// [`crate::vcpu::VcpuContext::on_wait`]): the owner's pass if it set one
    /// ([`DomainDevice::set_owner_pass`]), else the device's passes. A domain waits when it
    /// has nothing to do until the device or the VMM acts, so its thread acts itself, in the
    /// exit it pays anyway, instead of blocking until the owner's thread gets a CPU and wakes
    /// it. The owner's thread keeps serving too, so a domain that never waits (hung, or busy)
    /// changes nothing for it.
    pub fn wait_work(&self) -> Option<crate::vcpu::WaitWork> {
        let Some(poller) = self.poller.clone() else {
            let hook = self.model.on_wait()?;
            return Some(crate::vcpu::WaitWork::new(move || {
                hook();
                false
            }));
        };
        let owner = self.owner_pass.clone();
        let watcher = self.owner_pass.clone();
        let driver_waits = self.driver_waits.clone();
        Some(crate::vcpu::WaitWork {
            run: Box::new(move || {
                let pass = crate::sync::lock(&owner).clone();
                match pass {
                    Some(pass) => pass.pass(),
                    None => poller.poll() > 0,
                }
            }),
            watch: Box::new(move || {
                if !driver_waits.load(Ordering::Acquire) {
                    return None;
                }
                crate::sync::lock(&watcher).as_ref()?.watch()
            }),
        })
    }

    /// Whether the domain it serves now waits as soon as it has nothing to do, and watches
    /// what the owner's pass watches ([`OwnerWork::watch`]) in its waits.
    pub fn waits_watch_owner(&self) -> bool {
        self.driver_waits.load(Ordering::Acquire)
            && crate::sync::lock(&self.owner_pass)
                .as_ref()
                .is_some_and(|p| p.watch().is_some())
    }

    /// Whether a domain's wait takes the completions it published: a block device whose
    /// owner, the block service, serves it (`DeviceThread::Owner`) sets its pass
    /// ([`DomainDevice::set_owner_pass`]) before it serves, and the pass takes the channel's
    /// completions, or wakes the service when it cannot run. Such a domain may leave the
    /// notification of what it publishes to the wait that follows (`wait_collects`).
    pub fn wait_collects(&self) -> bool {
        self.poller.is_some() && self.model.class() == class::BLK
    }

    /// Sets (or clears) the owner's pass that [`DomainDevice::wait_work`] runs; it holds for
    /// every domain the device serves from now on.
    pub fn set_owner_pass(&self, pass: Option<OwnerPass>) {
        *crate::sync::lock(&self.owner_pass) = pass;
    }

    /// Before the owner sleeps: asks the driver to ring, and re-checks. True when work
    /// arrived meanwhile (poll instead of sleeping).
    pub fn arm(&self) -> bool {
        self.poller.as_ref().is_some_and(|p| p.arm())
    }

    /// The eventfd an owner sleeps on (for the emulated controller: an ioeventfd doorbell,
    /// bus mastering back on).
    pub fn eventfd(&self) -> Option<std::os::fd::RawFd> {
        self.poller.as_ref().map(|p| p.eventfd())
    }

    /// Resets the eventfd after the owner woke.
    pub fn clear(&self) {
        if let Some(p) = &self.poller {
            p.clear();
        }
    }

    /// Attaches the device to a domain: DMA into `mem`, its interrupts (MSI-X messages) kick
    /// the domain's vCPU, and the model's registrations go to `vm`.
    /// An error (why) leaves the device detached: a real device whose reset keeps failing is
    /// refused to the domain.
    /// `driver_waits`: the domain waits as soon as it has nothing to do ([`driver_waits`]).
    fn attach_to(
        &self,
        mem: &GuestMem,
        shared: &Arc<Shared>,
        vm: &Arc<VmFd>,
        driver_waits: bool,
    ) -> Result<(), String> {
        // The device's interrupts wake the domain if it waits: they write its kick eventfd
        // (the device holds the eventfd, never the shared state: no reference cycle).
        self.lock().attach(mem.clone(), shared.kick_eventfd())?;
        self.model.set_vm(Some(vm.clone()));
        if let Some(p) = &self.poller {
            p.set_driver_waits(driver_waits);
        }
        self.driver_waits.store(driver_waits, Ordering::Release);
        Ok(())
    }

    /// Bus mastering off, function reset, DMA detached: the device can no longer touch the
    /// domain it served.
    pub fn quiesce(&self) {
        // The VM goes first: the reset then stops what the model registered with the dying
        // VM without unregistering it piece by piece (for the emulated controller, each
        // doorbell ioeventfd waits for a KVM SRCU grace period: 0.3–1 ms in all, sometimes
        // tens of ms, on the recovery path). It goes with the VM.
        self.model.set_vm(None);
        self.lock().quiesce();
    }

    /// The device's orderly shutdown given by the VMM itself, through its registers (for an
    /// NVMe controller: CC.SHN = 01b, then CSTS.SHST polled until it reads 10b, at most
    /// `timeout`, so the controller writes its volatile cache back to the medium). It is what
    /// an orderly stop falls back to when the domain cannot shut the device down itself
    /// (dead, hung, or an image without the channel's SHUTDOWN): the VMM reaches the
    /// registers of the emulated controller, as it would a VFIO device's through its BAR
    /// region. Call it with the domain's vCPU stopped (nothing else drives the device) and
    /// before the reset of [`DomainDevice::quiesce`], which would drop the cache.
    pub fn shutdown_controller(&self, timeout: Duration) -> DeviceShutdown {
        self.model.shutdown(&self.pci, timeout)
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
    /// What can go wrong with any guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
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
}

/// What a standby is handed when it is promoted.
struct Handover {
    device: Arc<DomainDevice>,
    pci_bus: Arc<Mutex<PciBus>>,
    present: Arc<AtomicBool>,
}

fn lock_bus(bus: &Mutex<PciBus>) -> std::sync::MutexGuard<'_, PciBus> {
    crate::sync::lock(bus)
}

/// A running driver domain: a guest ([`Guest`], whose accessors it derefs to) with its
/// channel and device.
pub struct Domain {
    epoch: u64,
    channel: Option<u64>,
    channel_header: Option<ChannelHeader>,
    // Quiesced after the vCPU thread (which holds it through the buses) is joined, before the
    // VM and the memory its DMA window maps are freed.
    device: Option<Arc<DomainDevice>>,
    // A standby's device, PCI slot and BAR gate, until its promotion.
    handover: Option<Handover>,
    // It waits as soon as it has nothing to do (`driver_waits`): told to its device when it
    // gets it.
    driver_waits: bool,
    // Dropped after the device is quiesced: vCPU threads joined, then the VM, then the memory.
    guest: Guest,
    // What the device's model registered with the VM ([`DeviceModel::vm_created`]): dropped
    // after the guest, so after its VM.
    _device_memory: Option<Box<dyn Any + Send + Sync>>,
}

impl Deref for Domain {
    type Target = Guest;
    fn deref(&self) -> &Guest {
        &self.guest
    }
}

impl DerefMut for Domain {
    fn deref_mut(&mut self) -> &mut Guest {
        &mut self.guest
    }
}

/// What a driver domain adds to the boot of its image: the channel, the device on the PCI
/// bus (or, for a standby, the empty slot it will fill).
struct DomainBoot<'a> {
    name: String,
    epoch: u64,
    standby: bool,
    channel_size: u64,
    channel: Option<u64>,
    header: Option<ChannelHeader>,
    spec: Option<&'a DeviceSpec>,
    // The domain's command line places the device itself (`nvme=`, `nic=`): no BAR0 hint
    // added.
    user_placed: bool,
    // The command-line key naming the device (`nvme`, `nic`; see `device_hint_key`).
    hint_key: &'static str,
    // The domain waits as soon as it has nothing to do (`driver_waits`).
    driver_waits: bool,
    device: Option<Arc<DomainDevice>>,
    handover: Option<Handover>,
    // What the model registered with the VM at its creation ([`DeviceModel::vm_created`]).
    device_memory: Option<Box<dyn Any + Send + Sync>>,
}

impl ImageExtras for DomainBoot<'_> {
    type Error = DomainError;

    fn channel_size(&self) -> u64 {
        self.channel_size
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn pci_ecam(&self) -> u64 {
        if self.spec.is_some() {
            PCI_ECAM_BASE
        } else {
            0
        }
    }

    fn standby(&self) -> bool {
        self.standby
    }

    fn prepare(&mut self, mem: &GuestMem) -> Result<Option<String>, DomainError> {
        if let (Some(gpa), Some(header)) = (self.channel, self.header) {
            mem.write_obj(header, GuestAddress(gpa))
                .map_err(|source| GuestError::Setup {
                    name: self.name.clone(),
                    what: "channel header",
                    source,
                })?;
        }
        let device = match self.spec {
            None => None,
            Some(spec) => Some(spec.device(&self.name, DeviceThread::Worker)?),
        };
        let bar0 = device.as_ref().filter(|_| !self.user_placed).and_then(|d| {
            let pci = d.lock();
            let bar0 = pci.config.bars().into_iter().find(|(b, _)| b.index == 0)?;
            Some((bar0, (pci.intx(), pci.clean_at_handover())))
        });
        self.device = device;
        // The VMM placed it (BARs cannot be moved): the domain need not size it. A device
        // whose INTx line wakes the domain is named so (`KEY_intx`): the driver then leaves
        // INTx enabled and acknowledges the device's causes before it waits.
        // A function every domain gets at its power-on state (the VMM's own models) is named
        // so (`KEY_clean`): the driver then skips its reset and the writes of power-on values,
        // each an exit.
        let key = self.hint_key;
        let collects = self.device.as_ref().is_some_and(|d| d.wait_collects());
        let hint = bar0.map(|((bar, gpa), (intx, clean))| {
            let intx = if intx {
                format!(" {key}_intx")
            } else {
                String::new()
            };
            let clean = if clean {
                format!(" {key}_clean")
            } else {
                String::new()
            };
            format!("{key}_bar0={gpa:#x}/{:#x}{intx}{clean}", bar.size)
        });
        // The domain's waits take its completions (`DomainDevice::wait_collects`): a domain
        // about to wait need not notify (`wait_collects`).
        Ok(match (hint, collects) {
            (Some(hint), true) => Some(format!("{hint} wait_collects")),
            (None, true) => Some("wait_collects".to_string()),
            (hint, false) => hint,
        })
    }

    fn attach(
        &mut self,
        mem: &GuestMem,
        shared: &Arc<Shared>,
        vm: &Arc<VmFd>,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<Option<vcpu::WaitWork>, DomainError> {
        let Some(dev) = self.device.clone() else {
            return Ok(None);
        };
        let name = &self.name;
        let standby = self.standby;
        self.device_memory = dev.model.vm_created(vm);
        // A standby's device stays with the live domain until the hand-over.
        let present = Arc::new(AtomicBool::new(!standby));
        if !standby {
            dev.attach_to(mem, shared, vm, self.driver_waits)
                .map_err(|why| DomainError::Device {
                    name: name.clone(),
                    source: why.into(),
                })?;
        }
        let device = &dev.pci;
        let bus_err = |e: crate::devices::bus::BusError| GuestError::Host {
            name: name.clone(),
            what: "device buses",
            source: std::io::Error::other(e),
        };
        let mut pci_bus = PciBus::new();
        if !standby {
            pci_bus
                .insert(PCI_DEVICE_NUMBER, device.clone())
                .map_err(|e| DomainError::Device {
                    name: name.clone(),
                    source: Box::new(e),
                })?;
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
        let bars = dev.lock().config.bars();
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
            self.handover = Some(Handover {
                device: dev.clone(),
                pci_bus,
                present: present.clone(),
            });
        }
        // A standby runs none of the disk's work before it is handed the device.
        Ok(dev.wait_work().map(|mut work| {
            let watching = present.clone();
            let mut watch = work.watch;
            vcpu::WaitWork {
                run: Box::new(move || present.load(Ordering::Acquire) && (work.run)()),
                watch: Box::new(move || {
                    if watching.load(Ordering::Acquire) {
                        watch()
                    } else {
                        None
                    }
                }),
            }
        }))
    }
}

impl Domain {
    /// Builds and starts a domain for boot generation `epoch`.
    pub fn boot(hv: &Hypervisor, cfg: &DomainConfig, epoch: u64) -> Result<Domain, DomainError> {
        Self::build(hv, cfg, epoch, false)
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
        Self::build(hv, cfg, epoch, true)
    }

    fn build(
        hv: &Hypervisor,
        cfg: &DomainConfig,
        epoch: u64,
        standby: bool,
    ) -> Result<Domain, DomainError> {
        let started = Instant::now();
        let name = cfg.name.clone();
        // Everything the request can get wrong, before any KVM object exists.
        vm::check_memory(&name, cfg.memory)?;
        if !cfg.channel_size.is_multiple_of(layout::PAGE_SIZE) || cfg.channel_size > cfg.memory / 2
        {
            return Err(DomainError::ChannelSize {
                name,
                size: cfg.channel_size,
            });
        }
        // Tell the domain where its device is (or that it has none): probing the bus costs
        // an exit per config access. Where its BAR0 is follows once the device exists. The
        // key says which driver the device is for: `nvme=` (block), `nic=` (network).
        let class = cfg.device.as_ref().map_or(class::BLK, DeviceSpec::class);
        let hint_key = device_hint_key(class);
        let user_placed = cfg
            .cmdline
            .split_whitespace()
            .any(|t| t.starts_with("nvme=") || t.starts_with("nic="));
        let cmdline = if user_placed {
            cfg.cmdline.clone()
        } else {
            let at = match cfg.device {
                Some(_) => format!("{hint_key}=00:{PCI_DEVICE_NUMBER:02x}.0"),
                None => format!("{hint_key}=none"),
            };
            format!("{} {at}", cfg.cmdline).trim_start().to_string()
        };
        let cmdline = if standby {
            format!("{cmdline} standby").trim_start().to_string()
        } else {
            cmdline
        };
        let cmdline = match poll_keys(&cmdline, crate::sys::cpus_to_spare()) {
            Some(keys) => format!("{cmdline} {keys}").trim_start().to_string(),
            None => cmdline,
        };
        vm::check_cmdline(&name, &cmdline)?;
        if cfg.device.is_some() && cfg.memory > PCI_ECAM_BASE {
            return Err(DomainError::MemoryTooLarge {
                name,
                memory: cfg.memory,
            });
        }
        let header = match cfg.channel_size {
            0 => None,
            size => Some(channel_header(&name, class, epoch, size)?),
        };
        let channel = (cfg.channel_size > 0).then_some(cfg.memory - cfg.channel_size);
        let mut extras = DomainBoot {
            name: name.clone(),
            epoch,
            standby,
            channel_size: cfg.channel_size,
            channel,
            header,
            spec: cfg.device.as_ref(),
            user_placed,
            hint_key,
            driver_waits: driver_waits(&cmdline),
            device: None,
            handover: None,
            device_memory: None,
        };
        let guest_cfg = GuestConfig {
            name,
            image: cfg.image.clone(),
            memory: cfg.memory,
            cmdline,
            echo: cfg.echo,
        };
        let guest = Guest::boot_image(hv, &guest_cfg, started, &mut extras, &mut |_, _| {
            Ok(Vec::new())
        })?;
        Ok(Domain {
            epoch,
            channel,
            channel_header: header,
            device: extras.device.filter(|_| !standby),
            handover: extras.handover,
            driver_waits: extras.driver_waits,
            guest,
            _device_memory: extras.device_memory,
        })
    }

    /// Hands a standby its device ([`Domain::boot_standby`]): attaches the device to this
    /// domain's memory and VM, puts it in the PCI slot, opens its BAR windows, and lets the
    /// vCPU go on to probe it. The previous holder must have been quiesced (its
    /// [`retire`](Self::retire) or drop). From then on the domain is timed as booting: wait for
    /// it with [`wait_ready`](Guest::wait_ready).
    pub fn promote(&mut self) -> Result<(), DomainError> {
        let name = self.name().to_string();
        let standby_err = |what| DomainError::Standby {
            name: name.clone(),
            what,
        };
        if self.has_stopped().is_some() {
            return Err(standby_err("the standby has stopped"));
        }
        let (Some(h), Some(vm)) = (self.handover.take(), self.guest.vm_fd().cloned()) else {
            return Err(standby_err("the domain is not a standby"));
        };
        h.device
            .attach_to(
                self.guest.memory(),
                self.guest.shared(),
                &vm,
                self.driver_waits,
            )
            .map_err(|why| DomainError::Device {
                name: name.clone(),
                source: why.into(),
            })?;
        // Quiesced with this domain from now on, whatever happens next.
        self.device = Some(h.device.clone());
        lock_bus(&h.pci_bus)
            .insert(PCI_DEVICE_NUMBER, h.device.pci.clone())
            .map_err(|_| standby_err("the standby's PCI slot is taken"))?;
        h.present.store(true, Ordering::Release);
        if !self.guest.shared().promote() {
            return Err(standby_err("the standby has stopped"));
        }
        Ok(())
    }

    /// Whether this domain is a standby not yet handed its device.
    pub fn is_standby(&self) -> bool {
        self.handover.is_some()
    }

    /// Boot generation.
    pub fn epoch(&self) -> u64 {
        self.epoch
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
        &self.guest.shared().notify
    }

    /// Waits until a standby is held at its standby exit (true), or `timeout` passes or it
    /// stops (false).
    pub fn wait_standby(&self, timeout: Duration) -> bool {
        self.guest.shared().wait_for(timeout, |s| {
            matches!(s, RunState::Standby | RunState::Stopped(_))
        }) == RunState::Standby
    }

    /// The domain's heartbeat counter.
    pub fn heartbeat(&self) -> Option<u64> {
        let gpa = self.channel?;
        self.memory()
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
        self.kick();
        ok
    }

    /// Puts a fault-injection request in the channel header without waking the domain: a
    /// warm standby, parked before its bring-up, finds it there once promoted (its bring-up
    /// acts on a pending request before it marks itself ready).
    pub fn arm_fault(&self, fault: u32, arg: u32) -> bool {
        let Some(gpa) = self.channel else {
            return false;
        };
        let mem = self.memory();
        let ok = mem
            .write_obj(arg, GuestAddress(gpa + chan::FAULT_ARG))
            .is_ok();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ok && mem
            .store(
                fault,
                GuestAddress(gpa + chan::FAULT),
                std::sync::atomic::Ordering::Release,
            )
            .is_ok()
    }

    /// The device handed to the domain, if it has one (and is not retired).
    pub fn device(&self) -> Option<&Arc<DomainDevice>> {
        self.device.as_ref()
    }

    /// Stops the vCPU and quiesces the device: the domain can no longer run nor be reached
    /// by its device. Freeing its VM and memory is left to the drop, which the caller may put
    /// off to a less urgent moment (it takes about half a millisecond here).
    pub fn retire(&mut self) {
        self.guest.stop();
        // The vCPU fd went with its thread; now the device lets go of this domain's memory.
        if let Some(d) = self.device.take() {
            d.quiesce();
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.retire();
        // Then (as a field) the guest: its VM, then its memory.
    }
}

/// Entries of each channel ring.
pub const RING_ENTRIES: u32 = 64;
/// Largest request data.
pub const MAX_TRANSFER_LIMIT: u32 = 128 << 10;

/// The command-line key that names a domain's device of channel class `class` (its location
/// `KEY=BB:DD.F` or `KEY=none`, and its BAR0 `KEY_bar0=0xBASE/0xSIZE`): `nvme` for block,
/// `nic` for network. The key tells the domain which driver the VMM meant, so it need not read
/// the function's class code.
pub fn device_hint_key(class: u32) -> &'static str {
    match class {
        class::NET => "nic",
        _ => "nvme",
    }
}

/// The channel header of device class `class` (one of `ddvm_abi::channel::class`) for a
/// channel of `size` bytes: [`RING_ENTRIES`] per ring, the rest as bounce slots, one per ring
/// entry, each as large as fits (at most 128 KiB).
pub fn channel_header(
    name: &str,
    class: u32,
    epoch: u64,
    size: u64,
) -> Result<ChannelHeader, DomainError> {
    let probe = ChannelHeader::new(class, epoch, size, RING_ENTRIES, 512);
    let per_slot = u64::from(probe.data_size) / u64::from(RING_ENTRIES);
    let max_transfer = (per_slot.min(u64::from(MAX_TRANSFER_LIMIT)) / 4096 * 4096) as u32;
    let header = ChannelHeader::new(class, epoch, size, RING_ENTRIES, max_transfer);
    if max_transfer == 0 || header.check_geometry().is_err() {
        return Err(DomainError::ChannelSize {
            name: name.to_string(),
            size,
        });
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::{driver_waits, poll_keys};

    #[test]
    fn a_domain_waits_at_once_only_when_both_of_its_polls_are_zero() {
        let one_cpu = format!("nvme=00:04.0 {}", poll_keys("", false).unwrap());
        assert!(driver_waits(&one_cpu));
        assert!(!driver_waits("nvme=00:04.0"), "the domain's defaults poll");
        assert!(!driver_waits("poll_us=0"));
        assert!(!driver_waits("poll_us=0 poll_busy_us=5"));
        assert!(
            !driver_waits("poll_us=0 poll_busy_us=0 poll_us=20"),
            "the last one counts"
        );
        assert!(!driver_waits("spin_poll_us=0 poll_busy_us=0"));
    }

    #[test]
    fn a_domain_is_told_not_to_poll_only_on_one_cpu_and_only_when_its_command_line_is_silent() {
        assert_eq!(poll_keys("nvme=00:04.0", true), None);
        assert_eq!(
            poll_keys("nvme=00:04.0", false),
            Some("poll_us=0 poll_busy_us=0")
        );
        assert_eq!(poll_keys("poll_us=5", false), None);
        assert_eq!(poll_keys("x poll_busy_us=7", false), None);
        // A key that only ends like one is not one.
        assert_eq!(
            poll_keys("spin_poll_us=5", false),
            Some("poll_us=0 poll_busy_us=0")
        );
    }
}
