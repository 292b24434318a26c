//! An emulated NVMe controller (NVMe 1.4, NVM command set, one namespace) backed by a file.
//!
//! It stands in for real hardware in tests and chaos runs, so it behaves like a real
//! controller where that matters to recovery: a volatile write cache that a reset loses,
//! status codes for every malformed command, and a DMA window it cannot leave.
//!
//! # Identity
//!
//! Vendor 0x1b36 (Red Hat, the QEMU device range) with device 0x00dd, a device ID no QEMU
//! device uses (QEMU's own NVMe is 0x1b36:0x0010); subsystem 0x1af4:0x1100 as QEMU devices
//! have. Class code 0x010802 (mass storage, NVM, NVMe): drivers must match on the class code,
//! never on the IDs, so the same driver runs on QEMU's NVMe and on real disks.
//!
//! # Processing model
//!
//! [`EmulatedNvme::new`] builds the controller in its power-on state. Register writes (CC,
//! AQA, ...) take effect synchronously on the caller's thread, and so does a doorbell written
//! as trapped MMIO: the write runs the controller's passes right there, so by the time the
//! driver's vCPU resumes the commands are done and their completions posted. The admin queue
//! always works that way, which keeps a driver's bring-up free of thread hand-offs.
//!
//! Work that arrives without a trapped write — shadow doorbells (Doorbell Buffer Config) and
//! doorbells the VMM serves through a KVM ioeventfd — needs someone to look for it, in one of
//! two ways:
//! - [`EmulatedNvme::start_worker`] starts a worker thread that polls and sleeps on the
//!   doorbell eventfd (`worker`); dropping the controller stops and joins it.
//! - [`EmulatedNvme::poller`] gives a [`NvmePoller`] to a thread that already polls other
//!   work, such as the block service of the disk this controller backs: it calls
//!   [`NvmePoller::poll`] in its loop, [`NvmePoller::arm`] before it sleeps, and sleeps on
//!   [`NvmePoller::eventfd`] among its other eventfds. A device model served by the thread
//!   that serves its disk costs no thread hand-off per request (the model stands in for
//!   hardware, which costs the host no CPU at all).
//!
//! With neither, only trapped doorbell writes are processed.
//!
//! # Flush
//!
//! A Flush does not hold up the queues while the host syncs the backing file: the pass writes
//! the volatile cache back to the file, hands the sync to the controller's flusher thread
//! (`flusher`) and goes on with the next commands. When the sync returns, the flusher writes
//! the doorbell eventfd, so the worker or the poller's owner wakes and its next pass posts
//! the Flush's completion. A reset forgets the Flushes in flight without waiting for their
//! syncs: their completions are never posted to the queues of the driver after it. Without
//! a worker or a poller there is nobody to post a completion later, so the sync runs inside
//! the pass, as do the syncs of FUA writes, of a shutdown notification and of switching the
//! cache off.
//!
//! # Interrupts
//!
//! The controller has MSI-X ([`PciBackend::msix`]): one vector per queue pair it can have
//! (vector 0 for the admin queue, whose completion queue always has interrupts enabled), the
//! table on the page after the doorbells and the Pending Bit Array on the page after that, as
//! QEMU's NVMe lays out BAR0. A completion queue created with Interrupts Enabled (IEN) names
//! its vector (IV); after a pass posts completions to it, the pass raises that vector once
//! through the [`Msix`] the [`crate::pci::PciDevice`] gave it, which wakes the domain if the
//! driver enabled MSI-X and unmasked the vector (or leaves it pending). A driver that asks for
//! no interrupts is never woken: it polls.
//!
//! # A controller that outlives its domain
//!
//! Like a real device handed to a VM through VFIO, the controller (its namespace, its volatile
//! write cache, its counters, its worker) stays with the VMM when its driver domain dies.
//! [`crate::pci::PciDevice::quiesce`] resets it (bus mastering off, function reset, which
//! waits for the command being processed and drops the write cache), resets its MSI-X state
//! and detaches it ([`PciBackend::detach`]: no DMA into the old memory; the MSI-X state drops
//! the old domain's wake eventfd); [`crate::pci::PciDevice::attach`] points it at the next
//! domain's memory and wake eventfd. The
//! next domain's driver then initialises it from scratch. [`NvmeStats`] count across all
//! the domains the controller served.
//!
//! The VMM may register [`EmulatedNvme::doorbell_eventfd`] as a KVM ioeventfd for the I/O
//! queue doorbells ([`EmulatedNvme::io_doorbell_range`]): such a write carries no value, so
//! that is only correct while [`EmulatedNvme::shadow_doorbells_active`]; the callback given to
//! [`EmulatedNvme::set_on_shadow_doorbells`] says when that starts and stops. The admin queue
//! never uses shadow doorbells: its doorbell must stay a trapped MMIO write.

mod admin;
mod controller;
mod flusher;
mod identify;
mod io;
pub(crate) mod namespace;
pub mod prp;
mod queue;
mod regs;
pub mod shadow;
mod status;
mod worker;

#[cfg(test)]
mod testdriver;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::dma::DmaWindow;
use crate::pci::{
    BarInfo, BarKind, Msix, MsixLayout, PciBackend, PciIds, WakeDomain, MIN_BAR_SIZE,
};
use crate::sync::lock;
use controller::{Controller, Limits, Observed, DOORBELL_FRESH};
pub use namespace::{NamespaceError, CACHE_LIMIT_BYTES};
pub use queue::{Command, Completion};
pub use regs::{DOORBELL_BASE, MQES};
pub use status::Status;
pub use worker::IDLE_SPIN;

/// Passes one trapped doorbell write may run (each takes up to 32 commands per queue).
const INLINE_PASSES: usize = 16;
/// Passes one [`NvmePoller::poll`] may run: enough to drain a queue of 128 entries, short
/// enough that the poller's other work is not held up.
const POLL_PASSES: usize = 4;

/// PCI vendor ID.
pub const NVME_VENDOR_ID: u16 = 0x1b36;
/// PCI device ID (ddvm's own; see the module docs).
pub const NVME_DEVICE_ID: u16 = 0x00dd;
/// PCI subsystem vendor ID.
pub const NVME_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// PCI subsystem ID.
pub const NVME_SUBSYSTEM_ID: u16 = 0x1100;
/// PCI class code: mass storage, non-volatile memory, NVM Express.
pub const NVME_CLASS_CODE: u32 = 0x010802;
/// NVMe version 1.4.0.
pub const NVME_VERSION: u32 = 0x0001_0400;
/// Maximum Data Transfer Size, as a power of two of the 4 KiB page: 128 KiB.
pub const MDTS: u8 = 5;
/// Largest data transfer of one command, in bytes.
pub const MAX_TRANSFER: usize = (prp::PAGE_SIZE as usize) << MDTS;
/// Most I/O queue pairs a controller can be configured with (the doorbells fit in BAR0).
pub const MAX_IO_QUEUES: u16 = 511;

/// How to build an emulated NVMe controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeConfig {
    /// Backing file of namespace 1 (created sparse if missing; extended if shorter).
    pub backing: PathBuf,
    /// Namespace size in bytes (a multiple of `lba_size`).
    pub size: u64,
    /// Logical block size: 512 or 4096.
    pub lba_size: u32,
    /// Model a volatile write cache that loses unflushed writes on reset.
    pub volatile_write_cache: bool,
    /// I/O queue pairs offered (1 to [`MAX_IO_QUEUES`]).
    pub max_io_queues: u16,
    /// Serial number (printable ASCII, at most 20 bytes).
    pub serial: String,
    /// Model number (printable ASCII, at most 40 bytes).
    pub model: String,
}

/// Errors building or starting an emulated NVMe controller.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The namespace's backing file or geometry is wrong.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// Bad number of I/O queues.
    #[error("NVMe controller for {backing}: max_io_queues {value}; expected 1 to {MAX_IO_QUEUES}")]
    Queues {
        /// Backing file (names the device).
        backing: PathBuf,
        /// Requested value.
        value: u16,
    },
    /// Bad serial or model string.
    #[error("NVMe controller for {backing}: {field} {value:?}; expected printable ASCII of at most {max} bytes")]
    Identity {
        /// Backing file.
        backing: PathBuf,
        /// `serial` or `model`.
        field: &'static str,
        /// Requested value.
        value: String,
        /// Longest allowed.
        max: usize,
    },
    /// The doorbell eventfd cannot be created.
    #[error("NVMe controller for {backing}: cannot create the doorbell eventfd: {source}")]
    EventFd {
        /// Backing file.
        backing: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `start_worker` was called twice.
    #[error("NVMe controller for {backing}: the worker thread is already running")]
    WorkerRunning {
        /// Backing file.
        backing: PathBuf,
    },
    /// The flusher thread cannot be spawned.
    #[error("NVMe controller for {backing}: cannot spawn the flusher thread: {source}")]
    FlusherSpawn {
        /// Backing file.
        backing: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread cannot be spawned.
    #[error("NVMe controller for {backing}: cannot spawn the worker thread: {source}")]
    Spawn {
        /// Backing file.
        backing: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of an emulated NVMe controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeStats {
    /// Commands taken from submission queues.
    pub commands: u64,
    /// Completions posted.
    pub completions: u64,
    /// Doorbell writes that arrived as MMIO (not through an ioeventfd).
    pub doorbell_writes: u64,
    /// Doorbell values ignored: nonexistent queue, value beyond the queue, bad access size.
    pub invalid_doorbells: u64,
    /// PRPs, PRP lists or queue/buffer addresses outside the DMA window.
    pub dma_errors: u64,
    /// Cached blocks lost by a reset before they were flushed.
    pub dropped_cached_writes: u64,
    /// Register writes ignored: read-only registers, bad sizes, admin queue registers while
    /// enabled.
    pub ignored_register_writes: u64,
    /// Accesses the DMA window refused, for any reason: outside the domain's memory (as in
    /// `dma_errors`, plus queue and doorbell-buffer accesses), bus mastering off, or detached
    /// ([`crate::DmaWindow::refused`]).
    pub dma_refused: u64,
    /// Flush commands whose sync ran on the flusher thread while the queues were served.
    pub flushes_async: u64,
    /// Syncs the flusher thread ran (one covers every Flush waiting when it starts, so there
    /// may be fewer than `flushes_async`).
    pub flush_syncs: u64,
    /// Flushes handed to the flusher whose completion is not posted yet (now, not a total).
    pub flushes_in_flight: u64,
    /// Flushes in flight when a reset came: their syncs ran, their completions were never
    /// posted.
    pub flushes_abandoned: u64,
    /// MSI-X messages sent (domain wake-ups) after passes that posted completions to a queue
    /// with interrupts enabled; a message left pending (masked, MSI-X off) is not counted.
    pub interrupts: u64,
}

/// BAR0's MSI-X table and PBA for a controller with `max_io_queues` queue pairs, and BAR0's
/// size: registers and doorbells rounded up to 4 KiB, the table on the next page(s), the
/// PBA on the page after, the whole a power of two (QEMU's NVMe layout).
pub fn bar0_layout(max_io_queues: u16) -> (MsixLayout, u64) {
    let page = MIN_BAR_SIZE;
    let vectors = max_io_queues.saturating_add(1).max(2);
    let doorbells_end = DOORBELL_BASE + 8 * (u64::from(max_io_queues) + 1);
    let table_offset = doorbells_end.next_multiple_of(page);
    let layout = MsixLayout {
        vectors,
        table_bar: 0,
        table_offset,
        pba_bar: 0,
        pba_offset: table_offset + (u64::from(vectors) * 16).next_multiple_of(page),
    };
    let end = layout.pba_offset + layout.pba_size().next_multiple_of(page);
    (layout, end.next_power_of_two())
}

/// A handle on a controller's counters and shadow doorbell state that stays valid after the
/// controller is boxed into a [`crate::pci::PciDevice`].
#[derive(Clone)]
pub struct NvmeMonitor {
    observed: Arc<Observed>,
    dma: DmaWindow,
}

impl NvmeMonitor {
    /// The counters now.
    pub fn stats(&self) -> NvmeStats {
        NvmeStats {
            dma_refused: self.dma.refused(),
            ..self.observed.stats()
        }
    }

    /// Whether the driver has configured shadow doorbells (Doorbell Buffer Config).
    pub fn shadow_doorbells_active(&self) -> bool {
        self.observed.shadow_active.load(Ordering::SeqCst)
    }
}

/// Runs an emulated controller's passes on a thread that polls other work too (see the module
/// docs). It stays valid after the controller is boxed into a [`crate::pci::PciDevice`], and
/// keeps working when the controller moves between domains.
#[derive(Clone)]
pub struct NvmePoller {
    shared: Arc<Shared>,
}

impl NvmePoller {
    /// Processes what the driver has submitted (up to one batch per queue, a few passes at
    /// most), posts the completions and raises the interrupts of the queues that asked for
    /// them. Returns the commands taken: zero means nothing was waiting.
    pub fn poll(&self) -> u64 {
        self.shared.process(POLL_PASSES)
    }

    /// Before the caller sleeps: asks the driver to ring (shadow doorbell event indexes) and
    /// re-checks. True when work arrived meanwhile and the caller must poll instead of sleep.
    pub fn arm(&self) -> bool {
        self.shared.with_ctrl(Controller::arm)
    }

    /// Whether the driver waits in the VMM right after it submits, its wait running
    /// [`NvmePoller::poll`] (a driver domain that does not poll, on a VMM with one CPU): then
    /// [`NvmePoller::arm`] tells it that submissions need no doorbell, since the wait that
    /// follows one takes it. A driver that polls instead must not be told so: nobody would
    /// look at its submission until it waits.
    pub fn set_driver_waits(&self, on: bool) {
        self.shared.with_ctrl(|c| c.driver_waits = on);
    }

    /// Readable when a doorbell arrived by ioeventfd or bus mastering came back on: sleep on
    /// it, then [`NvmePoller::clear`] it.
    pub fn eventfd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.shared.eventfd.as_raw_fd()
    }

    /// Resets the eventfd after a wake-up.
    pub fn clear(&self) {
        // Non-blocking: EAGAIN just means nothing was signalled.
        let _ = self.shared.eventfd.read();
    }
}

/// Callback told when shadow doorbells start (`true`) or stop (`false`).
pub type ShadowCallback = Box<dyn Fn(bool) + Send>;

/// State shared by the controller handle and its worker.
struct Shared {
    ctrl: Mutex<Controller>,
    doorbells: Arc<[AtomicU32]>,
    /// Written by doorbells (ioeventfd), bus mastering, stop, and the flusher.
    eventfd: Arc<EventFd>,
    stop: AtomicBool,
    observed: Arc<Observed>,
    on_shadow: Mutex<Option<ShadowCallback>>,
    dma: DmaWindow,
}

impl Shared {
    /// Runs `f` under the controller lock, then reports a shadow doorbell change (outside the
    /// lock, so the callback may do slow work such as (un)registering an ioeventfd).
    fn with_ctrl<R>(&self, f: impl FnOnce(&mut Controller) -> R) -> R {
        let (r, event) = {
            let mut c = lock(&self.ctrl);
            let r = f(&mut c);
            (r, c.shadow_event.take())
        };
        if let Some(active) = event {
            if let Some(cb) = lock(&self.on_shadow).as_ref() {
                cb(active);
            }
        }
        r
    }

    /// Runs passes until one takes no command (at most `max`); each raises the vectors of the
    /// queues it posted completions to. Returns the commands taken.
    fn process(&self, max: usize) -> u64 {
        let mut consumed = 0;
        for _ in 0..max {
            let pass = self.with_ctrl(|c| c.pass());
            consumed += pass.consumed as u64;
            if pass.consumed == 0 {
                break;
            }
        }
        consumed
    }
}

/// An emulated NVMe controller; implements [`PciBackend`] (BAR0 = registers and doorbells).
pub struct EmulatedNvme {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Joined when the controller is dropped.
    flusher: flusher::FlusherThread,
    backing: PathBuf,
    max_io_queues: u16,
    /// BAR0's MSI-X table and PBA, and its size.
    layout: (MsixLayout, u64),
}

fn check_ascii(
    backing: &std::path::Path,
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<(), NvmeError> {
    if value.len() <= max && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    Err(NvmeError::Identity {
        backing: backing.to_path_buf(),
        field,
        value: value.to_string(),
        max,
    })
}

impl EmulatedNvme {
    /// Opens (or creates) the backing file and builds a controller in its power-on state;
    /// `dma` is the window over the domain's memory. No thread runs until
    /// [`EmulatedNvme::start_worker`].
    pub fn new(cfg: NvmeConfig, dma: DmaWindow) -> Result<EmulatedNvme, NvmeError> {
        if cfg.max_io_queues == 0 || cfg.max_io_queues > MAX_IO_QUEUES {
            return Err(NvmeError::Queues {
                backing: cfg.backing,
                value: cfg.max_io_queues,
            });
        }
        check_ascii(&cfg.backing, "serial", &cfg.serial, 20)?;
        check_ascii(&cfg.backing, "model", &cfg.model, 40)?;
        let ns = namespace::Namespace::open(
            &cfg.backing,
            cfg.size,
            cfg.lba_size,
            cfg.volatile_write_cache,
        )?;
        let eventfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| NvmeError::EventFd {
            backing: cfg.backing.clone(),
            source,
        })?;
        let eventfd = Arc::new(eventfd);
        let slots = 2 * (usize::from(cfg.max_io_queues) + 1);
        let doorbells: Arc<[AtomicU32]> = (0..slots).map(|_| AtomicU32::new(0)).collect();
        let observed = Arc::new(Observed::default());
        let layout = bar0_layout(cfg.max_io_queues);
        let limits = Limits {
            max_io_queues: cfg.max_io_queues,
            vectors: layout.0.vectors,
            serial: cfg.serial,
            model: cfg.model,
        };
        let (flusher, flusher_thread) =
            flusher::spawn(ns.file(), eventfd.clone(), observed.clone()).map_err(|source| {
                NvmeError::FlusherSpawn {
                    backing: cfg.backing.clone(),
                    source,
                }
            })?;
        let ctrl = Controller::new(
            ns,
            dma.clone(),
            observed.clone(),
            doorbells.clone(),
            limits,
            flusher,
        );
        Ok(EmulatedNvme {
            shared: Arc::new(Shared {
                ctrl: Mutex::new(ctrl),
                doorbells,
                eventfd,
                stop: AtomicBool::new(false),
                observed,
                on_shadow: Mutex::new(None),
                dma,
            }),
            worker: Mutex::new(None),
            flusher: flusher_thread,
            backing: cfg.backing,
            max_io_queues: cfg.max_io_queues,
            layout,
        })
    }

    /// Starts the worker thread.
    pub fn start_worker(&self) -> Result<(), NvmeError> {
        let mut worker = lock(&self.worker);
        if worker.is_some() {
            return Err(NvmeError::WorkerRunning {
                backing: self.backing.clone(),
            });
        }
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("nvme-worker".into())
            .spawn(move || {
                crate::thread_started();
                worker::run(shared)
            })
            .map_err(|source| NvmeError::Spawn {
                backing: self.backing.clone(),
                source,
            })?;
        *worker = Some(handle);
        // Someone now polls: a Flush's completion can come after its pass.
        self.shared.with_ctrl(|c| c.async_flush = true);
        Ok(())
    }

    /// A clone of the controller's DMA window, to watch [`DmaWindow::refused`]. Move the
    /// controller between domains with [`crate::pci::PciDevice::quiesce`] and
    /// [`crate::pci::PciDevice::attach`], which also reset it and replace its wake-up.
    pub fn dma(&self) -> DmaWindow {
        self.shared.dma.clone()
    }

    /// The eventfd the worker sleeps on; register it as a KVM ioeventfd (no datamatch) for
    /// [`EmulatedNvme::io_doorbell_range`] only while shadow doorbells are active.
    pub fn doorbell_eventfd(&self) -> &EventFd {
        &self.shared.eventfd
    }

    /// Offsets in BAR0 of the I/O queue doorbells (SQ tails and CQ heads of QIDs 1 and up).
    pub fn io_doorbell_range(&self) -> Range<u64> {
        DOORBELL_BASE + 8..DOORBELL_BASE + 8 * (u64::from(self.max_io_queues) + 1)
    }

    /// Whether the driver has configured shadow doorbells (Doorbell Buffer Config).
    pub fn shadow_doorbells_active(&self) -> bool {
        self.shared.observed.shadow_active.load(Ordering::SeqCst)
    }

    /// Sets the callback told when shadow doorbells start (Doorbell Buffer Config succeeded)
    /// or stop (controller or function reset). It runs on the worker thread or on the thread
    /// resetting the controller (possibly with the PciDevice lock held): it must not lock the
    /// [`crate::pci::PciDevice`] or call back into this controller. It is kept when the
    /// controller moves to another domain: it is told `false` by the quiesce's reset and `true`
    /// again when the next domain's driver configures shadow doorbells, so it must act on
    /// whichever VM is current when it runs.
    pub fn set_on_shadow_doorbells(&self, callback: ShadowCallback) {
        *lock(&self.shared.on_shadow) = Some(callback);
    }

    /// The counters now.
    pub fn stats(&self) -> NvmeStats {
        self.monitor().stats()
    }

    /// PRPs, PRP lists or buffers outside the DMA window so far.
    pub fn dma_errors(&self) -> u64 {
        self.stats().dma_errors
    }

    /// Written blocks still only in the volatile write cache (a reset would lose them).
    pub fn cached_blocks(&self) -> usize {
        self.shared.with_ctrl(|c| c.ns.cached_blocks())
    }

    /// A handle on counters and shadow state that outlives boxing into a PciDevice.
    pub fn monitor(&self) -> NvmeMonitor {
        NvmeMonitor {
            observed: self.shared.observed.clone(),
            dma: self.shared.dma.clone(),
        }
    }

    /// A handle to run the controller's passes on the caller's thread (see the module docs).
    /// Use it instead of a worker, not beside one. From now on the caller must poll: a
    /// Flush's completion is posted by a pass after its sync returns, which writes
    /// [`NvmePoller::eventfd`].
    pub fn poller(&self) -> NvmePoller {
        self.shared.with_ctrl(|c| c.async_flush = true);
        NvmePoller {
            shared: self.shared.clone(),
        }
    }

    /// Calls `hook` on the flusher thread before each sync (`None`: no hook).
    #[cfg(test)]
    pub(crate) fn set_sync_hook(&self, hook: Option<flusher::SyncHook>) {
        self.shared.with_ctrl(|c| c.flusher.set_hook(hook));
    }

    /// Stops the flusher thread as the drop does, keeping the controller.
    #[cfg(test)]
    pub(crate) fn stop_flusher(&mut self) {
        self.flusher.stop();
    }

    /// Upgradable exactly while the flusher thread runs.
    #[cfg(test)]
    pub(crate) fn flusher_alive(&self) -> std::sync::Weak<()> {
        self.flusher.alive()
    }

    fn doorbell_write(&self, offset: u64, data: &[u8]) {
        let o = &self.shared.observed;
        Observed::bump(&o.doorbell_writes);
        let slot = ((offset - DOORBELL_BASE) / 4) as usize;
        let value = match data {
            [a, b, c, d] if offset.is_multiple_of(4) => u32::from_le_bytes([*a, *b, *c, *d]),
            _ => {
                Observed::bump(&o.invalid_doorbells);
                return;
            }
        };
        match self.shared.doorbells.get(slot) {
            Some(d) if value <= 0xffff => {
                d.store(DOORBELL_FRESH | value, Ordering::Release);
                // The writer waits in its exit anyway: serve the queues now, on its thread.
                self.shared.process(INLINE_PASSES);
                // Whoever polls (worker or poller) re-arms the shadow event indexes, which a
                // command just run (Doorbell Buffer Config, a new queue) may need.
                let _ = self.shared.eventfd.write(1);
            }
            _ => Observed::bump(&o.invalid_doorbells),
        }
    }
}

impl Drop for EmulatedNvme {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.eventfd.write(1);
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
        // After the sync under way, if any: no thread outlives the controller (a poller kept
        // beyond it syncs in its passes).
        self.flusher.stop();
    }
}

impl PciBackend for EmulatedNvme {
    fn ids(&self) -> PciIds {
        PciIds {
            vendor: NVME_VENDOR_ID,
            device: NVME_DEVICE_ID,
            subsystem_vendor: NVME_SUBSYSTEM_VENDOR_ID,
            subsystem: NVME_SUBSYSTEM_ID,
            class_code: NVME_CLASS_CODE,
            revision: 1,
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: 0,
            size: self.layout.1,
            kind: BarKind::Mmio64,
            prefetchable: false,
        }]
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
        } else if offset >= DOORBELL_BASE {
            data.fill(0);
        } else {
            self.shared.with_ctrl(|c| c.reg_read(offset, data));
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        if offset >= DOORBELL_BASE {
            self.doorbell_write(offset, data);
        } else {
            self.shared.with_ctrl(|c| c.reg_write(offset, data));
        }
    }

    fn reset(&mut self) {
        self.shared.with_ctrl(|c| c.power_on_reset());
    }

    fn set_bus_master(&mut self, enabled: bool) {
        self.shared.dma.set_bus_master(enabled);
        if enabled {
            let _ = self.shared.eventfd.write(1);
        }
    }

    /// Detaches the DMA window (waiting for an access in progress). The worker keeps
    /// running: every DMA it tries is refused until [`PciBackend::attach`]. Its interrupts go
    /// through the [`Msix`], which the [`crate::pci::PciDevice`] detaches from the domain.
    fn detach(&mut self) {
        self.shared.dma.detach();
    }

    /// DMA goes to `mem`; the wake eventfd is the [`Msix`]'s business.
    fn attach(&mut self, mem: GuestMemoryMmap<()>, _wake: WakeDomain) -> Result<(), String> {
        self.shared.dma.retarget(mem);
        Ok(())
    }

    fn msix(&self) -> Option<MsixLayout> {
        Some(self.layout.0)
    }

    fn set_msix(&mut self, msix: Arc<Msix>) {
        self.shared.with_ctrl(|c| c.msix = Some(msix));
    }
}
