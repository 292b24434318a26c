//! The reincarnation engine: one driver domain's life, whatever its device class.
//!
//! The engine holds the domains of one device — the live one, the one that just failed (kept
//! until its successor serves), and the warm standbys booted ahead — and runs everything that
//! happens to them: detection (the vCPU stopping, a still heartbeat, a request past its
//! deadline, DMA the device refused), failure handling (tear down, let the
//! [`Supervisor`] decide), restarts (a standby promoted or a fresh boot, then ready, then
//! replay), operator commands, fault injection and events.
//!
//! What it serves is a device class's business ([`DeviceClass`]): the class opens the channel
//! of a domain that is ready and checks what the domain says of its device, puts what the lost
//! domain had back in its queue, says which requests are bound by the deadline, and builds the
//! replay. Domains are reached through [`DomainHandle`] and booted through a [`Launcher`], so
//! the engine runs the same with real VMs (`vm::VmLauncher`) and with the fake domains its unit
//! tests use.
//!
//! Everything runs on the thread that owns the engine (a disk's block service), except the
//! standby boots (a thread of their own, `standby`) and hooks (child processes).

mod standby;
pub mod vm;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(feature = "fault-injection")]
use ddvm_abi::channel::fault;
use ddvm_recovery::events::EventLog;
use ddvm_recovery::fault::FaultKind;
use ddvm_recovery::hook::HookRunner;
use ddvm_recovery::monitor::{AdaptiveDeadline, HeartbeatMonitor, ServiceClock};
use ddvm_recovery::policy::Policy;
use ddvm_recovery::reason::{FailureReason, OperatorAction};
use ddvm_recovery::supervisor::{Admission, Decision, Status, Supervisor};
use vmm_sys_util::eventfd::EventFd;

use self::standby::StandbyBooter;
use crate::hoststall::{DomainThread, Lost, StallMeter};
use crate::loader::Image;
use crate::sync::lock;

/// How often the slower detectors run.
const CHECK_EVERY: Duration = Duration::from_millis(1);
/// Most doublings of the boot timeout after boots that were not ready in time (16x).
const BOOT_BACKOFF_MAX: u32 = 4;
/// Boots that a `failed-restart` fault makes fail before ready when its argument is 0.
#[cfg(feature = "fault-injection")]
const FAILED_RESTARTS_DEFAULT: u32 = 2;
/// Records kept of recent recoveries and detections (the counts in the supervisor's metrics
/// cover all of them).
pub const RECORDS: usize = 65_536;

/// A domain as the engine drives it.
pub trait DomainHandle: Send + 'static {
    /// Its boot generation.
    fn epoch(&self) -> u64;
    /// Waits until it is ready: `Err(Some(reason))` when it stopped first, `Err(None)` when
    /// `timeout` passed.
    fn wait_ready(&self, timeout: Duration) -> Result<(), Option<FailureReason>>;
    /// Why it stopped, if it did.
    fn has_stopped(&self) -> Option<FailureReason>;
    /// A warm standby is handed its device and let go on to its bring-up.
    fn promote(&mut self) -> Result<(), String>;
    /// Stops it and quiesces its device; its memory may be freed later (by the drop).
    fn retire(&mut self);
    /// Stops its vCPU and leaves its device as it is (an orderly stop shuts the device down
    /// before anything resets it).
    fn stop_vcpu(&mut self);
    /// Whether its vCPU waits (idle, not hung).
    fn is_waiting(&self) -> bool;
    /// Its heartbeat counter.
    fn heartbeat(&self) -> Option<u64>;
    /// CPU time its vCPU thread ran.
    fn cpu_time(&self) -> Option<Duration>;
    /// Its vCPU thread's id (for the host's stall accounting).
    fn thread_id(&self) -> Option<i32>;
    /// Puts a fault request where it finds it during bring-up, without waking it.
    fn arm_fault(&self, code: u32, arg: u32) -> bool;
    /// Puts a fault request in its channel header and wakes it.
    fn request_fault(&self, code: u32, arg: u32) -> bool;
}

/// Boots the domains of one device.
pub trait Launcher: Send + 'static {
    /// The domains it boots.
    type Domain: DomainHandle;
    /// Boots a domain with `epoch`; `fault`: an ABI fault (code, argument) it acts on during its
    /// bring-up, before ready.
    fn boot(&self, epoch: u64, fault: Option<(u32, u32)>) -> Result<Self::Domain, String>;
    /// What the standby thread runs to boot warm standbys (each parked before its bring-up).
    fn standby_boots(&self) -> Box<dyn FnMut(u64) -> Result<Self::Domain, String> + Send>;
    /// Boots from now on run `image` (an operator update).
    fn set_image(&mut self, image: Image);
    /// DMA the device refused so far (it counts across domains).
    fn dma_refused(&self) -> u64;
}

/// What a device class does when the engine changes domains.
pub trait DeviceClass<D> {
    /// `domain` reported ready: open its channel, check what it says of its
    /// device, and build the replay. An error fails this boot.
    fn ready(&mut self, domain: &D) -> Result<(), FailureReason>;
    /// The live domain is gone: everything it had in flight goes back to the queue, in order.
    fn lost(&mut self);
    /// The oldest request in flight that is bound by the request deadline (a request that
    /// may wait for the outside world, such as a receive buffer, is not): its tag and when it
    /// was posted, on the service clock.
    fn oldest_deadline_bound(&self) -> Option<(u32, Instant)>;
    /// Requests owed to clients: (in flight, queued).
    fn owed(&self) -> (usize, usize);
    /// A bring-up fault (code, argument) that makes the next domain fail the first request
    /// replayed to it, if there is one to replay (the `failed-replay` fault).
    fn replay_fault(&self) -> Option<(u32, u32)>;
    /// The policy gave up on the device.
    fn gave_up(&mut self) {}
    /// A broken invariant of the class's own bookkeeping, found since the last call (the
    /// engine gives the device up: [`Engine::invariant_broken`]).
    fn take_broken(&mut self) -> Option<String> {
        None
    }
    /// Fault injection (`vmm-invariant`): forget the tags of the requests in flight.
    #[cfg(feature = "fault-injection")]
    fn forget_tags(&mut self) {}
}

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

/// What observers see of a recovering device.
#[derive(Default)]
pub struct Observed {
    /// Supervisor status (refreshed by the service).
    pub status: Option<Status>,
    /// Shadow entries in flight.
    pub in_flight: usize,
    /// Shadow entries queued.
    pub queued: usize,
    /// Recoveries so far.
    pub recovered: u64,
    /// Their recovery times (detection to the first completion after it), summed.
    pub recovery_total: Duration,
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

/// The handle others hold on a recovering device.
#[derive(Clone)]
pub struct RecoveryHandle {
    commands: Arc<Mutex<VecDeque<Command>>>,
    // Set with every command, so the service looks at the queue (a lock) only when it has one.
    has_commands: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    /// Events of the supervisor.
    pub events: Arc<Mutex<EventLog>>,
    /// Written whenever events are added to `events` (the control plane streams them).
    events_added: Arc<EventFd>,
    /// Status and timings.
    pub observed: Arc<Mutex<Observed>>,
}

impl RecoveryHandle {
    pub(crate) fn new(now: Instant) -> std::io::Result<Self> {
        Ok(RecoveryHandle {
            commands: Arc::default(),
            has_commands: Arc::default(),
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            events: Arc::new(Mutex::new(EventLog::new(now, 4096))),
            events_added: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            observed: Arc::default(),
        })
    }

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

    /// An eventfd (non-blocking) that becomes readable when events are added to
    /// [`RecoveryHandle::events`]; whoever waits on it reads it to rearm it. Only one reader
    /// may wait on it (the control plane).
    pub fn events_fd(&self) -> &EventFd {
        &self.events_added
    }

    /// The eventfd that wakes the owner of the engine for a command.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.wake.as_raw_fd()
    }
}

fn push_record<T>(v: &mut VecDeque<T>, record: T) {
    if v.len() == RECORDS {
        v.pop_front();
    }
    v.push_back(record);
}

/// The domain that serves, and its boot generation.
pub struct Live<D> {
    /// The domain.
    pub domain: D,
    /// Its epoch.
    pub epoch: u64,
}

/// Why the engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The recovery policy is invalid.
    #[error("domain {name}: recovery policy: {source}")]
    Policy {
        /// Domain.
        name: String,
        /// What.
        #[source]
        source: ddvm_recovery::policy::PolicyError,
    },
    /// The host refused an eventfd.
    #[error("domain {name}: eventfd: {source}")]
    Host {
        /// Domain.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The reincarnation engine of one device.
pub struct Engine<L: Launcher> {
    name: String,
    launcher: L,
    live: Option<Live<L::Domain>>,
    // A failed domain, stopped and quiesced, whose VM and memory are freed once its successor
    // serves (off the recovery path).
    retired: Option<L::Domain>,
    // The next domains, booted ahead and held before their device probe (policy `standbys`),
    // the next to serve first; and the thread that boots them (off the service thread: a boot
    // takes about a millisecond of it here).
    standbys: VecDeque<L::Domain>,
    booter: Option<StandbyBooter<L::Domain>>,
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
    handle: RecoveryHandle,
    // Set while a pass runs on the domain's own vCPU thread (in its wait exit), which must
    // not tear the domain down (that joins the thread): a failure found there waits here for
    // the service thread's next pass.
    on_domain_thread: bool,
    deferred: Option<FailureReason>,
    // The first broken invariant of the VMM's own bookkeeping found (the owner's thread gives
    // the device up).
    broken: Option<String>,
}

impl<L: Launcher> Engine<L> {
    /// An engine for the device `name`, with nothing booted yet.
    pub fn new(name: &str, launcher: L, policy: Policy) -> Result<Self, EngineError> {
        let sup = Supervisor::new(name, policy.clone()).map_err(|source| EngineError::Policy {
            name: name.to_string(),
            source,
        })?;
        let now = Instant::now();
        let handle = RecoveryHandle::new(now).map_err(|source| EngineError::Host {
            name: name.to_string(),
            source,
        })?;
        Ok(Engine {
            name: name.to_string(),
            launcher,
            live: None,
            retired: None,
            standbys: VecDeque::new(),
            booter: None,
            heartbeat: HeartbeatMonitor::new(policy.detection.heartbeat_period),
            deadline: AdaptiveDeadline::new(policy.detection.request_deadline),
            clock: ServiceClock::new(now),
            stalls: StallMeter::new(),
            boot_timeouts: 0,
            sup,
            policy,
            hooks: HookRunner::default(),
            next_epoch: 1,
            restart_at: None,
            next_check: now,
            dma_refused: 0,
            injected_at: None,
            detected_at: None,
            #[cfg(feature = "fault-injection")]
            fault_on_next_boot: false,
            failing_boots: VecDeque::new(),
            handle,
            on_domain_thread: false,
            deferred: None,
            broken: None,
        })
    }

    /// Boots the first domain and waits until it is ready, then starts the standby pool.
    pub fn start(&mut self, class: &mut impl DeviceClass<L::Domain>) -> Result<(), FailureReason> {
        self.boot(class).map_err(|(_, reason)| reason)?;
        self.prepare_standby();
        self.publish(class);
        Ok(())
    }

    /// The handle for commands, events and status.
    pub fn handle(&self) -> RecoveryHandle {
        self.handle.clone()
    }

    /// The eventfd a command wakes the engine's owner with.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.handle.wake_fd()
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The serving domain, if one is up.
    pub fn live(&self) -> Option<&Live<L::Domain>> {
        self.live.as_ref()
    }

    /// The serving domain, if one is up, to act on.
    pub fn live_mut(&mut self) -> Option<&mut Live<L::Domain>> {
        self.live.as_mut()
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &Supervisor {
        &self.sup
    }

    /// The policy gave up and requests fail.
    pub fn is_broken(&self) -> bool {
        self.sup.is_broken()
    }

    /// The heartbeat period of the policy.
    pub fn heartbeat_period(&self) -> Duration {
        self.policy.detection.heartbeat_period
    }

    /// A failure found on the domain's thread that the owner's thread has not acted on yet.
    pub fn deferred(&self) -> Option<&FailureReason> {
        self.deferred.as_ref()
    }

    /// The warm standbys that are up (policy `standbys`), the next to serve first.
    pub fn standbys(&self) -> impl Iterator<Item = &L::Domain> {
        self.standbys.iter()
    }

    /// What to do with client requests now.
    pub fn admission(&self) -> Admission {
        self.sup.admission()
    }

    /// Marks the passes that follow as running on the domain's vCPU thread (or not): there,
    /// failures are deferred to the owner's thread, and neither detection, commands nor
    /// restarts run.
    pub fn set_on_domain_thread(&mut self, on: bool) {
        self.on_domain_thread = on;
    }

    /// Whether a failure found on the domain's thread waits for the owner's thread.
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// `t` on the service clock (the wall clock less what the host took from the domain).
    pub fn service_time(&self, t: Instant) -> Instant {
        self.clock.at(t)
    }

    /// A request took `latency` (service clock): the adaptive deadline learns from it.
    pub fn request_completed(&mut self, latency: Duration) {
        self.deadline.completed(latency);
    }

    /// The device refused DMA since the last look: the live domain aimed it outside itself.
    pub fn dma_refused(&mut self) -> Option<FailureReason> {
        let refused = self.launcher.dma_refused();
        let count = refused.checked_sub(self.dma_refused).filter(|&c| c > 0)?;
        self.dma_refused = refused;
        Some(FailureReason::DmaRefused { count })
    }

    /// When the next restart is due, while no domain is up.
    pub fn restart_at(&self) -> Option<Instant> {
        self.restart_at
    }

    /// Client requests completed at `now` (`n` of them, the class's replay done or not):
    /// closes a recovery at its first completion and ends the replay phase once the replay
    /// is done.
    pub fn served(&mut self, n: usize, now: Instant, replay_done: bool) {
        if n > 0 {
            if let Some(took) = self.sup.completed(now) {
                self.recovered(took, now);
            }
        }
        if replay_done
            && matches!(
                self.sup.state(),
                ddvm_recovery::supervisor::State::Replaying { .. }
            )
        {
            match self.sup.replay_done(n, now) {
                // No client was served meanwhile (idle clients): the recovery ends with the
                // replay, not at a first client completion that may never come.
                Ok(()) if n == 0 => {
                    if let Some(detected) = self.detected_at {
                        self.recovered(now.saturating_duration_since(detected), now);
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    let epoch = self.live.as_ref().map_or(0, |l| l.epoch);
                    self.supervisor_bug("replay_done", epoch, &e);
                }
            }
        }
    }

    /// A recovery ended at `now`, `took` after its detection: the pool refills and it is
    /// recorded.
    fn recovered(&mut self, took: Duration, now: Instant) {
        let Some(detected) = self.detected_at.take() else {
            return;
        };
        // The pool refills once the clients are served again: a standby's boot would take CPU
        // from the recovery (the other standby covers a failure meanwhile).
        self.prepare_standby();
        let injected = self.injected_at.take();
        let mut o = lock(&self.handle.observed);
        o.recovered += 1;
        o.recovery_total += took;
        push_record(
            &mut o.recoveries,
            RecoveryRecord {
                injected,
                detected,
                recovered: now,
            },
        );
        drop(o);
        crate::limited!(info, key: self.name, "domain {}: recovered in {took:?}", self.name);
    }

    /// Runs what the owner's thread runs before it serves: a failure deferred from the
    /// domain's thread, the detectors, commands, hooks and a due restart. (Nothing on the
    /// domain's thread.)
    pub fn tend(&mut self, class: &mut impl DeviceClass<L::Domain>) {
        if self.on_domain_thread {
            return;
        }
        if let Some(reason) = self.deferred.take() {
            self.fail(reason, class);
        }
        if let Some(what) = self.broken.take().or_else(|| class.take_broken()) {
            self.abandon(what, class);
        }
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
            self.publish(class);
        }
        if self.sup.is_broken()
            && (!self.standbys.is_empty() || self.booter.as_ref().is_some_and(StandbyBooter::busy))
        {
            self.drop_standbys();
            self.publish(class);
        }
        if self.handle.has_commands.swap(false, Ordering::Acquire) {
            let commands: Vec<Command> = lock(&self.handle.commands).drain(..).collect();
            for c in commands {
                self.command(c, class);
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
                if let Err((epoch, reason)) = self.boot(class) {
                    self.fail_epoch(epoch, reason, class);
                }
                self.publish(class);
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
                tid: l.domain.thread_id()?,
                ran: l.domain.cpu_time(),
            })
        });
        let lost = self.stalls.sample(now, domain);
        self.clock.stalled(now, lost.total());
        let service_now = self.clock.at(now);
        // A standby that died is a bug in the image rather than a fault of the live domain: it
        // is not replaced until the next restart (one that always dies would boot in a loop).
        let before = self.standbys.len();
        let name = &self.name;
        self.standbys.retain(|d| match d.has_stopped() {
            Some(exit) => {
                crate::limited!(
                    warn,
                    key: name,
                    "domain {name}: a warm standby stopped ({exit}); dropping it"
                );
                false
            }
            None => true,
        });
        if self.standbys.len() != before {
            self.publish(class);
        }
        if let Some(reason) = self.detect(service_now, class) {
            let t = self.stalls.so_far();
            crate::limited!(
                info,
                key: self.name,
                "domain {}: host stalls discounted so far: {:?} (steal {:?}, service waited \
                 {:?}, domain waited {:?})",
                self.name,
                self.clock.lost(),
                t.steal,
                t.service,
                t.domain
            );
            self.fail(reason, class);
        }
        self.publish(class);
    }

    /// The live domain failed: tear it down and let the policy decide what happens next.
    /// On the domain's own thread the failure waits for the owner's thread.
    pub fn fail(&mut self, reason: FailureReason, class: &mut impl DeviceClass<L::Domain>) {
        if self.on_domain_thread {
            // The first failure is the reason; the owner's thread acts on it.
            self.deferred.get_or_insert(reason);
            let _ = self.handle.wake.write(1);
            return;
        }
        let epoch = match &self.live {
            Some(l) => l.epoch,
            // Nothing is live: the failure is the latest boot's.
            None => self.sup.epoch().unwrap_or(0),
        };
        self.fail_epoch(epoch, reason, class);
    }

    /// Tears the domain of `epoch` down (if it is the live one) and lets the policy decide
    /// what happens next: a domain that failed before it was ready (never live) is a failure
    /// like any other — backoff, the window's count, the hook and give-up apply.
    fn fail_epoch(
        &mut self,
        epoch: u64,
        reason: FailureReason,
        class: &mut impl DeviceClass<L::Domain>,
    ) {
        let now = Instant::now();
        let name = reason.name();
        crate::limited!(warn, key: self.name, "domain {}: failed ({reason}); recovering", self.name);
        push_record(&mut lock(&self.handle.observed).detections, (name, now));
        if self.detected_at.is_none() {
            self.detected_at = Some(now);
        }
        let decision = self.sup.failure(epoch, reason, now);
        self.tear_down(class);
        match decision {
            Decision::Restart { at, .. } => self.restart_at = Some(at),
            Decision::GiveUp(_) => {
                self.restart_at = None;
                class.gave_up();
            }
            Decision::Ignored => {
                // Every failure the engine reports is of the domain it booted last: the
                // supervisor ignoring one means the two disagree.
                let state = self.sup.state().name();
                self.invariant_broken(format!(
                    "the supervisor ignored a failure of epoch {epoch} (state {state})"
                ));
            }
        }
        if let Some(call) = self.sup.take_hook_call() {
            self.hooks.spawn(call, now);
        }
        self.publish(class);
    }

    /// A supervisor transition the engine asked for was refused: the engine's bookkeeping
    /// and the supervisor's disagree, a broken invariant.
    fn supervisor_bug(&mut self, call: &str, epoch: u64, e: &dyn std::fmt::Display) {
        self.invariant_broken(format!(
            "the supervisor refused {call} for epoch {epoch}: {e}"
        ));
    }

    /// The VMM's own bookkeeping of the device is broken (`what`): a completion with no
    /// shadow entry, a transition the supervisor refused, a ring filled past its free space.
    /// The owner's thread gives the device up at its next pass, loudly: an error, a
    /// `gave-up` event with reason `vmm-invariant`, the hook, and requests failing. Only the
    /// first is kept.
    pub fn invariant_broken(&mut self, what: String) {
        self.broken.get_or_insert(what);
        let _ = self.handle.wake.write(1);
    }

    /// Gives the device up for a broken invariant (see [`Engine::invariant_broken`]).
    fn abandon(&mut self, what: String, class: &mut impl DeviceClass<L::Domain>) {
        let now = Instant::now();
        tracing::error!(
            "domain {}: VMM invariant broken: {what}; giving the device up (requests fail \
             until an operator restart)",
            self.name
        );
        let reason = FailureReason::VmmInvariant { what };
        let decision = self.sup.abandon(reason, now);
        if decision == Decision::Ignored {
            return;
        }
        self.tear_down(class);
        self.restart_at = None;
        self.drop_standbys();
        class.gave_up();
        if let Some(call) = self.sup.take_hook_call() {
            self.hooks.spawn(call, now);
        }
        self.publish(class);
    }

    /// Starts booting a warm standby with the next epoch on the standby thread, unless the
    /// policy's number are up, or one is on its way. A standby that cannot be booted is not an
    /// error: the next restart boots cold.
    fn prepare_standby(&mut self) {
        if self.standbys.len() >= self.policy.restart.standbys as usize
            || self.booter.as_ref().is_some_and(StandbyBooter::busy)
            || self.sup.is_broken()
        {
            return;
        }
        if self.booter.is_none() {
            match StandbyBooter::start(&self.name, self.launcher.standby_boots()) {
                Ok(b) => self.booter = Some(b),
                Err(e) => {
                    crate::limited!(warn, key: self.name, "domain {}: no warm standby: {e}", self.name);
                    return;
                }
            }
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        if let Some(b) = self.booter.as_mut() {
            b.boot(epoch);
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
                crate::limited!(warn, key: self.name, "domain {}: no warm standby: {e}", self.name);
                false
            }
            None => false,
        }
    }

    /// Stops the standbys (and waits for one still booting).
    pub fn drop_standbys(&mut self) {
        self.collect_standby(true);
        self.standbys.clear();
    }

    /// The standby promoted to serve, if there is a usable one: the oldest (one still booting
    /// is waited for: it is further along than a cold boot would be). `bring_up_fault`: a
    /// fault for it to act on during its bring-up, put where it finds it before it is let go.
    fn promote_standby(&mut self, bring_up_fault: Option<(u32, u32)>) -> Option<L::Domain> {
        loop {
            if self.standbys.is_empty() && !self.collect_standby(true) {
                return None;
            }
            while let Some(mut d) = self.standbys.pop_front() {
                // A standby older than the latest boot (a cold boot went ahead while it was
                // booting) would break the epochs' order: it is dropped.
                if self.sup.epoch().is_some_and(|last| d.epoch() <= last) {
                    continue;
                }
                if let Some((code, arg)) = bring_up_fault {
                    d.arm_fault(code, arg);
                }
                match d.promote() {
                    Ok(()) => return Some(d),
                    Err(e) => crate::limited!(
                        warn,
                        key: self.name,
                        "domain {}: {e}; dropping it",
                        self.name
                    ),
                }
            }
            // None usable: the one still booting is further along than a cold boot.
        }
    }

    /// Brings up the next domain and waits for it to be ready: the oldest standby if there is
    /// one, else a fresh boot with the next epoch. (The pool refills once the recovery has
    /// served a client, in `served`.) A domain that fails before it is ready is a failure of
    /// the epoch that was booting: the error carries that epoch for [`Self::fail_epoch`].
    fn boot(
        &mut self,
        class: &mut impl DeviceClass<L::Domain>,
    ) -> Result<(), (u64, FailureReason)> {
        let now = Instant::now();
        let bring_up_fault = self.failing_boots.pop_front();
        let promoted = self.promote_standby(bring_up_fault);
        let epoch = promoted.as_ref().map_or(self.next_epoch, |d| d.epoch());
        if let Err(e) = self.sup.boot_started(epoch, now) {
            self.supervisor_bug("boot_started", epoch, &e);
        }
        let how = if promoted.is_some() {
            lock(&self.handle.observed).promoted += 1;
            "standby promoted"
        } else {
            "vm created"
        };
        let domain = match promoted {
            Some(d) => d,
            None => {
                self.next_epoch += 1;
                self.launcher
                    .boot(epoch, bring_up_fault)
                    .map_err(|message| (epoch, FailureReason::BootFailed { message }))?
            }
        };
        let created = Instant::now();
        let base = self.policy.detection.boot_timeout;
        let cap = base.saturating_mul(1 << BOOT_BACKOFF_MAX);
        let timeout = ddvm_recovery::policy::doubled(base, self.boot_timeouts, cap);
        match domain.wait_ready(timeout) {
            Ok(()) => {
                self.boot_timeouts = 0;
                tracing::debug!(
                    "domain {} epoch {epoch}: {how} in {:?}, ready {:?} later",
                    self.name,
                    created - now,
                    created.elapsed()
                )
            }
            Err(Some(reason)) => return Err((epoch, reason)),
            Err(None) => {
                self.boot_timeouts = self.boot_timeouts.saturating_add(1);
                return Err((epoch, FailureReason::BootTimeout { waited: timeout }));
            }
        }
        class.ready(&domain).map_err(|r| (epoch, r))?;
        if let Err(e) = self.sup.ready(epoch, Instant::now()) {
            self.supervisor_bug("ready", epoch, &e);
        }
        self.heartbeat.reset();
        // DMA the quiesce cut off while the old domain died is not this domain's doing.
        self.dma_refused = self.launcher.dma_refused();
        self.live = Some(Live { domain, epoch });
        #[cfg(feature = "fault-injection")]
        if std::mem::take(&mut self.fault_on_next_boot) {
            // A fault during recovery: the fresh domain dies before its replay is done.
            self.inject(FaultKind::Panic, 0);
        }
        Ok(())
    }

    /// The detectors, at `service_now` on the service clock (which leaves out steal and the
    /// domain's waits for a CPU). The heartbeat also needs the vCPU to have *run* the period:
    /// a thread's CPU clock on a VM may count stolen time as run time (measured: a heartbeat
    /// detection of a starved domain under 7 s of steal), so the clock guards it too.
    fn detect(
        &mut self,
        service_now: Instant,
        class: &impl DeviceClass<L::Domain>,
    ) -> Option<FailureReason> {
        let live = self.live.as_ref()?;
        if let Some(reason) = live.domain.has_stopped() {
            return Some(reason);
        }
        if live.domain.is_waiting() {
            self.heartbeat.touch(service_now);
        } else if let Some(hb) = live.domain.heartbeat() {
            let ran = live.domain.cpu_time();
            if let Some(r) = self.heartbeat.sample_running(hb, service_now, ran) {
                return Some(r);
            }
        }
        if let Some(r) = self
            .deadline
            .check(class.oldest_deadline_bound(), service_now)
        {
            self.deadline.expired();
            return Some(r);
        }
        self.dma_refused()
    }

    fn command(&mut self, c: Command, class: &mut impl DeviceClass<L::Domain>) {
        let now = Instant::now();
        match c {
            #[cfg(not(feature = "fault-injection"))]
            Command::Inject { .. } => {
                crate::limited!(
                    warn,
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
                        self.kill_now(class);
                    }
                    FaultKind::Kill => self.kill_now(class),
                    // A kill, and the next restarts fail before ready.
                    FaultKind::FailedRestart => {
                        self.failing_boots = failing_boots(arg);
                        self.kill_now(class);
                    }
                    // A kill, and the next domain fails the first request replayed to it.
                    FaultKind::FailedReplay => {
                        match class.replay_fault() {
                            Some(f) => self.failing_boots = [f].into(),
                            None => crate::limited!(
                                info,
                                key: self.name,
                                "domain {}: failed-replay: nothing to replay; a kill",
                                self.name
                            ),
                        }
                        self.kill_now(class);
                    }
                    FaultKind::VmmInvariant => class.forget_tags(),
                    _ => self.inject(kind, arg),
                }
            }
            Command::Kill => self.kill_now(class),
            Command::Restart | Command::Update(_) => {
                let action = match c {
                    Command::Update(image) => {
                        let name = image.name().display().to_string();
                        self.launcher.set_image(image);
                        // They run the old image.
                        self.drop_standbys();
                        OperatorAction::Update { image: name }
                    }
                    _ => OperatorAction::Restart,
                };
                match self.sup.operator(action, now) {
                    Ok(decision) => {
                        self.tear_down(class);
                        if let Decision::Restart { at, .. } = decision {
                            self.restart_at = Some(at);
                        }
                    }
                    // Only a stopped supervisor refuses, and a stopped device takes no
                    // commands.
                    Err(e) => {
                        let epoch = self.sup.epoch().unwrap_or(0);
                        self.supervisor_bug("operator", epoch, &e);
                    }
                }
            }
        }
    }

    /// Retires the domain — stops the vCPU and quiesces the device; its VM and memory are
    /// freed once the next domain serves — and has the class put everything it had in flight
    /// back in the queue.
    fn tear_down(&mut self, class: &mut impl DeviceClass<L::Domain>) {
        let t = Instant::now();
        if let Some(mut live) = self.live.take() {
            live.domain.retire();
            self.retired = Some(live.domain);
        }
        tracing::debug!("domain {}: torn down in {:?}", self.name, t.elapsed());
        class.lost();
    }

    /// Abrupt teardown by the VMM (the `kill` fault and `ddvm ctl kill`).
    fn kill_now(&mut self, class: &mut impl DeviceClass<L::Domain>) {
        if self.live.is_some() {
            self.fail(FailureReason::Operator(OperatorAction::Kill), class);
        }
    }

    /// Asks the running domain to fault.
    #[cfg(feature = "fault-injection")]
    fn inject(&mut self, kind: FaultKind, arg: u32) {
        let Some(live) = &self.live else { return };
        // The kinds the VMM does itself have no code: the caller handles them.
        let Some(code) = kind.domain_code() else {
            return;
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
        live.domain.request_fault(code, arg);
    }

    /// Refreshes what observers see and moves supervisor events to the log.
    pub fn publish(&mut self, class: &impl DeviceClass<L::Domain>) {
        let added = {
            let mut log = lock(&self.handle.events);
            let before = log.next_seq();
            self.sup.drain_into(&mut log);
            log.next_seq() != before
        };
        if added {
            let _ = self.handle.events_added.write(1);
        }
        let (in_flight, queued) = class.owed();
        let mut o = lock(&self.handle.observed);
        o.status = Some(self.sup.status(Instant::now()));
        o.in_flight = in_flight;
        o.queued = queued;
        o.standbys = self.standbys.iter().map(DomainHandle::epoch).collect();
        o.discounted = self.clock.lost();
        o.stalls = self.stalls.so_far();
    }
}

impl<L: Launcher> Drop for Engine<L> {
    fn drop(&mut self) {
        self.sup.stop(Instant::now());
        // The live domain (and with it the device's hold on its memory) goes first.
        self.live = None;
        self.retired = None;
    }
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
