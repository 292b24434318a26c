//! A NIC served by the VMM itself: the switch's frames go straight onto a [`Wire`] and the
//! wire's frames straight to the switch, with no driver domain and no device model. Nothing
//! is isolated (a bug on this path is the VMM's); it is what a VMM without driver domains
//! offers, and what the network bench measures the NIC domain against (`benches/net.rs`).

use std::os::fd::RawFd;
use std::time::Duration;

use ddvm_abi::channel::net::FilterSet;
use ddvm_passthrough::Wire;

use super::class::{ClassCounters, Delivered};
use super::device::TxToken;
use super::service::FrameBackend;

/// Frames taken from the wire per pass, at most.
const RX_BUDGET: usize = 64;

/// A wire the VMM serves directly (see the module docs).
pub struct DirectNic {
    wire: Box<dyn Wire>,
    counters: ClassCounters,
    buf: Vec<u8>,
}

impl DirectNic {
    /// Serves `wire`.
    pub fn new(wire: Box<dyn Wire>) -> DirectNic {
        DirectNic {
            buf: vec![0; wire.max_frame()],
            wire,
            counters: ClassCounters {
                link_up: true,
                ..ClassCounters::default()
            },
        }
    }
}

impl FrameBackend for DirectNic {
    /// Sent at once: the chain is given back now. A wire that cannot take the frame drops it
    /// (counted as failed), as a network would.
    fn queue_tx(&mut self, _port: usize, _token: TxToken, frame: &[u8]) -> Option<bool> {
        match self.wire.send(frame) {
            Ok(()) => self.counters.tx_sent += 1,
            Err(_) => self.counters.tx_failed += 1,
        }
        Some(false)
    }

    /// The switch decides who receives a frame: the wire's frames are not filtered here.
    fn config_changed(&mut self) {}

    fn post(&mut self, _filters: &FilterSet) -> usize {
        0
    }

    fn collect(&mut self, out: &mut Vec<Delivered>) -> usize {
        let mut n = 0;
        while n < RX_BUDGET {
            match self.wire.recv(&mut self.buf) {
                Ok(Some(len)) => {
                    let Some(frame) = self.buf.get(..len) else {
                        break;
                    };
                    out.push(Delivered::Frame(frame.to_vec()));
                    self.counters.rx_frames += 1;
                    n += 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
        n
    }

    fn serving_epoch(&self) -> Option<u64> {
        Some(1)
    }

    fn counters(&self) -> &ClassCounters {
        &self.counters
    }

    fn shut_down(&mut self, _timeout: Duration) -> bool {
        true
    }

    fn arm(&mut self, _on: bool) -> bool {
        false
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        vec![self.wire.fd()]
    }

    fn sleep_limit(&self) -> Duration {
        Duration::from_millis(50)
    }
}
