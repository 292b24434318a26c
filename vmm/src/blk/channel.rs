//! The real path: a disk served by a driver domain over its channel, under a supervisor that
//! restarts the domain whenever it fails and replays what the clients are owed.
//!
//! Detection runs in the block service thread, on every pass (exits, protocol violations) or
//! every millisecond (heartbeat, request deadlines, DMA refused by the device): each source is a
//! [`FailureReason`]. On a failure the domain is torn down at once — its vCPU stopped, the device
//! quiesced (bus master off, function reset, DMA detached) before its memory is freed — and
//! every in-flight shadow entry goes back to the queue. Client requests keep arriving and
//! queue behind them; nothing is failed. When the policy's delay has passed a fresh domain boots
//! with the next epoch on the same device; once it is ready the writes a volatile write cache
//! may have dropped are replayed, then the queue in order. Completions are matched by tag and
//! epoch, so each client request completes exactly once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[cfg(feature = "fault-injection")]
use ddvm_abi::channel::fault;
use ddvm_abi::channel::ring::IndexError;
use ddvm_abi::channel::{device_flags, op, status as cstatus, DeviceInfo};
use ddvm_recovery::events::EventLog;
use ddvm_recovery::fault::FaultKind;
use ddvm_recovery::hook::HookRunner;
use ddvm_recovery::monitor::{AdaptiveDeadline, HeartbeatMonitor, ServiceClock};
use ddvm_recovery::policy::Policy;
use ddvm_recovery::reason::{FailureReason, OperatorAction, ProtocolViolation, Ring};
use ddvm_recovery::shadow::{LoggedWrite, Op, ShadowQueue, State, WriteLog};
use ddvm_recovery::supervisor::{Admission, Decision, Status, Supervisor};
use vm_memory::{Bytes, GuestAddress};

use super::backend::{DiskInfo, Finished};
use super::device::ClientPort;
use super::request::{status, Segments};
use super::service::{copy_part, Part, Pending, ServiceCounters};
use crate::channel::{DomainProtocolError, Done, HostChannel, SubmitError};
use crate::domain::{DeviceSpec, DeviceThread, Domain, DomainConfig, DomainDevice, DomainError};
use crate::hoststall::{DomainThread, Lost, StallMeter};
use crate::hypervisor::Hypervisor;
use crate::loader::Image;
use crate::memory::GuestMem;
use crate::vcpu::{DomainExit, RunState};

/// How often the slower detectors run.
const CHECK_EVERY: Duration = Duration::from_millis(1);
/// Most doublings of the boot timeout after boots that were not ready in time (16x).
const BOOT_BACKOFF_MAX: u32 = 4;
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
/// Boots that a `failed-restart` fault makes fail before ready when its argument is 0.
#[cfg(feature = "fault-injection")]
const FAILED_RESTARTS_DEFAULT: u32 = 2;

/// A request from outside the service thread (control socket, chaos runner, tests).
#[derive(Clone, Debug)]
pub enum Command {
    /// Inject a fault.
    Inject {
        /// Kind.
        kind: FaultKind,
        /// Its argument (see the ABI's `fault` module), 0 for the default.
        arg: u32,
    },
    /// Operator: kill the domain (a crash; the policy applies).
    Kill,
    /// Operator: restart the domain now (also leaves give-up).
    Restart,
    /// Operator: restart the domain on a new image without client errors.
    Update(Image),
}

/// One recovery, as observers see it.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryRecord {
    /// The last fault injected before the failure was detected (when, which kind), if any:
    /// the fault that led to it, unless that fault was detected only after the next injection.
    pub injected: Option<(Instant, FaultKind)>,
    /// When the failure was detected.
    pub detected: Instant,
    /// When the first client request completed after the restart.
    pub recovered: Instant,
}

/// What observers see of a recovering disk.
#[derive(Default)]
pub struct Observed {
    /// Supervisor status (refreshed by the service).
    pub status: Option<Status>,
    /// Shadow entries in flight / queued.
    pub in_flight: usize,
    /// Shadow entries queued.
    pub queued: usize,
    /// Recoveries so far.
    pub recovered: u64,
    /// Epochs of the warm standbys waiting for the next restarts, the next to serve first.
    pub standbys: Vec<u64>,
    /// Restarts that promoted a warm standby (the rest booted a fresh domain).
    pub promoted: u64,
    /// The last [`RECORDS`] recoveries.
    pub recoveries: VecDeque<RecoveryRecord>,
    /// Reason names of the last [`RECORDS`] detections.
    pub detections: VecDeque<(&'static str, Instant)>,
    /// Time the host kept the domain from running, left out of request ages.
    pub discounted: Duration,
    /// What the host took, by source, so far (the service's wait is measured, not discounted).
    pub stalls: Lost,
}

/// The handle others hold on a recovering disk.
#[derive(Clone)]
pub struct RecoveryHandle {
    commands: Arc<Mutex<VecDeque<Command>>>,
    // Set with every command, so the service looks at the queue (a lock) only when it has one.
    has_commands: Arc<AtomicBool>,
    wake: Arc<vmm_sys_util::eventfd::EventFd>,
    /// Events of the supervisor.
    pub events: Arc<Mutex<EventLog>>,
    /// Status and timings.
    pub observed: Arc<Mutex<Observed>>,
}

impl RecoveryHandle {
    /// Sends a command to the service thread.
    pub fn send(&self, c: Command) {
        lock(&self.commands).push_back(c);
        self.has_commands.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    /// A snapshot of what is observed.
    pub fn with<R>(&self, f: impl FnOnce(&Observed) -> R) -> R {
        f(&lock(&self.observed))
    }
}

/// Records kept of recent recoveries and detections (the counts in the supervisor's metrics
/// cover all of them).
pub const RECORDS: usize = 65_536;

fn push_record<T>(v: &mut VecDeque<T>, record: T) {
    if v.len() == RECORDS {
        v.pop_front();
    }
    v.push_back(record);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Live {
    domain: Domain,
    channel: HostChannel,
    epoch: u64,
}

/// The thread that boots a disk's warm standbys, one at a time. One thread for the disk's
/// life rather than one per boot: fewer threads come and go, and the allocator does not spread
/// each boot's memory over a fresh arena.
struct StandbyBooter {
    requests: Option<mpsc::Sender<(u64, DomainConfig)>>,
    results: mpsc::Receiver<Result<Domain, DomainError>>,
    thread: Option<JoinHandle<()>>,
    busy: bool,
}

impl StandbyBooter {
    fn start(hv: Arc<Hypervisor>, name: &str) -> std::io::Result<StandbyBooter> {
        let (requests, todo) = mpsc::channel::<(u64, DomainConfig)>();
        let (done, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("standby-{name}"))
            .spawn(move || {
                for (epoch, cfg) in todo {
                    if done.send(Domain::boot_standby(&hv, &cfg, epoch)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(StandbyBooter {
            requests: Some(requests),
            results,
            thread: Some(thread),
            busy: false,
        })
    }

    /// Whether a boot is under way (or done and not yet taken).
    fn busy(&self) -> bool {
        self.busy
    }

    fn boot(&mut self, epoch: u64, cfg: DomainConfig) {
        self.busy = self
            .requests
            .as_ref()
            .is_some_and(|r| r.send((epoch, cfg)).is_ok());
    }

    /// The booted standby (or why there is none), if a boot was asked for and is done
    /// (`wait`: waits for it).
    fn take(&mut self, wait: bool) -> Option<Result<Domain, DomainError>> {
        if !self.busy {
            return None;
        }
        let r = if wait {
            self.results
                .recv()
                .map_err(|_| mpsc::TryRecvError::Disconnected)
        } else {
            self.results.try_recv()
        };
        match r {
            Ok(r) => {
                self.busy = false;
                Some(r)
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.busy = false;
                tracing::warn!("the standby boot thread is gone");
                None
            }
        }
    }
}

impl Drop for StandbyBooter {
    fn drop(&mut self) {
        // The thread ends when its queue closes (after the boot under way, if any).
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Internal requests (not a client's): replayed writes and the VMM's own flushes.
enum Internal {
    /// A replayed write of these sectors (first, count).
    Replay(u64, u32),
    Flush(u64),
}

impl Internal {
    fn replayed(&self) -> Option<(u64, u32)> {
        match self {
            Internal::Replay(sector, sectors) => Some((*sector, *sectors)),
            Internal::Flush(_) => None,
        }
    }
}

/// Sector ranges of replayed writes not yet complete. A client part that overlaps one, or a
/// flush (which must cover them all), waits until they are: the device may run commands in
/// flight in any order, and a replayed write holds older data than a client's new one.
struct ReplayFence(Vec<(u64, u32)>);

impl ReplayFence {
    fn blocks(&self, op: Op, sector: u64, sectors: u32) -> bool {
        match op {
            _ if self.0.is_empty() => false,
            Op::Flush => true,
            Op::Read | Op::Write | Op::WriteZeroes | Op::Discard => {
                let end = sector.saturating_add(u64::from(sectors.max(1)));
                self.0
                    .iter()
                    .any(|&(s, n)| sector < s.saturating_add(u64::from(n)) && s < end)
            }
        }
    }
}

/// A driver domain serving the disk, with reincarnation.
pub struct ChannelBackend {
    hv: Arc<Hypervisor>,
    cfg: DomainConfig,
    device: Arc<DomainDevice>,
    live: Option<Live>,
    // A failed domain, stopped and quiesced, whose VM and memory are freed once its successor
    // serves (off the recovery path).
    retired: Option<Domain>,
    // The next domains, booted ahead and held before their device probe (policy `standbys`),
    // the next to serve first; and the thread that boots them (off the service thread: a boot
    // takes about a millisecond of it here).
    standbys: VecDeque<Domain>,
    booter: Option<StandbyBooter>,
    disk: DiskInfo,
    max_transfer: u32,
    sup: Supervisor,
    policy: Policy,
    heartbeat: HeartbeatMonitor,
    /// The request deadline in force: the policy's, or more where requests take longer.
    deadline: AdaptiveDeadline,
    /// Detection's clock: the wall clock less the time the host kept the domain from running,
    /// as `stalls` measures it. Posting times, the deadline and the heartbeat are on it.
    clock: ServiceClock,
    stalls: StallMeter,
    /// Boots in a row that were not ready in time: each doubles the next one's time, up to
    /// 2^[`BOOT_BACKOFF_MAX`] times (a host too busy to boot a domain in time is made busier
    /// by every retry).
    boot_timeouts: u32,
    hooks: HookRunner,
    wlog: Option<WriteLog>,
    // The bytes of each client write in flight (by shadow sequence number), as the VMM copied
    // them from the client, for the write log once the write is acknowledged: the copy in the
    // domain's bounce slot is the domain's to overwrite.
    write_data: HashMap<u64, Vec<u8>>,
    flush_marks: HashMap<u32, u64>,
    internal: HashMap<u32, Internal>,
    replay: VecDeque<LoggedWrite>,
    next_epoch: u64,
    restart_at: Option<Instant>,
    next_check: Instant,
    dma_refused: u64,
    injected_at: Option<(Instant, FaultKind)>,
    detected_at: Option<Instant>,
    #[cfg(feature = "fault-injection")]
    fault_on_next_boot: bool,
    // Faults (ABI codes and arguments) for the next boots to act on during their bring-up,
    // before ready: restarts that fail, or replays (the `failed-restart` and `failed-replay`
    // chaos faults).
    failing_boots: VecDeque<(u32, u32)>,
    failed: Vec<Finished>,
    done: Vec<Done>,
    handle: RecoveryHandle,
    // Set while a pass runs on the domain's own vCPU thread (in its wait exit), which must
    // not tear the domain down (that joins the thread): a failure found there waits here for
    // the service thread's next pass.
    on_domain_thread: bool,
    deferred: Option<FailureReason>,
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
    /// The policy is invalid.
    #[error("domain {name}: recovery policy: {message}")]
    Policy {
        /// Domain.
        name: String,
        /// What.
        message: String,
    },
}

impl ChannelBackend {
    /// Creates the domain's device, boots the domain and waits until it is ready. `cfg.device`
    /// must describe the device (an emulated NVMe controller).
    pub fn start(
        hv: Arc<Hypervisor>,
        mut cfg: DomainConfig,
        policy: Policy,
    ) -> Result<ChannelBackend, StartError> {
        let name = cfg.name.clone();
        let device = match &cfg.device {
            // The block service serves the device too: no thread hand-off per request.
            Some(DeviceSpec::EmulatedNvme(n)) => {
                DomainDevice::emulated_nvme(&name, n, DeviceThread::Owner)?
            }
            Some(DeviceSpec::Persistent(d)) => d.clone(),
            None => {
                return Err(StartError::Failed {
                    name,
                    reason: FailureReason::BootFailed {
                        message: "a disk domain needs a device".into(),
                    },
                })
            }
        };
        cfg.device = Some(DeviceSpec::Persistent(device.clone()));
        let sup = Supervisor::new(&name, policy.clone()).map_err(|e| StartError::Policy {
            name: name.clone(),
            message: e.to_string(),
        })?;
        let wake = Arc::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                crate::domain::DomainError::Host {
                    name: name.clone(),
                    what: "eventfd",
                    source,
                }
            })?,
        );
        let now = Instant::now();
        let handle = RecoveryHandle {
            commands: Arc::default(),
            has_commands: Arc::default(),
            wake,
            events: Arc::new(Mutex::new(EventLog::new(now, 4096))),
            observed: Arc::default(),
        };
        let mut b = ChannelBackend {
            hv,
            cfg,
            device,
            live: None,
            retired: None,
            standbys: VecDeque::new(),
            booter: None,
            disk: DiskInfo {
                sectors: 0,
                block_size: 512,
                discard: false,
                write_zeroes: false,
            },
            max_transfer: 0,
            heartbeat: HeartbeatMonitor::new(policy.detection.heartbeat_period),
            deadline: AdaptiveDeadline::new(policy.detection.request_deadline),
            clock: ServiceClock::new(now),
            stalls: StallMeter::new(),
            boot_timeouts: 0,
            sup,
            policy,
            hooks: HookRunner::default(),
            wlog: None,
            write_data: HashMap::new(),
            flush_marks: HashMap::new(),
            internal: HashMap::new(),
            replay: VecDeque::new(),
            next_epoch: 1,
            restart_at: None,
            next_check: now,
            dma_refused: 0,
            injected_at: None,
            detected_at: None,
            #[cfg(feature = "fault-injection")]
            fault_on_next_boot: false,
            failing_boots: VecDeque::new(),
            failed: Vec::new(),
            done: Vec::new(),
            handle,
            on_domain_thread: false,
            deferred: None,
        };
        let info = b.boot().map_err(|(_, reason)| StartError::Failed {
            name: name.clone(),
            reason,
        })?;
        b.disk = DiskInfo {
            sectors: info.capacity_sectors,
            block_size: info.block_size,
            discard: info.flags & device_flags::DISCARD != 0,
            write_zeroes: info.flags & device_flags::WRITE_ZEROES != 0,
        };
        b.max_transfer = info.max_transfer;
        b.prepare_standby();
        b.publish(&ShadowQueue::new());
        Ok(b)
    }

    /// The handle for commands, events and status.
    pub fn handle(&self) -> RecoveryHandle {
        self.handle.clone()
    }

    /// The geometry.
    pub fn disk(&self) -> DiskInfo {
        self.disk
    }

    /// Largest part.
    pub fn max_transfer(&self) -> u32 {
        self.max_transfer
    }

    /// The running domain, if one is up.
    pub fn domain(&self) -> Option<&Domain> {
        self.live.as_ref().map(|l| &l.domain)
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        &self.sup
    }

    /// Lets the device's domains run `pass` on their vCPU thread when they wait (see
    /// [`DomainDevice::wait_work`]); `None` stops it.
    pub fn set_domain_thread_pass(&self, pass: Option<crate::domain::OwnerPass>) {
        self.device.set_owner_pass(pass);
    }

    /// Marks the passes that follow as running on the domain's vCPU thread (or not): there,
    /// failures are deferred to the service thread, and neither detection, commands nor
    /// restarts run.
    pub fn set_on_domain_thread(&mut self, on: bool) {
        self.on_domain_thread = on;
    }

    /// The device's counters.
    pub fn device_stats(&self) -> ddvm_passthrough::NvmeStats {
        self.device.stats()
    }

    /// The warm standbys that are up (policy `standbys`), the next to serve first.
    pub fn standbys(&self) -> impl Iterator<Item = &Domain> {
        self.standbys.iter()
    }

    /// Starts booting a warm standby with the next epoch on the disk's standby thread, unless
    /// the policy's number are up, or one is on its way. A standby that cannot be booted is
    /// not an error: the next restart boots cold.
    fn prepare_standby(&mut self) {
        if self.standbys.len() >= self.policy.restart.standbys as usize
            || self.booter.as_ref().is_some_and(StandbyBooter::busy)
            || self.sup.is_broken()
        {
            return;
        }
        if self.booter.is_none() {
            match StandbyBooter::start(self.hv.clone(), &self.cfg.name) {
                Ok(b) => self.booter = Some(b),
                Err(e) => {
                    tracing::warn!("domain {}: no warm standby: {e}", self.cfg.name);
                    return;
                }
            }
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        if let Some(b) = self.booter.as_mut() {
            b.boot(epoch, self.cfg.clone());
        }
    }

    /// Takes the standby from its thread once it is booted (`wait`: waits for it). Returns
    /// whether one arrived.
    fn collect_standby(&mut self, wait: bool) -> bool {
        match self.booter.as_mut().and_then(|b| b.take(wait)) {
            Some(Ok(d)) => {
                self.standbys.push_back(d);
                true
            }
            Some(Err(e)) => {
                tracing::warn!("domain {}: no warm standby: {e}", self.cfg.name);
                false
            }
            None => false,
        }
    }

    /// Stops the standbys (and waits for one still booting).
    fn drop_standbys(&mut self) {
        self.collect_standby(true);
        self.standbys.clear();
    }

    /// The standby promoted to serve, if there is a usable one: the oldest (one still booting
    /// is waited for: it is further along than a cold boot would be).
    /// `bring_up_fault`: a fault (ABI code) for it to act on during its bring-up, put in its
    /// channel header before it is let go.
    fn promote_standby(&mut self, bring_up_fault: Option<(u32, u32)>) -> Option<Domain> {
        if self.standbys.is_empty() {
            self.collect_standby(true);
        }
        while let Some(mut d) = self.standbys.pop_front() {
            if let Some((code, arg)) = bring_up_fault {
                d.arm_fault(code, arg);
            }
            match d.promote() {
                Ok(()) => return Some(d),
                Err(e) => tracing::warn!("domain {}: {e}; dropping it", self.cfg.name),
            }
        }
        None
    }

    /// Brings up the next domain and waits for it to be ready: the oldest standby if there is
    /// one, else a fresh boot with the next epoch. (The pool refills once the recovery has
    /// served a client, in `collect`.) A domain that fails before it is ready is a failure of
    /// the epoch that was booting: the error carries that epoch for [`Self::fail_epoch`].
    fn boot(&mut self) -> Result<DeviceInfo, (u64, FailureReason)> {
        let now = Instant::now();
        let bring_up_fault = self.failing_boots.pop_front();
        let mut promoted = self.promote_standby(bring_up_fault);
        let epoch = promoted.as_ref().map_or(self.next_epoch, Domain::epoch);
        if let Err(e) = self.sup.boot_started(epoch, now) {
            self.supervisor_bug("boot_started", epoch, &e);
        }
        let how = if promoted.is_some() {
            lock(&self.handle.observed).promoted += 1;
            "standby promoted"
        } else {
            "vm created"
        };
        let domain = match promoted.take() {
            Some(d) => d,
            None => {
                self.next_epoch += 1;
                let booted = match bring_up_fault {
                    Some((code, arg)) => {
                        let mut cfg = self.cfg.clone();
                        let fault = format!("boot_fault={code} boot_fault_arg={arg}");
                        cfg.cmdline = format!("{} {fault}", cfg.cmdline).trim_start().to_string();
                        Domain::boot(&self.hv, &cfg, epoch)
                    }
                    None => Domain::boot(&self.hv, &self.cfg, epoch),
                };
                booted.map_err(|e| {
                    let message = e.to_string();
                    (epoch, FailureReason::BootFailed { message })
                })?
            }
        };
        let created = Instant::now();
        let base = self.policy.detection.boot_timeout;
        let cap = base.saturating_mul(1 << BOOT_BACKOFF_MAX);
        let timeout = ddvm_recovery::policy::doubled(base, self.boot_timeouts, cap);
        match domain.wait_ready(timeout) {
            Ok(_) => {
                self.boot_timeouts = 0;
                tracing::debug!(
                    "domain {} epoch {epoch}: {how} in {:?}, ready {:?} later",
                    self.cfg.name,
                    created - now,
                    created.elapsed()
                )
            }
            Err(RunState::Stopped(exit)) => return Err((epoch, exit_reason(&exit))),
            Err(_) => {
                self.boot_timeouts = self.boot_timeouts.saturating_add(1);
                return Err((epoch, FailureReason::BootTimeout { waited: timeout }));
            }
        }
        let (Some(base), Some(header)) = (domain.channel(), domain.channel_header()) else {
            let message = "the domain has no channel".into();
            return Err((epoch, FailureReason::BootFailed { message }));
        };
        let mut channel = HostChannel::new(base, header);
        let info = channel
            .device_info(domain.memory())
            .map_err(|e| (epoch, FailureReason::Protocol(violation(e))))?;
        if self.disk.sectors != 0
            && (info.capacity_sectors != self.disk.sectors
                || info.block_size != self.disk.block_size)
        {
            let what = "the disk changed geometry across a restart".into();
            return Err((
                epoch,
                FailureReason::Protocol(ProtocolViolation::BadDeviceInfo { what }),
            ));
        }
        if let Err(e) = self.sup.ready(epoch, Instant::now()) {
            self.supervisor_bug("ready", epoch, &e);
        }
        // Whether writes must be logged is the VMM's own knowledge of the device, checked at
        // every boot; a domain that claims a volatile cache adds to it, never takes it away.
        let claimed = info.flags & device_flags::VOLATILE_WRITE_CACHE != 0;
        if keeps_write_log(self.device.volatile_write_cache(), claimed) && self.wlog.is_none() {
            self.wlog = Some(WriteLog::new());
        }
        self.heartbeat.reset();
        // DMA the quiesce cut off while the old domain died is not this domain's doing.
        self.dma_refused = self.device.stats().dma_refused;
        self.flush_marks.clear();
        self.internal.clear();
        // Every domain that comes up replays, first, what a reset may have dropped from the
        // device's cache: however many attempts failed before this one (a first boot has
        // nothing logged).
        self.replay = self
            .wlog
            .as_ref()
            .map(|l| l.pending().iter().cloned().collect())
            .unwrap_or_default();
        self.live = Some(Live {
            domain,
            channel,
            epoch,
        });
        #[cfg(feature = "fault-injection")]
        if std::mem::take(&mut self.fault_on_next_boot) {
            // A fault during recovery: the fresh domain dies before its replay is done.
            self.inject(FaultKind::Panic, 0);
        }
        Ok(info)
    }

    /// A supervisor transition the VMM asked for was refused: the VMM's bookkeeping is wrong.
    /// Recovery goes on (what clients are owed is the shadow queue's and the write log's, not
    /// the supervisor's), but the bug is reported.
    fn supervisor_bug(&self, call: &str, epoch: u64, e: &dyn std::fmt::Display) {
        tracing::error!(
            "domain {}: VMM bug: the supervisor refused {call} for epoch {epoch}: {e}",
            self.cfg.name
        );
    }

    /// Tears the domain down and lets the policy decide what happens next.
    fn fail(&mut self, reason: FailureReason, shadow: &mut ShadowQueue<Part>) {
        if self.on_domain_thread {
            // The first failure is the reason; the service thread acts on it.
            self.deferred.get_or_insert(reason);
            let _ = self.handle.wake.write(1);
            return;
        }
        let epoch = match &self.live {
            Some(l) => l.epoch,
            // Nothing is live: the failure is the latest boot's.
            None => self.sup.epoch().unwrap_or(0),
        };
        self.fail_epoch(epoch, reason, shadow);
    }

    /// Tears the domain of `epoch` down (if it is the live one) and lets the policy decide
    /// what happens next: a domain that failed before it was ready (never live) is a failure
    /// like any other — backoff, the window's count, the hook and give-up apply.
    fn fail_epoch(&mut self, epoch: u64, reason: FailureReason, shadow: &mut ShadowQueue<Part>) {
        let now = Instant::now();
        let name = reason.name();
        tracing::warn!("domain {}: failed ({reason}); recovering", self.cfg.name);
        push_record(&mut lock(&self.handle.observed).detections, (name, now));
        if self.detected_at.is_none() {
            self.detected_at = Some(now);
        }
        let decision = self.sup.failure(epoch, reason, now);
        self.tear_down(shadow);
        match decision {
            Decision::Restart { at, .. } => self.restart_at = Some(at),
            Decision::GiveUp(_) => {
                self.restart_at = None;
                if let Some(log) = self.wlog.as_ref().filter(|l| !l.is_empty()) {
                    tracing::error!(
                        "domain {}: gave up with {} acknowledged write(s) ({} bytes) not known \
                         to be durable; they are kept and replayed if an operator restarts it",
                        self.cfg.name,
                        log.len(),
                        log.bytes()
                    );
                }
            }
            Decision::Ignored => {
                // Every failure the VMM reports is of the domain it booted last: the
                // supervisor ignoring one means the two disagree.
                tracing::error!(
                    "domain {}: VMM bug: the supervisor ignored a failure of epoch {epoch} \
                     (state {})",
                    self.cfg.name,
                    self.sup.state().name()
                );
                if self.restart_at.is_none() && !self.sup.is_broken() {
                    self.restart_at = Some(now);
                }
            }
        }
        if let Some(call) = self.sup.take_hook_call() {
            self.hooks.spawn(call, now);
        }
        self.publish(shadow);
    }

    /// Runs the detectors, commands, hooks and a due restart.
    fn tend(&mut self, shadow: &mut ShadowQueue<Part>) {
        let now = Instant::now();
        // Free a retired domain once recovery is over (or given up).
        if self.retired.is_some() && (self.detected_at.is_none() || self.sup.is_broken()) {
            self.retired = None;
        }
        if self.collect_standby(false) {
            // The pool fills one standby at a time.
            if self.live.is_some() {
                self.prepare_standby();
            }
            self.publish(shadow);
        }
        if self.sup.is_broken()
            && (!self.standbys.is_empty() || self.booter.as_ref().is_some_and(StandbyBooter::busy))
        {
            self.drop_standbys();
            self.publish(shadow);
        }
        if self.handle.has_commands.swap(false, Ordering::Acquire) {
            let commands: Vec<Command> = lock(&self.handle.commands).drain(..).collect();
            for c in commands {
                self.command(c, shadow);
            }
        }
        // Hooks may outlive the domain (and a give-up): reap them whatever its state.
        if self.hooks.running() > 0 {
            for report in self.hooks.poll(now) {
                self.sup.hook_finished(&report, now);
            }
        }
        if self.live.is_none() {
            if self.restart_at.is_some_and(|t| now >= t) {
                self.restart_at = None;
                if let Err((epoch, reason)) = self.boot() {
                    self.fail_epoch(epoch, reason, shadow);
                }
                self.publish(shadow);
            }
            return;
        }
        if now < self.next_check {
            return;
        }
        self.next_check = now + CHECK_EVERY;
        let domain = self.live.as_ref().and_then(|l| {
            Some(DomainThread {
                key: l.epoch,
                tid: l.domain.vcpu_tid()?,
                ran: l.domain.vcpu_cpu_time(),
            })
        });
        let lost = self.stalls.sample(now, domain);
        self.clock.stalled(now, lost.total());
        let service_now = self.clock.at(now);
        // A standby that died is a bug in the image rather than a fault of the live domain: it
        // is not replaced until the next restart (one that always dies would boot in a loop).
        let before = self.standbys.len();
        let name = &self.cfg.name;
        self.standbys.retain(|d| match d.has_stopped() {
            Some(exit) => {
                tracing::warn!("domain {name}: a warm standby stopped ({exit}); dropping it");
                false
            }
            None => true,
        });
        if self.standbys.len() != before {
            self.publish(shadow);
        }
        // Copies of writes whose entries left the queue some other way (a client's reset).
        if !self.write_data.is_empty() {
            self.write_data.retain(|&seq, _| shadow.contains(seq));
        }
        if let Some(reason) = self.detect(service_now, shadow) {
            let t = self.stalls.so_far();
            tracing::info!(
                "domain {}: host stalls discounted so far: {:?} (steal {:?}, service waited \
                 {:?}, domain waited {:?})",
                self.cfg.name,
                self.clock.lost(),
                t.steal,
                t.service,
                t.domain
            );
            self.fail(reason, shadow);
        }
        self.publish(shadow);
    }

    /// The detectors, at `service_now` on the service clock (which leaves out steal and the
    /// domain's waits for a CPU). The heartbeat also needs the vCPU to have *run* the period:
    /// a thread's CPU clock on a VM may count stolen time as run time (measured: a heartbeat
    /// detection of a starved domain under 7 s of steal), so the clock guards it too.
    fn detect(
        &mut self,
        service_now: Instant,
        shadow: &ShadowQueue<Part>,
    ) -> Option<FailureReason> {
        let live = self.live.as_ref()?;
        if let Some(exit) = live.domain.has_stopped() {
            return Some(exit_reason(&exit));
        }
        if live.domain.is_waiting() {
            self.heartbeat.touch(service_now);
        } else if let Some(hb) = live.domain.heartbeat() {
            let ran = live.domain.vcpu_cpu_time();
            if let Some(r) = self.heartbeat.sample_running(hb, service_now, ran) {
                return Some(r);
            }
        }
        if let Some(r) = self.deadline.check(shadow.oldest_in_flight(), service_now) {
            self.deadline.expired();
            return Some(r);
        }
        let refused = self.device.stats().dma_refused;
        if refused > self.dma_refused {
            let count = refused - self.dma_refused;
            self.dma_refused = refused;
            return Some(FailureReason::DmaRefused { count });
        }
        None
    }

    fn command(&mut self, c: Command, shadow: &mut ShadowQueue<Part>) {
        let now = Instant::now();
        match c {
            #[cfg(not(feature = "fault-injection"))]
            Command::Inject { .. } => {
                tracing::warn!(
                    "fault injection refused: built without the fault-injection feature"
                );
            }
            #[cfg(feature = "fault-injection")]
            Command::Inject { kind, arg } => {
                self.injected_at = Some((now, kind));
                self.sup.fault_injected(now);
                match kind {
                    // A kill, and the fresh domain panics before its replay is done.
                    FaultKind::DuringRecovery => {
                        self.fault_on_next_boot = true;
                        self.kill_now(shadow);
                    }
                    FaultKind::Kill => self.kill_now(shadow),
                    // A kill, and the next restarts fail before ready.
                    FaultKind::FailedRestart => {
                        self.failing_boots = failing_boots(arg);
                        self.kill_now(shadow);
                    }
                    // A kill, and the next domain fails the first write replayed to it.
                    FaultKind::FailedReplay => {
                        let first = self.wlog.as_ref().and_then(|l| {
                            let w = l.pending().iter().find(|w| w.op == Op::Write)?;
                            u32::try_from(w.sector).ok()
                        });
                        match first {
                            Some(sector) => {
                                self.failing_boots = [(fault::FAIL_WRITE, sector)].into();
                            }
                            None => tracing::info!(
                                "domain {}: failed-replay: no logged write to replay; a kill",
                                self.cfg.name
                            ),
                        }
                        self.kill_now(shadow);
                    }
                    _ => self.inject(kind, arg),
                }
            }
            Command::Kill => self.kill_now(shadow),
            Command::Restart | Command::Update(_) => {
                let action = match &c {
                    Command::Update(image) => {
                        let name = image.name().display().to_string();
                        self.cfg.image = image.clone();
                        // They run the old image.
                        self.drop_standbys();
                        OperatorAction::Update { image: name }
                    }
                    _ => OperatorAction::Restart,
                };
                match self.sup.operator(action, now) {
                    Ok(decision) => {
                        self.tear_down(shadow);
                        if let Decision::Restart { at, .. } = decision {
                            self.restart_at = Some(at);
                        }
                    }
                    // Only a stopped supervisor refuses, and a stopped disk takes no commands.
                    Err(e) => {
                        let epoch = self.sup.epoch().unwrap_or(0);
                        self.supervisor_bug("operator", epoch, &e);
                    }
                }
            }
        }
    }

    /// Retires the domain — stops the vCPU and quiesces the device; its VM and memory are freed
    /// once the next domain serves — and puts everything it had in flight back in the queue.
    fn tear_down(&mut self, shadow: &mut ShadowQueue<Part>) {
        let t = Instant::now();
        if let Some(mut live) = self.live.take() {
            live.domain.retire();
            self.retired = Some(live.domain);
        }
        tracing::debug!("domain {}: torn down in {:?}", self.cfg.name, t.elapsed());
        shadow.domain_lost();
        self.replay.clear();
    }

    /// Abrupt teardown by the VMM (the `kill` fault and `ddvm ctl kill`).
    fn kill_now(&mut self, shadow: &mut ShadowQueue<Part>) {
        if self.live.is_some() {
            self.fail(FailureReason::Operator(OperatorAction::Kill), shadow);
        }
    }

    /// Asks the running domain to fault.
    #[cfg(feature = "fault-injection")]
    fn inject(&mut self, kind: FaultKind, arg: u32) {
        let Some(live) = &self.live else { return };
        let code = match kind {
            FaultKind::Panic => fault::PANIC,
            FaultKind::Hang => fault::HANG,
            FaultKind::Exception => fault::INVALID_OPCODE,
            FaultKind::TripleFault => fault::TRIPLE_FAULT,
            FaultKind::WildWrite => fault::WILD_WRITE,
            FaultKind::BogusTag => fault::BOGUS_TAG,
            FaultKind::BogusLen => fault::BOGUS_LEN,
            FaultKind::StaleEpoch => fault::STALE_EPOCH,
            FaultKind::DmaOutside => fault::DMA_OUTSIDE,
            FaultKind::Slow => fault::SLOW,
            FaultKind::Bitflip => fault::BITFLIP,
            FaultKind::Kill
            | FaultKind::DuringRecovery
            | FaultKind::FailedRestart
            | FaultKind::FailedReplay => return,
        };
        let arg = match (kind, arg) {
            // Slower than the request deadline, for 4 completions: five times it, so that it
            // is still slower when the host takes four fifths of the time away (which
            // detection leaves out; measured with spinning threads on both cores).
            (FaultKind::Slow, 0) => {
                let ms = (self.deadline.current().as_millis() * 5 + 20).min(0xffff) as u32;
                ms | 4 << 16
            }
            // Enough flipped bits to matter, most of the time.
            (FaultKind::Bitflip, 0) => 2000,
            (FaultKind::WildWrite, 0) => fault::WILD_WRITE_PRODUCER,
            _ => arg,
        };
        live.domain.request_fault_with(code, arg);
    }

    /// Refreshes what observers see and moves supervisor events to the log.
    fn publish(&mut self, shadow: &ShadowQueue<Part>) {
        self.sup.drain_into(&mut lock(&self.handle.events));
        let mut o = lock(&self.handle.observed);
        o.status = Some(self.sup.status(Instant::now()));
        o.in_flight = shadow.in_flight();
        o.queued = shadow.queued();
        o.standbys = self.standbys.iter().map(Domain::epoch).collect();
        o.discounted = self.clock.lost();
        o.stalls = self.stalls.so_far();
    }

    /// Posts replayed writes, then queued parts, while the channel has room.
    pub fn post(
        &mut self,
        shadow: &mut ShadowQueue<Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
    ) -> usize {
        if !self.on_domain_thread {
            if let Some(reason) = self.deferred.take() {
                self.fail(reason, shadow);
            }
            self.tend(shadow);
        }
        if self.deferred.is_some() {
            return 0;
        }
        if self.sup.admission() == Admission::Fail {
            // Given up: every owed request is failed, as MINIX pushes errors up.
            for e in shadow.drain() {
                self.failed.push(Finished {
                    part: e.client,
                    status: status::IOERR,
                });
            }
            self.write_data.clear();
            return 0;
        }
        let Some(live) = self.live.as_mut() else {
            return 0;
        };
        let mem = live.domain.memory().clone();
        let mut n = 0;
        let mut broken = false;
        // 1. Client parts, oldest first. After a restart they go ahead of the writes being
        //    replayed, except where they overlap one (or are flushes), and those behind them
        //    that overlap them: clients are served again at once, not after the whole log.
        let mut fence = ReplayFence(
            self.replay
                .iter()
                .map(|w| (w.sector, w.sectors))
                .chain(self.internal.values().filter_map(Internal::replayed))
                .collect(),
        );
        let log_full = self.wlog.as_ref().is_some_and(|l| {
            l.bytes() > WRITE_LOG_HARD_LIMIT || l.len() > WRITE_LOG_ENTRY_HARD_LIMIT
        });
        let mut passed = None;
        while !broken && live.channel.has_room() {
            let next = match passed {
                None => shadow.next_queued(),
                Some(seq) => shadow.next_queued_after(seq),
            };
            let Some(e) = next else { break };
            let (seq, o, sector, sectors, part) = (e.seq, e.op, e.sector, e.sectors, e.client);
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
                self.write_data.remove(&seq);
                continue;
            };
            let client = &ports[p.port].mem;
            // With a write log, the VMM keeps its own copy of what the client gave (once: a
            // write posted again after a restart sends the same bytes).
            let capture = o == Op::Write && self.wlog.is_some();
            if capture && !self.write_data.contains_key(&seq) {
                let segments = p.data.slice(part.offset, part.len);
                match gather(client, &segments, counters) {
                    Some(data) => {
                        self.write_data.insert(seq, data);
                    }
                    None => {
                        shadow.remove(seq);
                        self.failed.push(Finished {
                            part,
                            status: status::IOERR,
                        });
                        continue;
                    }
                }
            }
            let data = self.write_data.get(&seq).filter(|_| capture);
            let r =
                live.channel
                    .submit_with(
                        &mem,
                        channel_op(o),
                        sector,
                        sectors,
                        |dmem, gpa, len| match data {
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
                        },
                    );
            match r {
                Ok(tag) => {
                    shadow.posted(seq, tag, live.epoch, self.clock.at(Instant::now()));
                    if o == Op::Flush {
                        if let Some(log) = &self.wlog {
                            self.flush_marks.insert(tag, log.flush_posted());
                        }
                    }
                    n += 1;
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::Broken) => broken = true,
                Err(SubmitError::TooLarge { .. }) => {
                    // Parts are cut to the channel's limit; never reached.
                    shadow.remove(seq);
                }
            }
        }
        // 2. Writes a reset may have dropped from the device's cache, in order: one waits
        //    for an earlier one it overlaps (the device may reorder commands in flight).
        let mut fence = ReplayFence(
            self.internal
                .values()
                .filter_map(Internal::replayed)
                .collect(),
        );
        while !broken && live.channel.has_room() {
            let Some(w) = self.replay.front() else {
                break;
            };
            if fence.blocks(w.op, w.sector, w.sectors) {
                break;
            }
            let r = live.channel.submit_with(
                &mem,
                channel_op(w.op),
                w.sector,
                w.sectors,
                |m, gpa, _| {
                    let _ = m.write_slice(&w.data, GuestAddress(gpa));
                },
            );
            match r {
                Ok(tag) => {
                    self.internal
                        .insert(tag, Internal::Replay(w.sector, w.sectors));
                    fence.0.push((w.sector, w.sectors));
                    self.replay.pop_front();
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
        if let Some(log) = &self.wlog {
            let flushing = self
                .internal
                .values()
                .any(|i| matches!(i, Internal::Flush(_)));
            if (log.bytes() > WRITE_LOG_LIMIT || log.len() > WRITE_LOG_ENTRY_LIMIT)
                && !flushing
                && fence.0.is_empty()
                && self.replay.is_empty()
                && live.channel.has_room()
            {
                let mark = log.flush_posted();
                if let Ok(tag) = live.channel.submit(&mem, op::FLUSH, 0, 0, None) {
                    self.internal.insert(tag, Internal::Flush(mark));
                    n += 1;
                }
            }
        }
        if n > 0 && live.channel.publish(&mem) {
            live.domain.kick();
        }
        if broken {
            let reason = live
                .channel
                .broken()
                .map(|e| FailureReason::Protocol(violation(e)))
                .unwrap_or(FailureReason::BootFailed {
                    message: "channel refused service".into(),
                });
            self.fail(reason, shadow);
        }
        n
    }

    /// Takes completions; copies read data to clients; records acknowledged writes.
    pub fn collect(
        &mut self,
        shadow: &mut ShadowQueue<Part>,
        pending: &HashMap<u64, Pending>,
        ports: &[Arc<ClientPort>],
        counters: &ServiceCounters,
        out: &mut Vec<Finished>,
    ) -> usize {
        out.append(&mut self.failed);
        if self.deferred.is_some() {
            return 0;
        }
        let Some(live) = self.live.as_mut() else {
            return 0;
        };
        // The device first: what the domain submitted since the last pass completes now.
        let device_work = self.device.poll() as usize;
        let mem = live.domain.memory().clone();
        self.done.clear();
        let polled = live.channel.poll(&mem, &mut self.done);
        // One clock read per pass that has completions (none on an idle poll).
        // The supervisor and the records are on the wall clock; request latencies on the
        // service clock, as their posting times are.
        let now = (!self.done.is_empty()).then(Instant::now);
        let service_now = now.map(|t| self.clock.at(t));
        // An error the device reports because the driver aimed its DMA outside the domain is
        // the driver's fault, not the medium's: recover, and replay the request.
        if self.done.iter().any(|d| d.status != cstatus::OK) {
            let refused = self.device.stats().dma_refused;
            if refused > self.dma_refused {
                let count = refused - self.dma_refused;
                self.dma_refused = refused;
                self.fail(FailureReason::DmaRefused { count }, shadow);
                return 0;
            }
        }
        let Some(live) = self.live.as_mut() else {
            return 0;
        };
        let mut n = 0;
        let mut replay_failed = None;
        for d in std::mem::take(&mut self.done) {
            let tag = d.request.tag;
            let ok = d.status == cstatus::OK;
            if let Some(internal) = self.internal.remove(&tag) {
                match internal {
                    Internal::Flush(mark) if ok => {
                        if let Some(log) = self.wlog.as_mut() {
                            log.flush_completed(mark);
                        }
                    }
                    // An acknowledged write that could not be made good again: never dropped.
                    // It stays in the log, and the domain has failed: the next one replays it.
                    Internal::Replay(sector, sectors) if !ok => {
                        replay_failed.get_or_insert(FailureReason::ReplayFailed {
                            sector,
                            sectors,
                            status: d.status,
                        });
                    }
                    _ => {}
                }
                live.channel.finish(&mem, &d, None);
                continue;
            }
            let Ok(entry) = shadow.complete(tag, live.epoch) else {
                // The channel checked the tag against its own table, which the shadow queue
                // mirrors: a miss is a VMM bug. Say so, free the slot, and keep serving.
                tracing::error!(
                    "domain {}: completion for tag {tag} has no shadow entry",
                    self.cfg.name
                );
                live.channel.finish(&mem, &d, None);
                continue;
            };
            if let (State::InFlight { posted, .. }, Some(now)) = (entry.state, service_now) {
                self.deadline
                    .completed(now.saturating_duration_since(posted));
            }
            let part = entry.client;
            let mut st = virtio_status(d.status);
            let slot = live.channel.slot_address(&d);
            let written = self.write_data.remove(&entry.seq);
            match entry.op {
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
                    if let Some(log) = self.wlog.as_mut() {
                        // The bytes the VMM copied from the client when it posted the write
                        // (never a read-back of the bounce slot, which the domain can write).
                        let data = match (entry.op, written) {
                            (Op::Write, Some(data)) => data,
                            (Op::Write, None) => {
                                tracing::error!(
                                    "domain {}: VMM bug: write at sector {} acknowledged with \
                                     no copy for the write log",
                                    self.cfg.name,
                                    entry.sector
                                );
                                Vec::new()
                            }
                            _ => Vec::new(),
                        };
                        log.acknowledged(entry.op, entry.sector, entry.sectors, data);
                    }
                }
                Op::Flush if ok => {
                    if let (Some(mark), Some(log)) =
                        (self.flush_marks.remove(&tag), self.wlog.as_mut())
                    {
                        log.flush_completed(mark);
                    }
                }
                _ => {}
            }
            live.channel.finish(&mem, &d, None);
            out.push(Finished { part, status: st });
            n += 1;
        }
        if let (true, Some(now)) = (n > 0, now) {
            if let Some(took) = self.sup.completed(now) {
                if let Some(detected) = self.detected_at.take() {
                    // The pool refills once the clients are served again: a standby's boot
                    // would take CPU from the recovery (the other standby covers a failure
                    // meanwhile).
                    self.prepare_standby();
                    let injected = self.injected_at.take();
                    let mut o = lock(&self.handle.observed);
                    o.recovered += 1;
                    push_record(
                        &mut o.recoveries,
                        RecoveryRecord {
                            injected,
                            detected,
                            recovered: now,
                        },
                    );
                    tracing::info!("domain {}: recovered in {took:?}", self.cfg.name);
                }
            }
            if replay_failed.is_none()
                && matches!(
                    self.sup.state(),
                    ddvm_recovery::supervisor::State::Replaying { .. }
                )
                && self.replay.is_empty()
            {
                if let Err(e) = self.sup.replay_done(n, now) {
                    let epoch = self.live.as_ref().map_or(0, |l| l.epoch);
                    self.supervisor_bug("replay_done", epoch, &e);
                }
            }
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
        if !self.failed.is_empty() || self.deferred.is_some() {
            return true;
        }
        let Some(live) = self.live.as_mut() else {
            // Down: wake for the restart.
            return self.restart_at.is_some();
        };
        let mem = live.domain.memory().clone();
        live.channel.set_notify(&mem, on);
        if !on {
            let _ = live.domain.notify_eventfd().read();
            self.device.clear();
            return false;
        }
        self.device.arm()
            || live.channel.poll_pending(&mem).unwrap_or(true)
            || live.domain.has_stopped().is_some()
    }

    /// Eventfds that wake the service: completions (and the domain stopping), commands.
    pub fn wait_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let mut v = vec![self.handle.wake.as_raw_fd()];
        if let Some(l) = &self.live {
            v.push(l.domain.notify_eventfd().as_raw_fd());
            v.extend(self.device.eventfd());
        }
        v
    }

    /// How long the service may sleep: until the next check while a domain runs, the
    /// restart time while it is down.
    pub fn sleep_limit(&self) -> Duration {
        let now = Instant::now();
        match (&self.live, self.restart_at) {
            (None, Some(t)) => t.saturating_duration_since(now),
            (Some(_), _) => Duration::from_millis(5),
            (None, None) => Duration::from_millis(50),
        }
    }
}

impl Drop for ChannelBackend {
    fn drop(&mut self) {
        self.sup.stop(Instant::now());
        // The domain (and with it the device's hold on its memory) goes first.
        self.live = None;
        self.retired = None;
    }
}

/// The reason for a domain's exit.
pub fn exit_reason(exit: &DomainExit) -> FailureReason {
    match exit {
        DomainExit::Shutdown => FailureReason::Shutdown,
        DomainExit::InternalError { suberror } => FailureReason::InternalError {
            suberror: *suberror,
        },
        DomainExit::FailedEntry { reason } => FailureReason::FailedEntry { reason: *reason },
        DomainExit::Panicked { message } => FailureReason::Panic {
            message: message.clone(),
        },
        DomainExit::Exception {
            vector,
            rip,
            error_code,
            cr2,
        } => FailureReason::Exception {
            vector: *vector,
            rip: *rip,
            error_code: *error_code,
            cr2: *cr2,
        },
        DomainExit::BadPanicReport { value } => FailureReason::BadPanicReport { value: *value },
        DomainExit::Halted => FailureReason::Halted,
        DomainExit::Exited { status } => FailureReason::ExitedUnexpectedly { status: *status },
        DomainExit::Unexpected { exit } => FailureReason::UnexpectedExit { exit: exit.clone() },
        DomainExit::HostError { errno } => FailureReason::UnexpectedExit {
            exit: format!("KVM_RUN failed: errno {errno}"),
        },
        DomainExit::Stopped => FailureReason::Operator(OperatorAction::Kill),
        // Driver domains have no reset line; a guest that has one and uses it is gone.
        DomainExit::Reset => FailureReason::UnexpectedExit {
            exit: "reset".into(),
        },
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
        DomainProtocolError::LengthOverRequest { tag, len, max } => {
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
    let len = usize::try_from(segments.len).ok()?;
    counters.copy(segments.len, || {
        let mut data = vec![0u8; len];
        let mut pos = 0usize;
        for &(addr, n) in &segments.runs {
            let end = pos.checked_add(n as usize).filter(|&e| e <= len)?;
            client
                .read_slice(&mut data[pos..end], GuestAddress(addr))
                .ok()?;
            pos = end;
        }
        Some(data)
    })
}

/// What the boots after a `failed-restart` fault with `arg` do during bring-up (ABI fault codes
/// and arguments, one per boot): `arg & 0xff` boots fail ([`FAILED_RESTARTS_DEFAULT`] for 0),
/// alternately dying (a panic) and hanging until the boot timeout fails them; with bit 8
/// (0x100) set every one hangs, with bit 9 (0x200) every one dies.
#[cfg(feature = "fault-injection")]
fn failing_boots(arg: u32) -> VecDeque<(u32, u32)> {
    let n = match arg & 0xff {
        0 => FAILED_RESTARTS_DEFAULT,
        n => n,
    };
    (0..n)
        .map(|i| {
            let hang = match arg & 0x300 {
                0x100 => true,
                0x200 => false,
                _ => i % 2 == 1,
            };
            (if hang { fault::HANG } else { fault::PANIC }, 0)
        })
        .collect()
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

    #[test]
    #[cfg(feature = "fault-injection")]
    fn failed_restart_arguments_choose_how_many_boots_fail_and_how() {
        use fault::{HANG, PANIC};
        let codes = |arg| {
            failing_boots(arg)
                .into_iter()
                .map(|(c, _)| c)
                .collect::<Vec<_>>()
        };
        assert_eq!(codes(0), [PANIC, HANG], "default: one dies, one hangs");
        assert_eq!(codes(3), [PANIC, HANG, PANIC]);
        assert_eq!(codes(0x100 | 2), [HANG, HANG]);
        assert_eq!(codes(0x200 | 3), [PANIC, PANIC, PANIC]);
        assert!(failing_boots(0x200 | 200).iter().all(|&(_, arg)| arg == 0));
    }

    #[test]
    fn replayed_writes_fence_what_overlaps_them_and_every_flush() {
        let fence = ReplayFence(vec![(8, 8), (100, 1)]);
        // Sectors 8..16 and 100.
        assert!(fence.blocks(Op::Read, 8, 8));
        assert!(fence.blocks(Op::Write, 15, 1));
        assert!(fence.blocks(Op::Write, 0, 9), "its last sector overlaps");
        assert!(fence.blocks(Op::Discard, 90, 20));
        assert!(fence.blocks(Op::WriteZeroes, 100, 1));
        assert!(
            !fence.blocks(Op::Read, 0, 8),
            "ends where the replay starts"
        );
        assert!(
            !fence.blocks(Op::Write, 16, 8),
            "starts where the replay ends"
        );
        assert!(!fence.blocks(Op::Read, 101, u32::MAX));
        assert!(
            fence.blocks(Op::Flush, 0, 0),
            "a flush must cover every replay"
        );
        assert!(
            !fence.blocks(Op::Read, u64::MAX, 8),
            "no overflow at the end"
        );
        let none = ReplayFence(Vec::new());
        assert!(!none.blocks(Op::Flush, 0, 0));
        assert!(!none.blocks(Op::Write, 8, 8));
    }
}
