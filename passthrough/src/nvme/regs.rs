//! Controller registers in BAR0 (NVMe 1.4, 3.1): CAP, VS, INTMS/INTMC, CC, CSTS, AQA, ASQ, ACQ.
//! Doorbells (from [`DOORBELL_BASE`]) are handled without the controller lock in `mod.rs`.
//!
//! Registers are accessed as aligned dwords or qwords (a qword is two dwords, low first).
//! Reads of any size are served byte by byte from the dwords. Other writes, writes to
//! read-only registers, and writes to AQA/ASQ/ACQ while the controller is enabled are ignored
//! and counted.

use super::controller::{Controller, Observed, CSTS_CFS, CSTS_RDY, CSTS_SHST_COMPLETE};
use super::prp::PAGE_SIZE;
use super::queue::{CompQueue, SubQueue, CQE_SIZE, SQE_SIZE};
use super::NVME_VERSION;

/// First doorbell register.
pub const DOORBELL_BASE: u64 = 0x1000;
/// Maximum Queue Entries Supported (0's based): 1024 entries.
pub const MQES: u16 = 1023;

const CAP: u64 = 0x00;
const VS: u64 = 0x08;
const INTMS: u64 = 0x0c;
const INTMC: u64 = 0x10;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.IOSQES value this controller accepts for I/O queues (64-byte entries).
pub const IOSQES: u32 = 6;
/// CC.IOCQES value this controller accepts for I/O queues (16-byte entries).
pub const IOCQES: u32 = 4;

/// The CAP register: MQES, Contiguous Queues Required, timeout 500 ms, DSTRD 0, NVM command
/// set, 4 KiB pages only.
pub fn cap() -> u64 {
    let to_500ms_units = 1u64;
    u64::from(MQES) | (1 << 16) | (to_500ms_units << 24) | (1 << 37)
}

impl Controller {
    fn reg_dword(&self, offset: u64) -> u32 {
        let r = &self.regs;
        match offset {
            CAP => cap() as u32,
            o if o == CAP + 4 => (cap() >> 32) as u32,
            VS => NVME_VERSION,
            INTMS | INTMC => r.intms,
            CC => r.cc,
            CSTS => r.csts,
            AQA => r.aqa,
            ASQ => r.asq as u32,
            o if o == ASQ + 4 => (r.asq >> 32) as u32,
            ACQ => r.acq as u32,
            o if o == ACQ + 4 => (r.acq >> 32) as u32,
            _ => 0,
        }
    }

    /// A register read at `offset` (below [`DOORBELL_BASE`]).
    pub fn reg_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = self.reg_dword(at & !3).to_le_bytes()[(at & 3) as usize];
        }
    }

    /// A register write at `offset` (below [`DOORBELL_BASE`]).
    pub fn reg_write(&mut self, offset: u64, data: &[u8]) {
        match (data.len(), offset % data.len().max(1) as u64) {
            (4, 0) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.reg_write_dword(offset, v);
            }
            (8, 0) => {
                let lo = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let hi = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
                self.reg_write_dword(offset, lo);
                self.reg_write_dword(offset + 4, hi);
            }
            _ => Observed::bump(&self.observed.ignored_register_writes),
        }
    }

    fn reg_write_dword(&mut self, offset: u64, v: u32) {
        let enabled = self.regs.cc & CC_EN != 0;
        let r = &mut self.regs;
        match offset {
            INTMS => r.intms |= v,
            INTMC => r.intms &= !v,
            CC => self.write_cc(v),
            AQA if !enabled => r.aqa = v & 0x0fff_0fff,
            ASQ if !enabled => r.asq = (r.asq & !0xffff_ffff) | u64::from(v),
            o if o == ASQ + 4 && !enabled => r.asq = (r.asq & 0xffff_ffff) | (u64::from(v) << 32),
            ACQ if !enabled => r.acq = (r.acq & !0xffff_ffff) | u64::from(v),
            o if o == ACQ + 4 && !enabled => r.acq = (r.acq & 0xffff_ffff) | (u64::from(v) << 32),
            _ => Observed::bump(&self.observed.ignored_register_writes),
        }
    }

    fn write_cc(&mut self, v: u32) {
        let old = self.regs.cc;
        self.regs.cc = v;
        match (old & CC_EN != 0, v & CC_EN != 0) {
            (false, true) => self.enable(),
            (true, false) => self.controller_reset(),
            _ => {}
        }
        let shn = (v >> 14) & 0x3;
        if shn != 0 && self.regs.cc & CC_EN != 0 {
            // Shutdown notification: write the cache back, then report completion.
            if self.ns.flush().is_err() {
                self.fatal();
            }
            self.regs.csts |= CSTS_SHST_COMPLETE;
        }
    }

    /// CC.EN 0 to 1: check the admin queue configuration and go ready, or go fatal.
    fn enable(&mut self) {
        let cc = self.regs.cc;
        let css = (cc >> 4) & 0x7;
        let mps = (cc >> 7) & 0xf;
        let ams = (cc >> 11) & 0x7;
        let asqs = (self.regs.aqa & 0xfff) + 1;
        let acqs = ((self.regs.aqa >> 16) & 0xfff) + 1;
        let (asq, acq) = (self.regs.asq, self.regs.acq);
        let page_mask = PAGE_SIZE - 1;
        let ok = css == 0
            && mps == 0
            && ams == 0
            && asqs >= 2
            && acqs >= 2
            && asq & page_mask == 0
            && acq & page_mask == 0
            && self
                .dma
                .contains(asq, (u64::from(asqs) * SQE_SIZE) as usize)
            && self
                .dma
                .contains(acq, (u64::from(acqs) * CQE_SIZE) as usize);
        if !ok {
            self.regs.csts = CSTS_CFS;
            return;
        }
        for d in self.doorbells.iter() {
            d.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.sqs[0] = Some(SubQueue::new(asq, asqs as u16, 0));
        // The admin completion queue always has interrupts enabled, on vector 0.
        self.cqs[0] = Some(CompQueue::new(acq, acqs as u16, Some(0)));
        self.regs.csts = CSTS_RDY;
    }
}
