//! The NIC's operations as the shadow queue keeps them, and what each entry carries.
//!
//! A transmit is requeued when its domain is lost (at-least-once: the client's chain is given
//! back only once a domain reported the frame sent), and so is a configuration; a receive
//! buffer is dropped (a frame the dead domain had taken and not reported is lost, as a network
//! may lose it) and the class posts fresh ones to the next domain. A receive buffer waits for
//! the world outside, not for the device: the request deadline does not apply to it.

use ddvm_recovery::shadow::{OnLoss, Operation};

use super::device::TxToken;

/// A request to a NIC driver domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetOp {
    /// A client's frame to send.
    Transmit,
    /// An empty receive buffer.
    Receive,
    /// The filter set the VMM computed from its clients.
    Config,
}

impl Operation for NetOp {
    fn modifies(&self) -> bool {
        *self == NetOp::Config
    }

    fn deadline_bound(&self) -> bool {
        *self != NetOp::Receive
    }

    fn on_loss(&self) -> OnLoss {
        match self {
            NetOp::Receive => OnLoss::Drop,
            NetOp::Transmit | NetOp::Config => OnLoss::Requeue,
        }
    }
}

/// What a shadow entry carries: the client chain a transmit gives back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    /// A client's TX chain: the port's index and its token.
    Tx {
        /// Port index.
        port: usize,
        /// The chain.
        token: TxToken,
    },
    /// The VMM's own request (receive buffer, configuration).
    Own,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_buffers_are_dropped_on_loss_and_free_of_the_deadline() {
        assert_eq!(NetOp::Receive.on_loss(), OnLoss::Drop);
        assert!(!NetOp::Receive.deadline_bound());
        for op in [NetOp::Transmit, NetOp::Config] {
            assert_eq!(op.on_loss(), OnLoss::Requeue);
            assert!(op.deadline_bound());
        }
        assert!(NetOp::Config.modifies() && !NetOp::Transmit.modifies());
    }
}
