//! The block service: one thread that serves every client port of one disk.
//!
//! Each pass of its loop takes new requests from the clients' queues (parsed and checked by
//! [`super::request`]), gives each a shadow-queue entry per part (a request larger than the
//! backend's transfer limit is split), posts queued entries to the backend while it has room,
//! takes the backend's completions, copies read data to the client, answers each client
//! request once all its parts are done, and signals the clients that asked for it (EVENT_IDX).
//!
//! # Bounded client work
//!
//! Nothing a client does makes this thread work or hold memory without bound, or keeps it
//! from the other clients:
//! - **Intake is fair.** Each pass visits the ports in turn from a rotating start, and each
//!   port's queues in turn; it takes at most [`QUEUE_BUDGET`] chains from a queue, and none
//!   from a port that holds its share of parts already (accepted, not completed:
//!   [`CLIENT_SHARE`] while another client has requests held, [`CLIENT_LIMIT`] alone). A client
//!   that publishes more than that keeps the rest in its own ring, so another client's request
//!   waits behind at most one share of it, whatever it floods.
//! - **Shares are even over time.** While another client is being served (it has parts held,
//!   or took requests in this [`FAIR_WINDOW`] or the last), a client takes at most
//!   [`FAIR_SLACK`] requests more in a window than the least served of them. A client that
//!   answers its own requests at the service's pace (a flood) is held to the pace of one
//!   whose guest must turn each completion into a new request; a client alone, or next to
//!   idle ones, is not held back.
//! - **In flight per queue: at most the queue size.** Each queue's accepted, unanswered heads
//!   are a bit set; a head published again while it is in flight is a driver error (the
//!   device still owns it), and the device is marked DEVICE_NEEDS_RESET, as QEMU does when a
//!   queue exceeds its size. Once it is, nothing more is written into that device's rings.
//! - **Per chain: at most SEG_MAX data descriptors**, and the walk stops at SEG_MAX + 16
//!   descriptors, indirect tables included (see [`super::request`]).
//! - **A device reset forgets the client's requests.** At a new generation, requests the
//!   backend has not taken leave the shadow queue without a byte read from the client; those
//!   it has taken complete there and are dropped unanswered; both backends check the
//!   generation under the port's lock before they copy to or from the client's memory, so
//!   nothing is read from buffers the client reuses or written into them after the reset.
//!
//! The memory bound that follows. A client request is held only while it has parts not
//! completed, and a client holds at most `CLIENT_LIMIT + P - 1` parts, where P is the most
//! parts of one request (`MAX_REQUEST` over the backend's largest transfer: 127 over a channel
//! of 128 KiB slots, 1 from a file), since the limit is checked before each chain. So a client
//! holds at most `min(queues x QUEUE_SIZE, CLIENT_LIMIT + P - 1)` requests, each one
//! [`Pending`] with at most SEG_MAX segments (16 bytes each: about 4 KiB) and one shadow entry
//! per part (under 100 bytes): with the defaults under 1.1 MiB per client (256 requests of
//! 4 KiB of segments, 382 parts), whatever it sends and however long a driver domain is down
//! (what it publishes beyond that waits in its ring).
//!
//! With nothing to do it polls a little (exits cost tens of µs here, a short spin is cheaper
//! than sleeping and being woken), then asks for notifications from every side — the clients'
//! queues (avail_event), the driver domain (NOTIFY_ME) — re-checks, and sleeps on their
//! eventfds. On a machine where it has one CPU it does not poll: the work it would poll for
//! needs that CPU (the driver domain polls not either there, see `domain::poll_keys`).
//!
//! A driver domain's vCPU thread runs passes too: when the domain waits, the work it waits
//! for is a pass (run the device on the commands it submitted, take its completions, post new
//! requests), so its thread runs one in the wait exit it pays anyway and resumes the domain at
//! once if the pass made progress. On two cores the domain and this thread otherwise take
//! turns on one core, each turn a wake-up and a wait exit (measured: ~70 µs of CPU per exit,
//! one exit per ~15 requests). The state is one `Worker` behind a lock: the domain's
//! thread only tries it (it never blocks on this thread, which may be joining it), and leaves
//! recovery (detection, restarts, teardown) to this thread, which keeps serving whatever the
//! domain does, so a hung domain is detected as before.
//!
//! A domain that waits as soon as it has nothing to do (it does not poll: one CPU, see
//! `domain::driver_waits`) also watches the clients' notifications in its waits and runs the
//! pass when one comes: a client's request then goes from its kick to the domain with no
//! hop through this thread, which no longer watches them while such a domain is live (it
//! still looks at every pass, and at least every `sleep_limit`). A request published while
//! the domain runs waits for the domain's next wait, which the domain's own work ends in.
//! Whoever reads a notification runs a pass after it, so none is lost between the two.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddvm_recovery::shadow::{ShadowQueue, State};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, BackendError, Finished};
use super::device::{ClientPort, QUEUE_SIZE};
use super::replay::{BlockOp, Op};
use super::request::{self, status, Invalid, Kind, Segments};
use crate::domain::OwnerWork;
use crate::memory::GuestMem;
use crate::sync::lock;
use crate::vcpu::{wait_fds, WaitWatch};

/// How long the loop polls before it sleeps.
const SPIN: Duration = Duration::from_micros(300);
/// Longest sleep (a safety net: every source has an eventfd).
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// Chains taken from one client queue in one pass, at most.
pub const QUEUE_BUDGET: usize = 16;
/// Parts of one client the service holds (accepted and not completed: waiting for the backend
/// or in flight there) at which its queues are left alone while another client has requests
/// held too: the rest of what it published waits in its own ring, not ahead of the others'.
pub const CLIENT_SHARE: usize = 16;
/// The same limit for a client that is alone on the disk (enough to keep a driver domain's
/// channel full).
pub const CLIENT_LIMIT: usize = 256;
/// The window over which clients' intake is kept even.
pub const FAIR_WINDOW: Duration = Duration::from_millis(1);
/// While another client has requests held, a client takes at most this many requests more
/// in a [`FAIR_WINDOW`] than the least served of the others: equal shares of the service,
/// whatever one of them publishes. (A client that is idle, or alone, is not held back.)
pub const FAIR_SLACK: u32 = 16;

/// A part of a client request, as a shadow-queue entry carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// The client request.
    pub rid: u64,
    /// Offset of the part in the request's data.
    pub offset: u64,
    /// Bytes of the part.
    pub len: u64,
}

/// A client request being served.
#[derive(Debug)]
pub struct Pending {
    /// Index of the client port.
    pub port: usize,
    /// Index of the request queue it came from.
    pub queue: u16,
    /// Queue generation it came from.
    pub generation: u64,
    /// Head descriptor index.
    pub head: u16,
    /// Kind.
    pub kind: Kind,
    /// Data buffers in the client's memory.
    pub data: Segments,
    /// Status byte address.
    pub status: u64,
    /// Parts not yet completed.
    pub parts_left: u32,
    /// Worst status so far.
    pub result: u8,
    /// When it was taken from the client's queue.
    pub taken: Instant,
}

/// Counters of a block service.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Client requests answered (valid or not).
    pub answered: AtomicU64,
    /// Bytes copied between client memory and the backend.
    pub copy_bytes: AtomicU64,
    /// Time spent copying, in nanoseconds.
    pub copy_ns: AtomicU64,
    /// Passes a driver domain's vCPU thread ran in its wait exits that made progress (the
    /// domain then resumed at once instead of waiting).
    pub domain_passes: AtomicU64,
    /// Times the service's thread slept (found nothing to do and blocked until an eventfd or
    /// its time limit): a wake-up each.
    pub sleeps: AtomicU64,
    /// Client requests answered with a status other than OK.
    pub errors: AtomicU64,
    /// Latencies of the requests answered through the backend, from intake to answer.
    pub latency: crate::metrics::LatencyHistogram,
    /// VM exits of the domain serving now (refreshed by the service at most every
    /// [`EXITS_REFRESH`]).
    pub domain_exits: AtomicU64,
}

impl ServiceCounters {
    /// Runs `copy` (which moves `len` bytes), counting the bytes and the time it took.
    pub fn copy<R>(&self, len: u64, copy: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = copy();
        self.copy_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.copy_bytes.fetch_add(len, Ordering::Relaxed);
        r
    }
}

/// State shared with the service thread.
pub struct ServiceShared {
    stop: AtomicBool,
    wake: EventFd,
    /// Counters.
    pub counters: ServiceCounters,
    stopped: Mutex<Option<crate::stop::StopReport>>,
}

impl ServiceShared {
    fn new() -> std::io::Result<Self> {
        Ok(ServiceShared {
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            counters: ServiceCounters::default(),
            stopped: Mutex::new(None),
        })
    }
}

/// The service's pass on the vCPU thread of its disk's driver domain, when the domain waits
/// (see the module docs).
struct DomainThreadPass {
    worker: Weak<Mutex<Worker>>,
    shared: Arc<ServiceShared>,
    watch: Arc<ClientNotifies>,
}

impl OwnerWork for DomainThreadPass {
    fn pass(&self) -> bool {
        let Some(w) = self.worker.upgrade() else {
            return false;
        };
        let Ok(mut guard) = w.try_lock() else {
            // The service thread holds the worker: it may be arming its sleep, past its last
            // look at the completion ring or the clients' queues, while the domain waits with
            // completions it did not notify (it leaves that to its wait's pass). Wake the
            // service so that it looks again.
            let _ = self.shared.wake.write(1);
            return false;
        };
        let (work, raises) = guard.domain_thread_pass();
        drop(guard);
        raises.raise();
        work
    }

    fn watch(&self) -> Option<Arc<dyn WaitWatch>> {
        Some(self.watch.clone())
    }
}

/// The clients' notification eventfds, for a domain's wait to watch: open while this lives
/// (it holds their ports; the domain's thread holds it while it waits).
struct ClientNotifies {
    fds: Vec<RawFd>,
    _ports: Vec<Arc<ClientPort>>,
    worker: Weak<Mutex<Worker>>,
    shared: Arc<ServiceShared>,
}

impl WaitWatch for ClientNotifies {
    fn fds(&self) -> &[RawFd] {
        &self.fds
    }

    /// Asks every client queue for a notification (its event index: the pass that took
    /// requests moved past the last one asked for) and re-checks.
    fn arm(&self) -> bool {
        let Some(w) = self.worker.upgrade() else {
            return false;
        };
        let Ok(w) = w.try_lock() else {
            // The service's thread asks before it sleeps, and passes until then.
            let _ = self.shared.wake.write(1);
            return false;
        };
        w.enable_client_notifications()
    }
}

/// A running block service.
pub struct BlockService {
    name: String,
    shared: Arc<ServiceShared>,
    ports: Vec<Arc<ClientPort>>,
    thread: Option<JoinHandle<Backend>>,
}

impl BlockService {
    /// Starts serving `ports` from `backend` on a new thread.
    pub fn spawn(
        name: &str,
        ports: Vec<Arc<ClientPort>>,
        backend: Backend,
    ) -> std::io::Result<BlockService> {
        let shared = Arc::new(ServiceShared::new()?);
        let worker = Worker {
            shared: shared.clone(),
            ports: ports.clone(),
            backend,
            shadow: ShadowQueue::new(),
            pending: HashMap::new(),
            next_rid: 0,
            signal: vec![0; ports.len()],
            finished: Vec::new(),
            tracks: (0..ports.len()).map(|_| Track::default()).collect(),
            cursor: 0,
            window: Instant::now(),
            window_len: FAIR_WINDOW,
            outstanding: vec![0; ports.len()],
        };
        let worker = Arc::new(Mutex::new(worker));
        if let Backend::Channel(c) = &lock(&worker).backend {
            c.set_domain_thread_pass(Some(Arc::new(DomainThreadPass {
                worker: Arc::downgrade(&worker),
                shared: shared.clone(),
                watch: Arc::new(ClientNotifies {
                    fds: ports.iter().map(|p| p.notify.as_raw_fd()).collect(),
                    _ports: ports.clone(),
                    worker: Arc::downgrade(&worker),
                    shared: shared.clone(),
                }),
            })));
        }
        let thread = std::thread::Builder::new()
            .name(format!("blk-{name}"))
            .spawn(move || {
                // On one CPU, the service lets the clients fill their queues before it runs.
                if !crate::sys::cpus_to_spare() {
                    let _ = crate::sys::batch_scheduling();
                }
                crate::seccomp::enter(crate::seccomp::ThreadClass::BlockService);
                run(worker)
            })?;
        Ok(BlockService {
            name: name.to_string(),
            shared,
            ports,
            thread: Some(thread),
        })
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counters.
    pub fn counters(&self) -> &ServiceCounters {
        &self.shared.counters
    }

    /// What the control plane reads of this disk's I/O when asked (`ctl metrics`).
    pub fn io_source(&self) -> crate::metrics::IoSource {
        let shared = self.shared.clone();
        let name = self.name.clone();
        Arc::new(move || {
            let c = &shared.counters;
            let exits = c.domain_exits.load(Ordering::Relaxed);
            crate::metrics::DeviceIo {
                domain: name.clone(),
                device: "blk",
                requests: c.answered.load(Ordering::Relaxed),
                bytes: c.copy_bytes.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                latency: Some(c.latency.snapshot()),
                vm_exits: (exits > 0).then_some(exits),
            }
        })
    }

    /// The client ports.
    pub fn ports(&self) -> &[Arc<ClientPort>] {
        &self.ports
    }

    /// Whether the thread has ended (it ends only when stopped, or on a VMM bug).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// How the disk's orderly stop went, once [`BlockService::stop`] has run it.
    pub fn stop_report(&self) -> Option<crate::stop::StopReport> {
        lock(&self.shared.stopped).clone()
    }

    /// Stops the thread in order (see [`crate::stop`]: no new requests, those taken answered,
    /// a final flush, the device shut down); returns the backend (or the error that stopped
    /// it).
    pub fn stop(&mut self) -> Result<Backend, BackendError> {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| BackendError::Panicked),
            None => Err(BackendError::Stopped),
        }
    }
}

impl Drop for BlockService {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}

/// The service thread: passes while there is progress, a short poll, then sleep. Returns the
/// backend once stopped.
/// How often the service reads its domain's VM exits for the control plane, at most.
pub const EXITS_REFRESH: Duration = Duration::from_millis(100);

fn run(worker: Arc<Mutex<Worker>>) -> Backend {
    let shared = lock(&worker).shared.clone();
    // On one CPU the spin would only keep the client, the domain and the device from it.
    let spin = if crate::sys::cpus_to_spare() {
        SPIN
    } else {
        Duration::ZERO
    };
    let mut idle_since: Option<Instant> = None;
    let mut exits_read = Instant::now();
    let mut passes = 0u32;
    while !shared.stop.load(Ordering::Acquire) {
        passes = passes.wrapping_add(1);
        if passes.is_multiple_of(256) && exits_read.elapsed() >= EXITS_REFRESH {
            lock(&worker).refresh_exits();
            exits_read = Instant::now();
        }
        let (progress, raises) = lock(&worker).pass();
        raises.raise();
        if progress > 0 {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < spin {
            // Two cores run the client, this thread, the domain and the device: let a
            // runnable one have the CPU while polling.
            std::thread::yield_now();
            continue;
        }
        if exits_read.elapsed() >= EXITS_REFRESH {
            lock(&worker).refresh_exits();
            exits_read = Instant::now();
        }
        Worker::sleep(&worker);
        idle_since = None;
    }
    Worker::stop_in_order(&worker);
    if let Backend::Channel(c) = &lock(&worker).backend {
        c.set_domain_thread_pass(None);
    }
    // The domain's thread may hold the worker for a pass that started before the line
    // above; the worker is ours once it is done.
    let mut worker = worker;
    loop {
        match Arc::try_unwrap(worker) {
            Ok(w) => return w.into_inner().unwrap_or_else(|p| p.into_inner()).backend,
            Err(w) => {
                worker = w;
                std::thread::yield_now();
            }
        }
    }
}

/// The service's state, driven by its thread ([`BlockService`]); its steps one at a time
/// only for tests and the fuzz targets (`cfg(fuzzing)`).
#[doc(hidden)]
pub struct Worker {
    shared: Arc<ServiceShared>,
    ports: Vec<Arc<ClientPort>>,
    backend: Backend,
    shadow: ShadowQueue<BlockOp, Part>,
    pending: HashMap<u64, Pending>,
    next_rid: u64,
    /// Per port, the queues (bits by index) that got answers since the last signal.
    signal: Vec<u64>,
    finished: Vec<Finished>,
    /// Per port: the generation served and the heads in flight on each queue.
    tracks: Vec<Track>,
    /// The port intake starts at in the next pass (round-robin).
    cursor: usize,
    /// Per port, its parts held: accepted and not completed (or forgotten at a reset).
    outstanding: Vec<usize>,
    /// When the current fairness window began, and its length ([`FAIR_WINDOW`]).
    window: Instant,
    window_len: Duration,
}

/// Heads of one queue accepted and not yet answered: one bit per descriptor index, so at most
/// the queue size of them.
#[derive(Clone, Copy, Debug, Default)]
struct Heads([u64; (QUEUE_SIZE as usize).div_ceil(64)]);

impl Heads {
    fn contains(&self, head: u16) -> bool {
        let h = usize::from(head);
        self.0.get(h / 64).is_some_and(|w| w >> (h % 64) & 1 == 1)
    }

    fn set(&mut self, head: u16, on: bool) {
        let h = usize::from(head);
        if let Some(w) = self.0.get_mut(h / 64) {
            if on {
                *w |= 1 << (h % 64);
            } else {
                *w &= !(1 << (h % 64));
            }
        }
    }

    #[cfg(any(test, fuzzing))]
    fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

/// Client interrupts a pass owes, raised once the worker is unlocked
/// ([`Raises::raise`]): the client vCPU an interrupt wakes may take the CPU at once (on one
/// CPU it does), and the thread it preempted must not be holding the worker, or the next
/// pass (the domain's wait, the service) finds it taken and waits for that thread.
#[derive(Default)]
#[must_use]
struct Raises(Vec<(Arc<ClientPort>, u64)>);

impl Raises {
    /// Raises each client's interrupt, unless it reset its device since: the driver after the
    /// reset is owed nothing from that pass. Not under the port's lock either, which the
    /// service's intake takes (a reset just after the look costs that driver one spurious
    /// interrupt, which virtio drivers expect).
    fn raise(self) {
        for (port, generation) in self.0 {
            let current = port.lock().generation == generation;
            if current {
                port.interrupt.raise(crate::virtio::interrupt::VRING);
            }
        }
    }
}

/// What the service knows of one client port.
#[derive(Debug, Default)]
struct Track {
    /// The port generation its requests are served for.
    generation: u64,
    /// Heads in flight by queue index.
    heads: Vec<Heads>,
    /// The queue intake starts at in the port's next turn (round-robin).
    next_queue: usize,
    /// Its window was full at the last intake: chains it published wait in its ring.
    held: bool,
    /// Requests taken in the current [`FAIR_WINDOW`], and in the one before.
    taken: u32,
    taken_before: u32,
    /// Requests of an earlier generation the backend may still be carrying out: the new
    /// generation's requests wait until they are gone, so an abandoned write can never land
    /// after a new one to the same sectors.
    abandoned: HashSet<u64>,
}

impl Track {
    /// Whether the client is being served: it has parts held, or took requests in this window
    /// or the last one.
    fn active(&self, outstanding: usize) -> bool {
        outstanding > 0 || self.taken > 0 || self.taken_before > 0
    }
}

impl Track {
    fn heads(&mut self, queue: u16) -> &mut Heads {
        let q = usize::from(queue);
        if self.heads.len() <= q {
            self.heads.resize(q + 1, Heads::default());
        }
        &mut self.heads[q]
    }
}

impl Worker {
    /// One pass: intake, post, collect. Returns the progress made and the clients to
    /// interrupt once the worker is unlocked.
    fn pass(&mut self) -> (usize, Raises) {
        let progress = self.intake() + self.post() + self.collect();
        (progress, self.take_raises())
    }

    /// A pass on the domain's vCPU thread, in its wait exit (see the module docs): the
    /// device and the domain's completions first (what the domain waits for), then new
    /// requests for it. True when the domain has work again (the device completed commands,
    /// or requests were posted): it resumes at once. Completions taken and answered are no
    /// work of the domain's: it waits on. The clients to interrupt come with it, to raise
    /// once the worker is unlocked.
    fn domain_thread_pass(&mut self) -> (bool, Raises) {
        let Backend::Channel(c) = &mut self.backend else {
            return (false, Raises::default());
        };
        c.set_on_domain_thread(true);
        let device = c.poll_device();
        let collected = self.collect();
        let taken = self.intake();
        let posted = self.post();
        let raises = self.take_raises();
        if let Backend::Channel(c) = &mut self.backend {
            c.set_on_domain_thread(false);
        }
        if device + collected + taken + posted > 0 {
            self.shared
                .counters
                .domain_passes
                .fetch_add(1, Ordering::Relaxed);
        }
        (device + posted > 0, raises)
    }

    /// Publishes the VM exits of the domain serving now (`ctl metrics`).
    fn refresh_exits(&self) {
        if let Backend::Channel(c) = &self.backend {
            if let Some(e) = c.domain().and_then(|d| d.vcpu_stat("exits")) {
                self.shared
                    .counters
                    .domain_exits
                    .store(e, Ordering::Relaxed);
            }
        }
    }

    /// Arms every notification, re-checks, and sleeps (without the lock, so the domain's
    /// thread can run passes meanwhile) until an eventfd fires.
    fn sleep(worker: &Mutex<Worker>) {
        let mut w = lock(worker);
        let mut ready = w.enable_client_notifications();
        ready |= w.backend.arm(true);
        if !ready {
            // A domain whose waits watch the clients takes their requests itself (see the
            // module docs); the service looks at them at least every `sleep_limit`.
            let mut fds: Vec<RawFd> = if w.backend.clients_watched() {
                Vec::new()
            } else {
                w.ports.iter().map(|p| p.notify.as_raw_fd()).collect()
            };
            fds.push(w.shared.wake.as_raw_fd());
            fds.extend(w.backend.wait_fds());
            let mut limit = MAX_SLEEP.min(w.backend.sleep_limit());
            if w.tracks.iter().any(|t| t.held) {
                // A client held back for its share is served again in the next window.
                limit = limit.min(w.window_len);
            }
            w.shared.counters.sleeps.fetch_add(1, Ordering::Relaxed);
            drop(w);
            wait_fds(&fds, limit);
            w = lock(worker);
        }
        for port in &w.ports {
            let _ = port.notify.read();
        }
        let _ = w.shared.wake.read();
        w.backend.arm(false);
        for port in &w.ports {
            let mut st = port.lock();
            for q in st.queues.iter_mut().flatten() {
                let _ = q.disable_notification(&port.mem);
            }
        }
    }

    /// Asks every client queue for a notification and re-checks: true when a client added
    /// requests meanwhile. A client whose window is full has requests left in its ring on
    /// purpose: the backend's progress wakes the service for it.
    fn enable_client_notifications(&self) -> bool {
        let mut ready = false;
        for (port, track) in self.ports.iter().zip(&self.tracks) {
            let mut st = port.lock();
            if st.needs_reset {
                continue;
            }
            for q in st.queues.iter_mut().flatten() {
                // Ok(true): the driver added buffers meanwhile.
                ready |= q.enable_notification(&port.mem).unwrap_or(true) && !track.held;
            }
        }
        ready
    }

    /// Takes new requests from the client queues, fairly: ports in turn from a rotating start,
    /// each port's queues in turn, at most [`QUEUE_BUDGET`] chains per queue per pass, and none
    /// from a port that holds its share of parts already ([`CLIENT_SHARE`] while others have
    /// requests held, else [`CLIENT_LIMIT`]).
    fn intake(&mut self) -> usize {
        if self.shared.stop.load(Ordering::Acquire) {
            // Stopping: what is taken is answered, nothing new is taken.
            return 0;
        }
        let count = self.ports.len();
        if count == 0 {
            return 0;
        }
        let start = self.cursor % count;
        self.cursor = (start + 1) % count;
        let now = Instant::now();
        if now.saturating_duration_since(self.window) >= self.window_len {
            self.window = now;
            for t in &mut self.tracks {
                t.taken_before = std::mem::take(&mut t.taken);
            }
        }
        let mut n = 0;
        for k in 0..count {
            let i = (start + k) % count;
            let port = self.ports[i].clone();
            let mut st = port.lock();
            self.sync_generation(i, st.generation);
            self.tracks[i].held = false;
            if st.needs_reset || st.queues.is_empty() {
                continue;
            }
            if !self.tracks[i].abandoned.is_empty() {
                let abandoned = &self.tracks[i].abandoned;
                if self
                    .shadow
                    .iter()
                    .any(|e| abandoned.contains(&e.client.rid))
                {
                    // The backend still carries some out: the client's new requests wait in
                    // its ring (the backend's progress wakes the service).
                    self.tracks[i].held = true;
                    continue;
                }
                self.tracks[i].abandoned.clear();
            }
            let limits = port.geometry.limits();
            let queues = st.queues.len();
            let first = self.tracks[i].next_queue % queues;
            self.tracks[i].next_queue = (first + 1) % queues;
            for j in 0..queues {
                let queue = ((first + j) % queues) as u16;
                if st.needs_reset {
                    break;
                }
                n += self.intake_queue(&port, &mut st, i, queue, &limits);
            }
        }
        n
    }

    /// Takes up to [`QUEUE_BUDGET`] chains from queue `queue` of port `i` (locked as `st`).
    fn intake_queue(
        &mut self,
        port: &ClientPort,
        st: &mut super::device::PortState,
        i: usize,
        queue: u16,
        limits: &request::Limits,
    ) -> usize {
        let generation = st.generation;
        let others = self
            .outstanding
            .iter()
            .enumerate()
            .any(|(j, &held)| j != i && held > 0);
        let limit = if others { CLIENT_SHARE } else { CLIENT_LIMIT };
        // Even shares: no more than the least served of the other clients with requests held,
        // and some slack, in this window.
        let allowance = (0..self.ports.len())
            .filter(|&j| j != i && self.tracks[j].active(self.outstanding[j]))
            .map(|j| self.tracks[j].taken.saturating_add(FAIR_SLACK))
            .min()
            .unwrap_or(u32::MAX);
        let mut n = 0;
        let mut unusable = None;
        while n < QUEUE_BUDGET {
            if self.outstanding[i] >= limit || self.tracks[i].taken >= allowance {
                self.tracks[i].held = true;
                break;
            }
            let Some(Some(q)) = st.queues.get_mut(usize::from(queue)) else {
                break;
            };
            let chain = match q.iter(&port.mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    unusable = Some("available index moved past the queue size");
                    break;
                }
            };
            let Some(chain) = chain else {
                break;
            };
            n += 1;
            self.tracks[i].taken = self.tracks[i].taken.saturating_add(1);
            let head = chain.head_index();
            if self.tracks[i].heads(queue).contains(head) {
                // The driver gave back a chain the device still owns: more than the queue
                // size could be in flight.
                unusable = Some("a head published again while still in flight");
                break;
            }
            match request::parse(chain, &port.mem, limits) {
                Ok(req) => match self.accept(i, queue, generation, head, req) {
                    Some((head, status_addr, value, len)) => {
                        self.answer_locked(port, st, (i, queue, head), status_addr, value, len);
                    }
                    None => {
                        self.tracks[i].heads(queue).set(head, true);
                    }
                },
                Err(Invalid::Status { status, value, why }) => {
                    crate::limited!(debug, key: port.name, "{}: request refused: {why}", port.name);
                    self.answer_locked(port, st, (i, queue, head), status, value, 0);
                }
                Err(Invalid::Unusable(why)) => {
                    unusable = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = unusable {
            port.give_up_queue(st, why);
        }
        n
    }

    /// Port `i` is at `generation`: if the client reset its device since the last look, its
    /// earlier requests are forgotten. Those the backend never took leave the shadow queue
    /// unread (nothing is read from the client's memory for them); those it took complete
    /// there, or are dropped when it finds them forgotten at their next posting (after a
    /// domain was lost), and are never answered. The backends check the generation again,
    /// under the port's lock, before they copy to or from the client's memory.
    fn sync_generation(&mut self, i: usize, generation: u64) {
        let track = &mut self.tracks[i];
        if track.generation == generation {
            return;
        }
        track.generation = generation;
        track.heads.clear();
        let stale: HashSet<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.port == i && p.generation != generation)
            .map(|(&rid, _)| rid)
            .collect();
        if stale.is_empty() {
            return;
        }
        for rid in &stale {
            if let Some(p) = self.pending.remove(rid) {
                self.outstanding[i] = self.outstanding[i].saturating_sub(p.parts_left as usize);
            }
        }
        self.tracks[i].abandoned.extend(stale.iter().copied());
        let queued: Vec<u64> = self
            .shadow
            .iter()
            // Never posted: the backend holds nothing for them. One posted before (back in the
            // queue after a domain was lost) is left to the backend, which drops it, with what
            // it keeps for it, when it finds it forgotten.
            .filter(|e| {
                e.state == State::Queued && e.attempts == 0 && stale.contains(&e.client.rid)
            })
            .map(|e| e.seq)
            .collect();
        for seq in queued {
            self.shadow.remove(seq);
        }
    }

    /// Accepts a valid request: answers it at once (get-id) or queues its parts.
    fn accept(
        &mut self,
        port: usize,
        queue: u16,
        generation: u64,
        head: u16,
        req: request::Request,
    ) -> Option<(u16, u64, u8, u32)> {
        let p = &self.ports[port];
        if req.kind == Kind::GetId {
            let mut id = [0u8; request::ID_BYTES];
            let serial = p.geometry.serial.as_bytes();
            let n = serial.len().min(id.len());
            id[..n].copy_from_slice(&serial[..n]);
            let ok = req
                .data
                .slice(0, id.len() as u64)
                .write_from(&p.mem, &id)
                .is_ok();
            return Some(if ok {
                (head, req.status, status::OK, id.len() as u32)
            } else {
                (head, req.status, status::IOERR, 0)
            });
        }
        let now = Instant::now();
        let rid = self.next_rid;
        self.next_rid += 1;
        let first = p.geometry.range.first + req.sector;
        let op = match req.kind {
            Kind::Read => Op::Read,
            Kind::Write => Op::Write,
            Kind::Flush => Op::Flush,
            Kind::Discard => Op::Discard,
            Kind::WriteZeroes => Op::WriteZeroes,
            Kind::GetId => unreachable!("answered above"),
        };
        let mut parts = 0;
        if matches!(op, Op::Read | Op::Write) {
            let max = self.backend.max_transfer();
            let mut offset = 0;
            while offset < req.data.len {
                let len = (req.data.len - offset).min(max);
                let part = Part { rid, offset, len };
                self.shadow.push(
                    BlockOp {
                        kind: op,
                        sector: first + offset / 512,
                        sectors: (len / 512) as u32,
                    },
                    part,
                    now,
                );
                offset += len;
                parts += 1;
            }
        } else {
            let part = Part {
                rid,
                offset: 0,
                len: 0,
            };
            let (sector, sectors) = if op == Op::Flush {
                (0, 0)
            } else {
                (first, req.sectors as u32)
            };
            self.shadow.push(
                BlockOp {
                    kind: op,
                    sector,
                    sectors,
                },
                part,
                now,
            );
            parts = 1;
        }
        self.outstanding[port] += parts as usize;
        self.pending.insert(
            rid,
            Pending {
                port,
                queue,
                generation,
                head,
                kind: req.kind,
                data: req.data,
                status: req.status,
                parts_left: parts,
                result: status::OK,
                taken: now,
            },
        );
        None
    }

    /// Posts queued parts while the backend has room.
    fn post(&mut self) -> usize {
        self.backend.post(
            &mut self.shadow,
            &self.pending,
            &self.ports,
            &self.shared.counters,
        )
    }

    /// Takes completed parts; answers requests whose parts are all done.
    fn collect(&mut self) -> usize {
        self.finished.clear();
        let n = self.backend.collect(
            &mut self.shadow,
            &self.pending,
            &self.ports,
            &self.shared.counters,
            &mut self.finished,
        );
        for i in 0..self.finished.len() {
            let f = self.finished[i];
            let Some(p) = self.pending.get_mut(&f.part.rid) else {
                continue;
            };
            p.result = p.result.max(f.status);
            p.parts_left -= 1;
            self.outstanding[p.port] = self.outstanding[p.port].saturating_sub(1);
            if p.parts_left == 0 {
                if let Some(p) = self.pending.remove(&f.part.rid) {
                    self.answer(p);
                }
            }
        }
        n
    }

    fn answer(&mut self, p: Pending) {
        let port = self.ports[p.port].clone();
        let mut st = port.lock();
        if st.generation != p.generation {
            // The client reset its device: it no longer expects an answer.
            return;
        }
        // Data bytes written into the client's buffers: a read's, when it succeeded.
        let len = if p.result == status::OK && p.kind == Kind::Read {
            p.data.len as u32
        } else {
            0
        };
        let at = (p.port, p.queue, p.head);
        self.shared.counters.latency.record(p.taken.elapsed());
        self.answer_locked(&port, &mut st, at, p.status, p.result, len);
    }

    /// Writes the status byte and puts the chain `at` (port, queue, head) in its queue's used
    /// ring. `len`: data bytes written into the client's buffers (the status byte is added).
    fn answer_locked(
        &mut self,
        port: &ClientPort,
        st: &mut super::device::PortState,
        (index, queue, head): (usize, u16, u16),
        status_addr: u64,
        value: u8,
        len: u32,
    ) {
        self.shared
            .counters
            .answered
            .fetch_add(1, Ordering::Relaxed);
        if value != status::OK {
            self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.tracks[index].heads(queue).set(head, false);
        if st.needs_reset {
            // The device gave up on the driver: nothing more goes into its rings until it
            // resets the device (as QEMU stops once it sets DEVICE_NEEDS_RESET).
            return;
        }
        let Some(Some(q)) = st.queues.get_mut(usize::from(queue)) else {
            return;
        };
        let written = port.mem.write_obj(value, GuestAddress(status_addr)).is_ok();
        if !written || q.add_used(&port.mem, head, len + 1).is_err() {
            port.give_up_queue(st, "used ring or status byte not writable");
            return;
        }
        self.signal[index] |= 1 << queue;
    }

    /// Signals clients that got answers, where their event index asks for it.
    fn signal_clients(&mut self) {
        self.take_raises().raise();
    }

    /// The clients that got answers since the last call and asked to be told: one interrupt
    /// per device, owed when any queue that got answers asks for it (every queue's event
    /// index is checked, so each knows it was seen).
    fn take_raises(&mut self) -> Raises {
        let mut raises = Raises::default();
        for (i, port) in self.ports.iter().enumerate() {
            let answered = std::mem::take(&mut self.signal[i]);
            if answered == 0 {
                continue;
            }
            let mut st = port.lock();
            let mut raise = false;
            for (n, q) in st.queues.iter_mut().enumerate() {
                if let Some(q) = q.as_mut().filter(|_| answered >> n & 1 == 1) {
                    raise |= q.needs_notification(&port.mem).unwrap_or(true);
                }
            }
            if raise {
                raises.0.push((port.clone(), st.generation));
            }
        }
        raises
    }

    /// The orderly stop (see [`crate::stop`]), once the loop has ended: passes without intake
    /// until every request taken is answered and the backend has settled (at most
    /// [`crate::stop::DRAIN_TIMEOUT`]), then the backend's final flush and shutdown.
    fn stop_in_order(worker: &Mutex<Worker>) {
        let started = Instant::now();
        loop {
            let mut w = lock(worker);
            // Intake is over, but a client that resets meanwhile still forgets its requests.
            for i in 0..w.ports.len() {
                let generation = w.ports[i].lock().generation;
                w.sync_generation(i, generation);
            }
            let progress = w.post() + w.collect();
            w.signal_clients();
            if (w.pending.is_empty() && w.backend.settled(&w.shadow))
                || started.elapsed() >= crate::stop::DRAIN_TIMEOUT
            {
                break;
            }
            drop(w);
            if progress == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let mut w = lock(worker);
        let unanswered = w.pending.len();
        let report = w.backend.shut_down(started, unanswered);
        *lock(&w.shared.stopped) = Some(report);
    }
}

/// What the tests and the fuzz targets drive and look at: the service's steps one at a time,
/// without its thread.
#[cfg(any(test, fuzzing))]
impl Worker {
    /// A worker serving `ports` from `backend`, with no thread.
    pub fn for_test(ports: Vec<Arc<ClientPort>>, backend: Backend) -> Worker {
        Worker {
            shared: Arc::new(ServiceShared::new().unwrap()),
            signal: vec![0; ports.len()],
            tracks: (0..ports.len()).map(|_| Track::default()).collect(),
            outstanding: vec![0; ports.len()],
            ports,
            backend,
            shadow: ShadowQueue::new(),
            pending: HashMap::new(),
            next_rid: 0,
            finished: Vec::new(),
            cursor: 0,
            window: Instant::now(),
            window_len: FAIR_WINDOW,
        }
    }

    /// Takes new requests only (as while the backend is down).
    pub fn test_intake(&mut self) -> usize {
        self.intake()
    }

    /// Posts and collects only.
    pub fn test_post_collect(&mut self) -> usize {
        let n = self.post() + self.collect();
        self.signal_clients();
        n
    }

    /// A whole pass.
    pub fn test_pass(&mut self) -> usize {
        let (n, raises) = self.pass();
        raises.raise();
        n
    }

    /// Sets the fairness window's length (from now).
    pub fn test_fair_window(&mut self, len: Duration) {
        self.window = Instant::now();
        self.window_len = len;
    }

    /// Client requests the service holds (accepted, not answered).
    pub fn test_pending(&self) -> usize {
        self.pending.len()
    }

    /// Entries in the shadow queue.
    pub fn test_shadow(&self) -> usize {
        self.shadow.len()
    }

    /// Pending requests of port `port`.
    pub fn test_pending_of(&self, port: usize) -> usize {
        self.pending.values().filter(|p| p.port == port).count()
    }

    /// Heads in flight on queue `queue` of port `port`.
    pub fn test_heads(&self, port: usize, queue: u16) -> u32 {
        self.tracks[port]
            .heads
            .get(usize::from(queue))
            .map_or(0, Heads::len)
    }

    /// The ports of the shadow queue's queued entries, oldest first.
    pub fn test_queued_ports(&self) -> Vec<usize> {
        self.shadow
            .iter()
            .filter(|e| e.state == State::Queued)
            .filter_map(|e| self.pending.get(&e.client.rid).map(|p| p.port))
            .collect()
    }
}

/// Copies between a client's `segments` and `other` memory at `gpa` (as many bytes as the
/// segments hold); `to_client` chooses the direction. Counts bytes and time.
pub fn copy_part(
    client: &GuestMem,
    segments: &Segments,
    other: &GuestMem,
    gpa: u64,
    to_client: bool,
    counters: &ServiceCounters,
) -> bool {
    counters.copy(segments.len, || {
        let mut pos = gpa;
        for &(addr, n) in &segments.runs {
            let n = n as usize;
            let (Ok(c), Ok(o)) = (
                client.get_slice(GuestAddress(addr), n),
                other.get_slice(GuestAddress(pos), n),
            ) else {
                return false;
            };
            if to_client {
                o.copy_to_volatile_slice(c);
            } else {
                c.copy_to_volatile_slice(o);
            }
            pos += n as u64;
        }
        true
    })
}
