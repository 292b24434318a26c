//! The controller: bring-up (reset, admin queue, Identify, queues, shadow doorbells) and one
//! polled I/O queue pair, whose completion queue interrupts when MSI-X is set up (`irq`).
//!
//! Bring-up follows NVMe base specification 1.4 section 7.6.1: disable and wait for
//! CSTS.RDY = 0, program the admin queue, enable and wait for CSTS.RDY = 1 (both within
//! CAP.TO), Identify Controller and Namespace, Set Features Number of Queues, Doorbell Buffer
//! Config when OACS says so, then create one I/O completion queue (interrupts on the vector
//! `irq` set up, if any) and one submission queue. Data transfers use PRPs (`prp`), one PRP list chunk per command slot.
//!
//! Every register access and doorbell write is an exit under emulation (~70 µs on PVM), and
//! bring-up is on the recovery path, so it takes as few as it can: CAP, ASQ and ACQ as single
//! 64-bit accesses, the version from Identify Controller rather than VS, admin commands in three
//! batches of independent commands (one tail doorbell write each), and the admin completion
//! queue's head doorbell written once at the end (`admin`). That is 12 register accesses in
//! all against a controller that goes ready at once.
//!
//! Everything the controller writes back is validated: completion entries must name the queue
//! and a command in flight; Identify fields are bounds-checked before use.

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;

use guest_kernel::dma::{DmaBuffer, PAGE_SIZE};
use guest_kernel::mmio::MmioRegion;
use guest_kernel::time::Instant;

use super::admin::{disable, identify_command, identify_data, stalled, wait_ready, AdminQueue};
use super::cmd::{admin as opcode, cns, feature, Command};
use super::error::NvmeError;
use super::identify::{first_active_namespace, ControllerInfo, NamespaceInfo};
use super::info::DiskInfo;
use super::io::{IoDone, IoKind, IoRequest, IoStats, SubmitError};
use super::prp;
use super::queue::{CompletionQueue, Doorbell, ShadowBuffers, SubmissionQueue};
use super::regs::{cc, csts, doorbell_index_offset, DoorbellKind, Registers};

/// Admin queue entries (the driver runs one admin command at a time).
const ADMIN_ENTRIES: u16 = 16;
/// I/O queue id.
const IO_QID: u16 = 1;
/// Submission/completion queue entry sizes as powers of two.
const SQES: u8 = 6;
const CQES: u8 = 4;
/// Largest NLB of one command (16-bit, 0's based).
const MAX_BLOCKS_PER_COMMAND: u32 = 1 << 16;
/// How often in-flight commands are checked against the timeout.
const TIMEOUT_CHECK_US: u64 = 1_000;
/// Shortest wait for a shutdown to complete, whatever RTD3E says (as Linux waits at least
/// 5 s): some controllers report a latency they do not keep.
const SHUTDOWN_TIMEOUT_MIN_MS: u64 = 5_000;
/// Longest wait for a shutdown to complete, whatever RTD3E says.
const SHUTDOWN_TIMEOUT_MAX_MS: u64 = 60_000;

/// Driver settings.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// A command not completed after this long is fatal.
    pub command_timeout_ms: u64,
    /// I/O queue entries wanted (capped by CAP.MQES; at least 2).
    pub io_queue_entries: u16,
    /// Use Doorbell Buffer Config when the controller offers it.
    pub shadow_doorbells: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            command_timeout_ms: 30_000,
            io_queue_entries: 128,
            shadow_doorbells: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    busy: bool,
    opcode: u8,
    user: u64,
    started: Option<Instant>,
}

/// An enabled controller with one I/O queue pair.
pub struct Controller {
    regs: Registers,
    options: Options,
    /// Kept (and its memory alive) while the controller is enabled.
    _admin: AdminQueue,
    sq: SubmissionQueue,
    cq: CompletionQueue,
    /// One PRP list chunk per command slot (also the range list of Dataset Management).
    lists: DmaBuffer,
    /// Bytes of each slot's chunk (`prp::list_bytes`).
    list_bytes: u64,
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: usize,
    info: DiskInfo,
    last_timeout_check: Instant,
    /// Kept alive while the controller may read and write it.
    _shadow: Option<Rc<ShadowBuffers>>,
    /// When the shutdown notification was given, if it was.
    shutdown_at: Option<Instant>,
}

impl Controller {
    /// Resets and brings up the controller behind `region` (BAR0); its I/O completion queue
    /// signals MSI-X `vector` (see [`super::irq::enable`]), or nothing (`None`).
    pub fn init(
        region: MmioRegion,
        options: Options,
        vector: Option<u16>,
    ) -> Result<Self, NvmeError> {
        let regs = Registers::new(region)?;
        let cap = regs.cap();
        if cap.0 == u64::MAX {
            return Err(NvmeError::NotResponding);
        }
        if !cap.nvm_command_set() {
            return Err(NvmeError::Unsupported("no NVM command set (CAP.CSS)"));
        }
        if cap.page_shift_min() > 12 || cap.page_shift_max() < 12 {
            return Err(NvmeError::Unsupported(
                "4 KiB memory pages (CAP.MPSMIN/MPSMAX)",
            ));
        }
        let ready_ms = cap.ready_timeout_ms();
        let timeout_ms = options.command_timeout_ms;
        disable(&regs, ready_ms)?;

        let max_entries = cap.max_queue_entries().min(4096) as u16;
        if max_entries < 2 {
            return Err(NvmeError::Unsupported(
                "queues of fewer than 2 entries (CAP.MQES)",
            ));
        }
        let n = ADMIN_ENTRIES.min(max_entries);
        let mut admin = AdminQueue {
            sq: SubmissionQueue::new(n, Doorbell::new(regs.doorbell(0, DoorbellKind::SqTail)?))?,
            cq: CompletionQueue::new(n, Doorbell::new(regs.doorbell(0, DoorbellKind::CqHead)?))?,
            next_cid: 0,
        };
        regs.set_admin_queue_sizes(n, n);
        regs.set_admin_queues(admin.sq.addr(), admin.cq.addr());
        regs.set_cc(
            cc::EN
                | cc::CSS_NVM
                | cc::AMS_RR
                | 0 << cc::MPS_SHIFT
                | u32::from(SQES) << cc::IOSQES_SHIFT
                | u32::from(CQES) << cc::IOCQES_SHIFT,
        );
        wait_ready(&regs, true, ready_ms)?;

        // Admin commands go in batches of commands that do not depend on each other: one tail
        // doorbell write (an exit under emulation) per batch. 1: what the controller is, its
        // active namespaces, and one I/O queue pair (0's based counts).
        let controller_page = DmaBuffer::new(1).ok_or(NvmeError::OutOfMemory)?;
        let list_page = DmaBuffer::new(1).ok_or(NvmeError::OutOfMemory)?;
        let done = admin.run_all(
            &regs,
            &[
                identify_command(&controller_page, cns::CONTROLLER, 0),
                identify_command(&list_page, cns::ACTIVE_NAMESPACES, 0),
                Command::set_features(feature::NUMBER_OF_QUEUES, 0),
            ],
            timeout_ms,
        )?;
        let identify_failed = |status| NvmeError::AdminFailed {
            opcode: opcode::IDENTIFY,
            status,
        };
        let data = identify_data(&controller_page, &done[0]).map_err(identify_failed)?;
        let controller = ControllerInfo::parse(&data);
        if !controller.entry_sizes_ok(SQES, CQES) {
            return Err(NvmeError::Unsupported(
                "64-byte SQ and 16-byte CQ entries (SQES/CQES)",
            ));
        }
        if controller.nn == 0 {
            return Err(NvmeError::NoNamespace);
        }
        // The first active namespace; controllers before NVMe 1.1 lack the list: NSID 1.
        let nsid = match identify_data(&list_page, &done[1]) {
            Ok(list) => first_active_namespace(&list).ok_or(NvmeError::NoNamespace)?,
            Err(_) => 1,
        };
        if !done[2].status.is_success() {
            return Err(NvmeError::AdminFailed {
                opcode: opcode::SET_FEATURES,
                status: done[2].status,
            });
        }
        // VER in Identify Controller saves reading VS (controllers before NVMe 1.2 leave it 0).
        let version = match controller.ver {
            0 => regs.version(),
            v => v,
        };

        // 2: the namespace, shadow doorbells if offered, the I/O completion queue (with its
        // interrupt vector, if any). The controller applies Doorbell Buffer Config to queues created before it as
        // well as after, so the order in which it runs them does not matter.
        let stride = cap.doorbell_stride();
        let shadow_fits =
            doorbell_index_offset(IO_QID, DoorbellKind::CqHead, stride) + 4 <= PAGE_SIZE;
        let buffers =
            if options.shadow_doorbells && controller.doorbell_buffer_config() && shadow_fits {
                Some(Rc::new(ShadowBuffers::new()?))
            } else {
                None
            };
        let entries = options.io_queue_entries.clamp(2, max_entries);
        let cq_bell = Doorbell::new(regs.doorbell(IO_QID, DoorbellKind::CqHead)?);
        let mut cq = CompletionQueue::new(entries, cq_bell)?;
        let ns_page = list_page;
        let mut cmds = vec![identify_command(&ns_page, cns::NAMESPACE, nsid)];
        if let Some(b) = &buffers {
            cmds.push(Command::doorbell_buffer_config(
                b.shadow.addr(),
                b.eventidx.addr(),
            ));
        }
        cmds.push(Command::create_cq(IO_QID, entries, cq.addr(), vector));
        // One completion per command, in the order of `cmds`.
        let done = admin.run_all(&regs, &cmds, timeout_ms)?;
        let (identified, created) = (&done[0], &done[cmds.len() - 1]);
        if !created.status.is_success() {
            return Err(NvmeError::AdminFailed {
                opcode: opcode::CREATE_CQ,
                status: created.status,
            });
        }
        let data = identify_data(&ns_page, identified).map_err(identify_failed)?;
        let namespace = NamespaceInfo::parse(&data)?.ok_or(NvmeError::NoNamespace)?;
        drop((controller_page, ns_page));
        let shadow = buffers.filter(|_| done[1].status.is_success());
        if let Some(buffers) = &shadow {
            // Admin doorbells: shadow kept in step, MMIO always written.
            let sq_off = doorbell_index_offset(0, DoorbellKind::SqTail, stride);
            let cq_off = doorbell_index_offset(0, DoorbellKind::CqHead, stride);
            admin.sq.doorbell.use_shadow(buffers.clone(), sq_off, true);
            admin.cq.doorbell.use_shadow(buffers.clone(), cq_off, true);
            let cq_off = doorbell_index_offset(IO_QID, DoorbellKind::CqHead, stride);
            cq.doorbell.use_shadow(buffers.clone(), cq_off, false);
        }

        // 3: the I/O submission queue, which needs its completion queue.
        let mut sq_bell = Doorbell::new(regs.doorbell(IO_QID, DoorbellKind::SqTail)?);
        if let Some(buffers) = &shadow {
            let sq_off = doorbell_index_offset(IO_QID, DoorbellKind::SqTail, stride);
            sq_bell.use_shadow(buffers.clone(), sq_off, false);
        }
        let sq = SubmissionQueue::new(entries, sq_bell)?;
        admin.run_ok(
            &regs,
            Command::create_sq(IO_QID, entries, sq.addr(), IO_QID),
            timeout_ms,
        )?;
        // The controller's view of the admin completion queue, exact again.
        admin.finish();

        let block_size = namespace.block_size();
        let mdts = match controller.mdts {
            0 => u64::MAX,
            m => 1u64
                .checked_shl(u32::from(m) + cap.page_shift_min())
                .unwrap_or(u64::MAX),
        };
        let max_transfer = mdts
            .min(u64::from(prp::MAX_TRANSFER))
            .min(u64::from(MAX_BLOCKS_PER_COMMAND) * u64::from(block_size));
        let max_transfer = (max_transfer / u64::from(block_size) * u64::from(block_size)) as u32;
        if max_transfer == 0 {
            return Err(NvmeError::Unsupported("MDTS below one block"));
        }

        let list_bytes = prp::list_bytes(max_transfer);
        let list_pages = (u64::from(entries) * list_bytes).div_ceil(PAGE_SIZE);
        let lists = DmaBuffer::new(list_pages as usize).ok_or(NvmeError::OutOfMemory)?;
        Ok(Controller {
            regs,
            options,
            _admin: admin,
            sq,
            cq,
            lists,
            list_bytes,
            slots: vec![Slot::default(); usize::from(entries)],
            free: (0..entries).rev().collect(),
            in_flight: 0,
            info: DiskInfo {
                version,
                controller,
                nsid,
                blocks: namespace.blocks,
                block_size,
                max_transfer,
                queue_entries: entries,
                shadow_doorbells: shadow.is_some(),
                interrupt_vector: vector,
            },
            last_timeout_check: Instant::now(),
            _shadow: shadow,
            shutdown_at: None,
        })
    }

    /// What the driver found out about the device.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// Whether the I/O completion queue interrupts (wakes the domain) when it gets
    /// completions.
    pub fn interrupts(&self) -> bool {
        self.info.interrupt_vector.is_some()
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Most commands in flight at once (one less than the queue's entries).
    pub fn capacity(&self) -> usize {
        usize::from(self.sq.entries()) - 1
    }

    /// Doorbell counts of the I/O queues.
    pub fn stats(&self) -> IoStats {
        IoStats {
            sq: self.sq.doorbell.stats(),
            cq: self.cq.doorbell.stats(),
        }
    }

    /// Queues `req` (the controller sees it at the next [`Controller::ring`]); `user` comes
    /// back in its [`IoDone`].
    pub fn submit(&mut self, req: &IoRequest, user: u64) -> Result<(), SubmitError> {
        if self.in_flight >= self.capacity() {
            return Err(SubmitError::Full);
        }
        let Some(&cid) = self.free.last() else {
            return Err(SubmitError::Full);
        };
        let cmd = self.command(req, cid)?;
        self.free.pop();
        let slot = &mut self.slots[usize::from(cid)];
        *slot = Slot {
            busy: true,
            opcode: cmd.opcode,
            user,
            started: Some(Instant::now()),
        };
        self.in_flight += 1;
        self.sq.push(&Command { cid, ..cmd });
        Ok(())
    }

    /// Builds the command for `req` in slot `cid` (writing its PRP list or range if needed).
    fn command(&self, req: &IoRequest, cid: u16) -> Result<Command, SubmitError> {
        let info = &self.info;
        let c = &info.controller;
        let nsid = info.nsid;
        if req.kind == IoKind::Flush {
            return Ok(Command::flush(nsid));
        }
        let in_range = req.blocks > 0
            && req
                .lba
                .checked_add(u64::from(req.blocks))
                .is_some_and(|end| end <= info.blocks);
        if !in_range {
            return Err(SubmitError::Invalid(
                "block range empty or past the namespace",
            ));
        }
        let list_offset = u64::from(cid) * self.list_bytes;
        let list_addr = self.lists.addr() + list_offset;
        match req.kind {
            IoKind::Read | IoKind::Write => {
                let bytes = u64::from(req.blocks) * u64::from(info.block_size);
                if bytes != u64::from(req.len) || req.len > info.max_transfer {
                    return Err(SubmitError::Invalid(
                        "length not blocks * block size or over max",
                    ));
                }
                let max_entries = self.list_bytes / 8;
                let prp = prp::build(req.buf, req.len, list_addr, max_entries, |i, addr| {
                    self.lists.write::<u64>(list_offset + 8 * i, addr)
                })
                .map_err(SubmitError::Prp)?;
                Ok(Command::read_write(
                    req.kind == IoKind::Write,
                    nsid,
                    req.lba,
                    req.blocks,
                    prp.prp1,
                    prp.prp2,
                ))
            }
            IoKind::WriteZeroes => {
                if !c.write_zeroes() {
                    return Err(SubmitError::Unsupported);
                }
                if req.blocks > MAX_BLOCKS_PER_COMMAND {
                    return Err(SubmitError::Invalid("write zeroes over 65536 blocks"));
                }
                Ok(Command::write_zeroes(nsid, req.lba, req.blocks))
            }
            IoKind::Deallocate => {
                if !c.dataset_management() {
                    return Err(SubmitError::Unsupported);
                }
                // Range 0: context attributes, length in blocks, starting LBA.
                self.lists.write::<u32>(list_offset, 0);
                self.lists.write::<u32>(list_offset + 4, req.blocks);
                self.lists.write::<u64>(list_offset + 8, req.lba);
                Ok(Command::deallocate(nsid, list_addr))
            }
            IoKind::Flush => unreachable!("handled above"),
        }
    }

    /// Makes every submitted command visible to the controller (one doorbell update).
    pub fn ring(&mut self) {
        self.sq.ring();
    }

    /// Whether a completion is waiting (memory only, no register access).
    pub fn completion_pending(&self) -> bool {
        self.cq.peek().is_some()
    }

    /// Takes the completions the controller posted, calling `done` for each, then checks
    /// in-flight commands against the timeout.
    pub fn poll(&mut self, mut done: impl FnMut(IoDone)) -> Result<usize, NvmeError> {
        let mut n = 0;
        while n < self.slots.len() {
            let Some(e) = self.cq.peek() else {
                break;
            };
            self.cq.advance();
            let slot = self
                .slots
                .get_mut(usize::from(e.cid))
                .filter(|s| s.busy && e.sq_id == IO_QID);
            let Some(slot) = slot else {
                return Err(NvmeError::BadCompletion {
                    qid: IO_QID,
                    sq_id: e.sq_id,
                    cid: e.cid,
                });
            };
            slot.busy = false;
            let user = slot.user;
            self.free.push(e.cid);
            self.in_flight -= 1;
            done(IoDone {
                user,
                status: e.status,
            });
            n += 1;
        }
        if n > 0 {
            self.cq.ring();
        }
        self.check_timeouts()?;
        Ok(n)
    }

    /// Fails when a command in flight is older than the timeout (checked at most once a
    /// millisecond).
    fn check_timeouts(&mut self) -> Result<(), NvmeError> {
        if self.in_flight == 0 || self.last_timeout_check.elapsed_us() < TIMEOUT_CHECK_US {
            return Ok(());
        }
        self.last_timeout_check = Instant::now();
        let limit_us = self.options.command_timeout_ms.saturating_mul(1000);
        for (cid, slot) in self.slots.iter().enumerate() {
            let Some(started) = slot.started.filter(|_| slot.busy) else {
                continue;
            };
            let waited = started.elapsed_us();
            if waited >= limit_us {
                return Err(stalled(&self.regs).unwrap_or(NvmeError::CommandTimeout {
                    cid: cid as u16,
                    opcode: slot.opcode,
                    qid: IO_QID,
                    ms: waited / 1000,
                }));
            }
        }
        Ok(())
    }

    /// How long a normal shutdown may take: RTD3E when the controller reports it, between
    /// [`SHUTDOWN_TIMEOUT_MIN_MS`] and [`SHUTDOWN_TIMEOUT_MAX_MS`].
    pub fn shutdown_timeout_ms(&self) -> u64 {
        u64::from(self.info.controller.rtd3e)
            .div_ceil(1000)
            .clamp(SHUTDOWN_TIMEOUT_MIN_MS, SHUTDOWN_TIMEOUT_MAX_MS)
    }

    /// Gives the normal shutdown notification (NVMe base specification 1.4, 7.6.2): CC.SHN =
    /// 01b, the rest of CC kept. The controller then writes its volatile cache back and
    /// reports CSTS.SHST = 10b ([`Controller::shutdown_done`]). Submit nothing after it: the
    /// controller needs a reset before it takes commands again.
    pub fn begin_shutdown(&mut self) {
        let cc = self.regs.cc();
        self.regs.set_cc(cc & !cc::SHN_MASK | cc::SHN_NORMAL);
        self.shutdown_at = Some(Instant::now());
    }

    /// Whether the shutdown [`Controller::begin_shutdown`] started is complete (CSTS.SHST =
    /// 10b); an error when the controller is gone or fatal, when no shutdown was started, or
    /// once [`Controller::shutdown_timeout_ms`] has passed.
    pub fn shutdown_done(&self) -> Result<bool, NvmeError> {
        let Some(started) = self.shutdown_at else {
            return Err(NvmeError::Unsupported(
                "shutdown status before the notification",
            ));
        };
        let s = self.regs.csts();
        if s == u32::MAX {
            return Err(NvmeError::NotResponding);
        }
        if s & csts::SHST_MASK == csts::SHST_COMPLETE {
            return Ok(true);
        }
        if s & csts::CFS != 0 {
            return Err(NvmeError::ControllerFatal);
        }
        let waited = started.elapsed_us() / 1000;
        if waited >= self.shutdown_timeout_ms() {
            return Err(NvmeError::ShutdownTimeout { ms: waited });
        }
        Ok(false)
    }
}
