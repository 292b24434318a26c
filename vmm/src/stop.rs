//! Orderly stop of a disk: nothing acknowledged is left only in a volatile write cache when
//! the VMM resets or detaches the device.
//!
//! A disk served by a driver domain stops in this order (the block service runs it, see
//! `blk::service`; a domain without clients gets steps 3–5 from `ddvm run`):
//!
//! 1. no new client requests are taken;
//! 2. the requests already taken complete (a domain that fails meanwhile is restarted and
//!    replayed as ever), at most [`DRAIN_TIMEOUT`];
//! 3. a FLUSH through the channel, and its OK completion;
//! 4. a SHUTDOWN through the channel (`op::SHUTDOWN`): the domain flushes again and gives the
//!    NVMe shutdown notification, and answers once the controller reports it complete;
//! 5. teardown: vCPU stopped, device quiesced (bus master off, function reset, DMA detached).
//!
//! Steps 3 and 4 each wait at most [`STEP_TIMEOUT`], less if the domain stops or its heartbeat
//! stands still while its vCPU runs. When the domain cannot do them (dead, hung, an image
//! that answers SHUTDOWN `UNSUPPORTED`, a channel broken), the VMM stops the vCPU and gives
//! the shutdown notification itself, through the controller's registers
//! ([`DomainDevice::shutdown_controller`]): the emulated controller, like any NVMe controller
//! whose registers the VMM can reach (a VFIO device's BAR region), then writes its cache
//! back. What even that cannot save — writes a reset dropped from the cache while no domain
//! came back to replay them, or a controller that does not answer — is counted and logged as
//! an error; it is never silent.
//!
//! What asks for the stop is one [`Stop`] handle: SIGINT, SIGTERM and the control socket's
//! `stop` all set it, and every run loop watches it. Whatever asked, the run ends the same way.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ddvm_abi::channel::blk::op;
use ddvm_abi::channel::status as cstatus;
use ddvm_recovery::monitor::HeartbeatMonitor;
use vmm_sys_util::eventfd::EventFd;

use crate::domain::{DeviceShutdown, Domain, DomainDevice};
use crate::host_channel::{Done, HostChannel};

/// Longest wait for the requests in flight at a stop to complete.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the stop's FLUSH, and for its SHUTDOWN (the domain itself waits up to
/// RTD3E, at least 5 s, for the controller).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a controller the VMM shuts down itself.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// A heartbeat still this long while the vCPU ran means the domain is hung.
const HANG: Duration = Duration::from_millis(200);

/// How a disk was stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopHow {
    /// The domain flushed and shut its controller down.
    Domain,
    /// The domain could not (why); the VMM shut the controller down itself.
    Device {
        /// Why the domain could not.
        why: String,
    },
    /// The controller was not enabled at the stop: its last reset left it no cache.
    NotEnabled {
        /// Why the domain could not shut it down.
        why: String,
    },
    /// A file served by the VMM: synced.
    File,
    /// Not shut down cleanly (why).
    Failed {
        /// What went wrong.
        why: String,
    },
}

/// What an orderly stop of one disk did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopReport {
    /// The disk (domain name or file).
    pub disk: String,
    /// How it was stopped.
    pub how: StopHow,
    /// From the start of the stop to the end of the shutdown.
    pub took: Duration,
    /// Client requests still unanswered when the stop gave up waiting for them.
    pub unanswered: usize,
    /// Acknowledged writes whose data may not be on the medium: logged for replay, but no
    /// domain came back to replay them before the stop (their cache was reset), or the
    /// controller could not be shut down.
    pub at_risk: usize,
}

impl StopReport {
    /// Whether every acknowledged write is durable.
    pub fn clean(&self) -> bool {
        self.at_risk == 0 && !matches!(self.how, StopHow::Failed { .. })
    }
}

impl fmt::Display for StopReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.took.as_secs_f64() * 1e3;
        let disk = &self.disk;
        match &self.how {
            StopHow::Domain => write!(f, "disk {disk}: flushed and shut down in {ms:.1} ms")?,
            StopHow::Device { why } => write!(
                f,
                "disk {disk}: the domain could not shut down ({why}); the VMM shut the \
                 controller down itself, flushed, in {ms:.1} ms"
            )?,
            StopHow::NotEnabled { why } => write!(
                f,
                "disk {disk}: the domain could not shut down ({why}); the controller was \
                 disabled, its cache already reset ({ms:.1} ms)"
            )?,
            StopHow::File => write!(f, "disk {disk}: synced in {ms:.1} ms")?,
            StopHow::Failed { why } => {
                write!(f, "disk {disk}: NOT shut down cleanly: {why} ({ms:.1} ms)")?
            }
        }
        if self.unanswered > 0 {
            write!(
                f,
                "; {} client request(s) unanswered after {DRAIN_TIMEOUT:?}",
                self.unanswered
            )?;
        }
        if self.at_risk > 0 {
            write!(
                f,
                "; {} acknowledged write(s) may not be on the medium",
                self.at_risk
            )?;
        }
        Ok(())
    }
}

/// Sends `operation` (FLUSH or SHUTDOWN: no range, no data) on `channel` and waits for its
/// completion, at most `timeout`; returns its status, or why none came (the domain stopped
/// or hung, the channel broke, the time ran out). Other completions that arrive meanwhile
/// are taken and dropped. `heartbeat_period` is the domain's (a still heartbeat is a hang only
/// after `HANG` or this, whichever is longer, of vCPU run time).
pub fn request(
    domain: &Domain,
    channel: &mut HostChannel,
    operation: u16,
    timeout: Duration,
    heartbeat_period: Duration,
) -> Result<u16, String> {
    let mem = domain.memory().clone();
    let tag = channel
        .submit(&mem, operation, 0, 0, None)
        .map_err(|e| format!("channel refused the request: {e:?}"))?;
    if channel.publish(&mem) {
        domain.kick();
    }
    let t0 = Instant::now();
    let mut heartbeat = HeartbeatMonitor::new(heartbeat_period.max(HANG));
    let mut done: Vec<Done> = Vec::new();
    loop {
        // A device its owner serves (the block service) is served here meanwhile.
        if let Some(d) = domain.device() {
            d.poll();
        }
        done.clear();
        channel
            .poll(&mem, &mut done)
            .map_err(|e| format!("channel protocol violation: {e:?}"))?;
        let mut answer = None;
        for d in &done {
            if d.request.tag == tag {
                answer = Some(d.status);
            }
            channel.finish(&mem, d, None);
        }
        if let Some(s) = answer {
            return Ok(s);
        }
        if let Some(exit) = domain.has_stopped() {
            return Err(format!("the domain stopped: {exit}"));
        }
        let now = Instant::now();
        if domain.is_waiting() {
            heartbeat.touch(now);
        } else if let Some(hb) = domain.heartbeat() {
            if let Some(r) = heartbeat.sample_running(hb, now, domain.vcpu_cpu_time()) {
                return Err(format!("the domain hung: {r}"));
            }
        }
        if t0.elapsed() >= timeout {
            return Err(format!("no answer within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Steps 3 and 4 of the stop through the domain: FLUSH, then SHUTDOWN, each OK. `flushed`
/// is called once the FLUSH completed OK (the caller trims its write log there).
pub fn through_domain(
    domain: &Domain,
    channel: &mut HostChannel,
    heartbeat_period: Duration,
    flushed: impl FnOnce(),
) -> Result<(), String> {
    match request(domain, channel, op::FLUSH, STEP_TIMEOUT, heartbeat_period)? {
        cstatus::OK => flushed(),
        s => return Err(format!("FLUSH completed with status {s}")),
    }
    match request(
        domain,
        channel,
        op::SHUTDOWN,
        STEP_TIMEOUT,
        heartbeat_period,
    )? {
        cstatus::OK => Ok(()),
        cstatus::UNSUPPORTED => Err("its image does not know SHUTDOWN".into()),
        s => Err(format!("SHUTDOWN completed with status {s}")),
    }
}

/// The fallback: the VMM shuts `device` down itself (the domain's vCPU must be stopped).
pub fn by_vmm(device: &DomainDevice, why: String) -> StopHow {
    match device.shutdown_controller(DEVICE_TIMEOUT) {
        DeviceShutdown::Done(_) => StopHow::Device { why },
        DeviceShutdown::NotEnabled => StopHow::NotEnabled { why },
        DeviceShutdown::Failed(e) => StopHow::Failed {
            why: format!("the domain could not shut down ({why}), nor could the VMM: {e}"),
        },
    }
}

/// Stops a domain that serves no block service (`ddvm run` without clients): FLUSH and
/// SHUTDOWN through `channel` (a fresh one if `None`: no request of the VMM is in flight),
/// else the VMM's own shutdown of its device; then the vCPU is stopped. The device is reset
/// when the domain is dropped. A domain without a device, or whose channel is not a block
/// channel (a NIC domain without clients: no data to write back), just stops.
pub fn domain_without_clients(
    domain: &mut Domain,
    channel: Option<&mut HostChannel>,
) -> Option<StopReport> {
    let t0 = Instant::now();
    if domain
        .channel_header()
        .is_some_and(|h| h.class != ddvm_abi::channel::class::BLK)
    {
        domain.stop();
        return None;
    }
    let device = domain.device().cloned()?;
    let mut fresh = None;
    let channel = match channel {
        Some(c) => Some(c),
        None => match (domain.channel(), domain.channel_header()) {
            (Some(gpa), Some(header)) => Some(fresh.insert(HostChannel::new(gpa, header))),
            _ => None,
        },
    };
    let period = Duration::from_millis(20);
    let result = match (channel, domain.has_stopped()) {
        (_, Some(exit)) => Err(format!("the domain stopped: {exit}")),
        (Some(ch), None) => through_domain(domain, ch, period, || {}),
        (None, None) => Err("the domain has no channel".into()),
    };
    domain.stop();
    let how = match result {
        Ok(()) => StopHow::Domain,
        Err(why) => by_vmm(&device, why),
    };
    Some(StopReport {
        disk: domain.name().to_string(),
        how,
        took: t0.elapsed(),
        unanswered: 0,
        // The VMM keeps no write log here: a failure says what it could not write back.
        at_risk: 0,
    })
}

/// Set by the signal handler: a signal reaches every handle made by [`Stop::on_signals`].
static SIGNALLED: AtomicBool = AtomicBool::new(false);
/// The eventfd the signal handler writes (-1: none yet), so that waits on it wake at once.
static SIGNAL_WAKE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    if SIGNALLED.swap(true, Ordering::AcqRel) {
        // A second signal: the user will not wait for the orderly stop.
        crate::sys::exit_now(130);
    }
    let fd = SIGNAL_WAKE.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: `write` is async-signal-safe; `fd` is an eventfd that is never closed (it is
        // leaked when stored), and `one` is 8 readable bytes for the duration of the call.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// A request to stop; clones share it.
///
/// Its [`wake_fd`](Stop::wake_fd) becomes readable once a stop is requested (and stays so), so
/// that event loops wait on it with their other descriptors instead of polling the flag.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    signals: bool,
    /// Written by [`Stop::request`] (and, for a handle of [`Stop::on_signals`], by the signal
    /// handler); never read, so it stays readable. `None` if the host gave no eventfd.
    wake: Option<Arc<EventFd>>,
}

/// How often waits look at the flag when there is no eventfd to wait on.
const SLICE: Duration = Duration::from_millis(20);

impl Stop {
    /// A handle only [`Stop::request`] sets.
    pub fn new() -> Self {
        Stop {
            flag: Arc::default(),
            signals: false,
            wake: EventFd::new(libc::EFD_NONBLOCK).ok().map(Arc::new),
        }
    }

    /// A handle that SIGINT and SIGTERM set too (it installs their handler). A second signal
    /// ends the process at once (exit status 130), without the orderly stop. Every such handle
    /// shares one eventfd, which the handler writes.
    pub fn on_signals() -> Self {
        static WAKE: OnceLock<Option<Arc<EventFd>>> = OnceLock::new();
        let wake = WAKE
            .get_or_init(|| {
                let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).ok()?);
                // Kept for the life of the process (the static holds it): the handler may use
                // its number at any time.
                SIGNAL_WAKE.store(fd.as_raw_fd(), Ordering::Release);
                Some(fd)
            })
            .clone();
        crate::sys::on_stop_signals(on_signal);
        Stop {
            flag: Arc::new(AtomicBool::new(false)),
            signals: true,
            wake,
        }
    }

    /// Asks the run to stop.
    pub fn request(&self) {
        self.flag.store(true, Ordering::Release);
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire) || (self.signals && SIGNALLED.load(Ordering::Acquire))
    }

    /// A descriptor that becomes readable (and stays so) once a stop is requested, for event
    /// loops to wait on; `None` if the host gave no eventfd (then [`Stop::requested`] is all
    /// there is).
    pub fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the descriptor is the eventfd's that `self` holds (through its Arc), open for
        // as long as `self` is borrowed.
        self.wake
            .as_ref()
            .map(|w| unsafe { BorrowedFd::borrow_raw(w.as_raw_fd()) })
    }

    /// Sleeps `d`, or less if a stop is asked for meanwhile; returns whether one was. It
    /// waits on [`Stop::wake_fd`], so a stop ends it at once.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.requested() {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.wake_fd() {
                Some(fd) => {
                    if crate::sys::poll_readable(&[fd], Some(left)).is_err() {
                        std::thread::sleep(left.min(SLICE));
                    }
                }
                None => std::thread::sleep(left.min(SLICE)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(how: StopHow, unanswered: usize, at_risk: usize) -> StopReport {
        StopReport {
            disk: "nvme0".into(),
            how,
            took: Duration::from_micros(41_300),
            unanswered,
            at_risk,
        }
    }

    #[test]
    fn a_stop_is_clean_only_when_nothing_acknowledged_may_be_lost() {
        let done = report(StopHow::Domain, 0, 0);
        assert!(done.clean());
        assert_eq!(
            done.to_string(),
            "disk nvme0: flushed and shut down in 41.3 ms"
        );
        let by_vmm = report(
            StopHow::Device {
                why: "the domain hung".into(),
            },
            2,
            0,
        );
        assert!(
            by_vmm.clean(),
            "unanswered requests were never acknowledged"
        );
        assert!(by_vmm
            .to_string()
            .contains("the VMM shut the controller down itself"));
        assert!(by_vmm
            .to_string()
            .contains("2 client request(s) unanswered"));
        let lost = report(
            StopHow::NotEnabled {
                why: "no domain was serving".into(),
            },
            0,
            3,
        );
        assert!(!lost.clean());
        assert!(lost
            .to_string()
            .contains("3 acknowledged write(s) may not be on the medium"));
        let failed = report(
            StopHow::Failed {
                why: "the controller does not respond".into(),
            },
            0,
            0,
        );
        assert!(!failed.clean());
        assert!(failed.to_string().contains("NOT shut down cleanly"));
    }

    #[test]
    fn a_request_reaches_every_clone_and_cuts_a_sleep_short() {
        let stop = Stop::new();
        let other = stop.clone();
        assert!(!stop.requested());
        assert!(!stop.sleep(Duration::from_millis(1)));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            other.request();
        });
        let t0 = Instant::now();
        assert!(stop.sleep(Duration::from_secs(10)));
        assert!(t0.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        // Another handle is not affected.
        assert!(!Stop::new().requested());
        // The wake descriptor says so at once, and keeps saying so.
        let fd = stop.wake_fd().expect("an eventfd");
        for _ in 0..2 {
            assert_eq!(
                crate::sys::poll_readable(&[fd], Some(Duration::ZERO)).unwrap(),
                [true]
            );
        }
        let fresh = Stop::new();
        let fd = fresh.wake_fd().expect("an eventfd");
        assert_eq!(
            crate::sys::poll_readable(&[fd], Some(Duration::ZERO)).unwrap(),
            [false]
        );
    }
}
