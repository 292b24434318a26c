//! The vCPU thread: runs the guest, dispatches its exits, and classifies why it stopped.
//!
//! Exits cost tens of µs on PVM, so the loop does little per exit: dispatch, drain the log ring
//! (one 8-byte read when there is nothing new), look for the ready mark until it is seen.
//! Everything the guest controls — port values, the panic record, the log ring head — is copied
//! out and checked; nothing a guest does panics this thread.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ddvm_abi::channel::ChannelHeader;
use ddvm_abi::layout;
use ddvm_abi::panic::{vector_name, PanicKind, PanicRecord, PANIC_MAGIC};
use ddvm_abi::port;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::console::{Console, LogReader};
use crate::devices::Bus;
use crate::memory::GuestMem;

/// Why a guest stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote `status` to the exit port.
    Exited {
        /// Exit status (0: success).
        status: u32,
    },
    /// A Rust panic inside the guest, reported on the panic port.
    Panicked {
        /// The guest's panic message.
        message: String,
    },
    /// A CPU exception inside the guest, reported by its IDT handler on the panic port.
    Exception {
        /// Vector.
        vector: u32,
        /// Faulting instruction.
        rip: u64,
        /// Error code (0 where the vector has none).
        error_code: u64,
        /// CR2 (page faults).
        cr2: u64,
    },
    /// The panic port was written without a valid panic record.
    BadPanicReport {
        /// Value written to the port.
        value: u32,
    },
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted (an exception it could not take).
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR: KVM could not run or emulate the guest.
    InternalError {
        /// KVM's sub-error code.
        suberror: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    FailedEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The guest halted with nothing that could wake it.
    Halted,
    /// An exit ddvm guests never cause.
    Unexpected {
        /// The exit, as KVM reported it.
        exit: String,
    },
    /// KVM_RUN itself failed.
    HostError {
        /// errno from KVM_RUN.
        errno: i32,
    },
    /// The VMM stopped the guest (teardown or kill).
    Stopped,
    /// The guest reset the machine (a Linux guest's `reboot`, through the keyboard
    /// controller): ddvm does not restart a client, so the guest ends.
    Reset,
}

impl GuestExit {
    /// Whether this is a crash of the guest (as opposed to an orderly exit or a stop).
    pub fn is_crash(&self) -> bool {
        !matches!(
            self,
            GuestExit::Exited { status: 0 }
                | GuestExit::Stopped
                | GuestExit::HostError { .. }
                | GuestExit::Reset
        )
    }

    /// Short machine-readable name of the reason.
    pub fn reason(&self) -> &'static str {
        match self {
            GuestExit::Exited { status: 0 } => "exited",
            GuestExit::Exited { .. } => "exit-failure",
            GuestExit::Panicked { .. } => "panic",
            GuestExit::Exception { .. } => "exception",
            GuestExit::BadPanicReport { .. } => "bad-panic-report",
            GuestExit::Shutdown => "shutdown",
            GuestExit::InternalError { .. } => "internal-error",
            GuestExit::FailedEntry { .. } => "failed-entry",
            GuestExit::Halted => "halted",
            GuestExit::Unexpected { .. } => "unexpected-exit",
            GuestExit::HostError { .. } => "host-error",
            GuestExit::Stopped => "stopped",
            GuestExit::Reset => "reset",
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::Exited { status } => write!(f, "exited with status {status}"),
            GuestExit::Panicked { message } => write!(f, "panicked: {message}"),
            GuestExit::Exception {
                vector,
                rip,
                error_code,
                cr2,
            } => {
                write!(
                    f,
                    "crashed: exception {vector} ({}) at rip={rip:#x} error_code={error_code:#x}",
                    vector_name(*vector)
                )?;
                if *vector == 14 {
                    write!(f, " cr2={cr2:#x}")?;
                }
                Ok(())
            }
            GuestExit::BadPanicReport { value } => write!(
                f,
                "crashed: panic port written ({value:#x}) without a valid panic record"
            ),
            GuestExit::Shutdown => write!(f, "crashed: triple fault (shutdown exit)"),
            GuestExit::InternalError { suberror } => {
                write!(f, "crashed: KVM internal error (suberror {suberror})")
            }
            GuestExit::FailedEntry { reason } => {
                write!(f, "crashed: VM entry failed (hardware reason {reason:#x})")
            }
            GuestExit::Halted => write!(f, "crashed: halted with interrupts off"),
            GuestExit::Unexpected { exit } => write!(f, "crashed: unexpected exit {exit}"),
            GuestExit::HostError { errno } => write!(
                f,
                "host error: KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            GuestExit::Stopped => write!(f, "stopped by the VMM"),
            GuestExit::Reset => write!(f, "reset by the guest"),
        }
    }
}

/// Exit counters of one vCPU (userspace exits; KVM's `exits` stat has the rest).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Every return of KVM_RUN.
    pub total: AtomicU64,
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Wait-port exits.
    pub wait: AtomicU64,
    /// Accesses nobody claimed.
    pub unclaimed: AtomicU64,
    /// KVM_RUN interrupted by a signal.
    pub interrupted: AtomicU64,
}

/// Where the domain is in its life, as the vCPU thread sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Running, not yet ready.
    Booting,
    /// A warm standby, held at its standby exit until it is handed its device.
    Standby,
    /// The ready mark was seen this long after boot started.
    Ready(Duration),
    /// The guest stopped.
    Stopped(GuestExit),
}

/// State shared between a vCPU thread and the domain that owns it.
pub struct Shared {
    stop: AtomicBool,
    waiting: AtomicBool,
    // Whether the guest has its device: false for a standby until its promotion (set under
    // the state lock).
    promoted: AtomicBool,
    kick: Arc<EventFd>,
    // The vCPU thread's id (0 until it runs).
    tid: AtomicI32,
    // How a device of the guest ended it (a power-off, a reset), if one did.
    guest_exit: Mutex<Option<GuestExit>>,
    /// Written when the domain writes the notify port (normally in the kernel, by ioeventfd).
    pub notify: EventFd,
    /// Exit counters.
    pub exits: ExitCounters,
    state: Mutex<RunState>,
    changed: Condvar,
}

impl Shared {
    /// Fresh shared state.
    pub fn new() -> std::io::Result<Self> {
        Self::with_device(true)
    }

    /// Fresh shared state of a warm standby: held at its standby exit until
    /// [`promote`](Self::promote)d.
    pub fn standby() -> std::io::Result<Self> {
        Self::with_device(false)
    }

    fn with_device(has_device: bool) -> std::io::Result<Self> {
        Ok(Shared {
            stop: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            promoted: AtomicBool::new(has_device),
            kick: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            tid: AtomicI32::new(0),
            guest_exit: Mutex::new(None),
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
            exits: ExitCounters::default(),
            state: Mutex::new(RunState::Booting),
            changed: Condvar::new(),
        })
    }

    /// Wakes the vCPU if it waits.
    pub fn kick(&self) {
        // Writing an eventfd fails only when its counter would overflow: it is already set.
        let _ = self.kick.write(1);
    }

    /// The eventfd [`Shared::kick`] writes (non-blocking): writing 1 ends the vCPU's wait. A
    /// device's interrupts go there (its MSI-X vectors, for VFIO bound in the kernel).
    pub fn kick_eventfd(&self) -> Arc<EventFd> {
        self.kick.clone()
    }

    /// Whether the vCPU is blocked in a wait exit (the guest is idle, not hung).
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// The vCPU thread's id, once it runs.
    pub fn tid(&self) -> Option<i32> {
        Some(self.tid.load(Ordering::Acquire)).filter(|&t| t != 0)
    }

    /// A device of the guest ends it (a power-off, a reset): the vCPU stops at its next chance
    /// with `exit` (the first such exit counts).
    pub fn guest_stop(&self, exit: GuestExit) {
        crate::sync::lock(&self.guest_exit).get_or_insert(exit);
        self.request_stop();
    }

    /// Whether the guest was asked to stop (or one of its vCPUs stopped).
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks the vCPU thread to stop at its next chance.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        crate::sync::lock(&self.state)
    }

    /// Current state.
    pub fn state(&self) -> RunState {
        self.lock().clone()
    }

    fn set(&self, s: RunState) {
        *self.lock() = s;
        self.changed.notify_all();
    }

    /// A vCPU thread ended with `exit`. The first to end says why the guest stopped; with
    /// more than one vCPU, the others are asked to stop (their owner joins them).
    fn stopped(&self, exit: GuestExit) {
        let mut state = self.lock();
        if !matches!(*state, RunState::Stopped(_)) {
            *state = RunState::Stopped(exit);
        }
        drop(state);
        self.changed.notify_all();
        self.request_stop();
    }

    /// Lets a standby go on from its standby exit (or never stop there, if it has not reached
    /// it yet): it is booting again. False when the guest has already stopped.
    pub fn promote(&self) -> bool {
        let mut state = self.lock();
        if matches!(*state, RunState::Stopped(_)) {
            return false;
        }
        self.promoted.store(true, Ordering::Release);
        *state = RunState::Booting;
        drop(state);
        self.changed.notify_all();
        self.kick();
        true
    }

    /// At the standby exit: publishes [`RunState::Standby`] unless the guest has its device.
    /// Returns whether it must wait.
    fn enter_standby(&self) -> bool {
        let mut state = self.lock();
        if self.promoted.load(Ordering::Acquire) {
            return false;
        }
        *state = RunState::Standby;
        drop(state);
        self.changed.notify_all();
        true
    }

    /// Waits until `done` holds for the state or `timeout` passes; returns the last state.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&RunState) -> bool) -> RunState {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| !done(s))
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }
}

/// What the vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// Guest memory.
    pub mem: GuestMem,
    /// Port bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Console.
    pub console: Arc<Console>,
    /// Log ring reader, if the guest has a log ring.
    pub log: Option<LogReader>,
    /// Channel address and epoch, to watch for the ready mark.
    pub channel: Option<(u64, u64)>,
    /// When boot started.
    pub started: Instant,
    /// Whether the guest speaks ddvm's port ABI (exit, panic, wait, notify, standby ports):
    /// false for a stock kernel, whose port writes all go to the bus.
    pub abi_ports: bool,
    /// Work the VMM runs on this thread when the guest asks to wait, before it blocks (the
    /// exit is paid already): true when it did something the guest is waiting for, and the
    /// guest resumes at once instead of waiting.
    pub on_wait: Option<WaitWork>,
    /// Which of the guest's vCPUs this is: 0 boots it and is the one the domain's heartbeat,
    /// host-stall and CPU-time checks watch; the others (a Linux client's application
    /// processors) wait for the kernel's INIT/SIPI in KVM's local APIC.
    pub index: u32,
}

/// See [`VcpuContext::on_wait`].
pub struct WaitWork {
    /// The work: true when it did something the guest waits for.
    pub run: Box<dyn FnMut() -> bool + Send>,
    /// Eventfds that mean new work for `run` (a client's notifications), looked up at each
    /// wait: the wait watches them beside its kick and, when one fires, reads them all and
    /// runs the work again instead of returning to the guest. Whoever holds the
    /// [`WaitWatch`] keeps them open.
    pub watch: Box<dyn FnMut() -> Option<Arc<dyn WaitWatch>> + Send>,
}

impl WaitWork {
    /// Work with nothing to watch.
    pub fn new(run: impl FnMut() -> bool + Send + 'static) -> WaitWork {
        WaitWork {
            run: Box::new(run),
            watch: Box::new(|| None),
        }
    }
}

/// Eventfds a wait watches for its work ([`WaitWork::watch`]), open while this lives.
pub trait WaitWatch: Send + Sync {
    /// The eventfds (non-blocking).
    fn fds(&self) -> &[std::os::fd::RawFd];
    /// Before the wait blocks on them: asks their sources to signal them (a virtio queue's
    /// event index), and re-checks. True when work arrived meanwhile (run the work again).
    fn arm(&self) -> bool;
}

/// Signal used to kick a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal, once per process: its only effect is
/// to make KVM_RUN return EINTR.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal)
            .map_err(|e| e.errno())
    })
    .map_err(vmm_sys_util::errno::Error::new)
}

enum Step {
    Continue,
    Stop(GuestExit),
}

/// Runs the guest until it stops; returns why.
pub fn run(mut vcpu: VcpuFd, mut ctx: VcpuContext) -> GuestExit {
    if ctx.index == 0 {
        ctx.shared
            .tid
            .store(crate::sys::gettid(), Ordering::Release);
    }
    let exit = run_loop(&mut vcpu, &mut ctx);
    if let Some(log) = ctx.log.as_mut() {
        log.drain(&ctx.mem, &ctx.console);
    }
    ctx.shared.stopped(exit.clone());
    // Whoever waits on completions (the block service) learns at once that none will come.
    let _ = ctx.shared.notify.write(1);
    exit
}

fn run_loop(vcpu: &mut VcpuFd, ctx: &mut VcpuContext) -> GuestExit {
    let mut ready_seen = false;
    loop {
        if ctx.shared.stop.load(Ordering::Acquire) {
            // Every vCPU that stops for the guest's reason reports it.
            let by_guest = ctx.shared.guest_exit.lock().map(|e| e.clone());
            return by_guest.ok().flatten().unwrap_or(GuestExit::Stopped);
        }
        let step = match vcpu.run() {
            Ok(exit) => {
                ctx.shared.exits.total.fetch_add(1, Ordering::Relaxed);
                // What the guest printed is in the console before anything else is published.
                if let Some(log) = ctx.log.as_mut() {
                    log.drain(&ctx.mem, &ctx.console);
                }
                // Before handling the exit, which may block (a wait): the mark is timed here.
                if !ready_seen {
                    ready_seen = check_ready(ctx);
                }
                handle_exit(exit, ctx)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ctx.shared.exits.interrupted.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            Err(e) => Step::Stop(GuestExit::HostError { errno: e.errno() }),
        };
        if let Step::Stop(exit) = step {
            let exit = match exit {
                GuestExit::InternalError { .. } => GuestExit::InternalError {
                    suberror: internal_suberror(vcpu),
                },
                other => other,
            };
            if matches!(
                exit,
                GuestExit::Shutdown
                    | GuestExit::InternalError { .. }
                    | GuestExit::FailedEntry { .. }
            ) {
                log_cpu_state(vcpu, &exit);
            }
            return exit;
        }
    }
}

/// Looks for the ready mark of the current epoch; publishes the time when it is there.
fn check_ready(ctx: &VcpuContext) -> bool {
    let Some((gpa, epoch)) = ctx.channel else {
        return true;
    };
    match ctx.mem.read_obj::<ChannelHeader>(GuestAddress(gpa)) {
        Ok(h) if h.is_ready_for(epoch) => {
            ctx.shared.set(RunState::Ready(ctx.started.elapsed()));
            // Exits are what boot time is made of on PVM: show where they went.
            let e = &ctx.shared.exits;
            // Once per boot; a domain that fails at once is booted again and again.
            let vcpu = std::thread::current();
            let who = vcpu.name().unwrap_or("vcpu");
            crate::limited!(
                debug,
                key: who,
                "{who}: ready after {} exits ({} port I/O, {} MMIO, {} waits)",
                e.total.load(Ordering::Relaxed),
                e.pio.load(Ordering::Relaxed),
                e.mmio.load(Ordering::Relaxed),
                e.wait.load(Ordering::Relaxed),
            );
            true
        }
        _ => false,
    }
}

/// Logs where a vCPU was when the hypervisor stopped it (a triple fault, an entry failure, an
/// internal error): the registers a post-mortem starts from.
fn log_cpu_state(vcpu: &VcpuFd, exit: &GuestExit) {
    // A guest that faults as soon as it is booted again decides how often this is logged:
    // limited, per vCPU thread.
    let name = std::thread::current().name().unwrap_or("vcpu").to_string();
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        // KVM on SVM resets a vCPU that shut down: the reset vector says nothing of the fault.
        (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => crate::limited!(
            warn,
            key: name,
            "{name}: {exit}: the hypervisor reset the vCPU, its registers at the fault are gone"
        ),
        (Ok(r), Ok(s)) => crate::limited!(
            warn,
            key: name,
            "{name}: {exit}: rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} rbx {:#x} rcx {:#x} \
             rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} \
             efer {:#x} cs {:#x} ss {:#x} idt {:#x}+{:#x} gdt {:#x}+{:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.ss.selector,
            s.idt.base,
            s.idt.limit,
            s.gdt.base,
            s.gdt.limit,
        ),
        (r, s) => crate::limited!(
            warn,
            key: name,
            "{name}: {exit}: registers unreadable ({:?}, {:?})",
            r.err(),
            s.err()
        ),
    }
}

fn internal_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal`
    // member of the exit union; reading a u32 from it has no other requirement.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

fn port_value(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

fn handle_exit(exit: VcpuExit<'_>, ctx: &mut VcpuContext) -> Step {
    let exits = &ctx.shared.exits;
    match exit {
        VcpuExit::IoOut(p, data) if !ctx.abi_ports => {
            exits.pio.fetch_add(1, Ordering::Relaxed);
            if !ctx.pio.write(u64::from(p), data) {
                exits.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Step::Continue
        }
        VcpuExit::IoOut(p, data) => {
            exits.pio.fetch_add(1, Ordering::Relaxed);
            match p {
                port::EXIT => Step::Stop(GuestExit::Exited {
                    status: port_value(data),
                }),
                port::PANIC => Step::Stop(read_panic(&ctx.mem, port_value(data))),
                port::NOTIFY => {
                    // Only reached when the ioeventfd could not be registered.
                    let _ = ctx.shared.notify.write(1);
                    Step::Continue
                }
                port::WAIT => {
                    exits.wait.fetch_add(1, Ordering::Relaxed);
                    wait(ctx, port_value(data));
                    Step::Continue
                }
                port::STANDBY => {
                    standby(ctx);
                    Step::Continue
                }
                _ => {
                    if !ctx.pio.write(u64::from(p), data) {
                        exits.unclaimed.fetch_add(1, Ordering::Relaxed);
                    }
                    Step::Continue
                }
            }
        }
        VcpuExit::IoIn(p, data) => {
            exits.pio.fetch_add(1, Ordering::Relaxed);
            if !ctx.pio.read(u64::from(p), data) {
                exits.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            exits.mmio.fetch_add(1, Ordering::Relaxed);
            if !ctx.mmio.read(addr, data) {
                exits.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            exits.mmio.fetch_add(1, Ordering::Relaxed);
            if !ctx.mmio.write(addr, data) {
                exits.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Step::Continue
        }
        VcpuExit::Intr => Step::Continue,
        VcpuExit::Shutdown => Step::Stop(GuestExit::Shutdown),
        VcpuExit::InternalError => Step::Stop(GuestExit::InternalError { suberror: 0 }),
        VcpuExit::FailEntry(reason, _cpu) => Step::Stop(GuestExit::FailedEntry { reason }),
        VcpuExit::Hlt => Step::Stop(GuestExit::Halted),
        other => Step::Stop(GuestExit::Unexpected {
            exit: format!("{other:?}"),
        }),
    }
}

/// Blocks the vCPU until a kick, a stop request or `timeout_us` (0: the longest wait). The
/// console was drained when the exit arrived. The wait's work ([`VcpuContext::on_wait`])
/// runs first, and again whenever an eventfd it watches fires: the guest resumes when the
/// work gave it something to do, at a kick, or at the timeout.
fn wait(ctx: &mut VcpuContext, timeout_us: u32) {
    let us = match timeout_us {
        0 => port::WAIT_MAX_US,
        t => t.min(port::WAIT_MAX_US),
    };
    let deadline = Instant::now() + Duration::from_micros(u64::from(us));
    let watch = ctx.on_wait.as_mut().and_then(|work| (work.watch)());
    let watched = watch.as_ref().map_or(&[][..], |w| w.fds());
    let kick = [std::os::fd::AsRawFd::as_raw_fd(ctx.shared.kick.as_ref())];
    // A wait that watches nothing more (every wait but a one-CPU block domain's) allocates
    // nothing.
    let more: Vec<std::os::fd::RawFd>;
    let fds: &[std::os::fd::RawFd] = if watched.is_empty() {
        &kick
    } else {
        more = kick.iter().chain(watched).copied().collect();
        &more
    };
    let mut rearmed = false;
    loop {
        if ctx.shared.stop.load(Ordering::Acquire) {
            return;
        }
        // Read before the work looks: what is signalled after this, the work has not seen,
        // and the eventfd stays readable for it.
        for &fd in watched {
            read_eventfd(fd);
        }
        if ctx.on_wait.as_mut().is_some_and(|work| (work.run)()) {
            // The guest looks at everything again when it resumes: a kick meanwhile (the
            // work's own, or anyone's) would only end its next wait early.
            let _ = ctx.shared.kick.read();
            return;
        }
        // Work that arrived while the sources were not asked to signal runs now, once: what
        // the work then leaves (a client held back for its share) is its owner's to wake for.
        if !rearmed && watch.as_ref().is_some_and(|w| w.arm()) {
            rearmed = true;
            continue;
        }
        rearmed = false;
        let left = deadline.saturating_duration_since(Instant::now());
        ctx.shared.waiting.store(true, Ordering::Release);
        let woken = !left.is_zero() && wait_fds(fds, left);
        ctx.shared.waiting.store(false, Ordering::Release);
        // Non-blocking eventfd: a concurrent reader could have emptied it; either way it is
        // reset.
        let kicked = ctx.shared.kick.read().is_ok();
        if !woken || kicked {
            return;
        }
    }
}

/// Resets a non-blocking eventfd (EAGAIN: it was not signalled).
fn read_eventfd(fd: std::os::fd::RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a u64 we own; `fd` is an eventfd kept open by the
    // `WaitWatch` the caller holds.
    let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Holds a standby's vCPU until it is promoted or asked to stop. A guest that has its device
/// (promoted, or booted with it) goes on at once. The boot clock restarts at the promotion:
/// readiness is timed from the hand-over.
fn standby(ctx: &mut VcpuContext) {
    if !ctx.shared.enter_standby() {
        return;
    }
    while !ctx.shared.stop.load(Ordering::Acquire) && !ctx.shared.promoted.load(Ordering::Acquire) {
        if wait_eventfd(&ctx.shared.kick, Duration::from_secs(1)) {
            let _ = ctx.shared.kick.read();
        }
    }
    ctx.started = Instant::now();
}

/// Waits until `fd` is readable or `timeout` passes; returns whether it is readable.
pub fn wait_eventfd(fd: &EventFd, timeout: Duration) -> bool {
    wait_fds(&[std::os::fd::AsRawFd::as_raw_fd(fd)], timeout)
}

/// Waits until one of `fds` is readable or `timeout` passes; returns whether one is.
pub fn wait_fds(fds: &[std::os::fd::RawFd], timeout: Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `pfds` is an array of `pfds.len()` valid pollfds that we own, the timespec is
    // valid and there is no signal mask; ppoll writes only their `revents` fields.
    unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        ) > 0
    }
}

/// What the panic port says: the guest's panic record, checked (a fuzz target reads it too).
#[doc(hidden)]
pub fn read_panic(mem: &GuestMem, value: u32) -> GuestExit {
    let Ok(record) = mem.read_obj::<PanicRecord>(GuestAddress(layout::PANIC_RECORD)) else {
        return GuestExit::BadPanicReport { value };
    };
    if record.magic != PANIC_MAGIC {
        return GuestExit::BadPanicReport { value };
    }
    match PanicKind::from_raw(value) {
        Some(PanicKind::Panic) => GuestExit::Panicked {
            message: sanitize(record.message()),
        },
        Some(PanicKind::Exception) => GuestExit::Exception {
            vector: record.vector,
            rip: record.rip,
            error_code: record.error_code,
            cr2: record.cr2,
        },
        None => GuestExit::BadPanicReport { value },
    }
}

/// Guest text made printable on one line.
fn sanitize(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_classification() {
        assert!(!GuestExit::Exited { status: 0 }.is_crash());
        assert!(GuestExit::Exited { status: 3 }.is_crash());
        assert!(GuestExit::Shutdown.is_crash());
        assert!(GuestExit::Panicked {
            message: String::new()
        }
        .is_crash());
        assert!(!GuestExit::Stopped.is_crash());
        assert_eq!(
            GuestExit::InternalError { suberror: 1 }.reason(),
            "internal-error"
        );
    }

    #[test]
    fn panic_report_needs_a_valid_record() {
        let mem = crate::memory::create(2 << 20, 1 << 30).unwrap();
        assert_eq!(read_panic(&mem, 1), GuestExit::BadPanicReport { value: 1 });
        let mut r = PanicRecord {
            magic: PANIC_MAGIC,
            kind: 2,
            vector: 14,
            rip: 0x1234,
            cr2: 0xdead,
            msg_len: 100_000,
            ..Default::default()
        };
        r.msg[..3].copy_from_slice(b"a\nb");
        mem.write_obj(r, GuestAddress(layout::PANIC_RECORD))
            .unwrap();
        let e = read_panic(&mem, 2);
        assert_eq!(
            e,
            GuestExit::Exception {
                vector: 14,
                rip: 0x1234,
                error_code: 0,
                cr2: 0xdead
            }
        );
        assert!(e.to_string().contains("page fault") && e.to_string().contains("cr2=0xdead"));
        match read_panic(&mem, 1) {
            GuestExit::Panicked { message } => {
                assert!(message.starts_with("a b"));
                assert!(!message.contains('\n'));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(read_panic(&mem, 9), GuestExit::BadPanicReport { value: 9 });
    }

    #[test]
    fn port_values_of_any_width() {
        assert_eq!(port_value(&[1]), 1);
        assert_eq!(port_value(&[1, 2]), 0x201);
        assert_eq!(port_value(&[1, 0, 0, 1]), 0x0100_0001);
        assert_eq!(port_value(&[]), 0);
    }
}
