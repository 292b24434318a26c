//! Wires: where an emulated NIC's frames go and where they come from.
//!
//! A [`Wire`] carries whole Ethernet frames (destination MAC first, no preamble, no CRC) of
//! [`MIN_FRAME`] to [`Wire::max_frame`] bytes. It never blocks: [`Wire::send`] hands a frame
//! over or drops it (counted, as a congested network does), [`Wire::recv`] returns the next
//! frame waiting or nothing, and [`Wire::fd`] is a file descriptor that polls readable
//! (`POLLIN`) while a frame may be waiting, so the device's owner can sleep on it among its
//! other work.
//!
//! The backends:
//! - [`pair`]: two endpoints joined back to back in the process, with optional loss,
//!   duplication and delay (a seeded PRNG makes runs repeatable): tests, and two NICs of one
//!   VMM joined to each other.
//! - [`stream`] and [`dgram`]: Unix sockets speaking QEMU's `-netdev stream` framing (a 4-byte
//!   big-endian length before each frame) and `-netdev dgram` framing (one frame per
//!   datagram), connecting or listening.
//! - [`tap`]: a TAP device of the host (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`).
//!
//! Everything a peer sends is hostile input: a frame of the wrong size is dropped and
//! counted; a stream that breaks its framing is closed.

pub mod dgram;
pub mod pair;
pub mod stream;
pub mod tap;

use std::io;
use std::os::fd::RawFd;

pub use dgram::DgramWire;
pub use pair::{wire_pair, Every, PairConfig, PairEnd};
pub use stream::{StreamListener, StreamWire};
pub use tap::TapWire;

/// Largest frame (no CRC) a NIC of ddvm sends or receives: 1514 bytes of an untagged frame
/// plus a VLAN tag.
pub const MAX_FRAME: usize = 1522;
/// Smallest frame a wire carries: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Why a wire refused a frame or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frame handed to [`Wire::send`] is too short or too long for the wire.
    #[error("frame of {len} bytes; expected {MIN_FRAME} to {max}")]
    FrameSize {
        /// Length given.
        len: usize,
        /// The wire's largest frame.
        max: usize,
    },
    /// The buffer handed to [`Wire::recv`] cannot hold the wire's largest frame.
    #[error("receive buffer of {len} bytes; expected at least {max}")]
    BufferTooSmall {
        /// Length given.
        len: usize,
        /// The wire's largest frame.
        max: usize,
    },
    /// The wire is closed for good: the peer went away or broke the protocol. Every later
    /// call fails the same way.
    #[error("wire closed: {reason}")]
    Closed {
        /// Why, in one line.
        reason: String,
    },
    /// The host refused an operation (creating or configuring the wire).
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Counters of a wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames handed to the far end (a duplicated frame counts twice).
    pub sent: u64,
    /// Frames returned by [`Wire::recv`].
    pub received: u64,
    /// Frames [`Wire::send`] dropped: the far end's queue or the socket was full, the peer is
    /// gone, or the impairment of a [`pair`] chose to.
    pub send_dropped: u64,
    /// Frames from the peer dropped before [`Wire::recv`] could return them: too short, too
    /// long.
    pub recv_dropped: u64,
}

/// A way for frames to leave and reach an emulated NIC (see the module docs).
pub trait Wire: Send {
    /// The largest frame the wire carries, in bytes (no CRC).
    fn max_frame(&self) -> usize;

    /// Sends `frame` without blocking. A frame the wire cannot take now is dropped and
    /// counted ([`WireStats::send_dropped`]) and `Ok` is returned, as a network loses frames;
    /// an error means the frame is malformed or the wire is closed.
    fn send(&mut self, frame: &[u8]) -> Result<(), WireError>;

    /// The next frame waiting, copied into `buf` (at least [`Wire::max_frame`] bytes), without
    /// blocking: `Ok(Some(len))`, or `Ok(None)` when nothing is waiting. A caller that stops
    /// before `Ok(None)` must come back without waiting on [`Wire::fd`]: frames already taken
    /// off the socket do not make it readable.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError>;

    /// Polls readable while a frame may be waiting (and once the wire is closed). The same
    /// descriptor for the wire's whole life.
    fn fd(&self) -> RawFd;

    /// The counters now.
    fn stats(&self) -> WireStats;
}

/// Checks a frame's length against a wire's limits.
fn check_frame(frame: &[u8], max: usize) -> Result<(), WireError> {
    if (MIN_FRAME..=max).contains(&frame.len()) {
        Ok(())
    } else {
        Err(WireError::FrameSize {
            len: frame.len(),
            max,
        })
    }
}

/// Checks a receive buffer against a wire's limit.
fn check_buffer(buf: &[u8], max: usize) -> Result<(), WireError> {
    if buf.len() >= max {
        Ok(())
    } else {
        Err(WireError::BufferTooSmall {
            len: buf.len(),
            max,
        })
    }
}

/// Polls `fds` for `POLLIN` for at most `timeout_ms` (-1: no limit); returns which are
/// readable (or hung up). An interrupted or failed poll reports none.
pub(crate) fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect()
}

/// Whether an I/O error only means "not now" on a non-blocking descriptor.
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
pub(crate) mod tests;
