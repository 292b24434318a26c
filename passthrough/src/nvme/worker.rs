//! The controller's worker thread (one of the two ways to serve shadow doorbells; see the
//! module docs of [`super`]).
//!
//! Loop: run a pass over the queues (which raises the interrupts of what it posted); while
//! passes find work, or for [`IDLE_SPIN`] after the last one, keep polling (this is where
//! shadow doorbells pay: the driver need not ring); then set the event indexes, re-check the
//! shadow page, and block on the doorbell eventfd. A doorbell MMIO write, a KVM ioeventfd, bus
//! mastering coming back on, and the stop request all write that eventfd, so the worker never
//! sleeps through a stop. It reaches domain memory only through the DMA window and the domain
//! only through the function's MSI-X state, which a quiesce detaches, so a detached
//! controller's worker touches neither the old memory nor the old domain.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::controller::Controller;
use super::Shared;

/// How long the worker keeps polling after its last piece of work.
pub const IDLE_SPIN: Duration = Duration::from_micros(50);

/// The worker's body; returns when `shared.stop` is set.
pub(super) fn run(shared: Arc<Shared>) {
    let mut last_work = Instant::now();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if shared.process(1) > 0 {
            last_work = Instant::now();
            continue;
        }
        if last_work.elapsed() < IDLE_SPIN {
            std::hint::spin_loop();
            continue;
        }
        if shared.with_ctrl(Controller::arm) {
            last_work = Instant::now();
            continue;
        }
        // Blocks until a doorbell, a bus-master change or stop; an error (EINTR) just means
        // another pass.
        wait_readable(shared.eventfd.as_raw_fd(), -1);
        let _ = shared.eventfd.read();
        last_work = Instant::now();
    }
}

/// Waits until `fd` (a non-blocking eventfd) is readable, for at most `timeout_ms` (-1: no
/// limit). True when it is; false on timeout or interruption.
pub(crate) fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call, and the count is 1.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
}
