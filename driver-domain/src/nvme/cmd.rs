//! Submission and completion queue entries (NVMe base specification 1.4, sections 4.2, 4.6),
//! and the commands this driver sends.

use core::fmt;

/// Admin command opcodes.
pub mod admin {
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Doorbell Buffer Config (shadow doorbells, for emulated controllers).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
}

/// Size of a submission queue entry (2^6).
pub const SQE_SIZE: u64 = 64;
/// Size of a completion queue entry (2^4).
pub const CQE_SIZE: u64 = 16;

/// A submission queue entry. The queue fills in `cid`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (or the PRP list).
    pub prp2: u64,
    /// Command dwords 10–15.
    pub cdw: [u32; 6],
}

impl Command {
    /// The 16 dwords of the entry (PRPs for data, FUSE = 0, no metadata).
    pub fn to_dwords(self) -> [u32; 16] {
        let mut d = [0u32; 16];
        d[0] = u32::from(self.opcode) | u32::from(self.cid) << 16;
        d[1] = self.nsid;
        d[6] = self.prp1 as u32;
        d[7] = (self.prp1 >> 32) as u32;
        d[8] = self.prp2 as u32;
        d[9] = (self.prp2 >> 32) as u32;
        d[10..16].copy_from_slice(&self.cdw);
        d
    }

    /// Identify `cns` for `nsid` into the page at `buf`.
    pub fn identify(cns: u32, nsid: u32, buf: u64) -> Self {
        Command {
            opcode: admin::IDENTIFY,
            nsid,
            prp1: buf,
            cdw: [cns, 0, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Set Features `fid` to `value` (dword 11).
    pub fn set_features(fid: u32, value: u32) -> Self {
        Command {
            opcode: admin::SET_FEATURES,
            cdw: [fid, value, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Create I/O completion queue `qid` of `entries` at `addr`: physically contiguous, with
    /// interrupts on `vector` (MSI-X), or off (`None`: the driver only polls).
    pub fn create_cq(qid: u16, entries: u16, addr: u64, vector: Option<u16>) -> Self {
        // PC = 1; IEN = 1 and IV = the vector when interrupts are wanted.
        let cdw11 = match vector {
            Some(v) => u32::from(v) << 16 | 1 << 1 | 1,
            None => 1,
        };
        Command {
            opcode: admin::CREATE_CQ,
            prp1: addr,
            cdw: [
                (u32::from(entries) - 1) << 16 | u32::from(qid),
                cdw11,
                0,
                0,
                0,
                0,
            ],
            ..Default::default()
        }
    }

    /// Create I/O submission queue `qid` of `entries` at `addr`, completing on `cqid`:
    /// physically contiguous, priority ignored (round robin).
    pub fn create_sq(qid: u16, entries: u16, addr: u64, cqid: u16) -> Self {
        Command {
            opcode: admin::CREATE_SQ,
            prp1: addr,
            cdw: [
                (u32::from(entries) - 1) << 16 | u32::from(qid),
                u32::from(cqid) << 16 | 1, // PC = 1
                0,
                0,
                0,
                0,
            ],
            ..Default::default()
        }
    }

    /// Doorbell Buffer Config: shadow doorbells at `shadow`, event indices at `eventidx`.
    pub fn doorbell_buffer_config(shadow: u64, eventidx: u64) -> Self {
        Command {
            opcode: admin::DOORBELL_BUFFER_CONFIG,
            prp1: shadow,
            prp2: eventidx,
            ..Default::default()
        }
    }

    /// Read or write `blocks` blocks (1..=65536) at `lba` with the given PRPs.
    pub fn read_write(write: bool, nsid: u32, lba: u64, blocks: u32, prp1: u64, prp2: u64) -> Self {
        Command {
            opcode: if write { io::WRITE } else { io::READ },
            nsid,
            prp1,
            prp2,
            cdw: [lba as u32, (lba >> 32) as u32, blocks - 1, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Flush the volatile write cache.
    pub fn flush(nsid: u32) -> Self {
        Command {
            opcode: io::FLUSH,
            nsid,
            ..Default::default()
        }
    }

    /// Write Zeroes over `blocks` blocks (1..=65536) at `lba`.
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u32) -> Self {
        Command {
            opcode: io::WRITE_ZEROES,
            nsid,
            cdw: [lba as u32, (lba >> 32) as u32, blocks - 1, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Dataset Management, deallocate, one range (written by the caller at `ranges`).
    pub fn deallocate(nsid: u32, ranges: u64) -> Self {
        Command {
            opcode: io::DATASET_MANAGEMENT,
            nsid,
            prp1: ranges,
            cdw: [0, 1 << 2, 0, 0, 0, 0], // NR = 0 (one range), AD = 1
            ..Default::default()
        }
    }
}

/// A completion queue entry, decoded. Every field is the device's word: validate before use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command-specific dword 0.
    pub dw0: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status field (without the phase tag).
    pub status: Status,
    /// Phase tag.
    pub phase: bool,
}

impl CompletionEntry {
    /// Decodes the four dwords of an entry.
    pub fn from_dwords(d: [u32; 4]) -> Self {
        CompletionEntry {
            dw0: d[0],
            sq_head: d[2] as u16,
            sq_id: (d[2] >> 16) as u16,
            cid: d[3] as u16,
            status: Status((d[3] >> 17) as u16),
            phase: d[3] & (1 << 16) != 0,
        }
    }
}

/// The status field of a completion (15 bits: SC, SCT, CRD, More, DNR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status(pub u16);

/// Generic command status: Invalid Command Opcode.
const SC_INVALID_OPCODE: u8 = 0x01;
/// Generic command status: Invalid Field in Command.
const SC_INVALID_FIELD: u8 = 0x02;

impl Status {
    /// Status code.
    pub fn code(self) -> u8 {
        self.0 as u8
    }

    /// Status code type (0 generic, 1 command specific, 2 media, ...).
    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Do Not Retry.
    pub fn do_not_retry(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// Successful completion.
    pub fn is_success(self) -> bool {
        self.code() == 0 && self.code_type() == 0
    }

    /// The controller does not implement the command (or a field of it).
    pub fn is_unsupported(self) -> bool {
        self.code_type() == 0 && matches!(self.code(), SC_INVALID_OPCODE | SC_INVALID_FIELD)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {:#06x} (sct={} sc={:#04x}{})",
            self.0,
            self.code_type(),
            self.code(),
            if self.do_not_retry() { " dnr" } else { "" }
        )
    }
}
