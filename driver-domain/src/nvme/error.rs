//! Why the NVMe driver stops. Every one of these is fatal for the domain: the service marks
//! the channel failed and panics with the message, and the supervisor restarts the domain and
//! resets the device.

use core::fmt;

use super::cmd::Status;

/// A fatal NVMe driver error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmeError {
    /// The register window (BAR0) is smaller than the registers the driver needs.
    BarTooSmall {
        /// Window length.
        len: u64,
        /// Bytes needed.
        need: u64,
    },
    /// CSTS reads all ones: the controller is gone (surprise removal, or a dead model).
    NotResponding,
    /// The controller does not support what this driver needs.
    Unsupported(&'static str),
    /// CSTS.RDY did not follow CC.EN within CAP.TO.
    ReadyTimeout {
        /// The RDY value waited for.
        ready: bool,
        /// Time waited.
        ms: u64,
    },
    /// CSTS.CFS: the controller reported a fatal error.
    ControllerFatal,
    /// A command did not complete in time.
    CommandTimeout {
        /// Command identifier.
        cid: u16,
        /// Opcode.
        opcode: u8,
        /// Queue.
        qid: u16,
        /// Time waited.
        ms: u64,
    },
    /// An admin command the driver needs failed.
    AdminFailed {
        /// Opcode.
        opcode: u8,
        /// Its completion status.
        status: Status,
    },
    /// The controller wrote a completion entry that matches no command in flight.
    BadCompletion {
        /// Queue the entry was on.
        qid: u16,
        /// Submission queue it names.
        sq_id: u16,
        /// Command identifier it names.
        cid: u16,
    },
    /// No active namespace with a usable format.
    NoNamespace,
    /// The namespace's format cannot be served (metadata, odd block size).
    Format {
        /// LBA data size in bytes (as a power of two: LBADS).
        lbads: u8,
        /// Metadata bytes per block.
        metadata: u16,
    },
    /// The heap could not hold the queues or buffers.
    OutOfMemory,
    /// CSTS.SHST did not become 10b (shutdown complete) in time after CC.SHN.
    ShutdownTimeout {
        /// Time waited.
        ms: u64,
    },
}

impl fmt::Display for NvmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NvmeError::BarTooSmall { len, need } => write!(
                f,
                "nvme: register window of {len:#x} bytes, the driver needs {need:#x}"
            ),
            NvmeError::NotResponding => {
                write!(f, "nvme: controller not responding (CSTS reads all ones)")
            }
            NvmeError::Unsupported(what) => write!(f, "nvme: controller unsupported: {what}"),
            NvmeError::ReadyTimeout { ready, ms } => write!(
                f,
                "nvme: CSTS.RDY did not become {} within {ms} ms (CAP.TO)",
                u8::from(ready)
            ),
            NvmeError::ControllerFatal => write!(f, "nvme: controller fatal status (CSTS.CFS)"),
            NvmeError::CommandTimeout {
                cid,
                opcode,
                qid,
                ms,
            } => write!(
                f,
                "nvme: command cid={cid} opcode={opcode:#04x} qid={qid} timed out after {ms} ms"
            ),
            NvmeError::AdminFailed { opcode, status } => {
                write!(
                    f,
                    "nvme: admin command opcode={opcode:#04x} failed: {status}"
                )
            }
            NvmeError::BadCompletion { qid, sq_id, cid } => write!(
                f,
                "nvme: completion on queue {qid} for sqid={sq_id} cid={cid} matches no command in \
                 flight"
            ),
            NvmeError::NoNamespace => write!(f, "nvme: no active namespace"),
            NvmeError::Format { lbads, metadata } => write!(
                f,
                "nvme: namespace format LBADS={lbads} with {metadata} metadata bytes is not served"
            ),
            NvmeError::OutOfMemory => write!(f, "nvme: out of memory for queues and buffers"),
            NvmeError::ShutdownTimeout { ms } => write!(
                f,
                "nvme: shutdown not complete (CSTS.SHST) within {ms} ms of CC.SHN"
            ),
        }
    }
}
