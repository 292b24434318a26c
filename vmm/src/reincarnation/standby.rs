//! The thread that boots a device's warm standbys, one at a time. One thread for the device's
//! life rather than one per boot: fewer threads come and go, and the allocator does not spread
//! each boot's memory over a fresh arena.

use std::sync::mpsc;
use std::thread::JoinHandle;

/// Boots standbys on a thread of their own.
pub(super) struct StandbyBooter<D> {
    requests: Option<mpsc::Sender<u64>>,
    results: mpsc::Receiver<Result<D, String>>,
    thread: Option<JoinHandle<()>>,
    busy: bool,
}

impl<D: Send + 'static> StandbyBooter<D> {
    /// Starts the thread; `boot` boots a standby with the epoch it is given.
    pub(super) fn start(
        name: &str,
        mut boot: Box<dyn FnMut(u64) -> Result<D, String> + Send>,
    ) -> std::io::Result<Self> {
        let (requests, todo) = mpsc::channel::<u64>();
        let (done, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("standby-{name}"))
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadClass::StandbyBooter);
                for epoch in todo {
                    if done.send(boot(epoch)).is_err() {
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
    pub(super) fn busy(&self) -> bool {
        self.busy
    }

    /// Asks for a standby with `epoch`.
    pub(super) fn boot(&mut self, epoch: u64) {
        self.busy = self
            .requests
            .as_ref()
            .is_some_and(|r| r.send(epoch).is_ok());
    }

    /// The booted standby (or why there is none), if a boot was asked for and is done
    /// (`wait`: waits for it).
    pub(super) fn take(&mut self, wait: bool) -> Option<Result<D, String>> {
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

impl<D> Drop for StandbyBooter<D> {
    fn drop(&mut self) {
        // The thread ends when its queue closes (after the boot under way, if any).
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
