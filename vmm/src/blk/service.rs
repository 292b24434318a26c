//! The block service: one thread that serves every client port of one disk.
//!
//! Each pass of its loop takes new requests from the clients' queues (parsed and checked by
//! [`super::request`]), gives each a shadow-queue entry per part (a request larger than the
//! backend's transfer limit is split), posts queued entries to the backend while it has room,
//! takes the backend's completions, copies read data to the client, answers each client
//! request once all its parts are done, and signals the clients that asked for it (EVENT_IDX).
//!
//! With nothing to do it polls a little (exits cost tens of µs here, a short spin is cheaper
//! than sleeping and being woken), then asks for notifications from every side — the clients'
//! queues (avail_event), the driver domain (NOTIFY_ME) — re-checks, and sleeps on their
//! eventfds.
//!
//! A driver domain's vCPU thread runs passes too: when the domain waits, the work it waits
//! for is a pass (run the device on the commands it submitted, take its completions, post new
//! requests), so its thread runs one in the wait exit it pays anyway and resumes the domain at
//! once if the pass made progress. On two cores the domain and this thread otherwise take
//! turns on one core, each turn a wake-up and a wait exit (measured: ~70 µs of CPU per exit,
//! one exit per ~15 requests). The state is one [`Worker`] behind a lock: the domain's
//! thread only tries it (it never blocks on this thread, which may be joining it), and leaves
//! recovery (detection, restarts, teardown) to this thread, which keeps serving whatever the
//! domain does, so a hung domain is detected as before.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ddvm_recovery::shadow::{Op, ShadowQueue};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, BackendError, Finished};
use super::device::ClientPort;
use super::request::{self, status, Invalid, Kind, Segments};
use crate::memory::GuestMem;
use crate::vcpu::wait_fds;

/// How long the loop polls before it sleeps.
const SPIN: Duration = Duration::from_micros(300);
/// Longest sleep (a safety net: every source has an eventfd).
const MAX_SLEEP: Duration = Duration::from_millis(50);

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
        };
        let worker = Arc::new(Mutex::new(worker));
        if let Backend::Channel(c) = &lock(&worker).backend {
            let weak = Arc::downgrade(&worker);
            c.set_domain_thread_pass(Some(Arc::new(move || {
                weak.upgrade()
                    .is_some_and(|w| w.try_lock().is_ok_and(|mut w| w.domain_thread_pass()))
            })));
        }
        let thread = std::thread::Builder::new()
            .name(format!("blk-{name}"))
            .spawn(move || run(worker))?;
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The service thread: passes while there is progress, a short poll, then sleep. Returns the
/// backend once stopped.
fn run(worker: Arc<Mutex<Worker>>) -> Backend {
    let shared = lock(&worker).shared.clone();
    let mut idle_since: Option<Instant> = None;
    while !shared.stop.load(Ordering::Acquire) {
        if lock(&worker).pass() > 0 {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN {
            // Two cores run the client, this thread, the domain and the device: let a
            // runnable one have the CPU while polling.
            std::thread::yield_now();
            continue;
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

struct Worker {
    shared: Arc<ServiceShared>,
    ports: Vec<Arc<ClientPort>>,
    backend: Backend,
    shadow: ShadowQueue<Part>,
    pending: HashMap<u64, Pending>,
    next_rid: u64,
    /// Per port, the queues (bits by index) that got answers since the last signal.
    signal: Vec<u64>,
    finished: Vec<Finished>,
}

impl Worker {
    /// One pass: intake, post, collect, signal. Returns the progress made.
    fn pass(&mut self) -> usize {
        let progress = self.intake() + self.post() + self.collect();
        self.signal_clients();
        progress
    }

    /// A pass on the domain's vCPU thread, in its wait exit (see the module docs): the
    /// device and the domain's completions first (what the domain waits for), then new
    /// requests for it. True when it made progress (the domain resumes at once).
    fn domain_thread_pass(&mut self) -> bool {
        let Backend::Channel(c) = &mut self.backend else {
            return false;
        };
        c.set_on_domain_thread(true);
        let progress = self.collect() + self.intake() + self.post();
        self.signal_clients();
        if let Backend::Channel(c) = &mut self.backend {
            c.set_on_domain_thread(false);
        }
        if progress > 0 {
            self.shared
                .counters
                .domain_passes
                .fetch_add(1, Ordering::Relaxed);
        }
        progress > 0
    }

    /// Arms every notification, re-checks, and sleeps (without the lock, so the domain's
    /// thread can run passes meanwhile) until an eventfd fires.
    fn sleep(worker: &Mutex<Worker>) {
        let mut w = lock(worker);
        let mut ready = false;
        for port in &w.ports {
            let mut st = port.lock();
            if st.needs_reset {
                continue;
            }
            for q in st.queues.iter_mut().flatten() {
                // Ok(true): the driver added buffers meanwhile.
                ready |= q.enable_notification(&port.mem).unwrap_or(true);
            }
        }
        ready |= w.backend.arm(true);
        if !ready {
            let mut fds: Vec<RawFd> = w.ports.iter().map(|p| p.notify.as_raw_fd()).collect();
            fds.push(w.shared.wake.as_raw_fd());
            fds.extend(w.backend.wait_fds());
            let limit = MAX_SLEEP.min(w.backend.sleep_limit());
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

    /// Takes new requests from every client queue.
    fn intake(&mut self) -> usize {
        if self.shared.stop.load(Ordering::Acquire) {
            // Stopping: what is taken is answered, nothing new is taken.
            return 0;
        }
        let mut n = 0;
        for i in 0..self.ports.len() {
            let port = self.ports[i].clone();
            let limits = port.geometry.limits();
            let mut st = port.lock();
            let generation = st.generation;
            for queue in 0..st.queues.len() as u16 {
                if st.needs_reset {
                    break;
                }
                let Some(q) = st.queues[usize::from(queue)].as_mut() else {
                    continue;
                };
                let chains: Vec<_> = match q.iter(&port.mem) {
                    Ok(it) => it.collect(),
                    Err(_) => {
                        port.give_up_queue(&mut st, "available index moved past the queue size");
                        break;
                    }
                };
                let mut answers = Vec::new();
                let mut unusable = None;
                for chain in chains {
                    n += 1;
                    let head = chain.head_index();
                    match request::parse(chain, &port.mem, &limits) {
                        Ok(req) => {
                            if let Some(a) = self.accept(i, queue, generation, head, req) {
                                answers.push(a);
                            }
                        }
                        Err(Invalid::Status { status, value, why }) => {
                            tracing::debug!("{}: request refused: {why}", port.name);
                            answers.push((head, status, value, 0));
                        }
                        Err(Invalid::Unusable(why)) => {
                            unusable = Some(why);
                            break;
                        }
                    }
                }
                for (head, status_addr, value, len) in answers {
                    let at = (i, queue, head);
                    self.answer_locked(&port, &mut st, at, status_addr, value, len);
                }
                if let Some(why) = unusable {
                    port.give_up_queue(&mut st, why);
                }
            }
        }
        n
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
                self.shadow
                    .push(op, first + offset / 512, (len / 512) as u32, part, now);
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
            self.shadow.push(op, sector, sectors, part, now);
            parts = 1;
        }
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
        for (i, port) in self.ports.iter().enumerate() {
            let answered = std::mem::take(&mut self.signal[i]);
            if answered == 0 {
                continue;
            }
            let mut st = port.lock();
            // One interrupt for the device: raised when any queue that got answers asks for
            // it (every queue's event index is checked, so each knows it was seen).
            let mut raise = false;
            for (n, q) in st.queues.iter_mut().enumerate() {
                if let Some(q) = q.as_mut().filter(|_| answered >> n & 1 == 1) {
                    raise |= q.needs_notification(&port.mem).unwrap_or(true);
                }
            }
            if raise {
                port.interrupt.raise(crate::virtio::interrupt::VRING);
            }
        }
    }

    /// The orderly stop (see [`crate::stop`]), once the loop has ended: passes without intake
    /// until every request taken is answered and the backend has settled (at most
    /// [`crate::stop::DRAIN_TIMEOUT`]), then the backend's final flush and shutdown.
    fn stop_in_order(worker: &Mutex<Worker>) {
        let started = Instant::now();
        loop {
            let mut w = lock(worker);
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
