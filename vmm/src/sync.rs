//! The VMM's one way to take a lock.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, poisoned or not. A thread that panicked while holding one of the VMM's locks
/// left state that every holder keeps consistent step by step (counters, queues, flags), and
/// the VMM's answer to a panicked thread is to report it where it is joined, not to stop every
/// other thread that shares the state.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lock_poisoned_by_a_panicked_holder_is_still_taken() {
        let m = Arc::new(Mutex::new(1));
        let held = m.clone();
        let r = std::thread::spawn(move || {
            let mut g = held.lock().unwrap();
            *g = 2;
            panic!("holder panics");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 2);
    }
}
