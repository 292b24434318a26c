//! The I/O path's vocabulary: what to do, why it was refused, what came back.

use core::fmt;

use super::cmd::Status;
use super::prp::PrpError;
use super::queue::DoorbellStats;

/// An I/O operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Read into the buffer.
    Read,
    /// Write from the buffer.
    Write,
    /// Flush the volatile write cache (no range, no buffer).
    Flush,
    /// Zero the range (no buffer).
    WriteZeroes,
    /// Deallocate the range (no buffer).
    Deallocate,
}

/// One I/O command's worth of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoRequest {
    /// What to do.
    pub kind: IoKind,
    /// First block.
    pub lba: u64,
    /// Blocks (0 for flush).
    pub blocks: u32,
    /// Buffer address for reads and writes (guest-physical, dword aligned, contiguous).
    pub buf: u64,
    /// Buffer length for reads and writes: `blocks * block_size`.
    pub len: u32,
}

impl IoRequest {
    /// A flush of the whole volatile write cache.
    pub const FLUSH: IoRequest = IoRequest {
        kind: IoKind::Flush,
        lba: 0,
        blocks: 0,
        buf: 0,
        len: 0,
    };
}

/// Why a request was not submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every command slot is in use: poll, then retry.
    Full,
    /// The device does not do this operation.
    Unsupported,
    /// The range, the length or the block count is wrong for this device.
    Invalid(&'static str),
    /// The buffer cannot be described with PRPs.
    Prp(PrpError),
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full => write!(f, "queue full"),
            SubmitError::Unsupported => write!(f, "operation not supported by the device"),
            SubmitError::Invalid(why) => write!(f, "{why}"),
            SubmitError::Prp(e) => write!(f, "{e}"),
        }
    }
}

/// A completed I/O command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoDone {
    /// The caller's token given at submission.
    pub user: u64,
    /// Completion status.
    pub status: Status,
}

/// Doorbell counts of the I/O queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Submission queue tail doorbell.
    pub sq: DoorbellStats,
    /// Completion queue head doorbell.
    pub cq: DoorbellStats,
}
