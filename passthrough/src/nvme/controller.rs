//! Controller state and the processing pass.
//!
//! Everything here runs with the controller lock held: a pass over the queues on the worker
//! thread, the poller's thread or a vCPU thread (after a trapped doorbell write), register
//! writes on a vCPU thread, a reset on the VMM thread. Because a command
//! is executed completely inside one pass, taking the lock also waits for any DMA in progress:
//! once a reset holds it, the device is quiet.
//!
//! The one exception is the sync of a Flush, which runs on the flusher thread ([`super::flusher`])
//! while passes go on; a later pass posts its completion. It touches no domain memory, and a
//! reset forgets the Flushes in flight (`flushes`), so a sync that returns after a reset posts
//! nothing: the reset does not wait for it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::flusher::Flusher;
use super::namespace::Namespace;
use super::prp::{self, PrpFault};
use super::queue::{CompQueue, Completion, SubQueue};
use super::shadow::DoorbellBuffer;
use super::status::Status;
use super::NvmeStats;
use crate::dma::DmaWindow;
use crate::pci::Msix;

/// Doorbell slot flag: a value was written since the worker last looked.
pub const DOORBELL_FRESH: u32 = 1 << 31;
/// Commands taken from one submission queue per pass (fairness, bounded lock hold time).
const BATCH: usize = 32;

/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1 << 0;
/// CSTS.CFS (Controller Fatal Status).
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST = shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;

/// What the controller lets others observe without its lock.
#[derive(Default)]
pub struct Observed {
    pub commands: AtomicU64,
    pub completions: AtomicU64,
    pub doorbell_writes: AtomicU64,
    pub invalid_doorbells: AtomicU64,
    pub dma_errors: AtomicU64,
    pub dropped_cached_writes: AtomicU64,
    pub ignored_register_writes: AtomicU64,
    pub flushes_async: AtomicU64,
    pub flush_syncs: AtomicU64,
    pub flushes_in_flight: AtomicU64,
    pub flushes_abandoned: AtomicU64,
    pub interrupts: AtomicU64,
    pub shadow_active: AtomicBool,
}

impl Observed {
    /// A snapshot of the controller's own counters (`dma_refused` is left 0).
    pub fn stats(&self) -> NvmeStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NvmeStats {
            commands: r(&self.commands),
            completions: r(&self.completions),
            doorbell_writes: r(&self.doorbell_writes),
            invalid_doorbells: r(&self.invalid_doorbells),
            dma_errors: r(&self.dma_errors),
            dropped_cached_writes: r(&self.dropped_cached_writes),
            ignored_register_writes: r(&self.ignored_register_writes),
            flushes_async: r(&self.flushes_async),
            flush_syncs: r(&self.flush_syncs),
            flushes_in_flight: r(&self.flushes_in_flight),
            flushes_abandoned: r(&self.flushes_abandoned),
            interrupts: r(&self.interrupts),
            // The DMA window counts these; `NvmeMonitor::stats` fills them in.
            dma_refused: 0,
        }
    }

    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Fixed properties from the configuration.
pub struct Limits {
    pub max_io_queues: u16,
    /// MSI-X vectors.
    pub vectors: u16,
    pub serial: String,
    pub model: String,
}

/// Controller registers (the ones with state).
#[derive(Clone, Copy, Debug, Default)]
pub struct Regs {
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    pub intms: u32,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pass {
    /// Commands taken from submission queues.
    pub consumed: usize,
}

/// A Flush whose sync runs on the flusher thread.
#[derive(Clone, Copy, Debug)]
pub struct InFlightFlush {
    /// Handed to the flusher; unique for the controller's life.
    pub token: u64,
    pub sqid: u16,
    pub cqid: u16,
    pub cid: u16,
}

/// The controller: registers, queues, features, namespace.
pub struct Controller {
    pub regs: Regs,
    /// Submission queues by QID (0 is the admin queue).
    pub sqs: Vec<Option<SubQueue>>,
    /// Completion queues by QID.
    pub cqs: Vec<Option<CompQueue>>,
    pub ns: Namespace,
    pub dma: DmaWindow,
    pub observed: Arc<Observed>,
    pub doorbells: Arc<[AtomicU32]>,
    pub limits: Limits,
    /// I/O submission / completion queues granted by Set Features, Number of Queues.
    pub io_sqs_allowed: u16,
    pub io_cqs_allowed: u16,
    pub async_event_config: u32,
    /// Outstanding Asynchronous Event Requests (CIDs); no events are ever generated.
    pub aers: Vec<u16>,
    pub dbbuf: Option<DoorbellBuffer>,
    /// Shadow doorbells were switched on or off; reported after the lock is released.
    pub shadow_event: Option<bool>,
    /// Runs the syncs of Flushes on its own thread.
    pub flusher: Flusher,
    /// Whether Flushes go to the flusher: only once a worker or a poller serves the
    /// controller, since a completion posted later needs someone to post it.
    pub async_flush: bool,
    /// Flushes handed to the flusher since the last reset and not completed yet. Each holds
    /// a slot of its completion queue (a command is taken only while its CQ has room for it
    /// and for these).
    pub flushes: Vec<InFlightFlush>,
    /// Results back from the flusher, not posted yet (token, sync succeeded).
    flush_results: Vec<(u64, bool)>,
    next_flush_token: u64,
    /// The function's MSI-X state (given once the controller is a PCI function).
    pub msix: Option<Arc<Msix>>,
    /// Vectors of the queues that got completions in the current pass.
    raise: Vec<u16>,
    /// The driver waits right after it submits, and its wait runs the controller's passes
    /// ([`crate::NvmePoller::set_driver_waits`]): submissions need no doorbell.
    pub driver_waits: bool,
}

impl Controller {
    /// A controller in its power-on state.
    pub fn new(
        ns: Namespace,
        dma: DmaWindow,
        observed: Arc<Observed>,
        doorbells: Arc<[AtomicU32]>,
        limits: Limits,
        flusher: Flusher,
    ) -> Controller {
        let n = usize::from(limits.max_io_queues) + 1;
        Controller {
            regs: Regs::default(),
            sqs: vec![None; n],
            cqs: vec![None; n],
            ns,
            dma,
            observed,
            doorbells,
            io_sqs_allowed: limits.max_io_queues,
            io_cqs_allowed: limits.max_io_queues,
            limits,
            async_event_config: 0,
            aers: Vec::new(),
            dbbuf: None,
            shadow_event: None,
            flusher,
            async_flush: false,
            flushes: Vec::new(),
            flush_results: Vec::new(),
            next_flush_token: 0,
            msix: None,
            raise: Vec::new(),
            driver_waits: false,
        }
    }

    /// Whether the controller processes commands.
    pub fn ready(&self) -> bool {
        self.regs.csts & (CSTS_RDY | CSTS_CFS) == CSTS_RDY
    }

    /// Controller reset (CC.EN 1 to 0): queues deleted, features back to defaults, unflushed
    /// cached writes dropped, shadow doorbells off. AQA/ASQ/ACQ and CC are kept.
    pub fn controller_reset(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        for d in self.doorbells.iter() {
            d.store(0, Ordering::Relaxed);
        }
        self.aers.clear();
        self.raise.clear();
        self.io_sqs_allowed = self.limits.max_io_queues;
        self.io_cqs_allowed = self.limits.max_io_queues;
        self.async_event_config = 0;
        self.set_dbbuf(None);
        // Flushes in flight are forgotten, not waited for: their syncs finish on the flusher
        // thread and their results are dropped (the driver after the reset never sees them;
        // the VMM replays a Flush whose completion never came).
        self.observed
            .flushes_abandoned
            .fetch_add(self.flushes.len() as u64, Ordering::Relaxed);
        self.flushes.clear();
        self.flush_results.clear();
        self.note_flushes_in_flight();
        let dropped = self.ns.reset();
        self.observed
            .dropped_cached_writes
            .fetch_add(dropped, Ordering::Relaxed);
        self.regs.csts = 0;
    }

    /// Function reset: a controller reset and every register back to its power-on value.
    pub fn power_on_reset(&mut self) {
        self.controller_reset();
        self.regs = Regs::default();
    }

    /// Something went wrong that a real controller could not recover from by itself.
    pub fn fatal(&mut self) {
        self.regs.csts |= CSTS_CFS;
    }

    /// Sets or clears the doorbell buffer, noting the change for the shadow callback.
    pub fn set_dbbuf(&mut self, dbbuf: Option<DoorbellBuffer>) {
        let was = self.dbbuf.is_some();
        self.dbbuf = dbbuf;
        let now = self.dbbuf.is_some();
        self.observed.shadow_active.store(now, Ordering::SeqCst);
        if was != now || now {
            self.shadow_event = Some(now);
        }
    }

    /// Copies `data` to the command's PRPs (controller to host).
    pub fn dma_to_host(&self, prp1: u64, prp2: u64, data: &[u8]) -> Status {
        let r = prp::segments(&self.dma, prp1, prp2, data.len())
            .and_then(|segs| prp::scatter(&self.dma, &segs, data));
        self.prp_status(r)
    }

    /// Copies `len` bytes from the command's PRPs (host to controller).
    pub fn dma_from_host(&self, prp1: u64, prp2: u64, len: usize) -> Result<Vec<u8>, Status> {
        let mut buf = vec![0u8; len];
        let r = prp::segments(&self.dma, prp1, prp2, len)
            .and_then(|segs| prp::gather(&self.dma, &segs, &mut buf));
        match self.prp_status(r) {
            s if s.is_success() => Ok(buf),
            s => Err(s),
        }
    }

    /// Status for a PRP walk; Data Transfer Errors are counted.
    pub fn prp_status(&self, r: Result<(), PrpFault>) -> Status {
        match r {
            Ok(()) => Status::SUCCESS,
            Err(f) => {
                if f == PrpFault::Dma {
                    Observed::bump(&self.observed.dma_errors);
                }
                f.status()
            }
        }
    }

    /// Posts `c` to completion queue `cqid` (nothing if the queue does not exist); false when
    /// the post failed and the controller went fatal. The caller checked for room.
    pub fn post(&mut self, cqid: usize, c: &Completion) -> bool {
        let Some(cq) = self.cqs.get_mut(cqid).and_then(Option::as_mut) else {
            return true;
        };
        if cq.post(&self.dma, c).is_err() {
            self.fatal();
            return false;
        }
        if let Some(v) = cq.vector {
            if !self.raise.contains(&v) {
                self.raise.push(v);
            }
        }
        Observed::bump(&self.observed.completions);
        true
    }

    /// Hands a Flush over to the flusher (its completion comes in a later pass); false if the
    /// caller must sync itself (no worker or poller, or the flusher has stopped).
    pub fn flush_async(&mut self, sqid: u16, cqid: u16, cid: u16) -> bool {
        if !self.async_flush {
            return false;
        }
        let token = self.next_flush_token;
        if !self.flusher.submit(token) {
            return false;
        }
        self.next_flush_token += 1;
        self.flushes.push(InFlightFlush {
            token,
            sqid,
            cqid,
            cid,
        });
        Observed::bump(&self.observed.flushes_async);
        self.note_flushes_in_flight();
        true
    }

    fn note_flushes_in_flight(&self) {
        self.observed
            .flushes_in_flight
            .store(self.flushes.len() as u64, Ordering::Relaxed);
    }

    /// Completion slots of CQ `cqid` held by Flushes in flight.
    fn reserved(&self, cqid: u16) -> usize {
        self.flushes.iter().filter(|f| f.cqid == cqid).count()
    }

    /// Posts the completions of Flushes whose sync returned. A result whose Flush a reset
    /// forgot is dropped. False when a post failed (the controller went fatal).
    fn complete_flushes(&mut self) -> bool {
        self.flusher.take_done(&mut self.flush_results);
        let mut results = std::mem::take(&mut self.flush_results);
        let mut ok = true;
        results.retain(|&(token, synced)| {
            let Some(i) = self.flushes.iter().position(|f| f.token == token) else {
                return false;
            };
            let f = self.flushes[i];
            let cqid = usize::from(f.cqid);
            let Some(cq) = self.cqs.get(cqid).and_then(Option::as_ref) else {
                self.flushes.swap_remove(i);
                return false;
            };
            if !ok || cq.is_full() {
                // Cannot happen while the slot is reserved; keep it for a later pass.
                return true;
            }
            let sqhd = self
                .sqs
                .get(usize::from(f.sqid))
                .and_then(Option::as_ref)
                .map_or(0, |sq| sq.head);
            let status = if synced {
                Status::SUCCESS
            } else {
                Status::WRITE_FAULT
            };
            self.flushes.swap_remove(i);
            let c = Completion {
                dw0: 0,
                sqhd,
                sqid: f.sqid,
                cid: f.cid,
                status,
            };
            ok = self.post(cqid, &c);
            false
        });
        self.flush_results = results;
        self.note_flushes_in_flight();
        ok
    }

    /// Delete I/O SQ `qid`: its Flushes in flight complete now as aborted, before the
    /// deletion's own completion (NVMe 1.4, 5.6).
    pub fn abort_flushes_of(&mut self, qid: u16, sqhd: u16) {
        let (aborted, kept): (Vec<InFlightFlush>, _) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|f| f.sqid == qid);
        self.flushes = kept;
        for f in aborted {
            let c = Completion {
                dw0: 0,
                sqhd,
                sqid: f.sqid,
                cid: f.cid,
                status: Status::ABORTED_SQ_DELETION,
            };
            if !self.post(usize::from(f.cqid), &c) {
                break;
            }
        }
        self.note_flushes_in_flight();
    }

    /// Takes the doorbell values written by MMIO since the last pass.
    fn apply_doorbells(&mut self) {
        let doorbells = self.doorbells.clone();
        for (i, d) in doorbells.iter().enumerate() {
            let v = d.swap(0, Ordering::AcqRel);
            if v & DOORBELL_FRESH == 0 {
                continue;
            }
            let value = v & 0xffff;
            let ok = if i % 2 == 0 {
                self.set_sq_tail(i / 2, value)
            } else {
                self.set_cq_head(i / 2, value)
            };
            if !ok {
                Observed::bump(&self.observed.invalid_doorbells);
            }
        }
    }

    /// A new SQ tail from the driver; false if the queue does not exist or the value is
    /// beyond it.
    pub fn set_sq_tail(&mut self, qid: usize, value: u32) -> bool {
        match self.sqs.get_mut(qid).and_then(Option::as_mut) {
            Some(sq) if value < u32::from(sq.size) => {
                sq.tail = value as u16;
                true
            }
            _ => false,
        }
    }

    /// A new CQ head from the driver; false if the queue does not exist or the head would
    /// pass entries the controller has not posted.
    pub fn set_cq_head(&mut self, qid: usize, value: u32) -> bool {
        match self.cqs.get_mut(qid).and_then(Option::as_mut) {
            Some(cq) if value < u32::from(cq.size) => {
                let size = u32::from(cq.size);
                let dist = |from: u16, to: u32| (to + size - u32::from(from)) % size;
                if dist(cq.head, value) > dist(cq.head, u32::from(cq.tail)) {
                    return false;
                }
                cq.head = value as u16;
                true
            }
            _ => false,
        }
    }

    /// One pass: post the completions of Flushes whose sync returned, pick up doorbells (MMIO
    /// and shadow), then take up to [`BATCH`] commands from each submission queue, admin
    /// first, posting a completion for each (a Flush's comes in a later pass). A command is
    /// taken only when its completion queue has room for it and for the Flushes in flight
    /// that will complete there, so a full queue holds commands back instead of overwriting
    /// entries the driver has not consumed. Last, the vector of each queue with interrupts
    /// enabled that got completions is raised once (still under the lock, so a reset that
    /// took it is not followed by a late interrupt).
    pub fn pass(&mut self) -> Pass {
        let consumed = self.run_pass();
        for v in self.raise.drain(..) {
            if self.msix.as_ref().is_some_and(|m| m.raise(v)) {
                Observed::bump(&self.observed.interrupts);
            }
        }
        Pass { consumed }
    }

    /// Before the thread serving the controller sleeps: sets the shadow event indexes and
    /// re-checks. True when work arrived meanwhile (commands, or Flushes whose sync returned).
    pub fn arm(&mut self) -> bool {
        self.ready() && (self.flushes_done() || self.arm_event_idx())
    }

    /// Whether results of Flushes may be waiting to be posted.
    pub fn flushes_done(&self) -> bool {
        !self.flush_results.is_empty() || self.flusher.has_done()
    }

    /// The body of [`Controller::pass`]; returns the commands taken.
    fn run_pass(&mut self) -> usize {
        let mut consumed = 0;
        if !self.ready() {
            for d in self.doorbells.iter() {
                d.store(0, Ordering::Relaxed);
            }
            return consumed;
        }
        if self.flushes_done() && !self.complete_flushes() {
            return consumed;
        }
        self.apply_doorbells();
        self.read_shadow_doorbells();
        for qid in 0..self.sqs.len() {
            for _ in 0..BATCH {
                if !self.ready() {
                    return consumed;
                }
                let Some(sq) = self.sqs[qid].as_ref() else {
                    break;
                };
                let cqid = sq.cqid;
                let reserved = self.reserved(cqid);
                let room = self
                    .cqs
                    .get(usize::from(cqid))
                    .and_then(Option::as_ref)
                    .is_some_and(|cq| cq.free() > reserved);
                let Some(sq) = self.sqs[qid].as_mut() else {
                    break;
                };
                if !sq.has_work() || !room {
                    break;
                }
                let Ok(cmd) = sq.fetch(&self.dma) else {
                    // Bus mastering is off: the device stalls until it is back on.
                    return consumed;
                };
                let sqhd = sq.head;
                consumed += 1;
                Observed::bump(&self.observed.commands);
                let result = if qid == 0 {
                    self.admin(&cmd)
                } else {
                    self.io(&cmd, qid as u16, cqid)
                };
                let Some((dw0, status)) = result else {
                    continue;
                };
                let c = Completion {
                    dw0,
                    sqhd,
                    sqid: qid as u16,
                    cid: cmd.cid,
                    status,
                };
                if !self.post(usize::from(cqid), &c) {
                    return consumed;
                }
            }
        }
        consumed
    }
}
