//! NVM I/O commands on namespace 1: Flush, Write, Read, Write Zeroes, Dataset Management.

use super::controller::Controller;
use super::prp;
use super::queue::Command;
use super::status::Status;
use super::MAX_TRANSFER;

/// NVM opcodes.
mod opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// The only namespace.
const NSID: u32 = 1;
/// "All namespaces" (accepted by Flush).
const NSID_ALL: u32 = 0xffff_ffff;
/// Write / Read: Force Unit Access.
const FUA: u32 = 1 << 30;
/// Dataset Management: Attribute - Deallocate.
const DSM_DEALLOCATE: u32 = 1 << 2;
/// Bytes per Dataset Management range.
const DSM_RANGE_SIZE: usize = 16;

type Outcome = (u32, Status);

impl Controller {
    /// Executes an I/O command taken from submission queue `sqid` (bound to completion queue
    /// `cqid`); `None` when it completes later (a Flush whose sync runs on the flusher).
    pub(super) fn io(&mut self, cmd: &Command, sqid: u16, cqid: u16) -> Option<Outcome> {
        let status = if cmd.fuse != 0 || cmd.psdt != 0 {
            Status::INVALID_FIELD
        } else {
            match cmd.opcode {
                opcode::FLUSH => self.flush(cmd, sqid, cqid)?,
                opcode::WRITE => self.read_write(cmd, true),
                opcode::READ => self.read_write(cmd, false),
                opcode::WRITE_ZEROES => self.write_zeroes(cmd),
                opcode::DATASET_MANAGEMENT => self.dataset_management(cmd),
                _ => Status::INVALID_OPCODE,
            }
        };
        Some((0, status))
    }

    /// Starting LBA and block count (from the 0's based NLB) of a Read/Write/Write Zeroes.
    fn lba_range(cmd: &Command) -> (u64, u64) {
        let slba = u64::from(cmd.cdw(10)) | (u64::from(cmd.cdw(11)) << 32);
        (slba, u64::from(cmd.cdw(12) & 0xffff) + 1)
    }

    /// Flush: the volatile cache goes to the file here; the sync runs on the flusher thread
    /// when there is one to hand it to (`None`: the completion comes in a later pass), else
    /// here. Either way it starts after every write completed before this command was taken.
    fn flush(&mut self, cmd: &Command, sqid: u16, cqid: u16) -> Option<Status> {
        if cmd.nsid != NSID && cmd.nsid != NSID_ALL {
            return Some(Status::INVALID_NAMESPACE);
        }
        if self.ns.write_back().is_err() {
            return Some(Status::WRITE_FAULT);
        }
        if self.flush_async(sqid, cqid, cmd.cid) {
            return None;
        }
        Some(match self.ns.file().sync_data() {
            Ok(()) => Status::SUCCESS,
            Err(_) => Status::WRITE_FAULT,
        })
    }

    fn read_write(&mut self, cmd: &Command, write: bool) -> Status {
        if cmd.nsid != NSID {
            return Status::INVALID_NAMESPACE;
        }
        let (slba, nlb) = Self::lba_range(cmd);
        let len = nlb * u64::from(self.ns.lba_size());
        if len > MAX_TRANSFER as u64 {
            return Status::INVALID_FIELD;
        }
        if !self.ns.in_range(slba, nlb) {
            return Status::LBA_OUT_OF_RANGE;
        }
        let len = len as usize;
        let segs = match prp::segments(&self.dma, cmd.prp1, cmd.prp2, len) {
            Ok(s) => s,
            Err(f) => return self.prp_status(Err(f)),
        };
        let fua = cmd.cdw(12) & FUA != 0;
        let ns = &mut self.ns;
        let done = self.dma.with_slices(&segs, |slices| {
            if write {
                ns.write_from(slba, slices, fua)
                    .map_or(Status::WRITE_FAULT, |()| Status::SUCCESS)
            } else {
                ns.read_into(slba, slices)
                    .map_or(Status::UNRECOVERED_READ_ERROR, |()| Status::SUCCESS)
            }
        });
        done.unwrap_or_else(|_| self.prp_status(Err(prp::PrpFault::Dma)))
    }

    fn write_zeroes(&mut self, cmd: &Command) -> Status {
        if cmd.nsid != NSID {
            return Status::INVALID_NAMESPACE;
        }
        let (slba, nlb) = Self::lba_range(cmd);
        if !self.ns.in_range(slba, nlb) {
            return Status::LBA_OUT_OF_RANGE;
        }
        match self.ns.zero(slba, nlb) {
            Ok(()) => Status::SUCCESS,
            Err(_) => Status::WRITE_FAULT,
        }
    }

    fn dataset_management(&mut self, cmd: &Command) -> Status {
        if cmd.nsid != NSID {
            return Status::INVALID_NAMESPACE;
        }
        let ranges = (cmd.cdw(10) & 0xff) as usize + 1;
        let raw = match self.dma_from_host(cmd.prp1, cmd.prp2, ranges * DSM_RANGE_SIZE) {
            Ok(r) => r,
            Err(s) => return s,
        };
        if cmd.cdw(11) & DSM_DEALLOCATE == 0 {
            // Only hints (integral read/write): nothing to do.
            return Status::SUCCESS;
        }
        let parsed: Vec<(u64, u64)> = raw
            .chunks_exact(DSM_RANGE_SIZE)
            .map(|r| {
                let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
                let mut s = [0u8; 8];
                s.copy_from_slice(&r[8..16]);
                (u64::from_le_bytes(s), u64::from(nlb))
            })
            .collect();
        if parsed
            .iter()
            .any(|&(slba, nlb)| !self.ns.in_range(slba, nlb))
        {
            return Status::LBA_OUT_OF_RANGE;
        }
        for (slba, nlb) in parsed {
            if self.ns.zero(slba, nlb).is_err() {
                return Status::WRITE_FAULT;
            }
        }
        Status::SUCCESS
    }
}
