//! The NIC's worker thread (one of the two ways to receive; see the module docs of [`super`]).
//!
//! Loop: a receive pass (up to [`RX_BUDGET`] frames from the wire into the ring, under the NIC
//! lock); if it used its whole budget, another at once, since frames taken off a socket may
//! wait in the wire's buffer without making its descriptor readable; otherwise sleep until the
//! wire's descriptor or the stop eventfd is readable. A closed wire is not waited on any more
//! (its descriptor would poll readable for ever); after another receive error the worker
//! waits [`BACKOFF_MS`] before it tries again, so a failing device cannot make it spin. It
//! reaches domain memory only through the DMA window and the domain only through the wake
//! eventfd the NIC holds, which a detach drops.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Shared, RX_BUDGET};
use crate::net::poll_readable;

/// How long the worker waits after a receive error before it tries again.
pub const BACKOFF_MS: i32 = 10;

/// The worker's body; returns when `shared.stop` is set.
pub(super) fn run(shared: Arc<Shared>) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let (taken, closed, backoff) = shared.with_nic(|n| {
            let taken = n.rx_pass(RX_BUDGET);
            (taken, n.wire_closed, n.wire_backoff)
        });
        if taken >= RX_BUDGET {
            continue;
        }
        let stop = shared.stop_fd.as_raw_fd();
        if closed {
            poll_readable(&[stop], -1);
        } else if backoff {
            poll_readable(&[stop], BACKOFF_MS);
        } else {
            poll_readable(&[stop, shared.wire_fd], -1);
        }
    }
}
