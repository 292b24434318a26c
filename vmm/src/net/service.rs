//! The network service: one thread per NIC (`net-NAME`) that owns the NIC's class and its
//! reincarnation engine ([`NetBackend`]), the [`Switch`], and the clients' [`NetPort`]s.
//!
//! Each pass: client records that changed go to the switch (a changed filter set owes the
//! domain a CONFIG); control queues are served (a command is answered in the pass that finds
//! it); client frames are taken (hairpinned copies go straight into neighbours' RX buffers,
//! frames for the wire are queued in the class); the class posts and collects; sent frames'
//! chains go back to their clients and received frames go through the switch into the RX
//! buffers of the clients it picks. Idle, it arms every notification and sleeps on its
//! eventfds (the clients' QueueNotify, the domain's notify, the engine's wake).
//!
//! # Bounded client work
//! - **Intake is fair**: ports in turn from a rotating start, at most [`QUEUE_BUDGET`] TX chains
//!   and [`CTRL_BUDGET`] control commands per port per pass.
//! - **A client holds at most [`PORT_SHARE`] frames** at the class (queued or at the domain):
//!   the rest wait in its own ring, however long the domain is down. With the device's one
//!   TX head bit per descriptor, a client holds at most `PORT_SHARE` frames of the VMM's memory
//!   (about 100 KiB).
//! - **A reset forgets**: a chain of an older generation that completes is ignored by its port
//!   (nothing is written into the client's memory for it); its frame may still be sent.
//! - **RX never waits**: a client without buffers loses its frame (counted by its port), it
//!   never holds up the NIC or its neighbours.
//!
//! The link stays up at the clients through every restart: the service never takes it down,
//! and once a new domain serves it asks every driver that negotiated GUEST_ANNOUNCE to
//! announce itself.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::class::{ClassCounters, Delivered, NetBackend, NetDomain};
use super::device::{NetPort, PortCounters, TxBackend, TxToken, TxVerdict};
use super::switch::{Switch, SwitchCounters};
use crate::reincarnation::{Launcher, RecoveryHandle};
use crate::sync::lock;
use crate::vcpu::wait_fds;
use ddvm_abi::channel::net::FilterSet;

/// How long the loop polls before it sleeps.
const SPIN: Duration = Duration::from_micros(300);
/// Longest sleep (a safety net: every source has an eventfd).
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// TX chains taken from one client per pass, at most.
pub const QUEUE_BUDGET: usize = 16;
/// Control commands served per client per pass, at most.
pub const CTRL_BUDGET: usize = 8;
/// Frames one client holds at the class (queued or in flight at the domain), at most.
pub const PORT_SHARE: usize = 64;
/// How long the orderly stop waits for the domain's SHUTDOWN.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// What the service drives its frames through: a NIC driver domain's class and engine
/// ([`NetBackend`]), or a wire the VMM serves itself ([`super::direct::DirectNic`]). See
/// [`NetBackend`] for what each method means.
pub trait FrameBackend: Send + 'static {
    /// Takes a client's frame for the NIC: `Some(true)` queued (its chain comes back through
    /// [`Delivered::TxDone`]), `Some(false)` given back now, `None` no room.
    fn queue_tx(&mut self, port: usize, token: TxToken, frame: &[u8]) -> Option<bool>;
    /// The filter set changed.
    fn config_changed(&mut self);
    /// Posts what is owed (configuration, frames, receive buffers); returns the progress.
    fn post(&mut self, filters: &FilterSet) -> usize;
    /// Collects what the NIC did; returns the progress.
    fn collect(&mut self, out: &mut Vec<Delivered>) -> usize;
    /// The epoch of the NIC serving now, if one is.
    fn serving_epoch(&self) -> Option<u64>;
    /// The counters.
    fn counters(&self) -> &ClassCounters;
    /// The orderly stop; whether it completed.
    fn shut_down(&mut self, timeout: Duration) -> bool;
    /// Asks for (or stops asking for) a notification; true when there is work already.
    fn arm(&mut self, on: bool) -> bool;
    /// Descriptors that wake the service.
    fn wait_fds(&self) -> Vec<RawFd>;
    /// How long the service may sleep.
    fn sleep_limit(&self) -> Duration;
    /// The VM exits of the NIC domain serving now, if there is one and they are counted.
    fn domain_exits(&self) -> Option<u64> {
        None
    }
}

impl<L: Launcher> FrameBackend for NetBackend<L>
where
    L::Domain: NetDomain,
    NetBackend<L>: Send + 'static,
{
    fn queue_tx(&mut self, port: usize, token: TxToken, frame: &[u8]) -> Option<bool> {
        NetBackend::queue_tx(self, port, token, frame)
    }
    fn config_changed(&mut self) {
        NetBackend::config_changed(self)
    }
    fn post(&mut self, filters: &FilterSet) -> usize {
        NetBackend::post(self, filters)
    }
    fn collect(&mut self, out: &mut Vec<Delivered>) -> usize {
        NetBackend::collect(self, out)
    }
    fn serving_epoch(&self) -> Option<u64> {
        NetBackend::serving_epoch(self)
    }
    fn counters(&self) -> &ClassCounters {
        NetBackend::counters(self)
    }
    fn shut_down(&mut self, timeout: Duration) -> bool {
        NetBackend::shut_down(self, timeout)
    }
    fn arm(&mut self, on: bool) -> bool {
        NetBackend::arm(self, on)
    }
    fn wait_fds(&self) -> Vec<RawFd> {
        NetBackend::wait_fds(self)
    }
    fn sleep_limit(&self) -> Duration {
        NetBackend::sleep_limit(self)
    }
    fn domain_exits(&self) -> Option<u64> {
        self.live_domain().and_then(NetDomain::net_exits)
    }
}

/// What observers see of a network service.
#[derive(Clone, Debug, Default)]
pub struct NetStats {
    /// The class's counters.
    pub class: ClassCounters,
    /// The switch's counters.
    pub switch: SwitchCounters,
    /// Announcements asked of client drivers after restarts.
    pub announced: u64,
    /// Domains (epochs) that served.
    pub served_epochs: u64,
    /// Each client port's counters (what its driver got wrong, what it sent and received),
    /// by client name, in the switch's order.
    pub ports: Vec<(String, PortCounters)>,
    /// VM exits of the domain that served last, read when the service stopped (before the
    /// domain's SHUTDOWN), where they are counted.
    pub domain_exits: Option<u64>,
}

impl NetStats {
    /// The counters of the port of client `name`.
    pub fn port(&self, name: &str) -> Option<&PortCounters> {
        self.ports.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }
}

struct Shared {
    stop: AtomicBool,
    wake: EventFd,
    stats: Mutex<NetStats>,
}

/// A running network service.
pub struct NetService {
    name: String,
    shared: Arc<Shared>,
    ports: Vec<Arc<NetPort>>,
    handle: Option<RecoveryHandle>,
    thread: Option<JoinHandle<bool>>,
}

impl NetService {
    /// Serves `ports` (the switch's clients, in order) through `backend` on a new thread;
    /// `handle` is the recovery handle of the NIC domain behind it, if there is one.
    pub fn spawn<B: FrameBackend>(
        name: &str,
        ports: Vec<Arc<NetPort>>,
        switch: Switch,
        backend: B,
        handle: Option<RecoveryHandle>,
    ) -> std::io::Result<NetService> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            stats: Mutex::new(NetStats::default()),
        });
        let mut worker = Worker {
            shared: shared.clone(),
            held: vec![0; ports.len()],
            ports: ports.clone(),
            switch,
            backend,
            cursor: 0,
            out: Vec::new(),
            epoch: None,
            stats: NetStats::default(),
            exits_read: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("net-{name}"))
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadClass::NetService);
                worker.run()
            })?;
        Ok(NetService {
            name: name.to_string(),
            shared,
            ports,
            handle,
            thread: Some(thread),
        })
    }

    /// Name (the NIC domain's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client ports.
    pub fn ports(&self) -> &[Arc<NetPort>] {
        &self.ports
    }

    /// The NIC domain's recovery handle (`None`: a NIC the VMM serves itself).
    pub fn handle(&self) -> Option<&RecoveryHandle> {
        self.handle.as_ref()
    }

    /// A snapshot of the counters (the ports' read now).
    pub fn stats(&self) -> NetStats {
        let mut s = lock(&self.shared.stats).clone();
        s.ports = self
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.counters.snapshot()))
            .collect();
        s
    }

    /// What the control plane reads of this NIC's I/O when asked (`ctl metrics`): frames and
    /// bytes both ways over its client ports; errors are the frames dropped or failed.
    pub fn io_source(&self) -> crate::metrics::IoSource {
        let shared = self.shared.clone();
        let ports = self.ports.clone();
        let name = self.name.clone();
        Arc::new(move || {
            let load = |f: fn(&super::device::NetCounters) -> &std::sync::atomic::AtomicU64| {
                ports
                    .iter()
                    .map(|p| f(&p.counters).load(Ordering::Relaxed))
                    .sum::<u64>()
            };
            let stats = lock(&shared.stats);
            crate::metrics::DeviceIo {
                domain: name.clone(),
                device: "net",
                requests: load(|c| &c.tx_frames) + load(|c| &c.rx_frames),
                bytes: load(|c| &c.tx_bytes) + load(|c| &c.rx_bytes),
                errors: load(|c| &c.tx_dropped)
                    + load(|c| &c.rx_bad_chains)
                    + load(|c| &c.rx_too_small)
                    + load(|c| &c.ctrl_err)
                    + stats.class.tx_failed,
                latency: None,
                vm_exits: stats.domain_exits,
            }
        })
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread: the domain gets a SHUTDOWN (it completes what it holds and stops
    /// the NIC), then its vCPU stops. Returns whether the domain completed the SHUTDOWN.
    pub fn stop(&mut self) -> bool {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        self.thread
            .take()
            .is_some_and(|t| t.join().unwrap_or(false))
    }
}

impl Drop for NetService {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

struct Worker<B: FrameBackend> {
    shared: Arc<Shared>,
    ports: Vec<Arc<NetPort>>,
    switch: Switch,
    backend: B,
    /// Frames each port holds at the class.
    held: Vec<usize>,
    cursor: usize,
    out: Vec<Delivered>,
    /// The epoch that served last.
    epoch: Option<u64>,
    stats: NetStats,
    /// When the domain's VM exits were last read into `stats`.
    exits_read: Instant,
}

/// A client's frames on their way: the switch decides, neighbours get hairpinned copies, the
/// wire's go to the class.
struct Outgoing<'a, B: FrameBackend> {
    from: usize,
    switch: &'a mut Switch,
    backend: &'a mut B,
    ports: &'a [Arc<NetPort>],
    held: &'a mut usize,
}

impl<B: FrameBackend> TxBackend for Outgoing<'_, B> {
    fn transmit(&mut self, token: TxToken, frame: &[u8]) -> TxVerdict {
        let Ok(route) = self.switch.outgoing(self.from, frame) else {
            return TxVerdict::Done;
        };
        if route.nic && *self.held >= PORT_SHARE {
            // Its share is at the class: the frame waits in its ring (nothing hairpinned yet).
            return TxVerdict::Busy;
        }
        let mut queued = false;
        if route.nic {
            match self.backend.queue_tx(self.from, token, frame) {
                Some(true) => {
                    *self.held += 1;
                    queued = true;
                }
                Some(false) => {}
                None => return TxVerdict::Busy,
            }
        }
        for &c in &route.clients {
            if let Some(p) = self.ports.get(c) {
                p.receive(frame);
            }
        }
        if queued {
            TxVerdict::Queued
        } else {
            TxVerdict::Done
        }
    }
}

impl<B: FrameBackend> Worker<B> {
    fn run(&mut self) -> bool {
        let mut idle_since: Option<Instant> = None;
        while !self.shared.stop.load(Ordering::Acquire) {
            if self.pass() > 0 {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            self.sleep();
            idle_since = None;
        }
        self.stats.domain_exits = self.backend.domain_exits();
        // Those are the figures kept: not read again after the SHUTDOWN.
        self.exits_read = Instant::now();
        let ok = self.backend.shut_down(SHUTDOWN_TIMEOUT);
        self.publish();
        ok
    }

    /// One pass. Returns the progress made.
    fn pass(&mut self) -> usize {
        let mut progress = 0;
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(c) = p.take_config_change() {
                if self.switch.set_config(i, c) {
                    self.backend.config_changed();
                }
            }
            progress += p.control(CTRL_BUDGET);
        }
        let n = self.ports.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let mut tx = Outgoing {
                from: i,
                switch: &mut self.switch,
                backend: &mut self.backend,
                ports: &self.ports,
                held: &mut self.held[i],
            };
            progress += self.ports[i].transmit(&mut tx, QUEUE_BUDGET);
        }
        if n > 0 {
            self.cursor = (self.cursor + 1) % n;
        }
        progress += self.backend.post(self.switch.filters());
        progress += self.backend.collect(&mut self.out);
        for d in std::mem::take(&mut self.out) {
            match d {
                Delivered::TxDone { port, token } => {
                    if let Some(h) = self.held.get_mut(port) {
                        *h = h.saturating_sub(1);
                    }
                    if let Some(p) = self.ports.get(port) {
                        p.complete_tx(token);
                    }
                }
                Delivered::Frame(frame) => {
                    for c in self.switch.incoming(&frame) {
                        if let Some(p) = self.ports.get(c) {
                            p.receive(&frame);
                        }
                    }
                }
            }
        }
        let epoch = self.backend.serving_epoch();
        if epoch.is_some() && epoch != self.epoch {
            self.stats.served_epochs += 1;
            if self.epoch.is_some() {
                // A new domain serves: the link never went down, but the NIC behind it is
                // new; drivers that can announce themselves do.
                for p in &self.ports {
                    if p.announce() {
                        self.stats.announced += 1;
                    }
                }
            }
            self.epoch = epoch;
        }
        if progress > 0 {
            self.publish();
        }
        progress
    }

    fn publish(&mut self) {
        self.stats.class = self.backend.counters().clone();
        self.stats.switch = self.switch.counters.clone();
        if self.exits_read.elapsed() >= crate::blk::service::EXITS_REFRESH {
            self.stats.domain_exits = self.backend.domain_exits();
            self.exits_read = Instant::now();
        }
        *lock(&self.shared.stats) = self.stats.clone();
    }

    /// Arms every notification, re-checks, and sleeps until an eventfd fires.
    fn sleep(&mut self) {
        let mut ready = false;
        for p in &self.ports {
            ready |= p.arm();
        }
        ready |= self.backend.arm(true);
        if !ready {
            let mut fds: Vec<RawFd> = self.ports.iter().map(|p| p.notify.as_raw_fd()).collect();
            fds.push(self.shared.wake.as_raw_fd());
            fds.extend(self.backend.wait_fds());
            wait_fds(&fds, MAX_SLEEP.min(self.backend.sleep_limit()));
        }
        for p in &self.ports {
            let _ = p.notify.read();
            p.disarm();
        }
        let _ = self.shared.wake.read();
        self.backend.arm(false);
    }
}
