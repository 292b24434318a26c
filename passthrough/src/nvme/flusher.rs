//! The controller's flusher thread: the `fdatasync` of a Flush command runs here, off the
//! thread that serves the queues, as a real controller runs commands concurrently.
//!
//! The serving thread writes the volatile cache back to the file (writes into the host's page
//! cache, cheap), hands the Flush over under a token ([`Flusher::submit`]) and goes on serving
//! the queues. This thread takes every Flush waiting, runs one `fdatasync` for all of them —
//! each was handed over before the sync started, so the sync covers every write completed
//! before each of them — leaves the tokens and the result for the next pass
//! ([`Flusher::take_done`]) and writes the doorbell eventfd, which the worker or the poller's
//! owner sleeps on. That pass posts the completions. A reset in between forgets the tokens
//! in flight, so a result that comes back after it is dropped, never posted to the next
//! driver's queues; the reset itself never waits for a sync.
//!
//! The thread lives as long as the controller: dropping [`FlusherThread`] stops it and joins
//! it (after the sync under way and the Flushes still waiting, which it runs first).

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::controller::Observed;
use super::lock;

/// Called on the flusher thread before each sync (tests make the sync slow with it).
#[cfg(test)]
pub(super) type SyncHook = Arc<dyn Fn() + Send + Sync>;

/// What the flusher has to do and has done.
#[derive(Default)]
struct Queue {
    /// Tokens of the Flushes waiting for a sync.
    waiting: Vec<u64>,
    /// Tokens synced since the last [`Flusher::take_done`], with whether the sync succeeded.
    done: Vec<(u64, bool)>,
    /// The controller is going away: run what is waiting, then return.
    stop: bool,
    #[cfg(test)]
    hook: Option<SyncHook>,
}

struct Inner {
    queue: Mutex<Queue>,
    /// Signalled when a Flush is handed over or the thread must stop.
    work: Condvar,
    /// `queue.done` may be non-empty (set under the lock, so a result is never missed).
    has_done: AtomicBool,
    file: Arc<File>,
    eventfd: Arc<EventFd>,
    observed: Arc<Observed>,
}

/// The serving side's handle: hands Flushes over and takes their results.
#[derive(Clone)]
pub(super) struct Flusher {
    inner: Arc<Inner>,
}

impl Flusher {
    /// Hands the Flush `token` over; false when the thread has stopped (the caller syncs on
    /// its own thread instead).
    pub fn submit(&self, token: u64) -> bool {
        let mut q = lock(&self.inner.queue);
        if q.stop {
            return false;
        }
        q.waiting.push(token);
        self.inner.work.notify_one();
        true
    }

    /// Whether results may be waiting for [`Flusher::take_done`].
    pub fn has_done(&self) -> bool {
        self.inner.has_done.load(Ordering::Acquire)
    }

    /// Moves the results of finished syncs into `out`: (token, whether the sync succeeded).
    pub fn take_done(&self, out: &mut Vec<(u64, bool)>) {
        // Cleared before the lock is taken: a result pushed after this sets it again.
        if self.inner.has_done.swap(false, Ordering::AcqRel) {
            out.append(&mut lock(&self.inner.queue).done);
        }
    }

    /// Sets the hook the thread calls before each sync.
    #[cfg(test)]
    pub fn set_hook(&self, hook: Option<SyncHook>) {
        lock(&self.inner.queue).hook = hook;
    }
}

/// Owns the flusher thread; dropping it stops and joins the thread.
pub(super) struct FlusherThread {
    flusher: Flusher,
    handle: Option<JoinHandle<()>>,
    #[cfg(test)]
    alive: std::sync::Weak<()>,
}

impl FlusherThread {
    /// Stops the thread (after what it was given) and joins it; later Flushes are refused.
    pub fn stop(&mut self) {
        lock(&self.flusher.inner.queue).stop = true;
        self.flusher.inner.work.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }

    /// Alive (upgradable) exactly while the thread runs its body.
    #[cfg(test)]
    pub fn alive(&self) -> std::sync::Weak<()> {
        self.alive.clone()
    }
}

impl Drop for FlusherThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the flusher of `file`; it writes `eventfd` after each sync.
pub(super) fn spawn(
    file: Arc<File>,
    eventfd: Arc<EventFd>,
    observed: Arc<Observed>,
) -> std::io::Result<(Flusher, FlusherThread)> {
    let flusher = Flusher {
        inner: Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            has_done: AtomicBool::new(false),
            file,
            eventfd,
            observed,
        }),
    };
    let inner = flusher.inner.clone();
    let alive = Arc::new(());
    #[cfg(test)]
    let weak = Arc::downgrade(&alive);
    let handle = std::thread::Builder::new()
        .name("nvme-flusher".into())
        .spawn(move || {
            crate::thread_started();
            let _alive = alive;
            run(&inner);
        })?;
    Ok((
        flusher.clone(),
        FlusherThread {
            flusher,
            handle: Some(handle),
            #[cfg(test)]
            alive: weak,
        },
    ))
}

/// The thread's body; returns once stopped with nothing waiting.
fn run(inner: &Inner) {
    loop {
        let tokens = {
            let mut q = lock(&inner.queue);
            while q.waiting.is_empty() && !q.stop {
                q = inner.work.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.waiting.is_empty() {
                return;
            }
            #[cfg(test)]
            if let Some(hook) = q.hook.clone() {
                drop(q);
                hook();
                q = lock(&inner.queue);
            }
            // Everything waiting now was handed over before the sync starts.
            std::mem::take(&mut q.waiting)
        };
        let ok = inner.file.sync_data().is_ok();
        Observed::bump(&inner.observed.flush_syncs);
        {
            let mut q = lock(&inner.queue);
            q.done.extend(tokens.into_iter().map(|t| (t, ok)));
            inner.has_done.store(true, Ordering::Release);
        }
        // Wakes whoever serves the controller (worker or poller owner) to post them.
        let _ = inner.eventfd.write(1);
    }
}
