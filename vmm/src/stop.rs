//! Stopping `ddvm run`: one handle that SIGINT, SIGTERM and the control socket's `stop` all
//! set, and that every run loop watches. Whatever asked, the run ends the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set by the signal handler: a signal reaches every handle made by [`Stop::on_signals`].
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Release);
}

/// A request to stop; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    signals: bool,
}

/// How often waits look at the flag.
const SLICE: Duration = Duration::from_millis(20);

impl Stop {
    /// A handle only [`Stop::request`] sets.
    pub fn new() -> Self {
        Stop::default()
    }

    /// A handle that SIGINT and SIGTERM set too (it installs their handler).
    pub fn on_signals() -> Self {
        crate::sys::on_stop_signals(on_signal);
        Stop {
            flag: Arc::new(AtomicBool::new(false)),
            signals: true,
        }
    }

    /// Asks the run to stop.
    pub fn request(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire) || (self.signals && SIGNALLED.load(Ordering::Acquire))
    }

    /// Sleeps `d`, or less if a stop is asked for meanwhile; returns whether one was.
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
            std::thread::sleep(left.min(SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
