//! Admin commands (NVMe 1.4, 5): queues, identify, features, log pages, doorbell buffer.

use super::controller::{Controller, Observed};
use super::identify::{self, AERL};
use super::prp::PAGE_SIZE;
use super::queue::{Command, CompQueue, SubQueue, CQE_SIZE, SQE_SIZE};
use super::regs::{IOCQES, IOSQES, MQES};
use super::shadow::DoorbellBuffer;
use super::status::Status;
use super::MAX_TRANSFER;

/// Admin opcodes.
mod opcode {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// Feature identifiers.
mod fid {
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
}

type Outcome = (u32, Status);

fn err(s: Status) -> Outcome {
    (0, s)
}

const OK: Outcome = (0, Status::SUCCESS);

impl Controller {
    /// Executes an admin command; `None` when it completes later (Asynchronous Event Request).
    pub(super) fn admin(&mut self, cmd: &Command) -> Option<Outcome> {
        if cmd.fuse != 0 || cmd.psdt != 0 {
            return Some(err(Status::INVALID_FIELD));
        }
        Some(match cmd.opcode {
            opcode::DELETE_SQ => self.delete_sq(cmd),
            opcode::CREATE_SQ => self.create_sq(cmd),
            opcode::GET_LOG_PAGE => self.get_log_page(cmd),
            opcode::DELETE_CQ => self.delete_cq(cmd),
            opcode::CREATE_CQ => self.create_cq(cmd),
            opcode::IDENTIFY => self.identify(cmd),
            // Abort: dword 0 bit 0 set means "not aborted"; commands never wait here.
            opcode::ABORT => (1, Status::SUCCESS),
            opcode::SET_FEATURES => self.set_features(cmd),
            opcode::GET_FEATURES => self.get_features(cmd),
            opcode::ASYNC_EVENT_REQUEST => return self.async_event_request(cmd),
            opcode::DOORBELL_BUFFER_CONFIG => self.doorbell_buffer_config(cmd),
            _ => err(Status::INVALID_OPCODE),
        })
    }

    /// Common checks for a new I/O queue's size and memory; `entry` is the entry size.
    fn check_new_queue(&self, cmd: &Command, size: u32, entry: u64, es_ok: bool) -> Status {
        let contiguous = cmd.cdw(11) & 1 != 0;
        if size < 2 || size > u32::from(MQES) + 1 {
            return Status::INVALID_QUEUE_SIZE;
        }
        if !contiguous || !es_ok {
            return Status::INVALID_FIELD;
        }
        if cmd.prp1 & (PAGE_SIZE - 1) != 0 {
            return Status::PRP_OFFSET_INVALID;
        }
        if !self
            .dma
            .contains(cmd.prp1, (u64::from(size) * entry) as usize)
        {
            Observed::bump(&self.observed.dma_errors);
            return Status::INVALID_FIELD;
        }
        Status::SUCCESS
    }

    fn create_cq(&mut self, cmd: &Command) -> Outcome {
        let qid = (cmd.cdw(10) & 0xffff) as usize;
        let size = (cmd.cdw(10) >> 16) + 1;
        if qid == 0 || qid > usize::from(self.io_cqs_allowed) || self.cqs[qid].is_some() {
            return err(Status::INVALID_QID);
        }
        let es_ok = (self.regs.cc >> 20) & 0xf == IOCQES;
        let s = self.check_new_queue(cmd, size, CQE_SIZE, es_ok);
        if !s.is_success() {
            return err(s);
        }
        // Dword 11: Interrupt Vector (31:16), Interrupts Enabled (1).
        let ien = cmd.cdw(11) & 2 != 0;
        let iv = (cmd.cdw(11) >> 16) as u16;
        if iv >= self.limits.vectors {
            return err(Status::INVALID_INTERRUPT_VECTOR);
        }
        self.cqs[qid] = Some(CompQueue::new(cmd.prp1, size as u16, ien.then_some(iv)));
        self.sync_shadow_slots(qid);
        OK
    }

    fn create_sq(&mut self, cmd: &Command) -> Outcome {
        let qid = (cmd.cdw(10) & 0xffff) as usize;
        let size = (cmd.cdw(10) >> 16) + 1;
        let cqid = (cmd.cdw(11) >> 16) as usize;
        if qid == 0 || qid > usize::from(self.io_sqs_allowed) || self.sqs[qid].is_some() {
            return err(Status::INVALID_QID);
        }
        if cqid == 0 || self.cqs.get(cqid).and_then(Option::as_ref).is_none() {
            return err(Status::CQ_INVALID);
        }
        let es_ok = (self.regs.cc >> 16) & 0xf == IOSQES;
        let s = self.check_new_queue(cmd, size, SQE_SIZE, es_ok);
        if !s.is_success() {
            return err(s);
        }
        self.sqs[qid] = Some(SubQueue::new(cmd.prp1, size as u16, cqid as u16));
        self.sync_shadow_slots(qid);
        OK
    }

    fn delete_sq(&mut self, cmd: &Command) -> Outcome {
        let qid = (cmd.cdw(10) & 0xffff) as usize;
        match self.sqs.get_mut(qid) {
            Some(q @ Some(_)) if qid != 0 => {
                let sqhd = q.take().map_or(0, |sq| sq.head);
                self.abort_flushes_of(qid as u16, sqhd);
                OK
            }
            _ => err(Status::INVALID_QID),
        }
    }

    fn delete_cq(&mut self, cmd: &Command) -> Outcome {
        let qid = (cmd.cdw(10) & 0xffff) as usize;
        if qid == 0 || self.cqs.get(qid).and_then(Option::as_ref).is_none() {
            return err(Status::INVALID_QID);
        }
        if self
            .sqs
            .iter()
            .flatten()
            .any(|sq| usize::from(sq.cqid) == qid)
        {
            return err(Status::INVALID_QUEUE_DELETION);
        }
        self.cqs[qid] = None;
        OK
    }

    fn identify(&mut self, cmd: &Command) -> Outcome {
        let cns = cmd.cdw(10) & 0xff;
        let page = match cns {
            0x00 if cmd.nsid == 1 => identify::namespace(&self.ns),
            0x00 => return err(Status::INVALID_NAMESPACE),
            0x01 => identify::controller(
                &self.limits.serial,
                &self.limits.model,
                self.ns.cache_present(),
            ),
            0x02 if cmd.nsid < 0xffff_fffe => identify::active_namespaces(cmd.nsid),
            0x02 => return err(Status::INVALID_NAMESPACE),
            // Namespace identification descriptors: none.
            0x03 if cmd.nsid == 1 => [0u8; PAGE_SIZE as usize],
            0x03 => return err(Status::INVALID_NAMESPACE),
            _ => return err(Status::INVALID_FIELD),
        };
        err(self.dma_to_host(cmd.prp1, cmd.prp2, &page))
    }

    fn get_log_page(&mut self, cmd: &Command) -> Outcome {
        let lid = cmd.cdw(10) & 0xff;
        let numd = (((cmd.cdw(11) & 0xffff) << 16) | (cmd.cdw(10) >> 16)) as usize + 1;
        let len = numd * 4;
        if len > MAX_TRANSFER {
            return err(Status::INVALID_FIELD);
        }
        match lid {
            // Error information, SMART / health, firmware slot: nothing to report.
            0x01..=0x03 => err(self.dma_to_host(cmd.prp1, cmd.prp2, &vec![0u8; len])),
            _ => err(Status::INVALID_LOG_PAGE),
        }
    }

    fn set_features(&mut self, cmd: &Command) -> Outcome {
        let fid = (cmd.cdw(10) & 0xff) as u8;
        let save = cmd.cdw(10) & (1 << 31) != 0;
        let v = cmd.cdw(11);
        let known = matches!(
            fid,
            fid::VOLATILE_WRITE_CACHE | fid::NUMBER_OF_QUEUES | fid::ASYNC_EVENT_CONFIG
        );
        if !known {
            return err(Status::INVALID_FIELD);
        }
        if save {
            return err(Status::FEATURE_NOT_SAVEABLE);
        }
        match fid {
            fid::NUMBER_OF_QUEUES => {
                let (nsqr, ncqr) = (v & 0xffff, v >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return err(Status::INVALID_FIELD);
                }
                let max = u32::from(self.limits.max_io_queues);
                self.io_sqs_allowed = (nsqr + 1).min(max) as u16;
                self.io_cqs_allowed = (ncqr + 1).min(max) as u16;
                (self.queues_granted(), Status::SUCCESS)
            }
            fid::VOLATILE_WRITE_CACHE => {
                if !self.ns.cache_present() {
                    return err(Status::INVALID_FIELD);
                }
                match self.ns.set_cache_enabled(v & 1 != 0) {
                    Ok(()) => OK,
                    Err(_) => err(Status::INTERNAL_ERROR),
                }
            }
            _ => {
                self.async_event_config = v;
                OK
            }
        }
    }

    fn queues_granted(&self) -> u32 {
        u32::from(self.io_sqs_allowed - 1) | (u32::from(self.io_cqs_allowed - 1) << 16)
    }

    fn get_features(&mut self, cmd: &Command) -> Outcome {
        let fid = (cmd.cdw(10) & 0xff) as u8;
        let sel = (cmd.cdw(10) >> 8) & 0x7;
        let value = match fid {
            fid::NUMBER_OF_QUEUES => self.queues_granted(),
            fid::VOLATILE_WRITE_CACHE if self.ns.cache_present() => {
                u32::from(self.ns.cache_enabled())
            }
            fid::ASYNC_EVENT_CONFIG => self.async_event_config,
            _ => return err(Status::INVALID_FIELD),
        };
        match sel {
            // Supported capabilities: changeable, not saveable, not namespace specific.
            3 => (1 << 2, Status::SUCCESS),
            4..=7 => err(Status::INVALID_FIELD),
            _ => (value, Status::SUCCESS),
        }
    }

    fn async_event_request(&mut self, cmd: &Command) -> Option<Outcome> {
        if self.aers.len() > usize::from(AERL) {
            return Some(err(Status::AER_LIMIT_EXCEEDED));
        }
        self.aers.push(cmd.cid);
        None
    }

    fn doorbell_buffer_config(&mut self, cmd: &Command) -> Outcome {
        let page_mask = PAGE_SIZE - 1;
        let (shadow, event_idx) = (cmd.prp1, cmd.prp2);
        let aligned = shadow & page_mask == 0 && event_idx & page_mask == 0;
        if !aligned || shadow == event_idx {
            return err(Status::INVALID_FIELD);
        }
        let inside = self.dma.contains(shadow, PAGE_SIZE as usize)
            && self.dma.contains(event_idx, PAGE_SIZE as usize);
        if !inside {
            Observed::bump(&self.observed.dma_errors);
            return err(Status::INVALID_FIELD);
        }
        self.set_dbbuf(Some(DoorbellBuffer { shadow, event_idx }));
        for qid in 1..self.sqs.len() {
            self.sync_shadow_slots(qid);
        }
        OK
    }
}
