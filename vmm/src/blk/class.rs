//! The real path: a disk served by a driver domain over its channel, the block class of the
//! reincarnation engine ([`crate::reincarnation`]).
//!
//! The engine runs the domains' lives (detection, restarts, standbys, commands); this module
//! is what block adds: the channel of the live domain, the disk's geometry, posting shadow-queue
//! parts and taking their completions, and the write log a volatile write cache needs. When a
//! domain is lost every in-flight part goes back to the shadow queue; client requests keep
//! arriving and queue behind them; nothing is failed. Once a fresh domain is ready the writes a
//! volatile write cache may have dropped are replayed, then the queue in order. Completions are
//! matched by tag and epoch, so each client request completes exactly once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddvm_abi::channel::blk::{device_flags, op};
use ddvm_abi::channel::ring::IndexError;
use ddvm_abi::channel::{fault, status as cstatus};
use ddvm_recovery::policy::Policy;
use ddvm_recovery::reason::{FailureReason, ProtocolViolation, Ring};
use ddvm_recovery::shadow::{ShadowQueue, State};
use ddvm_recovery::supervisor::{Admission, Supervisor};
use vm_memory::{Bytes, GuestAddress};

use super::backend::{DiskInfo, Finished};
use super::device::ClientPort;
use super::replay::{BlockOp, LoggedWrite, Op, ReplayFence, WriteLog};
use super::request::{status, Segments};
use super::service::{copy_part, Part, Pending, ServiceCounters};
use crate::devices::DeviceSpec;
use crate::domain::{DeviceThread, Domain, DomainConfig, DomainDevice};
use crate::host_channel::{DomainProtocolError, Done, HostChannel, SubmitError};
use crate::hypervisor::Hypervisor;
use crate::memory::GuestMem;
use crate::reincarnation::vm::VmLauncher;
use crate::reincarnation::{DeviceClass, Engine, EngineError, RecoveryHandle};

/// Acknowledged-but-unflushed data the VMM keeps before it flushes on its own: it bounds what a
/// restart must replay (1 MiB: ~256 writes of 4 KiB, a few ms).
const WRITE_LOG_LIMIT: usize = 1 << 20;
/// Past this much unflushed data, client writes wait until a flush has trimmed the log. Under
/// restarts that come faster than a replay completes, the VMM's own flush (which must wait for
/// the replay) might otherwise never run, and the log would grow without bound.
const WRITE_LOG_HARD_LIMIT: usize = 4 * WRITE_LOG_LIMIT;
/// The same limits in entries: discards and write-zeroes carry no data but each is a command
/// to replay (and an entry to keep).
const WRITE_LOG_ENTRY_LIMIT: usize = 1024;
const WRITE_LOG_ENTRY_HARD_LIMIT: usize = 4 * WRITE_LOG_ENTRY_LIMIT;
/// Bounce slots client parts leave free while writes wait to be replayed: clients go first
/// after a restart, but a busy client must not keep the replay (and every flush and
/// overlapping request, which wait for it) from ever getting a slot.
const REPLAY_RESERVE: usize = 8;

/// Internal requests (not a client's): replayed writes and the VMM's own flushes.
/// Each carries when it was posted (service clock): the request deadline applies to them as
/// to clients' requests (a replay or flush the domain never completes would hold every
/// overlapping request and every flush, or the write log, for ever).
enum Internal {
    /// A replayed write of these sectors (first, count).
    Replay(u64, u32, Instant),
    /// The VMM's own flush, with its write-log mark.
    Flush(u64, Instant),
}

impl Internal {
    fn replayed(&self) -> Option<(u64, u32)> {
        match self {
            Internal::Replay(sector, sectors, _) => Some((*sector, *sectors)),
            Internal::Flush(..) => None,
        }
    }

    fn posted(&self) -> Instant {
        match self {
            Internal::Replay(_, _, t) | Internal::Flush(_, t) => *t,
        }
    }
}

/// What block keeps beside the engine: the live domain's channel, the disk, the write log.
struct BlockState {
    name: String,
    device: Arc<DomainDevice>,
    // The live domain's channel (from its ready to its loss).
    channel: Option<HostChannel>,
    disk: DiskInfo,
    max_transfer: u32,
    wlog: Option<WriteLog>,
    // The bytes of each client write in flight (by shadow sequence number), as the VMM copied
    // them from the client, for the write log once the write is acknowledged: the copy in the
    // domain's bounce slot is the domain's to overwrite.
    write_data: HashMap<u64, Vec<u8>>,
    flush_marks: HashMap<u32, u64>,
    internal: HashMap<u32, Internal>,
    replay: VecDeque<LoggedWrite>,
    failed: Vec<Finished>,
    done: Vec<Done>,
    // How the orderly stop went, once it ran (`shut_down`).
    stopped: Option<crate::stop::StopReport>,
    // A broken invariant found where the engine is out of reach (`DeviceClass::take_broken`).
    broken: Option<String>,
}

/// The block class as the engine sees it: the state and the disk's shadow queue.
struct BlockClass<'a> {
    s: &'a mut BlockState,
    shadow: &'a mut ShadowQueue<BlockOp, Part>,
}

impl DeviceClass<Domain> for BlockClass<'_> {
    fn ready(&mut self, domain: &Domain) -> Result<(), FailureReason> {
        let s = &mut *self.s;
        let (Some(base), Some(header)) = (domain.channel(), domain.channel_header()) else {
            let message = "the domain has no channel".into();
            return Err(FailureReason::BootFailed { message });
        };
        let mut channel = HostChannel::new(base, header);
        let info = channel
            .device_info(domain.memory())
            .map_err(|e| FailureReason::Protocol(violation(e)))?;
        if s.disk.sectors == 0 {
            // The first domain: the disk is what it found.
            s.disk = DiskInfo {
                sectors: info.capacity_sectors,
                block_size: info.block_size,
                discard: info.flags & device_flags::DISCARD != 0,
                write_zeroes: info.flags & device_flags::WRITE_ZEROES != 0,
            };
            s.max_transfer = info.max_transfer;
        } else if info.capacity_sectors != s.disk.sectors || info.block_size != s.disk.block_size {
            let what = "the disk changed geometry across a restart".into();
            return Err(FailureReason::Protocol(ProtocolViolation::BadDeviceInfo {
                what,
            }));
        }
        // Whether writes must be logged is the VMM's own knowledge of the device, checked at
        // every boot; a domain that claims a volatile cache adds to it, never takes it away.
        let claimed = info.flags & device_flags::VOLATILE_WRITE_CACHE != 0;
        if keeps_write_log(s.device.volatile_write_cache(), claimed) && s.wlog.is_none() {
            s.wlog = Some(WriteLog::new());
        }
        s.flush_marks.clear();
        s.internal.clear();
        // Every domain that comes up replays, first, what a reset may have dropped from the
        // device's cache: however many attempts failed before this one (a first boot has
        // nothing logged).
        s.replay = s
            .wlog
            .as_ref()
            .map(|l| l.pending().iter().cloned().collect())
            .unwrap_or_default();
        s.channel = Some(channel);
        Ok(())
    }

    #[cfg(feature = "fault-injection")]
    fn forget_tags(&mut self) {
        self.shadow.forget_tags();
    }

    fn lost(&mut self) {
        // Every block request is requeued (`BlockOp` keeps `OnLoss::Requeue`): none is dropped.
        let (_, dropped) = self.shadow.domain_lost();
        if !dropped.is_empty() {
            // Answered at once (an I/O error, never silence), and the device is given up.
            self.s.broken.get_or_insert(format!(
                "{} block request(s) left the shadow queue at a domain's loss, though every \
                 one is requeued",
                dropped.len()
            ));
            for e in dropped {
                self.s.failed.push(Finished {
                    part: e.client,
                    status: status::IOERR,
                });
            }
        }
        self.s.replay.clear();
        self.s.channel = None;
    }

    fn oldest_deadline_bound(&self) -> Option<(u32, Instant)> {
        // Every block request is bound by the deadline: clients' and the VMM's own.
        let internal = self
            .s
            .internal
            .iter()
            .map(|(&tag, i)| (tag, i.posted()))
            .min_by_key(|&(_, posted)| posted);
        match (self.shadow.oldest_deadline_bound(), internal) {
            (Some(a), Some(b)) => Some(if a.1 <= b.1 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    fn owed(&self) -> (usize, usize) {
        (self.shadow.in_flight(), self.shadow.queued())
    }

    fn replay_fault(&self) -> Option<(u32, u32)> {
        let log = self.s.wlog.as_ref()?;
        let w = log.pending().iter().find(|w| w.op == Op::Write)?;
        Some((fault::FAIL_WRITE, u32::try_from(w.sector).ok()?))
    }

    fn take_broken(&mut self) -> Option<String> {
        self.s.broken.take()
    }

    fn gave_up(&mut self) {
        if let Some(log) = self.s.wlog.as_ref().filter(|l| !l.is_empty()) {
            tracing::error!(
                "domain {}: gave up with {} acknowledged write(s) ({} bytes) not known to be \
                 durable; they are kept and replayed if an operator restarts it",
                self.s.name,
                log.len(),
                log.bytes()
            );
        }
    }
}

/// A driver domain serving the disk, with reincarnation.
pub struct ChannelBackend {
    engine: Engine<VmLauncher>,
    blk: BlockState,
}

/// Why the first boot failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The device could not be created.
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),
    /// The domain failed to come up.
    #[error("domain {name}: {reason}")]
    Failed {
        /// Domain.
        name: String,
        /// Why.
        reason: FailureReason,
    },
    /// The engine could not be set up (an invalid policy, the host).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ChannelBackend {
    /// Creates the domain's device, boots the domain and waits until it is ready. `cfg.device`
    /// must describe the device (an emulated NVMe controller).
    pub fn start(
        hv: Arc<Hypervisor>,
        cfg: DomainConfig,
        policy: Policy,
    ) -> Result<ChannelBackend, StartError> {
        let name = cfg.name.clone();
        let device = match &cfg.device {
            // The block service serves the device too: no thread hand-off per request.
            Some(DeviceSpec::EmulatedNvme(n)) => {
                DomainDevice::emulated_nvme(&name, n, DeviceThread::Owner)?
            }
            Some(DeviceSpec::Vfio(v)) => {
                let device = DomainDevice::vfio(&name, v)?;
                if device.model().class() != ddvm_abi::channel::class::BLK {
                    return Err(StartError::Failed {
                        name,
                        reason: FailureReason::BootFailed {
                            message: format!(
                                "a disk domain needs a block device; VFIO device {} is a NIC (class 020000): name its domain as a client's `nic`",
                                v.address
                            ),
                        },
                    });
                }
                device
            }
            Some(DeviceSpec::Persistent(d)) => d.clone(),
            Some(DeviceSpec::EmulatedE1000(_)) => {
                return Err(StartError::Failed {
                    name,
                    reason: FailureReason::BootFailed {
                        message: "a disk domain needs a block device, not a NIC".into(),
                    },
                })
            }
            None => {
                return Err(StartError::Failed {
                    name,
                    reason: FailureReason::BootFailed {
                        message: "a disk domain needs a device".into(),
                    },
                })
            }
        };
        let launcher = VmLauncher::new(hv, cfg, device.clone());
        let engine = Engine::new(&name, launcher, policy)?;
        let mut b = ChannelBackend {
            engine,
            blk: BlockState {
                name: name.clone(),
                device,
                channel: None,
                disk: DiskInfo {
                    sectors: 0,
                    block_size: 512,
                    discard: false,
                    write_zeroes: false,
                },
                max_transfer: 0,
                wlog: None,
                write_data: HashMap::new(),
                flush_marks: HashMap::new(),
                internal: HashMap::new(),
                replay: VecDeque::new(),
                failed: Vec::new(),
                done: Vec::new(),
                stopped: None,
                broken: None,
            },
        };
        let mut shadow = ShadowQueue::new();
        b.engine
            .start(&mut BlockClass {
                s: &mut b.blk,
                shadow: &mut shadow,
            })
            .map_err(|reason| StartError::Failed { name, reason })?;
        Ok(b)
    }

    /// The handle for commands, events and status.
    pub fn handle(&self) -> RecoveryHandle {
        self.engine.handle()
    }

    /// The geometry.
    pub fn disk(&self) -> DiskInfo {
        self.blk.disk
    }

    /// Largest part.
    pub fn max_transfer(&self) -> u32 {
        self.blk.max_transfer
    }

    /// The running domain, if one is up.
    pub fn domain(&self) -> Option<&Domain> {
        self.engine.live().map(|l| &l.domain)
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        self.engine.supervisor()
    }

    /// Lets the device's domains run `pass` on their vCPU thread when they wait (see
    /// [`DomainDevice::wait_work`]); `None` stops it.
    pub fn set_domain_thread_pass(&self, pass: Option<crate::domain::OwnerPass>) {
        self.blk.device.set_owner_pass(pass);
    }

    /// Marks the passes that follow as running on the domain's vCPU thread (or not): there,
    /// failures are deferred to the service thread, and neither detection, commands nor
    /// restarts run.
    pub fn set_on_domain_thread(&mut self, on: bool) {
        self.engine.set_on_domain_thread(on);
    }

    /// The device's counters.
    pub fn device_stats(&self) -> ddvm_passthrough::NvmeStats {
        self.blk.device.nvme_stats().unwrap_or_default()
    }

    /// The warm standbys that are up (policy `standbys`), the next to serve first.
    pub fn standbys(&self) -> impl Iterator<Item = &Domain> {
        self.engine.standbys()
    }

    /// The live domain failed.
    fn fail(&mut self, reason: FailureReason, shadow: &mut ShadowQueue<BlockOp, Part>) {
        self.engine.fail(
            reason,
            &mut BlockClass {
                s: &mut self.blk,
                shadow,
            },
        );
    }

    /// Posts replayed writes, then queued parts, while the channel has room.
    pub fn post(
        &mut self,
        shadow: &mut ShadowQueue<BlockOp, Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
    ) -> usize {
        self.engine.tend(&mut BlockClass {
            s: &mut self.blk,
            shadow,
        });
        if self.engine.has_deferred() {
            return 0;
        }
        // Copies of writes whose entries left the queue another way (a client's reset before
        // a repost) go too.
        if !self.blk.write_data.is_empty() && shadow.len() < self.blk.write_data.len() {
            self.blk.write_data.retain(|&seq, _| shadow.contains(seq));
        }
        if self.engine.admission() == Admission::Fail {
            // Given up: every owed request is failed, as MINIX pushes errors up.
            for e in shadow.drain() {
                self.blk.failed.push(Finished {
                    part: e.client,
                    status: status::IOERR,
                });
            }
            self.blk.write_data.clear();
            return 0;
        }
        let Some(live) = self.engine.live() else {
            return 0;
        };
        let Some(channel) = self.blk.channel.as_mut() else {
            return 0;
        };
        let (mem, epoch) = (live.domain.memory().clone(), live.epoch);
        let posted_at = self.engine.service_time(Instant::now());
        let mut n = 0;
        let mut broken = false;
        let mut invariant = None;
        // 1. Client parts, oldest first. After a restart they go ahead of the writes being
        //    replayed, except where they overlap one (or are flushes), and those behind them
        //    that overlap them: clients are served again at once, not after the whole log.
        let mut fence = ReplayFence(
            self.blk
                .replay
                .iter()
                .map(|w| (w.sector, w.sectors))
                .chain(self.blk.internal.values().filter_map(Internal::replayed))
                .collect(),
        );
        let log_full = self.blk.wlog.as_ref().is_some_and(|l| {
            l.bytes() > WRITE_LOG_HARD_LIMIT || l.len() > WRITE_LOG_ENTRY_HARD_LIMIT
        });
        let mut passed = None;
        let reserve = if self.blk.replay.is_empty() {
            0
        } else {
            REPLAY_RESERVE
        };
        while !broken && channel.has_room() && channel.free_slots() > reserve {
            let next = match passed {
                None => shadow.next_queued(),
                Some(seq) => shadow.next_queued_after(seq),
            };
            let Some(e) = next else { break };
            let (seq, o, sector, sectors, part) =
                (e.seq, e.op.kind, e.op.sector, e.op.sectors, e.client);
            if fence.blocks(o, sector, sectors) || (log_full && o.modifies()) {
                // It waits, and so does whatever overlaps it (a flush overlaps nothing: a later
                // write that completes first is one it may cover anyway).
                if o != Op::Flush {
                    fence.0.push((sector, sectors));
                }
                passed = Some(seq);
                continue;
            }
            let Some(p) = pending.get(&part.rid) else {
                shadow.remove(seq);
                self.blk.write_data.remove(&seq);
                continue;
            };
            // A client that reset its device since wants no answer and may have reused its
            // buffers: the part is dropped, not posted with what they hold now. The port's
            // lock keeps a reset from passing between this check and the copy.
            let current = ports[p.port].lock();
            if current.generation != p.generation {
                drop(current);
                shadow.remove(seq);
                self.blk.write_data.remove(&seq);
                continue;
            }
            let client = &ports[p.port].mem;
            // With a write log, the VMM keeps its own copy of what the client gave (once: a
            // write posted again after a restart sends the same bytes).
            let capture = o == Op::Write && self.blk.wlog.is_some();
            if capture && !self.blk.write_data.contains_key(&seq) {
                let segments = p.data.slice(part.offset, part.len);
                match gather(client, &segments, counters) {
                    Some(data) => {
                        self.blk.write_data.insert(seq, data);
                    }
                    None => {
                        shadow.remove(seq);
                        self.blk.failed.push(Finished {
                            part,
                            status: status::IOERR,
                        });
                        continue;
                    }
                }
            }
            let data = self.blk.write_data.get(&seq).filter(|_| capture);
            let r = channel.submit_with(&mem, channel_op(o), sector, sectors, |dmem, gpa, len| {
                match data {
                    Some(d) => {
                        let d = &d[..len.min(d.len())];
                        counters.copy(d.len() as u64, || {
                            let _ = dmem.write_slice(d, GuestAddress(gpa));
                        });
                    }
                    None => {
                        let len = (len as u64).min(part.len);
                        let segments = p.data.slice(part.offset, len);
                        copy_part(client, &segments, dmem, gpa, false, counters);
                    }
                }
            });
            drop(current);
            match r {
                Ok(tag) => {
                    shadow.posted(seq, tag, epoch, posted_at);
                    if o == Op::Flush {
                        if let Some(log) = &self.blk.wlog {
                            self.blk.flush_marks.insert(tag, log.flush_posted());
                        }
                    }
                    n += 1;
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::Broken) => broken = true,
                // Parts are cut to the channel's limit, and a free entry was checked: the
                // VMM's bookkeeping is broken. The part stays owed (the give-up fails it).
                Err(e @ (SubmitError::TooLarge { .. } | SubmitError::RingInvariant)) => {
                    invariant.get_or_insert(format!("posting a {o:?} of {sectors} sector(s): {e}"));
                    broken = true;
                }
            }
        }
        // 2. Writes a reset may have dropped from the device's cache, in order: one waits
        //    for an earlier one it overlaps (the device may reorder commands in flight).
        let mut fence = ReplayFence(
            self.blk
                .internal
                .values()
                .filter_map(Internal::replayed)
                .collect(),
        );
        while !broken && channel.has_room() {
            let Some(w) = self.blk.replay.front() else {
                break;
            };
            if fence.blocks(w.op, w.sector, w.sectors) {
                break;
            }
            let r =
                channel.submit_with(&mem, channel_op(w.op), w.sector, w.sectors, |m, gpa, _| {
                    let _ = m.write_slice(&w.data, GuestAddress(gpa));
                });
            match r {
                Ok(tag) => {
                    self.blk
                        .internal
                        .insert(tag, Internal::Replay(w.sector, w.sectors, posted_at));
                    fence.0.push((w.sector, w.sectors));
                    self.blk.replay.pop_front();
                    n += 1;
                }
                Err(SubmitError::Full) => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        // 3. The VMM's own flush when the log of unflushed writes grows too large (not while
        //    replayed writes are in flight: it must cover them).
        if let Some(log) = &self.blk.wlog {
            let flushing = self
                .blk
                .internal
                .values()
                .any(|i| matches!(i, Internal::Flush(..)));
            if (log.bytes() > WRITE_LOG_LIMIT || log.len() > WRITE_LOG_ENTRY_LIMIT)
                && !flushing
                && fence.0.is_empty()
                && self.blk.replay.is_empty()
                && channel.has_room()
            {
                let mark = log.flush_posted();
                if let Ok(tag) = channel.submit(&mem, op::FLUSH, 0, 0, None) {
                    self.blk
                        .internal
                        .insert(tag, Internal::Flush(mark, posted_at));
                    n += 1;
                }
            }
        }
        if n > 0 && channel.publish(&mem) {
            live.domain.kick();
        }
        if let Some(what) = invariant {
            self.engine.invariant_broken(what);
        } else if broken {
            let reason = channel
                .broken()
                .map(|e| FailureReason::Protocol(violation(e)))
                .unwrap_or(FailureReason::BootFailed {
                    message: "channel refused service".into(),
                });
            self.fail(reason, shadow);
        }
        n
    }

    /// Runs the device on what the live domain submitted without trapping (the emulated
    /// controller's shadow doorbells); returns the work taken. [`ChannelBackend::collect`]
    /// does this first too.
    pub fn poll_device(&self) -> usize {
        if self.engine.has_deferred() || self.engine.live().is_none() {
            return 0;
        }
        self.blk.device.poll() as usize
    }

    /// Takes completions; copies read data to clients; records acknowledged writes.
    pub fn collect(
        &mut self,
        shadow: &mut ShadowQueue<BlockOp, Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
        out: &mut Vec<Finished>,
    ) -> usize {
        out.append(&mut self.blk.failed);
        if self.engine.has_deferred() {
            return 0;
        }
        let Some(live) = self.engine.live() else {
            return 0;
        };
        let (mem, epoch) = (live.domain.memory().clone(), live.epoch);
        // The device first: what the domain submitted since the last pass completes now.
        let device_work = self.blk.device.poll() as usize;
        let Some(channel) = self.blk.channel.as_mut() else {
            return device_work;
        };
        self.blk.done.clear();
        let polled = channel.poll(&mem, &mut self.blk.done);
        // One clock read per pass that has completions (none on an idle poll).
        // The supervisor and the records are on the wall clock; request latencies on the
        // service clock, as their posting times are.
        let now = (!self.blk.done.is_empty()).then(Instant::now);
        let service_now = now.map(|t| self.engine.service_time(t));
        // DMA the driver aimed outside the domain is the driver's fault, not the medium's:
        // recover, and replay the requests. The emulated controller fails such a command; a
        // real one behind an IOMMU may complete it as if nothing happened (QEMU's NVMe does),
        // with the data never moved: checked before any completion of the pass is believed.
        if !self.blk.done.is_empty() {
            if let Some(reason) = self.engine.dma_refused() {
                self.fail(reason, shadow);
                return 0;
            }
        }
        let Some(channel) = self.blk.channel.as_mut() else {
            return 0;
        };
        let mut n = 0;
        // A failed replay or flush: the domain has failed (below, once the pass is taken).
        let mut replay_failed = None;
        for d in std::mem::take(&mut self.blk.done) {
            let tag = d.request.tag;
            let ok = d.status == cstatus::OK;
            if let Some(internal) = self.blk.internal.remove(&tag) {
                match internal {
                    Internal::Flush(mark, _) if ok => {
                        if let Some(log) = self.blk.wlog.as_mut() {
                            log.flush_completed(mark);
                        }
                    }
                    // An acknowledged write that could not be made good again: never dropped.
                    // It stays in the log, and the domain has failed: the next one replays it.
                    Internal::Replay(sector, sectors, _) if !ok => {
                        replay_failed.get_or_insert(FailureReason::ReplayFailed {
                            sector,
                            sectors,
                            status: d.status,
                        });
                    }
                    // Whether the writes it covers are durable is unknown: nothing leaves the
                    // log, and the next domain replays them and flushes again.
                    Internal::Flush(..) if !ok => {
                        replay_failed
                            .get_or_insert(FailureReason::FlushFailed { status: d.status });
                    }
                    _ => {}
                }
                channel.finish(&mem, &d, None);
                continue;
            }
            let Ok(entry) = shadow.complete(tag, epoch) else {
                // The channel checked the tag against its own table, which the shadow queue
                // mirrors: a miss is a broken invariant of the VMM's, and the device is given
                // up (the engine's next pass). The slot is freed.
                self.engine
                    .invariant_broken(format!("completion for tag {tag} has no shadow entry"));
                channel.finish(&mem, &d, None);
                continue;
            };
            if let (State::InFlight { posted, .. }, Some(now)) = (entry.state, service_now) {
                self.engine
                    .request_completed(now.saturating_duration_since(posted));
            }
            let part = entry.client;
            let mut st = virtio_status(d.status);
            let slot = channel.slot_address(&d);
            let written = self.blk.write_data.remove(&entry.seq);
            match entry.op.kind {
                Op::Read if st == status::OK => {
                    if u64::from(d.len) != part.len {
                        st = status::IOERR;
                    } else if let Some(p) = pending.get(&part.rid) {
                        let port = &ports[p.port];
                        let guard = port.lock();
                        if guard.generation == p.generation {
                            let segments = p.data.slice(part.offset, part.len);
                            if !copy_part(&port.mem, &segments, &mem, slot, true, counters) {
                                st = status::IOERR;
                            }
                        }
                    }
                }
                Op::Write | Op::WriteZeroes | Op::Discard if ok => {
                    if let Some(log) = self.blk.wlog.as_mut() {
                        // The bytes the VMM copied from the client when it posted the write
                        // (never a read-back of the bounce slot, which the domain can write).
                        let data = match (entry.op.kind, written) {
                            (Op::Write, Some(data)) => data,
                            (Op::Write, None) => {
                                crate::limited!(
                                    error,
                                    key: self.blk.name,
                                    "domain {}: VMM bug: write at sector {} acknowledged with \
                                     no copy for the write log",
                                    self.blk.name,
                                    entry.op.sector
                                );
                                Vec::new()
                            }
                            _ => Vec::new(),
                        };
                        log.acknowledged(entry.op.kind, entry.op.sector, entry.op.sectors, data);
                    }
                }
                Op::Flush if ok => {
                    if let (Some(mark), Some(log)) =
                        (self.blk.flush_marks.remove(&tag), self.blk.wlog.as_mut())
                    {
                        log.flush_completed(mark);
                    }
                }
                // With a write log, a client's flush that fails is not the client's error:
                // the writes it covers may be only in a cache the device could not write
                // back. The domain fails, the next one replays the log, and the flush is
                // posted again (it waits behind the replay); the client sees it complete.
                Op::Flush if self.blk.wlog.is_some() => {
                    self.blk.flush_marks.remove(&tag);
                    replay_failed.get_or_insert(FailureReason::FlushFailed { status: d.status });
                    channel.finish(&mem, &d, None);
                    shadow.push(entry.op, part, entry.accepted);
                    continue;
                }
                _ => {}
            }
            channel.finish(&mem, &d, None);
            out.push(Finished { part, status: st });
            n += 1;
        }
        if let Some(now) = now {
            // Done once every replayed write has completed, not only been posted.
            let replay_done = replay_failed.is_none()
                && self.blk.replay.is_empty()
                && !self
                    .blk
                    .internal
                    .values()
                    .any(|i| matches!(i, Internal::Replay(..)));
            self.engine.served(n, now, replay_done);
        }
        if let Some(reason) = replay_failed {
            self.fail(reason, shadow);
        } else if let Err(e) = polled {
            self.fail(FailureReason::Protocol(violation(e)), shadow);
        }
        n + device_work
    }

    /// Asks for (or stops asking for) a wake-up when completions arrive; returns whether some
    /// already did.
    pub fn arm(&mut self, on: bool) -> bool {
        if !self.blk.failed.is_empty() || self.engine.has_deferred() {
            return true;
        }
        let Some(live) = self.engine.live() else {
            // Down: wake for the restart.
            return self.engine.restart_at().is_some();
        };
        let Some(channel) = self.blk.channel.as_mut() else {
            return true;
        };
        let mem = live.domain.memory();
        channel.set_notify(mem, on);
        if !on {
            let _ = live.domain.notify_eventfd().read();
            self.blk.device.clear();
            return false;
        }
        self.blk.device.arm()
            || channel.poll_pending(mem).unwrap_or(true)
            || live.domain.has_stopped().is_some()
    }

    /// Eventfds that wake the service: completions (and the domain stopping), commands.
    pub fn wait_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let mut v = vec![self.engine.wake_fd()];
        if let Some(l) = self.engine.live() {
            v.push(l.domain.notify_eventfd().as_raw_fd());
            v.extend(self.blk.device.eventfd());
        }
        v
    }

    /// Whether the live domain's waits watch the clients' notifications: it waits as soon as
    /// it has nothing to do (its device's `driver_waits`) and runs the service's pass when a
    /// client kicks. Not while a failure waits for the service's thread (that domain's waits
    /// run no pass), nor while no domain is up.
    pub fn clients_watched(&self) -> bool {
        self.engine.live().is_some()
            && !self.engine.has_deferred()
            && self.blk.device.waits_watch_owner()
    }

    /// How long the service may sleep: while a domain runs, a quarter of its heartbeat
    /// period (1–25 ms: what the detection of a hang, a late request or a refused DMA may
    /// wait beyond its own limit; a domain that stops, a command and a completion wake the
    /// service), the restart time while it is down. Each such wake-up costs a pass and the detectors' reads (`/proc`): measured in
    /// the TCG rig at a 5 ms limit, about 0.5 ms of its one CPU per 5 ms.
    pub fn sleep_limit(&self) -> Duration {
        let now = Instant::now();
        match (self.engine.live(), self.engine.restart_at()) {
            (None, Some(t)) => t.saturating_duration_since(now),
            (Some(_), _) => (self.engine.heartbeat_period() / 4)
                .clamp(Duration::from_millis(1), Duration::from_millis(25)),
            (None, None) => Duration::from_millis(50),
        }
    }

    /// Whether an orderly stop has nothing more to wait for before its final flush: nothing
    /// queued or in flight, no replay left, and a domain serving (or none coming: given up).
    /// While the domain is down with a restart due, the stop waits for it: the write log is
    /// replayed on it (a reset dropped the cache), and only then can a flush cover it.
    pub fn settled(&self, shadow: &ShadowQueue<BlockOp, Part>) -> bool {
        let live = self.engine.live().is_some();
        if self.engine.is_broken() || (!live && self.engine.restart_at().is_none()) {
            return true;
        }
        live && !self.engine.has_deferred()
            && shadow.is_empty()
            && self.blk.replay.is_empty()
            && self.blk.internal.is_empty()
    }

    /// Steps 3–4 of an orderly stop (see [`crate::stop`]): a FLUSH and a SHUTDOWN through the
    /// channel, else the VMM's own shutdown of the controller; the vCPU is stopped either
    /// way (the device is quiesced when the backend is dropped). `started`: when the stop
    /// began; `unanswered`: client requests still owed. Runs once; logs what it did.
    pub fn shut_down(&mut self, started: Instant, unanswered: usize) -> crate::stop::StopReport {
        use crate::reincarnation::DomainHandle;
        use crate::stop::{self, StopHow};
        if let Some(r) = &self.blk.stopped {
            return r.clone();
        }
        let period = self.engine.heartbeat_period();
        let blk = &mut self.blk;
        // Every logged write is on the device (in its cache or on the medium) once its replay
        // on the live domain has completed.
        let replayed = blk.replay.is_empty()
            && !blk
                .internal
                .values()
                .any(|i| matches!(i, Internal::Replay(..)));
        let mut result = Err("no domain was serving".to_string());
        if let Some(reason) = self.engine.deferred() {
            result = Err(format!("the domain failed ({reason})"));
        } else if let (Some(live), Some(channel)) = (self.engine.live(), blk.channel.as_mut()) {
            let wlog = &mut blk.wlog;
            let mark = wlog.as_ref().map(WriteLog::flush_posted);
            result = stop::through_domain(&live.domain, channel, period, || {
                if let (true, Some(log), Some(mark)) = (replayed, wlog.as_mut(), mark) {
                    log.flush_completed(mark);
                }
            });
        }
        let on_device = self.engine.live().is_some() && replayed;
        if let Some(live) = self.engine.live_mut() {
            live.domain.stop_vcpu();
        }
        let how = match result {
            Ok(()) => StopHow::Domain,
            Err(why) => stop::by_vmm(&self.blk.device, why),
        };
        let logged = self.blk.wlog.as_ref().map_or(0, WriteLog::len);
        // Logged writes are durable once they are on the device and it wrote its cache back
        // (through the domain or the VMM); the rest a reset dropped with no replay since.
        let at_risk = match &how {
            StopHow::Domain | StopHow::Device { .. } if on_device => 0,
            _ => logged,
        };
        let report = stop::StopReport {
            disk: self.blk.name.clone(),
            how,
            took: started.elapsed(),
            unanswered,
            at_risk,
        };
        if report.clean() && report.unanswered == 0 {
            tracing::info!("{report}");
        } else if report.clean() {
            tracing::warn!("{report}");
        } else {
            tracing::error!("{report}");
        }
        self.engine.drop_standbys();
        self.blk.stopped = Some(report.clone());
        report
    }

    /// How the orderly stop went, once it ran.
    pub fn stop_report(&self) -> Option<&crate::stop::StopReport> {
        self.blk.stopped.as_ref()
    }

    /// The stop of a backend dropped without one (a test, a panic): the domain's vCPU
    /// stopped, then the VMM's own shutdown of the controller, so its cache is written back
    /// before the quiesce resets it.
    fn shut_down_if_not_yet(&mut self) {
        use crate::reincarnation::DomainHandle;
        if self.blk.stopped.is_some() {
            return;
        }
        if let Some(live) = self.engine.live_mut() {
            live.domain.stop_vcpu();
        }
        if let crate::domain::DeviceShutdown::Failed(e) = self
            .blk
            .device
            .shutdown_controller(crate::stop::DEVICE_TIMEOUT)
        {
            tracing::error!(
                "disk {}: the controller could not be shut down: {e}",
                self.blk.name
            );
        }
    }
}

impl Drop for ChannelBackend {
    fn drop(&mut self) {
        // Before the engine goes (its drop retires the live domain, which resets the device).
        self.shut_down_if_not_yet();
    }
}

/// The supervisor's name for a channel protocol violation.
pub fn violation(e: DomainProtocolError) -> ProtocolViolation {
    match e {
        DomainProtocolError::UnknownTag { tag } => ProtocolViolation::UnknownTag { tag },
        DomainProtocolError::StaleEpoch {
            tag,
            epoch,
            expected,
        } => ProtocolViolation::StaleEpoch {
            tag,
            epoch,
            expected,
        },
        DomainProtocolError::LengthOverRequest { tag, len, max }
        | DomainProtocolError::LengthInvalid { tag, len, max, .. } => {
            ProtocolViolation::LengthOverRequest { tag, len, max }
        }
        DomainProtocolError::Index(i) => match i {
            IndexError::ProducerTooFar { producer, consumer } => {
                ProtocolViolation::IndexPastProducer {
                    ring: Ring::Completion,
                    index: producer,
                    limit: consumer,
                }
            }
            IndexError::ProducerBackwards { producer, last } => ProtocolViolation::IndexBackwards {
                ring: Ring::Completion,
                old: last,
                new: producer,
            },
            IndexError::ConsumerPastProducer { consumer, producer } => {
                ProtocolViolation::IndexPastProducer {
                    ring: Ring::Request,
                    index: consumer,
                    limit: producer,
                }
            }
            IndexError::ConsumerBackwards { consumer, last } => ProtocolViolation::IndexBackwards {
                ring: Ring::Request,
                old: last,
                new: consumer,
            },
        },
        DomainProtocolError::DeviceInfo(what) => ProtocolViolation::BadDeviceInfo {
            what: what.to_string(),
        },
    }
}

/// Copies a client's `segments` into a buffer of the VMM's own (counted as a copy); `None`
/// when the client's memory cannot be read there.
fn gather(client: &GuestMem, segments: &Segments, counters: &ServiceCounters) -> Option<Vec<u8>> {
    let mut data = vec![0u8; usize::try_from(segments.len).ok()?];
    counters.copy(segments.len, || segments.read_into(client, &mut data).ok())?;
    Some(data)
}

/// Whether a disk's acknowledged writes must be logged for replay: when the VMM knows the
/// device has a volatile write cache, when it does not know, or when the domain says so (a
/// domain can turn the log on, never off).
fn keeps_write_log(known: Option<bool>, claimed_by_domain: bool) -> bool {
    known.unwrap_or(true) || claimed_by_domain
}

fn channel_op(o: Op) -> u16 {
    match o {
        Op::Read => op::READ,
        Op::Write => op::WRITE,
        Op::Flush => op::FLUSH,
        Op::WriteZeroes => op::WRITE_ZEROES,
        Op::Discard => op::DISCARD,
    }
}

fn virtio_status(channel_status: u16) -> u8 {
    match channel_status {
        cstatus::OK => status::OK,
        cstatus::UNSUPPORTED => status::UNSUPP,
        _ => status::IOERR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_log_is_the_vmms_call_and_a_domain_can_only_add_to_it() {
        // The VMM knows the cache is volatile: a domain that says otherwise changes nothing.
        assert!(keeps_write_log(Some(true), false));
        assert!(keeps_write_log(Some(true), true));
        // The VMM knows it is not: a domain that says it is turns the log on.
        assert!(!keeps_write_log(Some(false), false));
        assert!(keeps_write_log(Some(false), true));
        // The VMM does not know: logged, whatever the domain says.
        assert!(keeps_write_log(None, false));
    }
}
