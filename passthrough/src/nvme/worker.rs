//! The controller's worker thread.
//!
//! Loop: run a pass over the queues; after posting completions call `wake_domain`; while
//! passes find work, or for [`IDLE_SPIN`] after the last one, keep polling (this is where
//! shadow doorbells pay: the driver need not ring); then set the event indexes, re-check the
//! shadow page, and block on the doorbell eventfd. A doorbell MMIO write, a KVM ioeventfd, bus
//! mastering coming back on, and the stop request all write that eventfd.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;

/// How long the worker keeps polling after its last piece of work.
pub const IDLE_SPIN: Duration = Duration::from_micros(50);

/// Callback that kicks the domain's vCPU out of its wait.
pub type WakeDomain = Arc<dyn Fn() + Send + Sync>;

/// The worker's body; returns when `shared.stop` is set.
pub(super) fn run(shared: Arc<Shared>, wake_domain: WakeDomain) {
    let mut last_work = Instant::now();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let pass = shared.with_ctrl(|c| c.pass());
        if pass.posted > 0 {
            wake_domain();
        }
        if pass.consumed > 0 {
            last_work = Instant::now();
            continue;
        }
        if last_work.elapsed() < IDLE_SPIN {
            std::hint::spin_loop();
            continue;
        }
        if shared.with_ctrl(|c| c.ready() && c.arm_event_idx()) {
            last_work = Instant::now();
            continue;
        }
        // Blocks until a doorbell, a bus-master change or stop; an error (none is expected
        // from a blocking eventfd read) just means another pass.
        let _ = shared.eventfd.read();
        last_work = Instant::now();
    }
}
