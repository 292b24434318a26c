//! NVMe completion status: status code type and status code.

/// The status of a completed command (NVMe 1.4, 4.6.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Status Code Type: 0 generic, 1 command specific, 2 media and data integrity.
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
}

impl Status {
    /// Successful Completion.
    pub const SUCCESS: Status = Status::generic(0x00);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status::generic(0x01);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    /// Data Transfer Error (a PRP or PRP list outside the DMA window).
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
    /// Internal Error.
    pub const INTERNAL_ERROR: Status = Status::generic(0x06);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::generic(0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b);
    /// PRP Offset Invalid.
    pub const PRP_OFFSET_INVALID: Status = Status::generic(0x13);
    /// LBA Out of Range (NVM command set generic status).
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
    /// Completion Queue Invalid.
    pub const CQ_INVALID: Status = Status::specific(0x00);
    /// Invalid Queue Identifier.
    pub const INVALID_QID: Status = Status::specific(0x01);
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02);
    /// Invalid Interrupt Vector.
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::specific(0x08);
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT_EXCEEDED: Status = Status::specific(0x05);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d);
    /// Invalid Queue Deletion (a CQ still has SQs).
    pub const INVALID_QUEUE_DELETION: Status = Status::specific(0x0c);
    /// Write Fault (the backing file could not be written).
    pub const WRITE_FAULT: Status = Status::media(0x80);
    /// Unrecovered Read Error (the backing file could not be read).
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(0x81);

    const fn generic(sc: u8) -> Status {
        Status { sct: 0, sc }
    }

    const fn specific(sc: u8) -> Status {
        Status { sct: 1, sc }
    }

    const fn media(sc: u8) -> Status {
        Status { sct: 2, sc }
    }

    /// Whether this is Successful Completion.
    pub fn is_success(self) -> bool {
        self == Status::SUCCESS
    }

    /// Bits 15:1 of the upper half of completion dword 3 (bit 0, the phase tag, is 0): SC, SCT,
    /// and Do Not Retry for every error a retry cannot fix (all but transfer and media errors).
    pub fn field(self) -> u16 {
        let retryable =
            self == Status::DATA_TRANSFER_ERROR || self == Status::INTERNAL_ERROR || self.sct == 2;
        let dnr = if self.is_success() || retryable {
            0
        } else {
            1 << 15
        };
        ((self.sc as u16) << 1) | (((self.sct & 0x7) as u16) << 9) | dnr
    }

    /// Decodes the upper half of completion dword 3 (ignores phase, CRD, More, DNR).
    pub fn from_field(field: u16) -> Status {
        Status {
            sct: ((field >> 9) & 0x7) as u8,
            sc: (field >> 1) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes() {
        for s in [
            Status::SUCCESS,
            Status::INVALID_QID,
            Status::LBA_OUT_OF_RANGE,
            Status::WRITE_FAULT,
        ] {
            assert_eq!(Status::from_field(s.field()), s);
        }
        assert_eq!(Status::INVALID_QID.field(), 0x8000 | (1 << 9) | (1 << 1));
        assert_eq!(Status::DATA_TRANSFER_ERROR.field() & 0x8000, 0);
    }
}
