//! A mock NVMe driver for tests: builds queues in a `GuestMemoryMmap`, rings doorbells through
//! `bar_write` (or, for shadow doorbells, through the eventfd as a KVM ioeventfd would), and
//! polls completion queues for the phase tag. It owns the function's MSI-X state as the
//! [`crate::pci::PciDevice`] would, and counts the wake-ups of its domain.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::namespace::tests::TempPath;
use super::queue::{Command, CQE_SIZE, SQE_SIZE};
use super::regs::DOORBELL_BASE;
use super::shadow::need_event;
use super::status::Status;
use super::{EmulatedNvme, NvmeConfig};
use crate::dma::DmaWindow;
use crate::pci::{Msix, PciBackend, WakeDomain};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory of the test domain.
pub const MEM_SIZE: u64 = 8 << 20;
/// Namespace size used by default.
pub const NS_SIZE: u64 = 4 << 20;
/// Page size.
pub const PAGE: u64 = 4096;

/// How the driver rings I/O doorbells when shadow doorbells are active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Trapped MMIO write with the value (`bar_write`).
    Mmio,
    /// A KVM ioeventfd: the eventfd is written, the value is only in the shadow page.
    IoEventFd,
}

/// A completion as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

#[derive(Clone, Copy, Debug)]
struct DrvQueue {
    sq: u64,
    cq: u64,
    size: u16,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
}

/// The mock driver.
pub struct TestDriver {
    pub nvme: EmulatedNvme,
    pub mem: GuestMemoryMmap<()>,
    pub dma: DmaWindow,
    /// The function's MSI-X state (the PciDevice's part).
    pub msix: Arc<Msix>,
    /// Wake-ups of this domain.
    pub wakes: Arc<WakeCounter>,
    pub cfg: NvmeConfig,
    pub path: TempPath,
    next_page: u64,
    queues: Vec<Option<DrvQueue>>,
    cid: u16,
    /// (shadow page, event index page) once Doorbell Buffer Config succeeded.
    pub dbbuf: Option<(u64, u64)>,
    pub ring: Ring,
    /// MMIO or eventfd rings the driver actually did for I/O queues.
    pub io_rings: u64,
}

/// Default configuration for a test controller on `path`.
pub fn config(path: &TempPath) -> NvmeConfig {
    NvmeConfig {
        backing: path.0.clone(),
        size: NS_SIZE,
        lba_size: 512,
        volatile_write_cache: false,
        max_io_queues: 4,
        serial: "DDVM0001".into(),
        model: "ddvm emulated NVMe".into(),
    }
}

/// Waits for `cond`, panicking with `what` after 5 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl TestDriver {
    /// A started controller with the default configuration changed by `edit`.
    pub fn new(edit: impl FnOnce(&mut NvmeConfig)) -> TestDriver {
        let path = TempPath::new("nvme");
        let mut cfg = config(&path);
        edit(&mut cfg);
        TestDriver::with_path(path, cfg)
    }

    /// A started controller on an existing backing file.
    pub fn with_path(path: TempPath, cfg: NvmeConfig) -> TestDriver {
        let mem = memory();
        let dma = DmaWindow::new(mem.clone());
        let (nvme, msix, wakes) = with_msix(EmulatedNvme::new(cfg.clone(), dma.clone()).unwrap());
        nvme.start_worker().unwrap();
        TestDriver::fresh(nvme, mem, dma, msix, wakes, cfg, path)
    }

    /// A controller with no worker thread: only trapped doorbell writes are served, unless
    /// the test polls [`EmulatedNvme::poller`].
    pub fn without_worker() -> TestDriver {
        let path = TempPath::new("nvme-polled");
        let cfg = config(&path);
        let mem = memory();
        let dma = DmaWindow::new(mem.clone());
        let (nvme, msix, wakes) = with_msix(EmulatedNvme::new(cfg.clone(), dma.clone()).unwrap());
        TestDriver::fresh(nvme, mem, dma, msix, wakes, cfg, path)
    }

    /// A driver that knows nothing yet, for a controller over `mem`.
    fn fresh(
        nvme: EmulatedNvme,
        mem: GuestMemoryMmap<()>,
        dma: DmaWindow,
        msix: Arc<Msix>,
        wakes: Arc<WakeCounter>,
        cfg: NvmeConfig,
        path: TempPath,
    ) -> TestDriver {
        TestDriver {
            nvme,
            mem,
            dma,
            msix,
            wakes,
            cfg,
            path,
            next_page: 0x10000,
            queues: vec![None; 8],
            cid: 0,
            dbbuf: None,
            ring: Ring::Mmio,
            io_rings: 0,
        }
    }

    /// The domain died: the calls `PciDevice::quiesce` makes (bus mastering off, function
    /// reset, MSI-X reset, detach), without the configuration space.
    pub fn quiesce(&mut self) {
        self.nvme.set_bus_master(false);
        self.nvme.reset();
        self.nvme.msix_enabled(false);
        self.msix.reset();
        self.nvme.detach();
        self.msix.detach();
    }

    /// What a driver asking for interrupts does: MSI-X enabled, every vector unmasked.
    pub fn enable_interrupts(&mut self) {
        for v in 0..self.msix.layout().vectors {
            self.msix
                .table_write(u64::from(v) * 16 + 12, &0u32.to_le_bytes());
        }
        self.msix.set_control(true, false);
    }

    /// A fresh domain takes the quiesced controller: new memory (the old one is dropped with
    /// this driver), attached with a new wake counter, bus mastering on, and a driver that
    /// knows nothing about the controller.
    pub fn reborn(self) -> TestDriver {
        let TestDriver {
            mut nvme,
            dma,
            msix,
            cfg,
            path,
            ..
        } = self;
        let mem = memory();
        let wakes = WakeCounter::new();
        msix.attach(wakes.fd.clone());
        nvme.attach(mem.clone(), wakes.fd.clone()).unwrap();
        nvme.set_bus_master(true);
        TestDriver::fresh(nvme, mem, dma, msix, wakes, cfg, path)
    }

    /// Allocates `pages` zeroed, contiguous pages of domain memory.
    pub fn alloc(&mut self, pages: u64) -> u64 {
        let at = self.next_page;
        self.next_page += pages * PAGE;
        assert!(self.next_page <= MEM_SIZE, "test domain out of memory");
        self.mem
            .write_slice(&vec![0u8; (pages * PAGE) as usize], GuestAddress(at))
            .unwrap();
        at
    }

    pub fn write32(&mut self, off: u64, v: u32) {
        self.nvme.bar_write(0, off, &v.to_le_bytes());
    }

    pub fn write64(&mut self, off: u64, v: u64) {
        self.nvme.bar_write(0, off, &v.to_le_bytes());
    }

    pub fn read32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.nvme.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn read64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.nvme.bar_read(0, off, &mut b);
        u64::from_le_bytes(b)
    }

    /// Sets up a 32-entry admin queue pair and enables the controller, expecting RDY.
    pub fn enable(&mut self) {
        let (sq, cq) = (self.alloc(1), self.alloc(1));
        self.write32(0x24, 31 | (31 << 16));
        self.write64(0x28, sq);
        self.write64(0x30, cq);
        self.write32(0x14, 1 | (6 << 16) | (4 << 20));
        assert_eq!(self.read32(0x1c) & 3, 1, "CSTS after enable");
        self.queues[0] = Some(DrvQueue {
            sq,
            cq,
            size: 32,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        });
    }

    /// Clears CC.EN and forgets every queue.
    pub fn disable(&mut self) {
        self.write32(0x14, 0);
        self.queues.iter_mut().for_each(|q| *q = None);
        self.dbbuf = None;
    }

    fn shadow_for(&self, qid: usize) -> Option<(u64, u64)> {
        self.dbbuf.filter(|_| qid != 0)
    }

    /// Updates a doorbell (slot 0: SQ tail, 1: CQ head) the way the driver would.
    fn ring_doorbell(&mut self, qid: usize, cq: bool, old: u16, new: u16) {
        let off = 8 * qid as u64 + if cq { 4 } else { 0 };
        if let Some((shadow, ev)) = self.shadow_for(qid) {
            self.mem
                .store(
                    u32::from(new),
                    GuestAddress(shadow + off),
                    Ordering::Release,
                )
                .unwrap();
            fence(Ordering::SeqCst);
            let e: u32 = self
                .mem
                .load(GuestAddress(ev + off), Ordering::Acquire)
                .unwrap();
            if !need_event(e as u16, new, old) {
                return;
            }
            self.io_rings += 1;
            if self.ring == Ring::IoEventFd {
                self.nvme.doorbell_eventfd().write(1).unwrap();
                return;
            }
        } else if qid != 0 {
            self.io_rings += 1;
        }
        self.write32(DOORBELL_BASE + off, u32::from(new));
    }

    /// Places `cmd` (with a fresh CID) in queue `qid` without ringing; returns the CID.
    pub fn push(&mut self, qid: usize, mut cmd: Command) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        cmd.cid = self.cid;
        let q = self.queues[qid]
            .as_mut()
            .expect("queue exists in the driver");
        self.mem
            .write_slice(
                &cmd.to_bytes(),
                GuestAddress(q.sq + u64::from(q.sq_tail) * SQE_SIZE),
            )
            .unwrap();
        q.sq_tail = (q.sq_tail + 1) % q.size;
        cmd.cid
    }

    /// Rings queue `qid`'s SQ tail doorbell from `old` to the driver's current tail.
    pub fn ring_sq(&mut self, qid: usize, old: u16) {
        let new = self.queues[qid].expect("queue").sq_tail;
        self.ring_doorbell(qid, false, old, new);
    }

    pub fn sq_tail(&self, qid: usize) -> u16 {
        self.queues[qid].expect("queue").sq_tail
    }

    /// The next completion of queue `qid` if one is posted (head and doorbell updated).
    pub fn try_reap(&mut self, qid: usize) -> Option<Cqe> {
        let q = self.queues[qid].expect("queue");
        let at = q.cq + u64::from(q.cq_head) * CQE_SIZE;
        let dw3: u32 = self
            .mem
            .load(GuestAddress(at + 12), Ordering::Acquire)
            .unwrap();
        if (dw3 >> 16) & 1 != u32::from(q.phase) {
            return None;
        }
        let dw0: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let dw2: u32 = self.mem.read_obj(GuestAddress(at + 8)).unwrap();
        let old = q.cq_head;
        let head = (q.cq_head + 1) % q.size;
        let phase = if head == 0 { !q.phase } else { q.phase };
        if let Some(qm) = self.queues[qid].as_mut() {
            qm.cq_head = head;
            qm.phase = phase;
        }
        self.ring_doorbell(qid, true, old, head);
        Some(Cqe {
            dw0,
            sqhd: dw2 as u16,
            sqid: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            status: Status::from_field((dw3 >> 16) as u16),
        })
    }

    /// Waits for the next completion of queue `qid`.
    pub fn reap(&mut self, qid: usize) -> Cqe {
        let start = Instant::now();
        loop {
            if let Some(c) = self.try_reap(qid) {
                return c;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no completion on queue {qid}; stats {:?}",
                self.nvme.stats()
            );
            std::thread::yield_now();
        }
    }

    /// Submits one command and waits for its completion.
    pub fn submit(&mut self, qid: usize, cmd: Command) -> Cqe {
        let old = self.sq_tail(qid);
        let cid = self.push(qid, cmd);
        self.ring_sq(qid, old);
        let c = self.reap(qid);
        assert_eq!(c.cid, cid, "completion for the command just submitted");
        c
    }

    pub fn admin(&mut self, cmd: Command) -> Cqe {
        self.submit(0, cmd)
    }

    /// Creates I/O CQ and SQ `qid` with `size` entries, the CQ with interrupts enabled on
    /// vector `qid`, expecting success.
    pub fn create_io_queue(&mut self, qid: u16, size: u16) {
        self.create_io_queue_with(qid, size, Some(qid));
    }

    /// [`TestDriver::create_io_queue`] with interrupts on `vector`, or off (`None`).
    pub fn create_io_queue_with(&mut self, qid: u16, size: u16, vector: Option<u16>) {
        let pages = (u64::from(size) * SQE_SIZE).div_ceil(PAGE);
        let (sq, cq) = (self.alloc(pages), self.alloc(pages));
        let c = self.admin(create_cq_with(qid, size, cq, vector));
        assert_eq!(c.status, Status::SUCCESS, "create CQ {qid}");
        let c = self.admin(create_sq(qid, size, sq, qid));
        assert_eq!(c.status, Status::SUCCESS, "create SQ {qid}");
        self.queues[usize::from(qid)] = Some(DrvQueue {
            sq,
            cq,
            size,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        });
    }

    /// Configures shadow doorbells, expecting success.
    pub fn enable_shadow(&mut self) {
        let (shadow, ev) = (self.alloc(1), self.alloc(1));
        let c = self.admin(Command {
            opcode: 0x7c,
            prp1: shadow,
            prp2: ev,
            ..Command::default()
        });
        assert_eq!(c.status, Status::SUCCESS, "doorbell buffer config");
        self.dbbuf = Some((shadow, ev));
    }

    /// Event index the device last set for SQ `qid` (`cq = false`) or CQ `qid`.
    pub fn event_idx(&self, qid: usize, cq: bool) -> u32 {
        let (_, ev) = self.dbbuf.expect("shadow doorbells configured");
        let off = 8 * qid as u64 + if cq { 4 } else { 0 };
        self.mem
            .load(GuestAddress(ev + off), Ordering::Acquire)
            .unwrap()
    }

    /// Builds PRP1/PRP2 for a buffer of `len` bytes at page-aligned, contiguous `buf`
    /// (allocating a PRP list page when more than two pages are needed).
    pub fn prps(&mut self, buf: u64, len: usize) -> (u64, u64) {
        let pages = (len as u64).div_ceil(PAGE);
        match pages {
            0 | 1 => (buf, 0),
            2 => (buf, buf + PAGE),
            _ => {
                let list = self.alloc(1);
                for i in 1..pages {
                    self.mem
                        .write_obj(buf + i * PAGE, GuestAddress(list + 8 * (i - 1)))
                        .unwrap();
                }
                (buf, list)
            }
        }
    }

    /// Writes `data` at `slba` through queue `qid` from a fresh buffer; returns the status.
    pub fn write_blocks(&mut self, qid: usize, slba: u64, data: &[u8]) -> Status {
        let buf = self.alloc((data.len() as u64).div_ceil(PAGE));
        self.mem.write_slice(data, GuestAddress(buf)).unwrap();
        let (prp1, prp2) = self.prps(buf, data.len());
        let nlb = data.len() as u32 / self.cfg.lba_size;
        self.submit(qid, rw(0x01, slba, nlb, prp1, prp2)).status
    }

    /// Reads `len` bytes at `slba` through queue `qid`.
    pub fn read_blocks(&mut self, qid: usize, slba: u64, len: usize) -> (Status, Vec<u8>) {
        let buf = self.alloc((len as u64).div_ceil(PAGE));
        let (prp1, prp2) = self.prps(buf, len);
        let nlb = len as u32 / self.cfg.lba_size;
        let s = self.submit(qid, rw(0x02, slba, nlb, prp1, prp2)).status;
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(buf)).unwrap();
        (s, out)
    }
}

/// Fresh, zeroed memory for a test domain.
pub fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A domain's wake eventfd and the wake-ups seen on it.
pub struct WakeCounter {
    pub fd: WakeDomain,
    seen: AtomicU64,
}

impl WakeCounter {
    pub fn new() -> Arc<WakeCounter> {
        Arc::new(WakeCounter {
            fd: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            seen: AtomicU64::new(0),
        })
    }

    /// Wake-ups so far (the eventfd's writes; reading it resets it).
    pub fn count(&self) -> u64 {
        let new = self.fd.read().unwrap_or(0);
        self.seen.fetch_add(new, Ordering::Relaxed) + new
    }
}

/// The controller with its MSI-X state as `PciDevice::new` gives it, attached to a fresh wake
/// counter.
fn with_msix(mut nvme: EmulatedNvme) -> (EmulatedNvme, Arc<Msix>, Arc<WakeCounter>) {
    let msix = Arc::new(Msix::new(nvme.msix().expect("the controller has MSI-X")));
    nvme.set_msix(msix.clone());
    let wakes = WakeCounter::new();
    msix.attach(wakes.fd.clone());
    (nvme, msix, wakes)
}

/// A copy of all of `mem`.
pub fn snapshot(mem: &GuestMemoryMmap<()>) -> Vec<u8> {
    let mut all = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut all, GuestAddress(0)).unwrap();
    all
}

/// Create I/O Completion Queue, interrupts off.
pub fn create_cq(qid: u16, size: u16, base: u64) -> Command {
    create_cq_with(qid, size, base, None)
}

/// Create I/O Completion Queue with interrupts on `vector` (IEN, IV), or off.
pub fn create_cq_with(qid: u16, size: u16, base: u64, vector: Option<u16>) -> Command {
    let cdw11 = match vector {
        Some(v) => 1 | 2 | u32::from(v) << 16,
        None => 1,
    };
    Command {
        opcode: 0x05,
        prp1: base,
        cdw: [
            u32::from(qid) | (u32::from(size - 1) << 16),
            cdw11,
            0,
            0,
            0,
            0,
        ],
        ..Command::default()
    }
}

/// Create I/O Submission Queue bound to `cqid`.
pub fn create_sq(qid: u16, size: u16, base: u64, cqid: u16) -> Command {
    Command {
        opcode: 0x01,
        prp1: base,
        cdw: [
            u32::from(qid) | (u32::from(size - 1) << 16),
            1 | (u32::from(cqid) << 16),
            0,
            0,
            0,
            0,
        ],
        ..Command::default()
    }
}

/// Flush (0x00) of namespace 1 on I/O queue 1; returns its status.
pub fn flush(d: &mut TestDriver) -> super::Status {
    d.submit(
        1,
        Command {
            opcode: 0x00,
            nsid: 1,
            ..Command::default()
        },
    )
    .status
}

/// Read (0x02) or Write (0x01) of `nlb` blocks at `slba` on namespace 1.
pub fn rw(opcode: u8, slba: u64, nlb: u32, prp1: u64, prp2: u64) -> Command {
    Command {
        opcode,
        nsid: 1,
        prp1,
        prp2,
        cdw: [slba as u32, (slba >> 32) as u32, nlb - 1, 0, 0, 0],
        ..Command::default()
    }
}

/// A data pattern unique to `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}
