//! Controller registers (NVMe base specification 1.4, section 3.1), typed.
//!
//! Every access is an aligned MMIO access of the register's width: 32 bits, or 64 bits for
//! CAP, ASQ and ACQ (one access where two 32-bit halves would take two; the specification
//! lets the host use either, and QEMU's controller and ddvm's take both). Each is an exit when
//! the VMM emulates the controller, so the data path touches only doorbells and bring-up as
//! few registers as it can.

use guest_kernel::mmio::{MmioRegion, WriteOnly};

use super::error::NvmeError;

/// Controller Capabilities (64 bits).
const CAP: u64 = 0x00;
/// Version.
const VS: u64 = 0x08;
/// Controller Configuration.
const CC: u64 = 0x14;
/// Controller Status.
const CSTS: u64 = 0x1c;
/// Admin Queue Attributes.
const AQA: u64 = 0x24;
/// Admin Submission Queue base address (64 bits).
const ASQ: u64 = 0x28;
/// Admin Completion Queue base address (64 bits).
const ACQ: u64 = 0x30;
/// First doorbell.
const DOORBELLS: u64 = 0x1000;

/// CAP, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum entries of one queue (MQES is 0's based).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }

    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds (TO is in 500 ms units;
    /// at least 500 ms).
    pub fn ready_timeout_ms(self) -> u64 {
        ((self.0 >> 24) & 0xff).max(1) * 500
    }

    /// Doorbell stride in bytes (4 << DSTRD).
    pub fn doorbell_stride(self) -> u64 {
        4 << ((self.0 >> 32) & 0xf)
    }

    /// Whether the NVM command set is supported (CSS bit 0).
    pub fn nvm_command_set(self) -> bool {
        self.0 & (1 << 37) != 0
    }

    /// Smallest memory page size, as a power of two (12 + MPSMIN).
    pub fn page_shift_min(self) -> u32 {
        12 + ((self.0 >> 48) & 0xf) as u32
    }

    /// Largest memory page size, as a power of two (12 + MPSMAX).
    pub fn page_shift_max(self) -> u32 {
        12 + ((self.0 >> 52) & 0xf) as u32
    }
}

/// CC bits.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1 << 0;
    /// I/O command set selected: NVM (CSS = 0).
    pub const CSS_NVM: u32 = 0 << 4;
    /// Memory page size = 2^(12 + MPS): shift of the field.
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration: round robin (AMS = 0).
    pub const AMS_RR: u32 = 0 << 11;
    /// I/O submission queue entry size = 2^IOSQES: shift of the field.
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O completion queue entry size = 2^IOCQES: shift of the field.
    pub const IOCQES_SHIFT: u32 = 20;
    /// Shutdown Notification (SHN): the field.
    pub const SHN_MASK: u32 = 0b11 << 14;
    /// SHN = 01b: normal shutdown.
    pub const SHN_NORMAL: u32 = 0b01 << 14;
}

/// CSTS bits.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1 << 0;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status (SHST): the field.
    pub const SHST_MASK: u32 = 0b11 << 2;
    /// SHST = 10b: shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 0b10 << 2;
}

/// Which doorbell of a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellKind {
    /// Submission queue tail.
    SqTail,
    /// Completion queue head.
    CqHead,
}

/// Offset of a doorbell from the first one (also its offset in a shadow doorbell buffer).
pub fn doorbell_index_offset(qid: u16, kind: DoorbellKind, stride: u64) -> u64 {
    let index = 2 * u64::from(qid)
        + match kind {
            DoorbellKind::SqTail => 0,
            DoorbellKind::CqHead => 1,
        };
    index * stride
}

/// The controller's register window (BAR0).
pub struct Registers {
    region: MmioRegion,
    cap: Cap,
}

impl Registers {
    /// Takes the window and reads CAP; fails when the window cannot even hold the admin
    /// doorbells.
    pub fn new(region: MmioRegion) -> Result<Self, NvmeError> {
        let need = DOORBELLS + 8;
        if region.len() < need {
            return Err(NvmeError::BarTooSmall {
                len: region.len(),
                need,
            });
        }
        let cap = Cap(region.read_only::<u64>(CAP).read());
        Ok(Registers { region, cap })
    }

    /// CAP as read at [`Registers::new`].
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// VS: major << 16 | minor << 8 | tertiary (Identify Controller's VER has it too, without
    /// an exit, on NVMe 1.2 and later).
    pub fn version(&self) -> u32 {
        self.region.read_only::<u32>(VS).read()
    }

    /// CC.
    pub fn cc(&self) -> u32 {
        self.region.read_write::<u32>(CC).read()
    }

    /// Writes CC.
    pub fn set_cc(&self, value: u32) {
        self.region.read_write::<u32>(CC).write(value)
    }

    /// CSTS.
    pub fn csts(&self) -> u32 {
        self.region.read_only::<u32>(CSTS).read()
    }

    /// Writes AQA: admin queue sizes (entries, not 0's based).
    pub fn set_admin_queue_sizes(&self, sq_entries: u16, cq_entries: u16) {
        let value = (u32::from(cq_entries) - 1) << 16 | (u32::from(sq_entries) - 1);
        self.region.read_write::<u32>(AQA).write(value)
    }

    /// Writes ASQ and ACQ.
    pub fn set_admin_queues(&self, sq: u64, cq: u64) {
        self.write_u64(ASQ, sq);
        self.write_u64(ACQ, cq);
    }

    fn write_u64(&self, offset: u64, value: u64) {
        self.region.read_write::<u64>(offset).write(value);
    }

    /// The doorbell register of queue `qid`, if the window holds it (the stride comes from
    /// the device).
    pub fn doorbell(&self, qid: u16, kind: DoorbellKind) -> Result<WriteOnly<u32>, NvmeError> {
        let offset = DOORBELLS + doorbell_index_offset(qid, kind, self.cap.doorbell_stride());
        if offset + 4 > self.region.len() {
            return Err(NvmeError::BarTooSmall {
                len: self.region.len(),
                need: offset + 4,
            });
        }
        Ok(self.region.write_only::<u32>(offset))
    }
}
