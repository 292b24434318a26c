//! The crate's one way to take a lock.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, poisoned or not: a panicked holder left state that every holder keeps
/// consistent step by step, and the device must go on serving (and being quiesced) after it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
