//! A write-once cell for boot-time state.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU8, Ordering};

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

/// A value set once (at boot) and read-only afterwards. All-zero when empty, so a static of it
/// lives in `.bss`.
pub(crate) struct InitCell<T> {
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written only by the caller that wins the EMPTY -> WRITING transition and
// read only after READY is published (release/acquire), after which it is never written again:
// sharing `&InitCell<T>` hands out only `&T`.
unsafe impl<T: Send + Sync> Sync for InitCell<T> {}

impl<T> InitCell<T> {
    /// An empty cell.
    pub(crate) const fn new() -> Self {
        InitCell {
            state: AtomicU8::new(EMPTY),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Stores `value` if the cell is empty and returns a reference to it; otherwise gives the
    /// value back.
    pub(crate) fn set(&self, value: T) -> Result<&T, T> {
        if self
            .state
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(value);
        }
        // SAFETY: this caller won EMPTY -> WRITING: nobody else writes, and nobody reads before
        // READY is published below.
        let stored = unsafe { (*self.value.get()).write(value) };
        self.state.store(READY, Ordering::Release);
        Ok(stored)
    }

    /// The value, once set.
    pub(crate) fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) != READY {
            return None;
        }
        // SAFETY: READY is published after the value was fully written, and it is never
        // written again.
        Some(unsafe { (*self.value.get()).assume_init_ref() })
    }
}
